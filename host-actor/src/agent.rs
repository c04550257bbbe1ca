//! The agent shell: one host, one cell, over QUIC. A short loop around [`HostCore`]: it feeds
//! the core what arrives (assignments, driver events, time) and carries out what the core
//! decides (driver commands, heartbeats, status reports). When the cell is unreachable the
//! replicas keep running and the core keeps their reports; on reconnection the agent registers
//! again and re-subscribes, and the core reconciles.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cellplane_api::Name;
use cellplane_api::wire::{Message, Register};
use cellplane_transport::{Backoff, Connection, Identity, Peer, Setup, TransportError};
use tokio::sync::mpsc;

use crate::core::host::{Command, HostCore};
use crate::driver::{Driver, DriverEvent};

/// Where the agent's cell is.
#[derive(Clone)]
pub struct CellAddress {
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// Its name (its certificate must say so).
    pub name: Name,
    /// This host's credentials and the region CA.
    pub setup: Setup,
}

const DEADLINE: Duration = Duration::from_secs(5);

/// Runs the agent until `shutdown` fires. Errors only when the transport cannot be set up.
pub async fn run(
    cell: CellAddress,
    mut core: HostCore,
    driver: Arc<dyn Driver>,
    mut events: mpsc::Receiver<DriverEvent>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<(), TransportError> {
    let peer = Peer::connect(
        cell.addr,
        Identity::Cell(cell.name.clone()),
        cell.setup.clone(),
        Backoff::default(),
        None,
    )?;
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        // Connect, register, subscribe; meanwhile keep the driver's events flowing.
        let session = tokio::select! {
            session = open(&peer, &core) => session,
            Some(event) = events.recv() => {
                core.handle_driver(&event.key, event.phase, event.detail);
                continue;
            }
            _ = shutdown.changed() => return Ok(()),
        };
        let Some((connection, mut stream)) = session else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        core.handle_connected(true);
        tracing::info!(host = core.id().0, "subscribed to the cell");
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Some(beat) = core.handle_tick(start.elapsed().as_millis() as u64) {
                        let _ = connection.send(0, &Message::Heartbeat(beat)).await;
                    }
                }
                item = stream.next() => match item {
                    Some(Ok(Message::Assign(a))) => {
                        if let Err(refusal) = core.handle_assign(&a) {
                            tracing::warn!(%refusal, "assignment refused");
                        }
                    }
                    Some(Ok(Message::Unassign(u))) => core.handle_unassign(&u),
                    Some(Ok(Message::Power(p))) => core.handle_power(&p),
                    Some(Ok(Message::Synced(epoch))) => {
                        core.handle_synced(epoch);
                        carry_out(&mut core, driver.as_ref());
                        driver.synced();
                    }
                    Some(Ok(other)) => tracing::debug!(?other, "ignored"),
                    Some(Err(_)) | None => break, // the cell went away or ended the stream
                },
                Some(event) = events.recv() => {
                    core.handle_driver(&event.key, event.phase, event.detail);
                }
                _ = shutdown.changed() => return Ok(()),
            }
            carry_out(&mut core, driver.as_ref());
            while let Some(report) = core.poll_report() {
                let _ = connection.send(0, &Message::Status(Box::new(report))).await;
            }
        }
        core.handle_connected(false);
        tracing::warn!(host = core.id().0, "lost the cell; workloads keep running");
    }
}

async fn open(peer: &Peer, core: &HostCore) -> Option<(Connection, cellplane_transport::Watch)> {
    let connection = peer.connection(DEADLINE).await.ok()?;
    let register = Message::Register(Box::new(Register { host: core.register() }));
    match connection.request(0, &register, DEADLINE).await {
        Ok(Message::Done(_)) => {}
        other => {
            tracing::warn!(?other, "registration refused");
            return None;
        }
    }
    let stream = connection.watch(0, &Message::Subscribe(vec![core.id()])).await.ok()?;
    Some((connection, stream))
}

/// Carries out what the core decided; a driver's refusal goes back to the core as a failure.
pub fn carry_out(core: &mut HostCore, driver: &dyn Driver) {
    while let Some(command) = core.poll_command() {
        match command {
            Command::Start { key, spec } => {
                if let Err(e) = driver.start(key.clone(), &spec) {
                    core.handle_driver(&key, cellplane_api::ReplicaPhase::Failed, e.to_string());
                }
            }
            Command::Stop { key } => driver.stop(&key),
            Command::Power { key, action } => {
                if let Err(e) = driver.power(&key, action) {
                    tracing::warn!(error = %e, "power action refused");
                }
            }
        }
    }
}
