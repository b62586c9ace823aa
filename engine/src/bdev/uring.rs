//! The uring bdev: a regular file or block device opened O_DIRECT and driven through io_uring.
//!
//! By default each core's channel registers the file in its reactor's ring and submits there,
//! using READ_FIXED/WRITE_FIXED when the buffer lies in the core's registered pool. With
//! `iopoll` or `sqpoll` the channel builds a private ring with that mode (an IOPOLL ring cannot
//! carry the reactor's doorbell, and SQPOLL is per ring), registers the same pool there, and
//! reaps it from its `poll` hook.
//!
//! FUA writes carry RWF_DSYNC, flush is fdatasync, trim punches a hole, and write-zeroes
//! allocates zeroed blocks (fallocate ZERO_RANGE).

use super::{Bdev, BdevChannel, BdevError, BdevInfo, IoOp, IoRequest};
use crate::dma::DMA_ALIGN_BYTES;
use crate::reactor::ring::{Ring, RingOptions, Route};
use crate::reactor::IoCtx;
use io_uring::{opcode, types};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::time::Instant;

/// Largest single request handed to the kernel; the NBD limit, and far above any buffer.
pub const URING_IO_MAX_BYTES: u32 = 32 << 20;
/// Submission-queue size of a channel's private ring (iopoll/sqpoll modes).
pub const PRIVATE_RING_ENTRIES: u32 = 1024;

/// How to open a uring bdev.
#[derive(Clone, Debug, Default)]
pub struct UringOptions {
    /// Block size to enforce; defaults to the device's logical block size, or 4096 for files.
    pub block_size_bytes: Option<u32>,
    /// Poll the device for completions (needs a block device with poll queues).
    pub iopoll: bool,
    /// Let a kernel thread consume submissions, idling after this many ms.
    pub sqpoll_idle_ms: Option<u32>,
    /// CPU for the SQPOLL kernel thread; give it a core of its own, not a reactor's.
    pub sqpoll_cpu: Option<u32>,
    /// Take an exclusive advisory lock (flock) on the file, failing if another process holds
    /// it; released when the bdev is dropped or the process dies, kill -9 included.
    pub exclusive: bool,
}

#[derive(Debug)]
pub struct UringBdev {
    info: BdevInfo,
    file: File,
    options: UringOptions,
}

impl UringBdev {
    pub fn open(
        name: &str,
        path: &std::path::Path,
        options: UringOptions,
    ) -> Result<UringBdev, BdevError> {
        let open_err = |source| BdevError::Open {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(open_err)?;
        if options.exclusive {
            lock_exclusive(&file).map_err(|source| BdevError::Locked {
                path: path.display().to_string(),
                source,
            })?;
        }
        let meta = file.metadata().map_err(open_err)?;
        let (size_bytes, native_block) = if meta.file_type().is_block_device() {
            crate::sys::block_device_geometry(file.as_raw_fd()).map_err(open_err)?
        } else {
            (meta.len(), DMA_ALIGN_BYTES as u32)
        };
        let block_size_bytes = options.block_size_bytes.unwrap_or(native_block);
        let size_bytes = size_bytes - size_bytes % u64::from(block_size_bytes.max(1));
        super::check_geometry(name, size_bytes, block_size_bytes)?;
        Ok(UringBdev {
            info: BdevInfo {
                name: name.into(),
                block_size_bytes,
                size_bytes,
                max_io_bytes: URING_IO_MAX_BYTES,
                buf_align_bytes: DMA_ALIGN_BYTES as u32,
                can_trim: true,
                can_write_zeroes: true,
                read_only: false,
            },
            file,
            options,
        })
    }
}

/// How long opening with `exclusive` waits for a lock another process holds before it
/// reports the file in use. A process killed a moment ago still holds its lock until the
/// kernel has torn down its io_uring (which keeps the registered file open), and that teardown
/// runs after the process is reaped; a restart right after a crash must not fail for it.
const LOCK_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(2);
/// How often the wait above tries the lock again.
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(10);

/// Takes the exclusive lock, waiting up to `LOCK_WAIT_MAX` while another holder has it.
fn lock_exclusive(file: &File) -> std::io::Result<()> {
    let deadline = Instant::now() + LOCK_WAIT_MAX;
    loop {
        let Err(e) = crate::sys::lock_exclusive(file.as_raw_fd()) else {
            return Ok(());
        };
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) || Instant::now() >= deadline {
            return Err(e);
        }
        std::thread::sleep(LOCK_RETRY);
    }
}

impl Bdev for UringBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn open_channel(&self, io: &mut IoCtx) -> Result<Box<dyn BdevChannel>, BdevError> {
        let name = &self.info.name;
        let io_err = |what, source| BdevError::Io {
            name: name.clone(),
            what,
            source,
        };
        let fd = self.file.as_raw_fd();
        let private = if self.options.iopoll || self.options.sqpoll_idle_ms.is_some() {
            let options = RingOptions {
                iopoll: self.options.iopoll,
                sqpoll_idle_ms: self.options.sqpoll_idle_ms,
                sqpoll_cpu: self.options.sqpoll_cpu,
            };
            let mut ring = Ring::new(PRIVATE_RING_ENTRIES, options)
                .map_err(|e| io_err("creating the channel's private ring", e))?;
            if io.pool().region().len_bytes() > 0 && io.ring().has_fixed_buffers() {
                ring.register_region(io.pool().region())
                    .map_err(|e| io_err("registering buffers with the private ring", e))?;
            }
            Some(ring)
        } else {
            None
        };
        let mut channel = UringChannel {
            file_slot: 0,
            private,
            fd: fd as u32,
        };
        channel.file_slot = channel
            .ring(io)
            .register_file(fd)
            .map_err(|e| io_err("registering the file with the ring", e))?;
        Ok(Box::new(channel))
    }
}

struct UringChannel {
    file_slot: u32,
    private: Option<Ring>,
    fd: u32,
}

impl UringChannel {
    fn ring<'a>(&'a mut self, io: &'a mut IoCtx) -> &'a mut Ring {
        match &mut self.private {
            Some(r) => r,
            None => io.ring(),
        }
    }
}

impl BdevChannel for UringChannel {
    #[inline]
    fn submit(&mut self, io: &mut IoCtx, req: IoRequest) {
        let fd = types::Fixed(self.file_slot);
        let route = Route::Io {
            owner: req.owner.get(),
            tag: req.tag,
        };
        let entry = match (req.op, req.buf) {
            (IoOp::Read, Some(b)) => match b.fixed_index() {
                Some(i) => opcode::ReadFixed::new(fd, b.ptr(), req.len_bytes, i)
                    .offset(req.offset_bytes)
                    .build(),
                None => opcode::Read::new(fd, b.ptr(), req.len_bytes)
                    .offset(req.offset_bytes)
                    .build(),
            },
            (IoOp::Write, Some(b)) => {
                let flags = if req.fua { libc::RWF_DSYNC } else { 0 };
                match b.fixed_index() {
                    Some(i) => opcode::WriteFixed::new(fd, b.ptr(), req.len_bytes, i)
                        .offset(req.offset_bytes)
                        .rw_flags(flags)
                        .build(),
                    None => opcode::Write::new(fd, b.ptr(), req.len_bytes)
                        .offset(req.offset_bytes)
                        .rw_flags(flags)
                        .build(),
                }
            }
            (IoOp::Flush, _) => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            (IoOp::Trim, _) => opcode::Fallocate::new(fd, u64::from(req.len_bytes))
                .offset(req.offset_bytes)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            (IoOp::WriteZeroes, _) => opcode::Fallocate::new(fd, u64::from(req.len_bytes))
                .offset(req.offset_bytes)
                .mode(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            (IoOp::Read | IoOp::Write, None) => unreachable!("validated data op without buffer"),
        };
        // SAFETY: the file is registered for the channel's life; the buffer was lent to this
        // request by its submitter and stays untouched until the completion is delivered.
        unsafe { self.ring(io).push_io(entry.user_data(route.encode())) };
    }

    fn poll(&mut self, io: &mut IoCtx) -> usize {
        let Some(ring) = &mut self.private else {
            return 0;
        };
        ring.kick();
        let mut n = 0;
        ring.reap(|route, res| {
            if let Route::Io { owner, tag } = route {
                io.post(crate::reactor::OwnerId::from_raw(owner), tag, res);
                n += 1;
            }
        });
        n
    }

    fn in_flight(&self) -> usize {
        self.private.as_ref().map_or(0, |r| r.in_flight() as usize)
    }

    /// A private ring's completions do not wake the reactor (IOPOLL completions exist only
    /// when polled), so while it has I/O in flight the reactor must keep polling.
    fn next_deadline(&self) -> Option<Instant> {
        (self.in_flight() > 0).then(Instant::now)
    }

    fn close(&mut self, io: &mut IoCtx) {
        let slot = self.file_slot;
        self.ring(io).unregister_file(slot);
        tracing::debug!(fd = self.fd, "uring channel closed");
    }
}
