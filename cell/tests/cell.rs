//! The cell's actor tree over real storage on disk, driven through its gateway in-process (the
//! QUIC path and process kills are in the `cellplane` command's tests).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use cellplane_api::wire::{
    Apply, ErrorCode, Heartbeat, ListRequest, Message, Register, Scale, StatusReport, WorkloadRef,
    WorkloadStatus,
};
use cellplane_api::{
    Capabilities, CellId, Controller, Host, HostId, HostState, Name, Placement, Quota, Replica,
    ReplicaPhase, Resources, SiteId, Tenant, TenantId, WorkloadKind, WorkloadName, WorkloadSpec,
};
use cellplane_cell::core::membership::LeaseConfig;
use cellplane_cell::{CellConfig, Gateway, RunningCell};
use cellplane_storage::Database;
use cellplane_transport::identity::{Identity, Role};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(30);

fn config() -> CellConfig {
    let mut config = CellConfig::new(CellId::new("c1").unwrap());
    config.hosts_max = 64;
    config.shard_hosts = 16; // four shards
    config.lease = LeaseConfig { suspect_after_ms: 300, down_after_ms: 600 };
    config.tick_ms = 50;
    config.limits.retry_ms = 50;
    config
}

struct Harness {
    cell: RunningCell,
    gateway: Gateway,
}

impl Harness {
    async fn start(dir: &Path) -> Self {
        let db = Database::open_embedded(dir).unwrap();
        let cell = RunningCell::start(config(), db).await.unwrap();
        let gateway = Gateway::new(cell.shared().clone());
        Self { cell, gateway }
    }

    async fn call(&self, message: Message) -> Result<Message, cellplane_api::wire::ErrorReply> {
        self.gateway.call(&router(), message).await
    }

    async fn as_tenant(
        &self,
        tenant: &str,
        message: Message,
    ) -> Result<Message, cellplane_api::wire::ErrorReply> {
        let peer = Identity::Client { tenant: TenantId::new(tenant).unwrap(), role: Role::Tenant };
        self.gateway.call(&peer, message).await
    }

    /// Registers a host, retrying while the shard that owns it restarts.
    async fn register(&self, id: u64, cpu_milli: u32) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let register = Message::Register(Box::new(Register { host: host(id, cpu_milli) }));
            match self.gateway.call(&host_peer(), register).await {
                Ok(Message::Done(_)) => return,
                Err(e) if e.code == ErrorCode::Unavailable => {
                    assert!(tokio::time::Instant::now() < deadline, "never registered");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => panic!("register: {other:?}"),
            }
        }
    }

    async fn stop(self) {
        drop(self.gateway);
        self.cell.stop().await;
    }

    fn beat(&self, id: u64, seq: u64) {
        let beat = Heartbeat { host: HostId(id), seq, epoch: 0, state: HostState::Ready };
        // A shard restarting refuses for a moment; the next beat gets through.
        let _ = self.gateway.send(&host_peer(), Message::Heartbeat(beat));
    }

    fn subscribe(&self, id: u64) -> mpsc::Receiver<Message> {
        self.gateway.open(&host_peer(), Message::Subscribe(vec![HostId(id)])).unwrap()
    }

    async fn get(&self, tenant: &str, name: &str) -> Option<WorkloadStatus> {
        let target = WorkloadRef {
            tenant: TenantId::new(tenant).unwrap(),
            workload: WorkloadName::new(name).unwrap(),
        };
        match self.call(Message::Get(Box::new(target))).await {
            Ok(Message::Workload(status)) => Some(*status),
            Err(e) if e.code == ErrorCode::NotFound => None,
            other => panic!("get: {other:?}"),
        }
    }

    /// Waits until `check` holds for workload `name`, heartbeating `hosts` meanwhile.
    async fn until(
        &self,
        name: &str,
        hosts: &[u64],
        check: impl Fn(&WorkloadStatus) -> bool,
    ) -> WorkloadStatus {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut seq = 1_000;
        loop {
            seq += 1;
            for &h in hosts {
                self.beat(h, seq);
            }
            let status = self.get("acme", name).await;
            if let Some(status) = &status
                && check(status)
            {
                return status.clone();
            }
            assert!(tokio::time::Instant::now() < deadline, "{name} never got there: {status:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn router() -> Identity {
    Identity::Router(Name::new("r1").unwrap())
}

fn host_peer() -> Identity {
    Identity::Host(Name::new("fleet").unwrap())
}

fn host(id: u64, cpu_milli: u32) -> Host {
    Host {
        id: HostId(id),
        cell: CellId::new("c1").unwrap(),
        site: SiteId::new("s1").unwrap(),
        zone: Name::new(if id.is_multiple_of(2) { "z-a" } else { "z-b" }).unwrap(),
        capacity: Resources { cpu_milli, memory_mib: 16_384, disk_gib: 100, gpus: 0 },
        capabilities: Capabilities { container: true, vm: true },
        labels: Default::default(),
        state: HostState::Joining,
    }
}

fn tenant(name: &str, replicas: u32) -> Message {
    Message::PutTenant(Box::new(Tenant {
        id: TenantId::new(name).unwrap(),
        quota: Quota { cpu_milli: 1_000_000, memory_mib: 1 << 30, replicas, workloads: 10 },
        home_cell: None,
    }))
}

fn spec(name: &str, replicas: u32, controller: Controller) -> WorkloadSpec {
    WorkloadSpec {
        name: WorkloadName::new(name).unwrap(),
        kind: WorkloadKind::Container(cellplane_api::ContainerSpec {
            image: "web:1".into(),
            command: vec![],
            env: Default::default(),
        }),
        controller,
        replicas,
        resources: Resources { cpu_milli: 1_000, memory_mib: 512, disk_gib: 1, gpus: 0 },
        placement: Placement::default(),
        update: Default::default(),
    }
}

fn apply(tenant: &str, key: u8, spec: WorkloadSpec) -> Message {
    Message::Apply(Box::new(Apply {
        tenant: TenantId::new(tenant).unwrap(),
        idempotency_key: [key; 16],
        spec,
    }))
}

/// Hosts report every assigned replica of `status` as running.
fn report_running(cell: &Harness, status: &WorkloadStatus, epoch: u64) {
    for r in status.replicas.iter().filter(|r| r.phase == ReplicaPhase::Assigned) {
        send_status(cell, r, epoch, ReplicaPhase::Running);
    }
}

/// The host of `replica` reports it in `phase`, under `epoch`.
fn send_status(cell: &Harness, replica: &Replica, epoch: u64, phase: ReplicaPhase) {
    let report = StatusReport {
        host: replica.host.expect("a replica on a host"),
        tenant: TenantId::new("acme").unwrap(),
        workload: replica.workload.clone(),
        ordinal: replica.ordinal,
        epoch,
        phase,
        detail: String::new(),
    };
    cell.gateway.send(&host_peer(), Message::Status(Box::new(report))).unwrap();
}

fn placed(status: &WorkloadStatus) -> HashMap<u32, HostId> {
    status.replicas.iter().filter_map(|r| r.host.map(|h| (r.ordinal, h))).collect()
}

/// Drains what a host's stream holds now: the slots it was told to run, minus those stopped.
fn held(stream: &mut mpsc::Receiver<Message>, holding: &mut HashMap<(String, u32), u64>) {
    while let Ok(message) = stream.try_recv() {
        match message {
            Message::Assign(a) => {
                let key = (a.replica.workload.to_string(), a.replica.ordinal);
                holding.insert(key, a.replica.epoch);
            }
            Message::Unassign(u) => {
                holding.remove(&(u.workload.to_string(), u.ordinal));
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_workloads_and_assignments_survive_a_restart_under_a_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let cell = Harness::start(dir.path()).await;
    let first_epoch = cell.cell.epoch();
    assert!(matches!(cell.call(tenant("acme", 100)).await, Ok(Message::Done(v)) if v > 0));
    for h in 1..=4 {
        cell.register(h, 4_000).await;
    }
    let answer = cell.as_tenant("acme", apply("acme", 1, spec("web", 6, Controller::Replicated)));
    assert!(matches!(answer.await, Ok(Message::Done(v)) if v > 0));
    let before = cell.until("web", &[1, 2, 3, 4], |s| placed(s).len() == 6).await;
    let before = placed(&before);
    cell.stop().await;

    let cell = Harness::start(dir.path()).await;
    assert_eq!(cell.cell.epoch(), first_epoch + 1, "every start bumps the epoch");
    let after = cell.get("acme", "web").await.expect("the acknowledged workload is back");
    assert_eq!(placed(&after), before, "every assignment is back, on the same host");
    assert!(after.replicas.iter().all(|r| r.epoch == first_epoch + 1));
    // A host that subscribes gets its slots under the new epoch, then `Synced`.
    let mut stream = cell.subscribe(1);
    let mut holding = HashMap::new();
    tokio::time::sleep(Duration::from_millis(200)).await;
    held(&mut stream, &mut holding);
    let expected = before.values().filter(|h| **h == HostId(1)).count();
    assert_eq!(holding.len(), expected);
    assert!(holding.values().all(|epoch| *epoch == first_epoch + 1));
    cell.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_host_loses_its_replicas_to_others_and_is_reconciled_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let cell = Harness::start(dir.path()).await;
    cell.call(tenant("acme", 100)).await.unwrap();
    for h in 1..=3 {
        cell.register(h, 8_000).await;
    }
    let mut streams: Vec<_> = (1..=3).map(|h| cell.subscribe(h)).collect();
    cell.call(apply("acme", 1, spec("db", 3, Controller::Stateful))).await.unwrap();
    // Stateful: each ordinal starts once the one before it runs; hosts report running.
    let epoch = cell.cell.epoch();
    let run = |status: &WorkloadStatus| {
        report_running(&cell, status, epoch);
        status.replicas.iter().filter(|r| r.phase == ReplicaPhase::Running).count() == 3
    };
    let status = cell.until("db", &[1, 2, 3], run).await;
    let victim = status.replicas[0].host.unwrap();
    let survivors: Vec<u64> = (1..=3).filter(|h| HostId(*h) != victim).collect();

    // The victim stops heartbeating: it goes down and its slot moves, keeping its ordinal.
    let moved = cell
        .until("db", &survivors, |s| {
            report_running(&cell, s, epoch);
            s.replicas.iter().all(|r| r.host.is_some_and(|h| h != victim))
        })
        .await;
    assert_eq!(moved.replicas.len(), 3);
    let mut holdings: Vec<HashMap<(String, u32), u64>> = vec![HashMap::new(); 3];
    for (stream, holding) in streams.iter_mut().zip(&mut holdings) {
        held(stream, holding);
    }
    // No slot is held by two hosts: the victim was told to stop what moved.
    let mut owners: HashMap<(String, u32), usize> = HashMap::new();
    for holding in &holdings {
        for slot in holding.keys() {
            *owners.entry(slot.clone()).or_default() += 1;
        }
    }
    assert_eq!(owners.len(), 3);
    assert!(owners.values().all(|n| *n == 1), "a slot held twice: {holdings:?}");

    // It comes back: it reconciles to what the cell says it holds — nothing of db.
    let mut again = cell.subscribe(victim.0);
    let mut holding = HashMap::new();
    cell.until("db", &[1, 2, 3], |_| true).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    held(&mut again, &mut holding);
    assert!(holding.is_empty(), "a returning host is told only what is still its own");
    cell.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_host_is_over_committed_and_what_does_not_fit_waits() {
    let dir = tempfile::tempdir().unwrap();
    let cell = Harness::start(dir.path()).await;
    cell.call(tenant("acme", 100)).await.unwrap();
    for h in 1..=3 {
        cell.register(h, 2_500).await; // two 1-core replicas each
    }
    cell.call(apply("acme", 1, spec("web", 10, Controller::Replicated))).await.unwrap();
    let status = cell.until("web", &[1, 2, 3], |s| placed(s).len() == 6).await;
    let mut per_host: HashMap<HostId, u32> = HashMap::new();
    for host in placed(&status).values() {
        *per_host.entry(*host).or_default() += 1;
    }
    assert!(per_host.values().all(|n| *n <= 2), "over-committed: {per_host:?}");
    let Ok(Message::Summary(summary)) = cell.call(Message::SummaryRequest).await else {
        panic!("summary")
    };
    assert_eq!(summary.pending, 4);
    assert!(summary.cpu_milli[1] <= summary.cpu_milli[0]);
    // Room appears: the waiting replicas take it.
    cell.register(4, 8_000).await;
    cell.until("web", &[1, 2, 3, 4], |s| placed(s).len() == 10).await;
    cell.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_typed_errors_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cell = Harness::start(dir.path()).await;
    cell.call(tenant("acme", 4)).await.unwrap();
    // A tenant without quota is refused outright; one with almost none is kept to its quota.
    let refused = cell.call(tenant("broke", 0)).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::Invalid);
    assert!(refused.detail.contains("tenant.quota.replicas"), "{}", refused.detail);
    let tiny = Quota { cpu_milli: 1, memory_mib: 1, replicas: 1, workloads: 1 };
    let tiny = Tenant { id: TenantId::new("tiny").unwrap(), quota: tiny, home_cell: None };
    cell.call(Message::PutTenant(Box::new(tiny))).await.unwrap();
    cell.call(apply("acme", 1, spec("web", 2, Controller::Replicated))).await.unwrap();
    let list = || {
        let request =
            ListRequest { tenant: TenantId::new("acme").unwrap(), after: None, limit: 10 };
        cell.call(Message::List(Box::new(request)))
    };
    let before = list().await.unwrap();

    let code = |answer: Result<Message, cellplane_api::wire::ErrorReply>| answer.unwrap_err().code;
    // An unknown tenant.
    let unknown = cell.call(apply("ghost", 2, spec("web", 1, Controller::Replicated))).await;
    assert_eq!(code(unknown), ErrorCode::NotFound);
    // A tenant that was refused does not exist; one with almost no quota cannot use more.
    let broke = cell.call(apply("broke", 3, spec("web", 1, Controller::Replicated))).await;
    assert_eq!(code(broke), ErrorCode::NotFound);
    let tiny = cell.call(apply("tiny", 3, spec("web", 1, Controller::Replicated))).await;
    assert_eq!(code(tiny), ErrorCode::QuotaExceeded);
    // Over quota (4 replicas).
    let big = cell.call(apply("acme", 4, spec("api", 3, Controller::Replicated))).await;
    assert_eq!(code(big), ErrorCode::QuotaExceeded);
    let scale = Scale {
        tenant: TenantId::new("acme").unwrap(),
        workload: WorkloadName::new("web").unwrap(),
        replicas: 5,
    };
    assert_eq!(code(cell.call(Message::Scale(Box::new(scale))).await), ErrorCode::QuotaExceeded);
    // A spec that breaks the model's rules (no replicas, a resource out of range).
    let mut bad = spec("api", 0, Controller::Replicated);
    bad.resources.cpu_milli = 0;
    let refused = cell.call(apply("acme", 7, bad)).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::Invalid);
    assert!(refused.detail.contains("replicas") || refused.detail.contains("cpu_milli"));
    // A name already used by another kind of workload.
    let clash = cell.call(apply("acme", 5, spec("web", 2, Controller::Stateful))).await;
    assert_eq!(code(clash), ErrorCode::Invalid);
    // An idempotency key reused for another change.
    let reused = cell.call(apply("acme", 1, spec("other", 1, Controller::Replicated))).await;
    assert_eq!(code(reused), ErrorCode::Invalid);
    // Another tenant's credentials.
    let foreign = cell.as_tenant("tiny", apply("acme", 6, spec("web", 1, Controller::Replicated)));
    assert_eq!(code(foreign.await), ErrorCode::Unauthorized);
    // A host cannot act for tenants, a tenant cannot register hosts.
    let register = Message::Register(Box::new(Register { host: host(9, 1_000) }));
    assert_eq!(code(cell.as_tenant("acme", register).await), ErrorCode::Unauthorized);
    // A host of another cell.
    let mut stranger = host(9, 1_000);
    stranger.cell = CellId::new("c2").unwrap();
    let register = Message::Register(Box::new(Register { host: stranger }));
    assert_eq!(code(cell.gateway.call(&host_peer(), register).await), ErrorCode::Invalid);

    assert_eq!(list().await.unwrap(), before, "nothing changed");
    // A retried apply with the same key is a no-op that still answers done.
    let again = cell.call(apply("acme", 1, spec("web", 2, Controller::Replicated))).await;
    assert!(matches!(again, Ok(Message::Done(_))));
    cell.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_child_is_restarted_from_storage_and_the_others_keep_serving() {
    let dir = tempfile::tempdir().unwrap();
    let cell = Harness::start(dir.path()).await;
    cell.call(tenant("acme", 100)).await.unwrap();
    for h in 1..=8 {
        cell.register(h, 4_000).await;
    }
    cell.call(apply("acme", 1, spec("web", 4, Controller::Replicated))).await.unwrap();
    let hosts: Vec<u64> = (1..=8).collect();
    let before = placed(&cell.until("web", &hosts, |s| placed(s).len() == 4).await);

    // Shard 0 (hosts 4 and 8) crashes; it comes back with its hosts and they stay up.
    assert!(cell.cell.shared().crash(Some(0)));
    let epoch = cell.cell.epoch();
    cell.register(12, 4_000).await; // shard 0 again: it answers once restarted
    let Ok(Message::Summary(summary)) = cell.call(Message::SummaryRequest).await else {
        panic!("summary")
    };
    assert_eq!(summary.hosts.iter().sum::<u32>(), 9);
    assert_eq!(cell.cell.epoch(), epoch, "a shard restart is not a new incarnation");

    // The workloads actor crashes: it recovers under a new epoch, with every assignment.
    assert!(cell.cell.shared().crash(None));
    let deadline = tokio::time::Instant::now() + WAIT;
    while cell.cell.epoch() == epoch {
        assert!(tokio::time::Instant::now() < deadline, "never restarted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = cell.until("web", &hosts, |s| placed(s).len() == 4).await;
    assert_eq!(placed(&after), before);
    cell.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_power_and_a_new_image_reach_the_hosts_as_commands() {
    let dir = tempfile::tempdir().unwrap();
    let cell = Harness::start(dir.path()).await;
    cell.call(tenant("acme", 100)).await.unwrap();
    cell.register(1, 8_000).await;
    let mut stream = cell.subscribe(1);
    let mut vm = spec("vm", 1, Controller::Stateful);
    vm.kind = WorkloadKind::Vm(cellplane_api::VmSpec {
        image: "debian-12".into(),
        vcpus: 1,
        memory_mib: 512,
        disk_gib: 1,
        cloud_init: None,
        power: cellplane_api::PowerState::On,
    });
    cell.call(apply("acme", 1, vm)).await.unwrap();
    cell.until("vm", &[1], |s| placed(s).len() == 1).await;
    let reboot = cellplane_api::wire::VmActionRequest {
        tenant: TenantId::new("acme").unwrap(),
        workload: WorkloadName::new("vm").unwrap(),
        ordinal: 0,
        action: cellplane_api::VmAction::Reboot,
    };
    assert!(matches!(cell.call(Message::VmAction(Box::new(reboot))).await, Ok(Message::Done(_))));

    // A container workload rolls to a new image: the running replica is stopped and placed
    // again with the new spec.
    cell.call(apply("acme", 2, spec("web", 1, Controller::Replicated))).await.unwrap();
    let epoch = cell.cell.epoch();
    cell.until("web", &[1], |s| {
        report_running(&cell, s, epoch);
        s.replicas.iter().all(|r| r.phase == ReplicaPhase::Running)
    })
    .await;
    let mut v2 = spec("web", 1, Controller::Replicated);
    if let WorkloadKind::Container(c) = &mut v2.kind {
        c.image = "web:2".into();
    }
    cell.call(apply("acme", 3, v2)).await.unwrap();
    cell.until("web", &[1], |s| placed(s).len() == 1).await;

    let mut seen = Vec::new();
    while let Ok(message) = stream.try_recv() {
        seen.push(match message {
            Message::Assign(a) => match &a.spec.kind {
                WorkloadKind::Container(c) => format!("assign {} {}", a.replica.workload, c.image),
                WorkloadKind::Vm(_) => format!("assign {}", a.replica.workload),
            },
            Message::Unassign(u) => format!("unassign {}", u.workload),
            Message::Power(p) => format!("power {} {:?}", p.workload, p.action),
            Message::Synced(_) => "synced".into(),
            other => format!("{other:?}"),
        });
    }
    assert_eq!(
        seen,
        [
            "synced",
            "assign vm",
            "power vm Reboot",
            "assign web web:1",
            "unassign web",
            "assign web web:2"
        ]
    );
    cell.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_keeps_failing_is_replaced_with_growing_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let cell = Harness::start(dir.path()).await;
    cell.call(tenant("acme", 100)).await.unwrap();
    for h in 1..=2 {
        cell.register(h, 8_000).await;
    }
    let mut streams = [cell.subscribe(1), cell.subscribe(2)];
    // The next assignment a host is told of, heartbeating both hosts meanwhile.
    let mut seq = 0;
    let mut next_assignment = async || {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            seq += 1;
            cell.beat(1, seq);
            cell.beat(2, seq);
            for stream in &mut streams {
                while let Ok(message) = stream.try_recv() {
                    if let Message::Assign(a) = message {
                        return a.replica;
                    }
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "never placed again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    let answer =
        cell.as_tenant("acme", apply("acme", 1, spec("crashy", 1, Controller::Replicated)));
    assert!(matches!(answer.await, Ok(Message::Done(_))));
    // Fail it as soon as it is placed, six times; time each replacement.
    let mut replica = next_assignment().await;
    let mut waits = Vec::new();
    for _ in 0..6 {
        send_status(&cell, &replica, replica.epoch, ReplicaPhase::Failed);
        let failed_at = tokio::time::Instant::now();
        replica = next_assignment().await;
        waits.push(failed_at.elapsed());
    }
    // The sixth consecutive failure holds the slot for 16 retry ticks of 50 ms (800 ms; the
    // bound leaves room for ticks a stalled actor catches up in a burst); without a backoff it
    // would be placed again within one reconcile, in milliseconds.
    assert!(waits[5] >= Duration::from_millis(300), "no backoff: {waits:?}");
    assert!(waits[5] > waits[1], "the hold grows: {waits:?}");
    drop(streams);
    cell.stop().await;
}
