//! cellplane's benchmarks. Each one prints its figures beside a ceiling measured in the same run
//! (the raw engine, the raw library), so a figure is never read without knowing what the machine
//! could do at best. Benchmarks measure; tests assert. Run them in release:
//!
//! ```text
//! cargo run --release -p cellplane-perf --bin bench-storage
//! cargo run --release -p cellplane-perf --bin bench-wire
//! cargo run --release -p cellplane-perf --bin bench-cell
//! cargo build --release -p cellplane && cargo run --release -p cellplane-perf --bin bench-fleet
//! cargo build --release -p cellplane && cargo run --release -p cellplane-perf --bin bench-router
//! ```
#![deny(missing_docs)]

use std::time::{Duration, Instant};

/// Runs `f` `n` times and returns the mean time per call.
pub fn per_call(n: u32, mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..n {
        f();
    }
    start.elapsed() / n.max(1)
}

/// Operations per second for `count` operations in `elapsed`.
pub fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// Prints one figure, aligned, and returns it for a JSON summary.
pub fn report(name: &str, value: f64, unit: &str) -> (String, f64) {
    println!("{name:<58} {value:>14.1} {unit}");
    (name.to_owned(), value)
}

/// The benchmarks run on the allocator the `cellplane` binary ships with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
