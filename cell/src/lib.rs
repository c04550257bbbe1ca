//! A cell: an independent slice of a region, about 100,000 hosts, its tenants' workloads and its
//! own keyspace. Cells share nothing; a failing cell harms only its own tenants.
//!
//! Pure, deterministic cores in [`core`]: fencing by [`Epoch`]; [`core::membership`]
//! (registration, heartbeats, leases, draining); [`core::scheduler`] (a capacity index that
//! places replicas without scanning every host and never over-commits one);
//! [`core::controller`] (replicated and stateful workloads, rolling updates, VM power — one
//! code path for containers and VMs).
//!
//! Thin shells around them: a ractor tree ([`supervisor`]) of a [`workloads`] actor (scheduler
//! and controllers) and membership [`shard`]s, persisted through the group committer
//! ([`records`] is the layout) and reached through the [`gateway`]. [`incarnation`] bumps the
//! cell's epoch in storage on every start.
#![deny(missing_docs)]

pub mod config;
pub mod core;
pub mod gateway;
pub mod incarnation;
pub mod records;
pub mod shard;
pub mod supervisor;
pub mod workloads;

pub use crate::config::CellConfig;
pub use crate::core::fencing::Epoch;
pub use crate::gateway::Gateway;
pub use crate::supervisor::RunningCell;

/// Why a cell could not run.
#[derive(Debug, thiserror::Error)]
pub enum CellError {
    /// Its actors could not start (storage unreadable, or a corrupt record).
    #[error("the cell could not start: {0}")]
    Start(String),
}
