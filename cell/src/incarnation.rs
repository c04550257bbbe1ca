//! A cell's incarnation: on every start the cell bumps its epoch in its own keyspace, in one
//! serializable transaction, before it assigns anything. Two processes starting the same cell
//! (a failover race) get different epochs, and the later one fences the earlier one's
//! assignments off.

use cellplane_api::CellId;
use cellplane_storage::{Database, Result, RetryPolicy, StorageError, keyspace};

use crate::core::fencing::Epoch;

/// Attempts at starting an incarnation: a start races at most a few others, and must not give
/// up because of them.
const START_ATTEMPTS_MAX: u32 = 100;

/// Reads the cell's epoch, stores the next one, and returns it once durable.
pub async fn start_incarnation(db: &Database, cell: &CellId) -> Result<Epoch> {
    let key = keyspace::cell_epoch(cell);
    let policy = RetryPolicy { attempts_max: START_ATTEMPTS_MAX, ..RetryPolicy::default() };
    db.run_with(&policy, |tx| {
        let key = key.clone();
        async move {
            let current = match tx.get(&key).await? {
                None => Epoch::default(),
                Some(bytes) => {
                    Epoch(u64::from_le_bytes(bytes.as_slice().try_into().map_err(|_| {
                        StorageError::Engine(format!("cell epoch is {} bytes, not 8", bytes.len()))
                    })?))
                }
            };
            let next = current.next();
            tx.set(&key, &next.0.to_le_bytes())?;
            Ok(next)
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_start_gets_a_new_epoch_even_across_restarts_and_races() {
        let dir = tempfile::tempdir().unwrap();
        let cell = CellId::new("cell-a").unwrap();
        {
            let db = Database::open_embedded(dir.path()).unwrap();
            assert_eq!(start_incarnation(&db, &cell).await.unwrap(), Epoch(1));
            assert_eq!(start_incarnation(&db, &cell).await.unwrap(), Epoch(2));
        }
        // The store is reopened, as after a process restart.
        let db = Database::open_embedded(dir.path()).unwrap();
        assert_eq!(start_incarnation(&db, &cell).await.unwrap(), Epoch(3));
        // Racing starts never share an epoch.
        let racers: Vec<_> = (0..8)
            .map(|_| {
                let (db, cell) = (db.clone(), cell.clone());
                tokio::spawn(async move { start_incarnation(&db, &cell).await.unwrap() })
            })
            .collect();
        let mut epochs = Vec::new();
        for racer in racers {
            epochs.push(racer.await.unwrap().0);
        }
        epochs.sort_unstable();
        assert_eq!(epochs, (4..12).collect::<Vec<_>>());
        // Another cell's epoch is its own.
        let other = CellId::new("cell-b").unwrap();
        assert_eq!(start_incarnation(&db, &other).await.unwrap(), Epoch(1));
    }

    #[tokio::test]
    async fn a_damaged_epoch_is_an_error_and_is_left_as_found() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open_embedded(dir.path()).unwrap();
        let cell = CellId::new("cell-a").unwrap();
        let tx = db.begin().await.unwrap();
        tx.set(&keyspace::cell_epoch(&cell), b"xyz").unwrap();
        tx.commit().await.unwrap();
        assert!(matches!(start_incarnation(&db, &cell).await, Err(StorageError::Engine(_))));
        let tx = db.begin().await.unwrap();
        assert_eq!(
            tx.get(&keyspace::cell_epoch(&cell)).await.unwrap().as_deref(),
            Some(&b"xyz"[..])
        );
    }
}
