//! Damage in the replayed log tail after a crash (docs/GUARANTEES.md, "Crash model",
//! item 3): recovery tells a torn tail from damage by the log's durable end, so a damaged
//! record below it never takes the valid, acknowledged records after it down with it.
//!
//! For every durability policy, after a kill -9 and after simulated power losses, one
//! record at several distances from the end is damaged (a flipped byte, or a zeroed
//! header) and the store is opened:
//! * a record the policy made durable (every write under `Always`, the writes before a
//!   `flush()` under the others) is damage: open returns `Error::Corrupt` naming that
//!   record's offset and leaves the file byte for byte as it was; open with salvage then
//!   keeps every other write (only the damaged key is lost), passes `verify()`, and the
//!   store reopens normally afterwards;
//! * a record past what was durable may be a torn tail: open either refuses the same way
//!   or keeps exactly the writes before it.
#![cfg(feature = "sim")]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mapkv::format::{
    decode_record, decode_static, jump_target, RecordRef, KIND_JUMP, RECORD_HEADER,
};
use mapkv::sim::{Recorder, Rng};
use mapkv::{Durability, Error, Options, Store};

mod common;
use common::serial;

const WRITES: usize = 2000;

fn policies() -> [Durability; 4] {
    [
        Durability::None,
        Durability::Async,
        Durability::Periodic(Duration::from_millis(5)),
        Durability::Always,
    ]
}

fn key(i: usize) -> Vec<u8> {
    format!("key{i:06}").into_bytes()
}

fn value(i: usize) -> Vec<u8> {
    let len = 40 + (i * 7919) % 160;
    (0..len).map(|j| (i * 31 + j) as u8).collect()
}

/// The data records of the log in `b`, in log order.
fn records(b: &[u8]) -> Vec<RecordRef> {
    let info = decode_static(b).expect("valid static header");
    let mut out = Vec::new();
    let mut pos = info.log_start;
    while let Ok(r) = decode_record(b, info.seed, pos, b.len() as u64) {
        if r.kind == KIND_JUMP {
            pos = jump_target(b, &r).expect("jump target");
            continue;
        }
        out.push(r);
        pos = r.end();
    }
    out
}

/// The write index of a record (its key is `key(i)`).
fn write_of(b: &[u8], r: &RecordRef) -> usize {
    let k = &b[r.key_off() as usize..r.val_off() as usize];
    std::str::from_utf8(&k[3..])
        .ok()
        .and_then(|s| s.parse().ok())
        .expect("a key of this test")
}

/// Damages record `r` of `b`: a flipped value byte, or (`zero`) a zeroed header.
fn damage(b: &[u8], r: &RecordRef, zero: bool) -> Vec<u8> {
    let mut d = b.to_vec();
    if zero {
        d[r.offset as usize..r.offset as usize + RECORD_HEADER].fill(0);
    } else {
        d[r.val_off() as usize + 5] ^= 0x10;
    }
    d
}

/// What one damaged file must do; `durable` says the policy made the damaged write
/// durable, `acked` how many writes (0..acked) were acknowledged.
fn check(dir: &Path, bytes: &[u8], r: &RecordRef, hit: usize, durable: bool, acked: usize) {
    let path = dir.join("damaged.mkv");
    let _ = std::fs::remove_file(&path);
    std::fs::write(&path, bytes).expect("write image");
    let what = format!("record of write {hit} at {} (durable: {durable})", r.offset);
    match Store::open(&path, Options::default()) {
        Err(Error::Corrupt {
            offset, what: w, ..
        }) => {
            assert_eq!(
                offset, r.offset,
                "{what}: Corrupt names another offset ({w})"
            );
            assert_eq!(
                std::fs::read(&path).expect("read"),
                bytes,
                "{what}: a refused open changed the file"
            );
        }
        Err(e) => panic!("{what}: open failed with {e}"),
        Ok(s) => {
            assert!(
                !durable,
                "{what}: damage to a durable write was taken for a torn tail: {:?}",
                s.stats().recovery
            );
            // A torn tail: exactly the writes before it.
            for i in 0..acked {
                let got = s.get(key(i)).expect("get");
                if i < hit {
                    assert_eq!(got, Some(value(i)), "{what}: write {i} before the cut lost");
                } else {
                    assert_eq!(got, None, "{what}: write {i} kept past a cut tail");
                }
            }
            return;
        }
    }
    // Salvage keeps everything but the damaged write.
    let s = Store::open(&path, Options::default().salvage(true)).expect("salvage");
    let report = s.stats().recovery;
    // The damaged range was passed, or (nothing valid after it) the log ends there.
    assert!(
        report.damaged.iter().any(|g| g.start == r.offset) || report.truncated_at == Some(r.offset),
        "{what}: salvage report {report:?}"
    );
    for i in 0..acked {
        let got = s.get(key(i)).expect("get after salvage");
        if i == hit {
            assert_eq!(got, None, "{what}: the damaged write read back");
        } else if i < hit || durable {
            assert_eq!(got, Some(value(i)), "{what}: salvage lost write {i}");
        }
    }
    s.verify().expect("verify after salvage");
    s.close().expect("close after salvage");
    let s = Store::open(&path, Options::default()).expect("reopen after salvage");
    assert_eq!(s.get(key(0)).expect("get"), (hit != 0).then(|| value(0)));
    s.verify().expect("verify after reopen");
}

/// The child of the kill -9 test: writes `WRITES` keys under the policy in the
/// environment, flushing after the first half, then says so and waits to be killed.
#[test]
fn damage_kill9_child() {
    let (Some(path), Some(policy)) = (
        std::env::var_os("MAPKV_DAMAGE_CHILD"),
        std::env::var("MAPKV_DAMAGE_POLICY").ok(),
    ) else {
        return;
    };
    let policy = mapkv::sim::parse_policy(&policy).expect("policy");
    let s = Store::open(&path, Options::default().durability(policy)).expect("open");
    for i in 0..WRITES {
        s.put(key(i), value(i)).expect("put");
        if i + 1 == WRITES / 2 {
            s.flush().expect("flush");
        }
    }
    eprintln!("written");
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn damaged_records_after_kill9_under_every_policy() {
    let _g = serial();
    for policy in policies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store.mkv");
        let name = mapkv::sim::policy_name(policy);
        let mut child = common::spawn_test_child(
            "damage_kill9_child",
            &[
                ("MAPKV_DAMAGE_CHILD", path.as_os_str()),
                ("MAPKV_DAMAGE_POLICY", std::ffi::OsStr::new(&name)),
            ],
        );
        loop {
            let line = child
                .lines
                .recv_timeout(Duration::from_secs(120))
                .expect("child writes");
            if line == "written" {
                break;
            }
        }
        child.child.kill().expect("kill -9");
        child.child.wait().expect("reap");
        let bytes = std::fs::read(&path).expect("read store");
        let recs = records(&bytes);
        assert_eq!(
            recs.len(),
            WRITES,
            "{name}: every acknowledged write is in the log"
        );
        for (n, dist) in [1usize, 2, 10, 100, 999, 1000, 1001, 1999]
            .into_iter()
            .enumerate()
        {
            let r = recs[recs.len() - dist];
            let hit = write_of(&bytes, &r);
            let durable = matches!(policy, Durability::Always) || hit < WRITES / 2;
            let d = damage(&bytes, &r, n % 3 == 2);
            check(dir.path(), &d, &r, hit, durable, WRITES);
        }
    }
}

#[test]
fn damaged_records_after_power_loss_under_every_policy() {
    let _g = serial();
    let mut rng = Rng::new(0xda3a);
    for policy in policies() {
        let dir = common::shm_tempdir("mapkv-damage");
        let path = dir.path().join("store.mkv");
        let rec = Arc::new(Recorder::new(policy, 7));
        let s =
            Store::open(&path, rec.observe(Options::default().durability(policy))).expect("open");
        rec.baseline(&path).expect("baseline");
        // Two flushes: everything before the first is durable, and the second wrote the
        // first's durable end to the disk with the superblock page.
        for i in 0..WRITES {
            rec.begin_write();
            s.put(key(i), value(i)).expect("put");
            rec.ack_write();
            if i + 1 == WRITES / 2 || i + 1 == 3 * WRITES / 4 {
                s.flush().expect("flush");
                rec.flushed();
            }
        }
        let cap = rec.crash_point().expect("crash point");
        let min = cap.min_writes as usize;
        assert!(min >= WRITES / 2, "the flushes made writes durable");
        for round in 0..6 {
            let image = cap.random_image(&mut rng);
            let recs = records(&image);
            let Some(last) = recs.len().checked_sub(1) else {
                panic!("image without records")
            };
            // Writes surely durable in this image, and the record the first flush covered
            // last: damage below it must be refused.
            for (n, back) in [0usize, 1, 10, 300, WRITES / 2 - 1].into_iter().enumerate() {
                let idx = (WRITES / 2 - 1 - back).min(last);
                let r = recs[idx];
                let hit = write_of(&image, &r);
                let d = damage(&image, &r, (round + n) % 3 == 0);
                check(dir.path(), &d, &r, hit, hit < WRITES / 2, recs.len());
            }
            // Past the second flush (maybe not durable): refused, or a clean cut.
            let r = recs[last];
            let hit = write_of(&image, &r);
            let d = damage(&image, &r, round % 2 == 0);
            check(dir.path(), &d, &r, hit, false, recs.len());
        }
        drop(s);
    }
}
