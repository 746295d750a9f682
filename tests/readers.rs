//! Readers in other processes (docs/GUARANTEES.md, "Processes: one writer, many
//! readers"): a store opened with `read_only(true)` in one process sees every write that
//! a writer in another process committed before the reader's call started, without
//! reopening, across file growth, checkpoints, index growth, compaction and the writer's
//! kill -9 and restart. Never an older value once a newer one is committed, never half a
//! batch.
//!
//! The writer runs in a child process (this test binary re-run with
//! `MAPKV_READERS_ROLE=writer`); it prints `ACK <i>` after each write returned. The
//! parent holds the reader and checks, after each `ACK`, that the write is visible.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mapkv::{Batch, Durability, Error, Options, Store};

mod common;
use common::tmp;

const ROLE_VAR: &str = "MAPKV_READERS_ROLE";
const PATH_VAR: &str = "MAPKV_READERS_PATH";
const ARGS_VAR: &str = "MAPKV_READERS_ARGS";
const CHILD_TIMEOUT: Duration = Duration::from_secs(120);

fn key(i: u64) -> Vec<u8> {
    format!("key{:07}", i % 5_000).into_bytes()
}

/// The value of write `i`: its number, then padding so the log grows quickly.
fn value(i: u64) -> Vec<u8> {
    let mut v = format!("{i:012}:").into_bytes();
    v.resize(40 + (i % 200) as usize, b'v');
    v
}

fn number(v: &[u8]) -> u64 {
    std::str::from_utf8(&v[..12])
        .expect("utf-8 value")
        .parse()
        .expect("value starts with its write number")
}

fn durability(name: &str) -> Durability {
    match name {
        "always" => Durability::Always,
        "async" => Durability::Async,
        "periodic" => Durability::Periodic(Duration::from_millis(5)),
        _ => Durability::None,
    }
}

/// Child side: writes `count` writes from `start` (a put of `key(i)`, every 10th a batch
/// of that put and a pair `a`/`b` holding the same number), compacting every
/// `compact_every` writes, printing `ACK i` after each returned.
#[test]
fn child_process_entry() {
    let Ok(role) = std::env::var(ROLE_VAR) else {
        return;
    };
    let path = PathBuf::from(std::env::var(PATH_VAR).expect("store path"));
    let args: Vec<String> = std::env::var(ARGS_VAR)
        .expect("args")
        .split(',')
        .map(str::to_string)
        .collect();
    assert_eq!(role, "writer", "unknown role");
    let start: u64 = args[1].parse().expect("start");
    let count: u64 = args[2].parse().expect("count");
    let compact_every: u64 = args[3].parse().expect("compact_every");
    let opts = Options::default()
        .durability(durability(&args[0]))
        .checkpoint_keys(300)
        .initial_size(64 << 10);
    let store = Store::open(&path, opts).expect("writer open");
    eprintln!("READY");
    for i in start..start + count {
        if i % 10 == 0 {
            let mut b = Batch::new();
            b.put(key(i), value(i))
                .put(b"a", value(i))
                .put(b"b", value(i));
            store.write(&b).expect("batch");
        } else {
            store.put(key(i), value(i)).expect("put");
        }
        if compact_every > 0 && i % compact_every == compact_every - 1 {
            store.compact().expect("compact");
        }
        eprintln!("ACK {i}");
    }
    store.close().expect("close");
    eprintln!("DONE");
}

struct Writer {
    child: Child,
    lines: mpsc::Receiver<String>,
}

fn spawn_writer(path: &Path, args: &str) -> Writer {
    let c = common::spawn_test_child(
        "child_process_entry",
        &[
            (ROLE_VAR, "writer".as_ref()),
            (PATH_VAR, path.as_os_str()),
            (ARGS_VAR, args.as_ref()),
        ],
    );
    Writer {
        child: c.child,
        lines: c.lines,
    }
}

impl Writer {
    /// The next `ACK i` (or `None` at `DONE`).
    fn next_ack(&mut self) -> Option<u64> {
        loop {
            let line = self
                .lines
                .recv_timeout(CHILD_TIMEOUT)
                .expect("writer child stopped talking");
            if let Some(n) = line.strip_prefix("ACK ") {
                return Some(n.trim().parse().expect("ack number"));
            }
            if line.starts_with("DONE") {
                return None;
            }
            assert!(!line.contains("panicked"), "writer child panicked: {line}");
        }
    }

    fn wait_ready(&mut self) {
        loop {
            let line = self
                .lines
                .recv_timeout(CHILD_TIMEOUT)
                .expect("writer ready");
            if line.starts_with("READY") {
                return;
            }
            assert!(!line.contains("panicked"), "writer child panicked: {line}");
        }
    }

    fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the child to exit (after its `DONE`).
    fn finish(mut self) {
        assert!(self.child.wait().expect("wait").success(), "writer failed");
    }
}

/// Checks, in the reader, that write `i` is visible (the writer acknowledged it before
/// this call started): its key holds write `i` or a later one of the same key, never an
/// earlier one; and the batch pair is never torn or older than the last batch seen.
fn check_visible(reader: &Store, i: u64, last_batch: &mut u64) {
    let got = reader
        .get(key(i))
        .unwrap_or_else(|e| panic!("reader get after ACK {i}: {e}"))
        .unwrap_or_else(|| {
            // Whether it shows up later tells a missed publication from a lost write.
            std::thread::sleep(Duration::from_millis(200));
            let later = reader.get(key(i)).map(|v| v.map(|v| number(&v)));
            panic!(
                "write {i} acknowledged but not visible to the reader (200 ms later: \
                 {later:?}); {:?}",
                reader.stats().live
            )
        });
    let n = number(&got);
    assert!(
        n >= i && n % 5_000 == i % 5_000,
        "write {i}: reader saw {n}"
    );
    assert_eq!(got, value(n), "write {i}: value of write {n} damaged");
    if i.is_multiple_of(10) {
        *last_batch = i;
    }
    // b first, then a: a was committed with b, so it is at least as new.
    if let Some(b) = reader.get(b"b").expect("get b") {
        let a = reader
            .get(b"a")
            .expect("get a")
            .expect("b visible without a: half a batch");
        assert!(number(&a) >= number(&b), "a older than b: half a batch");
        assert!(
            number(&b) >= *last_batch,
            "b older than the last acknowledged batch"
        );
    }
}

/// The whole life of a store, seen by one reader that stays open: opened before the
/// writer exists, then growth, checkpoints, index growth, compaction, kill -9 and
/// restart.
fn follow_writer_through_everything(policy: &str) {
    let (_dir, path) = tmp();
    // The store must exist for a reader to open it: a writer creates it and closes.
    Store::open(&path, Options::default().initial_size(64 << 10))
        .expect("create")
        .close()
        .expect("close");
    let reader = Store::open(&path, Options::default().read_only(true)).expect("reader");
    assert_eq!(reader.get(key(0)).expect("get"), None);
    let mut last_batch = 0;
    let mut next = 0u64;
    // Round 1: 1,500 writes, compacting every 500; killed at a random-ish point.
    // Round 2: a new writer recovers and continues; killed again.
    // Round 3: runs to its end and closes.
    for (round, (count, kill_after)) in [(1_500u64, 1_100u64), (1_500, 700), (1_200, u64::MAX)]
        .into_iter()
        .enumerate()
    {
        let mut w = spawn_writer(&path, &format!("{policy},{next},{count},500"));
        w.wait_ready();
        let mut acked = 0;
        while let Some(i) = w.next_ack() {
            assert_eq!(i, next, "round {round}: writes acknowledged in order");
            check_visible(&reader, i, &mut last_batch);
            next = i + 1;
            acked += 1;
            if acked == kill_after {
                break;
            }
        }
        if kill_after == u64::MAX {
            w.finish();
        } else {
            w.kill();
            // Whatever the killed writer wrote after its last ACK may or may not be
            // there; what it acknowledged must stay.
            for i in next.saturating_sub(50)..next {
                check_visible(&reader, i, &mut last_batch);
            }
        }
    }
    let stats = reader.stats();
    assert!(stats.live.reader);
    assert_eq!(stats.live.behind_bytes, 0, "caught up: {:?}", stats.live);
    assert!(stats.live.writer_sessions >= 3, "{:?}", stats.live);
    // Every key's newest acknowledged value, as a fresh open sees it.
    let fresh = Store::open(&path, Options::default().read_only(true)).expect("fresh reader");
    for i in next.saturating_sub(5_000)..next {
        let k = key(i);
        assert_eq!(reader.get(&k).expect("get"), fresh.get(&k).expect("get"));
    }
    reader.verify().expect("verify in the reader");
}

#[test]
fn a_reader_follows_a_none_writer_through_growth_compaction_and_kills() {
    follow_writer_through_everything("none");
}

#[test]
fn a_reader_follows_an_always_writer_through_growth_compaction_and_kills() {
    follow_writer_through_everything("always");
}

#[test]
fn a_reader_follows_a_periodic_writer() {
    follow_writer_through_everything("periodic");
}

/// A reader and a writer in one process are as separate as in two: the writer lock is
/// per open file, readers take none.
#[test]
fn readers_and_one_writer_open_in_any_order_and_a_second_writer_is_locked() {
    let (_dir, path) = tmp();
    Store::open(&path, Options::default())
        .expect("create")
        .close()
        .expect("close");
    let r1 = Store::open(&path, Options::default().read_only(true)).expect("reader first");
    let w = Store::open(&path, Options::default()).expect("writer after a reader");
    let r2 = Store::open(&path, Options::default().read_only(true)).expect("reader after");
    assert!(matches!(
        Store::open(&path, Options::default()),
        Err(Error::Locked { .. })
    ));
    w.put(b"k", b"v1").expect("put");
    assert_eq!(r1.get(b"k").expect("get").as_deref(), Some(&b"v1"[..]));
    assert_eq!(r2.get(b"k").expect("get").as_deref(), Some(&b"v1"[..]));
    assert!(matches!(r1.put(b"x", b"y"), Err(Error::ReadOnly)));
    w.put(b"k", b"v2").expect("put");
    assert!(w.delete(b"k").expect("delete"));
    assert_eq!(r2.get(b"k").expect("get"), None);
    drop(w);
    // No writer: readers keep the last state; a new writer can open.
    assert_eq!(r1.get(b"k").expect("get"), None);
    let w = Store::open(&path, Options::default()).expect("writer again");
    w.put(b"k", b"v3").expect("put");
    assert_eq!(r1.get(b"k").expect("get").as_deref(), Some(&b"v3"[..]));
}

/// `get_with` borrows the value from the mapping: while its closure runs, the bytes
/// never change, whatever the writer does meanwhile (overwrites, checkpoints, growth,
/// compaction, which replaces the file).
#[test]
fn get_with_never_sees_bytes_change_under_it() {
    let (_dir, path) = tmp();
    let w = Store::open(
        &path,
        Options::default()
            .checkpoint_keys(200)
            .initial_size(64 << 10),
    )
    .expect("writer");
    w.put(b"hot", value(0)).expect("put");
    let r = Store::open(&path, Options::default().read_only(true)).expect("reader");
    let stop = std::sync::atomic::AtomicBool::new(false);
    /// Stops the writer thread even if an assertion below fails (else the scope hangs).
    struct StopOnDrop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    std::thread::scope(|s| {
        s.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut i = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                w.put(b"hot", value(i)).expect("overwrite");
                w.put(key(i), value(i)).expect("put");
                if i % 700 == 0 {
                    w.compact().expect("compact");
                }
                i += 1;
            }
        });
        let _stop = StopOnDrop(&stop);
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut checks = 0;
        let mut seen = std::collections::BTreeSet::new();
        while Instant::now() < deadline {
            r.get_with(b"hot", |v| {
                let before = v.to_vec();
                std::thread::sleep(Duration::from_millis(1));
                assert_eq!(v, &before[..], "bytes changed under get_with");
                assert_eq!(before, value(number(&before)));
                seen.insert(number(&before));
            })
            .expect("get_with")
            .expect("hot exists");
            checks += 1;
        }
        assert!(checks > 20, "only {checks} reads ran");
        assert!(
            seen.len() > 5,
            "the reader saw only {} values of hot",
            seen.len()
        );
    });
}

/// A reader never writes: opening one on a file it cannot write works, and its files and
/// directory are left exactly as they were.
#[test]
fn a_reader_changes_nothing_on_disk() {
    let (dir, path) = tmp();
    let w = Store::open(&path, Options::default()).expect("writer");
    w.put(b"k", b"v").expect("put");
    // Leftovers a reader must not clean up: a compaction file of the running writer.
    let leftover = dir.path().join("store.mkv.compact-999999");
    std::fs::write(&leftover, b"not ours").expect("leftover");
    let before = std::fs::read(&path).expect("read");
    let r = Store::open(&path, Options::default().read_only(true)).expect("reader");
    assert_eq!(r.get(b"k").expect("get").as_deref(), Some(&b"v"[..]));
    drop(r);
    assert!(leftover.exists(), "a reader deleted a file");
    assert_eq!(
        std::fs::read(&path).expect("read"),
        before,
        "a reader changed the file"
    );
}

/// Applies a snapshot and then changes to a map, as a consumer of `follow` does.
fn replay_into(
    map: &mut std::collections::BTreeMap<Vec<u8>, Vec<u8>>,
    changes: Vec<mapkv::Change>,
) {
    for c in changes {
        match c {
            mapkv::Change::Put { key, value } => {
                map.insert(key, value);
            }
            mapkv::Change::Delete { key } => {
                map.remove(&key);
            }
        }
    }
}

fn contents(s: &Store) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
    s.iter().map(|r| r.expect("iter")).collect()
}

/// `follow` in the writer's own process: the snapshot, then exactly the writes made
/// after it (none missed, none repeated), across batches, deletes and compactions.
#[test]
fn follow_in_process_gives_the_snapshot_then_every_later_write_once() {
    let (_dir, path) = tmp();
    let w = Store::open(&path, Options::default().checkpoint_keys(100)).expect("writer");
    for i in 0..500u64 {
        w.put(key(i), value(i)).expect("put");
    }
    let (snapshot, mut follower) = w.follow().expect("follow");
    let mut state: std::collections::BTreeMap<_, _> =
        snapshot.map(|r| r.expect("snapshot")).collect();
    let mut expected = Vec::new();
    for i in 500..3_000u64 {
        if i % 7 == 0 {
            w.delete(key(i - 3)).expect("delete");
            expected.push(mapkv::Change::Delete { key: key(i - 3) });
        } else if i % 10 == 1 {
            let mut b = Batch::new();
            b.put(key(i), value(i)).delete(b"nothing");
            w.write(&b).expect("batch");
            expected.push(mapkv::Change::Put {
                key: key(i),
                value: value(i),
            });
            expected.push(mapkv::Change::Delete {
                key: b"nothing".to_vec(),
            });
        } else {
            w.put(key(i), value(i)).expect("put");
            expected.push(mapkv::Change::Put {
                key: key(i),
                value: value(i),
            });
        }
        if i % 900 == 0 {
            // Compaction moves the store to a new file while the follower lags.
            w.compact().expect("compact");
        }
        if i % 250 == 0 {
            let got = follower.poll().expect("poll");
            let n = got.len();
            assert_eq!(got[..], expected[..n], "changes in order, none missed");
            expected.drain(..n);
            replay_into(&mut state, got);
        }
    }
    let got = follower.poll().expect("poll");
    assert_eq!(got, expected, "the rest, exactly once");
    replay_into(&mut state, got);
    assert_eq!(state, contents(&w), "snapshot + changes == the store");
    assert!(follower.poll().expect("poll").is_empty());
}

/// `follow` in a reader process: what it reports, applied to its snapshot, is what the
/// writer (another process, compacting as it goes) left.
#[test]
fn follow_in_a_reader_process_reconstructs_the_writer_state() {
    let (_dir, path) = tmp();
    Store::open(&path, Options::default().initial_size(64 << 10))
        .expect("create")
        .close()
        .expect("close");
    let reader = Store::open(&path, Options::default().read_only(true)).expect("reader");
    let mut w = spawn_writer(&path, "none,0,400,0");
    w.wait_ready();
    for _ in 0..100 {
        w.next_ack();
    }
    let (snapshot, mut follower) = reader.follow().expect("follow");
    let mut state: std::collections::BTreeMap<_, _> =
        snapshot.map(|r| r.expect("snapshot")).collect();
    w.finish();
    let mut w = spawn_writer(&path, "always,400,2000,600");
    w.wait_ready();
    let mut polls = 0;
    while let Some(i) = w.next_ack() {
        if i % 97 == 0 {
            replay_into(&mut state, follower.poll().expect("poll"));
            polls += 1;
        }
    }
    w.finish();
    replay_into(&mut state, follower.poll().expect("poll"));
    assert!(polls > 5);
    let fresh = Store::open(&path, Options::default().read_only(true)).expect("fresh");
    assert_eq!(state, contents(&fresh), "snapshot + changes == the store");
}

/// A reader that did not call the store while the writer compacted twice never saw the
/// file in between (it is gone): its follower reports that with `Error::Lagged` rather
/// than silently skipping the writes made there, then goes on from the current file;
/// a new `follow` resynchronizes.
#[test]
fn a_follower_that_misses_a_whole_file_says_so() {
    let (_dir, path) = tmp();
    let w = Store::open(&path, Options::default()).expect("writer");
    for i in 0..3u64 {
        w.put(key(i), value(i)).expect("put");
    }
    let reader = Store::open(&path, Options::default().read_only(true)).expect("reader");
    let (snapshot, mut follower) = reader.follow().expect("follow");
    let mut state: std::collections::BTreeMap<_, _> =
        snapshot.map(|r| r.expect("snapshot")).collect();
    for i in 3..6u64 {
        w.put(key(i), value(i)).expect("put");
    }
    w.compact().expect("compact");
    // Made in the file the reader never opens, and a delete it could not infer.
    for i in 6..9u64 {
        w.put(key(i), value(i)).expect("put");
    }
    w.delete(key(0)).expect("delete");
    w.compact().expect("compact");
    for i in 9..12u64 {
        w.put(key(i), value(i)).expect("put");
    }
    let mut got = Vec::new();
    let lagged = loop {
        match follower.poll() {
            Ok(c) if c.is_empty() => break false,
            Ok(c) => got.extend(c),
            Err(mapkv::Error::Lagged { .. }) => break true,
            Err(e) => panic!("poll: {e}"),
        }
    };
    assert!(lagged, "the follower skipped a file silently: {got:?}");
    // The writes of the first file, all of them, before the error.
    let first: Vec<_> = (3..6u64)
        .map(|i| mapkv::Change::Put {
            key: key(i),
            value: value(i),
        })
        .collect();
    assert_eq!(got, first);
    replay_into(&mut state, got);
    // After it, the follower goes on in the current file.
    let after = follower.poll().expect("poll after the gap");
    assert_eq!(
        after,
        (9..12u64)
            .map(|i| mapkv::Change::Put {
                key: key(i),
                value: value(i),
            })
            .collect::<Vec<_>>()
    );
    w.put(key(12), value(12)).expect("put");
    assert_eq!(follower.poll().expect("poll").len(), 1);
    // A new snapshot resynchronizes.
    let (snapshot, _) = reader.follow().expect("follow again");
    let state: std::collections::BTreeMap<_, _> = snapshot.map(|r| r.expect("snapshot")).collect();
    assert_eq!(state, contents(&w));
    // One compaction between two polls is followed without a gap.
    let (_, mut follower) = reader.follow().expect("follow");
    w.put(key(13), value(13)).expect("put");
    w.compact().expect("compact");
    w.put(key(14), value(14)).expect("put");
    let got = follower.poll().expect("poll across one compaction");
    assert_eq!(got.len(), 2, "{got:?}");
}

/// Damage made by another program to what the writer committed: the reader's catch-up
/// reports it as an error (never a panic, never a silently shorter history); and a file
/// replaced by something that is not a store is a clear error when the reader follows
/// the switch to it.
#[test]
fn a_reader_reports_damage_and_foreign_files_as_errors() {
    use std::os::unix::fs::FileExt;
    let (dir, path) = tmp();
    let w = Store::open(&path, Options::default()).expect("writer");
    for i in 0..100u64 {
        w.put(key(i), value(i)).expect("put");
    }
    let r = Store::open(&path, Options::default().read_only(true)).expect("reader");
    assert!(r.get(key(5)).expect("get").is_some());
    let end = w.stats().log_end;
    for i in 100..200u64 {
        w.put(key(i), value(i)).expect("put");
    }
    // A second reader, caught up before the damage.
    let r2 = Store::open(&path, Options::default().read_only(true)).expect("reader 2");
    assert!(r2.get(key(150)).expect("get").is_some());
    // Garbage over records the first reader has not replayed yet.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open for damage");
    f.write_all_at(&[0xA5; 64], end + 300).expect("damage");
    match r.get(key(150)) {
        Err(Error::Corrupt { offset, .. }) => assert!(offset >= end, "{offset} < {end}"),
        other => panic!("damage below the committed end must be an error: {other:?}"),
    }
    assert!(
        matches!(r.get(key(150)), Err(Error::Corrupt { .. })),
        "and stays one"
    );
    // A reader opening now meets the damage below the committed end at open.
    match Store::open(&path, Options::default().read_only(true)) {
        Err(Error::Corrupt { .. }) => {}
        other => panic!("a new reader must not take the damage for a torn tail: {other:?}"),
    }

    // Another program renames a foreign file over the store and (as compaction would)
    // marks the old file replaced.
    let foreign = dir.path().join("foreign");
    std::fs::write(&foreign, b"not a store at all\n".repeat(500)).expect("foreign");
    std::fs::rename(&foreign, &path).expect("rename over the store");
    f.write_all_at(&2u64.to_le_bytes(), mapkv::format::LIVE_SWITCH_OFF)
        .expect("mark switched");
    match r2.get(key(5)) {
        Err(Error::NotAStore { .. }) => {}
        other => panic!("a foreign file at the path: {other:?}"),
    }
}

/// A compacting writer killed between marking its file "switch pending" and renaming the
/// new file over it (or right after the rename): no reader is stranded. With the old file
/// still at the path, readers keep using it (it is still the store); with a new file
/// there, they move to it at their next call.
#[test]
fn a_compaction_killed_around_its_rename_strands_no_reader() {
    use std::os::unix::fs::FileExt;
    let (dir, path) = tmp();
    let w = Store::open(&path, Options::default()).expect("writer");
    w.put(b"k", b"old file").expect("put");
    drop(w);
    let r = Store::open(&path, Options::default().read_only(true)).expect("reader");
    assert_eq!(r.get(b"k").expect("get").as_deref(), Some(&b"old file"[..]));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    // Killed after marking, before renaming (no writer holds the lock any more).
    f.write_all_at(&1u64.to_le_bytes(), mapkv::format::LIVE_SWITCH_OFF)
        .expect("mark pending");
    assert_eq!(
        r.get(b"k").expect("still the store").as_deref(),
        Some(&b"old file"[..])
    );
    assert_eq!(
        r.get(b"k").expect("still the store").as_deref(),
        Some(&b"old file"[..])
    );
    // Killed after renaming: the new file is at the path, the old one says pending. (A
    // reader that opened the old file before the rename, and has not looked since.)
    let r = Store::open(&path, Options::default().read_only(true)).expect("reader 2");
    let other = dir.path().join("new.mkv");
    let w = Store::open(&other, Options::default()).expect("new file");
    w.put(b"k", b"new file").expect("put");
    w.close().expect("close");
    std::fs::rename(&other, &path).expect("rename over");
    assert_eq!(
        r.get(b"k").expect("follows the rename").as_deref(),
        Some(&b"new file"[..])
    );
    // And it keeps following the writer of the new file.
    let w = Store::open(&path, Options::default()).expect("writer of the new file");
    w.put(b"k", b"newer").expect("put");
    assert_eq!(r.get(b"k").expect("get").as_deref(), Some(&b"newer"[..]));
}

/// Regression: a reader's counters drifted upward as it adopted checkpoints (records the
/// checkpoint already counted were counted again): `len()` said 260,000 where the store
/// held 200,000 keys.
#[test]
fn a_reader_counts_exactly_across_checkpoints() {
    let (_dir, path) = tmp();
    let w = Store::open(&path, Options::default().checkpoint_keys(700)).expect("writer");
    let r = Store::open(&path, Options::default().read_only(true)).expect("reader");
    for round in 0..6u64 {
        for i in 0..2_000u64 {
            w.put(key(i + round * 997), value(i)).expect("put");
            if i % 3 == 0 {
                w.delete(key(i + 1)).expect("delete");
            }
        }
        // Let the background checkpoints finish, so the reader adopts them.
        w.flush().expect("flush");
        let n = r.iter().count();
        assert_eq!(r.len(), n, "round {round}: reader len vs its own iteration");
        assert_eq!(n, w.len(), "round {round}: reader vs writer");
        let (rs, ws) = (r.stats(), w.stats());
        assert_eq!(rs.live_keys, ws.live_keys, "round {round}");
        assert_eq!(rs.live_bytes, ws.live_bytes, "round {round}");
    }
}

/// Regression: a reader's call caught up again and again while the writer kept
/// committing, and returned only once the writer paused. One pass up to the committed
/// end read at the start is all the guarantee needs.
#[test]
fn a_reader_call_returns_while_the_writer_keeps_writing() {
    let (_dir, path) = tmp();
    let w = Store::open(&path, Options::default()).expect("writer");
    w.put(b"start", b"1").expect("put");
    let r = Store::open(&path, Options::default().read_only(true)).expect("reader");
    let reader_done = std::sync::atomic::AtomicBool::new(false);
    let writer_ran_out = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            // Far more writes than a reader needs to catch up once.
            for i in 0..3_000_000u64 {
                if reader_done.load(std::sync::atomic::Ordering::Relaxed) {
                    return false;
                }
                w.put(key(i), value(i)).expect("put");
            }
            true
        });
        // Let the writer get ahead, then read 50 times while it writes.
        while w.stats().writes < 20_000 {
            std::thread::yield_now();
        }
        for _ in 0..50 {
            assert!(r.get(b"start").expect("get").is_some());
        }
        reader_done.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().expect("writer thread")
    });
    assert!(
        !writer_ran_out,
        "the reader's calls returned only after the writer stopped writing"
    );
}
