//! `Inner`: the state a store handle shares with its background threads, and the
//! helpers every part of the store uses (poisoning, sync observers).

use std::sync::Arc;
use std::thread::JoinHandle;

use crate::format::CheckpointInfo;
use crate::map::{FileHandle, LiveArea, TailWriter};
use crate::state::IndexGeom;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::error::{Error, Result};
use crate::observe::SyncEvent;
use crate::options::Options;
use crate::state::State;
use crate::stats::RecoveryReport;

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
    /// Held around each piece of lock-free counter resolution (`Inner::resolve_piece`),
    /// from its plan to its count. Taken after `resolving` and the writer mutex, before
    /// the state lock.
    pub(super) resolve_pieces: Mutex<()>,
    /// Where a store thread hands the writer the locked steps of a piece (see
    /// `super::handoff`).
    pub(super) handoff: super::handoff::Handoff,
    /// Where a store thread hands the writer the pieces of a frozen delta's copy (see
    /// `Inner::copy_frozen`).
    pub(super) copy_handoff: super::handoff::Handoff,
    /// Threads that hold the writer mutex for a checkpoint: one waiting for a job (see
    /// `Inner::join_job`) or running one itself. No commit comes meanwhile, so store
    /// threads hand the writer nothing (see `super::handoff`).
    pub(super) writer_held: std::sync::atomic::AtomicUsize,
    /// Held for a whole compaction (one at a time); taken before anything else.
    pub(super) compacting: Mutex<()>,
    /// The thread running an automatic compaction, if one was started
    /// ([`Options::auto_compact`](crate::Options::auto_compact)); joined at close.
    pub(super) auto_compactor: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The checkpoint slots. Held by a background checkpoint for its whole run, and by
    /// anyone else only to write a slot (never while a background checkpoint runs: the
    /// writer waits for it first). Taken after `resolving`, before the state lock.
    pub(super) slots: Mutex<Slots>,
    /// `Slots::last`'s log end, readable without the slots (which a background
    /// checkpoint holds for its whole run): what `Store::stats` reports.
    pub(super) checkpoint_end: AtomicU64,
    /// `State::writes`, readable without the state lock (a group-commit leader polls it
    /// while it waits for the other writers).
    pub(super) published_writes: AtomicU64,
    /// Bumped (under the sync mutex) whenever a sync finishes or syncs resume: what a
    /// waiting writer watches.
    pub(super) syncs_done: AtomicU64,
    pub(super) sync: Mutex<SyncState>,
    pub(super) sync_cv: Condvar,
    pub(super) poisoned: AtomicBool,
    /// Compactions finished since open.
    pub(super) compactions: AtomicU64,
    /// Times a compaction folded the writes it caught up with into its new file's index
    /// (see `compact::fold_delta`), since open.
    pub(super) folds: AtomicU64,
    /// The last error background maintenance met (see `MaintenanceStats::last_error`).
    pub(super) last_error: Mutex<Option<String>>,
    /// Set (under the writer mutex) by `Store::close_shared`/`close`: every later call
    /// fails with `Error::Closed`.
    pub(super) closed: AtomicBool,
    /// Set first thing by a close: no automatic compaction starts from then on (the
    /// close runs one itself if it is due, see `Inner::compact_if_due_at_close`).
    pub(super) closing: AtomicBool,
    /// Set by a close that does not wait for a running compaction (see
    /// `Store::close_shared`): the compaction stops at its next piece, removes its file
    /// and returns `Error::Closed`.
    pub(super) cancel_compaction: AtomicBool,
    /// Live bytes up to which a close waits for a running automatic compaction, or
    /// compacts a store that is due ([`CLOSE_COMPACT_MAX`]; lowered by unit tests).
    pub(super) close_compact_max: AtomicU64,
    /// `SyncState::durable_end`, readable without the sync mutex: the durable watermark
    /// that new records carry (see `format::durable_mark`).
    pub(super) durable_hint: AtomicU64,
    /// The file is on a copy-on-write filesystem: appends use `pwrite`, never stores
    /// into the mapping (which could raise `SIGBUS` on a full disk there).
    pub(super) copy_on_write: bool,
    /// Bumped by every growth of the file (before data in the new space is published).
    /// A sync that samples epoch E with its target and then runs `fdatasync` makes every
    /// size change up to E durable; `SyncState::size_epoch` remembers the last such E.
    pub(super) size_epoch: AtomicU64,
    /// Bumped (under the exclusive state lock) when compaction switches files: log
    /// offsets of different generations are not comparable. A write of an older
    /// generation is durable: compaction synced a file holding every published write.
    pub(super) file_gen: AtomicU64,
    pub(super) syncs: AtomicU64,
    pub(super) bytes_synced: AtomicU64,
    pub(super) checkpoints: AtomicU64,
    /// Of the counters' `dead_index_bytes`, the bytes of old regions whose blocks were
    /// given back to the file system or will be: each region an index growth replaces,
    /// from its claim (punched once no checkpoint slot refers to it, see
    /// `release_old_regions`; taken back if the claim is forgotten or the punch fails),
    /// and at open the file's holes. They take no disk space, and compacting gains
    /// nothing there.
    pub(super) released_index_bytes: AtomicU64,
    /// The longest single punch of an old index region, and the bytes punched in all
    /// (unit tests only).
    #[cfg(test)]
    pub(super) longest_punch: AtomicU64,
    #[cfg(test)]
    pub(super) punched_bytes: AtomicU64,
    /// Index regions claimed, and those of them whose space the writer had to
    /// allocate itself in the claim (unit tests only).
    #[cfg(test)]
    pub(super) regions_claimed: AtomicU64,
    #[cfg(test)]
    pub(super) regions_unallocated: AtomicU64,
    /// Writes that waited for a checkpoint at the delta's hard limit, and the longest
    /// such wait in microseconds (`Stats::maintenance`).
    pub(super) checkpoint_waits: AtomicU64,
    pub(super) checkpoint_wait_max_us: AtomicU64,
    /// True while a background checkpoint job runs (from its spawn to its end), readable
    /// without the writer mutex (`Store::stats` waits a little for it).
    pub(super) job_running: AtomicBool,
    /// Bumped (under the writer mutex) when the index is rebuilt from the log: buckets
    /// read before a rebuild may be half-rewritten, so a compaction snapshot that saw
    /// one starts over.
    pub(super) rebuilds: AtomicU64,
    /// The nice value of the store's own threads (see `Options::background_nice`): that
    /// many steps below the thread that opened the store. `None`: left as inherited.
    pub(super) thread_nice: Option<i32>,
    /// Work for the background thread, and its stop flag.
    pub(super) background: Mutex<Background>,
    pub(super) background_cv: Condvar,
    /// Compactions about to switch files: writers start no checkpoint meanwhile unless
    /// the delta is overdue (see `Inner::hold_checkpoints`).
    pub(super) checkpoint_holds: std::sync::atomic::AtomicUsize,
    /// Compaction snapshots reading old index regions (see `Inner::hold_regions`).
    pub(super) region_holds: std::sync::atomic::AtomicUsize,
    /// The background thread was asked to resolve the delta's backlog and has not
    /// finished (writers ask once, without taking its mutex on every write).
    pub(super) resolve_asked: std::sync::atomic::AtomicBool,
    /// `Background::spare` holds a table the writer asked for.
    pub(super) spare_ready: std::sync::atomic::AtomicBool,
    /// Delta tables the background thread prepared that the writer's delta took (for
    /// tests and diagnosis).
    pub(super) spares_taken: AtomicU64,
    /// Bytes the background thread prefaulted ahead of the tail (tests, diagnosis).
    pub(super) prefaulted_bytes: AtomicU64,
    /// Deltas the background thread prepared that a freeze took (tests, diagnosis).
    pub(super) next_deltas_taken: AtomicU64,
    /// The file generation (`file_gen`) and the log offset below which this process's
    /// mapping of that file had its pages released since the writer wrote them (see
    /// `Inner::release_behind`).
    ///
    /// Also held while prefaulting the tail's window: a prefault still running on
    /// another thread when the tail passed its window would fault released pages back
    /// in (a prefault skips only what is published when it starts).
    pub(super) released_to: Mutex<(u64, u64)>,
    /// The seed and filter layout of the last view a lookup used (see `LookupHint`).
    pub(super) lookup_hint: super::follow::LookupHint,
    /// The last piece of counter resolution found the index buckets out of memory (its
    /// lookups were slow): the next pieces read their buckets in first.
    pub(super) index_cold: std::sync::atomic::AtomicBool,
    /// Pieces of counter resolution done by `resolve_piece`, how many of them read
    /// their buckets in first, and the lookups it had to make under the exclusive
    /// state lock (see `crate::resolve`; for tests and diagnosis).
    pub(super) resolved_pieces: AtomicU64,
    pub(super) prefetched_pieces: AtomicU64,
    pub(super) locked_lookups: AtomicU64,
    /// Lookups that met an index change and were made again behind the index gate
    /// (tests and diagnosis).
    pub(super) gated_lookups: AtomicU64,
    /// Taken around what holds the store file's inode lock for long (allocation ahead,
    /// punching retired index regions) and, before the index gate, around the bucket
    /// writes made under it: a `pwrite` under the index gate must not queue behind an
    /// allocation that waits for the disk (lookups would wait behind both).
    pub(super) space_gate: Mutex<()>,
    /// Held exclusively around every change of bytes outside the log that readers may
    /// read (see [`Inner::change_index`]), and shared by this process's readers that
    /// read index buckets without checking [`Inner::index_seq`] around them (iteration,
    /// verification, the key filter's build, compaction's snapshot, counter resolution
    /// under the lock), and by lookups that found a change in progress. Taken before the
    /// state lock, never under it; the writer's commits never take it.
    pub(super) index_gate: RwLock<()>,
    /// This process's count of those changes: odd while one is in progress, moved on
    /// when it is done (a seqlock's sequence; the live area's index sequence moves with
    /// it for readers in other processes). A lookup reads it before and after its
    /// probe and tries again if it moved.
    pub(super) index_seq: IndexSeq,
    /// How far the background thread has allocated this file ahead of the writer.
    pub(super) ahead: Mutex<Option<(Arc<FileHandle>, u64)>>,
    pub(crate) recovery: Mutex<RecoveryReport>,
    /// This store itself, for threads it starts that must not keep it open (the key
    /// filter's build). Set once the store is shared.
    pub(super) me: std::sync::OnceLock<std::sync::Weak<Inner>>,
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
        let copy_on_write = writer.file.copy_on_write_fs();
        // On the thread that opens the store.
        let thread_nice = super::threads::nice_below_this_thread(opts.background_nice);
        Inner {
            path,
            opts,
            seed,
            state: RwLock::new(state),
            writer: Mutex::new(writer),
            resolving: Mutex::new(()),
            resolve_pieces: Mutex::new(()),
            handoff: super::handoff::Handoff::default(),
            copy_handoff: super::handoff::Handoff::default(),
            writer_held: std::sync::atomic::AtomicUsize::new(0),
            compacting: Mutex::new(()),
            auto_compactor: Mutex::new(None),
            checkpoint_end: AtomicU64::new(ckpt.log_end),
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
            compactions: AtomicU64::new(0),
            folds: AtomicU64::new(0),
            last_error: Mutex::new(None),
            closed: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            cancel_compaction: AtomicBool::new(false),
            close_compact_max: AtomicU64::new(CLOSE_COMPACT_MAX),
            durable_hint: AtomicU64::new(end),
            copy_on_write,
            size_epoch: AtomicU64::new(0),
            file_gen: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            bytes_synced: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            released_index_bytes: AtomicU64::new(0),
            #[cfg(test)]
            longest_punch: AtomicU64::new(0),
            #[cfg(test)]
            punched_bytes: AtomicU64::new(0),
            #[cfg(test)]
            regions_claimed: AtomicU64::new(0),
            #[cfg(test)]
            regions_unallocated: AtomicU64::new(0),
            checkpoint_waits: AtomicU64::new(0),
            checkpoint_wait_max_us: AtomicU64::new(0),
            job_running: AtomicBool::new(false),
            rebuilds: AtomicU64::new(0),
            thread_nice,
            background: Mutex::new(Background::default()),
            background_cv: Condvar::new(),
            ahead: Mutex::new(None),
            space_gate: Mutex::new(()),
            index_gate: RwLock::new(()),
            index_seq: IndexSeq::default(),
            resolve_asked: std::sync::atomic::AtomicBool::new(false),
            spare_ready: std::sync::atomic::AtomicBool::new(false),
            spares_taken: AtomicU64::new(0),
            prefaulted_bytes: AtomicU64::new(0),
            next_deltas_taken: AtomicU64::new(0),
            released_to: Mutex::new((0, end)),
            lookup_hint: super::follow::LookupHint::default(),
            index_cold: std::sync::atomic::AtomicBool::new(false),
            resolved_pieces: AtomicU64::new(0),
            prefetched_pieces: AtomicU64::new(0),
            locked_lookups: AtomicU64::new(0),
            gated_lookups: AtomicU64::new(0),
            region_holds: std::sync::atomic::AtomicUsize::new(0),
            checkpoint_holds: std::sync::atomic::AtomicUsize::new(0),
            recovery: Mutex::new(RecoveryReport::default()),
            me: std::sync::OnceLock::new(),
        }
    }

    /// Runs `change`, a write of bytes outside the log that readers may be reading (index
    /// buckets, a checkpoint slot, the superblock), under the exclusive index gate and
    /// with the index sequences odd: this process's [`Inner::index_seq`] and the live
    /// area's, for readers in other processes. Readers see a sequence move and read
    /// again.
    ///
    /// Not under the state lock: the store's own threads run niced, and one that lost
    /// its core in the middle of a bucket write held the writer's next commit for as
    /// long as it stayed off the CPU (15-39 ms at 20M keys, see `docs/BENCH.md`).
    ///
    /// Ordering: the first increments are followed by a release fence, so the change
    /// (stores made by the kernel on this thread's behalf) cannot become visible before
    /// the odd values; the second increments have release semantics, so the change is
    /// visible to whoever acquires the new, even values.
    pub(super) fn change_index<R>(&self, change: impl FnOnce() -> R) -> R {
        // The live area before the gate: the state lock is never taken under the gate.
        self.change_index_in(&self.live_area(), change)
    }

    /// [`Inner::change_index`] of the file whose live area is `live` (a checkpoint
    /// takes it once for all its bucket runs: every state lock a niced thread takes
    /// is a chance for it to lose its core while the writer waits).
    pub(super) fn change_index_in<R>(&self, live: &LiveArea, change: impl FnOnce() -> R) -> R {
        let _gate = self.index_gate.write();
        live.add(crate::format::LIVE_INDEX_SEQ_OFF, 1);
        self.index_seq.0.fetch_add(1, Ordering::Relaxed);
        // The change's stores must not become visible before the odd values: an
        // acquire read-modify-write does not order later stores after its own store on
        // every architecture, a release fence after it does (the seqlock writer's fence).
        std::sync::atomic::fence(Ordering::Release);
        let r = change();
        #[cfg(test)]
        super::tests::index_change_made(self);
        self.index_seq.0.fetch_add(1, Ordering::Release);
        live.add(crate::format::LIVE_INDEX_SEQ_OFF, 1);
        r
    }

    /// The live area of the current file.
    pub(super) fn live_area(&self) -> Arc<LiveArea> {
        Arc::clone(&self.state.read().live)
    }

    /// Keeps writers from starting a checkpoint (unless overdue) until the guard drops.
    pub(super) fn hold_checkpoints(&self) -> Hold<'_> {
        self.checkpoint_holds.fetch_add(1, Ordering::AcqRel);
        Hold(&self.checkpoint_holds)
    }

    /// Keeps old index regions from being punched until the guard drops: a compaction
    /// snapshot reads a region's buckets without the state lock held throughout.
    pub(super) fn hold_regions(&self) -> Hold<'_> {
        self.region_holds.fetch_add(1, Ordering::AcqRel);
        Hold(&self.region_holds)
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
            // Calls back into this store that need its locks fail with `Reentrant`.
            let _callback = super::commit::InUpdate::enter_observer(self);
            obs.0.synced(path, ev);
        }
    }

    pub(super) fn check_writable(&self) -> Result<()> {
        if self.opts.read_only {
            return Err(Error::ReadOnly);
        }
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned);
        }
        Ok(())
    }

    pub(super) fn poison<T>(&self, e: Error) -> Result<T> {
        self.poisoned.store(true, Ordering::Release);
        self.note_error(&e);
        Err(e)
    }

    /// Remembers an error of background maintenance for `Stats::maintenance`.
    pub(crate) fn note_error(&self, e: &Error) {
        *self.last_error.lock() = Some(e.to_string());
    }

    pub(super) fn notify(&self, ev: SyncEvent) {
        if let Some(obs) = &self.opts.sync_observer {
            // Calls back into this store that need its locks fail with `Reentrant`.
            let _callback = super::commit::InUpdate::enter_observer(self);
            obs.0.synced(&self.path, ev);
        }
    }
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
    /// The background thread was asked to allocate up to here.
    pub(super) ahead_asked: u64,
    /// The growth step last asked for (sets how early the next one is asked).
    pub(super) step: u64,
    /// Pause owed by writes made while a checkpoint lags (see `pace_for`).
    pub(super) pace_debt: std::time::Duration,
    /// The delta's next table that the background thread was last asked for: the
    /// delta's id and the table's slots (see `Delta::spare_wanted`).
    pub(super) spare_asked: (u64, usize),
    /// The log end that the last checkpoint, finished or running, covers (set with
    /// `set_ckpt_end`).
    pub(super) ckpt_end: u64,
    /// Bytes of index regions claimed since `ckpt_end` (and the padding before each): a
    /// replay jumps over them (see `replay_bytes`).
    pub(super) claimed_since_ckpt: u64,
    /// The background checkpoint, if one was started and not yet joined.
    pub(super) job: Option<Job>,
    /// Where the delta's next insert will probe (see `SlotHint`).
    pub(super) delta_hint: crate::index::SlotHint,
    /// After a checkpoint failed without poisoning the store (a full disk while growing
    /// the index, say): the write count at which the next one is tried, and the gap that
    /// doubles with each failure, so a lasting failure does not cost every write an
    /// attempt (a repair rescans the whole log).
    pub(super) retry_at: u64,
    pub(super) retry_gap: u64,
    /// A DIRTY checkpoint was written in this session.
    pub(crate) dirty_marked: bool,
    pub(super) buf: Vec<u8>,
    pub(super) prefaulted: u64,
    /// `Inner::syncs` when the writer last looked, and its end then (see `tail_work`).
    pub(super) syncs_seen: u64,
    pub(super) end_at_sync: u64,
    /// Under `None`/`Periodic`: write-back of the log was started up to here.
    pub(super) written_back: u64,
    /// Under `Always`/`Async`: `[end, zeroed)` holds real zeros written by us (not
    /// unwritten extents), so an append there needs no extent conversion at sync time.
    pub(super) zeroed: u64,
    /// Writes applied (a batch counts once).
    pub(crate) writes: u64,
}

/// A close compacts a store whose automatic compaction is due (or waits for one that
/// runs) only up to this many live bytes (records, headers included, as counted when
/// the close starts: writes whose old record was not looked up yet count as new):
/// copying them takes seconds (1M keys of 16 + 100 bytes, 132 MB, about 2 s here). A
/// larger store closes without it, a running compaction abandoned (its file removed),
/// and the next session compacts it on its first write: a close of 20M keys had waited
/// 33-50 s for its copy.
pub(crate) const CLOSE_COMPACT_MAX: u64 = 512 << 20;

impl Writer {
    /// Log bytes a replay from `ckpt_end` would read: the distance to the end, less the
    /// index regions claimed behind JUMP records meanwhile, which a replay skips.
    pub(super) fn replay_bytes(&self) -> u64 {
        (self.end - self.ckpt_end).saturating_sub(self.claimed_since_ckpt)
    }

    /// A checkpoint (finished or running) now covers the log up to `end`.
    pub(super) fn set_ckpt_end(&mut self, end: u64) {
        self.ckpt_end = end;
        self.claimed_since_ckpt = 0;
    }

    /// Puts off the next checkpoint attempt after a failed one (see `retry_at`).
    pub(super) fn backoff(&mut self) {
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
            ahead_asked: alloc,
            step: 0,
            pace_debt: std::time::Duration::ZERO,
            spare_asked: (0, 0),
            ckpt_end,
            claimed_since_ckpt: 0,
            job: None,
            retry_at: 0,
            retry_gap: 0,
            delta_hint: crate::index::SlotHint::default(),
            dirty_marked: false,
            buf: Vec::new(),
            prefaulted: 0,
            syncs_seen: 0,
            end_at_sync: end,
            written_back: end,
            zeroed: end,
            writes: 0,
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct SyncState {
    pub(super) durable_end: u64,
    pub(super) durable_writes: u64,
    /// The growth epoch made durable by the last `fdatasync`.
    pub(super) size_epoch: u64,
    /// A sync is running.
    pub(super) syncing: bool,
    /// Compaction is switching files: no sync may start.
    pub(super) paused: bool,
    /// Writers asleep until a sync finishes (after yielding for a while, see `sync_to`);
    /// unparked when one does.
    pub(super) waiters: Vec<std::thread::Thread>,
    /// Writes covered by recent syncs (decays by one per round): how many writers share
    /// syncs right now. A new leader waits briefly for that many writes to be pending.
    pub(super) batch_hint: u64,
    /// Duration of the last sync; bounds the leader's wait.
    pub(super) last_sync: std::time::Duration,
}

/// The checkpoint slots in the file (see [`Inner::slots`]).
#[derive(Debug)]
pub(super) struct Slots {
    /// The checkpoint slot last written (or read at open).
    pub(super) last: CheckpointInfo,
    /// Old index regions to release once no checkpoint slot can refer to them:
    /// (offset, length, seq of the checkpoint that stopped using it).
    pub(super) pending_punch: Vec<(u64, u64, u64)>,
}

/// What the write path hands to the background thread, so the writer does not pay for
/// it: page faults on the log ahead of the tail and write-back submission behind it
/// (`None`/`Periodic`) were a fifth of an unsynced put's CPU time, and allocating the
/// next piece of the file (every policy) took up to 84 ms for 128 MiB while a
/// checkpoint's sync ran.
#[derive(Debug, Default)]
pub(super) struct Background {
    pub(super) stop: bool,
    /// Allocate `[from, to)` of this file ahead of need (see `Inner::ensure_space`).
    pub(super) allocate: Option<(Arc<FileHandle>, u64, u64)>,
    /// Prefault `[from, to)` of this mapping writable (`MADV_POPULATE_WRITE`).
    pub(super) prefault: Option<(Arc<crate::map::Mapping>, u64, u64)>,
    /// Start write-back of `[from, to)` of this file (`sync_file_range`).
    pub(super) writeback: Option<(Arc<FileHandle>, u64, u64)>,
    /// Memory to free off the writer's thread (see `Delta::take_retired`).
    pub(super) garbage: Vec<crate::index::Retired>,
    /// Allocate a delta table of this many slots for the writer (see
    /// `Delta::spare_wanted`)...
    pub(super) spare_ask: Option<usize>,
    /// ...which it takes from here (`Inner::spare_ready` says it is there).
    pub(super) spare: Option<crate::index::SpareTable>,
    /// Look up the old records of the delta's unresolved keys (see `RESOLVE_BACKLOG`).
    pub(super) resolve: bool,
    /// Start an automatic compaction (see `Inner::ask_auto_compaction`).
    pub(super) compact: bool,
    /// Prepare an empty delta for about this many keys (see `Delta::prepared`)...
    pub(super) next_delta_ask: Option<usize>,
    /// ...which the next freeze takes from here, instead of starting from an empty one.
    pub(super) next_delta: Option<crate::index::Delta>,
    /// `Periodic`/`Async`: the interval of the background thread's syncs, and when the
    /// next one is due (see `Inner::periodic_sync`).
    pub(super) sync_every: Option<(std::time::Duration, std::time::Instant)>,
}

impl Background {
    /// Adds a range to a pending one of the same mapping or file (ranges only grow).
    pub(super) fn merge<T>(slot: &mut Option<(Arc<T>, u64, u64)>, new: (Arc<T>, u64, u64)) {
        *slot = Some(match slot.take() {
            Some((t, from, to)) if Arc::ptr_eq(&t, &new.0) => (t, from.min(new.1), to.max(new.2)),
            _ => new,
        });
    }
}

/// A checkpoint running on its own thread (see `Inner::start_checkpoint`).
#[derive(Debug)]
pub(super) struct Job {
    pub(super) thread: JoinHandle<Result<super::checkpoint::JobEnd>>,
    pub(super) plan: JobPlan,
}

/// What a checkpoint does (on its own thread, or on the writer's): write the frozen delta
/// into the index, in place or into a new, larger region the writer already claimed;
/// `log_end` is the log end the frozen delta covers, which its final slot records.
#[derive(Debug, Clone)]
pub(super) struct JobPlan {
    pub(super) file: Arc<FileHandle>,
    pub(super) log_end: u64,
    pub(super) old: IndexGeom,
    /// The claimed region, and whether the old region is real space before it (to be
    /// counted dead and released).
    pub(super) grow: Option<(IndexGeom, bool)>,
    /// State of the final slot: DIRTY, or CLEAN for the checkpoint of a clean close.
    pub(super) fin: u32,
}

/// A count held up while it lives (see [`Inner::hold_regions`]).
pub(super) struct Hold<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// This process's index sequence (see [`Inner::index_seq`]), on a cache line of its own:
/// every lookup loads it twice, and the lines around it change with every write.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(super) struct IndexSeq(pub(super) AtomicU64);

impl IndexSeq {
    /// The sequence before a probe (acquire: the probe's loads come after it).
    pub(super) fn begin(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    /// True if nothing changed the index since `begin` returned `seq`, so what a probe
    /// read in between is one consistent version of each bucket.
    pub(super) fn unchanged_since(&self, seq: u64) -> bool {
        // Orders the probe's loads before the sequence load (the seqlock read side).
        std::sync::atomic::fence(Ordering::Acquire);
        seq.is_multiple_of(2) && self.0.load(Ordering::Relaxed) == seq
    }
}
