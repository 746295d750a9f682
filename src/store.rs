//! [`Store`]: the public handle, the write path, group commit and checkpoints.
//!
//! # Commit protocol
//!
//! A write (a put, a delete or a whole [`Batch`]) is applied in these steps, all under
//! the writer mutex, so writes are totally ordered by their position in the log:
//!
//! 1. The first write after open writes a checkpoint slot with state DIRTY and syncs it.
//! 2. The records are encoded (a batch's records carry `BATCH_MORE`, except the last) and
//!    copied to the log tail: `memcpy` into the mapping, or `pwrite` for policies that
//!    sync often (so that write-back writes only the blocks the record touched rather than
//!    a whole large page-cache folio) and for large values.
//! 3. The tail is published, then the delta and counters are updated under the state
//!    lock: from here on readers see the write. The write does not look its key up in
//!    the index buckets (a cache miss, most of an unsynced write's cost): the key counts
//!    as new until a reader of the counters (`len`, `stats`) or the next checkpoint,
//!    which probes the bucket anyway, finds the record it replaced.
//! 4. The durability policy runs: `Always` waits for a sync covering the write (group
//!    commit: one leader syncs for everyone waiting), `Async` starts write-back.
//!
//! # Checkpoint protocol
//!
//! When the delta grows large (`Options::checkpoint_keys`), or at clean close, its
//! changes are written into the index buckets in the file. The first case runs on a
//! thread of its own (`start_checkpoint`): the writer *freezes* the delta and goes on
//! into a new one; readers look in the new delta, then the frozen one, then the buckets.
//! The checkpoint covers the log up to the end at the freeze:
//!
//! 1. Write a checkpoint slot with state CHECKPOINTING and sync it (`fdatasync`, which
//!    also makes the log durable: no bucket can ever point at a record that is not).
//! 2. Rewrite every affected bucket (`pwrite`, under the exclusive state lock per bucket),
//!    after checking its CRC, then sync. A damaged bucket is never re-sealed: the index
//!    is rebuilt from the log instead.
//!    Probing a bucket for a key also finds the record the key replaced, which settles
//!    the counters for the writes that deferred that lookup.
//! 3. Write a checkpoint slot (DIRTY, or CLEAN at close) whose `log_end` is the end it
//!    covers, and sync it. Drop the (frozen) delta.
//!
//! A crash before step 1 completes leaves the old checkpoint: buckets untouched, replay
//! from its `log_end`. A crash between 1 and 3 leaves CHECKPOINTING: buckets may be torn,
//! so the index is rebuilt from the log. When the index must grow, steps 1-2 are replaced
//! by writing a whole new index region, claimed by the writer behind a JUMP record at the
//! tail (the old region is not touched), so growth never needs a rebuild. A background
//! checkpoint that fails without poisoning the store (a damaged or full bucket) leaves the
//! frozen delta in place; the writer then rebuilds the index from the log.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex, RwLock};

use crate::anon::AnonVec;
use crate::batch::{Batch, Op};
use crate::error::{Error, Result};
use crate::format::{
    bucket_of, checkpoint_off, encode_checkpoint, encode_record, page_up, record_len,
    CheckpointInfo, RecordRef, FLAG_BATCH_MORE, JUMP_LEN, KIND_DELETE, KIND_JUMP, KIND_PUT, PAGE,
    SLOTS_PER_BUCKET, STATE_CHECKPOINTING, STATE_CLEAN, STATE_DIRTY,
};
use crate::index::DeltaEntry;
use crate::index::{key_hash, probe, BucketBuf, BucketFull};
use crate::iter::Iter;
use crate::map::{FileHandle, Mapping, SyncEvent, TailWriter};
use crate::options::{Durability, Options};
use crate::state::{header_in, key_in, Frozen, IndexGeom, Resolved, State};
use crate::stats::{RecoveryReport, Stats};

/// Checkpoint when the delta holds `Options::checkpoint_keys` keys, or when this many log bytes were appended since the last checkpoint (bounds the
/// replay after a crash).
const REPLAY_MAX: u64 = 256 << 20;
/// Deferred index lookups done per hold of the state lock (see `resolve_counters`):
/// a few milliseconds at most.
const RESOLVE_CHUNK: usize = 16_384;
/// Values at least this large are appended with `pwrite` even under `None`/`Periodic`,
/// so the copy does not happen while holding the mapping's tail.
const PWRITE_THRESHOLD: usize = 256 << 10;
/// Grow the index when the average bucket is this full...
const MAX_LOAD: f64 = 0.70;
/// ... to a size where it is at most this full.
const GROW_LOAD: f64 = 0.40;
/// Under `Async`, a background `fdatasync` at least this often bounds the window at risk
/// (write-back alone never flushes the device cache nor persists size changes).
pub(crate) const ASYNC_BOUND: std::time::Duration = std::time::Duration::from_secs(1);
/// Writers waiting for a sync yield (rather than sleep) if syncs take at most this long.
const SPIN_MAX: std::time::Duration = std::time::Duration::from_micros(200);
/// Longest a group-commit leader waits for the other writers before syncing.
const GROUP_WAIT_MAX: std::time::Duration = std::time::Duration::from_micros(500);
/// Window of real zeros kept ahead of the tail under `Always`/`Async`.
const ZERO_AHEAD: u64 = 1 << 20;
/// Window kept prefaulted writable ahead of the tail under `None`/`Periodic`.
const PREFAULT_WINDOW: u64 = 4 << 20;
/// `None`/`Periodic` start write-back of the log behind the tail in steps this large.
const WRITEBACK_STEP: u64 = 8 << 20;
/// The background thread submits write-back in pieces this large (see `background`).
const WRITEBACK_PIECE: u64 = 1 << 20;
/// The largest page-cache folio the log tail can sit in (see `tail_work`).
const TAIL_FOLIO: u64 = 2 << 20;

/// An open mapkv store. `Send + Sync`: share it between threads with `Arc`.
///
/// Readers run concurrently with each other and with the writer; writers are serialized.
/// Dropping the store closes it cleanly (checkpoint + sync); use [`Store::close`] to see
/// errors from that.
///
/// Changing the file from outside mapkv while it is open (another program writing or
/// truncating it) is unsupported: the store locks the file against other mapkv handles,
/// and checks every byte it reads, but a file truncated under a live mapping makes the
/// next access to the lost pages raise `SIGBUS`.
#[derive(Debug)]
pub struct Store {
    inner: Arc<Inner>,
    /// The background thread (see `background`), started by the first write so that
    /// opening a store stays O(1) and read-only use never pays for a thread.
    background: Mutex<Option<JoinHandle<()>>>,
    background_started: AtomicBool,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) path: PathBuf,
    pub(crate) opts: Options,
    pub(crate) seed: u64,
    pub(crate) state: RwLock<State>,
    pub(crate) writer: Mutex<Writer>,
    /// Held by whoever settles deferred index lookups (see `State::resolve`) from more
    /// than one hold of the state lock: a checkpoint, from the moment it reads which delta
    /// entries are unresolved until it has taken them into the counters, and
    /// `resolve_counters`. Without it, both could count the same old record. Taken
    /// before the state lock, after the writer mutex.
    pub(crate) resolving: Mutex<()>,
    /// The checkpoint slots. Held by a background checkpoint for its whole run, and by
    /// anyone else only to write a slot (never while a background checkpoint runs: the
    /// writer waits for it first). Taken after `resolving`, before the state lock.
    slots: Mutex<Slots>,
    /// `State::writes`, readable without the state lock (a group-commit leader polls it
    /// while it waits for the other writers).
    published_writes: AtomicU64,
    /// Bumped (under the sync mutex) whenever a sync finishes or syncs resume: what a
    /// waiting writer watches.
    syncs_done: AtomicU64,
    sync: Mutex<SyncState>,
    sync_cv: Condvar,
    poisoned: AtomicBool,
    /// Bumped by every growth of the file (before data in the new space is published).
    /// A sync that samples epoch E with its target and then runs `fdatasync` makes every
    /// size change up to E durable; `SyncState::size_epoch` remembers the last such E.
    size_epoch: AtomicU64,
    /// Bumped (under the exclusive state lock) when compaction switches files: log
    /// offsets of different generations are not comparable. A write of an older
    /// generation is durable: compaction synced a file holding every published write.
    file_gen: AtomicU64,
    syncs: AtomicU64,
    bytes_synced: AtomicU64,
    checkpoints: AtomicU64,
    /// Work for the background thread, and its stop flag.
    background: Mutex<Background>,
    background_cv: Condvar,
    pub(crate) recovery: Mutex<RecoveryReport>,
}

/// What the write path hands to the background thread (`None`/`Periodic` only), so the
/// writer does not pay for it: page faults on the log ahead of the tail and write-back
/// submission behind it were a fifth of an unsynced put's CPU time.
#[derive(Debug, Default)]
struct Background {
    stop: bool,
    /// Prefault `[from, to)` of this mapping writable (`MADV_POPULATE_WRITE`).
    prefault: Option<(Arc<crate::map::Mapping>, u64, u64)>,
    /// Start write-back of `[from, to)` of this file (`sync_file_range`).
    writeback: Option<(Arc<FileHandle>, u64, u64)>,
}

impl Background {
    /// Adds a range to a pending one of the same mapping or file (ranges only grow).
    fn merge<T>(slot: &mut Option<(Arc<T>, u64, u64)>, new: (Arc<T>, u64, u64)) {
        *slot = Some(match slot.take() {
            Some((t, from, to)) if Arc::ptr_eq(&t, &new.0) => (t, from.min(new.1), to.max(new.2)),
            _ => new,
        });
    }
}

/// The checkpoint slots in the file (see [`Inner::slots`]).
#[derive(Debug)]
struct Slots {
    /// The checkpoint slot last written (or read at open).
    last: CheckpointInfo,
    /// Old index regions to release once no checkpoint slot can refer to them:
    /// (offset, length, seq of the checkpoint that stopped using it).
    pending_punch: Vec<(u64, u64, u64)>,
}

/// A checkpoint running on its own thread (see `Inner::start_checkpoint`).
#[derive(Debug)]
struct Job {
    thread: JoinHandle<Result<()>>,
    plan: JobPlan,
}

/// What a checkpoint does (on its own thread, or on the writer's): write the frozen delta
/// into the index, in place or into a new, larger region the writer already claimed;
/// `log_end` is the log end the frozen delta covers, which its final slot records.
#[derive(Debug, Clone)]
struct JobPlan {
    file: Arc<FileHandle>,
    log_end: u64,
    old: IndexGeom,
    /// The claimed region, and whether the old region is real space before it (to be
    /// counted dead and released).
    grow: Option<(IndexGeom, bool)>,
    /// State of the final slot: DIRTY, or CLEAN for the checkpoint of a clean close.
    fin: u32,
}

/// Writer-side state, behind the writer mutex.
#[derive(Debug)]
pub(crate) struct Writer {
    pub(crate) tail: TailWriter,
    pub(crate) file: Arc<FileHandle>,
    /// Offset where the next record goes (== published end).
    pub(crate) end: u64,
    /// Allocated file length.
    pub(crate) alloc: u64,
    /// The log end that the last checkpoint, finished or running, covers.
    ckpt_end: u64,
    /// The background checkpoint, if one was started and not yet joined.
    job: Option<Job>,
    /// Where the delta's next insert will probe (see `SlotHint`).
    delta_hint: crate::index::SlotHint,
    /// After a checkpoint failed without poisoning the store (a full disk while growing
    /// the index, say): the write count at which the next one is tried, and the gap that
    /// doubles with each failure, so a lasting failure does not cost every write an
    /// attempt (a repair rescans the whole log).
    retry_at: u64,
    retry_gap: u64,
    /// A DIRTY checkpoint was written in this session.
    pub(crate) dirty_marked: bool,
    buf: Vec<u8>,
    prefaulted: u64,
    /// Under `None`/`Periodic`: write-back of the log was started up to here.
    written_back: u64,
    /// Under `Always`/`Async`: `[end, zeroed)` holds real zeros written by us (not
    /// unwritten extents), so an append there needs no extent conversion at sync time.
    zeroed: u64,
    /// Writes applied (a batch counts once).
    pub(crate) writes: u64,
}

#[derive(Debug, Default)]
struct SyncState {
    durable_end: u64,
    durable_writes: u64,
    /// The growth epoch made durable by the last `fdatasync`.
    size_epoch: u64,
    /// A sync is running.
    syncing: bool,
    /// Compaction is switching files: no sync may start.
    paused: bool,
    /// Writers asleep until a sync finishes (after yielding for a while, see `sync_to`);
    /// unparked when one does.
    waiters: Vec<std::thread::Thread>,
    /// Writes covered by recent syncs (decays by one per round): how many writers share
    /// syncs right now. A new leader waits briefly for that many writes to be pending.
    batch_hint: u64,
    /// Duration of the last sync; bounds the leader's wait.
    last_sync: std::time::Duration,
}

/// Bytes of address space to reserve for a file of `len` bytes.
pub(crate) fn reservation(len: u64) -> u64 {
    let want = len.saturating_mul(2).max(1 << 30);
    let cap = if usize::BITS >= 64 {
        1u64 << 46
    } else {
        1 << 30
    };
    page_up(want.min(cap.max(len)))
}

impl Writer {
    /// Puts off the next checkpoint attempt after a failed one (see `retry_at`).
    fn backoff(&mut self) {
        self.retry_gap = (self.retry_gap * 2).clamp(1024, 1 << 20);
        self.retry_at = self.writes + self.retry_gap;
    }

    pub(crate) fn new(
        tail: TailWriter,
        file: Arc<FileHandle>,
        end: u64,
        alloc: u64,
        ckpt_end: u64,
    ) -> Self {
        Writer {
            tail,
            file,
            end,
            alloc,
            ckpt_end,
            job: None,
            retry_at: 0,
            retry_gap: 0,
            delta_hint: crate::index::SlotHint::default(),
            dirty_marked: false,
            buf: Vec::new(),
            prefaulted: 0,
            written_back: end,
            zeroed: end,
            writes: 0,
        }
    }
}

/// Consecutive buckets of an index region, rewritten in memory, to write with one `pwrite`.
#[derive(Default)]
struct BucketRun {
    /// Index of the first bucket in `bytes`.
    first: u64,
    bytes: Vec<u8>,
}

impl BucketRun {
    /// Buckets per run (128 KiB): bounds how long one write holds the state lock.
    const MAX: usize = 32;

    fn len(&self) -> u64 {
        (self.bytes.len() / crate::format::BUCKET_SIZE) as u64
    }

    /// True if bucket `b` can be appended to this run.
    fn extends_to(&self, b: u64) -> bool {
        self.bytes.is_empty() || (b == self.first + self.len() && self.len() < Self::MAX as u64)
    }

    /// Appends bucket `b` (the caller checked [`BucketRun::extends_to`]).
    fn push(&mut self, b: u64, buf: &BucketBuf) {
        if self.bytes.is_empty() {
            self.first = b;
        }
        self.bytes.extend_from_slice(&buf.bytes[..]);
    }
}

enum ApplyError {
    Full,
    Other(Error),
}

impl From<Error> for ApplyError {
    fn from(e: Error) -> Self {
        ApplyError::Other(e)
    }
}

impl Inner {
    pub(crate) fn new(
        path: PathBuf,
        opts: Options,
        seed: u64,
        state: State,
        writer: Writer,
        ckpt: CheckpointInfo,
    ) -> Self {
        let end = writer.end;
        Inner {
            path,
            opts,
            seed,
            state: RwLock::new(state),
            writer: Mutex::new(writer),
            resolving: Mutex::new(()),
            slots: Mutex::new(Slots {
                last: ckpt,
                pending_punch: Vec::new(),
            }),
            published_writes: AtomicU64::new(0),
            syncs_done: AtomicU64::new(0),
            sync: Mutex::new(SyncState {
                durable_end: end,
                ..SyncState::default()
            }),
            sync_cv: Condvar::new(),
            poisoned: AtomicBool::new(false),
            size_epoch: AtomicU64::new(0),
            file_gen: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            bytes_synced: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            background: Mutex::new(Background::default()),
            background_cv: Condvar::new(),
            recovery: Mutex::new(RecoveryReport::default()),
        }
    }

    /// Waits for any sync in flight, then keeps new ones from starting (compaction's file
    /// switch). Must be paired with [`Inner::resume_syncs`].
    pub(crate) fn pause_syncs(&self) {
        let mut s = self.sync.lock();
        while s.syncing || s.paused {
            self.sync_cv.wait(&mut s);
        }
        s.paused = true;
    }

    pub(crate) fn resume_syncs(&self) {
        let mut s = self.sync.lock();
        s.paused = false;
        self.syncs_done.fetch_add(1, Ordering::Release);
        self.sync_cv.notify_all();
        for t in s.waiters.drain(..) {
            t.unpark();
        }
    }

    /// The file generation and the published end of the log in it.
    fn published_end(&self) -> (u64, u64) {
        let st = self.state.read();
        (self.file_gen.load(Ordering::Acquire), st.map.published())
    }

    pub(crate) fn check_not_poisoned(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned);
        }
        Ok(())
    }

    pub(crate) fn poison_pub<T>(&self, e: Error) -> Result<T> {
        self.poison(e)
    }

    pub(crate) fn notify_pub(&self, ev: SyncEvent) {
        self.notify(ev);
    }

    pub(crate) fn notify_path(&self, path: &Path, ev: SyncEvent) {
        if let Some(obs) = &self.opts.sync_observer {
            obs.0.synced(path, ev);
        }
    }

    /// Switches the store to a freshly compacted file (writer mutex held).
    pub(crate) fn install_compacted(&self, w: &mut Writer, c: crate::compact::Compacted) {
        let (old_map, old_file) = {
            let mut st = self.state.write();
            let old_map = std::mem::replace(&mut st.map, Arc::clone(&c.map));
            let old_file = std::mem::replace(&mut st.file, Arc::clone(&c.file));
            st.index = c.index;
            st.log_start = c.log_start;
            st.delta.clear();
            st.frozen = None;
            st.delta_only = false;
            st.counters = c.counters;
            self.file_gen.fetch_add(1, Ordering::AcqRel);
            (old_map, old_file)
        };
        // munmap of the old mapping (and closing the old file) happen outside the lock,
        // so readers are not stalled by them.
        drop((old_map, old_file));
        w.tail = TailWriter::new(c.map);
        w.tail.publish(c.log_end);
        w.file = c.file;
        w.end = c.log_end;
        w.alloc = c.alloc;
        w.ckpt_end = c.ckpt.log_end;
        (w.retry_at, w.retry_gap) = (0, 0);
        *self.slots.lock() = Slots {
            last: c.ckpt,
            pending_punch: Vec::new(),
        };
        w.dirty_marked = false;
        w.prefaulted = 0;
        w.written_back = c.log_end;
        w.zeroed = c.log_end;
        let mut s = self.sync.lock();
        s.size_epoch = self.size_epoch.load(Ordering::Acquire);
        s.durable_end = c.log_end;
        s.durable_writes = self.state.read().writes;
    }

    fn check_writable(&self) -> Result<()> {
        if self.opts.read_only {
            return Err(Error::ReadOnly);
        }
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned);
        }
        Ok(())
    }

    fn poison<T>(&self, e: Error) -> Result<T> {
        self.poisoned.store(true, Ordering::Release);
        Err(e)
    }

    fn notify(&self, ev: SyncEvent) {
        if let Some(obs) = &self.opts.sync_observer {
            obs.0.synced(&self.path, ev);
        }
    }

    // ------------------------------------------------------------------ syncing

    /// `fdatasync` of the whole file (checkpoints). Everything published before the call
    /// is durable afterwards.
    pub(crate) fn sync_file(&self, file: &FileHandle) -> Result<()> {
        // The published end, then the growth epoch: a growth bumps the epoch before it
        // publishes anything in the new space, so this epoch covers `end`.
        let (end, writes) = {
            let st = self.state.read();
            (st.map.published(), st.writes)
        };
        let epoch = self.size_epoch.load(Ordering::Acquire);
        if let Err(e) = file.sync_data() {
            return self.poison(e);
        }
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.notify(SyncEvent::File);
        let mut s = self.sync.lock();
        if end > s.durable_end {
            self.bytes_synced
                .fetch_add(end - s.durable_end, Ordering::Relaxed);
            s.durable_end = end;
        }
        s.durable_writes = s.durable_writes.max(writes);
        s.size_epoch = s.size_epoch.max(epoch);
        Ok(())
    }

    /// Makes every byte of the log below `end` durable, sharing syncs between concurrent
    /// callers (group commit). Skips the sync entirely if nothing is dirty.
    /// `gen` is the file generation `end` belongs to (see `file_gen`).
    fn sync_to(&self, gen: u64, end: u64) -> Result<()> {
        let mut s = self.sync.lock();
        loop {
            if self.poisoned.load(Ordering::Acquire) {
                return Err(Error::Poisoned);
            }
            if gen != self.file_gen.load(Ordering::Acquire) {
                return Ok(());
            }
            if s.durable_end >= end && s.size_epoch == self.size_epoch.load(Ordering::Acquire) {
                return Ok(());
            }
            if s.paused || s.syncing {
                let seen = self.syncs_done.load(Ordering::Acquire);
                if !s.paused && s.last_sync <= SPIN_MAX {
                    // A fast sync: yield for about its length before sleeping (as RocksDB's
                    // write thread does). Waking a parked thread costs a context switch
                    // that, with 4 writers on 2 cores, added a fifth to every fast sync.
                    let deadline = std::time::Instant::now() + s.last_sync;
                    drop(s);
                    while self.syncs_done.load(Ordering::Acquire) == seen
                        && std::time::Instant::now() < deadline
                    {
                        std::thread::yield_now();
                    }
                    s = self.sync.lock();
                }
                if self.syncs_done.load(Ordering::Acquire) == seen {
                    // Spurious wake-ups are fine: the state is checked again under the lock.
                    s.waiters.push(std::thread::current());
                    drop(s);
                    std::thread::park();
                    s = self.sync.lock();
                }
                continue;
            }
            // Lead a sync. (Letting a second sync start while one runs was measured:
            // the device does take concurrent flushes, but each then covered fewer writes,
            // 1.6 instead of 3.9 with 4 writers, for 25% fewer writes/s.)
            s.syncing = true;
            let from = s.durable_end;
            let synced_epoch = s.size_epoch;
            let (hint, durable_writes) = (s.batch_hint, s.durable_writes);
            let budget = (s.last_sync / 2).min(GROUP_WAIT_MAX);
            drop(s);
            if hint > 1 {
                // Group commit: the writers that shared the last sync are about to come
                // back (they were just woken). Starting the sync before they append would
                // cover only some of them and leave the rest for another full sync. Wait
                // for them, at most half a sync.
                let deadline = std::time::Instant::now() + budget;
                while self
                    .published_writes
                    .load(Ordering::Acquire)
                    .saturating_sub(durable_writes)
                    < hint
                    && std::time::Instant::now() < deadline
                {
                    std::thread::yield_now();
                }
            }
            let started = std::time::Instant::now();
            // Everything published now is covered by this sync. A growth bumps the epoch
            // before publishing anything in the new space, so `epoch` covers `target`.
            let (map, file, target, writes, epoch, sampled_gen) = {
                let st = self.state.read();
                let epoch = self.size_epoch.load(Ordering::Acquire);
                (
                    Arc::clone(&st.map),
                    Arc::clone(&st.file),
                    st.map.published(),
                    st.writes,
                    epoch,
                    self.file_gen.load(Ordering::Acquire),
                )
            };
            let r = if epoch != synced_epoch {
                file.sync_data().map(|()| SyncEvent::File)
            } else {
                let start = crate::format::page_down(from.min(target));
                map.sync_range(start, target - start)
                    .map(|()| SyncEvent::Range { start, end: target })
            };
            s = self.sync.lock();
            s.syncing = false;
            s.last_sync = started.elapsed();
            self.syncs_done.fetch_add(1, Ordering::Release);
            self.sync_cv.notify_all();
            for t in s.waiters.drain(..) {
                t.unpark();
            }
            if sampled_gen != self.file_gen.load(Ordering::Acquire) {
                // Compaction switched files meanwhile; this sync's offsets are stale.
                continue;
            }
            match r {
                Ok(ev) => {
                    let batch = writes.saturating_sub(s.durable_writes);
                    s.batch_hint = batch.max(s.batch_hint.saturating_sub(1));
                    self.syncs.fetch_add(1, Ordering::Relaxed);
                    self.notify(ev);
                    if target > s.durable_end {
                        self.bytes_synced
                            .fetch_add(target - s.durable_end, Ordering::Relaxed);
                        s.durable_end = target;
                    }
                    s.durable_writes = s.durable_writes.max(writes);
                    if matches!(ev, SyncEvent::File) {
                        s.size_epoch = s.size_epoch.max(epoch);
                    }
                }
                Err(e) => {
                    self.poisoned.store(true, Ordering::Release);
                    return Err(e);
                }
            }
        }
    }

    // ------------------------------------------------------------------ space

    /// Makes sure `[0, need)` is allocated (and mapped), growing the file geometrically.
    fn ensure_space(&self, w: &mut Writer, need: u64) -> Result<()> {
        if need <= w.alloc {
            return Ok(());
        }
        let step = w.alloc.clamp(1 << 20, 1 << 30);
        let mut new_len = page_up(need.max(w.alloc + step));
        if let Err(e) = w.file.allocate(w.alloc, new_len - w.alloc) {
            // The geometric step may not fit on a nearly full disk; the exact need may.
            let exact = page_up(need);
            if exact >= new_len {
                return Err(e);
            }
            w.file.allocate(w.alloc, exact - w.alloc)?;
            new_len = exact;
        }
        if new_len > w.tail.mapping().reserved() {
            let map = Arc::new(Mapping::new(
                &w.file,
                reservation(new_len),
                w.tail.mapping().published(),
                true,
            )?);
            map.advise(self.opts.access)?;
            w.tail.replace(Arc::clone(&map));
            let old = std::mem::replace(&mut self.state.write().map, map);
            // Unmapping takes time (page tables); do it after releasing the state lock.
            drop(old);
            w.prefaulted = 0;
        }
        // Only now, with the space mapped, may anything be published in it.
        w.alloc = new_len;
        self.size_epoch.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Keeps a window of real zeros ahead of the tail (`pwrite` of zeros, write-back
    /// started at once). `posix_fallocate` leaves *unwritten* extents: the first append
    /// into each of their blocks makes the next sync also write extent metadata, which
    /// measured p99 `Always` latency at 2.5x p50 instead of 1.6x. Best effort.
    fn zero_ahead(w: &mut Writer, need: u64) {
        if need + ZERO_AHEAD / 2 <= w.zeroed {
            return;
        }
        let from = w.zeroed.max(page_up(need));
        let to = (from + ZERO_AHEAD).min(w.alloc);
        if to <= from {
            return;
        }
        let zeros = vec![0u8; (to - from) as usize];
        if w.file.write_at(&zeros, from).is_ok() {
            let _ = w.file.start_writeback(from, to - from);
            w.zeroed = to;
        }
    }

    /// Under `None`/`Periodic`, asks the background thread to keep the log ahead of the
    /// tail prefaulted writable and to start write-back of what the tail has left behind.
    ///
    /// - Ahead: `MADV_POPULATE_WRITE` of the next `PREFAULT_WINDOW` (the only real write
    ///   prefault: `MAP_POPULATE` maps shared pages read-only), so appends take no page
    ///   fault. Those pages are dirty zeros until written; a sync meanwhile writes them.
    /// - Behind: `sync_file_range(WRITE)` in steps of `WRITEBACK_STEP` (no wait, no device
    ///   flush). The next checkpoint's (or periodic) sync must write those pages anyway;
    ///   started early, the device does it while the writer goes on, and that sync finds
    ///   them clean: the first sync of a checkpoint after 450k puts fell from ~35 ms to
    ///   ~5 ms. The tail's own (up to 2 MiB) folio is left alone: writing it back would
    ///   write-protect the page that the next append stores into.
    fn tail_work(&self, w: &mut Writer) {
        let mut prefault = None;
        if w.end + PREFAULT_WINDOW / 2 >= w.prefaulted {
            let from = crate::format::page_down(w.end.max(w.prefaulted));
            let to = (from + PREFAULT_WINDOW).min(w.alloc);
            if to > from {
                prefault = Some((Arc::clone(w.tail.mapping()), from, to));
                w.prefaulted = to;
            }
        }
        let mut writeback = None;
        let behind = w.end & !(TAIL_FOLIO - 1);
        if behind >= w.written_back + WRITEBACK_STEP {
            writeback = Some((Arc::clone(&w.file), w.written_back, behind));
            w.written_back = behind;
        }
        if prefault.is_none() && writeback.is_none() {
            return;
        }
        let mut bg = self.background.lock();
        if let Some(p) = prefault {
            Background::merge(&mut bg.prefault, p);
        }
        if let Some(wb) = writeback {
            Background::merge(&mut bg.writeback, wb);
        }
        self.background_cv.notify_all();
    }

    // ------------------------------------------------------------------ writes

    fn mark_dirty(&self, w: &mut Writer) -> Result<()> {
        if w.dirty_marked {
            return Ok(());
        }
        {
            let mut slots = self.slots.lock();
            let mut c = slots.last;
            c.state = STATE_DIRTY;
            self.write_slot(&mut slots, &w.file, c)?;
        }
        if let Err(e) = w.file.sync_data() {
            return self.poison(e);
        }
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.notify(SyncEvent::File);
        w.dirty_marked = true;
        Ok(())
    }

    /// Writes `c` into the slot after `slots.last` (they alternate). Not synced.
    fn write_slot(
        &self,
        slots: &mut Slots,
        file: &FileHandle,
        mut c: CheckpointInfo,
    ) -> Result<()> {
        c.seq = slots.last.seq + 1;
        let bytes = encode_checkpoint(self.seed, &c);
        let slot = (c.seq % 2) as usize;
        if let Err(e) = file.write_at(&bytes, checkpoint_off(slot)) {
            return self.poison(e);
        }
        slots.last = c;
        Ok(())
    }

    /// [`Inner::write_slot`] for a caller that does not hold the slots.
    fn write_checkpoint(&self, w: &Writer, c: CheckpointInfo) -> Result<()> {
        self.write_slot(&mut self.slots.lock(), &w.file, c)
    }

    /// Applies one write (a single op or a batch) atomically. Returns the log end after
    /// it, or `None` if `only_if_present` is set and the (single) key does not exist, in
    /// which case nothing is written.
    fn write_ops(
        self: &Arc<Self>,
        ops: &[(u8, &[u8], &[u8])],
        only_if_present: bool,
    ) -> Result<Option<u64>> {
        self.check_writable()?;
        if ops.is_empty() {
            return Ok(Some(0));
        }
        let mut total = 0u64;
        for &(_, k, v) in ops {
            if k.len() > self.opts.max_key_size {
                return Err(Error::KeyTooLarge {
                    len: k.len(),
                    max: self.opts.max_key_size,
                });
            }
            if v.len() > self.opts.max_value_size {
                return Err(Error::ValueTooLarge {
                    len: v.len(),
                    max: self.opts.max_value_size,
                });
            }
            total += record_len(k.len(), v.len());
        }
        let pwrite = matches!(self.opts.durability, Durability::Always | Durability::Async);
        let mut w = self.writer.lock();
        if w.job.as_ref().is_some_and(|j| j.thread.is_finished()) {
            // A failed repair is retried by a later checkpoint; this write goes on.
            if let Err(e) = self.finish_job(&mut w) {
                if self.poisoned.load(Ordering::Acquire) {
                    return Err(e);
                }
                w.backoff();
            }
        }
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned);
        }
        let hash0 = key_hash(self.seed, ops[0].1);
        if only_if_present {
            let st = self.state.read();
            if st.find_live(hash0, ops[0].1)?.is_none() {
                return Ok(None);
            }
        }
        self.mark_dirty(&mut w)?;
        // The first key's delta slot: fetched while the record is encoded and copied,
        // rather than missed under the state lock.
        if let Some(addr) = w.delta_hint.addr(hash0) {
            crate::map::prefetch_write_addr(addr);
        }
        let base = w.end;
        self.ensure_space(&mut w, base + total)?;
        let mut buf = std::mem::take(&mut w.buf);
        buf.clear();
        for (i, &(kind, k, v)) in ops.iter().enumerate() {
            let flags = if i + 1 < ops.len() {
                FLAG_BATCH_MORE
            } else {
                0
            };
            let off = base + buf.len() as u64;
            encode_record(&mut buf, self.seed, off, kind, flags, k, v);
        }
        if pwrite {
            Self::zero_ahead(&mut w, base + total);
        }
        let alloc = w.alloc;
        let r = if pwrite || buf.len() >= PWRITE_THRESHOLD {
            w.file.write_at(&buf, base)
        } else {
            let r = w.tail.write(base, &buf, alloc);
            // Where the next append goes: its cache-line misses then overlap this write's
            // work instead of stalling the next one at its first locked instruction.
            w.tail.prefetch_write(base + total, 256, alloc);
            r
        };
        if let Err(e) = r {
            w.buf = buf;
            return self.poison(e);
        }
        let end = base + buf.len() as u64;
        w.buf = buf;
        // Auto-compaction reads the counters after every write: keep them exact, unless
        // a checkpoint is settling them right now (it holds `resolving` for its run).
        let resolving = self
            .opts
            .auto_compact
            .and_then(|_| self.resolving.try_lock());
        let delta_len = {
            let mut st = self.state.write();
            w.tail.publish(end);
            let mut off = base;
            for (i, &(kind, k, v)) in ops.iter().enumerate() {
                let rec = RecordRef {
                    offset: off,
                    kind,
                    flags: 0,
                    key_len: k.len() as u32,
                    val_len: v.len() as u32,
                };
                off = rec.end();
                let hash = if i == 0 {
                    hash0
                } else {
                    key_hash(self.seed, k)
                };
                st.apply(hash, k, &rec);
            }
            w.delta_hint = st.delta.slot_hint();
            if resolving.is_some() {
                st.resolve(usize::MAX);
            }
            st.writes += 1;
            self.published_writes.store(st.writes, Ordering::Release);
            st.delta.len()
        };
        drop(resolving);
        w.end = end;
        w.writes += 1;
        let since = end - w.ckpt_end;
        let gen = self.file_gen.load(Ordering::Acquire);
        let due = delta_len >= self.opts.checkpoint_keys || since >= REPLAY_MAX;
        if due && w.writes >= w.retry_at {
            // The write itself is applied. A checkpoint that fails without poisoning the
            // store (a full disk while growing the index) is retried by a later write; one
            // that poisoned it (a failed sync) must not let this write be acknowledged.
            match self.start_checkpoint(&mut w) {
                Ok(()) => w.retry_gap = 0,
                Err(e) if self.poisoned.load(Ordering::Acquire) => return Err(e),
                Err(_) => w.backoff(),
            }
        }
        if !pwrite {
            self.tail_work(&mut w);
        }
        // Async needs the file after the writer mutex is released; take it from here
        // rather than locking the state again.
        let async_file =
            matches!(self.opts.durability, Durability::Async).then(|| Arc::clone(&w.file));
        drop(w);
        match self.opts.durability {
            Durability::Always => self.sync_to(gen, end)?,
            Durability::Async => {
                if let Some(file) = async_file {
                    if let Err(e) = file.start_writeback(base, end - base) {
                        return self.poison(e);
                    }
                }
            }
            Durability::None | Durability::Periodic(_) => {}
        }
        if let Some(ac) = self.opts.auto_compact {
            let c = self.state.read().counters;
            let dead = c.log_bytes.saturating_sub(c.live_bytes) + c.dead_index_bytes;
            if c.log_bytes >= ac.min_log_bytes && dead as f64 > ac.dead_ratio * c.log_bytes as f64 {
                // The write is applied (and durable as its policy promised): a failed
                // compaction must not make it look failed. A failure that matters
                // poisoned the store, and the next write reports it.
                let _ = crate::compact::compact(self);
            }
        }
        Ok(Some(end))
    }

    // ------------------------------------------------------------------ checkpoints

    /// Writes the delta into the index (see the module docs) on this thread, ending in
    /// state `fin`: the steps of a background checkpoint (`freeze`, `run_job_locked`), a
    /// rebuild from the log if one failed, or only a new slot if nothing changed.
    ///
    /// No separate log sync is needed first: the in-place path makes a CHECKPOINTING slot
    /// durable (with an `fdatasync` that also writes the log) before touching a bucket, and
    /// the growth path writes only into unused space until one sync covers log and index.
    pub(crate) fn checkpoint(&self, w: &mut Writer, fin: u32) -> Result<()> {
        let _resolving = self.resolving.lock();
        let (keys, delta_only, delta_empty, frozen) = {
            let st = self.state.read();
            (
                st.counters.live_keys,
                st.delta_only,
                st.delta.is_empty(),
                st.frozen.is_some(),
            )
        };
        let logged_end = self.slots.lock().last.log_end;
        let r = if frozen {
            // Left by a failed background checkpoint (callers collect a running one
            // first, see `finish_job`): its buckets may be half-rewritten.
            self.rebuild_index(w, fin)
        } else if delta_only {
            // A rebuilt index, held in the delta alone, sized by its keys. Counters come
            // from the file and may be bogus: bound them by what fits in it.
            let keys = keys.min(w.end / crate::format::RECORD_HEADER as u64);
            self.grow_index(w, buckets_for(keys), fin)
        } else if delta_empty && w.end == logged_end {
            let mut slots = self.slots.lock();
            let mut c = slots.last;
            c.state = fin;
            self.write_slot(&mut slots, &w.file, c)?;
            drop(slots);
            self.sync_file(&w.file)
        } else {
            // The same steps as a background checkpoint, on this thread.
            let plan = self.freeze(w, fin)?;
            match self.run_job_locked(&plan) {
                Ok(()) => Ok(()),
                Err(e) => {
                    self.check_not_poisoned()?;
                    let _ = e;
                    self.mark_frozen_failed();
                    if let Some(claimed) = plan.grow {
                        self.forget_claim(plan.old, claimed);
                    }
                    self.rebuild_index(w, fin)
                }
            }
        };
        if r.is_ok() {
            w.ckpt_end = w.end;
            self.checkpoints.fetch_add(1, Ordering::Relaxed);
            self.release_old_regions(&mut self.slots.lock(), &w.file);
        }
        r
    }

    /// Punches the old index regions that no checkpoint slot refers to any more.
    fn release_old_regions(&self, slots: &mut Slots, file: &FileHandle) {
        // Both slots postdate a switch once the slot seq has moved past it.
        let seq_now = slots.last.seq;
        let (due, keep): (Vec<_>, Vec<_>) =
            slots.pending_punch.drain(..).partition(|p| seq_now > p.2);
        slots.pending_punch = keep;
        if !due.is_empty() {
            // Readers may hold slices over the whole published range: punch (which
            // changes bytes to zeros) only while none is borrowed.
            let _excl = self.state.write();
            for (off, len, _) in due {
                file.punch_hole(off, len);
            }
        }
    }

    // -------------------------------------------------------- background checkpoints

    /// Starts a checkpoint of the delta on a thread of its own, so the writer does not
    /// wait for it (a fifth of a bulk load's time went to checkpoints, and under `None`
    /// their syncs were the only syncs on the write path). The delta is *frozen*: readers
    /// consult it after the new delta the writes go on into, and before the buckets,
    /// until the checkpoint switches to the updated index. Growth claims its new region
    /// here, behind a JUMP at the tail, so the writer appends after it meanwhile.
    ///
    /// A checkpoint still running is waited for first: at most one runs, which bounds
    /// memory to two deltas. A store rebuilding its index from the log (`delta_only`)
    /// checkpoints synchronously.
    fn start_checkpoint(self: &Arc<Self>, w: &mut Writer) -> Result<()> {
        self.finish_job(w)?;
        let (delta_len, delta_only, frozen) = {
            let st = self.state.read();
            (st.delta.len(), st.delta_only, st.frozen.is_some())
        };
        if frozen || delta_only {
            // A failed checkpoint's frozen delta (repaired by a rebuild), or a rebuilt
            // index not yet written: synchronously.
            return self.checkpoint(w, STATE_DIRTY);
        }
        if delta_len == 0 {
            return Ok(());
        }
        let plan = {
            let _resolving = self.resolving.lock();
            self.freeze(w, STATE_DIRTY)?
        };
        let me = Arc::clone(self);
        let job_plan = plan.clone();
        match std::thread::Builder::new()
            .name("mapkv-checkpoint".into())
            .spawn(move || me.run_job(&job_plan))
        {
            Ok(thread) => {
                w.job = Some(Job { thread, plan });
                Ok(())
            }
            // No thread to be had: do the work here.
            Err(_) => {
                let r = self.run_job(&plan);
                self.job_done(w, &plan, r)
            }
        }
    }

    /// Freezes the delta for a checkpoint (see `start_checkpoint`), after claiming a
    /// larger index region if the keys call for one. The caller holds `resolving`.
    fn freeze(&self, w: &mut Writer, fin: u32) -> Result<JobPlan> {
        let (geom, upper, unresolved) = {
            let st = self.state.read();
            (
                st.index,
                st.counters.live_keys,
                st.delta.unresolved_len() as u64,
            )
        };
        let max_keys = (geom.buckets as f64 * SLOTS_PER_BUCKET as f64 * MAX_LOAD) as u64;
        // `upper` counts every unresolved key as new. Each can only replace a key that is
        // in the buckets, so the exact count is at least `lower`.
        let in_buckets = self.slots.lock().last.live_keys;
        let lower = upper.saturating_sub(unresolved.min(in_buckets));
        let keys = if upper > max_keys && lower <= max_keys {
            // Growing on the bound could double the index for nothing.
            self.resolve_by_buckets(geom).live_keys
        } else {
            lower
        };
        let grow = if keys > max_keys {
            // Counters come from the file and may be bogus: bound them by what fits in it.
            let keys = keys.min(w.end / crate::format::RECORD_HEADER as u64);
            Some(self.claim_region(w, buckets_for(keys).max(geom.buckets * 2))?)
        } else {
            None
        };
        {
            let mut st = self.state.write();
            let delta = std::mem::take(&mut st.delta);
            let counters = st.counters;
            st.frozen = Some(Box::new(Frozen {
                delta,
                counters,
                failed: false,
            }));
        }
        w.ckpt_end = w.end;
        Ok(JobPlan {
            file: Arc::clone(&w.file),
            log_end: w.end,
            old: geom,
            grow,
            fin,
        })
    }

    /// After a failed checkpoint (with `resolving` held): its buckets may be
    /// half-rewritten, so its entries are no longer resolved against them.
    fn mark_frozen_failed(&self) {
        if let Some(f) = self.state.write().frozen.as_mut() {
            f.failed = true;
        }
    }

    /// After a failed growth: the region `claimed` (from `claim_region`) is dead space,
    /// and the region `old` stays current.
    fn forget_claim(&self, old: IndexGeom, claimed: (IndexGeom, bool)) {
        let (new, old_real) = claimed;
        let mut st = self.state.write();
        let c = &mut st.counters;
        if old_real {
            c.dead_index_bytes = c.dead_index_bytes.saturating_sub(old.bytes());
        }
        c.dead_index_bytes += new.bytes();
    }

    /// Waits for the background checkpoint, if any, and deals with its outcome.
    ///
    /// # Errors
    /// The checkpoint's error if it poisoned the store. A failure that did not (a damaged
    /// or full bucket) is repaired by rebuilding the index from the log; that repair's
    /// error is returned (the frozen delta then stays, and the next checkpoint retries).
    pub(crate) fn finish_job(&self, w: &mut Writer) -> Result<()> {
        let Some(job) = w.job.take() else {
            return Ok(());
        };
        let r = job.thread.join().unwrap_or(Err(Error::Unsupported(
            "internal: the checkpoint thread panicked",
        )));
        self.job_done(w, &job.plan, r)
    }

    fn job_done(&self, w: &mut Writer, plan: &JobPlan, r: Result<()>) -> Result<()> {
        let Err(e) = r else {
            return Ok(());
        };
        self.check_not_poisoned()?;
        let _ = e;
        if let Some(claimed) = plan.grow {
            self.forget_claim(plan.old, claimed);
        }
        // With the frozen delta still there, this rebuilds the index from the log.
        self.checkpoint(w, STATE_DIRTY)
    }

    /// Claims a new index region of `buckets` buckets after a JUMP record at the tail
    /// (growth). The region reads as zeros until a checkpoint writes it; the writer
    /// appends after it. Returns the region, and whether the old one is real space that
    /// now counts as dead.
    fn claim_region(&self, w: &mut Writer, buckets: u64) -> Result<(IndexGeom, bool)> {
        let jump_at = w.end;
        let new = IndexGeom {
            off: page_up(jump_at + JUMP_LEN),
            buckets,
        };
        let new_log = new.off + new.bytes();
        self.ensure_space(w, new_log + PAGE)?;
        // Only non-empty buckets are written, so the region must read as zeros (space
        // past the tail may hold bytes of an earlier session that were never published).
        w.file.zero_range(new.off, new.bytes())?;
        let mut jump = Vec::with_capacity(JUMP_LEN as usize);
        encode_record(
            &mut jump,
            self.seed,
            jump_at,
            KIND_JUMP,
            0,
            b"",
            &new_log.to_le_bytes(),
        );
        if let Err(e) = w.file.write_at(&jump, jump_at) {
            return self.poison(e);
        }
        let old = self.state.read().index;
        let old_real = region_is_real(old, jump_at);
        {
            let mut st = self.state.write();
            w.tail.publish(new_log);
            st.counters.log_bytes += JUMP_LEN;
            if old_real {
                st.counters.dead_index_bytes += old.bytes();
            }
        }
        w.end = new_log;
        w.prefaulted = 0;
        Ok((new, old_real))
    }

    /// A background checkpoint (see `start_checkpoint`): the checkpoint protocol of the
    /// module docs, for the frozen delta, ending in a DIRTY slot at `plan.log_end`.
    fn run_job(&self, plan: &JobPlan) -> Result<()> {
        let _resolving = self.resolving.lock();
        let r = self.run_job_locked(plan);
        match r {
            Ok(()) => {
                self.checkpoints.fetch_add(1, Ordering::Relaxed);
            }
            // Still under `resolving`: no counter reader can have looked at buckets this
            // job may have rewritten halfway (see `Frozen::failed`).
            Err(_) => self.mark_frozen_failed(),
        }
        r
    }

    /// The checkpoint protocol for the frozen delta, on whichever thread, with
    /// `resolving` held.
    fn run_job_locked(&self, plan: &JobPlan) -> Result<()> {
        let mut slots = self.slots.lock();
        let geom = plan.grow.map_or(plan.old, |g| g.0);
        let (map, entries) = {
            let st = self.state.read();
            let Some(f) = &st.frozen else {
                return Err(Error::Unsupported("internal: no frozen delta"));
            };
            (Arc::clone(&st.map), f.delta.entries())
        };
        let entries = crate::index::sort_by_bucket(entries, geom.buckets);
        let mut gone = Resolved::default();
        let applied = match plan.grow {
            None => {
                let mut c = slots.last;
                c.state = STATE_CHECKPOINTING;
                self.write_slot(&mut slots, &plan.file, c)?;
                self.sync_file(&plan.file)?;
                self.rewrite_buckets(&map, &plan.file, geom, &entries, &mut gone)
            }
            Some((new, _)) => {
                self.build_region(&map, &plan.file, Some(plan.old), new, &entries, &mut gone)
            }
        };
        match applied {
            Ok(()) => {}
            Err(ApplyError::Full) => return Err(Error::Unsupported("index bucket full")),
            Err(ApplyError::Other(e)) => return Err(e),
        }
        self.sync_file(&plan.file)?;
        let counters = {
            let mut st = self.state.write();
            gone.take_from(&mut st.counters);
            let Some(f) = st.frozen.as_mut() else {
                return Err(Error::Unsupported("internal: no frozen delta"));
            };
            gone.take_from(&mut f.counters);
            f.delta.mark_all_resolved();
            f.counters
        };
        let c = CheckpointInfo {
            seq: 0,
            state: plan.fin,
            index_off: geom.off,
            index_buckets: geom.buckets,
            log_end: plan.log_end,
            live_keys: counters.live_keys,
            live_bytes: counters.live_bytes,
            log_bytes: counters.log_bytes,
            dead_index_bytes: counters.dead_index_bytes,
        };
        self.write_slot(&mut slots, &plan.file, c)?;
        self.sync_file(&plan.file)?;
        let frozen = {
            let mut st = self.state.write();
            st.index = geom;
            st.frozen.take()
        };
        // Freeing a large table unmaps memory: not under the lock.
        drop(frozen);
        if let Some((_, true)) = plan.grow {
            // The other slot still points at the old region; release it only after the
            // next checkpoint.
            let seq = slots.last.seq;
            slots
                .pending_punch
                .push((plan.old.off, plan.old.bytes(), seq));
        }
        self.release_old_regions(&mut slots, &plan.file);
        Ok(())
    }

    /// Replays the whole log into a fresh delta (the index in the file is not trusted)
    /// and writes a new index region from it. Readers wait during the scan.
    fn rebuild_index(&self, w: &mut Writer, fin: u32) -> Result<()> {
        // Replayed into a scratch state, so that a damaged record (the scan stops before
        // the end) leaves the store as it was: readers go on meanwhile, and the writer
        // mutex keeps the log and the mapping still.
        let mut scratch = {
            let st = self.state.read();
            State {
                map: Arc::clone(&st.map),
                file: Arc::clone(&st.file),
                seed: st.seed,
                log_start: st.log_start,
                index: st.index,
                delta: crate::index::Delta::default(),
                frozen: None,
                delta_only: true,
                counters: crate::state::Counters {
                    dead_index_bytes: st.counters.dead_index_bytes,
                    ..crate::state::Counters::default()
                },
                writes: st.writes,
            }
        };
        let map = Arc::clone(&scratch.map);
        let (seed, log_start) = (scratch.seed, scratch.log_start);
        let end = crate::log::scan(map.published_bytes(), seed, log_start, w.end, |recs| {
            for r in recs {
                let key = map.read(r.key_off(), u64::from(r.key_len)).unwrap_or(&[]);
                scratch.apply(key_hash(seed, key), key, r);
            }
        });
        if end.valid_end != w.end {
            return Err(Error::corrupt(
                end.valid_end,
                "damaged record in the log: the index cannot be rebuilt (open with salvage)",
            ));
        }
        scratch.counters.log_bytes = end.bytes;
        let keys = scratch.counters.live_keys;
        let old = {
            let mut st = self.state.write();
            st.delta_only = true;
            st.counters = scratch.counters;
            (
                std::mem::replace(&mut st.delta, scratch.delta),
                st.frozen.take(),
            )
        };
        drop(old);
        self.grow_index(w, buckets_for(keys), fin)
    }

    /// Exact counters: finishes the index lookups the write path deferred, a chunk per
    /// hold of the state lock so readers are not stalled by a long backlog.
    pub(crate) fn resolve_counters(&self) -> crate::state::Counters {
        self.collect_failed_job();
        let _resolving = self.resolving.lock();
        self.resolve_counters_locked()
    }

    /// If a background checkpoint failed and the writer has not collected it yet,
    /// collects it: the repair makes the counters exact again (a repair that fails too
    /// leaves them upper bounds until a later one works). Takes the writer mutex.
    pub(crate) fn collect_failed_job(&self) {
        if self.state.read().frozen.as_ref().is_some_and(|f| f.failed) {
            let mut w = self.writer.lock();
            let _ = self.finish_job(&mut w);
        }
    }

    /// [`Inner::resolve_counters`] for a caller that holds `resolving`.
    pub(crate) fn resolve_counters_locked(&self) -> crate::state::Counters {
        loop {
            {
                let st = self.state.read();
                if st.settled() {
                    return st.counters;
                }
            }
            let mut st = self.state.write();
            st.resolve(RESOLVE_CHUNK);
            if st.settled() {
                return st.counters;
            }
        }
    }

    fn counters_ckpt(&self, fin: u32, geom: IndexGeom, log_end: u64) -> CheckpointInfo {
        let st = self.state.read();
        CheckpointInfo {
            seq: 0,
            state: fin,
            index_off: geom.off,
            index_buckets: geom.buckets,
            log_end,
            live_keys: st.counters.live_keys,
            live_bytes: st.counters.live_bytes,
            log_bytes: st.counters.log_bytes,
            dead_index_bytes: st.counters.dead_index_bytes,
        }
    }

    /// Applies one delta entry to `buf`, which holds the entry's bucket as of the last
    /// checkpoint plus the other entries applied so far (each key appears once in the
    /// delta, so a slot found for this key is its old, checkpointed record: if the entry
    /// is unresolved, that record is counted into `gone`). The entry's record is read only
    /// if the bucket holds a slot with the same hash (to compare keys).
    fn apply_entry(
        map: &Mapping,
        buf: &mut BucketBuf,
        e: DeltaEntry,
        gone: &mut Resolved,
    ) -> Result<(), ApplyError> {
        let mut key: Option<&[u8]> = None;
        let mut old = None;
        let found = probe(&buf.bytes[..], e.hash, |o| -> Result<bool> {
            let k = match key {
                Some(k) => k,
                None => *key.insert(key_in(map, &header_in(map, e.off())?)?),
            };
            let r = header_in(map, o)?;
            let hit = r.key_len as usize == k.len() && key_in(map, &r)? == k;
            old = hit.then_some(r);
            Ok(hit)
        })?;
        if let (true, Some(old)) = (e.unresolved(), old) {
            gone.add(&old);
        }
        if !e.delete() {
            buf.upsert(e.hash, e.off(), found.map(|f| f.0))
                .map_err(|BucketFull| ApplyError::Full)?;
        } else if let Some((i, _)) = found {
            buf.remove(i);
        }
        Ok(())
    }

    /// The delta's entries sorted by their bucket in an index of `buckets` buckets.
    fn delta_by_bucket(&self, buckets: u64) -> AnonVec<DeltaEntry> {
        let entries = self.state.read().delta.entries();
        crate::index::sort_by_bucket(entries, buckets)
    }

    /// Settles every deferred lookup with one pass over the index `geom`: each bucket is
    /// read once when the index is large (the entries are sorted by bucket first), and no
    /// delta lookups are needed (unlike the queue that `resolve_counters` works through).
    /// The caller holds the writer and `resolving`.
    fn resolve_by_buckets(&self, geom: IndexGeom) -> crate::state::Counters {
        // An index that fits in the cache is probed in the delta's own order.
        const SORT_ABOVE: u64 = 8 << 20;
        let entries = if geom.bytes() > SORT_ABOVE {
            self.delta_by_bucket(geom.buckets)
        } else {
            self.state.read().delta.entries()
        };
        let mut gone = Resolved::default();
        {
            let st = self.state.read();
            for e in entries.iter().filter(|e| e.unresolved()) {
                // A damaged bucket or record counts as "no old value".
                if let Ok(Some(old)) = st.old_in_index(e.hash, e.off()) {
                    gone.add(&old);
                }
            }
        }
        // The delta stays in use (the checkpoint that wanted these counts may fail): keys
        // added later must still start unresolved.
        let mut st = self.state.write();
        gone.take_from(&mut st.counters);
        st.delta.settle_all();
        st.counters
    }

    /// Takes the old records found while applying the delta out of the counters, before
    /// they are written into a checkpoint. The delta's entries then all count as resolved.
    fn commit_resolved(&self, gone: Resolved) {
        let mut st = self.state.write();
        gone.take_from(&mut st.counters);
        st.delta.mark_all_resolved();
    }

    /// Applies `entries` (sorted by bucket) to the buckets of the current index `geom`
    /// in place. Consecutive rewritten buckets go out in one `pwrite` (each under the
    /// exclusive lock: readers must not see a half-written bucket), and their write-back
    /// starts at once, so the sync that follows mostly waits for I/O already under way.
    ///
    /// `map` is a mapping that holds every record of `entries` and the region (the
    /// writer may replace the state's mapping meanwhile: this one stays valid).
    /// Only checkpoints write buckets, so the buckets read here are stable.
    fn rewrite_buckets(
        &self,
        map: &Mapping,
        file: &FileHandle,
        geom: IndexGeom,
        entries: &[DeltaEntry],
        gone: &mut Resolved,
    ) -> Result<(), ApplyError> {
        let mut run = BucketRun::default();
        let bucket = |e: &DeltaEntry| bucket_of(e.hash, geom.buckets);
        for group in entries.chunk_by(|a, b| bucket(a) == bucket(b)) {
            let b = bucket(&group[0]);
            if !run.extends_to(b) {
                self.write_run(file, geom, &mut run, true)?;
            }
            let off = geom.bucket_off(b);
            let bytes = map
                .read(off, crate::format::BUCKET_SIZE as u64)
                .ok_or(Error::corrupt(off, "index bucket outside the file"))?;
            if !crate::format::bucket_crc_ok(bytes) {
                // Never re-seal a damaged bucket (that would hide the damage).
                return Err(Error::corrupt(off, "index bucket checksum mismatch").into());
            }
            let mut buf = BucketBuf::from_bytes(bytes);
            for &e in group {
                Self::apply_entry(map, &mut buf, e, gone)?;
            }
            buf.seal();
            run.push(b, &buf);
        }
        self.write_run(file, geom, &mut run, true)
    }

    /// Writes the buckets collected in `run` to the index region `geom` (under the
    /// exclusive state lock if `live`: the region is visible to readers) and starts their
    /// write-back. A failed write poisons the store.
    fn write_run(
        &self,
        file: &FileHandle,
        geom: IndexGeom,
        run: &mut BucketRun,
        live: bool,
    ) -> Result<(), ApplyError> {
        if run.bytes.is_empty() {
            return Ok(());
        }
        let off = geom.bucket_off(run.first);
        let r = {
            let _excl = live.then(|| self.state.write());
            file.write_at(&run.bytes, off)
        };
        if let Err(e) = r {
            return Err(ApplyError::Other(self.poison::<()>(e).unwrap_err()));
        }
        // A hint: the sync that follows reports any write-back error.
        let _ = file.start_writeback(off, run.bytes.len() as u64);
        run.bytes.clear();
        Ok(())
    }

    /// Writes a rebuilt index (held in the delta alone, `delta_only`) into a new region of
    /// `buckets` buckets after a JUMP at the tail, and switches to it.
    fn grow_index(&self, w: &mut Writer, mut buckets: u64, fin: u32) -> Result<()> {
        loop {
            match self.try_grow(w, buckets, fin) {
                Ok(()) => return Ok(()),
                Err(ApplyError::Full) if buckets < crate::format::MAX_BUCKETS => buckets *= 2,
                Err(ApplyError::Full) => {
                    return Err(Error::Unsupported("hash index cannot grow further"))
                }
                Err(ApplyError::Other(e)) => return Err(e),
            }
        }
    }

    /// Writes the index region `new` (zeros, not visible to readers) from the buckets of
    /// the region `old` (if any: a rebuild has none) plus `entries`, sorted by their
    /// bucket in `new`. Only non-empty buckets are written.
    fn build_region(
        &self,
        map: &Mapping,
        file: &FileHandle,
        old: Option<IndexGeom>,
        new: IndexGeom,
        entries: &[DeltaEntry],
        gone: &mut Resolved,
    ) -> Result<(), ApplyError> {
        let buckets = new.buckets;
        let mut run = BucketRun::default();
        let mut next = 0usize;
        for nb in 0..buckets {
            let mut buf = BucketBuf::empty();
            if let Some(old) = old.filter(|o| o.buckets > 0) {
                let ob = old.buckets;
                let obytes = map
                    .read(
                        old.bucket_off(nb & (ob - 1)),
                        crate::format::BUCKET_SIZE as u64,
                    )
                    .ok_or(Error::corrupt(old.off, "index bucket outside the file"))?;
                if !crate::format::bucket_crc_ok(obytes) {
                    let off = old.bucket_off(nb & (ob - 1));
                    return Err(Error::corrupt(off, "index bucket checksum mismatch").into());
                }
                let ob = BucketBuf::from_bytes(obytes);
                for (h, o) in ob.entries() {
                    if bucket_of(h, buckets) == nb {
                        buf.upsert(h, o, None)
                            .map_err(|BucketFull| ApplyError::Full)?;
                    }
                }
            }
            while next < entries.len() && bucket_of(entries[next].hash, buckets) == nb {
                Self::apply_entry(map, &mut buf, entries[next], gone)?;
                next += 1;
            }
            // Empty buckets stay as the zeros the region was claimed with.
            if buf.count() > 0 {
                buf.seal();
                if !run.extends_to(nb) {
                    self.write_run(file, new, &mut run, false)?;
                }
                run.push(nb, &buf);
            }
        }
        self.write_run(file, new, &mut run, false)?;
        if next != entries.len() {
            // Unreachable with sorted entries; never switch to an index that misses keys.
            return Err(ApplyError::Other(Error::Unsupported(
                "internal: delta entries left over after building the index",
            )));
        }
        Ok(())
    }

    fn try_grow(&self, w: &mut Writer, buckets: u64, fin: u32) -> Result<(), ApplyError> {
        let old = self.state.read().index;
        let (new, old_real) = self.claim_region(w, buckets)?;
        let entries = self.delta_by_bucket(buckets);
        let mut gone = Resolved::default();
        let map = Arc::clone(w.tail.mapping());
        if let Err(e) = self.build_region(&map, &w.file, None, new, &entries, &mut gone) {
            self.forget_claim(old, (new, old_real));
            return Err(e);
        }
        self.sync_file(&w.file)?;
        self.commit_resolved(gone);
        let c = self.counters_ckpt(fin, new, w.end);
        self.write_checkpoint(w, c)?;
        self.sync_file(&w.file)?;
        {
            let mut st = self.state.write();
            st.index = new;
            st.delta.clear();
            st.delta_only = false;
        }
        if old_real {
            // The other checkpoint slot still points at the old region; release it only
            // after the next checkpoint (see `checkpoint`).
            let mut slots = self.slots.lock();
            let seq = slots.last.seq;
            slots.pending_punch.push((old.off, old.bytes(), seq));
        }
        Ok(())
    }
}

/// Buckets for an index holding `keys` keys at `GROW_LOAD`.
fn buckets_for(keys: u64) -> u64 {
    let want = (keys as f64 / (SLOTS_PER_BUCKET as f64 * GROW_LOAD)).ceil() as u64;
    want.clamp(1, crate::format::MAX_BUCKETS)
        .next_power_of_two()
}

/// True if the index region `old` is real space in the log before `jump_at` (a rebuild
/// after a damaged checkpoint may have no region), so it becomes dead when replaced.
fn region_is_real(old: IndexGeom, jump_at: u64) -> bool {
    old.off >= PAGE
        && old
            .buckets
            .checked_mul(PAGE)
            .and_then(|b| b.checked_add(old.off))
            .is_some_and(|e| e <= jump_at)
}

impl Store {
    /// Opens the store at `path`, creating it if it does not exist (unless read-only).
    ///
    /// Opening a cleanly closed store costs O(1) whatever its size: the index lives in the
    /// file. After a crash, only the writes after the last checkpoint are replayed.
    ///
    /// # Errors
    /// [`Error::Locked`] if another handle has the store open for writing,
    /// [`Error::NotAStore`], [`Error::Version`] or [`Error::Corrupt`] for a file that is
    /// not a usable store, [`Error::Io`] for system errors. Never panics on file content.
    pub fn open(path: impl AsRef<Path>, options: Options) -> Result<Store> {
        let inner = Arc::new(crate::recovery::open(path.as_ref(), options)?);
        Ok(Store {
            inner,
            background: Mutex::new(None),
            background_started: AtomicBool::new(false),
        })
    }

    /// Starts the background thread if this store needs one and it is not running:
    /// periodic syncs (`Periodic`, `Async`) and the tail work of the memcpy write path
    /// (`None`, `Periodic`).
    fn start_background(&self) -> Result<()> {
        if self.background_started.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut slot = self.background.lock();
        let interval = match self.inner.opts.durability {
            Durability::Periodic(every) => Some(every),
            Durability::Async => Some(ASYNC_BOUND),
            Durability::None | Durability::Always => None,
        };
        let needed = !matches!(self.inner.opts.durability, Durability::Always);
        if slot.is_none() && needed && !self.inner.opts.read_only {
            let inner = Arc::clone(&self.inner);
            *slot = Some(
                std::thread::Builder::new()
                    .name("mapkv-background".into())
                    .spawn(move || background(&inner, interval))
                    .map_err(|e| Error::io("spawn background thread", e))?,
            );
        }
        self.background_started.store(true, Ordering::Release);
        Ok(())
    }

    /// Sets `key` to `value` (an empty value is a value, not a delete).
    ///
    /// # Errors
    /// [`Error::KeyTooLarge`]/[`Error::ValueTooLarge`], [`Error::ReadOnly`], an I/O error
    /// (a full disk while growing the file is one; nothing is lost; so is a failure to
    /// start the store's background thread at its first write), [`Error::Poisoned`].
    pub fn put(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<()> {
        self.start_background()?;
        self.inner
            .write_ops(&[(KIND_PUT, key.as_ref(), value.as_ref())], false)
            .map(drop)
    }

    /// Removes `key`; returns whether it existed.
    ///
    /// # Errors
    /// As for [`Store::put`].
    pub fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        self.start_background()?;
        let out = self
            .inner
            .write_ops(&[(KIND_DELETE, key.as_ref(), b"")], true)?;
        Ok(out.is_some())
    }

    /// Applies every operation of `batch` atomically, in order: after any crash the store
    /// holds all of them or none. An empty batch is a no-op.
    ///
    /// # Errors
    /// As for [`Store::put`]; a rejected batch changes nothing.
    pub fn write(&self, batch: &Batch) -> Result<()> {
        self.start_background()?;
        let ops: Vec<(u8, &[u8], &[u8])> = batch
            .ops
            .iter()
            .map(|op| match op {
                Op::Put(k, v) => (KIND_PUT, k.as_slice(), v.as_slice()),
                Op::Delete(k) => (KIND_DELETE, k.as_slice(), &b""[..]),
            })
            .collect();
        self.inner.write_ops(&ops, false).map(drop)
    }

    /// Returns a copy of the value of `key`.
    ///
    /// # Errors
    /// [`Error::Corrupt`] if the record found fails its checksum.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>> {
        self.get_with(key, <[u8]>::to_vec)
    }

    /// Calls `f` with the value of `key`, borrowed straight from the mapping (no copy),
    /// and returns its result. Writers that need the index wait while `f` runs; keep it
    /// short, and do not call this store from inside `f` (the store's lock is fair: a
    /// nested read waits behind a queued writer, which waits for `f`: a deadlock).
    ///
    /// # Errors
    /// As for [`Store::get`].
    pub fn get_with<R>(
        &self,
        key: impl AsRef<[u8]>,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>> {
        let key = key.as_ref();
        let h = key_hash(self.inner.seed, key);
        let st = self.inner.state.read();
        match st.find_live(h, key)? {
            Some(rec) => Ok(Some(f(st.value_of(&rec)?))),
            None => Ok(None),
        }
    }

    /// True if `key` has a value.
    ///
    /// # Errors
    /// As for [`Store::get`].
    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        let key = key.as_ref();
        let h = key_hash(self.inner.seed, key);
        Ok(self.inner.state.read().find_live(h, key)?.is_some())
    }

    /// Makes everything written before the call durable. Costs nothing if nothing changed
    /// since the last sync (a sync of a clean file still costs a device flush).
    ///
    /// # Errors
    /// The sync's I/O error; after one the store is poisoned.
    pub fn flush(&self) -> Result<()> {
        if self.inner.opts.read_only {
            return Ok(());
        }
        let (gen, end) = self.inner.published_end();
        self.inner.sync_to(gen, end)
    }

    /// Number of live keys, exact.
    ///
    /// Cost: the write path does not look keys up in the index, so after writes of keys
    /// the index may already hold, the first `len` (or [`Store::stats`]) finishes those
    /// lookups, in bucket order: at most one per key written since the last checkpoint or
    /// counter read. Otherwise O(1). A call during a checkpoint waits for it.
    #[must_use]
    pub fn len(&self) -> usize {
        usize::try_from(self.inner.resolve_counters().live_keys).unwrap_or(usize::MAX)
    }

    /// True if the store holds no key.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Iterates over every live pair, each exactly once, as of the moment of the call
    /// (a snapshot: later writes are not seen). Pairs come in log order.
    #[must_use]
    pub fn iter(&self) -> Iter {
        Iter::new(&self.inner)
    }

    /// Rewrites the live records into a fresh file and switches to it atomically,
    /// reclaiming the space of overwritten and deleted records and of old index regions.
    ///
    /// # Errors
    /// I/O errors; the store is unchanged if compaction fails.
    pub fn compact(&self) -> Result<()> {
        crate::compact::compact(&self.inner)
    }

    /// Checks every record checksum in the log and every index entry against the log.
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming the first damage found.
    pub fn verify(&self) -> Result<crate::VerifyReport> {
        crate::recovery::verify(&self.inner)
    }

    /// Counters and sizes; see [`Stats`]. The key and byte counters are exact, at the
    /// cost described in [`Store::len`].
    #[must_use]
    pub fn stats(&self) -> Stats {
        let inner = &*self.inner;
        let (alloc, end) = if inner.opts.read_only {
            let st = inner.state.read();
            (st.file.len().unwrap_or(0), st.map.published())
        } else {
            let w = inner.writer.lock();
            (w.alloc, w.end)
        };
        let c = inner.resolve_counters();
        let st = inner.state.read();
        let resident = st.map.resident_pages(alloc);
        let s = inner.sync.lock();
        Stats {
            live_keys: c.live_keys,
            live_bytes: c.live_bytes,
            dead_bytes: c.log_bytes.saturating_sub(c.live_bytes),
            log_bytes: c.log_bytes,
            index_bytes: st.index.bytes(),
            dead_index_bytes: c.dead_index_bytes,
            file_size: alloc,
            log_end: end,
            mapped_bytes: st.map.reserved(),
            resident_pages: resident,
            resident_bytes: resident * PAGE,
            space_amplification: if c.live_bytes == 0 {
                1.0
            } else {
                alloc as f64 / c.live_bytes as f64
            },
            writes: st.writes,
            syncs: inner.syncs.load(Ordering::Relaxed),
            bytes_synced: inner.bytes_synced.load(Ordering::Relaxed),
            checkpoints: inner.checkpoints.load(Ordering::Relaxed),
            bytes_at_risk: if inner.opts.read_only {
                0
            } else {
                end.saturating_sub(s.durable_end)
            },
            writes_at_risk: if inner.opts.read_only {
                0
            } else {
                st.writes.saturating_sub(s.durable_writes)
            },
            delta_entries: (st.delta.len() + st.frozen.as_ref().map_or(0, |f| f.delta.len()))
                as u64,
            delta_heap_bytes: (st.delta.heap_bytes()
                + st.frozen.as_ref().map_or(0, |f| f.delta.heap_bytes()))
                as u64,
            durability: inner.opts.durability,
            populated: inner.opts.populate,
            recovery: inner.recovery.lock().clone(),
        }
    }

    /// The path the store was opened with.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Closes the store cleanly (checkpoint, sync, mark clean) and reports errors, which
    /// dropping the store cannot.
    ///
    /// # Errors
    /// The I/O error of the final checkpoint; the store then recovers at the next open.
    pub fn close(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(t) = self.background.get_mut().take() {
            self.inner.background.lock().stop = true;
            self.inner.background_cv.notify_all();
            let _ = t.join();
        }
        let inner = &*self.inner;
        if inner.opts.read_only {
            return Ok(());
        }
        let mut w = inner.writer.lock();
        // Always joined, even on a poisoned store: the thread holds the store open.
        let finished = inner.finish_job(&mut w);
        if inner.poisoned.load(Ordering::Acquire) {
            // Nothing can be marked clean; the next open recovers.
            return Err(Error::Poisoned);
        }
        finished?;
        let last = inner.slots.lock().last;
        let changed = w.dirty_marked || last.state != STATE_CLEAN || w.end != last.log_end;
        if changed {
            inner.checkpoint(&mut w, STATE_CLEAN)?;
            w.dirty_marked = false;
        }
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// The background thread: runs the tail work the write path hands over (see
/// `Inner::tail_work`) and, every `every`, a sync of everything published.
fn background(inner: &Inner, every: Option<std::time::Duration>) {
    let mut next = every.map(|e| std::time::Instant::now() + e);
    loop {
        let (prefault, writeback) = {
            let mut bg = inner.background.lock();
            loop {
                if bg.stop {
                    return;
                }
                if bg.prefault.is_some() || bg.writeback.is_some() {
                    break;
                }
                match next {
                    Some(n) if std::time::Instant::now() >= n => break,
                    Some(n) => {
                        let _ = inner.background_cv.wait_until(&mut bg, n);
                    }
                    None => inner.background_cv.wait(&mut bg),
                }
            }
            (bg.prefault.take(), bg.writeback.take())
        };
        if let Some((map, from, to)) = prefault {
            map.prefault_write(from, to - from);
        }
        if let Some((file, from, to)) = writeback {
            // In pieces, prefaulting in between as asked: submitting write-back takes
            // milliseconds per step (each page is write-protected, with a TLB flush),
            // long enough for a fast writer to run past a prefault window it waits for.
            let mut at = from;
            while at < to {
                let piece = (to - at).min(WRITEBACK_PIECE);
                // A hint: the sync that follows reports any write-back error.
                let _ = file.start_writeback(at, piece);
                at += piece;
                let more = inner.background.lock().prefault.take();
                if let Some((map, from, to)) = more {
                    map.prefault_write(from, to - from);
                }
            }
        }
        if let (Some(every), Some(n)) = (every, next) {
            if std::time::Instant::now() >= n {
                next = Some(std::time::Instant::now() + every);
                let (gen, end) = inner.published_end();
                // An error poisons the store; writers will report it.
                let _ = inner.sync_to(gen, end);
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
    #[test]
    fn full_bucket_in_a_background_checkpoint_rebuilds_the_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("crowd.mkv");
        let opts = Options::default().durability(Durability::None);
        let store = Store::open(&path, opts.clone()).expect("open");
        for i in 0..300u32 {
            store.put(i.to_le_bytes(), b"spread").expect("put");
        }
        store.close().expect("close");
        // 260 more keys, all in bucket 0: far below the index's load limit, so the
        // checkpoint applies them in place, and more than a bucket holds.
        let store = Store::open(&path, opts.checkpoint_keys(260)).expect("reopen");
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
    fn damage_bucket(store: &Store, geom: IndexGeom, b: u64) {
        let off = geom.bucket_off(b) + 6;
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

    /// Regression (found in review): `resolve_by_buckets` marked the live delta "all
    /// resolved", so when the checkpoint that wanted the exact count then failed (no
    /// space to grow the index), every key added to the delta afterwards counted as new
    /// for good, and the next checkpoint wrote that count into its slot.
    #[test]
    fn keys_added_after_settling_the_counts_still_get_resolved() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, geom) = indexed_store(&dir.path().join("settle.mkv"), Options::default());
        for i in 0..100u32 {
            store.put(format!("k{i}"), b"overwritten").expect("put");
        }
        {
            let _w = store.inner.writer.lock();
            let _resolving = store.inner.resolving.lock();
            assert_eq!(store.inner.resolve_by_buckets(geom).live_keys, 300);
        }
        // As if the growth that wanted the count had failed: the delta stays in use.
        for i in 100..150u32 {
            store.put(format!("k{i}"), b"overwritten too").expect("put");
        }
        assert_eq!(
            store.len(),
            300,
            "overwrites after the settling counted as new keys"
        );
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
}
