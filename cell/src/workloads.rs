//! The workloads actor: the scheduler core and every workload controller of the cell, around
//! one rule — nothing leaves this actor before what it depends on is durable.
//!
//! Protocol:
//! - every message changes the in-memory cores at once, then [`State::step`] runs the
//!   controllers' actions to a fixed point: placements go to the scheduler in one batch, and
//!   assignments, releases and power commands become storage writes and host deliveries;
//! - the writes are queued on the group committer *in handler order* (`submit`), and a task
//!   waits for the commit and hands the deliveries and replies back as [`Msg::Durable`]; only
//!   then are hosts told and callers answered. A reply with no writes of its own still waits
//!   behind commits in flight (an empty submission is a barrier), so no caller ever reads state
//!   that could vanish;
//! - a failed commit fails the actor: its supervisor restarts it and it rebuilds from storage,
//!   so memory never drifts from what is stored;
//! - on start it bumps the cell epoch and reads everything back; hosts re-subscribe (their
//!   streams ended with the old actor) and get their assignments under the new epoch.
//!
//! Limits: idempotency records ([`Limits::idempotency_max`], oldest evicted), host streams and
//! watch streams (bounded channels; a stream that falls behind is ended and its reader
//! re-subscribes), list pages ([`Limits::list_len_max`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use cellplane_api::wire::{
    Apply, Assignment, CellSummary, ErrorCode, ErrorReply, ListRequest, Message, PowerCommand,
    Scale, StatusReport, Unassign, VmActionRequest, WorkloadList, WorkloadRef, WorkloadStatus,
};
use cellplane_api::{
    Host, HostId, HostState, Replica, ReplicaPhase, Tenant, TenantId, Usage, Validate,
    WorkloadKind, WorkloadName, WorkloadSpec,
};
use cellplane_storage::group::Write;
use cellplane_storage::keyspace::TenantKeys;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{mpsc, oneshot};

use crate::core::controller::{Action, WorkloadController};
use crate::core::scheduler::{Request, Scheduler, WorkloadKey};
use crate::records::{self, Stored};
use crate::supervisor::Shared;

/// How a request is answered.
pub type Reply = oneshot::Sender<Result<Message, ErrorReply>>;

/// Limits of the workloads actor.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Idempotency records kept (the oldest is forgotten first).
    pub idempotency_max: usize,
    /// Most workloads in one list page.
    pub list_len_max: usize,
    /// Messages buffered per host or watch stream before it is ended as too slow.
    pub stream_len_max: usize,
    /// How often refused placements are tried again.
    pub retry_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { idempotency_max: 65_536, list_len_max: 1_000, stream_len_max: 4_096, retry_ms: 500 }
    }
}

/// What the workloads actor handles.
pub enum Msg {
    /// Create or update a tenant (its quota).
    PutTenant(Box<Tenant>, Reply),
    /// Remove a tenant that has no workloads left.
    DeleteTenant(TenantId, Reply),
    /// Create or change a workload.
    Apply(Box<Apply>, Reply),
    /// Change a replica count.
    Scale(Box<Scale>, Reply),
    /// Remove a workload.
    Delete(Box<WorkloadRef>, Reply),
    /// Read a workload.
    Get(Box<WorkloadRef>, Reply),
    /// List workloads.
    List(Box<ListRequest>, Reply),
    /// A VM power action.
    VmAction(Box<VmActionRequest>, Reply),
    /// Stream a tenant's workload changes into this channel.
    Watch(TenantId, mpsc::Sender<Message>),
    /// Capacity and health.
    Summary(Reply),
    /// A host's record and its current state (from its shard).
    Host(Box<Host>),
    /// A host's state changed (from its shard).
    HostState(HostId, HostState),
    /// A host reports a replica's phase (with the gateway's admission, released once handled).
    Status(Box<StatusReport>, Option<tokio::sync::OwnedSemaphorePermit>),
    /// Hosts open one assignment stream.
    Subscribe(Vec<HostId>, mpsc::Sender<Message>),
    /// Try refused placements again.
    Retry,
    /// A commit is durable: deliver and answer.
    Durable(Box<Outcome>),
    /// A commit failed: the actor fails and is rebuilt from storage.
    CommitFailed(String),
    /// Chaos: fail now, as a bug would.
    Crash,
}

/// What waits for a commit.
#[derive(Default)]
pub struct Outcome {
    writes: Vec<Write>,
    deliveries: Vec<(HostId, Message)>,
    replies: Vec<(Reply, Result<Message, ErrorReply>)>,
    changed: BTreeSet<u32>,
    deleted: Vec<WorkloadRef>,
    version: u64,
}

/// The actor.
pub struct Workloads;

struct Entry {
    key: WorkloadKey,
    controller: WorkloadController,
    /// Its slots and empty slots when last counted into the cell's totals.
    counted: (u64, u64),
}

struct TenantState {
    tenant: Tenant,
    keys: TenantKeys,
    workloads: BTreeMap<WorkloadName, u32>,
    watchers: Vec<mpsc::Sender<Message>>,
}

/// The actor's state.
pub struct State {
    shared: Arc<Shared>,
    epoch: u64,
    scheduler: Scheduler,
    hosts: HashMap<HostId, HostState>,
    tenants: HashMap<TenantId, TenantState>,
    entries: Vec<Option<Entry>>,
    free_ids: Vec<u32>,
    /// Which slots each host holds: `(entry, ordinal)`.
    on_host: HashMap<HostId, Vec<(u32, u32)>>,
    streams: HashMap<HostId, mpsc::Sender<Message>>,
    /// Per tenant, so that one tenant's keys never collide with (or reveal) another's.
    idempotency: HashMap<(TenantId, [u8; 16]), WorkloadName>,
    idempotency_order: VecDeque<(TenantId, [u8; 16])>,
    dirty: BTreeSet<u32>,
    unplaced: BTreeSet<u32>,
    /// Workloads with a crash-loop backoff running: ticked on every retry.
    backing_off: BTreeSet<u32>,
    in_flight: usize,
    host_counts: [u32; 5],
    /// Slots and empty slots of every workload, kept as controllers change (for summaries).
    replicas: u64,
    pending: u64,
}

fn refuse(code: ErrorCode, detail: impl Into<String>) -> ErrorReply {
    ErrorReply { code, detail: detail.into() }
}

fn not_found(tenant: &TenantId, workload: &WorkloadName) -> ErrorReply {
    refuse(ErrorCode::NotFound, format!("tenant {tenant} has no workload {workload}"))
}

impl Actor for Workloads {
    type Msg = Msg;
    type State = State;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        myself: ActorRef<Msg>,
        shared: Arc<Shared>,
    ) -> Result<State, ActorProcessingErr> {
        let epoch = crate::incarnation::start_incarnation(&shared.db, &shared.config.cell).await?.0;
        shared.register_workloads(myself.clone());
        let stored = records::load(&shared.db, &shared.config.cell).await?;
        let mut state = State {
            shared: shared.clone(),
            epoch,
            scheduler: Scheduler::new(),
            hosts: HashMap::new(),
            tenants: HashMap::new(),
            entries: Vec::new(),
            free_ids: Vec::new(),
            on_host: HashMap::new(),
            streams: HashMap::new(),
            idempotency: HashMap::new(),
            idempotency_order: VecDeque::new(),
            dirty: BTreeSet::new(),
            unplaced: BTreeSet::new(),
            backing_off: BTreeSet::new(),
            in_flight: 0,
            host_counts: [0; 5],
            replicas: 0,
            pending: 0,
        };
        let mut outcome = Outcome::default();
        state.restore(stored, &mut outcome);
        state.step(&mut outcome);
        state.finish(&myself, outcome).await?;
        shared.epoch.store(epoch, std::sync::atomic::Ordering::Relaxed);
        let retry = std::time::Duration::from_millis(shared.config.limits.retry_ms);
        myself.send_interval(retry, || Msg::Retry);
        tracing::info!(cell = %shared.config.cell, epoch, "workloads recovered");
        Ok(state)
    }

    async fn post_start(
        &self,
        _myself: ActorRef<Msg>,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        // Shards tell this (possibly new) actor every host's current state.
        state.shared.republish_hosts();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Msg>,
        message: Msg,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        let mut outcome = Outcome::default();
        match message {
            Msg::Durable(done) => {
                state.in_flight -= 1;
                state.deliver(*done);
                return Ok(());
            }
            Msg::CommitFailed(error) => {
                return Err(format!("commit failed, rebuilding from storage: {error}").into());
            }
            Msg::Crash => panic!("chaos: workloads actor crashed on purpose"),
            Msg::PutTenant(tenant, reply) => {
                let answer = state.put_tenant(*tenant, &mut outcome);
                outcome.replies.push((reply, answer));
            }
            Msg::DeleteTenant(tenant, reply) => {
                let answer = state.delete_tenant(&tenant, &mut outcome);
                outcome.replies.push((reply, answer));
            }
            Msg::Apply(apply, reply) => {
                let answer = state.apply(*apply, &mut outcome);
                outcome.replies.push((reply, answer));
            }
            Msg::Scale(scale, reply) => {
                let answer = state.scale(*scale, &mut outcome);
                outcome.replies.push((reply, answer));
            }
            Msg::Delete(target, reply) => {
                let answer = state.delete(*target, &mut outcome);
                outcome.replies.push((reply, answer));
            }
            Msg::Get(target, reply) => {
                let answer = state
                    .find(&target.tenant, &target.workload)
                    .map(|id| Message::Workload(Box::new(state.status(id))));
                outcome.replies.push((reply, answer));
            }
            Msg::List(request, reply) => {
                let answer = state.list(&request);
                outcome.replies.push((reply, answer));
            }
            Msg::VmAction(request, reply) => {
                let answer = state.vm_action(*request);
                outcome.replies.push((reply, answer));
            }
            Msg::Watch(tenant, sender) => match state.tenants.get_mut(&tenant) {
                Some(t) => t.watchers.push(sender),
                None => {
                    let refusal = refuse(ErrorCode::NotFound, format!("unknown tenant {tenant}"));
                    let _ = sender.try_send(Message::Error(refusal));
                }
            },
            Msg::Summary(reply) => {
                let summary = state.summary();
                outcome.replies.push((reply, Ok(Message::Summary(Box::new(summary)))));
            }
            Msg::Host(host) => state.host(*host),
            Msg::HostState(id, to) => state.host_state(id, to, &mut outcome),
            Msg::Status(report, _admitted) => state.report(*report, &mut outcome),
            Msg::Subscribe(hosts, sender) => state.subscribe(hosts, sender, &mut outcome),
            Msg::Retry => {
                for id in std::mem::take(&mut state.unplaced) {
                    if let Some(entry) = state.entry_mut(id) {
                        entry.controller.handle_retry();
                        state.dirty.insert(id);
                    }
                }
                for id in std::mem::take(&mut state.backing_off) {
                    let Some(entry) = state.entry_mut(id) else { continue };
                    entry.controller.handle_tick();
                    if entry.controller.needs_ticks() {
                        state.backing_off.insert(id);
                    }
                    state.dirty.insert(id);
                }
            }
        }
        state.step(&mut outcome);
        state.finish(&myself, outcome).await
    }
}

impl State {
    fn entry(&self, id: u32) -> Option<&Entry> {
        self.entries.get(id as usize).and_then(Option::as_ref)
    }

    fn entry_mut(&mut self, id: u32) -> Option<&mut Entry> {
        self.entries.get_mut(id as usize).and_then(Option::as_mut)
    }

    fn find(&self, tenant: &TenantId, workload: &WorkloadName) -> Result<u32, ErrorReply> {
        self.tenants
            .get(tenant)
            .and_then(|t| t.workloads.get(workload).copied())
            .ok_or_else(|| not_found(tenant, workload))
    }

    /// Rebuilds memory from what storage holds.
    fn restore(&mut self, stored: records::CellState, outcome: &mut Outcome) {
        for host in stored.hosts {
            // Liveness is soft state: every host waits for its shard's word.
            let host = Host { state: HostState::Joining, ..host };
            let from = self.hosts.insert(host.id, host.state);
            self.count_host(from, host.state);
            self.scheduler.handle_host(&host);
        }
        for (key, tenant, workload) in stored.idempotency {
            self.idempotency.insert((tenant.clone(), key), workload);
            self.idempotency_order.push_back((tenant, key));
        }
        for (tenant, workloads) in stored.tenants {
            let keys = TenantKeys::new(&self.shared.config.cell, &tenant.id);
            let id = tenant.id.clone();
            let state =
                TenantState { tenant, keys, workloads: BTreeMap::new(), watchers: Vec::new() };
            self.tenants.insert(id.clone(), state);
            for w in workloads {
                let key: WorkloadKey = (id.clone(), w.spec.name.clone());
                let mut kept = Vec::new();
                for (ordinal, Stored { host, generation, .. }) in w.slots {
                    if self.scheduler.handle_restore(host, &key, w.spec.resources) {
                        kept.push((ordinal, host, generation));
                    } else {
                        // The host is gone or shrank: the slot is placed again.
                        let keys = &self.tenants[&id].keys;
                        outcome.writes.push(Write::Clear(records::replica_key(
                            keys,
                            &w.spec.name,
                            ordinal,
                        )));
                    }
                }
                let controller =
                    WorkloadController::restore(w.spec, self.epoch, w.generation, kept.clone());
                let entry_id = self.insert(Entry { key, controller, counted: (0, 0) });
                for (ordinal, host, _) in kept {
                    self.on_host.entry(host).or_default().push((entry_id, ordinal));
                }
            }
        }
    }

    fn insert(&mut self, entry: Entry) -> u32 {
        let name = entry.key.1.clone();
        let tenant = entry.key.0.clone();
        let id = match self.free_ids.pop() {
            Some(id) => {
                self.entries[id as usize] = Some(entry);
                id
            }
            None => {
                self.entries.push(Some(entry));
                // Bounded by tenants' workload quotas, far below u32::MAX.
                (self.entries.len() - 1) as u32
            }
        };
        if let Some(t) = self.tenants.get_mut(&tenant) {
            t.workloads.insert(name, id);
        }
        self.dirty.insert(id);
        id
    }

    fn put_tenant(&mut self, tenant: Tenant, outcome: &mut Outcome) -> Result<Message, ErrorReply> {
        let key = records::tenant_key(&self.shared.config.cell, &tenant.id);
        outcome.writes.push(Write::Set(key, records::json(&tenant)));
        match self.tenants.get_mut(&tenant.id) {
            Some(existing) => existing.tenant = tenant,
            None => {
                let keys = TenantKeys::new(&self.shared.config.cell, &tenant.id);
                let id = tenant.id.clone();
                let state =
                    TenantState { tenant, keys, workloads: BTreeMap::new(), watchers: Vec::new() };
                self.tenants.insert(id, state);
            }
        }
        Ok(Message::Done(0))
    }

    fn delete_tenant(
        &mut self,
        id: &TenantId,
        outcome: &mut Outcome,
    ) -> Result<Message, ErrorReply> {
        let tenant = self
            .tenants
            .get(id)
            .ok_or_else(|| refuse(ErrorCode::NotFound, format!("unknown tenant {id}")))?;
        if !tenant.workloads.is_empty() {
            let n = tenant.workloads.len();
            return Err(refuse(ErrorCode::Invalid, format!("tenant {id} still has {n} workloads")));
        }
        outcome.writes.push(Write::Clear(records::tenant_key(&self.shared.config.cell, id)));
        let mine: Vec<[u8; 16]> =
            self.idempotency_order.iter().filter(|(t, _)| t == id).map(|(_, k)| *k).collect();
        for key in mine {
            outcome.writes.push(Write::Clear(records::idempotency_key(&tenant.keys, &key)));
            self.idempotency.remove(&(id.clone(), key));
        }
        self.idempotency_order.retain(|(t, _)| t != id);
        self.tenants.remove(id);
        Ok(Message::Done(0))
    }

    /// Refuses a change that would take `tenant` past its quota, with `spec` replacing the
    /// workload of the same name.
    fn check_quota(&self, tenant: &TenantState, spec: &WorkloadSpec) -> Result<(), ErrorReply> {
        let others = tenant
            .workloads
            .iter()
            .filter(|(name, _)| *name != &spec.name)
            .filter_map(|(_, id)| self.entry(*id))
            .map(|entry| Usage::of(entry.controller.spec()));
        let usage = others.fold(Usage::of(spec), Usage::plus);
        match tenant.tenant.quota.exceeded_by(usage) {
            Some((what, want, max)) => Err(refuse(
                ErrorCode::QuotaExceeded,
                format!("tenant {} would use {want} {what}; its quota is {max}", tenant.tenant.id),
            )),
            None => Ok(()),
        }
    }

    fn apply(&mut self, apply: Apply, outcome: &mut Outcome) -> Result<Message, ErrorReply> {
        let Apply { tenant: tenant_id, idempotency_key, spec } = apply;
        if let Some(w) = self.idempotency.get(&(tenant_id.clone(), idempotency_key)) {
            return if w == &spec.name {
                Ok(Message::Done(0)) // applied before: nothing to do again
            } else {
                Err(refuse(ErrorCode::Invalid, "idempotency key was used for another change"))
            };
        }
        let tenant = self
            .tenants
            .get(&tenant_id)
            .ok_or_else(|| refuse(ErrorCode::NotFound, format!("unknown tenant {tenant_id}")))?;
        self.check_quota(tenant, &spec)?;
        let existing = tenant.workloads.get(&spec.name).copied();
        if let Some(id) = existing
            && let Some(entry) = self.entry(id)
        {
            let old = entry.controller.spec();
            let same_kind = std::mem::discriminant(&old.kind) == std::mem::discriminant(&spec.kind);
            if !same_kind || old.controller != spec.controller {
                return Err(refuse(
                    ErrorCode::Invalid,
                    format!(
                        "workload {} exists as a {:?} {}; delete it before reusing the name",
                        spec.name,
                        old.controller,
                        kind_name(&old.kind)
                    ),
                ));
            }
        }
        let keys = tenant.keys.clone();
        let name = spec.name.clone();
        let id = match existing {
            Some(id) => {
                let entry = self.entry_mut(id).expect("listed workloads exist");
                entry.controller.handle_spec(spec);
                self.dirty.insert(id);
                id
            }
            None => {
                let key = (tenant_id.clone(), name.clone());
                let controller = WorkloadController::new(spec, self.epoch);
                self.insert(Entry { key, controller, counted: (0, 0) })
            }
        };
        let controller = &self.entry(id).expect("just set").controller;
        outcome.writes.push(Write::Set(
            records::workload_key(&keys, &name),
            records::workload_value(controller.spec(), controller.generation()),
        ));
        self.remember(idempotency_key, tenant_id, name, outcome);
        outcome.changed.insert(id);
        Ok(Message::Done(0))
    }

    fn remember(
        &mut self,
        key: [u8; 16],
        tenant: TenantId,
        workload: WorkloadName,
        outcome: &mut Outcome,
    ) {
        let keys = &self.tenants[&tenant].keys;
        outcome
            .writes
            .push(Write::Set(records::idempotency_key(keys, &key), records::json(&workload)));
        self.idempotency.insert((tenant.clone(), key), workload);
        self.idempotency_order.push_back((tenant, key));
        while self.idempotency_order.len() > self.shared.config.limits.idempotency_max {
            if let Some((tenant, old)) = self.idempotency_order.pop_front() {
                self.idempotency.remove(&(tenant.clone(), old));
                if let Some(t) = self.tenants.get(&tenant) {
                    outcome.writes.push(Write::Clear(records::idempotency_key(&t.keys, &old)));
                }
            }
        }
    }

    fn scale(&mut self, scale: Scale, outcome: &mut Outcome) -> Result<Message, ErrorReply> {
        let id = self.find(&scale.tenant, &scale.workload)?;
        let mut spec = self.entry(id).expect("found").controller.spec().clone();
        spec.replicas = scale.replicas;
        spec.validate().map_err(|e| refuse(ErrorCode::Invalid, e.to_string()))?;
        self.check_quota(&self.tenants[&scale.tenant], &spec)?;
        let keys = self.tenants[&scale.tenant].keys.clone();
        let entry = self.entry_mut(id).expect("found");
        entry.controller.handle_spec(spec);
        let controller = &entry.controller;
        outcome.writes.push(Write::Set(
            records::workload_key(&keys, &scale.workload),
            records::workload_value(controller.spec(), controller.generation()),
        ));
        self.dirty.insert(id);
        outcome.changed.insert(id);
        Ok(Message::Done(0))
    }

    fn delete(
        &mut self,
        target: WorkloadRef,
        outcome: &mut Outcome,
    ) -> Result<Message, ErrorReply> {
        let id = self.find(&target.tenant, &target.workload)?;
        let entry = self.entry_mut(id).expect("found");
        let mut spec = entry.controller.spec().clone();
        spec.replicas = 0;
        entry.controller.handle_spec(spec);
        // Stop every slot now, while the entry still exists to say where they run.
        self.dirty.insert(id);
        self.step(outcome);
        let keys = &self.tenants[&target.tenant].keys;
        outcome.writes.push(Write::Clear(records::workload_key(keys, &target.workload)));
        if let Some(t) = self.tenants.get_mut(&target.tenant) {
            t.workloads.remove(&target.workload);
        }
        if let Some(entry) = self.entries[id as usize].take() {
            self.replicas -= entry.counted.0;
            self.pending -= entry.counted.1;
        }
        self.free_ids.push(id);
        self.unplaced.remove(&id);
        self.backing_off.remove(&id);
        outcome.deleted.push(target);
        Ok(Message::Done(0))
    }

    fn list(&self, request: &ListRequest) -> Result<Message, ErrorReply> {
        let tenant = self.tenants.get(&request.tenant).ok_or_else(|| {
            refuse(ErrorCode::NotFound, format!("unknown tenant {}", request.tenant))
        })?;
        let limit = (request.limit as usize).clamp(1, self.shared.config.limits.list_len_max);
        let start = match &request.after {
            Some(after) => std::ops::Bound::Excluded(after),
            None => std::ops::Bound::Unbounded,
        };
        let mut names = tenant.workloads.range((start, std::ops::Bound::Unbounded));
        let items: Vec<WorkloadStatus> =
            names.by_ref().take(limit).map(|(_, id)| self.status(*id)).collect();
        let more = names.next().is_some();
        Ok(Message::Workloads(Box::new(WorkloadList { items, more })))
    }

    fn vm_action(&mut self, request: VmActionRequest) -> Result<Message, ErrorReply> {
        let id = self.find(&request.tenant, &request.workload)?;
        let entry = self.entry_mut(id).expect("found");
        if !matches!(entry.controller.spec().kind, WorkloadKind::Vm(_)) {
            return Err(refuse(ErrorCode::Invalid, format!("{} is not a VM", request.workload)));
        }
        if !entry.controller.slots().any(|(o, host, _)| o == request.ordinal && host.is_some()) {
            return Err(refuse(
                ErrorCode::Unavailable,
                format!("{} replica {} has no host yet", request.workload, request.ordinal),
            ));
        }
        entry.controller.handle_vm_action(request.action, Some(request.ordinal));
        self.dirty.insert(id);
        Ok(Message::Done(0))
    }

    fn status(&self, id: u32) -> WorkloadStatus {
        let entry = self.entry(id).expect("listed workloads exist");
        let replicas = entry
            .controller
            .slots()
            .map(|(ordinal, host, phase)| Replica {
                workload: entry.key.1.clone(),
                ordinal,
                host,
                epoch: self.epoch,
                phase,
            })
            .collect();
        WorkloadStatus {
            tenant: entry.key.0.clone(),
            spec: entry.controller.spec().clone(),
            replicas,
        }
    }

    fn summary(&self) -> CellSummary {
        let (cpu_milli, memory_mib) = self.scheduler.totals();
        #[cfg(debug_assertions)]
        {
            // The totals are kept incrementally; tests (debug builds) check them against a scan.
            let scan = self.entries.iter().flatten().map(|e| e.controller.counts());
            let (replicas, pending) = scan.fold((0, 0), |(r, p), (er, ep)| (r + er, p + ep));
            assert_eq!(
                (replicas, pending),
                (self.replicas, self.pending),
                "replica totals drifted"
            );
            let mut hosts = [0u32; 5];
            self.hosts.values().for_each(|state| hosts[*state as usize] += 1);
            assert_eq!(hosts, self.host_counts, "host counts drifted");
            let workloads = self.entries.iter().flatten().count();
            assert_eq!(workloads, self.entries.len() - self.free_ids.len(), "ids drifted");
        }
        CellSummary {
            cell: self.shared.config.cell.clone(),
            epoch: self.epoch,
            hosts: self.host_counts,
            cpu_milli,
            memory_mib,
            workloads: (self.entries.len() - self.free_ids.len()) as u32,
            replicas: self.replicas,
            pending: self.pending,
        }
    }

    fn host(&mut self, host: Host) {
        let from = self.hosts.insert(host.id, host.state);
        self.count_host(from, host.state);
        self.scheduler.handle_host(&host);
        if host.state == HostState::Ready {
            self.retry_all();
        }
    }

    /// Keeps the hosts-by-state gauges exact: absolute values from this actor's own counts,
    /// so a restarted actor never inherits a dead one's increments.
    fn count_host(&mut self, from: Option<HostState>, to: HostState) {
        if let Some(from) = from {
            self.host_counts[from as usize] -= 1;
            let n = f64::from(self.host_counts[from as usize]);
            metrics::gauge!("cellplane_hosts", "state" => state_name(from)).set(n);
        }
        self.host_counts[to as usize] += 1;
        let n = f64::from(self.host_counts[to as usize]);
        metrics::gauge!("cellplane_hosts", "state" => state_name(to)).set(n);
    }

    fn retry_all(&mut self) {
        // New room: refused placements may fit now (the retry tick would get there too).
        for id in std::mem::take(&mut self.unplaced) {
            if let Some(entry) = self.entry_mut(id) {
                entry.controller.handle_retry();
                self.dirty.insert(id);
            }
        }
    }

    fn host_state(&mut self, id: HostId, to: HostState, outcome: &mut Outcome) {
        let Some(from) = self.hosts.insert(id, to) else {
            self.hosts.remove(&id);
            return; // its record comes first, from the same shard
        };
        self.count_host(Some(from), to);
        self.scheduler.handle_host_state(id, to);
        match to {
            HostState::Ready => self.retry_all(),
            HostState::Down => self.evacuate(id, outcome),
            _ => {}
        }
    }

    /// A host is down: its slots are emptied (and placed elsewhere by the next step).
    fn evacuate(&mut self, host: HostId, outcome: &mut Outcome) {
        let Some(slots) = self.on_host.remove(&host) else { return };
        let mut touched = BTreeSet::new();
        for (id, ordinal) in slots {
            let Some(Some(entry)) = self.entries.get(id as usize) else { continue };
            // Should the host still be listening, it stops the replica too.
            let keys = &self.tenants[&entry.key.0].keys;
            release(&mut self.scheduler, self.epoch, keys, entry, (ordinal, host), outcome);
            touched.insert(id);
        }
        for id in touched {
            if let Some(entry) = self.entry_mut(id) {
                entry.controller.handle_host_down(host);
            }
            self.dirty.insert(id);
            outcome.changed.insert(id);
        }
    }

    fn report(&mut self, report: StatusReport, outcome: &mut Outcome) {
        let Ok(id) = self.find(&report.tenant, &report.workload) else { return };
        let entry = self.entry_mut(id).expect("found");
        let changed =
            entry.controller.handle_status(report.ordinal, report.host, report.epoch, report.phase);
        if changed && report.phase == ReplicaPhase::Failed {
            self.backing_off.insert(id); // the next retry tick starts its backoff clock
        }
        if changed {
            self.dirty.insert(id);
            outcome.changed.insert(id);
        }
    }

    fn subscribe(
        &mut self,
        hosts: Vec<HostId>,
        sender: mpsc::Sender<Message>,
        outcome: &mut Outcome,
    ) {
        let Some(&first) = hosts.first() else { return };
        for &host in &hosts {
            for &(id, ordinal) in self.on_host.get(&host).into_iter().flatten() {
                if let Some(entry) = self.entry(id) {
                    outcome.deliveries.push((host, self.assignment(entry, ordinal, host)));
                }
            }
            self.streams.insert(host, sender.clone());
        }
        // One `Synced` for the whole stream, after every host's set.
        outcome.deliveries.push((first, Message::Synced(self.epoch)));
    }

    fn assignment(&self, entry: &Entry, ordinal: u32, host: HostId) -> Message {
        let spec = entry.controller.spec();
        Message::Assign(Box::new(Assignment {
            tenant: entry.key.0.clone(),
            replica: Replica {
                workload: spec.name.clone(),
                ordinal,
                host: Some(host),
                epoch: self.epoch,
                phase: ReplicaPhase::Assigned,
            },
            spec: spec.clone(),
        }))
    }

    /// Runs the controllers' actions to a fixed point: placements in batches, everything else
    /// into writes and deliveries.
    fn step(&mut self, outcome: &mut Outcome) {
        let mut places: Vec<(u32, u32)> = Vec::new();
        loop {
            while let Some(id) = self.dirty.pop_first() {
                let Some(Some(entry)) = self.entries.get_mut(id as usize) else { continue };
                let mut actions = Vec::new();
                while let Some(action) = entry.controller.poll_action() {
                    actions.push(action);
                }
                // Every change to a controller marks it dirty, so this keeps the totals exact.
                let (before, now) = (entry.counted, entry.controller.counts());
                entry.counted = now;
                self.replicas = self.replicas + now.0 - before.0;
                self.pending = self.pending + now.1 - before.1;
                for action in actions {
                    self.act(id, action, &mut places, outcome);
                }
            }
            if places.is_empty() {
                return;
            }
            let requests: Vec<Request<'_>> = places
                .iter()
                .map(|&(id, _)| {
                    let entry = self.entries[id as usize].as_ref().expect("placing entry");
                    let spec = entry.controller.spec();
                    Request {
                        workload: &entry.key,
                        resources: spec.resources,
                        vm: matches!(spec.kind, WorkloadKind::Vm(_)),
                        placement: &spec.placement,
                    }
                })
                .collect();
            let started = std::time::Instant::now();
            let results = self.scheduler.place_batch(&requests);
            metrics::histogram!("cellplane_placement_batch_seconds").record(started.elapsed());
            let placed = results.iter().filter(|r| r.is_ok()).count() as u64;
            metrics::counter!("cellplane_placements_total").increment(placed);
            metrics::counter!("cellplane_placements_refused_total")
                .increment(results.len() as u64 - placed);
            drop(requests);
            for ((id, ordinal), result) in places.drain(..).zip(results) {
                let entry = self.entries[id as usize].as_mut().expect("placing entry");
                match result {
                    Ok(host) => entry.controller.handle_placed(ordinal, host),
                    Err(_) => {
                        entry.controller.handle_unplaced(ordinal);
                        self.unplaced.insert(id);
                    }
                }
                self.dirty.insert(id);
            }
        }
    }

    fn act(&mut self, id: u32, action: Action, places: &mut Vec<(u32, u32)>, out: &mut Outcome) {
        let entry = self.entries[id as usize].as_ref().expect("acting entry");
        let keys = &self.tenants[&entry.key.0].keys;
        let name = &entry.controller.spec().name;
        match action {
            Action::Place { ordinal } => places.push((id, ordinal)),
            Action::Assign { ordinal, host, epoch, generation } => {
                let stored = Stored { host, epoch, generation };
                out.writes.push(Write::Set(
                    records::replica_key(keys, name, ordinal),
                    records::replica_value(stored),
                ));
                out.deliveries.push((host, self.assignment(entry, ordinal, host)));
                self.on_host.entry(host).or_default().push((id, ordinal));
                out.changed.insert(id);
            }
            Action::Stop { ordinal, host } => {
                release(&mut self.scheduler, self.epoch, keys, entry, (ordinal, host), out);
                if let Some(slots) = self.on_host.get_mut(&host) {
                    slots.retain(|&slot| slot != (id, ordinal));
                }
                out.changed.insert(id);
            }
            Action::Power { ordinal, host, action } => {
                out.deliveries.push((
                    host,
                    Message::Power(Box::new(PowerCommand {
                        host,
                        tenant: entry.key.0.clone(),
                        workload: name.clone(),
                        ordinal,
                        epoch: self.epoch,
                        action,
                    })),
                ));
            }
        }
    }

    /// Sends what `outcome` holds once its writes — and every commit before them — are
    /// durable.
    async fn finish(
        &mut self,
        myself: &ActorRef<Msg>,
        outcome: Outcome,
    ) -> Result<(), ActorProcessingErr> {
        let empty = outcome.deliveries.is_empty()
            && outcome.replies.is_empty()
            && outcome.changed.is_empty()
            && outcome.deleted.is_empty();
        if outcome.writes.is_empty() && (self.in_flight == 0 || empty) {
            self.deliver(outcome);
            return Ok(());
        }
        let mut outcome = outcome;
        let writes = std::mem::take(&mut outcome.writes);
        let commit = self.shared.committer.submit(writes).await?;
        self.in_flight += 1;
        let myself = myself.clone();
        tokio::spawn(async move {
            let message = match commit.await {
                Ok(version) => {
                    outcome.version = version;
                    Msg::Durable(Box::new(outcome))
                }
                Err(e) => {
                    for (reply, _) in outcome.replies {
                        let _ = reply.send(Err(refuse(ErrorCode::Unavailable, e.to_string())));
                    }
                    Msg::CommitFailed(e.to_string())
                }
            };
            // The actor may be gone (stopping): then nobody waits for this.
            let _ = myself.send_message(message);
        });
        Ok(())
    }

    fn deliver(&mut self, outcome: Outcome) {
        let Outcome { deliveries, replies, changed, deleted, version, .. } = outcome;
        for (host, message) in deliveries {
            if let Some(stream) = self.streams.get(&host)
                && stream.try_send(message).is_err()
            {
                // Gone or too slow: end the stream for every host on it (it may carry a whole
                // fleet shard); they subscribe again and get a full set.
                let dead = stream.clone();
                self.streams.retain(|_, s| !s.same_channel(&dead));
            }
        }
        for (reply, answer) in replies {
            let answer = match answer {
                Ok(Message::Done(_)) => Ok(Message::Done(version)),
                other => other,
            };
            let _ = reply.send(answer);
        }
        for id in changed {
            // Deleted ones were announced by the delete path; nobody watching, nothing to build.
            let watched = self.entry(id).is_some_and(|e| {
                self.tenants.get(&e.key.0).is_some_and(|t| !t.watchers.is_empty())
            });
            if watched {
                let item = Message::Workload(Box::new(self.status(id)));
                self.notify(&item);
            }
        }
        for target in deleted {
            self.notify(&Message::Deleted(Box::new(target)));
        }
    }

    fn notify(&mut self, item: &Message) {
        let tenant = match item {
            Message::Workload(w) => &w.tenant,
            Message::Deleted(r) => &r.tenant,
            _ => return,
        };
        if let Some(t) = self.tenants.get_mut(tenant) {
            t.watchers.retain(|w| w.try_send(item.clone()).is_ok());
        }
    }
}

/// Empties slot `ordinal` of `entry` on `host`: its assignment record goes, the host is told to
/// stop it, and the scheduler gets the room back.
fn release(
    scheduler: &mut Scheduler,
    epoch: u64,
    keys: &TenantKeys,
    entry: &Entry,
    (ordinal, host): (u32, HostId),
    out: &mut Outcome,
) {
    let spec = entry.controller.spec();
    out.writes.push(Write::Clear(records::replica_key(keys, &spec.name, ordinal)));
    let unassign =
        Unassign { host, tenant: entry.key.0.clone(), workload: spec.name.clone(), ordinal, epoch };
    out.deliveries.push((host, Message::Unassign(Box::new(unassign))));
    scheduler.handle_release(host, &entry.key, spec.resources);
}

/// The label value of a host state in metrics.
fn state_name(state: HostState) -> &'static str {
    match state {
        HostState::Joining => "joining",
        HostState::Ready => "ready",
        HostState::Suspect => "suspect",
        HostState::Down => "down",
        HostState::Draining => "draining",
    }
}

fn kind_name(kind: &WorkloadKind) -> &'static str {
    match kind {
        WorkloadKind::Container(_) => "container",
        WorkloadKind::Vm(_) => "VM",
    }
}
