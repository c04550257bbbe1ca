//! `cellplane host`: the agent of one real host, running its replicas as processes.

use std::path::PathBuf;
use std::sync::Arc;

use cellplane_api::{Host, HostId, HostState, Name, Resources, SiteId};
use cellplane_host_actor::agent;
use cellplane_host_actor::core::host::{HostConfig, HostCore};
use cellplane_host_actor::driver::{ProcessDriver, RestartPolicy};

use crate::Failure;

/// What `cellplane host` is told.
#[derive(clap::Args)]
pub struct HostArgs {
    #[command(flatten)]
    pub link: crate::link::CellLink,
    /// This host's numeric id within the cell.
    #[arg(long)]
    pub id: u64,
    /// The site it stands in.
    #[arg(long, default_value = "local")]
    pub site: String,
    /// Its failure domain.
    #[arg(long, default_value = "zone-a")]
    pub zone: String,
    /// CPU it offers, in thousandths of a core.
    #[arg(long, default_value_t = 2_000)]
    pub cpu_milli: u32,
    /// Memory it offers, in MiB.
    #[arg(long, default_value_t = 2_048)]
    pub memory_mib: u32,
    /// Disk it offers, in GiB.
    #[arg(long, default_value_t = 10)]
    pub disk_gib: u32,
    /// Where each replica's output is written, with a pid file per running process; an agent
    /// restarted over the same directory adopts the processes its predecessor left running.
    #[arg(long, default_value = "cellplane-logs")]
    pub logs: PathBuf,
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn serve(args: HostArgs) -> Result<(), Failure> {
    let input = |flag: &str, e: &dyn std::fmt::Display| Failure::Input(format!("{flag}: {e}"));
    let detected = cellplane_host_actor::detect::detect();
    let host = Host {
        id: HostId(args.id),
        cell: args.link.cell_id()?,
        site: SiteId::new(&args.site).map_err(|e| input("--site", &e))?,
        zone: Name::new(&args.zone).map_err(|e| input("--zone", &e))?,
        capacity: Resources {
            cpu_milli: args.cpu_milli,
            memory_mib: args.memory_mib,
            disk_gib: args.disk_gib,
            gpus: 0,
        },
        capabilities: detected.capabilities,
        labels: Default::default(),
        state: HostState::Joining,
    };
    cellplane_api::Validate::validate(&host).map_err(|e| Failure::Input(e.to_string()))?;
    let (events, arrivals) = tokio::sync::mpsc::channel(4_096);
    let driver = Arc::new(ProcessDriver::new(events, args.logs, RestartPolicy::default()));
    let core = HostCore::new(host, HostConfig::default());
    let cell = args.link.address()?;
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let agent = tokio::spawn(agent::run(cell, core, driver, arrivals, shutdown));
    println!("host {} serving cell {} at {}", args.id, args.link.cell_name, args.link.cell);
    println!("host {} offers {}", args.id, detected.describe());
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Failure::Runtime(e.to_string()))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    let _ = stop.send(true);
    match agent.await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Failure::Runtime(e.to_string())),
        Err(e) => Err(Failure::Runtime(e.to_string())),
    }
}
