//! Stable error codes, their static descriptions, the thread-local last-error message, and the
//! guard every entry point runs in.
//!
//! Codes are part of the ABI: a code's number never changes and is never reused. Every failure
//! also stores a message naming the thing and the value on the calling thread, readable with
//! `cairn_last_error()`. The guard catches panics so none unwinds into C.

use cairn_engine::volume::PoolError;
use cairn_engine::{EngineError, IoError};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Success.
pub const CAIRN_OK: c_int = 0;
/// A required pointer argument was NULL.
pub const CAIRN_E_NULL: c_int = -1;
/// An argument is invalid (bad string, unknown op, bad config value, bad URL).
pub const CAIRN_E_INVALID: c_int = -2;
/// The handle was closed; a second close also returns this.
pub const CAIRN_E_CLOSED: c_int = -3;
/// The pointer is not a handle of the expected type (wrong magic).
pub const CAIRN_E_BAD_HANDLE: c_int = -4;
/// A data buffer's address is not aligned to the volume's `buf_align_bytes`.
pub const CAIRN_E_BUFFER_MISALIGNED: c_int = -5;
/// An offset or length is not a multiple of the volume's block size.
pub const CAIRN_E_MISALIGNED: c_int = -6;
/// The request runs beyond the end of the volume.
pub const CAIRN_E_OUT_OF_RANGE: c_int = -7;
/// One asynchronous request is larger than the volume's `max_io_bytes`.
pub const CAIRN_E_TOO_LARGE: c_int = -8;
/// A request of zero length.
pub const CAIRN_E_ZERO_LENGTH: c_int = -9;
/// The volume is read-only (a snapshot).
pub const CAIRN_E_READ_ONLY: c_int = -10;
/// The volume does not support this operation.
pub const CAIRN_E_UNSUPPORTED: c_int = -11;
/// The device reported an error (the last-error message has the errno).
pub const CAIRN_E_IO: c_int = -12;
/// The queue already has `depth` requests in flight.
pub const CAIRN_E_QUEUE_FULL: c_int = -13;
/// The engine has stopped.
pub const CAIRN_E_STOPPED: c_int = -14;
/// Starting or talking to the engine failed (cores, memory, rings).
pub const CAIRN_E_ENGINE: c_int = -15;
/// The pool failed (format, metadata, consistency).
pub const CAIRN_E_POOL: c_int = -16;
/// No volume with that name.
pub const CAIRN_E_NOT_FOUND: c_int = -17;
/// A volume with that name already exists.
pub const CAIRN_E_EXISTS: c_int = -18;
/// The pool is out of space.
pub const CAIRN_E_NO_SPACE: c_int = -19;
/// The handle is in use: it still has dependent handles open (volumes of a pool, queues of a
/// volume, anything of an engine), or another thread is using a single-threaded handle.
pub const CAIRN_E_BUSY: c_int = -20;
/// A Rust panic was caught at the boundary; the handle involved should be closed.
pub const CAIRN_E_PANIC: c_int = -21;
/// Connecting to or talking with an NBD server failed.
pub const CAIRN_E_NBD: c_int = -22;
/// A read or write moved fewer bytes than asked.
pub const CAIRN_E_SHORT: c_int = -23;
/// The file could not be opened or created.
pub const CAIRN_E_OS: c_int = -24;

/// A failure on its way to C: the code and the message for `cairn_last_error`.
#[derive(Debug)]
pub(crate) struct FfiError {
    pub code: c_int,
    pub msg: String,
}

pub(crate) type FfiResult<T> = Result<T, FfiError>;

impl FfiError {
    pub fn new(code: c_int, msg: impl Into<String>) -> FfiError {
        FfiError {
            code,
            msg: msg.into(),
        }
    }

    pub fn null(what: &str) -> FfiError {
        FfiError::new(CAIRN_E_NULL, format!("argument '{what}' is NULL"))
    }
}

/// The code a failed request reports, in the synchronous calls and in queue completions.
pub(crate) fn io_code(e: &IoError) -> c_int {
    match e {
        IoError::ZeroLength { .. } => CAIRN_E_ZERO_LENGTH,
        IoError::Misaligned { .. } => CAIRN_E_MISALIGNED,
        IoError::OutOfRange { .. } => CAIRN_E_OUT_OF_RANGE,
        IoError::TooLarge { .. } => CAIRN_E_TOO_LARGE,
        IoError::NoBuffer { .. } => CAIRN_E_NULL,
        IoError::BufferTooSmall { .. } => CAIRN_E_INVALID,
        IoError::BufferMisaligned { .. } => CAIRN_E_BUFFER_MISALIGNED,
        IoError::ReadOnly { .. } => CAIRN_E_READ_ONLY,
        IoError::Unsupported { .. } => CAIRN_E_UNSUPPORTED,
        IoError::Device { .. } => CAIRN_E_IO,
        IoError::Short { .. } => CAIRN_E_SHORT,
        IoError::QueueFull { .. } | IoError::NoFreeBuffer { .. } => CAIRN_E_QUEUE_FULL,
        IoError::EngineStopped | IoError::NoSuchBdev { .. } => CAIRN_E_STOPPED,
    }
}

impl From<IoError> for FfiError {
    fn from(e: IoError) -> Self {
        FfiError::new(io_code(&e), e.to_string())
    }
}

impl From<EngineError> for FfiError {
    fn from(e: EngineError) -> Self {
        let code = match e {
            EngineError::Stopped { .. } => CAIRN_E_STOPPED,
            EngineError::QueueDepth { .. } => CAIRN_E_INVALID,
            _ => CAIRN_E_ENGINE,
        };
        FfiError::new(code, e.to_string())
    }
}

impl From<PoolError> for FfiError {
    fn from(e: PoolError) -> Self {
        let code = match &e {
            PoolError::NotFound { .. } => CAIRN_E_NOT_FOUND,
            PoolError::DuplicateName { .. } => CAIRN_E_EXISTS,
            PoolError::NoSpace { .. } | PoolError::MetadataFull { .. } => CAIRN_E_NO_SPACE,
            PoolError::BadName { .. }
            | PoolError::BadLabels { .. }
            | PoolError::BadSize { .. }
            | PoolError::ShrinkRefused { .. } => CAIRN_E_INVALID,
            PoolError::VolumeOpen { .. } => CAIRN_E_BUSY,
            PoolError::Io { error, .. } => io_code(error),
            _ => CAIRN_E_POOL,
        };
        FfiError::new(code, e.to_string())
    }
}

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', "\\0")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = Some(c));
}

/// Runs one entry point: maps its error to a code and a last-error message, and turns a panic
/// into `CAIRN_E_PANIC` so it never unwinds into C.
pub(crate) fn guard(f: impl FnOnce() -> FfiResult<()>) -> c_int {
    guard_count(|| f().map(|()| CAIRN_OK))
}

/// Like [`guard`] for entry points that return a non-negative count on success.
pub(crate) fn guard_count(f: impl FnOnce() -> FfiResult<c_int>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => {
            set_last_error(&e.msg);
            e.code
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!(
                "internal error (panic caught at the C boundary): {what}"
            ));
            CAIRN_E_PANIC
        }
    }
}

/// A static, NUL-terminated description of an error code; never NULL. Unknown codes get
/// "unknown error code". The string must not be freed.
///
/// Thread-safety: callable from any thread.
#[no_mangle]
pub extern "C" fn cairn_strerror(code: c_int) -> *const c_char {
    let s: &'static std::ffi::CStr = match code {
        CAIRN_OK => c"success",
        CAIRN_E_NULL => c"a required pointer argument is NULL",
        CAIRN_E_INVALID => c"invalid argument",
        CAIRN_E_CLOSED => c"handle is closed",
        CAIRN_E_BAD_HANDLE => c"not a handle of the expected type",
        CAIRN_E_BUFFER_MISALIGNED => {
            c"buffer address is not aligned to the volume's buffer alignment"
        }
        CAIRN_E_MISALIGNED => c"offset or length is not a multiple of the block size",
        CAIRN_E_OUT_OF_RANGE => c"request runs beyond the end of the volume",
        CAIRN_E_TOO_LARGE => c"request is larger than the volume's largest single I/O",
        CAIRN_E_ZERO_LENGTH => c"request of zero length",
        CAIRN_E_READ_ONLY => c"volume is read-only",
        CAIRN_E_UNSUPPORTED => c"operation not supported by this volume",
        CAIRN_E_IO => c"device I/O error",
        CAIRN_E_QUEUE_FULL => c"queue is full",
        CAIRN_E_STOPPED => c"engine has stopped",
        CAIRN_E_ENGINE => c"engine error",
        CAIRN_E_POOL => c"pool error",
        CAIRN_E_NOT_FOUND => c"no such volume",
        CAIRN_E_EXISTS => c"volume already exists",
        CAIRN_E_NO_SPACE => c"pool is out of space",
        CAIRN_E_BUSY => c"handle is busy or still has dependent handles open",
        CAIRN_E_PANIC => c"internal error (panic caught at the C boundary)",
        CAIRN_E_NBD => c"NBD connection or protocol error",
        CAIRN_E_SHORT => c"short read or write",
        CAIRN_E_OS => c"operating system error",
        _ => c"unknown error code",
    };
    s.as_ptr()
}

/// The message of the most recent failed call on the calling thread, or NULL if none has failed
/// yet. Successful calls leave it unchanged. The string belongs to the library and stays valid
/// until the next failing call on the same thread; copy it to keep it. Never free it.
#[no_mangle]
pub extern "C" fn cairn_last_error() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ref().map_or(std::ptr::null(), |c| c.as_ptr()))
}
