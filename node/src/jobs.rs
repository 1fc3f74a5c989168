//! Federated training jobs across the mesh.
//!
//! The job and every round's start and result live in the Raft state (`consensus/src/jobs.rs`);
//! model weights and updates travel as blobs; update announcements go by gossipsub on
//! [`JOBS_TOPIC`]. Every node runs:
//! - a **worker** (`worker.rs`, nodes started with `--data`): when a round names it, fetch the
//!   base model, train on the private data, clip, sign, store the update blob and announce it;
//! - a **coordinator** (`coordinator.rs`), active only on the Raft leader: open rounds, check
//!   announced updates (signature, round, base model, shape, finite values; one per participant),
//!   close the round when all are in or at its deadline, aggregate robustly (`round.rs`), add
//!   central DP noise from a seed drawn after the updates are fixed, and commit the result;
//! - a listener that files announcements into the [`Inbox`] and turns state changes into
//!   `/v1/events` job events.
//!
//! `job verify` (`verify` below) recomputes committed rounds from the signed update blobs.

mod coordinator;
mod round;
mod spec;
mod worker;

pub use agentmesh_protocols::jobs::{
    sign as sign_update, Announcement, AnnouncementError, ModelNotice, UpdateTiming, JOBS_TOPIC,
    MAX_ANNOUNCEMENT_SIZE, MODELS_TOPIC,
};
pub use spec::{JobSpec, PrivacySpec, MAX_ROUND_TIMEOUT_SECS};
pub use worker::{RedTeam, Training};

use crate::{
    blobs::{BlobStore, Fetcher},
    network::{NetworkHandle, NodeEvent},
    sealing::{update_context, Sealer},
};
use agentmesh_consensus::{
    fmt_node_id, Cluster, ClusterError, Command, JobCommand, JobRecord, JobState, NodeId,
    RoundRecord, RoundTiming,
};
use agentmesh_federated::{Dataset, Model};
use agentmesh_protocols::blob::BlobHash;
use agentmesh_protocols::jobs as announce;
use libp2p::PeerId;
use serde::Serialize;
use serde_json::{json, Value};
use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};
use tokio::sync::broadcast;

/// Announcements kept per job (older rounds are dropped first).
const INBOX_PER_JOB: usize = 4096;
/// Longest wait for a blob fetch from the mesh before giving up on it.
const FETCH_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest model file fetched for a job.
const MODEL_LIMIT: u64 = agentmesh_federated::MAX_MODEL_FILE_SIZE as u64;
/// Bytes handed to the blob store at a time when a job stores a model or an update.
const PUT_PIECE: usize = 1 << 20;
/// Room for a safetensors header (names, shapes, metadata) above the parameters' bytes.
const HEADER_ALLOWANCE: u64 = 1 << 20;
/// How long an answer waits for this node to apply a write it sent to the leader.
const APPLY_WAIT: Duration = Duration::from_secs(5);

/// Why a job operation failed.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The request is invalid.
    #[error("{0}")]
    Invalid(String),
    /// No such job.
    #[error("no job {0}")]
    NotFound(String),
    /// Cluster state could not be changed or read.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// A blob could not be stored or fetched.
    #[error("blob: {0}")]
    Blob(String),
    /// This node failed at something that was not the request's fault.
    #[error("{0}")]
    Internal(String),
}

/// An announcement as received.
#[derive(Debug, Clone)]
pub struct Received {
    /// The announcement.
    pub announcement: Announcement,
    /// When it arrived here (unix ms).
    pub at_ms: u64,
}

/// Announcements received for one job, in arrival order, numbered from 0 for the job's life
/// (numbers stay valid when the oldest are dropped).
#[derive(Default)]
struct JobInbox {
    dropped: usize,
    entries: VecDeque<Received>,
}

/// Announcements received, by job.
#[derive(Default)]
pub struct Inbox {
    jobs: HashMap<String, JobInbox>,
}

impl Inbox {
    fn push(&mut self, r: Received) {
        let job = self.jobs.entry(r.announcement.job_id.clone()).or_default();
        if job.entries.len() >= INBOX_PER_JOB {
            // Keep the newest rounds: drop the oldest entry.
            job.entries.pop_front();
            job.dropped += 1;
        }
        job.entries.push_back(r);
    }

    /// The job's announcements numbered `from` on, and the number after the last.
    fn since(&self, job_id: &str, from: usize) -> (Vec<Received>, usize) {
        let Some(job) = self.jobs.get(job_id) else {
            return (Vec::new(), from);
        };
        let skip = from.saturating_sub(job.dropped);
        let new = job.entries.iter().skip(skip).cloned().collect();
        (new, job.dropped + job.entries.len())
    }

    fn retain_jobs(&mut self, keep: impl Fn(&str) -> bool) {
        self.jobs.retain(|k, _| keep(k));
    }
}

/// What the job tasks share.
pub struct Ctx {
    cluster: Cluster,
    net: NetworkHandle,
    store: Arc<BlobStore>,
    fetcher: Arc<Fetcher>,
    events: broadcast::Sender<NodeEvent>,
    signing_key: ed25519_dalek::SigningKey,
    /// Seals this node's updates and opens the ones sealed for it.
    sealer: Arc<Sealer>,
    node_id: NodeId,
    inbox: Mutex<Inbox>,
    /// Copies other nodes confirmed, for the models this node is waiting on.
    copies: Mutex<HashMap<String, usize>>,
    /// Bumped whenever a copy is confirmed, so a waiting aggregator wakes at once.
    copy_confirmed: tokio::sync::watch::Sender<u64>,
    eval: Option<Dataset>,
    /// Wakes the coordinator early: an announcement arrived, an update was fetched, a round
    /// was committed.
    wake: tokio::sync::Notify,
    /// The last model this node made or decoded, by hash: the round after the one it
    /// aggregated trains from it and aggregates onto it without reading and decoding it again.
    last_model: Mutex<Option<(String, Arc<Model>)>>,
    /// Passes over a whole model or update (decrypting, decoding, encoding, sealing) under
    /// way, at most one per core: each holds a model-sized buffer or three, and more at once
    /// would only share the cores and multiply the memory.
    heavy: tokio::sync::Semaphore,
}

/// The job service of one node.
#[derive(Clone)]
pub struct Jobs {
    ctx: Arc<Ctx>,
}

impl Jobs {
    /// Starts the listener, the coordinator and, with `training`, the worker.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        cluster: Cluster,
        net: NetworkHandle,
        store: Arc<BlobStore>,
        fetcher: Arc<Fetcher>,
        events: broadcast::Sender<NodeEvent>,
        signing_key: ed25519_dalek::SigningKey,
        sealer: Arc<Sealer>,
        training: Option<Training>,
        eval: Option<Dataset>,
    ) -> Result<Self, JobError> {
        for topic in [JOBS_TOPIC, MODELS_TOPIC] {
            net.subscribe(topic.to_string())
                .await
                .map_err(|e| JobError::Invalid(e.to_string()))?;
        }
        let ctx = Arc::new(Ctx {
            node_id: cluster.node_id(),
            cluster,
            net,
            store,
            fetcher,
            events,
            signing_key,
            sealer,
            inbox: Mutex::new(Inbox::default()),
            copies: Mutex::new(HashMap::new()),
            copy_confirmed: tokio::sync::watch::Sender::new(0),
            eval,
            wake: tokio::sync::Notify::new(),
            last_model: Mutex::new(None),
            heavy: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| n.get()),
            ),
        });
        tokio::spawn(listen(ctx.clone()));
        tokio::spawn(coordinator::run(ctx.clone()));
        if let Some(t) = training {
            tokio::spawn(worker::run(ctx.clone(), t));
        }
        Ok(Self { ctx })
    }

    /// Takes a submission: checks it, makes (or checks) the initial model, commits the job.
    /// `actor` is who asked, for the audit log.
    pub async fn submit(&self, spec_json: &str, actor: &str) -> Result<Value, JobError> {
        let mut spec = JobSpec::parse(spec_json).map_err(JobError::Invalid)?;
        let arch = spec.architecture().map_err(JobError::Invalid)?;
        let id = hex::encode(rand::random::<[u8; 8]>());
        let seed = *spec
            .seed
            .get_or_insert_with(|| u64::from_str_radix(&id[..16], 16).unwrap_or(0));
        let model_hash = match &spec.initial_model {
            Some(hash) => {
                let bytes = self.ctx.get_blob(hash, &[], MODEL_LIMIT).await?;
                let model = self
                    .ctx
                    .decode_model(bytes)
                    .await
                    .map_err(|e| JobError::Invalid(format!("initial_model: {e}")))?;
                if model.architecture() != &arch {
                    return Err(JobError::Invalid(format!(
                        "initial_model is a {:?}, the job asks for a {arch:?}",
                        model.architecture()
                    )));
                }
                hash.clone()
            }
            None => {
                // Initialising and encoding up to 64 M parameters: on a blocking thread.
                let bytes = self
                    .ctx
                    .heavy("initialising the model", move || {
                        let model = Model::new(arch, seed).map_err(|e| e.to_string())?;
                        model.to_safetensors().map_err(|e| e.to_string())
                    })
                    .await
                    .map_err(JobError::Internal)?
                    .map_err(JobError::Invalid)?;
                let hash = self.ctx.put_blob(bytes).await?;
                // Others copy it now, so the job does not depend on this node staying up.
                self.ctx
                    .announce_model(&id, &hash, vec![], Duration::ZERO)
                    .await;
                hash
            }
        };
        let spec_text =
            serde_json::to_string(&spec).map_err(|e| JobError::Invalid(e.to_string()))?;
        let record = JobRecord {
            id: id.clone(),
            spec: spec_text,
            submitted_at: unix_now_ms() / 1000,
            submitted_by: self.ctx.node_id,
            state: JobState::Running,
            rounds: spec.rounds,
            rounds_done: 0,
            model_hash: Some(model_hash),
            current: None,
            history: vec![],
            failed_attempts: 0,
            message: None,
        };
        let cluster = &self.ctx.cluster;
        let detail = format!("{} rounds, {}", spec.rounds, spec.aggregator);
        let entry = cluster.audit_entry(actor, "job.submit", &id, &detail);
        cluster
            .write_audited(entry, Command::Job(JobCommand::Submit(record.clone())))
            .await?;
        // So that what the client does next through this node (status, cancel) finds it.
        cluster
            .wait_applied_here(APPLY_WAIT, |s| s.jobs.contains_key(&id))
            .await;
        Ok(job_view(&record, true))
    }

    /// All jobs, newest first, without round history.
    pub fn list(&self) -> Result<Vec<Value>, JobError> {
        let mut jobs = self
            .ctx
            .cluster
            .read(|s| s.jobs.values().cloned().collect::<Vec<_>>())?;
        jobs.sort_by(|a, b| b.submitted_at.cmp(&a.submitted_at).then(a.id.cmp(&b.id)));
        Ok(jobs.iter().map(|j| job_view(j, false)).collect())
    }

    /// One job, with its history.
    pub fn get(&self, id: &str) -> Result<Value, JobError> {
        Ok(job_view(&self.record(id)?, true))
    }

    fn record(&self, id: &str) -> Result<JobRecord, JobError> {
        self.ctx
            .cluster
            .read(|s| s.jobs.get(id).cloned())?
            .ok_or_else(|| JobError::NotFound(id.to_string()))
    }

    /// Cancels a running job.
    /// `actor` is who asked, for the audit log.
    pub async fn cancel(&self, id: &str, actor: &str) -> Result<Value, JobError> {
        self.record(id)?;
        let cluster = &self.ctx.cluster;
        let entry = cluster.audit_entry(actor, "job.cancel", id, "");
        let cmd = Command::Job(JobCommand::Cancel {
            job_id: id.to_string(),
        });
        cluster.write_audited(entry, cmd).await?;
        // Committed through the leader; answer once this node has applied it too.
        cluster
            .wait_applied_here(APPLY_WAIT, |s| {
                s.jobs.get(id).is_none_or(|j| j.state.is_final())
            })
            .await;
        self.get(id)
    }

    /// The bytes of a model (or any blob) by hash, fetched from the mesh if needed.
    pub async fn model_bytes(&self, hash: &str) -> Result<Vec<u8>, JobError> {
        self.ctx.get_blob(hash, &[], MODEL_LIMIT).await
    }

    /// Recomputes committed rounds (all, or just `round`) from the signed update blobs and
    /// compares the model hashes.
    pub async fn verify(&self, id: &str, round: Option<u32>) -> Result<Value, JobError> {
        let job = self.record(id)?;
        let spec = JobSpec::parse(&job.spec).map_err(JobError::Invalid)?;
        let keys = self.ctx.member_keys()?;
        let records: Vec<&RoundRecord> = job
            .history
            .iter()
            .filter(|r| r.model_hash.is_some() && round.is_none_or(|n| r.round == n))
            .collect();
        if records.is_empty() {
            return Err(JobError::Invalid(match round {
                Some(n) => format!("job {id} has no completed round {n}"),
                None => format!("job {id} has no completed rounds"),
            }));
        }
        let mut results = Vec::new();
        let mut all_ok = true;
        for r in records {
            let outcome = self.verify_round(id, &spec, &keys, r).await;
            let (recomputed, error) = match outcome {
                Ok(h) => (Some(h), None),
                Err(e) => (None, Some(e)),
            };
            let ok = recomputed.is_some() && recomputed == r.model_hash;
            all_ok &= ok;
            results.push(json!({
                "round": r.round,
                "model_hash": r.model_hash,
                "recomputed": recomputed,
                "updates": r.updates.len(),
                "ok": ok,
                "error": error,
            }));
        }
        Ok(json!({ "job_id": id, "ok": all_ok, "rounds": results }))
    }

    async fn verify_round(
        &self,
        job_id: &str,
        spec: &JobSpec,
        keys: &BTreeMap<NodeId, Vec<u8>>,
        r: &RoundRecord,
    ) -> Result<String, String> {
        // From the blob, not from a model this node kept: verification reads what was stored.
        let base_bytes = self
            .ctx
            .get_blob(&r.base_model, &[], MODEL_LIMIT)
            .await
            .map_err(|e| format!("base model: {e}"))?;
        let base = self
            .ctx
            .decode_model(base_bytes)
            .await
            .map_err(|e| format!("base model: {e}"))?;
        let mut updates = Vec::with_capacity(r.updates.len());
        for u in &r.updates {
            let key = keys
                .get(&u.node_id)
                .ok_or_else(|| format!("{} is not a member", fmt_node_id(u.node_id)))?;
            announce::verify_signature(
                key,
                &u.signature,
                job_id,
                r.round,
                &r.base_model,
                &u.update_hash,
                u.examples,
            )
            .map_err(|e| format!("update of {}: {e}", fmt_node_id(u.node_id)))?;
            let delta = self
                .ctx
                .load_update(
                    &u.update_hash,
                    u.node_id,
                    (job_id, r.round, &r.base_model),
                    base.architecture(),
                )
                .await
                .map_err(|e| format!("update of {}: {e}", fmt_node_id(u.node_id)))?;
            updates.push((delta, u.examples));
        }
        let seed = match &r.noise_seed {
            Some(s) => Some(parse_seed(s).ok_or("malformed noise seed")?),
            None => None,
        };
        let spec = spec.clone();
        self.ctx
            .heavy("recomputing the round", move || {
                let out = round::aggregate(&spec, &base, &updates, seed)?;
                let bytes = out.model.to_safetensors().map_err(|e| e.to_string())?;
                Ok(BlobHash::of(&bytes).to_string())
            })
            .await?
    }
}

impl Ctx {
    /// Files an announcement (from gossip, or our own: a node's own messages are not
    /// delivered back to it, see `on_gossip_event`).
    fn file(&self, announcement: Announcement) {
        if let Ok(mut inbox) = self.inbox.lock() {
            inbox.push(Received {
                announcement,
                at_ms: unix_now_ms(),
            });
        }
        self.wake.notify_one();
    }

    /// A member's peer id, if it is a member.
    fn peer_of(&self, node: NodeId) -> Option<PeerId> {
        self.cluster
            .read(|s| s.members.get(&node).map(|m| m.peer_id.clone()))
            .ok()
            .flatten()
            .and_then(|p| p.parse().ok())
    }

    /// The current Raft leader's peer id: it aggregated the latest model.
    fn leader_peer(&self) -> Option<PeerId> {
        self.cluster.status().leader_peer_id?.parse().ok()
    }

    /// Every member's Ed25519 public key, which its update signatures must verify with.
    fn member_keys(&self) -> Result<BTreeMap<NodeId, Vec<u8>>, ClusterError> {
        self.cluster.read(|s| {
            s.members
                .values()
                .map(|m| (m.node_id, m.public_key.clone()))
                .collect()
        })
    }

    /// Asks the nodes in `to` (empty: every node) to copy a blob a job needs kept (a new
    /// model, or the aggregator's own update), then waits (up to `wait`) until another node
    /// says it holds it. Returns whether one did.
    async fn announce_model(
        &self,
        job_id: &str,
        hash: &str,
        to: Vec<NodeId>,
        wait: Duration,
    ) -> bool {
        if let Ok(mut copies) = self.copies.lock() {
            copies.insert(hash.to_string(), 0);
        }
        let mut confirmed = self.copy_confirmed.subscribe();
        let notice = ModelNotice {
            job_id: job_id.to_string(),
            model_hash: hash.to_string(),
            have: false,
            to,
        };
        let data = serde_json::to_vec(&notice).unwrap_or_default();
        if let Err(e) = self.net.publish(MODELS_TOPIC.to_string(), data).await {
            tracing::debug!(error = %e, "announcing a model");
        }
        let deadline = tokio::time::Instant::now() + wait;
        let copied = loop {
            let n = self
                .copies
                .lock()
                .map_or(0, |c| c.get(hash).copied().unwrap_or(0));
            if n > 0 {
                break true;
            }
            match tokio::time::timeout_at(deadline, confirmed.changed()).await {
                Ok(Ok(())) => {}
                _ => break false,
            }
        };
        if let Ok(mut copies) = self.copies.lock() {
            copies.remove(hash);
        }
        copied
    }

    /// Copies a model another node announced, and says so.
    async fn copy_model(&self, n: ModelNotice, from: Option<PeerId>) {
        if !n.to.is_empty() && !n.to.contains(&self.node_id) {
            return;
        }
        // Only the copy matters here: the bytes are read when a round needs them.
        if let Err(e) = self
            .fetch_blob(&n.model_hash, from.as_slice(), MODEL_LIMIT)
            .await
        {
            tracing::debug!(blob = %n.model_hash, error = %e, "copying a blob a job needs kept");
            return;
        }
        let have = ModelNotice {
            have: true,
            to: vec![],
            ..n
        };
        let data = serde_json::to_vec(&have).unwrap_or_default();
        if let Err(e) = self.net.publish(MODELS_TOPIC.to_string(), data).await {
            tracing::debug!(error = %e, "confirming a model copy");
        }
    }

    /// Runs `f`, a pass over a whole model or update (up to 256 MiB), on a blocking thread
    /// (not on the async workers the Raft and gossip tasks run on), once a core is free of
    /// such passes ([`heavy`](Self::heavy)). `what` names it in an error.
    async fn heavy<T: Send + 'static>(
        &self,
        what: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, String> {
        let _permit = self
            .heavy
            .acquire()
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| format!("{what}: {e}"))
    }

    /// Decodes a model's safetensors bytes (see [`heavy`](Self::heavy)).
    async fn decode_model(&self, bytes: Vec<u8>) -> Result<Model, String> {
        self.heavy("decoding the model", move || {
            Model::from_safetensors(&bytes).map_err(|e| e.to_string())
        })
        .await?
    }

    /// A job's model by hash: the one this node made or decoded last, else fetched (from
    /// `hints` first), read and decoded.
    async fn load_model(&self, hash: &str, hints: &[PeerId]) -> Result<Arc<Model>, String> {
        let cached = self.last_model.lock().ok().and_then(|m| {
            m.as_ref()
                .filter(|(h, _)| h == hash)
                .map(|(_, model)| model.clone())
        });
        if let Some(model) = cached {
            return Ok(model);
        }
        let bytes = self
            .get_blob(hash, hints, MODEL_LIMIT)
            .await
            .map_err(|e| e.to_string())?;
        let model = Arc::new(self.decode_model(bytes).await?);
        self.keep_model(hash, model.clone());
        Ok(model)
    }

    /// Remembers `model` as the blob `hash` (its safetensors bytes) for [`load_model`](Self::load_model).
    fn keep_model(&self, hash: &str, model: Arc<Model>) {
        // Only while a job runs: the listener lets the model go when the last one ends, and a
        // fetch or an aggregation that finishes after that must not bring it back.
        let running = self
            .cluster
            .read(|s| s.jobs.values().any(|j| !j.state.is_final()))
            .unwrap_or(false);
        if !running {
            return;
        }
        if let Ok(mut m) = self.last_model.lock() {
            *m = Some((hash.to_string(), model));
        }
    }

    /// Stores bytes as a blob and announces it; returns its hash.
    async fn put_blob(&self, bytes: Vec<u8>) -> Result<String, JobError> {
        // In slices: the store hashes each piece as it comes, and one piece of a large
        // model (up to 256 MiB) would hold an async worker, and the Raft and gossip tasks
        // that share it, for hundreds of milliseconds.
        let len = bytes.len();
        let bytes = bytes::Bytes::from(bytes);
        let body = futures::stream::iter((0..len).step_by(PUT_PIECE).map(move |at| {
            Ok::<_, std::convert::Infallible>(bytes.slice(at..(at + PUT_PIECE).min(len)))
        }));
        let put = self
            .store
            .put(body)
            .await
            .map_err(|e| JobError::Blob(e.to_string()))?;
        let hash: BlobHash =
            put.hash
                .parse()
                .map_err(|e: agentmesh_protocols::blob::ParseHashError| {
                    JobError::Blob(e.to_string())
                })?;
        self.net
            .start_providing(hash)
            .await
            .map_err(|e| JobError::Blob(e.to_string()))?;
        Ok(put.hash)
    }

    /// A blob's bytes, fetched from the mesh if not held here (from `hints` first: peers that
    /// should hold it), refusing one larger than `max` bytes before fetching it.
    async fn get_blob(&self, hash: &str, hints: &[PeerId], max: u64) -> Result<Vec<u8>, JobError> {
        let path = self.fetch_blob(hash, hints, max).await?;
        tokio::fs::read(&path)
            .await
            .map_err(|e| JobError::Blob(format!("{hash}: {e}")))
    }

    /// Makes sure a blob is held here (fetched as in [`get_blob`](Self::get_blob)), without
    /// reading it; returns its path.
    async fn fetch_blob(
        &self,
        hash: &str,
        hints: &[PeerId],
        max: u64,
    ) -> Result<std::path::PathBuf, JobError> {
        let h: BlobHash =
            hash.parse()
                .map_err(|e: agentmesh_protocols::blob::ParseHashError| {
                    JobError::Invalid(e.to_string())
                })?;
        tokio::time::timeout(
            FETCH_TIMEOUT,
            self.fetcher.fetch_hinted(h, hints, Some(max)),
        )
        .await
        .map_err(|_| JobError::Blob(format!("{hash}: not fetched within {FETCH_TIMEOUT:?}")))?
        .map_err(|e| JobError::Blob(e.to_string()))?;
        let path = self.store.path(&h);
        let len = tokio::fs::metadata(&path)
            .await
            .map_err(|e| JobError::Blob(format!("{hash}: {e}")))?
            .len();
        if len > max {
            return Err(JobError::Blob(format!(
                "{hash}: {len} bytes is larger than the {max} expected"
            )));
        }
        Ok(path)
    }

    /// Fetches (from its author first), opens and decodes an update for `arch` made in `round`
    /// (job, round number, base model), refusing one of the wrong size or content, one with a
    /// value that is not finite, or one that was not sealed for this node in that round by its
    /// author.
    async fn load_update(
        &self,
        hash: &str,
        author: NodeId,
        round: (&str, u32, &str),
        arch: &agentmesh_federated::Architecture,
    ) -> Result<Vec<f32>, String> {
        let hint = self.peer_of(author);
        // An update is exactly as large as the model, plus the seal: never download more.
        let max = (arch.num_params() * 4) as u64
            + HEADER_ALLOWANCE
            + agentmesh_protocols::seal::overhead(agentmesh_protocols::seal::MAX_RECIPIENTS) as u64;
        let sealed = self
            .get_blob(hash, hint.as_slice(), max)
            .await
            .map_err(|e| e.to_string())?;
        let (job_id, number, base_model) = round;
        let context = update_context(job_id, number, base_model, author);
        let (sealer, cluster, arch) = (self.sealer.clone(), self.cluster.clone(), arch.clone());
        self.heavy("opening the update", move || {
            if !agentmesh_protocols::seal::is_sealed(&sealed) {
                return Err("the update is not sealed".into());
            }
            let bytes = sealer
                .open_update(&cluster, author, &sealed, &context)
                .map_err(|e| format!("sealed update: {e}"))?;
            if bytes.len() as u64 > (arch.num_params() * 4) as u64 + HEADER_ALLOWANCE {
                return Err("the opened update is larger than the model".into());
            }
            let (found, params, content) =
                agentmesh_federated::decode_params(&bytes).map_err(|e| e.to_string())?;
            if content != agentmesh_federated::Content::Update {
                return Err("the blob is a model, not an update".into());
            }
            if found != arch {
                return Err(format!(
                    "update is for a {found:?}, the job trains a {arch:?}"
                ));
            }
            // `decode_params` has refused any value that is not finite.
            Ok(params)
        })
        .await?
    }
}

/// Files gossip announcements into the inbox and turns job state changes into events.
async fn listen(ctx: Arc<Ctx>) {
    let mut events = ctx.events.subscribe();
    let mut applied = ctx.cluster.applied_watch();
    let mut seen: HashMap<String, (JobState, usize)> = HashMap::new();
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                Ok(NodeEvent::Gossip { topic, data, from, .. }) if topic == MODELS_TOPIC => {
                    match ModelNotice::decode(&data) {
                        Ok(n) if n.have => {
                            if let Ok(mut copies) = ctx.copies.lock() {
                                if let Some(c) = copies.get_mut(&n.model_hash) {
                                    *c += 1;
                                    ctx.copy_confirmed.send_modify(|n| *n += 1);
                                }
                            }
                        }
                        Ok(n) => {
                            let running = ctx
                                .cluster
                                .read(|s| s.jobs.get(&n.job_id).is_some_and(|j| !j.state.is_final()))
                                .unwrap_or(false);
                            if running {
                                let (ctx, author) = (ctx.clone(), from.parse().ok());
                                tokio::spawn(async move { ctx.copy_model(n, author).await });
                            }
                        }
                        Err(e) => tracing::debug!(%from, error = %e, "dropping a model notice"),
                    }
                }
                Ok(NodeEvent::Gossip { topic, data, from, .. }) if topic == JOBS_TOPIC => {
                    match Announcement::decode(&data) {
                        Ok(a) => ctx.file(a),
                        Err(e) => tracing::debug!(%from, error = %e, "dropping a job announcement"),
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "job listener lagged behind node events");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
            changed = applied.changed() => {
                if changed.is_err() {
                    return;
                }
                // Most applied entries touch no job: look, and copy only the jobs that changed.
                let changed: Vec<Value> = match ctx.cluster.read(|s| {
                    seen.retain(|id, _| s.jobs.contains_key(id));
                    s.jobs
                        .values()
                        .filter(|job| {
                            let now = (job.state, job.history.len());
                            seen.insert(job.id.clone(), now) != Some(now)
                        })
                        .map(|job| job_view(job, false))
                        .collect()
                }) {
                    Ok(c) => c,
                    Err(_) => continue,
                };
                if changed.is_empty() {
                    continue;
                }
                for job in changed {
                    let _ = ctx.events.send(NodeEvent::Job { job });
                }
                let running: Vec<String> = seen
                    .iter()
                    .filter(|(_, (state, _))| !state.is_final())
                    .map(|(id, _)| id.clone())
                    .collect();
                if let Ok(mut inbox) = ctx.inbox.lock() {
                    inbox.retain_jobs(|id| running.iter().any(|r| r == id));
                }
                if running.is_empty() {
                    // No job left to train from the kept model: give its memory back.
                    if let Ok(mut m) = ctx.last_model.lock() {
                        *m = None;
                    }
                }
            }
        }
    }
}

fn parse_seed(s: &str) -> Option<[u8; 32]> {
    hex::decode(s).ok()?.try_into().ok()
}

fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Serialize)]
struct RoundView<'a> {
    round: u32,
    attempt: u32,
    participants: usize,
    used: usize,
    rejected: usize,
    loss: Option<f64>,
    accuracy: Option<f64>,
    train_loss: Option<f64>,
    epsilon: Option<f64>,
    secs: f64,
    started_at_ms: u64,
    timing: &'a Option<RoundTiming>,
    model_hash: &'a Option<String>,
    noise_seed: &'a Option<String>,
    failed: &'a Option<String>,
    selected: Vec<String>,
    updates: Vec<Value>,
    rejected_updates: Vec<Value>,
}

/// The JSON view of a job (`GET /v1/jobs/{id}`).
pub fn job_view(job: &JobRecord, history: bool) -> Value {
    let spec: Value = serde_json::from_str(&job.spec).unwrap_or(Value::Null);
    let rounds: Vec<Value> = job
        .history
        .iter()
        .map(|r| {
            serde_json::to_value(RoundView {
                round: r.round,
                attempt: r.attempt,
                participants: r.participants.len(),
                used: r.updates.len(),
                rejected: r.rejected.len(),
                loss: r.loss,
                accuracy: r.accuracy,
                train_loss: r.train_loss,
                epsilon: r.epsilon,
                secs: r.secs,
                started_at_ms: r.started_at_ms,
                timing: &r.timing,
                model_hash: &r.model_hash,
                noise_seed: &r.noise_seed,
                failed: &r.failed,
                selected: r.selected.iter().map(|n| fmt_node_id(*n)).collect(),
                updates: r
                    .updates
                    .iter()
                    .map(|u| {
                        json!({
                            "node_id": fmt_node_id(u.node_id),
                            "update_hash": u.update_hash,
                            "examples": u.examples,
                            "signature": hex::encode(&u.signature),
                        })
                    })
                    .collect(),
                rejected_updates: r
                    .rejected
                    .iter()
                    .map(|x| json!({ "node_id": fmt_node_id(x.node_id), "reason": x.reason }))
                    .collect(),
            })
            .unwrap_or(Value::Null)
        })
        .collect();
    let last = rounds.iter().rev().find(|r| r["failed"].is_null()).cloned();
    let mut v = json!({
        "id": job.id,
        "state": job.state,
        "rounds_done": job.rounds_done,
        "rounds": job.rounds,
        "model_hash": job.model_hash,
        "aggregator": spec.get("aggregator"),
        "submitted_at": job.submitted_at,
        "message": job.message,
        "current": job.current.as_ref().map(|c| json!({
            "round": c.round,
            "attempt": c.attempt,
            "participants": c.participants.iter().map(|n| fmt_node_id(*n)).collect::<Vec<_>>(),
            "started_at_ms": c.started_at_ms,
            "deadline_ms": c.deadline_ms,
        })),
        "last_round": last,
    });
    if history {
        v["spec"] = spec;
        v["history"] = Value::Array(rounds);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(job: &str, round: u32) -> Received {
        Received {
            announcement: Announcement {
                v: 1,
                job_id: job.into(),
                round,
                base_model: String::new(),
                update_hash: String::new(),
                examples: 1,
                node_id: 1,
                train_loss: None,
                timing: None,
                signature: String::new(),
            },
            at_ms: 0,
        }
    }

    #[test]
    fn inbox_numbers_survive_dropping_the_oldest() {
        let mut inbox = Inbox::default();
        for round in 0..INBOX_PER_JOB as u32 {
            inbox.push(received("j", round));
        }
        let (first, next) = inbox.since("j", 0);
        assert_eq!((first.len(), next), (INBOX_PER_JOB, INBOX_PER_JOB));
        // Two more push the two oldest out; a reader at `next` sees exactly the two new ones.
        inbox.push(received("j", 10_000));
        inbox.push(received("j", 10_001));
        let (new, next2) = inbox.since("j", next);
        let rounds: Vec<u32> = new.iter().map(|r| r.announcement.round).collect();
        assert_eq!(rounds, vec![10_000, 10_001]);
        assert_eq!(next2, INBOX_PER_JOB + 2);
        assert!(inbox.since("j", next2).0.is_empty());
        let (none, at) = inbox.since("other", 5);
        assert!(none.is_empty());
        assert_eq!(at, 5);
    }
}
