//! Who this node speaks the cluster's protocols with: its members, and no one else.
//!
//! A member's view of the membership can be behind (it was down while others joined, or its
//! log is still catching up), so a Raft message from a peer it does not know is not refused
//! outright: the node asks the members it knows whether they know that peer, and remembers the
//! answer for a while. Only members it already knows are asked, and a member answers from its
//! own view only (never from what it was told), so a stranger cannot vouch for itself.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;

use super::{Cluster, Inner};
use crate::network;
use crate::rpc::{RpcRequest, RpcResponse};
use crate::types::{MemberState, NodeId, RaftNode};

/// How long a member's word that a peer is a member holds. Long enough for this node's log to
/// catch up (after which it knows the peer itself). Once the registry here says the peer left
/// or was removed, the word holds only [`STRANGER_TTL`].
const VOUCH_TTL: Duration = Duration::from_secs(600);
/// How long a stranger's refusal is remembered before members are asked again. Bounds the
/// questions a stranger can make this node send: one round per this period.
const STRANGER_TTL: Duration = Duration::from_secs(5);
/// How long to wait for members' answers.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// Members asked about one peer, at most.
const MAX_ASKED: usize = 7;
/// Verdicts remembered at once; past this, expired ones are dropped and, if still full,
/// unknown peers are refused without asking.
const MAX_VERDICTS: usize = 4096;
/// Rounds of asking at once.
const MAX_ASKING: usize = 4;

#[derive(Debug, Clone, Copy)]
enum Verdict {
    /// Members are being asked.
    Asking(Instant),
    /// A member knows it.
    Member(Instant),
    /// No member knew it.
    Stranger(Instant),
}

impl Verdict {
    fn expired(&self, now: Instant) -> bool {
        match *self {
            Verdict::Asking(t) => now.duration_since(t) > ASK_TIMEOUT * 2,
            Verdict::Member(t) => now.duration_since(t) > VOUCH_TTL,
            Verdict::Stranger(t) => now.duration_since(t) > STRANGER_TTL,
        }
    }
}

/// Peers other members vouched for, and strangers recently refused.
pub(super) struct Vouches {
    verdicts: std::sync::Mutex<HashMap<NodeId, (String, Verdict)>>,
    /// Permits for rounds of asking.
    asking: tokio::sync::Semaphore,
    /// Bumped whenever a peer is vouched for, so the member set is recomputed.
    changed: watch::Sender<u64>,
}

impl Default for Vouches {
    fn default() -> Self {
        Self {
            verdicts: Default::default(),
            asking: tokio::sync::Semaphore::new(MAX_ASKING),
            changed: watch::channel(0).0,
        }
    }
}

impl Inner {
    /// Whether this node is in a cluster (has applied its founding).
    pub(super) fn in_cluster(&self) -> bool {
        self.state
            .read()
            .is_ok_and(|a| a.state.cluster_id.is_some())
    }

    /// Whether this node itself knows `id` as a member: the registry says it is active, or the
    /// Raft membership (which runs ahead of the registry) holds it and the registry does not
    /// say it left or was removed.
    pub(super) fn knows_member(&self, id: NodeId) -> bool {
        if let Ok(applied) = self.state.read() {
            if let Some(m) = applied.state.members.get(&id) {
                return m.state == MemberState::Active;
            }
        }
        let metrics = self.raft.metrics();
        let m = metrics.borrow();
        m.membership_config.membership().get_node(&id).is_some()
    }

    /// Whether a Raft message from `caller` may be handled by a node in a cluster: it is a
    /// member this node knows, or one the members it knows vouch for.
    pub(super) async fn admits_member(&self, caller: NodeId, caller_peer: &str) -> bool {
        if self.knows_member(caller) {
            return true;
        }
        // A peer our registry says left or was removed may have come back while we were
        // behind, but a yes about it is trusted only briefly (and must be unanimous, below).
        let gone = self.is_gone(caller);
        let now = Instant::now();
        {
            let Ok(mut verdicts) = self.vouches.verdicts.lock() else {
                return false;
            };
            match verdicts.get(&caller).map(|(_, v)| *v) {
                Some(Verdict::Member(t)) if gone && now.duration_since(t) > STRANGER_TTL => {}
                Some(v) if !v.expired(now) => return matches!(v, Verdict::Member(_)),
                _ => {}
            }
            if verdicts.len() >= MAX_VERDICTS {
                verdicts.retain(|_, (_, v)| !v.expired(now));
                if verdicts.len() >= MAX_VERDICTS {
                    return false;
                }
            }
            verdicts.insert(caller, (caller_peer.to_string(), Verdict::Asking(now)));
        }
        // Strangers cannot make this node ask without bound: a few rounds at a time, and a
        // Raft message arriving while all are busy is refused at once (its sender retries).
        let vouched = match self.vouches.asking.try_acquire() {
            Ok(_round) => self.ask_members(caller, gone).await,
            Err(_) => {
                if let Ok(mut verdicts) = self.vouches.verdicts.lock() {
                    verdicts.remove(&caller);
                }
                return false;
            }
        };
        let verdict = if vouched {
            Verdict::Member(Instant::now())
        } else {
            Verdict::Stranger(Instant::now())
        };
        if let Ok(mut verdicts) = self.vouches.verdicts.lock() {
            verdicts.insert(caller, (caller_peer.to_string(), verdict));
        }
        if vouched {
            tracing::info!(peer = %caller_peer, "a member vouched for a peer this node did not know yet");
            self.vouches.changed.send_modify(|n| *n += 1);
        } else {
            tracing::debug!(peer = %caller_peer, "no member knows this peer; refusing its Raft messages");
        }
        vouched
    }

    /// Asks up to [`MAX_ASKED`] known members (a random choice, so that dead or stale ones do
    /// not always come first), at once, whether they know `id`. A yes from one suffices for a
    /// peer this node has never seen; about one its registry says is gone, every member that
    /// answers must say yes (one that has applied the removal says no).
    async fn ask_members(&self, id: NodeId, gone: bool) -> bool {
        use rand::seq::SliceRandom;
        let mut candidates: Vec<RaftNode> = self
            .member_nodes()
            .into_iter()
            .filter(|(n, _)| *n != id && *n != self.id)
            .map(|(_, node)| node)
            .collect();
        candidates.shuffle(&mut rand::rng());
        candidates.truncate(MAX_ASKED);
        let mut answers = JoinSet::new();
        for node in candidates {
            let transport = self.transport.clone();
            answers.spawn(async move {
                let request = RpcRequest::IsMember { node_id: id };
                match network::call(&*transport, &node, &request, ASK_TIMEOUT).await {
                    Ok(RpcResponse::IsMember(yes)) => Some(yes),
                    _ => None,
                }
            });
        }
        let mut yes = false;
        while let Some(answer) = answers.join_next().await {
            match answer.ok().flatten() {
                Some(true) if !gone => return true,
                Some(true) => yes = true,
                Some(false) if gone => return false,
                _ => {}
            }
        }
        yes
    }

    /// Every member this node knows, with how to reach it.
    fn member_nodes(&self) -> Vec<(NodeId, RaftNode)> {
        let mut nodes: Vec<(NodeId, RaftNode)> = Vec::new();
        if let Ok(applied) = self.state.read() {
            for m in applied.state.members.values() {
                if m.state == MemberState::Active {
                    nodes.push((m.node_id, m.raft_node()));
                }
            }
        }
        let in_raft: Vec<(NodeId, RaftNode)> = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            m.membership_config
                .membership()
                .nodes()
                .map(|(id, node)| (*id, node.clone()))
                .collect()
        };
        for (id, node) in in_raft {
            if !nodes.iter().any(|(n, _)| *n == id) && !self.is_gone(id) {
                nodes.push((id, node));
            }
        }
        nodes
    }

    /// The peer ids this node serves; `None` while it is not in a cluster.
    fn member_peers(&self) -> Option<HashSet<String>> {
        if !self.in_cluster() {
            return None;
        }
        let mut peers: HashSet<String> = self
            .member_nodes()
            .into_iter()
            .map(|(_, n)| n.peer_id)
            .collect();
        let now = Instant::now();
        if let Ok(verdicts) = self.vouches.verdicts.lock() {
            for (id, (peer, v)) in verdicts.iter() {
                if matches!(v, Verdict::Member(_)) && !v.expired(now) && !self.is_gone(*id) {
                    peers.insert(peer.clone());
                }
            }
        }
        Some(peers)
    }

    /// Whether the registry says `id` left or was removed.
    fn is_gone(&self, id: NodeId) -> bool {
        self.state.read().is_ok_and(|a| {
            a.state
                .members
                .get(&id)
                .is_some_and(|m| m.state != MemberState::Active)
        })
    }
}

impl Cluster {
    /// The peer ids this node serves the mesh's protocols to (gossip, blobs, Raft): the members
    /// it knows and those other members vouched for. `None` while the node is not in a cluster
    /// (a plain mesh node gates nothing). Updated as entries are applied, the Raft membership
    /// changes, or a member vouches for a peer.
    pub fn members_watch(&self) -> watch::Receiver<Option<Arc<HashSet<String>>>> {
        let inner = Arc::downgrade(&self.inner);
        let mut metrics = self.inner.raft.metrics();
        let mut vouched = self.inner.vouches.changed.subscribe();
        let (tx, rx) = watch::channel(self.inner.member_peers().map(Arc::new));
        // Raft's metrics change on every heartbeat and replication step; the member set only
        // when an entry is applied (the registry) or the Raft membership changes.
        let mark = |m: &openraft::RaftMetrics<NodeId, RaftNode>| {
            (m.last_applied, *m.membership_config.log_id())
        };
        let mut seen = mark(&metrics.borrow_and_update());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = metrics.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let now = mark(&metrics.borrow_and_update());
                        if now == seen {
                            continue;
                        }
                        seen = now;
                    }
                    changed = vouched.changed() => if changed.is_err() { break },
                    _ = tx.closed() => break,
                }
                let Some(inner) = inner.upgrade() else { break };
                let peers = inner.member_peers();
                tx.send_if_modified(|current| {
                    let changed = current.as_deref() != peers.as_ref();
                    if changed {
                        *current = peers.map(Arc::new);
                    }
                    changed
                });
            }
        });
        rx
    }
}
