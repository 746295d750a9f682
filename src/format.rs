//! The on-disk format, byte by byte. `docs/FORMAT.md` is the prose version of this module
//! and a unit test checks that the two agree.
//!
//! All multi-byte integers are stored little-endian. The file is a sequence of 4 KiB
//! pages:
//!
//! ```text
//! +----------------------+  offset 0
//! | superblock page      |  static header (sector 0), checkpoint slots A and B (sectors 1, 2)
//! +----------------------+  4096
//! | index region         |  2^k bucket pages of 4096 bytes
//! +----------------------+
//! | log extent           |  records, appended; may end in a JUMP record that continues the
//! |   ...                |  log after a newer (larger) index region
//! +----------------------+
//! ```
//!
//! This module is pure: no I/O, no `unsafe`. Everything here works on byte slices.

use bytemuck::{Pod, Zeroable};

/// Page size of the format (all regions are page-aligned).
pub const PAGE: u64 = 4096;
/// Sector size assumed by the crash model: a torn page tears at sector boundaries.
pub const SECTOR: u64 = 512;

/// Magic number at offset 0. Contains a NUL and a CR-LF so text-mode mangling is detected.
pub const MAGIC: [u8; 8] = *b"MAPKV\0\r\n";
/// Major format version: a different major is rejected, except [`VERSION_MAJOR_V1`],
/// which is read and upgraded (see `docs/FORMAT.md`, "Version history").
pub const VERSION_MAJOR: u16 = 2;
/// The previous major version, whose files this version reads: version 2 only adds
/// meaning to bytes that version 1 kept zero.
pub const VERSION_MAJOR_V1: u16 = 1;
/// Minor format version: a newer minor is rejected, older minors are read.
pub const VERSION_MINOR: u16 = 0;

// ---------------------------------------------------------------------------------------
// Superblock
// ---------------------------------------------------------------------------------------

/// Static header, sector 0 of page 0. Written once when the store is created.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
pub struct StaticHeader {
    /// [`MAGIC`].
    pub magic: [u8; 8],
    /// [`VERSION_MAJOR`].
    pub major: [u8; 2],
    /// [`VERSION_MINOR`].
    pub minor: [u8; 2],
    /// [`PAGE`]; a store is only opened with the page size it was written with.
    pub page_size: [u8; 4],
    /// Random per-store seed: keys the hash function and every checksum, so pages from
    /// another store never validate here.
    pub seed: [u8; 8],
    /// Offset of the first log record; a full index rebuild scans from here.
    pub log_start: [u8; 8],
    /// Offset of the first index region (informational; checkpoints name the current one).
    pub first_index: [u8; 8],
    /// The log end the file was created with: `log_start` for a new store, the end of
    /// the copied records for a compacted one. Changes after it are the writes made since
    /// (what a follower reads); 0 in version 1 files (read as `log_start`).
    pub origin_end: [u8; 8],
    /// Compactions since the store was created: 0 for a new store, the source file's
    /// plus one for a compacted file (0 in files written before mapkv 2.0 set it).
    pub generation: [u8; 8],
    /// Reserved, zero.
    pub reserved: [u8; 452],
    /// CRC-32 of bytes `0..508`.
    pub crc: [u8; 4],
}
const _: () = assert!(std::mem::size_of::<StaticHeader>() == SECTOR as usize);

/// Offset of the static header.
pub const STATIC_OFF: u64 = 0;
/// Offset of checkpoint slot `i` (0 or 1): sectors 1 and 2 of the superblock page, so a
/// torn superblock write can damage at most the slot being written.
pub const fn checkpoint_off(slot: usize) -> u64 {
    SECTOR * (1 + slot as u64)
}
/// Offset of the *live area*: sector 4 of the superblock page, where a writer publishes,
/// for readers in other processes, how far the log is committed. It holds plain 8-byte
/// little-endian counters updated with atomic stores through the shared mapping; no
/// checksum, never synced on purpose, ignored by recovery (which rewrites it). Version 1
/// files have zeros here.
pub const LIVE_OFF: u64 = 4 * SECTOR;
/// Live area: the *committed end*: every write whose records end at or before it is
/// committed (its call returned, or is returning), and it always falls between two
/// writes (never inside a batch). Under `Durability::Always`, it only moves past
/// durable writes.
pub const LIVE_COMMITTED_OFF: u64 = LIVE_OFF;
/// Live area: the *index sequence*: odd while the writer changes bytes a reader may be
/// reading outside the log (rewriting index buckets, punching old regions, writing a
/// checkpoint slot); bumped to the next even value when it is done.
pub const LIVE_INDEX_SEQ_OFF: u64 = LIVE_OFF + 8;
/// Live area: writer sessions: incremented by every writer that opens the file.
pub const LIVE_SESSION_OFF: u64 = LIVE_OFF + 16;
/// Live area: the file switch of compaction: [`SWITCH_NONE`], [`SWITCH_PENDING`] or
/// [`SWITCH_DONE`].
pub const LIVE_SWITCH_OFF: u64 = LIVE_OFF + 24;
/// Live area: the end of the log the writer last made durable (raised after each sync).
pub const LIVE_DURABLE_OFF: u64 = LIVE_OFF + 32;
/// Live area: [`durable_check`] of the durable end, rewritten after it; recovery trusts
/// the durable end only when the two agree.
pub const LIVE_DURABLE_CHECK_OFF: u64 = LIVE_OFF + 40;
/// Size of the live area (the rest of it is reserved, zero).
pub const LIVE_LEN: u64 = 64;

/// The check word of a durable end `d` in the live area: a keyed mix of `d` and the
/// file's seed, never 0 for `d > 0`, so that garbage (a torn sector) or a stale pair is
/// not taken for a durable end.
#[must_use]
pub fn durable_check(seed: u64, d: u64) -> u64 {
    if d == 0 {
        return 0;
    }
    let mut x = d ^ seed.rotate_left(17) ^ 0x6d61_706b_7664_7572;
    x = (x ^ (x >> 33)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    x = (x ^ (x >> 33)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    (x ^ (x >> 33)) | 1
}
/// No compaction is replacing this file.
pub const SWITCH_NONE: u64 = 0;
/// A compaction is about to rename a new file over this one; the writer holds its lock
/// and commits nothing until it is done.
pub const SWITCH_PENDING: u64 = 1;
/// This file was replaced: the store now lives in the file at the same path.
pub const SWITCH_DONE: u64 = 2;

/// Number of bytes covered by the CRC in a 512-byte sector structure.
pub const SECTOR_CRC_SPAN: usize = 508;

/// Checkpoint state: the store was closed cleanly; the index is complete up to
/// `log_end` and was not being written.
pub const STATE_CLEAN: u32 = 1;
/// Checkpoint state: a writer has (or had) the store open. Records after `log_end` may
/// exist and must be replayed; the space after the valid end may hold torn bytes, which
/// recovery erases. The buckets are intact (they are only rewritten under CHECKPOINTING).
pub const STATE_DIRTY: u32 = 2;

/// Checkpoint state: a checkpoint was rewriting index buckets in place when this slot was
/// written. If it is still the current slot at open, buckets may be a mix of old and new
/// pages (torn ones too, after a power loss). With a redo part (`redo_end` != 0),
/// recovery replays from `log_end`, takes the announced counters at `redo_end` and checks
/// the buckets the checkpoint touched; if one is torn, or without a redo part, the index
/// is rebuilt from the log.
pub const STATE_CHECKPOINTING: u32 = 3;

/// Index style of a region written by format version 1: only non-empty buckets were
/// written, so an all-zero page is a valid empty bucket.
pub const INDEX_SPARSE: u32 = 0;
/// Index style of a region written by format version 2: every bucket was written and
/// carries [`BUCKET_MAGIC`], so a page of zeros in the region is damage, not an empty
/// bucket.
pub const INDEX_SEALED: u32 = 1;

/// A checkpoint slot: where the index is and how much of the log it covers.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
pub struct Checkpoint {
    /// Sequence number; the valid slot with the highest one is current.
    pub seq: [u8; 8],
    /// [`STATE_CLEAN`], [`STATE_DIRTY`] or [`STATE_CHECKPOINTING`].
    pub state: [u8; 4],
    /// How the current index region was written: [`INDEX_SPARSE`] or [`INDEX_SEALED`].
    pub index_style: [u8; 4],
    /// Offset of the current index region.
    pub index_off: [u8; 8],
    /// Number of buckets (a power of two) in the current index region.
    pub index_buckets: [u8; 8],
    /// Every record before this offset is reflected in the index; replay starts here.
    pub log_end: [u8; 8],
    /// Live keys at `log_end`.
    pub live_keys: [u8; 8],
    /// Bytes of live records (headers included) at `log_end`.
    pub live_bytes: [u8; 8],
    /// Bytes of all records in the log chain up to `log_end`, live or dead.
    pub log_bytes: [u8; 8],
    /// Bytes of the file taken by index regions no longer in use.
    pub dead_index_bytes: [u8; 8],
    /// CHECKPOINTING only (0 otherwise): the log end the running checkpoint applies to
    /// the buckets. Recovery redoes it from the log instead of rebuilding the index.
    pub redo_end: [u8; 8],
    /// CHECKPOINTING only: `live_keys` at `redo_end`.
    pub redo_live_keys: [u8; 8],
    /// CHECKPOINTING only: `live_bytes` at `redo_end`.
    pub redo_live_bytes: [u8; 8],
    /// CHECKPOINTING only: `log_bytes` at `redo_end`.
    pub redo_log_bytes: [u8; 8],
    /// CHECKPOINTING only: `dead_index_bytes` at `redo_end`.
    pub redo_dead_index_bytes: [u8; 8],
    /// Reserved, zero.
    pub reserved: [u8; 396],
    /// CRC-32 (seeded with the store seed) of bytes `0..508`.
    pub crc: [u8; 4],
}
const _: () = assert!(std::mem::size_of::<Checkpoint>() == SECTOR as usize);

/// Decoded [`Checkpoint`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CheckpointInfo {
    /// See [`Checkpoint::seq`].
    pub seq: u64,
    /// See [`Checkpoint::state`].
    pub state: u32,
    /// See [`Checkpoint::index_style`].
    pub index_style: u32,
    /// See [`Checkpoint::index_off`].
    pub index_off: u64,
    /// See [`Checkpoint::index_buckets`].
    pub index_buckets: u64,
    /// See [`Checkpoint::log_end`].
    pub log_end: u64,
    /// See [`Checkpoint::live_keys`].
    pub live_keys: u64,
    /// See [`Checkpoint::live_bytes`].
    pub live_bytes: u64,
    /// See [`Checkpoint::log_bytes`].
    pub log_bytes: u64,
    /// See [`Checkpoint::dead_index_bytes`].
    pub dead_index_bytes: u64,
    /// The checkpoint a CHECKPOINTING slot announces (see [`Checkpoint::redo_end`]).
    pub redo: Option<RedoInfo>,
}

/// What a CHECKPOINTING slot says its checkpoint will produce: the log end it covers and
/// the exact counters there. With it, recovery after a crash in the middle of the bucket
/// rewrite replays the log from `log_end` as usual, takes these counters at `end`, and
/// checks the buckets the rewrite touched, instead of rebuilding the whole index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RedoInfo {
    /// Log end the checkpoint covers (> the slot's `log_end`).
    pub end: u64,
    /// `live_keys` at `end`.
    pub live_keys: u64,
    /// `live_bytes` at `end`.
    pub live_bytes: u64,
    /// `log_bytes` at `end`.
    pub log_bytes: u64,
    /// `dead_index_bytes` at `end`.
    pub dead_index_bytes: u64,
}

/// Decoded [`StaticHeader`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaticInfo {
    /// Per-store seed.
    pub seed: u64,
    /// First log record offset.
    pub log_start: u64,
    /// First index region offset.
    pub first_index: u64,
    /// See [`StaticHeader::origin_end`] (`log_start` when the file says 0).
    pub origin_end: u64,
    /// See [`StaticHeader::generation`].
    pub generation: u64,
    /// Major version the file was written with ([`VERSION_MAJOR`] or
    /// [`VERSION_MAJOR_V1`]); [`encode_static`] always writes [`VERSION_MAJOR`].
    pub major: u16,
}

fn u64_at(b: [u8; 8]) -> u64 {
    u64::from_le_bytes(b)
}

/// CRC-32 of `parts`, keyed with the store seed.
#[must_use]
pub fn crc_seeded(seed: u64, parts: &[&[u8]]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seed.to_le_bytes());
    for p in parts {
        h.update(p);
    }
    h.finalize()
}

/// Why a superblock could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// Wrong magic: not a mapkv file.
    BadMagic,
    /// Magic fine but the format version is not ours.
    Version(u16, u16),
    /// CRC mismatch or impossible field values.
    Corrupt(&'static str),
}

/// The checksum of a record: CRC-32 of `seed ‖ offset ‖ body` (the same value as
/// `crc_seeded(seed, &[&offset.to_le_bytes(), body])`), where `body` is the record
/// without its CRC field. Small records are hashed in one pass over a stack copy: for a
/// ~130-byte record, separate small updates cost more than the copy.
#[must_use]
pub fn record_crc(seed: u64, offset: u64, body: &[u8]) -> u32 {
    const INLINE: usize = 240;
    let mut buf = [0u8; 16 + INLINE];
    buf[..8].copy_from_slice(&seed.to_le_bytes());
    buf[8..16].copy_from_slice(&offset.to_le_bytes());
    // `Hasher::new` detects the CPU's CRC instructions on every call (a few percent of
    // an unsynced put): clone a hasher made once instead.
    static PROTO: std::sync::OnceLock<crc32fast::Hasher> = std::sync::OnceLock::new();
    let mut h = PROTO.get_or_init(crc32fast::Hasher::new).clone();
    if let Some(dst) = buf.get_mut(16..16 + body.len()) {
        dst.copy_from_slice(body);
        h.update(&buf[..16 + body.len()]);
    } else {
        h.update(&buf[..16]);
        h.update(body);
    }
    h.finalize()
}

/// Encodes the static header sector.
#[must_use]
pub fn encode_static(info: &StaticInfo) -> [u8; SECTOR as usize] {
    let mut h = StaticHeader::zeroed();
    h.magic = MAGIC;
    h.major = VERSION_MAJOR.to_le_bytes();
    h.minor = VERSION_MINOR.to_le_bytes();
    h.page_size = u32::try_from(PAGE).unwrap_or(0).to_le_bytes();
    h.seed = info.seed.to_le_bytes();
    h.log_start = info.log_start.to_le_bytes();
    h.first_index = info.first_index.to_le_bytes();
    h.origin_end = info.origin_end.to_le_bytes();
    h.generation = info.generation.to_le_bytes();
    let mut out = [0u8; SECTOR as usize];
    out.copy_from_slice(bytemuck::bytes_of(&h));
    let crc = crc32fast::hash(&out[..SECTOR_CRC_SPAN]);
    out[SECTOR_CRC_SPAN..].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes the static header sector (`bytes` must be at least 512 bytes).
///
/// # Errors
/// [`HeaderError`] naming what is wrong.
pub fn decode_static(bytes: &[u8]) -> Result<StaticInfo, HeaderError> {
    let sector = bytes
        .get(..SECTOR as usize)
        .ok_or(HeaderError::Corrupt("file shorter than a superblock"))?;
    let h: StaticHeader = bytemuck::pod_read_unaligned(sector);
    if h.magic != MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let crc = crc32fast::hash(&sector[..SECTOR_CRC_SPAN]);
    if crc != u32::from_le_bytes(h.crc) {
        return Err(HeaderError::Corrupt("static header checksum mismatch"));
    }
    let (major, minor) = (u16::from_le_bytes(h.major), u16::from_le_bytes(h.minor));
    let newer_minor = minor > VERSION_MINOR;
    let known =
        (major == VERSION_MAJOR && !newer_minor) || (major == VERSION_MAJOR_V1 && minor == 0);
    if !known {
        return Err(HeaderError::Version(major, minor));
    }
    if u64::from(u32::from_le_bytes(h.page_size)) != PAGE {
        return Err(HeaderError::Corrupt("unsupported page size"));
    }
    let info = StaticInfo {
        seed: u64_at(h.seed),
        log_start: u64_at(h.log_start),
        first_index: u64_at(h.first_index),
        origin_end: match u64_at(h.origin_end) {
            0 => u64_at(h.log_start),
            e => e,
        },
        generation: u64_at(h.generation),
        major,
    };
    if info.first_index != PAGE
        || info.log_start < 2 * PAGE
        || !info.log_start.is_multiple_of(PAGE)
        || info.origin_end < info.log_start
    {
        return Err(HeaderError::Corrupt("static header layout out of range"));
    }
    Ok(info)
}

/// Encodes a checkpoint slot.
#[must_use]
pub fn encode_checkpoint(seed: u64, c: &CheckpointInfo) -> [u8; SECTOR as usize] {
    let mut h = Checkpoint::zeroed();
    h.seq = c.seq.to_le_bytes();
    h.state = c.state.to_le_bytes();
    h.index_style = c.index_style.to_le_bytes();
    h.index_off = c.index_off.to_le_bytes();
    h.index_buckets = c.index_buckets.to_le_bytes();
    h.log_end = c.log_end.to_le_bytes();
    h.live_keys = c.live_keys.to_le_bytes();
    h.live_bytes = c.live_bytes.to_le_bytes();
    h.log_bytes = c.log_bytes.to_le_bytes();
    h.dead_index_bytes = c.dead_index_bytes.to_le_bytes();
    if let Some(r) = c.redo.filter(|_| c.state == STATE_CHECKPOINTING) {
        h.redo_end = r.end.to_le_bytes();
        h.redo_live_keys = r.live_keys.to_le_bytes();
        h.redo_live_bytes = r.live_bytes.to_le_bytes();
        h.redo_log_bytes = r.log_bytes.to_le_bytes();
        h.redo_dead_index_bytes = r.dead_index_bytes.to_le_bytes();
    }
    let mut out = [0u8; SECTOR as usize];
    out.copy_from_slice(bytemuck::bytes_of(&h));
    let crc = crc_seeded(seed, &[&out[..SECTOR_CRC_SPAN]]);
    out[SECTOR_CRC_SPAN..].copy_from_slice(&crc.to_le_bytes());
    out
}

/// Decodes a checkpoint slot; `None` if its checksum or fields are invalid (a torn or
/// never-written slot).
#[must_use]
pub fn decode_checkpoint(seed: u64, bytes: &[u8]) -> Option<CheckpointInfo> {
    let sector = bytes.get(..SECTOR as usize)?;
    let crc = crc_seeded(seed, &[&sector[..SECTOR_CRC_SPAN]]);
    let h: Checkpoint = bytemuck::pod_read_unaligned(sector);
    if crc != u32::from_le_bytes(h.crc) {
        return None;
    }
    let c = CheckpointInfo {
        seq: u64_at(h.seq),
        state: u32::from_le_bytes(h.state),
        index_style: u32::from_le_bytes(h.index_style),
        index_off: u64_at(h.index_off),
        index_buckets: u64_at(h.index_buckets),
        log_end: u64_at(h.log_end),
        live_keys: u64_at(h.live_keys),
        live_bytes: u64_at(h.live_bytes),
        log_bytes: u64_at(h.log_bytes),
        dead_index_bytes: u64_at(h.dead_index_bytes),
        redo: (u32::from_le_bytes(h.state) == STATE_CHECKPOINTING && u64_at(h.redo_end) != 0).then(
            || RedoInfo {
                end: u64_at(h.redo_end),
                live_keys: u64_at(h.redo_live_keys),
                live_bytes: u64_at(h.redo_live_bytes),
                log_bytes: u64_at(h.redo_log_bytes),
                dead_index_bytes: u64_at(h.redo_dead_index_bytes),
            },
        ),
    };
    let sane = (STATE_CLEAN..=STATE_CHECKPOINTING).contains(&c.state)
        && matches!(c.index_style, INDEX_SPARSE | INDEX_SEALED)
        && c.index_buckets.is_power_of_two()
        && c.index_buckets <= MAX_BUCKETS
        && c.index_off >= PAGE
        && c.index_off.is_multiple_of(PAGE)
        && c.log_end >= 2 * PAGE;
    sane.then_some(c)
}

// ---------------------------------------------------------------------------------------
// Index buckets
// ---------------------------------------------------------------------------------------

/// Size of one bucket: one page, so a bucket is torn or written as a unit of sectors.
pub const BUCKET_SIZE: usize = PAGE as usize;
/// Bucket header: crc u32, count u16, magic u16 ([`BUCKET_MAGIC`]), 8 reserved zero bytes.
pub const BUCKET_HEADER: usize = 16;
/// Bytes per slot: key hash u64, record offset u64 (0 = empty).
pub const SLOT_SIZE: usize = 16;
/// Slots per bucket.
pub const SLOTS_PER_BUCKET: usize = (BUCKET_SIZE - BUCKET_HEADER) / SLOT_SIZE;
const _: () = assert!(BUCKET_HEADER + SLOTS_PER_BUCKET * SLOT_SIZE == BUCKET_SIZE);
/// Offset of the bucket magic, a `u16`.
pub const BUCKET_MAGIC_OFF: usize = 6;
/// Marks a bucket as written (every bucket of an [`INDEX_SEALED`] region carries it).
pub const BUCKET_MAGIC: u16 = 0x4B42;

/// True unless `bucket` belongs to an [`INDEX_SEALED`] region and lacks the
/// [`BUCKET_MAGIC`] (a page zeroed or never written by damage).
#[must_use]
pub fn bucket_marked(bucket: &[u8], style: u32) -> bool {
    style == INDEX_SPARSE
        || bucket
            .get(BUCKET_MAGIC_OFF..BUCKET_MAGIC_OFF + 2)
            .is_some_and(|m| u16::from_le_bytes([m[0], m[1]]) == BUCKET_MAGIC)
}

/// Offset of the `count` field in a bucket.
pub const BUCKET_COUNT_OFF: usize = 4;
/// Most buckets an index may have (2^32 pages = 16 TiB of index).
pub const MAX_BUCKETS: u64 = 1 << 32;

/// CRC-32 of an all-zero bucket body. The stored bucket CRC is `crc32(body) ^ this`, so a
/// freshly allocated (zero-filled) bucket is a valid empty bucket without being written.
#[must_use]
pub fn empty_bucket_crc() -> u32 {
    crc32fast::hash(&[0u8; BUCKET_SIZE - 4])
}

/// The value to store in a bucket's CRC field for its current body.
#[must_use]
pub fn bucket_crc(bucket: &[u8]) -> u32 {
    crc32fast::hash(bucket.get(4..BUCKET_SIZE).unwrap_or(&[])) ^ empty_bucket_crc()
}

/// True if the bucket's stored CRC matches its body.
#[must_use]
pub fn bucket_crc_ok(bucket: &[u8]) -> bool {
    match bucket.get(..4) {
        Some(c) => u32::from_le_bytes([c[0], c[1], c[2], c[3]]) == bucket_crc(bucket),
        None => false,
    }
}

/// Hashes a key with the store's seed (xxh3, 64 bits). Stable: it is part of the format.
#[must_use]
pub fn key_hash(seed: u64, key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(key, seed)
}

/// Bucket of `hash` in an index of `buckets` buckets (a power of two).
#[must_use]
pub fn bucket_of(hash: u64, buckets: u64) -> u64 {
    hash & (buckets - 1)
}

/// Byte offset of slot `i` inside a bucket.
#[must_use]
pub const fn slot_off(i: usize) -> usize {
    BUCKET_HEADER + i * SLOT_SIZE
}

/// First slot probed for `hash` inside its bucket (linear probing within the bucket).
#[must_use]
pub fn home_slot(hash: u64) -> usize {
    // Bucket selection uses the low bits; the slot uses the high half.
    ((hash >> 32) % SLOTS_PER_BUCKET as u64) as usize
}

// ---------------------------------------------------------------------------------------
// Log records
// ---------------------------------------------------------------------------------------

/// Record kind: a put of key → value.
pub const KIND_PUT: u8 = 1;
/// Record kind: a delete of key (value empty).
pub const KIND_DELETE: u8 = 2;
/// Record kind: the log continues at the offset in the 8-byte value (after a new index
/// region). Key empty.
pub const KIND_JUMP: u8 = 3;
/// Record kind: padding over damaged bytes, written by a salvage so that later scans pass
/// them. Key empty; the value is whatever bytes were there, and the checksum covers the
/// header only. A scan skips it (and drops a batch it interrupts); its bytes are dead.
pub const KIND_PAD: u8 = 4;
/// Record flag: more records of the same atomic batch follow.
pub const FLAG_BATCH_MORE: u8 = 1;

/// Record header: `{ crc u32 | kind u8 | flags u8 | durable u16 | key_len u32 | val_len u32 }`,
/// followed by the key and the value.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Debug)]
pub struct RecordHeader {
    /// CRC-32 of (seed, record offset, bytes 4.. of the record incl. key and value).
    pub crc: [u8; 4],
    /// [`KIND_PUT`], [`KIND_DELETE`], [`KIND_JUMP`] or [`KIND_PAD`].
    pub kind: u8,
    /// [`FLAG_BATCH_MORE`] or 0.
    pub flags: u8,
    /// Durable watermark, see [`durable_mark`]; 0 = unknown.
    pub durable: [u8; 2],
    /// Key length.
    pub key_len: [u8; 4],
    /// Value length.
    pub val_len: [u8; 4],
}
/// Size of a record header.
pub const RECORD_HEADER: usize = 16;
const _: () = assert!(std::mem::size_of::<RecordHeader>() == RECORD_HEADER);
/// Size of a jump record.
pub const JUMP_LEN: u64 = RECORD_HEADER as u64 + 8;

/// Total length of a record with the given key and value lengths.
#[must_use]
pub fn record_len(key_len: usize, val_len: usize) -> u64 {
    (RECORD_HEADER + key_len + val_len) as u64
}

/// Fine durable marks count 16-byte units back from the record's offset; coarse ones
/// (this bit set) count pages back from the page the record starts in.
const MARK_PAGES: u16 = 0x8000;
/// Unit of a fine durable mark: no record is shorter, so a fine watermark always lies
/// above the start of the record that ends at the durable end.
const MARK_FINE_UNIT: u64 = 16;

/// The durable watermark stored in a record at `offset` when everything in the file below
/// `durable_end` was durable: `m` such that every byte below
/// [`watermark(offset, m)`](watermark) was durable, and that point is as close to
/// `durable_end` as the encoding allows: within 15 bytes when the durable end is less than
/// 512 KiB behind the record, within a page up to 128 MiB behind; 0 (unknown) if further.
#[must_use]
pub fn durable_mark(offset: u64, durable_end: u64) -> u16 {
    if durable_end >= offset {
        return 1;
    }
    let fine = (offset - durable_end).div_ceil(MARK_FINE_UNIT) + 1;
    if fine < u64::from(MARK_PAGES) {
        return fine as u16;
    }
    let here = page_down(offset);
    let pages = here.saturating_sub(durable_end).div_ceil(PAGE) + 1;
    match u16::try_from(pages) {
        Ok(n) if n < MARK_PAGES => MARK_PAGES | n,
        _ => 0,
    }
}

/// The offset below which the log was durable when the record at `offset` with durable
/// mark `mark` was written; 0 when unknown.
#[must_use]
pub fn watermark(offset: u64, mark: u16) -> u64 {
    match mark {
        0 => 0,
        m if m & MARK_PAGES == 0 => offset.saturating_sub(u64::from(m - 1) * MARK_FINE_UNIT),
        m => match m & !MARK_PAGES {
            0 => 0,
            n => page_down(offset).saturating_sub(u64::from(n - 1) * PAGE),
        },
    }
}

/// Appends an encoded record to `out`. `offset` is where it will live in the file (it is
/// part of the checksum, so a record copied elsewhere does not validate); `durable_end`
/// is how far the file was durable when it was written (0 if unknown).
#[expect(
    clippy::too_many_arguments,
    reason = "one field per record header field"
)]
pub fn encode_record(
    out: &mut Vec<u8>,
    seed: u64,
    offset: u64,
    kind: u8,
    flags: u8,
    key: &[u8],
    value: &[u8],
    durable_end: u64,
) {
    let start = out.len();
    let mut h = RecordHeader::zeroed();
    h.kind = kind;
    h.flags = flags;
    h.durable = durable_mark(offset, durable_end).to_le_bytes();
    // Lengths were checked against Options limits (<= u32::MAX) by the caller.
    h.key_len = u32::try_from(key.len()).unwrap_or(u32::MAX).to_le_bytes();
    h.val_len = u32::try_from(value.len()).unwrap_or(u32::MAX).to_le_bytes();
    out.extend_from_slice(bytemuck::bytes_of(&h));
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    let crc = record_crc(seed, offset, &out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// A decoded, checksum-verified record: positions are relative to the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRef {
    /// Offset of the record header.
    pub offset: u64,
    /// Kind byte.
    pub kind: u8,
    /// Flags byte.
    pub flags: u8,
    /// Durable mark (see [`watermark`]).
    pub durable: u16,
    /// Key length.
    pub key_len: u32,
    /// Value length.
    pub val_len: u32,
}

impl RecordRef {
    /// Total record length.
    #[expect(
        clippy::len_without_is_empty,
        reason = "a record always has a 16-byte header"
    )]
    #[must_use]
    pub fn len(&self) -> u64 {
        record_len(self.key_len as usize, self.val_len as usize)
    }
    /// Offset one past the record.
    #[must_use]
    pub fn end(&self) -> u64 {
        self.offset + self.len()
    }
    /// Offset of the key.
    #[must_use]
    pub fn key_off(&self) -> u64 {
        self.offset + RECORD_HEADER as u64
    }
    /// Offset of the value.
    #[must_use]
    pub fn val_off(&self) -> u64 {
        self.key_off() + u64::from(self.key_len)
    }
}

/// Why no valid record was found at an offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// The header is all zeros: unwritten space, the normal end of the log.
    Zero,
    /// The record does not fit before `limit`.
    Truncated,
    /// Unknown kind or flag bits, or impossible lengths.
    BadHeader,
    /// The checksum does not match.
    Checksum,
}

/// Decodes the record header at `offset` and checks that the record is well-formed and
/// fits before `limit`, *without* verifying its checksum (see [`record_crc_ok`]). Used on
/// hot paths that only need the key or the length. Never reads at or past `limit`.
///
/// # Errors
/// [`RecordError`] when no well-formed record is there.
pub fn decode_record_header(
    file: &[u8],
    offset: u64,
    limit: u64,
) -> Result<RecordRef, RecordError> {
    let limit = limit.min(file.len() as u64);
    if offset > limit {
        return Err(RecordError::Truncated);
    }
    decode_header_in(&file[offset as usize..limit as usize], offset)
}

/// Like [`decode_record_header`], for `bytes` that start at the record (file offset
/// `offset`) and end where the readable data ends.
///
/// # Errors
/// [`RecordError`] when no well-formed record is there.
pub fn decode_header_in(bytes: &[u8], offset: u64) -> Result<RecordRef, RecordError> {
    let Some(hb) = bytes.get(..RECORD_HEADER) else {
        return Err(RecordError::Truncated);
    };
    if hb.iter().all(|&b| b == 0) {
        return Err(RecordError::Zero);
    }
    let h: RecordHeader = bytemuck::pod_read_unaligned(hb);
    let rec = RecordRef {
        offset,
        kind: h.kind,
        flags: h.flags,
        durable: u16::from_le_bytes(h.durable),
        key_len: u32::from_le_bytes(h.key_len),
        val_len: u32::from_le_bytes(h.val_len),
    };
    let kind_ok = match rec.kind {
        KIND_PUT => true,
        KIND_DELETE => rec.val_len == 0,
        KIND_JUMP => rec.key_len == 0 && rec.val_len == 8 && rec.flags == 0,
        KIND_PAD => rec.key_len == 0 && rec.flags == 0,
        _ => false,
    };
    if !kind_ok || rec.flags & !FLAG_BATCH_MORE != 0 {
        return Err(RecordError::BadHeader);
    }
    if offset.checked_add(rec.len()).is_none() || rec.len() > bytes.len() as u64 {
        return Err(RecordError::Truncated);
    }
    Ok(rec)
}

/// True if the checksum of `rec` matches, for `bytes` that start at the record.
#[must_use]
pub fn record_crc_ok_in(bytes: &[u8], seed: u64, rec: &RecordRef) -> bool {
    // A padding record's checksum covers its header only: its value is damaged bytes.
    let end = if rec.kind == KIND_PAD {
        RECORD_HEADER
    } else {
        rec.len() as usize
    };
    let (Some(stored), Some(body)) = (bytes.get(..4), bytes.get(4..end)) else {
        return false;
    };
    let stored = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]);
    record_crc(seed, rec.offset, body) == stored
}

/// The header of a padding record ([`KIND_PAD`]) at `offset` that covers `len` bytes
/// (`RECORD_HEADER..=u32::MAX + RECORD_HEADER`); its checksum covers the header only.
#[must_use]
pub fn encode_padding(seed: u64, offset: u64, len: u64) -> [u8; RECORD_HEADER] {
    let mut h = RecordHeader::zeroed();
    h.kind = KIND_PAD;
    let val = len.saturating_sub(RECORD_HEADER as u64);
    h.val_len = u32::try_from(val).unwrap_or(u32::MAX).to_le_bytes();
    let mut out = [0u8; RECORD_HEADER];
    out.copy_from_slice(bytemuck::bytes_of(&h));
    let crc = record_crc(seed, offset, &out[4..]);
    out[..4].copy_from_slice(&crc.to_le_bytes());
    out
}

/// True if the checksum of `rec` (from [`decode_record_header`] on the same `file`) matches.
#[must_use]
pub fn record_crc_ok(file: &[u8], seed: u64, rec: &RecordRef) -> bool {
    file.get(rec.offset as usize..)
        .is_some_and(|b| record_crc_ok_in(b, seed, rec))
}

/// Decodes and verifies the record at `offset` of `file` (the whole file's bytes, or a
/// prefix of it at least up to `limit`). Never reads at or past `limit`.
///
/// # Errors
/// [`RecordError`] when no valid record is there.
pub fn decode_record(
    file: &[u8],
    seed: u64,
    offset: u64,
    limit: u64,
) -> Result<RecordRef, RecordError> {
    let rec = decode_record_header(file, offset, limit)?;
    if record_crc_ok(file, seed, &rec) {
        Ok(rec)
    } else {
        Err(RecordError::Checksum)
    }
}

/// Target of a verified jump record.
#[must_use]
pub fn jump_target(file: &[u8], rec: &RecordRef) -> Option<u64> {
    let v = file.get(rec.val_off() as usize..rec.val_off() as usize + 8)?;
    Some(u64::from_le_bytes(v.try_into().ok()?))
}

/// Rounds `x` up to a multiple of [`PAGE`].
#[must_use]
pub fn page_up(x: u64) -> u64 {
    x.div_ceil(PAGE) * PAGE
}

/// Rounds `x` down to a multiple of [`PAGE`].
#[must_use]
pub fn page_down(x: u64) -> u64 {
    x / PAGE * PAGE
}

#[cfg(test)]
mod tests {
    #[test]
    fn record_crc_matches_the_generic_seeded_crc_at_every_size() {
        for len in [0usize, 1, 15, 16, 100, 239, 240, 241, 1000] {
            let body: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let (seed, off) = (0x0123_4567_89AB_CDEFu64, 4096 + len as u64);
            assert_eq!(
                record_crc(seed, off, &body),
                super::crc_seeded(seed, &[&off.to_le_bytes(), &body]),
                "body of {len} bytes"
            );
        }
    }

    use super::*;

    #[test]
    fn record_roundtrip_and_checks() {
        let mut buf = vec![0u8; 64];
        let mut rec = Vec::new();
        encode_record(&mut rec, 7, 64, KIND_PUT, 0, b"key", b"value", 0);
        buf.extend_from_slice(&rec);
        buf.extend_from_slice(&[0u8; 32]);
        let r = decode_record(&buf, 7, 64, buf.len() as u64).unwrap();
        assert_eq!((r.key_len, r.val_len, r.kind), (3, 5, KIND_PUT));
        assert_eq!(&buf[r.key_off() as usize..r.val_off() as usize], b"key");
        // Wrong seed, wrong offset and a flipped bit all fail.
        assert_eq!(
            decode_record(&buf, 8, 64, buf.len() as u64),
            Err(RecordError::Checksum)
        );
        let mut moved = vec![0u8; 8];
        moved.extend_from_slice(&rec);
        assert_eq!(
            decode_record(&moved, 7, 8, moved.len() as u64),
            Err(RecordError::Checksum)
        );
        buf[64 + 18] ^= 1;
        assert_eq!(
            decode_record(&buf, 7, 64, buf.len() as u64),
            Err(RecordError::Checksum)
        );
        // Zero space and truncation.
        assert_eq!(
            decode_record(&buf, 7, 0, buf.len() as u64),
            Err(RecordError::Zero)
        );
        assert_eq!(decode_record(&buf, 7, 64, 70), Err(RecordError::Truncated));
        assert_eq!(
            decode_record(&buf, 7, u64::MAX - 3, u64::MAX),
            Err(RecordError::Truncated)
        );
    }

    fn sample_static() -> StaticInfo {
        StaticInfo {
            seed: 42,
            log_start: 3 * PAGE,
            first_index: PAGE,
            origin_end: 3 * PAGE,
            generation: 7,
            major: VERSION_MAJOR,
        }
    }

    #[test]
    fn headers_roundtrip() {
        let s = sample_static();
        let b = encode_static(&s);
        assert_eq!(decode_static(&b), Ok(s));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(decode_static(&bad), Err(HeaderError::BadMagic));
        let mut bad = b;
        bad[100] ^= 1;
        assert!(matches!(decode_static(&bad), Err(HeaderError::Corrupt(_))));
        let c = CheckpointInfo {
            seq: 3,
            state: STATE_DIRTY,
            index_style: INDEX_SEALED,
            index_off: PAGE,
            index_buckets: 4,
            log_end: 5 * PAGE,
            live_keys: 1,
            live_bytes: 20,
            log_bytes: 40,
            dead_index_bytes: 0,
            redo: None,
        };
        let b = encode_checkpoint(42, &c);
        assert_eq!(decode_checkpoint(42, &b), Some(c));
        // A CHECKPOINTING slot carries its redo part; other states never do.
        let redo = Some(RedoInfo {
            end: 9 * PAGE,
            live_keys: 2,
            live_bytes: 40,
            log_bytes: 80,
            dead_index_bytes: 7,
        });
        let busy = CheckpointInfo {
            state: STATE_CHECKPOINTING,
            redo,
            ..c
        };
        assert_eq!(
            decode_checkpoint(42, &encode_checkpoint(42, &busy)),
            Some(busy)
        );
        let dirty = CheckpointInfo { redo, ..c };
        assert_eq!(
            decode_checkpoint(42, &encode_checkpoint(42, &dirty)),
            Some(c)
        );
        assert_eq!(decode_checkpoint(43, &b), None);
        assert_eq!(decode_checkpoint(42, &[0u8; 512]), None);
    }

    #[test]
    fn durable_marks_never_claim_more_than_was_durable() {
        for (off, durable) in [
            (0u64, 0u64),
            (5000, 0),
            (5000, 4096),
            (5000, 4999),
            (5000, 4984),
            (5000, 9000),
            (1 << 20, 4095),
            (1 << 20, (1 << 20) - 4096),
            (1 << 20, (1 << 20) - 524_000),
            (1 << 20, (1 << 20) - 524_300),
            (1 << 40, 0),
            (1 << 30, (1 << 30) - 32_000 * PAGE),
        ] {
            let m = durable_mark(off, durable);
            let w = watermark(off, m);
            assert!(w <= durable.max(off), "{off} {durable}: {m} -> {w}");
            assert!(w <= durable || m == 1, "{off} {durable}: {m} -> {w}");
            if m != 0 && durable < off {
                let slack = if off - durable < 32_000 * 16 {
                    16
                } else {
                    PAGE
                };
                assert!(durable - w < slack, "{off} {durable}: {m} -> {w}, too low");
            }
        }
        assert_eq!(durable_mark(1 << 40, 0), 0, "too far behind: unknown");
    }

    #[test]
    fn version_1_headers_are_read_and_marked_as_such() {
        let s = sample_static();
        let mut b = encode_static(&s);
        b[8..10].copy_from_slice(&VERSION_MAJOR_V1.to_le_bytes());
        let crc = crc32fast::hash(&b[..SECTOR_CRC_SPAN]);
        b[SECTOR_CRC_SPAN..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_static(&b).map(|i| i.major), Ok(VERSION_MAJOR_V1));
        b[8..10].copy_from_slice(&3u16.to_le_bytes());
        let crc = crc32fast::hash(&b[..SECTOR_CRC_SPAN]);
        b[SECTOR_CRC_SPAN..].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode_static(&b), Err(HeaderError::Version(3, 0)));
    }

    #[test]
    fn sealed_regions_tell_a_zero_page_from_an_empty_bucket() {
        let zero = [0u8; BUCKET_SIZE];
        assert!(bucket_marked(&zero, INDEX_SPARSE));
        assert!(!bucket_marked(&zero, INDEX_SEALED));
    }

    #[test]
    fn zero_bucket_is_valid_and_empty() {
        let b = [0u8; BUCKET_SIZE];
        assert!(bucket_crc_ok(&b));
        let mut b2 = b;
        b2[100] = 1;
        assert!(!bucket_crc_ok(&b2));
        let crc = bucket_crc(&b2);
        b2[..4].copy_from_slice(&crc.to_le_bytes());
        assert!(bucket_crc_ok(&b2));
    }

    /// docs/FORMAT.md states these numbers; keep the two in step.
    #[test]
    fn format_doc_matches_constants() {
        let doc = include_str!("../docs/FORMAT.md");
        for needle in [
            format!("magic `{}`", "MAPKV\\0\\r\\n"),
            format!("major version {VERSION_MAJOR}"),
            format!("minor version {VERSION_MINOR}"),
            format!("page size {PAGE}"),
            format!("{SLOTS_PER_BUCKET} slots"),
            format!("{SLOT_SIZE}-byte slots"),
            format!("{RECORD_HEADER}-byte record header"),
            format!("PUT = {KIND_PUT}"),
            format!("DELETE = {KIND_DELETE}"),
            format!("JUMP = {KIND_JUMP}"),
            format!("PAD = {KIND_PAD}"),
            format!("BATCH_MORE = {FLAG_BATCH_MORE}"),
            format!("CLEAN = {STATE_CLEAN}"),
            format!("DIRTY = {STATE_DIRTY}"),
            format!("CHECKPOINTING = {STATE_CHECKPOINTING}"),
            format!("slot A at {}", checkpoint_off(0)),
            format!("slot B at {}", checkpoint_off(1)),
        ] {
            assert!(
                doc.contains(&needle),
                "docs/FORMAT.md does not say `{needle}`"
            );
        }
    }
}
