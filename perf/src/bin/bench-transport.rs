//! Transport: one connection on loopback with mutual TLS, 64- and 256-byte messages. One-way
//! messages/s and request/response round-trip p50/p99, unloaded and under load — beside raw quinn
//! on one stream with the same TLS configuration (the ceiling), measured in the same run.
//!
//! Goals (issue 4): at least 1M one-way messages/s per connection; p99 unloaded round trip under
//! 200 µs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cellplane_api::wire::{Message, StatusReport};
use cellplane_api::{Name, ReplicaPhase, TenantId, WorkloadName};
use cellplane_perf::{rate, report};
use cellplane_transport::*;
use tokio::sync::mpsc;

const ONE_WAY: u64 = 1_000_000;
const RAW: u64 = 2_000_000;
const ROUND_TRIPS: usize = 20_000;
const LOADED_REQUESTERS: usize = 32;

/// A status report whose detail text is `len` bytes: the rest of the frame is fixed overhead.
fn payload(len: usize) -> Message {
    Message::Status(Box::new(StatusReport {
        host: cellplane_api::HostId(1),
        tenant: TenantId::new("acme").expect("name"),
        workload: WorkloadName::new("web").expect("name"),
        ordinal: 1,
        epoch: 1,
        phase: ReplicaPhase::Running,
        detail: "x".repeat(len),
    }))
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at].as_secs_f64() * 1e6
}

struct Pki {
    cell: Setup,
    host: Setup,
}

fn pki() -> Pki {
    let ca = CertificateAuthority::generate("bench").expect("ca");
    let cell = Identity::Cell(Name::new("cell-a").expect("name"));
    let host = Identity::Host(Name::new("h1").expect("name"));
    let ca_cert = ca.certificate().clone();
    Pki {
        cell: Setup::new(ca.issue(&cell).expect("cert"), ca_cert.clone()),
        host: Setup::new(ca.issue(&host).expect("cert"), ca_cert),
    }
}

/// Raw quinn: one uni stream each way, fixed-size messages, the same TLS as ours.
async fn raw_quinn(pki: &Pki, len: usize) {
    let server = quinn::Endpoint::server(
        tls::server_config(&pki.cell.credentials, &pki.cell.ca, &Limits::default())
            .expect("config"),
        "127.0.0.1:0".parse().expect("addr"),
    )
    .expect("server");
    let addr = server.local_addr().expect("addr");
    let accept = tokio::spawn(async move {
        let quic = server.accept().await.expect("incoming").await.expect("handshake");
        let mut from_client = quic.accept_uni().await.expect("stream");
        let mut to_client = quic.open_uni().await.expect("stream");
        // Phase 1: count one-way bytes. Phase 2: echo ping-pong.
        let mut buf = vec![0u8; 64 * 1024];
        let mut received = 0u64;
        let total = RAW * len as u64 * 2;
        while received < total {
            let want = buf.len().min((total - received) as usize);
            let n = from_client.read(&mut buf[..want]).await.expect("read").expect("open");
            received += n as u64;
        }
        let mut message = vec![0u8; len];
        for _ in 0..ROUND_TRIPS {
            from_client.read_exact(&mut message).await.expect("ping");
            to_client.write_all(&message).await.expect("pong");
        }
        quic
    });
    let mut endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("client");
    endpoint.set_default_client_config(
        tls::client_config(&pki.host.credentials, &pki.host.ca, &Limits::default())
            .expect("config"),
    );
    let quic =
        endpoint.connect(addr, "cell-a.cell.cellplane").expect("connect").await.expect("handshake");
    let mut to_server = quic.open_uni().await.expect("stream");
    let message = vec![7u8; len];
    let start = Instant::now();
    for _ in 0..RAW {
        to_server.write_all(&message).await.expect("write");
    }
    report(
        &format!("raw quinn {len} B, one write each (ceiling)"),
        rate(RAW, start.elapsed()),
        "msg/s",
    );
    let batch: Vec<u8> = message.iter().copied().cycle().take(len * 1_000).collect();
    let start = Instant::now();
    for _ in 0..RAW / 1_000 {
        to_server.write_all(&batch).await.expect("write");
    }
    report(
        &format!("raw quinn {len} B, buffered writes (ceiling)"),
        rate(RAW, start.elapsed()),
        "msg/s",
    );
    // A uni stream is announced with its first byte: the first ping opens the way back.
    let mut pong = vec![0u8; len];
    to_server.write_all(&message).await.expect("ping");
    let mut from_server = quic.accept_uni().await.expect("stream");
    from_server.read_exact(&mut pong).await.expect("pong");
    let mut times = Vec::with_capacity(ROUND_TRIPS);
    for _ in 1..ROUND_TRIPS {
        let start = Instant::now();
        to_server.write_all(&message).await.expect("ping");
        from_server.read_exact(&mut pong).await.expect("pong");
        times.push(start.elapsed());
    }
    times.sort_unstable();
    report(&format!("raw quinn {len} B ping-pong p50 (ceiling)"), percentile(&times, 0.50), "µs");
    report(&format!("raw quinn {len} B ping-pong p99 (ceiling)"), percentile(&times, 0.99), "µs");
    drop(accept.await);
}

async fn ours(pki: &Pki, len: usize) {
    let (inbound, mut receiver) = mpsc::channel::<Inbound>(4_096);
    let (server, _connections) = Server::bind(
        "127.0.0.1:0".parse().expect("addr"),
        pki.cell.clone(),
        &[Kind::Host],
        inbound,
    )
    .expect("server");
    let addr: SocketAddr = server.local_addr().expect("addr");
    let counted = Arc::new(AtomicU64::new(0));
    {
        let counted = counted.clone();
        tokio::spawn(async move {
            while let Some(Inbound { message, reply, .. }) = receiver.recv().await {
                match reply {
                    Reply::Respond(responder) => drop(responder.respond(Ok(message)).await),
                    _ => {
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    let cell = pki.cell.credentials.identity.clone();
    let connection = connect(addr, &cell, &pki.host).await.expect("connect");
    let message = payload(len);
    let frame_len = frame::encode(frame::FrameKind::OneWay, 0, 1, &message).expect("frame").len();

    let start = Instant::now();
    for i in 0..ONE_WAY {
        connection.send(i % 10_000, &message).await.expect("send");
    }
    while counted.load(Ordering::Relaxed) < ONE_WAY {
        tokio::task::yield_now().await;
    }
    report(
        &format!("cellplane one-way, {len} B detail ({frame_len} B frame), received"),
        rate(ONE_WAY, start.elapsed()),
        "msg/s",
    );

    let mut times = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..ROUND_TRIPS {
        let start = Instant::now();
        connection.request(i as u64, &message, Duration::from_secs(5)).await.expect("request");
        times.push(start.elapsed());
    }
    times.sort_unstable();
    report(
        &format!("cellplane request/response {len} B unloaded p50"),
        percentile(&times, 0.50),
        "µs",
    );
    report(
        &format!("cellplane request/response {len} B unloaded p99"),
        percentile(&times, 0.99),
        "µs",
    );

    let start = Instant::now();
    let loaded: Vec<_> = (0..LOADED_REQUESTERS)
        .map(|r| {
            let (connection, message) = (connection.clone(), message.clone());
            tokio::spawn(async move {
                let mut times = Vec::with_capacity(ROUND_TRIPS / LOADED_REQUESTERS);
                for i in 0..ROUND_TRIPS / LOADED_REQUESTERS {
                    let start = Instant::now();
                    let to = (r * 1_000 + i) as u64;
                    connection
                        .request(to, &message, Duration::from_secs(5))
                        .await
                        .expect("request");
                    times.push(start.elapsed());
                }
                times
            })
        })
        .collect();
    let mut times = Vec::new();
    for task in loaded {
        times.extend(task.await.expect("requester"));
    }
    let elapsed = start.elapsed();
    times.sort_unstable();
    let label = format!("cellplane request/response {len} B, {LOADED_REQUESTERS} concurrent");
    report(&format!("{label}: requests/s"), rate(times.len() as u64, elapsed), "/s");
    report(&format!("{label}: p50"), percentile(&times, 0.50), "µs");
    report(&format!("{label}: p99"), percentile(&times, 0.99), "µs");
    server.close();
}

fn main() {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let pki = pki();
    for len in [64, 256] {
        println!("-- {len}-byte messages, one connection, loopback, mutual TLS");
        runtime.block_on(raw_quinn(&pki, len));
        runtime.block_on(ours(&pki, len));
    }
}
