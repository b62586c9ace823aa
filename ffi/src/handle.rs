//! The shell every opaque handle lives in: a heap box holding a per-type magic number and the
//! object, or nothing once closed.
//!
//! Closing takes the object out and leaves the shell, so a later use or a second close is
//! answered with `CAIRN_E_CLOSED` instead of touching freed memory. The shell itself is freed
//! only by the type's `cairn_*_free`, after which the pointer must not be used (that is the one
//! misuse the library cannot detect). The magic catches a pointer of the wrong handle type and
//! is cleared on free, which often (not always) catches a use after free too.

use crate::error::{FfiError, FfiResult, CAIRN_E_BAD_HANDLE, CAIRN_E_BUSY, CAIRN_E_CLOSED};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

/// One handle's box contents.
pub(crate) struct Shell<T> {
    magic: AtomicU64,
    inner: Mutex<Option<T>>,
}

/// What each handle type says about itself.
pub(crate) trait Handle: Sized {
    type Inner;
    const MAGIC: u64;
    const NAME: &'static str;
    fn shell(&self) -> &Shell<Self::Inner>;
    fn from_shell(shell: Shell<Self::Inner>) -> Self;
}

impl<T> Shell<T> {
    pub fn new(magic: u64, inner: T) -> Shell<T> {
        Shell {
            magic: AtomicU64::new(magic),
            inner: Mutex::new(Some(inner)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<T>> {
        // A panic inside a call was already reported as CAIRN_E_PANIC; the object is still
        // structurally valid, so later calls go on rather than panicking again.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open<'a>(guard: &'a mut MutexGuard<'_, Option<T>>, name: &str) -> FfiResult<&'a mut T> {
        guard
            .as_mut()
            .ok_or_else(|| FfiError::new(CAIRN_E_CLOSED, format!("{name} handle is closed")))
    }
}

/// Boxes a new object and hands C the pointer.
pub(crate) fn into_raw<H: Handle>(inner: H::Inner) -> *mut H {
    Box::into_raw(Box::new(H::from_shell(Shell::new(H::MAGIC, inner))))
}

/// Turns a C pointer into a handle reference, refusing NULL and foreign pointers.
///
/// # Safety
/// `ptr` is NULL or points to memory that was returned by this library and not yet freed.
pub(crate) unsafe fn deref<'a, H: Handle>(ptr: *const H) -> FfiResult<&'a H> {
    if ptr.is_null() {
        return Err(FfiError::null(H::NAME));
    }
    // SAFETY: non-null, and by this function's contract a live allocation from `into_raw`.
    let h = unsafe { &*ptr };
    if h.shell().magic.load(Ordering::Relaxed) != H::MAGIC {
        return Err(FfiError::new(
            CAIRN_E_BAD_HANDLE,
            format!("pointer {ptr:p} is not a {} handle", H::NAME),
        ));
    }
    Ok(h)
}

/// Runs `f` on an open handle's object, waiting for another thread's call to finish.
pub(crate) fn with<H: Handle, R>(
    h: &H,
    f: impl FnOnce(&mut H::Inner) -> FfiResult<R>,
) -> FfiResult<R> {
    let mut g = h.shell().lock();
    f(Shell::open(&mut g, H::NAME)?)
}

/// Like [`with`] for single-threaded handles: a concurrent call is refused with BUSY instead of
/// waiting, which makes the misuse visible and keeps the hot path to one uncontended CAS.
pub(crate) fn with_exclusive<H: Handle, R>(
    h: &H,
    f: impl FnOnce(&mut H::Inner) -> FfiResult<R>,
) -> FfiResult<R> {
    let mut g = match h.shell().inner.try_lock() {
        Ok(g) => g,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => {
            return Err(FfiError::new(
                CAIRN_E_BUSY,
                format!("{} handle is in use by another thread", H::NAME),
            ))
        }
    };
    f(Shell::open(&mut g, H::NAME)?)
}

/// Closes a handle: `f` gets the object and returns it back (with the error) when it must stay
/// open, e.g. BUSY while dependants are open; otherwise the handle is closed, even when closing
/// reported an error.
pub(crate) fn close<H: Handle>(
    h: &H,
    f: impl FnOnce(H::Inner) -> (Option<H::Inner>, FfiResult<()>),
) -> FfiResult<()> {
    let mut g = h.shell().lock();
    let inner = g.take().ok_or_else(|| {
        FfiError::new(
            CAIRN_E_CLOSED,
            format!("{} handle is already closed", H::NAME),
        )
    })?;
    let (back, r) = f(inner);
    *g = back;
    r
}

/// Frees a handle's box. An object still open is dropped with it (its dependants keep what they
/// need alive).
///
/// # Safety
/// `ptr` came from [`into_raw`] for this type, was checked by [`deref`], and no other thread is
/// using it.
pub(crate) unsafe fn free<H: Handle>(ptr: *mut H) {
    // SAFETY: by the contract, `ptr` is the live box from `into_raw` and this is the last use.
    let b = unsafe { Box::from_raw(ptr) };
    b.shell().magic.store(0, Ordering::Relaxed);
    drop(b);
}
