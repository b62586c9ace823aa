//! `cairn_pool`: a volume store in one file or block device, opened in an engine.

use crate::engine::{engine_of, out_arg, str_arg, EngineCore};
use crate::error::{guard, FfiError, FfiResult, CAIRN_E_BUSY, CAIRN_E_OS};
use crate::handle::{self, Handle, Shell};
use cairn_engine::bdev::uring::{UringBdev, UringOptions};
use cairn_engine::volume::{Pool, CLUSTER_DEFAULT_BYTES};
use cairn_engine::Bdev;
use std::ffi::{c_char, c_int};
use std::sync::Arc;

/// An open pool.
///
/// Thread-safety: every function taking a `cairn_pool *` may be called from any thread.
/// Ownership: created by `cairn_pool_open`; it keeps its engine running. `cairn_pool_close`
/// closes it (refused with `CAIRN_E_BUSY` while volumes opened from it are open);
/// `cairn_pool_free` frees the handle itself and must be the last call with it.
pub struct cairn_pool {
    shell: Shell<Arc<PoolCore>>,
}

pub(crate) struct PoolCore {
    pub engine: Arc<EngineCore>,
    pub pool: Pool,
}

impl Handle for cairn_pool {
    type Inner = Arc<PoolCore>;
    const MAGIC: u64 = 0xCA1E_0002_9001_0002;
    const NAME: &'static str = "pool";
    fn shell(&self) -> &Shell<Self::Inner> {
        &self.shell
    }
    fn from_shell(shell: Shell<Self::Inner>) -> Self {
        cairn_pool { shell }
    }
}

/// Makes the pool file `create_size_bytes` long, creating it if needed.
fn size_file(path: &str, create_size_bytes: u64) -> FfiResult<()> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| FfiError::new(CAIRN_E_OS, format!("creating pool file '{path}': {e}")))?;
    f.set_len(create_size_bytes).map_err(|e| {
        FfiError::new(
            CAIRN_E_OS,
            format!("sizing pool file '{path}' to {create_size_bytes} bytes: {e}"),
        )
    })
}

fn open_pool(engine: Arc<EngineCore>, path: &str, create_size_bytes: u64) -> FfiResult<PoolCore> {
    if create_size_bytes > 0 {
        size_file(path, create_size_bytes)?;
    }
    let name = std::path::Path::new(path)
        .file_name()
        .map_or_else(|| path.to_string(), |n| n.to_string_lossy().into_owned());
    let base: Arc<dyn Bdev> = Arc::new(
        UringBdev::open(&name, path.as_ref(), UringOptions::default())
            .map_err(|e| FfiError::new(CAIRN_E_OS, e.to_string()))?,
    );
    let home = engine.engine.cores()[0];
    let pool = if create_size_bytes > 0 {
        Pool::create(&engine.engine, &name, base, home, CLUSTER_DEFAULT_BYTES)?
    } else {
        Pool::open(&engine.engine, &name, base, home)?
    };
    Ok(PoolCore { engine, pool })
}

/// Opens the pool in the file or block device at `path` and stores its handle in `*out` (NULL
/// on failure). With `create_size_bytes` > 0 the file is created if missing, sized to exactly
/// that many bytes, and formatted as a new empty pool: everything it held is lost. With 0 the
/// existing pool is opened. The pool's metadata runs on the engine's first core.
///
/// # Safety
/// `engine` is a live engine handle (or NULL); `path` is NULL or a NUL-terminated string; `out`
/// is NULL or valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn cairn_pool_open(
    engine: *mut crate::engine::cairn_engine,
    path: *const c_char,
    create_size_bytes: u64,
    out: *mut *mut cairn_pool,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let out = unsafe { out_arg(out, "out") }?;
        // SAFETY: forwarded from this function's contract.
        let path = unsafe { str_arg(path, "path") }?;
        // SAFETY: forwarded from this function's contract.
        let engine = unsafe { engine_of(engine) }?;
        let core = open_pool(engine, path, create_size_bytes)?;
        *out = handle::into_raw::<cairn_pool>(Arc::new(core));
        Ok(())
    })
}

/// The pool behind an open handle.
///
/// # Safety
/// As for [`handle::deref`].
pub(crate) unsafe fn pool_of(p: *const cairn_pool) -> FfiResult<Arc<PoolCore>> {
    // SAFETY: forwarded.
    let h = unsafe { handle::deref(p) }?;
    handle::with(h, |core| Ok(core.clone()))
}

/// Creates a thin volume `name` of `size_bytes` (a multiple of 4096) in the pool; durable when
/// it returns. `CAIRN_E_EXISTS` if the name is taken.
///
/// # Safety
/// `pool` is a live pool handle (or NULL); `name` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn cairn_pool_create_volume(
    pool: *mut cairn_pool,
    name: *const c_char,
    size_bytes: u64,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let name = unsafe { str_arg(name, "name") }?;
        // SAFETY: forwarded from this function's contract.
        let p = unsafe { pool_of(pool) }?;
        p.pool
            .create_volume(&p.engine.engine, name, size_bytes, Vec::new())?;
        Ok(())
    })
}

/// Closes the pool once its outstanding metadata work is done. Refused with `CAIRN_E_BUSY`
/// while volumes opened from it are open; `CAIRN_E_CLOSED` if already closed. The handle stays
/// allocated until `cairn_pool_free`.
///
/// # Safety
/// `pool` is NULL or a handle from `cairn_pool_open` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn cairn_pool_close(pool: *mut cairn_pool) -> c_int {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let h = unsafe { handle::deref(pool) }?;
        handle::close(h, |core| match Arc::try_unwrap(core) {
            Ok(PoolCore { engine, pool }) => (None, pool.close(&engine.engine).map_err(Into::into)),
            Err(core) => (
                Some(core),
                Err(FfiError::new(CAIRN_E_BUSY, "pool still has volumes open")),
            ),
        })
    })
}

/// Frees the handle, closing the pool first if it is still open and has no open volumes (a pool
/// that cannot be closed then is released when the engine stops). NULL is accepted and
/// ignored. The pointer must not be used afterwards.
///
/// # Safety
/// `pool` is NULL or a handle from `cairn_pool_open` not yet freed, and no other thread is
/// using it.
#[no_mangle]
pub unsafe extern "C" fn cairn_pool_free(pool: *mut cairn_pool) -> c_int {
    guard(|| {
        if pool.is_null() {
            return Ok(());
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { handle::deref(pool) }?;
        // SAFETY: as above; a failure (already closed, busy) does not stop the free.
        let _ = unsafe { cairn_pool_close(pool) };
        // SAFETY: checked above; the contract makes this the last use.
        unsafe { handle::free(pool) };
        Ok(())
    })
}
