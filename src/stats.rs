//! [`Stats`]: what the store can tell about itself.

use crate::options::Durability;

/// A snapshot of a store's counters; see [`Store::stats`](crate::Store::stats).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Stats {
    /// Live keys.
    pub live_keys: u64,
    /// Bytes of the live records (record headers included).
    pub live_bytes: u64,
    /// Bytes of overwritten or deleted records (and delete markers) still in the log.
    pub dead_bytes: u64,
    /// Bytes of all records in the log.
    pub log_bytes: u64,
    /// Bytes of the current index region.
    pub index_bytes: u64,
    /// Bytes of old index regions left behind by index growth (holes punched where the
    /// filesystem allows); reclaimed by compaction.
    pub dead_index_bytes: u64,
    /// Allocated size of the file.
    pub file_size: u64,
    /// Where the next record will be appended.
    pub log_end: u64,
    /// Length of the mapping (address space reserved; costs no memory).
    pub mapped_bytes: u64,
    /// Pages (4 KiB) of the file resident in the page cache (`mincore` on the mapping).
    pub resident_pages: u64,
    /// `resident_pages` in bytes.
    pub resident_bytes: u64,
    /// `file_size / live_bytes` (1.0 for an empty store).
    pub space_amplification: f64,
    /// Writes applied since open (a batch counts once).
    pub writes: u64,
    /// Syncs issued since open (`fdatasync`, `msync(MS_SYNC)`), all causes.
    pub syncs: u64,
    /// Bytes of log covered by those syncs.
    pub bytes_synced: u64,
    /// Checkpoints (index updates in the file) since open.
    pub checkpoints: u64,
    /// Log bytes written but not yet durable: what power loss could take now.
    pub bytes_at_risk: u64,
    /// Writes not yet durable.
    pub writes_at_risk: u64,
    /// Changes held in memory since the last checkpoint.
    pub delta_entries: u64,
    /// Approximate heap bytes used by the in-memory delta.
    pub delta_heap_bytes: u64,
    /// The durability policy in force.
    pub durability: Durability,
    /// Whether the mapping was warmed up (`populate(true)`).
    pub populated: bool,
    /// What opening the store had to do.
    pub recovery: RecoveryReport,
    /// What the file's live area says, for readers in other processes (and what this
    /// handle, if it is one, has caught up with).
    pub live: LiveStats,
}

/// The live area of the store file: what its writer publishes for readers in other
/// processes; see [`Stats::live`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct LiveStats {
    /// This handle is a reader (`Options::read_only`).
    pub reader: bool,
    /// The log end this handle's view reflects (for a writer, its own end).
    pub view_end: u64,
    /// The end of the log the writer has committed (published for readers).
    pub committed_end: u64,
    /// Bytes a reader still has to catch up with: `committed_end - view_end`.
    pub behind_bytes: u64,
    /// The end of the log the writer last made durable (as it published it).
    pub durable_end: u64,
    /// A writer holds the store's writer lock (in this or another process).
    pub writer_alive: bool,
    /// Writers that have opened the file since it was created or compacted.
    pub writer_sessions: u64,
}

/// What [`Store::open`](crate::Store::open) found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecoveryReport {
    /// The store had been closed cleanly (nothing to replay).
    pub was_clean: bool,
    /// Writes replayed from the log after the last checkpoint.
    pub replayed_writes: u64,
    /// The index was rebuilt from the whole log (an interrupted checkpoint or salvage).
    pub rebuilt_index: bool,
    /// Offset where an invalid (torn) tail was cut off, if one was.
    pub truncated_at: Option<u64>,
    /// With `salvage(true)`: bytes of damaged log dropped after the valid prefix.
    pub salvaged_bytes: u64,
}
