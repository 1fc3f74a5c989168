//! Fetching a blob from the mesh: providers from Kademlia, chunks pulled from
//! several providers at once, each verified on arrival and written in place, the
//! whole blob verified at the end. Verified chunks of an interrupted fetch are
//! kept on disk and reused.

use super::store::{BlobError, BlobStore};
use crate::{
    metrics::Metrics,
    network::{NetworkError, NetworkHandle},
};
use agentmesh_protocols::blob::{BlobHash, BlobRequest, Manifest, ResponseBody};
use futures::{stream::FuturesUnordered, StreamExt};
use libp2p::PeerId;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::{
    collections::{HashMap, HashSet, VecDeque},
    os::unix::fs::FileExt,
    sync::{Arc, Mutex},
    time::Instant,
};

/// Chunk requests kept in flight per provider: enough to keep a loopback or LAN
/// link busy while one chunk is being hashed and written.
pub(crate) const WINDOW_PER_PROVIDER: usize = 8;
/// Consecutive failed requests (timeouts, resets) after which a provider is
/// dropped for this fetch. Twice the window, so one dropped connection (which
/// fails every request in flight at once) does not ban a provider by itself.
const MAX_CONSECUTIVE_FAILURES: u32 = 2 * WINDOW_PER_PROVIDER as u32;
/// Pause before asking a provider again after it said it was busy.
const BUSY_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);
/// Distinct providers whose chunks must fail the manifest before the manifest,
/// rather than the providers, is blamed.
const SUSPECT_MANIFEST_AFTER: usize = 2;
/// Attempts with a fresh manifest when the assembled blob does not match its hash.
const MANIFEST_ATTEMPTS: usize = 3;
/// How long the hinted providers get before Kademlia is asked.
const HINTED_PASS: std::time::Duration = std::time::Duration::from_secs(10);

/// Why a fetch failed. The partial data stays on disk unless said otherwise.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Nobody announces the blob.
    #[error("no provider found for blob {0}")]
    NoProviders(BlobHash),
    /// No provider gave a usable manifest.
    #[error("no provider of blob {hash} gave a usable manifest: {reasons}")]
    NoManifest {
        /// Blob.
        hash: BlobHash,
        /// What each provider said.
        reasons: String,
    },
    /// The blob is larger than this node accepts.
    #[error("blob {hash} is {size} bytes, over this node's limit of {limit}")]
    TooLarge {
        /// Blob.
        hash: BlobHash,
        /// Declared size.
        size: u64,
        /// Limit.
        limit: u64,
    },
    /// Every provider failed or misbehaved before the blob was complete.
    #[error("every provider of blob {hash} failed with {missing} chunks still missing ({reasons}); verified chunks are kept, so retrying resumes")]
    ProvidersFailed {
        /// Blob.
        hash: BlobHash,
        /// Chunks not yet fetched.
        missing: usize,
        /// Last error per provider.
        reasons: String,
    },
    /// The assembled blob never matched its hash.
    #[error("assembled blob does not match hash {0} with any provider's manifest")]
    ContentMismatch(BlobHash),
    /// Local store failure.
    #[error(transparent)]
    Store(#[from] BlobError),
    /// Network task failure.
    #[error(transparent)]
    Network(#[from] NetworkError),
}

/// What a fetch did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FetchReport {
    /// Blob.
    pub hash: String,
    /// Size in bytes.
    pub size: u64,
    /// Number of chunks.
    pub chunks: u64,
    /// Chunks pulled from peers in this fetch.
    pub chunks_fetched: u64,
    /// Chunks already on disk from an interrupted fetch, verified and kept.
    pub chunks_reused: u64,
    /// Chunks that failed verification (and were fetched again elsewhere).
    pub corrupt_chunks: u64,
    /// Providers found.
    pub providers: Vec<String>,
    /// Providers dropped for serving bad data or failing.
    pub bad_providers: Vec<String>,
    /// The node already held the blob; nothing was fetched.
    pub already_local: bool,
    /// Wall time.
    pub secs: f64,
}

/// Progress of a fetch in flight, for `/v1/blobs/{hash}/status`.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FetchProgress {
    /// Chunks in the blob.
    pub chunks_total: u64,
    /// Verified chunks on disk.
    pub chunks_have: u64,
}

/// Pulls blobs from the mesh into the local store.
pub struct Fetcher {
    store: Arc<BlobStore>,
    net: NetworkHandle,
    metrics: Arc<Metrics>,
    locks: Mutex<HashMap<BlobHash, Arc<tokio::sync::Mutex<()>>>>,
    progress: Mutex<HashMap<BlobHash, FetchProgress>>,
}

enum Outcome {
    Written(usize),
    Corrupt(String),
    Missing,
    Busy,
    Failed(String),
    LocalIo(std::io::Error),
    /// A paused provider may be asked again.
    Resume,
}

/// How a download pass ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DownloadEnd {
    /// Every chunk is on disk and matched the manifest; the SHA-256 of the whole.
    Complete(BlobHash),
    /// Chunks from several providers failed the manifest: the manifest is suspect.
    ManifestSuspect,
}

type Pending = std::pin::Pin<Box<dyn std::future::Future<Output = (PeerId, u64, Outcome)> + Send>>;

impl Fetcher {
    /// A fetcher writing into `store`.
    pub fn new(store: Arc<BlobStore>, net: NetworkHandle, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            net,
            metrics,
            locks: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
        }
    }

    /// Progress of a running fetch of `hash`, if any.
    pub fn progress(&self, hash: &BlobHash) -> Option<FetchProgress> {
        self.progress.lock().ok()?.get(hash).copied()
    }

    fn set_progress(&self, hash: BlobHash, p: Option<FetchProgress>) {
        if let Ok(mut map) = self.progress.lock() {
            match p {
                Some(p) => map.insert(hash, p),
                None => map.remove(&hash),
            };
        }
    }

    /// Makes sure the blob is held locally, fetching it if needed. Concurrent
    /// fetches of one blob are serialised; the second finds it complete.
    pub async fn fetch(&self, hash: BlobHash) -> Result<FetchReport, FetchError> {
        self.fetch_hinted(hash, &[], None).await
    }

    /// Like [`fetch`](Self::fetch), trying `hints` (peers that should hold the blob, such as
    /// the node that just announced it) before asking Kademlia; if they cannot serve it, the
    /// providers come from Kademlia as usual. `max_size` lowers the store's blob size limit
    /// for this fetch (a caller that knows how large the blob should be).
    pub async fn fetch_hinted(
        &self,
        hash: BlobHash,
        hints: &[PeerId],
        max_size: Option<u64>,
    ) -> Result<FetchReport, FetchError> {
        let limit = max_size.map_or(self.store.max_blob_size(), |m| {
            m.min(self.store.max_blob_size())
        });
        let local = self.net.local_peer_id();
        let hints: Vec<PeerId> = hints.iter().copied().filter(|p| *p != local).collect();
        let lock = {
            let mut locks = self
                .locks
                .lock()
                .map_err(|_| FetchError::Store(BlobError::Upload("fetch lock poisoned".into())))?;
            locks.entry(hash).or_default().clone()
        };
        let result = {
            let _guard = lock.lock().await;
            // Clears the progress entry however the fetch ends, including when
            // the caller drops it (an HTTP client that went away).
            let _progress = ProgressGuard {
                fetcher: self,
                hash,
            };
            if hints.is_empty() {
                self.fetch_locked(hash, &[], limit).await
            } else {
                // A hinted peer that hangs must not hold the fetch for the whole request
                // timeout: verified chunks are kept, so the second pass resumes.
                let hinted =
                    tokio::time::timeout(HINTED_PASS, self.fetch_locked(hash, &hints, limit)).await;
                match hinted {
                    Ok(Err(e @ FetchError::TooLarge { .. })) => Err(e),
                    Ok(Ok(r)) => Ok(r),
                    Ok(Err(e)) => {
                        tracing::debug!(%hash, error = %e, "hinted providers failed; asking Kademlia");
                        self.fetch_locked(hash, &[], limit).await
                    }
                    Err(_) => {
                        tracing::debug!(%hash, "hinted providers timed out; asking Kademlia");
                        self.fetch_locked(hash, &[], limit).await
                    }
                }
            }
        };
        if let Ok(mut locks) = self.locks.lock() {
            if Arc::strong_count(&lock) == 2 {
                locks.remove(&hash);
            }
        }
        result
    }

    async fn fetch_locked(
        &self,
        hash: BlobHash,
        hints: &[PeerId],
        limit: u64,
    ) -> Result<FetchReport, FetchError> {
        let started = Instant::now();
        let mut report = FetchReport {
            hash: hash.to_string(),
            ..Default::default()
        };
        if let Some(m) = self.store.manifest(&hash)? {
            report.size = m.size;
            report.chunks = m.chunk_count();
            report.already_local = true;
            return Ok(report);
        }
        let providers = if hints.is_empty() {
            self.net.get_providers(hash).await?
        } else {
            hints.to_vec()
        };
        if providers.is_empty() {
            return Err(FetchError::NoProviders(hash));
        }
        report.providers = providers.iter().map(|p| p.to_string()).collect();
        let mut bad: HashSet<PeerId> = HashSet::new();
        for _ in 0..MANIFEST_ATTEMPTS {
            let (manifest, source) = match self.store.partial_manifest(&hash)? {
                Some((m, from)) => (m, from.and_then(|b| PeerId::from_bytes(&b).ok())),
                None => {
                    let (m, from) = self.find_manifest(hash, &providers, &bad).await?;
                    self.store
                        .set_partial_manifest(&hash, &m, Some(from.to_bytes()))
                        .await?;
                    (m, Some(from))
                }
            };
            if manifest.size > limit {
                self.store.discard_partial(&hash).await?;
                return Err(FetchError::TooLarge {
                    hash,
                    size: manifest.size,
                    limit,
                });
            }
            report.size = manifest.size;
            report.chunks = manifest.chunk_count();
            let end = self
                .download(hash, &manifest, &providers, &mut bad, &mut report)
                .await?;
            if end == DownloadEnd::Complete(hash) {
                self.store.commit_partial(&hash, &manifest).await?;
                self.net.start_providing(hash).await?;
                report.bad_providers = bad.iter().map(|p| p.to_string()).collect();
                report.secs = started.elapsed().as_secs_f64();
                tracing::info!(%hash, size = report.size, fetched = report.chunks_fetched,
                    reused = report.chunks_reused, corrupt = report.corrupt_chunks, "blob fetched");
                return Ok(report);
            }
            // Either every chunk matched the manifest but the whole did not match
            // the hash, or several providers' chunks failed it: the manifest
            // lied. Start over with another provider's, and forgive the providers
            // whose honest chunks failed the lying hashes.
            tracing::warn!(%hash, ?source, ?end, "blob does not match its manifest; discarding the manifest");
            self.store.discard_partial(&hash).await?;
            bad.clear();
            bad.extend(source);
            report.chunks_fetched = 0;
            report.chunks_reused = 0;
        }
        Err(FetchError::ContentMismatch(hash))
    }

    async fn find_manifest(
        &self,
        hash: BlobHash,
        providers: &[PeerId],
        bad: &HashSet<PeerId>,
    ) -> Result<(Manifest, PeerId), FetchError> {
        let mut reasons = Vec::new();
        for peer in providers.iter().filter(|p| !bad.contains(p)) {
            match self
                .net
                .blob_request(*peer, BlobRequest::manifest(hash))
                .await
            {
                Ok(res) => match res.body {
                    ResponseBody::Manifest(m) => match m.validate() {
                        Ok(()) => return Ok((m, *peer)),
                        Err(e) => reasons.push(format!("{peer}: {e}")),
                    },
                    ResponseBody::NotFound => reasons.push(format!("{peer}: not found")),
                    ResponseBody::Busy => reasons.push(format!("{peer}: busy")),
                    ResponseBody::Error { message } => reasons.push(format!("{peer}: {message}")),
                    ResponseBody::Chunk { .. } => {
                        reasons.push(format!("{peer}: answered with a chunk"))
                    }
                },
                Err(e) => reasons.push(e.to_string()),
            }
        }
        Err(FetchError::NoManifest {
            hash,
            reasons: reasons.join("; "),
        })
    }

    async fn download(
        &self,
        hash: BlobHash,
        manifest: &Manifest,
        providers: &[PeerId],
        bad: &mut HashSet<PeerId>,
        report: &mut FetchReport,
    ) -> Result<DownloadEnd, FetchError> {
        let path = self.store.partial_path(&hash);
        let existed = path.exists();
        let file = {
            let p = path.clone();
            let size = manifest.size;
            tokio::task::spawn_blocking(move || -> std::io::Result<std::fs::File> {
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&p)?;
                f.set_len(size)?;
                Ok(f)
            })
            .await
            .map_err(|e| BlobError::Upload(e.to_string()))?
            .map_err(|source| BlobError::Io {
                path: path.clone(),
                source,
            })?
        };
        let file = Arc::new(file);
        let total = manifest.chunk_count();
        let mut have = if existed {
            verified_chunks(file.clone(), manifest.clone()).await
        } else {
            vec![false; total as usize]
        };
        report.chunks_reused = have.iter().filter(|h| **h).count() as u64;
        let mut have_count = report.chunks_reused;
        let progress = |have| FetchProgress {
            chunks_total: total,
            chunks_have: have,
        };
        self.set_progress(hash, Some(progress(have_count)));
        let mut missing: VecDeque<u64> = (0..total).filter(|i| !have[*i as usize]).collect();

        // The whole-blob hash follows the verified prefix of the file while the
        // rest is still arriving, instead of a second pass over it at the end.
        let mut prefix = have.iter().take_while(|h| **h).count() as u64;
        let (prefix_tx, prefix_rx) = tokio::sync::watch::channel(prefix);
        let whole = tokio::spawn(hash_prefix(file.clone(), manifest.clone(), prefix_rx));

        let mut in_flight: HashMap<PeerId, usize> = HashMap::new();
        let mut failures: HashMap<PeerId, u32> = HashMap::new();
        let mut paused: HashSet<PeerId> = HashSet::new();
        let mut corrupters: HashSet<PeerId> = HashSet::new();
        let mut reasons: HashMap<PeerId, String> = HashMap::new();
        let mut next_peer = 0usize;
        let mut pending: FuturesUnordered<Pending> = FuturesUnordered::new();
        loop {
            // Fill every usable provider's window, round-robin, so chunks spread
            // evenly and a slow provider holds at most its window.
            while !missing.is_empty() && !providers.is_empty() {
                let candidate = (0..providers.len())
                    .map(|k| providers[(next_peer + k) % providers.len()])
                    .find(|p| {
                        !bad.contains(p)
                            && !paused.contains(p)
                            && in_flight.get(p).copied().unwrap_or(0) < WINDOW_PER_PROVIDER
                    });
                let Some(peer) = candidate else { break };
                next_peer = next_peer.wrapping_add(1);
                let Some(index) = missing.pop_front() else {
                    break;
                };
                *in_flight.entry(peer).or_default() += 1;
                pending.push(Box::pin(self.fetch_chunk(
                    peer,
                    hash,
                    index,
                    manifest,
                    file.clone(),
                )));
            }
            let Some((peer, index, outcome)) = pending.next().await else {
                if missing.is_empty() {
                    break;
                }
                let reasons = reasons
                    .iter()
                    .map(|(p, r)| format!("{p}: {r}"))
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(FetchError::ProvidersFailed {
                    hash,
                    missing: missing.len(),
                    reasons,
                });
            };
            if !matches!(outcome, Outcome::Resume) {
                if let Some(n) = in_flight.get_mut(&peer) {
                    *n = n.saturating_sub(1);
                }
            }
            match outcome {
                Outcome::Written(len) => {
                    if let Some(h) = have.get_mut(index as usize) {
                        *h = true;
                    }
                    while have.get(prefix as usize) == Some(&true) {
                        prefix += 1;
                    }
                    prefix_tx.send_replace(prefix);
                    have_count += 1;
                    report.chunks_fetched += 1;
                    failures.remove(&peer);
                    self.metrics.blob_chunks_fetched.inc();
                    self.metrics.blob_bytes_fetched.inc_by(len as u64);
                    self.set_progress(hash, Some(progress(have_count)));
                }
                Outcome::Corrupt(why) => {
                    report.corrupt_chunks += 1;
                    self.metrics.blob_chunks_corrupt.inc();
                    tracing::warn!(%peer, %hash, index, %why, "provider served a corrupted chunk; dropping it for this fetch");
                    bad.insert(peer);
                    corrupters.insert(peer);
                    reasons.insert(peer, format!("corrupted chunk {index}"));
                    missing.push_front(index);
                    if corrupters.len() >= SUSPECT_MANIFEST_AFTER {
                        return Ok(DownloadEnd::ManifestSuspect);
                    }
                }
                Outcome::Missing => {
                    bad.insert(peer);
                    reasons.insert(peer, "does not hold the blob".into());
                    missing.push_front(index);
                }
                Outcome::Busy => {
                    // Not a fault: ask again after a pause, without counting it.
                    missing.push_back(index);
                    if paused.insert(peer) {
                        pending.push(Box::pin(async move {
                            tokio::time::sleep(BUSY_PAUSE).await;
                            (peer, index, Outcome::Resume)
                        }));
                    }
                }
                Outcome::Resume => {
                    paused.remove(&peer);
                }
                Outcome::Failed(why) => {
                    let n = failures.entry(peer).or_default();
                    *n += 1;
                    if *n >= MAX_CONSECUTIVE_FAILURES {
                        bad.insert(peer);
                    }
                    tracing::debug!(%peer, index, %why, "chunk request failed");
                    reasons.insert(peer, why);
                    missing.push_back(index);
                }
                Outcome::LocalIo(source) => {
                    return Err(BlobError::Io { path, source }.into());
                }
            }
        }
        let f = file.clone();
        tokio::task::spawn_blocking(move || f.sync_all())
            .await
            .map_err(|e| BlobError::Upload(e.to_string()))?
            .map_err(|source| BlobError::Io {
                path: path.clone(),
                source,
            })?;
        drop(prefix_tx);
        let whole = whole
            .await
            .map_err(|e| BlobError::Upload(e.to_string()))?
            .map_err(|source| BlobError::Io { path, source })?;
        Ok(DownloadEnd::Complete(whole))
    }

    fn fetch_chunk(
        &self,
        peer: PeerId,
        hash: BlobHash,
        index: u64,
        manifest: &Manifest,
        file: Arc<std::fs::File>,
    ) -> impl std::future::Future<Output = (PeerId, u64, Outcome)> + 'static {
        let net = self.net.clone();
        let expected = manifest.chunk_hash(index);
        let range = manifest.chunk_range(index);
        async move {
            let (Some(expected), Some((offset, len))) = (expected, range) else {
                return (
                    peer,
                    index,
                    Outcome::Failed("index outside the manifest".into()),
                );
            };
            let res = match net
                .blob_request(peer, BlobRequest::chunk(hash, index))
                .await
            {
                Ok(res) => res,
                Err(e) => return (peer, index, Outcome::Failed(e.to_string())),
            };
            let data = match res.body {
                ResponseBody::Chunk { index: got, data } if got == index => data,
                ResponseBody::Chunk { index: got, .. } => {
                    return (
                        peer,
                        index,
                        Outcome::Corrupt(format!("answered chunk {got}")),
                    )
                }
                ResponseBody::NotFound => return (peer, index, Outcome::Missing),
                ResponseBody::Busy => return (peer, index, Outcome::Busy),
                ResponseBody::Error { message } => return (peer, index, Outcome::Failed(message)),
                ResponseBody::Manifest(_) => {
                    return (
                        peer,
                        index,
                        Outcome::Corrupt("answered with a manifest".into()),
                    )
                }
            };
            // Hash and write off the async threads: 1 MiB of SHA-256 is ~0.5 ms.
            let outcome = tokio::task::spawn_blocking(move || {
                if data.len() != len {
                    return Outcome::Corrupt(format!("{} bytes, expected {len}", data.len()));
                }
                if <[u8; 32]>::from(Sha256::digest(&data)) != expected {
                    return Outcome::Corrupt("SHA-256 mismatch".into());
                }
                match file.write_all_at(&data, offset) {
                    Ok(()) => Outcome::Written(len),
                    Err(e) => Outcome::LocalIo(e),
                }
            })
            .await
            .unwrap_or_else(|e| Outcome::LocalIo(std::io::Error::other(e.to_string())));
            (peer, index, outcome)
        }
    }
}

struct ProgressGuard<'a> {
    fetcher: &'a Fetcher,
    hash: BlobHash,
}

impl Drop for ProgressGuard<'_> {
    fn drop(&mut self) {
        self.fetcher.set_progress(self.hash, None);
    }
}

/// Which chunks of a partial file already match the manifest.
async fn verified_chunks(file: Arc<std::fs::File>, m: Manifest) -> Vec<bool> {
    let total = m.chunk_count() as usize;
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; m.chunk_size as usize];
        (0..total as u64)
            .map(|i| {
                let (Some((off, len)), Some(want)) = (m.chunk_range(i), m.chunk_hash(i)) else {
                    return false;
                };
                file.read_exact_at(&mut buf[..len], off).is_ok()
                    && <[u8; 32]>::from(Sha256::digest(&buf[..len])) == want
            })
            .collect()
    })
    .await
    .unwrap_or_else(|_| vec![false; total])
}

/// SHA-256 of the whole blob, read back from `file` chunk by chunk as the
/// verified prefix (`prefix`, in chunks) grows. Ends with an error if the sender
/// is dropped before the prefix covers the blob (the fetch failed).
async fn hash_prefix(
    file: Arc<std::fs::File>,
    m: Manifest,
    mut prefix: tokio::sync::watch::Receiver<u64>,
) -> std::io::Result<BlobHash> {
    let total = m.chunk_count();
    let m = Arc::new(m);
    let mut hasher = Sha256::new();
    // One buffer for the whole fetch: a fresh 1 MiB per pass costs page faults.
    let mut buf: Vec<u8> = Vec::new();
    let mut done = 0u64;
    loop {
        let avail = (*prefix.borrow_and_update()).min(total);
        if avail > done {
            let (f, m, from) = (file.clone(), m.clone(), done);
            let mut b = std::mem::take(&mut buf);
            (hasher, buf) = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
                b.resize(m.chunk_size as usize, 0);
                for i in from..avail {
                    let (off, len) = m
                        .chunk_range(i)
                        .ok_or_else(|| std::io::Error::other("chunk outside the manifest"))?;
                    f.read_exact_at(&mut b[..len], off)?;
                    hasher.update(&b[..len]);
                }
                Ok((hasher, b))
            })
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
            done = avail;
        }
        if done >= total {
            return Ok(BlobHash(hasher.finalize().into()));
        }
        if prefix.changed().await.is_err() && *prefix.borrow() <= done {
            return Err(std::io::Error::other(
                "the fetch ended before the blob was complete",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentmesh_protocols::blob::ManifestBuilder;
    use std::io::Write;

    fn blob_file(len: usize) -> (tempfile::NamedTempFile, Vec<u8>, Manifest) {
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&data).unwrap();
        let mut b = ManifestBuilder::new(1000);
        b.update(&data);
        (f, data, b.finish().1)
    }

    #[tokio::test]
    async fn prefix_hash_matches_the_file_as_it_grows() {
        let (f, data, m) = blob_file(10_500);
        let file = Arc::new(f.reopen().unwrap());
        let (tx, rx) = tokio::sync::watch::channel(0);
        let task = tokio::spawn(hash_prefix(file, m, rx));
        for prefix in [3, 3, 7, 11] {
            tx.send_replace(prefix);
            tokio::task::yield_now().await;
        }
        assert_eq!(task.await.unwrap().unwrap(), BlobHash::of(&data));
    }

    #[tokio::test]
    async fn prefix_hash_fails_if_the_fetch_ends_early() {
        let (f, _, m) = blob_file(5_000);
        let (tx, rx) = tokio::sync::watch::channel(2);
        let task = tokio::spawn(hash_prefix(Arc::new(f.reopen().unwrap()), m, rx));
        drop(tx);
        assert!(task.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn empty_blob_hashes_at_once() {
        let (f, _, m) = blob_file(0);
        let (_tx, rx) = tokio::sync::watch::channel(0);
        let got = hash_prefix(Arc::new(f.reopen().unwrap()), m, rx)
            .await
            .unwrap();
        assert_eq!(got, BlobHash::of(b""));
    }
}
