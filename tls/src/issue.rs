//! A cluster CA and the certificates it issues (`cairnctl cert init`, `cairnctl cert issue`,
//! `cairn up`).
//!
//! Layout of a certificate directory `DIR`:
//! * `DIR/ca-cert.pem` and `DIR/ca-key.pem` (0600): the CA, made once by [`init_ca`].
//! * `DIR/ROLE-NAME/` (0700), one per identity, made by [`issue`]: `ca-cert.pem`, `cert.pem`,
//!   `key.pem` (0600), which are what `--tls-ca`, `--tls-cert` and `--tls-key` take. The same
//!   directory also serves GnuTLS clients and servers (nbdinfo, nbdcopy, qemu's
//!   `tls-creds-x509`), which look for `client-cert.pem`/`client-key.pem` or
//!   `server-cert.pem`/`server-key.pem`: those are hard links to the same two files.
//!
//! Keys are ECDSA P-256. Every certificate is valid from a day before it is made; the CA for
//! [`CA_VALID_DAYS`], an identity for [`CERT_VALID_DAYS`]. An identity's certificate carries
//! both TLS uses (server and client), since a node is both: it serves replicas and opens
//! them. The CA's key never leaves `DIR`; keep `DIR` on the machine that issues.

use crate::{Identity, TlsError, CA_CERT_FILE, CERT_FILE, KEY_FILE, NAME_MAX};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The CA's private key, beside its certificate.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// How long the CA is valid: ten years.
pub const CA_VALID_DAYS: i64 = 3650;
/// How long an identity's certificate is valid: two years.
pub const CERT_VALID_DAYS: i64 = 730;
/// The CA's subject common name.
const CA_COMMON_NAME: &str = "Cairn cluster CA";
/// Bytes of the CA's public key (after the point's format byte) shown in its name.
const CA_NAME_KEY_BYTES: usize = 8;

fn issue_err(what: impl std::fmt::Display) -> TlsError {
    TlsError::Issue(what.to_string())
}

fn io_err<'a>(what: &str, path: &'a Path) -> impl FnOnce(std::io::Error) -> TlsError + 'a {
    let what = what.to_string();
    move |e| issue_err(format!("{what} '{}': {e}", path.display()))
}

/// Today as a day count from 1970-01-01 (UTC).
fn unix_days_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
        / 86_400
}

/// Midnight UTC of the day `z` days from 1970-01-01, as a certificate validity bound.
macro_rules! on_day {
    ($z:expr) => {{
        let (y, m, d) = civil_from_days($z);
        rcgen::date_time_ymd(y as i32, m as u8, d as u8)
    }};
}

/// The date `days` from today, as a certificate validity bound.
macro_rules! day {
    ($days:expr) => {
        on_day!(unix_days_now() + $days)
    };
}

/// Day count from 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`), the inverse of [`civil_from_days`].
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// What `issue` checks in the stored CA certificate.
struct CaFacts {
    /// The day its validity ends (its notAfter's date).
    not_after_days: i64,
    /// Its subject public key (the EC point).
    public_key: Vec<u8>,
}

/// DER tags of the two X.509 time forms.
const DER_UTC_TIME: u8 = 0x17;
const DER_GENERALIZED_TIME: u8 = 0x18;
const DER_BIT_STRING: u8 = 0x03;

/// The notAfter date and subject public key of a DER X.509 certificate; `None` for anything
/// malformed.
fn ca_facts(cert: &[u8]) -> Option<CaFacts> {
    use crate::{der_next, DER_SEQUENCE, DER_VERSION};
    let (tag, cert, _) = der_next(cert)?;
    let (tbs_tag, tbs, _) = der_next(cert)?;
    if tag != DER_SEQUENCE || tbs_tag != DER_SEQUENCE {
        return None;
    }
    let mut rest = tbs;
    if der_next(rest)?.0 == DER_VERSION {
        rest = der_next(rest)?.2;
    }
    // serialNumber, signature, issuer; then validity, subject, subjectPublicKeyInfo.
    for _ in 0..3 {
        rest = der_next(rest)?.2;
    }
    let (tag, validity, rest) = der_next(rest)?;
    if tag != DER_SEQUENCE {
        return None;
    }
    let (_, _, validity) = der_next(validity)?;
    let (time_tag, time, _) = der_next(validity)?;
    let digits = std::str::from_utf8(time).ok()?;
    let (year, date) = match time_tag {
        DER_UTC_TIME => {
            let yy: i64 = digits.get(..2)?.parse().ok()?;
            (
                if yy >= 50 { 1900 + yy } else { 2000 + yy },
                digits.get(2..)?,
            )
        }
        DER_GENERALIZED_TIME => (digits.get(..4)?.parse().ok()?, digits.get(4..)?),
        _ => return None,
    };
    let month: u32 = date.get(..2)?.parse().ok()?;
    let day: u32 = date.get(2..4)?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let (_, _, rest) = der_next(rest)?;
    let (tag, spki, _) = der_next(rest)?;
    if tag != DER_SEQUENCE {
        return None;
    }
    let (_, _, spki) = der_next(spki)?;
    let (tag, bits, _) = der_next(spki)?;
    let (&unused, key) = bits.split_first()?;
    (tag == DER_BIT_STRING && unused == 0).then(|| CaFacts {
        not_after_days: days_from_civil(year, month, day),
        public_key: key.to_vec(),
    })
}

/// Proleptic Gregorian year, month and day of a day count from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Writes `contents` to a new file with `mode`, refusing to replace one.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err("creating", path))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .map_err(io_err("writing", path))
}

/// The CA's parameters: the same for one key every time, so that its certificate can be
/// rebuilt from its key to sign with (the issued certificate names the CA's subject and key,
/// both unchanged). The subject carries a fingerprint of the key, so two clusters' CAs never
/// share a name.
fn ca_params(key: &KeyPair) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(issue_err)?;
    let mut dn = DistinguishedName::new();
    let point = key.public_key_raw();
    let fingerprint: String = point
        .iter()
        .skip(1)
        .take(CA_NAME_KEY_BYTES)
        .map(|b| format!("{b:02x}"))
        .collect();
    dn.push(
        DnType::CommonName,
        format!("{CA_COMMON_NAME} {fingerprint}"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = day!(-1);
    params.not_after = day!(CA_VALID_DAYS);
    Ok(params)
}

/// Creates a CA in `dir` (made 0700 if absent). Refuses a directory that already holds one.
pub fn init_ca(dir: &Path) -> Result<(), TlsError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err("creating", dir))?;
    let cert_path = dir.join(CA_CERT_FILE);
    if cert_path.exists() {
        return Err(issue_err(format!(
            "'{}' already holds a CA ({CA_CERT_FILE}); issue certificates from it, or choose another directory",
            dir.display()
        )));
    }
    let key = KeyPair::generate().map_err(issue_err)?;
    let cert = ca_params(&key)?.self_signed(&key).map_err(issue_err)?;
    write_new(
        &dir.join(CA_KEY_FILE),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)
}

/// Checks a name that becomes part of a common name and a directory name.
fn check_name(name: &str) -> Result<(), TlsError> {
    if crate::valid_name(name) {
        Ok(())
    } else {
        Err(issue_err(format!(
            "name {name:?}: use 1 to {NAME_MAX} letters, digits, '-', '_' or '.', not starting with '.'"
        )))
    }
}

/// The directory [`issue`] writes `identity`'s files into.
pub fn identity_dir(dir: &Path, identity: &Identity) -> PathBuf {
    dir.join(identity.common_name().replacen(':', "-", 1))
}

/// Issues a certificate for `identity`, valid for the addresses `ips` and host names `dns`
/// (what peers dial to reach it; a client-only identity may have none), signed by the CA in
/// `dir`. Returns the identity's directory. Refuses to replace an identity already issued.
pub fn issue(
    dir: &Path,
    identity: &Identity,
    ips: &[IpAddr],
    dns: &[String],
) -> Result<PathBuf, TlsError> {
    let (Identity::Node(name) | Identity::Control(name) | Identity::Admin(name)) = identity;
    check_name(name)?;
    let ca_key_path = dir.join(CA_KEY_FILE);
    let ca_key_pem = std::fs::read_to_string(&ca_key_path)
        .map_err(io_err("reading the CA key", &ca_key_path))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| issue_err(format!("CA key '{}': {e}", ca_key_path.display())))?;
    let ca_path = dir.join(CA_CERT_FILE);
    let ca_pem = std::fs::read(&ca_path).map_err(io_err("reading the CA certificate", &ca_path))?;
    let der = CertificateDer::from_pem_slice(&ca_pem).ok();
    let stored = der.as_ref().and_then(|der| ca_facts(der));
    let Some(stored) = stored else {
        return Err(issue_err(format!(
            "CA certificate '{}': not a PEM X.509 certificate this tool can read",
            ca_path.display()
        )));
    };
    let ca_params = ca_params(&ca_key)?;
    let subject = der.as_deref().and_then(crate::subject_common_name);
    let expected = ca_params
        .distinguished_name
        .get(&DnType::CommonName)
        .and_then(|v| match v {
            rcgen::DnValue::Utf8String(s) => Some(s.clone()),
            _ => None,
        });
    if stored.public_key != ca_key.public_key_raw() || subject.is_none() || subject != expected {
        return Err(issue_err(format!(
            "CA certificate '{}' is not the certificate of the CA key '{}' (its key or its name \
             differs); a certificate signed with this key would not verify against it",
            ca_path.display(),
            ca_key_path.display()
        )));
    }
    let today = unix_days_now();
    if stored.not_after_days <= today {
        let (y, m, d) = civil_from_days(stored.not_after_days);
        return Err(issue_err(format!(
            "the CA '{}' expired on {y:04}-{m:02}-{d:02}; create a new CA (cairnctl cert init) \
             and reissue every identity",
            ca_path.display()
        )));
    }
    let ca = ca_params.self_signed(&ca_key).map_err(issue_err)?;

    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(issue_err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.common_name());
    params.distinguished_name = dn;
    params.subject_alt_names = ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
    for name in dns {
        let name = rcgen::Ia5String::try_from(name.as_str())
            .map_err(|e| issue_err(format!("host name {name:?}: {e}")))?;
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    params.is_ca = IsCa::ExplicitNoCa;
    // keyEncipherment means nothing to an ECDSA key, but qemu's tls-creds-x509 refuses a
    // certificate whose (critical) key usage lacks it, so NBD clients through qemu need it.
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = on_day!(today - 1);
    // Never past the CA's own expiry: a chain is only as valid as its CA. `today` is read
    // once, so a run across midnight cannot push the end a day past the CA's.
    let until = stored.not_after_days.min(today + CERT_VALID_DAYS);
    if until < today + CERT_VALID_DAYS {
        let (y, m, d) = civil_from_days(until);
        eprintln!(
            "note: {identity}'s certificate ends with the CA's, on {y:04}-{m:02}-{d:02}, before {CERT_VALID_DAYS} days"
        );
    }
    params.not_after = on_day!(until);
    let key = KeyPair::generate().map_err(issue_err)?;
    let cert = params.signed_by(&key, &ca, &ca_key).map_err(issue_err)?;

    let out = identity_dir(dir, identity);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&out)
        .map_err(io_err("creating (already issued?)", &out))?;
    write_new(&out.join(CA_CERT_FILE), &ca_pem, 0o644)?;
    write_new(&out.join(CERT_FILE), cert.pem().as_bytes(), 0o644)?;
    write_new(&out.join(KEY_FILE), key.serialize_pem().as_bytes(), 0o600)?;
    for (link, target) in [
        ("client-cert.pem", CERT_FILE),
        ("client-key.pem", KEY_FILE),
        ("server-cert.pem", CERT_FILE),
        ("server-key.pem", KEY_FILE),
    ] {
        std::fs::hard_link(out.join(target), out.join(link))
            .map_err(io_err("linking", &out.join(link)))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Tls, TlsFiles};
    use rustls::pki_types::pem::PemObject;
    use std::os::unix::fs::PermissionsExt;

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cairn-tls-{name}-{}", std::process::id()));
        drop(std::fs::remove_dir_all(&d));
        d
    }

    #[test]
    fn dates_follow_the_calendar() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_793), (2026, 12, 6));
        for z in [-800_000, -1, 0, 11_016, 20_793, 2_932_896] {
            let (y, m, d) = civil_from_days(z);
            assert_eq!(days_from_civil(y, m, d), z, "{y}-{m}-{d}");
        }
    }

    /// An identity is never valid past its CA, a CA certificate that does not belong to the
    /// CA key is refused (what it signs would not verify), and so is an expired CA.
    #[test]
    fn issuing_checks_the_stored_ca_certificate() {
        let dir = tempdir("ca-checks");
        init_ca(&dir).unwrap();
        let ca_path = dir.join(CA_CERT_FILE);
        let facts = |pem: &[u8]| ca_facts(&CertificateDer::from_pem_slice(pem).unwrap()).unwrap();
        let ca = facts(&std::fs::read(&ca_path).unwrap());
        assert_eq!(ca.not_after_days, unix_days_now() + CA_VALID_DAYS);
        let out = issue(&dir, &Identity::Node("n".into()), &[], &[]).unwrap();
        let cert = facts(&std::fs::read(out.join(CERT_FILE)).unwrap());
        assert_eq!(cert.not_after_days, unix_days_now() + CERT_VALID_DAYS);

        // A CA certificate that expires in 10 days caps what it issues at 10 days.
        let key =
            KeyPair::from_pem(&std::fs::read_to_string(dir.join(CA_KEY_FILE)).unwrap()).unwrap();
        let mut short = ca_params(&key).unwrap();
        short.not_after = day!(10);
        std::fs::remove_file(&ca_path).unwrap();
        write_new(
            &ca_path,
            short.self_signed(&key).unwrap().pem().as_bytes(),
            0o644,
        )
        .unwrap();
        let out = issue(&dir, &Identity::Node("m".into()), &[], &[]).unwrap();
        let cert = facts(&std::fs::read(out.join(CERT_FILE)).unwrap());
        assert_eq!(
            cert.not_after_days,
            unix_days_now() + 10,
            "capped at the CA's expiry"
        );

        // Expired.
        let mut old = ca_params(&key).unwrap();
        old.not_before = day!(-30);
        old.not_after = day!(-1);
        std::fs::remove_file(&ca_path).unwrap();
        write_new(
            &ca_path,
            old.self_signed(&key).unwrap().pem().as_bytes(),
            0o644,
        )
        .unwrap();
        let err = issue(&dir, &Identity::Node("o".into()), &[], &[]).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");

        // This key, but under another name: what it signs names an issuer no one trusts.
        let mut renamed = ca_params(&key).unwrap();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Some other CA");
        renamed.distinguished_name = dn;
        std::fs::remove_file(&ca_path).unwrap();
        write_new(
            &ca_path,
            renamed.self_signed(&key).unwrap().pem().as_bytes(),
            0o644,
        )
        .unwrap();
        let err = issue(&dir, &Identity::Node("q".into()), &[], &[]).unwrap_err();
        assert!(
            err.to_string()
                .contains("is not the certificate of the CA key"),
            "{err}"
        );

        // Another CA's certificate beside this key.
        let other = tempdir("ca-checks-other");
        init_ca(&other).unwrap();
        std::fs::remove_file(&ca_path).unwrap();
        std::fs::copy(other.join(CA_CERT_FILE), &ca_path).unwrap();
        let err = issue(&dir, &Identity::Node("p".into()), &[], &[]).unwrap_err();
        assert!(
            err.to_string()
                .contains("is not the certificate of the CA key"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&other).unwrap();
    }

    #[test]
    fn an_issued_certificate_loads_and_names_its_identity() {
        let dir = tempdir("issue");
        init_ca(&dir).unwrap();
        assert!(init_ca(&dir)
            .unwrap_err()
            .to_string()
            .contains("already holds a CA"));
        let node = Identity::Node("n1".into());
        let out = issue(&dir, &node, &["127.0.0.1".parse().unwrap()], &[]).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode(&out.join(KEY_FILE)), 0o600);
        assert_eq!(mode(&out), 0o700);
        let tls = Tls::load(&TlsFiles::in_dir(&out)).unwrap();
        assert_eq!(tls.identity(), &node);
        assert!(issue(&dir, &node, &[], &[]).is_err(), "issued twice");
        assert!(issue(&dir, &Identity::Admin("../x".into()), &[], &[]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Runs one handshake over a socket pair: `Ok(server's view of the client)` or the
    /// server's error.
    fn handshake(
        server: std::sync::Arc<rustls::ServerConfig>,
        client: std::sync::Arc<rustls::ClientConfig>,
    ) -> Result<Option<Identity>, String> {
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let client_side = std::thread::spawn(move || {
            let name = crate::server_name("127.0.0.1:1").unwrap();
            let mut c = rustls::ClientConnection::new(client, name).unwrap();
            while c.is_handshaking() {
                if c.complete_io(&mut b).is_err() {
                    return;
                }
            }
            // Stay until the server hangs up, so its last handshake bytes find a reader.
            let mut sink = Vec::new();
            drop(std::io::Read::read_to_end(
                &mut rustls::Stream::new(&mut c, &mut b),
                &mut sink,
            ));
        });
        let mut s = rustls::ServerConnection::new(server).unwrap();
        let result = loop {
            if !s.is_handshaking() {
                break Ok(Identity::of_peer(s.peer_certificates()));
            }
            if let Err(e) = s.complete_io(&mut a) {
                break Err(e.to_string());
            }
        };
        drop(a);
        client_side.join().unwrap();
        result
    }

    #[test]
    fn only_a_peer_certified_by_the_cluster_ca_completes_a_handshake() {
        let dir = tempdir("mutual");
        let other = tempdir("other-ca");
        init_ca(&dir).unwrap();
        init_ca(&other).unwrap();
        let ip = ["127.0.0.1".parse().unwrap()];
        let load = |d: &Path, id: Identity| {
            Tls::load(&TlsFiles::in_dir(&issue(d, &id, &ip, &[]).unwrap())).unwrap()
        };
        let server = load(&dir, Identity::Node("a".into()));
        let client = load(&dir, Identity::Node("b".into()));
        let stranger_dir = issue(&other, &Identity::Node("b".into()), &ip, &[]).unwrap();
        let pem = |f: &str| std::fs::read(stranger_dir.join(f)).unwrap();
        let stranger = rustls::ClientConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(client.client_config_roots())
            .with_client_auth_cert(
                rustls::pki_types::CertificateDer::pem_slice_iter(&pem(CERT_FILE))
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                rustls::pki_types::PrivateKeyDer::from_pem_slice(&pem(KEY_FILE)).unwrap(),
            )
            .unwrap();
        assert_eq!(
            handshake(server.server_config(), client.client_config()),
            Ok(Some(Identity::Node("b".into())))
        );
        let refused = handshake(server.server_config(), std::sync::Arc::new(stranger)).unwrap_err();
        assert!(refused.contains("UnknownIssuer"), "{refused}");
        let anonymous = rustls::ClientConfig::builder_with_provider(crate::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(client.client_config_roots())
            .with_no_client_auth();
        let refused =
            handshake(server.server_config(), std::sync::Arc::new(anonymous)).unwrap_err();
        assert!(refused.contains("no certificates"), "{refused}");
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&other).unwrap();
    }
}
