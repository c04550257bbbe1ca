//! One transactional, ordered key-value interface for all of cellplane, modelled on
//! FoundationDB, with two backends that pass the same conformance suite:
//!
//! * the **embedded** backend (default): redb on local disk, fsync on every commit, with
//!   optimistic concurrency control ([`core::resolver`]) giving many concurrent transactions
//!   FoundationDB's serializable semantics, and group commit folding concurrent commits into one
//!   durable write;
//! * the **FoundationDB** backend, behind the `fdb` cargo feature.
//!
//! A [`Transaction`] reads at a read version, sees its own writes, and commits only if nothing it
//! read (outside snapshot reads) was written by a commit after its read version — otherwise
//! [`StorageError::Conflict`]. [`Database::run`] retries retryable failures with capped, jittered
//! backoff. Nothing is acknowledged before it is durable.
//!
//! [`keyspace`] lays the region's keys out as tuples and hands out tenant-scoped handles that
//! cannot reach another tenant's keys; [`group::GroupCommitter`] batches small changes from many
//! actors into one transaction.
#![deny(missing_docs)]

pub mod core;
mod embedded;
mod error;
#[cfg(feature = "fdb")]
mod fdb;
pub mod group;
pub mod keyspace;
mod queue;
mod sync;

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use embedded::EmbeddedOptions;
pub use error::{Result, StorageError};

/// Longest key, in bytes (FoundationDB's limit).
pub const KEY_LEN_MAX: usize = 10_000;
/// Longest value, in bytes (FoundationDB's limit).
pub const VALUE_LEN_MAX: usize = 100_000;
/// Most bytes of keys and values one transaction may write (FoundationDB's limit).
pub const TRANSACTION_BYTES_MAX: usize = 10_000_000;
/// Most rows one [`Transaction::get_range`] call returns; page with `more` for the rest.
pub const RANGE_LIMIT_MAX: usize = 10_000;

/// The first key after `key` in byte order.
pub fn key_after(key: &[u8]) -> Vec<u8> {
    let mut after = Vec::with_capacity(key.len() + 1);
    after.extend_from_slice(key);
    after.push(0);
    after
}

/// A range read: `[begin, end)`, at most `limit` rows, in either direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeOptions {
    /// First key included.
    pub begin: Vec<u8>,
    /// First key excluded.
    pub end: Vec<u8>,
    /// Most rows to return, 1 to [`RANGE_LIMIT_MAX`].
    pub limit: usize,
    /// Newest keys first.
    pub reverse: bool,
    /// A snapshot read: adds no read conflict (writes to these keys by others will not fail
    /// this transaction).
    pub snapshot: bool,
}

impl RangeOptions {
    /// All of `[begin, end)`, forward, up to [`RANGE_LIMIT_MAX`] rows.
    pub fn new(begin: impl Into<Vec<u8>>, end: impl Into<Vec<u8>>) -> Self {
        Self {
            begin: begin.into(),
            end: end.into(),
            limit: RANGE_LIMIT_MAX,
            reverse: false,
            snapshot: false,
        }
    }

    /// At most `limit` rows.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }

    /// Last keys first.
    pub fn reverse(mut self) -> Self {
        self.reverse = true;
        self
    }

    /// Without read conflicts.
    pub fn snapshot(mut self) -> Self {
        self.snapshot = true;
        self
    }

    /// The rest of the range after a page ended at `last` (the last key received).
    pub fn after(&self, last: &[u8]) -> Self {
        let mut next = self.clone();
        if self.reverse {
            next.end = last.to_vec();
        } else {
            next.begin = key_after(last);
        }
        next
    }

    fn check(&self) -> Result<()> {
        check_key(&self.begin)?;
        check_key(&self.end)?;
        if self.begin > self.end {
            return Err(StorageError::InvalidRange("begin is after end"));
        }
        if !(1..=RANGE_LIMIT_MAX).contains(&self.limit) {
            return Err(StorageError::InvalidRange("limit must be 1 to RANGE_LIMIT_MAX"));
        }
        Ok(())
    }
}

/// One page of a range read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeResult {
    /// Key-value rows in the requested order.
    pub rows: Vec<(Vec<u8>, Vec<u8>)>,
    /// Whether the range holds more rows past the limit.
    pub more: bool,
}

/// How [`Database::run_with`] retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Most attempts, the first included.
    pub attempts_max: u32,
    /// Backoff before the second attempt; doubles after each failure.
    pub backoff_initial_ms: u64,
    /// Largest backoff. Each wait is drawn uniformly from zero to the current backoff (jitter).
    pub backoff_max_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { attempts_max: 10, backoff_initial_ms: 2, backoff_max_ms: 500 }
    }
}

/// A handle on a store. Clones share it.
#[derive(Clone)]
pub struct Database {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Embedded(Arc<embedded::Engine>),
    #[cfg(feature = "fdb")]
    Fdb(Arc<fdb::FdbBackend>),
}

impl Database {
    /// Opens (or creates) an embedded store in the directory `dir`.
    pub fn open_embedded(dir: &Path) -> Result<Self> {
        Self::open_embedded_with(dir, EmbeddedOptions::default())
    }

    /// Opens (or creates) an embedded store in `dir` with explicit tuning.
    pub fn open_embedded_with(dir: &Path, options: EmbeddedOptions) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| StorageError::Open {
            path: dir.display().to_string(),
            reason: e.to_string(),
        })?;
        let engine = embedded::Engine::open(&embedded::data_file(dir), options)?;
        Ok(Self { backend: Backend::Embedded(Arc::new(engine)) })
    }

    /// Connects to the FoundationDB cluster named by `cluster_file` (or the default one).
    #[cfg(feature = "fdb")]
    pub fn open_fdb(cluster_file: Option<&str>) -> Result<Self> {
        Ok(Self { backend: Backend::Fdb(Arc::new(fdb::FdbBackend::open(cluster_file)?)) })
    }

    /// Whether the store folds concurrent commits into one durable write itself.
    pub(crate) fn groups_blind_commits(&self) -> bool {
        matches!(self.backend, Backend::Embedded(_))
    }

    /// Queues one transaction of blind writes behind every commit already queued and returns
    /// the future of its commit. The embedded engine takes it in this order however many are in
    /// flight, and waits while its queue is full (with backoff, up to `attempts_max` tries,
    /// then `Overloaded`); FoundationDB runs it when the future is polled. The writes must
    /// already be checked against the key and value limits.
    pub(crate) async fn queue_blind(
        &self,
        writes: Vec<group::Write>,
        attempts_max: u32,
    ) -> Result<Pin<Box<dyn Future<Output = Result<u64>> + Send>>> {
        match &self.backend {
            Backend::Embedded(engine) => {
                let mut writes = writes;
                let mut attempt = 1;
                let answer = loop {
                    match engine.queue_blind(writes) {
                        Ok(answer) => break answer,
                        Err(queue::PushError::Full(back)) if attempt < attempts_max => {
                            tokio::time::sleep(Duration::from_millis(1 << attempt.min(8))).await;
                            (writes, attempt) = (back, attempt + 1);
                        }
                        Err(queue::PushError::Full(_)) => {
                            return Err(StorageError::Overloaded { queued: engine.queued() });
                        }
                        Err(queue::PushError::Closed(_)) => return Err(StorageError::Closed),
                    }
                };
                // A dropped reply means the writer died mid-batch: the outcome is unknown.
                Ok(Box::pin(async move {
                    answer.await.unwrap_or_else(|_| {
                        Err(StorageError::CommitUnknownResult("the writer stopped".into()))
                    })
                }))
            }
            #[cfg(feature = "fdb")]
            Backend::Fdb(_) => {
                let db = self.clone();
                Ok(Box::pin(async move {
                    let tx = db.begin().await?;
                    for write in &writes {
                        match write {
                            group::Write::Set(key, value) => tx.set(key, value)?,
                            group::Write::Clear(key) => tx.clear(key)?,
                            group::Write::ClearRange(begin, end) => tx.clear_range(begin, end)?,
                            group::Write::Add(key, delta) => tx.atomic_add(key, *delta)?,
                        }
                    }
                    tx.commit().await
                }))
            }
        }
    }

    /// Starts a transaction.
    pub async fn begin(&self) -> Result<Transaction> {
        let inner = match &self.backend {
            Backend::Embedded(engine) => TxInner::Embedded(engine.begin()?),
            #[cfg(feature = "fdb")]
            Backend::Fdb(db) => TxInner::Fdb(db.begin()?),
        };
        Ok(Transaction { inner })
    }

    /// Runs `body` in a transaction and commits it, retrying retryable failures under the
    /// default [`RetryPolicy`]. `body` may run more than once, and — after a
    /// [`StorageError::CommitUnknownResult`] — after an attempt that did commit: it must be
    /// idempotent (cellplane writes carry idempotency keys for this).
    pub async fn run<T, F, Fut>(&self, body: F) -> Result<T>
    where
        F: FnMut(Transaction) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        self.run_with(&RetryPolicy::default(), body).await
    }

    /// [`Database::run`] with an explicit policy.
    pub async fn run_with<T, F, Fut>(&self, policy: &RetryPolicy, mut body: F) -> Result<T>
    where
        F: FnMut(Transaction) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut backoff_ms = policy.backoff_initial_ms.max(1);
        let mut attempt = 1;
        loop {
            let tx = self.begin().await?;
            let outcome = match body(tx.clone()).await {
                Ok(value) => tx.commit().await.map(|_| value),
                Err(e) => {
                    tx.cancel();
                    Err(e)
                }
            };
            match outcome {
                Ok(value) => return Ok(value),
                Err(e) if !e.is_retryable() => return Err(e),
                Err(e) if attempt >= policy.attempts_max => {
                    return Err(StorageError::RetriesExhausted {
                        attempts: attempt,
                        last: Box::new(e),
                    });
                }
                Err(e) => {
                    tracing::debug!(error = %e, attempt, "transaction retry");
                    let wait_ms = rand::random_range(0..=backoff_ms);
                    tokio::time::sleep(Duration::from_millis(wait_ms)).await;
                    backoff_ms = (backoff_ms * 2).min(policy.backoff_max_ms.max(1));
                    attempt += 1;
                }
            }
        }
    }
}

/// A transaction. Clones share one transaction (so a retry loop can hand one to a closure and
/// still commit it). After [`Transaction::commit`] or [`Transaction::cancel`], every operation
/// fails with [`StorageError::Finished`].
#[derive(Clone)]
pub struct Transaction {
    inner: TxInner,
}

#[derive(Clone)]
enum TxInner {
    Embedded(embedded::Tx),
    #[cfg(feature = "fdb")]
    Fdb(fdb::Tx),
}

impl Transaction {
    /// The version this transaction reads at.
    pub async fn read_version(&self) -> Result<u64> {
        match &self.inner {
            TxInner::Embedded(tx) => Ok(tx.read_version()),
            #[cfg(feature = "fdb")]
            TxInner::Fdb(tx) => tx.read_version().await,
        }
    }

    /// Reads `key`, adding it to the read conflicts.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get_with(key, false).await
    }

    /// Reads `key` without a read conflict.
    pub async fn snapshot_get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get_with(key, true).await
    }

    async fn get_with(&self, key: &[u8], snapshot: bool) -> Result<Option<Vec<u8>>> {
        check_key(key)?;
        match &self.inner {
            TxInner::Embedded(tx) => tx.get(key, snapshot),
            #[cfg(feature = "fdb")]
            TxInner::Fdb(tx) => tx.get(key, snapshot).await,
        }
    }

    /// Reads one page of a range.
    pub async fn get_range(&self, options: &RangeOptions) -> Result<RangeResult> {
        options.check()?;
        match &self.inner {
            TxInner::Embedded(tx) => tx.get_range(options),
            #[cfg(feature = "fdb")]
            TxInner::Fdb(tx) => tx.get_range(options).await,
        }
    }

    /// Sets `key` to `value`.
    pub fn set(&self, key: &[u8], value: &[u8]) -> Result<()> {
        check_key(key)?;
        check_value(value)?;
        match &self.inner {
            TxInner::Embedded(tx) => tx.set(key, value),
            #[cfg(feature = "fdb")]
            TxInner::Fdb(tx) => tx.set(key, value),
        }
    }

    /// Removes `key`.
    pub fn clear(&self, key: &[u8]) -> Result<()> {
        check_key(key)?;
        match &self.inner {
            TxInner::Embedded(tx) => tx.clear(key),
            #[cfg(feature = "fdb")]
            TxInner::Fdb(tx) => tx.clear(key),
        }
    }

    /// Removes every key in `[begin, end)`.
    pub fn clear_range(&self, begin: &[u8], end: &[u8]) -> Result<()> {
        check_key(begin)?;
        check_key(end)?;
        if begin > end {
            return Err(StorageError::InvalidRange("begin is after end"));
        }
        match &self.inner {
            TxInner::Embedded(tx) => tx.clear_range(begin, end),
            #[cfg(feature = "fdb")]
            TxInner::Fdb(tx) => tx.clear_range(begin, end),
        }
    }

    /// Adds `delta` to the little-endian 64-bit counter at `key` (missing counts as zero),
    /// without a read conflict: concurrent adds never conflict with each other.
    pub fn atomic_add(&self, key: &[u8], delta: i64) -> Result<()> {
        check_key(key)?;
        match &self.inner {
            TxInner::Embedded(tx) => tx.atomic_add(key, delta),
            #[cfg(feature = "fdb")]
            TxInner::Fdb(tx) => tx.atomic_add(key, delta),
        }
    }

    /// Commits: returns the commit version once the writes are durable.
    pub async fn commit(&self) -> Result<u64> {
        match &self.inner {
            TxInner::Embedded(tx) => tx.commit().await,
            #[cfg(feature = "fdb")]
            TxInner::Fdb(tx) => tx.commit().await,
        }
    }

    /// Abandons the transaction; nothing it wrote is kept.
    pub fn cancel(&self) {
        match &self.inner {
            TxInner::Embedded(tx) => tx.cancel(),
            #[cfg(feature = "fdb")]
            TxInner::Fdb(tx) => tx.cancel(),
        }
    }
}

/// Decodes a counter written by [`Transaction::atomic_add`].
pub fn decode_counter(value: &[u8]) -> i64 {
    let mut bytes = [0u8; 8];
    let n = value.len().min(8);
    bytes[..n].copy_from_slice(&value[..n]);
    i64::from_le_bytes(bytes)
}

pub(crate) fn check_key(key: &[u8]) -> Result<()> {
    if key.len() > KEY_LEN_MAX {
        return Err(StorageError::KeyTooLarge { len: key.len(), max: KEY_LEN_MAX });
    }
    Ok(())
}

pub(crate) fn check_value(value: &[u8]) -> Result<()> {
    if value.len() > VALUE_LEN_MAX {
        return Err(StorageError::ValueTooLarge { len: value.len(), max: VALUE_LEN_MAX });
    }
    Ok(())
}
