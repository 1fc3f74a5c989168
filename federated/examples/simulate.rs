//! The federated results table on the bundled digits set.
//!
//! ```text
//! cargo run --release -p agentmesh-federated --example simulate
//! ```
//! Centralized training, then 10 clients with Dirichlet(0.5) shards for 30
//! rounds: clean per aggregator, with 2 attackers of each kind per aggregator,
//! and with differential privacy at several noise levels. Prints Markdown
//! tables; asserts nothing.

use agentmesh_federated::{
    partition, simulate, Architecture, Attack, Attackers, Dataset, DpConfig, DpSgd, LocalTrainer,
    Model, Partition, RoundMetrics, SimulationConfig, Standardizer, TrainConfig, Trainer,
};

const CLIENTS: usize = 10;
const ROUNDS: usize = 30;
const ALPHA: f64 = 0.5;
const ATTACKERS: usize = 2;
const SEED: u64 = 1;

fn mlp() -> Architecture {
    Architecture::Mlp {
        inputs: 64,
        hidden: vec![64],
        classes: 10,
    }
}

/// Local training each round.
fn local() -> TrainConfig {
    TrainConfig {
        epochs: 2,
        batch_size: 16,
        learning_rate: 0.05,
        momentum: 0.9,
        seed: SEED,
        dp_sgd: None,
    }
}

/// The rules compared, at the f the 10-client setup allows: Krum-family and
/// trimmed mean are configured for the 2 attackers; Bulyan needs n ≥ 4f + 3,
/// so with 10 clients it can only be told f = 1.
fn aggregators() -> Vec<agentmesh_federated::Aggregator> {
    use agentmesh_federated::Aggregator::*;
    vec![
        FedAvg,
        Krum { f: ATTACKERS },
        MultiKrum {
            f: ATTACKERS,
            m: CLIENTS - ATTACKERS,
        },
        TrimmedMean { beta: 0.2 },
        Median,
        Bulyan { f: 1 },
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

fn pct(x: f64) -> String {
    format!("{:.1}", 100.0 * x)
}

fn final_acc(h: &[RoundMetrics]) -> f64 {
    h.last().map_or(0.0, |m| m.accuracy)
}

fn main() -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let (mut train, mut test) = Dataset::digits()?.split(0.2, SEED)?;
    let scaler = Standardizer::fit(&train);
    scaler.apply(&mut train)?;
    scaler.apply(&mut test)?;
    let shards = partition(&train, CLIENTS, Partition::dirichlet(ALPHA), SEED)?;
    println!(
        "digits: {} train / {} test; {CLIENTS} clients, Dirichlet α = {ALPHA}, shard sizes {:?}",
        train.len(),
        test.len(),
        shards.iter().map(Dataset::len).collect::<Vec<_>>()
    );
    println!("model: MLP 64-64-10; local: {:?}\n", local());

    println!("## Centralized\n");
    println!("| model | epochs | test accuracy % |\n|---|---|---|");
    for (name, arch) in [
        (
            "softmax",
            Architecture::Softmax {
                inputs: 64,
                classes: 10,
            },
        ),
        ("mlp", mlp()),
    ] {
        let epochs = 40;
        let cfg = TrainConfig { epochs, ..local() };
        let model = Model::new(arch, SEED)?;
        let out = LocalTrainer.train(&model, &train, &cfg)?;
        let mut trained = model.clone();
        trained.apply_delta(&out.delta)?;
        println!(
            "| {name} | {epochs} | {} |",
            pct(trained.evaluate(&test)?.accuracy)
        );
    }

    let base = SimulationConfig {
        seed: SEED,
        ..SimulationConfig::new(mlp(), ROUNDS, local())
    };

    println!(
        "\n## Federated, clean and under attack ({ATTACKERS} of {CLIENTS} clients Byzantine)\n"
    );
    let mut header = String::from("| aggregator | clean |");
    let mut rule = String::from("|---|---|");
    for a in attacks() {
        header.push_str(&format!(" {} |", a.name()));
        rule.push_str("---|");
    }
    println!("{header}\n{rule}");
    for agg in aggregators() {
        let clean = simulate(
            &SimulationConfig {
                aggregator: agg.clone(),
                ..base.clone()
            },
            &shards,
            &test,
        )?;
        let mut row = format!("| {agg:?} | {} |", pct(final_acc(&clean)));
        for attack in attacks() {
            let h = simulate(
                &SimulationConfig {
                    aggregator: agg.clone(),
                    attackers: Some(Attackers {
                        attack,
                        count: ATTACKERS,
                    }),
                    ..base.clone()
                },
                &shards,
                &test,
            )?;
            let picked: usize = h.iter().map(|m| m.byzantine_selected).sum();
            let note = match agg {
                agentmesh_federated::Aggregator::Krum { .. }
                | agentmesh_federated::Aggregator::MultiKrum { .. }
                | agentmesh_federated::Aggregator::Bulyan { .. } => {
                    format!(" ({picked} bad picks)")
                }
                _ => String::new(),
            };
            row.push_str(&format!(" {}{note} |", pct(final_acc(&h))));
        }
        println!("{row}");
    }
    println!(
        "\nAttacks: sign_flip sends −10× its honest update; scaled sends 20×; gaussian sends \
         N(0, 100²) per coordinate; alie is Baruch et al. with z_max; ipm is −1 × the honest mean. \
         \"bad picks\": Byzantine updates the Krum family selected over the 30 rounds."
    );

    println!(
        "\n## Client-level DP (central: clip each update to C, noise z·C/n on the mean; FedAvg)\n"
    );
    println!("| z | C | test accuracy % | ε at δ = 1e-5 |\n|---|---|---|---|");
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
        let eps = h
            .last()
            .and_then(|m| m.epsilon)
            .map_or("∞".to_string(), |e| format!("{e:.1}"));
        println!("| {z} | {clip} | {} | {eps} |", pct(final_acc(&h)));
    }

    println!("\n## Example-level DP-SGD on every client (FedAvg)\n");
    println!(
        "| model | z | C | batch | lr | test accuracy % | ε at δ = 1e-5 (worst client) |\n|---|---|---|---|---|---|---|"
    );
    let softmax = Architecture::Softmax {
        inputs: 64,
        classes: 10,
    };
    // Batches of 128 are the whole shard for most clients (q = 1, one
    // noisy full-batch step per round); small shards then cost the most ε.
    let runs = [
        ("mlp", mlp(), 128, 1.0, [3.0, 5.0, 7.0]),
        ("softmax", softmax, 32, 0.3, [2.0, 3.0, 4.0]),
    ];
    for (name, arch, batch, lr, zs) in runs {
        for z in zs {
            let clip = 1.0;
            let train = TrainConfig {
                epochs: 1,
                batch_size: batch,
                learning_rate: lr,
                momentum: 0.5,
                seed: SEED,
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
            let eps = h.last().and_then(|m| m.epsilon).unwrap_or(f64::INFINITY);
            println!(
                "| {name} | {z} | {clip} | {batch} | {lr} | {} | {eps:.2} |",
                pct(final_acc(&h))
            );
        }
    }
    eprintln!("\n(took {:.1} s)", started.elapsed().as_secs_f64());
    Ok(())
}
