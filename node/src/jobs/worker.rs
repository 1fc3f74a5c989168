//! The participant side: train on this node's private data when a round names us.

use super::{
    announce, spec::JobSpec, unix_now_ms, update_context, Announcement, Ctx, UpdateTiming,
    JOBS_TOPIC,
};
use agentmesh_consensus::{JobCommand, RoundStart, TrainerInfo};
use agentmesh_federated::{
    add_gaussian_noise, clip_l2, encode_params, Attack, Content, Dataset, ExternalTrainer,
    LocalTrainer, Trainer,
};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};
use std::{
    collections::HashSet,
    str::FromStr,
    sync::Arc,
    time::{Duration, Instant},
};

/// How often the worker looks for rounds besides reacting to state changes.
const POLL: Duration = Duration::from_millis(500);

/// The attack a red-team node applies to its updates. A testing feature: it exists to show that
/// the robust aggregators hold, and must never be set on a real deployment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RedTeam {
    /// One of the federated engine's attacks.
    Attack(Attack),
    /// Send NaN in every coordinate (the aggregator must refuse it before aggregating).
    NaN,
    /// Flip a bit of the sealed update after sealing it (the aggregator must refuse it: the
    /// seal no longer opens).
    Tamper,
}

impl FromStr for RedTeam {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "sign-flip" | "sign_flip" => Self::Attack(Attack::SignFlip { scale: 4.0 }),
            "scale" | "scaled" => Self::Attack(Attack::Scaled { factor: 10.0 }),
            "gaussian" => Self::Attack(Attack::GaussianNoise { std: 1.0 }),
            "alie" => Self::Attack(Attack::Alie),
            "ipm" => Self::Attack(Attack::InnerProduct { epsilon: 4.0 }),
            "nan" => Self::NaN,
            "tamper" => Self::Tamper,
            other => {
                return Err(format!(
                    "unknown attack {other:?}: use sign-flip, scale, gaussian, alie, ipm, nan \
                     or tamper"
                ))
            }
        })
    }
}

/// How this node trains.
pub struct Training {
    /// The private data.
    pub data: Dataset,
    /// A user's trainer program, instead of the built-in one.
    pub external: Option<ExternalTrainer>,
    /// Red-team mode (testing only).
    pub red_team: Option<RedTeam>,
}

impl Training {
    fn info(&self) -> TrainerInfo {
        TrainerInfo {
            features: self.data.num_features() as u32,
            classes: self.data.classes() as u32,
            examples: self.data.len() as u64,
            kind: if self.external.is_some() {
                "external".into()
            } else {
                "builtin".into()
            },
        }
    }
}

/// Registers this node as a trainer and trains whenever a round names it.
pub(super) async fn run(ctx: Arc<Ctx>, training: Training) {
    let training = Arc::new(training);
    let info = training.info();
    let mut applied = ctx.cluster.applied_watch();
    let mut done: HashSet<(String, u32, u32)> = HashSet::new();
    loop {
        let _ = tokio::time::timeout(POLL, applied.changed()).await;
        if !ctx.cluster.is_member() {
            continue;
        }
        let registered = ctx
            .cluster
            .read(|s| s.trainers.get(&ctx.node_id) == Some(&info))
            .unwrap_or(false);
        if !registered {
            let cmd = JobCommand::SetTrainer {
                node_id: ctx.node_id,
                info: Some(info.clone()),
            };
            match ctx.cluster.job_write(cmd).await {
                Ok(()) => tracing::info!(examples = info.examples, "registered as a trainer"),
                Err(e) => tracing::debug!(error = %e, "registering as a trainer"),
            }
        }
        let rounds: Vec<(String, String, RoundStart)> = ctx
            .cluster
            .read(|s| {
                s.jobs
                    .values()
                    .filter(|j| !j.state.is_final())
                    .filter_map(|j| {
                        let c = j.current.as_ref()?;
                        c.participants
                            .contains(&ctx.node_id)
                            .then(|| (j.id.clone(), j.spec.clone(), c.clone()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        for (job_id, spec, start) in rounds {
            if !done.insert((job_id.clone(), start.round, start.attempt)) {
                continue;
            }
            if unix_now_ms() >= start.deadline_ms {
                continue;
            }
            match train_round(&ctx, &training, &job_id, &spec, &start).await {
                Ok(hash) => {
                    tracing::info!(job = %job_id, round = start.round, update = %hash, "update announced")
                }
                Err(e) => {
                    tracing::warn!(job = %job_id, round = start.round, error = %e, "training failed")
                }
            }
        }
        if done.len() > 100_000 {
            done.clear();
        }
    }
}

/// One participant's round: fetch, train, protect, store, sign, announce.
async fn train_round(
    ctx: &Ctx,
    training: &Arc<Training>,
    job_id: &str,
    spec_text: &str,
    start: &RoundStart,
) -> Result<String, String> {
    let spec = JobSpec::parse(spec_text)?;
    let arch = spec.architecture()?;
    if training.data.num_features() != spec.dataset_features {
        return Err(format!(
            "the job expects {} features, our data has {}",
            spec.dataset_features,
            training.data.num_features()
        ));
    }
    let fetching = Instant::now();
    let global = ctx
        .load_model(&start.base_model, ctx.leader_peer().as_slice())
        .await
        .map_err(|e| format!("base model: {e}"))?;
    if global.architecture() != &arch {
        return Err("the base model does not have the job's architecture".into());
    }
    let model_fetch_secs = fetching.elapsed().as_secs_f64();
    let seed = round_seed(job_id, start.round, ctx.node_id, spec.seed.unwrap_or(0));
    let config = spec.train_config(seed);
    let t = training.clone();
    let timeout = Duration::from_millis(start.deadline_ms.saturating_sub(unix_now_ms()));
    let out = tokio::task::spawn_blocking(move || {
        let training = Instant::now();
        match &t.external {
            Some(ext) => ext.train(&global, &t.data, &config),
            None => LocalTrainer.train(&global, &t.data, &config),
        }
        .map(|out| (out, t.red_team, training.elapsed().as_secs_f64()))
    });
    let (out, red_team, train_secs) = tokio::time::timeout(timeout, out)
        .await
        .map_err(|_| "training did not finish before the round's deadline".to_string())?
        .map_err(|e| format!("training task: {e}"))?
        .map_err(|e| e.to_string())?;
    let storing = Instant::now();
    // Clipping, noise, encoding and sealing are passes over the whole update (up to
    // 256 MiB): off the async workers (`Ctx::heavy`).
    let (privacy, n, f) = (
        spec.privacy.clone(),
        start.participants.len(),
        spec.byzantine.max(1),
    );
    let update = ctx
        .heavy("encoding the update", move || {
            let mut delta = out.delta;
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            if let Some(p) = &privacy {
                clip_l2(&mut delta, p.clip_norm);
                if p.mode == "local" && p.noise_multiplier > 0.0 {
                    add_gaussian_noise(&mut delta, p.noise_multiplier * p.clip_norm, &mut rng);
                }
            }
            match red_team {
                Some(RedTeam::Attack(attack)) => {
                    delta = attack.corrupt(&delta, &[&delta], n, f, &mut rng);
                }
                Some(RedTeam::NaN) => delta.iter_mut().for_each(|v| *v = f32::NAN),
                Some(RedTeam::Tamper) | None => {}
            }
            encode_params(&arch, &delta, Content::Update).map_err(|e| e.to_string())
        })
        .await??;
    // Sealed for the voters (the nodes that may aggregate the round), bound to this round.
    let context = Arc::new(update_context(
        job_id,
        start.round,
        &start.base_model,
        ctx.node_id,
    ));
    let update = Arc::new(update);
    let mut sealed = loop {
        let (sealer, cluster) = (ctx.sealer.clone(), ctx.cluster.clone());
        let (plain, context) = (update.clone(), context.clone());
        let attempt = ctx
            .heavy("sealing the update", move || {
                sealer.seal_update(&cluster, &plain, &context)
            })
            .await?;
        // A leader that has just joined may not have published its key yet: wait for it.
        match attempt {
            Ok(sealed) => break sealed,
            Err(e) if unix_now_ms() + 200 < start.deadline_ms => {
                tracing::debug!(error = %e, "sealing the update; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(format!("sealing the update: {e}")),
        }
    };
    if red_team == Some(RedTeam::Tamper) {
        // Alter the sealed bytes after sealing, as a node in the path would.
        if let Some(last) = sealed.last_mut() {
            *last ^= 0x01;
        }
    }
    let update_hash = ctx.put_blob(sealed).await.map_err(|e| e.to_string())?;
    let signature = announce::sign(
        &ctx.signing_key,
        job_id,
        start.round,
        &start.base_model,
        &update_hash,
        out.examples,
    );
    let announcement = Announcement {
        v: announce::ANNOUNCEMENT_VERSION,
        job_id: job_id.to_string(),
        round: start.round,
        base_model: start.base_model.clone(),
        update_hash: update_hash.clone(),
        examples: out.examples,
        node_id: ctx.node_id,
        train_loss: Some(out.metrics.loss).filter(|l| l.is_finite()),
        timing: Some(UpdateTiming {
            model_fetch_secs,
            train_secs,
            store_secs: storing.elapsed().as_secs_f64(),
        }),
        signature: hex::encode(signature),
    };
    ctx.file(announcement.clone());
    publish(ctx, &announcement, start.deadline_ms).await?;
    Ok(update_hash)
}

/// Publishes, retrying while the topic has no mesh peers yet (a node that just joined).
async fn publish(ctx: &Ctx, a: &Announcement, deadline_ms: u64) -> Result<(), String> {
    let data = a.encode();
    loop {
        match ctx.net.publish(JOBS_TOPIC.to_string(), data.clone()).await {
            Ok(_) => return Ok(()),
            Err(crate::network::NetworkError::Duplicate) => return Ok(()),
            Err(e) if unix_now_ms() + 200 < deadline_ms => {
                tracing::debug!(error = %e, "publishing an update announcement; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(format!("publishing the announcement: {e}")),
        }
    }
}

/// Shuffling seed for one participant's round: distinct per node and round, fixed by the job.
fn round_seed(job_id: &str, round: u32, node: u64, job_seed: u64) -> u64 {
    let d = Sha256::new()
        .chain_update(b"agentmesh/train-seed/v1\0")
        .chain_update(job_id.as_bytes())
        .chain_update(round.to_be_bytes())
        .chain_update(node.to_be_bytes())
        .chain_update(job_seed.to_be_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    u64::from_be_bytes(first)
}
