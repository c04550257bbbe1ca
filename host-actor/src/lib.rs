//! The host actor: the agent on every host. It registers with its cell, keeps its lease, runs
//! what it is assigned through a runtime driver and reports back; when its cell is unreachable it
//! keeps every workload running and reconciles on return.
//!
//! The same pure host core serves one real host per process and simulated fleets of tens of
//! thousands of hosts in one process: [`core::host::HostCore`] is that logic, pure; the
//! [`driver`]s run what it decides.
#![deny(missing_docs)]

pub mod agent;
pub mod core;
pub mod detect;
pub mod driver;
pub mod fleet;

use serde::{Deserialize, Serialize};

/// The runtime drivers a host can offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverKind {
    /// No real work: for scale and chaos tests.
    Sim,
    /// A plain OS process.
    Process,
    /// An OCI container through runc or crun.
    Container,
    /// A VM through qemu (KVM where it works, software emulation elsewhere).
    Vm,
}
