//! Opening a store: create, read the superblock, pick the checkpoint, replay the log tail
//! (or rebuild the index), erase a torn tail.
//!
//! # Recovery protocol
//!
//! 1. Read the static header: wrong magic is [`Error::NotAStore`], another major or a
//!    newer minor version is [`Error::Version`], a bad checksum is [`Error::Corrupt`].
//! 2. Decode both checkpoint slots; the valid one with the highest `seq` is current.
//!    A slot torn by a crash fails its checksum, so the previous one is used; every
//!    protocol step keeps the previous slot's state recoverable.
//! 3. If the current slot is CHECKPOINTING (a checkpoint was rewriting buckets), or with
//!    `salvage` when the checkpoint is unusable, the buckets are not trusted: the index is
//!    rebuilt from the whole log, starting at the static header's `log_start`.
//!    Otherwise the buckets describe every record before `log_end`.
//! 4. Scan the log from the start point, following JUMP records, applying every complete
//!    write (whole batches only) to the in-memory delta. The scan stops at the first
//!    offset with no valid record: zeros after a clean close, a torn record after a crash.
//!    An invalid record before the checkpoint's `log_end` cannot come from a crash (that
//!    region was synced), so it is [`Error::Corrupt`] unless `salvage` is on.
//! 5. Read-write opens of a store that was not closed cleanly then zero everything from
//!    the valid end to the end of the file (so a stale record can never become reachable
//!    again once new records are appended in front of it), and write a fresh CLEAN
//!    checkpoint, so the next open is O(1) again.

use std::fs::OpenOptions;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::inner::{Inner, Writer};
use crate::error::{Error, Result};
use crate::format::{
    checkpoint_off, decode_checkpoint, decode_static, encode_checkpoint, encode_static, page_up,
    CheckpointInfo, HeaderError, RedoInfo, StaticInfo, MAGIC, PAGE, SECTOR, STATE_CHECKPOINTING,
    STATE_CLEAN,
};
use crate::format::{
    LIVE_COMMITTED_OFF, LIVE_INDEX_SEQ_OFF, LIVE_SESSION_OFF, LIVE_SWITCH_OFF, SWITCH_NONE,
};
use crate::index::{key_hash, Delta};
use crate::log::{durable_evidence, scan, ScanEnd, StopReason};
use crate::map::{sync_dir, FileHandle, LiveArea, Mapping, TailWriter};
use crate::options::{Options, MIN_FILE_SIZE};
use crate::state::{Counters, FileGen, IndexGeom, Seen, State};
use crate::stats::RecoveryReport;

fn random_seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// Lays out an empty store in `fh` (which is empty): index, log start, headers; syncs.
fn init_store(fh: &FileHandle, opts: &Options) -> Result<()> {
    let size = page_up(opts.initial_size).max(MIN_FILE_SIZE);
    let buckets = (size / 8 / PAGE).max(1);
    let buckets = if buckets.is_power_of_two() {
        buckets
    } else {
        buckets.next_power_of_two() / 2
    };
    let log_start = PAGE + buckets * PAGE;
    let size = size.max(log_start + PAGE);
    fh.allocate(0, size)?;
    let seed = random_seed();
    let info = StaticInfo {
        seed,
        log_start,
        first_index: PAGE,
        origin_end: log_start,
        generation: 0,
        major: crate::format::VERSION_MAJOR,
    };
    fh.write_at(&encode_static(&info), 0)?;
    crate::index::bucket::fill_empty(0, buckets, |b, bytes| fh.write_at(bytes, PAGE + b * PAGE))?;
    let c = CheckpointInfo {
        seq: 1,
        state: STATE_CLEAN,
        index_style: crate::format::INDEX_SEALED,
        index_off: PAGE,
        index_buckets: buckets,
        log_end: log_start,
        ..CheckpointInfo::default()
    };
    fh.write_at(&encode_checkpoint(seed, &c), checkpoint_off(1))?;
    fh.sync_data()
}

/// Creates a new store at `path` atomically: built and synced under a temporary name, then
/// linked into place (fails if someone else created `path` first: `Ok(None)`).
fn create_new(path: &Path, opts: &Options) -> Result<Option<FileHandle>> {
    let name = path
        .file_name()
        .ok_or(Error::InvalidOption("store path has no file name"))?
        .to_string_lossy()
        .into_owned();
    let tmp = path.with_file_name(format!(
        ".{name}.mapkv-new.{}.{:x}",
        std::process::id(),
        random_seed()
    ));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp)
        .map_err(|e| Error::io("create", e))?;
    let result = (|| {
        let fh = FileHandle::lock_writer(f)?;
        init_store(&fh, opts)?;
        match std::fs::hard_link(&tmp, path) {
            Ok(()) => {
                sync_dir(path)?;
                Ok(Some(fh))
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(Error::io("link", e)),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Removes leftovers of an interrupted compaction or creation next to `path`.
fn cleanup_leftovers(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let name = name.to_string_lossy();
    let compact_prefix = format!("{name}.compact-");
    let create_prefix = format!(".{name}.mapkv-new.");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let n = e.file_name();
        let n = n.to_string_lossy();
        if n.starts_with(&compact_prefix) || n.starts_with(&create_prefix) {
            // A compaction or creation that crashed before renaming or linking its file
            // into place. We hold the lock of the store's current file, so no writer of
            // this store is running; still, a file whose writer lock is held belongs to
            // a live process (a creation in progress): leave that alone.
            let orphan = OpenOptions::new()
                .read(true)
                .open(e.path())
                .is_ok_and(|f| f.try_lock().is_ok() && !FileHandle::unlocked(f).writer_alive());
            if orphan {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

pub(crate) fn open(path: &Path, opts: Options) -> Result<Inner> {
    opts.validate()?;
    if opts.read_only {
        // A reader takes no lock and changes nothing: not the file, not its directory.
        let f = OpenOptions::new()
            .read(true)
            .open(path)
            .map_err(|e| Error::io("open", e))?;
        return load(path.to_path_buf(), opts, Arc::new(FileHandle::unlocked(f)));
    }
    // The memory the default checkpoint size depends on, read here once per process
    // rather than by a write under the store's locks.
    let _ = crate::options::physical_memory();
    // Compaction renames a new file over the path. A handle that was opened just before
    // and locked just after holds the old, unlinked file: check and retry. Leftovers are
    // cleaned up only once the lock held is the current file's (cleaning up before that
    // deleted a running writer's compaction file).
    for _ in 0..8 {
        let fh = open_writer(path, &opts)?;
        if same_file(path, &fh)? {
            cleanup_leftovers(&super::compact::real_path(path));
            return load(path.to_path_buf(), opts, Arc::new(fh));
        }
    }
    Err(Error::locked())
}

fn same_file(path: &Path, fh: &FileHandle) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let a = fh.file().metadata().map_err(|e| Error::io("fstat", e))?;
    match std::fs::metadata(path) {
        Ok(b) => Ok(a.dev() == b.dev() && a.ino() == b.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io("stat", e)),
    }
}

/// Opens (or creates) the file at `path` for writing and takes its writer lock.
fn open_writer(path: &Path, opts: &Options) -> Result<FileHandle> {
    let fh = {
        let existing = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => Some(FileHandle::lock_writer(f)?),
            // `Options::create(false)`: nothing is created (`Store::open` names the file).
            Err(e) if e.kind() == io::ErrorKind::NotFound && !opts.create => {
                return Err(Error::io("open", e))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => create_new(path, opts)?,
            Err(e) => return Err(Error::io("open", e)),
        };
        let fh = match existing {
            Some(fh) => fh,
            None => {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(|e| Error::io("open", e))?;
                FileHandle::lock_writer(f)?
            }
        };
        if fh.len()? == 0 {
            // Checked under the writer lock: only `create(true)` turns an empty file into
            // a store.
            if !opts.create {
                return Err(Error::not_a_store(0));
            }
            init_store(&fh, opts)?;
        }
        fh
    };
    Ok(fh)
}

/// Where the replay ended, once [`past_stop`] has told damage from a torn tail.
struct Tail {
    /// The last segment's scan, with `bytes` and `writes` summed over every segment and
    /// the damaged ranges between them.
    end: ScanEnd,
    /// The durable end recovery established (0 if unknown).
    durable: u64,
    /// Damaged ranges passed by a salvage: each holds no valid record.
    damaged: Vec<std::ops::Range<u64>>,
    /// Bytes of durable log lost to damage (salvage only).
    lost: u64,
    /// Where a salvage cut the log because the damage reaches the end of what survives.
    cut: Option<u64>,
}

/// Decides what the replay's stop is. A stop at or above the durable end is a torn tail
/// (or the end of the log); below it nothing can be torn, so it is damage: an
/// [`Error::Corrupt`], or with `salvage` the damaged bytes are passed and the replay goes
/// on at the next valid record. The durable end is `known` (the live area's durable end,
/// the checkpoint's log end) or, when the stop lies above it, the highest watermark of
/// the valid records past the stop (after a power loss the live area can be older than
/// the log). `trusted` (a clean close, or a view beside a live writer) skips that search.
fn past_stop(
    st: &mut State,
    map: &Mapping,
    first: ScanEnd,
    limit: u64,
    known: u64,
    salvage: bool,
    trusted: bool,
) -> Result<Tail> {
    let seed = st.seed;
    let bytes = map.published_bytes();
    let mut tail = Tail {
        end: first,
        durable: known,
        damaged: Vec::new(),
        lost: 0,
        cut: None,
    };
    loop {
        let seg = tail.end;
        let stop_at = match seg.stop {
            StopReason::End | StopReason::IncompleteBatch(_) => seg.valid_end,
            StopReason::Invalid(p, _) | StopReason::BadJump(p) => p,
        };
        if !trusted && tail.durable <= stop_at && stop_at < limit {
            tail.durable = tail
                .durable
                .max(durable_evidence(bytes, seed, stop_at, limit));
        }
        if stop_at >= tail.durable {
            return Ok(tail);
        }
        if !salvage {
            return Err(Error::corrupt(
                stop_at,
                if seg.stop == StopReason::End && stop_at >= limit {
                    "the file ends below the log's durable end (it was cut)"
                } else {
                    "damaged log below its durable end; the records after it are kept in \
                     the file, and open with salvage skips the damaged ones"
                },
            ));
        }
        let from = if seg.stop == StopReason::End {
            stop_at
        } else {
            stop_at + 1
        };
        let Some(next) = crate::log::next_record(bytes, seed, from, limit) else {
            // The damage reaches the end of what survives: keep the valid prefix.
            tail.lost += tail.durable.min(limit).saturating_sub(stop_at);
            tail.cut = Some(seg.valid_end);
            return Ok(tail);
        };
        tail.damaged.push(stop_at..next.offset);
        let more = scan(bytes, seed, next.offset, limit, |recs| {
            for r in recs {
                let key = map.read(r.key_off(), u64::from(r.key_len)).unwrap_or(&[]);
                st.apply(key_hash(seed, key), key, r);
            }
        });
        tail.lost += next.offset - stop_at;
        tail.end = ScanEnd {
            valid_end: more.valid_end,
            bytes: seg.bytes + (next.offset - stop_at) + more.bytes,
            writes: seg.writes + more.writes,
            skipped: seg.skipped + more.skipped,
            stop: more.stop,
        };
    }
}

/// Covers `at..to` (damaged bytes a salvage passed) with padding records (kind PAD, whose
/// checksum covers only their header).
fn write_padding(fh: &FileHandle, seed: u64, at: u64, to: u64) -> Result<()> {
    let header = crate::format::RECORD_HEADER as u64;
    let max = u64::from(u32::MAX) + header;
    let mut pos = at;
    while pos < to {
        let mut len = (to - pos).min(max);
        if to - pos > len && to - pos - len < header {
            len -= header; // leave room for the last padding record's header
        }
        if len < header {
            return Err(Error::corrupt(
                at,
                "damaged range too short to pad (not a record boundary)",
            ));
        }
        fh.write_at(&crate::format::encode_padding(seed, pos, len), pos)?;
        pos += len;
    }
    Ok(())
}

/// True if the log holds no record at `off` (end of file, or a zero record header there).
fn nothing_after(fh: &FileHandle, off: u64, len: u64) -> Result<bool> {
    if off >= len {
        return Ok(true);
    }
    let mut hdr = [0u8; crate::format::RECORD_HEADER];
    let n = (len - off).min(hdr.len() as u64) as usize;
    fh.read_at(&mut hdr[..n], off)?;
    Ok(hdr[..n].iter().all(|&b| b == 0))
}

fn header_error(e: HeaderError) -> Error {
    match e {
        HeaderError::BadMagic => Error::not_a_store(0),
        HeaderError::Version(major, minor) => Error::version(
            (major, minor),
            (crate::format::VERSION_MAJOR, crate::format::VERSION_MINOR),
        ),
        HeaderError::Corrupt(what) => Error::corrupt(0, what),
    }
}

/// Reads the superblock page and returns the static info and the current checkpoint (if
/// any slot is valid) with the offset of its slot.
pub(crate) fn read_superblock(
    fh: &FileHandle,
    len: u64,
) -> Result<(StaticInfo, Option<(CheckpointInfo, u64)>)> {
    let mut sb = vec![0u8; usize::try_from(len.min(PAGE)).unwrap_or(0)];
    fh.read_at(&mut sb, 0)?;
    if sb.len() < MAGIC.len() || sb[..MAGIC.len()] != MAGIC {
        return Err(Error::not_a_store(0));
    }
    let info = decode_static(&sb).map_err(header_error)?;
    let mut best: Option<(CheckpointInfo, u64)> = None;
    for slot in 0..2 {
        let off = checkpoint_off(slot);
        let bytes = sb.get(off as usize..(off + SECTOR) as usize).unwrap_or(&[]);
        if let Some(c) = decode_checkpoint(info.seed, bytes) {
            if best.is_none_or(|(b, _)| c.seq > b.seq) {
                best = Some((c, off));
            }
        }
    }
    Ok((info, best))
}

fn load(path: PathBuf, opts: Options, fh: Arc<FileHandle>) -> Result<Inner> {
    let len = fh.len()?;
    if len == 0 {
        return Err(Error::not_a_store(0));
    }
    let reader = opts.read_only;
    // A reader notes the index sequence before it reads the checkpoint slot: a slot
    // written meanwhile moves it, and the first lookup then reads the slot again. (Only
    // mapped, never written, before the superblock says this is a store.)
    let live = if len >= PAGE {
        Some(Arc::new(LiveArea::new(&fh, !reader)?))
    } else {
        None
    };
    let seen_seq = match &live {
        Some(live) if reader => super::follow::stable_index_seq(live, &fh),
        _ => 0,
    };
    let (info, best) = read_superblock(&fh, len)?;
    let seed = info.seed;
    let salvage = opts.salvage;
    let mut report = RecoveryReport::default();
    // Cut inside the index region: no log to salvage, and a rebuild would start past the
    // end of the file (tests/damaged.rs `salvage_of_a_file_cut_inside_its_index`).
    if len < info.log_start {
        return Err(Error::corrupt(
            len,
            "file ends before the log starts (nothing to salvage)",
        ));
    }

    let Some(live) = live else {
        return Err(Error::corrupt(len, "file ends inside the superblock page"));
    };
    if !reader && live.load(LIVE_INDEX_SEQ_OFF) % 2 == 1 {
        // A writer killed while it changed the index left the sequence odd: even it
        // before anything else, so readers stop waiting for that writer.
        live.add(LIVE_INDEX_SEQ_OFF, 1);
    }

    let (ckpt, mut full) = match best {
        Some((c, slot_off)) => {
            let idx_end = c
                .index_buckets
                .checked_mul(PAGE)
                .and_then(|b| b.checked_add(c.index_off));
            let fits = idx_end.is_some_and(|e| e <= len)
                && c.log_end <= len
                && c.log_end >= info.log_start;
            if !fits && !salvage {
                return Err(Error::corrupt(
                    slot_off,
                    "checkpoint points outside the file",
                ));
            }
            // An interrupted in-place checkpoint is redone if it announced its result
            // (see `redo_is_whole` below), else the index is rebuilt.
            let interrupted = c.state == STATE_CHECKPOINTING && c.redo.is_none();
            (c, !fits || interrupted || salvage)
        }
        None if salvage => (
            CheckpointInfo {
                index_off: PAGE,
                index_buckets: ((info.log_start - PAGE) / PAGE).max(1),
                log_end: info.log_start,
                ..CheckpointInfo::default()
            },
            true,
        ),
        None => {
            return Err(Error::corrupt(
                checkpoint_off(0),
                "both checkpoint slots are damaged",
            ))
        }
    };
    report.was_clean = ckpt.state == STATE_CLEAN && best.is_some();

    let map = Arc::new(Mapping::new(
        &fh,
        super::grow::reservation(len),
        len,
        !opts.read_only,
    )?);
    // A reader beside a live writer sees what that writer committed, no more (under
    // `Always`, records past it are not durable yet). With no writer, the log's valid
    // end: what the next writer's recovery will keep.
    let committed = live.load(LIVE_COMMITTED_OFF);
    let live_writer = reader && committed != 0 && fh.writer_alive();
    let limit = if live_writer { committed.min(len) } else { len };
    map.advise(opts.access)?;

    // A checkpoint interrupted in the middle of its bucket rewrite: every bucket it
    // touched holds the keys written in `log_end..redo.end`. Replaying from `log_end`
    // puts them all in the delta (so lookups never read those buckets' slots for them)
    // and the announced counters are exact at `redo.end`. Only torn buckets (power loss)
    // force a rebuild. Beside a live writer, buckets may be changing: lookups check them.
    let mut redo = ckpt
        .redo
        .filter(|_| !full && ckpt.state == STATE_CHECKPOINTING);
    if let Some(r) = redo {
        if !live_writer && !redo_is_whole(&map, seed, &ckpt, r, limit) {
            full = true;
            redo = None;
        }
    }
    report.redid_checkpoint = redo.is_some();

    // Replay the records after the checkpoint (all of them for a full rebuild). A damaged
    // index is found by the recovery checkpoint, which then rebuilds it from the log.
    let (state, scan_end) = {
        let mut st = State {
            map: Arc::clone(&map),
            file: Arc::clone(&fh),
            seed,
            log_start: info.log_start,
            index: IndexGeom {
                off: ckpt.index_off,
                buckets: ckpt.index_buckets,
                style: ckpt.index_style,
            },
            delta: Delta::default(),
            frozen: None,
            delta_only: full,
            counters: if full {
                Counters::default()
            } else {
                Counters {
                    live_keys: ckpt.live_keys,
                    live_bytes: ckpt.live_bytes,
                    log_bytes: ckpt.log_bytes,
                    dead_index_bytes: ckpt.dead_index_bytes,
                }
            },
            writes: 0,
            live: Arc::clone(&live),
            shared: reader,
            seen: Seen {
                index_seq: seen_seq,
                ckpt_end: if full { 0 } else { ckpt.log_end },
                ckpt_state: ckpt.state,
                ckpt_counters: Counters {
                    live_keys: ckpt.live_keys,
                    live_bytes: ckpt.live_bytes,
                    log_bytes: ckpt.log_bytes,
                    dead_index_bytes: ckpt.dead_index_bytes,
                },
                redo,
                base: if full { info.log_start } else { ckpt.log_end },
                session: live.load(LIVE_SESSION_OFF),
                committed,
                stale_pending: None,
            },
            gen: FileGen::new(Arc::clone(&map), info.origin_end, seed, info.generation),
            checked: crate::state::BucketChecks::for_buckets(ckpt.index_buckets),
            filter: None,
            filter_tried: false,
        };
        let start = if full { info.log_start } else { ckpt.log_end };
        if !full && (start >= limit || nothing_after(&fh, start, limit)?) {
            // Clean close: read one record header with pread instead of faulting in the
            // mapping (a cold fault pulls in megabytes of read-around).
            let end = crate::log::ScanEnd {
                valid_end: start,
                bytes: 0,
                writes: 0,
                skipped: 0,
                stop: StopReason::End,
            };
            (st, end)
        } else {
            let (end, redo) = st.replay(start, limit, redo);
            if let Some(r) = redo {
                st.take_redo(r);
            }
            (st, end)
        }
    };
    let beside_writer = reader && limit < len;
    if beside_writer && scan_end.valid_end < limit {
        // Below what a live writer committed nothing is torn: it is damage.
        return Err(Error::corrupt(
            scan_end.valid_end,
            "damaged record below the writer's committed end",
        ));
    }
    // Tell a torn tail from damage: a stop below the durable end is damage.
    let mut known_durable =
        live.checked_durable(seed)
            .max(if best.is_some() { ckpt.log_end } else { 0 });
    if live_writer {
        // The live writer may have grown the file and raised its durable end since this
        // view read the length and the committed end it stops at: the view claims
        // nothing past its limit.
        known_durable = known_durable.min(limit);
    }
    let mut state = state;
    let tail = past_stop(
        &mut state,
        &map,
        scan_end,
        limit,
        known_durable,
        salvage,
        report.was_clean || beside_writer,
    )?;
    let scan_end = tail.end;
    report.rebuilt_index = full;
    report.replayed_writes = scan_end.writes;
    report.durable_end = tail.durable;
    report.damaged.clone_from(&tail.damaged);
    // Replay counted record bytes; the scan also saw the JUMP records, which the live
    // write path counts too. Use the scan's total so the two agree.
    state.counters.log_bytes = if full { 0 } else { ckpt.log_bytes } + scan_end.bytes;
    let valid_end = scan_end.valid_end;
    report.salvaged_bytes = tail.lost;
    if scan_end.stop != StopReason::End || tail.cut.is_some() {
        report.truncated_at = Some(valid_end);
    }
    if full && scan_end.stop != StopReason::End && best.is_none() {
        report.salvaged_bytes += len - valid_end;
    }
    if !tail.damaged.is_empty() && !opts.read_only {
        // Cover the damaged bytes with padding records, so that later scans (a rebuild,
        // a reader, `verify`) pass them too.
        for r in &tail.damaged {
            write_padding(&fh, seed, r.start, r.end)?;
        }
    }
    // Index regions claimed behind JUMPs in the replayed log are dead, unless one is
    // the current index (a growth finished after its claim: it lies past `log_end`), or
    // the region a rebuild is about to replace (its claim counts it).
    let replayed_from = if full { info.log_start } else { ckpt.log_end };
    let current = ckpt.index_buckets.saturating_mul(PAGE);
    let current_replayed = ckpt.index_off > replayed_from && ckpt.index_off < scan_end.valid_end;
    let mut crash_dead =
        scan_end
            .skipped
            .saturating_sub(if current_replayed { current } else { 0 });
    if full && ckpt.index_off != PAGE {
        // A rebuild replays the whole log: the first region, before the log, is dead too.
        crash_dead += info.log_start - PAGE;
    }
    state.counters.dead_index_bytes = if full {
        0
    } else {
        state.counters.dead_index_bytes
    }
    .saturating_add(crash_dead);
    let mut tail = TailWriter::new(Arc::clone(&map));
    // Not yet shared with any reader: lowering the published end is safe here.
    tail.publish(valid_end);

    if opts.populate {
        map.populate_read(valid_end);
    }
    let unclean = !report.was_clean
        || scan_end.writes > 0
        || scan_end.stop != StopReason::End
        || full
        || !report.damaged.is_empty();
    if unclean && !opts.read_only {
        fh.zero_range(valid_end, len - valid_end)?;
    }
    let mut writer = Writer::new(tail, Arc::clone(&fh), valid_end, len, ckpt.log_end);
    if !full {
        // The replay from the checkpoint's end jumped over these (see `replay_bytes`).
        writer.claimed_since_ckpt = scan_end.skipped;
    }
    let dead_index = state.counters.dead_index_bytes;
    let inner = Inner::new(path, opts, seed, state, writer, ckpt);
    *inner.recovery.lock() = report;
    if !inner.opts.read_only {
        // The file may have holes where it should have allocated space (a copy made by a
        // hole-aware tool): writing into a hole through the mapping on a full disk would
        // be a SIGBUS. Allocating what is already allocated is cheap.
        fh.allocate(valid_end, len - valid_end)?;
    }
    // Old index regions were punched in the sessions that left them (where the file
    // system can). The file's holes below the log end take no space, whatever made
    // them (growth allocates everything else, and the tail was just allocated): how
    // much of the dead regions compaction would gain nothing from, at most.
    let holes = len.saturating_sub(fh.allocated().unwrap_or(len));
    inner
        .released_index_bytes
        .store(holes.min(dead_index), std::sync::atomic::Ordering::Relaxed);
    if unclean && !inner.opts.read_only {
        let mut w = inner.writer.lock();
        // The zeroed tail must be durable before a checkpoint may call the log clean:
        // otherwise a crash can keep the CLEAN slot but not the zeros, and stale records
        // past `log_end` could later be revived (tests/crash.rs, power loss).
        inner.sync_file(&w.file)?;
        // A checkpoint that fails without poisoning the store (no space to grow the
        // index) leaves it usable: the replayed writes stay in the in-memory delta and
        // the next checkpoint retries. Refusing to open would lock the user out of a
        // store they may want to compact to free space.
        if let Err(e) = inner.checkpoint(&mut w, STATE_CLEAN) {
            inner.check_not_poisoned()?;
            let _ = e;
        }
    }
    if !inner.opts.read_only {
        if info.major != crate::format::VERSION_MAJOR {
            // Upgrade a version 1 file in place: its records and buckets are valid
            // version 2 ones (version 2 gave meaning to bytes version 1 kept zero), so
            // only the header changes, after the recovery above made the file whole.
            let upgraded = StaticInfo {
                major: crate::format::VERSION_MAJOR,
                ..info
            };
            // Readers re-read the superblock when the index sequence moves: keep them
            // from reading a half-written header.
            inner.change_index(|| fh.write_at(&encode_static(&upgraded), 0))?;
            inner.sync_file(&fh)?;
        }
        // Publish for readers: the log as recovered (a rebuilt index may have moved the
        // end past the scan's end, behind a JUMP), a new session, no file switch.
        // (A store, not a raise: after a power loss the area may hold a dead session's
        // end past what survived.)
        let end = inner.writer.lock().end;
        live.store(LIVE_COMMITTED_OFF, end);
        live.store_durable(seed, end);
        live.store(LIVE_SWITCH_OFF, SWITCH_NONE);
        live.add(LIVE_SESSION_OFF, 1);
    }
    Ok(inner)
}

/// True if the interrupted checkpoint `redo` (announced by the CHECKPOINTING slot `ckpt`)
/// can be redone: the log holds every write it covers, and every bucket they map to is
/// whole (checksum and seal). A torn bucket, which only a power loss leaves, means a
/// rebuild.
fn redo_is_whole(
    map: &Mapping,
    seed: u64,
    ckpt: &CheckpointInfo,
    redo: RedoInfo,
    limit: u64,
) -> bool {
    if redo.end <= ckpt.log_end || redo.end > limit {
        return false;
    }
    let mut buckets = Vec::new();
    let end = scan(
        map.published_bytes(),
        seed,
        ckpt.log_end,
        redo.end,
        |recs| {
            for r in recs {
                let key = map.read(r.key_off(), u64::from(r.key_len)).unwrap_or(&[]);
                buckets.push(crate::format::bucket_of(
                    key_hash(seed, key),
                    ckpt.index_buckets,
                ));
            }
        },
    );
    if end.valid_end != redo.end {
        return false;
    }
    buckets.sort_unstable();
    buckets.dedup();
    buckets.into_iter().all(|b| {
        map.read(ckpt.index_off + b * PAGE, PAGE)
            .is_some_and(|bytes| {
                crate::format::bucket_crc_ok(bytes)
                    && crate::format::bucket_marked(bytes, ckpt.index_style)
            })
    })
}
