//! A cell: an independent slice of a region, about 100,000 hosts, its tenants' workloads and its
//! own keyspace. Cells share nothing; a failing cell harms only its own tenants.
//!
//! The cell is a tree of supervised ractor actors around pure, deterministic cores (membership,
//! scheduler, controllers). This crate starts with the one rule every other part leans on:
//! fencing by [`Epoch`].
#![deny(missing_docs)]

pub mod core;

pub use crate::core::fencing::Epoch;
