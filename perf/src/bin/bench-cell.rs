//! One cell in one process, simulated hosts driven directly through its gateway (no network):
//! register 100,000 hosts, heartbeat them every second, apply workloads totalling 1,000,000
//! replicas, fail 1,000 hosts, restart the cell on the same store.
//!
//! Figures: durable placements/s and submit-to-durably-assigned p50/p99 (an apply is answered
//! once its spec and every placement it made are committed), resident memory per host, failure
//! detection and re-placement times, recovery time. Ceiling: the group committer alone writing
//! the same number of same-sized records from as many concurrent writers, in the same run.
//!
//! `cargo run --release -p cellplane-perf --bin bench-cell [-- --hosts N --replicas N]`

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cellplane_api::wire::{Apply, CellSummary, Heartbeat, Message, Register};
use cellplane_api::*;
use cellplane_cell::{CellConfig, Gateway, RunningCell};
use cellplane_perf::{rate, report};
use cellplane_storage::Database;
use cellplane_storage::group::{GroupCommitter, GroupOptions, Write};
use cellplane_transport::identity::Identity;

const WRITERS: usize = 64;
const PER_WORKLOAD: u32 = 100;
const FAILED_EVERY: u64 = 100; // one host in a hundred fails

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().expect("a number"))
        .unwrap_or(default)
}

fn rss_kib() -> u64 {
    cellplane_perf::rss_kib(std::process::id())
}

fn host(id: u64) -> Host {
    Host {
        id: HostId(id),
        cell: CellId::new("c1").expect("name"),
        site: SiteId::new("s1").expect("name"),
        zone: Name::new(["z-a", "z-b", "z-c"][(id % 3) as usize]).expect("name"),
        capacity: Resources { cpu_milli: 64_000, memory_mib: 262_144, disk_gib: 2_000, gpus: 0 },
        capabilities: Capabilities { container: true, vm: true },
        labels: Default::default(),
        state: HostState::Joining,
    }
}

fn spec(i: u64) -> WorkloadSpec {
    WorkloadSpec {
        name: WorkloadName::new(&format!("w{i}")).expect("name"),
        kind: WorkloadKind::Container(ContainerSpec {
            image: "registry/app:1".into(),
            command: vec![],
            env: Default::default(),
        }),
        // Replicated: a stateful workload starts ordinal i only once i - 1 runs, which takes
        // host agents reporting back (issue 6); here nothing runs, placement is what is measured.
        controller: Controller::Replicated,
        replicas: PER_WORKLOAD,
        resources: Resources { cpu_milli: 500, memory_mib: 1_024, disk_gib: 1, gpus: 0 },
        placement: Placement::default(),
        update: Default::default(),
    }
}

async fn summary(gateway: &Gateway, router: &Identity) -> CellSummary {
    match gateway.call(router, Message::SummaryRequest).await {
        Ok(Message::Summary(summary)) => *summary,
        other => panic!("summary: {other:?}"),
    }
}

fn config(hosts: u64) -> CellConfig {
    let mut config = CellConfig::new(CellId::new("c1").expect("name"));
    config.hosts_max = hosts as usize;
    config
}

/// The group committer alone: `records` writes of the same size as an assignment, in
/// submissions of `PER_WORKLOAD`, from `WRITERS` tasks.
async fn ceiling(records: u64) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Database::open_embedded(dir.path()).expect("open");
    let committer = GroupCommitter::spawn(db, GroupOptions::default());
    let start = Instant::now();
    let per_writer = records / WRITERS as u64 / u64::from(PER_WORKLOAD);
    let tasks: Vec<_> = (0..WRITERS as u64)
        .map(|w| {
            let committer = committer.clone();
            tokio::spawn(async move {
                for s in 0..per_writer {
                    let writes = (0..u64::from(PER_WORKLOAD))
                        .map(|i| {
                            let key = format!("cell/c1/tenant/t{w}/replica/w{s}/{i:04}");
                            Write::Set(key.into_bytes(), vec![7; 24])
                        })
                        .collect();
                    committer.commit(writes).await.expect("commit");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer");
    }
    let elapsed = start.elapsed();
    committer.join().await;
    rate(per_writer * WRITERS as u64 * u64::from(PER_WORKLOAD), elapsed)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let hosts = arg("--hosts", 100_000);
    let replicas = arg("--replicas", 1_000_000);
    let workloads = replicas / u64::from(PER_WORKLOAD);
    let tenants = workloads.div_ceil(100);
    println!("cell benchmark: {hosts} hosts, {replicas} replicas in {workloads} workloads");

    let dir = tempfile::tempdir().expect("tempdir");
    let router = Identity::Router(Name::new("r1").expect("name"));
    let fleet = Identity::Host(Name::new("fleet").expect("name"));
    let rss_base = rss_kib();
    let db = Database::open_embedded(dir.path()).expect("open");
    let cell = RunningCell::start(config(hosts), db).await.expect("start");
    let gateway = Gateway::new(cell.shared().clone());

    // Register every host, WRITERS at a time.
    let start = Instant::now();
    let tasks: Vec<_> = (0..WRITERS as u64)
        .map(|w| {
            let (gateway, fleet) = (gateway.clone(), fleet.clone());
            tokio::spawn(async move {
                for id in (w..hosts).step_by(WRITERS) {
                    let register = Message::Register(Box::new(Register { host: host(id) }));
                    gateway.call(&fleet, register).await.expect("register");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("registrar");
    }
    report("hosts registered durably", rate(hosts, start.elapsed()), "/s");

    // Heartbeats every second from every host that has not failed.
    let failing = Arc::new(AtomicBool::new(false));
    // When the last round that reached the failing hosts ended.
    let last_beat = Arc::new(Mutex::new(Instant::now()));
    let beats = {
        let (gateway, fleet, failing) = (gateway.clone(), fleet.clone(), failing.clone());
        let last_beat = last_beat.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            for seq in 1.. {
                tick.tick().await;
                let failed = failing.load(Ordering::Relaxed);
                // In batches of a thousand, as a fleet's shard sends them.
                let ids: Vec<u64> =
                    (0..hosts).filter(|id| !(failed && id.is_multiple_of(FAILED_EVERY))).collect();
                for chunk in ids.chunks(1_000) {
                    let beats = chunk
                        .iter()
                        .map(|&id| Heartbeat {
                            host: HostId(id),
                            seq,
                            epoch: 0,
                            state: HostState::Ready,
                        })
                        .collect();
                    let _ = gateway.send(&fleet, Message::Heartbeats(beats));
                }
                if !failed {
                    *last_beat.lock().expect("not poisoned") = Instant::now();
                }
            }
        })
    };
    let start = Instant::now();
    while summary(&gateway, &router).await.hosts[HostState::Ready as usize] < hosts as u32 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    report("all hosts ready after registration", start.elapsed().as_secs_f64(), "s");
    let rss_hosts = rss_kib();
    report(
        "resident memory per host (cell side)",
        (rss_hosts.saturating_sub(rss_base) * 1024) as f64 / hosts as f64,
        "B",
    );

    for t in 0..tenants {
        let tenant = Tenant {
            id: TenantId::new(&format!("t{t}")).expect("name"),
            quota: Quota {
                cpu_milli: 1 << 40,
                memory_mib: 1 << 40,
                replicas: 1_000_000,
                workloads: 100,
            },
            home_cell: None,
        };
        gateway.call(&router, Message::PutTenant(Box::new(tenant))).await.expect("tenant");
    }

    // Apply every workload, WRITERS submitters at once; each answer means durably assigned.
    let start = Instant::now();
    let tasks: Vec<_> = (0..WRITERS as u64)
        .map(|w| {
            let (gateway, router) = (gateway.clone(), router.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                for i in (w..workloads).step_by(WRITERS) {
                    let mut key = [0u8; 16];
                    key[..8].copy_from_slice(&i.to_le_bytes());
                    let apply = Apply {
                        tenant: TenantId::new(&format!("t{}", i / 100)).expect("name"),
                        idempotency_key: key,
                        spec: spec(i),
                    };
                    let submitted = Instant::now();
                    gateway.call(&router, Message::Apply(Box::new(apply))).await.expect("apply");
                    latencies.push(submitted.elapsed());
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.expect("submitter"));
    }
    let elapsed = start.elapsed();
    let after = summary(&gateway, &router).await;
    let placed = after.replicas - after.pending;
    report("durable placements", rate(placed, elapsed), "/s");
    println!(
        "  ({placed} of {} replicas placed in {:.1} s)",
        after.replicas,
        elapsed.as_secs_f64()
    );
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    report("submit to durably assigned (100 replicas), p50", at(0.50).as_secs_f64() * 1e3, "ms");
    report("submit to durably assigned (100 replicas), p99", at(0.99).as_secs_f64() * 1e3, "ms");
    report(
        "resident memory per host, with 1M replicas",
        (rss_kib().saturating_sub(rss_base) * 1024) as f64 / hosts as f64,
        "B",
    );

    // Fail one host in a hundred: their heartbeats stop.
    let failed = hosts.div_ceil(FAILED_EVERY) as u32;
    failing.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(1_100)).await; // the round in progress has ended
    let stopped = *last_beat.lock().expect("not poisoned");
    let mut detected = None;
    loop {
        let now = summary(&gateway, &router).await;
        let down = now.hosts[HostState::Down as usize];
        if detected.is_none() && down >= failed {
            detected = Some(stopped.elapsed());
        }
        if let Some(at) = detected
            && now.pending == 0
        {
            report("failure detection after the last heartbeat", at.as_secs_f64(), "s");
            let replaced = stopped.elapsed() - at;
            report(
                "re-placement of their replicas after detection",
                replaced.as_secs_f64() * 1e3,
                "ms",
            );
            println!("  ({failed} hosts down, {} replicas pending)", now.pending);
            break;
        }
        assert!(stopped.elapsed() < Duration::from_secs(60), "failed hosts never handled");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    beats.abort();
    drop(gateway);
    cell.stop().await;

    // Recovery: the same store, every host and replica read back, a new epoch.
    let start = Instant::now();
    let db = Database::open_embedded(dir.path()).expect("open");
    let cell = RunningCell::start(config(hosts), db).await.expect("restart");
    let recovered = start.elapsed();
    let gateway = Gateway::new(cell.shared().clone());
    let back = summary(&gateway, &router).await;
    report("recovery: open, bump epoch, read back and rebuild", recovered.as_secs_f64(), "s");
    println!(
        "  ({} hosts, {} replicas, {} workloads back at epoch {})",
        back.hosts.iter().sum::<u32>(),
        back.replicas,
        back.workloads,
        back.epoch
    );
    drop(gateway);
    cell.stop().await;

    // Last, so that the memory it frees cannot hide the cell's in the figures above.
    let ceiling = ceiling(replicas.min(400_000)).await;
    report("group committer alone, assignment-sized writes (ceiling)", ceiling, "writes/s");
}
