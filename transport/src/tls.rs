//! Cluster identity for mutual TLS 1.3: the cluster CA, node certificates whose
//! subject alternative name is the node's name, the per-user development CA, and the
//! rustls configurations both ends of a connection use.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// The ALPN protocol id of a node; it selects ACP version 1 during the handshake.
pub const ALPN_ACP_V1: &[u8] = b"acp/1";
/// The ALPN protocol id of a client (`agentmesh status`, `submit`): ACP version 1
/// from a program that is not a member of the cluster. A node tells each client
/// connection apart, so many clients may share one certificate name.
pub const ALPN_ACP_CLIENT_V1: &[u8] = b"acp-client/1";

/// What an endpoint is to the nodes it connects to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    /// A cluster node: it accepts connections, and one connection per pair of nodes
    /// is kept (its name is its identity in the cluster).
    #[default]
    Node,
    /// A client of a node: it only dials, and a node keeps each of its connections
    /// apart from any other with the same certificate name.
    Client,
}

impl Role {
    /// The ALPN protocol id it offers.
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Role::Node => ALPN_ACP_V1,
            Role::Client => ALPN_ACP_CLIENT_V1,
        }
    }
}
/// The environment variable that moves the development CA (tests use it).
pub const DEV_CA_DIR_ENV: &str = "AGENTMESH_DEV_CA_DIR";

/// Why an identity could not be created, loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A file exists that this operation would overwrite.
    #[error("{path} already exists; refusing to overwrite it")]
    AlreadyExists {
        /// The file.
        path: PathBuf,
    },
    /// A node name that cannot be a DNS name in a certificate.
    #[error("node name {name:?} {why}")]
    BadNodeName {
        /// The name given.
        name: String,
        /// The rule it breaks.
        why: &'static str,
    },
    /// A certificate or key that does not parse.
    #[error("{what}: {reason}")]
    Malformed {
        /// What was being read.
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// No home or data directory to keep the development CA in.
    #[error("no directory for the development CA: set {DEV_CA_DIR_ENV}, XDG_DATA_HOME or HOME")]
    NoDataDir,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Checks that `name` can name a node: 1..=63 characters of `a-z`, `0-9` and `-`,
/// not starting or ending with `-` (one DNS label, so it fits a certificate's SAN).
pub fn validate_node_name(name: &str) -> Result<(), TlsError> {
    let bad = |why| {
        Err(TlsError::BadNodeName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() || name.len() > 63 {
        return bad("must be 1 to 63 characters long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return bad("may hold only a-z, 0-9 and '-'");
    }
    if name.starts_with('-') || name.ends_with('-') {
        return bad("may not start or end with '-'");
    }
    Ok(())
}

/// A node's certificate chain and private key, and the CA that peers must chain to.
#[derive(Debug)]
pub struct NodeIdentity {
    /// The node's name, as in its certificate.
    pub name: String,
    /// The node's certificate (leaf first).
    pub cert_chain: Vec<CertificateDer<'static>>,
    /// The node's private key.
    pub key: PrivateKeyDer<'static>,
    /// The cluster CA certificate.
    pub ca: CertificateDer<'static>,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> NodeIdentity {
        NodeIdentity {
            name: self.name.clone(),
            cert_chain: self.cert_chain.clone(),
            key: self.key.clone_key(),
            ca: self.ca.clone(),
        }
    }
}

/// A certificate and its key in PEM, as written to disk.
#[derive(Debug, Clone)]
pub struct PemPair {
    /// The certificate.
    pub cert_pem: String,
    /// The PKCS#8 private key.
    pub key_pem: String,
}

/// The cluster certificate authority: signs node certificates.
pub struct ClusterCa {
    pem: PemPair,
    issuer: Issuer<'static, KeyPair>,
    cert_der: CertificateDer<'static>,
}

impl ClusterCa {
    /// A new CA with a fresh ECDSA P-256 key, valid for ten years.
    pub fn generate() -> Result<ClusterCa, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "AgentMesh cluster CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2036, 1, 1);
        let cert = params.self_signed(&key)?;
        ClusterCa::from_pem(&cert.pem(), &key.serialize_pem())
    }

    /// A CA from its certificate and key in PEM.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| TlsError::Malformed {
            what: "CA key".into(),
            reason: format!("not a PEM private key ({e})"),
        })?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| TlsError::Malformed {
            what: "CA certificate".into(),
            reason: e.to_string(),
        })?;
        let cert_der = parse_cert_pem(cert_pem, "CA certificate")?;
        Ok(ClusterCa {
            pem: PemPair {
                cert_pem: cert_pem.to_string(),
                key_pem: key_pem.to_string(),
            },
            issuer,
            cert_der,
        })
    }

    /// The CA's certificate and key in PEM.
    pub fn pem(&self) -> &PemPair {
        &self.pem
    }

    /// The CA's certificate.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Issues a certificate for node `name`, valid from 2024 to ten years from the CA's
    /// own end (client and server use, SAN = `name`).
    pub fn issue(&self, name: &str) -> Result<PemPair, TlsError> {
        self.issue_valid(name, (2024, 1, 1), (2036, 1, 1))
    }

    /// Issues a node certificate valid from `not_before` to `not_after`, each given as
    /// (year, month, day) in UTC.
    pub fn issue_valid(
        &self,
        name: &str,
        not_before: (i32, u8, u8),
        not_after: (i32, u8, u8),
    ) -> Result<PemPair, TlsError> {
        validate_node_name(name)?;
        for (y, m, d) in [not_before, not_after] {
            if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=28).contains(&d) {
                return Err(TlsError::Malformed {
                    what: "validity date".into(),
                    reason: format!(
                        "{y}-{m}-{d}: use years 1970..=9999, months 1..=12, days 1..=28"
                    ),
                });
            }
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = rcgen::date_time_ymd(not_before.0, not_before.1, not_before.2);
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(PemPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A node identity issued by this CA, in memory.
    pub fn node_identity(&self, name: &str) -> Result<NodeIdentity, TlsError> {
        let pair = self.issue(name)?;
        NodeIdentity::from_pem(name, &pair, &self.pem.cert_pem)
    }

    /// Writes `ca.crt` and `ca.key` (mode 0600) into `dir`, refusing to overwrite.
    pub fn save(&self, dir: &Path) -> Result<(), TlsError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        refuse_existing(&[dir.join("ca.key"), dir.join("ca.crt")])?;
        write_new(&dir.join("ca.key"), self.pem.key_pem.as_bytes(), 0o600)?;
        write_new(&dir.join("ca.crt"), self.pem.cert_pem.as_bytes(), 0o644)
    }

    /// Reads `ca.crt` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<ClusterCa, TlsError> {
        let cert = read_text(&dir.join("ca.crt"))?;
        let key = read_text(&dir.join("ca.key"))?;
        ClusterCa::from_pem(&cert, &key)
    }

    /// Issues node `name` and writes `NAME.crt` and `NAME.key` (mode 0600) into `dir`.
    pub fn issue_to(&self, dir: &Path, name: &str) -> Result<(), TlsError> {
        refuse_existing(&[
            dir.join(format!("{name}.key")),
            dir.join(format!("{name}.crt")),
        ])?;
        let pair = self.issue(name)?;
        write_new(
            &dir.join(format!("{name}.key")),
            pair.key_pem.as_bytes(),
            0o600,
        )?;
        write_new(
            &dir.join(format!("{name}.crt")),
            pair.cert_pem.as_bytes(),
            0o644,
        )
    }
}

impl NodeIdentity {
    /// An identity from PEM; checks that the certificate names `name`.
    pub fn from_pem(name: &str, pair: &PemPair, ca_pem: &str) -> Result<NodeIdentity, TlsError> {
        validate_node_name(name)?;
        let cert = parse_cert_pem(&pair.cert_pem, &format!("certificate of {name}"))?;
        let named = node_name_of(&cert)?;
        if named != name {
            return Err(TlsError::Malformed {
                what: format!("certificate of {name}"),
                reason: format!("it names node {named:?}"),
            });
        }
        let key = rustls::pki_types::pem::PemObject::from_pem_slice(pair.key_pem.as_bytes())
            .map_err(|e| TlsError::Malformed {
                what: format!("key of {name}"),
                reason: pem_reason(&e),
            })?;
        Ok(NodeIdentity {
            name: name.to_string(),
            cert_chain: vec![cert],
            key,
            ca: parse_cert_pem(ca_pem, "CA certificate")?,
        })
    }

    /// Reads `NAME.crt`, `NAME.key` and `ca.crt` from `dir`.
    pub fn load(dir: &Path, name: &str) -> Result<NodeIdentity, TlsError> {
        validate_node_name(name)?;
        let pair = PemPair {
            cert_pem: read_text(&dir.join(format!("{name}.crt")))?,
            key_pem: read_text(&dir.join(format!("{name}.key")))?,
        };
        NodeIdentity::from_pem(name, &pair, &read_text(&dir.join("ca.crt"))?)
    }

    /// The development identity for `name`: a certificate issued in memory from the
    /// per-user development CA, which is created on first use. Returns the CA's folder
    /// too, so the caller can say where it is. Development only: anyone with the same
    /// user account shares the CA.
    pub fn development(name: &str) -> Result<(NodeIdentity, PathBuf), TlsError> {
        NodeIdentity::development_at(&dev_ca_dir()?, name)
    }

    /// [`NodeIdentity::development`] with the development CA in `dir`.
    pub fn development_at(dir: &Path, name: &str) -> Result<(NodeIdentity, PathBuf), TlsError> {
        let dir = dir.to_path_buf();
        let ca = match ClusterCa::load(&dir) {
            Ok(ca) => ca,
            Err(TlsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                create_dev_ca(&dir)?
            }
            Err(e) => return Err(e),
        };
        Ok((ca.node_identity(name)?, dir))
    }
}

/// Where the development CA lives: `$AGENTMESH_DEV_CA_DIR`, else
/// `$XDG_DATA_HOME/agentmesh/dev-ca`, else `~/.local/share/agentmesh/dev-ca`.
pub fn dev_ca_dir() -> Result<PathBuf, TlsError> {
    let var = |k| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var(DEV_CA_DIR_ENV) {
        return Ok(dir);
    }
    let data = var("XDG_DATA_HOME")
        .or_else(|| var("HOME").map(|h| h.join(".local/share")))
        .ok_or(TlsError::NoDataDir)?;
    Ok(data.join("agentmesh/dev-ca"))
}

/// Creates the development CA atomically: written to a temporary folder, then renamed,
/// so two nodes starting at once end up with the same CA.
fn create_dev_ca(dir: &Path) -> Result<ClusterCa, TlsError> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    let tmp = parent.join(format!(".dev-ca-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    ClusterCa::generate()?.save(&tmp)?;
    match fs::rename(&tmp, dir) {
        Ok(()) => {}
        Err(_) if dir.join("ca.crt").exists() => {
            let _ = fs::remove_dir_all(&tmp);
        }
        Err(e) => return Err(io_err(dir)(e)),
    }
    ClusterCa::load(dir)
}

/// Fails if any of `paths` exists, before anything is written.
fn refuse_existing(paths: &[PathBuf]) -> Result<(), TlsError> {
    match paths.iter().find(|p| p.exists()) {
        Some(path) => Err(TlsError::AlreadyExists { path: path.clone() }),
        None => Ok(()),
    }
}

fn read_text(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(io_err(path))
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            TlsError::AlreadyExists {
                path: path.to_path_buf(),
            }
        } else {
            io_err(path)(e)
        }
    })?;
    file.write_all(bytes).map_err(io_err(path))
}

fn parse_cert_pem(pem: &str, what: &str) -> Result<CertificateDer<'static>, TlsError> {
    rustls::pki_types::pem::PemObject::from_pem_slice(pem.as_bytes()).map_err(|e| {
        TlsError::Malformed {
            what: what.to_string(),
            reason: pem_reason(&e),
        }
    })
}

/// A PEM error in words (pki-types prints the markers it names as lists of bytes).
fn pem_reason(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error as Pem;
    match e {
        Pem::MissingSectionEnd { end_marker } => format!(
            "its PEM block has no end line ({}): the file is cut short",
            String::from_utf8_lossy(end_marker).trim()
        ),
        Pem::IllegalSectionStart { line } => format!(
            "a malformed PEM begin line: {}",
            String::from_utf8_lossy(line).trim()
        ),
        Pem::Base64Decode(why) => format!("its PEM block is not valid base64 ({why})"),
        Pem::NoItemsFound => "no PEM block of that kind in it".into(),
        other => other.to_string(),
    }
}

/// The node name a certificate carries: its first DNS subject alternative name.
pub fn node_name_of(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    let malformed = |reason: String| TlsError::Malformed {
        what: "peer certificate".into(),
        reason,
    };
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| malformed(e.to_string()))?;
    let san = parsed
        .subject_alternative_name()
        .map_err(|e| malformed(e.to_string()))?
        .ok_or_else(|| malformed("no subject alternative name".into()))?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
            _ => None,
        })
        .ok_or_else(|| malformed("no DNS name in the subject alternative name".into()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(identity: &NodeIdentity) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots
        .add(identity.ca.clone())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(roots))
}

/// The server side: TLS 1.3 only, a client certificate chained to the cluster CA is
/// required, early data (0-RTT) is accepted (ACP refuses state-changing frames in it).
pub fn server_config(identity: &NodeIdentity) -> Result<rustls::ServerConfig, TlsError> {
    let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(identity)?, provider())
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cfg)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(cfg)?;
    config.alpn_protocols = vec![ALPN_ACP_V1.to_vec(), ALPN_ACP_CLIENT_V1.to_vec()];
    config.max_early_data_size = u32::MAX;
    Ok(config)
}

/// The client side: TLS 1.3 only, presents the node's certificate, accepts a server
/// whose certificate chains to the cluster CA and is valid for the node name it
/// carries. Which node that is, the caller checks after the handshake
/// ([`node_name_of`]), since a node joining by address does not know it beforehand.
pub fn client_config(identity: &NodeIdentity) -> Result<rustls::ClientConfig, TlsError> {
    client_config_as(identity, Role::Node)
}

/// [`client_config`] for an endpoint of the given role (its ALPN says which).
pub fn client_config_as(
    identity: &NodeIdentity,
    role: Role,
) -> Result<rustls::ClientConfig, TlsError> {
    let cfg = |e: rustls::Error| TlsError::Config(e.to_string());
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots(identity)?, provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cfg)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ClusterServerVerifier { inner }))
        .with_client_auth_cert(identity.cert_chain.clone(), identity.key.clone_key())
        .map_err(cfg)?;
    config.alpn_protocols = vec![role.alpn().to_vec()];
    config.enable_early_data = true;
    Ok(config)
}

/// Verifies a server certificate against the cluster CA, for the node name the
/// certificate itself carries (instead of the name dialled, which may be unknown).
#[derive(Debug)]
struct ClusterServerVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
}

impl ServerCertVerifier for ClusterServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _dialled: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = node_name_of(end_entity).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        let name = ServerName::try_from(name).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
        })?;
        self.inner
            .verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_single_dns_labels() {
        assert!(validate_node_name("node-1").is_ok());
        for bad in ["", "Node", "a.b", "-a", "a-", "a_b", &"x".repeat(64)] {
            assert!(validate_node_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn issued_certificates_name_their_node_and_chain_to_the_ca() {
        let ca = ClusterCa::generate().unwrap();
        let id = ca.node_identity("alpha").unwrap();
        assert_eq!(node_name_of(&id.cert_chain[0]).unwrap(), "alpha");
        assert_eq!(&id.ca, ca.cert_der());
        server_config(&id).unwrap();
        client_config(&id).unwrap();
        let reloaded = ClusterCa::from_pem(&ca.pem().cert_pem, &ca.pem().key_pem).unwrap();
        let other = reloaded.issue("beta").unwrap();
        assert!(NodeIdentity::from_pem("beta", &other, &ca.pem().cert_pem).is_ok());
        assert!(NodeIdentity::from_pem("gamma", &other, &ca.pem().cert_pem).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn keys_are_written_owner_only_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("agentmesh-tls-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let ca = ClusterCa::generate().unwrap();
        ca.save(&dir).unwrap();
        ClusterCa::load(&dir).unwrap().issue_to(&dir, "n1").unwrap();
        for f in ["ca.key", "n1.key"] {
            let mode = fs::metadata(dir.join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        assert!(matches!(ca.save(&dir), Err(TlsError::AlreadyExists { .. })));
        assert_eq!(NodeIdentity::load(&dir, "n1").unwrap().name, "n1");
        fs::remove_dir_all(&dir).unwrap();
    }
}
