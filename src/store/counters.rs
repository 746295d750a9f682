//! Exact live counters: settling the index lookups the write path deferred.

use super::inner::Inner;

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
}
