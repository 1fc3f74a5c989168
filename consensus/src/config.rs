//! Cluster tuning: timeouts, snapshots and how many voters the leader keeps.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A cluster configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid raft config: {0}")]
pub struct ConfigError(String);

/// Cluster tuning. Every field has a default; `validate` says what does not fit together.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Leader heartbeat interval, milliseconds.
    pub heartbeat_ms: u64,
    /// A follower that hears nothing for a random time in `[election_timeout_min_ms,
    /// election_timeout_max_ms]` starts an election.
    pub election_timeout_min_ms: u64,
    /// See `election_timeout_min_ms`.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and compact the log) after this many entries since the last one.
    pub snapshot_after_entries: u64,
    /// Entries kept in the log behind a snapshot, so slightly lagging followers catch up from
    /// the log rather than a snapshot.
    pub keep_entries: u64,
    /// Voters the leader keeps. `None`: 3, or 5 once there are at least 5 members. Always
    /// capped at the largest odd number not above the member count.
    pub voters: Option<usize>,
    /// A voter unreachable this long (seconds) is replaced by a healthy learner.
    pub unreachable_secs: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            snapshot_after_entries: 10_000,
            keep_entries: 1_000,
            voters: None,
            unreachable_secs: 30,
        }
    }
}

impl ClusterConfig {
    /// Checks that the values fit together.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_ms == 0 {
            return Err(ConfigError("heartbeat_ms must be positive".into()));
        }
        if self.election_timeout_min_ms < 3 * self.heartbeat_ms {
            return Err(ConfigError(format!(
                "election_timeout_min_ms ({}) must be at least 3 heartbeats ({} ms)",
                self.election_timeout_min_ms,
                3 * self.heartbeat_ms
            )));
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return Err(ConfigError(
                "election_timeout_max_ms must be above election_timeout_min_ms".into(),
            ));
        }
        if self.snapshot_after_entries == 0 {
            return Err(ConfigError(
                "snapshot_after_entries must be positive".into(),
            ));
        }
        if let Some(v) = self.voters {
            if v == 0 || v % 2 == 0 {
                return Err(ConfigError(format!(
                    "voters must be odd and positive, not {v}"
                )));
            }
        }
        if self.unreachable_secs == 0 {
            return Err(ConfigError("unreachable_secs must be positive".into()));
        }
        Ok(())
    }

    /// How many voters to keep with `members` active members.
    pub fn voter_target(&self, members: usize) -> usize {
        let wanted = self.voters.unwrap_or(if members >= 5 { 5 } else { 3 });
        let cap = if members % 2 == 1 {
            members
        } else {
            members.saturating_sub(1)
        };
        wanted.min(cap).max(1)
    }

    /// How long a voter may be unreachable before it is replaced.
    pub fn unreachable_after(&self) -> Duration {
        Duration::from_secs(self.unreachable_secs)
    }

    pub(crate) fn to_openraft(&self) -> Result<openraft::Config, ConfigError> {
        let config = openraft::Config {
            cluster_name: "agentmesh".into(),
            heartbeat_interval: self.heartbeat_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            install_snapshot_timeout: 10_000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(self.snapshot_after_entries),
            max_in_snapshot_log_to_keep: self.keep_entries,
            // Bounds one AppendEntries RPC: 64 entries of at most 64 KiB each.
            max_payload_entries: 64,
            snapshot_max_chunk_size: 1024 * 1024,
            ..Default::default()
        };
        config.validate().map_err(|e| ConfigError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voter_targets() {
        let c = ClusterConfig::default();
        let targets: Vec<usize> = (1..=7).map(|n| c.voter_target(n)).collect();
        assert_eq!(targets, [1, 1, 3, 3, 5, 5, 5]);
        let fixed = ClusterConfig {
            voters: Some(3),
            ..c
        };
        assert_eq!(fixed.voter_target(9), 3);
    }

    #[test]
    fn bad_configs_are_refused() {
        let ok = ClusterConfig::default();
        ok.validate().unwrap();
        ok.to_openraft().unwrap();
        for bad in [
            ClusterConfig {
                heartbeat_ms: 0,
                ..ok.clone()
            },
            ClusterConfig {
                election_timeout_min_ms: 200,
                ..ok.clone()
            },
            ClusterConfig {
                election_timeout_max_ms: 1000,
                ..ok.clone()
            },
            ClusterConfig {
                voters: Some(4),
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
