//! One negotiated NBD connection in the transmission phase: a poller on one reactor.
//!
//! The socket is driven through the reactor's io_uring: at most one receive and one send are
//! in flight. Received bytes land in a per-connection buffer; requests are parsed from it,
//! split into bdev requests of at most one DMA buffer each ("chunks"), and each reply is queued
//! for sending as soon as its last chunk completes, so replies leave in completion order and a
//! pipelining client is never serialised. One `sendmsg` carries every queued reply.
//!
//! Resources and what happens at their limits (all back-pressure on this connection only):
//! * [`SLOTS_MAX`] requests in flight: parsing stops until a reply has been sent.
//! * [`CHUNKS_MAX`] bdev requests in flight and the core's DMA pool: issuing waits.
//! * [`REPLY_BYTES_MAX`] bytes of read data held for replies: new reads wait.
//! * Reply data beyond [`REPLY_FLOOR_BYTES`] comes from the server's global reply budget
//!   (`NbdConfig::reply_budget_bytes`); when it is spent, a read that needs more waits,
//!   retried every [`BUDGET_RETRY`], until other connections' replies have been sent. Small
//!   reads stay within the floor and never touch the shared budget.
//!
//! DMA buffers are held only while a bdev request is in flight: write data is copied in from
//! the receive buffer once a whole chunk has arrived, and read data is copied out into the
//! reply before the buffer goes back. A client that stops reading replies or sends half a
//! request therefore holds only its own memory, never buffers another client needs.
//!
//! TLS (after `NBD_OPT_STARTTLS` in negotiation): the rustls session travels with the socket.
//! Receives land in a ciphertext buffer of [`TLS_RX_BYTES`]; rustls decrypts it
//! (`read_tls`, `process_new_packets`) into the same receive region plain bytes use, only as
//! far as that region has room, so parsing is unchanged. Replies are encrypted (`writer()`,
//! `write_tls`) into a send buffer of [`TLS_TX_BYTES`] and their slots freed at once; nothing
//! more is encrypted while that buffer is full, so a client that does not read still stops the
//! connection at [`SLOTS_MAX`]. What rustls itself buffers is bounded by its defaults (one
//! record of received plaintext, 64 KiB to send). A TLS error closes this connection only,
//! logged through the server's rate-limited TLS failure log.
//!
//! Ending: DISC, end of stream, export removal and server or engine stop drain (answer what is
//! in flight, then close; on removal or stop, requests already received are answered
//! ESHUTDOWN); protocol violations and socket errors close at once. Either way the
//! poller finishes only when nothing it submitted is still in flight. The client's end of
//! stream (a receive of 0 bytes, or TLS close_notify) only stops receiving: every complete
//! request that arrived before it is still parsed and answered (with TLS, the ciphertext
//! received before the end is decrypted first, and rustls learns of the end only once it has
//! taken all of it), and the connection drains once the parser needs bytes that will never
//! come; a write whose payload was cut short closes instead. A TLS connection ends its side
//! with close_notify once every reply is encrypted.

use super::proto::{
    self, cmd, cmd_flag, err, reply_type, Request, CHUNK_HEADER_BYTES, PAYLOAD_MAX_BYTES,
    REPLY_FLAG_DONE, REQUEST_BYTES, SIMPLE_REPLY_BYTES,
};
use super::server::{ExportEntry, ServerShared, StatOp};
use crate::bdev::{Extent, IoError, IoOp, IoRequest};
use crate::dma::{DmaBuf, Region};
use crate::reactor::ring::Route;
use crate::reactor::{Core, OwnerId, Poller, PollerState};
use rustls::ServerConnection;
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Requests of one connection in flight (parsed, not yet fully replied). At the limit the
/// connection stops parsing until a reply has gone out.
pub const SLOTS_MAX: usize = 256;
/// Bdev requests of one connection in flight. At the limit chunks wait to be issued.
pub const CHUNKS_MAX: usize = 128;
/// Read data one connection may hold in replies not yet sent: one largest read plus room for
/// a full queue of small ones. At the limit new reads wait.
pub const REPLY_BYTES_MAX: usize = PAYLOAD_MAX_BYTES as usize + (8 << 20);
/// Read data one connection may always hold in replies without drawing on the server's
/// global reply budget, so a client reading a few MiB at a time is served even while
/// non-reading clients have spent the budget (and pays no shared atomic for it).
pub const REPLY_FLOOR_BYTES: usize = 2 << 20;
/// How often a read waiting for the global reply budget looks again (a timer, not a spin).
pub const BUDGET_RETRY: Duration = Duration::from_millis(20);
/// Largest refused write whose payload is still read (and discarded) so that the error reply
/// follows the whole request. A write claiming more is not answered: the connection closes.
pub const OVERSIZED_WRITE_SKIP_MAX_BYTES: u32 = 2 * PAYLOAD_MAX_BYTES;
/// Receive region per connection, holding request headers and write payloads; must hold a
/// request header plus one whole chunk.
pub const REQUEST_RX_BYTES: usize = 512 << 10;
/// Largest chunk: one bdev request. Also bounded by the bdev and the DMA buffer size.
pub const CHUNK_MAX_BYTES: u32 = 128 << 10;
/// Replies gathered into one sendmsg (two iovecs each at most).
pub const IOV_BATCH_MAX: usize = 128;
/// How long a draining connection may take to answer what it has in flight before it is
/// closed anyway (a client that stopped reading replies).
pub const DRAIN_MAX: Duration = Duration::from_secs(5);
/// How long after the drain limit the wake-up timer fires, so the limit has passed.
const DRAIN_WAKE_SLACK: Duration = Duration::from_millis(10);
/// Extents in one BLOCK_STATUS reply; the client asks again for the rest.
pub const BLOCK_STATUS_EXTENTS_MAX: usize = 1024;
/// Reply memory a free slot keeps for reuse. Larger buffers (from large reads) are released
/// when their reply has been sent, so an idle connection holds little memory.
pub const SLOT_DATA_KEEP_BYTES: usize = 1 << 20;

/// Received ciphertext not yet taken by rustls: a few TLS records (at most 16 KiB of payload
/// each plus framing).
pub const TLS_RX_BYTES: usize = 64 << 10;
/// Encrypted replies waiting to be sent. Replies are encrypted only while less than this is
/// waiting; one batch may overshoot it by what rustls holds (its 64 KiB send limit).
pub const TLS_TX_BYTES: usize = 256 << 10;
/// Room kept in the send buffer beyond [`TLS_TX_BYTES`] so steady encryption never grows it:
/// rustls's send limit plus the framing of its records.
const TLS_TX_SLACK_BYTES: usize = 96 << 10;

const _: () = assert!(REQUEST_RX_BYTES >= REQUEST_BYTES + CHUNK_MAX_BYTES as usize);
const _: () = assert!(SLOTS_MAX < u16::MAX as usize);
const _: () = assert!(CHUNKS_MAX < u16::MAX as usize);

const TAG_RECV: u32 = u32::MAX;
const TAG_SEND: u32 = u32::MAX - 1;
/// Longest reply header: a structured OFFSET_DATA chunk header plus its offset.
const HDR_MAX: usize = CHUNK_HEADER_BYTES + 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Open,
    /// Answering what is in flight; no new requests are read.
    Draining,
    /// The socket is shut down; waiting for submitted operations to come back.
    Closing,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Parse {
    Header,
    /// Receiving the payload of the write in `slot`; `consumed` bytes of it taken so far.
    Payload {
        slot: u16,
        consumed: u32,
    },
}

/// What the chunks of a request do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Work {
    /// Answered without bdev I/O (errors, BLOCK_STATUS).
    None,
    Read,
    Write,
    Flush,
    Trim,
    /// Device write-zeroes, one request.
    Zeroes,
    /// Write-zeroes emulated with writes of zeroed buffers (NO_HOLE, or no device support).
    ZeroWrites,
}

struct Slot {
    req: Request,
    work: Work,
    started: Instant,
    chunks_total: u32,
    /// Next chunk to issue.
    chunks_next: u32,
    chunks_pending: u32,
    /// Write payload still arriving.
    receiving: bool,
    /// NBD error of the reply; 0 for success.
    error: u32,
    /// Bytes of REPLY_BYTES_MAX reserved for this reply's data.
    reserved: usize,
    hdr: [u8; HDR_MAX],
    hdr_len: usize,
    data: Vec<u8>,
    data_len: usize,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            req: Request {
                flags: 0,
                kind: 0,
                cookie: 0,
                offset_bytes: 0,
                len_bytes: 0,
            },
            work: Work::None,
            started: Instant::now(),
            chunks_total: 0,
            chunks_next: 0,
            chunks_pending: 0,
            receiving: false,
            error: 0,
            reserved: 0,
            hdr: [0; HDR_MAX],
            hdr_len: 0,
            data: Vec::new(),
            data_len: 0,
        }
    }

    fn finished(&self) -> bool {
        !self.receiving && self.chunks_pending == 0 && self.chunks_next == self.chunks_total
    }

    fn reply_len(&self) -> usize {
        self.hdr_len + self.data_len
    }
}

struct Chunk {
    slot: u16,
    /// Offset of this chunk within its request.
    offset_bytes: u32,
    len_bytes: u32,
    buf: Option<DmaBuf>,
}

/// The TLS side of a connection: the rustls session and its ciphertext buffers.
struct TlsLink {
    session: ServerConnection,
    /// For the TLS failure log.
    peer: String,
    /// Received ciphertext, `[rx_taken, rx_len)` not yet given to rustls; a receive writes
    /// after `rx_len` (the buffer is compacted before one is armed).
    rx: Box<[u8]>,
    rx_taken: usize,
    rx_len: usize,
    /// Ciphertext to send, `[tx_sent, len)` not yet sent. Appended to only while no send is in
    /// flight (the kernel reads it then).
    tx: Vec<u8>,
    tx_sent: usize,
    /// The socket reached end of stream; rustls is told once it has taken all of `rx`.
    eof: bool,
    /// rustls has been told of the end of stream.
    eof_told: bool,
    /// close_notify has been queued (once every reply is encrypted, while draining).
    close_sent: bool,
}

impl TlsLink {
    fn tx_pending(&self) -> usize {
        self.tx.len() - self.tx_sent
    }
}

/// One NBD client's connection to an export, after negotiation, as the handshake thread hands
/// it to a reactor (the server side; the NBD client bdev's side is `bdev::nbd`'s `RemoteConn`).
pub(crate) struct ExportConn {
    sock: OwnedFd,
    export: Arc<ExportEntry>,
    server: Arc<ServerShared>,
    structured: bool,
    base_allocation: Option<u32>,
    owner: Option<OwnerId>,
    /// The reactor serving this connection (known from the first poll).
    core: u32,
    chunk_bytes: u32,
    state: State,
    drain_since: Option<Instant>,
    /// The server side is going away: requests already received are answered ESHUTDOWN
    /// rather than dropped.
    refusing: bool,
    shut_down: bool,
    /// The client's stream ended (end of stream or TLS close_notify): no more receives, but
    /// complete requests already received are still parsed.
    rx_ended: bool,
    rx: Region,
    rx_start: usize,
    rx_end: usize,
    recv_in_flight: bool,
    send_in_flight: bool,
    parse: Parse,
    slots: Vec<Slot>,
    free_slots: Vec<u16>,
    chunks: Vec<Chunk>,
    free_chunks: Vec<u16>,
    /// Requests with chunks left to issue, oldest first (writes are issued as they arrive).
    issue: VecDeque<u16>,
    /// Replies ready to send, in the order they finished.
    tx: VecDeque<u16>,
    /// Bytes of `tx.front()` already sent.
    tx_sent: usize,
    reply_bytes: usize,
    /// Bytes of the server's global reply budget this connection holds: always
    /// `reply_bytes - REPLY_FLOOR_BYTES` or more, handed back as replies are sent.
    reply_granted: usize,
    /// When the retry timer for a read waiting on the global budget fires, if one is set.
    budget_retry_at: Option<Instant>,
    iov: Box<[libc::iovec; IOV_BATCH_MAX]>,
    msg: Box<libc::msghdr>,
    extents: Vec<Extent>,
    /// The TLS session when the client negotiated `STARTTLS`.
    tls: Option<Box<TlsLink>>,
}

// SAFETY: the iovec array and msghdr hold raw pointers into this connection's own slots; they
// are only dereferenced by the kernel for a send this connection submitted, and the connection
// moves to its reactor thread before it submits anything.
unsafe impl Send for ExportConn {}

impl ExportConn {
    pub(crate) fn new(
        sock: OwnedFd,
        export: Arc<ExportEntry>,
        server: Arc<ServerShared>,
        structured: bool,
        base_allocation: Option<u32>,
        tls: Option<(ServerConnection, String)>,
    ) -> Result<ExportConn, crate::dma::DmaError> {
        let rx = Region::map(REQUEST_RX_BYTES, false, false)?;
        // SAFETY: msghdr is a plain C struct for which all-zero is a valid empty value.
        let msg: libc::msghdr = unsafe { std::mem::zeroed() };
        let iov = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        export.connections.fetch_add(1, Ordering::Relaxed);
        server.connections.fetch_add(1, Ordering::Relaxed);
        Ok(ExportConn {
            sock,
            export,
            server,
            structured,
            base_allocation,
            owner: None,
            core: 0,
            chunk_bytes: CHUNK_MAX_BYTES,
            state: State::Open,
            drain_since: None,
            refusing: false,
            rx_ended: false,
            shut_down: false,
            rx,
            rx_start: 0,
            rx_end: 0,
            recv_in_flight: false,
            send_in_flight: false,
            parse: Parse::Header,
            slots: (0..SLOTS_MAX).map(|_| Slot::new()).collect(),
            free_slots: (0..SLOTS_MAX as u16).rev().collect(),
            chunks: (0..CHUNKS_MAX)
                .map(|_| Chunk {
                    slot: 0,
                    offset_bytes: 0,
                    len_bytes: 0,
                    buf: None,
                })
                .collect(),
            free_chunks: (0..CHUNKS_MAX as u16).rev().collect(),
            issue: VecDeque::with_capacity(SLOTS_MAX),
            tx: VecDeque::with_capacity(SLOTS_MAX),
            tx_sent: 0,
            reply_bytes: 0,
            reply_granted: 0,
            budget_retry_at: None,
            iov: Box::new([iov; IOV_BATCH_MAX]),
            msg: Box::new(msg),
            extents: Vec::with_capacity(BLOCK_STATUS_EXTENTS_MAX),
            tls: tls.map(|(session, peer)| {
                Box::new(TlsLink {
                    session,
                    peer,
                    rx: vec![0; TLS_RX_BYTES].into_boxed_slice(),
                    rx_taken: 0,
                    rx_len: 0,
                    tx: Vec::with_capacity(TLS_TX_BYTES + TLS_TX_SLACK_BYTES),
                    tx_sent: 0,
                    eof: false,
                    eof_told: false,
                    close_sent: false,
                })
            }),
        })
    }

    fn start(&mut self, core: &mut Core) -> OwnerId {
        let owner = core.io().register_owner(CHUNKS_MAX + 2);
        let buf_bytes = core.io().pool().buf_size_bytes();
        let max_io = core
            .bdev_info(self.export.bdev_id)
            .map_or(buf_bytes, |i| i.max_io_bytes);
        self.chunk_bytes = CHUNK_MAX_BYTES.min(buf_bytes).min(max_io);
        // Every slot's read-reply buffer is reserved here, off the I/O path: which slots a
        // workload reaches depends on timing, so reserving on first use would allocate during
        // steady I/O. Pages are touched only by reads that use them; a read longer than a
        // chunk grows its slot's buffer once.
        for slot in &mut self.slots {
            slot.data.reserve(self.chunk_bytes as usize);
        }
        self.owner = Some(owner);
        self.core = core.id().get();
        owner
    }

    fn rx_ptr(&self, at: usize) -> *mut u8 {
        debug_assert!(at <= REQUEST_RX_BYTES);
        // SAFETY: `at` is within the receive region, which this connection owns.
        unsafe { self.rx.base().add(at) }
    }

    /// The received, unparsed bytes. The kernel only ever writes past `rx_end`.
    fn rx_data(&self) -> &[u8] {
        // SAFETY: [rx_start, rx_end) lies in the region and was filled by completed receives;
        // the one receive that may be in flight writes only at and after rx_end.
        unsafe {
            std::slice::from_raw_parts(self.rx_ptr(self.rx_start), self.rx_end - self.rx_start)
        }
    }

    fn reap(&mut self, core: &mut Core, owner: OwnerId) -> usize {
        let mut n = 0;
        while let Some(c) = core.io().pop(owner) {
            match c.tag {
                TAG_RECV => self.on_recv(c.res),
                TAG_SEND => self.on_send(c.res),
                tag => self.on_chunk(core, tag as u16, c.res),
            }
            n += 1;
        }
        n
    }

    fn on_recv(&mut self, res: i32) {
        self.recv_in_flight = false;
        if res > 0 {
            match &mut self.tls {
                Some(tls) => tls.rx_len += res as usize,
                None => self.rx_end += res as usize,
            }
            return;
        }
        if res == 0 {
            // What arrived before the end is still parsed (with TLS, decrypted first):
            // `check_ended` decides once the parser has taken all of it.
            match &mut self.tls {
                Some(tls) => tls.eof = true,
                None => self.rx_ended = true,
            }
            return;
        }
        self.close(&format!("receive failed: {}", errno_text(-res)));
    }

    /// Once the client's stream has ended and the parser waits for bytes that will never
    /// come: drains (answering everything in flight, in case the client only half-closed),
    /// or closes when a write's payload was cut short (it cannot be answered).
    fn check_ended(&mut self) {
        if !self.rx_ended || self.state != State::Open || !self.starved() {
            return;
        }
        if matches!(self.parse, Parse::Payload { .. }) {
            self.close("client closed the connection in the middle of a write");
        } else {
            self.drain("client closed the connection");
        }
    }

    /// Whether the parser's next step needs more bytes than the receive region holds (rather
    /// than a free slot, chunk or reply budget).
    fn starved(&self) -> bool {
        let avail = self.rx_end - self.rx_start;
        match self.parse {
            Parse::Header => avail < REQUEST_BYTES,
            Parse::Payload { slot, consumed } => {
                let slot = &self.slots[slot as usize];
                let left = (slot.req.len_bytes - consumed) as usize;
                if slot.error != 0 || slot.chunks_total == 0 {
                    avail == 0
                } else {
                    avail < left.min(self.chunk_bytes as usize)
                }
            }
        }
    }

    fn on_send(&mut self, res: i32) {
        self.send_in_flight = false;
        if res < 0 {
            self.close(&format!("send failed: {}", errno_text(-res)));
            return;
        }
        if let Some(tls) = &mut self.tls {
            tls.tx_sent += res as usize;
            return;
        }
        let mut n = res as usize;
        while n > 0 {
            let Some(&s) = self.tx.front() else { break };
            let left = self.slots[s as usize].reply_len() - self.tx_sent;
            if n < left {
                self.tx_sent += n;
                break;
            }
            n -= left;
            self.tx_sent = 0;
            self.tx.pop_front();
            self.free_slot(s);
        }
    }

    fn on_chunk(&mut self, core: &mut Core, c: u16, res: i32) {
        let chunk = &mut self.chunks[c as usize];
        let (s, off, len) = (chunk.slot, chunk.offset_bytes, chunk.len_bytes);
        let buf = chunk.buf.take();
        self.free_chunks.push(c);
        let slot = &mut self.slots[s as usize];
        slot.chunks_pending -= 1;
        let op = match slot.work {
            Work::Read => IoOp::Read,
            Work::Write | Work::ZeroWrites => IoOp::Write,
            _ => IoOp::Flush,
        };
        match IoError::check(op, res, len) {
            Err(e) if slot.error == 0 => slot.error = nbd_error(&e, slot.work),
            Err(_) => {}
            Ok(()) => {
                if let (Work::Read, Some(b)) = (slot.work, buf.as_ref()) {
                    let at = off as usize;
                    slot.data[at..at + len as usize].copy_from_slice(&b.as_slice()[..len as usize]);
                }
            }
        }
        if let Some(b) = buf {
            core.io().pool().put(b);
        }
        if self.slots[s as usize].finished() {
            self.complete(core.now(), s);
        }
    }

    /// Turns a finished request into a queued reply.
    fn complete(&mut self, now: Instant, s: u16) {
        let structured = self.structured;
        let context = self.base_allocation.unwrap_or(0);
        let slot = &mut self.slots[s as usize];
        let latency_us = now.saturating_duration_since(slot.started).as_micros() as u64;
        let op = stat_op(slot.req.kind);
        let moved = if slot.error == 0 && matches!(slot.work, Work::Read | Work::Write) {
            u64::from(slot.req.len_bytes)
        } else {
            0
        };
        self.export
            .core_stats(self.core)
            .record(op, moved, latency_us, slot.error != 0);
        slot.hdr_len = encode_reply(slot, structured, context);
        self.tx.push_back(s);
    }

    fn free_slot(&mut self, s: u16) {
        let slot = &mut self.slots[s as usize];
        self.reply_bytes -= slot.reserved;
        slot.reserved = 0;
        let keep = self.reply_bytes.saturating_sub(REPLY_FLOOR_BYTES);
        if self.reply_granted > keep {
            self.server.return_reply_budget(self.reply_granted - keep);
            self.reply_granted = keep;
        }
        slot.data_len = 0;
        if slot.data.capacity() > SLOT_DATA_KEEP_BYTES {
            slot.data = Vec::new();
        }
        self.free_slots.push(s);
    }

    fn drain(&mut self, why: &str) {
        if self.state == State::Open {
            tracing::debug!(export = %self.export.name, why, "NBD connection draining");
            self.state = State::Draining;
        }
    }

    fn close(&mut self, why: &str) {
        if self.state != State::Closing {
            tracing::debug!(export = %self.export.name, why, "NBD connection closing");
            self.state = State::Closing;
        }
    }

    /// Parses and starts every complete request the receive buffer holds, as resources allow.
    fn parse(&mut self, core: &mut Core) -> usize {
        let mut n = 0;
        while self.state == State::Open || (self.state == State::Draining && self.refusing) {
            let progressed = match self.parse {
                Parse::Header => self.parse_header(core),
                Parse::Payload { slot, consumed } => self.take_payload(core, slot, consumed),
            };
            if !progressed {
                break;
            }
            n += 1;
        }
        n
    }

    fn parse_header(&mut self, core: &mut Core) -> bool {
        let data = self.rx_data();
        if data.len() < REQUEST_BYTES || self.free_slots.is_empty() {
            return false;
        }
        let header: &[u8; REQUEST_BYTES] =
            data[..REQUEST_BYTES].try_into().expect("length checked");
        let req = match proto::decode_request(header) {
            Ok(req) => req,
            Err(e) => {
                tracing::warn!(export = %self.export.name, error = %e, "bad NBD request; closing the connection");
                self.close("bad request");
                return false;
            }
        };
        if req.kind == cmd::READ {
            let want = (req.len_bytes as usize).min(PAYLOAD_MAX_BYTES as usize);
            if self.reply_bytes + want > REPLY_BYTES_MAX || !self.reply_room(core, want) {
                return false;
            }
        }
        self.rx_start += REQUEST_BYTES;
        let s = self.free_slots.pop().expect("checked non-empty");
        self.start_request(core, s, req);
        true
    }

    /// Whether `want` more bytes of reply data fit this connection's floor and grant, taking
    /// what is missing from the global budget. When the budget is short, arms a retry timer
    /// (nothing else would wake this connection: it has stopped reading).
    fn reply_room(&mut self, core: &mut Core, want: usize) -> bool {
        let need = self.reply_bytes + want;
        let have = REPLY_FLOOR_BYTES + self.reply_granted;
        if need <= have {
            return true;
        }
        if self.server.take_reply_budget(need - have) {
            self.reply_granted += need - have;
            return true;
        }
        let now = core.now();
        if self.budget_retry_at.is_none_or(|at| at <= now) {
            self.budget_retry_at = Some(now + BUDGET_RETRY);
            core.after(BUDGET_RETRY, |_| ());
        }
        false
    }

    fn start_request(&mut self, core: &mut Core, s: u16, req: Request) {
        let (work, error) = self.classify(core, &req);
        let chunk_bytes = self.chunk_bytes;
        let slot = &mut self.slots[s as usize];
        slot.req = req;
        slot.work = work;
        slot.started = core.now();
        slot.error = error;
        slot.chunks_next = 0;
        slot.chunks_pending = 0;
        slot.data_len = 0;
        slot.reserved = 0;
        let has_payload = req.kind == cmd::WRITE;
        slot.receiving = has_payload;
        slot.chunks_total = match work {
            _ if error != 0 => 0,
            Work::Read | Work::Write | Work::ZeroWrites => req.len_bytes.div_ceil(chunk_bytes),
            Work::Flush | Work::Trim | Work::Zeroes => 1,
            Work::None => 0,
        };
        if work == Work::Read && error == 0 {
            let len = req.len_bytes as usize;
            slot.data.resize(len, 0);
            slot.data_len = len;
            slot.reserved = len;
            self.reply_bytes += len;
        }
        if req.kind == cmd::BLOCK_STATUS && error == 0 {
            self.block_status(s);
        }
        if has_payload {
            if req.len_bytes > OVERSIZED_WRITE_SKIP_MAX_BYTES {
                // Not worth reading: close without a reply (as qemu-nbd does), since a reply
                // now would answer a request the client is still sending.
                self.free_slots.push(s);
                self.close("write far beyond the payload limit");
                return;
            }
            // A write over the payload limit was classified EOVERFLOW: its payload is read and
            // discarded like any refused write's, and only then answered.
            self.parse = Parse::Payload {
                slot: s,
                consumed: 0,
            };
            return;
        }
        match req.kind {
            cmd::DISC => {
                // DISC has no reply: the slot only marks the point where draining begins.
                self.free_slots.push(s);
                self.drain("client sent DISC");
            }
            _ if self.slots[s as usize].chunks_total > 0 => self.issue.push_back(s),
            _ => self.complete(core.now(), s),
        }
    }

    /// Decides how a request is served, or the NBD error it is answered with.
    fn classify(&self, core: &Core, req: &Request) -> (Work, u32) {
        let Some(info) = core.bdev_info(self.export.bdev_id) else {
            return (Work::None, err::ESHUTDOWN);
        };
        if self.refusing {
            return (Work::None, err::ESHUTDOWN);
        }
        let read_only = info.read_only || self.export.options.read_only;
        let block = u64::from(info.block_size_bytes);
        let len = u64::from(req.len_bytes);
        let in_range = req
            .offset_bytes
            .checked_add(len)
            .is_some_and(|end| end <= info.size_bytes);
        let aligned = req.offset_bytes.is_multiple_of(block) && len.is_multiple_of(block);
        let fast = req.flags & cmd_flag::FAST_ZERO != 0;
        let no_hole = req.flags & cmd_flag::NO_HOLE != 0;
        let writes = matches!(req.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        let work = match req.kind {
            cmd::READ => Work::Read,
            cmd::WRITE => Work::Write,
            cmd::FLUSH => return (Work::Flush, 0),
            cmd::DISC => return (Work::None, 0),
            cmd::TRIM if info.can_trim => Work::Trim,
            cmd::TRIM => return (Work::None, err::EINVAL),
            cmd::WRITE_ZEROES if info.can_write_zeroes && !no_hole => Work::Zeroes,
            cmd::WRITE_ZEROES if fast => return (Work::None, err::ENOTSUP),
            cmd::WRITE_ZEROES => Work::ZeroWrites,
            cmd::BLOCK_STATUS if self.base_allocation.is_some() => Work::None,
            _ => return (Work::None, err::EINVAL),
        };
        let error = if writes && read_only {
            err::EPERM
        } else if matches!(req.kind, cmd::READ | cmd::WRITE) && len > u64::from(PAYLOAD_MAX_BYTES) {
            if self.structured {
                err::EOVERFLOW
            } else {
                err::EINVAL
            }
        } else if len == 0 || !aligned {
            err::EINVAL
        } else if !in_range {
            if writes {
                err::ENOSPC
            } else {
                err::EINVAL
            }
        } else {
            0
        };
        (work, error)
    }

    /// Answers BLOCK_STATUS for base:allocation from the bdev's allocation map.
    fn block_status(&mut self, s: u16) {
        let req = self.slots[s as usize].req;
        let max = if req.flags & cmd_flag::REQ_ONE != 0 {
            1
        } else {
            BLOCK_STATUS_EXTENTS_MAX
        };
        self.extents.clear();
        self.export.bdev.allocation(
            req.offset_bytes,
            u64::from(req.len_bytes),
            max,
            &mut self.extents,
        );
        let slot = &mut self.slots[s as usize];
        slot.data.clear();
        for e in self.extents.iter().take(max) {
            let len = e.len_bytes.min(u64::from(u32::MAX)) as u32;
            let flags = if e.zero {
                proto::state::HOLE | proto::state::ZERO
            } else {
                0
            };
            slot.data.extend_from_slice(&len.to_be_bytes());
            slot.data.extend_from_slice(&flags.to_be_bytes());
        }
        slot.data_len = slot.data.len();
        if slot.data_len == 0 {
            slot.error = err::EINVAL;
        }
    }

    /// Moves the next whole chunk of the write being received into a DMA buffer and issues
    /// it (or discards it when the write is already answered with an error).
    fn take_payload(&mut self, core: &mut Core, s: u16, consumed: u32) -> bool {
        let avail = self.rx_end - self.rx_start;
        let slot = &self.slots[s as usize];
        let left = slot.req.len_bytes - consumed;
        let fua = slot.req.flags & cmd_flag::FUA != 0;
        if slot.error != 0 || slot.chunks_total == 0 {
            let n = (left as usize).min(avail) as u32;
            if n == 0 && left > 0 {
                return false;
            }
            self.rx_start += n as usize;
            return self.payload_advanced(core, s, consumed + n);
        }
        let len = left.min(self.chunk_bytes);
        if avail < len as usize || self.free_chunks.is_empty() {
            return false;
        }
        let Some(mut buf) = core.io().pool().get() else {
            return false;
        };
        let src = &self.rx_data()[..len as usize];
        buf.as_mut_slice()[..len as usize].copy_from_slice(src);
        self.rx_start += len as usize;
        self.slots[s as usize].chunks_next += 1;
        self.submit_chunk(core, s, IoOp::Write, consumed, len, Some(buf), fua);
        self.payload_advanced(core, s, consumed + len)
    }

    fn payload_advanced(&mut self, core: &mut Core, s: u16, consumed: u32) -> bool {
        let slot = &mut self.slots[s as usize];
        if consumed < slot.req.len_bytes {
            self.parse = Parse::Payload { slot: s, consumed };
            return true;
        }
        self.parse = Parse::Header;
        slot.receiving = false;
        slot.chunks_next = slot.chunks_total;
        if slot.finished() {
            self.complete(core.now(), s);
        }
        true
    }

    /// Issues chunks of queued requests, oldest first, while buffers and chunk slots last.
    fn issue(&mut self, core: &mut Core) -> usize {
        let mut n = 0;
        while let Some(&s) = self.issue.front() {
            let slot = &self.slots[s as usize];
            if slot.chunks_next == slot.chunks_total || slot.error != 0 {
                self.issue.pop_front();
                let slot = &mut self.slots[s as usize];
                slot.chunks_next = slot.chunks_total;
                if slot.finished() {
                    self.complete(core.now(), s);
                }
                continue;
            }
            if self.free_chunks.is_empty() {
                break;
            }
            let (op, off, len, needs_buf) = self.next_chunk(s);
            let buf = if needs_buf {
                let Some(mut b) = core.io().pool().get() else {
                    break;
                };
                if self.slots[s as usize].work == Work::ZeroWrites {
                    b.as_mut_slice()[..len as usize].fill(0);
                }
                Some(b)
            } else {
                None
            };
            self.slots[s as usize].chunks_next += 1;
            self.submit_chunk(core, s, op, off, len, buf, false);
            n += 1;
        }
        n
    }

    fn next_chunk(&self, s: u16) -> (IoOp, u32, u32, bool) {
        let slot = &self.slots[s as usize];
        let off = slot.chunks_next * self.chunk_bytes;
        let data_len = (slot.req.len_bytes - off.min(slot.req.len_bytes)).min(self.chunk_bytes);
        match slot.work {
            Work::Read => (IoOp::Read, off, data_len, true),
            Work::ZeroWrites => (IoOp::Write, off, data_len, true),
            Work::Flush => (IoOp::Flush, 0, 0, false),
            Work::Trim => (IoOp::Trim, 0, slot.req.len_bytes, false),
            Work::Zeroes => (IoOp::WriteZeroes, 0, slot.req.len_bytes, false),
            Work::Write | Work::None => unreachable!("issued only from the payload path"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn submit_chunk(
        &mut self,
        core: &mut Core,
        s: u16,
        op: IoOp,
        off: u32,
        len: u32,
        mut buf: Option<DmaBuf>,
        fua: bool,
    ) {
        let c = self.free_chunks.pop().expect("caller checked a free chunk");
        let slot = &mut self.slots[s as usize];
        let req = IoRequest {
            op,
            offset_bytes: if op == IoOp::Flush {
                0
            } else {
                slot.req.offset_bytes + u64::from(off)
            },
            len_bytes: len,
            buf: buf.as_mut().map(DmaBuf::io_buf),
            fua,
            owner: self.owner.expect("started"),
            tag: u32::from(c),
        };
        match core.submit(self.export.bdev_id, req) {
            Ok(()) => {
                slot.chunks_pending += 1;
                self.chunks[c as usize] = Chunk {
                    slot: s,
                    offset_bytes: off,
                    len_bytes: len,
                    buf,
                };
            }
            Err(e) => {
                if slot.error == 0 {
                    slot.error = nbd_error(&e, slot.work);
                }
                self.free_chunks.push(c);
                if let Some(b) = buf {
                    core.io().pool().put(b);
                }
            }
        }
    }

    /// Room after `rx_end` in the receive region, moving the unparsed bytes to its start
    /// first when less than a request and a chunk would fit. Called only while no plain
    /// receive is in flight (a TLS connection never receives into the region).
    fn rx_room(&mut self) -> usize {
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        }
        let need = REQUEST_BYTES + self.chunk_bytes as usize;
        if REQUEST_RX_BYTES - self.rx_end < need && self.rx_start > 0 {
            let len = self.rx_end - self.rx_start;
            // SAFETY: both ranges lie in the receive region and no receive is in flight, so
            // nothing else writes it; `copy` allows the overlap.
            unsafe { std::ptr::copy(self.rx_ptr(self.rx_start), self.rx_ptr(0), len) };
            self.rx_start = 0;
            self.rx_end = len;
        }
        REQUEST_RX_BYTES - self.rx_end
    }

    /// Decrypts received ciphertext into the receive region while it has room. A TLS error
    /// closes the connection (logged, rate-limited). The socket's end of stream reaches rustls
    /// only after all ciphertext received before it; rustls's end of plaintext (close_notify,
    /// or the end of stream without it) ends the client's stream like a plain end of stream.
    fn tls_pump(&mut self) -> usize {
        let Some(mut tls) = self.tls.take() else {
            return 0;
        };
        let mut moved = 0;
        let failure = loop {
            let room = self.rx_room();
            if room == 0 {
                break None;
            }
            // SAFETY: [rx_end, rx_end + room) lies in the receive region, which only this
            // connection writes: a TLS connection never has a receive aimed at it.
            let into = unsafe { std::slice::from_raw_parts_mut(self.rx_ptr(self.rx_end), room) };
            match tls.session.reader().read(into) {
                Ok(0) => {
                    self.rx_ended = true;
                    break None;
                }
                Ok(n) => {
                    self.rx_end += n;
                    moved += n;
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                // The socket ended without close_notify, after all it carried was decrypted.
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                    self.rx_ended = true;
                    break None;
                }
                Err(e) => break Some(e.to_string()),
            }
            if tls.rx_taken == tls.rx_len {
                if !tls.eof || tls.eof_told {
                    break None;
                }
                // Every byte before the end of stream has been taken: now rustls may know.
                tls.eof_told = true;
                if let Err(e) = tls.session.read_tls(&mut &[][..]) {
                    break Some(e.to_string());
                }
            } else {
                match tls.session.read_tls(&mut &tls.rx[tls.rx_taken..tls.rx_len]) {
                    Ok(n) => tls.rx_taken += n,
                    Err(e) => break Some(e.to_string()),
                }
            }
            if let Err(e) = tls.session.process_new_packets() {
                break Some(e.to_string());
            }
        };
        if let Some(error) = failure {
            self.server.tls_failures.note(&tls.peer, &error);
            self.close("TLS error");
        }
        self.tls = Some(tls);
        moved
    }

    fn arm_recv(&mut self, core: &mut Core, owner: OwnerId) {
        if self.state != State::Open || self.recv_in_flight || self.rx_ended {
            return;
        }
        let (ptr, room) = match &mut self.tls {
            Some(tls) if tls.eof => return,
            Some(tls) => {
                tls.rx.copy_within(tls.rx_taken..tls.rx_len, 0);
                tls.rx_len -= tls.rx_taken;
                tls.rx_taken = 0;
                let room = TLS_RX_BYTES - tls.rx_len;
                // SAFETY: rx_len <= TLS_RX_BYTES, the buffer's length.
                (unsafe { tls.rx.as_mut_ptr().add(tls.rx_len) }, room)
            }
            None => {
                let room = self.rx_room();
                (self.rx_ptr(self.rx_end), room)
            }
        };
        if room == 0 {
            return;
        }
        let entry = io_uring::opcode::Recv::new(
            io_uring::types::Fd(self.sock.as_raw_fd()),
            ptr,
            room as u32,
        )
        .build()
        .user_data(
            Route::Io {
                owner: owner.get(),
                tag: TAG_RECV,
            }
            .encode(),
        );
        // SAFETY: the receive writes only [rx_end, REQUEST_RX_BYTES) of the region this connection
        // owns, or with TLS [rx_len, TLS_RX_BYTES) of the boxed ciphertext buffer (which never
        // moves), and nothing reads that range until the completion moves rx_end or rx_len;
        // the socket stays open until every submitted operation has completed (see `poll`).
        unsafe { core.io().ring().push_io(entry) };
        self.recv_in_flight = true;
    }

    /// Encrypts queued replies into the TLS send buffer while it holds less than
    /// [`TLS_TX_BYTES`], freeing each slot once all of its reply is encrypted, plus any record
    /// rustls wants to send on its own (alerts, key updates).
    fn tls_encrypt(&mut self) {
        let Some(mut tls) = self.tls.take() else {
            return;
        };
        if tls.tx_sent == tls.tx.len() {
            tls.tx.clear();
        } else if tls.tx_sent > 0 {
            tls.tx.drain(..tls.tx_sent);
        }
        tls.tx_sent = 0;
        let mut failure = None;
        'replies: while tls.tx.len() < TLS_TX_BYTES {
            let Some(&s) = self.tx.front() else { break };
            let slot = &self.slots[s as usize];
            let mut skip = self.tx_sent;
            let mut wrote = 0;
            for part in [&slot.hdr[..slot.hdr_len], &slot.data[..slot.data_len]] {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                let part = &part[skip..];
                skip = 0;
                // rustls takes at most its send limit; the rest waits for the next round.
                let n = match tls.session.writer().write(part) {
                    Ok(n) => n,
                    Err(e) => {
                        failure = Some(e.to_string());
                        break 'replies;
                    }
                };
                wrote += n;
                if n < part.len() {
                    break;
                }
            }
            if let Err(e) = tls.session.write_tls(&mut tls.tx) {
                failure = Some(e.to_string());
                break;
            }
            if self.tx_sent + wrote == self.slots[s as usize].reply_len() {
                self.tx_sent = 0;
                self.tx.pop_front();
                self.free_slot(s);
            } else {
                self.tx_sent += wrote;
                if wrote == 0 {
                    break;
                }
            }
        }
        while failure.is_none() && tls.session.wants_write() {
            if let Err(e) = tls.session.write_tls(&mut tls.tx) {
                failure = Some(e.to_string());
            }
        }
        if let Some(error) = failure {
            self.server.tls_failures.note(&tls.peer, &error);
            self.close("TLS error");
        }
        self.tls = Some(tls);
    }

    fn arm_send(&mut self, core: &mut Core, owner: OwnerId) {
        if self.state == State::Closing || self.send_in_flight {
            return;
        }
        if self.tls.is_some() {
            self.arm_send_tls(core, owner);
            return;
        }
        if self.tx.is_empty() {
            return;
        }
        let mut n = 0;
        let mut skip = self.tx_sent;
        for &s in self.tx.iter() {
            if n + 2 > IOV_BATCH_MAX {
                break;
            }
            let slot = &self.slots[s as usize];
            let parts = [&slot.hdr[..slot.hdr_len], &slot.data[..slot.data_len]];
            for part in parts {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                let part = &part[skip..];
                skip = 0;
                self.iov[n] = libc::iovec {
                    iov_base: part.as_ptr() as *mut libc::c_void,
                    iov_len: part.len(),
                };
                n += 1;
            }
        }
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = n as _;
        let entry = io_uring::opcode::SendMsg::new(
            io_uring::types::Fd(self.sock.as_raw_fd()),
            &*self.msg as *const libc::msghdr,
        )
        .flags(libc::MSG_NOSIGNAL as u32)
        .build()
        .user_data(
            Route::Io {
                owner: owner.get(),
                tag: TAG_SEND,
            }
            .encode(),
        );
        // SAFETY: the msghdr, the iovecs and every slice they name live in this connection's
        // boxes and slots, which are neither moved nor changed until the send completes: a slot
        // in `tx` is only freed by that completion, and the socket outlives it (see `poll`).
        unsafe { core.io().ring().push_io(entry) };
        self.send_in_flight = true;
    }

    /// Sends what [`Self::tls_encrypt`] left in the TLS send buffer.
    fn arm_send_tls(&mut self, core: &mut Core, owner: OwnerId) {
        self.tls_encrypt();
        let Some(tls) = &self.tls else { return };
        if self.state == State::Closing || tls.tx_pending() == 0 {
            return;
        }
        let pending = &tls.tx[tls.tx_sent..];
        let entry = io_uring::opcode::Send::new(
            io_uring::types::Fd(self.sock.as_raw_fd()),
            pending.as_ptr(),
            pending.len() as u32,
        )
        .flags(libc::MSG_NOSIGNAL)
        .build()
        .user_data(
            Route::Io {
                owner: owner.get(),
                tag: TAG_SEND,
            }
            .encode(),
        );
        // SAFETY: the send reads [tx_sent, len) of the TLS send buffer, which is neither
        // changed nor reallocated until the send completes (tls_encrypt runs only while no
        // send is in flight), and the socket outlives it (see `poll`).
        unsafe { core.io().ring().push_io(entry) };
        self.send_in_flight = true;
    }

    fn check_stop(&mut self, core: &mut Core) {
        if self.state == State::Open
            && (core.stopping()
                || self.export.closed.load(Ordering::Relaxed)
                || self.server.stopping.load(Ordering::Relaxed))
        {
            self.drain("export removed or server stopping");
            self.refusing = true;
        }
        if self.state == State::Draining {
            let since = match self.drain_since {
                Some(since) => since,
                None => {
                    // Nothing may complete while a stuck client blocks our send, so make sure
                    // the reactor wakes to enforce the limit.
                    core.after(DRAIN_MAX + DRAIN_WAKE_SLACK, |_| ());
                    *self.drain_since.insert(core.now())
                }
            };
            let idle = self.free_slots.len() == SLOTS_MAX
                && self.parse == Parse::Header
                && self.tls.as_ref().is_none_or(|t| t.tx_pending() == 0);
            if idle && !self.send_in_flight {
                match self.tls.as_mut() {
                    // Every reply is encrypted and sent: end our side of the session too
                    // (arm_send sends it; the next poll, once it is sent, closes).
                    Some(tls) if !tls.close_sent => {
                        tls.session.send_close_notify();
                        tls.close_sent = true;
                    }
                    _ => self.close("drained"),
                }
            } else if core.now().saturating_duration_since(since) > DRAIN_MAX {
                self.close("drain took too long (client not reading replies?)");
            }
        }
    }

    fn in_flight(&self) -> bool {
        self.recv_in_flight || self.send_in_flight || self.free_chunks.len() < CHUNKS_MAX
    }
}

impl Poller for ExportConn {
    fn poll(&mut self, core: &mut Core) -> PollerState {
        let owner = match self.owner {
            Some(o) => o,
            None => self.start(core),
        };
        let mut work = self.reap(core, owner);
        if self.state != State::Closing {
            work += self.issue(core);
            // With TLS, parsing makes room for more plaintext that rustls may already hold,
            // and nothing else would wake this connection for it: go on while either moves.
            loop {
                let moved = self.tls_pump();
                let parsed = self.parse(core);
                work += moved + parsed;
                if moved == 0 && (parsed == 0 || self.tls.is_none()) {
                    break;
                }
            }
            self.check_ended();
        }
        self.check_stop(core);
        self.arm_recv(core, owner);
        self.arm_send(core, owner);
        if self.state == State::Closing {
            if !self.shut_down {
                // SAFETY: shutting down a socket we own; it cancels our pending receive and
                // send, whose completions still arrive and are reaped before we finish.
                unsafe { libc::shutdown(self.sock.as_raw_fd(), libc::SHUT_RDWR) };
                self.shut_down = true;
                work += 1;
            }
            if !self.in_flight() {
                core.io().release_owner(owner);
                self.owner = None;
                return PollerState::Finished;
            }
        }
        if work > 0 {
            PollerState::Busy(work)
        } else {
            PollerState::Idle
        }
    }

    fn needs_poll(&self) -> bool {
        // Everything this connection waits for arrives as a completion to its owner, or
        // (buffers, chunk slots) is freed by a completion on this core, or (stop, export
        // removal) comes with a message that wakes the reactor.
        false
    }
}

impl Drop for ExportConn {
    fn drop(&mut self) {
        self.server.return_reply_budget(self.reply_granted);
        self.export.connections.fetch_sub(1, Ordering::Relaxed);
        self.server.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Writes the reply header for a finished slot and returns its length.
fn encode_reply(slot: &mut Slot, structured: bool, context: u32) -> usize {
    let cookie = slot.req.cookie;
    if !structured {
        let out: &mut [u8; SIMPLE_REPLY_BYTES] = (&mut slot.hdr[..SIMPLE_REPLY_BYTES])
            .try_into()
            .expect("fits");
        proto::encode_simple_reply(slot.error, cookie, out);
        if slot.error != 0 {
            slot.data_len = 0;
        }
        return SIMPLE_REPLY_BYTES;
    }
    let (kind, extra) = if slot.error != 0 {
        slot.data_len = 0;
        (reply_type::ERROR, 6)
    } else if slot.work == Work::Read {
        (reply_type::OFFSET_DATA, 8)
    } else if slot.req.kind == cmd::BLOCK_STATUS {
        (reply_type::BLOCK_STATUS, 4)
    } else {
        slot.data_len = 0;
        (reply_type::NONE, 0)
    };
    let len = (extra + slot.data_len) as u32;
    let head: &mut [u8; CHUNK_HEADER_BYTES] = (&mut slot.hdr[..CHUNK_HEADER_BYTES])
        .try_into()
        .expect("fits");
    proto::encode_chunk_header(REPLY_FLAG_DONE, kind, cookie, len, head);
    let tail = &mut slot.hdr[CHUNK_HEADER_BYTES..];
    match kind {
        reply_type::ERROR => {
            tail[..4].copy_from_slice(&slot.error.to_be_bytes());
            tail[4..6].copy_from_slice(&0u16.to_be_bytes());
        }
        reply_type::OFFSET_DATA => tail[..8].copy_from_slice(&slot.req.offset_bytes.to_be_bytes()),
        reply_type::BLOCK_STATUS => tail[..4].copy_from_slice(&context.to_be_bytes()),
        _ => {}
    }
    CHUNK_HEADER_BYTES + extra
}

fn stat_op(kind: u16) -> StatOp {
    match kind {
        cmd::READ => StatOp::Read,
        cmd::WRITE => StatOp::Write,
        cmd::FLUSH => StatOp::Flush,
        cmd::TRIM => StatOp::Trim,
        cmd::WRITE_ZEROES => StatOp::WriteZeroes,
        cmd::BLOCK_STATUS => StatOp::BlockStatus,
        _ => StatOp::Other,
    }
}

/// The NBD error for a refused or failed bdev request.
fn nbd_error(e: &IoError, work: Work) -> u32 {
    match e {
        IoError::Device { errno } => proto::errno_to_nbd(*errno),
        IoError::OutOfRange { .. } if work != Work::Read => err::ENOSPC,
        IoError::ReadOnly { .. } => err::EPERM,
        IoError::Unsupported { .. } => err::ENOTSUP,
        IoError::Misaligned { .. }
        | IoError::OutOfRange { .. }
        | IoError::ZeroLength { .. }
        | IoError::TooLarge { .. } => err::EINVAL,
        IoError::NoSuchBdev { .. } | IoError::EngineStopped => err::ESHUTDOWN,
        _ => err::EIO,
    }
}

fn errno_text(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}
