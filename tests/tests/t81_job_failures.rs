//! Training jobs through failures, on real node processes: the leader killed mid-job, and a
//! participant paused mid-job.

use agentmesh_tests::jobs::{job, split, start_trainers, submit, wait_done};
use agentmesh_tests::wait_until;
use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use std::time::Duration;

async fn rounds_done(node: &agentmesh_tests::Node, id: &str) -> Result<u64> {
    Ok(
        node.get_json(&format!("/v1/jobs/{id}")).await?["rounds_done"]
            .as_u64()
            .unwrap_or(0),
    )
}

#[tokio::test]
async fn the_job_survives_its_leader_being_killed() -> Result<()> {
    let root = tempfile::tempdir()?;
    let shards = split(root.path(), 5, None)?;
    let mut nodes = start_trainers(root.path(), &shards, 5, |_| vec![]).await?;
    let id = submit(
        &nodes[0],
        &job("median", 12, json!({ "round_timeout_secs": 10 })),
    )
    .await?;
    wait_until("two rounds", Duration::from_secs(60), || async {
        Ok(rounds_done(&nodes[0], &id).await? >= 2)
    })
    .await?;
    let leader = nodes[0].cluster().await?["leader_peer_id"].clone();
    let dead = nodes
        .iter()
        .position(|n| leader == n.info.peer_id.as_str())
        .context("no node leads")?;
    let before = rounds_done(&nodes[0], &id).await?;
    nodes[dead].kill().await?;
    let survivor = &nodes[(dead + 1) % nodes.len()];
    let done = wait_done(survivor, &id, Duration::from_secs(180)).await?;
    assert_eq!(done["rounds_done"], 12, "{done}");
    assert!(before < 12, "the job ended before the leader was killed");
    // Rounds after the failover did without the dead node.
    let last = &done["history"]
        .as_array()
        .context("no history")?
        .last()
        .cloned();
    let last: &Value = last.as_ref().context("no rounds")?;
    assert_eq!(last["participants"], 4, "{last}");
    // The rounds the dead leader aggregated used its own update too, which no other node
    // fetched: it went with the model to another node, so they still recompute.
    let verify = survivor.cli(&["job", "verify", &id, "--json"])?;
    let v: Value = serde_json::from_str(&agentmesh_tests::ok_stdout(&verify)?)?;
    assert_eq!(v["ok"], true, "{v}");
    Ok(())
}

#[tokio::test]
async fn a_paused_participant_does_not_stall_rounds_and_catches_up() -> Result<()> {
    let root = tempfile::tempdir()?;
    let shards = split(root.path(), 5, None)?;
    let nodes = start_trainers(root.path(), &shards, 5, |_| vec![]).await?;
    let timeout = 4u64;
    let id = submit(
        &nodes[0],
        &job("trimmed_mean", 60, json!({ "round_timeout_secs": timeout })),
    )
    .await?;
    wait_until("a first round", Duration::from_secs(60), || async {
        Ok(rounds_done(&nodes[0], &id).await? >= 1)
    })
    .await?;
    let leader = nodes[0].cluster().await?["leader_peer_id"].clone();
    let paused = nodes
        .iter()
        .position(|n| leader != n.info.peer_id.as_str())
        .context("every node leads?")?;
    let paused_id = nodes[paused].cluster().await?["node_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let observer = &nodes[(paused + 1) % nodes.len()];
    nodes[paused].signal(Signal::SIGSTOP)?;
    // Rounds go on without it: some round closes at its deadline with four updates.
    let at_pause = rounds_done(observer, &id).await?;
    wait_until(
        "rounds to go on without the paused node",
        Duration::from_secs(60),
        || async { Ok(rounds_done(observer, &id).await? >= at_pause + 3) },
    )
    .await?;
    nodes[paused].signal(Signal::SIGCONT)?;
    // Back, it is asked again and its updates are used.
    wait_until(
        "the resumed node to contribute again",
        Duration::from_secs(90),
        || async {
            let j = observer.get_json(&format!("/v1/jobs/{id}")).await?;
            let rounds = j["history"].as_array().cloned().unwrap_or_default();
            Ok(rounds.iter().skip(at_pause as usize + 3).any(|r| {
                r["updates"]
                    .as_array()
                    .is_some_and(|u| u.iter().any(|u| u["node_id"] == paused_id.as_str()))
            }))
        },
    )
    .await?;
    let j = observer
        .http()
        .post(observer.url(&format!("/v1/jobs/{id}/cancel")))
        .send()
        .await?
        .json::<Value>()
        .await?;
    assert_eq!(j["state"], "cancelled", "{j}");
    let j = observer.get_json(&format!("/v1/jobs/{id}")).await?;
    for r in j["history"].as_array().into_iter().flatten() {
        // No round outlived its deadline by more than the time to aggregate and commit.
        let secs = r["secs"].as_f64().unwrap_or(0.0);
        assert!(
            secs < timeout as f64 + 3.0,
            "round held past its deadline: {r}"
        );
        assert!(r["failed"].is_null(), "{r}");
    }
    Ok(())
}
