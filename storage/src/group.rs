//! Group commit for many actors: small changes go in, few durable commits come out, and each
//! change is acknowledged only after the commit that holds it is durable.
//!
//! Protocol: [`GroupCommitter::submit`] checks a list of blind writes against the store's limits
//! (a bad one fails alone) and queues it; the returned future answers once it is durable.
//! - On the **embedded** store the submission goes straight onto the engine's commit queue, as
//!   one transaction that reads nothing: the engine's writer already takes everything waiting,
//!   applies it in one key-ordered pass and makes it durable with one fsync, and while it
//!   commits the next group gathers in its queue. Nothing sits between the two, so the writer
//!   never waits for a batch to be assembled (measured: a committer task in between left it
//!   idle a third of the time). A full engine queue makes the caller wait (backoff, then
//!   `Overloaded`): backpressure, not growth.
//! - On **FoundationDB** (or with [`GroupOptions::fold_in_task`]) one committer task takes
//!   everything waiting on a bounded channel, up to [`GroupOptions::batch_len_max`] submissions
//!   or [`GroupOptions::batch_bytes_max`] bytes, commits it as one transaction and answers every
//!   submission with the result. While a batch commits, the next gathers; before closing a
//!   batch the task yields once, so that writers woken by the last acknowledgements are in it.
//!   [`GroupOptions::in_flight_max`] batches may commit at once; measured here, one is best.
//!
//! Either way, submissions are stored in the order they were queued (for FoundationDB, with
//! `in_flight_max` 1, the default), so an actor that queues its changes from its own handler gets
//! them stored in that order without waiting for each commit. Blind writes never conflict; a
//! `CommitUnknownResult` goes back to each caller, who retries with its own idempotency key.

use std::sync::Arc;

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::{Database, Result, StorageError, TRANSACTION_BYTES_MAX, check_key, check_value};

/// One blind write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Set a key.
    Set(Vec<u8>, Vec<u8>),
    /// Remove a key.
    Clear(Vec<u8>),
    /// Add to a little-endian counter.
    Add(Vec<u8>, i64),
    /// Remove every key in `[begin, end)`.
    ClearRange(Vec<u8>, Vec<u8>),
}

impl Write {
    pub(crate) fn len(&self) -> usize {
        match self {
            Write::Set(k, v) => k.len() + v.len(),
            Write::Clear(k) => k.len(),
            Write::Add(k, _) => k.len() + 8,
            Write::ClearRange(begin, end) => begin.len() + end.len(),
        }
    }

    /// Checked against the store's limits when submitted, so that a bad write fails alone.
    fn check(&self) -> Result<()> {
        match self {
            Write::Set(key, value) => check_key(key).and_then(|()| check_value(value)),
            Write::Clear(key) | Write::Add(key, _) => check_key(key),
            Write::ClearRange(begin, end) => {
                check_key(begin)?;
                check_key(end)?;
                if begin > end {
                    return Err(StorageError::InvalidRange("begin is after end"));
                }
                Ok(())
            }
        }
    }
}

/// Limits of a [`GroupCommitter`]; the batch and in-flight limits apply to a committer task.
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
    /// Fold submissions into transactions in a committer task even where the store groups
    /// commits itself (the embedded engine does; FoundationDB does not).
    pub fold_in_task: bool,
}

impl GroupOptions {
    /// The defaults, usable in constants.
    pub const DEFAULT: Self = Self {
        queue_len_max: 16_384,
        batch_len_max: 4_096,
        batch_bytes_max: TRANSACTION_BYTES_MAX / 2,
        attempts_max: 8,
        in_flight_max: 1,
        fold_in_task: false,
    };
}

impl Default for GroupOptions {
    fn default() -> Self {
        Self::DEFAULT
    }
}

struct Submission {
    writes: Vec<Write>,
    bytes: usize,
    reply: oneshot::Sender<Result<u64>>,
}

/// A handle on a group committer. Clones share it; a committer task, where there is one, ends
/// when every handle is dropped (or joined), after answering everything already submitted.
#[derive(Clone)]
pub struct GroupCommitter {
    db: Database,
    options: GroupOptions,
    task: Option<CommitterTask>,
}

#[derive(Clone)]
struct CommitterTask {
    submissions: mpsc::Sender<Submission>,
    task: Arc<tokio::task::JoinHandle<()>>,
}

impl GroupCommitter {
    /// Starts a committer over `db` (on the current tokio runtime, where it needs a task).
    pub fn spawn(db: Database, options: GroupOptions) -> Self {
        let task = (options.fold_in_task || !db.groups_blind_commits()).then(|| {
            let (submissions, receiver) = mpsc::channel(options.queue_len_max);
            let task = Arc::new(tokio::spawn(commit_loop(db.clone(), receiver, options)));
            CommitterTask { submissions, task }
        });
        Self { db, options, task }
    }

    /// Drops this handle; if it was the last one, waits until the committer task has answered
    /// everything submitted and released the store.
    pub async fn join(self) {
        if let Some(CommitterTask { submissions, task }) = self.task {
            drop(submissions);
            if let Ok(task) = Arc::try_unwrap(task) {
                // The loop only returns; a panic in it has already failed every waiting caller.
                let _ = task.await;
            }
        }
    }

    /// Commits `writes` atomically, as part of a group; returns the commit version once durable.
    pub async fn commit(&self, writes: Vec<Write>) -> Result<u64> {
        self.submit(writes).await?.await
    }

    /// Queues `writes` now and returns a future of their commit (see the module documentation
    /// for the order kept).
    pub async fn submit(
        &self,
        writes: Vec<Write>,
    ) -> Result<impl Future<Output = Result<u64>> + Send + 'static + use<>> {
        writes.iter().try_for_each(Write::check)?;
        let bytes: usize = writes.iter().map(Write::len).sum();
        if bytes > self.options.batch_bytes_max {
            return Err(StorageError::TransactionTooLarge {
                bytes,
                max: self.options.batch_bytes_max,
            });
        }
        let Some(CommitterTask { submissions, .. }) = &self.task else {
            return self.db.queue_blind(writes, self.options.attempts_max).await;
        };
        let (reply, answer) = oneshot::channel();
        submissions
            .send(Submission { writes, bytes, reply })
            .await
            .map_err(|_| StorageError::Closed)?;
        Ok(Box::pin(async move { answer.await.unwrap_or(Err(StorageError::Closed)) }))
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
        // Queued here, in the loop, so that batches reach the store in order.
        let writes = batch.iter_mut().flat_map(|s| std::mem::take(&mut s.writes)).collect();
        let committed = db.queue_blind(writes, options.attempts_max).await;
        tokio::spawn(async move {
            let outcome = match committed {
                Ok(committed) => committed.await,
                Err(e) => Err(e),
            };
            drop(slot);
            for submission in batch {
                let answer = match &outcome {
                    Ok(version) => Ok(*version),
                    Err(e) => Err(copy_error(e)),
                };
                let _ = submission.reply.send(answer);
            }
        });
    }
    // Every handle is gone: wait for the commits still in flight before releasing the store.
    let _ = in_flight.acquire_many(options.in_flight_max.max(1) as u32).await;
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

    /// Both ways of grouping: straight onto the engine's queue, and through a committer task.
    const MODES: [GroupOptions; 2] = [
        GroupOptions { fold_in_task: false, ..GroupOptions::DEFAULT },
        GroupOptions { fold_in_task: true, ..GroupOptions::DEFAULT },
    ];

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_acknowledged_write_is_durable() {
        for options in MODES {
            let dir = tempfile::tempdir().unwrap();
            let mut versions = Vec::new();
            {
                let db = Database::open_embedded(dir.path()).unwrap();
                let committer = GroupCommitter::spawn(db, options);
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
                        "{w}/{i} lost ({options:?})"
                    );
                }
            }
            let count = tx.get(b"g/count").await.unwrap().map(|v| crate::decode_counter(&v));
            assert_eq!(count, Some(64 * 20), "{options:?}");
            assert!(versions.iter().all(|v| *v > 0));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn submissions_are_stored_in_the_order_they_were_queued() {
        for options in MODES {
            let dir = tempfile::tempdir().unwrap();
            let db = Database::open_embedded(dir.path()).unwrap();
            let committer = GroupCommitter::spawn(db.clone(), options);
            // One caller queues 2,000 changes of one key (and clears and sets of another)
            // without waiting; the last one queued must be what is stored.
            let mut queued = Vec::new();
            for i in 0..2_000u32 {
                let writes = vec![
                    Write::Set(b"o/key".to_vec(), i.to_be_bytes().to_vec()),
                    if i % 2 == 0 {
                        Write::Clear(b"o/other".to_vec())
                    } else {
                        Write::Set(b"o/other".to_vec(), b"set".to_vec())
                    },
                ];
                queued.push(committer.submit(writes).await.unwrap());
            }
            let mut last = 0;
            for commit in queued {
                let version = commit.await.unwrap();
                assert!(version >= last, "versions go back: {last} then {version}");
                last = version;
            }
            let tx = db.begin().await.unwrap();
            assert_eq!(tx.get(b"o/key").await.unwrap(), Some(1_999u32.to_be_bytes().to_vec()));
            assert_eq!(tx.get(b"o/other").await.unwrap(), Some(b"set".to_vec()), "{options:?}");
        }
    }

    #[tokio::test]
    async fn a_group_commit_conflicts_with_a_transaction_that_read_its_key_before() {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open_embedded(dir.path()).unwrap();
        let committer = GroupCommitter::spawn(db.clone(), GroupOptions::default());
        let reader = db.begin().await.unwrap();
        assert_eq!(reader.get(b"c/key").await.unwrap(), None);
        committer.commit(vec![Write::Set(b"c/key".to_vec(), b"group".to_vec())]).await.unwrap();
        reader.set(b"c/derived", b"from a stale read").unwrap();
        assert!(matches!(reader.commit().await, Err(StorageError::Conflict)));
        let tx = db.begin().await.unwrap();
        assert_eq!(tx.get(b"c/derived").await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_bad_submission_is_refused_alone_and_the_rest_commit() {
        for options in MODES {
            let dir = tempfile::tempdir().unwrap();
            let db = Database::open_embedded(dir.path()).unwrap();
            let options = GroupOptions { batch_bytes_max: 1_000, ..options };
            let committer = GroupCommitter::spawn(db.clone(), options);
            let good = committer.submit(vec![Write::Set(b"good".to_vec(), b"v".to_vec())]).await;
            let big = committer.commit(vec![Write::Set(b"big".to_vec(), vec![0; 2_000])]).await;
            assert!(matches!(big, Err(StorageError::TransactionTooLarge { .. })));
            let key = committer.commit(vec![Write::Clear(vec![0; crate::KEY_LEN_MAX + 1])]).await;
            assert!(matches!(key, Err(StorageError::KeyTooLarge { .. })));
            let range =
                committer.commit(vec![Write::ClearRange(b"b".to_vec(), b"a".to_vec())]).await;
            assert!(matches!(range, Err(StorageError::InvalidRange(_))));
            good.unwrap().await.unwrap();
            committer.commit(vec![Write::Set(b"small".to_vec(), b"v".to_vec())]).await.unwrap();
            let tx = db.begin().await.unwrap();
            assert_eq!(tx.get(b"big").await.unwrap(), None);
            assert_eq!(tx.get(b"good").await.unwrap(), Some(b"v".to_vec()));
            assert_eq!(tx.get(b"small").await.unwrap(), Some(b"v".to_vec()), "{options:?}");
        }
    }
}
