//! Bad files (docs/GUARANTEES.md, "Crash model", item 3): truncated, bit-flipped,
//! zero-filled, page-swapped, random files and files of other formats.
//!
//! What is asserted, for every damaged file:
//! * opening never panics, never hangs (a watchdog aborts the run) and never raises a
//!   signal; it returns `Ok` or a typed error: `Error::Corrupt { offset, what }`,
//!   `Error::NotAStore`, `Error::Version`;
//! * with `Options::salvage(true)` a file whose static header is intact opens, loses no
//!   write but those whose records the damage hit (`Model::match_salvaged`), passes
//!   `verify()` and takes new writes;
//! * damage that the O(1) open does not look at (index buckets, checkpointed records) is
//!   found by `Store::verify()`, and `get` of a record with a bad checksum is
//!   `Err(Corrupt)` at that record's offset;
//! * a store that opens without complaint and passes `verify()` holds a prefix state, and
//!   damage below the log's durable end is never cut off as a torn tail: open refuses,
//!   naming it, and changes nothing.
//!
//! And the documented limit: a file truncated behind the store's back while it is open
//! makes the next access to the lost pages raise SIGBUS (tested in a child process).
#![cfg(feature = "sim")]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mapkv::format::{
    checkpoint_off, decode_checkpoint, decode_record, decode_static, jump_target, CheckpointInfo,
    RecordRef, KIND_JUMP, PAGE, SECTOR, SECTOR_CRC_SPAN,
};
use mapkv::sim::{self, Model, Rng, Workload};
use mapkv::{Durability, Error, Options, Store};

mod common;

/// Aborts the process if the guarded section runs longer than its limit ("never hangs").
struct Watchdog(Arc<AtomicBool>);

impl Watchdog {
    fn new(what: &'static str, limit: Duration) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let d = Arc::clone(&done);
        std::thread::spawn(move || {
            let until = std::time::Instant::now() + limit;
            while std::time::Instant::now() < until {
                if d.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("watchdog: {what} still running after {limit:?}: a hang");
            std::process::abort();
        });
        Watchdog(done)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A store built from a known sequence of writes, with an index that grew, a checkpoint
/// and (for `dirty`) a flushed log tail after the checkpoint, as a crash would leave it.
struct Fixture {
    bytes: Vec<u8>,
    model: Model,
    dir: tempfile::TempDir,
}

/// A scratch directory, on tmpfs when there is one (these tests sync a lot).
fn scratch() -> tempfile::TempDir {
    common::shm_tempdir("mapkv-damaged")
}

fn fixture(dirty: bool) -> Fixture {
    let dir = scratch();
    let path = dir.path().join("fixture.mkv");
    let opts = Options::default()
        .durability(Durability::None)
        .initial_size(12 << 10);
    let wl = Workload {
        keyspace: 400,
        large_prob: 0.01,
        ..Workload::default()
    };
    let mut rng = Rng::new(if dirty { 11 } else { 12 });
    let mut model = Model::new();
    let store = Store::open(&path, opts.clone()).expect("create");
    for _ in 0..500 {
        let w = wl.next(&mut rng);
        w.apply(&store).expect("write");
        model.apply(&w);
    }
    store.close().expect("close");
    let store = Store::open(&path, opts).expect("reopen");
    for _ in 0..150 {
        let w = wl.next(&mut rng);
        w.apply(&store).expect("write");
        model.apply(&w);
    }
    store.flush().expect("flush");
    let bytes = if dirty {
        // The file as a crash right now would leave it (a DIRTY checkpoint, a tail).
        let b = std::fs::read(&path).expect("read");
        drop(store);
        b
    } else {
        store.close().expect("close");
        std::fs::read(&path).expect("read")
    };
    Fixture { bytes, model, dir }
}

/// Where things are in a store file.
#[derive(Debug)]
struct Layout {
    seed: u64,
    log_start: u64,
    /// Current checkpoint and its slot index.
    current: (CheckpointInfo, usize),
    /// Data records in log order (jumps excluded).
    records: Vec<RecordRef>,
}

fn layout(b: &[u8]) -> Layout {
    let info = decode_static(b).expect("valid static header");
    let slots: Vec<Option<CheckpointInfo>> = (0..2)
        .map(|i| decode_checkpoint(info.seed, &b[checkpoint_off(i) as usize..]))
        .collect();
    let current = (0..2)
        .filter_map(|i| slots[i].map(|c| (c, i)))
        .max_by_key(|(c, _)| c.seq)
        .expect("a valid checkpoint slot");
    let mut records = Vec::new();
    let mut pos = info.log_start;
    while let Ok(r) = decode_record(b, info.seed, pos, b.len() as u64) {
        if r.kind == KIND_JUMP {
            pos = jump_target(b, &r).expect("jump target");
            continue;
        }
        records.push(r);
        pos = r.end();
    }
    Layout {
        seed: info.seed,
        log_start: info.log_start,
        current,
        records,
    }
}

fn typed(e: &Error) -> bool {
    matches!(
        e,
        Error::Corrupt { .. } | Error::NotAStore { .. } | Error::Version { .. }
    )
}

/// What opening a damaged file did.
#[derive(Debug)]
enum Outcome {
    /// Refused with a typed error.
    Refused(String),
    /// Opened; `verify()` found damage.
    Detected(String),
    /// Opened and verified; the state is this prefix of the writes.
    Prefix(usize),
}

fn write_file(path: &Path, bytes: &[u8]) {
    let _ = std::fs::remove_file(path);
    std::fs::write(path, bytes).expect("write damaged file");
}

/// Opens `bytes` normally and classifies the result; panics on a contract violation.
fn open_damaged(bytes: &[u8], path: &Path, model: &Model, what: &str) -> Outcome {
    write_file(path, bytes);
    let store = match Store::open(path, Options::default().durability(Durability::None)) {
        Err(e) if typed(&e) => return Outcome::Refused(e.to_string()),
        Err(e) => panic!("{what}: open returned an untyped error: {e:?}"),
        Ok(s) => s,
    };
    // Reads must not panic; errors must be typed corruption.
    let read = sim::read_all(&store);
    let verified = store.verify();
    match (read, verified) {
        (_, Err(e)) => {
            assert!(
                e.is_corruption(),
                "{what}: verify returned an untyped error: {e:?}"
            );
            Outcome::Detected(e.to_string())
        }
        (Err(e), Ok(_)) => panic!("{what}: verify() passed but reading failed: {e}"),
        (Ok(state), Ok(_)) => match model.match_state(&state, 0, model.writes()) {
            Ok(p) => Outcome::Prefix(p),
            Err(e) => panic!("{what}: opened and verified, but holds no prefix state: {e}"),
        },
    }
}

/// Keys of the records of the undamaged file `orig` that lie in `ranges`.
fn keys_in(orig: &[u8], ranges: &[std::ops::Range<u64>]) -> BTreeSet<Vec<u8>> {
    layout(orig)
        .records
        .iter()
        .filter(|r| ranges.iter().any(|g| g.contains(&r.offset)))
        .map(|r| orig[r.key_off() as usize..r.val_off() as usize].to_vec())
        .collect()
}

/// Opens `bytes` (the fixture `f` damaged) with salvage: must succeed (static header
/// intact), keep every write but those the damage hit (`Model::match_salvaged`), verify,
/// take writes and reopen without salvage. Returns how many keys the damage hit.
fn salvage(bytes: &[u8], path: &Path, f: &Fixture, what: &str) -> usize {
    write_file(path, bytes);
    let opts = Options::default()
        .durability(Durability::None)
        .salvage(true);
    let store = Store::open(path, opts.clone())
        .unwrap_or_else(|e| panic!("{what}: salvage open failed: {e}"));
    let state =
        sim::read_all(&store).unwrap_or_else(|e| panic!("{what}: salvaged store unreadable: {e}"));
    store
        .verify()
        .unwrap_or_else(|e| panic!("{what}: salvaged store fails verify: {e}"));
    let report = store.stats().recovery;
    let mut lost = report.damaged.clone();
    // Damage that reaches the end of what survives loses everything from there.
    let cut = report
        .truncated_at
        .or((bytes.len() < f.bytes.len()).then_some(bytes.len() as u64));
    if let Some(t) = cut {
        lost.push(t..u64::MAX);
    }
    let hit = keys_in(&f.bytes, &lost);
    f.model
        .match_salvaged(&state, &hit)
        .unwrap_or_else(|e| panic!("{what}: salvaged store lost more than the damage hit: {e}"));
    store
        .put(b"after-salvage", b"1")
        .expect("put after salvage");
    store.close().expect("close after salvage");
    let store = Store::open(path, Options::default())
        .unwrap_or_else(|e| panic!("{what}: reopen after salvage: {e}"));
    assert_eq!(
        store.get(b"after-salvage").expect("get"),
        Some(b"1".to_vec()),
        "{what}"
    );
    hit.len()
}

fn path_in(f: &Fixture) -> PathBuf {
    f.dir.path().join("damaged.mkv")
}

/// Truncation at many lengths, including inside the superblock and every page boundary.
#[test]
fn truncated_files() {
    let _w = Watchdog::new("truncated_files", Duration::from_secs(120));
    for dirty in [false, true] {
        let f = fixture(dirty);
        let path = path_in(&f);
        let len = f.bytes.len();
        // Inside the superblock densely, every sector boundary of the first pages, every
        // page boundary, and random lengths.
        let mut lens: Vec<usize> = (0..=3 * SECTOR as usize + 8).step_by(13).collect();
        for b in (0..=3 * PAGE as usize).step_by(SECTOR as usize) {
            lens.extend([b.saturating_sub(1), b, b + 1]);
        }
        for b in (0..=len).step_by(PAGE as usize) {
            lens.extend([b.saturating_sub(1), b, b + 1]);
        }
        let mut rng = Rng::new(3);
        lens.extend((0..100).map(|_| rng.index(len)));
        lens.retain(|&l| l < len);
        lens.sort_unstable();
        lens.dedup();
        let (mut refused, mut prefix) = (0, 0);
        for &l in &lens {
            let what = format!("truncated to {l} (dirty={dirty})");
            match open_damaged(&f.bytes[..l], &path, &f.model, &what) {
                Outcome::Refused(_) => refused += 1,
                Outcome::Prefix(_) => prefix += 1,
                Outcome::Detected(e) => panic!("{what}: opened, then verify found: {e}"),
            }
            if l == 0 || lens.len() > 600 && l % 3 != 0 {
                // An empty file is a new store, not damage (`empty_file_is_initialized`).
            } else if l >= layout(&f.bytes).log_start as usize {
                salvage(&f.bytes[..l], &path, &f, &what);
            } else {
                write_file(&path, &f.bytes[..l]);
                match Store::open(&path, Options::default().salvage(true)) {
                    Err(e) if typed(&e) => {}
                    other => panic!("{what}: salvage of a file without a log: {other:?}"),
                }
            }
        }
        println!("truncation (dirty={dirty}): {} lengths, {refused} refused, {prefix} opened to a prefix", lens.len());
        assert!(refused > 0 && prefix > 0);
    }
}

/// Regression: salvage of a file cut inside its index region (shorter than its log
/// start) returned `Error::InvalidOption("file offset beyond off_t")` in release builds
/// and panicked ("attempt to subtract with overflow" at recovery's `len - valid_end`) in
/// debug builds. It is now `Error::Corrupt` at the file's end: there is no log to salvage.
#[test]
fn salvage_of_a_file_cut_inside_its_index() {
    let f = fixture(false);
    let path = path_in(&f);
    let log_start = layout(&f.bytes).log_start as usize;
    for l in [SECTOR as usize, 2 * PAGE as usize - 1, log_start - 1] {
        write_file(&path, &f.bytes[..l]);
        for read_only in [false, true] {
            match Store::open(&path, Options::default().salvage(true).read_only(read_only)) {
                Err(Error::Corrupt { offset, .. }) => assert_eq!(offset, l as u64),
                other => panic!("salvage of a file cut at {l}: {other:?}"),
            }
        }
    }
}

/// Regression: a checkpoint used to rewrite index buckets without checking their
/// checksums, so the recovery of a dirty store re-sealed a damaged bucket and `verify()`
/// could no longer see the damage. Now the checkpoint refuses a damaged bucket and
/// rebuilds the index from the log into a new region: the store holds every write,
/// verifies, and the damaged region is no longer the index.
#[test]
fn recovery_checkpoint_rebuilds_a_damaged_bucket() {
    let f = fixture(true);
    let path = path_in(&f);
    let (ckpt, _) = layout(&f.bytes).current;
    for b in 0..ckpt.index_buckets {
        // A flip in the bucket's reserved header bytes: harmless to lookups, but damage.
        let pos = (ckpt.index_off + b * PAGE + 6) as usize;
        let mut bytes = f.bytes.clone();
        bytes[pos] ^= 0x10;
        let what = format!("flip in bucket {b} of a dirty store");
        match open_damaged(&bytes, &path, &f.model, &what) {
            Outcome::Prefix(p) => assert_eq!(p, f.model.writes(), "{what}: writes lost"),
            Outcome::Refused(_) => {}
            Outcome::Detected(e) => panic!("{what}: the recovered store fails verify: {e}"),
        }
        let after = std::fs::read(&path).expect("read");
        let (now, _) = layout(&after).current;
        let healed = now.index_off != ckpt.index_off;
        let still_damaged = !mapkv::format::bucket_crc_ok(&after[pos - 6..pos - 6 + PAGE as usize]);
        assert!(
            healed || still_damaged,
            "{what}: the damaged bucket was re-sealed in place"
        );
    }
}

/// A damaged bucket found by a background checkpoint (the writer goes on meanwhile):
/// the checkpoint fails without poisoning the store, and the writer rebuilds the index
/// from the log. Every write, before and after the damage was found, is kept; the store
/// verifies after reopening, and its index no longer is the damaged region.
#[test]
fn background_checkpoint_rebuilds_a_damaged_bucket() {
    let f = fixture(false);
    let path = path_in(&f);
    let (ckpt, _) = layout(&f.bytes).current;
    let mut bytes = f.bytes.clone();
    // A flip in the reserved header bytes of the last bucket (after its magic): lookups
    // do not notice, the checkpoint's CRC check does.
    let pos = (ckpt.index_off + (ckpt.index_buckets - 1) * PAGE + 10) as usize;
    bytes[pos] ^= 0x10;
    write_file(&path, &bytes);
    let opts = Options::default()
        .durability(Durability::None)
        .checkpoint_keys(64);
    let store = Store::open(&path, opts.clone()).expect("open: the damage is not looked at");
    let mut model = f.model.clone();
    // No single deletes: they look their key up, and a lookup in the damaged bucket
    // reports the damage (`a_damaged_bucket_is_reported_by_lookups`); this test is about
    // the checkpoint that finds it.
    let wl = Workload {
        keyspace: 400,
        delete_prob: 0.0,
        ..Workload::default()
    };
    let mut rng = Rng::new(0xbad);
    // Enough changed keys that checkpoints touch every bucket.
    for _ in 0..3000 {
        let w = wl.next(&mut rng);
        w.apply(&store)
            .expect("writes go on while the index is rebuilt");
        model.apply(&w);
    }
    assert!(store.stats().checkpoints >= 1, "no checkpoint ran");
    store.close().expect("close");
    let after = std::fs::read(&path).expect("read");
    let (now, _) = layout(&after).current;
    assert_ne!(
        now.index_off, ckpt.index_off,
        "the index still is the damaged region"
    );
    let store = Store::open(&path, opts).expect("reopen");
    store.verify().expect("verify after the rebuild");
    let state = sim::read_all(&store).expect("read back");
    model
        .match_state(&state, model.writes(), model.writes())
        .expect("every write is kept");
}

/// A zero-length file is not damage: it is an empty store to create.
#[test]
fn empty_file_is_initialized() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("empty.mkv");
    std::fs::write(&p, b"").expect("write");
    let s = Store::open(&p, Options::default()).expect("open of an empty file");
    assert!(s.is_empty());
    s.put(b"k", b"v").expect("put");
}

/// Bit flips in every region of the file, one at a time.
#[test]
fn bit_flips_in_every_region() {
    let _w = Watchdog::new("bit_flips_in_every_region", Duration::from_secs(180));
    for dirty in [false, true] {
        let f = fixture(dirty);
        let path = path_in(&f);
        let lay = layout(&f.bytes);
        let full = f.model.writes();
        let (ckpt, slot) = lay.current;
        let mut rng = Rng::new(if dirty { 5 } else { 6 });
        let flip = |pos: usize, rng: &mut Rng| {
            let mut b = f.bytes.clone();
            b[pos] ^= 1 << rng.below(8);
            b
        };
        // Static header: every byte it checks. Refused, with or without salvage.
        for pos in (0..SECTOR as usize).step_by(3) {
            let b = flip(pos, &mut rng);
            let what = format!("flip in static header at {pos}");
            match open_damaged(&b, &path, &f.model, &what) {
                Outcome::Refused(_) => {}
                o => panic!("{what}: {o:?}"),
            }
            write_file(&path, &b);
            match Store::open(&path, Options::default().salvage(true)) {
                Err(e) if typed(&e) => {}
                Err(e) => panic!("{what}: salvage: untyped {e:?}"),
                Ok(_) => panic!("{what}: salvage opened a store with a damaged static header"),
            }
        }
        // Checkpoint slots: the current one falls back to the older slot, the older one is
        // unused; either way the full state (or a refusal naming the damage).
        for s in 0..2 {
            for pos in
                (checkpoint_off(s) as usize..(checkpoint_off(s) + SECTOR) as usize).step_by(7)
            {
                let b = flip(pos, &mut rng);
                let what = format!(
                    "flip in checkpoint slot {s} (current {slot}) at {pos} (dirty={dirty})"
                );
                match open_damaged(&b, &path, &f.model, &what) {
                    Outcome::Refused(e) => {
                        assert!(s == slot, "{what}: the unused slot made open fail: {e}")
                    }
                    Outcome::Prefix(p) => assert_eq!(p, full, "{what}: writes lost"),
                    Outcome::Detected(e) => panic!("{what}: verify found {e}"),
                }
            }
        }
        // The rest of the superblock page is unused.
        for _ in 0..20 {
            let pos = 3 * SECTOR as usize + rng.index((PAGE - 3 * SECTOR) as usize);
            let b = flip(pos, &mut rng);
            match open_damaged(&b, &path, &f.model, "flip in unused superblock bytes") {
                Outcome::Prefix(p) => assert_eq!(p, full),
                o => panic!("flip in unused superblock bytes at {pos}: {o:?}"),
            }
        }
        // Index buckets: open does not check them (O(1)); verify must; salvage rebuilds.
        // A dirty store is opened read-only here: a read-write open runs a checkpoint,
        // which rebuilds a damaged index from the log
        // (`recovery_checkpoint_rebuilds_a_damaged_bucket`).
        let idx = ckpt.index_off as usize;
        let idx_len = (ckpt.index_buckets * PAGE) as usize;
        for i in 0..60 {
            let pos = idx + rng.index(idx_len);
            let b = flip(pos, &mut rng);
            let what = format!(
                "flip in index bucket {} at {pos} (dirty={dirty})",
                (pos - idx) / PAGE as usize
            );
            let o = if dirty {
                write_file(&path, &b);
                match Store::open(&path, Options::default().read_only(true)) {
                    // The replay probes the damaged bucket.
                    Err(e) if typed(&e) => Outcome::Refused(e.to_string()),
                    Err(e) => panic!("{what}: untyped error {e:?}"),
                    Ok(s) => match s.verify() {
                        Err(e) if e.is_corruption() => Outcome::Detected(e.to_string()),
                        other => panic!("{what}: verify: {other:?}"),
                    },
                }
            } else {
                open_damaged(&b, &path, &f.model, &what)
            };
            match o {
                Outcome::Detected(_) | Outcome::Refused(_) => {}
                Outcome::Prefix(p) => panic!("{what}: damage not detected (prefix {p})"),
            }
            if i % 4 == 0 {
                assert_eq!(
                    salvage(&b, &path, &f, &what),
                    0,
                    "{what}: salvage lost writes"
                );
            }
        }
        // Records: the whole log of the fixture is durable (a flush, or a clean close),
        // so a flipped record is damage wherever it is, never a torn tail. Before the
        // checkpoint's log_end the O(1) open does not read it and verify finds it; in the
        // replayed tail of a dirty store, open refuses (below the durable end) and
        // changes nothing in the file.
        for i in 0..120 {
            let r = lay.records[rng.index(lay.records.len())];
            let pos = (r.offset + rng.below(r.len())) as usize;
            let b = flip(pos, &mut rng);
            let what = format!(
                "flip in record at {} (byte {pos}, log_end {}, dirty={dirty})",
                r.offset, ckpt.log_end
            );
            match open_damaged(&b, &path, &f.model, &what) {
                Outcome::Detected(_) => assert!(
                    r.offset < ckpt.log_end,
                    "{what}: open missed damage it replayed"
                ),
                Outcome::Refused(e) => {
                    assert!(e.contains("durable end"), "{what}: {e}");
                    assert_eq!(
                        std::fs::read(&path).expect("read"),
                        b,
                        "{what}: a refused open changed the file"
                    );
                }
                Outcome::Prefix(p) => {
                    panic!("{what}: damage below the durable end taken for a torn tail ({p} of {full} writes kept)")
                }
            }
            if i % 4 == 0 {
                salvage(&b, &path, &f, &what);
            }
        }
        println!("bit flips (dirty={dirty}): {} records", lay.records.len());
        let _ = lay.log_start;
        let _ = lay.seed;
    }
}

/// `get` of a record whose checksum fails is `Err(Corrupt)` at that record's offset; other
/// keys read fine; open does not notice (it is O(1)); `verify` does.
#[test]
fn get_reports_a_bad_record_checksum() {
    let f = fixture(false);
    let path = path_in(&f);
    let lay = layout(&f.bytes);
    let cur = f.model.current();
    // The newest record of a key that is live with a value of at least 8 bytes.
    let (key, rec) = lay
        .records
        .iter()
        .rev()
        .find_map(|r| {
            let k = f.bytes[r.key_off() as usize..r.val_off() as usize].to_vec();
            let v = &f.bytes[r.val_off() as usize..r.end() as usize];
            (r.val_len >= 8 && cur.get(&k).is_some_and(|cv| cv == v)).then_some((k, *r))
        })
        .expect("a live record");
    let mut b = f.bytes.clone();
    b[rec.val_off() as usize + 3] ^= 0x40;
    write_file(&path, &b);
    let s = Store::open(&path, Options::default()).expect("open is O(1) and does not read records");
    match s.get(&key) {
        Err(Error::Corrupt { offset, what, .. }) => {
            assert_eq!(offset, rec.offset, "Corrupt names the record ({what})");
        }
        other => panic!("get of a damaged record returned {other:?}"),
    }
    for (k, v) in cur.iter().filter(|(k, _)| **k != key).take(50) {
        assert_eq!(s.get(k).expect("other keys read fine").as_ref(), Some(v));
    }
    match s.verify() {
        Err(Error::Corrupt { offset, .. }) => assert_eq!(offset, rec.offset),
        other => panic!("verify missed the damaged record: {other:?}"),
    }
}

/// Zero-filled files and zeroed pages; swapped pages.
#[test]
fn zeroed_and_swapped_pages() {
    let _w = Watchdog::new("zeroed_and_swapped_pages", Duration::from_secs(120));
    for dirty in [false, true] {
        let f = fixture(dirty);
        let path = path_in(&f);
        let pages = f.bytes.len() / PAGE as usize;
        let p = PAGE as usize;
        let zeros = vec![0u8; f.bytes.len()];
        match open_damaged(&zeros, &path, &f.model, "all zeros") {
            Outcome::Refused(e) => assert!(e.contains("not a mapkv store"), "{e}"),
            o => panic!("all zeros: {o:?}"),
        }
        for page in 0..pages {
            let mut b = f.bytes.clone();
            b[page * p..(page + 1) * p].fill(0);
            let what = format!("page {page} zeroed (dirty={dirty})");
            let o = open_damaged(&b, &path, &f.model, &what);
            if page == 0 {
                assert!(matches!(o, Outcome::Refused(_)), "{what}: {o:?}");
            } else {
                salvage(&b, &path, &f, &what);
            }
        }
        let mut rng = Rng::new(9);
        for _ in 0..60 {
            let (x, y) = (1 + rng.index(pages - 1), 1 + rng.index(pages - 1));
            if x == y || f.bytes[x * p..(x + 1) * p] == f.bytes[y * p..(y + 1) * p] {
                continue;
            }
            let mut b = f.bytes.clone();
            for i in 0..p {
                b.swap(x * p + i, y * p + i);
            }
            let what = format!("pages {x} and {y} swapped (dirty={dirty})");
            let _ = open_damaged(&b, &path, &f.model, &what);
            salvage(&b, &path, &f, &what);
        }
    }
}

/// Random files and files of other formats are refused as such; a newer format version
/// is refused as `Error::Version`.
#[test]
fn random_and_foreign_files() {
    let _w = Watchdog::new("random_and_foreign_files", Duration::from_secs(60));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("foreign");
    let model = Model::new();
    let mut rng = Rng::new(77);
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for len in [1usize, 7, 8, 9, 100, 511, 512, 513, 4096, 12288, 100_000] {
        let mut b = vec![0u8; len];
        rng.fill(&mut b);
        files.push((format!("{len} random bytes"), b));
    }
    files.push((
        "a PNG".into(),
        b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR\0\0\0\x10\0\0\0\x10\x08\x02\0\0\0".to_vec(),
    ));
    files.push((
        "a text file".into(),
        b"hello, world\nthis is not a store\n".repeat(300),
    ));
    files.push(("an SQLite file".into(), {
        let mut b = b"SQLite format 3\0".to_vec();
        b.resize(8192, 0);
        b
    }));
    files.push((
        "an ELF file".into(),
        std::fs::read(std::env::current_exe().expect("exe")).expect("read exe")[..65536].to_vec(),
    ));
    files.push(("mapkv magic, then garbage".into(), {
        let mut b = vec![0u8; 3 * PAGE as usize];
        rng.fill(&mut b);
        b[..8].copy_from_slice(&mapkv::format::MAGIC);
        b
    }));
    files.push(("mapkv magic in a text-mode mangled file".into(), {
        let mut b = sim::sample_store(dir.path(), 20, 1).expect("sample");
        b.splice(6..8, *b"\n");
        b
    }));
    for (what, b) in &files {
        for salvage in [false, true] {
            write_file(&path, b);
            match Store::open(&path, Options::default().salvage(salvage)) {
                Err(Error::NotAStore { offset, .. }) => assert_eq!(offset, 0),
                Err(e @ Error::Corrupt { .. }) => assert!(what.contains("mapkv"), "{what}: {e}"),
                Err(e) => panic!("{what} (salvage={salvage}): unexpected error {e:?}"),
                Ok(_) => panic!("{what} (salvage={salvage}): opened as a store"),
            }
        }
    }
    // A newer format: the same header with the next major, then minor + 1, then a minor
    // version 1 never had; checksums fixed.
    let good = sim::sample_store(dir.path(), 20, 2).expect("sample");
    for (major, minor) in [
        (mapkv::format::VERSION_MAJOR + 1, 0u16),
        (mapkv::format::VERSION_MAJOR_V1, 1),
        (
            mapkv::format::VERSION_MAJOR,
            mapkv::format::VERSION_MINOR + 1,
        ),
        (0, 9),
    ] {
        let mut b = good.clone();
        b[8..10].copy_from_slice(&major.to_le_bytes());
        b[10..12].copy_from_slice(&minor.to_le_bytes());
        let crc = crc32fast::hash(&b[..SECTOR_CRC_SPAN]);
        b[SECTOR_CRC_SPAN..SECTOR as usize].copy_from_slice(&crc.to_le_bytes());
        write_file(&path, &b);
        match Store::open(&path, Options::default()) {
            Err(Error::Version {
                found, supported, ..
            }) => {
                assert_eq!(found, (major, minor));
                assert_eq!(
                    supported,
                    (mapkv::format::VERSION_MAJOR, mapkv::format::VERSION_MINOR)
                );
            }
            other => panic!("version {major}.{minor}: {other:?}"),
        }
    }
    let _ = model;
}

/// Random damage of random stores, checked by `mapkv::sim::damage_round` (the same check
/// `mapkv crashtest` runs): never a panic, only typed errors, salvage verifies.
#[test]
fn random_damage_never_panics() {
    let _w = Watchdog::new("random_damage_never_panics", Duration::from_secs(180));
    let dir = tempfile::tempdir().expect("tempdir");
    let rounds = if cfg!(debug_assertions) { 100 } else { 600 };
    let rep = sim::damage_rounds(dir.path(), &mut Rng::new(0xda4a), |i| i < rounds)
        .expect("sample store");
    println!(
        "random damage: {} files, {} refused, {} opened, {} salvaged, {} detected after open; \
         targeted flips: {} buckets, {} records",
        rep.files,
        rep.refused,
        rep.opened,
        rep.salvaged,
        rep.detected_later,
        rep.bucket_flips,
        rep.record_flips
    );
    assert!(rep.violations.is_empty(), "{}", rep.violations.join("\n"));
    assert!(
        rep.bucket_flips > 0 && rep.record_flips > 0,
        "targeted flips ran and were all reported"
    );
}

const TRUNC_CHILD: &str = "MAPKV_DAMAGED_TRUNC_CHILD";

/// Child role of `truncated_behind_the_stores_back`.
#[test]
fn truncate_child() {
    let Ok(path) = std::env::var(TRUNC_CHILD) else {
        return;
    };
    let s = Store::open(&path, Options::default().durability(Durability::None)).expect("open");
    for i in 0..2000u32 {
        s.put(format!("key{i:05}"), vec![b'v'; 100]).expect("put");
    }
    s.flush().expect("flush");
    // Another program truncates the file in the middle of the log (flock is advisory;
    // this is unsupported).
    let log_end = s.stats().log_end;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open for truncate");
    f.set_len(log_end / 2 / PAGE * PAGE).expect("truncate");
    println!("TRUNCATED");
    // Pages still in the file read fine.
    assert_eq!(s.get(b"key00000").expect("get"), Some(vec![b'v'; 100]));
    println!("READING");
    // key01999 was written last, at the end of the log: this access faults.
    let r = s.get(b"key01999");
    println!("READ-RETURNED {r:?}");
    std::process::exit(0);
}

/// A file truncated behind the store's back while it is open: unsupported. The limit as
/// documented (`Store` docs, README caveats): the next access to a lost page raises SIGBUS
/// and kills the process; the store cannot prevent it (a mapping cannot outlive the file
/// pages it maps). Afterwards the truncated file is refused as damaged, and salvage keeps
/// what is left.
#[test]
fn truncated_behind_the_stores_back() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("victim.mkv");
    let out = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "truncate_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(TRUNC_CHILD, &path)
        .output()
        .expect("spawn child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("READING"),
        "child did not get to the read: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGBUS),
        "documented behaviour: SIGBUS on access to truncated pages; got {:?}, stdout: {stdout}",
        out.status
    );
    assert!(!stdout.contains("READ-RETURNED"));
    // Afterwards the file looks like a torn log: it opens to a prefix of the writes (or
    // is refused as damaged), and salvage keeps a prefix that verifies.
    let prefix_of_writes = |s: &Store| {
        let n = s.len();
        for i in 0..n {
            assert_eq!(
                s.get(format!("key{i:05}")).expect("get"),
                Some(vec![b'v'; 100]),
                "key{i:05}"
            );
        }
        assert_eq!(s.get(format!("key{n:05}")).expect("get"), None);
        n
    };
    match Store::open(&path, Options::default()) {
        Ok(s) => println!(
            "truncated file opened with {} of 2000 keys",
            prefix_of_writes(&s)
        ),
        Err(e) if typed(&e) => println!("truncated file refused: {e}"),
        Err(e) => panic!("open of the truncated file: {e:?}"),
    }
    let s = Store::open(&path, Options::default().salvage(true)).expect("salvage");
    s.verify().expect("salvaged store verifies");
    let n = prefix_of_writes(&s);
    assert!(n > 0 && n < 2000, "salvage kept {n} keys");
}

/// Regression: a flipped byte in a record's key made that key read as missing
/// (`Ok(None)`): the lookup took the mismatch for a hash collision. A mismatching key is
/// a collision only if its record's checksum holds; here it does not.
#[test]
fn a_damaged_key_is_reported_not_read_as_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("key.mkv");
    let s = Store::open(&path, Options::default()).expect("open");
    for i in 0..2_000u32 {
        s.put(format!("some-key-{i:05}"), b"value").expect("put");
    }
    s.close().expect("close");
    let mut bytes = std::fs::read(&path).expect("read");
    let needle = b"some-key-01234";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("the key is in the file");
    bytes[at + 9] ^= 0x01;
    std::fs::write(&path, &bytes).expect("write");
    let s = Store::open(&path, Options::default().read_only(true)).expect("open");
    match s.get("some-key-01234") {
        Err(Error::Corrupt { offset, .. }) => {
            assert!(offset < at as u64 && offset + 64 > at as u64)
        }
        other => panic!("a damaged key read as {other:?}"),
    }
    assert_eq!(
        s.get("some-key-01235").expect("others unharmed").as_deref(),
        Some(&b"value"[..])
    );
}

/// A damaged index bucket is reported by the lookups that probe it (its checksum is
/// verified the first time a lookup probes it), never read as "no such key".
#[test]
fn a_damaged_bucket_is_reported_by_lookups() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bucket.mkv");
    let s = Store::open(&path, Options::default()).expect("open");
    for i in 0..3_000u32 {
        s.put(format!("key-{i}"), b"v").expect("put");
    }
    s.close().expect("close");
    let mut bytes = std::fs::read(&path).expect("read");
    let l = layout(&bytes);
    let (ckpt, _) = l.current;
    // A reserved header byte of every bucket: only the checksum can tell.
    for b in 0..ckpt.index_buckets {
        bytes[(ckpt.index_off + b * PAGE + 10) as usize] ^= 0x40;
    }
    std::fs::write(&path, &bytes).expect("write");
    for read_only in [true, false] {
        let s = Store::open(&path, Options::default().read_only(read_only)).expect("open");
        for i in [0u32, 1, 2_999] {
            match s.get(format!("key-{i}")) {
                Err(Error::Corrupt { what, .. }) => assert!(what.contains("bucket"), "{what}"),
                other => panic!("key-{i} in a damaged bucket read as {other:?}"),
            }
            match s.get(format!("missing-{i}")) {
                Err(Error::Corrupt { .. }) => {}
                other => panic!("a miss in a damaged bucket read as {other:?}"),
            }
        }
    }
}

/// Regression (found by the `open_bytes` fuzz target): a reader trusted the committed
/// end in the file's live area as long as it lay inside the reader's address
/// reservation, and scanned the log up to it; an end past the end of the file made the
/// scan read unbacked pages of the mapping, and the process died of SIGBUS. The file
/// is that fuzz input. Every call must return, with a value or an error.
#[test]
fn a_committed_end_past_the_file_is_an_error_for_a_reader_not_a_signal() {
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reader_committed_past_eof.mkv");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("past_eof.mkv");
    std::fs::copy(&fixture, &path).expect("copy the fixture");
    let store = mapkv::Store::open(&path, mapkv::Options::default().read_only(true))
        .expect("the reader opens: the damage is found when it follows the writer");
    let items: Vec<_> = store.iter().take(10_000).collect();
    assert!(
        items.iter().any(Result::is_err),
        "the committed end past the file must be reported"
    );
    let _ = store.get(b"k1");
    let _ = store.len();
}
