//! The read path's additions: the key filter (`Options::key_filter`, lookups of missing
//! keys answered from memory) and `Store::get_many`. What must hold for the filter: a key in the store is never reported missing, through in-place
//! checkpoints, index growth, compaction, deletes and a reader in another process (here:
//! a read-only handle, which is as separate as one); and a damaged bucket is still
//! reported, never summed up by the filter as "no such key".

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mapkv::format::{bucket_of, checkpoint_off, decode_checkpoint, decode_static, key_hash, PAGE};
use mapkv::{Durability, Error, Options, Store};

mod common;
use common::tmp;

/// Waits until `s` reports a built filter (`None` if none appears in time).
fn filter_built(s: &Store) -> Option<u64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let b = s.stats().key_filter_bytes;
        if b > 0 {
            return Some(b);
        }
        if Instant::now() > deadline {
            return None;
        }
        // A lookup is what starts a build.
        let _ = s.get(b"nudge");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn key(i: u64) -> String {
    format!("key-{i:08}")
}

/// Every key of `model` is found with its value, and keys never written are missing, in
/// both handles.
fn check(model: &BTreeMap<u64, Option<u64>>, handles: &[&Store], what: &str) {
    for s in handles {
        for (&i, v) in model {
            let got = s.get(key(i)).expect("get");
            let want = v.map(|v| format!("value-{v}").into_bytes());
            assert_eq!(got, want, "{what}: key {i}");
        }
        for i in 10_000_000..10_002_000u64 {
            assert_eq!(s.get(key(i)).expect("get"), None, "{what}: missing key {i}");
        }
    }
}

#[test]
fn no_key_is_ever_missed_through_checkpoints_growth_deletes_and_compaction() {
    let (_dir, path) = tmp();
    let w = Store::open(
        &path,
        Options::default()
            .durability(Durability::None)
            .checkpoint_keys(3_000)
            .auto_compact_off(),
    )
    .expect("open");
    let mut model = BTreeMap::new();
    for i in 0..20_000u64 {
        w.put(key(i), format!("value-{i}")).expect("put");
        model.insert(i, Some(i));
    }
    w.flush().expect("flush");
    let r = Store::open(&path, Options::default().read_only(true)).expect("reader");
    assert!(filter_built(&w).is_some(), "the writer built no filter");
    assert!(filter_built(&r).is_some(), "the reader built no filter");
    check(&model, &[&w, &r], "built");
    let (checkpoints, index) = (w.stats().checkpoints, w.stats().index_bytes);
    // New keys, overwrites and deletes: in-place checkpoints add keys to the buckets
    // the filter was built from.
    for round in 0..6u64 {
        for j in 0..8_000u64 {
            let i = 20_000 + round * 8_000 + j;
            w.put(key(i), format!("value-{i}")).expect("put");
            model.insert(i, Some(i));
            if j % 50 == 0 {
                // The reader follows closely, so it adopts most checkpoints with its
                // delta covering them (and keeps its filter, inserting their keys).
                let _ = r.get(key(i)).expect("reader get");
            }
            let old = (i * 7919) % 20_000;
            if j % 3 == 0 {
                w.delete(key(old)).expect("delete");
                model.insert(old, None);
            } else if j % 3 == 1 {
                w.put(key(old), format!("value-{i}")).expect("overwrite");
                model.insert(old, Some(i));
            }
        }
        check(&model, &[&w, &r], &format!("round {round}"));
    }
    let st = w.stats();
    assert!(st.checkpoints >= checkpoints + 4, "too few checkpoints ran");
    assert!(st.index_bytes > index, "the index never grew");
    // After growth, a new filter for the new region.
    assert!(filter_built(&w).is_some(), "no filter after growth");
    assert!(
        filter_built(&r).is_some(),
        "the reader has no filter after growth"
    );
    check(&model, &[&w, &r], "after growth");
    w.compact().expect("compact");
    for i in 90_000..93_000u64 {
        w.put(key(i), format!("value-{i}")).expect("put");
        model.insert(i, Some(i));
    }
    assert!(filter_built(&w).is_some(), "no filter after compaction");
    assert!(
        filter_built(&r).is_some(),
        "the reader has no filter after compaction"
    );
    check(&model, &[&w, &r], "after compaction");
    w.close().expect("close");
    let w = Store::open(&path, Options::default()).expect("reopen");
    check(&model, &[&w, &r], "after reopen");
}

/// A bucket whose checksum fails, in an index the filter is built for: the build gives
/// up, and lookups of keys that map to that bucket, present or missing, report the
/// damage instead of `None`.
#[test]
fn a_damaged_bucket_is_reported_not_filtered_away() {
    let (_dir, path) = tmp();
    let s = Store::open(&path, Options::default()).expect("open");
    for i in 0..20_000u64 {
        s.put(key(i), b"v").expect("put");
    }
    s.close().expect("close");
    let mut bytes = std::fs::read(&path).expect("read");
    let info = decode_static(&bytes).expect("static header");
    let ckpt = (0..2)
        .filter_map(|i| decode_checkpoint(info.seed, &bytes[checkpoint_off(i) as usize..]))
        .max_by_key(|c| c.seq)
        .expect("a checkpoint");
    assert!(
        ckpt.index_buckets >= 16,
        "the index must be large enough for a filter"
    );
    let bad = ckpt.index_buckets / 2;
    // A reserved header byte: only the checksum tells.
    bytes[(ckpt.index_off + bad * PAGE + 10) as usize] ^= 0x40;
    std::fs::write(&path, &bytes).expect("write");
    let in_bad = |prefix: &str| -> String {
        (0u64..)
            .map(|i| format!("{prefix}{i:08}"))
            .find(|k| bucket_of(key_hash(info.seed, k.as_bytes()), ckpt.index_buckets) == bad)
            .expect("a key in the bucket")
    };
    let (present, missing) = (
        (0..20_000u64)
            .map(key)
            .find(|k| bucket_of(key_hash(info.seed, k.as_bytes()), ckpt.index_buckets) == bad)
            .expect("a stored key in the bucket"),
        in_bad("absent-"),
    );
    for read_only in [false, true] {
        let s = Store::open(&path, Options::default().read_only(read_only)).expect("open");
        // Lookups elsewhere start the build, which reaches the damaged bucket.
        for i in 0..100u64 {
            let _ = s.get(format!("elsewhere-{i}"));
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            s.stats().key_filter_bytes,
            0,
            "a filter was built over a damaged bucket"
        );
        for k in [&present, &missing] {
            match s.get(k) {
                Err(Error::Corrupt { .. }) => {}
                other => panic!("{k} in the damaged bucket read as {other:?}"),
            }
        }
    }
}

/// With the filter off, nothing is built, and lookups answer the same.
#[test]
fn the_filter_can_be_turned_off() {
    let (_dir, path) = tmp();
    let s = Store::open(&path, Options::default().key_filter(false)).expect("open");
    for i in 0..20_000u64 {
        s.put(key(i), b"v").expect("put");
    }
    for i in 0..20_000u64 {
        assert!(s.contains_key(key(i)).expect("get"));
        assert!(!s.contains_key(key(i + 1_000_000)).expect("get"));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(s.stats().key_filter_bytes, 0);
}

/// `get_many` answers as `get` does, key by key, in order, for present, missing,
/// deleted and repeated keys, in a writer and in a reader, across batches larger than
/// one prefetch window; and fails as `get` does on a closed store.
#[test]
fn get_many_answers_as_get_does() {
    let (_dir, path) = tmp();
    let w = Store::open(&path, Options::default().checkpoint_keys(2_000)).expect("open");
    for i in 0..12_000u64 {
        w.put(key(i), format!("value-{i}")).expect("put");
    }
    for i in (0..12_000u64).step_by(7) {
        w.delete(key(i)).expect("delete");
    }
    let r = Store::open(&path, Options::default().read_only(true)).expect("reader");
    let keys: Vec<String> = (0..10_000u64)
        .map(|i| key((i * 7_919) % 15_000))
        .chain([key(3), key(3), String::new()])
        .collect();
    for s in [&w, &r] {
        let many = s.get_many(&keys).expect("get_many");
        assert_eq!(many.len(), keys.len());
        for (k, v) in keys.iter().zip(&many) {
            assert_eq!(v, &s.get(k).expect("get"), "{k}");
        }
        assert!(many.iter().any(Option::is_none) && many.iter().any(Option::is_some));
        assert_eq!(
            s.get_many::<&[u8]>(&[]).expect("empty batch"),
            Vec::<Option<Vec<u8>>>::new()
        );
    }
    w.close_shared().expect("close");
    assert!(matches!(w.get_many(&keys[..3]), Err(Error::Closed)));
}
