//! Single-use join tokens.
//!
//! A token is `amjt1_` followed by base64url (no padding) of a CBOR pair: the CBOR-encoded
//! [`TokenBody`] and an Ed25519 signature over a domain tag and those exact bytes. The issuer is a
//! member; any member checks the signature against the issuer's key in the replicated registry.
//! Single use is enforced in the state machine, which records each nonce it admits.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::types::NodeId;

/// What every token starts with (and its format version).
pub const TOKEN_PREFIX: &str = "amjt1_";
/// Longest token accepted, in characters.
pub const MAX_TOKEN_LEN: usize = 1024;
/// Longest time-to-live a token may have: 30 days.
pub const MAX_TOKEN_TTL_SECS: u64 = 30 * 24 * 3600;
const SIGNING_DOMAIN: &[u8] = b"agentmesh/join-token/v1\0";

/// Why a token was refused before it reached the state machine.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a token at all.
    #[error("malformed join token: {0}")]
    Malformed(String),
    /// The signature does not verify.
    #[error("join token signature is invalid (forged or altered)")]
    BadSignature,
    /// Issued by another cluster.
    #[error("join token belongs to cluster {token}, this is cluster {ours}")]
    ForeignCluster {
        /// The token's cluster.
        token: String,
        /// Ours.
        ours: String,
    },
    /// Expired.
    #[error("join token expired {0} seconds ago")]
    Expired(u64),
    /// The issuer is not a member (or was never one).
    #[error("join token issuer {0} is not a member of this cluster")]
    UnknownIssuer(NodeId),
}

/// The signed contents of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBody {
    /// The cluster the token admits to.
    pub cluster_id: String,
    /// Node id of the issuing member.
    pub issuer: NodeId,
    /// Unix seconds after which the token is refused.
    pub expires_at: u64,
    /// Random, makes the token single-use.
    #[serde(with = "serde_bytes")]
    pub nonce: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct Wire {
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    #[serde(with = "serde_bytes")]
    sig: Vec<u8>,
}

/// A parsed (not yet verified) join token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// Its contents.
    pub body: TokenBody,
    body_bytes: Vec<u8>,
    sig: Vec<u8>,
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut msg = SIGNING_DOMAIN.to_vec();
    msg.extend_from_slice(body);
    msg
}

impl JoinToken {
    /// Issues a token signed with `key`.
    pub fn issue(key: &SigningKey, body: TokenBody) -> String {
        let mut body_bytes = Vec::new();
        if let Err(e) = ciborium::into_writer(&body, &mut body_bytes) {
            tracing::error!(error = %e, "encoding a token body failed");
        }
        let sig = key.sign(&signed_message(&body_bytes)).to_bytes().to_vec();
        let mut wire = Vec::new();
        if let Err(e) = ciborium::into_writer(
            &Wire {
                body: body_bytes,
                sig,
            },
            &mut wire,
        ) {
            tracing::error!(error = %e, "encoding a token failed");
        }
        format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(wire))
    }

    /// Parses a token string. Checks the format only; see [`JoinToken::verify`].
    pub fn parse(token: &str) -> Result<Self, TokenError> {
        let token = token.trim();
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed(format!(
                "longer than {MAX_TOKEN_LEN} characters"
            )));
        }
        let Some(b64) = token.strip_prefix(TOKEN_PREFIX) else {
            return Err(TokenError::Malformed(format!(
                "does not start with {TOKEN_PREFIX}"
            )));
        };
        let raw = URL_SAFE_NO_PAD
            .decode(b64)
            .map_err(|e| TokenError::Malformed(format!("bad base64: {e}")))?;
        let wire: Wire = ciborium::from_reader(raw.as_slice())
            .map_err(|e| TokenError::Malformed(format!("bad encoding: {e}")))?;
        let body: TokenBody = ciborium::from_reader(wire.body.as_slice())
            .map_err(|e| TokenError::Malformed(format!("bad body: {e}")))?;
        if wire.sig.len() != 64 {
            return Err(TokenError::Malformed("signature is not 64 bytes".into()));
        }
        Ok(Self {
            body,
            body_bytes: wire.body,
            sig: wire.sig,
        })
    }

    /// Verifies the signature with the issuer's public key and checks cluster and expiry.
    pub fn verify(&self, issuer_key: &[u8], cluster_id: &str, now: u64) -> Result<(), TokenError> {
        let key: [u8; 32] = issuer_key
            .try_into()
            .map_err(|_| TokenError::BadSignature)?;
        let key = VerifyingKey::from_bytes(&key).map_err(|_| TokenError::BadSignature)?;
        let sig: [u8; 64] = self
            .sig
            .as_slice()
            .try_into()
            .map_err(|_| TokenError::BadSignature)?;
        key.verify_strict(
            &signed_message(&self.body_bytes),
            &Signature::from_bytes(&sig),
        )
        .map_err(|_| TokenError::BadSignature)?;
        if self.body.cluster_id != cluster_id {
            return Err(TokenError::ForeignCluster {
                token: self.body.cluster_id.clone(),
                ours: cluster_id.to_string(),
            });
        }
        if now >= self.body.expires_at {
            return Err(TokenError::Expired(now - self.body.expires_at));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(cluster: &str, expires_at: u64) -> TokenBody {
        TokenBody {
            cluster_id: cluster.into(),
            issuer: 7,
            expires_at,
            nonce: vec![1; 16],
        }
    }

    #[test]
    fn issue_parse_verify_round_trip() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let token = JoinToken::issue(&key, body("c1", 100));
        let parsed = JoinToken::parse(&token).unwrap();
        assert_eq!(parsed.body, body("c1", 100));
        let public = key.verifying_key().to_bytes();
        parsed.verify(&public, "c1", 99).unwrap();
        assert_eq!(
            parsed.verify(&public, "c1", 100),
            Err(TokenError::Expired(0))
        );
        assert!(matches!(
            parsed.verify(&public, "c2", 1),
            Err(TokenError::ForeignCluster { .. })
        ));
        let other = SigningKey::from_bytes(&[4; 32]).verifying_key().to_bytes();
        assert_eq!(
            parsed.verify(&other, "c1", 1),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn altered_tokens_fail() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let public = key.verifying_key().to_bytes();
        let token = JoinToken::issue(&key, body("c1", 100));
        // Re-sign nothing, but change the body: extend the expiry.
        let parsed = JoinToken::parse(&token).unwrap();
        let mut body_bytes = Vec::new();
        ciborium::into_writer(&body("c1", 10_000), &mut body_bytes).unwrap();
        let forged = JoinToken {
            body: body("c1", 10_000),
            body_bytes,
            sig: parsed.sig.clone(),
        };
        assert_eq!(
            forged.verify(&public, "c1", 1),
            Err(TokenError::BadSignature)
        );
        for bad in [
            "",
            "amjt1_",
            "amjt1_!!!",
            "xyz",
            &"a".repeat(5000),
            &token[..token.len() - 3],
        ] {
            assert!(JoinToken::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    proptest::proptest! {
        /// Any body survives issue and parse unchanged and verifies before its expiry with
        /// the issuer's key; changing any one character of the token makes it fail to parse
        /// or to verify, never panic and never pass.
        #[test]
        fn tokens_round_trip_and_any_change_is_caught(
            cluster in "[a-f0-9]{1,32}",
            issuer: u64,
            expires_at in 1u64..u64::MAX,
            nonce in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..64),
            seed: [u8; 32],
            at: proptest::sample::Index,
            to in proptest::char::range('!', '~'),
        ) {
            let key = SigningKey::from_bytes(&seed);
            let public = key.verifying_key().to_bytes();
            let body = TokenBody { cluster_id: cluster.clone(), issuer, expires_at, nonce };
            let token = JoinToken::issue(&key, body.clone());
            let parsed = JoinToken::parse(&token);
            proptest::prop_assert!(parsed.is_ok(), "{parsed:?}");
            if let Ok(parsed) = parsed {
                proptest::prop_assert_eq!(&parsed.body, &body);
                proptest::prop_assert_eq!(parsed.verify(&public, &cluster, expires_at - 1), Ok(()));
            }
            let mut chars: Vec<char> = token.chars().collect();
            let i = at.index(chars.len());
            if chars[i] != to {
                chars[i] = to;
                let altered: String = chars.into_iter().collect();
                let accepted = JoinToken::parse(&altered)
                    .is_ok_and(|t| t.body == body && t.verify(&public, &cluster, 0).is_ok());
                // Base64 may decode a changed last character to the same bytes; only a
                // token that still says the same and verifies would be a failure.
                let same_bytes = JoinToken::parse(&altered)
                    .is_ok_and(|t| t.body_bytes == JoinToken::parse(&token).map(|p| p.body_bytes).unwrap_or_default()
                        && t.sig == JoinToken::parse(&token).map(|p| p.sig).unwrap_or_default());
                proptest::prop_assert!(!accepted || same_bytes, "{altered:?} was accepted");
            }
        }
    }
}
