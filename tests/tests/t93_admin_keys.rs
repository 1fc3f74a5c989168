//! Admin changes behind API keys: with `security.admin_requires_key` on, creating or revoking
//! API keys, issuing join tokens, removing members and changing `security.*` settings need a
//! replicated admin API key, wherever the request enters and whatever a member says. A
//! compromised member can then neither mint itself a key nor let a node in on a token it
//! signed on its own.

use agentmesh_consensus::{hash_api_key, node_id_for, JoinToken, TokenBody};
use agentmesh_tests::raw_raft::RawRaftPeer;
use agentmesh_tests::{
    fast_raft_args, fixed_ports, leader_index, shape, start_cluster, wait_until, Node,
};
use anyhow::{Context, Result};
use reqwest::{Method, StatusCode};
use serde_json::json;
use std::time::Duration;

const SETTING: &str = "/v1/kv/security.admin_requires_key";

/// Starts a node that joins through `via` with `token`.
async fn join_with(root: &std::path::Path, name: &str, via: &Node, token: &str) -> Result<Node> {
    let mut args = fixed_ports()?;
    args.extend(fast_raft_args());
    args.extend([
        "--bootstrap".into(),
        via.tcp_addr(),
        "--join".into(),
        token.into(),
    ]);
    Node::start(root, name, &args).await
}

#[tokio::test(flavor = "multi_thread")]
async fn with_admin_keys_required_no_members_word_makes_an_admin_change() -> Result<()> {
    let root = tempfile::tempdir()?;
    let mut nodes = start_cluster(root.path(), "k", 3, &fast_raft_args()).await?;
    let li = leader_index(&nodes).await?;
    let (rogue, follower) = ((li + 1) % 3, (li + 2) % 3);
    let f = &nodes[follower];

    // Keys made while members are trusted: a keyless loopback caller is an admin.
    let (admin_id, admin) = f.create_api_key("admin")?;
    let (_, operator) = f.create_api_key("operator")?;

    // Turning it on takes an admin API key: not a keyless call, not an operator key, not an
    // operator key behind an encoded path.
    let (status, body, _) = f
        .call(None, Method::PUT, SETTING, Some(json!(true)))
        .await?;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body, _) = f
        .call(Some(&operator), Method::PUT, SETTING, Some(json!(true)))
        .await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let encoded = "/v1/kv/%73ecurity.admin_requires_key";
    let (status, body, _) = f
        .call(Some(&operator), Method::PUT, encoded, Some(json!(true)))
        .await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let (status, body, _) = f
        .call(Some(&admin), Method::PUT, SETTING, Some(json!(true)))
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");

    // From then on the node's own word is not enough, on any node: each node's API says so
    // itself once it has applied the setting (until then the leader refuses).
    for n in &nodes {
        wait_until(
            "the setting to reach every node",
            Duration::from_secs(20),
            || async {
                let body = Some(json!({"role": "viewer"}));
                let (status, v, _) = n.call(None, Method::POST, "/v1/apikeys", body).await?;
                assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
                Ok(v.to_string().contains("this node's own key"))
            },
        )
        .await?;
    }
    let (status, body, _) = f.call(None, Method::POST, "/v1/tokens", None).await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(
        body.to_string().contains("admin_requires_key"),
        "the refusal says why: {body}"
    );
    // The admin key does it, and the record names the key.
    let (status, body, _) = f
        .call(
            Some(&admin),
            Method::POST,
            "/v1/apikeys",
            Some(json!({"role": "viewer", "name": "v"})),
        )
        .await?;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["created_by"], format!("apikey:{admin_id}"), "{body}");
    // The last admin key cannot be revoked: no one could make admin changes after it.
    let path = format!("/v1/apikeys/{admin_id}");
    let (status, body, _) = f.call(Some(&admin), Method::DELETE, &path, None).await?;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body.to_string().contains("last admin"), "{body}");
    let (status, body, _) = f
        .call(Some(&admin), Method::POST, "/v1/tokens", None)
        .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let registered = body["token"].as_str().context("no token")?.to_string();

    // A compromised member: its node stops, and a hand-made peer with its identity asks the
    // leader for an admin key of its own, with no key and then with the operator's.
    let cluster_id = nodes[follower].cluster().await?["cluster_id"]
        .as_str()
        .context("no cluster id")?
        .to_string();
    nodes[rogue].kill().await?;
    let rogue_peer_id = nodes[rogue].info.peer_id.clone();
    let identity = std::fs::read(nodes[rogue].data_dir.join("identity.key"))?;
    let keypair = libp2p::identity::Keypair::from_protobuf_encoding(&identity)?;
    let secret: [u8; 32] = keypair
        .clone()
        .try_into_ed25519()?
        .secret()
        .as_ref()
        .try_into()?;
    let mut rogue_peer = RawRaftPeer::new(Some(keypair))?;
    let mine = hash_api_key("amk_0123456789ab.mine");
    for (credential, why) in [
        (None, "no key came with it"),
        (Some(operator.as_str()), "is operator"),
    ] {
        let frame = agentmesh_consensus::hostile_forwarded_admin_key(
            mine,
            "local",
            &rogue_peer_id,
            credential,
        );
        let answer = rogue_peer
            .call_leader(&nodes, &nodes[follower], frame)
            .await?;
        let error = agentmesh_consensus::client_error(&answer)
            .context("the leader took a member's word for an admin key")?;
        assert!(error.contains(why), "{error}");
    }
    let (_, keys, _) = nodes[follower]
        .call(Some(&admin), Method::GET, "/v1/apikeys", None)
        .await?;
    assert!(
        !keys.to_string().contains("0123456789ab"),
        "the member's key exists: {keys}"
    );

    // A token the member signed on its own does not admit; the admin's does.
    let forged = JoinToken::issue(
        &ed25519_dalek::SigningKey::from_bytes(&secret),
        TokenBody {
            cluster_id,
            issuer: node_id_for(&rogue_peer_id),
            expires_at: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs()
                + 600,
            nonce: vec![7; 16],
        },
    );
    let reason = match join_with(root.path(), "k3", &nodes[follower], &forged).await {
        Err(e) => format!("{e:#}"),
        Ok(mut node) => {
            let code = node.wait_exit(Duration::from_secs(30)).await?;
            assert_ne!(code, Some(0), "{}", node.log_tail());
            node.log_tail()
        }
    };
    assert!(
        reason.contains("not issued with an admin API key"),
        "{reason}"
    );
    let joined = join_with(root.path(), "k4", &nodes[follower], &registered).await?;
    wait_until(
        "the admitted node to be a member",
        Duration::from_secs(30),
        || async { Ok(shape(&joined).await?.2 == 4) },
    )
    .await?;
    Ok(())
}
