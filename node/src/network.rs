//! The swarm task: the one owner of the libp2p `Swarm`.
//!
//! Everything else talks to it through a cloneable [`NetworkHandle`], which sends a
//! [`Command`] over a bounded channel with a `oneshot` for the reply. The task
//! reports what happens on the mesh as [`NodeEvent`]s on a broadcast channel, and
//! hands inbound blob requests to the blob server over a bounded channel.

use crate::{
    metrics::Metrics,
    peers::{now_ms, PeerRecord, PeerStatus, PeerStore, MAX_KNOWN_PEERS},
};
use agentmesh_protocols::{
    blob::{BlobHash, BlobRequest, BlobResponse, ResponseBody},
    identity::NodeSigner,
    topic_score_params, Envelope, Kind, MeshBehaviour, MeshBehaviourEvent, MeshConfig,
    IDENTIFY_PROTOCOL_VERSION, MAX_ENVELOPE_SIZE, NON_MEMBER_SCORE,
};
use futures::StreamExt;
use libp2p::{
    core::ConnectedPoint,
    gossipsub, identify, kad,
    multiaddr::Protocol,
    noise, ping, request_response,
    swarm::{
        dial_opts::{DialOpts, PeerCondition},
        ConnectionId, DialError, SwarmEvent,
    },
    tcp, yamux, Multiaddr, PeerId, Swarm,
};
use serde::Serialize;
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

/// Depth of the command queue; callers wait (back-pressure) when it is full.
pub const COMMAND_QUEUE: usize = 1024;
/// Depth of the queue of inbound blob requests; when full, requests are refused
/// with a "busy" error rather than queued without bound.
pub const INBOUND_BLOB_QUEUE: usize = 256;
/// Longest topic name accepted.
pub const MAX_TOPIC_LEN: usize = 256;
/// First redial delay for a known peer; doubles per failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// Longest redial delay.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// How often the peer manager looks for peers to redial.
const PEER_TICK: Duration = Duration::from_millis(500);
/// How long a node in a cluster keeps a connection from a peer that is not a member: time
/// for the join handshake (and for a joining node's admission to reach this node's log).
/// Nothing but identify, ping, Kademlia and the handshake is served to it meanwhile.
const STRANGER_GRACE: Duration = Duration::from_secs(30);

/// Failures reported to callers of the handle.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetworkError {
    /// The swarm task has stopped (node shutting down).
    #[error("the network task has stopped")]
    Stopped,
    /// Topic name refused.
    #[error("invalid topic {0:?}: topics are 1-{MAX_TOPIC_LEN} printable characters")]
    InvalidTopic(String),
    /// Message too large for gossip.
    #[error("message of {size} bytes exceeds the gossip limit of {limit} bytes")]
    TooLarge {
        /// Payload size.
        size: usize,
        /// Limit.
        limit: usize,
    },
    /// No peer subscribes to the topic yet.
    #[error("no connected peer is subscribed to topic {0:?} yet")]
    NoSubscribers(String),
    /// The same content was published moments ago.
    #[error("an identical message was already published")]
    Duplicate,
    /// Other publish failure.
    #[error("publish failed: {0}")]
    Publish(String),
    /// The peer could not be dialled at all (nothing was delivered).
    #[error("cannot reach {peer}: {reason}")]
    Unreachable {
        /// Peer dialled.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// A blob request failed.
    #[error("blob request to {peer} failed: {reason}")]
    Request {
        /// Peer asked.
        peer: PeerId,
        /// What went wrong.
        reason: String,
    },
}

/// What the mesh tells the rest of the node (and `/v1/events` subscribers).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NodeEvent {
    /// First connection to a peer opened.
    PeerUp {
        /// The peer.
        peer_id: String,
    },
    /// Last connection to a peer closed.
    PeerDown {
        /// The peer.
        peer_id: String,
    },
    /// The Raft leader changed (or became unknown).
    LeaderChanged {
        /// The new leader's node id (hex), if one is known.
        leader: Option<String>,
        /// Its peer id.
        leader_peer_id: Option<String>,
    },
    /// A training job changed (a round ended, or the job's state).
    Job {
        /// The job, as `GET /v1/jobs` shows it.
        job: serde_json::Value,
    },
    /// A valid gossip message arrived on a subscribed topic.
    Gossip {
        /// Topic.
        topic: String,
        /// Publisher's peer id.
        from: String,
        /// Content-hash id (hex).
        message_id: String,
        /// The payload.
        #[serde(skip)]
        data: Vec<u8>,
    },
}

/// A blob request from a peer, waiting for the blob server's answer.
pub struct InboundBlobRequest {
    /// Who asks.
    pub peer: PeerId,
    /// What they ask.
    pub request: BlobRequest,
    /// Where the answer goes.
    pub channel: request_response::ResponseChannel<BlobResponse>,
}

/// This node's view of itself.
#[derive(Debug, Clone, Serialize)]
pub struct NetworkStatus {
    /// Own peer id.
    pub peer_id: String,
    /// Addresses we listen on.
    pub listen_addrs: Vec<String>,
    /// Peers with an open connection.
    pub connected_peers: usize,
}

/// One known peer, as `/v1/peers` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct PeerInfo {
    /// Peer id.
    pub peer_id: String,
    /// Name it announced.
    pub name: String,
    /// Addresses we know.
    pub addrs: Vec<String>,
    /// Connected or not.
    pub status: PeerStatus,
    /// Last time it was connected, ms since the Unix epoch (now, if connected).
    pub last_seen: u64,
    /// Latest ping round trip.
    pub rtt_ms: Option<f64>,
}

/// Subscribers of one topic, as `/v1/topics/{t}` shows them.
#[derive(Debug, Clone, Serialize)]
pub struct TopicInfo {
    /// Topic.
    pub topic: String,
    /// Whether this node subscribes.
    pub subscribed: bool,
    /// Connected peers subscribed to it.
    pub peers: Vec<String>,
    /// Peers in our gossip mesh for it.
    pub mesh_peers: Vec<String>,
}

type Reply<T> = oneshot::Sender<T>;

/// Raft calls that may wait for a dial to one peer, at most; past it a call fails at once.
const MAX_WAITING_RAFT: usize = 256;

/// A Raft call waiting for a connection to its peer; its frame is sent only if the caller
/// still waits when the connection is up.
type WaitingRaft = Reply<Result<(), NetworkError>>;

/// Requests to the swarm task.
pub enum Command {
    /// Publish a payload on a topic.
    Publish(String, Vec<u8>, Reply<Result<String, NetworkError>>),
    /// Subscribe (reference-counted).
    Subscribe(String, Reply<Result<(), NetworkError>>),
    /// Drop one subscription reference.
    Unsubscribe(String),
    /// Who subscribes to a topic.
    Topic(String, Reply<TopicInfo>),
    /// Find providers of a blob.
    GetProviders(BlobHash, Reply<Vec<PeerId>>),
    /// Announce that we provide a blob.
    StartProviding(BlobHash),
    /// Send a blob request.
    BlobRequest(
        PeerId,
        BlobRequest,
        Reply<Result<BlobResponse, NetworkError>>,
    ),
    /// Answer an inbound blob request.
    BlobRespond(
        request_response::ResponseChannel<BlobResponse>,
        BlobResponse,
    ),
    /// Connect to a member for Raft, dialling `Vec<Multiaddr>` if not connected.
    RaftConnect(PeerId, Vec<Multiaddr>, Reply<Result<(), NetworkError>>),
    /// Own status.
    Status(Reply<NetworkStatus>),
    /// Every known peer.
    Peers(Reply<Vec<PeerInfo>>),
    /// The members of this node's cluster (`None`: not in a cluster, serve everyone).
    SetMembers(Option<HashSet<PeerId>>),
}

/// Cloneable handle to the swarm task.
#[derive(Clone)]
pub struct NetworkHandle {
    tx: mpsc::Sender<Command>,
    local_peer_id: PeerId,
    streams: libp2p_stream::Control,
}

impl NetworkHandle {
    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, NetworkError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| NetworkError::Stopped)?;
        rx.await.map_err(|_| NetworkError::Stopped)
    }

    /// Our own peer id.
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }
    /// Publishes `data` on `topic`; returns the message id (hex).
    pub async fn publish(&self, topic: String, data: Vec<u8>) -> Result<String, NetworkError> {
        self.call(|r| Command::Publish(topic, data, r)).await?
    }
    /// Subscribes to `topic` (pair with [`Self::unsubscribe`]).
    pub async fn subscribe(&self, topic: String) -> Result<(), NetworkError> {
        self.call(|r| Command::Subscribe(topic, r)).await?
    }
    /// Drops one subscription to `topic`.
    pub async fn unsubscribe(&self, topic: String) {
        let _ = self.tx.send(Command::Unsubscribe(topic)).await;
    }
    /// Subscribers of `topic`.
    pub async fn topic(&self, topic: String) -> Result<TopicInfo, NetworkError> {
        self.call(|r| Command::Topic(topic, r)).await
    }
    /// Providers of `hash` found through Kademlia (never ourselves).
    pub async fn get_providers(&self, hash: BlobHash) -> Result<Vec<PeerId>, NetworkError> {
        self.call(|r| Command::GetProviders(hash, r)).await
    }
    /// Announces that this node provides `hash`.
    pub async fn start_providing(&self, hash: BlobHash) -> Result<(), NetworkError> {
        self.tx
            .send(Command::StartProviding(hash))
            .await
            .map_err(|_| NetworkError::Stopped)
    }
    /// Sends a blob request to `peer`.
    pub async fn blob_request(
        &self,
        peer: PeerId,
        request: BlobRequest,
    ) -> Result<BlobResponse, NetworkError> {
        self.call(|r| Command::BlobRequest(peer, request, r))
            .await?
    }
    /// Answers an inbound blob request.
    pub async fn blob_respond(
        &self,
        channel: request_response::ResponseChannel<BlobResponse>,
        response: BlobResponse,
    ) {
        let _ = self.tx.send(Command::BlobRespond(channel, response)).await;
    }
    /// Returns once this node is connected to `peer`, dialling `addrs` if needed. Raft
    /// messages then go on streams of their own (`raft/streams.rs`).
    pub async fn raft_connect(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
    ) -> Result<(), NetworkError> {
        self.call(|r| Command::RaftConnect(peer, addrs, r)).await?
    }
    /// Opens and accepts streams of protocols the node drives itself (Raft), bypassing this
    /// task once a connection is up.
    pub fn stream_control(&self) -> libp2p_stream::Control {
        self.streams.clone()
    }
    /// Own status.
    pub async fn status(&self) -> Result<NetworkStatus, NetworkError> {
        self.call(Command::Status).await
    }
    /// Every known peer.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, NetworkError> {
        self.call(Command::Peers).await
    }
    /// Serve gossip and blobs to these members only (`None`: to everyone). Connected
    /// non-members, a removed member among them, are refused both at once and disconnected
    /// after [`STRANGER_GRACE`].
    pub async fn set_members(&self, members: Option<HashSet<PeerId>>) {
        let _ = self.tx.send(Command::SetMembers(members)).await;
    }
}

/// What the node passes to [`spawn`].
pub struct NetworkParams {
    /// Identity.
    pub keypair: libp2p::identity::Keypair,
    /// Node name, announced in identify.
    pub name: String,
    /// Listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Addresses to dial until reached.
    pub bootstrap: Vec<Multiaddr>,
    /// Persisted peers.
    pub peers: PeerStore,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Event fan-out.
    pub events: broadcast::Sender<NodeEvent>,
    /// Where inbound blob requests go.
    pub inbound_blobs: mpsc::Sender<InboundBlobRequest>,
}

/// Readiness facts the node's `/readyz` uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Readiness {
    /// Every listener has reported an address.
    pub listening: bool,
    /// Addresses, once listening.
    pub listen_addrs: Vec<Multiaddr>,
    /// Connected peers.
    pub connected_peers: usize,
}

/// Startup failures.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The transport or behaviour could not be built.
    #[error("building the libp2p swarm: {0}")]
    Build(String),
    /// A listen address was refused.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// Address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
}

/// Name announced in identify's agent version: `agentmesh/VERSION name=NAME`.
pub fn agent_version(name: &str) -> String {
    format!("agentmesh/{} name={name}", env!("CARGO_PKG_VERSION"))
}

fn name_from_agent_version(agent: &str) -> String {
    agent
        .split_whitespace()
        .find_map(|w| w.strip_prefix("name="))
        .unwrap_or(agent)
        .chars()
        .take(crate::config::MAX_NAME_LEN)
        .collect()
}

/// Builds the swarm, starts listening and spawns the task. Returns the handle,
/// a readiness watch, and the task's join handle (it ends when every handle and
/// the shutdown sender are dropped or `shutdown` fires).
pub fn spawn(
    params: NetworkParams,
    shutdown: watch::Receiver<bool>,
) -> Result<
    (
        NetworkHandle,
        watch::Receiver<Readiness>,
        tokio::task::JoinHandle<()>,
    ),
    StartError,
> {
    let mesh_cfg = MeshConfig::default().with_agent_version(agent_version(&params.name));
    let local_peer_id = params.keypair.public().to_peer_id();
    let signer =
        NodeSigner::from_keypair(&params.keypair).map_err(|e| StartError::Build(e.to_string()))?;
    let behaviour = MeshBehaviour::new(&params.keypair, &mesh_cfg)
        .map_err(|e| StartError::Build(e.to_string()))?;
    let mut swarm = libp2p::SwarmBuilder::with_existing_identity(params.keypair.clone())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| StartError::Build(e.to_string()))?
        .with_quic()
        .with_dns()
        .map_err(|e| StartError::Build(e.to_string()))?
        .with_behaviour(|_| behaviour)
        .map_err(|e| StartError::Build(e.to_string()))?
        // Members of a cluster stay connected: gossip, blob fetches and (later)
        // Raft all need the connection, and the peer manager would only redial a
        // connection closed for idleness. Dead peers are found by ping instead.
        .with_swarm_config(|c| {
            c.with_idle_connection_timeout(Duration::from_secs(24 * 3600))
                // Propose the protocol and send the request in the same flight instead
                // of waiting for the listener to confirm it: saves a round trip on every
                // Raft RPC and blob request (each opens a stream).
                .with_substream_upgrade_protocol_override(libp2p::core::upgrade::Version::V1Lazy)
        })
        .build();

    let mut listeners = HashSet::new();
    for addr in &params.listen {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| StartError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            })?;
        listeners.insert(id);
    }

    let known = params
        .peers
        .all()
        .map_err(|e| StartError::Build(format!("reading the peer store: {e}")))?
        .into_iter()
        .map(|(peer, rec)| (peer, parse_addrs(&rec.addrs)))
        .collect();
    let streams = swarm.behaviour().streams.new_control();
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (ready_tx, ready_rx) = watch::channel(Readiness::default());
    let mut task = Task {
        swarm,
        signer,
        commands: rx,
        shutdown,
        peers: params.peers,
        metrics: params.metrics,
        events: params.events,
        inbound_blobs: params.inbound_blobs,
        bootstrap: params
            .bootstrap
            .into_iter()
            .map(|a| (a, Backoff::new()))
            .collect(),
        bootstrap_dials: HashMap::new(),
        pending_listeners: listeners,
        listen_addrs: Vec::new(),
        ready: ready_tx,
        live: HashMap::new(),
        known,
        backoff: HashMap::new(),
        subscriptions: HashMap::new(),
        pending_providers: HashMap::new(),
        pending_blob: HashMap::new(),
        waiting_raft: HashMap::new(),
        kad_bootstrapped: false,
        members: None,
        strangers: HashMap::new(),
    };
    let join = tokio::spawn(async move { task.run().await });
    Ok((
        NetworkHandle {
            tx,
            local_peer_id,
            streams,
        },
        ready_rx,
        join,
    ))
}

/// Exponential redial backoff of one peer or bootstrap address.
#[derive(Debug, Clone)]
struct Backoff {
    next: Instant,
    delay: Duration,
    dialing: bool,
}

impl Backoff {
    fn new() -> Self {
        Self {
            next: Instant::now(),
            delay: MIN_BACKOFF,
            dialing: false,
        }
    }
    fn due(&self, now: Instant) -> bool {
        !self.dialing && now >= self.next
    }
    fn failed(&mut self, now: Instant) {
        self.dialing = false;
        self.next = now + self.delay;
        self.delay = (self.delay * 2).min(MAX_BACKOFF);
    }
    fn reset(&mut self) {
        *self = Self::new();
    }
}

/// A provider lookup in flight.
struct ProviderQuery {
    found: HashSet<PeerId>,
    first_found: Option<Instant>,
    reply: Reply<Vec<PeerId>>,
}

/// How long a provider lookup keeps collecting after its first provider: long
/// enough for the other replies of that round, far shorter than a full query
/// that waits out dead routing-table entries.
const PROVIDER_GRACE: Duration = Duration::from_millis(300);

#[derive(Debug, Default)]
struct LivePeer {
    connections: usize,
    rtt: Option<Duration>,
}

struct Task {
    swarm: Swarm<MeshBehaviour>,
    /// Signs the envelopes this node publishes.
    signer: NodeSigner,
    commands: mpsc::Receiver<Command>,
    shutdown: watch::Receiver<bool>,
    peers: PeerStore,
    metrics: Arc<Metrics>,
    events: broadcast::Sender<NodeEvent>,
    inbound_blobs: mpsc::Sender<InboundBlobRequest>,
    bootstrap: Vec<(Multiaddr, Backoff)>,
    bootstrap_dials: HashMap<ConnectionId, usize>,
    pending_listeners: HashSet<libp2p::core::transport::ListenerId>,
    listen_addrs: Vec<Multiaddr>,
    ready: watch::Sender<Readiness>,
    live: HashMap<PeerId, LivePeer>,
    /// Dial addresses of every stored peer: the store's content kept in memory,
    /// so the peer manager's tick does not re-read sled. Every store write goes
    /// through [`Task::record`] or [`Task::forget`], which keep the two in step.
    known: HashMap<PeerId, Vec<Multiaddr>>,
    backoff: HashMap<PeerId, Backoff>,
    subscriptions: HashMap<String, usize>,
    pending_providers: HashMap<kad::QueryId, ProviderQuery>,
    pending_blob:
        HashMap<request_response::OutboundRequestId, Reply<Result<BlobResponse, NetworkError>>>,
    /// Raft calls to peers being dialled, answered once the connection is up unless their
    /// caller has given up by then (see [`Task::raft_connect`]).
    waiting_raft: HashMap<PeerId, Vec<WaitingRaft>>,
    kad_bootstrapped: bool,
    /// The cluster's members, when this node is in one: the only peers served gossip, blobs
    /// and Raft (see [`Task::is_member`]).
    members: Option<HashSet<PeerId>>,
    /// Connected peers that are not members, and since when.
    strangers: HashMap<PeerId, Instant>,
}

fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= MAX_TOPIC_LEN && !topic.chars().any(char::is_control)
}

/// Listen addresses worth telling others about (not 0.0.0.0, not memory).
fn dialable(addr: &Multiaddr) -> bool {
    !addr.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_unspecified(),
        Protocol::Ip6(ip) => ip.is_unspecified(),
        _ => false,
    })
}

impl Task {
    async fn run(&mut self) {
        let mut tick = tokio::time::interval(PEER_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut provider_tick = tokio::time::interval(PROVIDER_GRACE / 3);
        provider_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                _ = tick.tick() => self.redial(),
                _ = provider_tick.tick() => self.finish_provider_queries(),
                _ = self.shutdown.changed() => break,
            }
        }
        tracing::debug!("network task stopped");
    }

    fn publish_readiness(&self) {
        self.ready.send_replace(Readiness {
            listening: self.pending_listeners.is_empty(),
            listen_addrs: self.listen_addrs.clone(),
            connected_peers: self.live.len(),
        });
    }

    /// Changes a stored peer record (creating it if needed) and the in-memory
    /// dial list with it.
    fn record(&mut self, peer: &PeerId, f: impl FnOnce(&mut PeerRecord)) {
        match self.peers.update(peer, f) {
            Ok(rec) => {
                self.known.insert(*peer, parse_addrs(&rec.addrs));
            }
            Err(e) => tracing::warn!(%peer, %e, "cannot update the peer store"),
        }
    }

    /// Forgets a stored peer.
    fn forget(&mut self, peer: &PeerId) {
        if self.known.remove(peer).is_some() {
            if let Err(e) = self.peers.remove(peer) {
                tracing::warn!(%peer, %e, "cannot update the peer store");
            }
        }
    }

    /// Answers provider lookups that have found someone and had their grace
    /// period, and stops their queries.
    fn finish_provider_queries(&mut self) {
        let now = Instant::now();
        let ready: Vec<kad::QueryId> = self
            .pending_providers
            .iter()
            .filter(|(_, q)| q.first_found.is_some_and(|t| now >= t + PROVIDER_GRACE))
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            if let Some(q) = self.pending_providers.remove(&id) {
                let _ = q.reply.send(q.found.into_iter().collect());
            }
            if let Some(mut query) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                query.finish();
            }
        }
    }

    /// Redials known peers and bootstrap addresses whose backoff has expired, and closes
    /// connections of non-members past their grace.
    fn redial(&mut self) {
        let now = Instant::now();
        let overstayed: Vec<PeerId> = self
            .strangers
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= STRANGER_GRACE)
            .map(|(p, _)| *p)
            .collect();
        for peer in overstayed {
            tracing::info!(%peer, "closing the connection of a peer that is not a member");
            self.strangers.remove(&peer);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
        for (i, (addr, backoff)) in self.bootstrap.iter_mut().enumerate() {
            let connected_to_it = addr.iter().any(|p| match p {
                Protocol::P2p(peer) => self.live.contains_key(&peer),
                _ => false,
            });
            if connected_to_it || !backoff.due(now) {
                continue;
            }
            // A bootstrap address is dialled until its peer is connected (known
            // from /p2p) or, without /p2p, until any peer is.
            let has_peer_id = addr.iter().any(|p| matches!(p, Protocol::P2p(_)));
            if !has_peer_id && !self.live.is_empty() {
                continue;
            }
            backoff.dialing = true;
            let opts = DialOpts::unknown_peer_id().address(addr.clone()).build();
            let id = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => {
                    self.bootstrap_dials.insert(id, i);
                }
                Err(e) => {
                    tracing::debug!(%addr, %e, "bootstrap dial refused");
                    backoff.failed(now);
                }
            }
        }
        self.metrics.known_peers.set(self.known.len() as i64);
        for (peer, addrs) in &self.known {
            let peer = *peer;
            if peer == *self.swarm.local_peer_id()
                || self.live.contains_key(&peer)
                || addrs.is_empty()
                || !self.is_member(&peer)
            {
                continue;
            }
            let backoff = self.backoff.entry(peer).or_insert_with(Backoff::new);
            if !backoff.due(now) {
                continue;
            }
            let addrs = addrs.clone();
            backoff.dialing = true;
            let opts = DialOpts::peer_id(peer)
                .addresses(addrs)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                if !matches!(e, DialError::DialPeerConditionFalse(_)) {
                    tracing::debug!(%peer, %e, "redial refused");
                }
                backoff.failed(now);
            }
        }
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Publish(topic, data, reply) => {
                let _ = reply.send(self.publish(topic, data));
            }
            Command::SetMembers(members) => self.set_members(members),
            Command::Subscribe(topic, reply) => {
                if !valid_topic(&topic) {
                    let _ = reply.send(Err(NetworkError::InvalidTopic(topic)));
                    return;
                }
                if let Some(count) = self.subscriptions.get_mut(&topic) {
                    *count += 1;
                    let _ = reply.send(Ok(()));
                    return;
                }
                let ident = gossipsub::IdentTopic::new(topic.clone());
                let gossip = &mut self.swarm.behaviour_mut().gossipsub;
                if let Err(e) = gossip.set_topic_params(ident.clone(), topic_score_params()) {
                    tracing::warn!(%e, "cannot set the topic's scoring");
                }
                let result = gossip
                    .subscribe(&ident)
                    .map(|_| ())
                    .map_err(|e| NetworkError::Publish(e.to_string()));
                // Counted only once the subscription really exists.
                if result.is_ok() {
                    self.subscriptions.insert(topic, 1);
                }
                let _ = reply.send(result);
            }
            Command::Unsubscribe(topic) => {
                if let Some(count) = self.subscriptions.get_mut(&topic) {
                    *count = count.saturating_sub(1);
                    if *count == 0 {
                        self.subscriptions.remove(&topic);
                        self.swarm
                            .behaviour_mut()
                            .gossipsub
                            .unsubscribe(&gossipsub::IdentTopic::new(topic));
                    }
                }
            }
            Command::Topic(topic, reply) => {
                let hash = gossipsub::IdentTopic::new(topic.clone()).hash();
                let g = &self.swarm.behaviour().gossipsub;
                let peers = g
                    .all_peers()
                    .filter(|(_, topics)| topics.contains(&&hash))
                    .map(|(p, _)| p.to_string())
                    .collect();
                let mesh_peers = g.mesh_peers(&hash).map(|p| p.to_string()).collect();
                let _ = reply.send(TopicInfo {
                    subscribed: self.subscriptions.contains_key(&topic),
                    topic,
                    peers,
                    mesh_peers,
                });
            }
            Command::GetProviders(hash, reply) => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(hash.provider_key());
                self.pending_providers.insert(
                    id,
                    ProviderQuery {
                        found: HashSet::new(),
                        first_found: None,
                        reply,
                    },
                );
            }
            Command::StartProviding(hash) => {
                if let Err(e) = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .start_providing(hash.provider_key())
                {
                    tracing::warn!(%hash, %e, "cannot announce blob");
                }
            }
            Command::BlobRequest(peer, request, reply) => {
                let id = self.swarm.behaviour_mut().blob.send_request(&peer, request);
                self.pending_blob.insert(id, reply);
            }
            Command::RaftConnect(peer, addrs, reply) => self.raft_connect(peer, addrs, reply),
            Command::BlobRespond(channel, response) => {
                if let ResponseBody::Chunk { data, .. } = &response.body {
                    self.metrics.blob_bytes_served.inc_by(data.len() as u64);
                }
                // Fails only if the requester has gone away; nothing to do then.
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .blob
                    .send_response(channel, response);
            }
            Command::Status(reply) => {
                let _ = reply.send(NetworkStatus {
                    peer_id: self.swarm.local_peer_id().to_string(),
                    listen_addrs: self.listen_addrs.iter().map(|a| a.to_string()).collect(),
                    connected_peers: self.live.len(),
                });
            }
            Command::Peers(reply) => {
                let mut out: Vec<PeerInfo> = match self.peers.all() {
                    Ok(all) => all
                        .into_iter()
                        .filter(|(p, _)| p != self.swarm.local_peer_id())
                        .map(|(peer, rec)| {
                            let live = self.live.get(&peer);
                            PeerInfo {
                                peer_id: peer.to_string(),
                                name: rec.name,
                                addrs: rec.addrs,
                                status: if live.is_some() {
                                    PeerStatus::Active
                                } else {
                                    PeerStatus::Inactive
                                },
                                last_seen: if live.is_some() {
                                    now_ms()
                                } else {
                                    rec.last_seen_ms
                                },
                                rtt_ms: live
                                    .and_then(|l| l.rtt)
                                    .map(|d| (d.as_secs_f64() * 1e6).round() / 1e3),
                            }
                        })
                        .collect(),
                    Err(e) => {
                        tracing::warn!(%e, "cannot read the peer store");
                        Vec::new()
                    }
                };
                out.sort_by(|a, b| a.name.cmp(&b.name).then(a.peer_id.cmp(&b.peer_id)));
                let _ = reply.send(out);
            }
        }
    }

    fn publish(&mut self, topic: String, data: Vec<u8>) -> Result<String, NetworkError> {
        if !valid_topic(&topic) {
            return Err(NetworkError::InvalidTopic(topic));
        }
        let size = data.len();
        let env = Envelope::publish(&self.signer, topic.clone(), now_ms(), data);
        let bytes = env.encode().map_err(|_| NetworkError::TooLarge {
            size,
            limit: MAX_ENVELOPE_SIZE,
        })?;
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(gossipsub::IdentTopic::new(topic.clone()), bytes)
        {
            Ok(_) => {
                self.metrics.gossip_published.inc();
                Ok(env.id().to_string())
            }
            Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {
                Err(NetworkError::NoSubscribers(topic))
            }
            Err(gossipsub::PublishError::Duplicate) => Err(NetworkError::Duplicate),
            Err(gossipsub::PublishError::MessageTooLarge) => Err(NetworkError::TooLarge {
                size,
                limit: MAX_ENVELOPE_SIZE,
            }),
            Err(e) => Err(NetworkError::Publish(e.to_string())),
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<MeshBehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                tracing::info!(%address, "listening");
                self.listen_addrs.push(address);
                self.pending_listeners.remove(&listener_id);
                self.publish_readiness();
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
                self.publish_readiness();
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                ..
            } => {
                tracing::warn!(?listener_id, ?reason, "listener closed");
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                self.on_connected(peer_id, connection_id, endpoint, num_established.get());
                self.flush_waiting_raft(peer_id);
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                if num_established == 0 {
                    tracing::info!(%peer_id, ?cause, "peer down");
                    self.live.remove(&peer_id);
                    self.strangers.remove(&peer_id);
                    self.backoff
                        .entry(peer_id)
                        .or_insert_with(Backoff::new)
                        .failed(Instant::now());
                    self.record(&peer_id, |r| {
                        r.status = PeerStatus::Inactive;
                        r.last_seen_ms = now_ms();
                    });
                    self.metrics.connected_peers.set(self.live.len() as i64);
                    let _ = self.events.send(NodeEvent::PeerDown {
                        peer_id: peer_id.to_string(),
                    });
                    self.publish_readiness();
                } else if let Some(l) = self.live.get_mut(&peer_id) {
                    l.connections = num_established as usize;
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                let now = Instant::now();
                if let Some(peer) = peer_id {
                    // A bootstrap dial (to an address, not a peer) does not stand in for
                    // the dial a waiting frame started; that one ends with its own event.
                    if !self.swarm.is_connected(&peer)
                        && !self.bootstrap_dials.contains_key(&connection_id)
                    {
                        self.fail_waiting_raft(peer, &error.to_string());
                    }
                    if !self.live.contains_key(&peer) {
                        if let Some(b) = self.backoff.get_mut(&peer) {
                            b.failed(now);
                        }
                    }
                }
                if let Some(i) = self.bootstrap_dials.remove(&connection_id) {
                    if let Some((addr, b)) = self.bootstrap.get_mut(i) {
                        tracing::info!(%addr, %error, "bootstrap peer unreachable; will retry");
                        b.failed(now);
                    }
                }
                tracing::debug!(?peer_id, %error, "outgoing connection failed");
            }
            SwarmEvent::IncomingConnectionError { error, .. } => {
                tracing::debug!(%error, "incoming connection failed");
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev),
            _ => {}
        }
    }

    fn on_connected(
        &mut self,
        peer: PeerId,
        connection_id: ConnectionId,
        endpoint: ConnectedPoint,
        num_established: u32,
    ) {
        self.backoff
            .entry(peer)
            .or_insert_with(Backoff::new)
            .reset();
        if let Some(i) = self.bootstrap_dials.remove(&connection_id) {
            if let Some((_, b)) = self.bootstrap.get_mut(i) {
                b.reset();
            }
        }
        let entry = self.live.entry(peer).or_default();
        entry.connections = num_established as usize;
        if num_established == 1 {
            // Judged on every first connection: gossipsub keeps a disconnected peer's score
            // for a while, and a stranger then may have become a member.
            self.judge(peer, Instant::now());
            tracing::info!(%peer, addr = %endpoint.get_remote_address(), "peer up");
            // A peer enters the store only once we know how to reach it: we dialled
            // it, or identify or Kademlia gave us its listen addresses. A one-off
            // inbound client is never redialled.
            let dialed = endpoint
                .is_dialer()
                .then(|| endpoint.get_remote_address().clone());
            let known = self.known.contains_key(&peer);
            if known || dialed.is_some() {
                self.record(&peer, |r| {
                    r.status = PeerStatus::Active;
                    r.last_seen_ms = now_ms();
                    if let Some(a) = dialed {
                        PeerStore::merge_addrs(r, [strip_p2p(a)]);
                    }
                });
            }
            self.metrics.connected_peers.set(self.live.len() as i64);
            let _ = self.events.send(NodeEvent::PeerUp {
                peer_id: peer.to_string(),
            });
            self.publish_readiness();
        }
        if !self.kad_bootstrapped {
            // Our first connection: walk the DHT towards our own id, which finds
            // the rest of the mesh (and tells it about us).
            self.kad_bootstrapped = self.swarm.behaviour_mut().kad.bootstrap().is_ok();
        }
    }

    fn on_behaviour_event(&mut self, event: MeshBehaviourEvent) {
        match event {
            MeshBehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                self.on_identified(peer_id, info)
            }
            MeshBehaviourEvent::Ping(ping::Event {
                peer,
                connection,
                result,
            }) => match result {
                Ok(rtt) => {
                    if let Some(l) = self.live.get_mut(&peer) {
                        l.rtt = Some(rtt);
                    }
                }
                // A peer that does not speak ping (another libp2p implementation
                // may not) is not dead; we just cannot probe it this way.
                Err(ping::Failure::Unsupported) => {}
                Err(e) => {
                    // Ping is our liveness probe: a connection that cannot carry a
                    // ping is dead even if the socket has not noticed yet.
                    tracing::info!(%peer, %e, "ping failed; closing the connection");
                    self.swarm.close_connection(connection);
                }
            },
            MeshBehaviourEvent::Kad(ev) => self.on_kad_event(ev),
            MeshBehaviourEvent::Gossipsub(ev) => self.on_gossip_event(ev),
            MeshBehaviourEvent::Blob(ev) => self.on_blob_event(ev),
            MeshBehaviourEvent::Streams(()) => {}
            _ => {}
        }
    }

    fn on_identified(&mut self, peer: PeerId, info: identify::Info) {
        let is_agentmesh = info.protocol_version == IDENTIFY_PROTOCOL_VERSION;
        let addrs: Vec<Multiaddr> = info
            .listen_addrs
            .into_iter()
            .filter(dialable)
            .map(strip_p2p)
            .collect();
        // Identify feeds Kademlia: the peer's own listen addresses, not the
        // ephemeral port it happened to dial us from.
        if info.protocols.contains(&kad::PROTOCOL_NAME) {
            for a in &addrs {
                self.swarm.behaviour_mut().kad.add_address(&peer, a.clone());
            }
        }
        // The peer store is the list of mesh members to keep connected: other
        // libp2p peers may still route and gossip with us, but are not
        // remembered or redialled.
        if !is_agentmesh || addrs.is_empty() {
            self.forget(&peer);
            return;
        }
        let name = name_from_agent_version(&info.agent_version);
        self.record(&peer, |r| {
            r.name = name;
            r.status = PeerStatus::Active;
            r.last_seen_ms = now_ms();
            PeerStore::merge_addrs(r, addrs);
        });
        // New addresses are what a restarted node needs to find this peer again;
        // get them to disk now rather than at sled's next periodic flush.
        self.peers.flush_in_background();
    }

    fn on_kad_event(&mut self, event: kad::Event) {
        match event {
            // A peer found through the DHT joins the peer store, so the peer
            // manager connects to it and keeps it connected.
            kad::Event::RoutingUpdated {
                peer, addresses, ..
            } if peer != *self.swarm.local_peer_id()
                && (self.known.len() < MAX_KNOWN_PEERS || self.known.contains_key(&peer)) =>
            {
                let active = self.live.contains_key(&peer);
                self.record(&peer, |r| {
                    if active {
                        r.status = PeerStatus::Active;
                    }
                    PeerStore::merge_addrs(r, addresses.iter().cloned().map(strip_p2p));
                });
            }
            kad::Event::OutboundQueryProgressed {
                id,
                result: kad::QueryResult::GetProviders(res),
                step,
                ..
            } => {
                let local = *self.swarm.local_peer_id();
                if let (Some(q), Ok(kad::GetProvidersOk::FoundProviders { providers, .. })) =
                    (self.pending_providers.get_mut(&id), res)
                {
                    q.found
                        .extend(providers.into_iter().filter(|p| *p != local));
                    if !q.found.is_empty() && q.first_found.is_none() {
                        q.first_found = Some(Instant::now());
                    }
                }
                if step.last {
                    if let Some(q) = self.pending_providers.remove(&id) {
                        let _ = q.reply.send(q.found.into_iter().collect());
                    }
                }
            }
            _ => {}
        }
    }

    fn on_gossip_event(&mut self, event: gossipsub::Event) {
        let gossipsub::Event::Message {
            propagation_source,
            message_id,
            message,
        } = event
        else {
            return;
        };
        // Runs once per message: gossipsub drops later copies by message id (a hash of
        // the topic and the data) before they get here.
        let local = *self.swarm.local_peer_id();
        let verdict = gossip_verdict(
            &message.data,
            message.topic.as_str(),
            &propagation_source,
            &local,
            |p| self.is_member(p),
        );
        let acceptance = match verdict {
            Ok(env) => {
                self.metrics.gossip_received.inc();
                let _ = self.events.send(NodeEvent::Gossip {
                    topic: message.topic.into_string(),
                    from: env.sender().to_string(),
                    message_id: env.id().to_string(),
                    data: env.into_payload(),
                });
                gossipsub::MessageAcceptance::Accept
            }
            Err((reason, acceptance)) => {
                self.metrics.gossip_rejected.inc();
                tracing::debug!(from = %propagation_source, %reason, "rejected gossip message");
                acceptance
            }
        };
        let _ = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&message_id, &propagation_source, acceptance);
    }

    fn on_blob_event(&mut self, event: request_response::Event<BlobRequest, BlobResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    if !self.is_member(&peer) {
                        self.metrics.non_member_refusals.inc();
                        tracing::debug!(%peer, "refusing a blob request from a non-member");
                        let refused = BlobResponse::new(ResponseBody::Error {
                            message: "not a member of this node's cluster".into(),
                        });
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .blob
                            .send_response(channel, refused);
                        return;
                    }
                    let inbound = InboundBlobRequest {
                        peer,
                        request,
                        channel,
                    };
                    if let Err(mpsc::error::TrySendError::Full(r)) =
                        self.inbound_blobs.try_send(inbound)
                    {
                        self.metrics.blob_requests_shed.inc();
                        let busy = BlobResponse::new(ResponseBody::Busy);
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .blob
                            .send_response(r.channel, busy);
                    }
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.pending_blob.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                if let Some(reply) = self.pending_blob.remove(&request_id) {
                    let _ = reply.send(Err(NetworkError::Request {
                        peer,
                        reason: error.to_string(),
                    }));
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "inbound blob request failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }
}

impl Task {
    /// Whether `peer` is served gossip and blobs: a member of this node's cluster, or anyone
    /// while the node is in none.
    fn is_member(&self, peer: &PeerId) -> bool {
        self.members.as_ref().is_none_or(|m| m.contains(peer))
    }

    /// Takes a new member set. Connected peers outside it are refused gossip and blobs at
    /// once, and disconnected after [`STRANGER_GRACE`] from now: a removed member still
    /// hears of its removal from the leader meanwhile, and can present a new token.
    fn set_members(&mut self, members: Option<HashSet<PeerId>>) {
        self.members = members;
        let now = Instant::now();
        let connected: Vec<PeerId> = self.live.keys().copied().collect();
        for peer in connected {
            self.judge(peer, now);
        }
    }

    /// Gives a connected peer its gossip score by membership, and starts its grace (from
    /// `now`, unless it is already running) if it is not a member.
    fn judge(&mut self, peer: PeerId, now: Instant) {
        let member = self.is_member(&peer);
        let score = if member { 0.0 } else { NON_MEMBER_SCORE };
        self.swarm
            .behaviour_mut()
            .gossipsub
            .set_application_score(&peer, score);
        if member {
            self.strangers.remove(&peer);
        } else {
            self.strangers.entry(peer).or_insert(now);
        }
    }

    /// Connects to `peer` for a Raft call. A peer without a connection is dialled here, with
    /// the member's known addresses, and the call waits here rather than in a queue of the
    /// stream behaviour: a dial can take seconds (a QUIC handshake to a node that is down
    /// retries until it is back up), and a vote, an append or a forwarded write delivered
    /// long after its caller gave up would act on a state the caller has moved on from. So
    /// once the connection is up, only calls whose caller still waits go on to send their
    /// frame; a failed dial fails them all.
    fn raft_connect(
        &mut self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        reply: Reply<Result<(), NetworkError>>,
    ) {
        for addr in &addrs {
            self.swarm.add_peer_address(peer, addr.clone());
        }
        if self.swarm.is_connected(&peer) {
            let _ = reply.send(Ok(()));
            return;
        }
        let waiting = self.waiting_raft.entry(peer).or_default();
        let before = waiting.len();
        waiting.retain(|w| !w.is_closed());
        self.metrics
            .raft_frames_expired
            .inc_by((before - waiting.len()) as u64);
        if waiting.len() >= MAX_WAITING_RAFT {
            let _ = reply.send(Err(NetworkError::Unreachable {
                peer,
                reason: "too many requests already wait for a connection".into(),
            }));
            return;
        }
        waiting.push(reply);
        let dial = DialOpts::peer_id(peer)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .addresses(addrs)
            .extend_addresses_through_behaviour()
            .build();
        match self.swarm.dial(dial) {
            Ok(()) | Err(DialError::DialPeerConditionFalse(_)) => {}
            Err(e) => self.fail_waiting_raft(peer, &e.to_string()),
        }
    }

    /// A connection to `peer` is up: its waiting Raft calls go on, but only those whose
    /// caller still waits.
    fn flush_waiting_raft(&mut self, peer: PeerId) {
        for w in self.waiting_raft.remove(&peer).unwrap_or_default() {
            if w.is_closed() {
                self.metrics.raft_frames_expired.inc();
            } else {
                let _ = w.send(Ok(()));
            }
        }
    }

    fn fail_waiting_raft(&mut self, peer: PeerId, reason: &str) {
        for w in self.waiting_raft.remove(&peer).unwrap_or_default() {
            if w.is_closed() {
                self.metrics.raft_frames_expired.inc();
            }
            let _ = w.send(Err(NetworkError::Unreachable {
                peer,
                reason: reason.to_string(),
            }));
        }
    }
}

fn parse_addrs(addrs: &[String]) -> Vec<Multiaddr> {
    addrs.iter().filter_map(|a| a.parse().ok()).collect()
}

fn strip_p2p(mut addr: Multiaddr) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.pop();
    }
    addr
}

/// What this node does with a gossip message that arrived on `topic` from `forwarder`:
/// deliver it (and let gossipsub forward it), or why not and what the refusal costs the
/// forwarder.
///
/// The author is the envelope's sender, whose signature over everything the envelope says,
/// topic included, `Envelope::decode` checks; gossipsub messages carry no author of their
/// own. A non-member forwarder or a bad message is rejected (and scored). A member
/// forwarding a message whose author this node does not know as a member yet is ignored,
/// not punished: the forwarder may simply have applied a join that this node has not.
/// Our own message, come back after gossipsub forgot its id (a replay), is ignored: not
/// delivered again, and not forwarded.
fn gossip_verdict(
    data: &[u8],
    topic: &str,
    forwarder: &PeerId,
    local: &PeerId,
    is_member: impl Fn(&PeerId) -> bool,
) -> Result<Envelope, (String, gossipsub::MessageAcceptance)> {
    use gossipsub::MessageAcceptance::{Ignore, Reject};
    if !is_member(forwarder) {
        return Err((
            format!("forwarded by {forwarder}, which is not a member"),
            Reject,
        ));
    }
    let env = Envelope::decode(data, MAX_ENVELOPE_SIZE).map_err(|e| (e.to_string(), Reject))?;
    if env.kind() != Kind::Publish {
        return Err((
            format!("a {:?} envelope on a gossip topic", env.kind()),
            Reject,
        ));
    }
    if env.topic() != Some(topic) {
        return Err((
            format!(
                "published for topic {:?}, replayed on {topic:?}",
                env.topic()
            ),
            Reject,
        ));
    }
    if env.sender() == *local {
        return Err(("this node's own message, come back".to_string(), Ignore));
    }
    if !is_member(&env.sender()) {
        return Err((
            format!("published by {}, which is not a member", env.sender()),
            Ignore,
        ));
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    mod gossip {
        use super::super::*;
        use agentmesh_protocols::identity::NodeSigner;
        use gossipsub::MessageAcceptance::{Ignore, Reject};
        use libp2p::identity::Keypair;

        struct Node {
            signer: NodeSigner,
            id: PeerId,
        }

        fn node() -> Node {
            let k = Keypair::generate_ed25519();
            Node {
                signer: NodeSigner::from_keypair(&k).expect("an Ed25519 key"),
                id: k.public().to_peer_id(),
            }
        }

        fn published(by: &Node, topic: &str, payload: &[u8]) -> Vec<u8> {
            Envelope::publish(&by.signer, topic.into(), 1, payload.to_vec())
                .encode()
                .expect("encodes")
        }

        /// The verdict on `data` arriving on `topic` from `forwarder` at `local`, where
        /// `members` are the members `local` knows.
        fn verdict(
            data: &[u8],
            topic: &str,
            forwarder: &Node,
            local: &Node,
            members: &[&Node],
        ) -> Result<Envelope, (String, gossipsub::MessageAcceptance)> {
            let ids: Vec<PeerId> = members.iter().map(|m| m.id).collect();
            gossip_verdict(data, topic, &forwarder.id, &local.id, |p| ids.contains(p))
        }

        #[test]
        fn a_members_message_on_its_topic_is_delivered_with_its_author() {
            let (alice, bob, me) = (node(), node(), node());
            let data = published(&alice, "jobs", b"hello");
            // Forwarded by its author or by another member alike.
            for forwarder in [&alice, &bob] {
                let env =
                    verdict(&data, "jobs", forwarder, &me, &[&alice, &bob, &me]).expect("accepted");
                assert_eq!(env.sender(), alice.id);
                assert_eq!(env.into_payload(), b"hello");
            }
        }

        #[test]
        fn a_non_member_forwarder_is_rejected_whatever_it_forwards() {
            let (alice, mallory, me) = (node(), node(), node());
            let data = published(&alice, "jobs", b"hello");
            let (reason, acceptance) =
                verdict(&data, "jobs", &mallory, &me, &[&alice, &me]).expect_err("refused");
            assert!(matches!(acceptance, Reject), "{reason}");
            assert!(reason.contains("not a member"), "{reason}");
        }

        #[test]
        fn bad_messages_from_a_member_are_rejected() {
            let (alice, me) = (node(), node());
            let members = [&alice, &me];
            let mut forged = published(&alice, "jobs", b"pay 10");
            let at = forged
                .windows(6)
                .position(|w| w == b"pay 10")
                .expect("payload");
            forged[at + 4] = b'9';
            let direct = Envelope::direct(&alice.signer, me.id, 1, b"hi".to_vec())
                .encode()
                .expect("encodes");
            let oversized = vec![0xa0; MAX_ENVELOPE_SIZE + 1];
            for (what, data, topic, why) in [
                (
                    "a forged payload",
                    forged,
                    "jobs",
                    "does not match its content",
                ),
                ("garbage", b"\xff\x00not cbor".to_vec(), "jobs", "malformed"),
                (
                    "an oversized message",
                    oversized,
                    "jobs",
                    "exceeds the limit",
                ),
                ("a direct envelope", direct, "jobs", "Direct envelope"),
                (
                    "a replay on another topic",
                    published(&alice, "jobs", b"x"),
                    "models",
                    "replayed on",
                ),
            ] {
                let Err((reason, acceptance)) = verdict(&data, topic, &alice, &me, &members) else {
                    panic!("{what} was accepted");
                };
                assert!(reason.contains(why), "{what}: {reason}");
                assert!(matches!(acceptance, Reject), "{what}: {reason}");
            }
        }

        #[test]
        fn a_bad_message_is_rejected_even_when_it_would_otherwise_be_ignored() {
            let (alice, stranger, mallory, me) = (node(), node(), node(), node());
            let members = [&alice, &me];
            // Our own message, but forwarded by a non-member: the forwarder is at fault.
            let own = published(&me, "jobs", b"mine");
            let (reason, acceptance) =
                verdict(&own, "jobs", &mallory, &me, &members).expect_err("refused");
            assert!(matches!(acceptance, Reject), "{reason}");
            // An unknown author, but on the wrong topic or not a publish: the message is bad.
            let replayed = published(&stranger, "jobs", b"x");
            let direct = Envelope::direct(&stranger.signer, me.id, 1, b"hi".to_vec())
                .encode()
                .expect("encodes");
            for (what, data, topic) in [("replay", replayed, "models"), ("direct", direct, "jobs")]
            {
                let (reason, acceptance) =
                    verdict(&data, topic, &alice, &me, &members).expect_err(what);
                assert!(matches!(acceptance, Reject), "{what}: {reason}");
            }
        }

        #[test]
        fn own_messages_and_unknown_authors_are_ignored_not_punished() {
            let (alice, stranger, me) = (node(), node(), node());
            let members = [&alice, &me];
            let own = published(&me, "jobs", b"mine");
            let (_, acceptance) = verdict(&own, "jobs", &alice, &me, &members).expect_err("own");
            assert!(matches!(acceptance, Ignore));
            let unknown = published(&stranger, "jobs", b"who");
            let (reason, acceptance) =
                verdict(&unknown, "jobs", &alice, &me, &members).expect_err("unknown author");
            assert!(matches!(acceptance, Ignore), "{reason}");
            assert!(reason.contains("not a member"), "{reason}");
        }
    }

    #[test]
    fn names_round_trip_through_the_agent_version() {
        assert_eq!(name_from_agent_version(&agent_version("node-7")), "node-7");
        assert_eq!(
            name_from_agent_version("rust-libp2p/0.1"),
            "rust-libp2p/0.1"
        );
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let mut b = Backoff::new();
        let now = Instant::now();
        assert!(b.due(now));
        for _ in 0..20 {
            b.failed(now);
        }
        assert_eq!(b.delay, MAX_BACKOFF);
        assert!(!b.due(now));
        b.reset();
        assert!(b.due(Instant::now()));
    }

    #[test]
    fn topics_are_checked() {
        assert!(valid_topic("jobs"));
        assert!(!valid_topic(""));
        assert!(!valid_topic("a\nb"));
        assert!(!valid_topic(&"x".repeat(MAX_TOPIC_LEN + 1)));
    }
}
