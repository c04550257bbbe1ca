//! A simulated fleet: many hosts in one process, for scale and chaos tests. Hosts are data —
//! one [`HostCore`] each — inside shard tasks of up to [`FleetConfig::shard_hosts`] hosts; every
//! shard multiplexes its hosts over the process's one QUIC connection to the cell: one
//! registration per host, one assignment stream per shard, one `Heartbeats` message per shard
//! per tick. Replicas run on the `sim` driver.
//!
//! Each shard loops: connect, register its hosts (a bounded number at a time), subscribe, then
//! heartbeat, take assignments and report until the stream ends; then it starts over. While
//! the cell is away every simulated replica keeps "running" and reports wait in the cores.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cellplane_api::wire::{HOSTS_PER_MESSAGE_MAX, Message, Register};
use cellplane_api::{Host, HostId};
use cellplane_transport::{Backoff, Connection, Identity, Peer, TransportError, Watch};
use tokio::sync::{mpsc, watch};

use crate::agent::CellAddress;
use crate::core::host::{Command, HostConfig, HostCore, SlotKey};
use crate::driver::{Driver, DriverEvent, SimDriver};

/// How a fleet runs.
#[derive(Debug, Clone, Copy)]
pub struct FleetConfig {
    /// Hosts per shard task (and per assignment stream); at most `HOSTS_PER_MESSAGE_MAX`.
    pub shard_hosts: usize,
    /// Host core settings (heartbeat interval).
    pub host: HostConfig,
    /// Registrations in flight per shard.
    pub registrations_in_flight: usize,
    /// Sim driver: longest start delay.
    pub start_delay_ms: u64,
    /// Sim driver: starts that fail, per thousand.
    pub failure_per_mille: u64,
    /// Seed of every random draw.
    pub seed: u64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            shard_hosts: 1_000,
            host: HostConfig::default(),
            registrations_in_flight: 16,
            start_delay_ms: 50,
            failure_per_mille: 0,
            seed: 1,
        }
    }
}

/// How far a fleet has come.
#[derive(Debug, Default)]
pub struct Progress {
    /// Hosts whose registration the cell acknowledged (counted again after a reconnection).
    pub registered: AtomicUsize,
    /// Shards subscribed now.
    pub subscribed: AtomicUsize,
}

const DEADLINE: Duration = Duration::from_secs(10);
const TICK: Duration = Duration::from_millis(100);

/// Runs `hosts` against `cell` until `shutdown` fires.
pub async fn run(
    cell: CellAddress,
    hosts: Vec<Host>,
    config: FleetConfig,
    progress: Arc<Progress>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), TransportError> {
    let expect = Identity::Cell(cell.name.clone());
    let peer = Arc::new(Peer::connect(cell.addr, expect, cell.setup, Backoff::default(), None)?);
    let shard_hosts = config.shard_hosts.clamp(1, HOSTS_PER_MESSAGE_MAX);
    let mut shards = tokio::task::JoinSet::new();
    let mut hosts = hosts.into_iter().peekable();
    let mut index = 0u64;
    while hosts.peek().is_some() {
        let chunk: Vec<Host> = hosts.by_ref().take(shard_hosts).collect();
        let shard = Shard::new(chunk, config, index);
        index += 1;
        shards.spawn(shard.run(peer.clone(), progress.clone(), shutdown.clone()));
    }
    while shards.join_next().await.is_some() {}
    Ok(())
}

struct Shard {
    cores: HashMap<HostId, HostCore>,
    order: Vec<HostId>,
    slots: HashMap<SlotKey, HostId>,
    driver: SimDriver,
    events: mpsc::Receiver<DriverEvent>,
    config: FleetConfig,
}

impl Shard {
    fn new(hosts: Vec<Host>, config: FleetConfig, index: u64) -> Self {
        let (sender, events) = mpsc::channel(4_096);
        let seed = config.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(index);
        let driver =
            SimDriver::new(sender, config.start_delay_ms, config.failure_per_mille, seed.max(1));
        let beat_ms = config.host.heartbeat_ms.max(1);
        let order: Vec<HostId> = hosts.iter().map(|h| h.id).collect();
        let cores = hosts
            .into_iter()
            .enumerate()
            .map(|(i, host)| {
                // Spread first beats over the interval so ticks carry even batches.
                let first = (i as u64 * beat_ms) / order.len().max(1) as u64;
                (host.id, HostCore::new(host, config.host).with_first_beat(first))
            })
            .collect();
        Self { cores, order, slots: HashMap::new(), driver, events, config }
    }

    async fn run(
        mut self,
        peer: Arc<Peer>,
        progress: Arc<Progress>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let start = Instant::now();
        loop {
            let session = tokio::select! {
                session = self.open(&peer, &progress) => session,
                _ = shutdown.changed() => return,
            };
            let Some((connection, mut stream)) = session else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            progress.subscribed.fetch_add(1, Ordering::Relaxed);
            self.cores.values_mut().for_each(|c| c.handle_connected(true));
            let mut tick = tokio::time::interval(TICK);
            loop {
                let mut touched: Vec<HostId> = Vec::new();
                tokio::select! {
                    _ = tick.tick() => {
                        let now = start.elapsed().as_millis() as u64;
                        let beats: Vec<_> =
                            self.order.iter().filter_map(|id| self.cores.get_mut(id)?.handle_tick(now)).collect();
                        // A beat may come with a resync of the host's reports: send those too.
                        touched.extend(beats.iter().map(|beat| beat.host));
                        if !beats.is_empty() {
                            let _ = connection.send(0, &Message::Heartbeats(beats)).await;
                        }
                    }
                    item = stream.next() => match item {
                        Some(Ok(message)) => self.route(message, &mut touched),
                        Some(Err(_)) | None => break,
                    },
                    Some(event) = self.events.recv() => {
                        if let Some(&host) = self.slots.get(&event.key)
                            && let Some(core) = self.cores.get_mut(&host)
                        {
                            core.handle_driver(&event.key, event.phase, event.detail);
                            touched.push(host);
                        }
                    }
                    _ = shutdown.changed() => return,
                }
                self.act(&touched, &connection).await;
            }
            progress.subscribed.fetch_sub(1, Ordering::Relaxed);
            self.cores.values_mut().for_each(|c| c.handle_connected(false));
        }
    }

    async fn open(&self, peer: &Peer, progress: &Progress) -> Option<(Connection, Watch)> {
        let connection = peer.connection(DEADLINE).await.ok()?;
        let mut registering = tokio::task::JoinSet::new();
        let mut pending = self.order.iter().map(|id| self.cores[id].register());
        let mut ok = true;
        loop {
            while registering.len() < self.config.registrations_in_flight.max(1) {
                let Some(host) = pending.next() else { break };
                let connection = connection.clone();
                registering.spawn(async move {
                    let register = Message::Register(Box::new(Register { host }));
                    matches!(connection.request(0, &register, DEADLINE).await, Ok(Message::Done(_)))
                });
            }
            match registering.join_next().await {
                Some(Ok(true)) => {
                    progress.registered.fetch_add(1, Ordering::Relaxed);
                }
                Some(_) => ok = false,
                None => break,
            }
        }
        if !ok {
            return None; // try the whole shard again: registration is idempotent
        }
        let stream = connection.watch(0, &Message::Subscribe(self.order.clone())).await.ok()?;
        Some((connection, stream))
    }

    fn route(&mut self, message: Message, touched: &mut Vec<HostId>) {
        let host = match &message {
            Message::Assign(a) => a.replica.host,
            Message::Unassign(u) => Some(u.host),
            Message::Power(p) => Some(p.host),
            Message::Synced(epoch) => {
                for (id, core) in &mut self.cores {
                    core.handle_synced(*epoch);
                    touched.push(*id);
                }
                return;
            }
            _ => None,
        };
        let Some(core) = host.and_then(|h| self.cores.get_mut(&h)) else { return };
        match &message {
            Message::Assign(a) => {
                let _ = core.handle_assign(a); // a refusal is reported by the core
            }
            Message::Unassign(u) => core.handle_unassign(u),
            Message::Power(p) => core.handle_power(p),
            _ => {}
        }
        touched.push(core.id());
    }

    async fn act(&mut self, touched: &[HostId], connection: &Connection) {
        for id in touched {
            let Some(core) = self.cores.get_mut(id) else { continue };
            while let Some(command) = core.poll_command() {
                match command {
                    Command::Start { key, spec } => {
                        self.slots.insert(key.clone(), *id);
                        if let Err(e) = self.driver.start(key.clone(), &spec) {
                            core.handle_driver(
                                &key,
                                cellplane_api::ReplicaPhase::Failed,
                                e.to_string(),
                            );
                        }
                    }
                    Command::Stop { key } => {
                        self.driver.stop(&key);
                        self.slots.remove(&key);
                    }
                    Command::Power { key, action } => {
                        let _ = self.driver.power(&key, action);
                    }
                }
            }
            while let Some(report) = core.poll_report() {
                let _ = connection.send(0, &Message::Status(Box::new(report))).await;
            }
        }
    }
}
