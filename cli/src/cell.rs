//! `cellplane cell`: serve one cell from a data directory and a config file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use cellplane_cell::{CellConfig, Gateway, RunningCell};
use cellplane_storage::Database;
use cellplane_transport::identity::load_ca_certificate;
use cellplane_transport::{Credentials, Kind, Server, Setup};

use crate::Failure;

/// Reads a cell's config: TOML, unknown keys refused, errors naming the file and line.
pub fn read_config(path: &Path) -> Result<CellConfig, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::Input(format!("{}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| Failure::Input(format!("{}: {e}", path.display())))
}

/// Runs the cell until it is told to stop (SIGINT, SIGTERM) or gives up.
pub async fn serve(config: PathBuf, data: PathBuf, pki: PathBuf) -> Result<(), Failure> {
    let config = read_config(&config)?;
    let runtime = |e: &dyn std::fmt::Display| Failure::Runtime(e.to_string());
    let credentials = Credentials::load(&pki, config.cell.as_str()).map_err(|e| {
        Failure::Input(format!(
            "no credentials for cell {} in {} ({e}); run `cellplane pki issue --kind cell --id {}`",
            config.cell,
            pki.display(),
            config.cell
        ))
    })?;
    let ca = load_ca_certificate(&pki).map_err(|e| Failure::Input(e.to_string()))?;
    std::fs::create_dir_all(&data)
        .map_err(|e| Failure::Runtime(format!("{}: {e}", data.display())))?;
    let db = Database::open_embedded(&data).map_err(|e| runtime(&e))?;
    let listen = config.listen;
    let name = config.cell.clone();
    let mut cell = RunningCell::start(config, db).await.map_err(|e| runtime(&e))?;
    let (inbound, arrivals) = tokio::sync::mpsc::channel(65_536);
    let setup = Setup::new(credentials, ca);
    let allowed = [Kind::Router, Kind::Host, Kind::Client];
    let (server, _connections) =
        Server::bind(listen, setup, &allowed, inbound).map_err(|e| runtime(&e))?;
    let addr = server.local_addr().map_err(|e| runtime(&e))?;
    let gateway = Gateway::new(Arc::clone(cell.shared()));
    let serving = tokio::spawn(gateway.serve(arrivals));
    // One line for people and for scripts that wait for it.
    println!("cell {name} serving on {addr} at epoch {}", cell.epoch());
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| runtime(&e))?;
    let gave_up = tokio::select! {
        _ = tokio::signal::ctrl_c() => false,
        _ = terminate.recv() => false,
        () = cell.stopped() => true,
    };
    server.close();
    serving.abort();
    if gave_up {
        return Err(Failure::Runtime(format!("cell {name} stopped: a child kept failing")));
    }
    cell.stop().await;
    eprintln!("cell {name} stopped");
    Ok(())
}
