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
//! - `filter`: the in-memory key filter over the buckets, built and kept right.
//! - `compact`, `iter`, `verify`: maintenance and whole-store reads.
//! - `many`: batched lookups, made in file order.

mod background;
mod buckets;
mod changes;
mod checkpoint;
mod commit;
mod compact;
mod counters;
mod filter;
mod follow;
mod grow;
mod handoff;
mod inner;
mod iter;
mod many;
mod open;
mod reindex;
mod slots;
mod sync;
#[cfg(test)]
mod tests;
mod threads;
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
use crate::state::Counters;
use crate::stats::Stats;

use background::background;
pub use changes::{Change, Follower};
pub(crate) use inner::Inner;
pub use iter::Iter;
use sync::ASYNC_BOUND;
pub use verify::VerifyReport;

/// Longest [`Store::stats`] waits for a running background checkpoint to end.
const STATS_CHECKPOINT_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

/// An open mapkv store. `Send + Sync`: share it between threads with `Arc`.
///
/// Readers run concurrently with each other and with the writer; writers are serialized,
/// which makes [`Store::compare_and_swap`] and [`Store::update`] (atomic read-modify-write)
/// cheap.
///
/// Dropping the store closes it cleanly (checkpoint + sync) but cannot report an error;
/// [`Store::close`] does. A store shared as `Arc<Store>` is closed, with its error, by
/// [`Store::close_shared`]; every later call through any clone then fails with
/// [`Error::Closed`].
///
/// Errors about the file name it ([`Error::path`]).
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
    /// Opens the store at `path`. A writer creates it if the file does not exist or is
    /// empty, unless [`Options::create(false)`](Options::create); a reader
    /// ([`Options::read_only(true)`](Options::read_only)) never creates anything.
    ///
    /// Opening a cleanly closed store costs O(1) whatever its size: the index lives in the
    /// file. After a crash, only the writes after the last checkpoint are replayed.
    ///
    /// # Errors
    /// Every error names `path` ([`Error::path`]).
    /// [`Error::NotFound`] if there is no file and none may be created;
    /// [`Error::Locked`] if another handle has the store open for writing;
    /// [`Error::NotAStore`], [`Error::Version`] or [`Error::Corrupt`] for a file that is
    /// not a usable store (a file that is not a store is never changed);
    /// [`Error::Io`] for system errors (a directory at `path` is one, with
    /// [`io::ErrorKind::IsADirectory`](std::io::ErrorKind::IsADirectory)). Never panics
    /// on file content.
    pub fn open(path: impl AsRef<Path>, options: Options) -> Result<Store> {
        let path = path.as_ref();
        Self::open_inner(path, options).map_err(|e| e.with_path(path))
    }

    fn open_inner(path: &Path, options: Options) -> Result<Store> {
        // A reader could open a directory and fail only at its first read.
        if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
            return Err(Error::io(
                "open",
                std::io::Error::from(std::io::ErrorKind::IsADirectory),
            ));
        }
        let inner = Arc::new(open::open(path, options)?);
        let _ = inner.me.set(Arc::downgrade(&inner));
        Ok(Store {
            inner,
            background: Mutex::new(None),
            background_started: AtomicBool::new(false),
        })
    }

    /// Starts the background thread if it is not running: allocation ahead of the
    /// writer, periodic syncs (`Periodic`, `Async`) and the tail work of the memcpy write
    /// path (`None`, `Periodic`).
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
        // Every policy needs it: it allocates the file ahead of the writer.
        if slot.is_none() && !self.inner.opts.read_only {
            let inner = Arc::clone(&self.inner);
            *slot = Some(
                threads::spawn("mapkv-background", inner.thread_nice, move || {
                    background(&inner, interval);
                })
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
        self.named(self.write_started().and_then(|()| {
            self.inner
                .write_ops(&[(KIND_PUT, key.as_ref(), value.as_ref())], false)
                .map(drop)
        }))
    }

    /// Removes `key`; returns whether it existed.
    ///
    /// # Errors
    /// As for [`Store::put`].
    pub fn delete(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        self.named(self.write_started().and_then(|()| {
            let out = self
                .inner
                .write_ops(&[(KIND_DELETE, key.as_ref(), b"")], true)?;
            Ok(out.is_some())
        }))
    }

    /// Applies every operation of `batch` atomically, in order: after any crash the store
    /// holds all of them or none. An empty batch is a no-op.
    ///
    /// # Errors
    /// As for [`Store::put`]; a rejected batch changes nothing.
    pub fn write(&self, batch: &Batch) -> Result<()> {
        self.named(self.write_started())?;
        let ops: Vec<(u8, &[u8], &[u8])> = batch
            .ops
            .iter()
            .map(|op| match op {
                Op::Put(k, v) => (KIND_PUT, k.as_slice(), v.as_slice()),
                Op::Delete(k) => (KIND_DELETE, k.as_slice(), &b""[..]),
            })
            .collect();
        self.named(self.inner.write_ops(&ops, false).map(drop))
    }

    /// Atomically sets `key` to `new` if its current value is `expected`, and returns
    /// whether it did. `None` as `expected` means "the key is absent"; `None` as `new`
    /// deletes the key. So `compare_and_swap(k, None, Some(v))` inserts only if `k` is
    /// absent, and `compare_and_swap(k, Some(old), None)` deletes only if `k` still holds
    /// `old`.
    ///
    /// The comparison and the write happen under the writer lock: no other write, from
    /// any thread of this process (other processes cannot write the store meanwhile),
    /// comes between them. The write is a single write, as durable as [`Store::put`]
    /// under every policy; when nothing is written (the comparison failed, or `new` is
    /// the current value already), under [`Durability::Always`] the call still returns
    /// only once the state it compared against is durable.
    ///
    /// ```
    /// # use mapkv::{Options, Store};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let store = Store::open(dir.path().join("s.mkv"), Options::default()).unwrap();
    /// // Claim a short code: only one claimant can win it.
    /// assert!(store.compare_and_swap("x1", None, Some(b"https://a.example"))?);
    /// assert!(!store.compare_and_swap("x1", None, Some(b"https://b.example"))?);
    /// assert_eq!(store.get("x1")?.as_deref(), Some(&b"https://a.example"[..]));
    /// # Ok::<(), mapkv::Error>(())
    /// ```
    ///
    /// # Errors
    /// As for [`Store::put`] (checked before anything is compared);
    /// [`Error::Corrupt`] if the current record fails its checksum (nothing is written).
    pub fn compare_and_swap(
        &self,
        key: impl AsRef<[u8]>,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<bool> {
        self.named(
            self.write_started()
                .and_then(|()| self.inner.compare_and_swap(key.as_ref(), expected, new)),
        )
    }

    /// Atomically replaces the value of `key` with `f(current value)` and returns the new
    /// value. `f` gets `None` if the key is absent; returning `None` deletes the key (or
    /// leaves it absent). If `f` returns the current value unchanged, nothing is written.
    ///
    /// `f` is called exactly once, with a copy of the current value, while this thread
    /// holds the store's writer lock: every other write to the store waits until it
    /// returns, so keep it short (no I/O, no waiting on other threads that may write this
    /// store). **`f` must not call this store.** Reads from inside it work but see the
    /// value before the update; calls that need the writer lock ([`Store::put`],
    /// [`Store::delete`], [`Store::write`], [`Store::compare_and_swap`], a nested
    /// `update`, [`Store::compact`], [`Store::verify`], [`Store::close_shared`]) return
    /// [`Error::Reentrant`] instead of deadlocking. If `f` panics, nothing is written and
    /// the lock is released (the panic propagates).
    ///
    /// Durability as for [`Store::compare_and_swap`]: the write is as durable as
    /// [`Store::put`]; under [`Durability::Always`] the call returns only once the state
    /// it returns is durable, also when it wrote nothing.
    ///
    /// ```
    /// # use mapkv::{Options, Store};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let store = Store::open(dir.path().join("s.mkv"), Options::default()).unwrap();
    /// // A counter that many threads may bump at once.
    /// let bump = |v: Option<&[u8]>| {
    ///     let n = v.map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
    ///     Some((n + 1).to_le_bytes().to_vec())
    /// };
    /// store.update("hits", bump)?;
    /// let now = store.update("hits", bump)?;
    /// assert_eq!(now, Some(2u64.to_le_bytes().to_vec()));
    /// # Ok::<(), mapkv::Error>(())
    /// ```
    ///
    /// # Errors
    /// As for [`Store::put`] (the key is checked before `f` runs; a value from `f` that
    /// is too large is [`Error::ValueTooLarge`] and nothing is written);
    /// [`Error::Corrupt`] if the current record fails its checksum (`f` is not called).
    pub fn update<F>(&self, key: impl AsRef<[u8]>, f: F) -> Result<Option<Vec<u8>>>
    where
        F: FnOnce(Option<&[u8]>) -> Option<Vec<u8>>,
    {
        self.named(
            self.write_started()
                .and_then(|()| self.inner.update(key.as_ref(), f)),
        )
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
        let r = self.inner.check_open().and_then(|()| {
            let (st, found) = self.inner.find_live_fresh(key.as_ref())?;
            match found {
                Some(rec) => Ok(Some(f(st.value_of(&rec)?))),
                None => Ok(None),
            }
        });
        self.named(r)
    }

    /// True if `key` has a value.
    ///
    /// # Errors
    /// As for [`Store::get`].
    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        self.named(
            self.inner
                .check_open()
                .and_then(|()| Ok(self.inner.find_live_fresh(key.as_ref())?.1.is_some())),
        )
    }

    /// Makes everything written before the call durable. Costs nothing if nothing changed
    /// since the last sync (a sync of a clean file still costs a device flush).
    ///
    /// # Errors
    /// The sync's I/O error; after one the store is poisoned. [`Error::Reentrant`] from
    /// inside a [`SyncObserver`](crate::SyncObserver) callback of this store.
    pub fn flush(&self) -> Result<()> {
        self.named(self.inner.check_open())?;
        self.inner.check_not_in_observer()?;
        if self.inner.opts.read_only {
            return Ok(());
        }
        let (gen, end) = self.inner.published_end();
        self.named(self.inner.sync_to(gen, end))
    }

    /// Number of live keys, exact.
    ///
    /// Cost: the write path does not look keys up in the index, so after writes of keys
    /// the index may already hold, the first `len` (or [`Store::stats`]) finishes those
    /// lookups, in bucket order: at most one per key written since the last checkpoint or
    /// counter read. Otherwise O(1). A call during a background checkpoint waits only
    /// while the checkpoint looks up the records its keys replaced (in the buckets, or in
    /// the old region before an index growth), not while it writes buckets or a new
    /// region. From inside a [`SyncObserver`](crate::SyncObserver) callback it never
    /// waits: if a checkpoint holds the lookups, it returns the count as it stands
    /// (exact once that checkpoint ends).
    pub fn len(&self) -> usize {
        // (A reader's counters catch up with its writer first.)
        usize::try_from(self.counters().live_keys).unwrap_or(usize::MAX)
    }

    /// Exact counters (see [`Store::len`]), also from inside an [`Store::update`] closure,
    /// which holds the writer mutex that collecting a failed checkpoint needs.
    fn counters(&self) -> Counters {
        if self.inner.opts.read_only {
            return self.inner.reader_counters();
        }
        if self.inner.check_not_in_update().is_ok() {
            return self.inner.resolve_counters();
        }
        if self.inner.check_not_in_observer().is_err() {
            // A sync observer runs on whichever thread synced: a checkpoint that holds
            // `resolving` on this very thread (the writer's, at close), or a writer that
            // holds the sync mutex a background checkpoint holding `resolving` waits for.
            // Waiting here would deadlock either way.
            return match self.inner.resolving.try_lock() {
                Some(_resolving) => self.inner.resolve_counters_locked(),
                None => self.inner.state.read().counters,
            };
        }
        let _resolving = self.inner.resolving.lock();
        self.inner.resolve_counters_locked()
    }

    /// True if the store holds no key.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Iterates over every live pair, each exactly once, as of the moment of the call
    /// (a snapshot: later writes are not seen). Pairs come in log order.
    ///
    /// Cost: the call lists the live records from the index (a walk of every index
    /// bucket, under the state lock, shared); each step then reads and verifies one
    /// record, taking no lock. Errors (a damaged record, a closed store) are items.
    #[must_use]
    pub fn iter(&self) -> Iter {
        let r = self
            .inner
            .check_open()
            .and_then(|()| self.inner.with_stable_index(|st| Ok(Iter::new(st))));
        match r {
            Ok(it) => it,
            Err(e) => Iter::failed(&self.inner.state.read(), e.with_path(&self.inner.path)),
        }
    }

    /// Iterates over the live pairs whose key starts with `prefix`, each exactly once, as
    /// of the moment of the call (a snapshot, like [`Store::iter`]), in log (write)
    /// order, not key order. An empty prefix yields every pair.
    ///
    /// The index is a hash, so there is no key order to seek in: this is a scan of all
    /// live pairs that skips the others. Its cost is that of [`Store::iter`] over the
    /// whole store (listing every live record from the index, then reading every live
    /// record's header and key), whatever the prefix matches; only the matching values
    /// are read, verified and copied. Fine for tools and occasional queries; an
    /// application that lists a prefix often should keep its own index of those keys
    /// (for example a key holding the list).
    ///
    /// ```
    /// # use mapkv::{Options, Store};
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let store = Store::open(dir.path().join("s.mkv"), Options::default()).unwrap();
    /// store.put("user:1", "ada")?;
    /// store.put("post:1", "hello")?;
    /// store.put("user:2", "bob")?;
    /// let mut users = store
    ///     .iter_prefix("user:")
    ///     .map(|item| item.map(|(k, _)| k))
    ///     .collect::<mapkv::Result<Vec<_>>>()?;
    /// users.sort();
    /// assert_eq!(users, [b"user:1".to_vec(), b"user:2".to_vec()]);
    /// # Ok::<(), mapkv::Error>(())
    /// ```
    #[must_use]
    pub fn iter_prefix(&self, prefix: impl AsRef<[u8]>) -> PrefixIter {
        let prefix = prefix.as_ref().to_vec();
        let listed = self.inner.check_open().and_then(|()| {
            self.inner.with_stable_index(|st| {
                let mut offsets = iter::live_offsets(st)?;
                offsets.sort_unstable();
                Ok((Arc::clone(&st.map), st.seed, offsets))
            })
        });
        match listed {
            Ok((map, seed, offsets)) => PrefixIter {
                map,
                seed,
                prefix,
                offsets: offsets.into_iter(),
                err: None,
                path: self.inner.path.clone(),
            },
            Err(e) => PrefixIter {
                map: Arc::clone(&self.inner.state.read().map),
                seed: self.inner.seed,
                prefix,
                offsets: Vec::new().into_iter(),
                err: Some(e.with_path(&self.inner.path)),
                path: self.inner.path.clone(),
            },
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
    ///
    /// I/O errors name the copy's path; a damaged record names this store's.
    pub fn backup(&self, path: impl AsRef<Path>) -> Result<()> {
        let dst = path.as_ref();
        self.named(self.inner.check_open())?;
        compact::backup(&self.inner, dst).map_err(|e| match e {
            Error::Io { .. } => e.with_path(dst),
            e => e.with_path(&self.inner.path),
        })
    }

    /// A snapshot of the live pairs and a [`Follower`] of every change committed after
    /// it: together, the store's state and then its history, with no change missed or
    /// repeated between the two (`mapkv scan --follow` prints them). The snapshot is
    /// the [`Store::iter`] of the same moment.
    ///
    /// # Errors
    /// As for [`Store::get`] (a reader catching up with its writer).
    pub fn follow(&self) -> Result<(Iter, Follower)> {
        self.named(self.inner.check_open())?;
        self.named(self.inner.with_stable_index(|st| {
            let it = Iter::new(st);
            let f = Follower::new(
                Arc::clone(&self.inner),
                Arc::clone(&st.gen),
                st.map.published(),
            );
            Ok((it, f))
        }))
    }

    /// A [`Follower`] of the changes committed from now on.
    ///
    /// # Errors
    /// As for [`Store::follow`].
    pub fn changes(&self) -> Result<Follower> {
        self.named(self.inner.check_open())?;
        let st = self.named(self.inner.view())?;
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
        let r = self
            .inner
            .check_not_in_update()
            .and_then(|()| compact::compact(&self.inner));
        self.named(r)
    }

    /// Checks every record checksum in the log and every index entry against the log.
    ///
    /// # Errors
    /// [`Error::Corrupt`] naming the first damage found.
    pub fn verify(&self) -> Result<VerifyReport> {
        self.named(self.verify_inner())
    }

    fn verify_inner(&self) -> Result<VerifyReport> {
        self.inner.check_open()?;
        // It may collect a failed checkpoint, which takes the writer mutex.
        self.inner.check_not_in_update()?;
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
    ///
    /// A background checkpoint that is running is given up to 250 ms to end, so that
    /// one about to end is counted in [`Stats::checkpoints`] (a small store's takes
    /// milliseconds); a longer one (seconds at millions of keys) is not waited for, and
    /// [`MaintenanceStats::checkpoint_running`](crate::MaintenanceStats) says it runs.
    pub fn stats(&self) -> Stats {
        let inner = &*self.inner;
        // A background checkpoint about to end is let end, so that it is counted (a
        // small store's takes milliseconds); a long one (seconds at millions of keys)
        // is reported running instead of waited for.
        if inner.check_not_in_update().is_ok() && inner.check_not_in_observer().is_ok() {
            let deadline = std::time::Instant::now() + STATS_CHECKPOINT_WAIT;
            while inner.job_running.load(Ordering::Acquire) && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        // First: a reader's counters catch up with its writer, so the ends below are
        // the caught-up view's.
        let c = self.counters();
        // Inside an `update` closure this thread holds the writer mutex, and the writer
        // is idle: its file and published end are the writer's.
        let nested = inner.check_not_in_update().is_err();
        let (alloc, end, checkpoint_running) = if inner.opts.read_only || nested {
            let st = inner.state.read();
            (st.file.len().unwrap_or(0), st.map.published(), false)
        } else {
            let w = inner.writer.lock();
            let running = w.job.as_ref().is_some_and(|j| !j.thread.is_finished());
            (w.alloc, w.end, running)
        };
        let (durable_end, durable_writes) = if nested {
            // A sync observer callback may run under the sync mutex: read the atomics.
            let d = inner.durable_hint.load(Ordering::Acquire);
            let writes = inner.state.read().writes;
            (d, if d >= end { writes } else { 0 })
        } else {
            let s = inner.sync.lock();
            (s.durable_end, s.durable_writes)
        };
        // (Not from the slots: a running checkpoint holds them.)
        let checkpoint_end = if inner.opts.read_only {
            0
        } else {
            inner.checkpoint_end.load(Ordering::Relaxed)
        };
        let maintenance = crate::stats::MaintenanceStats {
            checkpoint_running,
            checkpoint_end,
            replay_bytes: end.saturating_sub(checkpoint_end),
            compaction_running: inner.compacting.try_lock().is_none(),
            compactions: inner.compactions.load(Ordering::Relaxed),
            auto_compact_at: inner.opts.auto_compact.map(|a| a.dead_ratio),
            checkpoint_waits: inner.checkpoint_waits.load(Ordering::Relaxed),
            longest_checkpoint_wait: std::time::Duration::from_micros(
                inner.checkpoint_wait_max_us.load(Ordering::Relaxed),
            ),
            last_error: inner.last_error.lock().clone(),
        };
        // The system calls outside the state lock: `mincore` over the mapping of a
        // multi-gigabyte file takes tens of milliseconds, and a writer would wait.
        let (map, file) = {
            let st = inner.state.read();
            (Arc::clone(&st.map), Arc::clone(&st.file))
        };
        #[cfg(test)]
        tests::stats_system_calls(inner);
        let file_len = file.len().unwrap_or(alloc).max(alloc);
        let allocated = file.allocated().unwrap_or(0);
        let resident = map.resident_pages(alloc);
        drop((map, file));
        let st = inner.state.read();
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
            released_index_bytes: inner
                .released_index_bytes
                .load(Ordering::Relaxed)
                .min(c.dead_index_bytes),
            file_size: file_len,
            allocated_bytes: allocated,
            spare_bytes: file_len.saturating_sub(end),
            log_end: end,
            mapped_bytes: st.map.reserved(),
            resident_pages: resident,
            resident_bytes: resident * PAGE,
            space_amplification: crate::stats::space_amplification(file_len, c.live_bytes),
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
            key_filter_bytes: st
                .filter
                .as_ref()
                .filter(|f| f.ready())
                .map_or(0, |f| f.bytes()),
            durability: inner.opts.durability,
            populated: inner.opts.populate,
            recovery: inner.recovery.lock().clone(),
            live,
            maintenance,
        }
    }

    /// The path the store was opened with.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Closes the store cleanly (checkpoint, sync, mark clean) and reports errors, which
    /// dropping the store cannot. For a store shared through an `Arc`, see
    /// [`Store::close_shared`].
    ///
    /// # Errors
    /// The I/O error of the final checkpoint (naming the file); the store then recovers
    /// at the next open. [`Error::Closed`] if it was closed by [`Store::close_shared`]
    /// already.
    pub fn close(self) -> Result<()> {
        self.close_shared()
    }

    /// Closes a store that may be shared (`Arc<Store>`), as [`Store::close`] does, and
    /// reports the error that dropping the last clone would lose.
    ///
    /// Writes in progress on other threads finish first (a write that returned `Ok` is
    /// in the store, with the durability of its policy). A running automatic compaction
    /// finishes, and if the share of dead bytes is past
    /// [`Options::auto_compact`](crate::Options::auto_compact)'s threshold once every
    /// write is counted, the store is compacted now (so a store closed right after
    /// overwriting its keys does not keep the dead copies until its next session; this
    /// takes as long as a compaction, about 2 s for 1M keys). Both only for a store of
    /// at most 512 MiB of live records (as counted when the close starts): a larger one
    /// closes without waiting for a copy, a running compaction is abandoned (its
    /// temporary file removed), and the next session compacts on its first write. The
    /// store is then
    /// checkpointed, synced and marked clean, so the next open costs O(1). From then on every call
    /// through any clone fails with [`Error::Closed`]: writes, reads (`get`,
    /// `contains_key`, `iter`, `follow`, ...), `flush`, and `close_shared` itself.
    /// The calls that cannot fail ([`Store::len`], [`Store::stats`], [`Store::path`])
    /// keep answering from the last state. The file itself, and with it the writer lock,
    /// is released when the last clone is dropped: until then another writer opening the
    /// store gets [`Error::Locked`] (readers open it at any time).
    ///
    /// The store is closed even when this returns an error: a failed final checkpoint
    /// leaves the file to be recovered at the next open, as after a crash, with nothing
    /// lost that a policy promised. If you can get the `Store` out of its `Arc`
    /// (`Arc::try_unwrap` once the other clones are gone), [`Store::close`] is the same.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use mapkv::{Error, Options, Store};
    /// # let dir = tempfile::tempdir().unwrap();
    /// let store = Arc::new(Store::open(dir.path().join("s.mkv"), Options::default())?);
    /// let worker = Arc::clone(&store);
    /// std::thread::spawn(move || worker.put("k", "v")).join().unwrap()?;
    /// store.close_shared()?; // the final checkpoint's error, if any, is here
    /// assert!(matches!(store.get("k"), Err(Error::Closed)));
    /// # Ok::<(), mapkv::Error>(())
    /// ```
    ///
    /// # Errors
    /// The error of the final checkpoint or sync (naming the file), or
    /// [`Error::Poisoned`] if an earlier sync had failed; [`Error::Closed`] if the store
    /// was closed already; [`Error::Reentrant`] from inside an [`Store::update`] closure.
    pub fn close_shared(&self) -> Result<()> {
        self.named(self.shutdown())
    }

    /// Starts the background thread before a write, unless the store is closed.
    fn write_started(&self) -> Result<()> {
        self.inner.check_open()?;
        self.start_background()
    }

    /// Names the store's file in an error about it.
    fn named<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| e.with_path(&self.inner.path))
    }

    fn shutdown(&self) -> Result<()> {
        let inner = &*self.inner;
        inner.check_not_in_update()?;
        // No automatic compaction starts from here on (a checkpoint ending meanwhile would
        // start one, to copy the store again after the one below). A running one
        // finishes first (it holds the store open), if the store is small enough to copy
        // quickly, else it stops at its next piece; then one that is due runs on this
        // thread (small stores only), while the background thread still keeps
        // `Periodic`'s promise for writes other threads make meanwhile.
        inner.closing.store(true, Ordering::Release);
        let small = inner.close_may_compact();
        let compactor = inner.auto_compactor.lock().take();
        if let Some(t) = compactor {
            if !small {
                inner.cancel_compaction.store(true, Ordering::Release);
            }
            let _ = t.join();
        }
        if small {
            inner.compact_if_due_at_close();
        }
        // Stop the background thread, and any that a racing first write starts later.
        inner.background.lock().stop = true;
        inner.background_cv.notify_all();
        let thread = self.background.lock().take();
        if let Some(t) = thread {
            let _ = t.join();
        }
        if inner.opts.read_only {
            if inner.closed.swap(true, Ordering::AcqRel) {
                return Err(Error::Closed);
            }
            return Ok(());
        }
        let mut w = inner.writer.lock();
        // Under the writer mutex: writes that took it first are in, later ones fail.
        if inner.closed.swap(true, Ordering::AcqRel) {
            return Err(Error::Closed);
        }
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
        // Space allocated ahead of the tail goes back to the file system: a closed
        // store takes what it holds (growth steps reach an eighth of the live data).
        // Nothing lies past the log end (the next writer allocates again); best effort.
        // The file's own length: the background and checkpoint threads allocate past
        // `w.alloc` (see `Inner::take_ahead`).
        let keep = crate::format::page_up(w.end);
        let held = w.alloc.max(w.file.len().unwrap_or(0));
        if keep < held && w.file.file().set_len(keep).is_ok() {
            w.alloc = keep;
        }
        drop(w);
        // A checkpoint that ended during this close may have started an automatic
        // compaction after the join above; it stops at the writer mutex (the store is
        // closed) and removes its temporary file. Joined so that nothing holds the
        // file once close returns.
        let late = inner.auto_compactor.lock().take();
        if let Some(t) = late {
            let _ = t.join();
        }
        Ok(())
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Iterator over the live pairs whose key starts with a prefix, as of the call to
/// [`Store::iter_prefix`]: owned `(key, value)` pairs, each key once, in log order. Like
/// [`Iter`], it holds the mapping it started on, so it stays valid through file growth
/// and compaction, and takes no lock while it steps.
#[derive(Debug)]
pub struct PrefixIter {
    map: Arc<crate::map::Mapping>,
    seed: u64,
    prefix: Vec<u8>,
    offsets: std::vec::IntoIter<u64>,
    err: Option<Error>,
    path: std::path::PathBuf,
}

impl PrefixIter {
    /// The pair of the put record at `off` if its key has the prefix: the header and key
    /// are read first (bounds-checked), the value only for a match, after the record's
    /// checksum is verified.
    fn pair_at(&self, off: u64) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        use crate::format::{decode_header_in, record_crc_ok_in, RECORD_HEADER};
        let bad = || Error::corrupt(off, "index points at an invalid record");
        let hdr = self.map.read(off, RECORD_HEADER as u64).ok_or_else(bad)?;
        let klen = u64::from(u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]));
        let vlen = u64::from(u32::from_le_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]));
        let key = self
            .map
            .read(off + RECORD_HEADER as u64, klen)
            .ok_or_else(bad)?;
        if !key.starts_with(&self.prefix) {
            return Ok(None);
        }
        let bytes = self
            .map
            .read(off, RECORD_HEADER as u64 + klen + vlen)
            .ok_or_else(bad)?;
        let rec = decode_header_in(bytes, off).map_err(|_| bad())?;
        if rec.kind != KIND_PUT || !record_crc_ok_in(bytes, self.seed, &rec) {
            return Err(bad());
        }
        let (k, v) = bytes[RECORD_HEADER..].split_at(klen as usize);
        Ok(Some((k.to_vec(), v.to_vec())))
    }
}

impl Iterator for PrefixIter {
    type Item = Result<(Vec<u8>, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.err.take() {
            return Some(Err(e));
        }
        loop {
            let off = self.offsets.next()?;
            match self.pair_at(off) {
                Ok(Some(pair)) => return Some(Ok(pair)),
                Ok(None) => {}
                Err(e) => return Some(Err(e.with_path(&self.path))),
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (
            usize::from(self.err.is_some()),
            Some(self.offsets.len() + usize::from(self.err.is_some())),
        )
    }
}
