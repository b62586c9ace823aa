//! The null bdev: every request succeeds at once and no data moves. It measures the engine's
//! own cost: validation, channel dispatch and completion delivery, with no device behind it.

use super::{check_geometry, Bdev, BdevChannel, BdevError, BdevInfo, IoOp, IoRequest};
use crate::reactor::IoCtx;

#[derive(Debug)]
pub struct NullBdev {
    info: BdevInfo,
}

impl NullBdev {
    pub fn new(name: &str, size_bytes: u64, block_size_bytes: u32) -> Result<NullBdev, BdevError> {
        check_geometry(name, size_bytes, block_size_bytes)?;
        Ok(NullBdev {
            info: BdevInfo {
                name: name.into(),
                block_size_bytes,
                size_bytes,
                max_io_bytes: !(block_size_bytes - 1),
                buf_align_bytes: 1,
                can_trim: true,
                can_write_zeroes: true,
                read_only: false,
            },
        })
    }
}

impl Bdev for NullBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn open_channel(&self, _io: &mut IoCtx) -> Result<Box<dyn BdevChannel>, BdevError> {
        Ok(Box::new(NullChannel))
    }
}

struct NullChannel;

impl BdevChannel for NullChannel {
    #[inline]
    fn submit(&mut self, io: &mut IoCtx, req: IoRequest) {
        let res = match req.op {
            IoOp::Read | IoOp::Write => req.len_bytes as i32,
            IoOp::Flush | IoOp::Trim | IoOp::WriteZeroes => 0,
        };
        io.post(req.owner, req.tag, res);
    }
}
