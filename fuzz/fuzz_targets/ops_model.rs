//! Arbitrary sequences of operations (puts, deletes, batches, flushes, reopens,
//! compactions, growth) against a `BTreeMap` model: every read must agree with the model,
//! in every durability policy, across reopens.
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mapkv::{Batch, Error, Options, Store};

#[path = "common.rs"]
mod common;
use common::Op;

#[derive(Debug, Arbitrary)]
struct Input {
    policy: u8,
    small_file: bool,
    ops: Vec<Op>,
}

type Model = BTreeMap<Vec<u8>, Vec<u8>>;

fn compare(store: &Store, model: &Model, when: &str) {
    let mut got = Model::new();
    for item in store.iter() {
        let (k, v) = item.unwrap_or_else(|e| panic!("{when}: iteration failed: {e}"));
        assert!(got.insert(k, v).is_none(), "{when}: a key yielded twice");
    }
    assert!(got == *model, "{when}: store differs from the model");
    assert_eq!(store.len(), model.len(), "{when}: len()");
    for (k, v) in model {
        assert_eq!(store.get(k).expect("get").as_ref(), Some(v), "{when}: get");
    }
}

fuzz_target!(|input: Input| {
    let path = common::fresh("ops_model.store");
    let size = if input.small_file { 12 << 10 } else { 1 << 20 };
    let opts = Options::default()
        .durability(common::policy(input.policy))
        .initial_size(size);
    let opts = common::checkpoint_keys(opts, input.policy);
    let mut store = Some(Store::open(&path, opts.clone()).expect("create"));
    let mut model = Model::new();
    for op in input.ops.iter().take(300) {
        let s = store.as_ref().expect("open");
        match op {
            Op::Put { key, len, fill } => {
                let (k, v) = (common::key(*key), common::value(*len, *fill, false));
                s.put(&k, &v).expect("put");
                model.insert(k, v);
            }
            Op::Big { key, fill } => {
                let (k, v) = (common::key(*key), common::value(0, *fill, true));
                s.put(&k, &v).expect("put");
                model.insert(k, v);
            }
            Op::Delete { key } => {
                let k = common::key(*key);
                let existed = s.delete(&k).expect("delete");
                assert_eq!(existed, model.remove(&k).is_some(), "delete() result");
            }
            Op::Batch(ops) => {
                let mut b = Batch::new();
                for (key, v) in ops.iter().take(20) {
                    let k = common::key(*key);
                    match v {
                        Some((len, fill)) => {
                            let v = common::value(*len, *fill, false);
                            b.put(&k, &v);
                            model.insert(k, v);
                        }
                        None => {
                            b.delete(&k);
                            model.remove(&k);
                        }
                    }
                }
                s.write(&b).expect("batch");
            }
            Op::Get { key } => {
                let k = common::key(*key);
                assert_eq!(s.get(&k).expect("get"), model.get(&k).cloned(), "get");
            }
            Op::Flush => s.flush().expect("flush"),
            Op::Reopen => {
                store.take().expect("open").close().expect("close");
                let s = Store::open(&path, opts.clone()).expect("reopen");
                assert!(s.stats().recovery.was_clean, "a clean close reopens clean");
                compare(&s, &model, "after reopen");
                store = Some(s);
            }
            Op::Compact => match s.compact() {
                Ok(()) | Err(Error::Unsupported(_)) => {}
                Err(e) => panic!("compact: {e}"),
            },
            Op::Iterate => compare(s, &model, "iterate"),
        }
    }
    let s = store.take().expect("open");
    compare(&s, &model, "at the end");
    s.verify().expect("verify");
    s.close().expect("close");
    let s = Store::open(&path, opts).expect("final reopen");
    compare(&s, &model, "after the final reopen");
});
