//! The gateway: the cell's front door, for the router, operators, tenants' clients and host
//! agents — over QUIC ([`Gateway::serve`]) or in-process ([`Gateway::call`], used by
//! benchmarks and by anything embedding a cell).
//!
//! Authorization comes only from the caller's certificate ([`Identity`]):
//! - hosts may register, heartbeat, report status and subscribe to their assignments;
//! - the router and operators may do anything, for any tenant;
//! - a tenant's client may act only for the tenant its certificate names; a request naming
//!   another tenant is refused as `Unauthorized` before anything is looked up, so the answer
//!   says nothing about the other tenant's objects.
//!
//! Admission: at most `calls_max` requests are in the cell at once; the next is refused as
//! `Unavailable` rather than queued without bound. One-way messages (heartbeats, status
//! reports) have their own bound of the same size, held until an actor has handled them: past
//! it they are dropped (a host heartbeats again in a second and re-reports on reconnection),
//! so a flood can never grow an actor's mailbox without bound.

use std::sync::Arc;

use cellplane_api::wire::{ErrorCode, ErrorReply, Message};
use cellplane_api::{TenantId, Validate};
use cellplane_transport::conn::{Inbound, Reply};
use cellplane_transport::identity::{Identity, Role};
use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::supervisor::Shared;
use crate::{shard, workloads};

/// The cell's front door.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
    admission: Arc<Semaphore>,
    one_way: Arc<Semaphore>,
}

/// Room per subscribed host for its opening set of assignments.
const SLOTS_PER_HOST_HINT: usize = 256;

fn refuse(code: ErrorCode, detail: impl Into<String>) -> ErrorReply {
    ErrorReply { code, detail: detail.into() }
}

fn unavailable() -> ErrorReply {
    refuse(ErrorCode::Unavailable, "the cell part that answers this is restarting; retry")
}

impl Gateway {
    /// A gateway to the cell whose parts share `shared`.
    pub fn new(shared: Arc<Shared>) -> Self {
        let admission = Arc::new(Semaphore::new(shared.config.calls_max));
        let one_way = Arc::new(Semaphore::new(shared.config.calls_max));
        Self { shared, admission, one_way }
    }

    /// Answers one request from `peer`. Messages that came over the wire were validated when
    /// decoded; in-process callers get the same rules here.
    pub async fn call(&self, peer: &Identity, message: Message) -> Result<Message, ErrorReply> {
        valid(&message)?;
        let _permit = self
            .admission
            .try_acquire()
            .map_err(|_| refuse(ErrorCode::Unavailable, "the cell is at its request limit"))?;
        let (reply, answer) = oneshot::channel();
        let sent = match message {
            Message::Register(register) => {
                host_only(peer)?;
                let id = register.host.id;
                self.shared.tell_shard(id, shard::Msg::Register(Box::new(register.host), reply))
            }
            Message::Heartbeat(_) | Message::Heartbeats(_) | Message::Status(_) => {
                self.send(peer, message)?;
                return Ok(Message::Done(0));
            }
            Message::PutTenant(tenant) => {
                operator_only(peer)?;
                self.shared.tell_workloads(workloads::Msg::PutTenant(tenant, reply))
            }
            Message::DeleteTenant(request) => {
                operator_only(peer)?;
                self.shared.tell_workloads(workloads::Msg::DeleteTenant(request.tenant, reply))
            }
            Message::SummaryRequest => {
                operator_only(peer)?;
                self.shared.tell_workloads(workloads::Msg::Summary(reply))
            }
            Message::Apply(apply) => {
                for_tenant(peer, &apply.tenant)?;
                self.shared.tell_workloads(workloads::Msg::Apply(apply, reply))
            }
            Message::Scale(scale) => {
                for_tenant(peer, &scale.tenant)?;
                self.shared.tell_workloads(workloads::Msg::Scale(scale, reply))
            }
            Message::Delete(target) => {
                for_tenant(peer, &target.tenant)?;
                self.shared.tell_workloads(workloads::Msg::Delete(target, reply))
            }
            Message::Get(target) => {
                for_tenant(peer, &target.tenant)?;
                self.shared.tell_workloads(workloads::Msg::Get(target, reply))
            }
            Message::List(request) => {
                for_tenant(peer, &request.tenant)?;
                self.shared.tell_workloads(workloads::Msg::List(request, reply))
            }
            Message::VmAction(request) => {
                for_tenant(peer, &request.tenant)?;
                self.shared.tell_workloads(workloads::Msg::VmAction(request, reply))
            }
            other => {
                return Err(refuse(
                    ErrorCode::Invalid,
                    format!("a cell does not answer {} requests", kind(&other)),
                ));
            }
        };
        if !sent {
            return Err(unavailable());
        }
        // A part that crashes drops the reply: the caller hears `Unavailable`, never silence.
        answer.await.unwrap_or_else(|_| Err(unavailable()))
    }

    /// Takes one one-way message from `peer` (heartbeats and status reports).
    pub fn send(&self, peer: &Identity, message: Message) -> Result<(), ErrorReply> {
        host_only(peer)?;
        valid(&message)?;
        let admit = || {
            self.one_way.clone().try_acquire_owned().map_err(|_| {
                refuse(ErrorCode::Unavailable, "the cell is at its one-way message limit")
            })
        };
        let sent = match message {
            Message::Heartbeat(beat) => self
                .shared
                .tell_shard(beat.host, shard::Msg::Heartbeats(vec![beat], Some(admit()?))),
            Message::Heartbeats(beats) => {
                // One message per shard, not per host.
                let mut by_shard: std::collections::HashMap<usize, Vec<_>> = Default::default();
                for beat in beats {
                    by_shard.entry(self.shared.shard_of(beat.host)).or_default().push(beat);
                }
                by_shard.into_values().fold(true, |sent, beats| {
                    let host = beats[0].host;
                    let admitted = admit().ok();
                    admitted.is_some()
                        && self.shared.tell_shard(host, shard::Msg::Heartbeats(beats, admitted))
                        && sent
                })
            }
            Message::Status(report) => {
                self.shared.tell_workloads(workloads::Msg::Status(report, Some(admit()?)))
            }
            other => {
                return Err(refuse(
                    ErrorCode::Invalid,
                    format!("a cell takes no one-way {} messages", kind(&other)),
                ));
            }
        };
        if sent { Ok(()) } else { Err(unavailable()) }
    }

    /// Opens a stream for `peer`: a host's assignments (`Subscribe`) or a tenant's workload
    /// changes (`Watch`).
    pub fn open(
        &self,
        peer: &Identity,
        message: Message,
    ) -> Result<mpsc::Receiver<Message>, ErrorReply> {
        valid(&message)?;
        let mut room = self.shared.config.limits.stream_len_max;
        if let Message::Subscribe(hosts) = &message {
            // The opening set of every host must fit too. A bounded channel takes memory only
            // as it fills, so the room costs nothing until used.
            room += hosts.len() * SLOTS_PER_HOST_HINT;
        }
        let (sender, receiver) = mpsc::channel(room);
        let sent = match message {
            Message::Subscribe(hosts) => {
                host_only(peer)?;
                self.shared.tell_workloads(workloads::Msg::Subscribe(hosts, sender))
            }
            Message::Watch(tenant) => {
                for_tenant(peer, &tenant)?;
                self.shared.tell_workloads(workloads::Msg::Watch(tenant, sender))
            }
            other => {
                return Err(refuse(
                    ErrorCode::Invalid,
                    format!("a cell streams no {} messages", kind(&other)),
                ));
            }
        };
        if sent { Ok(receiver) } else { Err(unavailable()) }
    }

    /// Serves what arrives from the transport until the channel closes.
    pub async fn serve(self, mut inbound: mpsc::Receiver<Inbound>) {
        while let Some(Inbound { peer, message, reply, .. }) = inbound.recv().await {
            match reply {
                Reply::None => {
                    if let Err(refusal) = self.send(&peer, message) {
                        tracing::debug!(%peer, ?refusal, "one-way message refused");
                    }
                }
                Reply::Respond(responder) => {
                    let gateway = self.clone();
                    tokio::spawn(async move {
                        let answer = gateway.call(&peer, message).await;
                        let _ = responder.respond(answer).await;
                    });
                }
                Reply::Stream(sink) => match self.open(&peer, message) {
                    Err(refusal) => {
                        tokio::spawn(sink.fail(refusal));
                    }
                    Ok(mut items) => {
                        tokio::spawn(async move {
                            while let Some(item) = items.recv().await {
                                if sink.send(&item).await.is_err() {
                                    return;
                                }
                            }
                            // The cell ended the stream (restart, or the reader fell behind):
                            // the reader opens it again and gets a full picture.
                            let _ = sink
                                .fail(refuse(ErrorCode::Unavailable, "stream ended; open it again"))
                                .await;
                        });
                    }
                },
            }
        }
    }
}

fn valid(message: &Message) -> Result<(), ErrorReply> {
    message.validate().map_err(|e| refuse(ErrorCode::Invalid, e.to_string()))
}

fn kind(message: &Message) -> String {
    let debug = format!("{message:?}");
    debug.split(['(', ' ', '{']).next().unwrap_or("unknown").to_string()
}

fn host_only(peer: &Identity) -> Result<(), ErrorReply> {
    match peer {
        Identity::Host(_) => Ok(()),
        _ => Err(refuse(ErrorCode::Unauthorized, format!("{peer} is not a host"))),
    }
}

fn operator_only(peer: &Identity) -> Result<(), ErrorReply> {
    match peer {
        Identity::Router(_) | Identity::Client { role: Role::Operator, .. } => Ok(()),
        _ => {
            Err(refuse(ErrorCode::Unauthorized, format!("{peer} is not the router or an operator")))
        }
    }
}

fn for_tenant(peer: &Identity, tenant: &TenantId) -> Result<(), ErrorReply> {
    match peer {
        Identity::Router(_) | Identity::Client { role: Role::Operator, .. } => Ok(()),
        Identity::Client { tenant: own, role: Role::Tenant } if own == tenant => Ok(()),
        Identity::Client { tenant: own, .. } => Err(refuse(
            ErrorCode::Unauthorized,
            format!("credentials of tenant {own} act only for tenant {own}"),
        )),
        _ => Err(refuse(ErrorCode::Unauthorized, format!("{peer} does not act for tenants"))),
    }
}
