//! `cairn_queue`: the asynchronous API, a small io_uring over one volume.
//!
//! A thin shell over [`IoQueue::submit_raw`]: submit hands the caller's buffer straight to the
//! engine, poll and wait hand back `{user_data, result}` pairs. Per request it adds one slot
//! push/pop (to remember op and length for the stats and the completion's result) and two
//! relaxed counter increments; it never copies data and never allocates.

use crate::engine::out_arg;
use crate::error::{
    guard, guard_count, io_code, FfiError, FfiResult, CAIRN_E_INVALID, CAIRN_E_NULL,
    CAIRN_E_QUEUE_FULL, CAIRN_E_STOPPED, CAIRN_OK,
};
use crate::handle::{self, Handle, Shell};
use crate::volume::{volume_of, VolumeCore};
use cairn_engine::dma::IoBuf;
use cairn_engine::{IoOp, IoQueue, QueueCompletion};
use std::collections::VecDeque;
use std::ffi::{c_int, c_void};
use std::sync::Arc;

/// Read `len_bytes` at `offset_bytes` into `buf`.
pub const CAIRN_OP_READ: u32 = 0;
/// Write `len_bytes` from `buf` at `offset_bytes`.
pub const CAIRN_OP_WRITE: u32 = 1;
/// Make completed writes durable; offset, length and buffer are ignored.
pub const CAIRN_OP_FLUSH: u32 = 2;
/// Discard a range (advisory); no buffer.
pub const CAIRN_OP_TRIM: u32 = 3;
/// Zero a range; no buffer.
pub const CAIRN_OP_WRITE_ZEROES: u32 = 4;
/// A write that is durable when it completes (forced unit access).
pub const CAIRN_OP_WRITE_FUA: u32 = 5;

/// One finished request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct cairn_completion {
    /// The value given to `cairn_queue_submit`.
    pub user_data: u64,
    /// `CAIRN_OK`, or the negative error code of the failure (e.g. `CAIRN_E_IO`).
    pub result: c_int,
}

/// An asynchronous queue of `depth` request slots to one volume, served by one engine core.
///
/// Thread-safety: a queue may be used by one thread at a time (it may move between threads);
/// a call made while another thread is inside a call on the same queue fails with
/// `CAIRN_E_BUSY`. Use one queue per thread for parallel I/O.
/// Ownership: created by `cairn_queue_create`; it keeps its volume open. The memory passed to
/// `cairn_queue_submit` belongs to the library from submit until its completion is returned by
/// `cairn_queue_poll` or `cairn_queue_wait`: do not touch or free it before then.
/// `cairn_queue_close` waits for requests in flight (their completions are discarded) and
/// closes the queue; `cairn_queue_free` frees the handle itself and must be the last call.
pub struct cairn_queue {
    shell: Shell<QueueCore>,
}

impl Handle for cairn_queue {
    type Inner = QueueCore;
    const MAGIC: u64 = 0xCA1E_0004_0E0E_0004;
    const NAME: &'static str = "queue";
    fn shell(&self) -> &Shell<Self::Inner> {
        &self.shell
    }
    fn from_shell(shell: Shell<Self::Inner>) -> Self {
        cairn_queue { shell }
    }
}

#[derive(Clone, Copy)]
struct Slot {
    user_data: u64,
    op: IoOp,
    len_bytes: u32,
}

pub(crate) struct QueueCore {
    q: IoQueue,
    vol: Arc<VolumeCore>,
    /// What each in-flight request was, indexed by the tag the engine carries.
    slots: Vec<Slot>,
    free_slots: Vec<u32>,
    /// Completions `wait` took beyond the caller's array; returned first next time. At most
    /// `depth`, so the preallocated capacity is never exceeded.
    pending: VecDeque<cairn_completion>,
    /// Where `IoQueue::wait` puts completions; capacity `depth`.
    done: Vec<QueueCompletion>,
}

impl QueueCore {
    fn new(vol: Arc<VolumeCore>, depth: u32) -> FfiResult<QueueCore> {
        let q = vol
            .engine
            .engine
            .queue(&vol.handle, vol.engine.next_core(), depth)?;
        let empty = Slot {
            user_data: 0,
            op: IoOp::Flush,
            len_bytes: 0,
        };
        Ok(QueueCore {
            q,
            vol,
            slots: vec![empty; depth as usize],
            free_slots: (0..depth).rev().collect(),
            pending: VecDeque::with_capacity(depth as usize),
            done: Vec::with_capacity(depth as usize),
        })
    }

    /// Queues one request on the caller's memory.
    ///
    /// # Safety
    /// For reads and writes `buf` is valid for `len_bytes` and stays alive and untouched until
    /// the request's completion is returned by poll or wait (`cairn_queue_submit`'s contract).
    #[inline]
    unsafe fn submit(
        &mut self,
        op: IoOp,
        fua: bool,
        offset_bytes: u64,
        len_bytes: u32,
        buf: *mut u8,
        user_data: u64,
    ) -> FfiResult<()> {
        let moves_data = matches!(op, IoOp::Read | IoOp::Write);
        if moves_data && buf.is_null() {
            self.vol.stats.error();
            return Err(FfiError::new(CAIRN_E_NULL, format!("{op} buffer is NULL")));
        }
        let Some(tag) = self.free_slots.pop() else {
            return Err(FfiError::new(
                CAIRN_E_QUEUE_FULL,
                format!("queue is full: {} requests in flight", self.slots.len()),
            ));
        };
        self.slots[tag as usize] = Slot {
            user_data,
            op,
            len_bytes,
        };
        // SAFETY: forwarded from this function's contract.
        let io_buf = moves_data.then(|| unsafe { IoBuf::from_raw(buf, len_bytes) });
        // SAFETY: the caller's contract (cairn_queue_submit) keeps `buf` valid and untouched
        // until this request's completion is returned by poll or wait, which happens only
        // after the engine has reaped it from this queue.
        let r = unsafe {
            self.q
                .submit_raw(op, offset_bytes, len_bytes, io_buf, fua, u64::from(tag))
        };
        if let Err(e) = r {
            self.free_slots.push(tag);
            self.vol.stats.error();
            return Err(e.into());
        }
        Ok(())
    }

    #[inline]
    fn finish(&mut self, c: QueueCompletion) -> cairn_completion {
        let tag = c.user_data as u32;
        let slot = self.slots[tag as usize];
        self.free_slots.push(tag);
        self.vol
            .stats
            .record(slot.op, slot.len_bytes, c.result.is_ok());
        cairn_completion {
            user_data: slot.user_data,
            result: c.result.as_ref().map_or_else(io_code, |()| CAIRN_OK),
        }
    }

    /// Takes what has arrived, up to `out.len()`, pending ones first.
    fn poll(&mut self, out: &mut [cairn_completion]) -> usize {
        let mut n = 0;
        while n < out.len() {
            let Some(c) = self.pending.pop_front() else {
                break;
            };
            out[n] = c;
            n += 1;
        }
        while n < out.len() {
            let Some(c) = self.q.poll_one() else { break };
            out[n] = self.finish(c);
            n += 1;
        }
        n
    }

    /// Blocks until `min` completions are in `out` (capped at its length and at what is in
    /// flight). Completions beyond `out` are kept for the next call.
    fn wait(&mut self, min: usize, out: &mut [cairn_completion]) -> FfiResult<usize> {
        let min = min.min(out.len());
        let mut n = self.poll(out);
        while n < min && self.q.in_flight() > 0 {
            if self.q.wait(1, &mut self.done) == 0 {
                if n > 0 {
                    break;
                }
                return Err(FfiError::new(
                    CAIRN_E_STOPPED,
                    "the engine stopped with requests in flight",
                ));
            }
            let mut done = std::mem::take(&mut self.done);
            for c in done.drain(..) {
                let c = self.finish(c);
                if n < out.len() {
                    out[n] = c;
                    n += 1;
                } else {
                    self.pending.push_back(c);
                }
            }
            self.done = done;
        }
        Ok(n)
    }

    /// Waits for everything in flight and drops the completions.
    fn drain(&mut self) {
        while self.q.in_flight() > 0 {
            if self.q.wait(1, &mut self.done) == 0 {
                break;
            }
            self.done.clear();
        }
    }
}

/// Creates a queue of `depth` slots (1 to 4096) to `vol` and stores its handle in `*out` (NULL
/// on failure). Queues are spread over the engine's cores; each reserves `depth` of that
/// core's buffers, so `CAIRN_E_ENGINE` means the core's buffer pool is exhausted.
///
/// # Safety
/// `vol` is a live volume handle or NULL; `out` is NULL or valid for one pointer write.
#[no_mangle]
pub unsafe extern "C" fn cairn_queue_create(
    vol: *mut crate::volume::cairn_volume,
    depth: u32,
    out: *mut *mut cairn_queue,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let out = unsafe { out_arg(out, "out") }?;
        // SAFETY: forwarded from this function's contract.
        let v = unsafe { volume_of(vol) }?;
        *out = handle::into_raw::<cairn_queue>(QueueCore::new(v, depth)?);
        Ok(())
    })
}

fn decode_op(op: u32) -> FfiResult<(IoOp, bool)> {
    Ok(match op {
        CAIRN_OP_READ => (IoOp::Read, false),
        CAIRN_OP_WRITE => (IoOp::Write, false),
        CAIRN_OP_FLUSH => (IoOp::Flush, false),
        CAIRN_OP_TRIM => (IoOp::Trim, false),
        CAIRN_OP_WRITE_ZEROES => (IoOp::WriteZeroes, false),
        CAIRN_OP_WRITE_FUA => (IoOp::Write, true),
        other => {
            return Err(FfiError::new(
                CAIRN_E_INVALID,
                format!("op {other} is not a CAIRN_OP_* value"),
            ))
        }
    })
}

/// Queues one request. Returns `CAIRN_OK` once it is queued; its result arrives later as a
/// completion carrying `user_data`. A refused request (bad argument, `CAIRN_E_QUEUE_FULL`)
/// produces no completion. For reads and writes `buf` must be valid for `len_bytes`, aligned
/// to the volume's `buf_align_bytes`, and left untouched until the completion is returned.
///
/// # Safety
/// `queue` is a live queue handle or NULL; `buf` is NULL or valid as described above.
#[no_mangle]
pub unsafe extern "C" fn cairn_queue_submit(
    queue: *mut cairn_queue,
    op: u32,
    offset_bytes: u64,
    len_bytes: u32,
    buf: *mut c_void,
    user_data: u64,
) -> c_int {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let h = unsafe { handle::deref(queue) }?;
        let (op, fua) = decode_op(op)?;
        handle::with_exclusive(h, |q| {
            // SAFETY: forwarded from this function's contract.
            unsafe { q.submit(op, fua, offset_bytes, len_bytes, buf.cast(), user_data) }
        })
    })
}

/// Borrows the caller's completion array.
///
/// # Safety
/// `out` is NULL or valid for writing `max` completions.
unsafe fn out_slice<'a>(
    out: *mut cairn_completion,
    max: u32,
) -> FfiResult<&'a mut [cairn_completion]> {
    if max == 0 {
        return Ok(&mut []);
    }
    if out.is_null() {
        return Err(FfiError::null("out"));
    }
    // SAFETY: non-null and valid for `max` elements by the contract.
    Ok(unsafe { std::slice::from_raw_parts_mut(out, max as usize) })
}

/// Copies up to `max` completions that have arrived into `out` without waiting. Returns how
/// many (0 or more), or a negative error code.
///
/// # Safety
/// `queue` is a live queue handle or NULL; `out` is NULL or valid for `max` completions.
#[no_mangle]
pub unsafe extern "C" fn cairn_queue_poll(
    queue: *mut cairn_queue,
    out: *mut cairn_completion,
    max: u32,
) -> c_int {
    guard_count(|| {
        // SAFETY: forwarded from this function's contract.
        let h = unsafe { handle::deref(queue) }?;
        // SAFETY: forwarded from this function's contract.
        let out = unsafe { out_slice(out, max) }?;
        handle::with_exclusive(h, |q| Ok(q.poll(out) as c_int))
    })
}

/// Waits until at least `min` completions (capped at `max` and at the requests in flight) are
/// in `out`, then returns how many were copied (up to `max`), or a negative error code.
///
/// # Safety
/// `queue` is a live queue handle or NULL; `out` is NULL or valid for `max` completions.
#[no_mangle]
pub unsafe extern "C" fn cairn_queue_wait(
    queue: *mut cairn_queue,
    min: u32,
    out: *mut cairn_completion,
    max: u32,
) -> c_int {
    guard_count(|| {
        // SAFETY: forwarded from this function's contract.
        let h = unsafe { handle::deref(queue) }?;
        // SAFETY: forwarded from this function's contract.
        let out = unsafe { out_slice(out, max) }?;
        handle::with_exclusive(h, |q| Ok(q.wait(min as usize, out)? as c_int))
    })
}

/// Requests submitted and not yet returned by poll or wait.
///
/// # Safety
/// `queue` is a live queue handle or NULL.
#[no_mangle]
pub unsafe extern "C" fn cairn_queue_in_flight(queue: *mut cairn_queue) -> c_int {
    guard_count(|| {
        // SAFETY: forwarded from this function's contract.
        let h = unsafe { handle::deref(queue) }?;
        handle::with_exclusive(h, |q| Ok((q.slots.len() - q.free_slots.len()) as c_int))
    })
}

/// Waits for the requests in flight (their completions are discarded; their buffers may be
/// reused once this returns) and closes the queue. `CAIRN_E_CLOSED` if already closed. The
/// handle stays allocated until `cairn_queue_free`.
///
/// # Safety
/// `queue` is NULL or a queue handle not yet freed.
#[no_mangle]
pub unsafe extern "C" fn cairn_queue_close(queue: *mut cairn_queue) -> c_int {
    guard(|| {
        // SAFETY: forwarded from this function's contract.
        let h = unsafe { handle::deref(queue) }?;
        handle::close(h, |mut q| {
            q.drain();
            drop(q);
            (None, Ok(()))
        })
    })
}

/// Frees the handle, closing the queue first if it is open. NULL is accepted and ignored. The
/// pointer must not be used afterwards.
///
/// # Safety
/// `queue` is NULL or a queue handle not yet freed, and no other thread is using it.
#[no_mangle]
pub unsafe extern "C" fn cairn_queue_free(queue: *mut cairn_queue) -> c_int {
    guard(|| {
        if queue.is_null() {
            return Ok(());
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { handle::deref(queue) }?;
        // SAFETY: as above; already closed is fine.
        let _ = unsafe { cairn_queue_close(queue) };
        // SAFETY: checked above; the contract makes this the last use.
        unsafe { handle::free(queue) };
        Ok(())
    })
}
