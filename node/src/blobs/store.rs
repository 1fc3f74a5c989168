//! Blobs on local disk: `blobs/<sha256>` for complete blobs, `blobs/partial/` for
//! fetches in progress, `blobs/tmp/` for uploads; manifests in sled.

use agentmesh_consensus::Durable;
use agentmesh_protocols::blob::{
    chunk_range, BlobHash, Manifest, ManifestBuilder, DEFAULT_CHUNK_SIZE,
};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::Serialize;
use std::{
    collections::HashMap,
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
};
use tokio::io::AsyncWriteExt;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// Upload larger than the node accepts.
    #[error("blob exceeds the maximum size of {limit} bytes")]
    TooLarge {
        /// Limit in force.
        limit: u64,
    },
    /// The upload stream failed.
    #[error("upload interrupted: {0}")]
    Upload(String),
    /// Disk failure.
    #[error("blob store I/O on {path}: {source}")]
    Io {
        /// File involved.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// Metadata store failure.
    #[error("blob metadata: {0}")]
    Db(#[from] sled::Error),
    /// Stored metadata does not decode.
    #[error("blob metadata for {hash} is corrupt: {reason}")]
    Corrupt {
        /// Blob.
        hash: BlobHash,
        /// Decoder message.
        reason: String,
    },
}

/// Result of storing an upload.
#[derive(Debug, Clone, Serialize)]
pub struct PutResult {
    /// SHA-256 of the content.
    pub hash: String,
    /// Size in bytes.
    pub size: u64,
    /// Number of chunks.
    pub chunks: u64,
}

/// One stored blob, as `GET /v1/blobs` lists it.
#[derive(Debug, Clone, Serialize)]
pub struct BlobSummary {
    /// SHA-256.
    pub hash: String,
    /// Size in bytes.
    pub size: u64,
}

/// A fetch in progress: its manifest and the peer id bytes of the manifest's source.
pub type PartialFetch = (Manifest, Option<Vec<u8>>);

/// What is remembered of a fetch in progress.
#[derive(serde::Serialize, serde::Deserialize)]
struct PartialMeta {
    manifest: Manifest,
    source: Option<serde_bytes::ByteBuf>,
}

/// The local blob store.
pub struct BlobStore {
    root: PathBuf,
    durable: Durable,
    meta: sled::Tree,
    partial: sled::Tree,
    max_blob_size: u64,
    tmp_seq: AtomicU64,
    /// `(size, chunk_size)` of complete blobs, so serving a chunk does not
    /// decode the whole manifest (up to 4 MiB) from sled each time. Blobs are
    /// immutable, so an entry never goes stale; one per blob held.
    layouts: Mutex<HashMap<BlobHash, (u64, u32)>>,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> BlobError + '_ {
    move |source| BlobError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn encode_manifest(m: &Manifest) -> Vec<u8> {
    let mut buf = Vec::new();
    // A manifest is plain data; encoding into a Vec cannot fail.
    let _ = ciborium::into_writer(m, &mut buf);
    buf
}

impl BlobStore {
    /// Opens (creating) the store under `data_dir/blobs`; clears stale uploads.
    pub fn open(durable: &Durable, data_dir: &Path, max_blob_size: u64) -> Result<Self, BlobError> {
        let db = durable.db();
        let root = data_dir.join("blobs");
        for dir in [root.clone(), root.join("partial"), root.join("tmp")] {
            std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let tmp = root.join("tmp");
        if let Ok(entries) = std::fs::read_dir(&tmp) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let store = Self {
            root,
            durable: durable.clone(),
            meta: db.open_tree("blobs")?,
            partial: db.open_tree("blobs_partial")?,
            max_blob_size,
            tmp_seq: AtomicU64::new(0),
            layouts: Mutex::new(HashMap::new()),
        };
        // A manifest without its file (deleted by hand, lost disk) is forgotten
        // rather than advertised.
        for hash in store.hashes()? {
            if !store.path(&hash).exists() {
                tracing::warn!(%hash, "blob file missing; forgetting it");
                store.meta.remove(hash.0)?;
            }
        }
        Ok(store)
    }

    /// Largest blob accepted.
    pub fn max_blob_size(&self) -> u64 {
        self.max_blob_size
    }

    /// Path of a complete blob.
    pub fn path(&self, hash: &BlobHash) -> PathBuf {
        self.root.join(hash.to_string())
    }

    /// Path of a partially fetched blob.
    pub fn partial_path(&self, hash: &BlobHash) -> PathBuf {
        self.root.join("partial").join(hash.to_string())
    }

    /// Whether the blob is held completely.
    pub fn has(&self, hash: &BlobHash) -> Result<bool, BlobError> {
        Ok(self.meta.contains_key(hash.0)?)
    }

    fn decode(hash: &BlobHash, bytes: &[u8]) -> Result<Manifest, BlobError> {
        ciborium::from_reader(bytes).map_err(|e| BlobError::Corrupt {
            hash: *hash,
            reason: e.to_string(),
        })
    }

    /// Manifest of a complete blob.
    pub fn manifest(&self, hash: &BlobHash) -> Result<Option<Manifest>, BlobError> {
        self.meta
            .get(hash.0)?
            .map(|v| Self::decode(hash, &v))
            .transpose()
    }

    /// Manifest of a fetch in progress, with the peer id bytes of the provider
    /// it came from (so a lying manifest can be blamed after a restart too).
    pub fn partial_manifest(&self, hash: &BlobHash) -> Result<Option<PartialFetch>, BlobError> {
        let Some(v) = self.partial.get(hash.0)? else {
            return Ok(None);
        };
        let p: PartialMeta = ciborium::from_reader(v.as_ref()).map_err(|e| BlobError::Corrupt {
            hash: *hash,
            reason: e.to_string(),
        })?;
        Ok(Some((p.manifest, p.source.map(|b| b.into_vec()))))
    }

    /// Records the manifest a fetch works from, and its source, so a restart can
    /// resume the fetch.
    pub async fn set_partial_manifest(
        &self,
        hash: &BlobHash,
        m: &Manifest,
        source: Option<Vec<u8>>,
    ) -> Result<(), BlobError> {
        let meta = PartialMeta {
            manifest: m.clone(),
            source: source.map(serde_bytes::ByteBuf::from),
        };
        let mut buf = Vec::new();
        // Plain data; encoding into a Vec cannot fail.
        let _ = ciborium::into_writer(&meta, &mut buf);
        self.partial.insert(hash.0, buf)?;
        self.durable.flush().await?;
        Ok(())
    }

    /// Forgets a fetch in progress and its data.
    pub async fn discard_partial(&self, hash: &BlobHash) -> Result<(), BlobError> {
        let path = self.partial_path(hash);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
        self.partial.remove(hash.0)?;
        self.durable.flush().await?;
        Ok(())
    }

    /// Every complete blob's hash.
    pub fn hashes(&self) -> Result<Vec<BlobHash>, BlobError> {
        let mut out = Vec::new();
        for k in self.meta.iter().keys() {
            let k = k?;
            if let Ok(h) = <[u8; 32]>::try_from(k.as_ref()) {
                out.push(BlobHash(h));
            }
        }
        Ok(out)
    }

    /// Every complete blob with its size.
    pub fn list(&self) -> Result<Vec<BlobSummary>, BlobError> {
        let mut out = Vec::new();
        for item in self.meta.iter() {
            let (k, v) = item?;
            let Ok(h) = <[u8; 32]>::try_from(k.as_ref()) else {
                continue;
            };
            let hash = BlobHash(h);
            let m = Self::decode(&hash, &v)?;
            out.push(BlobSummary {
                hash: hash.to_string(),
                size: m.size,
            });
        }
        Ok(out)
    }

    /// Streams an upload to disk, hashing as it goes; durable (file and metadata
    /// synced) before it returns.
    pub async fn put<S, E>(&self, mut body: S) -> Result<PutResult, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join("tmp")
            .join(format!("upload-{}-{seq}", std::process::id()));
        let result = self.put_inner(&tmp, &mut body).await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }

    async fn put_inner<S, E>(&self, tmp: &Path, body: &mut S) -> Result<PutResult, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let mut file = tokio::fs::File::create(tmp).await.map_err(io_err(tmp))?;
        let mut builder = ManifestBuilder::new(DEFAULT_CHUNK_SIZE);
        while let Some(piece) = body.next().await {
            let piece = piece.map_err(|e| BlobError::Upload(e.to_string()))?;
            if builder.size() + piece.len() as u64 > self.max_blob_size {
                return Err(BlobError::TooLarge {
                    limit: self.max_blob_size,
                });
            }
            builder.update(&piece);
            file.write_all(&piece).await.map_err(io_err(tmp))?;
        }
        // tokio's write_all may return before the bytes reach the kernel; flush
        // surfaces a failed last write (ENOSPC, EIO) that sync_all would not.
        file.flush().await.map_err(io_err(tmp))?;
        file.sync_all().await.map_err(io_err(tmp))?;
        let on_disk = file.metadata().await.map_err(io_err(tmp))?.len();
        drop(file);
        if on_disk != builder.size() {
            return Err(BlobError::Io {
                path: tmp.to_path_buf(),
                source: io::Error::other(format!(
                    "wrote {} bytes but the file holds {on_disk}",
                    builder.size()
                )),
            });
        }
        let (hash, manifest) = builder.finish();
        let result = PutResult {
            hash: hash.to_string(),
            size: manifest.size,
            chunks: manifest.chunk_count(),
        };
        if self.has(&hash)? {
            let _ = tokio::fs::remove_file(tmp).await;
            return Ok(result);
        }
        self.install(tmp, &hash, &manifest).await?;
        Ok(result)
    }

    /// Moves a verified file into place and records its manifest, durably.
    async fn install(&self, from: &Path, hash: &BlobHash, m: &Manifest) -> Result<(), BlobError> {
        let dest = self.path(hash);
        tokio::fs::rename(from, &dest)
            .await
            .map_err(io_err(&dest))?;
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || std::fs::File::open(&root)?.sync_all())
            .await
            .map_err(|e| io_err(&self.root)(io::Error::other(e)))?
            .map_err(io_err(&self.root))?;
        self.meta.insert(hash.0, encode_manifest(m))?;
        self.durable.flush().await?;
        Ok(())
    }

    /// Promotes a fully fetched and verified partial blob to a complete one.
    pub async fn commit_partial(&self, hash: &BlobHash, m: &Manifest) -> Result<(), BlobError> {
        let from = self.partial_path(hash);
        self.install(&from, hash, m).await?;
        self.partial.remove(hash.0)?;
        self.durable.flush().await?;
        Ok(())
    }

    /// Reads chunk `index` of a complete blob (blocking; call from a blocking task).
    pub fn read_chunk(&self, hash: &BlobHash, index: u64) -> Result<Option<Vec<u8>>, BlobError> {
        let cached = self.layouts.lock().ok().and_then(|l| l.get(hash).copied());
        let (size, chunk_size) = match cached {
            Some(layout) => layout,
            None => {
                let Some(m) = self.manifest(hash)? else {
                    return Ok(None);
                };
                if let Ok(mut l) = self.layouts.lock() {
                    l.insert(*hash, (m.size, m.chunk_size));
                }
                (m.size, m.chunk_size)
            }
        };
        let Some((offset, len)) = chunk_range(size, chunk_size, index) else {
            return Ok(None);
        };
        let path = self.path(hash);
        let file = std::fs::File::open(&path).map_err(io_err(&path))?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)
            .map_err(io_err(&path))?;
        Ok(Some(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open_db(dir: &Path) -> Durable {
        let path = dir.join("db");
        Durable::new(sled::open(&path).unwrap(), &path).unwrap()
    }

    fn stream(parts: Vec<Vec<u8>>) -> impl Stream<Item = Result<Bytes, String>> + Unpin {
        futures::stream::iter(parts.into_iter().map(|p| Ok(Bytes::from(p))))
    }

    #[tokio::test]
    async fn put_is_content_addressed_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
        let hash = BlobHash::of(&data);
        {
            let store = BlobStore::open(&open_db(dir.path()), dir.path(), 1 << 30).unwrap();
            let parts = data.chunks(100_000).map(|c| c.to_vec()).collect();
            let res = store.put(stream(parts)).await.unwrap();
            assert_eq!(res.hash, hash.to_string());
            assert_eq!(res.chunks, 3);
        }
        let store = BlobStore::open(&open_db(dir.path()), dir.path(), 1 << 30).unwrap();
        assert!(store.has(&hash).unwrap());
        let chunk = store.read_chunk(&hash, 2).unwrap().unwrap();
        assert_eq!(chunk, data[2 << 20..]);
        assert_eq!(store.read_chunk(&hash, 3).unwrap(), None);
    }

    #[tokio::test]
    async fn oversized_upload_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(&open_db(dir.path()), dir.path(), 10).unwrap();
        let err = store
            .put(stream(vec![vec![1; 6], vec![2; 6]]))
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::TooLarge { limit: 10 }));
        assert_eq!(
            std::fs::read_dir(dir.path().join("blobs/tmp"))
                .unwrap()
                .count(),
            0
        );
        assert!(store.list().unwrap().is_empty());
    }
}
