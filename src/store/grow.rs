//! File growth: allocation ahead of the log tail, remapping past the reservation.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::inner::{Inner, Writer};
use crate::error::Result;
use crate::format::page_up;
use crate::map::{FileHandle, Mapping};

/// Window of real zeros kept ahead of the tail under `Always`/`Async`.
pub(super) const ZERO_AHEAD: u64 = 1 << 20;
/// ... topped up at least this much at a time.
const ZERO_STEP: u64 = 64 << 10;

/// Bytes of address space to reserve for a file of `len` bytes: at least 64 GiB on
/// 64-bit targets, so that a store seldom outgrows its mapping. Reserving costs nothing
/// for a shared file mapping, while a remap unmaps the old mapping's page tables
/// (15-88 ms for 1-4 GiB here) and every page faults again.
pub(crate) fn reservation(len: u64) -> u64 {
    let (floor, cap) = if usize::BITS >= 64 {
        (64u64 << 30, 1u64 << 46)
    } else {
        (1 << 30, 1 << 30)
    };
    let want = len.saturating_mul(2).max(floor);
    page_up(want.min(cap.max(len)))
}

/// Smallest growth step.
const MIN_STEP: u64 = 1 << 20;
/// The step never exceeds this share of the live data (keys, values and their
/// headers)...
const STEP_LIVE_DIVISOR: u64 = 8;
/// ... unless the step is below this.
const STEP_LIVE_FLOOR: u64 = 32 << 20;
/// Largest growth step.
const MAX_STEP: u64 = 1 << 30;
/// The writer asks for the next step when it is this close to the allocated end (or a
/// quarter of the file, if less: a small store stays small).
const ASK_AHEAD: u64 = 16 << 20;
/// The background thread allocates in pieces this large, publishing each (and holding
/// the space gate for one piece at a time, see `Inner::space_gate`).
const ALLOCATE_PIECE: u64 = 8 << 20;

/// How much the file grows by when it is `alloc` bytes long and holds `live` bytes of
/// live data: geometric (half the file) while the file is small, at most an eighth of
/// the live data (but 32 MiB) once it is large, within 1 MiB..1 GiB. Doubling, as
/// before, left a store of 1M keys written twice at 4.6x its live data.
pub(crate) fn growth_step(alloc: u64, live: u64) -> u64 {
    let cap = (live / STEP_LIVE_DIVISOR).max(STEP_LIVE_FLOOR);
    (alloc / 2).min(cap).clamp(MIN_STEP, MAX_STEP)
}

impl Inner {
    /// Makes sure `[0, need)` is allocated (and mapped), growing the file by
    /// [`growth_step`]. The background thread allocates the next step ahead of need (half
    /// a step before the writer gets there), so the writer normally only takes what it
    /// allocated; it allocates itself only when the background thread fell behind or
    /// failed (a full disk: then the exact need is tried, and its error returned).
    pub(super) fn ensure_space(&self, w: &mut Writer, need: u64) -> Result<()> {
        if need <= w.alloc {
            // Half a step ahead (at least `ASK_AHEAD`, at most a quarter of the file):
            // under a busy disk an allocation of a large step waited 0.5 s for block
            // bitmaps, and the writer must not catch up with it.
            let window = (w.step / 2).max(ASK_AHEAD).min(w.alloc / 4);
            if w.ahead_asked <= w.alloc && need + window > w.alloc {
                self.ask_ahead(w);
            }
            return Ok(());
        }
        let mut new_len = self.take_ahead(&w.file).max(w.alloc);
        if new_len < need {
            // The background thread is still allocating the step it was asked for: take
            // a piece of it (the thread goes on with the rest), not the whole step,
            // which at 20M keys is hundreds of megabytes and kept a put waiting 21-32 ms.
            // Else (a write larger than the window, or nothing asked) a whole step.
            let step = if w.ahead_asked > new_len {
                ALLOCATE_PIECE
            } else {
                growth_step(w.alloc, self.state.read().counters.live_bytes)
            };
            let want = page_up(need.max(new_len + step));
            if let Err(e) = w.file.allocate(new_len, want - new_len) {
                // The step may not fit on a nearly full disk; the exact need may.
                let exact = page_up(need);
                if exact >= want {
                    return Err(e);
                }
                w.file.allocate(new_len, exact - new_len)?;
                new_len = exact;
            } else {
                new_len = want;
            }
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
            let old = {
                let mut st = self.state.write();
                st.gen.remapped(&map);
                std::mem::replace(&mut st.map, map)
            };
            // Unmapping takes time (page tables): not under the state lock, and not on
            // the writer's thread either if a thread can be had.
            if let Err(e) = super::threads::spawn("mapkv-unmap", self.thread_nice, move || {
                drop(old);
            }) {
                let _ = e;
            }
            w.prefaulted = 0;
        }
        // Only now, with the space mapped, may anything be published in it.
        w.alloc = new_len;
        w.ahead_asked = w.ahead_asked.max(new_len);
        self.size_epoch.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Asks the background thread to allocate the next growth step.
    fn ask_ahead(&self, w: &mut Writer) {
        let step = growth_step(w.alloc, self.state.read().counters.live_bytes);
        let to = page_up(w.alloc + step);
        w.ahead_asked = to;
        w.step = step;
        let mut bg = self.background.lock();
        bg.allocate = Some((Arc::clone(&w.file), w.alloc, to));
        self.background_cv.notify_all();
    }

    /// Allocates `bytes` more of `file` past what it holds (and what was allocated
    /// ahead), off the writer's path, publishing them as allocated ahead: for an index
    /// region the writer is about to claim. Best effort: the writer allocates what is
    /// missing, and reports a full disk.
    pub(super) fn allocate_for(&self, file: &Arc<FileHandle>, bytes: u64) {
        let from = self
            .take_ahead(file)
            .max(file.len().unwrap_or(0))
            .max(page_up(self.state.read().map.published()));
        self.allocate_ahead(file, from, page_up(from + bytes) + ASK_AHEAD);
    }

    /// What the background thread allocated of this file (0 if nothing).
    pub(super) fn take_ahead(&self, file: &Arc<FileHandle>) -> u64 {
        match &*self.ahead.lock() {
            Some((f, to)) if Arc::ptr_eq(f, file) => *to,
            _ => 0,
        }
    }

    /// On the background thread (or a checkpoint's, see [`Inner::allocate_for`]):
    /// allocates `[from, to)` of `file` in pieces, publishing each in `ahead`, and
    /// prefaults as asked in between. Stops at the first failure (the writer then
    /// allocates itself and reports the error).
    pub(super) fn allocate_ahead(&self, file: &Arc<FileHandle>, from: u64, to: u64) {
        let mut at = from;
        while at < to {
            let piece = (to - at).min(ALLOCATE_PIECE);
            let allocated = {
                let _gate = self.space_gate.lock();
                file.allocate(at, piece)
            };
            if allocated.is_err() {
                return;
            }
            at += piece;
            let old = {
                let mut ahead = self.ahead.lock();
                // Two allocators (the background thread, a checkpoint before a growth)
                // may run at once: the furthest end of either stands.
                let to = match &*ahead {
                    Some((f, to)) if Arc::ptr_eq(f, file) => at.max(*to),
                    _ => at,
                };
                ahead.replace((Arc::clone(file), to))
            };
            // A handle of a file that compaction replaced may be the last one: closing
            // it frees the file's blocks, which must not happen under the lock.
            drop(old);
            self.prefault_asked();
            self.spare_asked();
        }
    }

    /// Keeps a window of real zeros ahead of the tail (`pwrite` of zeros, write-back
    /// started at once). `posix_fallocate` leaves *unwritten* extents: the first append
    /// into each of their blocks makes the next sync also write extent metadata, which
    /// measured p99 `Always` latency at 2.5x p50 instead of 1.6x. Best effort.
    ///
    /// The window is topped up in small steps as the tail moves (a whole window only
    /// when growth opens new space), so few syncs carry zeros, and little of them.
    /// (Topped up a megabyte at a time, the megabyte's write-back delayed the device
    /// flush of the sync after it: every ~80th batch of 100 durable puts took 2 ms
    /// instead of 0.2; in steps of a page, every sync carried zeros and the median batch
    /// took 40% longer.)
    pub(super) fn zero_ahead(w: &mut Writer, need: u64) {
        let from = w.zeroed.max(page_up(need));
        let to = crate::format::page_down((need + ZERO_AHEAD).min(w.alloc));
        if to <= from || (to - from < ZERO_STEP && to < w.alloc) {
            return;
        }
        let zeros = vec![0u8; (to - from) as usize];
        if w.file.write_at(&zeros, from).is_ok() {
            let _ = w.file.start_writeback(from, to - from);
            w.zeroed = to;
        }
    }
}
