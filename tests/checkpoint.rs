//! Background checkpoints (`Options::checkpoint_keys`): the writer freezes the delta and
//! goes on while another thread writes the frozen delta into the index (in place, or into
//! a new region when the index grows). These tests run checkpoints every few dozen writes
//! and check that nothing a reader can observe changes because of them: lookups, `len`,
//! iteration, `verify`, and the state after reopening.
// Random choices come from `mapkv::sim::Rng`.
#![cfg(feature = "sim")]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mapkv::sim::Rng;
use mapkv::{Batch, Durability, Options, Store};

fn key(i: u64) -> Vec<u8> {
    format!("key-{i:06}").into_bytes()
}

fn value(i: u64, version: u64) -> Vec<u8> {
    let mut v = format!("value-{i}-{version}-").into_bytes();
    v.resize(20 + (i as usize * 7 + version as usize) % 90, b'x');
    v
}

fn compare(store: &Store, model: &BTreeMap<Vec<u8>, Vec<u8>>, what: &str) {
    assert_eq!(store.len(), model.len(), "{what}: len");
    let mut all: Vec<(Vec<u8>, Vec<u8>)> = store
        .iter()
        .collect::<mapkv::Result<_>>()
        .unwrap_or_else(|e| panic!("{what}: iter: {e}"));
    all.sort();
    let want: Vec<(Vec<u8>, Vec<u8>)> = model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    assert_eq!(all.len(), want.len(), "{what}: iterated pairs");
    assert!(all == want, "{what}: iteration differs from the model");
    let st = store.stats();
    let live: u64 = model.iter().map(|(k, v)| (k.len() + v.len()) as u64).sum();
    assert!(
        st.live_bytes >= live,
        "{what}: live_bytes {} below the payload {live}",
        st.live_bytes
    );
}

/// Random puts, overwrites, deletes and batches under every policy, with a checkpoint
/// every 50 changed keys: every read agrees with a model at every step, and the counters
/// are exact whenever asked, while checkpoints (and index growth) run behind the writer.
#[test]
fn reads_counters_and_iteration_stay_exact_across_background_checkpoints() {
    for (n, durability) in [
        Durability::None,
        Durability::Async,
        Durability::Periodic(Duration::from_millis(2)),
        Durability::Always,
    ]
    .into_iter()
    .enumerate()
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ckpt.mkv");
        let opts = Options::default()
            .durability(durability)
            .initial_size(16 << 10)
            .checkpoint_keys(50);
        let what = format!("{durability:?}");
        let store = Store::open(&path, opts.clone()).expect("open");
        let mut model = BTreeMap::new();
        let mut rng = Rng::new(0xc4ec + n as u64);
        let ops = if matches!(durability, Durability::Always) {
            1500
        } else {
            6000
        };
        for op in 0..ops {
            let i = rng.below(1500);
            match rng.below(10) {
                0 => {
                    let existed = store.delete(key(i)).expect("delete");
                    assert_eq!(existed, model.remove(&key(i)).is_some(), "{what}: delete");
                }
                1 => {
                    let mut b = Batch::new();
                    for j in 0..3 {
                        let k = (i + j * 17) % 1500;
                        b.put(key(k), value(k, op));
                        model.insert(key(k), value(k, op));
                    }
                    store.write(&b).expect("batch");
                }
                _ => {
                    store.put(key(i), value(i, op)).expect("put");
                    model.insert(key(i), value(i, op));
                }
            }
            let probe = rng.below(1500);
            assert_eq!(
                store.get(key(probe)).expect("get"),
                model.get(&key(probe)).cloned(),
                "{what}: get of key {probe} after op {op}"
            );
            if op.is_multiple_of(97) {
                assert_eq!(store.len(), model.len(), "{what}: len after op {op}");
            }
            if op % 1000 == 999 {
                compare(&store, &model, &format!("{what} after op {op}"));
            }
        }
        let checkpoints = store.stats().checkpoints;
        assert!(
            checkpoints >= 10,
            "{what}: only {checkpoints} checkpoints ran"
        );
        store.verify().expect("verify before close");
        compare(&store, &model, &format!("{what} before close"));
        store.close().expect("close");
        let store = Store::open(&path, opts).expect("reopen");
        compare(&store, &model, &format!("{what} after reopen"));
        store.verify().expect("verify after reopen");
    }
}

/// Readers on other threads never miss a key, never see an older value than one already
/// acknowledged, and see `len` between the counts acknowledged before and after the call,
/// while the writer checkpoints every 64 keys (the switch from frozen delta to index must
/// be atomic for readers).
#[test]
fn readers_see_every_acknowledged_write_during_background_checkpoints() {
    const N: u64 = 20_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(
        Store::open(
            dir.path().join("readers.mkv"),
            Options::default()
                .durability(Durability::None)
                .initial_size(16 << 10)
                .checkpoint_keys(64),
        )
        .expect("open"),
    );
    // Keys below `first` have version 1 or 2; below `second`, version 2.
    let first = Arc::new(AtomicU64::new(0));
    let second = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let checked = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = (0..2u64)
        .map(|r| {
            let (store, first, second, done, checked) = (
                Arc::clone(&store),
                Arc::clone(&first),
                Arc::clone(&second),
                Arc::clone(&done),
                Arc::clone(&checked),
            );
            std::thread::spawn(move || {
                let mut rng = Rng::new(r);
                let mut checks = 0u64;
                while !done.load(Ordering::Acquire) {
                    let (f, s) = (
                        first.load(Ordering::Acquire),
                        second.load(Ordering::Acquire),
                    );
                    if f == 0 {
                        std::thread::yield_now();
                        continue;
                    }
                    let i = rng.below(f);
                    let got = store.get(key(i)).expect("get");
                    let want_new = i < s;
                    match got {
                        Some(v) if v == value(i, 2) => {}
                        Some(v) if v == value(i, 1) && !want_new => {}
                        other => panic!(
                            "key {i} (acknowledged: first pass {f}, second {s}): got {:?}",
                            other.map(|v| String::from_utf8_lossy(&v).into_owned())
                        ),
                    }
                    if checks.is_multiple_of(512) {
                        let before = first.load(Ordering::Acquire);
                        let len = store.len() as u64;
                        let after = first.load(Ordering::Acquire);
                        assert!(
                            (before..=after.max(before) + 1).contains(&len) || len == N,
                            "len {len} outside [{before}, {after}]"
                        );
                    }
                    checks += 1;
                    checked.fetch_add(1, Ordering::Relaxed);
                }
                checks
            })
        })
        .collect();
    for i in 0..N {
        store.put(key(i), value(i, 1)).expect("put");
        first.store(i + 1, Ordering::Release);
    }
    for i in 0..N {
        store.put(key(i), value(i, 2)).expect("put");
        second.store(i + 1, Ordering::Release);
    }
    // On a loaded machine the readers may have had little time so far: let them run a
    // while (the last writes' checkpoint may still be switching) before stopping them.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while checked.load(Ordering::Relaxed) < 1000 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    done.store(true, Ordering::Release);
    for r in readers {
        let checks = r.join().expect("reader");
        assert!(checks > 0, "a reader never ran");
    }
    assert_eq!(store.len() as u64, N);
    // A checkpoint is due every 64 keys; while one runs the delta may grow to 4x that
    // before the writer waits (the store's checkpoint lag).
    assert!(store.stats().checkpoints >= 2 * N / (64 * 4));
    store.verify().expect("verify");
}
