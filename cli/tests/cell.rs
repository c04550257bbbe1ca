//! `cellplane cell` as a real process over real QUIC on 127.0.0.1, killed with SIGKILL and
//! started again on the same data.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cellplane_api::wire::{
    Apply, ErrorCode, Heartbeat, Message, Register, StatusReport, WorkloadRef, WorkloadStatus,
};
use cellplane_api::{
    Capabilities, CellId, ContainerSpec, Controller, Host, HostId, HostState, Name, Placement,
    Quota, ReplicaPhase, Resources, SiteId, Tenant, TenantId, WorkloadKind, WorkloadName,
    WorkloadSpec,
};
use cellplane_chaos::process::Killed;
use cellplane_transport::{Connection, Credentials, Identity, Setup, connect};

const DEADLINE: Duration = Duration::from_secs(10);

fn cellplane(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_cellplane")).args(args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A cell process and the address it serves on.
struct CellProcess {
    child: Child,
    addr: SocketAddr,
    epoch: u64,
}

impl CellProcess {
    fn start(dir: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cellplane"))
            .args(["cell", "--config"])
            .arg(dir.join("cell.toml"))
            .arg("--data")
            .arg(dir.join("data"))
            .arg("--pki")
            .arg(dir.join("pki"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        // "cell c1 serving on ADDR at epoch N"
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words.get(2), Some(&"serving"), "unexpected first line: {line:?}");
        Self { child, addr: words[4].parse().unwrap(), epoch: words[7].parse().unwrap() }
    }

    async fn as_peer(&self, dir: &Path, stem: &str) -> Connection {
        let pki = dir.join("pki");
        let ca = cellplane_transport::identity::load_ca_certificate(&pki).unwrap();
        let setup = Setup::new(Credentials::load(&pki, stem).unwrap(), ca);
        let cell = Identity::Cell(Name::new("c1").unwrap());
        connect(self.addr, &cell, &setup).await.unwrap()
    }
}

impl Drop for CellProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn setup_region(dir: &Path) {
    setup_region_with(dir, "hosts_max = 64\nshard_hosts = 16", 400, 800);
}

fn setup_region_with(dir: &Path, hosts: &str, suspect_after_ms: u64, down_after_ms: u64) {
    let pki = dir.join("pki");
    let p = pki.to_str().unwrap();
    cellplane(&["pki", "init", "--dir", p]);
    cellplane(&["pki", "issue", "--dir", p, "--kind", "cell", "--id", "c1"]);
    cellplane(&["pki", "issue", "--dir", p, "--kind", "router", "--id", "r1"]);
    cellplane(&["pki", "issue", "--dir", p, "--kind", "host", "--id", "fleet"]);
    cellplane(&["pki", "issue", "--dir", p, "--kind", "client", "--id", "acme"]);
    cellplane(&["pki", "issue", "--dir", p, "--kind", "client", "--id", "other"]);
    let config = format!(
        "cell = \"c1\"\nlisten = \"127.0.0.1:0\"\n{hosts}\ntick_ms = 50\n\
         [lease]\nsuspect_after_ms = {suspect_after_ms}\ndown_after_ms = {down_after_ms}\n"
    );
    std::fs::write(dir.join("cell.toml"), config).unwrap();
}

/// Creates tenant acme through `router`, with `cpu_milli` (and as much memory) and `replicas`.
async fn put_acme(router: &Connection, cpu_milli: u64, replicas: u32) {
    let quota = Quota { cpu_milli, memory_mib: cpu_milli, replicas, workloads: 5 };
    let tenant = Tenant { id: TenantId::new("acme").unwrap(), quota, home_cell: None };
    let put = router.request(0, &Message::PutTenant(Box::new(tenant)), DEADLINE).await;
    assert!(matches!(put, Ok(Message::Done(_))), "{put:?}");
}

fn host(id: u64) -> Host {
    Host {
        id: HostId(id),
        cell: CellId::new("c1").unwrap(),
        site: SiteId::new("s1").unwrap(),
        zone: Name::new("z1").unwrap(),
        capacity: Resources { cpu_milli: 4_000, memory_mib: 8_192, disk_gib: 50, gpus: 0 },
        capabilities: Capabilities { container: true, vm: false },
        labels: Default::default(),
        state: HostState::Joining,
    }
}

fn web(replicas: u32) -> WorkloadSpec {
    WorkloadSpec {
        name: WorkloadName::new("web").unwrap(),
        kind: WorkloadKind::Container(ContainerSpec {
            image: "web:1".into(),
            command: vec![],
            env: Default::default(),
        }),
        controller: Controller::Replicated,
        replicas,
        resources: Resources { cpu_milli: 1_000, memory_mib: 256, disk_gib: 1, gpus: 0 },
        placement: Placement::default(),
        update: Default::default(),
    }
}

fn web_ref() -> Message {
    Message::Get(Box::new(WorkloadRef {
        tenant: TenantId::new("acme").unwrap(),
        workload: WorkloadName::new("web").unwrap(),
    }))
}

async fn beat(hosts: &Connection, seq: u64) {
    for id in 1..=3 {
        let beat = Heartbeat { host: HostId(id), seq, epoch: 0, state: HostState::Ready };
        hosts.send(0, &Message::Heartbeat(beat)).await.unwrap();
    }
}

/// Heartbeats while waiting for every replica of web to have a host.
async fn until_placed(client: &Connection, hosts: &Connection, replicas: usize) -> WorkloadStatus {
    for seq in 1.. {
        beat(hosts, seq).await;
        if let Ok(Message::Workload(status)) = client.request(0, &web_ref(), DEADLINE).await
            && status.replicas.iter().filter(|r| r.host.is_some()).count() == replicas
        {
            return *status;
        }
        assert!(seq < 600, "web never placed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_cell_loses_nothing_it_acknowledged_and_fences_the_old_epoch() {
    let dir = tempfile::tempdir().unwrap();
    setup_region(dir.path());
    let cell = CellProcess::start(dir.path());
    let router = cell.as_peer(dir.path(), "r1").await;
    let hosts = cell.as_peer(dir.path(), "fleet").await;
    let client = cell.as_peer(dir.path(), "acme").await;

    put_acme(&router, 100_000, 50).await;
    for id in 1..=3 {
        let register = Message::Register(Box::new(Register { host: host(id) }));
        assert!(matches!(hosts.request(0, &register, DEADLINE).await, Ok(Message::Done(_))));
    }
    let apply = Message::Apply(Box::new(Apply {
        tenant: TenantId::new("acme").unwrap(),
        idempotency_key: [7; 16],
        spec: web(5),
    }));
    let acked = client.request(0, &apply, DEADLINE).await;
    assert!(matches!(acked, Ok(Message::Done(v)) if v > 0), "{acked:?}");
    let before = until_placed(&client, &hosts, 5).await;

    // Another tenant cannot read it, and the refusal says nothing about it.
    let other = cell.as_peer(dir.path(), "other").await;
    let peek = other.request(0, &web_ref(), DEADLINE).await.unwrap_err();
    assert!(peek.to_string().contains("act only for tenant other"), "{peek}");

    // SIGKILL, then the same data again.
    let old_epoch = cell.epoch;
    drop(cell);
    let cell = CellProcess::start(dir.path());
    assert_eq!(cell.epoch, old_epoch + 1);
    let hosts = cell.as_peer(dir.path(), "fleet").await;
    let client = cell.as_peer(dir.path(), "acme").await;
    let after = until_placed(&client, &hosts, 5).await;
    let slots = |s: &WorkloadStatus| -> Vec<_> { s.replicas.iter().map(|r| r.host).collect() };
    assert_eq!(slots(&after), slots(&before), "every acknowledged assignment survived");

    // A host that subscribes gets its assignments under the new epoch.
    let holder = after.replicas[0].host.unwrap();
    let mut stream = hosts.watch(0, &Message::Subscribe(vec![holder])).await.unwrap();
    let mut assigned = 0;
    loop {
        match stream.next().await.unwrap().unwrap() {
            Message::Assign(a) => {
                assert_eq!(a.replica.epoch, old_epoch + 1);
                assigned += 1;
            }
            Message::Synced(epoch) => {
                assert_eq!(epoch, old_epoch + 1);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(assigned, after.replicas.iter().filter(|r| r.host == Some(holder)).count());

    // A report from the old incarnation is fenced off: the slot does not move.
    let stale = StatusReport {
        host: holder,
        tenant: TenantId::new("acme").unwrap(),
        workload: WorkloadName::new("web").unwrap(),
        ordinal: 0,
        epoch: old_epoch,
        phase: ReplicaPhase::Failed,
        detail: "from before the failover".into(),
    };
    hosts.send(0, &Message::Status(Box::new(stale))).await.unwrap();
    let apply_again = client.request(0, &apply, DEADLINE).await; // a retried apply: a no-op
    assert!(matches!(apply_again, Ok(Message::Done(_))));
    let Message::Workload(now) = client.request(0, &web_ref(), DEADLINE).await.unwrap() else {
        panic!("get")
    };
    assert_eq!(now.replicas[0].host, Some(holder), "a stale report moved a slot");
    assert_eq!(now.spec.replicas, 5);

    // Bad input over the wire: a typed refusal, and the cell keeps serving.
    let register = Message::Register(Box::new(Register { host: host(9) }));
    let refused = client.request(0, &register, DEADLINE).await.unwrap_err();
    assert!(matches!(
        refused,
        cellplane_transport::TransportError::Remote(ref e) if e.code == ErrorCode::Unauthorized
    ));
    assert!(client.request(0, &web_ref(), DEADLINE).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_agent_runs_a_process_workload_and_reports_its_exit() {
    let dir = tempfile::tempdir().unwrap();
    setup_region(dir.path());
    let cell = CellProcess::start(dir.path());
    let router = cell.as_peer(dir.path(), "r1").await;
    let client = cell.as_peer(dir.path(), "acme").await;
    put_acme(&router, 10_000, 5).await;
    let logs = dir.path().join("logs");
    let agent = start_agent(dir.path(), cell.addr, &logs);
    let mut spec = web(1);
    spec.kind = WorkloadKind::Container(ContainerSpec {
        image: "none".into(),
        command: vec!["sh".into(), "-c".into(), "echo started $ROLE; sleep 1; exit 7".into()],
        env: [("ROLE".to_string(), "web".to_string())].into(),
    });
    let apply = Message::Apply(Box::new(Apply {
        tenant: TenantId::new("acme").unwrap(),
        idempotency_key: [1; 16],
        spec,
    }));
    assert!(matches!(client.request(0, &apply, DEADLINE).await, Ok(Message::Done(_))));
    // The agent registers, is assigned the replica, runs it and reports running; when the
    // process exits the report changes (the driver restarts it with backoff).
    let mut phases = Vec::new();
    for _ in 0..3_000 {
        if let Ok(Message::Workload(status)) = client.request(0, &web_ref(), DEADLINE).await {
            let replica = &status.replicas[0];
            if replica.host == Some(HostId(5)) && phases.last() != Some(&replica.phase) {
                phases.push(replica.phase);
            }
        }
        let ran = phases.contains(&ReplicaPhase::Running);
        if ran && phases.last() != Some(&ReplicaPhase::Running) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(agent);
    let running = phases.iter().position(|p| *p == ReplicaPhase::Running).expect("never ran");
    assert!(phases.len() > running + 1, "the exit was never reported: {phases:?}");
    let log = std::fs::read_to_string(logs.join("acme.web.0.log")).unwrap();
    assert!(log.starts_with("started web\n"), "{log:?}");
}

async fn summary(router: &Connection) -> cellplane_api::wire::CellSummary {
    match router.request(0, &Message::SummaryRequest, DEADLINE).await {
        Ok(Message::Summary(summary)) => *summary,
        other => panic!("summary: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_of_ten_thousand_joins_stays_ready_and_goes_suspect_then_down_when_killed() {
    const HOSTS: u32 = 10_000;
    let (ready, suspect, down) =
        (HostState::Ready as usize, HostState::Suspect as usize, HostState::Down as usize);
    let dir = tempfile::tempdir().unwrap();
    setup_region_with(dir.path(), "hosts_max = 16384\nshard_hosts = 1024", 2_000, 4_000);
    let cell = CellProcess::start(dir.path());
    let router = cell.as_peer(dir.path(), "r1").await;
    let mut fleet = Killed(
        Command::new(env!("CARGO_BIN_EXE_cellplane"))
            .args(["hosts", "--sim", &HOSTS.to_string(), "--cell", &cell.addr.to_string()])
            .args(["--cell-name", "c1", "--credentials", "fleet", "--pki"])
            .arg(dir.path().join("pki"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = fleet.0.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    })
    .await
    .unwrap();
    assert!(line.starts_with("fleet of 10000 hosts joined cell c1"), "{line:?}");
    let mut polls = 0;
    while summary(&router).await.hosts[ready] < HOSTS {
        polls += 1;
        assert!(polls < 1_200, "the fleet never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Longer than a lease: heartbeats keep every host ready.
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    assert_eq!(summary(&router).await.hosts[ready], HOSTS, "hosts dropped while beating");

    fleet.0.kill().unwrap();
    fleet.0.wait().unwrap();
    let killed = std::time::Instant::now();
    let mut saw_suspect = false;
    loop {
        let now = summary(&router).await;
        saw_suspect |= now.hosts[suspect] > 0;
        if now.hosts[down] == HOSTS {
            break;
        }
        assert!(killed.elapsed() < Duration::from_secs(60), "never all down: {:?}", now.hosts);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(saw_suspect, "hosts went down without being suspect first");
    // Their last beats came at most one interval before the kill: none is down sooner.
    assert!(killed.elapsed() >= Duration::from_millis(4_000 - 1_000));
}

/// The agent of host 5 as a child process, logging replicas under `logs`.
fn start_agent(dir: &Path, addr: SocketAddr, logs: &Path) -> Killed {
    Killed(
        Command::new(env!("CARGO_BIN_EXE_cellplane"))
            .args(["host", "--cell", &addr.to_string(), "--cell-name", "c1", "--pki"])
            .arg(dir.join("pki"))
            .args(["--credentials", "fleet", "--id", "5", "--logs"])
            .arg(logs)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// One replica of a process that prints its pid once per start, then sleeps.
fn sleeper(name: &str) -> WorkloadSpec {
    let mut spec = web(1);
    spec.name = WorkloadName::new(name).unwrap();
    spec.kind = WorkloadKind::Container(ContainerSpec {
        image: "none".into(),
        command: vec!["sh".into(), "-c".into(), "echo started $$; exec sleep 600".into()],
        env: Default::default(),
    });
    spec
}

/// Polls web until `check` holds for its first replica.
async fn until_replica(
    client: &Connection,
    check: impl Fn(&cellplane_api::Replica) -> bool,
) -> cellplane_api::Replica {
    for _ in 0..3_000 {
        if let Ok(Message::Workload(status)) = client.request(0, &web_ref(), DEADLINE).await
            && check(&status.replicas[0])
        {
            return status.replicas[0].clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("web never got there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_outlive_a_killed_cell_and_are_reconciled_not_restarted() {
    let dir = tempfile::tempdir().unwrap();
    // A fixed port, so that the agent finds the cell again after its restart.
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    setup_region(dir.path());
    let config = std::fs::read_to_string(dir.path().join("cell.toml")).unwrap();
    let config = config.replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    std::fs::write(dir.path().join("cell.toml"), config).unwrap();
    let cell = CellProcess::start(dir.path());
    let router = cell.as_peer(dir.path(), "r1").await;
    put_acme(&router, 10_000, 5).await;
    let logs = dir.path().join("logs");
    let agent = start_agent(dir.path(), cell.addr, &logs);
    let spec = sleeper("web");
    let apply = Message::Apply(Box::new(Apply {
        tenant: TenantId::new("acme").unwrap(),
        idempotency_key: [2; 16],
        spec,
    }));
    let client = cell.as_peer(dir.path(), "acme").await;
    assert!(matches!(client.request(0, &apply, DEADLINE).await, Ok(Message::Done(_))));
    let first = until_replica(&client, |r| r.phase == ReplicaPhase::Running).await;
    let log_path = logs.join("acme.web.0.log");
    let log = std::fs::read_to_string(&log_path).unwrap();
    let pid: u32 = log.trim().trim_start_matches("started ").parse().unwrap();
    let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
    assert!(alive(pid));

    // The cell dies; the workload does not.
    drop(cell);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(alive(pid), "the workload died with its cell");

    // The cell comes back on the same data: the agent reconnects and reconciles.
    let cell = CellProcess::start(dir.path());
    let client = cell.as_peer(dir.path(), "acme").await;
    let after = until_replica(&client, |r| r.phase == ReplicaPhase::Running).await;
    assert_eq!(after.host, first.host, "the acknowledged assignment was kept");
    assert_eq!(after.epoch, first.epoch + 1);
    assert!(alive(pid), "reconciliation restarted the workload");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert_eq!(log.lines().count(), 1, "the workload ran twice: {log:?}");
    drop(agent);
    let _ = Command::new("kill").arg(pid.to_string()).status();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_adopts_what_its_killed_predecessor_left_running() {
    let dir = tempfile::tempdir().unwrap();
    // Leases long enough that the host stays ready while its agent restarts (as under a
    // supervisor that restarts it at once); past the lease the cell would re-place its slots.
    setup_region_with(dir.path(), "hosts_max = 64\nshard_hosts = 16", 5_000, 10_000);
    let cell = CellProcess::start(dir.path());
    let router = cell.as_peer(dir.path(), "r1").await;
    put_acme(&router, 10_000, 5).await;
    let logs = dir.path().join("logs");
    let agent = start_agent(dir.path(), cell.addr, &logs);
    let client = cell.as_peer(dir.path(), "acme").await;
    // Two sleeping workloads; each prints its pid once per start.
    for (key, name) in [(3u8, "web"), (4, "gone")] {
        let spec = sleeper(name);
        let tenant = TenantId::new("acme").unwrap();
        let apply = Message::Apply(Box::new(Apply { tenant, idempotency_key: [key; 16], spec }));
        assert!(matches!(client.request(0, &apply, DEADLINE).await, Ok(Message::Done(_))));
    }
    let pid_of = |name: &str| -> Option<u32> {
        let log = std::fs::read_to_string(logs.join(format!("acme.{name}.0.log"))).ok()?;
        assert!(log.lines().count() <= 1, "{name} started twice: {log:?}");
        log.trim().strip_prefix("started ")?.parse().ok()
    };
    let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pid_of("web").is_none() || pid_of("gone").is_none() {
        assert!(std::time::Instant::now() < deadline, "the workloads never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (web_pid, gone_pid) = (pid_of("web").unwrap(), pid_of("gone").unwrap());

    // The agent is SIGKILLed: its workloads keep running. One is deleted meanwhile.
    drop(agent);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alive(web_pid) && alive(gone_pid), "the workloads died with their agent");
    let gone = Message::Delete(Box::new(WorkloadRef {
        tenant: TenantId::new("acme").unwrap(),
        workload: WorkloadName::new("gone").unwrap(),
    }));
    assert!(matches!(client.request(0, &gone, DEADLINE).await, Ok(Message::Done(_))));

    // A new agent on the same host and directory: it adopts web (same process, no second
    // start) and stops what no slot claims any more.
    let agent = start_agent(dir.path(), cell.addr, &logs);
    until_replica(&client, |r| r.phase == ReplicaPhase::Running).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while alive(gone_pid) {
        assert!(std::time::Instant::now() < deadline, "the deleted workload's process was kept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(alive(web_pid), "the adopted workload was killed");
    assert_eq!(pid_of("web"), Some(web_pid), "the workload was started again");

    // Adopted means controlled: deleting web stops its process.
    assert!(matches!(client.request(0, &web_delete(), DEADLINE).await, Ok(Message::Done(_))));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while alive(web_pid) {
        assert!(std::time::Instant::now() < deadline, "the adopted process outlived its delete");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(agent);
}

fn web_delete() -> Message {
    Message::Delete(Box::new(WorkloadRef {
        tenant: TenantId::new("acme").unwrap(),
        workload: WorkloadName::new("web").unwrap(),
    }))
}

#[test]
fn the_demo_brings_a_region_up_exercises_it_and_reports_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_cellplane"))
        .args(["demo", "--cells", "2", "--hosts", "400", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["cells"], 2);
    assert_eq!(report["hosts"], 400);
    assert_eq!(report["isolation_checks_passed"], 4);
    assert!(report["replicas"].as_u64().unwrap() > 0);
    assert!(report["placements_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(report["hosts_killed"], 20);
    // The demo fails unless every replica of the killed hosts was placed again.
    assert!(report["replacement_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn the_demo_refuses_impossible_sizes_as_bad_input() {
    let out = Command::new(env!("CARGO_BIN_EXE_cellplane"))
        .args(["demo", "--cells", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cells"));
}

/// The body of an HTTP GET of `/metrics` at `addr`.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: cellplane\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_serves_prometheus_metrics_of_hosts_heartbeats_and_commits() {
    let dir = tempfile::tempdir().unwrap();
    // Leases longer than the fleet's 1 s heartbeats, so that all hosts stay ready.
    setup_region_with(dir.path(), "hosts_max = 64\nshard_hosts = 16", 2_000, 4_000);
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let metrics = format!("127.0.0.1:{port}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_cellplane"))
        .args(["--metrics", &metrics, "--log-json", "cell", "--config"])
        .arg(dir.path().join("cell.toml"))
        .arg("--data")
        .arg(dir.path().join("data"))
        .arg("--pki")
        .arg(dir.path().join("pki"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let cell = Killed(child);
    let addr = line.split_whitespace().nth(4).unwrap().to_string();
    let _fleet = Killed(
        Command::new(env!("CARGO_BIN_EXE_cellplane"))
            .args(["hosts", "--sim", "20", "--cell", &addr, "--cell-name", "c1"])
            .args(["--credentials", "fleet", "--pki"])
            .arg(dir.path().join("pki"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut body = String::new();
    for _ in 0..600 {
        body = scrape(&metrics);
        if body.contains("cellplane_hosts{state=\"ready\"} 20")
            && body.contains("cellplane_heartbeats_total")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(body.contains("cellplane_hosts{state=\"ready\"} 20"), "{body}");
    assert!(body.contains("cellplane_heartbeats_total"), "{body}");
    assert!(body.contains("cellplane_storage_commit_seconds"), "{body}");
    assert!(body.contains("cellplane_storage_commits_total{outcome=\"ok\"}"), "{body}");
    drop(cell);
}

/// The dashboard in docs/ charts every metric the processes emit, by the names they emit.
#[test]
fn the_grafana_dashboard_uses_the_metric_names_the_code_emits() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("docs/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["targets"][0]["expr"].as_str().unwrap().to_string())
        .collect();
    let mut emitted = Vec::new();
    for file in [
        "cell/src/workloads.rs",
        "cell/src/shard.rs",
        "storage/src/group.rs",
        "region/src/router.rs",
    ] {
        let source = std::fs::read_to_string(root.join(file)).unwrap();
        for piece in source.split("!(\"").skip(1) {
            if let Some(name) = piece.split('"').next().filter(|n| n.starts_with("cellplane_")) {
                emitted.push(name.to_string());
            }
        }
    }
    assert!(emitted.len() >= 7, "{emitted:?}");
    for name in emitted {
        assert!(exprs.iter().any(|e| e.contains(&name)), "the dashboard does not chart {name}");
    }
}
