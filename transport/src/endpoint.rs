//! Servers that accept authenticated peers, and client peers that stay connected.
//!
//! A [`Server`] accepts QUIC connections, requires a client certificate from the region CA, reads
//! the peer's identity out of it and refuses kinds it does not serve (a tenant client on a cell's
//! host port is closed with [`CLOSE_REFUSED`]). A [`Peer`] keeps one connection to one server,
//! verifies the server's certificate against the identity it expects (DNS name and the
//! `cellplane://` URI), and reconnects with capped exponential backoff and full jitter when the
//! connection dies. Requests made while it is down wait for the reconnection up to their deadline.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cellplane_api::wire::Message;
use rustls::pki_types::CertificateDer;
use tokio::sync::{Semaphore, mpsc, watch};

use crate::conn::{CLOSE_REFUSED, Connection, Inbound, Limits, Watch};
use crate::error::TransportError;
use crate::faults::Faults;
use crate::identity::{Credentials, Identity, Kind};
use crate::tls;

/// Everything a server or peer needs besides addresses.
#[derive(Clone)]
pub struct Setup {
    /// What this side presents.
    pub credentials: Credentials,
    /// The region CA certificate.
    pub ca: CertificateDer<'static>,
    /// Per-connection limits.
    pub limits: Limits,
    /// The chaos seam; `None` in production.
    pub faults: Option<Arc<dyn Faults>>,
}

impl Setup {
    /// A setup with default limits and no faults.
    pub fn new(credentials: Credentials, ca: CertificateDer<'static>) -> Self {
        Self { credentials, ca, limits: Limits::default(), faults: None }
    }
}

/// A listening endpoint.
pub struct Server {
    endpoint: quinn::Endpoint,
}

impl Server {
    /// Listens on `addr`, accepting peers of the `allowed` kinds; what they send arrives on
    /// `inbound`. New connections are announced on the returned channel.
    pub fn bind(
        addr: SocketAddr,
        setup: Setup,
        allowed: &[Kind],
        inbound: mpsc::Sender<Inbound>,
    ) -> Result<(Self, mpsc::Receiver<Connection>), TransportError> {
        let config = tls::server_config(&setup.credentials, &setup.ca, &setup.limits)?;
        let endpoint = quinn::Endpoint::server(config, addr)
            .map_err(|e| TransportError::Config(format!("cannot listen on {addr}: {e}")))?;
        let (announce, connections) = mpsc::channel(1_024);
        tokio::spawn(accept_loop(endpoint.clone(), setup, allowed.to_vec(), inbound, announce));
        Ok((Self { endpoint }, connections))
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        self.endpoint.local_addr().map_err(|e| TransportError::Config(e.to_string()))
    }

    /// Stops accepting and closes every connection.
    pub fn close(&self) {
        self.endpoint.close(0u32.into(), b"server closing");
    }
}

async fn accept_loop(
    endpoint: quinn::Endpoint,
    setup: Setup,
    allowed: Vec<Kind>,
    inbound: mpsc::Sender<Inbound>,
    announce: mpsc::Sender<Connection>,
) {
    // Every connection holds a slot until it ends: a flood of peers cannot grow the server's
    // tasks and buffers past `connections_max`.
    let slots = Arc::new(Semaphore::new(setup.limits.connections_max.max(1)));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(remote = %incoming.remote_address(), "refusing a connection: server full");
            incoming.refuse();
            continue;
        };
        let (setup, allowed, inbound, announce) =
            (setup.clone(), allowed.clone(), inbound.clone(), announce.clone());
        tokio::spawn(async move {
            let quic = match incoming.await {
                Ok(quic) => quic,
                Err(e) => return tracing::debug!(error = %e, "handshake failed"),
            };
            let peer = match peer_identity(&quic) {
                Ok(peer) => peer,
                Err(e) => return quic.close(CLOSE_REFUSED.into(), e.to_string().as_bytes()),
            };
            if !allowed.contains(&peer.kind()) {
                tracing::warn!(%peer, "refusing a peer of a kind this endpoint does not serve");
                return quic.close(CLOSE_REFUSED.into(), b"this endpoint does not serve your kind");
            }
            let connection =
                Connection::start(quic, peer, setup.limits, setup.faults, Some(inbound));
            let _ = announce.try_send(connection.clone());
            connection.closed().await;
            drop(slot);
        });
    }
}

/// The identity in the peer's verified certificate.
fn peer_identity(quic: &quinn::Connection) -> Result<Identity, TransportError> {
    let chain = quic
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or_else(|| TransportError::BadIdentity("peer presented no certificate".into()))?;
    let leaf = chain.first().ok_or_else(|| TransportError::BadIdentity("empty chain".into()))?;
    Identity::from_certificate(leaf)
}

/// Reconnection backoff: capped exponential, full jitter.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// First wait.
    pub initial_ms: u64,
    /// Largest wait.
    pub max_ms: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial_ms: 50, max_ms: 5_000 }
    }
}

/// A client's lasting link to one server.
pub struct Peer {
    current: watch::Receiver<Option<Connection>>,
    _task: tokio::task::JoinHandle<()>,
    server: SocketAddr,
}

impl Peer {
    /// Starts connecting to the server at `addr`, which must prove it is `expect`. Requests the
    /// server sends to this side arrive on `inbound`, if given.
    pub fn connect(
        addr: SocketAddr,
        expect: Identity,
        setup: Setup,
        backoff: Backoff,
        inbound: Option<mpsc::Sender<Inbound>>,
    ) -> Result<Self, TransportError> {
        let server_name = expect.server_name().ok_or_else(|| {
            TransportError::Config(format!("{expect} does not serve connections"))
        })?;
        let endpoint = client_endpoint(addr, &setup)?;
        let (publish, current) = watch::channel(None);
        let task = tokio::spawn(async move {
            let mut wait_ms = backoff.initial_ms.max(1);
            loop {
                match connect_once(&endpoint, addr, &server_name, &expect, &setup, inbound.clone())
                    .await
                {
                    Ok(connection) => {
                        wait_ms = backoff.initial_ms.max(1);
                        if publish.send(Some(connection.clone())).is_err() {
                            return connection.close(); // every Peer handle is gone
                        }
                        tokio::select! {
                            _ = connection.closed() => {}
                            _ = publish.closed() => return connection.close(),
                        }
                        let _ = publish.send(None);
                    }
                    Err(e) => tracing::debug!(%addr, error = %e, "connect failed"),
                }
                if publish.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(rand::random_range(0..=wait_ms))).await;
                wait_ms = (wait_ms * 2).min(backoff.max_ms.max(1));
            }
        });
        Ok(Self { current, _task: task, server: addr })
    }

    /// The live connection, waiting for one at most `wait`.
    pub async fn connection(&self, wait: Duration) -> Result<Connection, TransportError> {
        let mut current = self.current.clone();
        let found = tokio::time::timeout(
            wait,
            current.wait_for(|c| c.as_ref().is_some_and(|c| !c.is_closed())),
        )
        .await;
        match found {
            Ok(Ok(connection)) => connection.clone().ok_or_else(|| self.unavailable()),
            _ => Err(self.unavailable()),
        }
    }

    /// Sends a request, waiting for a connection and the answer together at most `deadline`.
    pub async fn request(
        &self,
        address: u64,
        message: &Message,
        deadline: Duration,
    ) -> Result<Message, TransportError> {
        let start = tokio::time::Instant::now();
        let connection = self.connection(deadline).await?;
        connection.request(address, message, deadline.saturating_sub(start.elapsed())).await
    }

    /// Sends a one-way message now, or fails with `Unavailable` while disconnected.
    pub async fn send(&self, address: u64, message: &Message) -> Result<(), TransportError> {
        let connection = self.current.borrow().clone().ok_or_else(|| self.unavailable())?;
        connection.send(address, message).await
    }

    /// Opens a server stream, waiting for a connection at most `wait`.
    pub async fn watch(
        &self,
        address: u64,
        message: &Message,
        wait: Duration,
    ) -> Result<Watch, TransportError> {
        self.connection(wait).await?.watch(address, message).await
    }

    fn unavailable(&self) -> TransportError {
        TransportError::Unavailable(format!("no connection to {}", self.server))
    }
}

async fn connect_once(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    server_name: &str,
    expect: &Identity,
    setup: &Setup,
    inbound: Option<mpsc::Sender<Inbound>>,
) -> Result<Connection, TransportError> {
    let connect_error = |reason: String| TransportError::Connect { addr: addr.to_string(), reason };
    let connecting =
        endpoint.connect(addr, server_name).map_err(|e| connect_error(e.to_string()))?;
    let quic = connecting.await.map_err(|e| connect_error(e.to_string()))?;
    let peer = peer_identity(&quic)?;
    if &peer != expect {
        quic.close(CLOSE_REFUSED.into(), b"not the server expected");
        return Err(TransportError::Refused {
            peer: peer.to_string(),
            reason: format!("expected {expect}"),
        });
    }
    Ok(Connection::start(quic, peer, setup.limits, setup.faults.clone(), inbound))
}

/// Connects once, without reconnection: for tools and tests that want the first error as is.
pub async fn connect(
    addr: SocketAddr,
    expect: &Identity,
    setup: &Setup,
) -> Result<Connection, TransportError> {
    let server_name = expect
        .server_name()
        .ok_or_else(|| TransportError::Config(format!("{expect} does not serve")))?;
    let endpoint = client_endpoint(addr, setup)?;
    connect_once(&endpoint, addr, &server_name, expect, setup, None).await
}

/// A client socket for reaching `server`, with this side's TLS configuration.
fn client_endpoint(server: SocketAddr, setup: &Setup) -> Result<quinn::Endpoint, TransportError> {
    let any: SocketAddr = if server.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let mut endpoint = quinn::Endpoint::client(any)
        .map_err(|e| TransportError::Config(format!("cannot open a client socket: {e}")))?;
    endpoint.set_default_client_config(tls::client_config(
        &setup.credentials,
        &setup.ca,
        &setup.limits,
    )?);
    Ok(endpoint)
}
