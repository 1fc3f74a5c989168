//! Restarts: identity and peers survive, nodes reconnect on their own, shutdown is
//! clean, and a damaged identity is refused rather than replaced.

use agentmesh_tests::{cluster_key_args, fixed_ports, wait_members, wait_until, Node};
use anyhow::Result;
use std::time::Duration;

async fn sees_active(node: &Node, peer: &str) -> Result<bool> {
    Ok(node.active_peers().await?.iter().any(|p| p == peer))
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_peer_id_and_reconnects_from_the_peer_store() -> Result<()> {
    let root = tempfile::tempdir()?;
    // a keeps its ports across restarts, as a deployed node does.
    // Both are members of one cluster: a founds it, b joins by the cluster key.
    let key = cluster_key_args(root.path(), "k")?;
    let mut a_args = fixed_ports()?;
    a_args.extend(key.iter().cloned());
    let mut a = Node::start(root.path(), "a", &a_args).await?;
    let mut b_args = key.clone();
    b_args.extend(["--bootstrap".into(), a.tcp_addr()]);
    let mut b = Node::start(root.path(), "b", &b_args).await?;
    wait_members(&[&a, &b], Duration::from_secs(30)).await?;
    let (a_id, b_id) = (a.info.peer_id.clone(), b.info.peer_id.clone());
    wait_until("a to see b", Duration::from_secs(20), || {
        sees_active(&a, &b_id)
    })
    .await?;

    // Graceful stop: exit 0, runtime file removed, b shown inactive.
    assert_eq!(b.stop().await?, Some(0));
    assert!(!b.data_dir.join("node.json").exists());
    wait_until("a to mark b inactive", Duration::from_secs(20), || async {
        Ok(!sees_active(&a, &b_id).await?)
    })
    .await?;

    // b restarts with no --bootstrap: same identity, and it redials a from its store.
    let b = Node::start(root.path(), "b", &key).await?;
    assert_eq!(b.info.peer_id, b_id);
    wait_until("a to see b again", Duration::from_secs(20), || {
        sees_active(&a, &b_id)
    })
    .await?;

    // a dies hard and comes back: b redials it (with backoff) from its store.
    a.kill().await?;
    wait_until("b to mark a inactive", Duration::from_secs(20), || async {
        Ok(!sees_active(&b, &a_id).await?)
    })
    .await?;
    let a = Node::start(root.path(), "a", &a_args).await?;
    assert_eq!(a.info.peer_id, a_id);
    wait_until("a and b reconnected", Duration::from_secs(30), || async {
        Ok(sees_active(&a, &b_id).await? && sees_active(&b, &a_id).await?)
    })
    .await?;
    let peers = b.get_json("/v1/peers").await?;
    assert_eq!(peers[0]["name"], "a", "names persist: {peers}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupted_identity_is_refused_not_replaced() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut a = Node::start(root.path(), "a", &[]).await?;
    assert_eq!(a.stop().await?, Some(0));
    let key = a.data_dir.join("identity.key");
    std::fs::write(&key, b"definitely not a key")?;
    let err = match Node::start(root.path(), "a", &[]).await {
        Ok(_) => anyhow::bail!("a node started on a corrupted identity"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("corrupted"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        std::fs::read(&key)?,
        b"definitely not a key",
        "the key file is left for the operator"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn sigint_also_shuts_down_cleanly() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut a = Node::start(root.path(), "a", &[]).await?;
    a.signal(nix::sys::signal::Signal::SIGINT)?;
    assert_eq!(a.wait_exit(Duration::from_secs(15)).await?, Some(0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn env_twins_and_json_logs() -> Result<()> {
    let root = tempfile::tempdir()?;
    let data = root.path().join("envnode");
    let log = root.path().join("envnode.log");
    let out = std::fs::File::create(&log)?;
    let mut child = std::process::Command::new(agentmesh_tests::binary()?)
        .arg("start")
        .env("AGENTMESH_NAME", "from-env")
        .env("AGENTMESH_DATA_DIR", &data)
        .env(
            "AGENTMESH_LISTEN",
            "/ip4/127.0.0.1/tcp/0,/ip4/127.0.0.1/udp/0/quic-v1",
        )
        .env("AGENTMESH_API", "127.0.0.1:0")
        .env("AGENTMESH_LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()?;
    let runtime = data.join("node.json");
    let result = wait_until(
        "the env-configured node",
        Duration::from_secs(20),
        || async { Ok(runtime.exists()) },
    )
    .await;
    let info: serde_json::Value = match result {
        Ok(()) => serde_json::from_str(&std::fs::read_to_string(&runtime)?)?,
        Err(e) => {
            let _ = child.kill();
            return Err(e.context(std::fs::read_to_string(&log).unwrap_or_default()));
        }
    };
    assert_eq!(info["name"], "from-env");
    assert_eq!(info["listen_addrs"].as_array().map(Vec::len), Some(2));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    assert_eq!(child.wait()?.code(), Some(0));
    let text = std::fs::read_to_string(&log)?;
    assert!(!text.trim().is_empty());
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| anyhow::anyhow!("not JSON: {line}: {e}"))?;
        assert!(
            v.get("level").is_some() && v.get("fields").is_some(),
            "{line}"
        );
    }
    Ok(())
}
