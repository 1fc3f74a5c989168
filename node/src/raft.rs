//! The node's side of consensus: Raft messages over the mesh (`/agentmesh/raft/2.0.0`, on
//! long-lived streams: `raft/streams.rs`), and how a node enters a cluster at start (found,
//! join with a token, or come back as itself).

use crate::{
    metrics::Metrics,
    network::{NetworkError, NetworkHandle},
    peers::PeerStatus,
};
use agentmesh_consensus::{
    BootstrapStep, CallFuture, Cluster, ClusterError, RaftNode, Transport, TransportError,
};
use libp2p::{Multiaddr, PeerId};
use std::{sync::Arc, time::Duration};

mod streams;

pub use streams::serve;
/// Pause between attempts to join (or rejoin) while no member answers.
const JOIN_RETRY: Duration = Duration::from_secs(1);
/// Pause between rounds of greeting peers while waiting to found or join by cluster key.
const KEY_RETRY: Duration = Duration::from_millis(500);

/// Raft's [`Transport`] over the libp2p mesh.
pub struct MeshTransport {
    streams: streams::RaftStreams,
}

impl MeshTransport {
    /// A transport sending through `net`.
    pub fn new(net: NetworkHandle, metrics: Arc<Metrics>) -> Self {
        Self {
            streams: streams::RaftStreams::new(net, metrics),
        }
    }
}

impl Transport for MeshTransport {
    fn call(&self, target: &RaftNode, request: Vec<u8>, timeout: Duration) -> CallFuture {
        let streams = self.streams.clone();
        let peer = target.peer_id.parse::<PeerId>();
        let addrs: Vec<Multiaddr> = target.addrs.iter().filter_map(|a| a.parse().ok()).collect();
        Box::pin(async move {
            let peer = peer.map_err(|e| TransportError::Other(format!("bad peer id: {e}")))?;
            match tokio::time::timeout(timeout, streams.call(peer, addrs, &request)).await {
                Err(_) => Err(TransportError::Timeout(timeout)),
                Ok(Ok(reply)) => Ok(reply),
                Ok(Err(e @ NetworkError::Unreachable { .. })) => {
                    Err(TransportError::Unreachable(e.to_string()))
                }
                Ok(Err(e)) => Err(TransportError::Other(e.to_string())),
            }
        })
    }
}

/// The Ed25519 public key inside an Ed25519 peer id.
pub fn peer_public_key(peer: &PeerId) -> Option<[u8; 32]> {
    agentmesh_protocols::identity::peer_public_key(peer).map(|k| k.to_bytes())
}

/// How this node enters a cluster.
pub enum Entry {
    /// Found a new single-node cluster.
    Found,
    /// Join with this token through connected peers.
    Join(String),
    /// Already has state: come back as itself if it left (with this token, if given, after
    /// a removal).
    Resume(Option<String>),
    /// Holds the cluster key: join a cluster of key holders, or (with `expect`) found one
    /// together with the other expected key holders.
    Key {
        /// `--bootstrap-expect`.
        expect: Option<usize>,
    },
    /// Neither: stay a plain mesh node until given a token.
    Wait,
}

/// Runs the chosen entry. A refused token is returned as an error (the node should stop);
/// unreachable members are retried until one answers.
pub async fn enter(
    cluster: &Cluster,
    net: &NetworkHandle,
    entry: Entry,
) -> Result<(), ClusterError> {
    match entry {
        Entry::Found => cluster.found().await,
        Entry::Wait => {
            tracing::info!("not a cluster member: start with --join TOKEN to join one");
            Ok(())
        }
        Entry::Join(token) => retry_join(cluster, net, Some(&token))
            .await
            .map(|cluster_id| {
                tracing::info!(%cluster_id, "joined");
            }),
        Entry::Key { expect } => enter_by_key(cluster, net, expect).await,
        Entry::Resume(token) => {
            if cluster.needs_rejoin() {
                tracing::info!("rejoining the cluster as this node");
                retry_join(cluster, net, token.as_deref()).await.map(|_| ())
            } else {
                Ok(())
            }
        }
    }
}

async fn enter_by_key(
    cluster: &Cluster,
    net: &NetworkHandle,
    expect: Option<usize>,
) -> Result<(), ClusterError> {
    let mut attempts = 0u32;
    let mut last_reason: Option<String> = None;
    loop {
        let candidates: Vec<RaftNode> = net
            .peers()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p.status == PeerStatus::Active)
            .map(|p| RaftNode {
                peer_id: p.peer_id,
                addrs: p.addrs,
            })
            .collect();
        let waiting = match cluster.bootstrap_step(expect, &candidates).await? {
            BootstrapStep::Done => return Ok(()),
            BootstrapStep::Join(via) => match cluster.join(None, &via).await {
                Ok(cluster_id) => {
                    tracing::info!(%cluster_id, "joined with the cluster key");
                    return Ok(());
                }
                Err(e) if e.is_fatal_for_join() => return Err(e),
                Err(e) => format!("cannot join yet: {e}"),
            },
            BootstrapStep::Wait(why) => why,
        };
        if attempts.is_multiple_of(20) || last_reason.as_deref() != Some(waiting.as_str()) {
            tracing::info!(
                reason = %waiting,
                peers = candidates.len(),
                "waiting to found or join a cluster by key"
            );
        }
        last_reason = Some(waiting);
        attempts += 1;
        tokio::time::sleep(KEY_RETRY).await;
    }
}

async fn retry_join(
    cluster: &Cluster,
    net: &NetworkHandle,
    token: Option<&str>,
) -> Result<String, ClusterError> {
    let mut attempts = 0u32;
    loop {
        // Known members first (a restarted node), then whoever we are connected to.
        let mut via = cluster.known_members();
        if let Ok(peers) = net.peers().await {
            for p in peers.into_iter().filter(|p| p.status == PeerStatus::Active) {
                if !via.iter().any(|n| n.peer_id == p.peer_id) {
                    via.push(RaftNode {
                        peer_id: p.peer_id,
                        addrs: p.addrs,
                    });
                }
            }
        }
        match cluster.join(token, &via).await {
            Ok(cluster_id) => return Ok(cluster_id),
            Err(e) if e.is_fatal_for_join() => return Err(e),
            Err(e) => {
                attempts += 1;
                if attempts % 10 == 1 {
                    tracing::info!(error = %e, candidates = via.len(), "cannot join yet; retrying");
                }
                tokio::time::sleep(JOIN_RETRY).await;
            }
        }
    }
}
