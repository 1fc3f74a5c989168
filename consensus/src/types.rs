//! The Raft type configuration and the commands the replicated state machine applies.

use std::io::Cursor;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A Raft node id. Derived from the node's peer id by [`node_id_for`]; the registry refuses a
/// second peer whose id collides with a member's.
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The openraft type configuration of the agentmesh cluster.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = RaftNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The openraft handle for our type configuration.
pub(crate) type Raft = openraft::Raft<TypeConfig>;

/// How Raft reaches a node: its peer id and the addresses it listens on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftNode {
    /// The libp2p peer id, in its usual base58 form.
    pub peer_id: String,
    /// Multiaddresses the node listens on.
    pub addrs: Vec<String>,
}

impl std::fmt::Display for RaftNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.peer_id)
    }
}

/// The Raft node id of a peer: the first 8 bytes of SHA-256 over a domain tag and the peer id.
pub fn node_id_for(peer_id: &str) -> NodeId {
    let digest = Sha256::new()
        .chain_update(b"agentmesh/raft-node-id/v1\0")
        .chain_update(peer_id.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// Whether a member takes part in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// A member; the leader keeps it in the Raft membership.
    Active,
    /// Left gracefully; the leader removes it from the Raft membership. It may come back as
    /// itself (same identity) without a token.
    Left,
    /// Removed by an admin; the leader takes it out of the Raft membership and the other
    /// members stop serving it at once. It needs a new join token to come back.
    Removed,
}

/// One member of the registry: who it is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// Raft node id, derived from the peer id.
    pub node_id: NodeId,
    /// libp2p peer id.
    pub peer_id: String,
    /// Ed25519 public key of the node's identity (verifies the join tokens it issues).
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// Human-readable name.
    pub name: String,
    /// Listen addresses.
    pub addrs: Vec<String>,
    /// Unix seconds when it (last) joined.
    pub joined_at: u64,
    /// Active or left.
    pub state: MemberState,
    /// Its published X25519 sealing keys, oldest first, the current one last; the older ones
    /// stay so that what it sealed before a rotation still opens (and verifies).
    #[serde(default)]
    pub seal_keys: Vec<SealKey>,
}

/// Sealing keys a member record keeps: the current one and fifteen before it.
pub const SEAL_KEYS_KEPT: usize = 16;

/// A member's X25519 public key for per-peer sealing, signed with its identity key so that no
/// other member (not even the leader) can publish a key in its name.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealKey {
    /// The X25519 public key.
    #[serde(with = "serde_bytes")]
    pub public: Vec<u8>,
    /// When the member made it (unix ms); a key must be newer than the one it replaces.
    pub created_at_ms: u64,
    /// Ed25519 signature by the member's identity key over node id, key and time.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealKey")
            .field("public", &hex::encode(&self.public))
            .field("created_at_ms", &self.created_at_ms)
            .finish_non_exhaustive()
    }
}

const SEAL_KEY_DOMAIN: &[u8] = b"agentmesh/seal-key/v1\0";

impl SealKey {
    fn signed_bytes(node_id: NodeId, public: &[u8], created_at_ms: u64) -> Vec<u8> {
        let mut m = SEAL_KEY_DOMAIN.to_vec();
        m.extend_from_slice(&node_id.to_be_bytes());
        m.extend_from_slice(&(public.len() as u32).to_be_bytes());
        m.extend_from_slice(public);
        m.extend_from_slice(&created_at_ms.to_be_bytes());
        m
    }

    /// `public`, made at `created_at_ms`, signed by the member `node_id` with its identity key.
    pub fn sign(
        identity: &ed25519_dalek::SigningKey,
        node_id: NodeId,
        public: [u8; 32],
        created_at_ms: u64,
    ) -> Self {
        use ed25519_dalek::Signer as _;
        let signature = identity.sign(&Self::signed_bytes(node_id, &public, created_at_ms));
        Self {
            public: public.to_vec(),
            created_at_ms,
            signature: signature.to_bytes().to_vec(),
        }
    }

    /// Whether this is a well-formed key signed for `node_id` by the identity key
    /// `identity_public`.
    pub fn verify(&self, node_id: NodeId, identity_public: &[u8]) -> bool {
        use ed25519_dalek::Verifier as _;
        let (Ok(key), Ok(sig), Ok(_)) = (
            <[u8; 32]>::try_from(identity_public),
            <[u8; 64]>::try_from(self.signature.as_slice()),
            <[u8; 32]>::try_from(self.public.as_slice()),
        ) else {
            return false;
        };
        let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(&key) else {
            return false;
        };
        key.verify(
            &Self::signed_bytes(node_id, &self.public, self.created_at_ms),
            &ed25519_dalek::Signature::from_bytes(&sig),
        )
        .is_ok()
    }

    /// Whether the key can share a secret at all: a low-order point gives the all-zero
    /// X25519 output whatever the (clamped) scalar. Deterministic, so fit for `apply`.
    pub fn usable(&self) -> bool {
        self.public_bytes()
            .is_some_and(|p| x25519_dalek::x25519([1; 32], p) != [0; 32])
    }

    /// The public key as an array (checked when the key was accepted).
    pub fn public_bytes(&self) -> Option<[u8; 32]> {
        self.public.as_slice().try_into().ok()
    }
}

impl MemberRecord {
    /// How Raft reaches this member.
    pub fn raft_node(&self) -> RaftNode {
        RaftNode {
            peer_id: self.peer_id.clone(),
            addrs: self.addrs.clone(),
        }
    }
}

/// The single-use part of a join token, checked and consumed in the state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUse {
    /// The token's random nonce.
    #[serde(with = "serde_bytes")]
    pub nonce: Vec<u8>,
    /// Unix seconds after which the token is refused.
    pub expires_at: u64,
    /// The member that signed it (checked by the leader); a registered token must match.
    #[serde(default)]
    pub issuer: Option<NodeId>,
}

/// A command replicated through Raft and applied, in log order, on every member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Command {
    /// Names the cluster; the first command of a new cluster. Ignored once a cluster id is set.
    Found {
        /// Random cluster id.
        cluster_id: String,
        /// The founding members: one for a cluster founded alone, the `--bootstrap-expect`
        /// set for one founded by key holders.
        members: Vec<MemberRecord>,
        /// Public half of the cluster key, when founded with one: nodes proving they hold the
        /// key may then join without a token.
        #[serde(default, with = "serde_bytes")]
        cluster_key: Option<Vec<u8>>,
    },
    /// Admits a member, consuming a join token unless it is a former member coming back.
    Join {
        /// The new member.
        member: MemberRecord,
        /// The token it presented; `None` for a member that left and returns as itself.
        token: Option<TokenUse>,
        /// The leader's clock when it proposed the join (unix seconds), so that every member
        /// judges expiry the same way.
        now: u64,
        /// Admitted on a cluster-key proof (checked by the leader) instead of a token.
        #[serde(default)]
        by_key: bool,
    },
    /// Marks a member as left; the leader then takes it out of the Raft membership.
    Leave {
        /// The member leaving.
        node_id: NodeId,
    },
    /// Removes a member (an admin's decision, unlike [`Command::Leave`]).
    Remove {
        /// The member removed.
        node_id: NodeId,
    },
    /// Renames a member.
    Rename {
        /// The member.
        node_id: NodeId,
        /// Its new name.
        name: String,
    },
    /// Publishes a member's new sealing key (signed by the member itself).
    SetSealKey {
        /// The member.
        node_id: NodeId,
        /// Its new key.
        key: SealKey,
    },
    /// Records a member's current listen addresses.
    SetAddrs {
        /// The member.
        node_id: NodeId,
        /// Its listen addresses.
        addrs: Vec<String>,
    },
    /// Writes a key.
    KvPut {
        /// Key.
        key: String,
        /// JSON text of the value.
        value: String,
        /// Compare-and-set: apply only if the key's version is this (0 = must not exist).
        if_version: Option<u64>,
    },
    /// Several commands proposed together, applied in order as if one by one: the leader
    /// groups concurrent writes so they share one log entry and one flush.
    Batch(Vec<Command>),
    /// Changes a training job.
    Job(crate::jobs::JobCommand),
    /// Deletes a key.
    KvDelete {
        /// Key.
        key: String,
        /// Compare-and-set: apply only if the key's version is this.
        if_version: Option<u64>,
    },
    /// Creates or revokes an API key.
    ApiKey(crate::access::ApiKeyCommand),
    /// Registers a join token an admin issued, so that a cluster whose admin changes need an
    /// API key ([`crate::access::ADMIN_REQUIRES_KEY`]) admits only with registered tokens.
    IssueToken {
        /// The token's nonce.
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
        /// The member that signed it.
        issuer: NodeId,
        /// When it expires (unix seconds).
        expires_at: u64,
        /// The issuer's clock when it issued it (unix seconds): registered tokens that expired
        /// by then are forgotten.
        issued_at: u64,
    },
    /// Applies `cmd` and records `entry` in the audit log with the outcome.
    Audited {
        /// Who, when, what; the outcome is filled in when applied.
        entry: crate::access::AuditEntry,
        /// The change itself (not a batch).
        cmd: Box<Command>,
    },
    /// Records things that happened outside the state machine (a token issued, requests
    /// refused) in the audit log; at most [`crate::access::MAX_AUDIT_BATCH`] entries.
    Audit(Vec<crate::access::AuditEntry>),
}

impl Command {
    /// Whether this is an admin change: API keys, removals, join tokens and `security.*`
    /// settings. With [`crate::access::ADMIN_REQUIRES_KEY`] on, only an admin API key makes
    /// one (see `cluster/forwarded.rs` and `state.rs`).
    pub fn is_admin_change(&self) -> bool {
        match self {
            Command::Remove { .. } | Command::ApiKey(_) | Command::IssueToken { .. } => true,
            Command::KvPut { key, .. } | Command::KvDelete { key, .. } => {
                key.starts_with(crate::access::SECURITY_PREFIX)
            }
            Command::Batch(cmds) => cmds.iter().any(Command::is_admin_change),
            Command::Audited { cmd, .. } => cmd.is_admin_change(),
            _ => false,
        }
    }

    /// Whether this turns [`crate::access::ADMIN_REQUIRES_KEY`] on.
    pub fn turns_on_admin_keys(&self) -> bool {
        match self {
            Command::KvPut { key, value, .. } => {
                key == crate::access::ADMIN_REQUIRES_KEY && crate::state::setting_on(value)
            }
            Command::Batch(cmds) => cmds.iter().any(Command::turns_on_admin_keys),
            Command::Audited { cmd, .. } => cmd.turns_on_admin_keys(),
            _ => false,
        }
    }
}

/// The result of applying a [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandResult {
    /// Applied; nothing to report.
    Done,
    /// A key was written; its new version.
    Written {
        /// The key's version: the log index of the write.
        version: u64,
    },
    /// A delete was applied.
    Deleted {
        /// Whether the key existed.
        existed: bool,
    },
    /// Not applied, and why.
    Rejected(Rejection),
    /// One result per command of a [`Command::Batch`], in order.
    Batch(Vec<CommandResult>),
}

/// Why the state machine refused a command. Deterministic: every member reaches the same verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    /// Compare-and-set failed.
    #[error("version mismatch on {key:?}: expected {expected}, found {}", .actual.map_or("none".to_string(), |v| v.to_string()))]
    VersionMismatch {
        /// Key.
        key: String,
        /// The version the writer expected.
        expected: u64,
        /// The key's version, if it exists.
        actual: Option<u64>,
    },
    /// The join token has been used already.
    #[error("join token already used")]
    TokenUsed,
    /// The join token expired.
    #[error("join token expired")]
    TokenExpired,
    /// Another member's id collides with the joining node's.
    #[error("node id {node_id} is taken by peer {peer_id}")]
    NodeIdTaken {
        /// The colliding id.
        node_id: NodeId,
        /// The member holding it.
        peer_id: String,
    },
    /// The node is not a member.
    #[error("node {0} is not a member")]
    NotMember(NodeId),
    /// A former member tried to come back without a token, but it was not a member that left.
    #[error("not a former member; a join token is needed")]
    TokenRequired,
    /// A removed member asked to come back without a new token.
    #[error("this node was removed from the cluster; it needs a new join token")]
    Removed,
    /// A node joined by cluster key, but the cluster was founded without one.
    #[error("this cluster has no cluster key; join with a token")]
    NoClusterKey,
    /// No job has this id.
    #[error("no job {0}")]
    NoSuchJob(String),
    /// The job change does not fit the job's state.
    #[error("job: {0}")]
    JobConflict(String),
    /// A batch inside a batch.
    #[error("nested batches are not allowed")]
    NestedBatch,
    /// The store is full.
    #[error("kv store full: {what}")]
    QuotaExceeded {
        /// Which limit.
        what: String,
    },
    /// No API key has this id.
    #[error("no API key {0}")]
    NoSuchApiKey(String),
    /// An API key with this id exists already.
    #[error("API key id {0} is taken")]
    ApiKeyExists(String),
    /// An admin change without an admin API key, in a cluster that needs one.
    #[error("admin change refused: {0}")]
    NotAdmin(String),
    /// A join token that no admin registered, in a cluster that admits only with those.
    #[error(
        "this join token was not issued with an admin API key, and this cluster takes only \
         those ({key} is on)",
        key = crate::access::ADMIN_REQUIRES_KEY
    )]
    TokenNotRegistered,
    /// The command cannot be applied as given.
    #[error("malformed command: {0}")]
    Malformed(String),
}
