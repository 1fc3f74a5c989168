//! Cluster state on real nodes: founding, joining with single-use tokens, the
//! replicated kv store, leader failure, graceful leave and rejoin, rename.

use agentmesh_tests::{
    fast_raft_args, fixed_ports, leader_of, restart_args, shape, start_cluster, wait_until, Node,
};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::time::Duration;

/// Starts a node that tries to join with `token`; `Ok(None)` if it exited during
/// start-up (a refused token can end it before it reports ready).
async fn try_join(
    root: &std::path::Path,
    name: &str,
    via: &Node,
    token: &str,
) -> Result<Option<Node>> {
    let mut args = fast_raft_args();
    args.extend([
        "--bootstrap".into(),
        via.tcp_addr(),
        "--join".into(),
        token.into(),
    ]);
    match Node::start(root, name, &args).await {
        Ok(node) => Ok(Some(node)),
        Err(e) if e.to_string().contains("exited during start-up") => Ok(None),
        Err(e) => Err(e),
    }
}

fn log_of(root: &std::path::Path, name: &str) -> String {
    std::fs::read_to_string(root.join(format!("{name}.log"))).unwrap_or_default()
}

/// Starts a node with `token` and expects it to be refused: it exits non-zero
/// and says why.
async fn expect_refused(
    root: &std::path::Path,
    name: &str,
    via: &Node,
    token: &str,
    why: &str,
) -> Result<()> {
    if let Some(mut node) = try_join(root, name, via, token).await? {
        let code = node.wait_exit(Duration::from_secs(20)).await?;
        if code == Some(0) {
            bail!("{name} was not refused");
        }
    }
    let log = log_of(root, name);
    if !log.contains(why) {
        bail!("{name}'s log does not say {why:?}:\n{log}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_admits_exactly_one_of_three_racing_nodes() -> Result<()> {
    let root = tempfile::tempdir()?;
    let a = Node::start(root.path(), "a", &fast_raft_args()).await?;
    wait_until("a to found a cluster", Duration::from_secs(20), || async {
        Ok(a.is_ready().await)
    })
    .await?;
    let token = a.token(600).await?;

    let (r1, r2, r3) = tokio::join!(
        try_join(root.path(), "r1", &a, &token),
        try_join(root.path(), "r2", &a, &token),
        try_join(root.path(), "r3", &a, &token),
    );
    let mut racers: Vec<Node> = [r1?, r2?, r3?].into_iter().flatten().collect();
    wait_until("one racer to get in", Duration::from_secs(20), || async {
        Ok(shape(&a).await?.2 == 2)
    })
    .await?;
    // The other two are refused and stop.
    let refused = |root: &std::path::Path| {
        ["r1", "r2", "r3"]
            .iter()
            .filter(|name| log_of(root, name).contains("join token already used"))
            .count()
    };
    wait_until(
        "two racers to be refused",
        Duration::from_secs(20),
        || async { Ok(refused(root.path()) >= 2) },
    )
    .await?;
    assert_eq!(
        refused(root.path()),
        2,
        "exactly two racers must be refused"
    );
    for node in &mut racers {
        if log_of(root.path(), &node.name).contains("join token already used") {
            let code = node.wait_exit(Duration::from_secs(20)).await?;
            assert_ne!(
                code,
                Some(0),
                "{} exited 0 after a refused token",
                node.name
            );
        }
    }
    assert_eq!(shape(&a).await?.2, 2, "a used token admitted a second node");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn forged_expired_and_foreign_tokens_are_refused() -> Result<()> {
    let root = tempfile::tempdir()?;
    let a = Node::start(root.path(), "a", &fast_raft_args()).await?;
    let other = Node::start(root.path(), "other", &fast_raft_args()).await?;
    for n in [&a, &other] {
        wait_until("a cluster", Duration::from_secs(20), || async {
            Ok(n.is_ready().await)
        })
        .await?;
    }

    // Foreign: issued by another cluster.
    let foreign = other.token(600).await?;
    expect_refused(root.path(), "f", &a, &foreign, "belongs to cluster").await?;

    // Forged: a valid token with one signature byte changed.
    let good = a.token(600).await?;
    let mut forged = good.clone().into_bytes();
    let i = forged.len() - 5;
    forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged)?;
    expect_refused(root.path(), "g", &a, &forged, "signature is invalid").await?;

    // Garbage is refused before anything is sent.
    expect_refused(root.path(), "h", &a, "not-a-token", "malformed join token").await?;

    // Expired: a one-second token, used after its expiry.
    let res = a
        .http()
        .post(a.url("/v1/tokens"))
        .json(&json!({ "ttl_secs": 1 }))
        .send()
        .await?;
    let v: serde_json::Value = res.json().await?;
    let short = v["token"].as_str().context("token")?.to_string();
    let expires_at = v["expires_at"].as_u64().context("expires_at")?;
    wait_until("the token to expire", Duration::from_secs(5), || async {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_secs();
        Ok(now >= expires_at)
    })
    .await?;
    expect_refused(root.path(), "e", &a, &short, "expired").await?;

    // None of them got in, and the good token still works.
    assert_eq!(shape(&a).await?.2, 1);
    let joined = try_join(root.path(), "ok", &a, &good)
        .await?
        .context("good token refused")?;
    wait_until(
        "the good token to admit",
        Duration::from_secs(20),
        || async { Ok(joined.is_ready().await) },
    )
    .await?;
    // A bad request body is a 400, not a crash.
    let res = a
        .http()
        .post(a.url("/v1/tokens"))
        .body("{not json")
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 400);

    // The audit log names each refused join (written within seconds) and the one admitted.
    wait_until(
        "the joins in the audit log",
        Duration::from_secs(20),
        || async {
            let log = a.get_json("/v1/audit").await?;
            let log = log.as_array().cloned().unwrap_or_default();
            let refused = |why: &str| {
                log.iter().any(|e| {
                    e["action"] == "token.refused"
                        && e["outcome"].as_str().is_some_and(|o| o.contains(why))
                })
            };
            let admitted = log.iter().any(|e| {
                e["action"] == "member.join"
                    && e["target"] == joined.info.peer_id.as_str()
                    && e["outcome"] == "ok"
            });
            Ok(refused("belongs to cluster")
                && refused("signature is invalid")
                && refused("expired")
                && admitted)
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kv_writes_from_any_node_survive_the_leader_being_killed() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut nodes = start_cluster(root.path(), "n", 3, &fast_raft_args()).await?;

    // Writes through every node (followers forward to the leader).
    let mut acked = Vec::new();
    for i in 0..30 {
        let node = &nodes[i % 3];
        let (status, body) = node
            .kv_put(&format!("k{i}"), &json!({ "i": i }), None)
            .await?;
        assert_eq!(status, 200, "{body}");
        acked.push((
            format!("k{i}"),
            body["version"].as_u64().context("version")?,
        ));
    }
    // Keys may contain slashes, raw in the path.
    let (status, _) = nodes[2].kv_put("dir/sub/key", &json!([1, 2]), None).await?;
    assert_eq!(status, 200);
    let (status, body) = nodes[0].kv_get("dir/sub/key").await?;
    assert_eq!((status, body["value"].clone()), (200, json!([1, 2])));
    // Compare-and-set on versions.
    let (_, body) = nodes[1].kv_put("cas", &json!(1), Some(0)).await?;
    let v1 = body["version"].as_u64().context("version")?;
    let (status, _) = nodes[2].kv_put("cas", &json!(2), Some(0)).await?;
    assert_eq!(status, 409, "create-only write of an existing key");
    let (status, _) = nodes[2].kv_put("cas", &json!(2), Some(v1 + 100)).await?;
    assert_eq!(status, 409, "stale version accepted");
    let (status, _) = nodes[0].kv_put("cas", &json!(3), Some(v1)).await?;
    assert_eq!(status, 200);

    // Kill the leader with SIGKILL.
    let leader = leader_of(&nodes[0]).await.context("no leader")?;
    let li = nodes
        .iter()
        .position(|n| n.info.peer_id == leader)
        .context("leader not ours")?;
    nodes[li].kill().await?;
    let survivors: Vec<usize> = (0..3).filter(|i| *i != li).collect();
    wait_until("a new leader", Duration::from_secs(15), || async {
        let l = leader_of(&nodes[survivors[0]]).await;
        Ok(l.is_some() && l.as_deref() != Some(leader.as_str()))
    })
    .await?;

    // Every acknowledged write is there, read linearizably through either survivor.
    for (i, (key, version)) in acked.iter().enumerate() {
        let node = &nodes[survivors[i % 2]];
        let (status, body) = node.kv_get(key).await?;
        assert_eq!(status, 200, "{key} lost after the leader died: {body}");
        assert_eq!(body["version"].as_u64(), Some(*version));
        assert_eq!(body["value"]["i"].as_u64(), Some(i as u64));
    }
    let (_, body) = nodes[survivors[0]].kv_get("cas").await?;
    assert_eq!(body["value"], json!(3));
    // The cluster keeps taking writes.
    let (status, _) = nodes[survivors[1]]
        .kv_put("after", &json!("ok"), None)
        .await?;
    assert_eq!(status, 200);

    // The killed node comes back as itself and catches up.
    let name = nodes[li].name.clone();
    let peer = nodes[li].info.peer_id.clone();
    let restarted = Node::start(root.path(), &name, &restart_args(&nodes[li])).await?;
    assert_eq!(restarted.info.peer_id, peer);
    wait_until(
        "the restarted node to catch up",
        Duration::from_secs(30),
        || async {
            let c = restarted.cluster().await?;
            let members = c["members"].as_array().map_or(0, Vec::len);
            let applied = c["last_applied"].as_u64().unwrap_or(0);
            let leader_applied = nodes[survivors[0]].cluster().await?["last_applied"]
                .as_u64()
                .unwrap_or(0);
            Ok(members == 3 && applied >= leader_applied && c["leader"].is_string())
        },
    )
    .await?;
    Ok(())
}

/// A counter from a node's `/metrics`.
async fn metric(node: &Node, name: &str) -> Result<u64> {
    let text = node
        .http()
        .get(node.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("no {name} in /metrics"))
}

/// Raft calls reuse their streams: a follower forwarding a hundred writes one after
/// another to the leader opens a stream or two, not one per write.
#[tokio::test(flavor = "multi_thread")]
async fn raft_calls_reuse_their_streams() -> Result<()> {
    let root = tempfile::tempdir()?;
    let nodes = start_cluster(root.path(), "s", 3, &[]).await?;
    let leader = agentmesh_tests::leader_index(&nodes).await?;
    let follower = &nodes[(leader + 1) % nodes.len()];
    let calls = metric(follower, "agentmesh_raft_calls_total").await?;
    let opened = metric(follower, "agentmesh_raft_streams_opened_total").await?;
    for i in 0..100 {
        let (status, body) = follower.kv_put(&format!("r{i}"), &json!(i), None).await?;
        assert_eq!(status, 200, "{body}");
    }
    let calls = metric(follower, "agentmesh_raft_calls_total").await? - calls;
    let opened = metric(follower, "agentmesh_raft_streams_opened_total").await? - opened;
    assert!(calls >= 100, "{calls} raft calls for 100 forwarded writes");
    assert!(
        opened <= 5,
        "{opened} raft streams opened for {calls} calls: streams are not reused"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_leaving_gracefully_is_removed_and_can_come_back() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut nodes = start_cluster(root.path(), "m", 3, &fast_raft_args()).await?;
    let leader = leader_of(&nodes[0]).await.context("no leader")?;
    // Stop a follower with SIGTERM: it leaves, then exits 0.
    let fi = nodes
        .iter()
        .position(|n| n.info.peer_id != leader)
        .context("no follower")?;
    let code = nodes[fi].stop().await?;
    assert_eq!(code, Some(0));
    let others: Vec<usize> = (0..3).filter(|i| *i != fi).collect();
    let c = nodes[others[0]].cluster().await?;
    let gone = c["members"]
        .as_array()
        .and_then(|m| {
            m.iter()
                .find(|m| m["peer_id"] == nodes[fi].info.peer_id.as_str())
        })
        .cloned()
        .context("left member missing from the registry")?;
    assert_eq!(gone["state"], "left");
    assert_ne!(gone["role"], "voter", "a node that left still votes");
    // Two members remain, so one voter (an even count buys nothing).
    wait_until(
        "the leaver to be out of the membership",
        Duration::from_secs(10),
        || async {
            let c = nodes[others[0]].cluster().await?;
            let role = c["members"]
                .as_array()
                .and_then(|m| {
                    m.iter()
                        .find(|m| m["peer_id"] == nodes[fi].info.peer_id.as_str())
                })
                .map(|m| m["role"].clone());
            Ok(role == Some(json!("none")))
        },
    )
    .await?;
    let (status, _) = nodes[others[1]]
        .kv_put("while-away", &json!(1), None)
        .await?;
    assert_eq!(status, 200);

    // Restarted on its data dir, it rejoins as itself, without a token.
    let name = nodes[fi].name.clone();
    let back = Node::start(root.path(), &name, &restart_args(&nodes[fi])).await?;
    wait_until("three voters again", Duration::from_secs(30), || async {
        let (voters, _, active) = shape(&nodes[others[0]]).await?;
        Ok(voters == 3 && active == 3 && back.is_ready().await)
    })
    .await?;
    let (status, body) = back.kv_get("while-away").await?;
    assert_eq!((status, body["value"].clone()), (200, json!(1)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn rename_changes_the_name_everywhere_and_readyz_needs_a_leader() -> Result<()> {
    let root = tempfile::tempdir()?;
    let nodes = start_cluster(root.path(), "q", 2, &fast_raft_args()).await?;
    let out = nodes[1].cli(&["rename", "renamed-node"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peer = nodes[1].info.peer_id.clone();
    wait_until(
        "the new name on the other node",
        Duration::from_secs(10),
        || async {
            let peers = nodes[0].get_json("/v1/peers").await?;
            Ok(peers
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["peer_id"] == peer.as_str() && p["name"] == "renamed-node"))
        },
    )
    .await?;
    let out = nodes[0].cli(&["rename", "bad name!"])?;
    assert!(!out.status.success());

    // A plain mesh node (bootstrap, no token) is up but not ready: it has no cluster.
    let mut args = fixed_ports()?;
    args.extend(["--bootstrap".into(), nodes[0].tcp_addr()]);
    let outsider = Node::start(root.path(), "outsider", &args).await?;
    wait_until(
        "the outsider to connect",
        Duration::from_secs(10),
        || async { Ok(!outsider.active_peers().await?.is_empty()) },
    )
    .await?;
    assert!(!outsider.is_ready().await, "ready without a cluster");
    let (status, _) = outsider.kv_get("anything").await?;
    assert_eq!(status, 503);
    Ok(())
}

/// Checks that every acknowledged write is readable through `node` with the
/// version it was acknowledged with.
async fn assert_all_present(node: &Node, prefix: &str, acked: &[(String, u64)]) -> Result<()> {
    let listed = node.get_json(&format!("/v1/kv?prefix={prefix}")).await?;
    let found: std::collections::HashMap<String, u64> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| Some((e["key"].as_str()?.to_string(), e["version"].as_u64()?)))
        .collect();
    for (key, version) in acked {
        assert_eq!(
            found.get(key),
            Some(version),
            "acknowledged write {key} lost"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn every_acknowledged_write_survives_kill_9_of_every_node() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut nodes = start_cluster(root.path(), "d", 3, &fast_raft_args()).await?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(w, n)| {
            tokio::spawn(write_until_stopped(
                vec![n.url("")],
                w,
                stop.clone(),
                count.clone(),
            ))
        })
        .collect();
    wait_until(
        "writes to be acknowledged",
        Duration::from_secs(30),
        || async { Ok(count.load(std::sync::atomic::Ordering::Relaxed) >= 150) },
    )
    .await?;
    // Kill every node while the writers are mid-flight.
    for node in &nodes {
        node.signal(nix::sys::signal::Signal::SIGKILL)?;
    }
    for node in &mut nodes {
        node.wait_exit(Duration::from_secs(10)).await?;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await?);
    }

    let mut restarted = Vec::new();
    for node in &nodes {
        restarted.push(Node::start(root.path(), &node.name, &restart_args(node)).await?);
    }
    wait_until(
        "a leader after the restart",
        Duration::from_secs(30),
        || async { Ok(restarted[0].is_ready().await) },
    )
    .await?;
    assert_all_present(&restarted[1], "r", &acked).await?;
    assert!(acked.len() >= 150);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paused_leader_is_replaced_and_follows_when_resumed() -> Result<()> {
    let root = tempfile::tempdir()?;
    let nodes = start_cluster(root.path(), "p", 3, &fast_raft_args()).await?;
    let old = leader_of(&nodes[0]).await.context("no leader")?;
    let li = nodes
        .iter()
        .position(|n| n.info.peer_id == old)
        .context("leader")?;
    let others: Vec<usize> = (0..3).filter(|i| *i != li).collect();
    nodes[li].signal(nix::sys::signal::Signal::SIGSTOP)?;
    wait_until(
        "a new leader while the old one is paused",
        Duration::from_secs(15),
        || async {
            let l = leader_of(&nodes[others[0]]).await;
            Ok(l.is_some() && l.as_deref() != Some(old.as_str()))
        },
    )
    .await?;
    let (status, body) = nodes[others[1]]
        .kv_put("during-pause", &json!(1), None)
        .await?;
    assert_eq!(status, 200, "{body}");
    nodes[li].signal(nix::sys::signal::Signal::SIGCONT)?;
    let new = leader_of(&nodes[others[0]]).await.context("no leader")?;
    wait_until(
        "the resumed node to follow the new leader",
        Duration::from_secs(15),
        || async {
            let c = nodes[li].cluster().await?;
            Ok(c["leader_peer_id"] == new.as_str() && c["role"] == "follower")
        },
    )
    .await?;
    // Reads through the old leader see the write made while it was paused.
    let (status, body) = nodes[li].kv_get("during-pause").await?;
    assert_eq!((status, body["value"].clone()), (200, json!(1)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_down_for_long_catches_up_from_a_snapshot() -> Result<()> {
    let root = tempfile::tempdir()?;
    // Snapshot every 20 entries and keep no log behind it, so a node that misses
    // more than that can only catch up from a snapshot sent over the mesh.
    let config = root.path().join("raft.toml");
    std::fs::write(
        &config,
        "[raft]\nsnapshot_after_entries = 20\nkeep_entries = 0\n",
    )?;
    let mut args = fast_raft_args();
    args.extend(["--config".into(), config.display().to_string()]);
    let mut nodes = start_cluster(root.path(), "s", 3, &args).await?;
    let leader = leader_of(&nodes[0]).await.context("no leader")?;
    let fi = nodes
        .iter()
        .position(|n| n.info.peer_id != leader)
        .context("follower")?;
    let li = nodes
        .iter()
        .position(|n| n.info.peer_id == leader)
        .context("leader")?;
    nodes[fi].kill().await?;
    for i in 0..100 {
        let (status, body) = nodes[li].kv_put(&format!("s{i}"), &json!(i), None).await?;
        assert_eq!(status, 200, "{body}");
    }
    wait_until(
        "the leader to compact its log",
        Duration::from_secs(15),
        || async {
            let c = nodes[li].cluster().await?;
            Ok(c["snapshot_index"].as_u64().unwrap_or(0) >= 80)
        },
    )
    .await?;
    let mut back_args = restart_args(&nodes[fi]);
    back_args.extend(["--config".into(), config.display().to_string()]);
    let back = Node::start(root.path(), &nodes[fi].name, &back_args).await?;
    wait_until(
        "the returning node to install a snapshot",
        Duration::from_secs(30),
        || async {
            let c = back.cluster().await?;
            let leader_applied = nodes[li].cluster().await?["last_applied"]
                .as_u64()
                .unwrap_or(0);
            Ok(c["snapshot_index"].as_u64().unwrap_or(0) >= 80
                && c["last_applied"].as_u64().unwrap_or(0) >= leader_applied)
        },
    )
    .await?;
    // Its own state machine holds what it never saw as log entries.
    let c = back.cluster().await?;
    assert!(c["members"].as_array().map_or(0, Vec::len) == 3, "{c}");
    Ok(())
}

/// One client: `ops` reads and writes on three keys through `base`, recorded
/// with call and return times (µs since `epoch`).
async fn client(
    base: String,
    id: usize,
    ops: usize,
    epoch: std::time::Instant,
    progress: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<agentmesh_tests::linearizability::Op> {
    use agentmesh_tests::linearizability::{Op, OpKind};
    let http = reqwest::Client::new();
    let mut history = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (id as u64 + 1);
    for i in 0..ops {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let key = format!("lin{}", seed % 3);
        let write = seed.is_multiple_of(2);
        let call = epoch.elapsed().as_micros() as u64;
        if write {
            let value = format!("c{id}-{i}");
            let res = http
                .put(format!("{base}/v1/kv/{key}"))
                .json(&json!(value))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            let ret = match &res {
                Ok(r) if r.status().is_success() => Some(epoch.elapsed().as_micros() as u64),
                // Refused before it reached a leader (no connection, no leader, bad
                // request): it did not happen.
                Err(e) if e.is_connect() => {
                    progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                Ok(r) if r.status().as_u16() == 503 || r.status().is_client_error() => {
                    progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                // Timed out or cut off: it may or may not have happened.
                _ => None,
            };
            history.push(Op {
                key,
                call,
                ret,
                kind: OpKind::Write(value),
            });
        } else {
            let res = http
                .get(format!("{base}/v1/kv/{key}"))
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            let read = match res {
                Ok(r) if r.status().as_u16() == 404 => Some(None),
                Ok(r) if r.status().is_success() => r
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|v| v["value"].as_str().map(|s| Some(s.to_string()))),
                _ => None,
            };
            if let Some(value) = read {
                let ret = Some(epoch.elapsed().as_micros() as u64);
                history.push(Op {
                    key,
                    call,
                    ret,
                    kind: OpKind::Read(value),
                });
            }
        }
        progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    history
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_histories_stay_linearizable_through_a_leader_kill() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut nodes = start_cluster(root.path(), "l", 3, &fast_raft_args()).await?;
    let epoch = std::time::Instant::now();
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let clients: Vec<_> = (0..6)
        .map(|c| {
            tokio::spawn(client(
                nodes[c % 3].url(""),
                c,
                120,
                epoch,
                progress.clone(),
            ))
        })
        .collect();
    wait_until(
        "some history before the kill",
        Duration::from_secs(30),
        || async { Ok(progress.load(std::sync::atomic::Ordering::Relaxed) >= 200) },
    )
    .await?;
    let leader = leader_of(&nodes[0]).await.context("no leader")?;
    let li = nodes
        .iter()
        .position(|n| n.info.peer_id == leader)
        .context("leader")?;
    nodes[li].kill().await?;
    let mut history = Vec::new();
    for c in clients {
        history.extend(c.await?);
    }
    let acked = history.iter().filter(|o| o.ret.is_some()).count();
    assert!(acked >= 300, "only {acked} operations completed");
    agentmesh_tests::linearizability::check(&history).map_err(anyhow::Error::msg)?;
    Ok(())
}

/// Writes `r{writer}-{i}` through the nodes in turn until `stop`, skipping
/// nodes that are down; returns the acknowledged (key, version) pairs.
async fn write_until_stopped(
    bases: Vec<String>,
    writer: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    acked: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<(String, u64)> {
    let http = reqwest::Client::new();
    let mut done = Vec::new();
    let mut i = 0usize;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        i += 1;
        let key = format!("r{writer}-{i}");
        let base = &bases[(writer + i) % bases.len()];
        let res = http
            .put(format!("{base}/v1/kv/{key}"))
            .json(&json!(i))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        if let Ok(res) = res {
            if res.status().is_success() {
                if let Ok(body) = res.json::<serde_json::Value>().await {
                    if let Some(v) = body["version"].as_u64() {
                        done.push((key, v));
                        acked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        continue;
                    }
                }
            }
        }
        // A node being restarted: try the next one after a moment.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    done
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_of_five_nodes_under_writes_loses_nothing() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut nodes = start_cluster(root.path(), "v", 5, &fast_raft_args()).await?;
    let bases: Vec<String> = nodes.iter().map(|n| n.url("")).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            tokio::spawn(write_until_stopped(
                bases.clone(),
                w,
                stop.clone(),
                acked.clone(),
            ))
        })
        .collect();
    for i in 0..nodes.len() {
        let before = acked.load(std::sync::atomic::Ordering::Relaxed);
        let code = nodes[i].stop().await?;
        assert_eq!(code, Some(0), "{} did not stop cleanly", nodes[i].name);
        let args = restart_args(&nodes[i]);
        let name = nodes[i].name.clone();
        nodes[i] = Node::start(root.path(), &name, &args).await?;
        let survivor = (i + 1) % nodes.len();
        wait_until("five voters again", Duration::from_secs(30), || async {
            let (voters, _, active) = shape(&nodes[survivor]).await?;
            Ok(voters == 5 && active == 5 && nodes[i].is_ready().await)
        })
        .await?;
        wait_until("writes to continue", Duration::from_secs(10), || async {
            Ok(acked.load(std::sync::atomic::Ordering::Relaxed) > before + 20)
        })
        .await?;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut all = Vec::new();
    for w in writers {
        all.extend(w.await?);
    }
    assert_all_present(&nodes[0], "r", &all).await?;
    assert!(all.len() >= 100, "only {} writes acknowledged", all.len());
    Ok(())
}
