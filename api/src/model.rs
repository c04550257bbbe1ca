//! The domain model: sites, cells, hosts, tenants, workloads and replicas.
//!
//! Containers and VMs are the same kind of thing here: a [`WorkloadSpec`] has a [`WorkloadKind`]
//! and everything else (replicas, controller, resources, placement, updates) is shared. Every type
//! that can be wrong implements [`Validate`]; [`Checked`] is the proof that it was.

use std::collections::BTreeMap;
use std::ops::Deref;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, check_len, check_range, echo};
use crate::name::{CellId, Name, SiteId, TenantId, WorkloadName};

/// Most replicas one workload may ask for.
pub const REPLICAS_MAX: u32 = 100_000;
/// Most labels on a host.
pub const LABELS_LEN_MAX: usize = 64;
/// Longest label value or environment value, in bytes.
pub const VALUE_LEN_MAX: usize = 4_096;
/// Longest image reference, in bytes.
pub const IMAGE_LEN_MAX: usize = 512;
/// Most command arguments or environment variables.
pub const ARGS_LEN_MAX: usize = 128;
/// Longest cloud-init document, in bytes.
pub const CLOUD_INIT_LEN_MAX: usize = 64 * 1024;
/// Most entries in a placement list (sites, zones, anti-affinity, latency targets).
pub const PLACEMENT_LEN_MAX: usize = 32;

/// A value that can break the model's rules.
pub trait Validate {
    /// Checks every rule; the error names the first broken one and its field.
    fn validate(&self) -> Result<(), ModelError>;
}

/// A value that has passed [`Validate`]: holding one is the proof.
///
/// Deserializing one (serde) validates; the only other way in is [`Checked::new`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Checked<T>(T);

impl<T: Validate> Checked<T> {
    /// Validates `value`.
    pub fn new(value: T) -> Result<Self, ModelError> {
        value.validate()?;
        Ok(Self(value))
    }

    /// The inner value, giving up the proof.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> Deref for Checked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<'de, T: Validate + Deserialize<'de>> Deserialize<'de> for Checked<T> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::new(T::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

/// A validated workload.
pub type Workload = Checked<WorkloadSpec>;

/// Derives for every model type: serde for manifests and JSON, rkyv for the wire.
macro_rules! model {
    ($($item:item)*) => {$(
        #[derive(
            Debug, Clone, PartialEq, Eq, Serialize, Deserialize,
            rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
        )]
        #[serde(deny_unknown_fields)]
        $item
    )*};
}

/// A host's id, unique in the region. A number, not a name: a cell holds 100,000 of them.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
#[serde(transparent)]
pub struct HostId(pub u64);

model! {
    /// An amount of compute: what a replica asks for, or what a host offers.
    #[derive(Copy, Default)]
    pub struct Resources {
        /// CPU in thousandths of a core.
        pub cpu_milli: u32,
        /// Memory in MiB.
        pub memory_mib: u32,
        /// Local disk in GiB.
        #[serde(default)]
        pub disk_gib: u32,
        /// Whole GPUs.
        #[serde(default)]
        pub gpus: u8,
    }

    /// What kinds of workload a host can run.
    #[derive(Copy, Default)]
    pub struct Capabilities {
        /// An OCI runtime is present and works.
        pub container: bool,
        /// A VM runtime is present and works.
        pub vm: bool,
    }

    /// Where a host is in its life.
    #[derive(Copy)]
    #[serde(rename_all = "snake_case")]
    pub enum HostState {
        /// Registered, not yet confirmed by a heartbeat.
        Joining,
        /// Heartbeating; takes new replicas.
        Ready,
        /// Missed heartbeats; takes nothing new, keeps what it has.
        Suspect,
        /// Lease expired; its replicas are placed elsewhere.
        Down,
        /// Being emptied by an operator; takes nothing new.
        Draining,
    }

    /// One machine in a cell.
    pub struct Host {
        /// Its id.
        pub id: HostId,
        /// The cell that owns it.
        pub cell: CellId,
        /// The site it stands in.
        pub site: SiteId,
        /// Its failure domain within the site.
        pub zone: Name,
        /// What it offers.
        pub capacity: Resources,
        /// What it can run.
        pub capabilities: Capabilities,
        /// Free-form labels, for placement.
        #[serde(default)]
        pub labels: BTreeMap<String, String>,
        /// Its state.
        pub state: HostState,
    }

    /// A cloud data centre or an edge site.
    #[derive(Copy)]
    #[serde(rename_all = "snake_case")]
    pub enum SiteKind {
        /// A large cloud data centre.
        Cloud,
        /// A small site near users.
        Edge,
    }

    /// A place where cells stand.
    pub struct Site {
        /// Its id.
        pub id: SiteId,
        /// Cloud or edge.
        pub kind: SiteKind,
        /// Where it is, in words (a city, a region code).
        pub location: String,
        /// Round-trip latency from named traffic sources to this site, in milliseconds.
        #[serde(default)]
        pub latency_ms: BTreeMap<Name, u32>,
    }

    /// An independent slice of a region.
    pub struct Cell {
        /// Its id.
        pub id: CellId,
        /// Its site.
        pub site: SiteId,
        /// How many hosts it is meant to hold.
        pub host_target: u32,
    }

    /// How much a tenant may use, in total.
    #[derive(Copy)]
    pub struct Quota {
        /// Total CPU in thousandths of a core.
        pub cpu_milli: u64,
        /// Total memory in MiB.
        pub memory_mib: u64,
        /// Total replicas.
        pub replicas: u32,
        /// Total workloads.
        pub workloads: u32,
    }

    /// A tenant: a virtual cluster.
    pub struct Tenant {
        /// Its id.
        pub id: TenantId,
        /// What it may use.
        pub quota: Quota,
        /// The cell that holds its workloads by default, once chosen.
        #[serde(default)]
        pub home_cell: Option<CellId>,
    }

    /// What a workload runs.
    #[serde(rename_all = "snake_case")]
    pub enum WorkloadKind {
        /// An OCI container (or, on the process driver, a plain process).
        Container(ContainerSpec),
        /// A virtual machine.
        Vm(VmSpec),
    }

    /// A container to run.
    pub struct ContainerSpec {
        /// The image reference.
        pub image: String,
        /// The command and its arguments; empty means the image's own.
        #[serde(default)]
        pub command: Vec<String>,
        /// Environment variables.
        #[serde(default)]
        pub env: BTreeMap<String, String>,
    }

    /// A virtual machine to run.
    pub struct VmSpec {
        /// The disk image reference.
        pub image: String,
        /// Virtual CPUs.
        pub vcpus: u16,
        /// Guest memory in MiB.
        pub memory_mib: u32,
        /// Root disk in GiB.
        pub disk_gib: u32,
        /// A cloud-init user-data document.
        #[serde(default)]
        pub cloud_init: Option<String>,
        /// The power state the VM should be in.
        #[serde(default = "PowerState::on")]
        pub power: PowerState,
    }

    /// A VM's desired power state.
    #[derive(Copy)]
    #[serde(rename_all = "snake_case")]
    pub enum PowerState {
        /// Running.
        On,
        /// Stopped; its slot and disk are kept.
        Off,
    }

    /// An action on a VM: flows to the host as desired state.
    #[derive(Copy)]
    #[serde(rename_all = "snake_case")]
    pub enum VmAction {
        /// Power on.
        Start,
        /// Power off.
        Stop,
        /// Reset, keeping the placement.
        Reboot,
    }

    /// How replicas relate to each other.
    #[derive(Copy)]
    #[serde(rename_all = "snake_case")]
    pub enum Controller {
        /// Interchangeable replicas, like a ReplicaSet.
        Replicated,
        /// Stable ordinal identities, started in order, like a StatefulSet.
        Stateful,
    }

    /// How replicas are spread.
    #[derive(Copy, Default)]
    #[serde(rename_all = "snake_case")]
    pub enum Spread {
        /// No preference: pack for utilisation.
        #[default]
        None,
        /// Spread across hosts.
        Host,
        /// Spread across zones.
        Zone,
    }

    /// "Latency from traffic source X at most N ms".
    pub struct LatencyTarget {
        /// The named traffic source.
        pub source: Name,
        /// The most round-trip latency allowed, in milliseconds.
        pub max_ms: u32,
    }

    /// Where a workload's replicas may go.
    #[derive(Default)]
    pub struct Placement {
        /// Allowed sites; empty means any.
        #[serde(default)]
        pub sites: Vec<SiteId>,
        /// Allowed kind of site; none means any.
        #[serde(default)]
        pub site_kind: Option<SiteKind>,
        /// Allowed zones; empty means any.
        #[serde(default)]
        pub zones: Vec<Name>,
        /// How to spread replicas.
        #[serde(default)]
        pub spread: Spread,
        /// Workloads (of the same tenant) whose replicas must not share a host with these.
        #[serde(default)]
        pub anti_affinity: Vec<WorkloadName>,
        /// Latency targets; all must hold.
        #[serde(default)]
        pub latency: Vec<LatencyTarget>,
    }

    /// How a changed spec rolls out.
    #[derive(Copy)]
    pub struct UpdateStrategy {
        /// Most replicas down at once during an update.
        pub max_unavailable: u32,
        /// Most replicas above the desired count during an update.
        pub max_surge: u32,
    }

    /// Everything a tenant says about one workload.
    pub struct WorkloadSpec {
        /// Its name, unique within the tenant.
        pub name: WorkloadName,
        /// Container or VM.
        pub kind: WorkloadKind,
        /// Replicated or stateful.
        pub controller: Controller,
        /// How many replicas.
        pub replicas: u32,
        /// What each replica needs.
        pub resources: Resources,
        /// Where replicas may go.
        #[serde(default)]
        pub placement: Placement,
        /// How updates roll out.
        #[serde(default)]
        pub update: UpdateStrategy,
    }

    /// The phase of one replica.
    #[derive(Copy)]
    #[serde(rename_all = "snake_case")]
    pub enum ReplicaPhase {
        /// Waiting for a host.
        Pending,
        /// Placed on a host, not yet started there.
        Assigned,
        /// The host is starting it.
        Starting,
        /// Running.
        Running,
        /// Failed; the controller will replace it.
        Failed,
        /// Stopped on purpose.
        Stopped,
    }

    /// One replica slot of a workload, and where it runs.
    pub struct Replica {
        /// The workload's name.
        pub workload: WorkloadName,
        /// Its ordinal: stable identity for stateful workloads.
        pub ordinal: u32,
        /// The host it is assigned to, if any.
        pub host: Option<HostId>,
        /// The cell epoch of the assignment (fencing).
        pub epoch: u64,
        /// Its phase.
        pub phase: ReplicaPhase,
    }
}

impl PowerState {
    fn on() -> Self {
        Self::On
    }
}

impl Default for UpdateStrategy {
    fn default() -> Self {
        Self { max_unavailable: 1, max_surge: 1 }
    }
}

/// What a tenant uses, or would use after a change, measured against its [`Quota`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Workloads.
    pub workloads: u64,
    /// Replicas.
    pub replicas: u64,
    /// CPU of every replica, in thousandths of a core.
    pub cpu_milli: u64,
    /// Memory of every replica, in MiB.
    pub memory_mib: u64,
}

impl Usage {
    /// The usage of one workload.
    pub fn of(spec: &WorkloadSpec) -> Self {
        let replicas = u64::from(spec.replicas);
        Self {
            workloads: 1,
            replicas,
            cpu_milli: replicas * u64::from(spec.resources.cpu_milli),
            memory_mib: replicas * u64::from(spec.resources.memory_mib),
        }
    }

    /// The sum of two usages.
    pub fn plus(self, other: Usage) -> Self {
        Self {
            workloads: self.workloads + other.workloads,
            replicas: self.replicas + other.replicas,
            cpu_milli: self.cpu_milli + other.cpu_milli,
            memory_mib: self.memory_mib + other.memory_mib,
        }
    }
}

impl Quota {
    /// The first limit `usage` goes past, as (what, wanted, allowed); `None` when it fits.
    pub fn exceeded_by(&self, usage: Usage) -> Option<(&'static str, u64, u64)> {
        [
            ("workloads", usage.workloads, u64::from(self.workloads)),
            ("replicas", usage.replicas, u64::from(self.replicas)),
            ("cpu_milli", usage.cpu_milli, self.cpu_milli),
            ("memory_mib", usage.memory_mib, self.memory_mib),
        ]
        .into_iter()
        .find(|(_, want, max)| want > max)
    }
}

impl Resources {
    /// Whether `self` fits inside `free`, in every dimension.
    pub fn fits_in(&self, free: &Resources) -> bool {
        self.cpu_milli <= free.cpu_milli
            && self.memory_mib <= free.memory_mib
            && self.disk_gib <= free.disk_gib
            && self.gpus <= free.gpus
    }

    /// Checks a per-replica request against its caps.
    fn validate_request(&self, field: &str) -> Result<(), ModelError> {
        check_range(&format!("{field}.cpu_milli"), self.cpu_milli.into(), 1, 256_000)?;
        check_range(&format!("{field}.memory_mib"), self.memory_mib.into(), 1, 4 << 20)?;
        check_range(&format!("{field}.disk_gib"), self.disk_gib.into(), 0, 65_536)?;
        check_range(&format!("{field}.gpus"), self.gpus.into(), 0, 16)
    }

    /// Checks a host's capacity against its caps.
    fn validate_capacity(&self, field: &str) -> Result<(), ModelError> {
        check_range(&format!("{field}.cpu_milli"), self.cpu_milli.into(), 1, 1_024_000)?;
        check_range(&format!("{field}.memory_mib"), self.memory_mib.into(), 1, 16 << 20)?;
        check_range(&format!("{field}.disk_gib"), self.disk_gib.into(), 0, 1 << 20)?;
        check_range(&format!("{field}.gpus"), self.gpus.into(), 0, 64)
    }
}

/// Checks a free-form string map (labels, environment): key and value lengths, entry count.
fn validate_map(field: &str, map: &BTreeMap<String, String>) -> Result<(), ModelError> {
    check_len(field, map.len(), LABELS_LEN_MAX.max(ARGS_LEN_MAX))?;
    for (key, value) in map {
        let bad_key = key.is_empty()
            || key.len() > 253
            || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        if bad_key {
            return Err(ModelError::Invalid {
                field: field.to_owned(),
                value: echo(key),
                rule: "keys are 1 to 253 ASCII letters, digits, '-', '_', '.' or '/'",
            });
        }
        check_len(&format!("{field}.{key}"), value.len(), VALUE_LEN_MAX)?;
    }
    Ok(())
}

/// Checks an image reference: present, short enough, no whitespace or control characters.
fn validate_image(field: &str, image: &str) -> Result<(), ModelError> {
    check_len(field, image.len(), IMAGE_LEN_MAX)?;
    if image.is_empty() || image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ModelError::Invalid {
            field: field.to_owned(),
            value: echo(image),
            rule: "an image reference is non-empty with no whitespace or control characters",
        });
    }
    Ok(())
}

impl Validate for Host {
    fn validate(&self) -> Result<(), ModelError> {
        self.cell.0.check("host.cell")?;
        self.site.0.check("host.site")?;
        self.zone.check("host.zone")?;
        self.capacity.validate_capacity("host.capacity")?;
        check_len("host.labels", self.labels.len(), LABELS_LEN_MAX)?;
        validate_map("host.labels", &self.labels)
    }
}

impl Validate for Site {
    fn validate(&self) -> Result<(), ModelError> {
        self.id.0.check("site.id")?;
        check_len("site.location", self.location.len(), 256)?;
        check_len("site.latency_ms", self.latency_ms.len(), 1_024)?;
        for (source, ms) in &self.latency_ms {
            source.check("site.latency_ms")?;
            check_range(&format!("site.latency_ms.{source}"), (*ms).into(), 0, 60_000)?;
        }
        Ok(())
    }
}

impl Validate for Cell {
    fn validate(&self) -> Result<(), ModelError> {
        self.id.0.check("cell.id")?;
        self.site.0.check("cell.site")?;
        check_range("cell.host_target", self.host_target.into(), 1, 1_000_000)
    }
}

impl Validate for Tenant {
    fn validate(&self) -> Result<(), ModelError> {
        self.id.0.check("tenant.id")?;
        check_range("tenant.quota.cpu_milli", self.quota.cpu_milli, 1, 1 << 40)?;
        check_range("tenant.quota.memory_mib", self.quota.memory_mib, 1, 1 << 40)?;
        check_range("tenant.quota.replicas", self.quota.replicas.into(), 1, 10_000_000)?;
        check_range("tenant.quota.workloads", self.quota.workloads.into(), 1, 1_000_000)?;
        if let Some(cell) = &self.home_cell {
            cell.0.check("tenant.home_cell")?;
        }
        Ok(())
    }
}

impl Validate for WorkloadSpec {
    fn validate(&self) -> Result<(), ModelError> {
        self.name.0.check("workload.name")?;
        check_range("workload.replicas", self.replicas.into(), 0, REPLICAS_MAX.into())?;
        self.resources.validate_request("workload.resources")?;
        match &self.kind {
            WorkloadKind::Container(c) => {
                validate_image("workload.kind.container.image", &c.image)?;
                check_len("workload.kind.container.command", c.command.len(), ARGS_LEN_MAX)?;
                for (i, arg) in c.command.iter().enumerate() {
                    let field = format!("workload.kind.container.command[{i}]");
                    check_len(&field, arg.len(), VALUE_LEN_MAX)?;
                }
                validate_map("workload.kind.container.env", &c.env)?;
            }
            WorkloadKind::Vm(vm) => {
                validate_image("workload.kind.vm.image", &vm.image)?;
                check_range("workload.kind.vm.vcpus", vm.vcpus.into(), 1, 256)?;
                check_range("workload.kind.vm.memory_mib", vm.memory_mib.into(), 64, 4 << 20)?;
                check_range("workload.kind.vm.disk_gib", vm.disk_gib.into(), 1, 65_536)?;
                if let Some(doc) = &vm.cloud_init {
                    check_len("workload.kind.vm.cloud_init", doc.len(), CLOUD_INIT_LEN_MAX)?;
                }
                // A VM's request must cover the guest it promises, or hosts overcommit.
                let cpu_needed = u64::from(vm.vcpus) * 1_000;
                check_range(
                    "workload.resources.cpu_milli",
                    self.resources.cpu_milli.into(),
                    cpu_needed,
                    256_000,
                )?;
                check_range(
                    "workload.resources.memory_mib",
                    self.resources.memory_mib.into(),
                    vm.memory_mib.into(),
                    4 << 20,
                )?;
            }
        }
        let p = &self.placement;
        check_len("workload.placement.sites", p.sites.len(), PLACEMENT_LEN_MAX)?;
        check_len("workload.placement.zones", p.zones.len(), PLACEMENT_LEN_MAX)?;
        check_len("workload.placement.anti_affinity", p.anti_affinity.len(), PLACEMENT_LEN_MAX)?;
        check_len("workload.placement.latency", p.latency.len(), PLACEMENT_LEN_MAX)?;
        for site in &p.sites {
            site.0.check("workload.placement.sites")?;
        }
        for zone in &p.zones {
            zone.check("workload.placement.zones")?;
        }
        for other in &p.anti_affinity {
            other.0.check("workload.placement.anti_affinity")?;
        }
        for target in &p.latency {
            target.source.check("workload.placement.latency.source")?;
            check_range("workload.placement.latency.max_ms", target.max_ms.into(), 1, 60_000)?;
        }
        let most = u64::from(self.replicas.max(1));
        check_range(
            "workload.update.max_unavailable",
            self.update.max_unavailable.into(),
            0,
            most,
        )?;
        check_range("workload.update.max_surge", self.update.max_surge.into(), 0, most)?;
        if self.update.max_unavailable == 0 && self.update.max_surge == 0 {
            return Err(ModelError::Invalid {
                field: "workload.update".to_owned(),
                value: "max_unavailable = 0, max_surge = 0".to_owned(),
                rule: "an update that may neither remove nor add a replica can never progress",
            });
        }
        Ok(())
    }
}

impl Validate for Replica {
    fn validate(&self) -> Result<(), ModelError> {
        self.workload.0.check("replica.workload")?;
        check_range("replica.ordinal", self.ordinal.into(), 0, (REPLICAS_MAX - 1).into())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A valid container workload, for tests to break one field at a time.
    pub(crate) fn web() -> WorkloadSpec {
        WorkloadSpec {
            name: WorkloadName::new("web").unwrap(),
            kind: WorkloadKind::Container(ContainerSpec {
                image: "nginx:1.27".into(),
                command: vec!["nginx".into(), "-g".into(), "daemon off;".into()],
                env: BTreeMap::from([("MODE".into(), "prod".into())]),
            }),
            controller: Controller::Replicated,
            replicas: 3,
            resources: Resources { cpu_milli: 500, memory_mib: 256, disk_gib: 1, gpus: 0 },
            placement: Placement::default(),
            update: UpdateStrategy::default(),
        }
    }

    /// A valid VM workload.
    pub(crate) fn vm() -> WorkloadSpec {
        WorkloadSpec {
            name: WorkloadName::new("db-vm").unwrap(),
            kind: WorkloadKind::Vm(VmSpec {
                image: "debian-12".into(),
                vcpus: 2,
                memory_mib: 2_048,
                disk_gib: 20,
                cloud_init: Some("#cloud-config\n".into()),
                power: PowerState::On,
            }),
            controller: Controller::Stateful,
            replicas: 1,
            resources: Resources { cpu_milli: 2_000, memory_mib: 2_304, disk_gib: 20, gpus: 0 },
            placement: Placement::default(),
            update: UpdateStrategy::default(),
        }
    }

    fn refused(spec: WorkloadSpec) -> ModelError {
        match Workload::new(spec) {
            Err(err) => err,
            Ok(_) => panic!("spec should be refused"),
        }
    }

    #[test]
    fn valid_specs_pass() {
        assert!(Workload::new(web()).is_ok());
        assert!(Workload::new(vm()).is_ok());
    }

    #[test]
    fn resources_zero_and_over_cap_name_their_field() {
        for (mutate, field, value) in [
            (
                Box::new(|s: &mut WorkloadSpec| s.resources.cpu_milli = 0) as Box<dyn Fn(&mut _)>,
                "workload.resources.cpu_milli",
                0,
            ),
            (
                Box::new(|s: &mut WorkloadSpec| s.resources.cpu_milli = u32::MAX),
                "workload.resources.cpu_milli",
                u64::from(u32::MAX),
            ),
            (
                Box::new(|s: &mut WorkloadSpec| s.resources.memory_mib = 0),
                "workload.resources.memory_mib",
                0,
            ),
            (
                Box::new(|s: &mut WorkloadSpec| s.resources.disk_gib = 1 << 30),
                "workload.resources.disk_gib",
                1 << 30,
            ),
            (
                Box::new(|s: &mut WorkloadSpec| s.resources.gpus = 200),
                "workload.resources.gpus",
                200,
            ),
            (
                Box::new(|s: &mut WorkloadSpec| s.replicas = 1_000_000_000),
                "workload.replicas",
                1_000_000_000,
            ),
        ] {
            let mut spec = web();
            mutate(&mut spec);
            match refused(spec) {
                ModelError::OutOfRange { field: f, value: v, .. } => {
                    assert_eq!((f.as_str(), v), (field, value));
                }
                other => panic!("expected OutOfRange for {field}, got {other}"),
            }
        }
    }

    #[test]
    fn negative_and_overflowing_numbers_are_refused_by_the_parser() {
        let mut json = serde_json::to_value(web()).unwrap();
        json["resources"]["cpu_milli"] = serde_json::json!(-1);
        assert!(serde_json::from_value::<Workload>(json.clone()).is_err());
        json["resources"]["cpu_milli"] = serde_json::json!(1u64 << 40);
        assert!(serde_json::from_value::<Workload>(json.clone()).is_err());
        json["resources"]["cpu_milli"] = serde_json::json!(0);
        let err = serde_json::from_value::<Workload>(json).unwrap_err().to_string();
        assert!(err.contains("workload.resources.cpu_milli"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused_not_dropped() {
        let mut json = serde_json::to_value(web()).unwrap();
        json["resources"]["cpus"] = serde_json::json!(2);
        let err = serde_json::from_value::<Workload>(json).unwrap_err().to_string();
        assert!(err.contains("cpus"), "{err}");
    }

    #[test]
    fn container_rules() {
        let mut spec = web();
        let WorkloadKind::Container(c) = &mut spec.kind else { unreachable!() };
        c.image = String::new();
        assert_eq!(refused(spec).field(), "workload.kind.container.image");

        let mut spec = web();
        let WorkloadKind::Container(c) = &mut spec.kind else { unreachable!() };
        c.image = "bad image".into();
        assert_eq!(refused(spec).field(), "workload.kind.container.image");

        let mut spec = web();
        let WorkloadKind::Container(c) = &mut spec.kind else { unreachable!() };
        c.command = vec!["x".into(); ARGS_LEN_MAX + 1];
        assert_eq!(refused(spec).field(), "workload.kind.container.command");

        let mut spec = web();
        let WorkloadKind::Container(c) = &mut spec.kind else { unreachable!() };
        c.env.insert("BAD KEY".into(), "v".into());
        assert_eq!(refused(spec).field(), "workload.kind.container.env");

        let mut spec = web();
        let WorkloadKind::Container(c) = &mut spec.kind else { unreachable!() };
        c.env.insert("BIG".into(), "v".repeat(VALUE_LEN_MAX + 1));
        assert_eq!(refused(spec).field(), "workload.kind.container.env.BIG");
    }

    #[test]
    fn vm_rules() {
        for (mutate, field) in [
            (
                Box::new(|vm: &mut VmSpec| vm.vcpus = 0) as Box<dyn Fn(&mut VmSpec)>,
                "workload.kind.vm.vcpus",
            ),
            (Box::new(|vm: &mut VmSpec| vm.vcpus = 1_000), "workload.kind.vm.vcpus"),
            (Box::new(|vm: &mut VmSpec| vm.memory_mib = 1), "workload.kind.vm.memory_mib"),
            (Box::new(|vm: &mut VmSpec| vm.disk_gib = 0), "workload.kind.vm.disk_gib"),
            (
                Box::new(|vm: &mut VmSpec| {
                    vm.cloud_init = Some("x".repeat(CLOUD_INIT_LEN_MAX + 1))
                }),
                "workload.kind.vm.cloud_init",
            ),
            // The request no longer covers the guest.
            (Box::new(|vm: &mut VmSpec| vm.vcpus = 4), "workload.resources.cpu_milli"),
            (Box::new(|vm: &mut VmSpec| vm.memory_mib = 4_096), "workload.resources.memory_mib"),
        ] {
            let mut spec = vm();
            let WorkloadKind::Vm(v) = &mut spec.kind else { unreachable!() };
            mutate(v);
            assert_eq!(refused(spec).field(), field);
        }
    }

    #[test]
    fn placement_and_update_rules() {
        let mut spec = web();
        spec.placement.sites = vec![SiteId::new("a").unwrap(); PLACEMENT_LEN_MAX + 1];
        assert_eq!(refused(spec).field(), "workload.placement.sites");

        let mut spec = web();
        spec.placement.latency =
            vec![LatencyTarget { source: Name::new("eu").unwrap(), max_ms: 0 }];
        assert_eq!(refused(spec).field(), "workload.placement.latency.max_ms");

        let mut spec = web();
        spec.update = UpdateStrategy { max_unavailable: 0, max_surge: 0 };
        assert_eq!(refused(spec).field(), "workload.update");

        let mut spec = web();
        spec.update.max_surge = 10;
        assert_eq!(refused(spec).field(), "workload.update.max_surge");
    }

    #[test]
    fn host_tenant_site_cell_rules() {
        let mut host = Host {
            id: HostId(7),
            cell: CellId::new("cell-a").unwrap(),
            site: SiteId::new("fra").unwrap(),
            zone: Name::new("z1").unwrap(),
            capacity: Resources {
                cpu_milli: 64_000,
                memory_mib: 262_144,
                disk_gib: 1_000,
                gpus: 0,
            },
            capabilities: Capabilities { container: true, vm: true },
            labels: BTreeMap::new(),
            state: HostState::Joining,
        };
        assert!(host.validate().is_ok());
        host.capacity.cpu_milli = 0;
        assert_eq!(host.validate().unwrap_err().field(), "host.capacity.cpu_milli");
        host.capacity.cpu_milli = 1;
        host.labels = (0..=LABELS_LEN_MAX).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(host.validate().unwrap_err().field(), "host.labels");

        let mut tenant = Tenant {
            id: TenantId::new("acme").unwrap(),
            quota: Quota { cpu_milli: 1_000, memory_mib: 1_024, replicas: 10, workloads: 2 },
            home_cell: None,
        };
        assert!(tenant.validate().is_ok());
        tenant.quota.replicas = 0;
        assert_eq!(tenant.validate().unwrap_err().field(), "tenant.quota.replicas");

        let site = Site {
            id: SiteId::new("edge-1").unwrap(),
            kind: SiteKind::Edge,
            location: "x".repeat(300),
            latency_ms: BTreeMap::new(),
        };
        assert_eq!(site.validate().unwrap_err().field(), "site.location");

        let cell =
            Cell { id: CellId::new("c").unwrap(), site: SiteId::new("s").unwrap(), host_target: 0 };
        assert_eq!(cell.validate().unwrap_err().field(), "cell.host_target");
    }

    #[test]
    fn resources_fit() {
        let free = Resources { cpu_milli: 1_000, memory_mib: 1_024, disk_gib: 10, gpus: 1 };
        assert!(
            Resources { cpu_milli: 1_000, memory_mib: 1_024, disk_gib: 10, gpus: 1 }.fits_in(&free)
        );
        assert!(!Resources { cpu_milli: 1_001, ..free }.fits_in(&free));
        assert!(!Resources { gpus: 2, ..free }.fits_in(&free));
    }
}
