//! Short steps under the state lock, made by the writer while it writes.
//!
//! The store's own threads run niced, and a state lock hold during which one of them
//! lost its core kept the writer waiting for as long as the other threads kept that
//! core. Two kinds of work took such holds over and over:
//!
//! - **Counter resolution** (see `crate::resolve`): a read hold to plan each piece of
//!   256 keys and an exclusive hold to count it, tens of microseconds each. Even with a
//!   yield before each lock, 21-35 waits over 3 ms per 20M-key sweep, up to 38 ms.
//! - **A frozen delta's copy**, by its checkpoint and by compaction's snapshot: a read
//!   hold per 64K slots. 3-10 waits per sweep, up to 40 ms.
//!
//! The writer takes the exclusive lock at every commit anyway. So a store thread hands
//! it those steps: it posts the step in a [`Handoff`], and the writer's next commit
//! makes it under the lock it already holds and posts the answer back (see
//! `docs/BENCH.md`). What comes between the steps (resolution's lookups) stays on the
//! store thread, with no lock held.
//!
//! The writer never waits here: it tries this mutex, and for the count the index gate
//! (taken before the state lock everywhere else), and leaves the step for its next
//! commit if either is taken. A store thread waits [`HANDOFF_WAIT`] for the answer,
//! and on as long as the writer goes on writing (up to `HANDOFF_WAIT_MAX`). A writer
//! that did not commit meanwhile is idle (or waits itself, for a checkpoint or a
//! sync): the store thread takes the step back and makes it itself, under a lock of
//! its own as before, and asks no more until the writer has written again. An
//! application thread that waits to resolve a piece itself (`len()`, perhaps on the
//! writer's own thread) ends the wait at once, and so does a checkpoint that holds the
//! writer mutex (run by that thread, or waited for).
//!
//! What the writer pays: tens of microseconds per step: two steps per 256 keys of a
//! backlog to resolve, and one per 4,096 slots of a frozen delta's copy (at 20M keys,
//! the p99.9 of a fill's puts went from 9-43 µs to 27-50 µs).

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64};

use parking_lot::Mutex;

use super::inner::Inner;
use crate::anon::AnonVec;
use crate::index::DeltaEntry;
use crate::resolve::Plan;
use crate::state::State;

/// How long a store thread waits for the writer to make a step (see the module docs).
/// A writer that commits takes a microsecond or two to get to it; one that slows down
/// for a checkpoint sleeps up to 2 ms between writes. (At 1 ms, store threads took
/// steps back during such pauses and made them under a lock of their own, and one such
/// hold kept the writer waiting 73 ms in a 20M-key sweep.)
const HANDOFF_WAIT: std::time::Duration = std::time::Duration::from_millis(5);

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

/// Slots of a frozen delta the writer copies per step (see `Inner::copy_frozen`): 64 KiB
/// of table, about ten microseconds.
const COPY_STEP: usize = 4096;

/// A step handed to the writer, or its answer.
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
    /// Asked: copy the next slots of a frozen delta (see `Inner::copy_frozen`).
    Copy(Box<CopyPiece>),
    /// The answer: the same, with the slots copied.
    Copied(Box<CopyPiece>),
}

/// A copy of a frozen delta's entries in progress (see `Inner::copy_frozen`).
#[derive(Debug)]
pub(super) struct CopyPiece {
    /// The log end of the frozen delta being copied: tells it from the next one.
    end: u64,
    /// Where the copy is in its table (see `Delta::copy_entries`).
    cursor: usize,
    /// The entries copied so far, with room for all of them (a push never grows it
    /// under the lock).
    entries: AnonVec<DeltaEntry>,
    /// Slots left to copy.
    more: bool,
    /// The frozen delta is gone: its checkpoint finished, or another replaced it.
    gone: bool,
}

impl CopyPiece {
    /// Copies the next `slots` slots of the frozen delta in `st`, if it is still the
    /// one this copy started from.
    fn copy_from(&mut self, st: &State, slots: usize) {
        match st.frozen.as_ref().filter(|f| f.end == self.end) {
            Some(f) => {
                self.more = f
                    .delta
                    .copy_entries(&mut self.cursor, slots, &mut self.entries)
            }
            None => (self.more, self.gone) = (false, true),
        }
    }
}

impl Step {
    fn is_request(&self) -> bool {
        matches!(self, Step::Plan(_) | Step::Count(_) | Step::Copy(_))
    }
}

/// Where a store thread hands the writer a step (see the module docs). Its mutexes come
/// after every other lock: the writer tries the step's under the state lock, and a store
/// thread takes them holding no lock the writer waits for.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(super) struct Handoff {
    /// A step waits for the writer: the one thing every commit reads here. The writer
    /// clears it once its answer is in [`Handoff::step`] (release), which is what the
    /// store thread waits for.
    asked: AtomicBool,
    /// Held by the store thread whose step is in [`Handoff::step`], from posting it to
    /// taking the answer: two at once (a checkpoint's copy and compaction's) would
    /// overwrite each other's step and take each other's answer.
    turn: Mutex<()>,
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
    pub(super) fn hand_to_writer(&self, h: &Handoff, step: Step) -> Result<Step, Step> {
        let writes = self.published_writes.load(Acquire);
        let held = || self.writer_held.load(Acquire) > 0;
        if writes == 0 || h.idle_at.load(Relaxed) == writes || held() {
            return Err(step);
        }
        let _turn = h.turn.lock();
        *h.step.lock() = step;
        h.asked.store(true, Release);
        // Waiting by spinning, then yielding, not asleep: a sleeping niced thread that
        // the writer woke waited for a core before it went on, about a millisecond per
        // step beside a busy writer (a 20M-key fill resolved 690 pieces a second,
        // against 5,800 when the thread took the locks itself). A writer that is on a
        // core answers within microseconds.
        let asked_at = std::time::Instant::now();
        let (mut since, mut seen) = (asked_at, writes);
        while h.asked.load(Acquire) {
            // (An application thread waiting for the next piece, in `len()` perhaps on
            // the writer's own thread, would wait for this one's whole wait.)
            if h.callers.load(Relaxed) > 0 || held() {
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

    /// For the writer, under the exclusive state lock of a commit: makes the steps
    /// store threads handed over, if there are any and nothing they need is taken.
    pub(super) fn serve_handoffs(&self, st: &mut State) {
        self.serve_handoff(&self.handoff, st);
        self.serve_handoff(&self.copy_handoff, st);
    }

    fn serve_handoff(&self, h: &Handoff, st: &mut State) {
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
            Step::Copy(mut piece) => {
                piece.copy_from(st, COPY_STEP);
                Step::Copied(piece)
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

    /// Copies the entries of the frozen delta whose log end is `end` into `entries`
    /// (which has room for all of them), and says whether it was there to the end
    /// (false: its checkpoint finished or another replaced it; `entries` then holds
    /// what was copied before). The frozen delta gains no entries, and the resolution
    /// marks this copy reads change only under `resolving`, which callers that need
    /// them exact hold.
    ///
    /// It lives in the state, so each piece is read under the state lock. On a store
    /// thread the pieces are handed to the writer while it writes (see the module
    /// docs): copied under a read lock of the store thread's own, a piece during which
    /// it lost its core kept the writer waiting 3-10 times per 20M-key sweep, up to
    /// 40 ms. Else a piece per read lock of this thread's own.
    pub(super) fn copy_frozen(
        &self,
        end: u64,
        entries: AnonVec<DeltaEntry>,
    ) -> (AnonVec<DeltaEntry>, bool) {
        let hand = super::threads::on_store_thread();
        let mut piece = Box::new(CopyPiece {
            end,
            cursor: 0,
            entries,
            more: true,
            gone: false,
        });
        while piece.more {
            piece = if hand {
                // (A yield before each step, as resolution's: see `Inner::resolve_piece`.)
                std::thread::yield_now();
                match self.hand_to_writer(&self.copy_handoff, Step::Copy(piece)) {
                    Ok(Step::Copied(copied)) => copied,
                    Err(Step::Copy(back)) => self.copy_piece_locked(back),
                    // (Not an answer to this step: never given.)
                    Ok(_) | Err(_) => return (AnonVec::with_capacity(0), false),
                }
            } else {
                self.copy_piece_locked(piece)
            };
        }
        (piece.entries, !piece.gone)
    }

    /// A piece of [`Inner::copy_frozen`] under a read lock of this thread's own.
    fn copy_piece_locked(&self, mut piece: Box<CopyPiece>) -> Box<CopyPiece> {
        let st = self.state.read();
        #[cfg(test)]
        super::tests::step_lock_held(self);
        piece.copy_from(&st, super::checkpoint::COPY_PIECE);
        piece
    }
}
