//! [`Store`]: the public handle, the write path, group commit and checkpoints.
//!
//!
//! The store is split by concern; each file owns one part of the protocol:
//!
//! - `inner`: the state shared by the handle and its threads.
//! - `open`: recovery (open a file, replay its log, assemble the store).
//! - `commit`: the write path (commit protocol).
//! - `sync`: group commit and durability.
//! - `grow`: file growth.
//! - `background`: prefault, write-back and periodic syncs off the write path.
//! - `slots`, `buckets`, `checkpoint`, `reindex`, `counters`: checkpoints and the index.
//! - `compact`, `iter`, `verify`: maintenance and whole-store reads.

mod background;
mod buckets;
mod changes;
mod checkpoint;
mod commit;
mod compact;
mod counters;
mod follow;
mod grow;
mod inner;
mod iter;
mod open;
mod reindex;
mod slots;
mod sync;
#[cfg(test)]
mod tests;
mod verify;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

use crate::batch::{Batch, Op};
use crate::error::{Error, Result};
use crate::format::{
    KIND_DELETE, KIND_PUT, LIVE_COMMITTED_OFF, LIVE_DURABLE_OFF, LIVE_INDEX_SEQ_OFF,
    LIVE_SESSION_OFF, PAGE, STATE_CLEAN,
};
use crate::options::{Durability, Options};
use crate::stats::Stats;

use background::background;
pub use changes::{Change, Follower};
pub(crate) use inner::Inner;
pub use iter::Iter;
use sync::ASYNC_BOUND;
pub use verify::VerifyReport;

/// An open mapkv store. `Send + Sync`: share it between threads with `Arc`.
///
/// Readers run concurrently with each other and with the writer; writers are serialized.
/// Dropping the store closes it cleanly (checkpoint + sync); use [`Store::close`] to see
/// errors from that.
///
/// Changing the file from outside mapkv while it is open (another program writing or
/// truncating it) is unsupported: the store locks the file against other mapkv handles,
/// and checks every byte it reads, but a file truncated under a live mapping makes the
/// next access to the lost pages raise `SIGBUS`.
#[derive(Debug)]
pub struct Store {
    inner: Arc<Inner>,
    /// The background thread (see `background`), started by the first write so that
    /// opening a store stays O(1) and read-only use never pays for a thread.
    background: Mutex<Option<JoinHandle<()>>>,
    background_started: AtomicBool,
}

impl Store {
    /// Opens the store at `path`, creating it if it does not exist (unless read-only).
    ///
    /// Opening a cleanly closed store costs O(1) whatever its size: the index lives in the
    /// file. After a crash, only the writes after the last checkpoint are replayed.
    ///
    /// # Errors
    /// [`Error::Locked`] if another handle has the store open for writing,
    /// [`Error::NotAStore`], [`Error::Version`] or [`Error::Corrupt`] for a file that is
    /// not a usable store, [`Error::Io`] for system errors. Never panics on file content.
    pub fn open(path: impl AsRef<Path>, options: Options) -> Result<Store> {
        let inner = Arc::new(open::open(path.as_ref(), options)?);
        Ok(Store {
            inner,
            background: Mutex::new(None),
            background_started: AtomicBool::new(false),
        })
    }

    /// Starts the background thread if this store needs one and it is not running:
    /// periodic syncs (`Periodic`, `Async`) and the tail work of the memcpy write path
    /// (`None`, `Periodic`).
    fn start_background(&self) -> Result<()> {
        if self.background_started.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut slot = self.background.lock();
        let interval = match self.inner.opts.durability {
            Durability::Periodic(every) => Some(every),
            Durability::Async => Some(ASYNC_BOUND),
            Durability::None | Durability::Always => None,
        };
        let needed = !matches!(self.inner.opts.durability, Durability::Always);
        if slot.is_none() && needed && !self.inner.opts.read_only {
            let inner = Arc::clone(&self.inner);
            *slot = Some(
                std::thread::Builder::new()
                    .name("mapkv-background".into())
                    .spawn(move || background(&inner, interval))
                    .map_err(|e| Error::io("spawn background thread", e))?,
            );
        }
        self.background_started.store(true, Ordering::Release);
        Ok(())
    }

    /// Sets `key` to `value` (an empty value is a value, not a delete).
    ///
    /// # Errors
    /// [`Error::KeyTooLarge`]/[`Error::ValueTooLarge`], [`Error::ReadOnly`], an I/O error
    /// (a full disk while growing the file is one; nothing is lost; so is a failure to
    /// start the store's background thread at its first write), [`Error::Poisoned`].
    pub fn put(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<()> {
        self.start_background()?;
        self.inner
            .write_ops(&[(KIND_PUT, key.as_ref(), value.as_ref())], false)
            .map(drop)
    }

    /// Removes `key`; returns whether it existed.
    ///
    /// # Errors
    /// As for [`Store::put`].
    pub fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        self.start_background()?;
        let out = self
            .inner
            .write_ops(&[(KIND_DELETE, key.as_ref(), b"")], true)?;
        Ok(out.is_some())
    }

    /// Applies every operation of `batch` atomically, in order: after any crash the store
    /// holds all of them or none. An empty batch is a no-op.
    ///
    /// # Errors
    /// As for [`Store::put`]; a rejected batch changes nothing.
    pub fn write(&self, batch: &Batch) -> Result<()> {
        self.start_background()?;
        let ops: Vec<(u8, &[u8], &[u8])> = batch
            .ops
            .iter()
            .map(|op| match op {
                Op::Put(k, v) => (KIND_PUT, k.as_slice(), v.as_slice()),
                Op::Delete(k) => (KIND_DELETE, k.as_slice(), &b""[..]),
            })
            .collect();
        self.inner.write_ops(&ops, false).map(drop)
    }

    /// Returns a copy of the value of `key`.
    ///
    /// # Errors
    /// [`Error::Corrupt`] if the record found fails its checksum.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Vec<u8>>> {
        self.get_with(key, <[u8]>::to_vec)
    }

    /// Calls `f` with the value of `key`, borrowed straight from the mapping (no copy),
    /// and returns its result. Writers that need the index wait while `f` runs; keep it
    /// short, and do not call this store from inside `f` (the store's lock is fair: a
    /// nested read waits behind a queued writer, which waits for `f`: a deadlock).
    ///
    /// # Errors
    /// As for [`Store::get`].
    pub fn get_with<R>(
        &self,
        key: impl AsRef<[u8]>,
        f: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>> {
        let (st, found) = self.inner.find_live_fresh(key.as_ref())?;
        match found {
            Some(rec) => Ok(Some(f(st.value_of(&rec)?))),
            None => Ok(None),
        }
    }

    /// True if `key` has a value.
    ///
    /// # Errors
    /// As for [`Store::get`].
    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        Ok(self.inner.find_live_fresh(key.as_ref())?.1.is_some())
    }

    /// Makes everything written before the call durable. Costs nothing if nothing changed
    /// since the last sync (a sync of a clean file still costs a device flush).
    ///
    /// # Errors
    /// The sync's I/O error; after one the store is poisoned.
    pub fn flush(&self) -> Result<()> {
        if self.inner.opts.read_only {
            return Ok(());
        }
        let (gen, end) = self.inner.published_end();
        self.inner.sync_to(gen, end)
    }

    /// Number of live keys, exact.
    ///
    /// Cost: the write path does not look keys up in the index, so after writes of keys
    /// the index may already hold, the first `len` (or [`Store::stats`]) finishes those
    /// lookups, in bucket order: at most one per key written since the last checkpoint or
    /// counter read. Otherwise O(1). A call during a checkpoint waits for it.
    #[must_use]
    pub fn len(&self) -> usize {
        // A reader first catches up with its writer (an error leaves the view as it was).
        if let Ok(view) = self.inner.view() {
            drop(view);
        }
        usize::try_from(self.inner.resolve_counters().live_keys).unwrap_or(usize::MAX)
    }

    /// True if the store holds no key.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Iterates over every live pair, each exactly once, as of the moment of the call
    /// (a snapshot: later writes are not seen). Pairs come in log order.
    #[must_use]
    pub fn iter(&self) -> Iter {
        match self.inner.with_stable_index(|st| Ok(Iter::new(st))) {
            Ok(it) => it,
            Err(e) => Iter::failed(&self.inner.state.read(), e),
        }
    }

    /// Writes a consistent copy of the store's committed state to a new store file at
    /// `path`, while writes go on: the copy holds exactly the writes committed before
    /// the call, verifies clean, and opens on its own. It is compacted (only live
    /// records, a right-sized index) and a real copy (its own blocks, written record by
    /// record, never a reflink). Works in a reader too.
    ///
    /// Cost to the writer: the state lock is held (shared) while the live records are
    /// listed from the index, as [`Store::iter`] does; the copying reads a mapping that
    /// stays valid whatever the writer does, and takes no lock.
    ///
    /// Atomic: the copy is built under a temporary name next to `path`, synced, then
    /// linked to `path`; after a crash `path` is either absent or complete.
    ///
    /// # Errors
    /// An I/O error if `path` exists (a backup never overwrites anything), or on a full
    /// disk (the partial copy is removed); [`Error::Corrupt`] if a live record fails its
    /// checksum (the damage is reported, not copied).
    pub fn backup(&self, path: impl AsRef<Path>) -> Result<()> {
        compact::backup(&self.inner, path.as_ref())
    }

    /// A snapshot of the live pairs and a [`Follower`] of every change committed after
    /// it: together, the store's state and then its history, with no change missed or
    /// repeated between the two (`mapkv scan --follow` prints them). The snapshot is
    /// the [`Store::iter`] of the same moment.
    ///
    /// # Errors
    /// As for [`Store::get`] (a reader catching up with its writer).
    pub fn follow(&self) -> Result<(Iter, Follower)> {
        self.inner.with_stable_index(|st| {
            let it = Iter::new(st);
            let f = Follower::new(
                Arc::clone(&self.inner),
                Arc::clone(&st.gen),
                st.map.published(),
            );
            Ok((it, f))
        })
    }

    /// A [`Follower`] of the changes committed from now on.
    ///
    /// # Errors
    /// As for [`Store::follow`].
    pub fn changes(&self) -> Result<Follower> {
        let st = self.inner.view()?;
        Ok(Follower::new(
            Arc::clone(&self.inner),
            Arc::clone(&st.gen),
            st.map.published(),
        ))
    }

    /// Rewrites the live records into a fresh file and switches to it atomically,
    /// reclaiming the space of overwritten and deleted records and of old index regions.
    ///
    /// # Errors
    /// I/O errors; the store is unchanged if compaction fails.
    pub fn compact(&self) -> Result<()> {
        compact::compact(&self.inner)
    }

    /// Checks every record checksum in the log and every index entry against the log.
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming the first damage found.
    pub fn verify(&self) -> Result<VerifyReport> {
        loop {
            let seq = self.inner.view()?.seen.index_seq;
            let r = verify::verify(&self.inner);
            // In a reader, damage seen while the writer rewrote the index may be the
            // rewrite itself: check again on the new index.
            let st = self.inner.state.read();
            if r.is_ok() || !st.shared || st.live.load(LIVE_INDEX_SEQ_OFF) == seq {
                return r;
            }
        }
    }

    /// Counters and sizes; see [`Stats`]. The key and byte counters are exact, at the
    /// cost described in [`Store::len`].
    #[must_use]
    pub fn stats(&self) -> Stats {
        let inner = &*self.inner;
        let (alloc, end) = if inner.opts.read_only {
            let st = inner.state.read();
            (st.file.len().unwrap_or(0), st.map.published())
        } else {
            let w = inner.writer.lock();
            (w.alloc, w.end)
        };
        if let Ok(view) = inner.view() {
            drop(view);
        }
        let c = inner.resolve_counters();
        let (durable_end, durable_writes) = {
            let s = inner.sync.lock();
            (s.durable_end, s.durable_writes)
        };
        let st = inner.state.read();
        let resident = st.map.resident_pages(alloc);
        let committed = st.live.load(LIVE_COMMITTED_OFF);
        let view_end = if st.shared { st.map.published() } else { end };
        let live = crate::stats::LiveStats {
            reader: st.shared,
            view_end,
            committed_end: committed,
            behind_bytes: committed.saturating_sub(view_end),
            durable_end: st.live.load(LIVE_DURABLE_OFF),
            writer_alive: !st.shared || st.file.writer_alive(),
            writer_sessions: st.live.load(LIVE_SESSION_OFF),
        };
        Stats {
            live_keys: c.live_keys,
            live_bytes: c.live_bytes,
            dead_bytes: c.log_bytes.saturating_sub(c.live_bytes),
            log_bytes: c.log_bytes,
            index_bytes: st.index.bytes(),
            dead_index_bytes: c.dead_index_bytes,
            file_size: alloc,
            log_end: end,
            mapped_bytes: st.map.reserved(),
            resident_pages: resident,
            resident_bytes: resident * PAGE,
            space_amplification: if c.live_bytes == 0 {
                1.0
            } else {
                alloc as f64 / c.live_bytes as f64
            },
            writes: st.writes,
            syncs: inner.syncs.load(Ordering::Relaxed),
            bytes_synced: inner.bytes_synced.load(Ordering::Relaxed),
            checkpoints: inner.checkpoints.load(Ordering::Relaxed),
            bytes_at_risk: if inner.opts.read_only {
                0
            } else {
                end.saturating_sub(durable_end)
            },
            writes_at_risk: if inner.opts.read_only {
                0
            } else {
                st.writes.saturating_sub(durable_writes)
            },
            delta_entries: (st.delta.len() + st.frozen.as_ref().map_or(0, |f| f.delta.len()))
                as u64,
            delta_heap_bytes: (st.delta.heap_bytes()
                + st.frozen.as_ref().map_or(0, |f| f.delta.heap_bytes()))
                as u64,
            durability: inner.opts.durability,
            populated: inner.opts.populate,
            recovery: inner.recovery.lock().clone(),
            live,
        }
    }

    /// The path the store was opened with.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Closes the store cleanly (checkpoint, sync, mark clean) and reports errors, which
    /// dropping the store cannot.
    ///
    /// # Errors
    /// The I/O error of the final checkpoint; the store then recovers at the next open.
    pub fn close(mut self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<()> {
        if let Some(t) = self.background.get_mut().take() {
            self.inner.background.lock().stop = true;
            self.inner.background_cv.notify_all();
            let _ = t.join();
        }
        let inner = &*self.inner;
        if inner.opts.read_only {
            return Ok(());
        }
        let mut w = inner.writer.lock();
        // Always joined, even on a poisoned store: the thread holds the store open.
        let finished = inner.finish_job(&mut w);
        if inner.poisoned.load(Ordering::Acquire) {
            // Nothing can be marked clean; the next open recovers.
            return Err(Error::Poisoned);
        }
        finished?;
        let last = inner.slots.lock().last;
        let changed = w.dirty_marked || last.state != STATE_CLEAN || w.end != last.log_end;
        if changed {
            inner.checkpoint(&mut w, STATE_CLEAN)?;
            w.dirty_marked = false;
        }
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}
