//! Rewriting index buckets: applying delta entries to bucket pages, in place or into
//! a new region.

use super::inner::Inner;
use crate::anon::AnonVec;
use crate::error::{Error, Result};
use crate::format::{bucket_of, RecordRef};
use crate::index::bucket::bucket_count;
use crate::index::DeltaEntry;
use crate::index::{probe, BucketBuf, BucketFull};
use crate::map::{FileHandle, LiveArea, Mapping};
use crate::state::{header_in, key_in, IndexGeom, Resolved};

/// A bucket slot: its index and the offset it holds.
type Slot = (usize, u64);

/// Consecutive buckets of an index region, rewritten in memory, to write with one `pwrite`.
#[derive(Default)]
pub(super) struct BucketRun {
    /// Index of the first bucket in `bytes`.
    pub(super) first: u64,
    pub(super) bytes: Vec<u8>,
}

impl BucketRun {
    /// Buckets per run (128 KiB): bounds how long one write holds the state lock. Unit
    /// tests write one bucket per run, so that they can stop a rewrite between buckets.
    const MAX: usize = if cfg!(test) { 1 } else { 32 };

    fn len(&self) -> u64 {
        (self.bytes.len() / crate::format::BUCKET_SIZE) as u64
    }

    /// True if bucket `b` can be appended to this run.
    fn extends_to(&self, b: u64) -> bool {
        self.bytes.is_empty() || (b == self.first + self.len() && self.len() < Self::MAX as u64)
    }

    /// Appends bucket `b` (the caller checked [`BucketRun::extends_to`]).
    fn push(&mut self, b: u64, buf: &BucketBuf) {
        if self.bytes.is_empty() {
            self.first = b;
        }
        self.bytes.extend_from_slice(&buf.bytes[..]);
    }
}

pub(super) enum ApplyError {
    Full,
    Other(Error),
}

impl From<Error> for ApplyError {
    fn from(e: Error) -> Self {
        ApplyError::Other(e)
    }
}

impl Inner {
    /// Applies one delta entry to `buf`, which holds the entry's bucket as of the last
    /// checkpoint plus the other entries applied so far (each key appears once in the
    /// delta, so a slot found for this key is its old, checkpointed record: if the entry
    /// is unresolved, that record is counted into `gone`). The entry's record is read only
    /// if the bucket holds a slot with the same hash (to compare keys).
    pub(super) fn apply_entry(
        map: &Mapping,
        buf: &mut BucketBuf,
        e: DeltaEntry,
        gone: &mut Resolved,
    ) -> Result<(), ApplyError> {
        let (found, old) = Self::old_slot(map, &buf.bytes[..], e)?;
        if let (true, Some(old)) = (e.unresolved(), old) {
            gone.add(&old);
        }
        if !e.delete() {
            buf.upsert(e.hash, e.off(), found.map(|f| f.0))
                .map_err(|BucketFull| ApplyError::Full)?;
        } else if let Some((i, _)) = found {
            buf.remove(i);
        }
        Ok(())
    }

    /// The slot (index, offset) and record that `bucket` holds for the key of entry `e`,
    /// if any. The entry's record is read only if the bucket holds a slot with the same
    /// hash (to compare keys).
    fn old_slot(
        map: &Mapping,
        bucket: &[u8],
        e: DeltaEntry,
    ) -> Result<(Option<Slot>, Option<RecordRef>)> {
        let mut key: Option<&[u8]> = None;
        let mut old = None;
        let found = probe(bucket, e.hash, |o| -> Result<bool> {
            let k = match key {
                Some(k) => k,
                None => *key.insert(key_in(map, &header_in(map, e.off())?)?),
            };
            let r = header_in(map, o)?;
            let hit = r.key_len as usize == k.len() && key_in(map, &r)? == k;
            old = hit.then_some(r);
            Ok(hit)
        })?;
        Ok((found, old))
    }

    /// Before an in-place checkpoint writes anything: looks up the record each entry
    /// (sorted by bucket) replaces in the buckets of `geom`, counts the unresolved ones'
    /// into `gone` and marks them settled, and checks that every bucket keeps room for
    /// its new keys. Returns false if one would overflow (the index must grow instead).
    /// Reads only, so the counters it yields can be announced in the CHECKPOINTING slot
    /// before the first bucket changes (see the checkpoint protocol).
    pub(super) fn resolve_in_place(
        map: &Mapping,
        geom: IndexGeom,
        entries: &mut [DeltaEntry],
        gone: &mut Resolved,
    ) -> Result<bool> {
        let bucket = |e: &DeltaEntry| bucket_of(e.hash, geom.buckets);
        let mut fits = true;
        for group in entries.chunk_by_mut(|a, b| bucket(a) == bucket(b)) {
            let off = geom.bucket_off(bucket(&group[0]));
            let bytes = map
                .read(off, crate::format::BUCKET_SIZE as u64)
                .ok_or(Error::corrupt(off, "index bucket outside the file"))?;
            if !crate::format::bucket_crc_ok(bytes)
                || !crate::format::bucket_marked(bytes, geom.style)
            {
                return Err(Error::corrupt(off, "index bucket checksum mismatch"));
            }
            let mut count = bucket_count(bytes);
            for e in group.iter_mut() {
                let (found, old) = Self::old_slot(map, bytes, *e)?;
                if let (true, Some(old)) = (e.unresolved(), old) {
                    gone.add(&old);
                }
                e.settle();
                match (e.delete(), found.is_some()) {
                    (false, false) => count += 1,
                    (true, true) => count -= 1,
                    _ => {}
                }
            }
            fits &= count <= crate::format::SLOTS_PER_BUCKET;
        }
        Ok(fits)
    }

    /// The delta's entries sorted by their bucket in an index of `buckets` buckets.
    pub(super) fn delta_by_bucket(&self, buckets: u64) -> AnonVec<DeltaEntry> {
        let entries = self.state.read().delta.entries();
        crate::index::sort_by_bucket(entries, buckets)
    }

    /// Takes the old records found while applying the delta out of the counters, before
    /// they are written into a checkpoint. The delta's entries then all count as resolved.
    pub(super) fn commit_resolved(&self, gone: Resolved) {
        let mut st = self.state.write();
        gone.take_from(&mut st.counters);
        st.delta.mark_all_resolved();
    }

    /// Applies `entries` (sorted by bucket) to the buckets of the current index `geom`
    /// in place. Consecutive rewritten buckets go out in one `pwrite` (each an index
    /// change: readers must not take a half-written bucket), and their write-back
    /// starts at once, so the sync that follows mostly waits for I/O already under way.
    ///
    /// `map` is a mapping that holds every record of `entries` and the region (the
    /// writer may replace the state's mapping meanwhile: this one stays valid).
    /// Only checkpoints write buckets, so the buckets read here are stable.
    pub(super) fn rewrite_buckets(
        &self,
        map: &Mapping,
        file: &FileHandle,
        geom: IndexGeom,
        entries: &[DeltaEntry],
        gone: &mut Resolved,
    ) -> Result<(), ApplyError> {
        let mut run = BucketRun::default();
        // Taken once: each run's index change then takes no state lock at all.
        let live = self.live_area();
        let live = Some(&*live);
        let bucket = |e: &DeltaEntry| bucket_of(e.hash, geom.buckets);
        for group in entries.chunk_by(|a, b| bucket(a) == bucket(b)) {
            let b = bucket(&group[0]);
            if !run.extends_to(b) {
                self.write_run(file, geom, &mut run, live)?;
            }
            let off = geom.bucket_off(b);
            let bytes = map
                .read(off, crate::format::BUCKET_SIZE as u64)
                .ok_or(Error::corrupt(off, "index bucket outside the file"))?;
            if !crate::format::bucket_crc_ok(bytes)
                || !crate::format::bucket_marked(bytes, geom.style)
            {
                // Never re-seal a damaged bucket (that would hide the damage).
                return Err(Error::corrupt(off, "index bucket checksum mismatch").into());
            }
            let mut buf = BucketBuf::from_bytes(bytes);
            for &e in group {
                Self::apply_entry(map, &mut buf, e, gone)?;
            }
            buf.seal();
            run.push(b, &buf);
        }
        self.write_run(file, geom, &mut run, live)
    }

    /// Writes the buckets collected in `run` to the index region `geom` (as an index
    /// change if `live`, the file's live area, is given: the region is visible to
    /// readers) and starts their write-back. A failed write poisons the store.
    pub(super) fn write_run(
        &self,
        file: &FileHandle,
        geom: IndexGeom,
        run: &mut BucketRun,
        live: Option<&LiveArea>,
    ) -> Result<(), ApplyError> {
        if run.bytes.is_empty() {
            return Ok(());
        }
        let off = geom.bucket_off(run.first);
        let r = if let Some(live) = live {
            // The space gate first: a `pwrite` waits for the file's inode lock, which an
            // allocation or a punch holds while it waits for the disk; that wait must
            // not happen under the index gate, where lookups would wait behind it.
            let _gate = self.space_gate.lock();
            self.change_index_in(live, || file.write_at(&run.bytes, off))
        } else {
            file.write_at(&run.bytes, off)
        };
        if let Err(e) = r {
            return Err(ApplyError::Other(self.poison::<()>(e).unwrap_err()));
        }
        // A hint: the sync that follows reports any write-back error.
        let _ = file.start_writeback(off, run.bytes.len() as u64);
        run.bytes.clear();
        #[cfg(test)]
        super::tests::bucket_run_written();
        Ok(())
    }

    /// Writes the index region `new` (zeros, not visible to readers) from the buckets of
    /// the region `old` (if any: a rebuild has none) plus `entries`, sorted by their
    /// bucket in `new`. Only non-empty buckets are written.
    pub(super) fn build_region(
        &self,
        map: &Mapping,
        file: &FileHandle,
        old: Option<IndexGeom>,
        new: IndexGeom,
        entries: &[DeltaEntry],
        gone: &mut Resolved,
    ) -> Result<(), ApplyError> {
        let buckets = new.buckets;
        let mut run = BucketRun::default();
        let mut next = 0usize;
        for nb in 0..buckets {
            let mut buf = BucketBuf::empty();
            if let Some(old) = old.filter(|o| o.buckets > 0) {
                let ob = old.buckets;
                let obytes = map
                    .read(
                        old.bucket_off(nb & (ob - 1)),
                        crate::format::BUCKET_SIZE as u64,
                    )
                    .ok_or(Error::corrupt(old.off, "index bucket outside the file"))?;
                if !crate::format::bucket_crc_ok(obytes)
                    || !crate::format::bucket_marked(obytes, old.style)
                {
                    let off = old.bucket_off(nb & (ob - 1));
                    return Err(Error::corrupt(off, "index bucket checksum mismatch").into());
                }
                let ob = BucketBuf::from_bytes(obytes);
                for (h, o) in ob.entries() {
                    if bucket_of(h, buckets) == nb {
                        buf.upsert(h, o, None)
                            .map_err(|BucketFull| ApplyError::Full)?;
                    }
                }
            }
            while next < entries.len() && bucket_of(entries[next].hash, buckets) == nb {
                Self::apply_entry(map, &mut buf, entries[next], gone)?;
                next += 1;
            }
            // Every bucket is written, empty ones too: in a sealed region a page without
            // the bucket magic is damage.
            buf.seal();
            if !run.extends_to(nb) {
                self.write_run(file, new, &mut run, None)?;
            }
            run.push(nb, &buf);
        }
        self.write_run(file, new, &mut run, None)?;
        if next != entries.len() {
            // Unreachable with sorted entries; never switch to an index that misses keys.
            return Err(ApplyError::Other(Error::Unsupported(
                "internal: delta entries left over after building the index",
            )));
        }
        Ok(())
    }
}
