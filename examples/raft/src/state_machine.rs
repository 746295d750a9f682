//! [`StateMachineStore`]: openraft's state machine and snapshots on mapkv stores.
//!
//! Files in the state machine's directory:
//!
//! - `sm.mkv`: the state machine. Keys `d:` + the user's key hold the values; `m:applied`
//!   the last applied [`LogId`] and `m:membership` the last applied membership.
//! - `snapshot.mkv`: the current snapshot: a [`Store::backup`] of `sm.mkv`, plus its
//!   [`SnapshotMeta`] under `s:meta`. The bytes of this file are the snapshot data openraft
//!   sends to followers; a follower writes them to its own `snapshot.mkv` and restores its
//!   `sm.mkv` from it.
//! - `snapshot.new.N.mkv`, `snapshot.in.mkv`, `sm.restore.mkv`: files being built; removed
//!   at open (a crash left them half made).

use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use mapkv::{Batch, Durability, Options, Store};
use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, LogId, OptionalSend, RaftSnapshotBuilder,
    StoredMembership,
};
use parking_lot::{Mutex, RwLock};
use serde::de::DeserializeOwned;

use crate::codec::{decode, encode, err, err_msg, io_err, remove_if_exists, sync_dir};
use crate::{Entry, NodeId, Request, Response, StorageError, TypeConfig};

const APPLIED: &[u8] = b"m:applied";
const MEMBERSHIP: &[u8] = b"m:membership";
const SNAPSHOT_META: &[u8] = b"s:meta";
const DATA_PREFIX: &[u8] = b"d:";

const SM_FILE: &str = "sm.mkv";
const SNAPSHOT_FILE: &str = "snapshot.mkv";
const SNAPSHOT_NEW_PREFIX: &str = "snapshot.new.";
const SNAPSHOT_IN: &str = "snapshot.in.mkv";
const SM_RESTORE: &str = "sm.restore.mkv";

type Membership = StoredMembership<NodeId, openraft::BasicNode>;
type Meta = SnapshotMeta<NodeId, openraft::BasicNode>;

/// The key of the user's `key` in `sm.mkv`.
fn data_key(key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(DATA_PREFIX.len() + key.len());
    k.extend_from_slice(DATA_PREFIX);
    k.extend_from_slice(key.as_bytes());
    k
}

/// What the store, its snapshot builders and its readers share.
#[derive(Debug)]
struct SmShared {
    dir: PathBuf,
    /// The open `sm.mkv`. Replaced (under the write lock) when a snapshot is installed;
    /// a snapshot builder may still hold the previous one, which stays valid.
    data: RwLock<Arc<Store>>,
    /// Last applied log id and membership, as stored in `data`.
    applied: Mutex<(Option<LogId<NodeId>>, Membership)>,
    /// The current snapshot's metadata. Its lock is held for the whole of every change to
    /// the snapshot files (build, install), which serializes them.
    snapshot: Mutex<Option<Meta>>,
    /// Snapshots installed (from a leader) since open.
    installed: AtomicU64,
    /// Snapshot builds started, to name their files.
    builds: AtomicU64,
}

/// openraft's [`RaftStateMachine`] on mapkv: the key-value data in `sm.mkv`, snapshots as
/// mapkv store files made with [`Store::backup`] (see the [crate] docs for the durability
/// mapping).
#[derive(Debug)]
pub struct StateMachineStore {
    shared: Arc<SmShared>,
}

/// Builds snapshots of a [`StateMachineStore`] while it goes on applying entries.
#[derive(Debug)]
pub struct SnapshotBuilder {
    shared: Arc<SmShared>,
}

/// Reads the data of a [`StateMachineStore`] (a cheap handle; clone it freely). Reads
/// see every entry applied so far on this node: they are local, not linearizable reads.
#[derive(Debug, Clone)]
pub struct SmReader {
    shared: Arc<SmShared>,
}

fn snap_err(verb: ErrorVerb, e: &mapkv::Error) -> StorageError {
    err(ErrorSubject::Snapshot(None), verb, e)
}

/// Reads and decodes `key` of `store`.
fn read_value<T: DeserializeOwned>(store: &Store, key: &[u8]) -> Result<Option<T>, StorageError> {
    match store.get_with(key, decode::<T>) {
        Ok(None) => Ok(None),
        Ok(Some(Ok(v))) => Ok(Some(v)),
        Ok(Some(Err(e))) => Err(err(ErrorSubject::StateMachine, ErrorVerb::Read, &e)),
        Err(e) => Err(err(ErrorSubject::StateMachine, ErrorVerb::Read, &e)),
    }
}

/// The last applied log id and membership stored in `store`.
fn read_applied(store: &Store) -> Result<(Option<LogId<NodeId>>, Membership), StorageError> {
    let applied = read_value::<Option<LogId<NodeId>>>(store, APPLIED)?.flatten();
    let membership = read_value::<Membership>(store, MEMBERSHIP)?.unwrap_or_default();
    Ok((applied, membership))
}

/// Opens `sm.mkv` (or another state machine file) for writing.
fn open_data(path: &Path) -> Result<Store, StorageError> {
    // Applies need not be durable one by one: after a crash the store holds an earlier
    // applied state (a prefix of the writes) and openraft re-applies the rest.
    let options = Options::default()
        .durability(Durability::None)
        .auto_compact(0.5, 64 << 20);
    Store::open(path, options).map_err(|e| err(ErrorSubject::StateMachine, ErrorVerb::Read, &e))
}

/// Opens a finished snapshot file for writing (to put its metadata in); never creates one.
fn open_snapshot_file(path: &Path) -> Result<Store, StorageError> {
    let options = Options::default()
        .durability(Durability::Always)
        .create(false);
    Store::open(path, options).map_err(|e| snap_err(ErrorVerb::Read, &e))
}

/// Reads the metadata of the snapshot file at `path`.
fn read_snapshot_meta(path: &Path) -> Result<Meta, StorageError> {
    let store = Store::open(path, Options::default().read_only(true))
        .map_err(|e| snap_err(ErrorVerb::Read, &e))?;
    match store.get_with(SNAPSHOT_META, decode::<Meta>) {
        Ok(Some(Ok(meta))) => Ok(meta),
        Ok(Some(Err(e))) => Err(err(ErrorSubject::Snapshot(None), ErrorVerb::Read, &e)),
        Ok(None) => Err(err_msg(
            ErrorSubject::Snapshot(None),
            ErrorVerb::Read,
            format!("{} has no snapshot metadata", path.display()),
        )),
        Err(e) => Err(snap_err(ErrorVerb::Read, &e)),
    }
}

impl SmShared {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn io(&self, verb: ErrorVerb, what: &str, name: &str, e: &std::io::Error) -> StorageError {
        io_err(
            ErrorSubject::Snapshot(None),
            verb,
            what,
            &self.path(name),
            e,
        )
    }

    /// Renames `from` to `to` in the directory and syncs the directory.
    fn rename(&self, from: &str, to: &str) -> Result<(), StorageError> {
        std::fs::rename(self.path(from), self.path(to))
            .map_err(|e| self.io(ErrorVerb::Write, "rename to", to, &e))?;
        sync_dir(&self.dir).map_err(|e| self.io(ErrorVerb::Write, "sync directory of", to, &e))
    }

    /// Replaces the state machine with a copy of the current snapshot file. Called with
    /// the snapshot lock held.
    fn restore_from_snapshot(&self) -> Result<(), StorageError> {
        remove_if_exists(&self.path(SM_RESTORE))
            .map_err(|e| self.io(ErrorVerb::Write, "remove", SM_RESTORE, &e))?;
        {
            let snap = Store::open(self.path(SNAPSHOT_FILE), Options::default().read_only(true))
                .map_err(|e| snap_err(ErrorVerb::Read, &e))?;
            // A compacted, synced copy, linked into place only when complete.
            snap.backup(self.path(SM_RESTORE))
                .map_err(|e| snap_err(ErrorVerb::Read, &e))?;
        }
        self.rename(SM_RESTORE, SM_FILE)?;
        let store = open_data(&self.path(SM_FILE))?;
        store
            .delete(SNAPSHOT_META)
            .map_err(|e| err(ErrorSubject::StateMachine, ErrorVerb::Write, &e))?;
        let applied = read_applied(&store)?;
        // The previous store (on the file just replaced) closes when its last handle goes.
        *self.data.write() = Arc::new(store);
        *self.applied.lock() = applied;
        Ok(())
    }

    /// The current snapshot, read from its file.
    fn current_snapshot(&self, meta: &Meta) -> Result<Snapshot<TypeConfig>, StorageError> {
        let bytes = std::fs::read(self.path(SNAPSHOT_FILE)).map_err(|e| {
            io_err(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Read,
                "read",
                &self.path(SNAPSHOT_FILE),
                &e,
            )
        })?;
        Ok(Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl StateMachineStore {
    /// Opens (or creates) the state machine in the directory `dir`.
    ///
    /// If the directory's snapshot is newer than the state machine's last applied entry
    /// (a crash while a snapshot was being installed, or applies lost to power loss that
    /// the log no longer holds), the state machine is restored from the snapshot first.
    ///
    /// # Errors
    /// mapkv's errors opening the files (for example [`mapkv::Error::Locked`] while
    /// another handle has them open), file-system errors, stored values that do not decode.
    pub fn open(dir: impl AsRef<Path>) -> Result<StateMachineStore, StorageError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| {
            io_err(
                ErrorSubject::StateMachine,
                ErrorVerb::Write,
                "create",
                &dir,
                &e,
            )
        })?;
        let list_err = |e: std::io::Error| {
            io_err(
                ErrorSubject::StateMachine,
                ErrorVerb::Read,
                "list",
                &dir,
                &e,
            )
        };
        for entry in std::fs::read_dir(&dir).map_err(list_err)? {
            let name = entry.map_err(list_err)?.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(SNAPSHOT_NEW_PREFIX) || name == SNAPSHOT_IN || name == SM_RESTORE {
                let path = dir.join(&*name);
                remove_if_exists(&path).map_err(|e| {
                    io_err(
                        ErrorSubject::StateMachine,
                        ErrorVerb::Write,
                        "remove",
                        &path,
                        &e,
                    )
                })?;
            }
        }
        let snapshot_path = dir.join(SNAPSHOT_FILE);
        let snapshot = if snapshot_path.exists() {
            Some(read_snapshot_meta(&snapshot_path)?)
        } else {
            None
        };
        let store = open_data(&dir.join(SM_FILE))?;
        let applied = read_applied(&store)?;
        let behind = snapshot.as_ref().is_some_and(|s| s.last_log_id > applied.0);
        let shared = Arc::new(SmShared {
            dir,
            data: RwLock::new(Arc::new(store)),
            applied: Mutex::new(applied),
            snapshot: Mutex::new(snapshot),
            installed: AtomicU64::new(0),
            builds: AtomicU64::new(0),
        });
        if behind {
            let _guard = shared.snapshot.lock();
            shared.restore_from_snapshot()?;
        }
        Ok(StateMachineStore { shared })
    }

    /// A reader of the data (see [`SmReader`]).
    #[must_use]
    pub fn reader(&self) -> SmReader {
        SmReader {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl SmReader {
    /// The value of `key` on this node.
    ///
    /// # Errors
    /// mapkv's read error, or a value that is not UTF-8.
    pub fn get(&self, key: &str) -> Result<Option<String>, StorageError> {
        let store = Arc::clone(&self.shared.data.read());
        match store.get(data_key(key)) {
            Ok(None) => Ok(None),
            Ok(Some(v)) => String::from_utf8(v)
                .map(Some)
                .map_err(|e| err(ErrorSubject::StateMachine, ErrorVerb::Read, &e)),
            Err(e) => Err(err(ErrorSubject::StateMachine, ErrorVerb::Read, &e)),
        }
    }

    /// A weak handle on what the state machine, its builders and readers share: dead
    /// once its stores are closed.
    pub(crate) fn weak_shared(&self) -> std::sync::Weak<dyn std::any::Any + Send + Sync> {
        let w: std::sync::Weak<SmShared> = Arc::downgrade(&self.shared);
        w
    }

    /// How many snapshots were installed from a leader since the state machine was opened.
    #[must_use]
    pub fn snapshots_installed(&self) -> u64 {
        self.shared.installed.load(Ordering::Relaxed)
    }

    /// The last applied log id on this node.
    #[must_use]
    pub fn applied(&self) -> Option<LogId<NodeId>> {
        self.shared.applied.lock().0
    }
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let sh = &*self.shared;
        let store = Arc::clone(&sh.data.read());
        // A name of its own: builds may overlap each other and an install; the lock is
        // taken only to put the result in place.
        let name = format!(
            "{SNAPSHOT_NEW_PREFIX}{}.mkv",
            sh.builds.fetch_add(1, Ordering::Relaxed)
        );
        let new_path = sh.path(&name);
        remove_if_exists(&new_path).map_err(|e| sh.io(ErrorVerb::Write, "remove", &name, &e))?;
        // Exactly the applies committed before the call, while apply goes on. Each apply
        // is one batch, so the copy's data and its last-applied id agree.
        store
            .backup(&new_path)
            .map_err(|e| snap_err(ErrorVerb::Write, &e))?;
        let meta = {
            let snap = open_snapshot_file(&new_path)?;
            let (last_log_id, last_membership) = read_applied(&snap)?;
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            let snapshot_id = match last_log_id {
                Some(l) => format!(
                    "{}-{}-{}-{nanos}",
                    l.leader_id.term, l.leader_id.node_id, l.index
                ),
                None => format!("none-{nanos}"),
            };
            let meta = Meta {
                last_log_id,
                last_membership,
                snapshot_id,
            };
            let bytes = encode(&meta)
                .map_err(|e| err(ErrorSubject::Snapshot(None), ErrorVerb::Write, &e))?;
            snap.put(SNAPSHOT_META, bytes)
                .map_err(|e| snap_err(ErrorVerb::Write, &e))?;
            snap.close().map_err(|e| snap_err(ErrorVerb::Write, &e))?;
            meta
        };
        let bytes =
            std::fs::read(&new_path).map_err(|e| sh.io(ErrorVerb::Read, "read", &name, &e))?;
        let mut current = sh.snapshot.lock();
        if current
            .as_ref()
            .is_some_and(|c| c.last_log_id > meta.last_log_id)
        {
            // A newer snapshot was installed meanwhile: keep it (openraft ignores a built
            // snapshot older than the one it has).
            drop(current);
            remove_if_exists(&new_path)
                .map_err(|e| sh.io(ErrorVerb::Write, "remove", &name, &e))?;
        } else {
            sh.rename(&name, SNAPSHOT_FILE)?;
            *current = Some(meta.clone());
        }
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId<NodeId>>, Membership), StorageError> {
        Ok(self.shared.applied.lock().clone())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let store = Arc::clone(&self.shared.data.read());
        let (mut applied, mut membership) = self.shared.applied.lock().clone();
        let mut membership_changed = false;
        let mut batch = Batch::new();
        let mut responses = Vec::new();
        for entry in entries {
            applied = Some(entry.log_id);
            let response = match entry.payload {
                EntryPayload::Blank => Response::default(),
                EntryPayload::Normal(Request::Set { key, value }) => {
                    batch.put(data_key(&key), value.as_bytes());
                    Response { value: Some(value) }
                }
                EntryPayload::Normal(Request::Delete { key }) => {
                    batch.delete(data_key(&key));
                    Response { value: None }
                }
                EntryPayload::Membership(m) => {
                    membership = StoredMembership::new(Some(entry.log_id), m);
                    membership_changed = true;
                    Response::default()
                }
            };
            responses.push(response);
        }
        if applied.is_none() {
            return Ok(responses);
        }
        let enc = |e: postcard::Error| err(ErrorSubject::StateMachine, ErrorVerb::Write, &e);
        batch.put(APPLIED, encode(&applied).map_err(enc)?);
        if membership_changed {
            batch.put(MEMBERSHIP, encode(&membership).map_err(enc)?);
        }
        // The data, the last-applied id and the membership: all or nothing.
        store
            .write(&batch)
            .map_err(|e| err(ErrorSubject::StateMachine, ErrorVerb::Write, &e))?;
        *self.shared.applied.lock() = (applied, membership);
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder {
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
        let sh = &*self.shared;
        let mut current = sh.snapshot.lock();
        let in_path = sh.path(SNAPSHOT_IN);
        let werr = |what: &str, e: &std::io::Error| {
            io_err(
                ErrorSubject::Snapshot(Some(meta.signature())),
                ErrorVerb::Write,
                what,
                &in_path,
                e,
            )
        };
        {
            let mut f = std::fs::File::create(&in_path).map_err(|e| werr("create", &e))?;
            f.write_all(snapshot.get_ref())
                .map_err(|e| werr("write", &e))?;
            f.sync_all().map_err(|e| werr("sync", &e))?;
        }
        {
            // Opening checks that the bytes are a mapkv store; the metadata goes in with
            // them, so the file describes itself after a restart.
            let snap = open_snapshot_file(&in_path)?;
            let (applied, _) = read_applied(&snap)?;
            if applied != meta.last_log_id {
                return Err(err_msg(
                    ErrorSubject::Snapshot(Some(meta.signature())),
                    ErrorVerb::Read,
                    format!(
                        "snapshot says last log id {:?}, its data says {applied:?}",
                        meta.last_log_id
                    ),
                ));
            }
            let bytes = encode(meta)
                .map_err(|e| err(ErrorSubject::Snapshot(None), ErrorVerb::Write, &e))?;
            snap.put(SNAPSHOT_META, bytes)
                .map_err(|e| snap_err(ErrorVerb::Write, &e))?;
            snap.close().map_err(|e| snap_err(ErrorVerb::Write, &e))?;
        }
        // From here the snapshot is the current one; a crash before the state machine
        // is replaced is repaired at the next open (the snapshot is newer than it).
        sh.rename(SNAPSHOT_IN, SNAPSHOT_FILE)?;
        *current = Some(meta.clone());
        sh.restore_from_snapshot()?;
        sh.installed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let current = self.shared.snapshot.lock();
        match &*current {
            Some(meta) => self.shared.current_snapshot(meta).map(Some),
            None => Ok(None),
        }
    }
}
