//! The two checkpoint slots: writing them in turn, and what a slot records.

use super::inner::{Inner, Slots, Writer};
use crate::error::Result;
use crate::format::{checkpoint_off, encode_checkpoint, CheckpointInfo};
use crate::map::FileHandle;
use crate::state::IndexGeom;

impl Inner {
    /// Writes `c` into the slot after `slots.last` (they alternate). Not synced.
    pub(super) fn write_slot(
        &self,
        slots: &mut Slots,
        file: &FileHandle,
        mut c: CheckpointInfo,
    ) -> Result<()> {
        c.seq = slots.last.seq + 1;
        if c.state != crate::format::STATE_CHECKPOINTING {
            c.redo = None;
        }
        let bytes = encode_checkpoint(self.seed, &c);
        let slot = (c.seq % 2) as usize;
        // The space gate before the index gate, as for bucket writes (see
        // `Inner::space_gate`).
        let gate = self.space_gate.lock();
        let written = self.change_index(|| file.write_at(&bytes, checkpoint_off(slot)));
        drop(gate);
        if let Err(e) = written {
            return self.poison(e);
        }
        slots.last = c;
        self.checkpoint_end
            .store(c.log_end, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// [`Inner::write_slot`] for a caller that does not hold the slots.
    pub(super) fn write_checkpoint(&self, w: &Writer, c: CheckpointInfo) -> Result<()> {
        self.write_slot(&mut self.slots.lock(), &w.file, c)
    }

    pub(super) fn counters_ckpt(&self, fin: u32, geom: IndexGeom, log_end: u64) -> CheckpointInfo {
        let st = self.state.read();
        CheckpointInfo {
            seq: 0,
            state: fin,
            index_style: geom.style,
            index_off: geom.off,
            index_buckets: geom.buckets,
            log_end,
            live_keys: st.counters.live_keys,
            live_bytes: st.counters.live_bytes,
            log_bytes: st.counters.log_bytes,
            dead_index_bytes: st.counters.dead_index_bytes,
            redo: None,
        }
    }
}
