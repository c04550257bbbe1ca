//! The transport's one error type.

use cellplane_api::wire::{ErrorReply, WireError};

/// Why a transport operation failed. [`TransportError::is_retryable`] says which ones the caller
/// may retry (with its own idempotency key).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Bad configuration: certificates, keys, addresses.
    #[error("transport configuration: {0}")]
    Config(String),
    /// A certificate that names no valid cellplane identity.
    #[error("bad peer identity: {0}")]
    BadIdentity(String),
    /// The peer is authenticated but not allowed here (for example a client posing as a host).
    #[error("peer {peer} refused: {reason}")]
    Refused {
        /// Who the peer said it was.
        peer: String,
        /// Why it was refused.
        reason: String,
    },
    /// Connecting failed (unreachable, TLS handshake refused, wrong CA, expired certificate).
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The address.
        addr: String,
        /// What went wrong.
        reason: String,
    },
    /// No connection to the peer right now; a reconnection is under way.
    #[error("peer unavailable: {0}")]
    Unavailable(String),
    /// The connection died with the request in flight: it may or may not have been handled.
    #[error("connection lost: {0}")]
    ConnectionLost(String),
    /// No answer within the deadline.
    #[error("no answer within {deadline_ms} ms")]
    DeadlineExceeded {
        /// The deadline.
        deadline_ms: u64,
    },
    /// The peer answered with a typed refusal.
    #[error("peer answered {:?}: {}", .0.code, .0.detail)]
    Remote(ErrorReply),
    /// A message that cannot be encoded or a frame that cannot be decoded.
    #[error("wire: {0}")]
    Wire(#[from] WireError),
    /// The stream or connection was closed by this side.
    #[error("closed")]
    Closed,
}

impl TransportError {
    /// Whether retrying may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Unavailable(_) | Self::ConnectionLost(_) | Self::DeadlineExceeded { .. }
        )
    }
}
