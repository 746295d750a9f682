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

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::inner::{Inner, Writer};
use crate::error::{Error, Result};
use crate::format::LIVE_COMMITTED_OFF;
use crate::format::{encode_record, record_len, RecordRef, FLAG_BATCH_MORE, STATE_DIRTY};
use crate::index::key_hash;
use crate::observe::SyncEvent;
use crate::options::Durability;

/// Checkpoint when the delta holds `Options::checkpoint_keys` keys, or when this many log bytes were appended since the last checkpoint (bounds the
/// replay after a crash).
pub(super) const REPLAY_MAX: u64 = 256 << 20;

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
        self.check_writable()?;
        if ops.is_empty() {
            return Ok(Some(0));
        }
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
        let pwrite = matches!(self.opts.durability, Durability::Always | Durability::Async);
        let mut w = self.writer.lock();
        if w.job.as_ref().is_some_and(|j| j.thread.is_finished()) {
            // A failed repair is retried by a later checkpoint; this write goes on.
            if let Err(e) = self.finish_job(&mut w) {
                if self.poisoned.load(Ordering::Acquire) {
                    return Err(e);
                }
                w.backoff();
            }
        }
        if self.poisoned.load(Ordering::Acquire) {
            return Err(Error::Poisoned);
        }
        let hash0 = key_hash(self.seed, ops[0].1);
        if only_if_present {
            let st = self.state.read();
            if st.find_live(hash0, ops[0].1)?.is_none() {
                return Ok(None);
            }
        }
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
        // Auto-compaction reads the counters after every write: keep them exact, unless
        // a checkpoint is settling them right now (it holds `resolving` for its run).
        let resolving = self
            .opts
            .auto_compact
            .and_then(|_| self.resolving.try_lock());
        let delta_len = {
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
            w.delta_hint = st.delta.slot_hint();
            if resolving.is_some() {
                st.resolve(usize::MAX);
            }
            st.writes += 1;
            self.published_writes.store(st.writes, Ordering::Release);
            st.delta.len()
        };
        drop(resolving);
        w.end = end;
        w.writes += 1;
        let since = end - w.ckpt_end;
        let gen = self.file_gen.load(Ordering::Acquire);
        let due = delta_len >= self.opts.checkpoint_keys || since >= REPLAY_MAX;
        if due && w.writes >= w.retry_at {
            // The write itself is applied. A checkpoint that fails without poisoning the
            // store (a full disk while growing the index) is retried by a later write; one
            // that poisoned it (a failed sync) must not let this write be acknowledged.
            match self.start_checkpoint(&mut w) {
                Ok(()) => w.retry_gap = 0,
                Err(e) if self.poisoned.load(Ordering::Acquire) => return Err(e),
                Err(_) => w.backoff(),
            }
        }
        if !pwrite {
            self.tail_work(&mut w);
        }
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
            Durability::None | Durability::Periodic(_) => {}
        }
        if let Some(ac) = self.opts.auto_compact {
            let c = self.state.read().counters;
            let dead = c.log_bytes.saturating_sub(c.live_bytes) + c.dead_index_bytes;
            if c.log_bytes >= ac.min_log_bytes && dead as f64 > ac.dead_ratio * c.log_bytes as f64 {
                // The write is applied (and durable as its policy promised): a failed
                // compaction must not make it look failed. A failure that matters
                // poisoned the store, and the next write reports it.
                let _ = super::compact::compact(self);
            }
        }
        Ok(Some(end))
    }
}
