//! Syncs and group commit: how a write becomes durable under each policy.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::inner::Inner;
use crate::error::{Error, Result};
use crate::format::LIVE_COMMITTED_OFF;
use crate::map::FileHandle;
use crate::observe::SyncEvent;

/// Under `Async`, a background `fdatasync` at least this often bounds the window at risk
/// (write-back alone never flushes the device cache nor persists size changes).
pub(crate) const ASYNC_BOUND: std::time::Duration = std::time::Duration::from_secs(1);
/// Writers waiting for a sync yield (rather than sleep) if syncs take at most this long.
pub(super) const SPIN_MAX: std::time::Duration = std::time::Duration::from_micros(200);
/// Longest a group-commit leader waits for the other writers before syncing.
pub(super) const GROUP_WAIT_MAX: std::time::Duration = std::time::Duration::from_micros(500);

impl Inner {
    /// Waits for any sync in flight, then keeps new ones from starting (compaction's file
    /// switch). Must be paired with [`Inner::resume_syncs`].
    pub(crate) fn pause_syncs(&self) {
        let mut s = self.sync.lock();
        while s.syncing || s.paused {
            self.sync_cv.wait(&mut s);
        }
        s.paused = true;
    }

    pub(crate) fn resume_syncs(&self) {
        let mut s = self.sync.lock();
        s.paused = false;
        self.syncs_done.fetch_add(1, Ordering::Release);
        self.sync_cv.notify_all();
        for t in s.waiters.drain(..) {
            t.unpark();
        }
    }

    /// The file generation and the published end of the log in it.
    pub(super) fn published_end(&self) -> (u64, u64) {
        let st = self.state.read();
        (self.file_gen.load(Ordering::Acquire), st.map.published())
    }

    /// `fdatasync` of the whole file (checkpoints). Everything published before the call
    /// is durable afterwards.
    pub(crate) fn sync_file(&self, file: &FileHandle) -> Result<()> {
        // The published end, then the growth epoch: a growth bumps the epoch before it
        // publishes anything in the new space, so this epoch covers `end`.
        let (end, writes, live, map, gen) = {
            let st = self.state.read();
            (
                st.map.published(),
                st.writes,
                Arc::clone(&st.live),
                Arc::clone(&st.map),
                self.file_gen.load(Ordering::Acquire),
            )
        };
        let epoch = self.size_epoch.load(Ordering::Acquire);
        self.release_behind(&map, gen, end);
        if let Err(e) = file.sync_data() {
            return self.poison(e);
        }
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.notify(SyncEvent::File);
        let mut s = self.sync.lock();
        // Durable, hence committed under every policy: readers in other processes may
        // see it (under `Always` this is what publishes writes to them). Raised before
        // `durable_end` moves, under the sync mutex: a writer that finds its write
        // covered by `durable_end` acknowledges it without a sync of its own, and a
        // reader must already see it then (raised after the mutex, a writer preempted
        // here let acknowledged `Always` writes stay invisible to readers).
        live.raise(LIVE_COMMITTED_OFF, end);
        live.raise_durable(self.seed, end);
        if end > s.durable_end {
            self.bytes_synced
                .fetch_add(end - s.durable_end, Ordering::Relaxed);
            s.durable_end = end;
            self.durable_hint.store(end, Ordering::Release);
        }
        s.durable_writes = s.durable_writes.max(writes);
        s.size_epoch = s.size_epoch.max(epoch);
        #[cfg(test)]
        super::tests::durable_recorded(&live, s.durable_end);
        drop(s);
        Ok(())
    }

    /// Makes every byte of the log below `end` durable, sharing syncs between concurrent
    /// callers (group commit). Skips the sync entirely if nothing is dirty.
    /// `gen` is the file generation `end` belongs to (see `file_gen`).
    pub(super) fn sync_to(&self, gen: u64, end: u64) -> Result<()> {
        let mut s = self.sync.lock();
        loop {
            if self.poisoned.load(Ordering::Acquire) {
                return Err(Error::Poisoned);
            }
            if gen != self.file_gen.load(Ordering::Acquire) {
                return Ok(());
            }
            if s.durable_end >= end && s.size_epoch == self.size_epoch.load(Ordering::Acquire) {
                return Ok(());
            }
            if s.paused || s.syncing {
                let seen = self.syncs_done.load(Ordering::Acquire);
                if !s.paused && s.last_sync <= SPIN_MAX {
                    // A fast sync: yield for about its length before sleeping (as RocksDB's
                    // write thread does). Waking a parked thread costs a context switch
                    // that, with 4 writers on 2 cores, added a fifth to every fast sync.
                    let deadline = std::time::Instant::now() + s.last_sync;
                    drop(s);
                    while self.syncs_done.load(Ordering::Acquire) == seen
                        && std::time::Instant::now() < deadline
                    {
                        std::thread::yield_now();
                    }
                    s = self.sync.lock();
                }
                if self.syncs_done.load(Ordering::Acquire) == seen {
                    // Spurious wake-ups are fine: the state is checked again under the lock.
                    s.waiters.push(std::thread::current());
                    drop(s);
                    std::thread::park();
                    s = self.sync.lock();
                }
                continue;
            }
            // Lead a sync. (Letting a second sync start while one runs was measured:
            // the device does take concurrent flushes, but each then covered fewer writes,
            // 1.6 instead of 3.9 with 4 writers, for 25% fewer writes/s.)
            s.syncing = true;
            let from = s.durable_end;
            let synced_epoch = s.size_epoch;
            let (hint, durable_writes) = (s.batch_hint, s.durable_writes);
            let budget = (s.last_sync / 2).min(GROUP_WAIT_MAX);
            drop(s);
            if hint > 1 {
                // Group commit: the writers that shared the last sync are about to come
                // back (they were just woken). Starting the sync before they append would
                // cover only some of them and leave the rest for another full sync. Wait
                // for them, at most half a sync.
                let deadline = std::time::Instant::now() + budget;
                while self
                    .published_writes
                    .load(Ordering::Acquire)
                    .saturating_sub(durable_writes)
                    < hint
                    && std::time::Instant::now() < deadline
                {
                    std::thread::yield_now();
                }
            }
            let started = std::time::Instant::now();
            // Everything published now is covered by this sync. A growth bumps the epoch
            // before publishing anything in the new space, so `epoch` covers `target`.
            let (map, file, live, target, writes, epoch, sampled_gen) = {
                let st = self.state.read();
                let epoch = self.size_epoch.load(Ordering::Acquire);
                (
                    Arc::clone(&st.map),
                    Arc::clone(&st.file),
                    Arc::clone(&st.live),
                    st.map.published(),
                    st.writes,
                    epoch,
                    self.file_gen.load(Ordering::Acquire),
                )
            };
            self.release_behind(&map, sampled_gen, target);
            let r = if epoch != synced_epoch {
                file.sync_data().map(|()| SyncEvent::File)
            } else {
                let start = crate::format::page_down(from.min(target));
                map.sync_range(start, target - start)
                    .map(|()| SyncEvent::Range { start, end: target })
            };
            s = self.sync.lock();
            s.syncing = false;
            s.last_sync = started.elapsed();
            self.syncs_done.fetch_add(1, Ordering::Release);
            self.sync_cv.notify_all();
            for t in s.waiters.drain(..) {
                t.unpark();
            }
            if sampled_gen != self.file_gen.load(Ordering::Acquire) {
                // Compaction switched files meanwhile; this sync's offsets are stale.
                continue;
            }
            match r {
                Ok(ev) => {
                    let batch = writes.saturating_sub(s.durable_writes);
                    s.batch_hint = batch.max(s.batch_hint.saturating_sub(1));
                    self.syncs.fetch_add(1, Ordering::Relaxed);
                    self.notify(ev);
                    if target > s.durable_end {
                        self.bytes_synced
                            .fetch_add(target - s.durable_end, Ordering::Relaxed);
                        // Committed first (see `sync_file`).
                        live.raise(LIVE_COMMITTED_OFF, target);
                        live.raise_durable(self.seed, target);
                        s.durable_end = target;
                        self.durable_hint.store(target, Ordering::Release);
                    }
                    #[cfg(test)]
                    super::tests::durable_recorded(&live, s.durable_end);
                    s.durable_writes = s.durable_writes.max(writes);
                    if matches!(ev, SyncEvent::File) {
                        s.size_epoch = s.size_epoch.max(epoch);
                    }
                }
                Err(e) => {
                    self.poisoned.store(true, Ordering::Release);
                    return Err(e);
                }
            }
        }
    }
}
