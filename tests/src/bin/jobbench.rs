//! `jobbench`: where a training round's wall time goes, on real node processes on 127.0.0.1
//! (not a test: it asserts nothing, it reports).
//!
//! ```text
//! cargo build --release -p agentmesh
//! cargo run --release -p agentmesh-tests --bin jobbench -- [--nodes 5,10] [--epochs 1,10] [--rounds 7]
//! ```
//!
//! For each cluster size and local-epoch count it splits the bundled digits set across the nodes, runs a Krum job on
//! a ReLU MLP of about a million parameters, and splits each round's wall time (from one
//! round's opening to the next's) with the timing the aggregating node commits with every
//! round: Raft commits, model and update transfer, local training, aggregation, evaluation.
//! The baseline, measured in the same run, is the same local training in this process with the
//! machine otherwise idle. The node binary is `AGENTMESH_BIN`, else `agentmesh` next to this
//! executable.

use agentmesh_federated::{Architecture, Dataset, LocalTrainer, Model, TrainConfig, Trainer};
use agentmesh_tests::bench::{self, median};
use agentmesh_tests::jobs::{split, submit, wait_done, wait_trainers};
use agentmesh_tests::start_cluster_with;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

/// Hidden layers: 64·1024 + 1024 + 1024·928 + 928 + 928·10 + 10 = 1,027,050 parameters.
const HIDDEN: [usize; 2] = [1024, 928];
const FEATURES: usize = 64;
const CLASSES: usize = 10;
const BATCH: usize = 32;
/// Target: everything but training and aggregation at most this share of a round.
const TARGET_OVERHEAD: f64 = 0.20;

struct Options {
    sizes: Vec<usize>,
    epochs: Vec<usize>,
    rounds: u32,
}

fn list(text: &str, what: &str) -> Result<Vec<usize>> {
    text.split(',')
        .map(|n| n.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{what}: a comma-separated list of numbers"))
}

fn parse_args() -> Result<Options> {
    let mut opts = Options {
        sizes: vec![5, 10],
        epochs: vec![1, 10],
        rounds: 7,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--nodes" => {
                opts.sizes = list(&value()?, "--nodes")?;
                if opts.sizes.iter().any(|&n| n < 5) {
                    bail!("--nodes: Krum with f = 1 needs at least 5 nodes");
                }
            }
            "--epochs" => {
                opts.epochs = list(&value()?, "--epochs")?;
                if opts.epochs.contains(&0) {
                    bail!("--epochs: at least 1");
                }
            }
            "--rounds" => {
                opts.rounds = value()?.parse().context("--rounds: a number")?;
                if opts.rounds < 3 {
                    bail!("--rounds: at least 3 (the first is a warm-up, the last has no next)");
                }
            }
            other => bail!("unknown argument {other:?}; use --nodes 5,10 --epochs 1,10 --rounds 7"),
        }
    }
    Ok(opts)
}

fn main() -> Result<()> {
    let opts = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(&opts))
}

async fn run(opts: &Options) -> Result<()> {
    let mut out = String::new();
    writeln!(
        out,
        "jobbench: training rounds on agentmesh nodes on 127.0.0.1"
    )?;
    out.push_str(&bench::machine_lines()?);
    let arch = Architecture::Mlp {
        inputs: FEATURES,
        hidden: HIDDEN.to_vec(),
        classes: CLASSES,
    };
    writeln!(
        out,
        "model     MLP 64-{}-{}-10, {} parameters ({:.1} MiB of f32); Krum (f = 1); batch {BATCH}; IID shards of digits",
        HIDDEN[0],
        HIDDEN[1],
        arch.num_params(),
        arch.num_params() as f64 * 4.0 / 1048576.0,
    )?;
    writeln!(
        out,
        "rounds    {} per job; round 1 is a warm-up; figures are means over rounds 2..{}",
        opts.rounds,
        opts.rounds - 1
    )?;
    let mut results = Vec::new();
    for &epochs in &opts.epochs {
        for &n in &opts.sizes {
            eprintln!("jobbench: {n} nodes, {epochs} local epoch(s)");
            results.push(bench_cluster(n, epochs, opts.rounds, &arch).await?);
        }
    }
    out.push('\n');
    out.push_str(&report(&results));
    print!("{out}");
    Ok(())
}

/// One round's wall time, split (seconds).
#[derive(Default, Clone)]
struct Split {
    cycle: f64,
    start_commit: f64,
    model_fetch: f64,
    train: f64,
    update_store: f64,
    learn_and_announce: f64,
    update_fetch: f64,
    aggregate: f64,
    evaluate: f64,
    model_publish: f64,
    other: f64,
    result_commit: f64,
}

struct ClusterResult {
    nodes: usize,
    epochs: usize,
    rounds: Vec<Split>,
    /// The same local training in this process, machine otherwise idle (median of 3).
    train_alone: f64,
    /// The whole job, from submitting it to seeing it done.
    job_secs: f64,
    accuracy: f64,
}

async fn bench_cluster(
    n: usize,
    epochs: usize,
    rounds: u32,
    arch: &Architecture,
) -> Result<ClusterResult> {
    let root = tempfile::tempdir()?;
    let shards = split(root.path(), n, None)?;

    // Baseline first, while no node runs: one shard's local training, in this process.
    let data = Dataset::from_csv_path(&shards.join("shard-0.csv"), Some(CLASSES))?;
    let model = Model::new(arch.clone(), 1)?;
    let mut alone = Vec::new();
    for seed in 0..3 {
        let config = TrainConfig {
            epochs,
            batch_size: BATCH,
            learning_rate: 0.05,
            momentum: 0.9,
            seed,
            dp_sgd: None,
        };
        let t = Instant::now();
        LocalTrainer.train(&model, &data, &config)?;
        alone.push(t.elapsed().as_secs_f64());
    }

    let nodes = start_cluster_with(root.path(), "b", n, |i| {
        vec![
            "--data".into(),
            shards.join(format!("shard-{i}.csv")).display().to_string(),
            "--eval-data".into(),
            shards.join("test.csv").display().to_string(),
        ]
    })
    .await?;
    wait_trainers(&nodes, Duration::from_secs(60)).await?;
    let spec = json!({
        "model": "mlp", "hidden": HIDDEN, "dataset_features": FEATURES, "classes": CLASSES,
        "rounds": rounds, "local_epochs": epochs, "batch_size": BATCH,
        "learning_rate": 0.05, "momentum": 0.9, "aggregator": "krum", "byzantine": 1,
        "min_participants": n, "round_timeout_secs": 300, "seed": 1,
    });
    let started = Instant::now();
    let id = submit(&nodes[0], &spec).await?;
    let job = wait_done(&nodes[0], &id, Duration::from_secs(60 * u64::from(rounds))).await?;
    let job_secs = started.elapsed().as_secs_f64();
    let history = job["history"].as_array().context("no history")?;
    if history.len() != rounds as usize || history.iter().any(|r| !r["failed"].is_null()) {
        bail!("expected {rounds} successful rounds: {job}");
    }
    let mut splits = Vec::new();
    for pair in history.windows(2).skip(1) {
        splits.push(split_round(&pair[0], &pair[1])?);
    }
    Ok(ClusterResult {
        nodes: n,
        epochs,
        rounds: splits,
        train_alone: median(&alone),
        job_secs,
        accuracy: agentmesh_tests::jobs::accuracy(&job),
    })
}

/// Splits `round`'s wall time, from its opening to the opening of `next`.
fn split_round(round: &Value, next: &Value) -> Result<Split> {
    let t = &round["timing"];
    let f = |v: &Value, what: &str| -> Result<f64> {
        v.as_f64()
            .with_context(|| format!("round {}: no {what} in {round}", round["round"]))
    };
    let opened = f(&round["started_at_ms"], "started_at_ms")?;
    let next_opened = f(&next["started_at_ms"], "started_at_ms")?;
    let mut s = Split {
        cycle: (next_opened - opened) / 1000.0,
        start_commit: f(&t["start_commit"], "start_commit")?,
        model_fetch: f(&t["model_fetch"], "model_fetch")?,
        train: f(&t["train"], "train")?,
        update_store: f(&t["update_store"], "update_store")?,
        update_fetch: f(&t["update_fetch"], "update_fetch")?,
        aggregate: f(&t["aggregate"], "aggregate")?,
        evaluate: f(&t["evaluate"], "evaluate")?,
        model_publish: f(&t["model_publish"], "model_publish")?,
        ..Split::default()
    };
    let updates_in = f(&t["updates_in"], "updates_in")?;
    let secs = f(&round["secs"], "secs")?;
    s.learn_and_announce = updates_in - s.model_fetch - s.train - s.update_store;
    s.other = secs
        - s.start_commit
        - updates_in
        - s.update_fetch
        - s.aggregate
        - s.evaluate
        - s.model_publish;
    s.result_commit = s.cycle - secs;
    Ok(s)
}

fn mean(rounds: &[Split], f: impl Fn(&Split) -> f64) -> f64 {
    rounds.iter().map(f).sum::<f64>() / rounds.len().max(1) as f64
}

/// A context row: one cell per cluster.
type Cell = dyn Fn(&ClusterResult) -> String;

fn report(results: &[ClusterResult]) -> String {
    let mut s = String::new();
    let header: Vec<String> = results
        .iter()
        .map(|r| format!("{} nodes, {} ep", r.nodes, r.epochs))
        .collect();
    let _ = writeln!(
        s,
        "{:<62}{}",
        "seconds per round (share of the round)",
        header
            .iter()
            .map(|h| format!("{h:>18}"))
            .collect::<String>()
    );
    let _ = writeln!(s, "{}", "-".repeat(62 + 18 * results.len()));
    let row = |s: &mut String, label: &str, f: &dyn Fn(&Split) -> f64| {
        let cells: String = results
            .iter()
            .map(|r| {
                let v = mean(&r.rounds, f);
                let share = v / mean(&r.rounds, |x| x.cycle);
                format!("{:>18}", format!("{v:.3} ({:>4.1}%)", share * 100.0))
            })
            .collect();
        let _ = writeln!(s, "{label:<62}{cells}");
    };
    row(&mut s, "round, opening to next opening", &|x| x.cycle);
    row(&mut s, "  Raft: commit the round's start", &|x| {
        x.start_commit
    });
    row(
        &mut s,
        "  Raft+gossip: participants learn of it; update announced",
        &|x| x.learn_and_announce,
    );
    row(&mut s, "  transfer: participant fetches the model", &|x| {
        x.model_fetch
    });
    row(
        &mut s,
        "  training: local epochs (last participant)",
        &|x| x.train,
    );
    row(&mut s, "  transfer: clip, encode, store the update", &|x| {
        x.update_store
    });
    row(
        &mut s,
        "  transfer: aggregator fetches the last updates",
        &|x| x.update_fetch,
    );
    row(&mut s, "  aggregation: clip, Krum, encode", &|x| {
        x.aggregate
    });
    row(&mut s, "  evaluation: new model on the test split", &|x| {
        x.evaluate
    });
    row(
        &mut s,
        "  transfer: store the model, wait for another node's copy",
        &|x| x.model_publish,
    );
    row(&mut s, "  other work in the aggregator", &|x| x.other);
    row(
        &mut s,
        "  Raft: commit the result, open the next round",
        &|x| x.result_commit,
    );
    let _ = writeln!(s, "{}", "-".repeat(62 + 18 * results.len()));
    row(&mut s, "training", &|x| x.train);
    row(&mut s, "aggregation + evaluation", &|x| {
        x.aggregate + x.evaluate
    });
    row(&mut s, "transfer", &|x| {
        x.model_fetch + x.update_store + x.update_fetch + x.model_publish
    });
    row(&mut s, "Raft, gossip, coordination", &|x| {
        x.start_commit + x.learn_and_announce + x.other + x.result_commit
    });
    let _ = writeln!(s, "{}", "-".repeat(62 + 18 * results.len()));
    for (label, work) in [
        (
            "overhead: all but training and aggregation (target <= 20%)",
            (&|x: &Split| x.train + x.aggregate) as &dyn Fn(&Split) -> f64,
        ),
        ("overhead, evaluation counted as work", &|x: &Split| {
            x.train + x.aggregate + x.evaluate
        }),
    ] {
        let cells: String = results
            .iter()
            .map(|r| {
                let share = 1.0 - mean(&r.rounds, work) / mean(&r.rounds, |x| x.cycle);
                let verdict = if share <= TARGET_OVERHEAD {
                    "met"
                } else {
                    "MISSED"
                };
                format!("{:>18}", format!("{:.1}% {verdict}", share * 100.0))
            })
            .collect();
        let _ = writeln!(s, "{label:<62}{cells}");
    }
    let _ = writeln!(s, "{}", "-".repeat(62 + 18 * results.len()));
    let context: [(&str, &Cell); 4] = [
        (
            "baseline: the same local training alone in one process",
            &|r| format!("{:.3} s", r.train_alone),
        ),
        ("training in a round / alone (nodes share the CPUs)", &|r| {
            format!("{:.1}x", mean(&r.rounds, |x| x.train) / r.train_alone)
        }),
        ("whole job, submit to done (context)", &|r| {
            format!("{:.1} s", r.job_secs)
        }),
        ("test accuracy after the job (context)", &|r| {
            format!("{:.3}", r.accuracy)
        }),
    ];
    for (label, f) in context {
        let cells: String = results.iter().map(|r| format!("{:>18}", f(r))).collect();
        let _ = writeln!(s, "{label:<62}{cells}");
    }
    s
}
