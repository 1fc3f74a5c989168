//! The training job a user submits (interface.md, "Training job"), parsed strictly and checked
//! before anything is committed.

use agentmesh_consensus::{MAX_JOB_SPEC_LEN, MAX_ROUNDS};
use agentmesh_federated::{Aggregator, Architecture, Mixing, TrainConfig};
use serde::{Deserialize, Serialize};

/// Longest round timeout a job may ask for.
pub const MAX_ROUND_TIMEOUT_SECS: u64 = 24 * 3600;

/// A training job as submitted. Unknown fields are refused, so a typo is an error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// `softmax` or `mlp`.
    pub model: String,
    /// Hidden layer widths (MLP only).
    #[serde(default)]
    pub hidden: Vec<usize>,
    /// Features per example.
    pub dataset_features: usize,
    /// Number of classes.
    pub classes: usize,
    /// Rounds to run.
    pub rounds: u32,
    /// Passes over the local data per round.
    #[serde(default = "one")]
    pub local_epochs: usize,
    /// Minibatch size.
    #[serde(default = "batch")]
    pub batch_size: usize,
    /// Local SGD step size.
    #[serde(default = "lr")]
    pub learning_rate: f32,
    /// Local SGD momentum.
    #[serde(default)]
    pub momentum: f32,
    /// `fedavg`, `krum`, `multikrum`, `trimmed_mean`, `median` or `bulyan`.
    #[serde(default = "fedavg")]
    pub aggregator: String,
    /// f: faulty participants to tolerate (Krum family, Bulyan).
    #[serde(default)]
    pub byzantine: usize,
    /// β for trimmed mean: the fraction cut from each side.
    #[serde(default = "trim")]
    pub trim_ratio: f64,
    /// `none`, or `nnm`: nearest-neighbour mixing of the updates (with f = `byzantine`)
    /// before the rule.
    #[serde(default = "no_mixing", skip_serializing_if = "is_no_mixing")]
    pub mixing: String,
    /// Multi-Krum: updates to average [default: n − f].
    #[serde(default)]
    pub multikrum_m: Option<usize>,
    /// Fewest valid updates a round needs.
    #[serde(default = "one")]
    pub min_participants: usize,
    /// Seconds a round waits for updates before closing with what it has.
    #[serde(default = "timeout")]
    pub round_timeout_secs: u64,
    /// Differential privacy, or `null`.
    #[serde(default)]
    pub privacy: Option<PrivacySpec>,
    /// Hash of a safetensors blob to start from, or `null` for a fresh model.
    #[serde(default)]
    pub initial_model: Option<String>,
    /// Seed of the initial model and local shuffling [default: from the job id].
    #[serde(default)]
    pub seed: Option<u64>,
}

/// Differential privacy for a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacySpec {
    /// C: every update is clipped to this L2 norm (by its sender, and again by the aggregator).
    pub clip_norm: f64,
    /// z: Gaussian noise of standard deviation z·C/n on the aggregate (central), or z·C on
    /// each update (local).
    pub noise_multiplier: f64,
    /// δ at which ε is reported.
    pub delta: f64,
    /// Stop the job before a round would take ε above this.
    #[serde(default)]
    pub max_epsilon: Option<f64>,
    /// `central` (the aggregator adds noise) or `local` (each participant does).
    #[serde(default = "central")]
    pub mode: String,
}

fn one() -> usize {
    1
}
fn batch() -> usize {
    32
}
fn lr() -> f32 {
    0.1
}
fn fedavg() -> String {
    "fedavg".into()
}
fn trim() -> f64 {
    0.1
}
fn no_mixing() -> String {
    "none".into()
}
// Left out of stored specs when off, so nodes that predate mixing can still read them.
fn is_no_mixing(m: &str) -> bool {
    m == "none"
}
fn timeout() -> u64 {
    60
}
fn central() -> String {
    "central".into()
}

impl JobSpec {
    /// Parses and checks a job (JSON text).
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.len() > MAX_JOB_SPEC_LEN {
            return Err(format!("job spec larger than {MAX_JOB_SPEC_LEN} bytes"));
        }
        let spec: Self = serde_json::from_str(text).map_err(|e| format!("job spec: {e}"))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every field, naming the one at fault.
    pub fn validate(&self) -> Result<(), String> {
        self.architecture()?
            .validate()
            .map_err(|e| format!("model: {e}"))?;
        if self.rounds == 0 || self.rounds > MAX_ROUNDS {
            return Err(format!("rounds must be 1 to {MAX_ROUNDS}"));
        }
        if self.local_epochs == 0 || self.local_epochs > 1000 {
            return Err("local_epochs must be 1 to 1000".into());
        }
        if self.batch_size == 0 || self.batch_size > 1 << 20 {
            return Err("batch_size must be 1 to 1048576".into());
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return Err("learning_rate must be a positive number".into());
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err("momentum must be in [0, 1)".into());
        }
        if self.min_participants == 0 {
            return Err("min_participants must be at least 1".into());
        }
        if self.round_timeout_secs == 0 || self.round_timeout_secs > MAX_ROUND_TIMEOUT_SECS {
            return Err(format!(
                "round_timeout_secs must be 1 to {MAX_ROUND_TIMEOUT_SECS}"
            ));
        }
        // The rule must exist, and suit the smallest round the job accepts.
        let smallest = self.min_participants.max(self.needed_for_rule());
        let rule = self.aggregator(smallest)?;
        rule.check(smallest)
            .map_err(|e| format!("aggregator: {e}"))?;
        let mixing = self.mixing()?;
        if mixing != Mixing::None && self.byzantine == 0 {
            return Err(format!(
                "mixing {:?} mixes each update with the n − f nearest, so it needs byzantine \
                 (f) of at least 1; with f = 0 every update becomes the plain mean",
                self.mixing
            ));
        }
        if mixing != Mixing::None && self.privacy.as_ref().is_some_and(|p| p.mode == "central") {
            return Err(format!(
                "mixing {:?} and central privacy cannot be combined: after mixing one update \
                 enters up to n − f means, so noise for a sensitivity of C/n would understate ε \
                 (local noise, added by each sender before mixing, is unaffected)",
                self.mixing
            ));
        }
        mixing.check(smallest).map_err(|e| format!("mixing: {e}"))?;
        if let Some(p) = &self.privacy {
            if !(p.clip_norm > 0.0 && p.clip_norm.is_finite()) {
                return Err("privacy.clip_norm must be a positive number".into());
            }
            if !(p.noise_multiplier >= 0.0 && p.noise_multiplier.is_finite()) {
                return Err("privacy.noise_multiplier must be ≥ 0".into());
            }
            if !(p.delta > 0.0 && p.delta < 1.0) {
                return Err("privacy.delta must be in (0, 1)".into());
            }
            if p.max_epsilon.is_some_and(|e| !(e > 0.0 && e.is_finite())) {
                return Err("privacy.max_epsilon must be a positive number".into());
            }
            if p.mode != "central" && p.mode != "local" {
                return Err(format!(
                    "privacy.mode {:?}: use \"central\" or \"local\"",
                    p.mode
                ));
            }
        }
        if let Some(h) = &self.initial_model {
            h.parse::<agentmesh_protocols::blob::BlobHash>()
                .map_err(|e| format!("initial_model: {e}"))?;
        }
        Ok(())
    }

    /// The fewest updates the rule (and the mixing before it) can work with.
    fn needed_for_rule(&self) -> usize {
        let f = self.byzantine;
        let rule = match self.aggregator.as_str() {
            "krum" | "multikrum" => 2 * f + 3,
            "bulyan" => 4 * f + 3,
            _ => 1,
        };
        rule.max(self.mixing().map_or(1, |m| m.min_updates()))
    }

    /// The mixing run on a round's updates before the rule.
    pub fn mixing(&self) -> Result<Mixing, String> {
        Mixing::from_name(&self.mixing, self.byzantine).map_err(|e| e.to_string())
    }

    /// The model architecture.
    pub fn architecture(&self) -> Result<Architecture, String> {
        match self.model.as_str() {
            "softmax" => {
                if !self.hidden.is_empty() {
                    return Err("hidden layers are for \"mlp\"; softmax has none".into());
                }
                Ok(Architecture::Softmax {
                    inputs: self.dataset_features,
                    classes: self.classes,
                })
            }
            "mlp" => Ok(Architecture::Mlp {
                inputs: self.dataset_features,
                hidden: self.hidden.clone(),
                classes: self.classes,
            }),
            other => Err(format!("model {other:?}: use \"softmax\" or \"mlp\"")),
        }
    }

    /// The aggregation rule for a round of `n` updates.
    pub fn aggregator(&self, n: usize) -> Result<Aggregator, String> {
        Aggregator::from_method(
            &self.aggregator,
            self.byzantine,
            self.multikrum_m,
            self.trim_ratio,
            n,
        )
        .map_err(|e| format!("aggregator: {e}"))
    }

    /// Local training settings for one participant's round.
    pub fn train_config(&self, seed: u64) -> TrainConfig {
        TrainConfig {
            epochs: self.local_epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            momentum: self.momentum,
            seed,
            dp_sgd: None,
        }
    }

    /// Noise standard deviation the aggregator adds to a mean of `n` updates, if any.
    pub fn central_noise_std(&self, n: usize) -> Option<f64> {
        let p = self.privacy.as_ref()?;
        (p.mode == "central" && p.noise_multiplier > 0.0 && n > 0)
            .then(|| p.noise_multiplier * p.clip_norm / n as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_job_parses_with_defaults() {
        let s =
            JobSpec::parse(r#"{"model":"softmax","dataset_features":64,"classes":10,"rounds":5}"#)
                .unwrap();
        assert_eq!(s.aggregator, "fedavg");
        assert_eq!(s.batch_size, 32);
        assert_eq!(s.round_timeout_secs, 60);
        assert!(s.privacy.is_none());
    }

    #[test]
    fn bad_jobs_name_their_fault() {
        let bad = |json: &str, needle: &str| {
            let e = JobSpec::parse(json).unwrap_err();
            assert!(e.contains(needle), "{json}: {e}");
        };
        let base = r#""dataset_features":64,"classes":10,"rounds":5"#;
        bad(&format!(r#"{{"model":"cnn",{base}}}"#), "model");
        bad(&format!(r#"{{"model":"softmax",{base},"typo":1}}"#), "typo");
        bad(
            &format!(r#"{{"model":"softmax",{base},"aggregator":"mean"}}"#),
            "aggregator",
        );
        bad(
            &format!(
                r#"{{"model":"softmax",{base},"aggregator":"trimmed_mean","trim_ratio":0.7}}"#
            ),
            "aggregator",
        );
        bad(
            &format!(r#"{{"model":"softmax",{base},"learning_rate":-1}}"#),
            "learning_rate",
        );
        bad(
            &format!(
                r#"{{"model":"softmax",{base},"privacy":{{"clip_norm":0,"noise_multiplier":1,"delta":1e-5}}}}"#
            ),
            "clip_norm",
        );
        bad(
            r#"{"model":"softmax","dataset_features":64,"classes":10,"rounds":0}"#,
            "rounds",
        );
        bad("[1,2", "job spec");
        bad(
            &format!(r#"{{"model":"softmax",{base},"mixing":"buckets","byzantine":1}}"#),
            "none or nnm",
        );
        bad(
            &format!(r#"{{"model":"softmax",{base},"mixing":"nnm"}}"#),
            "byzantine",
        );
        bad(
            &format!(
                r#"{{"model":"softmax",{base},"mixing":"nnm","byzantine":1,"privacy":{{"clip_norm":1,"noise_multiplier":1,"delta":1e-5}}}}"#
            ),
            "central privacy cannot be combined",
        );
    }

    #[test]
    fn mixing_is_off_unless_asked_and_sets_the_smallest_round() {
        let base = r#""model":"softmax","dataset_features":64,"classes":10,"rounds":5"#;
        let plain = JobSpec::parse(&format!("{{{base}}}")).unwrap();
        assert_eq!(plain.mixing().unwrap(), Mixing::None);
        let nnm = JobSpec::parse(&format!(
            r#"{{{base},"aggregator":"median","mixing":"nnm","byzantine":2,"min_participants":5}}"#
        ))
        .unwrap();
        assert_eq!(nnm.mixing().unwrap(), Mixing::Nnm { f: 2 });
        assert_eq!(nnm.needed_for_rule(), 5);
        // Stored specs name the mixing only when it is on.
        let stored = |s: &JobSpec| serde_json::to_value(s).unwrap();
        assert_eq!(stored(&nnm)["mixing"], "nnm");
        assert!(stored(&plain).get("mixing").is_none());
    }
}
