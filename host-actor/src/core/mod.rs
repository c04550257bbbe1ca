//! The pure host core: no clock, randomness, IO or tasks (the purity test checks).

pub mod host;
