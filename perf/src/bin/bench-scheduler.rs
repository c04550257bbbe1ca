//! The scheduler core alone (no storage, no network): 100,000 hosts, 1,000,000 replicas placed in
//! batches, bin-packing and spreading. The ceiling is the same walk over a plain ordered index
//! without filters or scoring (what the data structure itself costs).

use std::collections::BTreeSet;
use std::time::Instant;

use cellplane_api::*;
use cellplane_cell::core::scheduler::{Request, Scheduler};
use cellplane_perf::{rate, report};

const HOSTS: u64 = 100_000;
const REPLICAS: usize = 1_000_000;

fn main() {
    let host = |id: u64| Host {
        id: HostId(id),
        cell: CellId::new("c1").expect("name"),
        site: SiteId::new("s1").expect("name"),
        zone: Name::new(["a", "b", "c"][(id % 3) as usize]).expect("name"),
        capacity: Resources { cpu_milli: 64_000, memory_mib: 262_144, disk_gib: 2_000, gpus: 0 },
        capabilities: Capabilities { container: true, vm: id.is_multiple_of(4) },
        labels: Default::default(),
        state: HostState::Ready,
    };
    let resources = Resources { cpu_milli: 500, memory_mib: 1_024, disk_gib: 1, gpus: 0 };

    let mut ceiling: BTreeSet<(u32, HostId)> = (0..HOSTS).map(|id| (64_000, HostId(id))).collect();
    let start = Instant::now();
    for _ in 0..REPLICAS {
        let &(free, id) = ceiling.range((resources.cpu_milli, HostId(0))..).next().expect("room");
        ceiling.remove(&(free, id));
        ceiling.insert((free - resources.cpu_milli, id));
    }
    report(
        "ordered index alone, take + reinsert (ceiling)",
        rate(REPLICAS as u64, start.elapsed()),
        "/s",
    );

    for (name, spread) in [("bin-pack", Spread::None), ("spread by zone", Spread::Zone)] {
        let mut scheduler = Scheduler::new();
        let start = Instant::now();
        for id in 0..HOSTS {
            scheduler.handle_host(&host(id));
        }
        report(&format!("{name}: hosts indexed/s"), rate(HOSTS, start.elapsed()), "/s");
        let workloads: Vec<_> = (0..1_000)
            .map(|i| {
                (
                    TenantId::new("t").expect("name"),
                    WorkloadName::new(&format!("w{i}")).expect("name"),
                )
            })
            .collect();
        let placement = Placement { spread, ..Placement::default() };
        let start = Instant::now();
        let mut placed = 0u64;
        for batch in 0..REPLICAS / 1_000 {
            let requests: Vec<_> = (0..1_000)
                .map(|_| Request {
                    workload: &workloads[batch % 1_000],
                    resources,
                    vm: false,
                    placement: &placement,
                })
                .collect();
            placed += scheduler.place_batch(&requests).iter().filter(|r| r.is_ok()).count() as u64;
        }
        report(
            &format!("{name}: placements/s ({placed} placed)"),
            rate(placed, start.elapsed()),
            "/s",
        );
    }
}
