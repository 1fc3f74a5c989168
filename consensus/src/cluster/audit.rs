//! The cluster side of API keys and the audit log: creating and revoking keys, checking a
//! presented key, writing audit entries (at once, or coalesced for floods of refusals) and
//! reading the log.

use std::collections::BTreeMap;
use std::sync::{Mutex, Weak};
use std::time::Duration;

use super::{Cluster, ClusterError, Inner};
use crate::access::{
    api_key_id, generate_api_key, key_matches, ApiKeyCommand, ApiKeyRecord, AuditEntry, Credential,
    NewApiKey, Role, MAX_AUDIT_BATCH,
};
use crate::rpc::{ClientOp, ClientReply};
use crate::state::ClusterState;
use crate::types::{Command, CommandResult};

/// Most audit entries one read returns.
pub const MAX_AUDIT_READ: u32 = 1000;
/// How long a key's creation or revocation waits for this node to apply it.
const APPLY_WAIT: Duration = Duration::from_secs(5);
/// How often coalesced audit entries are written.
const FLUSH_EVERY: Duration = Duration::from_secs(2);
/// Distinct coalesced entries held between flushes; beyond this they are counted only.
const MAX_PENDING: usize = 64;

/// Audit entries waiting to be written, merged by everything but time and count, so a flood
/// of refused requests costs one entry per kind every [`FLUSH_EVERY`], not one per request.
#[derive(Default)]
pub(super) struct AuditBuffer {
    pending: BTreeMap<(String, String, String, String), (AuditEntry, u64)>,
    /// Entries that did not fit in `pending`.
    overflow: u64,
}

impl AuditBuffer {
    pub(super) fn add(&mut self, entry: AuditEntry) {
        let key = (
            entry.actor.clone(),
            entry.action.clone(),
            entry.target.clone(),
            entry.detail.clone(),
        );
        if let Some((_, n)) = self.pending.get_mut(&key) {
            *n += 1;
        } else if self.pending.len() < MAX_PENDING {
            self.pending.insert(key, (entry, 1));
        } else {
            self.overflow += 1;
        }
    }

    /// Everything pending, as entries whose detail carries the count.
    fn take(&mut self, via: &str) -> Vec<AuditEntry> {
        let mut out: Vec<AuditEntry> = std::mem::take(&mut self.pending)
            .into_values()
            .map(|(mut e, n)| {
                if n > 1 {
                    e.detail = format!("{} (x{n})", e.detail);
                }
                e
            })
            .collect();
        if self.overflow > 0 {
            out.push(
                AuditEntry::new(
                    unix_ms(),
                    "various",
                    via,
                    "audit.overflow",
                    "",
                    &format!("{} more events not itemized", self.overflow),
                )
                .with_outcome("refused"),
            );
            self.overflow = 0;
        }
        out
    }

    fn put_back(&mut self, entries: Vec<AuditEntry>) {
        for e in entries {
            self.add(e);
        }
    }
}

/// Entries after `after`, at or after `since_ms`, oldest first, at most `limit`.
pub(super) fn select(
    state: &ClusterState,
    after: u64,
    since_ms: u64,
    limit: u32,
) -> Vec<AuditEntry> {
    state
        .audit
        .range(after.saturating_add(1)..)
        .map(|(_, e)| e)
        .filter(|e| e.at_ms >= since_ms)
        .take(limit.min(MAX_AUDIT_READ) as usize)
        .cloned()
        .collect()
}

pub(super) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// An audit entry stamped now, seen by `via`.
pub(super) fn entry_now(
    via: &str,
    actor: &str,
    action: &str,
    target: &str,
    detail: &str,
) -> AuditEntry {
    AuditEntry::new(unix_ms(), actor, via, action, target, detail)
}

impl Cluster {
    /// An audit entry stamped with this node's clock and peer id as `via`.
    pub fn audit_entry(&self, actor: &str, action: &str, target: &str, detail: &str) -> AuditEntry {
        AuditEntry::new(
            unix_ms(),
            actor,
            &self.inner.identity.peer_id,
            action,
            target,
            detail,
        )
    }

    /// Applies `cmd` through Raft and records `entry` with its outcome, in one log entry: the
    /// change and its audit record commit together or not at all.
    pub async fn write_audited(
        &self,
        entry: AuditEntry,
        cmd: Command,
    ) -> Result<CommandResult, ClusterError> {
        self.write_audited_as(entry, cmd, None).await
    }

    /// [`Cluster::write_audited`] for a caller that presented `credential`: an admin change
    /// in a cluster with [`ADMIN_REQUIRES_KEY`](crate::access::ADMIN_REQUIRES_KEY) on needs
    /// one, and `entry` must name it.
    pub async fn write_audited_as(
        &self,
        entry: AuditEntry,
        cmd: Command,
        credential: Option<&Credential>,
    ) -> Result<CommandResult, ClusterError> {
        let cmd = Command::Audited {
            entry,
            cmd: Box::new(cmd),
        };
        self.write_as(cmd, credential).await
    }

    /// Writes audit entries now; returns once they are committed.
    pub async fn audit(&self, entries: Vec<AuditEntry>) -> Result<(), ClusterError> {
        for chunk in entries.chunks(MAX_AUDIT_BATCH) {
            self.write(Command::Audit(chunk.to_vec())).await?;
        }
        Ok(())
    }

    /// Queues an audit entry to be written within a few seconds, merged with others like it.
    /// For events that can come in floods (refused requests), where one Raft write each would
    /// let an attacker drive the log.
    pub fn audit_later(&self, entry: AuditEntry) {
        self.inner.audit_later(entry);
    }

    /// Reads the audit log linearizably: entries after sequence `after`, at or after
    /// `since_ms`, oldest first, at most `limit` (capped at [`MAX_AUDIT_READ`]).
    pub async fn audit_log(
        &self,
        after: u64,
        since_ms: u64,
        limit: u32,
    ) -> Result<Vec<AuditEntry>, ClusterError> {
        let op = ClientOp::Audit {
            after,
            since_ms,
            limit: limit.min(MAX_AUDIT_READ),
        };
        match self.inner.execute(op).await? {
            ClientReply::Audit(entries) => Ok(entries),
            other => Err(ClusterError::Raft(format!("unexpected reply {other:?}"))),
        }
    }

    /// Creates an API key with `role` for `actor`, who presented `credential`; the returned
    /// key is the only copy of it. Returns once this node has applied it (or after
    /// [`APPLY_WAIT`] if it lags).
    pub async fn create_api_key(
        &self,
        name: &str,
        role: Role,
        actor: &str,
        credential: Option<&Credential>,
    ) -> Result<NewApiKey, ClusterError> {
        if name.len() > crate::state::MAX_NAME_LEN || name.chars().any(char::is_control) {
            return Err(ClusterError::Invalid(format!(
                "key name must be at most {} bytes of printable text",
                crate::state::MAX_NAME_LEN
            )));
        }
        let new = generate_api_key(name, role, actor, unix_ms());
        let entry = self.audit_entry(actor, "apikey.create", &new.record.id, role.as_str());
        let cmd = Command::ApiKey(ApiKeyCommand::Create(new.record.clone()));
        self.write_audited_as(entry, cmd, credential).await?;
        // So the key works on the node that made it as soon as the caller has it. If this
        // node lags, the key is returned anyway: it is committed, and this is its only copy.
        let id = new.record.id.clone();
        self.wait_applied_here(APPLY_WAIT, |s| s.api_keys.contains_key(&id))
            .await;
        Ok(new)
    }

    /// Revokes an API key everywhere (`actor` asked for it, presenting `credential`): each node refuses it once it has applied the revocation.
    /// Returns once this node has (so the node asked refuses the key from then on), or after
    /// [`APPLY_WAIT`] if it lags.
    pub async fn revoke_api_key(
        &self,
        id: &str,
        actor: &str,
        credential: Option<&Credential>,
    ) -> Result<(), ClusterError> {
        let entry = self.audit_entry(actor, "apikey.revoke", id, "");
        let cmd = Command::ApiKey(ApiKeyCommand::Revoke {
            id: id.to_string(),
            at_ms: unix_ms(),
        });
        self.write_audited_as(entry, cmd, credential).await?;
        let applied = self
            .wait_applied_here(APPLY_WAIT, |s| {
                s.api_keys
                    .get(id)
                    .is_some_and(|k| k.revoked_at_ms.is_some())
            })
            .await;
        if applied {
            Ok(())
        } else {
            Err(ClusterError::Unavailable(format!(
                "key {id} is revoked in the cluster, but this node has not applied it within \
                 {APPLY_WAIT:?}; it may still accept the key until it does"
            )))
        }
    }

    /// All API key records, revoked ones included, from this node's applied state.
    pub fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, ClusterError> {
        self.read(|s| s.api_keys.values().cloned().collect())
    }

    /// The record of a valid (well-formed, known, unrevoked) key, from this node's applied
    /// state.
    pub fn authenticate(&self, key: &str) -> Option<ApiKeyRecord> {
        let id = api_key_id(key)?;
        self.read(|s| s.api_keys.get(id).filter(|r| key_matches(r, key)).cloned())
            .ok()
            .flatten()
    }
}

/// Writes coalesced audit entries every [`FLUSH_EVERY`] while this node is in a cluster with a
/// leader; entries that fail to commit go back in the buffer.
pub(super) async fn flush_loop(inner: Weak<Inner>) {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(inner) = inner.upgrade() else { break };
        let cluster = Cluster { inner };
        if !cluster.has_leader() {
            continue;
        }
        let entries = match cluster.inner.audit_buffer.lock() {
            Ok(mut b) => b.take(&cluster.inner.identity.peer_id),
            Err(_) => {
                tracing::warn!("audit buffer poisoned");
                Vec::new()
            }
        };
        if entries.is_empty() {
            continue;
        }
        // Chunk by chunk, so that after a failure only what did not commit is retried.
        for (i, chunk) in entries.chunks(MAX_AUDIT_BATCH).enumerate() {
            if let Err(e) = cluster.write(Command::Audit(chunk.to_vec())).await {
                tracing::warn!(error = %e, "writing audit entries; retrying");
                if let Ok(mut b) = cluster.inner.audit_buffer.lock() {
                    b.put_back(entries[i * MAX_AUDIT_BATCH..].to_vec());
                }
                break;
            }
        }
    }
}

/// The buffer type, for `Inner`.
pub(super) type SharedAuditBuffer = Mutex<AuditBuffer>;

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(target: &str) -> AuditEntry {
        AuditEntry::new(1, "anonymous", "n", "auth.rejected", target, "no key")
            .with_outcome("refused")
    }

    #[test]
    fn floods_coalesce_into_counted_entries() {
        let mut b = AuditBuffer::default();
        for _ in 0..5 {
            b.add(refused("127.0.0.1"));
        }
        b.add(refused("10.0.0.1"));
        let out = b.take("n");
        assert_eq!(out.len(), 2);
        assert!(out.iter().any(|e| e.detail == "no key (x5)"));
        assert!(out.iter().any(|e| e.detail == "no key"));
        assert!(b.take("n").is_empty());
    }

    #[test]
    fn the_buffer_is_bounded() {
        let mut b = AuditBuffer::default();
        for i in 0..(MAX_PENDING + 10) {
            b.add(refused(&format!("10.0.{}.{}", i / 256, i % 256)));
        }
        let out = b.take("n");
        assert_eq!(out.len(), MAX_PENDING + 1);
        let last = out.last().map(|e| e.detail.clone()).unwrap_or_default();
        assert_eq!(last, "10 more events not itemized");
    }
}
