//! The `cellplane` command. Today it manages a region's certificates; bring-up (`up`, `down`,
//! `status`), tenants, workloads and the demo arrive with their issues.
//!
//! Exit codes: 0 success, 1 a runtime failure, 2 bad usage or input.

use std::path::PathBuf;
use std::process::ExitCode;

use cellplane_api::{Name, TenantId};
use cellplane_transport::{CertificateAuthority, Identity, Role};
use clap::{Parser, Subcommand, ValueEnum};

/// cellplane: a control plane for hyperscale cloud regions.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the region's certificate authority and component certificates.
    #[command(subcommand)]
    Pki(Pki),
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

fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
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
