//! A whole region on this machine, the way an operator brings one up: `cellplane up` from empty
//! storage (router, cells and simulated fleets as separate processes, QUIC on loopback, every
//! host heartbeating each second), then a tenant and one large workload through the SDK. By
//! default 10 cells of 100,000 hosts: the million-host region of DESIGN.md's scale targets.
//!
//! `cargo build --release -p cellplane && cargo run --release -p cellplane-perf --bin
//! bench-region [-- --cells N --hosts N --replicas N]` (`--hosts` is per cell).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cellplane_api::HostState;
use cellplane_api::Name;
use cellplane_api::wire::{Message, RegionSummary};
use cellplane_perf::{binary, cores, rate, report, rss_kib};
use cellplane_sdk::{Client, Workload};
use cellplane_transport::identity::load_ca_certificate;
use cellplane_transport::{Connection, Credentials, Identity, Setup};

const STEADY: Duration = Duration::from_secs(10);

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map_or(default, |v| v.parse().expect("a number"))
}

/// Runs `cellplane ARGS`, failing the benchmark if it fails.
fn cellplane(args: &[&str]) {
    let status = Command::new(binary())
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run cellplane");
    assert!(status.success(), "cellplane {args:?} failed");
}

/// The pids `up` recorded, by name (router, cells, fleets).
fn pids(data: &Path) -> Vec<(String, u32)> {
    let dir = std::fs::read_dir(data.join("run")).expect("run dir");
    dir.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().strip_suffix(".pid")?.to_owned();
            let pid = std::fs::read_to_string(e.path()).ok()?.trim().parse().ok()?;
            Some((name, pid))
        })
        .collect()
}

async fn operator(data: &Path) -> Connection {
    let pki = data.join("pki");
    let addr = std::fs::read_to_string(data.join("run/router.addr")).expect("router address");
    let setup = Setup::new(
        Credentials::load(&pki, "ops").expect("operator credentials"),
        load_ca_certificate(&pki).expect("ca"),
    );
    let router = Identity::Router(Name::new("router").expect("name"));
    cellplane_transport::connect(addr.trim().parse().expect("address"), &router, &setup)
        .await
        .expect("connect to the router")
}

async fn summary(ops: &Connection) -> RegionSummary {
    match ops.request(0, &Message::RegionSummaryRequest, Duration::from_secs(30)).await {
        Ok(Message::RegionSummary(summary)) => *summary,
        other => panic!("region summary: {other:?}"),
    }
}

fn ready(summary: &RegionSummary) -> u64 {
    summary.cells.iter().map(|(c, _)| u64::from(c.hosts[HostState::Ready as usize])).sum()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (cells, hosts, replicas) =
        (arg("--cells", 10), arg("--hosts", 100_000), arg("--replicas", 10_000));
    let total = cells * hosts;
    println!("region benchmark: {cells} cells x {hosts} simulated hosts, {replicas} replicas");
    let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into()))
        .expect("temp dir");
    let data = dir.path().join("region");
    // Addresses are written into the spec: pick free ports.
    let free_port = || {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("a port");
        socket.local_addr().expect("port").port()
    };
    let mut spec = format!(
        "region = \"bench\"\nrouter = \"127.0.0.1:{}\"\n\n[[sites]]\nid = \"dc1\"\nkind = \"cloud\"\nlocation = \"eu\"\n",
        free_port()
    );
    for c in 0..cells {
        spec += &format!(
            "\n[[cells]]\nid = \"c{c}\"\nsite = \"dc1\"\nlisten = \"127.0.0.1:{}\"\nhosts = {hosts}\n",
            free_port()
        );
    }
    let spec_path = dir.path().join("region.toml");
    std::fs::write(&spec_path, spec).expect("spec");
    let (spec_arg, data_arg) = (spec_path.to_str().expect("utf-8"), data.to_str().expect("utf-8"));

    // Bring-up: `up` returns once every host of every cell is ready.
    let start = Instant::now();
    cellplane(&["up", "--spec", spec_arg, "--data", data_arg]);
    report("region up from empty storage, every host ready", start.elapsed().as_secs_f64(), "s");
    let ops = operator(&data).await;
    let region = summary(&ops).await;
    report("hosts ready", ready(&region) as f64, "");
    assert_eq!(ready(&region), total, "up returned before every host was ready");

    // Steady state: every host heartbeating once a second.
    let processes = pids(&data);
    let all: Vec<u32> = processes.iter().map(|(_, pid)| *pid).collect();
    let steady = cores(&all, STEADY).await;
    report("steady CPU, whole region (all processes)", steady * 1e3, "millicores");
    report("heartbeats per second, region-wide", total as f64, "/s");
    // `up` names cells by their id, their fleets `<id>-hosts`, and the router `router`.
    let rss = |fleets: bool| -> u64 {
        let pick = |n: &str| n != "router" && n.ends_with("-hosts") == fleets;
        processes.iter().filter(|(n, _)| pick(n)).map(|(_, p)| rss_kib(*p)).sum()
    };
    report("cell resident memory per host", (rss(false) * 1024) as f64 / total as f64, "B");
    let fleet_rss = (rss(true) * 1024) as f64 / total as f64;
    report("fleet resident memory per simulated host", fleet_rss, "B");
    let after = summary(&ops).await;
    report("hosts still ready after the steady window", ready(&after) as f64, "");

    // A tenant and one workload of `replicas` replicas, through the SDK.
    cellplane(&[
        "tenant",
        "create",
        "acme",
        "--data",
        data_arg,
        "--replicas",
        &replicas.to_string(),
        "--cpu-milli",
        &(replicas * 100).to_string(),
        "--memory-mib",
        &(replicas * 128).to_string(),
    ]);
    let pki = data.join("pki");
    let addr = std::fs::read_to_string(data.join("run/router.addr")).expect("router address");
    let client = Client::connect(addr.trim().parse().expect("address"), "router", &pki, "acme")
        .await
        .expect("connect as acme");
    let web = Workload::container("web", "nginx:1.27")
        .replicas(u32::try_from(replicas).expect("replicas fit u32"))
        .cpu_milli(100)
        .memory_mib(128)
        .build()
        .expect("spec");
    let start = Instant::now();
    client.apply(web).await.expect("apply");
    let applied = start.elapsed();
    report("apply acknowledged (every placement durable)", applied.as_secs_f64() * 1e3, "ms");
    report("durable placements", rate(replicas, applied), "/s");
    loop {
        let status = client.get("web").await.expect("get");
        let running =
            status.replicas.iter().filter(|r| r.phase == cellplane_api::ReplicaPhase::Running);
        if running.count() as u64 == replicas {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "replicas never all ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    report("every replica running, from the apply", start.elapsed().as_secs_f64(), "s");
    drop((client, ops));
    cellplane(&["down", "--data", data_arg]);
}
