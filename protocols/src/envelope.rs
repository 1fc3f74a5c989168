//! The versioned CBOR envelope that agentmesh messages travel in.

use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use sha2::{Digest, Sha256};
use std::fmt;

/// Version written into every envelope; decoders refuse any other.
pub const ENVELOPE_VERSION: u8 = 1;

/// Largest encoded envelope accepted, in bytes (1 MiB). Gossip's max transmit size
/// is derived from it, so a message that can be built can also be sent.
pub const MAX_ENVELOPE_SIZE: usize = 1024 * 1024;

/// Domain separator for the id hash, so an envelope id can never collide with a
/// hash of some other agentmesh structure.
const ID_DOMAIN: &[u8] = b"agentmesh/envelope/v1";

/// What an envelope carries; decides how the receiver dispatches the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A user message published on a gossip topic.
    Publish,
    /// A message addressed to one peer.
    Direct,
}

/// Content-hash id of an envelope: SHA-256 over its fields (everything but the id).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub [u8; 32]);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// Why an envelope could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    /// The encoded form is larger than the limit.
    #[error("envelope of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size of the offending envelope.
        size: usize,
        /// The limit in force.
        limit: usize,
    },
    /// The bytes are not a CBOR envelope.
    #[error("malformed envelope: {0}")]
    Malformed(String),
    /// The envelope was written by an incompatible version.
    #[error("unsupported envelope version {0} (this node speaks version {ENVELOPE_VERSION})")]
    UnsupportedVersion(u8),
    /// A peer id field does not parse.
    #[error("invalid {field} peer id: {reason}")]
    InvalidPeerId {
        /// Which field.
        field: &'static str,
        /// Parser message.
        reason: String,
    },
    /// The id does not match the content.
    #[error("envelope id does not match its content (claimed {claimed}, computed {computed})")]
    IdMismatch {
        /// Id carried in the envelope.
        claimed: String,
        /// Id computed from the content.
        computed: MessageId,
    },
}

/// The on-wire shape. Kept separate from [`Envelope`] so that decoding validates
/// every field before a typed value exists.
#[derive(Serialize, Deserialize)]
struct Wire {
    v: u8,
    id: ByteBuf,
    sender: ByteBuf,
    recipient: Option<ByteBuf>,
    kind: Kind,
    ts: u64,
    payload: ByteBuf,
}

/// A decoded, validated envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    id: MessageId,
    sender: PeerId,
    recipient: Option<PeerId>,
    kind: Kind,
    timestamp_ms: u64,
    payload: Vec<u8>,
}

impl Envelope {
    /// Builds an envelope and computes its id. `recipient: None` means broadcast.
    pub fn new(
        kind: Kind,
        sender: PeerId,
        recipient: Option<PeerId>,
        timestamp_ms: u64,
        payload: Vec<u8>,
    ) -> Self {
        let id = compute_id(kind, &sender, recipient.as_ref(), timestamp_ms, &payload);
        Self {
            id,
            sender,
            recipient,
            kind,
            timestamp_ms,
            payload,
        }
    }

    /// The content-hash id.
    pub fn id(&self) -> MessageId {
        self.id
    }
    /// The peer that built the envelope.
    pub fn sender(&self) -> PeerId {
        self.sender
    }
    /// The addressee, or `None` for a broadcast.
    pub fn recipient(&self) -> Option<PeerId> {
        self.recipient
    }
    /// What the payload is.
    pub fn kind(&self) -> Kind {
        self.kind
    }
    /// Sender's wall clock at creation, milliseconds since the Unix epoch.
    pub fn timestamp_ms(&self) -> u64 {
        self.timestamp_ms
    }
    /// The carried bytes.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }
    /// Consumes the envelope, returning its payload.
    pub fn into_payload(self) -> Vec<u8> {
        self.payload
    }

    /// Encodes to CBOR, refusing results larger than [`MAX_ENVELOPE_SIZE`].
    pub fn encode(&self) -> Result<Vec<u8>, EnvelopeError> {
        let wire = Wire {
            v: ENVELOPE_VERSION,
            id: ByteBuf::from(self.id.0.to_vec()),
            sender: ByteBuf::from(self.sender.to_bytes()),
            recipient: self.recipient.map(|p| ByteBuf::from(p.to_bytes())),
            kind: self.kind,
            ts: self.timestamp_ms,
            payload: ByteBuf::from(self.payload.clone()),
        };
        let mut out = Vec::with_capacity(self.payload.len() + 128);
        ciborium::into_writer(&wire, &mut out)
            .map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        if out.len() > MAX_ENVELOPE_SIZE {
            return Err(EnvelopeError::TooLarge {
                size: out.len(),
                limit: MAX_ENVELOPE_SIZE,
            });
        }
        Ok(out)
    }

    /// Decodes and validates an envelope no larger than `limit` bytes: version,
    /// peer ids and the content-hash id are all checked.
    pub fn decode(bytes: &[u8], limit: usize) -> Result<Self, EnvelopeError> {
        if bytes.len() > limit {
            return Err(EnvelopeError::TooLarge {
                size: bytes.len(),
                limit,
            });
        }
        let wire: Wire =
            ciborium::from_reader(bytes).map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        if wire.v != ENVELOPE_VERSION {
            return Err(EnvelopeError::UnsupportedVersion(wire.v));
        }
        let sender = parse_peer("sender", &wire.sender)?;
        let recipient = wire
            .recipient
            .as_deref()
            .map(|b| parse_peer("recipient", b))
            .transpose()?;
        let computed = compute_id(
            wire.kind,
            &sender,
            recipient.as_ref(),
            wire.ts,
            &wire.payload,
        );
        if wire.id.as_slice() != computed.0 {
            return Err(EnvelopeError::IdMismatch {
                claimed: hex::encode(&wire.id),
                computed,
            });
        }
        Ok(Self {
            id: computed,
            sender,
            recipient,
            kind: wire.kind,
            timestamp_ms: wire.ts,
            payload: wire.payload.into_vec(),
        })
    }
}

fn parse_peer(field: &'static str, bytes: &[u8]) -> Result<PeerId, EnvelopeError> {
    PeerId::from_bytes(bytes).map_err(|e| EnvelopeError::InvalidPeerId {
        field,
        reason: e.to_string(),
    })
}

/// Hashes the fields in a fixed, length-prefixed layout, independent of how the
/// CBOR encoder orders or sizes them.
fn compute_id(
    kind: Kind,
    sender: &PeerId,
    recipient: Option<&PeerId>,
    ts: u64,
    payload: &[u8],
) -> MessageId {
    let mut h = Sha256::new();
    h.update(ID_DOMAIN);
    let sender = sender.to_bytes();
    h.update((sender.len() as u64).to_be_bytes());
    h.update(&sender);
    match recipient {
        Some(r) => {
            let r = r.to_bytes();
            h.update([1u8]);
            h.update((r.len() as u64).to_be_bytes());
            h.update(&r);
        }
        None => h.update([0u8]),
    }
    h.update([match kind {
        Kind::Publish => 1u8,
        Kind::Direct => 2u8,
    }]);
    h.update(ts.to_be_bytes());
    h.update((payload.len() as u64).to_be_bytes());
    h.update(payload);
    MessageId(h.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;
    use proptest::prelude::*;

    fn peer() -> PeerId {
        Keypair::generate_ed25519().public().to_peer_id()
    }

    #[test]
    fn round_trip_keeps_every_field() -> Result<(), EnvelopeError> {
        let (a, b) = (peer(), peer());
        let env = Envelope::new(Kind::Direct, a, Some(b), 42, vec![1, 2, 3]);
        let back = Envelope::decode(&env.encode()?, MAX_ENVELOPE_SIZE)?;
        assert_eq!(back, env);
        assert_eq!(back.recipient(), Some(b));
        Ok(())
    }

    #[test]
    fn oversized_input_is_refused_before_decoding() {
        let err = Envelope::decode(&[0u8; 100], 99).unwrap_err();
        assert!(matches!(
            err,
            EnvelopeError::TooLarge {
                size: 100,
                limit: 99
            }
        ));
    }

    #[test]
    fn oversized_payload_cannot_be_encoded() {
        let env = Envelope::new(Kind::Publish, peer(), None, 0, vec![7; MAX_ENVELOPE_SIZE]);
        assert!(matches!(env.encode(), Err(EnvelopeError::TooLarge { .. })));
    }

    #[test]
    fn tampered_payload_fails_the_id_check() -> Result<(), EnvelopeError> {
        let env = Envelope::new(Kind::Publish, peer(), None, 1, b"pay 10".to_vec());
        let mut bytes = env.encode()?;
        let pos = bytes.windows(6).position(|w| w == b"pay 10").unwrap_or(0);
        bytes[pos + 4] = b'9';
        let err = Envelope::decode(&bytes, MAX_ENVELOPE_SIZE).unwrap_err();
        assert!(matches!(err, EnvelopeError::IdMismatch { .. }), "{err}");
        Ok(())
    }

    #[test]
    fn other_versions_are_refused() -> Result<(), EnvelopeError> {
        let env = Envelope::new(Kind::Publish, peer(), None, 1, vec![]);
        let mut wire: Wire = ciborium::from_reader(&env.encode()?[..])
            .map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        wire.v = 2;
        let mut bytes = Vec::new();
        ciborium::into_writer(&wire, &mut bytes)
            .map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        let err = Envelope::decode(&bytes, MAX_ENVELOPE_SIZE).unwrap_err();
        assert!(matches!(err, EnvelopeError::UnsupportedVersion(2)));
        Ok(())
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = Envelope::decode(&bytes, MAX_ENVELOPE_SIZE);
        }

        #[test]
        fn round_trip(payload in proptest::collection::vec(any::<u8>(), 0..2048), ts: u64, direct: bool) {
            let recipient = direct.then(peer);
            let env = Envelope::new(if direct { Kind::Direct } else { Kind::Publish }, peer(), recipient, ts, payload);
            let back = Envelope::decode(&env.encode().unwrap(), MAX_ENVELOPE_SIZE).unwrap();
            prop_assert_eq!(back, env);
        }
    }
}
