//! The transport, for real: QUIC on 127.0.0.1, mutual TLS, separate processes where it matters.

#![allow(clippy::unwrap_used)] // Tests fail loudly on the first surprise.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cellplane_api::wire::{Heartbeat, Message};
use cellplane_api::{HostId, HostState, Name};
use cellplane_transport::conn::CLOSE_BAD_FRAME;
use cellplane_transport::identity::{Validity, load_ca_certificate};
use cellplane_transport::*;
use tokio::sync::mpsc;

const CHILD_ENV: &str = "CELLPLANE_TRANSPORT_CHILD_DIR";
const PORT_ENV: &str = "CELLPLANE_TRANSPORT_CHILD_PORT";
const SECOND: Duration = Duration::from_secs(5);

fn cell() -> Identity {
    Identity::Cell(Name::new("cell-a").unwrap())
}

fn host(id: &str) -> Identity {
    Identity::Host(Name::new(id).unwrap())
}

fn beat(host: u64, seq: u64) -> Message {
    Message::Heartbeat(Heartbeat { host: HostId(host), seq, epoch: 1, state: HostState::Ready })
}

fn seq_of(message: &Message) -> u64 {
    match message {
        Message::Heartbeat(h) => h.seq,
        other => panic!("expected a heartbeat, got {other:?}"),
    }
}

/// The echo handler: requests answer `seq + 1` from the address they reached; one-way messages
/// are counted; `seq == u64::MAX` asks for the count; `seq == 0` is never answered; watches get
/// `seq` items and end.
async fn serve_echo(mut inbound: mpsc::Receiver<Inbound>, seen: Arc<AtomicU64>) {
    while let Some(Inbound { address, message, reply, peer }) = inbound.recv().await {
        assert!(matches!(*peer, Identity::Host(_)), "only hosts reach this endpoint");
        let seq = seq_of(&message);
        match reply {
            Reply::None => {
                seen.fetch_add(1, Ordering::SeqCst);
            }
            Reply::Respond(responder) if seq == u64::MAX => {
                let _ = responder.respond(Ok(beat(address, seen.load(Ordering::SeqCst)))).await;
            }
            Reply::Respond(responder) if seq == 0 => std::mem::forget(responder),
            Reply::Respond(responder) => {
                let _ = responder.respond(Ok(beat(address, seq + 1))).await;
            }
            Reply::Stream(sink) => {
                tokio::spawn(async move {
                    for i in 0..seq {
                        sink.send(&beat(address, i)).await.unwrap();
                    }
                });
            }
        }
    }
}

/// A region CA and a cell's and a host's credentials, in a directory a child can read.
fn pki(dir: &Path) -> (CertificateAuthority, Setup, Setup) {
    let ca = CertificateAuthority::generate("test").unwrap();
    ca.save(dir).unwrap();
    let cell_creds = ca.issue(&cell()).unwrap();
    cell_creds.save(dir, "cell").unwrap();
    let host_creds = ca.issue(&host("h1")).unwrap();
    let ca_cert = ca.certificate().clone();
    (ca, Setup::new(cell_creds, ca_cert.clone()), Setup::new(host_creds, ca_cert))
}

fn bind_echo(setup: Setup, addr: SocketAddr) -> (Server, Arc<AtomicU64>) {
    let (inbound, receiver) = mpsc::channel(1_024);
    let (server, _connections) = Server::bind(addr, setup, &[Kind::Host], inbound).unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    tokio::spawn(serve_echo(receiver, seen.clone()));
    (server, seen)
}

/// The child process: an echo cell server. Prints its port, serves until killed.
#[tokio::test]
#[ignore = "the child process of the transport tests; run by its parent"]
async fn echo_server_child() {
    let dir = std::env::var(CHILD_ENV).expect("spawned by a transport test");
    let dir = Path::new(&dir);
    let setup =
        Setup::new(Credentials::load(dir, "cell").unwrap(), load_ca_certificate(dir).unwrap());
    let port: u16 = std::env::var(PORT_ENV).map_or(0, |p| p.parse().unwrap());
    let (server, _seen) = bind_echo(setup, SocketAddr::from(([127, 0, 0, 1], port)));
    println!("listening {}", server.local_addr().unwrap().port());
    std::future::pending::<()>().await;
}

fn spawn_child(dir: &Path, port: Option<u16>) -> (Child, SocketAddr) {
    let mut command = Command::new(std::env::current_exe().unwrap());
    command
        .args(["--exact", "echo_server_child", "--ignored", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    if let Some(port) = port {
        command.env(PORT_ENV, port.to_string());
    }
    let mut child = command.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let port = loop {
        let line = lines.next().expect("child printed its port").unwrap();
        // The harness prints "test echo_server_child ... " before our line, without a newline.
        if let Some((_, port)) = line.split_once("listening ") {
            break port.parse::<u16>().unwrap();
        }
    };
    (child, SocketAddr::from(([127, 0, 0, 1], port)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_response_one_way_and_streams_between_two_processes() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, _cell, host_setup) = pki(dir.path());
    let (mut child, addr) = spawn_child(dir.path(), None);
    let peer = Peer::connect(addr, cell(), host_setup, Backoff::default(), None).unwrap();

    let answer = peer.request(7, &beat(0, 41), SECOND).await.unwrap();
    assert_eq!(answer, beat(7, 42), "the answer comes from the address the request reached");

    for i in 1..=100 {
        peer.send(9, &beat(9, i)).await.unwrap();
    }
    // One stream, in order: the count request arrives after all 100 one-way messages.
    assert_eq!(seq_of(&peer.request(9, &beat(9, u64::MAX), SECOND).await.unwrap()), 100);

    let mut watch = peer.watch(3, &beat(3, 5), SECOND).await.unwrap();
    let mut items = Vec::new();
    while let Some(item) = watch.next().await {
        items.push(seq_of(&item.unwrap()));
    }
    assert_eq!(items, [0, 1, 2, 3, 4]);

    let silent = peer.request(1, &beat(1, 0), Duration::from_millis(200)).await;
    assert!(matches!(silent, Err(TransportError::DeadlineExceeded { .. })), "{silent:?}");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_restart_fails_requests_retryably_then_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, _cell, mut host_setup) = pki(dir.path());
    // A killed server says no goodbye: the client learns from silence, after the idle timeout.
    host_setup.limits.idle_timeout_ms = 1_000;
    let (mut child, addr) = spawn_child(dir.path(), None);
    let backoff = Backoff { initial_ms: 20, max_ms: 200 };
    let peer = Peer::connect(addr, cell(), host_setup, backoff, None).unwrap();
    assert_eq!(peer.request(1, &beat(1, 1), SECOND).await.unwrap(), beat(1, 2));
    // An endless watch, open when the server dies.
    let mut watch = peer.watch(2, &beat(2, u64::MAX - 1), SECOND).await.unwrap();
    assert!(watch.next().await.unwrap().is_ok());

    child.kill().unwrap(); // SIGKILL: no goodbye on the wire
    child.wait().unwrap();
    // The watcher falls behind past the idle timeout, then drains: the stream still ends with
    // the loss, never as if it had finished.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let end = loop {
        match watch.next().await {
            Some(Ok(_)) => continue,
            other => break other,
        }
    };
    assert!(matches!(end, Some(Err(TransportError::ConnectionLost(_)))), "{end:?}");
    let during = peer.request(1, &beat(1, 1), Duration::from_millis(300)).await;
    let error = during.expect_err("nobody is there to answer");
    assert!(error.is_retryable(), "an outage is retryable: {error}");

    let (mut child, again) = spawn_child(dir.path(), Some(addr.port()));
    assert_eq!(again, addr);
    let mut answer = Err(TransportError::Closed);
    for _ in 0..50 {
        answer = peer.request(1, &beat(1, 5), SECOND).await;
        if answer.is_ok() {
            break;
        }
    }
    assert_eq!(answer.unwrap(), beat(1, 6), "the peer reconnected to the restarted server");
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_accepts_the_right_peer_and_refuses_every_wrong_one() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cell_setup, host_setup) = pki(dir.path());
    let (server, _) = bind_echo(cell_setup.clone(), "127.0.0.1:0".parse().unwrap());
    let addr = server.local_addr().unwrap();

    // The right peer.
    let connection = connect(addr, &cell(), &host_setup).await.unwrap();
    assert_eq!(**connection.peer(), cell());
    assert_eq!(connection.request(1, &beat(1, 1), SECOND).await.unwrap(), beat(1, 2));

    // A certificate from another CA.
    let stranger_ca = CertificateAuthority::generate("elsewhere").unwrap();
    let stranger = Setup::new(stranger_ca.issue(&host("h1")).unwrap(), ca.certificate().clone());
    let refused =
        async { connect(addr, &cell(), &stranger).await?.request(1, &beat(1, 1), SECOND).await };
    assert!(refused.await.is_err(), "a certificate from another CA must be refused");

    // An expired certificate.
    let old = Validity { not_before: (2020, 1, 1), not_after: (2021, 1, 1) };
    let expired = Setup::new(ca.issue_with(&host("h1"), old).unwrap(), ca.certificate().clone());
    let refused =
        async { connect(addr, &cell(), &expired).await?.request(1, &beat(1, 1), SECOND).await };
    assert!(refused.await.is_err(), "an expired certificate must be refused");

    // A tenant client on the hosts' endpoint: authenticated, but not a kind it serves.
    let tenant = Identity::Client {
        tenant: cellplane_api::TenantId::new("acme").unwrap(),
        role: Role::Tenant,
    };
    let client = Setup::new(ca.issue(&tenant).unwrap(), ca.certificate().clone());
    let refused =
        async { connect(addr, &cell(), &client).await?.request(1, &beat(1, 1), SECOND).await };
    assert!(refused.await.is_err(), "a client must not reach the hosts' endpoint");

    // A client certificate presented as a cell: the host refuses to talk to it.
    let (impostor, _) = bind_echo(client.clone(), "127.0.0.1:0".parse().unwrap());
    let fooled = connect(impostor.local_addr().unwrap(), &cell(), &host_setup).await;
    assert!(matches!(fooled, Err(TransportError::Connect { .. })), "{:?}", fooled.err());

    // The right CA, the wrong cell.
    let other_cell = Identity::Cell(Name::new("cell-b").unwrap());
    let wrong = connect(addr, &other_cell, &host_setup).await;
    assert!(matches!(wrong, Err(TransportError::Connect { .. })), "{:?}", wrong.err());
}

/// A raw QUIC client with a valid host certificate, to send bytes no well-behaved peer would.
async fn raw_stream(addr: SocketAddr, setup: &Setup) -> (quinn::Connection, quinn::SendStream) {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(
        tls::client_config(&setup.credentials, &setup.ca, &setup.limits).unwrap(),
    );
    let quic = endpoint.connect(addr, &cell().server_name().unwrap()).unwrap().await.unwrap();
    let stream = quic.open_uni().await.unwrap();
    (quic, stream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_truncated_oversized_and_wrong_version_frames_close_only_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, cell_setup, host_setup) = pki(dir.path());
    let (server, _) = bind_echo(cell_setup, "127.0.0.1:0".parse().unwrap());
    let addr = server.local_addr().unwrap();
    let good = connect(addr, &cell(), &host_setup).await.unwrap();

    let valid = frame::encode(frame::FrameKind::Request, 1, 1, &beat(1, 1)).unwrap().to_vec();
    let mut oversized = valid.clone();
    oversized[frame::PREFIX_LEN + 4..frame::HEAD_LEN].copy_from_slice(&(64u32 << 20).to_le_bytes());
    let mut newer = valid.clone();
    newer[frame::PREFIX_LEN + 2..frame::PREFIX_LEN + 4].copy_from_slice(&9u16.to_le_bytes());
    let mut corrupt = valid.clone();
    corrupt[frame::HEAD_LEN..].fill(0xff);
    let garbage = vec![0x5a; 300];
    for (name, bytes) in [
        ("garbage", garbage),
        ("oversized", oversized),
        ("newer version", newer),
        ("corrupt body", corrupt),
    ] {
        let (quic, mut stream) = raw_stream(addr, &host_setup).await;
        stream.write_all(&bytes).await.unwrap();
        let reason = tokio::time::timeout(SECOND, quic.closed()).await.expect(name);
        match reason {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(close.error_code, CLOSE_BAD_FRAME.into(), "{name}");
            }
            other => panic!("{name}: expected an application close, got {other}"),
        }
        // The well-behaved peer never noticed.
        assert_eq!(good.request(2, &beat(2, 10), SECOND).await.unwrap(), beat(2, 11), "{name}");
    }
    // A truncated frame followed by the end of the stream: the connection stays usable by
    // nobody, and the server must not wait forever or crash; the good peer is still served.
    let (quic, mut stream) = raw_stream(addr, &host_setup).await;
    stream.write_all(&valid[..valid.len() / 2]).await.unwrap();
    stream.finish().unwrap();
    drop(quic);
    assert_eq!(good.request(2, &beat(2, 20), SECOND).await.unwrap(), beat(2, 21));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_logical_endpoints_share_one_connection() {
    let n: u64 = std::env::var("N").map_or(10_000, |n| n.parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let (_ca, cell_setup, host_setup) = pki(dir.path());
    let (server, _) = bind_echo(cell_setup, "127.0.0.1:0".parse().unwrap());
    let connection = connect(server.local_addr().unwrap(), &cell(), &host_setup).await.unwrap();
    let requests: Vec<_> = (1..=n)
        .map(|address| {
            let connection = connection.clone();
            tokio::spawn(async move {
                let answer = connection
                    .request(address, &beat(address, address), Duration::from_secs(30))
                    .await;
                (address, answer.unwrap())
            })
        })
        .collect();
    for request in requests {
        let (address, answer) = request.await.unwrap();
        assert_eq!(answer, beat(address, address + 1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_slows_its_producer_instead_of_growing_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, cell_setup, mut host_setup) = pki(dir.path());
    host_setup.limits.queued_bytes_max = 64 * 1024;
    // The application reads nothing until told to.
    let (inbound, mut receiver) = mpsc::channel(16);
    let (server, _) =
        Server::bind("127.0.0.1:0".parse().unwrap(), cell_setup, &[Kind::Host], inbound).unwrap();
    let connection = connect(server.local_addr().unwrap(), &cell(), &host_setup).await.unwrap();

    const TOTAL: u64 = 200_000;
    let sent = Arc::new(AtomicU64::new(0));
    let producer = {
        let (connection, sent) = (connection.clone(), sent.clone());
        tokio::spawn(async move {
            for i in 0..TOTAL {
                connection.send(1, &beat(1, i)).await.unwrap();
                sent.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    // Wait until the producer stalls.
    let mut last = u64::MAX;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = sent.load(Ordering::SeqCst);
        if now == last {
            break;
        }
        last = now;
    }
    let stalled_at = sent.load(Ordering::SeqCst);
    // What can be in flight: our queue, QUIC's windows on both sides, the app channel.
    let frame_len =
        frame::encode(frame::FrameKind::OneWay, 0, 1, &beat(1, 1)).unwrap().len() as u64;
    let bound = (64 * 1024 + 2 * 16 * 1024 * 1024) / frame_len + 16;
    assert!(stalled_at < TOTAL, "the producer never waited: memory grows without bound");
    assert!(
        stalled_at <= bound,
        "{stalled_at} messages buffered, more than the windows allow ({bound})"
    );

    // Now read: everything arrives, in order, nothing lost.
    for expected in 0..TOTAL {
        let item = receiver.recv().await.unwrap();
        assert_eq!(seq_of(&item.message), expected);
    }
    producer.await.unwrap();
}

/// A fault seam that drops every frame to a chosen address: a partition of one endpoint.
struct Partition(u64);

impl faults::Faults for Partition {
    fn on_send(&self, _peer: &Identity, address: u64, _len: usize) -> faults::Fate {
        if address == self.0 { faults::Fate::Drop } else { faults::Fate::Deliver }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_seam_partitions_one_endpoint_and_spares_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, cell_setup, mut host_setup) = pki(dir.path());
    host_setup.faults = Some(Arc::new(Partition(13)));
    let (server, _) = bind_echo(cell_setup, "127.0.0.1:0".parse().unwrap());
    let connection = connect(server.local_addr().unwrap(), &cell(), &host_setup).await.unwrap();
    let cut = connection.request(13, &beat(13, 1), Duration::from_millis(200)).await;
    assert!(matches!(cut, Err(TransportError::DeadlineExceeded { .. })), "{cut:?}");
    assert_eq!(connection.request(14, &beat(14, 1), SECOND).await.unwrap(), beat(14, 2));
    // One-way traffic to the cut address is lost too; the rest arrives, in order.
    for (address, n) in [(13, 3), (14, 2)] {
        for i in 0..n {
            connection.send(address, &beat(address, i + 1)).await.unwrap();
        }
    }
    assert_eq!(seq_of(&connection.request(14, &beat(14, u64::MAX), SECOND).await.unwrap()), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_refuses_new_peers_and_frees_the_slot_when_one_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let (_ca, mut cell_setup, host_setup) = pki(dir.path());
    cell_setup.limits.connections_max = 1;
    let (server, _) = bind_echo(cell_setup, "127.0.0.1:0".parse().unwrap());
    let addr = server.local_addr().unwrap();

    let first = connect(addr, &cell(), &host_setup).await.unwrap();
    assert_eq!(first.request(1, &beat(1, 1), SECOND).await.unwrap(), beat(1, 2));
    let second = connect(addr, &cell(), &host_setup).await;
    assert!(matches!(second, Err(TransportError::Connect { .. })), "{:?}", second.err());

    first.close();
    // The slot comes back once the server sees the close; retry briefly until it does.
    let mut third = Err(TransportError::Closed);
    for _ in 0..50 {
        third = connect(addr, &cell(), &host_setup).await;
        if third.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(third.unwrap().request(2, &beat(2, 1), SECOND).await.unwrap(), beat(2, 2));
}
