//! cellplane's shared ground: the domain model and the wire format.
//!
//! Every other crate speaks in these types. Constructors validate ("parse, don't validate"): a
//! value of a model type that came through [`Name::new`], [`Workload::new`], serde or
//! [`wire::decode`] has passed every rule below, and each violation is a [`ModelError`] naming
//! the field, the value and the rule.
//!
//! * [`name`]: DNS-label names and the typed ids built on them.
//! * [`model`]: sites, cells, hosts, tenants, workloads (containers and VMs alike), replicas.
//! * [`wire`]: the versioned, size-capped, checked rkyv envelope around every message.
//!
//! This crate does no IO and owns no clock: it is safe to use from pure cores.
#![deny(missing_docs)]

pub mod error;
pub mod model;
pub mod name;
pub mod wire;

pub use error::ModelError;
pub use model::*;
pub use name::{CellId, Name, SiteId, TenantId, WorkloadName};
