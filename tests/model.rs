//! Model-based test: random sequences of puts, deletes, batches, reads, flushes, reopens,
//! compactions and full comparisons, checked against a `BTreeMap`.
//!
//! Keys come from a small hot set (many overwrites) and a wider cold set (so the index
//! must grow); stores start at the minimum size, so the file grows too.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use mapkv::{Batch, Durability, Error, Options, Store};
use proptest::prelude::*;

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

/// Key number `n` as bytes: 0 is the empty key, a few are long, the rest short.
fn key(n: u16) -> Vec<u8> {
    match n {
        0 => Vec::new(),
        n if n % 50 == 7 => {
            let mut k = vec![b'L'; 200 + usize::from(n)];
            k.extend_from_slice(&n.to_le_bytes());
            k
        }
        n => format!("k{n}").into_bytes(),
    }
}

/// Value described by (seed, len): cheap to generate and shrink.
fn val(seed: u8, len: u16) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8))
        .collect()
}

#[derive(Debug, Clone)]
enum Op {
    Put(u16, u8, u16),
    Delete(u16),
    /// (key, Some((seed, len)) for a put or None for a delete)
    Batch(Vec<(u16, Option<(u8, u16)>)>),
    /// Put `count` cold keys starting at `start` (drives index growth).
    Fill(u16, u16, u8),
    Get(u16),
    Flush,
    Reopen(u8),
    ReadOnlyCheck,
    Compact,
    Compare,
}

fn key_strategy() -> impl Strategy<Value = u16> {
    prop_oneof![
        4 => 0u16..12,   // hot: lots of overwrites and deletes of present keys
        1 => 0u16..800,  // cold: wide key space
    ]
}

fn value_strategy() -> impl Strategy<Value = (u8, u16)> {
    (
        any::<u8>(),
        prop_oneof![
            3 => 0u16..40,
            1 => 0u16..600,
            1 => Just(0u16),
            1 => 3000u16..9000,
        ],
    )
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        20 => (key_strategy(), value_strategy()).prop_map(|(k, (s, l))| Op::Put(k, s, l)),
        8 => key_strategy().prop_map(Op::Delete),
        5 => proptest::collection::vec(
            (key_strategy(), proptest::option::of(value_strategy())),
            0..8,
        )
        .prop_map(Op::Batch),
        1 => (0u16..800, 1u16..300, any::<u8>()).prop_map(|(s, c, v)| Op::Fill(s, c, v)),
        8 => key_strategy().prop_map(Op::Get),
        2 => Just(Op::Flush),
        3 => any::<u8>().prop_map(Op::Reopen),
        1 => Just(Op::ReadOnlyCheck),
        1 => Just(Op::Compact),
        2 => Just(Op::Compare),
    ]
}

fn durability(choice: u8) -> Durability {
    match choice % 8 {
        0 => Durability::Always,
        1 | 2 => Durability::Async,
        3 | 4 => Durability::Periodic(Duration::from_millis(1 + u64::from(choice % 20))),
        _ => Durability::None,
    }
}

fn open(path: &Path, choice: u8) -> Store {
    let mut opts = Options::default()
        .durability(durability(choice))
        .initial_size(16 << 10)
        .populate(choice % 16 == 5);
    if choice.is_multiple_of(2) {
        // Background checkpoints (and index growth) every few writes, while the model
        // checks go on reading.
        opts = opts.checkpoint_keys(usize::from(choice % 40) + 2);
    }
    Store::open(path, opts).expect("open")
}

fn compare(store: &Store, model: &Model) -> Result<(), TestCaseError> {
    prop_assert_eq!(store.len(), model.len());
    prop_assert_eq!(store.is_empty(), model.is_empty());
    let st = store.stats();
    prop_assert_eq!(st.live_keys, model.len() as u64);
    prop_assert!(st.file_size >= st.log_end, "{:?}", st);
    prop_assert_eq!(st.dead_bytes, st.log_bytes - st.live_bytes, "{:?}", st);
    // A live pair's record is its 16-byte header, the key and the value.
    let live: u64 = model
        .iter()
        .map(|(k, v)| (16 + k.len() + v.len()) as u64)
        .sum();
    prop_assert_eq!(st.live_bytes, live, "live bytes: {:?}", st);
    let mut got = Model::new();
    for item in store.iter() {
        let (k, v) = item.map_err(|e| TestCaseError::fail(format!("iter: {e}")))?;
        prop_assert!(
            got.insert(k.clone(), v).is_none(),
            "iter yielded {:?} twice",
            k
        );
    }
    prop_assert!(&got == model, "iter differs from the model");
    Ok(())
}

fn run(ops: &[Op], first_choice: u8) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("model.mkv");
    let mut store = Some(open(&path, first_choice));
    let mut model = Model::new();
    for op in ops {
        let s = store.as_ref().expect("store is open between ops");
        match op {
            Op::Put(k, seed, len) => {
                let v = val(*seed, *len);
                s.put(key(*k), &v)
                    .map_err(|e| TestCaseError::fail(format!("put: {e}")))?;
                model.insert(key(*k), v);
            }
            Op::Delete(k) => {
                let writes_before = s.stats().writes;
                let existed = s
                    .delete(key(*k))
                    .map_err(|e| TestCaseError::fail(format!("delete: {e}")))?;
                prop_assert_eq!(
                    existed,
                    model.remove(&key(*k)).is_some(),
                    "delete({}) result",
                    k
                );
                if !existed {
                    // Writes, not log bytes: a background checkpoint that must grow the
                    // index appends a JUMP over its new region whenever it is collected,
                    // which may be during this call.
                    prop_assert_eq!(
                        s.stats().writes,
                        writes_before,
                        "delete of a missing key logged"
                    );
                }
            }
            Op::Batch(items) => {
                let mut b = Batch::new();
                for (k, v) in items {
                    match v {
                        Some((seed, len)) => {
                            let v = val(*seed, *len);
                            b.put(key(*k), &v);
                            model.insert(key(*k), v);
                        }
                        None => {
                            b.delete(key(*k));
                            model.remove(&key(*k));
                        }
                    }
                }
                s.write(&b)
                    .map_err(|e| TestCaseError::fail(format!("write: {e}")))?;
            }
            Op::Fill(start, count, seed) => {
                let mut b = Batch::new();
                for n in *start..start.saturating_add(*count) {
                    let k = key(n.wrapping_add(100));
                    let v = val(seed.wrapping_add(n as u8), 8 + n % 50);
                    // Half as single puts, half as one batch.
                    if n % 2 == 0 {
                        s.put(&k, &v)
                            .map_err(|e| TestCaseError::fail(format!("fill put: {e}")))?;
                    } else {
                        b.put(&k, &v);
                    }
                    model.insert(k, v);
                }
                s.write(&b)
                    .map_err(|e| TestCaseError::fail(format!("fill write: {e}")))?;
            }
            Op::Get(k) => {
                let got = s
                    .get(key(*k))
                    .map_err(|e| TestCaseError::fail(format!("get: {e}")))?;
                prop_assert_eq!(got.as_ref(), model.get(&key(*k)), "get({})", k);
                let len = s
                    .get_with(key(*k), <[u8]>::len)
                    .map_err(|e| TestCaseError::fail(format!("{e}")))?;
                prop_assert_eq!(len, model.get(&key(*k)).map(Vec::len));
                let has = s
                    .contains_key(key(*k))
                    .map_err(|e| TestCaseError::fail(format!("{e}")))?;
                prop_assert_eq!(has, model.contains_key(&key(*k)));
            }
            Op::Flush => {
                s.flush()
                    .map_err(|e| TestCaseError::fail(format!("flush: {e}")))?;
                let st = s.stats();
                prop_assert_eq!(st.bytes_at_risk, 0, "flush left bytes at risk: {:?}", st);
            }
            Op::Reopen(choice) => {
                // Closed without reading the counters first: the closing checkpoint must
                // get them right by itself (compare() checks them exactly).
                drop(store.take());
                let s = open(&path, *choice);
                let st = s.stats();
                prop_assert!(
                    st.recovery.was_clean,
                    "reopen after a clean close: {:?}",
                    st
                );
                prop_assert_eq!(st.recovery.replayed_writes, 0);
                compare(&s, &model)?;
                store = Some(s);
            }
            Op::ReadOnlyCheck => {
                drop(store.take());
                {
                    let ro = Store::open(&path, Options::default().read_only(true))
                        .expect("open read-only");
                    compare(&ro, &model)?;
                    prop_assert!(matches!(ro.put(b"x", b"y"), Err(Error::ReadOnly)));
                }
                store = Some(open(&path, 6));
            }
            Op::Compact => match s.compact() {
                Ok(()) => {
                    prop_assert_eq!(s.stats().dead_bytes, 0, "compaction leaves no dead bytes");
                    compare(s, &model)?;
                }
                Err(Error::Unsupported(_)) => {}
                Err(e) => return Err(TestCaseError::fail(format!("compact: {e}"))),
            },
            Op::Compare => compare(s, &model)?,
        }
    }
    let s = store.take().expect("store is open");
    compare(&s, &model)?;
    s.verify()
        .map_err(|e| TestCaseError::fail(format!("verify: {e}")))?;
    drop(s);
    let s = open(&path, 7);
    prop_assert!(s.stats().recovery.was_clean);
    compare(&s, &model)?;
    s.verify()
        .map_err(|e| TestCaseError::fail(format!("verify after reopen: {e}")))?;
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        max_shrink_iters: 2000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op_strategy(), 1..160), first in any::<u8>()) {
        run(&ops, first)?;
    }
}

/// A fixed long sequence with heavy growth and churn, so the model test does not depend
/// on proptest drawing enough cold keys.
#[test]
fn model_heavy_growth() {
    let mut ops = Vec::new();
    for round in 0..12u16 {
        if round % 2 == 1 {
            // Deletes (which read the counters) first, so the overwrites below reach the
            // closing checkpoint with their index lookups still deferred.
            for k in (0..12).step_by(4) {
                ops.push(Op::Delete(k + round % 4));
            }
        }
        ops.push(Op::Fill(round * 60, 300, round as u8));
        for k in 0..12 {
            ops.push(Op::Put(k, round as u8, (k * 97 + round * 13) % 700));
        }
        ops.push(Op::Batch(
            (0..12)
                .map(|k| (k * 3, (k % 3 != 0).then_some((k as u8, k * 5))))
                .collect(),
        ));
        if round % 2 == 0 {
            for k in (0..12).step_by(4) {
                ops.push(Op::Delete(k + round % 4));
            }
            ops.push(Op::Compare);
        }
        if round % 3 == 2 {
            ops.push(Op::Compact);
        }
        ops.push(Op::Reopen(round as u8));
    }
    ops.push(Op::ReadOnlyCheck);
    run(&ops, 6).unwrap();
}
