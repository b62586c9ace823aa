//! [`IoQueue`], the thread-agnostic I/O API: requests and completions are fixed-size values in
//! preallocated rings, the request slots and DMA buffers belong to the queue, and a client
//! waits by polling, blocking, or awaiting ([`WaitCompletion`]).

use super::lifecycle::{send_blocking, ReactorRef};
use crate::bdev::{validate, Bdev, BdevInfo, IoError, IoOp};
use crate::dma::{IoBuf, Region};
use crate::msg::MsgRing;
use crate::reactor::{Completion, Msg, QueueEntry, QueueShared, Reactor};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

/// The client-side wake-up handshake: a waiter registers its waker and arms itself; the
/// reactor wakes it after posting completions. Lock-free on both sides (`AtomicWaker`), and a
/// reactor serving a client that is not waiting pays one relaxed-to-SeqCst load per batch.
#[derive(Debug, Default)]
pub(crate) struct Waiter {
    armed: AtomicBool,
    waker: atomic_waker::AtomicWaker,
}

impl Waiter {
    fn arm(&self, waker: &Waker) {
        self.waker.register(waker);
        self.armed.store(true, Ordering::SeqCst);
    }

    fn disarm(&self) {
        self.armed.store(false, Ordering::SeqCst);
    }

    /// Called by the reactor after it published completions.
    #[inline]
    pub(crate) fn wake(&self) {
        if self.armed.load(Ordering::SeqCst) && self.armed.swap(false, Ordering::SeqCst) {
            self.waker.wake();
        }
    }
}

struct ThreadWake(std::thread::Thread);

impl Wake for ThreadWake {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// A buffer owned by an [`IoQueue`]. Submitting a request that carries it hands it to the
/// engine; its completion hands it back.
#[derive(Debug, PartialEq, Eq)]
pub struct BufId(u32);

/// One request for [`IoQueue::submit`].
#[derive(Debug)]
pub struct Request {
    pub op: IoOp,
    pub offset_bytes: u64,
    pub len_bytes: u32,
    pub buf: Option<BufId>,
    pub fua: bool,
    pub user_data: u64,
}

/// One finished request, with its buffer back.
#[derive(Debug)]
pub struct QueueCompletion {
    pub user_data: u64,
    pub result: Result<(), IoError>,
    pub buf: Option<BufId>,
}

struct Slot {
    user_data: u64,
    op: IoOp,
    len_bytes: u32,
    buf: Option<u32>,
}

/// A client's queue to one bdev through one core. Usable from any one thread at a time.
pub struct IoQueue {
    shared: Arc<QueueShared>,
    inbox: Arc<MsgRing<Msg>>,
    region: Arc<Region>,
    info: BdevInfo,
    /// The device itself, to pick up a new size after it grew online.
    bdev: Arc<dyn Bdev>,
    depth: u32,
    slots: Vec<Option<Slot>>,
    free_slots: Vec<u32>,
    bufs: Vec<IoBuf>,
    free_bufs: Vec<u32>,
    thread_waker: Option<(std::thread::ThreadId, Waker)>,
    /// Completions a synchronous call took while waiting for its own; `poll` returns them.
    early: Vec<QueueCompletion>,
    /// Where a synchronous call collects completions; kept so it never allocates.
    scratch: Vec<QueueCompletion>,
}

impl std::fmt::Debug for IoQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoQueue")
            .field("bdev", &self.info.name)
            .field("depth", &self.depth)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

// SAFETY: the raw buffer views point into `region`, which the queue keeps alive; each view is
// used by the queue's one thread or, while a request is in flight, by the reactor alone.
unsafe impl Send for IoQueue {}

impl IoQueue {
    pub(super) fn new(
        shared: Arc<QueueShared>,
        reactor: &ReactorRef,
        bdev: Arc<dyn Bdev>,
        bufs: Vec<IoBuf>,
        depth: u32,
    ) -> IoQueue {
        let mut info = bdev.info().clone();
        info.size_bytes = bdev.size_bytes();
        IoQueue {
            shared,
            inbox: reactor.inbox.clone(),
            region: reactor.region.clone(),
            info,
            bdev,
            depth,
            slots: (0..depth).map(|_| None).collect(),
            free_slots: (0..depth).rev().collect(),
            free_bufs: (0..bufs.len() as u32).rev().collect(),
            bufs,
            thread_waker: None,
            early: Vec::with_capacity(depth as usize),
            scratch: Vec::with_capacity(depth as usize),
        }
    }

    pub fn info(&self) -> &BdevInfo {
        &self.info
    }

    pub fn depth(&self) -> u32 {
        self.depth
    }

    pub fn in_flight(&self) -> u32 {
        self.depth - self.free_slots.len() as u32
    }

    /// Size of every queue buffer, and so the largest read or write one request can carry.
    pub fn buf_size_bytes(&self) -> u32 {
        self.bufs.first().map_or(0, IoBuf::len_bytes)
    }

    pub fn alloc_buf(&mut self) -> Result<BufId, IoError> {
        self.free_bufs
            .pop()
            .map(BufId)
            .ok_or(IoError::NoFreeBuffer {
                count: self.bufs.len() as u32,
            })
    }

    pub fn free_buf(&mut self, buf: BufId) {
        self.free_bufs.push(buf.0);
    }

    pub fn buf(&self, buf: &BufId) -> &[u8] {
        let b = self.bufs[buf.0 as usize];
        debug_assert!(self.region_contains(&b));
        // SAFETY: the view lies in `region`, kept alive by this queue, and holding the BufId
        // means no request is using it.
        unsafe { b.as_slice(b.len_bytes()) }
    }

    pub fn buf_mut(&mut self, buf: &BufId) -> &mut [u8] {
        let b = self.bufs[buf.0 as usize];
        debug_assert!(self.region_contains(&b));
        // SAFETY: as in `buf`; `&mut self` makes this the only view the client holds.
        unsafe { b.as_mut_slice(b.len_bytes()) }
    }

    fn region_contains(&self, b: &IoBuf) -> bool {
        let base = self.region.base() as usize;
        let p = b.ptr() as usize;
        p >= base && p + b.len_bytes() as usize <= base + self.region.len_bytes()
    }

    /// Queues one request. Bad requests are refused here, with the buffer given back inside
    /// the error's tuple so the caller keeps it.
    pub fn submit(&mut self, req: Request) -> Result<(), (IoError, Option<BufId>)> {
        let view = req.buf.as_ref().map(|b| self.bufs[b.0 as usize]);
        let buf_index = req.buf.as_ref().map(|b| b.0);
        // SAFETY: the view comes from this queue's own buffer, whose BufId the caller gave up
        // by value; it stays untouched until the completion returns the BufId.
        let r = unsafe {
            self.submit_inner(
                req.op,
                req.offset_bytes,
                req.len_bytes,
                view,
                req.fua,
                req.user_data,
                buf_index,
            )
        };
        r.map_err(|e| (e, req.buf))
    }

    /// Queues one request on caller-owned memory, as the C ABI does.
    ///
    /// # Safety
    /// `buf` must stay valid, and must not be read or written by anyone else, until the
    /// request's completion has been reaped from this queue.
    pub unsafe fn submit_raw(
        &mut self,
        op: IoOp,
        offset_bytes: u64,
        len_bytes: u32,
        buf: Option<IoBuf>,
        fua: bool,
        user_data: u64,
    ) -> Result<(), IoError> {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.submit_inner(op, offset_bytes, len_bytes, buf, fua, user_data, None) }
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn submit_inner(
        &mut self,
        op: IoOp,
        offset_bytes: u64,
        len_bytes: u32,
        buf: Option<IoBuf>,
        fua: bool,
        user_data: u64,
        buf_index: Option<u32>,
    ) -> Result<(), IoError> {
        self.validate(op, offset_bytes, len_bytes, buf.as_ref())?;
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(IoError::EngineStopped);
        }
        let tag = self
            .free_slots
            .pop()
            .ok_or(IoError::QueueFull { depth: self.depth })?;
        self.slots[tag as usize] = Some(Slot {
            user_data,
            op,
            len_bytes,
            buf: buf_index,
        });
        let entry = QueueEntry {
            req_op: op,
            offset_bytes,
            len_bytes,
            buf,
            fua,
            tag,
        };
        let pushed = self.shared.sq.push(entry);
        debug_assert!(pushed.is_ok(), "submission ring holds depth entries");
        self.inbox.doorbell().ring_if_sleeping();
        Ok(())
    }

    /// Takes every completion that has arrived, without waiting.
    pub fn poll(&mut self, out: &mut Vec<QueueCompletion>) -> usize {
        // Read before draining `cq`: once set, every completion the reactor will ever push
        // is already there.
        let stopped = self.shared.stopped.load(Ordering::Acquire);
        let mut n = self.early.len();
        out.append(&mut self.early);
        while let Some(c) = self.shared.cq.pop() {
            out.push(self.finish(c));
            n += 1;
        }
        while let Some(c) = self.stranded(stopped) {
            out.push(c);
            n += 1;
        }
        n
    }

    /// A request submitted after the reactor last looked at `sq` can never complete; once the
    /// reactor has stopped (and so no longer touches `sq`) it fails here with EngineStopped.
    fn stranded(&mut self, stopped: bool) -> Option<QueueCompletion> {
        if !stopped {
            return None;
        }
        let e = self.shared.sq.pop()?;
        Some(self.finish(Completion {
            tag: e.tag,
            res: -libc::ENODEV,
        }))
    }

    /// Like [`IoQueue::poll`] for callers that want one at a time.
    pub fn poll_one(&mut self) -> Option<QueueCompletion> {
        if let Some(c) = self.early.pop() {
            return Some(c);
        }
        let stopped = self.shared.stopped.load(Ordering::Acquire);
        match self.shared.cq.pop() {
            Some(c) => Some(self.finish(c)),
            None => self.stranded(stopped),
        }
    }

    fn finish(&mut self, c: Completion) -> QueueCompletion {
        let slot = self.slots[c.tag as usize]
            .take()
            .expect("completion for a free slot");
        self.free_slots.push(c.tag);
        QueueCompletion {
            user_data: slot.user_data,
            result: if c.res == -libc::ENODEV {
                Err(IoError::EngineStopped)
            } else {
                IoError::check(slot.op, c.res, slot.len_bytes)
            },
            buf: slot.buf.map(BufId),
        }
    }

    /// Blocks until at least `min` completions (capped at what is in flight) have been taken.
    pub fn wait(&mut self, min: usize, out: &mut Vec<QueueCompletion>) -> usize {
        let mut n = self.poll(out);
        while n < min && self.in_flight() > 0 {
            if self.shared.stopped.load(Ordering::Acquire) {
                // This poll takes everything that will ever arrive; anything still in flight
                // was lost by a reactor that gave up draining, and waiting cannot bring it.
                n += self.poll(out);
                break;
            }
            self.park();
            n += self.poll(out);
        }
        n
    }

    fn park(&mut self) {
        let me = std::thread::current();
        let waker = match &self.thread_waker {
            Some((id, w)) if *id == me.id() => w.clone(),
            _ => {
                let w = Waker::from(Arc::new(ThreadWake(me.clone())));
                self.thread_waker = Some((me.id(), w.clone()));
                w
            }
        };
        self.shared.waiter.arm(&waker);
        if !self.has_completions() {
            // The timeout only guards against a reactor that stopped while we slept.
            std::thread::park_timeout(Duration::from_millis(100));
        }
        self.shared.waiter.disarm();
    }

    /// Resolves once at least one completion can be polled (or nothing is in flight).
    pub fn wait_async(&mut self) -> WaitCompletion<'_> {
        WaitCompletion { queue: self }
    }

    /// Reads `dst.len()` bytes at `offset_bytes`, waiting for the result. Other requests may
    /// be in flight; their completions stay queued for the next poll.
    pub fn read_at(&mut self, offset_bytes: u64, dst: &mut [u8]) -> Result<(), IoError> {
        self.check_span(IoOp::Read, offset_bytes, dst.len())?;
        let chunk = self.buf_size_bytes() as usize;
        for (i, part) in dst.chunks_mut(chunk).enumerate() {
            let buf = self.alloc_buf()?;
            let offset = offset_bytes + (i * chunk) as u64;
            let buf = self.run_sync(IoOp::Read, offset, part.len() as u32, Some(buf), false)?;
            let buf = buf.expect("read returns its buffer");
            part.copy_from_slice(&self.buf(&buf)[..part.len()]);
            self.free_buf(buf);
        }
        Ok(())
    }

    /// Writes `src` at `offset_bytes` and waits; `fua` makes it durable on completion.
    pub fn write_at(&mut self, offset_bytes: u64, src: &[u8], fua: bool) -> Result<(), IoError> {
        self.check_span(IoOp::Write, offset_bytes, src.len())?;
        let chunk = self.buf_size_bytes() as usize;
        for (i, part) in src.chunks(chunk).enumerate() {
            let buf = self.alloc_buf()?;
            self.buf_mut(&buf)[..part.len()].copy_from_slice(part);
            let offset = offset_bytes + (i * chunk) as u64;
            let buf = self.run_sync(IoOp::Write, offset, part.len() as u32, Some(buf), fua)?;
            self.free_buf(buf.expect("write returns its buffer"));
        }
        Ok(())
    }

    /// Validates every buffer-sized piece of a `read_at`/`write_at` span before the first is
    /// issued, so a bad tail is refused without the head having been written, and an empty
    /// span is refused like any zero-length request.
    fn check_span(&mut self, op: IoOp, offset_bytes: u64, len_bytes: usize) -> Result<(), IoError> {
        if len_bytes == 0 {
            return Err(IoError::ZeroLength { op });
        }
        let chunk = self.buf_size_bytes() as usize;
        let view = self.bufs.first().copied();
        for start in (0..len_bytes).step_by(chunk) {
            let part = chunk.min(len_bytes - start) as u32;
            let offset = offset_bytes.saturating_add(start as u64);
            self.validate(op, offset, part, view.as_ref())?;
        }
        Ok(())
    }

    /// Validates against the bdev; a request beyond the end first re-reads the size, since
    /// the device may have grown since the queue was opened.
    fn validate(
        &mut self,
        op: IoOp,
        offset_bytes: u64,
        len_bytes: u32,
        buf: Option<&IoBuf>,
    ) -> Result<(), IoError> {
        match validate(&self.info, op, offset_bytes, len_bytes, buf) {
            Err(IoError::OutOfRange { .. }) if self.bdev.size_bytes() > self.info.size_bytes => {
                self.info.size_bytes = self.bdev.size_bytes();
                validate(&self.info, op, offset_bytes, len_bytes, buf)
            }
            r => r,
        }
    }

    /// Makes every completed write durable.
    pub fn flush(&mut self) -> Result<(), IoError> {
        self.run_sync(IoOp::Flush, 0, 0, None, false).map(drop)
    }

    pub fn trim(&mut self, offset_bytes: u64, len_bytes: u32) -> Result<(), IoError> {
        self.run_sync(IoOp::Trim, offset_bytes, len_bytes, None, false)
            .map(drop)
    }

    pub fn write_zeroes(&mut self, offset_bytes: u64, len_bytes: u32) -> Result<(), IoError> {
        self.run_sync(IoOp::WriteZeroes, offset_bytes, len_bytes, None, false)
            .map(drop)
    }

    fn run_sync(
        &mut self,
        op: IoOp,
        offset_bytes: u64,
        len_bytes: u32,
        buf: Option<BufId>,
        fua: bool,
    ) -> Result<Option<BufId>, IoError> {
        const SYNC_TAG: u64 = u64::MAX;
        let req = Request {
            op,
            offset_bytes,
            len_bytes,
            buf,
            fua,
            user_data: SYNC_TAG,
        };
        if let Err((e, buf)) = self.submit(req) {
            if let Some(b) = buf {
                self.free_buf(b);
            }
            return Err(e);
        }
        let mut stash = std::mem::take(&mut self.scratch);
        let mut mine = None;
        while mine.is_none() {
            if self.wait(1, &mut stash) == 0 {
                // Only a stopped engine returns nothing while our request is in flight.
                self.requeue(stash);
                return Err(IoError::EngineStopped);
            }
            if let Some(i) = stash.iter().position(|c| c.user_data == SYNC_TAG) {
                mine = Some(stash.swap_remove(i));
            }
        }
        self.requeue(stash);
        let c = mine.expect("loop exits with our completion");
        match c.result {
            Ok(()) => Ok(c.buf),
            Err(e) => {
                if let Some(b) = c.buf {
                    self.free_buf(b);
                }
                Err(e)
            }
        }
    }

    /// Puts completions a synchronous call collected on the way back where `poll` finds them.
    /// Their slots were already freed, so they go back in as finished requests.
    fn requeue(&mut self, mut stash: Vec<QueueCompletion>) {
        self.early.append(&mut stash);
        self.scratch = stash;
    }

    fn has_completions(&self) -> bool {
        !self.early.is_empty()
            || !self.shared.cq.is_empty()
            || self.shared.stopped.load(Ordering::Acquire)
    }
}

impl Drop for IoQueue {
    /// Tells the reactor to retire the queue once its in-flight requests finish; the reactor
    /// then returns the buffers to its pool. Raw buffers still in flight stay the caller's
    /// responsibility until then, which is why `submit_raw` is unsafe.
    fn drop(&mut self) {
        if self.shared.stopped.load(Ordering::Acquire) {
            // The reactor is gone and has already returned this queue's buffers.
            return;
        }
        let id = self.shared.id;
        if !send_blocking(
            &self.inbox,
            Msg::Control(Box::new(move |r: &mut Reactor| r.close_queue(id))),
        ) {
            tracing::warn!(
                queue = id,
                "reactor inbox stayed full; queue buffers return at engine stop"
            );
        }
    }
}

/// Future returned by [`IoQueue::wait_async`].
#[derive(Debug)]
pub struct WaitCompletion<'a> {
    queue: &'a mut IoQueue,
}

impl Future for WaitCompletion<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let q = &*self.get_mut().queue;
        if q.has_completions() || q.in_flight() == 0 {
            return Poll::Ready(());
        }
        q.shared.waiter.arm(cx.waker());
        if q.has_completions() {
            q.shared.waiter.disarm();
            return Poll::Ready(());
        }
        Poll::Pending
    }
}
