//! Mutual TLS for Cairn's links: the replica protocol, the node admin API, the control REST
//! API and the NBD front end all take their TLS configuration from here, so that every
//! listener applies the same rules.
//!
//! * [`TlsFiles`] are the three flags that etcd also uses (`--tls-ca`, `--tls-cert`,
//!   `--tls-key`): all three or none.
//! * [`Tls`] holds what they load: a rustls server configuration that **requires** a client
//!   certificate signed by the cluster CA (a peer without one is refused inside the handshake,
//!   before any frame of the protocol is read), and a client configuration that presents this
//!   process's certificate and verifies the server's against the same CA and the address
//!   dialled.
//! * [`Identity`] is what a certificate names, read from its subject common name:
//!   `node:ID`, `control:NAME` or `admin:NAME`. Authorisation decisions (only a node may open a
//!   replica) are made on it, and every listener logs it with each request.
//! * [`check_listener`] is the rule that a listener on a non-loopback address without TLS is
//!   refused at start unless the operator says `--insecure`.
//! * [`issue`] (feature `issue`) creates a cluster CA and issues certificates for it.
//!
//! Crypto comes from rustls's `ring` provider, chosen explicitly for every configuration, so
//! no process-wide default has to be installed first.

#[cfg(feature = "issue")]
pub mod issue;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// File names in a certificate directory written by [`issue`]: the cluster CA's certificate,
/// and one identity's certificate and key.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CERT_FILE: &str = "cert.pem";
pub const KEY_FILE: &str = "key.pem";

/// Errors loading or applying a TLS configuration; each names the file or flag.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS needs all of --tls-ca, --tls-cert and --tls-key: {missing} missing")]
    Partial { missing: String },
    #[error("{what} '{}': {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} '{}': {why}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("certificate '{}' names no Cairn identity: its subject common name is {cn:?}, expected node:ID, control:NAME or admin:NAME", path.display())]
    NoIdentity { path: PathBuf, cn: Option<String> },
    #[error("TLS configuration: {0}")]
    Config(String),
    #[error("'{endpoint}' has no host name or address to verify the server's certificate against")]
    ServerName { endpoint: String },
    #[error("{flag} {addr} listens beyond this machine without TLS: give --tls-ca, --tls-cert and --tls-key, or --insecure to accept unauthenticated peers")]
    Insecure { flag: String, addr: String },
    #[error("{flag} '{addr}' is not an address: {why}")]
    BadAddress {
        flag: String,
        addr: String,
        why: String,
    },
    #[cfg(feature = "issue")]
    #[error("{0}")]
    Issue(String),
}

/// The three TLS flags, all given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The flags as given: `Ok(None)` for none, an error naming the missing ones for some.
    pub fn from_flags(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<TlsFiles>, TlsError> {
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(TlsFiles { ca, cert, key })),
            (ca, cert, key) => {
                let missing: Vec<&str> = [
                    (ca.is_none(), "--tls-ca"),
                    (cert.is_none(), "--tls-cert"),
                    (key.is_none(), "--tls-key"),
                ]
                .iter()
                .filter(|(absent, _)| *absent)
                .map(|(_, flag)| *flag)
                .collect();
                Err(TlsError::Partial {
                    missing: missing.join(" and "),
                })
            }
        }
    }

    /// The three files of one identity's directory written by [`issue`].
    pub fn in_dir(dir: &Path) -> TlsFiles {
        TlsFiles {
            ca: dir.join(CA_CERT_FILE),
            cert: dir.join(CERT_FILE),
            key: dir.join(KEY_FILE),
        }
    }
}

/// Longest name an identity may have.
pub const NAME_MAX: usize = 64;

/// A name an identity may carry: 1 to [`NAME_MAX`] letters, digits, `-`, `_` or `.`, not
/// starting with `.`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= NAME_MAX
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Who a certificate says its holder is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A cairn-node, by node id.
    Node(String),
    /// A cairn-control process.
    Control(String),
    /// An operator's tool (cairnctl, an NBD client).
    Admin(String),
}

impl Identity {
    /// The subject common name that carries this identity.
    pub fn common_name(&self) -> String {
        match self {
            Identity::Node(id) => format!("node:{id}"),
            Identity::Control(name) => format!("control:{name}"),
            Identity::Admin(name) => format!("admin:{name}"),
        }
    }

    /// Parses a common name; `None` when it names no role, or a name that is empty, longer
    /// than [`NAME_MAX`] or not made of letters, digits, `-`, `_` and `.` (a name goes into
    /// logs and directory names, so nothing that could spoof either is accepted).
    pub fn from_common_name(cn: &str) -> Option<Identity> {
        let (role, name) = cn.split_once(':')?;
        if !valid_name(name) {
            return None;
        }
        match role {
            "node" => Some(Identity::Node(name.into())),
            "control" => Some(Identity::Control(name.into())),
            "admin" => Some(Identity::Admin(name.into())),
            _ => None,
        }
    }

    /// The identity named by a DER certificate, if any. Meant for a peer's certificate after
    /// the handshake has verified it against the CA: the name is only as trustworthy as that.
    pub fn of_certificate(der: &[u8]) -> Option<Identity> {
        Identity::from_common_name(&subject_common_name(der)?)
    }

    /// The identity of a verified peer, from the chain a TLS session reports (leaf first).
    pub fn of_peer(chain: Option<&[CertificateDer<'_>]>) -> Option<Identity> {
        Identity::of_certificate(chain?.first()?.as_ref())
    }

    pub fn is_node(&self) -> bool {
        matches!(self, Identity::Node(_))
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.common_name())
    }
}

/// A loaded TLS configuration: both sides of mutual TLS under one cluster CA.
#[derive(Clone)]
pub struct Tls {
    identity: Identity,
    roots: Arc<RootCertStore>,
    server: Arc<ServerConfig>,
    server_no_client_auth: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    pem: Arc<Pem>,
}

/// The PEM text behind a [`Tls`], for libraries that build their own configuration (tonic).
pub struct Pem {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// rustls's *ring* provider. rustls 0.23.48 deprecates it for lacking post-quantum key
/// exchange (X25519MLKEM768, which only its aws-lc-rs provider has). Cluster links use X25519
/// meanwhile: aws-lc-rs would add a large C and assembly build to every build of the data
/// plane, and tonic's TLS here uses *ring* as well.
///
/// AES-128-GCM is preferred over the provider's first choice, AES-256-GCM: it is TLS 1.3's
/// mandatory suite, fully secure for these links, and does 40% fewer AES rounds per byte on a
/// data path that replicates every write.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// TLS 1.3 only: every peer is Cairn's own or a current client (GnuTLS, OpenSSL), and under
/// TLS 1.2 a client's certificate, which names it, would cross the network in clear.
const TLS_VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.into(),
        source,
    })
}

fn certs(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |why: String| TlsError::Pem {
        what,
        path: path.into(),
        why,
    };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(certs)
}

impl Tls {
    /// Loads the three files.
    pub fn load(files: &TlsFiles) -> Result<Tls, TlsError> {
        let pem = Pem {
            ca: read("CA certificate", &files.ca)?,
            cert: read("certificate", &files.cert)?,
            key: read("private key", &files.key)?,
        };
        Tls::from_pem(files, pem)
    }

    fn from_pem(files: &TlsFiles, pem: Pem) -> Result<Tls, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in certs("CA certificate", &files.ca, &pem.ca)? {
            roots.add(ca).map_err(|e| TlsError::Pem {
                what: "CA certificate",
                path: files.ca.clone(),
                why: e.to_string(),
            })?;
        }
        let roots = Arc::new(roots);
        let chain = certs("certificate", &files.cert, &pem.cert)?;
        let identity =
            Identity::of_certificate(chain[0].as_ref()).ok_or_else(|| TlsError::NoIdentity {
                path: files.cert.clone(),
                cn: subject_common_name(chain[0].as_ref()),
            })?;
        let key = PrivateKeyDer::from_pem_slice(&pem.key).map_err(|e| TlsError::Pem {
            what: "private key",
            path: files.key.clone(),
            why: e.to_string(),
        })?;
        let config = |e: rustls::Error| TlsError::Config(e.to_string());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(TLS_VERSIONS)
            .map_err(config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config)?;
        let server_no_client_auth = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config)?
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(config)?;
        let client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(TLS_VERSIONS)
            .map_err(config)?
            .with_root_certificates(roots.clone())
            .with_client_auth_cert(chain, key)
            .map_err(config)?;
        Ok(Tls {
            identity,
            roots,
            server: Arc::new(server),
            server_no_client_auth: Arc::new(server_no_client_auth),
            client: Arc::new(client),
            pem: Arc::new(pem),
        })
    }

    /// Who this process is.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The server side: a client certificate from the cluster CA is required.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The server side for clients that are applications rather than cluster members (NBD
    /// without `--nbd-tls-client-certs`): no client certificate is asked for, so any client
    /// that trusts the cluster CA gets an encrypted session.
    pub fn server_config_no_client_auth(&self) -> Arc<ServerConfig> {
        self.server_no_client_auth.clone()
    }

    /// The server side with ALPN protocols (e.g. `h2` for gRPC, `http/1.1` for REST).
    pub fn server_config_alpn(&self, protocols: &[&[u8]]) -> Arc<ServerConfig> {
        let mut config = (*self.server).clone();
        config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }

    /// The client side: presents this process's certificate.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.client.clone()
    }

    /// The cluster CA, for a client that presents no certificate of its own (an NBD client
    /// when client certificates are optional).
    pub fn client_config_roots(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    /// The PEM text, for libraries that take it rather than a rustls configuration.
    pub fn pem(&self) -> &Pem {
        &self.pem
    }
}

/// The name a client verifies a server's certificate against: the host part of a
/// `host:port` endpoint (an address is checked against the certificate's IP addresses).
pub fn server_name(endpoint: &str) -> Result<ServerName<'static>, TlsError> {
    let bad = || TlsError::ServerName {
        endpoint: endpoint.into(),
    };
    let host = match endpoint.strip_prefix('[') {
        Some(rest) => rest.split_once(']').ok_or_else(bad)?.0,
        None => endpoint.rsplit_once(':').map_or(endpoint, |(h, _)| h),
    };
    if host.is_empty() {
        return Err(bad());
    }
    ServerName::try_from(host.to_string()).map_err(|_| bad())
}

/// True when every address `addr` (`host:port`) resolves to is a loopback address.
pub fn is_loopback(addr: &str) -> Result<bool, std::io::Error> {
    let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
    Ok(!addrs.is_empty() && addrs.iter().all(|a| loopback_ip(a.ip())))
}

fn loopback_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// The listener rule: a TCP listener (`flag` `addr`) beyond loopback needs TLS, unless the
/// operator accepted unauthenticated peers with `--insecure`.
pub fn check_listener(flag: &str, addr: &str, tls: bool, insecure: bool) -> Result<(), TlsError> {
    if tls || insecure {
        return Ok(());
    }
    let local = is_loopback(addr).map_err(|e| TlsError::BadAddress {
        flag: flag.into(),
        addr: addr.into(),
        why: e.to_string(),
    })?;
    if local {
        Ok(())
    } else {
        Err(TlsError::Insecure {
            flag: flag.into(),
            addr: addr.into(),
        })
    }
}

/// One DER element: tag, contents, and what follows it. `None` for anything malformed
/// (indefinite or over-long lengths included).
pub(crate) fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |l, &b| (l << 8) | b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

pub(crate) const DER_SEQUENCE: u8 = 0x30;
const DER_SET: u8 = 0x31;
const DER_OID: u8 = 0x06;
pub(crate) const DER_VERSION: u8 = 0xa0;
/// id-at-commonName, 2.5.4.3.
const OID_COMMON_NAME: [u8; 3] = [0x55, 0x04, 0x03];
/// String types a common name may use: UTF8String, PrintableString, IA5String.
const DER_STRINGS: [u8; 3] = [0x0c, 0x13, 0x16];

/// The subject common name of a DER X.509 certificate; `None` when it has none or several.
pub fn subject_common_name(cert: &[u8]) -> Option<String> {
    let (tag, cert, _) = der_next(cert)?;
    if tag != DER_SEQUENCE {
        return None;
    }
    let (tag, tbs, _) = der_next(cert)?;
    if tag != DER_SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    let (tag, _, after) = der_next(rest)?;
    if tag == DER_VERSION {
        rest = after;
    }
    // serialNumber, signature, issuer, validity, then subject.
    for _ in 0..4 {
        rest = der_next(rest)?.2;
    }
    let (tag, mut names, _) = der_next(rest)?;
    if tag != DER_SEQUENCE {
        return None;
    }
    let mut found = None;
    while !names.is_empty() {
        let (tag, mut set, after) = der_next(names)?;
        names = after;
        if tag != DER_SET {
            return None;
        }
        while !set.is_empty() {
            let (tag, pair, after) = der_next(set)?;
            set = after;
            if tag != DER_SEQUENCE {
                return None;
            }
            let (tag, oid, value) = der_next(pair)?;
            if tag == DER_OID && oid == OID_COMMON_NAME {
                let (tag, text, _) = der_next(value)?;
                if found.is_some() || !DER_STRINGS.contains(&tag) {
                    return None;
                }
                found = Some(String::from_utf8(text.to_vec()).ok()?);
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn flags_are_all_or_none() {
        assert_eq!(TlsFiles::from_flags(None, None, None).unwrap(), None);
        let e = TlsFiles::from_flags(Some("ca".into()), None, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "TLS needs all of --tls-ca, --tls-cert and --tls-key: --tls-cert and --tls-key missing"
        );
    }

    #[test]
    fn identities_round_trip_through_common_names() {
        for id in [
            Identity::Node("n1".into()),
            Identity::Control("c".into()),
            Identity::Admin("ops".into()),
        ] {
            assert_eq!(Identity::from_common_name(&id.common_name()), Some(id));
        }
        for bad in [
            "node:",
            "node",
            "root:x",
            "",
            "node:a\nb",
            "node:a\u{202e}b",
            "node:.x",
        ] {
            assert_eq!(Identity::from_common_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn server_names_come_from_the_host_part() {
        assert_eq!(
            server_name("10.0.0.1:10811").unwrap(),
            ServerName::try_from("10.0.0.1").unwrap()
        );
        assert_eq!(
            server_name("[::1]:1").unwrap(),
            ServerName::try_from("::1").unwrap()
        );
        assert!(server_name(":1").is_err());
    }

    #[test]
    fn only_loopback_listens_without_tls() {
        check_listener("--admin-listen", "127.0.0.1:1", false, false).unwrap();
        check_listener("--admin-listen", "[::1]:1", false, false).unwrap();
        let e = check_listener("--admin-listen", "0.0.0.0:1", false, false).unwrap_err();
        assert!(e.to_string().contains("--insecure"), "{e}");
        check_listener("--admin-listen", "0.0.0.0:1", true, false).unwrap();
        check_listener("--admin-listen", "0.0.0.0:1", false, true).unwrap();
        assert!(check_listener("--admin-listen", "nonsense", false, false).is_err());
    }

    proptest! {
        /// The DER walk never panics, whatever a peer sends.
        #[test]
        fn subject_parsing_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = subject_common_name(&bytes);
        }
    }
}
