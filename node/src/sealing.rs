//! This node's sealing keys and the sealing of model updates.
//!
//! The X25519 secrets live in `seal.keys` in the data dir (mode 0600, written durably), newest
//! last. The newest one's public half is published in the registry, signed with the node's
//! identity key ([`publish`]); older secrets are kept so that what was sealed for them before a
//! rotation still opens. `agentmesh keys rotate` makes a new one ([`Sealer::rotate`]).
//!
//! A model update is sealed by its author for the cluster's voters, the nodes that may lead and
//! so aggregate the round ([`Sealer::seal_update`]); the context it is bound to names the job,
//! round, base model and author, so it opens for that round only ([`Sealer::open_update`]).

use agentmesh_consensus::{fmt_node_id, Cluster, MemberState, NodeId};
use agentmesh_protocols::seal::{self, Recipient, SealSecret};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

/// File name of the sealing keys inside the data dir.
pub const SEAL_KEYS_FILE: &str = "seal.keys";
/// Secrets kept: the current one and fifteen before it (as many as the registry lists).
const KEPT: usize = agentmesh_consensus::SEAL_KEYS_KEPT;
/// Largest key file read.
const MAX_FILE: u64 = 64 * 1024;
/// How often the publisher checks besides reacting to state changes.
const POLL: Duration = Duration::from_secs(2);

/// Why the sealing keys could not be loaded or changed.
#[derive(Debug, thiserror::Error)]
pub enum SealKeysError {
    /// The file exists but does not hold sealing keys.
    #[error(
        "sealing key file {0} is corrupted ({1}); restore it from a backup, or delete it to make \
         a new key (updates sealed for the old one will no longer open here)"
    )]
    Corrupted(PathBuf, String),
    /// File system failure.
    #[error("sealing key file {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

#[derive(Serialize, Deserialize)]
struct StoredKey {
    secret: ByteBuf,
    created_at_ms: u64,
}

/// This node's sealing secrets, and what it needs to seal and open for the cluster.
pub struct Sealer {
    path: PathBuf,
    peer_id: String,
    node_id: NodeId,
    /// Oldest first; never empty.
    keys: Mutex<Vec<(SealSecret, u64)>>,
}

impl Sealer {
    /// Loads the keys from `data_dir`, making the first one if there is none.
    pub fn load_or_create(
        data_dir: &Path,
        peer_id: String,
        node_id: NodeId,
    ) -> Result<Self, SealKeysError> {
        let path = data_dir.join(SEAL_KEYS_FILE);
        let keys = match std::fs::metadata(&path) {
            Ok(meta) if meta.len() > MAX_FILE => {
                return Err(SealKeysError::Corrupted(
                    path,
                    format!("{} bytes is more than {MAX_FILE}", meta.len()),
                ))
            }
            Ok(_) => {
                let bytes = zeroize::Zeroizing::new(
                    std::fs::read(&path).map_err(|e| SealKeysError::Io(path.clone(), e))?,
                );
                let stored: Vec<StoredKey> = ciborium::from_reader(bytes.as_slice())
                    .map_err(|e| SealKeysError::Corrupted(path.clone(), e.to_string()))?;
                let keys = stored
                    .into_iter()
                    .map(|k| {
                        let secret: [u8; 32] = k.secret.as_slice().try_into().map_err(|_| {
                            SealKeysError::Corrupted(
                                path.clone(),
                                "a secret is not 32 bytes".into(),
                            )
                        })?;
                        Ok((SealSecret::from_bytes(secret), k.created_at_ms))
                    })
                    .collect::<Result<Vec<_>, SealKeysError>>()?;
                if keys.is_empty() {
                    return Err(SealKeysError::Corrupted(path, "no keys".into()));
                }
                keys
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let keys = vec![(SealSecret::generate(), unix_ms())];
                write(&path, &keys)?;
                keys
            }
            Err(e) => return Err(SealKeysError::Io(path, e)),
        };
        Ok(Self {
            path,
            peer_id,
            node_id,
            keys: Mutex::new(keys),
        })
    }

    /// The current key and when it was made.
    pub fn current(&self) -> (SealSecret, u64) {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.last()
            .cloned()
            .unwrap_or_else(|| (SealSecret::generate(), 0))
    }

    /// Every secret held, newest first.
    fn secrets(&self) -> Vec<SealSecret> {
        let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.iter().rev().map(|(s, _)| s.clone()).collect()
    }

    /// Makes a new current key, made no earlier than `not_before_ms`, and stores it durably
    /// (the older ones stay, up to [`KEPT`] in all); returns it. It still has to be published;
    /// until it is, this node seals with the key the registry lists. Blocks on the disk.
    pub fn rotate(&self, not_before_ms: u64) -> Result<(SealSecret, u64), SealKeysError> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let newest = keys.last().map_or(0, |(_, t)| *t);
        let key = (
            SealSecret::generate(),
            unix_ms().max(newest + 1).max(not_before_ms),
        );
        let mut next = keys.clone();
        next.push(key.clone());
        next.drain(..next.len().saturating_sub(KEPT));
        write(&self.path, &next)?;
        *keys = next;
        Ok(key)
    }

    /// The registry's current key for this node: its public half and when it was made.
    fn listed(&self, cluster: &Cluster) -> Result<Option<([u8; 32], u64)>, String> {
        cluster
            .read(|s| {
                s.members.get(&self.node_id).and_then(|m| {
                    let k = m.seal_keys.last()?;
                    Some((k.public_bytes()?, k.created_at_ms))
                })
            })
            .map_err(|e| e.to_string())
    }

    /// The earliest time a new key of this node may carry: after the registry's current one.
    pub fn next_key_floor(&self, cluster: &Cluster) -> u64 {
        self.listed(cluster)
            .ok()
            .flatten()
            .map_or(0, |(_, at)| at + 1)
    }

    /// Publishes the current key unless the registry already lists it for us; `actor` asked.
    /// A local key older than the listed one (a key file restored from a backup, a clock set
    /// back) could never be accepted, so it is replaced by a new one first.
    pub async fn publish_current(&self, cluster: &Cluster, actor: &str) -> Result<bool, String> {
        if !cluster.is_member() {
            return Err("not a member yet".into());
        }
        let listed = self.listed(cluster)?;
        let (mut secret, mut created) = self.current();
        if let Some((public, at)) = listed {
            if public == secret.public() {
                return Ok(false);
            }
            if created <= at {
                tracing::warn!(
                    "this node's sealing key is older than the one the cluster lists for it; \
                     making a new one"
                );
                (secret, created) = self.rotate(at + 1).map_err(|e| e.to_string())?;
            }
        }
        let label = format!("key {}", hex::encode(secret.id()));
        cluster
            .publish_seal_key(secret.public(), created, &label, actor)
            .await
            .map_err(|e| e.to_string())?;
        Ok(true)
    }

    /// Seals an update this node made for the voters that have published a key; the leader
    /// (the round's aggregator) must be one of them.
    pub fn seal_update(
        &self,
        cluster: &Cluster,
        plaintext: &[u8],
        context: &[u8],
    ) -> Result<Vec<u8>, String> {
        let voters = cluster.voter_ids();
        let recipients: Vec<Recipient> = cluster
            .read(|s| {
                s.members
                    .values()
                    .filter(|m| m.state == MemberState::Active && voters.contains(&m.node_id))
                    .filter_map(|m| {
                        let key = m.seal_keys.last().filter(|k| k.usable())?;
                        Some(Recipient {
                            peer: m.peer_id.clone(),
                            public: key.public_bytes()?,
                        })
                    })
                    .collect()
            })
            .map_err(|e| e.to_string())?;
        let leader = cluster.status().leader_peer_id;
        if !recipients.iter().any(|r| Some(&r.peer) == leader.as_ref()) {
            return Err("the leader has not published a sealing key yet".into());
        }
        // Seal with the key the others know us by: a key just made may not be published yet.
        let (listed, _) = self
            .listed(cluster)?
            .ok_or("this node's sealing key is not published yet")?;
        let secret = self
            .secrets()
            .into_iter()
            .find(|s| s.public() == listed)
            .ok_or("the sealing key the cluster lists for this node is not in its key file")?;
        seal::seal(plaintext, context, (&self.peer_id, &secret), &recipients)
            .map_err(|e| e.to_string())
    }

    /// Opens an update `author` sealed in `context`.
    pub fn open_update(
        &self,
        cluster: &Cluster,
        author: NodeId,
        sealed: &[u8],
        context: &[u8],
    ) -> Result<Vec<u8>, String> {
        let (peer, keys) = cluster
            .read(|s| {
                s.members.get(&author).map(|m| {
                    let keys: Vec<[u8; 32]> = m
                        .seal_keys
                        .iter()
                        .filter_map(|k| k.public_bytes())
                        .collect();
                    (m.peer_id.clone(), keys)
                })
            })
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("{} is not a member", fmt_node_id(author)))?;
        seal::open(
            sealed,
            context,
            (&self.peer_id, &self.secrets()),
            (&peer, &keys),
        )
        .map_err(|e| e.to_string())
    }
}

/// The context an update is sealed in: it opens for this job, round, base model and author only.
pub fn update_context(job_id: &str, round: u32, base_model: &str, author: NodeId) -> Vec<u8> {
    let mut c = b"agentmesh/update/v1\0".to_vec();
    for part in [job_id.as_bytes(), base_model.as_bytes()] {
        c.extend_from_slice(&(part.len() as u32).to_be_bytes());
        c.extend_from_slice(part);
    }
    c.extend_from_slice(&round.to_be_bytes());
    c.extend_from_slice(&author.to_be_bytes());
    c
}

/// Keeps this node's current sealing key published while it is a member.
pub async fn publish(cluster: Cluster, sealer: Arc<Sealer>) {
    let mut applied = cluster.applied_watch();
    loop {
        let _ = tokio::time::timeout(POLL, applied.changed()).await;
        if !cluster.is_member() || !cluster.has_leader() {
            continue;
        }
        match sealer.publish_current(&cluster, "node").await {
            Ok(true) => tracing::info!(
                key = %hex::encode(sealer.current().0.id()),
                "published this node's sealing key"
            ),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "publishing this node's sealing key; retrying");
                // Not woken by our own (refused, audited) write: back off.
                tokio::time::sleep(POLL).await;
                applied.borrow_and_update();
            }
        }
    }
}

fn write(path: &Path, keys: &[(SealSecret, u64)]) -> Result<(), SealKeysError> {
    let stored: Vec<StoredKey> = keys
        .iter()
        .map(|(s, t)| StoredKey {
            secret: ByteBuf::from(s.to_bytes().to_vec()),
            created_at_ms: *t,
        })
        .collect();
    let mut bytes = zeroize::Zeroizing::new(Vec::new());
    ciborium::into_writer(&stored, &mut *bytes)
        .map_err(|e| SealKeysError::Io(path.to_path_buf(), std::io::Error::other(e.to_string())))?;
    crate::identity::write_private(path, &bytes)
        .map_err(|e| SealKeysError::Io(path.to_path_buf(), e))
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn keys_persist_rotate_and_stay_private() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Sealer::load_or_create(dir.path(), "p".into(), 1).expect("create");
        let first = a.current().0.public();
        let b = Sealer::load_or_create(dir.path(), "p".into(), 1).expect("load");
        assert_eq!(b.current().0.public(), first);
        for _ in 0..(KEPT + 2) {
            b.rotate(0).expect("rotate");
        }
        let floor = unix_ms() + 60_000;
        assert_eq!(b.rotate(floor).expect("rotate").1, floor);
        let c = Sealer::load_or_create(dir.path(), "p".into(), 1).expect("reload");
        assert_eq!(c.current().0.public(), b.current().0.public());
        assert_ne!(c.current().0.public(), first);
        assert_eq!(c.secrets().len(), KEPT);
        let times: Vec<u64> = c.keys.lock().expect("lock").iter().map(|k| k.1).collect();
        assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
        let mode = std::fs::metadata(dir.path().join(SEAL_KEYS_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_corrupted_key_file_is_an_error_and_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(SEAL_KEYS_FILE), b"garbage").expect("write");
        let err = Sealer::load_or_create(dir.path(), "p".into(), 1)
            .err()
            .expect("an error");
        assert!(matches!(err, SealKeysError::Corrupted(..)), "{err}");
        assert_eq!(
            std::fs::read(dir.path().join(SEAL_KEYS_FILE)).expect("read"),
            b"garbage"
        );
    }
}
