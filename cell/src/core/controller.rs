//! Workload controllers: desired state against actual state, the same code for containers and
//! VMs.
//!
//! Protocol (pure: inputs by `handle_*`, actions out by [`WorkloadController::poll_action`]):
//! - the spec says how many replica slots exist (ordinals `0..replicas`);
//! - a slot with no host asks to be placed ([`Action::Place`]); once the scheduler chose a host
//!   ([`WorkloadController::handle_placed`]) the slot is assigned there with the cell's current
//!   epoch ([`Action::Assign`]);
//! - `Replicated`: every empty slot asks for placement at once; scaling down stops the highest
//!   ordinals. `Stateful`: ordered start — slot `i` asks for placement only once slot `i - 1` is
//!   running — and a replacement keeps its ordinal (its identity);
//! - a host going down empties its slots, which ask for placement again (on another host);
//! - status reports carry the assignment's epoch and host: one from an older epoch or another
//!   host is stale and ignored, so a host that missed a failover cannot move a slot's state;
//! - a replica that failed is replaced like one whose host went down, but a slot that keeps
//!   failing backs off (crash-loop backoff, as Kubernetes does): its `n`-th consecutive failure
//!   holds it empty for `2^(n-2)` retry ticks (none for the first, at most
//!   [`BACKOFF_TICKS_MAX`]) before it is placed again; [`STABLE_TICKS`] ticks of running forget
//!   its failures. Ticks come from [`WorkloadController::handle_tick`] while
//!   [`WorkloadController::needs_ticks`];
//! - VM power: `Stop` makes running VM slots stop (keeping their placement); `Start` starts them
//!   again; `Reboot` asks their hosts to reset them.
//! - rolling update: a spec whose template changed (anything but the replica count and VM
//!   power) starts a new generation. Slots of an older generation are replaced one by one, the
//!   highest ordinal first, while fewer than `max_unavailable` (at least one) slots are not
//!   running; a replaced stateful slot keeps its ordinal. `max_surge` is not used yet: replacing
//!   in place keeps a slot on at most one host, which surge would break for stateful slots.
//! - recovery: [`WorkloadController::restore`] takes the slots read back from storage under the
//!   new epoch; their phase is unknown (`Assigned`) until their hosts report.
//!
//! Invariant: a slot is assigned to at most one host at a time; a new assignment is made only
//! after the old one was emptied (host down, replica failed or stopped on purpose).

use std::collections::{BTreeMap, VecDeque};

use cellplane_api::{
    Controller, HostId, PowerState, ReplicaPhase, VmAction, WorkloadKind, WorkloadSpec,
};

/// What the controller wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Find a host for this slot.
    Place {
        /// The slot.
        ordinal: u32,
    },
    /// Run this slot on this host, under this epoch.
    Assign {
        /// The slot.
        ordinal: u32,
        /// The host.
        host: HostId,
        /// The cell epoch (fencing).
        epoch: u64,
        /// The spec generation the slot runs.
        generation: u64,
    },
    /// Stop this slot's replica on its host and free the slot.
    Stop {
        /// The slot.
        ordinal: u32,
        /// The host.
        host: HostId,
    },
    /// A VM power action for the replica on this host.
    Power {
        /// The slot.
        ordinal: u32,
        /// The host.
        host: HostId,
        /// What to do.
        action: VmAction,
    },
}

/// The longest a failing slot is held empty: 600 ticks, 5 minutes at the cell's default 500 ms
/// retry tick (Kubernetes' crash-loop cap).
pub const BACKOFF_TICKS_MAX: u32 = 600;

/// Ticks of running after which a slot's failures are forgotten: 10 minutes at 500 ms (as
/// Kubernetes resets its backoff).
pub const STABLE_TICKS: u32 = 1_200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    host: Option<HostId>,
    phase: ReplicaPhase,
    /// Whether a placement request is outstanding.
    placing: bool,
    /// The spec generation it was assigned under.
    generation: u64,
    /// Consecutive failures of the replicas in this slot.
    failures: u32,
    /// Ticks left before an empty slot may be placed again.
    hold: u32,
    /// Ticks it has been running since its last failure.
    stable: u32,
}

impl Slot {
    const EMPTY: Slot = Slot {
        host: None,
        phase: ReplicaPhase::Pending,
        placing: false,
        generation: 0,
        failures: 0,
        hold: 0,
        stable: 0,
    };
}

/// The controller of one workload.
#[derive(Debug)]
pub struct WorkloadController {
    spec: WorkloadSpec,
    epoch: u64,
    generation: u64,
    slots: BTreeMap<u32, Slot>,
    actions: VecDeque<Action>,
    /// Slots without a host (kept by `reconcile` and `handle_placed`).
    empty: u64,
    /// Whether some slot with a host runs an older generation (a rolling update is under way).
    outdated: bool,
}

impl WorkloadController {
    /// A controller for `spec` in a cell at `epoch`.
    pub fn new(spec: WorkloadSpec, epoch: u64) -> Self {
        Self::restore(spec, epoch, 1, [])
    }

    /// A controller recovered from storage: `spec` at `generation`, and the slots that held a
    /// host, as `(ordinal, host, generation)`. Slots beyond the spec's count are stopped.
    pub fn restore(
        spec: WorkloadSpec,
        epoch: u64,
        generation: u64,
        slots: impl IntoIterator<Item = (u32, HostId, u64)>,
    ) -> Self {
        let slots = slots
            .into_iter()
            .map(|(ordinal, host, generation)| {
                let phase = ReplicaPhase::Assigned;
                (ordinal, Slot { host: Some(host), phase, generation, ..Slot::EMPTY })
            })
            .collect();
        let mut controller = Self {
            spec,
            epoch,
            generation,
            slots,
            actions: VecDeque::new(),
            empty: 0,
            outdated: false,
        };
        controller.reconcile();
        controller
    }

    /// The spec generation: it grows by one whenever the template changes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The current spec.
    pub fn spec(&self) -> &WorkloadSpec {
        &self.spec
    }

    /// A new spec: replica count, controller kind and VM power are taken from it; any other
    /// change starts a rolling update.
    pub fn handle_spec(&mut self, spec: WorkloadSpec) {
        let power_before = vm_power(&self.spec);
        if template(&self.spec) != template(&spec) {
            self.generation += 1;
        }
        self.spec = spec;
        if let (Some(before), Some(after)) = (power_before, vm_power(&self.spec))
            && before != after
        {
            let action = if after == PowerState::On { VmAction::Start } else { VmAction::Stop };
            self.handle_vm_action(action, None);
        }
        self.reconcile();
    }

    /// The scheduler placed `ordinal` on `host` (it reserved the resources).
    pub fn handle_placed(&mut self, ordinal: u32, host: HostId) {
        let Some(slot) = self.slots.get_mut(&ordinal) else {
            // Scaled away while placing: give the host back.
            self.actions.push_back(Action::Stop { ordinal, host });
            return;
        };
        assert!(slot.host.is_none(), "controller: slot {ordinal} placed twice");
        self.empty -= 1;
        let generation = self.generation;
        *slot = Slot {
            host: Some(host),
            phase: ReplicaPhase::Assigned,
            placing: false,
            generation,
            stable: 0,
            ..*slot
        };
        self.actions.push_back(Action::Assign { ordinal, host, epoch: self.epoch, generation });
    }

    /// The scheduler could not place `ordinal`; it asks again on the next reconcile.
    pub fn handle_unplaced(&mut self, ordinal: u32) {
        if let Some(slot) = self.slots.get_mut(&ordinal) {
            slot.placing = false;
        }
    }

    /// A host reports a replica's phase; returns whether anything changed. Stale reports (older
    /// epoch, other host) and repeats are ignored. A report costs a full reconcile only when it
    /// can change what the controller wants: a failure, ordered start, a rolling update.
    pub fn handle_status(
        &mut self,
        ordinal: u32,
        host: HostId,
        epoch: u64,
        phase: ReplicaPhase,
    ) -> bool {
        let Some(slot) = self.slots.get_mut(&ordinal) else { return false };
        if epoch != self.epoch || slot.host != Some(host) || slot.phase == phase {
            return false;
        }
        slot.phase = phase;
        let settled = self.spec.controller == Controller::Replicated && !self.outdated;
        if settled && phase != ReplicaPhase::Failed {
            return true;
        }
        if phase == ReplicaPhase::Failed {
            // Replace it: free the slot; a reconcile places it again once its hold is over.
            self.actions.push_back(Action::Stop { ordinal, host });
            let failures = slot.failures.saturating_add(1);
            let hold = match failures {
                1 => 0,
                n => 1u32.checked_shl(n - 2).unwrap_or(u32::MAX).min(BACKOFF_TICKS_MAX),
            };
            *slot = Slot { failures, hold, ..Slot::EMPTY };
        }
        self.reconcile();
        true
    }

    /// A host went down: its slots are empty now and will be placed elsewhere.
    pub fn handle_host_down(&mut self, host: HostId) {
        for slot in self.slots.values_mut().filter(|s| s.host == Some(host)) {
            *slot = Slot::EMPTY;
        }
        self.reconcile();
    }

    /// A VM power action on one slot, or on every slot that has a host.
    pub fn handle_vm_action(&mut self, action: VmAction, only: Option<u32>) {
        if !matches!(self.spec.kind, WorkloadKind::Vm(_)) {
            return;
        }
        for (&ordinal, slot) in &self.slots {
            if let Some(host) = slot.host
                && only.is_none_or(|o| o == ordinal)
            {
                self.actions.push_back(Action::Power { ordinal, host, action });
            }
        }
    }

    /// Asks again for placement of every empty slot (after the scheduler refused some).
    pub fn handle_retry(&mut self) {
        self.reconcile();
    }

    /// One retry tick: holds run down, running slots count towards forgetting their failures,
    /// and slots whose hold is over ask for placement.
    pub fn handle_tick(&mut self) {
        for slot in self.slots.values_mut() {
            slot.hold = slot.hold.saturating_sub(1);
            if slot.failures > 0 && slot.phase == ReplicaPhase::Running {
                slot.stable += 1;
                if slot.stable >= STABLE_TICKS {
                    (slot.failures, slot.stable) = (0, 0);
                }
            }
        }
        self.reconcile();
    }

    /// Whether the controller has a backoff to run down (it wants [`Self::handle_tick`]).
    pub fn needs_ticks(&self) -> bool {
        self.slots.values().any(|s| s.hold > 0 || s.failures > 0)
    }

    /// How many slots it has, and how many of them wait for a host.
    pub fn counts(&self) -> (u64, u64) {
        debug_assert_eq!(
            self.empty,
            self.slots.values().filter(|s| s.host.is_none()).count() as u64,
            "controller: empty-slot count drifted"
        );
        (self.slots.len() as u64, self.empty)
    }

    /// Whether some slot waits for a host.
    pub fn has_empty_slots(&self) -> bool {
        self.slots.values().any(|s| s.host.is_none())
    }

    /// The next action, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Each slot's host and phase.
    pub fn slots(&self) -> impl Iterator<Item = (u32, Option<HostId>, ReplicaPhase)> + '_ {
        self.slots.iter().map(|(o, s)| (*o, s.host, s.phase))
    }

    fn reconcile(&mut self) {
        let want = self.spec.replicas;
        // Scale down: the highest ordinals go first.
        let extra: Vec<u32> = self.slots.range(want..).map(|(o, _)| *o).collect();
        for ordinal in extra {
            if let Some(Slot { host: Some(host), .. }) = self.slots.remove(&ordinal) {
                self.actions.push_back(Action::Stop { ordinal, host });
            }
        }
        // Scale up: new slots start empty.
        for ordinal in 0..want {
            self.slots.entry(ordinal).or_insert(Slot::EMPTY);
        }
        // Rolling update: replace outdated slots, highest first, within the unavailability
        // budget.
        let budget = self.spec.update.max_unavailable.max(1) as usize;
        let mut unavailable =
            self.slots.values().filter(|s| s.phase != ReplicaPhase::Running).count();
        for (&ordinal, slot) in self.slots.iter_mut().rev() {
            if unavailable >= budget {
                break;
            }
            if let Some(host) = slot.host
                && slot.generation < self.generation
                && slot.phase == ReplicaPhase::Running
            {
                self.actions.push_back(Action::Stop { ordinal, host });
                *slot = Slot::EMPTY;
                unavailable += 1;
            }
        }
        let ordered = self.spec.controller == Controller::Stateful;
        let mut previous_running = true;
        (self.empty, self.outdated) = (0, false);
        for (&ordinal, slot) in self.slots.iter_mut() {
            if slot.host.is_none()
                && !slot.placing
                && slot.hold == 0
                && (!ordered || previous_running)
            {
                slot.placing = true;
                self.actions.push_back(Action::Place { ordinal });
            }
            previous_running = slot.phase == ReplicaPhase::Running;
            self.empty += u64::from(slot.host.is_none());
            self.outdated |= slot.host.is_some() && slot.generation < self.generation;
        }
    }
}

/// What a replica runs: the spec without its count and VM power, which change in place.
fn template(spec: &WorkloadSpec) -> (WorkloadKind, cellplane_api::Resources, &Controller) {
    let mut kind = spec.kind.clone();
    if let WorkloadKind::Vm(vm) = &mut kind {
        vm.power = PowerState::On;
    }
    (kind, spec.resources, &spec.controller)
}

fn vm_power(spec: &WorkloadSpec) -> Option<PowerState> {
    match &spec.kind {
        WorkloadKind::Vm(vm) => Some(vm.power),
        WorkloadKind::Container(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use cellplane_api::{
        ContainerSpec, Placement, Resources, UpdateStrategy, VmSpec, WorkloadName,
    };

    fn spec(controller: Controller, replicas: u32, vm: bool) -> WorkloadSpec {
        let kind = if vm {
            WorkloadKind::Vm(VmSpec {
                image: "debian".into(),
                vcpus: 1,
                memory_mib: 512,
                disk_gib: 10,
                cloud_init: None,
                power: PowerState::On,
            })
        } else {
            WorkloadKind::Container(ContainerSpec {
                image: "web".into(),
                command: vec![],
                env: Default::default(),
            })
        };
        WorkloadSpec {
            name: WorkloadName::new("w").unwrap(),
            kind,
            controller,
            replicas,
            resources: Resources { cpu_milli: 1_000, memory_mib: 1_024, disk_gib: 10, gpus: 0 },
            placement: Placement::default(),
            update: UpdateStrategy::default(),
        }
    }

    fn drain(c: &mut WorkloadController) -> Vec<Action> {
        std::iter::from_fn(|| c.poll_action()).collect()
    }

    #[test]
    fn replicated_places_all_at_once_and_scales_down_from_the_top() {
        let mut c = WorkloadController::new(spec(Controller::Replicated, 3, false), 7);
        assert_eq!(
            drain(&mut c),
            (0..3).map(|ordinal| Action::Place { ordinal }).collect::<Vec<_>>()
        );
        for o in 0..3 {
            c.handle_placed(o, HostId(10 + u64::from(o)));
        }
        assert_eq!(
            drain(&mut c)[0],
            Action::Assign { ordinal: 0, host: HostId(10), epoch: 7, generation: 1 }
        );
        c.handle_spec(spec(Controller::Replicated, 1, false));
        assert_eq!(
            drain(&mut c),
            [
                Action::Stop { ordinal: 1, host: HostId(11) },
                Action::Stop { ordinal: 2, host: HostId(12) }
            ]
        );
        assert_eq!(c.slots().count(), 1);
    }

    #[test]
    fn stateful_starts_in_order_and_a_replacement_keeps_its_ordinal() {
        let mut c = WorkloadController::new(spec(Controller::Stateful, 3, false), 1);
        assert_eq!(drain(&mut c), [Action::Place { ordinal: 0 }]);
        c.handle_placed(0, HostId(1));
        drain(&mut c);
        c.handle_status(0, HostId(1), 1, ReplicaPhase::Starting);
        assert!(drain(&mut c).is_empty(), "1 waits until 0 runs");
        c.handle_status(0, HostId(1), 1, ReplicaPhase::Running);
        assert_eq!(drain(&mut c), [Action::Place { ordinal: 1 }]);
        c.handle_placed(1, HostId(2));
        c.handle_status(1, HostId(2), 1, ReplicaPhase::Running);
        assert_eq!(drain(&mut c).last(), Some(&Action::Place { ordinal: 2 }));
        // Host 1 dies: ordinal 0 is placed again, as ordinal 0.
        c.handle_host_down(HostId(1));
        assert_eq!(drain(&mut c), [Action::Place { ordinal: 0 }]);
    }

    #[test]
    fn stale_reports_are_ignored_and_failures_are_replaced() {
        let mut c = WorkloadController::new(spec(Controller::Replicated, 1, false), 5);
        drain(&mut c);
        c.handle_placed(0, HostId(1));
        drain(&mut c);
        c.handle_status(0, HostId(1), 4, ReplicaPhase::Failed); // an older incarnation's report
        c.handle_status(0, HostId(9), 5, ReplicaPhase::Failed); // a host that does not hold it
        assert!(drain(&mut c).is_empty());
        assert_eq!(c.slots().next(), Some((0, Some(HostId(1)), ReplicaPhase::Assigned)));
        c.handle_status(0, HostId(1), 5, ReplicaPhase::Failed);
        assert_eq!(
            drain(&mut c),
            [Action::Stop { ordinal: 0, host: HostId(1) }, Action::Place { ordinal: 0 }]
        );
    }

    #[test]
    fn vm_power_flows_as_desired_state_and_containers_ignore_it() {
        let mut c = WorkloadController::new(spec(Controller::Stateful, 1, true), 1);
        drain(&mut c);
        c.handle_placed(0, HostId(3));
        drain(&mut c);
        let mut off = spec(Controller::Stateful, 1, true);
        if let WorkloadKind::Vm(vm) = &mut off.kind {
            vm.power = PowerState::Off;
        }
        c.handle_spec(off);
        assert_eq!(
            drain(&mut c),
            [Action::Power { ordinal: 0, host: HostId(3), action: VmAction::Stop }]
        );
        c.handle_vm_action(VmAction::Reboot, None);
        assert_eq!(
            drain(&mut c),
            [Action::Power { ordinal: 0, host: HostId(3), action: VmAction::Reboot }]
        );

        let mut web = WorkloadController::new(spec(Controller::Replicated, 1, false), 1);
        drain(&mut web);
        web.handle_placed(0, HostId(4));
        drain(&mut web);
        web.handle_vm_action(VmAction::Reboot, Some(0));
        assert!(drain(&mut web).is_empty());
    }

    #[test]
    fn a_new_image_rolls_out_one_slot_at_a_time_and_a_count_change_does_not() {
        let mut c = WorkloadController::new(spec(Controller::Stateful, 3, false), 2);
        for ordinal in 0..3 {
            drain(&mut c);
            c.handle_placed(ordinal, HostId(u64::from(ordinal)));
            c.handle_status(ordinal, HostId(u64::from(ordinal)), 2, ReplicaPhase::Running);
        }
        drain(&mut c);
        c.handle_spec(spec(Controller::Stateful, 3, false));
        assert!(drain(&mut c).is_empty(), "the same spec changes nothing");
        let mut v2 = spec(Controller::Stateful, 3, false);
        if let WorkloadKind::Container(container) = &mut v2.kind {
            container.image = "web:2".into();
        }
        c.handle_spec(v2.clone());
        assert_eq!(c.generation(), 2);
        // One at a time (max_unavailable 1), the highest ordinal first, keeping its ordinal.
        assert_eq!(
            drain(&mut c),
            [Action::Stop { ordinal: 2, host: HostId(2) }, Action::Place { ordinal: 2 }]
        );
        c.handle_placed(2, HostId(7));
        assert_eq!(
            drain(&mut c),
            [Action::Assign { ordinal: 2, host: HostId(7), epoch: 2, generation: 2 }]
        );
        c.handle_status(2, HostId(7), 2, ReplicaPhase::Running);
        assert_eq!(
            drain(&mut c),
            [Action::Stop { ordinal: 1, host: HostId(1) }, Action::Place { ordinal: 1 }]
        );
        let mut more = v2;
        more.replicas = 4;
        c.handle_spec(more);
        assert_eq!(c.generation(), 2, "a count change is not a new template");
    }

    #[test]
    fn a_restored_controller_keeps_its_hosts_and_places_only_what_is_missing() {
        let restored = [(0, HostId(5), 1), (2, HostId(6), 1), (7, HostId(9), 1)];
        let mut c =
            WorkloadController::restore(spec(Controller::Replicated, 3, false), 4, 1, restored);
        assert_eq!(
            drain(&mut c),
            [Action::Stop { ordinal: 7, host: HostId(9) }, Action::Place { ordinal: 1 }]
        );
        let slots: Vec<_> = c.slots().collect();
        assert_eq!(slots[0], (0, Some(HostId(5)), ReplicaPhase::Assigned));
        assert_eq!(slots[2], (2, Some(HostId(6)), ReplicaPhase::Assigned));
    }

    #[test]
    fn a_slot_that_keeps_failing_backs_off_and_running_long_enough_forgets_it() {
        let mut c = WorkloadController::new(spec(Controller::Replicated, 1, false), 3);
        let mut host = 0;
        // Fails as soon as it is assigned; count the ticks until it asks for a host again.
        let mut waits = Vec::new();
        for _ in 0..12 {
            assert_eq!(drain(&mut c), [Action::Place { ordinal: 0 }]);
            host += 1;
            c.handle_placed(0, HostId(host));
            c.handle_status(0, HostId(host), 3, ReplicaPhase::Failed);
            let mut ticks = 0;
            while !drain(&mut c).iter().any(|a| matches!(a, Action::Place { .. })) {
                assert!(c.needs_ticks());
                c.handle_tick();
                ticks += 1;
            }
            waits.push(ticks);
            c.handle_unplaced(0); // ask again next time round
            c.handle_tick();
        }
        assert_eq!(waits, [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, BACKOFF_TICKS_MAX]);

        // Placed and running for STABLE_TICKS: the next failure is replaced at once again.
        drain(&mut c);
        host += 1;
        c.handle_placed(0, HostId(host));
        c.handle_status(0, HostId(host), 3, ReplicaPhase::Running);
        for _ in 0..STABLE_TICKS {
            assert!(c.needs_ticks());
            c.handle_tick();
        }
        assert!(!c.needs_ticks(), "failures forgotten");
        drain(&mut c);
        c.handle_status(0, HostId(host), 3, ReplicaPhase::Failed);
        assert!(drain(&mut c).contains(&Action::Place { ordinal: 0 }));
    }

    /// Seeded chaos: hosts die, replicas fail, reports arrive twice, late or from the past; a slot
    /// is never assigned while it holds an assignment, and once faults stop every slot runs.
    #[test]
    fn converges_without_double_assignment_under_seeded_faults() {
        for seed in [1u64, 7, 42, 1_000] {
            let mut rng = seed;
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            for controller in [Controller::Replicated, Controller::Stateful] {
                let mut c = WorkloadController::new(spec(controller, 5, false), 3);
                let mut holding: HashMap<u32, HostId> = HashMap::new();
                let mut down = [false; 8];
                let mut reports: Vec<(u32, HostId, u64, ReplicaPhase)> = Vec::new();
                for step in 0..1_000 {
                    let calm = step >= 200;
                    c.handle_tick();
                    while let Some(action) = c.poll_action() {
                        match action {
                            Action::Place { ordinal } => {
                                let up: Vec<u64> = (0..8).filter(|h| !down[*h as usize]).collect();
                                if up.is_empty() || (!calm && next(5) == 0) {
                                    c.handle_unplaced(ordinal);
                                } else {
                                    c.handle_placed(
                                        ordinal,
                                        HostId(up[next(up.len() as u64) as usize]),
                                    );
                                }
                            }
                            Action::Assign { ordinal, host, epoch, .. } => {
                                assert!(
                                    holding.insert(ordinal, host).is_none(),
                                    "slot {ordinal} assigned twice"
                                );
                                reports.push((ordinal, host, epoch, ReplicaPhase::Running));
                            }
                            Action::Stop { ordinal, host } => {
                                if holding.get(&ordinal) == Some(&host) {
                                    holding.remove(&ordinal);
                                }
                            }
                            Action::Power { .. } => {}
                        }
                    }
                    if !calm {
                        match next(10) {
                            0 => {
                                let h = next(8);
                                down[h as usize] = true;
                                holding.retain(|_, held| held.0 != h);
                                c.handle_host_down(HostId(h));
                            }
                            1 => down[next(8) as usize] = false,
                            2 => {
                                if let Some((&o, &h)) = holding.iter().next() {
                                    reports.push((o, h, 3, ReplicaPhase::Failed));
                                }
                            }
                            3 => reports.push((
                                next(5) as u32,
                                HostId(next(8)),
                                2,
                                ReplicaPhase::Failed,
                            )),
                            4 => {
                                if let Some(r) = reports.first().copied() {
                                    reports.push(r); // duplicate
                                }
                            }
                            _ => {}
                        }
                    } else {
                        down.iter_mut().for_each(|d| *d = false);
                    }
                    // Deliver reports, sometimes out of order while faults last.
                    if !reports.is_empty() {
                        let at = if calm { 0 } else { next(reports.len() as u64) as usize };
                        let (o, h, e, phase) = reports.remove(at);
                        // A failure report makes the driver forget its assignment too.
                        if phase == ReplicaPhase::Failed && e == 3 && holding.get(&o) == Some(&h) {
                            holding.remove(&o);
                        }
                        c.handle_status(o, h, e, phase);
                    }
                    // Calm: retry any slot left without a host.
                    if calm && step % 10 == 0 {
                        c.handle_spec(spec(controller, 5, false));
                    }
                }
                let slots: Vec<_> = c.slots().collect();
                assert_eq!(slots.len(), 5);
                assert!(
                    slots
                        .iter()
                        .all(|(_, host, phase)| host.is_some() && *phase == ReplicaPhase::Running),
                    "seed {seed} {controller:?}: not converged: {slots:?}"
                );
            }
        }
    }
}
