//! Restarts: identity and peers survive, nodes reconnect on their own, shutdown is
//! clean, and a damaged identity is refused rather than replaced.

use agentmesh_tests::{wait_until, Node};
use anyhow::Result;
use std::time::Duration;

/// Listen flags on a TCP and a UDP port that are free now.
fn fixed_ports() -> Result<Vec<String>> {
    let tcp = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    Ok(vec![
        "--listen".into(),
        format!("/ip4/127.0.0.1/tcp/{tcp}"),
        "--listen".into(),
        format!("/ip4/127.0.0.1/udp/{udp}/quic-v1"),
    ])
}

async fn sees_active(node: &Node, peer: &str) -> Result<bool> {
    Ok(node.active_peers().await?.iter().any(|p| p == peer))
}

#[tokio::test(flavor = "multi_thread")]
async fn restart_keeps_peer_id_and_reconnects_from_the_peer_store() -> Result<()> {
    let root = tempfile::tempdir()?;
    // a keeps its ports across restarts, as a deployed node does.
    let a_ports = fixed_ports()?;
    let mut a = Node::start(root.path(), "a", &a_ports).await?;
    let mut b = Node::start(root.path(), "b", &["--bootstrap".into(), a.tcp_addr()]).await?;
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
    let b = Node::start(root.path(), "b", &[]).await?;
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
    let a = Node::start(root.path(), "a", &a_ports).await?;
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
