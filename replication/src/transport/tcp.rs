//! The TCP transport: blocking connect/accept/handshake on control threads, then the socket
//! driven by one reactor's io_uring (one receive and one send in flight at a time).
//!
//! With TLS ([`super::tls`]), the same sockets carry rustls records: the link's blocking
//! exchange goes through the session, and the reactor's receive lands in the session's
//! ciphertext buffer, from which [`TlsPipe::pump`] moves plaintext into the frame buffer.
//!
//! Sockets get TCP_NODELAY: a replicated write waits for its replies, so Nagle's delay would
//! land on every acknowledgement. Small frames are batched instead by the connection itself:
//! everything queued while a send is in flight leaves in the next single send.

use super::tls::{self, PeerIdentity, Pumped, TlsPipe};
use super::{
    Acceptor, Backpressure, Conn, Link, RxFrame, Transport, TransportError, FRAME_RX_BYTES,
    TX_QUEUE_BYTES_MAX,
};
use crate::proto::{self, Envelope, Header, Message, HEADER_BYTES};
use cairn_engine::frontend::admission::Cancel;
use cairn_engine::reactor::ring::Route;
use cairn_engine::reactor::{IoCtx, OwnerId};
use rustls::{Connection, ServerConfig, ServerConnection};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TAG_RECV: u32 = 0;
const TAG_SEND: u32 = 1;

/// TCP over the kernel's sockets. Endpoints are `host:port`.
#[derive(Clone, Copy, Debug, Default)]
pub struct TcpTransport;

fn resolve(endpoint: &str) -> Result<SocketAddr, TransportError> {
    let bad = |why: String| TransportError::BadEndpoint {
        endpoint: endpoint.into(),
        why,
    };
    endpoint
        .to_socket_addrs()
        .map_err(|e| bad(e.to_string()))?
        .next()
        .ok_or_else(|| bad("resolves to no address".into()))
}

/// A blocking link's I/O error: a TLS failure (rustls reports it as `InvalidData`) as
/// [`TransportError::Tls`], anything else as [`TransportError::Io`].
fn link_err(endpoint: &str, what: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
    let endpoint = endpoint.to_string();
    move |source| {
        if source.kind() == std::io::ErrorKind::InvalidData {
            TransportError::Tls {
                endpoint,
                why: source.to_string(),
            }
        } else {
            TransportError::Io {
                endpoint,
                what,
                source,
            }
        }
    }
}

/// Control path only: builds the error's endpoint string up front.
fn io_err(endpoint: &str, what: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
    let endpoint = endpoint.to_string();
    move |source| TransportError::Io {
        endpoint,
        what,
        source,
    }
}

/// Connects to `endpoint` within `timeout`.
pub(super) fn connect_stream(
    endpoint: &str,
    timeout: Duration,
) -> Result<TcpStream, TransportError> {
    let addr = resolve(endpoint)?;
    TcpStream::connect_timeout(&addr, timeout).map_err(io_err(endpoint, "connect"))
}

/// Listens at `endpoint`; with `tls`, every accepted link is a TLS server session.
pub(super) fn listen(
    endpoint: &str,
    tls: Option<Arc<ServerConfig>>,
) -> Result<Box<dyn Acceptor>, TransportError> {
    let addr = resolve(endpoint)?;
    let listener = TcpListener::bind(addr).map_err(io_err(endpoint, "bind"))?;
    listener
        .set_nonblocking(true)
        .map_err(io_err(endpoint, "set_nonblocking"))?;
    let bound = listener
        .local_addr()
        .map_err(io_err(endpoint, "local_addr"))?;
    Ok(Box::new(TcpAcceptor {
        listener,
        endpoint: bound.to_string(),
        tls,
    }))
}

impl Transport for TcpTransport {
    fn connect(&self, endpoint: &str, timeout: Duration) -> Result<Box<dyn Link>, TransportError> {
        let stream = connect_stream(endpoint, timeout)?;
        Ok(Box::new(TcpLink::new(stream, endpoint.to_string(), None)?))
    }

    fn listen(&self, endpoint: &str) -> Result<Box<dyn Acceptor>, TransportError> {
        listen(endpoint, None)
    }
}

struct TcpAcceptor {
    listener: TcpListener,
    endpoint: String,
    tls: Option<Arc<ServerConfig>>,
}

impl Acceptor for TcpAcceptor {
    fn accept(&mut self, timeout: Duration) -> Result<Option<Box<dyn Link>>, TransportError> {
        // A failed poll is a timeout here: the accept loop calls again.
        let ready = cairn_engine::sys::wait_readable(self.listener.as_raw_fd(), timeout);
        if !ready.unwrap_or(false) {
            return Ok(None);
        }
        match self.listener.accept() {
            Ok((stream, peer)) => {
                stream
                    .set_nonblocking(false)
                    .map_err(io_err(&self.endpoint, "set_blocking"))?;
                let session = match &self.tls {
                    Some(config) => Some(Box::new(Connection::from(
                        ServerConnection::new(config.clone()).map_err(|e| TransportError::Tls {
                            endpoint: peer.to_string(),
                            why: e.to_string(),
                        })?,
                    ))),
                    None => None,
                };
                Ok(Some(Box::new(TcpLink::new(
                    stream,
                    peer.to_string(),
                    session,
                )?)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(io_err(&self.endpoint, "accept")(e)),
        }
    }

    fn endpoint(&self) -> String {
        self.endpoint.clone()
    }
}

pub(super) struct TcpLink {
    stream: TcpStream,
    peer: String,
    /// The TLS session, when the transport is [`super::tls::TlsTransport`].
    session: Option<Box<Connection>>,
}

impl TcpLink {
    pub(super) fn new(
        stream: TcpStream,
        peer: String,
        mut session: Option<Box<Connection>>,
    ) -> Result<TcpLink, TransportError> {
        stream
            .set_nodelay(true)
            .map_err(io_err(&peer, "TCP_NODELAY"))?;
        if let Some(session) = session.as_mut() {
            // A whole frame (up to the protocol's largest) goes in at once.
            session.set_buffer_limit(None);
        }
        Ok(TcpLink {
            stream,
            peer,
            session,
        })
    }

    /// Runs the TLS handshake to its end by `deadline` (a client does this in `connect`).
    pub(super) fn finish_handshake(&mut self, deadline: Instant) -> Result<(), TransportError> {
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        tls::handshake_through(session, &mut tls::Deadlined::new(&self.stream, deadline))
            .map_err(link_err(&self.peer, "TLS handshake"))
    }
}

impl Link for TcpLink {
    fn send_frame(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        let deadline = Instant::now() + super::HANDSHAKE_TIMEOUT;
        let mut sock = tls::Deadlined::new(&self.stream, deadline);
        match self.session.as_mut() {
            Some(session) => tls::write_through(session, &mut sock, frame),
            None => sock.write_all(frame),
        }
        .map_err(link_err(&self.peer, "send"))
    }

    fn recv_frame(&mut self, timeout: Duration) -> Result<(Header, Vec<u8>), TransportError> {
        let deadline = Instant::now() + timeout;
        let mut head = [0u8; HEADER_BYTES];
        self.read_exact_by(&mut head, deadline)?;
        let proto_err = |source| TransportError::Proto {
            endpoint: self.peer.clone(),
            source,
        };
        let header = proto::decode_header(&head).map_err(proto_err)?;
        let mut payload = vec![0u8; header.payload_bytes as usize];
        self.read_exact_by(&mut payload, deadline)?;
        proto::verify_payload(&header, &head, &payload).map_err(|source| {
            TransportError::Proto {
                endpoint: self.peer.clone(),
                source,
            }
        })?;
        Ok((header, payload))
    }

    fn peer(&self) -> &str {
        &self.peer
    }

    fn identity(&self) -> PeerIdentity {
        match &self.session {
            Some(session) if session.is_handshaking() => PeerIdentity::Pending,
            Some(session) => tls::identity_of(session),
            None => PeerIdentity::Unauthenticated,
        }
    }

    fn canceller(&self) -> Result<Cancel, TransportError> {
        let dup = self
            .stream
            .try_clone()
            .map_err(io_err(&self.peer, "duplicate"))?;
        Ok(Box::new(move || {
            drop(dup.shutdown(std::net::Shutdown::Both))
        }))
    }

    fn attach(self: Box<Self>, io: &mut IoCtx) -> Result<Box<dyn Conn>, TransportError> {
        self.stream
            .set_read_timeout(None)
            .and_then(|()| self.stream.set_write_timeout(None))
            .map_err(io_err(&self.peer, "clear timeouts"))?;
        let mut conn = TcpConn {
            owner: io.register_owner(4),
            stream: self.stream,
            peer: self.peer,
            rx: vec![0u8; FRAME_RX_BYTES],
            rx_start: 0,
            rx_end: 0,
            recv_in_flight: false,
            tx_fill: Vec::with_capacity(TX_QUEUE_BYTES_MAX),
            tx_send: Vec::with_capacity(TX_QUEUE_BYTES_MAX),
            tx_sent: 0,
            send_in_flight: false,
            closed: false,
            released: false,
            tls: self.session.map(|s| Box::new(TlsPipe::new(*s))),
        };
        // Plaintext the session already decrypted during the handshake's reads.
        if let Err(e) = conn.pump_tls(io) {
            // Closed by the failure, and nothing is armed yet: give the owner back.
            conn.release(io);
            return Err(e);
        }
        Ok(Box::new(conn))
    }
}

impl TcpLink {
    fn read_exact_by(
        &mut self,
        mut buf: &mut [u8],
        deadline: Instant,
    ) -> Result<(), TransportError> {
        let mut sock = tls::Deadlined::new(&self.stream, deadline);
        while !buf.is_empty() {
            let read = match self.session.as_mut() {
                Some(session) => tls::read_through(session, &mut sock, buf),
                None => sock.read(buf),
            };
            match read {
                Ok(0) => {
                    return Err(TransportError::Closed {
                        endpoint: self.peer.clone(),
                    })
                }
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(link_err(&self.peer, "receive")(e)),
            }
        }
        Ok(())
    }
}

/// A TCP connection on one reactor.
struct TcpConn {
    stream: TcpStream,
    peer: String,
    owner: OwnerId,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    recv_in_flight: bool,
    /// Frames queued since the last send started.
    tx_fill: Vec<u8>,
    /// The frames the kernel is sending; untouched while `send_in_flight`.
    tx_send: Vec<u8>,
    tx_sent: usize,
    send_in_flight: bool,
    closed: bool,
    released: bool,
    /// The TLS session: the ring receives ciphertext into it and sends what it seals.
    tls: Option<Box<TlsPipe>>,
}

impl TcpConn {
    fn closed_err(&self) -> TransportError {
        TransportError::Closed {
            endpoint: self.peer.clone(),
        }
    }

    fn fail(&mut self, io: &mut IoCtx, what: &'static str, errno: i32) -> TransportError {
        self.close(io);
        io_err(&self.peer, what)(std::io::Error::from_raw_os_error(errno))
    }

    /// Moves what is left in `rx` to its front once little room is left behind it.
    fn compact_rx(&mut self) {
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        } else if self.rx_start > 0 && FRAME_RX_BYTES - self.rx_end < FRAME_RX_BYTES / 4 {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
    }

    /// With TLS: moves decrypted plaintext into `rx`. A TLS error or the peer's close closes
    /// the connection.
    fn pump_tls(&mut self, io: &mut IoCtx) -> Result<(), TransportError> {
        if self.tls.is_none() {
            // Plain: `rx` may be the target of the receive in flight; never move it here.
            return Ok(());
        }
        // TLS: the ring receives into the session's buffer, so `rx` may move at any time.
        self.compact_rx();
        let Some(pipe) = self.tls.as_mut() else {
            return Ok(());
        };
        match pipe.pump(&mut self.rx, &mut self.rx_end) {
            Ok(Pumped::Open) => Ok(()),
            Ok(Pumped::PeerClosed) => {
                self.close(io);
                Err(self.closed_err())
            }
            Err(why) => {
                self.close(io);
                Err(TransportError::Tls {
                    endpoint: self.peer.clone(),
                    why,
                })
            }
        }
    }

    fn arm_recv(&mut self, io: &mut IoCtx) {
        if self.closed || self.recv_in_flight {
            return;
        }
        self.compact_rx();
        // Plain: straight into the frame buffer. TLS: into the session's ciphertext buffer.
        let room = match self.tls.as_mut() {
            Some(pipe) => pipe.recv_room(),
            None => &mut self.rx[self.rx_end..],
        };
        if room.is_empty() {
            // The caller has not consumed what arrived: TCP's window pushes back on the peer.
            return;
        }
        let (ptr, len) = (room.as_mut_ptr(), room.len());
        let entry = io_uring::opcode::Recv::new(
            io_uring::types::Fd(self.stream.as_raw_fd()),
            ptr,
            len as u32,
        )
        .build()
        .user_data(self.route(TAG_RECV));
        // SAFETY: the receive writes into the free tail of `rx` or of the TLS session's
        // `crx`, heap buffers this connection owns and never resizes; while `recv_in_flight`
        // nothing else writes them (compaction and `pump` run only between receives), and
        // both are leaked rather than freed if the connection is dropped with the receive in
        // flight.
        unsafe { io.ring().push_io(entry) };
        self.recv_in_flight = true;
    }

    fn start_send(&mut self, io: &mut IoCtx) {
        let left = &self.tx_send[self.tx_sent..];
        let entry = io_uring::opcode::Send::new(
            io_uring::types::Fd(self.stream.as_raw_fd()),
            left.as_ptr(),
            left.len() as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(self.route(TAG_SEND));
        // SAFETY: the send reads `tx_send[tx_sent..]`, which is not modified or freed while
        // `send_in_flight` (frames are queued into `tx_fill`), and is leaked if the
        // connection is dropped with the send in flight.
        unsafe { io.ring().push_io(entry) };
        self.send_in_flight = true;
    }

    fn route(&self, tag: u32) -> u64 {
        Route::Io {
            owner: self.owner.get(),
            tag,
        }
        .encode()
    }

    fn complete(&mut self, io: &mut IoCtx, tag: u32, res: i32) -> Result<(), TransportError> {
        if tag == TAG_RECV {
            self.recv_in_flight = false;
            match res {
                n if n > 0 => match self.tls.as_mut() {
                    Some(pipe) => {
                        pipe.received(n as usize);
                        self.pump_tls(io)?;
                    }
                    None => self.rx_end += n as usize,
                },
                0 if self.closed => {}
                0 => {
                    self.close(io);
                    return Err(self.closed_err());
                }
                _ if self.closed => {}
                e => return Err(self.fail(io, "receive", -e)),
            }
        } else {
            self.send_in_flight = false;
            match res {
                n if n >= 0 => {
                    self.tx_sent += n as usize;
                    if self.tx_sent < self.tx_send.len() && !self.closed {
                        self.start_send(io);
                    } else {
                        self.tx_send.clear();
                        self.tx_sent = 0;
                    }
                }
                _ if self.closed => {}
                e => return Err(self.fail(io, "send", -e)),
            }
        }
        Ok(())
    }
}

impl Conn for TcpConn {
    fn poll(&mut self, io: &mut IoCtx) -> Result<usize, TransportError> {
        let mut work = 0;
        let mut result = Ok(());
        while let Some(c) = io.pop(self.owner) {
            work += 1;
            if let Err(e) = self.complete(io, c.tag, c.res) {
                result = Err(e);
            }
        }
        result?;
        if self.closed {
            return Err(self.closed_err());
        }
        self.flush(io);
        self.arm_recv(io);
        Ok(work)
    }

    fn recv(&mut self, io: &mut IoCtx) -> Option<Result<RxFrame<'_>, TransportError>> {
        if self.closed {
            return None;
        }
        if let Err(e) = self.pump_tls(io) {
            return Some(Err(e));
        }
        // The one frame decoder the tests and the fuzzer check, called once per frame. A bad
        // header is refused as soon as it has arrived, before its payload. The fields are
        // borrowed apart so the message can borrow `rx` while a refusal closes the socket.
        let TcpConn {
            rx,
            rx_start,
            rx_end,
            stream,
            peer,
            tx_fill,
            closed,
            ..
        } = self;
        match proto::decode_frame(&rx[*rx_start..*rx_end]) {
            Ok((header, msg, used)) => {
                *rx_start += used;
                Some(Ok(RxFrame { header, msg }))
            }
            Err(proto::ProtoError::Truncated { .. }) => None,
            Err(source) => {
                shut(stream, tx_fill, closed);
                Some(Err(TransportError::Proto {
                    endpoint: peer.clone(),
                    source,
                }))
            }
        }
    }

    fn send(&mut self, envelope: &Envelope, msg: &Message<'_>) -> Result<(), Backpressure> {
        let frame = proto::encode(envelope, msg);
        if self.tx_fill.len() + frame.len_bytes() > TX_QUEUE_BYTES_MAX {
            return Err(Backpressure);
        }
        self.tx_fill.extend_from_slice(&frame.header);
        self.tx_fill.extend_from_slice(frame.payload());
        Ok(())
    }

    fn flush(&mut self, io: &mut IoCtx) {
        if self.closed || self.send_in_flight {
            return;
        }
        match self.tls.as_mut() {
            Some(pipe) => {
                if self.tx_fill.is_empty() && !pipe.wants_write() {
                    return;
                }
                if let Err(e) = pipe.seal(&mut self.tx_fill, &mut self.tx_send) {
                    tracing::warn!(peer = %self.peer, error = %e, "sealing TLS records failed");
                    self.close(io);
                    return;
                }
            }
            None if self.tx_fill.is_empty() => return,
            None => std::mem::swap(&mut self.tx_fill, &mut self.tx_send),
        }
        self.tx_sent = 0;
        self.start_send(io);
    }

    fn close(&mut self, _io: &mut IoCtx) {
        shut(&self.stream, &mut self.tx_fill, &mut self.closed);
    }

    fn is_closed(&self) -> bool {
        self.closed
    }

    fn busy(&self) -> bool {
        self.recv_in_flight || self.send_in_flight
    }

    fn release(&mut self, io: &mut IoCtx) {
        assert!(self.closed && !self.busy(), "released a live connection");
        while io.pop(self.owner).is_some() {}
        if !self.released {
            io.release_owner(self.owner);
            self.released = true;
        }
    }
}

/// Closes a connection once: drops what is queued and shuts the socket down, which wakes the
/// in-flight receive (and fails the send) so `busy` clears. Takes the fields it needs so a
/// caller holding a borrow of `rx` can close too.
fn shut(stream: &TcpStream, tx_fill: &mut Vec<u8>, closed: &mut bool) {
    if !*closed {
        *closed = true;
        tx_fill.clear();
        drop(stream.shutdown(std::net::Shutdown::Both));
    }
}

impl Drop for TcpConn {
    fn drop(&mut self) {
        if self.busy() {
            // The kernel may still write `rx` or read `tx_send`: leak them rather than free
            // memory under an in-flight operation (only on engine teardown).
            std::mem::forget(std::mem::take(&mut self.rx));
            std::mem::forget(std::mem::take(&mut self.tx_send));
            if let Some(pipe) = self.tls.as_mut() {
                std::mem::forget(std::mem::take(&mut pipe.crx));
            }
        }
    }
}
