//! Tenant isolation in the keyspace is by construction: a tenant-scoped handle reads, lists and
//! clears only its own tenant's keys, even when another tenant's name extends it and uses the
//! same object names.

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise.

use cellplane_api::{CellId, TenantId};
use cellplane_storage::Database;
use cellplane_storage::keyspace::{self, TenantScope};

#[tokio::test]
async fn a_tenant_scope_never_reaches_another_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open_embedded(dir.path()).unwrap();
    let cell = CellId::new("cell-a").unwrap();
    let (a, ab) = (TenantId::new("a").unwrap(), TenantId::new("ab").unwrap());

    let tx = db.begin().await.unwrap();
    for (tenant, value) in [(&a, b"of a".as_slice()), (&ab, b"of ab".as_slice())] {
        let scope = TenantScope::new(&tx, &cell, tenant);
        for name in ["web", "db", "cache"] {
            scope.set(&("workload", name), value).unwrap();
        }
        scope.set(&("replica", "web", 0), value).unwrap();
    }
    // A key outside every tenant, in the same cell.
    tx.set(&keyspace::cell_epoch(&cell), b"7").unwrap();
    tx.commit().await.unwrap();

    let tx = db.begin().await.unwrap();
    let scope_a = TenantScope::new(&tx, &cell, &a);
    assert_eq!(scope_a.get(&("workload", "web")).await.unwrap().as_deref(), Some(&b"of a"[..]));
    let page = scope_a.get_prefix(&("workload",), 100, None).await.unwrap();
    let names: Vec<(String, String)> =
        page.rows.iter().map(|(k, _)| TenantScope::unpack(k).unwrap()).collect();
    assert_eq!(names.iter().map(|(_, n)| n.as_str()).collect::<Vec<_>>(), ["cache", "db", "web"]);
    assert!(page.rows.iter().all(|(_, v)| v == b"of a"), "a row of another tenant leaked");

    // Paging inside the scope.
    let first = scope_a.get_prefix(&("workload",), 2, None).await.unwrap();
    assert!(first.more);
    let rest = scope_a.get_prefix(&("workload",), 2, Some(&first.rows[1].0)).await.unwrap();
    assert_eq!(rest.rows.len(), 1);
    assert!(!rest.more);

    // Clearing everything the scope can name clears only its own tenant.
    scope_a.clear_prefix(&()).unwrap();
    tx.commit().await.unwrap();

    let tx = db.begin().await.unwrap();
    let scope_a = TenantScope::new(&tx, &cell, &a);
    let scope_ab = TenantScope::new(&tx, &cell, &ab);
    assert!(scope_a.get_prefix(&(), 100, None).await.unwrap().rows.is_empty());
    assert_eq!(scope_ab.get_prefix(&(), 100, None).await.unwrap().rows.len(), 4);
    assert_eq!(tx.get(&keyspace::cell_epoch(&cell)).await.unwrap().as_deref(), Some(&b"7"[..]));
}
