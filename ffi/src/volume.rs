//! `cairn_volume`: an open volume (a pool volume or an NBD export), its synchronous I/O, info
//! and stats.
//!
//! Synchronous calls run on the volume's own depth-1 queue with the caller's memory (zero
//! copy, like the asynchronous queue), so the same buffer rules hold for both: the address must
//! be aligned to `buf_align_bytes`, offsets and lengths to `block_size_bytes`. Requests larger
//! than `max_io_bytes` are split here, one piece in flight at a time.

use crate::engine::{out_arg, str_arg, EngineCore};
use crate::error::{
    guard, FfiError, FfiResult, CAIRN_E_BUSY, CAIRN_E_INVALID, CAIRN_E_IO, CAIRN_E_NBD,
    CAIRN_E_NULL, CAIRN_E_UNSUPPORTED,
};
use crate::handle::{self, Handle, Shell};
use crate::pool::{pool_of, PoolCore};
use cairn_engine::bdev::crypt::CryptError;
use cairn_engine::bdev::nbd::NbdBdev;
use cairn_engine::dma::IoBuf;
use cairn_engine::{BdevHandle, IoError, IoOp, IoQueue, QueueCompletion};
use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Longest volume name `cairn_volume_get_info` carries (longer names are cut), plus its NUL.
pub const CAIRN_NAME_MAX_BYTES: usize = 256;

/// What a volume is. Filled by `cairn_volume_get_info`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct cairn_volume_info {
    /// Size in bytes at open time.
    pub size_bytes: u64,
    /// Offsets and lengths must be multiples of this.
    pub block_size_bytes: u32,
    /// Data buffers must start at a multiple of this address (4096 for file-backed pools).
    pub buf_align_bytes: u32,
    /// Largest single asynchronous read or write.
    pub max_io_bytes: u32,
    /// Non-zero for read-only volumes (snapshots).
    pub read_only: u32,
    /// NUL-terminated name, cut to fit.
    pub name: [c_char; CAIRN_NAME_MAX_BYTES],
}

/// Counters of one volume, over all its queues and synchronous calls, since it was opened.
/// Reads and writes are counted when they complete successfully; `errors` counts refused
/// submissions and failed completions.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct cairn_volume_stats {
    pub reads: u64,
    pub writes: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Flushes, trims and write-zeroes that succeeded.
    pub other_ops: u64,
    pub errors: u64,
}

/// An open volume.
///
/// Thread-safety: every function taking a `cairn_volume *` may be called from any thread;
/// concurrent synchronous calls on one volume are serialised (use queues for parallel I/O).
/// Ownership: created by `cairn_volume_open` or `cairn_volume_open_nbd`; it keeps its pool (if any) and
/// engine open. `cairn_volume_close` closes it (refused with `CAIRN_E_BUSY` while queues made
/// from it are open); `cairn_volume_free` frees the handle itself and must be the last call.
pub struct cairn_volume {
    shell: Shell<Arc<VolumeCore>>,
}

impl Handle for cairn_volume {
    type Inner = Arc<VolumeCore>;
    const MAGIC: u64 = 0xCA1E_0003_F01E_0003;
    const NAME: &'static str = "volume";
    fn shell(&self) -> &Shell<Self::Inner> {
        &self.shell
    }
    fn from_shell(shell: Shell<Self::Inner>) -> Self {
        cairn_volume { shell }
    }
}

/// Where a volume comes from, which decides how it is closed.
pub(crate) enum Source {
    Pool(Arc<PoolCore>),
    Nbd,
}

#[derive(Default)]
pub(crate) struct Stats {
    reads: AtomicU64,
    writes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    other_ops: AtomicU64,
    errors: AtomicU64,
}

impl Stats {
    /// Counts one finished request.
    #[inline]
    pub fn record(&self, op: IoOp, len_bytes: u32, ok: bool) {
        let (count, bytes) = match (ok, op) {
            (false, _) => (&self.errors, None),
            (true, IoOp::Read) => (&self.reads, Some(&self.bytes_read)),
            (true, IoOp::Write) => (&self.writes, Some(&self.bytes_written)),
            (true, _) => (&self.other_ops, None),
        };
        count.fetch_add(1, Ordering::Relaxed);
        if let Some(b) = bytes {
            b.fetch_add(u64::from(len_bytes), Ordering::Relaxed);
        }
    }

    pub fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> cairn_volume_stats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        cairn_volume_stats {
            reads: l(&self.reads),
            writes: l(&self.writes),
            bytes_read: l(&self.bytes_read),
            bytes_written: l(&self.bytes_written),
            other_ops: l(&self.other_ops),
            errors: l(&self.errors),
        }
    }
}

/// The synchronous path's queue and the vector its completions land in (kept, so a call does
/// not allocate).
struct SyncQueue {
    q: IoQueue,
    done: Vec<QueueCompletion>,
}

pub(crate) struct VolumeCore {
    pub engine: Arc<EngineCore>,
    source: Source,
    pub handle: BdevHandle,
    sync: Mutex<SyncQueue>,
    pub stats: Stats,
}

impl VolumeCore {
    /// Wraps a bdev already added to the engine.
    pub(crate) fn new(
        engine: Arc<EngineCore>,
        source: Source,
        handle: BdevHandle,
    ) -> FfiResult<VolumeCore> {
        let q = engine.engine.queue(&handle, engine.next_core(), 1)?;
        Ok(VolumeCore {
            engine,
            source,
            handle,
            sync: Mutex::new(SyncQueue {
                q,
                done: Vec::with_capacity(1),
            }),
            stats: Stats::default(),
        })
    }

    /// Removes the volume's bdev from the engine (and its pool's open list).
    fn close(self) -> FfiResult<()> {
        let VolumeCore {
            engine,
            source,
            handle,
            sync,
            ..
        } = self;
        drop(sync);
        match source {
            Source::Pool(p) => p.pool.close_volume(&engine.engine, &handle)?,
            Source::Nbd => engine.engine.remove_bdev(&handle)?,
        }
        Ok(())
    }

    /// Runs one request on the caller's memory and waits for it.
    fn run(
        &self,
        op: IoOp,
        offset_bytes: u64,
        len_bytes: u32,
        buf: Option<IoBuf>,
    ) -> FfiResult<()> {
        let mut s = self.sync.lock().unwrap_or_else(|p| p.into_inner());
        let SyncQueue { q, done } = &mut *s;
        // SAFETY: the caller's buffer is valid for `len_bytes` for the whole call (this
        // function's callers' contract), and the request completes before this returns: we
        // wait below until the queue has nothing in flight.
        let submitted = unsafe { q.submit_raw(op, offset_bytes, len_bytes, buf, false, 0) };
        if let Err(e) = submitted {
            self.stats.error();
            return Err(e.into());
        }
        while q.in_flight() > 0 {
            q.wait(1, done);
        }
        let result = match done.pop() {
            Some(c) => c.result,
            None => Err(IoError::EngineStopped),
        };
        done.clear();
        self.stats.record(op, len_bytes, result.is_ok());
        result.map_err(Into::into)
    }

    /// Splits a span into requests of at most `max` bytes and runs them in order.
    ///
    /// # Safety
    /// For reads and writes `buf` is valid for `len_bytes` bytes for the whole call, and the
    /// caller touches it only after this returns.
    unsafe fn run_span(
        &self,
        op: IoOp,
        offset_bytes: u64,
        len_bytes: u64,
        buf: *mut u8,
    ) -> FfiResult<()> {
        let info = self.handle.info();
        let moves_data = matches!(op, IoOp::Read | IoOp::Write);
        let max = if moves_data {
            u64::from(info.max_io_bytes)
        } else {
            u64::from(u32::MAX - u32::MAX % info.block_size_bytes)
        };
        if len_bytes == 0 {
            self.stats.error();
            return Err(IoError::ZeroLength { op }.into());
        }
        let mut done_bytes = 0u64;
        while done_bytes < len_bytes {
            let part = (len_bytes - done_bytes).min(max) as u32;
            // SAFETY: the piece stays inside the caller's `len_bytes` span, valid and untouched
            // for this whole call (this function's contract), and `run` waits for it.
            let io_buf = moves_data
                .then(|| unsafe { IoBuf::from_raw(buf.wrapping_add(done_bytes as usize), part) });
            self.run(op, offset_bytes.saturating_add(done_bytes), part, io_buf)?;
            done_bytes += u64::from(part);
        }
        Ok(())
    }
}

/// Opens the volume `name` of a pool for I/O and stores its handle in `*out` (NULL on
/// failure). `CAIRN_E_NOT_FOUND` if the pool has no such volume; `CAIRN_E_UNSUPPORTED` if it
/// is encrypted (its key is only served by cairn-node's encrypted exports).
///
/// # Safety
/// `pool` is a live pool handle (or NULL); `name` is NULL or a NUL-terminated string; `out` is
/// NULL or valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn cairn_volume_open(
    pool: *mut crate::pool::cairn_pool,
    name: *const c_char,
    out: *mut *mut cairn_volume,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let out = unsafe { out_arg(out, "out") }?;
        // SAFETY: forwarded from this function's contract.
        let name = unsafe { str_arg(name, "name") }?;
        // SAFETY: forwarded from this function's contract.
        let p = unsafe { pool_of(pool) }?;
        let handle = p.pool.open_volume(&p.engine.engine, name)?;
        // An encrypted volume opened raw would hand out ciphertext and let a write overwrite
        // its encryption header; libcairn has no key to serve it with.
        if let Err(e) = cairn_engine::bdev::crypt::refuse_plain(&p.engine.engine, &handle, name) {
            drop(p.pool.close_volume(&p.engine.engine, &handle));
            let code = match e {
                CryptError::KeyNeeded { .. } => CAIRN_E_UNSUPPORTED,
                _ => CAIRN_E_IO,
            };
            return Err(FfiError::new(
                code,
                format!("{e}; libcairn opens plain volumes only"),
            ));
        }
        let engine = p.engine.clone();
        let core = match VolumeCore::new(engine, Source::Pool(p.clone()), handle.clone()) {
            Ok(core) => core,
            Err(e) => {
                drop(p.pool.close_volume(&p.engine.engine, &handle));
                return Err(e);
            }
        };
        *out = handle::into_raw::<cairn_volume>(Arc::new(core));
        Ok(())
    })
}

/// Splits `nbd://host:port/export` into ("host:port", "export"); the port defaults to 10809.
fn parse_nbd_url(url: &str) -> FfiResult<(String, String)> {
    let bad = |why: &str| FfiError::new(CAIRN_E_INVALID, format!("NBD URL '{url}': {why}"));
    let rest = url
        .strip_prefix("nbd://")
        .ok_or_else(|| bad("must start with nbd://"))?;
    let (addr, export) = rest.split_once('/').unwrap_or((rest, ""));
    if addr.is_empty() {
        return Err(bad("has no host"));
    }
    let addr = if addr
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        addr.to_string()
    } else {
        format!("{addr}:10809")
    };
    Ok((addr, export.to_string()))
}

/// Opens a remote export by URL, `nbd://host:port/export` (port 10809 if omitted), as a volume
/// and stores its handle in `*out` (NULL on failure). `CAIRN_E_NBD` if the server cannot be
/// reached or refuses the export. One TCP connection serves the volume, one request at a time.
/// NBD volumes have 512-byte blocks and no buffer alignment requirement.
///
/// # Safety
/// `engine` is a live engine handle (or NULL); `url` is NULL or a NUL-terminated string; `out`
/// is NULL or valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn cairn_volume_open_nbd(
    engine: *mut crate::engine::cairn_engine,
    url: *const c_char,
    out: *mut *mut cairn_volume,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let out = unsafe { out_arg(out, "out") }?;
        // SAFETY: forwarded from this function's contract.
        let url = unsafe { str_arg(url, "url") }?;
        // SAFETY: forwarded from this function's contract.
        let e = unsafe { crate::engine::engine_of(engine) }?;
        let (addr, export) = parse_nbd_url(url)?;
        let bdev = NbdBdev::connect(&export, &addr, &export)
            .map_err(|err| FfiError::new(CAIRN_E_NBD, format!("{url}: {err}")))?;
        let handle = e.engine.add_bdev(Arc::new(bdev))?;
        let core = match VolumeCore::new(e.clone(), Source::Nbd, handle.clone()) {
            Ok(core) => core,
            Err(err) => {
                drop(e.engine.remove_bdev(&handle));
                return Err(err);
            }
        };
        *out = handle::into_raw::<cairn_volume>(Arc::new(core));
        Ok(())
    })
}

/// The volume behind an open handle.
///
/// # Safety
/// As for [`handle::deref`].
pub(crate) unsafe fn volume_of(v: *const cairn_volume) -> FfiResult<Arc<VolumeCore>> {
    // SAFETY: forwarded.
    let h = unsafe { handle::deref(v) }?;
    handle::with(h, |core| Ok(core.clone()))
}

/// One synchronous entry point's body: checks the handle and buffer, then runs the span.
///
/// # Safety
/// `vol` is a live volume handle or NULL; `buf` is NULL or valid for `len_bytes` bytes.
unsafe fn sync_io(
    vol: *mut cairn_volume,
    op: IoOp,
    offset_bytes: u64,
    len_bytes: u64,
    buf: *mut u8,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let v = unsafe { volume_of(vol) }?;
        if matches!(op, IoOp::Read | IoOp::Write) && buf.is_null() {
            v.stats.error();
            return Err(FfiError::new(CAIRN_E_NULL, format!("{op} buffer is NULL")));
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { v.run_span(op, offset_bytes, len_bytes, buf) }
    })
}

/// Reads `len_bytes` at `offset_bytes` into `buf` and waits. `buf` must be aligned to the
/// volume's `buf_align_bytes`; offset and length to its `block_size_bytes`.
///
/// # Safety
/// `vol` is a live volume handle or NULL; `buf` is NULL or valid for writing `len_bytes`.
#[no_mangle]
pub unsafe extern "C" fn cairn_volume_read(
    vol: *mut cairn_volume,
    offset_bytes: u64,
    len_bytes: u64,
    buf: *mut c_void,
) -> c_int {
    // SAFETY: forwarded from this function's contract.
    unsafe { sync_io(vol, IoOp::Read, offset_bytes, len_bytes, buf.cast()) }
}

/// Writes `len_bytes` from `buf` at `offset_bytes` and waits. The write is durable after a
/// later `cairn_volume_flush`. Buffer rules as for `cairn_volume_read`.
///
/// # Safety
/// `vol` is a live volume handle or NULL; `buf` is NULL or valid for reading `len_bytes`.
#[no_mangle]
pub unsafe extern "C" fn cairn_volume_write(
    vol: *mut cairn_volume,
    offset_bytes: u64,
    len_bytes: u64,
    buf: *const c_void,
) -> c_int {
    // SAFETY: forwarded; a write only reads the buffer.
    unsafe {
        sync_io(
            vol,
            IoOp::Write,
            offset_bytes,
            len_bytes,
            buf.cast_mut().cast(),
        )
    }
}

/// Makes every completed write durable.
///
/// # Safety
/// `vol` is a live volume handle or NULL.
#[no_mangle]
pub unsafe extern "C" fn cairn_volume_flush(vol: *mut cairn_volume) -> c_int {
    // SAFETY: forwarded; flush carries no buffer.
    unsafe { sync_io(vol, IoOp::Flush, 0, 1, std::ptr::null_mut()) }
}

/// Tells the volume a range is unused (advisory: later reads return zeros or old data).
///
/// # Safety
/// `vol` is a live volume handle or NULL.
#[no_mangle]
pub unsafe extern "C" fn cairn_volume_trim(
    vol: *mut cairn_volume,
    offset_bytes: u64,
    len_bytes: u64,
) -> c_int {
    // SAFETY: forwarded; trim carries no buffer.
    unsafe {
        sync_io(
            vol,
            IoOp::Trim,
            offset_bytes,
            len_bytes,
            std::ptr::null_mut(),
        )
    }
}

/// Makes a range read as zeros.
///
/// # Safety
/// `vol` is a live volume handle or NULL.
#[no_mangle]
pub unsafe extern "C" fn cairn_volume_write_zeroes(
    vol: *mut cairn_volume,
    offset_bytes: u64,
    len_bytes: u64,
) -> c_int {
    // SAFETY: forwarded; write-zeroes carries no buffer.
    unsafe {
        sync_io(
            vol,
            IoOp::WriteZeroes,
            offset_bytes,
            len_bytes,
            std::ptr::null_mut(),
        )
    }
}

/// Fills `*out` with the volume's size, geometry and name.
///
/// # Safety
/// `vol` is a live volume handle or NULL; `out` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn cairn_volume_get_info(
    vol: *mut cairn_volume,
    out: *mut cairn_volume_info,
) -> c_int {
    guard(|| {
        if out.is_null() {
            return Err(FfiError::null("out"));
        }
        // SAFETY: forwarded from this function's contract.
        let v = unsafe { volume_of(vol) }?;
        let i = v.handle.info();
        let mut info = cairn_volume_info {
            size_bytes: i.size_bytes,
            block_size_bytes: i.block_size_bytes,
            buf_align_bytes: i.buf_align_bytes,
            max_io_bytes: i.max_io_bytes,
            read_only: u32::from(i.read_only),
            name: [0; CAIRN_NAME_MAX_BYTES],
        };
        for (dst, &src) in info.name.iter_mut().zip(i.name.as_bytes().iter().take(255)) {
            *dst = src as c_char;
        }
        // SAFETY: non-null and writable by the contract.
        unsafe { out.write(info) };
        Ok(())
    })
}

/// Fills `*out` with the volume's counters.
///
/// # Safety
/// `vol` is a live volume handle or NULL; `out` is NULL or valid for one write.
#[no_mangle]
pub unsafe extern "C" fn cairn_volume_get_stats(
    vol: *mut cairn_volume,
    out: *mut cairn_volume_stats,
) -> c_int {
    guard(|| {
        if out.is_null() {
            return Err(FfiError::null("out"));
        }
        // SAFETY: forwarded from this function's contract.
        let v = unsafe { volume_of(vol) }?;
        // SAFETY: non-null and writable by the contract.
        unsafe { out.write(v.stats.snapshot()) };
        Ok(())
    })
}

/// Closes the volume after its in-flight I/O. Refused with `CAIRN_E_BUSY` while queues made
/// from it are open (or another thread is inside a call on it); `CAIRN_E_CLOSED` if already
/// closed. The handle stays allocated until `cairn_volume_free`.
///
/// # Safety
/// `vol` is NULL or a volume handle not yet freed.
#[no_mangle]
pub unsafe extern "C" fn cairn_volume_close(vol: *mut cairn_volume) -> c_int {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let h = unsafe { handle::deref(vol) }?;
        handle::close(h, |core| match Arc::try_unwrap(core) {
            Ok(core) => (None, core.close()),
            Err(core) => (
                Some(core),
                Err(FfiError::new(CAIRN_E_BUSY, "volume still has queues open")),
            ),
        })
    })
}

/// Frees the handle, closing the volume first if it is open and has no open queues. NULL is
/// accepted and ignored. The pointer must not be used afterwards.
///
/// # Safety
/// `vol` is NULL or a volume handle not yet freed, and no other thread is using it.
#[no_mangle]
pub unsafe extern "C" fn cairn_volume_free(vol: *mut cairn_volume) -> c_int {
    guard(|| {
        if vol.is_null() {
            return Ok(());
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { handle::deref(vol) }?;
        // SAFETY: as above; a failure (already closed, busy) does not stop the free.
        let _ = unsafe { cairn_volume_close(vol) };
        // SAFETY: checked above; the contract makes this the last use.
        unsafe { handle::free(vol) };
        Ok(())
    })
}
