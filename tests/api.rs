//! Public-API behaviour of a single store used from one thread: puts, gets, deletes,
//! batches, iteration, reopen under every durability policy, read-only handles, stats and
//! compaction.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use mapkv::{Batch, Durability, Error, Options, Store};

mod common;
use common::tmp;

/// Puts `k` = `v` into both the store and the model of what it should hold.
fn put_both(s: &Store, model: &mut BTreeMap<Vec<u8>, Vec<u8>>, k: Vec<u8>, v: Vec<u8>) {
    s.put(&k, &v).unwrap();
    model.insert(k, v);
}

fn open(path: &Path, opts: Options) -> Store {
    Store::open(path, opts).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Every live pair of `store`, checking that no key comes twice.
fn contents(store: &Store) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    for item in store.iter() {
        let (k, v) = item.expect("iteration must not fail on a healthy store");
        if let Some(prev) = out.insert(k.clone(), v) {
            panic!("iter yielded key {k:?} twice (earlier value {prev:?})");
        }
    }
    out
}

/// Checks that `store` holds exactly `model`: through `len`, `is_empty`, `iter`, `get`,
/// `get_with` and `contains_key`.
fn assert_matches(store: &Store, model: &BTreeMap<Vec<u8>, Vec<u8>>) {
    assert_eq!(store.len(), model.len(), "len()");
    assert_eq!(store.is_empty(), model.is_empty(), "is_empty()");
    assert_eq!(
        store.stats().live_keys,
        model.len() as u64,
        "stats().live_keys"
    );
    assert_eq!(&contents(store), model, "iter() contents");
    for (k, v) in model {
        assert_eq!(store.get(k).unwrap().as_ref(), Some(v), "get({k:?})");
        assert_eq!(store.get_with(k, <[u8]>::len).unwrap(), Some(v.len()));
        assert!(store.contains_key(k).unwrap(), "contains_key({k:?})");
    }
}

fn all_policies() -> [Durability; 4] {
    [
        Durability::None,
        Durability::Async,
        Durability::Periodic(Duration::from_millis(5)),
        Durability::Always,
    ]
}

#[test]
fn new_store_is_empty() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default());
    assert!(path.exists(), "open must create the file");
    assert_eq!(s.len(), 0);
    assert!(s.is_empty());
    assert_eq!(s.iter().count(), 0);
    assert_eq!(s.get(b"anything").unwrap(), None);
    assert_eq!(s.get_with(b"anything", <[u8]>::len).unwrap(), None);
    assert!(!s.contains_key(b"anything").unwrap());
    assert!(!s.contains_key(b"").unwrap());
    assert_eq!(s.path(), path.as_path());
    let st = s.stats();
    assert_eq!(st.live_keys, 0);
    assert_eq!(st.live_bytes, 0);
    assert!(st.file_size >= st.log_end);
}

#[test]
fn put_get_overwrite() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default());
    s.put(b"alpha", b"1").unwrap();
    s.put(b"beta", b"22").unwrap();
    assert_eq!(s.get(b"alpha").unwrap(), Some(b"1".to_vec()));
    assert_eq!(s.get(b"beta").unwrap(), Some(b"22".to_vec()));
    assert_eq!(s.get(b"gamma").unwrap(), None);
    // Keys are exact byte strings: no prefix matching.
    assert_eq!(s.get(b"alph").unwrap(), None);
    assert_eq!(s.get(b"alphaa").unwrap(), None);
    assert_eq!(s.len(), 2);

    s.put(b"alpha", b"a much longer replacement value").unwrap();
    assert_eq!(
        s.get(b"alpha").unwrap(),
        Some(b"a much longer replacement value".to_vec())
    );
    s.put(b"alpha", b"x").unwrap();
    assert_eq!(s.get(b"alpha").unwrap(), Some(b"x".to_vec()));
    assert_eq!(s.len(), 2, "overwrites do not add keys");

    // Accepts anything AsRef<[u8]>.
    s.put(String::from("owned"), vec![1u8, 2, 3]).unwrap();
    s.put("str", [9u8; 4]).unwrap();
    assert_eq!(s.get("owned").unwrap(), Some(vec![1, 2, 3]));
    assert_eq!(s.get(String::from("str")).unwrap(), Some(vec![9; 4]));
    // Binary keys and values, including NUL and 0xFF bytes.
    let key = [0u8, 255, 0, 1];
    let val: Vec<u8> = (0..=255u8).collect();
    s.put(key, &val).unwrap();
    assert_eq!(s.get(key).unwrap(), Some(val.clone()));

    let model: BTreeMap<Vec<u8>, Vec<u8>> = [
        (b"alpha".to_vec(), b"x".to_vec()),
        (b"beta".to_vec(), b"22".to_vec()),
        (b"owned".to_vec(), vec![1, 2, 3]),
        (b"str".to_vec(), vec![9; 4]),
        (key.to_vec(), val),
    ]
    .into_iter()
    .collect();
    assert_matches(&s, &model);
    drop(s);
    let s = open(&path, Options::default());
    assert_matches(&s, &model);
}

#[test]
fn empty_key_is_a_key() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default());
    assert!(!s.contains_key(b"").unwrap());
    s.put(b"", b"value of the empty key").unwrap();
    s.put(b"other", b"o").unwrap();
    assert_eq!(
        s.get(b"").unwrap(),
        Some(b"value of the empty key".to_vec())
    );
    assert!(s.contains_key(b"").unwrap());
    assert_eq!(s.len(), 2);
    let c = contents(&s);
    assert_eq!(c.get(&b""[..]), Some(&b"value of the empty key".to_vec()));

    // Empty key with an empty value.
    s.put(b"", b"").unwrap();
    assert_eq!(s.get(b"").unwrap(), Some(vec![]));
    drop(s);

    let s = open(&path, Options::default());
    assert_eq!(s.get(b"").unwrap(), Some(vec![]));
    assert!(
        s.delete(b"").unwrap(),
        "deleting the present empty key returns true"
    );
    assert!(!s.delete(b"").unwrap(), "second delete returns false");
    assert_eq!(s.get(b"").unwrap(), None);
    assert_eq!(s.get(b"other").unwrap(), Some(b"o".to_vec()));
    assert_eq!(s.len(), 1);
    drop(s);
    let s = open(&path, Options::default());
    assert_eq!(s.get(b"").unwrap(), None);
    assert_eq!(s.len(), 1);
}

#[test]
fn empty_value_is_not_a_delete() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default());
    s.put(b"k", b"something").unwrap();
    s.put(b"k", b"").unwrap();
    assert_eq!(
        s.get(b"k").unwrap(),
        Some(vec![]),
        "an empty value is a value"
    );
    assert!(s.contains_key(b"k").unwrap());
    assert_eq!(s.get_with(b"k", <[u8]>::len).unwrap(), Some(0));
    assert_eq!(s.len(), 1);
    assert!(!s.is_empty());
    assert_eq!(
        contents(&s),
        [(b"k".to_vec(), vec![])].into_iter().collect()
    );
    // A fresh key with an empty value.
    s.put(b"fresh", b"").unwrap();
    assert_eq!(s.get(b"fresh").unwrap(), Some(vec![]));
    assert_eq!(s.len(), 2);

    let mut b = Batch::new();
    b.put(b"batched", b"");
    s.write(&b).unwrap();
    assert_eq!(s.get(b"batched").unwrap(), Some(vec![]));
    drop(s);

    let s = open(&path, Options::default());
    assert_eq!(s.get(b"k").unwrap(), Some(vec![]));
    assert_eq!(s.get(b"fresh").unwrap(), Some(vec![]));
    assert_eq!(s.get(b"batched").unwrap(), Some(vec![]));
    assert_eq!(s.len(), 3);
    assert!(
        s.delete(b"k").unwrap(),
        "a key with an empty value exists, so delete is true"
    );
    assert_eq!(s.get(b"k").unwrap(), None);
    assert_eq!(s.len(), 2);
}

#[test]
fn delete_semantics() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default());
    s.put(b"a", b"1").unwrap();
    s.put(b"b", b"2").unwrap();

    // Deleting a key that never existed changes nothing at all.
    let before = s.stats();
    assert!(!s.delete(b"missing").unwrap());
    let after = s.stats();
    assert_eq!(
        after.log_bytes, before.log_bytes,
        "delete of a missing key must not log"
    );
    assert_eq!(after.log_end, before.log_end);
    assert_eq!(after.live_keys, before.live_keys);
    assert_eq!(after.live_bytes, before.live_bytes);
    assert_eq!(s.len(), 2);

    assert!(s.delete(b"a").unwrap());
    assert_eq!(s.get(b"a").unwrap(), None);
    assert!(!s.contains_key(b"a").unwrap());
    assert_eq!(s.len(), 1);

    // Deleting an already deleted key is like deleting a missing one.
    let before = s.stats();
    assert!(!s.delete(b"a").unwrap());
    assert_eq!(s.stats().log_bytes, before.log_bytes);
    assert_eq!(s.stats().log_end, before.log_end);

    // Re-create after delete.
    s.put(b"a", b"again").unwrap();
    assert_eq!(s.get(b"a").unwrap(), Some(b"again".to_vec()));
    assert!(s.delete(b"b").unwrap());
    drop(s);

    let s = open(&path, Options::default());
    assert_eq!(s.get(b"a").unwrap(), Some(b"again".to_vec()));
    assert_eq!(
        s.get(b"b").unwrap(),
        None,
        "a deleted key must not come back after reopen"
    );
    assert_eq!(s.len(), 1);
    let before = s.stats();
    assert!(!s.delete(b"b").unwrap());
    assert_eq!(s.stats().log_bytes, before.log_bytes);
    drop(s);
    // The no-op delete did not make the close unclean or add a write.
    let s = open(&path, Options::default());
    assert!(s.stats().recovery.was_clean);
    assert_eq!(s.stats().recovery.replayed_writes, 0);
    assert_eq!(
        contents(&s),
        [(b"a".to_vec(), b"again".to_vec())].into_iter().collect()
    );
}

#[test]
fn get_with_borrows_the_value() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default());
    let value: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
    s.put(b"k", &value).unwrap();

    let mut calls = 0;
    let sum = s
        .get_with(b"k", |v| {
            calls += 1;
            assert_eq!(v, &value[..]);
            v.iter().map(|&b| u64::from(b)).sum::<u64>()
        })
        .unwrap();
    assert_eq!(calls, 1, "the closure runs exactly once for a present key");
    assert_eq!(sum, Some(value.iter().map(|&b| u64::from(b)).sum()));

    // The closure's result type is free.
    let first: Option<Option<u8>> = s.get_with(b"k", |v| v.first().copied()).unwrap();
    assert_eq!(first, Some(Some(0)));
    let owned: Option<String> = s.get_with(b"k", |v| format!("{} bytes", v.len())).unwrap();
    assert_eq!(owned.as_deref(), Some("10000 bytes"));

    // Not called for a missing or deleted key.
    let mut called = false;
    assert_eq!(s.get_with(b"nope", |_| called = true).unwrap(), None);
    assert!(!called);
    s.delete(b"k").unwrap();
    assert_eq!(s.get_with(b"k", |_| called = true).unwrap(), None);
    assert!(
        !called,
        "get_with must not call the closure for a deleted key"
    );
}

#[test]
fn iter_yields_every_live_pair_once() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default().initial_size(16 << 10));
    let mut model = BTreeMap::new();
    for i in 0..3000u32 {
        let k = format!("key-{i}").into_bytes();
        let v = format!("v{i}-{}", "x".repeat((i % 37) as usize)).into_bytes();
        put_both(&s, &mut model, k, v);
    }
    // Overwrite every third key, delete every fifth.
    for i in (0..3000u32).step_by(3) {
        let k = format!("key-{i}").into_bytes();
        let v = format!("over{i}").into_bytes();
        put_both(&s, &mut model, k, v);
    }
    for i in (0..3000u32).step_by(5) {
        let k = format!("key-{i}").into_bytes();
        assert_eq!(s.delete(&k).unwrap(), model.remove(&k).is_some());
    }
    assert_matches(&s, &model);
    let hint = s.iter().size_hint();
    assert!(
        hint.0 <= model.len() && hint.1.is_none_or(|h| h >= model.len()),
        "{hint:?}"
    );

    drop(s);
    let s = open(&path, Options::default());
    assert_matches(&s, &model);
    // More changes on top of the reopened (checkpointed) state.
    for i in (1..3000u32).step_by(7) {
        let k = format!("key-{i}").into_bytes();
        assert_eq!(s.delete(&k).unwrap(), model.remove(&k).is_some());
    }
    for i in 3000..3500u32 {
        let k = format!("key-{i}").into_bytes();
        s.put(&k, b"new").unwrap();
        model.insert(k, b"new".to_vec());
    }
    assert_matches(&s, &model);
}

#[test]
fn iter_is_a_snapshot() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default());
    for i in 0..100u32 {
        s.put(i.to_le_bytes(), format!("v{i}")).unwrap();
    }
    let snapshot = contents(&s);
    let it = s.iter();
    // Change the store while the iterator is alive.
    for i in 0..50u32 {
        s.put(i.to_le_bytes(), b"changed").unwrap();
    }
    for i in 50..70u32 {
        assert!(s.delete(i.to_le_bytes()).unwrap());
    }
    for i in 100..150u32 {
        s.put(i.to_le_bytes(), b"new").unwrap();
    }
    let mut seen = BTreeMap::new();
    for item in it {
        let (k, v) = item.unwrap();
        assert!(seen.insert(k, v).is_none(), "duplicate key from iter");
    }
    assert_eq!(
        seen, snapshot,
        "an iterator shows the store as of its creation"
    );
    assert_eq!(s.len(), 130);
}

#[test]
fn iter_across_many_index_growths() {
    let (_dir, path) = tmp();
    let mut model = BTreeMap::new();
    let mut next = 0u32;
    let mut index_sizes = Vec::new();
    // Each round doubles the key count and reopens: the index must grow again and again.
    for round in 0..9u32 {
        let s = open(
            &path,
            Options::default()
                .initial_size(16 << 10)
                .durability(Durability::None),
        );
        assert_matches(&s, &model);
        index_sizes.push(s.stats().index_bytes);
        let target = 150u32 << round;
        while next < target {
            let k = format!("growth-{next}").into_bytes();
            let v = next.to_le_bytes().repeat(1 + (next % 5) as usize);
            put_both(&s, &mut model, k, v);
            next += 1;
        }
        // Some churn so the index also holds overwritten and deleted keys.
        for i in (0..next).step_by(11) {
            let k = format!("growth-{i}").into_bytes();
            if round % 2 == 0 {
                s.delete(&k).unwrap();
                model.remove(&k);
            } else {
                s.put(&k, b"churn").unwrap();
                model.insert(k, b"churn".to_vec());
            }
        }
        assert_matches(&s, &model);
        s.close().unwrap();
    }
    let s = open(&path, Options::default());
    assert!(s.stats().recovery.was_clean);
    assert_matches(&s, &model);
    s.verify().unwrap();
    index_sizes.push(s.stats().index_bytes);
    let growths = index_sizes.windows(2).filter(|w| w[1] > w[0]).count();
    assert!(
        growths >= 4,
        "the index should have grown several times: {index_sizes:?}"
    );
}

#[test]
fn reopen_keeps_everything_under_every_policy() {
    for d in all_policies() {
        let (_dir, path) = tmp();
        let mut model = BTreeMap::new();
        {
            let s = open(
                &path,
                Options::default().durability(d).initial_size(16 << 10),
            );
            for i in 0..300u32 {
                let k = format!("{d:?}-{i}").into_bytes();
                let v = vec![(i % 256) as u8; (i as usize * 7) % 900];
                put_both(&s, &mut model, k, v);
            }
            for i in (0..300u32).step_by(4) {
                let k = format!("{d:?}-{i}").into_bytes();
                assert!(s.delete(&k).unwrap());
                model.remove(&k);
            }
            let mut b = Batch::new();
            for i in 300..340u32 {
                let k = format!("{d:?}-{i}").into_bytes();
                b.put(&k, b"batch");
                model.insert(k, b"batch".to_vec());
            }
            b.delete(format!("{d:?}-1"));
            model.remove(format!("{d:?}-1").as_bytes());
            s.write(&b).unwrap();
            s.put(b"", b"").unwrap();
            model.insert(vec![], vec![]);
            assert_matches(&s, &model);
            assert_eq!(s.stats().durability, d);
        }
        // Reopen with the same policy, then with the default one.
        for opts in [Options::default().durability(d), Options::default()] {
            let s = open(&path, opts);
            let st = s.stats();
            assert!(
                st.recovery.was_clean,
                "{d:?}: a dropped store is closed cleanly: {st:?}"
            );
            assert_eq!(st.recovery.replayed_writes, 0, "{d:?}: {st:?}");
            assert!(!st.recovery.rebuilt_index, "{d:?}: {st:?}");
            assert_eq!(st.recovery.truncated_at, None, "{d:?}: {st:?}");
            assert_matches(&s, &model);
            s.verify().unwrap();
        }
    }
}

#[test]
fn explicit_close_is_clean() {
    for d in all_policies() {
        let (_dir, path) = tmp();
        let s = open(&path, Options::default().durability(d));
        s.put(b"k", b"v").unwrap();
        s.flush().unwrap();
        s.put(b"k2", b"v2").unwrap();
        s.close().unwrap();
        let s = open(&path, Options::default().durability(d));
        assert!(s.stats().recovery.was_clean, "{d:?}");
        assert_eq!(s.stats().recovery.replayed_writes, 0, "{d:?}");
        assert_eq!(s.get(b"k").unwrap(), Some(b"v".to_vec()));
        assert_eq!(s.get(b"k2").unwrap(), Some(b"v2".to_vec()));
        // Open and close without writing: still clean, still everything.
        s.close().unwrap();
        let s = open(&path, Options::default());
        assert!(s.stats().recovery.was_clean);
        assert_eq!(s.len(), 2);
    }
}

#[test]
fn large_store_reopens_clean() {
    let (_dir, path) = tmp();
    const N: u32 = 120_000;
    let key = |i: u32| format!("large-store-key-{i:08}");
    let val = |i: u32| format!("value-{i}-{}", i.wrapping_mul(2_654_435_761));
    {
        let s = open(&path, Options::default().durability(Durability::None));
        for i in 0..N {
            s.put(key(i), val(i)).unwrap();
        }
        for i in (0..N).step_by(10) {
            assert!(s.delete(key(i)).unwrap());
        }
        assert_eq!(s.len(), (N - N / 10) as usize);
    }
    let s = open(&path, Options::default());
    let st = s.stats();
    assert!(st.recovery.was_clean, "{st:?}");
    assert_eq!(st.recovery.replayed_writes, 0, "{st:?}");
    assert!(!st.recovery.rebuilt_index, "{st:?}");
    assert_eq!(s.len(), (N - N / 10) as usize);
    for i in 0..N {
        let want = (i % 10 != 0).then(|| val(i).into_bytes());
        assert_eq!(s.get(key(i)).unwrap(), want, "key {i}");
    }
    let mut n = 0;
    for item in s.iter() {
        let (k, v) = item.unwrap();
        let i: u32 = std::str::from_utf8(&k[16..]).unwrap().parse().unwrap();
        assert_eq!(v, val(i).into_bytes());
        n += 1;
    }
    assert_eq!(n, s.len());
    s.verify().unwrap();
    drop(s);
    // Also through a read-only handle.
    let s = open(&path, Options::default().read_only(true));
    assert_eq!(s.len(), (N - N / 10) as usize);
    assert_eq!(s.get(key(N - 1)).unwrap(), Some(val(N - 1).into_bytes()));
    assert_eq!(s.get(key(N - 10)).unwrap(), None);
}

#[test]
fn batch_applies_all_ops() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default());
    s.put(b"gone", b"x").unwrap();
    s.put(b"keep", b"k").unwrap();
    let writes_before = s.stats().writes;
    let mut b = Batch::new();
    assert!(b.is_empty());
    b.put(b"a", b"1")
        .put(b"b", b"2")
        .delete(b"gone")
        .put(b"", b"empty key");
    b.delete(b"never-existed");
    assert_eq!(b.len(), 5);
    assert!(!b.is_empty());
    s.write(&b).unwrap();
    assert_eq!(
        s.stats().writes,
        writes_before + 1,
        "a batch counts as one write"
    );
    let model: BTreeMap<Vec<u8>, Vec<u8>> = [
        (b"a".to_vec(), b"1".to_vec()),
        (b"b".to_vec(), b"2".to_vec()),
        (b"keep".to_vec(), b"k".to_vec()),
        (vec![], b"empty key".to_vec()),
    ]
    .into_iter()
    .collect();
    assert_matches(&s, &model);
    // The batch is not consumed: it can be applied again (idempotent here).
    s.write(&b).unwrap();
    assert_matches(&s, &model);
    b.clear();
    assert!(b.is_empty());
    assert_eq!(b.len(), 0);
    drop(s);
    let s = open(&path, Options::default());
    assert_matches(&s, &model);
}

#[test]
fn batch_later_ops_on_same_key_win() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default());
    s.put(b"del-then-put", b"old").unwrap();
    s.put(b"put-then-del", b"old").unwrap();
    let mut b = Batch::new();
    b.put(b"twice", b"first").put(b"twice", b"second");
    b.delete(b"del-then-put").put(b"del-then-put", b"new");
    b.put(b"put-then-del", b"new").delete(b"put-then-del");
    b.put(b"fresh-then-del", b"x").delete(b"fresh-then-del");
    b.put(b"thrice", b"1")
        .delete(b"thrice")
        .put(b"thrice", b"3");
    b.put(b"to-empty", b"full").put(b"to-empty", b"");
    s.write(&b).unwrap();
    let model: BTreeMap<Vec<u8>, Vec<u8>> = [
        (b"twice".to_vec(), b"second".to_vec()),
        (b"del-then-put".to_vec(), b"new".to_vec()),
        (b"thrice".to_vec(), b"3".to_vec()),
        (b"to-empty".to_vec(), vec![]),
    ]
    .into_iter()
    .collect();
    assert_matches(&s, &model);
    drop(s);
    let s = open(&path, Options::default());
    assert_matches(&s, &model);
}

#[test]
fn empty_batch_is_a_noop() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default());
    s.put(b"k", b"v").unwrap();
    let before = s.stats();
    s.write(&Batch::new()).unwrap();
    let mut b = Batch::new();
    b.put(b"x", b"y");
    b.clear();
    s.write(&b).unwrap();
    let after = s.stats();
    assert_eq!(after.log_bytes, before.log_bytes);
    assert_eq!(after.log_end, before.log_end);
    assert_eq!(after.live_keys, 1);
    assert_eq!(s.get(b"x").unwrap(), None);
    drop(s);
    let s = open(&path, Options::default());
    assert_eq!(s.len(), 1);
    assert!(s.stats().recovery.was_clean);
}

#[test]
fn oversized_batch_is_rejected_as_a_whole() {
    let (_dir, path) = tmp();
    let s = open(
        &path,
        Options::default().max_key_size(32).max_value_size(64),
    );
    s.put(b"existing", b"old").unwrap();
    let snapshot = contents(&s);
    let before = s.stats();

    let mut b = Batch::new();
    b.put(b"first", b"1")
        .delete(b"existing")
        .put(b"existing-2", b"2");
    b.put([b'k'; 33], b"oversize key");
    b.put(b"after", b"a");
    match s.write(&b) {
        Err(Error::KeyTooLarge { len: 33, max: 32 }) => {}
        other => panic!("expected KeyTooLarge {{ len: 33, max: 32 }}, got {other:?}"),
    }
    let mut b = Batch::new();
    b.put(b"first", b"1").delete(b"existing");
    b.put(b"big", [0u8; 65]);
    match s.write(&b) {
        Err(Error::ValueTooLarge { len: 65, max: 64 }) => {}
        other => panic!("expected ValueTooLarge {{ len: 65, max: 64 }}, got {other:?}"),
    }
    // A delete with an oversize key inside a batch also rejects the batch (or, if the
    // store treats it as a no-op, at least must not apply anything else partially).
    let mut b = Batch::new();
    b.put(b"first", b"1").delete([b'k'; 40]);
    let r = s.write(&b);
    assert!(matches!(r, Err(Error::KeyTooLarge { .. })), "{r:?}");

    assert_eq!(contents(&s), snapshot, "a rejected batch applies nothing");
    let after = s.stats();
    assert_eq!(after.log_bytes, before.log_bytes);
    assert_eq!(after.log_end, before.log_end);
    assert_eq!(after.live_keys, before.live_keys);

    // The store is still fully usable.
    let mut b = Batch::new();
    b.put(b"first", b"1").put([b'k'; 32], [7u8; 64]);
    s.write(&b).unwrap();
    assert_eq!(s.get([b'k'; 32]).unwrap(), Some(vec![7u8; 64]));
    assert_eq!(s.get(b"first").unwrap(), Some(b"1".to_vec()));
    drop(s);
    let s = open(&path, Options::default());
    assert_eq!(s.len(), 3);
    assert_eq!(s.get(b"existing").unwrap(), Some(b"old".to_vec()));
}

#[test]
fn read_only_refuses_writes_and_reads_work() {
    let (_dir, path) = tmp();
    {
        let s = open(&path, Options::default());
        s.put(b"a", b"1").unwrap();
        s.put(b"", b"").unwrap();
    }
    let bytes_before = std::fs::read(&path).unwrap();
    {
        let s = open(&path, Options::default().read_only(true));
        assert_eq!(s.get(b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(s.get(b"").unwrap(), Some(vec![]));
        assert_eq!(s.get_with(b"a", <[u8]>::len).unwrap(), Some(1));
        assert!(s.contains_key(b"a").unwrap());
        assert_eq!(s.len(), 2);
        assert_eq!(contents(&s).len(), 2);
        assert!(s.stats().recovery.was_clean);

        assert!(matches!(s.put(b"b", b"2"), Err(Error::ReadOnly)));
        assert!(matches!(s.put(b"a", b"changed"), Err(Error::ReadOnly)));
        assert!(matches!(s.delete(b"a"), Err(Error::ReadOnly)));
        assert!(matches!(s.delete(b"missing"), Err(Error::ReadOnly)));
        let mut b = Batch::new();
        b.put(b"c", b"3");
        assert!(matches!(s.write(&b), Err(Error::ReadOnly)));
        assert!(matches!(s.compact(), Err(Error::ReadOnly)));
        // An empty batch changes nothing; either answer is fine, but never a change.
        let r = s.write(&Batch::new());
        assert!(matches!(r, Ok(()) | Err(Error::ReadOnly)), "{r:?}");
        let r = s.flush();
        assert!(matches!(r, Ok(()) | Err(Error::ReadOnly)), "{r:?}");

        assert_eq!(s.get(b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(s.get(b"b").unwrap(), None);
        assert_eq!(s.len(), 2);
        let st = s.stats();
        assert_eq!(st.live_keys, 2);
        assert!(st.file_size >= st.log_end);
        s.verify().unwrap();
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        bytes_before,
        "a read-only handle must not change the file"
    );
    // The store is writable again afterwards.
    let s = open(&path, Options::default());
    s.put(b"b", b"2").unwrap();
    assert_eq!(s.len(), 3);
}

#[test]
fn read_only_open_of_missing_file_fails() {
    let (dir, path) = tmp();
    let r = Store::open(&path, Options::default().read_only(true));
    assert!(r.is_err(), "read-only open of a missing file must fail");
    assert!(
        matches!(&r, Err(Error::NotFound { path: p, .. }) if *p == path),
        "expected a not-found error naming the file: {r:?}"
    );
    assert!(!path.exists(), "a read-only open must not create the file");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no leftovers"
    );
}

#[test]
fn open_in_missing_directory_fails() {
    let (dir, _) = tmp();
    let path = dir.path().join("no-such-dir").join("s.mkv");
    let r = Store::open(&path, Options::default());
    assert!(matches!(r, Err(Error::Io { .. })), "{r:?}");
}

#[test]
fn stats_follow_writes() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default().durability(Durability::None));
    let s0 = s.stats();
    assert_eq!((s0.live_keys, s0.live_bytes), (0, 0));
    assert!(s0.file_size >= s0.log_end);

    s.put(b"k1", vec![1u8; 100]).unwrap();
    let s1 = s.stats();
    assert_eq!(s1.live_keys, 1);
    assert!(
        s1.live_bytes >= 102,
        "live bytes include the key and value: {s1:?}"
    );
    assert_eq!(
        s1.dead_bytes, s0.dead_bytes,
        "a fresh key creates no dead bytes"
    );
    assert!(s1.log_bytes > s0.log_bytes);
    assert!(s1.log_end > s0.log_end);
    assert_eq!(s1.writes, s0.writes + 1);

    s.put(b"k2", vec![2u8; 50]).unwrap();
    let s2 = s.stats();
    assert_eq!(s2.live_keys, 2);
    assert!(s2.live_bytes > s1.live_bytes);
    assert_eq!(s2.dead_bytes, s1.dead_bytes);

    // Overwrite with a larger value: the old record becomes dead.
    s.put(b"k1", vec![3u8; 300]).unwrap();
    let s3 = s.stats();
    assert_eq!(s3.live_keys, 2);
    assert!(s3.dead_bytes >= s2.dead_bytes + 102, "{s2:?} -> {s3:?}");
    assert!(s3.live_bytes >= s2.live_bytes + 200, "{s2:?} -> {s3:?}");
    // Overwrite with a smaller value: live bytes shrink.
    s.put(b"k1", b"").unwrap();
    let s4 = s.stats();
    assert!(s4.live_bytes < s3.live_bytes);
    assert!(s4.dead_bytes > s3.dead_bytes);
    assert_eq!(s4.live_keys, 2);

    // Delete: live goes down, dead goes up.
    assert!(s.delete(b"k2").unwrap());
    let s5 = s.stats();
    assert_eq!(s5.live_keys, 1);
    assert!(s5.live_bytes < s4.live_bytes);
    assert!(s5.dead_bytes >= s4.dead_bytes + 52, "{s4:?} -> {s5:?}");
    assert_eq!(s5.live_keys as usize, s.len());

    for st in [&s0, &s1, &s2, &s3, &s4, &s5] {
        assert!(st.file_size >= st.log_end, "{st:?}");
        assert!(st.log_bytes >= st.live_bytes, "{st:?}");
        assert_eq!(st.dead_bytes, st.log_bytes - st.live_bytes, "{st:?}");
        assert!(st.mapped_bytes >= st.file_size, "{st:?}");
        assert_eq!(st.durability, Durability::None);
    }
    // Counters survive a clean reopen exactly.
    drop(s);
    let s = open(&path, Options::default());
    let r = s.stats();
    assert_eq!(
        (r.live_keys, r.live_bytes),
        (s5.live_keys, s5.live_bytes),
        "{s5:?} vs {r:?}"
    );
    assert!(r.file_size >= r.log_end);
    assert_eq!(r.writes, 0, "writes count since open");
}

/// `len()` and `live_bytes` stay exact when keys already in the index are overwritten,
/// deleted and re-added with no read of the counters in between (the write path defers
/// its index lookups to the next reader of the counters or checkpoint).
#[test]
fn counters_exact_after_unobserved_overwrites_of_indexed_keys() {
    let (_dir, path) = tmp();
    let rec = |k: &[u8], v: &[u8]| (16 + k.len() + v.len()) as u64;
    let key = |i: u32| format!("key-{i:05}").into_bytes();
    let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    {
        let s = open(&path, Options::default().durability(Durability::None));
        for i in 0..3000u32 {
            let v = vec![i as u8; (i % 70) as usize];
            put_both(&s, &mut model, key(i), v);
        }
    }
    for round in 0..3u32 {
        // Every key written so far is in the index now (a clean close checkpoints).
        let s = open(&path, Options::default().durability(Durability::None));
        for i in (round..3000).step_by(3) {
            let v = vec![round as u8; ((i * 7 + round) % 90) as usize];
            put_both(&s, &mut model, key(i), v);
        }
        for i in (round..3000).step_by(11) {
            assert_eq!(s.delete(key(i)).unwrap(), model.remove(&key(i)).is_some());
        }
        for i in 3000 + round * 100..3100 + round * 100 {
            s.put(key(i), b"new").unwrap();
            model.insert(key(i), b"new".to_vec());
        }
        // Overwrite the same key twice in one delta, and delete then re-add one.
        s.put(key(1), b"a").unwrap();
        s.put(key(1), b"bb").unwrap();
        model.insert(key(1), b"bb".to_vec());
        s.delete(key(2)).unwrap();
        s.put(key(2), b"back").unwrap();
        model.insert(key(2), b"back".to_vec());
        let live: u64 = model.iter().map(|(k, v)| rec(k, v)).sum();
        if round == 1 {
            // Close without reading the counters: the checkpoint resolves the lookups.
            drop(s);
            let s = open(&path, Options::default());
            assert_eq!(s.len(), model.len());
            assert_eq!(s.stats().live_bytes, live);
            s.verify().unwrap();
        } else {
            let st = s.stats();
            assert_eq!((st.live_keys, st.live_bytes), (model.len() as u64, live));
            assert_eq!(s.len(), model.len());
            assert_eq!(st.dead_bytes, st.log_bytes - st.live_bytes);
            s.verify().unwrap();
        }
    }
    let s = open(&path, Options::default().read_only(true));
    assert_matches(&s, &model);
}

/// Overwriting every key of a store whose index is about 40% full must not grow the
/// index: before the closing checkpoint the key count is only an upper bound (each
/// overwrite counts as a new key until its old record is found), and growth is decided on
/// the exact count.
#[test]
fn overwrites_do_not_grow_the_index() {
    let (_dir, path) = tmp();
    let key = |i: u32| format!("key-{i:05}").into_bytes();
    let opts = || {
        Options::default()
            .durability(Durability::None)
            .initial_size(16 << 10)
    };
    // 800 keys: the first checkpoint sizes the index for them (8 buckets of 255 slots,
    // 39% full; it grows past 70%).
    {
        let s = open(&path, opts());
        for i in 0..800 {
            s.put(key(i), b"first").unwrap();
        }
    }
    let index_bytes = open(&path, opts()).stats().index_bytes;
    for round in 0..3 {
        {
            let s = open(&path, opts());
            for i in 0..800 {
                s.put(key(i), format!("round {round}")).unwrap();
            }
            // Closed without reading the counters.
        }
        let s = open(&path, opts());
        let st = s.stats();
        assert_eq!(
            st.index_bytes, index_bytes,
            "round {round}: the index grew: {st:?}"
        );
        assert_eq!(s.len(), 800);
        assert_eq!(st.live_bytes, 800 * (16 + 9 + 7));
    }
}

/// Under `None` and `Periodic`, the background thread prefaults the log just after the
/// tail (the pages become resident without any append touching them).
#[test]
fn log_after_the_tail_gets_prefaulted_in_the_background() {
    for d in [
        Durability::None,
        Durability::Periodic(Duration::from_secs(60)),
    ] {
        let (_dir, path) = tmp();
        let s = open(
            &path,
            Options::default().durability(d).initial_size(64 << 20),
        );
        s.put(b"k", b"v").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let grown = loop {
            let st = s.stats();
            // Pages resident past the tail (at most log_end / 4096 + 1 pages lie before
            // it); without the prefault there are none. 512 pages is half the window.
            let past_tail = st.resident_pages.saturating_sub(st.log_end / 4096 + 1);
            if past_tail >= 512 {
                break true;
            }
            if std::time::Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(
            grown,
            "{d:?}: nothing prefaulted after the tail: {:?}",
            s.stats()
        );
    }
}

#[test]
fn stats_report_bytes_at_risk_by_policy() {
    let (_dir, path) = tmp();
    // None: a write is at risk until flush().
    {
        let s = open(&path, Options::default().durability(Durability::None));
        s.put(b"k", vec![0u8; 1000]).unwrap();
        let st = s.stats();
        assert!(st.bytes_at_risk > 0, "{st:?}");
        assert!(st.writes_at_risk >= 1, "{st:?}");
        s.flush().unwrap();
        let st = s.stats();
        assert_eq!((st.bytes_at_risk, st.writes_at_risk), (0, 0), "{st:?}");
        assert!(st.syncs >= 1);
    }
    // Always: nothing is at risk once a write returned.
    {
        let s = open(&path, Options::default().durability(Durability::Always));
        let syncs = s.stats().syncs;
        for i in 0..5u32 {
            s.put(i.to_le_bytes(), b"v").unwrap();
            let st = s.stats();
            assert_eq!((st.bytes_at_risk, st.writes_at_risk), (0, 0), "{st:?}");
        }
        assert!(
            s.stats().syncs >= syncs + 5,
            "every Always write needs a sync"
        );
    }
    // Periodic: the background flusher drains the risk without any call from us.
    {
        let s = open(
            &path,
            Options::default().durability(Durability::Periodic(Duration::from_millis(10))),
        );
        s.put(b"p", vec![1u8; 5000]).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let st = s.stats();
            if st.bytes_at_risk == 0 && st.writes_at_risk == 0 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the periodic flusher never synced: {st:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // Async: flush() makes it durable too.
    {
        let s = open(&path, Options::default().durability(Durability::Async));
        s.put(b"a", b"v").unwrap();
        s.flush().unwrap();
        let st = s.stats();
        assert_eq!((st.bytes_at_risk, st.writes_at_risk), (0, 0), "{st:?}");
    }
}

#[test]
fn compact_keeps_data_or_is_unsupported() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default().initial_size(16 << 10));
    let mut model = BTreeMap::new();
    for round in 0..4u32 {
        for i in 0..500u32 {
            let k = format!("c{i}").into_bytes();
            let v = format!("round{round}-{i}-{}", "y".repeat((i % 50) as usize)).into_bytes();
            put_both(&s, &mut model, k, v);
        }
    }
    for i in (0..500u32).step_by(3) {
        let k = format!("c{i}").into_bytes();
        s.delete(&k).unwrap();
        model.remove(&k);
    }
    s.put(b"", b"").unwrap();
    model.insert(vec![], vec![]);
    let before = s.stats();
    assert!(before.dead_bytes > 0);
    match s.compact() {
        Ok(()) => {
            assert_matches(&s, &model);
            let after = s.stats();
            assert!(
                after.dead_bytes < before.dead_bytes,
                "compaction reclaims dead bytes: {before:?} -> {after:?}"
            );
            assert_eq!(after.live_keys, before.live_keys);
            s.verify().unwrap();
            // Still writable, and everything survives reopen.
            s.put(b"after-compact", b"1").unwrap();
            model.insert(b"after-compact".to_vec(), b"1".to_vec());
            assert!(s.delete(b"c1").unwrap());
            model.remove(&b"c1"[..]);
            drop(s);
            let s = open(&path, Options::default());
            assert!(s.stats().recovery.was_clean);
            assert_matches(&s, &model);
            s.verify().unwrap();
        }
        Err(Error::Unsupported(_)) => {
            // Not implemented: the store must be untouched and usable.
            assert_matches(&s, &model);
            s.put(b"still", b"works").unwrap();
            assert_eq!(s.get(b"still").unwrap(), Some(b"works".to_vec()));
        }
        Err(e) => panic!("compact failed: {e}"),
    }
}

#[test]
fn options_are_validated_not_panicking() {
    let (_dir, path) = tmp();
    let r = Store::open(
        &path,
        Options::default().durability(Durability::Periodic(Duration::ZERO)),
    );
    assert!(matches!(r, Err(Error::InvalidOption(_))), "{r:?}");
    if usize::BITS > 32 {
        let r = Store::open(&path, Options::default().max_key_size(usize::MAX));
        assert!(matches!(r, Err(Error::InvalidOption(_))), "{r:?}");
        let r = Store::open(&path, Options::default().max_value_size(usize::MAX));
        assert!(matches!(r, Err(Error::InvalidOption(_))), "{r:?}");
    }
    // A tiny initial size is rounded up, not refused.
    let s = open(&path, Options::default().initial_size(0));
    s.put(b"k", vec![5u8; 100_000]).unwrap();
    assert_eq!(s.get(b"k").unwrap(), Some(vec![5u8; 100_000]));
    drop(s);
    // initial_size is ignored for an existing store.
    let s = open(&path, Options::default().initial_size(64 << 20));
    assert_eq!(s.get(b"k").unwrap(), Some(vec![5u8; 100_000]));
    assert!(s.stats().file_size < 64 << 20);
}

#[test]
fn impossible_initial_size_is_an_error() {
    let (dir, path) = tmp();
    let r = Store::open(&path, Options::default().initial_size(1 << 52));
    assert!(
        r.is_err(),
        "a 4 PiB initial size cannot be allocated: {r:?}"
    );
    assert!(
        !path.exists(),
        "a failed create must not leave a store behind"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "leftover files: {left:?}");
    // The path is still usable.
    let s = open(&path, Options::default());
    s.put(b"k", b"v").unwrap();
}

#[test]
fn every_builder_option_opens() {
    use mapkv::AccessPattern;
    let (_dir, path) = tmp();
    for (i, ap) in [
        AccessPattern::Normal,
        AccessPattern::Random,
        AccessPattern::Sequential,
        AccessPattern::WillNeed,
    ]
    .into_iter()
    .enumerate()
    {
        for populate in [false, true] {
            let opts = Options::default()
                .populate(populate)
                .access_pattern(ap)
                .durability(Durability::None)
                .initial_size(64 << 10);
            let s = open(&path, opts);
            assert_eq!(s.stats().populated, populate);
            let k = format!("{i}-{populate}");
            s.put(&k, vec![i as u8; 10_000]).unwrap();
            assert_eq!(s.get(&k).unwrap(), Some(vec![i as u8; 10_000]));
            assert_eq!(s.len(), i * 2 + usize::from(populate) + 1);
        }
    }
    let s = open(&path, Options::default().read_only(true).populate(true));
    assert_eq!(s.len(), 8);
}

#[test]
fn errors_are_std_errors() {
    fn assert_error<E: std::error::Error + Send + Sync + 'static>() {}
    assert_error::<Error>();
    let e = Error::KeyTooLarge { len: 10, max: 5 };
    let msg = e.to_string();
    assert!(msg.contains("10") && msg.contains('5'), "{msg}");
    assert!(!Error::Closed.to_string().is_empty());
    assert!(!Error::ReadOnly.to_string().is_empty());
    let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(Error::ReadOnly);
    assert!(boxed.source().is_none());
    // An I/O error carries its source.
    let (dir, _) = tmp();
    let path = dir.path().join("no-such-dir").join("s.mkv");
    let r = Store::open(&path, Options::default());
    let e = r.expect_err("missing directory");
    assert!(std::error::Error::source(&e).is_some(), "{e:?}");
    assert!(!e.is_corruption());
}

#[test]
fn iter_outlives_the_store_handle() {
    let (_dir, path) = tmp();
    let s = open(&path, Options::default());
    let mut model = BTreeMap::new();
    for i in 0..500u32 {
        let (k, v) = (format!("k{i}").into_bytes(), vec![(i % 256) as u8; 100]);
        put_both(&s, &mut model, k, v);
    }
    let it = s.iter();
    drop(s);
    let mut got = BTreeMap::new();
    for item in it {
        let (k, v) = item.unwrap();
        assert!(got.insert(k, v).is_none());
    }
    assert_eq!(got, model);
    let s = open(&path, Options::default());
    assert!(s.stats().recovery.was_clean);
    assert_eq!(contents(&s), model);
}

#[test]
fn resident_and_mapped_bytes_are_sane() {
    let (_dir, path) = tmp();
    {
        let s = open(&path, Options::default().durability(Durability::None));
        for i in 0..2000u32 {
            s.put(i.to_le_bytes(), vec![1u8; 500]).unwrap();
        }
    }
    let s = open(&path, Options::default().populate(true));
    assert_eq!(s.get(7u32.to_le_bytes()).unwrap(), Some(vec![1u8; 500]));
    let st = s.stats();
    assert!(st.populated);
    assert!(
        st.resident_bytes > 0,
        "a populated, just-read store has resident pages: {st:?}"
    );
    assert!(st.resident_bytes <= st.file_size, "{st:?}");
    assert!(st.mapped_bytes >= st.file_size, "{st:?}");
    assert!(st.live_bytes >= 2000 * 504, "{st:?}");
    assert!(st.space_amplification >= 1.0, "{st:?}");
}

#[test]
fn open_on_a_directory_fails() {
    let (dir, _) = tmp();
    let r = Store::open(dir.path(), Options::default());
    assert!(r.is_err(), "opening a directory as a store must fail");
    let r = Store::open(dir.path(), Options::default().read_only(true));
    assert!(r.is_err(), "opening a directory as a store must fail");
}

#[test]
fn not_a_store_is_rejected() {
    let (_dir, path) = tmp();
    std::fs::write(
        &path,
        b"this is a text file, not a mapkv store\n".repeat(200),
    )
    .unwrap();
    let r = Store::open(&path, Options::default());
    assert!(matches!(r, Err(Error::NotAStore { .. })), "{r:?}");
    let r = Store::open(&path, Options::default().read_only(true));
    assert!(matches!(r, Err(Error::NotAStore { .. })), "{r:?}");
    // The foreign file was left alone.
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"this is a text file, not a mapkv store\n".repeat(200)
    );
}

/// `Stats` shows the background maintenance: what the index covers and what a crash
/// would replay, compaction state and count, the automatic compaction threshold (on by
/// default), the last background error, and the file's allocation.
#[test]
fn stats_show_checkpoint_and_compaction_state_and_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.mkv");
    let s = Store::open(
        &path,
        Options::default()
            .durability(Durability::None)
            .checkpoint_keys(500),
    )
    .unwrap();
    let fresh = s.stats();
    assert_eq!(
        fresh.maintenance.auto_compact_at,
        Some(mapkv::AutoCompact::DEFAULT.dead_ratio),
        "on by default, with the default the docs name"
    );
    assert_eq!(mapkv::AutoCompact::DEFAULT.dead_ratio, 0.25);
    assert_eq!(fresh.maintenance.compactions, 0);
    assert!(!fresh.maintenance.compaction_running);
    assert_eq!(fresh.maintenance.last_error, None);
    for i in 0..5_000u32 {
        s.put(format!("k{i}"), [7u8; 100]).unwrap();
    }
    s.flush().unwrap();
    let st = s.stats();
    let m = &st.maintenance;
    assert!(
        m.checkpoint_end > 0,
        "checkpoints ran every 500 keys: {m:?}"
    );
    assert!(m.checkpoint_end <= st.log_end);
    assert_eq!(m.replay_bytes, st.log_end - m.checkpoint_end);
    assert!(st.allocated_bytes > 0 && st.file_size >= st.log_end);
    assert_eq!(st.spare_bytes, st.file_size - st.log_end);
    for i in 0..5_000u32 {
        s.put(format!("k{i}"), [8u8; 100]).unwrap();
    }
    s.compact().unwrap();
    let st = s.stats();
    assert_eq!(st.maintenance.compactions, 1);
    assert!(!st.maintenance.compaction_running);
    assert!(st.dead_bytes < st.live_bytes / 10, "{st:?}");
    let text = format!("{st}");
    assert!(
        text.contains("compaction idle (1 done, automatic at 25"),
        "{text}"
    );
    let off = Store::open(
        dir.path().join("off.mkv"),
        Options::default().auto_compact_off(),
    )
    .unwrap();
    assert_eq!(off.stats().maintenance.auto_compact_at, None);
}

/// `close()` gives back the space allocated ahead of the log: the file ends at the page
/// after the log's end, and the store reopens and grows again from there.
#[test]
fn close_gives_back_the_space_allocated_ahead_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trim.mkv");
    let opts = Options::default().durability(Durability::None);
    let s = Store::open(&path, opts.clone()).unwrap();
    for i in 0..50_000u32 {
        s.put(format!("k{i}"), [3u8; 100]).unwrap();
    }
    assert!(s.stats().spare_bytes > 0, "growth allocates ahead");
    s.close().unwrap();
    let s = Store::open(&path, opts).unwrap();
    let end = s.stats().log_end;
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(len, end.div_ceil(4096) * 4096, "log end {end}, file {len}");
    for i in 50_000..60_000u32 {
        s.put(format!("k{i}"), [4u8; 100]).unwrap();
    }
    assert_eq!(s.len(), 60_000);
    s.close().unwrap();
}
