//! Fencing: every cell incarnation has an epoch, stored in its keyspace and bumped on every
//! recovery. Every assignment carries the epoch of the incarnation that made it; a host refuses
//! an assignment older than the newest epoch it has seen. So a replica slot never runs on two
//! hosts at once, even when an old incarnation is still talking after a failover.

use serde::{Deserialize, Serialize};

/// A cell incarnation's number. Strictly increases across restarts.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch of the next incarnation.
    pub fn next(self) -> Epoch {
        // An epoch is bumped once per cell restart; u64 does not run out.
        Epoch(self.0.checked_add(1).expect("cell epoch overflow: u64 restarts"))
    }

    /// Whether a host that has seen `self` accepts an assignment made in `assignment`.
    pub fn admits(self, assignment: Epoch) -> bool {
        assignment >= self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn older_epochs_are_fenced_off() {
        let seen = Epoch(5);
        assert!(seen.admits(Epoch(5)));
        assert!(seen.admits(Epoch(6)));
        assert!(!seen.admits(Epoch(4)));
        assert_eq!(Epoch(4).next(), Epoch(5));
    }
}
