//! Node configuration: one struct, loaded from a TOML file, then environment,
//! then flags (flags win), then validated.

use crate::cli::StartArgs;
use agentmesh_consensus::{ClusterConfig, MAX_BOOTSTRAP_EXPECT};
use libp2p::Multiaddr;
use serde::Deserialize;
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./agentmesh-data";
/// Default API address: loopback only, so no key is needed.
pub const DEFAULT_API: &str = "127.0.0.1:7070";
/// Default listen addresses: TCP and QUIC on port 4001, all interfaces.
pub const DEFAULT_LISTEN: [&str; 2] = ["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/udp/4001/quic-v1"];
/// Default largest blob a node accepts, by upload or fetch: 64 GiB.
pub const DEFAULT_MAX_BLOB_SIZE: u64 = 64 << 30;
/// Requests per second an API key may make by default.
pub const DEFAULT_API_RATE_LIMIT: u32 = 50;
/// Longest node name; names are DNS-label-like so they survive logs and URLs.
pub const MAX_NAME_LEN: usize = 63;

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where identity, peers, blobs and state live.
    pub data_dir: PathBuf,
    /// Human-readable node name, shown in `peers`.
    pub name: String,
    /// libp2p listen addresses.
    pub listen: Vec<Multiaddr>,
    /// HTTP API address.
    pub api: SocketAddr,
    /// Peers to dial at start (and redial until reached).
    pub bootstrap: Vec<Multiaddr>,
    /// File holding the admin API key; required when the API is not on loopback.
    pub api_key_file: Option<PathBuf>,
    /// Requests per second each API key may make (0 = no limit).
    pub api_rate_limit: u32,
    /// Cap on the rate this node serves blob bytes to others (0 = no cap).
    pub blob_serve_bytes_per_sec: u64,
    /// Largest blob accepted by upload or fetch.
    pub max_blob_size: u64,
    /// Join token to enter an existing cluster with.
    pub join: Option<String>,
    /// File holding the shared cluster key.
    pub cluster_key_file: Option<PathBuf>,
    /// Key holders to wait for before founding a cluster together.
    pub bootstrap_expect: Option<usize>,
    /// Private training data (CSV).
    pub data: Option<PathBuf>,
    /// Held-out data to score aggregated models on (CSV).
    pub eval_data: Option<PathBuf>,
    /// External trainer command line.
    pub trainer_cmd: Option<String>,
    /// Red-team mode: the attack this node's updates carry (testing only).
    pub byzantine: Option<crate::jobs::RedTeam>,
    /// Raft tuning.
    pub raft: ClusterConfig,
}

/// Configuration errors, each naming the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        /// File path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The config file is not valid TOML for our keys.
    #[error("invalid config file {path}: {message}")]
    ParseFile {
        /// File path.
        path: PathBuf,
        /// Parser message, with line and column.
        message: String,
    },
    /// A value does not parse.
    #[error("invalid {key} {value:?}: {reason}")]
    Value {
        /// Setting name.
        key: &'static str,
        /// Offending value.
        value: String,
        /// Why.
        reason: String,
    },
    /// A setting combination is refused.
    #[error("{0}")]
    Invalid(String),
}

/// The config file's shape: every key optional, unknown keys refused so a typo
/// is an error rather than a silently ignored setting.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    name: Option<String>,
    listen: Option<Vec<String>>,
    api: Option<String>,
    bootstrap: Option<Vec<String>>,
    api_key_file: Option<PathBuf>,
    api_rate_limit: Option<u32>,
    blob_serve_bytes_per_sec: Option<u64>,
    max_blob_size: Option<u64>,
    join: Option<String>,
    cluster_key_file: Option<PathBuf>,
    bootstrap_expect: Option<usize>,
    data: Option<PathBuf>,
    eval_data: Option<PathBuf>,
    trainer_cmd: Option<String>,
    byzantine: Option<String>,
    raft: Option<ClusterConfig>,
}

impl NodeConfig {
    /// Builds the config from flags and their env twins (already merged by clap)
    /// over the optional config file, over defaults; then validates it.
    pub fn load(args: &StartArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let listen = match (&args.listen, file.listen) {
            (v, _) if !v.is_empty() => v.clone(),
            (_, Some(f)) => f,
            _ => DEFAULT_LISTEN.iter().map(|s| s.to_string()).collect(),
        };
        let bootstrap = match (&args.bootstrap, file.bootstrap) {
            (v, _) if !v.is_empty() => v.clone(),
            (_, Some(f)) => f,
            _ => Vec::new(),
        };
        let api = args
            .api
            .clone()
            .or(file.api)
            .unwrap_or_else(|| DEFAULT_API.to_string());
        let config = Self {
            data_dir: args
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            name: args.name.clone().or(file.name).unwrap_or_else(default_name),
            listen: parse_addrs("listen", &listen)?,
            api: api
                .parse()
                .map_err(|e: std::net::AddrParseError| ConfigError::Value {
                    key: "api",
                    value: api.clone(),
                    reason: format!("{e} (expected HOST:PORT, e.g. 127.0.0.1:7070)"),
                })?,
            bootstrap: parse_addrs("bootstrap", &bootstrap)?,
            api_key_file: args.api_key_file.clone().or(file.api_key_file),
            api_rate_limit: args
                .api_rate_limit
                .or(file.api_rate_limit)
                .unwrap_or(DEFAULT_API_RATE_LIMIT),
            blob_serve_bytes_per_sec: args
                .blob_serve_bytes_per_sec
                .or(file.blob_serve_bytes_per_sec)
                .unwrap_or(0),
            max_blob_size: file.max_blob_size.unwrap_or(DEFAULT_MAX_BLOB_SIZE),
            join: args.join.clone().or(file.join),
            cluster_key_file: args.cluster_key_file.clone().or(file.cluster_key_file),
            bootstrap_expect: args.bootstrap_expect.or(file.bootstrap_expect),
            data: args.data.clone().or(file.data),
            eval_data: args.eval_data.clone().or(file.eval_data),
            trainer_cmd: args.trainer_cmd.clone().or(file.trainer_cmd),
            byzantine: match args.byzantine.clone().or(file.byzantine) {
                Some(name) => Some(name.parse().map_err(|reason| ConfigError::Value {
                    key: "byzantine",
                    value: name.clone(),
                    reason,
                })?),
                None => None,
            },
            raft: raft_config(args, file.raft.unwrap_or_default()),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks the settings make sense together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_name(&self.name)?;
        if self.listen.is_empty() {
            return Err(ConfigError::Invalid(
                "at least one --listen address is required".into(),
            ));
        }
        if !self.api.ip().is_loopback() && self.api_key_file.is_none() {
            return Err(ConfigError::Invalid(format!(
                "the API is bound to {}, which is not loopback: refusing to start without \
                 --api-key-file (the admin key clients must present)",
                self.api
            )));
        }
        self.raft
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if self.data.is_none() && (self.trainer_cmd.is_some() || self.byzantine.is_some()) {
            return Err(ConfigError::Invalid(
                "--trainer-cmd and --byzantine need --data: they change how this node trains"
                    .into(),
            ));
        }
        if let Some(n) = self.bootstrap_expect {
            if self.cluster_key_file.is_none() {
                return Err(ConfigError::Invalid(
                    "--bootstrap-expect needs --cluster-key-file: only nodes sharing a key \
                     found a cluster together"
                        .into(),
                ));
            }
            if n == 0 || n > MAX_BOOTSTRAP_EXPECT {
                return Err(ConfigError::Value {
                    key: "bootstrap-expect",
                    value: n.to_string(),
                    reason: format!("must be 1 to {MAX_BOOTSTRAP_EXPECT}"),
                });
            }
            if self.join.is_some() {
                return Err(ConfigError::Invalid(
                    "--join and --bootstrap-expect exclude each other: a token joins an \
                     existing cluster, --bootstrap-expect founds one"
                        .into(),
                ));
            }
        }
        if self.max_blob_size == 0 {
            return Err(ConfigError::Invalid(
                "max_blob_size must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// The `[raft]` file section with flags (and their env twins) over it.
fn raft_config(args: &StartArgs, mut raft: ClusterConfig) -> ClusterConfig {
    if let Some(v) = args.raft_heartbeat_ms {
        raft.heartbeat_ms = v;
    }
    if let Some(v) = args.raft_election_timeout_ms {
        raft.election_timeout_min_ms = v;
        raft.election_timeout_max_ms = v.saturating_mul(2);
    }
    if let Some(v) = args.raft_unreachable_secs {
        raft.unreachable_secs = v;
    }
    if let Some(v) = args.raft_snapshot_after {
        raft.snapshot_after_entries = v;
    }
    if args.raft_voters.is_some() {
        raft.voters = args.raft_voters;
    }
    raft
}

/// Checks a node name: 1–63 characters of ASCII letters, digits, `.`, `_` or `-`.
pub fn validate_name(name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Value {
            key: "name",
            value: name.to_string(),
            reason: format!(
                "names are 1-{MAX_NAME_LEN} characters of letters, digits, '.', '_' or '-'"
            ),
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

fn parse_addrs(key: &'static str, values: &[String]) -> Result<Vec<Multiaddr>, ConfigError> {
    values
        .iter()
        .map(|v| {
            v.trim()
                .parse::<Multiaddr>()
                .map_err(|e| ConfigError::Value {
                    key,
                    value: v.clone(),
                    reason: format!("{e} (expected a multiaddr such as /ip4/10.0.0.5/tcp/4001)"),
                })
        })
        .collect()
}

/// The host name, sanitised into a valid node name.
fn default_name() -> String {
    let raw = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(MAX_NAME_LEN)
        .collect();
    if clean.is_empty() {
        "agentmesh-node".to_string()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> StartArgs {
        let mut argv = vec!["start"];
        argv.extend_from_slice(extra);
        StartArgs::try_parse_from(argv).unwrap()
    }

    #[test]
    fn defaults_follow_the_interface() {
        let c = NodeConfig::load(&args(&[])).unwrap();
        assert_eq!(c.api.to_string(), DEFAULT_API);
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
    }

    #[test]
    fn flags_beat_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "name = \"from-file\"\napi = \"127.0.0.1:9000\"\n").unwrap();
        let f = file.to_str().unwrap();
        let c = NodeConfig::load(&args(&["--config", f, "--name", "from-flag"])).unwrap();
        assert_eq!(c.name, "from-flag");
        assert_eq!(c.api.port(), 9000);
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "nmae = \"typo\"\n").unwrap();
        let err = NodeConfig::load(&args(&["--config", file.to_str().unwrap()])).unwrap_err();
        assert!(err.to_string().contains("unknown field `nmae`"), "{err}");
    }

    #[test]
    fn public_api_needs_a_key() {
        let err = NodeConfig::load(&args(&["--api", "0.0.0.0:7070"])).unwrap_err();
        assert!(err.to_string().contains("--api-key-file"), "{err}");
        NodeConfig::load(&args(&["--api", "0.0.0.0:7070", "--api-key-file", "k"])).unwrap();
    }

    #[test]
    fn malformed_values_name_the_setting() {
        let err = NodeConfig::load(&args(&["--bootstrap", "/ip4/nope"])).unwrap_err();
        assert!(err.to_string().starts_with("invalid bootstrap"), "{err}");
        let err = NodeConfig::load(&args(&["--api", "localhost"])).unwrap_err();
        assert!(err.to_string().starts_with("invalid api"), "{err}");
        let err = NodeConfig::load(&args(&["--name", "has space"])).unwrap_err();
        assert!(err.to_string().starts_with("invalid name"), "{err}");
    }
}
