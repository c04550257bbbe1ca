//! Conflict resolution: the rule that gives many concurrent transactions FoundationDB's
//! serializable semantics.
//!
//! Protocol: a transaction reads at a read version `r` and records the keys and ranges it read.
//! At commit, [`Resolver::handle_commit`] checks those against the writes of every transaction
//! committed at a version `> r`. Any overlap means another commit changed what this one read:
//! `Conflict`. Otherwise the transaction gets the next version, and its writes must be handed in
//! with [`Resolver::handle_writes`] before the next commit is checked (so that transactions of
//! one batch are checked against each other too). The history is bounded: once it holds
//! `history_len_max` commits the oldest are forgotten, and a read version older than what is
//! remembered gets `TooOld` (the resolver can no longer prove it safe). Versions only grow.
//!
//! Invariant: a transaction is accepted only if no write committed after its read version
//! overlaps anything it read. That makes every accepted history equal to a serial one, in
//! commit-version order.

use std::collections::VecDeque;
use std::sync::Arc;

/// A key, shared between a transaction's buffers and the history without copying.
pub type Key = Arc<[u8]>;

/// A key or a half-open key range `[begin, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyRange {
    /// Exactly one key.
    Key(Key),
    /// Every key from `begin` up to, not including, `end`.
    Range {
        /// First key in the range.
        begin: Key,
        /// First key after the range.
        end: Key,
    },
}

impl KeyRange {
    /// Whether `key` lies in this range.
    pub fn contains(&self, key: &[u8]) -> bool {
        match self {
            KeyRange::Key(k) => **k == *key,
            KeyRange::Range { begin, end } => **begin <= *key && *key < **end,
        }
    }

    /// Whether the two share a key.
    pub fn overlaps(&self, other: &KeyRange) -> bool {
        match (self, other) {
            (KeyRange::Key(k), range) | (range, KeyRange::Key(k)) => range.contains(k),
            (KeyRange::Range { begin: b1, end: e1 }, KeyRange::Range { begin: b2, end: e2 }) => {
                b1 < e1 && b2 < e2 && b1 < e2 && b2 < e1
            }
        }
    }
}

/// The resolver's verdict on one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Accepted: this is its commit version. Its writes are due next.
    Commit(u64),
    /// Something it read was written after its read version.
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
    /// `(commit version, writes)`, oldest first.
    history: VecDeque<(u64, Vec<KeyRange>)>,
    history_len_max: usize,
    /// Writes held in `history`, against `history_writes_max`.
    history_writes: usize,
    history_writes_max: usize,
    /// A version accepted whose writes have not been handed in yet.
    awaiting_writes: Option<u64>,
    /// Whether the newest history entry holds blind commits that the next one may join.
    blind_open: bool,
}

impl Resolver {
    /// A resolver whose last committed version is `version` (from durable storage), remembering
    /// at most `history_len_max` commits and `history_writes_max` written keys and ranges.
    pub fn new(version: u64, history_len_max: usize, history_writes_max: usize) -> Self {
        assert!(history_len_max > 0, "a resolver must remember at least one commit");
        Self {
            version,
            oldest: version,
            history: VecDeque::new(),
            history_len_max,
            history_writes: 0,
            history_writes_max,
            awaiting_writes: None,
            blind_open: false,
        }
    }

    /// The newest version handed out.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Checks a transaction that read `reads` at `read_version`.
    pub fn handle_commit(&mut self, read_version: u64, reads: &[KeyRange]) -> Verdict {
        assert!(
            self.awaiting_writes.is_none(),
            "resolver: writes of version {:?} never handed in",
            self.awaiting_writes
        );
        if !reads.is_empty() {
            if read_version < self.oldest {
                return Verdict::TooOld { oldest: self.oldest };
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
        self.awaiting_writes = Some(self.version);
        Verdict::Commit(self.version)
    }

    /// Accepts a transaction that read nothing (it cannot conflict) and records its writes.
    /// Consecutive blind commits share one history entry (up to a 64th of the writes the
    /// history holds), stamped with the newest of their versions: a reader between two of them
    /// may see a false conflict, never a missed one, and the history keeps its reach under a
    /// stream of tiny commits.
    pub fn handle_blind(&mut self, writes: impl IntoIterator<Item = KeyRange>) -> u64 {
        assert!(
            self.awaiting_writes.is_none(),
            "resolver: writes of version {:?} never handed in",
            self.awaiting_writes
        );
        self.version += 1;
        let shared = self.history_writes_max / 64;
        let open = self.blind_open && self.history.back().is_some_and(|(_, w)| w.len() < shared);
        if !open {
            self.history.push_back((self.version, Vec::new()));
        }
        if let Some((version, written)) = self.history.back_mut() {
            let before = written.len();
            written.extend(writes);
            *version = self.version;
            self.history_writes += written.len() - before;
        }
        self.blind_open = true;
        self.forget();
        self.version
    }

    /// Records the writes of the transaction just accepted.
    pub fn handle_writes(&mut self, writes: Vec<KeyRange>) {
        let version = self
            .awaiting_writes
            .take()
            .expect("resolver: writes handed in without an accepted commit");
        self.history_writes += writes.len();
        self.history.push_back((version, writes));
        self.blind_open = false;
        self.forget();
    }

    /// Forgets the oldest commits past either cap, always keeping the newest.
    fn forget(&mut self) {
        while self.history.len() > 1
            && (self.history.len() > self.history_len_max
                || self.history_writes > self.history_writes_max)
            && let Some((forgotten, writes)) = self.history.pop_front()
        {
            self.history_writes -= writes.len();
            self.oldest = forgotten;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> KeyRange {
        KeyRange::Key(k.as_bytes().into())
    }

    fn range(begin: &str, end: &str) -> KeyRange {
        KeyRange::Range { begin: begin.as_bytes().into(), end: end.as_bytes().into() }
    }

    fn commit(
        r: &mut Resolver,
        read_version: u64,
        reads: &[KeyRange],
        writes: Vec<KeyRange>,
    ) -> Verdict {
        let verdict = r.handle_commit(read_version, reads);
        if let Verdict::Commit(_) = verdict {
            r.handle_writes(writes);
        }
        verdict
    }

    #[test]
    fn overlap_is_half_open_and_empty_ranges_hold_nothing() {
        assert!(range("a", "c").overlaps(&range("b", "d")));
        assert!(!range("a", "b").overlaps(&range("b", "c")));
        assert!(key("k").overlaps(&range("k", "l")));
        assert!(!key("l").overlaps(&range("k", "l")));
        assert!(key("k").overlaps(&key("k")));
        assert!(!key("k").overlaps(&key("k\0")));
        assert!(!range("m", "m").overlaps(&range("a", "z")));
    }

    #[test]
    fn blind_commits_share_an_entry_and_still_conflict_with_readers_before_them() {
        let mut r = Resolver::new(10, 100, 6_400);
        assert_eq!(r.handle_blind([key("a")]), 11);
        assert_eq!(r.handle_blind([key("b")]), 12);
        assert_eq!(r.history.len(), 1, "consecutive blind commits share one entry");
        // Read before both: conflicts on either; read after both: on neither.
        assert_eq!(commit(&mut r, 10, &[key("a")], vec![]), Verdict::Conflict);
        assert_eq!(commit(&mut r, 10, &[key("b")], vec![]), Verdict::Conflict);
        assert_eq!(commit(&mut r, 12, &[key("a"), key("b")], vec![key("c")]), Verdict::Commit(13));
        // A commit with reads ends the shared entry.
        assert_eq!(r.handle_blind([key("d")]), 14);
        assert_eq!(r.history.len(), 3);
        assert_eq!(commit(&mut r, 13, &[key("d")], vec![]), Verdict::Conflict);
        assert_eq!(commit(&mut r, 13, &[key("c")], vec![]), Verdict::Commit(15));
    }

    #[test]
    fn a_stream_of_blind_commits_stays_within_the_caps() {
        let mut r = Resolver::new(0, 1_000, 640);
        for i in 0..10_000u32 {
            r.handle_blind([KeyRange::Key(i.to_be_bytes().as_slice().into())]);
        }
        assert!(r.history_writes <= 640, "{} writes held", r.history_writes);
        assert!(r.history.len() > 1, "entries close so the oldest can be forgotten");
        // What was forgotten can no longer be checked; what is held still conflicts.
        assert!(matches!(r.handle_commit(5, &[key("x")]), Verdict::TooOld { .. }));
        let recent = KeyRange::Key(9_999u32.to_be_bytes().as_slice().into());
        assert_eq!(r.handle_commit(9_990, &[recent]), Verdict::Conflict);
    }

    #[test]
    fn a_write_after_the_read_version_conflicts() {
        let mut r = Resolver::new(10, 100, 1_000);
        assert_eq!(commit(&mut r, 10, &[], vec![key("x")]), Verdict::Commit(11));
        assert_eq!(commit(&mut r, 10, &[key("x")], vec![]), Verdict::Conflict);
        assert_eq!(commit(&mut r, 11, &[key("x")], vec![]), Verdict::Commit(12));
        assert_eq!(commit(&mut r, 10, &[key("y")], vec![]), Verdict::Commit(13));
    }

    #[test]
    fn range_reads_conflict_with_writes_inside_them() {
        let mut r = Resolver::new(0, 100, 1_000);
        commit(&mut r, 0, &[], vec![key("m")]);
        assert_eq!(commit(&mut r, 0, &[range("a", "z")], vec![]), Verdict::Conflict);
        assert_eq!(commit(&mut r, 0, &[range("n", "z")], vec![]), Verdict::Commit(2));
    }

    #[test]
    fn forgotten_history_makes_old_readers_too_old() {
        let mut r = Resolver::new(0, 2, 1_000);
        for _ in 0..3 {
            let v = r.version();
            commit(&mut r, v, &[], vec![key("k")]);
        }
        assert_eq!(commit(&mut r, 0, &[key("q")], vec![]), Verdict::TooOld { oldest: 1 });
        assert_eq!(commit(&mut r, 1, &[key("q")], vec![]), Verdict::Commit(4));
        // Blind writes need no history.
        assert_eq!(commit(&mut r, 0, &[], vec![key("q")]), Verdict::Commit(5));
    }

    #[test]
    fn history_is_bounded_by_written_keys_too() {
        let mut r = Resolver::new(0, 1_000, 3);
        commit(&mut r, 0, &[], vec![key("a"), key("b")]);
        commit(&mut r, 1, &[], vec![key("c"), key("d")]);
        // Four keys held > 3: version 1 is forgotten, so a reader at 0 is too old.
        assert_eq!(commit(&mut r, 0, &[key("z")], vec![]), Verdict::TooOld { oldest: 1 });
        assert_eq!(commit(&mut r, 1, &[key("c")], vec![]), Verdict::Conflict);
    }

    #[test]
    #[should_panic(expected = "never handed in")]
    fn forgetting_the_writes_of_an_accepted_commit_is_a_bug() {
        let mut r = Resolver::new(0, 10, 1_000);
        r.handle_commit(0, &[]);
        r.handle_commit(0, &[]);
    }
}
