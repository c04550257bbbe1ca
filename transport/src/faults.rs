//! The fault-injection seam for the chaos harness: every frame a connection sends passes through
//! [`Faults::on_send`] when faults are installed, so tests can drop, delay (and so reorder),
//! duplicate or partition traffic per peer without touching the transport's code. Without faults
//! installed the send path pays one branch on an `Option`.

use std::time::Duration;

use crate::identity::Identity;

/// What happens to one outgoing frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Send it.
    Deliver,
    /// Lose it.
    Drop,
    /// Send it twice.
    Duplicate,
    /// Send it after a while (later frames may overtake it).
    Delay(Duration),
}

/// Decides the fate of each outgoing frame.
pub trait Faults: Send + Sync + 'static {
    /// The fate of a frame of `len` bytes to `peer`, for logical `address`.
    fn on_send(&self, peer: &Identity, address: u64, len: usize) -> Fate;
}
