//! Identity and trust: a region certificate authority, and certificates that name the component
//! inside them.
//!
//! Every certificate carries exactly one `cellplane://` URI subject-alternative name, and that is
//! the only thing that decides who a peer is:
//!
//! ```text
//! cellplane://router/<id>      cellplane://cell/<id>      cellplane://host/<id>
//! cellplane://client/<tenant>/<role>          role: tenant | operator
//! ```
//!
//! Servers (routers and cells) also carry the DNS name `<id>.<kind>.cellplane`, which clients
//! verify, and the server-auth key usage; hosts and clients carry only client-auth. So a client
//! certificate cannot pose as a cell: it has neither the name nor the key usage.

use std::fmt;
use std::path::Path;

use cellplane_api::{Name, TenantId};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::TransportError;

/// What kind of component a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// A region router.
    Router,
    /// A cell.
    Cell,
    /// A host agent (or a process running a simulated fleet).
    Host,
    /// An SDK or CLI client, acting for one tenant.
    Client,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Router => "router",
            Kind::Cell => "cell",
            Kind::Host => "host",
            Kind::Client => "client",
        }
    }

    /// Whether this kind serves connections (and so has a DNS name to verify).
    pub fn is_server(self) -> bool {
        matches!(self, Kind::Router | Kind::Cell)
    }
}

/// A client's role within its tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Sees and changes only its own tenant's objects.
    Tenant,
    /// Sees across tenants.
    Operator,
}

/// Who a peer is, as its certificate says.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A router.
    Router(Name),
    /// A cell.
    Cell(Name),
    /// A host.
    Host(Name),
    /// A client of one tenant, in a role.
    Client {
        /// The tenant it acts for.
        tenant: TenantId,
        /// Its role.
        role: Role,
    },
}

impl Identity {
    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self {
            Identity::Router(_) => Kind::Router,
            Identity::Cell(_) => Kind::Cell,
            Identity::Host(_) => Kind::Host,
            Identity::Client { .. } => Kind::Client,
        }
    }

    /// The URI written into its certificate.
    pub fn uri(&self) -> String {
        match self {
            Identity::Router(id) | Identity::Cell(id) | Identity::Host(id) => {
                format!("cellplane://{}/{id}", self.kind().as_str())
            }
            Identity::Client { tenant, role } => {
                let role = match role {
                    Role::Tenant => "tenant",
                    Role::Operator => "operator",
                };
                format!("cellplane://client/{tenant}/{role}")
            }
        }
    }

    /// The DNS name a server is verified by; `None` for hosts and clients.
    pub fn server_name(&self) -> Option<String> {
        match self {
            Identity::Router(id) | Identity::Cell(id) => {
                Some(format!("{id}.{}.cellplane", self.kind().as_str()))
            }
            _ => None,
        }
    }

    /// Parses the URI written by [`Identity::uri`].
    pub fn parse_uri(uri: &str) -> Result<Self, TransportError> {
        let bad = || TransportError::BadIdentity(format!("not a cellplane identity: {uri:?}"));
        let rest = uri.strip_prefix("cellplane://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let name = |s: &str| Name::new(s).map_err(|e| TransportError::BadIdentity(e.to_string()));
        match parts.as_slice() {
            ["router", id] => Ok(Identity::Router(name(id)?)),
            ["cell", id] => Ok(Identity::Cell(name(id)?)),
            ["host", id] => Ok(Identity::Host(name(id)?)),
            ["client", tenant, role] => {
                let tenant = TenantId::new(tenant)
                    .map_err(|e| TransportError::BadIdentity(e.to_string()))?;
                let role = match *role {
                    "tenant" => Role::Tenant,
                    "operator" => Role::Operator,
                    _ => return Err(bad()),
                };
                Ok(Identity::Client { tenant, role })
            }
            _ => Err(bad()),
        }
    }

    /// Reads the identity out of a verified certificate (the peer's leaf).
    pub fn from_certificate(der: &[u8]) -> Result<Self, TransportError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| TransportError::BadIdentity(format!("unreadable certificate: {e}")))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| TransportError::BadIdentity(format!("bad alternative names: {e}")))?
            .ok_or_else(|| TransportError::BadIdentity("certificate names no identity".into()))?;
        let mut uris = san.value.general_names.iter().filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) if uri.starts_with("cellplane://") => {
                Some(*uri)
            }
            _ => None,
        });
        match (uris.next(), uris.next()) {
            (Some(uri), None) => Identity::parse_uri(uri),
            _ => Err(TransportError::BadIdentity(
                "a certificate must name exactly one cellplane identity".into(),
            )),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// A certificate chain and its private key: what a component presents.
#[derive(Debug)]
pub struct Credentials {
    /// The leaf certificate (the CA certificate is not sent; peers have it).
    pub certificate: CertificateDer<'static>,
    /// The leaf's private key, PKCS#8.
    pub key: PrivatePkcs8KeyDer<'static>,
    /// The identity inside the certificate.
    pub identity: Identity,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Self {
            certificate: self.certificate.clone(),
            key: self.key.clone_key(),
            identity: self.identity.clone(),
        }
    }
}

impl Credentials {
    /// The private key in the form rustls takes.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// Writes `<stem>.crt` and `<stem>.key` (PEM) into `dir`.
    pub fn save(&self, dir: &Path, stem: &str) -> Result<(), TransportError> {
        let io = |e: std::io::Error| TransportError::Config(format!("writing credentials: {e}"));
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::write(dir.join(format!("{stem}.crt")), pem("CERTIFICATE", &self.certificate))
            .map_err(io)?;
        write_secret(
            &dir.join(format!("{stem}.key")),
            &pem("PRIVATE KEY", self.key.secret_pkcs8_der()),
        )
        .map_err(io)
    }

    /// Reads credentials written by [`Credentials::save`].
    pub fn load(dir: &Path, stem: &str) -> Result<Self, TransportError> {
        let read = |ext: &str| {
            let path = dir.join(format!("{stem}.{ext}"));
            std::fs::read_to_string(&path)
                .map_err(|e| TransportError::Config(format!("{}: {e}", path.display())))
        };
        let certificate = CertificateDer::from(unpem(&read("crt")?)?);
        let key = PrivatePkcs8KeyDer::from(unpem(&read("key")?)?);
        let identity = Identity::from_certificate(&certificate)?;
        Ok(Self { certificate, key, identity })
    }
}

/// The region's certificate authority.
pub struct CertificateAuthority {
    certificate: CertificateDer<'static>,
    key: KeyPair,
}

/// How long a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// First day valid (year, month, day).
    pub not_before: (i32, u8, u8),
    /// Last day valid (year, month, day).
    pub not_after: (i32, u8, u8),
}

impl Default for Validity {
    fn default() -> Self {
        Self { not_before: (2025, 1, 1), not_after: (2035, 1, 1) }
    }
}

impl CertificateAuthority {
    /// Generates a new CA for `region`.
    pub fn generate(region: &str) -> Result<Self, TransportError> {
        let key = KeyPair::generate().map_err(cert_error)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_error)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, format!("cellplane region {region} CA"));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params, Validity::default());
        let certificate = params.self_signed(&key).map_err(cert_error)?.der().clone();
        Ok(Self { certificate, key })
    }

    /// The CA certificate every component trusts.
    pub fn certificate(&self) -> &CertificateDer<'static> {
        &self.certificate
    }

    /// Issues credentials for `identity`, valid for the default ten years.
    pub fn issue(&self, identity: &Identity) -> Result<Credentials, TransportError> {
        self.issue_with(identity, Validity::default())
    }

    /// Issues credentials for `identity` with explicit validity.
    pub fn issue_with(
        &self,
        identity: &Identity,
        validity: Validity,
    ) -> Result<Credentials, TransportError> {
        let key = KeyPair::generate().map_err(cert_error)?;
        let mut params =
            CertificateParams::new(identity.server_name().into_iter().collect::<Vec<_>>())
                .map_err(cert_error)?;
        params.distinguished_name.push(DnType::CommonName, identity.uri());
        params.subject_alt_names.push(SanType::URI(identity.uri().try_into().map_err(cert_error)?));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = if identity.kind().is_server() {
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth]
        } else {
            vec![ExtendedKeyUsagePurpose::ClientAuth]
        };
        set_validity(&mut params, validity);
        let issuer = Issuer::from_ca_cert_der(&self.certificate, &self.key).map_err(cert_error)?;
        let certificate = params.signed_by(&key, &issuer).map_err(cert_error)?.der().clone();
        Ok(Credentials {
            certificate,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            identity: identity.clone(),
        })
    }

    /// Writes `ca.crt` and `ca.key` (PEM) into `dir`.
    pub fn save(&self, dir: &Path) -> Result<(), TransportError> {
        let io = |e: std::io::Error| TransportError::Config(format!("writing the CA: {e}"));
        std::fs::create_dir_all(dir).map_err(io)?;
        std::fs::write(dir.join("ca.crt"), pem("CERTIFICATE", &self.certificate)).map_err(io)?;
        write_secret(&dir.join("ca.key"), &self.key.serialize_pem()).map_err(io)
    }

    /// Reads a CA written by [`CertificateAuthority::save`].
    pub fn load(dir: &Path) -> Result<Self, TransportError> {
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name))
                .map_err(|e| TransportError::Config(format!("{}: {e}", dir.join(name).display())))
        };
        let certificate = CertificateDer::from(unpem(&read("ca.crt")?)?);
        let key = KeyPair::from_pem(&read("ca.key")?).map_err(cert_error)?;
        Ok(Self { certificate, key })
    }
}

/// Reads a CA certificate (only) written by [`CertificateAuthority::save`].
pub fn load_ca_certificate(dir: &Path) -> Result<CertificateDer<'static>, TransportError> {
    let path = dir.join("ca.crt");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| TransportError::Config(format!("{}: {e}", path.display())))?;
    Ok(CertificateDer::from(unpem(&text)?))
}

/// Writes a private key readable by its owner only.
fn write_secret(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())
}

fn set_validity(params: &mut CertificateParams, validity: Validity) {
    let (y, m, d) = validity.not_before;
    params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = validity.not_after;
    params.not_after = rcgen::date_time_ymd(y, m, d);
}

fn cert_error(e: rcgen::Error) -> TransportError {
    TransportError::Config(format!("certificate: {e}"))
}

fn pem(label: &str, der: &[u8]) -> String {
    ::pem::encode(&::pem::Pem::new(label, der))
}

fn unpem(text: &str) -> Result<Vec<u8>, TransportError> {
    ::pem::parse(text)
        .map(::pem::Pem::into_contents)
        .map_err(|e| TransportError::Config(format!("not a PEM document: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_certificates() {
        let ca = CertificateAuthority::generate("r1").unwrap();
        for identity in [
            Identity::Cell(Name::new("cell-a").unwrap()),
            Identity::Host(Name::new("h42").unwrap()),
            Identity::Client { tenant: TenantId::new("acme").unwrap(), role: Role::Operator },
        ] {
            let creds = ca.issue(&identity).unwrap();
            assert_eq!(Identity::from_certificate(&creds.certificate).unwrap(), identity);
        }
    }

    #[test]
    fn credentials_and_ca_survive_disk() {
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::generate("r1").unwrap();
        ca.save(dir.path()).unwrap();
        let ca = CertificateAuthority::load(dir.path()).unwrap();
        let creds = ca.issue(&Identity::Router(Name::new("r0").unwrap())).unwrap();
        creds.save(dir.path(), "router").unwrap();
        let loaded = Credentials::load(dir.path(), "router").unwrap();
        assert_eq!(loaded.certificate, creds.certificate);
        assert_eq!(loaded.identity, creds.identity);
        assert_eq!(load_ca_certificate(dir.path()).unwrap(), *ca.certificate());
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca.key", "router.key"] {
            let mode = std::fs::metadata(dir.path().join(key)).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "{key} is readable by others");
        }
    }

    #[test]
    fn bad_identities_are_typed_errors() {
        for uri in [
            "http://x",
            "cellplane://cell",
            "cellplane://cell/Bad",
            "cellplane://client/a/root",
            "cellplane://dog/x",
        ] {
            assert!(
                matches!(Identity::parse_uri(uri), Err(TransportError::BadIdentity(_))),
                "{uri}"
            );
        }
        assert!(matches!(
            Identity::from_certificate(b"garbage"),
            Err(TransportError::BadIdentity(_))
        ));
    }
}
