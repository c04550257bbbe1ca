//! Storage: single-write commits/s, writes/s in 1,000-write transactions and group commit with 64
//! concurrent writers, beside the raw engine (redb, fsync on every commit) in the same run and on
//! the same disk.
//!
//! Goals (issue 3): group commit reaches at least 70% of the raw engine's batched write rate; a
//! single-writer commit costs less than 1.5x a raw engine commit.

use std::time::{Duration, Instant};

use cellplane_perf::{rate, report};
use cellplane_storage::Database;
use cellplane_storage::group::{GroupCommitter, GroupOptions, Write};
use redb::TableDefinition;

const RAW: TableDefinition<&[u8], &[u8]> = TableDefinition::new("raw");
const SINGLE_COMMITS: u64 = 3_000;
const BATCHES: u64 = 200;
const BATCH_LEN: u64 = 1_000;
const WRITERS: u64 = 64;
const DEPTH: usize = 32;
const ROUNDS: u64 = 5;
const GROUP_WRITES: u64 = 200_000;
const VALUE: [u8; 100] = [7; 100];

fn key(i: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(b"bench/k/");
    k[8..].copy_from_slice(&i.to_be_bytes());
    k
}

fn raw_single(db: &redb::Database) -> Duration {
    let start = Instant::now();
    for i in 0..SINGLE_COMMITS {
        let tx = db.begin_write().expect("begin");
        tx.open_table(RAW)
            .expect("table")
            .insert(key(i).as_slice(), VALUE.as_slice())
            .expect("insert");
        tx.commit().expect("commit");
    }
    start.elapsed()
}

fn raw_batched(db: &redb::Database, base: u64) -> Duration {
    let start = Instant::now();
    for b in 0..BATCHES {
        let tx = db.begin_write().expect("begin");
        {
            let mut table = tx.open_table(RAW).expect("table");
            for i in 0..BATCH_LEN {
                table
                    .insert(key(base + b * BATCH_LEN + i).as_slice(), VALUE.as_slice())
                    .expect("insert");
            }
        }
        tx.commit().expect("commit");
    }
    start.elapsed()
}

async fn ours_single(db: &Database) -> Duration {
    let start = Instant::now();
    for i in 0..SINGLE_COMMITS {
        let tx = db.begin().await.expect("begin");
        tx.set(&key(i), &VALUE).expect("set");
        tx.commit().await.expect("commit");
    }
    start.elapsed()
}

async fn ours_batched(db: &Database, base: u64) -> Duration {
    let start = Instant::now();
    for b in 0..BATCHES {
        let tx = db.begin().await.expect("begin");
        for i in 0..BATCH_LEN {
            tx.set(&key(base + b * BATCH_LEN + i), &VALUE).expect("set");
        }
        tx.commit().await.expect("commit");
    }
    start.elapsed()
}

/// `writers` tasks, each keeping up to `depth` writes in flight (queued with `submit`, awaited
/// oldest first, as the cell's actors do); a depth of 1 waits for every acknowledgement.
async fn group(db: &Database, writers: u64, depth: usize, base: u64) -> Duration {
    group_with(db, GroupOptions::default(), writers, depth, base).await
}

async fn group_with(
    db: &Database,
    options: GroupOptions,
    writers: u64,
    depth: usize,
    base: u64,
) -> Duration {
    let committer = GroupCommitter::spawn(db.clone(), options);
    let start = Instant::now();
    let per_writer = GROUP_WRITES / writers;
    // Keys numbered in submission order: writes arrive in key order, as in the raw ceiling.
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(base));
    let writers: Vec<_> = (0..writers)
        .map(|_| {
            let committer = committer.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut in_flight = std::collections::VecDeque::with_capacity(depth);
                for _ in 0..per_writer {
                    let k = key(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)).to_vec();
                    let queued = committer.submit(vec![Write::Set(k, VALUE.to_vec())]).await;
                    in_flight.push_back(queued.expect("queued"));
                    if in_flight.len() == depth
                        && let Some(oldest) = in_flight.pop_front()
                    {
                        oldest.await.expect("group commit");
                    }
                }
                for queued in in_flight {
                    queued.await.expect("group commit");
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    let elapsed = start.elapsed();
    committer.join().await;
    elapsed
}

async fn concurrent_transactions(db: &Database) -> Duration {
    let start = Instant::now();
    let per_writer = GROUP_WRITES / WRITERS / 4;
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let db = db.clone();
            tokio::spawn(async move {
                for i in 0..per_writer {
                    let tx = db.begin().await.expect("begin");
                    tx.set(&key(20_000_000 + w * per_writer + i), &VALUE).expect("set");
                    tx.commit().await.expect("commit");
                }
            })
        })
        .collect();
    for w in writers {
        w.await.expect("writer");
    }
    start.elapsed()
}

fn main() {
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into()))
        .expect("temp dir");
    let raw = redb::Database::create(dir.path().join("raw.redb")).expect("raw redb");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let ours = Database::open_embedded(&dir.path().join("ours")).expect("store");

    println!("-- single-write commits ({SINGLE_COMMITS}, fsync each)");
    let raw_single_t = raw_single(&raw);
    let ours_single_t = rt.block_on(ours_single(&ours));
    let (_, raw_single_rate) =
        report("raw redb commits/s (ceiling)", rate(SINGLE_COMMITS, raw_single_t), "/s");
    let (_, ours_single_rate) =
        report("cellplane commits/s", rate(SINGLE_COMMITS, ours_single_t), "/s");
    report(
        "cellplane commit cost / raw commit cost",
        raw_single_rate / ours_single_rate,
        "x (goal < 1.5)",
    );

    println!("-- group commit: {WRITERS} writers, one write per commit, each waiting for its ack");
    let group_t = rt.block_on(group(&ours, WRITERS, 1, 10_000_000));
    let (_, group_rate) =
        report("GroupCommitter acknowledged writes/s", rate(GROUP_WRITES, group_t), "/s");
    report("bound: 64 writes per raw fsync commit", WRITERS as f64 * raw_single_rate, "/s");

    // The disk's speed drifts from second to second, so each round measures the ceiling right
    // before the figures it is compared with.
    let total = BATCHES * BATCH_LEN;
    let (mut ratios, mut task_ratios) = (Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        // Fresh stores each round: neither side pays for the other's or an earlier round's data.
        let round_dir = tempfile::tempdir_in(dir.path()).expect("round dir");
        let raw = redb::Database::create(round_dir.path().join("raw.redb")).expect("raw redb");
        let ours = Database::open_embedded(&round_dir.path().join("ours")).expect("store");
        let base = 100_000_000;
        println!(
            "-- round {round}: {BATCH_LEN}-write transactions, then {WRITERS} writers x {DEPTH} writes in flight"
        );
        let (_, raw_batched_rate) =
            report("raw redb writes/s (ceiling)", rate(total, raw_batched(&raw, base)), "/s");
        report("cellplane writes/s", rate(total, rt.block_on(ours_batched(&ours, base))), "/s");
        report(
            "GroupCommitter, depth 1: / raw batched",
            100.0 * group_rate / raw_batched_rate,
            "%",
        );
        let piped_t = rt.block_on(group(&ours, WRITERS, DEPTH, base + 50_000_000));
        let (_, piped_rate) =
            report("GroupCommitter acknowledged writes/s", rate(GROUP_WRITES, piped_t), "/s");
        let (_, ratio) = report(
            "GroupCommitter / raw batched",
            100.0 * piped_rate / raw_batched_rate,
            "% (goal >= 70)",
        );
        ratios.push(ratio);
        let in_task = GroupOptions { fold_in_task: true, ..GroupOptions::default() };
        let task_t = rt.block_on(group_with(&ours, in_task, WRITERS, DEPTH, base + 60_000_000));
        let (_, task_rate) = report(
            "the same through a committer task (FoundationDB's path)",
            rate(GROUP_WRITES, task_t),
            "/s",
        );
        task_ratios.push(100.0 * task_rate / raw_batched_rate);
        drop((raw, ours));
    }
    ratios.sort_by(f64::total_cmp);
    println!("-- over {ROUNDS} rounds");
    report("GroupCommitter / raw batched, median", ratios[ratios.len() / 2], "% (goal >= 70)");
    report("GroupCommitter / raw batched, lowest", ratios[0], "%");
    task_ratios.sort_by(f64::total_cmp);
    report("through a committer task / raw batched, median", task_ratios[ROUNDS as usize / 2], "%");
    let tx_writes = GROUP_WRITES / 4;
    report(
        "64 concurrent transactions (engine group commit) commits/s",
        rate(tx_writes, rt.block_on(concurrent_transactions(&ours))),
        "/s",
    );
}
