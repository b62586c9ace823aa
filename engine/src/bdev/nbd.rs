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
//! Constants follow the NBD protocol (NetworkBlockDevice/nbd, doc/proto.md).

use super::{Bdev, BdevChannel, BdevError, BdevInfo, IoOp, IoRequest};
use crate::dma::IoBuf;
use crate::reactor::{IoCtx, OwnerId};
use crossbeam_queue::ArrayQueue;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1;
const TFLAG_READ_ONLY: u16 = 1 << 1;
const TFLAG_SEND_TRIM: u16 = 1 << 5;
const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

/// Block size the client enforces (the NBD minimum).
pub const NBD_BLOCK_BYTES: u32 = 512;
/// Largest single request (the NBD limit most servers accept).
pub const NBD_IO_MAX_BYTES: u32 = 32 << 20;
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

struct Conn {
    sq: ArrayQueue<Job>,
    stop: AtomicBool,
}

/// A remote NBD export.
pub struct NbdBdev {
    info: BdevInfo,
    conn: Arc<Conn>,
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

fn read_u16(s: &mut TcpStream) -> std::io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}
fn read_u32(s: &mut TcpStream) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(s: &mut TcpStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

/// Runs the fixed-newstyle handshake with NBD_OPT_GO; returns (size, transmission flags).
fn handshake(s: &mut TcpStream, name: &str, export: &str) -> Result<(u64, u16), BdevError> {
    let io = |source| BdevError::Io {
        name: name.into(),
        what: "NBD handshake",
        source,
    };
    let (magic, opt_magic) = (read_u64(s).map_err(io)?, read_u64(s).map_err(io)?);
    if magic != NBDMAGIC || opt_magic != IHAVEOPT {
        return Err(proto(
            name,
            "NBD handshake",
            format!("not a newstyle NBD server (magic {magic:#x} {opt_magic:#x})"),
        ));
    }
    let flags = read_u16(s).map_err(io)?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(proto(
            name,
            "NBD handshake",
            "server lacks fixed newstyle".into(),
        ));
    }
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES));
    let mut msg = client_flags.to_be_bytes().to_vec();
    msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
    msg.extend_from_slice(&OPT_GO.to_be_bytes());
    msg.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
    msg.extend_from_slice(&(export.len() as u32).to_be_bytes());
    msg.extend_from_slice(export.as_bytes());
    msg.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&msg).map_err(io)?;
    let mut export_info = None;
    loop {
        let magic = read_u64(s).map_err(io)?;
        let (_opt, kind, len) = (
            read_u32(s).map_err(io)?,
            read_u32(s).map_err(io)?,
            read_u32(s).map_err(io)?,
        );
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).map_err(io)?;
        if magic != REPLY_MAGIC_OPT {
            return Err(proto(
                name,
                "NBD handshake",
                format!("bad option reply magic {magic:#x}"),
            ));
        }
        if kind & REP_FLAG_ERROR != 0 {
            let text = String::from_utf8_lossy(&data).into_owned();
            return Err(proto(
                name,
                "NBD_OPT_GO",
                format!("export '{export}' refused (reply {kind:#x}): {text}"),
            ));
        }
        if kind == REP_INFO
            && data.len() >= 12
            && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT
        {
            let size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
            let tflags = u16::from_be_bytes([data[10], data[11]]);
            export_info = Some((size, tflags));
        }
        if kind == REP_ACK {
            break;
        }
    }
    export_info.ok_or_else(|| proto(name, "NBD_OPT_GO", "server sent no export info".into()))
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
        let conn = Arc::new(Conn {
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
                can_trim: tflags & TFLAG_SEND_TRIM != 0,
                can_write_zeroes: tflags & TFLAG_SEND_WRITE_ZEROES != 0,
                read_only: tflags & TFLAG_READ_ONLY != 0,
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
fn serve(mut s: TcpStream, conn: &Conn) {
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
        drop(send_header(&mut s, CMD_DISC, 0, cookie + 1, 0, 0));
    }
}

fn send_header(
    s: &mut TcpStream,
    cmd: u16,
    flags: u16,
    cookie: u64,
    offset: u64,
    len: u32,
) -> std::io::Result<()> {
    let mut h = [0u8; 28];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&flags.to_be_bytes());
    h[6..8].copy_from_slice(&cmd.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&len.to_be_bytes());
    s.write_all(&h)
}

/// Sends one request and reads its simple reply; returns the completion result.
fn exchange(s: &mut TcpStream, job: &Job, cookie: u64) -> std::io::Result<i32> {
    let cmd = match job.op {
        IoOp::Read => CMD_READ,
        IoOp::Write => CMD_WRITE,
        IoOp::Flush => CMD_FLUSH,
        IoOp::Trim => CMD_TRIM,
        IoOp::WriteZeroes => CMD_WRITE_ZEROES,
    };
    let flags = if job.fua { CMD_FLAG_FUA } else { 0 };
    let len = if job.op == IoOp::Flush {
        0
    } else {
        job.len_bytes
    };
    send_header(s, cmd, flags, cookie, job.offset_bytes, len)?;
    if job.op == IoOp::Write {
        let b = job.buf.expect("validated write has a buffer");
        // SAFETY: the submitter lent this buffer (at least len_bytes, validated) to the request
        // until its completion, which this thread posts only after this copy.
        let data = unsafe { b.as_slice(job.len_bytes) };
        s.write_all(data)?;
    }
    let (magic, error, got) = (read_u32(s)?, read_u32(s)?, read_u64(s)?);
    if magic != SIMPLE_REPLY_MAGIC || got != cookie {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad NBD reply: magic {magic:#x} cookie {got} (expected {cookie})"),
        ));
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
    conn: Arc<Conn>,
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
