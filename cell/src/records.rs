//! How a cell's state is laid out in storage, and how it is read back on recovery.
//!
//! ```text
//! ("cell", c, "host", id)                        -> host record (JSON)
//! ("cell", c, "tenant", t, "quota")              -> tenant record (JSON)
//! ("cell", c, "tenant", t, "workload", n)        -> generation u64 LE + spec (JSON)
//! ("cell", c, "tenant", t, "replica", n, i)      -> host u64 LE, epoch u64 LE, generation u64 LE
//! ("cell", c, "tenant", t, "idem", key)          -> the workload (JSON) the apply with this
//!                                                   idempotency key changed
//! ```
//!
//! Only what must survive a restart is stored: hosts' records (not their liveness, which is
//! soft state rebuilt from heartbeats), tenants, specs and assignments (not replica phases,
//! which hosts report again when they reconnect). Records are JSON where they are small and
//! read once per recovery, fixed-width where there are millions of them.
//!
//! Every tenant-owned key is made through [`TenantKeys`] or read through [`TenantScope`], so no
//! code here can name another tenant's key by accident.

use cellplane_api::{CellId, Host, HostId, Tenant, TenantId, Validate, WorkloadName, WorkloadSpec};
use cellplane_storage::keyspace::{self, TenantKeys, TenantScope};
use cellplane_storage::{Database, RangeOptions, StorageError};

/// Rows read per range page during recovery.
const PAGE_LEN: usize = 10_000;

/// A stored assignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// The host.
    pub host: HostId,
    /// The epoch it was made in.
    pub epoch: u64,
    /// The spec generation it runs.
    pub generation: u64,
}

/// One workload read back from storage.
#[derive(Debug)]
pub struct StoredWorkload {
    /// Its spec.
    pub spec: WorkloadSpec,
    /// Its generation.
    pub generation: u64,
    /// Its assigned slots.
    pub slots: Vec<(u32, Stored)>,
}

/// Everything a cell keeps in storage.
#[derive(Debug, Default)]
pub struct CellState {
    /// Host records.
    pub hosts: Vec<Host>,
    /// Tenants and their workloads.
    pub tenants: Vec<(Tenant, Vec<StoredWorkload>)>,
    /// Idempotency records: key, tenant, workload.
    pub idempotency: Vec<([u8; 16], TenantId, WorkloadName)>,
}

/// A stored record that does not decode: storage was written by something else.
fn corrupt(what: &str, detail: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(format!("{what}: {detail}"))
}

/// The key of a tenant's record.
pub fn tenant_key(cell: &CellId, tenant: &TenantId) -> Vec<u8> {
    TenantKeys::new(cell, tenant).key(&("quota",))
}

/// The key of a workload's record.
pub fn workload_key(keys: &TenantKeys, name: &WorkloadName) -> Vec<u8> {
    keys.key(&("workload", name.as_str()))
}

/// The key of a replica slot's assignment.
pub fn replica_key(keys: &TenantKeys, name: &WorkloadName, ordinal: u32) -> Vec<u8> {
    keys.key(&("replica", name.as_str(), ordinal))
}

/// The key of an idempotency record: per tenant, so keys of different tenants never meet.
pub fn idempotency_key(keys: &TenantKeys, key: &[u8; 16]) -> Vec<u8> {
    keys.key(&("idem", &key[..]))
}

/// Encodes a workload record.
pub fn workload_value(spec: &WorkloadSpec, generation: u64) -> Vec<u8> {
    let mut value = generation.to_le_bytes().to_vec();
    // A spec is plain data: serializing it cannot fail.
    serde_json::to_writer(&mut value, spec).expect("a spec serializes");
    value
}

/// Encodes an assignment.
pub fn replica_value(stored: Stored) -> Vec<u8> {
    [stored.host.0, stored.epoch, stored.generation].iter().flat_map(|n| n.to_le_bytes()).collect()
}

/// Encodes a JSON record.
pub fn json(value: &impl serde::Serialize) -> Vec<u8> {
    // Model records are plain data: serializing them cannot fail.
    serde_json::to_vec(value).expect("a record serializes")
}

/// Reads every host record of cell `cell`.
pub async fn load_hosts(db: &Database, cell: &CellId) -> Result<Vec<Host>, StorageError> {
    let tx = db.begin().await?;
    let hosts = read_hosts(&tx, cell).await;
    tx.cancel();
    hosts
}

async fn read_hosts(
    tx: &cellplane_storage::Transaction,
    cell: &CellId,
) -> Result<Vec<Host>, StorageError> {
    let host_space = keyspace::cell(cell).subspace(&("host",));
    let mut hosts = Vec::new();
    for (_, value) in scan(tx, keyspace::range_of(&host_space)).await? {
        let host: Host = serde_json::from_slice(&value).map_err(|e| corrupt("host", e))?;
        hosts.push(host);
    }
    Ok(hosts)
}

/// Reads everything cell `cell` keeps.
pub async fn load(db: &Database, cell: &CellId) -> Result<CellState, StorageError> {
    let mut state = CellState::default();
    let space = keyspace::cell(cell);
    let tx = db.begin().await?;
    state.hosts = read_hosts(&tx, cell).await?;
    // Tenants: every tenant record, then that tenant's objects through its scope.
    let tenant_space = space.subspace(&("tenant",));
    let mut tenants = Vec::new();
    for (key, value) in scan(&tx, keyspace::range_of(&tenant_space)).await? {
        let Ok((_, last)) = tenant_space.unpack::<(String, String)>(&key) else { continue };
        if last != "quota" {
            continue;
        }
        let tenant: Tenant = serde_json::from_slice(&value).map_err(|e| corrupt("tenant", e))?;
        tenant.validate().map_err(|e| corrupt("tenant", e))?;
        tenants.push(tenant);
    }
    for tenant in tenants {
        let scope = TenantScope::new(&tx, cell, &tenant.id);
        for (key, value) in scan_scope(&scope, &("idem",)).await? {
            let (_, raw): (String, Vec<u8>) = TenantScope::unpack(&key)?;
            let key: [u8; 16] = raw.try_into().map_err(|_| corrupt("idempotency", "key length"))?;
            let workload: WorkloadName =
                serde_json::from_slice(&value).map_err(|e| corrupt("idempotency", e))?;
            state.idempotency.push((key, tenant.id.clone(), workload));
        }
        let mut workloads: Vec<StoredWorkload> = Vec::new();
        for (key, value) in scan_scope(&scope, &("workload",)).await? {
            let _: (String, String) = TenantScope::unpack(&key)?;
            let (generation, json) =
                value.split_at_checked(8).ok_or_else(|| corrupt("spec", ""))?;
            let spec: WorkloadSpec =
                serde_json::from_slice(json).map_err(|e| corrupt("workload", e))?;
            let generation = u64::from_le_bytes(generation.try_into().expect("8 bytes"));
            workloads.push(StoredWorkload { spec, generation, slots: Vec::new() });
        }
        // Replica keys sort by workload name then ordinal, like the workloads themselves.
        let mut at = 0;
        for (key, value) in scan_scope(&scope, &("replica",)).await? {
            let (_, name, ordinal): (String, String, u32) = TenantScope::unpack(&key)?;
            let fields: Vec<u64> = value
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect();
            let [host, epoch, generation] = fields[..] else {
                return Err(corrupt("replica", format!("{} bytes", value.len())));
            };
            while at < workloads.len() && workloads[at].spec.name.as_str() < name.as_str() {
                at += 1;
            }
            // A replica whose workload is gone was being deleted: the cell clears it again.
            if let Some(w) = workloads.get_mut(at).filter(|w| w.spec.name.as_str() == name) {
                w.slots.push((ordinal, Stored { host: HostId(host), epoch, generation }));
            }
        }
        state.tenants.push((tenant, workloads));
    }
    tx.cancel();
    Ok(state)
}

async fn scan(
    tx: &cellplane_storage::Transaction,
    range: RangeOptions,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
    let mut rows = Vec::new();
    let mut options = range.limit(PAGE_LEN).snapshot();
    loop {
        let page = tx.get_range(&options).await?;
        let more = page.more;
        if let Some((last, _)) = page.rows.last() {
            options = options.after(last);
        }
        rows.extend(page.rows);
        if !more {
            return Ok(rows);
        }
    }
}

async fn scan_scope(
    scope: &TenantScope,
    prefix: &(&str,),
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, StorageError> {
    let mut rows: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    loop {
        let after = rows.last().map(|(k, _)| k.as_slice());
        let page = scope.get_prefix(prefix, PAGE_LEN, after).await?;
        let more = page.more;
        rows.extend(page.rows);
        if !more {
            return Ok(rows);
        }
    }
}
