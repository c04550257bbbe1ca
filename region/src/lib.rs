//! The region router: the one shared layer of a region. It assigns tenants to cells, routes every
//! call to the cell that holds the object and spills over when a cell is full.
//!
//! It stays small and horizontally scalable: its state lives in storage, any replica serves any
//! call, and it reads cell summaries, never cell internals. [`core`] holds its pure decisions
//! (placement with explanations, rate limiting); [`router`] is the runtime around them.
#![deny(missing_docs)]

pub mod core;
pub mod router;

pub use router::{Router, RouterConfig};
