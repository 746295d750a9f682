//! What the openraft suite does not check: that the mapkv storage survives a reopen,
//! restores a state machine that is behind its snapshot, installs snapshots with their
//! data, and returns errors (not panics) on bad input.

use std::collections::BTreeMap;

use mapkv_raft::{Entry, LogStore, LogSync, Request, StateMachineStore};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::log_id;
use openraft::{BasicNode, EntryPayload, Membership, RaftLogReader, RaftSnapshotBuilder, Vote};

fn blank(term: u64, index: u64) -> Entry {
    Entry {
        log_id: log_id(term, 1, index),
        payload: EntryPayload::Blank,
    }
}

fn set(term: u64, index: u64, key: &str, value: &str) -> Entry {
    Entry {
        log_id: log_id(term, 1, index),
        payload: EntryPayload::Normal(Request::Set {
            key: key.into(),
            value: value.into(),
        }),
    }
}

fn membership(term: u64, index: u64) -> Entry {
    let nodes: BTreeMap<u64, BasicNode> = (1..=3)
        .map(|id| (id, BasicNode::new(format!("n{id}"))))
        .collect();
    let voters = nodes.keys().copied().collect();
    Entry {
        log_id: log_id(term, 1, index),
        payload: EntryPayload::Membership(Membership::new(vec![voters], nodes)),
    }
}

fn indexes(entries: &[Entry]) -> Vec<u64> {
    entries.iter().map(|e| e.log_id.index).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_store_survives_reopen() -> Result<(), Box<dyn std::error::Error>> {
    for sync in [LogSync::GroupCommit, LogSync::Always] {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("log.mkv");
        {
            let mut log = LogStore::open(&path, sync)?;
            log.blocking_append((0..=20).map(|i| blank(1, i))).await?;
            log.save_vote(&Vote::new(3, 2)).await?;
            log.save_committed(Some(log_id(1, 1, 12))).await?;
            log.purge(log_id(1, 1, 5)).await?;
            log.truncate(log_id(1, 1, 15)).await?;
            // Replaced by a later term, as a new leader would.
            log.blocking_append((15..=17).map(|i| blank(3, i))).await?;
        }
        let mut log = LogStore::open(&path, sync)?;
        let state = log.get_log_state().await?;
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 1, 5)));
        assert_eq!(state.last_log_id, Some(log_id(3, 1, 17)));
        assert_eq!(log.read_vote().await?, Some(Vote::new(3, 2)));
        assert_eq!(log.read_committed().await?, Some(log_id(1, 1, 12)));
        let entries = log.try_get_log_entries(0..100).await?;
        assert_eq!(indexes(&entries), (6..=17).collect::<Vec<_>>());
        assert_eq!(entries[9].log_id, log_id(3, 1, 15));
        assert_eq!(indexes(&log.try_get_log_entries(8..=9).await?), vec![8, 9]);

        // Everything purged: the purge mark is the last log id, and appends go on after it.
        log.purge(log_id(3, 1, 30)).await?;
        assert_eq!(
            log.get_log_state().await?.last_log_id,
            Some(log_id(3, 1, 30))
        );
        assert!(log.try_get_log_entries(..).await?.is_empty());
        log.blocking_append([blank(4, 31)]).await?;
        drop(log);
        let mut log = LogStore::open(&path, sync)?;
        let state = log.get_log_state().await?;
        assert_eq!(state.last_purged_log_id, Some(log_id(3, 1, 30)));
        assert_eq!(state.last_log_id, Some(log_id(4, 1, 31)));
        assert_eq!(indexes(&log.try_get_log_entries(..).await?), vec![31]);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_carries_the_data_and_survives_reopen() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let mut leader = StateMachineStore::open(&a)?;
    leader
        .apply([
            membership(1, 1),
            set(1, 2, "x", "1"),
            set(1, 3, "y", "2"),
            set(1, 4, "x", "3"),
        ])
        .await?;
    let snap = leader.get_snapshot_builder().await.build_snapshot().await?;
    assert_eq!(snap.meta.last_log_id, Some(log_id(1, 1, 4)));
    // Applies after the snapshot are not in it.
    leader.apply([set(1, 5, "z", "late")]).await?;

    let mut follower = StateMachineStore::open(&b)?;
    follower.apply([set(1, 1, "stale", "gone")]).await?;
    let mut data = follower.begin_receiving_snapshot().await?;
    *data = *snap.snapshot;
    follower.install_snapshot(&snap.meta, data).await?;
    let reader = follower.reader();
    assert_eq!(reader.get("x")?, Some("3".into()));
    assert_eq!(reader.get("y")?, Some("2".into()));
    assert_eq!(reader.get("z")?, None);
    assert_eq!(reader.get("stale")?, None, "installing replaces the data");
    let (applied, mem) = follower.applied_state().await?;
    assert_eq!(applied, Some(log_id(1, 1, 4)));
    assert_eq!(mem.log_id(), &Some(log_id(1, 1, 1)));
    drop((follower, reader));

    let mut follower = StateMachineStore::open(&b)?;
    assert_eq!(follower.reader().get("x")?, Some("3".into()));
    let current = follower.get_current_snapshot().await?;
    assert_eq!(current.map(|s| s.meta), Some(snap.meta));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_machine_behind_its_snapshot_is_restored_at_open(
) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let (behind, ahead) = (dir.path().join("behind"), dir.path().join("ahead"));
    {
        let mut sm = StateMachineStore::open(&behind)?;
        sm.apply([membership(1, 1), set(1, 2, "k", "old")]).await?;
        let mut sm = StateMachineStore::open(&ahead)?;
        sm.apply([
            membership(1, 1),
            set(1, 2, "k", "old"),
            set(1, 3, "k", "new"),
        ])
        .await?;
        sm.get_snapshot_builder().await.build_snapshot().await?;
    }
    // As if a crash hit between writing the snapshot and replacing the state machine.
    std::fs::copy(ahead.join("snapshot.mkv"), behind.join("snapshot.mkv"))?;
    let mut sm = StateMachineStore::open(&behind)?;
    let (applied, _) = sm.applied_state().await?;
    assert_eq!(applied, Some(log_id(1, 1, 3)));
    assert_eq!(sm.reader().get("k")?, Some("new".into()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_an_error_not_a_panic() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let mut sm = StateMachineStore::open(dir.path().join("sm"))?;
    sm.apply([set(1, 1, "k", "v")]).await?;
    let mut data = sm.begin_receiving_snapshot().await?;
    data.get_mut()
        .extend_from_slice(b"not a mapkv store at all");
    let meta = openraft::SnapshotMeta {
        last_log_id: Some(log_id(2, 1, 9)),
        last_membership: Default::default(),
        snapshot_id: "junk".into(),
    };
    assert!(sm.install_snapshot(&meta, data).await.is_err());
    // The state machine was not touched.
    assert_eq!(sm.reader().get("k")?, Some("v".into()));

    // A log file that is not a store.
    let junk = dir.path().join("junk.mkv");
    std::fs::write(&junk, b"definitely not a store")?;
    assert!(LogStore::open(&junk, LogSync::GroupCommit).is_err());
    // A second handle on an open log.
    let path = dir.path().join("log.mkv");
    let _log = LogStore::open(&path, LogSync::GroupCommit)?;
    assert!(LogStore::open(&path, LogSync::GroupCommit).is_err());
    Ok(())
}
