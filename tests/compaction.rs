//! Compaction: space reclaimed, data intact, crash safety, readers during compaction.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mapkv::{Durability, Error, Options, Store};

fn val(i: u32, round: u32) -> Vec<u8> {
    format!("{i:08}-{round:04}-{}", "v".repeat(186)).into_bytes()
}

fn key(i: u32) -> Vec<u8> {
    format!("key{i:06}").into_bytes()
}

#[test]
fn space_amplification_after_compaction_is_at_most_1_5() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.mkv");
    let s = Store::open(&p, Options::default().durability(Durability::None)).unwrap();
    for round in 0..5 {
        for i in 0..12_000u32 {
            s.put(key(i), val(i, round)).unwrap();
        }
    }
    for i in 0..2_000u32 {
        assert!(s.delete(key(i)).unwrap());
    }
    let before = s.stats();
    assert!(before.dead_bytes > before.live_bytes, "{before:?}");
    s.compact().unwrap();
    let after = s.stats();
    let live_kv: u64 = (2_000..12_000u32)
        .map(|i| (key(i).len() + val(i, 4).len()) as u64)
        .sum();
    let amp = after.file_size as f64 / live_kv as f64;
    assert!(
        amp <= 1.5,
        "file {} for {live_kv} live bytes: {amp:.3}x",
        after.file_size
    );
    assert!(
        after.file_size * 3 < before.file_size,
        "{before:?} -> {after:?}"
    );
    assert_eq!(after.dead_bytes, 0);
    assert_eq!(after.live_keys, 10_000);
    let check = |s: &Store| {
        for i in 0..12_000u32 {
            let want = (i >= 2_000).then(|| val(i, 4));
            assert_eq!(s.get(key(i)).unwrap(), want, "key {i}");
        }
        assert_eq!(s.iter().count(), 10_000);
        s.verify().unwrap();
    };
    check(&s);
    drop(s);
    let s = Store::open(&p, Options::default()).unwrap();
    assert!(s.stats().recovery.was_clean);
    check(&s);
    // Only the store file is left in the directory.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("c.mkv")]);
}

#[test]
fn compacting_an_empty_store_and_one_huge_value() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.mkv");
    let s = Store::open(&p, Options::default()).unwrap();
    s.compact().unwrap();
    assert_eq!(s.len(), 0);
    assert_eq!(s.iter().count(), 0);
    let huge: Vec<u8> = (0..(12 << 20)).map(|i: u32| (i % 251) as u8).collect();
    s.put(b"huge", &huge).unwrap();
    s.put(b"huge", &huge).unwrap();
    s.compact().unwrap();
    assert_eq!(s.get(b"huge").unwrap().as_deref(), Some(&huge[..]));
    assert!(s.stats().file_size < huge.len() as u64 + (1 << 20));
    drop(s);
    let s = Store::open(&p, Options::default()).unwrap();
    assert_eq!(s.get(b"huge").unwrap().as_deref(), Some(&huge[..]));
    s.verify().unwrap();
}

#[test]
fn readers_keep_reading_during_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r.mkv");
    let s = Arc::new(Store::open(&p, Options::default().durability(Durability::None)).unwrap());
    for round in 0..3 {
        for i in 0..5_000u32 {
            s.put(key(i), val(i, round)).unwrap();
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|t| {
            let (s, stop) = (Arc::clone(&s), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    let got = s.get(key(i % 5_000)).unwrap().expect("key present");
                    assert_eq!(got, val(i % 5_000, 2));
                    i += 7;
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut it = s.iter();
    let first = it.next().unwrap().unwrap();
    for _ in 0..3 {
        s.compact().unwrap();
    }
    // An iterator started before compaction finishes on the old mapping.
    let rest: Vec<(Vec<u8>, Vec<u8>)> = it.collect::<Result<_, _>>().unwrap();
    assert_eq!(1 + rest.len(), 5_000);
    assert!(first.0.starts_with(b"key"));
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().unwrap() > 0);
    }
    assert_eq!(s.len(), 5_000);
}

#[test]
fn read_only_store_refuses_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ro.mkv");
    drop(Store::open(&p, Options::default()).unwrap());
    let s = Store::open(&p, Options::default().read_only(true)).unwrap();
    assert!(matches!(s.compact(), Err(Error::ReadOnly)));
}

#[test]
fn auto_compaction_keeps_the_file_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.mkv");
    let opts = Options::default()
        .durability(Durability::None)
        .auto_compact(0.5, 1 << 20);
    let s = Store::open(&p, opts).unwrap();
    for round in 0..40 {
        for i in 0..1_000u32 {
            s.put(key(i), val(i, round)).unwrap();
        }
    }
    // Compaction runs on a thread of its own (writers do not wait for it): wait for it
    // to bring the file back within bounds (it compacts again while the dead share
    // stays above the threshold).
    let bounded = |st: &mapkv::Stats| st.file_size < 4 * st.live_bytes + (2 << 20);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !bounded(&s.stats()) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let st = s.stats();
    assert!(bounded(&st), "{st:?}");
    for i in 0..1_000u32 {
        assert_eq!(s.get(key(i)).unwrap(), Some(val(i, 39)));
    }
}

const CHILD_ENV: &str = "MAPKV_COMPACTION_CHILD";

/// Child role: write rounds of overwrites and compact in between, acknowledging each
/// completed write on stdout as "round".
#[test]
fn kill_during_compaction_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let s = Store::open(&path, Options::default().durability(Durability::None)).unwrap();
    let mut out = std::io::stdout().lock();
    for round in 0u32.. {
        for i in 0..500u32 {
            s.put(key(i), val(i, round)).unwrap();
        }
        writeln!(out, "{round}").unwrap();
        out.flush().unwrap();
        s.compact().unwrap();
        writeln!(out, "c{round}").unwrap();
        out.flush().unwrap();
    }
}

#[test]
fn kill_9_during_compaction_leaves_a_complete_store() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("k.mkv");
    let exe = std::env::current_exe().unwrap();
    let mut kills_during_compaction = 0;
    for attempt in 0..12u64 {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "kill_during_compaction_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &p)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Let it run a varying number of rounds, then kill it at a varying moment.
        let target = 2 + attempt % 4;
        let mut last_round: Option<u32> = None;
        let mut in_compaction = false;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(c) = line.strip_prefix('c') {
                in_compaction = false;
                if c.parse::<u64>().unwrap() >= target {
                    break;
                }
            } else if let Ok(r) = line.parse::<u32>() {
                last_round = Some(r);
                in_compaction = true;
                if u64::from(r) >= target && attempt % 2 == 0 {
                    // Kill during the compaction that follows this round, after a delay.
                    std::thread::sleep(std::time::Duration::from_micros(200 * attempt));
                    break;
                }
            }
        }
        child.kill().unwrap();
        child.wait().unwrap();
        // Acknowledgements the child printed before it died count too.
        for line in lines.map_while(Result::ok) {
            if let Some(c) = line.strip_prefix('c') {
                let _ = c;
                in_compaction = false;
            } else if let Ok(r) = line.parse::<u32>() {
                last_round = Some(r);
                in_compaction = true;
            }
        }
        if in_compaction {
            kills_during_compaction += 1;
        }
        let s = Store::open(&p, Options::default()).unwrap();
        let r = last_round.expect("child acknowledged a round");
        for i in 0..500u32 {
            let got = s.get(key(i)).unwrap().expect("key present");
            // Round r was acknowledged; round r + 1 may be partly applied.
            let g = std::str::from_utf8(&got[9..13])
                .unwrap()
                .parse::<u32>()
                .unwrap();
            assert!(g == r || g == r + 1, "key {i}: round {g}, acknowledged {r}");
            assert_eq!(got, val(i, g));
        }
        s.verify().unwrap();
        drop(s);
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "leftover temporary files were cleaned up");
        std::fs::remove_file(&p).unwrap();
    }
    assert!(kills_during_compaction > 0);
}

/// Compaction copies from a snapshot while writers go on, then catches up with their
/// writes: puts, deletes and batches made during it all land in the compacted store, and
/// writers are not held for the copy (the old protocol let one put through per
/// compaction; the pause is now bounded by the last catch-up round).
#[test]
fn writers_go_on_during_compaction_and_nothing_they_write_is_lost() {
    use std::collections::BTreeMap;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("c.mkv");
    let s = Arc::new(Store::open(&p, Options::default().durability(Durability::None)).unwrap());
    let mut model = BTreeMap::new();
    for round in 0..2 {
        for i in 0..120_000u32 {
            s.put(key(i), val(i, round)).unwrap();
            model.insert(key(i), val(i, round));
        }
    }
    let running = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (s, running, done) = (Arc::clone(&s), Arc::clone(&running), Arc::clone(&done));
        std::thread::spawn(move || {
            let mut model = BTreeMap::new();
            let (mut during, mut i) = (0u64, 0u32);
            while !done.load(Ordering::Acquire) {
                let was_running = running.load(Ordering::Acquire);
                let k = format!("new{i:07}").into_bytes();
                match i % 4 {
                    3 => {
                        // A few hot keys, overwritten again and again while the
                        // compaction catches up.
                        let hot = format!("hot{}", i % 40).into_bytes();
                        let v = vec![b'h'; (i % 97) as usize];
                        s.put(&hot, &v).unwrap();
                        model.insert(hot, Some(v));
                    }
                    0 => {
                        s.put(&k, val(i, 9)).unwrap();
                        model.insert(k, Some(val(i, 9)));
                    }
                    1 => {
                        let old = key(i % 120_000);
                        s.delete(&old).unwrap();
                        model.insert(old, None);
                    }
                    _ => {
                        let mut b = mapkv::Batch::new();
                        b.put(&k, b"batched");
                        b.put(key(i % 120_000), b"overwritten in a batch");
                        s.write(&b).unwrap();
                        model.insert(k, Some(b"batched".to_vec()));
                        model.insert(key(i % 120_000), Some(b"overwritten in a batch".to_vec()));
                    }
                }
                if was_running && running.load(Ordering::Acquire) {
                    during += 1;
                }
                i += 1;
            }
            (model, during)
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(20));
    running.store(true, Ordering::Release);
    s.compact().unwrap();
    running.store(false, Ordering::Release);
    std::thread::sleep(std::time::Duration::from_millis(20));
    done.store(true, Ordering::Release);
    let (changes, during) = writer.join().unwrap();
    for (k, v) in changes {
        match v {
            Some(v) => model.insert(k, v),
            None => model.remove(&k),
        };
    }
    assert!(
        during >= 20,
        "writes completed while compact() ran: {during} (writers must not wait for the copy)"
    );
    let check = |s: &Store, what: &str| {
        assert_eq!(s.len(), model.len(), "{what}: len");
        for (k, v) in &model {
            assert_eq!(s.get(k).unwrap().as_ref(), Some(v), "{what}: {k:?}");
        }
        let mut n = 0;
        for item in s.iter() {
            let (k, v) = item.unwrap();
            assert_eq!(model.get(&k), Some(&v), "{what}: iterated {k:?}");
            n += 1;
        }
        assert_eq!(n, model.len(), "{what}: iteration");
        s.verify().unwrap();
    };
    check(&s, "after compaction");
    // The counters kept through the compaction and its catch-up are the ones a
    // compaction of the now quiet store counts from scratch.
    let kept = s.stats();
    s.compact().unwrap();
    let counted = s.stats();
    assert_eq!(kept.live_keys, counted.live_keys, "live keys");
    assert_eq!(kept.live_bytes, counted.live_bytes, "live bytes");
    let s = Arc::try_unwrap(s).expect("one handle");
    s.close().unwrap();
    let s = Store::open(&p, Options::default()).unwrap();
    check(&s, "after reopen");
}

/// Compaction replaces the store's file: the new one keeps the old one's mode (and its
/// owner, checked when the test can give the file another owner, as root), and a store
/// opened through a symlink is compacted into the symlink's target, so the link still
/// leads to the store (before, the rename replaced the link itself with a plain file and
/// left the target stale).
#[test]
fn compaction_keeps_mode_and_owner_and_works_through_a_symlink() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.mkv");
    let link = dir.path().join("link.mkv");
    drop(Store::open(&real, Options::default()).unwrap());
    std::os::unix::fs::symlink(&real, &link).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).unwrap();
    let root = std::fs::metadata(&real).unwrap().uid() == 0
        && std::os::unix::fs::chown(&real, Some(4242), Some(4343)).is_ok();
    let before = std::fs::metadata(&real).unwrap();
    let s = Store::open(&link, Options::default().durability(Durability::None)).unwrap();
    for round in 0..3 {
        for i in 0..2_000u32 {
            s.put(key(i), val(i, round)).unwrap();
        }
    }
    s.compact().unwrap();
    assert_eq!(s.stats().maintenance.compactions, 1);
    s.put(key(7), val(7, 9)).unwrap();
    s.close().unwrap();
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link was replaced by a file"
    );
    let after = std::fs::metadata(&real).unwrap();
    assert_ne!(
        after.ino(),
        before.ino(),
        "the target file was not compacted"
    );
    assert_eq!(after.mode() & 0o7777, 0o640, "mode not kept");
    assert_eq!(
        (after.uid(), after.gid()),
        (before.uid(), before.gid()),
        "owner"
    );
    if root {
        assert_eq!((after.uid(), after.gid()), (4242, 4343));
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "real.mkv" && n != "link.mkv")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let s = Store::open(&link, Options::default()).unwrap();
    assert_eq!(s.len(), 2_000);
    assert_eq!(s.get(key(7)).unwrap().unwrap(), val(7, 9));
    assert_eq!(s.get(key(8)).unwrap().unwrap(), val(8, 2));
    s.verify().unwrap();
}

/// Closing a store while a compaction copies it: the close succeeds, the compaction
/// either finishes or fails with `Error::Closed` at the switch, nothing of it is left in
/// the directory, and the store reopens with every write.
#[test]
fn close_during_a_compaction_leaves_the_store_whole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("closing.mkv");
    let store = Arc::new(
        Store::open(
            &path,
            Options::default()
                .durability(Durability::None)
                .auto_compact_off(),
        )
        .expect("open"),
    );
    for round in 0..2 {
        for i in 0..150_000u32 {
            store.put(key(i), val(i, round)).expect("put");
        }
    }
    let compactor = {
        let s = Arc::clone(&store);
        std::thread::spawn(move || s.compact())
    };
    std::thread::sleep(std::time::Duration::from_millis(20));
    store.close_shared().expect("close during a compaction");
    match compactor.join().expect("compaction thread") {
        Ok(()) | Err(Error::Closed) => {}
        Err(e) => panic!("the compaction failed otherwise: {e}"),
    }
    drop(store);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n != "closing.mkv")
        .collect();
    assert!(left.is_empty(), "left in the directory: {left:?}");
    let store = Store::open(&path, Options::default()).expect("reopen");
    assert_eq!(store.len(), 150_000);
    for i in (0..150_000u32).step_by(997) {
        assert_eq!(store.get(key(i)).expect("get"), Some(val(i, 1)));
    }
    store.verify().expect("verify");
}

/// Both ways a compaction snapshot starts: with few writes since the last checkpoint
/// (left to the catch-up) and with many (frozen into a checkpoint first). Either way the
/// compacted store holds exactly the newest state, before and after a reopen.
#[test]
fn compaction_keeps_the_newest_state_with_few_or_many_writes_since_the_checkpoint() {
    const N: u32 = 20_000;
    // checkpoint_keys 1000: at most ~1000 writes since a checkpoint, under N/16 (few);
    // 1,000,000: no checkpoint at all, every write in the delta (many).
    for ckpt_keys in [1_000usize, 1_000_000] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.mkv");
        let opts = Options::default()
            .durability(Durability::None)
            .auto_compact_off()
            .checkpoint_keys(ckpt_keys);
        let s = Store::open(&p, opts.clone()).unwrap();
        for i in 0..N {
            s.put(key(i), val(i, 0)).unwrap();
        }
        // The last writes: overwrites, deletes and a key deleted then written again.
        for i in (0..N).step_by(37) {
            s.put(key(i), val(i, 1)).unwrap();
        }
        for i in (5..N).step_by(101) {
            assert!(s.delete(key(i)).unwrap());
        }
        s.put(key(5), val(5, 2)).unwrap();
        let want = |i: u32| -> Option<Vec<u8>> {
            if i == 5 {
                Some(val(5, 2))
            } else if i >= 5 && (i - 5).is_multiple_of(101) {
                None
            } else if i.is_multiple_of(37) {
                Some(val(i, 1))
            } else {
                Some(val(i, 0))
            }
        };
        let check = |s: &Store, when: &str| {
            for i in 0..N {
                assert_eq!(
                    s.get(key(i)).unwrap(),
                    want(i),
                    "checkpoint_keys {ckpt_keys}, {when}: key {i}"
                );
            }
            let live = (0..N).filter(|&i| want(i).is_some()).count();
            assert_eq!(s.len(), live, "checkpoint_keys {ckpt_keys}, {when}");
            assert_eq!(
                s.iter().count(),
                live,
                "checkpoint_keys {ckpt_keys}, {when}"
            );
        };
        let before = s.stats();
        s.compact().unwrap();
        check(&s, "after compact");
        assert_eq!(
            s.stats().dead_bytes,
            0,
            "checkpoint_keys {ckpt_keys}: no dead record copied"
        );
        assert!(
            s.stats().file_size < before.file_size,
            "checkpoint_keys {ckpt_keys}: compaction reclaimed nothing"
        );
        s.close().unwrap();
        let s = Store::open(&p, opts).unwrap();
        check(&s, "after reopen");
        s.close().unwrap();
    }
}

/// The space promise, with default options: 1M keys (16 B keys, 100 B values) written,
/// each overwritten once, the store closed: the file's allocated bytes are at most twice
/// the live keys and values. (A close that gave up a running automatic compaction left
/// 2.57x, and so did a close that came before any compaction had started: the writes'
/// dead share is known only once their old records are looked up.)
#[test]
fn a_million_keys_overwritten_once_take_at_most_twice_their_size_after_close() {
    use std::os::unix::fs::MetadataExt;
    const N: u64 = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("space.mkv");
    let s = Store::open(&p, Options::default()).unwrap();
    let key = |i: u64| format!("{:016x}", i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut value = [0u8; 100];
    for round in 0..2u8 {
        value[0] = round;
        for i in 0..N {
            value[1..9].copy_from_slice(&i.to_le_bytes());
            s.put(key(i), value).unwrap();
        }
    }
    s.close().unwrap();
    let allocated = std::fs::metadata(&p).unwrap().blocks() * 512;
    let live = N * (16 + 100);
    assert!(
        allocated <= 2 * live,
        "{allocated} bytes allocated for {live} bytes of keys and values ({:.2}x)",
        allocated as f64 / live as f64
    );
    let s = Store::open(&p, Options::default().read_only(true)).unwrap();
    assert_eq!(s.len() as u64, N);
    for i in (0..N).step_by(9973) {
        value[0] = 1;
        value[1..9].copy_from_slice(&i.to_le_bytes());
        assert_eq!(
            s.get(key(i)).unwrap().as_deref(),
            Some(&value[..]),
            "key {i}"
        );
    }
}

/// Regression: the index regions a growing store leaves behind are punched (holes, no
/// disk space), yet automatic compaction counted them as dead space. Filling a store with
/// no overwrite at all, right after each index growth the old regions (together about the
/// size of the new index) passed a quarter of the log, and the fill copied the whole
/// store to get rid of holes (at 30M keys, in the middle of the fill).
#[test]
fn a_fill_without_overwrites_starts_no_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fill.mkv");
    // Small records: the index is large beside the log, as it is at any size right
    // after a growth.
    let opts = Options::default()
        .durability(Durability::None)
        .auto_compact(0.25, 1 << 20)
        .checkpoint_keys(20_000);
    let s = Store::open(&p, opts.clone()).unwrap();
    for i in 0..300_000u32 {
        s.put(format!("fill{i:08}"), i.to_le_bytes()).unwrap();
    }
    let st = s.stats();
    assert!(
        st.dead_index_bytes as f64 > 0.25 * st.log_bytes as f64,
        "setup: old index regions {} beside a log of {}",
        st.dead_index_bytes,
        st.log_bytes
    );
    assert!(st.released_index_bytes > 0, "{st:?}");
    assert!(st.dead_ratio() < 0.25, "dead ratio {}", st.dead_ratio());
    assert_eq!(st.maintenance.compactions, 0, "{st:?}");
    assert!(!st.maintenance.compaction_running, "{st:?}");
    s.close().unwrap();
    // Not at close either (a compaction leaves no old region behind), and a reopened
    // store finds its old regions released (holes in the file).
    let s = Store::open(&p, opts).unwrap();
    let st = s.stats();
    assert!(st.dead_index_bytes > 0, "compacted at close: {st:?}");
    // (Measured by the file's holes, less the file system's own blocks that the
    // allocated size counts: an extent tree's, say.)
    assert!(
        st.released_index_bytes as f64 >= 0.9 * st.dead_index_bytes as f64,
        "{st:?}"
    );
    assert!(st.dead_ratio() < 0.25, "dead ratio {}", st.dead_ratio());
    s.put("one more", "x").unwrap();
    s.close().unwrap();
    let s = Store::open(&p, Options::default()).unwrap();
    assert_eq!(s.len(), 300_001);
    s.verify().unwrap();
}
