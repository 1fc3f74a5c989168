//! Replicated cluster state for agentmesh: openraft over sled.
//!
//! The state machine holds the member registry, versioned key-value configuration and the
//! nonces of used join tokens. The crate knows nothing about libp2p: Raft RPCs leave through a
//! [`Transport`] the node provides and arrive through [`Cluster::handle_rpc`].
//!
//! # Usage
//! Start a [`Cluster`] on a data dir with the node's [`Identity`], then either
//! [`Cluster::found`] a new cluster, [`Cluster::join`] one with a token, or let key holders
//! found one together with [`Cluster::bootstrap_step`]. Any member serves
//! [`Cluster::kv_put`] and friends; operations are forwarded to the leader.

mod access;
mod bootstrap;
mod cluster;
mod cluster_key;
mod config;
mod jobs;
mod network;
mod rpc;
mod state;
mod store;
mod token;
mod types;

pub use access::{
    api_key_id, generate_api_key, hash_api_key, key_matches, ApiKeyCommand, ApiKeyRecord,
    AuditEntry, Credential, NewApiKey, Role, ADMIN_REQUIRES_KEY, API_KEY_PREFIX, MAX_API_KEYS,
    MAX_API_KEY_LEN, MAX_AUDIT_BATCH, MAX_AUDIT_ENTRIES, MAX_AUDIT_FIELD, MAX_AUDIT_REFUSALS,
    SECURITY_PREFIX,
};
pub use bootstrap::{BootstrapStep, MAX_BOOTSTRAP_EXPECT};
pub use cluster::{
    fmt_node_id, Cluster, ClusterError, Identity, MemberStatus, RaftStatus, CLIENT_TIMEOUT,
    MAX_AUDIT_READ, MAX_LIST,
};
pub use cluster_key::{ClusterKey, ClusterKeyError, MAX_CLUSTER_KEY_FILE, MIN_CLUSTER_KEY_LEN};
pub use config::{ClusterConfig, ConfigError};
pub use jobs::{
    JobCommand, JobRecord, JobState, RejectedUpdate, RoundRecord, RoundStart, RoundTiming,
    TrainerInfo, UsedUpdate, MAX_JOBS, MAX_JOB_ID_LEN, MAX_JOB_SPEC_LEN, MAX_MESSAGE_LEN,
    MAX_PARTICIPANTS, MAX_ROUNDS, MAX_ROUND_ATTEMPTS,
};
pub use network::{CallFuture, Transport, TransportError};
pub use rpc::{
    client_error, fuzz_decode_request, hostile_forwarded_admin_key, hostile_forwarded_leave,
    hostile_vote_request, refusal_reason, MAX_RPC_SIZE,
};
pub use state::{
    ClusterState, KvEntry, MAX_ISSUED_TOKENS, MAX_KEY_LEN, MAX_KV_BYTES, MAX_MEMBERS, MAX_NAME_LEN,
    MAX_VALUE_LEN,
};
pub use store::{flush_tree, Durable, Storage, MAX_SNAPSHOT_SIZE};
pub use token::{
    JoinToken, TokenBody, TokenError, MAX_TOKEN_LEN, MAX_TOKEN_TTL_SECS, TOKEN_PREFIX,
};
pub use types::{
    node_id_for, Command, CommandResult, MemberRecord, MemberState, NodeId, RaftNode, Rejection,
    SealKey, TypeConfig, SEAL_KEYS_KEPT,
};
