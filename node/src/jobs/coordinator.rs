//! The aggregating side, run by whichever node leads Raft: open rounds, check the updates
//! announced for them, close them on time, aggregate, commit.
//!
//! Everything the coordinator decides is committed before it matters, so a new leader picks up
//! where the old one stopped: an open round is collected again from the announcements the new
//! leader received too (every node subscribes to the jobs topic), and closed at its deadline.

use super::{round, spec::JobSpec, unix_now_ms, Ctx, Received, UpdateTiming};
use agentmesh_consensus::{
    fmt_node_id, JobCommand, JobRecord, JobState, MemberState, NodeId, RejectedUpdate, RoundRecord,
    RoundStart, RoundTiming, UsedUpdate,
};
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};
use tokio::{sync::mpsc, task::JoinHandle};

/// How often the coordinator looks at the running jobs when nothing wakes it earlier.
const TICK: Duration = Duration::from_millis(200);
/// Longest wait for another node to copy a new model before the round is committed.
const REPLICATE_TIMEOUT: Duration = Duration::from_secs(10);
/// A trainer Raft has not heard from for longer than this is left out of new rounds.
const REACHABLE_MS: u64 = 3000;

/// Fetching and checking one update: its values, or why it was refused.
type UpdateCheck = JoinHandle<Result<Vec<f32>, String>>;

/// What the coordinator knows about one open round.
struct Collecting {
    round: u32,
    attempt: u32,
    /// Number of the next announcement to look at in the job's inbox.
    processed: usize,
    /// Accepted-so-far announcements, by participant, with their update fetch.
    pending: BTreeMap<NodeId, Pending>,
    /// Checked updates, by participant.
    valid: BTreeMap<NodeId, (UsedUpdate, Option<f64>, Vec<f32>)>,
    /// Refused announcements.
    rejected: Vec<RejectedUpdate>,
    /// Participants whose update was refused (they do not get a second chance this round).
    refused: BTreeMap<NodeId, String>,
    /// This node's commit of the round's start, if it made it: how long it took, and when it
    /// returned (unix ms).
    started: Option<Started>,
    /// The latest-announced update found valid: when its announcement arrived (unix ms) and
    /// what its sender said about its own time.
    last: Option<(u64, Option<UpdateTiming>)>,
    /// When the round was closed (unix ms).
    closed_at_ms: u64,
    /// Our own update's hash, and the task asking two other participants to keep it (no
    /// other node fetches it, and `job verify` needs it once we are gone). Started as soon
    /// as the update is accepted, so it is done by the time the round closes.
    own_copy: Option<(String, JoinHandle<bool>)>,
}

/// An announced update being fetched and checked.
struct Pending {
    used: UsedUpdate,
    train_loss: Option<f64>,
    /// When the announcement arrived (unix ms).
    arrived_ms: u64,
    timing: Option<UpdateTiming>,
    check: UpdateCheck,
}

/// A round start this node committed.
#[derive(Clone, Copy)]
struct Started {
    round: u32,
    attempt: u32,
    commit_secs: f64,
    committed_at_ms: u64,
}

/// Runs forever; acts only while this node leads.
pub(super) async fn run(ctx: Arc<Ctx>) {
    let mut open: HashMap<String, Collecting> = HashMap::new();
    // Per job, the round and attempt being closed, and the task closing it.
    let mut closing: HashMap<String, (u32, u32, JoinHandle<()>)> = HashMap::new();
    let mut started: HashMap<String, Started> = HashMap::new();
    let mut leader_since: Option<Instant> = None;
    // Closing tasks report here when their result is committed, so the next round opens at once.
    let (closed_tx, mut closed_rx) = mpsc::unbounded_channel::<(String, u32, u32)>();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = ctx.wake.notified() => {}
            Some((job_id, round, attempt)) = closed_rx.recv() => {
                if closing
                    .get(&job_id)
                    .is_some_and(|c| (c.0, c.1) == (round, attempt))
                {
                    closing.remove(&job_id);
                }
            }
        }
        if !ctx.cluster.is_leader() {
            open.clear();
            started.clear();
            leader_since = None;
            continue;
        }
        leader_since.get_or_insert_with(Instant::now);
        closing.retain(|_, c| !c.2.is_finished());
        let jobs: Vec<JobRecord> = match ctx.cluster.read(|s| {
            s.jobs
                .values()
                .filter(|j| j.state == JobState::Running)
                .cloned()
                .collect()
        }) {
            Ok(j) => j,
            Err(_) => continue,
        };
        open.retain(|id, _| jobs.iter().any(|j| &j.id == id));
        started.retain(|id, _| jobs.iter().any(|j| &j.id == id));
        for job in jobs {
            if closing.contains_key(&job.id) {
                continue;
            }
            let spec = match JobSpec::parse(&job.spec) {
                Ok(s) => s,
                Err(e) => {
                    let _ = finish(&ctx, &job.id, JobState::Failed, format!("bad spec: {e}")).await;
                    continue;
                }
            };
            match &job.current {
                None => {
                    open.remove(&job.id);
                    let leading_for = leader_since.map_or(Duration::ZERO, |t| t.elapsed());
                    let committing = Instant::now();
                    match start_round(&ctx, &job, &spec, leading_for).await {
                        Ok(Some((round, attempt))) => {
                            let s = Started {
                                round,
                                attempt,
                                commit_secs: committing.elapsed().as_secs_f64(),
                                committed_at_ms: unix_now_ms(),
                            };
                            started.insert(job.id.clone(), s);
                        }
                        Ok(None) => {}
                        Err(e) => tracing::debug!(job = %job.id, error = %e, "opening a round"),
                    }
                }
                Some(current) => {
                    let ours = started.get(&job.id).copied();
                    let c = open
                        .entry(job.id.clone())
                        .or_insert_with(|| Collecting::new(current, ours));
                    if c.round != current.round || c.attempt != current.attempt {
                        *c = Collecting::new(current, ours);
                    }
                    collect(&ctx, &job.id, &spec, current, c).await;
                    let all_in = current
                        .participants
                        .iter()
                        .all(|p| c.valid.contains_key(p) || c.refused.contains_key(p));
                    if all_in || unix_now_ms() >= current.deadline_ms {
                        let mut c = open
                            .remove(&job.id)
                            .unwrap_or_else(|| Collecting::new(current, ours));
                        c.closed_at_ms = unix_now_ms();
                        let (ctx, job_id, current) = (ctx.clone(), job.id.clone(), current.clone());
                        let closed = closed_tx.clone();
                        let (round, attempt) = (current.round, current.attempt);
                        closing.insert(
                            job.id.clone(),
                            (round, attempt, tokio::spawn(async move {
                                if let Err(e) = close_round(&ctx, &job_id, &spec, &current, c).await
                                {
                                    tracing::warn!(job = %job_id, error = %e, "closing a round");
                                }
                                let _ = closed.send((job_id, round, attempt));
                            })),
                        );
                    }
                }
            }
        }
    }
}

impl Collecting {
    fn new(c: &RoundStart, started: Option<Started>) -> Self {
        Self {
            round: c.round,
            attempt: c.attempt,
            processed: 0,
            pending: BTreeMap::new(),
            valid: BTreeMap::new(),
            rejected: Vec::new(),
            refused: BTreeMap::new(),
            started: started.filter(|s| s.round == c.round && s.attempt == c.attempt),
            last: None,
            closed_at_ms: 0,
            own_copy: None,
        }
    }

    /// The round's timing so far, as far as this node saw it.
    fn timing(&self) -> RoundTiming {
        let secs = |from: u64, to: u64| to.saturating_sub(from) as f64 / 1000.0;
        let reported = self
            .last
            .and_then(|(_, t)| t.and_then(UpdateTiming::plausible));
        RoundTiming {
            start_commit: self.started.map(|s| s.commit_secs),
            updates_in: self
                .started
                .zip(self.last)
                .map(|(s, (at, _))| secs(s.committed_at_ms, at)),
            model_fetch: reported.map(|t| t.model_fetch_secs),
            train: reported.map(|t| t.train_secs),
            update_store: reported.map(|t| t.store_secs),
            update_fetch: self.last.map(|(at, _)| secs(at, self.closed_at_ms)),
            ..RoundTiming::default()
        }
    }
}

/// Opens the next round with every trainer whose data fits the job; returns the round and
/// attempt it committed, or `None` if the job ended instead.
async fn start_round(
    ctx: &Ctx,
    job: &JobRecord,
    spec: &JobSpec,
    leading_for: Duration,
) -> Result<Option<(u32, u32)>, String> {
    let next = job.rounds_done + 1;
    if let Some(max) = spec.privacy.as_ref().and_then(|p| p.max_epsilon) {
        if round::epsilon(spec, next).is_some_and(|e| e > max) {
            let msg = format!(
                "stopped after {} rounds: round {next} would take ε above max_epsilon {max}",
                job.rounds_done
            );
            return finish(ctx, &job.id, JobState::Done, msg)
                .await
                .map(|()| None);
        }
    }
    let Some(base) = job.model_hash.clone() else {
        return finish(
            ctx,
            &job.id,
            JobState::Failed,
            "the job has no model".into(),
        )
        .await
        .map(|()| None);
    };
    // Leave out trainers Raft has not heard from lately: a dead or paused node would only
    // hold the round until its deadline. It is asked again once it answers.
    let reachable: HashSet<String> = ctx
        .cluster
        .status()
        .members
        .iter()
        .filter(|m| match m.last_contact_ms {
            Some(ms) => ms <= REACHABLE_MS,
            // Not heard from since we took over: give it the benefit of the doubt at first.
            None => leading_for < Duration::from_millis(REACHABLE_MS),
        })
        .map(|m| m.node_id.clone())
        .collect();
    let participants: Vec<NodeId> = ctx
        .cluster
        .read(|s| {
            s.trainers
                .iter()
                .filter(|(id, t)| {
                    t.features as usize == spec.dataset_features
                        && (t.classes as usize) <= spec.classes
                        && s.members
                            .get(id)
                            .is_some_and(|m| m.state == MemberState::Active)
                        && reachable.contains(&fmt_node_id(**id))
                })
                .map(|(id, _)| *id)
                .collect()
        })
        .map_err(|e| e.to_string())?;
    if participants.is_empty() {
        return Err("no trainer's data fits the job yet".into());
    }
    let now = unix_now_ms();
    let start = RoundStart {
        round: next,
        attempt: job.failed_attempts + 1,
        base_model: base,
        participants,
        started_at_ms: now,
        deadline_ms: now + spec.round_timeout_secs * 1000,
    };
    tracing::info!(job = %job.id, round = next, attempt = start.attempt, participants = start.participants.len(), "opening round");
    let opened = Some((start.round, start.attempt));
    ctx.cluster
        .job_write(JobCommand::StartRound {
            job_id: job.id.clone(),
            start,
        })
        .await
        .map_err(|e| e.to_string())?;
    Ok(opened)
}

/// Looks at new announcements for the open round.
async fn collect(
    ctx: &Arc<Ctx>,
    job_id: &str,
    spec: &JobSpec,
    current: &RoundStart,
    c: &mut Collecting,
) {
    let new: Vec<Received> = match ctx.inbox.lock() {
        Ok(i) => {
            let (new, next) = i.since(job_id, c.processed);
            c.processed = next;
            new
        }
        Err(_) => return,
    };
    let keys = if new.is_empty() {
        BTreeMap::new()
    } else {
        ctx.member_keys().unwrap_or_default()
    };
    let arch = match spec.architecture() {
        Ok(a) => a,
        Err(_) => return,
    };
    for r in &new {
        let a = &r.announcement;
        let reject = |c: &mut Collecting, reason: String| {
            tracing::info!(job = %job_id, node = %fmt_node_id(a.node_id), %reason, "update rejected");
            c.rejected.push(RejectedUpdate {
                node_id: a.node_id,
                reason,
            });
        };
        if a.round < current.round && r.at_ms < current.started_at_ms {
            // Arrived before this round opened: an earlier round's business.
            continue;
        }
        if a.round != current.round {
            reject(
                c,
                format!("for round {}, but round {} is open", a.round, current.round),
            );
            continue;
        }
        if !current.participants.contains(&a.node_id) {
            reject(c, "not a participant of this round".into());
            continue;
        }
        let Some(key) = keys.get(&a.node_id) else {
            reject(c, "not a member".into());
            continue;
        };
        if let Err(e) = a.verify(key) {
            reject(c, e.to_string());
            continue;
        }
        if a.base_model != current.base_model {
            reject(c, "trained from another base model".into());
            continue;
        }
        if a.examples == 0 {
            reject(c, "claims zero examples".into());
            continue;
        }
        let known = c
            .valid
            .get(&a.node_id)
            .map(|v| &v.0)
            .or_else(|| c.pending.get(&a.node_id).map(|p| &p.used));
        if let Some(u) = known {
            if u.update_hash != a.update_hash {
                reject(c, "a second, different update from this participant".into());
            }
            continue;
        }
        if c.refused.contains_key(&a.node_id) {
            continue;
        }
        let used = UsedUpdate {
            node_id: a.node_id,
            update_hash: a.update_hash.clone(),
            examples: a.examples,
            signature: a.signature_bytes(),
        };
        let (fetch_ctx, hash, arch, author) =
            (ctx.clone(), a.update_hash.clone(), arch.clone(), a.node_id);
        let (job, round, base) = (job_id.to_string(), a.round, a.base_model.clone());
        let handle = tokio::spawn(async move {
            let checked = fetch_ctx
                .load_update(&hash, author, (&job, round, &base), &arch)
                .await;
            fetch_ctx.wake.notify_one();
            checked
        });
        c.pending.insert(
            a.node_id,
            Pending {
                used,
                train_loss: a.train_loss,
                arrived_ms: r.at_ms,
                timing: a.timing,
                check: handle,
            },
        );
    }
    // Harvest finished fetches.
    let finished: Vec<NodeId> = c
        .pending
        .iter()
        .filter(|(_, p)| p.check.is_finished())
        .map(|(id, _)| *id)
        .collect();
    for id in finished {
        let Some(p) = c.pending.remove(&id) else {
            continue;
        };
        let verdict = match p.check.await {
            Ok(v) => v,
            Err(e) => Err(format!("checking the update: {e}")),
        };
        match verdict {
            Ok(delta) => {
                if id == ctx.node_id {
                    c.own_copy = keep_own_update(ctx, job_id, current, c, &p.used.update_hash);
                }
                c.valid.insert(id, (p.used, p.train_loss, delta));
                if c.last.is_none_or(|(at, _)| at <= p.arrived_ms) {
                    c.last = Some((p.arrived_ms, p.timing));
                }
            }
            Err(reason) => {
                tracing::info!(job = %job_id, node = %fmt_node_id(id), %reason, "update rejected");
                c.rejected.push(RejectedUpdate {
                    node_id: id,
                    reason: reason.clone(),
                });
                c.refused.insert(id, reason);
            }
        }
    }
}

/// Asks two other participants (those already heard from first) to copy our own update:
/// two, so that one paused or slow participant cannot hold the round until the copy times
/// out (`t81_job_failures.rs`, a paused participant).
fn keep_own_update(
    ctx: &Arc<Ctx>,
    job_id: &str,
    current: &RoundStart,
    c: &Collecting,
    hash: &str,
) -> Option<(String, JoinHandle<bool>)> {
    let mut keepers: Vec<NodeId> = Vec::new();
    for id in c.valid.keys().chain(&current.participants) {
        if *id != ctx.node_id && !keepers.contains(id) && keepers.len() < 2 {
            keepers.push(*id);
        }
    }
    if keepers.is_empty() {
        return None;
    }
    let (ctx, job_id, h) = (ctx.clone(), job_id.to_string(), hash.to_string());
    let task = tokio::spawn(async move {
        ctx.announce_model(&job_id, &h, keepers, REPLICATE_TIMEOUT)
            .await
    });
    Some((hash.to_string(), task))
}

/// Closes a round: aggregate what is valid, or fail the round visibly.
async fn close_round(
    ctx: &Ctx,
    job_id: &str,
    spec: &JobSpec,
    current: &RoundStart,
    mut c: Collecting,
) -> Result<(), String> {
    for (id, p) in std::mem::take(&mut c.pending) {
        p.check.abort();
        c.rejected.push(RejectedUpdate {
            node_id: id,
            reason: "update not fetched before the deadline".into(),
        });
    }
    let started = current.started_at_ms;
    let mut record = RoundRecord {
        round: current.round,
        attempt: current.attempt,
        base_model: current.base_model.clone(),
        participants: current.participants.clone(),
        updates: c.valid.values().map(|v| v.0.clone()).collect(),
        selected: vec![],
        rejected: c.rejected.clone(),
        model_hash: None,
        noise_seed: None,
        loss: None,
        accuracy: None,
        train_loss: None,
        epsilon: None,
        secs: 0.0,
        failed: None,
        started_at_ms: current.started_at_ms,
        timing: Some(c.timing()),
    };
    let losses: Vec<(f64, u64)> = c
        .valid
        .values()
        .filter_map(|v| v.1.map(|l| (l, v.0.examples)))
        .collect();
    let total: u64 = losses.iter().map(|l| l.1).sum();
    if total > 0 {
        record.train_loss =
            Some(losses.iter().map(|(l, n)| l * *n as f64).sum::<f64>() / total as f64);
    }
    let min = spec.min_participants;
    let outcome = if c.valid.len() < min {
        Err(format!(
            "only {} valid update(s) of the {min} needed ({} participant(s), {} rejected)",
            c.valid.len(),
            current.participants.len(),
            c.rejected.len()
        ))
    } else {
        let own_copy = c.own_copy.take();
        aggregate(ctx, job_id, spec, current, &c, own_copy, &mut record).await
    };
    if let Err(reason) = outcome {
        tracing::warn!(job = %job_id, round = current.round, %reason, "round failed");
        record.failed = Some(reason);
        record.model_hash = None;
    }
    record.secs = unix_now_ms().saturating_sub(started) as f64 / 1000.0;
    ctx.cluster
        .job_write(JobCommand::EndRound {
            job_id: job_id.to_string(),
            record: Box::new(record),
        })
        .await
        .map_err(|e| e.to_string())
}

async fn aggregate(
    ctx: &Ctx,
    job_id: &str,
    spec: &JobSpec,
    current: &RoundStart,
    c: &Collecting,
    own_copy: Option<(String, JoinHandle<bool>)>,
    record: &mut RoundRecord,
) -> Result<(), String> {
    let base = ctx
        .load_model(&current.base_model, &[])
        .await
        .map_err(|e| format!("base model: {e}"))?;
    // The seed is drawn now, after the updates are fixed, and committed with the result.
    let seed: Option<[u8; 32]> = spec
        .central_noise_std(c.valid.len())
        .map(|_| rand::random());
    let updates: Vec<(Vec<f32>, u64)> = c
        .valid
        .values()
        .map(|v| (v.2.clone(), v.0.examples))
        .collect();
    let ids: Vec<NodeId> = c.valid.keys().copied().collect();
    let spec2 = spec.clone();
    let eval = ctx.eval.clone();
    let (outcome, bytes, evaluation, aggregate_secs, evaluate_secs) =
        tokio::task::spawn_blocking(move || {
            let aggregating = Instant::now();
            let outcome = round::aggregate(&spec2, &base, &updates, seed)?;
            let bytes = outcome.model.to_safetensors().map_err(|e| e.to_string())?;
            let aggregate_secs = aggregating.elapsed().as_secs_f64();
            let evaluating = Instant::now();
            let evaluation = eval.and_then(|d| outcome.model.evaluate(&d).ok());
            let evaluate_secs = evaluating.elapsed().as_secs_f64();
            Ok::<_, String>((outcome, bytes, evaluation, aggregate_secs, evaluate_secs))
        })
        .await
        .map_err(|e| format!("aggregation task: {e}"))??;
    if let Some(t) = record.timing.as_mut() {
        t.aggregate = Some(aggregate_secs);
        t.evaluate = Some(evaluate_secs);
    }
    let publishing = Instant::now();
    record.selected = outcome
        .selected
        .iter()
        .filter_map(|&i| ids.get(i).copied())
        .collect();
    record.noise_seed = seed.map(hex::encode);
    let hash = ctx.put_blob(bytes).await.map_err(|e| e.to_string())?;
    ctx.keep_model(&hash, Arc::new(outcome.model));
    // Commit only once another node holds the model: a result whose model died with its
    // aggregator would leave the job nothing to train from.
    let others = ctx
        .cluster
        .read(|s| s.active_members().count() > 1)
        .unwrap_or(false);
    // Our own update, if used, lives only here (the others' were fetched by us): the round
    // is committed only once another node holds it too, so it stays verifiable without us.
    // Usually the copy asked for when it was accepted is done; if not, everyone is asked.
    let own = c.valid.get(&ctx.node_id).map(|v| v.0.update_hash.clone());
    let (own_kept, model_kept) = if others {
        let own_kept = async {
            let early = match (&own, own_copy) {
                (Some(h), Some((asked, task))) if *h == asked => task.await.unwrap_or(false),
                _ => false,
            };
            match &own {
                None => true,
                Some(_) if early => true,
                Some(h) => {
                    ctx.announce_model(job_id, h, vec![], REPLICATE_TIMEOUT)
                        .await
                }
            }
        };
        let model_kept = ctx.announce_model(job_id, &hash, vec![], REPLICATE_TIMEOUT);
        tokio::join!(own_kept, model_kept)
    } else {
        (true, true)
    };
    let copied = own_kept && model_kept;
    if let Some(t) = record.timing.as_mut() {
        t.model_publish = Some(publishing.elapsed().as_secs_f64());
    }
    if !copied {
        return Err(format!(
            "no other node copied the {} in time",
            if model_kept {
                "aggregator's own update"
            } else {
                "new model"
            }
        ));
    }
    record.model_hash = Some(hash);
    if let Some(e) = evaluation {
        record.loss = Some(e.loss).filter(|l| l.is_finite());
        record.accuracy = Some(e.accuracy);
    }
    record.epsilon = round::epsilon(spec, current.round);
    Ok(())
}

async fn finish(ctx: &Ctx, job_id: &str, state: JobState, message: String) -> Result<(), String> {
    tracing::info!(job = %job_id, ?state, %message, "job ends");
    ctx.cluster
        .job_write(JobCommand::Finish {
            job_id: job_id.to_string(),
            state,
            message,
        })
        .await
        .map_err(|e| e.to_string())
}
