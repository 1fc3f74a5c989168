//! Training-job wire messages. Update announcements: what a participant publishes on gossipsub once its update blob is
//! stored. JSON (small, and easy for other implementations and tests to produce), decoded with
//! a size limit; the signature binds job, round, base model, update and example count to the
//! participant's identity key.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

/// The gossipsub topic every node subscribes to for update announcements.
pub const JOBS_TOPIC: &str = "agentmesh.jobs.v1";
/// The gossipsub topic on which a new global model is announced, so that nodes copy it before
/// the round that made it is committed (the model must outlive the node that aggregated it).
pub const MODELS_TOPIC: &str = "agentmesh.models.v1";
/// Largest announcement accepted, in bytes.
pub const MAX_ANNOUNCEMENT_SIZE: usize = 4096;
/// Version written in every announcement.
pub const ANNOUNCEMENT_VERSION: u32 = 1;
/// Domain separation for update signatures.
const SIGNING_DOMAIN: &[u8] = b"agentmesh/update/v1\0";

/// A participant's signed claim: "for this job and round, from this base model, my update is
/// the blob with this hash, trained on this many examples".
///
/// Unknown fields are ignored (they are not signed, so they can carry nothing that counts):
/// optional fields can be added without a version change, and older nodes still read newer
/// announcements.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    /// Format version.
    pub v: u32,
    /// Job id.
    pub job_id: String,
    /// Round number.
    pub round: u32,
    /// Hash of the model the update was trained from.
    pub base_model: String,
    /// Hash of the update blob (safetensors, content `update`).
    pub update_hash: String,
    /// Examples trained on (the FedAvg weight).
    pub examples: u64,
    /// The participant's Raft node id.
    pub node_id: u64,
    /// Mean training loss it saw (informational, not signed).
    pub train_loss: Option<f64>,
    /// Where the participant's time went (informational, not signed): lets the aggregator
    /// split a round's wall time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<UpdateTiming>,
    /// Ed25519 signature, hex.
    pub signature: String,
}

/// A participant's own account of its round, in seconds. Unknown fields are ignored, so
/// fields can be added without breaking older nodes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct UpdateTiming {
    /// Fetching and loading the base model.
    pub model_fetch_secs: f64,
    /// Local training.
    pub train_secs: f64,
    /// Clipping, encoding and storing the update blob.
    pub store_secs: f64,
}

impl UpdateTiming {
    /// The timing if every figure is a plausible duration (a peer's claim is only informational).
    pub fn plausible(self) -> Option<Self> {
        let ok = |v: f64| v.is_finite() && (0.0..=86_400.0).contains(&v);
        (ok(self.model_fetch_secs) && ok(self.train_secs) && ok(self.store_secs)).then_some(self)
    }
}

/// Why an announcement was refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AnnouncementError {
    /// Too large to decode.
    #[error("announcement of {0} bytes exceeds {MAX_ANNOUNCEMENT_SIZE}")]
    TooLarge(usize),
    /// Not an announcement.
    #[error("malformed announcement: {0}")]
    Malformed(String),
    /// A version this node does not speak.
    #[error("announcement version {0} is not supported")]
    Version(u32),
    /// The signature does not verify with the member's key.
    #[error("bad signature")]
    BadSignature,
}

/// The bytes a participant signs.
pub fn signed_bytes(
    job_id: &str,
    round: u32,
    base_model: &str,
    update_hash: &str,
    examples: u64,
) -> Vec<u8> {
    let mut m = SIGNING_DOMAIN.to_vec();
    for part in [job_id, base_model, update_hash] {
        m.extend_from_slice(&(part.len() as u32).to_be_bytes());
        m.extend_from_slice(part.as_bytes());
    }
    m.extend_from_slice(&round.to_be_bytes());
    m.extend_from_slice(&examples.to_be_bytes());
    m
}

/// Signs an update with the node's identity key; returns the signature bytes.
pub fn sign(
    key: &SigningKey,
    job_id: &str,
    round: u32,
    base_model: &str,
    update_hash: &str,
    examples: u64,
) -> Vec<u8> {
    key.sign(&signed_bytes(
        job_id,
        round,
        base_model,
        update_hash,
        examples,
    ))
    .to_bytes()
    .to_vec()
}

/// Checks a signature made by [`sign`] against a member's public key.
#[allow(clippy::too_many_arguments)]
pub fn verify_signature(
    public_key: &[u8],
    signature: &[u8],
    job_id: &str,
    round: u32,
    base_model: &str,
    update_hash: &str,
    examples: u64,
) -> Result<(), AnnouncementError> {
    let key: [u8; 32] = public_key
        .try_into()
        .map_err(|_| AnnouncementError::BadSignature)?;
    let key = VerifyingKey::from_bytes(&key).map_err(|_| AnnouncementError::BadSignature)?;
    let sig = Signature::from_slice(signature).map_err(|_| AnnouncementError::BadSignature)?;
    key.verify(
        &signed_bytes(job_id, round, base_model, update_hash, examples),
        &sig,
    )
    .map_err(|_| AnnouncementError::BadSignature)
}

impl Announcement {
    /// Decodes an announcement from gossip, refusing oversized or malformed ones.
    pub fn decode(bytes: &[u8]) -> Result<Self, AnnouncementError> {
        if bytes.len() > MAX_ANNOUNCEMENT_SIZE {
            return Err(AnnouncementError::TooLarge(bytes.len()));
        }
        let a: Self = serde_json::from_slice(bytes)
            .map_err(|e| AnnouncementError::Malformed(e.to_string()))?;
        if a.v != ANNOUNCEMENT_VERSION {
            return Err(AnnouncementError::Version(a.v));
        }
        Ok(a)
    }

    /// Encodes for gossip.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The signature bytes (empty if not hex).
    pub fn signature_bytes(&self) -> Vec<u8> {
        hex::decode(&self.signature).unwrap_or_default()
    }

    /// Checks the signature against the member's public key.
    pub fn verify(&self, public_key: &[u8]) -> Result<(), AnnouncementError> {
        verify_signature(
            public_key,
            &self.signature_bytes(),
            &self.job_id,
            self.round,
            &self.base_model,
            &self.update_hash,
            self.examples,
        )
    }
}

/// Most nodes a copy request may name.
pub const MAX_NOTICE_TO: usize = 8;

/// "Copy this model" (or another blob a round needs kept): sent by the aggregator before it
/// commits a round. Unknown fields are ignored, so fields can be added without breaking older
/// nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelNotice {
    /// The job.
    pub job_id: String,
    /// The model's hash.
    pub model_hash: String,
    /// `false`: "copy this model" (from the aggregator); `true`: "I hold it now" (the answer).
    #[serde(default)]
    pub have: bool,
    /// The nodes (Raft ids) asked to copy it; empty: every node. The aggregator's own
    /// update, which no other node fetches and which `job verify` needs once the aggregator
    /// is gone, goes to a few participants only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<u64>,
}

impl ModelNotice {
    /// Decodes a notice, refusing oversized or malformed ones.
    pub fn decode(bytes: &[u8]) -> Result<Self, AnnouncementError> {
        if bytes.len() > MAX_ANNOUNCEMENT_SIZE {
            return Err(AnnouncementError::TooLarge(bytes.len()));
        }
        let n: Self = serde_json::from_slice(bytes)
            .map_err(|e| AnnouncementError::Malformed(e.to_string()))?;
        if n.to.len() > MAX_NOTICE_TO {
            return Err(AnnouncementError::Malformed(format!(
                "a copy request for {} nodes, at most {MAX_NOTICE_TO}",
                n.to.len()
            )));
        }
        Ok(n)
    }
}

/// Fuzzing entry point: decodes arbitrary bytes as an announcement and as a model notice.
pub fn fuzz_decode(bytes: &[u8]) {
    let _ = Announcement::decode(bytes);
    let _ = ModelNotice::decode(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn announcement(key: &SigningKey) -> Announcement {
        let sig = sign(key, "job", 3, "base", "upd", 100);
        Announcement {
            v: 1,
            job_id: "job".into(),
            round: 3,
            base_model: "base".into(),
            update_hash: "upd".into(),
            examples: 100,
            node_id: 7,
            train_loss: Some(0.5),
            timing: Some(UpdateTiming {
                model_fetch_secs: 0.01,
                train_secs: 1.5,
                store_secs: 0.02,
            }),
            signature: hex::encode(sig),
        }
    }

    #[test]
    fn model_notices_bound_the_nodes_they_name() {
        let n = ModelNotice {
            job_id: "j".into(),
            model_hash: "m".into(),
            have: false,
            to: vec![2, 3],
        };
        let bytes = serde_json::to_vec(&n).unwrap();
        assert_eq!(ModelNotice::decode(&bytes).unwrap(), n);
        // Older notices (for everyone) and newer fields both decode.
        let old = br#"{"job_id":"j","model_hash":"m","have":true,"later":1}"#;
        assert!(ModelNotice::decode(old).unwrap().to.is_empty());
        let many = ModelNotice {
            to: vec![1; MAX_NOTICE_TO + 1],
            ..n
        };
        let bytes = serde_json::to_vec(&many).unwrap();
        assert!(matches!(
            ModelNotice::decode(&bytes),
            Err(AnnouncementError::Malformed(_))
        ));
    }

    #[test]
    fn timing_is_optional_and_implausible_figures_are_dropped() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let mut a = announcement(&key);
        assert!(a.timing.and_then(UpdateTiming::plausible).is_some());
        // Unsigned: changing it leaves the signature valid.
        a.timing = None;
        assert_eq!(a.verify(&key.verifying_key().to_bytes()), Ok(()));
        let text = String::from_utf8(a.encode()).unwrap();
        assert!(!text.contains("timing"), "{text}");
        assert_eq!(Announcement::decode(text.as_bytes()).unwrap(), a);
        for bad in [f64::NAN, -1.0, f64::INFINITY, 1e9] {
            let t = UpdateTiming {
                model_fetch_secs: 0.0,
                train_secs: bad,
                store_secs: 0.0,
            };
            assert_eq!(t.plausible(), None, "{bad}");
        }
    }

    #[test]
    fn signatures_bind_every_signed_field() {
        let key = SigningKey::from_bytes(&[3; 32]);
        let public = key.verifying_key().to_bytes();
        let a = announcement(&key);
        assert_eq!(a.verify(&public), Ok(()));
        let decoded = Announcement::decode(&a.encode()).unwrap();
        assert_eq!(decoded, a);
        let mut changed = vec![a.clone(); 5];
        changed[0].job_id = "other".into();
        changed[1].round = 4;
        changed[2].base_model = "b2".into();
        changed[3].update_hash = "u2".into();
        changed[4].examples = 1_000_000;
        for c in changed {
            assert_eq!(c.verify(&public), Err(AnnouncementError::BadSignature));
        }
        let other = SigningKey::from_bytes(&[4; 32]).verifying_key().to_bytes();
        assert_eq!(a.verify(&other), Err(AnnouncementError::BadSignature));
        assert_eq!(a.verify(&[1, 2]), Err(AnnouncementError::BadSignature));
    }

    #[test]
    fn bad_bytes_are_refused() {
        assert!(matches!(
            Announcement::decode(&vec![b' '; MAX_ANNOUNCEMENT_SIZE + 1]),
            Err(AnnouncementError::TooLarge(_))
        ));
        assert!(matches!(
            Announcement::decode(b"{\"v\":1}"),
            Err(AnnouncementError::Malformed(_))
        ));
        let mut a = announcement(&SigningKey::from_bytes(&[3; 32]));
        a.v = 9;
        assert_eq!(
            Announcement::decode(&a.encode()),
            Err(AnnouncementError::Version(9))
        );
    }
}
