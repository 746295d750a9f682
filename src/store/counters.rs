//! Exact live counters: settling the index lookups the write path deferred.

use super::inner::Inner;
use crate::state::{IndexGeom, Resolved};

/// Deferred index lookups done per hold of the state lock (see `resolve_counters`):
/// a few milliseconds at most.
pub(super) const RESOLVE_CHUNK: usize = 16_384;

impl Inner {
    /// [`Inner::resolve_counters`] for a caller that holds `resolving`.
    pub(crate) fn resolve_counters_locked(&self) -> crate::state::Counters {
        loop {
            {
                let st = self.state.read();
                if st.settled() {
                    return st.counters;
                }
            }
            let mut st = self.state.write();
            st.resolve(RESOLVE_CHUNK);
            if st.settled() {
                return st.counters;
            }
        }
    }

    /// Settles every deferred lookup with one pass over the index `geom`: each bucket is
    /// read once when the index is large (the entries are sorted by bucket first), and no
    /// delta lookups are needed (unlike the queue that `resolve_counters` works through).
    /// The caller holds the writer and `resolving`.
    pub(super) fn resolve_by_buckets(&self, geom: IndexGeom) -> crate::state::Counters {
        // An index that fits in the cache is probed in the delta's own order.
        const SORT_ABOVE: u64 = 8 << 20;
        let entries = if geom.bytes() > SORT_ABOVE {
            self.delta_by_bucket(geom.buckets)
        } else {
            self.state.read().delta.entries()
        };
        let mut gone = Resolved::default();
        {
            let st = self.state.read();
            for e in entries.iter().filter(|e| e.unresolved()) {
                // A damaged bucket or record counts as "no old value".
                if let Ok(Some(old)) = st.old_in_index(e.hash, e.off()) {
                    gone.add(&old);
                }
            }
        }
        // The delta stays in use (the checkpoint that wanted these counts may fail): keys
        // added later must still start unresolved.
        let mut st = self.state.write();
        gone.take_from(&mut st.counters);
        st.delta.settle_all();
        st.counters
    }
}
