//! The `cellplane` command: a region's certificates (`pki`) and its processes (`cell`);
//! bring-up (`up`, `down`, `status`), tenants, workloads and the demo arrive with their issues.
//!
//! Exit codes: 0 success, 1 a runtime failure, 2 bad usage or input.

use std::path::PathBuf;
use std::process::ExitCode;

use cellplane_api::{Name, TenantId};
use cellplane_transport::{CertificateAuthority, Identity, Role};
use clap::{Parser, Subcommand, ValueEnum};

mod cell;
mod demo;
mod host;
mod hosts;
mod link;
mod ops;
mod router;

/// cellplane: a control plane for hyperscale cloud regions.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log as JSON lines (to stderr) instead of text; RUST_LOG filters either way.
    #[arg(long, global = true)]
    log_json: bool,
    /// Serve Prometheus metrics on this address (at /metrics): cell, router, host and fleet
    /// processes.
    #[arg(long, global = true)]
    metrics: Option<std::net::SocketAddr>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole region on this machine, exercise it and print a report: cells, simulated
    /// fleets and the router as separate processes; two tenants; container and VM workloads,
    /// replicated and stateful; a batch of hosts killed and their replicas re-placed; tenant
    /// isolation checked. Cleans up everything it started.
    Demo(demo::DemoArgs),
    /// Bring a local region up from a spec: router, cells and simulated fleets as separate
    /// processes on the embedded store, with progress bars while hosts join. Returns once the
    /// region is healthy; running it again starts only what is not running.
    ///
    /// The spec (TOML): `region`, `router` (address, default 127.0.0.1:7000), `[[sites]]`
    /// (`id`, `kind`, `location`, `latency_ms`), `[[cells]]` (`id`, `site`, `listen`, `hosts`).
    Up {
        /// The region spec.
        #[arg(long)]
        spec: PathBuf,
        /// Where the region keeps everything.
        #[arg(long, default_value = "cellplane-region")]
        data: PathBuf,
    },
    /// Stop every process `cellplane up` started.
    Down {
        /// The region's data directory.
        #[arg(long, default_value = "cellplane-region")]
        data: PathBuf,
    },
    /// Show cells, hosts by state, tenants and utilisation.
    Status {
        /// The region's data directory.
        #[arg(long, default_value = "cellplane-region")]
        data: PathBuf,
    },
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Apply a manifest (YAML: cellplane's own, Kubernetes Deployment/StatefulSet/Pod, KubeVirt
    /// VirtualMachine; several documents are applied all or nothing).
    Apply {
        /// The manifest.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[command(flatten)]
        at: TenantAt,
    },
    /// Show one workload, or list them all.
    Get {
        /// The workload (all when left out).
        name: Option<String>,
        #[command(flatten)]
        at: TenantAt,
    },
    /// Delete a workload and stop its replicas.
    Delete {
        /// The workload.
        name: String,
        #[command(flatten)]
        at: TenantAt,
    },
    /// Change a workload's replica count.
    Scale {
        /// The workload.
        name: String,
        /// The new count.
        replicas: u32,
        #[command(flatten)]
        at: TenantAt,
    },
    /// Print a tenant's workload changes as they happen (until interrupted).
    Watch {
        #[command(flatten)]
        at: TenantAt,
    },
    /// Manage the region's certificate authority and component certificates.
    #[command(subcommand)]
    Pki(Pki),
    /// Serve one cell: its hosts, its tenants' workloads, its keyspace on the embedded store.
    ///
    /// Reads CONFIG (TOML: `cell = "c1"` is required; `listen`, `hosts_max`, `shard_hosts`,
    /// `tick_ms`, `restarts_max`, `restart_window_ms`, `calls_max` and `[lease]` with
    /// `suspect_after_ms` and `down_after_ms` have defaults), recovers everything stored in
    /// DATA under a new epoch, and serves QUIC with the credentials `<cell>.crt`/`<cell>.key`
    /// and `ca.crt` from PKI. Prints one line `cell NAME serving on ADDR at epoch N` once ready;
    /// stops cleanly on SIGINT or SIGTERM.
    Cell {
        /// The cell's config file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// The directory of the cell's store (created if missing).
        #[arg(long)]
        data: PathBuf,
        /// The directory holding ca.crt and the cell's credentials.
        #[arg(long)]
        pki: PathBuf,
    },
    /// Run the agent of one host: register with a cell, heartbeat, run assigned container
    /// workloads as local processes (logs in --logs), report their status.
    ///
    /// Stops cleanly on SIGINT or SIGTERM; the replicas it started stop with it.
    Host(host::HostArgs),
    /// Run a simulated fleet: N hosts in one process, in shards of hosts as data, over one
    /// QUIC connection to their cell; replicas run on the `sim` driver.
    ///
    /// Prints progress while the hosts join and one line `fleet of N hosts joined cell C in
    /// T s` once every shard is registered and subscribed; stops on SIGINT or SIGTERM.
    Hosts(hosts::FleetArgs),
    /// Run the region router: tenants, their home cells, and the routing of every tenant call
    /// to the cell that holds the object.
    ///
    /// Reads CONFIG (TOML: `region`, `listen`, `[[sites]]` with `id`, `kind` (cloud or edge),
    /// `location` and `[sites.latency_ms]`, `[[cells]]` with `id`, `site`, `address`, and
    /// optional `[limits]` `rate_per_s`, `burst`, `summary_ms`, `call_deadline_ms`), keeps its
    /// directory in DATA, and serves clients over QUIC. With the CA's key in PKI it issues each
    /// new tenant's client credentials. Prints `router of region R serving on ADDR` once ready.
    Router {
        /// The region's config file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// The directory of the router's directory store (created if missing).
        #[arg(long)]
        data: PathBuf,
        /// The directory holding ca.crt (and ca.key to issue tenants' credentials).
        #[arg(long)]
        pki: PathBuf,
        /// The stem of the router's credentials in --pki.
        #[arg(long, default_value = "router")]
        credentials: String,
    },
}

/// Which tenant, in which region.
#[derive(clap::Args)]
struct TenantAt {
    /// The tenant (its credentials are in DATA/pki).
    #[arg(long)]
    tenant: String,
    /// The region's data directory.
    #[arg(long, default_value = "cellplane-region")]
    data: PathBuf,
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Create a tenant; its client credentials are written to DATA/pki/NAME.crt and .key.
    Create {
        /// The tenant's name (a DNS label).
        name: String,
        /// The region's data directory.
        #[arg(long, default_value = "cellplane-region")]
        data: PathBuf,
        /// CPU quota, in thousandths of a core.
        #[arg(long, default_value_t = 1_000_000)]
        cpu_milli: u64,
        /// Memory quota, in MiB.
        #[arg(long, default_value_t = 4_194_304)]
        memory_mib: u64,
        /// Replica quota.
        #[arg(long, default_value_t = 10_000)]
        replicas: u32,
        /// Workload quota.
        #[arg(long, default_value_t = 100)]
        workloads: u32,
    },
}

#[derive(Subcommand)]
enum Pki {
    /// Create the region CA in DIR (ca.crt, ca.key). Refuses to overwrite an existing one.
    Init {
        /// Where the CA files go.
        #[arg(long)]
        dir: PathBuf,
        /// The region's name, written into the CA certificate.
        #[arg(long, default_value = "local")]
        region: String,
    },
    /// Issue credentials (<name>.crt, <name>.key) signed by the CA in DIR.
    Issue {
        /// The directory holding the CA; the credentials are written there too.
        #[arg(long)]
        dir: PathBuf,
        /// What the certificate is for.
        #[arg(long, value_enum)]
        kind: KindArg,
        /// The component's id (router, cell, host) or the tenant (client): a DNS label.
        #[arg(long)]
        id: String,
        /// For clients: operator sees across tenants; tenant sees only its own.
        #[arg(long, value_enum, default_value = "tenant")]
        role: RoleArg,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    Router,
    Cell,
    Host,
    Client,
}

#[derive(Clone, Copy, ValueEnum)]
enum RoleArg {
    Tenant,
    Operator,
}

/// A failure, and whether it was the user's input (exit 2) or the world (exit 1).
enum Failure {
    Input(String),
    Runtime(String),
}

/// mimalloc: the storage write path allocates on callers' threads and frees on the writer's;
/// `bench-storage` measured group commit at 60-64% of the raw engine's rate with the system
/// allocator and 75-85% with this one (docs/ARCHITECTURE.md, "Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Input(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

/// Logs to stderr (`RUST_LOG` filters; warnings by default) and a multi-threaded runtime.
/// Logs to stderr (`RUST_LOG` filters; warnings by default; JSON with `--log-json`), serves
/// metrics when asked, and returns a multi-threaded runtime.
fn runtime_with(
    log_json: bool,
    metrics: Option<std::net::SocketAddr>,
) -> Result<tokio::runtime::Runtime, Failure> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    let logs = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if log_json {
        logs.json().init();
    } else {
        logs.init();
    }
    let runtime = tokio::runtime::Runtime::new()
        .map_err(|e| Failure::Runtime(format!("cannot start the runtime: {e}")))?;
    if let Some(addr) = metrics {
        let _guard = runtime.enter();
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| Failure::Runtime(format!("--metrics {addr}: {e}")))?;
    }
    Ok(runtime)
}

fn run(cli: Cli) -> Result<(), Failure> {
    let (log_json, metrics) = (cli.log_json, cli.metrics);
    let runtime = || runtime_with(log_json, metrics);
    match cli.command {
        Command::Cell { config, data, pki } => runtime()?.block_on(cell::serve(config, data, pki)),
        Command::Host(args) => runtime()?.block_on(host::serve(args)),
        Command::Hosts(args) => runtime()?.block_on(hosts::serve(args)),
        Command::Demo(args) => runtime()?.block_on(demo::run(args)),
        Command::Up { spec, data } => runtime()?.block_on(ops::up(&spec, &data)),
        Command::Down { data } => ops::down(&data),
        Command::Status { data } => runtime()?.block_on(ops::status(&data)),
        Command::Tenant(TenantCommand::Create {
            name,
            data,
            cpu_milli,
            memory_mib,
            replicas,
            workloads,
        }) => {
            let quota = ops::QuotaArgs { cpu_milli, memory_mib, replicas, workloads };
            runtime()?.block_on(ops::tenant_create(&data, &name, quota))
        }
        Command::Apply { file, at } => runtime()?.block_on(ops::apply(&at.data, &at.tenant, &file)),
        Command::Get { name, at } => {
            runtime()?.block_on(ops::get(&at.data, &at.tenant, name.as_deref()))
        }
        Command::Delete { name, at } => {
            runtime()?.block_on(ops::delete(&at.data, &at.tenant, &name))
        }
        Command::Scale { name, replicas, at } => {
            runtime()?.block_on(ops::scale(&at.data, &at.tenant, &name, replicas))
        }
        Command::Watch { at } => runtime()?.block_on(ops::watch(&at.data, &at.tenant)),
        Command::Router { config, data, pki, credentials } => {
            runtime()?.block_on(router::serve(config, data, pki, credentials))
        }
        Command::Pki(Pki::Init { dir, region }) => {
            if dir.join("ca.key").exists() {
                return Err(Failure::Input(format!(
                    "{} already holds a CA; remove it first if you mean to replace it",
                    dir.display()
                )));
            }
            let ca = CertificateAuthority::generate(&region)
                .map_err(|e| Failure::Runtime(e.to_string()))?;
            ca.save(&dir).map_err(|e| Failure::Runtime(e.to_string()))?;
            println!("created the CA of region {region} in {}", dir.display());
            Ok(())
        }
        Command::Pki(Pki::Issue { dir, kind, id, role }) => {
            let name = |id: &str| Name::new(id).map_err(|e| Failure::Input(format!("--id: {e}")));
            let identity = match kind {
                KindArg::Router => Identity::Router(name(&id)?),
                KindArg::Cell => Identity::Cell(name(&id)?),
                KindArg::Host => Identity::Host(name(&id)?),
                KindArg::Client => Identity::Client {
                    tenant: TenantId::new(&id).map_err(|e| Failure::Input(format!("--id: {e}")))?,
                    role: match role {
                        RoleArg::Tenant => Role::Tenant,
                        RoleArg::Operator => Role::Operator,
                    },
                },
            };
            let ca = CertificateAuthority::load(&dir).map_err(|e| {
                Failure::Input(format!(
                    "no CA in {} ({e}); run `cellplane pki init`",
                    dir.display()
                ))
            })?;
            let credentials = ca.issue(&identity).map_err(|e| Failure::Runtime(e.to_string()))?;
            credentials.save(&dir, &id).map_err(|e| Failure::Runtime(e.to_string()))?;
            println!("issued {identity} as {}/{id}.crt", dir.display());
            Ok(())
        }
    }
}
