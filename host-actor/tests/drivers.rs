//! Runtime drivers with real processes: started, logged, restarted, killed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cellplane_api::{
    ContainerSpec, Controller, ReplicaPhase, Resources, TenantId, WorkloadKind, WorkloadName,
    WorkloadSpec,
};
use cellplane_host_actor::core::host::SlotKey;
use cellplane_host_actor::driver::{
    Driver, DriverError, DriverEvent, ProcessDriver, RestartPolicy, SLOT_VAR, SimDriver,
};
use tokio::sync::mpsc;

fn key(name: &str) -> SlotKey {
    (TenantId::new("acme").unwrap(), WorkloadName::new(name).unwrap(), 0)
}

fn process(name: &str, script: &str) -> WorkloadSpec {
    WorkloadSpec {
        name: WorkloadName::new(name).unwrap(),
        kind: WorkloadKind::Container(ContainerSpec {
            image: "none".into(),
            command: vec!["sh".into(), "-c".into(), script.into()],
            env: [("GREETING".to_string(), "hello from cellplane".to_string())].into(),
        }),
        controller: Controller::Replicated,
        replicas: 1,
        resources: Resources { cpu_milli: 100, memory_mib: 16, disk_gib: 0, gpus: 0 },
        placement: Default::default(),
        update: Default::default(),
    }
}

async fn next(events: &mut mpsc::Receiver<DriverEvent>) -> DriverEvent {
    tokio::time::timeout(Duration::from_secs(30), events.recv()).await.unwrap().unwrap()
}

#[tokio::test]
async fn a_process_runs_with_its_environment_logs_and_is_killed_on_stop() {
    let dir = tempfile::tempdir().unwrap();
    let (sender, mut events) = mpsc::channel(16);
    let driver = ProcessDriver::new(sender, dir.path().into(), RestartPolicy::default());
    driver.start(key("web"), &process("web", "echo $GREETING; exec sleep 60")).unwrap();
    let running = next(&mut events).await;
    assert_eq!(running.phase, ReplicaPhase::Running);
    let pid: u32 = running.detail.trim_start_matches("pid ").parse().unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    let log = driver.log_path(&key("web"));
    for _ in 0..300 {
        if std::fs::read_to_string(&log).unwrap_or_default().contains("hello from cellplane") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "hello from cellplane\n");
    assert_eq!(driver.running(), 1);
    driver.stop(&key("web"));
    assert_eq!(next(&mut events).await.phase, ReplicaPhase::Stopped);
    // Killed and reaped: the pid is gone.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert_eq!(driver.running(), 0);
}

#[tokio::test]
async fn an_exiting_process_is_restarted_with_backoff_then_reported_failed() {
    let dir = tempfile::tempdir().unwrap();
    let (sender, mut events) = mpsc::channel(16);
    let policy = RestartPolicy { backoff_initial_ms: 10, backoff_max_ms: 20, restarts_max: 2 };
    let driver = ProcessDriver::new(sender, dir.path().into(), policy);
    driver.start(key("job"), &process("job", "exit 3")).unwrap();
    let mut seen = Vec::new();
    loop {
        let event = next(&mut events).await;
        let done = event.phase == ReplicaPhase::Failed;
        seen.push((event.phase, event.detail.split(';').next().unwrap_or("").to_string()));
        if done {
            break;
        }
    }
    assert_eq!(seen.iter().filter(|(p, _)| *p == ReplicaPhase::Running).count(), 3);
    assert_eq!(seen.iter().filter(|(p, _)| *p == ReplicaPhase::Starting).count(), 2);
    assert!(seen.iter().skip(1).step_by(2).all(|(_, d)| d.contains("exit status: 3")), "{seen:?}");
    assert_eq!(driver.running(), 0);
}

#[tokio::test]
async fn what_a_driver_cannot_run_is_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (sender, _events) = mpsc::channel(16);
    let driver = ProcessDriver::new(sender, dir.path().into(), RestartPolicy::default());
    let mut empty = process("web", "true");
    if let WorkloadKind::Container(c) = &mut empty.kind {
        c.command.clear();
    }
    assert!(matches!(driver.start(key("web"), &empty), Err(DriverError::Unsupported { .. })));
    // A missing program is a failed start, reported, not a panic.
    let (sender, mut events) = mpsc::channel(16);
    let driver = ProcessDriver::new(sender, dir.path().into(), RestartPolicy::default());
    let mut missing = process("ghost", "true");
    if let WorkloadKind::Container(c) = &mut missing.kind {
        c.command = vec!["/nonexistent/program".into()];
    }
    driver.start(key("ghost"), &missing).unwrap();
    let event = next(&mut events).await;
    assert_eq!(event.phase, ReplicaPhase::Failed);
    assert!(event.detail.contains("cannot start"), "{}", event.detail);
}

#[tokio::test]
async fn the_sim_driver_replays_the_same_outcomes_from_the_same_seed() {
    let outcomes = |seed| async move {
        let (sender, mut events) = mpsc::channel(128);
        let driver = SimDriver::new(sender, 5, 300, seed);
        for i in 0..40 {
            driver.start(key(&format!("w{i}")), &process("w", "true")).unwrap();
        }
        let mut phases: Vec<(String, ReplicaPhase)> = Vec::new();
        for _ in 0..40 {
            let event = next(&mut events).await;
            phases.push((event.key.1.to_string(), event.phase));
        }
        phases.sort_by(|a, b| a.0.cmp(&b.0));
        phases
    };
    let a = outcomes(7).await;
    assert_eq!(a, outcomes(7).await);
    let failed = a.iter().filter(|(_, p)| *p == ReplicaPhase::Failed).count();
    assert!(failed > 0 && failed < 40, "a 30% failure rate gave {failed} of 40");
}

#[tokio::test]
async fn bad_assignments_are_refused_with_a_reason_and_the_rest_keeps_running() {
    use cellplane_api::wire::Assignment;
    use cellplane_api::{Capabilities, CellId, Host, HostId, HostState, Name, Replica, SiteId};
    use cellplane_host_actor::agent::carry_out;
    use cellplane_host_actor::core::host::{HostConfig, HostCore, Refusal};

    let host = Host {
        id: HostId(1),
        cell: CellId::new("c1").unwrap(),
        site: SiteId::new("s1").unwrap(),
        zone: Name::new("z1").unwrap(),
        capacity: Resources { cpu_milli: 1_000, memory_mib: 1_024, disk_gib: 10, gpus: 0 },
        capabilities: Capabilities { container: true, vm: false },
        labels: Default::default(),
        state: HostState::Joining,
    };
    let mut core = HostCore::new(host, HostConfig::default());
    core.handle_connected(true);
    let dir = tempfile::tempdir().unwrap();
    let (sender, mut events) = mpsc::channel(16);
    let driver = ProcessDriver::new(sender, dir.path().into(), RestartPolicy::default());
    let assign = |name: &str, spec: WorkloadSpec| Assignment {
        tenant: TenantId::new("acme").unwrap(),
        replica: Replica {
            workload: WorkloadName::new(name).unwrap(),
            ordinal: 0,
            host: Some(HostId(1)),
            epoch: 1,
            phase: ReplicaPhase::Assigned,
        },
        spec,
    };
    core.handle_assign(&assign("good", process("good", "exec sleep 30"))).unwrap();
    let mut big = process("big", "true");
    big.resources.cpu_milli = 5_000;
    assert!(matches!(core.handle_assign(&assign("big", big)), Err(Refusal::BeyondCapacity { .. })));
    let mut vm = process("vm", "true");
    vm.kind = WorkloadKind::Vm(cellplane_api::VmSpec {
        image: "debian".into(),
        vcpus: 1,
        memory_mib: 256,
        disk_gib: 1,
        cloud_init: None,
        power: cellplane_api::PowerState::On,
    });
    assert_eq!(core.handle_assign(&assign("vm", vm)), Err(Refusal::NoRuntime("VM")));
    let mut empty = process("empty", "true");
    if let WorkloadKind::Container(c) = &mut empty.kind {
        c.command.clear(); // nothing the process driver can run
    }
    core.handle_assign(&assign("empty", empty)).unwrap();
    carry_out(&mut core, &driver);
    let event = next(&mut events).await;
    assert_eq!((event.key.1.as_str(), event.phase), ("good", ReplicaPhase::Running));
    core.handle_driver(&event.key, event.phase, event.detail);

    let reports: Vec<_> = std::iter::from_fn(|| core.poll_report())
        .map(|r| (r.workload.to_string(), r.phase, r.detail))
        .collect();
    let phase_of = |name: &str| reports.iter().find(|r| r.0 == name).map(|r| (r.1, r.2.clone()));
    assert_eq!(phase_of("good").unwrap().0, ReplicaPhase::Running);
    for (name, reason) in [("big", "needs"), ("vm", "no VM runtime"), ("empty", "no command")] {
        let (phase, detail) = phase_of(name).unwrap();
        assert_eq!(phase, ReplicaPhase::Failed, "{name}");
        assert!(detail.contains(reason), "{name}: {detail}");
    }
    assert_eq!(driver.running(), 1);
    driver.stop(&key("good"));
}

/// What the `.pid` file of a process started by an earlier agent says (the on-disk format).
fn pid_file(dir: &std::path::Path, name: &str, pid: u32, script: &str) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let started: u64 =
        stat[stat.rfind(')').unwrap() + 1..].split_whitespace().nth(19).unwrap().parse().unwrap();
    let record = serde_json::json!({
        "tenant": "acme", "workload": name, "ordinal": 0, "pid": pid, "started": started,
        "command": ["sh", "-c", script], "env": {"GREETING": "hello from cellplane"},
    });
    std::fs::write(dir.join(format!("acme.{name}.0.pid")), record.to_string()).unwrap();
}

#[tokio::test]
async fn a_new_driver_adopts_a_recorded_process_stops_the_unclaimed_and_ignores_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let script = "exec sleep 60";
    // Processes an earlier agent left: one the cell gives back, one it does not, one whose
    // spec changed meanwhile; plus a record of a dead process and two damaged files.
    let mut left: Vec<_> = ["kept", "unclaimed", "changed"]
        .iter()
        .map(|name| {
            let mut command = std::process::Command::new("sh");
            command.args(["-c", script]).env(SLOT_VAR, format!("acme.{name}.0"));
            command.spawn().unwrap()
        })
        .collect();
    // A live process that is not ours, named by a doctored file: never adopted, never killed.
    let mut stranger = std::process::Command::new("sh").args(["-c", script]).spawn().unwrap();
    pid_file(dir.path(), "stranger", stranger.id(), script);
    let pids: Vec<u32> = left.iter().map(std::process::Child::id).collect();
    pid_file(dir.path(), "kept", pids[0], script);
    pid_file(dir.path(), "unclaimed", pids[1], script);
    pid_file(dir.path(), "changed", pids[2], script);
    std::fs::write(dir.path().join("acme.dead.0.pid"), r#"{"tenant":"acme","workload":"dead","ordinal":0,"pid":4000000,"started":1,"command":[],"env":{}}"#).unwrap();
    std::fs::write(dir.path().join("acme.garbage.0.pid"), b"\xff\x00 not json").unwrap();
    std::fs::write(
        dir.path().join("acme..0.pid"),
        r#"{"tenant":"","workload":"","ordinal":0,"pid":1,"started":0,"command":[],"env":{}}"#,
    )
    .unwrap();

    let (sender, mut events) = mpsc::channel(16);
    let driver = ProcessDriver::new(sender, dir.path().into(), RestartPolicy::default());
    for bad in ["acme.dead.0.pid", "acme.garbage.0.pid", "acme..0.pid", "acme.stranger.0.pid"] {
        assert!(!dir.path().join(bad).exists(), "{bad} was kept");
    }
    driver.start(key("kept"), &process("kept", script)).unwrap();
    let adopted = next(&mut events).await;
    assert_eq!(
        (adopted.phase, adopted.detail),
        (ReplicaPhase::Running, format!("pid {} (adopted)", pids[0]))
    );
    driver.start(key("changed"), &process("changed", "exec sleep 61")).unwrap();
    let fresh = next(&mut events).await;
    assert_eq!(fresh.phase, ReplicaPhase::Running);
    assert_ne!(fresh.detail, format!("pid {} (adopted)", pids[2]));
    driver.synced();
    // The unclaimed and the changed ones are killed (they are our children here: reap them).
    assert!(left[1].wait().is_ok_and(|s| !s.success()));
    assert!(left[2].wait().is_ok_and(|s| !s.success()));
    assert!(!dir.path().join("acme.unclaimed.0.pid").exists());
    // The adopted one is controlled: a stop kills it.
    driver.stop(&key("kept"));
    assert_eq!(next(&mut events).await.phase, ReplicaPhase::Stopped);
    assert!(left[0].wait().is_ok_and(|s| !s.success()));
    assert!(!dir.path().join("acme.kept.0.pid").exists());
    driver.stop(&key("changed"));
    assert_eq!(next(&mut events).await.phase, ReplicaPhase::Stopped);
    assert!(stranger.try_wait().unwrap().is_none(), "a process that is not ours was killed");
    stranger.kill().unwrap();
    stranger.wait().unwrap();
}
