//! Discovery: a chain of bootstrap addresses becomes a full mesh; dead peers stay
//! listed as inactive.

use agentmesh_tests::{start_chain, wait_full_mesh, wait_until};
use anyhow::Result;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn ten_nodes_from_a_chain_of_bootstraps_all_find_each_other() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut nodes = start_chain(root.path(), "n", 10, &[]).await?;
    wait_full_mesh(&nodes, Duration::from_secs(30)).await?;

    // Names travel with identify.
    let peers = nodes[0].get_json("/v1/peers").await?;
    let names: Vec<&str> = peers
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for i in 1..10 {
        assert!(
            names.contains(&format!("n{i}").as_str()),
            "n0 lacks n{i}'s name: {names:?}"
        );
    }

    // A node that dies is shown as inactive, not dropped.
    let dead = nodes[5].info.peer_id.clone();
    nodes[5].kill().await?;
    wait_until(
        "n0 to mark n5 inactive",
        Duration::from_secs(30),
        || async {
            let peers = nodes[0].get_json("/v1/peers").await?;
            Ok(peers
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["peer_id"] == dead.as_str() && p["status"] == "inactive"))
        },
    )
    .await?;
    let status = nodes[0].get_json("/v1/status").await?;
    assert_eq!(status["connected_peers"], 8);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn peers_command_lists_everyone_in_json_and_text() -> Result<()> {
    let root = tempfile::tempdir()?;
    let nodes = start_chain(root.path(), "p", 3, &[]).await?;
    wait_full_mesh(&nodes, Duration::from_secs(20)).await?;
    let out = nodes[2].cli(&["peers", "--json"])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 2);
    for p in list {
        for key in ["peer_id", "name", "addrs", "status", "last_seen", "rtt_ms"] {
            assert!(p.get(key).is_some(), "peer entry lacks {key}: {p}");
        }
    }
    let text = String::from_utf8(nodes[2].cli(&["peers"])?.stdout)?;
    assert!(
        text.contains("p0") && text.contains("p1") && text.contains("2 active"),
        "{text}"
    );
    Ok(())
}
