//! The reader-visible state of a store: the mapping, where the index is, the delta of
//! changes since the last checkpoint, and the live counters. Lives behind the store's
//! `RwLock`; readers hold the read lock for as long as they borrow mapped bytes.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::{
    bucket_of, decode_record_header, record_crc_ok, RecordRef, BUCKET_SIZE, KIND_DELETE, KIND_PUT,
};
use crate::index::{probe, Delta};
use crate::map::{FileHandle, Mapping};

/// Where the current index region is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexGeom {
    /// Offset of bucket 0.
    pub(crate) off: u64,
    /// Number of buckets (a power of two).
    pub(crate) buckets: u64,
}

impl IndexGeom {
    pub(crate) fn bucket_off(&self, b: u64) -> u64 {
        self.off + b * BUCKET_SIZE as u64
    }
    pub(crate) fn bytes(&self) -> u64 {
        self.buckets * BUCKET_SIZE as u64
    }
}

/// Live counters, kept exact by every write, replay and checkpoint.
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
    /// The buckets in the file are not trustworthy (read-only open of a store whose
    /// checkpoint was interrupted): the delta holds the whole index.
    pub(crate) delta_only: bool,
    pub(crate) counters: Counters,
    /// Writes applied since open (a batch counts once).
    pub(crate) writes: u64,
}

impl State {
    /// Header of the record at `off` (untrusted offset: bounds-checked, not checksummed).
    pub(crate) fn header(&self, off: u64) -> Result<RecordRef> {
        decode_record_header(self.map.published_bytes(), off, self.map.published())
            .map_err(|_| Error::corrupt(off, "index points at an invalid record"))
    }

    /// Key bytes of a record.
    pub(crate) fn key_of(&self, rec: &RecordRef) -> Result<&[u8]> {
        self.map
            .read(rec.key_off(), u64::from(rec.key_len))
            .ok_or(Error::corrupt(rec.offset, "record key outside the file"))
    }

    /// Value bytes of a put record, after verifying the record's checksum.
    pub(crate) fn value_of(&self, rec: &RecordRef) -> Result<&[u8]> {
        if !record_crc_ok(self.map.published_bytes(), self.seed, rec) {
            return Err(Error::corrupt(rec.offset, "record checksum mismatch"));
        }
        self.map
            .read(rec.val_off(), u64::from(rec.val_len))
            .ok_or(Error::corrupt(rec.offset, "record value outside the file"))
    }

    /// The record at `off` if it holds `key` (decoded once, for the caller to keep).
    fn record_if_key(&self, off: u64, key: &[u8]) -> Result<Option<RecordRef>> {
        let rec = self.header(off)?;
        if rec.kind != KIND_PUT && rec.kind != KIND_DELETE {
            return Err(Error::corrupt(off, "index points at a non-data record"));
        }
        let hit = rec.key_len as usize == key.len() && self.key_of(&rec)? == key;
        Ok(hit.then_some(rec))
    }

    /// The bytes of bucket `b` of the current index.
    pub(crate) fn bucket(&self, b: u64) -> Result<&[u8]> {
        let off = self.index.bucket_off(b);
        self.map
            .read(off, BUCKET_SIZE as u64)
            .ok_or(Error::corrupt(off, "index bucket outside the file"))
    }

    /// The newest record for `key`: a put, a delete (only from the delta), or none.
    pub(crate) fn find(&self, hash: u64, key: &[u8]) -> Result<Option<RecordRef>> {
        for (off, _) in self.delta.candidates(hash) {
            if let Some(rec) = self.record_if_key(off, key)? {
                return Ok(Some(rec));
            }
        }
        if self.delta_only {
            return Ok(None);
        }
        let bucket = self.bucket(bucket_of(hash, self.index.buckets))?;
        let mut found = None;
        probe(bucket, hash, |off| {
            found = self.record_if_key(off, key)?;
            Ok::<bool, Error>(found.is_some())
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
    /// A damaged old record (or index entry) only skews the counters: the new record is
    /// valid and must become visible, so a failed lookup counts as "no old value".
    pub(crate) fn apply(&mut self, hash: u64, key: &[u8], rec: &RecordRef) -> Result<()> {
        let old = self.find_live(hash, key).unwrap_or(None);
        let c = &mut self.counters;
        c.log_bytes += rec.len();
        if let Some(old) = old {
            c.live_bytes = c.live_bytes.saturating_sub(old.len());
            c.live_keys = c.live_keys.saturating_sub(1);
        }
        if rec.kind == KIND_PUT {
            c.live_bytes += rec.len();
            c.live_keys += 1;
        }
        let map = &self.map;
        self.delta
            .set(hash, rec.offset, rec.kind == KIND_DELETE, |prev| {
                decode_record_header(map.published_bytes(), prev, map.published())
                    .ok()
                    .and_then(|p| map.read(p.key_off(), u64::from(p.key_len)))
                    .is_some_and(|k| k == key)
            });
        Ok(())
    }
}
