//! Helpers for training-job tests: data shards, trainer clusters, jobs.

use crate::{binary, fast_raft_args, ok_stdout, start_cluster_with, wait_until, Node};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Splits digits into `n` shards (IID, or Dirichlet `alpha`) with the CLI; returns the dir.
pub fn split(root: &Path, n: usize, alpha: Option<f64>) -> Result<PathBuf> {
    let out = root.join("shards");
    let mut cmd = Command::new(binary()?);
    cmd.args([
        "dataset",
        "split",
        "--dataset",
        "digits",
        "--nodes",
        &n.to_string(),
        "--seed",
        "3",
    ])
    .arg("--out")
    .arg(&out);
    if let Some(a) = alpha {
        cmd.args(["--alpha", &a.to_string()]);
    }
    ok_stdout(&cmd.output()?)?;
    Ok(out)
}

/// Starts `n` trainer nodes, node i on shard i with `extra(i)`; the first founds the cluster,
/// the rest join with tokens. Waits until all are members and registered as trainers.
pub async fn start_trainers(
    root: &Path,
    shards: &Path,
    n: usize,
    extra: impl Fn(usize) -> Vec<String>,
) -> Result<Vec<Node>> {
    let nodes = start_cluster_with(root, "n", n, |i| {
        let mut a = fast_raft_args();
        a.extend([
            "--data".into(),
            shards.join(format!("shard-{i}.csv")).display().to_string(),
            "--eval-data".into(),
            shards.join("test.csv").display().to_string(),
        ]);
        a.extend(extra(i));
        a
    })
    .await?;
    wait_trainers(&nodes, Duration::from_secs(30)).await?;
    Ok(nodes)
}

/// Waits until every node of `nodes` is registered as a trainer.
pub async fn wait_trainers(nodes: &[Node], timeout: Duration) -> Result<()> {
    let first = nodes.first().context("no nodes")?;
    wait_until("every node to register as a trainer", timeout, || async {
        let c = first.cluster().await?;
        Ok(c["trainers"].as_array().map_or(0, Vec::len) == nodes.len())
    })
    .await
}

/// A softmax job on digits with `aggregator`, `rounds` rounds, and `extra` fields on top.
pub fn job(aggregator: &str, rounds: u32, extra: Value) -> Value {
    let mut j = json!({
        "model": "softmax", "dataset_features": 64, "classes": 10,
        "rounds": rounds, "local_epochs": 2, "batch_size": 16,
        "learning_rate": 0.05, "momentum": 0.5,
        "aggregator": aggregator, "byzantine": 1, "trim_ratio": 0.2,
        "min_participants": 3, "round_timeout_secs": 20,
    });
    if let (Some(j), Some(extra)) = (j.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            j.insert(k.clone(), v.clone());
        }
    }
    j
}

/// Submits a job through the API; returns its id.
pub async fn submit(node: &Node, spec: &Value) -> Result<String> {
    let res = node
        .http()
        .post(node.url("/v1/jobs"))
        .json(spec)
        .send()
        .await?;
    let status = res.status();
    let v: Value = res.json().await?;
    if !status.is_success() {
        bail!("POST /v1/jobs: HTTP {status}: {v}");
    }
    v["id"].as_str().map(String::from).context("no job id")
}

/// Waits for a job to end and requires it to have ended `done`.
pub async fn wait_done(node: &Node, id: &str, timeout: Duration) -> Result<Value> {
    wait_until(&format!("job {id} to end"), timeout, || async {
        Ok(node.get_json(&format!("/v1/jobs/{id}")).await?["state"] != "running")
    })
    .await?;
    let v = node.get_json(&format!("/v1/jobs/{id}")).await?;
    if v["state"] != "done" {
        bail!("job {id} ended {}: {}", v["state"], v["message"]);
    }
    Ok(v)
}

/// The last successful round's accuracy.
pub fn accuracy(job: &Value) -> f64 {
    job["last_round"]["accuracy"].as_f64().unwrap_or(0.0)
}

/// Every rejection reason over the job's rounds.
pub fn rejections(job: &Value) -> Vec<String> {
    job["history"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| {
            r["rejected_updates"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|x| x["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}
