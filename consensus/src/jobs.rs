//! Training jobs in the replicated state: the job, each round's start (base model, participants,
//! deadline) and result (new model, updates used and rejected, metrics), and the nodes able to
//! train. The state machine knows nothing about models: it enforces the round protocol (one
//! round at a time, results only for the round that is open, no change after a job ends) so that
//! a leader that dies mid-round leaves a state the next leader can finish from.

use serde::{Deserialize, Serialize};

use crate::state::{ClusterState, Touched};
use crate::types::{CommandResult, NodeId, Rejection};

/// Most jobs the state holds (finished ones included; cancel or let them finish to make room).
pub const MAX_JOBS: usize = 256;
/// Largest job specification, as JSON text, in bytes.
pub const MAX_JOB_SPEC_LEN: usize = 16 * 1024;
/// Most rounds a job may ask for.
pub const MAX_ROUNDS: u32 = 10_000;
/// Most participants in one round.
pub const MAX_PARTICIPANTS: usize = 1024;
/// Failed attempts at one round after which the job fails.
pub const MAX_ROUND_ATTEMPTS: u32 = 3;
/// Longest job id, in bytes.
pub const MAX_JOB_ID_LEN: usize = 64;
/// Longest reason or message stored with a job, in bytes.
pub const MAX_MESSAGE_LEN: usize = 1024;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Rounds are being run.
    Running,
    /// Every round is done (or the privacy budget ended it early; see the job's message).
    Done,
    /// Stopped by an error (a round failed too often, or the job cannot run).
    Failed,
    /// Cancelled by a user.
    Cancelled,
}

impl JobState {
    /// Whether the job has ended.
    pub fn is_final(self) -> bool {
        self != JobState::Running
    }
}

/// A training job as the cluster records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Job id (random, chosen by the node that took the submission).
    pub id: String,
    /// The job specification, JSON text (see interface.md), validated by the submitting node.
    pub spec: String,
    /// Unix seconds of the submission.
    pub submitted_at: u64,
    /// The node that took the submission.
    pub submitted_by: NodeId,
    /// Running, done, failed or cancelled.
    pub state: JobState,
    /// Rounds asked for.
    pub rounds: u32,
    /// Rounds completed.
    pub rounds_done: u32,
    /// Hash of the current global model (the initial one until a round completes).
    pub model_hash: Option<String>,
    /// The round now open, if any.
    pub current: Option<RoundStart>,
    /// Every completed or failed round attempt, in order.
    pub history: Vec<RoundRecord>,
    /// Failed attempts at the current round so far.
    pub failed_attempts: u32,
    /// Why the job ended, when that needs saying.
    pub message: Option<String>,
}

/// A round as its start was committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundStart {
    /// Round number, from 1.
    pub round: u32,
    /// Attempt at this round, from 1.
    pub attempt: u32,
    /// Hash of the model the participants train from.
    pub base_model: String,
    /// The nodes asked to train.
    pub participants: Vec<NodeId>,
    /// Unix milliseconds when the round opened.
    pub started_at_ms: u64,
    /// Unix milliseconds after which the round closes with the updates it has.
    pub deadline_ms: u64,
}

/// An update the aggregator was given, with what is needed to check it again later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsedUpdate {
    /// The participant.
    pub node_id: NodeId,
    /// Hash of the update blob (safetensors).
    pub update_hash: String,
    /// Examples it was trained on (FedAvg weight).
    pub examples: u64,
    /// The participant's Ed25519 signature over job, round, base model and update hash.
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// An update that was refused, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedUpdate {
    /// Who sent it (as claimed; a forged update names someone else).
    pub node_id: NodeId,
    /// Why it was refused.
    pub reason: String,
}

/// The outcome of one round attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// Round number.
    pub round: u32,
    /// Attempt number.
    pub attempt: u32,
    /// The model trained from.
    pub base_model: String,
    /// The nodes asked to train.
    pub participants: Vec<NodeId>,
    /// Valid updates given to the aggregator, in the order it saw them.
    pub updates: Vec<UsedUpdate>,
    /// Updates the aggregator built the result from (all for the averaging rules; Krum's picks).
    pub selected: Vec<NodeId>,
    /// Updates refused before aggregation.
    pub rejected: Vec<RejectedUpdate>,
    /// The new global model, or `None` if the round failed.
    pub model_hash: Option<String>,
    /// Seed of the central DP noise, hex; fixed after the updates were.
    pub noise_seed: Option<String>,
    /// Loss of the new model on the aggregator's evaluation data, if it has some.
    pub loss: Option<f64>,
    /// Accuracy of the new model on the aggregator's evaluation data.
    pub accuracy: Option<f64>,
    /// Mean training loss the participants reported.
    pub train_loss: Option<f64>,
    /// Privacy spent so far (ε at the job's δ), when the job is private.
    pub epsilon: Option<f64>,
    /// Seconds from the round's start to its result.
    pub secs: f64,
    /// Why the round failed, if it did.
    pub failed: Option<String>,
    /// When the round was opened (unix ms, the aggregator's clock; 0 in records from before
    /// this field existed).
    #[serde(default)]
    pub started_at_ms: u64,
    /// Where the round's time went, as the aggregator saw it.
    #[serde(default)]
    pub timing: Option<RoundTiming>,
}

/// A round's wall time split into its steps, in seconds, as the node that closed it saw it.
/// Steps the closing node did not see itself (it took over mid-round) are `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundTiming {
    /// Committing the round's start through Raft.
    pub start_commit: Option<f64>,
    /// From the start committed to the announcement of the last update used: participants
    /// learn of the round, fetch the model, train, store and announce.
    pub updates_in: Option<f64>,
    /// The last participant's own account: fetching the base model.
    pub model_fetch: Option<f64>,
    /// The last participant's own account: local training.
    pub train: Option<f64>,
    /// The last participant's own account: clipping, encoding and storing its update.
    pub update_store: Option<f64>,
    /// From the last announcement to the round closing: fetching and checking updates.
    pub update_fetch: Option<f64>,
    /// Re-clipping, the aggregation rule and central noise.
    pub aggregate: Option<f64>,
    /// Scoring the new model on the aggregator's evaluation data.
    pub evaluate: Option<f64>,
    /// Storing the new model and waiting until another node holds a copy (also when the
    /// wait timed out and the round failed).
    pub model_publish: Option<f64>,
}

/// A node that can train: what data it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainerInfo {
    /// Features per example.
    pub features: u32,
    /// Classes its labels range over (the largest label + 1 it may hold).
    pub classes: u32,
    /// Training examples held.
    pub examples: u64,
    /// `builtin` or `external`.
    pub kind: String,
}

/// A change to a job, replicated through Raft.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobCommand {
    /// Records a new job.
    Submit(JobRecord),
    /// Opens a round (or a new attempt at the open one).
    StartRound {
        /// The job.
        job_id: String,
        /// The round.
        start: RoundStart,
    },
    /// Closes the open round with its result.
    EndRound {
        /// The job.
        job_id: String,
        /// What happened (boxed: far larger than the other commands).
        record: Box<RoundRecord>,
    },
    /// Ends a running job (budget exhausted, or it cannot run).
    Finish {
        /// The job.
        job_id: String,
        /// Done or failed.
        state: JobState,
        /// Why.
        message: String,
    },
    /// Cancels a running job.
    Cancel {
        /// The job.
        job_id: String,
    },
    /// Records (or, with `None`, forgets) what a node can train on.
    SetTrainer {
        /// The node.
        node_id: NodeId,
        /// Its data, or `None`.
        info: Option<TrainerInfo>,
    },
}

fn conflict(reason: impl Into<String>) -> CommandResult {
    CommandResult::Rejected(Rejection::JobConflict(reason.into()))
}

impl ClusterState {
    /// Applies a job command.
    pub(crate) fn apply_job(
        &mut self,
        cmd: &JobCommand,
        touched: &mut Vec<Touched>,
    ) -> CommandResult {
        match cmd {
            JobCommand::Submit(job) => {
                if self.jobs.contains_key(&job.id) {
                    return conflict(format!("job {} exists", job.id));
                }
                if self.jobs.len() >= MAX_JOBS {
                    return CommandResult::Rejected(Rejection::QuotaExceeded {
                        what: format!("{MAX_JOBS} jobs"),
                    });
                }
                if job.id.is_empty()
                    || job.id.len() > MAX_JOB_ID_LEN
                    || job.spec.len() > MAX_JOB_SPEC_LEN
                    || job.rounds == 0
                    || job.rounds > MAX_ROUNDS
                    || job.state != JobState::Running
                    || job.rounds_done != 0
                    || !job.history.is_empty()
                    || job.current.is_some()
                {
                    return conflict("malformed job record");
                }
                self.jobs.insert(job.id.clone(), job.clone());
                touched.push(Touched::Job(job.id.clone()));
                CommandResult::Done
            }
            JobCommand::StartRound { job_id, start } => {
                let job = match self.running_job(job_id) {
                    Ok(j) => j,
                    Err(r) => return r,
                };
                if start.round != job.rounds_done + 1 {
                    return conflict(format!(
                        "round {} cannot start: {} of {} rounds are done",
                        start.round, job.rounds_done, job.rounds
                    ));
                }
                let expected_attempt = job.failed_attempts + 1;
                // A new leader may open the same attempt again (its own clock, its own view of
                // who is alive); the round keeps its number and attempt.
                let reopening = job
                    .current
                    .as_ref()
                    .is_some_and(|c| c.round == start.round && c.attempt == start.attempt);
                if start.attempt != expected_attempt && !reopening {
                    return conflict(format!(
                        "attempt {} at round {} does not follow attempt {}",
                        start.attempt, start.round, job.failed_attempts
                    ));
                }
                if start.participants.is_empty() || start.participants.len() > MAX_PARTICIPANTS {
                    return conflict("a round needs 1 to 1024 participants");
                }
                if job.model_hash.as_deref() != Some(start.base_model.as_str()) {
                    return conflict("the round's base model is not the job's current model");
                }
                job.current = Some(start.clone());
                touched.push(Touched::Job(job_id.clone()));
                CommandResult::Done
            }
            JobCommand::EndRound { job_id, record } => {
                let job = match self.running_job(job_id) {
                    Ok(j) => j,
                    Err(r) => return r,
                };
                let open = job
                    .current
                    .as_ref()
                    .is_some_and(|c| c.round == record.round && c.attempt == record.attempt);
                if !open {
                    return conflict(format!(
                        "round {} attempt {} is not open",
                        record.round, record.attempt
                    ));
                }
                if record.updates.len() > MAX_PARTICIPANTS
                    || record.rejected.len() > 4 * MAX_PARTICIPANTS
                {
                    return conflict("round record too large");
                }
                job.current = None;
                match (&record.failed, &record.model_hash) {
                    (None, Some(hash)) => {
                        job.rounds_done += 1;
                        job.failed_attempts = 0;
                        job.model_hash = Some(hash.clone());
                        if job.rounds_done >= job.rounds {
                            job.state = JobState::Done;
                        }
                    }
                    (failed, _) => {
                        job.failed_attempts += 1;
                        if job.failed_attempts >= MAX_ROUND_ATTEMPTS {
                            job.state = JobState::Failed;
                            job.message = Some(truncate(&format!(
                                "round {} failed {} times; last: {}",
                                record.round,
                                job.failed_attempts,
                                failed.as_deref().unwrap_or("no model")
                            )));
                        }
                    }
                }
                job.history.push(RoundRecord::clone(record));
                touched.push(Touched::Job(job_id.clone()));
                CommandResult::Done
            }
            JobCommand::Finish {
                job_id,
                state,
                message,
            } => {
                let job = match self.running_job(job_id) {
                    Ok(j) => j,
                    Err(r) => return r,
                };
                if !state.is_final() {
                    return conflict("a job can only be finished as done or failed");
                }
                job.state = *state;
                job.current = None;
                job.message = Some(truncate(message));
                touched.push(Touched::Job(job_id.clone()));
                CommandResult::Done
            }
            JobCommand::Cancel { job_id } => {
                let job = match self.running_job(job_id) {
                    Ok(j) => j,
                    Err(r) => return r,
                };
                job.state = JobState::Cancelled;
                job.current = None;
                job.message = Some("cancelled".into());
                touched.push(Touched::Job(job_id.clone()));
                CommandResult::Done
            }
            JobCommand::SetTrainer { node_id, info } => {
                if !self.members.contains_key(node_id) {
                    return CommandResult::Rejected(Rejection::NotMember(*node_id));
                }
                match info {
                    Some(i) => self.trainers.insert(*node_id, i.clone()),
                    None => self.trainers.remove(node_id),
                };
                touched.push(Touched::Trainer(*node_id));
                CommandResult::Done
            }
        }
    }

    fn running_job(&mut self, job_id: &str) -> Result<&mut JobRecord, CommandResult> {
        match self.jobs.get_mut(job_id) {
            None => Err(CommandResult::Rejected(Rejection::NoSuchJob(
                job_id.to_string(),
            ))),
            Some(j) if j.state.is_final() => {
                Err(conflict(format!("job {job_id} has ended ({:?})", j.state)))
            }
            Some(j) => Ok(j),
        }
    }
}

fn truncate(s: &str) -> String {
    if s.len() <= MAX_MESSAGE_LEN {
        return s.to_string();
    }
    let mut end = MAX_MESSAGE_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{MemberRecord, MemberState};

    fn job(id: &str, rounds: u32) -> JobRecord {
        JobRecord {
            id: id.into(),
            spec: "{}".into(),
            submitted_at: 0,
            submitted_by: 1,
            state: JobState::Running,
            rounds,
            rounds_done: 0,
            model_hash: Some("m0".into()),
            current: None,
            history: vec![],
            failed_attempts: 0,
            message: None,
        }
    }

    fn start(round: u32, attempt: u32, base: &str) -> JobCommand {
        JobCommand::StartRound {
            job_id: "j".into(),
            start: RoundStart {
                round,
                attempt,
                base_model: base.into(),
                participants: vec![1, 2],
                started_at_ms: 0,
                deadline_ms: 1,
            },
        }
    }

    fn end(round: u32, attempt: u32, model: Option<&str>) -> JobCommand {
        JobCommand::EndRound {
            job_id: "j".into(),
            record: Box::new(RoundRecord {
                round,
                attempt,
                base_model: String::new(),
                participants: vec![1, 2],
                updates: vec![],
                selected: vec![],
                rejected: vec![],
                model_hash: model.map(str::to_string),
                noise_seed: None,
                loss: None,
                accuracy: None,
                train_loss: None,
                epsilon: None,
                secs: 0.0,
                failed: model.is_none().then(|| "too few updates".to_string()),
                started_at_ms: 0,
                timing: None,
            }),
        }
    }

    fn apply(s: &mut ClusterState, cmd: JobCommand) -> CommandResult {
        s.apply_job(&cmd, &mut Vec::new())
    }

    fn rejected(r: CommandResult) -> bool {
        matches!(r, CommandResult::Rejected(_))
    }

    #[test]
    fn rounds_run_in_order_and_the_job_ends_after_the_last() {
        let mut s = ClusterState::default();
        assert_eq!(
            apply(&mut s, JobCommand::Submit(job("j", 2))),
            CommandResult::Done
        );
        assert!(rejected(apply(&mut s, JobCommand::Submit(job("j", 2)))));
        assert!(rejected(apply(&mut s, start(2, 1, "m0"))), "skips a round");
        assert!(rejected(apply(&mut s, start(1, 1, "other"))), "wrong base");
        assert!(rejected(apply(&mut s, end(1, 1, Some("m1")))), "not open");
        assert_eq!(apply(&mut s, start(1, 1, "m0")), CommandResult::Done);
        // A new leader reopening the same attempt is fine.
        assert_eq!(apply(&mut s, start(1, 1, "m0")), CommandResult::Done);
        assert_eq!(apply(&mut s, end(1, 1, Some("m1"))), CommandResult::Done);
        assert!(
            rejected(apply(&mut s, end(1, 1, Some("m1")))),
            "replayed result"
        );
        assert_eq!(apply(&mut s, start(2, 1, "m1")), CommandResult::Done);
        assert_eq!(apply(&mut s, end(2, 1, Some("m2"))), CommandResult::Done);
        let j = &s.jobs["j"];
        assert_eq!(j.state, JobState::Done);
        assert_eq!(j.rounds_done, 2);
        assert_eq!(j.model_hash.as_deref(), Some("m2"));
        assert!(rejected(apply(&mut s, start(3, 1, "m2"))), "ended");
        assert!(rejected(apply(
            &mut s,
            JobCommand::Cancel { job_id: "j".into() }
        )));
    }

    #[test]
    fn a_round_that_keeps_failing_fails_the_job() {
        let mut s = ClusterState::default();
        apply(&mut s, JobCommand::Submit(job("j", 5)));
        for attempt in 1..=MAX_ROUND_ATTEMPTS {
            assert!(
                rejected(apply(&mut s, start(1, attempt + 1, "m0"))),
                "skips an attempt"
            );
            assert_eq!(apply(&mut s, start(1, attempt, "m0")), CommandResult::Done);
            assert_eq!(apply(&mut s, end(1, attempt, None)), CommandResult::Done);
        }
        let j = &s.jobs["j"];
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.history.len(), MAX_ROUND_ATTEMPTS as usize);
        assert!(j.message.as_deref().unwrap().contains("too few updates"));
    }

    #[test]
    fn cancel_and_trainers() {
        let mut s = ClusterState::default();
        apply(&mut s, JobCommand::Submit(job("j", 5)));
        apply(&mut s, start(1, 1, "m0"));
        assert_eq!(
            apply(&mut s, JobCommand::Cancel { job_id: "j".into() }),
            CommandResult::Done
        );
        assert_eq!(s.jobs["j"].state, JobState::Cancelled);
        assert!(s.jobs["j"].current.is_none());
        assert!(rejected(apply(&mut s, end(1, 1, Some("m1")))));
        assert!(rejected(apply(
            &mut s,
            JobCommand::Cancel { job_id: "x".into() }
        )));

        let info = TrainerInfo {
            features: 64,
            classes: 10,
            examples: 300,
            kind: "builtin".into(),
        };
        let set = |info: Option<TrainerInfo>| JobCommand::SetTrainer { node_id: 7, info };
        assert!(
            rejected(apply(&mut s, set(Some(info.clone())))),
            "not a member"
        );
        s.members.insert(
            7,
            MemberRecord {
                node_id: 7,
                peer_id: "p".into(),
                public_key: vec![],
                name: "n".into(),
                addrs: vec![],
                joined_at: 0,
                state: MemberState::Active,
                seal_keys: Vec::new(),
            },
        );
        assert_eq!(apply(&mut s, set(Some(info))), CommandResult::Done);
        assert_eq!(s.trainers.len(), 1);
        assert_eq!(apply(&mut s, set(None)), CommandResult::Done);
        assert!(s.trainers.is_empty());
    }
}
