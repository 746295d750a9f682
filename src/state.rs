//! The reader-visible state of a store: the mapping, where the index is, the delta of
//! changes since the last checkpoint, and the live counters. Lives behind the store's
//! `RwLock`; readers hold the read lock for as long as they borrow mapped bytes.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::{
    bucket_marked, bucket_of, decode_header_in, record_crc_ok_in, RecordRef, BUCKET_SIZE,
    KIND_DELETE, KIND_PUT,
};
use crate::index::bucket::probe_with;
use crate::index::filter::KeyFilter;
use crate::index::{key_hash, probe, Delta};
use crate::log::{scan, ScanEnd};
use crate::map::{FileHandle, LiveArea, Mapping};

/// Where the current index region is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexGeom {
    /// Offset of bucket 0.
    pub(crate) off: u64,
    /// Number of buckets (a power of two).
    pub(crate) buckets: u64,
    /// [`INDEX_SPARSE`](crate::format::INDEX_SPARSE) (a version 1 region: zero pages are
    /// empty buckets) or [`INDEX_SEALED`](crate::format::INDEX_SEALED).
    pub(crate) style: u32,
}

impl IndexGeom {
    pub(crate) fn bucket_off(&self, b: u64) -> u64 {
        self.off + b * BUCKET_SIZE as u64
    }
    pub(crate) fn bytes(&self) -> u64 {
        self.buckets * BUCKET_SIZE as u64
    }
}

/// Live counters. `log_bytes` and `dead_index_bytes` are always exact; `live_keys` and
/// `live_bytes` are exact once [`State::resolve`] has no work left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Counters {
    pub(crate) live_keys: u64,
    pub(crate) live_bytes: u64,
    pub(crate) log_bytes: u64,
    pub(crate) dead_index_bytes: u64,
}

#[derive(Debug)]
pub(crate) struct State {
    pub(crate) map: Arc<Mapping>,
    /// The store file (replaced by compaction together with `map`).
    pub(crate) file: Arc<FileHandle>,
    pub(crate) seed: u64,
    /// Offset of the first log record (from the static header).
    pub(crate) log_start: u64,
    pub(crate) index: IndexGeom,
    pub(crate) delta: Delta,
    /// A delta being written into the index by a background checkpoint: older than
    /// `delta`, newer than the buckets. Lookups consult `delta`, then this, then the
    /// buckets; the checkpoint drops it when it switches to the updated index.
    pub(crate) frozen: Option<Box<Frozen>>,
    /// The buckets in the file are not trustworthy (read-only open of a store whose
    /// checkpoint was interrupted): the delta holds the whole index.
    pub(crate) delta_only: bool,
    pub(crate) counters: Counters,
    /// Writes applied since open (a batch counts once).
    pub(crate) writes: u64,
    /// The live area of `file`: where its writer publishes for readers in other
    /// processes.
    pub(crate) live: Arc<LiveArea>,
    /// This view belongs to a reader (`Options::read_only`): a writer in another
    /// process may rewrite the buckets while it probes them, so they are read word by
    /// word, atomically, and every lookup is validated against the index sequence.
    pub(crate) shared: bool,
    /// What a reader has caught up with (see `store::follow`).
    pub(crate) seen: Seen,
    /// The file's place in the chain of files the store has lived in (for followers).
    pub(crate) gen: Arc<FileGen>,
    /// Buckets of `index` whose checksum a lookup has verified since they were last
    /// written (see [`BucketChecks`]).
    pub(crate) checked: BucketChecks,
    /// The key filter of `index`'s buckets (`store::filter` keeps it right), if one was
    /// made; lookups consult it once it is ready.
    pub(crate) filter: Option<Arc<KeyFilter>>,
    /// A filter was made (or could not be) for `index`: not again until the index
    /// changes.
    pub(crate) filter_tried: bool,
}

/// One bit per bucket of the current index: its checksum was verified since the bucket
/// was last written. A lookup verifies a bucket's checksum (one CRC of 4 KiB) the first
/// time it probes it after the index changed, then only tests the bit: a damaged bucket
/// is reported instead of read as "no such key", for about one CRC per bucket per
/// checkpoint.
#[derive(Debug, Default)]
pub(crate) struct BucketChecks {
    bits: Box<[std::sync::atomic::AtomicU64]>,
}

impl BucketChecks {
    pub(crate) fn for_buckets(buckets: u64) -> BucketChecks {
        let words = usize::try_from(buckets.div_ceil(64)).unwrap_or(0);
        BucketChecks {
            bits: (0..words)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        }
    }

    fn word(&self, b: u64) -> Option<(&std::sync::atomic::AtomicU64, u64)> {
        let w = self.bits.get(usize::try_from(b / 64).ok()?)?;
        Some((w, 1u64 << (b % 64)))
    }

    fn is_checked(&self, b: u64) -> bool {
        self.word(b)
            .is_some_and(|(w, m)| w.load(std::sync::atomic::Ordering::Relaxed) & m != 0)
    }

    fn mark(&self, b: u64) {
        if let Some((w, m)) = self.word(b) {
            w.fetch_or(m, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// One file of the store's life, for followers of its changes: compaction starts a new
/// one and links it from the old one, so a follower that was still reading the old file
/// finishes it and goes on in the new one, however many switches it slept through. The
/// store holds only the current link; a follower holds its own (and so the files it has
/// yet to finish).
#[derive(Debug)]
pub(crate) struct FileGen {
    /// The file's current mapping (growth replaces it). Its published end is how far
    /// the file's changes can be read; once `next` is set, that end is final.
    pub(crate) map: parking_lot::Mutex<Arc<Mapping>>,
    /// Where the changes of this file start: the log end it was created with.
    pub(crate) start: u64,
    /// The file's seed (it keys the record checksums).
    pub(crate) seed: u64,
    /// The file that replaced this one.
    pub(crate) next: std::sync::OnceLock<Arc<FileGen>>,
    /// The file's generation (compactions since the store was created; 0 if unknown).
    pub(crate) generation: u64,
    /// Set on a file a reader reached by skipping one or more files it never opened
    /// (compacted away while it did not call the store): their changes are lost to
    /// followers, who report [`Error::Lagged`](crate::Error::Lagged) on reaching it.
    pub(crate) after_gap: std::sync::atomic::AtomicBool,
}

impl FileGen {
    pub(crate) fn new(map: Arc<Mapping>, start: u64, seed: u64, generation: u64) -> Arc<FileGen> {
        Arc::new(FileGen {
            map: parking_lot::Mutex::new(map),
            start,
            seed,
            next: std::sync::OnceLock::new(),
            generation,
            after_gap: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Records that the file now has a new mapping (growth).
    pub(crate) fn remapped(&self, map: &Arc<Mapping>) {
        *self.map.lock() = Arc::clone(map);
    }

    /// Links the file that replaced this one.
    pub(crate) fn replaced_by(&self, next: &Arc<FileGen>) {
        let _ = self.next.set(Arc::clone(next));
    }
}

/// How far a reader's view has followed its writer: the live-area values it last acted
/// on. A writer's own view keeps these at their defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Seen {
    /// The index sequence whose checkpoint slot the view's `index` comes from.
    pub(crate) index_seq: u64,
    /// The `log_end` of that checkpoint: the buckets cover the log up to at least here.
    pub(crate) ckpt_end: u64,
    /// That checkpoint's state (a reader counts keys only outside CHECKPOINTING).
    pub(crate) ckpt_state: u32,
    /// That checkpoint's counters, exact at `ckpt_end`.
    pub(crate) ckpt_counters: Counters,
    /// A CHECKPOINTING slot's announced end and counters (see `RedoInfo`): counting
    /// from `ckpt_end` takes these at their end, since the buckets may be half-rewritten.
    pub(crate) redo: Option<crate::format::RedoInfo>,
    /// Where the delta's replay started: the view holds every write from here to the
    /// published end.
    pub(crate) base: u64,
    /// Writer sessions seen in the live area.
    pub(crate) session: u64,
    /// A "switch pending" mark found stale (its writer died before renaming: the path
    /// still names this file), with the writer session it was found in: ignored until a
    /// new writer opens the file (which clears it).
    pub(crate) stale_pending: Option<u64>,
    /// The committed end the view last acted on (it may lag the view's end when a dead
    /// writer left records it never committed: the view then keeps what recovery keeps).
    pub(crate) committed: u64,
}

/// The bytes of the record at `off` in `map`, as its header's lengths say: a slice of
/// exactly what a lookup reads (never one that covers slots or buckets a writer may be
/// rewriting). `None` if the header or the record is not inside the published range.
pub(crate) fn record_bytes(map: &Mapping, off: u64) -> Option<&[u8]> {
    let h = map.read(off, crate::format::RECORD_HEADER as u64)?;
    let len = |at: usize| u64::from(u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]));
    map.read(off, crate::format::RECORD_HEADER as u64 + len(8) + len(12))
}

/// Applies one write to a delta and the counters that go with it (see [`State::apply`]):
/// `rec` becomes the key's newest record. `prev_len(off)` is the length of the record at
/// `off` if it holds the same key (hashes collide), else `None`; a put it replaces in the
/// delta leaves the live counts at once, and one in the buckets later, when resolved.
pub(crate) fn apply_write(
    delta: &mut Delta,
    c: &mut Counters,
    resolved: bool,
    hash: u64,
    rec: &RecordRef,
    mut prev_len: impl FnMut(u64) -> Option<u64>,
) {
    c.log_bytes += rec.len();
    if rec.kind == KIND_PUT {
        c.live_bytes += rec.len();
        c.live_keys += 1;
    }
    let mut replaced_len = 0;
    let prev = delta.set(hash, rec.offset, rec.kind == KIND_DELETE, resolved, |p| {
        prev_len(p).inspect(|&l| replaced_len = l).is_some()
    });
    if let Some((_, false)) = prev {
        c.live_bytes = c.live_bytes.saturating_sub(replaced_len);
        c.live_keys = c.live_keys.saturating_sub(1);
    }
}

/// The length of the record at `off` in `map` if its key is `key`.
pub(crate) fn same_key_len(map: &Mapping, off: u64, key: &[u8]) -> Option<u64> {
    record_bytes(map, off)
        .and_then(|b| decode_header_in(b, off).ok())
        .filter(|p| {
            map.read(p.key_off(), u64::from(p.key_len))
                .is_some_and(|k| k == key)
        })
        .map(|p| p.len())
}

/// Bytes of a record a lookup asks the CPU for as soon as it knows the record's offset
/// (four cache lines: the header, the key and, for values up to about 200 bytes, all
/// of the value the caller is about to read and the checksum covers).
const RECORD_PREFETCH: u64 = 256;

/// Header of the record at `off` in `map` (see [`State::header`]).
pub(crate) fn header_in(map: &Mapping, off: u64) -> Result<RecordRef> {
    record_bytes(map, off)
        .and_then(|b| decode_header_in(b, off).ok())
        .ok_or_else(|| Error::corrupt(off, "index points at an invalid record"))
}

/// True if the checksum of `rec` (a header read from `map`) holds.
fn crc_ok_in(map: &Mapping, seed: u64, rec: &RecordRef) -> bool {
    record_bytes(map, rec.offset).is_some_and(|b| record_crc_ok_in(b, seed, rec))
}

/// The record at `off` in `map` if it holds `key` (see `State::record_if_key`).
pub(crate) fn record_if_key_in(
    map: &Mapping,
    seed: u64,
    off: u64,
    key: &[u8],
) -> Result<Option<RecordRef>> {
    // The value's lines are where the header says; asked for now, their misses
    // overlap the header's instead of following it.
    map.prefetch_lines(off, RECORD_PREFETCH);
    let rec = header_in(map, off)?;
    if rec.kind != KIND_PUT && rec.kind != KIND_DELETE {
        return Err(Error::corrupt(off, "index points at a non-data record"));
    }
    let hit = rec.key_len as usize == key.len() && key_in(map, &rec)? == key;
    // Another key under the same hash is a collision only if that record is intact:
    // a damaged key must not make the looked-up key read as missing. (Only checked
    // on a mismatch, which is rare: the common path costs nothing more.)
    if !hit && !crc_ok_in(map, seed, &rec) {
        return Err(Error::corrupt(off, "record checksum mismatch"));
    }
    Ok(hit.then_some(rec))
}

/// Key bytes of a record in `map` (see [`State::key_of`]).
pub(crate) fn key_in<'m>(map: &'m Mapping, rec: &RecordRef) -> Result<&'m [u8]> {
    map.read(rec.key_off(), u64::from(rec.key_len))
        .ok_or(Error::corrupt(rec.offset, "record key outside the file"))
}

/// See [`State::frozen`].
#[derive(Debug)]
pub(crate) struct Frozen {
    pub(crate) delta: Delta,
    /// The log end the frozen delta covers (its checkpoint's `log_end`): tells one
    /// frozen delta from the next.
    pub(crate) end: u64,
    /// The counters as of the end of the log the frozen delta covers (what the
    /// checkpoint will record), minus the old records found since for its entries.
    pub(crate) counters: Counters,
    /// Its checkpoint failed, maybe after rewriting some buckets: an index lookup may now
    /// find an entry's own record, so its entries are no longer resolved against the
    /// index. Lookups stay right (this delta is consulted before the buckets); the writer
    /// repairs the index (rebuilding it from the log) and drops this delta.
    pub(crate) failed: bool,
}

impl State {
    /// Switches to the index `geom` (its buckets are checked anew). A different region
    /// gets a filter of its own (the old one does not know its keys).
    pub(crate) fn set_index(&mut self, geom: IndexGeom) {
        self.checked = BucketChecks::for_buckets(geom.buckets);
        if geom != self.index {
            self.drop_filter();
        }
        self.index = geom;
    }

    /// Forgets the key filter: the buckets may hold keys it does not know.
    pub(crate) fn drop_filter(&mut self) {
        self.filter = None;
        self.filter_tried = false;
    }

    /// Appends the key hashes of bucket `b` to `out`, after checking the bucket's
    /// checksum (the filter's build: a bucket that is damaged must not be summed up as
    /// holding no keys).
    pub(crate) fn bucket_hashes(&self, b: u64, out: &mut Vec<u64>) -> Result<()> {
        self.check_bucket(b)?;
        let bytes = self.bucket(b)?;
        for i in 0..crate::format::SLOTS_PER_BUCKET {
            let (h, off) = crate::index::bucket::slot(bytes, i);
            if off != 0 {
                out.push(h);
            }
        }
        Ok(())
    }

    /// Marks bucket `b` as verified, as a lookup does (tests that damage a bucket after
    /// it was checked).
    #[cfg(test)]
    pub(crate) fn checked_mark_for_tests(&self, b: u64) {
        self.checked.mark(b);
    }

    /// Verifies the checksum of bucket `b` unless a lookup did since it was written.
    fn check_bucket(&self, b: u64) -> Result<()> {
        if self.checked.is_checked(b) {
            return Ok(());
        }
        // A copy made word by word, atomically: this process's checkpoint may be
        // rewriting the bucket (a lookup holds no index gate; it checks the index
        // sequence after its probe, and a mismatch here is then looked at again).
        let off = self.index.bucket_off(b);
        let mut copy = [0u8; BUCKET_SIZE];
        if !self.map.copy_shared(off, &mut copy) {
            return Err(Error::corrupt(off, "index bucket outside the file"));
        }
        if !bucket_marked(&copy, self.index.style) {
            return Err(Error::corrupt(off, "index bucket zeroed or never written"));
        }
        if !crate::format::bucket_crc_ok(&copy) {
            return Err(Error::corrupt(off, "index bucket checksum mismatch"));
        }
        self.checked.mark(b);
        Ok(())
    }

    /// Header of the record at `off` (untrusted offset: bounds-checked, not checksummed).
    pub(crate) fn header(&self, off: u64) -> Result<RecordRef> {
        header_in(&self.map, off)
    }

    /// Key bytes of a record.
    pub(crate) fn key_of(&self, rec: &RecordRef) -> Result<&[u8]> {
        key_in(&self.map, rec)
    }

    /// Value bytes of a put record, after verifying the record's checksum.
    pub(crate) fn value_of(&self, rec: &RecordRef) -> Result<&[u8]> {
        if !crc_ok_in(&self.map, self.seed, rec) {
            return Err(Error::corrupt(rec.offset, "record checksum mismatch"));
        }
        self.map
            .read(rec.val_off(), u64::from(rec.val_len))
            .ok_or(Error::corrupt(rec.offset, "record value outside the file"))
    }

    /// The record at `off` if it holds `key` (decoded once, for the caller to keep).
    fn record_if_key(&self, off: u64, key: &[u8]) -> Result<Option<RecordRef>> {
        record_if_key_in(&self.map, self.seed, off, key)
    }

    /// The bytes of bucket `b` of the current index, as a slice: in the writer's
    /// process, for callers that hold the index gate, under which no bucket changes
    /// (see `Inner::change_index`); a reader process's callers validate what they read
    /// against the index sequence.
    pub(crate) fn bucket(&self, b: u64) -> Result<&[u8]> {
        let off = self.index.bucket_off(b);
        let bytes = self
            .map
            .read(off, BUCKET_SIZE as u64)
            .ok_or(Error::corrupt(off, "index bucket outside the file"))?;
        if !bucket_marked(bytes, self.index.style) {
            return Err(Error::corrupt(off, "index bucket zeroed or never written"));
        }
        Ok(bytes)
    }

    /// The newest record for `key`: a put, a delete (only from the delta), or none.
    pub(crate) fn find(&self, hash: u64, key: &[u8]) -> Result<Option<RecordRef>> {
        for (off, _) in self.delta.candidates(hash) {
            if let Some(rec) = self.record_if_key(off, key)? {
                return Ok(Some(rec));
            }
        }
        if let Some(f) = &self.frozen {
            for (off, _) in f.delta.candidates(hash) {
                if let Some(rec) = self.record_if_key(off, key)? {
                    return Ok(Some(rec));
                }
            }
        }
        self.find_in_index(hash, key)
    }

    /// True if the records at offsets `a` and `b` hold the same key (a damaged record
    /// holds no key).
    pub(crate) fn same_key(&self, a: u64, b: u64) -> bool {
        let key = |off| self.header(off).and_then(|r| self.key_of(&r));
        matches!((key(a), key(b)), (Ok(x), Ok(y)) if x == y)
    }

    /// Probes the index buckets for `hash` (unless the filter rules it out), calling
    /// `is_key` with the offset of each slot whose hash matches until it returns true.
    fn probe_index(&self, hash: u64, is_key: impl FnMut(u64) -> Result<bool>) -> Result<()> {
        if self.delta_only {
            return Ok(());
        }
        if let Some(f) = &self.filter {
            if f.ready() && !f.may_contain(hash) {
                return Ok(());
            }
        }
        let b = bucket_of(hash, self.index.buckets);
        // The bucket's first line (its magic) and the home slot's line, asked for
        // together, so the two misses overlap.
        let off = self.index.bucket_off(b);
        self.map.prefetch_lines(off, 1);
        self.map.prefetch_lines(
            off + crate::format::slot_off(crate::format::home_slot(hash)) as u64,
            crate::format::SLOT_SIZE as u64,
        );
        self.check_bucket(b)?;
        // Word by word, atomically: a bucket write (by a writer in another process, or
        // by this process's checkpoint, which takes no state lock) may be rewriting the
        // bucket; the caller checks the index sequence afterwards.
        probe_shared(&self.map, &self.index, b, hash, is_key)?;
        Ok(())
    }

    /// Where the newest record for `hash` probably is (the first candidate of the deltas
    /// or the buckets, not checked against the key): a sort key for batched lookups.
    pub(crate) fn locate(&self, hash: u64) -> Option<u64> {
        if let Some((off, _)) = self.delta.candidates(hash).next() {
            return Some(off);
        }
        if let Some((off, _)) = self
            .frozen
            .as_ref()
            .and_then(|f| f.delta.candidates(hash).next())
        {
            return Some(off);
        }
        let mut first = None;
        let _ = self.probe_index(hash, |off| {
            first = Some(off);
            Ok(true)
        });
        first
    }

    /// The put record for `key` in the index buckets (ignoring the delta), if any.
    fn find_in_index(&self, hash: u64, key: &[u8]) -> Result<Option<RecordRef>> {
        let mut found = None;
        self.probe_index(hash, |off| {
            found = self.record_if_key(off, key)?;
            Ok(found.is_some())
        })?;
        match found {
            Some(rec) if rec.kind == KIND_PUT => Ok(Some(rec)),
            Some(rec) => Err(Error::corrupt(
                rec.offset,
                "index bucket points at a delete record",
            )),
            None => Ok(None),
        }
    }

    /// The live put record for `key`, if any.
    pub(crate) fn find_live(&self, hash: u64, key: &[u8]) -> Result<Option<RecordRef>> {
        Ok(self.find(hash, key)?.filter(|r| r.kind == KIND_PUT))
    }

    /// Makes the record `rec` (already published) the newest for its key: updates the
    /// delta and the counters. Used by the write path and by replay.
    ///
    /// This does not look the key up in the index (that lookup was most of the cost of a
    /// write): a key new to the delta is counted as a new key, and [`State::resolve`]
    /// corrects the counters later, before anyone reads them.
    pub(crate) fn apply(&mut self, hash: u64, key: &[u8], rec: &RecordRef) {
        let map = &self.map;
        apply_write(
            &mut self.delta,
            &mut self.counters,
            self.delta_only,
            hash,
            rec,
            |prev| same_key_len(map, prev, key),
        );
    }

    /// Replays the log's records in `[from, to)` into the delta and the counters, as
    /// the write path applied them. `redo`, an interrupted (or running) in-place
    /// checkpoint's announced counters, is taken (see [`State::take_redo`]) where the
    /// replay passes its end; if the replay stops before it gets past that end, it is
    /// returned for the caller to judge. Also returns where and why the replay stopped.
    pub(crate) fn replay(
        &mut self,
        from: u64,
        to: u64,
        mut redo: Option<crate::format::RedoInfo>,
    ) -> (ScanEnd, Option<crate::format::RedoInfo>) {
        let map = Arc::clone(&self.map);
        let seed = self.seed;
        let end = scan(map.published_bytes(), seed, from, to, |recs| {
            if let Some(r) = redo.filter(|r| recs.first().is_some_and(|f| f.offset >= r.end)) {
                self.take_redo(r);
                redo = None;
            }
            for r in recs {
                let key = map.read(r.key_off(), u64::from(r.key_len)).unwrap_or(&[]);
                self.apply(key_hash(seed, key), key, r);
            }
        });
        (end, redo)
    }

    /// At the end of an interrupted checkpoint's range during recovery (see
    /// `RedoInfo`): the counters become the ones it announced, exact there, and the
    /// delta's entries so far count as resolved (their old records are in them).
    pub(crate) fn take_redo(&mut self, r: crate::format::RedoInfo) {
        self.delta.settle_all();
        self.counters = Counters {
            live_keys: r.live_keys,
            live_bytes: r.live_bytes,
            log_bytes: r.log_bytes,
            dead_index_bytes: r.dead_index_bytes,
        };
    }

    /// True if [`State::resolve`] can make no more progress: the counters are exact, or
    /// the only entries left belong to a frozen delta whose checkpoint failed.
    pub(crate) fn settled(&self) -> bool {
        self.delta.unresolved_len() == 0
            && self
                .frozen
                .as_ref()
                .is_none_or(|f| f.failed || f.delta.unresolved_len() == 0)
    }

    /// Looks up, in the index, up to `max` keys whose writes were applied without a lookup
    /// and takes the records they replaced out of the counters. The lookups go in bucket
    /// order, and read a record only when a bucket slot's hash matches. A damaged record
    /// or bucket counts as "no old value", as it would have on the write path.
    ///
    /// Entries of a frozen delta go first (their old records are in the buckets, and also
    /// come out of the counters its checkpoint will record); then entries of the delta,
    /// whose old records are in the frozen delta or else in the buckets.
    pub(crate) fn resolve(&mut self, mut max: usize) {
        let buckets = self.index.buckets.max(1);
        let order = |h| bucket_of(h, buckets);
        if let Some(f) = self.frozen.as_mut().filter(|f| !f.failed) {
            let claimed = claim(&mut f.delta, max, order);
            max = max.saturating_sub(claimed.len());
            let mut gone = Resolved::default();
            for (hash, off) in claimed {
                if let Ok(Some(old)) = self.old_in_index(hash, off) {
                    gone.add(&old);
                }
            }
            gone.take_from(&mut self.counters);
            if let Some(f) = self.frozen.as_mut() {
                gone.take_from(&mut f.counters);
            }
        }
        self.resolve_current(max);
    }

    /// [`State::resolve`] for the current delta only, which needs no `resolving` lock: a
    /// running checkpoint rewrites only the buckets of frozen keys, and a key in the
    /// frozen delta is resolved against its frozen record, never against a bucket.
    pub(crate) fn resolve_current(&mut self, max: usize) {
        let buckets = self.index.buckets.max(1);
        let order = |h| bucket_of(h, buckets);
        let claimed = claim(&mut self.delta, max, order);
        let mut gone = Resolved::default();
        for (hash, off) in claimed {
            if let Ok(Some(old)) = self.old_before_delta(hash, off) {
                gone.add(&old);
            }
        }
        gone.take_from(&mut self.counters);
    }

    /// The put record that the delta entry at `off` replaced: the frozen delta's record
    /// for its key if there is one, else the one in the index buckets.
    pub(crate) fn old_before_delta(&self, hash: u64, off: u64) -> Result<Option<RecordRef>> {
        if let Some(f) = &self.frozen {
            for (foff, delete) in f.delta.candidates(hash) {
                if self.same_key(foff, off) {
                    return (!delete).then(|| self.header(foff)).transpose();
                }
            }
        }
        self.old_in_index(hash, off)
    }

    /// The put record in the index buckets for the key of the record at `off`, if any.
    pub(crate) fn old_in_index(&self, hash: u64, off: u64) -> Result<Option<RecordRef>> {
        if self.delta_only {
            return Ok(None);
        }
        let bucket = self.bucket(bucket_of(hash, self.index.buckets))?;
        let mut key: Option<&[u8]> = None;
        let mut found = None;
        probe(bucket, hash, |o| {
            let k = match key {
                Some(k) => k,
                None => *key.insert(self.key_of(&self.header(off)?)?),
            };
            found = self.record_if_key(o, k)?;
            Ok::<bool, Error>(found.is_some())
        })?;
        Ok(found.filter(|r| r.kind == KIND_PUT))
    }
}

/// Probes bucket `b` of `index` for `hash` as [`probe`] does, reading its words
/// atomically one by one: for a bucket that may be rewritten meanwhile (by a writer in
/// another process, or by this process's checkpoint, which takes no state lock).
/// A slot read half before and half after a rewrite gives a wrong offset at worst,
/// which `is_key` rejects or reports; the caller validates the outcome.
pub(crate) fn probe_shared(
    map: &Mapping,
    index: &IndexGeom,
    b: u64,
    hash: u64,
    mut is_key: impl FnMut(u64) -> Result<bool>,
) -> Result<()> {
    let off = index.bucket_off(b);
    let words = map
        .shared_words(off, BUCKET_SIZE / 8)
        .ok_or(Error::corrupt(off, "index bucket outside the file"))?;
    let word = |i: usize| words[i].load(std::sync::atomic::Ordering::Relaxed);
    if index.style != crate::format::INDEX_SPARSE
        && (word(0) >> 48) as u16 != crate::format::BUCKET_MAGIC
    {
        return Err(Error::corrupt(off, "index bucket zeroed or never written"));
    }
    let slot = |i: usize| {
        let at = crate::format::slot_off(i) / 8;
        (word(at), word(at + 1))
    };
    probe_with(slot, hash, &mut is_key)?;
    Ok(())
}

/// Takes up to `max` unresolved entries of `delta` off its queue (marking them resolved),
/// ordered by `order`: (hash, offset of the entry's record).
pub(crate) fn claim(delta: &mut Delta, max: usize, order: impl Fn(u64) -> u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut offs = Vec::new();
    for hash in delta.take_unresolved(max, order) {
        offs.clear();
        delta.claim_unresolved(hash, &mut offs);
        out.extend(offs.iter().map(|&o| (hash, o)));
    }
    out
}

/// Old records found by deferred index lookups, to take out of the live counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resolved {
    keys: u64,
    bytes: u64,
}

impl Resolved {
    /// Counts `old` (a put record that a newer write replaced) as no longer live.
    pub(crate) fn add(&mut self, old: &RecordRef) {
        if old.kind == KIND_PUT {
            self.keys += 1;
            self.bytes += old.len();
        }
    }

    /// Takes the counted records out of `c`.
    pub(crate) fn take_from(self, c: &mut Counters) {
        c.live_keys = c.live_keys.saturating_sub(self.keys);
        c.live_bytes = c.live_bytes.saturating_sub(self.bytes);
    }
}
