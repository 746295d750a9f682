//! [`Iter`]: iteration over a snapshot of the live pairs.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::{decode_header_in, record_crc_ok_in, KIND_PUT, RECORD_HEADER};
use crate::index::{BucketBuf, Delta};
use crate::map::Mapping;
use crate::state::{header_in, key_in, State};

/// Iterator over the live pairs of a store as of the call to
/// [`Store::iter`](crate::Store::iter). Yields owned `(key, value)` pairs, each key once,
/// in log order. Holds the mapping it started on, so it stays valid through file growth
/// and compaction.
#[derive(Debug)]
pub struct Iter {
    map: Arc<Mapping>,
    seed: u64,
    offsets: std::vec::IntoIter<u64>,
    err: Option<Error>,
}

impl Iter {
    /// Starts an iteration over the live pairs of the read view `st`.
    pub(crate) fn new(st: &State) -> Iter {
        let (mut offsets, err) = match live_offsets(st) {
            Ok(o) => (o, None),
            Err(e) => (Vec::new(), Some(e)),
        };
        offsets.sort_unstable();
        Iter {
            map: Arc::clone(&st.map),
            seed: st.seed,
            offsets: offsets.into_iter(),
            err,
        }
    }
}

/// Offsets of the live put records (unsorted): delta puts, frozen delta puts whose key
/// the delta does not supersede, and bucket entries whose key neither supersedes.
pub(crate) fn live_offsets(st: &State) -> Result<Vec<u64>> {
    let mut deltas = vec![&st.delta];
    if let Some(f) = &st.frozen {
        deltas.push(&f.delta);
    }
    let index = (!st.delta_only).then_some(st.index.buckets);
    // The counter comes from the file: a capacity hint only, bounded.
    let hint = usize::try_from(st.counters.live_keys.min(1 << 20)).unwrap_or(0);
    collect_live(&st.map, &deltas, index, hint, |b| {
        st.bucket(b).map(BucketBuf::from_bytes)
    })
}

/// [`live_offsets`] from its parts: `deltas` newest first, then the `buckets` buckets
/// of the index (none if the index is not trusted), each read by `bucket` (which may take
/// a lock per bucket).
pub(crate) fn collect_live(
    map: &Mapping,
    deltas: &[&Delta],
    buckets: Option<u64>,
    hint: usize,
    mut bucket: impl FnMut(u64) -> Result<BucketBuf>,
) -> Result<Vec<u64>> {
    let mut offsets = Vec::with_capacity(hint);
    let newer = |deltas: &[&Delta], h: u64, off: u64| -> Result<bool> {
        for d in deltas {
            for (n, _) in d.candidates(h) {
                let (a, b) = (header_in(map, off)?, header_in(map, n)?);
                if key_in(map, &a)? == key_in(map, &b)? {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    };
    for (i, d) in deltas.iter().enumerate() {
        for e in d.iter() {
            if !e.delete() && !newer(&deltas[..i], e.hash, e.off())? {
                offsets.push(e.off());
            }
        }
    }
    for b in 0..buckets.unwrap_or(0) {
        let bucket = bucket(b)?;
        for (h, off) in bucket.entries() {
            if !newer(deltas, h, off)? {
                offsets.push(off);
            }
        }
    }
    Ok(offsets)
}

impl Iter {
    /// An iterator that yields `e` and ends.
    pub(crate) fn failed(st: &State, e: Error) -> Iter {
        Iter {
            map: Arc::clone(&st.map),
            seed: st.seed,
            offsets: Vec::new().into_iter(),
            err: Some(e),
        }
    }
}

impl Iterator for Iter {
    type Item = Result<(Vec<u8>, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.err.take() {
            return Some(Err(e));
        }
        let off = self.offsets.next()?;
        Some(read_pair(&self.map, self.seed, off))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.offsets.size_hint()
    }
}

/// Reads and verifies the put record at `off`, borrowing only its own bytes: the iterator
/// holds no lock, so it must not borrow bytes a checkpoint may be rewriting meanwhile.
fn read_pair(map: &Mapping, seed: u64, off: u64) -> Result<(Vec<u8>, Vec<u8>)> {
    let bad = || Error::corrupt(off, "index points at an invalid record");
    let hdr = map.read(off, RECORD_HEADER as u64).ok_or_else(bad)?;
    let klen = u64::from(u32::from_le_bytes([hdr[8], hdr[9], hdr[10], hdr[11]]));
    let vlen = u64::from(u32::from_le_bytes([hdr[12], hdr[13], hdr[14], hdr[15]]));
    let bytes = map
        .read(off, RECORD_HEADER as u64 + klen + vlen)
        .ok_or_else(bad)?;
    let rec = decode_header_in(bytes, off).map_err(|_| bad())?;
    if rec.kind != KIND_PUT || !record_crc_ok_in(bytes, seed, &rec) {
        return Err(bad());
    }
    let k = &bytes[RECORD_HEADER..RECORD_HEADER + klen as usize];
    let v = &bytes[RECORD_HEADER + klen as usize..];
    Ok((k.to_vec(), v.to_vec()))
}
