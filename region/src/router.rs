//! The router runtime: a directory in storage with a cache in memory, a link to every cell, and
//! the routing of every tenant call to the cell that holds the object.
//!
//! Protocol:
//! - the directory (`("region", r, "tenant", t)` → tenant with its home cell;
//!   `("region", r, "placement", t, w)` → the cell holding workload `w` and what it reserves)
//!   changes only in serializable transactions, and the cache only after they commit; routing
//!   reads the cache alone, so a routed call costs no storage round trip;
//! - cells are polled for their summaries every `summary_ms`; a cell whose poll fails is
//!   unhealthy: placement passes it over, and calls for objects it holds fail fast as
//!   `Unavailable` ("cell c2 unavailable") while every other tenant is served as before;
//! - a new workload goes to the tenant's home cell while it has room, else to the best other
//!   allowed cell (overflow), recorded in the directory *before* the cell is asked, so a retry
//!   goes to the same cell; the tenant is created in an overflow cell on first use;
//! - tenant identity comes from the caller's certificate only; quotas are checked here and
//!   again by the cell; each tenant has a token bucket (`rate_per_s`, `burst`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use cellplane_api::wire::{
    Apply, CellSummary, DeleteTenant, DrainProgress, DrainRequest, ErrorCode, ErrorReply,
    Explanation, ListRequest, Message, RegionSummary, TenantCreated, WorkloadList, WorkloadRef,
};
use cellplane_api::{CellId, Name, Site, SiteId, Tenant, TenantId, Usage, Validate, WorkloadName};
use cellplane_storage::keyspace::{self, Subspace};
use cellplane_storage::{Database, StorageError};
use cellplane_transport::{Backoff, CertificateAuthority, Identity, Peer, Role, Setup};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::core::placement::{self, CellView, Demand, SiteView};
use crate::core::ratelimit::TokenBucket;

/// A cell the router knows.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CellEntry {
    /// Its name.
    pub id: CellId,
    /// Its site.
    pub site: SiteId,
    /// Its QUIC address.
    pub address: SocketAddr,
}

/// Router limits.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterLimits {
    /// Calls per second per tenant, on average.
    pub rate_per_s: u32,
    /// Calls a tenant may make at once after a quiet spell.
    pub burst: u32,
    /// How often cells are asked for their summaries.
    pub summary_ms: u64,
    /// Longest wait for a cell's answer.
    pub call_deadline_ms: u64,
}

impl Default for RouterLimits {
    fn default() -> Self {
        Self { rate_per_s: 1_000, burst: 2_000, summary_ms: 1_000, call_deadline_ms: 10_000 }
    }
}

/// How a router runs: the region's sites and cells.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterConfig {
    /// The region's name.
    pub region: Name,
    /// Where the router listens.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The region's sites.
    pub sites: Vec<Site>,
    /// The region's cells.
    pub cells: Vec<CellEntry>,
    /// Limits.
    #[serde(default)]
    pub limits: RouterLimits,
}

/// Calls (requests and open watches) in the router at once.
pub const CALLS_MAX: usize = 65_536;

/// Workloads a drain moves at once.
const MOVES_AT_ONCE: usize = 16;

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7_000))
}

/// What a workload reserves (for quotas).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Reserved {
    replicas: u64,
    cpu_milli: u64,
    memory_mib: u64,
}

impl From<Reserved> for Usage {
    fn from(r: Reserved) -> Self {
        Usage {
            workloads: 1,
            replicas: r.replicas,
            cpu_milli: r.cpu_milli,
            memory_mib: r.memory_mib,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Placed {
    cell: CellId,
    reserved: Reserved,
}

struct TenantEntry {
    tenant: Tenant,
    placed: BTreeMap<WorkloadName, Placed>,
}

struct CellLink {
    entry: CellEntry,
    peer: Peer,
    view: RwLock<(CellView, Option<CellSummary>)>,
}

/// A running router.
pub struct Router {
    config: RouterConfig,
    db: Database,
    space: Subspace,
    sites: BTreeMap<SiteId, SiteView>,
    cells: Vec<CellLink>,
    directory: RwLock<HashMap<TenantId, TenantEntry>>,
    buckets: Mutex<HashMap<TenantId, TokenBucket>>,
    /// Cells being emptied: they take nothing new.
    draining: RwLock<BTreeSet<CellId>>,
    ca: Option<CertificateAuthority>,
    start: Instant,
    /// Directory changes in this replica go one at a time (across replicas, transactions
    /// keep them consistent).
    changes: tokio::sync::Mutex<()>,
}

fn refuse(code: ErrorCode, detail: impl Into<String>) -> ErrorReply {
    ErrorReply { code, detail: detail.into() }
}

fn storage(e: StorageError) -> ErrorReply {
    refuse(ErrorCode::Unavailable, format!("the region directory: {e}"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn read<T>(m: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(m: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn reserved(spec: &cellplane_api::WorkloadSpec) -> Reserved {
    let usage = Usage::of(spec);
    Reserved { replicas: usage.replicas, cpu_milli: usage.cpu_milli, memory_mib: usage.memory_mib }
}

impl Router {
    /// Starts a router: reads the directory, links every cell (as `setup`'s router identity)
    /// and polls their summaries. `ca` lets it issue tenants' credentials.
    pub async fn start(
        config: RouterConfig,
        db: Database,
        setup: Setup,
        ca: Option<CertificateAuthority>,
    ) -> Result<Arc<Self>, String> {
        let sites = config
            .sites
            .iter()
            .map(|s| {
                let view = SiteView { kind: s.kind, latency_ms: s.latency_ms.clone() };
                (s.id.clone(), view)
            })
            .collect();
        let mut cells = Vec::new();
        for entry in &config.cells {
            let expect = Identity::Cell(entry.id.0.clone());
            let peer =
                Peer::connect(entry.address, expect, setup.clone(), Backoff::default(), None)
                    .map_err(|e| format!("cell {}: {e}", entry.id))?;
            let view = CellView {
                cell: entry.id.clone(),
                site: entry.site.clone(),
                healthy: false,
                draining: false,
                free_cpu_milli: 0,
                free_memory_mib: 0,
            };
            cells.push(CellLink { entry: entry.clone(), peer, view: RwLock::new((view, None)) });
        }
        let space = keyspace::region(config.region.as_str());
        let router = Arc::new(Self {
            config,
            db,
            space,
            sites,
            cells,
            directory: RwLock::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
            draining: RwLock::new(BTreeSet::new()),
            ca,
            start: Instant::now(),
            changes: tokio::sync::Mutex::new(()),
        });
        router.load().await.map_err(|e| format!("reading the directory: {e}"))?;
        tokio::spawn(poll_summaries(Arc::downgrade(&router)));
        router.poll_once().await;
        Ok(router)
    }

    async fn load(&self) -> Result<(), StorageError> {
        let tx = self.db.begin().await?;
        let mut directory = HashMap::new();
        let tenants = self.space.subspace(&("tenant",));
        for (_, value) in tx.get_range(&keyspace::range_of(&tenants)).await?.rows {
            let tenant: Tenant = serde_json::from_slice(&value)
                .map_err(|e| StorageError::Corrupt(format!("tenant: {e}")))?;
            directory.insert(tenant.id.clone(), TenantEntry { tenant, placed: BTreeMap::new() });
        }
        let placements = self.space.subspace(&("placement",));
        for (key, value) in tx.get_range(&keyspace::range_of(&placements)).await?.rows {
            let (tenant, workload): (String, String) = placements
                .unpack(&key)
                .map_err(|e| StorageError::Corrupt(format!("placement key: {e}")))?;
            let placed: Placed = serde_json::from_slice(&value)
                .map_err(|e| StorageError::Corrupt(format!("placement: {e}")))?;
            let (Ok(tenant), Ok(workload)) = (TenantId::new(&tenant), WorkloadName::new(&workload))
            else {
                return Err(StorageError::Corrupt(format!("placement {tenant}/{workload}")));
            };
            if let Some(entry) = directory.get_mut(&tenant) {
                entry.placed.insert(workload, placed);
            }
        }
        let draining = self.space.subspace(&("draining",));
        let mut cells = BTreeSet::new();
        for (key, _) in tx.get_range(&keyspace::range_of(&draining)).await?.rows {
            let (cell,): (String,) =
                draining.unpack(&key).map_err(|e| StorageError::Corrupt(format!("drain: {e}")))?;
            cells.insert(CellId::new(&cell).map_err(|e| StorageError::Corrupt(e.to_string()))?);
        }
        tx.cancel();
        *write(&self.directory) = directory;
        *write(&self.draining) = cells;
        Ok(())
    }

    fn tenant_key(&self, tenant: &TenantId) -> Vec<u8> {
        self.space.pack(&("tenant", tenant.as_str()))
    }

    fn placement_key(&self, tenant: &TenantId, workload: &WorkloadName) -> Vec<u8> {
        self.space.pack(&("placement", tenant.as_str(), workload.as_str()))
    }

    async fn poll_once(&self) {
        let deadline = Duration::from_millis(self.config.limits.summary_ms.max(100));
        for link in &self.cells {
            let answer = match link.peer.connection(Duration::ZERO).await {
                Ok(c) => c.request(0, &Message::SummaryRequest, deadline).await.ok(),
                Err(_) => None,
            };
            let mut view = write(&link.view);
            match answer {
                Some(Message::Summary(summary)) => {
                    view.0.healthy = true;
                    view.0.free_cpu_milli =
                        summary.cpu_milli[0].saturating_sub(summary.cpu_milli[1]);
                    view.0.free_memory_mib =
                        summary.memory_mib[0].saturating_sub(summary.memory_mib[1]);
                    view.1 = Some(*summary);
                }
                _ => view.0.healthy = false,
            }
        }
    }

    fn views(&self) -> Vec<CellView> {
        let draining = read(&self.draining);
        self.cells
            .iter()
            .map(|l| CellView {
                draining: draining.contains(&l.entry.id),
                ..read(&l.view).0.clone()
            })
            .collect()
    }

    fn link(&self, cell: &CellId) -> Option<&CellLink> {
        self.cells.iter().find(|l| &l.entry.id == cell)
    }

    /// Sends `message` to `cell`, failing fast when the cell is not connected.
    async fn ask(&self, cell: &CellId, message: &Message) -> Result<Message, ErrorReply> {
        let unavailable = || refuse(ErrorCode::Unavailable, format!("cell {cell} unavailable"));
        let link = self.link(cell).ok_or_else(unavailable)?;
        let connection = link.peer.connection(Duration::ZERO).await.map_err(|_| unavailable())?;
        let deadline = Duration::from_millis(self.config.limits.call_deadline_ms);
        match connection.request(0, message, deadline).await {
            Ok(Message::Error(refusal)) => Err(refusal),
            Ok(answer) => Ok(answer),
            Err(cellplane_transport::TransportError::Remote(refusal)) => Err(refusal),
            Err(_) => Err(unavailable()),
        }
    }

    fn admit(&self, tenant: &TenantId) -> Result<(), ErrorReply> {
        let now = self.start.elapsed().as_millis() as u64;
        let limits = self.config.limits;
        let mut buckets = lock(&self.buckets);
        let bucket = buckets
            .entry(tenant.clone())
            .or_insert_with(|| TokenBucket::new(limits.rate_per_s, limits.burst, now));
        if bucket.take(now) {
            Ok(())
        } else {
            Err(refuse(
                ErrorCode::RateLimited,
                format!("tenant {tenant} is over {} calls/s; retry later", limits.rate_per_s),
            ))
        }
    }

    /// Answers one request from `peer`, counting it by outcome.
    pub async fn call(&self, peer: &Identity, message: Message) -> Result<Message, ErrorReply> {
        let answer = self.answer(peer, message).await;
        let outcome = match &answer {
            Ok(_) => "ok",
            Err(e) => match e.code {
                ErrorCode::Invalid | ErrorCode::StaleEpoch => "invalid",
                ErrorCode::NotFound => "not_found",
                ErrorCode::QuotaExceeded => "quota_exceeded",
                ErrorCode::RateLimited => "rate_limited",
                ErrorCode::Unauthorized => "unauthorized",
                ErrorCode::Unavailable | ErrorCode::Closed => "unavailable",
            },
        };
        metrics::counter!("cellplane_routed_calls_total", "outcome" => outcome).increment(1);
        answer
    }

    async fn answer(&self, peer: &Identity, message: Message) -> Result<Message, ErrorReply> {
        message.validate().map_err(|e| refuse(ErrorCode::Invalid, e.to_string()))?;
        match message {
            Message::PutTenant(tenant) => {
                operator_only(peer)?;
                self.put_tenant(*tenant).await
            }
            Message::DeleteTenant(request) => {
                operator_only(peer)?;
                self.delete_tenant(&request.tenant, request.cascade).await
            }
            Message::RegionSummaryRequest => {
                operator_only(peer)?;
                let cells = self
                    .cells
                    .iter()
                    .filter_map(|l| {
                        let view = read(&l.view);
                        view.1.clone().map(|s| (s, view.0.healthy))
                    })
                    .collect();
                Ok(Message::RegionSummary(Box::new(RegionSummary { cells })))
            }
            Message::Apply(apply) => {
                self.authorize(peer, &apply.tenant).await?;
                self.apply(*apply).await
            }
            Message::TenantsRequest => {
                operator_only(peer)?;
                let mut tenants: Vec<Tenant> =
                    read(&self.directory).values().map(|e| e.tenant.clone()).collect();
                tenants.sort_by(|a, b| a.id.cmp(&b.id));
                Ok(Message::Tenants(tenants))
            }
            Message::Drain(request) => {
                operator_only(peer)?;
                self.drain(*request).await
            }
            Message::Explain(apply) => {
                self.authorize(peer, &apply.tenant).await?;
                let (choice, _) = self.choose(&apply)?;
                Ok(Message::Explanation(Box::new(choice)))
            }
            Message::Scale(scale) => {
                self.authorize(peer, &scale.tenant).await?;
                let (cell, mut placed) = self.locate(&scale.tenant, &scale.workload).await?;
                let per_replica = |n: u64| n / placed.reserved.replicas.max(1);
                let replicas = u64::from(scale.replicas);
                let next = Reserved {
                    replicas,
                    cpu_milli: per_replica(placed.reserved.cpu_milli) * replicas,
                    memory_mib: per_replica(placed.reserved.memory_mib) * replicas,
                };
                self.check_quota(&scale.tenant, &scale.workload, next)?;
                let answer = self.ask(&cell, &Message::Scale(scale.clone())).await?;
                placed.reserved = next;
                self.record(&scale.tenant, &scale.workload, Some(placed)).await?;
                Ok(answer)
            }
            Message::Delete(target) => {
                self.authorize(peer, &target.tenant).await?;
                let (cell, _) = self.locate(&target.tenant, &target.workload).await?;
                let answer = self.ask(&cell, &Message::Delete(target.clone())).await?;
                self.record(&target.tenant, &target.workload, None).await?;
                Ok(answer)
            }
            Message::Get(target) => {
                self.authorize(peer, &target.tenant).await?;
                let (cell, _) = self.locate(&target.tenant, &target.workload).await?;
                self.ask(&cell, &Message::Get(target)).await
            }
            Message::VmAction(request) => {
                self.authorize(peer, &request.tenant).await?;
                let (cell, _) = self.locate(&request.tenant, &request.workload).await?;
                self.ask(&cell, &Message::VmAction(request)).await
            }
            Message::List(request) => {
                self.authorize(peer, &request.tenant).await?;
                self.list(*request).await
            }
            other => {
                Err(refuse(ErrorCode::Invalid, format!("the router does not answer {other:?}")))
            }
        }
    }

    /// Opens a tenant's watch: the merged streams of every cell holding its workloads.
    pub async fn open(
        &self,
        peer: &Identity,
        message: Message,
    ) -> Result<mpsc::Receiver<Message>, ErrorReply> {
        let Message::Watch(tenant) = message else {
            return Err(refuse(ErrorCode::Invalid, "the router streams only watches"));
        };
        self.authorize(peer, &tenant).await?;
        let cells = self.cells_of(&tenant)?;
        let (sender, receiver) = mpsc::channel(4_096);
        for cell in cells {
            let Some(link) = self.link(&cell) else { continue };
            let unavailable = || refuse(ErrorCode::Unavailable, format!("cell {cell} unavailable"));
            let connection =
                link.peer.connection(Duration::ZERO).await.map_err(|_| unavailable())?;
            let mut watch = connection
                .watch(0, &Message::Watch(tenant.clone()))
                .await
                .map_err(|_| unavailable())?;
            let sender = sender.clone();
            tokio::spawn(async move {
                while let Some(Ok(item)) = watch.next().await {
                    if sender.send(item).await.is_err() {
                        return;
                    }
                }
            });
        }
        Ok(receiver)
    }

    async fn authorize(&self, peer: &Identity, tenant: &TenantId) -> Result<(), ErrorReply> {
        match peer {
            Identity::Client { role: Role::Operator, .. } => {}
            Identity::Client { tenant: own, role: Role::Tenant } if own == tenant => {}
            Identity::Client { tenant: own, .. } => {
                return Err(refuse(
                    ErrorCode::Unauthorized,
                    format!("credentials of tenant {own} act only for tenant {own}"),
                ));
            }
            _ => return Err(refuse(ErrorCode::Unauthorized, format!("{peer} is not a client"))),
        }
        let known = read(&self.directory).contains_key(tenant);
        // Another replica may have made it: the cache is refreshed on a miss.
        if !known && !self.refresh(tenant).await? {
            return Err(refuse(ErrorCode::NotFound, format!("unknown tenant {tenant}")));
        }
        self.admit(tenant)
    }

    /// Where a workload is: the cache, or — on a miss — storage (another replica may have
    /// placed it).
    async fn locate(
        &self,
        tenant: &TenantId,
        workload: &WorkloadName,
    ) -> Result<(CellId, Placed), ErrorReply> {
        match self.placed(tenant, workload) {
            Err(miss) if miss.code == ErrorCode::NotFound => {
                self.refresh(tenant).await?;
                self.placed(tenant, workload)
            }
            found => found,
        }
    }

    /// Reads one tenant's directory entries back from storage into the cache; `false` when
    /// the tenant does not exist.
    async fn refresh(&self, tenant: &TenantId) -> Result<bool, ErrorReply> {
        let tenant_key = self.tenant_key(tenant);
        let placements = self.space.subspace(&("placement", tenant.as_str()));
        let (record, rows) = self
            .db
            .run(|tx| {
                let (key, range) = (tenant_key.clone(), keyspace::range_of(&placements));
                async move { Ok((tx.get(&key).await?, tx.get_range(&range).await?.rows)) }
            })
            .await
            .map_err(storage)?;
        let Some(record) = record else {
            write(&self.directory).remove(tenant);
            return Ok(false);
        };
        let corrupt = |e: String| refuse(ErrorCode::Unavailable, format!("corrupt directory: {e}"));
        let tenant_record: Tenant =
            serde_json::from_slice(&record).map_err(|e| corrupt(e.to_string()))?;
        let mut placed = BTreeMap::new();
        for (key, value) in rows {
            let (workload,): (String,) =
                placements.unpack(&key).map_err(|e| corrupt(e.to_string()))?;
            let workload = WorkloadName::new(&workload).map_err(|e| corrupt(e.to_string()))?;
            let entry: Placed =
                serde_json::from_slice(&value).map_err(|e| corrupt(e.to_string()))?;
            placed.insert(workload, entry);
        }
        write(&self.directory)
            .insert(tenant.clone(), TenantEntry { tenant: tenant_record, placed });
        Ok(true)
    }

    /// The cell that holds a workload, from the cache: what every routed call costs.
    pub fn route(&self, tenant: &TenantId, workload: &WorkloadName) -> Result<CellId, ErrorReply> {
        self.placed(tenant, workload).map(|(cell, _)| cell)
    }

    fn placed(
        &self,
        tenant: &TenantId,
        workload: &WorkloadName,
    ) -> Result<(CellId, Placed), ErrorReply> {
        let directory = read(&self.directory);
        let placed = directory.get(tenant).and_then(|t| t.placed.get(workload));
        placed.map(|p| (p.cell.clone(), p.clone())).ok_or_else(|| {
            refuse(ErrorCode::NotFound, format!("tenant {tenant} has no workload {workload}"))
        })
    }

    fn cells_of(&self, tenant: &TenantId) -> Result<Vec<CellId>, ErrorReply> {
        let directory = read(&self.directory);
        let entry = directory
            .get(tenant)
            .ok_or_else(|| refuse(ErrorCode::NotFound, format!("unknown tenant {tenant}")))?;
        let mut cells: Vec<CellId> = entry.tenant.home_cell.iter().cloned().collect();
        for placed in entry.placed.values() {
            if !cells.contains(&placed.cell) {
                cells.push(placed.cell.clone());
            }
        }
        Ok(cells)
    }

    fn check_quota(
        &self,
        tenant: &TenantId,
        workload: &WorkloadName,
        next: Reserved,
    ) -> Result<(), ErrorReply> {
        let directory = read(&self.directory);
        let Some(entry) = directory.get(tenant) else {
            return Err(refuse(ErrorCode::NotFound, format!("unknown tenant {tenant}")));
        };
        let others = entry.placed.iter().filter(|(name, _)| *name != workload);
        let usage =
            others.map(|(_, p)| Usage::from(p.reserved)).fold(Usage::from(next), Usage::plus);
        let over = entry.tenant.quota.exceeded_by(usage);
        match over {
            Some((what, want, max)) => Err(refuse(
                ErrorCode::QuotaExceeded,
                format!("tenant {tenant} would use {want} {what}; its quota is {max}"),
            )),
            None => Ok(()),
        }
    }

    /// Where `apply` would go: its current cell if placed, else the placement core's choice.
    fn choose(&self, apply: &Apply) -> Result<(Explanation, Option<CellId>), ErrorReply> {
        let directory = read(&self.directory);
        let entry = directory.get(&apply.tenant).ok_or_else(|| {
            refuse(ErrorCode::NotFound, format!("unknown tenant {}", apply.tenant))
        })?;
        if let Some(placed) = entry.placed.get(&apply.spec.name) {
            let chosen = Some(placed.cell.clone());
            let explanation =
                Explanation { chosen: chosen.clone(), overflow: false, rejected: vec![] };
            return Ok((explanation, chosen));
        }
        drop(directory);
        self.choose_new(apply).map(|explanation| (explanation, None))
    }

    /// Where `apply` would go if it were new (a drain's target: never a draining cell).
    fn choose_new(&self, apply: &Apply) -> Result<Explanation, ErrorReply> {
        let home =
            read(&self.directory).get(&apply.tenant).and_then(|e| e.tenant.home_cell.clone());
        let r = reserved(&apply.spec);
        let demand = Demand { cpu_milli: r.cpu_milli, memory_mib: r.memory_mib };
        let views = self.views();
        match placement::choose_cell(
            &self.sites,
            &views,
            home.as_ref(),
            &apply.spec.placement,
            demand,
        ) {
            Ok(choice) => {
                let rejected =
                    choice.rejected.into_iter().map(|r| (r.cell, r.site, r.reason)).collect();
                let chosen = Some(choice.cell);
                Ok(Explanation { chosen, overflow: choice.overflow, rejected })
            }
            Err(none) => Err(refuse(ErrorCode::Unavailable, none.to_string())),
        }
    }

    async fn apply(&self, apply: Apply) -> Result<Message, ErrorReply> {
        if self.placed(&apply.tenant, &apply.spec.name).is_err() {
            self.refresh(&apply.tenant).await?; // another replica may have placed it
        }
        let next = reserved(&apply.spec);
        self.check_quota(&apply.tenant, &apply.spec.name, next)?;
        let (explanation, existing) = self.choose(&apply)?;
        let cell = explanation.chosen.clone().expect("a choice names a cell");
        if existing.is_none() {
            if explanation.overflow {
                // The tenant exists in its overflow cell before its first workload does.
                let tenant = read(&self.directory)[&apply.tenant].tenant.clone();
                self.ask(&cell, &Message::PutTenant(Box::new(tenant))).await?;
            }
            let placed = Placed { cell: cell.clone(), reserved: next };
            let placed = self.record_new(&apply.tenant, &apply.spec.name, placed).await?;
            if placed.cell != cell {
                // Another replica placed it first: its choice stands.
                return self.ask(&placed.cell, &Message::Apply(Box::new(apply))).await;
            }
        } else if let Ok((_, mut placed)) = self.placed(&apply.tenant, &apply.spec.name) {
            placed.reserved = next;
            self.record(&apply.tenant, &apply.spec.name, Some(placed)).await?;
        }
        self.ask(&cell, &Message::Apply(Box::new(apply))).await
    }

    /// Records a new placement unless one exists (another replica's, placed first): the one
    /// stored wins, in one serializable transaction, and is returned.
    async fn record_new(
        &self,
        tenant: &TenantId,
        workload: &WorkloadName,
        placed: Placed,
    ) -> Result<Placed, ErrorReply> {
        let _one = self.changes.lock().await;
        let key = self.placement_key(tenant, workload);
        let value = serde_json::to_vec(&placed).expect("a record serializes");
        let stored = self
            .db
            .run(|tx| {
                let (key, value) = (key.clone(), value.clone());
                async move {
                    match tx.get(&key).await? {
                        Some(existing) => Ok(existing),
                        None => tx.set(&key, &value).map(|()| value),
                    }
                }
            })
            .await
            .map_err(storage)?;
        let placed: Placed = serde_json::from_slice(&stored)
            .map_err(|e| refuse(ErrorCode::Unavailable, format!("corrupt directory: {e}")))?;
        if let Some(entry) = write(&self.directory).get_mut(tenant) {
            entry.placed.insert(workload.clone(), placed.clone());
        }
        Ok(placed)
    }

    /// Writes (or clears) a placement, then updates the cache.
    async fn record(
        &self,
        tenant: &TenantId,
        workload: &WorkloadName,
        placed: Option<Placed>,
    ) -> Result<(), ErrorReply> {
        let _one = self.changes.lock().await;
        let key = self.placement_key(tenant, workload);
        let value = placed.as_ref().map(|p| serde_json::to_vec(p).expect("a record serializes"));
        self.db
            .run(|tx| {
                let (key, value) = (key.clone(), value.clone());
                async move {
                    match value {
                        Some(value) => tx.set(&key, &value),
                        None => tx.clear(&key),
                    }
                }
            })
            .await
            .map_err(storage)?;
        let mut directory = write(&self.directory);
        if let Some(entry) = directory.get_mut(tenant) {
            match placed {
                Some(placed) => entry.placed.insert(workload.clone(), placed),
                None => entry.placed.remove(workload),
            };
        }
        Ok(())
    }

    async fn put_tenant(&self, mut tenant: Tenant) -> Result<Message, ErrorReply> {
        let _one = self.changes.lock().await;
        let existing = read(&self.directory).get(&tenant.id).map(|e| e.tenant.clone());
        // A tenant keeps its home; an operator may name one for a new tenant; else the cell
        // with the most room.
        let named = tenant.home_cell.take();
        if let Some(cell) = &named
            && self.link(cell).is_none()
        {
            return Err(refuse(ErrorCode::Invalid, format!("no cell {cell} in this region")));
        }
        tenant.home_cell = match existing.as_ref().and_then(|t| t.home_cell.clone()).or(named) {
            Some(home) => Some(home),
            None => {
                let views = self.views();
                let choice = placement::choose_home(&self.sites, &views, &Default::default())
                    .map_err(|e| refuse(ErrorCode::Unavailable, e.to_string()))?;
                Some(choice.cell)
            }
        };
        let home = tenant.home_cell.clone().expect("just chosen");
        // The home cell first: a tenant recorded here exists there.
        self.ask(&home, &Message::PutTenant(Box::new(tenant.clone()))).await?;
        let key = self.tenant_key(&tenant.id);
        let value = serde_json::to_vec(&tenant).expect("a record serializes");
        self.db
            .run(|tx| {
                let (key, value) = (key.clone(), value.clone());
                async move { tx.set(&key, &value) }
            })
            .await
            .map_err(storage)?;
        write(&self.directory)
            .entry(tenant.id.clone())
            .and_modify(|e| e.tenant = tenant.clone())
            .or_insert_with(|| TenantEntry { tenant: tenant.clone(), placed: BTreeMap::new() });
        let Some(ca) = &self.ca else { return Ok(Message::Done(0)) };
        let identity = Identity::Client { tenant: tenant.id.clone(), role: Role::Tenant };
        let credentials = ca
            .issue(&identity)
            .map_err(|e| refuse(ErrorCode::Unavailable, format!("issuing credentials: {e}")))?;
        Ok(Message::TenantCreated(Box::new(TenantCreated {
            tenant,
            certificate_der: credentials.certificate.to_vec(),
            key_der: credentials.key.secret_pkcs8_der().to_vec(),
        })))
    }

    async fn delete_tenant(&self, tenant: &TenantId, cascade: bool) -> Result<Message, ErrorReply> {
        let (placed, cells) = {
            let directory = read(&self.directory);
            let entry = directory
                .get(tenant)
                .ok_or_else(|| refuse(ErrorCode::NotFound, format!("unknown tenant {tenant}")))?;
            let placed: Vec<WorkloadName> = entry.placed.keys().cloned().collect();
            (placed, self.cells_of(tenant)?)
        };
        if !placed.is_empty() && !cascade {
            return Err(refuse(
                ErrorCode::Invalid,
                format!(
                    "tenant {tenant} still has {} workloads; delete them first or cascade",
                    placed.len()
                ),
            ));
        }
        for workload in placed {
            let (cell, _) = self.placed(tenant, &workload)?;
            let target = workload_target(tenant, &workload);
            self.ask_absent(&cell, &Message::Delete(target)).await?;
            self.record(tenant, &workload, None).await?;
        }
        let request = DeleteTenant { tenant: tenant.clone(), cascade: false };
        for cell in cells {
            self.ask_absent(&cell, &Message::DeleteTenant(Box::new(request.clone()))).await?;
        }
        let _one = self.changes.lock().await;
        let key = self.tenant_key(tenant);
        self.db
            .run(|tx| {
                let key = key.clone();
                async move { tx.clear(&key) }
            })
            .await
            .map_err(storage)?;
        write(&self.directory).remove(tenant);
        Ok(Message::Done(0))
    }

    async fn list(&self, request: ListRequest) -> Result<Message, ErrorReply> {
        let mut items = Vec::new();
        let mut more = false;
        for cell in self.cells_of(&request.tenant)? {
            match self.ask(&cell, &Message::List(Box::new(request.clone()))).await? {
                Message::Workloads(page) => {
                    items.extend(page.items);
                    more |= page.more;
                }
                other => {
                    return Err(refuse(ErrorCode::Unavailable, format!("cell {cell}: {other:?}")));
                }
            }
        }
        items.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        let limit = request.limit.max(1) as usize;
        more |= items.len() > limit;
        items.truncate(limit);
        Ok(Message::Workloads(Box::new(WorkloadList { items, more })))
    }

    /// Moves up to `moves_max` workloads off a cell; the cell takes nothing new from now on.
    ///
    /// Each move is recorded (`("region", r, "moving", t, w)` → spec, from, to) before anything
    /// changes, so a drain interrupted anywhere — the router killed, the operator not calling
    /// again — is finished by the next call. Replicated workloads move make-before-break: the
    /// copy runs in the target before the source's stops. Stateful ones move break-before-make,
    /// so that no ordinal ever runs in two cells.
    async fn drain(&self, request: DrainRequest) -> Result<Message, ErrorReply> {
        let from = request.cell;
        if self.link(&from).is_none() {
            return Err(refuse(ErrorCode::NotFound, format!("no cell {from} in this region")));
        }
        let key = self.space.pack(&("draining", from.as_str()));
        self.db
            .run(|tx| {
                let key = key.clone();
                async move { tx.set(&key, b"1") }
            })
            .await
            .map_err(storage)?;
        write(&self.draining).insert(from.clone());
        // Moves an interrupted drain left half done come first: their workloads may already
        // be listed at the target while the source still runs them.
        let mut work = self.pending_moves(&from).await?;
        for found in self.on_cell(&from) {
            if !work.contains(&found) {
                work.push(found);
            }
        }
        let mut moved = 0;
        let mut failed = Vec::new();
        let moves = work.into_iter().take(request.moves_max as usize).map(|(tenant, workload)| {
            let from = &from;
            async move {
                let outcome = self.move_workload(&tenant, &workload, from).await;
                (tenant, workload, outcome)
            }
        });
        let mut moves = futures_util::stream::iter(moves).buffer_unordered(MOVES_AT_ONCE);
        while let Some((tenant, workload, outcome)) = moves.next().await {
            match outcome {
                Ok(()) => moved += 1,
                Err(e) => failed.push((tenant, workload, e.detail)),
            }
        }
        let remaining = self.on_cell(&from).len() as u32;
        Ok(Message::DrainProgress(Box::new(DrainProgress { moved, remaining, failed })))
    }

    async fn pending_moves(
        &self,
        from: &CellId,
    ) -> Result<Vec<(TenantId, WorkloadName)>, ErrorReply> {
        let space = self.space.subspace(&("moving",));
        let rows = self
            .db
            .run(|tx| {
                let range = keyspace::range_of(&space);
                async move { tx.get_range(&range).await }
            })
            .await
            .map_err(storage)?
            .rows;
        let mut pending = Vec::new();
        for (key, value) in rows {
            let Ok(moving) = serde_json::from_slice::<Moving>(&value) else { continue };
            let Ok((tenant, workload)) = space.unpack::<(String, String)>(&key) else { continue };
            if &moving.from == from
                && let (Ok(t), Ok(w)) = (TenantId::new(&tenant), WorkloadName::new(&workload))
            {
                pending.push((t, w));
            }
        }
        Ok(pending)
    }

    fn on_cell(&self, cell: &CellId) -> Vec<(TenantId, WorkloadName)> {
        let directory = read(&self.directory);
        let mut found = Vec::new();
        for (tenant, entry) in directory.iter() {
            for (workload, placed) in &entry.placed {
                if &placed.cell == cell {
                    found.push((tenant.clone(), workload.clone()));
                }
            }
        }
        found.sort();
        found
    }

    async fn move_workload(
        &self,
        tenant: &TenantId,
        workload: &WorkloadName,
        from: &CellId,
    ) -> Result<(), ErrorReply> {
        let moving_key = self.space.pack(&("moving", tenant.as_str(), workload.as_str()));
        let pending: Option<Moving> = self
            .db
            .run(|tx| {
                let key = moving_key.clone();
                async move { tx.get(&key).await }
            })
            .await
            .map_err(storage)?
            .and_then(|v| serde_json::from_slice(&v).ok());
        let target = workload_target(tenant, workload);
        let moving = match pending {
            Some(moving) => moving, // an interrupted move: finish it as it was decided
            None => {
                let spec = match self.ask(from, &Message::Get(target.clone())).await? {
                    Message::Workload(status) => status.spec,
                    other => return Err(refuse(ErrorCode::Unavailable, format!("{other:?}"))),
                };
                let probe = Apply { tenant: tenant.clone(), idempotency_key: [0; 16], spec };
                let choice = self.choose_new(&probe)?;
                let to = choice.chosen.expect("a choice names a cell");
                let moving = Moving { spec: probe.spec, from: from.clone(), to };
                let value = serde_json::to_vec(&moving).expect("a record serializes");
                self.db
                    .run(|tx| {
                        let (key, value) = (moving_key.clone(), value.clone());
                        async move { tx.set(&key, &value) }
                    })
                    .await
                    .map_err(storage)?;
                moving
            }
        };
        let to = moving.to.clone();
        let tenant_record = read(&self.directory)[tenant].tenant.clone();
        self.ask(&to, &Message::PutTenant(Box::new(tenant_record))).await?;
        let apply = Message::Apply(Box::new(Apply {
            tenant: tenant.clone(),
            idempotency_key: move_key(tenant, workload, &to),
            spec: moving.spec.clone(),
        }));
        let stateful = moving.spec.controller == cellplane_api::Controller::Stateful;
        if stateful {
            self.ask_absent(from, &Message::Delete(target.clone())).await?;
        }
        self.ask(&to, &apply).await?;
        self.until_running(&to, &target, moving.spec.replicas).await?;
        let placed = Placed { cell: to.clone(), reserved: reserved(&moving.spec) };
        self.record(tenant, workload, Some(placed)).await?;
        if !stateful {
            self.ask_absent(from, &Message::Delete(target)).await?;
        }
        self.db
            .run(|tx| {
                let key = moving_key.clone();
                async move { tx.clear(&key) }
            })
            .await
            .map_err(storage)?;
        Ok(())
    }

    /// Asks `cell` to do `message`; "not found" counts as done (a retried delete).
    async fn ask_absent(&self, cell: &CellId, message: &Message) -> Result<(), ErrorReply> {
        match self.ask(cell, message).await {
            Ok(_) => Ok(()),
            Err(e) if e.code == ErrorCode::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Waits until every replica of a workload runs in `cell`.
    async fn until_running(
        &self,
        cell: &CellId,
        target: &WorkloadRef,
        replicas: u32,
    ) -> Result<(), ErrorReply> {
        let deadline =
            Instant::now() + Duration::from_millis(self.config.limits.call_deadline_ms * 6);
        let mut wait_ms = 5;
        loop {
            if let Message::Workload(status) =
                self.ask(cell, &Message::Get(Box::new(target.clone()))).await?
            {
                let running = status
                    .replicas
                    .iter()
                    .filter(|r| r.host.is_some() && r.phase == cellplane_api::ReplicaPhase::Running)
                    .count();
                if running == replicas as usize {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(refuse(
                    ErrorCode::Unavailable,
                    format!(
                        "{} did not run in cell {cell} in time; it stays where it was",
                        target.workload
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(wait_ms)).await;
            wait_ms = (wait_ms * 2).min(50);
        }
    }

    /// Serves what arrives from the transport until the channel closes. At most
    /// [`CALLS_MAX`] calls are in the router at once; more are refused as `Unavailable`.
    pub async fn serve(self: Arc<Self>, mut inbound: mpsc::Receiver<cellplane_transport::Inbound>) {
        use cellplane_transport::Reply;
        let admission = Arc::new(tokio::sync::Semaphore::new(CALLS_MAX));
        while let Some(cellplane_transport::Inbound { peer, message, reply, .. }) =
            inbound.recv().await
        {
            let Ok(permit) = admission.clone().try_acquire_owned() else {
                let busy = refuse(ErrorCode::Unavailable, "the router is at its call limit");
                match reply {
                    Reply::Respond(responder) => {
                        tokio::spawn(responder.respond(Err(busy)));
                    }
                    Reply::Stream(sink) => {
                        tokio::spawn(sink.fail(busy));
                    }
                    Reply::None => {}
                }
                continue;
            };
            let router = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match reply {
                    Reply::None => {}
                    Reply::Respond(responder) => {
                        let _ = responder.respond(router.call(&peer, message).await).await;
                    }
                    Reply::Stream(sink) => match router.open(&peer, message).await {
                        Err(refusal) => {
                            let _ = sink.fail(refusal).await;
                        }
                        Ok(mut items) => {
                            while let Some(item) = items.recv().await {
                                if sink.send(&item).await.is_err() {
                                    return;
                                }
                            }
                        }
                    },
                }
            });
        }
    }
}

/// A move in progress, recorded before it starts.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Moving {
    spec: cellplane_api::WorkloadSpec,
    from: CellId,
    to: CellId,
}

fn workload_target(tenant: &TenantId, workload: &WorkloadName) -> Box<WorkloadRef> {
    Box::new(WorkloadRef { tenant: tenant.clone(), workload: workload.clone() })
}

/// The idempotency key of a move: the same move retried is the same apply.
fn move_key(tenant: &TenantId, workload: &WorkloadName, to: &CellId) -> [u8; 16] {
    let mut key = [0u8; 16];
    // FNV-1a over the three names, twice with different seeds: stable across processes.
    for (half, seed) in [(0usize, 0xcbf2_9ce4_8422_2325u64), (8, 0x8422_2325_cbf2_9ce4)] {
        let mut hash = seed;
        for byte in ["move", tenant.as_str(), workload.as_str(), to.as_str()].join("/").bytes() {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
        key[half..half + 8].copy_from_slice(&hash.to_le_bytes());
    }
    key
}

fn operator_only(peer: &Identity) -> Result<(), ErrorReply> {
    match peer {
        Identity::Client { role: Role::Operator, .. } => Ok(()),
        _ => Err(refuse(ErrorCode::Unauthorized, format!("{peer} is not an operator"))),
    }
}

async fn poll_summaries(router: std::sync::Weak<Router>) {
    loop {
        let Some(r) = router.upgrade() else { return };
        let every = Duration::from_millis(r.config.limits.summary_ms.max(50));
        r.poll_once().await;
        drop(r);
        tokio::time::sleep(every).await;
    }
}
