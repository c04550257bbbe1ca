//! The cell supervisor and the handle a process holds on a running cell.
//!
//! Tree and restart strategy:
//! ```text
//! cell supervisor        one-for-one; at most `restarts_max` restarts within
//!  |                     `restart_window_ms`, else the cell stops (the process exits non-zero
//!  |                     and its own supervisor restarts it, recovering from storage)
//!  +- workloads          scheduler + controllers; restarted: bumps the epoch, rebuilds from
//!  |                     storage, hosts re-subscribe
//!  +- shard 0..n         ~1,000 hosts each; restarted: reads its hosts back, fresh leases
//! persistence            the group committer task: one ordered queue into storage
//! gateway                the QUIC endpoint's tasks; stateless, they look actors up by name
//! ```
//! A crashed shard is restarted alone: the other shards and the workloads actor keep serving
//! (their messages to the dead shard fail fast as `Unavailable` until it is back).
//!
//! Children find each other through [`Shared`]: every actor registers itself there when it
//! starts, so a restarted child is reachable by the time it handles its first message.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use cellplane_api::HostId;
use cellplane_storage::Database;
use cellplane_storage::group::{GroupCommitter, GroupOptions};
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::config::CellConfig;
use crate::{records, shard, workloads};

/// What every part of a cell shares.
pub struct Shared {
    /// The configuration.
    pub config: CellConfig,
    /// The store.
    pub db: Database,
    /// The persistence queue.
    pub committer: GroupCommitter,
    /// The current epoch (set by the workloads actor when it recovers).
    pub epoch: AtomicU64,
    stopping: AtomicBool,
    start: Instant,
    workloads: RwLock<Option<ActorRef<workloads::Msg>>>,
    shards: Vec<RwLock<Option<ActorRef<shard::Msg>>>>,
}

impl Shared {
    fn new(config: CellConfig, db: Database) -> Self {
        let shards = (0..config.shards()).map(|_| RwLock::new(None)).collect();
        Self {
            committer: GroupCommitter::spawn(db.clone(), GroupOptions::default()),
            config,
            db,
            epoch: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            start: Instant::now(),
            workloads: RwLock::new(None),
            shards,
        }
    }

    /// Milliseconds since the cell started: the only clock the cores see.
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// The shard that owns `host`.
    pub fn shard_of(&self, host: HostId) -> usize {
        (host.0 % self.shards.len() as u64) as usize
    }

    /// Sends to the workloads actor; `false` while it is restarting.
    pub fn tell_workloads(&self, message: workloads::Msg) -> bool {
        let actor = read(&self.workloads).clone();
        actor.is_some_and(|a| a.send_message(message).is_ok())
    }

    /// Sends to the shard of `host`; `false` while it is restarting.
    pub fn tell_shard(&self, host: HostId, message: shard::Msg) -> bool {
        let actor = read(&self.shards[self.shard_of(host)]).clone();
        actor.is_some_and(|a| a.send_message(message).is_ok())
    }

    /// Asks every shard to send its hosts to the workloads actor.
    pub fn republish_hosts(&self) {
        for shard in &self.shards {
            if let Some(actor) = read(shard).as_ref() {
                let _ = actor.send_message(shard::Msg::Republish);
            }
        }
    }

    /// Makes `actor` the workloads actor.
    pub fn register_workloads(&self, actor: ActorRef<workloads::Msg>) {
        *write(&self.workloads) = Some(actor);
    }

    /// Makes `actor` shard `index`.
    pub fn register_shard(&self, index: usize, actor: ActorRef<shard::Msg>) {
        *write(&self.shards[index]) = Some(actor);
    }

    /// Chaos: makes the workloads actor (`None`) or one shard fail as a bug would.
    pub fn crash(&self, shard: Option<usize>) -> bool {
        match shard {
            None => self.tell_workloads(workloads::Msg::Crash),
            Some(i) => read(&self.shards[i])
                .as_ref()
                .is_some_and(|a| a.send_message(shard::Msg::Crash).is_ok()),
        }
    }
}

fn read<T: Clone>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    // A panic while holding this lock only ever replaced an actor ref: the value is whole.
    lock.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Which child an actor is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Child {
    Workloads,
    Shard(usize),
}

/// The supervisor actor.
pub struct Supervisor;

/// Its state.
pub struct SupervisorState {
    shared: Arc<Shared>,
    children: HashMap<ActorId, Child>,
    restarts: HashMap<Child, VecDeque<Instant>>,
}

impl std::hash::Hash for Child {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        match self {
            Child::Workloads => usize::MAX.hash(state),
            Child::Shard(i) => i.hash(state),
        }
    }
}

impl Actor for Supervisor {
    type Msg = ();
    type State = SupervisorState;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        myself: ActorRef<()>,
        shared: Arc<Shared>,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let mut state =
            SupervisorState { shared, children: HashMap::new(), restarts: HashMap::new() };
        // The workloads actor first: it bumps the epoch and recovers, and shards report to it.
        state.spawn(myself.get_cell(), Child::Workloads, None).await?;
        let hosts = records::load_hosts(&state.shared.db, &state.shared.config.cell).await?;
        let mut by_shard: Vec<Vec<_>> = vec![Vec::new(); state.shared.shards.len()];
        for host in hosts {
            by_shard[state.shared.shard_of(host.id)].push(host);
        }
        for (index, hosts) in by_shard.into_iter().enumerate() {
            state.spawn(myself.get_cell(), Child::Shard(index), Some(hosts)).await?;
        }
        Ok(state)
    }

    async fn post_stop(
        &self,
        myself: ActorRef<()>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        state.shared.stopping.store(true, Ordering::Relaxed);
        myself.stop_children_and_wait(None, Some(Duration::from_secs(10))).await;
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match event {
            SupervisionEvent::ActorFailed(cell, error) => (cell, error.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".into()))
            }
            _ => return Ok(()),
        };
        let Some(child) = state.children.remove(&cell.get_id()) else { return Ok(()) };
        if state.shared.stopping.load(Ordering::Relaxed) {
            return Ok(());
        }
        tracing::warn!(?child, %why, "cell child ended; restarting it");
        let window = Duration::from_millis(state.shared.config.restart_window_ms);
        let recent = state.restarts.entry(child).or_default();
        recent.retain(|at| at.elapsed() < window);
        if recent.len() >= state.shared.config.restarts_max {
            let reason =
                format!("{child:?} failed {} times within {window:?}: {why}", recent.len());
            tracing::error!(%reason, "cell gives up");
            myself.stop(Some(reason));
            return Ok(());
        }
        recent.push_back(Instant::now());
        if let Err(e) = state.spawn(myself.get_cell(), child, None).await {
            myself.stop(Some(format!("cannot restart {child:?}: {e}")));
        }
        Ok(())
    }
}

impl SupervisorState {
    async fn spawn(
        &mut self,
        supervisor: ActorCell,
        child: Child,
        hosts: Option<Vec<cellplane_api::Host>>,
    ) -> Result<(), ActorProcessingErr> {
        let shared = self.shared.clone();
        let id = match child {
            Child::Workloads => {
                let (actor, _) =
                    Actor::spawn_linked(None, workloads::Workloads, shared, supervisor).await?;
                actor.get_id()
            }
            Child::Shard(index) => {
                let args = shard::Args { shared, index, hosts };
                let (actor, _) = Actor::spawn_linked(None, shard::Shard, args, supervisor).await?;
                actor.get_id()
            }
        };
        self.children.insert(id, child);
        Ok(())
    }
}

/// A cell running in this process.
pub struct RunningCell {
    shared: Arc<Shared>,
    supervisor: ActorRef<()>,
    done: tokio::task::JoinHandle<()>,
}

impl RunningCell {
    /// Starts cell `config.cell` on `db`: bumps its epoch, recovers everything stored, and
    /// returns once every child is up.
    pub async fn start(config: CellConfig, db: Database) -> Result<Self, crate::CellError> {
        let shared = Arc::new(Shared::new(config, db));
        let (supervisor, done) = Actor::spawn(None, Supervisor, shared.clone())
            .await
            .map_err(|e| crate::CellError::Start(e.to_string()))?;
        Ok(Self { shared, supervisor, done })
    }

    /// What the cell's parts share (the gateway and in-process callers use it).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Relaxed)
    }

    /// Waits until the cell stops on its own (its supervisor gave up).
    pub async fn stopped(&mut self) {
        let _ = (&mut self.done).await;
    }

    /// Stops every actor, waits for the last commits and — once no [`crate::Gateway`] holds
    /// the cell any more — closes the store.
    pub async fn stop(self) {
        self.shared.stopping.store(true, Ordering::Relaxed);
        let _ = self.supervisor.stop_and_wait(None, Some(Duration::from_secs(10))).await;
        let _ = self.done.await;
        if let Ok(shared) = Arc::try_unwrap(self.shared) {
            let Shared { committer, db, .. } = shared;
            committer.join().await;
            drop(db);
        }
    }
}
