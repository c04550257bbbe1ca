//! `cellplane demo`: a whole region on this machine, exercised and measured, then taken down.
//!
//! It starts the processes a real region runs — one `cellplane cell` per cell, simulated
//! fleets (`cellplane hosts --sim`), the `cellplane router` — from this very binary, creates two
//! tenants, applies container and VM workloads (replicated and stateful) through the SDK,
//! kills a batch of hosts and times the re-placement of their replicas, checks that each tenant
//! sees only its own, prints a report (or JSON), and stops everything it started.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use cellplane_api::wire::{Message, RegionSummary};
use cellplane_api::{HostState, Name, Quota, Spread, Tenant, TenantId};
use cellplane_chaos::process::{self, Killed};
use cellplane_sdk::{Client, Workload};
use cellplane_transport::{CertificateAuthority, Connection, Credentials, Identity, Role, Setup};
use serde::Serialize;

use crate::Failure;

/// What `cellplane demo` is told.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Cells in the region (the last one an edge site when there are three or more).
    #[arg(long, default_value_t = 3)]
    pub cells: u32,
    /// Simulated hosts in the whole region, spread over the cells.
    #[arg(long, default_value_t = 30_000)]
    pub hosts: u32,
    /// Print the report as JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The report.
#[derive(Debug, Serialize)]
struct Report {
    cells: u32,
    hosts: u32,
    bring_up_s: f64,
    tenants: Vec<String>,
    workloads: usize,
    replicas: u64,
    placements_per_s: f64,
    apply_p50_ms: f64,
    apply_p99_ms: f64,
    all_running_s: f64,
    hosts_killed: u32,
    replicas_on_killed_hosts: u64,
    replacement_s: f64,
    isolation_checks_passed: u32,
}

/// Ids of the hosts the demo kills (in cell c1), far above every other host's.
const FIRST_VICTIM: u64 = 1_000_000;

fn runtime(e: impl std::fmt::Display) -> Failure {
    Failure::Runtime(e.to_string())
}

/// Starts `cellplane ARGS` in `dir` and returns it with its first line of output.
fn spawn(dir: &Path, args: &[&str]) -> Result<(Killed, String), Failure> {
    let me = std::env::current_exe().map_err(runtime)?;
    let (child, line) = process::spawn(&me, args, dir).map_err(runtime)?;
    if line.is_empty() {
        return Err(runtime(format!("`cellplane {}` exited at start", args.join(" "))));
    }
    Ok((child, line))
}

fn address(line: &str) -> Result<SocketAddr, Failure> {
    process::address(line).ok_or_else(|| runtime(line))
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> Result<(), Failure> {
    if args.cells == 0 || args.hosts < args.cells * 10 {
        return Err(Failure::Input(
            "--cells must be at least 1 and --hosts at least 10 per cell".into(),
        ));
    }
    let dir = tempfile::Builder::new().prefix("cellplane-demo-").tempdir().map_err(runtime)?;
    let say = |text: &str| {
        if !args.json {
            println!("{text}");
        }
    };
    let started = Instant::now();
    let pki = dir.path().join("pki");
    let ca = CertificateAuthority::generate("demo").map_err(runtime)?;
    ca.save(&pki).map_err(runtime)?;
    let name = |s: &str| Name::new(s).map_err(runtime);
    let cells: Vec<String> = (1..=args.cells).map(|i| format!("c{i}")).collect();
    for cell in &cells {
        ca.issue(&Identity::Cell(name(cell)?))
            .map_err(runtime)?
            .save(&pki, cell)
            .map_err(runtime)?;
    }
    ca.issue(&Identity::Router(name("r1")?))
        .map_err(runtime)?
        .save(&pki, "router")
        .map_err(runtime)?;
    ca.issue(&Identity::Host(name("fleet")?))
        .map_err(runtime)?
        .save(&pki, "fleet")
        .map_err(runtime)?;
    let ops_identity =
        Identity::Client { tenant: TenantId::new("ops").map_err(runtime)?, role: Role::Operator };
    ca.issue(&ops_identity).map_err(runtime)?.save(&pki, "ops").map_err(runtime)?;

    // Cells and their fleets. Cell c1 also runs a separate fleet of hosts the demo kills.
    let per_cell = args.hosts / args.cells;
    let victims = (per_cell / 10).clamp(1, 1_000);
    let mut processes = Vec::new();
    let mut entries = String::new();
    let mut victim_cell = None;
    say(&format!(
        "bringing up {} cells with {} simulated hosts ...",
        args.cells,
        per_cell * args.cells
    ));
    for (i, cell) in cells.iter().enumerate() {
        let config = format!(
            "cell = \"{cell}\"\nlisten = \"127.0.0.1:0\"\nhosts_max = {}\n",
            (per_cell + victims).max(16)
        );
        std::fs::write(dir.path().join(format!("{cell}.toml")), config).map_err(runtime)?;
        let (process, line) = spawn(
            dir.path(),
            &["cell", "--config", &format!("{cell}.toml"), "--data", cell, "--pki", "pki"],
        )?;
        let addr = address(&line)?;
        processes.push(process);
        let fleet = if i == 0 { per_cell - victims } else { per_cell };
        let (process, _) = spawn(
            dir.path(),
            &[
                "hosts",
                "--sim",
                &fleet.to_string(),
                "--cell",
                &addr.to_string(),
                "--cell-name",
                cell,
                "--credentials",
                "fleet",
                "--pki",
                "pki",
            ],
        )?;
        processes.push(process);
        let site = if args.cells >= 3 && i + 1 == cells.len() { "edge-1" } else { "dc-1" };
        entries.push_str(&format!(
            "\n[[cells]]\nid = \"{cell}\"\nsite = \"{site}\"\naddress = \"{addr}\"\n"
        ));
        if i == 0 {
            victim_cell = Some(addr);
        }
    }
    let victim_addr = victim_cell.ok_or_else(|| runtime("no cell"))?;
    let (victim_fleet, _) = spawn(
        dir.path(),
        &[
            "hosts",
            "--sim",
            &victims.to_string(),
            "--first-id",
            &FIRST_VICTIM.to_string(),
            "--cell",
            &victim_addr.to_string(),
            "--cell-name",
            "c1",
            "--credentials",
            "fleet",
            "--pki",
            "pki",
        ],
    )?;
    let region = format!(
        "region = \"demo\"\nlisten = \"127.0.0.1:0\"\n\n\
         [[sites]]\nid = \"dc-1\"\nkind = \"cloud\"\nlocation = \"cloud data centre\"\n\
         latency_ms = {{ users-eu = 30 }}\n\n\
         [[sites]]\nid = \"edge-1\"\nkind = \"edge\"\nlocation = \"edge site\"\n\
         latency_ms = {{ users-eu = 5 }}\n{entries}\n[limits]\nsummary_ms = 250\n"
    );
    std::fs::write(dir.path().join("region.toml"), region).map_err(runtime)?;
    let (router_process, line) = spawn(
        dir.path(),
        &["router", "--config", "region.toml", "--data", "router", "--pki", "pki"],
    )?;
    processes.push(router_process);
    let router = address(&line)?;
    let ops = connect(&pki, "ops", router).await?;
    let total = per_cell * args.cells;
    let mut last = 0;
    wait(&ops, Duration::from_secs(120), |s| {
        let ready: u32 = s.cells.iter().map(|(c, _)| c.hosts[HostState::Ready as usize]).sum();
        if !args.json && ready >= last + total / 5 {
            last = ready;
            println!("  {ready}/{total} hosts ready");
        }
        s.cells.len() == cells.len() && s.cells.iter().all(|(_, up)| *up) && ready >= total
    })
    .await?;
    let bring_up_s = started.elapsed().as_secs_f64();
    say(&format!("region up in {bring_up_s:.1} s: {} cells, {total} hosts ready", cells.len()));

    // Two tenants, their credentials issued by the router.
    let mut clients = Vec::new();
    for tenant in ["acme", "globex"] {
        let record = Tenant {
            id: TenantId::new(tenant).map_err(runtime)?,
            quota: Quota {
                cpu_milli: 1 << 32,
                memory_mib: 1 << 32,
                replicas: 1_000_000,
                workloads: 100,
            },
            home_cell: None,
        };
        let made =
            ops.request(0, &Message::PutTenant(Box::new(record)), Duration::from_secs(30)).await;
        let Ok(Message::TenantCreated(made)) = made else {
            return Err(runtime(format!("creating tenant {tenant}: {made:?}")));
        };
        let identity = Identity::Client { tenant: made.tenant.id.clone(), role: Role::Tenant };
        let credentials = Credentials {
            certificate: made.certificate_der.into(),
            key: made.key_der.into(),
            identity,
        };
        credentials.save(&pki, tenant).map_err(runtime)?;
        clients.push(Client::connect(router, "r1", &pki, tenant).await.map_err(runtime)?);
        say(&format!(
            "tenant {tenant} created, home cell {}",
            made.tenant.home_cell.map(|c| c.to_string()).unwrap_or_default()
        ));
    }

    // Workloads: containers and VMs, replicated and stateful.
    let per_workload = (total / 20).clamp(10, 500);
    let mut specs = Vec::new();
    for (t, tenant) in ["acme", "globex"].iter().enumerate() {
        for i in 0..8 {
            let spec =
                Workload::container(&format!("web-{i}"), &format!("registry/{tenant}-web:1"))
                    .replicas(per_workload)
                    .cpu_milli(250)
                    .spread(Spread::Host)
                    .build()
                    .map_err(runtime)?;
            specs.push((t, spec));
        }
        specs.push((
            t,
            Workload::container("db", "registry/db:1")
                .stateful()
                .replicas(3)
                .cpu_milli(1_000)
                .build()
                .map_err(runtime)?,
        ));
        specs.push((
            t,
            Workload::vm("vm", "debian-12")
                .replicas(per_workload / 5)
                .spread(Spread::Host)
                .build()
                .map_err(runtime)?,
        ));
        specs.push((
            t,
            Workload::vm("vm-db", "debian-12")
                .stateful()
                .replicas(3)
                .vcpus(2)
                .memory_mib(2_048)
                .build()
                .map_err(runtime)?,
        ));
        if args.cells >= 3 {
            let edge = Workload::container("edge-cache", "registry/cache:1").replicas(5);
            specs.push((t, edge.latency_to("users-eu", 10).build().map_err(runtime)?));
        }
    }
    let replicas: u64 = specs.iter().map(|(_, s)| u64::from(s.replicas)).sum();
    say(&format!("applying {} workloads, {replicas} replicas ...", specs.len()));
    let applying = Instant::now();
    let mut latencies = Vec::new();
    let mut pending = Vec::new();
    for (t, spec) in specs.iter().cloned() {
        let client = &clients[t];
        pending.push(async move {
            let start = Instant::now();
            client.apply(spec).await.map(|_| start.elapsed())
        });
    }
    for result in futures_util::future::join_all(pending).await {
        latencies.push(result.map_err(runtime)?);
    }
    let apply_s = applying.elapsed().as_secs_f64();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let placements_per_s = replicas as f64 / apply_s;
    say(&format!(
        "  acknowledged in {apply_s:.2} s: {placements_per_s:.0} durable placements/s, apply p50 {:.1} ms, p99 {:.1} ms",
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3
    ));
    wait_running(&clients, Duration::from_secs(120)).await?;
    let all_running_s = applying.elapsed().as_secs_f64();
    say(&format!("  every replica running after {all_running_s:.1} s"));

    // Kill a batch of hosts: their replicas go elsewhere.
    let first_victim = FIRST_VICTIM;
    let on_victims = count_on(&clients, first_victim).await?;
    say(&format!("killing {victims} hosts of cell c1 (holding {on_victims} replicas) ..."));
    drop(victim_fleet);
    let killed = Instant::now();
    loop {
        if count_on(&clients, first_victim).await? == 0 && all_placed(&clients).await? {
            break;
        }
        if killed.elapsed() > Duration::from_secs(60) {
            return Err(runtime("the killed hosts' replicas were never re-placed"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let replacement_s = killed.elapsed().as_secs_f64();
    say(&format!(
        "  re-placed {on_victims} replicas {replacement_s:.1} s after the kill (detection included)"
    ));

    // Isolation: each tenant sees only its own.
    let mut checks = 0;
    for (mine, theirs) in [(0, 1), (1, 0)] {
        let own = clients[mine].list().await.map_err(runtime)?;
        if own.iter().any(|w| &w.tenant != clients[mine].tenant()) {
            return Err(runtime("a tenant saw another tenant's workload"));
        }
        checks += 1;
        let foreign = Client::connect(router, "r1", &pki, ["acme", "globex"][mine])
            .await
            .map_err(runtime)?
            .for_tenant(clients[theirs].tenant().clone());
        match foreign.get("web-0").await {
            Err(cellplane_sdk::Error::Unauthorized(_)) => checks += 1,
            other => {
                return Err(runtime(format!("a tenant reached another's workload: {other:?}")));
            }
        }
    }
    say(&format!(
        "isolation: {checks} checks passed (each tenant lists only its own, and cannot reach the other's)"
    ));

    let report = Report {
        cells: args.cells,
        hosts: total,
        bring_up_s,
        tenants: vec!["acme".into(), "globex".into()],
        workloads: specs.len(),
        replicas,
        placements_per_s,
        apply_p50_ms: at(0.5).as_secs_f64() * 1e3,
        apply_p99_ms: at(0.99).as_secs_f64() * 1e3,
        all_running_s,
        hosts_killed: victims,
        replicas_on_killed_hosts: on_victims,
        replacement_s,
        isolation_checks_passed: checks,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(runtime)?);
    } else {
        println!("\nreport");
        println!(
            "  region            {} cells, {} hosts, up in {:.1} s",
            report.cells, report.hosts, report.bring_up_s
        );
        println!(
            "  workloads         {} ({} replicas) for 2 tenants",
            report.workloads, report.replicas
        );
        println!(
            "  placements        {:.0}/s durable; apply p50 {:.1} ms, p99 {:.1} ms",
            report.placements_per_s, report.apply_p50_ms, report.apply_p99_ms
        );
        println!(
            "  host failure      {} hosts killed, {} replicas re-placed in {:.1} s",
            report.hosts_killed, report.replicas_on_killed_hosts, report.replacement_s
        );
        println!("  isolation         {} checks passed", report.isolation_checks_passed);
    }
    drop(processes);
    say("stopped everything the demo started");
    Ok(())
}

async fn connect(pki: &Path, stem: &str, router: SocketAddr) -> Result<Connection, Failure> {
    let ca = cellplane_transport::identity::load_ca_certificate(pki).map_err(runtime)?;
    let setup = Setup::new(Credentials::load(pki, stem).map_err(runtime)?, ca);
    let expect = Identity::Router(Name::new("r1").map_err(runtime)?);
    cellplane_transport::connect(router, &expect, &setup).await.map_err(runtime)
}

async fn wait(
    ops: &Connection,
    limit: Duration,
    mut check: impl FnMut(&RegionSummary) -> bool,
) -> Result<(), Failure> {
    let start = Instant::now();
    loop {
        if let Ok(Message::RegionSummary(s)) =
            ops.request(0, &Message::RegionSummaryRequest, Duration::from_secs(10)).await
            && check(&s)
        {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(runtime("the region did not come up in time"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_running(clients: &[Client], limit: Duration) -> Result<(), Failure> {
    let start = Instant::now();
    loop {
        let mut all = true;
        for client in clients {
            for w in client.list().await.map_err(runtime)? {
                all &= w.replicas.iter().all(|r| r.phase == cellplane_api::ReplicaPhase::Running);
            }
        }
        if all {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(runtime("replicas did not all run in time"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Replicas (of both tenants) on hosts `first` and above: the ones the demo kills.
async fn count_on(clients: &[Client], first: u64) -> Result<u64, Failure> {
    let mut n = 0;
    for client in clients {
        for w in client.list().await.map_err(runtime)? {
            n += w.replicas.iter().filter(|r| r.host.is_some_and(|h| h.0 >= first)).count() as u64;
        }
    }
    Ok(n)
}

async fn all_placed(clients: &[Client]) -> Result<bool, Failure> {
    for client in clients {
        for w in client.list().await.map_err(runtime)? {
            if w.replicas.iter().any(|r| r.host.is_none()) {
                return Ok(false);
            }
        }
    }
    Ok(true)
}
