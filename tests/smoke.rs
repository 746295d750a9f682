//! Smoke test across policies: fill, delete, batch, iterate, verify, reopen; populate.
use mapkv::{Batch, Durability, Options, Store};

#[test]
fn smoke() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.mkv");
    for d in [Durability::None, Durability::Always] {
        let _ = std::fs::remove_file(&p);
        let s = Store::open(&p, Options::default().durability(d)).unwrap();
        for i in 0..50_000u32 {
            s.put(format!("key{i}"), format!("value{i}")).unwrap();
            if d == Durability::Always && i > 300 {
                break;
            }
        }
        let n = s.len();
        assert_eq!(s.get(b"key7").unwrap(), Some(b"value7".to_vec()));
        assert!(s.delete(b"key7").unwrap());
        assert!(!s.delete(b"key7").unwrap());
        assert_eq!(s.get(b"key7").unwrap(), None);
        let mut b = Batch::new();
        b.put(b"a", b"").delete(b"key8");
        s.write(&b).unwrap();
        assert_eq!(s.len(), n - 1);
        assert_eq!(s.iter().count(), n - 1);
        s.verify().unwrap();
        drop(s);
        let s = Store::open(&p, Options::default()).unwrap();
        assert!(s.stats().recovery.was_clean, "{:?}", s.stats());
        assert_eq!(s.len(), n - 1);
        assert_eq!(s.get(b"a").unwrap(), Some(vec![]));
        assert_eq!(s.get(b"key9").unwrap(), Some(b"value9".to_vec()));
        s.verify().unwrap();
        assert_eq!(s.iter().count(), n - 1);
    }
}

#[test]
fn compaction_reclaims_space_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.mkv");
    let s = Store::open(&p, Options::default().durability(Durability::None)).unwrap();
    let val = |i: u32, round: u32| format!("{i:08}-{round}-{}", "x".repeat(190)).into_bytes();
    for round in 0..4 {
        for i in 0..10_000u32 {
            s.put(format!("key{i:06}"), val(i, round)).unwrap();
        }
    }
    for i in 0..1000u32 {
        s.delete(format!("key{i:06}")).unwrap();
    }
    let before = s.stats();
    s.compact().unwrap();
    let after = s.stats();
    let live_kv: u64 = (1000..10_000u32).map(|i| 9 + val(i, 3).len() as u64).sum();
    let amp = after.file_size as f64 / live_kv as f64;
    assert!(
        amp <= 1.5,
        "amplification {amp} before {before:?} after {after:?}"
    );
    assert!(after.file_size < before.file_size);
    assert_eq!(s.len(), 9000);
    for i in 0..10_000u32 {
        let got = s.get(format!("key{i:06}")).unwrap();
        assert_eq!(got, if i < 1000 { None } else { Some(val(i, 3)) });
    }
    s.verify().unwrap();
    s.put(b"after", b"compaction").unwrap();
    drop(s);
    let s = Store::open(&p, Options::default()).unwrap();
    assert_eq!(s.len(), 9001);
    assert_eq!(s.get(b"after").unwrap(), Some(b"compaction".to_vec()));
    assert_eq!(s.get(b"key005000").unwrap(), Some(val(5000, 3)));
    s.verify().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1);
}

#[test]
fn populate_open_and_write() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("p.mkv");
    let s = Store::open(&p, Options::default().populate(true)).unwrap();
    for i in 0..20_000u32 {
        s.put(i.to_le_bytes(), [7u8; 100]).unwrap();
    }
    drop(s);
    let s = Store::open(&p, Options::default().populate(true).read_only(true)).unwrap();
    assert_eq!(s.len(), 20_000);
    assert_eq!(s.get(5u32.to_le_bytes()).unwrap(), Some(vec![7u8; 100]));
}

#[test]
fn leftovers_of_an_interrupted_creation_are_removed_unless_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("l.mkv");
    let orphan = dir.path().join(".l.mkv.mapkv-new.1.abc");
    let busy = dir.path().join(".l.mkv.mapkv-new.2.def");
    std::fs::write(&orphan, b"partial").unwrap();
    std::fs::write(&busy, b"in progress").unwrap();
    let held = std::fs::File::open(&busy).unwrap();
    held.try_lock().unwrap();
    let s = Store::open(&p, Options::default()).unwrap();
    assert!(!orphan.exists(), "an orphaned creation file is cleaned up");
    assert!(
        busy.exists(),
        "a creation in progress (locked) is left alone"
    );
    drop(s);
    drop(held);
}

/// A sync of a clean file still costs a device flush, so `flush()` must not issue one
/// when nothing was written since the last sync.
#[test]
fn flush_with_nothing_dirty_issues_no_sync() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f.mkv");
    let s = Store::open(&p, Options::default().durability(Durability::None)).unwrap();
    s.put(b"k", b"v").unwrap();
    s.flush().unwrap();
    let after_first = s.stats().syncs;
    for _ in 0..5 {
        s.flush().unwrap();
    }
    assert_eq!(
        s.stats().syncs,
        after_first,
        "flush of a clean store synced"
    );
    s.put(b"k2", b"v2").unwrap();
    s.flush().unwrap();
    assert!(
        s.stats().syncs > after_first,
        "flush after a write must sync"
    );
    assert_eq!(s.stats().bytes_at_risk, 0);
}
