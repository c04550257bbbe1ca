//! How every cellplane component talks: QUIC (quinn) with mutual TLS (rustls, ring), carrying the
//! rkyv envelopes of `cellplane_api::wire`.
//!
//! * [`identity`]: the region CA and certificates naming each component (router, cell, host,
//!   client with tenant and role). The handler of every message sees the authenticated peer
//!   identity, and nothing else decides who the caller is.
//! * [`conn`]: messaging on one connection — requests with deadlines, one-way messages, server
//!   streams (watches) — with logical addressing, so one connection carries thousands of
//!   simulated hosts; bounded in-flight requests and queued bytes; backpressure to the producer.
//! * [`endpoint`]: servers that refuse peers of the wrong kind, and peers that reconnect with
//!   capped, jittered backoff.
//! * [`faults`]: the seam through which the chaos harness drops, delays, duplicates, reorders and
//!   partitions traffic.
//!
//! Why not `ractor_cluster`: it keeps one proxy actor per remote actor (about 7.8 KB each here),
//! and a cell talks to 100,000 hosts; logical addresses on one connection cost nothing per host.
#![deny(missing_docs)]

pub mod conn;
pub mod endpoint;
mod error;
pub mod faults;
pub mod frame;
pub mod identity;
pub mod tls;

pub use conn::{Connection, Inbound, Limits, Reply, Responder, StreamSink, Watch};
pub use endpoint::{Backoff, Peer, Server, Setup, connect};
pub use error::TransportError;
pub use identity::{CertificateAuthority, Credentials, Identity, Kind, Role};
