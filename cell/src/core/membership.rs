//! Membership: which hosts a cell has, and whether each is alive.
//!
//! Protocol (pure: time comes in as `now_ms`, events go out through [`Membership::poll_event`]):
//! - a host registers ([`Membership::handle_register`]) and is `Joining` until its first
//!   heartbeat makes it `Ready`;
//! - each heartbeat renews the host's lease. Heartbeats carry a sequence number: one not newer
//!   than the last seen is a duplicate or arrived out of order and changes nothing;
//! - [`Membership::handle_tick`] moves a host whose last heartbeat is older than
//!   `suspect_after_ms` to `Suspect` (it takes nothing new, keeps what it has) and one older than
//!   `down_after_ms` to `Down` (its replicas are placed elsewhere);
//! - a heartbeat from a `Suspect` or `Down` host makes it `Ready` again: it is reconciled, not
//!   re-registered;
//! - `Draining` is set by an operator and survives heartbeats; lease expiry still takes a draining
//!   host down.
//!
//! Cost: lease deadlines live in an ordered index, so a heartbeat is O(log n) and a tick touches
//! only hosts whose deadline passed — never a scan of 100,000 hosts.

use std::collections::{BTreeSet, HashMap, VecDeque};

use cellplane_api::wire::Heartbeat;
use cellplane_api::{Host, HostId, HostState};

/// Lease timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseConfig {
    /// Silence after which a host is suspect.
    pub suspect_after_ms: u64,
    /// Silence after which a host is down.
    pub down_after_ms: u64,
}

impl Default for LeaseConfig {
    fn default() -> Self {
        // With 1 s heartbeats: one and a half intervals of silence make a host suspect, two
        // and a half (two missed beats, with half an interval for jitter) make it down. With a
        // 250 ms tick, a dead host is down within 2.75 s of its last heartbeat.
        Self { suspect_after_ms: 1_500, down_after_ms: 2_500 }
    }
}

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A host's state changed.
    StateChanged {
        /// The host.
        host: HostId,
        /// Its state before.
        from: HostState,
        /// Its state now.
        to: HostState,
    },
}

/// Why an input was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembershipError {
    /// A heartbeat or command for a host that never registered.
    #[error("unknown host {0:?}")]
    UnknownHost(HostId),
    /// The cell holds as many hosts as it may.
    #[error("cell full: {0} hosts")]
    Full(usize),
}

#[derive(Debug)]
struct Member {
    host: Host,
    last_seq: u64,
    last_seen_ms: u64,
}

/// The membership core of one cell (or one shard of it).
#[derive(Debug)]
pub struct Membership {
    config: LeaseConfig,
    hosts_max: usize,
    members: HashMap<HostId, Member>,
    /// `(next deadline, host)` for every host not yet down.
    deadlines: BTreeSet<(u64, HostId)>,
    events: VecDeque<Event>,
}

impl Membership {
    /// An empty membership holding at most `hosts_max` hosts.
    pub fn new(config: LeaseConfig, hosts_max: usize) -> Self {
        assert!(config.suspect_after_ms < config.down_after_ms, "suspect must come before down");
        Self {
            config,
            hosts_max,
            members: HashMap::new(),
            deadlines: BTreeSet::new(),
            events: VecDeque::new(),
        }
    }

    /// Registers `host` (or updates a registered one's record, keeping its state).
    pub fn handle_register(&mut self, now_ms: u64, host: Host) -> Result<(), MembershipError> {
        if let Some(member) = self.members.get_mut(&host.id) {
            let state = member.host.state;
            member.host = Host { state, ..host };
            return Ok(());
        }
        if self.members.len() >= self.hosts_max {
            return Err(MembershipError::Full(self.members.len()));
        }
        let id = host.id;
        let host = Host { state: HostState::Joining, ..host };
        self.members.insert(id, Member { host, last_seq: 0, last_seen_ms: now_ms });
        self.deadlines.insert((now_ms + self.config.suspect_after_ms, id));
        Ok(())
    }

    /// A host read back from storage when the cell (or this shard) starts: `Joining`, with
    /// its first lease starting `grace_ms` from now, so that hosts have time to notice the
    /// restart and reconnect before anything is moved off them.
    pub fn handle_restore(
        &mut self,
        now_ms: u64,
        grace_ms: u64,
        host: Host,
    ) -> Result<(), MembershipError> {
        self.handle_register(now_ms + grace_ms, host)
    }

    /// Renews a host's lease.
    pub fn handle_heartbeat(
        &mut self,
        now_ms: u64,
        beat: &Heartbeat,
    ) -> Result<(), MembershipError> {
        let member =
            self.members.get_mut(&beat.host).ok_or(MembershipError::UnknownHost(beat.host))?;
        if beat.seq <= member.last_seq {
            return Ok(()); // duplicate or reordered
        }
        let old_deadline = deadline(&self.config, member);
        member.last_seq = beat.seq;
        member.last_seen_ms = now_ms.max(member.last_seen_ms);
        if let Some(old) = old_deadline {
            self.deadlines.remove(&(old, beat.host));
        }
        let to = match member.host.state {
            HostState::Draining => HostState::Draining,
            _ => HostState::Ready,
        };
        set_state(&mut self.events, member, to);
        if let Some(next) = deadline(&self.config, member) {
            self.deadlines.insert((next, beat.host));
        }
        Ok(())
    }

    /// Expires leases whose deadline is at or before `now_ms`.
    pub fn handle_tick(&mut self, now_ms: u64) {
        while let Some(&(due, id)) = self.deadlines.first() {
            if due > now_ms {
                break;
            }
            self.deadlines.pop_first();
            let Some(member) = self.members.get_mut(&id) else { continue };
            let silent_ms = now_ms.saturating_sub(member.last_seen_ms);
            let to = if silent_ms >= self.config.down_after_ms {
                HostState::Down
            } else {
                // Only joining and ready hosts have a deadline before the down time.
                HostState::Suspect
            };
            set_state(&mut self.events, member, to);
            if let Some(next) = deadline(&self.config, member) {
                self.deadlines.insert((next, id));
            }
        }
    }

    /// Marks a host draining (`true`) or returns it to service (`false`).
    pub fn handle_drain(&mut self, host: HostId, drain: bool) -> Result<(), MembershipError> {
        let member = self.members.get_mut(&host).ok_or(MembershipError::UnknownHost(host))?;
        let to = match (drain, member.host.state) {
            (_, HostState::Down) => HostState::Down,
            (true, _) => HostState::Draining,
            (false, HostState::Draining) => HostState::Ready,
            (false, state) => state,
        };
        let old = deadline(&self.config, member);
        set_state(&mut self.events, member, to);
        let new = deadline(&self.config, member);
        if old != new {
            if let Some(old) = old {
                self.deadlines.remove(&(old, host));
            }
            if let Some(new) = new {
                self.deadlines.insert((new, host));
            }
        }
        Ok(())
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Every host's record, its state included.
    pub fn hosts(&self) -> impl Iterator<Item = &Host> + '_ {
        self.members.values().map(|m| &m.host)
    }

    /// One host's record, with its current state.
    pub fn host(&self, id: HostId) -> Option<&Host> {
        self.members.get(&id).map(|m| &m.host)
    }

    /// How many hosts are in each state: joining, ready, suspect, down, draining.
    pub fn counts(&self) -> [usize; 5] {
        let mut counts = [0; 5];
        for member in self.members.values() {
            counts[state_index(member.host.state)] += 1;
        }
        counts
    }
}

/// The next instant at which `member` changes state if it stays silent; `None` once down.
/// Suspect and draining hosts go down next; joining and ready hosts go suspect next.
fn deadline(config: &LeaseConfig, member: &Member) -> Option<u64> {
    match member.host.state {
        HostState::Down => None,
        HostState::Suspect | HostState::Draining => {
            Some(member.last_seen_ms + config.down_after_ms)
        }
        HostState::Joining | HostState::Ready => {
            Some(member.last_seen_ms + config.suspect_after_ms)
        }
    }
}

fn set_state(events: &mut VecDeque<Event>, member: &mut Member, to: HostState) {
    let from = member.host.state;
    if from != to {
        member.host.state = to;
        events.push_back(Event::StateChanged { host: member.host.id, from, to });
    }
}

fn state_index(state: HostState) -> usize {
    match state {
        HostState::Joining => 0,
        HostState::Ready => 1,
        HostState::Suspect => 2,
        HostState::Down => 3,
        HostState::Draining => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: LeaseConfig = LeaseConfig { suspect_after_ms: 2_000, down_after_ms: 3_000 };
    use cellplane_api::{Capabilities, CellId, Name, Resources, SiteId};

    fn host(id: u64) -> Host {
        Host {
            id: HostId(id),
            cell: CellId::new("c1").unwrap(),
            site: SiteId::new("s1").unwrap(),
            zone: Name::new("z1").unwrap(),
            capacity: Resources { cpu_milli: 8_000, memory_mib: 16_384, disk_gib: 100, gpus: 0 },
            capabilities: Capabilities { container: true, vm: false },
            labels: Default::default(),
            state: HostState::Ready, // what a host says of itself is not trusted
        }
    }

    fn beat(id: u64, seq: u64) -> Heartbeat {
        Heartbeat { host: HostId(id), seq, epoch: 1, state: HostState::Ready }
    }

    fn events(m: &mut Membership) -> Vec<(u64, HostState)> {
        std::iter::from_fn(|| m.poll_event())
            .map(|Event::StateChanged { host, to, .. }| (host.0, to))
            .collect()
    }

    #[test]
    fn a_host_joins_goes_ready_then_suspect_then_down_then_comes_back() {
        let mut m = Membership::new(LEASE, 10);
        m.handle_register(0, host(1)).unwrap();
        assert_eq!(m.host(HostId(1)).unwrap().state, HostState::Joining);
        m.handle_heartbeat(100, &beat(1, 1)).unwrap();
        m.handle_tick(2_099);
        assert_eq!(events(&mut m), [(1, HostState::Ready)]);
        m.handle_tick(2_100);
        assert_eq!(events(&mut m), [(1, HostState::Suspect)]);
        m.handle_tick(3_099);
        assert!(events(&mut m).is_empty());
        m.handle_tick(3_100);
        assert_eq!(events(&mut m), [(1, HostState::Down)]);
        m.handle_tick(1_000_000);
        assert!(events(&mut m).is_empty(), "down is final until the host speaks");
        m.handle_heartbeat(1_000_001, &beat(1, 2)).unwrap();
        assert_eq!(events(&mut m), [(1, HostState::Ready)]);
        assert_eq!(m.counts(), [0, 1, 0, 0, 0]);
    }

    #[test]
    fn a_restored_host_gets_a_grace_period_then_the_usual_lease() {
        let mut m = Membership::new(LEASE, 10);
        m.handle_restore(1_000, 10_000, host(1)).unwrap();
        m.handle_tick(12_999);
        assert!(events(&mut m).is_empty(), "no verdict within the grace period");
        m.handle_tick(13_000);
        assert_eq!(events(&mut m), [(1, HostState::Suspect)]);
        let mut m = Membership::new(LEASE, 10);
        m.handle_restore(1_000, 10_000, host(1)).unwrap();
        m.handle_heartbeat(4_000, &beat(1, 1)).unwrap();
        assert_eq!(events(&mut m), [(1, HostState::Ready)]);
    }

    #[test]
    fn duplicate_and_reordered_heartbeats_do_not_renew_the_lease() {
        let mut m = Membership::new(LEASE, 10);
        m.handle_register(0, host(1)).unwrap();
        m.handle_heartbeat(0, &beat(1, 5)).unwrap();
        m.handle_heartbeat(1_500, &beat(1, 5)).unwrap(); // duplicate
        m.handle_heartbeat(1_900, &beat(1, 3)).unwrap(); // late
        m.handle_tick(2_000);
        assert_eq!(m.host(HostId(1)).unwrap().state, HostState::Suspect);
    }

    #[test]
    fn draining_survives_heartbeats_but_not_silence() {
        let mut m = Membership::new(LEASE, 10);
        m.handle_register(0, host(1)).unwrap();
        m.handle_heartbeat(0, &beat(1, 1)).unwrap();
        m.handle_drain(HostId(1), true).unwrap();
        m.handle_heartbeat(1_000, &beat(1, 2)).unwrap();
        m.handle_tick(3_999);
        assert_eq!(m.host(HostId(1)).unwrap().state, HostState::Draining);
        m.handle_tick(4_000);
        assert_eq!(m.host(HostId(1)).unwrap().state, HostState::Down);
        m.handle_drain(HostId(1), false).unwrap();
        assert_eq!(m.host(HostId(1)).unwrap().state, HostState::Down, "undrain does not revive");
    }

    #[test]
    fn unknown_hosts_and_a_full_cell_are_typed_errors_that_change_nothing() {
        let mut m = Membership::new(LEASE, 1);
        assert_eq!(
            m.handle_heartbeat(0, &beat(9, 1)),
            Err(MembershipError::UnknownHost(HostId(9)))
        );
        m.handle_register(0, host(1)).unwrap();
        assert_eq!(m.handle_register(0, host(2)), Err(MembershipError::Full(1)));
        assert!(m.host(HostId(2)).is_none());
        assert_eq!(m.counts(), [1, 0, 0, 0, 0]);
    }

    /// Seeded faults (drops, duplicates, reordering, delays) on 1,000 hosts' heartbeats, then
    /// calm: every host ends ready, and replaying the seed gives the same history.
    #[test]
    fn converges_after_seeded_faults_and_replays_exactly() {
        fn run(seed: u64) -> (Vec<(u64, HostState)>, [usize; 5]) {
            let mut rng = seed;
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let mut m = Membership::new(LEASE, 1_000);
            for id in 0..1_000 {
                m.handle_register(0, host(id)).unwrap();
            }
            let mut seq = vec![0u64; 1_000];
            let mut late: Vec<(u64, Heartbeat)> = Vec::new();
            let mut history = Vec::new();
            for now in (0..20_000).step_by(250) {
                let calm = now >= 10_000;
                for id in 0..1_000u64 {
                    if now % 1_000 != (id % 4) * 250 {
                        continue; // each host beats once a second, at its own phase
                    }
                    seq[id as usize] += 1;
                    let b = beat(id, seq[id as usize]);
                    match if calm { 0 } else { next() % 10 } {
                        0..=5 => m.handle_heartbeat(now, &b).unwrap(),
                        6 => {} // dropped
                        7 => (0..2).for_each(|_| m.handle_heartbeat(now, &b).unwrap()), // doubled
                        _ => late.push((now + 250 + next() % 3_000, b)), // delayed
                    }
                }
                late.sort_by_key(|(at, b)| (*at, b.host));
                while late.first().is_some_and(|(at, _)| *at <= now) {
                    let (_, b) = late.remove(0);
                    m.handle_heartbeat(now, &b).unwrap();
                }
                m.handle_tick(now);
                history.extend(events(&mut m));
            }
            (history, m.counts())
        }
        let (history, counts) = run(42);
        assert_eq!(counts, [0, 1_000, 0, 0, 0], "every host must be ready once faults stop");
        assert!(history.iter().any(|(_, s)| *s == HostState::Suspect), "faults must bite");
        assert_eq!(run(42), (history, counts), "the same seed must replay exactly");
    }
}
