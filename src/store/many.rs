//! [`Store::get_many`]: many lookups, made in the order of the file.
//!
//! A cold lookup faults twice: in its index bucket, then in its record. Looked up in the
//! caller's (random) order, each fault lands somewhere new and the kernel reads around it
//! synchronously. Here a batch's buckets are probed first, in bucket order, only for
//! where each key's record is (no record is read); then the keys are looked up in the
//! order of those records. Each pass walks its region of the file forwards, and keys
//! that share a page share its fault. What it measured against single gets is in the
//! README's "What the flags cost".

use super::Store;
use crate::error::Result;
use crate::format::bucket_of;
use crate::index::key_hash;

/// Keys located per hold of the state read lock (a cold probe may wait for the disk).
const LOCATE_PIECE: usize = 64;

impl Store {
    /// The values of `keys`, in their order (`None` for a key that has none), as
    /// [`Store::get`] returns them one by one, with the lookups made in the order of the
    /// file rather than of `keys` (see the module docs). Each value is as of its own
    /// lookup, as with separate `get`s: a batch is not a snapshot.
    ///
    /// # Errors
    /// As for [`Store::get`], for the first key (in file order) that fails.
    pub fn get_many<K: AsRef<[u8]>>(&self, keys: &[K]) -> Result<Vec<Option<Vec<u8>>>> {
        let r = self.inner.check_open().and_then(|()| {
            // Bucket order, then where each key's record probably is.
            let (hashes, mut order) = {
                let st = self.inner.view()?;
                let buckets = st.index.buckets.max(1);
                let hashes: Vec<u64> = keys.iter().map(|k| key_hash(st.seed, k.as_ref())).collect();
                let order: Vec<(u64, usize)> = hashes
                    .iter()
                    .enumerate()
                    .map(|(i, &h)| (bucket_of(h, buckets), i))
                    .collect();
                (hashes, order)
            };
            order.sort_unstable();
            for piece in order.chunks_mut(LOCATE_PIECE) {
                let st = self.inner.view()?;
                for (at, i) in piece.iter_mut() {
                    *at = st.locate(hashes[*i]).unwrap_or(u64::MAX);
                }
            }
            // Record order: each lookup is made in full (the hint may be stale, or a
            // colliding key's record).
            order.sort_unstable();
            let mut out = vec![None; keys.len()];
            for (_, i) in order {
                let (st, rec) = self.inner.find_live_fresh(keys[i].as_ref())?;
                if let Some(rec) = rec {
                    out[i] = Some(st.value_of(&rec)?.to_vec());
                }
            }
            Ok(out)
        });
        self.named(r)
    }
}
