//! Group commit for many actors: small changes go in, one transaction comes out, and each
//! change is acknowledged only after that transaction is durable.
//!
//! Protocol: [`GroupCommitter::commit`] sends a list of blind writes to one committer task over a
//! bounded channel (a full channel makes the caller wait: backpressure, not growth). The task
//! takes everything waiting, up to [`GroupOptions::batch_len_max`] submissions or
//! [`GroupOptions::batch_bytes_max`] bytes, writes it in one transaction, commits, and answers
//! every submission with the commit's result. Blind writes read nothing, so a batch never
//! conflicts; an `Overloaded` store is retried with backoff; a `CommitUnknownResult` goes back to
//! each caller, who retries with its own idempotency key.

use tokio::sync::{mpsc, oneshot};

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
}

impl Default for GroupOptions {
    fn default() -> Self {
        Self {
            queue_len_max: 16_384,
            batch_len_max: 4_096,
            batch_bytes_max: TRANSACTION_BYTES_MAX / 2,
            attempts_max: 8,
        }
    }
}

struct Submission {
    writes: Vec<Write>,
    bytes: usize,
    reply: oneshot::Sender<Result<u64>>,
}

/// A handle on a committer task. Clones share the task; it ends when every handle is dropped.
#[derive(Clone)]
pub struct GroupCommitter {
    submissions: mpsc::Sender<Submission>,
    options: GroupOptions,
}

impl GroupCommitter {
    /// Starts a committer over `db` on the current tokio runtime.
    pub fn spawn(db: Database, options: GroupOptions) -> Self {
        let (submissions, receiver) = mpsc::channel(options.queue_len_max);
        tokio::spawn(commit_loop(db, receiver, options));
        Self {
            submissions,
            options,
        }
    }

    /// Commits `writes` atomically, as part of a group; returns the commit version once durable.
    pub async fn commit(&self, writes: Vec<Write>) -> Result<u64> {
        let bytes: usize = writes.iter().map(Write::len).sum();
        if bytes > self.options.batch_bytes_max {
            return Err(StorageError::TransactionTooLarge {
                bytes,
                max: self.options.batch_bytes_max,
            });
        }
        let (reply, answer) = oneshot::channel();
        self.submissions
            .send(Submission {
                writes,
                bytes,
                reply,
            })
            .await
            .map_err(|_| StorageError::Closed)?;
        answer.await.unwrap_or(Err(StorageError::Closed))
    }
}

async fn commit_loop(
    db: Database,
    mut receiver: mpsc::Receiver<Submission>,
    options: GroupOptions,
) {
    let mut batch: Vec<Submission> = Vec::with_capacity(options.batch_len_max);
    let mut carry: Option<Submission> = None;
    loop {
        let first = match carry.take() {
            Some(first) => first,
            None => match receiver.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let mut bytes = first.bytes;
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
        let outcome = commit_batch(&db, &batch, options.attempts_max).await;
        for submission in batch.drain(..) {
            let answer = match &outcome {
                Ok(version) => Ok(*version),
                Err(e) => Err(copy_error(e)),
            };
            let _ = submission.reply.send(answer);
        }
    }
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
