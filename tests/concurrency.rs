//! Sharing one store between threads: concurrent writers are serialized and lose nothing,
//! readers always see whole values, batches are atomic to iterators, and under
//! `Durability::Always` concurrent writers share syncs (group commit).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};

use mapkv::{Batch, Durability, Error, Options, Store};

mod common;
use common::tmp;

const fn assert_send_sync<T: Send + Sync>() {}
const _: () = assert_send_sync::<Store>();
const _: () = assert_send_sync::<Arc<Store>>();
const _: () = assert_send_sync::<Batch>();
const _: () = assert_send_sync::<Options>();
const _: () = assert_send_sync::<Error>();

fn key(writer: u64, i: u64) -> Vec<u8> {
    format!("w{writer}/k{i:06}").into_bytes()
}

/// A self-describing value: `writer`, `i`, `version`, then a fill derived from them.
fn value(writer: u64, i: u64, version: u64) -> Vec<u8> {
    let len = 24 + ((writer * 131 + i * 17 + version * 7) % 400) as usize;
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&writer.to_le_bytes());
    v.extend_from_slice(&i.to_le_bytes());
    v.extend_from_slice(&version.to_le_bytes());
    let seed = (writer << 40) ^ (i << 16) ^ version;
    v.extend((0..len - 24).map(|j| (seed.wrapping_mul(31).wrapping_add(j as u64 * 7) % 251) as u8));
    v
}

/// Decodes and checks a value made by [`value`]: (writer, i, version).
fn parse(v: &[u8]) -> (u64, u64, u64) {
    assert!(v.len() >= 24, "value too short: {} bytes", v.len());
    let word = |n: usize| u64::from_le_bytes(v[n * 8..n * 8 + 8].try_into().expect("8 bytes"));
    let (w, i, ver) = (word(0), word(1), word(2));
    assert_eq!(
        v,
        &value(w, i, ver)[..],
        "torn or wrong value for w{w} k{i} v{ver}"
    );
    (w, i, ver)
}

#[test]
fn store_is_shared_through_arc() {
    let (_dir, path) = tmp();
    let store = Arc::new(Store::open(&path, Options::default()).unwrap());
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let s = Arc::clone(&store);
            std::thread::spawn(move || {
                s.put(key(t, 0), value(t, 0, 0)).unwrap();
                s.get(key(t, 0)).unwrap()
            })
        })
        .collect();
    for (t, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), Some(value(t as u64, 0, 0)));
    }
    assert_eq!(store.len(), 4);
}

/// Four writers under `Always`, two readers. Every write is present afterwards, and the
/// writers shared syncs: fewer syncs than writes.
#[test]
fn group_commit_shares_syncs() {
    const WRITERS: u64 = 4;
    const M: u64 = 150;
    let (_dir, path) = tmp();
    let store =
        Arc::new(Store::open(&path, Options::default().durability(Durability::Always)).unwrap());
    // One write first, so the one-time "store is dirty" sync is not counted below.
    store.put(b"warm-up", b"").unwrap();
    let before = store.stats();
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Arc::new(Barrier::new(WRITERS as usize));
    // Writer w publishes in `progress[w]` how many of its puts returned.
    let progress: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, start, progress, done) = (
                Arc::clone(&store),
                Arc::clone(&start),
                Arc::clone(&progress),
                Arc::clone(&done),
            );
            std::thread::spawn(move || {
                start.wait();
                for i in 0..M {
                    if i % 10 == 9 {
                        let mut b = Batch::new();
                        b.put(key(w, i), value(w, i, 0))
                            .put(format!("batch-{w}"), i.to_le_bytes());
                        store.write(&b).unwrap();
                    } else {
                        store.put(key(w, i), value(w, i, 0)).unwrap();
                    }
                    // Under Always the write is durable now: nothing at risk from it.
                    progress[w as usize].store(i + 1, Ordering::Release);
                }
                done.fetch_add(1, Ordering::AcqRel);
            })
        })
        .collect();
    let readers: Vec<_> = (0..2u64)
        .map(|r| {
            let (store, progress, stop) =
                (Arc::clone(&store), Arc::clone(&progress), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut reads = 0u64;
                while !stop.load(Ordering::Acquire) {
                    n = n.wrapping_add(0x9E37_79B9 + r);
                    let w = n % WRITERS;
                    let written = progress[w as usize].load(Ordering::Acquire);
                    if written == 0 {
                        std::thread::yield_now();
                        continue;
                    }
                    let i = (n >> 8) % written;
                    let v = store
                        .get(key(w, i))
                        .unwrap()
                        .unwrap_or_else(|| panic!("w{w} k{i} missing"));
                    assert_eq!(parse(&v), (w, i, 0));
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for t in writers {
        t.join().expect("writer panicked");
    }
    assert_eq!(done.load(Ordering::Acquire), WRITERS);
    stop.store(true, Ordering::Release);
    for t in readers {
        t.join().expect("reader panicked");
    }
    let after = store.stats();
    let writes = after.writes - before.writes;
    let syncs = after.syncs - before.syncs;
    assert_eq!(
        writes,
        WRITERS * M,
        "every write counted once (a batch once)"
    );
    assert!(syncs >= 1, "Always must sync: {after:?}");
    assert!(
        syncs < writes,
        "group commit: {WRITERS} concurrent writers should share syncs, got {syncs} syncs for {writes} writes"
    );
    assert_eq!(
        (after.bytes_at_risk, after.writes_at_risk),
        (0, 0),
        "{after:?}"
    );
    let check = |s: &Store| {
        for w in 0..WRITERS {
            for i in 0..M {
                let v = s
                    .get(key(w, i))
                    .unwrap()
                    .unwrap_or_else(|| panic!("w{w} k{i} lost"));
                assert_eq!(parse(&v), (w, i, 0));
            }
            assert_eq!(
                s.get(format!("batch-{w}")).unwrap(),
                Some((M - 1).to_le_bytes().to_vec())
            );
        }
        assert_eq!(s.len() as u64, WRITERS * M + WRITERS + 1);
    };
    check(&store);
    drop(store);
    let s = Store::open(&path, Options::default()).unwrap();
    assert!(s.stats().recovery.was_clean);
    check(&s);
}

/// Writers on disjoint key ranges doing puts, overwrites, deletes and batches while
/// readers read and iterate; the final state is exactly the union of the writers' models.
#[test]
fn concurrent_mixed_writers_lose_nothing() {
    const WRITERS: u64 = 3;
    const OPS: u64 = 6000;
    for d in [
        Durability::None,
        Durability::Periodic(std::time::Duration::from_millis(2)),
    ] {
        let (_dir, path) = tmp();
        let store = Arc::new(
            Store::open(
                &path,
                Options::default().durability(d).initial_size(16 << 10),
            )
            .unwrap(),
        );
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
                    let mut x = w * 7919 + 1;
                    for n in 0..OPS {
                        x = x
                            .wrapping_mul(6_364_136_223_846_793_005)
                            .wrapping_add(1_442_695_040_888_963_407);
                        let i = (x >> 33) % 500;
                        match (x >> 20) % 10 {
                            0..=5 => {
                                let v = value(w, i, n);
                                store.put(key(w, i), &v).unwrap();
                                model.insert(key(w, i), v);
                            }
                            6 | 7 => {
                                let existed = store.delete(key(w, i)).unwrap();
                                assert_eq!(
                                    existed,
                                    model.remove(&key(w, i)).is_some(),
                                    "delete w{w} k{i}"
                                );
                            }
                            8 => {
                                let mut b = Batch::new();
                                for j in 0..5 {
                                    let k = key(w, (i + j * 37) % 500);
                                    if j % 2 == 0 {
                                        let v = value(w, (i + j * 37) % 500, n);
                                        b.put(&k, &v);
                                        model.insert(k, v);
                                    } else {
                                        b.delete(&k);
                                        model.remove(&k);
                                    }
                                }
                                store.write(&b).unwrap();
                            }
                            _ => {
                                // Read-your-writes.
                                assert_eq!(
                                    store.get(key(w, i)).unwrap().as_ref(),
                                    model.get(&key(w, i))
                                );
                                if n % 1000 == 0 {
                                    store.flush().unwrap();
                                }
                            }
                        }
                    }
                    model
                })
            })
            .collect();
        let readers: Vec<_> = (0..2u64)
            .map(|r| {
                let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut n = r;
                    while !stop.load(Ordering::Acquire) {
                        n += 1;
                        if n % 200 == 0 {
                            // A snapshot: each key once, every value whole and under its key.
                            let mut seen = std::collections::HashSet::new();
                            for item in store.iter() {
                                let (k, v) = item.unwrap();
                                let (w, i, _) = parse(&v);
                                assert_eq!(k, key(w, i));
                                assert!(seen.insert(k), "iter yielded a key twice");
                            }
                        } else {
                            let (w, i) = (n % WRITERS, (n * 13) % 500);
                            if let Some(v) = store.get(key(w, i)).unwrap() {
                                let (pw, pi, _) = parse(&v);
                                assert_eq!((pw, pi), (w, i));
                            }
                        }
                    }
                })
            })
            .collect();
        let mut model = BTreeMap::new();
        for t in writers {
            model.extend(t.join().expect("writer panicked"));
        }
        stop.store(true, Ordering::Release);
        for t in readers {
            t.join().expect("reader panicked");
        }
        let check = |s: &Store| {
            assert_eq!(s.len(), model.len(), "{d:?}");
            let got: BTreeMap<Vec<u8>, Vec<u8>> = s.iter().map(|r| r.unwrap()).collect();
            assert!(
                got == model,
                "{d:?}: store differs from the writers' models"
            );
        };
        check(&store);
        store.verify().unwrap();
        drop(store);
        let s = Store::open(&path, Options::default()).unwrap();
        check(&s);
    }
}

/// Batches that set ten keys to the same version: an iterator, being a snapshot, sees all
/// ten at one version; a key read twice never goes back in time.
#[test]
fn batches_are_atomic_to_iterators() {
    const KEYS: u64 = 10;
    const BATCHES: u64 = 3000;
    let (_dir, path) = tmp();
    let store =
        Arc::new(Store::open(&path, Options::default().durability(Durability::None)).unwrap());
    let mut b = Batch::new();
    for k in 0..KEYS {
        b.put(key(0, k), value(0, k, 0));
    }
    store.write(&b).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut last = 0;
                let mut snapshots = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let versions: Vec<u64> = store.iter().map(|r| parse(&r.unwrap().1).2).collect();
                    assert_eq!(versions.len() as u64, KEYS, "a batch's keys came and went");
                    assert!(
                        versions.iter().all(|&v| v == versions[0]),
                        "torn batch seen by iter: {versions:?}"
                    );
                    assert!(versions[0] >= last, "went back in time");
                    last = versions[0];
                    snapshots += 1;
                }
                snapshots
            })
        })
        .collect();
    for version in 1..=BATCHES {
        let mut b = Batch::new();
        // Delete then re-put: the intermediate state (key missing) must never show.
        for k in 0..KEYS {
            b.delete(key(0, k));
        }
        for k in 0..KEYS {
            b.put(key(0, k), value(0, k, version));
        }
        store.write(&b).unwrap();
    }
    stop.store(true, Ordering::Release);
    let snapshots: u64 = readers
        .into_iter()
        .map(|t| t.join().expect("reader panicked"))
        .sum();
    assert!(snapshots > 0);
    for k in 0..KEYS {
        assert_eq!(
            parse(&store.get(key(0, k)).unwrap().unwrap()),
            (0, k, BATCHES)
        );
    }
}

/// Compaction while writers write and readers read: nothing is lost or torn.
#[test]
fn compaction_during_concurrent_writes() {
    const WRITERS: u64 = 2;
    const OPS: u64 = 4000;
    let (_dir, path) = tmp();
    let store =
        Arc::new(Store::open(&path, Options::default().durability(Durability::None)).unwrap());
    if let Err(Error::Unsupported(_)) = store.compact() {
        return; // Nothing to test in a build without compaction.
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                for n in 0..OPS {
                    let i = n % 300;
                    store.put(key(w, i), value(w, i, n)).unwrap();
                    if n % 7 == 3 {
                        store.delete(key(w, (i * 3) % 300)).unwrap();
                    }
                }
                // The final state: all 300 keys at their last version.
                for i in 0..300 {
                    store.put(key(w, i), value(w, i, OPS + i)).unwrap();
                }
            })
        })
        .collect();
    let compactor = {
        let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Acquire) || n == 0 {
                store.compact().unwrap();
                n += 1;
                std::thread::yield_now();
            }
            n
        })
    };
    let reader = {
        let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Acquire) {
                n += 1;
                let (w, i) = (n % WRITERS, n % 300);
                if let Some(v) = store.get(key(w, i)).unwrap() {
                    let (pw, pi, _) = parse(&v);
                    assert_eq!((pw, pi), (w, i));
                }
                if n.is_multiple_of(500) {
                    for item in store.iter() {
                        let (k, v) = item.unwrap();
                        let (pw, pi, _) = parse(&v);
                        assert_eq!(k, key(pw, pi));
                    }
                }
            }
        })
    };
    for t in writers {
        t.join().expect("writer panicked");
    }
    stop.store(true, Ordering::Release);
    let compactions = compactor.join().expect("compactor panicked");
    reader.join().expect("reader panicked");
    assert!(compactions >= 1);
    let check = |s: &Store| {
        assert_eq!(s.len() as u64, WRITERS * 300);
        for w in 0..WRITERS {
            for i in 0..300 {
                let v = s
                    .get(key(w, i))
                    .unwrap()
                    .unwrap_or_else(|| panic!("w{w} k{i} lost"));
                assert_eq!(parse(&v), (w, i, OPS + i));
            }
        }
    };
    check(&store);
    store.verify().unwrap();
    drop(store);
    let s = Store::open(&path, Options::default()).unwrap();
    assert!(s.stats().recovery.was_clean);
    check(&s);
    s.verify().unwrap();
}

/// Many threads calling `flush` while others write, under every policy: no errors, and
/// after the last flush nothing is at risk.
#[test]
fn concurrent_flushes() {
    for d in [Durability::None, Durability::Async, Durability::Always] {
        let (_dir, path) = tmp();
        let store = Arc::new(Store::open(&path, Options::default().durability(d)).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let flushers: Vec<_> = (0..2)
            .map(|_| {
                let (store, stop) = (Arc::clone(&store), Arc::clone(&stop));
                std::thread::spawn(move || {
                    let mut n = 0u32;
                    while !stop.load(Ordering::Acquire) || n == 0 {
                        store.flush().unwrap();
                        n += 1;
                    }
                })
            })
            .collect();
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let store = Arc::clone(&store);
                std::thread::spawn(move || {
                    for i in 0..300 {
                        store.put(key(w, i), value(w, i, 1)).unwrap();
                    }
                })
            })
            .collect();
        for t in writers {
            t.join().expect("writer panicked");
        }
        stop.store(true, Ordering::Release);
        for t in flushers {
            t.join().expect("flusher panicked");
        }
        store.flush().unwrap();
        let st = store.stats();
        assert_eq!(
            (st.bytes_at_risk, st.writes_at_risk),
            (0, 0),
            "{d:?}: {st:?}"
        );
        assert_eq!(store.len(), 600);
    }
}

/// Pauses a compaction right after its rename (before the store switches to the new file)
/// until another thread has started a flush, so that flush's sync is still running on the
/// old file when the switch happens.
#[derive(Debug)]
struct PauseAfterRename {
    started: std::sync::Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl mapkv::SyncObserver for PauseAfterRename {
    fn synced(&self, _path: &std::path::Path, event: mapkv::SyncEvent) {
        if event != mapkv::SyncEvent::Renamed {
            return;
        }
        let rx = self.started.lock().expect("observer mutex").take();
        if let Some(rx) = rx {
            let _ = rx.recv();
            // Give the flush time to enter its sync of the old file.
            std::thread::sleep(std::time::Duration::from_millis(30));
        }
    }
}

/// A sync of the old file still running when compaction switches files must not make the
/// store believe that offsets of the *new* file up to the old log end are durable:
/// afterwards a new write must still be at risk until flushed, and `flush()` must sync it.
#[test]
fn sync_in_flight_during_compaction_does_not_hide_later_writes() {
    let (_dir, path) = tmp();
    let (tx, rx) = std::sync::mpsc::channel();
    let obs = Arc::new(PauseAfterRename {
        started: std::sync::Mutex::new(Some(rx)),
    });
    let store = Arc::new(
        Store::open(
            &path,
            Options::default()
                .durability(Durability::None)
                // The compaction under test is the explicit one: an automatic one
                // (its data is mostly dead) could sync the later write first.
                .auto_compact_off()
                .sync_observer(obs),
        )
        .unwrap(),
    );
    // Lots of dirty, mostly dead data: the old file's sync is long, the new file is small.
    let chunk = vec![0xA5u8; 64 << 10];
    for i in 0..3200u32 {
        store.put(format!("k{}", i % 10), &chunk).unwrap();
    }
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    {
        let store = Arc::clone(&store);
        std::thread::spawn(move || {
            tx.send(()).expect("compaction waits for this");
            let _ = done_tx.send(store.flush());
        });
    }
    // The flush must return (its data is durable in the compacted file); a generous
    // bound turns a livelock into a failure instead of a hung test.
    let flush_result = move || {
        let limit = std::time::Duration::from_secs(60);
        done_rx
            .recv_timeout(limit)
            .unwrap_or_else(|_| panic!("flush() did not return within {limit:?} (livelock?)"))
    };
    match store.compact() {
        Ok(()) => {}
        Err(Error::Unsupported(_)) => {
            flush_result().unwrap();
            return;
        }
        Err(e) => panic!("compact: {e}"),
    }
    flush_result().unwrap();
    assert_eq!(store.len(), 10);

    store.put(b"after", b"compaction").unwrap();
    let st = store.stats();
    store.flush().unwrap();
    let st2 = store.stats();
    assert!(
        st.bytes_at_risk > 0 && st2.syncs > st.syncs && st2.bytes_at_risk == 0,
        "after compaction, a new write under Durability::None must be at risk until \
         flushed, and flush() must sync it:\n before flush: {st:?}\n after flush: {st2:?}"
    );
}

/// `len()` called from other threads while the writer's checkpoints settle the counters
/// (450k+ writes trigger them mid-run) must neither double-count nor miss the old records
/// of overwritten keys: the final counters are exact.
#[test]
fn len_during_checkpoints_keeps_counters_exact() {
    let (_dir, path) = tmp();
    const KEYS: u64 = 460_000;
    let k = |i: u64| format!("k{i:08}").into_bytes();
    {
        let s = Store::open(&path, Options::default().durability(Durability::None)).unwrap();
        for i in 0..KEYS {
            s.put(k(i), b"first").unwrap();
        }
    }
    // Every key is in the index now. Overwrite them all twice while readers poll
    // len(): the writes cross at least one delta-size checkpoint.
    let s = Store::open(&path, Options::default().durability(Durability::None)).unwrap();
    let done = AtomicBool::new(false);
    let polls = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    let n = s.len() as u64;
                    assert!(n <= KEYS + 1, "len() {n} counts overwritten keys twice");
                    polls.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        for round in 0..2u64 {
            for i in 0..KEYS {
                s.put(k(i), format!("v{round}")).unwrap();
            }
        }
        s.put(b"extra", b"").unwrap();
        done.store(true, Ordering::Relaxed);
    });
    assert!(polls.load(Ordering::Relaxed) > 0);
    assert!(
        s.stats().checkpoints >= 1,
        "the test must cross a checkpoint"
    );
    assert_eq!(s.len() as u64, KEYS + 1);
    let st = s.stats();
    let live = KEYS * (16 + 9 + 2) + (16 + 5);
    assert_eq!((st.live_keys, st.live_bytes), (KEYS + 1, live), "{st:?}");
    s.verify().unwrap();
    drop(s);
    let s = Store::open(&path, Options::default()).unwrap();
    assert_eq!(s.len() as u64, KEYS + 1);
    assert_eq!(s.stats().live_bytes, live);
}

/// Regression (outside review): sync observer callbacks run with the store's locks held,
/// so a callback that wrote or flushed its own store hung. Such calls now return
/// `Error::Reentrant`; reads from the callback work.
#[test]
fn a_sync_observer_calling_back_into_its_store_gets_reentrant_not_a_hang() {
    use std::sync::{Mutex, OnceLock};

    #[derive(Default)]
    struct CallsBack {
        store: OnceLock<std::sync::Weak<Store>>,
        seen: Mutex<Vec<String>>,
    }
    impl mapkv::SyncObserver for CallsBack {
        fn synced(&self, _path: &std::path::Path, _event: mapkv::SyncEvent) {
            let Some(store) = self.store.get().and_then(std::sync::Weak::upgrade) else {
                return;
            };
            let mut seen = self.seen.lock().unwrap();
            seen.push(format!(
                "put: {:?}",
                store.put(b"from-callback", b"x").err()
            ));
            seen.push(format!("flush: {:?}", store.flush().err()));
            seen.push(format!("get: {:?}", store.get(b"k").map(|v| v.is_some())));
            seen.push(format!("stats keys: {}", store.stats().live_keys));
        }
    }

    let (_dir, path) = tmp();
    let obs = Arc::new(CallsBack::default());
    let store = Arc::new(
        Store::open(
            &path,
            Options::default()
                .durability(Durability::Always)
                .sync_observer(Arc::clone(&obs) as Arc<dyn mapkv::SyncObserver>),
        )
        .expect("open"),
    );
    obs.store.set(Arc::downgrade(&store)).expect("set once");
    let (tx, rx) = std::sync::mpsc::channel();
    let s = Arc::clone(&store);
    std::thread::spawn(move || {
        let r = s.put(b"k", b"v").and_then(|()| s.flush());
        let _ = tx.send(r);
    });
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("a callback calling back into the store deadlocked")
        .expect("put and flush");
    let seen = obs.seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "the observer saw the syncs");
    for line in &seen {
        assert!(
            !line.starts_with("put") && !line.starts_with("flush")
                || line.ends_with("Some(Reentrant)"),
            "{line}"
        );
    }
    assert!(seen.iter().any(|l| l == "get: Ok(true)"), "{seen:?}");
    assert_eq!(store.get(b"from-callback").expect("get"), None);
}

/// The nice values of this process's threads named `name` (field 19 of
/// `/proc/self/task/TID/stat`, counted after the parenthesised name). Other tests in
/// this binary run stores too, so there may be several.
fn nices_of_threads(name: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for t in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let Some(at) = stat.rfind(')') else { continue };
        // After the name: state is field 3, nice field 19, the 17th from here.
        if let Some(n) = stat[at + 2..]
            .split_whitespace()
            .nth(16)
            .and_then(|n| n.parse().ok())
        {
            out.push(n);
        }
    }
    out
}

fn this_thread_nice() -> i64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("own stat");
    let after = &stat[stat.rfind(')').expect("name") + 2..];
    after
        .split_whitespace()
        .nth(16)
        .and_then(|n| n.parse().ok())
        .expect("nice")
}

/// The nice values of this process's background threads, polled (for up to a second)
/// until one has `want`: the thread starts with the first write.
fn background_nices_until(want: i64) -> Vec<i64> {
    let mut seen = Vec::new();
    for _ in 0..200 {
        // Comm names are cut at 15 bytes.
        seen = nices_of_threads("mapkv-backgroun");
        if seen.contains(&want) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    seen
}

#[test]
fn the_stores_own_threads_run_at_the_lower_priority_options_ask_for() {
    let base = this_thread_nice();
    for steps in [0u8, 3, Options::DEFAULT_BACKGROUND_NICE] {
        let (_dir, path) = tmp();
        let s = Store::open(
            &path,
            Options::default()
                .durability(Durability::None)
                .background_nice(steps),
        )
        .unwrap();
        // The first write starts the background thread.
        s.put(b"k", b"v").unwrap();
        let want = (base + i64::from(steps)).min(19);
        let seen = background_nices_until(want);
        assert!(
            seen.contains(&want),
            "background_nice({steps}): wanted a background thread at nice {want}, saw {seen:?}"
        );
        s.close().unwrap();
    }
}

/// Regression: a thread of the store started from a thread at a lower priority (an
/// automatic compaction starting a checkpoint, or here an application thread that
/// lowered its own) ran another `background_nice` steps lower. The value is taken once,
/// from the thread that opened the store.
#[test]
#[allow(unsafe_code)]
fn the_stores_threads_nice_is_relative_to_the_opening_thread() {
    let base = this_thread_nice();
    let (_dir, path) = tmp();
    let s = Arc::new(
        Store::open(
            &path,
            Options::default()
                .durability(Durability::None)
                .background_nice(2),
        )
        .unwrap(),
    );
    let writer = Arc::clone(&s);
    std::thread::spawn(move || {
        // SAFETY: setpriority with who = 0 changes only this thread's nice value.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, (base + 5).min(19) as i32) };
        assert_eq!(rc, 0, "raising a thread's nice value needs no privilege");
        // The first write starts the store's background thread, from this thread.
        writer.put(b"k", b"v").unwrap();
    })
    .join()
    .unwrap();
    let want = (base + 2).min(19);
    let seen = background_nices_until(want);
    assert!(
        seen.contains(&want),
        "wanted a background thread at nice {want} (opening thread {base} + 2), saw {seen:?}"
    );
    s.close_shared().unwrap();
}

/// Calls `stats()` and `len()` of its store from inside every sync callback.
#[derive(Default)]
struct CountsInsideSyncs {
    store: std::sync::OnceLock<std::sync::Weak<Store>>,
    calls: AtomicU64,
}

impl mapkv::SyncObserver for CountsInsideSyncs {
    fn synced(&self, _path: &std::path::Path, _event: mapkv::SyncEvent) {
        if let Some(s) = self.store.get().and_then(std::sync::Weak::upgrade) {
            let _ = s.stats().live_keys;
            let _ = s.len();
            self.calls.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `stats()` and `len()` from inside a sync observer callback, while the close's own
/// checkpoint syncs on the same thread (it holds the counter lock): they return, not
/// deadlock (found by a review; it hung before).
#[test]
fn counters_from_a_sync_observer_during_the_close_checkpoint_return() {
    let (_dir, path) = tmp();
    let obs = Arc::new(CountsInsideSyncs::default());
    let store = Arc::new(
        Store::open(
            &path,
            Options::default()
                .durability(Durability::None)
                .sync_observer(Arc::clone(&obs) as Arc<dyn mapkv::SyncObserver>),
        )
        .expect("open"),
    );
    for i in 0..100u32 {
        store.put(i.to_le_bytes(), b"v").expect("put");
    }
    obs.store.set(Arc::downgrade(&store)).ok();
    let (tx, rx) = std::sync::mpsc::channel();
    let s = Arc::clone(&store);
    std::thread::spawn(move || {
        let _ = tx.send(s.close_shared());
    });
    // Not a timing assertion: a deadlock never returns.
    rx.recv_timeout(std::time::Duration::from_secs(60))
        .expect("close_shared deadlocked in the observer")
        .expect("close");
    assert!(obs.calls.load(Ordering::Relaxed) > 0);
    drop(store);
    let s = Store::open(&path, Options::default()).expect("reopen");
    assert_eq!(s.len(), 100);
}

/// A `Periodic` interval too long for the clock (`Instant` cannot add it) means no
/// periodic sync, not a panic in a writer's `put` (found by a review).
#[test]
fn a_huge_periodic_interval_is_no_panic() {
    let (_dir, path) = tmp();
    let store = Store::open(
        &path,
        Options::default().durability(Durability::Periodic(std::time::Duration::from_secs(
            1 << 62,
        ))),
    )
    .expect("open");
    let v = vec![1u8; 4_000];
    std::thread::sleep(std::time::Duration::from_millis(50));
    for i in 0..6_000u32 {
        store.put(i.to_le_bytes(), &v).expect("put");
    }
    store.close().expect("close");
}
