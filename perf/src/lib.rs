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
//! cargo build --release -p cellplane && cargo run --release -p cellplane-perf --bin bench-region
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

/// The `cellplane` binary next to the running benchmark's (build it first).
pub fn binary() -> std::path::PathBuf {
    let me = std::env::current_exe().expect("own path");
    let path = me.with_file_name("cellplane");
    assert!(path.exists(), "build it first: cargo build --release -p cellplane");
    path
}

/// User + system CPU seconds of a process so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0 // utime, stime in clock ticks (100 per second)
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Cores the processes `pids` used together over `window`.
pub async fn cores(pids: &[u32], window: Duration) -> f64 {
    let total = || pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let before = total();
    tokio::time::sleep(window).await;
    (total() - before) / window.as_secs_f64()
}

/// The benchmarks run on the allocator the `cellplane` binary ships with.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
