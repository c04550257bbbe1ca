//! rustls and quinn configuration: TLS 1.3 only, the ring provider chosen explicitly, mutual
//! authentication against the region CA on both sides.

use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;

use crate::conn::Limits;
use crate::error::TransportError;
use crate::identity::Credentials;

/// The ALPN protocol id; bump it with the framing.
pub const ALPN: &[u8] = b"cellplane/1";

/// The ring provider, chosen explicitly. rustls deprecates it for lacking post-quantum key
/// exchange; aws-lc-rs has that but needs a C toolchain build we avoid. Revisit with rustls 0.24.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<RootCertStore>, TransportError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).map_err(tls_error)?;
    Ok(Arc::new(roots))
}

fn transport(limits: &Limits) -> Arc<quinn::TransportConfig> {
    let mut config = quinn::TransportConfig::default();
    let idle = quinn::VarInt::from_u32(limits.idle_timeout_ms);
    config.max_idle_timeout(Some(idle.into()));
    // Keep-alives well inside the idle timeout, so only a dead peer times out.
    config.keep_alive_interval(Some(Duration::from_millis(u64::from(limits.idle_timeout_ms / 4))));
    // One uni stream each way carries everything; a few spare for reconnect races.
    config.max_concurrent_uni_streams(quinn::VarInt::from_u32(4));
    config.max_concurrent_bidi_streams(quinn::VarInt::from_u32(0));
    Arc::new(config)
}

/// A server's QUIC configuration: presents `credentials`, requires a client certificate from `ca`.
pub fn server_config(
    credentials: &Credentials,
    ca: &CertificateDer<'static>,
    limits: &Limits,
) -> Result<quinn::ServerConfig, TransportError> {
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
        .build()
        .map_err(tls_error)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![credentials.certificate.clone()], credentials.private_key())
        .map_err(tls_error)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(tls_error)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport(limits));
    Ok(config)
}

/// A client's QUIC configuration: presents `credentials`, trusts servers certified by `ca`.
pub fn client_config(
    credentials: &Credentials,
    ca: &CertificateDer<'static>,
    limits: &Limits,
) -> Result<quinn::ClientConfig, TransportError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(vec![credentials.certificate.clone()], credentials.private_key())
        .map_err(tls_error)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(tls_error)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport(limits));
    Ok(config)
}

fn tls_error(e: impl std::fmt::Display) -> TransportError {
    TransportError::Config(format!("tls: {e}"))
}
