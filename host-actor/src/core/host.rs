//! The host core: what one host runs, as its cell and its driver say.
//!
//! Protocol (pure: time comes in as `now_ms`, effects go out through `poll_*`):
//! - the host registers ([`HostCore::register`]) and heartbeats every `heartbeat_ms`
//!   ([`HostCore::handle_tick`]), carrying the newest cell epoch it has seen;
//! - an assignment from an epoch older than the newest seen is refused and reported
//!   (fencing): a host that missed a failover never runs the old incarnation's orders;
//! - an assignment the host cannot run (another host's, a runtime it lacks, beyond its free
//!   capacity) is refused with a typed reason and reported as failed; the rest keep running;
//! - on (re)subscription the cell sends every assignment it holds for this host, then
//!   `Synced`: whatever runs here that was not in that set is stopped — the cell no longer
//!   counts it as this host's. A slot re-confirmed with the same spec keeps running untouched;
//! - while the cell is unreachable every replica keeps running and status reports are kept,
//!   the newest per slot, to be sent on reconnection ([`HostCore::handle_connected`]);
//! - every `resync_ms`, when nothing else waits to be sent, the host reports every slot's phase
//!   again: reports are one-way messages, and one the cell had to drop under overload (or lost
//!   in a crash) must not leave it believing an old phase for ever. The cell ignores repeats.
//!
//! Invariant: the resources of the replicas this host runs never exceed its capacity.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use cellplane_api::wire::{Assignment, Heartbeat, PowerCommand, StatusReport, Unassign};
use cellplane_api::{
    Host, HostId, HostState, ReplicaPhase, Resources, TenantId, VmAction, WorkloadKind,
    WorkloadName, WorkloadSpec,
};

/// One replica slot: tenant, workload, ordinal.
pub type SlotKey = (TenantId, WorkloadName, u32);

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Start a replica.
    Start {
        /// The slot.
        key: SlotKey,
        /// What to run.
        spec: Box<WorkloadSpec>,
    },
    /// Stop a replica.
    Stop {
        /// The slot.
        key: SlotKey,
    },
    /// A VM power action.
    Power {
        /// The slot.
        key: SlotKey,
        /// What to do.
        action: VmAction,
    },
}

/// Why an assignment was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// It comes from an older cell incarnation.
    #[error("stale epoch {got}: this host has seen epoch {newest}")]
    StaleEpoch {
        /// The assignment's epoch.
        got: u64,
        /// The newest this host has seen.
        newest: u64,
    },
    /// It is addressed to another host.
    #[error("assignment for host {0}")]
    WrongHost(u64),
    /// The host has no runtime for it.
    #[error("no {0} runtime on this host")]
    NoRuntime(&'static str),
    /// It does not fit in what is free.
    #[error("needs {need:?}, only {free:?} free")]
    BeyondCapacity {
        /// What it needs.
        need: Resources,
        /// What is free.
        free: Resources,
    },
}

/// Host core settings.
#[derive(Debug, Clone, Copy)]
pub struct HostConfig {
    /// Heartbeat interval.
    pub heartbeat_ms: u64,
    /// Most status reports kept while the cell is unreachable (one per slot is kept anyway).
    pub reports_max: usize,
    /// Every slot's phase is reported again this often.
    pub resync_ms: u64,
}

impl Default for HostConfig {
    fn default() -> Self {
        Self { heartbeat_ms: 1_000, reports_max: 4_096, resync_ms: 30_000 }
    }
}

#[derive(Debug, Clone)]
struct Run {
    spec: WorkloadSpec,
    epoch: u64,
    phase: ReplicaPhase,
}

/// The pure logic of one host.
#[derive(Debug)]
pub struct HostCore {
    host: Host,
    config: HostConfig,
    newest_epoch: u64,
    seq: u64,
    next_beat_ms: u64,
    next_resync_ms: Option<u64>,
    connected: bool,
    used: Resources,
    runs: BTreeMap<SlotKey, Run>,
    /// Slots confirmed since the current subscription began, until `Synced`.
    syncing: Option<BTreeSet<SlotKey>>,
    commands: VecDeque<Command>,
    reports: VecDeque<StatusReport>,
}

impl HostCore {
    /// The core of `host`.
    pub fn new(host: Host, config: HostConfig) -> Self {
        Self {
            host,
            config,
            newest_epoch: 0,
            seq: 0,
            next_beat_ms: 0,
            next_resync_ms: None,
            connected: false,
            used: Resources::default(),
            runs: BTreeMap::new(),
            syncing: None,
            commands: VecDeque::new(),
            reports: VecDeque::new(),
        }
    }

    /// Sends the first heartbeat at `at_ms` rather than at once: a fleet staggers its hosts so
    /// that their beats spread over the interval.
    pub fn with_first_beat(mut self, at_ms: u64) -> Self {
        self.next_beat_ms = at_ms;
        self
    }

    /// The record this host registers with.
    pub fn register(&self) -> Host {
        Host { state: HostState::Joining, ..self.host.clone() }
    }

    /// Its id.
    pub fn id(&self) -> HostId {
        self.host.id
    }

    /// The newest cell epoch seen.
    pub fn newest_epoch(&self) -> u64 {
        self.newest_epoch
    }

    /// The cell is reachable (`true`, a subscription begins) or not.
    pub fn handle_connected(&mut self, connected: bool) {
        self.connected = connected;
        self.syncing = connected.then(BTreeSet::new);
    }

    /// A heartbeat, when one is due.
    pub fn handle_tick(&mut self, now_ms: u64) -> Option<Heartbeat> {
        if now_ms < self.next_beat_ms {
            return None;
        }
        self.next_beat_ms = now_ms + self.config.heartbeat_ms;
        self.seq += 1;
        // Resync on a beat, so that a fleet's staggered beats stagger resyncs too.
        let resync_at = *self.next_resync_ms.get_or_insert(now_ms + self.config.resync_ms);
        if now_ms >= resync_at && self.reports.is_empty() {
            self.next_resync_ms = Some(now_ms + self.config.resync_ms);
            let runs: Vec<_> =
                self.runs.iter().map(|(k, r)| (k.clone(), r.epoch, r.phase)).collect();
            for (key, epoch, phase) in runs.into_iter().take(self.config.reports_max) {
                self.report(&key, epoch, phase, String::new());
            }
        }
        let state = HostState::Ready;
        Some(Heartbeat { host: self.host.id, seq: self.seq, epoch: self.newest_epoch, state })
    }

    /// An assignment from the cell.
    pub fn handle_assign(&mut self, assignment: &Assignment) -> Result<(), Refusal> {
        let result = self.admit(assignment);
        let replica = &assignment.replica;
        let key = (assignment.tenant.clone(), replica.workload.clone(), replica.ordinal);
        if let Err(refusal) = &result {
            self.report(&key, replica.epoch, ReplicaPhase::Failed, format!("refused: {refusal}"));
        }
        result
    }

    fn admit(&mut self, assignment: &Assignment) -> Result<(), Refusal> {
        let replica = &assignment.replica;
        if replica.epoch < self.newest_epoch {
            return Err(Refusal::StaleEpoch { got: replica.epoch, newest: self.newest_epoch });
        }
        if replica.host != Some(self.host.id) {
            return Err(Refusal::WrongHost(replica.host.map_or(0, |h| h.0)));
        }
        let spec = &assignment.spec;
        match spec.kind {
            WorkloadKind::Container(_) if !self.host.capabilities.container => {
                return Err(Refusal::NoRuntime("container"));
            }
            WorkloadKind::Vm(_) if !self.host.capabilities.vm => {
                return Err(Refusal::NoRuntime("VM"));
            }
            _ => {}
        }
        let key = (assignment.tenant.clone(), replica.workload.clone(), replica.ordinal);
        // The same slot re-confirmed (after a failover or a re-subscription): keep it running.
        if let Some(run) = self.runs.get_mut(&key)
            && run.spec == *spec
        {
            run.epoch = replica.epoch;
            self.newest_epoch = self.newest_epoch.max(replica.epoch);
            if let Some(confirmed) = &mut self.syncing {
                confirmed.insert(key.clone());
            }
            let phase = run.phase;
            self.report(&key, replica.epoch, phase, String::new());
            return Ok(());
        }
        let held = self.runs.get(&key).map(|r| r.spec.resources).unwrap_or_default();
        let free = add(sub(self.host.capacity, self.used), held);
        if !spec.resources.fits_in(&free) {
            return Err(Refusal::BeyondCapacity { need: spec.resources, free });
        }
        self.newest_epoch = self.newest_epoch.max(replica.epoch);
        if self.runs.contains_key(&key) {
            self.stop(&key); // a new spec for the slot: stop the old one first
        }
        self.used = add(self.used, spec.resources);
        let run = Run { spec: spec.clone(), epoch: replica.epoch, phase: ReplicaPhase::Starting };
        self.runs.insert(key.clone(), run);
        if let Some(confirmed) = &mut self.syncing {
            confirmed.insert(key.clone());
        }
        self.commands.push_back(Command::Start { key: key.clone(), spec: Box::new(spec.clone()) });
        self.report(&key, replica.epoch, ReplicaPhase::Starting, String::new());
        Ok(())
    }

    /// The cell takes a slot away.
    pub fn handle_unassign(&mut self, unassign: &Unassign) {
        if unassign.host != self.host.id || unassign.epoch < self.newest_epoch {
            return; // another host's, or fenced: an older incarnation's order
        }
        self.newest_epoch = unassign.epoch;
        let key = (unassign.tenant.clone(), unassign.workload.clone(), unassign.ordinal);
        if self.runs.contains_key(&key) {
            self.stop(&key);
            self.report(&key, unassign.epoch, ReplicaPhase::Stopped, String::new());
        }
    }

    /// A VM power action.
    pub fn handle_power(&mut self, power: &PowerCommand) {
        let key = (power.tenant.clone(), power.workload.clone(), power.ordinal);
        if power.host == self.host.id
            && power.epoch >= self.newest_epoch
            && self.runs.contains_key(&key)
        {
            self.commands.push_back(Command::Power { key, action: power.action });
        }
    }

    /// The cell has sent every assignment it holds for this host: stop the rest.
    pub fn handle_synced(&mut self, epoch: u64) {
        if epoch < self.newest_epoch {
            return;
        }
        self.newest_epoch = epoch;
        let Some(confirmed) = self.syncing.take() else { return };
        let orphans: Vec<SlotKey> =
            self.runs.keys().filter(|k| !confirmed.contains(*k)).cloned().collect();
        for key in orphans {
            self.stop(&key);
        }
    }

    /// The driver says a replica's phase changed.
    pub fn handle_driver(&mut self, key: &SlotKey, phase: ReplicaPhase, detail: String) {
        let Some(run) = self.runs.get_mut(key) else { return };
        run.phase = phase;
        let epoch = run.epoch;
        self.report(key, epoch, phase, detail);
    }

    /// The next thing for the driver to do.
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// The next status report to send; none while the cell is unreachable.
    pub fn poll_report(&mut self) -> Option<StatusReport> {
        if self.connected { self.reports.pop_front() } else { None }
    }

    /// What runs here: slot, epoch, phase.
    pub fn runs(&self) -> impl Iterator<Item = (&SlotKey, u64, ReplicaPhase)> + '_ {
        self.runs.iter().map(|(k, r)| (k, r.epoch, r.phase))
    }

    /// What the running replicas reserve.
    pub fn used(&self) -> Resources {
        self.used
    }

    fn stop(&mut self, key: &SlotKey) {
        if let Some(run) = self.runs.remove(key) {
            self.used = sub(self.used, run.spec.resources);
            self.commands.push_back(Command::Stop { key: key.clone() });
        }
    }

    fn report(&mut self, key: &SlotKey, epoch: u64, phase: ReplicaPhase, detail: String) {
        // Only the newest report per slot matters: drop an older one still waiting.
        self.reports.retain(|r| (&r.tenant, &r.workload, r.ordinal) != (&key.0, &key.1, key.2));
        if self.reports.len() >= self.config.reports_max {
            self.reports.pop_front();
        }
        self.reports.push_back(StatusReport {
            host: self.host.id,
            tenant: key.0.clone(),
            workload: key.1.clone(),
            ordinal: key.2,
            epoch,
            phase,
            detail,
        });
    }
}

fn add(a: Resources, b: Resources) -> Resources {
    Resources {
        cpu_milli: a.cpu_milli.saturating_add(b.cpu_milli),
        memory_mib: a.memory_mib.saturating_add(b.memory_mib),
        disk_gib: a.disk_gib.saturating_add(b.disk_gib),
        gpus: a.gpus.saturating_add(b.gpus),
    }
}

fn sub(a: Resources, b: Resources) -> Resources {
    Resources {
        cpu_milli: a.cpu_milli.saturating_sub(b.cpu_milli),
        memory_mib: a.memory_mib.saturating_sub(b.memory_mib),
        disk_gib: a.disk_gib.saturating_sub(b.disk_gib),
        gpus: a.gpus.saturating_sub(b.gpus),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_api::{Capabilities, CellId, ContainerSpec, Controller, Name, Replica, SiteId};

    fn core(vm: bool) -> HostCore {
        let host = Host {
            id: HostId(1),
            cell: CellId::new("c1").unwrap(),
            site: SiteId::new("s1").unwrap(),
            zone: Name::new("z1").unwrap(),
            capacity: Resources { cpu_milli: 2_000, memory_mib: 4_096, disk_gib: 10, gpus: 0 },
            capabilities: Capabilities { container: true, vm },
            labels: Default::default(),
            state: HostState::Ready,
        };
        let mut core = HostCore::new(host, HostConfig::default());
        core.handle_connected(true);
        core
    }

    fn key(name: &str) -> SlotKey {
        (TenantId::new("acme").unwrap(), WorkloadName::new(name).unwrap(), 0)
    }

    fn assignment(name: &str, epoch: u64, cpu_milli: u32, image: &str) -> Assignment {
        Assignment {
            tenant: TenantId::new("acme").unwrap(),
            replica: Replica {
                workload: WorkloadName::new(name).unwrap(),
                ordinal: 0,
                host: Some(HostId(1)),
                epoch,
                phase: ReplicaPhase::Assigned,
            },
            spec: WorkloadSpec {
                name: WorkloadName::new(name).unwrap(),
                kind: WorkloadKind::Container(ContainerSpec {
                    image: image.into(),
                    command: vec![],
                    env: Default::default(),
                }),
                controller: Controller::Replicated,
                replicas: 1,
                resources: Resources { cpu_milli, memory_mib: 100, disk_gib: 1, gpus: 0 },
                placement: Default::default(),
                update: Default::default(),
            },
        }
    }

    fn commands(core: &mut HostCore) -> Vec<String> {
        std::iter::from_fn(|| core.poll_command())
            .map(|c| match c {
                Command::Start { key, .. } => format!("start {}", key.1),
                Command::Stop { key } => format!("stop {}", key.1),
                Command::Power { key, action } => format!("{action:?} {}", key.1),
            })
            .collect()
    }

    fn reports(core: &mut HostCore) -> Vec<(String, ReplicaPhase)> {
        std::iter::from_fn(|| core.poll_report())
            .map(|r| (r.workload.to_string(), r.phase))
            .collect()
    }

    #[test]
    fn every_slot_is_reported_again_each_resync_unless_reports_still_wait() {
        let mut core = core(false);
        core.handle_assign(&assignment("web", 5, 500, "a")).unwrap();
        core.handle_assign(&assignment("db", 5, 500, "a")).unwrap();
        commands(&mut core);
        core.handle_driver(&key("web"), ReplicaPhase::Running, String::new());
        core.handle_tick(0);
        assert_eq!(reports(&mut core).len(), 2, "the newest per slot");
        let resync = HostConfig::default().resync_ms;
        for now in (1_000..resync).step_by(1_000) {
            core.handle_tick(now);
            assert!(reports(&mut core).is_empty(), "resync before its time at {now} ms");
        }
        core.handle_tick(resync);
        assert_eq!(
            reports(&mut core),
            [("db".into(), ReplicaPhase::Starting), ("web".into(), ReplicaPhase::Running)]
        );
        // While the cell is away reports wait; a due resync adds nothing to them.
        core.handle_connected(false);
        core.handle_driver(&key("db"), ReplicaPhase::Running, String::new());
        core.handle_tick(2 * resync);
        core.handle_connected(true);
        assert_eq!(reports(&mut core), [("db".into(), ReplicaPhase::Running)]);
    }

    #[test]
    fn a_stale_epoch_is_refused_and_reported() {
        let mut core = core(false);
        core.handle_assign(&assignment("web", 5, 500, "a")).unwrap();
        let stale = core.handle_assign(&assignment("old", 4, 500, "a"));
        assert_eq!(stale, Err(Refusal::StaleEpoch { got: 4, newest: 5 }));
        assert_eq!(commands(&mut core), ["start web"]);
        assert_eq!(
            reports(&mut core),
            [("web".into(), ReplicaPhase::Starting), ("old".into(), ReplicaPhase::Failed)]
        );
        // An older incarnation's unassign is fenced off too.
        let unassign = Unassign {
            host: HostId(1),
            tenant: TenantId::new("acme").unwrap(),
            workload: WorkloadName::new("web").unwrap(),
            ordinal: 0,
            epoch: 4,
        };
        core.handle_unassign(&unassign);
        assert_eq!(core.runs().count(), 1);
    }

    #[test]
    fn what_cannot_run_here_is_refused_and_the_rest_keeps_running() {
        let mut core = core(false);
        core.handle_assign(&assignment("web", 1, 1_500, "a")).unwrap();
        let too_big = core.handle_assign(&assignment("big", 1, 1_000, "a"));
        assert!(matches!(too_big, Err(Refusal::BeyondCapacity { .. })));
        let mut vm = assignment("vm", 1, 100, "a");
        vm.spec.kind = WorkloadKind::Vm(cellplane_api::VmSpec {
            image: "debian".into(),
            vcpus: 1,
            memory_mib: 100,
            disk_gib: 1,
            cloud_init: None,
            power: cellplane_api::PowerState::On,
        });
        assert_eq!(core.handle_assign(&vm), Err(Refusal::NoRuntime("VM")));
        let mut elsewhere = assignment("other", 1, 100, "a");
        elsewhere.replica.host = Some(HostId(2));
        assert_eq!(core.handle_assign(&elsewhere), Err(Refusal::WrongHost(2)));
        assert_eq!(core.runs().count(), 1);
        assert_eq!(core.used().cpu_milli, 1_500);
    }

    #[test]
    fn after_a_failover_it_keeps_what_is_confirmed_and_stops_the_rest() {
        let mut core = core(false);
        core.handle_assign(&assignment("keep", 1, 500, "a")).unwrap();
        core.handle_assign(&assignment("moved", 1, 500, "a")).unwrap();
        core.handle_assign(&assignment("changed", 1, 500, "a")).unwrap();
        commands(&mut core);
        // The cell is gone: workloads keep running, reports wait.
        core.handle_connected(false);
        let first = core.runs().next().unwrap().0.clone();
        core.handle_driver(&first, ReplicaPhase::Running, String::new());
        assert!(reports(&mut core).is_empty());
        // It comes back under epoch 2: re-subscribes, is told what is still its own.
        core.handle_connected(true);
        core.handle_assign(&assignment("keep", 2, 500, "a")).unwrap();
        core.handle_assign(&assignment("changed", 2, 500, "b")).unwrap();
        core.handle_synced(2);
        assert_eq!(commands(&mut core), ["stop changed", "start changed", "stop moved"]);
        let runs: Vec<_> = core.runs().map(|(k, e, _)| (k.1.to_string(), e)).collect();
        assert_eq!(runs, [("changed".into(), 2), ("keep".into(), 2)]);
        // The buffered report went out, coalesced with the newer one for the same slot.
        let sent = reports(&mut core);
        assert!(sent.contains(&("changed".into(), ReplicaPhase::Starting)));
        assert_eq!(sent.iter().filter(|(w, _)| w == "changed").count(), 1);
        assert_eq!(core.used().cpu_milli, 1_000);
    }

    #[test]
    fn heartbeats_are_due_once_per_interval_and_carry_the_newest_epoch() {
        let mut core = core(false);
        assert_eq!(core.handle_tick(0).map(|b| b.seq), Some(1));
        assert!(core.handle_tick(999).is_none());
        core.handle_assign(&assignment("web", 3, 100, "a")).unwrap();
        let beat = core.handle_tick(1_000).unwrap();
        assert_eq!((beat.seq, beat.epoch), (2, 3));
    }
}
