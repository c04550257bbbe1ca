//! The cellplane SDK for service teams: a typed async client for workloads (containers and VMs,
//! replicated or stateful). Connection and calls arrive with the transport; the model the SDK
//! speaks is already here, re-exported so that service teams depend on one crate.
#![deny(missing_docs)]

pub use cellplane_api as model;
