//! The region router: routing decisions from its cache, tenant creations, and the drain of a
//! cell holding 1,000 workloads. Two cell processes with simulated fleets, the router
//! in-process (so that a routing decision is timed alone, without QUIC).
//!
//! Figures: routed lookups/s and p99 (the cache lookup every tenant call pays), placement
//! decisions/s and p99 (`Explain`: where a new workload would go, with its reasons), tenant
//! creations/s (directory commit, the home cell told, credentials issued), drain time.
//! Ceiling beside the lookups: a bare `HashMap` lookup of the same keys, same run.
//!
//! `cargo build --release -p cellplane && cargo run --release -p cellplane-perf --bin
//! bench-router`

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use cellplane_api::wire::{Apply, DrainRequest, Message};
use cellplane_api::*;
use cellplane_chaos::process::{self, Killed};
use cellplane_perf::{binary, rate, report};
use cellplane_region::router::{CellEntry, RouterLimits};
use cellplane_region::{Router, RouterConfig};
use cellplane_storage::Database;
use cellplane_transport::identity::load_ca_certificate;
use cellplane_transport::{CertificateAuthority, Credentials, Identity, Role, Setup};

const TENANTS: u64 = 100;
const WORKLOADS: u64 = 1_000;
const LOOKUPS: u64 = 1_000_000;

fn spawn(bin: &Path, args: &[&str], dir: &Path) -> (Killed, String) {
    process::spawn(bin, args, dir).expect("spawn")
}

fn address(line: &str) -> SocketAddr {
    process::address(line).expect("an address")
}

fn p99(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[(samples.len() * 99 / 100).min(samples.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = dir.path().join("pki");
    let ca = CertificateAuthority::generate("bench").expect("ca");
    ca.save(&pki).expect("save");
    let name = |s: &str| Name::new(s).expect("name");
    for (identity, stem) in [
        (Identity::Cell(name("c1")), "c1"),
        (Identity::Cell(name("c2")), "c2"),
        (Identity::Router(name("r1")), "router"),
        (Identity::Host(name("fleet")), "fleet"),
    ] {
        ca.issue(&identity).expect("issue").save(&pki, stem).expect("save");
    }
    let bin = binary();
    let mut processes = Vec::new();
    let mut cells = Vec::new();
    for cell in ["c1", "c2"] {
        let config = format!("cell = \"{cell}\"\nlisten = \"127.0.0.1:0\"\nhosts_max = 1000\n");
        std::fs::write(dir.path().join(format!("{cell}.toml")), config).expect("config");
        let args = ["cell", "--config", &format!("{cell}.toml"), "--data", cell, "--pki", "pki"];
        let (process, line) = spawn(&bin, &args, dir.path());
        let addr = address(&line);
        let fleet = [
            "hosts",
            "--sim",
            "100",
            "--cell",
            &addr.to_string(),
            "--cell-name",
            cell,
            "--credentials",
            "fleet",
            "--pki",
            "pki",
            "--start-delay-ms",
            "0",
        ];
        let (fleet, _) = spawn(&bin, &fleet, dir.path());
        processes.push(process);
        processes.push(fleet);
        cells.push(CellEntry {
            id: CellId::new(cell).expect("name"),
            site: SiteId::new("dc-1").expect("name"),
            address: addr,
        });
    }
    let config = RouterConfig {
        region: name("bench"),
        listen: "127.0.0.1:0".parse().expect("addr"),
        sites: vec![Site {
            id: SiteId::new("dc-1").expect("name"),
            kind: SiteKind::Cloud,
            location: "here".into(),
            latency_ms: [(name("users"), 10)].into(),
        }],
        cells,
        limits: RouterLimits {
            rate_per_s: 10_000_000,
            burst: 10_000_000,
            summary_ms: 200,
            call_deadline_ms: 10_000,
        },
    };
    let db = Database::open_embedded(&dir.path().join("router")).expect("open");
    let setup = Setup::new(
        Credentials::load(&pki, "router").expect("creds"),
        load_ca_certificate(&pki).expect("ca"),
    );
    let router = Router::start(config, db, setup, Some(ca)).await.expect("router");
    let ops =
        Identity::Client { tenant: TenantId::new("ops").expect("name"), role: Role::Operator };
    tokio::time::sleep(Duration::from_millis(1_500)).await; // fleets joined, summaries in

    // Tenant creations, every one homed on c1 so that c1 holds everything to drain.
    let start = Instant::now();
    for t in 0..TENANTS {
        let tenant = Tenant {
            id: TenantId::new(&format!("t{t}")).expect("name"),
            quota: Quota {
                cpu_milli: 1 << 30,
                memory_mib: 1 << 30,
                replicas: 10_000,
                workloads: 1_000,
            },
            home_cell: Some(CellId::new("c1").expect("name")),
        };
        let made = router.call(&ops, Message::PutTenant(Box::new(tenant))).await;
        assert!(matches!(made, Ok(Message::TenantCreated(_))), "{made:?}");
    }
    report(
        "tenant creations (directory, home cell, credentials)",
        rate(TENANTS, start.elapsed()),
        "/s",
    );

    let spec = |i: u64| WorkloadSpec {
        name: WorkloadName::new(&format!("w{i}")).expect("name"),
        kind: WorkloadKind::Container(ContainerSpec {
            image: "app".into(),
            command: vec![],
            env: Default::default(),
        }),
        controller: Controller::Replicated,
        replicas: 1,
        resources: Resources { cpu_milli: 10, memory_mib: 10, disk_gib: 0, gpus: 0 },
        placement: Placement::default(),
        update: Default::default(),
    };
    let start = Instant::now();
    for i in 0..WORKLOADS {
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&i.to_le_bytes());
        let apply = Apply {
            tenant: TenantId::new(&format!("t{}", i % TENANTS)).expect("name"),
            idempotency_key: key,
            spec: spec(i),
        };
        router.call(&ops, Message::Apply(Box::new(apply))).await.expect("apply");
    }
    report("applies routed to a cell and acknowledged", rate(WORKLOADS, start.elapsed()), "/s");

    // Routed lookups from the cache, beside a bare map of the same keys.
    let keys: Vec<(TenantId, WorkloadName)> = (0..WORKLOADS)
        .map(|i| {
            (
                TenantId::new(&format!("t{}", i % TENANTS)).expect("name"),
                WorkloadName::new(&format!("w{i}")).expect("name"),
            )
        })
        .collect();
    let bare: HashMap<(TenantId, WorkloadName), CellId> =
        keys.iter().map(|k| (k.clone(), CellId::new("c1").expect("name"))).collect();
    let start = Instant::now();
    for i in 0..LOOKUPS {
        std::hint::black_box(bare.get(&keys[(i % WORKLOADS) as usize]));
    }
    report("bare HashMap lookup (ceiling)", rate(LOOKUPS, start.elapsed()), "/s");
    let start = Instant::now();
    let mut samples = Vec::with_capacity(100_000);
    for i in 0..LOOKUPS {
        let (t, w) = &keys[(i % WORKLOADS) as usize];
        if i % 10 == 0 {
            let one = Instant::now();
            std::hint::black_box(router.route(t, w).expect("routed"));
            samples.push(one.elapsed());
        } else {
            std::hint::black_box(router.route(t, w).expect("routed"));
        }
    }
    report("routed lookups from the cache", rate(LOOKUPS, start.elapsed()), "/s");
    report("routed lookup p99", p99(samples).as_secs_f64() * 1e6, "µs");

    // Placement decisions for new workloads, explained, from the cached summaries.
    let decisions = 100_000u64;
    let mut samples = Vec::with_capacity(decisions as usize);
    let start = Instant::now();
    for i in 0..decisions {
        let explain = Apply {
            tenant: TenantId::new(&format!("t{}", i % TENANTS)).expect("name"),
            idempotency_key: [0; 16],
            spec: spec(WORKLOADS + i),
        };
        let one = Instant::now();
        let answer = router.call(&ops, Message::Explain(Box::new(explain))).await;
        samples.push(one.elapsed());
        assert!(matches!(answer, Ok(Message::Explanation(_))));
    }
    report("placement decisions with explanation", rate(decisions, start.elapsed()), "/s");
    report("placement decision p99", p99(samples).as_secs_f64() * 1e6, "µs");

    // Drain c1: every workload moves to c2, make-before-break.
    let start = Instant::now();
    let drain = DrainRequest { cell: CellId::new("c1").expect("name"), moves_max: u32::MAX };
    match router.call(&ops, Message::Drain(Box::new(drain))).await {
        Ok(Message::DrainProgress(p)) => {
            report("drain of a cell holding 1,000 workloads", start.elapsed().as_secs_f64(), "s");
            println!("  ({} moved, {} remaining, {} failed)", p.moved, p.remaining, p.failed.len());
        }
        other => panic!("drain: {other:?}"),
    }
    drop(processes);
}
