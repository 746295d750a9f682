//! Index growth and rebuild: claiming a new region behind a JUMP, building it, and
//! rebuilding the index from the whole log when the buckets cannot be trusted.

use std::sync::Arc;

use super::buckets::ApplyError;
use std::sync::atomic::Ordering;

use super::inner::{Inner, Writer};
use crate::error::{Error, Result};
use crate::format::INDEX_SEALED;
use crate::format::{encode_record, page_up, JUMP_LEN, KIND_JUMP, PAGE, SLOTS_PER_BUCKET};
use crate::index::key_hash;
use crate::state::{IndexGeom, Resolved, State};

/// ... to a size where it is at most this full.
pub(super) const GROW_LOAD: f64 = 0.40;

/// Buckets for an index holding `keys` keys at `GROW_LOAD`.
pub(super) fn buckets_for(keys: u64) -> u64 {
    let want = (keys as f64 / (SLOTS_PER_BUCKET as f64 * GROW_LOAD)).ceil() as u64;
    want.clamp(1, crate::format::MAX_BUCKETS)
        .next_power_of_two()
}

/// True if the index region `old` is real space in the log before `jump_at` (a rebuild
/// after a damaged checkpoint may have no region), so it becomes dead when replaced.
pub(super) fn region_is_real(old: IndexGeom, jump_at: u64) -> bool {
    old.off >= PAGE
        && old
            .buckets
            .checked_mul(PAGE)
            .and_then(|b| b.checked_add(old.off))
            .is_some_and(|e| e <= jump_at)
}

impl Inner {
    /// Old index regions of `bytes` that will not be released after all (see
    /// `released_index_bytes`).
    pub(super) fn unrelease(&self, bytes: u64) {
        let _ = self
            .released_index_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                Some(r.saturating_sub(bytes))
            });
    }

    /// After a failed growth: the region `claimed` (from `claim_region`) is dead space,
    /// and the region `old` stays current.
    pub(super) fn forget_claim(&self, old: IndexGeom, claimed: (IndexGeom, bool)) {
        let (new, old_real) = claimed;
        let mut st = self.state.write();
        let c = &mut st.counters;
        if old_real {
            c.dead_index_bytes = c.dead_index_bytes.saturating_sub(old.bytes());
            self.unrelease(old.bytes());
        }
        c.dead_index_bytes += new.bytes();
    }

    /// Claims a new index region of `buckets` buckets after a JUMP record at the tail
    /// (growth). The region reads as zeros until a checkpoint writes it; the writer
    /// appends after it. Returns the region, and whether the old one is real space that
    /// now counts as dead.
    pub(super) fn claim_region(&self, w: &mut Writer, buckets: u64) -> Result<(IndexGeom, bool)> {
        let jump_at = w.end;
        let new = IndexGeom {
            off: page_up(jump_at + JUMP_LEN),
            buckets,
            style: INDEX_SEALED,
        };
        let new_log = new.off + new.bytes();
        #[cfg(test)]
        {
            self.regions_claimed.fetch_add(1, Ordering::Relaxed);
            if self.take_ahead(&w.file).max(w.alloc) < new_log + PAGE {
                self.regions_unallocated.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.ensure_space(w, new_log + PAGE)?;
        // The checkpoint that builds the region writes every bucket of it (sealed style),
        // so stale bytes of an earlier session there are overwritten before anything
        // refers to the region.
        let mut jump = Vec::with_capacity(JUMP_LEN as usize);
        encode_record(
            &mut jump,
            self.seed,
            jump_at,
            KIND_JUMP,
            0,
            b"",
            &new_log.to_le_bytes(),
            self.durable_hint.load(Ordering::Acquire),
        );
        if let Err(e) = w.file.write_at(&jump, jump_at) {
            return self.poison(e);
        }
        let old = self.state.read().index;
        let old_real = region_is_real(old, jump_at);
        {
            let mut st = self.state.write();
            w.tail.publish(new_log);
            if !matches!(self.opts.durability, crate::options::Durability::Always) {
                st.live.store(crate::format::LIVE_COMMITTED_OFF, new_log);
            }
            st.counters.log_bytes += JUMP_LEN;
            if old_real {
                st.counters.dead_index_bytes += old.bytes();
                // Punched once no checkpoint slot refers to it.
                self.released_index_bytes
                    .fetch_add(old.bytes(), Ordering::Relaxed);
            }
        }
        // A replay from the last checkpoint's end jumps over the region.
        w.claimed_since_ckpt += new_log - (jump_at + JUMP_LEN);
        w.end = new_log;
        w.prefaulted = 0;
        Ok((new, old_real))
    }

    /// Replays the whole log into a fresh delta (the index in the file is not trusted)
    /// and writes a new index region from it. Readers wait during the scan.
    pub(super) fn rebuild_index(&self, w: &mut Writer, fin: u32) -> Result<()> {
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
                live: Arc::clone(&st.live),
                shared: st.shared,
                seen: st.seen,
                gen: Arc::clone(&st.gen),
                checked: crate::state::BucketChecks::default(),
                filter: None,
                filter_tried: true,
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
        self.rebuilds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

    /// Writes a rebuilt index (held in the delta alone, `delta_only`) into a new region of
    /// `buckets` buckets after a JUMP at the tail, and switches to it.
    pub(super) fn grow_index(&self, w: &mut Writer, mut buckets: u64, fin: u32) -> Result<()> {
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

    pub(super) fn try_grow(
        &self,
        w: &mut Writer,
        buckets: u64,
        fin: u32,
    ) -> Result<(), ApplyError> {
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
            st.set_index(new);
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
