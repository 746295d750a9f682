//! Arbitrary bytes as a store file: opening it (normally, with salvage, read-only) and
//! then iterating, reading, writing, verifying and closing must never panic, abort, hang
//! or raise a signal; every failure must be an `Err`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mapkv::{Durability, Options, Store};

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let path = common::fresh("open_bytes.store");
    for mode in 0..3 {
        let _ = std::fs::remove_file(&path);
        std::fs::write(&path, data).expect("write input");
        let opts = Options::default().durability(Durability::None);
        let opts = match mode {
            0 => opts,
            1 => opts.salvage(true),
            _ => opts.read_only(true),
        };
        let Ok(store) = Store::open(&path, opts) else {
            continue;
        };
        let mut keys = Vec::new();
        for item in store.iter().take(10_000) {
            match item {
                Ok((k, _)) => keys.push(k),
                Err(_) => break,
            }
        }
        for k in keys.iter().take(64) {
            let _ = store.get(k);
            let _ = store.get_with(k, |v| v.len());
        }
        let _ = store.get(b"k1");
        let _ = store.contains_key(b"");
        let _ = store.len();
        let _ = store.stats();
        let verified = store.verify();
        if mode == 1 {
            // A salvaged store is consistent by construction.
            assert!(
                verified.is_ok(),
                "salvaged store fails verify: {verified:?}"
            );
        }
        let _ = store.put(b"fuzz", b"value");
        let _ = store.delete(keys.first().map_or(&b"x"[..], |k| &k[..]));
        let _ = store.flush();
        let _ = store.close();
        // Whatever the close did, a reopen must not panic either.
        if let Ok(s) = Store::open(&path, Options::default().durability(Durability::None)) {
            let _ = s.verify();
        }
    }
});
