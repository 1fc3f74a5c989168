//! `meshbench`: performance figures for agentmesh, measured on real node
//! processes on 127.0.0.1 (not a test: it asserts nothing, it reports).
//!
//! ```text
//! cargo build --release -p agentmesh
//! cargo run --release -p agentmesh-tests --bin meshbench -- [--quick]
//! ```
//!
//! Measures, and prints as a table with the machine and the date:
//!
//! 1. blob fetch throughput between two nodes, against plain TCP copies of the
//!    same file in the same run (file to file with fsync, and memory to memory);
//! 2. gossip delivery latency (HTTP publish -> gossipsub -> WebSocket event) on
//!    meshes of 10 and 30 nodes;
//! 3. resident memory of idle nodes, and of a node after the blob benchmark.
//!
//! `--quick` halves the blob size and the number of gossip messages;
//! `--only blob|gossip|memory` (comma-separated) runs only those parts. The node
//! binary is `AGENTMESH_BIN`, else `agentmesh` next to this executable, so a
//! release run of `meshbench` measures the release node.

use agentmesh_tests::bench::{self, median};
use agentmesh_tests::{
    ok_stdout, pseudo_random, start_chain, wait_full_mesh, wait_until, write_file, Node,
};
use anyhow::{anyhow, bail, Context, Result};
use futures::StreamExt;
use serde_json::Value;
use std::{
    collections::HashSet,
    fmt::Write as _,
    io::{BufWriter, Read, Write},
    net::{Shutdown, TcpListener, TcpStream},
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const MIB: usize = 1 << 20;
/// Decimal megabyte: throughput is reported in MB/s (10^6 bytes per second).
const MB: f64 = 1_000_000.0;
/// Rounds of each throughput measurement; the median is reported.
const ROUNDS: usize = 3;
/// Gossip mesh sizes measured.
const GOSSIP_SIZES: [usize; 2] = [10, 30];
/// Gap between published gossip messages.
const PUBLISH_GAP: Duration = Duration::from_millis(10);
/// Gap of the second, slower series (half as many messages), for context.
const SLOW_PUBLISH_GAP: Duration = Duration::from_millis(50);
/// How long the background CPU of a gossip mesh is measured before publishing.
const GOSSIP_IDLE_WINDOW: Duration = Duration::from_secs(2);
/// How long idle nodes are left alone before their RSS is read.
const IDLE_PERIOD: Duration = Duration::from_secs(5);
/// Socket and file buffer size of the plain TCP baselines: the node moves 1 MiB
/// chunks, so the baselines move 1 MiB at a time too.
const COPY_BUF: usize = MIB;

/// Target: blob fetch at least this fraction of a plain TCP file copy.
const TARGET_BLOB_RATIO: f64 = 0.5;
/// Target: gossip delivery p99 below this, at 10 and 30 nodes.
const TARGET_GOSSIP_P99_MS: f64 = 50.0;
/// Target: idle node RSS below this.
const TARGET_IDLE_RSS_MIB: f64 = 30.0;

const USAGE: &str = "usage: meshbench [--quick] [--only blob,gossip,memory]";

/// What to run.
struct Options {
    blob_bytes: usize,
    gossip_messages: usize,
    quick: bool,
    blob: bool,
    gossip: bool,
    memory: bool,
}

impl Options {
    /// The parts left out, for the header: empty when everything runs.
    fn parts(&self) -> String {
        let parts: Vec<&str> = [
            (self.blob, "blob"),
            (self.gossip, "gossip"),
            (self.memory, "memory"),
        ]
        .iter()
        .filter_map(|(on, name)| on.then_some(*name))
        .collect();
        match parts.len() {
            3 => String::new(),
            _ => format!(", only {}", parts.join(",")),
        }
    }

    fn from_args() -> Result<Self> {
        let mut quick = false;
        let mut only: Option<String> = None;
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => quick = true,
                "--only" => only = Some(args.next().context(USAGE)?),
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?} ({USAGE})"),
            }
        }
        let parts: Vec<&str> = match &only {
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .collect(),
            None => vec!["blob", "gossip", "memory"],
        };
        if parts.is_empty() {
            bail!("--only names no part ({USAGE})");
        }
        if let Some(bad) = parts
            .iter()
            .find(|p| !["blob", "gossip", "memory"].contains(p))
        {
            bail!("unknown part {bad:?} in --only ({USAGE})");
        }
        Ok(Self {
            blob_bytes: if quick { 128 * MIB } else { 256 * MIB },
            gossip_messages: if quick { 100 } else { 200 },
            quick,
            blob: parts.contains(&"blob"),
            gossip: parts.contains(&"gossip"),
            memory: parts.contains(&"memory"),
        })
    }
}

fn main() -> Result<()> {
    let opts = Options::from_args()?;
    // Fail early, before any node is started, if the node binary is missing.
    agentmesh_tests::binary()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(run(&opts))
}

async fn run(opts: &Options) -> Result<()> {
    let header = machine_header(opts)?;
    eprint!("{header}");
    // Idle RSS first, while nothing else has run: the cleanest figure.
    let idle = match opts.memory {
        true => Some(bench_idle_rss().await.context("idle RSS benchmark")?),
        false => None,
    };
    let mut gossip = Vec::new();
    for n in GOSSIP_SIZES.iter().filter(|_| opts.gossip) {
        gossip.push(
            bench_gossip(*n, opts.gossip_messages)
                .await
                .with_context(|| format!("gossip benchmark on {n} nodes"))?,
        );
    }
    let blob = match opts.blob {
        true => Some(
            bench_blob(opts.blob_bytes)
                .await
                .context("blob benchmark")?,
        ),
        false => None,
    };
    println!("{header}");
    println!("{}", report(blob.as_ref(), &gossip, idle.as_ref()));
    Ok(())
}

// ---------------------------------------------------------------- blobs ----

/// Figures of the blob benchmark.
struct BlobResult {
    bytes: usize,
    /// MB/s per round, client wall time of `POST /v1/blobs/{hash}/fetch`.
    node: Vec<f64>,
    /// The node's own `secs` per round (includes the provider lookup).
    node_reported_secs: Vec<f64>,
    /// CPU seconds the provider and the fetcher used per fetch.
    provider_cpu: Vec<f64>,
    fetcher_cpu: Vec<f64>,
    /// Largest share of the machine busy outside the nodes and this process
    /// (other processes, kernel writeback) during any timed copy: a sign the
    /// figures were disturbed.
    max_other_share: f64,
    tcp_file: Vec<f64>,
    tcp_mem: Vec<f64>,
    /// Fetcher's RSS and peak RSS after all rounds, MiB.
    fetcher_rss: f64,
    fetcher_hwm: f64,
}

async fn bench_blob(bytes: usize) -> Result<BlobResult> {
    let root = tempfile::tempdir().context("creating a temp dir")?;
    // Members of one cluster (nodes serve blobs only to members); B dials A over TCP.
    let nodes = start_chain(root.path(), "blob", 2, &[]).await?;
    wait_full_mesh(&nodes, Duration::from_secs(30)).await?;
    let [a, b] = nodes.as_slice() else {
        bail!("expected two nodes");
    };

    let mut result = BlobResult {
        bytes,
        node: vec![],
        node_reported_secs: vec![],
        provider_cpu: vec![],
        fetcher_cpu: vec![],
        max_other_share: 0.0,
        tcp_file: vec![],
        tcp_mem: vec![],
        fetcher_rss: 0.0,
        fetcher_hwm: 0.0,
    };
    for round in 0..ROUNDS {
        // A new blob every round (new seed, new hash), so B always fetches
        // every chunk over the network instead of finding it on disk. Seeds
        // are odd: `pseudo_random` sets the low bit, so 2k and 2k+1 collide.
        let data = pseudo_random(bytes, 1001 + 2 * round as u64);
        let input = write_file(root.path(), &format!("input-{round}.bin"), &data)?;
        let input_str = input
            .to_str()
            .ok_or_else(|| anyhow!("non-UTF-8 temp path {}", input.display()))?;
        let out = tokio::task::block_in_place(|| a.cli(&["blob", "put", input_str]))?;
        let hash = ok_stdout(&out)
            .context("agentmesh blob put")?
            .trim()
            .to_string();
        wait_until(
            "the fetcher to find the provider",
            Duration::from_secs(60),
            || async {
                let v = b.get_json(&format!("/v1/blobs/{hash}/providers")).await?;
                Ok(v["providers"].as_array().is_some_and(|p| !p.is_empty()))
            },
        )
        .await?;

        flush_disks()?;
        let provider_before = cpu_secs(a)?;
        let cpu = CpuWindow::start(&nodes)?;
        let started = Instant::now();
        let res = b
            .http()
            .post(b.url(&format!("/v1/blobs/{hash}/fetch")))
            .send()
            .await
            .context("POST fetch")?;
        let status = res.status();
        let text = res.text().await.context("reading the fetch report")?;
        let secs = started.elapsed().as_secs_f64();
        let used = cpu.finish(&nodes)?;
        let provider = cpu_secs(a)? - provider_before;
        result.provider_cpu.push(provider);
        result.fetcher_cpu.push(used.nodes - provider);
        result.max_other_share = result.max_other_share.max(used.share(used.other));
        if !status.is_success() {
            bail!("fetch of {hash} failed: HTTP {status}: {text}");
        }
        let report: Value = serde_json::from_str(&text).context("parsing the fetch report")?;
        let size = report["size"].as_u64().unwrap_or(0);
        let fetched = report["chunks_fetched"].as_u64().unwrap_or(0);
        let chunks = report["chunks"].as_u64().unwrap_or(u64::MAX);
        if size != bytes as u64 || fetched != chunks {
            bail!("unexpected fetch report (not a full fresh fetch): {report}");
        }
        result.node.push(bytes as f64 / MB / secs);
        result
            .node_reported_secs
            .push(report["secs"].as_f64().unwrap_or(f64::NAN));

        let copy = root.path().join(format!("tcp-copy-{round}.bin"));
        flush_disks()?;
        let cpu = CpuWindow::start(&nodes)?;
        let secs = tokio::task::block_in_place(|| tcp_copy_file(&input, &copy))
            .context("plain TCP file copy")?;
        let used = cpu.finish(&nodes)?;
        result.max_other_share = result.max_other_share.max(used.share(used.other));
        result.tcp_file.push(bytes as f64 / MB / secs);
        std::fs::remove_file(&copy).ok();

        flush_disks()?;
        let cpu = CpuWindow::start(&nodes)?;
        let secs = tokio::task::block_in_place(|| tcp_copy_memory(&data))
            .context("plain TCP memory copy")?;
        let used = cpu.finish(&nodes)?;
        result.max_other_share = result.max_other_share.max(used.share(used.other));
        result.tcp_mem.push(bytes as f64 / MB / secs);

        eprintln!(
            "blob round {}: agentmesh {:.0} MB/s, tcp file {:.0} MB/s, tcp memory {:.0} MB/s",
            round + 1,
            result.node[round],
            result.tcp_file[round],
            result.tcp_mem[round]
        );
        // The nodes keep their own copies; ours only fill the disk.
        std::fs::remove_file(&input).ok();
    }
    let pid = b.pid().ok_or_else(|| anyhow!("fetcher is not running"))?;
    result.fetcher_rss = proc_status_mib(pid, "VmRSS")?;
    result.fetcher_hwm = proc_status_mib(pid, "VmHWM")?;
    Ok(result)
}

/// Copies `input` over a loopback TCP connection into `output`, fsynced, the
/// way the node must: read from disk on one side, written and synced on the
/// other. Returns the seconds from first read to completed fsync.
fn tcp_copy_file(input: &Path, output: &Path) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::scope(|s| {
        let receiver = s.spawn(move || -> std::io::Result<u64> {
            let (mut sock, _) = listener.accept()?;
            let file = std::fs::File::create(output)?;
            let mut w = BufWriter::with_capacity(COPY_BUF, file);
            let mut buf = vec![0u8; COPY_BUF];
            let mut total = 0u64;
            loop {
                let n = sock.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                w.write_all(&buf[..n])?;
                total += n as u64;
            }
            let file = w.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            Ok(total)
        });
        let started = Instant::now();
        let sender = s.spawn(move || -> std::io::Result<()> {
            let mut sock = TcpStream::connect(addr)?;
            sock.set_nodelay(true)?;
            let mut file = std::fs::File::open(input)?;
            let mut buf = vec![0u8; COPY_BUF];
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                sock.write_all(&buf[..n])?;
            }
            sock.shutdown(Shutdown::Write)
        });
        join(sender).context("sender")?;
        let got = join(receiver).context("receiver")?;
        let secs = started.elapsed().as_secs_f64();
        let want = std::fs::metadata(input)?.len();
        if got != want {
            bail!("plain TCP copy moved {got} of {want} bytes");
        }
        Ok(secs)
    })
}

/// Sends `data` over a loopback TCP connection to a reader that discards it:
/// the ceiling of what the loopback interface and the kernel can move.
fn tcp_copy_memory(data: &[u8]) -> Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    std::thread::scope(|s| {
        let receiver = s.spawn(move || -> std::io::Result<u64> {
            let (mut sock, _) = listener.accept()?;
            let mut buf = vec![0u8; COPY_BUF];
            let mut total = 0u64;
            loop {
                let n = sock.read(&mut buf)?;
                if n == 0 {
                    return Ok(total);
                }
                total += n as u64;
            }
        });
        let started = Instant::now();
        let sender = s.spawn(move || -> std::io::Result<()> {
            let mut sock = TcpStream::connect(addr)?;
            sock.set_nodelay(true)?;
            for piece in data.chunks(COPY_BUF) {
                sock.write_all(piece)?;
            }
            sock.shutdown(Shutdown::Write)
        });
        join(sender).context("sender")?;
        let got = join(receiver).context("receiver")?;
        let secs = started.elapsed().as_secs_f64();
        if got != data.len() as u64 {
            bail!("plain TCP copy moved {got} of {} bytes", data.len());
        }
        Ok(secs)
    })
}

/// Joins a scoped thread, turning a panic into an error.
fn join<T>(h: std::thread::ScopedJoinHandle<'_, std::io::Result<T>>) -> Result<T> {
    h.join()
        .map_err(|_| anyhow!("thread panicked"))?
        .map_err(Into::into)
}

/// Writes back every dirty page (`sync`), so each timed copy starts from the
/// same clean state instead of paying for the previous step's writeback (the
/// input file, the provider's upload) inside its own fsync.
fn flush_disks() -> Result<()> {
    let status = std::process::Command::new("sync")
        .status()
        .context("running sync")?;
    if !status.success() {
        bail!("sync failed: {status}");
    }
    Ok(())
}

/// CPU seconds (user + system, all threads) a node process has used so far.
fn cpu_secs(node: &Node) -> Result<f64> {
    let pid = node
        .pid()
        .ok_or_else(|| anyhow!("{} is not running", node.name))?;
    process_cpu_secs(&format!("/proc/{pid}/stat"))
}

/// CPU seconds used so far by this process (the benchmark's own clients).
fn self_cpu_secs() -> Result<f64> {
    process_cpu_secs("/proc/self/stat")
}

/// User + system CPU seconds from a /proc/PID/stat file.
fn process_cpu_secs(path: &str) -> Result<f64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // Fields after the parenthesised command name, which may hold spaces:
    // state is field 3, utime 14 and stime 15, in USER_HZ ticks (100 per
    // second on Linux, whatever the kernel's internal HZ).
    let fields: Vec<&str> = text
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| -> Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("malformed {path}"))
    };
    Ok((ticks(11)? + ticks(12)?) / 100.0)
}

/// CPU seconds the whole machine has spent busy (user, nice, system, irq,
/// softirq; not idle, iowait or steal), from the first line of /proc/stat.
fn machine_busy_secs() -> Result<f64> {
    let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = text
        .lines()
        .next()
        .ok_or_else(|| anyhow!("empty /proc/stat"))?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    let busy = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| ticks.get(i).copied().unwrap_or(0.0))
        .sum::<f64>();
    Ok(busy / 100.0)
}

/// CPU used over a stretch of time, split between the nodes, this process and
/// everything else: the nodes share the machine with the benchmark's clients
/// and with whatever else runs, and the figures are only as good as that.
struct CpuWindow {
    started: Instant,
    nodes: f64,
    bench: f64,
    machine: f64,
}

/// CPU seconds used during a [`CpuWindow`].
struct CpuUse {
    nodes: f64,
    bench: f64,
    /// Machine busy time not accounted to the nodes or to us; includes kernel
    /// work (softirq) done outside any process.
    other: f64,
    wall: f64,
}

impl CpuWindow {
    fn start(nodes: &[Node]) -> Result<Self> {
        Ok(Self {
            nodes: nodes.iter().map(cpu_secs).sum::<Result<f64>>()?,
            bench: self_cpu_secs()?,
            machine: machine_busy_secs()?,
            started: Instant::now(),
        })
    }

    fn finish(&self, nodes: &[Node]) -> Result<CpuUse> {
        let wall = self.started.elapsed().as_secs_f64();
        let node_cpu = nodes.iter().map(cpu_secs).sum::<Result<f64>>()? - self.nodes;
        let bench = self_cpu_secs()? - self.bench;
        let machine = machine_busy_secs()? - self.machine;
        Ok(CpuUse {
            nodes: node_cpu,
            bench,
            other: (machine - node_cpu - bench).max(0.0),
            wall,
        })
    }
}

impl CpuUse {
    /// `secs` of CPU as a share of all the machine's CPUs over the window.
    fn share(&self, secs: f64) -> f64 {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from) as f64;
        secs / (self.wall * cpus)
    }

    /// "nodes N% / bench B% / other O%" of the machine.
    fn describe(&self) -> String {
        format!(
            "{:.0}% / {:.0}% / {:.0}%",
            self.share(self.nodes) * 100.0,
            self.share(self.bench) * 100.0,
            self.share(self.other) * 100.0
        )
    }
}

// --------------------------------------------------------------- gossip ----

/// Figures of one gossip mesh.
struct GossipResult {
    nodes: usize,
    /// The measurement proper, at [`PUBLISH_GAP`].
    main: GossipPass,
    /// The same at [`SLOW_PUBLISH_GAP`], for context: tells a CPU-bound mesh
    /// (latency falls when messages come slower) from per-hop delays.
    slow: GossipPass,
    /// Time for the chain of bootstraps to become a full mesh.
    mesh_secs: f64,
    /// Largest RSS among the nodes after the run, MiB.
    max_rss: f64,
    /// CPU used with the mesh idle (subscribed, nothing published).
    cpu_idle: CpuUse,
}

/// Figures of one series of published messages.
struct GossipPass {
    gap: Duration,
    messages: usize,
    /// Latencies of first deliveries, ms, sorted.
    latencies_ms: Vec<f64>,
    expected: usize,
    duplicates: usize,
    lagged: u64,
    /// Durations of the publish HTTP calls, ms, sorted.
    publish_ms: Vec<f64>,
    /// CPU used while the messages were published and delivered.
    cpu: CpuUse,
}

/// A client WebSocket to a node's event stream.
type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// What the WebSocket readers report.
enum WsEvent {
    Delivery {
        subscriber: usize,
        seq: u64,
        latency_ns: u64,
    },
    Lagged(u64),
}

async fn bench_gossip(n: usize, messages: usize) -> Result<GossipResult> {
    let root = tempfile::tempdir().context("creating a temp dir")?;
    let started = Instant::now();
    let nodes = start_chain(root.path(), "g", n, &[]).await?;
    wait_full_mesh(&nodes, Duration::from_secs(120)).await?;
    let mesh_secs = started.elapsed().as_secs_f64();
    eprintln!("gossip: {n} nodes in a full mesh after {mesh_secs:.1} s");

    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut readers = Vec::new();
    for (i, node) in nodes.iter().enumerate().skip(1) {
        let ws = subscribe(node).await?;
        readers.push(tokio::spawn(read_events(ws, i, tx.clone())));
    }
    drop(tx);

    let publisher = &nodes[0];
    wait_until(
        &format!("the publisher to see {} subscribers", n - 1),
        Duration::from_secs(60),
        || async {
            let v = publisher.get_json("/v1/topics/bench").await?;
            Ok(v["peers"].as_array().map_or(0, Vec::len) >= n - 1)
        },
    )
    .await?;

    // The mesh's background CPU (pings, heartbeats, Kademlia), to tell what
    // the messages themselves cost.
    let cpu = CpuWindow::start(&nodes)?;
    tokio::time::sleep(GOSSIP_IDLE_WINDOW).await;
    let cpu_idle = cpu.finish(&nodes)?;

    let main = publish_pass(&nodes, &mut rx, 0, messages, PUBLISH_GAP).await?;
    let slow = publish_pass(
        &nodes,
        &mut rx,
        messages as u64,
        messages / 2,
        SLOW_PUBLISH_GAP,
    )
    .await?;
    for r in &readers {
        r.abort();
    }

    let mut max_rss: f64 = 0.0;
    for node in &nodes {
        let pid = node.pid().ok_or_else(|| anyhow!("{} exited", node.name))?;
        max_rss = max_rss.max(proc_status_mib(pid, "VmRSS")?);
    }
    for pass in [&main, &slow] {
        eprintln!(
            "gossip {n} nodes, {} ms gap: p50 {:.2} ms, p99 {:.2} ms, {}/{} delivered",
            pass.gap.as_millis(),
            percentile(&pass.latencies_ms, 50.0),
            percentile(&pass.latencies_ms, 99.0),
            pass.latencies_ms.len(),
            pass.expected
        );
    }
    Ok(GossipResult {
        nodes: n,
        main,
        slow,
        mesh_secs,
        max_rss,
        cpu_idle,
    })
}

/// Opens `node`'s event stream subscribed to the bench topic.
async fn subscribe(node: &Node) -> Result<Ws> {
    let url = format!("ws://{}/v1/events?topics=bench", node.info.api);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let hello = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .context("no hello on the event stream")?
        .ok_or_else(|| anyhow!("event stream of {} closed", node.name))??;
    let hello: Value = match hello {
        Message::Text(t) => serde_json::from_str(&t)?,
        other => bail!("unexpected first event {other:?}"),
    };
    if hello["type"] != "subscribed" {
        bail!("unexpected first event {hello}");
    }
    Ok(ws)
}

/// Forwards subscriber `i`'s bench deliveries, stamped on arrival, to `tx`.
async fn read_events(mut ws: Ws, i: usize, tx: mpsc::UnboundedSender<WsEvent>) {
    while let Some(Ok(msg)) = ws.next().await {
        // Stamp arrival before anything else so parsing is not counted.
        let arrived = now_ns();
        let Message::Text(text) = msg else { continue };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let event = match v["type"].as_str() {
            Some("gossip") if v["topic"] == "bench" => {
                let Some((seq, sent)) = v["data"].as_str().and_then(parse_payload) else {
                    continue;
                };
                WsEvent::Delivery {
                    subscriber: i,
                    seq,
                    latency_ns: arrived.saturating_sub(sent),
                }
            }
            Some("lagged") => WsEvent::Lagged(v["missed"].as_u64().unwrap_or(0)),
            _ => continue,
        };
        if tx.send(event).is_err() {
            break;
        }
    }
}

/// Publishes `messages` messages numbered from `first`, `gap` apart, from the
/// first node, and gathers their deliveries to the other nodes.
async fn publish_pass(
    nodes: &[Node],
    rx: &mut mpsc::UnboundedReceiver<WsEvent>,
    first: u64,
    messages: usize,
    gap: Duration,
) -> Result<GossipPass> {
    let publisher = &nodes[0];
    let url = publisher.url("/v1/topics/bench/messages");
    let cpu = CpuWindow::start(nodes)?;
    let mut publish_ms = Vec::with_capacity(messages);
    let mut tick = tokio::time::interval(gap);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let seqs = first..first + messages as u64;
    for seq in seqs.clone() {
        tick.tick().await;
        let body = format!("seq={seq} sent_ns={}", now_ns());
        let call = Instant::now();
        publisher
            .http()
            .post(&url)
            .body(body)
            .send()
            .await
            .with_context(|| format!("publishing message {seq}"))?
            .error_for_status()
            .with_context(|| format!("publishing message {seq}"))?;
        publish_ms.push(call.elapsed().as_secs_f64() * 1e3);
    }

    // Latencies were stamped by the readers; this only gathers them, waiting a
    // while for stragglers so a lost message is counted, not waited for forever.
    let expected = messages * (nodes.len() - 1);
    let mut seen = HashSet::new();
    let mut latencies_ms = Vec::with_capacity(expected);
    let (mut duplicates, mut lagged) = (0, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while seen.len() < expected {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(WsEvent::Delivery {
                subscriber,
                seq,
                latency_ns,
            })) if seqs.contains(&seq) => {
                if seen.insert((subscriber, seq)) {
                    latencies_ms.push(latency_ns as f64 / 1e6);
                } else {
                    duplicates += 1;
                }
            }
            // A straggler of an earlier pass: already counted as missing there.
            Ok(Some(WsEvent::Delivery { .. })) => {}
            Ok(Some(WsEvent::Lagged(missed))) => lagged += missed,
            Ok(None) | Err(_) => break,
        }
    }
    let cpu = cpu.finish(nodes)?;
    latencies_ms.sort_by(f64::total_cmp);
    publish_ms.sort_by(f64::total_cmp);
    Ok(GossipPass {
        gap,
        messages,
        latencies_ms,
        expected,
        duplicates,
        lagged,
        publish_ms,
        cpu,
    })
}

/// Reads back `seq=S sent_ns=T`.
fn parse_payload(text: &str) -> Option<(u64, u64)> {
    let mut seq = None;
    let mut sent = None;
    for field in text.split_whitespace() {
        if let Some(v) = field.strip_prefix("seq=") {
            seq = v.parse().ok();
        } else if let Some(v) = field.strip_prefix("sent_ns=") {
            sent = v.parse().ok();
        }
    }
    Some((seq?, sent?))
}

/// Wall clock in ns: sender and receivers are on one machine, so one clock.
fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

// ------------------------------------------------------------------ RSS ----

/// Figures of the idle RSS benchmark, MiB per node.
struct IdleResult {
    rss: Vec<f64>,
}

async fn bench_idle_rss() -> Result<IdleResult> {
    let root = tempfile::tempdir().context("creating a temp dir")?;
    let nodes = start_chain(root.path(), "idle", 3, &[]).await?;
    wait_full_mesh(&nodes, Duration::from_secs(30)).await?;
    // The idle period is the measurement: RSS of a connected node with nothing
    // to do but pings, Kademlia and gossipsub heartbeats.
    tokio::time::sleep(IDLE_PERIOD).await;
    let mut rss = Vec::new();
    for node in &nodes {
        let pid = node.pid().ok_or_else(|| anyhow!("{} exited", node.name))?;
        rss.push(proc_status_mib(pid, "VmRSS")?);
    }
    rss.sort_by(f64::total_cmp);
    eprintln!("idle RSS (MiB): {rss:.1?}");
    Ok(IdleResult { rss })
}

/// A `kB` field of /proc/PID/status (VmRSS, VmHWM), in MiB.
fn proc_status_mib(pid: u32, field: &str) -> Result<f64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kb: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next())
        .ok_or_else(|| anyhow!("no {field} in {path}"))?
        .parse()
        .with_context(|| format!("parsing {field} in {path}"))?;
    Ok(kb / 1024.0)
}

// --------------------------------------------------------------- report ----

fn machine_header(opts: &Options) -> Result<String> {
    let mut s = String::new();
    writeln!(s, "meshbench: agentmesh on 127.0.0.1")?;
    s.push_str(&bench::machine_lines()?);
    writeln!(
        s,
        "mode      {}{} ({} MiB blob x {ROUNDS} rounds, {} gossip messages {} ms apart)",
        if opts.quick { "--quick" } else { "full" },
        opts.parts(),
        opts.blob_bytes / MIB,
        opts.gossip_messages,
        PUBLISH_GAP.as_millis()
    )?;
    Ok(s)
}

fn report(blob: Option<&BlobResult>, gossip: &[GossipResult], idle: Option<&IdleResult>) -> String {
    let mut t = Table::default();
    if let Some(blob) = blob {
        report_blob(&mut t, blob);
    }
    for g in gossip {
        report_gossip(&mut t, g);
    }
    if let Some(idle) = idle {
        report_memory(&mut t, idle, blob);
    }
    t.render()
}

fn report_blob(t: &mut Table, blob: &BlobResult) {
    t.section(&format!(
        "Blob transfer, {} MiB, loopback, median of {ROUNDS} (MB = 10^6 B)",
        blob.bytes / MIB
    ));
    let node = median(&blob.node);
    let file = median(&blob.tcp_file);
    let mem = median(&blob.tcp_mem);
    t.row(
        "agentmesh fetch A->B (verify, fsync)",
        format!("{node:.0} MB/s"),
        "",
        "",
    );
    t.row(
        "  runs, client wall time",
        list(&blob.node, 0, "MB/s"),
        "",
        "",
    );
    t.row(
        "  node-reported secs per run",
        list(&blob.node_reported_secs, 2, "s"),
        "",
        "",
    );
    t.row(
        "  CPU s per run, provider A",
        list(&blob.provider_cpu, 2, "s"),
        "",
        "",
    );
    t.row(
        "  CPU s per run, fetcher B",
        list(&blob.fetcher_cpu, 2, "s"),
        "",
        "",
    );
    t.row(
        "  CPU outside nodes+bench (incl. writeback), worst",
        format!("{:.0}%", blob.max_other_share * 100.0),
        "",
        "",
    );
    t.row(
        "plain TCP file->file (fsync)",
        format!("{file:.0} MB/s"),
        "",
        "",
    );
    t.row("  runs", list(&blob.tcp_file, 0, "MB/s"), "", "");
    t.row(
        "plain TCP memory->memory (context)",
        format!("{mem:.0} MB/s"),
        "",
        "",
    );
    t.row("  runs", list(&blob.tcp_mem, 0, "MB/s"), "", "");
    let ratio = node / file;
    t.row(
        "ratio agentmesh / plain TCP file",
        format!("{ratio:.2}x"),
        format!(">= {TARGET_BLOB_RATIO:.2}x"),
        verdict(ratio >= TARGET_BLOB_RATIO),
    );
    t.row(
        "ratio agentmesh / plain TCP memory",
        format!("{:.2}x", node / mem),
        "",
        "",
    );
}

fn report_gossip(t: &mut Table, g: &GossipResult) {
    let m = &g.main;
    t.section(&format!(
        "Gossip latency, {} nodes, {} messages {} ms apart, HTTP publish -> WebSocket event",
        g.nodes,
        m.messages,
        m.gap.as_millis()
    ));
    let p99 = percentile(&m.latencies_ms, 99.0);
    t.row(
        "p50",
        format!("{:.2} ms", percentile(&m.latencies_ms, 50.0)),
        "",
        "",
    );
    t.row(
        "p99",
        format!("{p99:.2} ms"),
        format!("< {TARGET_GOSSIP_P99_MS:.0} ms"),
        verdict(p99 < TARGET_GOSSIP_P99_MS),
    );
    t.row(
        "max",
        format!(
            "{:.2} ms",
            m.latencies_ms.last().copied().unwrap_or(f64::NAN)
        ),
        "",
        "",
    );
    let got = m.latencies_ms.len();
    t.row(
        "deliveries received / expected",
        format!("{got} / {}", m.expected),
        "all",
        verdict(got == m.expected),
    );
    t.row(
        "duplicates, lagged events",
        format!("{}, {}", m.duplicates, m.lagged),
        "",
        "",
    );
    t.row(
        "publish HTTP call p50 / p99 (part of the above)",
        format!(
            "{:.2} / {:.2} ms",
            percentile(&m.publish_ms, 50.0),
            percentile(&m.publish_ms, 99.0)
        ),
        "",
        "",
    );
    t.row(
        "CPU idle mesh: nodes / bench / other",
        g.cpu_idle.describe(),
        "",
        "",
    );
    t.row(
        "CPU publishing: nodes / bench / other",
        m.cpu.describe(),
        "",
        "",
    );
    // What the messages cost the nodes, above the mesh's background load.
    let idle_rate = g.cpu_idle.nodes / g.cpu_idle.wall;
    let extra = m.cpu.nodes - idle_rate * m.cpu.wall;
    t.row(
        "node CPU per delivery (above idle)",
        format!("{:.0} us", extra / got.max(1) as f64 * 1e6),
        "",
        "",
    );
    let slow = &g.slow;
    t.row(
        &format!(
            "context: {} msgs {} ms apart, p50 / p99",
            slow.messages,
            slow.gap.as_millis()
        ),
        format!(
            "{:.2} / {:.2} ms",
            percentile(&slow.latencies_ms, 50.0),
            percentile(&slow.latencies_ms, 99.0)
        ),
        "",
        "",
    );
    t.row(
        "  its deliveries, CPU nodes / bench / other",
        format!(
            "{}/{}, {}",
            slow.latencies_ms.len(),
            slow.expected,
            slow.cpu.describe()
        ),
        "",
        "",
    );
    t.row(
        "chain -> full mesh (context)",
        format!("{:.1} s", g.mesh_secs),
        "",
        "",
    );
    t.row(
        "max node RSS after run (context)",
        format!("{:.1} MiB", g.max_rss),
        "",
        "",
    );
}

fn report_memory(t: &mut Table, idle: &IdleResult, blob: Option<&BlobResult>) {
    t.section("Memory (VmRSS from /proc/PID/status, MiB = 2^20 B)");
    let max = idle.rss.last().copied().unwrap_or(f64::NAN);
    t.row(
        &format!(
            "idle node, 3-node mesh, {} s idle: max",
            IDLE_PERIOD.as_secs()
        ),
        format!("{max:.1} MiB"),
        format!("< {TARGET_IDLE_RSS_MIB:.0} MiB"),
        verdict(max < TARGET_IDLE_RSS_MIB),
    );
    t.row("  median", format!("{:.1} MiB", median(&idle.rss)), "", "");
    let Some(blob) = blob else { return };
    t.row(
        "fetcher after blob benchmark (context)",
        format!("{:.1} MiB", blob.fetcher_rss),
        "",
        "",
    );
    t.row(
        "  its peak (VmHWM)",
        format!("{:.1} MiB", blob.fetcher_hwm),
        "",
        "",
    );
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}

fn list(values: &[f64], decimals: usize, unit: &str) -> String {
    let parts: Vec<String> = values.iter().map(|v| format!("{v:.decimals$}")).collect();
    format!("{} {unit}", parts.join(", "))
}

/// A plain-text table: section titles, and rows of metric, value, target, verdict.
#[derive(Default)]
struct Table {
    lines: Vec<Line>,
}

enum Line {
    Title(String),
    Row([String; 4]),
}

impl Table {
    fn section(&mut self, title: &str) {
        self.lines.push(Line::Title(title.to_string()));
    }

    fn row(&mut self, metric: &str, value: String, target: impl Into<String>, verdict: &str) {
        self.lines.push(Line::Row([
            metric.to_string(),
            value,
            target.into(),
            verdict.to_string(),
        ]));
    }

    fn render(&self) -> String {
        let head = ["metric", "value", "target", "verdict"].map(String::from);
        let mut width = [0usize; 4];
        for cells in std::iter::once(&head).chain(self.lines.iter().filter_map(|l| match l {
            Line::Row(c) => Some(c),
            Line::Title(_) => None,
        })) {
            for (w, c) in width.iter_mut().zip(cells) {
                *w = (*w).max(c.chars().count());
            }
        }
        let rule = "-".repeat(width.iter().sum::<usize>() + 6);
        let fmt = |c: &[String; 4]| {
            let [w0, w1, w2, _] = width;
            format!("{:<w0$}  {:>w1$}  {:<w2$}  {}", c[0], c[1], c[2], c[3])
                .trim_end()
                .to_string()
        };
        let mut out = vec![fmt(&head)];
        for line in &self.lines {
            match line {
                Line::Title(t) => {
                    out.push(rule.clone());
                    out.push(t.clone());
                }
                Line::Row(c) => out.push(fmt(c)),
            }
        }
        out.join("\n")
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
