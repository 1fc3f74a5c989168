//! Offline tools that need no node: `dataset split`, `aggregate` and `simulate`, over the
//! federated engine (`agentmesh-federated`).

use crate::cli::{AggregateArgs, DatasetCommand, SimulateArgs, SplitArgs};
use agentmesh_federated::{
    decode_params, digits_report, encode_params, partition, read_npy, validate, write_npy,
    write_shards, Aggregator, Architecture, CheckpointError, Content, Dataset, Mixing, NpyError,
    Partition, ReportConfig, Standardizer, Update, MAX_MODEL_FILE_SIZE,
};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::Path;

/// Runs `agentmesh dataset ...`.
pub fn dataset(cmd: DatasetCommand) -> Result<()> {
    match cmd {
        DatasetCommand::Split(args) => split(&args),
    }
}

fn split(args: &SplitArgs) -> Result<()> {
    let data = match (&args.dataset, &args.csv) {
        (Some(name), None) if name == "digits" => Dataset::digits()?,
        (Some(name), None) => bail!("unknown data set {name:?}: the bundled one is `digits`"),
        (None, Some(path)) => Dataset::from_csv_path(path, None)?,
        _ => bail!("give exactly one of --dataset and --csv"),
    };
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    if !(0.0..1.0).contains(&args.test_fraction) {
        bail!("--test-fraction must be in [0, 1)");
    }
    let (mut train, mut test) = data.split(args.test_fraction, args.seed)?;
    // One scale for every shard (the training split's mean and deviation): nodes train one
    // model, so they must see features the same way.
    let scaler = Standardizer::fit(&train);
    scaler.apply(&mut train)?;
    scaler.apply(&mut test)?;
    let how = match args.alpha {
        Some(a) if a > 0.0 && a.is_finite() => Partition::dirichlet(a),
        Some(a) => bail!("--alpha must be a positive number, not {a}"),
        None => Partition::Iid,
    };
    let shards = partition(&train, args.nodes, how, args.seed)?;
    let paths = write_shards(&args.out, &shards, &test)?;
    if args.json {
        let shards: Vec<_> = shards
            .iter()
            .zip(&paths)
            .map(|(s, p)| {
                json!({ "path": p, "examples": s.len(), "class_counts": s.class_counts() })
            })
            .collect();
        let test_path = paths.last();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({ "shards": shards, "test": { "path": test_path, "examples": test.len() } })
            )?
        );
        return Ok(());
    }
    println!("{:<28} {:>8}  CLASS COUNTS", "FILE", "EXAMPLES");
    for (shard, path) in shards.iter().zip(&paths) {
        println!(
            "{:<28} {:>8}  {:?}",
            path.display(),
            shard.len(),
            shard.class_counts()
        );
    }
    if let Some(path) = paths.last() {
        println!("{:<28} {:>8}", path.display(), test.len());
    }
    Ok(())
}

/// An update file, read.
enum Loaded {
    /// Its parameters and, for safetensors, the model they belong to.
    Values(Vec<f32>, Option<Architecture>),
    /// It holds a NaN or an infinity: rejected, like any invalid update, not an error.
    NotFinite(String),
}

fn read_update(path: &Path) -> Result<Loaded> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if size > MAX_MODEL_FILE_SIZE as u64 {
        bail!(
            "{}: {size} bytes is more than the limit of {MAX_MODEL_FILE_SIZE}",
            path.display()
        );
    }
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    match path.extension().and_then(|e| e.to_str()) {
        Some("npy") => {
            let (shape, values) = match read_npy(&bytes) {
                Err(e @ NpyError::NotFinite { .. }) => return Ok(Loaded::NotFinite(e.to_string())),
                other => other.with_context(|| format!("{}", path.display()))?,
            };
            if shape.len() != 1 {
                bail!(
                    "{}: a 1-D array is expected, not shape {shape:?}",
                    path.display()
                );
            }
            Ok(Loaded::Values(values, None))
        }
        Some("safetensors") => {
            let (arch, params, content) = match decode_params(&bytes) {
                Err(e @ CheckpointError::NotFinite { .. }) => {
                    return Ok(Loaded::NotFinite(e.to_string()))
                }
                other => other.with_context(|| format!("{}", path.display()))?,
            };
            if content != Content::Update {
                bail!("{}: holds a model, not an update", path.display());
            }
            Ok(Loaded::Values(params, Some(arch)))
        }
        _ => bail!("{}: updates are .npy or .safetensors files", path.display()),
    }
}

fn read_weights(path: &Path, n: usize) -> Result<Vec<u64>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let weights: Vec<u64> = match serde_json::from_str::<Vec<u64>>(&text) {
        Ok(w) => w,
        Err(_) => text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .enumerate()
            .map(|(i, l)| {
                l.parse::<u64>().with_context(|| {
                    format!(
                        "{} line {}: {l:?} is not an example count",
                        path.display(),
                        i + 1
                    )
                })
            })
            .collect::<Result<_>>()?,
    };
    if weights.len() != n {
        bail!(
            "{}: {} weights for {n} updates",
            path.display(),
            weights.len()
        );
    }
    Ok(weights)
}

/// Runs `agentmesh aggregate`.
pub fn aggregate(args: &AggregateArgs) -> Result<()> {
    let n = args.updates.len();
    let rule = Aggregator::from_method(&args.method, args.f, args.m, args.beta, n)?;
    let mixing = Mixing::from_name(&args.mixing, args.f)?;
    // Fail before reading any file on what the command line alone settles.
    mixing.check(n)?;
    let weights = match &args.weights {
        Some(path) => read_weights(path, n)?,
        None => vec![1; n],
    };
    let mut updates = Vec::with_capacity(n);
    // File index of each entry of `updates`; files rejected on reading are listed apart.
    let mut files = Vec::with_capacity(n);
    let mut unreadable = Vec::new();
    let mut arch: Option<Architecture> = None;
    for (i, (path, examples)) in args.updates.iter().zip(&weights).enumerate() {
        let (delta, a) = match read_update(path)? {
            Loaded::Values(delta, a) => (delta, a),
            Loaded::NotFinite(reason) => {
                unreadable.push((i, reason));
                continue;
            }
        };
        if let Some(a) = a {
            match &arch {
                Some(first) if *first != a => bail!(
                    "{}: an update for another model than the first file's",
                    path.display()
                ),
                _ => arch = Some(a),
            }
        }
        updates.push(Update::new(delta, *examples));
        files.push(i);
    }
    // The expected length is the model's, or else the first file's.
    let dim = match &arch {
        Some(a) => a.num_params(),
        None => updates.first().map_or(0, |u| u.delta.len()),
    };
    let checked = validate(updates, dim);
    let mut rejected: Vec<(usize, String)> = unreadable;
    rejected.extend(
        checked
            .rejected
            .iter()
            .map(|r| (files[r.index], r.reason.to_string())),
    );
    rejected.sort();
    for (i, reason) in &rejected {
        eprintln!("rejected {}: {reason}", args.updates[*i].display());
    }
    let mut result = rule.aggregate_after(&mixing, &checked.accepted)?;
    // Positions in `updates` back to positions on the command line.
    for i in &mut result.selected {
        *i = files[*i];
    }
    for (i, _) in &mut result.scores {
        *i = files[*i];
    }
    match args.out.extension().and_then(|e| e.to_str()) {
        Some("npy") => std::fs::write(&args.out, write_npy(&[result.delta.len()], &result.delta))
            .with_context(|| format!("writing {}", args.out.display()))?,
        Some("safetensors") => {
            let Some(arch) = &arch else {
                bail!("a .safetensors result needs .safetensors updates (the model's shapes)");
            };
            let bytes = encode_params(arch, &result.delta, Content::Update)?;
            std::fs::write(&args.out, bytes)
                .with_context(|| format!("writing {}", args.out.display()))?;
        }
        _ => bail!("--out must end in .npy or .safetensors"),
    }
    let name = |i: &usize| args.updates[*i].display().to_string();
    if args.json {
        let rejected: Vec<_> = rejected
            .iter()
            .map(|(i, reason)| json!({ "update": name(i), "reason": reason }))
            .collect();
        let scores: Vec<_> = result
            .scores
            .iter()
            .map(|(i, s)| json!({ "update": name(i), "score": s }))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "method": rule.name(),
                "mixing": mixing.name(),
                "out": args.out,
                "parameters": result.delta.len(),
                "accepted": checked.accepted.len(),
                "rejected": rejected,
                "selected": result.selected.iter().map(name).collect::<Vec<_>>(),
                "scores": scores,
            }))?
        );
    } else {
        println!(
            "{}: {} of {n} updates accepted, {} parameters -> {}",
            rule.name(),
            checked.accepted.len(),
            result.delta.len(),
            args.out.display()
        );
        if result.selected.len() < checked.accepted.len() {
            for i in &result.selected {
                println!("selected {}", name(i));
            }
        }
    }
    Ok(())
}

/// Runs `agentmesh simulate`.
pub fn simulate(args: &SimulateArgs) -> Result<()> {
    if args.clients == 0 || args.rounds == 0 {
        bail!("--clients and --rounds must be at least 1");
    }
    if args.attackers >= args.clients {
        bail!("--attackers must be fewer than --clients");
    }
    let config = ReportConfig {
        clients: args.clients,
        rounds: args.rounds,
        alpha: args.alpha,
        attackers: args.attackers,
        seed: args.seed,
        seeds: args.seeds,
        skip_privacy: args.no_privacy,
    };
    let report = digits_report(&config)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", report.to_markdown());
    }
    Ok(())
}

/// Runs `agentmesh evaluate`: a model file's loss and accuracy on a CSV.
pub fn evaluate(args: &crate::cli::EvaluateArgs) -> Result<()> {
    let model = agentmesh_federated::Model::load(&args.model)
        .with_context(|| format!("loading the model {}", args.model.display()))?;
    let data = Dataset::from_csv_path(&args.csv, Some(model.architecture().classes()))
        .with_context(|| format!("loading {}", args.csv.display()))?;
    if data.num_features() != model.architecture().inputs() {
        bail!(
            "{} has {} features, the model takes {}",
            args.csv.display(),
            data.num_features(),
            model.architecture().inputs()
        );
    }
    let e = model.evaluate(&data)?;
    if args.json {
        println!(
            "{}",
            json!({ "examples": data.len(), "loss": e.loss, "accuracy": e.accuracy })
        );
    } else {
        println!(
            "{} examples: loss {:.4}, accuracy {:.2}%",
            data.len(),
            e.loss,
            e.accuracy * 100.0
        );
    }
    Ok(())
}
