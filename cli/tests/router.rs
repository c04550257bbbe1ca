//! A region as real processes over QUIC on 127.0.0.1: three cells (two cloud, one edge), a
//! simulated fleet per cell, and the router in front.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use cellplane_api::wire::{
    Apply, ErrorCode, ErrorReply, ListRequest, Message, RegionSummary, Scale, WorkloadRef,
};
use cellplane_api::{
    ContainerSpec, Controller, LatencyTarget, Name, Placement, Quota, Resources, Tenant, TenantId,
    WorkloadKind, WorkloadName, WorkloadSpec,
};
use cellplane_chaos::process::{self, Killed};
use cellplane_transport::{
    CertificateAuthority, Connection, Credentials, Identity, Role, Setup, TransportError, connect,
};

const DEADLINE: Duration = Duration::from_secs(10);

fn spawn(args: &[&str], dir: &Path) -> (Killed, String) {
    process::spawn(Path::new(env!("CARGO_BIN_EXE_cellplane")), args, dir).unwrap()
}

/// The address in a "... serving on ADDR ..." line.
fn address(line: &str) -> SocketAddr {
    process::address(line).unwrap()
}

struct Region {
    cells: Vec<Killed>,
    _fleets: Vec<Killed>,
    _router: Killed,
    router: SocketAddr,
}

fn start_region(dir: &Path) -> Region {
    let ca = CertificateAuthority::generate("test").unwrap();
    let pki = dir.join("pki");
    ca.save(&pki).unwrap();
    let name = |s: &str| Name::new(s).unwrap();
    for (identity, stem) in [
        (Identity::Cell(name("c1")), "c1"),
        (Identity::Cell(name("c2")), "c2"),
        (Identity::Cell(name("c3")), "c3"),
        (Identity::Router(name("r1")), "router"),
        (Identity::Host(name("fleet")), "fleet"),
        (Identity::Client { tenant: TenantId::new("ops").unwrap(), role: Role::Operator }, "ops"),
    ] {
        ca.issue(&identity).unwrap().save(&pki, stem).unwrap();
    }
    let mut cells = Vec::new();
    let mut fleets = Vec::new();
    let mut addresses = Vec::new();
    for cell in ["c1", "c2", "c3"] {
        let config = format!(
            "cell = \"{cell}\"\nlisten = \"127.0.0.1:0\"\nhosts_max = 64\nshard_hosts = 16\n"
        );
        std::fs::write(dir.join(format!("{cell}.toml")), config).unwrap();
        let (process, line) = spawn(
            &["cell", "--config", &format!("{cell}.toml"), "--data", cell, "--pki", "pki"],
            dir,
        );
        let addr = address(&line);
        let (fleet, line) = spawn(
            &[
                "hosts",
                "--sim",
                "4",
                "--cell",
                &addr.to_string(),
                "--cell-name",
                cell,
                "--credentials",
                "fleet",
                "--pki",
                "pki",
                "--cpu-milli",
                "4000",
                "--memory-mib",
                "8192",
            ],
            dir,
        );
        assert!(line.starts_with("fleet of 4 hosts joined"), "{line:?}");
        cells.push(process);
        fleets.push(fleet);
        addresses.push(addr);
    }
    let region = format!(
        r#"region = "test"
listen = "127.0.0.1:0"

[[sites]]
id = "dc-1"
kind = "cloud"
location = "Frankfurt"
latency_ms = {{ users-eu = 30, users-us = 90 }}

[[sites]]
id = "edge-fra"
kind = "edge"
location = "Frankfurt edge"
latency_ms = {{ users-eu = 4, users-us = 110 }}

[[cells]]
id = "c1"
site = "dc-1"
address = "{}"

[[cells]]
id = "c2"
site = "dc-1"
address = "{}"

[[cells]]
id = "c3"
site = "edge-fra"
address = "{}"

[limits]
rate_per_s = 20
burst = 40
summary_ms = 100
"#,
        addresses[0], addresses[1], addresses[2]
    );
    std::fs::write(dir.join("region.toml"), region).unwrap();
    let (router, line) =
        spawn(&["router", "--config", "region.toml", "--data", "router", "--pki", "pki"], dir);
    assert!(line.starts_with("router of region test serving on"), "{line:?}");
    Region { cells, _fleets: fleets, _router: router, router: address(&line) }
}

async fn as_client(dir: &Path, region: &Region, stem: &str) -> Connection {
    let pki = dir.join("pki");
    let ca = cellplane_transport::identity::load_ca_certificate(&pki).unwrap();
    let setup = Setup::new(Credentials::load(&pki, stem).unwrap(), ca);
    connect(region.router, &Identity::Router(Name::new("r1").unwrap()), &setup).await.unwrap()
}

async fn summary(ops: &Connection) -> RegionSummary {
    match ops.request(0, &Message::RegionSummaryRequest, DEADLINE).await.unwrap() {
        Message::RegionSummary(s) => *s,
        other => panic!("{other:?}"),
    }
}

/// Waits until the router's view of the region satisfies `check`.
async fn until(ops: &Connection, check: impl Fn(&RegionSummary) -> bool) {
    for _ in 0..1_000 {
        if check(&summary(ops).await) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    panic!("the region never got there: {:?}", summary(ops).await);
}

/// Creates a tenant through the router and saves the credentials it hands back.
async fn create_tenant(dir: &Path, ops: &Connection, id: &str, replicas: u32) {
    let tenant = Tenant {
        id: TenantId::new(id).unwrap(),
        quota: Quota { cpu_milli: 100_000, memory_mib: 100_000, replicas, workloads: 10 },
        home_cell: None,
    };
    let Message::TenantCreated(made) =
        ops.request(0, &Message::PutTenant(Box::new(tenant)), DEADLINE).await.unwrap()
    else {
        panic!("no credentials")
    };
    assert!(made.tenant.home_cell.is_some());
    let credentials = Credentials {
        certificate: made.certificate_der.into(),
        key: made.key_der.into(),
        identity: Identity::Client { tenant: TenantId::new(id).unwrap(), role: Role::Tenant },
    };
    credentials.save(&dir.join("pki"), id).unwrap();
}

fn spec(name: &str, replicas: u32, cpu_milli: u32, image: &str) -> WorkloadSpec {
    WorkloadSpec {
        name: WorkloadName::new(name).unwrap(),
        kind: WorkloadKind::Container(ContainerSpec {
            image: image.into(),
            command: vec![],
            env: Default::default(),
        }),
        controller: Controller::Replicated,
        replicas,
        resources: Resources { cpu_milli, memory_mib: 100, disk_gib: 0, gpus: 0 },
        placement: Placement::default(),
        update: Default::default(),
    }
}

fn apply(tenant: &str, key: u8, spec: WorkloadSpec) -> Message {
    Message::Apply(Box::new(Apply {
        tenant: TenantId::new(tenant).unwrap(),
        idempotency_key: [key; 16],
        spec,
    }))
}

fn target(tenant: &str, workload: &str) -> Box<WorkloadRef> {
    Box::new(WorkloadRef {
        tenant: TenantId::new(tenant).unwrap(),
        workload: WorkloadName::new(workload).unwrap(),
    })
}

fn refusal(answer: Result<Message, TransportError>) -> ErrorReply {
    match answer {
        Err(TransportError::Remote(refusal)) => refusal,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_routes_isolates_limits_overflows_and_survives_a_dead_cell() {
    let dir = tempfile::tempdir().unwrap();
    let mut region = start_region(dir.path());
    let ops = as_client(dir.path(), &region, "ops").await;
    until(&ops, |s| s.cells.len() == 3 && s.cells.iter().all(|(c, up)| *up && c.hosts[1] == 4))
        .await;
    create_tenant(dir.path(), &ops, "acme", 30).await;
    create_tenant(dir.path(), &ops, "beta", 30).await;
    let acme = as_client(dir.path(), &region, "acme").await;
    let beta = as_client(dir.path(), &region, "beta").await;

    // Routing: each tenant's call reaches the cell that holds its workload.
    let done =
        acme.request(0, &apply("acme", 1, spec("web", 2, 1_000, "acme-web")), DEADLINE).await;
    assert!(matches!(done, Ok(Message::Done(_))), "{done:?}");
    let done = beta.request(0, &apply("beta", 1, spec("web", 1, 500, "beta-web")), DEADLINE).await;
    assert!(matches!(done, Ok(Message::Done(_))), "{done:?}");

    // Isolation: the same name, two tenants, each sees only its own.
    let Message::Workload(mine) =
        beta.request(0, &Message::Get(target("beta", "web")), DEADLINE).await.unwrap()
    else {
        panic!("get")
    };
    assert!(matches!(&mine.spec.kind, WorkloadKind::Container(c) if c.image == "beta-web"));
    let list = ListRequest { tenant: TenantId::new("beta").unwrap(), after: None, limit: 10 };
    let Message::Workloads(page) =
        beta.request(0, &Message::List(Box::new(list)), DEADLINE).await.unwrap()
    else {
        panic!("list")
    };
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].tenant.as_str(), "beta");
    let scale = Scale {
        tenant: TenantId::new("acme").unwrap(),
        workload: WorkloadName::new("web").unwrap(),
        replicas: 0,
    };
    for attempt in [
        Message::Get(target("acme", "web")),
        Message::Delete(target("acme", "web")),
        Message::Scale(Box::new(scale)),
        Message::List(Box::new(ListRequest {
            tenant: TenantId::new("acme").unwrap(),
            after: None,
            limit: 10,
        })),
    ] {
        let refused = refusal(beta.request(0, &attempt, DEADLINE).await);
        assert_eq!(refused.code, ErrorCode::Unauthorized);
        assert!(
            !refused.detail.contains("web"),
            "a refusal revealed the object: {}",
            refused.detail
        );
    }
    assert!(
        beta.watch(0, &Message::Watch(TenantId::new("acme").unwrap()))
            .await
            .unwrap()
            .next()
            .await
            .unwrap()
            .is_err()
    );
    // A name beta never used and a name only acme uses look the same to beta.
    let ghost = refusal(beta.request(0, &Message::Get(target("beta", "ghost")), DEADLINE).await);
    let only_acme = refusal(beta.request(0, &Message::Get(target("beta", "wide")), DEADLINE).await);
    assert_eq!(ghost.code, only_acme.code);

    // Quota: refused whole, nothing partial.
    let big =
        refusal(acme.request(0, &apply("acme", 2, spec("big", 40, 100, "x")), DEADLINE).await);
    assert_eq!(big.code, ErrorCode::QuotaExceeded);
    let none = refusal(acme.request(0, &Message::Get(target("acme", "big")), DEADLINE).await);
    assert_eq!(none.code, ErrorCode::NotFound);

    // Overflow: more than the home cell has free goes to another cloud cell.
    until(&ops, |s| s.cells.iter().any(|(c, _)| c.cpu_milli[1] >= 2_000)).await;
    let wide = spec("wide", 10, 1_500, "wide");
    let explain = Message::Explain(Box::new(Apply {
        tenant: TenantId::new("acme").unwrap(),
        idempotency_key: [0; 16],
        spec: wide.clone(),
    }));
    let Message::Explanation(why) = acme.request(0, &explain, DEADLINE).await.unwrap() else {
        panic!("explain")
    };
    assert!(why.overflow, "{why:?}");
    let overflow_cell = why.chosen.clone().unwrap();
    assert!(acme.request(0, &apply("acme", 3, wide), DEADLINE).await.is_ok());
    let Message::Workload(wide) =
        acme.request(0, &Message::Get(target("acme", "wide")), DEADLINE).await.unwrap()
    else {
        panic!("get wide")
    };
    assert_eq!(wide.replicas.len(), 10);

    // Edge placement: a latency target picks the edge cell; an impossible one is explained.
    let mut near = spec("near", 1, 100, "near");
    near.placement.latency =
        vec![LatencyTarget { source: Name::new("users-eu").unwrap(), max_ms: 10 }];
    assert!(acme.request(0, &apply("acme", 4, near.clone()), DEADLINE).await.is_ok());
    let explain = Message::Explain(Box::new(Apply {
        tenant: TenantId::new("acme").unwrap(),
        idempotency_key: [0; 16],
        spec: near.clone(),
    }));
    let Message::Explanation(why) = acme.request(0, &explain, DEADLINE).await.unwrap() else {
        panic!("explain")
    };
    assert_eq!(why.chosen.unwrap().as_str(), "c3");
    let mut impossible = spec("impossible", 1, 100, "x");
    impossible.placement.latency =
        vec![LatencyTarget { source: Name::new("users-eu").unwrap(), max_ms: 1 }];
    let no = refusal(acme.request(0, &apply("acme", 5, impossible), DEADLINE).await);
    assert!(
        no.detail.contains("c3 (site edge-fra): 4 ms to users-eu, at most 1 allowed"),
        "{}",
        no.detail
    );
    assert!(no.detail.contains("c1 (site dc-1): 30 ms to users-eu"), "{}", no.detail);

    // Rate limiting: a burst past the bucket (40, refilled at 20/s), sent at once, is refused
    // in part, typed.
    let get = Message::Get(target("beta", "web"));
    let calls = (0..120).map(|_| beta.request(0, &get, DEADLINE));
    let answers = futures_util::future::join_all(calls).await;
    let limited = answers
        .iter()
        .filter(|a| matches!(a, Err(TransportError::Remote(e)) if e.code == ErrorCode::RateLimited))
        .count();
    assert!(limited > 0, "120 calls at once never hit a 40-call burst");
    tokio::time::sleep(Duration::from_secs(3)).await; // the bucket refills

    // A dead cell fails its own objects fast and nobody else's.
    let c3 = region.cells.remove(2);
    drop(c3);
    until(&ops, |s| s.cells.iter().any(|(c, up)| c.cell.as_str() == "c3" && !up)).await;
    let started = std::time::Instant::now();
    let down = refusal(acme.request(0, &Message::Get(target("acme", "near")), DEADLINE).await);
    assert_eq!(down.code, ErrorCode::Unavailable);
    assert!(down.detail.contains("cell c3 unavailable"), "{}", down.detail);
    assert!(started.elapsed() < DEADLINE, "a dead cell's calls must not wait out the deadline");
    assert!(acme.request(0, &Message::Get(target("acme", "web")), DEADLINE).await.is_ok());
    assert!(
        acme.request(
            0,
            &Message::Get(Box::new(WorkloadRef {
                tenant: TenantId::new("acme").unwrap(),
                workload: WorkloadName::new("wide").unwrap()
            })),
            DEADLINE
        )
        .await
        .is_ok()
    );
    assert!(beta.request(0, &Message::Get(target("beta", "web")), DEADLINE).await.is_ok());
    let _ = overflow_cell;
}

/// Waits until every replica of `name` runs, asking as `client`.
async fn until_running(client: &Connection, tenant: &str, name: &str) {
    for _ in 0..600 {
        if let Ok(Message::Workload(w)) =
            client.request(0, &Message::Get(target(tenant, name)), DEADLINE).await
            && w.replicas
                .iter()
                .all(|r| r.host.is_some() && r.phase == cellplane_api::ReplicaPhase::Running)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name} never ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_cell_hands_every_workload_on_none_lost_none_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let region = start_region(dir.path());
    let ops = as_client(dir.path(), &region, "ops").await;
    until(&ops, |s| s.cells.len() == 3 && s.cells.iter().all(|(c, up)| *up && c.hosts[1] == 4))
        .await;
    create_tenant(dir.path(), &ops, "acme", 30).await;
    let acme = as_client(dir.path(), &region, "acme").await;
    let names = ["a", "b", "c", "d", "db"];
    for (i, name) in names.iter().enumerate() {
        let mut s = spec(name, 2, 200, "app");
        if *name == "db" {
            s.controller = Controller::Stateful;
        }
        let done = acme.request(0, &apply("acme", i as u8 + 1, s), DEADLINE).await;
        assert!(matches!(done, Ok(Message::Done(_))), "{done:?}");
    }
    for name in names {
        until_running(&acme, "acme", name).await;
    }
    let home = |s: &RegionSummary| {
        s.cells.iter().find(|(c, _)| c.workloads == 5).map(|(c, _)| c.cell.clone())
    };
    until(&ops, |s| home(s).is_some()).await;
    let from = home(&summary(&ops).await).unwrap();

    // Under load: a reader keeps asking for every workload while the cell drains.
    let reader = {
        let acme = as_client(dir.path(), &region, "acme").await;
        tokio::spawn(async move {
            let mut failures = Vec::new();
            for round in 0..40 {
                let name = names[round % names.len()];
                if let Err(e) = acme.request(0, &Message::Get(target("acme", name)), DEADLINE).await
                {
                    failures.push(format!("{name}: {e}"));
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            failures
        })
    };
    // Interrupted after two moves, resumed by asking again.
    let drain = |moves_max| {
        Message::Drain(Box::new(cellplane_api::wire::DrainRequest {
            cell: from.clone(),
            moves_max,
        }))
    };
    let Message::DrainProgress(first) =
        ops.request(0, &drain(2), Duration::from_secs(120)).await.unwrap()
    else {
        panic!("drain")
    };
    assert_eq!((first.moved, first.remaining), (2, 3), "{first:?}");
    let Message::DrainProgress(rest) =
        ops.request(0, &drain(100), Duration::from_secs(120)).await.unwrap()
    else {
        panic!("drain")
    };
    assert_eq!((rest.moved, rest.remaining), (3, 0), "{rest:?}");
    assert!(rest.failed.is_empty());
    assert!(reader.await.unwrap().is_empty(), "calls failed during the drain");

    // Every workload runs elsewhere, once.
    for name in names {
        until_running(&acme, "acme", name).await;
    }
    until(&ops, |s| {
        let on = |cell: &cellplane_api::CellId| {
            s.cells.iter().find(|(c, _)| &c.cell == cell).map_or(0, |(c, _)| c.workloads)
        };
        on(&from) == 0 && s.cells.iter().map(|(c, _)| c.workloads).sum::<u32>() == 5
    })
    .await;
    // The drained cell takes nothing new.
    let explain = Message::Explain(Box::new(Apply {
        tenant: TenantId::new("acme").unwrap(),
        idempotency_key: [0; 16],
        spec: spec("new", 1, 100, "x"),
    }));
    let Message::Explanation(why) = acme.request(0, &explain, DEADLINE).await.unwrap() else {
        panic!("explain")
    };
    assert_ne!(why.chosen.as_ref(), Some(&from));
    assert!(why.rejected.iter().any(|(c, _, reason)| c == &from && reason == "cell draining"));

    // A tenant with workloads goes only with an explicit cascade, and then entirely.
    let delete = |cascade| {
        let request =
            cellplane_api::wire::DeleteTenant { tenant: TenantId::new("acme").unwrap(), cascade };
        Message::DeleteTenant(Box::new(request))
    };
    let refused = refusal(ops.request(0, &delete(false), DEADLINE).await);
    assert_eq!(refused.code, ErrorCode::Invalid);
    assert!(refused.detail.contains("5 workloads"), "{}", refused.detail);
    assert!(matches!(ops.request(0, &delete(true), DEADLINE).await, Ok(Message::Done(_))));
    let gone = refusal(acme.request(0, &Message::Get(target("acme", "a")), DEADLINE).await);
    assert_eq!(gone.code, ErrorCode::NotFound);
    until(&ops, |s| s.cells.iter().map(|(c, _)| c.workloads).sum::<u32>() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_router_replicas_on_one_directory_route_alike() {
    use cellplane_region::{Router, RouterConfig};
    let dir = tempfile::tempdir().unwrap();
    let region = start_region(dir.path());
    let ops_link = as_client(dir.path(), &region, "ops").await;
    until(&ops_link, |s| s.cells.len() == 3 && s.cells.iter().all(|(_, up)| *up)).await;
    // Two more replicas, in this process, sharing one directory store (as replicas sharing a
    // FoundationDB cluster would).
    let config: RouterConfig =
        toml::from_str(&std::fs::read_to_string(dir.path().join("region.toml")).unwrap()).unwrap();
    let pki = dir.path().join("pki");
    let ca = cellplane_transport::identity::load_ca_certificate(&pki).unwrap();
    let setup = Setup::new(Credentials::load(&pki, "router").unwrap(), ca);
    let db = cellplane_storage::Database::open_embedded(&dir.path().join("replicas")).unwrap();
    let authority = CertificateAuthority::load(&pki).ok();
    let a = Router::start(config.clone(), db.clone(), setup.clone(), authority).await.unwrap();
    let b = Router::start(config, db, setup, None).await.unwrap();
    let ops = Identity::Client { tenant: TenantId::new("ops").unwrap(), role: Role::Operator };
    for router in [&a, &b] {
        for _ in 0..200 {
            if let Ok(Message::RegionSummary(s)) =
                router.call(&ops, Message::RegionSummaryRequest).await
                && s.cells.iter().filter(|(_, up)| *up).count() == 3
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // A tenant made through one replica is known to the other.
    let tenant = Tenant {
        id: TenantId::new("acme").unwrap(),
        quota: Quota { cpu_milli: 100_000, memory_mib: 100_000, replicas: 30, workloads: 10 },
        home_cell: None,
    };
    assert!(matches!(
        a.call(&ops, Message::PutTenant(Box::new(tenant))).await,
        Ok(Message::TenantCreated(_))
    ));
    assert!(b.call(&ops, apply("acme", 1, spec("web", 1, 100, "web"))).await.is_ok());
    assert!(matches!(
        a.call(&ops, Message::Get(target("acme", "web"))).await,
        Ok(Message::Workload(_))
    ));

    // Both place the same new workload at once: one choice stands, in both.
    let (ya, yb) = tokio::join!(
        a.call(&ops, apply("acme", 2, spec("y", 2, 100, "y"))),
        b.call(&ops, apply("acme", 3, spec("y", 2, 100, "y"))),
    );
    assert!(ya.is_ok() && yb.is_ok(), "{ya:?} {yb:?}");
    assert!(b.call(&ops, Message::Get(target("acme", "y"))).await.is_ok());
    let name = WorkloadName::new("y").unwrap();
    let acme = TenantId::new("acme").unwrap();
    assert_eq!(a.route(&acme, &name).unwrap(), b.route(&acme, &name).unwrap());
    let Ok(Message::Workloads(page)) = a
        .call(
            &ops,
            Message::List(Box::new(ListRequest { tenant: acme.clone(), after: None, limit: 10 })),
        )
        .await
    else {
        panic!("list")
    };
    let names: Vec<&str> = page.items.iter().map(|w| w.spec.name.as_str()).collect();
    assert_eq!(names, ["web", "y"], "one y, in one cell");
}
