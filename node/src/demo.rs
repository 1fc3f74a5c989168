//! `agentmesh demo`: a local cluster of real node processes on 127.0.0.1, the bundled digits set
//! split non-IID across them, one node Byzantine, and two jobs trained side by side (Krum and
//! FedAvg), ending with a table that compares them.

use crate::cli::DemoArgs;
use agentmesh_federated::{partition, write_shards, Dataset, Partition, Standardizer};
use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// How long the cluster may take to form and register its trainers.
const FORM_TIMEOUT: Duration = Duration::from_secs(90);
/// Seconds a demo round waits for updates.
const ROUND_TIMEOUT_SECS: u64 = 20;

/// Node processes, killed when dropped (also on an error or Ctrl-C unwinding through here).
struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> Result<()> {
    if !(3..=9).contains(&args.nodes) {
        bail!("--nodes must be 3 to 9");
    }
    if !(args.alpha > 0.0 && args.alpha.is_finite()) {
        bail!("--alpha must be a positive number");
    }
    if args.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    args.attack
        .parse::<crate::jobs::RedTeam>()
        .map_err(anyhow::Error::msg)?;
    let temp;
    let dir: PathBuf = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            temp = tempfile::Builder::new()
                .prefix("agentmesh-demo-")
                .tempdir()
                .context("creating a temporary directory")?;
            temp.path().to_path_buf()
        }
    };
    let say = |msg: String| {
        if !args.json {
            println!("{msg}");
        }
    };
    let n = args.nodes;
    let byzantine = n - 1;

    // Data: digits, standardized with the training split's statistics, non-IID shards.
    let (mut train, mut test) = Dataset::digits()?.split(0.2, 7)?;
    let scaler = Standardizer::fit(&train);
    scaler.apply(&mut train)?;
    scaler.apply(&mut test)?;
    let shards = partition(&train, n, Partition::dirichlet(args.alpha), 7)?;
    let data_dir = dir.join("data");
    write_shards(&data_dir, &shards, &test)?;
    say(format!(
        "digits split across {n} nodes (Dirichlet α = {}): {} examples per node, {} held out",
        args.alpha,
        shards
            .iter()
            .map(|s| s.len().to_string())
            .collect::<Vec<_>>()
            .join("/"),
        test.len()
    ));

    let key = dir.join("cluster.key");
    write_secret(&key, &hex::encode(rand::random::<[u8; 32]>()))?;
    let exe = std::env::current_exe().context("finding the agentmesh binary")?;
    let mut nodes = Nodes(Vec::new());
    let mut apis: Vec<String> = Vec::new();
    let mut seed_addr: Option<String> = None;
    for i in 0..n {
        let node_dir = dir.join(format!("node-{i}"));
        std::fs::create_dir_all(&node_dir)?;
        let _ = std::fs::remove_file(node_dir.join(crate::node::RUNTIME_FILE));
        let log = std::fs::File::create(dir.join(format!("node-{i}.log")))?;
        let mut cmd = Command::new(&exe);
        cmd.arg("start")
            .arg("--data-dir")
            .arg(&node_dir)
            .args(["--name", &format!("node-{i}")])
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(["--api", "127.0.0.1:0"])
            .arg("--cluster-key-file")
            .arg(&key)
            .arg("--data")
            .arg(data_dir.join(format!("shard-{i}.csv")))
            .arg("--eval-data")
            .arg(data_dir.join("test.csv"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if i < 3 {
            cmd.args(["--bootstrap-expect", "3"]);
        }
        if let Some(addr) = &seed_addr {
            cmd.args(["--bootstrap", addr]);
        }
        if i == byzantine {
            cmd.args(["--byzantine", &args.attack]);
        }
        nodes.0.push(cmd.spawn().context("starting a node")?);
        let runtime = wait_runtime(&node_dir, &mut nodes.0[i]).await?;
        if seed_addr.is_none() {
            let addr = runtime["listen_addrs"][0]
                .as_str()
                .context("node 0 reported no listen address")?;
            seed_addr = Some(format!(
                "{addr}/p2p/{}",
                runtime["peer_id"].as_str().unwrap_or("")
            ));
        }
        apis.push(runtime["api"].as_str().unwrap_or_default().to_string());
    }
    say(format!(
        "started {n} nodes (logs and data in {}); node-{byzantine} is Byzantine ({})",
        dir.display(),
        args.attack
    ));

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let api = &apis[0];
    let formed = Instant::now();
    loop {
        let trainers = get(&http, api, "/v1/cluster")
            .await
            .ok()
            .and_then(|v| v["trainers"].as_array().map(Vec::len))
            .unwrap_or(0);
        if trainers == n {
            break;
        }
        if formed.elapsed() > FORM_TIMEOUT {
            bail!(
                "the cluster did not form with {n} trainers within {FORM_TIMEOUT:?} ({trainers} so far); see the logs in {}",
                dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    say(format!(
        "cluster formed in {:.1}s with {n} trainers",
        formed.elapsed().as_secs_f64()
    ));

    // Krum tolerates f faulty updates among n > 2f + 2; every node must deliver.
    let f = usize::from(n >= 5);
    let min_participants = (n - 1).max(2 * f + 3).min(n);
    let job = |aggregator: &str| {
        json!({
            "model": "softmax", "dataset_features": 64, "classes": 10,
            "rounds": args.rounds, "local_epochs": 2, "batch_size": 16,
            "learning_rate": 0.05, "momentum": 0.5,
            "aggregator": aggregator, "byzantine": f,
            "min_participants": min_participants, "round_timeout_secs": ROUND_TIMEOUT_SECS,
        })
    };
    let mut jobs = Vec::new();
    for aggregator in ["krum", "fedavg"] {
        let res = http
            .post(format!("http://{api}/v1/jobs"))
            .json(&job(aggregator))
            .send()
            .await?;
        let status = res.status();
        let v: Value = res.json().await?;
        if !status.is_success() {
            bail!("submitting the {aggregator} job: {}", v["error"]);
        }
        jobs.push((aggregator, v["id"].as_str().unwrap_or_default().to_string()));
    }

    let multi = MultiProgress::new();
    if args.json {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let style = ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} rounds  {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let bars: Vec<ProgressBar> = jobs
        .iter()
        .map(|(agg, _)| {
            let b = multi.add(ProgressBar::new(u64::from(args.rounds)));
            b.set_style(style.clone());
            b.set_prefix(agg.to_string());
            b
        })
        .collect();
    let deadline = Instant::now()
        + Duration::from_secs(u64::from(args.rounds) * (ROUND_TIMEOUT_SECS + 5) * 3 + 60);
    let mut finals: Vec<Value> = vec![Value::Null; jobs.len()];
    while finals.iter().any(Value::is_null) {
        if Instant::now() > deadline {
            bail!(
                "the jobs did not finish in time; see the logs in {}",
                dir.display()
            );
        }
        for (i, (_, id)) in jobs.iter().enumerate() {
            if !finals[i].is_null() {
                continue;
            }
            let Ok(v) = get(&http, api, &format!("/v1/jobs/{id}")).await else {
                continue;
            };
            bars[i].set_position(v["rounds_done"].as_u64().unwrap_or(0));
            let last = &v["last_round"];
            bars[i].set_message(format!(
                "accuracy {}  rejected {}",
                last["accuracy"]
                    .as_f64()
                    .map_or("-".into(), |a| format!("{:.1}%", a * 100.0)),
                rejected_total(&v)
            ));
            if v["state"] != "running" {
                bars[i].finish();
                finals[i] = v;
            }
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
    }

    let rows: Vec<Value> = jobs
        .iter()
        .zip(&finals)
        .map(|((agg, id), v)| {
            json!({
                "aggregator": agg,
                "job_id": id,
                "state": v["state"],
                "rounds_done": v["rounds_done"],
                "accuracy": v["last_round"]["accuracy"],
                "loss": v["last_round"]["loss"],
                "rejected_updates": rejected_total(v),
                "model_hash": v["model_hash"],
            })
        })
        .collect();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({ "nodes": n, "byzantine": args.attack, "jobs": rows })
            )?
        );
    } else {
        println!();
        println!(
            "{n} nodes, non-IID digits, node-{byzantine} sends {} updates:",
            args.attack
        );
        println!(
            "{:<10} {:<10} {:>7} {:>10} {:>8}  MODEL",
            "AGGREGATOR", "STATE", "ROUNDS", "ACCURACY", "LOSS"
        );
        for r in &rows {
            println!(
                "{:<10} {:<10} {:>7} {:>10} {:>8}  {}",
                r["aggregator"].as_str().unwrap_or("-"),
                r["state"].as_str().unwrap_or("-"),
                r["rounds_done"].to_string(),
                r["accuracy"]
                    .as_f64()
                    .map_or("-".into(), |a| format!("{:.1}%", a * 100.0)),
                r["loss"].as_f64().map_or("-".into(), |l| format!("{l:.3}")),
                r["model_hash"]
                    .as_str()
                    .map_or("-", |h| &h[..h.len().min(16)]),
            );
        }
        println!(
            "Krum keeps the one update closest to the others, so the attacker's is left out; \
             FedAvg averages it in."
        );
        if args.dir.is_none() {
            println!("(run with --dir DIR to keep the nodes' data, models and logs)");
        }
    }
    drop(nodes);
    Ok(())
}

fn rejected_total(job: &Value) -> u64 {
    job["history"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| r["rejected"].as_u64().unwrap_or(0))
        .sum()
}

async fn get(http: &reqwest::Client, api: &str, path: &str) -> Result<Value> {
    let res = http.get(format!("http://{api}{path}")).send().await?;
    if !res.status().is_success() {
        bail!("{path}: HTTP {}", res.status());
    }
    Ok(res.json().await?)
}

/// Waits for a node's runtime file (written once it is listening and serving its API).
async fn wait_runtime(node_dir: &Path, child: &mut Child) -> Result<Value> {
    let path = node_dir.join(crate::node::RUNTIME_FILE);
    let started = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(&path) {
            if let Ok(v) = serde_json::from_str::<Value>(&text) {
                return Ok(v);
            }
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "a node exited during start-up ({status}); see its log beside {}",
                node_dir.display()
            );
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!(
                "a node did not start within 30 s; see its log beside {}",
                node_dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn write_secret(path: &Path, secret: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(secret.as_bytes())?;
    Ok(())
}
