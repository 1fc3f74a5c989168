//! The replicated state: member registry, versioned key-value configuration and used join
//! tokens. Pure and deterministic: every member applies the same commands to the same state and
//! reaches the same results. Persistence lives in `store.rs`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::access::{
    ApiKeyCommand, ApiKeyRecord, AuditEntry, Role, ADMIN_REQUIRES_KEY, MAX_API_KEYS,
    MAX_AUDIT_BATCH, MAX_AUDIT_ENTRIES, MAX_AUDIT_REFUSALS,
};
use crate::jobs::{JobRecord, TrainerInfo};
use crate::types::{
    Command, CommandResult, MemberRecord, MemberState, NodeId, Rejection, SealKey, SEAL_KEYS_KEPT,
};

/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 256;
/// Largest value, as JSON text, in bytes.
pub const MAX_VALUE_LEN: usize = 64 * 1024;
/// All keys and values together may not exceed this many bytes (the snapshot travels whole).
pub const MAX_KV_BYTES: usize = 64 * 1024 * 1024;
/// Most members the registry holds.
pub const MAX_MEMBERS: usize = 1024;
/// Longest member name, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Most registered join tokens not yet used or expired.
pub const MAX_ISSUED_TOKENS: usize = 4096;

/// A stored value and its version (the cluster revision of the write that produced it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvEntry {
    /// JSON text.
    pub value: String,
    /// Revision of the last write: unique and increasing across all keys.
    pub version: u64,
}

/// A consumed join token, kept until it would have expired anyway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsedToken {
    /// When the token expires (unix seconds).
    pub expires_at: u64,
    /// Who used it.
    pub node_id: NodeId,
}

/// A join token registered when an admin issued it, kept until it is used or expires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedToken {
    /// When the token expires (unix seconds).
    pub expires_at: u64,
    /// The member that signed it.
    pub issuer: NodeId,
}

/// Whether a stored setting's JSON text means on.
pub(crate) fn setting_on(value: &str) -> bool {
    value.trim() == "true"
}

/// Something `apply` changed, so the store can persist exactly that.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Touched {
    ClusterId,
    Revision,
    Member(NodeId),
    Kv(String),
    Token(Vec<u8>),
    Issued(Vec<u8>),
    Job(String),
    Trainer(NodeId),
    ApiKey(String),
    Audit(u64),
}

/// The whole replicated state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    /// Set by the first `Found` command.
    pub cluster_id: Option<String>,
    /// Public half of the cluster key, if the cluster was founded with one.
    #[serde(default, with = "serde_bytes")]
    pub cluster_key: Option<Vec<u8>>,
    /// Member registry by node id.
    pub members: BTreeMap<NodeId, MemberRecord>,
    /// Key-value configuration.
    pub kv: BTreeMap<String, KvEntry>,
    /// Bumped by every key write or delete; a key's version is the revision that wrote it.
    pub revision: u64,
    /// Consumed join-token nonces.
    #[serde(with = "token_map")]
    pub used_tokens: BTreeMap<Vec<u8>, UsedToken>,
    /// Registered join tokens ([`Command::IssueToken`]) not yet used or expired.
    #[serde(default, with = "token_map")]
    pub issued_tokens: BTreeMap<Vec<u8>, IssuedToken>,
    /// Training jobs by id.
    #[serde(default)]
    pub jobs: BTreeMap<String, JobRecord>,
    /// Nodes that can train, and on what.
    #[serde(default)]
    pub trainers: BTreeMap<NodeId, TrainerInfo>,
    /// API keys by id, revoked ones included.
    #[serde(default)]
    pub api_keys: BTreeMap<String, ApiKeyRecord>,
    /// The last [`MAX_AUDIT_ENTRIES`] audit entries by sequence number.
    #[serde(default)]
    pub audit: BTreeMap<u64, AuditEntry>,
    /// Bytes held by keys and values, for the quota.
    #[serde(skip)]
    kv_bytes: usize,
    /// Audit entries that are refusals, for their cap.
    #[serde(skip)]
    audit_refusals: usize,
}

impl ClusterState {
    /// Recomputes derived fields after loading.
    pub(crate) fn rebuild(&mut self) {
        self.kv_bytes = self.kv.iter().map(|(k, v)| k.len() + v.value.len()).sum();
        self.audit_refusals = self.audit.values().filter(|e| e.is_refusal()).count();
    }

    /// Whether admin changes need a replicated admin API key ([`ADMIN_REQUIRES_KEY`]).
    pub fn admin_requires_key(&self) -> bool {
        self.kv
            .get(ADMIN_REQUIRES_KEY)
            .is_some_and(|e| setting_on(&e.value))
    }

    /// Whether `actor` names an unrevoked admin API key.
    fn is_admin_key(&self, actor: &str) -> bool {
        actor
            .strip_prefix("apikey:")
            .and_then(|id| self.api_keys.get(id))
            .is_some_and(|k| k.role == Role::Admin && k.revoked_at_ms.is_none())
    }

    /// The rules for an admin change recorded by `actor` (`None`: not audited), decided
    /// here as well as by the leader, so that nothing committed between the leader's check
    /// and this entry (a revocation, the setting turned on) lets it through. With
    /// [`ADMIN_REQUIRES_KEY`] on, or to turn it on, the change must be audited in the name of
    /// an unrevoked admin key (the leader checked the caller holds it), and the last admin
    /// key stays.
    fn admin_rule(&self, cmd: &Command, actor: Option<&str>) -> Result<(), Rejection> {
        if !cmd.is_admin_change() || !(self.admin_requires_key() || cmd.turns_on_admin_keys()) {
            return Ok(());
        }
        if !actor.is_some_and(|a| self.is_admin_key(a)) {
            return Err(Rejection::NotAdmin(format!(
                "{ADMIN_REQUIRES_KEY} is on (or being turned on): this change must be made \
                 with an admin API key"
            )));
        }
        if let Command::ApiKey(ApiKeyCommand::Revoke { id, .. }) = cmd {
            let others = self
                .api_keys
                .values()
                .any(|k| k.id != *id && k.role == Role::Admin && k.revoked_at_ms.is_none());
            if !others {
                return Err(Rejection::NotAdmin(format!(
                    "key {id} is the last admin API key: revoking it would leave no one able \
                     to make admin changes; create another or turn {ADMIN_REQUIRES_KEY} off \
                     first"
                )));
            }
        }
        Ok(())
    }

    /// Applies `cmd`, recording what changed in `touched`.
    pub(crate) fn apply(&mut self, cmd: &Command, touched: &mut Vec<Touched>) -> CommandResult {
        // Audited admin changes are checked with their actor, in `apply_one`.
        if !matches!(cmd, Command::Audited { .. } | Command::Batch(_)) {
            if let Err(r) = self.admin_rule(cmd, None) {
                return CommandResult::Rejected(r);
            }
        }
        self.apply_one(cmd, touched)
    }

    fn apply_one(&mut self, cmd: &Command, touched: &mut Vec<Touched>) -> CommandResult {
        match cmd {
            Command::Batch(cmds) => CommandResult::Batch(
                cmds.iter()
                    .map(|c| match c {
                        // Batches are flat: the leader never nests them.
                        Command::Batch(_) => CommandResult::Rejected(Rejection::NestedBatch),
                        c => self.apply(c, touched),
                    })
                    .collect(),
            ),
            Command::Found {
                cluster_id,
                members,
                cluster_key,
            } => {
                if self.cluster_id.is_none() {
                    self.cluster_id = Some(cluster_id.clone());
                    self.cluster_key.clone_from(cluster_key);
                    touched.push(Touched::ClusterId);
                    for member in members.iter().take(MAX_MEMBERS) {
                        self.members.insert(member.node_id, member.clone());
                        touched.push(Touched::Member(member.node_id));
                    }
                }
                CommandResult::Done
            }
            Command::Join {
                member,
                token,
                now,
                by_key,
            } => {
                if *by_key && self.cluster_key.is_none() {
                    return CommandResult::Rejected(Rejection::NoClusterKey);
                }
                self.join(member, token.as_ref(), *by_key, *now, touched)
            }
            Command::Leave { node_id } => {
                if self
                    .members
                    .get(node_id)
                    .is_some_and(|m| m.state == MemberState::Removed)
                {
                    // A removed member's own leave must not turn it into one that may return.
                    return CommandResult::Done;
                }
                self.update_member(*node_id, touched, |m| m.state = MemberState::Left)
            }
            Command::Remove { node_id } => {
                self.update_member(*node_id, touched, |m| m.state = MemberState::Removed)
            }
            Command::Rename { node_id, name } => {
                self.update_member(*node_id, touched, |m| m.name.clone_from(name))
            }
            Command::SetSealKey { node_id, key } => self.set_seal_key(*node_id, key, touched),
            Command::SetAddrs { node_id, addrs } => {
                self.update_member(*node_id, touched, |m| m.addrs.clone_from(addrs))
            }
            Command::KvPut {
                key,
                value,
                if_version,
            } => {
                if let Err(r) = self.check_version(key, *if_version) {
                    return CommandResult::Rejected(r);
                }
                if key == ADMIN_REQUIRES_KEY && setting_on(value) && !self.admin_requires_key() {
                    // Tokens registered until now were registered on a member's word.
                    let nonces: Vec<Vec<u8>> = self.issued_tokens.keys().cloned().collect();
                    self.issued_tokens.clear();
                    touched.extend(nonces.into_iter().map(Touched::Issued));
                }
                let current = self.kv.get(key);
                let old = current.map_or(0, |e| key.len() + e.value.len());
                let new_total = self.kv_bytes - old + key.len() + value.len();
                if new_total > MAX_KV_BYTES {
                    return CommandResult::Rejected(Rejection::QuotaExceeded {
                        what: format!("{MAX_KV_BYTES} bytes of keys and values"),
                    });
                }
                self.kv_bytes = new_total;
                self.revision += 1;
                touched.push(Touched::Revision);
                let version = self.revision;
                self.kv.insert(
                    key.clone(),
                    KvEntry {
                        value: value.clone(),
                        version,
                    },
                );
                touched.push(Touched::Kv(key.clone()));
                CommandResult::Written { version }
            }
            Command::Job(job) => self.apply_job(job, touched),
            Command::IssueToken {
                nonce,
                issuer,
                expires_at,
                issued_at,
            } => {
                let token = IssuedToken {
                    expires_at: *expires_at,
                    issuer: *issuer,
                };
                self.register_token(nonce, token, *issued_at, touched)
            }
            Command::ApiKey(cmd) => self.apply_api_key(cmd, touched),
            Command::Audited { entry, cmd } => {
                let result = match cmd.as_ref() {
                    Command::Batch(_) | Command::Audited { .. } | Command::Audit(_) => {
                        CommandResult::Rejected(Rejection::Malformed(
                            "an audited command must be a single change".into(),
                        ))
                    }
                    c => match self.admin_rule(c, Some(&entry.actor)) {
                        Ok(()) => self.apply_one(c, touched),
                        Err(r) => CommandResult::Rejected(r),
                    },
                };
                let outcome = match &result {
                    CommandResult::Rejected(r) => format!("refused: {r}"),
                    _ => "ok".to_string(),
                };
                self.record_audit(entry.clone().with_outcome(&outcome), touched);
                result
            }
            Command::Audit(entries) => {
                if entries.len() > MAX_AUDIT_BATCH {
                    return CommandResult::Rejected(Rejection::Malformed(format!(
                        "more than {MAX_AUDIT_BATCH} audit entries in one command"
                    )));
                }
                for e in entries {
                    self.record_audit(e.clone(), touched);
                }
                CommandResult::Done
            }
            Command::KvDelete { key, if_version } => {
                if let Err(r) = self.check_version(key, *if_version) {
                    return CommandResult::Rejected(r);
                }
                match self.kv.remove(key) {
                    Some(e) => {
                        self.kv_bytes -= key.len() + e.value.len();
                        self.revision += 1;
                        touched.push(Touched::Revision);
                        touched.push(Touched::Kv(key.clone()));
                        CommandResult::Deleted { existed: true }
                    }
                    None => CommandResult::Deleted { existed: false },
                }
            }
        }
    }

    fn apply_api_key(&mut self, cmd: &ApiKeyCommand, touched: &mut Vec<Touched>) -> CommandResult {
        match cmd {
            ApiKeyCommand::Create(record) => {
                if self.api_keys.contains_key(&record.id) {
                    return CommandResult::Rejected(Rejection::ApiKeyExists(record.id.clone()));
                }
                if self.api_keys.len() >= MAX_API_KEYS {
                    return CommandResult::Rejected(Rejection::QuotaExceeded {
                        what: format!("{MAX_API_KEYS} API keys"),
                    });
                }
                if record.hash.len() != 32 {
                    return CommandResult::Rejected(Rejection::Malformed(
                        "an API key hash is 32 bytes".into(),
                    ));
                }
                self.api_keys.insert(record.id.clone(), record.clone());
                touched.push(Touched::ApiKey(record.id.clone()));
                CommandResult::Done
            }
            ApiKeyCommand::Revoke { id, at_ms } => match self.api_keys.get_mut(id) {
                Some(k) => {
                    // Revoking twice keeps the first time.
                    k.revoked_at_ms.get_or_insert(*at_ms);
                    touched.push(Touched::ApiKey(id.clone()));
                    CommandResult::Done
                }
                None => CommandResult::Rejected(Rejection::NoSuchApiKey(id.clone())),
            },
        }
    }

    /// Registers an issued join token, forgetting those expired at `now`.
    fn register_token(
        &mut self,
        nonce: &[u8],
        token: IssuedToken,
        now: u64,
        touched: &mut Vec<Touched>,
    ) -> CommandResult {
        self.forget_expired_tokens(now, touched);
        if nonce.is_empty() || nonce.len() > 64 {
            return CommandResult::Rejected(Rejection::Malformed(
                "a token nonce is 1 to 64 bytes".into(),
            ));
        }
        if self.issued_tokens.len() >= MAX_ISSUED_TOKENS {
            return CommandResult::Rejected(Rejection::QuotaExceeded {
                what: format!("{MAX_ISSUED_TOKENS} unused join tokens"),
            });
        }
        if self.issued_tokens.contains_key(nonce) || self.used_tokens.contains_key(nonce) {
            return CommandResult::Rejected(Rejection::Malformed(
                "this token nonce is registered already".into(),
            ));
        }
        self.issued_tokens.insert(nonce.to_vec(), token);
        touched.push(Touched::Issued(nonce.to_vec()));
        CommandResult::Done
    }

    /// Forgets used and registered tokens expired at `now`: they can never be presented
    /// again.
    fn forget_expired_tokens(&mut self, now: u64, touched: &mut Vec<Touched>) {
        for nonce in expired(&self.used_tokens, now, |u| u.expires_at) {
            self.used_tokens.remove(&nonce);
            touched.push(Touched::Token(nonce));
        }
        for nonce in expired(&self.issued_tokens, now, |t| t.expires_at) {
            self.issued_tokens.remove(&nonce);
            touched.push(Touched::Issued(nonce));
        }
    }

    /// Appends an audit entry with the next sequence number. Beyond [`MAX_AUDIT_REFUSALS`]
    /// refusals the oldest refusal goes; beyond [`MAX_AUDIT_ENTRIES`] the oldest entry.
    fn record_audit(&mut self, entry: AuditEntry, touched: &mut Vec<Touched>) {
        let seq = self.audit.last_key_value().map_or(1, |(s, _)| s + 1);
        let mut entry = entry.clipped();
        entry.seq = seq;
        if entry.is_refusal() {
            self.audit_refusals += 1;
        }
        self.audit.insert(seq, entry);
        touched.push(Touched::Audit(seq));
        if self.audit_refusals > MAX_AUDIT_REFUSALS {
            let oldest = self
                .audit
                .iter()
                .find(|(_, e)| e.is_refusal())
                .map(|(s, _)| *s);
            if let Some(old) = oldest {
                self.audit.remove(&old);
                self.audit_refusals -= 1;
                touched.push(Touched::Audit(old));
            }
        }
        while self.audit.len() > MAX_AUDIT_ENTRIES {
            if let Some((old, e)) = self.audit.pop_first() {
                if e.is_refusal() {
                    self.audit_refusals -= 1;
                }
                touched.push(Touched::Audit(old));
            }
        }
    }

    /// Changes one member's record, or refuses if it is not a member.
    fn update_member(
        &mut self,
        node_id: NodeId,
        touched: &mut Vec<Touched>,
        change: impl FnOnce(&mut MemberRecord),
    ) -> CommandResult {
        match self.members.get_mut(&node_id) {
            Some(m) => {
                change(m);
                touched.push(Touched::Member(node_id));
                CommandResult::Done
            }
            None => CommandResult::Rejected(Rejection::NotMember(node_id)),
        }
    }

    /// Accepts a member's new sealing key if the member signed it and it is newer than the
    /// member's current one; keeps the last [`SEAL_KEYS_KEPT`].
    fn set_seal_key(
        &mut self,
        node_id: NodeId,
        key: &SealKey,
        touched: &mut Vec<Touched>,
    ) -> CommandResult {
        let Some(m) = self.members.get_mut(&node_id) else {
            return CommandResult::Rejected(Rejection::NotMember(node_id));
        };
        if m.state == MemberState::Removed {
            return CommandResult::Rejected(Rejection::Removed);
        }
        if !key.verify(node_id, &m.public_key) {
            return CommandResult::Rejected(Rejection::Malformed(
                "the sealing key is not signed by the member's identity key".into(),
            ));
        }
        if !key.usable() {
            return CommandResult::Rejected(Rejection::Malformed(
                "the sealing key is a low-order point (it would share no secret)".into(),
            ));
        }
        if let Some(last) = m.seal_keys.last() {
            if last == key {
                return CommandResult::Done;
            }
            if key.created_at_ms <= last.created_at_ms {
                return CommandResult::Rejected(Rejection::Malformed(
                    "the sealing key is not newer than the member's current one".into(),
                ));
            }
        }
        m.seal_keys.push(key.clone());
        let extra = m.seal_keys.len().saturating_sub(SEAL_KEYS_KEPT);
        m.seal_keys.drain(..extra);
        touched.push(Touched::Member(node_id));
        CommandResult::Done
    }

    /// Compare-and-set: `if_version` must be the key's version (0: the key must not exist).
    fn check_version(&self, key: &str, if_version: Option<u64>) -> Result<(), Rejection> {
        let Some(expected) = if_version else {
            return Ok(());
        };
        let actual = self.kv.get(key).map(|e| e.version);
        if actual.unwrap_or(0) == expected {
            Ok(())
        } else {
            Err(Rejection::VersionMismatch {
                key: key.to_string(),
                expected,
                actual,
            })
        }
    }

    fn join(
        &mut self,
        member: &MemberRecord,
        token: Option<&crate::types::TokenUse>,
        by_key: bool,
        now: u64,
        touched: &mut Vec<Touched>,
    ) -> CommandResult {
        if let Some(existing) = self.members.get(&member.node_id) {
            if existing.peer_id != member.peer_id {
                return CommandResult::Rejected(Rejection::NodeIdTaken {
                    node_id: member.node_id,
                    peer_id: existing.peer_id.clone(),
                });
            }
            if existing.public_key != member.public_key {
                // A peer id is its identity key: a record pairing them otherwise is forged.
                return CommandResult::Rejected(Rejection::Malformed(
                    "the identity key does not match the member's".into(),
                ));
            }
        }
        let former = self.members.get(&member.node_id);
        if former.is_some_and(|m| m.state == MemberState::Removed) {
            // Only a token issued after the removal brings a removed member back: not the
            // cluster key, and not the token it first joined with.
            let fresh = token.is_some_and(|t| !self.used_tokens.contains_key(&t.nonce));
            if !fresh {
                return CommandResult::Rejected(Rejection::Removed);
            }
        }
        match token {
            None if by_key => {
                if former.is_none() && self.members.len() >= MAX_MEMBERS {
                    return CommandResult::Rejected(Rejection::QuotaExceeded {
                        what: format!("{MAX_MEMBERS} members"),
                    });
                }
            }
            None => {
                // Only a member that is known (left, or active but re-announcing itself) may
                // come back without a token.
                if former.is_none() {
                    return CommandResult::Rejected(Rejection::TokenRequired);
                }
            }
            Some(t) => {
                if let Some(used) = self.used_tokens.get(&t.nonce) {
                    // A retried join by the node that used the token is not a reuse.
                    if used.node_id != member.node_id {
                        return CommandResult::Rejected(Rejection::TokenUsed);
                    }
                } else {
                    if now >= t.expires_at {
                        return CommandResult::Rejected(Rejection::TokenExpired);
                    }
                    if former.is_none() && self.members.len() >= MAX_MEMBERS {
                        return CommandResult::Rejected(Rejection::QuotaExceeded {
                            what: format!("{MAX_MEMBERS} members"),
                        });
                    }
                    // With admin changes behind API keys, a member's signature on a token is
                    // not enough: an admin must have registered it, signed by that member
                    // (a member knows every registered nonce; it cannot sign as another).
                    let registered = self.issued_tokens.get(&t.nonce).is_some_and(|r| {
                        Some(r.issuer) == t.issuer && r.expires_at == t.expires_at
                    });
                    if self.admin_requires_key() && !registered {
                        return CommandResult::Rejected(Rejection::TokenNotRegistered);
                    }
                    if self.issued_tokens.remove(&t.nonce).is_some() {
                        touched.push(Touched::Issued(t.nonce.clone()));
                    }
                    self.used_tokens.insert(
                        t.nonce.clone(),
                        UsedToken {
                            expires_at: t.expires_at,
                            node_id: member.node_id,
                        },
                    );
                    touched.push(Touched::Token(t.nonce.clone()));
                }
            }
        }
        self.forget_expired_tokens(now, touched);
        let mut record = member.clone();
        record.state = MemberState::Active;
        // Sealing keys come only from the member itself, signed ([`Command::SetSealKey`]):
        // whatever a join record carries is ignored.
        record.seal_keys.clear();
        if let Some(former) = self.members.get(&member.node_id) {
            // Coming back keeps the name it had (a rename is replicated, the flag is not),
            // and the sealing keys it published.
            record.name.clone_from(&former.name);
            record.seal_keys.clone_from(&former.seal_keys);
        }
        self.members.insert(record.node_id, record);
        touched.push(Touched::Member(member.node_id));
        CommandResult::Done
    }

    /// Active members.
    pub fn active_members(&self) -> impl Iterator<Item = &MemberRecord> {
        self.members
            .values()
            .filter(|m| m.state == MemberState::Active)
    }
}

/// CBOR maps keyed by byte strings: serialize the map as a list of pairs.
/// The nonces in `map` whose token expired at `now`.
fn expired<T>(
    map: &BTreeMap<Vec<u8>, T>,
    now: u64,
    expires_at: impl Fn(&T) -> u64,
) -> Vec<Vec<u8>> {
    map.iter()
        .filter(|(_, t)| expires_at(t) <= now)
        .map(|(n, _)| n.clone())
        .collect()
}

mod token_map {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// One entry; `used` is the field name the first version of the snapshot format had.
    #[derive(Serialize, Deserialize)]
    struct Pair<T> {
        #[serde(with = "serde_bytes")]
        nonce: Vec<u8>,
        used: T,
    }

    pub(super) fn serialize<S: Serializer, T: Serialize + Clone>(
        map: &BTreeMap<Vec<u8>, T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let pairs: Vec<Pair<T>> = map
            .iter()
            .map(|(n, u)| Pair {
                nonce: n.clone(),
                used: u.clone(),
            })
            .collect();
        pairs.serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        d: D,
    ) -> Result<BTreeMap<Vec<u8>, T>, D::Error> {
        let pairs = Vec::<Pair<T>>::deserialize(d)?;
        Ok(pairs.into_iter().map(|p| (p.nonce, p.used)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::TokenUse;

    fn member(id: NodeId, peer: &str) -> MemberRecord {
        MemberRecord {
            node_id: id,
            peer_id: peer.into(),
            public_key: vec![0; 32],
            name: peer.into(),
            addrs: vec![],
            joined_at: 0,
            state: MemberState::Active,
            seal_keys: Vec::new(),
        }
    }

    /// A cluster `c` founded by member 1 (`p1`), without a cluster key.
    fn founded() -> ClusterState {
        let mut s = ClusterState::default();
        s.apply(
            &Command::Found {
                cluster_id: "c".into(),
                members: vec![member(1, "p1")],
                cluster_key: None,
            },
            &mut Vec::new(),
        );
        s
    }

    fn apply(s: &mut ClusterState, _step: u64, cmd: Command) -> CommandResult {
        s.apply(&cmd, &mut Vec::new())
    }

    fn audited(action: &str, cmd: Command) -> Command {
        Command::Audited {
            entry: AuditEntry::new(7, "apikey:abc", "node", action, "t", ""),
            cmd: Box::new(cmd),
        }
    }

    #[test]
    fn only_a_member_publishes_its_sealing_keys_and_only_newer_ones() {
        let identity = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let other = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
        let mut s = ClusterState {
            cluster_key: Some(vec![0; 32]),
            ..ClusterState::default()
        };
        // A key smuggled into a join record is dropped: keys come only through SetSealKey.
        let m = member(1, "a");
        let joined = Command::Join {
            member: MemberRecord {
                public_key: identity.verifying_key().to_bytes().to_vec(),
                seal_keys: vec![SealKey::sign(&identity, 1, [1; 32], 5)],
                ..m
            },
            token: None,
            now: 0,
            by_key: true,
        };
        assert_eq!(apply(&mut s, 2, joined), CommandResult::Done);
        assert!(s.members[&1].seal_keys.is_empty());
        // A join record pairing the member's peer id with another identity key is forged.
        let imposter = Command::Join {
            member: MemberRecord {
                public_key: other.verifying_key().to_bytes().to_vec(),
                ..member(1, "a")
            },
            token: None,
            now: 0,
            by_key: true,
        };
        assert!(matches!(
            apply(&mut s, 2, imposter),
            CommandResult::Rejected(Rejection::Malformed(_))
        ));

        let set = |key| Command::SetSealKey { node_id: 1, key };
        // Signed by someone else, or for another node: refused.
        for forged in [
            SealKey::sign(&other, 1, [2; 32], 10),
            SealKey::sign(&identity, 2, [2; 32], 10),
        ] {
            assert!(matches!(
                apply(&mut s, 3, set(forged)),
                CommandResult::Rejected(Rejection::Malformed(_))
            ));
        }
        let k1 = SealKey::sign(&identity, 1, [2; 32], 10);
        let k2 = SealKey::sign(&identity, 1, [3; 32], 20);
        let k3 = SealKey::sign(&identity, 1, [4; 32], 30);
        assert_eq!(apply(&mut s, 4, set(k1.clone())), CommandResult::Done);
        assert_eq!(apply(&mut s, 5, set(k1.clone())), CommandResult::Done);
        assert_eq!(apply(&mut s, 6, set(k2.clone())), CommandResult::Done);
        // Replaying the older key (to make senders use it again) is refused.
        assert!(matches!(
            apply(&mut s, 7, set(k1.clone())),
            CommandResult::Rejected(Rejection::Malformed(_))
        ));
        assert_eq!(apply(&mut s, 8, set(k3.clone())), CommandResult::Done);
        assert_eq!(s.members[&1].seal_keys, vec![k1, k2, k3.clone()]);
        // A low-order key would share no secret: refused.
        assert!(matches!(
            apply(&mut s, 8, set(SealKey::sign(&identity, 1, [0; 32], 35))),
            CommandResult::Rejected(Rejection::Malformed(_))
        ));
        // A removed member publishes nothing more.
        apply(&mut s, 9, Command::Remove { node_id: 1 });
        assert_eq!(
            apply(&mut s, 10, set(SealKey::sign(&identity, 1, [5; 32], 40))),
            CommandResult::Rejected(Rejection::Removed)
        );
        assert_eq!(s.members[&1].seal_keys.last(), Some(&k3));
    }

    #[test]
    fn api_keys_are_created_once_and_revoked_for_good() {
        let mut s = ClusterState::default();
        let new = crate::access::generate_api_key("ci", crate::access::Role::Operator, "x", 1);
        let create = Command::ApiKey(ApiKeyCommand::Create(new.record.clone()));
        assert_eq!(apply(&mut s, 1, create.clone()), CommandResult::Done);
        assert_eq!(
            apply(&mut s, 2, create),
            CommandResult::Rejected(Rejection::ApiKeyExists(new.record.id.clone()))
        );
        let revoke = |at_ms| {
            Command::ApiKey(ApiKeyCommand::Revoke {
                id: new.record.id.clone(),
                at_ms,
            })
        };
        assert_eq!(apply(&mut s, 3, revoke(10)), CommandResult::Done);
        assert_eq!(apply(&mut s, 4, revoke(20)), CommandResult::Done);
        assert_eq!(s.api_keys[&new.record.id].revoked_at_ms, Some(10));
        assert!(!crate::access::key_matches(
            &s.api_keys[&new.record.id],
            &new.key
        ));
        let unknown = Command::ApiKey(ApiKeyCommand::Revoke {
            id: "nope".into(),
            at_ms: 1,
        });
        assert_eq!(
            apply(&mut s, 5, unknown),
            CommandResult::Rejected(Rejection::NoSuchApiKey("nope".into()))
        );
        let mut bad = new.record.clone();
        bad.id = "other".into();
        bad.hash = vec![1, 2, 3];
        assert!(matches!(
            apply(&mut s, 6, Command::ApiKey(ApiKeyCommand::Create(bad))),
            CommandResult::Rejected(Rejection::Malformed(_))
        ));
    }

    #[test]
    fn audited_commands_record_their_outcome() {
        let mut s = ClusterState::default();
        let put = Command::KvPut {
            key: "a".into(),
            value: "1".into(),
            if_version: Some(5),
        };
        let r = apply(&mut s, 1, audited("kv.put", put));
        assert!(matches!(
            r,
            CommandResult::Rejected(Rejection::VersionMismatch { .. })
        ));
        let leave = Command::Leave { node_id: 9 };
        let _ = apply(&mut s, 2, audited("member.leave", leave));
        let nested = audited("x", Command::Batch(vec![]));
        assert!(matches!(
            apply(&mut s, 3, nested),
            CommandResult::Rejected(Rejection::Malformed(_))
        ));
        let log: Vec<_> = s.audit.values().collect();
        assert_eq!(log.len(), 3);
        assert_eq!(log.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert!(log[0].outcome.starts_with("refused: version mismatch"));
        assert_eq!(log[1].outcome, "refused: node 9 is not a member");
        assert_eq!(log[0].actor, "apikey:abc");
        assert_eq!(log[0].at_ms, 7);
    }

    #[test]
    fn the_audit_log_keeps_the_newest_entries() {
        let mut s = ClusterState::default();
        let mut touched = Vec::new();
        let note = AuditEntry::new(1, "a", "v", "token.issue", "t", "");
        for _ in 0..(MAX_AUDIT_ENTRIES + 5) {
            s.apply(&Command::Audit(vec![note.clone()]), &mut touched);
        }
        assert_eq!(s.audit.len(), MAX_AUDIT_ENTRIES);
        assert_eq!(s.audit.keys().next(), Some(&6));
        let last = (MAX_AUDIT_ENTRIES + 5) as u64;
        assert_eq!(s.audit.keys().last(), Some(&last));
        // The dropped ones are among what the store must delete.
        assert!(touched.contains(&Touched::Audit(1)));
        let too_many = Command::Audit(vec![note; MAX_AUDIT_BATCH + 1]);
        assert!(matches!(
            s.apply(&too_many, &mut touched),
            CommandResult::Rejected(Rejection::Malformed(_))
        ));
    }

    #[test]
    fn a_flood_of_refusals_never_evicts_the_record_of_changes() {
        let mut s = ClusterState::default();
        let mut touched = Vec::new();
        let change = AuditEntry::new(1, "admin-key", "v", "apikey.create", "k", "admin");
        s.apply(&Command::Audit(vec![change]), &mut touched);
        let refused = AuditEntry::new(2, "client:10.0.0.9", "v", "auth.rejected", "GET", "")
            .with_outcome("refused: 401");
        for _ in 0..(MAX_AUDIT_ENTRIES + 10) {
            s.apply(&Command::Audit(vec![refused.clone()]), &mut touched);
        }
        assert_eq!(s.audit.len(), MAX_AUDIT_REFUSALS + 1);
        assert_eq!(
            s.audit.values().filter(|e| e.is_refusal()).count(),
            MAX_AUDIT_REFUSALS
        );
        assert_eq!(
            s.audit.get(&1).map(|e| e.action.as_str()),
            Some("apikey.create")
        );
        // The derived count survives a reload.
        let mut reloaded = s.clone();
        reloaded.audit_refusals = 0;
        reloaded.rebuild();
        assert_eq!(reloaded.audit_refusals, MAX_AUDIT_REFUSALS);
    }

    #[test]
    fn versions_are_revisions_and_cas_checks_them() {
        let mut s = ClusterState::default();
        let put = |v: &str, if_version| Command::KvPut {
            key: "a".into(),
            value: v.into(),
            if_version,
        };
        let del = |if_version| Command::KvDelete {
            key: "a".into(),
            if_version,
        };
        assert_eq!(
            apply(&mut s, 0, put("1", Some(0))),
            CommandResult::Written { version: 1 }
        );
        assert!(matches!(
            apply(&mut s, 0, put("2", Some(0))),
            CommandResult::Rejected(Rejection::VersionMismatch {
                actual: Some(1),
                ..
            })
        ));
        assert_eq!(
            apply(&mut s, 0, put("3", Some(1))),
            CommandResult::Written { version: 2 }
        );
        assert_eq!(s.kv["a"].value, "3");
        assert!(matches!(
            apply(&mut s, 0, del(Some(1))),
            CommandResult::Rejected(_)
        ));
        assert_eq!(
            apply(&mut s, 0, del(Some(2))),
            CommandResult::Deleted { existed: true }
        );
        assert_eq!(s.kv_bytes, 0);
        assert_eq!(s.revision, 3);
    }

    #[test]
    fn a_batch_applies_in_order_with_distinct_versions() {
        let mut s = ClusterState::default();
        let put = |v: &str, if_version| Command::KvPut {
            key: "k".into(),
            value: v.into(),
            if_version,
        };
        let batch = Command::Batch(vec![
            put("1", Some(0)),
            put("2", Some(1)),
            put("stale", Some(1)),
            Command::Batch(vec![]),
        ]);
        let CommandResult::Batch(results) = apply(&mut s, 0, batch) else {
            panic!("a batch yields a batch result");
        };
        assert_eq!(results[0], CommandResult::Written { version: 1 });
        assert_eq!(results[1], CommandResult::Written { version: 2 });
        assert!(matches!(
            results[2],
            CommandResult::Rejected(Rejection::VersionMismatch { .. })
        ));
        assert_eq!(results[3], CommandResult::Rejected(Rejection::NestedBatch));
        assert_eq!(s.kv["k"].value, "2");
    }

    #[test]
    fn a_token_admits_one_node_once() {
        let mut s = founded();
        let token = TokenUse {
            nonce: vec![7; 16],
            expires_at: 100,
            issuer: None,
        };
        let join = |id, peer: &str, now| Command::Join {
            member: member(id, peer),
            token: Some(token.clone()),
            now,
            by_key: false,
        };
        assert_eq!(apply(&mut s, 2, join(2, "p2", 10)), CommandResult::Done);
        assert_eq!(
            apply(&mut s, 3, join(3, "p3", 10)),
            CommandResult::Rejected(Rejection::TokenUsed)
        );
        // The same node retrying its own join is fine.
        assert_eq!(apply(&mut s, 4, join(2, "p2", 11)), CommandResult::Done);
        let late = Command::Join {
            member: member(4, "p4"),
            token: Some(TokenUse {
                nonce: vec![8; 16],
                expires_at: 100,
                issuer: None,
            }),
            now: 100,
            by_key: false,
        };
        assert_eq!(
            apply(&mut s, 5, late),
            CommandResult::Rejected(Rejection::TokenExpired)
        );
        assert_eq!(s.active_members().count(), 2);
    }

    #[test]
    fn with_admin_keys_required_only_an_admin_key_changes_things_and_registers_tokens() {
        let mut s = founded();
        let key = |id: &str, role| {
            let mut k = crate::access::generate_api_key(id, role, "local", 1).record;
            k.id = id.into();
            Command::ApiKey(ApiKeyCommand::Create(k))
        };
        let by = |actor: &str, cmd: Command| Command::Audited {
            entry: AuditEntry::new(7, actor, "node", "x", "t", ""),
            cmd: Box::new(cmd),
        };
        let join = |id, peer: &str, nonce: u8, issuer, now| Command::Join {
            member: member(id, peer),
            token: Some(TokenUse {
                nonce: vec![nonce; 16],
                expires_at: 100,
                issuer: Some(issuer),
            }),
            now,
            by_key: false,
        };
        let register = |nonce: u8, issued_at| Command::IssueToken {
            nonce: vec![nonce; 16],
            issuer: 1,
            expires_at: 100,
            issued_at,
        };
        let setting = |on: bool| Command::KvPut {
            key: ADMIN_REQUIRES_KEY.into(),
            value: on.to_string(),
            if_version: None,
        };
        let refused = |r: CommandResult| matches!(r, CommandResult::Rejected(_));
        // Off: a member's signature is enough, registered or not.
        assert_eq!(
            apply(&mut s, 2, join(2, "p2", 1, 1, 10)),
            CommandResult::Done
        );
        assert_eq!(
            apply(&mut s, 3, by("local", register(9, 10))),
            CommandResult::Done
        );
        // Turning it on takes an admin key, which must exist.
        assert!(refused(apply(&mut s, 4, setting(true))));
        assert!(refused(apply(&mut s, 5, by("apikey:a1", setting(true)))));
        apply(&mut s, 6, by("local", key("a1", Role::Admin)));
        apply(&mut s, 7, by("local", key("o1", Role::Operator)));
        assert!(refused(apply(&mut s, 8, by("apikey:o1", setting(true)))));
        assert!(!s.admin_requires_key());
        assert!(!refused(apply(&mut s, 9, by("apikey:a1", setting(true)))));
        assert!(s.admin_requires_key());
        // Tokens registered on a member's word before are void.
        assert!(s.issued_tokens.is_empty());
        // On: no member's word, bare or audited, makes an admin change.
        assert!(refused(apply(&mut s, 10, register(2, 10))));
        assert!(refused(apply(&mut s, 11, by("local", register(2, 10)))));
        assert!(refused(apply(
            &mut s,
            12,
            by("apikey:o1", key("x", Role::Admin))
        )));
        assert!(refused(apply(&mut s, 13, by("local", setting(false)))));
        // An unregistered token does not admit; a registered one only as signed by its issuer.
        assert_eq!(
            apply(&mut s, 14, join(3, "p3", 2, 1, 10)),
            CommandResult::Rejected(Rejection::TokenNotRegistered)
        );
        let r = apply(&mut s, 15, by("apikey:a1", register(2, 10)));
        assert!(!refused(r));
        assert_eq!(
            apply(&mut s, 16, join(3, "p3", 2, 2, 10)),
            CommandResult::Rejected(Rejection::TokenNotRegistered)
        );
        assert_eq!(
            apply(&mut s, 17, join(3, "p3", 2, 1, 11)),
            CommandResult::Done
        );
        // Used: gone from the registered set, and not usable again by another node.
        assert!(s.issued_tokens.is_empty());
        assert_eq!(
            apply(&mut s, 18, join(4, "p4", 2, 1, 12)),
            CommandResult::Rejected(Rejection::TokenUsed)
        );
        // Registered tokens that expired are forgotten at the next registration.
        assert!(!refused(apply(
            &mut s,
            19,
            by("apikey:a1", register(3, 20))
        )));
        assert!(!refused(apply(
            &mut s,
            20,
            by("apikey:a1", register(4, 100))
        )));
        assert_eq!(s.issued_tokens.len(), 1);
        // The last admin key stays; once another exists it may go, and then it counts for
        // nothing (a change checked before the revocation fails when it applies).
        let revoke = |id: &str| {
            Command::ApiKey(ApiKeyCommand::Revoke {
                id: id.into(),
                at_ms: 5,
            })
        };
        assert!(refused(apply(&mut s, 21, by("apikey:a1", revoke("a1")))));
        assert!(!refused(apply(
            &mut s,
            22,
            by("apikey:a1", key("a2", Role::Admin))
        )));
        assert!(!refused(apply(&mut s, 23, by("apikey:a2", revoke("a1")))));
        assert!(refused(apply(&mut s, 24, by("apikey:a1", setting(false)))));
        assert!(refused(apply(&mut s, 25, by("apikey:a2", revoke("a2")))));
        assert!(!refused(apply(&mut s, 26, by("apikey:a2", setting(false)))));
        assert!(!s.admin_requires_key());
        // And the registry survives a snapshot round trip.
        let mut bytes = Vec::new();
        ciborium::into_writer(&s, &mut bytes).expect("encode");
        let back: ClusterState = ciborium::from_reader(bytes.as_slice()).expect("decode");
        assert_eq!(back.issued_tokens, s.issued_tokens);
    }

    #[test]
    fn colliding_node_ids_and_strangers_without_tokens_are_refused() {
        let mut s = founded();
        let r = apply(
            &mut s,
            2,
            Command::Join {
                member: member(1, "other"),
                token: Some(TokenUse {
                    nonce: vec![1],
                    expires_at: 9,
                    issuer: None,
                }),
                now: 0,
                by_key: false,
            },
        );
        assert!(matches!(
            r,
            CommandResult::Rejected(Rejection::NodeIdTaken { .. })
        ));
        let r = apply(
            &mut s,
            3,
            Command::Join {
                member: member(2, "p2"),
                token: None,
                now: 0,
                by_key: false,
            },
        );
        assert_eq!(r, CommandResult::Rejected(Rejection::TokenRequired));
        // A member that left comes back as itself without a token.
        apply(&mut s, 4, Command::Leave { node_id: 1 });
        assert_eq!(s.active_members().count(), 0);
        let r = apply(
            &mut s,
            5,
            Command::Join {
                member: member(1, "p1"),
                token: None,
                now: 0,
                by_key: false,
            },
        );
        assert_eq!(r, CommandResult::Done);
        assert_eq!(s.active_members().count(), 1);
    }

    #[test]
    fn a_removed_member_needs_a_token_issued_after_its_removal() {
        let mut s = ClusterState::default();
        apply(
            &mut s,
            1,
            Command::Found {
                cluster_id: "c".into(),
                members: vec![member(1, "p1")],
                cluster_key: Some(vec![0; 32]),
            },
        );
        let first = TokenUse {
            nonce: vec![1; 16],
            expires_at: 100,
            issuer: None,
        };
        let join = |token: Option<TokenUse>, by_key| Command::Join {
            member: member(2, "p2"),
            token,
            now: 10,
            by_key,
        };
        assert_eq!(
            apply(&mut s, 2, join(Some(first.clone()), false)),
            CommandResult::Done
        );
        assert_eq!(
            apply(&mut s, 3, Command::Remove { node_id: 2 }),
            CommandResult::Done
        );
        assert_eq!(s.members[&2].state, MemberState::Removed);
        // Its own leave afterwards does not make it a member that may return.
        apply(&mut s, 4, Command::Leave { node_id: 2 });
        assert_eq!(s.members[&2].state, MemberState::Removed);
        for (i, (token, by_key)) in [(None, false), (None, true), (Some(first), false)]
            .into_iter()
            .enumerate()
        {
            assert_eq!(
                apply(&mut s, 5 + i as u64, join(token, by_key)),
                CommandResult::Rejected(Rejection::Removed),
                "attempt {i}"
            );
        }
        let fresh = TokenUse {
            nonce: vec![2; 16],
            expires_at: 100,
            issuer: None,
        };
        assert_eq!(
            apply(&mut s, 9, join(Some(fresh), false)),
            CommandResult::Done
        );
        assert_eq!(s.members[&2].state, MemberState::Active);
        assert_eq!(
            apply(&mut s, 10, Command::Remove { node_id: 7 }),
            CommandResult::Rejected(Rejection::NotMember(7))
        );
    }

    #[test]
    fn key_joins_need_a_cluster_founded_with_a_key() {
        let by_key = |id, peer: &str| Command::Join {
            member: member(id, peer),
            token: None,
            now: 0,
            by_key: true,
        };
        let mut plain = ClusterState::default();
        apply(
            &mut plain,
            1,
            Command::Found {
                cluster_id: "c".into(),
                members: vec![member(1, "p1")],
                cluster_key: None,
            },
        );
        assert_eq!(
            apply(&mut plain, 2, by_key(2, "p2")),
            CommandResult::Rejected(Rejection::NoClusterKey)
        );
        let mut keyed = ClusterState::default();
        apply(
            &mut keyed,
            1,
            Command::Found {
                cluster_id: "c".into(),
                members: vec![member(1, "p1"), member(2, "p2"), member(3, "p3")],
                cluster_key: Some(vec![9; 32]),
            },
        );
        assert_eq!(keyed.active_members().count(), 3);
        assert_eq!(apply(&mut keyed, 2, by_key(4, "p4")), CommandResult::Done);
        assert_eq!(keyed.active_members().count(), 4);
        // A second Found changes nothing.
        apply(
            &mut keyed,
            3,
            Command::Found {
                cluster_id: "other".into(),
                members: vec![member(9, "p9")],
                cluster_key: None,
            },
        );
        assert_eq!(keyed.cluster_id.as_deref(), Some("c"));
        assert!(keyed.cluster_key.is_some());
    }

    #[test]
    fn the_quota_bounds_the_store() {
        let mut s = ClusterState::default();
        let big = "x".repeat(MAX_VALUE_LEN);
        let mut i = 0;
        loop {
            i += 1;
            let r = apply(
                &mut s,
                i,
                Command::KvPut {
                    key: format!("k{i}"),
                    value: big.clone(),
                    if_version: None,
                },
            );
            if let CommandResult::Rejected(Rejection::QuotaExceeded { .. }) = r {
                break;
            }
            assert!(i < 10_000, "quota never hit");
        }
        assert!(s.kv_bytes <= MAX_KV_BYTES);
    }
}
