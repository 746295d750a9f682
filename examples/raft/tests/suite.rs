//! openraft's own storage test suite (`openraft::testing::Suite`) on the mapkv storage,
//! in both log sync modes, and on the in-memory baseline. Every build gets a fresh
//! temporary directory.

use mapkv_raft::memory::{MemLogStore, MemStateMachine};
use mapkv_raft::{LogStore, LogSync, StateMachineStore, StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{AnyError, StorageIOError};
use tempfile::TempDir;

/// Builds a [`LogStore`] and a [`StateMachineStore`] in a new temporary directory, which
/// is removed when the suite drops the guard.
struct MapkvBuilder(LogSync);

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for MapkvBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(AnyError::new(&e)))?;
        let log = LogStore::open(dir.path().join("log.mkv"), self.0)?;
        let sm = StateMachineStore::open(dir.path().join("sm"))?;
        Ok((dir, log, sm))
    }
}

struct MemBuilder;

impl StoreBuilder<TypeConfig, MemLogStore, MemStateMachine, ()> for MemBuilder {
    async fn build(&self) -> Result<((), MemLogStore, MemStateMachine), StorageError> {
        Ok(((), MemLogStore::new(), MemStateMachine::new()))
    }
}

#[test]
fn mapkv_group_commit_passes_openraft_suite() -> Result<(), StorageError> {
    Suite::test_all(MapkvBuilder(LogSync::GroupCommit))
}

#[test]
fn mapkv_always_passes_openraft_suite() -> Result<(), StorageError> {
    Suite::test_all(MapkvBuilder(LogSync::Always))
}

#[test]
fn memory_passes_openraft_suite() -> Result<(), StorageError> {
    Suite::test_all(MemBuilder)
}
