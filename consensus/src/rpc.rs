//! What travels between members: Raft's own RPCs, requests forwarded to the leader, and join
//! requests from nodes that are not members yet. CBOR, decoded with a size limit.

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::bootstrap::{Decline, HelloReply};
use crate::state::KvEntry;
use crate::types::{Command, CommandResult, MemberRecord, NodeId, TypeConfig};

/// Largest RPC message: 64 entries of 64 KiB plus framing, or a 1 MiB snapshot chunk.
pub const MAX_RPC_SIZE: usize = 16 * 1024 * 1024;

/// A request from one node to another.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RpcRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A member passing a client operation to the leader.
    Forward(ClientOp),
    /// A node asking to join (or, without a token, to come back). The caller's identity is the
    /// authenticated peer the request arrived from.
    Join {
        token: Option<String>,
        name: String,
        addrs: Vec<String>,
        /// Proof of holding the cluster key, to join without a token.
        #[serde(default, with = "serde_bytes")]
        key_proof: Option<Vec<u8>>,
    },
    /// A member asking another whether it knows this node as a member (see `cluster/gate.rs`).
    IsMember {
        node_id: NodeId,
    },
    /// A node waiting to found (or join) by cluster key greeting a peer.
    Hello {
        #[serde(with = "serde_bytes")]
        key_proof: Option<Vec<u8>>,
    },
    /// The caller proposes to found a cluster with these members (see `bootstrap.rs`).
    Propose {
        round: u64,
        members: Vec<MemberRecord>,
        #[serde(with = "serde_bytes")]
        key_proof: Vec<u8>,
    },
    /// The caller gives up its proposal of this round; whoever accepted it is free again.
    Release {
        round: u64,
    },
}

/// The reply to an [`RpcRequest`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RpcResponse {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Client(Result<ClientReply, RemoteError>),
    Hello(HelloReply),
    Proposal(Result<(), Decline>),
    Released,
    IsMember(bool),
    /// The request could not be decoded or was not allowed.
    Refused(String),
}

/// An operation a client asks of the cluster; run on the leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ClientOp {
    Write(Command),
    /// A write with the API key its caller presented, for the leader to check an admin change
    /// against (see `cluster/forwarded.rs`). The key is not part of what is committed.
    WriteAs {
        cmd: Command,
        credential: Option<crate::access::Credential>,
    },
    KvGet(String),
    KvList(String),
    /// Audit entries after sequence number `after`, at or after `since_ms`, at most `limit`.
    Audit {
        after: u64,
        since_ms: u64,
        limit: u32,
    },
    Join {
        member: MemberRecord,
        token: Option<String>,
        #[serde(default, with = "serde_bytes")]
        key_proof: Option<Vec<u8>>,
    },
}

/// The leader's answer to a [`ClientOp`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ClientReply {
    Applied(CommandResult),
    Kv(Option<KvEntry>),
    KvList(Vec<(String, KvEntry)>),
    Audit(Vec<crate::access::AuditEntry>),
    Joined { cluster_id: String },
}

/// A [`crate::ClusterError`] carried back over the wire.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RemoteError {
    pub(crate) kind: RemoteErrorKind,
    pub(crate) message: String,
    /// The state machine's verdict, when that is what failed.
    pub(crate) rejection: Option<crate::types::Rejection>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RemoteErrorKind {
    NotLeader,
    Refused,
    Token,
    Unavailable,
}

pub(crate) fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::new();
    if let Err(e) = ciborium::into_writer(msg, &mut out) {
        tracing::error!(error = %e, "encoding an RPC failed");
    }
    out
}

pub(crate) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    if bytes.len() > MAX_RPC_SIZE {
        return Err(format!(
            "message of {} bytes exceeds {MAX_RPC_SIZE}",
            bytes.len()
        ));
    }
    ciborium::from_reader(bytes).map_err(|e| format!("malformed message: {e}"))
}

/// Decodes a request the way the node does on arrival; for fuzzing.
pub fn fuzz_decode_request(bytes: &[u8]) -> bool {
    decode::<RpcRequest>(bytes).is_ok()
}

/// For tests that play a hostile peer: a Raft vote request for `term` in `candidate`'s name,
/// claiming a log far ahead of anyone's (so a node that listened would grant it and step down).
#[doc(hidden)]
pub fn hostile_vote_request(term: u64, candidate: NodeId) -> Vec<u8> {
    let vote = openraft::Vote::new(term, candidate);
    let last = openraft::LogId::new(openraft::CommittedLeaderId::new(term, candidate), 1 << 40);
    encode(&RpcRequest::Vote(VoteRequest::new(vote, Some(last))))
}

/// For tests that play a compromised member: a forwarded write making `target` leave, which
/// only `target` itself may ask for.
#[doc(hidden)]
pub fn hostile_forwarded_leave(target: NodeId) -> Vec<u8> {
    encode(&RpcRequest::Forward(ClientOp::Write(
        crate::types::Command::Leave { node_id: target },
    )))
}

/// For tests that play a compromised member: a forwarded, audited write creating an admin API
/// key whose hash is `hash`, in the name of `actor`, through `via` (the member's peer id),
/// with `credential` (an API key) or none.
#[doc(hidden)]
pub fn hostile_forwarded_admin_key(
    hash: [u8; 32],
    actor: &str,
    via: &str,
    credential: Option<&str>,
) -> Vec<u8> {
    use crate::access::{ApiKeyCommand, ApiKeyRecord, AuditEntry, Credential, Role};
    let id = "0123456789ab";
    let cmd = Command::Audited {
        entry: AuditEntry::new(1, actor, via, "apikey.create", id, "admin"),
        cmd: Box::new(Command::ApiKey(ApiKeyCommand::Create(ApiKeyRecord {
            id: id.into(),
            name: "mine".into(),
            role: Role::Admin,
            hash: hash.to_vec(),
            created_at_ms: 1,
            created_by: actor.into(),
            revoked_at_ms: None,
        }))),
    };
    encode(&RpcRequest::Forward(ClientOp::WriteAs {
        cmd,
        credential: credential.map(Credential::new),
    }))
}

/// For tests: the error message, if `bytes` is a client reply that failed.
#[doc(hidden)]
pub fn client_error(bytes: &[u8]) -> Option<String> {
    match decode::<RpcResponse>(bytes) {
        Ok(RpcResponse::Client(Err(e))) => Some(e.message),
        _ => None,
    }
}

/// For tests: the reason, if `bytes` is a response refusing the request.
#[doc(hidden)]
pub fn refusal_reason(bytes: &[u8]) -> Option<String> {
    match decode::<RpcResponse>(bytes) {
        Ok(RpcResponse::Refused(reason)) => Some(reason),
        _ => None,
    }
}
