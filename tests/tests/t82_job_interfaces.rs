//! How users and their own code meet a training job on real node processes: an ML team's
//! trainer program (`--trainer-cmd`, the bundled numpy example) takes part in rounds next to
//! the built-in trainer, and the `/v1/events` WebSocket reports every round as it is committed.

use agentmesh_tests::jobs::{accuracy, job, split, start_trainers, submit, wait_done};
use agentmesh_tests::ok_stdout;
use anyhow::{bail, Context, Result};
use futures::StreamExt;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// Whether `python3` with numpy is here. CI installs it and sets `AGENTMESH_REQUIRE_NUMPY`,
/// so there a missing numpy fails the test instead of skipping it.
fn numpy_available() -> Result<bool> {
    let ok = Command::new("python3")
        .args(["-c", "import numpy"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok && std::env::var_os("AGENTMESH_REQUIRE_NUMPY").is_some() {
        bail!("AGENTMESH_REQUIRE_NUMPY is set but python3 cannot import numpy");
    }
    Ok(ok)
}

#[tokio::test(flavor = "multi_thread")]
async fn external_trainers_take_part_and_events_report_every_round() -> Result<()> {
    if !numpy_available()? {
        println!("skipped: python3 with numpy is not available");
        return Ok(());
    }
    let trainer = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/python-trainer/train.py")
        .canonicalize()?;
    let root = tempfile::tempdir()?;
    let shards = split(root.path(), 3, None)?;
    // Node 0 trains with the built-in trainer, nodes 1 and 2 run the user's Python program.
    let nodes = start_trainers(root.path(), &shards, 3, |i| {
        if i == 0 {
            vec![]
        } else {
            vec![
                "--trainer-cmd".into(),
                format!("python3 {}", trainer.display()),
            ]
        }
    })
    .await?;
    let cluster = nodes[0].cluster().await?;
    let mut kinds: Vec<&str> = cluster["trainers"]
        .as_array()
        .context("no trainers")?
        .iter()
        .filter_map(|t| t["kind"].as_str())
        .collect();
    kinds.sort_unstable();
    assert_eq!(kinds, ["builtin", "external", "external"], "{cluster}");

    // Subscribed before the job exists: every round must arrive as an event.
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/events", nodes[2].info.api)).await?;
    let rounds = 4;
    let id = submit(
        &nodes[1],
        &job("fedavg", rounds, json!({ "min_participants": 3 })),
    )
    .await?;

    let mut seen_rounds = Vec::new();
    let last = tokio::time::timeout(Duration::from_secs(180), async {
        loop {
            let msg = ws.next().await.context("event stream closed")??;
            let Message::Text(text) = msg else { continue };
            let ev: Value = serde_json::from_str(&text)?;
            if ev["type"] != "job" || ev["job"]["id"] != id.as_str() {
                continue;
            }
            let done = ev["job"]["rounds_done"].as_u64().unwrap_or(0);
            if seen_rounds.last() != Some(&done) {
                seen_rounds.push(done);
            }
            if ev["job"]["state"] != "running" {
                return Ok::<_, anyhow::Error>(ev["job"].clone());
            }
        }
    })
    .await
    .context("the job did not end within 180 s")??;
    assert_eq!(last["state"], "done", "{last}");
    // An event for every round, in order, none skipped.
    let tail = &seen_rounds[seen_rounds.len().saturating_sub(rounds as usize)..];
    assert_eq!(
        tail,
        (1..=u64::from(rounds)).collect::<Vec<_>>(),
        "rounds_done over the job's events: {seen_rounds:?}"
    );
    assert!(
        last["last_round"]["accuracy"].as_f64().unwrap_or(0.0) > 0.0,
        "{last}"
    );

    // Every round used all three updates, the two Python ones included.
    let job = wait_done(&nodes[0], &id, Duration::from_secs(10)).await?;
    let history = job["history"].as_array().context("no history")?;
    assert_eq!(history.len(), rounds as usize, "{job}");
    for r in history {
        assert_eq!(r["used"], 3, "round {}: {r}", r["round"]);
        assert_eq!(r["rejected"], 0, "round {}: {r}", r["round"]);
        // Where the round's time went is committed with it, the last participant's training
        // included (whichever trainer that was).
        let t = &r["timing"];
        for step in ["train", "aggregate", "model_publish"] {
            assert!(t[step].as_f64().is_some_and(|v| v > 0.0), "{step}: {r}");
        }
        assert!(r["started_at_ms"].as_u64().is_some_and(|ms| ms > 0), "{r}");
    }
    assert!(
        accuracy(&job) >= 0.85,
        "accuracy {} < 85% with two external trainers: {job}",
        accuracy(&job)
    );

    // The Python updates are signed and recompute like the built-in ones.
    let verify = nodes[0].cli(&["job", "verify", &id, "--json"])?;
    let v: Value = serde_json::from_str(&ok_stdout(&verify)?)?;
    assert_eq!(v["ok"], true, "{v}");
    Ok(())
}
