//! Runtime drivers with real processes: started, logged, restarted, killed.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cellplane_api::{
    ContainerSpec, Controller, ReplicaPhase, Resources, TenantId, WorkloadKind, WorkloadName,
    WorkloadSpec,
};
use cellplane_host_actor::core::host::SlotKey;
use cellplane_host_actor::driver::{
    Driver, DriverError, DriverEvent, ProcessDriver, RestartPolicy, SimDriver,
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
