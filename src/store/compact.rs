//! Compaction: rewrite the live records into a fresh file and switch to it atomically.
//!
//! # Protocol
//!
//! 1. Snapshot the live records (offsets, in log order) as of the log end `E0`, from
//!    the writes since the last checkpoint (read back from the log, or frozen into a
//!    checkpoint first if they are many), the frozen delta and the index buckets, each
//!    read in pieces under short read locks while writers go on (see [`snapshot`]).
//! 2. Without any lock: create `<name>.compact-<pid>` next to the store, lock it, and
//!    write a superblock (same seed), a right-sized sealed index, then every snapshot
//!    record re-encoded at its new offset (checksums cover the offset); `fdatasync` it.
//!    Writers go on meanwhile; the old log below `E0` never changes.
//! 3. Catch up, still without the lock: append the complete writes the old log gained
//!    since the last round (re-encoded, batches whole), and sync them, round after round
//!    until a round has less than 1 MiB to copy. Each caught-up write also goes into the
//!    new file's index delta and counters (they lie past its checkpoint, where recovery
//!    would replay them), so the switch has nothing to replay.
//! 4. Under the writer mutex: the last catch-up (what came in during the last round),
//!    then `origin_end` and the live area say where the new log ends; `fdatasync`.
//!    `rename` it over the store path, then `fsync` the directory.
//! 5. Switch the store to the new file under the exclusive state lock (pointer swaps,
//!    and the delta step 3 built). Iterators that started earlier keep the old mapping
//!    alive and finish on it. Writers waited only for step 4 and this. Then, without
//!    the writer mutex, the caught-up writes are resolved against the new index, so the
//!    counters (and automatic compaction's trigger) are exact.
//!
//! A crash before step 4 leaves the old store intact plus a temporary file, which the
//! next open deletes. A crash after step 4 leaves the new store, complete (synced before
//! the rename); whether the rename itself survived power loss depends on step 4's
//! directory sync, and either outcome is a complete store.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::grow::reservation;
use super::inner::Slots;
use super::inner::{Inner, Writer};
use crate::error::{Error, Result};
use crate::format::{
    bucket_of, checkpoint_off, decode_record, encode_checkpoint, encode_record, encode_static,
    page_up, CheckpointInfo, RecordRef, StaticInfo, PAGE, SLOTS_PER_BUCKET, STATE_CLEAN,
};
use crate::format::{
    INDEX_SEALED, LIVE_COMMITTED_OFF, LIVE_SESSION_OFF, LIVE_SWITCH_OFF, SWITCH_DONE, SWITCH_NONE,
    SWITCH_PENDING, VERSION_MAJOR,
};
use crate::index::bucket::fill_empty;
use crate::index::{BucketBuf, BucketFull, Delta};

use crate::map::{sync_dir, FileHandle, LiveArea, Mapping, TailWriter};
use crate::observe::SyncEvent;
use crate::state::{apply_write, same_key_len, Counters, FileGen, Frozen, IndexGeom};

/// Target load of a compacted index (buckets are a power of two, so the real load lies
/// between half this and this).
const COMPACT_LOAD: f64 = 0.65;

/// What a compaction produced.
pub(crate) struct Compacted {
    pub(crate) file: Arc<FileHandle>,
    pub(crate) map: Arc<Mapping>,
    pub(crate) live: Arc<LiveArea>,
    pub(crate) index: IndexGeom,
    pub(crate) log_start: u64,
    pub(crate) log_end: u64,
    pub(crate) alloc: u64,
    pub(crate) counters: Counters,
    pub(crate) ckpt: CheckpointInfo,
    /// The file's generation (see `StaticInfo::generation`).
    pub(crate) generation: u64,
    /// The caught-up writes (past `ckpt.log_end`), as the index delta recovery would
    /// replay them into: built while they were copied, installed by the switch as is.
    pub(crate) delta: Delta,
}

/// Catch-up rounds before the final one (under the writer mutex) at most; each copies (and
/// syncs) the writes made during the previous one.
const CATCH_UP_ROUNDS: usize = 16;
/// A catch-up round this short is followed by the final one: the writers' pause is then
/// bounded by copying this much, not by the store's size.
const FINAL_CATCH_UP: u64 = 1 << 20;

pub(crate) fn compact(inner: &Inner) -> Result<()> {
    if inner.opts.read_only {
        return Err(Error::ReadOnly);
    }
    inner.check_not_poisoned()?;
    // One compaction at a time (its temporary file has one name).
    let _one = inner.compacting.lock();
    // 1. A snapshot of the live records and the log end it covers, without holding a
    // lock for longer than a piece of a copy. A failed checkpoint's frozen delta is read
    // like any frozen delta (compaction is a repair too).
    let (old_map, mut offsets, mut copied) = snapshot(inner)?;
    offsets.sort_unstable();
    // The file the path names, through symlinks: that file is replaced, so a symlinked
    // path still leads to the store afterwards.
    let real = real_path(&inner.path);
    let name = real
        .file_name()
        .ok_or(Error::InvalidOption("store path has no file name"))?
        .to_string_lossy()
        .into_owned();
    let tmp = real.with_file_name(format!("{name}.compact-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| Error::io("create compaction file", e))?;
    let fail = |e: Error| {
        let _ = std::fs::remove_file(&tmp);
        e
    };
    keep_mode_and_owner(&f, &real).map_err(fail)?;
    // 2. Copy the snapshot while writers go on (the old log below `copied` never changes).
    let mut built = build(inner, &old_map, &offsets, f, &tmp).map_err(fail)?;
    drop(old_map);
    drop(offsets);
    // 3. Catch up with the writes made meanwhile, round after round, without the lock.
    for _ in 0..CATCH_UP_ROUNDS {
        let n = catch_up_round(inner, &mut built, &mut copied, &tmp, true).map_err(fail)?;
        if n <= FINAL_CATCH_UP {
            break;
        }
    }
    // 4. The last writes and the switch, under the writer mutex: a pause bounded by the
    // last round's writes, not by the store's size. A running checkpoint must end
    // first (it writes the old file's index): wait for it without the mutex, and keep
    // writers from starting another meanwhile.
    let _no_checkpoints = inner.hold_checkpoints();
    let mut tries = 0;
    let mut w = loop {
        let w = inner.writer.lock();
        let running = w.job.as_ref().is_some_and(|j| !j.thread.is_finished());
        let behind = w.end.saturating_sub(copied);
        if !running && (behind <= FINAL_CATCH_UP || tries > CATCH_UP_ROUNDS) {
            break w;
        }
        drop(w);
        if running {
            std::thread::sleep(std::time::Duration::from_millis(1));
        } else {
            // Writes came in while the checkpoint finished: another round without the
            // mutex, so the last one (under it) stays short.
            tries += 1;
            // Not folded: the writers' checkpoints are held meanwhile, so their delta
            // grows towards its hard limit while this round runs (a fold here, at 100M
            // keys, kept the writer waiting for minutes).
            catch_up_round(inner, &mut built, &mut copied, &tmp, false).map_err(fail)?;
        }
    };
    if let Err(e) = inner.check_open() {
        return Err(fail(e));
    }
    if let Err(e) = inner.finish_job(&mut w) {
        if let Err(e) = inner.check_not_poisoned() {
            return Err(fail(e));
        }
        let _ = e;
    }
    let (map, end) = {
        let st = inner.state.read();
        (Arc::clone(&st.map), w.end)
    };
    // Not folded: the writers wait for this one.
    let built = catch_up(&mut built, inner.seed, &map, copied, end, false)
        .and_then(|()| seal(inner, built, &tmp))
        .map_err(fail)?;
    // No sync may be in flight across the switch: a sync of the old file finishing after
    // the rename would be taken (and reported) as a sync of the new one.
    inner.pause_syncs();
    let r = switch(inner, &mut w, built, &tmp, &real);
    inner.resume_syncs();
    drop(w);
    if r.is_ok() {
        inner.compactions.fetch_add(1, Ordering::Relaxed);
        // The caught-up writes replaced records that are now in the new index, which
        // count as live until looked up: look them up now, a piece at a time, so the
        // dead share (and whether to compact again) is exact.
        inner.resolve_backlog();
    }
    // The old file is unlinked: closing it frees its blocks, which takes time in
    // proportion to its size (150 ms for 134 MB here). Writers must not wait for that.
    r.map(drop)
}

/// The file `path` names, through symlinks (`path` itself if it cannot be resolved).
pub(crate) fn real_path(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Gives the compaction file `f` the mode and owner of the store file `real`. The owner
/// can be kept only by its owner or root: another user who may write the store (through
/// its group, say) makes a file of their own, as any rewrite would.
fn keep_mode_and_owner(f: &std::fs::File, real: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let m = std::fs::metadata(real).map_err(|e| Error::io("stat the store file", e))?;
    if let Err(e) = std::os::unix::fs::fchown(f, Some(m.uid()), Some(m.gid())) {
        if e.kind() != std::io::ErrorKind::PermissionDenied {
            return Err(Error::io("give the compaction file the store's owner", e));
        }
    }
    f.set_permissions(std::fs::Permissions::from_mode(m.mode() & 0o7777))
        .map_err(|e| Error::io("give the compaction file the store's mode", e))
}

/// Step 1: the live records' offsets as of the log end `E0` it returns (the log end at
/// its start), with the mapping they are in: from the writes since the last checkpoint
/// (running or finished), the frozen delta, if any, and the index buckets, which
/// together cover the log up to `E0`. If the writes since the checkpoint are few (see
/// [`FEW_WRITES`]), they are read back from the log; else the live delta is frozen
/// first (a checkpoint is started for it, after the running one ends). Then no lock is
/// held for longer than a piece of a copy: the frozen delta (which gains no entries) is
/// copied in pieces, each under a short read lock, then the buckets are read one at a
/// time, each under the read lock for the moment of its copy, while writers and
/// checkpoints go on. (Cloning the deltas under the writer mutex kept a writer waiting
/// 354 ms at 20M keys.)
///
/// A checkpoint may rewrite buckets meanwhile, or finish and drop the frozen delta half
/// copied: a bucket then holds, for some keys, records newer than `E0`. That is harmless:
/// every key is taken as it stood at some moment after `E0` (from the frozen delta if it
/// has the key, else from its one bucket), and any newer record is in the log past `E0`,
/// which the catch-up copies after it. A rebuild of the index from the log (the repair of
/// a failed checkpoint) starts the snapshot over. Old index regions are not punched
/// while the buckets are read. A store whose index is in its delta alone (being rebuilt)
/// is snapshotted from the delta, under the lock.
pub(super) fn snapshot(inner: &Inner) -> Result<Snapshot> {
    let _keep_regions = inner.hold_regions();
    for _ in 0..SNAPSHOT_TRIES {
        if let Some(s) = snapshot_once(inner)? {
            return Ok(s);
        }
    }
    Err(Error::Unsupported(
        "the index was rebuilt during every compaction snapshot; try again",
    ))
}

/// A snapshot: the mapping, the live records' offsets in it, and the log end `E0` they
/// stand at.
pub(super) type Snapshot = (Arc<Mapping>, Vec<u64>, u64);

/// The live delta counts as few writes when it holds at most this fraction (1/n) of the
/// live keys: the snapshot then reads them back from the log instead of freezing them
/// (which starts a checkpoint, after waiting for the running one: at 20M keys, an
/// in-place checkpoint rewrites most of a 512 MiB index).
const FEW_WRITES: u64 = 16;

/// Snapshot attempts before compaction gives up (each is started over only by an index
/// rebuild, the repair of a failed checkpoint).
const SNAPSHOT_TRIES: usize = 4;

/// Room for the live records' offsets: the live key count (each takes at least a
/// record header of the log, which bounds a damaged count), so the list is not grown
/// by doubling, which left it up to twice its size (at 20M keys, 268 MB for 160).
fn offsets_hint(st: &crate::state::State) -> usize {
    let most = st.map.published() / crate::format::RECORD_HEADER as u64;
    usize::try_from(st.counters.live_keys.min(most)).unwrap_or(0)
}

/// One attempt of [`snapshot`]: `None` if the index was rebuilt meanwhile.
fn snapshot_once(inner: &Inner) -> Result<Option<Snapshot>> {
    let me = inner.me.get().and_then(std::sync::Weak::upgrade);
    let (map, e0, recent_from, frozen_end, index, rebuilds, hint) = loop {
        let mut w = inner.writer.lock();
        inner.check_open()?;
        {
            let st = inner.state.read();
            let hint = offsets_hint(&st);
            if st.delta_only {
                // No trusted buckets: the delta is the index. Rare (a rebuild in progress).
                let offsets = super::iter::collect_live(&st.map, &[&st.delta], None, hint, |_| {
                    Err(Error::Unsupported("internal: no buckets to read"))
                })?;
                return Ok(Some((Arc::clone(&st.map), offsets, w.end)));
            }
            if (st.delta.len() as u64).saturating_mul(FEW_WRITES) <= st.counters.live_keys {
                // The writes since the last checkpoint (running or finished) are read
                // back from the log below, which does not change: nothing to wait for
                // or start.
                break (
                    Arc::clone(&st.map),
                    w.end,
                    Some(w.ckpt_end),
                    st.frozen.as_ref().map(|f| f.end),
                    st.index,
                    inner.rebuilds.load(Ordering::Relaxed),
                    hint,
                );
            }
        }
        if w.job.as_ref().is_some_and(|j| !j.thread.is_finished()) {
            // At most one checkpoint runs: wait for it without the mutex.
            drop(w);
            std::thread::sleep(std::time::Duration::from_millis(1));
            continue;
        }
        match &me {
            // Collects the finished job (a growth it calls for starts instead: the loop
            // waits for that one) and freezes the delta for a new one.
            Some(me) => me.start_checkpoint(&mut w)?,
            None => inner.checkpoint(&mut w, crate::format::STATE_DIRTY)?,
        }
        let st = inner.state.read();
        if !st.delta.is_empty() {
            // A growth job took over: wait for it.
            drop(st);
            drop(w);
            std::thread::sleep(std::time::Duration::from_millis(1));
            continue;
        }
        let hint = offsets_hint(&st);
        break (
            Arc::clone(&st.map),
            w.end,
            None,
            st.frozen.as_ref().map(|f| f.end),
            st.index,
            inner.rebuilds.load(Ordering::Relaxed),
            hint,
        );
    };
    // The frozen delta, a piece per read lock, into a delta of our own, mapped outside
    // the lock (it gains no entries). Grown by doubling under the lock, the copy held
    // the lock while the kernel mapped and zeroed its pages: the writer waited up to
    // 40 ms for a piece at 20M keys.
    let mut entries = crate::anon::AnonVec::with_capacity(0);
    if let Some(fend) = frozen_end {
        let len = (inner.state.read().frozen.as_ref())
            .filter(|f| f.end == fend)
            .map_or(0, |f| f.delta.len());
        // (Gone before the end, because its checkpoint finished and the buckets hold
        // its entries now, or another replaced it: what was copied is enough, see
        // above.)
        (entries, _) = inner.copy_frozen(fend, crate::anon::AnonVec::with_capacity(len));
    }
    let frozen = crate::index::Delta::from_entries(&entries);
    drop(entries);
    let recent = match recent_from {
        Some(from) => recent_writes(&map, inner.seed, from, e0)?,
        None => crate::index::Delta::default(),
    };
    let deltas = [&recent, &frozen];
    let offsets = super::iter::collect_live(&map, &deltas, Some(index.buckets), hint, |b| {
        let off = index.bucket_off(b);
        // Whole: no bucket changes under the gate. Not the state lock: the writer's
        // commits do not wait for this (niced) thread to read a bucket.
        let _gate = inner.index_gate.read();
        map.read(off, crate::format::BUCKET_SIZE as u64)
            .map(BucketBuf::from_bytes)
            .ok_or(Error::corrupt(off, "index bucket outside the file"))
    })?;
    if inner.rebuilds.load(Ordering::Relaxed) != rebuilds {
        return Ok(None);
    }
    Ok(Some((map, offsets, e0)))
}

/// The newest record of each key written in `from..to` of `map`'s log (complete writes
/// only), as a delta: what the live delta held for that range, read back from the log,
/// which does not change, instead of from the delta, which does.
fn recent_writes(map: &Mapping, seed: u64, from: u64, to: u64) -> Result<crate::index::Delta> {
    let mut d = crate::index::Delta::default();
    let mut missing = None;
    let end = crate::log::scan(map.published_bytes(), seed, from, to, |recs| {
        for r in recs {
            let Some(k) = map.read(r.key_off(), u64::from(r.key_len)) else {
                missing = Some(r.offset);
                continue;
            };
            let h = crate::index::key_hash(seed, k);
            let delete = r.kind == crate::format::KIND_DELETE;
            d.set(h, r.offset, delete, true, |p| {
                same_key_len(map, p, k).is_some()
            });
        }
    });
    match missing.or((end.valid_end != to).then_some(end.valid_end)) {
        Some(at) => Err(Error::corrupt(
            at,
            "log changed under compaction's snapshot",
        )),
        None => Ok(d),
    }
}

/// `Error::Closed` once a close gave up waiting for this compaction (see
/// `Inner::cancel_compaction`).
fn check_not_cancelled(inner: &Inner) -> Result<()> {
    #[cfg(test)]
    super::tests::compaction_piece(inner);
    if inner.cancel_compaction.load(Ordering::Acquire) {
        return Err(Error::Closed);
    }
    Ok(())
}

/// One catch-up round without the writer mutex: copies what the old log gained since
/// `copied` (see [`catch_up`]) and syncs it, so that the final sync, under the mutex, has
/// only the last round's writes to wait for. Returns the bytes the round covered.
fn catch_up_round(
    inner: &Inner,
    b: &mut Built,
    copied: &mut u64,
    tmp: &Path,
    fold: bool,
) -> Result<u64> {
    check_not_cancelled(inner)?;
    let (map, end) = {
        let st = inner.state.read();
        (Arc::clone(&st.map), st.map.published())
    };
    let n = end.saturating_sub(*copied);
    let folds = b.folds;
    catch_up(b, inner.seed, &map, *copied, end, fold)?;
    inner.folds.fetch_add(b.folds - folds, Ordering::Relaxed);
    *copied = end;
    let zeroed = zero_ahead(b, n)?;
    // The header and live area say where the log ends now, with this round's sync: if
    // no write comes in before the last round, the seal under the writer mutex has
    // nothing to write or sync (it took 20 ms there at 20M keys).
    let marked = mark_end(inner, b)?;
    if n > 0 || zeroed || marked {
        b.file.sync_data()?;
        inner.notify_path(tmp, SyncEvent::File);
    }
    Ok(n)
}

/// Real zeros (allocated, written) kept ahead of the compaction file's log end by the
/// catch-up rounds, so that the last round, under the writer mutex, writes over written
/// blocks: its sync then carries data only. Appending into allocated but unwritten
/// space there made that sync convert extents and commit the journal, 45-73 ms at 50M
/// keys while the writers waited.
const ZERO_AHEAD_FINAL: u64 = 2 * FINAL_CATCH_UP + (1 << 20);

/// Writes zeros over the compaction file's next `2 * last` bytes past its log end (at
/// most [`ZERO_AHEAD_FINAL`]) where not yet written, `last` being what the round just
/// copied: the next rounds bring about as much. None while no writes come in (the file
/// then ends at its log, as a compacted file should). True if it wrote any.
fn zero_ahead(b: &mut Built, last: u64) -> Result<bool> {
    let from = b.zeroed.max(page_up(b.log_end));
    let to = page_up(b.log_end + last.saturating_mul(2).min(ZERO_AHEAD_FINAL));
    if to <= from {
        return Ok(false);
    }
    if to > b.alloc {
        b.file.allocate(b.alloc, to - b.alloc)?;
        b.alloc = to;
    }
    let zeros = vec![0u8; usize::try_from(to - from).unwrap_or(0)];
    b.file.write_at(&zeros, from)?;
    b.zeroed = to;
    Ok(true)
}

/// Appends to the compaction file the complete writes that the old log holds in
/// `from..to` (written while the copy ran), re-encoded at their new offsets, batches kept
/// whole. They lie past the new file's checkpoint, so they also go into the new file's
/// index delta and counters, as recovery would replay them: the switch installs that
/// delta instead of replaying them while writers wait.
///
/// In pieces of about [`CATCH_UP_PIECE`] of the old log, each written before the next is
/// read: a first round at 20M keys covers gigabytes of writes made during the copy, and
/// re-encoding them all in memory first made compaction's memory grow with them.
fn catch_up(b: &mut Built, seed: u64, old: &Mapping, from: u64, to: u64, fold: bool) -> Result<()> {
    let mut at = from;
    let mut piece = CATCH_UP_PIECE;
    while at < to {
        let piece_to = to.min(at.saturating_add(piece));
        let end = catch_up_piece(b, seed, old, at, piece_to)?;
        if end > at {
            at = end;
            piece = CATCH_UP_PIECE;
            if fold && b.fold_at.is_some_and(|n| b.delta.len() > n) {
                fold_delta(b)?;
            }
        } else if piece_to < to {
            // A write (a large value, a batch) or a jump over an index region reaches
            // past the piece: a larger one.
            piece = piece.saturating_mul(2);
        } else {
            return Err(Error::corrupt(
                at,
                "log changed under compaction's catch-up",
            ));
        }
    }
    Ok(())
}

/// Old log bytes a catch-up piece covers (see [`catch_up`]).
const CATCH_UP_PIECE: u64 = 16 << 20;

/// One piece of [`catch_up`]: the complete writes of `from..to`, copied. Returns where
/// they end (`to` unless a write reaches past it, which the next piece then copies).
fn catch_up_piece(b: &mut Built, seed: u64, old: &Mapping, from: u64, to: u64) -> Result<u64> {
    if to <= from {
        return Ok(from);
    }
    let mut buf = Vec::new();
    let mut pos = b.log_end;
    let mut missing = None;
    let Built {
        delta,
        counters,
        runs,
        ..
    } = b;
    let end = crate::log::scan(old.published_bytes(), seed, from, to, |recs| {
        for r in recs {
            match (
                old.read(r.key_off(), u64::from(r.key_len)),
                old.read(r.val_off(), u64::from(r.val_len)),
            ) {
                (Some(k), Some(v)) => {
                    encode_record(&mut buf, seed, pos, r.kind, r.flags, k, v, 0);
                    if runs.last().is_none_or(|&(n, o)| o + (pos - n) != r.offset) {
                        runs.push((pos, r.offset));
                    }
                    let moved = RecordRef { offset: pos, ..*r };
                    // A key's earlier caught-up record: read it where the old log has it.
                    let in_old = |p: u64| {
                        let i = runs.partition_point(|&(n, _)| n <= p).checked_sub(1)?;
                        let (n, o) = runs[i];
                        Some(o + (p - n))
                    };
                    let h = crate::index::key_hash(seed, k);
                    apply_write(delta, counters, false, h, &moved, |p| {
                        in_old(p).and_then(|o| same_key_len(old, o, k))
                    });
                    pos += r.len();
                }
                _ => missing = Some(r.offset),
            }
        }
    });
    if let Some(at) = missing {
        return Err(Error::corrupt(
            at,
            "log changed under compaction's catch-up",
        ));
    }
    let need = page_up(pos) + PAGE;
    if need > b.alloc {
        b.file.allocate(b.alloc, need - b.alloc)?;
        b.alloc = need;
    }
    b.file.write_at(&buf, b.log_end)?;
    b.log_end = pos;
    Ok(end.valid_end)
}

/// Sets the compaction file's `origin_end` and live area (committed and durable end) to
/// its log end, unless they say so already; true if it wrote (a sync must follow).
fn mark_end(inner: &Inner, b: &mut Built) -> Result<bool> {
    if b.log_end == b.info.origin_end {
        return Ok(false);
    }
    b.info.origin_end = b.log_end;
    b.file.write_at(&encode_static(&b.info), 0)?;
    b.live.store(LIVE_COMMITTED_OFF, b.log_end);
    b.live.store_durable(inner.seed, b.log_end);
    Ok(true)
}

/// Finishes a compaction file after its last catch-up: `origin_end` and the live area
/// say where its log ends now; synced; mapped.
fn seal(inner: &Inner, mut b: Built, tmp: &std::path::Path) -> Result<Compacted> {
    if mark_end(inner, &mut b)? {
        b.file.sync_data()?;
        inner.notify_path(tmp, SyncEvent::File);
    }
    let map = Arc::new(Mapping::new(
        &b.file,
        reservation(b.alloc),
        b.log_end,
        true,
    )?);
    map.advise(inner.opts.access)?;
    if inner.opts.populate {
        map.populate_read(b.log_end);
    }
    Ok(Compacted {
        file: b.file,
        map,
        live: b.live,
        index: b.index,
        log_start: b.log_start,
        log_end: b.log_end,
        alloc: b.alloc,
        counters: b.counters,
        ckpt: b.ckpt,
        generation: b.info.generation,
        delta: b.delta,
    })
}

/// What a switch replaced: the old file's mapping and handle and its deltas. Dropped once
/// no lock is held (unmapping, closing an unlinked file and freeing a large delta take
/// time).
type Replaced = (Arc<Mapping>, Arc<FileHandle>, Delta, Option<Box<Frozen>>);

fn switch(
    inner: &Inner,
    w: &mut Writer,
    built: Compacted,
    tmp: &Path,
    real: &Path,
) -> Result<Replaced> {
    // Readers in other processes follow the switch through the old file's live area:
    // marked pending before the rename (so a writer killed right after the rename still
    // leaves them a mark: they find another file at the path and follow), done after it.
    // This writer holds the lock and commits nothing meanwhile.
    let old_live = Arc::clone(&inner.state.read().live);
    old_live.store(LIVE_SWITCH_OFF, SWITCH_PENDING);
    if let Err(e) = std::fs::rename(tmp, real) {
        old_live.store(LIVE_SWITCH_OFF, SWITCH_NONE);
        let _ = std::fs::remove_file(tmp);
        return Err(Error::io("rename compacted file", e));
    }
    // Under `Always`, writes acknowledged because compaction made them durable (in the
    // new file) may lie past the old file's committed end: raise it over everything the
    // old file holds, so readers finish the old file with them before they switch.
    old_live.raise(LIVE_COMMITTED_OFF, inner.state.read().map.published());
    old_live.store(LIVE_SWITCH_OFF, SWITCH_DONE);
    inner.notify_pub(SyncEvent::Renamed);
    // From here the new file is the store; failing to sync the directory leaves the
    // rename's durability unknown, so the handle is poisoned (reopen recovers).
    if let Err(e) = sync_dir(real) {
        drop(inner.install_compacted(w, built));
        return inner.poison_pub(e);
    }
    inner.notify_pub(SyncEvent::Directory);
    Ok(inner.install_compacted(w, built))
}

/// A compaction file as [`build`] wrote it (synced, not yet mapped).
struct Built {
    file: Arc<FileHandle>,
    live: Arc<LiveArea>,
    info: StaticInfo,
    index: IndexGeom,
    log_start: u64,
    log_end: u64,
    alloc: u64,
    counters: Counters,
    ckpt: CheckpointInfo,
    /// The caught-up writes (see [`Compacted::delta`]).
    delta: Delta,
    /// Where runs of caught-up records start: (offset here, offset in the old log).
    /// Records are copied in log order, so one entry covers a run of them. Only those
    /// of the records in `delta` are needed (to compare keys with).
    runs: Vec<(u64, u64)>,
    /// Fold `delta` into the index once it holds more keys than this (see
    /// [`fold_delta`]); `None` once a fold found a bucket too full.
    fold_at: Option<usize>,
    /// The keys `delta` is prepared for (see `Delta::prepared`).
    prepared_keys: usize,
    /// A read-only mapping of this file for [`fold_delta`], kept from one fold to the
    /// next (mapping and unmapping it each time would take the address-space lock that
    /// the writer's page faults wait for).
    view: Option<Mapping>,
    /// Folds done so far.
    folds: u64,
    /// Zeros are written up to here (see [`zero_ahead`]).
    zeroed: u64,
}

/// Folds the caught-up writes in `b.delta` into the compaction file's own index buckets
/// and records a checkpoint at `b.log_end` there, then empties the delta: what a
/// checkpoint does for the store, done for a file nobody else sees yet. So the delta,
/// which the switch installs as the store's, holds at most `Built::fold_at` keys
/// (see [`fold_at`]) however many writes the compaction catches up with: at 20M
/// keys a compaction used to carry millions of them (gigabytes of memory), and the
/// first checkpoint after the switch had to write them all.
///
/// The file is not the store's until the rename, and is synced before it, so the order
/// of these writes does not matter for a crash. If a bucket would overflow (many new
/// keys came in while the file was built for fewer), nothing is written and the delta
/// keeps growing, as before: folding stops for this compaction.
fn fold_delta(b: &mut Built) -> Result<()> {
    if b.view.as_ref().is_none_or(|v| v.reserved() < b.alloc) {
        b.view = Some(Mapping::new(&b.file, reservation(b.alloc), 0, false)?);
    }
    let Some(map) = b.view.take() else {
        return Ok(());
    };
    // Everything up to the log end is written (and allocated): readable.
    map.follow_to(b.log_end);
    let mut entries = crate::index::sort_by_bucket(b.delta.entries(), b.index.buckets);
    let mut gone = crate::state::Resolved::default();
    if !Inner::resolve_in_place(&map, b.index, &mut entries, &mut gone)? {
        b.fold_at = None;
        return Ok(());
    }
    let bucket = |e: &crate::index::DeltaEntry| bucket_of(e.hash, b.index.buckets);
    let mut run: Vec<u8> = Vec::new();
    let mut run_first = 0u64;
    for group in entries.chunk_by(|x, y| bucket(x) == bucket(y)) {
        let nb = bucket(&group[0]);
        let off = b.index.bucket_off(nb);
        let bytes = map
            .read(off, crate::format::BUCKET_SIZE as u64)
            .ok_or(Error::corrupt(off, "index bucket outside the file"))?;
        let mut buf = BucketBuf::from_bytes(bytes);
        for &e in group {
            // Settled by `resolve_in_place`: nothing more is counted.
            let mut none = crate::state::Resolved::default();
            Inner::apply_entry(&map, &mut buf, e, &mut none).map_err(|e| match e {
                super::buckets::ApplyError::Full => {
                    Error::Unsupported("internal: a bucket overflowed after fitting")
                }
                super::buckets::ApplyError::Other(e) => e,
            })?;
        }
        buf.seal();
        let contiguous = run_first + (run.len() / crate::format::BUCKET_SIZE) as u64 == nb;
        if !run.is_empty() && (!contiguous || run.len() >= FOLD_RUN) {
            b.file.write_at(&run, b.index.bucket_off(run_first))?;
            run.clear();
        }
        if run.is_empty() {
            run_first = nb;
        }
        run.extend_from_slice(&buf.bytes[..]);
    }
    if !run.is_empty() {
        b.file.write_at(&run, b.index.bucket_off(run_first))?;
    }
    b.view = Some(map);
    gone.take_from(&mut b.counters);
    let c = &b.counters;
    b.ckpt = CheckpointInfo {
        seq: b.ckpt.seq + 1,
        log_end: b.log_end,
        live_keys: c.live_keys,
        live_bytes: c.live_bytes,
        log_bytes: c.log_bytes,
        dead_index_bytes: c.dead_index_bytes,
        ..b.ckpt
    };
    let slot = (b.ckpt.seq % 2) as usize;
    b.file.write_at(
        &encode_checkpoint(b.info.seed, &b.ckpt),
        checkpoint_off(slot),
    )?;
    b.delta = Delta::prepared(b.prepared_keys);
    b.runs = Vec::new();
    b.folds += 1;
    Ok(())
}

/// Caught-up keys past which [`fold_delta`] runs: 4x `checkpoint_keys` as set (or its
/// default's floor: what the writer's own delta may reach with it), or 8 keys per
/// bucket of the new index if that is more. A fold reads and rewrites most buckets
/// whatever its size, so in a large index it must carry many keys per bucket to be
/// worth it: at 100M keys (a 4 GiB index), folds of 1.8M keys each re-read the index
/// from disk while the page cache could not hold both files.
fn fold_at(checkpoint_keys: usize, buckets: u64) -> usize {
    let per_bucket = usize::try_from(buckets.saturating_mul(8)).unwrap_or(usize::MAX);
    checkpoint_keys.saturating_mul(4).max(per_bucket)
}

/// Bytes of consecutive buckets a fold writes with one `pwrite`.
const FOLD_RUN: usize = 1 << 20;

fn build(
    inner: &Inner,
    old: &Mapping,
    offsets: &[u64],
    f: std::fs::File,
    tmp: &std::path::Path,
) -> Result<Built> {
    let fh = FileHandle::lock_writer(f)?;
    let seed = inner.seed;
    let old_bytes = old.published_bytes();
    let limit = old.published();
    let mut live_bytes = 0u64;
    for &off in offsets {
        let r = decode_record(old_bytes, seed, off, limit)
            .map_err(|_| Error::corrupt(off, "live record fails its checksum during compaction"))?;
        live_bytes += r.len();
    }
    let keys = offsets.len() as u64;
    let mut buckets = ((keys as f64 / (SLOTS_PER_BUCKET as f64 * COMPACT_LOAD)).ceil() as u64)
        .max(1)
        .next_power_of_two();
    loop {
        let index = IndexGeom {
            off: PAGE,
            buckets,
            style: INDEX_SEALED,
        };
        let log_start = index.off + index.bytes();
        let log_end = log_start + live_bytes;
        let alloc = page_up(log_end) + PAGE;
        fh.allocate(0, alloc)?;
        // Records, in 1 MiB chunks; remember (hash, new offset) for the index: 16 bytes
        // a key (a bucket is the hash's low bits, so it need not be kept).
        let mut entries: Vec<(u64, u64)> = Vec::with_capacity(offsets.len());
        let mut buf = Vec::with_capacity(1 << 20);
        let mut pos = log_start;
        let mut chunk_start = log_start;
        for &off in offsets {
            let r = decode_record(old_bytes, seed, off, limit).map_err(|_| {
                Error::corrupt(off, "live record fails its checksum during compaction")
            })?;
            let key = old
                .read(r.key_off(), u64::from(r.key_len))
                .ok_or(Error::corrupt(off, "record outside the file"))?;
            let val = old
                .read(r.val_off(), u64::from(r.val_len))
                .ok_or(Error::corrupt(off, "record outside the file"))?;
            let h = crate::index::key_hash(seed, key);
            entries.push((h, pos));
            encode_record(&mut buf, seed, pos, r.kind, 0, key, val, 0);
            pos += r.len();
            if buf.len() >= 1 << 20 {
                check_not_cancelled(inner)?;
                fh.write_at(&buf, chunk_start)?;
                chunk_start = pos;
                buf.clear();
            }
        }
        fh.write_at(&buf, chunk_start)?;
        entries.sort_unstable_by_key(|&(h, pos)| (bucket_of(h, buckets), h, pos));
        let mut full = false;
        let mut next = 0;
        let write_empty = |at: u64, bytes: &[u8]| fh.write_at(bytes, index.bucket_off(at));
        let bucket = |e: &(u64, u64)| bucket_of(e.0, buckets);
        for group in entries.chunk_by(|a, b| bucket(a) == bucket(b)) {
            let b = bucket(&group[0]);
            fill_empty(next, b, write_empty)?;
            next = b + 1;
            let mut bb = BucketBuf::empty();
            for &(h, o) in group {
                if bb.upsert(h, o, None) == Err(BucketFull) {
                    full = true;
                    break;
                }
            }
            if full {
                break;
            }
            bb.seal();
            fh.write_at(&bb.bytes[..], index.bucket_off(b))?;
        }
        if !full {
            fill_empty(next, buckets, write_empty)?;
        }
        if full {
            // Astronomically unlikely at this load; retry with twice the buckets.
            buckets *= 2;
            fh.zero_range(0, alloc)?;
            continue;
        }
        let info = StaticInfo {
            seed,
            log_start,
            first_index: PAGE,
            origin_end: log_end,
            generation: inner.state.read().gen.generation + 1,
            major: VERSION_MAJOR,
        };
        fh.write_at(&encode_static(&info), 0)?;
        let counters = Counters {
            live_keys: keys,
            live_bytes,
            log_bytes: live_bytes,
            dead_index_bytes: 0,
        };
        let ckpt = CheckpointInfo {
            seq: 1,
            state: STATE_CLEAN,
            index_style: INDEX_SEALED,
            index_off: index.off,
            index_buckets: buckets,
            log_end,
            live_keys: keys,
            live_bytes,
            log_bytes: live_bytes,
            dead_index_bytes: 0,
            redo: None,
        };
        fh.write_at(&encode_checkpoint(seed, &ckpt), checkpoint_off(1))?;
        // Readers that follow the switch open this file: publish its whole log for them.
        let live = Arc::new(LiveArea::new(&fh, true)?);
        live.store(LIVE_COMMITTED_OFF, log_end);
        live.store_durable(seed, log_end);
        let sessions = inner.state.read().live.load(LIVE_SESSION_OFF);
        live.store(LIVE_SESSION_OFF, sessions);
        fh.sync_data()?;
        inner.notify_path(tmp, SyncEvent::File);
        let prepared_keys = inner
            .opts
            .checkpoint_keys_base()
            .min(usize::try_from(keys).unwrap_or(usize::MAX));
        return Ok(Built {
            file: Arc::new(fh),
            live,
            info,
            index,
            log_start,
            log_end,
            alloc,
            counters,
            ckpt,
            // Prepared here, on the compaction's thread: after the switch the writer
            // goes on with this delta, and one grown from empty had it allocate each
            // table up to 1 MiB itself (a `brk` that waits for the memory-map lock).
            delta: Delta::prepared(prepared_keys),
            runs: Vec::new(),
            fold_at: Some(fold_at(inner.opts.checkpoint_keys_base(), buckets)),
            prepared_keys,
            view: None,
            folds: 0,
            zeroed: 0,
        });
    }
}
impl Inner {
    /// Switches the store to a freshly compacted file (writer mutex held), in time that
    /// does not depend on the store's size: pointer swaps, and the delta the catch-up
    /// built. Returns what it replaced, for the caller to drop once it holds no lock.
    #[must_use]
    pub(crate) fn install_compacted(&self, w: &mut Writer, c: Compacted) -> Replaced {
        let (old_map, old_file, old_delta, old_frozen) = {
            let mut st = self.state.write();
            let old_map = std::mem::replace(&mut st.map, Arc::clone(&c.map));
            let old_file = std::mem::replace(&mut st.file, Arc::clone(&c.file));
            st.live = Arc::clone(&c.live);
            let gen = FileGen::new(Arc::clone(&c.map), c.log_end, self.seed, c.generation);
            st.gen.replaced_by(&gen);
            st.gen = gen;
            st.set_index(c.index);
            // Another file: its buckets are not the ones the filter knows.
            st.drop_filter();
            st.log_start = c.log_start;
            let old_delta = std::mem::replace(&mut st.delta, c.delta);
            let old_frozen = st.frozen.take();
            st.delta_only = false;
            st.counters = c.counters;
            self.file_gen.fetch_add(1, Ordering::AcqRel);
            // The new file has no old region of its own yet.
            self.released_index_bytes.store(0, Ordering::Relaxed);
            (old_map, old_file, old_delta, old_frozen)
        };
        w.tail = TailWriter::new(c.map);
        w.tail.publish(c.log_end);
        w.file = c.file;
        w.end = c.log_end;
        w.alloc = c.alloc;
        w.ahead_asked = c.alloc;
        w.set_ckpt_end(c.ckpt.log_end);
        (w.retry_at, w.retry_gap) = (0, 0);
        *self.slots.lock() = Slots {
            last: c.ckpt,
            pending_punch: Vec::new(),
        };
        self.checkpoint_end.store(c.ckpt.log_end, Ordering::Relaxed);
        w.dirty_marked = false;
        w.prefaulted = 0;
        w.written_back = c.log_end;
        *self.released_to.lock() = (self.file_gen.load(Ordering::Acquire), c.log_end);
        w.zeroed = c.log_end;
        // The state lock is never taken while holding the sync mutex (stats() takes them
        // the other way round).
        let writes = self.state.read().writes;
        let mut s = self.sync.lock();
        s.size_epoch = self.size_epoch.load(Ordering::Acquire);
        s.durable_end = c.log_end;
        self.durable_hint.store(c.log_end, Ordering::Release);
        s.durable_writes = writes;
        (old_map, old_file, old_delta, old_frozen)
    }
}

/// [`Store::backup`](crate::Store::backup): writes the live records of a consistent view
/// into a new store at `dst`, as compaction writes its new file, then links it into place.
///
/// The view is taken under the state lock for as long as it takes to list the live
/// records (a walk of the index); the copy itself reads the mapping the view had, which
/// stays valid and unchanged however the store moves on. Built under a temporary name in
/// `dst`'s directory (`.NAME.mapkv-new.*`, the name a store being created has, so the
/// next writer that opens `dst` deletes it if a crash left it behind), synced, then
/// hard-linked to `dst`, which must not exist: a crash leaves either no `dst` or a
/// complete one.
pub(crate) fn backup(inner: &Inner, dst: &std::path::Path) -> Result<()> {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = dst
        .file_name()
        .ok_or(Error::InvalidOption("backup path has no file name"))?
        .to_string_lossy()
        .into_owned();
    if dst.symlink_metadata().is_ok() {
        return Err(Error::io(
            "backup",
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists; a backup never overwrites a file", dst.display()),
            ),
        ));
    }
    let tmp = dst.with_file_name(format!(
        ".{name}.mapkv-new.{}.b{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| Error::io("create backup file", e))?;
    let r = copy_for_backup(inner, f, &tmp).and_then(|()| {
        std::fs::hard_link(&tmp, dst).map_err(|e| Error::io("link backup into place", e))?;
        sync_dir(dst)
    });
    let _ = std::fs::remove_file(&tmp);
    r
}

/// Writes the backup into `f`: compaction's steps 1-3 without the switch. The copy holds
/// the log up to the end of its catch-up, so everything committed before the call, and
/// a consistent state: a prefix of the writes. No lock is held for longer than a piece
/// of a copy (see `snapshot`); a reader in another process copies a stable view of its
/// index (it holds no lock a writer waits for).
fn copy_for_backup(inner: &Inner, f: std::fs::File, tmp: &Path) -> Result<()> {
    if inner.state.read().shared {
        let (map, mut offsets) = inner
            .with_stable_index(|st| Ok((Arc::clone(&st.map), super::iter::live_offsets(st)?)))?;
        offsets.sort_unstable();
        return build(inner, &map, &offsets, f, tmp).map(drop);
    }
    // Not beside a compaction: its switch would move the log under the catch-up.
    let _one = inner.compacting.lock();
    let (map, mut offsets, copied) = snapshot(inner)?;
    offsets.sort_unstable();
    let mut built = build(inner, &map, &offsets, f, tmp)?;
    drop(offsets);
    let (map, end) = {
        let st = inner.state.read();
        (Arc::clone(&st.map), st.map.published())
    };
    catch_up(&mut built, inner.seed, &map, copied, end, true)?;
    seal(inner, built, tmp).map(drop)
}
