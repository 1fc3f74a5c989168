//! The versioned CBOR envelope that agentmesh messages travel in, signed by its sender.

use crate::identity::{peer_public_key, NodeSigner};
use ed25519_dalek::Signature;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use serde_bytes::{ByteBuf, Bytes};
use sha2::{Digest, Sha256};
use std::fmt;

/// Version written into every envelope; decoders refuse any other. Version 2 added
/// the sender's signature (version 1 relied on gossipsub's signature over it).
pub const ENVELOPE_VERSION: u8 = 2;

/// Largest encoded envelope accepted, in bytes (1 MiB). Gossip's max transmit size
/// is derived from it, so a message that can be built can also be sent.
pub const MAX_ENVELOPE_SIZE: usize = 1024 * 1024;

/// Domain separator for the id hash, so an envelope id can never collide with a
/// hash of some other agentmesh structure.
const ID_DOMAIN: &[u8] = b"agentmesh/envelope/v2";

/// Domain separator for the sender's signature, which is made over this and the id.
const SIGNATURE_DOMAIN: &[u8] = b"agentmesh/envelope-signature/v2";

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
    /// The sender's peer id does not carry an Ed25519 key to check the signature with.
    #[error("sender {0} is not an Ed25519 peer id, so its signature cannot be checked")]
    NotEd25519(PeerId),
    /// The signature is not the sender's over this envelope.
    #[error("envelope signature is not {0}'s")]
    BadSignature(PeerId),
    /// The bytes decode, but are not the one encoding this node would write for
    /// them (reordered or extra fields, long-form integers). Refused so that one
    /// signed envelope has exactly one byte form, and so one gossip message id.
    #[error("envelope is not canonically encoded")]
    NonCanonical,
    /// The kind does not match the addressing: a publish names a topic and no
    /// recipient, a direct message a recipient and no topic.
    #[error("a {0:?} envelope must name {1}")]
    Addressing(Kind, &'static str),
}

/// The on-wire shape. Kept separate from [`Envelope`] so that decoding validates
/// every field before a typed value exists.
#[derive(Serialize, Deserialize)]
struct Wire {
    v: u8,
    id: ByteBuf,
    sender: ByteBuf,
    recipient: Option<ByteBuf>,
    topic: Option<String>,
    kind: Kind,
    ts: u64,
    payload: ByteBuf,
    sig: ByteBuf,
}

/// [`Wire`] borrowing the envelope, for encoding without copying the payload. Same
/// fields in the same order, so both serialize to the same bytes.
#[derive(Serialize)]
struct WireRef<'a> {
    v: u8,
    id: &'a Bytes,
    sender: &'a Bytes,
    recipient: Option<&'a Bytes>,
    topic: Option<&'a str>,
    kind: Kind,
    ts: u64,
    payload: &'a Bytes,
    sig: &'a Bytes,
}

/// An envelope that is known to be authentic: built and signed here, or decoded
/// with its version, peer ids, content-hash id, encoding and sender's signature
/// all checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    id: MessageId,
    sender: PeerId,
    recipient: Option<PeerId>,
    topic: Option<String>,
    kind: Kind,
    timestamp_ms: u64,
    payload: Vec<u8>,
    signature: Signature,
}

impl Envelope {
    /// A message for gossip `topic`, built and signed by `signer`. The topic is
    /// signed with the rest, so the message cannot be replayed on another topic.
    pub fn publish(
        signer: &NodeSigner,
        topic: String,
        timestamp_ms: u64,
        payload: Vec<u8>,
    ) -> Self {
        Self::build(
            Kind::Publish,
            signer,
            None,
            Some(topic),
            timestamp_ms,
            payload,
        )
    }

    /// A message for one peer, built and signed by `signer`.
    pub fn direct(
        signer: &NodeSigner,
        recipient: PeerId,
        timestamp_ms: u64,
        payload: Vec<u8>,
    ) -> Self {
        Self::build(
            Kind::Direct,
            signer,
            Some(recipient),
            None,
            timestamp_ms,
            payload,
        )
    }

    fn build(
        kind: Kind,
        signer: &NodeSigner,
        recipient: Option<PeerId>,
        topic: Option<String>,
        timestamp_ms: u64,
        payload: Vec<u8>,
    ) -> Self {
        let sender = signer.peer_id();
        let id = compute_id(
            kind,
            &sender,
            recipient.as_ref(),
            topic.as_deref(),
            timestamp_ms,
            &payload,
        );
        let signature = signer.sign(&signed_bytes(&id));
        Self {
            id,
            sender,
            recipient,
            topic,
            kind,
            timestamp_ms,
            payload,
            signature,
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
    /// The addressee of a direct message.
    pub fn recipient(&self) -> Option<PeerId> {
        self.recipient
    }
    /// The gossip topic of a published message.
    pub fn topic(&self) -> Option<&str> {
        self.topic.as_deref()
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
        let sender = self.sender.to_bytes();
        let recipient = self.recipient.map(|p| p.to_bytes());
        let signature = self.signature.to_bytes();
        let wire = WireRef {
            v: ENVELOPE_VERSION,
            id: Bytes::new(&self.id.0),
            sender: Bytes::new(&sender),
            recipient: recipient.as_deref().map(Bytes::new),
            topic: self.topic.as_deref(),
            kind: self.kind,
            ts: self.timestamp_ms,
            payload: Bytes::new(&self.payload),
            sig: Bytes::new(&signature),
        };
        let mut out = Vec::with_capacity(self.payload.len() + 256);
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
    /// peer ids, the content-hash id, the encoding (only the canonical one) and the
    /// sender's signature are all checked, the signature last since it costs most.
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
        match (wire.kind, recipient.is_some(), wire.topic.is_some()) {
            (Kind::Publish, false, true) | (Kind::Direct, true, false) => {}
            (Kind::Publish, ..) => {
                return Err(EnvelopeError::Addressing(
                    Kind::Publish,
                    "a topic and no recipient",
                ))
            }
            (Kind::Direct, ..) => {
                return Err(EnvelopeError::Addressing(
                    Kind::Direct,
                    "a recipient and no topic",
                ))
            }
        }
        let computed = compute_id(
            wire.kind,
            &sender,
            recipient.as_ref(),
            wire.topic.as_deref(),
            wire.ts,
            &wire.payload,
        );
        if wire.id.as_slice() != computed.0 {
            return Err(EnvelopeError::IdMismatch {
                claimed: hex::encode(&wire.id),
                computed,
            });
        }
        let signature =
            Signature::from_slice(&wire.sig).map_err(|_| EnvelopeError::BadSignature(sender))?;
        let env = Self {
            id: computed,
            sender,
            recipient,
            topic: wire.topic,
            kind: wire.kind,
            timestamp_ms: wire.ts,
            payload: wire.payload.into_vec(),
            signature,
        };
        if env.encode()? != bytes {
            return Err(EnvelopeError::NonCanonical);
        }
        let key = peer_public_key(&sender).ok_or(EnvelopeError::NotEd25519(sender))?;
        // Strict verification also refuses weak keys and non-canonical signatures, so
        // a signature cannot be altered into another one that still verifies.
        key.verify_strict(&signed_bytes(&env.id), &env.signature)
            .map_err(|_| EnvelopeError::BadSignature(sender))?;
        Ok(env)
    }
}

/// What the sender signs: the domain and the content-hash id (which covers every field).
fn signed_bytes(id: &MessageId) -> Vec<u8> {
    [SIGNATURE_DOMAIN, &id.0].concat()
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
    topic: Option<&str>,
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
    match topic {
        Some(t) => {
            h.update([1u8]);
            h.update((t.len() as u64).to_be_bytes());
            h.update(t.as_bytes());
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

    fn signer() -> NodeSigner {
        NodeSigner::from_keypair(&Keypair::generate_ed25519()).expect("an Ed25519 keypair")
    }

    fn peer() -> PeerId {
        signer().peer_id()
    }

    fn wire_of(env: &Envelope) -> Result<Wire, EnvelopeError> {
        ciborium::from_reader(&env.encode()?[..])
            .map_err(|e| EnvelopeError::Malformed(e.to_string()))
    }

    fn bytes_of<T: Serialize>(wire: &T) -> Result<Vec<u8>, EnvelopeError> {
        let mut bytes = Vec::new();
        ciborium::into_writer(wire, &mut bytes)
            .map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        Ok(bytes)
    }

    #[test]
    fn round_trip_keeps_every_field() -> Result<(), EnvelopeError> {
        let (a, b) = (signer(), peer());
        let env = Envelope::direct(&a, b, 42, vec![1, 2, 3]);
        let back = Envelope::decode(&env.encode()?, MAX_ENVELOPE_SIZE)?;
        assert_eq!(back, env);
        assert_eq!(back.sender(), a.peer_id());
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
        let env = Envelope::publish(&signer(), "t".into(), 0, vec![7; MAX_ENVELOPE_SIZE]);
        assert!(matches!(env.encode(), Err(EnvelopeError::TooLarge { .. })));
    }

    #[test]
    fn tampered_payload_fails_the_id_check() -> Result<(), EnvelopeError> {
        let env = Envelope::publish(&signer(), "t".into(), 1, b"pay 10".to_vec());
        let mut bytes = env.encode()?;
        let pos = bytes.windows(6).position(|w| w == b"pay 10").unwrap_or(0);
        bytes[pos + 4] = b'9';
        let err = Envelope::decode(&bytes, MAX_ENVELOPE_SIZE).unwrap_err();
        assert!(matches!(err, EnvelopeError::IdMismatch { .. }), "{err}");
        Ok(())
    }

    #[test]
    fn only_the_senders_signature_is_accepted() -> Result<(), EnvelopeError> {
        let (alice, mallory) = (signer(), signer());
        let env = Envelope::publish(&alice, "t".into(), 1, b"hello".to_vec());
        let good = wire_of(&env)?;

        // A flipped bit anywhere in the signature.
        let mut flipped = wire_of(&env)?;
        flipped.sig[17] ^= 0x04;
        // Mallory's signature over the same id, on an envelope naming alice.
        let mut resigned = wire_of(&env)?;
        resigned.sig = ByteBuf::from(mallory.sign(&signed_bytes(&env.id())).to_bytes().to_vec());
        // Mallory's envelope relabelled with alice as sender: the id then mismatches, and
        // with a recomputed id the signature is not alice's.
        let theirs = Envelope::publish(&mallory, "t".into(), 1, b"hello".to_vec());
        let mut relabelled = wire_of(&theirs)?;
        relabelled.sender = good.sender.clone();
        relabelled.id = ByteBuf::from(env.id().0.to_vec());
        // No signature, and one of the wrong length.
        let mut empty = wire_of(&env)?;
        empty.sig = ByteBuf::new();
        let mut short = wire_of(&env)?;
        short.sig.truncate(63);

        for (what, wire) in [
            ("flipped", flipped),
            ("resigned", resigned),
            ("relabelled", relabelled),
            ("empty", empty),
            ("short", short),
        ] {
            let err = Envelope::decode(&bytes_of(&wire)?, MAX_ENVELOPE_SIZE).unwrap_err();
            assert!(
                matches!(err, EnvelopeError::BadSignature(p) if p == alice.peer_id()),
                "{what}: {err}"
            );
        }
        assert!(Envelope::decode(&bytes_of(&good)?, MAX_ENVELOPE_SIZE).is_ok());
        Ok(())
    }

    #[test]
    fn the_topic_is_signed_and_must_match_the_kind() -> Result<(), EnvelopeError> {
        let alice = signer();
        let env = Envelope::publish(&alice, "jobs".into(), 1, b"x".to_vec());
        assert_eq!(
            Envelope::decode(&env.encode()?, MAX_ENVELOPE_SIZE)?.topic(),
            Some("jobs")
        );
        // Moved to another topic: the id no longer matches (and a recomputed id would not
        // carry alice's signature).
        let mut moved = wire_of(&env)?;
        moved.topic = Some("models".into());
        let err = Envelope::decode(&bytes_of(&moved)?, MAX_ENVELOPE_SIZE).unwrap_err();
        assert!(matches!(err, EnvelopeError::IdMismatch { .. }), "{err}");
        // A publish without a topic, or with a recipient; a direct message with a topic.
        let mut no_topic = wire_of(&env)?;
        no_topic.topic = None;
        let mut addressed = wire_of(&env)?;
        addressed.recipient = Some(ByteBuf::from(peer().to_bytes()));
        let mut direct = wire_of(&Envelope::direct(&alice, peer(), 1, vec![]))?;
        direct.topic = Some("jobs".into());
        for wire in [no_topic, addressed, direct] {
            let err = Envelope::decode(&bytes_of(&wire)?, MAX_ENVELOPE_SIZE).unwrap_err();
            assert!(matches!(err, EnvelopeError::Addressing(..)), "{err}");
        }
        Ok(())
    }

    #[test]
    fn a_sender_without_an_inline_key_is_refused() -> Result<(), EnvelopeError> {
        let env = Envelope::publish(&signer(), "t".into(), 1, vec![]);
        let mut wire = wire_of(&env)?;
        let hashed = libp2p::multihash::Multihash::<64>::wrap(0x12, &[9; 32])
            .map_err(|e| EnvelopeError::Malformed(e.to_string()))?;
        let rsa_like = PeerId::from_multihash(hashed)
            .map_err(|_| EnvelopeError::Malformed("peer id".into()))?;
        wire.sender = ByteBuf::from(rsa_like.to_bytes());
        wire.id = ByteBuf::from(
            compute_id(Kind::Publish, &rsa_like, None, Some("t"), 1, &[])
                .0
                .to_vec(),
        );
        let err = Envelope::decode(&bytes_of(&wire)?, MAX_ENVELOPE_SIZE).unwrap_err();
        assert!(
            matches!(err, EnvelopeError::NotEd25519(p) if p == rsa_like),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn only_the_canonical_encoding_is_accepted() -> Result<(), EnvelopeError> {
        let env = Envelope::publish(&signer(), "t".into(), 5, b"x".to_vec());
        let wire = wire_of(&env)?;
        // The same fields in another order.
        #[derive(Serialize)]
        struct Reordered<'a> {
            sig: &'a ByteBuf,
            v: u8,
            id: &'a ByteBuf,
            sender: &'a ByteBuf,
            recipient: Option<&'a ByteBuf>,
            topic: Option<&'a String>,
            kind: Kind,
            ts: u64,
            payload: &'a ByteBuf,
        }
        let reordered = Reordered {
            sig: &wire.sig,
            v: wire.v,
            id: &wire.id,
            sender: &wire.sender,
            recipient: wire.recipient.as_ref(),
            topic: wire.topic.as_ref(),
            kind: wire.kind,
            ts: wire.ts,
            payload: &wire.payload,
        };
        // One field more.
        #[derive(Serialize)]
        struct Extra<'a> {
            #[serde(flatten)]
            wire: &'a Wire,
            extra: u8,
        }
        let extra = Extra {
            wire: &wire,
            extra: 0,
        };
        for bytes in [bytes_of(&reordered)?, bytes_of(&extra)?] {
            let err = Envelope::decode(&bytes, MAX_ENVELOPE_SIZE).unwrap_err();
            assert!(matches!(err, EnvelopeError::NonCanonical), "{err}");
        }
        // The borrowing encoder writes exactly what the owning wire type would.
        assert_eq!(bytes_of(&wire)?, env.encode()?);
        Ok(())
    }

    #[test]
    fn other_versions_are_refused() -> Result<(), EnvelopeError> {
        let env = Envelope::publish(&signer(), "t".into(), 1, vec![]);
        let mut wire = wire_of(&env)?;
        wire.v = 1;
        let err = Envelope::decode(&bytes_of(&wire)?, MAX_ENVELOPE_SIZE).unwrap_err();
        assert!(matches!(err, EnvelopeError::UnsupportedVersion(1)));
        Ok(())
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = Envelope::decode(&bytes, MAX_ENVELOPE_SIZE);
        }

        #[test]
        fn round_trip(payload in proptest::collection::vec(any::<u8>(), 0..2048), ts: u64, direct: bool) {
            let env = if direct {
                Envelope::direct(&signer(), peer(), ts, payload)
            } else {
                Envelope::publish(&signer(), format!("topic-{ts}"), ts, payload)
            };
            let back = Envelope::decode(&env.encode().unwrap(), MAX_ENVELOPE_SIZE).unwrap();
            prop_assert_eq!(back, env);
        }
    }
}
