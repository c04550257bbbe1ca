//! The storage crate's one error type.

/// Why a storage operation failed. [`StorageError::is_retryable`] says which ones a retry loop
/// may try again.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// A key the transaction read was changed by a commit after its read version.
    #[error("transaction conflict: a key it read was written after its read version")]
    Conflict,
    /// The transaction's read version is older than the conflict history the store keeps.
    #[error(
        "transaction too old: its read version {read_version} predates the conflict history (oldest {oldest})"
    )]
    TransactionTooOld {
        /// The transaction's read version.
        read_version: u64,
        /// The oldest read version the store can still check.
        oldest: u64,
    },
    /// The commit may or may not have happened (the engine failed during the durable write).
    #[error("commit result unknown: {0}")]
    CommitUnknownResult(String),
    /// The committer's queue is full: back off and retry.
    #[error("storage overloaded: {queued} commits queued")]
    Overloaded {
        /// Commits queued at the time.
        queued: usize,
    },
    /// A transient failure of the backend (a FoundationDB process behind, throttled, recovering).
    #[error("storage temporarily unavailable: {0}")]
    Unavailable(String),
    /// A key longer than [`crate::KEY_LEN_MAX`].
    #[error("key of {len} bytes exceeds the cap of {max}")]
    KeyTooLarge {
        /// The key's length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// A value longer than [`crate::VALUE_LEN_MAX`].
    #[error("value of {len} bytes exceeds the cap of {max}")]
    ValueTooLarge {
        /// The value's length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// A transaction whose writes exceed [`crate::TRANSACTION_BYTES_MAX`].
    #[error("transaction of {bytes} bytes exceeds the cap of {max}")]
    TransactionTooLarge {
        /// Bytes written so far.
        bytes: usize,
        /// The cap.
        max: usize,
    },
    /// A range whose begin is after its end, or a limit of zero.
    #[error("invalid range: {0}")]
    InvalidRange(&'static str),
    /// A key outside the subspace a scoped handle is confined to.
    #[error("key outside the subspace")]
    OutsideSubspace,
    /// A stored key that does not decode as the expected tuple.
    #[error("key does not decode as a tuple: {0}")]
    BadTuple(String),
    /// A stored value that does not decode as the record its key names: written by something
    /// else, or damaged.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The transaction was already committed or cancelled.
    #[error("transaction already finished")]
    Finished,
    /// The retry loop gave up.
    #[error("gave up after {attempts} attempts; last error: {last}")]
    RetriesExhausted {
        /// Attempts made.
        attempts: u32,
        /// The last retryable error.
        last: Box<StorageError>,
    },
    /// The data files could not be opened: missing, corrupt, truncated or locked.
    #[error("cannot open store at {path}: {reason}")]
    Open {
        /// The data file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The engine failed (IO error, corruption found while reading).
    #[error("storage engine error: {0}")]
    Engine(String),
    /// The store was closed.
    #[error("store closed")]
    Closed,
}

impl StorageError {
    /// Whether retrying the whole transaction may succeed.
    ///
    /// `CommitUnknownResult` is retryable only for idempotent transactions: every cellplane write
    /// carries an idempotency key for exactly this reason.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Conflict
                | Self::TransactionTooOld { .. }
                | Self::CommitUnknownResult(_)
                | Self::Overloaded { .. }
                | Self::Unavailable(_)
        )
    }
}

/// Storage results.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
