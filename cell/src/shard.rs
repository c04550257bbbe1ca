//! A membership shard: about a thousand hosts **as data** in one actor (an actor per host
//! would cost 780 MB per cell), around the pure [`Membership`] core.
//!
//! Protocol: a registration is committed before it is answered, and only then is the host's
//! record handed to the workloads actor, with the state membership gives it at that moment;
//! heartbeats and lease ticks change soft state only (liveness is never stored). Every state
//! change goes to the workloads actor. On start — first or after a crash — the shard reads its
//! hosts back from storage; each is `Joining` until it heartbeats again, with a lease that
//! starts only after `recovery_grace_ms`, so hosts reconnecting after a cell restart are not
//! declared down (and emptied) while they find the cell again.

use std::sync::Arc;
use std::time::Duration;

use cellplane_api::wire::{ErrorCode, ErrorReply, Heartbeat, Message};
use cellplane_api::{Host, HostId};
use cellplane_storage::group::Write;
use cellplane_storage::keyspace;
use ractor::{Actor, ActorProcessingErr, ActorRef};

use crate::core::membership::{Event, Membership, MembershipError};
use crate::records;
use crate::supervisor::Shared;
use crate::workloads::{self, Reply};

/// What a shard handles.
pub enum Msg {
    /// A host registers.
    Register(Box<Host>, Reply),
    /// Hosts' proofs of life, with the gateway's admission (released once handled).
    Heartbeats(Vec<Heartbeat>, Option<tokio::sync::OwnedSemaphorePermit>),
    /// A registration is durable.
    Registered(HostId, u64, Reply),
    /// A commit failed: the shard fails and is rebuilt from storage.
    CommitFailed(String),
    /// Lease time passes.
    Tick,
    /// Tell the workloads actor every host's record and state (it restarted).
    Republish,
    /// Chaos: fail now, as a bug would.
    Crash,
}

/// The actor.
pub struct Shard;

/// Its arguments: the cell, and which shard of how many.
pub struct Args {
    /// What every part of the cell shares.
    pub shared: Arc<Shared>,
    /// This shard's number.
    pub index: usize,
    /// Its hosts, when the caller read them already (the cell's start reads every host once);
    /// `None` makes the shard read them from storage (a restart).
    pub hosts: Option<Vec<Host>>,
}

/// Its state.
pub struct State {
    shared: Arc<Shared>,
    membership: Membership,
}

impl Actor for Shard {
    type Msg = Msg;
    type State = State;
    type Arguments = Args;

    async fn pre_start(
        &self,
        myself: ActorRef<Msg>,
        Args { shared, index, hosts }: Args,
    ) -> Result<State, ActorProcessingErr> {
        let config = &shared.config;
        let mut membership = Membership::new(config.lease, config.shard_hosts_max());
        let now = shared.now_ms();
        let hosts = match hosts {
            Some(hosts) => hosts,
            None => records::load_hosts(&shared.db, &config.cell).await?,
        };
        for host in hosts {
            if shared.shard_of(host.id) == index {
                membership.handle_restore(now, config.recovery_grace_ms, host)?;
            }
        }
        shared.register_shard(index, myself.clone());
        myself.send_interval(Duration::from_millis(config.tick_ms), || Msg::Tick);
        let state = State { shared, membership };
        state.republish();
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Msg>,
        message: Msg,
        state: &mut State,
    ) -> Result<(), ActorProcessingErr> {
        let now = state.shared.now_ms();
        match message {
            Msg::Register(host, reply) => state.register(&myself, now, *host, reply).await?,
            Msg::Registered(id, version, reply) => {
                if let Some(host) = state.membership.host(id) {
                    state.shared.tell_workloads(workloads::Msg::Host(Box::new(host.clone())));
                }
                let _ = reply.send(Ok(Message::Done(version)));
            }
            Msg::CommitFailed(error) => {
                return Err(format!("commit failed, rebuilding from storage: {error}").into());
            }
            Msg::Heartbeats(beats, _admitted) => {
                metrics::counter!("cellplane_heartbeats_total").increment(beats.len() as u64);
                // A heartbeat from a host this cell does not know changes nothing: the host
                // registers again when its registration is refused or lost.
                for beat in &beats {
                    let _ = state.membership.handle_heartbeat(now, beat);
                }
            }
            Msg::Tick => state.membership.handle_tick(now),
            Msg::Republish => state.republish(),
            Msg::Crash => panic!("chaos: shard crashed on purpose"),
        }
        state.forward_events();
        Ok(())
    }
}

impl State {
    async fn register(
        &mut self,
        myself: &ActorRef<Msg>,
        now: u64,
        host: Host,
        reply: Reply,
    ) -> Result<(), ActorProcessingErr> {
        let refusal = |code, detail: String| ErrorReply { code, detail };
        let cell = &self.shared.config.cell;
        if &host.cell != cell {
            let detail = format!("host {} belongs to cell {}, not {cell}", host.id.0, host.cell);
            let _ = reply.send(Err(refusal(ErrorCode::Invalid, detail)));
            return Ok(());
        }
        if let Err(e @ MembershipError::Full(_)) =
            self.membership.handle_register(now, host.clone())
        {
            let _ = reply.send(Err(refusal(ErrorCode::Unavailable, e.to_string())));
            return Ok(());
        }
        let write = Write::Set(keyspace::host(cell, host.id.0), records::json(&host));
        let commit = self.shared.committer.submit(vec![write]).await?;
        let myself = myself.clone();
        tokio::spawn(async move {
            let message = match commit.await {
                Ok(version) => Msg::Registered(host.id, version, reply),
                Err(e) => {
                    let _ = reply.send(Err(refusal(ErrorCode::Unavailable, e.to_string())));
                    Msg::CommitFailed(e.to_string())
                }
            };
            let _ = myself.send_message(message);
        });
        Ok(())
    }

    fn republish(&self) {
        for host in self.membership.hosts() {
            self.shared.tell_workloads(workloads::Msg::Host(Box::new(host.clone())));
        }
    }

    fn forward_events(&mut self) {
        while let Some(Event::StateChanged { host, to, .. }) = self.membership.poll_event() {
            self.shared.tell_workloads(workloads::Msg::HostState(host, to));
        }
    }
}
