//! Checkpoints: writing the delta into the index, on the writer's thread or a
//! background one.
//!
//! # Checkpoint protocol
//!
//! When the delta grows large (`Options::checkpoint_keys`), or at clean close, its
//! changes are written into the index buckets in the file. The first case runs on a
//! thread of its own (`start_checkpoint`): the writer *freezes* the delta and goes on
//! into a new one; readers look in the new delta, then the frozen one, then the buckets.
//! The checkpoint covers the log up to the end at the freeze:
//!
//! 1. Look up, in each affected bucket (after checking its CRC), the record each key
//!    replaced: reads only. That settles the counters for the writes that deferred
//!    the lookup, and shows whether every bucket keeps room; if one would overflow,
//!    nothing is written and the writer claims a larger region (`JobEnd::NeedsGrowth`).
//! 2. Write a checkpoint slot with state CHECKPOINTING that announces the end this
//!    checkpoint covers and the exact counters there (`RedoInfo`), and sync it
//!    (`fdatasync`, which also makes the log durable: no bucket can ever point at a
//!    record that is not).
//! 3. Rewrite every affected bucket (`pwrite` per run of buckets, with the index
//!    sequences odd and under the index gate: see `Inner::change_index`), then sync.
//!    A damaged bucket is never re-sealed: the index is rebuilt from the log instead.
//! 4. Write a checkpoint slot (DIRTY, or CLEAN at close) whose `log_end` is the end it
//!    covers, and sync it. Drop the (frozen) delta.
//!
//! A crash before step 2 completes leaves the old checkpoint: buckets untouched, replay
//! from its `log_end`. A crash between 2 and 4 leaves CHECKPOINTING: after a process
//! crash every bucket is whole (old or new), and recovery redoes the checkpoint from the
//! log (a replay from the old `log_end`, as after any crash, taking the announced counters
//! at the announced end); only torn buckets (power loss) mean a rebuild. When the index
//! must grow, steps 1-3 are replaced by writing a whole new index region, claimed by the
//! writer behind a JUMP record at the tail (the old region is not touched), so growth
//! never needs a rebuild. A background checkpoint that fails without poisoning the store
//! (a damaged bucket) leaves the frozen delta in place; the writer then rebuilds the
//! index from the log.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use parking_lot::MutexGuard;

use super::buckets::ApplyError;
use super::commit::{CHECKPOINT_LAG, REPLAY_MAX};
use super::inner::{Inner, Writer};
use super::inner::{Job, JobPlan, Slots};
use super::reindex::buckets_for;
use crate::error::{Error, Result};
use crate::format::{CheckpointInfo, RedoInfo, SLOTS_PER_BUCKET, STATE_CHECKPOINTING, STATE_DIRTY};
use crate::map::FileHandle;
use crate::state::{Frozen, Resolved};

/// How a checkpoint job ended.
#[derive(Debug)]
pub(super) enum JobEnd {
    /// The checkpoint is written.
    Done,
    /// Nothing was written: applying the delta in place would overflow a bucket (the
    /// delta has this many live keys after it), so the index must grow first.
    NeedsGrowth(u64),
}

/// Slots of the frozen delta copied per read lock (about 1 MiB of table, well under a
/// millisecond).
pub(super) const COPY_PIECE: usize = 1 << 16;

/// Bytes of an old index region punched per `fallocate` call. A punch holds the file's
/// invalidate lock exclusively, and every page fault on the file takes it shared: the
/// 256 MiB region the index leaves when it grows at 11.7M keys, punched in one call,
/// kept the writer's first write into a page waiting 150-240 ms (and 2 GiB at 94M keys,
/// 1.84 s). A 2 MiB piece takes 1.6-1.8 ms on this machine's ext4 (online discard).
pub(super) const PUNCH_PIECE: u64 = 2 << 20;

/// Punches `[off, off + len)` with `punch`, a piece of at most [`PUNCH_PIECE`] at a
/// time, each under `gate` (taken per piece, so bucket writes and allocations get in
/// between). Stops at the first piece that fails and returns the bytes not punched.
pub(super) fn punch_in_pieces(
    gate: &parking_lot::Mutex<()>,
    off: u64,
    len: u64,
    mut punch: impl FnMut(u64, u64) -> bool,
) -> u64 {
    let end = off + len;
    let mut at = off;
    while at < end {
        let piece = (end - at).min(PUNCH_PIECE);
        let punched = {
            let _gate = gate.lock();
            punch(at, piece)
        };
        if !punched {
            return end - at;
        }
        at += piece;
    }
    0
}

/// Grow the index when the average bucket is this full...
pub(super) const MAX_LOAD: f64 = 0.70;

/// The most keys an index of `buckets` holds before a checkpoint grows it.
pub(super) fn max_keys_for(buckets: u64) -> u64 {
    (buckets as f64 * SLOTS_PER_BUCKET as f64 * MAX_LOAD) as u64
}

impl Inner {
    /// Writes the delta into the index (see the module docs) on this thread, ending in
    /// state `fin`: the steps of a background checkpoint (`freeze`, `run_job_locked`), a
    /// rebuild from the log if one failed, or only a new slot if nothing changed.
    ///
    /// No separate log sync is needed first: the in-place path makes a CHECKPOINTING slot
    /// durable (with an `fdatasync` that also writes the log) before touching a bucket, and
    /// the growth path writes only into unused space until one sync covers log and index.
    pub(crate) fn checkpoint(&self, w: &mut Writer, fin: u32) -> Result<()> {
        let _held = WriterHeld::new(self);
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
            let mut plan = self.freeze(w, fin)?;
            let mut r = self.run_job_locked(&plan, &mut None);
            if let Ok(JobEnd::NeedsGrowth(keys)) = r {
                plan = self.plan_growth(w, &plan, keys)?;
                r = self.run_job_locked(&plan, &mut None);
            }
            match r {
                Ok(JobEnd::Done) => Ok(()),
                Ok(JobEnd::NeedsGrowth(_)) => {
                    self.mark_frozen_failed();
                    self.rebuild_index(w, fin)
                }
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
            w.set_ckpt_end(w.end);
            self.checkpoints.fetch_add(1, Ordering::Relaxed);
            self.release_old_regions(&mut self.slots.lock(), &w.file);
        }
        r
    }

    /// Punches the old index regions that no checkpoint slot refers to any more.
    pub(super) fn release_old_regions(&self, slots: &mut Slots, file: &FileHandle) {
        if self.region_holds.load(Ordering::Acquire) > 0 {
            // A compaction snapshot may be reading one: a later checkpoint punches it.
            return;
        }
        // Both slots postdate a switch once the slot seq has moved past it.
        let seq_now = slots.last.seq;
        let (due, keep): (Vec<_>, Vec<_>) =
            slots.pending_punch.drain(..).partition(|p| seq_now > p.2);
        slots.pending_punch = keep;
        if !due.is_empty() {
            // Not under the state lock: a punch frees blocks, and with online discard
            // it waits for the device (it kept writers waiting for tens of ms). No
            // reader can be in these regions: lookups in this process only read the
            // current index (and compaction's snapshot holds retired regions back);
            // a reader process that read the retired region started before the slot
            // write that retired it, which changed the index sequence it validates
            // against, so it retries. The gate keeps a punch (which holds the file's
            // inode lock) from stalling a bucket write made under the index gate, and
            // pieces keep page faults on the file from waiting for a whole region.
            for (off, len, _) in due {
                let left = punch_in_pieces(&self.space_gate, off, len, |o, l| {
                    #[cfg(test)]
                    {
                        self.longest_punch.fetch_max(l, Ordering::Relaxed);
                        self.punched_bytes.fetch_add(l, Ordering::Relaxed);
                    }
                    file.punch_hole(o, l)
                });
                self.unrelease(left);
            }
        }
    }

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
    pub(super) fn start_checkpoint(self: &Arc<Self>, w: &mut Writer) -> Result<()> {
        self.collect_job(w)?;
        if w.job.is_some() {
            // The collected job handed over to a growth job: that one checkpoints the
            // frozen delta; the current one waits for the next turn.
            return Ok(());
        }
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
        self.spawn_job(w, plan)
    }

    /// Runs `plan` on a thread of its own (or on this one, if no thread can be had).
    fn spawn_job(self: &Arc<Self>, w: &mut Writer, plan: JobPlan) -> Result<()> {
        let me = Arc::clone(self);
        let job_plan = plan.clone();
        self.job_running.store(true, Ordering::Release);
        match super::threads::spawn("mapkv-checkpoint", self.thread_nice, move || {
            // Cleared however the job ends, a panic included (`collect_job` repairs
            // that), or every `stats()` would wait for a job that is gone.
            let running = JobRunning(&me.job_running);
            let r = me.run_job(&job_plan);
            drop(running);
            // The checkpoint made the counters exact (it looked up every key's old
            // record): the moment to ask whether automatic compaction is due, which
            // the write path checks only against what it has resolved so far.
            if matches!(r, Ok(JobEnd::Done)) && me.compaction_due() {
                me.start_auto_compaction();
            }
            r
        }) {
            Ok(thread) => {
                w.job = Some(Job { thread, plan });
                Ok(())
            }
            Err(_) => {
                self.job_running.store(false, Ordering::Release);
                let r = self.run_job(&plan);
                self.job_done(w, &plan, r, false)
            }
        }
    }

    /// After a job found that the buckets would overflow (it wrote nothing): claims a
    /// larger region behind a JUMP at the tail, as `freeze` would have, and returns the
    /// plan that builds it from the same frozen delta.
    fn plan_growth(&self, w: &mut Writer, plan: &JobPlan, keys: u64) -> Result<JobPlan> {
        let keys = keys.min(w.end / crate::format::RECORD_HEADER as u64);
        let claimed = self.claim_region(w, buckets_for(keys).max(plan.old.buckets * 2))?;
        // The frozen counters become the new checkpoint's: like a claim made before the
        // freeze, they count the JUMP and, if real, the old region as dead.
        if let Some(f) = self.state.write().frozen.as_mut() {
            f.counters.log_bytes += crate::format::JUMP_LEN;
            if claimed.1 {
                f.counters.dead_index_bytes += plan.old.bytes();
            }
        }
        Ok(JobPlan {
            grow: Some(claimed),
            ..plan.clone()
        })
    }

    /// Freezes the delta for a checkpoint (see `start_checkpoint`), after claiming a
    /// larger index region if the keys call for one. The caller holds `resolving`.
    pub(super) fn freeze(&self, w: &mut Writer, fin: u32) -> Result<JobPlan> {
        let (geom, upper, unresolved) = {
            let st = self.state.read();
            (
                st.index,
                st.counters.live_keys,
                st.delta.unresolved_len() as u64,
            )
        };
        let max_keys = max_keys_for(geom.buckets);
        // `upper` counts every unresolved key as new. Each can only replace a key that is
        // in the buckets, so the exact count is at least `lower`.
        let in_buckets = self.slots.lock().last.live_keys;
        let keys = upper.saturating_sub(unresolved.min(in_buckets));
        // Grow only when the keys surely call for it. Between the bounds, the checkpoint
        // finds the exact count with its lookups and asks for growth only if a bucket
        // would overflow (`JobEnd::NeedsGrowth`): settling the bound here, on the
        // writer's thread, took 167 ms at 1M keys.
        let grow = if keys > max_keys {
            // Counters come from the file and may be bogus: bound them by what fits in it.
            let keys = keys.min(w.end / crate::format::RECORD_HEADER as u64);
            Some(self.claim_region(w, buckets_for(keys).max(geom.buckets * 2))?)
        } else {
            None
        };
        // The writes go on into a delta the background thread prepared, if it did (see
        // `Delta::prepared`).
        let fresh = self.background.lock().next_delta.take();
        if fresh.is_some() {
            self.next_deltas_taken.fetch_add(1, Ordering::Relaxed);
        }
        let (spare, frozen_keys) = {
            let mut st = self.state.write();
            let mut delta = std::mem::replace(&mut st.delta, fresh.unwrap_or_default());
            let counters = st.counters;
            // A frozen delta does not grow: its next table (tens of MB in a large
            // delta) is freed in the background.
            let spare = delta.take_spare();
            let keys = delta.len();
            st.frozen = Some(Box::new(Frozen {
                delta,
                end: w.end,
                counters,
                failed: false,
            }));
            (spare, keys)
        };
        {
            // And the one after it, for the next freeze: for a checkpoint's keys, or
            // twice what this one froze if that is less (a small store checkpointed at
            // a flush or by its log's size gets no 16 MiB table it would not fill).
            let keys = self
                .opts
                .checkpoint_keys_for(geom.buckets, w.end)
                .min(frozen_keys.saturating_mul(2).max(1024));
            let mut bg = self.background.lock();
            bg.garbage.extend(spare);
            bg.next_delta_ask = Some(keys);
            drop(bg);
            self.background_cv.notify_all();
        }
        w.set_ckpt_end(w.end);
        Ok(JobPlan {
            file: Arc::clone(&w.file),
            log_end: w.end,
            old: geom,
            grow,
            fin,
        })
    }

    /// After a failed checkpoint: its buckets may be half-rewritten, so its entries are
    /// no longer resolved against them. Called with `resolving` held, unless the job had
    /// settled its frozen delta and let go of it: then no entry is left to look up.
    pub(super) fn mark_frozen_failed(&self) {
        if let Some(f) = self.state.write().frozen.as_mut() {
            f.failed = true;
        }
    }

    /// Waits for the background checkpoint, if any, and deals with its outcome, until no
    /// checkpoint runs (a job that finds the index must grow hands over to a growth job).
    ///
    /// # Errors
    /// The checkpoint's error if it poisoned the store. A failure that did not (a damaged
    /// or full bucket) is repaired by rebuilding the index from the log; that repair's
    /// error is returned (the frozen delta then stays, and the next checkpoint retries).
    pub(crate) fn finish_job(&self, w: &mut Writer) -> Result<()> {
        while w.job.is_some() {
            self.collect_job_sync(w)?;
        }
        Ok(())
    }

    /// Joins the background checkpoint, if any, and deals with its outcome; a job that
    /// must grow the index is followed by a growth job on a thread of its own.
    pub(super) fn collect_job(self: &Arc<Self>, w: &mut Writer) -> Result<()> {
        let Some(job) = w.job.take() else {
            return Ok(());
        };
        let r = self.join_job(job.thread);
        if let Ok(JobEnd::NeedsGrowth(keys)) = r {
            let plan = {
                let _resolving = self.resolving.lock();
                self.plan_growth(w, &job.plan, keys)
            };
            return match plan {
                Ok(plan) => self.spawn_job(w, plan),
                Err(e) => self.job_done(w, &job.plan, Err(e), false),
            };
        }
        self.job_done(w, &job.plan, r, false)
    }

    /// [`Inner::collect_job`] without a new thread: a growth job runs on this one.
    fn collect_job_sync(&self, w: &mut Writer) -> Result<()> {
        let Some(job) = w.job.take() else {
            return Ok(());
        };
        let r = self.join_job(job.thread);
        self.job_done(w, &job.plan, r, true)
    }

    /// Waits for a checkpoint job's thread. Meanwhile this thread holds the writer
    /// mutex, so no commit makes the steps the job would hand the writer: it makes them
    /// itself (see `super::handoff`).
    fn join_job(&self, thread: std::thread::JoinHandle<Result<JobEnd>>) -> Result<JobEnd> {
        let held = WriterHeld::new(self);
        let r = thread.join();
        drop(held);
        r.unwrap_or(Err(Error::Unsupported(
            "internal: the checkpoint thread panicked",
        )))
    }

    /// Deals with a checkpoint job's outcome. A job that must grow the index is followed
    /// by the growth, here if `grow_here`, else it fails like a full bucket.
    pub(super) fn job_done(
        &self,
        w: &mut Writer,
        plan: &JobPlan,
        r: Result<JobEnd>,
        grow_here: bool,
    ) -> Result<()> {
        let e: Error = match r {
            Ok(JobEnd::NeedsGrowth(keys)) if grow_here => {
                let _resolving = self.resolving.lock();
                match self.plan_growth(w, plan, keys) {
                    Ok(grown) => {
                        let r = self.run_job_locked(&grown, &mut None);
                        if let Ok(JobEnd::Done) = r {
                            self.checkpoints.fetch_add(1, Ordering::Relaxed);
                        }
                        drop(_resolving);
                        return self.job_done(w, &grown, r, false);
                    }
                    Err(e) => e,
                }
            }
            Ok(JobEnd::Done) => return Ok(()),
            Ok(JobEnd::NeedsGrowth(_)) => Error::Unsupported("index bucket full"),
            Err(e) => e,
        };
        self.check_not_poisoned()?;
        self.note_error(&e);
        self.mark_frozen_failed();
        if let Some(claimed) = plan.grow {
            self.forget_claim(plan.old, claimed);
        }
        // With the frozen delta still there, this rebuilds the index from the log.
        self.checkpoint(w, STATE_DIRTY)
    }

    /// A background checkpoint (see `start_checkpoint`): the checkpoint protocol of the
    /// module docs, for the frozen delta, ending in a DIRTY slot at `plan.log_end`.
    pub(super) fn run_job(&self, plan: &JobPlan) -> Result<JobEnd> {
        #[cfg(test)]
        super::tests::checkpoint_may_run(self);
        let before = self.slots.lock().last;
        let mut resolving = Some(self.resolving.lock());
        let r = self.run_job_locked(plan, &mut resolving);
        match r {
            Ok(JobEnd::Done) => {
                self.checkpoints.fetch_add(1, Ordering::Relaxed);
            }
            // Nothing written: the frozen delta stays good for the growth that follows.
            Ok(JobEnd::NeedsGrowth(_)) => {}
            // Under `resolving` if the job failed before it settled the frozen delta: no
            // counter reader can have looked at buckets this job may have rewritten
            // halfway (see `Frozen::failed`). After that, none looks there at all.
            Err(_) => self.mark_frozen_failed(),
        }
        drop(resolving);
        if matches!(r, Ok(JobEnd::Done)) {
            self.allocate_for_next_growth(plan, &before);
        }
        r
    }

    /// After a checkpoint (`before` is the slot it followed): the next `freeze` claims
    /// a larger index region, behind a JUMP at the tail, when the keys surely call for
    /// it, and the writer allocated the whole region in that claim (512 MiB at 11.7M
    /// keys waited 167-254 ms for block bitmaps under a busy disk). So if the keys this
    /// checkpoint's interval added, added again in each of as many intervals as the
    /// writer may run ahead of a checkpoint, would call for a larger index, this
    /// allocates the region and the log the intervals until then would append at this
    /// one's rate, now, on the checkpoint's thread and with no lock held, unless they
    /// are allocated already. The next `freeze` joins this job first, so it finds them
    /// allocated. (A claim after a job found a bucket full has its region allocated by
    /// that job, see `run_job_locked`.) Space allocated here is the log's soon at the
    /// observed rate, and a close gives back what it did not use.
    fn allocate_for_next_growth(&self, plan: &JobPlan, before: &CheckpointInfo) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let last = self.slots.lock().last;
        let new_keys = last.live_keys.saturating_sub(before.live_keys);
        let (geom, published, current) = {
            let st = self.state.read();
            (
                st.index,
                st.map.published(),
                Arc::ptr_eq(&st.file, &plan.file),
            )
        };
        if new_keys == 0 || !current {
            return;
        }
        let max_keys = max_keys_for(geom.buckets);
        // Intervals at this rate until the keys pass the threshold.
        let intervals = max_keys
            .saturating_sub(last.live_keys)
            .div_ceil(new_keys)
            .max(1);
        if intervals > CHECKPOINT_LAG as u64 {
            return;
        }
        let keys = last
            .live_keys
            .saturating_add(new_keys.saturating_mul(intervals));
        let region = crate::state::IndexGeom {
            buckets: buckets_for(keys).max(geom.buckets * 2),
            ..geom
        };
        // The log this interval appended (without a region it claimed), per interval
        // until the claim, at most the writer's hard limit.
        let claimed = plan.grow.map_or(0, |(g, _)| g.bytes());
        let appended = last
            .log_end
            .saturating_sub(before.log_end)
            .saturating_sub(claimed);
        let ahead = appended
            .saturating_mul(intervals)
            .min(REPLAY_MAX * CHECKPOINT_LAG as u64);
        let need = published
            .saturating_add(ahead)
            .saturating_add(region.bytes())
            .saturating_add(crate::format::JUMP_LEN + 2 * crate::format::PAGE);
        let allocated = self
            .take_ahead(&plan.file)
            .max(plan.file.len().unwrap_or(0));
        if allocated < need {
            self.allocate_ahead(&plan.file, allocated, crate::format::page_up(need));
        }
    }

    /// The checkpoint protocol for the frozen delta, on whichever thread, with
    /// `resolving` held. If the caller hands its guard over in `resolving`, it is
    /// dropped as soon as the frozen delta is settled: before an in-place checkpoint
    /// rewrites the buckets, before a growth writes the new region.
    pub(super) fn run_job_locked(
        &self,
        plan: &JobPlan,
        resolving: &mut Option<MutexGuard<'_, ()>>,
    ) -> Result<JobEnd> {
        let mut slots = self.slots.lock();
        let geom = plan.grow.map_or(plan.old, |g| g.0);
        let (map, len, end, frozen_counters) = {
            let st = self.state.read();
            let Some(f) = &st.frozen else {
                return Err(Error::Unsupported("internal: no frozen delta"));
            };
            (Arc::clone(&st.map), f.delta.len(), f.end, f.counters)
        };
        // Mapped outside the lock (the frozen delta gains no entries), and copied in
        // pieces (a copy of a million entries under one read lock kept the writer
        // waiting 12 ms), exact: the job holds `resolving`.
        let (entries, whole) = self.copy_frozen(end, crate::anon::AnonVec::with_capacity(len));
        if !whole {
            return Err(Error::Unsupported("internal: no frozen delta"));
        }
        let mut gone = Resolved::default();
        let mut entries = if plan.grow.is_some() && plan.old.buckets > 0 {
            // A growth leaves the old region's buckets as they are: look the keys up
            // there first (reads only, in the old region's bucket order) and settle the
            // counters, so that counter readers need not wait for the whole new region.
            let mut by_old = crate::index::sort_by_bucket(entries, plan.old.buckets);
            Self::resolve_in_place(&map, plan.old, &mut by_old, &mut gone)?;
            self.settle_frozen(std::mem::take(&mut gone), resolving, true)?;
            crate::index::sort_by_bucket(by_old, geom.buckets)
        } else {
            crate::index::sort_by_bucket(entries, geom.buckets)
        };
        let applied = match plan.grow {
            None => {
                // Reads first: the exact counters this checkpoint will record, announced
                // in the CHECKPOINTING slot so that a crash during the rewrite is redone
                // from the log, not rebuilt; and room in every bucket.
                if !Self::resolve_in_place(&map, geom, &mut entries, &mut gone)? {
                    let mut after = frozen_counters;
                    gone.take_from(&mut after);
                    // The writer claims the larger region under its mutex: allocate
                    // its space from here first, so that claim finds it allocated
                    // (at 50M keys, allocating a 2 GiB region there kept a put
                    // waiting 3.47 s).
                    let region = crate::state::IndexGeom {
                        buckets: super::reindex::buckets_for(after.live_keys)
                            .max(plan.old.buckets * 2),
                        ..plan.old
                    };
                    self.allocate_for(&plan.file, region.bytes());
                    return Ok(JobEnd::NeedsGrowth(after.live_keys));
                }
                let mut after = frozen_counters;
                gone.take_from(&mut after);
                // Every frozen entry is looked up now (the rewrite finds nothing more to
                // count): the counters are exact without this checkpoint, so those who
                // need them exact (`Store::len`, `Store::stats`) need not wait for the
                // slow part. A failure from here on leaves no frozen entry unresolved, so
                // no counter reader looks one up in a half-rewritten bucket.
                self.settle_frozen(std::mem::take(&mut gone), resolving, false)?;
                let mut c = slots.last;
                c.state = STATE_CHECKPOINTING;
                c.redo = Some(RedoInfo {
                    end: plan.log_end,
                    live_keys: after.live_keys,
                    live_bytes: after.live_bytes,
                    log_bytes: after.log_bytes,
                    dead_index_bytes: after.dead_index_bytes,
                });
                self.write_slot(&mut slots, &plan.file, c)?;
                self.sync_file(&plan.file)?;
                // Every entry is settled now: the rewrite counts nothing again.
                let mut again = Resolved::default();
                self.rewrite_buckets(&map, &plan.file, geom, &entries, &mut again)
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
        // The rewritten buckets' new keys, into the filter before the frozen delta goes
        // (a grown index gets a filter of its own).
        let in_place = plan.grow.is_none();
        let filtered = in_place
            .then(|| super::filter::insert_entries(self, &entries))
            .flatten();
        let counters = {
            let mut st = self.state.write();
            if in_place {
                Self::filter_checkpointed(&mut st, filtered.as_ref(), &entries);
            }
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
            index_style: geom.style,
            index_off: geom.off,
            index_buckets: geom.buckets,
            log_end: plan.log_end,
            live_keys: counters.live_keys,
            live_bytes: counters.live_bytes,
            log_bytes: counters.log_bytes,
            dead_index_bytes: counters.dead_index_bytes,
            redo: None,
        };
        self.write_slot(&mut slots, &plan.file, c)?;
        self.sync_file(&plan.file)?;
        let frozen = {
            let mut st = self.state.write();
            st.set_index(geom);
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
        Ok(JobEnd::Done)
    }

    /// Takes the old records a checkpoint found for its frozen delta's entries (all of
    /// them: none is left unresolved) out of the counters, then drops the `resolving`
    /// guard the caller handed over, if any (before the buckets of an in-place
    /// checkpoint, or a `growth`'s new region, are written).
    fn settle_frozen(
        &self,
        gone: Resolved,
        resolving: &mut Option<MutexGuard<'_, ()>>,
        growth: bool,
    ) -> Result<()> {
        {
            let mut st = self.state.write();
            gone.take_from(&mut st.counters);
            let Some(f) = st.frozen.as_mut() else {
                return Err(Error::Unsupported("internal: no frozen delta"));
            };
            gone.take_from(&mut f.counters);
            f.delta.mark_all_resolved();
        }
        drop(resolving.take());
        #[cfg(test)]
        super::tests::settled_may_go_on(self, growth);
        #[cfg(not(test))]
        let _ = growth;
        Ok(())
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
}

/// Clears `Inner::job_running` when dropped: at the end of a checkpoint job's thread,
/// also when it unwinds.
struct JobRunning<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for JobRunning<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Counts this thread in `Inner::writer_held` while it lives.
struct WriterHeld<'a>(&'a Inner);

impl<'a> WriterHeld<'a> {
    fn new(inner: &'a Inner) -> Self {
        inner.writer_held.fetch_add(1, Ordering::AcqRel);
        WriterHeld(inner)
    }
}

impl Drop for WriterHeld<'_> {
    fn drop(&mut self) {
        self.0.writer_held.fetch_sub(1, Ordering::AcqRel);
    }
}
