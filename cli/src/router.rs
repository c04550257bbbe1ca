//! `cellplane router`: the region router.

use std::path::{Path, PathBuf};

use cellplane_region::{Router, RouterConfig};
use cellplane_storage::Database;
use cellplane_transport::identity::load_ca_certificate;
use cellplane_transport::{CertificateAuthority, Credentials, Kind, Server, Setup};

use crate::Failure;

/// Reads the region's config: TOML, unknown keys refused, errors naming the file and line.
pub fn read_config(path: &Path) -> Result<RouterConfig, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Input(format!("{}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| Failure::Input(format!("{}: {e}", path.display())))
}

/// Runs the router until SIGINT or SIGTERM.
pub async fn serve(
    config: PathBuf,
    data: PathBuf,
    pki: PathBuf,
    credentials: String,
) -> Result<(), Failure> {
    let config = read_config(&config)?;
    let runtime = |e: &dyn std::fmt::Display| Failure::Runtime(e.to_string());
    let own = Credentials::load(&pki, &credentials).map_err(|e| {
        Failure::Input(format!(
            "no credentials {credentials} in {} ({e}); run `cellplane pki issue --kind router`",
            pki.display()
        ))
    })?;
    let ca = load_ca_certificate(&pki).map_err(|e| Failure::Input(e.to_string()))?;
    // With the CA's key at hand the router issues tenants' credentials; without, it does not.
    let authority = CertificateAuthority::load(&pki).ok();
    std::fs::create_dir_all(&data)
        .map_err(|e| Failure::Runtime(format!("{}: {e}", data.display())))?;
    let db = Database::open_embedded(&data).map_err(|e| runtime(&e))?;
    let listen = config.listen;
    let region = config.region.clone();
    let setup = Setup::new(own, ca);
    let router =
        Router::start(config, db, setup.clone(), authority).await.map_err(|e| runtime(&e))?;
    let (inbound, arrivals) = tokio::sync::mpsc::channel(65_536);
    let (server, _connections) =
        Server::bind(listen, setup, &[Kind::Client], inbound).map_err(|e| runtime(&e))?;
    let addr = server.local_addr().map_err(|e| runtime(&e))?;
    let serving = tokio::spawn(router.serve(arrivals));
    println!("router of region {region} serving on {addr}");
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| runtime(&e))?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    server.close();
    serving.abort();
    Ok(())
}
