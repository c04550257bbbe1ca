//! Bring-up and day-to-day commands: `up`, `down`, `status`, `tenant create`, `apply`, `get`,
//! `delete`, `scale`, `watch`.
//!
//! `up` keeps everything of a local region in one data directory:
//! ```text
//! DATA/spec.toml            the region spec it was started from
//! DATA/pki/                 the CA and every credential (tenants' too)
//! DATA/<cell>/, router/     stores
//! DATA/<cell>.toml, region.toml   generated configs
//! DATA/run/<name>.pid       processes it started; DATA/logs/<name>.log their output
//! DATA/run/router.addr      where the router listens
//! ```
//! Re-running `up` starts only what is not running; `down` stops what the pid files name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cellplane_api::wire::{Message, RegionSummary};
use cellplane_api::{CellId, HostState, Name, Quota, Site, SiteId, Tenant, TenantId};
use cellplane_sdk::{Client, Event};
use cellplane_transport::{CertificateAuthority, Connection, Credentials, Identity, Role, Setup};
use serde::Deserialize;

use crate::Failure;

/// The router's name in a local region.
const ROUTER: &str = "router";

/// A region to bring up.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegionSpec {
    region: Name,
    #[serde(default = "default_router")]
    router: SocketAddr,
    sites: Vec<Site>,
    cells: Vec<CellSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CellSpec {
    id: CellId,
    site: SiteId,
    listen: SocketAddr,
    /// Simulated hosts to run for it.
    #[serde(default)]
    hosts: u32,
}

fn default_router() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7_000))
}

fn runtime(e: impl std::fmt::Display) -> Failure {
    Failure::Runtime(e.to_string())
}

fn input(e: impl std::fmt::Display) -> Failure {
    Failure::Input(e.to_string())
}

fn read_spec(path: &Path) -> Result<RegionSpec, Failure> {
    let text =
        std::fs::read_to_string(path).map_err(|e| input(format!("{}: {e}", path.display())))?;
    let spec: RegionSpec =
        toml::from_str(&text).map_err(|e| input(format!("{}: {e}", path.display())))?;
    if spec.cells.is_empty() {
        return Err(input(format!("{}: a region needs at least one [[cells]]", path.display())));
    }
    for cell in &spec.cells {
        if !spec.sites.iter().any(|s| s.id == cell.site) {
            return Err(input(format!(
                "{}: cell {} is at site {}, which no [[sites]] names",
                path.display(),
                cell.id,
                cell.site
            )));
        }
    }
    Ok(spec)
}

/// Whether `pid` is a live cellplane process.
fn alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains("cellplane"))
}

fn pid_of(data: &Path, name: &str) -> Option<u32> {
    let text = std::fs::read_to_string(data.join("run").join(format!("{name}.pid"))).ok()?;
    text.trim().parse().ok().filter(|pid| alive(*pid))
}

/// Starts `cellplane ARGS` detached (its own process group, output to its log) unless the pid
/// file says it runs; waits for its first line when `ready` names a word of it.
fn start(data: &Path, name: &str, args: &[String], ready: Option<&str>) -> Result<bool, Failure> {
    if pid_of(data, name).is_some() {
        return Ok(false);
    }
    std::fs::create_dir_all(data.join("run")).map_err(runtime)?;
    std::fs::create_dir_all(data.join("logs")).map_err(runtime)?;
    let log_path = data.join("logs").join(format!("{name}.log"));
    let log = std::fs::File::create(&log_path).map_err(runtime)?;
    let me = std::env::current_exe().map_err(runtime)?;
    let mut child = std::os::unix::process::CommandExt::process_group(
        Command::new(me)
            .args(args)
            .current_dir(data)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(runtime)?)
            .stderr(log),
        0,
    )
    .spawn()
    .map_err(runtime)?;
    std::fs::write(data.join("run").join(format!("{name}.pid")), child.id().to_string())
        .map_err(runtime)?;
    if let Some(word) = ready {
        let started = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            if text.contains(word) {
                break;
            }
            let exited = child.try_wait().map_err(runtime)?.is_some();
            if exited || started.elapsed() > Duration::from_secs(30) {
                return Err(runtime(format!(
                    "{name} did not start; see {}:\n{}",
                    log_path.display(),
                    text.lines().rev().take(5).collect::<Vec<_>>().join("\n")
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(true)
}

/// Brings a region up (or finishes bringing it up) and waits until every host is ready.
pub async fn up(spec_path: &Path, data: &Path) -> Result<(), Failure> {
    let spec = read_spec(spec_path)?;
    std::fs::create_dir_all(data).map_err(runtime)?;
    std::fs::copy(spec_path, data.join("spec.toml")).map_err(runtime)?;
    let pki = data.join("pki");
    let ca = match CertificateAuthority::load(&pki) {
        Ok(ca) => ca,
        Err(_) => {
            let ca = CertificateAuthority::generate(spec.region.as_str()).map_err(runtime)?;
            ca.save(&pki).map_err(runtime)?;
            ca
        }
    };
    let name = |s: &str| Name::new(s).map_err(runtime);
    let mut needed = vec![
        (Identity::Router(name(ROUTER)?), ROUTER.to_string()),
        (Identity::Host(name("fleet")?), "fleet".into()),
        (
            Identity::Client {
                tenant: TenantId::new("ops").map_err(runtime)?,
                role: Role::Operator,
            },
            "ops".into(),
        ),
    ];
    for cell in &spec.cells {
        needed.push((Identity::Cell(cell.id.0.clone()), cell.id.to_string()));
    }
    for (identity, stem) in needed {
        if !pki.join(format!("{stem}.crt")).exists() {
            ca.issue(&identity).map_err(runtime)?.save(&pki, &stem).map_err(runtime)?;
        }
    }
    let mut started = 0;
    let mut entries = String::new();
    for cell in &spec.cells {
        let config = format!(
            "cell = \"{}\"\nlisten = \"{}\"\nhosts_max = {}\n",
            cell.id,
            cell.listen,
            cell.hosts.max(1_000)
        );
        std::fs::write(data.join(format!("{}.toml", cell.id)), config).map_err(runtime)?;
        let args: Vec<String> = [
            "cell",
            "--config",
            &format!("{}.toml", cell.id),
            "--data",
            cell.id.as_str(),
            "--pki",
            "pki",
        ]
        .map(String::from)
        .to_vec();
        started += usize::from(start(data, cell.id.as_str(), &args, Some("serving on"))?);
        if cell.hosts > 0 {
            let args: Vec<String> = [
                "hosts",
                "--sim",
                &cell.hosts.to_string(),
                "--cell",
                &cell.listen.to_string(),
                "--cell-name",
                cell.id.as_str(),
                "--credentials",
                "fleet",
                "--pki",
                "pki",
            ]
            .map(String::from)
            .to_vec();
            started += usize::from(start(data, &format!("{}-hosts", cell.id), &args, None)?);
        }
        entries.push_str(&format!(
            "\n[[cells]]\nid = \"{}\"\nsite = \"{}\"\naddress = \"{}\"\n",
            cell.id, cell.site, cell.listen
        ));
    }
    let sites = toml::to_string(&SitesOnly { sites: &spec.sites }).map_err(runtime)?;
    let region =
        format!("region = \"{}\"\nlisten = \"{}\"\n{sites}{entries}", spec.region, spec.router);
    std::fs::write(data.join("region.toml"), region).map_err(runtime)?;
    let args: Vec<String> = [
        "router",
        "--config",
        "region.toml",
        "--data",
        "router",
        "--pki",
        "pki",
        "--credentials",
        ROUTER,
    ]
    .map(String::from)
    .to_vec();
    started += usize::from(start(data, "router", &args, Some("serving on"))?);
    std::fs::write(data.join("run").join("router.addr"), spec.router.to_string())
        .map_err(runtime)?;
    println!(
        "{started} processes started ({} already running)",
        1 + spec.cells.len() * 2 - started.min(1 + spec.cells.len() * 2)
    );

    // Progress while the hosts join.
    let ops = operator(data).await?;
    let bars = indicatif::MultiProgress::new();
    let style =
        indicatif::ProgressStyle::with_template("{prefix:>6} [{bar:40}] {pos}/{len} hosts ready")
            .map_err(runtime)?
            .progress_chars("=> ");
    let progress: Vec<(CellId, indicatif::ProgressBar)> = spec
        .cells
        .iter()
        .map(|c| {
            let bar = bars.add(indicatif::ProgressBar::new(u64::from(c.hosts)));
            bar.set_style(style.clone());
            bar.set_prefix(c.id.to_string());
            (c.id.clone(), bar)
        })
        .collect();
    let began = Instant::now();
    loop {
        let summary = region_summary(&ops).await?;
        let mut healthy = summary.cells.len() == spec.cells.len();
        for (id, bar) in &progress {
            let ready = summary
                .cells
                .iter()
                .find(|(c, up)| &c.cell == id && *up)
                .map_or(0, |(c, _)| c.hosts[HostState::Ready as usize]);
            bar.set_position(u64::from(ready));
            healthy &= u64::from(ready) >= bar.length().unwrap_or(0);
        }
        if healthy {
            break;
        }
        if began.elapsed() > Duration::from_secs(300) {
            return Err(runtime(format!(
                "the region is not healthy after 5 minutes; logs in {}",
                data.join("logs").display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    progress.iter().for_each(|(_, bar)| bar.finish());
    println!("region {} is up: router at {}, data in {}", spec.region, spec.router, data.display());
    Ok(())
}

#[derive(serde::Serialize)]
struct SitesOnly<'a> {
    sites: &'a [Site],
}

/// Stops every process `up` started in `data`.
pub fn down(data: &Path) -> Result<(), Failure> {
    let run = data.join("run");
    let Ok(entries) = std::fs::read_dir(&run) else {
        return Err(input(format!("no region in {} (nothing to stop)", data.display())));
    };
    let mut stopped = 0;
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("pid") {
            continue;
        }
        if let Some(pid) =
            std::fs::read_to_string(&path).ok().and_then(|t| t.trim().parse::<u32>().ok())
            && alive(pid)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            pids.push(pid);
        }
        let _ = std::fs::remove_file(&path);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for pid in pids {
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if alive(pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        stopped += 1;
    }
    println!("stopped {stopped} processes");
    Ok(())
}

fn router_addr(data: &Path) -> Result<SocketAddr, Failure> {
    let path = data.join("run").join("router.addr");
    let text = std::fs::read_to_string(&path).map_err(|_| {
        input(format!("no region in {} (run `cellplane up` first)", data.display()))
    })?;
    text.trim().parse().map_err(|e| input(format!("{}: {e}", path.display())))
}

async fn operator(data: &Path) -> Result<Connection, Failure> {
    let router = router_addr(data)?;
    let pki = data.join("pki");
    let ca = cellplane_transport::identity::load_ca_certificate(&pki).map_err(input)?;
    let setup = Setup::new(Credentials::load(&pki, "ops").map_err(input)?, ca);
    let expect = Identity::Router(Name::new(ROUTER).map_err(runtime)?);
    cellplane_transport::connect(router, &expect, &setup)
        .await
        .map_err(|e| runtime(format!("the region at {router} is unreachable: {e}")))
}

async fn region_summary(ops: &Connection) -> Result<RegionSummary, Failure> {
    match ops.request(0, &Message::RegionSummaryRequest, Duration::from_secs(10)).await {
        Ok(Message::RegionSummary(summary)) => Ok(*summary),
        Ok(other) => Err(runtime(format!("unexpected answer {other:?}"))),
        Err(e) => Err(runtime(e)),
    }
}

/// Cells, hosts by state, tenants and utilisation.
pub async fn status(data: &Path) -> Result<(), Failure> {
    let ops = operator(data).await?;
    let summary = region_summary(&ops).await?;
    println!(
        "{:<8} {:<9} {:>7} {:>7} {:>7} {:>7} {:>8} {:>9} {:>9} {:>6}",
        "cell",
        "health",
        "ready",
        "suspect",
        "down",
        "other",
        "workloads",
        "replicas",
        "pending",
        "cpu%"
    );
    for (cell, up) in &summary.cells {
        let h = cell.hosts;
        let cpu = if cell.cpu_milli[0] == 0 {
            0.0
        } else {
            100.0 * cell.cpu_milli[1] as f64 / cell.cpu_milli[0] as f64
        };
        println!(
            "{:<8} {:<9} {:>7} {:>7} {:>7} {:>7} {:>8} {:>9} {:>9} {:>5.1}%",
            cell.cell.as_str(),
            if *up { "healthy" } else { "down" },
            h[HostState::Ready as usize],
            h[HostState::Suspect as usize],
            h[HostState::Down as usize],
            h[HostState::Joining as usize] + h[HostState::Draining as usize],
            cell.workloads,
            cell.replicas,
            cell.pending,
            cpu
        );
    }
    match ops.request(0, &Message::TenantsRequest, Duration::from_secs(10)).await {
        Ok(Message::Tenants(tenants)) => {
            println!("tenants: {}", tenants.len());
            for t in tenants {
                let home = t.home_cell.map(|c| c.to_string()).unwrap_or_default();
                println!(
                    "  {:<20} home {:<6} quota {} replicas, {} mCPU",
                    t.id.as_str(),
                    home,
                    t.quota.replicas,
                    t.quota.cpu_milli
                );
            }
            Ok(())
        }
        other => Err(runtime(format!("listing tenants: {other:?}"))),
    }
}

/// Quota flags of `tenant create`.
pub struct QuotaArgs {
    /// CPU, thousandths of a core.
    pub cpu_milli: u64,
    /// Memory, MiB.
    pub memory_mib: u64,
    /// Replicas.
    pub replicas: u32,
    /// Workloads.
    pub workloads: u32,
}

/// Creates a tenant and writes its credentials to DATA/pki/NAME.{crt,key}.
pub async fn tenant_create(data: &Path, name: &str, quota: QuotaArgs) -> Result<(), Failure> {
    let id = TenantId::new(name).map_err(|e| input(format!("NAME: {e}")))?;
    let tenant = Tenant {
        id: id.clone(),
        quota: Quota {
            cpu_milli: quota.cpu_milli,
            memory_mib: quota.memory_mib,
            replicas: quota.replicas,
            workloads: quota.workloads,
        },
        home_cell: None,
    };
    cellplane_api::Validate::validate(&tenant).map_err(input)?;
    let ops = operator(data).await?;
    match ops.request(0, &Message::PutTenant(Box::new(tenant)), Duration::from_secs(30)).await {
        Ok(Message::TenantCreated(made)) => {
            let identity = Identity::Client { tenant: id, role: Role::Tenant };
            let credentials = Credentials {
                certificate: made.certificate_der.into(),
                key: made.key_der.into(),
                identity,
            };
            credentials.save(&data.join("pki"), name).map_err(runtime)?;
            let home = made.tenant.home_cell.map(|c| c.to_string()).unwrap_or_default();
            println!(
                "tenant {name} created, home cell {home}; credentials in {}",
                data.join("pki").join(format!("{name}.crt")).display()
            );
            Ok(())
        }
        other => Err(runtime(format!("creating tenant {name}: {other:?}"))),
    }
}

async fn client(data: &Path, tenant: &str) -> Result<Client, Failure> {
    let pki = data.join("pki");
    if !pki.join(format!("{tenant}.crt")).exists() {
        return Err(input(format!(
            "--tenant {tenant}: no credentials in {} (run `cellplane tenant create {tenant}`)",
            pki.display()
        )));
    }
    Client::connect(router_addr(data)?, ROUTER, &pki, tenant).await.map_err(sdk)
}

fn sdk(e: cellplane_sdk::Error) -> Failure {
    match e {
        cellplane_sdk::Error::Invalid(_)
        | cellplane_sdk::Error::Unauthorized(_)
        | cellplane_sdk::Error::Credentials(_) => input(e),
        other => runtime(other),
    }
}

/// Applies every workload of a manifest, all or nothing.
pub async fn apply(data: &Path, tenant: &str, file: &PathBuf) -> Result<(), Failure> {
    let text =
        std::fs::read_to_string(file).map_err(|e| input(format!("{}: {e}", file.display())))?;
    let specs = cellplane_sdk::manifest::parse(&text)
        .map_err(|e| input(format!("{}: {e}", file.display())))?;
    let client = client(data, tenant).await?;
    let existing: Vec<String> =
        client.list().await.map_err(sdk)?.into_iter().map(|w| w.spec.name.to_string()).collect();
    let mut created: Vec<String> = Vec::new();
    for spec in specs {
        let name = spec.name.to_string();
        if let Err(e) = client.apply(spec).await {
            // All or nothing: what this run created goes again.
            for done in &created {
                let _ = client.delete(done).await;
            }
            return Err(sdk(e));
        }
        if !existing.contains(&name) {
            created.push(name.clone());
        }
        println!("applied {name}");
    }
    Ok(())
}

/// Shows one workload, or lists them all.
pub async fn get(data: &Path, tenant: &str, name: Option<&str>) -> Result<(), Failure> {
    let client = client(data, tenant).await?;
    let workloads = match name {
        Some(name) => vec![client.get(name).await.map_err(sdk)?],
        None => client.list().await.map_err(sdk)?,
    };
    println!("{:<24} {:<10} {:>8} {:>8} {:>8}", "name", "kind", "replicas", "placed", "running");
    for w in workloads {
        let kind = match &w.spec.kind {
            cellplane_api::WorkloadKind::Container(_) => "container",
            cellplane_api::WorkloadKind::Vm(_) => "vm",
        };
        let placed = w.replicas.iter().filter(|r| r.host.is_some()).count();
        let running =
            w.replicas.iter().filter(|r| r.phase == cellplane_api::ReplicaPhase::Running).count();
        println!(
            "{:<24} {:<10} {:>8} {:>8} {:>8}",
            w.spec.name.as_str(),
            kind,
            w.spec.replicas,
            placed,
            running
        );
    }
    Ok(())
}

/// Deletes a workload.
pub async fn delete(data: &Path, tenant: &str, name: &str) -> Result<(), Failure> {
    client(data, tenant).await?.delete(name).await.map_err(sdk)?;
    println!("deleted {name}");
    Ok(())
}

/// Scales a workload.
pub async fn scale(data: &Path, tenant: &str, name: &str, replicas: u32) -> Result<(), Failure> {
    client(data, tenant).await?.scale(name, replicas).await.map_err(sdk)?;
    println!("scaled {name} to {replicas}");
    Ok(())
}

/// Prints the tenant's workload changes until interrupted.
pub async fn watch(data: &Path, tenant: &str) -> Result<(), Failure> {
    let client = client(data, tenant).await?;
    let mut events = client.watch().await.map_err(sdk)?;
    while let Some(event) = events.next().await {
        match event.map_err(sdk)? {
            Event::Changed(w) => {
                let running = w
                    .replicas
                    .iter()
                    .filter(|r| r.phase == cellplane_api::ReplicaPhase::Running)
                    .count();
                println!("{} {}/{} running", w.spec.name.as_str(), running, w.replicas.len());
            }
            Event::Deleted(name) => println!("{} deleted", name.as_str()),
        }
    }
    Ok(())
}
