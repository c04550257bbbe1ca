//! A simulated fleet process against a cell process over QUIC on loopback: join time, steady
//! CPU of both, resident memory per simulated host, heartbeats handled. The floor beside the
//! cell's CPU is the same cell idle, measured in the same run.
//!
//! `cargo build --release -p cellplane && cargo run --release -p cellplane-perf --bin
//! bench-fleet [-- --hosts N]` (it runs the `cellplane` binary next to its own).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cellplane_api::wire::{CellSummary, Message};
use cellplane_api::{HostState, Name, TenantId};
use cellplane_chaos::process::Killed;
use cellplane_perf::{binary, cores, report, rss_kib};
use cellplane_transport::identity::load_ca_certificate;
use cellplane_transport::{CertificateAuthority, Connection, Credentials, Identity, Role, Setup};

const STEADY: Duration = Duration::from_secs(10);

async fn summary(router: &Connection) -> CellSummary {
    match router.request(0, &Message::SummaryRequest, Duration::from_secs(30)).await {
        Ok(Message::Summary(summary)) => *summary,
        other => panic!("summary: {other:?}"),
    }
}

fn setup(dir: &Path, hosts: u64) {
    let pki = dir.join("pki");
    let ca = CertificateAuthority::generate("bench").expect("ca");
    ca.save(&pki).expect("save ca");
    let name = |s: &str| Name::new(s).expect("name");
    for (identity, stem) in [
        (Identity::Cell(name("c1")), "c1"),
        (Identity::Router(name("r1")), "r1"),
        (Identity::Host(name("fleet")), "fleet"),
        (
            Identity::Client { tenant: TenantId::new("ops").expect("name"), role: Role::Operator },
            "ops",
        ),
    ] {
        ca.issue(&identity).expect("issue").save(&pki, stem).expect("save");
    }
    let config = format!("cell = \"c1\"\nlisten = \"127.0.0.1:0\"\nhosts_max = {hosts}\n");
    std::fs::write(dir.join("cell.toml"), config).expect("config");
}

fn first_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line).expect("read");
    line
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let hosts: u64 = args
        .iter()
        .position(|a| a == "--hosts")
        .and_then(|i| args.get(i + 1))
        .map_or(100_000, |v| v.parse().expect("a number"));
    let dir = tempfile::tempdir().expect("tempdir");
    setup(dir.path(), hosts);
    let bin = binary();
    let mut cell = Killed(
        Command::new(&bin)
            .args(["cell", "--config"])
            .arg(dir.path().join("cell.toml"))
            .arg("--data")
            .arg(dir.path().join("data"))
            .arg("--pki")
            .arg(dir.path().join("pki"))
            .stdout(Stdio::piped())
            .spawn()
            .expect("cell"),
    );
    let line = first_line(&mut cell.0);
    let addr: SocketAddr = line.split_whitespace().nth(4).expect("address").parse().expect("addr");
    let pki = dir.path().join("pki");
    let ca = load_ca_certificate(&pki).expect("ca");
    let setup = Setup::new(Credentials::load(&pki, "r1").expect("creds"), ca);
    let router =
        cellplane_transport::connect(addr, &Identity::Cell(Name::new("c1").expect("name")), &setup)
            .await
            .expect("connect");
    let cell_pid = cell.0.id();
    println!(
        "fleet benchmark: {hosts} simulated hosts, 1 s heartbeats, one cell, QUIC on loopback"
    );
    report(
        "cell CPU, idle (floor)",
        cores(&[cell_pid], Duration::from_secs(3)).await * 1e3,
        "millicores",
    );

    let started = Instant::now();
    let mut fleet = Killed(
        Command::new(&bin)
            .args(["hosts", "--sim", &hosts.to_string(), "--cell", &addr.to_string()])
            .args(["--cell-name", "c1", "--credentials", "fleet", "--pki"])
            .arg(&pki)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("fleet"),
    );
    let fleet_pid = fleet.0.id();
    let line = tokio::task::spawn_blocking({
        let mut child = fleet.0.stdout.take().map(|out| (out,));
        move || {
            let (out,) = child.take().expect("piped");
            let mut line = String::new();
            BufReader::new(out).read_line(&mut line).expect("read");
            line
        }
    })
    .await
    .expect("reader");
    report("fleet: every host registered and subscribed", started.elapsed().as_secs_f64(), "s");
    assert!(line.starts_with("fleet of"), "{line:?}");
    let ready = HostState::Ready as usize;
    while summary(&router).await.hosts[ready] < hosts as u32 {
        assert!(started.elapsed() < Duration::from_secs(300), "never all ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report("all hosts ready, from the fleet's start", started.elapsed().as_secs_f64(), "s");

    let (cell_pids, fleet_pids) = ([cell_pid], [fleet_pid]);
    let (cell_cores, fleet_cores) =
        tokio::join!(cores(&cell_pids, STEADY), cores(&fleet_pids, STEADY));
    let after = summary(&router).await;
    report("cell CPU, steady heartbeats", cell_cores * 1e3, "millicores");
    report("fleet CPU, steady heartbeats", fleet_cores * 1e3, "millicores");
    report("heartbeats handled (every host stayed ready)", hosts as f64, "/s");
    println!(
        "  ({} of {hosts} hosts ready after {} s of steady state)",
        after.hosts[ready],
        STEADY.as_secs()
    );
    report(
        "fleet resident memory per simulated host",
        (rss_kib(fleet_pid) * 1024) as f64 / hosts as f64,
        "B",
    );
    report("cell resident memory per host", (rss_kib(cell_pid) * 1024) as f64 / hosts as f64, "B");
    drop(fleet);
    drop(cell);
}
