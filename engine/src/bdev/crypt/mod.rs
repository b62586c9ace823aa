//! The crypt bdev: AES-256-XTS encryption at rest, stacked on a volume or a nexus.
//!
//! It sits where a client's I/O enters (an NBD export, a perf or libcairn queue), above
//! replication, so everything below it (the nexus's fan-out, the replica links, every replica's
//! pool file) carries only ciphertext. It reaches the device below through that device's own
//! channel on the same core ([`IoCtx::submit_to`]), never a private one, so a volume's pool
//! messages and barriers reach every request in flight as they do for an unencrypted export.
//!
//! Layout on the inner device: the encryption header ([`header`], 4 KiB, in the clear) and
//! then the client's data, shifted by the header. The data unit is fixed at
//! [`CRYPT_DATA_UNIT_BYTES`] (4 KiB), whatever the inner block size, and its tweak is its
//! number counted from the start of the client's data (client offset / 4096). Since the unit
//! and its number depend only on the client's offset, a snapshot, a clone, a replica read on
//! another node or a volume moved to another pool decrypts the same.
//!
//! Buffers: a write is encrypted into memory of its own (the caller's buffer may still be read
//! by the caller, and a nexus fans the same buffer out to every replica, so it must be
//! ciphertext before it leaves here and the plaintext is never touched): a buffer of the
//! core's DMA pool, registered with io_uring so the write goes down as `WRITE_FIXED` like a
//! plain one, while more than a reserve of the pool stays free; else a slot of this channel's
//! own bounce memory (an O_DIRECT `WRITE`, whose pages the kernel pins per request). The
//! reserve and the fallback keep the crypt layer from ever waiting on the pool: an NBD
//! connection holds pool buffers for received payloads until their writes complete, so a
//! layer below that waited for one could wait forever. A read
//! lands in the caller's buffer, which is the read's destination and so ours until we post
//! it, and is decrypted there in place after it completes. A data unit that reads back as all
//! zeros (never written, trimmed or write-zeroed below) is returned as zeros rather than
//! deciphered, so thin volumes, BLOCK_STATUS's zero extents and WRITE_ZEROES keep their
//! meaning; a real ciphertext unit is all zeros with probability 2^-32768.
//!
//! Limits: pool buffers only while more than `1/CRYPT_POOL_RESERVE_SHARE` of the pool stays
//! free; beyond that `CRYPT_BOUNCE_SLOTS` writes per channel hold bounce memory at once, and
//! more wait in the channel (back-pressure, no error) until one completes. Nothing is
//! allocated per I/O.

pub mod header;
#[cfg(target_arch = "x86_64")]
mod vaes;
pub mod xts;

use super::{Bdev, BdevChannel, BdevError, BdevInfo, Extent, IoOp, IoRequest};
use crate::dma::{DmaBuf, IoBuf, Region};
use crate::reactor::{BdevId, IoCtx, OwnerId};
use crate::{BdevHandle, Engine, EngineError, IoError};
use header::{Found, CRYPT_HEADER_BYTES};
use std::collections::VecDeque;
use std::sync::Arc;
pub use xts::{CryptKey, KeyError, Xts, XtsBackend, CRYPT_KEY_BYTES};

/// Bytes per XTS data unit (one tweak each). Fixed: changing it changes every ciphertext.
pub const CRYPT_DATA_UNIT_BYTES: u32 = 4096;

/// Largest request the crypt bdev takes (bounce slots are this big); larger ones are split
/// by the frontends, which read `max_io_bytes`.
pub const CRYPT_IO_MAX_BYTES: u32 = 128 << 10;

/// Writes per channel that hold bounce memory at once (`CRYPT_BOUNCE_SLOTS` ×
/// `CRYPT_IO_MAX_BYTES` of address space per core, touched only as far as writes reach).
/// More wait in the channel until a write completes.
pub const CRYPT_BOUNCE_SLOTS: usize = 128;

/// Data units a channel enciphers or deciphers per poll of its reactor before it lets the
/// reactor run its other work (at least one request's, whatever its size). A burst of read
/// completions deciphered at once keeps every one of them from its owner until the last is
/// done, and a burst of writes enciphered at once keeps every one of them from the device: in
/// slices, each request moves on as soon as its own data is ready, and the device works while
/// the next is ciphered. One unit per poll (one request) measured best on a virtio disk
/// (docs/encryption.md, "Cost"): 8 gave 0.93x of plain random reads, 32 gave 0.78x.
const CRYPT_POLL_UNITS: u32 = 1;

/// A write takes a buffer of the core's DMA pool only while more than 1/this of the pool
/// stays free for everyone else; otherwise it takes a bounce slot.
const CRYPT_POOL_RESERVE_SHARE: u32 = 4;

/// Request slots and waiting writes a channel holds without allocating; more grow the tables.
const CRYPT_SLOTS_PREALLOC: usize = 256;

/// Why a device could not be opened encrypted.
#[derive(Debug, thiserror::Error)]
pub enum CryptError {
    #[error(
        "volume '{volume}': wrong key (its encryption header's key check value does not match)"
    )]
    WrongKey { volume: String },
    #[error(
        "volume '{volume}' holds data but is not encrypted ({why}); refusing to encrypt over it"
    )]
    NotEncrypted { volume: String, why: String },
    #[error("volume '{volume}' is encrypted; export it with its key (--key-file or --key-env)")]
    KeyNeeded { volume: String },
    #[error(
        "volume '{volume}' is never-written and opened read-only: no encryption header to check the key against"
    )]
    ReadOnlyBlank { volume: String },
    #[error("volume '{volume}': block size {block_size_bytes} does not divide the {CRYPT_DATA_UNIT_BYTES}-byte data unit, or the volume is smaller than two units")]
    Geometry {
        volume: String,
        block_size_bytes: u32,
    },
    #[error("volume '{volume}': {what}: {source}")]
    Io {
        volume: String,
        what: &'static str,
        source: IoError,
    },
    #[error("volume '{volume}': drawing a salt: {source}")]
    Random {
        volume: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Opens `inner` (a volume, snapshot or nexus already in `engine`) encrypted with `key` and
/// registers the result as the bdev `name`. A blank device gets a fresh header when `format`
/// is true (a read-only export passes false, so it never writes); one with a header must
/// match the key. `volume` names it in errors. The caller keeps `inner` registered until it
/// has removed the returned bdev.
pub fn attach(
    engine: &Engine,
    inner: &BdevHandle,
    name: &str,
    volume: &str,
    key: &CryptKey,
    format: bool,
) -> Result<BdevHandle, CryptError> {
    let info = inner.info();
    let bs = info.block_size_bytes;
    if !CRYPT_DATA_UNIT_BYTES.is_multiple_of(bs)
        || info.size_bytes < 2 * u64::from(CRYPT_HEADER_BYTES)
    {
        return Err(CryptError::Geometry {
            volume: volume.into(),
            block_size_bytes: bs,
        });
    }
    let xts = Xts::new(key);
    let io = |what: &'static str| {
        let volume = volume.to_string();
        move |source| CryptError::Io {
            volume,
            what,
            source,
        }
    };
    let mut q = engine.queue(inner, engine.cores()[0], 1)?;
    let mut block = vec![0u8; CRYPT_HEADER_BYTES as usize];
    q.read_at(0, &mut block)
        .map_err(io("reading the encryption header"))?;
    match header::inspect(&xts, &block) {
        Found::Matches => {}
        Found::WrongKey => {
            return Err(CryptError::WrongKey {
                volume: volume.into(),
            })
        }
        Found::NotEncrypted { why } => {
            return Err(CryptError::NotEncrypted {
                volume: volume.into(),
                why,
            })
        }
        Found::Blank if info.read_only || !format => {
            return Err(CryptError::ReadOnlyBlank {
                volume: volume.into(),
            })
        }
        Found::Blank if data_beyond_header(engine.bdev(inner)?.as_ref()) => {
            return Err(CryptError::NotEncrypted {
                volume: volume.into(),
                why: "its first 4 KiB are zeros, but blocks after them hold data".into(),
            })
        }
        Found::Blank => {
            let salt = header::salt().map_err(|source| CryptError::Random {
                volume: volume.into(),
                source,
            })?;
            header::encode(&xts, &salt, &mut block);
            q.write_at(0, &block, true)
                .map_err(io("writing the encryption header"))?;
            tracing::info!(volume, "encryption header written (AES-256-XTS)");
        }
    }
    drop(q);
    tracing::info!(volume, backend = ?xts.backend(), "serving encrypted");
    let bdev = CryptBdev::new(name, engine.bdev(inner)?, inner.id(), xts);
    Ok(engine.add_bdev(Arc::new(bdev))?)
}

/// Whether a device whose first block is zeros holds data after it, as far as its
/// allocation map can tell: a plain volume written everywhere but its first 4 KiB must not be
/// formatted (its data would then read as deciphered garbage). Devices without a map (a
/// nexus, RAM) cannot tell, and pass on their first block alone (docs/encryption.md).
fn data_beyond_header(inner: &dyn Bdev) -> bool {
    if !inner.reports_allocation() {
        return false;
    }
    let end = inner.size_bytes();
    let mut at = u64::from(CRYPT_HEADER_BYTES);
    let mut extents = Vec::with_capacity(ALLOCATION_EXTENTS);
    while at < end {
        extents.clear();
        inner.allocation(at, end - at, ALLOCATION_EXTENTS, &mut extents);
        if extents.is_empty() {
            return false;
        }
        for e in &extents {
            if !e.zero {
                return true;
            }
            at += e.len_bytes;
        }
    }
    false
}

/// Extents asked for per call while looking for data past the header.
const ALLOCATION_EXTENTS: usize = 64;

/// Refuses to serve an encrypted device without its key: a plain export would hand out
/// ciphertext and let a client overwrite the encryption header. Devices smaller than the
/// header cannot hold one and pass.
pub fn refuse_plain(engine: &Engine, inner: &BdevHandle, volume: &str) -> Result<(), CryptError> {
    if inner.info().size_bytes < u64::from(CRYPT_HEADER_BYTES) {
        return Ok(());
    }
    let mut q = engine.queue(inner, engine.cores()[0], 1)?;
    let mut block = vec![0u8; CRYPT_HEADER_BYTES as usize];
    q.read_at(0, &mut block).map_err(|source| CryptError::Io {
        volume: volume.into(),
        what: "reading the first block",
        source,
    })?;
    if header::has_magic(&block) {
        return Err(CryptError::KeyNeeded {
            volume: volume.into(),
        });
    }
    Ok(())
}

/// The client's bytes on an inner device of `inner_bytes`: what follows the header, in whole
/// data units (a partial last unit could not be enciphered).
fn client_bytes(inner_bytes: u64) -> u64 {
    inner_bytes.saturating_sub(u64::from(CRYPT_HEADER_BYTES)) / u64::from(CRYPT_DATA_UNIT_BYTES)
        * u64::from(CRYPT_DATA_UNIT_BYTES)
}

/// A device whose data is encrypted on another bdev of the same engine.
pub struct CryptBdev {
    info: BdevInfo,
    inner: Arc<dyn Bdev>,
    inner_id: BdevId,
    xts: Arc<Xts>,
}

impl CryptBdev {
    /// Builds the bdev over `inner` (registered as `inner_id`) without touching its header:
    /// [`attach`] is the checked way in.
    fn new(name: &str, inner: Arc<dyn Bdev>, inner_id: BdevId, xts: Xts) -> CryptBdev {
        let i = inner.info();
        let info = BdevInfo {
            name: name.into(),
            block_size_bytes: CRYPT_DATA_UNIT_BYTES,
            size_bytes: client_bytes(i.size_bytes),
            max_io_bytes: i.max_io_bytes.min(CRYPT_IO_MAX_BYTES) / CRYPT_DATA_UNIT_BYTES
                * CRYPT_DATA_UNIT_BYTES,
            buf_align_bytes: i.buf_align_bytes,
            can_trim: i.can_trim,
            can_write_zeroes: i.can_write_zeroes,
            read_only: i.read_only,
        };
        CryptBdev {
            info,
            inner,
            inner_id,
            xts: Arc::new(xts),
        }
    }
}

impl Bdev for CryptBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn size_bytes(&self) -> u64 {
        client_bytes(self.inner.size_bytes())
    }

    fn reports_allocation(&self) -> bool {
        self.inner.reports_allocation()
    }

    fn open_channel(&self, io: &mut IoCtx) -> Result<Box<dyn BdevChannel>, BdevError> {
        let slot_bytes = self.info.max_io_bytes as usize;
        let bounce = Region::map(slot_bytes * CRYPT_BOUNCE_SLOTS, false, false)?;
        Ok(Box::new(CryptChannel {
            inner: self.inner_id,
            xts: self.xts.clone(),
            owner: io.register_owner(CRYPT_SLOTS_PREALLOC),
            slots: Vec::with_capacity(CRYPT_SLOTS_PREALLOC),
            free: Vec::with_capacity(CRYPT_SLOTS_PREALLOC),
            bounce,
            slot_bytes,
            bounce_free: (0..CRYPT_BOUNCE_SLOTS as u32).rev().collect(),
            waiting: VecDeque::with_capacity(CRYPT_SLOTS_PREALLOC),
            ciphered: 0,
        }))
    }

    fn allocation(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        extents_max: usize,
        out: &mut Vec<Extent>,
    ) {
        let shifted = offset_bytes + u64::from(CRYPT_HEADER_BYTES);
        self.inner.allocation(shifted, len_bytes, extents_max, out);
    }
}

/// Where a write's ciphertext lies while it is in flight below.
enum Bounce {
    /// A buffer of the core's DMA pool (registered with io_uring).
    Pool(DmaBuf),
    /// A slot of the channel's own bounce memory.
    Slot(u32),
}

/// A request in flight below: the client's request and, for a write, its ciphertext's memory.
struct Pending {
    req: IoRequest,
    bounce: Option<Bounce>,
}

struct CryptChannel {
    inner: BdevId,
    xts: Arc<Xts>,
    owner: OwnerId,
    slots: Vec<Option<Pending>>,
    free: Vec<u32>,
    bounce: Region,
    slot_bytes: usize,
    bounce_free: Vec<u32>,
    /// Writes waiting for a bounce slot or for the next poll's cipher budget, oldest first.
    waiting: VecDeque<IoRequest>,
    /// Data units ciphered since this channel's last poll (`CRYPT_POLL_UNITS` is the budget).
    ciphered: u32,
}

impl CryptChannel {
    fn park(&mut self, p: Pending) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(p);
                i
            }
            None => {
                self.slots.push(Some(p));
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// Sends `req` below with its offset past the header and our owner and slot on it; a
    /// write goes from `ciphertext` (`bounce`'s memory).
    fn forward(
        &mut self,
        io: &mut IoCtx,
        req: IoRequest,
        bounce: Option<Bounce>,
        ciphertext: Option<IoBuf>,
    ) {
        let mut below = req;
        below.offset_bytes += u64::from(CRYPT_HEADER_BYTES);
        below.owner = self.owner;
        below.tag = self.park(Pending { req, bounce });
        if ciphertext.is_some() {
            below.buf = ciphertext;
        }
        io.submit_to(self.inner, below);
    }

    /// Memory for one write's ciphertext: a pool buffer while the pool keeps its reserve,
    /// else a free bounce slot; `None` when neither is free.
    fn take_bounce(&mut self, io: &mut IoCtx, len_bytes: u32) -> Option<(Bounce, IoBuf)> {
        let pool = io.pool();
        let reserve = (pool.capacity() / CRYPT_POOL_RESERVE_SHARE) as usize;
        if len_bytes <= pool.buf_size_bytes() && pool.available() > reserve {
            if let Some(mut b) = pool.get() {
                let view = b.io_buf();
                return Some((Bounce::Pool(b), view));
            }
        }
        let s = self.bounce_free.pop()?;
        // SAFETY: slot `s` of the bounce region is ours alone until this write completes (it
        // left `bounce_free`), and the region lives as long as the channel, which closes only
        // with nothing in flight.
        let view = unsafe { self.bounce.io_buf(s as usize * self.slot_bytes, len_bytes) };
        Some((Bounce::Slot(s), view))
    }

    /// Encrypts a write into memory of its own and sends it on; false when none is free.
    fn try_write(&mut self, io: &mut IoCtx, req: IoRequest) -> bool {
        let Some((bounce, view)) = self.take_bounce(io, req.len_bytes) else {
            return false;
        };
        let buf = req.buf.expect("validated write has a buffer");
        // SAFETY: the submitter lent `len_bytes` bytes of `buf` to this request until we post
        // its completion, and a write's buffer is only read.
        let src = unsafe { buf.as_slice(req.len_bytes) };
        // SAFETY: `view` spans memory that `take_bounce` gave this write alone, which no
        // request uses until `forward` below.
        let dst = unsafe { view.as_mut_slice(req.len_bytes) };
        let unit = CRYPT_DATA_UNIT_BYTES as usize;
        let first = req.offset_bytes / u64::from(CRYPT_DATA_UNIT_BYTES);
        for (i, (s, d)) in src.chunks(unit).zip(dst.chunks_mut(unit)).enumerate() {
            self.xts.encrypt(u128::from(first + i as u64), s, d);
        }
        self.ciphered += req.len_bytes / CRYPT_DATA_UNIT_BYTES;
        self.forward(io, req, Some(bounce), Some(view));
        true
    }

    /// Deciphers a completed read in the client's buffer, unit by unit.
    fn decrypt_read(&self, req: &IoRequest) {
        let buf = req.buf.expect("validated read has a buffer");
        // SAFETY: the read's submitter lent this buffer to the request until we post it, and
        // the device below has completed, so nothing else writes it.
        let data = unsafe { buf.as_mut_slice(req.len_bytes) };
        let first = req.offset_bytes / u64::from(CRYPT_DATA_UNIT_BYTES);
        for (i, unit) in data.chunks_mut(CRYPT_DATA_UNIT_BYTES as usize).enumerate() {
            if !all_zero(unit) {
                self.xts
                    .decrypt_in_place(u128::from(first + i as u64), unit);
            }
        }
    }

    /// Posts a completion to its owner, deciphering a read first; returns the data units
    /// deciphered.
    fn complete(&mut self, io: &mut IoCtx, tag: u32, res: i32) -> u32 {
        self.free.push(tag);
        let p = self.slots[tag as usize]
            .take()
            .expect("completion for a free crypt slot");
        match p.bounce {
            Some(Bounce::Pool(b)) => io.pool().put(b),
            Some(Bounce::Slot(s)) => self.bounce_free.push(s),
            None => {}
        }
        let mut units = 0;
        if p.req.op == IoOp::Read && res >= 0 {
            self.decrypt_read(&p.req);
            units = p.req.len_bytes / CRYPT_DATA_UNIT_BYTES;
        }
        io.post(p.req.owner, p.req.tag, res);
        units
    }
}

/// Whether a data unit is all zeros, eight bytes at a time.
#[inline]
fn all_zero(unit: &[u8]) -> bool {
    unit.chunks_exact(8)
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
}

impl BdevChannel for CryptChannel {
    fn submit(&mut self, io: &mut IoCtx, req: IoRequest) {
        match req.op {
            IoOp::Write => {
                if !self.waiting.is_empty()
                    || self.ciphered >= CRYPT_POLL_UNITS
                    || !self.try_write(io, req)
                {
                    self.waiting.push_back(req);
                }
            }
            IoOp::Read | IoOp::Flush | IoOp::Trim | IoOp::WriteZeroes => {
                self.forward(io, req, None, None)
            }
        }
    }

    fn poll(&mut self, io: &mut IoCtx) -> usize {
        let mut work = 0;
        self.ciphered = 0;
        while self.ciphered < CRYPT_POLL_UNITS {
            let Some(c) = io.pop(self.owner) else { break };
            self.ciphered += self.complete(io, c.tag, c.res);
            work += 1;
        }
        while let Some(&req) = self.waiting.front() {
            if self.ciphered >= CRYPT_POLL_UNITS || !self.try_write(io, req) {
                break;
            }
            self.waiting.pop_front();
            work += 1;
        }
        work
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len() + self.waiting.len()
    }

    fn close(&mut self, io: &mut IoCtx) {
        io.release_owner(self.owner);
    }
}
