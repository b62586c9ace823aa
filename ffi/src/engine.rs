//! `cairn_engine`: starting and stopping the engine from C, plus the small argument helpers
//! every module uses (C strings, out-pointers).

use crate::error::{guard, FfiError, FfiResult, CAIRN_E_BUSY, CAIRN_E_INVALID};
use crate::handle::{self, Handle, Shell};
use ::cairn_engine::{CoreId, CoreList, Engine, EngineConfig, IdlePolicy};
use std::ffi::{c_char, c_int, CStr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Idle policy: spin `spin_us` after the last work, then sleep in the kernel.
pub const CAIRN_IDLE_SLEEP: u32 = 0;
/// Idle policy: never sleep; for cores dedicated to the engine.
pub const CAIRN_IDLE_POLL: u32 = 1;
/// Idle policy (the default): spin only while work is expected within `spin_us`, otherwise
/// sleep in the kernel and wake in time for it.
pub const CAIRN_IDLE_ADAPTIVE: u32 = 2;

/// Engine configuration. Fill it with `cairn_engine_config_default` and change what you need;
/// zero in a numeric field means "the default".
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct cairn_engine_config {
    /// Cores to run one reactor thread on each, as "0,1", "0-3" or "0-3,8". NULL means the
    /// first CPU this process may run on. Read during `cairn_engine_start` only.
    pub cores: *const c_char,
    /// DMA buffers per core (default 256). Each queue reserves `depth` of them.
    pub buf_count: u32,
    /// Size of one DMA buffer in bytes (default 131072).
    pub buf_size_bytes: u32,
    /// `CAIRN_IDLE_ADAPTIVE` (default), `CAIRN_IDLE_SLEEP` or `CAIRN_IDLE_POLL`.
    pub idle_policy: u32,
    /// With `CAIRN_IDLE_ADAPTIVE`: the most microseconds to spin for expected work (default
    /// 5); with `CAIRN_IDLE_SLEEP`: microseconds to spin before sleeping (default 50). 0 means
    /// the policy's default.
    pub spin_us: u32,
}

/// A running engine: one pinned polling thread per configured core.
///
/// Thread-safety: every function taking a `cairn_engine *` may be called from any thread.
/// Ownership: created by `cairn_engine_start`; `cairn_engine_stop` stops it (refused with
/// `CAIRN_E_BUSY` while pools, volumes or queues made from it are open); `cairn_engine_free`
/// frees the handle itself and must be the last call with it.
pub struct cairn_engine {
    shell: Shell<Arc<EngineCore>>,
}

pub(crate) struct EngineCore {
    pub engine: Engine,
    next_core: AtomicUsize,
}

impl EngineCore {
    /// Spreads queues over the engine's cores, last core first (the first core is a pool's
    /// home, which also runs metadata work).
    pub fn next_core(&self) -> CoreId {
        let cores = self.engine.cores();
        let i = self.next_core.fetch_add(1, Ordering::Relaxed);
        cores[cores.len() - 1 - i % cores.len()]
    }
}

impl Handle for cairn_engine {
    type Inner = Arc<EngineCore>;
    const MAGIC: u64 = 0xCA1E_0001_E61E_0001;
    const NAME: &'static str = "engine";
    fn shell(&self) -> &Shell<Self::Inner> {
        &self.shell
    }
    fn from_shell(shell: Shell<Self::Inner>) -> Self {
        cairn_engine { shell }
    }
}

/// Borrows a C string argument as UTF-8.
///
/// # Safety
/// `p` is NULL or a NUL-terminated string that stays valid for the call.
pub(crate) unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> FfiResult<&'a str> {
    if p.is_null() {
        return Err(FfiError::null(what));
    }
    // SAFETY: non-null and NUL-terminated by the contract.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str()
        .map_err(|_| FfiError::new(CAIRN_E_INVALID, format!("argument '{what}' is not UTF-8")))
}

/// Checks an out-pointer and clears what it points to, so a failed call leaves NULL there.
///
/// # Safety
/// `out` is NULL or valid for one pointer-sized write.
pub(crate) unsafe fn out_arg<'a, T>(out: *mut *mut T, what: &str) -> FfiResult<&'a mut *mut T> {
    if out.is_null() {
        return Err(FfiError::null(what));
    }
    // SAFETY: non-null and writable by the contract.
    let out = unsafe { &mut *out };
    *out = std::ptr::null_mut();
    Ok(out)
}

/// Fills `config` with the defaults: the first allowed CPU, 256 buffers of 128 KiB, adaptive
/// waiting with a 5 µs spin budget. Returns `CAIRN_E_NULL` if `config` is NULL.
///
/// # Safety
/// `config` is NULL or valid for writing one `cairn_engine_config`.
#[no_mangle]
pub unsafe extern "C" fn cairn_engine_config_default(config: *mut cairn_engine_config) -> c_int {
    guard(|| {
        if config.is_null() {
            return Err(FfiError::null("config"));
        }
        let d = cairn_engine_config {
            cores: std::ptr::null(),
            buf_count: ::cairn_engine::engine::BUF_COUNT_DEFAULT,
            buf_size_bytes: ::cairn_engine::engine::BUF_SIZE_DEFAULT_BYTES,
            idle_policy: CAIRN_IDLE_ADAPTIVE,
            spin_us: ::cairn_engine::reactor::ADAPTIVE_SPIN_DEFAULT.as_micros() as u32,
        };
        // SAFETY: non-null and writable by the contract.
        unsafe { config.write(d) };
        Ok(())
    })
}

fn engine_config(c: &cairn_engine_config) -> FfiResult<EngineConfig> {
    let cores = if c.cores.is_null() {
        let first = ::cairn_engine::sys::allowed_cpus()
            .first()
            .copied()
            .unwrap_or(0);
        CoreList::parse(&first.to_string())
    } else {
        // SAFETY: the caller's config holds a valid C string while start runs.
        let text = unsafe { str_arg(c.cores, "config.cores") }?;
        CoreList::parse(text)
    }
    .map_err(|e| FfiError::new(CAIRN_E_INVALID, format!("config.cores: {e}")))?;
    let mut config = EngineConfig::new(cores);
    if c.buf_count != 0 {
        config.buf_count = c.buf_count;
    }
    if c.buf_size_bytes != 0 {
        config.buf_size_bytes = c.buf_size_bytes;
    }
    let spin = |default: Duration| match c.spin_us {
        0 => default,
        us => Duration::from_micros(u64::from(us)),
    };
    config.idle = match c.idle_policy {
        CAIRN_IDLE_ADAPTIVE => IdlePolicy::Adaptive {
            spin: spin(::cairn_engine::reactor::ADAPTIVE_SPIN_DEFAULT),
        },
        CAIRN_IDLE_SLEEP => IdlePolicy::Sleep {
            spin: spin(::cairn_engine::reactor::SPIN_DEFAULT),
        },
        CAIRN_IDLE_POLL => IdlePolicy::Poll,
        other => {
            return Err(FfiError::new(
                CAIRN_E_INVALID,
                format!(
                    "config.idle_policy {other} is none of CAIRN_IDLE_ADAPTIVE, CAIRN_IDLE_SLEEP, \
                     CAIRN_IDLE_POLL"
                ),
            ))
        }
    };
    Ok(config)
}

/// Starts the engine and stores its handle in `*out` (NULL on failure). `config` may be NULL
/// for the defaults.
///
/// # Safety
/// `config` is NULL or a valid config; `out` is NULL or valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn cairn_engine_start(
    config: *const cairn_engine_config,
    out: *mut *mut cairn_engine,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let out = unsafe { out_arg(out, "out") }?;
        let config = if config.is_null() {
            let mut d = std::mem::MaybeUninit::uninit();
            // SAFETY: `d` is writable; the call fills it completely.
            unsafe { cairn_engine_config_default(d.as_mut_ptr()) };
            // SAFETY: initialised by the call above, which cannot fail for a non-null pointer.
            unsafe { d.assume_init() }
        } else {
            // SAFETY: non-null and valid by the contract.
            unsafe { *config }
        };
        let engine = Engine::start(engine_config(&config)?)?;
        *out = handle::into_raw::<cairn_engine>(Arc::new(EngineCore {
            engine,
            next_core: AtomicUsize::new(0),
        }));
        Ok(())
    })
}

/// The engine behind an open handle, for the modules that create dependants.
///
/// # Safety
/// As for [`handle::deref`].
pub(crate) unsafe fn engine_of(e: *const cairn_engine) -> FfiResult<Arc<EngineCore>> {
    // SAFETY: forwarded.
    let h = unsafe { handle::deref(e) }?;
    handle::with(h, |core| Ok(core.clone()))
}

/// Stops the engine after in-flight I/O drains and joins its threads. Refused with
/// `CAIRN_E_BUSY` while any pool, volume or queue made from it is open; `CAIRN_E_CLOSED` if
/// already stopped. The handle stays allocated until `cairn_engine_free`.
///
/// # Safety
/// `engine` is NULL or a handle from `cairn_engine_start` not yet freed.
#[no_mangle]
pub unsafe extern "C" fn cairn_engine_stop(engine: *mut cairn_engine) -> c_int {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let h = unsafe { handle::deref(engine) }?;
        handle::close(h, |core| match Arc::try_unwrap(core) {
            Ok(core) => {
                core.engine.stop();
                (None, Ok(()))
            }
            Err(core) => {
                let others = Arc::strong_count(&core) - 1;
                let e = FfiError::new(
                    CAIRN_E_BUSY,
                    format!("engine still has {others} pools, volumes or queues open"),
                );
                (Some(core), Err(e))
            }
        })
    })
}

/// Frees the handle, stopping the engine first if it is running and nothing depends on it; an
/// engine that cannot stop then stops once its last dependent handle is freed. NULL is accepted and ignored. The pointer must not be used afterwards.
///
/// # Safety
/// `engine` is NULL or a handle from `cairn_engine_start` not yet freed, and no other thread
/// is using it.
#[no_mangle]
pub unsafe extern "C" fn cairn_engine_free(engine: *mut cairn_engine) -> c_int {
    guard(|| {
        if engine.is_null() {
            return Ok(());
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { handle::deref(engine) }?;
        // SAFETY: as above; a failure (already stopped, busy) does not stop the free.
        let _ = unsafe { cairn_engine_stop(engine) };
        // SAFETY: checked above; the contract makes this the last use.
        unsafe { handle::free(engine) };
        Ok(())
    })
}
