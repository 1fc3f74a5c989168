//! API access on real node processes: API keys with roles, replicated so any node accepts
//! them; 401 without a valid key, 403 for the wrong role; revocation; per-key rate limits;
//! and the audit log recording each of these.

use agentmesh_tests::{
    fast_raft_args, fixed_ports, ok_stdout, wait_settled, wait_until, write_file, Launch, Node,
};
use anyhow::{anyhow, bail, Result};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Duration;

const ADMIN_KEY: &str = "t90-admin-key-5f0c2a9b7e3d4c1a";

/// One request to `node` presenting `key` (or none): status, JSON body and headers.
async fn call(
    node: &Node,
    key: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value, reqwest::header::HeaderMap)> {
    node.call(key, method, path, body).await
}

async fn status_of(
    node: &Node,
    key: Option<&str>,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<StatusCode> {
    Ok(call(node, key, method, path, body).await?.0)
}

/// Starts a node that requires API keys (`--api-key-file`), joining through `via` if given.
async fn start(root: &Path, name: &str, via: Option<&Node>, rate: u32) -> Result<Node> {
    let key_file = write_file(root, "admin.key", ADMIN_KEY.as_bytes())?;
    let mut args = fixed_ports()?;
    args.extend(fast_raft_args());
    args.extend([
        "--api-key-file".into(),
        key_file.display().to_string(),
        "--api-rate-limit".into(),
        rate.to_string(),
    ]);
    if let Some(via) = via {
        let (status, v, _) = call(via, Some(ADMIN_KEY), Method::POST, "/v1/tokens", None).await?;
        if status != StatusCode::OK {
            bail!("token: {status} {v}");
        }
        let token = v["token"].as_str().ok_or_else(|| anyhow!("no token"))?;
        args.extend([
            "--bootstrap".into(),
            via.tcp_addr(),
            "--join".into(),
            token.into(),
        ]);
    }
    let launch = Launch {
        api_key: Some(ADMIN_KEY.into()),
        ..Launch::default()
    };
    Node::start_with(root, name, &args, &launch).await
}

/// The whole audit log, read through `node` with the admin key.
async fn audit(node: &Node) -> Result<Vec<Value>> {
    let (status, v, _) = call(node, Some(ADMIN_KEY), Method::GET, "/v1/audit", None).await?;
    if status != StatusCode::OK {
        bail!("GET /v1/audit: {status} {v}");
    }
    Ok(v.as_array().cloned().unwrap_or_default())
}

fn has(log: &[Value], action: &str, pred: impl Fn(&Value) -> bool) -> bool {
    log.iter().any(|e| e["action"] == action && pred(e))
}

/// What one request should get with the viewer key and with the operator key.
struct Check {
    method: Method,
    path: &'static str,
    body: Option<Value>,
    viewer: StatusCode,
    operator: StatusCode,
}

fn check(
    method: Method,
    path: &'static str,
    body: Option<Value>,
    viewer: StatusCode,
    operator: StatusCode,
) -> Check {
    Check {
        method,
        path,
        body,
        viewer,
        operator,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_roles_revocation_rate_limits_and_the_audit_log() -> Result<()> {
    let root = tempfile::tempdir()?;
    let a = start(root.path(), "a", None, 1000).await?;
    wait_until("a to lead", Duration::from_secs(20), || async {
        Ok(a.is_ready().await)
    })
    .await?;
    let b = start(root.path(), "b", Some(&a), 1000).await?;
    let nodes = [a, b];
    wait_settled(&nodes, 1).await?;
    let [a, b] = &nodes;

    // No key, a malformed key, an unknown key: 401 under /v1, with the challenge header.
    let (status, _, headers) = call(a, None, Method::GET, "/v1/status", None).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(headers["www-authenticate"], "Bearer");
    let unknown = "amk_0123456789ab.AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    for bad in ["nonsense", unknown] {
        let s = status_of(b, Some(bad), Method::GET, "/v1/kv", None).await?;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{bad}");
    }
    // Probes stay open.
    let s = status_of(a, None, Method::GET, "/healthz", None).await?;
    assert_eq!(s, StatusCode::OK);

    // Keys are made on a and accepted on b.
    let (viewer_id, viewer) = a.create_api_key("viewer")?;
    let (operator_id, operator) = a.create_api_key("operator")?;
    wait_until(
        "b to accept the new keys",
        Duration::from_secs(10),
        || async {
            let v = status_of(b, Some(&viewer), Method::GET, "/v1/status", None).await?;
            let o = status_of(b, Some(&operator), Method::GET, "/v1/status", None).await?;
            Ok(v == StatusCode::OK && o == StatusCode::OK)
        },
    )
    .await?;

    // Each role gets exactly its rights, on the node that did not create the keys.
    use StatusCode as S;
    let checks = [
        check(Method::GET, "/v1/kv", None, S::OK, S::OK),
        check(Method::GET, "/v1/cluster", None, S::OK, S::OK),
        check(Method::GET, "/v1/jobs", None, S::OK, S::OK),
        check(
            Method::PUT,
            "/v1/kv/app/replicas",
            Some(json!(3)),
            S::FORBIDDEN,
            S::OK,
        ),
        // Past the role check, the operator's empty message is a 400, not a 403.
        check(
            Method::POST,
            "/v1/topics/news/messages",
            None,
            S::FORBIDDEN,
            S::BAD_REQUEST,
        ),
        check(Method::POST, "/v1/tokens", None, S::FORBIDDEN, S::FORBIDDEN),
        check(Method::GET, "/v1/apikeys", None, S::FORBIDDEN, S::FORBIDDEN),
        check(Method::GET, "/v1/audit", None, S::FORBIDDEN, S::FORBIDDEN),
        check(
            Method::POST,
            "/v1/rename",
            Some(json!({"name": "x"})),
            S::FORBIDDEN,
            S::FORBIDDEN,
        ),
    ];
    for c in &checks {
        for (key, want) in [(&viewer, c.viewer), (&operator, c.operator)] {
            let (got, body, _) =
                call(b, Some(key), c.method.clone(), c.path, c.body.clone()).await?;
            assert_eq!(got, want, "{} {} -> {body}", c.method, c.path);
        }
    }
    // A viewer reads blobs a node holds, but cannot make a node download one.
    let put = reqwest::Client::new()
        .post(b.url("/v1/blobs"))
        .bearer_auth(&operator)
        .body(vec![7u8; 4096])
        .send()
        .await?;
    assert_eq!(put.status(), S::OK);
    let hash = put.json::<Value>().await?["hash"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let blob = format!("/v1/blobs/{hash}");
    assert_eq!(
        status_of(b, Some(&viewer), Method::GET, &blob, None).await?,
        S::OK
    );
    let (s, body, _) = call(a, Some(&viewer), Method::GET, &blob, None).await?;
    assert_eq!(s, S::FORBIDDEN, "{body}");
    assert_eq!(
        status_of(a, Some(&operator), Method::GET, &blob, None).await?,
        S::OK
    );

    // The operator submits and cancels a job; the admin issues a token through b.
    let spec = json!({"model": "softmax", "dataset_features": 64, "classes": 10, "rounds": 3});
    let (s, job, _) = call(b, Some(&operator), Method::POST, "/v1/jobs", Some(spec)).await?;
    assert_eq!(s, StatusCode::CREATED, "{job}");
    let job_id = job["id"].as_str().unwrap_or_default().to_string();
    let cancel = format!("/v1/jobs/{job_id}/cancel");
    let (s, body, _) = call(b, Some(&operator), Method::POST, &cancel, None).await?;
    assert_eq!(s, S::OK, "{body}");
    assert_eq!(
        status_of(b, Some(ADMIN_KEY), Method::POST, "/v1/tokens", None).await?,
        S::OK
    );

    // Listing keys shows ids and roles, never a key or its hash.
    let (_, keys, _) = call(b, Some(ADMIN_KEY), Method::GET, "/v1/apikeys", None).await?;
    let listed = keys.to_string();
    assert!(
        listed.contains(&viewer_id) && listed.contains("\"operator\""),
        "{listed}"
    );
    assert!(
        !listed.contains(&viewer) && !listed.contains("hash"),
        "{listed}"
    );

    // Revoked through b: refused on b as soon as the command returns, then on a too.
    ok_stdout(&b.cli(&["apikey", "revoke", &operator_id])?)?;
    let s = status_of(b, Some(&operator), Method::GET, "/v1/status", None).await?;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    wait_until(
        "a to refuse the revoked key",
        Duration::from_secs(10),
        || async {
            Ok(
                status_of(a, Some(&operator), Method::GET, "/v1/status", None).await?
                    == StatusCode::UNAUTHORIZED,
            )
        },
    )
    .await?;
    // The viewer key still works: revocation is per key.
    let s = status_of(a, Some(&viewer), Method::GET, "/v1/status", None).await?;
    assert_eq!(s, StatusCode::OK);

    // Rate limits: a third node allows 2 requests per second per key (bursts of 4).
    let c = start(root.path(), "c", Some(a), 2).await?;
    wait_until(
        "c to accept the viewer key",
        Duration::from_secs(20),
        || async {
            Ok(status_of(&c, Some(&viewer), Method::GET, "/v1/status", None).await? == S::OK)
        },
    )
    .await?;
    let mut limited = None;
    for _ in 0..20 {
        let (s, _, headers) = call(&c, Some(&viewer), Method::GET, "/v1/status", None).await?;
        if s == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(headers);
            break;
        }
    }
    let headers = limited.ok_or_else(|| anyhow!("20 quick requests at 2/s were never refused"))?;
    let retry: u64 = headers["retry-after"].to_str()?.parse()?;
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    // Another key has its own budget.
    let s = status_of(&c, Some(ADMIN_KEY), Method::GET, "/v1/status", None).await?;
    assert_eq!(s, StatusCode::OK);

    // The audit log, read through any node, records who did each of these.
    // Refusals are written in batches every few seconds.
    wait_until(
        "refusals in the audit log",
        Duration::from_secs(20),
        || async {
            let log = audit(b).await?;
            Ok(
                has(&log, "auth.rejected", |e| e["outcome"] == "refused: 403")
                    && has(&log, "auth.rejected", |e| e["outcome"] == "refused: 401"),
            )
        },
    )
    .await?;
    let log = audit(b).await?;
    let by_admin = |e: &Value| e["actor"] == "admin-key";
    let by_operator = |e: &Value| e["actor"] == format!("apikey:{operator_id}");
    assert!(has(&log, "apikey.create", |e| by_admin(e)
        && e["target"] == viewer_id));
    assert!(has(&log, "apikey.create", |e| e["detail"] == "operator"));
    assert!(has(&log, "apikey.revoke", |e| by_admin(e)
        && e["target"] == operator_id));
    assert!(has(&log, "job.submit", |e| by_operator(e)
        && e["target"] == job_id));
    assert!(has(&log, "job.cancel", |e| by_operator(e)
        && e["outcome"] == "ok"));
    assert!(has(&log, "token.issue", by_admin));
    let joined = |n: &Node| {
        has(&log, "member.join", |e| {
            e["target"] == n.info.peer_id.as_str()
                && e["detail"].as_str().is_some_and(|d| d.contains("token:"))
        })
    };
    assert!(joined(b) && joined(&c), "joins missing from {log:#?}");
    let viewer_refused = format!("viewer key {viewer_id} needs operator");
    assert!(
        has(&log, "auth.rejected", |e| e["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with(&viewer_refused))),
        "{log:#?}"
    );
    // No secret reaches the log.
    let text = serde_json::to_string(&log)?;
    for secret in [viewer.as_str(), operator.as_str(), ADMIN_KEY] {
        assert!(!text.contains(secret));
    }
    // Sequence numbers increase without gaps.
    let seqs: Vec<u64> = log.iter().filter_map(|e| e["seq"].as_u64()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");

    // The CLI shows it as a table.
    let table = ok_stdout(&b.cli(&["audit", "--since", "1h"])?)?;
    assert!(
        table.contains("apikey.revoke") && table.contains("member.join"),
        "{table}"
    );
    Ok(())
}

/// Without `--api-key-file` a keyless request is a local admin only when it plainly comes
/// from a program on the machine: a web page (an `Origin` header, or a DNS-rebound `Host`)
/// gets 401, and so cannot drive the API through the user's browser.
#[tokio::test(flavor = "multi_thread")]
async fn the_keyless_loopback_api_refuses_web_pages() -> Result<()> {
    let root = tempfile::tempdir()?;
    let node = Node::start(root.path(), "local", &[]).await?;
    let http = reqwest::Client::new();
    let plain = http.get(node.url("/v1/status")).send().await?;
    assert_eq!(plain.status(), StatusCode::OK);
    let rebound = http
        .get(node.url("/v1/status"))
        .header(
            "host",
            format!(
                "rebound.example:{}",
                node.info.api.rsplit(':').next().unwrap_or("")
            ),
        )
        .send()
        .await?;
    assert_eq!(rebound.status(), StatusCode::UNAUTHORIZED);
    let page = http
        .post(node.url("/v1/apikeys"))
        .header("origin", "https://page.example")
        .json(&json!({"role": "admin"}))
        .send()
        .await?;
    assert_eq!(page.status(), StatusCode::UNAUTHORIZED);
    // The same page with a key is an ordinary API client.
    let (id, key) = node.create_api_key("viewer")?;
    let keyed = http
        .get(node.url("/v1/status"))
        .header("origin", "https://page.example")
        .bearer_auth(&key)
        .send()
        .await?;
    assert_eq!(keyed.status(), StatusCode::OK, "{id}");
    Ok(())
}
