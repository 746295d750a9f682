//! In-memory storage with the same types ([`TypeConfig`]): a `BTreeMap` log and a
//! `BTreeMap` state machine. Nothing is durable; it is the baseline of the benchmark
//! (what replication costs without any storage) and passes the same storage test suite.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StoredMembership, Vote,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::codec::{decode, encode, err};
use crate::{Entry, NodeId, Request, Response, StorageError, TypeConfig};

type Membership = StoredMembership<NodeId, openraft::BasicNode>;
type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

#[derive(Debug, Default)]
struct MemLog {
    entries: BTreeMap<u64, Entry>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    purged: Option<LogId<NodeId>>,
}

/// An in-memory [`RaftLogStorage`]; clones share the same log.
#[derive(Debug, Clone, Default)]
pub struct MemLogStore {
    log: Arc<Mutex<MemLog>>,
}

impl MemLogStore {
    /// An empty log.
    #[must_use]
    pub fn new() -> MemLogStore {
        MemLogStore::default()
    }
}

impl RaftLogReader<TypeConfig> for MemLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let log = self.log.lock();
        Ok(log.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for MemLogStore {
    type LogReader = MemLogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let log = self.log.lock();
        let last = log.entries.values().next_back().map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id: log.purged,
            last_log_id: last.or(log.purged),
        })
    }

    async fn get_log_reader(&mut self) -> MemLogStore {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.log.lock().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        Ok(self.log.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError> {
        self.log.lock().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        Ok(self.log.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        {
            let mut log = self.log.lock();
            for e in entries {
                log.entries.insert(e.log_id.index, e);
            }
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let mut log = self.log.lock();
        log.entries.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let mut log = self.log.lock();
        if log.purged.is_some_and(|p| p.index >= log_id.index) {
            return Ok(());
        }
        log.entries = log.entries.split_off(&log_id.index.saturating_add(1));
        log.purged = Some(log_id);
        Ok(())
    }
}

/// The state of a [`MemStateMachine`], and what its snapshots serialize.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct MemSm {
    applied: Option<LogId<NodeId>>,
    membership: Membership,
    data: BTreeMap<String, String>,
}

#[derive(Debug, Default)]
struct MemShared {
    sm: Mutex<MemSm>,
    snapshot: Mutex<Option<(Meta, Vec<u8>)>>,
    snapshots_built: Mutex<u64>,
    installed: Mutex<u64>,
}

/// An in-memory [`RaftStateMachine`]: a `BTreeMap`, snapshots serialized with postcard.
#[derive(Debug, Clone, Default)]
pub struct MemStateMachine {
    shared: Arc<MemShared>,
}

/// Reads the data of a [`MemStateMachine`].
#[derive(Debug, Clone)]
pub struct MemReader {
    shared: Arc<MemShared>,
}

/// Builds snapshots of a [`MemStateMachine`].
#[derive(Debug)]
pub struct MemSnapshotBuilder {
    shared: Arc<MemShared>,
}

impl MemStateMachine {
    /// An empty state machine.
    #[must_use]
    pub fn new() -> MemStateMachine {
        MemStateMachine::default()
    }

    /// A reader of the data.
    #[must_use]
    pub fn reader(&self) -> MemReader {
        MemReader {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl MemReader {
    /// The value of `key` on this node.
    #[must_use]
    pub fn get(&self, key: &str) -> Option<String> {
        self.shared.sm.lock().data.get(key).cloned()
    }

    /// How many snapshots were installed from a leader.
    #[must_use]
    pub fn snapshots_installed(&self) -> u64 {
        *self.shared.installed.lock()
    }
}

impl RaftSnapshotBuilder<TypeConfig> for MemSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let sm = self.shared.sm.lock().clone();
        let bytes =
            encode(&sm).map_err(|e| err(ErrorSubject::Snapshot(None), ErrorVerb::Write, &e))?;
        let n = {
            let mut n = self.shared.snapshots_built.lock();
            *n += 1;
            *n
        };
        let meta = Meta {
            last_log_id: sm.applied,
            last_membership: sm.membership,
            snapshot_id: format!("mem-{n}"),
        };
        *self.shared.snapshot.lock() = Some((meta.clone(), bytes.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for MemStateMachine {
    type SnapshotBuilder = MemSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership), StorageError> {
        let sm = self.shared.sm.lock();
        Ok((sm.applied, sm.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut sm = self.shared.sm.lock();
        let mut out = Vec::new();
        for entry in entries {
            sm.applied = Some(entry.log_id);
            out.push(match entry.payload {
                EntryPayload::Blank => Response::default(),
                EntryPayload::Normal(Request::Set { key, value }) => {
                    sm.data.insert(key, value.clone());
                    Response { value: Some(value) }
                }
                EntryPayload::Normal(Request::Delete { key }) => {
                    sm.data.remove(&key);
                    Response { value: None }
                }
                EntryPayload::Membership(m) => {
                    sm.membership = StoredMembership::new(Some(entry.log_id), m);
                    Response::default()
                }
            });
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> MemSnapshotBuilder {
        MemSnapshotBuilder {
            shared: Arc::clone(&self.shared),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &Meta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let bytes = snapshot.into_inner();
        let sm: MemSm = decode(&bytes).map_err(|e| {
            err(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                &e,
            )
        })?;
        *self.shared.sm.lock() = sm;
        *self.shared.snapshot.lock() = Some((meta.clone(), bytes));
        *self.shared.installed.lock() += 1;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(self
            .shared
            .snapshot
            .lock()
            .as_ref()
            .map(|(meta, bytes)| Snapshot {
                meta: meta.clone(),
                snapshot: Box::new(Cursor::new(bytes.clone())),
            }))
    }
}
