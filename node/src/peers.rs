//! Known peers, persisted in sled so a restarted node knows whom to reconnect to.

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{SystemTime, UNIX_EPOCH},
};

/// Most addresses remembered per peer; identify may report many (one per interface).
pub const MAX_ADDRS_PER_PEER: usize = 16;
/// Most peers remembered. Peers learnt from the DHT beyond this are not stored
/// (they can still be reached through Kademlia), so a flood of fake identities
/// cannot grow the store without bound.
pub const MAX_KNOWN_PEERS: usize = 4096;

/// Whether we currently hold a connection to the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerStatus {
    /// At least one open connection.
    Active,
    /// Known but not connected (down, unreachable, or not yet redialled).
    Inactive,
}

/// What we remember of a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    /// Its name, as announced in identify (empty until identified).
    pub name: String,
    /// Addresses to dial it on.
    pub addrs: Vec<String>,
    /// Last known status.
    pub status: PeerStatus,
    /// When we last had a live connection, ms since the Unix epoch.
    pub last_seen_ms: u64,
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum PeerStoreError {
    /// sled failed.
    #[error("peer store: {0}")]
    Db(#[from] sled::Error),
    /// A stored record does not decode (we skip it, but say so).
    #[error("peer store: corrupt record for {key}: {reason}")]
    Corrupt {
        /// Hex key.
        key: String,
        /// Decoder message.
        reason: String,
    },
}

/// Peers in a sled tree, keyed by peer id bytes, values CBOR.
#[derive(Clone)]
pub struct PeerStore {
    tree: sled::Tree,
    flushing: Arc<AtomicBool>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl PeerStore {
    /// Opens the `peers` tree; every record is marked inactive, since a fresh
    /// process holds no connections yet.
    pub fn open(db: &sled::Db) -> Result<Self, PeerStoreError> {
        let store = Self {
            tree: db.open_tree("peers")?,
            flushing: Arc::new(AtomicBool::new(false)),
        };
        for (peer, mut rec) in store.all()? {
            if rec.status != PeerStatus::Inactive {
                rec.status = PeerStatus::Inactive;
                store.put(&peer, &rec)?;
            }
        }
        Ok(store)
    }

    /// One peer's record.
    pub fn get(&self, peer: &PeerId) -> Result<Option<PeerRecord>, PeerStoreError> {
        match self.tree.get(peer.to_bytes())? {
            Some(v) => decode(peer.to_bytes().as_slice(), &v).map(Some),
            None => Ok(None),
        }
    }

    /// Every record that decodes; corrupt ones are logged and skipped.
    pub fn all(&self) -> Result<Vec<(PeerId, PeerRecord)>, PeerStoreError> {
        let mut out = Vec::new();
        for item in self.tree.iter() {
            let (k, v) = item?;
            let Ok(peer) = PeerId::from_bytes(&k) else {
                tracing::warn!(key = %hex::encode(&k), "skipping peer record with an invalid peer id");
                continue;
            };
            match decode(&k, &v) {
                Ok(rec) => out.push((peer, rec)),
                Err(e) => tracing::warn!(%e, "skipping peer record"),
            }
        }
        Ok(out)
    }

    /// Forgets a peer.
    pub fn remove(&self, peer: &PeerId) -> Result<(), PeerStoreError> {
        self.tree.remove(peer.to_bytes())?;
        Ok(())
    }

    /// Writes a record.
    pub fn put(&self, peer: &PeerId, rec: &PeerRecord) -> Result<(), PeerStoreError> {
        let mut buf = Vec::new();
        // Encoding a struct of strings and integers into a Vec cannot fail.
        if ciborium::into_writer(rec, &mut buf).is_ok() {
            self.tree.insert(peer.to_bytes(), buf)?;
        }
        Ok(())
    }

    /// Reads, changes and writes back a record (creating an empty one if absent).
    pub fn update(
        &self,
        peer: &PeerId,
        f: impl FnOnce(&mut PeerRecord),
    ) -> Result<PeerRecord, PeerStoreError> {
        let mut rec = self.get(peer)?.unwrap_or(PeerRecord {
            name: String::new(),
            addrs: Vec::new(),
            status: PeerStatus::Inactive,
            last_seen_ms: 0,
        });
        f(&mut rec);
        self.put(peer, &rec)?;
        Ok(rec)
    }

    /// Starts a flush to disk without waiting for it (the swarm task must not
    /// block on an fsync); at most one is in flight.
    pub fn flush_in_background(&self) {
        if self.flushing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (tree, flag) = (self.tree.clone(), self.flushing.clone());
        tokio::spawn(async move {
            if let Err(e) = agentmesh_consensus::flush_tree(&tree).await {
                tracing::warn!(%e, "flushing the peer store failed");
            }
            flag.store(false, Ordering::Release);
        });
    }

    /// Adds addresses (most recent first, deduplicated, capped).
    pub fn merge_addrs(rec: &mut PeerRecord, addrs: impl IntoIterator<Item = Multiaddr>) {
        let mut merged: Vec<String> = addrs.into_iter().map(|a| a.to_string()).collect();
        for old in rec.addrs.drain(..) {
            if !merged.contains(&old) {
                merged.push(old);
            }
        }
        merged.dedup();
        merged.truncate(MAX_ADDRS_PER_PEER);
        rec.addrs = merged;
    }
}

fn decode(key: &[u8], v: &[u8]) -> Result<PeerRecord, PeerStoreError> {
    ciborium::from_reader(v).map_err(|e| PeerStoreError::Corrupt {
        key: hex::encode(key),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::identity::Keypair;

    #[test]
    fn records_survive_reopen_and_come_back_inactive() {
        let dir = tempfile::tempdir().unwrap();
        let peer = Keypair::generate_ed25519().public().to_peer_id();
        {
            let db = sled::open(dir.path()).unwrap();
            let store = PeerStore::open(&db).unwrap();
            store
                .update(&peer, |r| {
                    r.name = "n1".into();
                    r.status = PeerStatus::Active;
                    PeerStore::merge_addrs(r, ["/ip4/127.0.0.1/tcp/1".parse().unwrap()]);
                })
                .unwrap();
            db.flush().unwrap();
        }
        let db = sled::open(dir.path()).unwrap();
        let store = PeerStore::open(&db).unwrap();
        let rec = store.get(&peer).unwrap().unwrap();
        assert_eq!(rec.name, "n1");
        assert_eq!(rec.status, PeerStatus::Inactive);
        assert_eq!(rec.addrs, vec!["/ip4/127.0.0.1/tcp/1".to_string()]);
    }

    #[test]
    fn addresses_are_deduplicated_and_capped() {
        let mut rec = PeerRecord {
            name: String::new(),
            addrs: vec![],
            status: PeerStatus::Inactive,
            last_seen_ms: 0,
        };
        let addrs: Vec<Multiaddr> = (0..40)
            .map(|i| format!("/ip4/10.0.0.1/tcp/{i}").parse().unwrap())
            .collect();
        PeerStore::merge_addrs(&mut rec, addrs.clone());
        PeerStore::merge_addrs(&mut rec, addrs[..2].to_vec());
        assert_eq!(rec.addrs.len(), MAX_ADDRS_PER_PEER);
        assert_eq!(rec.addrs[0], addrs[0].to_string());
    }
}
