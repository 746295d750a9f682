//! The API an application needs beyond put/get (issue 18): atomic read-modify-write
//! (`compare_and_swap`, `update`) under racing threads and every durability policy,
//! explicit creation (`Options::create`), errors that name their file, closing a shared
//! store (`close_shared`), prefix iteration, `Stats` as text and JSON, and the CLI's
//! unambiguous `scan` output.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use mapkv::{Batch, Durability, Error, Options, Store};

mod common;
use common::tmp;

fn all_policies() -> [Durability; 4] {
    [
        Durability::None,
        Durability::Async,
        Durability::Periodic(Duration::from_millis(5)),
        Durability::Always,
    ]
}

fn open(path: &Path, opts: Options) -> Store {
    Store::open(path, opts).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

fn code(i: usize) -> String {
    format!("code-{i:04}")
}

// ---------------------------------------------------------------------------------------
// compare_and_swap and update under racing threads

/// The issue's URL shortener: threads race to claim the same codes with
/// `compare_and_swap(code, None, Some(me))`. Every code is claimed exactly once, the
/// store holds each winner's claim, and so does the reopened store.
#[test]
fn racing_claims_with_compare_and_swap_each_win_exactly_once() {
    const THREADS: usize = 8;
    const CODES: usize = 300;
    for policy in all_policies() {
        let (_dir, path) = tmp();
        let store = Arc::new(open(&path, Options::default().durability(policy)));
        let start = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = Arc::clone(&store);
                let start = Arc::clone(&start);
                std::thread::spawn(move || {
                    let me = format!("thread-{t}");
                    start.wait();
                    let mut won = Vec::new();
                    // Each thread walks the codes from a different place, so claims collide
                    // both head-on and in passing.
                    for j in 0..CODES {
                        let i = (j + t * CODES / THREADS) % CODES;
                        if store
                            .compare_and_swap(code(i), None, Some(me.as_bytes()))
                            .expect("compare_and_swap")
                        {
                            won.push(i);
                        }
                    }
                    (me, won)
                })
            })
            .collect();
        let mut winner = BTreeMap::new();
        for h in handles {
            let (me, won) = h.join().expect("claimer thread");
            for i in won {
                if let Some(other) = winner.insert(i, me.clone()) {
                    panic!("{policy:?}: code {i} claimed by both {other} and {me}");
                }
            }
        }
        assert_eq!(winner.len(), CODES, "{policy:?}: every code claimed once");
        let check = |s: &Store| {
            for (i, me) in &winner {
                assert_eq!(
                    s.get(code(*i)).expect("get").as_deref(),
                    Some(me.as_bytes()),
                    "{policy:?}: code {i} holds its winner's claim"
                );
            }
            assert_eq!(s.len(), CODES);
        };
        check(&store);
        Arc::try_unwrap(store)
            .expect("the only clone")
            .close()
            .expect("close");
        check(&open(&path, Options::default().read_only(true)));
    }
}

/// Threads bump shared counters with `update`: no increment is lost, and each thread
/// sees a distinct new value for each of its increments (every value 1..=N exactly once).
#[test]
fn racing_increments_with_update_lose_nothing() {
    const THREADS: usize = 8;
    const EACH: u64 = 150;
    fn bump(v: Option<&[u8]>) -> Option<Vec<u8>> {
        let n = v.map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        Some((n + 1).to_le_bytes().to_vec())
    }
    for policy in all_policies() {
        let (_dir, path) = tmp();
        let store = Arc::new(open(&path, Options::default().durability(policy)));
        let start = Arc::new(Barrier::new(THREADS));
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = Arc::clone(&store);
                let start = Arc::clone(&start);
                std::thread::spawn(move || {
                    start.wait();
                    let mut seen = Vec::new();
                    for i in 0..EACH {
                        let new = store.update("hits", bump).expect("update");
                        let n = u64::from_le_bytes(
                            new.expect("a counter")
                                .as_slice()
                                .try_into()
                                .expect("8 bytes"),
                        );
                        seen.push(n);
                        // Writes of other kinds in between, on a key of this thread.
                        if i % 10 == 0 {
                            store.put(format!("t{t}"), i.to_le_bytes()).expect("put");
                        }
                    }
                    seen
                })
            })
            .collect();
        let mut all: Vec<u64> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("thread"))
            .collect();
        all.sort_unstable();
        let total = THREADS as u64 * EACH;
        assert_eq!(
            all,
            (1..=total).collect::<Vec<_>>(),
            "{policy:?}: every increment seen once"
        );
        assert_eq!(
            store.get("hits").expect("get"),
            Some(total.to_le_bytes().to_vec()),
            "{policy:?}"
        );
        drop(store);
        let store = open(&path, Options::default());
        assert_eq!(
            store.get("hits").expect("get"),
            Some(total.to_le_bytes().to_vec()),
            "{policy:?}: after reopening"
        );
    }
}

/// A racing mix of `compare_and_swap` deletes and re-inserts on a few keys (a lock taken
/// and released): at any time at most one thread holds each lock.
#[test]
fn compare_and_swap_works_as_a_lock() {
    const THREADS: usize = 6;
    for policy in all_policies() {
        let (_dir, path) = tmp();
        let store = Arc::new(open(&path, Options::default().durability(policy)));
        let held: Arc<Vec<AtomicBool>> = Arc::new((0..3).map(|_| AtomicBool::new(false)).collect());
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = Arc::clone(&store);
                let held = Arc::clone(&held);
                std::thread::spawn(move || {
                    let me = [t as u8];
                    let mut acquired = 0;
                    for i in 0..200 {
                        let lock = i % 3;
                        let key = format!("lock{lock}");
                        if store
                            .compare_and_swap(&key, None, Some(&me))
                            .expect("acquire")
                        {
                            assert!(
                                !held[lock].swap(true, Ordering::SeqCst),
                                "{policy:?}: lock {lock} acquired twice"
                            );
                            acquired += 1;
                            held[lock].store(false, Ordering::SeqCst);
                            assert!(
                                store
                                    .compare_and_swap(&key, Some(&me), None)
                                    .expect("release"),
                                "{policy:?}: only the holder releases"
                            );
                        }
                    }
                    acquired
                })
            })
            .collect();
        let acquired: usize = handles.into_iter().map(|h| h.join().expect("thread")).sum();
        assert!(acquired > 0, "{policy:?}");
        for lock in 0..3 {
            assert_eq!(store.get(format!("lock{lock}")).expect("get"), None);
        }
    }
}

// ---------------------------------------------------------------------------------------
// compare_and_swap and update: semantics

#[test]
fn compare_and_swap_semantics() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default().max_value_size(8));
    let writes = |s: &Store| s.stats().writes;

    // Absent -> absent: "swapped" (nothing to do), nothing written.
    assert!(s.compare_and_swap("k", None, None).unwrap());
    assert_eq!(writes(&s), 0);
    // Insert if absent.
    assert!(s.compare_and_swap("k", None, Some(b"1")).unwrap());
    assert!(!s.compare_and_swap("k", None, Some(b"2")).unwrap());
    assert_eq!(s.get("k").unwrap().as_deref(), Some(&b"1"[..]));
    // Replace if equal.
    assert!(!s.compare_and_swap("k", Some(b"x"), Some(b"2")).unwrap());
    assert!(s.compare_and_swap("k", Some(b"1"), Some(b"2")).unwrap());
    assert_eq!(s.get("k").unwrap().as_deref(), Some(&b"2"[..]));
    // Same value: true, nothing written.
    let before = writes(&s);
    assert!(s.compare_and_swap("k", Some(b"2"), Some(b"2")).unwrap());
    assert_eq!(writes(&s), before, "an unchanged value is not rewritten");
    // An empty value is a value, not absence.
    assert!(s.compare_and_swap("e", None, Some(b"")).unwrap());
    assert!(!s.compare_and_swap("e", None, Some(b"x")).unwrap());
    assert!(s.compare_and_swap("e", Some(b""), None).unwrap());
    assert_eq!(s.get("e").unwrap(), None);
    // Delete if equal.
    assert!(!s.compare_and_swap("k", Some(b"1"), None).unwrap());
    assert!(s.compare_and_swap("k", Some(b"2"), None).unwrap());
    assert_eq!(s.get("k").unwrap(), None);
    assert!(!s.compare_and_swap("k", Some(b"2"), None).unwrap());
    // Limits: checked before anything is compared; nothing written.
    let before = writes(&s);
    assert!(matches!(
        s.compare_and_swap("k", None, Some(b"123456789")),
        Err(Error::ValueTooLarge { len: 9, max: 8 })
    ));
    assert_eq!(writes(&s), before);
    assert_eq!(s.get("k").unwrap(), None);
    // A batch and a cas see each other.
    let mut b = Batch::new();
    b.put("a", "1").put("b", "2");
    s.write(&b).unwrap();
    assert!(s.compare_and_swap("b", Some(b"2"), Some(b"3")).unwrap());
    drop(s);
    let s = open(&path, Options::default());
    assert_eq!(s.get("b").unwrap().as_deref(), Some(&b"3"[..]));
    assert_eq!(s.get("a").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(s.len(), 2);
}

#[test]
fn update_semantics() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default().max_value_size(8));
    let writes = |s: &Store| s.stats().writes;
    // Absent, and the closure leaves it absent: nothing written.
    let mut calls = 0;
    assert_eq!(
        s.update("k", |v| {
            calls += 1;
            assert_eq!(v, None);
            None
        })
        .unwrap(),
        None
    );
    assert_eq!(calls, 1, "the closure runs exactly once");
    assert_eq!(writes(&s), 0);
    // Insert, modify, return the new value.
    assert_eq!(
        s.update("k", |_| Some(b"a".to_vec())).unwrap().as_deref(),
        Some(&b"a"[..])
    );
    let got = s
        .update("k", |v| {
            let mut v = v.expect("present").to_vec();
            v.push(b'b');
            Some(v)
        })
        .unwrap();
    assert_eq!(got.as_deref(), Some(&b"ab"[..]));
    assert_eq!(s.get("k").unwrap().as_deref(), Some(&b"ab"[..]));
    // Unchanged: nothing written.
    let before = writes(&s);
    assert_eq!(
        s.update("k", |v| v.map(<[u8]>::to_vec)).unwrap().as_deref(),
        Some(&b"ab"[..])
    );
    assert_eq!(writes(&s), before);
    // Too large a value from the closure: an error, nothing written.
    assert!(matches!(
        s.update("k", |_| Some(vec![0; 9])),
        Err(Error::ValueTooLarge { len: 9, max: 8 })
    ));
    assert_eq!(writes(&s), before);
    assert_eq!(s.get("k").unwrap().as_deref(), Some(&b"ab"[..]));
    // Delete.
    assert_eq!(s.update("k", |_| None).unwrap(), None);
    assert_eq!(s.get("k").unwrap(), None);
    assert!(!s.contains_key("k").unwrap());
    // A closure that panics writes nothing and releases the writer lock.
    s.put("p", "1").unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        s.update("p", |_| panic!("closure failed"))
    }));
    assert!(r.is_err());
    assert_eq!(s.get("p").unwrap().as_deref(), Some(&b"1"[..]));
    s.put("p", "2").unwrap();
    assert_eq!(
        s.update("p", |v| v.map(|v| [v, b"!"].concat())).unwrap(),
        Some(b"2!".to_vec())
    );
    drop(s);
    let s = open(&path, Options::default().read_only(true));
    assert_eq!(s.get("p").unwrap().as_deref(), Some(&b"2!"[..]));
    assert_eq!(s.len(), 1);
}

/// Calls from inside an `update` closure: reads work (and see the value before the
/// update), writes and the other calls that need the writer lock are refused with
/// `Error::Reentrant` instead of deadlocking; another store is unaffected.
#[test]
fn update_closure_calling_its_store_gets_reentrant_not_a_deadlock() {
    let (dir, path) = tmp();
    let s = open(&path, Options::default());
    let other = open(&dir.path().join("other.mkv"), Options::default());
    s.put("k", "old").unwrap();
    s.put("x", "1").unwrap();
    let new = s
        .update("k", |v| {
            assert_eq!(v, Some(&b"old"[..]));
            assert!(matches!(s.put("y", "2"), Err(Error::Reentrant)));
            assert!(matches!(s.delete("x"), Err(Error::Reentrant)));
            let mut b = Batch::new();
            b.put("y", "2");
            assert!(matches!(s.write(&b), Err(Error::Reentrant)));
            // An empty batch writes nothing and needs no lock.
            s.write(&Batch::new()).unwrap();
            assert!(matches!(
                s.compare_and_swap("x", Some(b"1"), None),
                Err(Error::Reentrant)
            ));
            assert!(matches!(
                s.update("x", |_| Some(b"no".to_vec())),
                Err(Error::Reentrant)
            ));
            assert!(matches!(s.compact(), Err(Error::Reentrant)));
            assert!(matches!(s.verify(), Err(Error::Reentrant)));
            s.flush().expect("flush needs no writer lock");
            assert!(matches!(s.close_shared(), Err(Error::Reentrant)));
            // Reads work and see the state before the update.
            assert_eq!(s.get("k").unwrap().as_deref(), Some(&b"old"[..]));
            assert_eq!(s.get("x").unwrap().as_deref(), Some(&b"1"[..]));
            assert_eq!(s.iter().count(), 2);
            assert_eq!(s.len(), 2);
            assert_eq!(s.stats().live_keys, 2);
            // Another store is another lock.
            other.put("from-inside", "yes").unwrap();
            other
                .update("nested", |_| Some(b"ok".to_vec()))
                .expect("an update of another store inside works");
            Some(b"new".to_vec())
        })
        .unwrap();
    assert_eq!(new.as_deref(), Some(&b"new"[..]));
    // After the closure, writes work again.
    s.put("y", "2").unwrap();
    assert_eq!(s.get("k").unwrap().as_deref(), Some(&b"new"[..]));
    assert_eq!(s.get("x").unwrap().as_deref(), Some(&b"1"[..]));
    assert_eq!(s.len(), 3);
    assert_eq!(other.get("nested").unwrap().as_deref(), Some(&b"ok"[..]));
}

/// While an `update` closure runs, a write from another thread waits for it (it is not
/// refused), and lands after the update.
#[test]
fn writes_from_other_threads_wait_for_an_update_closure() {
    let (_dir, path) = tmp();
    let s = Arc::new(open(&path, Options::default()));
    s.put("k", "0").unwrap();
    let inside = Arc::new(Barrier::new(2));
    let writer = {
        let s = Arc::clone(&s);
        let inside = Arc::clone(&inside);
        std::thread::spawn(move || {
            inside.wait();
            s.put("k", "from-other-thread")
                .expect("put waits, then succeeds");
        })
    };
    s.update("k", |_| {
        inside.wait();
        std::thread::sleep(Duration::from_millis(100));
        Some(b"from-update".to_vec())
    })
    .unwrap();
    writer.join().unwrap();
    assert_eq!(
        s.get("k").unwrap().as_deref(),
        Some(&b"from-other-thread"[..]),
        "the other thread's put came after the update"
    );
}

/// Under `Always`, a compare-and-swap or update returns with its write durable, like a
/// put.
#[test]
fn compare_and_swap_and_update_are_durable_under_always() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default().durability(Durability::Always));
    assert!(s.compare_and_swap("a", None, Some(b"1")).unwrap());
    let st = s.stats();
    assert_eq!((st.writes_at_risk, st.bytes_at_risk), (0, 0), "{st:?}");
    s.update("a", |_| Some(b"2".to_vec())).unwrap();
    let st = s.stats();
    assert_eq!((st.writes_at_risk, st.bytes_at_risk), (0, 0), "{st:?}");
    assert!(s.compare_and_swap("a", Some(b"2"), None).unwrap());
    let st = s.stats();
    assert_eq!((st.writes_at_risk, st.bytes_at_risk), (0, 0), "{st:?}");
    assert_eq!(st.live_keys, 0);
}

#[test]
fn read_only_stores_refuse_compare_and_swap_and_update() {
    let (_dir, path) = tmp();
    open(&path, Options::default()).put("k", "v").unwrap();
    let r = open(&path, Options::default().read_only(true));
    assert!(matches!(
        r.compare_and_swap("k", Some(b"v"), None),
        Err(Error::ReadOnly)
    ));
    let mut called = false;
    assert!(matches!(
        r.update("k", |_| {
            called = true;
            None
        }),
        Err(Error::ReadOnly)
    ));
    assert!(!called, "the closure does not run on a read-only store");
    assert_eq!(r.get("k").unwrap().as_deref(), Some(&b"v"[..]));
}

// ---------------------------------------------------------------------------------------
// Options::create

#[test]
fn create_false_opens_only_an_existing_store() {
    let (dir, path) = tmp();
    let no = Options::default().create(false);
    // Missing: not found, nothing created (no leftovers either).
    match Store::open(&path, no.clone()) {
        Err(Error::NotFound { path: p, .. }) => assert_eq!(p, path),
        other => panic!("expected NotFound, got {other:?}"),
    }
    assert!(!path.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    // An empty file is not turned into a store without `create(true)`, and stays empty.
    std::fs::write(&path, b"").unwrap();
    let r = Store::open(&path, no.clone());
    assert!(matches!(r, Err(Error::NotAStore { .. })), "{r:?}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    let r = Store::open(&path, Options::default().read_only(true));
    assert!(matches!(r, Err(Error::NotAStore { .. })), "{r:?}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    // With `create(true)` (the default) the empty file becomes a store.
    let s = open(&path, Options::default());
    s.put("k", "v").unwrap();
    drop(s);
    // An existing store opens with `create(false)`.
    let s = open(&path, no.clone());
    assert_eq!(s.get("k").unwrap().as_deref(), Some(&b"v"[..]));
    drop(s);
    // The default creates a missing store.
    let fresh = dir.path().join("fresh.mkv");
    let s = open(&fresh, Options::default());
    assert!(s.is_empty());
}

#[test]
fn a_foreign_file_is_never_turned_into_a_store() {
    let (_dir, path) = tmp();
    let content = b"not a store, but someone's data\n".repeat(300);
    std::fs::write(&path, &content).unwrap();
    for opts in [
        Options::default(),
        Options::default().create(false),
        Options::default().read_only(true),
        Options::default().salvage(true),
    ] {
        let e = Store::open(&path, opts).expect_err("a foreign file must not open");
        assert!(matches!(e, Error::NotAStore { .. }), "{e:?}");
        assert_eq!(e.path(), Some(path.as_path()));
        assert_eq!(
            std::fs::read(&path).unwrap(),
            content,
            "the file is unchanged"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Errors name their file

#[test]
fn open_errors_name_the_file_and_say_what_to_do() {
    let (dir, path) = tmp();
    let p = path.display().to_string();

    // Locked: names the file, says what a reader can do.
    let w = open(&path, Options::default());
    let e = Store::open(&path, Options::default()).expect_err("second writer");
    assert!(matches!(e, Error::Locked { .. }), "{e:?}");
    assert_eq!(e.path(), Some(path.as_path()));
    let msg = e.to_string();
    assert!(msg.starts_with(&p), "{msg}");
    assert!(msg.contains("open for writing by another"), "{msg}");
    assert!(msg.contains("is locked"), "{msg}");
    assert!(msg.contains("read_only(true)"), "{msg}");
    drop(w);

    // Not found (reader, and writer with create(false)).
    let missing = dir.path().join("typo.mkv");
    for opts in [
        Options::default().read_only(true),
        Options::default().create(false),
    ] {
        let e = Store::open(&missing, opts).expect_err("missing");
        assert_eq!(e.path(), Some(missing.as_path()));
        let msg = e.to_string();
        assert!(msg.contains(&missing.display().to_string()), "{msg}");
        assert!(msg.contains("does not exist"), "{msg}");
    }

    // A directory: a clear error, for writers and readers, not "pread: Is a directory".
    for opts in [Options::default(), Options::default().read_only(true)] {
        let e = Store::open(dir.path(), opts).expect_err("a directory");
        match &e {
            Error::Io { source, .. } => {
                assert_eq!(source.kind(), std::io::ErrorKind::IsADirectory, "{e:?}");
            }
            other => panic!("expected an I/O error, got {other:?}"),
        }
        assert_eq!(e.path(), Some(dir.path()));
        let msg = e.to_string();
        assert!(msg.contains("is a directory"), "{msg}");
        assert!(!msg.contains("pread"), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    }

    // Not a store.
    let foreign = dir.path().join("notes.txt");
    std::fs::write(&foreign, "hello").unwrap();
    let e = Store::open(&foreign, Options::default()).expect_err("foreign");
    assert!(matches!(e, Error::NotAStore { offset: 0, .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.starts_with(&foreign.display().to_string()) && msg.contains("not a mapkv store"),
        "{msg}"
    );

    // A missing directory: an I/O error naming the file, with its source.
    let nodir = dir.path().join("no-such-dir").join("s.mkv");
    let e = Store::open(&nodir, Options::default()).expect_err("missing directory");
    assert!(matches!(e, Error::Io { .. }), "{e:?}");
    assert_eq!(e.path(), Some(nodir.as_path()));
    assert!(std::error::Error::source(&e).is_some());
    assert!(e.to_string().contains(&nodir.display().to_string()), "{e}");
}

/// A damaged record found by a read names the store file (and its offset).
#[test]
fn corruption_found_by_a_read_names_the_file() {
    let (_dir, path) = tmp();
    let marker = b"UNIQUE-VALUE-MARKER-0123456789";
    {
        let s = open(&path, Options::default());
        s.put("k", marker).unwrap();
        s.put("other", "fine").unwrap();
    }
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("the value is in the file");
    bytes[at + 3] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let s = open(&path, Options::default().read_only(true));
    let e = s.get("k").expect_err("checksum mismatch");
    assert!(matches!(e, Error::Corrupt { .. }), "{e:?}");
    assert_eq!(e.path(), Some(path.as_path()));
    let msg = e.to_string();
    assert!(msg.starts_with(&path.display().to_string()), "{msg}");
    assert!(msg.contains("mapkv verify"), "{msg}");
    assert_eq!(s.get("other").unwrap().as_deref(), Some(&b"fine"[..]));
    // The same through prefix iteration.
    let errs: Vec<Error> = s.iter_prefix("k").filter_map(Result::err).collect();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].path(), Some(path.as_path()));
}

#[test]
fn backup_errors_name_the_copy() {
    let (dir, path) = tmp();
    let s = open(&path, Options::default());
    s.put("k", "v").unwrap();
    let dst = dir.path().join("exists.mkv");
    std::fs::write(&dst, "x").unwrap();
    let e = s.backup(&dst).expect_err("a backup never overwrites");
    assert_eq!(e.path(), Some(dst.as_path()), "{e:?}");
    assert!(e.to_string().contains(&dst.display().to_string()), "{e}");
}

// ---------------------------------------------------------------------------------------
// close_shared

/// Threads write while another closes the shared store: every write that returned `Ok`
/// is in the store at the next open, which finds it closed cleanly; every call after the
/// close fails with `Error::Closed`.
#[test]
fn close_shared_closes_an_arc_store_and_later_calls_fail() {
    for policy in all_policies() {
        let (dir, path) = tmp();
        let store = Arc::new(open(&path, Options::default().durability(policy)));
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    let mut acked = Vec::new();
                    for i in 0.. {
                        let key = format!("t{t}-{i}");
                        match store.put(&key, "v") {
                            Ok(()) => acked.push(key),
                            Err(Error::Closed) => break,
                            Err(e) => panic!("{policy:?}: {e}"),
                        }
                    }
                    acked
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(30));
        store.close_shared().expect("close_shared");
        let acked: Vec<String> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("writer"))
            .collect();
        assert!(!acked.is_empty(), "{policy:?}");

        // Every call after the close fails clearly.
        let closed = |r: Result<(), Error>, what: &str| {
            assert!(matches!(r, Err(Error::Closed)), "{policy:?} {what}: {r:?}");
        };
        closed(store.put("x", "y"), "put");
        closed(store.delete("x").map(drop), "delete");
        closed(store.write(&Batch::new()), "empty batch");
        closed(store.get("x").map(drop), "get");
        closed(store.get_with("x", |_| ()).map(drop), "get_with");
        closed(store.contains_key("x").map(drop), "contains_key");
        closed(
            store.compare_and_swap("x", None, Some(b"1")).map(drop),
            "cas",
        );
        closed(store.update("x", |_| None).map(drop), "update");
        closed(store.flush(), "flush");
        closed(store.compact(), "compact");
        closed(store.verify().map(drop), "verify");
        closed(store.follow().map(drop), "follow");
        closed(store.changes().map(drop), "changes");
        closed(store.backup(dir.path().join("b.mkv")), "backup");
        closed(store.iter().next().expect("an item").map(drop), "iter");
        closed(
            store.iter_prefix("t").next().expect("an item").map(drop),
            "iter_prefix",
        );
        closed(store.close_shared(), "close_shared again");
        let msg = Error::Closed.to_string();
        assert!(msg.contains("closed"), "{msg}");
        // The calls that cannot fail still answer.
        assert_eq!(store.len(), acked.len(), "{policy:?}");
        assert_eq!(store.stats().live_keys, acked.len() as u64);
        assert_eq!(store.path(), path);
        drop(store);

        let s = open(&path, Options::default().read_only(true));
        assert!(
            s.stats().recovery.was_clean,
            "{policy:?}: close_shared closed it cleanly"
        );
        assert_eq!(s.len(), acked.len(), "{policy:?}");
        for k in &acked {
            assert!(
                s.contains_key(k).unwrap(),
                "{policy:?}: acknowledged {k} lost"
            );
        }
    }
}

#[test]
fn close_after_close_shared_and_drop_are_harmless() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default());
    s.put("k", "v").unwrap();
    s.close_shared().unwrap();
    assert!(matches!(s.close(), Err(Error::Closed)));
    // A reader closes too.
    let r = open(&path, Options::default().read_only(true));
    r.close_shared().unwrap();
    assert!(matches!(r.get("k"), Err(Error::Closed)));
    drop(r);
    // Never written: still closes cleanly; the next writer opens at once.
    let s = open(&path, Options::default());
    s.close_shared().unwrap();
    drop(s);
    let s = open(&path, Options::default());
    assert!(s.stats().recovery.was_clean);
    assert_eq!(s.get("k").unwrap().as_deref(), Some(&b"v"[..]));
}

// ---------------------------------------------------------------------------------------
// iter_prefix

#[test]
fn iter_prefix_matches_a_filtered_scan() {
    let (_dir, path) = tmp();
    // Small checkpoints, so the pairs are spread over the index and the delta.
    let s = open(&path, Options::default().checkpoint_keys(50));
    let mut model = BTreeMap::new();
    for i in 0..400u32 {
        let key = match i % 4 {
            0 => format!("user:{i}"),
            1 => format!("post:{i}"),
            2 => format!("user:{i}:email"),
            _ => format!("u{i}"),
        };
        let v = format!("v{i}").into_bytes();
        s.put(&key, &v).unwrap();
        model.insert(key.into_bytes(), v);
    }
    for i in (0..400u32).step_by(7) {
        let key = format!("user:{i}");
        if s.delete(&key).unwrap() {
            model.remove(key.as_bytes());
        }
    }
    s.put("user:4", "overwritten").unwrap();
    model.insert(b"user:4".to_vec(), b"overwritten".to_vec());
    s.put([0xff, 0x00], [1, 2]).unwrap();
    model.insert(vec![0xff, 0x00], vec![1, 2]);

    let check = |s: &Store| {
        for prefix in [&b""[..], b"user:", b"u", b"post:1", b"nothing", b"\xff"] {
            let got: Vec<_> = s
                .iter_prefix(prefix)
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            // Log order: the same order as the full scan, filtered.
            let scan: Vec<_> = s
                .iter()
                .map(Result::unwrap)
                .filter(|(k, _)| k.starts_with(prefix))
                .collect();
            assert_eq!(got, scan, "prefix {prefix:?}: order and content");
            let want: BTreeMap<_, _> = model
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let keys: HashSet<_> = got.iter().map(|(k, _)| k.clone()).collect();
            assert_eq!(keys.len(), got.len(), "each key once");
            assert_eq!(got.into_iter().collect::<BTreeMap<_, _>>(), want);
        }
    };
    check(&s);
    // A snapshot: later writes are not seen.
    let it = s.iter_prefix("user:");
    let n = it.size_hint().1.expect("bounded");
    s.put("user:new", "x").unwrap();
    assert!(it.count() <= n);
    s.delete("user:new").unwrap();
    drop(s);
    check(&open(&path, Options::default().read_only(true)));
}

// ---------------------------------------------------------------------------------------
// Stats

#[test]
fn stats_of_a_tiny_store_are_sane_and_display_in_human_units() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default());
    for k in ["a", "b", "c", "d"] {
        s.put(k, "value").unwrap();
    }
    let st = s.stats();
    assert_eq!(st.space_amplification, 1.0, "{st:?}");
    assert_eq!(st.dead_ratio(), 0.0);
    let text = st.to_string();
    assert!(text.contains("4 live"), "{text}");
    assert!(text.contains("MiB") && text.contains("KiB"), "{text}");
    assert!(text.contains("space amplification 1.00"), "{text}");
    assert!(!text.contains("since open"), "{text}");
    let long = format!("{st:#}");
    assert!(long.starts_with(&text), "{long}");
    assert!(
        long.contains("since open") && long.contains("live area"),
        "{long}"
    );
    // Overwrites make dead bytes: the ratio moves, amplification stays sane.
    for _ in 0..3 {
        for k in ["a", "b", "c", "d"] {
            s.put(k, "value").unwrap();
        }
    }
    let st = s.stats();
    assert!(
        (0.7..0.8).contains(&st.dead_ratio()),
        "3 of 4 versions dead: {}",
        st.dead_ratio()
    );
    assert_eq!(st.space_amplification, 1.0);
    assert!(st.to_string().contains("75% of the log"), "{st}");
    // An empty store.
    let (_d2, p2) = tmp();
    let e = open(&p2, Options::default()).stats();
    assert_eq!((e.space_amplification, e.dead_ratio()), (1.0, 0.0));
}

#[test]
fn space_amplification_reflects_a_large_file_with_little_live_data() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default().durability(Durability::None));
    let v = vec![7u8; 4096];
    for i in 0..2000u32 {
        s.put(i.to_le_bytes(), &v).unwrap();
    }
    let full = s.stats();
    assert!(
        full.space_amplification >= 1.0 && full.space_amplification < 3.0,
        "{full}"
    );
    for i in 0..1990u32 {
        s.delete(i.to_le_bytes()).unwrap();
    }
    let st = s.stats();
    // ~40 KiB live in a file of ~8+ MiB: counted as 1 MiB live, still clearly amplified.
    assert!(st.space_amplification > 4.0, "{st}");
    assert!(st.dead_ratio() > 0.9, "{st}");
    s.compact().unwrap();
    let st = s.stats();
    assert_eq!(st.space_amplification, 1.0, "{st}");
    assert_eq!(st.dead_ratio(), 0.0, "{st}");
}

#[cfg(feature = "cli")]
#[test]
fn stats_serialize_to_json() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default().durability(Durability::Always));
    s.put("k", "v").unwrap();
    let st = s.stats();
    let json = serde_json::to_value(&st).expect("serialize");
    assert_eq!(json["live_keys"], 1);
    assert_eq!(json["file_size"], st.file_size);
    assert_eq!(json["durability"], "Always");
    assert_eq!(json["recovery"]["was_clean"], true);
    assert_eq!(json["live"]["reader"], false);
}

// ---------------------------------------------------------------------------------------
// The CLI: stats --json, unambiguous scan output, create and path errors

#[cfg(feature = "cli")]
mod cli {
    use super::*;
    use std::process::{Command, Output};

    fn mapkv(args: &[&std::ffi::OsStr]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_mapkv"))
            .args(args)
            .output()
            .expect("run mapkv")
    }

    fn run(args: &[&str], path: &Path) -> Output {
        let mut a: Vec<&std::ffi::OsStr> = vec![args[0].as_ref(), path.as_os_str()];
        a.extend(args[1..].iter().map(|s| s.as_ref() as &std::ffi::OsStr));
        mapkv(&a)
    }

    fn stdout(o: &Output) -> String {
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn stderr(o: &Output) -> String {
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    #[test]
    fn stats_json_is_the_stats_struct() {
        let (_dir, path) = tmp();
        {
            let s = open(&path, Options::default());
            for k in ["a", "b", "c", "d"] {
                s.put(k, "v").unwrap();
            }
        }
        let o = run(&["stats", "--json"], &path);
        assert!(o.status.success(), "{o:?}");
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
        assert_eq!(v["live_keys"], 4);
        assert_eq!(v["space_amplification"], 1.0);
        assert!(v["file_size"].as_u64().expect("an integer") > 0);
        let o = run(&["stats"], &path);
        assert!(o.status.success(), "{o:?}");
        let text = stdout(&o);
        assert!(text.contains("space amplification"), "{text}");
        assert!(!text.contains("9039"), "{text}");
        assert!(text.contains("1.00"), "{text}");
    }

    #[test]
    fn scan_output_is_unambiguous() {
        let (_dir, path) = tmp();
        {
            let s = open(&path, Options::default());
            s.put(br"text\x01", "backslash").unwrap(); // the text `\x01`
            s.put(b"byte\x01", "control").unwrap(); // the byte 0x01
            s.put("tab", "a\tb\nc").unwrap();
            s.put(b"bad\xffutf8", "é").unwrap();
        }
        let o = run(&["scan"], &path);
        assert!(o.status.success(), "{o:?}");
        let mut lines: Vec<String> = stdout(&o).lines().map(str::to_owned).collect();
        lines.sort();
        assert_eq!(
            lines,
            [
                r"bad\xffutf8	é",
                r"byte\x01	control",
                r"tab	a\x09b\x0ac",
                r"text\\x01	backslash",
            ]
        );
        // --hex: keys and values as hex.
        let o = run(&["scan", "--hex", "--prefix", "74657874"], &path);
        assert!(o.status.success(), "{o:?}");
        assert_eq!(stdout(&o), "746578745c783031\t6261636b736c617368\n");
        // --raw: the bytes as they are.
        let o = run(&["scan", "--raw", "--prefix", "byte"], &path);
        assert!(o.status.success(), "{o:?}");
        assert_eq!(o.stdout, b"byte\x01\tcontrol\n");
        // get prints values the same way.
        let o = run(&["get", "tab"], &path);
        assert_eq!(stdout(&o), "a\\x09b\\x0ac\n");
    }

    #[test]
    fn scan_prefix_uses_the_library_prefix_scan() {
        let (_dir, path) = tmp();
        {
            let s = open(&path, Options::default());
            for i in 0..20 {
                s.put(format!("user:{i:02}"), format!("{i}")).unwrap();
                s.put(format!("post:{i:02}"), format!("{i}")).unwrap();
            }
        }
        let o = run(&["scan", "--prefix", "user:1", "--keys-only"], &path);
        assert!(o.status.success(), "{o:?}");
        let mut keys: Vec<String> = stdout(&o).lines().map(str::to_owned).collect();
        keys.sort();
        let want: Vec<String> = (10..20).map(|i| format!("user:{i:02}")).collect();
        assert_eq!(keys, want);
        let o = run(&["scan", "--prefix", "user:", "--limit", "3"], &path);
        assert_eq!(stdout(&o).lines().count(), 3);
    }

    #[test]
    fn commands_on_a_missing_store_create_nothing_but_put() {
        let (dir, path) = tmp();
        for args in [
            vec!["get", "k"],
            vec!["del", "k"],
            vec!["scan"],
            vec!["stats"],
            vec!["verify"],
            vec!["verify", "--repair"],
            vec!["compact"],
        ] {
            let o = run(&args, &path);
            assert!(!o.status.success(), "{args:?}");
            let err = stderr(&o);
            assert!(err.contains("no such store"), "{args:?}: {err}");
            assert!(err.contains(&path.display().to_string()), "{args:?}: {err}");
            assert!(!path.exists(), "{args:?} created the store");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let o = run(&["put", "k", "v"], &path);
        assert!(o.status.success(), "{o:?}");
        assert!(path.exists());
    }

    #[test]
    fn errors_name_the_file_once() {
        let (dir, path) = tmp();
        let o = run(&["get", "k"], dir.path());
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(err.contains("is a directory"), "{err}");
        assert!(!err.contains("pread"), "{err}");
        let d = dir.path().display().to_string();
        assert_eq!(
            err.matches(&d).count(),
            2,
            "named once (and in the hint): {err}"
        );
        std::fs::write(&path, "not a store").unwrap();
        let o = run(&["stats"], &path);
        let err = stderr(&o);
        assert!(err.contains("not a mapkv store"), "{err}");
        assert_eq!(
            err.matches(&path.display().to_string()).count(),
            1,
            "named once: {err}"
        );
    }
}
