//! The region router: the one shared layer of a region. It assigns tenants to cells, routes every
//! call to the cell that holds the object, spills over when a cell is full and drains cells.
//!
//! It stays small and horizontally scalable: its state lives in storage, any replica serves any
//! call, and it reads cell summaries, never cell internals. Routing arrives with its issue; this
//! crate owns the router's vocabulary today.
#![deny(missing_docs)]

pub mod core;

use cellplane_api::{CellId, TenantId};

/// Where a tenant's calls go: its home cell. Overflow placements are recorded per workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectoryEntry {
    /// The tenant.
    pub tenant: TenantId,
    /// The cell that holds its workloads unless a workload overflowed elsewhere.
    pub home_cell: CellId,
}
