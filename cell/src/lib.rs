//! A cell: an independent slice of a region, about 100,000 hosts, its tenants' workloads and its
//! own keyspace. Cells share nothing; a failing cell harms only its own tenants.
//!
//! The cell is a tree of supervised ractor actors around pure, deterministic cores (membership,
//! scheduler, controllers). Built so far, as pure cores in [`core`]: fencing by [`Epoch`], the
//! rule every other part leans on, and [`core::membership`]: registration, heartbeats with
//! duplicate and reorder protection, leases (ready → suspect → down), draining; and
//! [`core::scheduler`]: a capacity index that places replicas (filters, bin-packing or spreading
//! over hosts and zones, anti-affinity) without scanning every host and never over-commits one;
//! and [`core::controller`]: replicated and stateful workloads (ordered start, stable ordinals),
//! replacement of failed replicas and of those on down hosts, stale reports fenced by epoch, VM
//! power as desired state — one code path for containers and VMs. [`incarnation`] bumps the
//! cell's epoch in storage on every start.
#![deny(missing_docs)]

pub mod core;
pub mod incarnation;

pub use crate::core::fencing::Epoch;
