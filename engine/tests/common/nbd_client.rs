//! A small blocking NBD client for tests: fixed-newstyle negotiation with NBD_OPT_GO, optional
//! structured replies and the `base:allocation` context, and a transmission phase that keeps
//! any number of requests in flight and matches replies by cookie in whatever order they come.
//!
//! It is test tooling, written from the protocol document (NetworkBlockDevice/nbd,
//! doc/proto.md) with the server's wire constants, and checked against a real server
//! (`nbdkit memory`). It encodes and decodes every byte itself rather than calling the server's
//! encoders, so a symmetric bug in those cannot hide behind a round trip. Every socket has a
//! read timeout, so a server that stops answering fails the test instead of hanging it; it
//! never asserts on how long anything takes.
//!
//! The low-level pieces (`greet`, `send_option`, `read_option_reply`, `send_request`) are public
//! so tests can play a misbehaving client one step at a time.

#![allow(dead_code)]

use cairn_engine::frontend::nbd::proto::{
    self, client_flag, cmd, handshake_flag, info, opt, rep, reply_type, REPLY_FLAG_DONE,
};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// How long one socket read may wait before the client gives up on the server. A deadlock
/// detector, not a performance bound.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest option reply or reply chunk payload the client accepts (a READ of the largest
/// request the protocol lets servers require, plus its offset).
const PAYLOAD_MAX_BYTES: u32 = (64 << 20) + 8;

/// Where a server listens.
#[derive(Clone, Debug)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A connected socket of either family.
#[derive(Debug)]
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn connect(ep: &Endpoint) -> io::Result<Stream> {
        let s = match ep {
            Endpoint::Tcp(a) => {
                let s = TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
            Endpoint::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
        };
        s.set_read_timeout(Some(READ_TIMEOUT))?;
        s.set_write_timeout(Some(READ_TIMEOUT))?;
        Ok(s)
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }

    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }

    /// Waits (up to the read timeout) for the server to close: true on EOF or reset, false if
    /// it sent more bytes instead.
    pub fn closed_by_peer(&mut self) -> io::Result<bool> {
        let mut b = [0u8; 4096];
        match self.read(&mut b) {
            Ok(0) => Ok(true),
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Reads and discards until EOF (or reset); errors only on a timeout.
    pub fn drain_to_eof(&mut self) -> io::Result<()> {
        let mut b = vec![0u8; 1 << 16];
        loop {
            match self.read(&mut b) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(b),
            Stream::Unix(s) => s.read(b),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(b),
            Stream::Unix(s) => s.write(b),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn read_vec(s: &mut Stream, len: u32) -> io::Result<Vec<u8>> {
    if len > PAYLOAD_MAX_BYTES {
        return Err(bad(format!(
            "payload of {len} bytes is beyond any sane reply"
        )));
    }
    let mut v = vec![0u8; len as usize];
    s.read_exact(&mut v)?;
    Ok(v)
}

/// Reads the server's greeting and returns its handshake flags.
pub fn greet(s: &mut Stream) -> io::Result<u16> {
    let mut g = [0u8; 18];
    s.read_exact(&mut g)?;
    if &g[0..8] != b"NBDMAGIC" || &g[8..16] != b"IHAVEOPT" {
        return Err(bad(format!("greeting {g:02x?} is not fixed newstyle")));
    }
    Ok(be_u16(&g, 16))
}

/// Sends the client flags.
pub fn send_client_flags(s: &mut Stream, flags: u32) -> io::Result<()> {
    s.write_all(&flags.to_be_bytes())
}

/// Sends one option: IHAVEOPT, option, length, data.
pub fn send_option(s: &mut Stream, option: u32, data: &[u8]) -> io::Result<()> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(b"IHAVEOPT");
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b)
}

/// One option reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

pub fn read_option_reply(s: &mut Stream) -> io::Result<OptionReply> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    let magic = be_u64(&h, 0);
    if magic != proto::OPTION_REPLY_MAGIC {
        return Err(bad(format!("option reply magic {magic:#x}")));
    }
    let option = be_u32(&h, 8);
    let kind = be_u32(&h, 12);
    let data = read_vec(s, be_u32(&h, 16))?;
    Ok(OptionReply { option, kind, data })
}

/// The data of NBD_OPT_GO / NBD_OPT_INFO: the name and the info types asked for.
pub fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// What to negotiate.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub structured: bool,
    /// Also ask for `base:allocation` (needs `structured`).
    pub block_status: bool,
}

/// Negotiation failed with an option error reply (as opposed to a socket error); find it with
/// [`refused`].
#[derive(Debug)]
pub struct OptionRefused {
    pub option: u32,
    pub kind: u32,
    pub message: String,
}

impl std::fmt::Display for OptionRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "option {} refused with {:#x}: {:?}",
            self.option, self.kind, self.message
        )
    }
}

impl std::error::Error for OptionRefused {}

/// The option error inside a negotiation error, if that is what it was.
pub fn refused(e: &io::Error) -> Option<&OptionRefused> {
    e.get_ref()?.downcast_ref::<OptionRefused>()
}

/// A request sent and not yet fully answered.
#[derive(Debug)]
struct Pending {
    kind: u16,
    offset_bytes: u64,
    len_bytes: u32,
    /// Chunks seen so far (structured replies).
    reply: Reply,
    /// Bytes of read data placed by data or hole chunks.
    covered_bytes: u64,
}

/// A complete answer to one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reply {
    pub cookie: u64,
    /// 0, or the first error the server reported for this request.
    pub error: u32,
    /// Error message of a structured error chunk.
    pub message: String,
    /// Read data (zero-filled where the server sent holes).
    pub data: Vec<u8>,
    /// BLOCK_STATUS descriptors: (length, flags), with the context id they were sent for.
    pub extents: Vec<(u32, u32)>,
    pub context_id: Option<u32>,
    /// Whether it came as structured chunks.
    pub structured: bool,
    pub chunks: u32,
}

/// A negotiated connection in the transmission phase.
pub struct Client {
    pub stream: Stream,
    pub size_bytes: u64,
    pub tx_flags: u16,
    pub structured: bool,
    pub meta_context_id: Option<u32>,
    /// Block sizes from NBD_INFO_BLOCK_SIZE, if sent: (minimum, preferred, maximum).
    pub block_sizes: Option<(u32, u32, u32)>,
    pending: HashMap<u64, Pending>,
    next_cookie: u64,
}

impl Client {
    /// Connects and negotiates `export` with NBD_OPT_GO. An option refused by the server is an
    /// `io::Error` whose inner error is [`OptionRefused`].
    pub fn connect(ep: &Endpoint, export: &str, o: Options) -> io::Result<Client> {
        let mut s = Stream::connect(ep)?;
        let hflags = greet(&mut s)?;
        if hflags & handshake_flag::FIXED_NEWSTYLE == 0 {
            return Err(bad("server is not fixed newstyle".into()));
        }
        let mut cflags = client_flag::FIXED_NEWSTYLE;
        if hflags & handshake_flag::NO_ZEROES != 0 {
            cflags |= client_flag::NO_ZEROES;
        }
        send_client_flags(&mut s, cflags)?;
        Self::negotiate(s, export, o)
    }

    /// Negotiates on a stream whose greeting and client flags are already done.
    pub fn negotiate(mut s: Stream, export: &str, o: Options) -> io::Result<Client> {
        let mut structured = false;
        if o.structured {
            send_option(&mut s, opt::STRUCTURED_REPLY, &[])?;
            let r = expect_ok(read_option_reply(&mut s)?, opt::STRUCTURED_REPLY)?;
            if r.kind != rep::ACK {
                return Err(bad(format!("STRUCTURED_REPLY answered with {:#x}", r.kind)));
            }
            structured = true;
        }
        let meta_context_id = if o.block_status {
            Some(set_meta_context(&mut s, export)?)
        } else {
            None
        };
        send_option(&mut s, opt::GO, &go_data(export, &[info::BLOCK_SIZE]))?;
        let mut c = Client {
            stream: s,
            size_bytes: 0,
            tx_flags: 0,
            structured,
            meta_context_id,
            block_sizes: None,
            pending: HashMap::new(),
            next_cookie: 1,
        };
        c.read_go_replies()?;
        Ok(c)
    }

    fn read_go_replies(&mut self) -> io::Result<()> {
        let mut got_export = false;
        loop {
            let r = expect_ok(read_option_reply(&mut self.stream)?, opt::GO)?;
            match r.kind {
                rep::ACK if got_export => return Ok(()),
                rep::ACK => return Err(bad("GO acknowledged without NBD_INFO_EXPORT".into())),
                rep::INFO if r.data.len() >= 2 => match be_u16(&r.data, 0) {
                    info::EXPORT if r.data.len() == 12 => {
                        self.size_bytes = be_u64(&r.data, 2);
                        self.tx_flags = be_u16(&r.data, 10);
                        got_export = true;
                    }
                    info::BLOCK_SIZE if r.data.len() == 14 => {
                        self.block_sizes =
                            Some((be_u32(&r.data, 2), be_u32(&r.data, 6), be_u32(&r.data, 10)));
                    }
                    info::EXPORT | info::BLOCK_SIZE => {
                        return Err(bad(format!("NBD_REP_INFO of bad length {:?}", r.data)))
                    }
                    _ => {}
                },
                k => return Err(bad(format!("unexpected GO reply type {k:#x}"))),
            }
        }
    }

    fn cookie(&mut self) -> u64 {
        let c = self.next_cookie;
        // Spread cookies over all 64 bits so a server that truncates them is caught.
        // Multiplying by an odd constant is a bijection, so cookies never repeat.
        self.next_cookie += 1;
        c.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    /// Sends a request (and a WRITE's payload) without waiting; returns its cookie.
    pub fn send(
        &mut self,
        kind: u16,
        flags: u16,
        offset_bytes: u64,
        len_bytes: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let cookie = self.cookie();
        self.send_with_cookie(kind, flags, cookie, offset_bytes, len_bytes, payload)?;
        Ok(cookie)
    }

    pub fn send_with_cookie(
        &mut self,
        kind: u16,
        flags: u16,
        cookie: u64,
        offset_bytes: u64,
        len_bytes: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        assert!(
            !self.pending.contains_key(&cookie),
            "cookie {cookie:#x} is in flight"
        );
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&request_header(
            kind,
            flags,
            cookie,
            offset_bytes,
            len_bytes,
        ));
        b.extend_from_slice(payload);
        self.stream.write_all(&b)?;
        if kind != cmd::DISC {
            self.expect(kind, cookie, offset_bytes, len_bytes);
        }
        Ok(())
    }

    /// Records a request sent some other way (raw bytes on a clone of the stream), so its
    /// reply is recognised.
    pub fn expect(&mut self, kind: u16, cookie: u64, offset_bytes: u64, len_bytes: u32) {
        let reply = Reply {
            cookie,
            ..Reply::default()
        };
        let p = Pending {
            kind,
            offset_bytes,
            len_bytes,
            reply,
            covered_bytes: 0,
        };
        assert!(self.pending.insert(cookie, p).is_none(), "cookie in flight");
    }

    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Reads until some request is fully answered and returns that answer.
    pub fn recv(&mut self) -> io::Result<Reply> {
        loop {
            let mut magic = [0u8; 4];
            self.stream.read_exact(&mut magic)?;
            match u32::from_be_bytes(magic) {
                proto::SIMPLE_REPLY_MAGIC => return self.recv_simple(),
                proto::STRUCTURED_REPLY_MAGIC => {
                    if let Some(done) = self.recv_chunk()? {
                        return Ok(done);
                    }
                }
                m => return Err(bad(format!("reply magic {m:#010x}"))),
            }
        }
    }

    fn take_pending(&mut self, cookie: u64) -> io::Result<Pending> {
        self.pending.remove(&cookie).ok_or_else(|| {
            bad(format!(
                "reply for cookie {cookie:#x}, which is not in flight"
            ))
        })
    }

    fn recv_simple(&mut self) -> io::Result<Reply> {
        let mut h = [0u8; 12];
        self.stream.read_exact(&mut h)?;
        let error = be_u32(&h, 0);
        let cookie = be_u64(&h, 4);
        let p = self.take_pending(cookie)?;
        if self.structured && matches!(p.kind, cmd::READ | cmd::BLOCK_STATUS) && error == 0 {
            return Err(bad(format!(
                "simple success reply to command {} with structured replies on",
                p.kind
            )));
        }
        let mut r = p.reply;
        r.error = error;
        if p.kind == cmd::READ && error == 0 {
            r.data = read_vec(&mut self.stream, p.len_bytes)?;
        }
        Ok(r)
    }

    /// Reads one chunk; returns the reply if it was the last one of its request.
    fn recv_chunk(&mut self) -> io::Result<Option<Reply>> {
        if !self.structured {
            return Err(bad("structured reply chunk without negotiation".into()));
        }
        let mut h = [0u8; 16];
        self.stream.read_exact(&mut h)?;
        let flags = be_u16(&h, 0);
        let kind = be_u16(&h, 2);
        let cookie = be_u64(&h, 4);
        let payload = read_vec(&mut self.stream, be_u32(&h, 12))?;
        let mut p = self.take_pending(cookie)?;
        p.reply.structured = true;
        p.reply.chunks += 1;
        apply_chunk(&mut p, kind, &payload)?;
        if flags & REPLY_FLAG_DONE == 0 {
            self.pending.insert(cookie, p);
            return Ok(None);
        }
        let read_ok = p.kind == cmd::READ && p.reply.error == 0;
        if read_ok && p.covered_bytes != u64::from(p.len_bytes) {
            return Err(bad(format!(
                "read of {} bytes answered with {} bytes of chunks",
                p.len_bytes, p.covered_bytes
            )));
        }
        Ok(Some(p.reply))
    }

    /// Waits for the answer to `cookie`; other answers that arrive first are returned in
    /// `others` order of arrival.
    pub fn wait_for(&mut self, cookie: u64, others: &mut Vec<Reply>) -> io::Result<Reply> {
        loop {
            let r = self.recv()?;
            if r.cookie == cookie {
                return Ok(r);
            }
            others.push(r);
        }
    }

    /// Sends one request and waits for its answer (nothing else may be in flight).
    pub fn call(
        &mut self,
        kind: u16,
        flags: u16,
        offset_bytes: u64,
        len_bytes: u32,
        payload: &[u8],
    ) -> io::Result<Reply> {
        assert_eq!(self.pending.len(), 0, "call() with requests in flight");
        let c = self.send(kind, flags, offset_bytes, len_bytes, payload)?;
        let r = self.recv()?;
        assert_eq!(r.cookie, c);
        Ok(r)
    }

    pub fn read(&mut self, offset_bytes: u64, len_bytes: u32) -> io::Result<Result<Vec<u8>, u32>> {
        let r = self.call(cmd::READ, 0, offset_bytes, len_bytes, &[])?;
        Ok(if r.error == 0 {
            Ok(r.data)
        } else {
            Err(r.error)
        })
    }

    pub fn write(&mut self, offset_bytes: u64, data: &[u8], flags: u16) -> io::Result<u32> {
        let r = self.call(cmd::WRITE, flags, offset_bytes, data.len() as u32, data)?;
        Ok(r.error)
    }

    pub fn simple(
        &mut self,
        kind: u16,
        flags: u16,
        offset_bytes: u64,
        len_bytes: u32,
    ) -> io::Result<u32> {
        Ok(self.call(kind, flags, offset_bytes, len_bytes, &[])?.error)
    }

    pub fn block_status(
        &mut self,
        offset_bytes: u64,
        len_bytes: u32,
        flags: u16,
    ) -> io::Result<Result<Vec<(u32, u32)>, u32>> {
        let r = self.call(cmd::BLOCK_STATUS, flags, offset_bytes, len_bytes, &[])?;
        if r.error != 0 {
            return Ok(Err(r.error));
        }
        if r.context_id != self.meta_context_id {
            return Err(bad(format!(
                "block status for context {:?}, negotiated {:?}",
                r.context_id, self.meta_context_id
            )));
        }
        Ok(Ok(r.extents))
    }

    /// Sends NBD_CMD_DISC: the server answers what is in flight, then closes.
    pub fn send_disc(&mut self) -> io::Result<()> {
        let c = self.cookie();
        self.send_with_cookie(cmd::DISC, 0, c, 0, 0, &[])
    }
}

/// Encodes a request header (28 bytes, big-endian).
pub fn request_header(
    kind: u16,
    flags: u16,
    cookie: u64,
    offset_bytes: u64,
    len_bytes: u32,
) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset_bytes.to_be_bytes());
    b[24..28].copy_from_slice(&len_bytes.to_be_bytes());
    b
}

/// Turns an option error reply into an `io::Error` carrying [`OptionRefused`].
fn expect_ok(r: OptionReply, option: u32) -> io::Result<OptionReply> {
    if r.option != option {
        return Err(bad(format!(
            "reply for option {} while negotiating {option}",
            r.option
        )));
    }
    if r.kind & rep::ERROR_BIT != 0 {
        let message = String::from_utf8_lossy(&r.data).into_owned();
        let refused = OptionRefused {
            option,
            kind: r.kind,
            message,
        };
        return Err(io::Error::other(refused));
    }
    Ok(r)
}

/// Asks for `base:allocation` on `export`; returns its context id.
fn set_meta_context(s: &mut Stream, export: &str) -> io::Result<u32> {
    let q = proto::BASE_ALLOCATION.as_bytes();
    let mut d = Vec::new();
    d.extend_from_slice(&(export.len() as u32).to_be_bytes());
    d.extend_from_slice(export.as_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&(q.len() as u32).to_be_bytes());
    d.extend_from_slice(q);
    send_option(s, opt::SET_META_CONTEXT, &d)?;
    let mut id = None;
    loop {
        let r = expect_ok(read_option_reply(s)?, opt::SET_META_CONTEXT)?;
        match r.kind {
            rep::META_CONTEXT if r.data.len() >= 4 => {
                let name = String::from_utf8_lossy(&r.data[4..]).into_owned();
                if name != proto::BASE_ALLOCATION {
                    return Err(bad(format!("meta context {name:?} was not asked for")));
                }
                id = Some(be_u32(&r.data, 0));
            }
            rep::ACK => {
                return id.ok_or_else(|| bad("base:allocation was not granted".into()));
            }
            k => return Err(bad(format!("SET_META_CONTEXT reply type {k:#x}"))),
        }
    }
}

/// Folds one structured chunk into its request's reply, checking it lies inside the request.
fn apply_chunk(p: &mut Pending, kind: u16, payload: &[u8]) -> io::Result<()> {
    let r = &mut p.reply;
    match kind {
        reply_type::NONE => {}
        reply_type::OFFSET_DATA | reply_type::OFFSET_HOLE => {
            if p.kind != cmd::READ || payload.len() < 8 {
                return Err(bad(format!("data chunk {kind} for command {}", p.kind)));
            }
            let off = be_u64(payload, 0);
            let len = if kind == reply_type::OFFSET_DATA {
                (payload.len() - 8) as u64
            } else if payload.len() == 12 {
                u64::from(be_u32(payload, 8))
            } else {
                return Err(bad("hole chunk of bad length".into()));
            };
            let start = off
                .checked_sub(p.offset_bytes)
                .filter(|s| s + len <= u64::from(p.len_bytes))
                .ok_or_else(|| bad(format!("chunk at {off}+{len} outside the request")))?;
            if r.data.is_empty() {
                r.data = vec![0u8; p.len_bytes as usize];
            }
            let dst = &mut r.data[start as usize..(start + len) as usize];
            if kind == reply_type::OFFSET_DATA {
                dst.copy_from_slice(&payload[8..]);
            } else {
                dst.fill(0);
            }
            p.covered_bytes += len;
        }
        reply_type::BLOCK_STATUS => {
            if p.kind != cmd::BLOCK_STATUS
                || payload.len() < 4
                || !(payload.len() - 4).is_multiple_of(8)
            {
                return Err(bad(format!("block status chunk for command {}", p.kind)));
            }
            r.context_id = Some(be_u32(payload, 0));
            for d in payload[4..].chunks(8) {
                r.extents.push((be_u32(d, 0), be_u32(d, 4)));
            }
        }
        k if k & 0x8000 != 0 => {
            if payload.len() < 6 {
                return Err(bad("error chunk too short".into()));
            }
            let error = be_u32(payload, 0);
            let msg_len = usize::from(be_u16(payload, 4));
            let msg = payload
                .get(6..6 + msg_len)
                .ok_or_else(|| bad("error message beyond the chunk".into()))?;
            if error == 0 {
                return Err(bad("error chunk with error 0".into()));
            }
            if r.error == 0 {
                r.error = error;
                r.message = String::from_utf8_lossy(msg).into_owned();
            }
        }
        k => return Err(bad(format!("unknown reply chunk type {k}"))),
    }
    Ok(())
}
