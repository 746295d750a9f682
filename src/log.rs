//! The append-only record log: scanning it from a position, batch by batch.
//!
//! The log is a chain of extents. Records are appended at the tail of the current extent;
//! when the index grows, a JUMP record moves the tail past the new index region. A scan
//! follows jumps and stops at the first position that holds no valid record: unwritten
//! (zero) space after a clean close, or a torn or damaged record after a crash.
//!
//! Past such a stop, [`durable_evidence`] and [`next_record`] look further: the durable
//! watermarks of the valid records found there tell recovery whether the stop lies below
//! what was durable (damage) or above it (a torn tail).

use crate::format::{
    decode_record, jump_target, page_up, watermark, RecordError, RecordRef, FLAG_BATCH_MORE,
    KIND_JUMP, KIND_PAD, RECORD_HEADER,
};

/// Why a scan stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopReason {
    /// Zero bytes: the normal end of the log.
    End,
    /// A record that does not verify (torn write or damage) at this offset.
    Invalid(u64, RecordError),
    /// A batch whose last record is missing: it is dropped as a whole.
    IncompleteBatch(u64),
    /// A jump record pointing backwards or outside the file.
    BadJump(u64),
}

/// Result of [`scan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScanEnd {
    /// Offset one past the last complete write; the log's valid end (new appends go here).
    pub(crate) valid_end: u64,
    /// Record bytes (including jumps) in the complete writes scanned.
    pub(crate) bytes: u64,
    /// Complete writes (a batch counts once) scanned.
    pub(crate) writes: u64,
    /// Bytes that jumps passed over (index regions claimed behind them, and the padding
    /// up to each region's page).
    pub(crate) skipped: u64,
    /// Why the scan stopped.
    pub(crate) stop: StopReason,
}

/// Scans the log in `file[..limit]` from `start`, calling `on_write` with the records of
/// every complete write (a single record, or all records of a batch) in log order. Jump
/// records are followed, not reported. Never reads past `limit`; always terminates
/// (every step moves strictly forward).
pub(crate) fn scan(
    file: &[u8],
    seed: u64,
    start: u64,
    limit: u64,
    mut on_write: impl FnMut(&[RecordRef]),
) -> ScanEnd {
    let mut pos = start;
    let mut valid_end = start;
    let mut bytes = 0u64;
    let mut pending_bytes = 0u64;
    let mut writes = 0u64;
    let mut skipped = 0u64;
    let mut batch: Vec<RecordRef> = Vec::new();
    let stop = loop {
        if pos >= limit && batch.is_empty() {
            break StopReason::End;
        }
        let rec = match decode_record(file, seed, pos, limit) {
            Ok(r) => r,
            Err(RecordError::Zero) if batch.is_empty() => break StopReason::End,
            Err(e) if batch.is_empty() => break StopReason::Invalid(pos, e),
            Err(_) => break StopReason::IncompleteBatch(valid_end),
        };
        if rec.kind == KIND_JUMP {
            let target = jump_target(file, &rec);
            match target {
                Some(t) if batch.is_empty() && t <= limit && t > rec.end() && t == page_up(t) => {
                    bytes += rec.len();
                    skipped += t - rec.end();
                    pos = t;
                    valid_end = t;
                    continue;
                }
                _ => break StopReason::BadJump(pos),
            }
        }
        if rec.kind == KIND_PAD {
            // Damaged bytes a salvage covered: dead, and a batch they interrupt is dropped
            // (its start was covered by the same padding when the salvage ran).
            bytes += pending_bytes + rec.len();
            pending_bytes = 0;
            batch.clear();
            pos = rec.end();
            valid_end = pos;
            continue;
        }
        pending_bytes += rec.len();
        pos = rec.end();
        batch.push(rec);
        if rec.flags & FLAG_BATCH_MORE == 0 {
            on_write(&batch);
            batch.clear();
            bytes += pending_bytes;
            pending_bytes = 0;
            writes += 1;
            valid_end = pos;
        }
    };
    ScanEnd {
        valid_end,
        bytes,
        writes,
        skipped,
        stop,
    }
}

/// How many zero bytes in a row end a search for records past a stop: a run this long is
/// unwritten space, not a page lost by a power loss in the middle of the tail.
pub(crate) const ZERO_RUN_END: u64 = 1 << 20;

/// The first valid record at an offset in `from..limit`, searching byte by byte (records
/// are not aligned) and skipping zeros a word at a time. `None` if there is none before
/// `limit` or before a run of [`ZERO_RUN_END`] zero bytes.
pub(crate) fn next_record(file: &[u8], seed: u64, from: u64, limit: u64) -> Option<RecordRef> {
    let limit = limit.min(file.len() as u64);
    let mut pos = from;
    let mut zeros_from = None::<u64>;
    while pos + RECORD_HEADER as u64 <= limit {
        let at = pos as usize;
        if file[at] == 0 {
            let run_start = *zeros_from.get_or_insert(pos);
            // Skip to the next non-zero byte, eight bytes at a time where aligned.
            let mut p = at + 1;
            while p < limit as usize && !p.is_multiple_of(8) && file[p] == 0 {
                p += 1;
            }
            while p + 8 <= limit as usize && file[p..p + 8] == [0u8; 8] {
                p += 8;
            }
            while p < limit as usize && file[p] == 0 {
                p += 1;
            }
            if (p as u64) - run_start >= ZERO_RUN_END {
                return None;
            }
            // A record header starts with its checksum, which may hold zero bytes, then
            // its kind, which never is zero: try the four offsets before the non-zero byte.
            let back = (p as u64).saturating_sub(4).max(pos);
            for q in back..p as u64 {
                if let Ok(rec) = decode_record(file, seed, q, limit) {
                    return Some(rec);
                }
            }
            pos = p as u64;
            continue;
        }
        zeros_from = None;
        if let Ok(rec) = decode_record(file, seed, pos, limit) {
            return Some(rec);
        }
        pos += 1;
    }
    None
}

/// The highest durable watermark (see [`watermark`]) carried by a valid record in
/// `from..limit`, found by walking record to record and searching past anything invalid;
/// 0 if none says anything. Stops at a run of [`ZERO_RUN_END`] zero bytes.
pub(crate) fn durable_evidence(file: &[u8], seed: u64, from: u64, limit: u64) -> u64 {
    let mut best = 0;
    let mut pos = from;
    while let Some(first) = next_record(file, seed, pos, limit) {
        let mut rec = first;
        loop {
            best = best.max(watermark(rec.offset, rec.durable));
            pos = match jump_target(file, &rec) {
                Some(t) if rec.kind == KIND_JUMP && t > rec.end() && t <= limit => t,
                _ => rec.end(),
            };
            match decode_record(file, seed, pos, limit) {
                Ok(r) => rec = r,
                Err(_) => break,
            }
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{encode_record, KIND_DELETE, KIND_PUT};

    fn log_of(recs: &[(u8, u8, &[u8], &[u8])], start: u64) -> Vec<u8> {
        let mut v = vec![0u8; start as usize];
        for &(kind, flags, k, val) in recs {
            let off = v.len() as u64;
            let mut r = Vec::new();
            encode_record(&mut r, 1, off, kind, flags, k, val, 0);
            v.extend_from_slice(&r);
        }
        v.extend_from_slice(&[0u8; 64]);
        v
    }

    #[test]
    fn scan_reports_writes_and_drops_incomplete_batches() {
        let file = log_of(
            &[
                (KIND_PUT, 0, b"a", b"1"),
                (KIND_PUT, FLAG_BATCH_MORE, b"b", b"2"),
                (KIND_DELETE, 0, b"a", b""),
                (KIND_PUT, FLAG_BATCH_MORE, b"c", b"3"),
            ],
            100,
        );
        let mut seen = Vec::new();
        let end = scan(&file, 1, 100, file.len() as u64, |w| seen.push(w.len()));
        assert_eq!(seen, vec![1, 2]);
        assert_eq!(end.writes, 2);
        assert!(matches!(end.stop, StopReason::IncompleteBatch(_)));
        assert_eq!(end.valid_end, 100 + end.bytes);
    }

    #[test]
    fn scan_stops_at_garbage_and_never_reads_past_limit() {
        let mut file = log_of(&[(KIND_PUT, 0, b"a", b"1"), (KIND_PUT, 0, b"b", b"2")], 0);
        let second = crate::format::record_len(1, 1);
        file[second as usize + 17] ^= 0xff;
        let end = scan(&file, 1, 0, file.len() as u64, |_| {});
        assert_eq!(end.valid_end, second);
        assert!(matches!(end.stop, StopReason::Invalid(o, RecordError::Checksum) if o == second));
        let end = scan(&file, 1, 0, 5, |_| {});
        assert_eq!(end.valid_end, 0);
    }
}
