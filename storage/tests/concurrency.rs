//! Many tasks running conflicting transactions end in a state equal to some serial order: money
//! moved between accounts is never created, destroyed or overdrawn.

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise.

use cellplane_storage::{Database, RetryPolicy, StorageError};

fn account(i: u64) -> Vec<u8> {
    format!("bank/{i:02}").into_bytes()
}

fn balance(bytes: Option<Vec<u8>>) -> Result<u64, StorageError> {
    let bytes = bytes.ok_or(StorageError::Engine("account missing".into()))?;
    Ok(u64::from_le_bytes(
        bytes.try_into().map_err(|_| StorageError::Engine("bad balance".into()))?,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_keep_the_total_and_never_overdraw() {
    const ACCOUNTS: u64 = 8;
    const START: u64 = 100;
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open_embedded(dir.path()).unwrap();
    let tx = db.begin().await.unwrap();
    for i in 0..ACCOUNTS {
        tx.set(&account(i), &START.to_le_bytes()).unwrap();
    }
    tx.commit().await.unwrap();

    // Patient retries: this test is about correctness under contention, not about giving up.
    let policy = RetryPolicy { attempts_max: 1_000, backoff_initial_ms: 1, backoff_max_ms: 8 };
    let workers: Vec<_> = (0..16u64)
        .map(|w| {
            let db = db.clone();
            tokio::spawn(async move {
                let mut done = 0;
                for n in 0..40u64 {
                    let (from, to, amount) =
                        ((w + n) % ACCOUNTS, (w * 3 + n * 7 + 1) % ACCOUNTS, 1 + (w * n) % 60);
                    if from == to {
                        continue;
                    }
                    let moved = db
                        .run_with(&policy, |tx| async move {
                            let a = balance(tx.get(&account(from)).await?)?;
                            let b = balance(tx.get(&account(to)).await?)?;
                            if a < amount {
                                return Ok(false);
                            }
                            tx.set(&account(from), &(a - amount).to_le_bytes())?;
                            tx.set(&account(to), &(b + amount).to_le_bytes())?;
                            Ok(true)
                        })
                        .await
                        .unwrap();
                    done += u32::from(moved);
                }
                done
            })
        })
        .collect();
    let mut moved = 0;
    for w in workers {
        moved += w.await.unwrap();
    }
    assert!(moved > 100, "the workload must actually move money ({moved} transfers)");

    let tx = db.begin().await.unwrap();
    let mut total = 0;
    for i in 0..ACCOUNTS {
        let b = balance(tx.get(&account(i)).await.unwrap()).unwrap();
        assert!(b <= ACCOUNTS * START, "account {i} holds {b}: money was created");
        total += b;
    }
    assert_eq!(total, ACCOUNTS * START, "money created or destroyed");
}
