//! [`Store::get_many`]: many lookups, made in the order of the file.
//!
//! A cold lookup faults twice: in its index bucket, then in its record. Looked up in the
//! caller's (random) order, each fault lands somewhere new and the kernel reads around it
//! synchronously. Here a batch's lookups go in bucket order, then its values are read in
//! record order: the faults walk each region forwards, which the kernel's read-ahead
//! recognizes (it reads ahead asynchronously while the walk goes on), and keys that share
//! a page share its fault. What it measured against single gets is in the README's "What
//! the flags cost".

use super::Store;
use crate::error::Result;
use crate::format::bucket_of;
use crate::index::key_hash;

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
            // Bucket order.
            let mut order: Vec<(u64, usize)> = {
                let st = self.inner.view()?;
                let buckets = st.index.buckets.max(1);
                keys.iter()
                    .enumerate()
                    .map(|(i, k)| (bucket_of(key_hash(st.seed, k.as_ref()), buckets), i))
                    .collect()
            };
            order.sort_unstable();
            let mut found = Vec::with_capacity(keys.len());
            for &(_, i) in &order {
                if let (_, Some(rec)) = self.inner.find_live_fresh(keys[i].as_ref())? {
                    found.push((rec.offset, i));
                }
            }
            // Record order. The lookup is made again (the record may have been replaced
            // meanwhile; its page is the one just found, so this costs no fault).
            found.sort_unstable();
            let mut out = vec![None; keys.len()];
            for (_, i) in found {
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
