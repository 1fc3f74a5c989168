//! The one behaviour that composes every protocol a node speaks.

use crate::{blob, MAX_ENVELOPE_SIZE};
use libp2p::{
    connection_limits, gossipsub, identify,
    identity::Keypair,
    kad::{self, store::MemoryStoreConfig},
    ping, request_response,
    swarm::NetworkBehaviour,
};
use sha2::{Digest, Sha256};
use std::{num::NonZeroUsize, time::Duration};

/// Identify protocol version; peers announcing another are not agentmesh nodes.
pub const IDENTIFY_PROTOCOL_VERSION: &str = "/agentmesh/1.0.0";

/// Bytes gossipsub adds around an envelope in one published message: protobuf
/// framing and the topic (messages are anonymous at the gossipsub layer; the room
/// left for a source, sequence number and signature is a margin).
const GOSSIP_FRAME_OVERHEAD: usize = 2048;

/// Knobs of the mesh protocols. Every field has a reason in its doc; nothing is
/// left to a library default by accident.
#[derive(Debug, Clone)]
pub struct MeshConfig {
    agent_version: String,
    gossip_heartbeat: Duration,
    mesh_n: usize,
    mesh_n_low: usize,
    mesh_n_high: usize,
    ping_interval: Duration,
    kad_query_timeout: Duration,
    kad_bootstrap_interval: Duration,
    max_provided_keys: usize,
    blob_request_timeout: Duration,
    max_streams_per_connection: usize,
    max_established: u32,
    max_established_per_peer: u32,
    max_pending_incoming: u32,
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            agent_version: format!("agentmesh/{}", env!("CARGO_PKG_VERSION")),
            // One second, as in Ethereum's consensus layer: mesh repairs and IHAVE
            // gossip run this often; delivery itself does not wait for it.
            gossip_heartbeat: Duration::from_secs(1),
            // The gossipsub v1.1 defaults (D=6, D_lo=4, D_hi=12), stated so that a
            // change is a decision: with 30 nodes every message crosses ~2 hops.
            mesh_n: 6,
            mesh_n_low: 4,
            mesh_n_high: 12,
            // Also our liveness probe: a peer silent for two intervals is closed.
            ping_interval: Duration::from_secs(10),
            kad_query_timeout: Duration::from_secs(20),
            // Re-walk the DHT each minute so peers that came up elsewhere are found
            // even if nobody told us about them.
            kad_bootstrap_interval: Duration::from_secs(60),
            // Every locally held blob is a provided key; the library default (1024)
            // is too low for a node storing model checkpoints.
            max_provided_keys: 1 << 16,
            // One 1 MiB chunk should take milliseconds; 60 s covers a slow WAN link
            // and a large (4 MiB) chunk without hanging forever on a dead peer.
            blob_request_timeout: Duration::from_secs(60),
            // Blob streams in flight per connection. A fetcher keeps 8 in flight
            // per provider; each open stream can pin a response of up to 4 MiB
            // until it is read, so this bounds what one peer can make us hold.
            max_streams_per_connection: 16,
            max_established: 1024,
            // A TCP and a QUIC connection may race when two peers dial each other.
            max_established_per_peer: 2,
            max_pending_incoming: 256,
        }
    }
}

impl MeshConfig {
    /// Sets the identify agent version (carries the node's name).
    pub fn with_agent_version(mut self, v: String) -> Self {
        self.agent_version = v;
        self
    }
    /// Sets the gossipsub heartbeat.
    pub fn with_gossip_heartbeat(mut self, d: Duration) -> Self {
        self.gossip_heartbeat = d;
        self
    }
    /// Sets the blob request timeout.
    pub fn with_blob_request_timeout(mut self, d: Duration) -> Self {
        self.blob_request_timeout = d;
        self
    }
    /// Sets the ping interval (and so how fast a dead peer is noticed).
    pub fn with_ping_interval(mut self, d: Duration) -> Self {
        self.ping_interval = d;
        self
    }
    /// Largest gossip message on the wire: a maximal envelope plus gossipsub framing.
    pub fn max_gossip_transmit_size(&self) -> usize {
        MAX_ENVELOPE_SIZE + GOSSIP_FRAME_OVERHEAD
    }
}

/// Failure to build the behaviour from a config.
#[derive(Debug, thiserror::Error)]
pub enum BehaviourError {
    /// The gossipsub config was rejected.
    #[error("invalid gossipsub configuration: {0}")]
    Gossipsub(String),
}

/// Every protocol of an agentmesh node in one behaviour.
#[derive(NetworkBehaviour)]
pub struct MeshBehaviour {
    /// Caps on connection counts, checked before handlers are built.
    pub limits: connection_limits::Behaviour,
    /// Exchanges listen addresses, protocols, agent version (and so names).
    pub identify: identify::Behaviour,
    /// Liveness and round-trip times.
    pub ping: ping::Behaviour,
    /// Peer discovery and blob provider records.
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    /// Topic broadcast.
    pub gossipsub: gossipsub::Behaviour,
    /// Manifest and chunk transfer.
    pub blob: request_response::Behaviour<blob::BlobCodec>,
    /// Long-lived streams for Raft RPCs, forwarded client requests and join requests
    /// (`raft::PROTOCOL`): the node reads and writes them from its own tasks, not through
    /// the swarm task (`node/src/raft/streams.rs`).
    pub streams: libp2p_stream::Behaviour,
}

/// Domain separator of gossip message ids.
const GOSSIP_ID_DOMAIN: &[u8] = b"agentmesh/gossip-message/v2";

/// Gossip message id: SHA-256 over the gossipsub topic and the whole published data,
/// which is a signed envelope. A message that arrives by several paths is then a
/// duplicate that costs one hash, before any decoding or signature check. Because the
/// id covers the signature and the topic it came on, a copy with a forged signature,
/// altered bytes or replayed on another topic gets an id of its own and cannot get the
/// genuine message's id marked as seen (gossipsub records ids before validation) to
/// suppress it; envelopes decode only from their canonical encoding, so a genuine
/// envelope has exactly one id.
pub fn gossip_message_id(message: &gossipsub::Message) -> gossipsub::MessageId {
    let topic = message.topic.as_str().as_bytes();
    let mut h = Sha256::new();
    h.update(GOSSIP_ID_DOMAIN);
    h.update((topic.len() as u64).to_be_bytes());
    h.update(topic);
    h.update(&message.data);
    gossipsub::MessageId::new(&h.finalize())
}

/// The application score (weight 1) the node gives a peer that is not a member of its cluster:
/// far below the graylist threshold (-80), so gossipsub neither takes nor sends it anything,
/// and it holds no mesh slot.
pub const NON_MEMBER_SCORE: f64 = -1000.0;

/// Gossipsub peer scoring (v1.1). Membership is the node's own verdict, given as the
/// application score ([`NON_MEMBER_SCORE`]); per topic, invalid messages cost a peer its mesh
/// slots (see [`topic_score_params`]). IP colocation is not penalised: containers behind one
/// NAT and single-machine clusters share addresses, and membership, not the address, is what
/// keeps strangers out.
fn peer_score_params() -> gossipsub::PeerScoreParams {
    gossipsub::PeerScoreParams {
        app_specific_weight: 1.0,
        ip_colocation_factor_weight: 0.0,
        ..Default::default()
    }
}

/// Scoring of one topic: every message that fails validation (bad envelope, forged sender, a
/// non-member forwarder) costs its forwarder `-10 × count²`, the count decaying to 0.3 of
/// itself each second: three invalid messages in a row put a peer below the graylist
/// threshold (its messages ignored) for about a second and below the gossip threshold for
/// a few, and a steady stream keeps it there. First deliveries earn a little credit. Quiet topics are normal here (a job's topic is silent
/// between rounds), so a low delivery rate is not punished.
pub fn topic_score_params() -> gossipsub::TopicScoreParams {
    gossipsub::TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.01,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 100.0,
        first_message_deliveries_weight: 0.5,
        first_message_deliveries_decay: 0.5,
        first_message_deliveries_cap: 20.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -10.0,
        invalid_message_deliveries_decay: 0.3,
        ..Default::default()
    }
}

impl MeshBehaviour {
    /// Builds the behaviour for `keypair` with `config`.
    pub fn new(keypair: &Keypair, config: &MeshConfig) -> Result<Self, BehaviourError> {
        let peer_id = keypair.public().to_peer_id();

        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL_VERSION.to_string(), keypair.public())
                .with_agent_version(config.agent_version.clone())
                .with_push_listen_addr_updates(true),
        );

        let ping = ping::Behaviour::new(
            ping::Config::new()
                .with_interval(config.ping_interval)
                .with_timeout(config.ping_interval * 2),
        );

        // The standard Kademlia protocol id, so other libp2p implementations can
        // route for us. Server mode is forced: behind Docker or Kubernetes NAT the
        // node has no confirmed external address, and in client mode it would
        // never answer queries and so never be found.
        let mut kad_cfg = kad::Config::new(kad::PROTOCOL_NAME);
        kad_cfg
            .set_query_timeout(config.kad_query_timeout)
            .set_periodic_bootstrap_interval(Some(config.kad_bootstrap_interval))
            .set_replication_factor(NonZeroUsize::new(20).unwrap_or(NonZeroUsize::MIN));
        let store_cfg = MemoryStoreConfig {
            max_provided_keys: config.max_provided_keys,
            ..Default::default()
        };
        let store = kad::store::MemoryStore::with_config(peer_id, store_cfg);
        let mut kad = kad::Behaviour::with_config(peer_id, store, kad_cfg);
        kad.set_mode(Some(kad::Mode::Server));

        let gossip_cfg = gossipsub::ConfigBuilder::default()
            .heartbeat_interval(config.gossip_heartbeat)
            .mesh_n(config.mesh_n)
            .mesh_n_low(config.mesh_n_low)
            .mesh_n_high(config.mesh_n_high)
            // The envelope carries its sender's signature over everything it says
            // (topic included), and the node checks it once per message, after
            // duplicate suppression (`validate_messages`). Gossipsub's own signature
            // (StrictSign) would be checked in its codec on every copy, before the
            // duplicate check: once per path a message arrives by (5-7 times in a
            // 30-node mesh). So gossipsub carries no author, sequence number or
            // signature (`MessageAuthenticity::Anonymous` below), and refuses
            // messages that do.
            .validation_mode(gossipsub::ValidationMode::Anonymous)
            // Nothing is forwarded until the node has decoded the envelope and
            // checked its sender's signature.
            .validate_messages()
            .message_id_fn(gossip_message_id)
            // Enforced on publish and on receive, derived from the envelope limit.
            .max_transmit_size(config.max_gossip_transmit_size())
            // Publishing to every known subscriber, not just the mesh, trades
            // bandwidth for first-hop latency; our meshes are small.
            .flood_publish(true)
            .build()
            .map_err(|e| BehaviourError::Gossipsub(e.to_string()))?;
        let mut gossipsub =
            gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, gossip_cfg)
                .map_err(|e| BehaviourError::Gossipsub(e.to_string()))?;
        gossipsub
            .with_peer_score(
                peer_score_params(),
                gossipsub::PeerScoreThresholds::default(),
            )
            .map_err(BehaviourError::Gossipsub)?;

        let blob = request_response::Behaviour::with_codec(
            blob::codec(),
            [(blob::PROTOCOL, request_response::ProtocolSupport::Full)],
            request_response::Config::default()
                .with_request_timeout(config.blob_request_timeout)
                .with_max_concurrent_streams(config.max_streams_per_connection),
        );

        let limits = connection_limits::Behaviour::new(
            connection_limits::ConnectionLimits::default()
                .with_max_established(Some(config.max_established))
                .with_max_established_per_peer(Some(config.max_established_per_peer))
                .with_max_pending_incoming(Some(config.max_pending_incoming)),
        );

        Ok(Self {
            limits,
            identify,
            ping,
            kad,
            gossipsub,
            blob,
            streams: libp2p_stream::Behaviour::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{identity::NodeSigner, Envelope};

    fn message(topic: &str, data: Vec<u8>) -> gossipsub::Message {
        gossipsub::Message {
            source: None,
            data,
            sequence_number: None,
            topic: gossipsub::IdentTopic::new(topic).hash(),
        }
    }

    #[test]
    fn a_forged_copy_cannot_take_the_genuine_messages_id() -> Result<(), Box<dyn std::error::Error>>
    {
        let alice = NodeSigner::from_keypair(&Keypair::generate_ed25519())?;
        let data = Envelope::publish(&alice, "t".into(), 1, b"hi".to_vec()).encode()?;
        let genuine = gossip_message_id(&message("t", data.clone()));
        // The same data by another path: the same id, so a duplicate.
        assert_eq!(gossip_message_id(&message("t", data.clone())), genuine);
        // The same bytes replayed on another topic: another id.
        assert_ne!(gossip_message_id(&message("u", data.clone())), genuine);
        // Any changed byte (here the last one, inside the signature): another id.
        let mut forged = data;
        *forged.last_mut().ok_or("empty")? ^= 1;
        assert!(Envelope::decode(&forged, MAX_ENVELOPE_SIZE).is_err());
        assert_ne!(gossip_message_id(&message("t", forged)), genuine);
        Ok(())
    }
}
