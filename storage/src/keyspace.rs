//! The region's keyspace: order-preserving tuple keys (FoundationDB's tuple layer, byte for
//! byte) in one subspace per owner, as laid out in DESIGN.md:
//!
//! ```text
//! ("region", region, "cell", cell)                  -> cell record, summary
//! ("region", region, "tenant", tenant)              -> tenant record, home cell
//! ("region", region, "placement", tenant, workload) -> the cell holding it, what it reserves
//! ("region", region, "moving", tenant, workload)    -> a drain's move in progress
//! ("region", region, "draining", cell)              -> a cell being emptied
//! ("cell", cell, "epoch")                           -> current incarnation
//! ("cell", cell, "host", host)                      -> host record
//! ("cell", cell, "tenant", tenant, "workload", n)   -> spec + status
//! ("cell", cell, "tenant", tenant, "replica", n, i) -> assignment
//! ("cell", cell, "tenant", tenant, "idem", key)     -> idempotency record
//! ```
//!
//! Tenant isolation is by construction: a [`TenantScope`] takes only tuples, packs every one of
//! them under its tenant's prefix, clamps every range to that prefix, and hands back keys relative
//! to it. Tuple encoding is self-delimiting (strings end in a terminator byte), so no tuple packed
//! under tenant `a` can fall under tenant `ab` or escape the prefix.

pub use foundationdb_tuple::{Element, Subspace, TuplePack, TupleUnpack};

use cellplane_api::{CellId, TenantId};

use crate::{RangeOptions, RangeResult, Result, StorageError, Transaction};

/// The subspace of a region's directory.
pub fn region(region: &str) -> Subspace {
    Subspace::from(&("region", region))
}

/// The subspace a cell owns.
pub fn cell(cell: &CellId) -> Subspace {
    Subspace::from(&("cell", cell.as_str()))
}

/// The key of a cell's epoch.
pub fn cell_epoch(cell_id: &CellId) -> Vec<u8> {
    cell(cell_id).pack(&("epoch",))
}

/// The key of a host record.
pub fn host(cell_id: &CellId, host: u64) -> Vec<u8> {
    cell(cell_id).pack(&("host", host))
}

/// The subspace of one tenant's objects in one cell.
pub fn tenant(cell_id: &CellId, tenant: &TenantId) -> Subspace {
    cell(cell_id).subspace(&("tenant", tenant.as_str()))
}

/// Every key of a subspace, as a range.
pub fn range_of(space: &Subspace) -> RangeOptions {
    let (begin, end) = space.range();
    RangeOptions::new(begin, end)
}

/// Keys confined to one tenant's subspace of one cell, for blind writes (group commit): like
/// [`TenantScope`], it packs only tuples, only under its tenant's prefix.
#[derive(Debug, Clone)]
pub struct TenantKeys {
    space: Subspace,
}

impl TenantKeys {
    /// Keys of `tenant` in `cell`.
    pub fn new(cell: &CellId, tenant_id: &TenantId) -> Self {
        Self { space: tenant(cell, tenant_id) }
    }

    /// The full key of the tuple `key` inside the tenant's subspace.
    pub fn key<K: TuplePack>(&self, key: &K) -> Vec<u8> {
        self.space.pack(key)
    }
}

/// A transaction confined to one tenant's subspace of one cell.
#[derive(Clone)]
pub struct TenantScope {
    tx: Transaction,
    space: Subspace,
}

impl TenantScope {
    /// Confines `tx` to `tenant` in `cell`.
    pub fn new(tx: &Transaction, cell: &CellId, tenant_id: &TenantId) -> Self {
        Self { tx: tx.clone(), space: tenant(cell, tenant_id) }
    }

    /// Reads the value under the tuple `key`.
    pub async fn get<K: TuplePack>(&self, key: &K) -> Result<Option<Vec<u8>>> {
        self.tx.get(&self.space.pack(key)).await
    }

    /// Sets the value under the tuple `key`.
    pub fn set<K: TuplePack>(&self, key: &K, value: &[u8]) -> Result<()> {
        self.tx.set(&self.space.pack(key), value)
    }

    /// Removes the tuple `key`.
    pub fn clear<K: TuplePack>(&self, key: &K) -> Result<()> {
        self.tx.clear(&self.space.pack(key))
    }

    /// Removes every key that starts with the tuple `prefix`.
    pub fn clear_prefix<K: TuplePack>(&self, prefix: &K) -> Result<()> {
        let (begin, end) = self.space.subspace(prefix).range();
        self.tx.clear_range(&begin, &end)
    }

    /// Reads up to `limit` rows whose key starts with the tuple `prefix`, keys relative to the
    /// tenant (unpack them with [`TenantScope::unpack`]). Page with `after`: the last relative key
    /// of the previous page.
    pub async fn get_prefix<K: TuplePack>(
        &self,
        prefix: &K,
        limit: usize,
        after: Option<&[u8]>,
    ) -> Result<RangeResult> {
        let mut options = range_of(&self.space.subspace(prefix)).limit(limit);
        if let Some(last) = after {
            options = options.after(&[self.space.bytes(), last].concat());
        }
        let mut page = self.tx.get_range(&options).await?;
        let prefix_len = self.space.bytes().len();
        for (key, _) in &mut page.rows {
            // Every row came from a range inside the tenant's subspace.
            debug_assert!(self.space.is_start_of(key), "range read left the tenant subspace");
            key.drain(..prefix_len);
        }
        Ok(page)
    }

    /// Decodes a relative key returned by [`TenantScope::get_prefix`].
    pub fn unpack<'de, T: TupleUnpack<'de>>(relative: &'de [u8]) -> Result<T> {
        foundationdb_tuple::unpack(relative).map_err(|e| StorageError::BadTuple(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuple_keys_sort_like_their_tuples() {
        let c = CellId::new("c1").unwrap();
        let mut keys = vec![host(&c, 10), host(&c, 2), host(&c, 300), host(&c, 1 << 40)];
        keys.sort();
        assert_eq!(keys, [host(&c, 2), host(&c, 10), host(&c, 300), host(&c, 1 << 40)]);
    }

    #[test]
    fn a_tenant_prefix_never_covers_another_tenant() {
        let c = CellId::new("c1").unwrap();
        let a = tenant(&c, &TenantId::new("a").unwrap());
        let ab = tenant(&c, &TenantId::new("ab").unwrap());
        let (begin, end) = a.range();
        let key_ab = ab.pack(&("workload", "web"));
        assert!(!(begin.as_slice()..end.as_slice()).contains(&key_ab.as_slice()));
        assert!(!a.is_start_of(&key_ab));
    }
}
