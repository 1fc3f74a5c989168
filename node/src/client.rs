//! Client commands: each talks to a node's HTTP API and prints the answer,
//! human-readable by default or as JSON with `--json`.

mod access;
mod jobs;

use crate::cli::{
    ApikeyCommand, BlobCommand, ClientArgs, Command, JobsCommand, KeysCommand, KvCommand,
    ModelCommand,
};
use agentmesh_protocols::blob::BlobHash;
use anyhow::{anyhow, bail, Context, Result};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::{path::Path, time::Duration};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};

/// A connection to one node's API.
struct Api {
    http: reqwest::Client,
    base: String,
    key: Option<String>,
    json: bool,
}

impl Api {
    fn new(args: &ClientArgs) -> Result<Self> {
        let base = if args.api.starts_with("http://") || args.api.starts_with("https://") {
            args.api.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", args.api)
        };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;
        let key = match (&args.api_key, &args.api_key_file) {
            (Some(key), _) => Some(key.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the API key file {}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        Ok(Self {
            http,
            base,
            key,
            json: args.json,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(key) = &self.key {
            req = req.bearer_auth(key);
        }
        req
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let res = req.send().await.map_err(|e| {
            if e.is_connect() {
                anyhow!(
                    "cannot reach the agentmesh API at {}: is a node running there? \
                     (start one with `agentmesh start`, or pass --api HOST:PORT)",
                    self.base
                )
            } else {
                anyhow!("request to {} failed: {e}", self.base)
            }
        })?;
        if res.status().is_success() {
            return Ok(res);
        }
        let status = res.status();
        let text = res.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(String::from))
            .unwrap_or(text);
        bail!("{message} (HTTP {})", status.as_u16())
    }

    async fn json(&self, req: reqwest::RequestBuilder) -> Result<Value> {
        self.send(req)
            .await?
            .json()
            .await
            .context("the node answered with invalid JSON")
    }

    fn print_json(&self, v: &Value) {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    }
}

/// Runs one client command.
pub async fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Start(_) => unreachable_start(),
        Command::Dataset { command } => crate::offline::dataset(command),
        Command::Aggregate(args) => crate::offline::aggregate(&args),
        Command::Simulate(args) => crate::offline::simulate(&args),
        Command::Evaluate(args) => crate::offline::evaluate(&args),
        Command::Demo(args) => crate::demo::run(args).await,
        Command::Job { command } => match command {
            JobsCommand::Submit(args) => jobs::submit(&Api::new(&args.client)?, &args).await,
            JobsCommand::Status { id, follow, client } => {
                jobs::status(&Api::new(&client)?, &id, follow).await
            }
            JobsCommand::List(client) => jobs::list(&Api::new(&client)?).await,
            JobsCommand::Cancel { id, client } => jobs::cancel(&Api::new(&client)?, &id).await,
            JobsCommand::Verify { id, round, client } => {
                jobs::verify(&Api::new(&client)?, &id, round).await
            }
        },
        Command::Apikey { command } => match command {
            ApikeyCommand::Create { role, name, client } => {
                access::create(&Api::new(&client)?, &role, &name).await
            }
            ApikeyCommand::List(client) => access::list(&Api::new(&client)?).await,
            ApikeyCommand::Revoke { id, client } => access::revoke(&Api::new(&client)?, &id).await,
        },
        Command::Keys { command } => match command {
            KeysCommand::Rotate(client) => access::rotate_key(&Api::new(&client)?).await,
            KeysCommand::List(client) => access::keys(&Api::new(&client)?).await,
        },
        Command::Audit {
            since,
            limit,
            client,
        } => access::audit(&Api::new(&client)?, since.unwrap_or(0), limit).await,
        Command::Model { command } => match command {
            ModelCommand::Get { key, out, client } => {
                jobs::model_get(&Api::new(&client)?, &key, &out).await
            }
        },
        Command::Status(args) => status(&Api::new(&args)?).await,
        Command::Health { ready, client } => health(&Api::new(&client)?, ready).await,
        Command::Peers(args) => peers(&Api::new(&args)?).await,
        Command::Publish {
            topic,
            message,
            client,
        } => publish(&Api::new(&client)?, &topic, message).await,
        Command::Subscribe { topic, client } => subscribe(&Api::new(&client)?, &topic).await,
        Command::Blob { command } => match command {
            BlobCommand::Put { file, client } => blob_put(&Api::new(&client)?, &file).await,
            BlobCommand::Get { hash, out, client } => {
                blob_get(&Api::new(&client)?, &hash, &out).await
            }
            BlobCommand::List(client) => blob_list(&Api::new(&client)?).await,
        },
        Command::Cluster(args) => cluster(&Api::new(&args)?).await,
        Command::Token { ttl, client } => token(&Api::new(&client)?, ttl).await,
        Command::Rename { name, client } => rename(&Api::new(&client)?, &name).await,
        Command::Remove { member, client } => remove(&Api::new(&client)?, &member).await,
        Command::Kv { command } => match command {
            KvCommand::Put {
                key,
                value,
                if_version,
                client,
            } => kv_put(&Api::new(&client)?, &key, &value, if_version).await,
            KvCommand::Get { key, client } => kv_get(&Api::new(&client)?, &key).await,
            KvCommand::List { prefix, client } => kv_list(&Api::new(&client)?, &prefix).await,
            KvCommand::Delete {
                key,
                if_version,
                client,
            } => kv_delete(&Api::new(&client)?, &key, if_version).await,
        },
    }
}

async fn health(api: &Api, ready: bool) -> Result<()> {
    let path = if ready { "/readyz" } else { "/healthz" };
    let res = api
        .request(reqwest::Method::GET, path)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .with_context(|| format!("cannot reach the agentmesh API at {}", api.base))?;
    let status = res.status();
    let body = res.text().await.unwrap_or_default();
    if api.json {
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::String(body.clone()));
        api.print_json(&serde_json::json!({ "ok": status.is_success(), "body": v }));
    } else {
        println!("{}", body.trim());
    }
    if status.is_success() {
        Ok(())
    } else {
        bail!("{path}: HTTP {}", status.as_u16())
    }
}

async fn cluster(api: &Api) -> Result<()> {
    let v = api
        .json(api.request(reqwest::Method::GET, "/v1/cluster"))
        .await?;
    if api.json {
        api.print_json(&v);
        return Ok(());
    }
    let leader = v["leader"].as_str();
    println!("cluster:  {}", s(&v, "cluster_id"));
    println!(
        "leader:   {} (term {})",
        leader.unwrap_or("none known"),
        v["term"].as_u64().unwrap_or(0)
    );
    println!("this node: {} ({})", s(&v, "node_id"), s(&v, "role"));
    if v["membership_changing"].as_bool() == Some(true) {
        println!("membership: changing (joint configuration or not yet applied here)");
    }
    println!(
        "{:<20} {:<17} {:<8} {:<7} {:>10}  PEER ID",
        "NAME", "NODE ID", "ROLE", "STATE", "CONTACT"
    );
    for m in v["members"].as_array().into_iter().flatten() {
        let role = if m["leader"].as_bool() == Some(true) {
            "leader"
        } else {
            s(m, "role")
        };
        let contact = m["last_contact_ms"]
            .as_u64()
            .map(|ms| format!("{ms}ms ago"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<20} {:<17} {:<8} {:<7} {:>10}  {}",
            s(m, "name"),
            s(m, "node_id"),
            role,
            s(m, "state"),
            contact,
            s(m, "peer_id")
        );
    }
    Ok(())
}

async fn token(api: &Api, ttl: Duration) -> Result<()> {
    let body = serde_json::json!({ "ttl_secs": ttl.as_secs() });
    let v = api
        .json(api.request(reqwest::Method::POST, "/v1/tokens").json(&body))
        .await?;
    if api.json {
        api.print_json(&v);
        return Ok(());
    }
    eprintln!(
        "single-use join token, valid for {}s; join with: agentmesh start --join TOKEN --bootstrap ADDR",
        ttl.as_secs()
    );
    println!("{}", s(&v, "token"));
    Ok(())
}

async fn remove(api: &Api, member: &str) -> Result<()> {
    if member.is_empty() || member.contains(['/', '?', '#', '%']) {
        bail!("{member:?} is not a peer id, node id or member name");
    }
    let path = format!("/v1/cluster/members/{member}");
    let v = api
        .json(api.request(reqwest::Method::DELETE, &path))
        .await?;
    if api.json {
        api.print_json(&v);
    } else {
        println!("removed {} ({})", s(&v, "name"), s(&v, "peer_id"));
    }
    Ok(())
}

async fn rename(api: &Api, name: &str) -> Result<()> {
    let body = serde_json::json!({ "name": name });
    let v = api
        .json(api.request(reqwest::Method::POST, "/v1/rename").json(&body))
        .await?;
    if api.json {
        api.print_json(&v);
    } else {
        println!("renamed to {}", s(&v, "name"));
    }
    Ok(())
}

fn kv_path(key: &str, if_version: Option<u64>) -> String {
    match if_version {
        Some(v) => format!("/v1/kv/{}?if_version={v}", urlencode(key)),
        None => format!("/v1/kv/{}", urlencode(key)),
    }
}

async fn kv_put(api: &Api, key: &str, value: &str, if_version: Option<u64>) -> Result<()> {
    // JSON as given; anything else is stored as a string.
    let value: Value =
        serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.to_string()));
    let v = api
        .json(
            api.request(reqwest::Method::PUT, &kv_path(key, if_version))
                .json(&value),
        )
        .await?;
    if api.json {
        api.print_json(&v);
    } else {
        println!("{key} = version {}", v["version"].as_u64().unwrap_or(0));
    }
    Ok(())
}

async fn kv_get(api: &Api, key: &str) -> Result<()> {
    let v = api
        .json(api.request(reqwest::Method::GET, &kv_path(key, None)))
        .await?;
    if api.json {
        api.print_json(&v);
    } else {
        match &v["value"] {
            Value::String(text) => println!("{text}"),
            other => println!("{other}"),
        }
    }
    Ok(())
}

async fn kv_list(api: &Api, prefix: &str) -> Result<()> {
    let path = format!("/v1/kv?prefix={}", urlencode(prefix));
    let v = api.json(api.request(reqwest::Method::GET, &path)).await?;
    if api.json {
        api.print_json(&v);
        return Ok(());
    }
    for e in v.as_array().into_iter().flatten() {
        println!(
            "{:<40} v{:<8} {}",
            s(e, "key"),
            e["version"].as_u64().unwrap_or(0),
            e["value"]
        );
    }
    Ok(())
}

async fn kv_delete(api: &Api, key: &str, if_version: Option<u64>) -> Result<()> {
    let v = api
        .json(api.request(reqwest::Method::DELETE, &kv_path(key, if_version)))
        .await?;
    if api.json {
        api.print_json(&v);
    } else if v["deleted"].as_bool() == Some(true) {
        println!("deleted {key}");
    } else {
        println!("{key} did not exist");
    }
    Ok(())
}

fn unreachable_start() -> Result<()> {
    bail!("`start` runs a node, not a client command")
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("-")
}

async fn status(api: &Api) -> Result<()> {
    let v = api
        .json(api.request(reqwest::Method::GET, "/v1/status"))
        .await?;
    if api.json {
        api.print_json(&v);
        return Ok(());
    }
    println!("peer id:    {}", s(&v, "peer_id"));
    println!("name:       {}", s(&v, "name"));
    println!("version:    {}", s(&v, "version"));
    let addrs: Vec<&str> = v["listen_addrs"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    println!("listening:  {}", addrs.join("\n            "));
    println!(
        "connected:  {} peers",
        v["connected_peers"].as_u64().unwrap_or(0)
    );
    let raft = &v["raft"];
    println!(
        "cluster:    {} as {} (term {}, leader {})",
        s(raft, "cluster_id"),
        s(raft, "role"),
        raft["term"].as_u64().unwrap_or(0),
        raft["leader"].as_str().unwrap_or("none known")
    );
    Ok(())
}

async fn peers(api: &Api) -> Result<()> {
    let v = api
        .json(api.request(reqwest::Method::GET, "/v1/peers"))
        .await?;
    if api.json {
        api.print_json(&v);
        return Ok(());
    }
    let list = v.as_array().cloned().unwrap_or_default();
    println!(
        "{:<20} {:<54} {:<9} {:>8}  ADDRESS",
        "NAME", "PEER ID", "STATUS", "RTT"
    );
    for p in &list {
        let rtt = p["rtt_ms"]
            .as_f64()
            .map(|r| format!("{r:.1}ms"))
            .unwrap_or_else(|| "-".into());
        let addr = p["addrs"].get(0).and_then(Value::as_str).unwrap_or("-");
        println!(
            "{:<20} {:<54} {:<9} {:>8}  {addr}",
            s(p, "name"),
            s(p, "peer_id"),
            s(p, "status"),
            rtt
        );
    }
    let active = list.iter().filter(|p| p["status"] == "active").count();
    println!("{} peers known, {active} active", list.len());
    Ok(())
}

async fn publish(api: &Api, topic: &str, message: String) -> Result<()> {
    let path = format!("/v1/topics/{}/messages", urlencode(topic));
    let v = api
        .json(api.request(reqwest::Method::POST, &path).body(message))
        .await?;
    if api.json {
        api.print_json(&v);
    } else {
        println!("{}", s(&v, "message_id"));
    }
    Ok(())
}

async fn subscribe(api: &Api, topic: &str) -> Result<()> {
    let ws_base = api.base.replacen("http", "ws", 1);
    let url = format!("{ws_base}/v1/events?topics={}", urlencode(topic));
    let mut req = url
        .into_client_request()
        .context("building the WebSocket request")?;
    if let Some(key) = &api.key {
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {key}")
                .parse()
                .context("API key is not a valid header value")?,
        );
    }
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .map_err(|e| match e {
            tokio_tungstenite::tungstenite::Error::Http(res) => {
                let body = res
                    .body()
                    .as_ref()
                    .map(|b| String::from_utf8_lossy(b).to_string())
                    .unwrap_or_default();
                anyhow!(
                    "the node refused the subscription (HTTP {}): {body}",
                    res.status().as_u16()
                )
            }
            other => anyhow!("cannot open the event stream at {ws_base}: {other}"),
        })?;
    loop {
        tokio::select! {
            msg = ws.next() => {
                let Some(msg) = msg else { break };
                let text = match msg.context("event stream failed")? {
                    Message::Text(t) => t.to_string(),
                    Message::Close(_) => break,
                    _ => continue,
                };
                let v: Value = serde_json::from_str(&text).context("invalid event")?;
                match s(&v, "type") {
                    "subscribed" => eprintln!("subscribed to {topic}; waiting for messages (Ctrl-C to stop)"),
                    "gossip" => {
                        let mut out = serde_json::Map::new();
                        for k in ["topic", "from", "message_id", "data", "data_b64"] {
                            if let Some(x) = v.get(k) {
                                out.insert(k.into(), x.clone());
                            }
                        }
                        println!("{}", Value::Object(out));
                    }
                    "lagged" => eprintln!("warning: missed {} events (client too slow)", v["missed"]),
                    _ => {}
                }
            }
            _ = tokio::signal::ctrl_c() => {
                let _ = ws.send(Message::Close(None)).await;
                break;
            }
        }
    }
    Ok(())
}

async fn blob_put(api: &Api, file: &Path) -> Result<()> {
    let f = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("opening {}", file.display()))?;
    let len = f.metadata().await?.len();
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(f, 1 << 20));
    let v = api
        .json(
            api.request(reqwest::Method::POST, "/v1/blobs")
                .header(reqwest::header::CONTENT_LENGTH, len)
                .body(body),
        )
        .await?;
    if api.json {
        api.print_json(&v);
    } else {
        eprintln!(
            "stored {} ({} bytes, {} chunks)",
            file.display(),
            v["size"],
            v["chunks"]
        );
        println!("{}", s(&v, "hash"));
    }
    Ok(())
}

async fn blob_get(api: &Api, hash: &str, out: &Path) -> Result<()> {
    let hash: BlobHash = hash.parse()?;
    let report = api
        .json(api.request(reqwest::Method::POST, &format!("/v1/blobs/{hash}/fetch")))
        .await?;
    let res = api
        .send(api.request(reqwest::Method::GET, &format!("/v1/blobs/{hash}")))
        .await?;
    let tmp = out.with_extension("agentmesh-part");
    let mut file = tokio::fs::File::create(&tmp)
        .await
        .with_context(|| format!("creating {}", tmp.display()))?;
    let mut hasher = Sha256::new();
    let mut stream = res.bytes_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece.context("download interrupted")?;
        hasher.update(&piece);
        file.write_all(&piece).await.context("writing the output")?;
    }
    file.sync_all().await?;
    drop(file);
    if BlobHash(hasher.finalize().into()) != hash {
        let _ = tokio::fs::remove_file(&tmp).await;
        bail!("the bytes received do not match {hash}; nothing was written");
    }
    tokio::fs::rename(&tmp, out)
        .await
        .with_context(|| format!("writing {}", out.display()))?;
    if api.json {
        let mut v = report;
        v["out"] = Value::String(out.display().to_string());
        api.print_json(&v);
    } else if report["already_local"].as_bool() == Some(true) {
        println!(
            "{hash} -> {} ({} bytes, held locally)",
            out.display(),
            report["size"]
        );
    } else {
        println!(
            "{hash} -> {} ({} bytes; {} chunks fetched from {} providers, {} reused, {} corrupt rejected, {:.2}s)",
            out.display(),
            report["size"],
            report["chunks_fetched"],
            report["providers"].as_array().map_or(0, Vec::len),
            report["chunks_reused"],
            report["corrupt_chunks"],
            report["secs"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(())
}

async fn blob_list(api: &Api) -> Result<()> {
    let v = api
        .json(api.request(reqwest::Method::GET, "/v1/blobs"))
        .await?;
    if api.json {
        api.print_json(&v);
        return Ok(());
    }
    for b in v.as_array().cloned().unwrap_or_default() {
        println!("{}  {:>14} bytes", s(&b, "hash"), b["size"]);
    }
    Ok(())
}

/// Percent-encodes a path segment.
fn urlencode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
