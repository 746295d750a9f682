//! Sync observers: what a sync covered, for tools that need to know what is durable
//! (the power-loss simulator). A leaf module: the options and the store use it.

use std::sync::Arc;

/// What a sync covered, reported to a [`SyncObserver`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncEvent {
    /// `fdatasync` of the whole file (data and size).
    File,
    /// `msync(MS_SYNC)` / `sync_file_range`+flush of the byte range `[start, end)`.
    Range {
        /// First byte (page-aligned).
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// The directory holding the store was synced (after create or rename).
    Directory,
    /// A file was renamed over the store path (compaction); `fsync` of it preceded this.
    Renamed,
}

/// Told about every sync the store completes, after it returned successfully. Used by the
/// power-loss simulator to know what was durable when. Must be cheap or the store slows.
///
/// The callback runs on whichever thread did the sync (a writer, the background thread,
/// `flush`, `compact`, `close`), **with the store's locks held**. From inside it, reads of
/// the same store work (`get`, `iter`, `stats`, `backup`), but calls that would wait for
/// those locks (writes, `flush`, `compact`, `close`) return
/// [`Error::Reentrant`](crate::Error::Reentrant) instead of deadlocking. Hand such work to
/// another thread.
pub trait SyncObserver: Send + Sync {
    /// Called after a sync of `event` completed on the file at `path`.
    fn synced(&self, path: &std::path::Path, event: SyncEvent);
}

/// `Debug`-able wrapper so [`Options`](crate::Options) can derive `Debug`.
#[derive(Clone)]
pub(crate) struct SyncObserverRef(pub(crate) Arc<dyn SyncObserver>);

impl std::fmt::Debug for SyncObserverRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SyncObserver")
    }
}
