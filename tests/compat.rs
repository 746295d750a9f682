//! Files written by format version 1 (mapkv 0.1): `tests/fixtures/v1_clean.mkv` (closed
//! cleanly) and `tests/fixtures/v1_dirty.mkv` (its writer stopped without closing) were
//! made by mapkv 0.1. Version 2 reads them as they are, and the first writer upgrades
//! them in place; their data is never misread.

use std::path::{Path, PathBuf};

use mapkv::{Options, Store};

mod common;
use common::tmp;

fn fixture(name: &str, dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let dst = dir.join(name);
    std::fs::copy(&src, &dst).expect("copy the fixture");
    dst
}

fn major(path: &Path) -> u16 {
    let b = std::fs::read(path).expect("read");
    u16::from_le_bytes([b[8], b[9]])
}

/// The state `v1_clean.mkv` was left in.
fn check_clean(s: &Store, extra: usize) {
    assert_eq!(s.len(), 151 + extra);
    for i in 0..200u32 {
        let want = (i >= 50 && i != 100).then(|| format!("value{i}").into_bytes());
        assert_eq!(s.get(format!("key{i:04}")).expect("get"), want, "key{i:04}");
    }
    assert_eq!(s.get("batch-a").expect("get").as_deref(), Some(&b"1"[..]));
    assert_eq!(s.get("batch-b").expect("get").as_deref(), Some(&b""[..]));
}

/// The state `v1_dirty.mkv` recovers to (everything was flushed before the stop).
fn check_dirty(s: &Store, extra: usize) {
    assert_eq!(s.len(), 100 + extra);
    for i in 0..100u32 {
        let want = if i < 20 {
            format!("new{i}")
        } else {
            format!("value{i}")
        };
        assert_eq!(
            s.get(format!("key{i:04}")).expect("get"),
            Some(want.into_bytes())
        );
    }
}

#[test]
fn a_version_1_store_opens_read_only_without_being_changed() {
    let (dir, _) = tmp();
    for (name, check) in [
        ("v1_clean.mkv", check_clean as fn(&Store, usize)),
        ("v1_dirty.mkv", check_dirty),
    ] {
        let path = fixture(name, dir.path());
        let before = std::fs::read(&path).expect("read");
        let s = Store::open(&path, Options::default().read_only(true)).expect("open v1");
        check(&s, 0);
        s.verify().expect("verify");
        drop(s);
        assert_eq!(
            std::fs::read(&path).expect("read"),
            before,
            "{name} changed"
        );
        assert_eq!(major(&path), 1);
    }
}

#[test]
fn a_writer_upgrades_a_version_1_store_in_place() {
    let (dir, _) = tmp();
    for (name, check) in [
        ("v1_clean.mkv", check_clean as fn(&Store, usize)),
        ("v1_dirty.mkv", check_dirty),
    ] {
        let path = fixture(name, dir.path());
        let s = Store::open(&path, Options::default()).expect("open v1 for writing");
        assert_eq!(major(&path), 2, "{name}: header upgraded at open");
        check(&s, 0);
        s.put(b"after-upgrade", b"yes").expect("put");
        s.close().expect("close");
        let s = Store::open(&path, Options::default()).expect("reopen");
        check(&s, 1);
        assert_eq!(
            s.get("after-upgrade").expect("get").as_deref(),
            Some(&b"yes"[..])
        );
        // Growth writes a sealed region after the sparse one of version 1.
        for i in 0..5_000u32 {
            s.put(format!("grow{i}"), b"x").expect("put");
        }
        s.close().expect("close");
        let s = Store::open(&path, Options::default().read_only(true)).expect("reopen");
        check(&s, 5_001);
        assert_eq!(s.get("grow4999").expect("get").as_deref(), Some(&b"x"[..]));
        s.verify().expect("verify after growth");
    }
}
