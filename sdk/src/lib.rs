//! The cellplane SDK for service teams: a typed async client for workloads — containers and VMs,
//! replicated or stateful — through the region router.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cellplane_sdk::Error> {
//! use cellplane_sdk::{Client, Workload};
//!
//! // Credentials as `cellplane pki issue --kind client` (or the router) wrote them.
//! let router = "127.0.0.1:7000".parse().unwrap();
//! let client = Client::connect(router, "r1", "pki".as_ref(), "acme").await?;
//! let web = Workload::container("web", "registry/web:1").replicas(3).cpu_milli(500).build()?;
//! client.apply(web).await?;
//! let status = client.get("web").await?;
//! println!("{} replicas", status.replicas.len());
//! # Ok(()) }
//! ```
//!
//! Every call is for the tenant the credentials name; the router refuses anything else. An
//! apply carries an idempotency key chosen once per call, so when the answer is lost and the
//! SDK retries (`Unavailable`, at most [`RETRIES_MAX`] times with backoff) nothing is applied
//! twice.
#![deny(missing_docs)]

pub mod manifest;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub use cellplane_api as model;
use cellplane_api::wire::{
    Apply, ErrorCode, ErrorReply, ListRequest, Message, Scale, VmActionRequest, WorkloadRef,
    WorkloadStatus,
};
use cellplane_api::{
    ContainerSpec, Controller, LatencyTarget, Name, Placement, PowerState, Resources, SiteKind,
    Spread, TenantId, Validate, VmAction, VmSpec, WorkloadKind, WorkloadName, WorkloadSpec,
};
use cellplane_transport::identity::load_ca_certificate;
use cellplane_transport::{Connection, Credentials, Identity, Setup, TransportError};

/// Most retries of a call the region answered `Unavailable`.
pub const RETRIES_MAX: u32 = 5;
const DEADLINE: Duration = Duration::from_secs(10);

/// What went wrong, typed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The spec or request breaks a rule; the message names the field.
    #[error("invalid: {0}")]
    Invalid(String),
    /// No such workload (or tenant) — for this tenant.
    #[error("not found: {0}")]
    NotFound(String),
    /// The tenant's quota is used up.
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// Too many calls; retry later.
    #[error("rate limited: {0}")]
    RateLimited(String),
    /// The credentials do not allow it.
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// The region (or the cell holding the object) cannot answer now.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The credentials are missing, unreadable or not a client's.
    #[error("bad credentials: {0}")]
    Credentials(String),
    /// The connection could not be set up (the router is unreachable or refused us).
    #[error("cannot connect: {0}")]
    Connect(String),
}

impl From<ErrorReply> for Error {
    fn from(reply: ErrorReply) -> Self {
        let detail = reply.detail;
        match reply.code {
            ErrorCode::Invalid | ErrorCode::StaleEpoch => Error::Invalid(detail),
            ErrorCode::NotFound => Error::NotFound(detail),
            ErrorCode::QuotaExceeded => Error::QuotaExceeded(detail),
            ErrorCode::RateLimited => Error::RateLimited(detail),
            ErrorCode::Unauthorized => Error::Unauthorized(detail),
            ErrorCode::Unavailable | ErrorCode::Closed => Error::Unavailable(detail),
        }
    }
}

impl From<TransportError> for Error {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::Remote(reply) => reply.into(),
            other => Error::Unavailable(other.to_string()),
        }
    }
}

/// A tenant's client.
pub struct Client {
    connection: Connection,
    tenant: TenantId,
}

impl Client {
    /// Connects to the router named `router_name` (its certificate must say so) at `router`,
    /// with the credentials `<stem>.crt`/`<stem>.key` and the region's `ca.crt` in `pki`.
    pub async fn connect(
        router: SocketAddr,
        router_name: &str,
        pki: &Path,
        stem: &str,
    ) -> Result<Self, Error> {
        let name = Name::new(router_name).map_err(|e| Error::Invalid(format!("router: {e}")))?;
        let bad = |e: &dyn std::fmt::Display| Error::Credentials(e.to_string());
        let credentials = Credentials::load(pki, stem).map_err(|e| bad(&e))?;
        let tenant = match &credentials.identity {
            Identity::Client { tenant, .. } => tenant.clone(),
            other => return Err(bad(&format!("{other} is not a client certificate"))),
        };
        let ca = load_ca_certificate(pki).map_err(|e| bad(&e))?;
        let setup = Setup::new(credentials, ca);
        let connection = cellplane_transport::connect(router, &Identity::Router(name), &setup)
            .await
            .map_err(|e| Error::Connect(e.to_string()))?;
        Ok(Self { connection, tenant })
    }

    /// Acts for another tenant (operators only; the router refuses anyone else).
    pub fn for_tenant(mut self, tenant: TenantId) -> Self {
        self.tenant = tenant;
        self
    }

    /// The tenant this client acts for.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// Creates or changes a workload; returns once it is durable. Retried safely.
    pub async fn apply(&self, spec: WorkloadSpec) -> Result<u64, Error> {
        spec.validate().map_err(|e| Error::Invalid(e.to_string()))?;
        let idempotency_key: [u8; 16] = rand::random();
        let message =
            Message::Apply(Box::new(Apply { tenant: self.tenant.clone(), idempotency_key, spec }));
        match self.call(&message).await? {
            Message::Done(version) => Ok(version),
            other => Err(unexpected(other)),
        }
    }

    /// One workload and its replicas.
    pub async fn get(&self, name: &str) -> Result<WorkloadStatus, Error> {
        match self.call(&Message::Get(self.target(name)?)).await? {
            Message::Workload(status) => Ok(*status),
            other => Err(unexpected(other)),
        }
    }

    /// Every workload of the tenant, by name.
    pub async fn list(&self) -> Result<Vec<WorkloadStatus>, Error> {
        let mut all: Vec<WorkloadStatus> = Vec::new();
        loop {
            let after = all.last().map(|w| w.spec.name.clone());
            let request = ListRequest { tenant: self.tenant.clone(), after, limit: 1_000 };
            match self.call(&Message::List(Box::new(request))).await? {
                Message::Workloads(page) => {
                    let more = page.more;
                    all.extend(page.items);
                    if !more {
                        return Ok(all);
                    }
                }
                other => return Err(unexpected(other)),
            }
        }
    }

    /// Removes a workload and stops its replicas.
    pub async fn delete(&self, name: &str) -> Result<(), Error> {
        self.call(&Message::Delete(self.target(name)?)).await.map(|_| ())
    }

    /// Changes a workload's replica count.
    pub async fn scale(&self, name: &str, replicas: u32) -> Result<(), Error> {
        let workload = workload_name(name)?;
        let scale = Scale { tenant: self.tenant.clone(), workload, replicas };
        self.call(&Message::Scale(Box::new(scale))).await.map(|_| ())
    }

    /// Starts, stops or reboots one replica of a VM workload.
    pub async fn vm_action(&self, name: &str, ordinal: u32, action: VmAction) -> Result<(), Error> {
        let workload = workload_name(name)?;
        let request = VmActionRequest { tenant: self.tenant.clone(), workload, ordinal, action };
        self.call(&Message::VmAction(Box::new(request))).await.map(|_| ())
    }

    /// A stream of the tenant's workload changes.
    pub async fn watch(&self) -> Result<Watch, Error> {
        let inner = self.connection.watch(0, &Message::Watch(self.tenant.clone())).await?;
        Ok(Watch { inner })
    }

    fn target(&self, name: &str) -> Result<Box<WorkloadRef>, Error> {
        Ok(Box::new(WorkloadRef { tenant: self.tenant.clone(), workload: workload_name(name)? }))
    }

    /// One call, retried with backoff while the region answers `Unavailable`.
    async fn call(&self, message: &Message) -> Result<Message, Error> {
        let mut wait_ms = 50;
        for attempt in 0..=RETRIES_MAX {
            match self.connection.request(0, message, DEADLINE).await.map_err(Error::from) {
                Err(Error::Unavailable(_)) if attempt < RETRIES_MAX => {
                    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                    wait_ms = (wait_ms * 2).min(2_000);
                }
                other => return other,
            }
        }
        unreachable!("the last attempt returns")
    }
}

fn workload_name(name: &str) -> Result<WorkloadName, Error> {
    WorkloadName::new(name).map_err(|e| Error::Invalid(e.to_string()))
}

fn unexpected(message: Message) -> Error {
    match message {
        Message::Error(reply) => reply.into(),
        other => Error::Unavailable(format!("unexpected answer {other:?}")),
    }
}

/// A change to one of the tenant's workloads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// It was created or changed, or a replica moved or changed phase.
    Changed(Box<WorkloadStatus>),
    /// It was deleted.
    Deleted(WorkloadName),
}

/// A stream of [`Event`]s.
pub struct Watch {
    inner: cellplane_transport::Watch,
}

impl Watch {
    /// The next event; `None` when the stream ended.
    pub async fn next(&mut self) -> Option<Result<Event, Error>> {
        loop {
            return match self.inner.next().await? {
                Ok(Message::Workload(status)) => Some(Ok(Event::Changed(status))),
                Ok(Message::Deleted(target)) => Some(Ok(Event::Deleted(target.workload))),
                Ok(Message::Error(reply)) => Some(Err(reply.into())),
                Ok(_) => continue,
                Err(e) => Some(Err(e.into())),
            };
        }
    }
}

/// A typed builder of workload specs.
///
/// ```
/// use cellplane_sdk::Workload;
/// use cellplane_sdk::model::{Controller, SiteKind};
///
/// let db = Workload::vm("db", "debian-12")
///     .stateful()
///     .replicas(3)
///     .vcpus(2)
///     .memory_mib(4_096)
///     .site_kind(SiteKind::Edge)
///     .latency_to("users-eu", 10)
///     .build()
///     .unwrap();
/// assert_eq!(db.controller, Controller::Stateful);
/// assert_eq!(db.resources.cpu_milli, 2_000);
///
/// // Bad input is refused with the field's name.
/// let err = Workload::container("web", "img").replicas(200_000).build().unwrap_err();
/// assert!(err.to_string().contains("replicas"));
/// ```
#[derive(Debug, Clone)]
pub struct Workload {
    name: String,
    kind: WorkloadKind,
    controller: Controller,
    replicas: u32,
    resources: Resources,
    placement: Placement,
    bad_name: Option<String>,
}

impl Workload {
    /// A container workload running `image`.
    pub fn container(name: &str, image: &str) -> Self {
        let kind = WorkloadKind::Container(ContainerSpec {
            image: image.into(),
            command: Vec::new(),
            env: Default::default(),
        });
        Self::new(name, kind, Resources { cpu_milli: 100, memory_mib: 128, disk_gib: 0, gpus: 0 })
    }

    /// A VM workload booting `image` (1 vCPU, 512 MiB, 10 GiB, powered on).
    pub fn vm(name: &str, image: &str) -> Self {
        let kind = WorkloadKind::Vm(VmSpec {
            image: image.into(),
            vcpus: 1,
            memory_mib: 512,
            disk_gib: 10,
            cloud_init: None,
            power: PowerState::On,
        });
        Self::new(
            name,
            kind,
            Resources { cpu_milli: 1_000, memory_mib: 512, disk_gib: 10, gpus: 0 },
        )
    }

    fn new(name: &str, kind: WorkloadKind, resources: Resources) -> Self {
        Self {
            name: name.into(),
            kind,
            controller: Controller::Replicated,
            replicas: 1,
            resources,
            placement: Placement::default(),
            bad_name: None,
        }
    }

    /// Stable identities and ordered start (like a StatefulSet).
    pub fn stateful(mut self) -> Self {
        self.controller = Controller::Stateful;
        self
    }

    /// How many replicas.
    pub fn replicas(mut self, n: u32) -> Self {
        self.replicas = n;
        self
    }

    /// CPU per replica, in thousandths of a core.
    pub fn cpu_milli(mut self, n: u32) -> Self {
        self.resources.cpu_milli = n;
        self
    }

    /// Memory per replica, in MiB (a VM's memory too).
    pub fn memory_mib(mut self, n: u32) -> Self {
        self.resources.memory_mib = n;
        if let WorkloadKind::Vm(vm) = &mut self.kind {
            vm.memory_mib = n;
        }
        self
    }

    /// A VM's virtual CPUs (and the CPU it reserves: one core each).
    pub fn vcpus(mut self, n: u16) -> Self {
        if let WorkloadKind::Vm(vm) = &mut self.kind {
            vm.vcpus = n;
        }
        self.resources.cpu_milli = u32::from(n) * 1_000;
        self
    }

    /// A container's command and arguments.
    pub fn command<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        if let WorkloadKind::Container(c) = &mut self.kind {
            c.command = args.into_iter().map(Into::into).collect();
        }
        self
    }

    /// One environment variable of a container.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        if let WorkloadKind::Container(c) = &mut self.kind {
            c.env.insert(key.into(), value.into());
        }
        self
    }

    /// Only sites of this kind.
    pub fn site_kind(mut self, kind: SiteKind) -> Self {
        self.placement.site_kind = Some(kind);
        self
    }

    /// Round-trip latency from traffic source `source` at most `max_ms`.
    pub fn latency_to(mut self, source: &str, max_ms: u32) -> Self {
        match Name::new(source) {
            Ok(source) => self.placement.latency.push(LatencyTarget { source, max_ms }),
            Err(e) => self.bad_name = Some(format!("latency source: {e}")),
        }
        self
    }

    /// How replicas spread over hosts or zones.
    pub fn spread(mut self, spread: Spread) -> Self {
        self.placement.spread = spread;
        self
    }

    /// The spec, checked against the model's rules.
    pub fn build(self) -> Result<WorkloadSpec, Error> {
        if let Some(bad) = self.bad_name {
            return Err(Error::Invalid(bad));
        }
        let spec = WorkloadSpec {
            name: workload_name(&self.name)?,
            kind: self.kind,
            controller: self.controller,
            replicas: self.replicas,
            resources: self.resources,
            placement: self.placement,
            update: Default::default(),
        };
        spec.validate().map_err(|e| Error::Invalid(e.to_string()))?;
        Ok(spec)
    }
}
