//! `cellplane hosts --sim N`: a simulated fleet in one process.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use cellplane_api::{Capabilities, Host, HostId, HostState, Name, Resources, SiteId};
use cellplane_host_actor::fleet::{self, FleetConfig, Progress};

use crate::Failure;

/// What `cellplane hosts` is told.
#[derive(clap::Args)]
pub struct FleetArgs {
    /// How many simulated hosts to run.
    #[arg(long = "sim")]
    pub count: u64,
    #[command(flatten)]
    pub link: crate::link::CellLink,
    /// The id of the first host; the others follow.
    #[arg(long, default_value_t = 0)]
    pub first_id: u64,
    /// The site the hosts stand in.
    #[arg(long, default_value = "local")]
    pub site: String,
    /// Zones to spread the hosts over (named zone-0, zone-1, ...).
    #[arg(long, default_value_t = 3)]
    pub zones: u64,
    /// CPU each host offers, in thousandths of a core.
    #[arg(long, default_value_t = 64_000)]
    pub cpu_milli: u32,
    /// Memory each host offers, in MiB.
    #[arg(long, default_value_t = 262_144)]
    pub memory_mib: u32,
    /// Hosts per shard (and per assignment stream).
    #[arg(long, default_value_t = 1_000)]
    pub shard_hosts: usize,
    /// Heartbeat interval.
    #[arg(long, default_value_t = 1_000)]
    pub heartbeat_ms: u64,
    /// Longest simulated start of a replica.
    #[arg(long, default_value_t = 50)]
    pub start_delay_ms: u64,
    /// Simulated starts that fail, per thousand.
    #[arg(long, default_value_t = 0)]
    pub failure_per_mille: u64,
    /// Seed of every random draw (the same seed replays the same outcomes).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Runs the fleet until SIGINT or SIGTERM, printing progress while it joins.
pub async fn serve(args: FleetArgs) -> Result<(), Failure> {
    let input = |flag: &str, e: &dyn std::fmt::Display| Failure::Input(format!("{flag}: {e}"));
    if args.count == 0 || args.zones == 0 {
        return Err(Failure::Input("--sim and --zones must be at least 1".into()));
    }
    let cell = args.link.cell_id()?;
    let site = SiteId::new(&args.site).map_err(|e| input("--site", &e))?;
    let zones: Vec<Name> = (0..args.zones.min(1_000))
        .map(|z| Name::new(&format!("zone-{z}")).expect("a valid label"))
        .collect();
    let capacity = Resources {
        cpu_milli: args.cpu_milli,
        memory_mib: args.memory_mib,
        disk_gib: 1_000,
        gpus: 0,
    };
    let hosts: Vec<Host> = (args.first_id..args.first_id.saturating_add(args.count))
        .map(|id| Host {
            id: HostId(id),
            cell: cell.clone(),
            site: site.clone(),
            zone: zones[(id % zones.len() as u64) as usize].clone(),
            capacity,
            capabilities: Capabilities { container: true, vm: true },
            labels: Default::default(),
            state: HostState::Joining,
        })
        .collect();
    if let Some(host) = hosts.first() {
        cellplane_api::Validate::validate(host).map_err(|e| Failure::Input(e.to_string()))?;
    }
    let address = args.link.address()?;
    let mut config = FleetConfig {
        shard_hosts: args.shard_hosts,
        start_delay_ms: args.start_delay_ms,
        failure_per_mille: args.failure_per_mille,
        seed: args.seed,
        ..FleetConfig::default()
    };
    config.host.heartbeat_ms = args.heartbeat_ms;
    let shards = (args.count as usize).div_ceil(config.shard_hosts.max(1));
    let progress = Arc::new(Progress::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let fleet = tokio::spawn(fleet::run(address, hosts, config, progress.clone(), shutdown));
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Failure::Runtime(e.to_string()))?;
    let mut report = tokio::time::interval(Duration::from_secs(1));
    let mut joined = false;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            _ = report.tick() => {
                let registered = progress.registered.load(Ordering::Relaxed);
                let subscribed = progress.subscribed.load(Ordering::Relaxed);
                if !joined && subscribed == shards {
                    joined = true;
                    println!(
                        "fleet of {} hosts joined cell {} in {:.1} s",
                        args.count,
                        args.link.cell_name,
                        started.elapsed().as_secs_f64()
                    );
                } else if !joined {
                    eprintln!("joining: {registered}/{} hosts registered, {subscribed}/{shards} shards subscribed", args.count);
                }
            }
        }
    }
    let _ = stop.send(true);
    match fleet.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Failure::Runtime(e.to_string())),
        Err(e) => Err(Failure::Runtime(e.to_string())),
    }
}
