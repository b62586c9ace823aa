//! The TCP transport: blocking connect/accept/handshake on control threads, then the socket
//! driven by one reactor's io_uring (one receive and one send in flight at a time).
//!
//! Sockets get TCP_NODELAY: a replicated write waits for its replies, so Nagle's delay would
//! land on every acknowledgement. Small frames are batched instead by the connection itself:
//! everything queued while a send is in flight leaves in the next single send.

use super::{
    Acceptor, Backpressure, Conn, Link, RxFrame, Transport, TransportError, FRAME_RX_BYTES,
    TX_QUEUE_BYTES_MAX,
};
use crate::proto::{self, Envelope, Header, Message, HEADER_BYTES};
use cairn_engine::frontend::admission::Cancel;
use cairn_engine::reactor::ring::Route;
use cairn_engine::reactor::{IoCtx, OwnerId};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
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

/// Control path only: builds the error's endpoint string up front.
fn io_err(endpoint: &str, what: &'static str) -> impl FnOnce(std::io::Error) -> TransportError {
    let endpoint = endpoint.to_string();
    move |source| TransportError::Io {
        endpoint,
        what,
        source,
    }
}

impl Transport for TcpTransport {
    fn connect(&self, endpoint: &str, timeout: Duration) -> Result<Box<dyn Link>, TransportError> {
        let addr = resolve(endpoint)?;
        let stream =
            TcpStream::connect_timeout(&addr, timeout).map_err(io_err(endpoint, "connect"))?;
        TcpLink::boxed(stream, endpoint.to_string())
    }

    fn listen(&self, endpoint: &str) -> Result<Box<dyn Acceptor>, TransportError> {
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
        }))
    }
}

struct TcpAcceptor {
    listener: TcpListener,
    endpoint: String,
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
                Ok(Some(TcpLink::boxed(stream, peer.to_string())?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(io_err(&self.endpoint, "accept")(e)),
        }
    }

    fn endpoint(&self) -> String {
        self.endpoint.clone()
    }
}

struct TcpLink {
    stream: TcpStream,
    peer: String,
}

impl TcpLink {
    fn boxed(stream: TcpStream, peer: String) -> Result<Box<dyn Link>, TransportError> {
        stream
            .set_nodelay(true)
            .map_err(io_err(&peer, "TCP_NODELAY"))?;
        Ok(Box::new(TcpLink { stream, peer }))
    }
}

impl Link for TcpLink {
    fn send_frame(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        self.stream
            .set_write_timeout(Some(super::HANDSHAKE_TIMEOUT))
            .and_then(|()| self.stream.write_all(frame))
            .map_err(io_err(&self.peer, "send"))
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
        Ok(Box::new(TcpConn {
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
        }))
    }
}

impl TcpLink {
    fn read_exact_by(
        &mut self,
        mut buf: &mut [u8],
        deadline: Instant,
    ) -> Result<(), TransportError> {
        while !buf.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io_err(&self.peer, "receive")(
                    std::io::ErrorKind::TimedOut.into(),
                ));
            }
            self.stream
                .set_read_timeout(Some(left))
                .map_err(io_err(&self.peer, "set timeout"))?;
            match self.stream.read(buf) {
                Ok(0) => {
                    return Err(TransportError::Closed {
                        endpoint: self.peer.clone(),
                    })
                }
                Ok(n) => buf = &mut buf[n..],
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(&self.peer, "receive")(e)),
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

    fn arm_recv(&mut self, io: &mut IoCtx) {
        if self.closed || self.recv_in_flight {
            return;
        }
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        } else if self.rx_start > 0 && FRAME_RX_BYTES - self.rx_end < FRAME_RX_BYTES / 4 {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        let room = FRAME_RX_BYTES - self.rx_end;
        if room == 0 {
            // The caller has not consumed what arrived: TCP's window pushes back on the peer.
            return;
        }
        let ptr = self.rx[self.rx_end..].as_mut_ptr();
        let entry = io_uring::opcode::Recv::new(
            io_uring::types::Fd(self.stream.as_raw_fd()),
            ptr,
            room as u32,
        )
        .build()
        .user_data(self.route(TAG_RECV));
        // SAFETY: the receive writes into `rx[rx_end..]`, a heap buffer this connection owns
        // and never resizes; while `recv_in_flight` nothing else writes it, and the buffer is
        // leaked rather than freed if the connection is dropped with the receive in flight.
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
                n if n > 0 => self.rx_end += n as usize,
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

    fn recv(&mut self, _io: &mut IoCtx) -> Option<Result<RxFrame<'_>, TransportError>> {
        if self.closed {
            return None;
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
        if self.closed || self.send_in_flight || self.tx_fill.is_empty() {
            return;
        }
        std::mem::swap(&mut self.tx_fill, &mut self.tx_send);
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
        }
    }
}
