//! The router's pure cores: no clock, randomness or IO (the purity test checks).

pub mod placement;
pub mod ratelimit;
