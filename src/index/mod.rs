//! The hash index: 4 KiB buckets in the file, and the in-memory delta over them.
//!
//! The index is a power-of-two array of 4 KiB buckets in the file (see [`crate::format`]).
//! A key's bucket is chosen by the low bits of its 64-bit hash; inside the bucket, slots are
//! probed linearly from a home slot chosen by the high bits, wrapping within the bucket.
//! Keys never overflow into another bucket: a full bucket makes the index grow. That
//! keeps every bucket self-contained, which is what lets a checkpoint rewrite buckets one
//! at a time.
//!
//! Between checkpoints, the buckets in the file are not touched. Changes since the last
//! checkpoint live in the [`Delta`], an in-memory map from key hash to the offset of the
//! newest record for that key (a put or a delete). Lookups consult the delta first. A
//! checkpoint applies the delta to the buckets (`store/checkpoint.rs` has the protocol).
//!
//! - [`bucket`]: reading, probing and rewriting one bucket page.
//! - [`delta`]: the in-memory delta (its own open-addressing table).
//! - [`filter`]: a Bloom filter over the keys in the buckets, for lookups of missing keys.
//! - [`queue`]: the delta's queue of keys whose old records are not looked up yet, in
//!   chunks from a pool that the writer never has to allocate.

pub(crate) mod bucket;
pub(crate) mod delta;
pub(crate) mod filter;
pub(crate) mod queue;

pub(crate) use crate::format::key_hash;
pub(crate) use bucket::{probe, BucketBuf, BucketFull};
pub(crate) use delta::{sort_by_bucket, Delta, DeltaEntry, Retired, SlotHint, SpareTable};
