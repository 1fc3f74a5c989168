//! Partitions with real isolation: three nodes, each in its own network namespace, cut apart
//! with iptables (see `netns.rs`). A leader cut off alone cannot commit or serve linearizable
//! reads while the majority elects a new leader and keeps going; when the partition ends the
//! cluster heals to one leader and the minority's unacknowledged write is nowhere.

use agentmesh_tests::netns::Netns;
use agentmesh_tests::{fast_raft_args, leader_of, wait_settled, wait_until, Launch, Node};
use anyhow::{Context, Result};
use serde_json::json;
use std::path::Path;
use std::time::Duration;

const API_KEY: &str = "partition-test-api-key-0123456789";

/// Starts node `i` in its namespace: mesh and API on its own address (the API then needs a
/// key, which the harness presents).
async fn start_in(net: &Netns, root: &Path, i: usize, extra: &[String]) -> Result<Node> {
    let key_file = root.join("api.key");
    std::fs::write(&key_file, API_KEY)?;
    let ip = net.ip(i);
    let mut args: Vec<String> = vec![
        "start".into(),
        "--name".into(),
        format!("n{i}"),
        "--listen".into(),
        format!("/ip4/{ip}/tcp/4001"),
        "--listen".into(),
        format!("/ip4/{ip}/udp/4001/quic-v1"),
        "--api".into(),
        format!("{ip}:7070"),
        "--api-key-file".into(),
        key_file.display().to_string(),
    ];
    args.extend(fast_raft_args());
    args.extend_from_slice(extra);
    let launch = Launch {
        prefix: net.prefix(i),
        api_key: Some(API_KEY.into()),
    };
    Node::spawn_with(root, &format!("n{i}"), &args, &launch).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_minority_cannot_commit_and_the_cluster_heals_to_one_leader() -> Result<()> {
    if !Netns::should_run()? {
        return Ok(());
    }
    let root = tempfile::tempdir()?;
    let net = Netns::create(3)?;
    let first = start_in(&net, root.path(), 0, &[]).await?;
    wait_until("n0 to found a cluster", Duration::from_secs(20), || async {
        Ok(first.is_ready().await)
    })
    .await?;
    let mut nodes = vec![first];
    for i in 1..3 {
        let token = nodes[0].token(600).await?;
        let via = nodes[0].tcp_addr();
        let extra = ["--bootstrap".to_string(), via, "--join".into(), token];
        nodes.push(start_in(&net, root.path(), i, &extra).await?);
    }
    wait_settled(&nodes, 3).await?;
    let (status, body) = nodes[1].kv_put("before", &json!(1), None).await?;
    assert_eq!(status, 200, "{body}");

    let old = leader_of(&nodes[0]).await.context("no leader")?;
    let li = nodes
        .iter()
        .position(|n| n.info.peer_id == old)
        .context("leader not among the nodes")?;
    let majority: Vec<usize> = (0..3).filter(|i| *i != li).collect();
    net.partition(&[&[li], &majority])?;

    wait_until(
        "the majority to elect a new leader",
        Duration::from_secs(20),
        || async {
            let l = leader_of(&nodes[majority[0]]).await;
            Ok(l.is_some() && l.as_deref() != Some(old.as_str()))
        },
    )
    .await?;
    let (status, body) = nodes[majority[1]]
        .kv_put("majority", &json!("committed"), None)
        .await?;
    assert_eq!(status, 200, "the majority must keep going: {body}");

    // The old leader, alone, can neither commit nor answer a linearizable read.
    let (status, body) = nodes[li].kv_put("minority", &json!("lost"), None).await?;
    assert_ne!(status, 200, "a minority acknowledged a write: {body}");
    let (status, body) = nodes[li].kv_get("before").await?;
    assert_ne!(status, 200, "a minority served a linearizable read: {body}");
    assert!(
        !nodes[li].is_ready().await,
        "a leader without a quorum must not report ready"
    );

    net.heal()?;
    wait_until(
        "one leader that every node follows",
        Duration::from_secs(30),
        || async {
            let mut leaders = Vec::new();
            for n in &nodes {
                leaders.push(leader_of(n).await);
            }
            Ok(leaders[0].is_some() && leaders.iter().all(|l| *l == leaders[0]))
        },
    )
    .await?;
    wait_until(
        "the old leader to catch up",
        Duration::from_secs(30),
        || async { Ok(nodes[li].kv_get("majority").await?.0 == 200) },
    )
    .await?;
    for n in &nodes {
        let (status, body) = n.kv_get("majority").await?;
        assert_eq!((status, body["value"].clone()), (200, json!("committed")));
        let (status, body) = n.kv_get("before").await?;
        assert_eq!((status, body["value"].clone()), (200, json!(1)));
        let (status, body) = n.kv_get("minority").await?;
        assert_eq!(
            status, 404,
            "the unacknowledged write surfaced on {}: {body}",
            n.name
        );
    }
    Ok(())
}
