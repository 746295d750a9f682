//! Counter resolution with the lookups made outside the state lock.
//!
//! The write path applies a put without looking its key up in the index (see
//! `State::apply`): the live counters count the key as new until a lookup finds the
//! record the put replaced. The background thread makes those lookups a piece at a
//! time while what they could find might make automatic compaction due (see
//! `Inner::backlog_may_matter`), and so do `Store::len` and `Store::stats`, which need
//! the counters exact. Made under the exclusive state lock, a piece of 256 lookups
//! that missed the CPU caches or faulted an index page in held the lock for
//! milliseconds, and the store's own threads run at a lower priority: at 20M keys a
//! writer waited up to 73 ms for one. So a piece goes in three steps, the first and
//! the last under the state lock: the writer's own, while it writes (a store thread
//! hands it those steps: see `store::handoff`), else a lock the resolving
//! thread takes itself.
//!
//! 1. [`Plan::take`], under the state lock (read), makes no lookup: it notes the next
//!    piece's unresolved entries, the frozen delta's candidates for their hashes, and
//!    what the lookups need to go on alone (the mapping, the index geometry, the key
//!    filter, the live area and the delta's id). The delta slots it reads are asked
//!    for first, with no lock held ([`Plan::peek`], [`Plan::prefetch_slots`]): the store's
//!    threads run niced, and the shorter their holds, the rarer it is that one loses
//!    its core while the writer waits for it.
//! 2. [`Plan::look_up`], with no lock, finds each entry's old record the way
//!    `State::old_before_delta` does: the frozen delta's record for the key if it has
//!    one, else the buckets' (read word by word, atomically: a checkpoint may be
//!    rewriting them).
//! 3. [`Plan::apply`], under the exclusive lock, claims the piece and takes the old
//!    records out of the counters: a few hundred nanoseconds.
//!
//! Why an outcome of step 2 still holds at step 3, when the delta is the same one (no
//! checkpoint froze it meanwhile, nothing cleared or replaced it), the mapping is the
//! same (no compaction switched files) and so is the index region (no growth):
//!
//! - What an entry still unresolved in that delta replaced is its key's newest record
//!   before the delta: the frozen delta's, if it has the key, else the buckets'.
//! - The frozen delta is the one step 1 saw (another needs a freeze, which replaces the
//!   delta). If its checkpoint ended meanwhile, its records are now the buckets' own for
//!   its keys: an answer from it still holds.
//! - No checkpoint rewrites the slot of a key outside the frozen delta. A record found
//!   for that key (holding its key) still holds, and so does the key filter's "not in
//!   the buckets" (the filter knows every key of its region's buckets). A probe that
//!   found nothing, or failed, may have read a bucket while a checkpoint rewrote it for
//!   other keys (a slot can move then): that outcome counts only if the index sequence
//!   (odd while buckets are rewritten, moved on after) was even and the same before and
//!   after the probe, as a seqlock reader checks; otherwise the entry is looked up
//!   again, under the lock.
//! - An entry the writer overwrote meanwhile has a new offset (it keeps its unresolved
//!   mark): no outcome matches it, and it is looked up under the lock.

use std::sync::Arc;

use crate::format::{bucket_of, RecordRef, KIND_PUT, LIVE_INDEX_SEQ_OFF};
use crate::index::filter::KeyFilter;
use crate::index::SlotHint;
use crate::map::{LiveArea, Mapping};
use crate::state::{claim, header_in, key_in, probe_shared, record_if_key_in, IndexGeom};
use crate::state::{Resolved, State};

/// One piece of counter resolution (see the module docs).
#[derive(Debug)]
pub(crate) struct Plan {
    map: Arc<Mapping>,
    seed: u64,
    index: IndexGeom,
    delta_only: bool,
    filter: Option<Arc<KeyFilter>>,
    live: Arc<LiveArea>,
    delta_id: u64,
    /// Where the delta's slots were at step 1, for step 3 to ask for them before it
    /// takes the lock (stale if the table grew meanwhile: a wasted prefetch).
    slots: SlotHint,
    /// How many hashes of the delta's queue the piece takes (the ones step 1 saw: the
    /// writer queues more meanwhile).
    hashes: usize,
    /// The piece's entries, in bucket order.
    entries: Vec<Entry>,
    /// The frozen delta's candidates (offset, is a delete) of each entry, `cands[from..to]`.
    cands: Vec<(u64, bool)>,
}

#[derive(Debug)]
struct Entry {
    hash: u64,
    /// Offset of the entry's record (its key is read from there).
    off: u64,
    /// Its frozen-delta candidates in `Plan::cands`.
    cands: std::ops::Range<usize>,
    /// Step 2's outcome: the put record the entry replaced, if any...
    old: Option<RecordRef>,
    /// ...and whether that outcome holds whatever the buckets did meanwhile.
    sure: bool,
}

impl Plan {
    /// Before step 1, under a read lock of its own: the hashes at the front of the
    /// current delta's queue (at most `max`, into `hashes`, which has room for them),
    /// and where the live and frozen deltas' slots for them are. Reading the queue is
    /// sequential; the slots are one cache miss each in tables of up to hundreds of MB.
    pub(crate) fn peek(
        st: &State,
        max: usize,
        hashes: &mut Vec<u64>,
    ) -> (SlotHint, Option<SlotHint>) {
        hashes.clear();
        hashes.extend(st.delta.peek_unresolved(max));
        (
            st.delta.slot_hint(),
            st.frozen.as_ref().map(|f| f.delta.slot_hint()),
        )
    }

    /// Asks for the cache lines of the slots of `hashes` (see [`Plan::peek`]), with no
    /// lock held: step 1 then reads them from the cache under its lock. (Measured at 20M
    /// keys: step 1 held the read lock 145 µs on average, nearly all of it misses.)
    pub(crate) fn prefetch_slots(hashes: &[u64], live: SlotHint, frozen: Option<SlotHint>) {
        for &h in hashes {
            if let Some(a) = live.addr(h) {
                crate::map::prefetch_read_addr(a);
            }
            if let Some(a) = frozen.and_then(|f| f.addr(h)) {
                crate::map::prefetch_read_addr(a);
            }
        }
    }

    /// Step 1 (under the state read lock): the next `max` unresolved keys of the
    /// current delta, or `None` if its queue of them is empty. (Put in bucket order by
    /// [`Plan::order`], outside the lock.)
    pub(crate) fn take(st: &State, max: usize) -> Option<Plan> {
        let mut entries = Vec::with_capacity(max);
        let mut cands = Vec::new();
        let mut hashes = 0;
        for hash in st.delta.peek_unresolved(max) {
            hashes += 1;
            for off in st.delta.unresolved_offsets(hash) {
                let from = cands.len();
                if let Some(f) = &st.frozen {
                    cands.extend(f.delta.candidates(hash));
                }
                entries.push(Entry {
                    hash,
                    off,
                    cands: from..cands.len(),
                    old: None,
                    sure: false,
                });
            }
        }
        // (A queued hash whose entries are all resolved is still claimed, which takes
        // it off the queue.)
        if st.delta.unresolved_len() == 0 {
            return None;
        }
        Some(Plan {
            map: Arc::clone(&st.map),
            seed: st.seed,
            index: st.index,
            delta_only: st.delta_only,
            filter: st.filter.clone(),
            live: Arc::clone(&st.live),
            delta_id: st.delta.id(),
            slots: st.delta.slot_hint(),
            hashes,
            entries,
            cands,
        })
    }

    /// Reads the buckets step 2 will probe into the page cache, exactly those pages
    /// (see [`Mapping::prefetch`]): for an index the page cache does not hold.
    pub(crate) fn prefetch_buckets(&self) {
        if self.delta_only {
            return;
        }
        let buckets = self.index.buckets.max(1);
        let offs: Vec<u64> = self
            .entries
            .iter()
            .map(|e| self.index.bucket_off(bucket_of(e.hash, buckets)))
            .collect();
        self.map.prefetch(&offs, crate::format::BUCKET_SIZE as u64);
    }

    /// Puts the entries in bucket order, for steps 2 and 3 (no lock held).
    pub(crate) fn order(&mut self) {
        let buckets = self.index.buckets.max(1);
        self.entries
            .sort_unstable_by_key(|e| bucket_of(e.hash, buckets));
    }

    /// Step 2 (no lock held): each entry's old record.
    pub(crate) fn look_up(&mut self) {
        for i in 0..self.entries.len() {
            let (old, sure) = self.old_record(&self.entries[i]);
            let e = &mut self.entries[i];
            e.old = old;
            e.sure = sure;
        }
    }

    /// The put record `e` replaced, and whether that holds even if the buckets were
    /// rewritten meanwhile. A damaged record counts as "no old value", as on the write
    /// path. The entry's own key is read only when a candidate needs comparing (as
    /// `State::old_in_index` does): reading it first touched every new key's record,
    /// a cache miss and, behind the tail, a page fault that mapped the released log
    /// again (and kept `POSIX_FADV_DONTNEED` from dropping it).
    fn old_record(&self, e: &Entry) -> (Option<RecordRef>, bool) {
        let map = &*self.map;
        let read_key = || header_in(map, e.off).and_then(|r| key_in(map, &r));
        let mut key = None;
        let cands = &self.cands[e.cands.clone()];
        if !cands.is_empty() {
            let Ok(k) = read_key() else {
                return (None, true);
            };
            key = Some(k);
            for &(foff, delete) in cands {
                let Ok(rec) = header_in(map, foff) else {
                    continue;
                };
                if key_in(map, &rec).is_ok_and(|fk| fk == k) {
                    return ((!delete).then_some(rec), true);
                }
            }
        }
        if self.delta_only {
            return (None, true);
        }
        if let Some(f) = &self.filter {
            if f.ready() && !f.may_contain(e.hash) {
                return (None, true);
            }
        }
        // A seqlock reader's check around the probe: the index sequence is odd while
        // a checkpoint rewrites buckets, and moves on when it is done.
        let seq = self.live.load(LIVE_INDEX_SEQ_OFF);
        let b = bucket_of(e.hash, self.index.buckets);
        let mut found = None;
        let mut damaged = false;
        let r = probe_shared(map, &self.index, b, e.hash, |o| {
            let k = match key {
                Some(k) => k,
                None => match read_key() {
                    Ok(k) => *key.insert(k),
                    Err(_) => {
                        damaged = true;
                        return Ok(true);
                    }
                },
            };
            found = record_if_key_in(map, self.seed, o, k)?;
            Ok(found.is_some())
        });
        if damaged {
            return (None, true);
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        let stable = seq.is_multiple_of(2) && self.live.load(LIVE_INDEX_SEQ_OFF) == seq;
        match (r, found) {
            (Ok(()), Some(rec)) => ((rec.kind == KIND_PUT).then_some(rec), true),
            _ => (None, stable),
        }
    }

    /// Before step 3, with no lock held: asks for the delta slots that claiming the
    /// piece rewrites, as [`Plan::prefetch_slots`] does for step 1.
    pub(crate) fn prefetch_claims(&self) {
        for e in &self.entries {
            if let Some(a) = self.slots.addr(e.hash) {
                crate::map::prefetch_write_addr(a);
            }
        }
    }

    /// Step 3 (under the exclusive state lock): claims the piece and takes the old
    /// records from the counters. Returns how many lookups it had to make itself,
    /// under the lock, or `None` if the plan no longer applies (the delta, the file or
    /// the index region changed: nothing was claimed; take a new plan). The plan is
    /// spent either way; it is left for its thread to drop (it may hold the last
    /// reference to a mapping a compaction replaced, whose unmapping takes long).
    pub(crate) fn apply(&mut self, st: &mut State) -> Option<usize> {
        if st.delta.id() != self.delta_id
            || !Arc::ptr_eq(&st.map, &self.map)
            || st.index != self.index
            || st.delta_only != self.delta_only
        {
            return None;
        }
        let mut entries = std::mem::take(&mut self.entries);
        entries.sort_unstable_by_key(|e| (e.hash, e.off));
        let buckets = st.index.buckets.max(1);
        let claimed = claim(&mut st.delta, self.hashes, |h| bucket_of(h, buckets));
        let mut gone = Resolved::default();
        let mut locked = 0;
        for (hash, off) in claimed {
            let known = entries
                .binary_search_by_key(&(hash, off), |e| (e.hash, e.off))
                .ok()
                .map(|i| &entries[i])
                .filter(|e| e.sure);
            let old = match known {
                Some(e) => e.old,
                None => {
                    locked += 1;
                    st.old_before_delta(hash, off).ok().flatten()
                }
            };
            if let Some(old) = old {
                gone.add(&old);
            }
        }
        gone.take_from(&mut st.counters);
        Some(locked)
    }
}
