//! The shared cluster key of automated deployments (`--cluster-key-file`).
//!
//! Nodes that hold the same secret recognise each other before any of them is a member, and a
//! node holding it may join without a token. The secret itself never leaves the node: an
//! Ed25519 key pair is derived from it (HKDF-SHA256), the cluster records the public half when
//! it is founded, and a node proves it holds the key by signing its own peer id. The proof is
//! bound to the prover's libp2p identity, which the connection authenticates, so a captured
//! proof is useless to anyone else.

use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use hkdf::Hkdf;
use sha2::Sha256;

/// Shortest secret accepted, in bytes (after trimming surrounding whitespace).
pub const MIN_CLUSTER_KEY_LEN: usize = 16;
/// Longest cluster key file read.
pub const MAX_CLUSTER_KEY_FILE: u64 = 4096;

const HKDF_SALT: &[u8] = b"agentmesh cluster key v1";
const HKDF_INFO: &[u8] = b"ed25519 signing key";
const PROOF_DOMAIN: &[u8] = b"agentmesh/cluster-key-proof/v1\0";

/// Why a cluster key could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ClusterKeyError {
    /// The file could not be read.
    #[error("cannot read cluster key file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is larger than any key.
    #[error("cluster key file {path} is larger than {MAX_CLUSTER_KEY_FILE} bytes")]
    TooLarge {
        /// The file.
        path: String,
    },
    /// The secret is too short to be a key.
    #[error(
        "cluster key in {path} is {len} bytes; at least {MIN_CLUSTER_KEY_LEN} are needed \
         (generate one with `head -c 32 /dev/urandom | base64`)"
    )]
    TooShort {
        /// The file.
        path: String,
        /// Its length after trimming.
        len: usize,
    },
}

/// A cluster key, reduced to the signing key derived from it. `Debug` never shows the secret.
#[derive(Clone)]
pub struct ClusterKey {
    signing: SigningKey,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterKey")
            .field("public", &hex_prefix(&self.public_key()))
            .finish()
    }
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

impl ClusterKey {
    /// Derives the key from a secret. Leading and trailing whitespace is ignored, so a file
    /// written by `echo` or an editor gives the same key as one written without a newline.
    pub fn from_secret(secret: &[u8]) -> Option<Self> {
        let secret = secret.trim_ascii();
        if secret.len() < MIN_CLUSTER_KEY_LEN {
            return None;
        }
        let mut seed = [0u8; 32];
        Hkdf::<Sha256>::new(Some(HKDF_SALT), secret)
            .expand(HKDF_INFO, &mut seed)
            .ok()?;
        Some(Self {
            signing: SigningKey::from_bytes(&seed),
        })
    }

    /// Reads the secret from a file.
    pub fn from_file(path: &Path) -> Result<Self, ClusterKeyError> {
        let shown = path.display().to_string();
        let read_err = |source| ClusterKeyError::Read {
            path: shown.clone(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read_err)?.len();
        if len > MAX_CLUSTER_KEY_FILE {
            return Err(ClusterKeyError::TooLarge { path: shown });
        }
        let secret = std::fs::read(path).map_err(read_err)?;
        Self::from_secret(&secret).ok_or_else(|| ClusterKeyError::TooShort {
            len: secret.trim_ascii().len(),
            path: shown,
        })
    }

    /// The public half, which the cluster records and verifies proofs with.
    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// A proof that the node with `peer_id` holds this key.
    pub fn prove(&self, peer_id: &str) -> Vec<u8> {
        self.signing
            .sign(&proof_message(peer_id))
            .to_bytes()
            .to_vec()
    }

    /// Whether `proof` shows that `peer_id` holds the key whose public half is `public_key`.
    pub fn verify(public_key: &[u8], peer_id: &str, proof: &[u8]) -> bool {
        let Ok(key) = <[u8; 32]>::try_from(public_key) else {
            return false;
        };
        let Ok(key) = VerifyingKey::from_bytes(&key) else {
            return false;
        };
        let Ok(sig) = Signature::from_slice(proof) else {
            return false;
        };
        key.verify(&proof_message(peer_id), &sig).is_ok()
    }

    /// Whether `proof` shows that `peer_id` holds this same key.
    pub fn verifies(&self, peer_id: &str, proof: &[u8]) -> bool {
        Self::verify(&self.public_key(), peer_id, proof)
    }
}

fn proof_message(peer_id: &str) -> Vec<u8> {
    [PROOF_DOMAIN, peer_id.as_bytes()].concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_secret_same_key_and_whitespace_does_not_matter() {
        let a = ClusterKey::from_secret(b"0123456789abcdef-secret").unwrap();
        let b = ClusterKey::from_secret(b"  0123456789abcdef-secret\n").unwrap();
        assert_eq!(a.public_key(), b.public_key());
        let c = ClusterKey::from_secret(b"0123456789abcdef-other").unwrap();
        assert_ne!(a.public_key(), c.public_key());
    }

    #[test]
    fn short_secrets_are_refused() {
        assert!(ClusterKey::from_secret(b"short").is_none());
        assert!(ClusterKey::from_secret(b"   \n").is_none());
    }

    #[test]
    fn a_proof_is_bound_to_the_key_and_the_peer() {
        let key = ClusterKey::from_secret(b"0123456789abcdef-secret").unwrap();
        let other = ClusterKey::from_secret(b"0123456789abcdef-other").unwrap();
        let proof = key.prove("peer-a");
        assert!(key.verifies("peer-a", &proof));
        assert!(ClusterKey::verify(&key.public_key(), "peer-a", &proof));
        assert!(!key.verifies("peer-b", &proof), "replayed by another peer");
        assert!(!other.verifies("peer-a", &proof), "another cluster's key");
        assert!(!key.verifies("peer-a", &proof[..10]), "truncated");
        assert!(!ClusterKey::verify(&[0u8; 5], "peer-a", &proof));
    }

    #[test]
    fn files_are_read_with_limits_and_debug_hides_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "0123456789abcdef-secret\n").unwrap();
        let key = ClusterKey::from_file(&path).unwrap();
        assert!(!format!("{key:?}").contains("secret"));
        std::fs::write(&path, "tiny").unwrap();
        let e = ClusterKey::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("at least 16"), "{e}");
        std::fs::write(&path, vec![b'x'; 5000]).unwrap();
        assert!(matches!(
            ClusterKey::from_file(&path),
            Err(ClusterKeyError::TooLarge { .. })
        ));
        assert!(matches!(
            ClusterKey::from_file(&dir.path().join("missing")),
            Err(ClusterKeyError::Read { .. })
        ));
    }
}
