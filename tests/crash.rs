//! Crash tests, for every durability policy (docs/GUARANTEES.md, "Crash model", items 1
//! and 2):
//!
//! * kill -9: a child process (this test binary, re-executed in the role of
//!   `kill9_child`) writes and reports each acknowledged write on its stdout; the parent
//!   kills it (SIGKILL) at random moments, round after round on the same store, and checks
//!   that the store reopens to exactly the state after every acknowledged write plus at
//!   most the one in flight (batches all or nothing, no torn value, no resurrected key).
//! * power loss: `mapkv::sim` records what each sync made durable, and builds crash images
//!   (durable bytes plus a random subset of the pages written since, some torn, the size
//!   change kept or lost) at random points between calls and *inside* syncs (so between
//!   the steps of checkpoints, index growth, compaction and recovery); each image is
//!   opened normally and must hold a prefix of the writes that includes every write the
//!   policy promised durable.
//!
//! Both loops live in `mapkv::sim` (`KillHarness`, `power_loss_rounds`); `mapkv crashtest`
//! runs the same ones. Seeds are fixed for reproducibility; set `MAPKV_SEED` to try
//! others. Failing images are written next to the store and named in the failure message;
//! set `MAPKV_CRASH_DIR` to a directory to keep them after the run.
//!
//! The tests run one at a time (`common::serial`): a child spawned by one test would hold
//! the locked store file of another.
#![cfg(feature = "sim")]

use std::process::Command;
use std::time::{Duration, Instant};

use mapkv::sim::PageFate;
use mapkv::sim::{self, KillHarness, Workload};
use mapkv::{Durability, Options};

mod common;
use common::serial;

fn base_seed() -> u64 {
    std::env::var("MAPKV_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c4a5)
}

/// Release builds run the full budget; debug builds (plain `cargo test`) a short one.
fn budget(release_secs: f64) -> Duration {
    let secs = if cfg!(debug_assertions) {
        release_secs / 4.0
    } else {
        release_secs
    };
    Duration::from_secs_f64(secs)
}

/// A scratch directory on tmpfs when there is one (syncs are free there; the simulator
/// does not need real syncs), else the default temporary directory; in `MAPKV_CRASH_DIR`
/// if set, and then kept after the run (failing images stay there for inspection).
fn fast_dir() -> tempfile::TempDir {
    if let Ok(d) = std::env::var("MAPKV_CRASH_DIR") {
        let mut d = tempfile::Builder::new()
            .prefix("run")
            .tempdir_in(d)
            .expect("MAPKV_CRASH_DIR");
        d.disable_cleanup(true);
        return d;
    }
    common::shm_tempdir("mapkv-crash")
}

// ------------------------------------------------------------------------------- kill -9

/// The child role of the kill -9 tests; does nothing unless started by one of them.
#[test]
fn kill9_child() {
    match sim::child_writer_from_env() {
        None => {}
        Some(Ok(())) => std::process::exit(0),
        Some(Err(e)) => {
            eprintln!("{e}");
            std::process::exit(3);
        }
    }
}

fn kill9(policy: Durability, secs: f64) {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("temporary directory");
    let seed = base_seed() ^ 0x4b11 ^ sim::policy_name(policy).len() as u64;
    let mut h = KillHarness::new(&dir.path().join("kill.mkv"), policy, seed);
    let exe = std::env::current_exe().expect("test binary path");
    // This test binary, running only `kill9_child`.
    let mut child = || {
        let mut c = Command::new(&exe);
        c.args(["--exact", "kill9_child", "--nocapture", "--test-threads=1"]);
        Ok(c)
    };
    if let Err(e) = h.run(Some(Instant::now() + budget(secs)), 10, &mut child) {
        panic!("{e}");
    }
    println!("kill -9 {policy:?}: {} (seed {seed:#x})", h.summary());
    assert!(h.acked > 0, "no child ever acknowledged a write");
}

/// kill -9 with `Durability::None`: nothing that returned is lost.
#[test]
fn kill9_none() {
    kill9(Durability::None, 2.5);
}

/// kill -9 with `Durability::Async`: nothing that returned is lost.
#[test]
fn kill9_async() {
    kill9(Durability::Async, 2.5);
}

/// kill -9 with `Durability::Periodic` (5 ms, so the flusher is often mid-sync).
#[test]
fn kill9_periodic() {
    kill9(Durability::Periodic(Duration::from_millis(5)), 2.5);
}

/// kill -9 with `Durability::Always`.
#[test]
fn kill9_always() {
    kill9(Durability::Always, 2.5);
}

// ---------------------------------------------------------------------------- power loss

fn power_loss(policy: Durability, secs: f64) {
    let _serial = serial();
    let dir = fast_dir();
    let seed = base_seed() ^ 0x90e5 ^ (sim::policy_name(policy).len() as u64) << 8;
    let start = Instant::now();
    // Three workloads in equal time slices (see `PowerLossConfig::vary`).
    let total = sim::power_loss_rounds(policy, seed, 0, dir.path(), budget(secs));
    assert!(
        total.violations.is_empty(),
        "power loss {policy:?}: {} violations, first: {}",
        total.violations.len(),
        total.violations.join("\n")
    );
    println!(
        "power loss {policy:?}: {} runs, {}, index grew to {} KiB, {:.1} s",
        total.runs,
        total.summary(),
        total.max_index_bytes >> 10,
        start.elapsed().as_secs_f64()
    );
    assert!(
        total.images >= 100,
        "too few images checked: {}",
        total.images
    );
}

/// Power loss with `Durability::None`: writes before the last `flush()` survive.
#[test]
fn power_loss_none() {
    power_loss(Durability::None, 5.0);
}

/// Power loss with `Durability::Async`: writes before the last completed sync survive.
#[test]
fn power_loss_async() {
    power_loss(Durability::Async, 5.0);
}

/// Power loss with `Durability::Periodic`: writes before the last completed sync survive.
#[test]
fn power_loss_periodic() {
    power_loss(Durability::Periodic(Duration::from_millis(3)), 5.0);
}

/// Power loss with `Durability::Always`: every acknowledged write survives.
#[test]
fn power_loss_always() {
    power_loss(Durability::Always, 5.0);
}

/// The simulator itself: a crash image keeps exactly the durable bytes when no page
/// reaches the disk, equals the live file when all do, and tears only changed bytes.
#[test]
fn simulator_builds_images_as_specified() {
    use sim::{Capture, PageFate, SectorFate};
    let durable = vec![1u8; 3 * 4096];
    let mut live = durable.clone();
    live[5000] = 2; // page 1, sector 1
    live.extend_from_slice(&[3u8; 4096]); // page 3: growth
    let c = Capture {
        durable: durable.clone(),
        renamed: None,
        live: live.clone(),
        min_writes: 0,
        max_writes: 1,
        sync_no: 0,
        during: None,
    };
    assert_eq!(c.changed_pages(), vec![1, 3]);
    assert_eq!(c.image(false, false, |_| PageFate::New), {
        let mut d = durable.clone();
        d[5000] = 2;
        d
    });
    assert_eq!(c.image(false, true, |_| PageFate::New), live);
    assert_eq!(c.image(false, false, |_| PageFate::Old), durable);
    let old_but_grown = c.image(false, true, |_| PageFate::Old);
    assert_eq!(&old_but_grown[..3 * 4096], &durable[..]);
    assert!(old_but_grown[3 * 4096..].iter().all(|&b| b == 0));
    // Garbage only in changed bytes.
    let torn = c.image(false, false, |_| {
        PageFate::Torn([SectorFate::Garbage(7); 8])
    });
    for (i, (&a, &b)) in torn.iter().zip(&durable).enumerate() {
        if i != 5000 {
            assert_eq!(a, b, "byte {i} changed though it was not written");
        }
    }
    // Random images stay within the two versions of each byte, or the changed bytes.
    let mut rng = sim::Rng::new(1);
    for _ in 0..200 {
        let img = c.random_image(&mut rng);
        assert!(img.len() == durable.len() || img.len() == live.len());
        for (i, &b) in img.iter().enumerate() {
            if i != 5000 && i < durable.len() {
                assert_eq!(b, durable[i]);
            }
        }
    }
}

/// The reference model: prefix states, matching within a range, rebasing, and what the
/// checks report for a state that is no prefix.
#[test]
fn model_matches_prefixes() {
    use sim::{Model, Write};
    let mut m = Model::new();
    let writes = [
        Write::Put(b"a".to_vec(), b"1".to_vec()),
        Write::Put(b"b".to_vec(), Vec::new()),
        Write::Batch(vec![
            (b"a".to_vec(), None),
            (b"c".to_vec(), Some(b"3".to_vec())),
        ]),
        Write::Delete(b"zz".to_vec()),
        Write::Put(b"a".to_vec(), b"4".to_vec()),
    ];
    for w in &writes {
        m.apply(w);
    }
    let st = |pairs: &[(&str, &str)]| -> sim::State {
        pairs
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect()
    };
    assert_eq!(m.state_at(0), st(&[]));
    assert_eq!(m.state_at(2), st(&[("a", "1"), ("b", "")]));
    assert_eq!(m.state_at(3), st(&[("b", ""), ("c", "3")]));
    assert_eq!(m.current(), &st(&[("a", "4"), ("b", ""), ("c", "3")]));
    // Prefixes 3 and 4 are the same state: the first in range wins.
    assert_eq!(m.match_state(&st(&[("b", ""), ("c", "3")]), 0, 5), Ok(3));
    assert_eq!(m.match_state(&st(&[("b", ""), ("c", "3")]), 4, 5), Ok(4));
    // Outside the allowed range: named as such.
    let e = m.match_state(&st(&[("a", "1")]), 2, 5).unwrap_err();
    assert!(
        e.contains("after write 1, outside the allowed 2..=5"),
        "{e}"
    );
    // Half a batch is no prefix.
    let e = m
        .match_state(&st(&[("b", ""), ("c", "3"), ("a", "1")]), 0, 5)
        .unwrap_err();
    assert!(e.contains("matches no prefix"), "{e}");
    m.rebase(2);
    assert_eq!(m.writes(), 0);
    assert_eq!(m.current(), &st(&[("a", "1"), ("b", "")]));
    // Against a real store.
    let dir = tempfile::tempdir().expect("tempdir");
    let s = mapkv::Store::open(dir.path().join("m.mkv"), mapkv::Options::default()).expect("open");
    let mut m = Model::new();
    for w in &writes {
        w.apply(&s).expect("write");
        m.apply(w);
    }
    assert_eq!(m.check(&s, 0, 5), Ok(5));
    assert!(m.check(&s, 0, 2).is_err());
}

/// Regression: recovery zeroes the torn tail, then writes a CLEAN checkpoint. Both were
/// made durable by one sync, so a power cut during that sync could keep the CLEAN slot
/// but not the zeros: the next open, seeing a clean store, would not zero again, and the
/// stale records past the log end (writes lost in the first crash) could be revived by
/// later appends. Found by the seeded power-loss runs (`MAPKV_SEED=1`); fixed by syncing
/// the zeroed tail before the checkpoint (in recovery).
#[test]
fn recovery_zeroing_is_durable_before_the_clean_checkpoint() {
    let _serial = serial();
    let dir = fast_dir();
    let path = dir.path().join("zero.mkv");
    let img = dir.path().join("zero.img");
    let rec = std::sync::Arc::new(sim::Recorder::new(Durability::None, 1));
    rec.baseline(&path).expect("baseline");
    let opts = Options::default()
        .durability(Durability::None)
        .initial_size(64 << 10);
    // 1. Records over several pages, none synced after the first write's DIRTY mark.
    let store = mapkv::Store::open(&path, rec.observe(opts.clone())).expect("create");
    rec.mark_durable().expect("durable");
    let mut model = sim::Model::new();
    let wl = Workload {
        keyspace: 50,
        fixed_size: Some(100),
        ..Workload::default()
    };
    let mut rng = sim::Rng::new(5);
    for _ in 0..200 {
        let w = wl.next(&mut rng);
        rec.begin_write();
        model.apply(&w);
        w.apply(&store).expect("write");
        rec.ack_write();
    }
    let c = rec.crash_point().expect("crash point");
    drop(store);
    // 2. Power loss: the first log page never reached the disk, the later ones did.
    let first_log_page = c
        .changed_pages()
        .into_iter()
        .find(|&p| p > 0)
        .expect("log pages");
    let boot = c.image(false, true, |p| {
        if p == first_log_page {
            PageFate::Old
        } else {
            PageFate::New
        }
    });
    assert_eq!(
        sim::check_image(&boot, &img, &model, 0, 0),
        Ok(0),
        "nothing survives a lost first page"
    );
    // 3. Recovery of that image, with a crash inside each of its syncs, keeping only the
    //    superblock page (the new checkpoint slot) of what was written since.
    std::fs::write(&path, &boot).expect("boot image");
    rec.baseline(&path).expect("baseline");
    rec.capture_in_syncs(1.0, 16);
    let store = mapkv::Store::open(&path, rec.observe(opts)).expect("recovery");
    drop(store);
    let caps = rec.take_captures();
    assert!(!caps.is_empty(), "recovery reported no sync");
    model.rebase(0);
    for c in &caps {
        let image = c.image(false, false, |p| {
            if p == 0 {
                PageFate::New
            } else {
                PageFate::Old
            }
        });
        if let Err(e) = sim::check_image(&image, &img, &model, 0, 0) {
            panic!(
                "crash during recovery sync #{} ({:?}): {e}",
                c.sync_no, c.during
            );
        }
    }
}

/// Regression (found by the `crash_recovery` fuzz target): a sync in flight while another
/// thread compacts finishes on the *old* file and then raised `durable_end` to the old
/// file's tail, past the new file's end; later `Always` writes to the new file below that
/// offset were acknowledged without any sync. Checked here with a durable-only crash image
/// after every acknowledged write, while a second thread compacts in a loop.
#[test]
fn always_writes_stay_durable_across_concurrent_compaction() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir"); // real syncs: a wider race window
    let imgs = fast_dir();
    let path = dir.path().join("cc.mkv");
    let img = imgs.path().join("cc.img");
    let rec = std::sync::Arc::new(sim::Recorder::new(Durability::Always, 3));
    rec.baseline(&path).expect("baseline");
    let store = std::sync::Arc::new(
        mapkv::Store::open(
            &path,
            rec.observe(Options::default().durability(Durability::Always)),
        )
        .expect("create"),
    );
    rec.mark_durable().expect("durable");
    let mut model = sim::Model::new();
    let mut rng = sim::Rng::new(9);
    let write = |model: &mut sim::Model, rng: &mut sim::Rng, i: u64| {
        let mut v = vec![0u8; 1500];
        rng.fill(&mut v);
        let w = sim::Write::Put(format!("key{}", i % 10).into_bytes(), v);
        rec.begin_write();
        model.apply(&w);
        w.apply(&store).expect("write");
        rec.ack_write();
    };
    // A long log of overwrites, so a compacted file is much shorter than the old one.
    for i in 0..300 {
        write(&mut model, &mut rng, i);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let compactor = {
        let (store, stop) = (std::sync::Arc::clone(&store), std::sync::Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match store.compact() {
                    Ok(()) => n += 1,
                    Err(mapkv::Error::Unsupported(_)) => break,
                    Err(e) => panic!("compact: {e}"),
                }
            }
            n
        })
    };
    let deadline = Instant::now() + budget(2.0);
    let mut i = 300;
    let mut failure = None;
    while Instant::now() < deadline && failure.is_none() {
        for _ in 0..20 {
            write(&mut model, &mut rng, i);
            i += 1;
        }
        // Nothing but what the syncs made durable: every acknowledged write must be there.
        let c = rec.crash_point().expect("crash point");
        let image = c.image(true, false, |_| PageFate::Old);
        let acked = model.writes();
        if let Err(e) = sim::check_image(&image, &img, &model, acked, acked) {
            failure = Some(format!("after {acked} acknowledged Always writes: {e}"));
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let compactions = compactor.join().expect("compactor");
    println!(
        "{} writes, {compactions} concurrent compactions",
        model.writes()
    );
    if let Some(f) = failure {
        panic!("{f}");
    }
    assert!(rec.problems().is_empty(), "{:?}", rec.problems());
}

/// The same race with the `Periodic` flusher as the other party (the shape the fuzzer
/// found): a burst of writes, a compaction while the flusher syncs that burst, a second
/// burst; after a hundred intervals every acknowledged write must be durable, and the
/// store must never report a sync of the old file against the store path.
///
/// Regression (found by the `crash_recovery` fuzz target): a flusher sync that straddled
/// a compaction's rename completed on the old file and was reported (and counted into the
/// durable end) as a sync of the new one. Fixed by the file generation in group commit
/// and by pausing syncs across the file switch.
#[test]
fn periodic_flusher_keeps_syncing_after_a_compaction() {
    let _serial = serial();
    let dir = tempfile::tempdir().expect("tempdir");
    let imgs = fast_dir();
    let path = dir.path().join("pc.mkv");
    let img = imgs.path().join("pc.img");
    let every = Duration::from_millis(1);
    let rec = std::sync::Arc::new(sim::Recorder::new(Durability::Periodic(every), 4));
    rec.baseline(&path).expect("baseline");
    let opts = Options::default().durability(Durability::Periodic(every));
    let store = mapkv::Store::open(&path, rec.observe(opts)).expect("create");
    rec.mark_durable().expect("durable");
    let mut model = sim::Model::new();
    let mut rng = sim::Rng::new(10);
    let mut i = 0u64;
    let mut burst = |model: &mut sim::Model, rng: &mut sim::Rng, n: u64| {
        for _ in 0..n {
            let mut v = vec![0u8; 1500];
            rng.fill(&mut v);
            let w = sim::Write::Put(format!("key{}", i % 10).into_bytes(), v);
            i += 1;
            rec.begin_write();
            model.apply(&w);
            w.apply(&store).expect("write");
            rec.ack_write();
        }
    };
    let deadline = Instant::now() + budget(3.0);
    let mut rounds = 0;
    while Instant::now() < deadline {
        rounds += 1;
        burst(&mut model, &mut rng, 40);
        match store.compact() {
            Ok(()) => {}
            Err(mapkv::Error::Unsupported(_)) => return,
            Err(e) => panic!("compact: {e}"),
        }
        // Small enough to fit the compacted file's slack: no growth, so no forced
        // fdatasync; only the flusher can make these durable.
        burst(&mut model, &mut rng, 2);
        std::thread::sleep(every * 100);
        let c = rec.crash_point().expect("crash point");
        let image = c.image(true, false, |_| PageFate::Old);
        let acked = model.writes();
        if let Err(e) = sim::check_image(&image, &img, &model, acked, acked) {
            panic!(
                "round {rounds}: writes acknowledged 100 flush intervals ago are not durable: {e}"
            );
        }
    }
    assert!(rec.problems().is_empty(), "{:?}", rec.problems());
}
