//! Size limits and size extremes: key/value limits give `KeyTooLarge`/`ValueTooLarge` and
//! leave the store unchanged; multi-MiB values; a store that starts tiny and grows its
//! file and index many times while reader threads keep reading.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use mapkv::{Batch, Durability, Error, Options, Store};

mod common;
use common::tmp;

const MIB: usize = 1 << 20;

/// A value that describes itself: 8-byte id, 8-byte length, then a fill derived from the
/// id and the position, so a reader can check that it got a whole, correct value.
fn make_value(id: u64, len: usize) -> Vec<u8> {
    let len = len.max(16);
    let mut v = Vec::with_capacity(len + 8);
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&(len as u64).to_le_bytes());
    let mut w = 2u64;
    while v.len() < len {
        v.extend_from_slice(&fill_word(id, w).to_le_bytes());
        w += 1;
    }
    v.truncate(len);
    v
}

/// The 8 bytes at word position `w` (byte offset `8 * w`) of the value of `id`.
fn fill_word(id: u64, w: u64) -> u64 {
    let x = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ w.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    x ^ (x >> 29)
}

/// Checks a value made by [`make_value`] without allocating; returns its id.
fn check_value(v: &[u8]) -> Result<u64, String> {
    if v.len() < 16 {
        return Err(format!("value of {} bytes is too short", v.len()));
    }
    let id = u64::from_le_bytes(v[..8].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(v[8..16].try_into().expect("8 bytes"));
    if len != v.len() as u64 {
        return Err(format!(
            "value of id {id} says {len} bytes, has {}",
            v.len()
        ));
    }
    for (i, chunk) in v[16..].chunks(8).enumerate() {
        let want = fill_word(id, i as u64 + 2).to_le_bytes();
        if chunk != &want[..chunk.len()] {
            return Err(format!(
                "value of id {id} ({len} bytes) differs in word {}",
                i + 2
            ));
        }
    }
    Ok(id)
}

fn key_of(id: u64) -> Vec<u8> {
    format!("key/{id:010}").into_bytes()
}

#[test]
fn key_limit_is_enforced() {
    let (_dir, path) = tmp();
    let s = Store::open(&path, Options::default().max_key_size(16)).unwrap();
    s.put([b'a'; 16], b"at the limit").unwrap();
    s.put(b"small", b"old").unwrap();
    let before = s.stats();
    match s.put([b'b'; 17], b"v") {
        Err(Error::KeyTooLarge { len: 17, max: 16 }) => {}
        other => panic!("expected KeyTooLarge, got {other:?}"),
    }
    match s.put(vec![b'c'; 100_000], b"") {
        Err(Error::KeyTooLarge {
            len: 100_000,
            max: 16,
        }) => {}
        other => panic!("expected KeyTooLarge, got {other:?}"),
    }
    // Deleting or reading an oversize key cannot find anything; it must not panic and must
    // not change the store.
    let r = s.delete([b'b'; 17]);
    assert!(
        matches!(r, Ok(false) | Err(Error::KeyTooLarge { .. })),
        "{r:?}"
    );
    let r = s.get([b'b'; 17]);
    assert!(
        matches!(r, Ok(None) | Err(Error::KeyTooLarge { .. })),
        "{r:?}"
    );
    let r = s.contains_key([b'b'; 17]);
    assert!(
        matches!(r, Ok(false) | Err(Error::KeyTooLarge { .. })),
        "{r:?}"
    );

    let after = s.stats();
    assert_eq!(
        after.log_bytes, before.log_bytes,
        "a rejected write must not log anything"
    );
    assert_eq!(after.log_end, before.log_end);
    assert_eq!(s.len(), 2);
    assert_eq!(s.get([b'a'; 16]).unwrap(), Some(b"at the limit".to_vec()));
    assert_eq!(s.get(b"small").unwrap(), Some(b"old".to_vec()));
    drop(s);
    let s = Store::open(&path, Options::default()).unwrap();
    assert!(s.stats().recovery.was_clean);
    assert_eq!(s.len(), 2);
}

#[test]
fn value_limit_is_enforced() {
    let (_dir, path) = tmp();
    let s = Store::open(&path, Options::default().max_value_size(100)).unwrap();
    s.put(b"k", [1u8; 100]).unwrap();
    let before = s.stats();
    match s.put(b"k", [2u8; 101]) {
        Err(Error::ValueTooLarge { len: 101, max: 100 }) => {}
        other => panic!("expected ValueTooLarge, got {other:?}"),
    }
    match s.put(b"new", [2u8; 101]) {
        Err(Error::ValueTooLarge { len: 101, max: 100 }) => {}
        other => panic!("expected ValueTooLarge, got {other:?}"),
    }
    assert_eq!(
        s.get(b"k").unwrap(),
        Some(vec![1u8; 100]),
        "the old value stays"
    );
    assert_eq!(s.get(b"new").unwrap(), None);
    assert_eq!(s.stats().log_bytes, before.log_bytes);
    assert_eq!(s.len(), 1);
    // Zero limits: only empty values (and keys) are accepted.
    drop(s);
    let s = Store::open(&path, Options::default().max_value_size(0).max_key_size(0)).unwrap();
    s.put(b"", b"").unwrap();
    assert!(matches!(
        s.put(b"", b"x"),
        Err(Error::ValueTooLarge { len: 1, max: 0 })
    ));
    assert!(matches!(
        s.put(b"x", b""),
        Err(Error::KeyTooLarge { len: 1, max: 0 })
    ));
    assert_eq!(s.get(b"").unwrap(), Some(vec![]));
    // Stored values above a lower limit set at a later open can still be read.
    assert_eq!(s.get(b"k").unwrap(), Some(vec![1u8; 100]));
    assert_eq!(s.len(), 2);
}

#[test]
fn default_limits() {
    let (_dir, path) = tmp();
    let s = Store::open(&path, Options::default()).unwrap();
    // Default key limit: 64 KiB.
    let key = vec![b'K'; 64 << 10];
    s.put(&key, b"long key").unwrap();
    assert_eq!(s.get(&key).unwrap(), Some(b"long key".to_vec()));
    let too_long = vec![b'K'; (64 << 10) + 1];
    assert!(matches!(
        s.put(&too_long, b"v"),
        Err(Error::KeyTooLarge { .. })
    ));
    // Default value limit: 256 MiB. The zeroed allocation is lazily backed, so this
    // costs no memory; the store must refuse it before copying anything.
    let huge = vec![0u8; 256 * MIB + 1];
    let before = s.stats();
    match s.put(b"huge", &huge) {
        Err(Error::ValueTooLarge { len, max }) => {
            assert_eq!((len, max), (256 * MIB + 1, 256 * MIB))
        }
        other => panic!("expected ValueTooLarge, got {other:?}"),
    }
    let mut b = Batch::new();
    b.put(b"small", b"s").put(b"huge", &huge);
    assert!(matches!(s.write(&b), Err(Error::ValueTooLarge { .. })));
    drop(b);
    drop(huge);
    assert_eq!(s.stats().log_bytes, before.log_bytes);
    assert_eq!(s.len(), 1);
    assert_eq!(s.get(b"small").unwrap(), None);
    drop(s);
    let s = Store::open(&path, Options::default()).unwrap();
    assert_eq!(s.get(&key).unwrap(), Some(b"long key".to_vec()));
}

#[test]
fn multi_mib_values() {
    let (_dir, path) = tmp();
    let opts = || {
        Options::default()
            .max_value_size(8 * MIB)
            .initial_size(16 << 10)
    };
    let sizes = [MIB - 1, MIB, MIB + 1, 3 * MIB + 17, 8 * MIB];
    {
        let s = Store::open(&path, opts()).unwrap();
        for (i, &len) in sizes.iter().enumerate() {
            s.put(key_of(i as u64), make_value(i as u64, len)).unwrap();
        }
        // One byte over the limit.
        let over = make_value(99, 8 * MIB + 1);
        let before = s.stats();
        match s.put(key_of(99), &over) {
            Err(Error::ValueTooLarge { len, max }) => {
                assert_eq!((len, max), (8 * MIB + 1, 8 * MIB))
            }
            other => panic!("expected ValueTooLarge, got {other:?}"),
        }
        assert_eq!(s.stats().log_bytes, before.log_bytes);
        assert_eq!(s.get(key_of(99)).unwrap(), None);
        // Overwrite a big value with another big value, and a small one with a big one.
        s.put(key_of(4), make_value(4, 8 * MIB - 5)).unwrap();
        s.put(b"small", b"s").unwrap();
        s.put(b"small", make_value(7, 5 * MIB)).unwrap();
        let mut b = Batch::new();
        b.put(key_of(10), make_value(10, 2 * MIB))
            .put(key_of(11), make_value(11, 2 * MIB));
        s.write(&b).unwrap();
        let st = s.stats();
        assert!(
            st.file_size >= st.log_end && st.log_end > 30 * MIB as u64,
            "{st:?}"
        );
    }
    let s = Store::open(&path, opts().read_only(true)).unwrap();
    let mut want: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    for (i, &len) in sizes.iter().enumerate() {
        want.insert(key_of(i as u64), len);
    }
    want.insert(key_of(4), 8 * MIB - 5);
    want.insert(b"small".to_vec(), 5 * MIB);
    want.insert(key_of(10), 2 * MIB);
    want.insert(key_of(11), 2 * MIB);
    assert_eq!(s.len(), want.len());
    for (k, &len) in &want {
        let v = s.get(k).unwrap().expect("big value present");
        assert_eq!(v.len(), len);
        check_value(&v).unwrap();
        // Zero-copy check of the same value.
        let ok = s.get_with(k, |v| check_value(v).map(|_| v.len())).unwrap();
        assert_eq!(ok, Some(Ok(len)));
    }
    let mut n = 0;
    for item in s.iter() {
        let (k, v) = item.unwrap();
        assert_eq!(want.get(&k), Some(&v.len()));
        check_value(&v).unwrap();
        n += 1;
    }
    assert_eq!(n, want.len());
    s.verify().unwrap();
}

/// One batch much larger than the file it is written into: the file grows within the
/// write, and the batch is all there afterwards.
#[test]
fn huge_batches_grow_the_file() {
    let (_dir, path) = tmp();
    let s = Store::open(
        &path,
        Options::default()
            .initial_size(16 << 10)
            .durability(Durability::Always),
    )
    .unwrap();
    let mut b = Batch::new();
    for i in 0..40_000u64 {
        b.put(key_of(i), make_value(i, 16 + (i as usize % 300)));
    }
    s.write(&b).unwrap();
    let mut big = Batch::new();
    for i in 0..3u64 {
        big.put(
            key_of(1_000_000 + i),
            make_value(1_000_000 + i, 4 * MIB + i as usize),
        );
    }
    big.delete(key_of(5));
    s.write(&big).unwrap();
    assert_eq!(s.stats().writes, 2);
    assert_eq!(s.len(), 40_002);
    let check = |s: &Store| {
        for i in (0..40_000u64).chain(1_000_000..1_000_003) {
            match s.get(key_of(i)).unwrap() {
                None => assert_eq!(i, 5, "key {i} missing"),
                Some(v) => assert_eq!(check_value(&v), Ok(i)),
            }
        }
    };
    check(&s);
    drop(s);
    let s = Store::open(&path, Options::default()).unwrap();
    assert!(s.stats().recovery.was_clean);
    assert_eq!(s.len(), 40_002);
    check(&s);
    s.verify().unwrap();
}

/// A store created at 16 KiB grows its file and its index many times while reader threads
/// keep reading keys known to exist; every read must return a whole, correct value.
#[test]
fn growth_with_concurrent_readers() {
    const READERS: usize = 3;
    let (_dir, path) = tmp();
    // Ids below `published` have been written and their put returned.
    let published = Arc::new(AtomicU64::new(0));
    let mut next: u64 = 0;
    let mut sizes_seen = Vec::new();
    let mut total_reads = 0u64;
    // Value length for id `i`: mostly small, some medium, a few large (pwrite path). The
    // last round appends over 256 MiB, which forces a checkpoint (and an index growth)
    // while the readers run.
    let len_of = |i: u64| match i % 2000 {
        0 if i >= LAST_ROUND_START => 3 * MIB / 2,
        1000 if i >= LAST_ROUND_START => 3 * MIB / 2,
        0 => 600 << 10,
        1..=10 => 5000 + (i as usize % 3000),
        _ => 16 + (i as usize * 13) % 180,
    };
    // Rounds: each closes the store, which grows the index for the keys added.
    const LAST_ROUND_START: u64 = 60_000;
    let targets = [2_000u64, 8_000, 30_000, LAST_ROUND_START, 270_000];
    for (round, &target) in targets.iter().enumerate() {
        let opts = Options::default()
            .initial_size(16 << 10)
            .durability(if round % 2 == 0 {
                Durability::None
            } else {
                Durability::Periodic(std::time::Duration::from_millis(3))
            });
        let store = Arc::new(Store::open(&path, opts).unwrap());
        sizes_seen.push((store.stats().file_size, store.stats().index_bytes));
        assert_eq!(store.len() as u64, next);
        let stop = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..READERS)
            .map(|r| {
                let store = Arc::clone(&store);
                let stop = Arc::clone(&stop);
                let published = Arc::clone(&published);
                std::thread::spawn(move || {
                    let mut x = 0x2545_F491_4F6C_DD1Du64 ^ (r as u64 + 1);
                    let mut reads = 0u64;
                    while !stop.load(Ordering::Acquire) {
                        let n = published.load(Ordering::Acquire);
                        if n == 0 {
                            std::thread::yield_now();
                            continue;
                        }
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        // Half the reads go to the most recent keys.
                        let id = if x & 1 == 0 {
                            x % n
                        } else {
                            n - 1 - (x >> 1) % n.min(64)
                        };
                        let k = key_of(id);
                        match r % 2 {
                            0 => {
                                let v = store
                                    .get(&k)
                                    .unwrap_or_else(|e| panic!("get {id}: {e}"))
                                    .unwrap_or_else(|| panic!("published key {id} missing"));
                                assert_eq!(check_value(&v), Ok(id));
                            }
                            _ => {
                                let r = store
                                    .get_with(&k, check_value)
                                    .unwrap_or_else(|e| panic!("get_with {id}: {e}"))
                                    .unwrap_or_else(|| panic!("published key {id} missing"));
                                assert_eq!(r, Ok(id));
                            }
                        }
                        reads += 1;
                    }
                    reads
                })
            })
            .collect();
        while next < target {
            store
                .put(key_of(next), make_value(next, len_of(next)))
                .unwrap();
            next += 1;
            published.store(next, Ordering::Release);
        }
        stop.store(true, Ordering::Release);
        for t in readers {
            total_reads += t.join().expect("reader thread panicked");
        }
        let mut st = store.stats();
        // (`stats` does not wait for a running checkpoint: let the last one end.)
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        while st.maintenance.checkpoint_running && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
            st = store.stats();
        }
        assert_eq!(st.live_keys, next);
        assert!(st.file_size >= st.log_end);
        if round == targets.len() - 1 {
            assert!(
                st.checkpoints >= 1,
                "expected a checkpoint during the session: {st:?}"
            );
            assert!(
                st.index_bytes > sizes_seen[round].1,
                "expected index growth during the session: {st:?}"
            );
        }
        let store = Arc::try_unwrap(store).expect("readers are gone");
        store.close().unwrap();
    }
    let store = Store::open(&path, Options::default().read_only(true)).unwrap();
    assert!(store.stats().recovery.was_clean);
    sizes_seen.push((store.stats().file_size, store.stats().index_bytes));
    assert_eq!(store.len() as u64, next);
    let mut seen = vec![false; usize::try_from(next).unwrap()];
    for item in store.iter() {
        let (k, v) = item.unwrap();
        let id = check_value(&v).unwrap();
        assert_eq!(k, key_of(id));
        assert!(
            !std::mem::replace(&mut seen[id as usize], true),
            "id {id} twice"
        );
    }
    assert!(seen.iter().all(|&b| b), "iter missed keys");
    store.verify().unwrap();
    assert!(total_reads > 0);
    let file_growths = sizes_seen.windows(2).filter(|w| w[1].0 > w[0].0).count();
    let index_growths = sizes_seen.windows(2).filter(|w| w[1].1 > w[0].1).count();
    assert!(file_growths >= 4 && index_growths >= 4, "{sizes_seen:?}");
}

/// Overwriting keys with values of changing size while readers read them: a reader sees
/// some complete version, never a mix.
#[test]
fn overwrites_with_concurrent_readers_are_never_torn() {
    const KEYS: u64 = 64;
    let (_dir, path) = tmp();
    let store = Arc::new(
        Store::open(
            &path,
            Options::default()
                .initial_size(16 << 10)
                .durability(Durability::None),
        )
        .unwrap(),
    );
    // Version v of key k has id v * KEYS + k.
    for k in 0..KEYS {
        store.put(key_of(k), make_value(k, 100)).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2u64)
        .map(|r| {
            let store = Arc::clone(&store);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut last = vec![0u64; KEYS as usize];
                let mut i = r;
                while !stop.load(Ordering::Acquire) {
                    let k = i % KEYS;
                    i += 7;
                    let id = store
                        .get_with(key_of(k), check_value)
                        .unwrap()
                        .expect("key always present")
                        .unwrap();
                    assert_eq!(id % KEYS, k, "value of another key");
                    let version = id / KEYS;
                    assert!(version >= last[k as usize], "key {k} went back in time");
                    last[k as usize] = version;
                }
            })
        })
        .collect();
    for version in 1..200u64 {
        for k in 0..KEYS {
            let id = version * KEYS + k;
            let len = if (version + k) % 97 == 0 {
                300 << 10
            } else {
                16 + ((id * 31) % 2000) as usize
            };
            store.put(key_of(k), make_value(id, len)).unwrap();
        }
    }
    stop.store(true, Ordering::Release);
    for t in readers {
        t.join().expect("reader thread panicked");
    }
    for k in 0..KEYS {
        let v = store.get(key_of(k)).unwrap().unwrap();
        assert_eq!(check_value(&v), Ok(199 * KEYS + k));
    }
}
