//! The Raft handle the node uses: client operations (forwarded to the leader from any member),
//! joining, tokens, status, and the leader's membership loop that keeps the cluster healthy.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

mod audit;
mod forwarded;
mod gate;

pub use audit::MAX_AUDIT_READ;

use crate::access::{Credential, ADMIN_REQUIRES_KEY};
use crate::bootstrap::{self, BootstrapState, BootstrapStep, Decline, HelloReply};
use crate::cluster_key::ClusterKey;
use crate::config::{ClusterConfig, ConfigError};
use crate::network::{self, Contacts, NetworkFactory, Transport, TransportError};
use crate::rpc::{
    self, ClientOp, ClientReply, RemoteError, RemoteErrorKind, RpcRequest, RpcResponse,
};
use crate::state::{ClusterState, KvEntry, MAX_KEY_LEN, MAX_NAME_LEN, MAX_VALUE_LEN};
use crate::store::{SharedState, Storage};
use crate::token::{JoinToken, TokenBody, TokenError, MAX_TOKEN_TTL_SECS};
use crate::types::{
    node_id_for, Command, CommandResult, MemberRecord, MemberState, NodeId, Raft, RaftNode,
    Rejection, SealKey,
};

/// How long a client operation may take, retries through leader changes included.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most keys one list returns.
pub const MAX_LIST: usize = 10_000;
/// A learner this many entries behind the leader is not promoted yet.
const PROMOTION_LAG: u64 = 256;
/// How long a greeting or proposal to a peer waiting to found may take.
const HELLO_TIMEOUT: Duration = Duration::from_secs(3);
/// The leader checks membership this often.
const RECONCILE_EVERY: Duration = Duration::from_millis(500);
/// Most commands grouped into one log entry.
const MAX_BATCH_COMMANDS: usize = 1024;
/// A batch closes once its commands hold this many bytes (so one entry stays far below the
/// RPC limit even with `max_payload_entries` of them in one AppendEntries).
const MAX_BATCH_BYTES: usize = 192 * 1024;
/// Writes waiting to be proposed.
const PROPOSAL_QUEUE: usize = 4096;

/// A write waiting for the batcher.
struct Proposal {
    cmd: Command,
    reply: oneshot::Sender<Result<CommandResult, ClusterError>>,
}

fn approx_size(cmd: &Command) -> usize {
    let audit_size = |e: &crate::access::AuditEntry| {
        64 + e.actor.len()
            + e.via.len()
            + e.action.len()
            + e.target.len()
            + e.detail.len()
            + e.outcome.len()
    };
    match cmd {
        Command::KvPut { key, value, .. } => key.len() + value.len() + 32,
        Command::KvDelete { key, .. } => key.len() + 32,
        Command::Audit(entries) => entries.iter().map(audit_size).sum(),
        Command::Audited { entry, cmd } => audit_size(entry) + approx_size(cmd),
        _ => 512,
    }
}

/// Proposes writes in batches: everything that queued up while the previous entry was being
/// committed goes into the next one. openraft 0.9 commits one client entry at a time, so
/// batching is what lets concurrent writers share a round of replication and a flush.
async fn propose_batches(raft: Raft, mut queue: mpsc::Receiver<Proposal>) {
    while let Some(first) = queue.recv().await {
        let mut bytes = approx_size(&first.cmd);
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_COMMANDS && bytes < MAX_BATCH_BYTES {
            match queue.try_recv() {
                Ok(p) => {
                    bytes += approx_size(&p.cmd);
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        if batch.len() == 1 {
            if let Some(p) = batch.pop() {
                let result = raft
                    .client_write(p.cmd)
                    .await
                    .map(|r| r.data)
                    .map_err(map_write_err);
                let _ = p.reply.send(result);
            }
            continue;
        }
        let (cmds, replies): (Vec<Command>, Vec<_>) =
            batch.into_iter().map(|p| (p.cmd, p.reply)).unzip();
        match raft.client_write(Command::Batch(cmds)).await {
            Ok(resp) => match resp.data {
                CommandResult::Batch(results) if results.len() == replies.len() => {
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(Ok(result));
                    }
                }
                other => {
                    for reply in replies {
                        let e = ClusterError::Raft(format!("unexpected batch result {other:?}"));
                        let _ = reply.send(Err(e));
                    }
                }
            },
            Err(e) => {
                let retry = matches!(e, RaftError::APIError(ClientWriteError::ForwardToLeader(_)));
                let message = e.to_string();
                for reply in replies {
                    let e = if retry {
                        ClusterError::NoLeader(message.clone())
                    } else {
                        ClusterError::Raft(message.clone())
                    };
                    let _ = reply.send(Err(e));
                }
            }
        }
    }
}

/// Why a cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No leader is known (election in progress, or no quorum).
    #[error("no leader: {0}")]
    NoLeader(String),
    /// This node is not a member of a cluster.
    #[error("this node is not a member of a cluster")]
    NotMember,
    /// The state machine refused the command.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// A join token was refused.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// A member refused this node's join token.
    #[error("join refused: {0}")]
    JoinRefused(String),
    /// The cluster key this node presented is not the cluster's.
    #[error("cluster key refused: {0}")]
    ClusterKey(String),
    /// The request itself is invalid.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The peer refused the request.
    #[error("refused: {0}")]
    Refused(String),
    /// The leader could not be reached; a write may or may not have been applied.
    #[error("leader unreachable, outcome unknown: {0}")]
    Unavailable(String),
    /// Storage failed.
    #[error("storage: {0}")]
    Storage(String),
    /// Raft failed.
    #[error("raft: {0}")]
    Raft(String),
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

impl ClusterError {
    /// Whether trying again (at the new leader) is safe and may succeed.
    fn is_retryable(&self) -> bool {
        matches!(self, ClusterError::NoLeader(_))
    }

    /// Whether a joining node should stop trying: the token itself was refused.
    pub fn is_fatal_for_join(&self) -> bool {
        matches!(
            self,
            ClusterError::Token(_)
                | ClusterError::Rejected(_)
                | ClusterError::Invalid(_)
                | ClusterError::JoinRefused(_)
                | ClusterError::ClusterKey(_)
        )
    }

    fn to_remote(&self) -> RemoteError {
        let kind = match self {
            ClusterError::NoLeader(_) => RemoteErrorKind::NotLeader,
            ClusterError::Token(_)
            | ClusterError::Rejected(_)
            | ClusterError::JoinRefused(_)
            | ClusterError::ClusterKey(_) => RemoteErrorKind::Token,
            ClusterError::Invalid(_) | ClusterError::Refused(_) | ClusterError::NotMember => {
                RemoteErrorKind::Refused
            }
            _ => RemoteErrorKind::Unavailable,
        };
        let rejection = match self {
            ClusterError::Rejected(r) => Some(r.clone()),
            _ => None,
        };
        RemoteError {
            kind,
            message: self.to_string(),
            rejection,
        }
    }

    fn from_remote(e: RemoteError) -> Self {
        if let Some(r) = e.rejection {
            return ClusterError::Rejected(r);
        }
        match e.kind {
            RemoteErrorKind::NotLeader => ClusterError::NoLeader(e.message),
            RemoteErrorKind::Token => ClusterError::JoinRefused(e.message),
            RemoteErrorKind::Refused => ClusterError::Refused(e.message),
            RemoteErrorKind::Unavailable => ClusterError::Unavailable(e.message),
        }
    }
}

/// Who this node is.
pub struct Identity {
    /// libp2p peer id.
    pub peer_id: String,
    /// Ed25519 key of the identity; signs join tokens.
    pub signing_key: SigningKey,
    /// Human-readable name.
    pub name: String,
    /// Listen addresses.
    pub addrs: Vec<String>,
    /// The shared cluster key, if the node was given one (`--cluster-key-file`).
    pub cluster_key: Option<ClusterKey>,
}

/// One member as `agentmesh cluster` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    /// Raft node id (hex).
    pub node_id: String,
    /// libp2p peer id.
    pub peer_id: String,
    /// Name.
    pub name: String,
    /// `voter`, `learner` or `none` (not in the Raft membership).
    pub role: &'static str,
    /// `active` or `left`.
    pub state: MemberState,
    /// Whether it is the leader.
    pub leader: bool,
    /// Milliseconds since it last answered this node (known on the leader only).
    pub last_contact_ms: Option<u64>,
    /// Highest log index known to be replicated to it (known on the leader only).
    pub matched_index: Option<u64>,
}

/// The `raft` section of `/v1/status`, and `agentmesh cluster`.
#[derive(Debug, Clone, Serialize)]
pub struct RaftStatus {
    /// Cluster id, once founded.
    pub cluster_id: Option<String>,
    /// This node's Raft id (hex).
    pub node_id: String,
    /// `leader`, `follower`, `candidate`, `learner` or `shutdown`.
    pub role: &'static str,
    /// Current term.
    pub term: u64,
    /// Leader's node id (hex), if known.
    pub leader: Option<String>,
    /// Leader's peer id, if known.
    pub leader_peer_id: Option<String>,
    /// Voter ids (hex).
    pub voters: Vec<String>,
    /// Learner ids (hex).
    pub learners: Vec<String>,
    /// A membership change is under way: the cluster is in a joint configuration, or the
    /// latest configuration is not applied here yet. (While joint, a quorum of the old voters
    /// is needed too: `voters` lists both sets.)
    pub membership_changing: bool,
    /// Last applied log index.
    pub last_applied: Option<u64>,
    /// Last log index.
    pub last_log_index: Option<u64>,
    /// Last snapshot's log index.
    pub snapshot_index: Option<u64>,
    /// Every member in the registry.
    pub members: Vec<MemberStatus>,
}

/// Formats a node id the way it is shown to users (JSON numbers lose precision above 2^53).
pub fn fmt_node_id(id: NodeId) -> String {
    format!("{id:016x}")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

struct Inner {
    id: NodeId,
    identity: Identity,
    raft: Raft,
    state: SharedState,
    storage: Storage,
    transport: Arc<dyn Transport>,
    contacts: Contacts,
    config: ClusterConfig,
    had_state: bool,
    proposals: mpsc::Sender<Proposal>,
    bootstrap: tokio::sync::Mutex<Bootstrap>,
    audit_buffer: audit::SharedAuditBuffer,
    vouches: gate::Vouches,
}

/// A waiting node's side of founding by cluster key.
struct Bootstrap {
    /// `--bootstrap-expect`, once the node has said it waits to found.
    expect: Option<usize>,
    /// What it promised (on disk).
    state: BootstrapState,
    /// It is waiting to found or join by key: until it has Raft state, Raft messages are
    /// taken only from the set it promised.
    waiting: bool,
    /// A join by key succeeded: the leader may now replicate to it.
    joined: bool,
}

/// A handle on this node's Raft member. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

impl Cluster {
    /// Opens the Raft storage in `dir` and starts the Raft node. Does not found or join.
    pub async fn start(
        dir: &Path,
        identity: Identity,
        config: ClusterConfig,
        transport: Arc<dyn Transport>,
    ) -> Result<Self, ClusterError> {
        config.validate()?;
        let raft_config = Arc::new(config.to_openraft()?);
        let storage = Storage::open(dir).map_err(|e| ClusterError::Storage(e.to_string()))?;
        let had_state = storage.has_state();
        let bootstrap = tokio::sync::Mutex::new(Bootstrap {
            expect: None,
            state: storage.load_bootstrap().map_err(ClusterError::Storage)?,
            waiting: false,
            joined: false,
        });
        let (log, sm) = storage
            .split()
            .map_err(|e| ClusterError::Storage(e.to_string()))?;
        let state = sm.shared();
        let contacts = Contacts::default();
        let id = node_id_for(&identity.peer_id);
        let network = NetworkFactory {
            transport: transport.clone(),
            contacts: contacts.clone(),
        };
        let raft = Raft::new(id, raft_config, network, log, sm)
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let (proposals, queue) = mpsc::channel(PROPOSAL_QUEUE);
        tokio::spawn(propose_batches(raft.clone(), queue));
        let inner = Arc::new(Inner {
            id,
            identity,
            raft,
            state,
            storage,
            transport,
            contacts,
            config,
            had_state,
            proposals,
            bootstrap,
            audit_buffer: Default::default(),
            vouches: Default::default(),
        });
        tokio::spawn(reconcile_loop(Arc::downgrade(&inner)));
        tokio::spawn(audit::flush_loop(Arc::downgrade(&inner)));
        Ok(Self { inner })
    }

    /// This node's Raft id.
    pub fn node_id(&self) -> NodeId {
        self.inner.id
    }

    /// Whether the data dir held Raft state when the node started: such a node is (or was) a
    /// member and must never found a new cluster.
    pub fn had_state(&self) -> bool {
        self.inner.had_state
    }

    /// Founds a new single-member cluster with this node as its voter. The leader then records
    /// the cluster id and this member in the registry.
    pub async fn found(&self) -> Result<(), ClusterError> {
        let inner = &self.inner;
        let initialized = inner
            .raft
            .is_initialized()
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        if initialized || inner.had_state {
            return Ok(());
        }
        let nodes = BTreeMap::from([(inner.id, inner.raft_node())]);
        inner
            .raft
            .initialize(nodes)
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        tracing::info!(node_id = %fmt_node_id(inner.id), "founded a new cluster");
        Ok(())
    }

    /// Asks the members in `via` (tried in turn) to admit this node. Without a token this only
    /// works for a member that left and comes back as itself.
    pub async fn join(
        &self,
        token: Option<&str>,
        via: &[RaftNode],
    ) -> Result<String, ClusterError> {
        if let Some(t) = token {
            JoinToken::parse(t)?;
        }
        let identity = &self.inner.identity;
        let request = RpcRequest::Join {
            token: token.map(str::to_string),
            name: identity.name.clone(),
            addrs: identity.addrs.clone(),
            key_proof: match (token, &identity.cluster_key) {
                (None, Some(key)) => Some(key.prove(&identity.peer_id)),
                _ => None,
            },
        };
        let mut last = ClusterError::NoLeader("no member reachable".into());
        for target in via {
            if target.peer_id == self.inner.identity.peer_id {
                continue;
            }
            let reply = network::call(
                self.inner.transport.as_ref(),
                target,
                &request,
                CLIENT_TIMEOUT,
            )
            .await;
            match reply {
                Ok(RpcResponse::Client(Ok(ClientReply::Joined { cluster_id }))) => {
                    tracing::info!(%cluster_id, via = %target.peer_id, "joined the cluster");
                    self.inner.bootstrap.lock().await.joined = true;
                    return Ok(cluster_id);
                }
                Ok(RpcResponse::Client(Err(e))) => {
                    let token_refused = e.kind == RemoteErrorKind::Token;
                    if token_refused && token.is_none() && identity.cluster_key.is_some() {
                        return Err(ClusterError::ClusterKey(e.message));
                    }
                    let e = ClusterError::from_remote(e);
                    if token_refused {
                        return Err(e);
                    }
                    last = e;
                }
                Ok(RpcResponse::Refused(reason)) => last = ClusterError::Refused(reason),
                Ok(other) => last = ClusterError::Refused(format!("unexpected reply {other:?}")),
                Err(e) => last = ClusterError::Unavailable(e.to_string()),
            }
        }
        Err(last)
    }

    /// One step of waiting to found or join by cluster key (`--bootstrap-expect`; `expect` is
    /// `None` for a key holder that only joins). `candidates` are the peers to greet. Call it
    /// until it returns [`BootstrapStep::Done`], or [`BootstrapStep::Join`] and a join
    /// through those peers succeeds. See `bootstrap.rs` for the protocol.
    pub async fn bootstrap_step(
        &self,
        expect: Option<usize>,
        candidates: &[RaftNode],
    ) -> Result<BootstrapStep, ClusterError> {
        let inner = &self.inner;
        let Some(key) = inner.identity.cluster_key.clone() else {
            return Err(ClusterError::Invalid("no cluster key".into()));
        };
        if let Some(n) = expect {
            if n == 0 || n > bootstrap::MAX_BOOTSTRAP_EXPECT {
                return Err(ClusterError::Invalid(format!(
                    "--bootstrap-expect must be 1..={}",
                    bootstrap::MAX_BOOTSTRAP_EXPECT
                )));
            }
        }
        {
            let mut b = inner.bootstrap.lock().await;
            b.expect = expect;
            b.waiting = true;
        }
        if inner.storage.has_state() {
            return Ok(BootstrapStep::Done);
        }
        let me = inner.identity.peer_id.clone();
        let hello = RpcRequest::Hello {
            key_proof: Some(key.prove(&me)),
        };
        let replies = self.call_all(candidates, &hello, HELLO_TIMEOUT).await;
        let mut holders = BTreeMap::from([(me.clone(), inner.member_record())]);
        let mut members = Vec::new();
        let mut foreign = 0usize;
        let mut proposing = BTreeMap::new();
        for (node, reply) in replies {
            let Ok(RpcResponse::Hello(r)) = reply else {
                continue;
            };
            // Only peers proving they hold our key count, as members to join through or as
            // fellow founders: anyone else could send us to a cluster that refuses our key.
            let holds = r
                .key_proof
                .as_ref()
                .is_some_and(|p| key.verifies(&node.peer_id, p));
            if !holds {
                foreign += usize::from(r.cluster_id.is_some());
                continue;
            }
            if r.cluster_id.is_some() {
                members.push(node);
                continue;
            }
            if r.expect != expect {
                continue;
            }
            proposing.insert(
                node.peer_id.clone(),
                r.accepted.as_deref() == Some(&node.peer_id),
            );
            holders.insert(
                node.peer_id.clone(),
                MemberRecord {
                    node_id: node_id_for(&node.peer_id),
                    peer_id: node.peer_id.clone(),
                    public_key: r.public_key,
                    name: r.name,
                    addrs: r.addrs,
                    joined_at: unix_now(),
                    state: MemberState::Active,
                    seal_keys: Vec::new(),
                },
            );
        }
        if !members.is_empty() {
            return Ok(BootstrapStep::Join(members));
        }
        let Some(expect) = expect else {
            return Ok(BootstrapStep::Wait(if foreign > 0 {
                format!(
                    "{foreign} peers are members of a cluster but none proves our cluster key \
                     (is the key the cluster's?)"
                )
            } else {
                "no member of a cluster holding our key seen yet".into()
            }));
        };
        // Bound to someone else's proposal: wait for it. The promise ends only when that
        // proposer says it no longer proposes; a silent one may have initialized Raft.
        {
            let mut b = inner.bootstrap.lock().await;
            if let Some(p) = b.state.accepted.clone().filter(|p| p.proposer != me) {
                if proposing.get(&p.proposer) != Some(&false) {
                    return Ok(BootstrapStep::Wait(format!(
                        "promised to found with {}",
                        p.proposer
                    )));
                }
                tracing::info!(proposer = %p.proposer, "the proposer this node promised gave up");
                self.save_promise(&mut b, None).await?;
            }
        }
        match bootstrap::choose_set(&me, &holders, expect) {
            Ok(set) => self.propose(&key, set).await,
            Err(why) => {
                // Our own earlier proposal (from before a restart, say) no longer fits what
                // we see: free whoever accepted it, or they would wait for us forever.
                self.abandon_own_proposal().await?;
                Ok(BootstrapStep::Wait(why))
            }
        }
    }

    /// The proposer's side: promise ourselves, ask everyone else in `set`, and initialize Raft
    /// only if all of them accepted.
    async fn propose(
        &self,
        key: &ClusterKey,
        set: Vec<MemberRecord>,
    ) -> Result<BootstrapStep, ClusterError> {
        let inner = &self.inner;
        let me = inner.identity.peer_id.clone();
        let round = {
            let mut b = inner.bootstrap.lock().await;
            if inner.storage.has_state() {
                return Ok(BootstrapStep::Done);
            }
            // A promise to someone else may have been given since the caller looked.
            if let Some(p) = b.state.accepted.as_ref().filter(|p| p.proposer != me) {
                return Ok(BootstrapStep::Wait(format!(
                    "promised to found with {}",
                    p.proposer
                )));
            }
            match b.state.accepted.clone() {
                // Same set again (a retry): same round.
                Some(p) if p.members == set => p.round,
                old => {
                    let round = b.state.rounds + 1;
                    let mine = BootstrapState {
                        accepted: Some(bootstrap::Proposal {
                            proposer: me.clone(),
                            round,
                            members: set.clone(),
                        }),
                        rounds: round,
                    };
                    inner
                        .storage
                        .save_bootstrap(&mine)
                        .await
                        .map_err(|e| ClusterError::Storage(e.to_string()))?;
                    b.state = mine;
                    drop(b);
                    if let Some(old) = old {
                        self.release(&old).await;
                    }
                    round
                }
            }
        };
        let others: Vec<RaftNode> = set
            .iter()
            .filter(|m| m.peer_id != me)
            .map(MemberRecord::raft_node)
            .collect();
        let request = RpcRequest::Propose {
            round,
            members: set.clone(),
            key_proof: key.prove(&me),
        };
        let replies = self.call_all(&others, &request, HELLO_TIMEOUT).await;
        let mut refusals: Vec<String> = replies
            .iter()
            .filter_map(|(node, r)| match r {
                Ok(RpcResponse::Proposal(Ok(()))) => None,
                Ok(RpcResponse::Proposal(Err(d))) => Some(format!("{}: {d}", node.peer_id)),
                Ok(other) => Some(format!("{}: unexpected reply {other:?}", node.peer_id)),
                Err(e) => Some(format!("{}: {e}", node.peer_id)),
            })
            .collect();
        // A call that did not come back at all is no acceptance either.
        for node in &others {
            if !replies.iter().any(|(n, _)| n.peer_id == node.peer_id) {
                refusals.push(format!("{}: no answer", node.peer_id));
            }
        }
        if refusals.is_empty() {
            let nodes: BTreeMap<NodeId, RaftNode> =
                set.iter().map(|m| (m.node_id, m.raft_node())).collect();
            inner
                .raft
                .initialize(nodes)
                .await
                .map_err(|e| ClusterError::Raft(e.to_string()))?;
            let names: Vec<&str> = set.iter().map(|m| m.name.as_str()).collect();
            tracing::info!(members = ?names, "founded a cluster with the expected key holders");
            return Ok(BootstrapStep::Done);
        }
        // Not everyone agreed: free the ones that did and try again later.
        self.abandon_own_proposal().await?;
        Ok(BootstrapStep::Wait(format!(
            "proposal not accepted by all: {}",
            refusals.join("; ")
        )))
    }

    /// Persists this node's promise (or its absence) and only then changes it in memory.
    async fn save_promise(
        &self,
        b: &mut Bootstrap,
        accepted: Option<bootstrap::Proposal>,
    ) -> Result<(), ClusterError> {
        let next = BootstrapState {
            accepted,
            rounds: b.state.rounds,
        };
        self.inner
            .storage
            .save_bootstrap(&next)
            .await
            .map_err(|e| ClusterError::Storage(e.to_string()))?;
        b.state = next;
        Ok(())
    }

    /// Drops this node's own proposal, if it has one and no Raft state, releasing the others
    /// in it.
    async fn abandon_own_proposal(&self) -> Result<(), ClusterError> {
        let mut b = self.inner.bootstrap.lock().await;
        let own = b
            .state
            .accepted
            .clone()
            .filter(|p| p.proposer == self.inner.identity.peer_id);
        if let Some(p) = own {
            if self.inner.storage.has_state() {
                return Ok(()); // it was initialized: that promise is history
            }
            self.save_promise(&mut b, None).await?;
            drop(b);
            self.release(&p).await;
        }
        Ok(())
    }

    /// Tells the others in our proposal `p` that its round is over.
    async fn release(&self, p: &bootstrap::Proposal) {
        let others: Vec<RaftNode> = p
            .members
            .iter()
            .filter(|m| m.peer_id != self.inner.identity.peer_id)
            .map(MemberRecord::raft_node)
            .collect();
        let request = RpcRequest::Release { round: p.round };
        let _ = self.call_all(&others, &request, HELLO_TIMEOUT).await;
    }

    /// Sends `request` to every node at once and collects the answers.
    async fn call_all(
        &self,
        nodes: &[RaftNode],
        request: &RpcRequest,
        timeout: Duration,
    ) -> Vec<(RaftNode, Result<RpcResponse, TransportError>)> {
        let bytes = rpc::encode(request);
        let mut calls = tokio::task::JoinSet::new();
        for node in nodes {
            if node.peer_id == self.inner.identity.peer_id {
                continue;
            }
            let transport = self.inner.transport.clone();
            let node = node.clone();
            let bytes = bytes.clone();
            calls.spawn(async move {
                let reply = transport
                    .call(&node, bytes, timeout)
                    .await
                    .and_then(|b| rpc::decode(&b).map_err(TransportError::Other));
                (node, reply)
            });
        }
        let mut out = Vec::with_capacity(nodes.len());
        while let Some(joined) = calls.join_next().await {
            if let Ok(r) = joined {
                out.push(r);
            }
        }
        out
    }

    /// Whether this node is an active member of the Raft membership (voter or learner).
    pub fn is_member(&self) -> bool {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow();
        m.membership_config
            .membership()
            .get_node(&self.inner.id)
            .is_some()
    }

    /// Candidates to rejoin through: every other member this node knows of.
    pub fn known_members(&self) -> Vec<RaftNode> {
        let Ok(applied) = self.inner.state.read() else {
            return Vec::new();
        };
        let mut nodes: Vec<RaftNode> = applied
            .state
            .members
            .values()
            .filter(|m| m.node_id != self.inner.id)
            .map(MemberRecord::raft_node)
            .collect();
        for (id, node) in applied.membership.membership().nodes() {
            if *id != self.inner.id && !nodes.iter().any(|n| n.peer_id == node.peer_id) {
                nodes.push(node.clone());
            }
        }
        nodes
    }

    /// Whether this node left gracefully, was removed, or was never admitted, and should ask
    /// to come back.
    pub fn needs_rejoin(&self) -> bool {
        let left = self.inner.state.read().is_ok_and(|a| {
            a.state
                .members
                .get(&self.inner.id)
                .is_some_and(|m| m.state != MemberState::Active)
        });
        left || (self.inner.had_state && !self.is_member())
    }

    /// Writes a key for `actor` (an audit actor), who presented `credential`. `if_version`: compare-and-set
    /// (0 = create only). [`ADMIN_REQUIRES_KEY`] takes `true` or `false`, and is turned on only
    /// with an API key (the leader checks it is an admin's), so that whoever turns it on has
    /// the key it then takes.
    pub async fn kv_put(
        &self,
        key: &str,
        value: &serde_json::Value,
        if_version: Option<u64>,
        actor: &str,
        credential: Option<&Credential>,
    ) -> Result<u64, ClusterError> {
        validate_key(key)?;
        if key == ADMIN_REQUIRES_KEY {
            match value {
                serde_json::Value::Bool(true) if credential.is_none() => {
                    return Err(ClusterError::Invalid(format!(
                        "turn {ADMIN_REQUIRES_KEY} on with an admin API key (create one with \
                         `agentmesh apikey create --role admin`): from then on admin changes \
                         need one"
                    )))
                }
                serde_json::Value::Bool(_) => {}
                _ => {
                    return Err(ClusterError::Invalid(format!(
                        "{ADMIN_REQUIRES_KEY} is true or false"
                    )))
                }
            }
        }
        let value = value.to_string();
        if value.len() > MAX_VALUE_LEN {
            return Err(ClusterError::Invalid(format!(
                "value of {} bytes exceeds {MAX_VALUE_LEN}",
                value.len()
            )));
        }
        let cmd = Command::KvPut {
            key: key.to_string(),
            value,
            if_version,
        };
        match self.write_setting(cmd, actor, credential).await? {
            CommandResult::Written { version } => Ok(version),
            other => Err(ClusterError::Raft(format!("unexpected result {other:?}"))),
        }
    }

    /// Deletes a key for `actor` (an audit actor), who presented `credential`; returns
    /// whether it existed.
    pub async fn kv_delete(
        &self,
        key: &str,
        if_version: Option<u64>,
        actor: &str,
        credential: Option<&Credential>,
    ) -> Result<bool, ClusterError> {
        validate_key(key)?;
        let cmd = Command::KvDelete {
            key: key.to_string(),
            if_version,
        };
        match self.write_setting(cmd, actor, credential).await? {
            CommandResult::Deleted { existed } => Ok(existed),
            other => Err(ClusterError::Raft(format!("unexpected result {other:?}"))),
        }
    }

    /// Reads a key, linearizably.
    pub async fn kv_get(&self, key: &str) -> Result<Option<KvEntry>, ClusterError> {
        validate_key(key)?;
        match self.inner.execute(ClientOp::KvGet(key.to_string())).await? {
            ClientReply::Kv(entry) => Ok(entry),
            other => Err(ClusterError::Raft(format!("unexpected reply {other:?}"))),
        }
    }

    /// Lists keys starting with `prefix` (at most [`MAX_LIST`]), linearizably.
    pub async fn kv_list(&self, prefix: &str) -> Result<Vec<(String, KvEntry)>, ClusterError> {
        if prefix.len() > MAX_KEY_LEN {
            return Err(ClusterError::Invalid(format!(
                "prefix longer than {MAX_KEY_LEN} bytes"
            )));
        }
        match self
            .inner
            .execute(ClientOp::KvList(prefix.to_string()))
            .await?
        {
            ClientReply::KvList(entries) => Ok(entries),
            other => Err(ClusterError::Raft(format!("unexpected reply {other:?}"))),
        }
    }

    /// Writes a kv change for `actor`; one to a `security.*` setting is an admin change, so
    /// it is audited.
    async fn write_setting(
        &self,
        cmd: Command,
        actor: &str,
        credential: Option<&Credential>,
    ) -> Result<CommandResult, ClusterError> {
        if !cmd.is_admin_change() {
            return self.write(cmd).await;
        }
        let (action, key, detail) = match &cmd {
            Command::KvPut { key, value, .. } => ("setting.put", key.as_str(), value.as_str()),
            Command::KvDelete { key, .. } => ("setting.delete", key.as_str(), ""),
            _ => ("setting", "", ""),
        };
        let entry = self.audit_entry(actor, action, key, detail);
        self.write_audited_as(entry, cmd, credential).await
    }

    /// Renames this node everywhere; `actor` asked for it (an audit actor).
    pub async fn rename(&self, name: &str, actor: &str) -> Result<(), ClusterError> {
        validate_name(name)?;
        let cmd = Command::Rename {
            node_id: self.inner.id,
            name: name.to_string(),
        };
        let entry = self.audit_entry(actor, "member.rename", &self.inner.identity.peer_id, name);
        self.write_audited(entry, cmd).await.map(|_| ())
    }

    /// Publishes this node's sealing public key (`label` names it in the audit log), made at
    /// `created_at_ms`, signed with its identity key; `actor` asked for it (an audit actor).
    /// Returns once this node has applied it, so a message sealed after it uses it.
    pub async fn publish_seal_key(
        &self,
        public: [u8; 32],
        created_at_ms: u64,
        label: &str,
        actor: &str,
    ) -> Result<(), ClusterError> {
        let key = SealKey::sign(
            &self.inner.identity.signing_key,
            self.inner.id,
            public,
            created_at_ms,
        );
        let id = self.inner.id;
        let cmd = Command::SetSealKey {
            node_id: id,
            key: key.clone(),
        };
        let entry = self.audit_entry(
            actor,
            "seal_key.publish",
            &self.inner.identity.peer_id,
            label,
        );
        if let CommandResult::Rejected(r) = self.write_audited(entry, cmd).await? {
            return Err(r.into());
        }
        let applied = self
            .wait_applied_here(CLIENT_TIMEOUT, |s| {
                s.members
                    .get(&id)
                    .is_some_and(|m| m.seal_keys.last() == Some(&key))
            })
            .await;
        if !applied {
            return Err(ClusterError::Unavailable(
                "the key is committed but this node has not applied it yet".into(),
            ));
        }
        Ok(())
    }

    /// Issues a single-use join token valid for `ttl` to `actor` (an audit actor), who
    /// presented `credential`. Returns the token and its expiry once it is registered in the
    /// cluster and in the audit log.
    pub async fn issue_token(
        &self,
        ttl: Duration,
        actor: &str,
        credential: Option<&Credential>,
    ) -> Result<(String, u64), ClusterError> {
        if ttl.is_zero() || ttl.as_secs() > MAX_TOKEN_TTL_SECS {
            return Err(ClusterError::Invalid(format!(
                "ttl must be between 1 second and {MAX_TOKEN_TTL_SECS} seconds"
            )));
        }
        let cluster_id = {
            let applied = self.inner.state.read().map_err(|_| poisoned())?;
            let active = applied
                .state
                .members
                .get(&self.inner.id)
                .is_some_and(|m| m.state == MemberState::Active);
            match (&applied.state.cluster_id, active) {
                (Some(id), true) => id.clone(),
                _ => return Err(ClusterError::NotMember),
            }
        };
        let now = unix_now();
        let expires_at = now + ttl.as_secs();
        let body = TokenBody {
            cluster_id,
            issuer: self.inner.id,
            expires_at,
            nonce: rand::random::<[u8; 16]>().to_vec(),
        };
        let entry = self.audit_entry(
            actor,
            "token.issue",
            &token_label(&body.nonce),
            &format!("expires_at {expires_at}"),
        );
        let register = Command::IssueToken {
            nonce: body.nonce.clone(),
            issuer: body.issuer,
            expires_at,
            issued_at: now,
        };
        let token = JoinToken::issue(&self.inner.identity.signing_key, body);
        self.write_audited_as(entry, register, credential).await?;
        Ok((token, expires_at))
    }

    /// Removes a member, named by peer id, node id or name; `actor` is the audit actor, who
    /// presented `credential`. The
    /// other members stop serving it as soon as they apply the removal, the leader takes it
    /// out of the Raft membership, and it needs a new join token to come back. Returns the
    /// removed member once this node has applied the removal.
    pub async fn remove_member(
        &self,
        who: &str,
        actor: &str,
        credential: Option<&Credential>,
    ) -> Result<MemberRecord, ClusterError> {
        let member = self.read(|s| {
            let mut found = s
                .members
                .values()
                .filter(|m| m.peer_id == who || fmt_node_id(m.node_id) == who || m.name == who);
            match (found.next(), found.next()) {
                (Some(m), None) => Ok(m.clone()),
                (Some(_), Some(_)) => Err(ClusterError::Invalid(format!(
                    "{who:?} names more than one member; give the peer id"
                ))),
                (None, _) => Err(ClusterError::Invalid(format!("no member {who:?}"))),
            }
        })??;
        if member.state != MemberState::Active {
            return Err(ClusterError::Invalid(format!(
                "{} is not an active member",
                member.name
            )));
        }
        if member.node_id == self.inner.id {
            return Err(ClusterError::Invalid(format!(
                "{} is the node asked: remove it through another member (or stop it to leave)",
                member.name
            )));
        }
        let entry = self.audit_entry(actor, "member.remove", &member.peer_id, &member.name);
        let cmd = Command::Remove {
            node_id: member.node_id,
        };
        self.write_audited_as(entry, cmd, credential).await?;
        let id = member.node_id;
        let applied = self
            .wait_applied_here(CLIENT_TIMEOUT, |s| {
                s.members
                    .get(&id)
                    .is_some_and(|m| m.state == MemberState::Removed)
            })
            .await;
        if !applied {
            return Err(ClusterError::Unavailable(
                "the removal is committed but this node has not applied it yet".into(),
            ));
        }
        Ok(member)
    }

    /// Leaves the cluster gracefully: marks this member as left and waits (bounded) until the
    /// leader has taken it out of the voters; the leader then removes it entirely.
    pub async fn leave(&self) -> Result<(), ClusterError> {
        let others = {
            let applied = self.inner.state.read().map_err(|_| poisoned())?;
            applied
                .state
                .active_members()
                .filter(|m| m.node_id != self.inner.id)
                .count()
        };
        if others == 0 || !self.is_member() {
            return Ok(());
        }
        let me = format!("node:{}", self.inner.identity.peer_id);
        let entry = self.audit_entry(&me, "member.leave", &self.inner.identity.peer_id, "");
        self.write_audited(
            entry,
            Command::Leave {
                node_id: self.inner.id,
            },
        )
        .await?;
        let mut metrics = self.inner.raft.metrics();
        let id = self.inner.id;
        let removed = tokio::time::timeout(
            CLIENT_TIMEOUT,
            // Out of the voters is what matters: the cluster no longer counts on us. (Once
            // removed entirely we may never hear of it: nobody replicates to us then.)
            metrics.wait_for(|m| {
                !m.membership_config
                    .membership()
                    .voter_ids()
                    .any(|v| v == id)
            }),
        )
        .await
        .is_ok();
        if removed {
            Ok(())
        } else {
            Err(ClusterError::Unavailable(
                "leader did not remove us in time".into(),
            ))
        }
    }

    /// The voters of the latest membership this node knows: the nodes that may lead, and so
    /// coordinate a training round.
    pub fn voter_ids(&self) -> BTreeSet<NodeId> {
        self.inner
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect()
    }

    /// Current status.
    pub fn status(&self) -> RaftStatus {
        let inner = &self.inner;
        let metrics = inner.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        let is_leader = metrics.state == ServerState::Leader;
        let replication = metrics.replication.clone().unwrap_or_default();
        let (cluster_id, registry) = match inner.state.read() {
            Ok(a) => (a.state.cluster_id.clone(), a.state.members.clone()),
            Err(_) => (None, BTreeMap::new()),
        };
        let members = registry
            .values()
            .map(|m| MemberStatus {
                node_id: fmt_node_id(m.node_id),
                peer_id: m.peer_id.clone(),
                name: m.name.clone(),
                role: if voters.contains(&m.node_id) {
                    "voter"
                } else if learners.contains(&m.node_id) {
                    "learner"
                } else {
                    "none"
                },
                state: m.state,
                leader: metrics.current_leader == Some(m.node_id),
                last_contact_ms: if m.node_id == inner.id {
                    Some(0)
                } else if is_leader {
                    inner
                        .contacts
                        .last(m.node_id)
                        .map(|t| t.elapsed().as_millis() as u64)
                } else {
                    None
                },
                matched_index: replication
                    .get(&m.node_id)
                    .copied()
                    .flatten()
                    .map(|l| l.index),
            })
            .collect();
        let leader_peer_id = metrics
            .current_leader
            .and_then(|l| membership.get_node(&l).map(|n| n.peer_id.clone()));
        RaftStatus {
            cluster_id,
            node_id: fmt_node_id(inner.id),
            role: match metrics.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "shutdown",
            },
            term: metrics.current_term,
            leader: metrics.current_leader.map(fmt_node_id),
            leader_peer_id,
            voters: voters.iter().copied().map(fmt_node_id).collect(),
            learners: learners.iter().copied().map(fmt_node_id).collect(),
            membership_changing: membership.get_joint_config().len() > 1
                || metrics.membership_config.log_id().map(|l| l.index)
                    > metrics.last_applied.map(|l| l.index),
            last_applied: metrics.last_applied.map(|l| l.index),
            last_log_index: metrics.last_log_index,
            snapshot_index: metrics.snapshot.map(|l| l.index),
            members,
        }
    }

    /// Whether the node is a member of a founded cluster with a known leader (what `/readyz`
    /// reports).
    pub fn has_leader(&self) -> bool {
        let metrics = self.inner.raft.metrics();
        let m = metrics.borrow();
        let founded = self
            .inner
            .state
            .read()
            .is_ok_and(|a| a.state.cluster_id.is_some());
        // openraft 0.9 has no check-quorum: a leader cut off from its voters still says it
        // leads. Count it as leaderless once no quorum has answered for an election timeout.
        let alone = m.current_leader == Some(self.inner.id)
            && m.membership_config.membership().voter_ids().count() > 1
            && m.millis_since_quorum_ack
                .is_none_or(|ms| ms > self.inner.config.election_timeout_max_ms);
        founded
            && m.current_leader.is_some()
            && !alone
            && m.membership_config
                .membership()
                .get_node(&self.inner.id)
                .is_some()
    }

    /// Writes a training-job command through Raft.
    pub async fn job_write(&self, cmd: crate::jobs::JobCommand) -> Result<(), ClusterError> {
        self.write(Command::Job(cmd)).await.map(|_| ())
    }

    /// Whether admin changes need a replicated admin API key ([`ADMIN_REQUIRES_KEY`]), as
    /// this node has applied it.
    pub fn admin_requires_key(&self) -> bool {
        self.read(ClusterState::admin_requires_key).unwrap_or(false)
    }

    /// Reads this node's applied state (not linearizable: a follower may lag the leader by the
    /// entries it has not applied yet).
    pub fn read<R>(&self, f: impl FnOnce(&ClusterState) -> R) -> Result<R, ClusterError> {
        let applied = self.inner.state.read().map_err(|_| poisoned())?;
        Ok(f(&applied.state))
    }

    /// Whether this node leads the cluster with a quorum behind it.
    pub fn is_leader(&self) -> bool {
        self.has_leader()
            && self.inner.raft.metrics().borrow().current_leader == Some(self.inner.id)
    }

    /// Waits until this node's applied state satisfies `done`, or `within` passes; returns
    /// whether it does. Writes return once the leader has applied them: a follower that
    /// answers a client waits here so the client reads its own write.
    pub async fn wait_applied_here(
        &self,
        within: Duration,
        done: impl Fn(&ClusterState) -> bool,
    ) -> bool {
        let mut applied = self.applied_watch();
        tokio::time::timeout(within, async {
            loop {
                if self.read(&done).unwrap_or(true) {
                    return true;
                }
                if applied.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await
        .unwrap_or(false)
    }

    /// The index of the last applied entry, updated as entries are applied.
    pub fn applied_watch(&self) -> watch::Receiver<Option<u64>> {
        let (tx, rx) = watch::channel(None);
        let mut metrics = self.inner.raft.metrics();
        tokio::spawn(async move {
            loop {
                let applied = metrics.borrow_and_update().last_applied.map(|l| l.index);
                tx.send_if_modified(|a| {
                    let changed = *a != applied;
                    *a = applied;
                    changed
                });
                if metrics.changed().await.is_err() || tx.is_closed() {
                    break;
                }
            }
        });
        rx
    }

    /// The current leader's id, updated as it changes.
    pub fn leader_watch(&self) -> watch::Receiver<Option<NodeId>> {
        let (tx, rx) = watch::channel(None);
        let mut metrics = self.inner.raft.metrics();
        tokio::spawn(async move {
            loop {
                let leader = metrics.borrow_and_update().current_leader;
                tx.send_if_modified(|l| {
                    let changed = *l != leader;
                    *l = leader;
                    changed
                });
                if metrics.changed().await.is_err() || tx.is_closed() {
                    break;
                }
            }
        });
        rx
    }

    /// Answers a request from another node. `caller` is the authenticated peer id the request
    /// arrived from and `caller_key` its Ed25519 public key.
    pub async fn handle_rpc(&self, caller: &str, caller_key: &[u8], request: &[u8]) -> Vec<u8> {
        let reply = self.inner.handle_rpc(caller, caller_key, request).await;
        rpc::encode(&reply)
    }

    /// Flushes storage and stops Raft.
    pub async fn shutdown(&self) {
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        if let Err(e) = self.inner.storage.flush().await {
            tracing::warn!(error = %e, "flushing raft storage");
        }
    }

    async fn write(&self, cmd: Command) -> Result<CommandResult, ClusterError> {
        self.write_as(cmd, None).await
    }

    /// Writes `cmd` for a caller that presented `credential` (see `cluster/forwarded.rs`).
    async fn write_as(
        &self,
        cmd: Command,
        credential: Option<&Credential>,
    ) -> Result<CommandResult, ClusterError> {
        // The key goes to the leader only for a change that needs it.
        let op = match credential {
            Some(c) if cmd.is_admin_change() => ClientOp::WriteAs {
                cmd,
                credential: Some(c.clone()),
            },
            _ => ClientOp::Write(cmd),
        };
        match self.inner.execute(op).await? {
            ClientReply::Applied(CommandResult::Rejected(r)) => Err(r.into()),
            ClientReply::Applied(result) => Ok(result),
            other => Err(ClusterError::Raft(format!("unexpected reply {other:?}"))),
        }
    }
}

fn validate_key(key: &str) -> Result<(), ClusterError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(ClusterError::Invalid(format!(
            "key must be 1 to {MAX_KEY_LEN} bytes"
        )));
    }
    if let Some(c) = key
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-/:".contains(*c)))
    {
        return Err(ClusterError::Invalid(format!(
            "key contains {c:?}; keys use letters, digits and . _ - / :"
        )));
    }
    Ok(())
}

fn validate_name(name: &str) -> Result<(), ClusterError> {
    if name.trim().is_empty() || name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        return Err(ClusterError::Invalid(format!(
            "name must be 1 to {MAX_NAME_LEN} bytes of printable text"
        )));
    }
    Ok(())
}

fn poisoned() -> ClusterError {
    ClusterError::Storage("state lock poisoned".into())
}

fn map_write_err(e: RaftError<NodeId, ClientWriteError<NodeId, RaftNode>>) -> ClusterError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
            ClusterError::NoLeader(format!("leadership moved to {:?}", f.leader_id))
        }
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            ClusterError::Raft(e.to_string())
        }
        RaftError::Fatal(e) => ClusterError::Raft(e.to_string()),
    }
}

fn map_read_err(e: RaftError<NodeId, CheckIsLeaderError<NodeId, RaftNode>>) -> ClusterError {
    match e {
        RaftError::APIError(e) => ClusterError::NoLeader(e.to_string()),
        RaftError::Fatal(e) => ClusterError::Raft(e.to_string()),
    }
}

impl Inner {
    fn raft_node(&self) -> RaftNode {
        RaftNode {
            peer_id: self.identity.peer_id.clone(),
            addrs: self.identity.addrs.clone(),
        }
    }

    fn member_record(&self) -> MemberRecord {
        MemberRecord {
            node_id: self.id,
            peer_id: self.identity.peer_id.clone(),
            public_key: self
                .identity
                .signing_key
                .verifying_key()
                .to_bytes()
                .to_vec(),
            name: self.identity.name.clone(),
            addrs: self.identity.addrs.clone(),
            joined_at: unix_now(),
            state: MemberState::Active,
            seal_keys: Vec::new(),
        }
    }

    /// Runs a client operation on the leader, wherever it is, retrying through elections.
    async fn execute(&self, op: ClientOp) -> Result<ClientReply, ClusterError> {
        let deadline = Instant::now() + CLIENT_TIMEOUT;
        let mut metrics = self.raft.metrics();
        let in_cluster = metrics
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .count()
            > 0;
        if !in_cluster {
            return Err(ClusterError::NotMember);
        }
        loop {
            let leader = metrics.borrow_and_update().current_leader;
            let attempt = match leader {
                Some(l) if l == self.id => {
                    // A leader cut off from its quorum never commits: answer within the
                    // deadline, like any unreachable leader, rather than hang the client.
                    let left = deadline.saturating_duration_since(Instant::now());
                    tokio::time::timeout(left, self.execute_local(op.clone()))
                        .await
                        .unwrap_or_else(|_| {
                            Err(ClusterError::Unavailable(
                                "no quorum answered in time (is this node partitioned?)".into(),
                            ))
                        })
                }
                Some(l) => self.forward(l, &op).await,
                None => Err(ClusterError::NoLeader("no leader elected".into())),
            };
            match attempt {
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    // Wait for the leader to change (or a short while, in case it already has).
                    let wait = deadline
                        .saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(200));
                    let _ = tokio::time::timeout(wait, metrics.changed()).await;
                }
                other => return other,
            }
        }
    }

    async fn forward(&self, leader: NodeId, op: &ClientOp) -> Result<ClientReply, ClusterError> {
        let node = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            m.membership_config.membership().get_node(&leader).cloned()
        };
        let Some(node) = node else {
            return Err(ClusterError::NoLeader(format!(
                "leader {} unknown",
                fmt_node_id(leader)
            )));
        };
        let request = RpcRequest::Forward(op.clone());
        match network::call(self.transport.as_ref(), &node, &request, CLIENT_TIMEOUT).await {
            Ok(RpcResponse::Client(reply)) => reply.map_err(ClusterError::from_remote),
            Ok(RpcResponse::Refused(reason)) => Err(ClusterError::Refused(reason)),
            Ok(other) => Err(ClusterError::Raft(format!("unexpected reply {other:?}"))),
            // Not delivered at all: safe to try again once a leader is reachable.
            Err(TransportError::Unreachable(e)) => Err(ClusterError::NoLeader(e)),
            Err(e) => Err(ClusterError::Unavailable(e.to_string())),
        }
    }

    /// On the leader: proposes `cmd` once `credential` is found to allow it.
    async fn propose_write(
        &self,
        cmd: Command,
        credential: Option<&Credential>,
    ) -> Result<ClientReply, ClusterError> {
        if cmd.is_admin_change() {
            // Decided on a state holding everything committed before it, so a key revoked
            // or a setting changed a moment ago counts.
            self.raft
                .ensure_linearizable()
                .await
                .map_err(map_read_err)?;
            let applied = self.state.read().map_err(|_| poisoned())?;
            if let Err(why) = forwarded::authorize(&applied.state, &cmd, credential) {
                tracing::warn!(%why, ?credential, "refusing an admin change");
                return Err(ClusterError::Refused(why));
            }
        }
        let (reply, result) = oneshot::channel();
        self.proposals
            .send(Proposal { cmd, reply })
            .await
            .map_err(|_| ClusterError::Raft("the proposer has stopped".into()))?;
        let result = result
            .await
            .map_err(|_| ClusterError::Raft("the proposer has stopped".into()))??;
        Ok(ClientReply::Applied(result))
    }

    async fn execute_local(&self, op: ClientOp) -> Result<ClientReply, ClusterError> {
        match op {
            ClientOp::Write(cmd) => self.propose_write(cmd, None).await,
            ClientOp::WriteAs { cmd, credential } => {
                self.propose_write(cmd, credential.as_ref()).await
            }
            ClientOp::KvGet(key) => {
                self.raft
                    .ensure_linearizable()
                    .await
                    .map_err(map_read_err)?;
                let applied = self.state.read().map_err(|_| poisoned())?;
                Ok(ClientReply::Kv(applied.state.kv.get(&key).cloned()))
            }
            ClientOp::KvList(prefix) => {
                self.raft
                    .ensure_linearizable()
                    .await
                    .map_err(map_read_err)?;
                let applied = self.state.read().map_err(|_| poisoned())?;
                let entries = applied
                    .state
                    .kv
                    .range(prefix.clone()..)
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .take(MAX_LIST)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                Ok(ClientReply::KvList(entries))
            }
            ClientOp::Audit {
                after,
                since_ms,
                limit,
            } => {
                self.raft
                    .ensure_linearizable()
                    .await
                    .map_err(map_read_err)?;
                let applied = self.state.read().map_err(|_| poisoned())?;
                Ok(ClientReply::Audit(audit::select(
                    &applied.state,
                    after,
                    since_ms,
                    limit,
                )))
            }
            ClientOp::Join {
                member,
                token,
                key_proof,
            } => self.admit(member, token, key_proof).await,
        }
    }

    /// On the leader: checks a join request and commits the new member.
    async fn admit(
        &self,
        member: MemberRecord,
        token: Option<String>,
        key_proof: Option<Vec<u8>>,
    ) -> Result<ClientReply, ClusterError> {
        if member.node_id != node_id_for(&member.peer_id) {
            return Err(ClusterError::Invalid(
                "the node id is not derived from the peer id".into(),
            ));
        }
        let now = unix_now();
        let cluster_id = {
            let applied = self.state.read().map_err(|_| poisoned())?;
            applied.state.cluster_id.clone()
        };
        let Some(cluster_id) = cluster_id else {
            return Err(ClusterError::NoLeader(
                "the cluster is still being founded".into(),
            ));
        };
        // Refusals are queued, not written: a stranger must not be able to drive the log.
        let refuse = |e: ClusterError| {
            self.audit_later(
                audit::entry_now(
                    &self.identity.peer_id,
                    &format!("node:{}", member.peer_id),
                    "token.refused",
                    &member.peer_id,
                    "",
                )
                .with_outcome(&format!("refused: {e}")),
            );
            e
        };
        let checked = self
            .check_join_token(token, &cluster_id, now)
            .map_err(refuse)?;
        let former = {
            let applied = self.state.read().map_err(|_| poisoned())?;
            applied.state.members.contains_key(&member.node_id)
        };
        if checked.is_none() && key_proof.is_none() && !former {
            return Err(refuse(Rejection::TokenRequired.into()));
        }
        let by_key = match (&checked, key_proof) {
            (None, Some(proof)) => self.check_key_proof(&member, &proof).map_err(refuse)?,
            _ => false,
        };
        let how = match (&checked, by_key) {
            (Some(t), _) => format!(
                "name {}; {} issued by node {}",
                member.name,
                t.label,
                fmt_node_id(t.issuer)
            ),
            (None, true) => format!("name {}; cluster key", member.name),
            (None, false) => format!("name {}; returning member", member.name),
        };
        let entry = audit::entry_now(
            &self.identity.peer_id,
            &format!("node:{}", member.peer_id),
            "member.join",
            &member.peer_id,
            &how,
        );
        let node_id = member.node_id;
        let raft_node = member.raft_node();
        let cmd = Command::Join {
            member,
            token: checked.map(|t| t.token_use),
            now,
            by_key,
        };
        let cmd = Command::Audited {
            entry,
            cmd: Box::new(cmd),
        };
        let resp = self.raft.client_write(cmd).await.map_err(map_write_err)?;
        if let CommandResult::Rejected(r) = resp.data {
            return Err(r.into());
        }
        let known = {
            let metrics = self.raft.metrics();
            let m = metrics.borrow();
            m.membership_config
                .membership()
                .get_node(&node_id)
                .is_some()
        };
        if !known {
            // The reconciler would do this within a tick; doing it now makes joins prompt.
            if let Err(e) = self.raft.add_learner(node_id, raft_node, false).await {
                tracing::debug!(error = %e, "add_learner after join; the reconciler retries");
            }
        }
        Ok(ClientReply::Joined { cluster_id })
    }

    /// Checks a presented join token against the registry. No token: nothing to check.
    fn check_join_token(
        &self,
        token: Option<String>,
        cluster_id: &str,
        now: u64,
    ) -> Result<Option<CheckedToken>, ClusterError> {
        let Some(t) = token else {
            return Ok(None);
        };
        let parsed = JoinToken::parse(&t)?;
        let issuer_key = {
            let applied = self.state.read().map_err(|_| poisoned())?;
            applied
                .state
                .members
                .get(&parsed.body.issuer)
                .filter(|m| m.state == MemberState::Active)
                .map(|m| m.public_key.clone())
        };
        let Some(issuer_key) = issuer_key else {
            if parsed.body.cluster_id != cluster_id {
                return Err(TokenError::ForeignCluster {
                    token: parsed.body.cluster_id,
                    ours: cluster_id.to_string(),
                }
                .into());
            }
            return Err(TokenError::UnknownIssuer(parsed.body.issuer).into());
        };
        parsed.verify(&issuer_key, cluster_id, now)?;
        Ok(Some(CheckedToken {
            token_use: crate::types::TokenUse {
                nonce: parsed.body.nonce.clone(),
                expires_at: parsed.body.expires_at,
                issuer: Some(parsed.body.issuer),
            },
            issuer: parsed.body.issuer,
            label: token_label(&parsed.body.nonce),
        }))
    }

    /// Queues an audit entry (see [`Cluster::audit_later`]).
    fn audit_later(&self, entry: crate::access::AuditEntry) {
        match self.audit_buffer.lock() {
            Ok(mut b) => b.add(entry),
            Err(_) => tracing::warn!("audit buffer poisoned; entry dropped"),
        }
    }

    /// Whether a joining node's cluster-key proof admits it. A former member coming back
    /// needs no key, so a bad proof only refuses a newcomer.
    fn check_key_proof(&self, member: &MemberRecord, proof: &[u8]) -> Result<bool, ClusterError> {
        let applied = self.state.read().map_err(|_| poisoned())?;
        let former = applied.state.members.contains_key(&member.node_id);
        let Some(public) = &applied.state.cluster_key else {
            return if former {
                Ok(false)
            } else {
                Err(Rejection::NoClusterKey.into())
            };
        };
        if ClusterKey::verify(public, &member.peer_id, proof) {
            Ok(true)
        } else if former {
            Ok(false)
        } else {
            Err(ClusterError::ClusterKey(
                "it is not this cluster's key".into(),
            ))
        }
    }

    async fn handle_rpc(&self, caller: &str, caller_key: &[u8], bytes: &[u8]) -> RpcResponse {
        let request: RpcRequest = match rpc::decode(bytes) {
            Ok(r) => r,
            Err(e) => return RpcResponse::Refused(e),
        };
        let caller_id = node_id_for(caller);
        let spoofed = || {
            RpcResponse::Refused(format!(
                "peer {caller} sent a Raft message in another node's name"
            ))
        };
        let raft_message = matches!(
            request,
            RpcRequest::AppendEntries(_) | RpcRequest::Vote(_) | RpcRequest::InstallSnapshot(_)
        );
        if raft_message {
            if self.in_cluster() {
                // A cluster speaks Raft with its members only; a removed member is cut off
                // as soon as its removal is applied here.
                if !self.admits_member(caller_id, caller).await {
                    return RpcResponse::Refused(format!(
                        "peer {caller} is not a member of this cluster"
                    ));
                }
            } else if !self.takes_raft_from(caller_id).await {
                return RpcResponse::Refused(format!(
                    "peer {caller} is not in the set this node promised to found with"
                ));
            }
        }
        match request {
            RpcRequest::AppendEntries(r) => {
                if r.vote.leader_id.node_id != caller_id {
                    return spoofed();
                }
                RpcResponse::AppendEntries(self.raft.append_entries(r).await)
            }
            RpcRequest::Vote(r) => {
                if r.vote.leader_id.node_id != caller_id {
                    return spoofed();
                }
                RpcResponse::Vote(self.raft.vote(r).await)
            }
            RpcRequest::InstallSnapshot(r) => {
                if r.vote.leader_id.node_id != caller_id {
                    return spoofed();
                }
                RpcResponse::InstallSnapshot(self.raft.install_snapshot(r).await)
            }
            RpcRequest::Forward(op) => {
                let is_member = self.state.read().is_ok_and(|a| {
                    a.state
                        .members
                        .get(&caller_id)
                        .is_some_and(|m| m.state == MemberState::Active)
                });
                if !is_member {
                    return RpcResponse::Refused(format!("peer {caller} is not a member"));
                }
                if self.raft.current_leader().await != Some(self.id) {
                    let e = ClusterError::NoLeader("not the leader".into());
                    return RpcResponse::Client(Err(e.to_remote()));
                }
                if let ClientOp::Write(cmd) | ClientOp::WriteAs { cmd, .. } = &op {
                    if let Err(why) = forwarded::check(caller_id, caller, cmd) {
                        tracing::warn!(%caller, %why, "refusing a forwarded write");
                        let e = ClusterError::Invalid(format!("refused from {caller}: {why}"));
                        return RpcResponse::Client(Err(e.to_remote()));
                    }
                }
                RpcResponse::Client(self.execute_local(op).await.map_err(|e| e.to_remote()))
            }
            RpcRequest::Join {
                token,
                name,
                addrs,
                key_proof,
            } => {
                let founded = self
                    .state
                    .read()
                    .is_ok_and(|a| a.state.cluster_id.is_some());
                if !founded {
                    return RpcResponse::Client(Err(ClusterError::NotMember.to_remote()));
                }
                if let Err(e) = validate_name(&name) {
                    return RpcResponse::Client(Err(e.to_remote()));
                }
                if addrs.len() > 32 || addrs.iter().any(|a| a.len() > 256) {
                    let e = ClusterError::Invalid("too many or too long addresses".into());
                    return RpcResponse::Client(Err(e.to_remote()));
                }
                let member = MemberRecord {
                    node_id: caller_id,
                    peer_id: caller.to_string(),
                    public_key: caller_key.to_vec(),
                    name,
                    addrs,
                    joined_at: unix_now(),
                    state: MemberState::Active,
                    seal_keys: Vec::new(),
                };
                let reply = self
                    .execute(ClientOp::Join {
                        member,
                        token,
                        key_proof,
                    })
                    .await;
                RpcResponse::Client(reply.map_err(|e| e.to_remote()))
            }
            // Membership is no secret (peer ids are public in the DHT): anyone may ask.
            RpcRequest::IsMember { node_id } => {
                RpcResponse::IsMember(self.in_cluster() && self.knows_member(node_id))
            }
            RpcRequest::Hello { key_proof } => {
                let holds_key = match (&self.identity.cluster_key, &key_proof) {
                    (Some(key), Some(proof)) => key.verifies(caller, proof),
                    _ => false,
                };
                RpcResponse::Hello(self.hello_reply(holds_key).await)
            }
            RpcRequest::Propose {
                round,
                members,
                key_proof,
            } => RpcResponse::Proposal(
                self.consider_proposal(caller, round, members, &key_proof)
                    .await,
            ),
            RpcRequest::Release { round } => {
                let mut b = self.bootstrap.lock().await;
                // Only the promised round, and never once Raft has state: a late release
                // must not free a node whose founding already happened.
                if bootstrap::releases(&b.state, caller, round) && !self.storage.has_state() {
                    let freed = BootstrapState {
                        accepted: None,
                        rounds: b.state.rounds,
                    };
                    match self.storage.save_bootstrap(&freed).await {
                        Ok(()) => b.state = freed,
                        Err(e) => tracing::warn!(error = %e, "cannot save the bootstrap state"),
                    }
                }
                RpcResponse::Released
            }
        }
    }

    /// Whether a Raft message from `caller` may be handled. A node waiting to found or join
    /// by key has no Raft state yet; a vote or entries from a stranger would give it some and
    /// end its founding, so until then only the set it promised may send Raft messages (and
    /// anyone once it has joined by key).
    async fn takes_raft_from(&self, caller: NodeId) -> bool {
        let mut b = self.bootstrap.lock().await;
        if !b.waiting || b.joined {
            return true;
        }
        if self.storage.has_state() {
            // In a cluster now: stop asking storage on every Raft message.
            b.waiting = false;
            return true;
        }
        b.state
            .accepted
            .as_ref()
            .is_some_and(|p| p.members.iter().any(|m| m.node_id == caller))
    }

    /// Describes this node to a greeting peer. Only a peer that proved it holds our cluster
    /// key learns our own proof and whom we promised.
    async fn hello_reply(&self, holds_key: bool) -> HelloReply {
        let cluster_id = self
            .state
            .read()
            .ok()
            .and_then(|a| a.state.cluster_id.clone());
        let b = self.bootstrap.lock().await;
        HelloReply {
            name: self.identity.name.clone(),
            addrs: self.identity.addrs.clone(),
            public_key: self.member_record().public_key,
            key_proof: self
                .identity
                .cluster_key
                .as_ref()
                .filter(|_| holds_key)
                .map(|k| k.prove(&self.identity.peer_id)),
            cluster_id,
            accepted: b
                .state
                .accepted
                .as_ref()
                .filter(|_| holds_key)
                .map(|p| p.proposer.clone()),
            expect: b.expect,
        }
    }

    /// The acceptor's side of founding: promise `caller` to found with `members`, on disk
    /// before answering, unless this node is in a cluster or promised someone else.
    async fn consider_proposal(
        &self,
        caller: &str,
        round: u64,
        members: Vec<MemberRecord>,
        key_proof: &[u8],
    ) -> Result<(), Decline> {
        let Some(key) = &self.identity.cluster_key else {
            return Err(Decline::Invalid("this node holds no cluster key".into()));
        };
        if !key.verifies(caller, key_proof) {
            return Err(Decline::Invalid(
                "the proposer does not hold our cluster key".into(),
            ));
        }
        let mut b = self.bootstrap.lock().await;
        if self.storage.has_state() {
            return Err(Decline::InCluster);
        }
        bootstrap::check_proposal(
            &b.state,
            &self.member_record(),
            b.expect,
            caller,
            round,
            &members,
        )?;
        let accepted = bootstrap::Proposal {
            proposer: caller.to_string(),
            round,
            members,
        };
        if b.state.accepted.as_ref() != Some(&accepted) {
            let promised = BootstrapState {
                accepted: Some(accepted),
                rounds: b.state.rounds,
            };
            self.storage
                .save_bootstrap(&promised)
                .await
                .map_err(|e| Decline::Invalid(format!("cannot save the promise: {e}")))?;
            b.state = promised;
        }
        Ok(())
    }

    /// One pass of the leader's membership loop. Makes at most one membership change.
    async fn reconcile(&self, leader_since: Instant) -> Result<(), ClusterError> {
        let metrics = self.raft.metrics().borrow().clone();
        let (cluster_id, registry) = {
            let applied = self.state.read().map_err(|_| poisoned())?;
            (
                applied.state.cluster_id.clone(),
                applied.state.members.clone(),
            )
        };
        let membership = metrics.membership_config.membership().clone();
        if cluster_id.is_none() {
            // Founded but not yet named (the founder may have stopped in between). Alone, or
            // as one of the key holders that all accepted the founding set.
            let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
            let members = if voters == BTreeSet::from([self.id]) {
                Some(vec![self.member_record()])
            } else {
                let b = self.bootstrap.lock().await;
                b.state
                    .accepted
                    .as_ref()
                    .filter(|p| {
                        p.members.iter().map(|m| m.node_id).collect::<BTreeSet<_>>() == voters
                    })
                    .map(|p| p.members.clone())
            };
            if let Some(members) = members {
                let cmd = Command::Found {
                    cluster_id: hex_id(rand::random::<[u8; 16]>()),
                    members,
                    cluster_key: self
                        .identity
                        .cluster_key
                        .as_ref()
                        .map(|k| k.public_key().to_vec()),
                };
                self.raft.client_write(cmd).await.map_err(map_write_err)?;
            }
            return Ok(());
        }
        if membership.get_joint_config().len() > 1 {
            return Ok(()); // a change is in progress
        }
        let in_raft: BTreeSet<NodeId> = membership.nodes().map(|(id, _)| *id).collect();
        let active: BTreeSet<NodeId> = registry
            .values()
            .filter(|m| m.state == MemberState::Active)
            .map(|m| m.node_id)
            .collect();

        // 1. Admitted members that are not in the Raft membership yet become learners.
        if let Some(m) = registry
            .values()
            .find(|m| m.state == MemberState::Active && !in_raft.contains(&m.node_id))
        {
            tracing::info!(node = %m.name, "adding learner");
            self.raft
                .add_learner(m.node_id, m.raft_node(), false)
                .await
                .map_err(map_write_err)?;
            return Ok(());
        }

        // 2. Keep the target number of healthy voters.
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
        let eligible: BTreeSet<NodeId> = active.intersection(&in_raft).copied().collect();
        let target = self.config.voter_target(eligible.len());
        let unreachable_after = self.config.unreachable_after();
        // Time since a node last answered us; a node we never heard from since we became
        // leader is given the benefit of the doubt until `unreachable_after` has passed.
        let silence = |id: NodeId| -> Option<Duration> {
            if id == self.id {
                return Some(Duration::ZERO);
            }
            self.contacts.last(id).map(|t| t.elapsed())
        };
        let healthy = |id: NodeId| match silence(id) {
            Some(s) => s < unreachable_after,
            None => leader_since.elapsed() < unreachable_after,
        };
        // Most recently heard from first; never heard from last.
        let by_recency = |ids: Vec<NodeId>| {
            let mut ids = ids;
            ids.sort_by_key(|id| (silence(*id).unwrap_or(Duration::MAX), *id));
            ids
        };
        let last_index = metrics.last_log_index.unwrap_or(0);
        let replication = metrics.replication.clone().unwrap_or_default();
        let caught_up = |id: NodeId| {
            replication
                .get(&id)
                .copied()
                .flatten()
                .is_some_and(|m| m.index + PROMOTION_LAG >= last_index)
        };
        let healthy_voters = by_recency(
            voters
                .iter()
                .copied()
                .filter(|v| eligible.contains(v) && healthy(*v))
                .collect(),
        );
        let promotable = by_recency(
            learners
                .iter()
                .copied()
                .filter(|l| eligible.contains(l) && healthy(*l) && caught_up(*l))
                .collect(),
        );
        // Voters we cannot replace stay: a dead voter counts against quorum either way.
        let stuck_voters: Vec<NodeId> = voters
            .iter()
            .copied()
            .filter(|v| eligible.contains(v) && !healthy(*v))
            .collect();
        let mut desired: Vec<NodeId> = Vec::new();
        if eligible.contains(&self.id) {
            desired.push(self.id);
        }
        for id in healthy_voters
            .into_iter()
            .chain(promotable)
            .chain(stuck_voters)
        {
            if desired.len() >= target {
                break;
            }
            if !desired.contains(&id) {
                desired.push(id);
            }
        }
        let desired: BTreeSet<NodeId> = desired.into_iter().collect();
        if !desired.is_empty() && desired != voters {
            tracing::info!(
                from = ?voters.iter().map(|v| fmt_node_id(*v)).collect::<Vec<_>>(),
                to = ?desired.iter().map(|v| fmt_node_id(*v)).collect::<Vec<_>>(),
                "changing voters"
            );
            let target = desired
                .iter()
                .map(|v| fmt_node_id(*v))
                .collect::<Vec<_>>()
                .join(",");
            self.raft
                .change_membership(ChangeMembers::ReplaceAllVoters(desired), true)
                .await
                .map_err(map_write_err)?;
            self.audit_membership("raft.voters", &target).await;
            return Ok(());
        }

        // 3. Members that left are removed once they no longer vote.
        let gone: BTreeSet<NodeId> = in_raft
            .iter()
            .filter(|id| !voters.contains(id) && !active.contains(id))
            .copied()
            .collect();
        if !gone.is_empty() {
            tracing::info!(nodes = ?gone.iter().map(|v| fmt_node_id(*v)).collect::<Vec<_>>(), "removing members that left");
            let target = gone
                .iter()
                .map(|v| fmt_node_id(*v))
                .collect::<Vec<_>>()
                .join(",");
            self.raft
                .change_membership(ChangeMembers::RemoveNodes(gone), true)
                .await
                .map_err(map_write_err)?;
            self.audit_membership("raft.remove", &target).await;
        }
        Ok(())
    }

    /// Records a Raft membership change the leader made. Membership entries are openraft's
    /// own, so the record follows in a separate entry; if it cannot be written now it is
    /// queued.
    async fn audit_membership(&self, action: &str, target: &str) {
        let me = &self.identity.peer_id;
        let entry = audit::entry_now(me, &format!("leader:{me}"), action, target, "");
        let cmd = Command::Audit(vec![entry.clone()]);
        if self.raft.client_write(cmd).await.is_err() {
            self.audit_later(entry);
        }
    }
}

/// A join token that passed the leader's checks.
struct CheckedToken {
    /// What the state machine needs to consume it.
    token_use: crate::types::TokenUse,
    /// The member that issued it.
    issuer: NodeId,
    /// How the audit log names it.
    label: String,
}

/// How the audit log names a join token: the start of its nonce, not enough to use it.
fn token_label(nonce: &[u8]) -> String {
    let head: String = nonce.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("token:{head}")
}

fn hex_id(bytes: [u8; 16]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn reconcile_loop(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut leader_since: Option<Instant> = None;
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { break };
        let state = inner.raft.metrics().borrow().state;
        match state {
            ServerState::Shutdown => break,
            ServerState::Leader => {
                let since = *leader_since.get_or_insert_with(Instant::now);
                let pass = tokio::time::timeout(CLIENT_TIMEOUT, inner.reconcile(since)).await;
                match pass {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "membership pass"),
                    Err(_) => tracing::warn!("membership change did not commit in time"),
                }
            }
            _ => leader_since = None,
        }
    }
}
