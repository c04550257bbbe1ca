//! The FoundationDB backend (cargo feature `fdb`): the same interface, mapped onto the
//! `foundationdb` crate. FoundationDB gives the semantics natively; this module only translates
//! calls and errors. Building needs `libclang-dev`; linking needs FoundationDB's client library.
#![allow(unsafe_code)] // Only `foundationdb::boot`, whose contract is stated where it is called.

use std::sync::{Arc, Once};

use foundationdb::options::{MutationType, StreamingMode};
use foundationdb::{FdbError, RangeOption};
use tokio::sync::RwLock;

use crate::error::{Result, StorageError};
use crate::{RangeOptions, RangeResult, TRANSACTION_BYTES_MAX};

static BOOT: Once = Once::new();

pub(crate) struct FdbBackend {
    db: foundationdb::Database,
}

impl FdbBackend {
    pub(crate) fn open(cluster_file: Option<&str>) -> Result<Self> {
        BOOT.call_once(|| {
            // SAFETY: `boot` must run once per process and its guard must outlive every use of
            // the client; `Once` gives the first, leaking the guard the second (the network
            // thread lives until the process exits).
            std::mem::forget(unsafe { foundationdb::boot() });
        });
        let db = foundationdb::Database::new(cluster_file).map_err(|e| StorageError::Open {
            path: cluster_file.unwrap_or("<default cluster file>").to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self { db })
    }

    pub(crate) fn begin(&self) -> Result<Tx> {
        let tx = self.db.create_trx().map_err(map_error)?;
        Ok(Tx { inner: Arc::new(RwLock::new(Some(tx))) })
    }
}

/// A FoundationDB transaction; `None` once committed or cancelled.
#[derive(Clone)]
pub(crate) struct Tx {
    inner: Arc<RwLock<Option<foundationdb::Transaction>>>,
}

impl Tx {
    pub(crate) async fn read_version(&self) -> Result<u64> {
        let guard = self.inner.read().await;
        let tx = guard.as_ref().ok_or(StorageError::Finished)?;
        let version = tx.get_read_version().await.map_err(map_error)?;
        Ok(u64::try_from(version).unwrap_or(0))
    }

    pub(crate) async fn get(&self, key: &[u8], snapshot: bool) -> Result<Option<Vec<u8>>> {
        let guard = self.inner.read().await;
        let tx = guard.as_ref().ok_or(StorageError::Finished)?;
        Ok(tx.get(key, snapshot).await.map_err(map_error)?.map(|v| v.to_vec()))
    }

    pub(crate) async fn get_range(&self, options: &RangeOptions) -> Result<RangeResult> {
        let guard = self.inner.read().await;
        let tx = guard.as_ref().ok_or(StorageError::Finished)?;
        let range = RangeOption {
            limit: Some(options.limit),
            reverse: options.reverse,
            mode: StreamingMode::WantAll,
            ..RangeOption::from((options.begin.clone(), options.end.clone()))
        };
        let values = tx.get_range(&range, 1, options.snapshot).await.map_err(map_error)?;
        let rows = values.iter().map(|kv| (kv.key().to_vec(), kv.value().to_vec())).collect();
        Ok(RangeResult { rows, more: values.more() })
    }

    fn with<T>(&self, f: impl FnOnce(&foundationdb::Transaction) -> T) -> Result<T> {
        let guard = self.inner.try_read().map_err(|_| StorageError::Finished)?;
        guard.as_ref().map(f).ok_or(StorageError::Finished)
    }

    pub(crate) fn set(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.with(|tx| tx.set(key, value))
    }

    pub(crate) fn clear(&self, key: &[u8]) -> Result<()> {
        self.with(|tx| tx.clear(key))
    }

    pub(crate) fn clear_range(&self, begin: &[u8], end: &[u8]) -> Result<()> {
        self.with(|tx| tx.clear_range(begin, end))
    }

    pub(crate) fn atomic_add(&self, key: &[u8], delta: i64) -> Result<()> {
        self.with(|tx| tx.atomic_op(key, &delta.to_le_bytes(), MutationType::Add))
    }

    pub(crate) async fn commit(&self) -> Result<u64> {
        let tx = self.inner.write().await.take().ok_or(StorageError::Finished)?;
        let started = std::time::Instant::now();
        let committed = tx.commit().await.map_err(|e| map_error(*e));
        metrics::histogram!("cellplane_storage_commit_seconds").record(started.elapsed());
        let label = if committed.is_ok() { "ok" } else { "error" };
        metrics::counter!("cellplane_storage_commits_total", "outcome" => label).increment(1);
        let committed = committed?;
        Ok(u64::try_from(committed.committed_version().map_err(map_error)?).unwrap_or(0))
    }

    pub(crate) fn cancel(&self) {
        if let Ok(mut guard) = self.inner.try_write()
            && let Some(tx) = guard.take()
        {
            drop(tx.cancel());
        }
    }
}

/// FoundationDB's error codes, as the interface's errors.
fn map_error(e: FdbError) -> StorageError {
    match e.code() {
        1020 => StorageError::Conflict, // not_committed
        1021 => StorageError::CommitUnknownResult(e.to_string()), // commit_unknown_result
        // transaction_too_old: FoundationDB does not say which versions; 0 marks "unknown".
        1007 => StorageError::TransactionTooOld { read_version: 0, oldest: 0 },
        2101 => StorageError::TransactionTooLarge { bytes: 0, max: TRANSACTION_BYTES_MAX },
        1025 => StorageError::Finished, // transaction_cancelled
        _ if e.is_retryable() => StorageError::Unavailable(e.to_string()),
        _ => StorageError::Engine(e.to_string()),
    }
}
