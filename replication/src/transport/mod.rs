//! Transports: how a nexus and its replicas exchange replica-protocol frames.
//!
//! A transport has two halves. The control half ([`Transport`], [`Acceptor`], [`Link`]) is
//! blocking and runs on control threads: it connects, accepts and runs the `Open` handshake,
//! whose durable epoch write must never stall a reactor. The data half ([`Conn`]) runs on one
//! reactor: [`Link::attach`] moves an established link onto the calling core, after which its
//! socket is driven only through that core's io_uring, with no thread per connection.
//!
//! No type of a particular transport crosses these traits: endpoints are strings and frames
//! are bytes, so an RDMA (verbs) transport can implement them later without changing the
//! nexus or the replica server.
//!
//! Limits: a `Conn` queues at most [`TX_QUEUE_BYTES_MAX`] bytes of frames not yet handed to
//! the kernel; [`Conn::send`] refuses more with [`Backpressure`] and the caller holds the
//! request until [`Conn::poll`] has made room. Frames received are bounded by the protocol's
//! `PAYLOAD_MAX_BYTES`.

pub mod tcp;
pub mod tls;

pub use tls::{PeerIdentity, TlsTransport};

use crate::proto::{Envelope, Header, Message, ProtoError, HEADER_BYTES, PAYLOAD_MAX_BYTES};
use cairn_engine::frontend::admission::Cancel;
use cairn_engine::reactor::IoCtx;
use std::time::Duration;

/// Bytes of frames one connection queues for sending before [`Conn::send`] pushes back.
/// Two frames of the nexus's largest request always fit.
pub const TX_QUEUE_BYTES_MAX: usize = 2 << 20;
/// Frame receive buffer of one replica connection: one largest frame plus room to batch small
/// ones.
pub const FRAME_RX_BYTES: usize = HEADER_BYTES + PAYLOAD_MAX_BYTES as usize + (256 << 10);
/// Longest a blocking handshake step may wait for the peer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Transport errors, naming the endpoint and what failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("endpoint '{endpoint}': {what}: {source}")]
    Io {
        endpoint: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("endpoint '{endpoint}': bad frame: {source}")]
    Proto {
        endpoint: String,
        source: ProtoError,
    },
    #[error("endpoint '{endpoint}' is not a valid address: {why}")]
    BadEndpoint { endpoint: String, why: String },
    #[error("connection to '{endpoint}' closed")]
    Closed { endpoint: String },
    #[error("endpoint '{endpoint}': TLS: {why}")]
    Tls { endpoint: String, why: String },
    #[error("endpoint '{endpoint}' refused: {why}")]
    Refused { endpoint: String, why: String },
}

/// A connection factory: TCP (plain or TLS) today, RDMA later.
pub trait Transport: Send + Sync + 'static {
    /// Connects to a replica server; blocking, bounded by `timeout`.
    fn connect(&self, endpoint: &str, timeout: Duration) -> Result<Box<dyn Link>, TransportError>;

    /// Listens for nexus connections at `endpoint`.
    fn listen(&self, endpoint: &str) -> Result<Box<dyn Acceptor>, TransportError>;
}

/// The listening side of a transport.
pub trait Acceptor: Send {
    /// Waits up to `timeout` for one connection; `Ok(None)` when none came.
    fn accept(&mut self, timeout: Duration) -> Result<Option<Box<dyn Link>>, TransportError>;

    /// Where peers reach this acceptor (the bound address, port resolved).
    fn endpoint(&self) -> String;
}

/// An established connection not yet bound to a core: blocking frame exchange for the
/// handshake, then [`Link::attach`].
pub trait Link: Send {
    /// Sends one whole frame (header and payload), blocking.
    fn send_frame(&mut self, frame: &[u8]) -> Result<(), TransportError>;

    /// Receives one whole frame, checked up to its crc, waiting at most `timeout`. Returns the
    /// header and the frame's payload bytes.
    fn recv_frame(&mut self, timeout: Duration) -> Result<(Header, Vec<u8>), TransportError>;

    /// The peer's endpoint, for messages.
    fn peer(&self) -> &str;

    /// Who the peer is: what its TLS certificate names, once the handshake is done (a server
    /// link's handshake runs inside its first `recv_frame`).
    fn identity(&self) -> PeerIdentity;

    /// What cuts this link's handshake short from another thread (its deadline passed, or a
    /// newer peer evicted it): the blocked receive or send fails at once. It acts on a
    /// duplicate of the connection, so it never closes what this link still uses.
    fn canceller(&self) -> Result<Cancel, TransportError>;

    /// Moves the connection onto the calling reactor.
    fn attach(self: Box<Self>, io: &mut IoCtx) -> Result<Box<dyn Conn>, TransportError>;
}

/// The connection is out of send space; retry after the next [`Conn::poll`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backpressure;

/// One frame received on a [`Conn`]: checked header and decoded message (borrowing the
/// connection's receive buffer until the next call).
#[derive(Debug)]
pub struct RxFrame<'a> {
    pub header: Header,
    pub msg: Message<'a>,
}

/// A connection bound to one reactor. Every method runs on that reactor.
pub trait Conn: Send {
    /// Processes this connection's ring completions and starts the next receive and send.
    /// Returns how much work it did, or the error that closed the connection (after which
    /// only [`Conn::busy`] matters).
    fn poll(&mut self, io: &mut IoCtx) -> Result<usize, TransportError>;

    /// The next whole frame received, if any. A malformed, truncated-by-close or
    /// wrong-checksum frame is an error and the connection closes: the byte stream cannot be
    /// resynchronised after a bad header.
    fn recv(&mut self, io: &mut IoCtx) -> Option<Result<RxFrame<'_>, TransportError>>;

    /// Queues one frame; it leaves with the next [`Conn::flush`] or poll, batched with every
    /// other frame queued meanwhile.
    fn send(&mut self, envelope: &Envelope, msg: &Message<'_>) -> Result<(), Backpressure>;

    /// Hands queued frames to the kernel now, if no send is already in flight.
    fn flush(&mut self, io: &mut IoCtx);

    /// Shuts the connection down: pending frames are dropped, the peer sees it close.
    fn close(&mut self, io: &mut IoCtx);

    /// True when the connection is closed (by [`Conn::close`], the peer or an error).
    fn is_closed(&self) -> bool;

    /// True while the kernel still holds buffers of this connection; it must not be dropped
    /// until this is false.
    fn busy(&self) -> bool;

    /// Releases per-core resources; call once, when closed and not busy.
    fn release(&mut self, io: &mut IoCtx);
}
