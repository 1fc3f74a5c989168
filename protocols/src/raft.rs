//! The Raft protocol (`/agentmesh/raft/1.0.0`): opaque frames between cluster members.
//!
//! The consensus crate encodes its messages (Raft RPCs, requests forwarded to the leader, join
//! requests) and decodes them with its own limit; this protocol only moves the bytes, in one
//! length-prefixed CBOR byte string each way, so it carries no openraft types.

use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

use crate::codec::{CborCodec, CodecLimits};

/// Protocol id.
pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/agentmesh/raft/1.0.0");

/// Largest frame either way: the consensus crate's 16 MiB message limit plus framing.
pub const MAX_FRAME: usize = 16 * 1024 * 1024 + 1024;

/// One message, request or response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftFrame(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// The request-response codec of the Raft protocol.
pub type RaftCodec = CborCodec<RaftFrame, RaftFrame>;

/// The codec with the protocol's limits.
pub fn codec() -> RaftCodec {
    CborCodec::new(CodecLimits::new(MAX_FRAME, MAX_FRAME))
}
