//! An in-process network: every RPC is a direct call of the target node's
//! [`Raft`] handle, found in a shared [`Router`]. A node can be marked down: RPCs from or
//! to it then fail as [`Unreachable`], as if its host were cut off.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft};
use parking_lot::Mutex;

use crate::{NodeId, TypeConfig};

#[derive(Default)]
struct Routes {
    nodes: BTreeMap<NodeId, Raft<TypeConfig>>,
    down: BTreeSet<NodeId>,
}

/// The shared map from node id to running node, and which nodes are down. Cheap to
/// clone: clones share the map.
#[derive(Clone, Default)]
pub struct Router {
    routes: Arc<Mutex<Routes>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let r = self.routes.lock();
        f.debug_struct("Router")
            .field("nodes", &r.nodes.keys().collect::<Vec<_>>())
            .field("down", &r.down)
            .finish()
    }
}

impl Router {
    /// An empty router.
    #[must_use]
    pub fn new() -> Router {
        Router::default()
    }

    /// Registers (or replaces) the node `id`; it is up.
    pub fn add(&self, id: NodeId, raft: Raft<TypeConfig>) {
        let mut r = self.routes.lock();
        r.nodes.insert(id, raft);
        r.down.remove(&id);
    }

    /// Unregisters the node `id` and returns its handle.
    pub fn remove(&self, id: NodeId) -> Option<Raft<TypeConfig>> {
        self.routes.lock().nodes.remove(&id)
    }

    /// Marks the node `id` down (`true`) or up (`false`).
    pub fn set_down(&self, id: NodeId, down: bool) {
        let mut r = self.routes.lock();
        if down {
            r.down.insert(id);
        } else {
            r.down.remove(&id);
        }
    }

    /// The network factory for the node `id`: the RPCs it sends come from `id`.
    #[must_use]
    pub fn factory(&self, id: NodeId) -> NetworkFactory {
        NetworkFactory {
            router: self.clone(),
            source: id,
        }
    }

    /// The target's handle, unless either end is down or the target is not registered.
    fn route(&self, source: NodeId, target: NodeId) -> Result<Raft<TypeConfig>, Unreachable> {
        let r = self.routes.lock();
        let cut = |why: String| {
            Unreachable::new(&std::io::Error::new(std::io::ErrorKind::NotConnected, why))
        };
        if r.down.contains(&source) {
            return Err(cut(format!("node {source} (the sender) is down")));
        }
        if r.down.contains(&target) {
            return Err(cut(format!("node {target} is down")));
        }
        r.nodes
            .get(&target)
            .cloned()
            .ok_or_else(|| cut(format!("node {target} is not running")))
    }
}

/// Creates the [`Connection`]s of one node.
#[derive(Debug, Clone)]
pub struct NetworkFactory {
    router: Router,
    source: NodeId,
}

/// The connection from one node to another: calls the target's [`Raft`] handle.
#[derive(Debug)]
pub struct Connection {
    router: Router,
    source: NodeId,
    target: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> Connection {
        Connection {
            router: self.router.clone(),
            source: self.source,
            target,
        }
    }
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>;

impl Connection {
    fn remote<E: std::error::Error>(
        &self,
        e: RaftError<NodeId, E>,
    ) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
        RPCError::RemoteError(RemoteError::new(self.target, e))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        let raft = self.router.route(self.source, self.target)?;
        raft.append_entries(rpc).await.map_err(|e| self.remote(e))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let raft = self.router.route(self.source, self.target)?;
        raft.install_snapshot(rpc).await.map_err(|e| self.remote(e))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        _option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        let raft = self.router.route(self.source, self.target)?;
        raft.vote(rpc).await.map_err(|e| self.remote(e))
    }
}
