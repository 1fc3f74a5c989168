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
    Start(StartArgs),
    /// Show this node's identity, addresses and connections.
    Status(ClientArgs),
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
    /// Cap on the bytes per second this node serves to blob fetchers (0 = no cap).
    #[arg(long, env = "AGENTMESH_BLOB_SERVE_BYTES_PER_SEC")]
    pub blob_serve_bytes_per_sec: Option<u64>,
}
