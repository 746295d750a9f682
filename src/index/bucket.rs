//! One bucket page of the index: slots, probing, and rewriting it in memory.

use crate::format::{
    bucket_crc, home_slot, slot_off, BUCKET_COUNT_OFF, BUCKET_MAGIC, BUCKET_MAGIC_OFF, BUCKET_SIZE,
    SLOTS_PER_BUCKET, SLOT_SIZE,
};

/// Reads slot `i` of a bucket: (hash, record offset). Offset 0 means empty.
#[must_use]
pub(crate) fn slot(bucket: &[u8], i: usize) -> (u64, u64) {
    let at = slot_off(i);
    match bucket.get(at..at + SLOT_SIZE) {
        Some(s) => {
            let (h, o) = s.split_at(8);
            (
                u64::from_le_bytes(h.try_into().unwrap_or([0; 8])),
                u64::from_le_bytes(o.try_into().unwrap_or([0; 8])),
            )
        }
        None => (0, 0),
    }
}

/// Number of used slots recorded in a bucket header.
#[must_use]
pub(crate) fn bucket_count(bucket: &[u8]) -> usize {
    bucket
        .get(BUCKET_COUNT_OFF..BUCKET_COUNT_OFF + 2)
        .map_or(0, |b| usize::from(u16::from_le_bytes([b[0], b[1]])))
}

/// Probes `bucket` for `hash`. For every slot whose stored hash matches, `is_key(offset)`
/// decides whether that record holds the wanted key (hash collisions are possible).
/// Returns the slot index and record offset of the match.
///
/// # Errors
/// Whatever `is_key` returns (a damaged record).
pub(crate) fn probe<E>(
    bucket: &[u8],
    hash: u64,
    is_key: impl FnMut(u64) -> Result<bool, E>,
) -> Result<Option<(usize, u64)>, E> {
    probe_with(|i| slot(bucket, i), hash, is_key)
}

/// [`probe`] over a bucket whose slots `slot(i)` reads (a bucket another process may
/// rewrite meanwhile is read word by word, atomically).
///
/// # Errors
/// Whatever `is_key` returns.
pub(crate) fn probe_with<E>(
    slot: impl Fn(usize) -> (u64, u64),
    hash: u64,
    mut is_key: impl FnMut(u64) -> Result<bool, E>,
) -> Result<Option<(usize, u64)>, E> {
    let mut i = home_slot(hash);
    for _ in 0..SLOTS_PER_BUCKET {
        let (h, off) = slot(i);
        if off == 0 {
            return Ok(None);
        }
        if h == hash && is_key(off)? {
            return Ok(Some((i, off)));
        }
        i += 1;
        if i == SLOTS_PER_BUCKET {
            i = 0;
        }
    }
    Ok(None)
}

/// A bucket being edited in memory (checkpoint, growth, rebuild).
pub(crate) struct BucketBuf {
    pub(crate) bytes: Box<[u8; BUCKET_SIZE]>,
}

impl std::fmt::Debug for BucketBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BucketBuf {{ count: {} }}", self.count())
    }
}

/// The bucket is full: the index must grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BucketFull;

impl BucketBuf {
    pub(crate) fn empty() -> Self {
        BucketBuf {
            bytes: Box::new([0u8; BUCKET_SIZE]),
        }
    }

    /// An empty bucket, sealed: what every bucket of a new region starts as.
    pub(crate) fn empty_sealed() -> Self {
        let mut b = Self::empty();
        b.seal();
        b
    }

    pub(crate) fn from_bytes(b: &[u8]) -> Self {
        let mut s = Self::empty();
        let n = b.len().min(BUCKET_SIZE);
        s.bytes[..n].copy_from_slice(&b[..n]);
        s
    }

    pub(crate) fn count(&self) -> usize {
        bucket_count(&self.bytes[..])
    }

    fn set_count(&mut self, n: usize) {
        let n = u16::try_from(n).unwrap_or(u16::MAX);
        self.bytes[BUCKET_COUNT_OFF..BUCKET_COUNT_OFF + 2].copy_from_slice(&n.to_le_bytes());
    }

    fn set_slot(&mut self, i: usize, hash: u64, off: u64) {
        let at = slot_off(i);
        self.bytes[at..at + 8].copy_from_slice(&hash.to_le_bytes());
        self.bytes[at + 8..at + 16].copy_from_slice(&off.to_le_bytes());
    }

    /// Points the slot found by `found` (from [`probe`]) at `off`, or inserts a new slot.
    pub(crate) fn upsert(
        &mut self,
        hash: u64,
        off: u64,
        found: Option<usize>,
    ) -> Result<(), BucketFull> {
        if let Some(i) = found {
            self.set_slot(i, hash, off);
            return Ok(());
        }
        if self.count() >= SLOTS_PER_BUCKET {
            return Err(BucketFull);
        }
        // Bounded walk: the count comes from the file and may lie about free slots.
        let mut i = home_slot(hash);
        for _ in 0..SLOTS_PER_BUCKET {
            if slot(&self.bytes[..], i).1 == 0 {
                self.set_slot(i, hash, off);
                self.set_count(self.count() + 1);
                return Ok(());
            }
            i = (i + 1) % SLOTS_PER_BUCKET;
        }
        Err(BucketFull)
    }

    /// Removes slot `i`, shifting later members of its probe run back so that every
    /// remaining key stays reachable from its home slot (no tombstones).
    pub(crate) fn remove(&mut self, mut i: usize) {
        let n = SLOTS_PER_BUCKET;
        self.set_slot(i, 0, 0);
        let mut j = i;
        // Terminates: slot i is empty, so the walk meets an empty slot within n steps.
        loop {
            j = (j + 1) % n;
            let (h, off) = slot(&self.bytes[..], j);
            if off == 0 {
                break;
            }
            let k = home_slot(h);
            // Move j into the hole at i unless j's home lies cyclically in (i, j].
            let in_range = if i <= j {
                i < k && k <= j
            } else {
                i < k || k <= j
            };
            if !in_range {
                self.set_slot(i, h, off);
                self.set_slot(j, 0, 0);
                i = j;
            }
        }
        self.set_count(self.count().saturating_sub(1));
    }

    /// Recomputes the stored checksum; call before writing the bucket out.
    pub(crate) fn seal(&mut self) {
        self.bytes[BUCKET_MAGIC_OFF..BUCKET_MAGIC_OFF + 2]
            .copy_from_slice(&BUCKET_MAGIC.to_le_bytes());
        let crc = bucket_crc(&self.bytes[..]);
        self.bytes[..4].copy_from_slice(&crc.to_le_bytes());
    }

    /// Every used slot: (hash, offset).
    pub(crate) fn entries(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        (0..SLOTS_PER_BUCKET)
            .map(|i| slot(&self.bytes[..], i))
            .filter(|&(_, off)| off != 0)
    }
}

/// `n` sealed empty buckets, back to back (the bytes of new, empty index space).
pub(crate) fn empty_buckets(n: usize) -> Vec<u8> {
    let one = BucketBuf::empty_sealed();
    let mut out = Vec::with_capacity(n * BUCKET_SIZE);
    for _ in 0..n {
        out.extend_from_slice(&one.bytes[..]);
    }
    out
}

/// Writes sealed empty buckets over `[b, end)` of a region through `write(offset_in_region_of_bucket, bytes)`,
/// at most 256 buckets (1 MiB) per call.
pub(crate) fn fill_empty<E>(
    b: u64,
    end: u64,
    mut write: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<(), E> {
    const CHUNK: u64 = 256;
    if b >= end {
        return Ok(());
    }
    let chunk = empty_buckets(CHUNK.min(end - b) as usize);
    let mut at = b;
    while at < end {
        let n = CHUNK.min(end - at);
        write(at, &chunk[..n as usize * BUCKET_SIZE])?;
        at += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(b: &BucketBuf, hash: u64, off: u64) -> Option<usize> {
        probe::<()>(&b.bytes[..], hash, |o| Ok(o == off))
            .unwrap()
            .map(|(i, _)| i)
    }

    #[test]
    fn fill_bucket_remove_everything_in_mixed_order() {
        // Hashes chosen so many share home slots (probe runs wrap around the bucket end).
        let hashes: Vec<u64> = (0..SLOTS_PER_BUCKET as u64)
            .map(|i| ((i % 7 + 250) << 32) | i)
            .collect();
        let mut b = BucketBuf::empty();
        for (i, &h) in hashes.iter().enumerate() {
            b.upsert(h, 100 + i as u64, None).unwrap();
        }
        assert_eq!(b.count(), SLOTS_PER_BUCKET);
        assert_eq!(b.upsert(12345 << 32, 1, None), Err(BucketFull));
        for (i, &h) in hashes.iter().enumerate() {
            assert!(find(&b, h, 100 + i as u64).is_some(), "key {i} reachable");
        }
        // Remove every third, then check the rest are still reachable.
        for (i, &h) in hashes.iter().enumerate().filter(|(i, _)| i % 3 == 0) {
            let s = find(&b, h, 100 + i as u64).unwrap();
            b.remove(s);
        }
        for (i, &h) in hashes.iter().enumerate() {
            let found = find(&b, h, 100 + i as u64).is_some();
            assert_eq!(found, i % 3 != 0, "key {i}");
        }
        assert_eq!(b.entries().count(), b.count());
        b.seal();
        assert!(crate::format::bucket_crc_ok(&b.bytes[..]));
    }

    #[test]
    fn upsert_into_a_full_bucket_with_a_lying_count_terminates() {
        let mut b = BucketBuf::empty();
        for i in 0..SLOTS_PER_BUCKET as u64 {
            b.upsert(i << 32, i + 1, None).unwrap();
        }
        b.bytes[BUCKET_COUNT_OFF..BUCKET_COUNT_OFF + 2].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(b.upsert(77, 1, None), Err(BucketFull));
    }

    #[test]
    fn upsert_replaces_in_place() {
        let mut b = BucketBuf::empty();
        b.upsert(7, 100, None).unwrap();
        let s = find(&b, 7, 100).unwrap();
        b.upsert(7, 200, Some(s)).unwrap();
        assert_eq!(b.count(), 1);
        assert!(find(&b, 7, 200).is_some());
    }
}
