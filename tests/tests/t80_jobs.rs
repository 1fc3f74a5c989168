//! Federated training jobs on real node processes: each node trains on its own shard of the
//! bundled digits set; the leader aggregates; rounds are committed through Raft and can be
//! recomputed by anyone.

use agentmesh_tests::jobs::{accuracy, job, rejections, split, start_trainers, submit, wait_done};
use agentmesh_tests::{binary, ok_stdout, wait_until};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

#[tokio::test]
async fn a_five_node_job_trains_digits_and_any_node_can_verify_it() -> Result<()> {
    let root = tempfile::tempdir()?;
    let shards = split(root.path(), 5, None)?;
    let nodes = start_trainers(root.path(), &shards, 5, |_| vec![]).await?;

    // Submitted on a follower, through the CLI; the leader runs it.
    let out = nodes[3].cli(&[
        "job",
        "submit",
        "--aggregator",
        "fedavg",
        "--rounds",
        "8",
        "--local-epochs",
        "2",
        "--batch-size",
        "16",
        "--learning-rate",
        "0.05",
        "--momentum",
        "0.5",
        "--min-participants",
        "5",
        "--round-timeout-secs",
        "30",
    ])?;
    let stdout = ok_stdout(&out)?;
    let id = stdout
        .lines()
        .last()
        .context("no job id printed")?
        .trim()
        .to_string();
    let job = wait_done(&nodes[1], &id, Duration::from_secs(240)).await?;
    let history = job["history"].as_array().context("no history")?;
    assert_eq!(job["rounds_done"], 8, "{job}");
    assert!(
        history.iter().all(|r| r["used"] == 5 && r["rejected"] == 0),
        "{job}"
    );
    assert!(
        accuracy(&job) >= 0.90,
        "accuracy {} < 90%: {job}",
        accuracy(&job)
    );

    // The model, fetched through another node and scored offline, agrees.
    let model = root.path().join("model.safetensors");
    ok_stdout(&nodes[4].cli(&["model", "get", &id, model.to_str().unwrap_or_default()])?)?;
    let eval = Command::new(binary()?)
        .args(["evaluate", "--json", "--model"])
        .arg(&model)
        .arg("--csv")
        .arg(shards.join("test.csv"))
        .output()?;
    let eval: Value = serde_json::from_str(&ok_stdout(&eval)?)?;
    assert!(
        (eval["accuracy"].as_f64().unwrap_or(0.0) - accuracy(&job)).abs() < 1e-9,
        "{eval} vs {job}"
    );

    // Every round recomputes, on a node that did not aggregate it, to the committed hash.
    let verify = nodes[2].cli(&["job", "verify", &id, "--json"])?;
    let v: Value = serde_json::from_str(&ok_stdout(&verify)?)?;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["rounds"].as_array().map_or(0, Vec::len), 8);
    Ok(())
}

#[tokio::test]
async fn robust_rules_hold_against_a_sign_flipper_and_fedavg_does_not() -> Result<()> {
    let root = tempfile::tempdir()?;
    let shards = split(root.path(), 5, Some(1.0))?;
    let nodes = start_trainers(root.path(), &shards, 5, |i| {
        if i == 4 {
            vec!["--byzantine".into(), "sign-flip".into()]
        } else {
            vec![]
        }
    })
    .await?;
    let mut ids = Vec::new();
    for agg in ["krum", "trimmed_mean", "fedavg"] {
        ids.push((
            agg,
            submit(&nodes[0], &job(agg, 10, json!({ "min_participants": 5 }))).await?,
        ));
    }
    let mut acc = std::collections::BTreeMap::new();
    for (agg, id) in &ids {
        let j = wait_done(&nodes[0], id, Duration::from_secs(300)).await?;
        acc.insert(*agg, accuracy(&j));
    }
    eprintln!("held-out accuracy with one sign-flipper: {acc:?}");
    assert!(acc["krum"] >= 0.88, "krum {acc:?}");
    assert!(acc["trimmed_mean"] >= 0.88, "trimmed mean {acc:?}");
    assert!(
        acc["fedavg"] < acc["trimmed_mean"] - 0.10,
        "fedavg not hurt: {acc:?}"
    );
    Ok(())
}

#[tokio::test]
async fn forged_replayed_and_nan_updates_are_rejected_and_counted() -> Result<()> {
    let root = tempfile::tempdir()?;
    let shards = split(root.path(), 5, None)?;
    let nodes = start_trainers(root.path(), &shards, 5, |i| {
        if i == 4 {
            vec!["--byzantine".into(), "nan".into()]
        } else {
            vec![]
        }
    })
    .await?;
    let id = submit(
        &nodes[0],
        &job("fedavg", 4, json!({ "round_timeout_secs": 8 })),
    )
    .await?;
    // Once round 1 is committed, replay one of its updates and forge one for the open round.
    wait_until("round 2 to open", Duration::from_secs(60), || async {
        let j = nodes[0].get_json(&format!("/v1/jobs/{id}")).await?;
        Ok(j["current"]["round"].as_u64() >= Some(2))
    })
    .await?;
    let j = nodes[0].get_json(&format!("/v1/jobs/{id}")).await?;
    let r1 = &j["history"][0];
    let used = &r1["updates"][0];
    let node_id = u64::from_str_radix(used["node_id"].as_str().unwrap_or("0"), 16)?;
    let replay = json!({
        "v": 1, "job_id": id, "round": 1, "base_model": r1["model_hash"].clone(),
        "update_hash": used["update_hash"], "examples": used["examples"],
        "node_id": node_id, "train_loss": null, "signature": used["signature"],
    });
    let current = &j["current"];
    let forged = json!({
        "v": 1, "job_id": id, "round": current["round"], "base_model": j["model_hash"],
        "update_hash": used["update_hash"], "examples": 1_000_000u64,
        "node_id": node_id, "train_loss": null, "signature": used["signature"],
    });
    // Published by a node that does not lead: gossip does not come back to its publisher.
    let leader = nodes[0].cluster().await?["leader_peer_id"].clone();
    let publisher = nodes
        .iter()
        .find(|n| leader != n.info.peer_id.as_str())
        .context("every node leads?")?;
    for (what, msg) in [("replay", &replay), ("forgery", &forged)] {
        let res = publisher
            .http()
            .post(publisher.url("/v1/topics/agentmesh.jobs.v1/messages"))
            .body(msg.to_string())
            .send()
            .await?;
        if !res.status().is_success() {
            bail!("publishing the {what}: HTTP {}", res.status());
        }
    }
    let done = wait_done(&nodes[0], &id, Duration::from_secs(120)).await?;
    let reasons = rejections(&done);
    assert!(
        reasons.iter().any(|r| r.contains("not finite")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("round 1, but round")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("bad signature")),
        "{reasons:?}"
    );
    // The NaN node never got into a model; every round used the four honest updates.
    for r in done["history"].as_array().into_iter().flatten() {
        assert_eq!(r["used"], 4, "{r}");
    }
    Ok(())
}
