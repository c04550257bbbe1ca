//! Runtime drivers: what actually runs a replica. One trait for every kind — `sim` (no work,
//! for scale), `process` (a plain OS process), and later `container` (runc) and `vm` (qemu) —
//! so the host core never knows which one it drives.
//!
//! A driver is told to start, stop or power-cycle a slot and answers at once; what happens
//! afterwards comes back as [`DriverEvent`]s on the channel it was built with (bounded: a full
//! channel makes the driver's task wait, never grow).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cellplane_api::{ReplicaPhase, TenantId, VmAction, WorkloadKind, WorkloadName, WorkloadSpec};
use tokio::sync::{mpsc, oneshot};

use crate::DriverKind;
use crate::core::host::SlotKey;

/// Something that happened to a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverEvent {
    /// The slot.
    pub key: SlotKey,
    /// Its phase now.
    pub phase: ReplicaPhase,
    /// Words for a person: exit status, error.
    pub detail: String,
}

/// Why a driver refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    /// This driver cannot run that kind of workload.
    #[error("the {driver:?} driver cannot run this: {reason}")]
    Unsupported {
        /// The driver.
        driver: DriverKind,
        /// Why.
        reason: &'static str,
    },
    /// The slot is not running here.
    #[error("slot is not running on this driver")]
    NotRunning,
}

/// A runtime driver.
pub trait Driver: Send + Sync {
    /// Which kind it is.
    fn kind(&self) -> DriverKind;
    /// Starts `spec` as slot `key`; its progress arrives as events.
    fn start(&self, key: SlotKey, spec: &WorkloadSpec) -> Result<(), DriverError>;
    /// Stops slot `key` (a `Stopped` event follows); stopping what does not run is a no-op.
    fn stop(&self, key: &SlotKey);
    /// A VM power action on slot `key`.
    fn power(&self, key: &SlotKey, action: VmAction) -> Result<(), DriverError>;
    /// How many slots it runs.
    fn running(&self) -> usize;
    /// The cell has named every slot that is this host's (and each was started or confirmed):
    /// whatever an earlier agent left running that nobody claimed is stopped now.
    fn synced(&self) {}
}

type Stoppers = Arc<Mutex<HashMap<SlotKey, oneshot::Sender<()>>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only plain map operations happen under this lock: a panic cannot leave it half-done.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The `sim` driver: nothing runs; a replica becomes running after a seeded delay, or fails
/// at a seeded rate.
pub struct SimDriver {
    events: mpsc::Sender<DriverEvent>,
    start_delay_ms: u64,
    failure_per_mille: u64,
    rng: Mutex<u64>,
    stoppers: Stoppers,
}

impl SimDriver {
    /// A sim driver: start delay up to `start_delay_ms`, `failure_per_mille` of starts fail,
    /// every draw from `seed`.
    pub fn new(
        events: mpsc::Sender<DriverEvent>,
        start_delay_ms: u64,
        failure_per_mille: u64,
        seed: u64,
    ) -> Self {
        let rng = Mutex::new(seed.max(1));
        Self { events, start_delay_ms, failure_per_mille, rng, stoppers: Stoppers::default() }
    }

    fn draw(&self, n: u64) -> u64 {
        let mut x = lock(&self.rng);
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x % n.max(1)
    }
}

impl Driver for SimDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Sim
    }

    fn start(&self, key: SlotKey, _spec: &WorkloadSpec) -> Result<(), DriverError> {
        let delay = Duration::from_millis(self.draw(self.start_delay_ms + 1));
        let fails = self.draw(1_000) < self.failure_per_mille;
        let (stop, stopped) = oneshot::channel();
        lock(&self.stoppers).insert(key.clone(), stop);
        let (events, stoppers) = (self.events.clone(), self.stoppers.clone());
        tokio::spawn(async move {
            let (phase, detail) = tokio::select! {
                () = tokio::time::sleep(delay) => match fails {
                    true => (ReplicaPhase::Failed, "sim: start failed"),
                    false => (ReplicaPhase::Running, ""),
                },
                _ = stopped => (ReplicaPhase::Stopped, ""),
            };
            if phase != ReplicaPhase::Running {
                lock(&stoppers).remove(&key);
            }
            let _ = events.send(DriverEvent { key, phase, detail: detail.into() }).await;
        });
        Ok(())
    }

    fn stop(&self, key: &SlotKey) {
        if let Some(stop) = lock(&self.stoppers).remove(key)
            && stop.send(()).is_err()
        {
            // Already running (its task ended): stopping is immediate.
            let event = DriverEvent {
                key: key.clone(),
                phase: ReplicaPhase::Stopped,
                detail: String::new(),
            };
            let _ = self.events.try_send(event);
        }
    }

    fn power(&self, key: &SlotKey, _action: VmAction) -> Result<(), DriverError> {
        if lock(&self.stoppers).contains_key(key) { Ok(()) } else { Err(DriverError::NotRunning) }
    }

    fn running(&self) -> usize {
        lock(&self.stoppers).len()
    }
}

/// When a process that exited is started again.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    /// First wait before a restart.
    pub backoff_initial_ms: u64,
    /// Longest wait.
    pub backoff_max_ms: u64,
    /// Restarts in a row after which the replica is reported failed (its cell replaces it).
    pub restarts_max: u32,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self { backoff_initial_ms: 100, backoff_max_ms: 5_000, restarts_max: 5 }
    }
}

/// The `process` driver: a container workload's command run as a plain OS process with its
/// environment, output appended to `<log_dir>/<tenant>.<workload>.<ordinal>.log`, restarted
/// with backoff when it exits, reported failed after [`RestartPolicy::restarts_max`] restarts.
///
/// Processes outlive their agent (the data plane does not stop with the control plane): each
/// running one is recorded in `<log_dir>/<tenant>.<workload>.<ordinal>.pid` (pid, start time,
/// command, environment). A driver built over the same directory finds them; when the cell
/// gives the slot back with the same command and environment, the process is adopted — watched
/// through `/proc`, stopped with a signal — instead of started twice; what the cell does not
/// give back is stopped at [`Driver::synced`].
pub struct ProcessDriver {
    events: mpsc::Sender<DriverEvent>,
    log_dir: PathBuf,
    policy: RestartPolicy,
    stoppers: Stoppers,
    orphans: Mutex<HashMap<SlotKey, Recorded>>,
}

impl ProcessDriver {
    /// A process driver writing logs under `log_dir`, taking over what an earlier driver there
    /// left running.
    pub fn new(events: mpsc::Sender<DriverEvent>, log_dir: PathBuf, policy: RestartPolicy) -> Self {
        let orphans = Mutex::new(Recorded::find(&log_dir));
        Self { events, log_dir, policy, stoppers: Stoppers::default(), orphans }
    }

    /// Where slot `key` logs.
    pub fn log_path(&self, key: &SlotKey) -> PathBuf {
        log_file(&self.log_dir, key)
    }
}

fn log_file(dir: &Path, key: &SlotKey) -> PathBuf {
    dir.join(format!("{}.{}.{}.log", key.0, key.1, key.2))
}

/// Set in every process the driver starts to `<tenant>.<workload>.<ordinal>`: the mark by which
/// a later agent knows the process is the slot's.
pub const SLOT_VAR: &str = "CELLPLANE_SLOT";

fn pid_file(dir: &Path, key: &SlotKey) -> PathBuf {
    dir.join(format!("{}.{}.{}.pid", key.0, key.1, key.2))
}

/// A running process as recorded in its pid file.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Recorded {
    tenant: String,
    workload: String,
    ordinal: u32,
    pid: u32,
    /// Its start time in clock ticks since boot (`/proc/<pid>/stat`), so that a recycled pid is
    /// never taken for it.
    started: u64,
    command: Vec<String>,
    env: std::collections::BTreeMap<String, String>,
}

impl Recorded {
    /// The processes recorded under `dir` that still run; stale or unreadable records are
    /// removed.
    fn find(dir: &Path) -> HashMap<SlotKey, Recorded> {
        let mut found = HashMap::new();
        let Ok(entries) = std::fs::read_dir(dir) else { return found };
        for path in entries.flatten().map(|e| e.path()) {
            if path.extension().is_none_or(|ext| ext != "pid") {
                continue;
            }
            let recorded = std::fs::read(&path)
                .ok()
                .and_then(|bytes| serde_json::from_slice::<Recorded>(&bytes).ok());
            let key = recorded.as_ref().and_then(|r| {
                Some((
                    TenantId::new(&r.tenant).ok()?,
                    WorkloadName::new(&r.workload).ok()?,
                    r.ordinal,
                ))
            });
            match (recorded, key) {
                (Some(recorded), Some(key)) if recorded.alive() => {
                    found.insert(key, recorded);
                }
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        found
    }

    /// Whether the recorded process still runs: same pid, same start time, and our mark in its
    /// environment — so neither a recycled pid nor a doctored file can point us at a process
    /// we did not start.
    fn alive(&self) -> bool {
        let mark = format!("{SLOT_VAR}={}.{}.{}", self.tenant, self.workload, self.ordinal);
        self.pid != 0
            && start_time(self.pid) == Some(self.started)
            && std::fs::read(format!("/proc/{}/environ", self.pid))
                .is_ok_and(|environ| environ.split(|b| *b == 0).any(|v| v == mark.as_bytes()))
    }

    /// Kills the process if it is still the one recorded.
    fn kill(&self) {
        if self.alive()
            && let Ok(pid) = i32::try_from(self.pid)
        {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
    }

    /// Resolves once the process is gone (it is not our child: `/proc` is polled).
    async fn exited(&self) {
        while self.alive() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A process's start time (field 22 of `/proc/<pid>/stat`), if it runs (a zombie does not).
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if fields.next()? == "Z" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

impl Driver for ProcessDriver {
    fn kind(&self) -> DriverKind {
        DriverKind::Process
    }

    fn start(&self, key: SlotKey, spec: &WorkloadSpec) -> Result<(), DriverError> {
        let unsupported = |reason| DriverError::Unsupported { driver: DriverKind::Process, reason };
        let WorkloadKind::Container(container) = &spec.kind else {
            return Err(unsupported("it runs processes, not VMs"));
        };
        let Some((program, args)) = container.command.split_first() else {
            return Err(unsupported("the workload has no command"));
        };
        let mut command = tokio::process::Command::new(program);
        command.args(args).envs(&container.env).stdin(std::process::Stdio::null());
        command.env(SLOT_VAR, format!("{}.{}.{}", key.0, key.1, key.2));
        command.kill_on_drop(true);
        let adopted = lock(&self.orphans).remove(&key).and_then(|orphan| {
            let same = orphan.command == container.command && orphan.env == container.env;
            if same && orphan.alive() {
                return Some(orphan);
            }
            orphan.kill(); // another spec now: the old process goes
            None
        });
        let (stop, stopped) = oneshot::channel();
        lock(&self.stoppers).insert(key.clone(), stop);
        let run = Supervised {
            key,
            command,
            command_line: (container.command.clone(), container.env.clone()),
            log_dir: self.log_dir.clone(),
            events: self.events.clone(),
            policy: self.policy,
            stoppers: self.stoppers.clone(),
        };
        tokio::spawn(run.run(stopped, adopted));
        Ok(())
    }

    fn synced(&self) {
        for (key, orphan) in lock(&self.orphans).drain() {
            tracing::info!(?key, pid = orphan.pid, "stopping a process no slot claims");
            orphan.kill();
            let _ = std::fs::remove_file(pid_file(&self.log_dir, &key));
        }
    }

    fn stop(&self, key: &SlotKey) {
        if let Some(stop) = lock(&self.stoppers).remove(key) {
            let _ = stop.send(());
        }
    }

    fn power(&self, _key: &SlotKey, _action: VmAction) -> Result<(), DriverError> {
        Err(DriverError::Unsupported { driver: DriverKind::Process, reason: "no VM power" })
    }

    fn running(&self) -> usize {
        lock(&self.stoppers).len()
    }
}

/// One process under restart supervision.
struct Supervised {
    key: SlotKey,
    command: tokio::process::Command,
    /// The command and environment, for its pid file.
    command_line: (Vec<String>, std::collections::BTreeMap<String, String>),
    log_dir: PathBuf,
    events: mpsc::Sender<DriverEvent>,
    policy: RestartPolicy,
    stoppers: Stoppers,
}

impl Supervised {
    async fn run(mut self, mut stopped: oneshot::Receiver<()>, mut adopted: Option<Recorded>) {
        let path = log_file(&self.log_dir, &self.key);
        let mut restarts = 0u32;
        let mut backoff_ms = self.policy.backoff_initial_ms.max(1);
        let phase = loop {
            // Run it (or watch the process an earlier agent left) until it exits or is stopped.
            let status = if let Some(orphan) = adopted.take() {
                self.record(orphan.pid, orphan.started);
                self.event(ReplicaPhase::Running, format!("pid {} (adopted)", orphan.pid)).await;
                tokio::select! {
                    () = orphan.exited() => "exited (adopted: status unknown)".to_owned(),
                    _ = &mut stopped => {
                        orphan.kill();
                        break (ReplicaPhase::Stopped, String::new());
                    }
                }
            } else {
                let log = std::fs::create_dir_all(&self.log_dir)
                    .and_then(|()| {
                        std::fs::OpenOptions::new().create(true).append(true).open(&path)
                    })
                    .and_then(|file| Ok((file.try_clone()?, file)));
                let child = log.and_then(|(out, err)| self.command.stdout(out).stderr(err).spawn());
                let mut child = match child {
                    Ok(child) => child,
                    Err(e) => break (ReplicaPhase::Failed, format!("cannot start: {e}")),
                };
                let pid = child.id().unwrap_or(0);
                self.record(pid, start_time(pid).unwrap_or(0));
                self.event(ReplicaPhase::Running, format!("pid {pid}")).await;
                tokio::select! {
                    status = child.wait() => {
                        status.map_or_else(|e| e.to_string(), |s| s.to_string())
                    }
                    _ = &mut stopped => {
                        let _ = child.kill().await;
                        break (ReplicaPhase::Stopped, String::new());
                    }
                }
            };
            if restarts >= self.policy.restarts_max {
                break (
                    ReplicaPhase::Failed,
                    format!("{status}; gave up after {restarts} restarts"),
                );
            }
            restarts += 1;
            let detail = format!("{status}; restarting in {backoff_ms} ms");
            self.event(ReplicaPhase::Starting, detail).await;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
                _ = &mut stopped => break (ReplicaPhase::Stopped, String::new()),
            }
            backoff_ms = (backoff_ms * 2).min(self.policy.backoff_max_ms.max(1));
        };
        let _ = std::fs::remove_file(pid_file(&self.log_dir, &self.key));
        if phase.0 != ReplicaPhase::Stopped {
            // It ended on its own; a stop removed its stopper already (and a new start of the
            // same slot may have put its own there since).
            lock(&self.stoppers).remove(&self.key);
        }
        self.event(phase.0, phase.1).await;
    }

    /// Writes the pid file of the process now running, for the next agent on this host.
    fn record(&self, pid: u32, started: u64) {
        let (tenant, workload, ordinal) = &self.key;
        let recorded = Recorded {
            tenant: tenant.to_string(),
            workload: workload.to_string(),
            ordinal: *ordinal,
            pid,
            started,
            command: self.command_line.0.clone(),
            env: self.command_line.1.clone(),
        };
        let written = serde_json::to_vec(&recorded)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(pid_file(&self.log_dir, &self.key), bytes));
        if let Err(e) = written {
            tracing::warn!(error = %e, key = ?self.key, "cannot record the process: a new agent will not adopt it");
        }
    }

    async fn event(&self, phase: ReplicaPhase, detail: String) {
        let event = DriverEvent { key: self.key.clone(), phase, detail };
        let _ = self.events.send(event).await;
    }
}
