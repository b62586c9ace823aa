//! The NBD client bdev: a remote export reached over one TCP connection (fixed newstyle
//! handshake, `NBD_OPT_GO`, simple replies), served by a dedicated I/O thread.
//!
//! Channels never touch the socket. A channel pushes each request onto the connection's
//! bounded submission queue and wakes the I/O thread; the thread sends it, reads the reply
//! (copying data between the caller's buffer and the socket: the buffer stays valid until the
//! completion by the engine's contract), and pushes the result onto that channel's bounded
//! completion queue, which the channel drains in its `poll` hook. One request is on the wire at
//! a time: this is the simplest correct client, not a fast one.
//!
//! The wire format is the NBD frontend's: every constant, request header, reply header and
//! option header comes from [`crate::frontend::nbd::proto`], the one place that encodes and
//! decodes NBD messages.

use super::{Bdev, BdevChannel, BdevError, BdevInfo, IoOp, IoRequest};
use crate::dma::IoBuf;
use crate::frontend::nbd::proto::{
    self as wire, cmd, cmd_flag, handshake_flag, info, opt, rep, tx_flag, OptionHeader,
    OptionReplyHeader, GREETING_BYTES, IHAVEOPT, INFO_EXPORT_BYTES, NBDMAGIC, OPTION_HEADER_BYTES,
    OPTION_REPLY_HEADER_BYTES, REQUEST_BYTES, SIMPLE_REPLY_BYTES,
};
use crate::reactor::{IoCtx, OwnerId};
use crossbeam_queue::ArrayQueue;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Block size the client enforces (the NBD minimum).
pub const NBD_BLOCK_BYTES: u32 = 512;
/// Largest single request: the payload limit of the NBD frontend, which most servers share.
pub const NBD_IO_MAX_BYTES: u32 = wire::PAYLOAD_MAX_BYTES;
/// Requests all channels may have queued for the I/O thread; a full queue fails the request
/// with EAGAIN at once.
pub const NBD_SUBMIT_QUEUE_MAX: usize = 1024;
/// Completions one channel can hold; a channel never accepts more requests than this.
pub const NBD_CHANNEL_DEPTH_MAX: usize = 256;
/// How long the idle I/O thread sleeps before re-checking for work (it is also unparked).
const IDLE_PARK: Duration = Duration::from_millis(10);

struct Job {
    op: IoOp,
    offset_bytes: u64,
    len_bytes: u32,
    buf: Option<IoBuf>,
    fua: bool,
    owner: OwnerId,
    tag: u32,
    done: Arc<ArrayQueue<(OwnerId, u32, i32)>>,
}

/// The bdev's side of its connection to the remote export: the jobs queued for the I/O thread
/// that owns the socket, and the flag that stops that thread.
struct RemoteConn {
    sq: ArrayQueue<Job>,
    stop: AtomicBool,
}

/// A remote NBD export.
pub struct NbdBdev {
    info: BdevInfo,
    conn: Arc<RemoteConn>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for NbdBdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdBdev").field("info", &self.info).finish()
    }
}

fn proto(name: &str, what: &'static str, msg: String) -> BdevError {
    BdevError::Io {
        name: name.into(),
        what,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, msg),
    }
}

/// Runs the fixed-newstyle handshake with NBD_OPT_GO; returns (size, transmission flags).
fn handshake(s: &mut TcpStream, name: &str, export: &str) -> Result<(u64, u16), BdevError> {
    let io = |source| BdevError::Io {
        name: name.into(),
        what: "NBD handshake",
        source,
    };
    let mut greeting = [0u8; GREETING_BYTES];
    s.read_exact(&mut greeting).map_err(io)?;
    let magic = u64::from_be_bytes(greeting[0..8].try_into().expect("8 bytes"));
    let opt_magic = u64::from_be_bytes(greeting[8..16].try_into().expect("8 bytes"));
    if magic != NBDMAGIC || opt_magic != IHAVEOPT {
        return Err(proto(
            name,
            "NBD handshake",
            format!("not a newstyle NBD server (magic {magic:#x} {opt_magic:#x})"),
        ));
    }
    let flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    if flags & handshake_flag::FIXED_NEWSTYLE == 0 {
        return Err(proto(
            name,
            "NBD handshake",
            "server lacks fixed newstyle".into(),
        ));
    }
    let client_flags =
        u32::from(handshake_flag::FIXED_NEWSTYLE | (flags & handshake_flag::NO_ZEROES));
    let data = wire::encode_info_request(export.as_bytes(), &[]);
    let mut header = [0u8; OPTION_HEADER_BYTES];
    wire::encode_option_header(
        &OptionHeader {
            option: opt::GO,
            len_bytes: data.len() as u32,
        },
        &mut header,
    );
    let mut msg = client_flags.to_be_bytes().to_vec();
    msg.extend_from_slice(&header);
    msg.extend_from_slice(&data);
    s.write_all(&msg).map_err(io)?;
    let mut export_info = None;
    loop {
        let OptionReplyHeader {
            kind, len_bytes, ..
        } = read_option_reply(s, name)?;
        let mut data = vec![0u8; len_bytes as usize];
        s.read_exact(&mut data).map_err(io)?;
        if kind & rep::ERROR_BIT != 0 {
            let text = String::from_utf8_lossy(&data).into_owned();
            return Err(proto(
                name,
                "NBD_OPT_GO",
                format!("export '{export}' refused (reply {kind:#x}): {text}"),
            ));
        }
        if kind == rep::INFO
            && data.len() >= INFO_EXPORT_BYTES
            && u16::from_be_bytes([data[0], data[1]]) == info::EXPORT
        {
            let size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
            let tflags = u16::from_be_bytes([data[10], data[11]]);
            export_info = Some((size, tflags));
        }
        if kind == rep::ACK {
            break;
        }
    }
    export_info.ok_or_else(|| proto(name, "NBD_OPT_GO", "server sent no export info".into()))
}

/// Reads and decodes one option reply header.
fn read_option_reply(s: &mut TcpStream, name: &str) -> Result<OptionReplyHeader, BdevError> {
    let mut b = [0u8; OPTION_REPLY_HEADER_BYTES];
    s.read_exact(&mut b).map_err(|source| BdevError::Io {
        name: name.into(),
        what: "NBD handshake",
        source,
    })?;
    wire::decode_option_reply_header(&b).map_err(|e| proto(name, "NBD handshake", e.to_string()))
}

impl NbdBdev {
    /// Connects to `addr` ("host:port") and opens `export`.
    pub fn connect(name: &str, addr: &str, export: &str) -> Result<NbdBdev, BdevError> {
        let mut s = TcpStream::connect(addr).map_err(|source| BdevError::Open {
            path: format!("nbd://{addr}/{export}"),
            source,
        })?;
        drop(s.set_nodelay(true));
        let (size_bytes, tflags) = handshake(&mut s, name, export)?;
        let size_bytes = size_bytes - size_bytes % u64::from(NBD_BLOCK_BYTES);
        super::check_geometry(name, size_bytes, NBD_BLOCK_BYTES)?;
        let conn = Arc::new(RemoteConn {
            sq: ArrayQueue::new(NBD_SUBMIT_QUEUE_MAX),
            stop: AtomicBool::new(false),
        });
        let c = conn.clone();
        let thread = std::thread::Builder::new()
            .name(format!("cairn-nbd-{name}"))
            .spawn(move || serve(s, &c))
            .map_err(|source| BdevError::Io {
                name: name.into(),
                what: "spawning the NBD I/O thread",
                source,
            })?;
        Ok(NbdBdev {
            info: BdevInfo {
                name: name.into(),
                block_size_bytes: NBD_BLOCK_BYTES,
                size_bytes,
                max_io_bytes: NBD_IO_MAX_BYTES,
                buf_align_bytes: 1,
                can_trim: tflags & tx_flag::SEND_TRIM != 0,
                can_write_zeroes: tflags & tx_flag::SEND_WRITE_ZEROES != 0,
                read_only: tflags & tx_flag::READ_ONLY != 0,
            },
            conn,
            thread: Some(thread),
        })
    }
}

impl Drop for NbdBdev {
    fn drop(&mut self) {
        self.conn.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            drop(t.join());
        }
    }
}

/// The I/O thread: one request on the wire at a time until stopped; after a socket error
/// every request fails with EIO.
fn serve(mut s: TcpStream, conn: &RemoteConn) {
    let mut broken = false;
    let mut cookie = 0u64;
    loop {
        let Some(job) = conn.sq.pop() else {
            if conn.stop.load(Ordering::Acquire) {
                break;
            }
            std::thread::park_timeout(IDLE_PARK);
            continue;
        };
        cookie += 1;
        let res = if broken {
            -libc::EIO
        } else {
            match exchange(&mut s, &job, cookie) {
                Ok(res) => res,
                Err(e) => {
                    tracing::error!(error = %e, "NBD connection failed; failing all requests");
                    broken = true;
                    -libc::EIO
                }
            }
        };
        let pushed = job.done.push((job.owner, job.tag, res));
        debug_assert!(
            pushed.is_ok(),
            "a channel accepts at most its completion capacity"
        );
    }
    if !broken {
        drop(send_header(&mut s, cmd::DISC, 0, cookie + 1, 0, 0));
    }
}

fn send_header(
    s: &mut TcpStream,
    kind: u16,
    flags: u16,
    cookie: u64,
    offset_bytes: u64,
    len_bytes: u32,
) -> std::io::Result<()> {
    let mut h = [0u8; REQUEST_BYTES];
    wire::encode_request(
        &wire::Request {
            flags,
            kind,
            cookie,
            offset_bytes,
            len_bytes,
        },
        &mut h,
    );
    s.write_all(&h)
}

/// Sends one request and reads its simple reply; returns the completion result.
fn exchange(s: &mut TcpStream, job: &Job, cookie: u64) -> std::io::Result<i32> {
    let kind = match job.op {
        IoOp::Read => cmd::READ,
        IoOp::Write => cmd::WRITE,
        IoOp::Flush => cmd::FLUSH,
        IoOp::Trim => cmd::TRIM,
        IoOp::WriteZeroes => cmd::WRITE_ZEROES,
    };
    let flags = if job.fua { cmd_flag::FUA } else { 0 };
    let len = if job.op == IoOp::Flush {
        0
    } else {
        job.len_bytes
    };
    send_header(s, kind, flags, cookie, job.offset_bytes, len)?;
    if job.op == IoOp::Write {
        let b = job.buf.expect("validated write has a buffer");
        // SAFETY: the submitter lent this buffer (at least len_bytes, validated) to the request
        // until its completion, which this thread posts only after this copy.
        let data = unsafe { b.as_slice(job.len_bytes) };
        s.write_all(data)?;
    }
    let mut reply = [0u8; SIMPLE_REPLY_BYTES];
    s.read_exact(&mut reply)?;
    let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let wire::SimpleReply { error, cookie: got } =
        wire::decode_simple_reply(&reply).map_err(|e| invalid(e.to_string()))?;
    if got != cookie {
        return Err(invalid(format!(
            "NBD reply for cookie {got}, expected {cookie}"
        )));
    }
    if error != 0 {
        return Ok(-(error as i32));
    }
    if job.op == IoOp::Read {
        let b = job.buf.expect("validated read has a buffer");
        // SAFETY: as for writes; nobody else touches the buffer until the completion.
        let data = unsafe { b.as_mut_slice(job.len_bytes) };
        s.read_exact(data)?;
    }
    Ok(match job.op {
        IoOp::Read | IoOp::Write => job.len_bytes as i32,
        _ => 0,
    })
}

impl Bdev for NbdBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn open_channel(&self, _io: &mut IoCtx) -> Result<Box<dyn BdevChannel>, BdevError> {
        Ok(Box::new(NbdChannel {
            conn: self.conn.clone(),
            thread: self.thread.as_ref().map(|t| t.thread().clone()),
            done: Arc::new(ArrayQueue::new(NBD_CHANNEL_DEPTH_MAX)),
            in_flight: 0,
        }))
    }
}

struct NbdChannel {
    conn: Arc<RemoteConn>,
    thread: Option<std::thread::Thread>,
    done: Arc<ArrayQueue<(OwnerId, u32, i32)>>,
    in_flight: usize,
}

impl BdevChannel for NbdChannel {
    fn submit(&mut self, io: &mut IoCtx, req: IoRequest) {
        if self.in_flight >= NBD_CHANNEL_DEPTH_MAX {
            io.post(req.owner, req.tag, -libc::EAGAIN);
            return;
        }
        let job = Job {
            op: req.op,
            offset_bytes: req.offset_bytes,
            len_bytes: req.len_bytes,
            buf: req.buf,
            fua: req.fua,
            owner: req.owner,
            tag: req.tag,
            done: self.done.clone(),
        };
        match self.conn.sq.push(job) {
            Ok(()) => {
                self.in_flight += 1;
                if let Some(t) = &self.thread {
                    t.unpark();
                }
            }
            Err(job) => io.post(job.owner, job.tag, -libc::EAGAIN),
        }
    }

    fn poll(&mut self, io: &mut IoCtx) -> usize {
        let mut n = 0;
        while let Some((owner, tag, res)) = self.done.pop() {
            io.post(owner, tag, res);
            self.in_flight -= 1;
            n += 1;
        }
        n
    }

    fn next_deadline(&self) -> Option<Instant> {
        (self.in_flight > 0).then(Instant::now)
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }
}
