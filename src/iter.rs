//! [`Iter`]: iteration over a snapshot of the live pairs.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::decode_record;
use crate::index::BucketBuf;
use crate::map::Mapping;
use crate::state::State;
use crate::store::Inner;

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
    pub(crate) fn new(inner: &Inner) -> Iter {
        let st = inner.state.read();
        let (mut offsets, err) = match live_offsets(&st) {
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

/// Offsets of the live put records (unsorted): delta puts, plus bucket entries whose key
/// the delta does not supersede.
pub(crate) fn live_offsets(st: &State) -> Result<Vec<u64>> {
    let mut offsets = Vec::with_capacity(usize::try_from(st.counters.live_keys).unwrap_or(0));
    for (_, off, delete) in st.delta.iter() {
        if !delete {
            offsets.push(off);
        }
    }
    if st.delta_only {
        return Ok(offsets);
    }
    for b in 0..st.index.buckets {
        let bucket = BucketBuf::from_bytes(st.bucket(b)?);
        for (h, off) in bucket.entries() {
            let mut superseded = false;
            for (d, _) in st.delta.candidates(h) {
                let (a, b) = (st.header(off)?, st.header(d)?);
                if st.key_of(&a)? == st.key_of(&b)? {
                    superseded = true;
                    break;
                }
            }
            if !superseded {
                offsets.push(off);
            }
        }
    }
    Ok(offsets)
}

impl Iterator for Iter {
    type Item = Result<(Vec<u8>, Vec<u8>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.err.take() {
            return Some(Err(e));
        }
        let off = self.offsets.next()?;
        let bytes = self.map.published_bytes();
        Some(
            decode_record(bytes, self.seed, off, bytes.len() as u64)
                .map_err(|_| Error::corrupt(off, "index points at an invalid record"))
                .and_then(|r| {
                    let k = self.map.read(r.key_off(), u64::from(r.key_len));
                    let v = self.map.read(r.val_off(), u64::from(r.val_len));
                    match (k, v) {
                        (Some(k), Some(v)) => Ok((k.to_vec(), v.to_vec())),
                        _ => Err(Error::corrupt(off, "record outside the file")),
                    }
                }),
        )
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.offsets.size_hint()
    }
}
