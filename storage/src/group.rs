//! Group commit for many actors: small changes go in, one transaction comes out, and each
//! change is acknowledged only after that transaction is durable.
//!
//! Protocol: [`GroupCommitter::commit`] sends a list of blind writes to one committer task over a
//! bounded channel (a full channel makes the caller wait: backpressure, not growth). The task
//! takes everything waiting, up to [`GroupOptions::batch_len_max`] submissions or
//! [`GroupOptions::batch_bytes_max`] bytes, writes it in one transaction, commits, and answers
//! every submission with the commit's result. While a batch commits, the next one gathers in the
//! channel; before closing a batch the task yields once, so that writers woken by the last
//! acknowledgements are in it. [`GroupOptions::in_flight_max`] batches may commit at once;
//! measured here, one is best (more splits the writers into smaller batches). Blind writes read
//! nothing, so a batch never conflicts; an `Overloaded` store is retried with backoff; a
//! `CommitUnknownResult` goes back to each caller, who retries with its own idempotency key.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::{Database, Result, StorageError, TRANSACTION_BYTES_MAX};

/// One blind write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Set a key.
    Set(Vec<u8>, Vec<u8>),
    /// Remove a key.
    Clear(Vec<u8>),
    /// Add to a little-endian counter.
    Add(Vec<u8>, i64),
}

impl Write {
    fn len(&self) -> usize {
        match self {
            Write::Set(k, v) => k.len() + v.len(),
            Write::Clear(k) => k.len(),
            Write::Add(k, _) => k.len() + 8,
        }
    }
}

/// Limits of a [`GroupCommitter`].
#[derive(Debug, Clone, Copy)]
pub struct GroupOptions {
    /// Most submissions waiting for the committer.
    pub queue_len_max: usize,
    /// Most submissions in one transaction.
    pub batch_len_max: usize,
    /// Most bytes in one transaction (below the store's transaction cap).
    pub batch_bytes_max: usize,
    /// Most attempts when the store is overloaded.
    pub attempts_max: u32,
    /// Most batches committing at once.
    pub in_flight_max: usize,
}

impl Default for GroupOptions {
    fn default() -> Self {
        Self {
            queue_len_max: 16_384,
            batch_len_max: 4_096,
            batch_bytes_max: TRANSACTION_BYTES_MAX / 2,
            attempts_max: 8,
            in_flight_max: 1,
        }
    }
}

struct Submission {
    writes: Vec<Write>,
    bytes: usize,
    reply: oneshot::Sender<Result<u64>>,
}

/// A handle on a committer task. Clones share the task; it ends when every handle is dropped
/// (or joined), after answering everything already submitted.
#[derive(Clone)]
pub struct GroupCommitter {
    submissions: mpsc::Sender<Submission>,
    options: GroupOptions,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl GroupCommitter {
    /// Starts a committer over `db` on the current tokio runtime.
    pub fn spawn(db: Database, options: GroupOptions) -> Self {
        let (submissions, receiver) = mpsc::channel(options.queue_len_max);
        let task = Arc::new(tokio::spawn(commit_loop(db, receiver, options)));
        Self { submissions, options, task }
    }

    /// Drops this handle; if it was the last one, waits until the committer has answered
    /// everything submitted and released the store.
    pub async fn join(self) {
        let Self { submissions, task, .. } = self;
        drop(submissions);
        if let Ok(task) = Arc::try_unwrap(task) {
            // The loop only returns; a panic in it has already failed every waiting caller.
            let _ = task.await;
        }
    }

    /// Commits `writes` atomically, as part of a group; returns the commit version once durable.
    pub async fn commit(&self, writes: Vec<Write>) -> Result<u64> {
        self.submit(writes).await?.await
    }

    /// Queues `writes` now and returns a future of their commit. Submissions are committed in
    /// the order they were queued when `in_flight_max` is 1 (the default), so an actor that queues its
    /// changes in order from its own handler gets them stored in that order, without waiting
    /// for each commit before handling its next message.
    pub async fn submit(
        &self,
        writes: Vec<Write>,
    ) -> Result<impl Future<Output = Result<u64>> + Send + 'static> {
        let bytes: usize = writes.iter().map(Write::len).sum();
        if bytes > self.options.batch_bytes_max {
            return Err(StorageError::TransactionTooLarge {
                bytes,
                max: self.options.batch_bytes_max,
            });
        }
        let (reply, answer) = oneshot::channel();
        self.submissions
            .send(Submission { writes, bytes, reply })
            .await
            .map_err(|_| StorageError::Closed)?;
        Ok(async move { answer.await.unwrap_or(Err(StorageError::Closed)) })
    }
}

async fn commit_loop(
    db: Database,
    mut receiver: mpsc::Receiver<Submission>,
    options: GroupOptions,
) {
    let in_flight = Arc::new(Semaphore::new(options.in_flight_max.max(1)));
    let mut carry: Option<Submission> = None;
    loop {
        // Wait for a free commit slot first: while every slot is busy, submissions pile up in
        // the channel, and the next batch takes them all.
        let Ok(slot) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let first = match carry.take() {
            Some(first) => first,
            None => match receiver.recv().await {
                Some(first) => first,
                None => break,
            },
        };
        // Let writers woken by the last acknowledgements submit before the batch closes.
        tokio::task::yield_now().await;
        let mut bytes = first.bytes;
        let mut batch = Vec::with_capacity(options.batch_len_max.min(receiver.len() + 1));
        batch.push(first);
        while batch.len() < options.batch_len_max {
            match receiver.try_recv() {
                Ok(next) if bytes + next.bytes > options.batch_bytes_max => {
                    carry = Some(next);
                    break;
                }
                Ok(next) => {
                    bytes += next.bytes;
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let db = db.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let outcome = commit_batch(&db, &batch, options.attempts_max).await;
            metrics::histogram!("cellplane_storage_commit_seconds").record(started.elapsed());
            metrics::counter!("cellplane_storage_commits_total", "outcome" => if outcome.is_ok() { "ok" } else { "error" })
                .increment(1);
            for submission in batch {
                let answer = match &outcome {
                    Ok(version) => Ok(*version),
                    Err(e) => Err(copy_error(e)),
                };
                let _ = submission.reply.send(answer);
            }
            drop(slot);
        });
    }
    // Every handle is gone: wait for the commits still in flight before releasing the store.
    let _ = in_flight.acquire_many(options.in_flight_max.max(1) as u32).await;
}

async fn commit_batch(db: &Database, batch: &[Submission], attempts_max: u32) -> Result<u64> {
    let mut attempt = 1;
    loop {
        let tx = db.begin().await?;
        for write in batch.iter().flat_map(|s| &s.writes) {
            match write {
                Write::Set(key, value) => tx.set(key, value)?,
                Write::Clear(key) => tx.clear(key)?,
                Write::Add(key, delta) => tx.atomic_add(key, *delta)?,
            }
        }
        match tx.commit().await {
            Err(StorageError::Overloaded { .. }) if attempt < attempts_max => {
                tokio::time::sleep(std::time::Duration::from_millis(1 << attempt.min(8))).await;
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

/// Each caller gets its own copy of a batch's error.
fn copy_error(e: &StorageError) -> StorageError {
    match e {
        StorageError::CommitUnknownResult(why) => StorageError::CommitUnknownResult(why.clone()),
        StorageError::Overloaded { queued } => StorageError::Overloaded { queued: *queued },
        StorageError::Closed => StorageError::Closed,
        StorageError::Unavailable(why) => StorageError::Unavailable(why.clone()),
        other => StorageError::Engine(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_acknowledged_write_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mut versions = Vec::new();
        {
            let db = Database::open_embedded(dir.path()).unwrap();
            let committer = GroupCommitter::spawn(db, GroupOptions::default());
            let writers: Vec<_> = (0..64u32)
                .map(|w| {
                    let committer = committer.clone();
                    tokio::spawn(async move {
                        let mut acked = Vec::new();
                        for i in 0..20u32 {
                            let key = format!("g/{w:02}/{i:02}").into_bytes();
                            let version = committer
                                .commit(vec![
                                    Write::Set(key, i.to_le_bytes().to_vec()),
                                    Write::Add(b"g/count".to_vec(), 1),
                                ])
                                .await
                                .unwrap();
                            acked.push(version);
                        }
                        acked
                    })
                })
                .collect();
            for w in writers {
                versions.extend(w.await.unwrap());
            }
            committer.join().await;
        }
        // Reopen: the acknowledgements were durable, not just in memory.
        let db = Database::open_embedded(dir.path()).unwrap();
        let tx = db.begin().await.unwrap();
        for w in 0..64u32 {
            for i in 0..20u32 {
                let key = format!("g/{w:02}/{i:02}").into_bytes();
                assert_eq!(
                    tx.get(&key).await.unwrap(),
                    Some(i.to_le_bytes().to_vec()),
                    "{w}/{i} lost"
                );
            }
        }
        let count = tx.get(b"g/count").await.unwrap().map(|v| crate::decode_counter(&v));
        assert_eq!(count, Some(64 * 20));
        assert!(versions.iter().all(|v| *v > 0));
    }

    #[tokio::test]
    async fn an_oversized_submission_is_refused_and_the_rest_commit() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open_embedded(dir.path()).unwrap();
        let options = GroupOptions { batch_bytes_max: 1_000, ..GroupOptions::default() };
        let committer = GroupCommitter::spawn(db.clone(), options);
        let big = committer.commit(vec![Write::Set(b"big".to_vec(), vec![0; 2_000])]).await;
        assert!(matches!(big, Err(StorageError::TransactionTooLarge { .. })));
        committer.commit(vec![Write::Set(b"small".to_vec(), b"v".to_vec())]).await.unwrap();
        let tx = db.begin().await.unwrap();
        assert_eq!(tx.get(b"big").await.unwrap(), None);
        assert_eq!(tx.get(b"small").await.unwrap(), Some(b"v".to_vec()));
    }
}
