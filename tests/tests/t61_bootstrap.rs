//! Founding by cluster key on real nodes: `--cluster-key-file` + `--bootstrap-expect N`
//! found exactly one cluster whatever order the nodes start in; later key holders join
//! without a token; a node with another key is never admitted and says why.

use agentmesh_tests::{fast_raft_args, fixed_ports, shape, wait_settled, wait_until, Node};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn key_file(root: &Path, name: &str, secret: &str) -> Result<PathBuf> {
    let path = root.join(name);
    std::fs::write(&path, secret)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(path)
}

/// Listen arguments for `n` nodes, on ports chosen before any starts, so each node can be
/// given the others' addresses (without peer ids, as in a compose file).
fn planned_ports(n: usize) -> Result<Vec<Vec<String>>> {
    (0..n).map(|_| fixed_ports()).collect()
}

fn tcp_of(listen: &[String]) -> String {
    listen
        .iter()
        .find(|a| a.contains("/tcp/"))
        .cloned()
        .unwrap_or_default()
}

fn key_args(key: &Path, expect: Option<usize>, bootstrap: &[String]) -> Vec<String> {
    let mut args = fast_raft_args();
    args.extend(["--cluster-key-file".into(), key.display().to_string()]);
    if let Some(n) = expect {
        args.extend(["--bootstrap-expect".into(), n.to_string()]);
    }
    for b in bootstrap {
        args.extend(["--bootstrap".into(), b.clone()]);
    }
    args
}

/// Waits until every node is ready and sees `voters` voters, every node as an active member
/// and a settled membership (`wait_settled`), then checks they all report one cluster id.
/// (Nodes of two clusters could never all see every node as a member.)
async fn wait_one_cluster(nodes: &[Node], voters: usize) -> Result<String> {
    wait_settled(nodes, voters).await?;
    let mut ids = BTreeSet::new();
    for node in nodes {
        let c = node.cluster().await?;
        ids.insert(c["cluster_id"].as_str().unwrap_or_default().to_string());
    }
    if ids.len() != 1 || ids.contains("") {
        bail!("not exactly one cluster: {ids:?}");
    }
    Ok(ids.into_iter().next().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread")]
async fn key_holders_started_in_any_order_found_exactly_one_cluster() -> Result<()> {
    let root = tempfile::tempdir()?;
    let key = key_file(
        root.path(),
        "cluster.key",
        "a shared secret of enough length\n",
    )?;
    let ports = planned_ports(5)?;
    let all: Vec<String> = ports.iter().map(|p| tcp_of(p)).collect();
    // Five nodes expecting three: whichever three see each other first cannot found a
    // second cluster with the other two. Started out of order, each told every address.
    let mut nodes = Vec::new();
    for i in [3usize, 0, 4, 1, 2] {
        let others: Vec<String> = all.iter().filter(|a| **a != all[i]).cloned().collect();
        let mut args = ports[i].clone();
        args.extend(key_args(&key, Some(3), &others));
        nodes.push(Node::start(root.path(), &format!("k{i}"), &args).await?);
    }
    let cluster_id = wait_one_cluster(&nodes, 5).await?;

    // A key-founded cluster serves writes like any other.
    let (status, body) = nodes[4].kv_put("founded", &json!("by key"), None).await?;
    assert_eq!(status, 200, "{body}");

    // Restarted on its data dir, a founder comes back to the same cluster; it never founds
    // again even though it still holds the key and --bootstrap-expect.
    let name = nodes[0].name.clone();
    nodes[0].kill().await?;
    let mut args = ports[3].clone();
    let others: Vec<String> = all.iter().filter(|a| **a != all[3]).cloned().collect();
    args.extend(key_args(&key, Some(3), &others));
    nodes[0] = Node::start(root.path(), &name, &args).await?;
    assert_eq!(wait_one_cluster(&nodes, 5).await?, cluster_id);
    let (status, body) = nodes[0].kv_get("founded").await?;
    assert_eq!((status, body["value"].clone()), (200, json!("by key")));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn later_key_holders_join_without_a_token_and_other_keys_are_never_admitted() -> Result<()> {
    let root = tempfile::tempdir()?;
    let key = key_file(
        root.path(),
        "cluster.key",
        "a shared secret of enough length",
    )?;
    let ports = planned_ports(3)?;
    let all: Vec<String> = ports.iter().map(|p| tcp_of(p)).collect();
    let mut nodes = Vec::new();
    for (i, listen) in ports.iter().enumerate() {
        let others: Vec<String> = all.iter().filter(|a| **a != all[i]).cloned().collect();
        let mut args = listen.clone();
        args.extend(key_args(&key, Some(3), &others));
        nodes.push(Node::start(root.path(), &format!("f{i}"), &args).await?);
    }
    let cluster_id = wait_one_cluster(&nodes, 3).await?;

    // Same key, no --bootstrap-expect: joins the existing cluster through any member.
    let mut args = fixed_ports()?;
    args.extend(key_args(&key, None, &[all[2].clone()]));
    nodes.push(Node::start(root.path(), "late", &args).await?);
    assert_eq!(wait_one_cluster(&nodes, 3).await?, cluster_id);

    // Another key: the members do not prove that key, so the node never joins; it says why.
    let wrong = key_file(root.path(), "wrong.key", "some other secret entirely")?;
    let mut args = fixed_ports()?;
    args.extend(key_args(&wrong, None, &[all[0].clone()]));
    let outsider = Node::start(root.path(), "outsider", &args).await?;
    wait_until(
        "the outsider to say the key does not match",
        Duration::from_secs(30),
        || async {
            let log = std::fs::read_to_string(root.path().join("outsider.log"))?;
            Ok(log.contains("none proves our cluster key"))
        },
    )
    .await?;
    assert!(!outsider.is_ready().await);
    let (_, _, active) = shape(&nodes[0]).await?;
    assert_eq!(active, 4, "the outsider must not be a member");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_cluster_key_settings_are_clear_errors() -> Result<()> {
    let root = tempfile::tempdir()?;
    let short = key_file(root.path(), "short.key", "tiny")?;
    let cases: [(Vec<String>, &str); 3] = [
        (
            vec!["--bootstrap-expect".into(), "3".into()],
            "--bootstrap-expect needs --cluster-key-file",
        ),
        (
            vec![
                "--cluster-key-file".into(),
                short.display().to_string(),
                "--bootstrap-expect".into(),
                "3".into(),
            ],
            "at least 16",
        ),
        (
            vec![
                "--cluster-key-file".into(),
                short.display().to_string(),
                "--bootstrap-expect".into(),
                "0".into(),
            ],
            "bootstrap-expect",
        ),
    ];
    for (i, (extra, why)) in cases.iter().enumerate() {
        let dir = root.path().join(format!("n{i}"));
        let out = std::process::Command::new(agentmesh_tests::binary()?)
            .args(["start", "--api", "127.0.0.1:0", "--data-dir"])
            .arg(&dir)
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(extra)
            .output()
            .context("running agentmesh")?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "case {i} started");
        assert!(stderr.contains(why), "case {i}: {stderr}");
    }
    Ok(())
}
