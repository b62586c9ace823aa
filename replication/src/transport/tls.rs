//! Mutual TLS on the TCP transport: the replica protocol between a nexus and its replicas.
//!
//! [`TlsTransport`] uses the TCP transport's sockets and reactor driving unchanged and puts
//! rustls between them and the frames:
//!
//! * **Handshake, blocking, on control threads.** A nexus (client) finishes the TLS handshake
//!   inside `connect`, within its timeout, and refuses a server whose certificate does not
//!   name a node. A replica server (server) runs it inside the first `recv_frame` of the
//!   `Open` handshake, so the handshake's deadline and the admission limits (a source that
//!   stalls is evicted) cover it; the server's rustls configuration requires a client
//!   certificate from the cluster CA, so a peer without one never gets a frame read.
//! * **Data, on the reactor.** [`TlsPipe`] holds the session and a ciphertext receive buffer:
//!   the ring receives ciphertext into it, [`TlsPipe::pump`] feeds it to rustls and moves
//!   plaintext into the connection's frame buffer (never more than that buffer has room
//!   for: rustls is fed only while it holds no plaintext, so its own buffers stay bounded by
//!   a record), and [`TlsPipe::seal`] encrypts the queued frames into the send buffer. The
//!   queue bounds of the plain transport (`TX_QUEUE_BYTES_MAX`, `FRAME_RX_BYTES`) hold for
//!   plaintext; ciphertext adds a record header and tag per 16 KiB record.
//!
//! Unlike the plain transport, a TLS connection allocates on its data path: rustls allocates
//! each record it seals or opens (its buffered API). `tests/alloc_free.rs` guards the plain
//! transport only.

use super::tcp::{self, TcpLink};
use super::{Acceptor, Link, Transport, TransportError};
use cairn_tls::{Identity, Tls};
use rustls::{ClientConnection, Connection};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Ciphertext a connection receives at once: a few whole TLS records (16 KiB of plaintext
/// plus at most 256 bytes of overhead each).
pub const TLS_RX_BYTES: usize = 64 << 10;

/// Who the other end of a link is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerIdentity {
    /// A plain TCP link: nobody vouched for the peer.
    Unauthenticated,
    /// A TLS link whose certificate (from the cluster CA) names this identity.
    Certified(Identity),
    /// A TLS link whose certificate from the cluster CA names no Cairn identity.
    Unnamed,
    /// A TLS link whose handshake has not finished: nobody is vouched for yet.
    Pending,
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerIdentity::Unauthenticated => f.write_str("unauthenticated"),
            PeerIdentity::Certified(id) => write!(f, "{id}"),
            PeerIdentity::Unnamed => f.write_str("a certificate naming no Cairn identity"),
            PeerIdentity::Pending => f.write_str("a TLS peer still in its handshake"),
        }
    }
}

/// The identity a TLS session's peer certificate names.
pub(super) fn identity_of(conn: &Connection) -> PeerIdentity {
    match Identity::of_peer(conn.peer_certificates()) {
        Some(id) => PeerIdentity::Certified(id),
        None => PeerIdentity::Unnamed,
    }
}

/// The replica transport over mutual TLS.
#[derive(Clone, Debug)]
pub struct TlsTransport {
    tls: Tls,
}

impl TlsTransport {
    pub fn new(tls: Tls) -> TlsTransport {
        TlsTransport { tls }
    }
}

fn tls_err(endpoint: &str) -> impl FnOnce(rustls::Error) -> TransportError + '_ {
    move |e| TransportError::Tls {
        endpoint: endpoint.into(),
        why: e.to_string(),
    }
}

impl Transport for TlsTransport {
    fn connect(&self, endpoint: &str, timeout: Duration) -> Result<Box<dyn Link>, TransportError> {
        let deadline = Instant::now() + timeout;
        let name = cairn_tls::server_name(endpoint).map_err(|e| TransportError::BadEndpoint {
            endpoint: endpoint.into(),
            why: e.to_string(),
        })?;
        let stream = tcp::connect_stream(endpoint, timeout)?;
        let conn =
            ClientConnection::new(self.tls.client_config(), name).map_err(tls_err(endpoint))?;
        let mut link = TcpLink::new(stream, endpoint.to_string(), Some(Box::new(conn.into())))?;
        link.finish_handshake(deadline)?;
        match link.identity() {
            PeerIdentity::Certified(Identity::Node(_)) => Ok(Box::new(link)),
            other => Err(TransportError::Refused {
                endpoint: endpoint.into(),
                why: format!("the server is {other}, not a node"),
            }),
        }
    }

    fn listen(&self, endpoint: &str) -> Result<Box<dyn Acceptor>, TransportError> {
        tcp::listen(endpoint, Some(self.tls.server_config()))
    }
}

/// A socket whose every read and write waits at most until one deadline: rustls may read
/// and write many times for one handshake or record, and a peer trickling bytes must not
/// stretch a per-call timeout into an unbounded wait (before its certificate is even seen).
pub struct Deadlined<'a> {
    stream: &'a TcpStream,
    deadline: Instant,
}

impl<'a> Deadlined<'a> {
    pub fn new(stream: &'a TcpStream, deadline: Instant) -> Deadlined<'a> {
        Deadlined { stream, deadline }
    }

    fn left(&self) -> std::io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(std::io::ErrorKind::TimedOut.into())
        } else {
            Ok(left)
        }
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.stream.set_read_timeout(Some(self.left()?))?;
        (&mut &*self.stream).read(buf)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.stream.set_write_timeout(Some(self.left()?))?;
        (&mut &*self.stream).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A TLS error as an I/O error of kind `InvalidData` (as rustls's own `complete_io` gives).
fn invalid(e: rustls::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

/// Reads into `buf` through the session, blocking on `sock`; the handshake, when not
/// finished, runs on the way. `Ok(0)` is the peer's clean close (close_notify); a close
/// without it is `UnexpectedEof`, and a TLS failure `InvalidData`.
pub fn read_through(
    conn: &mut Connection,
    sock: &mut (impl Read + Write),
    buf: &mut [u8],
) -> std::io::Result<usize> {
    loop {
        match conn.reader().read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            done => return done,
        }
        while conn.wants_write() {
            conn.write_tls(sock)?;
        }
        if conn.read_tls(sock)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        conn.process_new_packets().map_err(invalid)?;
    }
}

/// Runs the handshake to its end, blocking on `sock`.
pub fn handshake_through(
    conn: &mut Connection,
    sock: &mut (impl Read + Write),
) -> std::io::Result<()> {
    while conn.is_handshaking() {
        while conn.wants_write() {
            conn.write_tls(sock)?;
        }
        if !conn.is_handshaking() {
            break;
        }
        if conn.read_tls(sock)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        conn.process_new_packets().map_err(invalid)?;
    }
    // The last flight (a client's Finished) may still be queued.
    while conn.wants_write() {
        conn.write_tls(sock)?;
    }
    Ok(())
}

/// Writes `frame` through the session and sends it (and anything the session had queued),
/// blocking on `sock`.
pub fn write_through(
    conn: &mut Connection,
    sock: &mut (impl Read + Write),
    frame: &[u8],
) -> std::io::Result<()> {
    conn.writer().write_all(frame)?;
    while conn.wants_write() {
        conn.write_tls(sock)?;
    }
    Ok(())
}

/// A TLS session on a reactor: rustls plus the ciphertext the ring received and rustls has
/// not taken yet (`crx[start..end]`).
pub(super) struct TlsPipe {
    pub(super) conn: Connection,
    pub(super) crx: Vec<u8>,
    start: usize,
    end: usize,
}

/// What [`TlsPipe::pump`] found.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Pumped {
    Open,
    /// The peer closed the session cleanly (close_notify) and nothing is left to read.
    PeerClosed,
}

impl TlsPipe {
    pub(super) fn new(mut conn: Connection) -> TlsPipe {
        // The connection bounds what it queues itself (TX_QUEUE_BYTES_MAX): rustls must take
        // all of it, and `seal` drains rustls whole each time.
        conn.set_buffer_limit(None);
        TlsPipe {
            conn,
            crx: vec![0u8; TLS_RX_BYTES],
            start: 0,
            end: 0,
        }
    }

    /// Where the next receive may write: the free tail of `crx`, after moving what is left to
    /// the front. Empty when rustls has not taken what arrived (it holds plaintext the frame
    /// buffer has no room for): TCP's window then pushes back on the peer.
    pub(super) fn recv_room(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 {
            self.crx.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.crx[self.end..]
    }

    /// Records `n` bytes received into [`TlsPipe::recv_room`].
    pub(super) fn received(&mut self, n: usize) {
        self.end += n;
    }

    /// Moves plaintext into `rx[*rx_end..]`, feeding rustls what was received as long as it
    /// has nothing left to hand out. A TLS error (bad record, failed authentication, alert)
    /// is returned and the connection must close.
    pub(super) fn pump(&mut self, rx: &mut [u8], rx_end: &mut usize) -> Result<Pumped, String> {
        loop {
            let mut moved = false;
            if *rx_end < rx.len() {
                match self.conn.reader().read(&mut rx[*rx_end..]) {
                    Ok(0) => return Ok(Pumped::PeerClosed),
                    Ok(n) => {
                        *rx_end += n;
                        moved = true;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e.to_string()),
                }
            }
            if self.start < self.end && self.conn.wants_read() {
                let taken = self
                    .conn
                    .read_tls(&mut &self.crx[self.start..self.end])
                    .map_err(|e| e.to_string())?;
                self.start += taken;
                self.conn.process_new_packets().map_err(|e| e.to_string())?;
                continue;
            }
            if !moved {
                return Ok(Pumped::Open);
            }
        }
    }

    /// True when the session has bytes to send (sealed frames, alerts, key updates).
    pub(super) fn wants_write(&self) -> bool {
        self.conn.wants_write()
    }

    /// Encrypts the frames queued in `plain` (emptying it) and appends every record the
    /// session has to send to `out`.
    pub(super) fn seal(&mut self, plain: &mut Vec<u8>, out: &mut Vec<u8>) -> std::io::Result<()> {
        if !plain.is_empty() {
            self.conn.writer().write_all(plain)?;
            plain.clear();
        }
        while self.conn.wants_write() {
            self.conn.write_tls(out)?;
        }
        Ok(())
    }
}
