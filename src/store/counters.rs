//! Exact live counters: settling the index lookups the write path deferred.
//!
//! The current delta's backlog is looked up a piece at a time with no lock held (see
//! `crate::resolve`), by the background thread and by callers that need the counters
//! exact (`Store::len`, `Store::stats`). The store's own threads hand each piece's two
//! locked steps to the writer while it writes (see `super::handoff`). Under the
//! exclusive state lock are only the lookups a piece must make again (a checkpoint
//! changed what it read) and what is left of a frozen delta whose checkpoint failed
//! (`State::resolve`; a running checkpoint resolves its own frozen delta, holding
//! `resolving`).

use std::sync::atomic::Ordering::Relaxed;

use super::handoff::Step;
use super::inner::Inner;
use crate::resolve::Plan;

/// Deferred index lookups done per hold of the state lock when they cannot be made
/// without it (see `resolve_counters_locked`): a few milliseconds at most.
pub(super) const RESOLVE_CHUNK: usize = 16_384;
/// Unresolved keys of the current delta looked up per piece (see `Inner::resolve_piece`).
const RESOLVE_PIECE: usize = 256;
/// A piece of counter resolution whose lookups take longer than this read its buckets
/// from the disk (resident, 256 lookups take well under a millisecond).
const COLD_PIECE: std::time::Duration = std::time::Duration::from_millis(8);

impl Inner {
    /// [`Inner::resolve_counters`] for a caller that holds `resolving`.
    pub(crate) fn resolve_counters_locked(&self) -> crate::state::Counters {
        // The current delta's backlog first, with its lookups outside the lock: `len()`
        // or `stats()` on a store with millions of deferred lookups must not hold the
        // writer off for them. As many as were queued at the start: writers go on
        // queueing meanwhile, and lock-free pieces alone might never catch up with a
        // fast writer (whose next checkpoint would then wait for this call, which
        // holds `resolving`). What is left after that, the writes made meanwhile, is
        // looked up under the lock, a chunk per hold.
        let mut lock_free = self.state.read().delta.unresolved_len();
        loop {
            {
                let st = self.state.read();
                if st.settled() {
                    return st.counters;
                }
            }
            if lock_free > 0 && self.resolve_piece() {
                lock_free = lock_free.saturating_sub(RESOLVE_PIECE);
                continue;
            }
            // Lookups in the buckets under the lock: none may change meanwhile.
            let _gate = self.index_gate.read();
            let mut st = self.state.write();
            st.resolve(RESOLVE_CHUNK);
            if st.settled() {
                return st.counters;
            }
        }
    }

    /// Looks up the old records of the next piece of the current delta's unresolved
    /// keys (see `crate::resolve`): the lookups hold no lock, and only the counting of
    /// their outcomes takes the exclusive state lock. Returns false if there was
    /// nothing to look up. One piece at a time (`resolve_pieces`): a piece claims the
    /// front of the delta's queue that it noted, so two at once would find each
    /// other's keys claimed and look theirs up again under the lock.
    ///
    /// On a store thread, the two locked steps are handed to the writer while it
    /// writes (see `super::handoff`).
    pub(super) fn resolve_piece(&self) -> bool {
        let hand = super::threads::on_store_thread();
        let _one = if hand {
            self.resolve_pieces.lock()
        } else {
            // A store thread that holds it waiting for the writer stops waiting.
            let callers = &self.handoff.callers;
            callers.fetch_add(1, Relaxed);
            let one = self.resolve_pieces.lock();
            callers.fetch_sub(1, Relaxed);
            one
        };
        let handed = hand.then(|| {
            // (A yield before each step, as before a lock of its own: see `plan_piece`.
            // Without them here, the writer's time spent runnable but waiting for a
            // core in a 20M-key overwrite went back up from about 4 s to 7-9 s.)
            std::thread::yield_now();
            self.hand_to_writer(&self.handoff, Step::Plan(RESOLVE_PIECE))
        });
        let planned = match handed {
            Some(Ok(Step::Planned(plan))) => plan.map(|p| *p),
            _ => self.plan_piece(),
        };
        let Some(mut plan) = planned else {
            return false;
        };
        plan.order();
        // Over an index the page cache does not hold (100M keys beside a compaction),
        // each probe's fault read a 128 KiB read-around window for its 4 KiB bucket, one
        // after another: 925 GB read in 19 minutes. After a slow piece, the next ones
        // read exactly their buckets in first, all at once. Over a resident index that
        // is only cost (two `madvise` calls per bucket: 165,000 in 3 s of durable group
        // commits).
        let cold = self.index_cold.load(Relaxed);
        let t = std::time::Instant::now();
        if cold {
            plan.prefetch_buckets();
            self.prefetched_pieces.fetch_add(1, Relaxed);
            // Reading resident pages takes two quick system calls per bucket; a piece
            // that had to wait for the disk takes far longer.
            if t.elapsed() < COLD_PIECE / 4 {
                self.index_cold.store(false, Relaxed);
            }
        }
        plan.look_up();
        if !cold && t.elapsed() > COLD_PIECE {
            self.index_cold.store(true, Relaxed);
        }
        // The slots that claiming the piece rewrites, asked for before the lock.
        plan.prefetch_claims();
        let applied = if hand {
            std::thread::yield_now();
            match self.hand_to_writer(&self.handoff, Step::Count(Box::new(plan))) {
                Ok(Step::Counted(applied, _spent)) => applied,
                Err(Step::Count(plan)) => self.count_piece(*plan),
                // (Not an answer to this step: nothing was claimed, so nothing is lost.)
                Ok(_) | Err(_) => None,
            }
        } else {
            self.count_piece(plan)
        };
        // `None`: a checkpoint froze the delta (or a compaction or growth changed the
        // file or the index) meanwhile; the next plan starts from there.
        if let Some(locked) = applied {
            self.resolved_pieces.fetch_add(1, Relaxed);
            self.locked_lookups.fetch_add(locked as u64, Relaxed);
        }
        true
    }

    /// Step 1 of a piece, under a read lock of its own (see `crate::resolve`).
    fn plan_piece(&self) -> Option<Plan> {
        // The piece's delta slots asked for before the lock that plans it (a miss
        // each), so that a niced thread holds the lock for as short a time as it can.
        let mut hashes = Vec::with_capacity(RESOLVE_PIECE);
        let (live, frozen) = Plan::peek(&self.state.read(), RESOLVE_PIECE, &mut hashes);
        Plan::prefetch_slots(&hashes, live, frozen);
        // A yield before each lock: a niced thread that has used its time runs again
        // with its next turn ahead of it, rather than losing its core in the middle of
        // a hold while the writer waits. (20M sweeps, three traced pairs: the writer's
        // waits over 3 ms fell from 93-120 to 21-35, its overwrite puts over 1 ms from
        // about 3,100 to 1,300; see `docs/BENCH.md`.)
        std::thread::yield_now();
        let st = self.state.read();
        #[cfg(test)]
        super::tests::step_lock_held(self);
        Plan::take(&st, RESOLVE_PIECE)
    }

    /// Step 3 of a piece, under the exclusive lock taken here (see `crate::resolve`).
    fn count_piece(&self, mut plan: Plan) -> Option<usize> {
        // The lookups `apply` makes itself read buckets: none may change meanwhile.
        let gate = self.index_gate.read();
        std::thread::yield_now();
        let mut st = self.state.write();
        #[cfg(test)]
        super::tests::step_lock_held(self);
        let applied = plan.apply(&mut st);
        drop(st);
        drop(gate);
        applied
    }
}
