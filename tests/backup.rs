//! `Store::backup`: a consistent, atomic, standalone copy of the committed state, made
//! while writes go on, from the writer or from a reader.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use mapkv::{Durability, Options, Store};

mod common;
use common::tmp;

fn value(i: u64) -> Vec<u8> {
    format!("{i:012}").into_bytes()
}

#[test]
fn a_backup_made_while_writes_go_on_holds_a_prefix_with_everything_before_it() {
    let (dir, path) = tmp();
    let w = Store::open(
        &path,
        Options::default()
            .durability(Durability::None)
            .checkpoint_keys(500),
    )
    .expect("open");
    for i in 0..3_000u64 {
        w.put(format!("k{}", i % 1_000), value(i)).expect("put");
    }
    let acked = AtomicU64::new(3_000);
    let stop = AtomicBool::new(false);
    let copies: Vec<(u64, std::path::PathBuf)> = std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 3_000u64;
            while !stop.load(Ordering::Relaxed) && i < 200_000 {
                w.put(format!("k{}", i % 1_000), value(i)).expect("put");
                i += 1;
                acked.store(i, Ordering::Release);
                if i.is_multiple_of(5_000) {
                    w.compact().expect("compact");
                }
            }
        });
        let mut copies = Vec::new();
        for n in 0..4 {
            let before = acked.load(Ordering::Acquire);
            let dst = dir.path().join(format!("copy{n}.mkv"));
            w.backup(&dst).expect("backup while writing");
            copies.push((before, dst));
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
        copies
    });
    for (before, dst) in copies {
        let c = Store::open(&dst, Options::default()).expect("the copy opens on its own");
        c.verify().expect("the copy verifies");
        assert_eq!(c.len(), 1_000);
        let mut newest = 0;
        for k in 0..1_000u64 {
            let v = c.get(format!("k{k}")).expect("get").expect("every key");
            let n: u64 = std::str::from_utf8(&v).unwrap().parse().unwrap();
            assert_eq!(n % 1_000, k, "a value of another key");
            // Written before the backup started: the copy has it or a newer write.
            let last_before = (before - 1) - ((before - 1 + 1_000 - k) % 1_000);
            assert!(
                n >= last_before,
                "k{k}: copy has write {n}, {last_before} was acknowledged before"
            );
            newest = newest.max(n);
        }
        // A prefix: no key holds a write older than one another key shows was applied
        // after it (writes go round-robin over the keys).
        for k in 0..1_000u64 {
            let v = c.get(format!("k{k}")).expect("get").expect("key");
            let n: u64 = std::str::from_utf8(&v).unwrap().parse().unwrap();
            assert!(
                n + 1_000 > newest,
                "k{k}: write {n} is stale next to write {newest}"
            );
        }
        assert!(
            !std::fs::read_dir(dir.path()).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("mapkv-new")),
            "a temporary file was left behind"
        );
    }
}

#[test]
fn a_backup_never_overwrites_and_works_from_a_reader() {
    let (dir, path) = tmp();
    let w = Store::open(&path, Options::default()).expect("open");
    w.put(b"a", b"1").expect("put");
    w.delete(b"a").expect("delete");
    w.put(b"b", b"2").expect("put");
    let r = Store::open(&path, Options::default().read_only(true)).expect("reader");
    let dst = dir.path().join("copy.mkv");
    r.backup(&dst).expect("backup from a reader");
    assert!(
        w.backup(&dst).is_err(),
        "an existing file is never overwritten"
    );
    let c = Store::open(&dst, Options::default().read_only(true)).expect("open the copy");
    assert_eq!(c.get(b"a").expect("get"), None, "deleted keys stay deleted");
    assert_eq!(c.get(b"b").expect("get").as_deref(), Some(&b"2"[..]));
    assert_eq!(c.len(), 1);
    // The copy is a store of its own: writing it leaves the original alone.
    drop(c);
    let c = Store::open(&dst, Options::default()).expect("open the copy for writing");
    c.put(b"c", b"3").expect("put");
    assert_eq!(w.get(b"c").expect("get"), None);
}
