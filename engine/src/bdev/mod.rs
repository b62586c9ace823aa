//! Block devices: the `Bdev` trait, its per-core channels, request validation and the I/O error
//! type every layer above reports.
//!
//! A `Bdev` is the shared description of a device (name, geometry, capabilities) and a factory
//! for channels. A `BdevChannel` belongs to one reactor and is driven only from that reactor's
//! thread, so the I/O path of a channel needs no lock. A channel posts each completion to the
//! submitter's completion queue (see `reactor::IoCtx`), routed by the owner id and tag carried
//! in the request.
//!
//! Requests are validated once, in [`validate`], before any channel sees them: a channel may
//! assume alignment, range and buffer size hold. Bad requests from outside are typed errors,
//! never panics.

pub mod crypt;
pub mod fault;
pub mod malloc;
pub mod nbd;
pub mod null;
pub mod uring;

use crate::dma::IoBuf;
use crate::reactor::{IoCtx, OwnerId};
use std::fmt;
use std::time::Instant;

/// The operations a bdev serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IoOp {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::Trim => "trim",
            IoOp::WriteZeroes => "write_zeroes",
        })
    }
}

/// What a device is and what it can do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BdevInfo {
    pub name: String,
    /// Offsets and lengths must be multiples of this.
    pub block_size_bytes: u32,
    pub size_bytes: u64,
    /// Largest single read or write; larger requests are refused (callers split).
    pub max_io_bytes: u32,
    /// Data buffers must start at a multiple of this address.
    pub buf_align_bytes: u32,
    pub can_trim: bool,
    pub can_write_zeroes: bool,
    /// Writes, trims and write-zeroes are refused (snapshots).
    pub read_only: bool,
}

/// One request, after validation, as a channel receives it.
#[derive(Clone, Copy, Debug)]
pub struct IoRequest {
    pub op: IoOp,
    pub offset_bytes: u64,
    pub len_bytes: u32,
    /// Data for reads and writes; `None` for flush, trim and write-zeroes.
    pub buf: Option<IoBuf>,
    /// Write is durable when it completes (forced unit access).
    pub fua: bool,
    pub owner: OwnerId,
    pub tag: u32,
}

/// A device shared by every core; opening a channel gives one core its private path to it.
pub trait Bdev: Send + Sync + 'static {
    fn info(&self) -> &BdevInfo;

    /// The current size; differs from `info().size_bytes` only for devices that grow online,
    /// whose cores pick the new size up through `Engine::refresh_bdev`.
    fn size_bytes(&self) -> u64 {
        self.info().size_bytes
    }

    /// Opens this core's channel. Runs on the reactor thread that will own the channel.
    fn open_channel(&self, io: &mut IoCtx) -> Result<Box<dyn BdevChannel>, BdevError>;

    /// Describes how `[offset_bytes, offset_bytes + len_bytes)` is backed, for NBD's
    /// BLOCK_STATUS: appends extents in order, starting at `offset_bytes`, until the range is
    /// covered or `out` holds `extents_max` entries (the caller asks again for the rest).
    /// Callable from any thread without a message; thin devices override it. The default says
    /// everything holds data.
    fn allocation(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        extents_max: usize,
        out: &mut Vec<Extent>,
    ) {
        let _ = (offset_bytes, extents_max);
        out.push(Extent {
            len_bytes,
            zero: false,
        });
    }

    /// Whether [`Bdev::allocation`] knows what was never written (a thin device's map), so a
    /// zero extent there is proof that no data lies in it. The default's "everything holds
    /// data" is not proof of anything.
    fn reports_allocation(&self) -> bool {
        false
    }
}

/// One run of blocks with the same backing, as [`Bdev::allocation`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub len_bytes: u64,
    /// Unallocated: reads return zeros and no storage is used (NBD's HOLE|ZERO).
    pub zero: bool,
}

/// One core's path to a bdev. Driven only by the owning reactor.
pub trait BdevChannel {
    /// Starts a validated request. Its completion is posted to `req.owner` later, never from
    /// inside this call's caller's stack frame, so submitters can hold state across it.
    fn submit(&mut self, io: &mut IoCtx, req: IoRequest);

    /// Advances internal work (delayed requests, private rings); returns how much it did.
    fn poll(&mut self, _io: &mut IoCtx) -> usize {
        0
    }

    /// When `poll` next has timed work, so the reactor does not sleep past it.
    fn next_deadline(&self) -> Option<Instant> {
        None
    }

    /// Requests accepted by this channel and not yet posted to their owner.
    fn in_flight(&self) -> usize {
        0
    }

    /// Releases per-core resources (registered files). Called once, with nothing in flight.
    fn close(&mut self, _io: &mut IoCtx) {}

    /// Lets code holding the core reach a channel of a known concrete type (a volume channel
    /// receiving its pool's messages). Channels that receive no messages keep the default.
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }
}

/// Errors opening or configuring a bdev.
#[derive(Debug, thiserror::Error)]
pub enum BdevError {
    #[error("opening '{path}': {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("'{path}' is in use by another process (exclusive lock held): {source}")]
    Locked {
        path: String,
        source: std::io::Error,
    },
    #[error("bdev '{name}': size {size_bytes} is not a non-zero multiple of block size {block_size_bytes}")]
    Geometry {
        name: String,
        size_bytes: u64,
        block_size_bytes: u32,
    },
    #[error(
        "bdev '{name}': block size {block_size_bytes} must be a power of two between 512 and 65536"
    )]
    BlockSize { name: String, block_size_bytes: u32 },
    #[error("bdev '{name}': {what}: {source}")]
    Io {
        name: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Dma(#[from] crate::dma::DmaError),
}

/// Why one I/O failed. Validation errors are returned by submit; device errors arrive with the
/// completion.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum IoError {
    #[error("{op} of zero length")]
    ZeroLength { op: IoOp },
    #[error("{op} at offset {offset_bytes} length {len_bytes} is not aligned to block size {block_size_bytes}")]
    Misaligned {
        op: IoOp,
        offset_bytes: u64,
        len_bytes: u32,
        block_size_bytes: u32,
    },
    #[error("{op} at offset {offset_bytes} length {len_bytes} runs beyond bdev '{bdev}' size {size_bytes}")]
    OutOfRange {
        op: IoOp,
        offset_bytes: u64,
        len_bytes: u32,
        bdev: String,
        size_bytes: u64,
    },
    #[error("{op} of {len_bytes} bytes exceeds the {max_bytes}-byte limit of one request")]
    TooLarge {
        op: IoOp,
        len_bytes: u32,
        max_bytes: u32,
    },
    #[error("{op} needs a data buffer")]
    NoBuffer { op: IoOp },
    #[error("{op} of {len_bytes} bytes given a {buf_len_bytes}-byte buffer")]
    BufferTooSmall {
        op: IoOp,
        len_bytes: u32,
        buf_len_bytes: u32,
    },
    #[error("buffer at {addr:#x} is not aligned to {align_bytes} bytes")]
    BufferMisaligned { addr: usize, align_bytes: u32 },
    #[error("{op} refused: bdev '{bdev}' is read-only")]
    ReadOnly { op: IoOp, bdev: String },
    #[error("bdev '{bdev}' does not support {op}")]
    Unsupported { op: IoOp, bdev: String },
    #[error("device error: {}", std::io::Error::from_raw_os_error(*errno))]
    Device { errno: i32 },
    #[error("short {op}: {done_bytes} of {len_bytes} bytes")]
    Short {
        op: IoOp,
        done_bytes: u32,
        len_bytes: u32,
    },
    #[error("queue is full: {depth} requests already in flight")]
    QueueFull { depth: u32 },
    #[error("no free buffer: all {count} buffers of this queue are in use")]
    NoFreeBuffer { count: u32 },
    #[error("the engine has stopped")]
    EngineStopped,
    #[error("no bdev with id {id} on this core")]
    NoSuchBdev { id: u32 },
}

impl IoError {
    /// The Linux errno that best names this error, for layers that speak errnos (wire
    /// protocols, stacked bdevs).
    pub fn errno(&self) -> i32 {
        match self {
            IoError::Device { errno } => *errno,
            IoError::ZeroLength { .. }
            | IoError::Misaligned { .. }
            | IoError::OutOfRange { .. }
            | IoError::TooLarge { .. }
            | IoError::NoBuffer { .. }
            | IoError::BufferTooSmall { .. }
            | IoError::BufferMisaligned { .. } => libc::EINVAL,
            IoError::ReadOnly { .. } => libc::EROFS,
            IoError::Unsupported { .. } => libc::EOPNOTSUPP,
            IoError::Short { .. } => libc::EIO,
            IoError::QueueFull { .. } | IoError::NoFreeBuffer { .. } => libc::EAGAIN,
            IoError::EngineStopped => libc::ESHUTDOWN,
            IoError::NoSuchBdev { .. } => libc::ENODEV,
        }
    }

    /// Interprets a completion result: negative is an errno, and a read or write must have
    /// moved every byte.
    #[inline]
    pub fn check(op: IoOp, res: i32, len_bytes: u32) -> Result<(), IoError> {
        if res < 0 {
            return Err(IoError::Device { errno: -res });
        }
        let moves_data = matches!(op, IoOp::Read | IoOp::Write);
        if moves_data && res as u32 != len_bytes {
            return Err(IoError::Short {
                op,
                done_bytes: res as u32,
                len_bytes,
            });
        }
        Ok(())
    }
}

/// Checks a request against the device before any channel sees it.
#[inline]
pub fn validate(
    info: &BdevInfo,
    op: IoOp,
    offset_bytes: u64,
    len_bytes: u32,
    buf: Option<&IoBuf>,
) -> Result<(), IoError> {
    if op == IoOp::Flush {
        return Ok(());
    }
    if op != IoOp::Read && info.read_only {
        return Err(IoError::ReadOnly {
            op,
            bdev: info.name.clone(),
        });
    }
    if (op == IoOp::Trim && !info.can_trim) || (op == IoOp::WriteZeroes && !info.can_write_zeroes) {
        return Err(IoError::Unsupported {
            op,
            bdev: info.name.clone(),
        });
    }
    if len_bytes == 0 {
        return Err(IoError::ZeroLength { op });
    }
    let bs = u64::from(info.block_size_bytes);
    if !offset_bytes.is_multiple_of(bs) || !u64::from(len_bytes).is_multiple_of(bs) {
        return Err(IoError::Misaligned {
            op,
            offset_bytes,
            len_bytes,
            block_size_bytes: info.block_size_bytes,
        });
    }
    let end = offset_bytes.checked_add(u64::from(len_bytes));
    if end.is_none_or(|end| end > info.size_bytes) {
        return Err(IoError::OutOfRange {
            op,
            offset_bytes,
            len_bytes,
            bdev: info.name.clone(),
            size_bytes: info.size_bytes,
        });
    }
    if matches!(op, IoOp::Read | IoOp::Write) {
        validate_buffer(info, op, len_bytes, buf)?;
    }
    Ok(())
}

fn validate_buffer(
    info: &BdevInfo,
    op: IoOp,
    len_bytes: u32,
    buf: Option<&IoBuf>,
) -> Result<(), IoError> {
    if len_bytes > info.max_io_bytes {
        return Err(IoError::TooLarge {
            op,
            len_bytes,
            max_bytes: info.max_io_bytes,
        });
    }
    let buf = buf.ok_or(IoError::NoBuffer { op })?;
    if buf.len_bytes() < len_bytes {
        return Err(IoError::BufferTooSmall {
            op,
            len_bytes,
            buf_len_bytes: buf.len_bytes(),
        });
    }
    let addr = buf.ptr() as usize;
    if !addr.is_multiple_of(info.buf_align_bytes as usize) {
        return Err(IoError::BufferMisaligned {
            addr,
            align_bytes: info.buf_align_bytes,
        });
    }
    Ok(())
}

/// Checks a block size and a size for a new bdev.
pub(crate) fn check_geometry(
    name: &str,
    size_bytes: u64,
    block_size_bytes: u32,
) -> Result<(), BdevError> {
    if !block_size_bytes.is_power_of_two() || !(512..=65536).contains(&block_size_bytes) {
        return Err(BdevError::BlockSize {
            name: name.into(),
            block_size_bytes,
        });
    }
    if size_bytes == 0 || !size_bytes.is_multiple_of(u64::from(block_size_bytes)) {
        return Err(BdevError::Geometry {
            name: name.into(),
            size_bytes,
            block_size_bytes,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> BdevInfo {
        BdevInfo {
            name: "t".into(),
            block_size_bytes: 512,
            size_bytes: 1 << 20,
            max_io_bytes: 8192,
            buf_align_bytes: 512,
            can_trim: true,
            can_write_zeroes: false,
            read_only: false,
        }
    }

    fn buf(addr: usize, len: u32) -> IoBuf {
        // SAFETY: these views are only validated, never submitted, so no memory is touched.
        unsafe { IoBuf::from_raw(addr as *mut u8, len) }
    }

    #[test]
    fn each_bad_request_has_its_error() {
        let i = info();
        let b = buf(4096, 8192);
        let v = |op, off, len, b: Option<&IoBuf>| validate(&i, op, off, len, b);
        assert!(v(IoOp::Read, 0, 512, Some(&b)).is_ok());
        assert!(v(IoOp::Flush, 7, 0, None).is_ok());
        assert!(matches!(
            v(IoOp::Read, 0, 0, Some(&b)),
            Err(IoError::ZeroLength { .. })
        ));
        assert!(matches!(
            v(IoOp::Read, 1, 512, Some(&b)),
            Err(IoError::Misaligned { .. })
        ));
        assert!(matches!(
            v(IoOp::Write, 0, 100, Some(&b)),
            Err(IoError::Misaligned { .. })
        ));
        assert!(matches!(
            v(IoOp::Read, (1 << 20) - 512, 1024, Some(&b)),
            Err(IoError::OutOfRange { .. })
        ));
        assert!(matches!(
            v(IoOp::Read, u64::MAX - 511, 1024, Some(&b)),
            Err(IoError::OutOfRange { .. })
        ));
        assert!(matches!(
            v(IoOp::Read, 0, 16384, Some(&b)),
            Err(IoError::TooLarge { .. })
        ));
        assert!(matches!(
            v(IoOp::Write, 0, 512, None),
            Err(IoError::NoBuffer { .. })
        ));
        assert!(matches!(
            v(IoOp::Write, 0, 1024, Some(&buf(4096, 512))),
            Err(IoError::BufferTooSmall { .. })
        ));
        assert!(matches!(
            v(IoOp::Write, 0, 512, Some(&buf(4097, 512))),
            Err(IoError::BufferMisaligned { .. })
        ));
        assert!(matches!(
            v(IoOp::WriteZeroes, 0, 512, None),
            Err(IoError::Unsupported { .. })
        ));
    }

    #[test]
    fn completion_results_are_checked() {
        assert_eq!(IoError::check(IoOp::Read, 4096, 4096), Ok(()));
        assert_eq!(IoError::check(IoOp::Flush, 0, 0), Ok(()));
        assert_eq!(
            IoError::check(IoOp::Write, -libc::EIO, 4096),
            Err(IoError::Device { errno: libc::EIO })
        );
        assert!(matches!(
            IoError::check(IoOp::Write, 512, 4096),
            Err(IoError::Short { .. })
        ));
    }
}
