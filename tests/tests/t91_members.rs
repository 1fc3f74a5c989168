//! Members only: a node in a cluster serves gossip, blobs and Raft to the cluster's members
//! and to no one else. A stranger connected to the mesh cannot fetch a blob or get a message
//! to a subscriber; a member an admin removes is cut off at once and needs a new token to
//! come back.

use agentmesh_protocols::{identity::NodeSigner, Envelope};
use agentmesh_tests::events::{next_gossip, subscribe_ws, wait_subscribers};
use agentmesh_tests::raw_gossip::RawGossipPeer;
use agentmesh_tests::raw_raft::RawRaftPeer;
use agentmesh_tests::{
    fast_raft_args, fixed_ports, leader_index, leader_of, ok_stdout, pseudo_random, restart_args,
    shape, start_cluster, wait_members, wait_until, write_file, Node,
};
use anyhow::{Context, Result};
use serde_json::Value;
use std::time::Duration;

/// Publishes `text` on `topic` through `node`'s API; whether the node accepted it.
async fn publish(node: &Node, topic: &str, text: &str) -> Result<bool> {
    let res = node
        .http()
        .post(node.url(&format!("/v1/topics/{topic}/messages")))
        .body(text.to_string())
        .send()
        .await?;
    Ok(res.status().is_success())
}

/// A metric's value in `node`'s `/metrics`.
async fn metric(node: &Node, name: &str) -> Result<f64> {
    let text = node
        .http()
        .get(node.url("/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0))
}

/// `blob get` of `hash` on `node`: its exit status and output.
fn blob_get(node: &Node, hash: &str, out: &std::path::Path) -> Result<(bool, String)> {
    let o = node.cli(&["blob", "get", hash, out.to_str().context("path")?])?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    Ok((o.status.success(), text))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stranger_gets_no_blob_and_no_gossip_through() -> Result<()> {
    let root = tempfile::tempdir()?;
    let nodes = start_cluster(root.path(), "m", 3, &fast_raft_args()).await?;
    // A plain mesh node: connected to a member, but not in the cluster.
    let mut args = fixed_ports()?;
    args.extend(["--bootstrap".into(), nodes[0].tcp_addr()]);
    let stranger = Node::start(root.path(), "stranger", &args).await?;
    let member0 = nodes[0].info.peer_id.clone();
    wait_until(
        "the stranger to connect",
        Duration::from_secs(20),
        || async { Ok(stranger.active_peers().await?.contains(&member0)) },
    )
    .await?;

    // Blobs: the stranger finds the provider in the DHT but is refused the manifest.
    let data = pseudo_random(3 << 20, 91);
    let file = write_file(root.path(), "private.bin", &data)?;
    let hash = ok_stdout(&nodes[0].cli(&["blob", "put", file.to_str().context("path")?])?)?
        .trim()
        .to_string();
    let (ok, text) = blob_get(&stranger, &hash, &root.path().join("stolen.bin"))?;
    assert!(!ok, "a stranger fetched a member's blob: {text}");
    assert!(text.contains("not a member"), "{text}");
    assert!(!root.path().join("stolen.bin").exists());
    assert!(metric(&nodes[0], "agentmesh_non_member_refusals_total").await? >= 1.0);
    // A member fetches the same blob.
    let (ok, text) = blob_get(&nodes[2], &hash, &root.path().join("shared.bin"))?;
    assert!(ok, "{text}");

    // Gossip: the stranger's message reaches no member; a member's reaches members only.
    let mut member_ws = subscribe_ws(&nodes[1], "news").await?;
    let stranger_ws = subscribe_ws(&stranger, "news").await?;
    wait_subscribers(&nodes[0], "news", 1).await?;
    // The stranger may or may not believe someone listens; either way nothing arrives.
    let _ = publish(&stranger, "news", "from the stranger").await?;
    assert!(publish(&nodes[0], "news", "from a member").await?);
    assert!(publish(&nodes[2], "news", "from another member").await?);
    let mut got = Vec::new();
    while got.len() < 2 {
        let m = next_gossip(&mut member_ws).await?;
        got.push(m["data"].as_str().unwrap_or_default().to_string());
    }
    got.sort();
    assert_eq!(got, ["from a member", "from another member"]);
    // Both member messages reached nodes[1] directly from their publishers; flood publishing
    // skips the stranger (graylisted), so it has received no gossip at all.
    assert_eq!(
        metric(&stranger, "agentmesh_gossip_received_total").await?,
        0.0
    );
    drop(stranger_ws);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_member_is_cut_off_and_needs_a_new_token() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut nodes = start_cluster(root.path(), "r", 4, &fast_raft_args()).await?;
    let gone = nodes[3].info.peer_id.clone();
    let data = pseudo_random(2 << 20, 92);
    let file = write_file(root.path(), "weights.bin", &data)?;
    let hash = ok_stdout(&nodes[0].cli(&["blob", "put", file.to_str().context("path")?])?)?
        .trim()
        .to_string();
    let mut member_ws = subscribe_ws(&nodes[1], "news").await?;
    wait_subscribers(&nodes[3], "news", 1).await?;

    // A node is not removed through itself.
    let own = nodes[3].cli(&["remove", &gone])?;
    assert!(!own.status.success());
    assert!(
        String::from_utf8_lossy(&own.stderr).contains("another member"),
        "{own:?}"
    );
    // An admin (the keyless loopback caller here) removes the fourth node.
    let out: Value =
        serde_json::from_str(&ok_stdout(&nodes[0].cli(&["remove", &gone, "--json"])?)?)?;
    assert_eq!(out["peer_id"], gone.as_str(), "{out}");
    assert_eq!(out["state"], "removed", "{out}");
    // A second removal is a clear error, not a silent success.
    let again = nodes[0].cli(&["remove", &gone])?;
    assert!(!again.status.success());

    // The removal is in the audit log, and every remaining member serves three.
    let audit = nodes[1].get_json("/v1/audit").await?;
    let entries = audit.as_array().context("audit entries")?;
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "member.remove" && e["target"] == gone.as_str()),
        "{audit}"
    );
    wait_members(&nodes[..3], Duration::from_secs(20)).await?;
    wait_until(
        "the removed node to leave the Raft membership",
        Duration::from_secs(30),
        || async {
            let (voters, learners, _) = shape(&nodes[0]).await?;
            Ok(voters + learners == 3)
        },
    )
    .await?;

    // Cut off: no blob, and its gossip reaches no one.
    let (ok, text) = blob_get(&nodes[3], &hash, &root.path().join("after.bin"))?;
    assert!(!ok, "a removed member fetched a blob: {text}");
    let _ = publish(&nodes[3], "news", "from the removed node").await?;
    assert!(publish(&nodes[2], "news", "from a member").await?);
    let m = next_gossip(&mut member_ws).await?;
    assert_eq!(m["data"], "from a member", "{m}");
    assert_eq!(m["from"], nodes[2].info.peer_id.as_str());

    // Restarted, it cannot come back as itself: it stops and says why.
    wait_until(
        "the removed node to learn of its removal",
        Duration::from_secs(20),
        || async {
            let c = nodes[3].cluster().await?;
            Ok(c["members"].as_array().is_some_and(|m| {
                m.iter()
                    .any(|m| m["peer_id"] == gone.as_str() && m["state"] == "removed")
            }))
        },
    )
    .await?;
    let mut removed = nodes.pop().context("node")?;
    removed.kill().await?;
    drop(removed);
    let reason = match Node::start(root.path(), "r3", &fixed_ports()?).await {
        Err(e) => e.to_string(),
        Ok(mut node) => {
            let code = node.wait_exit(Duration::from_secs(30)).await?;
            assert_ne!(code, Some(0), "{}", node.log_tail());
            node.log_tail()
        }
    };
    assert!(reason.contains("removed"), "{reason}");

    // With a new token from an admin it rejoins.
    let token = nodes[0].token(600).await?;
    let mut args = fixed_ports()?;
    args.extend([
        "--bootstrap".into(),
        nodes[0].tcp_addr(),
        "--join".into(),
        token,
    ]);
    args.extend(fast_raft_args());
    nodes.push(Node::start(root.path(), "r3", &args).await?);
    wait_members(&nodes, Duration::from_secs(30)).await?;
    let (ok, text) = blob_get(&nodes[3], &hash, &root.path().join("back.bin"))?;
    assert!(ok, "{text}");
    Ok(())
}

/// A compromised member cannot make the leader change another member's own record: it
/// forwards "this node leaves" in a third member's name, from its own (real, member)
/// identity, and the leader refuses it; the third member stays active.
#[tokio::test(flavor = "multi_thread")]
async fn a_member_cannot_forward_a_change_to_another_members_record() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut nodes = start_cluster(root.path(), "f", 3, &fast_raft_args()).await?;
    wait_members(&nodes, Duration::from_secs(30)).await?;
    let leader = leader_index(&nodes).await?;
    let (rogue, target) = ((leader + 1) % 3, (leader + 2) % 3);
    let target_peer = nodes[target].info.peer_id.clone();
    let target_id = agentmesh_consensus::node_id_for(&target_peer);

    // The rogue member's node stops; its identity, a member's, is used by a hand-made peer.
    nodes[rogue].kill().await?;
    let key = std::fs::read(nodes[rogue].data_dir.join("identity.key"))?;
    let keypair = libp2p::identity::Keypair::from_protobuf_encoding(&key)?;
    let mut rogue_peer = RawRaftPeer::new(Some(keypair))?;
    // Asked of whichever node leads now (the kill may have moved the lead).
    let answer = rogue_peer
        .call_leader(
            &nodes,
            &nodes[target],
            agentmesh_consensus::hostile_forwarded_leave(target_id),
        )
        .await?;
    let error =
        agentmesh_consensus::client_error(&answer).context("the forged leave was not refused")?;
    assert!(error.contains("only for itself"), "{error}");
    let c = nodes[target].cluster().await?;
    let state = c["members"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["peer_id"] == target_peer.as_str())
        .map(|m| m["state"].clone());
    assert_eq!(state, Some(Value::from("active")), "{c}");
    Ok(())
}

/// A member can gossip as itself, but not forge: a hand-made peer with a member's identity
/// publishes, in this order on one connection, a message of its own, one with its payload
/// altered after signing, one replayed from another topic, and another of its own. The
/// member it reaches delivers the first and the last and refuses the two in the middle, so
/// another member hears exactly the two genuine messages. (Two refusals cost the peer
/// −40 of gossipsub score, short of the −80 graylist: a third would silence it.)
#[tokio::test(flavor = "multi_thread")]
async fn a_member_cannot_forge_or_replay_gossip() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut nodes = start_cluster(root.path(), "g", 3, &fast_raft_args()).await?;
    wait_members(&nodes, Duration::from_secs(30)).await?;
    // nodes[2] stops; its identity, a member's, is used by a hand-made gossip peer.
    nodes[2].kill().await?;
    let key = std::fs::read(nodes[2].data_dir.join("identity.key"))?;
    let keypair = libp2p::identity::Keypair::from_protobuf_encoding(&key)?;
    let signer = NodeSigner::from_keypair(&keypair)?;
    let rogue_id = keypair.public().to_peer_id().to_string();
    let envelope = |topic: &str, text: &str| {
        Envelope::publish(&signer, topic.into(), 1, text.as_bytes().to_vec()).encode()
    };

    let mut listener = subscribe_ws(&nodes[1], "news").await?;
    let mut entry = subscribe_ws(&nodes[0], "news").await?;
    wait_subscribers(&nodes[0], "news", 1).await?;
    let rogue = RawGossipPeer::new(keypair)?;
    rogue
        .join(
            nodes[0].info.peer_id.parse()?,
            nodes[0].tcp_addr().parse()?,
            "news",
        )
        .await?;
    let rejected = metric(&nodes[0], "agentmesh_gossip_rejected_total").await?;

    rogue.publish("news", envelope("news", "first")?).await?;
    let mut forged = envelope("news", "pay 10")?;
    let at = forged
        .windows(6)
        .position(|w| w == b"pay 10")
        .context("payload in the encoding")?;
    forged[at + 4] = b'9';
    rogue.publish("news", forged).await?;
    rogue
        .publish("news", envelope("alerts", "replayed")?)
        .await?;
    rogue.publish("news", envelope("news", "second")?).await?;

    // The member it reached delivers what it accepts in the order it came: the genuine two.
    for want in ["first", "second"] {
        let m = next_gossip(&mut entry).await?;
        assert_eq!(m["data"], want, "{m}");
        assert_eq!(m["from"], rogue_id.as_str(), "{m}");
    }
    // The other member hears the same two (in either order, should one come by IWANT).
    let mut heard = Vec::new();
    for _ in 0..2 {
        let m = next_gossip(&mut listener).await?;
        assert_eq!(m["from"], rogue_id.as_str(), "{m}");
        heard.push(m["data"].as_str().unwrap_or_default().to_string());
    }
    heard.sort();
    assert_eq!(heard, ["first", "second"]);
    // Refused where they entered, by the envelope check, not lost on the way.
    let refused = metric(&nodes[0], "agentmesh_gossip_rejected_total").await? - rejected;
    assert!(refused >= 2.0, "{refused} refused");
    Ok(())
}

/// A member that was down while a new node joined and became leader does not know that
/// leader, so on restart it asks the members it knows, which vouch for it; it then takes the
/// leader's entries and catches up. Without the asking it would refuse the leader's Raft
/// messages for good: no entry that would tell it of the new member can reach it.
#[tokio::test(flavor = "multi_thread")]
async fn a_member_that_was_down_is_vouched_for_a_leader_it_never_saw() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut nodes = start_cluster(root.path(), "v", 3, &fast_raft_args()).await?;
    let leader = leader_of(&nodes[0]).await.context("no leader")?;
    let behind = nodes
        .iter()
        .position(|n| n.info.peer_id != leader)
        .context("no follower")?;
    let behind_args = restart_args(&nodes[behind]);
    let behind_name = nodes[behind].name.clone();
    nodes[behind].kill().await?;
    let up: Vec<usize> = (0..3).filter(|i| *i != behind).collect();

    // A fourth node joins while it is down and takes its vote.
    let token = nodes[up[0]].token(600).await?;
    let mut args = fixed_ports()?;
    args.extend([
        "--bootstrap".into(),
        nodes[up[0]].tcp_addr(),
        "--join".into(),
        token,
    ]);
    args.extend(fast_raft_args());
    let newcomer = Node::start(root.path(), "v3", &args).await?;
    let newcomer_id = agentmesh_consensus::node_id_for(&newcomer.info.peer_id);
    let newcomer_hex = format!("{newcomer_id:016x}");
    wait_until(
        "the newcomer to replace the stopped voter",
        Duration::from_secs(30),
        || async {
            let c = nodes[up[0]].cluster().await?;
            let voters = c["voters"].as_array().cloned().unwrap_or_default();
            Ok(voters.iter().any(|v| v == newcomer_hex.as_str())
                && c["membership_changing"] == false)
        },
    )
    .await?;
    nodes.push(newcomer);
    let newcomer = nodes.len() - 1;

    // The lead moves until the newcomer has it: the leader is killed and restarted. A
    // restarted leader resumes as leader of its old term until the others tell it of the
    // newer one, and the returning member must not hear from it then (it would get the
    // newcomer's join from it and need no one to vouch), so each step waits until every
    // running member names the same leader.
    let running: Vec<usize> = up.iter().copied().chain([newcomer]).collect();
    let mut led = false;
    for _ in 0..12 {
        wait_until(
            "one leader all agree on",
            Duration::from_secs(20),
            || async { Ok(agreed_leader(&nodes, &running).await.is_some()) },
        )
        .await?;
        let current = agreed_leader(&nodes, &running).await.context("no leader")?;
        if current == nodes[newcomer].info.peer_id {
            led = true;
            break;
        }
        let at = up
            .iter()
            .copied()
            .find(|i| nodes[*i].info.peer_id == current)
            .context("the leader is not a running member")?;
        let again = restart_args(&nodes[at]);
        let name = nodes[at].name.clone();
        nodes[at].kill().await?;
        let others: Vec<usize> = running.iter().copied().filter(|i| *i != at).collect();
        wait_until("another leader", Duration::from_secs(20), || async {
            Ok(agreed_leader(&nodes, &others)
                .await
                .is_some_and(|l| l != current))
        })
        .await?;
        nodes[at] = Node::start(root.path(), &name, &again).await?;
    }
    assert!(led, "the newcomer never took the lead");

    // The member that was down comes back: it knew nothing of the newcomer, yet follows it.
    let log_before = std::fs::metadata(&nodes[behind].log)?.len() as usize;
    nodes[behind] = Node::start(root.path(), &behind_name, &behind_args).await?;
    let leader_peer = nodes[newcomer].info.peer_id.clone();
    wait_until(
        "the returning member to follow the newcomer and catch up",
        Duration::from_secs(30),
        || async {
            let c = nodes[behind].cluster().await?;
            let at_leader = nodes[newcomer].cluster().await?["last_applied"]
                .as_u64()
                .unwrap_or(0);
            let knows = c["members"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m["peer_id"] == leader_peer.as_str()));
            Ok(c["leader_peer_id"] == leader_peer.as_str()
                && knows
                && c["last_applied"].as_u64().unwrap_or(0) >= at_leader)
        },
    )
    .await?;
    let log = std::fs::read(&nodes[behind].log)?;
    let since_restart = String::from_utf8_lossy(&log[log_before.min(log.len())..]);
    assert!(
        since_restart.contains("a member vouched for a peer"),
        "{since_restart}"
    );
    Ok(())
}

/// The leader every node in `which` names, if they all name the same one.
async fn agreed_leader(nodes: &[Node], which: &[usize]) -> Option<String> {
    let mut agreed: Option<String> = None;
    for i in which {
        let leader = leader_of(&nodes[*i]).await?;
        if agreed.as_ref().is_some_and(|a| *a != leader) {
            return None;
        }
        agreed = Some(leader);
    }
    agreed
}
