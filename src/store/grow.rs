//! File growth: allocation ahead of the log tail, remapping past the reservation.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::inner::{Inner, Writer};
use crate::error::Result;
use crate::format::page_up;
use crate::map::Mapping;

/// Window of real zeros kept ahead of the tail under `Always`/`Async`.
pub(super) const ZERO_AHEAD: u64 = 1 << 20;

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

impl Inner {
    /// Makes sure `[0, need)` is allocated (and mapped), growing the file geometrically.
    pub(super) fn ensure_space(&self, w: &mut Writer, need: u64) -> Result<()> {
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
            let old = {
                let mut st = self.state.write();
                st.gen.remapped(&map);
                std::mem::replace(&mut st.map, map)
            };
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
    pub(super) fn zero_ahead(w: &mut Writer, need: u64) {
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
}
