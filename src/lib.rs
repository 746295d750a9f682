//! mapkv: an embedded, persistent key-value store in one file.
//!
//! An append-only, checksummed record log and a persistent hash index live in one file,
//! mapped `MAP_SHARED`. Reads are served straight from the mapping; opening a cleanly
//! closed store costs O(1); durability is a policy you pick ([`Durability`]).
//!
//! ```
//! use mapkv::{Batch, Durability, Options, Store};
//! # fn main() -> mapkv::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! # let path = dir.path().join("data.mkv");
//! let store = Store::open(&path, Options::default().durability(Durability::Always))?;
//! store.put(b"k", b"v")?;
//! assert_eq!(store.get(b"k")?, Some(b"v".to_vec()));
//! assert_eq!(store.get_with(b"k", |v| v.len())?, Some(1));
//! let mut b = Batch::new();
//! b.put(b"a", b"1").delete(b"k");
//! store.write(&b)?;
//! assert_eq!(store.len(), 1);
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! Modules are layered; each uses only the ones above it in this list:
//!
//! - [`format`](mod@format): the on-disk format, byte by byte, including the key hash
//!   (pure: no I/O, no `unsafe`).
//! - `error`, `options`, `observe`, `batch`, `stats`: plain types of the public API.
//! - `anon`, `map`: memory and the mapped file, file locks and syncs (the only `unsafe`,
//!   but for the two priority calls of `store::threads`).
//! - `log`: scanning the record log; `index::bucket`, `index::delta`: the hash buckets in
//!   the file and the in-memory delta of changes since the last checkpoint.
//! - `state`: the *read view*: a mapping, the index geometry and the deltas, everything a
//!   lookup needs and nothing of the writer's.
//! - `resolve`: counter resolution's lookups (what each write replaced), made outside
//!   the state lock and validated when their outcomes are counted.
//! - `store`: the [`Store`] handle and its parts: `open` (recovery), `commit` (the write
//!   path), `sync` (group commit), `grow`, `background`, `checkpoint`, `reindex`,
//!   `buckets`, `slots`, `counters`, `compact`, `iter`, `verify`, `threads` (the store's
//!   own threads, at a lower priority).
//! - `sim` (feature `sim`): a crash simulator for testing, not part of the store.

mod anon;
mod batch;
mod error;
pub mod format;
mod index;
mod log;
mod map;
mod observe;
mod options;
mod resolve;
#[cfg(feature = "sim")]
pub mod sim;
mod state;
mod stats;
mod store;

pub use batch::Batch;
pub use error::{Error, Result};
pub use observe::{SyncEvent, SyncObserver};
pub use options::{AccessPattern, AutoCompact, Durability, Options};
pub use stats::{LiveStats, MaintenanceStats, RecoveryReport, Stats};
pub use store::{Change, Follower, Iter, PrefixIter, Store, VerifyReport};

/// The README's example, compiled and run as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
