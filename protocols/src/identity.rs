//! Ed25519 node identities: the bridge between a libp2p peer id and the
//! `ed25519-dalek` keys that sign agentmesh structures (gossip envelopes, update
//! announcements, Raft frames).

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use libp2p::{identity::Keypair, identity::PublicKey, PeerId};

/// A node identity that is not an Ed25519 key (agentmesh nodes only use Ed25519).
#[derive(Debug, thiserror::Error)]
#[error("the node identity is not an Ed25519 key")]
pub struct NotEd25519;

/// A node's Ed25519 signing key together with the peer id it belongs to.
#[derive(Clone)]
pub struct NodeSigner {
    key: SigningKey,
    peer: PeerId,
}

impl NodeSigner {
    /// The signer of a libp2p keypair, which must be Ed25519.
    pub fn from_keypair(keypair: &Keypair) -> Result<Self, NotEd25519> {
        let ed = keypair.clone().try_into_ed25519().map_err(|_| NotEd25519)?;
        let secret: [u8; 32] = ed.secret().as_ref().try_into().map_err(|_| NotEd25519)?;
        Ok(Self {
            key: SigningKey::from_bytes(&secret),
            peer: keypair.public().to_peer_id(),
        })
    }

    /// The peer id of this identity.
    pub fn peer_id(&self) -> PeerId {
        self.peer
    }

    /// The Ed25519 signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// Signs `msg` (deterministic Ed25519).
    pub fn sign(&self, msg: &[u8]) -> Signature {
        self.key.sign(msg)
    }
}

impl std::fmt::Debug for NodeSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSigner")
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// The Ed25519 public key inside an Ed25519 peer id, or `None` for a peer id that
/// does not inline an Ed25519 key (RSA, ECDSA and secp256k1 ids are hashes).
pub fn peer_public_key(peer: &PeerId) -> Option<VerifyingKey> {
    let hash = peer.as_ref();
    // Ed25519 peer ids inline the protobuf-encoded key with the identity hash (code 0).
    if hash.code() != 0 {
        return None;
    }
    let key = PublicKey::try_decode_protobuf(hash.digest()).ok()?;
    VerifyingKey::from_bytes(&key.try_into_ed25519().ok()?.to_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Verifier;

    #[test]
    fn the_peer_id_carries_the_key_that_verifies_the_signer() -> Result<(), NotEd25519> {
        let keypair = Keypair::generate_ed25519();
        let signer = NodeSigner::from_keypair(&keypair)?;
        assert_eq!(signer.peer_id(), keypair.public().to_peer_id());
        let key = peer_public_key(&signer.peer_id()).ok_or(NotEd25519)?;
        assert_eq!(key, signer.signing_key().verifying_key());
        let sig = signer.sign(b"m");
        assert!(key.verify(b"m", &sig).is_ok());
        // The libp2p keypair signs the same bytes the same way (Ed25519 is deterministic).
        let libp2p_sig = keypair.sign(b"m").map_err(|_| NotEd25519)?;
        assert_eq!(libp2p_sig, sig.to_bytes().to_vec());
        Ok(())
    }

    #[test]
    fn non_ed25519_peer_ids_have_no_inline_key() {
        // RSA keys get a SHA-256 multihash (code 0x12) as their peer id.
        let hashed = libp2p::multihash::Multihash::<64>::wrap(0x12, &[7; 32]);
        let hashed = hashed
            .map_err(|_| ())
            .and_then(|h| PeerId::from_multihash(h).map_err(|_| ()));
        assert!(hashed.is_ok_and(|p| peer_public_key(&p).is_none()));
        // An identity multihash that holds no protobuf key.
        assert!(peer_public_key(&PeerId::random()).is_none());
    }
}
