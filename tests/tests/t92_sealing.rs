//! Per-peer sealing on real nodes: model updates are sealed for the voters (the nodes that may
//! aggregate), so a learner that holds or serves a copy cannot read it; an update altered after
//! sealing is refused; a voter's key rotates mid-job without the job noticing.

use agentmesh_tests::jobs::{job, rejections, split, start_trainers, submit, wait_done};
use agentmesh_tests::{ok_stdout, wait_until, Node};
use anyhow::{Context, Result};
use serde_json::{json, Value};
use std::time::Duration;

/// The current sealing key id each member publishes, by peer id, as `node` sees it.
async fn key_ids(node: &Node) -> Result<Vec<(String, Option<String>)>> {
    let keys = node.get_json("/v1/keys").await?;
    Ok(keys
        .as_array()
        .context("no key list")?
        .iter()
        .map(|m| {
            let current = m["keys"].as_array().and_then(|k| k.last()).cloned();
            (
                m["peer_id"].as_str().unwrap_or_default().to_string(),
                current.and_then(|k| k["key_id"].as_str().map(String::from)),
            )
        })
        .collect())
}

/// Rounds of the job: enough (about 0.1 s each here) that the rotation lands mid-job.
const ROUNDS: u32 = 40;

#[tokio::test]
async fn updates_are_sealed_for_the_aggregators_and_keys_rotate_mid_job() -> Result<()> {
    let root = tempfile::tempdir()?;
    let shards = split(root.path(), 4, None)?;
    // Three voters and a learner; node 1 alters its sealed update after sealing it.
    let nodes = start_trainers(root.path(), &shards, 4, |i| {
        let mut a = vec!["--raft-voters".to_string(), "3".to_string()];
        if i == 1 {
            a.extend(["--byzantine".into(), "tamper".into()]);
        }
        a
    })
    .await?;
    let tamperer = nodes[1].info.peer_id.clone();
    wait_until(
        "every member to publish a sealing key",
        Duration::from_secs(30),
        || async {
            let ids = key_ids(&nodes[0]).await?;
            Ok(ids.len() == 4 && ids.iter().all(|(_, k)| k.is_some()))
        },
    )
    .await?;
    let mut learner = None;
    wait_until(
        "three voters and a learner",
        Duration::from_secs(30),
        || async {
            let c = nodes[0].cluster().await?;
            let members = c["members"].as_array().cloned().unwrap_or_default();
            let learners: Vec<String> = members
                .iter()
                .filter(|m| m["role"] == "learner")
                .filter_map(|m| m["peer_id"].as_str().map(String::from))
                .collect();
            let voters = members.iter().filter(|m| m["role"] == "voter").count();
            Ok(voters == 3 && learners.len() == 1)
        },
    )
    .await?;
    let c = nodes[0].cluster().await?;
    for m in c["members"].as_array().into_iter().flatten() {
        if m["role"] == "learner" {
            learner = nodes
                .iter()
                .position(|n| m["peer_id"] == n.info.peer_id.as_str());
        }
    }
    let learner = learner.context("the learner is none of our nodes")?;
    let leader_peer = c["leader_peer_id"]
        .as_str()
        .context("no leader")?
        .to_string();
    let leader = nodes
        .iter()
        .position(|n| n.info.peer_id == leader_peer)
        .context("no node leads")?;
    let tamperer_id = c["members"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["peer_id"] == tamperer.as_str())
        .map(|m| m["node_id"].clone())
        .context("the tamperer is not a member")?;

    let id = submit(
        &nodes[0],
        &job(
            "fedavg",
            ROUNDS,
            json!({ "min_participants": 3, "round_timeout_secs": 30 }),
        ),
    )
    .await?;
    wait_until("the first round", Duration::from_secs(90), || async {
        let j = nodes[0].get_json(&format!("/v1/jobs/{id}")).await?;
        Ok(j["rounds_done"].as_u64().unwrap_or(0) >= 1)
    })
    .await?;

    // The aggregator's key rotates while the job runs.
    let before = key_ids(&nodes[learner]).await?;
    let rotated: Value = serde_json::from_str(&ok_stdout(
        &nodes[leader].cli(&["keys", "rotate", "--json"])?,
    )?)?;
    let new_key = rotated["key_id"].as_str().context("no key id")?.to_string();
    assert!(
        before
            .iter()
            .all(|(_, k)| k.as_deref() != Some(new_key.as_str())),
        "{rotated}"
    );
    wait_until(
        "the new key to reach the learner",
        Duration::from_secs(20),
        || async {
            Ok(key_ids(&nodes[learner])
                .await?
                .iter()
                .any(|(p, k)| *p == leader_peer && k.as_deref() == Some(new_key.as_str())))
        },
    )
    .await?;

    let done = wait_done(&nodes[0], &id, Duration::from_secs(240)).await?;
    let history = done["history"].as_array().context("no history")?;
    assert_eq!(done["rounds_done"], ROUNDS, "{done}");
    let rotated_at = rotated["created_at_ms"].as_u64().context("no key time")?;
    assert!(
        history
            .iter()
            .any(|r| r["started_at_ms"].as_u64().unwrap_or(0) > rotated_at),
        "the job ended before the rotation: {done}"
    );
    for r in history {
        // Every honest update opened, before the rotation and after; the altered one did not.
        assert_eq!(r["used"], 3, "{r}");
        assert_eq!(r["rejected"], 1, "{r}");
        assert_eq!(r["rejected_updates"][0]["node_id"], tamperer_id, "{r}");
    }
    let reasons = rejections(&done);
    assert!(
        reasons
            .iter()
            .all(|r| r.contains("sealed update") && r.contains("altered")),
        "{reasons:?}"
    );

    // The learner holds a copy of an update (it fetches it like any blob) but cannot read it.
    let hash = history[0]["updates"][0]["update_hash"]
        .as_str()
        .context("no update hash")?
        .to_string();
    let res = nodes[learner]
        .http()
        .get(nodes[learner].url(&format!("/v1/blobs/{hash}")))
        .send()
        .await?;
    assert!(res.status().is_success(), "{}", res.status());
    let bytes = res.bytes().await?;
    assert!(
        bytes.starts_with(b"AMSEAL1\0"),
        "the update blob is not sealed"
    );
    assert!(
        !bytes.windows(12).any(|w| w == b"__metadata__"),
        "the sealed blob shows the safetensors header"
    );
    let verify = |n: &Node| -> Result<(bool, Value)> {
        let out = n.cli(&["job", "verify", &id, "--json"])?;
        let v = serde_json::from_slice(&out.stdout)
            .with_context(|| String::from_utf8_lossy(&out.stderr).to_string())?;
        Ok((out.status.success(), v))
    };
    let (success, v) = verify(&nodes[learner])?;
    assert!(!success, "{v}");
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        v["rounds"]
            .as_array()
            .into_iter()
            .flatten()
            .all(|r| r["error"]
                .as_str()
                .unwrap_or_default()
                .contains("not sealed for this node")),
        "{v}"
    );
    // The rotated aggregator still opens what was sealed for its older key.
    let (success, v) = verify(&nodes[leader])?;
    assert!(success && v["ok"] == true, "{v}");

    // The rotation is in the audit log, with who asked.
    let audit = nodes[2].get_json("/v1/audit").await?;
    let publishes: Vec<&Value> = audit
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["action"] == "seal_key.publish")
        .collect();
    assert!(
        publishes.iter().any(
            |e| e["detail"].as_str() == Some(&format!("key {new_key}")) && e["actor"] != "node"
        ),
        "{audit}"
    );
    Ok(())
}
