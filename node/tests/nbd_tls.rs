//! Guards NBD over TLS (issue 16 item 3) against the clients people use: nbdinfo and nbdcopy
//! with `nbds://` URIs and `tls-certificates=DIR`, and qemu-img with a `tls-creds-x509`
//! object. Data written over TLS must come back unchanged; `--nbd-tls-required` must refuse a
//! plain client with the TLS-required error; `--nbd-tls-client-certs` must refuse a client
//! without a certificate from the cluster CA and serve one with it; and clients that stall
//! inside the TLS handshake must neither lock others out nor outlive the negotiation
//! deadline; requests a client sends together with its close_notify and end of stream must
//! all be answered, and the server must end the session with close_notify. The certificates
//! come from `cairn_tls::issue`, the same code `cairnctl cert` uses. A missing tool skips a
//! test with a printed reason, and fails it under CI.

mod common;

use cairn_testkit::require_tool;
use cairn_tls::{issue, Identity, Tls, TlsFiles};
use common::{assert_same_file, random_bytes, ExportSpec, Server, WorkDir, MIB};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const VOL: &str = "vol";
/// How long a stalled client may wait for the server to cut it off: the server's
/// whole-negotiation deadline (10 s) plus generous slack for a loaded machine.
const CUT_OFF_WAIT: Duration = Duration::from_secs(60);

/// A cluster CA with a node certificate (for 127.0.0.1), a client certificate, and a
/// directory holding only the CA (a client without a certificate).
struct Certs {
    _dir: WorkDir,
    node: PathBuf,
    client: PathBuf,
    ca_only: PathBuf,
}

impl Certs {
    fn new(test: &str) -> Certs {
        let dir = WorkDir::new(&format!("{test}-certs"));
        let ca = dir.join("ca");
        issue::init_ca(&ca).expect("init CA");
        let ip = "127.0.0.1".parse().unwrap();
        let node = issue::issue(&ca, &Identity::Node("n1".into()), &[ip], &[]).expect("node");
        let client = issue::issue(&ca, &Identity::Admin("nbd-client".into()), &[], &[])
            .expect("client certificate");
        let ca_only = dir.join("ca-only");
        std::fs::create_dir_all(&ca_only).unwrap();
        std::fs::copy(ca.join("ca-cert.pem"), ca_only.join("ca-cert.pem")).unwrap();
        Certs {
            _dir: dir,
            node,
            client,
            ca_only,
        }
    }

    fn server_args(&self) -> Vec<String> {
        let f = |name: &str| self.node.join(name).display().to_string();
        vec![
            "--tls-ca".into(),
            f("ca-cert.pem"),
            "--tls-cert".into(),
            f("cert.pem"),
            "--tls-key".into(),
            f("key.pem"),
        ]
    }
}

fn tools() -> bool {
    require_tool("nbdinfo", "libnbd-bin")
        && require_tool("nbdcopy", "libnbd-bin")
        && require_tool("qemu-img", "qemu-utils")
}

fn start(test: &str, certs: &Certs, flags: &[&str]) -> Server {
    let mut args = certs.server_args();
    args.extend(flags.iter().map(|f| f.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start_with(test, &[ExportSpec::volume(VOL, 32 * MIB)], &args)
}

fn port(s: &Server) -> u16 {
    s.tcp_port.expect("cairn-node listens on TCP")
}

/// `nbds://127.0.0.1:PORT/vol?tls-certificates=DIR`.
fn nbds(s: &Server, dir: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{}/{VOL}?tls-certificates={}",
        port(s),
        dir.display()
    )
}

fn nbd_size(s: &Server, uri: &str) -> u64 {
    let json = s.ok("nbdinfo", &["--json", uri]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("nbdinfo json");
    v["exports"][0]["export-size"]
        .as_u64()
        .unwrap_or_else(|| panic!("no export-size in {json}"))
}

fn failure_text(s: &Server, prog: &str, args: &[&str]) -> String {
    let out = s.output(prog, args);
    assert!(
        !out.status.success(),
        "{prog} {args:?} succeeded where it must be refused\n{}",
        s.log_tail()
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// nbdinfo and nbdcopy over TLS: the size, and random data written and read back; a plain
/// client is still served when TLS is only offered.
#[test]
fn nbdinfo_and_nbdcopy_round_trip_over_tls() {
    if !tools() {
        return;
    }
    let certs = Certs::new("nbdcopy_tls");
    let s = start("nbdcopy_tls", &certs, &["--nbd-tls"]);
    let uri = nbds(&s, &certs.client);
    assert_eq!(nbd_size(&s, &uri), 32 * MIB);
    let src = s.dir.join("src.bin");
    let back = s.dir.join("back.bin");
    std::fs::write(&src, random_bytes(32 * MIB, 7)).unwrap();
    s.ok("nbdcopy", &[src.to_str().unwrap(), &uri]);
    s.ok("nbdcopy", &[&uri, back.to_str().unwrap()]);
    assert_same_file(&src, &back);
    // A client without a certificate of its own, trusting the CA, is served too.
    assert_eq!(nbd_size(&s, &nbds(&s, &certs.ca_only)), 32 * MIB);
    // TLS is offered, not required: plain clients still connect.
    assert_eq!(nbd_size(&s, &s.tcp_uri(VOL).unwrap()), 32 * MIB);
    s.stop_clean();
}

/// qemu-img with a tls-creds-x509 object: info, and convert in and out.
#[test]
fn qemu_img_with_tls_creds() {
    if !tools() {
        return;
    }
    let certs = Certs::new("qemu_tls");
    let s = start("qemu_tls", &certs, &["--nbd-tls-required"]);
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        certs.client.display()
    );
    let target = format!(
        "driver=nbd,host=127.0.0.1,port={},export={VOL},tls-creds=tls0",
        port(&s)
    );
    let json = s.ok(
        "qemu-img",
        &[
            "info",
            "--output=json",
            "--object",
            &object,
            "--image-opts",
            &target,
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&json).expect("qemu-img json");
    assert_eq!(v["virtual-size"], 32 * MIB, "{json}");
    let src = s.dir.join("src.bin");
    let back = s.dir.join("back.bin");
    std::fs::write(&src, random_bytes(8 * MIB, 3)).unwrap();
    let src_s = src.to_str().unwrap();
    s.ok(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "--object",
            &object,
            "--target-image-opts",
            src_s,
            &target,
        ],
    );
    s.ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            "--object",
            &object,
            "--image-opts",
            &target,
            back.to_str().unwrap(),
        ],
    );
    let back_data = std::fs::read(&back).unwrap();
    assert_eq!(back_data.len() as u64, 32 * MIB);
    assert!(
        back_data[..(8 * MIB) as usize] == std::fs::read(&src).unwrap()[..],
        "qemu-img read back other bytes than it wrote over TLS"
    );
    s.stop_clean();
}

/// --nbd-tls-required: a plain client is refused with the TLS-required error, a TLS client is
/// served.
#[test]
fn tls_required_refuses_plain_clients() {
    if !tools() {
        return;
    }
    let certs = Certs::new("tls_required");
    let s = start("tls_required", &certs, &["--nbd-tls-required"]);
    let plain = s.tcp_uri(VOL).unwrap();
    let text = failure_text(&s, "nbdinfo", &[&plain]);
    assert!(
        text.to_lowercase().contains("tls"),
        "the refusal should say TLS is required: {text}"
    );
    assert_eq!(nbd_size(&s, &nbds(&s, &certs.client)), 32 * MIB);
    s.stop_clean();
}

/// --nbd-tls-client-certs: no certificate, no service; a certificate from the cluster CA is
/// served.
#[test]
fn client_certificates_are_required_when_asked() {
    if !tools() {
        return;
    }
    let certs = Certs::new("tls_client_certs");
    let s = start(
        "tls_client_certs",
        &certs,
        &["--nbd-tls-required", "--nbd-tls-client-certs"],
    );
    let uri = nbds(&s, &certs.ca_only);
    failure_text(&s, "nbdinfo", &[&uri]);
    assert_eq!(nbd_size(&s, &nbds(&s, &certs.client)), 32 * MIB);
    s.stop_clean();
}

/// Opens a negotiation, starts TLS, sends the first bytes of a TLS record and stalls.
fn stall_in_tls_handshake(port: u16) -> TcpStream {
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut greeting = [0u8; 18];
    c.read_exact(&mut greeting).expect("greeting");
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    let mut msg = Vec::new();
    msg.extend_from_slice(&3u32.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    msg.extend_from_slice(b"IHAVEOPT");
    msg.extend_from_slice(&5u32.to_be_bytes()); // NBD_OPT_STARTTLS
    msg.extend_from_slice(&0u32.to_be_bytes());
    c.write_all(&msg).expect("STARTTLS");
    let mut reply = [0u8; 20];
    c.read_exact(&mut reply).expect("STARTTLS reply");
    assert_eq!(&reply[12..16], &1u32.to_be_bytes(), "STARTTLS answered ACK");
    // A handshake record header announcing 512 bytes, and then nothing.
    c.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .expect("partial ClientHello");
    c
}

/// Clients stalled inside the TLS handshake neither keep a TLS client out nor outlive the
/// whole-negotiation deadline.
#[test]
fn stalled_tls_handshakes_lock_nobody_out() {
    if !tools() {
        return;
    }
    let certs = Certs::new("tls_stall");
    let s = start("tls_stall", &certs, &["--nbd-tls"]);
    // More than the per-source limit of negotiations (16), all from this one address.
    let mut stalled: Vec<TcpStream> = (0..24).map(|_| stall_in_tls_handshake(port(&s))).collect();
    let t = Instant::now();
    assert_eq!(nbd_size(&s, &nbds(&s, &certs.client)), 32 * MIB);
    println!(
        "TLS client served in {:?} beside 24 stalled handshakes",
        t.elapsed()
    );
    // The last stalled socket was not evicted by the others: the deadline must end it.
    let last = stalled.last_mut().unwrap();
    last.set_read_timeout(Some(CUT_OFF_WAIT)).unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 64];
    let end = last.read(&mut buf);
    println!("stalled handshake cut off after {:?}: {end:?}", t.elapsed());
    match end {
        Ok(_) => {}
        Err(e) => assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "a client stalled in the TLS handshake was not cut off within {CUT_OFF_WAIT:?}"
        ),
    }
    s.stop_clean();
}

/// Negotiates export `VOL` over TLS with the client certificate by hand (STARTTLS, then
/// NBD_OPT_GO without structured replies): the session, ready for transmission requests.
fn tls_session(
    port: u16,
    certs: &Certs,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut c = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut greeting = [0u8; 18];
    c.read_exact(&mut greeting).expect("greeting");
    assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
    let mut msg = Vec::new();
    msg.extend_from_slice(&3u32.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    msg.extend_from_slice(b"IHAVEOPT");
    msg.extend_from_slice(&5u32.to_be_bytes()); // NBD_OPT_STARTTLS
    msg.extend_from_slice(&0u32.to_be_bytes());
    c.write_all(&msg).expect("STARTTLS");
    let mut reply = [0u8; 20];
    c.read_exact(&mut reply).expect("STARTTLS reply");
    assert_eq!(&reply[12..16], &1u32.to_be_bytes(), "STARTTLS answered ACK");
    let tls = Tls::load(&TlsFiles {
        ca: certs.client.join("ca-cert.pem"),
        cert: certs.client.join("cert.pem"),
        key: certs.client.join("key.pem"),
    })
    .expect("client TLS files");
    let name = cairn_tls::server_name(&format!("127.0.0.1:{port}")).expect("server name");
    let conn = rustls::ClientConnection::new(tls.client_config(), name).expect("TLS client");
    let mut s = rustls::StreamOwned::new(conn, c);
    let mut go = Vec::new();
    go.extend_from_slice(b"IHAVEOPT");
    go.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    go.extend_from_slice(&(4 + VOL.len() as u32 + 2).to_be_bytes());
    go.extend_from_slice(&(VOL.len() as u32).to_be_bytes());
    go.extend_from_slice(VOL.as_bytes());
    go.extend_from_slice(&0u16.to_be_bytes()); // no information requests
    s.write_all(&go).expect("NBD_OPT_GO");
    loop {
        let mut header = [0u8; 20];
        s.read_exact(&mut header).expect("NBD_OPT_GO reply");
        let kind = u32::from_be_bytes(header[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(header[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).expect("NBD_OPT_GO reply data");
        match kind {
            1 => return s, // NBD_REP_ACK
            3 => continue, // NBD_REP_INFO
            other => panic!("NBD_OPT_GO refused: reply type {other:#x}"),
        }
    }
}

/// Requests that arrive together with the client's close_notify and end of stream are all
/// answered: writes whose ciphertext is still queued behind a full receive region when the
/// stream ends, and a flush that arrives in the same records as the close_notify. Then the
/// server ends the session with close_notify rather than a bare end of stream.
#[test]
fn requests_sent_with_close_notify_are_answered() {
    let certs = Certs::new("tls_close_notify");
    let s = start("tls_close_notify", &certs, &["--nbd-tls"]);
    let mut session = tls_session(port(&s), &certs);
    /// More write payload than the server's receive region (512 KiB) holds at once.
    const WRITES: u64 = 8;
    let payload = random_bytes(MIB, 7);
    let mut batch = Vec::new();
    let request = |batch: &mut Vec<u8>, kind: u16, handle: u64, offset: u64, len: u32| {
        batch.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        batch.extend_from_slice(&0u16.to_be_bytes());
        batch.extend_from_slice(&kind.to_be_bytes());
        batch.extend_from_slice(&handle.to_be_bytes());
        batch.extend_from_slice(&offset.to_be_bytes());
        batch.extend_from_slice(&len.to_be_bytes());
    };
    for i in 0..WRITES {
        request(&mut batch, 1, i, i * MIB, MIB as u32); // NBD_CMD_WRITE
        batch.extend_from_slice(&payload);
    }
    request(&mut batch, 3, WRITES, 0, 0); // NBD_CMD_FLUSH
                                          // Everything, the close_notify and the end of stream go out back to back.
    session.conn.set_buffer_limit(None);
    session
        .conn
        .writer()
        .write_all(&batch)
        .expect("queue requests");
    session.conn.send_close_notify();
    while session.conn.wants_write() {
        session
            .conn
            .write_tls(&mut session.sock)
            .expect("send requests");
    }
    session
        .sock
        .shutdown(std::net::Shutdown::Write)
        .expect("end of stream");
    session
        .sock
        .set_read_timeout(Some(CUT_OFF_WAIT))
        .expect("read timeout");
    let mut replies = Vec::new();
    let end = session.read_to_end(&mut replies);
    assert_eq!(
        replies.len() % 16,
        0,
        "whole simple replies: {} bytes",
        replies.len()
    );
    let mut answered: Vec<u64> = replies
        .chunks(16)
        .map(|r| {
            assert_eq!(&r[..4], &0x6744_6698u32.to_be_bytes(), "simple reply magic");
            assert_eq!(&r[4..8], &0u32.to_be_bytes(), "reply error");
            u64::from_be_bytes(r[8..16].try_into().unwrap())
        })
        .collect();
    answered.sort_unstable();
    assert_eq!(
        answered,
        (0..=WRITES).collect::<Vec<_>>(),
        "every request sent before close_notify is answered\n{}",
        s.log_tail()
    );
    // read_to_end ends cleanly only on the server's close_notify (rustls reports a bare end
    // of stream as UnexpectedEof).
    assert!(
        end.is_ok(),
        "the server ended the session without close_notify: {end:?}"
    );
    s.stop_clean();
}
