//! The cell's pure cores: no clock, randomness or IO (checked by `chaos/tests/core_purity.rs`).

pub mod controller;
pub mod fencing;
pub mod membership;
pub mod scheduler;
