//! Wire types and libp2p behaviours of the agentmesh mesh.
//!
//! This crate holds what crosses the network and nothing that decides policy:
//!
//! - [`Envelope`]: the versioned CBOR envelope every agentmesh message travels in
//!   (gossip today, direct messages later), signed by its sender, decoded with a size
//!   limit and checked against its content-hash id and the sender's signature.
//! - [`identity`]: Ed25519 node identities, between peer ids and signing keys.
//! - [`blob`]: the content-addressed blob protocol (`/agentmesh/blob/2.0.0`):
//!   manifest and chunk requests over request-response, length-prefixed CBOR with
//!   explicit limits, chunk bytes sent raw after the response head.
//! - [`MeshBehaviour`]: one behaviour composing identify, ping, Kademlia, gossipsub,
//!   the blob protocol and connection limits, every knob set explicitly in
//!   [`MeshConfig`].
//! - [`jobs`]: training-job messages on gossipsub: signed update announcements and
//!   model-copy notices (JSON, size-limited).
//! - [`seal`]: per-peer sealing of private data (model updates): X25519 pair keys through
//!   HKDF, XChaCha20-Poly1305, one data key wrapped for each recipient.
//! - [`raft`]: the Raft protocol (`/agentmesh/raft/2.0.0`), opaque frames between
//!   cluster members on long-lived streams.
//!
//! # Usage
//!
//! ```
//! use agentmesh_protocols::{identity::NodeSigner, Envelope};
//! use libp2p::identity::Keypair;
//!
//! let signer = NodeSigner::from_keypair(&Keypair::generate_ed25519()).unwrap();
//! let env = Envelope::publish(&signer, "news".into(), 1_700_000_000_000, b"hello".to_vec());
//! let bytes = env.encode().unwrap();
//! let back = Envelope::decode(&bytes, agentmesh_protocols::MAX_ENVELOPE_SIZE).unwrap();
//! assert_eq!(back.id(), env.id());
//! ```

#[allow(missing_docs)] // the NetworkBehaviour derive generates an undocumented event enum
mod behaviour;
pub mod blob;
mod codec;
mod envelope;
pub mod identity;
pub mod jobs;
pub mod raft;
pub mod seal;

pub use behaviour::{
    gossip_message_id, topic_score_params, BehaviourError, MeshBehaviour, MeshBehaviourEvent,
    MeshConfig, IDENTIFY_PROTOCOL_VERSION, NON_MEMBER_SCORE,
};
pub use codec::{CborCodec, CodecLimits};
pub use envelope::{Envelope, EnvelopeError, Kind, MessageId, ENVELOPE_VERSION, MAX_ENVELOPE_SIZE};
