//! Local training: the [`Trainer`] trait, the built-in ndarray trainer
//! ([`LocalTrainer`], optionally with DP-SGD), and [`ExternalTrainer`], which
//! runs a user's program over a file protocol.

mod external;

pub use external::{ExternalTrainer, EXTERNAL_PROTOCOL_VERSION, MAX_RESULT_SIZE};

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::model::{Evaluation, Model, ModelError, Sgd};
use crate::privacy::{add_gaussian_noise, clip_l2};

/// Hyperparameters of one local training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Passes over the local data.
    pub epochs: usize,
    /// Examples per step (the expected batch size under DP-SGD).
    pub batch_size: usize,
    /// SGD step size.
    pub learning_rate: f32,
    /// SGD momentum (0 for plain SGD).
    pub momentum: f32,
    /// Seeds shuffling (and DP-SGD sampling and noise).
    pub seed: u64,
    /// Example-level DP-SGD (Abadi et al. 2016), or `None`.
    pub dp_sgd: Option<DpSgd>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 1,
            batch_size: 32,
            learning_rate: 0.1,
            momentum: 0.0,
            seed: 0,
            dp_sgd: None,
        }
    }
}

/// DP-SGD: each step samples every example independently with probability
/// q = batch_size / n (Poisson sampling, which the accountant assumes), clips
/// each example's gradient to `clip_norm`, sums, adds N(0, (z·C)²) and divides
/// by the expected batch size.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DpSgd {
    /// C: per-example gradient clip norm.
    pub clip_norm: f64,
    /// z: noise multiplier.
    pub noise_multiplier: f64,
}

impl DpSgd {
    /// The sampling rate and number of steps one run of `config` makes over
    /// `examples` examples, for the accountant.
    pub fn steps(config: &TrainConfig, examples: usize) -> (f64, u64) {
        let n = examples.max(1);
        let batch = config.batch_size.clamp(1, n);
        let q = batch as f64 / n as f64;
        let steps = (config.epochs * n.div_ceil(batch)) as u64;
        (q, steps)
    }
}

/// What local training produced.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainOutput {
    /// New parameters minus the global ones.
    pub delta: Vec<f32>,
    /// Examples trained on.
    pub examples: u64,
    /// Loss and accuracy of the trained model on the local data.
    pub metrics: Evaluation,
}

/// Why local training failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The data does not fit the model.
    #[error("model: {0}")]
    Model(#[from] ModelError),
    /// A hyperparameter is unusable.
    #[error("invalid training config: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },
    /// There is no local data.
    #[error("no local training data")]
    NoData,
    /// Preparing or reading the external trainer's files failed.
    #[error("external trainer: {context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The external trainer could not be started.
    #[error("external trainer: cannot start {command:?}: {source}")]
    Spawn {
        /// The program.
        command: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The external trainer ran past its time limit and was killed.
    #[error("external trainer: no result after {secs:.1} s, killed")]
    Timeout {
        /// The limit, in seconds.
        secs: f64,
    },
    /// The external trainer exited unsuccessfully.
    #[error("external trainer exited with {status}; stderr ends with:\n{stderr_tail}")]
    Crashed {
        /// The exit status as text (code or signal).
        status: String,
        /// The last part of its standard error.
        stderr_tail: String,
    },
    /// The external trainer's output is missing or malformed.
    #[error("external trainer: bad {file}: {reason}")]
    Malformed {
        /// The file concerned.
        file: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Turns a global model and local data into an update.
pub trait Trainer {
    /// Trains a copy of `global` on `data` and returns the difference.
    fn train(
        &self,
        global: &Model,
        data: &Dataset,
        config: &TrainConfig,
    ) -> Result<TrainOutput, TrainError>;
}

/// The built-in trainer: minibatch SGD with momentum on the ndarray model.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalTrainer;

impl Trainer for LocalTrainer {
    fn train(
        &self,
        global: &Model,
        data: &Dataset,
        config: &TrainConfig,
    ) -> Result<TrainOutput, TrainError> {
        if data.is_empty() {
            return Err(TrainError::NoData);
        }
        if config.batch_size == 0 || !config.learning_rate.is_finite() {
            return Err(TrainError::Config {
                reason: format!(
                    "batch_size {} and learning_rate {} must be positive and finite",
                    config.batch_size, config.learning_rate
                ),
            });
        }
        let mut model = global.clone();
        let mut sgd = Sgd::new(model.params().len(), config.learning_rate, config.momentum);
        let mut grad = vec![0.0f32; model.params().len()];
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        match config.dp_sgd {
            None => {
                let mut order: Vec<usize> = (0..data.len()).collect();
                for _ in 0..config.epochs {
                    order.shuffle(&mut rng);
                    for batch in order.chunks(config.batch_size) {
                        let b = data.subset(batch);
                        model.loss_and_gradient(b.features(), b.labels(), &mut grad)?;
                        sgd.step(model.params_mut(), &grad);
                    }
                }
            }
            Some(dp) => {
                let (q, steps) = DpSgd::steps(config, data.len());
                let expected_batch = q * data.len() as f64;
                let mut example_grad = vec![0.0f32; grad.len()];
                for _ in 0..steps {
                    grad.fill(0.0);
                    for i in 0..data.len() {
                        if rng.random::<f64>() >= q {
                            continue;
                        }
                        let one = data.subset(&[i]);
                        model.loss_and_gradient(one.features(), one.labels(), &mut example_grad)?;
                        clip_l2(&mut example_grad, dp.clip_norm);
                        for (g, e) in grad.iter_mut().zip(&example_grad) {
                            *g += e;
                        }
                    }
                    add_gaussian_noise(&mut grad, dp.noise_multiplier * dp.clip_norm, &mut rng);
                    let scale = (1.0 / expected_batch) as f32;
                    for g in grad.iter_mut() {
                        *g *= scale;
                    }
                    sgd.step(model.params_mut(), &grad);
                }
            }
        }
        let metrics = model.evaluate(data)?;
        let delta = model
            .params()
            .iter()
            .zip(global.params())
            .map(|(new, old)| new - old)
            .collect();
        Ok(TrainOutput {
            delta,
            examples: data.len() as u64,
            metrics,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Standardizer;
    use crate::model::Architecture;

    fn digits() -> (Dataset, Dataset) {
        let (mut train, mut test) = Dataset::digits().unwrap().split(0.2, 0).unwrap();
        let s = Standardizer::fit(&train);
        s.apply(&mut train).unwrap();
        s.apply(&mut test).unwrap();
        (train, test)
    }

    #[test]
    fn local_training_improves_and_is_deterministic() -> anyhow::Result<()> {
        let (train, test) = digits();
        let arch = Architecture::Mlp {
            inputs: 64,
            hidden: vec![32],
            classes: 10,
        };
        let global = Model::new(arch, 1)?;
        let config = TrainConfig {
            epochs: 3,
            learning_rate: 0.05,
            momentum: 0.9,
            ..TrainConfig::default()
        };
        let out = LocalTrainer.train(&global, &train, &config)?;
        assert_eq!(out.examples, train.len() as u64);
        assert_eq!(LocalTrainer.train(&global, &train, &config)?, out);
        let mut trained = global.clone();
        trained.apply_delta(&out.delta)?;
        let acc = trained.evaluate(&test)?.accuracy;
        assert!(acc > 0.93, "{acc}");
        Ok(())
    }

    #[test]
    fn dp_sgd_still_learns() -> anyhow::Result<()> {
        let (train, test) = digits();
        let arch = Architecture::Softmax {
            inputs: 64,
            classes: 10,
        };
        let global = Model::new(arch, 1)?;
        let config = TrainConfig {
            epochs: 2,
            batch_size: 64,
            learning_rate: 0.5,
            dp_sgd: Some(DpSgd {
                clip_norm: 1.0,
                noise_multiplier: 1.0,
            }),
            ..TrainConfig::default()
        };
        let out = LocalTrainer.train(&global, &train, &config)?;
        let mut trained = global.clone();
        trained.apply_delta(&out.delta)?;
        let acc = trained.evaluate(&test)?.accuracy;
        assert!(acc > 0.8, "{acc}");
        Ok(())
    }
}
