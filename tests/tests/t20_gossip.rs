//! Gossip: a message published on any node reaches every subscriber, over the
//! WebSocket event stream and the `subscribe` command; limits are enforced.

use agentmesh_tests::events::{next_gossip, next_json, subscribe_ws, wait_subscribers};
use agentmesh_tests::{ok_stdout, start_chain, wait_full_mesh};
use anyhow::{Context, Result};
use serde_json::Value;
use std::time::Duration;
use tokio::io::AsyncBufReadExt;

#[tokio::test(flavor = "multi_thread")]
async fn publish_reaches_every_subscriber() -> Result<()> {
    let root = tempfile::tempdir()?;
    let nodes = start_chain(root.path(), "g", 6, &[]).await?;
    wait_full_mesh(&nodes, Duration::from_secs(30)).await?;

    let mut sockets = Vec::new();
    for n in &nodes[1..5] {
        sockets.push(subscribe_ws(n, "news").await?);
    }
    // The last subscriber is the CLI, as a user would run it.
    let mut cli = tokio::process::Command::new(agentmesh_tests::binary()?)
        .args(["subscribe", "news", "--json", "--api", &nodes[5].info.api])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut cli_lines = tokio::io::BufReader::new(cli.stdout.take().context("stdout")?).lines();
    wait_subscribers(&nodes[0], "news", 5).await?;

    let out = ok_stdout(&nodes[0].cli(&["publish", "news", "hello mesh", "--json"])?)?;
    let published: Value = serde_json::from_str(&out)?;
    let id = published["message_id"]
        .as_str()
        .context("message_id")?
        .to_string();
    assert_eq!(id.len(), 64, "message ids are SHA-256 content hashes");

    for ws in &mut sockets {
        let m = next_gossip(ws).await?;
        assert_eq!(m["topic"], "news");
        assert_eq!(m["data"], "hello mesh");
        assert_eq!(m["from"], nodes[0].info.peer_id.as_str());
        assert_eq!(m["message_id"], id.as_str());
    }
    let line = tokio::time::timeout(Duration::from_secs(15), cli_lines.next_line())
        .await
        .context("subscribe printed nothing")??
        .context("subscribe exited")?;
    let m: Value = serde_json::from_str(&line)?;
    assert_eq!(m["data"], "hello mesh");
    assert_eq!(m["message_id"], id.as_str());

    // Binary payloads arrive as base64.
    let res = nodes[3]
        .http()
        .post(nodes[3].url("/v1/topics/news/messages"))
        .body(vec![0xffu8, 0x00, 0xfe])
        .send()
        .await?;
    assert!(res.status().is_success());
    let m = next_gossip(&mut sockets[0]).await?;
    assert_eq!(m["data_b64"], "/wD+");
    assert_eq!(m["from"], nodes[3].info.peer_id.as_str());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn gossip_limits_are_enforced() -> Result<()> {
    let root = tempfile::tempdir()?;
    let nodes = start_chain(root.path(), "l", 2, &[]).await?;
    wait_full_mesh(&nodes, Duration::from_secs(20)).await?;
    let _ws = subscribe_ws(&nodes[1], "big").await?;
    wait_subscribers(&nodes[0], "big", 1).await?;
    let url = nodes[0].url("/v1/topics/big/messages");
    let http = nodes[0].http();

    let res = http.post(&url).body(vec![b'x'; 2 << 20]).send().await?;
    assert_eq!(res.status(), 413);
    let res = http.post(&url).body(Vec::<u8>::new()).send().await?;
    assert_eq!(res.status(), 400);
    let res = http
        .post(nodes[0].url("/v1/topics/a%0Ab/messages"))
        .body("x")
        .send()
        .await?;
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await?;
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("invalid topic"),
        "{body}"
    );
    // Largest accepted message still travels.
    let res = http.post(&url).body(vec![b'y'; 1000 * 1000]).send().await?;
    assert!(res.status().is_success(), "{}", res.text().await?);
    // Nobody subscribes to this one: a clear 503, not silence.
    let res = http
        .post(nodes[0].url("/v1/topics/empty/messages"))
        .body("x")
        .send()
        .await?;
    assert_eq!(res.status(), 503);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn event_stream_reports_peers_going_down() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut nodes = start_chain(root.path(), "e", 2, &[]).await?;
    wait_full_mesh(&nodes, Duration::from_secs(20)).await?;
    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/v1/events", nodes[0].info.api)).await?;
    assert_eq!(next_json(&mut ws).await?["type"], "subscribed");
    let gone = nodes[1].info.peer_id.clone();
    nodes[1].kill().await?;
    loop {
        let ev = next_json(&mut ws).await?;
        if ev["type"] == "peer_down" {
            assert_eq!(ev["peer_id"], gone.as_str());
            break;
        }
    }
    Ok(())
}
