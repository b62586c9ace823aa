//! The malloc bdev: a RAM disk in one anonymous mapping (huge pages when available), shared by
//! every core's channel.
//!
//! Each request is a memcpy on the submitting core and completes at once. Like a real disk,
//! concurrent overlapping writes give unspecified (possibly mixed) bytes; the memory is only
//! ever touched through raw pointers, never through Rust references, so that is a data race on
//! plain bytes, not on any Rust object's invariants.

use super::{check_geometry, Bdev, BdevChannel, BdevError, BdevInfo, IoOp, IoRequest};
use crate::dma::Region;
use crate::reactor::IoCtx;
use std::sync::Arc;

/// Largest single request; a RAM copy has no natural limit, so this matches NBD's 32 MiB.
pub const MALLOC_IO_MAX_BYTES: u32 = 32 << 20;

#[derive(Debug)]
pub struct MallocBdev {
    info: BdevInfo,
    mem: Arc<Region>,
}

impl MallocBdev {
    pub fn new(
        name: &str,
        size_bytes: u64,
        block_size_bytes: u32,
    ) -> Result<MallocBdev, BdevError> {
        check_geometry(name, size_bytes, block_size_bytes)?;
        let mem = Region::map(size_bytes as usize, true, false)?;
        tracing::info!(bdev = name, size_bytes, memory = %mem.backing(), "malloc bdev created");
        Ok(MallocBdev {
            info: BdevInfo {
                name: name.into(),
                block_size_bytes,
                size_bytes,
                max_io_bytes: MALLOC_IO_MAX_BYTES,
                buf_align_bytes: 1,
                can_trim: true,
                can_write_zeroes: true,
                read_only: false,
            },
            mem: Arc::new(mem),
        })
    }
}

impl Bdev for MallocBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn open_channel(&self, _io: &mut IoCtx) -> Result<Box<dyn BdevChannel>, BdevError> {
        Ok(Box::new(MallocChannel {
            mem: self.mem.clone(),
        }))
    }
}

struct MallocChannel {
    mem: Arc<Region>,
}

impl BdevChannel for MallocChannel {
    #[inline]
    fn submit(&mut self, io: &mut IoCtx, req: IoRequest) {
        debug_assert!(req.offset_bytes + u64::from(req.len_bytes) <= self.mem.len_bytes() as u64);
        // SAFETY: validation bounded offset + len by the bdev size, which the region covers.
        let dev = unsafe { self.mem.base().add(req.offset_bytes as usize) };
        let len = req.len_bytes as usize;
        let res = match req.op {
            IoOp::Read => {
                let buf = req.buf.expect("validated read has a buffer");
                // SAFETY: both ranges are in bounds (validated) and distinct allocations; the
                // submitter lent `buf` to this request.
                unsafe { std::ptr::copy_nonoverlapping(dev, buf.ptr(), len) };
                req.len_bytes as i32
            }
            IoOp::Write => {
                let buf = req.buf.expect("validated write has a buffer");
                // SAFETY: as for reads, in the other direction.
                unsafe { std::ptr::copy_nonoverlapping(buf.ptr(), dev, len) };
                req.len_bytes as i32
            }
            IoOp::Trim | IoOp::WriteZeroes => {
                // SAFETY: the range is in bounds (validated).
                unsafe { std::ptr::write_bytes(dev, 0, len) };
                0
            }
            IoOp::Flush => 0,
        };
        io.post(req.owner, req.tag, res);
    }
}
