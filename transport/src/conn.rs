//! One connection between two components, and the messaging on it.
//!
//! Protocol: after the handshake each side opens one unidirectional QUIC stream and sends every
//! frame ([`crate::frame`]) on it, in order; the peer's stream is read by one reader task. A
//! writer task drains an outgoing queue and writes frames in batches (buffered writes).
//!
//! Limits and backpressure:
//! - the outgoing queue is bounded in bytes ([`Limits::queued_bytes_max`]): a sender waits for
//!   room, so a slow network or a slow peer slows its producers instead of growing memory;
//! - requests in flight are bounded ([`Limits::in_flight_max`]);
//! - the reader hands inbound messages to the application through a bounded channel and to
//!   watches through bounded channels; when they are full it stops reading, QUIC flow control
//!   fills, and the peer's writer waits in turn;
//! - a frame over the size cap, of an unknown kind or version, or with a body that fails checked
//!   decoding closes this connection only (error code [`CLOSE_BAD_FRAME`]).
//!
//! When the connection dies, every request in flight fails with `ConnectionLost` (retryable:
//! the caller decides, with its idempotency key) and every watch ends with the same error.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cellplane_api::wire::{self, ErrorCode, ErrorReply, Message};
use tokio::io::AsyncReadExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::error::TransportError;
use crate::faults::{Fate, Faults};
use crate::frame::{self, FrameKind, HEAD_LEN};
use crate::identity::Identity;

/// Application close code: the peer sent a frame we refuse.
pub const CLOSE_BAD_FRAME: u32 = 1;
/// Application close code: the peer is not allowed here.
pub const CLOSE_REFUSED: u32 = 2;
/// Application close code: closed by its owner.
pub const CLOSE_NORMAL: u32 = 0;

/// Bytes asked of the stream per read.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Bytes gathered into one stream write.
const WRITE_BATCH_BYTES: usize = 256 * 1024;

/// Bounds on one connection.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most requests awaiting an answer.
    pub in_flight_max: usize,
    /// Most bytes queued for sending.
    pub queued_bytes_max: usize,
    /// Most items buffered per watch on the receiving side.
    pub watch_items_max: usize,
    /// A connection silent this long (keep-alives included) is dead; keep-alives go at a quarter.
    pub idle_timeout_ms: u32,
    /// Most connections a server holds at once; more are refused (servers only).
    pub connections_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            in_flight_max: 4_096,
            queued_bytes_max: 8 << 20,
            watch_items_max: 256,
            idle_timeout_ms: 5_000,
            connections_max: 16_384,
        }
    }
}

type Answer = Result<Message, TransportError>;

struct Inner {
    quic: quinn::Connection,
    peer: Arc<Identity>,
    limits: Limits,
    outgoing: mpsc::UnboundedSender<(Bytes, OwnedSemaphorePermit)>,
    queued: Arc<Semaphore>,
    in_flight: Arc<Semaphore>,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Answer>>>,
    watches: Mutex<HashMap<u64, mpsc::Sender<Answer>>>,
    /// Server streams open on this side: id → cancelled by the watcher. Only ids of open
    /// streams are ever recorded, so a peer's cancel frames cannot grow it.
    sinks: Mutex<HashMap<u64, bool>>,
    faults: Option<Arc<dyn Faults>>,
}

/// A live connection. Clones share it.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

/// A message that arrived for the application.
pub struct Inbound {
    /// Who sent it (from its certificate; nothing else says who the caller is).
    pub peer: Arc<Identity>,
    /// The logical endpoint it is for.
    pub address: u64,
    /// The message.
    pub message: Message,
    /// How to answer.
    pub reply: Reply,
}

/// How an inbound message is answered.
pub enum Reply {
    /// A one-way message: no answer.
    None,
    /// A request: answer once.
    Respond(Responder),
    /// A watch: send items until done.
    Stream(StreamSink),
}

impl Connection {
    /// Starts messaging on an established connection; inbound requests, one-way messages and
    /// watches go to `inbound` (or are refused with `Unavailable` when there is none).
    pub fn start(
        quic: quinn::Connection,
        peer: Identity,
        limits: Limits,
        faults: Option<Arc<dyn Faults>>,
        inbound: Option<mpsc::Sender<Inbound>>,
    ) -> Self {
        let (outgoing, queue) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            quic,
            peer: Arc::new(peer),
            limits,
            outgoing,
            queued: Arc::new(Semaphore::new(limits.queued_bytes_max)),
            in_flight: Arc::new(Semaphore::new(limits.in_flight_max)),
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            watches: Mutex::new(HashMap::new()),
            sinks: Mutex::new(HashMap::new()),
            faults,
        });
        tokio::spawn(write_loop(inner.quic.clone(), queue));
        let connection = Self { inner };
        tokio::spawn(connection.clone().read_loop(inbound));
        connection
    }

    /// The authenticated peer.
    pub fn peer(&self) -> &Arc<Identity> {
        &self.inner.peer
    }

    /// The peer's address.
    pub fn remote_address(&self) -> std::net::SocketAddr {
        self.inner.quic.remote_address()
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.inner.quic.close_reason().is_some()
    }

    /// Resolves when the connection ends.
    pub async fn closed(&self) {
        self.inner.quic.closed().await;
    }

    /// Closes the connection.
    pub fn close(&self) {
        self.inner.quic.close(CLOSE_NORMAL.into(), b"closed");
    }

    /// Sends a one-way message to `address` on the peer.
    pub async fn send(&self, address: u64, message: &Message) -> Result<(), TransportError> {
        self.send_frame(FrameKind::OneWay, 0, address, message).await
    }

    /// Sends a request to `address` on the peer and waits at most `deadline` for the answer.
    pub async fn request(
        &self,
        address: u64,
        message: &Message,
        deadline: Duration,
    ) -> Result<Message, TransportError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let exchange = async {
            let _slot = self.inner.in_flight.acquire().await.map_err(|_| TransportError::Closed)?;
            let (answer, answered) = oneshot::channel();
            lock(&self.inner.pending).insert(id, answer);
            self.send_frame(FrameKind::Request, id, address, message).await?;
            answered.await.unwrap_or_else(|_| Err(self.lost()))
        };
        match tokio::time::timeout(deadline, exchange).await {
            Ok(answer) => {
                lock(&self.inner.pending).remove(&id);
                answer
            }
            Err(_) => {
                lock(&self.inner.pending).remove(&id);
                Err(TransportError::DeadlineExceeded { deadline_ms: deadline.as_millis() as u64 })
            }
        }
    }

    /// Opens a server stream at `address` on the peer.
    pub async fn watch(&self, address: u64, message: &Message) -> Result<Watch, TransportError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (items, receiver) = mpsc::channel(self.inner.limits.watch_items_max.max(1));
        lock(&self.inner.watches).insert(id, items);
        if let Err(e) = self.send_frame(FrameKind::Watch, id, address, message).await {
            lock(&self.inner.watches).remove(&id);
            return Err(e);
        }
        Ok(Watch { receiver, connection: self.clone(), id, address, ended: false })
    }

    fn lost(&self) -> TransportError {
        let reason = self.inner.quic.close_reason().map_or("closed".to_owned(), |r| r.to_string());
        TransportError::ConnectionLost(reason)
    }

    async fn send_frame(
        &self,
        kind: FrameKind,
        id: u64,
        address: u64,
        message: &Message,
    ) -> Result<(), TransportError> {
        let frame = Bytes::from_owner(frame::encode(kind, id, address, message)?);
        for _ in 0..self.copies(address, &frame) {
            self.enqueue(frame.clone()).await?;
        }
        Ok(())
    }

    /// How many copies of `frame` to send now, as the fault seam decides (one without faults).
    /// A delayed frame is sent later by a task of its own: only under the chaos harness.
    fn copies(&self, address: u64, frame: &Bytes) -> usize {
        let Some(faults) = &self.inner.faults else { return 1 };
        match faults.on_send(&self.inner.peer, address, frame.len()) {
            Fate::Deliver => 1,
            Fate::Drop => 0,
            Fate::Duplicate => 2,
            Fate::Delay(after) => {
                let (connection, delayed) = (self.clone(), frame.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    let _ = connection.enqueue(delayed).await;
                });
                0
            }
        }
    }

    async fn enqueue(&self, frame: Bytes) -> Result<(), TransportError> {
        let room = self.inner.queued.clone().acquire_many_owned(self.permits(&frame)).await;
        let room = room.map_err(|_| self.lost())?;
        self.inner.outgoing.send((frame, room)).map_err(|_| self.lost())
    }

    /// Queue room a frame takes. A frame is at most FRAME_LEN_MAX plus its prefix, far below
    /// u32::MAX; capped at the whole budget so that one frame can always go.
    fn permits(&self, frame: &Bytes) -> u32 {
        frame.len().min(self.inner.limits.queued_bytes_max) as u32
    }

    /// Sends a frame from a destructor: best effort, never blocks and never spawns (so a peer
    /// that stops reading cannot make dropped requests pile up): dropped when there is no room.
    fn send_from_drop(&self, kind: FrameKind, id: u64, address: u64, message: Message) {
        let Ok(frame) = frame::encode(kind, id, address, &message) else { return };
        let frame = Bytes::from_owner(frame);
        for _ in 0..self.copies(address, &frame) {
            if let Ok(room) = self.inner.queued.clone().try_acquire_many_owned(self.permits(&frame))
            {
                let _ = self.inner.outgoing.send((frame.clone(), room));
            }
        }
    }

    async fn read_loop(self, inbound: Option<mpsc::Sender<Inbound>>) {
        let outcome = match self.inner.quic.accept_uni().await {
            Ok(mut stream) => self.read_frames(&mut stream, inbound.as_ref()).await,
            Err(e) => Err(e.to_string()),
        };
        if let Err(reason) = outcome {
            tracing::debug!(peer = %self.inner.peer, %reason, "connection ended");
        }
        // Everything waiting on this connection learns it is gone.
        let lost = self.lost();
        for (_, answer) in lock(&self.inner.pending).drain() {
            let _ = answer.send(Err(TransportError::ConnectionLost(lost.to_string())));
        }
        let watches: Vec<_> = lock(&self.inner.watches).drain().map(|(_, w)| w).collect();
        for watch in watches {
            // The watcher may be behind: deliver the loss after what it has not read yet, so
            // that a lost connection never looks like a stream that ended normally.
            let error = TransportError::ConnectionLost(lost.to_string());
            tokio::spawn(async move { watch.send(Err(error)).await });
        }
    }

    /// Reads frames in large chunks (one stream read serves many frames) and dispatches them in
    /// order. The buffer never holds more than one frame past the cap checked from its head.
    async fn read_frames(
        &self,
        stream: &mut quinn::RecvStream,
        inbound: Option<&mpsc::Sender<Inbound>>,
    ) -> Result<(), String> {
        let mut buffer = BytesMut::with_capacity(READ_CHUNK_BYTES);
        loop {
            while buffer.len() >= HEAD_LEN {
                let head: &[u8; HEAD_LEN] = buffer[..HEAD_LEN].try_into().map_err(|_| "head")?;
                let parsed = match frame::parse_head(head) {
                    Ok(parsed) => parsed,
                    Err(e) => return Err(self.refuse(&e.to_string())),
                };
                let frame_len = HEAD_LEN + parsed.body_len;
                if buffer.len() < frame_len {
                    buffer.reserve(frame_len - buffer.len());
                    break;
                }
                let frame = buffer.split_to(frame_len);
                let message = match wire::decode_body(&frame[HEAD_LEN..]) {
                    Ok(message) => message,
                    Err(e) => return Err(self.refuse(&e.to_string())),
                };
                self.dispatch(parsed.kind, parsed.id, parsed.address, message, inbound).await;
            }
            if buffer.capacity() - buffer.len() < HEAD_LEN {
                buffer.reserve(READ_CHUNK_BYTES);
            }
            match stream.read_buf(&mut buffer).await {
                Ok(0) if buffer.is_empty() => return Ok(()),
                Ok(0) => return Err(self.refuse("stream ended inside a frame")),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    fn refuse(&self, reason: &str) -> String {
        tracing::warn!(peer = %self.inner.peer, reason, "closing connection: bad frame");
        let reason = format!("bad frame: {reason}");
        self.inner.quic.close(CLOSE_BAD_FRAME.into(), reason.as_bytes());
        reason
    }

    async fn dispatch(
        &self,
        kind: FrameKind,
        id: u64,
        address: u64,
        message: Message,
        inbound: Option<&mpsc::Sender<Inbound>>,
    ) {
        match kind {
            FrameKind::Response => {
                if let Some(answer) = lock(&self.inner.pending).remove(&id) {
                    let _ = answer.send(match message {
                        Message::Error(refusal) => Err(TransportError::Remote(refusal)),
                        message => Ok(message),
                    });
                }
            }
            FrameKind::Item => {
                let watch = lock(&self.inner.watches).get(&id).cloned();
                if let Some(watch) = watch {
                    // Waits when the watcher is slow: backpressure down to the peer's writer.
                    let _ = watch.send(Ok(message)).await;
                }
            }
            FrameKind::End => {
                let watch = lock(&self.inner.watches).remove(&id);
                if let (Some(watch), Message::Error(end)) = (watch, message)
                    && end.code != ErrorCode::Closed
                {
                    let _ = watch.send(Err(TransportError::Remote(end))).await;
                }
            }
            FrameKind::Cancel => {
                if let Some(cancelled) = lock(&self.inner.sinks).get_mut(&id) {
                    *cancelled = true;
                }
            }
            FrameKind::Request | FrameKind::OneWay | FrameKind::Watch => {
                let reply = match kind {
                    FrameKind::Request => Reply::Respond(Responder {
                        connection: self.clone(),
                        id,
                        address,
                        done: false,
                    }),
                    FrameKind::Watch => Reply::Stream(StreamSink::open(self, id, address)),
                    _ => Reply::None,
                };
                let peer = self.inner.peer.clone();
                match inbound {
                    // Waits when the application is slow: backpressure down to the peer.
                    Some(inbound) => {
                        let _ = inbound.send(Inbound { peer, address, message, reply }).await;
                    }
                    // Dropping the reply answers `Unavailable`.
                    None => drop(reply),
                }
            }
        }
    }
}

async fn write_loop(
    quic: quinn::Connection,
    mut queue: mpsc::UnboundedReceiver<(Bytes, OwnedSemaphorePermit)>,
) {
    let Ok(mut stream) = quic.open_uni().await else { return };
    let mut chunks = Vec::new();
    let mut permits = Vec::new();
    while let Some((first, permit)) = queue.recv().await {
        let mut bytes = first.len();
        chunks.push(first);
        permits.push(permit);
        while bytes < WRITE_BATCH_BYTES {
            let Ok((next, permit)) = queue.try_recv() else { break };
            bytes += next.len();
            chunks.push(next);
            permits.push(permit);
        }
        if stream.write_all_chunks(&mut chunks).await.is_err() {
            return;
        }
        chunks.clear();
        permits.clear(); // room for more
    }
    let _ = stream.finish();
}

/// Answers one request. Dropping it unanswered answers `Unavailable`.
pub struct Responder {
    connection: Connection,
    id: u64,
    address: u64,
    done: bool,
}

impl Responder {
    /// Answers with a message or a typed refusal.
    pub async fn respond(
        mut self,
        answer: Result<Message, ErrorReply>,
    ) -> Result<(), TransportError> {
        self.done = true;
        let message = answer.unwrap_or_else(Message::Error);
        self.connection.send_frame(FrameKind::Response, self.id, self.address, &message).await
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.done {
            let refusal = ErrorReply { code: ErrorCode::Unavailable, detail: "no answer".into() };
            self.connection.send_from_drop(
                FrameKind::Response,
                self.id,
                self.address,
                Message::Error(refusal),
            );
        }
    }
}

/// The sending side of a server stream. Dropping it ends the stream.
pub struct StreamSink {
    connection: Connection,
    id: u64,
    address: u64,
    ended: bool,
}

impl StreamSink {
    fn open(connection: &Connection, id: u64, address: u64) -> Self {
        lock(&connection.inner.sinks).insert(id, false);
        Self { connection: connection.clone(), id, address, ended: false }
    }

    /// Sends one item; fails once the watcher cancelled or the connection died.
    pub async fn send(&self, message: &Message) -> Result<(), TransportError> {
        if lock(&self.connection.inner.sinks).get(&self.id).is_none_or(|cancelled| *cancelled) {
            return Err(TransportError::Closed);
        }
        self.connection.send_frame(FrameKind::Item, self.id, self.address, message).await
    }

    /// Ends the stream with a typed error instead of normally.
    pub async fn fail(mut self, refusal: ErrorReply) -> Result<(), TransportError> {
        self.ended = true;
        let message = Message::Error(refusal);
        self.connection.send_frame(FrameKind::End, self.id, self.address, &message).await
    }
}

impl Drop for StreamSink {
    fn drop(&mut self) {
        lock(&self.connection.inner.sinks).remove(&self.id);
        if !self.ended {
            let end = ErrorReply { code: ErrorCode::Closed, detail: String::new() };
            self.connection.send_from_drop(
                FrameKind::End,
                self.id,
                self.address,
                Message::Error(end),
            );
        }
    }
}

/// The receiving side of a server stream. Dropping it cancels the stream.
pub struct Watch {
    receiver: mpsc::Receiver<Answer>,
    connection: Connection,
    id: u64,
    address: u64,
    ended: bool,
}

impl Watch {
    /// The next item; `None` when the stream ended normally.
    pub async fn next(&mut self) -> Option<Result<Message, TransportError>> {
        let item = self.receiver.recv().await;
        if item.is_none() {
            self.ended = true;
        }
        item
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        lock(&self.connection.inner.watches).remove(&self.id);
        if !self.ended && !self.connection.is_closed() {
            let cancel = ErrorReply { code: ErrorCode::Closed, detail: "cancelled".into() };
            self.connection.send_from_drop(
                FrameKind::Cancel,
                self.id,
                self.address,
                Message::Error(cancel),
            );
        }
    }
}

/// Locks a map whose entries stay valid across a panic (each operation is one insert or remove).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}
