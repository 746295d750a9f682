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
//! Module map (dependencies point down):
//! - [`format`]: the on-disk format, byte by byte (pure).
//! - `map`: the mapping, file growth, syncs (the only `unsafe`).
//! - `log`, `index`: record scanning; hash buckets and the in-memory delta.
//! - `state`, `recovery`, `store`, `iter`, `compact`: the store itself.
//! - [`sim`]: a power-loss simulator for crash testing.

mod anon;
mod batch;
mod compact;
mod error;
pub mod format;
mod index;
mod iter;
mod log;
mod map;
mod options;
mod recovery;
pub mod sim;
mod state;
mod stats;
mod store;

pub use batch::Batch;
pub use error::{Error, Result};
pub use iter::Iter;
pub use map::sys;
pub use map::{SyncEvent, SyncObserver};
pub use options::{AccessPattern, Durability, Options};
pub use recovery::VerifyReport;
pub use stats::{RecoveryReport, Stats};
pub use store::Store;

/// The README's example, compiled and run as a doctest.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
