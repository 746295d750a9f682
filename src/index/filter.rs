//! [`KeyFilter`]: an in-memory Bloom filter over the keys in the index buckets, so that a
//! lookup of a missing key usually touches one cache line of this process's memory
//! instead of a random bucket page of the mapping.
//!
//! Why: a miss that probes the buckets costs a TLB miss and one or two cache misses in a
//! random 4 KiB page of the index (64 MiB at a million keys), about as much as a hit. The
//! filter is a split-block Bloom filter: one 32-byte block per key (half a cache line),
//! eight bits in it, one in each 32-bit lane; 12 bits per key at the most keys it is
//! built for (the most its index region holds before it grows): under 1 % false
//! positives then, fewer while the region fills. It lives in an anonymous mapping with
//! transparent huge pages asked for (a handful of TLB entries for the whole filter).
//!
//! The filter only ever *adds* keys: a key deleted from the buckets keeps its bits (a
//! false positive, never a false negative). Lookups consult it only once it is
//! [`ready`](KeyFilter::ready): built from every bucket of one index region by a
//! background thread (`store::filter`), with every key a checkpoint added to the buckets
//! since inserted as well. The rules that keep "not in the filter" meaning "not in the
//! buckets" are in `store::filter`.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// Bits per key at the capacity the filter is built for.
const BITS_PER_KEY: u64 = 12;
/// Bits in one block (eight 32-bit lanes).
const BLOCK_BITS: u64 = 256;
const LANES: usize = 8;
/// One odd multiplier per lane: each picks a bit of its lane from the same 32 hash bits.
const SALT: [u32; LANES] = [
    0x47b6_137b,
    0x4497_4d91,
    0x8824_ad5b,
    0xa2b7_289d,
    0x7054_95c7,
    0x2df1_424b,
    0x9efc_4947,
    0x5c6b_fb31,
];

/// A Bloom filter over key hashes (see the module docs). Shared between the lookups
/// (any thread), the thread that builds it and the checkpoints that insert into it: every
/// word is atomic, and inserts are `fetch_or`s, so they compose in any order.
pub(crate) struct KeyFilter {
    /// Eight lanes per block.
    words: crate::map::AtomicWords,
    blocks: u64,
    /// Keys the filter was sized for.
    capacity: u64,
    inserted: AtomicU64,
    ready: AtomicBool,
    /// The build found a damaged bucket: the filter is never used (lookups must reach the
    /// bucket to report the damage).
    abandoned: AtomicBool,
}

impl std::fmt::Debug for KeyFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFilter")
            .field("bytes", &self.bytes())
            .field("capacity", &self.capacity)
            .field("inserted", &self.inserted.load(Ordering::Relaxed))
            .field("ready", &self.ready())
            .finish()
    }
}

/// Block and lane bits of a key hash. The index uses the hash's low bits for the bucket
/// and its high half for the slot; the filter mixes the whole hash again so that the keys
/// of one bucket spread over all blocks.
fn split(hash: u64, blocks: u64) -> (usize, u32) {
    let m = (hash ^ (hash >> 29)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let m = m ^ (m >> 32);
    let block = ((m >> 32) * blocks) >> 32;
    // `block < blocks`, which is a `usize` count (the words are in memory).
    (block as usize, m as u32)
}

/// Address of the block of `hash` in a filter whose [`KeyFilter::layout`] is
/// `(base, blocks)`: for a prefetch only (a stale layout gives a harmless address).
pub(crate) fn block_addr(base: usize, blocks: u64, hash: u64) -> usize {
    let (block, _) = split(hash, blocks);
    base.wrapping_add(block.wrapping_mul(LANES * 4))
}

impl KeyFilter {
    /// An empty filter sized for `keys` keys (at least a few thousand), or `None` if the
    /// memory cannot be had (lookups then go to the buckets, as without a filter).
    pub(crate) fn with_capacity(keys: u64) -> Option<KeyFilter> {
        let capacity = keys.max(4096);
        let blocks = (capacity * BITS_PER_KEY).div_ceil(BLOCK_BITS);
        // Below 2^32 blocks, so `split`'s multiply-shift cannot overflow.
        let blocks = blocks.min(u64::from(u32::MAX));
        let words = crate::map::AtomicWords::zeroed(usize::try_from(blocks).ok()? * LANES)?;
        Some(KeyFilter {
            words,
            blocks,
            capacity,
            inserted: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            abandoned: AtomicBool::new(false),
        })
    }

    fn lanes(&self, block: usize) -> &[AtomicU32] {
        // `block < blocks`: always in bounds.
        self.words
            .words()
            .get(block * LANES..(block + 1) * LANES)
            .unwrap_or(&[])
    }

    /// Where the filter's words start, and its block count: what [`block_addr`] needs.
    pub(crate) fn layout(&self) -> (usize, u64) {
        (self.words.words().as_ptr() as usize, self.blocks)
    }

    /// Adds a key hash.
    pub(crate) fn insert(&self, hash: u64) {
        let (block, h) = split(hash, self.blocks);
        for (lane, salt) in self.lanes(block).iter().zip(SALT) {
            lane.fetch_or(1 << (h.wrapping_mul(salt) >> 27), Ordering::Relaxed);
        }
        self.inserted.fetch_add(1, Ordering::Relaxed);
    }

    /// False if no key with this hash was ever inserted; true if one may have been.
    #[inline]
    pub(crate) fn may_contain(&self, hash: u64) -> bool {
        let (block, h) = split(hash, self.blocks);
        self.lanes(block).iter().zip(SALT).all(|(lane, salt)| {
            lane.load(Ordering::Relaxed) & (1 << (h.wrapping_mul(salt) >> 27)) != 0
        })
    }

    /// True once the filter covers every key of its index region (see the module docs).
    #[inline]
    pub(crate) fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub(crate) fn set_ready(&self) {
        if !self.abandoned.load(Ordering::Acquire) {
            self.ready.store(true, Ordering::Release);
        }
    }

    /// Never to be used (a damaged bucket, or its build could not finish).
    pub(crate) fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
        self.ready.store(false, Ordering::Release);
    }

    /// Memory the filter takes.
    pub(crate) fn bytes(&self) -> u64 {
        self.blocks * BLOCK_BITS / 8
    }

    /// More keys went in than it was sized for: its false-positive rate is climbing, and
    /// a new one should be built.
    pub(crate) fn overfull(&self) -> bool {
        self.inserted.load(Ordering::Relaxed) > self.capacity.saturating_mul(2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(i: u64) -> u64 {
        crate::format::key_hash(7, &i.to_le_bytes())
    }

    #[test]
    fn never_a_false_negative_and_few_false_positives() {
        let f = KeyFilter::with_capacity(100_000).expect("filter");
        for i in 0..100_000 {
            f.insert(hash(i));
        }
        assert!((0..100_000).all(|i| f.may_contain(hash(i))));
        let fp = (1_000_000..1_100_000)
            .filter(|&i| f.may_contain(hash(i)))
            .count();
        // About 0.5 % at 12 bits per key; a broken mix or lane choice shows as several %.
        assert!(fp < 1_000, "{fp} false positives in 100,000");
        assert!(!f.overfull());
    }

    #[test]
    fn keys_of_one_bucket_spread_over_the_blocks() {
        // Hashes that share their low 20 bits (one bucket of a large index).
        let f = KeyFilter::with_capacity(50_000).expect("filter");
        let same_bucket: Vec<u64> = (0..u64::MAX)
            .map(hash)
            .filter(|h| h & 0xfff == 0x123)
            .take(2_000)
            .collect();
        let blocks: std::collections::HashSet<usize> =
            same_bucket.iter().map(|&h| split(h, f.blocks).0).collect();
        // 2,000 keys thrown at random into `blocks` blocks land in about
        // `blocks * (1 - e^(-2000 / blocks))` distinct ones; all in a few blocks would
        // mean the mix keeps the bucket's bits.
        let b = f.blocks as f64;
        let expected = b * (1.0 - (-2_000.0 / b).exp());
        assert!(
            blocks.len() as f64 > 0.95 * expected,
            "{} blocks of {}, about {expected:.0} expected",
            blocks.len(),
            f.blocks
        );
    }

    #[test]
    fn abandoned_is_never_ready() {
        let f = KeyFilter::with_capacity(10).expect("filter");
        f.abandon();
        f.set_ready();
        assert!(!f.ready());
    }
}
