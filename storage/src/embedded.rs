//! The embedded backend: redb underneath, FoundationDB's semantics on top.
//!
//! Protocol:
//! - **reads** happen at a read version on a redb read snapshot. The read version is loaded
//!   *before* the snapshot is opened and published by the writer only *after* its redb commit, so
//!   a snapshot never misses a version at or below its read version (it may see a newer one; the
//!   resolver then reports a harmless false conflict, never a missed one);
//! - **commits** go to one writer thread through a bounded [`BatchQueue`]. The thread takes every
//!   waiting commit at once, runs each through the [`Resolver`] in arrival order, applies the
//!   accepted ones to one redb write transaction and makes it durable with one fsync (group
//!   commit), and only then answers each caller. No lock is ever held across an await: the async
//!   side only pushes to the queue and awaits its oneshot answer;
//! - **durability**: redb `Durability::Immediate` (fsync before the commit returns). A crash at any
//!   point leaves the last durable commit; redb's checksums and an integrity check on open turn a
//!   corrupt or truncated file into an error, never a panic or a silent loss.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use crate::core::resolver::{Key, KeyRange, Resolver, Verdict};
use crate::error::{Result, StorageError};
use crate::group::Write;
use crate::queue::{BatchQueue, Limits, PushError};
use crate::{RangeOptions, RangeResult, TRANSACTION_BYTES_MAX, decode_counter, key_after};

const DATA: TableDefinition<&[u8], &[u8]> = TableDefinition::new("data");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_VERSION: &str = "version";

/// Tuning for the embedded engine. The defaults suit a cell.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Most commits waiting for the writer before callers get `Overloaded`.
    pub queue_len_max: usize,
    /// Most bytes (keys and values written) of the commits waiting for the writer.
    pub queue_bytes_max: usize,
    /// Most commits folded into one durable write.
    pub batch_len_max: usize,
    /// Most bytes written by the commits folded into one durable write.
    pub batch_bytes_max: usize,
    /// Most commits the conflict history remembers (older readers get `TransactionTooOld`).
    pub history_len_max: usize,
    /// Most written keys and ranges the conflict history holds (bounds its memory).
    pub history_writes_max: usize,
    /// Verify every page's checksum when opening (slower opens, no trust in a damaged file).
    pub check_integrity_on_open: bool,
    /// Page cache size in bytes.
    pub cache_bytes: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        Self {
            queue_len_max: 16_384,
            queue_bytes_max: 256 << 20,
            batch_len_max: 4_096,
            batch_bytes_max: 64 << 20,
            history_len_max: 100_000,
            history_writes_max: 1_000_000,
            check_integrity_on_open: true,
            cache_bytes: 256 << 20,
        }
    }
}

/// One mutation, applied in order at commit.
#[derive(Debug, Clone)]
enum Mutation {
    Set(Key, Vec<u8>),
    Clear(Key),
    ClearRange(Key, Key),
    Add(Key, i64),
}

impl Mutation {
    /// The key it writes (the first key, for a range clear).
    fn key(&self) -> &[u8] {
        match self {
            Mutation::Set(key, _) | Mutation::Clear(key) | Mutation::Add(key, _) => key,
            Mutation::ClearRange(begin, _) => begin,
        }
    }

    /// What the mutation wrote, for the conflict history (shares the keys, copies nothing).
    fn write(&self) -> KeyRange {
        match self {
            Mutation::Set(key, _) | Mutation::Clear(key) | Mutation::Add(key, _) => {
                KeyRange::Key(key.clone())
            }
            Mutation::ClearRange(begin, end) => {
                KeyRange::Range { begin: begin.clone(), end: end.clone() }
            }
        }
    }
}

impl From<Write> for Mutation {
    fn from(write: Write) -> Self {
        match write {
            Write::Set(key, value) => Mutation::Set(key.into(), value),
            Write::Clear(key) => Mutation::Clear(key.into()),
            Write::Add(key, delta) => Mutation::Add(key.into(), delta),
            Write::ClearRange(begin, end) => Mutation::ClearRange(begin.into(), end.into()),
        }
    }
}

/// The writes of a blind request handed back (only on the rare path of a full queue).
fn writes_of(request: CommitRequest) -> Vec<Write> {
    let write = |mutation: Mutation| match mutation {
        Mutation::Set(key, value) => Write::Set(key.to_vec(), value),
        Mutation::Clear(key) => Write::Clear(key.to_vec()),
        Mutation::Add(key, delta) => Write::Add(key.to_vec(), delta),
        Mutation::ClearRange(begin, end) => Write::ClearRange(begin.to_vec(), end.to_vec()),
    };
    request.mutations.into_iter().map(write).collect()
}

/// A commit waiting for the writer thread.
struct CommitRequest {
    read_version: u64,
    reads: Vec<KeyRange>,
    mutations: Vec<Mutation>,
    reply: oneshot::Sender<Result<u64>>,
}

/// State shared by the handles and the writer thread.
struct Shared {
    db: redb::Database,
    queue: BatchQueue<CommitRequest>,
    /// The newest durable version; published after the redb commit that made it durable.
    committed: AtomicU64,
}

/// The embedded engine. Dropping the last handle drains queued commits and stops the writer.
pub(crate) struct Engine {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Opens (or creates) the store at `path`.
    pub(crate) fn open(path: &Path, options: EmbeddedOptions) -> Result<Self> {
        let open_error =
            |reason: String| StorageError::Open { path: path.display().to_string(), reason };
        let mut builder = redb::Builder::new();
        builder.set_check_integrity_on_open(options.check_integrity_on_open);
        builder.set_cache_size(options.cache_bytes);
        // redb promises errors for damaged files with the integrity check on; the catch is a
        // second line so that no damaged file can take the process down.
        let opened =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| builder.create(path)))
                .map_err(|_| {
                    open_error("the engine panicked reading the file: it is damaged".into())
                })?;
        let db = opened.map_err(|e| open_error(e.to_string()))?;
        let version = init_tables(&db).map_err(|e| open_error(e.to_string()))?;
        let shared = Arc::new(Shared {
            db,
            queue: BatchQueue::new(Limits {
                len_max: options.queue_len_max,
                bytes_max: options.queue_bytes_max,
            }),
            committed: AtomicU64::new(version),
        });
        let writer = {
            let shared = shared.clone();
            let resolver =
                Resolver::new(version, options.history_len_max, options.history_writes_max);
            std::thread::Builder::new()
                .name("cellplane-storage-writer".into())
                .spawn(move || {
                    let batch = Limits {
                        len_max: options.batch_len_max,
                        bytes_max: options.batch_bytes_max,
                    };
                    write_loop(&shared, resolver, batch)
                })
                .map_err(|e| open_error(format!("cannot start the writer thread: {e}")))?
        };
        Ok(Self { shared, writer: Mutex::new(Some(writer)) })
    }

    /// Queues a transaction of blind writes (it reads nothing, so it never conflicts) behind
    /// every commit already queued, skipping the read-your-writes buffers of a [`Tx`]. The
    /// writes come back with `Full` when the queue holds its capacity, for the caller to retry
    /// in order.
    pub(crate) fn queue_blind(
        &self,
        writes: Vec<Write>,
    ) -> std::result::Result<oneshot::Receiver<Result<u64>>, PushError<Vec<Write>>> {
        let (reply, answer) = oneshot::channel();
        let bytes = writes.iter().map(Write::len).sum();
        let mutations = writes.into_iter().map(Mutation::from).collect();
        let request = CommitRequest { read_version: 0, reads: Vec::new(), mutations, reply };
        match self.shared.queue.push(request, bytes) {
            Ok(()) => Ok(answer),
            Err(PushError::Full(request)) => Err(PushError::Full(writes_of(request))),
            Err(PushError::Closed(request)) => Err(PushError::Closed(writes_of(request))),
        }
    }

    /// Commits waiting for the writer.
    pub(crate) fn queued(&self) -> usize {
        self.shared.queue.len()
    }

    /// Starts a transaction at the newest durable version.
    pub(crate) fn begin(&self) -> Result<Tx> {
        // Order matters: version first, then snapshot (see the module documentation).
        let read_version = self.shared.committed.load(Ordering::Acquire);
        let snapshot = self.shared.db.begin_read().map_err(engine)?;
        let table = snapshot.open_table(DATA).map_err(engine)?;
        Ok(Tx {
            shared: self.shared.clone(),
            state: Arc::new(Mutex::new(TxState {
                read_version,
                table: Some(table),
                overlay: BTreeMap::new(),
                cleared: Vec::new(),
                mutations: Vec::new(),
                reads: Vec::new(),
                bytes: 0,
            })),
        })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.queue.close();
        if let Some(writer) = lock(&self.writer).take() {
            // The writer only ends by draining the closed queue; a panic in it is already
            // reported to every waiting caller as a dropped reply.
            let _ = writer.join();
        }
    }
}

fn init_tables(db: &redb::Database) -> std::result::Result<u64, redb::Error> {
    let mut tx = db.begin_write()?;
    tx.set_durability(redb::Durability::Immediate)?;
    let version = {
        tx.open_table(DATA)?;
        let meta = tx.open_table(META)?;
        meta.get(META_VERSION)?.map(|v| v.value()).unwrap_or(0)
    };
    tx.commit()?;
    Ok(version)
}

/// The writer thread: one group commit per batch until the queue closes.
fn write_loop(shared: &Shared, mut resolver: Resolver, limits: Limits) {
    let mut batch = Vec::with_capacity(limits.len_max);
    while shared.queue.pop_batch(limits, &mut batch) {
        let started = std::time::Instant::now();
        let mut accepted = Vec::with_capacity(batch.len());
        let mut writes = Vec::new();
        let outcome = (|| -> std::result::Result<(), redb::Error> {
            let mut tx = shared.db.begin_write()?;
            tx.set_durability(redb::Durability::Immediate)?;
            {
                // Resolve every request first, then apply what was accepted in one pass.
                for request in batch.drain(..) {
                    let CommitRequest { read_version, reads, mutations, reply } = request;
                    if reads.is_empty() {
                        let version = resolver.handle_blind(mutations.iter().map(Mutation::write));
                        writes.extend(mutations);
                        accepted.push((reply, version));
                        continue;
                    }
                    match resolver.handle_commit(read_version, &reads) {
                        Verdict::Commit(version) => {
                            resolver.handle_writes(mutations.iter().map(Mutation::write).collect());
                            writes.extend(mutations);
                            accepted.push((reply, version));
                        }
                        Verdict::Conflict => {
                            let _ = reply.send(Err(StorageError::Conflict));
                        }
                        Verdict::TooOld { oldest } => {
                            let _ = reply.send(Err(StorageError::TransactionTooOld {
                                read_version,
                                oldest,
                            }));
                        }
                    }
                }
                apply(&mut tx.open_table(DATA)?, &writes)?;
                tx.open_table(META)?.insert(META_VERSION, resolver.version())?;
            }
            tx.commit()?;
            Ok(())
        })();
        metrics::histogram!("cellplane_storage_commit_seconds").record(started.elapsed());
        let label = if outcome.is_ok() { "ok" } else { "error" };
        metrics::counter!("cellplane_storage_commits_total", "outcome" => label).increment(1);
        match outcome {
            Ok(()) => {
                shared.committed.store(resolver.version(), Ordering::Release);
                for (reply, version) in accepted.drain(..) {
                    let _ = reply.send(Ok(version));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed");
                // Whether the fsync reached the disk is unknown: callers retry idempotently.
                for (reply, _) in accepted.drain(..) {
                    let _ = reply.send(Err(StorageError::CommitUnknownResult(e.to_string())));
                }
                // Requests of this batch not yet resolved get the same answer.
                for request in batch.drain(..) {
                    let _ =
                        request.reply.send(Err(StorageError::CommitUnknownResult(e.to_string())));
                }
            }
        }
    }
}

/// Applies the mutations of a batch's accepted transactions, given in commit order. Without range
/// clears, mutations of different keys commute, so they are applied in key order (a stable sort
/// keeps each key's own order): the B-tree then touches each page once instead of once per
/// scattered write.
fn apply(
    data: &mut redb::Table<&[u8], &[u8]>,
    mutations: &[Mutation],
) -> std::result::Result<(), redb::Error> {
    let mut ordered: Vec<&Mutation> = mutations.iter().collect();
    if !mutations.iter().any(|m| matches!(m, Mutation::ClearRange(..))) {
        ordered.sort_by(|a, b| a.key().cmp(b.key()));
    }
    for mutation in ordered {
        match mutation {
            Mutation::Set(key, value) => {
                data.insert(&**key, &**value)?;
            }
            Mutation::Clear(key) => {
                data.remove(&**key)?;
            }
            Mutation::ClearRange(begin, end) => {
                data.retain_in(&**begin..&**end, |_, _| false)?;
            }
            Mutation::Add(key, delta) => {
                let sum = add(data.get(&**key)?.as_ref().map(|v| v.value()), *delta);
                data.insert(&**key, &sum[..])?;
            }
        }
    }
    Ok(())
}

/// FoundationDB's ADD on a little-endian 64-bit integer: a missing value counts as zero, a
/// shorter one is zero-extended, a longer one is cut; the sum wraps.
fn add(base: Option<&[u8]>, delta: i64) -> [u8; 8] {
    decode_counter(base.unwrap_or_default()).wrapping_add(delta).to_le_bytes()
}

/// What a transaction has done to a key, for reading its own writes.
#[derive(Debug, Clone)]
enum Local {
    /// Set (`Some`) or cleared (`None`).
    Value(Option<Key>),
    /// An atomic add on top of whatever the store holds.
    Add(i64),
}

struct TxState {
    read_version: u64,
    /// The read snapshot; `None` once finished.
    table: Option<redb::ReadOnlyTable<&'static [u8], &'static [u8]>>,
    overlay: BTreeMap<Key, Local>,
    cleared: Vec<KeyRange>,
    mutations: Vec<Mutation>,
    reads: Vec<KeyRange>,
    /// Bytes of keys and values written, against [`TRANSACTION_BYTES_MAX`].
    bytes: usize,
}

/// An embedded transaction. Clones share one transaction.
#[derive(Clone)]
pub(crate) struct Tx {
    shared: Arc<Shared>,
    state: Arc<Mutex<TxState>>,
}

impl Tx {
    pub(crate) fn read_version(&self) -> u64 {
        lock(&self.state).read_version
    }

    pub(crate) fn get(&self, key: &[u8], snapshot: bool) -> Result<Option<Vec<u8>>> {
        let mut state = lock(&self.state);
        if !snapshot {
            state.reads.push(KeyRange::Key(key.into()));
        }
        let stored = |state: &TxState| -> Result<Option<Vec<u8>>> {
            let table = state.table.as_ref().ok_or(StorageError::Finished)?;
            Ok(table.get(key).map_err(engine)?.map(|v| v.value().to_vec()))
        };
        match state.overlay.get(key) {
            Some(Local::Value(value)) => Ok(value.as_deref().map(<[u8]>::to_vec)),
            Some(Local::Add(delta)) => Ok(Some(add(stored(&state)?.as_deref(), *delta).to_vec())),
            None if state.cleared.iter().any(|r| r.contains(key)) => Ok(None),
            None => stored(&state),
        }
    }

    pub(crate) fn get_range(&self, options: &RangeOptions) -> Result<RangeResult> {
        let mut state = lock(&self.state);
        let state = &mut *state;
        let table = state.table.as_ref().ok_or(StorageError::Finished)?;
        let (begin, end) = (options.begin.as_slice(), options.end.as_slice());

        // The stored rows the transaction has not overwritten or cleared.
        let overlay = &state.overlay;
        let cleared = &state.cleared;
        let raw = table.range(begin..end).map_err(engine)?;
        let raw: Box<dyn Iterator<Item = _>> =
            if options.reverse { Box::new(raw.rev()) } else { Box::new(raw) };
        let mut stored = raw
            .map(|row| row.map(|(k, v)| (k.value().to_vec(), v.value().to_vec())).map_err(engine))
            .filter(|row| match row {
                Ok((key, _)) => {
                    !overlay.contains_key(key.as_slice())
                        && !cleared.iter().any(|r| r.contains(key))
                }
                Err(_) => true,
            })
            .peekable();

        // The transaction's own rows in the range.
        let local = overlay.range::<[u8], _>((Bound::Included(begin), Bound::Excluded(end)));
        let local: Box<dyn Iterator<Item = _>> =
            if options.reverse { Box::new(local.rev()) } else { Box::new(local) };
        let mut own = local
            .filter_map(|(key, local)| match local {
                Local::Value(None) => None,
                Local::Value(Some(value)) => Some(Ok((key.to_vec(), value.to_vec()))),
                Local::Add(delta) => Some(table.get(&**key).map_err(engine).map(|base| {
                    (key.to_vec(), add(base.as_ref().map(|v| v.value()), *delta).to_vec())
                })),
            })
            .peekable();

        // Merge the two ordered streams up to the limit, peeking once more to learn if there is
        // more. Keys never repeat: stored rows under the overlay were filtered out above.
        let mut rows = Vec::new();
        let more = loop {
            let take_own = match (stored.peek(), own.peek()) {
                (None, None) => break false,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some(Ok((s, _))), Some(Ok((o, _)))) => (o < s) != options.reverse,
                (Some(Err(_)), _) => false,
                (_, Some(Err(_))) => true,
            };
            if rows.len() == options.limit {
                break true;
            }
            let next = if take_own { own.next() } else { stored.next() };
            match next {
                Some(Ok(row)) => rows.push(row),
                Some(Err(e)) => return Err(e),
                None => break false,
            }
        };
        drop((stored, own));

        if !options.snapshot {
            // What was read: the whole range, or up to the last row when the limit cut it.
            let read = match (more, rows.last()) {
                (true, Some((last, _))) if options.reverse => {
                    KeyRange::Range { begin: last[..].into(), end: end.into() }
                }
                (true, Some((last, _))) => {
                    KeyRange::Range { begin: begin.into(), end: key_after(last).into() }
                }
                _ => KeyRange::Range { begin: begin.into(), end: end.into() },
            };
            state.reads.push(read);
        }
        Ok(RangeResult { rows, more })
    }

    pub(crate) fn set(&self, key: &[u8], value: &[u8]) -> Result<()> {
        let mut state = self.writable(key.len() + value.len())?;
        let key: Key = key.into();
        state.overlay.insert(key.clone(), Local::Value(Some(value.into())));
        state.mutations.push(Mutation::Set(key, value.to_vec()));
        Ok(())
    }

    pub(crate) fn clear(&self, key: &[u8]) -> Result<()> {
        let mut state = self.writable(key.len())?;
        let key: Key = key.into();
        state.overlay.insert(key.clone(), Local::Value(None));
        state.mutations.push(Mutation::Clear(key));
        Ok(())
    }

    pub(crate) fn clear_range(&self, begin: &[u8], end: &[u8]) -> Result<()> {
        let mut state = self.writable(begin.len() + end.len())?;
        state.overlay.retain(|key, _| **key < *begin || **key >= *end);
        let (begin, end): (Key, Key) = (begin.into(), end.into());
        state.cleared.push(KeyRange::Range { begin: begin.clone(), end: end.clone() });
        state.mutations.push(Mutation::ClearRange(begin, end));
        Ok(())
    }

    pub(crate) fn atomic_add(&self, key: &[u8], delta: i64) -> Result<()> {
        let mut state = self.writable(key.len() + 8)?;
        let cleared = state.cleared.iter().any(|r| r.contains(key));
        let next = match state.overlay.get(key) {
            Some(Local::Value(value)) => {
                Local::Value(Some(add(value.as_deref(), delta)[..].into()))
            }
            Some(Local::Add(before)) => Local::Add(before.wrapping_add(delta)),
            None if cleared => Local::Value(Some(add(None, delta)[..].into())),
            None => Local::Add(delta),
        };
        let key: Key = key.into();
        state.overlay.insert(key.clone(), next);
        state.mutations.push(Mutation::Add(key, delta));
        Ok(())
    }

    /// Locks the state for a write of `len` bytes: refused once finished or over the cap.
    fn writable(&self, len: usize) -> Result<MutexGuard<'_, TxState>> {
        let mut state = lock(&self.state);
        if state.table.is_none() {
            return Err(StorageError::Finished);
        }
        let bytes = state.bytes.saturating_add(len);
        if bytes > TRANSACTION_BYTES_MAX {
            return Err(StorageError::TransactionTooLarge { bytes, max: TRANSACTION_BYTES_MAX });
        }
        state.bytes = bytes;
        Ok(state)
    }

    pub(crate) async fn commit(&self) -> Result<u64> {
        let (request, answer, bytes) = {
            let mut state = lock(&self.state);
            if state.table.take().is_none() {
                return Err(StorageError::Finished);
            }
            if state.mutations.is_empty() {
                // A read-only transaction commits at its read version, as in FoundationDB.
                return Ok(state.read_version);
            }
            let (reply, answer) = oneshot::channel();
            let request = CommitRequest {
                read_version: state.read_version,
                reads: std::mem::take(&mut state.reads),
                mutations: std::mem::take(&mut state.mutations),
                reply,
            };
            (request, answer, state.bytes)
        };
        match self.shared.queue.push(request, bytes) {
            Ok(()) => {}
            Err(PushError::Full(_)) => {
                return Err(StorageError::Overloaded { queued: self.shared.queue.len() });
            }
            Err(PushError::Closed(_)) => return Err(StorageError::Closed),
        }
        // A dropped reply means the writer died mid-batch: the outcome is unknown.
        answer
            .await
            .unwrap_or_else(|_| Err(StorageError::CommitUnknownResult("the writer stopped".into())))
    }

    pub(crate) fn cancel(&self) {
        lock(&self.state).table = None;
    }
}

fn engine(e: impl Into<redb::Error>) -> StorageError {
    StorageError::Engine(e.into().to_string())
}

/// Locks a mutex whose data stays consistent across a panic (each operation is one update).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// The data file inside a store directory.
pub(crate) fn data_file(dir: &Path) -> PathBuf {
    dir.join("cellplane.redb")
}
