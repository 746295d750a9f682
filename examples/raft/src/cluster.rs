//! A cluster of openraft nodes in one process, on the [in-process network](crate::network),
//! on mapkv or in-memory storage; and the fail-over scenario of the `cluster` example and
//! the tests ([`failover`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{BasicNode, Config, LogId, Raft, ServerState, SnapshotPolicy};

use crate::memory::{MemLogStore, MemReader, MemStateMachine};
use crate::network::Router;
use crate::{LogStore, LogSync, NodeId, Request, SmReader, StateMachineStore, TypeConfig};

/// The error of the harness and the scenario: a message, or any error of a call.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long the harness waits for an election, an apply or a store to be released.
pub const WAIT: Duration = Duration::from_secs(15);

/// The storage the nodes of a [`Cluster`] use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// [`LogStore`] and [`StateMachineStore`] in `DIR/node-ID/`, with this log sync.
    Mapkv(LogSync),
    /// [`MemLogStore`] and [`MemStateMachine`]: nothing on disk; a stopped node is gone.
    Memory,
}

/// Reads the state machine of one node, whatever its storage.
#[derive(Debug, Clone)]
pub enum KvReader {
    /// A mapkv state machine.
    Mapkv(SmReader),
    /// An in-memory state machine.
    Memory(MemReader),
}

impl KvReader {
    /// The value of `key` on this node (a local read).
    ///
    /// # Errors
    /// The storage error of a mapkv read.
    pub fn get(&self, key: &str) -> Result<Option<String>, crate::StorageError> {
        match self {
            KvReader::Mapkv(r) => r.get(key),
            KvReader::Memory(r) => Ok(r.get(key)),
        }
    }

    /// How many snapshots this node installed from a leader since it started.
    #[must_use]
    pub fn snapshots_installed(&self) -> u64 {
        match self {
            KvReader::Mapkv(r) => r.snapshots_installed(),
            KvReader::Memory(r) => r.snapshots_installed(),
        }
    }
}

/// What a mapkv node found in its files when it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenedState {
    /// The last log id of its log store.
    pub last_log: Option<LogId<NodeId>>,
    /// Its purge mark.
    pub purged: Option<LogId<NodeId>>,
    /// The last log id applied to its state machine.
    pub applied: Option<LogId<NodeId>>,
}

/// A running node.
pub struct Node {
    /// The node's openraft handle.
    pub raft: Raft<TypeConfig>,
    /// Reads its state machine.
    pub reader: KvReader,
    /// Whether the storage handles have all been dropped (mapkv only): the files may be
    /// reopened.
    released: Vec<Weak<dyn std::any::Any + Send + Sync>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.raft.metrics().borrow().id)
            .field("reader", &self.reader)
            .finish_non_exhaustive()
    }
}

/// Nodes on one [`Router`], each with its own storage.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    backend: Backend,
    config: Arc<Config>,
    router: Router,
    nodes: BTreeMap<NodeId, Node>,
}

/// An openraft configuration for a local cluster: heartbeats every 100 ms, elections
/// after 300-600 ms of silence, a snapshot every `snapshot_every` entries, and the log
/// purged up to each snapshot (so a node that fell behind catches up by snapshot).
#[must_use]
pub fn config(snapshot_every: u64) -> Config {
    Config {
        cluster_name: "mapkv-raft".into(),
        heartbeat_interval: 100,
        election_timeout_min: 300,
        election_timeout_max: 600,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(snapshot_every),
        max_in_snapshot_log_to_keep: 0,
        ..Config::default()
    }
}

fn msg(s: String) -> BoxError {
    s.into()
}

impl Cluster {
    /// A cluster with no node yet; mapkv nodes keep their files under `dir`.
    ///
    /// # Errors
    /// An invalid `config`.
    pub fn new(dir: &Path, backend: Backend, config: Config) -> Result<Cluster, BoxError> {
        Ok(Cluster {
            dir: dir.to_path_buf(),
            backend,
            config: Arc::new(config.validate()?),
            router: Router::new(),
            nodes: BTreeMap::new(),
        })
    }

    /// The directory of node `id`'s files.
    #[must_use]
    pub fn node_dir(&self, id: NodeId) -> PathBuf {
        self.dir.join(format!("node-{id}"))
    }

    /// The running node `id`.
    #[must_use]
    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(&id)
    }

    /// The ids of the running nodes.
    #[must_use]
    pub fn running(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// Starts node `id`: opens its storage (for mapkv, the files in [`Cluster::node_dir`],
    /// whatever they hold: a restart reopens them) and registers it on the router.
    /// Returns what the storage held at open (all `None` for in-memory storage).
    ///
    /// # Errors
    /// The storage's errors opening, openraft's error starting the node.
    pub async fn start_node(&mut self, id: NodeId) -> Result<OpenedState, BoxError> {
        let network = self.router.factory(id);
        // Up from the start: a restarted node may send before it is registered.
        self.router.set_down(id, false);
        let config = Arc::clone(&self.config);
        let (raft, reader, released, opened) = match self.backend {
            Backend::Mapkv(sync) => {
                let dir = self.node_dir(id);
                std::fs::create_dir_all(&dir)?;
                let log = LogStore::open(dir.join("log.mkv"), sync)?;
                let sm = StateMachineStore::open(dir.join("sm"))?;
                let state = log.log_state();
                let opened = OpenedState {
                    last_log: state.last_log_id,
                    purged: state.last_purged_log_id,
                    applied: sm.reader().applied(),
                };
                let reader = sm.reader();
                let released = vec![log.release_probe(), reader.release_probe()];
                let raft = Raft::new(id, config, network, log, sm).await?;
                (raft, KvReader::Mapkv(reader), released, opened)
            }
            Backend::Memory => {
                let sm = MemStateMachine::new();
                let reader = sm.reader();
                let raft = Raft::new(id, config, network, MemLogStore::new(), sm).await?;
                (
                    raft,
                    KvReader::Memory(reader),
                    Vec::new(),
                    OpenedState::default(),
                )
            }
        };
        self.router.add(id, raft.clone());
        self.nodes.insert(
            id,
            Node {
                raft,
                reader,
                released,
            },
        );
        Ok(opened)
    }

    /// Initializes the cluster on the first of `members`, with all of them as voters.
    ///
    /// # Errors
    /// No such running node, or openraft's error.
    pub async fn initialize(&self, members: &[NodeId]) -> Result<(), BoxError> {
        let first = members
            .first()
            .and_then(|id| self.nodes.get(id))
            .ok_or_else(|| msg("initialize: the first member is not running".into()))?;
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .iter()
            .map(|id| (*id, BasicNode::new(format!("in-process:{id}"))))
            .collect();
        first.raft.initialize(nodes).await?;
        Ok(())
    }

    /// The running node that considers itself leader (with the highest term, should two).
    #[must_use]
    pub fn leader(&self) -> Option<NodeId> {
        self.nodes
            .iter()
            .filter_map(|(id, n)| {
                let m = n.raft.metrics();
                let m = m.borrow();
                (m.state == ServerState::Leader).then_some((m.current_term, *id))
            })
            .max()
            .map(|(_, id)| id)
    }

    /// The current term as the leader sees it.
    #[must_use]
    pub fn term(&self, id: NodeId) -> Option<u64> {
        self.nodes
            .get(&id)
            .map(|n| n.raft.metrics().borrow().current_term)
    }

    /// Waits until a running node other than `not` is leader and a majority of the running
    /// nodes agree; returns its id.
    ///
    /// # Errors
    /// No leader within [`WAIT`].
    pub async fn wait_for_leader(&self, not: Option<NodeId>) -> Result<NodeId, BoxError> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(l) = self.leader().filter(|l| Some(*l) != not) {
                let agree = self
                    .nodes
                    .values()
                    .filter(|n| n.raft.metrics().borrow().current_leader == Some(l))
                    .count();
                if agree * 2 > self.nodes.len() {
                    return Ok(l);
                }
            }
            if Instant::now() > deadline {
                return Err(msg(format!("no leader elected within {WAIT:?}")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sets `key` to `value` through the leader (following redirections during an
    /// election) and returns the log id of the acknowledged write.
    ///
    /// # Errors
    /// No leader within [`WAIT`], or openraft's error from the leader.
    pub async fn write(&self, key: &str, value: &str) -> Result<LogId<NodeId>, BoxError> {
        let deadline = Instant::now() + WAIT;
        loop {
            let leader = self.leader().and_then(|l| self.nodes.get(&l));
            if let Some(node) = leader {
                let req = Request::Set {
                    key: key.to_string(),
                    value: value.to_string(),
                };
                match node.raft.client_write(req).await {
                    Ok(resp) => return Ok(resp.log_id),
                    // Not (or no longer) the leader: the request was not appended.
                    Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if Instant::now() > deadline {
                return Err(msg(format!("write of {key}: no leader within {WAIT:?}")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until node `id` has applied index `index`.
    ///
    /// # Errors
    /// Not running, or not applied within [`WAIT`].
    pub async fn wait_applied(&self, id: NodeId, index: u64) -> Result<(), BoxError> {
        let node = self
            .nodes
            .get(&id)
            .ok_or_else(|| msg(format!("node {id} is not running")))?;
        node.raft
            .wait(Some(WAIT))
            .applied_index_at_least(Some(index), format!("node {id} applies {index}"))
            .await?;
        Ok(())
    }

    /// The value of `key` on node `id` (a local read).
    ///
    /// # Errors
    /// Not running, or the storage's read error.
    pub fn read(&self, id: NodeId, key: &str) -> Result<Option<String>, BoxError> {
        let node = self
            .nodes
            .get(&id)
            .ok_or_else(|| msg(format!("node {id} is not running")))?;
        Ok(node.reader.get(key)?)
    }

    /// Stops node `id`: marks it down on the router (it can no longer send or receive),
    /// shuts its openraft node down and waits until its storage is closed.
    ///
    /// # Errors
    /// Not running, or its storage still in use after [`WAIT`].
    pub async fn stop_node(&mut self, id: NodeId) -> Result<(), BoxError> {
        self.router.set_down(id, true);
        self.router.remove(id);
        let node = self
            .nodes
            .remove(&id)
            .ok_or_else(|| msg(format!("node {id} is not running")))?;
        node.raft.shutdown().await?;
        let Node {
            raft,
            reader,
            released,
        } = node;
        drop((raft, reader));
        let deadline = Instant::now() + WAIT;
        while released.iter().any(|w| w.strong_count() > 0) {
            if Instant::now() > deadline {
                return Err(msg(format!(
                    "node {id}: storage still in use {WAIT:?} after shutdown"
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Stops every node.
    ///
    /// # Errors
    /// As for [`Cluster::stop_node`].
    pub async fn shutdown(mut self) -> Result<(), BoxError> {
        for id in self.running() {
            self.stop_node(id).await?;
        }
        Ok(())
    }
}

impl LogStore {
    /// A weak handle that dies when the store is closed.
    pub(crate) fn release_probe(&self) -> Weak<dyn std::any::Any + Send + Sync> {
        self.weak_inner()
    }
}

impl SmReader {
    /// A weak handle that dies when the state machine's stores are closed.
    pub(crate) fn release_probe(&self) -> Weak<dyn std::any::Any + Send + Sync> {
        self.weak_shared()
    }
}

/// The sizes of the fail-over scenario.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// Writes through the first leader, before it is stopped.
    pub writes_before: usize,
    /// Writes through the second leader while the first is down (half overwrite keys
    /// written before, half are new).
    pub writes_during: usize,
    /// Writes after the stopped node is back.
    pub writes_after: usize,
    /// Entries between snapshots ([`config`]); smaller than `writes_during`, so the
    /// restarted node's log is behind the survivors' purged logs and it catches up by
    /// snapshot.
    pub snapshot_every: u64,
}

/// What the fail-over scenario saw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The first leader (stopped, then restarted).
    pub first_leader: NodeId,
    /// The leader elected while it was down.
    pub second_leader: NodeId,
    /// How long the election after the stop took.
    pub failover: Duration,
    /// Acknowledged writes.
    pub acked: usize,
    /// (node, key) reads checked against the acknowledged values.
    pub reads_checked: usize,
    /// What the restarted node found in its files.
    pub reopened: OpenedState,
    /// Whether the restarted node caught up by installing a snapshot (else by log
    /// replication alone).
    pub restarted_by_snapshot: bool,
    /// The snapshot the new learner (node 4) installed: it joined after the leader had
    /// purged its log, so it can only start from a snapshot.
    pub learner_snapshot: Option<LogId<NodeId>>,
}

/// Checks that node `id` holds every acknowledged write; returns the reads done.
fn check_all(
    cluster: &Cluster,
    id: NodeId,
    acked: &BTreeMap<String, String>,
) -> Result<usize, BoxError> {
    for (k, v) in acked {
        let got = cluster.read(id, k)?;
        if got.as_deref() != Some(v.as_str()) {
            return Err(msg(format!(
                "CHECK FAILED: node {id}: {k} = {got:?}, the acknowledged write set {v:?}"
            )));
        }
    }
    Ok(acked.len())
}

/// Runs the fail-over scenario on three mapkv nodes (group commit) with files in `dir`,
/// telling `say` what happens step by step:
///
/// 1. start nodes 1, 2, 3, initialize, wait for a leader;
/// 2. write through the leader; check every node holds every write;
/// 3. stop the leader (shutdown, marked down), wait for a new leader among the others;
/// 4. write through it (enough for snapshots and log purges); check both survivors;
/// 5. restart the stopped node from its files; wait until it caught up; check it;
/// 6. write again; check all three;
/// 7. snapshot and purge the leader's log, add a fresh node 4 as a learner: it must catch
///    up by installing the snapshot (the network's chunked snapshot transfer and
///    [`StateMachineStore`]'s install); check it; stop everything.
///
/// # Errors
/// The first check that fails (`CHECK FAILED: ...`), or any error of the cluster.
pub async fn failover(
    dir: &Path,
    s: &Scenario,
    say: &mut dyn FnMut(&str),
) -> Result<Report, BoxError> {
    let mut report = Report::default();
    let mut cluster = Cluster::new(
        dir,
        Backend::Mapkv(LogSync::GroupCommit),
        config(s.snapshot_every),
    )?;
    let all = [1, 2, 3];
    say(&format!(
        "starting nodes 1, 2, 3 on mapkv storage in {}",
        dir.display()
    ));
    for id in all {
        cluster.start_node(id).await?;
    }
    cluster.initialize(&all).await?;
    let first = cluster.wait_for_leader(None).await?;
    report.first_leader = first;
    say(&format!(
        "node {first} is leader (term {})",
        cluster.term(first).unwrap_or(0)
    ));

    let mut acked = BTreeMap::new();
    let mut last = 0;
    for i in 0..s.writes_before {
        let (k, v) = (format!("key-{i:05}"), format!("first-{i}"));
        last = cluster.write(&k, &v).await?.index;
        acked.insert(k, v);
    }
    say(&format!(
        "wrote {} keys through leader {first}, all acknowledged (last log index {last})",
        s.writes_before
    ));
    for id in all {
        cluster.wait_applied(id, last).await?;
        report.reads_checked += check_all(&cluster, id, &acked)?;
    }
    say("check: nodes 1, 2, 3 all applied them and read back every acknowledged value");
    let last_before = last;

    say(&format!(
        "stopping leader {first} (shutdown, marked down on the network)"
    ));
    let stopped_at = Instant::now();
    cluster.stop_node(first).await?;
    let second = cluster.wait_for_leader(Some(first)).await?;
    report.second_leader = second;
    report.failover = stopped_at.elapsed();
    say(&format!(
        "node {second} elected leader (term {}) {} ms after the stop",
        cluster.term(second).unwrap_or(0),
        report.failover.as_millis()
    ));

    for i in 0..s.writes_during {
        // Half overwrite keys of the first round, half are new keys.
        let k = if i % 2 == 0 && i / 2 < s.writes_before {
            format!("key-{:05}", i / 2)
        } else {
            format!("key-{:05}", s.writes_before + i)
        };
        let v = format!("second-{i}");
        last = cluster.write(&k, &v).await?.index;
        acked.insert(k, v);
    }
    say(&format!(
        "wrote {} more (overwrites and new keys) through leader {second}, all acknowledged (last log index {last})",
        s.writes_during
    ));
    let survivors = cluster.running();
    for &id in &survivors {
        cluster.wait_applied(id, last).await?;
        report.reads_checked += check_all(&cluster, id, &acked)?;
    }
    let leader_metrics = cluster
        .node(second)
        .map(|n| n.raft.metrics().borrow().clone())
        .ok_or_else(|| msg("the leader is gone".into()))?;
    say(&format!(
        "check: survivors {survivors:?} read back all {} acknowledged keys; leader's snapshot at {}, log purged up to {}",
        acked.len(),
        fmt_log_id(leader_metrics.snapshot),
        fmt_log_id(leader_metrics.purged),
    ));

    say(&format!("restarting node {first} from its mapkv files"));
    let reopened = cluster.start_node(first).await?;
    report.reopened = reopened;
    say(&format!(
        "node {first} reopened: log up to {}, state machine applied up to {} (from disk)",
        fmt_log_id(reopened.last_log),
        fmt_log_id(reopened.applied),
    ));
    // A leader counts its own log in the quorum only once its append is durable: its
    // files must hold every entry it acknowledged.
    if reopened.last_log.map(|l| l.index) < Some(last_before) {
        return Err(msg(format!(
            "CHECK FAILED: node {first} reopened with its log up to {}, but as leader it acknowledged entries up to index {last_before}",
            fmt_log_id(reopened.last_log)
        )));
    }
    cluster.wait_applied(first, last).await?;
    report.reads_checked += check_all(&cluster, first, &acked)?;
    report.restarted_by_snapshot = cluster
        .node(first)
        .is_some_and(|n| n.reader.snapshots_installed() > 0);
    let how = if report.restarted_by_snapshot {
        "by installing a snapshot from the leader"
    } else {
        "by log replication (the leader keeps the log a down follower still needs)"
    };
    say(&format!(
        "check: node {first} caught up to {last} {how}, and reads back all {} acknowledged keys",
        acked.len()
    ));

    for i in 0..s.writes_after {
        let (k, v) = (format!("key-{i:05}"), format!("third-{i}"));
        last = cluster.write(&k, &v).await?.index;
        acked.insert(k, v);
    }
    let leader = cluster.leader().unwrap_or(second);
    for id in all {
        cluster.wait_applied(id, last).await?;
        report.reads_checked += check_all(&cluster, id, &acked)?;
    }
    say(&format!(
        "wrote {} more through leader {leader}; check: nodes 1, 2, 3 all read back all {} keys",
        s.writes_after,
        acked.len()
    ));

    // A snapshot of everything, and the leader's log purged up to it: a node that joins
    // now can only start from the snapshot.
    let leader_raft = cluster
        .node(leader)
        .map(|n| n.raft.clone())
        .ok_or_else(|| msg("the leader is gone".into()))?;
    // (A metrics borrow must end before any await: it blocks the node's metrics updates.)
    let applied = leader_raft.metrics().borrow().last_applied;
    let applied = applied.ok_or_else(|| msg("the leader applied nothing".into()))?;
    leader_raft.trigger().snapshot().await?;
    leader_raft
        .wait(Some(WAIT))
        .snapshot(applied, "leader snapshot")
        .await?;
    leader_raft.trigger().purge_log(last).await?;
    leader_raft
        .wait(Some(WAIT))
        .metrics(
            |m| m.purged.is_some_and(|p| p.index >= last),
            "leader purges its log",
        )
        .await?;
    say(&format!(
        "leader {leader} took a snapshot at index {last} and purged its log up to it"
    ));
    let learner = 4;
    cluster.start_node(learner).await?;
    leader_raft
        .add_learner(
            learner,
            BasicNode::new(format!("in-process:{learner}")),
            true,
        )
        .await?;
    cluster.wait_applied(learner, last).await?;
    report.reads_checked += check_all(&cluster, learner, &acked)?;
    let installed = cluster
        .node(learner)
        .is_some_and(|n| n.reader.snapshots_installed() > 0);
    report.learner_snapshot = if installed {
        cluster
            .node(learner)
            .and_then(|n| n.raft.metrics().borrow().snapshot)
    } else {
        None
    };
    if report.learner_snapshot.is_none() {
        return Err(msg(format!(
            "CHECK FAILED: learner {learner} caught up without installing a snapshot"
        )));
    }
    say(&format!(
        "node {learner} joined as a learner, installed the leader's snapshot ({}) and reads back all {} keys",
        fmt_log_id(report.learner_snapshot),
        acked.len()
    ));

    report.acked = s.writes_before + s.writes_during + s.writes_after;
    cluster.shutdown().await?;
    say(&format!(
        "all checks passed: {} acknowledged writes, {} reads checked",
        report.acked, report.reads_checked
    ));
    Ok(report)
}

fn fmt_log_id(id: Option<LogId<NodeId>>) -> String {
    id.map_or_else(|| "(none)".to_string(), |l| l.to_string())
}
