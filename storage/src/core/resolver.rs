//! Conflict resolution: the rule that gives many concurrent transactions FoundationDB's
//! serializable semantics.
//!
//! Protocol: a transaction reads at a read version `r` and records the key ranges it read. At
//! commit, the resolver checks those ranges against the write ranges of every transaction
//! committed at a version `> r`. Any overlap means another commit changed what this one read:
//! `Conflict`. Otherwise the transaction is given the next version and its write ranges join the
//! history. The history is bounded: once it holds [`Resolver::history_len_max`] commits the
//! oldest are forgotten, and a read version older than what is remembered gets `TooOld` (the
//! resolver can no longer prove it safe). Versions only grow.
//!
//! Invariant: a transaction is accepted only if no write committed after its read version
//! overlaps any range it read. That is what makes every accepted history equal to a serial one,
//! in commit-version order.

use std::collections::VecDeque;

/// A half-open key range `[begin, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    /// First key in the range.
    pub begin: Vec<u8>,
    /// First key after the range.
    pub end: Vec<u8>,
}

impl KeyRange {
    /// The range holding exactly `key`.
    pub fn single(key: &[u8]) -> Self {
        let mut end = Vec::with_capacity(key.len() + 1);
        end.extend_from_slice(key);
        end.push(0);
        Self {
            begin: key.to_vec(),
            end,
        }
    }

    /// Whether the two ranges share a key.
    pub fn overlaps(&self, other: &KeyRange) -> bool {
        self.begin < other.end && other.begin < self.end
    }
}

/// The resolver's verdict on one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted: this is its commit version.
    Commit(u64),
    /// A range it read was written after its read version.
    Conflict,
    /// Its read version is older than the history remembers.
    TooOld {
        /// The oldest read version still checkable.
        oldest: u64,
    },
}

/// The conflict history and the version counter.
#[derive(Debug)]
pub struct Resolver {
    /// The newest version handed out.
    version: u64,
    /// Read versions below this can no longer be checked.
    oldest: u64,
    /// `(commit version, write ranges)`, oldest first.
    history: VecDeque<(u64, Vec<KeyRange>)>,
    history_len_max: usize,
}

impl Resolver {
    /// A resolver whose last committed version is `version` (from durable storage), remembering
    /// at most `history_len_max` commits.
    pub fn new(version: u64, history_len_max: usize) -> Self {
        assert!(
            history_len_max > 0,
            "a resolver must remember at least one commit"
        );
        Self {
            version,
            oldest: version,
            history: VecDeque::new(),
            history_len_max,
        }
    }

    /// The newest version handed out.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// How many commits the history remembers at most.
    pub fn history_len_max(&self) -> usize {
        self.history_len_max
    }

    /// Checks a transaction that read `reads` at `read_version` and wants to write `writes`; if
    /// accepted, records its writes under a new version and returns it.
    pub fn handle_commit(
        &mut self,
        read_version: u64,
        reads: &[KeyRange],
        writes: Vec<KeyRange>,
    ) -> Verdict {
        if !reads.is_empty() {
            if read_version < self.oldest {
                return Verdict::TooOld {
                    oldest: self.oldest,
                };
            }
            // Newest first: recent commits are the likeliest to conflict.
            for (version, written) in self.history.iter().rev() {
                if *version <= read_version {
                    break;
                }
                if written.iter().any(|w| reads.iter().any(|r| r.overlaps(w))) {
                    return Verdict::Conflict;
                }
            }
        }
        self.version += 1;
        if self.history.len() == self.history_len_max
            && let Some((forgotten, _)) = self.history.pop_front()
        {
            self.oldest = forgotten;
        }
        self.history.push_back((self.version, writes));
        Verdict::Commit(self.version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(begin: &str, end: &str) -> KeyRange {
        KeyRange {
            begin: begin.into(),
            end: end.into(),
        }
    }

    #[test]
    fn overlap_is_half_open() {
        assert!(range("a", "c").overlaps(&range("b", "d")));
        assert!(!range("a", "b").overlaps(&range("b", "c")));
        assert!(KeyRange::single(b"k").overlaps(&range("k", "l")));
        assert!(!KeyRange::single(b"k").overlaps(&range("k\0", "l")));
    }

    #[test]
    fn a_write_after_the_read_version_conflicts() {
        let mut r = Resolver::new(10, 100);
        assert_eq!(
            r.handle_commit(10, &[], vec![KeyRange::single(b"x")]),
            Verdict::Commit(11)
        );
        // Read x at 10, x written at 11: conflict.
        assert_eq!(
            r.handle_commit(10, &[KeyRange::single(b"x")], vec![]),
            Verdict::Conflict
        );
        // Read x at 11: saw that write; fine.
        assert_eq!(
            r.handle_commit(11, &[KeyRange::single(b"x")], vec![]),
            Verdict::Commit(12)
        );
        // Read y at 10: untouched; fine.
        assert_eq!(
            r.handle_commit(10, &[KeyRange::single(b"y")], vec![]),
            Verdict::Commit(13)
        );
    }

    #[test]
    fn range_reads_conflict_with_writes_inside_them() {
        let mut r = Resolver::new(0, 100);
        r.handle_commit(0, &[], vec![KeyRange::single(b"m")]);
        assert_eq!(
            r.handle_commit(0, &[range("a", "z")], vec![]),
            Verdict::Conflict
        );
        assert_eq!(
            r.handle_commit(0, &[range("n", "z")], vec![]),
            Verdict::Commit(2)
        );
    }

    #[test]
    fn forgotten_history_makes_old_readers_too_old() {
        let mut r = Resolver::new(0, 2);
        for _ in 0..3 {
            r.handle_commit(r.version(), &[], vec![KeyRange::single(b"k")]);
        }
        assert_eq!(
            r.handle_commit(0, &[KeyRange::single(b"q")], vec![]),
            Verdict::TooOld { oldest: 1 }
        );
        // Blind writes need no history.
        assert_eq!(
            r.handle_commit(0, &[], vec![KeyRange::single(b"q")]),
            Verdict::Commit(4)
        );
    }
}
