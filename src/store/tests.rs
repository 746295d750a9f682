//! Unit tests of checkpoints against damaged and full buckets.

use super::checkpoint::MAX_LOAD;
use crate::format::{bucket_of, SLOTS_PER_BUCKET};
use crate::format::{LIVE_COMMITTED_OFF, STATE_DIRTY};
use crate::index::key_hash;
use crate::state::IndexGeom;
use parking_lot::Mutex;
use std::path::PathBuf;

use super::*;

/// Keys that all land in bucket 0 of an index of `buckets` buckets.
fn keys_in_bucket_zero(seed: u64, buckets: u64, n: usize) -> Vec<Vec<u8>> {
    (0u64..)
        .map(|i| format!("crowd-{i}").into_bytes())
        .filter(|k| bucket_of(key_hash(seed, k), buckets) == 0)
        .take(n)
        .collect()
}

/// A background checkpoint that finds a bucket full while applying in place (keys
/// crowding one bucket of an index far below its load limit) fails without poisoning
/// the store; the writer then rebuilds the index from the log into a larger region.
/// Nothing is lost, and the store verifies before and after reopening.
/// 300 keys spread out, closed, then reopened with checkpoints of 260 keys and 260 more
/// keys put, all in bucket 0: far below the index's load limit, so the checkpoint the
/// last of them starts applies them in place, and more than a bucket holds. Returns the
/// store, its index size before, and the crowd.
fn crowded_store(path: &std::path::Path) -> (Store, u64, Vec<Vec<u8>>) {
    let opts = Options::default().durability(Durability::None);
    let store = Store::open(path, opts.clone()).expect("open");
    for i in 0..300u32 {
        store.put(i.to_le_bytes(), b"spread").expect("put");
    }
    store.close().expect("close");
    let store = Store::open(path, opts.checkpoint_keys(260)).expect("reopen");
    let before = store.stats().index_bytes;
    let buckets = before / PAGE;
    assert!(
        (560.0) < buckets as f64 * SLOTS_PER_BUCKET as f64 * MAX_LOAD,
        "setup: the index must not need to grow"
    );
    let crowd = keys_in_bucket_zero(store.inner.seed, buckets, 260);
    for k in &crowd {
        store.put(k, b"crowd").expect("put");
    }
    (store, before, crowd)
}

#[test]
fn full_bucket_in_a_background_checkpoint_rebuilds_the_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("crowd.mkv");
    let (store, before, crowd) = crowded_store(&path);
    // The checkpoint started by the last of them fails; a later write reaps it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while store.stats().index_bytes == before && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
        store
            .put(b"nudge", b"x")
            .expect("put after the failed checkpoint");
    }
    let st = store.stats();
    assert!(
        st.index_bytes > before,
        "the index was not rebuilt larger ({} bytes)",
        st.index_bytes
    );
    assert_eq!(store.len(), 561);
    for k in &crowd {
        assert_eq!(store.get(k).expect("get").as_deref(), Some(&b"crowd"[..]));
    }
    store.verify().expect("verify after the rebuild");
    store.close().expect("close");
    let store = Store::open(&path, Options::default()).expect("reopen");
    assert_eq!(store.len(), 561);
    store.verify().expect("verify after reopen");
}

/// Regression: a growth claimed after a checkpoint found a bucket full puts its region
/// (behind a JUMP at the tail) between the frozen delta's end and the writer's, and the
/// writer counted the region's bytes as log a crash would replay. A region of 1 GiB (the
/// index growing past 512 MiB, at about 23M keys) made the writer overdue at once, so
/// its next write waited for the whole growth: a put of 6 s in a 100M-key fill. The
/// replay a crash would make skips the region: the writer counts what it would read.
#[test]
fn a_claimed_index_region_is_not_counted_as_log_to_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("claim.mkv");
    // A crowd in one bucket: the background checkpoint finds it full and asks for
    // growth, which the writer claims at a later write.
    let (store, before, _crowd) = crowded_store(&path);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut n = 0u32;
    loop {
        store.put(format!("after-{n}"), b"x").expect("put");
        n += 1;
        let w = store.inner.writer.lock();
        let claimed = w.job.as_ref().is_some_and(|j| j.plan.grow.is_some());
        if claimed || store.inner.state.read().index.bytes() > before {
            let map = Arc::clone(&store.inner.state.read().map);
            let scanned = crate::log::scan(
                map.published_bytes(),
                store.inner.seed,
                w.ckpt_end,
                w.end,
                |_| {},
            );
            assert!(
                scanned.skipped > 0,
                "setup: no region claimed since the freeze"
            );
            assert_eq!(
                w.replay_bytes(),
                scanned.bytes,
                "replay bytes must be the records a replay reads, not the {} bytes it skips",
                scanned.skipped
            );
            break;
        }
        drop(w);
        assert!(
            std::time::Instant::now() < deadline,
            "the index did not grow"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    store.close().expect("close");
    let store = Store::open(&path, Options::default()).expect("reopen");
    assert_eq!(store.len(), 560 + n as usize);
    store.verify().expect("verify");
}

/// 300 keys `k0..k299`, closed (so they are in the buckets), then reopened with
/// `opts`. Returns the store and its index geometry.
fn indexed_store(path: &std::path::Path, opts: Options) -> (Store, IndexGeom) {
    let store = Store::open(path, Options::default()).expect("open");
    for i in 0..300u32 {
        store
            .put(format!("k{i}"), format!("value {i}"))
            .expect("put");
    }
    store.close().expect("close");
    let store = Store::open(path, opts).expect("reopen");
    let geom = store.inner.state.read().index;
    (store, geom)
}

fn bucket_of_key(store: &Store, geom: IndexGeom, k: &str) -> u64 {
    bucket_of(key_hash(store.inner.seed, k.as_bytes()), geom.buckets)
}

/// Flips a reserved byte of bucket `b` in the file (lookups do not notice; the
/// bucket's checksum does).
/// Damages bucket `b` after lookups verified it (bitrot after the check: lookups trust
/// the bucket until the next checkpoint rewrites or re-checks it; the checkpoint that
/// wants to rewrite it finds the damage).
fn damage_bucket(store: &Store, geom: IndexGeom, b: u64) {
    {
        let st = store.inner.state.read();
        st.checked_mark_for_tests(b);
    }
    let off = geom.bucket_off(b) + 12; // a reserved header byte: the CRC fails, the magic holds
    let file = Arc::clone(&store.inner.writer.lock().file);
    let mut byte = [0u8; 1];
    let map = Arc::clone(&store.inner.state.read().map);
    byte[0] = map.read(off, 1).expect("bucket byte")[0] ^ 0x10;
    file.write_at(&byte, off).expect("damage");
}

fn wait_for_job(store: &Store) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        let w = store.inner.writer.lock();
        if w.job.as_ref().is_none_or(|j| j.thread.is_finished()) {
            return;
        }
        drop(w);
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    panic!("the background checkpoint did not finish");
}

/// Regression: a checkpoint on the writer's thread (here: at close) that found a
/// bucket full after rewriting earlier buckets in place went on to grow the index
/// from those half-updated buckets, where the deleted keys' slots were already gone:
/// their old records were never taken out of the counters, and the CLEAN slot
/// recorded too many live keys.
#[test]
fn a_full_bucket_at_close_keeps_the_counts_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("full-at-close.mkv");
    let (store, geom) = indexed_store(&path, Options::default());
    let last = geom.buckets - 1;
    assert!(
        (560.0) < geom.buckets as f64 * SLOTS_PER_BUCKET as f64 * MAX_LOAD,
        "setup: the index must not need to grow"
    );
    let early: Vec<String> = (0..300)
        .map(|i| format!("k{i}"))
        .filter(|k| bucket_of_key(&store, geom, k) < last)
        .take(20)
        .collect();
    for k in &early {
        assert!(store.delete(k).expect("delete"));
    }
    let crowd: Vec<Vec<u8>> = (0u64..)
        .map(|i| format!("crowd-{i}").into_bytes())
        .filter(|k| bucket_of(key_hash(store.inner.seed, k), geom.buckets) == last)
        .take(260)
        .collect();
    for k in &crowd {
        store.put(k, b"crowd").expect("put");
    }
    store.close().expect("close");
    let store = Store::open(&path, Options::default()).expect("reopen");
    assert_eq!(
        store.len(),
        540,
        "live keys recorded by the closing checkpoint"
    );
    store.verify().expect("verify after reopen");
}

/// A crash image taken by [`bucket_run_written`] after `.0` more bucket runs made on
/// thread `.3` (the test's own, whose checkpoint runs on it: the checkpoints of tests
/// running in parallel do not count): the file `.1` is copied to `.2` (through the page
/// cache, as a process killed then would leave it).
type CrashAt = (usize, PathBuf, PathBuf, std::thread::ThreadId);
/// Held by each test that arms [`CRASH_AFTER_RUNS`] for its whole run: there is one
/// hook, and a test running beside another would overwrite its arming.
static CRASH_TESTS: Mutex<()> = Mutex::new(());
static CRASH_AFTER_RUNS: Mutex<Option<CrashAt>> = Mutex::new(None);

/// Called by checkpoints after each run of buckets they write (unit tests only).
pub(super) fn bucket_run_written() {
    let mut at = CRASH_AFTER_RUNS.lock();
    if let Some((left, from, to, _)) = at.as_mut().filter(|a| a.3 == std::thread::current().id()) {
        *left -= 1;
        if *left == 0 {
            std::fs::copy(&*from, &*to).expect("copy the crash image");
            *at = None;
        }
    }
}

/// Stores (their `Inner`'s address) whose background checkpoints wait before they
/// start, until the test takes them out of the list (unit tests only).
static STALLED_CHECKPOINTS: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// A store listed in one of the lists of stores that tests treat specially (stalled
/// checkpoints or compactions, forced counter resolution) until dropped, however the
/// test ends: another test's store may get the same address.
struct Listed(&'static Mutex<Vec<usize>>, usize);

impl Listed {
    fn new(list: &'static Mutex<Vec<usize>>, store: usize) -> Listed {
        list.lock().push(store);
        Listed(list, store)
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.0.lock().retain(|&a| a != self.1);
    }
}

/// Stores whose writes ask for counter resolution whenever the backlog is large enough,
/// whether or not it could make compaction due (see `Inner::backlog_may_matter`): for
/// tests of resolution itself in stores far below automatic compaction's minimum size.
static RESOLVING_ALWAYS: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// True if `inner` is listed in `RESOLVING_ALWAYS` (unit tests only).
pub(super) fn resolution_forced(inner: &Inner) -> bool {
    RESOLVING_ALWAYS
        .lock()
        .contains(&(std::ptr::from_ref(inner) as usize))
}

/// Stores whose background checkpoint jobs panic as they start (unit tests only).
static PANICKING_CHECKPOINTS: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// Called by a background checkpoint job before it starts (unit tests only).
pub(super) fn checkpoint_may_run(inner: &Inner) {
    let me = std::ptr::from_ref(inner) as usize;
    assert!(
        !PANICKING_CHECKPOINTS.lock().contains(&me),
        "a checkpoint job panics (test)"
    );
    while STALLED_CHECKPOINTS.lock().contains(&me) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Stores whose background checkpoints stop once they have settled their frozen
/// delta's counters, with whether it is a growth's (unit tests only); and those that
/// got there.
static STALLED_SETTLED: Mutex<Vec<(usize, bool)>> = Mutex::new(Vec::new());
static SETTLED_REACHED: Mutex<Vec<(usize, bool)>> = Mutex::new(Vec::new());

/// Called by a checkpoint between settling its frozen delta's counters and writing
/// buckets (in place, or the new region of a `growth`) (unit tests only).
pub(super) fn settled_may_go_on(inner: &Inner, growth: bool) {
    let me = (std::ptr::from_ref(inner) as usize, growth);
    if STALLED_SETTLED.lock().contains(&me) {
        SETTLED_REACHED.lock().push(me);
    }
    while STALLED_SETTLED.lock().contains(&me) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// `len()` and `stats()` do not wait for a checkpoint that is writing buckets, in place
/// or a growth's new region: once the checkpoint has looked up what its keys replaced,
/// the counters are exact without it. (They waited for the whole checkpoint: seconds
/// at 10M keys.)
fn counters_do_not_wait_for_a_checkpoint_writing_buckets(growth: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options::default()
        .durability(Durability::None)
        .checkpoint_keys(1_000)
        .auto_compact_off();
    let store = Store::open(dir.path().join("counters.mkv"), opts).expect("open");
    let base = 3_000u32;
    for i in 0..base {
        store.put(i.to_le_bytes(), [1u8; 20]).expect("put");
    }
    store
        .inner
        .finish_job(&mut store.inner.writer.lock())
        .expect("checkpoint");
    let before = store.stats();
    assert_eq!(before.live_keys, u64::from(base));
    let buckets = before.index_bytes / crate::format::BUCKET_SIZE as u64;
    let room = super::checkpoint::max_keys_for(buckets).saturating_sub(u64::from(base));
    let me = (std::ptr::from_ref(&*store.inner) as usize, growth);
    let unstall = StalledSettled(me);
    STALLED_SETTLED.lock().push(me);
    // Overwrites of keys the buckets hold (the writes defer those lookups; each makes
    // one record of the same size dead) and new keys (for a growth, new keys first,
    // more than the index has room for), until a checkpoint of the kind asked for stops
    // after settling.
    let new_first = u64::from(if growth { room as u32 + 1_000 } else { 0 });
    let (mut overwritten, mut added) = (0u64, 0u64);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !SETTLED_REACHED.lock().contains(&me) {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint of that kind started"
        );
        if added < new_first {
            store
                .put((base + added as u32).to_le_bytes(), [2u8; 20])
                .expect("put");
            added += 1;
        } else {
            // (Writes go on: a job that finds a bucket full hands over to a growth job
            // when the writer next looks. Slowly once a checkpoint is due, so that the
            // writer never reaches the delta's hard limit, which would make it wait
            // for the stalled job.)
            store
                .put((overwritten as u32 % base).to_le_bytes(), [2u8; 20])
                .expect("put");
            overwritten += 1;
            if overwritten > 1_000 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
    let expect = u64::from(base) + added;
    // Every record here has the same size.
    let record = before.live_bytes / u64::from(base);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let n = store.len();
            let st = store.stats();
            tx.send((n, st)).expect("send");
        });
        // Not a timing assertion: without the fix this call waits until the checkpoint
        // is let go, which happens only after this wait ends.
        let got = rx.recv_timeout(std::time::Duration::from_secs(30));
        drop(unstall);
        let (n, st) = got.expect("len() and stats() waited for the checkpoint");
        assert_eq!(n as u64, expect);
        assert_eq!(st.live_keys, expect);
        assert!(st.maintenance.checkpoint_running, "{:?}", st.maintenance);
        // Every overwrite made the record it replaced dead (and a growth's jump over
        // its region counts as dead).
        let jump = if growth { crate::format::JUMP_LEN } else { 0 };
        assert_eq!(
            st.dead_bytes,
            before.dead_bytes + overwritten * record + jump
        );
        assert_eq!(st.live_bytes, expect * record);
    });
    store
        .inner
        .finish_job(&mut store.inner.writer.lock())
        .expect("checkpoint");
    let after = store.stats();
    assert_eq!(after.live_keys, expect);
    assert_eq!(after.index_bytes > before.index_bytes, growth);
    store.close().expect("close");
    let store = Store::open(dir.path().join("counters.mkv"), Options::default()).expect("open");
    assert_eq!(store.len() as u64, expect);
}

/// Takes a stalled checkpoint off [`STALLED_SETTLED`] (and [`SETTLED_REACHED`]) however
/// the test ends.
struct StalledSettled((usize, bool));

impl Drop for StalledSettled {
    fn drop(&mut self) {
        STALLED_SETTLED.lock().retain(|&a| a != self.0);
        SETTLED_REACHED.lock().retain(|&a| a != self.0);
    }
}

#[test]
fn counters_do_not_wait_for_a_checkpoint_rewriting_buckets() {
    counters_do_not_wait_for_a_checkpoint_writing_buckets(false);
}

#[test]
fn counters_do_not_wait_for_a_growth_writing_its_region() {
    counters_do_not_wait_for_a_checkpoint_writing_buckets(true);
}

/// Whether a writer could have taken the state lock when `Store::stats` made its system
/// calls, per store that asked (unit tests only).
static STATS_LOCK_FREE: Mutex<Vec<(usize, Option<bool>)>> = Mutex::new(Vec::new());

/// Called by `Store::stats` before its system calls (`mincore` over the mapping, which
/// takes tens of milliseconds at gigabytes) (unit tests only).
pub(super) fn stats_system_calls(inner: &Inner) {
    let me = std::ptr::from_ref(inner) as usize;
    let mut seen = STATS_LOCK_FREE.lock();
    if let Some(e) = seen.iter_mut().find(|e| e.0 == me) {
        e.1 = Some(inner.state.try_write().is_some());
    }
}

/// `stats()` makes its slow system calls without holding the state lock, which would
/// keep writers waiting (50 ms of `mincore` at 10M keys).
#[test]
fn stats_makes_its_system_calls_without_the_state_lock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path().join("stats.mkv"), Options::default()).expect("open");
    store.put(b"k", b"v").expect("put");
    let me = std::ptr::from_ref(&*store.inner) as usize;
    STATS_LOCK_FREE.lock().push((me, None));
    let st = store.stats();
    let seen = STATS_LOCK_FREE
        .lock()
        .iter()
        .find(|e| e.0 == me)
        .and_then(|e| e.1);
    STATS_LOCK_FREE.lock().retain(|e| e.0 != me);
    assert_eq!(seen, Some(true), "the state lock was held");
    assert!(st.resident_pages > 0);
    store.close().expect("close");
}

/// Stores whose background thread stops at the top of its loop (unit tests only).
static STALLED_BACKGROUND: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// Called by the background thread before it looks for work (unit tests only).
pub(super) fn background_may_run(inner: &Inner) {
    let me = std::ptr::from_ref(inner) as usize;
    while STALLED_BACKGROUND.lock().contains(&me) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// `Periodic`'s sync is part of the background thread's urgent work, which it does
/// between the pieces of longer work (counter resolution during a long overwrite went
/// on for seconds, and the syncs due meanwhile waited: gaps of 1-2 s between syncs at
/// an interval of 50 ms).
#[test]
fn an_overdue_periodic_sync_is_urgent_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let every = std::time::Duration::from_millis(1);
    let opts = Options::default().durability(Durability::Periodic(every));
    let store = Store::open(dir.path().join("periodic.mkv"), opts).expect("open");
    let me = std::ptr::from_ref(&*store.inner) as usize;
    let stall = Listed::new(&STALLED_BACKGROUND, me);
    // Let a sync in flight end, and the thread reach its stall.
    std::thread::sleep(std::time::Duration::from_millis(50));
    store.put(b"k", b"v").expect("put");
    // (The rest of the urgent work first: an allocation asked for makes a sync of its
    // own.)
    store.inner.urgent_work();
    store.put(b"k2", b"v").expect("put");
    std::thread::sleep(every * 5);
    let syncs = store.stats().syncs;
    assert!(store.stats().bytes_at_risk > 0);
    store.inner.urgent_work();
    let st = store.stats();
    assert_eq!(st.bytes_at_risk, 0, "{st:?}");
    assert_eq!(st.syncs, syncs + 1);
    drop(stall);
    store.close().expect("close");
}

/// Under `Periodic`, a writer that finds the flusher a whole interval late (checked
/// every `WRITEBACK_STEP` of appends) makes its write durable itself: what a power loss
/// can take stays bounded when the disk cannot keep up (here, a background thread that
/// does nothing at all).
#[test]
fn a_periodic_writer_syncs_when_the_flusher_falls_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let every = std::time::Duration::from_millis(1);
    let opts = Options::default().durability(Durability::Periodic(every));
    let store = Store::open(dir.path().join("behind.mkv"), opts).expect("open");
    let me = std::ptr::from_ref(&*store.inner) as usize;
    let stall = Listed::new(&STALLED_BACKGROUND, me);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let syncs = store.stats().syncs;
    let value = vec![7u8; 4_000];
    let total = 4 * super::background::WRITEBACK_STEP;
    let mut i = 0u32;
    while u64::from(i) * 4_000 < total {
        store.put(i.to_le_bytes(), &value).expect("put");
        i += 1;
    }
    let st = store.stats();
    assert!(
        st.syncs >= syncs + 2,
        "{} syncs, {} before",
        st.syncs,
        syncs
    );
    assert!(
        st.bytes_at_risk < 2 * super::background::WRITEBACK_STEP,
        "{st:?}"
    );
    drop(stall);
    store.close().expect("close");
}

/// A checkpoint job that panics (an internal bug) leaves no "job running" mark behind:
/// `stats()` would wait 250 ms for it at every call (found by a review).
#[test]
fn a_panicked_checkpoint_job_is_not_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options::default()
        .durability(Durability::None)
        .checkpoint_keys(64);
    let store = Store::open(dir.path().join("panic.mkv"), opts).expect("open");
    let me = std::ptr::from_ref(&*store.inner) as usize;
    let panics = Listed::new(&PANICKING_CHECKPOINTS, me);
    for i in 0..100u32 {
        store.put(i.to_le_bytes(), b"v").expect("put");
    }
    // The job ran (and panicked) or runs; collecting it repairs the store.
    let _ = store.inner.finish_job(&mut store.inner.writer.lock());
    drop(panics);
    assert!(!store.inner.job_running.load(Ordering::Acquire));
    assert_eq!(store.len(), 100);
    store.close().expect("close");
}

/// A writer that reaches the delta's hard limit (four times `checkpoint_keys`) while a
/// checkpoint runs waits for it, and `Stats` counts the wait.
#[test]
fn a_write_that_waits_for_a_checkpoint_is_counted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options::default()
        .durability(Durability::None)
        .checkpoint_keys(64);
    let store = Store::open(dir.path().join("wait.mkv"), opts).expect("open");
    let me = std::ptr::from_ref(&*store.inner) as usize;
    let unstall = Listed::new(&STALLED_CHECKPOINTS, me);
    assert_eq!(store.stats().maintenance.checkpoint_waits, 0);
    let done = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            for i in 0..400u32 {
                store.put(i.to_le_bytes(), b"v").expect("put");
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
        // The first checkpoint starts at 64 keys and stalls; the writes after it go into
        // a new delta, and the one that makes it 4 x 64 keys waits. Wait until the
        // writer stops there for 100 ms (a stop before it is a preemption: wait on).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut last = (0, std::time::Instant::now());
        loop {
            let n = done.load(Ordering::Relaxed);
            if n != last.0 {
                last = (n, std::time::Instant::now());
            } else if n >= 64 + 4 * 64 - 1
                && last.1.elapsed() > std::time::Duration::from_millis(100)
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the writer never stopped"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(
            (64 + 4 * 64 - 1..400).contains(&last.0),
            "the writer stopped after {} writes, not at the hard limit",
            last.0
        );
        drop(unstall);
        writer.join().expect("writer");
    });
    let m = store.stats().maintenance;
    assert_eq!(m.checkpoint_waits, 1, "{m:?}");
    assert!(
        m.longest_checkpoint_wait >= std::time::Duration::from_millis(100),
        "{m:?}"
    );
    assert_eq!(store.len(), 400);
    store.close().expect("close");
}

/// Regression: after a compaction's switch the writer went on with the delta the
/// compaction built from empty, and allocated its tables up to 1 MiB itself (a `brk`
/// on the writer's thread at every switch). That delta is now prepared for a
/// checkpoint's keys (at most the store's), on the compaction's thread.
#[test]
fn after_a_compaction_the_writes_go_into_a_prepared_delta() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options::default()
        .durability(Durability::None)
        .checkpoint_keys(5000)
        .auto_compact_off();
    let store = Store::open(dir.path().join("compacted.mkv"), opts).expect("open");
    for i in 0..20_000u32 {
        store.put(i.to_le_bytes(), b"value").expect("put");
    }
    for i in 0..20_000u32 {
        store.put(i.to_le_bytes(), b"again").expect("put");
    }
    store.compact().expect("compact");
    let slots = store.inner.state.read().delta.table_slots();
    assert!(slots >= 5000 * 10 / 7, "{slots} slots after the switch");
    assert_eq!(
        store.get(7u32.to_le_bytes()).expect("get").as_deref(),
        Some(&b"again"[..])
    );
    store.close().expect("close");
}

/// After a checkpoint freezes the delta, the writes go on into one the background
/// thread prepared (see `Delta::prepared`), whose table the writer does not allocate.
#[test]
fn the_writes_after_a_freeze_go_into_a_delta_the_background_thread_prepared() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options::default()
        .durability(Durability::None)
        .checkpoint_keys(1000);
    let store = Store::open(dir.path().join("next.mkv"), opts).expect("open");
    let n = std::cell::Cell::new(0u32);
    let put = |store: &Store| {
        store.put(n.get().to_le_bytes(), b"v").expect("put");
        n.set(n.get() + 1);
    };
    // The first freeze starts from an empty delta and asks for the next one.
    while store.inner.checkpoints.load(Ordering::Relaxed) == 0 {
        put(&store);
        assert!(n.get() < 100_000, "no checkpoint");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while store.inner.background.lock().next_delta.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no delta was prepared"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let taken = store.inner.next_deltas_taken.load(Ordering::Relaxed);
    let writes = n.get();
    while store.inner.next_deltas_taken.load(Ordering::Relaxed) == taken {
        put(&store);
        assert!(
            n.get() < writes + 100_000,
            "the next freeze did not take it"
        );
    }
    // The prepared table holds a checkpoint's keys without growing.
    let slots = store.inner.state.read().delta.table_slots();
    assert!(slots >= 1000 * 10 / 7, "{slots} slots");
    for _ in 0..900 {
        put(&store);
    }
    assert_eq!(store.len(), n.get() as usize);
    for i in 0..n.get() {
        assert_eq!(
            store.get(i.to_le_bytes()).expect("get").as_deref(),
            Some(&b"v"[..])
        );
    }
    store.close().expect("close");
}

/// Minor page faults of this thread so far (`/proc/thread-self/stat`, field 10).
fn thread_minor_faults() -> i64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("stat");
    // After the command name, which ends with the last ')'.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    rest.split(' ')
        .nth(7)
        .expect("minflt")
        .parse()
        .expect("a number")
}

/// Regression: a sync writes the pages prefaulted ahead of the tail (dirty zeros) and
/// write-protects them; the writer then took a fault of its own on each (a put waited
/// 249 ms in `ext4_page_mkwrite` at 30M keys). After a sync the writer has the pages it
/// will soon reach prefaulted again.
#[test]
fn the_pages_ahead_of_the_tail_are_prefaulted_again_after_a_sync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options::default()
        .durability(Durability::None)
        .checkpoint_keys(1 << 20)
        .auto_compact_off()
        // Allocated far ahead: the window ahead of the tail is never cut short by
        // the file's end.
        .initial_size(64 << 20);
    let store = Store::open(dir.path().join("wp.mkv"), opts).expect("open");
    // Values of 8 KiB, so that few keys are written: the delta's table (4,096 slots from
    // 1,434 keys on) stays under half full, where it would write a page of its next
    // table per insert (faults of their own).
    let value = vec![7u8; 8 << 10];
    let mut n = 0u32;
    let mut put = |store: &Store, count: u32| {
        for _ in 0..count {
            store.put(n.to_le_bytes(), &value).expect("put");
            n += 1;
        }
    };
    // 14 MiB of log: the window ahead is prefaulted.
    put(&store, 1800);
    store.flush().expect("flush");
    let done = store.inner.prefaulted_bytes.load(Ordering::Relaxed);
    // The next write sees the sync and asks for the pages ahead again (an eighth of the
    // 14 MiB written since the sync before); wait until they are done: at least 1 MiB
    // more prefaulted, and nothing more asked for or under way for 20 ms.
    put(&store, 1);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut last = (0, std::time::Instant::now());
    loop {
        let now = store.inner.prefaulted_bytes.load(Ordering::Relaxed);
        if now != last.0 || store.inner.background.lock().prefault.is_some() {
            last = (now, std::time::Instant::now());
        } else if now >= done + (1 << 20) && last.1.elapsed() > std::time::Duration::from_millis(20)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing prefaulted again"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // 1 MiB of records into those pages: without the prefault, a fault per page (256).
    let before = thread_minor_faults();
    put(&store, 128);
    let faults = thread_minor_faults() - before;
    assert!(
        faults < 64,
        "{faults} faults writing 256 pages after a sync"
    );
    store.close().expect("close");
}

/// The store `indexed_store` makes, then 60 overwrites, 20 deletes and 40 new keys, and
/// a checkpoint killed after it rewrote `runs` buckets (the image is at `image`).
/// Returns the expected contents and the buckets the checkpoint touched.
fn checkpoint_killed_halfway(
    path: &std::path::Path,
    image: &std::path::Path,
    runs: usize,
) -> (std::collections::BTreeMap<String, String>, u64) {
    let (store, _geom) = indexed_store(
        path,
        Options::default()
            .durability(Durability::None)
            .checkpoint_keys(1 << 20),
    );
    let mut want: std::collections::BTreeMap<String, String> = (0..300)
        .map(|i| (format!("k{i}"), format!("value {i}")))
        .collect();
    for i in 0..60u32 {
        store.put(format!("k{i}"), format!("new {i}")).expect("put");
        want.insert(format!("k{i}"), format!("new {i}"));
    }
    for i in 100..120u32 {
        store.delete(format!("k{i}")).expect("delete");
        want.remove(&format!("k{i}"));
    }
    for i in 300..340u32 {
        store
            .put(format!("k{i}"), format!("added {i}"))
            .expect("put");
        want.insert(format!("k{i}"), format!("added {i}"));
    }
    let touched = {
        let st = store.inner.state.read();
        let mut b: Vec<u64> = st
            .delta
            .iter()
            .map(|e| bucket_of(e.hash, st.index.buckets))
            .collect();
        b.sort_unstable();
        b.dedup();
        b.len() as u64
    };
    assert!(
        touched > runs as u64,
        "setup: the checkpoint must touch more buckets"
    );
    *CRASH_AFTER_RUNS.lock() = Some((
        runs,
        path.to_path_buf(),
        image.to_path_buf(),
        std::thread::current().id(),
    ));
    {
        let mut w = store.inner.writer.lock();
        store
            .inner
            .checkpoint(&mut w, STATE_DIRTY)
            .expect("checkpoint");
    }
    assert!(
        CRASH_AFTER_RUNS.lock().is_none(),
        "the crash image was taken"
    );
    drop(store);
    (want, touched)
}

/// Bounded recovery: a process killed while a checkpoint rewrote buckets in place
/// leaves a CHECKPOINTING slot that announces the checkpoint's end and counters, so
/// the next open replays from the previous checkpoint (as after any kill) instead of
/// rebuilding the whole index, and gets every key and the exact counts.
#[test]
fn a_checkpoint_killed_halfway_is_redone_from_the_log_not_rebuilt() {
    let _one_at_a_time = CRASH_TESTS.lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("halfway.mkv");
    let image = dir.path().join("image.mkv");
    let (want, _) = checkpoint_killed_halfway(&path, &image, 3);
    let store = Store::open(&image, Options::default()).expect("open the crash image");
    let report = store.stats().recovery;
    assert!(report.redid_checkpoint, "{report:?}");
    assert!(!report.rebuilt_index, "{report:?}");
    assert_eq!(store.len(), want.len());
    for i in 0..340u32 {
        let k = format!("k{i}");
        let got = store.get(&k).expect("get");
        assert_eq!(got.as_deref(), want.get(&k).map(|v| v.as_bytes()), "{k}");
    }
    store.verify().expect("verify");
    store.close().expect("close");
    let store = Store::open(&image, Options::default()).expect("reopen");
    assert_eq!(
        store.len(),
        want.len(),
        "counts written by the next checkpoint"
    );
    store.verify().expect("verify after reopen");
}

/// ... but a torn bucket among those it touched (which only a power loss leaves) still
/// means a rebuild, never a lookup in a half-written bucket.
#[test]
fn a_torn_bucket_under_an_interrupted_checkpoint_means_a_rebuild() {
    let _one_at_a_time = CRASH_TESTS.lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("torn.mkv");
    let image = dir.path().join("image.mkv");
    let (want, _) = checkpoint_killed_halfway(&path, &image, 2);
    // Tear the bucket of a key the checkpoint was writing.
    {
        let store = Store::open(&image, Options::default().read_only(true)).expect("open");
        let geom = store.inner.state.read().index;
        let b = bucket_of_key(&store, geom, "k5");
        drop(store);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&image)
            .expect("open image");
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[0xA5; 512], geom.off + b * crate::format::PAGE + 1024)
            .expect("tear");
    }
    let store = Store::open(&image, Options::default()).expect("open the torn image");
    let report = store.stats().recovery;
    assert!(
        report.rebuilt_index && !report.redid_checkpoint,
        "{report:?}"
    );
    assert_eq!(store.len(), want.len());
    for (k, v) in &want {
        assert_eq!(
            store.get(k).expect("get").as_deref(),
            Some(v.as_bytes()),
            "{k}"
        );
    }
    store.verify().expect("verify");
}

/// Regression (found in review): a background checkpoint that failed on a damaged
/// bucket after rewriting earlier buckets left its frozen entries to be resolved
/// against those rewritten buckets, where a deleted key's old slot is gone: `len()`
/// counted deleted keys until the writer collected the failure. Now counter readers
/// collect it first, and the repair (a rebuild from the log) makes them exact.
#[test]
fn counters_stay_exact_when_a_background_checkpoint_fails_halfway() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("halfway.mkv");
    let opts = Options::default()
        .durability(Durability::None)
        .checkpoint_keys(40);
    let (store, geom) = indexed_store(&path, opts.clone());
    assert!(geom.buckets >= 2, "setup: the index needs several buckets");
    let last = geom.buckets - 1;
    damage_bucket(&store, geom, last);
    // 39 deletes of keys in earlier buckets (rewritten first), then one in the
    // damaged bucket: the 40th write freezes the delta.
    let early: Vec<String> = (0..300)
        .map(|i| format!("k{i}"))
        .filter(|k| bucket_of_key(&store, geom, k) < last)
        .take(39)
        .collect();
    let late = (0..300)
        .map(|i| format!("k{i}"))
        .find(|k| bucket_of_key(&store, geom, k) == last)
        .expect("a key in the last bucket");
    for k in early.iter().chain(std::iter::once(&late)) {
        assert!(store.delete(k).expect("delete"));
    }
    wait_for_job(&store);
    assert_eq!(store.len(), 260, "len after the failed checkpoint");
    assert_eq!(store.stats().live_keys, 260);
    for k in early.iter().chain(std::iter::once(&late)) {
        assert_eq!(store.get(k).expect("get"), None, "{k} is deleted");
    }
    store.verify().expect("verify after the repair");
    store.close().expect("close");
    let store = Store::open(&path, opts).expect("reopen");
    assert_eq!(store.len(), 260);
    store.verify().expect("verify after reopen");
}

/// Regression (found in review): when the repair of a failed background checkpoint
/// (a rebuild from the log) met a damaged record, it had already replaced the
/// in-memory index with the log up to the damage: every key written after the
/// damaged record read as missing, and the next checkpoint made that durable. Now the
/// rebuild replays into a scratch state, and a failed one changes nothing.
#[test]
fn a_failed_repair_keeps_every_acknowledged_write_readable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("repair.mkv");
    let opts = Options::default()
        .durability(Durability::None)
        .checkpoint_keys(40);
    let (store, geom) = indexed_store(&path, opts.clone());
    // Damage the value of k10's record (the log scan stops there) and the bucket
    // of the key deleted below (the background checkpoint fails there).
    let rec = {
        let st = store.inner.state.read();
        st.find(key_hash(store.inner.seed, b"k10"), b"k10")
            .expect("find")
            .expect("k10")
    };
    let file = Arc::clone(&store.inner.writer.lock().file);
    file.write_at(b"X", rec.val_off())
        .expect("damage the record");
    let victim = "k20";
    damage_bucket(&store, geom, bucket_of_key(&store, geom, victim));
    assert!(store.delete(victim).expect("delete"));
    for i in 0..39u32 {
        store.put(format!("new{i}"), b"after").expect("put");
    }
    wait_for_job(&store);
    // The repair fails (damaged record); nothing acknowledged may be lost.
    for i in 0..39u32 {
        assert_eq!(
            store.get(format!("new{i}")).expect("get").as_deref(),
            Some(&b"after"[..]),
            "new{i}"
        );
    }
    assert_eq!(store.get(victim).expect("get"), None);
    for i in (0..300u32).filter(|&i| i != 10 && i != 20) {
        let v = store.get(format!("k{i}")).expect("get");
        assert_eq!(v, Some(format!("value {i}").into_bytes()), "k{i}");
    }
    assert!(
        store.get(b"k10").is_err(),
        "k10's damaged record is reported"
    );
    // More writes go on, and see everything too.
    store
        .put(b"later", b"1")
        .expect("put after the failed repair");
    assert_eq!(
        store.get(b"new0").expect("get").as_deref(),
        Some(&b"after"[..])
    );
    assert!(
        store.close().is_err(),
        "close cannot checkpoint a damaged log"
    );
}

/// Dead space from a crash is counted: a process killed while a checkpoint built a
/// larger index region (claimed behind a JUMP) leaves that region unused; the next open
/// replays past the JUMP and counts the region dead, so compaction knows to reclaim it.
#[test]
fn a_growth_killed_halfway_leaves_its_region_counted_dead() {
    let _one_at_a_time = CRASH_TESTS.lock();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("grow.mkv");
    let image = dir.path().join("image.mkv");
    let (store, old) = indexed_store(
        &path,
        Options::default()
            .durability(Durability::None)
            .checkpoint_keys(1 << 20),
    );
    let dead_before = store.stats().dead_index_bytes;
    // Far more keys than the index holds: the checkpoint must grow it.
    for i in 300..6000u32 {
        store.put(format!("k{i}"), b"more").expect("put");
    }
    // Exact counters (the background thread may not have looked every key up yet):
    // they show the index too small, so the checkpoint grows it rather than fitting the
    // keys in place.
    assert_eq!(store.len(), 6000);
    *CRASH_AFTER_RUNS.lock() = Some((2, path.clone(), image.clone(), std::thread::current().id()));
    {
        let mut w = store.inner.writer.lock();
        store
            .inner
            .checkpoint(&mut w, STATE_DIRTY)
            .expect("checkpoint");
    }
    assert!(
        CRASH_AFTER_RUNS.lock().is_none(),
        "the crash image was taken"
    );
    let new = store.inner.state.read().index;
    assert!(new.buckets > old.buckets, "setup: the index grew");
    drop(store);
    let store = Store::open(&image, Options::default()).expect("open the crash image");
    let report = store.stats().recovery;
    assert!(!report.rebuilt_index, "{report:?}");
    assert_eq!(store.len(), 6000);
    let dead = store.stats().dead_index_bytes;
    assert!(
        dead >= dead_before + new.bytes(),
        "dead index bytes {dead}: the claimed region ({}) is not counted",
        new.bytes()
    );
    // It was never punched: it takes space, and compaction is what reclaims it.
    let released = store.stats().released_index_bytes;
    assert!(
        dead - released >= new.bytes(),
        "{released} of {dead} dead index bytes counted as released"
    );
    store.verify().expect("verify");
}

/// Live areas (by address) in which a sync moved `durable_end` past the committed end.
static DURABLE_AHEAD_OF_COMMITTED: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// Called by every sync after it recorded `durable_end`, with the sync mutex still held
/// (unit tests only): from the moment the mutex is released, a writer may acknowledge a
/// write below `durable_end` without a sync of its own, so readers in other processes
/// must already see it (the committed end covers it).
pub(super) fn durable_recorded(live: &crate::map::LiveArea, durable_end: u64) {
    if live.load(LIVE_COMMITTED_OFF) < durable_end {
        DURABLE_AHEAD_OF_COMMITTED
            .lock()
            .push(std::ptr::from_ref(live) as usize);
    }
}

/// Regression: a checkpoint's sync recorded the durable end, released the sync mutex and
/// only then raised the committed end. A writer under `Always` whose write that sync
/// covered (appended, not yet synced by its own call) acknowledged it without syncing
/// again, and a reader in another process missed it ("write 299 acknowledged but not
/// visible", once in 20 to 60 runs of `tests/readers.rs` under load). The order is
/// checked inside the sync, so the test does not depend on the preemption that made the
/// reader miss it.
#[test]
fn a_durable_end_is_never_ahead_of_the_committed_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ack.mkv");
    let store =
        Store::open(&path, Options::default().durability(Durability::Always)).expect("open");
    store.put(b"k", b"value").expect("put");
    let (live, file, end) = {
        let st = store.inner.state.read();
        (
            Arc::clone(&st.live),
            Arc::clone(&st.file),
            st.map.published(),
        )
    };
    let at = std::ptr::from_ref(&*live) as usize;
    // The state between an `Always` write's append and its own sync: published, not yet
    // committed. A checkpoint's sync that runs now covers it.
    let before = live.load(LIVE_COMMITTED_OFF);
    live.store(LIVE_COMMITTED_OFF, before - 16);
    store.inner.sync_file(&file).expect("sync");
    assert!(
        !DURABLE_AHEAD_OF_COMMITTED.lock().contains(&at),
        "a sync let the durable end pass the committed end"
    );
    assert_eq!(live.load(LIVE_COMMITTED_OFF), end);
    store.close().expect("close");
}

/// Regression: under `Always` the window of real zeros ahead of the tail was topped up a
/// megabyte at a time, and that megabyte's write-back delayed the next sync (every ~80th
/// batch of 100 durable puts took 2 ms instead of 0.2). Now it moves in small steps, and
/// stays ahead of the tail.
#[test]
fn zeros_ahead_of_the_tail_are_written_in_small_steps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("zeros.mkv");
    // `Async` appends with `pwrite` and zeros ahead as `Always` does, without a sync per
    // write.
    let store = Store::open(&path, Options::default().durability(Durability::Async)).expect("open");
    let value = [7u8; 1000];
    store.put(b"first", value).expect("put");
    let (mut zeroed, mut alloc) = {
        let w = store.inner.writer.lock();
        (w.zeroed, w.alloc)
    };
    let mut steps = 0;
    for i in 0..40_000u32 {
        store.put(i.to_le_bytes(), value).expect("put");
        let w = store.inner.writer.lock();
        if w.zeroed != zeroed {
            // A whole window only right after growth opened new space.
            assert!(
                w.zeroed - zeroed <= super::grow::ZERO_AHEAD / 4 || w.alloc != alloc,
                "zeros written {} bytes at once",
                w.zeroed - zeroed
            );
            steps += 1;
            zeroed = w.zeroed;
        }
        alloc = w.alloc;
        assert!(w.zeroed >= w.end.min(w.alloc), "the tail passed the zeros");
    }
    assert!(steps > 100, "the window moved only {steps} times");
    store.close().expect("close");
}

/// Blocks the compaction's thread at its first sync of the compaction file (after the
/// copy) until told to go on, after saying so.
struct HoldCompaction {
    built: Mutex<Option<std::sync::mpsc::Sender<()>>>,
    go: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl crate::SyncObserver for HoldCompaction {
    fn synced(&self, path: &std::path::Path, event: crate::SyncEvent) {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if event != crate::SyncEvent::File || !name.is_some_and(|n| n.contains(".compact-")) {
            return;
        }
        if let Some(tx) = self.built.lock().take() {
            let _ = tx.send(());
            if let Some(rx) = self.go.lock().take() {
                let _ = rx.recv();
            }
        }
    }
}

/// A compaction that catches up with many writes folds them into its new file's index
/// (with a checkpoint there) instead of carrying them all in memory: the store then
/// holds exactly the newest state, its counters are exact, it verifies, and the file as
/// a kill -9 right after the switch would leave it reopens to the same state.
#[test]
fn a_compaction_folds_the_writes_it_catches_up_with_into_its_index() {
    use std::collections::BTreeMap;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s.mkv");
    let (built_tx, built_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    let hold = std::sync::Arc::new(HoldCompaction {
        built: Mutex::new(Some(built_tx)),
        go: Mutex::new(Some(go_rx)),
    });
    let opts = Options::default()
        .durability(Durability::None)
        .auto_compact_off()
        .checkpoint_keys(100)
        .sync_observer(hold);
    let store = std::sync::Arc::new(Store::open(&path, opts).expect("open"));
    let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let put = |store: &Store, model: &mut BTreeMap<Vec<u8>, Vec<u8>>, k: Vec<u8>, v: Vec<u8>| {
        store.put(&k, &v).expect("put");
        model.insert(k, v);
    };
    for i in 0..3_000u32 {
        let (k, v) = (format!("key-{i:05}"), format!("first {i}"));
        put(&store, &mut model, k.into_bytes(), v.into_bytes());
    }
    let compactor = {
        let store = std::sync::Arc::clone(&store);
        std::thread::spawn(move || store.compact())
    };
    built_rx.recv().expect("the compaction wrote its file");
    // While it is held: overwrites, new keys and deletes, 25x what a fold waits for
    // (4x `checkpoint_keys`).
    for round in 0..3u32 {
        for i in (0..4_000u32).filter(|i| i % 3 != round) {
            let k = format!("key-{i:05}").into_bytes();
            if i % 11 == round {
                store.delete(&k).expect("delete");
                model.remove(&k);
            } else {
                let v = format!("round {round} {i}").repeat(3).into_bytes();
                put(&store, &mut model, k, v);
            }
        }
    }
    go_tx.send(()).expect("release the compaction");
    compactor
        .join()
        .expect("compaction thread")
        .expect("compact");
    // One piece of catch-up held every write: one fold, and an empty delta handed over.
    assert_eq!(store.inner.folds.load(Ordering::Relaxed), 1, "it folded");
    assert_eq!(
        store.inner.state.read().delta.len(),
        0,
        "the delta handed over"
    );
    // A few writes past the fold's checkpoint, for recovery to replay.
    for i in 0..50u32 {
        let (k, v) = (format!("late-{i}"), format!("late {i}"));
        put(&store, &mut model, k.into_bytes(), v.into_bytes());
    }
    let check = |s: &Store| {
        assert_eq!(s.len(), model.len());
        for (k, v) in &model {
            assert_eq!(s.get(k).expect("get").as_ref(), Some(v), "{k:?}");
        }
        let pairs: Vec<_> = s.iter().map(|r| r.expect("iter")).collect();
        assert_eq!(pairs.len(), model.len());
        assert_eq!(s.verify().expect("verify").live_keys, model.len() as u64);
        s.stats()
    };
    let before = check(&store);
    // The file as a kill -9 now would leave it (shared pages, no close).
    let copy = dir.path().join("crashed.mkv");
    std::fs::copy(&path, &copy).expect("copy");
    drop(store);
    let crashed = Store::open(&copy, Options::default().auto_compact_off()).expect("reopen");
    let report = crashed.stats().recovery;
    assert!(
        !report.was_clean && report.replayed_writes >= 50,
        "{report:?}"
    );
    let recovered = check(&crashed);
    // A compaction recounts from scratch: the counters kept across the fold were exact.
    crashed.compact().expect("compact the recovered copy");
    let recount = check(&crashed);
    assert_eq!(recount.live_bytes, recount.log_bytes);
    for st in [&before, &recovered] {
        assert_eq!(
            (st.live_keys, st.live_bytes),
            (recount.live_keys, recount.live_bytes),
            "{st:?}"
        );
    }
}

/// Once a close has begun, no automatic compaction starts: a checkpoint that ends during
/// the close (it finds the threshold crossed) would otherwise start one that copies the
/// store again after the compaction the close runs itself.
#[test]
fn no_automatic_compaction_starts_once_a_close_has_begun() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options::default()
        .durability(Durability::None)
        .auto_compact(0.25, 1 << 20);
    let store = Store::open(dir.path().join("s.mkv"), opts).expect("open");
    for round in 0..3u32 {
        for i in 0..20_000u32 {
            store
                .put(i.to_le_bytes(), format!("{round} {i}").repeat(8))
                .expect("put");
        }
    }
    // (`start_auto_compaction` does not ask whether one is due: its callers do. An
    // automatic compaction may already have run during the writes, so the threshold is
    // not asserted here; the guard below must hold either way.)
    // A close begins; the compaction that is running finishes.
    store.inner.closing.store(true, Ordering::Release);
    let running = store.inner.auto_compactor.lock().take();
    if let Some(t) = running {
        t.join().expect("compaction thread");
    }
    let due = store.inner.compaction_due();
    let me = store.inner.me.get().and_then(std::sync::Weak::upgrade);
    let me = me.expect("the store's own reference");
    me.start_auto_compaction();
    assert!(
        store.inner.auto_compactor.lock().is_none(),
        "a compaction started during a close (due: {due})"
    );
    drop(me);
    store.close().expect("close");
}

/// A new `Durability::None` store at `path` with checkpoints every `checkpoint_keys`
/// writes, and automatic compaction on or off.
fn open_unsynced(path: &std::path::Path, checkpoint_keys: usize, auto_compact: bool) -> Store {
    let opts = Options::default()
        .durability(Durability::None)
        .checkpoint_keys(checkpoint_keys);
    let opts = if auto_compact {
        opts
    } else {
        opts.auto_compact_off()
    };
    Store::open(path, opts).expect("open")
}

/// Puts 45,000 keys (20-byte values) into a store opened with a checkpoint limit of
/// 40,000, and waits for the checkpoint the 40,000th starts: those keys are then in the
/// buckets. For tests of counter resolution.
fn fill_buckets_for_resolution(store: &Store) {
    for i in 0..45_000u32 {
        store.put(i.to_le_bytes(), [1u8; 20]).expect("put");
    }
    wait_for_job(store);
}

/// Overwrites the first 30,000 of those keys, fewer than the next checkpoint's limit:
/// each write's old record must be looked up in the buckets.
fn overwrite_for_resolution(store: &Store) {
    for i in 0..30_000u32 {
        store.put(i.to_le_bytes(), [9u8; 20]).expect("put");
    }
}

/// Waits (at most 30 s) until no counter resolution is asked of the background thread.
fn wait_until_resolution_idle(store: &Store) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while store.inner.resolve_asked.load(Ordering::Acquire) && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Counter resolution makes its lookups without the state lock: under the exclusive
/// lock, a piece of 256 lookups that missed the caches held it for milliseconds, and
/// at 20M keys a writer waited up to 73 ms for one (the background thread runs niced).
/// With no checkpoint running, nothing changes the buckets during a piece, so no
/// lookup has to be made again under the lock; and the counters come out exact.
#[test]
fn counter_resolution_looks_up_without_the_state_lock() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Counter resolution runs in the background when automatic compaction is on (it
    // needs the counters) and could become due; this store is far below its minimum
    // size, so it is told to resolve anyway.
    let store = open_unsynced(&dir.path().join("warm.mkv"), 40_000, true);
    let forced = Listed::new(
        &RESOLVING_ALWAYS,
        std::ptr::from_ref(&*store.inner) as usize,
    );
    fill_buckets_for_resolution(&store);
    let idle = || wait_until_resolution_idle(&store);
    // (Lookups that ran beside that checkpoint may have had to be made again.)
    idle();
    let pieces0 = store.inner.resolved_pieces.load(Ordering::Relaxed);
    let locked0 = store.inner.locked_lookups.load(Ordering::Relaxed);
    let prefetched0 = store.inner.prefetched_pieces.load(Ordering::Relaxed);
    // Overwrites of keys in the buckets, fewer than the next checkpoint's threshold:
    // each must be resolved against the index, by the background thread.
    overwrite_for_resolution(&store);
    idle();
    let pieces = store.inner.resolved_pieces.load(Ordering::Relaxed) - pieces0;
    let locked = store.inner.locked_lookups.load(Ordering::Relaxed) - locked0;
    assert!(
        pieces >= 20,
        "only {pieces} pieces were resolved in the background"
    );
    assert_eq!(locked, 0, "{locked} lookups were made under the state lock");
    // Over a resident index, pieces do not read their buckets in first (a piece or
    // two may, if the thread is preempted for long during its lookups).
    let prefetched = store.inner.prefetched_pieces.load(Ordering::Relaxed) - prefetched0;
    assert!(
        prefetched * 4 <= pieces,
        "{prefetched} of {pieces} pieces read their buckets in ahead"
    );
    // 30,000 old records found: the counters hold one live record per key.
    let st = store.stats();
    assert_eq!(st.live_keys, 45_000);
    assert_eq!(st.live_bytes, 45_000 * crate::format::record_len(4, 20));
    assert_eq!(store.len(), 45_000);
    drop(forced);
    store.close().expect("close");
}

/// Stores in which a store thread that holds the state lock for a step it could have
/// handed to the writer (see `super::handoff`) stops there until the test takes the
/// store out of the list: a niced thread that lost its core in the middle of a hold
/// (unit tests only). And the stores where one got there.
static STALLED_STEP_LOCKS: Mutex<Vec<usize>> = Mutex::new(Vec::new());
static STEP_LOCKS_REACHED: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// Called by a step of counter resolution or of a frozen delta's copy made under the
/// state lock its thread took itself (unit tests only).
pub(super) fn step_lock_held(inner: &Inner) {
    // (Nor while the writer mutex's holder waits for a checkpoint, or runs one: no
    // commit comes then, and the checkpoint's copy is made under a lock of its own.)
    if !super::threads::on_store_thread() || inner.writer_held.load(Ordering::Acquire) > 0 {
        return;
    }
    let me = std::ptr::from_ref(inner) as usize;
    if STALLED_STEP_LOCKS.lock().contains(&me) {
        STEP_LOCKS_REACHED.lock().push(me);
    }
    while STALLED_STEP_LOCKS.lock().contains(&me) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Regression: the background thread (niced) planned and counted each piece of
/// counter resolution under the state lock it took itself, and a hold during which it
/// lost its core kept the writer waiting: 21-35 waits over 3 ms per 20M-key sweep, up
/// to 38 ms. While the writer writes, it makes those steps itself (see
/// `super::handoff`). Here a store thread that takes the lock for one stops holding
/// it: the writer's puts complete all the same, no store thread took the lock for a
/// step meanwhile, and the counters come out exact.
#[test]
fn a_put_does_not_wait_for_a_store_thread_resolving_counters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open_unsynced(&dir.path().join("handoff.mkv"), 40_000, true));
    let me = std::ptr::from_ref(&*store.inner) as usize;
    let forced = Listed::new(&RESOLVING_ALWAYS, me);
    fill_buckets_for_resolution(&store);
    let idle = || wait_until_resolution_idle(&store);
    idle();
    // However slow this machine, the background thread waits for the writer's answer
    // while the writer writes, rather than taking the lock itself.
    *store.inner.handoff.test_wait.lock() = Some(std::time::Duration::from_secs(60));
    let stalled = Listed::new(&STALLED_STEP_LOCKS, me);
    let served0 = store.inner.handoff.served.load(Ordering::Relaxed);
    // Overwrites of keys in the buckets (fewer keys than the next checkpoint's
    // threshold: each must be resolved against the index), until the writer has made
    // a few steps.
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = Arc::clone(&store);
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(50);
        let mut i = 0u32;
        let r = loop {
            if let Err(e) = writer.put((i % 30_000).to_le_bytes(), [9u8; 20]) {
                break Err(e);
            }
            i += 1;
            let served = writer.inner.handoff.served.load(Ordering::Relaxed) - served0;
            if i >= 30_000 && (served >= 4 || std::time::Instant::now() > deadline) {
                break Ok(());
            }
        };
        let _ = tx.send(r);
    });
    let done = rx.recv_timeout(std::time::Duration::from_secs(60));
    let reached = STEP_LOCKS_REACHED.lock().contains(&me);
    let served = store.inner.handoff.served.load(Ordering::Relaxed) - served0;
    drop(stalled);
    STEP_LOCKS_REACHED.lock().retain(|&a| a != me);
    // The rest of the backlog, with the writer idle: the background thread's next
    // step goes unanswered, and it makes the steps itself from there on.
    *store.inner.handoff.test_wait.lock() = None;
    assert!(
        matches!(done, Ok(Ok(()))),
        "puts waited for a store thread's resolution step: {done:?}"
    );
    assert!(
        !reached,
        "a store thread took the lock while the writer wrote"
    );
    assert!(served > 0, "the writer made no resolution step");
    idle();
    let st = store.stats();
    assert_eq!(st.live_keys, 45_000);
    assert_eq!(st.live_bytes, 45_000 * crate::format::record_len(4, 20));
    drop(forced);
    store.verify().expect("verify");
}

/// Regression: a checkpoint copied its frozen delta a piece per read lock of its own
/// thread (niced), and a hold during which it lost its core kept the writer waiting
/// 3-10 times per 20M-key sweep, up to 40 ms. While the writer writes, it copies the
/// pieces itself (see `super::handoff`). Here a store thread that takes the lock for a
/// piece stops holding it: the writer's puts, through several checkpoints, complete all
/// the same, and no store thread took the lock for a piece meanwhile.
#[test]
fn a_put_does_not_wait_for_a_checkpoint_copying_its_frozen_delta() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open_unsynced(&dir.path().join("copy.mkv"), 2_000, false));
    for i in 0..6_000u32 {
        store.put(i.to_le_bytes(), b"before").expect("put");
    }
    wait_for_job(&store);
    let me = std::ptr::from_ref(&*store.inner) as usize;
    *store.inner.copy_handoff.test_wait.lock() = Some(std::time::Duration::from_secs(60));
    let stalled = Listed::new(&STALLED_STEP_LOCKS, me);
    let served0 = store.inner.copy_handoff.served.load(Ordering::Relaxed);
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = Arc::clone(&store);
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(50);
        let mut i = 6_000u32;
        let r = loop {
            if let Err(e) = writer.put(i.to_le_bytes(), b"during") {
                break Err(e);
            }
            i += 1;
            let served = writer.inner.copy_handoff.served.load(Ordering::Relaxed) - served0;
            if i >= 12_000 && (served >= 4 || std::time::Instant::now() > deadline) {
                break Ok(i);
            }
        };
        let _ = tx.send(r);
    });
    let done = rx.recv_timeout(std::time::Duration::from_secs(60));
    let reached = STEP_LOCKS_REACHED.lock().contains(&me);
    let served = store.inner.copy_handoff.served.load(Ordering::Relaxed) - served0;
    drop(stalled);
    STEP_LOCKS_REACHED.lock().retain(|&a| a != me);
    *store.inner.copy_handoff.test_wait.lock() = None;
    let Ok(Ok(end)) = done else {
        panic!("puts waited for a checkpoint's copy: {done:?}");
    };
    assert!(
        !reached,
        "a store thread took the lock for a copy while the writer wrote"
    );
    assert!(served >= 4, "the writer copied {served} pieces");
    wait_for_job(&store);
    for k in 0..end {
        let want: &[u8] = if k < 6_000 { b"before" } else { b"during" };
        assert_eq!(
            store.get(k.to_le_bytes()).expect("get").as_deref(),
            Some(want)
        );
    }
    store.verify().expect("verify");
}

/// Regression: counter resolution that went on through a whole 20M-key fill kept the
/// background thread from freeing the delta tables the writer retired meanwhile (and
/// from preparing the next delta it asked for): 205 tables waited, and the fill's
/// anonymous memory peaked at 1 GiB instead of about 300 MiB. Both are done between
/// the pieces of resolution now.
#[test]
fn counter_resolution_frees_retired_tables_between_its_pieces() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Without automatic compaction the background thread resolves nothing itself: the
    // backlog below is this test's to resolve.
    let store = open_unsynced(&dir.path().join("garbage.mkv"), 40_000, false);
    fill_buckets_for_resolution(&store);
    overwrite_for_resolution(&store);
    let me = std::ptr::from_ref(&*store.inner) as usize;
    let stalled = Listed::new(&STALLED_BACKGROUND, me);
    // Let the background thread finish what it was doing and reach its stall.
    std::thread::sleep(std::time::Duration::from_millis(100));
    {
        let mut bg = store.inner.background.lock();
        bg.garbage
            .push(crate::index::SpareTable::allocate(1 << 16).retire());
        bg.next_delta_ask = Some(1_000);
    }
    assert!(store.inner.state.read().delta.unresolved_len() >= 30_000);
    store.inner.resolve_backlog();
    let (garbage, next_delta) = {
        let bg = store.inner.background.lock();
        (bg.garbage.len(), bg.next_delta.is_some())
    };
    drop(stalled);
    assert_eq!(garbage, 0, "retired tables waited for the whole resolution");
    assert!(next_delta, "the next delta waited for the whole resolution");
    assert_eq!(store.len(), 45_000);
    store.close().expect("close");
}

/// `len()` and `stats()` make the counters exact on the caller's thread. They looked
/// the whole backlog up under the exclusive state lock, 16,384 lookups per hold, so an
/// application polling `len()` held its writers off for milliseconds at a time (more
/// over a cold index); now they resolve it in lock-free pieces as the background
/// thread does.
#[test]
fn len_resolves_the_backlog_without_the_state_lock() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Without automatic compaction nothing resolves the backlog in the background: the
    // lookups below are all `len()`'s.
    let store = open_unsynced(&dir.path().join("len.mkv"), 40_000, false);
    fill_buckets_for_resolution(&store);
    let pieces0 = store.inner.resolved_pieces.load(Ordering::Relaxed);
    let locked0 = store.inner.locked_lookups.load(Ordering::Relaxed);
    // Overwrites of keys in the buckets, fewer than the next checkpoint's threshold.
    overwrite_for_resolution(&store);
    assert!(store.inner.state.read().delta.unresolved_len() >= 30_000);
    assert_eq!(store.len(), 45_000);
    let pieces = store.inner.resolved_pieces.load(Ordering::Relaxed) - pieces0;
    let locked = store.inner.locked_lookups.load(Ordering::Relaxed) - locked0;
    assert!(
        pieces >= 100,
        "only {pieces} lock-free pieces resolved the backlog"
    );
    assert_eq!(locked, 0, "{locked} lookups were made under the state lock");
    assert_eq!(store.inner.state.read().delta.unresolved_len(), 0);
    let st = store.stats();
    assert_eq!(st.live_keys, 45_000);
    assert_eq!(st.live_bytes, 45_000 * crate::format::record_len(4, 20));
    store.close().expect("close");
}

/// Regression: the writer allocated its delta's next table itself, tens of MB at
/// 10-100M keys, and that `brk`/`mmap` waited for the process's memory-map lock while
/// other threads held it (194-272 ms at 100M keys). The background thread now prepares
/// a large table once the current one is half full, and the writer takes it.
#[test]
fn the_writer_takes_its_next_delta_table_from_the_background_thread() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_unsynced(&dir.path().join("spare.mkv"), 1 << 22, false);
    let i = std::cell::Cell::new(0u64);
    let put = |store: &Store| {
        store.put(i.get().to_le_bytes(), [3u8; 8]).expect("put");
        i.set(i.get() + 1);
    };
    // Up to the first table whose next one the writer asks for.
    while store.inner.state.read().delta.spare_wanted().is_none() {
        put(&store);
        assert!(i.get() < 1 << 20, "no table was ever asked for");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !store.inner.spare_ready.load(Ordering::Acquire) {
        assert!(
            std::time::Instant::now() < deadline,
            "no table was prepared"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    put(&store);
    assert_eq!(store.inner.spares_taken.load(Ordering::Relaxed), 1);
    assert!(store.inner.state.read().delta.spare_wanted().is_none());
    // Growth takes it, and every key is still there.
    let slots = |store: &Store| store.inner.state.read().delta.table_slots();
    let before = slots(&store);
    while slots(&store) == before {
        put(&store);
    }
    assert_eq!(store.len() as u64, i.get());
    for k in (0..i.get()).step_by(97) {
        assert_eq!(store.get(k.to_le_bytes()).expect("get"), Some(vec![3u8; 8]));
    }
    store.close().expect("close");
}

/// Counter resolution beside checkpoints, index growth and deletes: a lookup made
/// while a checkpoint froze the delta, rewrote buckets or grew the index is either
/// still right or made again under the lock, so the counters come out exact.
#[test]
fn counter_resolution_beside_checkpoints_keeps_the_counters_exact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_unsynced(&dir.path().join("busy.mkv"), 3_000, true);
    let forced = Listed::new(
        &RESOLVING_ALWAYS,
        std::ptr::from_ref(&*store.inner) as usize,
    );
    let mut model = std::collections::HashMap::new();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..300_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let key = ((x >> 8) % 60_000) as u32;
        if x.is_multiple_of(8) {
            store.delete(key.to_le_bytes()).expect("delete");
            model.remove(&key);
        } else {
            let len = (x >> 40) as usize % 40;
            store.put(key.to_le_bytes(), vec![7u8; len]).expect("put");
            model.insert(key, len);
        }
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while store.inner.resolve_asked.load(Ordering::Acquire) && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let pieces = store.inner.resolved_pieces.load(Ordering::Relaxed);
    assert!(
        pieces >= 50,
        "only {pieces} pieces resolved in the background"
    );
    let st = store.stats();
    assert!(st.checkpoints >= 20, "{st:?}");
    let live: u64 = model
        .values()
        .map(|&len| crate::format::record_len(4, len))
        .sum();
    assert_eq!((st.live_keys, st.live_bytes), (model.len() as u64, live));
    drop(forced);
    store.close().expect("close");
}

/// How many of the pages of `[addr, addr + len)` this process has in its page tables
/// (`/proc/self/pagemap`, bit 63).
fn pages_mapped(addr: usize, len: usize) -> usize {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open("/proc/self/pagemap").expect("pagemap");
    let (first, n) = (addr / 4096, len / 4096);
    let mut buf = vec![0u8; n * 8];
    f.read_exact_at(&mut buf, (first * 8) as u64)
        .expect("read pagemap");
    buf.chunks_exact(8)
        .filter(|e| u64::from_le_bytes((*e).try_into().expect("8 bytes")) >> 63 == 1)
        .count()
}

/// Asserts that, after a sync, at most 1% of the log's pages below the tail's 2 MiB
/// folio are mapped in this process (the log starts right after the first index
/// region: tests that use this hold no other region).
fn assert_log_behind_the_tail_unmapped(store: &Store) {
    let (base, from, to) = {
        let st = store.inner.state.read();
        let start = crate::format::page_up(st.index.bucket_off(st.index.buckets));
        let end = st.map.published() & !((2 << 20) - 1);
        (st.map.base_addr(), start, end)
    };
    assert!(to > from + (8 << 20), "too little log: {from}..{to}");
    let pages = ((to - from) / 4096) as usize;
    let (addr, len) = (base + from as usize, (to - from) as usize);
    // A release the background thread started may still be under way: a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut mapped = pages_mapped(addr, len);
    while mapped * 100 > pages && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
        mapped = pages_mapped(addr, len);
    }
    assert!(
        mapped * 100 <= pages,
        "{mapped} of the {pages} log pages behind the tail are still mapped after a sync"
    );
}

/// Regression: under `None`, appends dirty the log's pages through the mapping, and
/// write-back (the background thread's early write-back, a checkpoint's sync, `flush`)
/// write-protected each of them with a TLB shootdown of its own: an IPI to the other
/// CPUs per page, a third of all CPU time in a 1M-key fill on the 2-vCPU VM. The pages
/// the writer has left behind are now dropped from the mapping first, with one flush
/// for the range: after a `flush`, none of them is mapped.
#[test]
fn a_sync_leaves_no_page_behind_the_tail_mapped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_unsynced(&dir.path().join("release.mkv"), 1_000_000, false);
    let value = [5u8; 100];
    for i in 0..200_000u32 {
        store.put(i.to_le_bytes(), value).expect("put");
    }
    store.flush().expect("flush");
    assert_log_behind_the_tail_unmapped(&store);
    store.close().expect("close");
}

/// Regression: the mark below which log pages were released was a bare offset. A
/// release still running for the file a compaction had just replaced (the background
/// thread holds that file's mapping while it works through a range) raised it to an
/// offset of the old file, far past the new file's log: nothing of the new file was
/// released until its log got there, and every write-back paid its shootdowns again.
/// The mark now belongs to a file generation, and a release for another one is ignored.
#[test]
fn a_late_release_for_a_replaced_file_holds_nothing_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_unsynced(&dir.path().join("late.mkv"), 1_000_000, false);
    let value = [6u8; 100];
    for _ in 0..4 {
        for i in 0..50_000u32 {
            store.put(i.to_le_bytes(), value).expect("put");
        }
    }
    let (old_map, old_gen) = {
        let st = store.inner.state.read();
        (
            Arc::clone(&st.map),
            store.inner.file_gen.load(Ordering::Acquire),
        )
    };
    store.compact().expect("compact");
    // The background thread's last piece for the old file, arriving late.
    store
        .inner
        .release_behind(&old_map, old_gen, old_map.published());
    drop(old_map);
    for i in 50_000..250_000u32 {
        store.put(i.to_le_bytes(), value).expect("put");
    }
    store.flush().expect("flush");
    assert_log_behind_the_tail_unmapped(&store);
    store.close().expect("close");
}

/// Crash safety of the release: `MADV_DONTNEED` drops the mapping's entries for pages
/// behind the tail before their sync, and must leave their dirty state with the pages,
/// or the sync would skip them and the disk would not hold what `flush` promised. After
/// a flush, the page cache's clean copies are dropped, so every read below comes from
/// the disk: a page the sync skipped would read as the zeros the file was allocated
/// with.
#[test]
fn pages_released_before_a_sync_reach_the_disk() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("durable.mkv");
    let store = open_unsynced(&path, 1_000_000, false);
    let value = |i: u32| format!("value {i} {}", "x".repeat(80));
    for i in 0..200_000u32 {
        store.put(i.to_le_bytes(), value(i)).expect("put");
    }
    store.flush().expect("flush");
    assert_log_behind_the_tail_unmapped(&store);
    let resident = |s: &Store| s.stats().resident_pages;
    let before = resident(&store);
    let f = std::fs::File::open(&path).expect("open the file");
    crate::map::Mapping::drop_clean_cache(&f);
    let after = resident(&store);
    assert!(
        after * 2 < before,
        "the page cache kept {after} of {before} pages: the reads below would not test the disk"
    );
    for i in 0..200_000u32 {
        let got = store.get(i.to_le_bytes()).expect("get");
        assert_eq!(got.as_deref(), Some(value(i).as_bytes()), "key {i}");
    }
    store.close().expect("close");
}

/// Stores (their `Inner`'s address) whose compaction waits at each piece until the
/// test takes them out of the list or a close cancels it (unit tests only), and how
/// many pieces reached the wait.
static STALLED_COMPACTIONS: Mutex<Vec<usize>> = Mutex::new(Vec::new());
static COMPACTION_PIECES_STALLED: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);

/// Called by compactions at each piece of their copy (unit tests only).
pub(super) fn compaction_piece(inner: &Inner) {
    let me = std::ptr::from_ref(inner) as usize;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut counted = false;
    while STALLED_COMPACTIONS.lock().contains(&me)
        && !inner.cancel_compaction.load(Ordering::Acquire)
        && std::time::Instant::now() < deadline
    {
        if !counted {
            COMPACTION_PIECES_STALLED.fetch_add(1, Ordering::Relaxed);
            counted = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    if std::time::Instant::now() >= deadline {
        // Not cancelled in time: let it run (the test then fails on what it finds).
        STALLED_COMPACTIONS.lock().retain(|&a| a != me);
    }
}

/// A close of a store too large to copy quickly does not wait for its running automatic
/// compaction: the compaction stops, removes its file, and the store closes whole (a
/// close of 20M keys waited 33-50 s for one).
#[test]
fn a_close_abandons_the_automatic_compaction_of_a_large_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("big.mkv");
    let opts = Options::default()
        .durability(Durability::None)
        .auto_compact(0.25, 1 << 20);
    let store = Store::open(&path, opts).expect("open");
    // Every store is "large" for this one.
    store.inner.close_compact_max.store(0, Ordering::Relaxed);
    let me = std::ptr::from_ref(&*store.inner) as usize;
    let _unstall = Listed::new(&STALLED_COMPACTIONS, me);
    let stalled = COMPACTION_PIECES_STALLED.load(Ordering::Relaxed);
    // Written twice: half the log is dead, and a compaction starts (and stalls).
    let value = [5u8; 200];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut round = 0u32;
    while COMPACTION_PIECES_STALLED.load(Ordering::Relaxed) == stalled {
        for i in 0..20_000u32 {
            store.put(i.to_le_bytes(), value).expect("put");
        }
        round += 1;
        assert!(
            std::time::Instant::now() < deadline,
            "no compaction started after {round} rounds"
        );
    }
    store.put(b"last", b"one").expect("put");
    store.close_shared().expect("close");
    assert_eq!(store.stats().maintenance.compactions, 0);
    drop(store);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .map(|e| e.expect("entry").file_name())
        .filter(|n| n != "big.mkv")
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    let store = Store::open(&path, Options::default()).expect("reopen");
    assert!(store.stats().recovery.was_clean);
    assert_eq!(store.len(), 20_001);
    assert_eq!(
        store.get(b"last").expect("get").as_deref(),
        Some(&b"one"[..])
    );
    assert_eq!(
        store.get(7u32.to_le_bytes()).expect("get").as_deref(),
        Some(&value[..])
    );
    store.verify().expect("verify");
}

/// An old index region is punched a piece at a time (the 256 MiB region left by the
/// index's growth at 11.7M keys, punched in one `fallocate`, held every page fault on
/// the file off for 150-240 ms): pieces of at most `PUNCH_PIECE`, in order, covering
/// the region exactly, the space gate free between them. After a failed piece the rest
/// is not tried, and its bytes are reported as not released.
#[test]
fn an_old_index_region_is_punched_a_piece_at_a_time() {
    use super::checkpoint::{punch_in_pieces, PUNCH_PIECE};
    let gate = Mutex::new(());
    let off = 3 * 4096;
    let len = 5 * PUNCH_PIECE + 12_288;
    let mut pieces = Vec::new();
    let left = punch_in_pieces(&gate, off, len, |o, l| {
        // The gate is held during a piece...
        assert!(gate.try_lock().is_none());
        pieces.push((o, l));
        true
    });
    // ...and free after.
    assert!(gate.try_lock().is_some());
    assert_eq!(left, 0);
    assert_eq!(pieces.len(), 6);
    assert!(pieces.iter().all(|&(_, l)| l > 0 && l <= PUNCH_PIECE));
    let mut at = off;
    for &(o, l) in &pieces {
        assert_eq!(o, at);
        at += l;
    }
    assert_eq!(at, off + len);

    let mut calls = 0;
    let left = punch_in_pieces(&gate, off, len, |_, _| {
        calls += 1;
        calls < 3
    });
    assert_eq!(calls, 3);
    assert_eq!(left, len - 2 * PUNCH_PIECE);
    assert_eq!(punch_in_pieces(&gate, off, 0, |_, _| unreachable!()), 0);
}

/// The same in a store: the old regions a growing index leaves behind (4 MiB and more
/// here) are punched out a piece at a time.
#[test]
fn a_growing_store_punches_its_old_index_regions_in_pieces() {
    use super::checkpoint::PUNCH_PIECE;
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options::default()
        .durability(Durability::None)
        .checkpoint_keys(10_000);
    let store = Store::open(dir.path().join("grow.mkv"), opts).expect("open");
    // The index outgrows 1,024 buckets (4 MiB) at about 183,000 keys (later if its
    // checkpoints lag); the region is punched once two checkpoints postdate the
    // growth. The smaller regions before it add up to less than 4 MiB.
    let punched = || store.inner.punched_bytes.load(Ordering::Relaxed);
    let mut i = 0u32;
    while punched() < 4 << 20 {
        store.put(i.to_le_bytes(), [5u8; 8]).expect("put");
        i += 1;
        assert!(i < 2_000_000, "only {} bytes punched", punched());
    }
    let released = store.inner.released_index_bytes.load(Ordering::Relaxed);
    let longest = store.inner.longest_punch.load(Ordering::Relaxed);
    assert!(released >= 4 << 20, "released only {released} bytes");
    assert!(longest > 0, "nothing was punched");
    assert!(
        longest <= PUNCH_PIECE,
        "a punch of {longest} bytes in one call"
    );
    store.close().expect("close");
}

/// An index growth that `freeze` claims (the keys surely call for a larger index) put
/// the new region behind a JUMP at the tail, and the writer allocated the whole region
/// there: 167-254 ms for 512 MiB under a busy disk, in a 20M fill. The checkpoint
/// before it allocates that space from its own thread once the next keys may call for
/// it, so every claim finds its region allocated.
#[test]
fn an_index_growth_finds_its_region_allocated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options::default()
        .durability(Durability::None)
        .checkpoint_keys(10_000);
    let store = Store::open(dir.path().join("grow.mkv"), opts).expect("open");
    let claimed = || store.inner.regions_claimed.load(Ordering::Relaxed);
    let start = store.inner.state.read().index.buckets;
    let mut i = 0u32;
    // Until the index region is 32 MiB (8,192 buckets, about 800,000 keys), more than
    // the 16 MiB window allocated ahead of the tail of a log of that size: without the
    // allocation ahead, the claims of the 16 and 32 MiB regions found too little.
    while store.inner.state.read().index.buckets < start.max(8_192) {
        store.put(i.to_le_bytes(), [5u8; 8]).expect("put");
        i += 1;
        assert!(
            i < 2_000_000,
            "the index did not grow: {} claims",
            claimed()
        );
    }
    let unallocated = store.inner.regions_unallocated.load(Ordering::Relaxed);
    assert_eq!(
        unallocated,
        0,
        "{unallocated} of {} claims allocated their region on the writer's thread",
        claimed()
    );
    store.close().expect("close");
}

/// The allocation ahead of an index growth goes by the rate the keys grow at: a store
/// near its growth threshold that mostly overwrites keys (one new key per checkpoint)
/// gets nothing allocated for a growth it will not reach for hundreds of intervals.
/// (Sized by the delta's hard limit instead, every checkpoint here allocated 1 GiB.)
#[test]
fn an_overwriting_store_near_its_growth_gets_no_space_ahead_for_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = Options::default()
        .durability(Durability::None)
        .auto_compact_off()
        .checkpoint_keys(1_000);
    let store = Store::open(dir.path().join("near.mkv"), opts).expect("open");
    let buckets = store.inner.state.read().index.buckets;
    let max_keys = u32::try_from(super::checkpoint::max_keys_for(buckets)).expect("keys");
    let live = max_keys / 2;
    for i in 0..live {
        store.put(i.to_le_bytes(), [1u8; 16]).expect("put");
    }
    wait_for_job(&store);
    for round in 0..8u32 {
        for i in 0..1_000u32 {
            let k = (round * 1_000 + i) % live;
            store.put(k.to_le_bytes(), [2u8; 16]).expect("overwrite");
        }
        store
            .put((live + round).to_le_bytes(), [3u8; 16])
            .expect("put");
        wait_for_job(&store);
    }
    let (len, published) = {
        let st = store.inner.state.read();
        (st.file.len().expect("len"), st.map.published())
    };
    assert!(
        len < published + (64 << 20),
        "{} MiB allocated past a log of {} MiB",
        (len - published) >> 20,
        published >> 20
    );
    store.close().expect("close");
}

/// Waits (at most 30 s) until the background thread is not asked to resolve counters.
fn wait_for_resolution(store: &Store) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while store.inner.resolve_asked.load(Ordering::Acquire) {
        assert!(
            std::time::Instant::now() < deadline,
            "counter resolution did not finish"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The background thread looks up the old records of deferred writes only while what
/// it could find might make automatic compaction due: in a 20M-key fill of new keys it
/// took a quarter of the puts' throughput and most of the writer's lock waits for
/// lookups that all found nothing. Here the backlog (a few deltas of 4,000 keys) stays
/// small beside the log of a fill, so no piece is resolved. Then, with no checkpoint
/// to count them, overwrites bring the dead share past the threshold: resolution
/// resumes, and it alone finds them and starts the compaction.
#[test]
fn counter_resolution_waits_until_it_could_make_compaction_due() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fill.mkv");
    let opts = Options::default()
        .durability(Durability::None)
        .auto_compact(0.25, 0);
    let store = Store::open(&path, opts.clone().checkpoint_keys(4_000)).expect("open");
    for i in 0..200_000u32 {
        store.put(i.to_le_bytes(), [1u8; 100]).expect("put");
    }
    wait_for_resolution(&store);
    let pieces0 = store.inner.resolved_pieces.load(Ordering::Relaxed);
    for i in 200_000..300_000u32 {
        store.put(i.to_le_bytes(), [1u8; 100]).expect("put");
    }
    wait_for_resolution(&store);
    let fill_pieces = store.inner.resolved_pieces.load(Ordering::Relaxed) - pieces0;
    assert_eq!(fill_pieces, 0, "pieces resolved while filling");
    store.close().expect("close");

    // 150,000 overwrites: no checkpoint before 1M keys or 256 MiB of log.
    let store = Store::open(&path, opts.checkpoint_keys(1_000_000)).expect("reopen");
    for i in 0..150_000u32 {
        store.put(i.to_le_bytes(), [2u8; 100]).expect("put");
    }
    wait_for_resolution(&store);
    let pieces = store.inner.resolved_pieces.load(Ordering::Relaxed);
    assert!(pieces > 0, "no piece resolved while overwriting");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let m = store.stats().maintenance;
        if m.compactions > 0 || m.compaction_running {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no compaction started: {m:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(store.len(), 300_000);
    assert_eq!(
        store.get(7u32.to_le_bytes()).expect("get").as_deref(),
        Some(&[2u8; 100][..])
    );
    store.close().expect("close");
}

/// A close judges whether a store is small enough to compact (`close_compact_max`) by
/// its live bytes, which count the records a backlog of deferred lookups replaced as
/// still live. When those could make the difference, it looks them up first: here
/// 1,000 overwrites of 5,000 keys, too few for the background thread to look up, leave
/// the store counted 20% larger than it is, and the limit lies in between.
#[test]
fn a_close_judges_the_size_of_a_store_with_its_backlog_looked_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("size.mkv");
    let opts = Options::default()
        .durability(Durability::None)
        .checkpoint_keys(100_000);
    let store = Store::open(&path, opts.clone()).expect("open");
    for i in 0..5_000u32 {
        store.put(i.to_le_bytes(), [1u8; 20]).expect("put");
    }
    store.close().expect("close");
    let store = Store::open(&path, opts).expect("reopen");
    for i in 0..1_000u32 {
        store.put(i.to_le_bytes(), [2u8; 20]).expect("put");
    }
    let rec = crate::format::record_len(4, 20);
    let counted = store.inner.state.read().counters.live_bytes;
    assert_eq!(
        counted,
        6_000 * rec,
        "setup: the overwrites are not looked up yet"
    );
    store
        .inner
        .close_compact_max
        .store(5_500 * rec, Ordering::Relaxed);
    assert!(store.inner.close_may_compact());
    assert_eq!(store.inner.state.read().counters.live_bytes, 5_000 * rec);
    // Far above the limit whatever the backlog replaced: no lookups for it.
    store.put(b"big", vec![3u8; 100_000]).expect("put");
    store.inner.close_compact_max.store(0, Ordering::Relaxed);
    assert!(!store.inner.close_may_compact());
    store.close().expect("close");
}

#[test]
fn a_close_gives_back_what_was_allocated_ahead_of_the_writer() {
    // The background and checkpoint threads allocate past what the writer has taken
    // (`Writer::alloc`). A close must give all of it back, also when the tail ends
    // exactly where the writer's allocation does.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ahead.mkv");
    let store = Store::open(&path, Options::default().durability(Durability::None)).expect("open");
    for i in 0..1_000u32 {
        store.put(i.to_le_bytes(), [9u8; 100]).expect("put");
    }
    let end = {
        let mut w = store.inner.writer.lock();
        let file = Arc::clone(&w.file);
        store.inner.allocate_for(&file, 8 << 20);
        assert!(file.len().expect("len") > w.alloc + (8 << 20) - 1);
        w.alloc = crate::format::page_up(w.end);
        w.end
    };
    store.close().expect("close");
    let len = std::fs::metadata(&path).expect("metadata").len();
    assert!(
        len <= crate::format::page_up(end) + (1 << 20),
        "a closed store of {end} log bytes kept {len} bytes"
    );
}

#[test]
fn a_stale_lookup_hint_changes_no_answer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(
        dir.path().join("hint.mkv"),
        Options::default()
            .durability(Durability::None)
            .checkpoint_keys(2_000),
    )
    .expect("open");
    let key = |i: u32| format!("hint-key-{i}");
    for i in 0..20_000u32 {
        store.put(key(i), i.to_le_bytes()).expect("put");
    }
    // Lookups start the filter's build; wait until lookups use it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while store.stats().key_filter_bytes == 0 || store.inner.lookup_hint.get().2 == 0 {
        assert!(std::time::Instant::now() < deadline, "no filter was built");
        let _ = store.get(b"nudge").expect("get");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let seed = store.inner.state.read().seed;
    assert_eq!(store.inner.lookup_hint.get().0, seed);
    for i in (0..20_000u32).step_by(7) {
        store.inner.lookup_hint.scramble();
        assert_eq!(
            store.get(key(i)).expect("get").as_deref(),
            Some(&i.to_le_bytes()[..]),
            "key {i} after a wrong hint"
        );
        store.inner.lookup_hint.scramble();
        assert_eq!(store.get(key(i + 50_000)).expect("get"), None);
    }
    // A lookup brings the hint back to the view.
    let _ = store.get(key(1)).expect("get");
    let (s, base, blocks, index_addr, index_buckets) = store.inner.lookup_hint.get();
    assert_eq!(s, seed);
    assert!(base != 4096 && blocks != 3);
    let st = store.inner.state.read();
    assert_eq!(index_buckets, st.index.buckets);
    assert_eq!(index_addr, st.map.base_addr() + st.index.off as usize);
    drop(st);
    store.close().expect("close");
}

/// Stores whose index changes (`Inner::change_index`) stop after their change is made,
/// with the index sequences still odd, until the test takes them out of the list: a
/// niced checkpoint thread that lost its core in the middle of a bucket write (unit
/// tests only). And the stores that got there.
static STALLED_INDEX_CHANGES: Mutex<Vec<usize>> = Mutex::new(Vec::new());
static INDEX_CHANGES_REACHED: Mutex<Vec<usize>> = Mutex::new(Vec::new());

/// Called by `Inner::change_index` after its change, before the sequences are even
/// again (unit tests only).
pub(super) fn index_change_made(inner: &Inner) {
    let me = std::ptr::from_ref(inner) as usize;
    if STALLED_INDEX_CHANGES.lock().contains(&me) {
        INDEX_CHANGES_REACHED.lock().push(me);
    }
    while STALLED_INDEX_CHANGES.lock().contains(&me) {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// What a lookup in a listed store runs before (`false`) and after (`true`) its probe,
/// once each (unit tests only).
type LookupHook = Box<dyn FnMut(bool) + Send>;
static LOOKUP_HOOKS: Mutex<Vec<(usize, LookupHook)>> = Mutex::new(Vec::new());

/// Called by a lookup in the writer's own store around its probe (unit tests only).
pub(super) fn lookup_hook(inner: &Inner, after: bool) {
    let me = std::ptr::from_ref(inner) as usize;
    let mut hooks = LOOKUP_HOOKS.lock();
    if let Some(i) = hooks.iter().position(|h| h.0 == me) {
        (hooks[i].1)(after);
        if after {
            drop(hooks.remove(i));
        }
    }
}

/// Regression: a bucket write held the exclusive state lock, so the writer's next
/// commit waited for as long as the (niced) checkpoint thread making it was off the
/// CPU: 15-39 ms at 20M keys. Here a checkpoint stops in the middle of a bucket write;
/// puts still complete, and everything is there once it goes on.
#[test]
fn a_put_does_not_wait_for_a_bucket_write_in_progress() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(open_unsynced(&dir.path().join("stalled.mkv"), 1_000, false));
    for i in 0..3_000u32 {
        store.put(i.to_le_bytes(), b"before").expect("put");
    }
    wait_for_job(&store);
    let me = std::ptr::from_ref(&*store.inner) as usize;
    let stalled = Listed::new(&STALLED_INDEX_CHANGES, me);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut i = 3_000u32;
    while !INDEX_CHANGES_REACHED.lock().contains(&me) {
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint wrote buckets"
        );
        store.put(i.to_le_bytes(), b"before").expect("put");
        i += 1;
        std::thread::sleep(std::time::Duration::from_micros(100));
    }
    // A checkpoint is in the middle of a bucket write. Fewer puts than start the next
    // checkpoint (which would wait for this one, by design).
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = Arc::clone(&store);
    std::thread::spawn(move || {
        let r = (0..100u32).try_for_each(|j| writer.put(format!("during-{j}"), b"during"));
        let _ = tx.send(r);
    });
    let done = rx.recv_timeout(std::time::Duration::from_secs(60));
    drop(stalled);
    INDEX_CHANGES_REACHED.lock().retain(|&a| a != me);
    assert!(
        matches!(done, Ok(Ok(()))),
        "puts waited for a stalled bucket write: {done:?}"
    );
    wait_for_job(&store);
    for j in 0..100u32 {
        assert_eq!(
            store.get(format!("during-{j}")).expect("get").as_deref(),
            Some(&b"during"[..])
        );
    }
    for k in 0..i {
        assert_eq!(
            store.get(k.to_le_bytes()).expect("get").as_deref(),
            Some(&b"before"[..])
        );
    }
    store.verify().expect("verify");
}

/// A lookup whose bucket is rewritten while it probes (here: zeroed before the probe,
/// put back after it) notices from the index sequence and looks up again: it answers
/// from the bucket as it is, never from the bytes it read in between.
#[test]
fn a_lookup_that_met_a_bucket_write_looks_up_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("torn.mkv");
    let opts = Options::default().durability(Durability::None);
    let store = Store::open(&path, opts.clone()).expect("open");
    for i in 0..2_000u32 {
        store
            .put(format!("torn-{i}"), i.to_le_bytes())
            .expect("put");
    }
    store.close().expect("close");
    // Reopened after a clean close: every key is in the buckets, none in a delta.
    let store = Store::open(&path, opts).expect("reopen");
    let key = b"torn-77";
    assert_eq!(
        store.get(key).expect("get").as_deref(),
        Some(&77u32.to_le_bytes()[..])
    );
    let (file, off, saved) = {
        let st = store.inner.state.read();
        assert!(st.delta.is_empty() && st.frozen.is_none());
        let off = st
            .index
            .bucket_off(bucket_of(key_hash(st.seed, key), st.index.buckets));
        let saved = st.map.read(off, PAGE).expect("bucket").to_vec();
        (Arc::clone(&st.file), off, saved)
    };
    let inner = Arc::clone(&store.inner);
    let me = std::ptr::from_ref(&*inner) as usize;
    let gated0 = inner.gated_lookups.load(Ordering::Relaxed);
    let write = move |bytes: &[u8]| {
        inner.index_seq.0.fetch_add(1, Ordering::AcqRel);
        file.write_at(bytes, off).expect("write the bucket");
        inner.index_seq.0.fetch_add(1, Ordering::AcqRel);
    };
    let zeros = vec![0u8; saved.len()];
    LOOKUP_HOOKS.lock().push((
        me,
        Box::new(move |after| write(if after { &saved } else { &zeros })),
    ));
    let got = store.get(key);
    LOOKUP_HOOKS.lock().retain(|h| h.0 != me);
    assert_eq!(got.expect("get").as_deref(), Some(&77u32.to_le_bytes()[..]));
    assert_eq!(
        store.inner.gated_lookups.load(Ordering::Relaxed) - gated0,
        1,
        "the lookup did not look up again"
    );
    store.verify().expect("verify");
}

/// Regression: compaction's snapshot copied a checkpoint's frozen delta into a buffer
/// that started empty and doubled as the pieces came in, each doubling under the read
/// lock (the kernel mapping and zeroing the new buffer meanwhile): at 20M keys the
/// writer waited up to 40 ms for one piece. The buffer is now sized before the copy.
#[test]
fn a_compaction_snapshot_grows_no_buffer_while_it_copies_a_frozen_delta() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open_unsynced(&dir.path().join("frozen.mkv"), 2_000, false);
    for i in 0..20_000u32 {
        store.put(i.to_le_bytes(), b"before").expect("put");
    }
    wait_for_job(&store);
    let me = std::ptr::from_ref(&*store.inner) as usize;
    let stalled = Listed::new(&STALLED_CHECKPOINTS, me);
    // Writes until a checkpoint freezes the delta (and waits to start): the live delta
    // is then small, so the snapshot reads the writes after the freeze from the log
    // instead of waiting for that checkpoint.
    let mut i = 0u32;
    let frozen = loop {
        store
            .put((100_000 + i).to_le_bytes(), b"frozen")
            .expect("put");
        i += 1;
        let st = store.inner.state.read();
        if let Some(f) = &st.frozen {
            assert!(st.delta.len() * 16 <= 20_000, "setup: a large live delta");
            break f.delta.len();
        }
        assert!(i < 10_000, "setup: no checkpoint froze the delta");
    };
    assert!(frozen >= 1_000, "setup: no large frozen delta ({frozen})");
    let before = crate::anon::growths_on_this_thread();
    let (_, offsets, _) = super::compact::snapshot(&store.inner).expect("snapshot");
    let grown = crate::anon::growths_on_this_thread() - before;
    drop(stalled);
    assert_eq!(offsets.len(), 20_000 + i as usize);
    assert_eq!(grown, 0, "the snapshot grew a buffer {grown} times");
    wait_for_job(&store);
    store.verify().expect("verify");
}
