//! A cell's configuration: what `cellplane cell --config FILE` reads (TOML), with defaults for
//! everything but the cell's name.

use std::net::SocketAddr;

use cellplane_api::CellId;
use serde::Deserialize;

use crate::core::membership::LeaseConfig;
use crate::workloads::Limits;

/// How a cell runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellConfig {
    /// The cell's name.
    pub cell: CellId,
    /// Where its QUIC endpoint listens.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Most hosts it holds.
    #[serde(default = "default_hosts_max")]
    pub hosts_max: usize,
    /// Hosts per membership shard.
    #[serde(default = "default_shard_hosts")]
    pub shard_hosts: usize,
    /// Lease timing.
    #[serde(default)]
    pub lease: LeaseConfig,
    /// After a start, how long hosts read back from storage have to reconnect before their
    /// leases run: longer than a host agent's longest reconnection backoff (5 s).
    #[serde(default = "default_recovery_grace_ms")]
    pub recovery_grace_ms: u64,
    /// How often leases are checked.
    #[serde(default = "default_tick_ms")]
    pub tick_ms: u64,
    /// Restarts of one child within `restart_window_ms` after which the cell gives up (and the
    /// process exits, for its own supervisor to restart it from storage).
    #[serde(default = "default_restarts_max")]
    pub restarts_max: usize,
    /// The window of `restarts_max`.
    #[serde(default = "default_restart_window_ms")]
    pub restart_window_ms: u64,
    /// Requests admitted at once; more are refused as `Unavailable`.
    #[serde(default = "default_calls_max")]
    pub calls_max: usize,
    /// Limits of the workloads actor.
    #[serde(default, skip)]
    pub limits: Limits,
}

impl CellConfig {
    /// Defaults for cell `cell`.
    pub fn new(cell: CellId) -> Self {
        Self {
            cell,
            listen: default_listen(),
            hosts_max: default_hosts_max(),
            shard_hosts: default_shard_hosts(),
            lease: LeaseConfig::default(),
            recovery_grace_ms: default_recovery_grace_ms(),
            tick_ms: default_tick_ms(),
            restarts_max: default_restarts_max(),
            restart_window_ms: default_restart_window_ms(),
            calls_max: default_calls_max(),
            limits: Limits::default(),
        }
    }

    /// How many membership shards the cell runs.
    pub fn shards(&self) -> usize {
        self.hosts_max.div_ceil(self.shard_hosts.max(1)).max(1)
    }

    /// Most hosts one shard holds: its share with room for an uneven spread of ids.
    pub fn shard_hosts_max(&self) -> usize {
        self.hosts_max.div_ceil(self.shards()) * 2
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7_100))
}
fn default_hosts_max() -> usize {
    100_000
}
fn default_shard_hosts() -> usize {
    1_000
}
fn default_recovery_grace_ms() -> u64 {
    10_000
}
fn default_tick_ms() -> u64 {
    250
}
fn default_restarts_max() -> usize {
    5
}
fn default_restart_window_ms() -> u64 {
    10_000
}
fn default_calls_max() -> usize {
    65_536
}
