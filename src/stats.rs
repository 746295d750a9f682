//! [`Stats`]: what the store can tell about itself.

use std::fmt;

use crate::options::Durability;

/// A snapshot of a store's counters; see [`Store::stats`](crate::Store::stats).
///
/// `Display` prints a short human-readable summary (sizes in KiB/MiB/GiB, ratios as
/// percentages); `{:#}` adds the counters since open and the live area. With the `serde`
/// feature it implements `serde::Serialize` (byte counts as plain integers), which
/// `mapkv stats --json` prints.
#[derive(Debug, Clone, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
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
    /// Of `dead_index_bytes`, the bytes given back to the file system (punched holes)
    /// or about to be (the region an index growth replaced is punched once no
    /// checkpoint slot refers to it): they take no disk space, so compaction gains
    /// nothing there, and they do not count towards [`Stats::dead_ratio`]. Regions a
    /// crash left behind are not released, nor, once their punch failed, regions on a
    /// file system that cannot punch holes.
    pub released_index_bytes: u64,
    /// Length of the file (allocated: space is reserved with `fallocate` as the file
    /// grows, so a full disk is an error at growth, never at a write into the mapping).
    pub file_size: u64,
    /// Bytes the filesystem has allocated to the file (`st_blocks * 512`): below
    /// `file_size` where old index regions were punched out.
    pub allocated_bytes: u64,
    /// File bytes past the log end, allocated ahead for the next appends (the growth step
    /// is at most an eighth of the live data once a store is large, 32 MiB at least).
    pub spare_bytes: u64,
    /// Where the next record will be appended.
    pub log_end: u64,
    /// Length of the mapping (address space reserved; costs no memory).
    pub mapped_bytes: u64,
    /// Pages (4 KiB) of the file resident in the page cache (`mincore` on the mapping).
    pub resident_pages: u64,
    /// `resident_pages` in bytes.
    pub resident_bytes: u64,
    /// File bytes per live byte: `file_size / max(live_bytes, min(file_size, 1 MiB))`.
    ///
    /// Live data smaller than 1 MiB (or than the file, if that is smaller) counts as that
    /// much: such a store's file is as large as its fixed minimum (the preallocated
    /// space, the index region), not amplified by its data, so a tiny or empty store
    /// reports 1.0 instead of a meaningless ratio. Always at least 1.0. Compaction brings
    /// it close to 1 for a store larger than a few MiB. For the share of the log that
    /// compaction would reclaim, see [`Stats::dead_ratio`].
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
    /// Memory of the key filter in use (see
    /// [`Options::key_filter`](crate::Options::key_filter)); 0 while none is built (off,
    /// an index too small to need one, a build in progress or abandoned because a
    /// bucket is damaged).
    pub key_filter_bytes: u64,
    /// The durability policy in force.
    pub durability: Durability,
    /// Whether the mapping was warmed up (`populate(true)`).
    pub populated: bool,
    /// What opening the store had to do.
    pub recovery: RecoveryReport,
    /// What the file's live area says, for readers in other processes (and what this
    /// handle, if it is one, has caught up with).
    pub live: LiveStats,
    /// Background maintenance: checkpoints, compaction, and the last error either met.
    pub maintenance: MaintenanceStats,
}

/// What the store's background maintenance is doing; see [`Stats::maintenance`].
#[derive(Debug, Clone, Default, PartialEq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct MaintenanceStats {
    /// An index checkpoint is running on its own thread.
    pub checkpoint_running: bool,
    /// The log end the index in the file covers (the last finished checkpoint's).
    pub checkpoint_end: u64,
    /// Log bytes a crash now would make the next open replay: `log_end - checkpoint_end`.
    pub replay_bytes: u64,
    /// A compaction is running (started by [`Store::compact`](crate::Store::compact) or
    /// automatically).
    pub compaction_running: bool,
    /// Compactions finished since open.
    pub compactions: u64,
    /// The dead share of the log at which compaction starts on its own (`None`: off).
    pub auto_compact_at: Option<f64>,
    /// Writes that waited for a running checkpoint because the delta had reached its
    /// hard limit (four times `Options::checkpoint_keys`, or four times the replay
    /// bound of log bytes, past which the writer stops rather than slows down).
    pub checkpoint_waits: u64,
    /// The longest of those waits.
    pub longest_checkpoint_wait: std::time::Duration,
    /// The last error a background checkpoint, compaction or sync met since open (a
    /// checkpoint that failed is repaired by rebuilding the index; a failed sync poisons
    /// the store, whose next write reports it).
    pub last_error: Option<String>,
}

/// The live area of the store file: what its writer publishes for readers in other
/// processes; see [`Stats::live`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
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
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[non_exhaustive]
pub struct RecoveryReport {
    /// The store had been closed cleanly (nothing to replay).
    pub was_clean: bool,
    /// Writes replayed from the log after the last checkpoint.
    pub replayed_writes: u64,
    /// The index was rebuilt from the whole log (a checkpoint interrupted with torn
    /// buckets, an index that cannot be trusted, or salvage).
    pub rebuilt_index: bool,
    /// A checkpoint interrupted while it rewrote buckets was redone from the log (replayed
    /// from its start, with the counters it had announced) instead of a rebuild.
    pub redid_checkpoint: bool,
    /// Offset where an invalid (torn) tail was cut off, if one was.
    pub truncated_at: Option<u64>,
    /// With `salvage(true)`: bytes of damaged log passed or dropped.
    pub salvaged_bytes: u64,
    /// The end below which recovery knew the log was durable (from the live area, the
    /// checkpoint and the records' durable watermarks; 0 if unknown). An invalid record
    /// below it is damage, not a torn tail.
    pub durable_end: u64,
    /// With `salvage(true)`: the damaged byte ranges of the log that were passed, in log
    /// order. The valid records after each were kept; each range is now covered by
    /// padding records.
    pub damaged: Vec<std::ops::Range<u64>>,
}

/// What counts as "small": live data below this (or below the file size, if smaller) is
/// counted as this much in [`Stats::space_amplification`].
pub(crate) const AMPLIFICATION_FLOOR: u64 = 1 << 20;

/// [`Stats::space_amplification`] from its parts.
pub(crate) fn space_amplification(file_size: u64, live_bytes: u64) -> f64 {
    let floor = live_bytes.max(file_size.min(AMPLIFICATION_FLOOR)).max(1);
    (file_size as f64 / floor as f64).max(1.0)
}

impl Stats {
    /// The share of the store's record bytes that are dead (overwritten or deleted records,
    /// delete markers, old index regions whose space was not released): the space
    /// [`Store::compact`](crate::Store::compact) reclaims, and what
    /// [`Options::auto_compact`](crate::Options::auto_compact) compares with its
    /// `dead_ratio`. From 0.0 (nothing to reclaim, also for an empty store) to 1.0.
    #[must_use]
    pub fn dead_ratio(&self) -> f64 {
        let held = self
            .dead_index_bytes
            .saturating_sub(self.released_index_bytes);
        let dead = self.dead_bytes + held;
        let total = self.log_bytes + held;
        if total == 0 {
            0.0
        } else {
            (dead as f64 / total as f64).clamp(0.0, 1.0)
        }
    }
}

/// A byte count in binary units: `512 B`, `1.5 KiB`, `12.0 MiB`.
pub(crate) struct Bytes(pub(crate) u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut v = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while v >= 1024.0 && unit + 1 < UNITS.len() {
            v /= 1024.0;
            unit += 1;
        }
        if v >= 100.0 {
            write!(f, "{v:.0} {}", UNITS[unit])
        } else {
            write!(f, "{v:.1} {}", UNITS[unit])
        }
    }
}

/// A fraction as a percentage, `0.4 %`, `37 %`.
struct Percent(f64);

impl fmt::Display for Percent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self.0 * 100.0;
        if p == 0.0 || p >= 10.0 {
            write!(f, "{p:.0}%")
        } else {
            write!(f, "{p:.1}%")
        }
    }
}

/// A durability policy as a user writes it: `Periodic(1s)`.
struct Policy(Durability);

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Durability::None => f.write_str("None"),
            Durability::Async => f.write_str("Async"),
            Durability::Always => f.write_str("Always"),
            Durability::Periodic(d) => write!(f, "Periodic({d:?})"),
        }
    }
}

impl fmt::Display for Stats {
    /// A summary, one topic a line:
    ///
    /// ```text
    /// keys:       4 live
    /// data:       116 B live, 58 B dead (33% of the log), 174 B of log
    /// file:       1.0 MiB (index 128 KiB), space amplification 1.00
    /// memory:     1.0 MiB mapped, 136 KiB resident, 6 changes not yet checkpointed
    /// durability: Periodic(1s), 174 B (6 writes) not yet durable
    /// recovery:   clean
    /// background: checkpoint idle (index covers the log to 4096, 174 B to replay after a crash), compaction idle (0 done, automatic at 25% dead)
    /// ```
    ///
    /// The alternate form (`{:#}`) adds the counters since open and the live area.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "keys:       {} live", self.live_keys)?;
        writeln!(
            f,
            "data:       {} live, {} dead ({} of the log), {} of log",
            Bytes(self.live_bytes),
            Bytes(self.dead_bytes),
            Percent(if self.log_bytes == 0 {
                0.0
            } else {
                self.dead_bytes as f64 / self.log_bytes as f64
            }),
            Bytes(self.log_bytes),
        )?;
        write!(
            f,
            "file:       {} (index {}",
            Bytes(self.file_size),
            Bytes(self.index_bytes)
        )?;
        if self.dead_index_bytes > 0 {
            write!(f, ", old index regions {}", Bytes(self.dead_index_bytes))?;
            if self.released_index_bytes > 0 {
                write!(
                    f,
                    " ({} of them released)",
                    Bytes(self.released_index_bytes)
                )?;
            }
        }
        writeln!(f, "), space amplification {:.2}", self.space_amplification)?;
        writeln!(
            f,
            "memory:     {} mapped, {} resident, {} changes not yet checkpointed ({} of heap)",
            Bytes(self.mapped_bytes),
            Bytes(self.resident_bytes),
            self.delta_entries,
            Bytes(self.delta_heap_bytes),
        )?;
        writeln!(
            f,
            "durability: {}{}, {} ({} writes) not yet durable",
            Policy(self.durability),
            if self.populated { ", populated" } else { "" },
            Bytes(self.bytes_at_risk),
            self.writes_at_risk,
        )?;
        let r = &self.recovery;
        write!(
            f,
            "recovery:   {}",
            if r.was_clean {
                "clean"
            } else {
                "not closed cleanly"
            }
        )?;
        if r.replayed_writes > 0 {
            write!(f, ", {} writes replayed", r.replayed_writes)?;
        }
        if r.rebuilt_index {
            f.write_str(", index rebuilt from the log")?;
        }
        if r.redid_checkpoint {
            f.write_str(", interrupted checkpoint redone")?;
        }
        if let Some(at) = r.truncated_at {
            write!(f, ", torn tail cut at byte offset {at}")?;
        }
        if r.salvaged_bytes > 0 {
            write!(f, ", {} of damaged log dropped", Bytes(r.salvaged_bytes))?;
        }
        if !r.damaged.is_empty() {
            write!(
                f,
                ", {} damaged record(s) skipped (first at byte offset {})",
                r.damaged.len(),
                r.damaged[0].start
            )?;
        }
        let m = &self.maintenance;
        writeln!(f)?;
        write!(
            f,
            "background: checkpoint {} (index covers the log to {}, {} to replay after a \
             crash), compaction {} ({} done, automatic {})",
            if m.checkpoint_running {
                "running"
            } else {
                "idle"
            },
            m.checkpoint_end,
            Bytes(m.replay_bytes),
            if m.compaction_running {
                "running"
            } else {
                "idle"
            },
            m.compactions,
            match m.auto_compact_at {
                Some(r) => format!("at {} dead", Percent(r)),
                None => "off".to_string(),
            },
        )?;
        if m.checkpoint_waits > 0 {
            write!(
                f,
                ", {} writes waited for a checkpoint (longest {:.1} ms)",
                m.checkpoint_waits,
                m.longest_checkpoint_wait.as_secs_f64() * 1e3
            )?;
        }
        if let Some(e) = &m.last_error {
            write!(f, ", last error: {e}")?;
        }
        if f.alternate() {
            writeln!(f)?;
            writeln!(
                f,
                "since open: {} writes, {} syncs covering {}, {} checkpoints",
                self.writes,
                self.syncs,
                Bytes(self.bytes_synced),
                self.checkpoints,
            )?;
            let l = &self.live;
            write!(
                f,
                "live area:  {}, view at {}, writer committed {} and made {} durable, \
                 {} behind, writer {}, {} writer sessions",
                if l.reader { "reader" } else { "writer" },
                l.view_end,
                l.committed_end,
                l.durable_end,
                Bytes(l.behind_bytes),
                if l.writer_alive { "running" } else { "gone" },
                l.writer_sessions,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_printed_in_binary_units() {
        assert_eq!(Bytes(0).to_string(), "0 B");
        assert_eq!(Bytes(1023).to_string(), "1023 B");
        assert_eq!(Bytes(1024).to_string(), "1.0 KiB");
        assert_eq!(Bytes(1536).to_string(), "1.5 KiB");
        assert_eq!(Bytes(1 << 20).to_string(), "1.0 MiB");
        assert_eq!(Bytes(300 << 20).to_string(), "300 MiB");
        assert_eq!(Bytes(u64::MAX).to_string(), "16.0 EiB");
    }

    #[test]
    fn space_amplification_is_sane_for_small_stores() {
        assert_eq!(space_amplification(1 << 20, 0), 1.0);
        assert_eq!(space_amplification(1 << 20, 116), 1.0);
        assert_eq!(space_amplification(12 << 10, 116), 1.0);
        assert_eq!(space_amplification(0, 0), 1.0);
        assert_eq!(space_amplification(8 << 20, 4 << 20), 2.0);
        assert_eq!(space_amplification(100 << 20, 1 << 10), 100.0);
    }
}
