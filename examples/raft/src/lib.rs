//! mapkv as the storage of an [openraft](https://docs.rs/openraft/0.9) cluster.
//!
//! openraft (0.9 line, the v2 storage traits behind its `storage-v2` feature) asks an
//! application for two things: a [`RaftLogStorage`](openraft::storage::RaftLogStorage)
//! (the replicated log, the vote, the committed and purged marks) and a
//! [`RaftStateMachine`](openraft::storage::RaftStateMachine) (the applied data and its
//! snapshots). This crate implements both on mapkv:
//!
//! - [`LogStore`]: one mapkv store (`log.mkv`) holds the log entries, the vote, the
//!   committed mark, the purge mark and the last-entry mark, in separate key spaces.
//! - [`StateMachineStore`]: one mapkv store (`sm/sm.mkv`) holds the key-value data of the
//!   state machine with its last-applied log id and membership; its snapshot is a mapkv
//!   store file too (`sm/snapshot.mkv`), made with [`mapkv::Store::backup`].
//!
//! For comparison, [`memory`] holds the same two traits on `BTreeMap`s (nothing durable),
//! [`network`] an in-process network (a router of [`openraft::Raft`] handles that can mark
//! a node down) and [`cluster`] a small harness that runs a cluster of nodes in one process
//! on either storage, with the fail-over scenario the `cluster` example prints and the
//! tests run.
//!
//! # How openraft's durability contract maps onto mapkv
//!
//! | openraft asks | mapkv does |
//! | --- | --- |
//! | `append`: entries readable when it returns, callback only once durable | one atomic [`mapkv::Batch`] (entries + last-entry mark) written into a store opened with [`Durability::None`](mapkv::Durability::None) (a `memcpy` into the mapping, readable at once); the callback goes to a flusher thread that calls [`Store::flush`](mapkv::Store::flush) (`fdatasync` of the appended range) and then completes every callback queued before that flush began, in order ([`LogSync::GroupCommit`], the default). With [`LogSync::Always`] the store uses [`Durability::Always`](mapkv::Durability::Always) instead and the callback is completed inline. |
//! | `save_vote`: durable before it returns | the vote is put and the store flushed before returning (one `fdatasync`, which also covers every earlier append: writes to a store are durable in order) |
//! | all log I/O serialized | every write goes through one store, whose writes are applied and recovered in order: after any crash the store holds a *prefix* of the writes, so a vote, a committed mark or a purge mark never survives without the entries written before it |
//! | `truncate(id)`: delete `[id.index, last]`, no hole | one batch: deletes of those entries + the new last-entry mark |
//! | `purge(id)`: delete `[first, id.index]`, no hole | one batch: deletes of those entries + the purge mark (+ the last-entry mark when everything is purged) |
//! | `save_committed` (optional) | put, not flushed on its own: it becomes durable with the next flush, after the entries it names |
//! | `apply`: may be volatile if snapshots are durable | one batch per `apply` call (data + last-applied + membership), [`Durability::None`](mapkv::Durability::None): after a crash the state machine is some earlier applied state and openraft re-applies the committed entries from the log |
//! | snapshots durable | a snapshot is a [`Store::backup`](mapkv::Store::backup) of the state machine (a consistent, compacted, synced copy taken while `apply` goes on), with its metadata put into the copy, renamed into place and the directory synced |
//! | `install_snapshot`: replace the state machine | the received bytes are written and synced as `snapshot.mkv` (they are a mapkv store), then backed up over `sm.mkv` (rename + directory sync) and reopened. Opening a state machine whose snapshot is newer than its applied id (a crash between the two steps, or a state machine that lost unflushed applies) restores it from the snapshot the same way. |
//!
//! openraft 0.9 itself waits for each append's callback before its core task goes on
//! (`RaftCore::append_to_log` awaits it), and runs one append per client write on the
//! leader. So in 0.9 the callback buys no overlap of the local sync with replication, and
//! a leader's write rate is bounded by one `fdatasync` per client write whatever the
//! number of clients (see the `bench` example). What [`LogSync::GroupCommit`] still buys:
//! the sync runs on the flusher thread while the core task awaits it, instead of blocking a
//! runtime worker thread (measured faster than [`LogSync::Always`], especially for one
//! client); and a storage already written for an openraft that overlaps log I/O.
//!
//! mapkv's index is a hash: iteration is in log order, not key order. The log therefore
//! never iterates: entry keys are `e` + the big-endian index, the range of present entries
//! is kept as two marks (purged and last), and a range read is one `get` per index (there
//! are no holes).
//!
//! All storage errors (mapkv's, a decoding error of a stored value, file system errors of
//! the snapshot files) are returned as [`openraft::StorageError`]; nothing here panics on
//! them.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

pub mod cluster;
mod codec;
mod log_store;
pub mod memory;
pub mod network;
mod state_machine;

pub use log_store::{LogReader, LogStore, LogSync};
pub use state_machine::{SmReader, SnapshotBuilder, StateMachineStore};

openraft::declare_raft_types!(
    /// The openraft type configuration used by every store and node of this crate:
    /// [`Request`]s in, [`Response`]s out, `u64` node ids, [`openraft::BasicNode`] nodes,
    /// snapshots as `Cursor<Vec<u8>>` (the bytes of a snapshot file).
    pub TypeConfig:
        D = Request,
        R = Response,
);

/// A node id.
pub type NodeId = u64;

/// A log entry of this crate's type configuration.
pub type Entry = openraft::Entry<TypeConfig>;

/// The error every storage method returns.
pub type StorageError = openraft::StorageError<NodeId>;

/// A write to the replicated key-value state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Sets `key` to `value`.
    Set {
        /// The key.
        key: String,
        /// The new value.
        value: String,
    },
    /// Removes `key`.
    Delete {
        /// The key.
        key: String,
    },
}

/// What applying a [`Request`] (or a blank or membership entry) returns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The value the key holds after the request (`None` after a delete, and for entries
    /// that are not requests).
    pub value: Option<String>,
}
