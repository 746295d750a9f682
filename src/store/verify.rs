//! [`Store::verify`](crate::Store::verify): every checksum, and the index against the log.

use std::collections::HashMap;

use super::inner::Inner;
use crate::error::{Error, Result};
use crate::format::{bucket_crc_ok, bucket_of, KIND_PUT};
use crate::index::{key_hash, BucketBuf};
use crate::log::{scan, StopReason};

/// What [`Store::verify`](crate::Store::verify) checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Records whose checksums were verified (jumps included).
    pub records: u64,
    /// Complete writes found in the log.
    pub writes: u64,
    /// Live keys according to the log, all of which the index finds.
    pub live_keys: u64,
    /// Index buckets whose checksums were verified.
    pub buckets: u64,
    /// Bytes of log scanned.
    pub log_bytes: u64,
}

pub(crate) fn verify(inner: &Inner) -> Result<VerifyReport> {
    // Step 3 compares the counters: make them exact, then keep that snapshot.
    inner.collect_failed_job();
    let _resolving = inner.resolving.lock();
    inner.resolve_counters_locked();
    // Every bucket is read: none may change meanwhile (the gate before the state lock).
    let _gate = inner.index_gate.read();
    let mut st = inner.state.write();
    st.resolve(usize::MAX);
    let st = parking_lot::RwLockWriteGuard::downgrade(st);
    let map = &st.map;
    let end = map.published();
    let mut rep = VerifyReport::default();
    // 1. Every record of the log, and the live set it implies.
    let mut live: HashMap<Vec<u8>, u64> = HashMap::new();
    let scan_end = scan(map.published_bytes(), st.seed, st.log_start, end, |recs| {
        for r in recs {
            rep.records += 1;
            let key = map
                .read(r.key_off(), u64::from(r.key_len))
                .unwrap_or(&[])
                .to_vec();
            if r.kind == KIND_PUT {
                live.insert(key, r.offset);
            } else {
                live.remove(&key);
            }
        }
    });
    rep.writes = scan_end.writes;
    rep.log_bytes = scan_end.bytes;
    match scan_end.stop {
        StopReason::End if scan_end.valid_end == end => {}
        StopReason::End => {
            return Err(Error::corrupt(
                scan_end.valid_end,
                "log ends before its recorded end",
            ))
        }
        StopReason::Invalid(p, _) | StopReason::IncompleteBatch(p) | StopReason::BadJump(p) => {
            return Err(Error::corrupt(p, "record fails verification"))
        }
    }
    // 2. Every bucket: checksum, slots point at valid records of the right key.
    let mut in_buckets = 0u64;
    if !st.delta_only {
        for b in 0..st.index.buckets {
            let bytes = st.bucket(b)?;
            let boff = st.index.bucket_off(b);
            if !bucket_crc_ok(bytes) {
                return Err(Error::corrupt(boff, "index bucket checksum mismatch"));
            }
            let buf = BucketBuf::from_bytes(bytes);
            if buf.entries().count() != buf.count() {
                return Err(Error::corrupt(boff, "index bucket count mismatch"));
            }
            for (h, off) in buf.entries() {
                let rec = crate::format::decode_record(map.published_bytes(), st.seed, off, end)
                    .map_err(|_| Error::corrupt(boff, "index slot points at an invalid record"))?;
                let key = st.key_of(&rec)?;
                if key_hash(st.seed, key) != h || bucket_of(h, st.index.buckets) != b {
                    return Err(Error::corrupt(
                        boff,
                        "index slot hash does not match its key",
                    ));
                }
                in_buckets += 1;
            }
            rep.buckets += 1;
        }
    }
    // 3. The index (buckets + delta) finds exactly the live set.
    for (key, off) in &live {
        match st.find_live(key_hash(st.seed, key), key)? {
            Some(r) if r.offset == *off => {}
            _ => {
                return Err(Error::corrupt(
                    *off,
                    "index does not find the newest record of a key",
                ))
            }
        }
    }
    rep.live_keys = live.len() as u64;
    if st.counters.live_keys != rep.live_keys {
        return Err(Error::corrupt(
            0,
            "live key count in the checkpoint does not match the log",
        ));
    }
    let _ = in_buckets;
    Ok(rep)
}
