//! The engine handle and the public, thread-agnostic I/O API.
//!
//! [`Engine::start`] brings up one pinned reactor per configured core. Bdevs are added once and
//! get a channel on every core. Any thread submits I/O through an [`IoQueue`]: a queue is bound
//! to one bdev and one core, owns `depth` DMA buffers reserved from that core's pool, and
//! forwards requests over a lock-free ring to the reactor, which posts completions back over
//! another. Completions can be polled, waited for (blocking), or awaited (`wait_async`).
//!
//! Control operations (adding bdevs, binding queues, spawning pollers) are closures sent to a
//! reactor's inbox; they may allocate. The I/O path through a queue does not: requests and
//! completions are fixed-size values in preallocated rings, and the request slots and buffers
//! belong to the queue.

use crate::bdev::{validate, Bdev, BdevError, BdevInfo, IoError, IoOp};
use crate::core_list::{CoreId, CoreList};
use crate::dma::{IoBuf, Region};
use crate::msg::{Full, MsgRing, INBOX_CAPACITY_DEFAULT};
use crate::reactor::ring::RING_ENTRIES_DEFAULT;
use crate::reactor::{
    BdevId, Completion, Core, IdlePolicy, Msg, Peer, Poller, QueueEntry, QueueShared, Reactor,
    ReactorTimesCell,
};
use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

/// Default size of one DMA buffer: the largest single request a queue or poller can issue.
pub const BUF_SIZE_DEFAULT_BYTES: u32 = 128 << 10;
/// Default buffers per core (32 MiB with the default size).
pub const BUF_COUNT_DEFAULT: u32 = 256;
/// Deepest client queue; also bounds the request tag space of one queue.
pub const QUEUE_DEPTH_MAX: u32 = 4096;
/// How long a control request waits for a reactor's answer before reporting it stuck.
pub const CONTROL_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the engine needs at start.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub cores: CoreList,
    pub idle: IdlePolicy,
    pub buf_count: u32,
    pub buf_size_bytes: u32,
    /// Try 2 MiB huge pages for buffer pools; falls back to normal pages.
    pub huge_pages: bool,
    pub ring_entries: u32,
    pub inbox_capacity: usize,
}

impl EngineConfig {
    pub fn new(cores: CoreList) -> EngineConfig {
        EngineConfig {
            cores,
            idle: IdlePolicy::default(),
            buf_count: BUF_COUNT_DEFAULT,
            buf_size_bytes: BUF_SIZE_DEFAULT_BYTES,
            huge_pages: true,
            ring_entries: RING_ENTRIES_DEFAULT,
            inbox_capacity: INBOX_CAPACITY_DEFAULT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("core {core} does not exist or is not allowed for this process (allowed: {allowed})")]
    CoreUnavailable { core: CoreId, allowed: String },
    #[error("core {core}: creating its io_uring failed: {source}")]
    Ring {
        core: CoreId,
        source: std::io::Error,
    },
    #[error("core {core}: {source}")]
    Dma {
        core: CoreId,
        source: crate::dma::DmaError,
    },
    #[error("core {core}: {what}: {source}")]
    Os {
        core: CoreId,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("core {core}: bdev '{bdev}': {source}")]
    Bdev {
        core: CoreId,
        bdev: String,
        source: BdevError,
    },
    #[error("core {core}: only {available} free buffers, queue wants {wanted}")]
    PoolExhausted {
        core: CoreId,
        wanted: u32,
        available: u32,
    },
    #[error("core {core} is not one of this engine's cores")]
    NotEngineCore { core: CoreId },
    #[error("queue depth {depth} must be between 1 and {QUEUE_DEPTH_MAX}")]
    QueueDepth { depth: u32 },
    #[error("core {core}: the reactor did not answer within {CONTROL_REPLY_TIMEOUT:?}")]
    Stuck { core: CoreId },
    #[error("core {core}: the reactor has stopped")]
    Stopped { core: CoreId },
}

struct ReactorRef {
    core: CoreId,
    inbox: Arc<MsgRing<Msg>>,
    region: Arc<Region>,
    times: Arc<ReactorTimesCell>,
}

/// Where one reactor's wall time has gone since it started (see [`Engine::reactor_times`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReactorTimes {
    pub core: CoreId,
    /// Loop iterations that found work.
    pub busy_ns: u64,
    /// Loop iterations that found none, spinning and sleeping included.
    pub idle_ns: u64,
}

struct Shared {
    reactors: Vec<ReactorRef>,
    bdevs: Mutex<Vec<Arc<dyn Bdev>>>,
    next_queue_id: AtomicU64,
    stopped: AtomicBool,
}

/// A running engine. Dropping it stops it.
pub struct Engine {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let cores: Vec<_> = self.shared.reactors.iter().map(|r| r.core.get()).collect();
        f.debug_struct("Engine").field("cores", &cores).finish()
    }
}

/// A bdev added to the engine: its id on every core and its description.
#[derive(Clone, Debug)]
pub struct BdevHandle {
    id: BdevId,
    info: BdevInfo,
}

impl BdevHandle {
    pub fn id(&self) -> BdevId {
        self.id
    }

    pub fn info(&self) -> &BdevInfo {
        &self.info
    }
}

impl Engine {
    /// Starts one pinned reactor per configured core and waits until all are running.
    pub fn start(config: EngineConfig) -> Result<Engine, EngineError> {
        let allowed = allowed_cpus();
        for &core in config.cores.as_slice() {
            if !allowed.contains(&core.get()) {
                return Err(EngineError::CoreUnavailable {
                    core,
                    allowed: format_cpus(&allowed),
                });
            }
        }
        let mut engine = Engine {
            shared: Arc::new(Shared {
                reactors: Vec::new(),
                bdevs: Mutex::new(Vec::new()),
                next_queue_id: AtomicU64::new(1),
                stopped: AtomicBool::new(false),
            }),
            threads: Vec::new(),
        };
        let mut reactors = Vec::new();
        for &core in config.cores.as_slice() {
            match spawn_reactor(core, &config) {
                Ok((reactor, thread)) => {
                    reactors.push(reactor);
                    engine.threads.push(thread);
                }
                Err(e) => {
                    stop_all(&reactors);
                    engine.threads.drain(..).for_each(|t| drop(t.join()));
                    return Err(e);
                }
            }
        }
        let peers: Arc<[Peer]> = reactors
            .iter()
            .map(|r| Peer {
                core: r.core,
                inbox: r.inbox.clone(),
            })
            .collect();
        Arc::get_mut(&mut engine.shared)
            .expect("not yet shared")
            .reactors = reactors;
        for core in engine.cores() {
            let peers = peers.clone();
            engine.send_and_wait(core, move |r: &mut Reactor| r.set_peers(peers))?;
        }
        Ok(engine)
    }

    /// The device behind `bdev`, for control paths that ask it directly (its size after a
    /// grow, its allocation map).
    pub fn bdev(&self, bdev: &BdevHandle) -> Arc<dyn Bdev> {
        self.shared.bdevs.lock()[bdev.id.0 as usize].clone()
    }

    pub fn cores(&self) -> Vec<CoreId> {
        self.shared.reactors.iter().map(|r| r.core).collect()
    }

    /// Busy and idle time of every reactor, in core order. Reads relaxed counters the
    /// reactors keep; it sends no message and never waits for a reactor.
    pub fn reactor_times(&self) -> Vec<ReactorTimes> {
        self.shared
            .reactors
            .iter()
            .map(|r| ReactorTimes {
                core: r.core,
                busy_ns: r.times.busy_ns(),
                idle_ns: r.times.idle_ns(),
            })
            .collect()
    }

    /// Adds a bdev and opens its channel on every core. If any core fails, the channels
    /// already opened are closed again.
    pub fn add_bdev(&self, bdev: Arc<dyn Bdev>) -> Result<BdevHandle, EngineError> {
        let mut bdevs = self.shared.bdevs.lock();
        let id = BdevId(bdevs.len() as u32);
        for (i, r) in self.shared.reactors.iter().enumerate() {
            let b = bdev.clone();
            let name = bdev.info().name.clone();
            let core = r.core;
            let opened = self
                .call(core, move |c: &mut Core| c.open_bdev(id, b))
                .and_then(|r| {
                    r.map_err(|source| EngineError::Bdev {
                        core,
                        bdev: name,
                        source,
                    })
                });
            if let Err(e) = opened {
                let done: Vec<CoreId> = self.shared.reactors[..i].iter().map(|r| r.core).collect();
                drop(self.close_channels(id, &done));
                return Err(e);
            }
        }
        let info = bdev.info().clone();
        bdevs.push(bdev);
        Ok(BdevHandle { id, info })
    }

    /// Removes a bdev: every core stops taking new requests for it at once, and this returns
    /// when every core has closed its channel after the requests in flight completed. The id
    /// is not reused.
    pub fn remove_bdev(&self, bdev: &BdevHandle) -> Result<(), EngineError> {
        self.close_channels(bdev.id, &self.cores())
    }

    fn close_channels(&self, id: BdevId, cores: &[CoreId]) -> Result<(), EngineError> {
        let mut waits = Vec::new();
        for &core in cores {
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            self.call(core, move |c: &mut Core| c.remove_bdev(id, tx))?;
            waits.push((core, rx));
        }
        for (core, rx) in waits {
            rx.recv_timeout(CONTROL_REPLY_TIMEOUT)
                .map_err(|_| EngineError::Stuck { core })?;
        }
        Ok(())
    }

    /// Makes every core re-read a bdev's size after it grew online.
    pub fn refresh_bdev(&self, bdev: BdevId) -> Result<(), EngineError> {
        for core in self.cores() {
            self.call(core, move |c: &mut Core| c.refresh_bdev(bdev))?;
        }
        Ok(())
    }

    /// Opens a client queue to `bdev` through `core`'s reactor, with `depth` request slots and
    /// as many buffers of the engine's buffer size.
    pub fn queue(
        &self,
        bdev: &BdevHandle,
        core: CoreId,
        depth: u32,
    ) -> Result<IoQueue, EngineError> {
        if depth == 0 || depth > QUEUE_DEPTH_MAX {
            return Err(EngineError::QueueDepth { depth });
        }
        let reactor = self.reactor(core)?;
        let shared = Arc::new(QueueShared {
            id: self.shared.next_queue_id.fetch_add(1, Ordering::Relaxed),
            sq: crossbeam_queue::ArrayQueue::new(depth as usize),
            cq: crossbeam_queue::ArrayQueue::new(depth as usize),
            waiter: Waiter::default(),
            stopped: AtomicBool::new(false),
        });
        let bridge = shared.clone();
        let bdev_id = bdev.id;
        let bufs = self.send_and_wait(core, move |r: &mut Reactor| {
            r.add_queue(bridge, bdev_id, depth)
        })??;
        let device = self.shared.bdevs.lock()[bdev.id.0 as usize].clone();
        Ok(IoQueue::new(shared, reactor, device, bufs, depth))
    }

    /// Runs `poller` on `core` every loop, or every `period` when given.
    pub fn spawn_poller(
        &self,
        core: CoreId,
        poller: Box<dyn Poller>,
        period: Option<Duration>,
    ) -> Result<(), EngineError> {
        self.send_and_wait(core, move |r: &mut Reactor| r.add_poller(poller, period))
    }

    /// Runs `f` on `core`'s reactor and returns its result.
    pub fn call<R: Send + 'static>(
        &self,
        core: CoreId,
        f: impl FnOnce(&mut Core) -> R + Send + 'static,
    ) -> Result<R, EngineError> {
        self.send_and_wait(core, move |r: &mut Reactor| f(r.core()))
    }

    fn reactor(&self, core: CoreId) -> Result<&ReactorRef, EngineError> {
        self.shared
            .reactors
            .iter()
            .find(|r| r.core == core)
            .ok_or(EngineError::NotEngineCore { core })
    }

    fn send_and_wait<R: Send + 'static>(
        &self,
        core: CoreId,
        f: impl FnOnce(&mut Reactor) -> R + Send + 'static,
    ) -> Result<R, EngineError> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(EngineError::Stopped { core });
        }
        let reactor = self.reactor(core)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let msg = Msg::Control(Box::new(move |r: &mut Reactor| drop(tx.send(f(r)))));
        if !send_blocking(&reactor.inbox, msg) {
            return Err(EngineError::Stuck { core });
        }
        match rx.recv_timeout(CONTROL_REPLY_TIMEOUT) {
            Ok(r) => Ok(r),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(EngineError::Stuck { core }),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Err(EngineError::Stopped { core })
            }
        }
    }

    /// Stops every reactor after it has drained its in-flight I/O, and joins the threads.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if self.shared.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        stop_all(&self.shared.reactors);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a reactor thread panicked");
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn stop_all(reactors: &[ReactorRef]) {
    for r in reactors {
        if !send_blocking(&r.inbox, Msg::Control(Box::new(|r: &mut Reactor| r.stop()))) {
            tracing::error!(
                core = r.core.get(),
                "reactor inbox stayed full; it cannot be told to stop"
            );
        }
    }
}

/// Control messages are rare; a full inbox means the reactor is busy, so wait for room, up to
/// [`CONTROL_REPLY_TIMEOUT`]. Returns false if the message could not be queued.
fn send_blocking(inbox: &MsgRing<Msg>, mut msg: Msg) -> bool {
    let deadline = std::time::Instant::now() + CONTROL_REPLY_TIMEOUT;
    loop {
        match inbox.send(msg) {
            Ok(()) => return true,
            Err(Full(back)) if std::time::Instant::now() < deadline => {
                msg = back;
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(Full(_)) => return false,
        }
    }
}

fn spawn_reactor(
    core: CoreId,
    config: &EngineConfig,
) -> Result<(ReactorRef, JoinHandle<()>), EngineError> {
    let inbox =
        Arc::new(
            MsgRing::new(config.inbox_capacity).map_err(|source| EngineError::Os {
                core,
                what: "creating the doorbell eventfd",
                source,
            })?,
        );
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let thread_inbox = inbox.clone();
    let config = config.clone();
    let thread = std::thread::Builder::new()
        .name(format!("cairn-r{core}"))
        .spawn(move || {
            let built = pin_to(core).and_then(|()| Reactor::new(core, &config, thread_inbox));
            match built {
                Ok((reactor, ready)) => {
                    drop(tx.send(Ok(ready)));
                    reactor.run();
                }
                Err(e) => drop(tx.send(Err(e))),
            }
        })
        .map_err(|source| EngineError::Os {
            core,
            what: "spawning the reactor thread",
            source,
        })?;
    let ready = rx.recv().map_err(|_| EngineError::Stopped { core })?;
    match ready {
        Ok(ready) => Ok((
            ReactorRef {
                core,
                inbox,
                region: ready.region,
                times: ready.times,
            },
            thread,
        )),
        Err(e) => {
            drop(thread.join());
            Err(e)
        }
    }
}

fn pin_to(core: CoreId) -> Result<(), EngineError> {
    // SAFETY: cpu_set_t is plain data; zeroed is its empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the core id is below CORES_MAX (1024 = CPU_SETSIZE), checked by CoreId::new.
    unsafe { libc::CPU_SET(core.get() as usize, &mut set) };
    // SAFETY: passes a valid cpu_set_t of the size given; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        return Err(EngineError::Os {
            core,
            what: "pinning the reactor thread",
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// CPUs this process may run on.
pub fn allowed_cpus() -> Vec<u32> {
    // SAFETY: cpu_set_t is plain data; zeroed is its empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: passes a writable cpu_set_t of the size given; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Vec::new();
    }
    (0..crate::core_list::CORES_MAX as u32)
        // SAFETY: the index is below CPU_SETSIZE and the set is initialised.
        .filter(|&c| unsafe { libc::CPU_ISSET(c as usize, &set) })
        .collect()
}

fn format_cpus(cpus: &[u32]) -> String {
    let list: Vec<String> = cpus.iter().map(u32::to_string).collect();
    list.join(",")
}

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
    fn new(
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
        self.bufs.first().map_or(0, |b| b.len_bytes)
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
        unsafe { std::slice::from_raw_parts(b.ptr, b.len_bytes as usize) }
    }

    pub fn buf_mut(&mut self, buf: &BufId) -> &mut [u8] {
        let b = self.bufs[buf.0 as usize];
        debug_assert!(self.region_contains(&b));
        // SAFETY: as in `buf`; `&mut self` makes this the only view the client holds.
        unsafe { std::slice::from_raw_parts_mut(b.ptr, b.len_bytes as usize) }
    }

    fn region_contains(&self, b: &IoBuf) -> bool {
        let base = self.region.base() as usize;
        let p = b.ptr as usize;
        p >= base && p + b.len_bytes as usize <= base + self.region.len_bytes()
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
