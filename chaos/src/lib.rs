//! Chaos and determinism: the tools that let a whole region run on one thread from a seed and
//! replay any failure exactly.
//!
//! That only works if every core is pure, so this crate also owns the mechanical guard:
//! [`purity::impurities`] finds clock reads, randomness, task spawning and IO in a core's source,
//! and `tests/core_purity.rs` runs it over every core module of the workspace. [`process`]
//! holds the real-process pieces that process-level harnesses share.
#![deny(missing_docs)]

pub mod process;
pub mod purity;
