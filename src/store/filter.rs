//! Building the key filter (`index::filter`) and keeping it right.
//!
//! The filter answers "surely not in the buckets" for the index region it was made for.
//! Lookups consult it after the delta (and a frozen delta), so it must know every key the
//! *buckets* can hold while no delta does. The rules:
//!
//! - **Build.** A thread of its own reads every bucket of the region (checking its CRC:
//!   a damaged bucket abandons the filter, so that lookups reach the bucket and report
//!   the damage), a chunk of buckets per hold of the index gate and the state read lock,
//!   and inserts their keys. A writer changes buckets only under the exclusive index
//!   gate, so each chunk is a consistent read; a reader in another process validates
//!   each chunk against the index sequence, as its lookups do. Only then is the filter
//!   *ready*.
//! - **In-place checkpoint** (the same region): the checkpoint inserts the keys of its
//!   frozen delta before it drops that delta (lookups find them there until then).
//!   Whatever the build read of a bucket, before or after the rewrite, the keys the
//!   rewrite added are inserted by the checkpoint itself.
//! - **Growth, rebuild, compaction** (a new region or a new file): the filter is dropped
//!   with the old region (`State::set_index`, `State::drop_filter`) and a new one built.
//! - **A reader adopting a checkpoint** of the same region: the keys the writer added to
//!   the buckets since the reader's last checkpoint are the ones of its delta, which it
//!   inserts, if its delta covers that stretch of log; otherwise it drops the filter.
//! - Deleted keys keep their bits (false positives only), and a filter that took in
//!   more keys than it was sized for is rebuilt.

use std::sync::{Arc, Weak};

use super::checkpoint::MAX_LOAD;
use super::inner::Inner;
use crate::format::{LIVE_INDEX_SEQ_OFF, SLOTS_PER_BUCKET};
use crate::index::filter::KeyFilter;
use crate::index::DeltaEntry;
use crate::state::State;

/// Smaller indexes get no filter: their few bucket pages stay in cache.
const MIN_BUCKETS: u64 = 16;
/// Buckets read per hold of the index gate and state read lock while building (256 KiB).
const CHUNK: u64 = 64;
/// A reader's chunk read again this many times because the writer kept changing the
/// index under it: the build gives up (lookups go to the buckets).
const MAX_RETRIES: u32 = 1000;

impl Inner {
    /// Makes a filter for the current index and starts its build, unless the index has
    /// one (or had one made), is too small, or filters are off.
    pub(super) fn ensure_filter(&self) {
        let keys = {
            let st = self.state.read();
            if !self.wants_filter(&st) {
                return;
            }
            // Room for the most keys the region holds before the index grows.
            let most = st.index.buckets as f64 * SLOTS_PER_BUCKET as f64 * MAX_LOAD;
            st.counters.live_keys.max(most as u64)
        };
        let made = KeyFilter::with_capacity(keys).map(Arc::new);
        let filter = {
            let mut st = self.state.write();
            if !self.wants_filter(&st) {
                return;
            }
            st.filter_tried = true;
            st.filter.clone_from(&made);
            made
        };
        let (Some(filter), Some(me)) = (filter, self.me.get().cloned()) else {
            return;
        };
        let f = Arc::clone(&filter);
        let spawned = super::threads::spawn("mapkv-filter", self.thread_nice, move || {
            build(&me, &f);
        });
        if spawned.is_err() {
            filter.abandon();
        }
    }

    /// The keys of an in-place checkpoint's frozen delta, inserted into the filter before
    /// the checkpoint drops that delta (see the module docs). `into` is the filter they
    /// went into without the state lock; under it (held by the caller), if the index has
    /// another filter now, they go into that one too.
    pub(super) fn filter_checkpointed(
        st: &mut State,
        into: Option<&Arc<KeyFilter>>,
        entries: &[DeltaEntry],
    ) {
        if let Some(now) = &st.filter {
            if !into.is_some_and(|f| Arc::ptr_eq(f, now)) {
                for e in entries {
                    now.insert(e.hash);
                }
            }
            if now.overfull() {
                st.drop_filter();
            }
        }
    }
}

impl Inner {
    /// True if the view's index should get a filter and has none yet: what a lookup
    /// checks (under the state lock it holds anyway) before [`Inner::ensure_filter`].
    #[inline]
    pub(super) fn wants_filter(&self, st: &State) -> bool {
        self.opts.key_filter
            && !st.filter_tried
            && !st.delta_only
            && st.index.buckets >= MIN_BUCKETS
    }
}

/// Inserts `entries` into the index's current filter, if any, without the state lock;
/// returns the filter they went into (for [`Inner::filter_checkpointed`]).
pub(super) fn insert_entries(inner: &Inner, entries: &[DeltaEntry]) -> Option<Arc<KeyFilter>> {
    let f = inner.state.read().filter.clone()?;
    for e in entries {
        f.insert(e.hash);
    }
    Some(f)
}

/// The build (see the module docs): stops early if the store is gone or the index got
/// another filter.
fn build(me: &Weak<Inner>, f: &Arc<KeyFilter>) {
    let mut next = 0u64;
    let mut hashes = Vec::new();
    let mut retries = 0;
    loop {
        let Some(inner) = me.upgrade() else { return };
        // A writer's store changes its buckets under the gate (taken before the state
        // lock); a reader's checks its writer's index sequence below.
        let gate = inner.index_gate.read();
        let st = inner.state.read();
        if !st.filter.as_ref().is_some_and(|g| Arc::ptr_eq(g, f)) {
            return;
        }
        if next >= st.index.buckets {
            f.set_ready();
            return;
        }
        let end = (next + CHUNK).min(st.index.buckets);
        let seq = st
            .shared
            .then(|| super::follow::stable_index_seq(&st.live, &st.file));
        hashes.clear();
        let read = (next..end).try_for_each(|b| st.bucket_hashes(b, &mut hashes));
        let consistent = seq.is_none_or(|s| {
            std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
            st.live.load(LIVE_INDEX_SEQ_OFF) == s && s % 2 == 0
        });
        drop(st);
        drop(gate);
        if !consistent {
            retries += 1;
            if retries > MAX_RETRIES {
                f.abandon();
                return;
            }
            std::thread::yield_now();
            continue;
        }
        if read.is_err() {
            // A damaged bucket: lookups must reach it to report the damage.
            f.abandon();
            return;
        }
        for &h in &hashes {
            f.insert(h);
        }
        next = end;
    }
}
