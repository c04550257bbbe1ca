//! How a host agent or a fleet reaches its cell: the flags both take.

use std::net::SocketAddr;
use std::path::PathBuf;

use cellplane_api::{CellId, Name};
use cellplane_host_actor::agent::CellAddress;
use cellplane_transport::identity::load_ca_certificate;
use cellplane_transport::{Credentials, Setup};

use crate::Failure;

/// The cell, and the host credentials to reach it with.
#[derive(clap::Args)]
pub struct CellLink {
    /// The cell's QUIC address.
    #[arg(long)]
    pub cell: SocketAddr,
    /// The cell's name (its certificate must say so).
    #[arg(long)]
    pub cell_name: String,
    /// The directory holding ca.crt and the host credentials.
    #[arg(long)]
    pub pki: PathBuf,
    /// The stem of the host credentials in --pki (`cellplane pki issue --kind host`).
    #[arg(long)]
    pub credentials: String,
}

impl CellLink {
    /// The cell's id, checked.
    pub fn cell_id(&self) -> Result<CellId, Failure> {
        CellId::new(&self.cell_name).map_err(|e| Failure::Input(format!("--cell-name: {e}")))
    }

    /// Everything needed to connect, read and checked.
    pub fn address(&self) -> Result<CellAddress, Failure> {
        let name =
            Name::new(&self.cell_name).map_err(|e| Failure::Input(format!("--cell-name: {e}")))?;
        let credentials = Credentials::load(&self.pki, &self.credentials).map_err(|e| {
            let dir = self.pki.display();
            Failure::Input(format!("--credentials {} in {dir}: {e}", self.credentials))
        })?;
        let ca = load_ca_certificate(&self.pki).map_err(|e| Failure::Input(e.to_string()))?;
        Ok(CellAddress { addr: self.cell, name, setup: Setup::new(credentials, ca) })
    }
}
