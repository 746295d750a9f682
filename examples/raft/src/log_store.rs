//! [`LogStore`]: openraft's log storage (log, vote, committed and purge marks) on one
//! mapkv store.
//!
//! Key spaces of the store:
//!
//! | key | value |
//! | --- | --- |
//! | `e` + index (8 bytes, big-endian) | an [`Entry`] (postcard) |
//! | `m:vote` | the last saved [`Vote`] |
//! | `m:committed` | the last saved committed [`LogId`] |
//! | `m:purged` | the last purged [`LogId`] (absent: nothing purged) |
//! | `m:last` | the [`LogId`] of the last present entry (absent: no entry after the purge mark) |
//!
//! The present entries are exactly the indexes `first..=last`, where `first` is one past
//! the purge mark (0 without one): there are no holes, so reads never iterate the store
//! (whose iteration order is not the key order) and fetch each index with a `get`.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use mapkv::{Batch, Durability, Options, Store};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, Vote};
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::codec::{decode, encode, err, err_msg};
use crate::{Entry, NodeId, StorageError, TypeConfig};

const VOTE: &[u8] = b"m:vote";
const COMMITTED: &[u8] = b"m:committed";
const PURGED: &[u8] = b"m:purged";
const LAST: &[u8] = b"m:last";

/// The key of the entry at `index`: `e` and the index, big-endian.
fn entry_key(index: u64) -> [u8; 9] {
    let mut k = [b'e'; 9];
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

/// When the log store makes appended entries durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogSync {
    /// The store uses [`Durability::None`]: `append` writes the entries (readable at once)
    /// and queues its callback for a flusher thread, which runs [`Store::flush`] and then
    /// completes every callback queued before the flush started: appends never wait for
    /// the disk, and the appends queued during one sync share the next (group commit).
    /// The default. (openraft 0.9's core awaits each callback before its next append, so
    /// there the gain is that no runtime worker thread blocks on the sync; see the crate
    /// docs.)
    #[default]
    GroupCommit,
    /// The store uses [`Durability::Always`]: every write returns once durable (a
    /// `pwrite`, then `fdatasync`), and `append` completes its callback inline. Simpler, but the sync
    /// blocks the runtime worker thread running openraft's core task.
    Always,
}

/// The range of present entries and the other marks, as stored; cached in memory.
#[derive(Debug, Clone, Default)]
struct Marks {
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    purged: Option<LogId<NodeId>>,
    /// The last present entry; `None` when no entry follows the purge mark.
    last: Option<LogId<NodeId>>,
}

impl Marks {
    /// Index of the first entry that may be present.
    fn first_index(&self) -> u64 {
        self.purged.map_or(0, |p| p.index.saturating_add(1))
    }

    /// One past the index of the last present entry.
    fn next_index(&self) -> u64 {
        self.last
            .map_or(self.first_index(), |l| l.index.saturating_add(1))
    }
}

/// The flusher thread of [`LogSync::GroupCommit`] and the queue of its callbacks.
struct Flusher {
    tx: Option<mpsc::Sender<LogFlushed<TypeConfig>>>,
    thread: Option<JoinHandle<()>>,
}

impl Flusher {
    fn start(store: Arc<Store>) -> Result<Flusher, StorageError> {
        let (tx, rx) = mpsc::channel::<LogFlushed<TypeConfig>>();
        let thread = std::thread::Builder::new()
            .name("mapkv-raft-flush".into())
            .spawn(move || {
                // Each round: take every callback queued so far, sync once, complete them
                // all, in order. Callbacks queued during the sync wait for the next round.
                while let Ok(first) = rx.recv() {
                    let mut round = vec![first];
                    round.extend(rx.try_iter());
                    let result = store.flush();
                    for cb in round {
                        cb.log_io_completed(
                            result
                                .as_ref()
                                .map(|_| ())
                                .map_err(|e| std::io::Error::other(e.to_string())),
                        );
                    }
                }
            })
            .map_err(|e| err(ErrorSubject::Logs, ErrorVerb::Write, &e))?;
        Ok(Flusher {
            tx: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has completed what was queued; it
        // holds a handle of the store, so the store is closed only after that.
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flusher").finish_non_exhaustive()
    }
}

/// What a [`LogStore`] and its [`LogReader`]s share.
#[derive(Debug)]
struct LogInner {
    // Dropped first: the flusher thread completes its queue before the store closes.
    flusher: Option<Flusher>,
    store: Arc<Store>,
    marks: Mutex<Marks>,
}

/// openraft's [`RaftLogStorage`] on one mapkv store: the log entries, the vote, the
/// committed mark and the purge mark (see the [crate] docs for the durability mapping).
///
/// Cloning is cheap and gives another handle on the same store. The store is closed when
/// the last handle (including every [`LogReader`] openraft took) is dropped; a new
/// [`LogStore::open`] of the same file meanwhile fails with [`mapkv::Error::Locked`].
#[derive(Debug, Clone)]
pub struct LogStore {
    inner: Arc<LogInner>,
}

/// The reader openraft's replication tasks use to read entries from a [`LogStore`]:
/// another handle on the same store.
#[derive(Debug, Clone)]
pub struct LogReader {
    inner: Arc<LogInner>,
}

fn read_mark<T: DeserializeOwned>(store: &Store, key: &[u8]) -> Result<Option<T>, StorageError> {
    let subject = || match key {
        VOTE => ErrorSubject::Vote,
        _ => ErrorSubject::Store,
    };
    match store.get_with(key, decode::<T>) {
        Ok(None) => Ok(None),
        Ok(Some(Ok(v))) => Ok(Some(v)),
        Ok(Some(Err(e))) => Err(err(subject(), ErrorVerb::Read, &e)),
        Err(e) => Err(err(subject(), ErrorVerb::Read, &e)),
    }
}

fn put_mark<T: Serialize>(batch: &mut Batch, key: &[u8], value: &T) -> Result<(), StorageError> {
    let bytes = encode(value).map_err(|e| err(ErrorSubject::Store, ErrorVerb::Write, &e))?;
    batch.put(key, bytes);
    Ok(())
}

impl LogStore {
    /// Opens (or creates) the log store in the mapkv file at `path`.
    ///
    /// # Errors
    /// mapkv's error opening the file (for example [`mapkv::Error::Locked`] while another
    /// handle has it open), or stored marks that do not decode or disagree.
    pub fn open(path: impl AsRef<Path>, sync: LogSync) -> Result<LogStore, StorageError> {
        let durability = match sync {
            LogSync::GroupCommit => Durability::None,
            LogSync::Always => Durability::Always,
        };
        // A raft log is appended at its end and deleted at its start: without
        // compaction the file would only grow.
        let options = Options::default()
            .durability(durability)
            .auto_compact(0.5, 64 << 20);
        let store = Store::open(path.as_ref(), options)
            .map_err(|e| err(ErrorSubject::Store, ErrorVerb::Read, &e))?;
        let marks = Marks {
            vote: read_mark(&store, VOTE)?,
            committed: read_mark(&store, COMMITTED)?,
            purged: read_mark(&store, PURGED)?,
            last: read_mark(&store, LAST)?,
        };
        if let Some(last) = marks.last {
            if last.index < marks.first_index() {
                return Err(err_msg(
                    ErrorSubject::Logs,
                    ErrorVerb::Read,
                    format!(
                        "last entry mark {last} is not after the purge mark {:?}",
                        marks.purged
                    ),
                ));
            }
        }
        let store = Arc::new(store);
        let last_mark = marks.last;
        let inner = LogInner {
            flusher: None,
            store,
            marks: Mutex::new(marks),
        };
        // The last entry mark and the last entry are written in one batch: they agree.
        if let Some(last) = last_mark {
            let found = inner.entry(last.index)?.map(|e| e.log_id);
            if found != Some(last) {
                return Err(err_msg(
                    ErrorSubject::LogIndex(last.index),
                    ErrorVerb::Read,
                    format!("the last entry mark says {last}, the entry there is {found:?}"),
                ));
            }
        }
        let LogInner { store, marks, .. } = inner;
        let flusher = match sync {
            LogSync::GroupCommit => Some(Flusher::start(Arc::clone(&store))?),
            LogSync::Always => None,
        };
        Ok(LogStore {
            inner: Arc::new(LogInner {
                flusher,
                store,
                marks,
            }),
        })
    }

    /// A weak handle on what every handle of this store shares: dead once the store is
    /// closed (see [`crate::cluster::Cluster::stop_node`]).
    pub(crate) fn weak_inner(&self) -> std::sync::Weak<dyn std::any::Any + Send + Sync> {
        let w: std::sync::Weak<LogInner> = Arc::downgrade(&self.inner);
        w
    }

    /// The last purged log id and the last log id, as [`RaftLogStorage::get_log_state`]
    /// returns them, without `&mut`.
    #[must_use]
    pub fn log_state(&self) -> LogState<TypeConfig> {
        let m = self.inner.marks.lock();
        LogState {
            last_purged_log_id: m.purged,
            last_log_id: m.last.or(m.purged),
        }
    }

    /// Writes `batch` and updates the cached marks with `update` once it is in the store.
    fn write(&self, batch: &Batch, update: impl FnOnce(&mut Marks)) -> Result<(), StorageError> {
        let mut marks = self.inner.marks.lock();
        self.inner
            .store
            .write(batch)
            .map_err(|e| err(ErrorSubject::Logs, ErrorVerb::Write, &e))?;
        update(&mut marks);
        Ok(())
    }

    /// The log id of the present entry at `index`.
    fn log_id_at(&self, index: u64) -> Result<LogId<NodeId>, StorageError> {
        match self.inner.entry(index)? {
            Some(e) => Ok(e.log_id),
            None => Err(err_msg(
                ErrorSubject::LogIndex(index),
                ErrorVerb::Read,
                "entry missing inside the log's range",
            )),
        }
    }
}

impl LogInner {
    /// The entry at `index`, if present.
    fn entry(&self, index: u64) -> Result<Option<Entry>, StorageError> {
        let subject = || ErrorSubject::LogIndex(index);
        match self.store.get_with(entry_key(index), decode::<Entry>) {
            Ok(None) => Ok(None),
            Ok(Some(Ok(e))) => Ok(Some(e)),
            Ok(Some(Err(e))) => Err(err(subject(), ErrorVerb::Read, &e)),
            Err(e) => Err(err(subject(), ErrorVerb::Read, &e)),
        }
    }

    /// The present entries in `range`, in index order.
    fn entries<RB: RangeBounds<u64>>(&self, range: RB) -> Result<Vec<Entry>, StorageError> {
        let (first, next) = {
            let m = self.marks.lock();
            (m.first_index(), m.next_index())
        };
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        }
        .max(first);
        let end = match range.end_bound() {
            Bound::Included(&e) => e.saturating_add(1),
            Bound::Excluded(&e) => e,
            Bound::Unbounded => next,
        }
        .min(next);
        let mut out = Vec::with_capacity(usize::try_from(end.saturating_sub(start)).unwrap_or(0));
        for index in start..end {
            match self.entry(index)? {
                Some(e) => out.push(e),
                // Purged (at the start) or truncated (at the end) since the marks were
                // read: openraft allows missing entries; return the consecutive ones.
                None if out.is_empty() => {}
                None => break,
            }
        }
        Ok(out)
    }
}

impl RaftLogReader<TypeConfig> for LogReader {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.inner.entries(range)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        self.inner.entries(range)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogReader;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        Ok(self.log_state())
    }

    async fn get_log_reader(&mut self) -> LogReader {
        LogReader {
            inner: Arc::clone(&self.inner),
        }
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let mut batch = Batch::new();
        put_mark(&mut batch, VOTE, vote)?;
        let vote = *vote;
        self.write(&batch, |m| m.vote = Some(vote))?;
        // Durable before returning, with every write before it (in order).
        self.inner
            .store
            .flush()
            .map_err(|e| err(ErrorSubject::Vote, ErrorVerb::Write, &e))
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.inner.marks.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError> {
        let mut batch = Batch::new();
        match &committed {
            Some(c) => put_mark(&mut batch, COMMITTED, c)?,
            None => {
                batch.delete(COMMITTED);
            }
        }
        self.write(&batch, |m| m.committed = committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        Ok(self.inner.marks.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = Batch::new();
        let mut last = None;
        for entry in entries {
            let bytes = encode(&entry)
                .map_err(|e| err(ErrorSubject::Log(entry.log_id), ErrorVerb::Write, &e))?;
            batch.put(entry_key(entry.log_id.index), bytes);
            last = Some(entry.log_id);
        }
        if let Some(last) = last {
            put_mark(&mut batch, LAST, &last)?;
            // Entries and the mark in one atomic batch: readable when this returns.
            self.write(&batch, |m| m.last = Some(last))?;
        }
        match &self.inner.flusher {
            // Completed (in order) once a flush that started after this write is done.
            // Even an empty append is queued: completing it early would tell openraft
            // that earlier appends still waiting for their flush are durable.
            Some(f) => {
                let queued = f.tx.as_ref().map(|tx| tx.send(callback));
                if !matches!(queued, Some(Ok(()))) {
                    return Err(err_msg(
                        ErrorSubject::Logs,
                        ErrorVerb::Write,
                        "the log flusher thread is gone",
                    ));
                }
            }
            // Durability::Always: the write returned durable.
            None => callback.log_io_completed(Ok(())),
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let (first, next) = {
            let m = self.inner.marks.lock();
            (m.first_index(), m.next_index())
        };
        let from = log_id.index.max(first);
        if from >= next {
            return Ok(());
        }
        // The entry before the truncated ones becomes the last, if it is present.
        let new_last = if from > first {
            Some(self.log_id_at(from - 1)?)
        } else {
            None
        };
        let mut batch = Batch::new();
        for index in from..next {
            batch.delete(entry_key(index));
        }
        match new_last {
            Some(l) => put_mark(&mut batch, LAST, &l)?,
            None => {
                batch.delete(LAST);
            }
        }
        self.write(&batch, |m| m.last = new_last)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let (first, next, last, purged) = {
            let m = self.inner.marks.lock();
            (m.first_index(), m.next_index(), m.last, m.purged)
        };
        if purged.is_some_and(|p| p.index >= log_id.index) {
            return Ok(());
        }
        let mut batch = Batch::new();
        for index in first..next.min(log_id.index.saturating_add(1)) {
            batch.delete(entry_key(index));
        }
        put_mark(&mut batch, PURGED, &log_id)?;
        // Purged past the last entry: no entry left, the purge mark is the last log id.
        let new_last = last.filter(|l| l.index > log_id.index);
        if new_last.is_none() {
            batch.delete(LAST);
        }
        self.write(&batch, |m| {
            m.purged = Some(log_id);
            m.last = new_last;
        })
    }
}
