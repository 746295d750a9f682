//! The `cluster` example's fail-over scenario, smaller: three mapkv nodes in one process,
//! the leader stopped, a new leader elected, every acknowledged write checked on the
//! survivors, the stopped node restarted from its files and caught up, and a fresh
//! learner caught up by snapshot.

use mapkv_raft::cluster::{failover, Scenario};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_scenario_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().expect("temp dir");
    let scenario = Scenario {
        writes_before: 30,
        writes_during: 80,
        writes_after: 10,
        snapshot_every: 25,
    };
    let mut say = |line: &str| println!("{line}");
    let report = match failover(dir.path(), &scenario, &mut say).await {
        Ok(r) => r,
        Err(e) => panic!("scenario failed: {e}"),
    };
    assert_eq!(report.acked, 120);
    assert_ne!(report.first_leader, report.second_leader);
    assert!(
        report.learner_snapshot.is_some(),
        "the new learner should have caught up by snapshot: {report:?}"
    );
}
