//! Who may use the API, and the record of what was done: API keys with roles and the audit
//! log. Both live in the replicated state, so every node accepts the same keys and shows the
//! same log.
//!
//! A key is `amk_<id>.<secret>`: the id names the record, the secret is 32 random bytes. The
//! state holds only SHA-256 over a domain tag and the whole key; the key itself is shown once,
//! when it is created. The secret has 256 bits of entropy, so a fast hash is enough: there is
//! nothing to guess that a slow hash would protect.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Every API key starts with this.
pub const API_KEY_PREFIX: &str = "amk_";
/// Longest API key we parse, in bytes.
pub const MAX_API_KEY_LEN: usize = 128;
/// Most API key records, revoked ones included (they stay, so the audit log can name them).
pub const MAX_API_KEYS: usize = 4096;
/// Audit entries kept; older ones are dropped first.
pub const MAX_AUDIT_ENTRIES: usize = 10_000;
/// Of those, at most this many are refusals ([`AuditEntry::is_refusal`]): a flood of refused
/// requests drops older refusals, never the records of changes.
pub const MAX_AUDIT_REFUSALS: usize = 2_000;
/// Longest text field of an audit entry, in bytes; longer text is cut.
pub const MAX_AUDIT_FIELD: usize = 256;
/// Most entries one audit command may add.
pub const MAX_AUDIT_BATCH: usize = 64;

const KEY_HASH_TAG: &[u8] = b"agentmesh/api-key/v1\0";
const ID_BYTES: usize = 6;
const SECRET_BYTES: usize = 32;

/// The cluster setting that makes admin changes need a replicated admin API key: with it on,
/// no member's word is enough to create or revoke keys, remove members, issue join tokens or
/// change `security.*` settings (see `cluster/forwarded.rs`). Off unless set to `true`.
pub const ADMIN_REQUIRES_KEY: &str = "security.admin_requires_key";
/// Settings under this prefix are admin changes.
pub const SECURITY_PREFIX: &str = "security.";

/// An API key as presented by a caller, passed to the leader with an admin change so that it
/// can check the key itself. It travels only inside the encrypted connection to the leader and
/// is never written to the log; `Debug` does not show it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Credential(String);

impl Credential {
    /// Wraps a presented API key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match api_key_id(&self.0) {
            Some(id) => write!(f, "Credential(apikey:{id})"),
            None => f.write_str("Credential(<malformed>)"),
        }
    }
}

/// What an API key may do. Each role includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads: status, peers, cluster, kv, jobs, models, blobs, events.
    Viewer,
    /// Viewer, plus jobs, kv writes, blobs and publishing.
    Operator,
    /// Operator, plus membership, join tokens, API keys, keys and the audit log.
    Admin,
}

impl Role {
    /// The role's name, as in `--role`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            other => Err(format!(
                "unknown role {other:?}: use admin, operator or viewer"
            )),
        }
    }
}

/// One API key as the cluster keeps it: never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    /// Public id, the part of the key between `amk_` and the dot.
    pub id: String,
    /// A label for people.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// SHA-256 over a domain tag and the whole key.
    #[serde(with = "serde_bytes")]
    pub hash: Vec<u8>,
    /// When it was created (unix milliseconds, the proposer's clock).
    pub created_at_ms: u64,
    /// Who created it (an audit actor).
    pub created_by: String,
    /// When it was revoked, if it was.
    pub revoked_at_ms: Option<u64>,
}

/// Changes to the API keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiKeyCommand {
    /// Adds a key; refused if the id is taken.
    Create(ApiKeyRecord),
    /// Revokes a key; it stays listed as revoked.
    Revoke {
        /// The key's id.
        id: String,
        /// When (unix milliseconds, the proposer's clock).
        at_ms: u64,
    },
}

/// A new API key: the record to replicate and the key to hand out once.
#[derive(Debug, Clone)]
pub struct NewApiKey {
    /// What the cluster stores.
    pub record: ApiKeyRecord,
    /// The key itself, `amk_<id>.<secret>`.
    pub key: String,
}

/// Makes a fresh random key.
pub fn generate_api_key(name: &str, role: Role, created_by: &str, now_ms: u64) -> NewApiKey {
    use base64::Engine as _;
    let id = hex_encode(&rand::random::<[u8; ID_BYTES]>());
    let secret = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(rand::random::<[u8; SECRET_BYTES]>());
    let key = format!("{API_KEY_PREFIX}{id}.{secret}");
    NewApiKey {
        record: ApiKeyRecord {
            hash: hash_api_key(&key).to_vec(),
            id,
            name: clip(name),
            role,
            created_at_ms: now_ms,
            created_by: clip(created_by),
            revoked_at_ms: None,
        },
        key,
    }
}

/// The stored hash of `key`.
pub fn hash_api_key(key: &str) -> [u8; 32] {
    Sha256::new()
        .chain_update(KEY_HASH_TAG)
        .chain_update(key.as_bytes())
        .finalize()
        .into()
}

/// The id of a well-formed key, or `None` for anything that is not one.
pub fn api_key_id(key: &str) -> Option<&str> {
    if key.len() > MAX_API_KEY_LEN {
        return None;
    }
    let rest = key.strip_prefix(API_KEY_PREFIX)?;
    let (id, secret) = rest.split_once('.')?;
    let id_ok = id.len() == 2 * ID_BYTES && id.bytes().all(|b| b.is_ascii_hexdigit());
    let secret_ok = !secret.is_empty()
        && secret
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    (id_ok && secret_ok).then_some(id)
}

/// Whether `key` matches `record` and the record is not revoked. Compares in constant time.
pub fn key_matches(record: &ApiKeyRecord, key: &str) -> bool {
    let hash = hash_api_key(key);
    let same = record.hash.len() == hash.len()
        && record
            .hash
            .iter()
            .zip(hash.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    same && record.revoked_at_ms.is_none()
}

/// One line of the audit log: who did what, when, through which node, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log; assigned when applied, increasing, never reused.
    #[serde(default)]
    pub seq: u64,
    /// When it happened (unix milliseconds, the clock of the node that saw it).
    pub at_ms: u64,
    /// Who: `apikey:<id>`, `admin-key`, `local`, `node:<peer id>` or `leader:<peer id>`.
    pub actor: String,
    /// The node the request came through (its peer id).
    pub via: String,
    /// What: `member.join`, `token.issue`, `apikey.create`, `job.submit`, `auth.rejected` …
    pub action: String,
    /// On what: a peer id, key id, job id or address.
    pub target: String,
    /// More about it (a role, a count, a reason).
    pub detail: String,
    /// `ok`, or `refused: <why>`.
    pub outcome: String,
}

impl AuditEntry {
    /// A new entry, its text fields cut to [`MAX_AUDIT_FIELD`].
    pub fn new(
        at_ms: u64,
        actor: &str,
        via: &str,
        action: &str,
        target: &str,
        detail: &str,
    ) -> Self {
        Self {
            seq: 0,
            at_ms,
            actor: clip(actor),
            via: clip(via),
            action: clip(action),
            target: clip(target),
            detail: clip(detail),
            outcome: "ok".into(),
        }
    }

    /// Whether this records something refused before it changed anything (a request or a
    /// join token turned away): what outsiders can cause, and so kept under its own cap.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self.action.as_str(),
            "auth.rejected" | "token.refused" | "audit.overflow"
        )
    }

    /// The same entry with another outcome.
    pub fn with_outcome(mut self, outcome: &str) -> Self {
        self.outcome = clip(outcome);
        self
    }

    /// Cuts every text field to [`MAX_AUDIT_FIELD`] (the state machine does this to whatever
    /// a proposer sent).
    pub(crate) fn clipped(mut self) -> Self {
        for f in [
            &mut self.actor,
            &mut self.via,
            &mut self.action,
            &mut self.target,
            &mut self.detail,
            &mut self.outcome,
        ] {
            if f.len() > MAX_AUDIT_FIELD {
                *f = clip(f);
            }
        }
        self
    }
}

/// `s` cut to at most [`MAX_AUDIT_FIELD`] bytes on a character boundary.
fn clip(s: &str) -> String {
    if s.len() <= MAX_AUDIT_FIELD {
        return s.to_string();
    }
    let mut end = MAX_AUDIT_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_match_only_themselves() {
        let a = generate_api_key("ci", Role::Operator, "admin-key", 1);
        let b = generate_api_key("ci", Role::Operator, "admin-key", 1);
        assert_eq!(api_key_id(&a.key), Some(a.record.id.as_str()));
        assert!(key_matches(&a.record, &a.key));
        assert!(!key_matches(&a.record, &b.key));
        assert_ne!(a.record.id, b.record.id);
        // The stored record never holds the key.
        assert!(!format!("{:?}", a.record).contains(a.key.split('.').nth(1).unwrap_or("")));
    }

    #[test]
    fn credentials_do_not_show_their_secret() {
        let a = generate_api_key("x", Role::Admin, "local", 1);
        let shown = format!("{:?}", Credential::new(a.key.clone()));
        assert_eq!(shown, format!("Credential(apikey:{})", a.record.id));
        assert_eq!(
            format!("{:?}", Credential::new("not a key")),
            "Credential(<malformed>)"
        );
    }

    #[test]
    fn revoked_keys_do_not_match() {
        let mut a = generate_api_key("x", Role::Viewer, "local", 1);
        a.record.revoked_at_ms = Some(2);
        assert!(!key_matches(&a.record, &a.key));
    }

    #[test]
    fn malformed_keys_have_no_id() {
        for bad in [
            "",
            "amk_",
            "amk_abc.def",
            "amk_0123456789ab",
            "amk_0123456789ab.",
            "amk_0123456789zz.secret",
            "amk_0123456789ab.se cret",
            "xyz_0123456789ab.secret",
        ] {
            assert_eq!(api_key_id(bad), None, "{bad:?}");
        }
        let long = format!("amk_0123456789ab.{}", "a".repeat(MAX_API_KEY_LEN));
        assert_eq!(api_key_id(&long), None);
    }

    #[test]
    fn roles_are_ordered_and_parse() {
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        for r in [Role::Viewer, Role::Operator, Role::Admin] {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("root".parse::<Role>().is_err());
    }

    #[test]
    fn audit_fields_are_cut_on_char_boundaries() {
        let long = "é".repeat(MAX_AUDIT_FIELD);
        let e = AuditEntry::new(0, &long, "", "a", "", "");
        assert!(e.actor.len() <= MAX_AUDIT_FIELD);
        assert!(e.actor.chars().all(|c| c == 'é'));
    }
}
