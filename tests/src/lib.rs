//! Harness for multi-node tests: real `agentmesh` processes on 127.0.0.1 with
//! port 0, each in its own data dir under a test's temp dir, logs kept beside it
//! and printed when a test fails. Waits are on conditions with deadlines, never
//! fixed sleeps.
//!
//! Set `AGENTMESH_TEST_LOGS=1` to print each node's log tail when it is dropped
//! (tests returning `Err` drop their nodes before the failure is reported).
//!
//! The binary is found through `AGENTMESH_BIN`, else next to the test executable
//! (`target/<profile>/agentmesh`); build it first (`cargo build -p agentmesh`).

pub mod bench;
pub mod events;
pub mod jobs;
pub mod linearizability;
pub mod netns;
pub mod raw_gossip;
pub mod raw_raft;

use anyhow::{anyhow, bail, Context, Result};
use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::Value;
use std::{
    future::Future,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

/// Default deadline for a node to become ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Path of the `agentmesh` binary under test.
pub fn binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("AGENTMESH_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // Test executables live in target/<profile>/deps/, bins (meshbench) in
    // target/<profile>/; the node binary is in target/<profile>/ either way.
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("unexpected executable path {}", exe.display()))?;
    let candidates = [Some(dir), dir.parent()];
    let found = candidates
        .into_iter()
        .flatten()
        .map(|d| d.join("agentmesh"))
        .find(|p| p.exists())
        .ok_or_else(|| {
            anyhow!(
                "agentmesh not found next to {}: build it first with `cargo build -p agentmesh` \
                 (or set AGENTMESH_BIN)",
                exe.display()
            )
        });
    found
}

/// What a running node wrote to `node.json`.
#[derive(Debug, Clone)]
pub struct RuntimeInfo {
    /// Peer id.
    pub peer_id: String,
    /// API address, HOST:PORT.
    pub api: String,
    /// libp2p listen addresses.
    pub listen_addrs: Vec<String>,
}

/// A running node process.
pub struct Node {
    /// Name, also its data dir's name under the cluster root.
    pub name: String,
    /// Data dir.
    pub data_dir: PathBuf,
    /// Log file (stdout and stderr).
    pub log: PathBuf,
    /// What the node reported when ready.
    pub info: RuntimeInfo,
    child: Option<Child>,
    http: reqwest::Client,
    api_key: Option<String>,
}

/// How to launch a node process beyond its arguments.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// Command the binary runs under, e.g. `ip netns exec NS`.
    pub prefix: Vec<String>,
    /// API key the harness presents (for a node whose API is not on loopback).
    pub api_key: Option<String>,
}

/// An HTTP client that presents `api_key`, if any, on every request.
fn http_client(api_key: Option<&str>) -> Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(key) = api_key {
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {key}").parse()?,
        );
    }
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .build()?)
}

/// Polls `check` until it returns true or `timeout` passes.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() > deadline {
            return Err(match last_err {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Standard per-node arguments: loopback, port 0 for everything.
pub fn loopback_args() -> Vec<String> {
    [
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--listen",
        "/ip4/127.0.0.1/udp/0/quic-v1",
        "--api",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Node {
    /// Starts `name` with data dir `root/name` and `extra` flags; listen and API
    /// addresses default to loopback port 0 unless `extra` sets them.
    pub async fn start(root: &Path, name: &str, extra: &[String]) -> Result<Self> {
        Self::start_with(root, name, extra, &Launch::default()).await
    }

    /// [`Node::start`], launched as `launch` says.
    pub async fn start_with(
        root: &Path,
        name: &str,
        extra: &[String],
        launch: &Launch,
    ) -> Result<Self> {
        let mut args = vec!["start".to_string(), "--name".into(), name.into()];
        let defaults = loopback_args();
        for pair in defaults.chunks(2) {
            if !extra.contains(&pair[0]) {
                args.extend_from_slice(pair);
            }
        }
        args.extend_from_slice(extra);
        Self::spawn_with(root, name, &args, launch).await
    }

    /// Starts the binary with exactly `args` (plus `--data-dir`), waits for `node.json`.
    pub async fn spawn(root: &Path, name: &str, args: &[String]) -> Result<Self> {
        Self::spawn_with(root, name, args, &Launch::default()).await
    }

    /// [`Node::spawn`], launched as `launch` says.
    pub async fn spawn_with(
        root: &Path,
        name: &str,
        args: &[String],
        launch: &Launch,
    ) -> Result<Self> {
        let data_dir = root.join(name);
        std::fs::create_dir_all(&data_dir)?;
        let runtime = data_dir.join("node.json");
        let _ = std::fs::remove_file(&runtime);
        let log = root.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut command = match launch.prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(binary()?);
                c
            }
            None => Command::new(binary()?),
        };
        let child = command
            .args(args)
            .arg("--data-dir")
            .arg(&data_dir)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG")
                    .unwrap_or_else(|_| "info,libp2p=warn,openraft=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawning agentmesh")?;
        let pid = child.id();
        let mut node = Self {
            name: name.to_string(),
            data_dir,
            log,
            info: RuntimeInfo {
                peer_id: String::new(),
                api: String::new(),
                listen_addrs: vec![],
            },
            child: Some(child),
            http: http_client(launch.api_key.as_deref())?,
            api_key: launch.api_key.clone(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = node
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "{name} exited during start-up with {status}:\n{}",
                    node.log_tail()
                );
            }
            if let Ok(text) = std::fs::read_to_string(&runtime) {
                let v: Value = serde_json::from_str(&text)?;
                if v["pid"].as_u64() == Some(u64::from(pid)) {
                    node.info = RuntimeInfo {
                        peer_id: v["peer_id"].as_str().unwrap_or_default().to_string(),
                        api: v["api"].as_str().unwrap_or_default().to_string(),
                        listen_addrs: v["listen_addrs"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(|x| x.as_str().map(String::from))
                                    .collect()
                            })
                            .unwrap_or_default(),
                    };
                    return Ok(node);
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "{name} did not become ready in {START_TIMEOUT:?}:\n{}",
                    node.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The node's TCP multiaddr with `/p2p/PEER_ID`, for `--bootstrap`.
    pub fn tcp_addr(&self) -> String {
        self.addr_with("/tcp/")
    }

    /// The node's QUIC multiaddr with `/p2p/PEER_ID`.
    pub fn quic_addr(&self) -> String {
        self.addr_with("/quic-v1")
    }

    fn addr_with(&self, needle: &str) -> String {
        let a = self
            .info
            .listen_addrs
            .iter()
            .find(|a| a.contains(needle))
            .cloned()
            .unwrap_or_default();
        format!("{a}/p2p/{}", self.info.peer_id)
    }

    /// Full URL of an API path.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.info.api)
    }

    /// An HTTP client.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// GET a JSON document; errors on non-2xx.
    pub async fn get_json(&self, path: &str) -> Result<Value> {
        let res = self.http.get(self.url(path)).send().await?;
        let status = res.status();
        let body = res.text().await?;
        if !status.is_success() {
            bail!("GET {path}: HTTP {status}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Peers this node reports as `active`, by peer id.
    pub async fn active_peers(&self) -> Result<Vec<String>> {
        let peers = self.get_json("/v1/peers").await?;
        Ok(peers
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|p| p["status"] == "active")
            .filter_map(|p| p["peer_id"].as_str().map(String::from))
            .collect())
    }

    /// Runs a client command against this node (`--api` appended).
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let mut command = Command::new(binary()?);
        command.args(args).arg("--api").arg(&self.info.api);
        if let Some(key) = &self.api_key {
            command.env("AGENTMESH_API_KEY", key);
        }
        Ok(command.stdin(Stdio::null()).output()?)
    }

    /// One request presenting `key` (or none, whatever key the node was launched with):
    /// the status, the JSON body (a string if it is not JSON) and the headers.
    pub async fn call(
        &self,
        key: Option<&str>,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(reqwest::StatusCode, Value, reqwest::header::HeaderMap)> {
        let mut req = reqwest::Client::new().request(method, self.url(path));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        let res = req.send().await?;
        let status = res.status();
        let headers = res.headers().clone();
        let text = res.text().await?;
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, body, headers))
    }

    /// Creates an API key with `role` through the CLI: (id, key).
    pub fn create_api_key(&self, role: &str) -> Result<(String, String)> {
        let out = self.cli(&["apikey", "create", "--role", role, "--name", role])?;
        let key = ok_stdout(&out)?
            .lines()
            .last()
            .unwrap_or_default()
            .to_string();
        let id = key
            .strip_prefix("amk_")
            .and_then(|rest| rest.split_once('.'))
            .map(|(id, _)| id.to_string())
            .ok_or_else(|| anyhow!("`apikey create` printed no key: {key:?}"))?;
        Ok((id, key))
    }

    /// Process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends a signal.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| anyhow!("{} is not running", self.name))?;
        nix::sys::signal::kill(Pid::from_raw(pid as i32), sig)?;
        Ok(())
    }

    /// SIGTERM, then waits for exit; returns the exit code.
    pub async fn stop(&mut self) -> Result<Option<i32>> {
        self.signal(Signal::SIGTERM)?;
        self.wait_exit(Duration::from_secs(15)).await
    }

    /// SIGKILL, then waits for exit.
    pub async fn kill(&mut self) -> Result<()> {
        self.signal(Signal::SIGKILL)?;
        self.wait_exit(Duration::from_secs(15)).await?;
        Ok(())
    }

    /// Waits for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().ok_or_else(|| anyhow!("not running"))?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status.code());
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The last lines of the node's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() || std::env::var_os("AGENTMESH_TEST_LOGS").is_some() {
            eprintln!("---- log of {} ----\n{}", self.name, self.log_tail());
        }
    }
}

/// Starts `n` nodes named `{prefix}{i}`, each bootstrapping from the previous one
/// (a chain: node i knows only node i-1), alternately over TCP and QUIC.
pub async fn start_chain(
    root: &Path,
    prefix: &str,
    n: usize,
    extra: &[String],
) -> Result<Vec<Node>> {
    let key = cluster_key_args(root, prefix)?;
    let mut nodes: Vec<Node> = Vec::with_capacity(n);
    for i in 0..n {
        let mut args = extra.to_vec();
        args.extend(key.iter().cloned());
        if let Some(prev) = nodes.last() {
            args.push("--bootstrap".into());
            args.push(if i % 2 == 0 {
                prev.quic_addr()
            } else {
                prev.tcp_addr()
            });
        }
        nodes.push(Node::start(root, &format!("{prefix}{i}"), &args).await?);
    }
    wait_members(&nodes, Duration::from_secs(60)).await?;
    Ok(nodes)
}

/// `--cluster-key-file` arguments naming a fresh cluster key under `root` (mode 0600), for
/// `prefix`'s nodes. The first node started with them (and no `--bootstrap`) founds a
/// cluster; the others, given a `--bootstrap` address, join it without a token.
pub fn cluster_key_args(root: &Path, prefix: &str) -> Result<Vec<String>> {
    use std::os::unix::fs::PermissionsExt;
    let path = root.join(format!("{prefix}-cluster.key"));
    if !path.exists() {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos() as u64
            ^ u64::from(std::process::id());
        std::fs::write(&path, hex::encode(pseudo_random(32, seed)))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(vec![
        "--cluster-key-file".into(),
        path.display().to_string(),
    ])
}

/// Waits until every node sees all of `nodes` as active members of its cluster: only then
/// does each serve the others gossip and blobs.
pub async fn wait_members<N: std::borrow::Borrow<Node>>(
    nodes: &[N],
    timeout: Duration,
) -> Result<()> {
    for node in nodes {
        let node: &Node = node.borrow();
        wait_until(
            &format!("{} to see all {} members", node.name, nodes.len()),
            timeout,
            || async {
                let (_, _, active) = shape(node).await?;
                Ok(active == nodes.len())
            },
        )
        .await?;
    }
    Ok(())
}

/// Waits until every node reports every other node as active.
pub async fn wait_full_mesh(nodes: &[Node], timeout: Duration) -> Result<()> {
    for node in nodes {
        let want: Vec<String> = nodes
            .iter()
            .filter(|n| n.info.peer_id != node.info.peer_id)
            .map(|n| n.info.peer_id.clone())
            .collect();
        wait_until(
            &format!("{} to see all {} others", node.name, want.len()),
            timeout,
            || async {
                let active = node.active_peers().await?;
                Ok(want.iter().all(|p| active.contains(p)))
            },
        )
        .await?;
    }
    Ok(())
}

/// Pseudo-random bytes from a seed (xorshift), for test blobs without a rand dep.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `data` to a fresh file under `dir`.
pub fn write_file(dir: &Path, name: &str, data: &[u8]) -> Result<PathBuf> {
    let p = dir.join(name);
    std::fs::write(&p, data)?;
    Ok(p)
}

/// Checks a command succeeded, returning its stdout.
pub fn ok_stdout(out: &Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "command failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Listen flags on a TCP and a UDP port that are free now, for nodes that must
/// come back on the same addresses after a restart (as deployed nodes do).
///
/// The ports are drawn at random from below the kernel's ephemeral range: a port the
/// kernel hands out (port 0) can be given to another test's outgoing connection or QUIC
/// socket between this check and the node binding it, and these cannot.
pub fn fixed_ports() -> Result<Vec<String>> {
    use std::hash::{BuildHasher, Hasher};
    const LOWEST: u64 = 10_000;
    let ephemeral_low: u64 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768);
    let span = ephemeral_low.saturating_sub(LOWEST).max(1);
    let random = std::collections::hash_map::RandomState::new();
    let draw = |i: u64| {
        let mut h = random.build_hasher();
        h.write_u64(i);
        (LOWEST + h.finish() % span) as u16
    };
    let free = |i: u64, tcp: bool| -> Option<u16> {
        let port = draw(i);
        let ok = if tcp {
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        } else {
            std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        };
        ok.then_some(port)
    };
    let tcp = (0..200).find_map(|i| free(i, true));
    let udp = (200..400).find_map(|i| free(i, false));
    let (Some(tcp), Some(udp)) = (tcp, udp) else {
        bail!("no free TCP and UDP port found below the ephemeral range ({ephemeral_low})");
    };
    Ok(vec![
        "--listen".into(),
        format!("/ip4/127.0.0.1/tcp/{tcp}"),
        "--listen".into(),
        format!("/ip4/127.0.0.1/udp/{udp}/quic-v1"),
    ])
}

/// Raft timings for tests: 50 ms heartbeats, elections after 300-600 ms of
/// silence, dead voters replaced after 3 s.
pub fn fast_raft_args() -> Vec<String> {
    [
        "--raft-heartbeat-ms",
        "50",
        "--raft-election-timeout-ms",
        "300",
        "--raft-unreachable-secs",
        "3",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The listen and API flags `node` was started with, so a restart reuses its ports, plus
/// [`fast_raft_args`].
pub fn restart_args(node: &Node) -> Vec<String> {
    let mut args = fast_raft_args();
    args.extend(["--api".into(), node.info.api.clone()]);
    for addr in &node.info.listen_addrs {
        args.extend(["--listen".into(), addr.clone()]);
    }
    args
}

impl Node {
    /// `GET /v1/cluster`.
    pub async fn cluster(&self) -> Result<Value> {
        self.get_json("/v1/cluster").await
    }

    /// Issues a join token through the API.
    pub async fn token(&self, ttl_secs: u64) -> Result<String> {
        let res = self
            .http
            .post(self.url("/v1/tokens"))
            .json(&serde_json::json!({ "ttl_secs": ttl_secs }))
            .send()
            .await?;
        let status = res.status();
        let v: Value = res.json().await?;
        if !status.is_success() {
            bail!("POST /v1/tokens: HTTP {status}: {v}");
        }
        v["token"]
            .as_str()
            .map(String::from)
            .ok_or_else(|| anyhow!("no token in {v}"))
    }

    /// `PUT /v1/kv/{key}`; returns the HTTP status and body.
    pub async fn kv_put(
        &self,
        key: &str,
        value: &Value,
        if_version: Option<u64>,
    ) -> Result<(u16, Value)> {
        let mut url = self.url(&format!("/v1/kv/{key}"));
        if let Some(v) = if_version {
            url.push_str(&format!("?if_version={v}"));
        }
        let res = self.http.put(url).json(value).send().await?;
        let status = res.status().as_u16();
        Ok((status, res.json().await.unwrap_or(Value::Null)))
    }

    /// `GET /v1/kv/{key}`; returns the HTTP status and body.
    pub async fn kv_get(&self, key: &str) -> Result<(u16, Value)> {
        let res = self
            .http
            .get(self.url(&format!("/v1/kv/{key}")))
            .send()
            .await?;
        let status = res.status().as_u16();
        Ok((status, res.json().await.unwrap_or(Value::Null)))
    }

    /// Whether `/readyz` answers 200.
    pub async fn is_ready(&self) -> bool {
        match self.http.get(self.url("/readyz")).send().await {
            Ok(res) => res.status().is_success(),
            Err(_) => false,
        }
    }
}

/// The leader's peer id as `node` sees it, if any.
pub async fn leader_of(node: &Node) -> Option<String> {
    let c = node.cluster().await.ok()?;
    c["leader_peer_id"].as_str().map(String::from)
}

/// The index in `nodes` of the node `nodes[0]` names as leader.
pub async fn leader_index(nodes: &[Node]) -> Result<usize> {
    let leader = leader_of(&nodes[0])
        .await
        .ok_or_else(|| anyhow!("no leader"))?;
    nodes
        .iter()
        .position(|n| n.info.peer_id == leader)
        .ok_or_else(|| anyhow!("leader {leader} is none of these nodes"))
}

/// Voter count, learner count and active-member count as `node` sees them.
pub async fn shape(node: &Node) -> Result<(usize, usize, usize)> {
    let c = node.cluster().await?;
    let len = |k: &str| c[k].as_array().map_or(0, Vec::len);
    let active = c["members"]
        .as_array()
        .map_or(0, |m| m.iter().filter(|m| m["state"] == "active").count());
    Ok((len("voters"), len("learners"), active))
}

/// Starts an `n`-node cluster on fixed ports: the first node founds it, the
/// others join with tokens through it. Returns once every node is a member and
/// the leader keeps `min(n, 3 or 5)` voters. `extra` goes to every node.
pub async fn start_cluster(
    root: &Path,
    prefix: &str,
    n: usize,
    extra: &[String],
) -> Result<Vec<Node>> {
    start_cluster_with(root, prefix, n, |_| extra.to_vec()).await
}

/// [`start_cluster`] with each node's own extra flags: node `i` gets `extra(i)`.
pub async fn start_cluster_with(
    root: &Path,
    prefix: &str,
    n: usize,
    extra: impl Fn(usize) -> Vec<String>,
) -> Result<Vec<Node>> {
    let args = |i: usize| -> Result<Vec<String>> {
        let mut args = fixed_ports()?;
        args.extend(extra(i));
        Ok(args)
    };
    let first = Node::start(root, &format!("{prefix}0"), &args(0)?).await?;
    wait_until("the founder to lead", Duration::from_secs(20), || async {
        Ok(first.is_ready().await)
    })
    .await?;
    let mut nodes = vec![first];
    for i in 1..n {
        let token = nodes[0].token(600).await?;
        let mut args = args(i)?;
        args.extend([
            "--bootstrap".into(),
            nodes[0].tcp_addr(),
            "--join".into(),
            token,
        ]);
        nodes.push(Node::start(root, &format!("{prefix}{i}"), &args).await?);
    }
    let voters = match n {
        0..=2 => 1,
        3 | 4 => 3,
        _ => 5,
    };
    wait_settled(&nodes, voters).await?;
    Ok(nodes)
}

/// Waits until every node is ready and sees every node as an active member, `voters` voters,
/// and a settled membership. Every node, not just one, must have applied the final
/// (non-joint) configuration: until then an election may still need the old voters.
pub async fn wait_settled(nodes: &[Node], voters: usize) -> Result<()> {
    wait_until(
        "every node to be a member",
        Duration::from_secs(30),
        || async {
            for node in nodes {
                if !node.is_ready().await {
                    return Ok(false);
                }
                let (v, _, active) = shape(node).await?;
                let settled = node.cluster().await?["membership_changing"] == false;
                if v != voters || active != nodes.len() || !settled {
                    return Ok(false);
                }
            }
            Ok(true)
        },
    )
    .await
}
