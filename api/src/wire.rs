//! The wire format: a versioned, size-capped envelope around an rkyv archive of a [`Message`].
//!
//! ```text
//! offset 0  magic     2 bytes  b"cp"
//!        2  version   u16 LE   WIRE_VERSION
//!        4  body_len  u32 LE   at most FRAME_LEN_MAX - HEADER_LEN
//!        8  body      body_len bytes: rkyv 0.8 archive of Message
//! ```
//!
//! Invariants, in the order [`decode`] checks them:
//! 1. the size cap is checked from the header alone, before any allocation ([`peek_body_len`]);
//! 2. a frame from an unknown or newer version is refused with [`WireError::UnsupportedVersion`]
//!    before its body is looked at;
//! 3. the body is accessed only through rkyv's validated path (bytecheck), copied first into an
//!    aligned buffer when the caller's bytes are not aligned;
//! 4. the decoded message then passes the model's rules ([`Validate`]), so a handler never sees a
//!    name or a resource amount that a constructor would have refused.
//!
//! Wire types hold no `Rc`, `Arc` or other shared pointers: every message is a tree of owned data.
//! Large variants are boxed so that an archived `Message` (as large as its largest inline variant)
//! stays small for the frequent ones: a heartbeat frame is a few dozen bytes, not hundreds.

use rkyv::rancor;
use rkyv::util::AlignedVec;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, check_len};
use crate::model::{
    Host, HostId, HostState, Replica, ReplicaPhase, Tenant, Validate, VmAction, WorkloadSpec,
};
use crate::name::{CellId, SiteId, TenantId, WorkloadName};

/// The version this build writes and the only one it reads.
pub const WIRE_VERSION: u16 = 1;
/// Bytes of header before the body.
pub const HEADER_LEN: usize = 8;
/// The largest frame, header included: 4 MiB.
pub const FRAME_LEN_MAX: usize = 4 << 20;
/// Most hosts one `Subscribe` or `Heartbeats` message names.
pub const HOSTS_PER_MESSAGE_MAX: usize = 4_096;
/// Longest free-text detail carried in a message.
pub const DETAIL_LEN_MAX: usize = 4_096;

const MAGIC: [u8; 2] = *b"cp";
/// Alignment of the buffer the body is accessed in; at least the largest archived alignment.
const BODY_ALIGN: usize = 16;

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Fewer bytes than a header, or fewer than the header promised.
    #[error("truncated frame: {len} bytes, need {need}")]
    Truncated {
        /// Bytes present.
        len: usize,
        /// Bytes needed.
        need: usize,
    },
    /// More bytes than the frame cap.
    #[error("frame of {len} bytes exceeds the cap of {max}")]
    TooLarge {
        /// Bytes announced or present.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// The first two bytes are not cellplane's magic.
    #[error("not a cellplane frame (bad magic {found:02x?})")]
    BadMagic {
        /// The bytes found.
        found: [u8; 2],
    },
    /// A version this build does not speak.
    #[error("unsupported wire version {found}; this build speaks version {supported}")]
    UnsupportedVersion {
        /// The version in the frame.
        found: u16,
        /// The version this build speaks.
        supported: u16,
    },
    /// More bytes than the header announced.
    #[error("frame has {extra} bytes after its body")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// The body is not a valid archive of a message.
    #[error("malformed body: {0}")]
    Malformed(String),
    /// The body decoded but breaks a rule of the model.
    #[error("invalid message: {0}")]
    Invalid(#[from] ModelError),
    /// The message is too large to encode within the frame cap.
    #[error("message of {len} bytes exceeds the frame cap of {max}")]
    EncodeTooLarge {
        /// Encoded length.
        len: usize,
        /// The cap.
        max: usize,
    },
}

/// Derives for every wire type.
macro_rules! wire {
    ($($item:item)*) => {$(
        #[derive(
            Debug, Clone, PartialEq, Eq, Serialize, Deserialize,
            rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
        )]
        $item
    )*};
}

wire! {
    /// Every message cellplane components exchange.
    pub enum Message {
        /// A typed refusal.
        Error(ErrorReply),
        /// A host announces itself to its cell.
        Register(Box<Register>),
        /// A host's periodic proof of life.
        Heartbeat(Heartbeat),
        /// The cell hands a replica to a host.
        Assign(Box<Assignment>),
        /// A host reports a replica's phase.
        Status(Box<StatusReport>),
        /// A tenant creates or changes a workload.
        Apply(Box<Apply>),
        /// A tenant acts on a VM.
        VmAction(Box<VmActionRequest>),
        /// A change was committed durably; the storage version it committed at.
        Done(u64),
        /// The router (or an operator) creates or updates a tenant in a cell.
        PutTenant(Box<Tenant>),
        /// Read one workload.
        Get(Box<WorkloadRef>),
        /// Remove a workload and stop its replicas.
        Delete(Box<WorkloadRef>),
        /// Change a workload's replica count.
        Scale(Box<Scale>),
        /// List a tenant's workloads, a page at a time.
        List(Box<ListRequest>),
        /// A page of workloads.
        Workloads(Box<WorkloadList>),
        /// One workload and its replicas.
        Workload(Box<WorkloadStatus>),
        /// Stream changes to a tenant's workloads (items: `Workload` and `Deleted`).
        Watch(TenantId),
        /// A workload was removed (a watch item).
        Deleted(Box<WorkloadRef>),
        /// Ask for a cell's capacity and health.
        SummaryRequest,
        /// A cell's capacity and health.
        Summary(Box<CellSummary>),
        /// Hosts open one assignment stream (a simulated fleet multiplexes many hosts over
        /// one): every current assignment of each, then `Synced`, then changes as they happen.
        /// At most [`HOSTS_PER_MESSAGE_MAX`] hosts.
        Subscribe(Vec<HostId>),
        /// Many hosts' heartbeats in one message (a fleet's). At most
        /// [`HOSTS_PER_MESSAGE_MAX`].
        Heartbeats(Vec<Heartbeat>),
        /// The host holds every assignment the cell has for it (sent after the initial set).
        Synced(u64),
        /// Stop a replica and forget its slot.
        Unassign(Box<Unassign>),
        /// A VM power action for a replica on the host.
        Power(Box<PowerCommand>),
        /// The router made a tenant: its record (home cell chosen) and its client credentials.
        TenantCreated(Box<TenantCreated>),
        /// Remove a tenant (operator): only when it has no workloads, unless `cascade`.
        DeleteTenant(Box<DeleteTenant>),
        /// Ask the router where a workload would go, and why.
        Explain(Box<Apply>),
        /// Where a workload would go, and why every other cell would not.
        Explanation(Box<Explanation>),
        /// Ask the router for every cell's summary (operator).
        RegionSummaryRequest,
        /// Every cell's last summary, and whether it answered.
        RegionSummary(Box<RegionSummary>),
        /// Move workloads off a cell (operator); at most `moves_max` per call, so a drain is
        /// interrupted by not calling again and resumed by calling again.
        Drain(Box<DrainRequest>),
        /// How far a drain has come.
        DrainProgress(Box<DrainProgress>),
        /// Ask the router for every tenant (operator).
        TenantsRequest,
        /// Every tenant of the region.
        Tenants(Vec<Tenant>),
    }

    /// Move workloads off a cell.
    pub struct DrainRequest {
        /// The cell to empty.
        pub cell: CellId,
        /// Most workloads moved by this call.
        pub moves_max: u32,
    }

    /// How far a drain has come.
    pub struct DrainProgress {
        /// Workloads moved by this call.
        pub moved: u32,
        /// Workloads still on the cell.
        pub remaining: u32,
        /// Workloads that could not move, and why (they stay where they run).
        pub failed: Vec<(TenantId, WorkloadName, String)>,
    }

    /// Remove a tenant.
    pub struct DeleteTenant {
        /// The tenant.
        pub tenant: TenantId,
        /// Delete its workloads first (else a tenant with workloads is refused).
        pub cascade: bool,
    }

    /// A tenant, made.
    pub struct TenantCreated {
        /// Its record, home cell included.
        pub tenant: Tenant,
        /// Its client certificate (DER), naming the tenant in the tenant role.
        pub certificate_der: Vec<u8>,
        /// The certificate's private key (PKCS#8 DER): keep it secret.
        pub key_der: Vec<u8>,
    }

    /// A placement decision, explained.
    pub struct Explanation {
        /// The chosen cell, if any can take it.
        pub chosen: Option<CellId>,
        /// Whether the chosen cell is not the tenant's home.
        pub overflow: bool,
        /// Every other cell: (cell, site, why not).
        pub rejected: Vec<(CellId, SiteId, String)>,
    }

    /// The region's cells.
    pub struct RegionSummary {
        /// Each cell's last summary and whether its last poll answered.
        pub cells: Vec<(CellSummary, bool)>,
    }

    /// Names one workload of one tenant.
    pub struct WorkloadRef {
        /// The tenant.
        pub tenant: TenantId,
        /// The workload.
        pub workload: WorkloadName,
    }

    /// Change a workload's replica count.
    pub struct Scale {
        /// The tenant.
        pub tenant: TenantId,
        /// The workload.
        pub workload: WorkloadName,
        /// The new count.
        pub replicas: u32,
    }

    /// A page request.
    pub struct ListRequest {
        /// The tenant.
        pub tenant: TenantId,
        /// Start after this name (the last one of the previous page).
        pub after: Option<WorkloadName>,
        /// Most items in the page (the cell caps it).
        pub limit: u32,
    }

    /// A page of workloads.
    pub struct WorkloadList {
        /// The workloads, by name.
        pub items: Vec<WorkloadStatus>,
        /// Whether more follow after the last one.
        pub more: bool,
    }

    /// A workload's desired state and its replicas.
    pub struct WorkloadStatus {
        /// The tenant.
        pub tenant: TenantId,
        /// What was applied.
        pub spec: WorkloadSpec,
        /// Its replica slots.
        pub replicas: Vec<Replica>,
    }

    /// A cell's capacity and health, as the router sees it.
    pub struct CellSummary {
        /// The cell.
        pub cell: CellId,
        /// Its current epoch.
        pub epoch: u64,
        /// Hosts by state: joining, ready, suspect, down, draining.
        pub hosts: [u32; 5],
        /// CPU of ready hosts, in thousandths of a core: capacity, then reserved.
        pub cpu_milli: [u64; 2],
        /// Memory of ready hosts, in MiB: capacity, then reserved.
        pub memory_mib: [u64; 2],
        /// Workloads held.
        pub workloads: u32,
        /// Replica slots held.
        pub replicas: u64,
        /// Replica slots waiting for a host.
        pub pending: u64,
    }

    /// Stop a replica slot on a host.
    pub struct Unassign {
        /// The host.
        pub host: HostId,
        /// The tenant.
        pub tenant: TenantId,
        /// The workload.
        pub workload: WorkloadName,
        /// The slot.
        pub ordinal: u32,
        /// The cell epoch of the command.
        pub epoch: u64,
    }

    /// A VM power action, addressed to a host.
    pub struct PowerCommand {
        /// The host.
        pub host: HostId,
        /// The tenant.
        pub tenant: TenantId,
        /// The workload.
        pub workload: WorkloadName,
        /// The slot.
        pub ordinal: u32,
        /// The cell epoch of the command.
        pub epoch: u64,
        /// What to do.
        pub action: VmAction,
    }

    /// What kind of refusal.
    #[derive(Copy)]
    pub enum ErrorCode {
        /// The request broke a rule; retrying the same request will fail again.
        Invalid,
        /// The object does not exist (or is not the caller's).
        NotFound,
        /// The caller's quota is used up.
        QuotaExceeded,
        /// The caller sends too fast.
        RateLimited,
        /// The caller may not do this.
        Unauthorized,
        /// The service cannot answer now; retry later.
        Unavailable,
        /// An assignment from an older cell epoch.
        StaleEpoch,
        /// A stream ended normally (the last frame of a watch).
        Closed,
    }

    /// A typed refusal with a human-readable detail.
    pub struct ErrorReply {
        /// The kind.
        pub code: ErrorCode,
        /// Words for a person.
        pub detail: String,
    }

    /// A host announces itself.
    pub struct Register {
        /// The host record as the host sees itself.
        pub host: Host,
    }

    /// A host's periodic proof of life.
    pub struct Heartbeat {
        /// Which host.
        pub host: HostId,
        /// Increases by one per heartbeat; lets the cell drop duplicates and reordered ones.
        pub seq: u64,
        /// The newest cell epoch the host has seen.
        pub epoch: u64,
        /// The host's own view of its state.
        pub state: HostState,
    }

    /// A replica placed on a host.
    pub struct Assignment {
        /// The tenant that owns the workload.
        pub tenant: TenantId,
        /// The replica slot, its host and epoch.
        pub replica: Replica,
        /// What to run.
        pub spec: WorkloadSpec,
    }

    /// A replica's phase, as the host sees it.
    pub struct StatusReport {
        /// The reporting host.
        pub host: HostId,
        /// The tenant that owns the workload.
        pub tenant: TenantId,
        /// The workload.
        pub workload: WorkloadName,
        /// The replica's ordinal.
        pub ordinal: u32,
        /// The epoch of the assignment this reports on.
        pub epoch: u64,
        /// The phase.
        pub phase: ReplicaPhase,
        /// Words for a person (exit status, error).
        pub detail: String,
    }

    /// Create or change a workload.
    pub struct Apply {
        /// The tenant, as authenticated (never taken from the caller's word alone).
        pub tenant: TenantId,
        /// Makes a retried apply a no-op: the caller picks it, unique per intended change.
        pub idempotency_key: [u8; 16],
        /// The desired state.
        pub spec: WorkloadSpec,
    }

    /// Act on a VM.
    pub struct VmActionRequest {
        /// The tenant.
        pub tenant: TenantId,
        /// The VM workload.
        pub workload: WorkloadName,
        /// Which replica.
        pub ordinal: u32,
        /// What to do.
        pub action: VmAction,
    }
}

impl Validate for Message {
    fn validate(&self) -> Result<(), ModelError> {
        match self {
            Message::Error(e) => check_len("error.detail", e.detail.len(), DETAIL_LEN_MAX),
            Message::Register(r) => r.host.validate(),
            Message::Heartbeat(_) => Ok(()),
            Message::Assign(a) => {
                a.tenant.0.check("assign.tenant")?;
                a.replica.validate()?;
                a.spec.validate()
            }
            Message::Status(s) => {
                s.tenant.0.check("status.tenant")?;
                s.workload.0.check("status.workload")?;
                check_len("status.detail", s.detail.len(), DETAIL_LEN_MAX)
            }
            Message::Apply(a) => {
                a.tenant.0.check("apply.tenant")?;
                a.spec.validate()
            }
            Message::VmAction(v) => {
                v.tenant.0.check("vm_action.tenant")?;
                v.workload.0.check("vm_action.workload")
            }
            Message::PutTenant(t) => t.validate(),
            Message::Get(r) | Message::Delete(r) | Message::Deleted(r) => r.validate(),
            Message::Scale(s) => {
                s.tenant.0.check("scale.tenant")?;
                s.workload.0.check("scale.workload")
            }
            Message::List(l) => {
                l.tenant.0.check("list.tenant")?;
                l.after.as_ref().map_or(Ok(()), |a| a.0.check("list.after"))
            }
            Message::Workloads(list) => list.items.iter().try_for_each(Validate::validate),
            Message::Workload(w) => w.validate(),
            Message::Watch(t) => t.0.check("watch.tenant"),
            Message::Summary(s) => s.cell.0.check("summary.cell"),
            Message::Unassign(u) => {
                u.tenant.0.check("unassign.tenant")?;
                u.workload.0.check("unassign.workload")
            }
            Message::Power(p) => {
                p.tenant.0.check("power.tenant")?;
                p.workload.0.check("power.workload")
            }
            Message::Subscribe(hosts) => {
                check_len("subscribe.hosts", hosts.len(), HOSTS_PER_MESSAGE_MAX)
            }
            Message::Heartbeats(beats) => {
                check_len("heartbeats", beats.len(), HOSTS_PER_MESSAGE_MAX)
            }
            Message::TenantCreated(t) => t.tenant.validate(),
            Message::DeleteTenant(d) => d.tenant.0.check("delete_tenant.tenant"),
            Message::Explain(a) => {
                a.tenant.0.check("explain.tenant")?;
                a.spec.validate()
            }
            Message::Explanation(e) => e.rejected.iter().try_for_each(|(_, _, why)| {
                check_len("explanation.reason", why.len(), DETAIL_LEN_MAX)
            }),
            Message::RegionSummary(r) => {
                r.cells.iter().try_for_each(|(s, _)| s.cell.0.check("summary.cell"))
            }
            Message::Drain(d) => d.cell.0.check("drain.cell"),
            Message::DrainProgress(p) => p.failed.iter().try_for_each(|(t, w, why)| {
                t.0.check("drain.tenant")?;
                w.0.check("drain.workload")?;
                check_len("drain.reason", why.len(), DETAIL_LEN_MAX)
            }),
            Message::Tenants(tenants) => tenants.iter().try_for_each(Validate::validate),
            Message::Done(_)
            | Message::SummaryRequest
            | Message::TenantsRequest
            | Message::RegionSummaryRequest
            | Message::Synced(_) => Ok(()),
        }
    }
}

impl Validate for WorkloadRef {
    fn validate(&self) -> Result<(), ModelError> {
        self.tenant.0.check("workload.tenant")?;
        self.workload.0.check("workload.workload")
    }
}

impl Validate for WorkloadStatus {
    fn validate(&self) -> Result<(), ModelError> {
        self.tenant.0.check("workload.tenant")?;
        self.spec.validate()?;
        self.replicas.iter().try_for_each(Validate::validate)
    }
}

/// Encodes `message` into one frame, header included.
pub fn encode(message: &Message) -> Result<Vec<u8>, WireError> {
    let body = rkyv::to_bytes::<rancor::Error>(message)
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    let len = HEADER_LEN + body.len();
    if len > FRAME_LEN_MAX {
        return Err(WireError::EncodeTooLarge { len, max: FRAME_LEN_MAX });
    }
    let mut frame = Vec::with_capacity(len);
    frame.extend_from_slice(&MAGIC);
    frame.extend_from_slice(&WIRE_VERSION.to_le_bytes());
    // Cannot truncate: len <= FRAME_LEN_MAX < u32::MAX.
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Encodes `message` as one frame behind `prefix` (a transport's own header), in one aligned
/// buffer with no copy of the body: `prefix`, then the envelope header, then the body. The body
/// must start 16-byte aligned, so `prefix.len() + HEADER_LEN` must be a multiple of 16.
pub fn encode_with_prefix(
    message: &Message,
    prefix: &[u8],
) -> Result<AlignedVec<BODY_ALIGN>, WireError> {
    let start = prefix.len() + HEADER_LEN;
    assert!(start.is_multiple_of(BODY_ALIGN), "wire: a prefix must keep the body aligned");
    let mut buffer = AlignedVec::<BODY_ALIGN>::with_capacity(start + 256);
    buffer.extend_from_slice(prefix);
    buffer.extend_from_slice(&[0; HEADER_LEN]);
    let mut buffer = rkyv::api::high::to_bytes_in::<_, rancor::Error>(message, buffer)
        .map_err(|e| WireError::Malformed(e.to_string()))?;
    let body_len = buffer.len() - start;
    if HEADER_LEN + body_len > FRAME_LEN_MAX {
        return Err(WireError::EncodeTooLarge { len: HEADER_LEN + body_len, max: FRAME_LEN_MAX });
    }
    let header = &mut buffer[prefix.len()..start];
    header[..2].copy_from_slice(&MAGIC);
    header[2..4].copy_from_slice(&WIRE_VERSION.to_le_bytes());
    // Cannot truncate: body_len < FRAME_LEN_MAX < u32::MAX.
    header[4..].copy_from_slice(&(body_len as u32).to_le_bytes());
    Ok(buffer)
}

/// Reads a header and returns the body length it announces, checking magic, version and the
/// size cap. A framer calls this before allocating anything for the body.
pub fn peek_body_len(header: &[u8; HEADER_LEN]) -> Result<usize, WireError> {
    let found = [header[0], header[1]];
    if found != MAGIC {
        return Err(WireError::BadMagic { found });
    }
    let version = u16::from_le_bytes([header[2], header[3]]);
    if version != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion { found: version, supported: WIRE_VERSION });
    }
    let body_len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    let len = HEADER_LEN.saturating_add(body_len);
    if len > FRAME_LEN_MAX {
        return Err(WireError::TooLarge { len, max: FRAME_LEN_MAX });
    }
    Ok(body_len)
}

/// Decodes one whole frame: checked access, then the model's rules.
pub fn decode(frame: &[u8]) -> Result<Message, WireError> {
    if frame.len() > FRAME_LEN_MAX {
        return Err(WireError::TooLarge { len: frame.len(), max: FRAME_LEN_MAX });
    }
    let Some((header, body)) = frame.split_first_chunk::<HEADER_LEN>() else {
        return Err(WireError::Truncated { len: frame.len(), need: HEADER_LEN });
    };
    let body_len = peek_body_len(header)?;
    if body.len() < body_len {
        return Err(WireError::Truncated { len: frame.len(), need: HEADER_LEN + body_len });
    }
    if body.len() > body_len {
        return Err(WireError::TrailingBytes { extra: body.len() - body_len });
    }
    decode_body(body)
}

/// Decodes a body whose header was already checked with [`peek_body_len`].
pub fn decode_body(body: &[u8]) -> Result<Message, WireError> {
    let message = if (body.as_ptr() as usize).is_multiple_of(BODY_ALIGN) {
        rkyv::from_bytes::<Message, rancor::Error>(body)
    } else {
        let mut aligned = AlignedVec::<BODY_ALIGN>::with_capacity(body.len());
        aligned.extend_from_slice(body);
        rkyv::from_bytes::<Message, rancor::Error>(&aligned)
    }
    .map_err(|e| WireError::Malformed(e.to_string()))?;
    message.validate()?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tests::{vm, web};
    use crate::model::{Capabilities, HostId, Resources};
    use crate::name::{CellId, Name, SiteId};
    use proptest::prelude::*;

    fn assign() -> Message {
        Message::Assign(Box::new(Assignment {
            tenant: TenantId::new("acme").unwrap(),
            replica: Replica {
                workload: WorkloadName::new("web").unwrap(),
                ordinal: 2,
                host: Some(HostId(41)),
                epoch: 7,
                phase: ReplicaPhase::Assigned,
            },
            spec: web(),
        }))
    }

    fn samples() -> Vec<Message> {
        vec![
            assign(),
            Message::Apply(Box::new(Apply {
                tenant: TenantId::new("acme").unwrap(),
                idempotency_key: [9; 16],
                spec: vm(),
            })),
            Message::Register(Box::new(Register {
                host: Host {
                    id: HostId(1),
                    cell: CellId::new("c1").unwrap(),
                    site: SiteId::new("fra").unwrap(),
                    zone: Name::new("z1").unwrap(),
                    capacity: Resources {
                        cpu_milli: 8_000,
                        memory_mib: 32_768,
                        disk_gib: 100,
                        gpus: 1,
                    },
                    capabilities: Capabilities { container: true, vm: false },
                    labels: Default::default(),
                    state: HostState::Joining,
                },
            })),
            Message::Heartbeat(Heartbeat {
                host: HostId(1),
                seq: 9,
                epoch: 3,
                state: HostState::Ready,
            }),
            Message::Error(ErrorReply {
                code: ErrorCode::StaleEpoch,
                detail: "epoch 2 < 3".into(),
            }),
        ]
    }

    #[test]
    fn round_trips_every_sample() {
        for message in samples() {
            let frame = encode(&message).unwrap();
            assert_eq!(decode(&frame), Ok(message));
        }
    }

    #[test]
    fn a_prefixed_frame_holds_the_same_envelope() {
        let frame = encode_with_prefix(&assign(), &[7; 24]).unwrap();
        assert_eq!(&frame[..24], &[7; 24]);
        assert_eq!(&frame[24..], encode(&assign()).unwrap().as_slice());
        assert_eq!(decode(&frame[24..]), Ok(assign()));
    }

    #[test]
    fn misaligned_input_is_copied_not_refused() {
        let frame = encode(&assign()).unwrap();
        let mut shifted = vec![0u8; frame.len() + 1];
        shifted[1..].copy_from_slice(&frame);
        assert_eq!(decode(&shifted[1..]), Ok(assign()));
    }

    #[test]
    fn empty_and_truncated_frames() {
        assert_eq!(decode(&[]), Err(WireError::Truncated { len: 0, need: HEADER_LEN }));
        let frame = encode(&assign()).unwrap();
        for cut in [1, HEADER_LEN - 1, HEADER_LEN, frame.len() - 1] {
            assert!(
                matches!(decode(&frame[..cut]), Err(WireError::Truncated { .. })),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut frame = encode(&assign()).unwrap();
        frame.push(0);
        assert_eq!(decode(&frame), Err(WireError::TrailingBytes { extra: 1 }));
    }

    #[test]
    fn newer_version_and_bad_magic_are_typed() {
        let mut frame = encode(&assign()).unwrap();
        frame[2..4].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(decode(&frame), Err(WireError::UnsupportedVersion { found: 2, supported: 1 }));
        frame[0] = b'X';
        assert!(matches!(decode(&frame), Err(WireError::BadMagic { .. })));
    }

    #[test]
    fn oversized_is_refused_from_the_header_alone() {
        let mut header = [0u8; HEADER_LEN];
        header[..2].copy_from_slice(&MAGIC);
        header[2..4].copy_from_slice(&WIRE_VERSION.to_le_bytes());
        header[4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(peek_body_len(&header), Err(WireError::TooLarge { .. })));
        assert!(matches!(decode(&vec![0u8; FRAME_LEN_MAX + 1]), Err(WireError::TooLarge { .. })));
        let huge = Message::Error(ErrorReply {
            code: ErrorCode::Invalid,
            detail: "x".repeat(FRAME_LEN_MAX),
        });
        assert!(matches!(encode(&huge), Err(WireError::EncodeTooLarge { .. })));
    }

    #[test]
    fn every_single_byte_corruption_is_an_error_or_a_valid_message() {
        let frame = encode(&assign()).unwrap();
        for at in HEADER_LEN..frame.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = frame.clone();
                bad[at] ^= flip;
                // Must not panic; if it decodes, it passed every check and every model rule.
                if let Ok(message) = decode(&bad) {
                    assert!(message.validate().is_ok());
                }
            }
        }
    }

    #[test]
    fn structurally_valid_but_semantically_invalid_is_refused() {
        let mut message = assign();
        let Message::Assign(a) = &mut message else { unreachable!() };
        a.spec.resources.cpu_milli = 0;
        let frame = encode(&message).unwrap();
        match decode(&frame) {
            Err(WireError::Invalid(e)) => assert_eq!(e.field(), "workload.resources.cpu_milli"),
            other => panic!("expected Invalid, got {other:?}"),
        }
        // A name that breaks the DNS rules cannot be built, but bytes can carry one.
        let good = encode(&assign()).unwrap();
        let at = good.windows(4).position(|w| w == b"acme").unwrap();
        let mut bad = good.clone();
        bad[at] = b'A';
        assert!(matches!(decode(&bad), Err(WireError::Invalid(ModelError::InvalidName { .. }))));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2_048)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn random_bodies_behind_a_valid_header_never_panic(body in proptest::collection::vec(any::<u8>(), 0..2_048)) {
            let mut frame = Vec::from(MAGIC);
            frame.extend_from_slice(&WIRE_VERSION.to_le_bytes());
            frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
            frame.extend_from_slice(&body);
            if let Ok(message) = decode(&frame) {
                prop_assert!(message.validate().is_ok());
            }
        }

        #[test]
        fn heartbeats_and_statuses_round_trip(
            host in any::<u64>(), seq in any::<u64>(), epoch in any::<u64>(),
            ordinal in 0u32..100_000, detail in "[ -~]{0,200}", tenant in "[a-z][a-z0-9-]{0,20}[a-z0-9]",
        ) {
            let messages = [
                Message::Heartbeat(Heartbeat { host: HostId(host), seq, epoch, state: HostState::Suspect }),
                Message::Status(Box::new(StatusReport {
                    host: HostId(3),
                    tenant: TenantId::new(&tenant).unwrap(),
                    workload: WorkloadName::new("w").unwrap(),
                    ordinal, epoch, phase: ReplicaPhase::Running, detail,
                })),
            ];
            for message in messages {
                prop_assert_eq!(decode(&encode(&message).unwrap()), Ok(message));
            }
        }

        #[test]
        fn workload_specs_round_trip(replicas in 0u32..=1_000, cpu in 1u32..=256_000, mem in 1u32..=1_000_000, key in any::<[u8; 16]>()) {
            let mut spec = web();
            spec.replicas = replicas;
            spec.resources.cpu_milli = cpu;
            spec.resources.memory_mib = mem;
            let message = Message::Apply(Box::new(Apply { tenant: TenantId::new("t").unwrap(), idempotency_key: key, spec }));
            prop_assert_eq!(decode(&encode(&message).unwrap()), Ok(message));
        }
    }
}
