//! How Raft reaches other members: a [`Transport`] the node provides (libp2p in agentmesh),
//! wrapped into openraft's network traits. Remembers when each member last answered, which is
//! how the leader tells a dead voter from a live one.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};

use crate::rpc::{self, RpcRequest, RpcResponse};
use crate::types::{NodeId, RaftNode, TypeConfig};

/// Why a message did not get an answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// The peer could not be reached.
    #[error("peer unreachable: {0}")]
    Unreachable(String),
    /// No answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Anything else (refused, stream reset, ...).
    #[error("{0}")]
    Other(String),
}

/// A future returned by [`Transport::call`].
pub type CallFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>, TransportError>> + Send>>;

/// Delivers an encoded request to a peer and returns its encoded reply. The receiving node
/// hands the bytes to [`crate::Cluster::handle_rpc`].
pub trait Transport: Send + Sync + 'static {
    /// Sends `request` to `target` and waits at most `timeout` for the reply.
    fn call(&self, target: &RaftNode, request: Vec<u8>, timeout: Duration) -> CallFuture;
}

/// When each node last answered an RPC.
#[derive(Clone, Default)]
pub(crate) struct Contacts(Arc<Mutex<HashMap<NodeId, Instant>>>);

impl Contacts {
    fn record(&self, id: NodeId) {
        if let Ok(mut map) = self.0.lock() {
            map.insert(id, Instant::now());
        }
    }

    pub(crate) fn last(&self, id: NodeId) -> Option<Instant> {
        self.0.lock().ok().and_then(|map| map.get(&id).copied())
    }
}

/// Sends a request and decodes the reply; shared by Raft and by request forwarding.
pub(crate) async fn call(
    transport: &dyn Transport,
    target: &RaftNode,
    request: &RpcRequest,
    timeout: Duration,
) -> Result<RpcResponse, TransportError> {
    let bytes = transport
        .call(target, rpc::encode(request), timeout)
        .await?;
    rpc::decode(&bytes).map_err(TransportError::Other)
}

pub(crate) struct NetworkFactory {
    pub(crate) transport: Arc<dyn Transport>,
    pub(crate) contacts: Contacts,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &RaftNode) -> Connection {
        Connection {
            target,
            node: node.clone(),
            transport: self.transport.clone(),
            contacts: self.contacts.clone(),
        }
    }
}

pub(crate) struct Connection {
    target: NodeId,
    node: RaftNode,
    transport: Arc<dyn Transport>,
    contacts: Contacts,
}

type RpcResult<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, RaftNode, RaftError<NodeId, E>>>;

impl Connection {
    async fn send<E: std::error::Error>(
        &self,
        request: RpcRequest,
        option: &RPCOption,
    ) -> Result<RpcResponse, RPCError<NodeId, RaftNode, RaftError<NodeId, E>>> {
        match call(
            self.transport.as_ref(),
            &self.node,
            &request,
            option.hard_ttl(),
        )
        .await
        {
            Ok(RpcResponse::Refused(reason)) => Err(RPCError::Network(NetworkError::new(
                &TransportError::Other(reason),
            ))),
            Ok(reply) => {
                self.contacts.record(self.target);
                Ok(reply)
            }
            Err(e @ TransportError::Unreachable(_)) => {
                Err(RPCError::Unreachable(openraft::error::Unreachable::new(&e)))
            }
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }

    fn unexpected<E: std::error::Error>(
        &self,
        reply: &RpcResponse,
    ) -> RPCError<NodeId, RaftNode, RaftError<NodeId, E>> {
        let e = TransportError::Other(format!("unexpected reply {reply:?}"));
        RPCError::Network(NetworkError::new(&e))
    }

    fn remote<E: std::error::Error>(
        &self,
        e: RaftError<NodeId, E>,
    ) -> RPCError<NodeId, RaftNode, RaftError<NodeId, E>> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.node.clone(),
            e,
        ))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<AppendEntriesResponse<NodeId>> {
        match self.send(RpcRequest::AppendEntries(rpc), &option).await? {
            RpcResponse::AppendEntries(r) => r.map_err(|e| self.remote(e)),
            other => Err(self.unexpected(&other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> RpcResult<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        match self.send(RpcRequest::InstallSnapshot(rpc), &option).await? {
            RpcResponse::InstallSnapshot(r) => r.map_err(|e| self.remote(e)),
            other => Err(self.unexpected(&other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> RpcResult<VoteResponse<NodeId>> {
        match self.send(RpcRequest::Vote(rpc), &option).await? {
            RpcResponse::Vote(r) => r.map_err(|e| self.remote(e)),
            other => Err(self.unexpected(&other)),
        }
    }
}
