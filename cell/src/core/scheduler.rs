//! The scheduler: a capacity index over a cell's hosts that places replicas without scanning
//! every host, and never over-commits one.
//!
//! Index: schedulable hosts are kept ordered by free CPU. Bin-packing walks up from the request
//! (the tightest host that fits comes first); spreading walks down from the freest host and
//! scores up to [`Scheduler::SPREAD_PROBES`] fitting hosts by how many replicas of the same
//! workload they (and their zone) already hold. A walk examines at most
//! [`Scheduler::SCAN_MAX`] hosts; a request no examined host can take is refused with the reason
//! most hosts gave. Filters: capability (container or VM), CPU, memory, disk, GPUs, allowed sites
//! and zones, anti-affinity with named workloads of the same tenant.
//!
//! Invariant: a placement reserves its resources at once, so `used <= capacity` holds on every
//! host after any sequence of placements (checked by the tests against random workloads).

use std::collections::{BTreeSet, HashMap};

use cellplane_api::{
    Host, HostId, HostState, Name, Placement, Resources, SiteId, Spread, TenantId, WorkloadName,
};

/// Which workload a replica belongs to.
pub type WorkloadKey = (TenantId, WorkloadName);

/// One replica to place.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// Its workload.
    pub workload: &'a WorkloadKey,
    /// What it needs.
    pub resources: Resources,
    /// Whether it is a VM (else a container).
    pub vm: bool,
    /// Where it may go and how to spread.
    pub placement: &'a Placement,
}

/// Why a replica could not be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("unschedulable: {reason}")]
pub struct Unschedulable {
    /// The reason most examined hosts gave.
    pub reason: &'static str,
}

#[derive(Debug)]
struct Slot {
    capacity: Resources,
    used: Resources,
    vm: bool,
    container: bool,
    site: SiteId,
    zone: Name,
    zone_id: u32,
    schedulable: bool,
}

impl Slot {
    fn free(&self) -> Resources {
        Resources {
            cpu_milli: self.capacity.cpu_milli - self.used.cpu_milli,
            memory_mib: self.capacity.memory_mib - self.used.memory_mib,
            disk_gib: self.capacity.disk_gib - self.used.disk_gib,
            gpus: self.capacity.gpus - self.used.gpus,
        }
    }
}

/// The scheduler core of one cell.
#[derive(Debug, Default)]
pub struct Scheduler {
    hosts: HashMap<HostId, Slot>,
    /// `(free cpu, host)` for every schedulable host.
    index: BTreeSet<(u32, HostId)>,
    /// Workloads and zones are interned to small numbers, so counting replicas per host and per
    /// zone never clones a name.
    workload_ids: HashMap<WorkloadKey, u32>,
    zone_ids: HashMap<Name, u32>,
    per_host: HashMap<(u32, HostId), u32>,
    per_zone: HashMap<(u32, u32), u32>,
}

impl Scheduler {
    /// Most hosts one placement examines.
    pub const SCAN_MAX: usize = 4_096;
    /// Most fitting hosts a spreading placement scores.
    pub const SPREAD_PROBES: usize = 32;

    /// An empty scheduler.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a host or updates its record (capacity, capabilities, state). Its reservations stay.
    pub fn handle_host(&mut self, host: &Host) {
        let used = self.hosts.get(&host.id).map(|s| s.used).unwrap_or_default();
        self.unindex(host.id);
        let zone_id = intern(&mut self.zone_ids, &host.zone);
        let slot = Slot {
            capacity: host.capacity,
            used,
            vm: host.capabilities.vm,
            container: host.capabilities.container,
            site: host.site.clone(),
            zone: host.zone.clone(),
            zone_id,
            schedulable: host.state == HostState::Ready,
        };
        self.hosts.insert(host.id, slot);
        self.reindex(host.id);
    }

    /// A host's state changed: only ready hosts take new replicas.
    pub fn handle_host_state(&mut self, id: HostId, state: HostState) {
        self.unindex(id);
        if let Some(slot) = self.hosts.get_mut(&id) {
            slot.schedulable = state == HostState::Ready;
        }
        self.reindex(id);
    }

    /// A replica placed earlier on `host` no longer runs there: give its resources back.
    pub fn handle_release(&mut self, host: HostId, workload: &WorkloadKey, resources: Resources) {
        self.unindex(host);
        if let Some(slot) = self.hosts.get_mut(&host) {
            // A release never frees more than was reserved (a duplicate release is harmless).
            slot.used.cpu_milli = slot.used.cpu_milli.saturating_sub(resources.cpu_milli);
            slot.used.memory_mib = slot.used.memory_mib.saturating_sub(resources.memory_mib);
            slot.used.disk_gib = slot.used.disk_gib.saturating_sub(resources.disk_gib);
            slot.used.gpus = slot.used.gpus.saturating_sub(resources.gpus);
            if let Some(&w) = self.workload_ids.get(workload) {
                decrement(&mut self.per_host, (w, host));
                decrement(&mut self.per_zone, (w, slot.zone_id));
            }
        }
        self.reindex(host);
    }

    /// Places one replica and reserves its resources.
    pub fn place(&mut self, request: &Request<'_>) -> Result<HostId, Unschedulable> {
        let chosen = self.choose(request)?;
        self.reserve(chosen, request.workload, request.resources);
        Ok(chosen)
    }

    /// Takes back a reservation recovered from storage: `resources` for `workload` on `host`,
    /// whatever the host's state. Refused (`false`, nothing reserved) when the host is unknown
    /// or can no longer fit it; the caller then places that replica again.
    pub fn handle_restore(
        &mut self,
        host: HostId,
        workload: &WorkloadKey,
        resources: Resources,
    ) -> bool {
        let fits = self.hosts.get(&host).is_some_and(|slot| resources.fits_in(&slot.free()));
        if fits {
            self.reserve(host, workload, resources);
        }
        fits
    }

    /// Places replicas in order; each sees the reservations of those before it.
    pub fn place_batch(&mut self, requests: &[Request<'_>]) -> Vec<Result<HostId, Unschedulable>> {
        requests.iter().map(|r| self.place(r)).collect()
    }

    /// CPU and memory of schedulable hosts: `([cpu capacity, cpu reserved], [memory capacity,
    /// memory reserved])`. A scan of every host, for summaries, not for the hot path.
    pub fn totals(&self) -> ([u64; 2], [u64; 2]) {
        let mut cpu = [0u64; 2];
        let mut memory = [0u64; 2];
        for slot in self.hosts.values().filter(|s| s.schedulable) {
            cpu[0] += u64::from(slot.capacity.cpu_milli);
            cpu[1] += u64::from(slot.used.cpu_milli);
            memory[0] += u64::from(slot.capacity.memory_mib);
            memory[1] += u64::from(slot.used.memory_mib);
        }
        (cpu, memory)
    }

    /// A host's free resources.
    pub fn free(&self, id: HostId) -> Option<Resources> {
        self.hosts.get(&id).map(Slot::free)
    }

    fn choose(&self, request: &Request<'_>) -> Result<HostId, Unschedulable> {
        let need = request.resources.cpu_milli;
        let candidates: Box<dyn Iterator<Item = &(u32, HostId)>> = match request.placement.spread {
            Spread::None => Box::new(self.index.range((need, HostId(0))..)),
            Spread::Host | Spread::Zone => Box::new(self.index.range((need, HostId(0))..).rev()),
        };
        let mut rejections: HashMap<&'static str, usize> = HashMap::new();
        // A workload never placed has no replicas anywhere: every count is zero.
        let w = self.workload_ids.get(request.workload).copied();
        let avoid: Vec<u32> = request
            .placement
            .anti_affinity
            .iter()
            .filter_map(|other| self.workload_ids.get(&(request.workload.0.clone(), other.clone())))
            .copied()
            .collect();
        let mut best: Option<((u32, u32), HostId)> = None;
        let mut fitting = 0;
        for &(_, id) in candidates.take(Self::SCAN_MAX) {
            let Some(slot) = self.hosts.get(&id) else { continue };
            if let Err(reason) = self.fits(slot, id, request, &avoid) {
                *rejections.entry(reason).or_default() += 1;
                continue;
            }
            let on_host = |w| count(&self.per_host, &(w, id));
            let in_zone = |w| count(&self.per_zone, &(w, slot.zone_id));
            let score = match (request.placement.spread, w) {
                (Spread::None, _) => return Ok(id), // first fit on the tightest host: bin-packing
                (_, None) => (0, 0),
                (Spread::Host, Some(w)) => (0, on_host(w)),
                (Spread::Zone, Some(w)) => (in_zone(w), on_host(w)),
            };
            if best.is_none_or(|(s, _)| score < s) {
                best = Some((score, id));
            }
            fitting += 1;
            if fitting == Self::SPREAD_PROBES || score == (0, 0) {
                break;
            }
        }
        best.map(|(_, id)| id).ok_or_else(|| Unschedulable {
            reason: rejections
                .into_iter()
                .max_by_key(|(_, n)| *n)
                .map_or("no ready host has that much free CPU", |(reason, _)| reason),
        })
    }

    fn fits(
        &self,
        slot: &Slot,
        id: HostId,
        request: &Request<'_>,
        avoid: &[u32],
    ) -> Result<(), &'static str> {
        let placement = request.placement;
        if request.vm && !slot.vm {
            return Err("no VM runtime");
        }
        if !request.vm && !slot.container {
            return Err("no container runtime");
        }
        if !request.resources.fits_in(&slot.free()) {
            return Err("not enough free memory, disk or GPUs");
        }
        if !placement.sites.is_empty() && !placement.sites.contains(&slot.site) {
            return Err("site not allowed");
        }
        if !placement.zones.is_empty() && !placement.zones.contains(&slot.zone) {
            return Err("zone not allowed");
        }
        if avoid.iter().any(|other| count(&self.per_host, &(*other, id)) > 0) {
            return Err("anti-affinity");
        }
        Ok(())
    }

    fn reserve(&mut self, id: HostId, workload: &WorkloadKey, r: Resources) {
        self.unindex(id);
        let slot = self.hosts.get_mut(&id).expect("scheduler: chose a host it does not know");
        assert!(r.fits_in(&slot.free()), "scheduler: chose a host that cannot fit the request");
        slot.used.cpu_milli += r.cpu_milli;
        slot.used.memory_mib += r.memory_mib;
        slot.used.disk_gib += r.disk_gib;
        slot.used.gpus += r.gpus;
        let zone = slot.zone_id;
        let w = intern(&mut self.workload_ids, workload);
        *self.per_host.entry((w, id)).or_default() += 1;
        *self.per_zone.entry((w, zone)).or_default() += 1;
        self.reindex(id);
    }

    fn unindex(&mut self, id: HostId) {
        if let Some(slot) = self.hosts.get(&id) {
            self.index.remove(&(slot.free().cpu_milli, id));
        }
    }

    fn reindex(&mut self, id: HostId) {
        if let Some(slot) = self.hosts.get(&id)
            && slot.schedulable
        {
            self.index.insert((slot.free().cpu_milli, id));
        }
    }
}

/// The number for `key`, given on first sight.
fn intern<K: std::hash::Hash + Eq + Clone>(ids: &mut HashMap<K, u32>, key: &K) -> u32 {
    if let Some(&id) = ids.get(key) {
        return id;
    }
    // At most one id per distinct workload or zone of a cell: far below u32::MAX.
    let id = ids.len() as u32;
    ids.insert(key.clone(), id);
    id
}

fn count<K: std::hash::Hash + Eq>(map: &HashMap<K, u32>, key: &K) -> u32 {
    map.get(key).copied().unwrap_or(0)
}

fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, key: K) {
    if let Some(n) = map.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            map.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cellplane_api::{Capabilities, CellId};

    fn host(id: u64, zone: &str, cpu: u32, vm: bool) -> Host {
        Host {
            id: HostId(id),
            cell: CellId::new("c1").unwrap(),
            site: SiteId::new(if id.is_multiple_of(2) { "even" } else { "odd" }).unwrap(),
            zone: Name::new(zone).unwrap(),
            capacity: Resources { cpu_milli: cpu, memory_mib: 8_192, disk_gib: 100, gpus: 1 },
            capabilities: Capabilities { container: true, vm },
            labels: Default::default(),
            state: HostState::Ready,
        }
    }

    fn key(name: &str) -> WorkloadKey {
        (TenantId::new("t").unwrap(), WorkloadName::new(name).unwrap())
    }

    fn small() -> Resources {
        Resources { cpu_milli: 1_000, memory_mib: 1_024, disk_gib: 1, gpus: 0 }
    }

    #[test]
    fn bin_packing_fills_the_tightest_host_first() {
        let mut s = Scheduler::new();
        s.handle_host(&host(1, "z1", 8_000, false));
        s.handle_host(&host(2, "z1", 2_000, false));
        let (k, p) = (key("w"), Placement::default());
        let r = Request { workload: &k, resources: small(), vm: false, placement: &p };
        assert_eq!(s.place(&r), Ok(HostId(2)));
        assert_eq!(s.place(&r), Ok(HostId(2)));
        assert_eq!(s.place(&r), Ok(HostId(1)), "host 2 is full");
    }

    #[test]
    fn spreading_uses_every_host_then_every_zone() {
        let mut s = Scheduler::new();
        for (id, zone) in [(1, "a"), (2, "a"), (3, "b")] {
            s.handle_host(&host(id, zone, 8_000, false));
        }
        let k = key("w");
        let by_host = Placement { spread: Spread::Host, ..Placement::default() };
        let r = Request { workload: &k, resources: small(), vm: false, placement: &by_host };
        let mut hosts: Vec<_> = (0..3).map(|_| s.place(&r).unwrap().0).collect();
        hosts.sort_unstable();
        assert_eq!(hosts, [1, 2, 3]);

        let k2 = key("z");
        let by_zone = Placement { spread: Spread::Zone, ..Placement::default() };
        let r = Request { workload: &k2, resources: small(), vm: false, placement: &by_zone };
        let first = s.place(&r).unwrap();
        let second = s.place(&r).unwrap();
        let zone = |id: HostId| if id.0 == 3 { "b" } else { "a" };
        assert_ne!(zone(first), zone(second), "two replicas, two zones");
    }

    #[test]
    fn filters_refuse_with_a_reason() {
        let mut s = Scheduler::new();
        s.handle_host(&host(1, "z1", 4_000, false));
        let k = key("w");
        let p = Placement::default();
        let vm = Request { workload: &k, resources: small(), vm: true, placement: &p };
        assert_eq!(s.place(&vm), Err(Unschedulable { reason: "no VM runtime" }));
        let huge = Resources { memory_mib: 1 << 20, ..small() };
        let r = Request { workload: &k, resources: huge, vm: false, placement: &p };
        assert_eq!(s.place(&r).unwrap_err().reason, "not enough free memory, disk or GPUs");
        let elsewhere = Placement { zones: vec![Name::new("z9").unwrap()], ..Placement::default() };
        let r = Request { workload: &k, resources: small(), vm: false, placement: &elsewhere };
        assert_eq!(s.place(&r).unwrap_err().reason, "zone not allowed");
        let odd = Placement { sites: vec![SiteId::new("even").unwrap()], ..Placement::default() };
        let r = Request { workload: &k, resources: small(), vm: false, placement: &odd };
        assert_eq!(s.place(&r).unwrap_err().reason, "site not allowed");
        let cpu = Resources { cpu_milli: 5_000, ..small() };
        let r = Request { workload: &k, resources: cpu, vm: false, placement: &p };
        assert!(s.place(&r).is_err());
        assert_eq!(s.free(HostId(1)).unwrap().cpu_milli, 4_000, "refusals reserve nothing");
    }

    #[test]
    fn anti_affinity_keeps_named_workloads_apart() {
        let mut s = Scheduler::new();
        s.handle_host(&host(1, "z1", 8_000, false));
        s.handle_host(&host(2, "z1", 8_000, false));
        let (db, p) = (key("db"), Placement::default());
        let on = s
            .place(&Request { workload: &db, resources: small(), vm: false, placement: &p })
            .unwrap();
        let web = key("web");
        let apart = Placement {
            anti_affinity: vec![WorkloadName::new("db").unwrap()],
            ..Placement::default()
        };
        let r = Request { workload: &web, resources: small(), vm: false, placement: &apart };
        assert_ne!(s.place(&r).unwrap(), on);
        assert_ne!(s.place(&r).unwrap(), on);
    }

    #[test]
    fn only_ready_hosts_take_replicas_and_releases_give_room_back() {
        let mut s = Scheduler::new();
        s.handle_host(&host(1, "z1", 1_000, false));
        let (k, p) = (key("w"), Placement::default());
        let r = Request { workload: &k, resources: small(), vm: false, placement: &p };
        s.handle_host_state(HostId(1), HostState::Suspect);
        assert!(s.place(&r).is_err());
        s.handle_host_state(HostId(1), HostState::Ready);
        assert_eq!(s.place(&r), Ok(HostId(1)));
        assert!(s.place(&r).is_err(), "full");
        s.handle_release(HostId(1), &k, small());
        assert_eq!(s.place(&r), Ok(HostId(1)));
    }

    /// Random hosts, random requests of both kinds and both policies, in seeded batches: no host
    /// ever holds more than its capacity, and every refusal is honest (no examined host fit).
    #[test]
    fn no_host_is_ever_over_committed() {
        let mut rng = 7u64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut s = Scheduler::new();
        let mut capacity = HashMap::new();
        for id in 0..500 {
            let h = host(
                id,
                ["a", "b", "c"][next(3) as usize],
                1_000 * (1 + next(16) as u32),
                next(2) == 0,
            );
            capacity.insert(h.id, h.capacity);
            s.handle_host(&h);
        }
        let keys: Vec<_> = (0..20).map(|i| key(&format!("w{i}"))).collect();
        let policies = [
            Placement::default(),
            Placement { spread: Spread::Host, ..Placement::default() },
            Placement { spread: Spread::Zone, ..Placement::default() },
        ];
        let mut used: HashMap<HostId, Resources> = HashMap::new();
        let mut placed = 0;
        for _ in 0..6_000 {
            let resources = Resources {
                cpu_milli: 100 * (1 + next(20) as u32),
                memory_mib: 64 * (1 + next(32) as u32),
                disk_gib: next(5) as u32,
                gpus: (next(10) == 0) as u8,
            };
            let r = Request {
                workload: &keys[next(20) as usize],
                resources,
                vm: next(4) == 0,
                placement: &policies[next(3) as usize],
            };
            if let Ok(id) = s.place(&r) {
                placed += 1;
                let u = used.entry(id).or_default();
                u.cpu_milli += resources.cpu_milli;
                u.memory_mib += resources.memory_mib;
                u.disk_gib += resources.disk_gib;
                u.gpus += resources.gpus;
                assert!(u.fits_in(&capacity[&id]), "host {id:?} over-committed");
            }
        }
        assert!(placed > 1_000, "the workload must fill the cell ({placed} placed)");
    }
}
