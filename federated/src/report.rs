//! The results table of `agentmesh simulate`: on the bundled digits set, centralized training;
//! federated training per aggregator, clean and with Byzantine clients of each kind; and with
//! differential privacy at several noise levels, with the ε reached.

use serde::Serialize;

use crate::{
    partition, simulate, Aggregator, Architecture, Attack, Attackers, DataError, Dataset, DpConfig,
    DpSgd, LocalTrainer, Model, ModelError, Partition, RoundMetrics, SimulationConfig,
    SimulationError, Standardizer, TrainConfig, TrainError, Trainer,
};

/// The setup of a report.
#[derive(Debug, Clone, Serialize)]
pub struct ReportConfig {
    /// Federated clients (shards).
    pub clients: usize,
    /// Rounds per federated run.
    pub rounds: usize,
    /// Dirichlet α of the label skew across clients.
    pub alpha: f64,
    /// Byzantine clients in the attack columns.
    pub attackers: usize,
    /// Seed of the split, the shards, the models and the noise.
    pub seed: u64,
    /// Skip the differential-privacy sections (they are most of the run time).
    pub skip_privacy: bool,
}

impl Default for ReportConfig {
    fn default() -> Self {
        Self {
            clients: 10,
            rounds: 30,
            alpha: 0.5,
            attackers: 2,
            seed: 1,
            skip_privacy: false,
        }
    }
}

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The data set could not be loaded or split.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A model could not be built.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Centralized training failed.
    #[error(transparent)]
    Train(#[from] TrainError),
    /// A federated run failed.
    #[error(transparent)]
    Simulation(#[from] SimulationError),
}

/// Centralized training of one model on all the training data.
#[derive(Debug, Clone, Serialize)]
pub struct CentralRow {
    /// `softmax` or `mlp`.
    pub model: String,
    /// Epochs trained.
    pub epochs: usize,
    /// Test accuracy.
    pub accuracy: f64,
}

/// One aggregator, clean and under each attack.
#[derive(Debug, Clone, Serialize)]
pub struct RobustRow {
    /// The aggregator and its parameters.
    pub aggregator: String,
    /// Test accuracy without attackers.
    pub clean: f64,
    /// Per attack: its name, the test accuracy, and how many Byzantine updates the rule
    /// selected over all rounds (for the rules that select).
    pub attacked: Vec<AttackResult>,
}

/// A run under one attack.
#[derive(Debug, Clone, Serialize)]
pub struct AttackResult {
    /// The attack's name.
    pub attack: String,
    /// Test accuracy after the last round.
    pub accuracy: f64,
    /// Byzantine updates selected over all rounds (`None` for rules that do not select).
    pub byzantine_selected: Option<usize>,
}

/// A run with differential privacy.
#[derive(Debug, Clone, Serialize)]
pub struct PrivacyRow {
    /// `client-level` (clip and noise the updates, FedAvg) or `dp-sgd` (example level).
    pub kind: String,
    /// The model.
    pub model: String,
    /// Noise multiplier z.
    pub noise_multiplier: f64,
    /// Clip norm C.
    pub clip_norm: f64,
    /// Test accuracy.
    pub accuracy: f64,
    /// ε at δ = 1e-5 after the last round (`None`: unbounded, no noise).
    pub epsilon: Option<f64>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The setup.
    pub config: ReportConfig,
    /// Training and test examples.
    pub train_examples: usize,
    /// Test examples.
    pub test_examples: usize,
    /// Examples per client.
    pub shard_sizes: Vec<usize>,
    /// Centralized baselines.
    pub centralized: Vec<CentralRow>,
    /// Federated runs per aggregator.
    pub robustness: Vec<RobustRow>,
    /// Runs with differential privacy.
    pub privacy: Vec<PrivacyRow>,
}

fn mlp() -> Architecture {
    Architecture::Mlp {
        inputs: 64,
        hidden: vec![64],
        classes: 10,
    }
}

fn softmax() -> Architecture {
    Architecture::Softmax {
        inputs: 64,
        classes: 10,
    }
}

fn local(seed: u64) -> TrainConfig {
    TrainConfig {
        epochs: 2,
        batch_size: 16,
        learning_rate: 0.05,
        momentum: 0.9,
        seed,
        dp_sgd: None,
    }
}

/// The rules compared. Krum-family and trimmed mean are configured for the attackers; Bulyan
/// needs n ≥ 4f + 3, so with few clients it gets the largest f that allows.
fn aggregators(clients: usize, attackers: usize) -> Vec<Aggregator> {
    vec![
        Aggregator::FedAvg,
        Aggregator::Krum { f: attackers },
        Aggregator::MultiKrum {
            f: attackers,
            m: clients.saturating_sub(attackers).max(1),
        },
        Aggregator::TrimmedMean { beta: 0.2 },
        Aggregator::Median,
        Aggregator::Bulyan {
            f: attackers.min(clients.saturating_sub(3) / 4),
        },
    ]
}

fn attacks() -> Vec<Attack> {
    vec![
        Attack::SignFlip { scale: 10.0 },
        Attack::Scaled { factor: 20.0 },
        Attack::GaussianNoise { std: 100.0 },
        Attack::Alie,
        Attack::InnerProduct { epsilon: 1.0 },
    ]
}

fn final_accuracy(h: &[RoundMetrics]) -> f64 {
    h.last().map_or(0.0, |m| m.accuracy)
}

/// Runs every experiment of the report. Deterministic for a given config.
pub fn digits_report(config: &ReportConfig) -> Result<Report, ReportError> {
    let seed = config.seed;
    let (mut train, mut test) = Dataset::digits()?.split(0.2, seed)?;
    let scaler = Standardizer::fit(&train);
    scaler.apply(&mut train)?;
    scaler.apply(&mut test)?;
    let shards = partition(
        &train,
        config.clients,
        Partition::dirichlet(config.alpha),
        seed,
    )?;

    let mut centralized = Vec::new();
    for (name, arch) in [("softmax", softmax()), ("mlp", mlp())] {
        let epochs = 40;
        let cfg = TrainConfig {
            epochs,
            ..local(seed)
        };
        let mut model = Model::new(arch, seed)?;
        let out = LocalTrainer.train(&model, &train, &cfg)?;
        model.apply_delta(&out.delta)?;
        centralized.push(CentralRow {
            model: name.into(),
            epochs,
            accuracy: model.evaluate(&test)?.accuracy,
        });
    }

    let base = SimulationConfig {
        seed,
        ..SimulationConfig::new(mlp(), config.rounds, local(seed))
    };
    let mut robustness = Vec::new();
    for agg in aggregators(config.clients, config.attackers) {
        let run = |attackers| {
            simulate(
                &SimulationConfig {
                    aggregator: agg.clone(),
                    attackers,
                    ..base.clone()
                },
                &shards,
                &test,
            )
        };
        let clean = final_accuracy(&run(None)?);
        let selects = matches!(
            agg,
            Aggregator::Krum { .. } | Aggregator::MultiKrum { .. } | Aggregator::Bulyan { .. }
        );
        let mut attacked = Vec::new();
        for attack in attacks() {
            let name = attack.name().to_string();
            let h = run(Some(Attackers {
                attack,
                count: config.attackers,
            }))?;
            attacked.push(AttackResult {
                attack: name,
                accuracy: final_accuracy(&h),
                byzantine_selected: selects.then(|| h.iter().map(|m| m.byzantine_selected).sum()),
            });
        }
        robustness.push(RobustRow {
            aggregator: format!("{agg:?}"),
            clean,
            attacked,
        });
    }

    let mut privacy = Vec::new();
    if !config.skip_privacy {
        for z in [0.0, 0.1, 0.3, 1.0, 4.0] {
            let clip = 1.0;
            let h = simulate(
                &SimulationConfig {
                    privacy: Some(DpConfig::central(clip, z, 1e-5)),
                    ..base.clone()
                },
                &shards,
                &test,
            )?;
            privacy.push(PrivacyRow {
                kind: "client-level".into(),
                model: "mlp".into(),
                noise_multiplier: z,
                clip_norm: clip,
                accuracy: final_accuracy(&h),
                epsilon: h.last().and_then(|m| m.epsilon),
            });
        }
        // Batches of 128 are the whole shard for most clients (one noisy full-batch step per
        // round); small shards then cost the most ε.
        let runs = [
            ("mlp", mlp(), 128, 1.0, [3.0, 5.0, 7.0]),
            ("softmax", softmax(), 32, 0.3, [2.0, 3.0, 4.0]),
        ];
        for (name, arch, batch, lr, zs) in runs {
            for z in zs {
                let clip = 1.0;
                let train = TrainConfig {
                    epochs: 1,
                    batch_size: batch,
                    learning_rate: lr,
                    momentum: 0.5,
                    seed,
                    dp_sgd: Some(DpSgd {
                        clip_norm: clip,
                        noise_multiplier: z,
                    }),
                };
                let h = simulate(
                    &SimulationConfig {
                        architecture: arch.clone(),
                        train,
                        ..base.clone()
                    },
                    &shards,
                    &test,
                )?;
                privacy.push(PrivacyRow {
                    kind: "dp-sgd".into(),
                    model: name.into(),
                    noise_multiplier: z,
                    clip_norm: clip,
                    accuracy: final_accuracy(&h),
                    epsilon: h.last().and_then(|m| m.epsilon),
                });
            }
        }
    }

    Ok(Report {
        config: config.clone(),
        train_examples: train.len(),
        test_examples: test.len(),
        shard_sizes: shards.iter().map(Dataset::len).collect(),
        centralized,
        robustness,
        privacy,
    })
}

fn pct(x: f64) -> String {
    format!("{:.1}", 100.0 * x)
}

impl Report {
    /// The report as Markdown tables.
    pub fn to_markdown(&self) -> String {
        let c = &self.config;
        let mut out = format!(
            "digits: {} train / {} test; {} clients, Dirichlet α = {}, shard sizes {:?}; \
             MLP 64-64-10, {} rounds\n\n## Centralized\n\n| model | epochs | test accuracy % |\n\
             |---|---|---|\n",
            self.train_examples, self.test_examples, c.clients, c.alpha, self.shard_sizes, c.rounds
        );
        for r in &self.centralized {
            out.push_str(&format!(
                "| {} | {} | {} |\n",
                r.model,
                r.epochs,
                pct(r.accuracy)
            ));
        }
        out.push_str(&format!(
            "\n## Federated, clean and under attack ({} of {} clients Byzantine)\n\n\
             | aggregator | clean |",
            c.attackers, c.clients
        ));
        let names: Vec<&str> = attacks().iter().map(Attack::name).collect();
        for n in &names {
            out.push_str(&format!(" {n} |"));
        }
        out.push_str(&format!("\n|---|---|{}\n", "---|".repeat(names.len())));
        for r in &self.robustness {
            out.push_str(&format!("| {} | {} |", r.aggregator, pct(r.clean)));
            for a in &r.attacked {
                let picks = a
                    .byzantine_selected
                    .map_or(String::new(), |p| format!(" ({p} bad picks)"));
                out.push_str(&format!(" {}{picks} |", pct(a.accuracy)));
            }
            out.push('\n');
        }
        out.push_str(
            "\nsign_flip sends −10× its honest update; scaled 20×; gaussian N(0, 100²) per \
             coordinate; alie is Baruch et al. with z_max; ipm −1 × the honest mean. \"bad picks\": \
             Byzantine updates a selecting rule used over all rounds.\n",
        );
        if !self.privacy.is_empty() {
            out.push_str(
                "\n## Differential privacy (FedAvg; ε at δ = 1e-5)\n\n\
                 | kind | model | z | C | test accuracy % | ε |\n|---|---|---|---|---|---|\n",
            );
            for r in &self.privacy {
                let eps = r.epsilon.map_or("∞".to_string(), |e| format!("{e:.2}"));
                out.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {eps} |\n",
                    r.kind,
                    r.model,
                    r.noise_multiplier,
                    r.clip_norm,
                    pct(r.accuracy)
                ));
            }
        }
        out
    }
}
