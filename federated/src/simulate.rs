//! In-process federated simulation: N clients, each with its own shard, train
//! locally every round; attackers replace their updates; the server clips and
//! noises (if DP is on), validates, aggregates and applies the result; the
//! global model is evaluated on held-out data after every round.

use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::aggregate::{validate, AggregateError, Aggregator, Mixing, Update};
use crate::attack::Attack;
use crate::data::Dataset;
use crate::model::{Architecture, Model, ModelError};
use crate::privacy::{
    add_gaussian_noise, clip_l2, default_orders, epsilon_from_rdp, poisson_gaussian_rdp,
    AccountantError, DpConfig, NoiseMode, PrivacyError,
};
use crate::trainer::{DpSgd, LocalTrainer, TrainConfig, TrainError, Trainer};

/// Byzantine clients and what they send.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attackers {
    /// The attack.
    pub attack: Attack,
    /// How many clients (the first ones) are Byzantine.
    pub count: usize,
}

/// One simulated federated training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SimulationConfig {
    /// The model trained.
    pub architecture: Architecture,
    /// Rounds to run.
    pub rounds: usize,
    /// Local training per client per round (its seed is mixed with the round
    /// and client, so every run is reproducible).
    pub train: TrainConfig,
    /// The aggregation rule.
    pub aggregator: Aggregator,
    /// Run on the updates before the rule.
    #[serde(default)]
    pub mixing: Mixing,
    /// Byzantine clients, if any.
    pub attackers: Option<Attackers>,
    /// Update-level (client-level) DP applied by the server, if any. All
    /// updates then weigh the same, so the mean has sensitivity C/n.
    pub privacy: Option<DpConfig>,
    /// δ for reporting the ε of example-level DP-SGD (`train.dp_sgd`).
    pub dp_sgd_delta: f64,
    /// Scales the aggregate before it is applied.
    pub server_learning_rate: f32,
    /// Seeds the model initialisation and the server's noise.
    pub seed: u64,
}

impl SimulationConfig {
    /// FedAvg, no attack, no DP, with the given model and local training.
    pub fn new(architecture: Architecture, rounds: usize, train: TrainConfig) -> Self {
        Self {
            architecture,
            rounds,
            train,
            aggregator: Aggregator::FedAvg,
            mixing: Mixing::None,
            attackers: None,
            privacy: None,
            dp_sgd_delta: 1e-5,
            server_learning_rate: 1.0,
            seed: 0,
        }
    }
}

/// What one round did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundMetrics {
    /// 1-based round number.
    pub round: usize,
    /// Test loss of the global model after the round.
    pub loss: f64,
    /// Test accuracy after the round.
    pub accuracy: f64,
    /// ε spent so far (update-level DP, or the largest over clients for DP-SGD).
    pub epsilon: Option<f64>,
    /// Clients whose updates the aggregate was built from.
    pub selected: Vec<usize>,
    /// How many of those were Byzantine.
    pub byzantine_selected: usize,
    /// Updates rejected by validation.
    pub rejected: usize,
    /// Whether the aggregate was applied (false when no update was valid or
    /// the aggregate overflowed).
    pub applied: bool,
    /// The clip norm used this round (update-level DP).
    pub clip_norm: Option<f64>,
    /// Wall time of the round.
    pub secs: f64,
}

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimulationError {
    /// The model could not be built or applied.
    #[error("model: {0}")]
    Model(#[from] ModelError),
    /// Local training failed.
    #[error("client {client}: {source}")]
    Train {
        /// The client.
        client: usize,
        /// What went wrong.
        source: TrainError,
    },
    /// The aggregator refused the round.
    #[error("round {round}: {source}")]
    Aggregate {
        /// The round.
        round: usize,
        /// What went wrong.
        source: AggregateError,
    },
    /// The privacy configuration is unusable.
    #[error(transparent)]
    Privacy(#[from] PrivacyError),
    /// More attackers than clients, or no clients.
    #[error("{attackers} attackers among {clients} clients")]
    Clients {
        /// Clients (shards).
        clients: usize,
        /// Attackers asked for.
        attackers: usize,
    },
    /// Mixing before the rule together with central noise: an update then enters up to
    /// n − f means, so noise sized for a sensitivity of C/n would understate ε.
    #[error(
        "mixing {0:?} cannot be combined with central DP noise: after mixing one update \
         enters up to n − f means, so the reported ε would be too low"
    )]
    MixingWithCentralNoise(Mixing),
}

impl From<AccountantError> for SimulationError {
    fn from(e: AccountantError) -> Self {
        Self::Privacy(PrivacyError::Accountant(e))
    }
}

/// Runs the simulation: one client per shard, evaluated on `test`.
pub fn simulate(
    config: &SimulationConfig,
    shards: &[Dataset],
    test: &Dataset,
) -> Result<Vec<RoundMetrics>, SimulationError> {
    let n = shards.len();
    let byzantine = config.attackers.map_or(0, |a| a.count);
    if n == 0 || byzantine > n {
        return Err(SimulationError::Clients {
            clients: n,
            attackers: byzantine,
        });
    }
    if let Some(p) = &config.privacy {
        p.validate()?;
        if p.mode == NoiseMode::Central && config.mixing != Mixing::None {
            return Err(SimulationError::MixingWithCentralNoise(config.mixing));
        }
    }
    let mut global = Model::new(config.architecture.clone(), config.seed)?;
    let mut server_rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0x5eed_5e7e);
    let mut clip_norm = config.privacy.as_ref().map(|p| p.clip_norm);
    let orders = default_orders();
    // Per-round RDP of each accounting unit, computed once: the server's
    // Gaussian mechanism (q = 1: every client takes part every round) or each
    // client's DP-SGD steps.
    let round_rdp: Vec<Vec<f64>> = match (&config.privacy, &config.train.dp_sgd) {
        (Some(p), _) => vec![poisson_gaussian_rdp(1.0, p.noise_multiplier, &orders)?],
        (None, Some(dp)) => shards
            .iter()
            .map(|s| {
                let (q, steps) = DpSgd::steps(&config.train, s.len());
                let rdp = poisson_gaussian_rdp(q, dp.noise_multiplier, &orders)?;
                Ok(rdp.into_iter().map(|r| r * steps as f64).collect())
            })
            .collect::<Result<_, AccountantError>>()?,
        (None, None) => Vec::new(),
    };
    let delta = config
        .privacy
        .as_ref()
        .map_or(config.dp_sgd_delta, |p| p.delta);

    let mut history = Vec::with_capacity(config.rounds);
    for round in 1..=config.rounds {
        let started = Instant::now();
        let outputs = train_clients(config, &global, shards, round)?;
        let own: Vec<Vec<f32>> = outputs.iter().map(|o| o.delta.clone()).collect();
        let honest: Vec<&[f32]> = own[byzantine..].iter().map(Vec::as_slice).collect();
        let mut updates: Vec<Update> = outputs
            .iter()
            .enumerate()
            .map(|(client, out)| {
                let delta = match config.attackers {
                    Some(a) if client < a.count => {
                        let mut rng = client_rng(config.seed ^ 0xbad, round, client);
                        a.attack.corrupt(&out.delta, &honest, n, a.count, &mut rng)
                    }
                    _ => out.delta.clone(),
                };
                Update::new(delta, out.examples)
            })
            .collect();

        let mut norms = Vec::new();
        if let (Some(p), Some(c)) = (&config.privacy, clip_norm) {
            let z = p.update_noise_multiplier();
            for u in &mut updates {
                norms.push(clip_l2(&mut u.delta, c));
                // Equal weights: the mean of clipped updates then has
                // sensitivity C/n, which the accountant assumes.
                u.examples = 1;
                if p.mode == NoiseMode::Local {
                    add_gaussian_noise(&mut u.delta, z * c, &mut server_rng);
                }
            }
        }

        let validated = validate(updates, global.params().len());
        let accepted = validated.accepted.len();
        // A round with nothing valid to aggregate leaves the model as it was.
        let mut aggregate = if accepted == 0 {
            None
        } else {
            Some(
                config
                    .aggregator
                    .aggregate_after(&config.mixing, &validated.accepted)
                    .map_err(|source| SimulationError::Aggregate { round, source })?,
            )
        };
        if let Some(agg) = &mut aggregate {
            if let (Some(p), Some(c)) = (&config.privacy, clip_norm) {
                if p.mode == NoiseMode::Central {
                    let std = p.update_noise_multiplier() * c / accepted as f64;
                    add_gaussian_noise(&mut agg.delta, std, &mut server_rng);
                }
            }
            for v in &mut agg.delta {
                *v *= config.server_learning_rate;
            }
        }
        // Finite updates can still average to an overflow (a diverging
        // FedAvg under attack); such a step is not applied.
        let applied = aggregate
            .as_ref()
            .is_some_and(|a| a.delta.iter().all(|v| v.is_finite()));
        if let (true, Some(agg)) = (applied, &aggregate) {
            global.apply_delta(&agg.delta)?;
        }
        let selected = aggregate.map(|a| a.selected).unwrap_or_default();
        let eval = global.evaluate(test)?;

        let epsilon = (!round_rdp.is_empty())
            .then(|| {
                round_rdp
                    .iter()
                    .map(|rdp| {
                        let total: Vec<f64> = rdp.iter().map(|r| r * round as f64).collect();
                        epsilon_from_rdp(&orders, &total, delta).map(|e| e.0)
                    })
                    .try_fold(0.0f64, |m, e| e.map(|e| m.max(e)))
            })
            .transpose()?;
        let used_clip = clip_norm;
        if let (Some(p), Some(c)) = (&config.privacy, clip_norm) {
            if let Some(adaptive) = &p.adaptive {
                clip_norm = Some(adaptive.next_clip_norm(c, &norms, &mut server_rng));
            }
        }
        history.push(RoundMetrics {
            round,
            loss: eval.loss,
            accuracy: eval.accuracy,
            epsilon,
            byzantine_selected: selected.iter().filter(|&&i| i < byzantine).count(),
            selected,
            applied,
            rejected: validated.rejected.len(),
            clip_norm: used_clip,
            secs: started.elapsed().as_secs_f64(),
        });
    }
    Ok(history)
}

fn client_rng(seed: u64, round: usize, client: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(((round as u64) << 32) | client as u64);
    rng
}

fn client_seed(seed: u64, round: usize, client: usize) -> u64 {
    use rand::RngCore;
    client_rng(seed, round, client).next_u64()
}

/// Trains every client on its shard, spread over the available cores.
fn train_clients(
    config: &SimulationConfig,
    global: &Model,
    shards: &[Dataset],
    round: usize,
) -> Result<Vec<crate::trainer::TrainOutput>, SimulationError> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .min(shards.len())
        .max(1);
    let run = |client: usize| {
        let train = TrainConfig {
            seed: client_seed(config.train.seed, round, client),
            ..config.train.clone()
        };
        LocalTrainer
            .train(global, &shards[client], &train)
            .map_err(|source| SimulationError::Train { client, source })
    };
    let results: Vec<Result<_, SimulationError>> = std::thread::scope(|s| {
        let run = &run;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t..shards.len())
                        .step_by(threads)
                        .map(|c| (c, run(c)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<(usize, Result<_, SimulationError>)> = Vec::new();
        for h in handles {
            match h.join() {
                Ok(part) => all.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        all.sort_by_key(|(c, _)| *c);
        all.into_iter().map(|(_, r)| r).collect()
    });
    results.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Standardizer;
    use crate::partition::{partition, Partition};
    use crate::trainer::DpSgd;

    fn setup() -> (Vec<Dataset>, Dataset) {
        let (mut train, mut test) = Dataset::digits().unwrap().split(0.2, 0).unwrap();
        let s = Standardizer::fit(&train);
        s.apply(&mut train).unwrap();
        s.apply(&mut test).unwrap();
        (
            partition(&train, 10, Partition::dirichlet(0.5), 0).unwrap(),
            test,
        )
    }

    fn config(aggregator: Aggregator) -> SimulationConfig {
        let arch = Architecture::Softmax {
            inputs: 64,
            classes: 10,
        };
        let train = TrainConfig {
            epochs: 1,
            batch_size: 32,
            learning_rate: 0.1,
            momentum: 0.5,
            ..TrainConfig::default()
        };
        SimulationConfig {
            aggregator,
            ..SimulationConfig::new(arch, 8, train)
        }
    }

    fn last(h: &[RoundMetrics]) -> f64 {
        h.last().map_or(0.0, |m| m.accuracy)
    }

    #[test]
    fn fedavg_learns_and_is_reproducible() -> anyhow::Result<()> {
        let (shards, test) = setup();
        let cfg = config(Aggregator::FedAvg);
        let h = simulate(&cfg, &shards, &test)?;
        assert!(last(&h) > 0.9, "{}", last(&h));
        let again = simulate(&cfg, &shards, &test)?;
        let acc = |h: &[RoundMetrics]| h.iter().map(|m| m.accuracy).collect::<Vec<_>>();
        assert_eq!(acc(&h), acc(&again));
        Ok(())
    }

    #[test]
    fn multikrum_survives_sign_flip_that_breaks_fedavg() -> anyhow::Result<()> {
        let (shards, test) = setup();
        let attackers = Some(Attackers {
            attack: Attack::SignFlip { scale: 10.0 },
            count: 2,
        });
        let fedavg = simulate(
            &SimulationConfig {
                attackers,
                ..config(Aggregator::FedAvg)
            },
            &shards,
            &test,
        )?;
        let krum = simulate(
            &SimulationConfig {
                attackers,
                ..config(Aggregator::MultiKrum { f: 2, m: 6 })
            },
            &shards,
            &test,
        )?;
        assert!(last(&fedavg) < 0.5, "fedavg {}", last(&fedavg));
        assert!(last(&krum) > 0.85, "multikrum {}", last(&krum));
        assert!(krum.iter().all(|m| m.byzantine_selected == 0));
        Ok(())
    }

    /// The targets, at the example's settings (see
    /// `examples/simulate.rs`): MLP centralized ≥ 97%, federated FedAvg on
    /// Dirichlet(0.5) shards within 2 points of it, robust rules within 5
    /// points of clean under a Gaussian attack while FedAvg loses more, and
    /// ≥ 90% with DP-SGD at ε ≤ 8.
    #[test]
    fn digits_targets() -> anyhow::Result<()> {
        let (mut train, mut test) = Dataset::digits()?.split(0.2, 1)?;
        let s = Standardizer::fit(&train);
        s.apply(&mut train)?;
        s.apply(&mut test)?;
        let shards = partition(&train, 10, Partition::dirichlet(0.5), 1)?;
        let mlp = Architecture::Mlp {
            inputs: 64,
            hidden: vec![64],
            classes: 10,
        };
        let local = TrainConfig {
            epochs: 2,
            batch_size: 16,
            learning_rate: 0.05,
            momentum: 0.9,
            seed: 1,
            dp_sgd: None,
        };
        let model = Model::new(mlp.clone(), 1)?;
        let central_cfg = TrainConfig {
            epochs: 40,
            ..local.clone()
        };
        let out = LocalTrainer.train(&model, &train, &central_cfg)?;
        let mut central = model.clone();
        central.apply_delta(&out.delta)?;
        let central = central.evaluate(&test)?.accuracy;
        assert!(central >= 0.97, "centralized {central}");

        let base = SimulationConfig {
            seed: 1,
            ..SimulationConfig::new(mlp.clone(), 30, local)
        };
        let fedavg = last(&simulate(&base, &shards, &test)?);
        assert!(fedavg >= central - 0.02, "fedavg {fedavg} vs {central}");

        let gaussian = Some(Attackers {
            attack: Attack::GaussianNoise { std: 100.0 },
            count: 2,
        });
        let attacked = |aggregator| {
            simulate(
                &SimulationConfig {
                    aggregator,
                    attackers: gaussian,
                    ..base.clone()
                },
                &shards,
                &test,
            )
            .map(|h| last(&h))
        };
        let median = attacked(Aggregator::Median)?;
        assert!(median >= fedavg - 0.05, "median {median}");
        assert!(attacked(Aggregator::FedAvg)? < median);

        let dp = SimulationConfig {
            train: TrainConfig {
                epochs: 1,
                batch_size: 128,
                learning_rate: 1.0,
                momentum: 0.5,
                seed: 1,
                dp_sgd: Some(DpSgd {
                    clip_norm: 1.0,
                    noise_multiplier: 5.0,
                }),
            },
            ..base.clone()
        };
        let h = simulate(&dp, &shards, &test)?;
        let eps = h.last().and_then(|m| m.epsilon).unwrap_or(f64::INFINITY);
        assert!(
            eps <= 8.0 && last(&h) >= 0.9,
            "DP-SGD {} at ε {eps}",
            last(&h)
        );
        Ok(())
    }

    /// Adaptive clipping moves the clip norm from a far-too-small start
    /// towards the median update norm.
    #[test]
    fn adaptive_clipping_raises_a_small_clip_norm() -> anyhow::Result<()> {
        let (shards, test) = setup();
        let privacy = DpConfig {
            adaptive: Some(crate::privacy::AdaptiveClipping {
                target_quantile: 0.5,
                learning_rate: 0.5,
                count_noise: 0.0,
            }),
            ..DpConfig::central(0.01, 0.0, 1e-5)
        };
        let h = simulate(
            &SimulationConfig {
                privacy: Some(privacy),
                ..config(Aggregator::FedAvg)
            },
            &shards,
            &test,
        )?;
        let clips: Vec<f64> = h.iter().filter_map(|m| m.clip_norm).collect();
        assert_eq!(clips[0], 0.01);
        assert!(clips.windows(2).all(|w| w[1] > w[0]), "{clips:?}");
        Ok(())
    }

    #[test]
    fn central_dp_reports_epsilon() -> anyhow::Result<()> {
        let (shards, test) = setup();
        let cfg = SimulationConfig {
            privacy: Some(DpConfig::central(1.0, 1.0, 1e-5)),
            ..config(Aggregator::FedAvg)
        };
        let h = simulate(&cfg, &shards, &test)?;
        let eps: Vec<f64> = h.iter().filter_map(|m| m.epsilon).collect();
        assert_eq!(eps.len(), h.len());
        assert!(eps.windows(2).all(|w| w[0] < w[1]));
        // q = 1, z = 1, 8 rounds at δ = 1e-5, from the accountant.
        let mut acc = crate::privacy::RdpAccountant::new();
        acc.compose_poisson_gaussian(1.0, 1.0, 8)?;
        assert!((eps[7] - acc.epsilon(1e-5)?.0).abs() < 1e-9);
        // Mixing would change one update's sensitivity, which the accountant assumes.
        let mixed = SimulationConfig {
            mixing: Mixing::Nnm { f: 1 },
            ..cfg
        };
        assert!(matches!(
            simulate(&mixed, &shards, &test),
            Err(SimulationError::MixingWithCentralNoise(Mixing::Nnm {
                f: 1
            }))
        ));
        Ok(())
    }
}
