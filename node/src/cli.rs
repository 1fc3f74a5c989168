//! Command-line interface: `agentmesh start` runs a node; every other command is a
//! client of a node's HTTP API.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// agentmesh: a decentralized node for agents and federated learning.
#[derive(Debug, Parser)]
#[command(name = "agentmesh", version, about, propagate_version = true)]
pub struct Cli {
    /// Log output format (logs go to stderr; filter with RUST_LOG).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "AGENTMESH_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Top-level commands.
#[allow(missing_docs)] // flattened client options carry no doc of their own
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node in the foreground.
    Start(Box<StartArgs>),
    /// Show this node's identity, addresses and connections.
    Status(ClientArgs),
    /// Exit 0 if the node is alive (with --ready: in a cluster with a known leader), else 1.
    /// For container health checks.
    Health {
        /// Check readiness (`/readyz`) instead of liveness (`/healthz`).
        #[arg(long)]
        ready: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List every known peer, connected or not.
    Peers(ClientArgs),
    /// Publish a message on a gossip topic.
    Publish {
        /// Topic name.
        topic: String,
        /// Message text.
        message: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Print every message published on a topic until interrupted.
    Subscribe {
        /// Topic name.
        topic: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Content-addressed blobs.
    Blob {
        #[command(subcommand)]
        command: BlobCommand,
    },
    /// Show the cluster: leader, term, voters, learners and every member's state.
    Cluster(ClientArgs),
    /// Issue a single-use join token (printed alone on the last line).
    Token {
        /// How long the token stays valid, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: std::time::Duration,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Replicated, versioned configuration (linearizable).
    Kv {
        #[command(subcommand)]
        command: KvCommand,
    },
    /// Remove a member (by peer id, node id or name): the others stop serving it at once,
    /// and it needs a new join token to come back. Needs an admin key.
    Remove {
        /// The member's peer id, node id or name.
        member: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Rename this node everywhere in the cluster.
    Rename {
        /// New name.
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// API keys with roles: admin (membership, tokens, keys, audit), operator (jobs, kv,
    /// blobs, publish) and viewer (read only). Needs an admin key.
    Apikey {
        #[command(subcommand)]
        command: ApikeyCommand,
    },
    /// Sealing keys: the X25519 keys model updates are sealed with, one per member. Needs an
    /// admin key.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The audit log: membership changes, tokens, API keys, jobs submitted and cancelled,
    /// refused requests; who, what, when. Needs an admin key.
    Audit {
        /// Only entries from this long ago on (e.g. 15m, 2h, 7d), or from this unix time
        /// in seconds.
        #[arg(long, value_parser = parse_since)]
        since: Option<u64>,
        /// Show at most this many entries (the newest).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Federated training jobs: submit, follow, list, cancel, verify.
    Job {
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Models trained by jobs.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Start a local cluster with the bundled digits data split across it, one node
    /// Byzantine, and train a Krum and a FedAvg model side by side.
    Demo(DemoArgs),
    /// Score a model file on a CSV (offline): loss and accuracy.
    Evaluate(EvaluateArgs),
    /// Data sets (offline, no node needed).
    Dataset {
        #[command(subcommand)]
        command: DatasetCommand,
    },
    /// Aggregate update files with a (robust) rule, offline: for audits and for comparing
    /// with other frameworks. Rejects wrong-length or non-finite updates with the reason.
    Aggregate(AggregateArgs),
    /// Run federated training in-process on the bundled digits set and print the results
    /// table: centralized, per aggregator clean and under attack, and with differential privacy.
    Simulate(SimulateArgs),
}

/// `agentmesh job ...`
#[allow(missing_docs)] // flattened client options carry no doc of their own
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Submit a training job (a JSON file with --spec, and/or flags that set its fields).
    Submit(Box<SubmitArgs>),
    /// Show a job; --follow shows a progress bar per round until it ends.
    Status {
        /// Job id.
        id: String,
        /// Keep watching until the job ends (with --json: one object per change).
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List jobs.
    List(ClientArgs),
    /// Cancel a running job.
    Cancel {
        /// Job id.
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Recompute committed rounds from the signed update blobs and compare model hashes.
    Verify {
        /// Job id.
        id: String,
        /// Only this round.
        #[arg(long)]
        round: Option<u32>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `agentmesh job submit`: flags override the fields of --spec; without --spec the job
/// starts from a softmax model on 64 features and 10 classes (the bundled digits set).
#[derive(Debug, Args)]
pub struct SubmitArgs {
    /// JSON job file (the format in interface.md).
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// `softmax` or `mlp`.
    #[arg(long)]
    pub model: Option<String>,
    /// Hidden layer widths for an MLP, e.g. 64 or 128,64.
    #[arg(long, value_delimiter = ',')]
    pub hidden: Vec<usize>,
    /// Features per example.
    #[arg(long)]
    pub features: Option<usize>,
    /// Classes.
    #[arg(long)]
    pub classes: Option<usize>,
    /// Rounds.
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Local epochs per round.
    #[arg(long)]
    pub local_epochs: Option<usize>,
    /// Local minibatch size.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Local learning rate.
    #[arg(long)]
    pub learning_rate: Option<f32>,
    /// Local momentum.
    #[arg(long)]
    pub momentum: Option<f32>,
    /// fedavg, krum, multikrum, trimmed_mean, median or bulyan.
    #[arg(long)]
    pub aggregator: Option<String>,
    /// f: faulty participants to tolerate.
    #[arg(long)]
    pub byzantine: Option<usize>,
    /// β for trimmed_mean.
    #[arg(long)]
    pub trim_ratio: Option<f64>,
    /// none, or nnm: mix each update with its n - f nearest (f = --byzantine) before the
    /// aggregator.
    #[arg(long)]
    pub mixing: Option<String>,
    /// Fewest valid updates a round needs.
    #[arg(long)]
    pub min_participants: Option<usize>,
    /// Seconds a round waits for updates.
    #[arg(long)]
    pub round_timeout_secs: Option<u64>,
    /// Differential privacy: clip every update to this L2 norm.
    #[arg(long)]
    pub clip_norm: Option<f64>,
    /// Differential privacy: noise multiplier z (needs --clip-norm).
    #[arg(long)]
    pub noise_multiplier: Option<f64>,
    /// Differential privacy: δ [default: 1e-5].
    #[arg(long)]
    pub delta: Option<f64>,
    /// Differential privacy: stop before ε would exceed this.
    #[arg(long)]
    pub max_epsilon: Option<f64>,
    /// Start from this model blob (sha256 of a safetensors file).
    #[arg(long)]
    pub initial_model: Option<String>,
    /// Then follow it like `job status --follow`.
    #[arg(long)]
    pub follow: bool,
    /// Connection options.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `agentmesh model ...`
#[allow(missing_docs)] // flattened client options carry no doc of their own
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Write a job's current model (or a model by hash) as safetensors.
    Get {
        /// Job id or model hash.
        key: String,
        /// Output file.
        out: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `agentmesh demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Nodes to start (3 to 9).
    #[arg(long, default_value_t = 5)]
    pub nodes: usize,
    /// Rounds per job.
    #[arg(long, default_value_t = 20)]
    pub rounds: u32,
    /// Dirichlet α of the non-IID split (smaller: more skewed).
    #[arg(long, default_value_t = 1.0)]
    pub alpha: f64,
    /// The Byzantine node's attack.
    #[arg(long, default_value = "sign-flip")]
    pub attack: String,
    /// Keep the cluster's data dir here instead of a temporary one (kept afterwards).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Print the final results as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `agentmesh evaluate`
#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// Model file (safetensors, as `model get` writes).
    #[arg(long)]
    pub model: PathBuf,
    /// CSV to score on (features, label last).
    #[arg(long)]
    pub csv: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `agentmesh dataset ...`
#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Split a data set into per-node shards (IID, or non-IID by label with --alpha) and a
    /// test set: OUT/shard-0.csv ... OUT/shard-{N-1}.csv and OUT/test.csv.
    Split(SplitArgs),
}

/// `agentmesh dataset split`
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["dataset", "csv"]))]
pub struct SplitArgs {
    /// A bundled data set: `digits` (UCI optical digits, 1,797 x 64, 10 classes).
    #[arg(long)]
    pub dataset: Option<String>,
    /// A CSV file: feature columns, the integer label last.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Number of shards (nodes).
    #[arg(long)]
    pub nodes: usize,
    /// Dirichlet alpha of the label skew (smaller: more skewed); IID when not given.
    #[arg(long)]
    pub alpha: Option<f64>,
    /// Fraction held out as the test set.
    #[arg(long, default_value_t = 0.2)]
    pub test_fraction: f64,
    /// Seed of the split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `agentmesh aggregate`
#[derive(Debug, Args)]
pub struct AggregateArgs {
    /// fedavg, krum, multikrum, trimmed_mean, median or bulyan.
    #[arg(long)]
    pub method: String,
    /// Byzantine updates to tolerate (Krum, Multi-Krum, Bulyan, and --mixing nnm).
    #[arg(short = 'f', default_value_t = 0)]
    pub f: usize,
    /// Updates Multi-Krum averages [default: n - f].
    #[arg(short = 'm')]
    pub m: Option<usize>,
    /// Fraction trimmed from each side (trimmed_mean).
    #[arg(long, default_value_t = 0.1)]
    pub beta: f64,
    /// Run on the updates before the rule: none, or nnm (each update replaced by the mean
    /// of the n - f nearest; Allouah et al. 2023).
    #[arg(long, default_value = "none")]
    pub mixing: String,
    /// Example count of each update, for FedAvg's weights: a JSON array or one number per
    /// line, in the order of the updates [default: all 1].
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Where the result goes: .npy or .safetensors (safetensors inputs only).
    #[arg(long)]
    pub out: PathBuf,
    /// Update files: .npy (1-D, f32 or f64) or agentmesh .safetensors updates.
    #[arg(required = true)]
    pub updates: Vec<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `agentmesh simulate`
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Federated clients.
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    /// Rounds per run.
    #[arg(long, default_value_t = 30)]
    pub rounds: usize,
    /// Dirichlet alpha of the label skew across clients.
    #[arg(long, default_value_t = 0.5)]
    pub alpha: f64,
    /// Byzantine clients in the attack columns.
    #[arg(long, default_value_t = 2)]
    pub attackers: usize,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Repeat the robustness runs over this many seeds (from --seed) and add each attack's
    /// mean and worst accuracy loss.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub seeds: u64,
    /// Leave out the differential-privacy runs (the slowest part).
    #[arg(long)]
    pub no_privacy: bool,
    /// The results as one JSON document.
    #[arg(long)]
    pub json: bool,
}

/// `agentmesh kv ...`
#[allow(missing_docs)]
#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Write a key. VALUE is JSON; anything that is not valid JSON is stored as a string.
    Put {
        /// Key: letters, digits and . _ - / :
        key: String,
        /// Value (JSON, or text stored as a JSON string).
        value: String,
        /// Write only if the key's current version is this (0: only if it does not exist).
        #[arg(long)]
        if_version: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Read a key (prints its value; --json adds the version).
    Get {
        /// Key.
        key: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List keys with their versions.
    List {
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a key.
    Delete {
        /// Key.
        key: String,
        /// Delete only if the key's current version is this.
        #[arg(long)]
        if_version: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// Parses `90s`, `30m`, `1h`, `7d` (or plain seconds).
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (use e.g. 90s, 30m, 1h, 7d)"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("unknown unit {unit:?} in {s:?} (use s, m, h or d)")),
    };
    Ok(std::time::Duration::from_secs(secs))
}

/// `--since`: a unix time in seconds, or a duration back from now; as unix milliseconds.
pub fn parse_since(s: &str) -> Result<u64, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?;
    // Bare numbers this large are times, not durations (1e9 s is in 2001).
    if let Ok(n) = s.trim().parse::<u64>() {
        if n >= 1_000_000_000 {
            return Ok(n.saturating_mul(1000));
        }
    }
    let ago = parse_duration(s)?;
    Ok(u64::try_from(now.saturating_sub(ago).as_millis()).unwrap_or(0))
}

/// `agentmesh apikey ...`
#[allow(missing_docs)]
#[derive(Debug, Subcommand)]
pub enum ApikeyCommand {
    /// Create a key; the key is printed once, alone on the last line.
    Create {
        /// admin, operator or viewer.
        #[arg(long)]
        role: String,
        /// A label for people.
        #[arg(long, default_value = "")]
        name: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List keys (never the keys themselves).
    List(ClientArgs),
    /// Revoke a key by id; every node refuses it from then on.
    Revoke {
        /// The key's id (the part between `amk_` and the dot).
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// `agentmesh keys ...`
#[allow(missing_docs)]
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Give the node addressed a new sealing key and publish it. Its older keys stay, so
    /// updates already sealed for them still open: training does not stop.
    Rotate(ClientArgs),
    /// Every member's published sealing keys (the current one last).
    List(ClientArgs),
}

/// `agentmesh blob ...`
#[allow(missing_docs)]
#[derive(Debug, Subcommand)]
pub enum BlobCommand {
    /// Store a file in the mesh; prints its SHA-256.
    Put {
        /// File to store.
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Fetch a blob by SHA-256 (from the mesh if the node lacks it) into OUT.
    Get {
        /// SHA-256 of the blob, 64 hex digits.
        hash: String,
        /// Where to write it.
        out: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List the blobs this node holds.
    List(ClientArgs),
}

/// Options of every client command.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// The node's API address.
    #[arg(long, env = "AGENTMESH_API", default_value = crate::config::DEFAULT_API)]
    pub api: String,
    /// API key, sent as a bearer token.
    #[arg(long, env = "AGENTMESH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// File holding the API key, used when --api-key is not given (the same variable a
    /// node reads its admin key from, so commands run beside a node just work).
    #[arg(long, env = "AGENTMESH_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Machine-readable output: one JSON document (or one object per line for streams).
    #[arg(long)]
    pub json: bool,
}

/// `agentmesh start`: every flag has an `AGENTMESH_<FLAG>` env twin and a key in the
/// config file. Precedence: flag > env > file > default.
#[derive(Debug, Clone, Parser)]
pub struct StartArgs {
    /// TOML config file (keys as the flags, with underscores).
    #[arg(long, env = "AGENTMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory [default: ./agentmesh-data].
    #[arg(long, env = "AGENTMESH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Node name [default: host name].
    #[arg(long, env = "AGENTMESH_NAME")]
    pub name: Option<String>,
    /// libp2p listen address, repeatable [default: TCP and QUIC on 4001].
    #[arg(long, env = "AGENTMESH_LISTEN", value_delimiter = ',')]
    pub listen: Vec<String>,
    /// HTTP API address [default: 127.0.0.1:7070].
    #[arg(long, env = "AGENTMESH_API")]
    pub api: Option<String>,
    /// Multiaddr of a node to join through, repeatable.
    #[arg(long, env = "AGENTMESH_BOOTSTRAP", value_delimiter = ',')]
    pub bootstrap: Vec<String>,
    /// File holding the admin API key (required if --api is not loopback).
    #[arg(long, env = "AGENTMESH_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Requests per second each API key may make, with bursts of twice as many; beyond it
    /// the API answers 429 with Retry-After (0 = no limit) [default: 50].
    #[arg(long, env = "AGENTMESH_API_RATE_LIMIT")]
    pub api_rate_limit: Option<u32>,
    /// Cap on the bytes per second this node serves to blob fetchers (0 = no cap).
    #[arg(long, env = "AGENTMESH_BLOB_SERVE_BYTES_PER_SEC")]
    pub blob_serve_bytes_per_sec: Option<u64>,
    /// Join an existing cluster with this single-use token (from `agentmesh token`).
    #[arg(long, env = "AGENTMESH_JOIN", hide_env_values = true)]
    pub join: Option<String>,
    /// File holding the shared cluster key: nodes holding it join without a token, and
    /// found a cluster together with --bootstrap-expect.
    #[arg(long, env = "AGENTMESH_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,
    /// Wait until this many nodes holding the cluster key see each other, then found one
    /// cluster with them as voters (needs --cluster-key-file).
    #[arg(long, env = "AGENTMESH_BOOTSTRAP_EXPECT")]
    pub bootstrap_expect: Option<usize>,
    /// This node's private training data: CSV, features then an integer label last.
    #[arg(long, env = "AGENTMESH_DATA")]
    pub data: Option<PathBuf>,
    /// Held-out CSV this node scores new global models on when it aggregates a round.
    #[arg(long, env = "AGENTMESH_EVAL_DATA")]
    pub eval_data: Option<PathBuf>,
    /// Train with this program instead of the built-in trainer (e.g. "python3 train.py");
    /// see docs/TRAINING.md for the file protocol. Needs --data.
    #[arg(long, env = "AGENTMESH_TRAINER_CMD")]
    pub trainer_cmd: Option<String>,
    /// TESTING ONLY: send malicious updates (sign-flip, scale, gaussian, alie, ipm, nan, tamper) to
    /// exercise robust aggregation. Never set this on a real deployment.
    #[arg(long, env = "AGENTMESH_BYZANTINE")]
    pub byzantine: Option<String>,
    /// Raft leader heartbeat interval in milliseconds [default: 100].
    #[arg(long, env = "AGENTMESH_RAFT_HEARTBEAT_MS")]
    pub raft_heartbeat_ms: Option<u64>,
    /// Raft election timeout in milliseconds; elections start after a random time
    /// between this and twice this [default: 1000].
    #[arg(long, env = "AGENTMESH_RAFT_ELECTION_TIMEOUT_MS")]
    pub raft_election_timeout_ms: Option<u64>,
    /// Seconds a voter may be unreachable before the leader replaces it [default: 30].
    #[arg(long, env = "AGENTMESH_RAFT_UNREACHABLE_SECS")]
    pub raft_unreachable_secs: Option<u64>,
    /// Snapshot and compact the Raft log after this many entries [default: 10000].
    #[arg(long, env = "AGENTMESH_RAFT_SNAPSHOT_AFTER")]
    pub raft_snapshot_after: Option<u64>,
    /// Voters to keep (odd) [default: 3, or 5 from 5 members on].
    #[arg(long, env = "AGENTMESH_RAFT_VOTERS")]
    pub raft_voters: Option<usize>,
}
