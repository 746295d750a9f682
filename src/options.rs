//! Open-time configuration: [`Options`], [`Durability`] and [`AccessPattern`].

use std::time::Duration;

use crate::error::{Error, Result};

/// When a write becomes durable, i.e. survives power loss or a kernel crash.
///
/// Every policy survives a crash of the *process* (kill -9) without losing anything that
/// returned: the log lives in a `MAP_SHARED` mapping / the page cache, which outlives the
/// process. The policies differ only in what survives *power loss*. In every policy, and
/// after any crash, the store reopens to the state after some prefix of the applied writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub enum Durability {
    /// Never sync on the write path. [`Store::flush`](crate::Store::flush) and a clean
    /// close make everything durable.
    ///
    /// On power loss, writes since the last `flush()` may be lost. Appends are a `memcpy`
    /// into the mapping: the fastest policy. The write path never waits for I/O, with one
    /// exception: a checkpoint of the index (every 450k changed keys or 256 MiB of log, and
    /// at close) syncs the log and the buckets it rewrites. To keep that short, a
    /// background thread starts write-back (`sync_file_range`, no wait, no device flush,
    /// so not durable) of log pages the tail has moved 2 MiB past, 8 MiB at a time, and
    /// keeps the 4 MiB after the tail prefaulted writable so appends take no page fault
    /// (prefaulting dirties those pages: a whole-file sync meanwhile writes their zeros).
    /// Any other write-back is the kernel's choice (about every 5-30 s by default).
    None,
    /// After each write, start write-back of the bytes it appended with
    /// `sync_file_range(SYNC_FILE_RANGE_WRITE)` and return without waiting.
    ///
    /// `msync(MS_ASYNC)` is not used: on Linux since 2.6.19 it does nothing (measured here:
    /// 0.3 µs, no I/O). `sync_file_range` really queues the data write, but it neither waits
    /// for it nor flushes the device's volatile write cache, and it does not persist file
    /// size changes, so it is **not** durable by itself. To bound the window, a background
    /// thread also makes everything durable (`fdatasync`, only when something is dirty) at
    /// least once a second. On power loss, writes of about the last second may be lost;
    /// most of them usually survive, since their write-back started at once. Appends use
    /// `pwrite` so write-back writes only the blocks a record touched, not whole page-cache
    /// folios (which on ext4 can be 2 MiB).
    Async,
    /// A background thread makes everything durable at least once per interval
    /// (`fdatasync` only when something is dirty), also in the middle of longer work of
    /// its own. On power loss at most about one interval of writes may be lost, plus
    /// what was written during the sync in flight. Writers do not wait for the flusher
    /// while it keeps up; when the disk cannot take the writes as fast as they come and
    /// the flusher is a whole interval late (checked every 8 MiB of appends), the write
    /// that finds it so makes itself durable (a sync) before it returns, so the window
    /// stays bounded at about two intervals and a sync. Appends are a `memcpy` into the
    /// mapping, with the same background write-back and prefault as
    /// [`Durability::None`].
    Periodic(Duration),
    /// A write returns only once it is durable (`pwrite`, then `fdatasync`). Concurrent
    /// writers share syncs (group commit): one sync covers every write appended before it
    /// started. On power loss nothing that returned is lost.
    Always,
}

impl Default for Durability {
    /// `Periodic(1 s)`: at most about a second of writes at risk on power loss, at almost
    /// the speed of [`Durability::None`].
    fn default() -> Self {
        Durability::Periodic(Duration::from_secs(1))
    }
}

/// How the application will access the store; applied to the mapping with `madvise`.
///
/// Measured on the development machine (ext4, Linux 6.18; see the README): `Random`
/// disables read-ahead and makes a cold scan about 40x slower but reads 16x less data for
/// sparse lookups; `Sequential` made cold scans *slower* than `Normal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccessPattern {
    /// No advice (`MADV_NORMAL`): the kernel's default read-around.
    #[default]
    Normal,
    /// `MADV_RANDOM`: no read-ahead; best for sparse point lookups on a cold, large store.
    Random,
    /// `MADV_SEQUENTIAL`: aggressive read-ahead, pages dropped behind.
    Sequential,
    /// `MADV_WILLNEED`: start asynchronous read-ahead of the whole file at open.
    WillNeed,
}

/// Smallest file a store can have: superblock page, one index bucket page, one log page.
pub(crate) const MIN_FILE_SIZE: u64 = 3 * 4096;
/// [`Options::checkpoint_keys`]'s default, and its floor when it grows with the index.
const DEFAULT_CHECKPOINT_KEYS: usize = 450_000;
/// Keys per bucket of the index at which a default checkpoint is due, once that is more
/// than [`DEFAULT_CHECKPOINT_KEYS`].
const CHECKPOINT_KEYS_PER_BUCKET: u64 = 8;
/// Heap that one key of a checkpoint's batch may cost at worst: the writer's delta may
/// reach 4 batches of up to 46 bytes a key while a checkpoint runs, and the checkpoint
/// holds 32 bytes a key of sorted entries.
const HEAP_PER_BATCH_KEY: u64 = 4 * 46 + 32;

/// Configuration for [`Store::open`](crate::Store::open). A builder: every setter takes
/// and returns `self`.
///
/// ```
/// use mapkv::{Durability, Options};
/// let opts = Options::default().populate(true).durability(Durability::Always);
/// ```
#[derive(Debug, Clone)]
pub struct Options {
    pub(crate) populate: bool,
    pub(crate) durability: Durability,
    pub(crate) read_only: bool,
    pub(crate) create: bool,
    pub(crate) initial_size: u64,
    pub(crate) access: AccessPattern,
    pub(crate) max_key_size: usize,
    pub(crate) max_value_size: usize,
    pub(crate) salvage: bool,
    pub(crate) auto_compact: Option<AutoCompact>,
    /// `None`: the default rule (see [`Options::checkpoint_keys_for`]).
    pub(crate) checkpoint_keys: Option<usize>,
    pub(crate) key_filter: bool,
    pub(crate) background_nice: i32,
    pub(crate) sync_observer: Option<crate::observe::SyncObserverRef>,
}

/// When [`Store`](crate::Store) compacts on its own (see [`Options::auto_compact`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoCompact {
    /// Compact when dead bytes exceed this fraction of the log (0.0..1.0).
    pub dead_ratio: f64,
    /// ... and the log holds at least this many bytes.
    pub min_log_bytes: u64,
}

impl AutoCompact {
    /// The default: compact once 25% of a log of at least 64 MiB is dead.
    ///
    /// Why 25%: a log compacted at a dead share `d` holds at most `1 / (1 - d)` times its
    /// live records (1.33x here), and the index and record headers come on top (1M keys
    /// of 16 + 100 bytes take about 1.4x their raw size with no dead bytes at all), so a
    /// store written over and over stays under 2x its keys and values. Writes made
    /// while a compaction copies are copied with it, dead or not; if they leave the new
    /// file past the threshold, it compacts again at once. Measured: 1M keys written, each overwritten once, then closed: 1.43x
    /// (30% left 2.07x, because the writes copied during the compaction stayed just
    /// under the threshold). The cost is copying: between two compactions `d / (1 - d)`
    /// of the live data is written (33%), and each compaction copies all of it, so
    /// every byte written is copied about 3 times later, on the compaction's thread.
    /// Stores below 64 MiB are left alone: their dead space costs little, and
    /// compacting them often would cost more.
    ///
    /// Write cost: to compare with the threshold, the counters must know which writes
    /// replaced a record. The writer makes none of those lookups (a bucket probe each:
    /// on the write path they doubled a put's p50, 0.47 µs against 0.23 µs). Each
    /// checkpoint makes them for its keys, and between checkpoints the background
    /// thread does, a piece at a time once 1024 wait, but only while what they could
    /// find might make a compaction due (were each write the overwrite of a record
    /// twice the average size): a fill of new keys into a store large beside a
    /// checkpoint's keys makes none. At 20M keys that took a fill from 602-690k to
    /// 763-823k puts/s (two runs each, `docs/BENCH.md`); overwrites, which need the
    /// lookups, cost about what they did. A compaction whose threshold only the
    /// lookups can show (overwrites of records far larger than the average) starts at
    /// the next checkpoint, or at close.
    ///
    /// Memory: a compaction holds the live records' offsets (8 bytes per live key) and
    /// the new index's entries (16 bytes per live key), a copy of the frozen delta and
    /// one of the writes since the last checkpoint (each up to 4x `checkpoint_keys`
    /// keys, 23-46 bytes per key), and the delta of the writes it catches up with
    /// (23-46 bytes per key, folded into the new file's index whenever it passes 4x
    /// `checkpoint_keys` keys or 8 per bucket of that index, whichever is more, plus one 16 MiB piece of the old log re-encoded at a
    /// time). Measured peak `RssAnon` above the loop's start
    /// (`mapkv bench --sweep 1m,20m`, which reports it for every size): +79 MiB while 1M
    /// keys are overwritten with a compaction running, +47 MiB while they are first
    /// written (checkpoints only); at 20M keys +145 MiB overwriting and +397 MiB filling
    /// (a compaction ran then, and its snapshot is the O(live keys) part).
    pub const DEFAULT: AutoCompact = AutoCompact {
        dead_ratio: 0.25,
        min_log_bytes: 64 << 20,
    };
}

impl Default for Options {
    fn default() -> Self {
        Options {
            populate: false,
            durability: Durability::default(),
            read_only: false,
            create: true,
            initial_size: 1 << 20,
            access: AccessPattern::Normal,
            max_key_size: 64 << 10,
            max_value_size: 256 << 20,
            salvage: false,
            auto_compact: Some(AutoCompact::DEFAULT),
            checkpoint_keys: None,
            key_filter: true,
            background_nice: i32::from(Options::DEFAULT_BACKGROUND_NICE),
            sync_observer: None,
        }
    }
}

impl Options {
    /// The default of [`Options::background_nice`].
    pub const DEFAULT_BACKGROUND_NICE: u8 = 10;

    /// Warm the store up at open.
    ///
    /// Reads: the used part of the file is read into the page cache and mapped at open,
    /// like `MAP_POPULATE` but limited to the data (`MADV_POPULATE_READ` of
    /// `[0, log end)`), so reads later take no page fault. Cost: one pass over the data at
    /// open (measured ~16 ms/GiB when cached, ~0.5 s/GiB from disk). The free space after
    /// the log is deliberately not populated: read into the cache it lands in large folios,
    /// and `Async`/`Always` appends into large folios measured 5-7x slower.
    ///
    /// Writes: `MAP_POPULATE` (and `MADV_POPULATE_READ`) map pages *read-only* on a
    /// writable shared mapping, so the first write to each 4 KiB page would still fault
    /// (measured 10x slower first writes than without populate). This option therefore
    /// does nothing for appends. Under `None`/`Periodic` a background thread always keeps
    /// the next 4 MiB after the log tail prefaulted with `MADV_POPULATE_WRITE`, the only
    /// real write prefault, whatever this option says.
    ///
    /// Defaults to `false`.
    #[must_use]
    pub fn populate(mut self, on: bool) -> Self {
        self.populate = on;
        self
    }

    /// The durability policy; see [`Durability`] for what each costs and guarantees.
    /// Defaults to `Durability::Periodic(1 s)`.
    #[must_use]
    pub fn durability(mut self, d: Durability) -> Self {
        self.durability = d;
        self
    }

    /// Open read-only, as a reader: takes no lock (any number of readers, in this and
    /// other processes, beside at most one writer), maps the file read-only, sees every
    /// write the writer committed before each call, and refuses writes with
    /// [`Error::ReadOnly`]. A store that was not closed cleanly is recovered in memory;
    /// the file is not changed. Defaults to `false`.
    #[must_use]
    pub fn read_only(mut self, on: bool) -> Self {
        self.read_only = on;
        self
    }

    /// Whether opening for writing may create the store.
    ///
    /// With `true` (the default), a path with no file gets a new, empty store (built under
    /// a temporary name and linked into place, so no other process ever sees it half
    /// made), and so does an existing file of length zero. With `false`, only an existing
    /// store opens: a missing file is [`Error::NotFound`] and an empty one
    /// [`Error::NotAStore`], and nothing is created or changed. Use `false` where a
    /// mistyped path must not silently become a new, empty store.
    ///
    /// Either way a file that is not empty and not a store is never turned into one
    /// ([`Error::NotAStore`]). Readers (`read_only(true)`) never create anything.
    #[must_use]
    pub fn create(mut self, on: bool) -> Self {
        self.create = on;
        self
    }

    /// File size allocated when the store is created (rounded up to 4 KiB, at least 12 KiB).
    /// The file then grows geometrically (doubling, at most 1 GiB a step) with real
    /// allocation (`fallocate`), so a full disk is an error from the write that needed the
    /// space, never a `SIGBUS`. A larger initial size avoids growth steps; it costs disk
    /// space up front. Ignored when opening an existing store. Defaults to 1 MiB.
    #[must_use]
    pub fn initial_size(mut self, bytes: u64) -> Self {
        self.initial_size = bytes;
        self
    }

    /// Access-pattern hint applied to the mapping with `madvise`.
    /// Defaults to [`AccessPattern::Normal`].
    #[must_use]
    pub fn access_pattern(mut self, a: AccessPattern) -> Self {
        self.access = a;
        self
    }

    /// Largest key accepted; longer keys get [`Error::KeyTooLarge`]. At most 4 GiB - 1.
    /// Defaults to 64 KiB.
    #[must_use]
    pub fn max_key_size(mut self, bytes: usize) -> Self {
        self.max_key_size = bytes;
        self
    }

    /// Largest value accepted; longer values get [`Error::ValueTooLarge`]. At most
    /// 4 GiB - 1. Defaults to 256 MiB.
    #[must_use]
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = bytes;
        self
    }

    /// Salvage a damaged store instead of refusing to open it: skip damaged records in the
    /// log (a read-write open covers them with padding records), keep every valid record
    /// after them, rebuild the index, and report what was passed or dropped in the
    /// recovery report ([`RecoveryReport::damaged`](crate::RecoveryReport),
    /// `salvaged_bytes`). Without it, damage below the log's durable end (which a crash
    /// cannot leave) is an [`Error::Corrupt`] and the file is left as it was. Defaults to
    /// `false`.
    #[must_use]
    pub fn salvage(mut self, on: bool) -> Self {
        self.salvage = on;
        self
    }

    /// Compact automatically when dead bytes exceed `dead_ratio` of the log and the log
    /// is at least `min_log_bytes` long ([`Stats::dead_ratio`](crate::Stats::dead_ratio):
    /// overwritten and deleted records, and old index regions that still take space;
    /// those a finished growth replaced are punched out where the file system can, and
    /// then do not count, so a store that is only filled does not compact). The write that
    /// crosses the threshold (or the background thread or the checkpoint that finds it
    /// crossed once the old records of earlier writes are looked up) starts the
    /// compaction on a thread of its own and returns; writers and readers go on while it
    /// copies (writers pause only for its last catch-up and the switch). A close of a
    /// store of up to 512 MiB of live records waits for a running one, and compacts
    /// itself if the threshold is crossed once every write is counted; a larger store's
    /// close abandons a running one (see [`Store::close`](crate::Store::close)). Defaults to
    /// [`AutoCompact::DEFAULT`] (25% of at least 64 MiB); see there for the trade-off.
    /// A `dead_ratio` outside (0, 1) (or NaN) is [`Error::InvalidOption`] at open.
    ///
    /// [`Error::InvalidOption`]: crate::Error::InvalidOption
    #[must_use]
    pub fn auto_compact(mut self, dead_ratio: f64, min_log_bytes: u64) -> Self {
        self.auto_compact = Some(AutoCompact {
            dead_ratio,
            min_log_bytes,
        });
        self
    }

    /// No automatic compaction: space is reclaimed only by
    /// [`Store::compact`](crate::Store::compact). For stores whose writes must never
    /// share the disk with a compaction's copy, or that are compacted on a schedule.
    #[must_use]
    pub fn auto_compact_off(mut self) -> Self {
        self.auto_compact = None;
        self
    }

    /// Checkpoint (write the in-memory delta of changed keys into the index in the file)
    /// once this many keys changed since the last one, or once 256 MiB of log were
    /// appended since it, whichever comes first.
    ///
    /// Unless set, the count grows with the index while memory allows: 450,000 keys, or
    /// 8 per bucket of the index once that is more (from 65,536 buckets, a 256 MiB index
    /// that holds about 11M keys; 1.05M keys at 20M), as long as the part of the store's
    /// file in use (up to the log's end) is at most a quarter of the machine's memory
    /// (`MemTotal`, or the cgroup's `memory.max` if lower; so it and a compaction's copy
    /// of it fit in half) and the batch's worst-case heap (about 216 bytes a key, see
    /// below) at most 1/64 of it; from a quarter on, the batch shrinks gradually, to
    /// 450,000 at half the memory. A checkpoint rewrites and checksums every 4 KiB bucket it touches, and
    /// 450,000 random keys touch nearly every bucket of a large index: at 20M keys each checkpoint rewrote
    /// nearly all of a 512 MiB index for 3.4 keys per bucket, and the writer is paced to
    /// the checkpoints. With 1.05M keys per checkpoint, in the same run (`mapkv bench
    /// --sweep 20m`, both settings alternately, twice), puts went 1.2-1.8x faster (fill
    /// 748-990k/s against 559-605k/s, overwrite 375-392k/s against 218-306k/s) and the
    /// worst overwrite took 42-50 ms against 0.33-3.75 s, for 0.3-0.6 GB more anonymous
    /// memory at its peak. The file-size condition is there because at 100M keys on a
    /// 24 GiB machine (a 23 GiB file and a compaction's 18 GiB copy), batches that kept
    /// growing took that memory from a page cache that no longer held the index, and
    /// the store spent its time reading it back from disk (177 GB in 8.5 minutes). At
    /// 100M keys each checkpoint still rewrites a third to most of a 4 GiB index, and
    /// that rewriting is most of what such a store writes (docs/BENCH.md).
    ///
    /// The checkpoint runs on a thread of its own while writers go on. If the next one
    /// is due while it still runs (its syncs wait for the disk), the delta keeps growing,
    /// up to 4 times this many keys (or 1 GiB of log); only then does a writer wait.
    /// From twice the limits on, each write pauses a little (up to 2 ms near the hard
    /// limit, after releasing the writer lock), so the writer slows to what the disk
    /// takes instead of one write waiting seconds: 20M keys overwritten while a
    /// compaction ran, worst put 2.29 s without pacing, 0.36 s with it, for 24% less
    /// throughput in that phase (264k/s against 348k/s). So
    /// the trade-off is memory, not write latency: the delta costs 23-46 bytes of heap
    /// per key (a table of 16-byte slots at most 70% full), and a checkpoint of `n` keys
    /// holds its frozen delta plus 32 bytes per key of sorted entries. (The delta's queue
    /// of keys whose old records are not looked up yet, 8 bytes a key, is in 64 KiB
    /// chunks from a pool of the process that keeps 2 MiB ready and at most 8 MiB, also
    /// once the store is closed; and the next delta is made ready ahead of each freeze,
    /// its table up to 16 MiB, so that the writer allocates nothing.) With 450,000 keys,
    /// about 30-40 MB while a checkpoint runs, 90-120 MB at most when the disk is far
    /// behind the writer; with 1.05M keys about 2.3 times that. Fewer keys mean more
    /// checkpoints, each of which rewrites the index buckets it touches. Recovery after
    /// a crash replays the log written since the last finished checkpoint (a crash in
    /// the middle of one redoes it from there): this many keys or 256 MiB of log, plus
    /// what was written while the last checkpoint ran. At least 1. Defaults to the rule
    /// above.
    #[must_use]
    pub fn checkpoint_keys(mut self, keys: usize) -> Self {
        self.checkpoint_keys = Some(keys);
        self
    }

    /// Keys changed since the last checkpoint at which the next one is due, for an index
    /// of `buckets` buckets in a file used up to `log_end` (see
    /// [`Options::checkpoint_keys`]).
    pub(crate) fn checkpoint_keys_for(&self, buckets: u64, log_end: u64) -> usize {
        self.checkpoint_keys
            .unwrap_or_else(|| default_checkpoint_keys(buckets, log_end, physical_memory()))
    }

    /// `checkpoint_keys` as set, or the default's floor: the base of limits that must
    /// not grow with the index (a compaction's fold).
    pub(crate) fn checkpoint_keys_base(&self) -> usize {
        self.checkpoint_keys.unwrap_or(DEFAULT_CHECKPOINT_KEYS)
    }

    /// How many nice steps below the opening thread the store's own threads run: its
    /// background thread (allocation ahead, write-back, periodic syncs, counting), its
    /// checkpoints, automatic compactions and the key filter's build. `0` runs them at
    /// the application's priority. (An explicit [`Store::compact`](crate::Store::compact)
    /// runs on the caller's thread, at its priority.)
    ///
    /// Why: on a machine with few cores, those threads and the writer take turns on the
    /// CPU, and a writer that waits for a core waits milliseconds (the scheduler's time
    /// slice), as does a writer that waits for a lock held by a thread that lost its
    /// core. At a lower priority they take the CPU the writer leaves free and yield it
    /// when the writer wakes. Nothing is slowed that the writer waits for: when a
    /// checkpoint falls behind, the writer sleeps (`checkpoint_keys`), which gives the
    /// checkpoint the core. Measured in `docs/BENCH.md` ("Write stalls"). The value is
    /// taken at open, from the opening thread's, and capped at nice 19. Defaults to
    /// [`Options::DEFAULT_BACKGROUND_NICE`] (10).
    #[must_use]
    pub fn background_nice(mut self, steps: u8) -> Self {
        self.background_nice = i32::from(steps);
        self
    }

    /// Keep an in-memory filter of the keys in the index, so that looking up a key that
    /// is not in the store usually costs a hash and one cache line of memory instead of
    /// a random page of the index (measured at 1M keys: see the README's "What the flags
    /// cost").
    ///
    /// A Bloom filter of 12 bits per key the index region holds before it grows (1.5-3 MB
    /// per million keys), built by a thread of its own from the index buckets after the first lookup
    /// that reaches them, and again after each index growth and compaction; until it is
    /// built, lookups probe the buckets as without it. Building it reads every bucket
    /// once (which also checks their checksums, and warms a cold index). Applies to
    /// readers in other processes too. Defaults to `true`.
    #[must_use]
    pub fn key_filter(mut self, on: bool) -> Self {
        self.key_filter = on;
        self
    }

    /// Install an observer that is told about every sync the store issues, with the byte
    /// range it covered. Used by the crash simulator (the `sim` feature) to know which bytes
    /// were durable at each moment. Defaults to none.
    #[must_use]
    pub fn sync_observer(mut self, obs: std::sync::Arc<dyn crate::SyncObserver>) -> Self {
        self.sync_observer = Some(crate::observe::SyncObserverRef(obs));
        self
    }

    pub(crate) fn validate(&self) -> Result<()> {
        const U32_MAX: usize = u32::MAX as usize;
        if self.max_key_size > U32_MAX {
            return Err(Error::InvalidOption("max_key_size is above 4 GiB - 1"));
        }
        if self.max_value_size > U32_MAX {
            return Err(Error::InvalidOption("max_value_size is above 4 GiB - 1"));
        }
        if let Durability::Periodic(d) = self.durability {
            if d.is_zero() {
                return Err(Error::InvalidOption("Periodic interval must be non-zero"));
            }
        }
        if self.checkpoint_keys == Some(0) {
            return Err(Error::InvalidOption("checkpoint_keys must be at least 1"));
        }
        if let Some(ac) = self.auto_compact {
            if !(ac.dead_ratio > 0.0 && ac.dead_ratio < 1.0) {
                return Err(Error::InvalidOption(
                    "auto_compact dead_ratio must be in (0, 1)",
                ));
            }
        }
        Ok(())
    }
}

/// The default rule of [`Options::checkpoint_keys`], on a machine with `memory` bytes
/// (`None`: unknown, so the batch does not grow). From a log end of a quarter of the
/// memory to one of half, the grown batch shrinks back to the floor gradually: dropped
/// at once, it would find a delta that lags by up to 4 grown batches past its new hard
/// limit (4 floor batches), and the writer would wait for the running checkpoint.
fn default_checkpoint_keys(buckets: u64, log_end: u64, memory: Option<u64>) -> usize {
    let Some(memory) = memory else {
        return DEFAULT_CHECKPOINT_KEYS;
    };
    let (quarter, half) = (memory / 4, memory / 2);
    if log_end >= half || quarter == 0 {
        return DEFAULT_CHECKPOINT_KEYS;
    }
    let per_bucket = buckets.saturating_mul(CHECKPOINT_KEYS_PER_BUCKET);
    let heap_cap = memory / 64 / HEAP_PER_BATCH_KEY;
    let grown = usize::try_from(per_bucket.min(heap_cap)).unwrap_or(usize::MAX);
    if log_end <= quarter {
        return DEFAULT_CHECKPOINT_KEYS.max(grown);
    }
    let extra = grown.saturating_sub(DEFAULT_CHECKPOINT_KEYS) as u128;
    // The share of `extra` kept: all of it up to a quarter, none from half on.
    let left = u128::from((half - log_end).min(half - quarter));
    let kept = extra * left / u128::from(half - quarter);
    DEFAULT_CHECKPOINT_KEYS + usize::try_from(kept).unwrap_or(0)
}

/// The memory this process may use: the machine's (`MemTotal`), or its cgroup's limit
/// (`memory.max`, cgroup v2) if lower. Read once per process (the first store opened
/// reads it, not a write under the store's locks); `None` where `/proc/meminfo` cannot
/// be read.
pub(crate) fn physical_memory() -> Option<u64> {
    static MEMORY: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *MEMORY.get_or_init(|| {
        let info = std::fs::read_to_string("/proc/meminfo").ok()?;
        let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        let total = kb.checked_mul(1024)?;
        Some(cgroup_memory_max().map_or(total, |max| total.min(max)))
    })
}

/// The memory limit of this process's cgroup (v2: `memory.max` of the group named in
/// `/proc/self/cgroup`), if it has one.
fn cgroup_memory_max() -> Option<u64> {
    let groups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = groups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let max = std::fs::read_to_string(format!("/sys/fs/cgroup{path}/memory.max")).ok()?;
    max.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    /// Unless set, checkpoints are due at 450,000 changed keys, or at 8 per bucket of a
    /// large index while the used file is at most a quarter of the memory (back to
    /// 450,000 gradually up to half of it) and the batch's heap at most 1/64 of it; a
    /// count that was set is kept at any index size.
    #[test]
    fn checkpoint_keys_grow_with_the_index_while_memory_allows() {
        let mem = Some(24 * GIB);
        assert_eq!(default_checkpoint_keys(1, 1 << 20, mem), 450_000);
        assert_eq!(default_checkpoint_keys(32_768, GIB, mem), 450_000);
        assert_eq!(default_checkpoint_keys(65_536, GIB, mem), 524_288);
        assert_eq!(default_checkpoint_keys(131_072, 4 * GIB, mem), 1_048_576);
        // A file past a quarter of the memory: back to the floor by half of it, a
        // little at a time.
        assert_eq!(default_checkpoint_keys(131_072, 6 * GIB, mem), 1_048_576);
        let extra = 1_048_576 - 450_000;
        let mut last = 1_048_576;
        for tenth in 1..10 {
            let end = 6 * GIB + 6 * GIB * tenth / 10;
            let keys = default_checkpoint_keys(131_072, end, mem);
            let expect = 450_000 + extra * (10 - tenth as usize) / 10;
            assert!(
                keys.abs_diff(expect) <= 1,
                "{keys} at {end}: expected {expect}"
            );
            assert!(keys < last);
            last = keys;
        }
        assert_eq!(default_checkpoint_keys(131_072, 12 * GIB, mem), 450_000);
        assert_eq!(default_checkpoint_keys(131_072, 20 * GIB, mem), 450_000);
        assert_eq!(default_checkpoint_keys(131_072, 1 << 20, Some(0)), 450_000);
        // The heap cap: 24 GiB / 64 / 216 bytes.
        let cap = (24 * GIB / 64 / HEAP_PER_BATCH_KEY) as usize;
        assert_eq!(default_checkpoint_keys(1 << 20, 4 * GIB, mem), cap);
        // A small machine never goes below the floor.
        assert_eq!(
            default_checkpoint_keys(131_072, GIB / 4, Some(2 * GIB)),
            450_000
        );
        // Unknown memory: the floor.
        assert_eq!(default_checkpoint_keys(131_072, GIB, None), 450_000);

        let set = Options::default().checkpoint_keys(1_000);
        assert_eq!(set.checkpoint_keys_for(131_072, GIB), 1_000);
        assert_eq!(set.checkpoint_keys_base(), 1_000);
        assert_eq!(Options::default().checkpoint_keys_base(), 450_000);
        assert!(Options::default().checkpoint_keys(0).validate().is_err());
    }
}
