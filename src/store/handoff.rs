//! The locked steps of counter resolution, made by the writer while it writes.
//!
//! A piece of counter resolution (see `crate::resolve`) takes the state lock twice: a
//! read hold to plan the piece and an exclusive hold to count it, tens of microseconds
//! each. Made by the store's own (niced) threads, a hold that lost its core kept the
//! writer waiting for as long as the other threads kept that core: even with a yield
//! before each lock, 21-35 waits over 3 ms per 20M-key sweep, up to 38 ms (see
//! `docs/BENCH.md`). The writer takes the exclusive lock at every commit anyway. So a
//! store thread hands it both steps: it posts the step here, and the writer's next
//! commit makes it under the lock it already holds and posts the answer back. The
//! lookups in between stay on the store's thread, with no lock held.
//!
//! The writer never waits here: it tries this mutex, and for the count the index gate
//! (taken before the state lock everywhere else), and leaves the step for its next
//! commit if either is taken. A store thread waits [`HANDOFF_WAIT`] for the answer,
//! and on as long as the writer goes on writing (up to `HANDOFF_WAIT_MAX`). A writer
//! that did not commit meanwhile is idle (or waits itself, for a checkpoint or a
//! sync): the store thread takes the step back and makes it itself, under a lock of
//! its own as before, and asks no more until the writer has written again. An
//! application thread that waits to resolve a piece itself (`len()`, perhaps on the
//! writer's own thread) ends the wait at once.
//!
//! What the writer pays: a step of 256 keys takes it tens of microseconds, two steps
//! per piece, while there is a backlog to resolve (at 20M keys, the p99.9 of a fill's
//! puts went from 15-35 µs to about 40 µs; see `docs/BENCH.md`).

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64};

use parking_lot::Mutex;

use super::inner::Inner;
use crate::resolve::Plan;
use crate::state::State;

/// How long a store thread waits for the writer to make a step (see the module docs).
/// A writer that commits takes a microsecond or two to get to it; one that slows down
/// for a checkpoint sleeps up to 2 ms between writes. (At 1 ms, store threads took
/// steps back during such pauses and made them under a lock of their own, and one such
/// hold kept the writer waiting 73 ms in a 20M-key sweep.)
pub(super) const HANDOFF_WAIT: std::time::Duration = std::time::Duration::from_millis(5);

/// The longest a store thread waits for a writer that goes on writing (see
/// `Inner::hand_to_writer`). A count is left for the next commit while a checkpoint
/// holds the index gate; taken back after 5 ms, four counts in a 20M-key sweep were
/// made under a lock of the store thread's own, which kept the writer waiting up to
/// 13.5 ms.
const HANDOFF_WAIT_MAX: std::time::Duration = std::time::Duration::from_millis(50);

/// How long a store thread spins for the answer before it yields its core between
/// looks, and how long it yields before it sleeps between them (see
/// `Inner::hand_to_writer`).
const HANDOFF_SPIN: std::time::Duration = std::time::Duration::from_micros(20);
const HANDOFF_YIELD: std::time::Duration = std::time::Duration::from_micros(500);
/// The sleep between looks after that.
const HANDOFF_NAP: std::time::Duration = std::time::Duration::from_micros(100);

/// A step of counter resolution handed to the writer, or its answer.
#[derive(Debug, Default)]
pub(super) enum Step {
    /// Nothing asked.
    #[default]
    Empty,
    /// Asked: plan the next piece of at most this many hashes (`Plan::take`).
    Plan(usize),
    /// The answer: the piece, or `None` if nothing was left to look up.
    Planned(Option<Box<Plan>>),
    /// Asked: count this looked-up piece (`Plan::apply`).
    Count(Box<Plan>),
    /// The answer: what `Plan::apply` returned, and the spent plan, for the store
    /// thread to drop (see `Plan::apply`).
    Counted(Option<usize>, Box<Plan>),
}

impl Step {
    fn is_request(&self) -> bool {
        matches!(self, Step::Plan(_) | Step::Count(_))
    }
}

/// Where a store thread hands the writer a step (see the module docs). Its mutex comes
/// after every other lock: the writer tries it under the state lock, and a store thread
/// takes it holding only `resolve_pieces`, for a moment.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(super) struct Handoff {
    /// A step waits for the writer: the one thing every commit reads here. The writer
    /// clears it once its answer is in [`Handoff::step`] (release), which is what the
    /// store thread waits for.
    asked: AtomicBool,
    step: Mutex<Step>,
    /// `published_writes` when a step last went unanswered: until it moves, the writer
    /// is idle and store threads make their steps themselves.
    idle_at: AtomicU64,
    /// Application threads waiting to resolve a piece themselves (see
    /// `Inner::resolve_piece`): a store thread stops waiting for the writer.
    pub(super) callers: std::sync::atomic::AtomicUsize,
    /// Steps the writer made (tests and diagnosis).
    pub(super) served: AtomicU64,
    /// A wait other than [`HANDOFF_WAIT`] (unit tests only).
    #[cfg(test)]
    pub(super) test_wait: Mutex<Option<std::time::Duration>>,
}

impl Handoff {
    /// How long a store thread waits for an answer.
    fn wait(&self) -> std::time::Duration {
        #[cfg(test)]
        if let Some(w) = *self.test_wait.lock() {
            return w;
        }
        HANDOFF_WAIT
    }
}

impl Inner {
    /// Hands `step` to the writer and waits for its answer (see the module docs).
    /// `Err` gives the step back: the writer did not take it in time (or is known to be
    /// idle), and the caller makes it itself.
    pub(super) fn hand_to_writer(&self, step: Step) -> Result<Step, Step> {
        let h = &self.handoff;
        let writes = self.published_writes.load(Acquire);
        if writes == 0 || h.idle_at.load(Relaxed) == writes {
            return Err(step);
        }
        *h.step.lock() = step;
        h.asked.store(true, Release);
        // Waiting by yielding, not asleep: a sleeping niced thread woken by the writer
        // waited for a core before it went on, about a millisecond per step beside a
        // busy writer (a 20M-key fill resolved 690 pieces a second, against 5,800 when
        // the thread took the locks itself).
        // A writer that is on a core answers within microseconds: spin that long
        // first, rather than give the core away at once.
        let asked_at = std::time::Instant::now();
        let (mut since, mut seen) = (asked_at, writes);
        while h.asked.load(Acquire) {
            // (An application thread waiting for the next piece, in `len()` perhaps on
            // the writer's own thread, would wait for this one's whole wait.)
            if h.callers.load(Relaxed) > 0 {
                break;
            }
            let waited = asked_at.elapsed();
            if since.elapsed() >= h.wait() {
                // A writer that wrote meanwhile but left the step (a checkpoint held the
                // index gate) is waited for on, up to `HANDOFF_WAIT_MAX`.
                let now = self.published_writes.load(Acquire);
                if now == seen || waited >= HANDOFF_WAIT_MAX {
                    break;
                }
                (since, seen) = (std::time::Instant::now(), now);
            }
            if waited < HANDOFF_SPIN {
                std::hint::spin_loop();
            } else if waited < HANDOFF_YIELD {
                std::thread::yield_now();
            } else {
                std::thread::sleep(HANDOFF_NAP);
            }
        }
        let mut slot = h.step.lock();
        h.asked.store(false, Relaxed);
        let answer = std::mem::take(&mut *slot);
        drop(slot);
        if answer.is_request() {
            h.idle_at
                .store(self.published_writes.load(Acquire), Relaxed);
            return Err(answer);
        }
        Ok(answer)
    }

    /// For the writer, under the exclusive state lock of a commit: makes the step a
    /// store thread handed over, if there is one and nothing it needs is taken.
    pub(super) fn serve_handoff(&self, st: &mut State) {
        let h = &self.handoff;
        if !h.asked.load(Acquire) {
            return;
        }
        let Some(mut slot) = h.step.try_lock() else {
            return;
        };
        let answer = match std::mem::take(&mut *slot) {
            Step::Plan(max) => {
                // The slots the plan reads, asked for all at once first: their misses
                // then overlap instead of coming one after another.
                let mut hashes = Vec::with_capacity(max);
                let (live, frozen) = Plan::peek(st, max, &mut hashes);
                Plan::prefetch_slots(&hashes, live, frozen);
                Step::Planned(Plan::take(st, max).map(Box::new))
            }
            Step::Count(mut plan) => {
                // `apply`'s own lookups read buckets, which no change may rewrite
                // meanwhile; the gate comes before the state lock, so only tried here.
                let Some(gate) = self.index_gate.try_read() else {
                    *slot = Step::Count(plan);
                    return;
                };
                plan.prefetch_claims();
                let counted = plan.apply(st);
                drop(gate);
                Step::Counted(counted, plan)
            }
            other => {
                *slot = other;
                return;
            }
        };
        *slot = answer;
        h.served.fetch_add(1, Relaxed);
        h.asked.store(false, Release);
    }
}
