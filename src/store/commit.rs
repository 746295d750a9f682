//! The write path: a put, delete or batch from encoding to publication.
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
//! # Read-modify-write
//!
//! `compare_and_swap` and `update` look the key up (step 0) under the same writer mutex
//! as steps 1-3, so no other write comes between the read and the write; the write is then
//! an ordinary single write, with the same durability. When they write nothing (the
//! comparison failed, or the value is unchanged), they release the mutex and, under
//! `Always`, wait for a sync covering the log end they read, as the write they decided
//! against would have. `update`'s closure runs with the writer mutex held and no other
//! lock (it gets a copy of the value); a thread-local list of the stores whose closure is
//! running on this thread turns a call that would take the mutex again into
//! `Error::Reentrant` instead of a deadlock.

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::MutexGuard;

use super::inner::{Inner, Writer};
use crate::error::{Error, Result};
use crate::format::LIVE_COMMITTED_OFF;
use crate::format::{
    encode_record, record_len, RecordRef, FLAG_BATCH_MORE, KIND_DELETE, KIND_PUT, STATE_DIRTY,
};
use crate::index::key_hash;
use crate::observe::SyncEvent;
use crate::options::Durability;

/// Checkpoint when the delta holds `Options::checkpoint_keys` keys (for the index's
/// size, see `Options::checkpoint_keys_for`), or when this many log bytes were appended
/// since the last checkpoint (bounds the replay after a crash).
pub(super) const REPLAY_MAX: u64 = 256 << 20;
/// Deferred index lookups that make the background thread resolve them when automatic
/// compaction wants exact counters, if their old records might make it due (see
/// `Inner::backlog_may_matter`; otherwise the next checkpoint resolves them).
const RESOLVE_BACKLOG: usize = 1024;
/// How far past its limits (`checkpoint_keys`, [`REPLAY_MAX`]) the delta may grow while
/// a checkpoint runs before the writer waits for it.
pub(super) const CHECKPOINT_LAG: usize = 4;

/// Values at least this large are appended with `pwrite` even under `None`/`Periodic`,
/// so the copy does not happen while holding the mapping's tail.
pub(super) const PWRITE_THRESHOLD: usize = 256 << 10;

impl Inner {
    pub(super) fn mark_dirty(&self, w: &mut Writer) -> Result<()> {
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

    /// Applies one write (a single op or a batch) atomically. Returns the log end after
    /// it, or `None` if `only_if_present` is set and the (single) key does not exist, in
    /// which case nothing is written.
    pub(super) fn write_ops(
        self: &Arc<Self>,
        ops: &[(u8, &[u8], &[u8])],
        only_if_present: bool,
    ) -> Result<Option<u64>> {
        self.check_open()?;
        self.check_writable()?;
        if ops.is_empty() {
            return Ok(Some(0));
        }
        let total = self.check_sizes(ops)?;
        let w = self.lock_for_write()?;
        let hash0 = key_hash(self.seed, ops[0].1);
        if only_if_present && self.find_live_fresh(ops[0].1)?.1.is_none() {
            return Ok(None);
        }
        self.commit_locked(w, ops, total, hash0).map(Some)
    }

    /// `Store::compare_and_swap`: under the writer mutex, compares the current value of
    /// `key` with `expected` and, if they are equal, sets it to `new` (`None` deletes).
    /// Returns whether they were equal. Writes nothing if `new` is what the key already
    /// holds.
    pub(super) fn compare_and_swap(
        self: &Arc<Self>,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool> {
        self.check_open()?;
        self.check_writable()?;
        let op = match new {
            Some(v) => (KIND_PUT, key, v),
            None => (KIND_DELETE, key, &b""[..]),
        };
        let total = self.check_sizes(&[op])?;
        let w = self.lock_for_write()?;
        let hash = key_hash(self.seed, key);
        let (equal, unchanged) = {
            let (st, found) = self.find_live_fresh(key)?;
            let current = match found {
                Some(rec) => Some(st.value_of(&rec)?),
                None => None,
            };
            (current == expected, current == new)
        };
        if !equal || unchanged {
            self.settle(w)?;
            return Ok(equal);
        }
        self.commit_locked(w, &[op], total, hash)?;
        Ok(true)
    }

    /// `Store::update`: under the writer mutex, reads the current value of `key` (a
    /// copy), calls `f` with it and writes what `f` returns (`None` deletes). Writes
    /// nothing if that is what the key already holds. Returns the new value.
    pub(super) fn update(
        self: &Arc<Self>,
        key: &[u8],
        f: impl FnOnce(Option<&[u8]>) -> Option<Vec<u8>>,
    ) -> Result<Option<Vec<u8>>> {
        self.check_open()?;
        self.check_writable()?;
        self.check_sizes(&[(KIND_DELETE, key, &b""[..])])?;
        let w = self.lock_for_write()?;
        let hash = key_hash(self.seed, key);
        let current = {
            let (st, found) = self.find_live_fresh(key)?;
            match found {
                Some(rec) => Some(st.value_of(&rec)?.to_vec()),
                None => None,
            }
        };
        let new = {
            // No lock but the writer mutex is held while `f` runs (the value is a copy):
            // reads of this store from `f` work; calls that need the writer mutex get
            // `Error::Reentrant` instead of a deadlock.
            let _in_update = InUpdate::enter(self);
            f(current.as_deref())
        };
        if new == current {
            self.settle(w)?;
            return Ok(new);
        }
        let op = match &new {
            Some(v) => (KIND_PUT, key, v.as_slice()),
            None => (KIND_DELETE, key, &b""[..]),
        };
        let total = self.check_sizes(&[op])?;
        self.commit_locked(w, &[op], total, hash)?;
        Ok(new)
    }

    /// True if [`Options::auto_compact`](crate::Options::auto_compact) is on and its
    /// threshold is crossed.
    pub(super) fn compaction_due(&self) -> bool {
        self.opts.auto_compact.is_some() && self.compaction_due_at(&self.state.read().counters)
    }

    /// [`Inner::compaction_due`] with the counters at hand (the write path has them
    /// under its state lock already; taking it again for them cost a write 0.2 us).
    fn compaction_due_at(&self, c: &crate::state::Counters) -> bool {
        let Some(ac) = self.opts.auto_compact else {
            return false;
        };
        // Old index regions whose blocks were punched take no space: a fill with no
        // dead record counted every region the index outgrew (together about the size
        // of the index, a third of a fill's log right after a growth) and copied the
        // whole store to get rid of holes.
        let released = self.released_index_bytes.load(Ordering::Relaxed);
        let dead =
            c.log_bytes.saturating_sub(c.live_bytes) + c.dead_index_bytes.saturating_sub(released);
        c.log_bytes >= ac.min_log_bytes && dead as f64 > ac.dead_ratio * c.log_bytes as f64
    }

    /// True if looking up the old records of `backlog` deferred writes might make
    /// automatic compaction due: if it would be due were each of them found to have
    /// replaced a record of twice the average live size. A fill of new keys finds
    /// nothing, and at 20M keys those lookups in the background took a quarter of the
    /// puts' throughput (CPU and the state lock); with a backlog small beside the log
    /// they are left to the next checkpoint, which makes the counters exact anyway.
    /// (An estimate, not a bound: overwrites of records far larger than the average
    /// start their compaction at that checkpoint, or at close.)
    fn backlog_may_matter(&self, c: &crate::state::Counters, backlog: usize) -> bool {
        #[cfg(test)]
        if super::tests::resolution_forced(self) {
            return true;
        }
        if c.live_keys == 0 {
            return false;
        }
        let mut after = *c;
        after.live_bytes = live_bytes_at_least(c, backlog);
        self.compaction_due_at(&after)
    }

    /// At close, before the store is marked closed: if automatic compaction is on and
    /// the dead share is past its threshold once every write is counted (the running
    /// checkpoint finished, the delta's old records looked up), compacts on this thread.
    /// Writes count their own records as live until a checkpoint or the background
    /// thread looks up what they replaced, so a store closed right after overwriting
    /// its keys often had no compaction started yet: 1M keys written and overwritten
    /// once were left at 2.57x their size instead of 1.43x. A failed compaction is
    /// noted (`Stats::maintenance.last_error`); the close goes on.
    pub(super) fn compact_if_due_at_close(&self) {
        // Not while a panic unwinds through a drop: close as quickly as possible then.
        if self.opts.read_only
            || self.opts.auto_compact.is_none()
            || std::thread::panicking()
            || self.closed.load(Ordering::Acquire)
            || self.poisoned.load(Ordering::Acquire)
        {
            return;
        }
        {
            let mut w = self.writer.lock();
            if self.finish_job(&mut w).is_err() {
                return;
            }
        }
        self.resolve_backlog();
        if !self.compaction_due() {
            return;
        }
        if let Err(e) = super::compact::compact(self) {
            if !matches!(e, Error::Closed) {
                self.note_error(&e);
            }
        }
    }

    /// True if a close may compact this store, or wait for its compaction: its live
    /// data is at most `close_compact_max` (see [`CLOSE_COMPACT_MAX`]).
    ///
    /// [`CLOSE_COMPACT_MAX`]: super::inner::CLOSE_COMPACT_MAX
    pub(super) fn close_may_compact(&self) -> bool {
        let max = self.close_compact_max.load(Ordering::Relaxed);
        let (c, backlog) = {
            let st = self.state.read();
            (st.counters, st.delta.unresolved_len())
        };
        if c.live_bytes <= max {
            return true;
        }
        // The counted live bytes still hold the records the backlog's writes replaced
        // (see `backlog_may_matter`): if they could bring the store under the limit,
        // look them up first.
        if live_bytes_at_least(&c, backlog) > max {
            return false;
        }
        self.resolve_backlog();
        self.state.read().counters.live_bytes <= max
    }

    /// Has the background thread start an automatic compaction unless one is running
    /// (see `start_auto_compaction`): for the writer, which does not spawn the thread
    /// itself, since a new thread's stack is an `mmap` (when glibc has none cached),
    /// which waits for the process's memory-map lock while other threads hold it.
    pub(super) fn ask_auto_compaction(&self) {
        if self
            .auto_compactor
            .lock()
            .as_ref()
            .is_some_and(|h| !h.is_finished())
        {
            return;
        }
        let mut bg = self.background.lock();
        if !bg.compact {
            bg.compact = true;
            drop(bg);
            self.background_cv.notify_all();
        }
    }

    /// Starts a compaction on a thread of its own unless one is running: the write that
    /// crossed the threshold returns at once, and writers go on during the copy. The
    /// write is applied (and durable as its policy promised) whatever the compaction
    /// does; a failure that matters poisons the store, and the next write reports it.
    pub(super) fn start_auto_compaction(self: &Arc<Self>) {
        let mut slot = self.auto_compactor.lock();
        if slot.as_ref().is_some_and(|h| !h.is_finished())
            || self.closing.load(Ordering::Acquire)
            || self.closed.load(Ordering::Acquire)
        {
            return;
        }
        if let Some(done) = slot.take() {
            let _ = done.join();
        }
        let inner = Arc::clone(self);
        *slot = super::threads::spawn("mapkv-compact", self.thread_nice, move || {
            // Writes made during a compaction are copied with it, dead ones too:
            // compact again while the threshold is still crossed. (A cap of three
            // in a row left a store whose writer had stopped far above it, since
            // only a write or a checkpoint starts the next one.)
            loop {
                if let Err(e) = super::compact::compact(&inner) {
                    if !matches!(e, Error::Closed) {
                        inner.note_error(&e);
                    }
                    break;
                }
                if !inner.compaction_due() {
                    break;
                }
            }
        })
        .ok();
    }

    /// `Error::Closed` once the store was closed.
    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// `Error::Reentrant` if this thread is running a `Store::update` closure of this
    /// store, i.e. holds its writer mutex.
    pub(super) fn check_not_in_update(&self) -> Result<()> {
        let me = std::ptr::from_ref(self) as usize;
        if IN_UPDATE.with(|s| s.borrow().iter().any(|&(p, _)| p == me)) {
            return Err(Error::Reentrant);
        }
        Ok(())
    }

    /// `Error::Reentrant` if this thread is running a sync observer callback of this
    /// store, which may hold its sync mutex (a sync would wait for itself).
    pub(super) fn check_not_in_observer(&self) -> Result<()> {
        let me = std::ptr::from_ref(self) as usize;
        if IN_UPDATE.with(|s| s.borrow().iter().any(|&(p, obs)| obs && p == me)) {
            return Err(Error::Reentrant);
        }
        Ok(())
    }

    /// Checks the key and value sizes of `ops`; returns the bytes their records take.
    fn check_sizes(&self, ops: &[(u8, &[u8], &[u8])]) -> Result<u64> {
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
        Ok(total)
    }

    /// Takes the writer mutex for a write: refuses a closed or poisoned store, and a call
    /// from inside an `update` closure (which holds the mutex already); collects a
    /// finished background checkpoint.
    fn lock_for_write(self: &Arc<Self>) -> Result<MutexGuard<'_, Writer>> {
        self.check_not_in_update()?;
        let mut w = self.writer.lock();
        // Under the mutex: a close that took it first has finished, and nothing may be
        // appended after its final checkpoint.
        self.check_open()?;
        if w.job.as_ref().is_some_and(|j| j.thread.is_finished()) {
            // A failed repair is retried by a later checkpoint; this write goes on. A
            // job that found the index must grow hands over to a growth job on a thread
            // of its own: this write does not wait for the growth.
            if let Err(e) = self.collect_job(&mut w) {
                if self.poisoned.load(Ordering::Acquire) {
                    return Err(e);
                }
                w.backoff();
            }
        }
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned);
        }
        Ok(w)
    }

    /// For a compare-and-swap or update that wrote nothing: releases the writer mutex
    /// and, under `Always`, waits until the state it read is durable, as a write would
    /// have (the value it saw may be a write that is still waiting for its sync).
    fn settle(&self, w: MutexGuard<'_, Writer>) -> Result<()> {
        let end = w.end;
        let gen = self.file_gen.load(Ordering::Acquire);
        drop(w);
        if matches!(self.opts.durability, Durability::Always) {
            self.sync_to(gen, end)?;
        }
        Ok(())
    }

    /// Appends `ops` (their records take `total` bytes; `hash0` is the first key's hash)
    /// under the writer mutex `w`, publishes them, releases `w` and applies the
    /// durability policy. Returns the log end after them.
    fn commit_locked(
        self: &Arc<Self>,
        mut w: MutexGuard<'_, Writer>,
        ops: &[(u8, &[u8], &[u8])],
        total: u64,
        hash0: u64,
    ) -> Result<u64> {
        let pwrite = !self.appends_through_mapping();
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
        let durable = self.durable_hint.load(Ordering::Acquire);
        for (i, &(kind, k, v)) in ops.iter().enumerate() {
            let flags = if i + 1 < ops.len() {
                FLAG_BATCH_MORE
            } else {
                0
            };
            let off = base + buf.len() as u64;
            encode_record(&mut buf, self.seed, off, kind, flags, k, v, durable);
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
        let resolve = self.opts.auto_compact.is_some();
        let mut ask_resolve = false;
        // A next delta table the background thread prepared (see `Delta::spare_wanted`).
        let mut spare = None;
        if self.spare_ready.load(Ordering::Acquire) {
            self.spare_ready.store(false, Ordering::Relaxed);
            spare = self.background.lock().spare.take();
        }
        let (delta_len, ckpt_keys, counters, mut retired, spare_wanted) = {
            let mut st = self.state.write();
            w.tail.publish(end);
            if !matches!(self.opts.durability, Durability::Always) {
                // Committed: readers in other processes see it from here on. (Under
                // `Always` they see it once it is durable: the sync publishes it.)
                st.live.store(LIVE_COMMITTED_OFF, end);
            }
            let mut off = base;
            for (i, &(kind, k, v)) in ops.iter().enumerate() {
                let rec = RecordRef {
                    offset: off,
                    kind,
                    flags: 0,
                    durable: 0,
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
            // Steps store threads handed over (see `super::handoff`): made here, under
            // the lock this commit holds anyway.
            self.serve_handoffs(&mut st);
            // (Given back if the delta was replaced or grew meanwhile: freed in the
            // background.)
            let unfit = spare.and_then(|t| {
                let unfit = st.delta.give_spare(t);
                if unfit.is_none() {
                    self.spares_taken.fetch_add(1, Ordering::Relaxed);
                }
                unfit
            });
            let spare_wanted = st.delta.spare_wanted().map(|n| (st.delta.id(), n));
            w.delta_hint = st.delta.slot_hint();
            // Automatic compaction compares the counters with its threshold after every
            // write, and they count a key whose old record was not looked up yet as
            // new: the background thread looks them up, a piece at a time, once a
            // backlog builds (here, one bucket probe per write doubled a put's p50),
            // and only if what it could find might make a compaction due. Each
            // checkpoint also makes them exact and checks the threshold (see
            // `Inner::spawn_job`).
            let backlog = st.delta.unresolved_len();
            if resolve
                && backlog >= RESOLVE_BACKLOG
                && !self.resolve_asked.load(Ordering::Acquire)
                && self.backlog_may_matter(&st.counters, backlog)
            {
                ask_resolve = true;
            }
            st.writes += 1;
            self.published_writes.store(st.writes, Ordering::Release);
            let ckpt_keys = self.opts.checkpoint_keys_for(st.index.buckets, end);
            let retired = st.delta.take_retired().into_iter();
            (
                st.delta.len(),
                ckpt_keys,
                st.counters,
                retired.chain(unfit.map(crate::index::SpareTable::retire)),
                spare_wanted,
            )
        };
        let ask_spare = spare_wanted.filter(|&want| want != w.spare_asked);
        if let Some(want) = ask_spare {
            w.spare_asked = want;
        }
        let garbage = retired.next();
        if garbage.is_some() || ask_spare.is_some() {
            let mut bg = self.background.lock();
            bg.garbage.extend(garbage.into_iter().chain(retired));
            if let Some((_, slots)) = ask_spare {
                bg.spare_ask = Some(slots);
            }
            drop(bg);
            self.background_cv.notify_all();
        }
        if ask_resolve && !self.resolve_asked.load(Ordering::Acquire) {
            let mut bg = self.background.lock();
            bg.resolve = true;
            self.resolve_asked.store(true, Ordering::Release);
            drop(bg);
            self.background_cv.notify_all();
        }
        w.end = end;
        w.writes += 1;
        let since = w.replay_bytes();
        let gen = self.file_gen.load(Ordering::Acquire);
        let due = delta_len >= ckpt_keys || since >= REPLAY_MAX;
        // While the previous checkpoint still runs, the delta keeps growing rather than
        // the writer waiting for it (a checkpoint's syncs can take longer than the next
        // `checkpoint_keys` writes); only past `CHECKPOINT_LAG` times the limit does the
        // writer wait, which bounds the delta's memory.
        let overdue = delta_len >= ckpt_keys.saturating_mul(CHECKPOINT_LAG)
            || since >= REPLAY_MAX * CHECKPOINT_LAG as u64;
        let busy = w.job.as_ref().is_some_and(|j| !j.thread.is_finished())
            || self.checkpoint_holds.load(Ordering::Acquire) > 0;
        // Between twice the limits and the hard limit, while the checkpoint runs, each
        // write pauses (after releasing the writer mutex) for a time that grows with the
        // overshoot: the writer slows to what the checkpoint can take, as the kernel
        // slows a writer that dirties pages faster than the disk writes them, instead
        // of one write waiting seconds for it at the hard limit.
        // Pauses shorter than a timer tick add up until they are worth a sleep.
        let pace = if busy && !overdue {
            let keys = ckpt_keys.max(1) as f64;
            let over_keys = delta_len as f64 / keys;
            let over_bytes = since as f64 / REPLAY_MAX as f64;
            w.pace_debt += pace_for(over_keys.max(over_bytes));
            if w.pace_debt >= PACE_SLEEP_MIN {
                std::mem::take(&mut w.pace_debt)
            } else {
                std::time::Duration::ZERO
            }
        } else {
            w.pace_debt = std::time::Duration::ZERO;
            std::time::Duration::ZERO
        };
        if due && (!busy || overdue) && w.writes >= w.retry_at {
            // The write itself is applied. A checkpoint that fails without poisoning the
            // store (a full disk while growing the index) is retried by a later write; one
            // that poisoned it (a failed sync) must not let this write be acknowledged.
            // Overdue while the last one runs: this write waits for it (counted).
            let waiting = w
                .job
                .as_ref()
                .is_some_and(|j| !j.thread.is_finished())
                .then(std::time::Instant::now);
            let started = self.start_checkpoint(&mut w);
            if let Some(t) = waiting {
                let us = u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX);
                self.checkpoint_waits.fetch_add(1, Ordering::Relaxed);
                self.checkpoint_wait_max_us.fetch_max(us, Ordering::Relaxed);
            }
            match started {
                Ok(()) => w.retry_gap = 0,
                Err(e) if self.poisoned.load(Ordering::Acquire) => return Err(e),
                Err(_) => w.backoff(),
            }
        }
        let sync_overdue = if pwrite {
            // (Appends by `pwrite` under `Periodic`: a file system that copies on write.
            // The same check, as the log passes each write-back step.)
            let step = super::background::WRITEBACK_STEP;
            base / step != end / step && self.periodic_overdue(&self.background.lock())
        } else {
            self.tail_work(&mut w)
        };
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
            // The flusher is a whole interval late: this write waits for a sync.
            Durability::Periodic(_) if sync_overdue => self.sync_to(gen, end)?,
            Durability::None | Durability::Periodic(_) => {}
        }
        if self.compaction_due_at(&counters) {
            self.ask_auto_compaction();
        }
        if !pace.is_zero() {
            std::thread::sleep(pace);
        }
        Ok(end)
    }
}

/// The live bytes `c` counts, less what the old records of `backlog` deferred writes
/// could take out once looked up, each estimated at twice the average live record (see
/// `Inner::backlog_may_matter`).
fn live_bytes_at_least(c: &crate::state::Counters, backlog: usize) -> u64 {
    let average = c.live_bytes / c.live_keys.max(1);
    let could_die = (backlog as u64).saturating_mul(average.saturating_mul(2));
    c.live_bytes.saturating_sub(could_die)
}

/// Where pacing starts and where it is longest, in multiples of the checkpoint limits.
const PACE_FROM: f64 = 2.0;
/// The pause at the hard limit ([`CHECKPOINT_LAG`] times the limits).
const PACE_MAX: std::time::Duration = std::time::Duration::from_millis(2);
/// Shorter pauses are added up and slept once they reach this (a sleep takes at least
/// ~60 µs here, whatever it asks for).
const PACE_SLEEP_MIN: std::time::Duration = std::time::Duration::from_micros(200);

/// The pause of a write made while a checkpoint runs and the delta is `over` times the
/// checkpoint limits: none up to [`PACE_FROM`], then growing with the square of the
/// overshoot up to [`PACE_MAX`] at the hard limit.
fn pace_for(over: f64) -> std::time::Duration {
    let span = CHECKPOINT_LAG as f64 - PACE_FROM;
    let x = ((over - PACE_FROM) / span).clamp(0.0, 1.0);
    if x <= 0.0 {
        return std::time::Duration::ZERO;
    }
    PACE_MAX.mul_f64(x * x)
}

thread_local! {
    /// The stores (addresses of their `Inner`) whose `Store::update` closure (`false`) or
    /// sync observer callback (`true`) is running on this thread, innermost last: the
    /// thread holds their writer mutex (an update) or some of their locks (a callback).
    static IN_UPDATE: RefCell<Vec<(usize, bool)>> = const { RefCell::new(Vec::new()) };
}

/// Marks this thread as running an `update` closure or a sync observer callback of a
/// store until dropped (also when the closure panics).
pub(super) struct InUpdate;

impl InUpdate {
    pub(super) fn enter(inner: &Inner) -> InUpdate {
        let me = std::ptr::from_ref(inner) as usize;
        IN_UPDATE.with(|s| s.borrow_mut().push((me, false)));
        InUpdate
    }

    /// Marks a sync observer callback of `inner`.
    pub(super) fn enter_observer(inner: &Inner) -> InUpdate {
        let me = std::ptr::from_ref(inner) as usize;
        IN_UPDATE.with(|s| s.borrow_mut().push((me, true)));
        InUpdate
    }
}

impl Drop for InUpdate {
    fn drop(&mut self) {
        IN_UPDATE.with(|s| {
            s.borrow_mut().pop();
        });
    }
}

#[cfg(test)]
mod pace_tests {
    use super::*;

    #[test]
    fn pacing_starts_at_twice_the_limits_and_grows_to_its_maximum() {
        assert!(pace_for(0.0).is_zero());
        assert!(pace_for(PACE_FROM).is_zero());
        let steps: Vec<_> = (1..=10)
            .map(|i| pace_for(PACE_FROM + (CHECKPOINT_LAG as f64 - PACE_FROM) * i as f64 / 10.0))
            .collect();
        assert!(steps.windows(2).all(|w| w[0] < w[1]), "{steps:?}");
        assert_eq!(pace_for(CHECKPOINT_LAG as f64), PACE_MAX);
        assert_eq!(pace_for(100.0), PACE_MAX);
    }
}
