//! Readers in other processes: a read-only store follows its writer through the live
//! area of the file (see `docs/FORMAT.md`, "Readers in other processes").
//!
//! A reader's view is recovery run in memory: the index buckets as of some checkpoint,
//! plus a delta replayed from that checkpoint's log end up to the *committed end* the
//! writer publishes. Before every call, a reader compares three words of the live area
//! with what its view was built from (two loads on one cache line when nothing changed):
//!
//! - the committed end moved: replay the log from the view's end to it (catching up
//!   costs what was written, not the store's size), remapping if the file grew past the
//!   mapping;
//! - the index sequence moved: re-read the checkpoint slot (the writer rewrote buckets,
//!   switched to a new index region or punched an old one) and adopt its index;
//! - the switch word says compaction replaced the file: open the file now at the path.
//!
//! A lookup reads bucket words atomically and checks afterwards that the index sequence
//! has not moved; if it has, the bytes it read may be a mix, so it catches up and tries
//! again. No reader registers anywhere: the writer never waits for readers, and a dead
//! reader leaves nothing behind.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLockReadGuard;

use super::inner::Inner;
use crate::error::{Error, Result};
use crate::format::{
    RecordRef, LIVE_COMMITTED_OFF, LIVE_INDEX_SEQ_OFF, LIVE_SESSION_OFF, LIVE_SWITCH_OFF,
    SWITCH_NONE, SWITCH_PENDING,
};
use crate::index::key_hash;
use crate::log::{scan, StopReason};
use crate::map::{FileHandle, LiveArea, Mapping};
use crate::state::State;

/// How long a reader waits for an odd index sequence (a bucket write in progress, which
/// takes microseconds) before it asks whether the writer is still alive.
const ODD_PATIENCE: Duration = Duration::from_millis(2);

/// The index sequence once it is even (no bucket write in progress). If it stays odd and
/// no writer holds the lock, the writer died in the middle of a write: its buckets are
/// each whole (a killed process never leaves a page half copied) and nobody changes them
/// until the next writer, whose open moves the sequence on; the odd value is returned.
pub(super) fn stable_index_seq(live: &LiveArea, file: &FileHandle) -> u64 {
    let start = Instant::now();
    loop {
        let s = live.load(LIVE_INDEX_SEQ_OFF);
        if s.is_multiple_of(2) {
            return s;
        }
        if start.elapsed() >= ODD_PATIENCE {
            if !file.writer_alive() {
                return s;
            }
            std::thread::sleep(Duration::from_micros(50));
        } else {
            std::thread::yield_now();
        }
    }
}

/// What a reader's view is missing, from the live area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Behind {
    Nothing,
    /// Replay the log and/or adopt a newer checkpoint.
    Changes,
    /// The file was (or is being) replaced: reopen the path.
    Switch,
}

fn behind(st: &State) -> Behind {
    let live = &st.live;
    match live.load(LIVE_SWITCH_OFF) {
        SWITCH_NONE => {}
        SWITCH_PENDING => {
            // Compaction is renaming a new file over this one. Its writer holds the lock
            // and commits nothing until the rename is done, so this file is still the
            // store, unless that writer died: after renaming (the path names another
            // file, and nothing will ever mark this one done: follow it), or before (a
            // stale mark, remembered so that it costs no system call per read).
            let stale = st.seen.stale_pending == Some(live.load(LIVE_SESSION_OFF));
            if !stale && !st.file.writer_alive() {
                return Behind::Switch;
            }
        }
        _ => return Behind::Switch,
    }
    let committed = live.load(LIVE_COMMITTED_OFF);
    let seq = live.load(LIVE_INDEX_SEQ_OFF);
    if committed != st.seen.committed || seq != st.seen.index_seq {
        Behind::Changes
    } else {
        Behind::Nothing
    }
}

impl Inner {
    /// The view to read from: for a writer's own store, its state; for a reader, its
    /// state brought up to what the writer committed before this call.
    ///
    /// One catch-up pass: it replays up to the committed end it reads, which covers
    /// every write committed before the call started. (Looping until nothing is new
    /// would never end beside a writer that commits as fast as a reader replays.)
    pub(super) fn view(&self) -> Result<RwLockReadGuard<'_, State>> {
        let st = self.state.read();
        if !st.shared || behind(&st) == Behind::Nothing {
            return Ok(st);
        }
        drop(st);
        self.catch_up()?;
        Ok(self.state.read())
    }

    /// The newest live record for `key` in a fresh view, with the view (whose guard
    /// keeps the record's bytes readable). A reader retries when the writer changed the
    /// index while it probed.
    pub(super) fn find_live_fresh(
        &self,
        key: &[u8],
    ) -> Result<(RwLockReadGuard<'_, State>, Option<RecordRef>)> {
        let (seed, hash) = self.lookup_hint.prefetch(key);
        loop {
            let st = self.view()?;
            if self.wants_filter(&st) {
                // The first lookup of this index that may reach its buckets.
                drop(st);
                self.ensure_filter();
                continue;
            }
            self.lookup_hint.refresh(&st);
            // The view's seed: a reader may have followed its path to another file.
            let hash = if st.seed == seed {
                hash
            } else {
                key_hash(st.seed, key)
            };
            if st.shared {
                let found = st.find_live(hash, key);
                if self.index_unchanged(&st) {
                    LookupHint::found(matches!(found, Ok(Some(_))));
                    return found.map(|r| (st, r));
                }
                continue;
            }
            // The writer's own store: its bucket writes take no state lock (see
            // `Inner::change_index`), so a probe is checked against them as a reader
            // in another process checks its writer's.
            let seq = self.index_seq.begin();
            #[cfg(test)]
            super::tests::lookup_hook(self, false);
            let found = st.find_live(hash, key);
            #[cfg(test)]
            super::tests::lookup_hook(self, true);
            if self.index_seq.unchanged_since(seq) {
                LookupHint::found(matches!(found, Ok(Some(_))));
                return found.map(|r| (st, r));
            }
            drop(st);
            return self.find_live_gated(key);
        }
    }

    /// [`Inner::find_live_fresh`] in the writer's own store behind the index gate, where
    /// no bucket changes: for a lookup that met a bucket write in progress (which takes
    /// microseconds while its thread runs).
    fn find_live_gated(
        &self,
        key: &[u8],
    ) -> Result<(RwLockReadGuard<'_, State>, Option<RecordRef>)> {
        let _gate = self.index_gate.read();
        let st = self.view()?;
        self.gated_lookups.fetch_add(1, Ordering::Relaxed);
        let found = st.find_live(key_hash(st.seed, key), key);
        LookupHint::found(matches!(found, Ok(Some(_))));
        found.map(|r| (st, r))
    }

    /// True if the index sequence still is the one the view was built on: everything
    /// read from the buckets since then is one consistent version of each bucket.
    pub(super) fn index_unchanged(&self, st: &State) -> bool {
        // Orders the bucket loads before the sequence load (the seqlock read side).
        fence(Ordering::Acquire);
        st.live.load(LIVE_INDEX_SEQ_OFF) == st.seen.index_seq
    }

    /// Runs `f` on a fresh view until the index did not change under it (a reader's
    /// whole-index reads: iteration, verification, counters).
    pub(super) fn with_stable_index<R>(&self, f: impl Fn(&State) -> Result<R>) -> Result<R> {
        loop {
            let st = self.view()?;
            if !st.shared {
                drop(st);
                // No bucket changes while the gate is held (taken before the state lock).
                let _gate = self.index_gate.read();
                return f(&*self.view()?);
            }
            let r = f(&st);
            if self.index_unchanged(&st) {
                return r;
            }
        }
    }

    /// Brings a reader's view up to the live area (under the exclusive state lock).
    fn catch_up(&self) -> Result<()> {
        let mut st = self.state.write();
        if behind(&st) == Behind::Switch {
            self.follow_switch(&mut st)?;
        }
        // The slot first, then the committed end: a checkpoint raises the committed end
        // over everything its buckets refer to before it writes the slot and moves the
        // sequence (release), so this order sees an end that covers the adopted index.
        let seq = stable_index_seq(&st.live, &st.file);
        if seq != st.seen.index_seq {
            self.adopt_checkpoint(&mut st, seq)?;
        }
        let committed = st.live.load(LIVE_COMMITTED_OFF);
        let pos = st.map.published();
        if committed > pos {
            // A checkpoint adopted past the view's end covers what lies before it: the
            // replay starts there, and the view still becomes readable up to the end.
            let from = pos.max(st.seen.base).min(committed);
            replay(&mut st, from, committed)?;
        }
        // `committed < pos`: a dead writer's uncommitted tail, which this view keeps, as
        // the next writer's recovery does; a new writer publishes its end when its
        // recovery is done (until then it commits nothing). The view never goes back.
        st.seen.committed = committed;
        st.seen.session = st.live.load(LIVE_SESSION_OFF);
        Ok(())
    }

    /// Reads the current checkpoint slot and takes its index.
    fn adopt_checkpoint(&self, st: &mut State, seq: u64) -> Result<()> {
        let len = st.file.len()?;
        let (_, best) = super::open::read_superblock(&st.file, len)?;
        let Some((c, _)) = best else {
            if self.index_unchanged_since(st, seq) {
                // No slot write in flight: both slots are damaged.
                return Err(Error::corrupt(
                    crate::format::checkpoint_off(0),
                    "both checkpoint slots are damaged",
                ));
            }
            // A slot write raced the read: the caller reads them again.
            return Ok(());
        };
        if !self.index_unchanged_since(st, seq) {
            return Ok(());
        }
        // Adopting a slot means buckets may have been rewritten: check them anew.
        st.set_index(crate::state::IndexGeom {
            off: c.index_off,
            buckets: c.index_buckets,
            style: c.index_style,
        });
        st.delta_only = false;
        st.seen.index_seq = seq;
        st.seen.ckpt_state = c.state;
        st.seen.ckpt_counters = crate::state::Counters {
            live_keys: c.live_keys,
            live_bytes: c.live_bytes,
            log_bytes: c.log_bytes,
            dead_index_bytes: c.dead_index_bytes,
        };
        st.seen.redo = c.redo;
        if c.log_end != st.seen.ckpt_end {
            // The keys this checkpoint added to the buckets, into the filter: the writes
            // from the last adopted checkpoint's end to this one's, which the delta holds
            // if it reaches that far (else the filter is made anew).
            let prev = st.seen.ckpt_end;
            if let Some(f) = st.filter.clone() {
                if prev != 0 && st.seen.base <= prev && st.map.published() >= c.log_end {
                    for e in st.delta.iter() {
                        f.insert(e.hash);
                    }
                } else {
                    st.drop_filter();
                }
            }
            // A new checkpoint: its buckets and counters are exact up to its `log_end`,
            // so the view's delta starts over there (which also keeps the delta, and the
            // counters, from counting the checkpointed writes twice). Costs a replay of
            // what was written after the checkpoint's end, the same as recovery.
            st.seen.ckpt_end = c.log_end;
            let exact = crate::state::Counters {
                live_keys: c.live_keys,
                live_bytes: c.live_bytes,
                log_bytes: c.log_bytes,
                dead_index_bytes: c.dead_index_bytes,
            };
            rebase(st, c.log_end, exact, c.redo);
        }
        Ok(())
    }

    /// A reader's exact counters: the adopted checkpoint's (exact at its end), plus the
    /// writes after it, each looked up in the checkpoint's buckets. Done afresh on a
    /// stable index: while the writer rewrites buckets (CHECKPOINTING), a lookup could
    /// find a newer record than the one a write replaced, so it waits for the checkpoint
    /// to finish (a few milliseconds to seconds), then counts; the writer never waits.
    /// Costs a replay of the log written since the checkpoint.
    pub(super) fn reader_counters(&self) -> crate::state::Counters {
        for _ in 0..10_000 {
            let Ok(st) = self.view() else { break };
            let (seq, busy) = (
                st.seen.index_seq,
                st.seen.ckpt_state == crate::format::STATE_CHECKPOINTING && st.file.writer_alive(),
            );
            drop(st);
            if busy {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            let mut st = self.state.write();
            if st.seen.index_seq != seq {
                continue;
            }
            let (end, exact) = (st.seen.ckpt_end, st.seen.ckpt_counters);
            if end == 0 {
                // A view rebuilt from the whole log (no usable checkpoint): its delta
                // holds every key; settle it.
                st.resolve(usize::MAX);
                return st.counters;
            }
            let redo = st.seen.redo;
            rebase(&mut st, end, exact, redo);
            st.resolve(usize::MAX);
            let c = st.counters;
            if self.index_unchanged(&st) {
                return c;
            }
        }
        self.state.read().counters
    }

    fn index_unchanged_since(&self, st: &State, seq: u64) -> bool {
        fence(Ordering::Acquire);
        st.live.load(LIVE_INDEX_SEQ_OFF) == seq
    }

    /// Follows compaction to the file now at the path (or stays, if the switch did not
    /// happen: the path still names this file).
    fn follow_switch(&self, st: &mut State) -> Result<()> {
        let here = st.file.identity()?;
        let there = std::fs::metadata(&self.path).map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        });
        match there {
            Ok(id) if id == here => {
                // A compaction that died before its rename: this file is still the
                // store, and the next writer clears the mark. Nothing to follow.
                st.seen.stale_pending = Some(st.live.load(LIVE_SESSION_OFF));
                Ok(())
            }
            _ => {
                // Finish this file first: everything its writer committed before the
                // switch (it commits nothing after marking it), so followers of its
                // changes miss none; then link the new file after it.
                let committed = st.live.load(LIVE_COMMITTED_OFF);
                let pos = st.map.published();
                if committed > pos {
                    replay(st, pos, committed)?;
                }
                let fresh = self.reopen_state()?;
                // A file in between was never opened here (the path named it only while
                // this reader did not call the store): its changes are lost to followers.
                // (Generation 0: a file that does not say.)
                let next = st.gen.generation + 1;
                if fresh.gen.generation != 0 && fresh.gen.generation != next {
                    fresh.gen.after_gap.store(true, Ordering::Release);
                }
                st.gen.replaced_by(&fresh.gen);
                *st = fresh;
                Ok(())
            }
        }
    }

    /// A reader's view of the file now at the path, as a fresh open builds it.
    fn reopen_state(&self) -> Result<State> {
        let fresh = super::open::open(&self.path, self.opts.clone())?;
        *self.recovery.lock() = fresh.recovery.lock().clone();
        Ok(fresh.state.into_inner())
    }
}

/// Replays the committed writes in `[from, to)` into the view (recovery in memory).
fn replay(st: &mut State, from: u64, to: u64) -> Result<()> {
    // `to` comes from the file (the live area): the mapping reserves far more than the
    // file holds, and a scan past the file's end would touch unbacked pages (SIGBUS).
    let len = st.file.len()?;
    if len < to {
        return Err(Error::corrupt(
            to,
            "the writer's committed end lies past the end of the file",
        ));
    }
    if to > st.map.reserved() {
        let map = Arc::new(Mapping::new(
            &st.file,
            super::grow::reservation(len),
            from,
            false,
        )?);
        st.gen.remapped(&map);
        st.map = map;
    }
    let map = Arc::clone(&st.map);
    // Readable up to `to` for the scan; on failure, back to `from`.
    map.follow_to(to);
    let seed = st.seed;
    let log_bytes = st.counters.log_bytes;
    let end = scan(map.published_bytes(), seed, from, to, |recs| {
        for r in recs {
            let key = map.read(r.key_off(), u64::from(r.key_len)).unwrap_or(&[]);
            st.apply(key_hash(seed, key), key, r);
        }
        st.writes += 1;
    });
    if end.valid_end != to || !matches!(end.stop, StopReason::End) {
        map.follow_to(end.valid_end);
        return Err(Error::corrupt(
            end.valid_end,
            "damaged record below the writer's committed end",
        ));
    }
    // `apply` counted the records; the scan's total also has the JUMP records.
    st.counters.log_bytes = log_bytes + end.bytes;
    Ok(())
}

/// Rebuilds a reader's delta from `ckpt_end` (a checkpoint it adopted) to its end, so the
/// entries the checkpoint's buckets now hold are dropped.
fn rebase(
    st: &mut State,
    ckpt_end: u64,
    exact: crate::state::Counters,
    redo: Option<crate::format::RedoInfo>,
) {
    let map = Arc::clone(&st.map);
    let to = map.published();
    let old = (std::mem::take(&mut st.delta), st.counters, st.seen.base);
    st.counters = exact;
    st.seen.base = ckpt_end;
    if ckpt_end >= to {
        // Everything the view holds is in the checkpoint; the next replay starts there.
        return;
    }
    let (end, redo) = st.replay(ckpt_end, to, redo);
    if let Some(r) = redo.filter(|r| r.end == end.valid_end) {
        st.take_redo(r);
    }
    if end.valid_end == to {
        st.counters.log_bytes = exact.log_bytes + end.bytes;
    } else {
        // Keep the old delta (it is still right, only larger).
        (st.delta, st.counters, st.seen.base) = old;
    }
}

/// What a lookup needs to ask for its filter block before it takes the state lock: the
/// seed and the filter layout of the view the last lookup used. A miss then costs about
/// one memory access, overlapped with the lock's own work, instead of one after it.
/// Only a hint: a stale one computes a useless address, which a prefetch tolerates.
/// Read by every lookup and written almost never, it has a cache line of its own, so
/// that the writer's counters cannot share (and keep invalidating) it.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct LookupHint {
    seed: std::sync::atomic::AtomicU64,
    base: std::sync::atomic::AtomicUsize,
    blocks: std::sync::atomic::AtomicU64,
    /// Address of bucket 0 of the view's index in this process, and its bucket count
    /// (0: no buckets to hint at).
    index_addr: std::sync::atomic::AtomicUsize,
    index_buckets: std::sync::atomic::AtomicU64,
}

std::thread_local! {
    /// Whether this thread's last lookup found its key (see [`LookupHint::prefetch`]).
    static LAST_FOUND: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

impl LookupHint {
    /// Hashes `key` with the hinted seed and prefetches its filter block; returns the
    /// seed and the hash.
    fn prefetch(&self, key: &[u8]) -> (u64, u64) {
        let seed = self.seed.load(Ordering::Relaxed);
        let hash = key_hash(seed, key);
        let blocks = self.blocks.load(Ordering::Relaxed);
        if blocks != 0 {
            let base = self.base.load(Ordering::Relaxed);
            crate::map::prefetch_read_addr(crate::index::filter::block_addr(base, blocks, hash));
        }
        let buckets = self.index_buckets.load(Ordering::Relaxed);
        if buckets != 0 && LAST_FOUND.with(std::cell::Cell::get) {
            // After a hit, expect another: ask for the bucket's first line (its magic)
            // and its home slot's line now, so that their misses overlap the filter
            // block's instead of following it. After a miss, expect another: the filter
            // alone answers it, and these lines would only cost it a page walk.
            let bucket = self.index_addr.load(Ordering::Relaxed).wrapping_add(
                crate::format::bucket_of(hash, buckets) as usize * crate::format::BUCKET_SIZE,
            );
            crate::map::prefetch_read_addr(bucket);
            crate::map::prefetch_read_addr(
                bucket.wrapping_add(crate::format::slot_off(crate::format::home_slot(hash))),
            );
        }
        (seed, hash)
    }

    /// Notes whether this thread's lookup found its key, for its next [`prefetch`].
    ///
    /// [`prefetch`]: LookupHint::prefetch
    fn found(found: bool) {
        LAST_FOUND.with(|c| c.set(found));
    }

    /// Makes the hint wrong in every field (unit tests only).
    #[cfg(test)]
    pub(super) fn scramble(&self) {
        self.seed.fetch_xor(0x5a5a, Ordering::Relaxed);
        self.base.store(4096, Ordering::Relaxed);
        self.blocks.store(3, Ordering::Relaxed);
        self.index_addr.store(8192, Ordering::Relaxed);
        self.index_buckets.store(1 << 20, Ordering::Relaxed);
        LookupHint::found(true);
    }

    /// The hinted seed, filter layout and index (unit tests only).
    #[cfg(test)]
    pub(super) fn get(&self) -> (u64, usize, u64, usize, u64) {
        (
            self.seed.load(Ordering::Relaxed),
            self.base.load(Ordering::Relaxed),
            self.blocks.load(Ordering::Relaxed),
            self.index_addr.load(Ordering::Relaxed),
            self.index_buckets.load(Ordering::Relaxed),
        )
    }

    /// Brings the hint up to `st` (its seed, its filter once ready).
    fn refresh(&self, st: &State) {
        let (base, blocks) = st
            .filter
            .as_ref()
            .filter(|f| f.ready())
            .map_or((0, 0), |f| f.layout());
        let (index_addr, index_buckets) = if st.delta_only || st.index.buckets == 0 {
            (0, 0)
        } else {
            (
                st.map.base_addr().wrapping_add(st.index.off as usize),
                st.index.buckets,
            )
        };
        if self.seed.load(Ordering::Relaxed) != st.seed
            || self.base.load(Ordering::Relaxed) != base
            || self.blocks.load(Ordering::Relaxed) != blocks
            || self.index_addr.load(Ordering::Relaxed) != index_addr
            || self.index_buckets.load(Ordering::Relaxed) != index_buckets
        {
            self.seed.store(st.seed, Ordering::Relaxed);
            self.base.store(base, Ordering::Relaxed);
            self.blocks.store(blocks, Ordering::Relaxed);
            self.index_addr.store(index_addr, Ordering::Relaxed);
            self.index_buckets.store(index_buckets, Ordering::Relaxed);
        }
    }
}
