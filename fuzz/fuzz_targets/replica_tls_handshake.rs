//! Feeds arbitrary bytes to a replica server's side of the TLS handshake and first frame,
//! over a real socket: exactly what a replica server runs on an accepted link (rustls's
//! handshake under the transport's blocking reads, then the frame decoder on whatever
//! plaintext comes out). Seeded with a real ClientHello. Guards: nothing panics, every
//! attempt ends (the peer's half-close ends the reads), and no frame is ever accepted from a
//! peer that has not completed a handshake with a certificate from the cluster CA, which the
//! fuzzer never has.
#![no_main]

use cairn_replication::transport::{Acceptor, Transport, TlsTransport};
use cairn_tls::{issue, Identity, Tls, TlsFiles};
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// A replica server's acceptor with a node certificate from a CA made for this run.
fn acceptor() -> &'static Mutex<Box<dyn Acceptor>> {
    static ACCEPTOR: OnceLock<Mutex<Box<dyn Acceptor>>> = OnceLock::new();
    ACCEPTOR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("cairn-fuzz-tls-{}", std::process::id()));
        drop(std::fs::remove_dir_all(&dir));
        issue::init_ca(&dir).unwrap();
        let node = Identity::Node("fuzz".into());
        let files = TlsFiles::in_dir(&issue::issue(&dir, &node, &[], &[]).unwrap());
        let transport = TlsTransport::new(Tls::load(&files).unwrap());
        // Loaded: nothing of the run stays on disk.
        std::fs::remove_dir_all(&dir).unwrap();
        Mutex::new(transport.listen("127.0.0.1:0").unwrap())
    })
}

fuzz_target!(|data: &[u8]| {
    let mut acceptor = acceptor().lock().unwrap();
    let mut peer = TcpStream::connect(acceptor.endpoint()).unwrap();
    // The server's own handshake bytes (a few KiB) fit the socket buffers unread.
    peer.write_all(data).unwrap();
    peer.shutdown(Shutdown::Write).unwrap();
    let mut link = acceptor
        .accept(Duration::from_secs(5))
        .unwrap()
        .expect("the connection is accepted");
    let first = link.recv_frame(Duration::from_secs(5));
    assert!(first.is_err(), "a frame was accepted from a peer without a certificate");
});
