//! Reactors: one pinned thread per configured core, each a run-to-completion poll loop.
//!
//! A reactor owns everything its core touches on the I/O path: its io_uring with registered
//! files and fixed buffers ([`ring`]), its buffer pool, its bdev channels, its pollers and
//! timers, the completion queues of its owners, and the bridges of client queues bound to it.
//! Nothing here is shared with another core except the inbound message ring and the client
//! queues' submission/completion rings, which are lock-free. Code on another core reaches this
//! one only by sending a message: a data-path message is a fixed-size value (`Msg::Pool`),
//! a boxed closure (`Msg::Control`) is for the control path only. State a subsystem keeps on
//! one core (a pool's home state) lives in that core's local slots (`Core::with_local`),
//! reached only from the core itself, so it needs no lock.
//!
//! Idle policy: a reactor that found no work spins for `spin` and then sleeps in
//! `io_uring_enter` until a completion, a doorbell or its next timer. In `Poll` mode it never
//! sleeps.

pub mod ring;

use crate::bdev::{validate, Bdev, BdevChannel, BdevInfo, IoError, IoRequest};
use crate::core_list::CoreId;
use crate::dma::{BufPool, DmaBuf};
use crate::msg::MsgRing;
use ring::{Ring, Route};
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest a stopping reactor waits for in-flight I/O before it exits anyway (and says so).
pub const SHUTDOWN_DRAIN_MAX: Duration = Duration::from_secs(30);
/// Client-queue submissions a reactor takes from one queue per loop, so one busy client
/// cannot starve the others.
pub const QUEUE_BATCH_MAX: usize = 64;
/// Deferred submissions ([`IoCtx::submit_to`]) a core has room for without growing; more is
/// allowed (they never outlive one loop step) but costs an allocation.
const DEFERRED_CAPACITY: usize = 1024;
/// Control messages a reactor handles per loop, so control traffic cannot starve I/O.
pub const INBOX_BATCH_MAX: usize = 32;

/// How a reactor behaves when it has nothing to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdlePolicy {
    /// Spin this long after the last piece of work, then sleep in the kernel.
    Sleep { spin: Duration },
    /// Never sleep: for cores dedicated to the engine.
    Poll,
}

/// Default spin before sleeping: long enough to catch the next request of a busy client,
/// short enough that an idle engine costs nothing measurable.
pub const SPIN_DEFAULT: Duration = Duration::from_micros(50);

impl Default for IdlePolicy {
    fn default() -> Self {
        IdlePolicy::Sleep { spin: SPIN_DEFAULT }
    }
}

/// Where one reactor's wall time went: loop iterations that found work count as busy, the
/// rest (spinning and sleeping included) as idle. Written only by the reactor's own thread,
/// so the counters are plain relaxed load+store pairs, never contended read-modify-writes;
/// any thread may read them (for metrics), seeing values at most one iteration old.
#[derive(Debug, Default)]
pub struct ReactorTimesCell {
    busy_ns: AtomicU64,
    idle_ns: AtomicU64,
}

impl ReactorTimesCell {
    /// Adds one iteration's duration. Only the owning reactor calls this.
    fn account(&self, busy: bool, elapsed: Duration) {
        let counter = if busy { &self.busy_ns } else { &self.idle_ns };
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_add(ns),
            Ordering::Relaxed,
        );
    }

    pub fn busy_ns(&self) -> u64 {
        self.busy_ns.load(Ordering::Relaxed)
    }

    pub fn idle_ns(&self) -> u64 {
        self.idle_ns.load(Ordering::Relaxed)
    }
}

/// A completion queue on one core: whoever submits I/O registers as an owner and reaps its
/// completions from here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerId(u32);

impl OwnerId {
    pub fn get(self) -> u32 {
        self.0
    }

    /// Rebuilds an id decoded from a ring completion's user_data.
    pub(crate) fn from_raw(id: u32) -> OwnerId {
        OwnerId(id)
    }
}

/// One finished request: the submitter's tag and the io_uring-style result (bytes moved, or a
/// negative errno). [`IoError::check`] interprets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub tag: u32,
    pub res: i32,
}

#[derive(Debug, Default)]
struct Owners {
    queues: Vec<Option<VecDeque<Completion>>>,
    free: Vec<u32>,
    pending: usize,
}

impl Owners {
    fn register(&mut self, capacity: usize) -> OwnerId {
        let queue = Some(VecDeque::with_capacity(capacity));
        match self.free.pop() {
            Some(id) => {
                self.queues[id as usize] = queue;
                OwnerId(id)
            }
            None => {
                let id = self.queues.len() as u32;
                assert!(
                    id < ring::OWNER_MAX,
                    "more than {} owners on one core",
                    ring::OWNER_MAX
                );
                self.queues.push(queue);
                OwnerId(id)
            }
        }
    }

    fn release(&mut self, id: OwnerId) {
        let queue = self.queues[id.0 as usize]
            .take()
            .expect("owner released twice");
        assert!(queue.is_empty(), "owner released with completions unreaped");
        self.free.push(id.0);
    }

    #[inline]
    fn post(&mut self, owner: u32, tag: u32, res: i32) {
        let queue = self.queues[owner as usize]
            .as_mut()
            .expect("completion for a released owner");
        queue.push_back(Completion { tag, res });
        self.pending += 1;
    }

    #[inline]
    fn pop(&mut self, owner: OwnerId) -> Option<Completion> {
        let c = self.queues[owner.0 as usize].as_mut()?.pop_front()?;
        self.pending -= 1;
        Some(c)
    }
}

/// The per-core I/O context handed to bdev channels: the ring, the buffer pool and the owners'
/// completion queues. Field order matters: the ring drops before the pool whose memory it has
/// registered.
pub struct IoCtx {
    ring: Ring,
    pool: BufPool,
    owners: Owners,
    core: CoreId,
    now: Instant,
    peers: Arc<[Peer]>,
    /// Messages to other cores whose inbox was full; retried every loop so a reactor never
    /// blocks on another (two full inboxes waiting on each other would deadlock).
    outbox: VecDeque<(CoreId, Msg)>,
    /// Requests channels made to other bdevs of this core ([`IoCtx::submit_to`]), handed on
    /// as soon as the channel that made them returns.
    deferred: VecDeque<(BdevId, IoRequest)>,
}

impl std::fmt::Debug for IoCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoCtx")
            .field("core", &self.core)
            .field("ring", &self.ring)
            .field("outbox", &self.outbox.len())
            .finish()
    }
}

/// Another reactor this one can message.
#[derive(Clone)]
pub(crate) struct Peer {
    pub(crate) core: CoreId,
    pub(crate) inbox: Arc<MsgRing<Msg>>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Peer({})", self.core)
    }
}

impl IoCtx {
    pub fn core(&self) -> CoreId {
        self.core
    }

    /// The time at the start of this loop iteration; cheaper than asking the clock.
    pub fn now(&self) -> Instant {
        self.now
    }

    pub fn ring(&mut self) -> &mut Ring {
        &mut self.ring
    }

    pub fn pool(&mut self) -> &mut BufPool {
        &mut self.pool
    }

    /// Creates a completion queue for a new submitter; `capacity` is its in-flight limit.
    pub fn register_owner(&mut self, capacity: usize) -> OwnerId {
        self.owners.register(capacity)
    }

    /// Frees an owner. It must have nothing in flight and nothing unreaped.
    pub fn release_owner(&mut self, owner: OwnerId) {
        self.owners.release(owner)
    }

    /// Delivers a completion to its owner. Bdevs that finish synchronously call this; the owner
    /// sees it on its next poll, never re-entrantly.
    #[inline]
    pub fn post(&mut self, owner: OwnerId, tag: u32, res: i32) {
        self.owners.post(owner.0, tag, res);
    }

    #[inline]
    pub fn pop(&mut self, owner: OwnerId) -> Option<Completion> {
        self.owners.pop(owner)
    }

    /// Runs `f` on core `to`'s reactor: the control-path way code on one core reaches another
    /// (it boxes `f`; the data path sends `Msg::Pool` values with `IoCtx::send_msg`).
    /// Never blocks: when `to`'s inbox is full the message waits here and is retried every loop.
    pub fn send(&mut self, to: CoreId, f: impl FnOnce(&mut Core) + Send + 'static) {
        self.send_msg(
            to,
            Msg::Control(Box::new(move |r: &mut Reactor| f(r.core()))),
        );
    }

    /// Sends `msg` to core `to`'s reactor without allocating (unless `to`'s inbox is full:
    /// then it waits in this core's outbox and is retried every loop).
    #[inline]
    pub(crate) fn send_msg(&mut self, to: CoreId, msg: Msg) {
        if self.outbox.is_empty() {
            if let Err(crate::msg::Full(back)) = self.deliver(to, msg) {
                self.outbox.push_back((to, back));
            }
        } else {
            self.outbox.push_back((to, msg));
        }
    }

    fn deliver(&self, to: CoreId, msg: Msg) -> Result<(), crate::msg::Full<Msg>> {
        let peer = self
            .peers
            .iter()
            .find(|p| p.core == to)
            .unwrap_or_else(|| panic!("core {to} is not one of this engine's cores"));
        peer.inbox.send(msg)
    }

    fn flush_outbox(&mut self) -> usize {
        let mut n = 0;
        while let Some((to, msg)) = self.outbox.pop_front() {
            if let Err(crate::msg::Full(back)) = self.deliver(to, msg) {
                self.outbox.push_front((to, back));
                break;
            }
            n += 1;
        }
        n
    }

    /// Submits `req` to another bdev on this core from inside a channel, so bdevs can stack
    /// (a nexus over its local replica's volume). The reactor validates it and hands it to
    /// `bdev`'s channel as soon as the calling channel returns, never re-entrantly; a refused
    /// request completes to `req.owner` with the negative errno of its [`IoError`]. Bounded by
    /// the caller's own in-flight limit: nothing is queued here past the current loop step.
    #[inline]
    pub fn submit_to(&mut self, bdev: BdevId, req: IoRequest) {
        self.deferred.push_back((bdev, req));
    }

    /// Moves every ring completion to its owner's queue.
    #[inline]
    pub fn reap_ring(&mut self) -> usize {
        let owners = &mut self.owners;
        self.ring.reap(|route, res| match route {
            Route::Io { owner, tag } => owners.post(owner, tag, res),
            Route::Doorbell => {}
        })
    }
}

/// Index of a bdev in the engine's table; the same on every core.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BdevId(pub(crate) u32);

struct DevSlot {
    info: BdevInfo,
    bdev: Arc<dyn Bdev>,
    channel: Box<dyn BdevChannel>,
    /// Set by `Engine::remove_bdev`: no new requests; closed and removed once idle.
    closing: Option<std::sync::mpsc::SyncSender<()>>,
}

/// What a periodic poller or pollers in general report after one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollerState {
    /// Did this much work; keeps the reactor from sleeping.
    Busy(usize),
    Idle,
    /// Remove me; I have nothing in flight.
    Finished,
}

/// Code that runs on a reactor every loop (or every `period`), like an SPDK poller.
pub trait Poller: Send + 'static {
    fn poll(&mut self, core: &mut Core) -> PollerState;

    /// Whether the reactor may sleep while this (unperiodic) poller is idle. The default, true
    /// of load generators and anything that polls outside state, keeps the reactor awake.
    /// A poller whose only work comes from completions posted to its owners (a socket served
    /// through the ring) returns false after an idle poll: a completion wakes the reactor, and
    /// the reactor runs every poller on the loop after it.
    fn needs_poll(&self) -> bool {
        true
    }
}

type TimerFn = Box<dyn FnOnce(&mut Core) + Send>;

struct Timer {
    at: Instant,
    seq: u64,
    run: TimerFn,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timer {
    // Reversed so the BinaryHeap pops the earliest timer first.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// The reactor state that pollers, timers and control messages may touch.
pub struct Core {
    io: IoCtx,
    devs: Vec<Option<DevSlot>>,
    timers: BinaryHeap<Timer>,
    timer_seq: u64,
    stopping: bool,
    locals: Locals,
}

impl std::fmt::Debug for Core {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Core")
            .field("core", &self.io.core)
            .field("stopping", &self.stopping)
            .finish()
    }
}

impl Core {
    pub fn id(&self) -> CoreId {
        self.io.core
    }

    pub fn io(&mut self) -> &mut IoCtx {
        &mut self.io
    }

    pub fn now(&self) -> Instant {
        self.io.now
    }

    /// True once the engine is stopping: pollers should stop issuing I/O and finish.
    pub fn stopping(&self) -> bool {
        self.stopping
    }

    pub fn bdev_info(&self, bdev: BdevId) -> Option<&BdevInfo> {
        Some(&self.devs.get(bdev.0 as usize)?.as_ref()?.info)
    }

    /// Validates `req` against the bdev and hands it to this core's channel. A refused
    /// request is returned as an error and never completes.
    #[inline]
    pub fn submit(&mut self, bdev: BdevId, req: IoRequest) -> Result<(), IoError> {
        let submitted = self.submit_here(bdev, req);
        self.drain_deferred();
        submitted
    }

    #[inline]
    fn submit_here(&mut self, bdev: BdevId, req: IoRequest) -> Result<(), IoError> {
        let Some(Some(slot)) = self.devs.get_mut(bdev.0 as usize) else {
            return Err(IoError::NoSuchBdev { id: bdev.0 });
        };
        if slot.closing.is_some() {
            return Err(IoError::NoSuchBdev { id: bdev.0 });
        }
        validate(
            &slot.info,
            req.op,
            req.offset_bytes,
            req.len_bytes,
            req.buf.as_ref(),
        )?;
        slot.channel.submit(&mut self.io, req);
        Ok(())
    }

    /// Hands on what channels queued with [`IoCtx::submit_to`], including what those
    /// submissions queue in turn.
    fn drain_deferred(&mut self) -> usize {
        let mut n = 0;
        while let Some((bdev, req)) = self.io.deferred.pop_front() {
            if let Err(e) = self.submit_here(bdev, req) {
                self.io.post(req.owner, req.tag, -e.errno());
            }
            n += 1;
        }
        n
    }

    /// Runs `f` on this core after `delay`.
    pub fn after(&mut self, delay: Duration, f: impl FnOnce(&mut Core) + Send + 'static) {
        self.timer_seq += 1;
        self.timers.push(Timer {
            at: self.io.now + delay,
            seq: self.timer_seq,
            run: Box::new(f),
        });
    }

    fn run_timers(&mut self) -> usize {
        let mut n = 0;
        while self.timers.peek().is_some_and(|t| t.at <= self.io.now) {
            let timer = self.timers.pop().expect("peeked");
            (timer.run)(self);
            n += 1;
        }
        n
    }

    /// Runs `f` with this core's channel of `bdev` and the I/O context, if the channel exists.
    pub fn with_channel<R>(
        &mut self,
        bdev: BdevId,
        f: impl FnOnce(&mut dyn BdevChannel, &mut IoCtx) -> R,
    ) -> Option<R> {
        let slot = self.devs.get_mut(bdev.0 as usize)?.as_mut()?;
        let r = f(&mut *slot.channel, &mut self.io);
        self.drain_deferred();
        Some(r)
    }

    fn poll_channels(&mut self) -> usize {
        let io = &mut self.io;
        let mut work = io.flush_outbox();
        for entry in &mut self.devs {
            let Some(d) = entry else { continue };
            work += d.channel.poll(io);
            if d.closing.is_some() && d.channel.in_flight() == 0 {
                d.channel.close(io);
                let done = entry.take().and_then(|d| d.closing);
                if let Some(tx) = done {
                    // The remover may have timed out and gone; nothing else to tell.
                    let _ = tx.send(());
                }
                work += 1;
            }
        }
        work + self.drain_deferred()
    }

    /// Stores state that lives on this core alone and returns its slot; `make` is given the
    /// slot so the state can name itself in messages.
    pub(crate) fn add_local(
        &mut self,
        make: impl FnOnce(LocalSlot) -> Box<dyn std::any::Any + Send>,
    ) -> LocalSlot {
        let locals = &mut self.locals;
        let index = locals.free.pop().unwrap_or_else(|| {
            locals.slots.push(None);
            (locals.slots.len() - 1) as u32
        });
        let slot = LocalSlot(index);
        locals.slots[index as usize] = Some(make(slot));
        slot
    }

    /// Drops the state in `slot`; the slot is reused.
    pub(crate) fn remove_local(&mut self, slot: LocalSlot) {
        let state = self.locals.slots[slot.0 as usize].take();
        assert!(state.is_some(), "core-local slot {} removed twice", slot.0);
        self.locals.free.push(slot.0);
    }

    /// Runs `f` with the state of type `T` in `slot` and with this core, or returns None when
    /// the slot is empty. The state is moved out (a pointer move) while `f` runs, so `f` may use
    /// the whole core; messages it sends are handled later, never re-entrantly.
    #[inline]
    pub(crate) fn with_local<T: std::any::Any, R>(
        &mut self,
        slot: LocalSlot,
        f: impl FnOnce(&mut T, &mut Core) -> R,
    ) -> Option<R> {
        let mut state = self.locals.slots.get_mut(slot.0 as usize)?.take()?;
        let typed = state
            .downcast_mut::<T>()
            .expect("core-local slot holds the type its owner stored");
        let r = f(typed, self);
        self.locals.slots[slot.0 as usize] = Some(state);
        Some(r)
    }

    /// Re-reads the bdev's size after it grew (see `Engine::refresh_bdev`).
    pub(crate) fn refresh_bdev(&mut self, bdev: BdevId) {
        if let Some(Some(slot)) = self.devs.get_mut(bdev.0 as usize) {
            slot.info.size_bytes = slot.bdev.size_bytes();
        }
    }

    /// Stops new requests to `bdev` here; `done` hears once its channel is closed.
    pub(crate) fn remove_bdev(&mut self, bdev: BdevId, done: std::sync::mpsc::SyncSender<()>) {
        match self.devs.get_mut(bdev.0 as usize) {
            Some(Some(slot)) => slot.closing = Some(done),
            _ => drop(done.send(())),
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let timers = self.timers.peek().map(|t| t.at);
        let channels = self
            .devs
            .iter()
            .flatten()
            .filter_map(|d| d.channel.next_deadline());
        timers.into_iter().chain(channels).min()
    }

    fn channels_in_flight(&self) -> usize {
        self.devs
            .iter()
            .flatten()
            .map(|d| d.channel.in_flight())
            .sum()
    }

    pub(crate) fn open_bdev(
        &mut self,
        id: BdevId,
        bdev: Arc<dyn Bdev>,
    ) -> Result<(), crate::bdev::BdevError> {
        let channel = bdev.open_channel(&mut self.io)?;
        let index = id.0 as usize;
        if self.devs.len() <= index {
            self.devs.resize_with(index + 1, || None);
        }
        self.devs[index] = Some(DevSlot {
            info: bdev.info().clone(),
            bdev,
            channel,
            closing: None,
        });
        Ok(())
    }
}

/// A message to a reactor.
pub(crate) enum Msg {
    /// Control path: a closure that runs on the reactor's thread (one allocation per message).
    Control(Box<dyn FnOnce(&mut Reactor) + Send>),
    /// Data path between a pool's home core and its volumes' channels: a plain value.
    Pool(crate::volume::pool::PoolMsg),
}

/// Names a piece of core-local state ([`Core::add_local`]); meaningful only on its core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LocalSlot(u32);

/// Core-local state of subsystems, by slot, with a free list so closed ones are reused.
#[derive(Default)]
struct Locals {
    slots: Vec<Option<Box<dyn std::any::Any + Send>>>,
    free: Vec<u32>,
}

/// The shared half of a client queue: submission and completion rings plus the wake-up
/// handshake. Lives in an `Arc` held by the client and the reactor.
#[derive(Debug)]
pub(crate) struct QueueShared {
    pub(crate) id: u64,
    pub(crate) sq: crossbeam_queue::ArrayQueue<QueueEntry>,
    pub(crate) cq: crossbeam_queue::ArrayQueue<Completion>,
    pub(crate) waiter: crate::engine::Waiter,
    /// Set by the reactor as it exits, after its last completion was pushed to `cq`; from
    /// then on nothing reads `sq`, so the client fails whatever is left there itself.
    pub(crate) stopped: std::sync::atomic::AtomicBool,
}

/// One request travelling from a client queue to its reactor.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueueEntry {
    pub(crate) req_op: crate::bdev::IoOp,
    pub(crate) offset_bytes: u64,
    pub(crate) len_bytes: u32,
    pub(crate) buf: Option<crate::dma::IoBuf>,
    pub(crate) fua: bool,
    pub(crate) tag: u32,
}

/// The reactor's half of a client queue.
struct QueueBridge {
    shared: Arc<QueueShared>,
    bdev: BdevId,
    owner: OwnerId,
    in_flight: u32,
    closing: bool,
    bufs: Vec<DmaBuf>,
}

struct PollerSlot {
    poller: Box<dyn Poller>,
    period: Option<Duration>,
    next_due: Instant,
}

/// One core's loop and everything it owns.
pub(crate) struct Reactor {
    core: Core,
    pollers: Vec<PollerSlot>,
    queues: Vec<QueueBridge>,
    inbox: Arc<MsgRing<Msg>>,
    idle: IdlePolicy,
    times: Arc<ReactorTimesCell>,
}

/// What a reactor reports when it comes up.
#[derive(Clone, Debug)]
pub(crate) struct ReactorReady {
    pub(crate) region: Arc<crate::dma::Region>,
    pub(crate) times: Arc<ReactorTimesCell>,
}

impl Reactor {
    /// Builds the reactor on its own (already pinned) thread.
    pub(crate) fn new(
        core: CoreId,
        config: &crate::engine::EngineConfig,
        inbox: Arc<MsgRing<Msg>>,
    ) -> Result<(Reactor, ReactorReady), crate::engine::EngineError> {
        use crate::engine::EngineError;
        let mut ring = Ring::new(config.ring_entries, ring::RingOptions::default())
            .map_err(|source| EngineError::Ring { core, source })?;
        let mut pool = BufPool::new(config.buf_count, config.buf_size_bytes, config.huge_pages)
            .map_err(|source| EngineError::Dma { core, source })?;
        let fixed = match ring.register_region(pool.region()) {
            Ok(()) => {
                pool.set_fixed_index(0);
                "registered as fixed buffers"
            }
            Err(e) => {
                tracing::warn!(core = core.get(), error = %e, "fixed buffers refused; using plain reads and writes");
                "not registered"
            }
        };
        tracing::info!(
            core = core.get(),
            ring = %ring.setup(),
            buffers = config.buf_count,
            buffer_bytes = config.buf_size_bytes,
            memory = %pool.region().backing(),
            fixed,
            "reactor started"
        );
        let times = Arc::new(ReactorTimesCell::default());
        let ready = ReactorReady {
            region: pool.region().clone(),
            times: times.clone(),
        };
        let io = IoCtx {
            ring,
            pool,
            owners: Owners::default(),
            core,
            now: Instant::now(),
            peers: Arc::from(Vec::new()),
            outbox: VecDeque::new(),
            deferred: VecDeque::with_capacity(DEFERRED_CAPACITY),
        };
        let reactor = Reactor {
            core: Core {
                io,
                devs: Vec::new(),
                timers: BinaryHeap::new(),
                timer_seq: 0,
                stopping: false,
                locals: Locals::default(),
            },
            pollers: Vec::new(),
            queues: Vec::new(),
            inbox,
            idle: config.idle,
            times,
        };
        Ok((reactor, ready))
    }

    pub(crate) fn core(&mut self) -> &mut Core {
        &mut self.core
    }

    pub(crate) fn set_peers(&mut self, peers: Arc<[Peer]>) {
        self.core.io.peers = peers;
    }

    pub(crate) fn stop(&mut self) {
        self.core.stopping = true;
    }

    pub(crate) fn add_poller(&mut self, poller: Box<dyn Poller>, period: Option<Duration>) {
        self.pollers.push(PollerSlot {
            poller,
            period,
            next_due: self.core.io.now,
        });
    }

    /// Binds a client queue: reserves `depth` buffers for it and returns them.
    pub(crate) fn add_queue(
        &mut self,
        shared: Arc<QueueShared>,
        bdev: BdevId,
        depth: u32,
    ) -> Result<Vec<crate::dma::IoBuf>, crate::engine::EngineError> {
        let pool = &mut self.core.io.pool;
        if pool.available() < depth as usize {
            return Err(crate::engine::EngineError::PoolExhausted {
                core: self.core.io.core,
                wanted: depth,
                available: pool.available() as u32,
            });
        }
        let mut bufs: Vec<DmaBuf> = (0..depth).filter_map(|_| pool.get()).collect();
        let views = bufs.iter_mut().map(DmaBuf::io_buf).collect();
        let owner = self.core.io.register_owner(depth as usize);
        self.queues.push(QueueBridge {
            shared,
            bdev,
            owner,
            in_flight: 0,
            closing: false,
            bufs,
        });
        Ok(views)
    }

    pub(crate) fn close_queue(&mut self, id: u64) {
        if let Some(q) = self.queues.iter_mut().find(|q| q.shared.id == id) {
            q.closing = true;
        }
    }

    /// Runs the loop until stopped and drained, then releases everything it owns.
    pub(crate) fn run(mut self) {
        let doorbell = self.inbox.doorbell().fd();
        self.arm_doorbell(doorbell);
        let mut last_work = Instant::now();
        let mut stop_at: Option<Instant> = None;
        // The loop's one clock read also closes the previous iteration, which is charged to
        // busy or idle by whether it found work (its spin or sleep included).
        let mut iteration_start = last_work;
        let mut iteration_busy = false;
        loop {
            let now = Instant::now();
            self.times.account(
                iteration_busy,
                now.saturating_duration_since(iteration_start),
            );
            iteration_start = now;
            self.core.io.now = now;
            let work = self.run_once(doorbell);
            iteration_busy = work > 0;
            if self.core.stopping {
                let deadline = *stop_at.get_or_insert(now + SHUTDOWN_DRAIN_MAX);
                if self.drained() {
                    break;
                }
                if now >= deadline {
                    tracing::error!(
                        core = self.core.id().get(),
                        "shutdown drain timed out; exiting with I/O in flight"
                    );
                    break;
                }
            }
            if work > 0 {
                last_work = now;
                continue;
            }
            match self.idle {
                IdlePolicy::Poll => std::hint::spin_loop(),
                IdlePolicy::Sleep { spin } if now.duration_since(last_work) < spin => {
                    std::hint::spin_loop()
                }
                IdlePolicy::Sleep { .. } => {
                    self.sleep();
                    last_work = Instant::now();
                }
            }
        }
        self.shutdown();
    }

    fn run_once(&mut self, doorbell: i32) -> usize {
        let mut work = self.reap(doorbell);
        work += self.drain_inbox();
        work += self.poll_queues();
        work += self.run_pollers();
        work += self.core.poll_channels();
        work += self.core.run_timers();
        self.core.io.ring.kick();
        work
    }

    fn reap(&mut self, doorbell: i32) -> usize {
        let mut rang = false;
        let io = &mut self.core.io;
        let owners = &mut io.owners;
        let n = io.ring.reap(|route, res| match route {
            Route::Io { owner, tag } => owners.post(owner, tag, res),
            Route::Doorbell => rang = true,
        });
        if rang {
            drain_eventfd(doorbell);
            self.arm_doorbell(doorbell);
        }
        n
    }

    fn arm_doorbell(&mut self, fd: i32) {
        let entry = io_uring::opcode::PollAdd::new(io_uring::types::Fd(fd), libc::POLLIN as u32)
            .build()
            .user_data(Route::Doorbell.encode());
        // SAFETY: a poll request names only the eventfd, which the inbox keeps open for the
        // reactor's whole life.
        unsafe { self.core.io.ring.push_internal(entry) };
    }

    fn drain_inbox(&mut self) -> usize {
        let mut n = 0;
        while n < INBOX_BATCH_MAX {
            let Some(msg) = self.inbox.recv() else { break };
            match msg {
                Msg::Control(f) => f(self),
                Msg::Pool(m) => crate::volume::pool::handle(&mut self.core, m),
            }
            n += 1;
        }
        n
    }

    fn poll_queues(&mut self) -> usize {
        let mut work = 0;
        let core = &mut self.core;
        for q in &mut self.queues {
            work += q.pump(core);
        }
        let io = &mut core.io;
        self.queues.retain_mut(|q| {
            let done = q.closing && q.in_flight == 0 && q.shared.sq.is_empty();
            if done {
                io.release_owner(q.owner);
                q.bufs.drain(..).for_each(|b| io.pool.put(b));
            }
            !done
        });
        work
    }

    fn run_pollers(&mut self) -> usize {
        let mut work = 0;
        let core = &mut self.core;
        let now = core.io.now;
        self.pollers.retain_mut(|slot| {
            if slot.next_due > now {
                return true;
            }
            if let Some(period) = slot.period {
                slot.next_due = now + period;
            }
            match slot.poller.poll(core) {
                PollerState::Busy(n) => {
                    work += n;
                    true
                }
                PollerState::Idle => true,
                PollerState::Finished => false,
            }
        });
        work
    }

    fn has_pending_work(&self) -> bool {
        !self.inbox.is_empty()
            || !self.core.io.outbox.is_empty()
            || self.core.io.owners.pending > 0
            || self.queues.iter().any(|q| !q.shared.sq.is_empty())
    }

    fn next_deadline(&self) -> Option<Instant> {
        let pollers = self.pollers.iter().filter_map(|p| {
            if p.period.is_some() {
                Some(p.next_due)
            } else if p.poller.needs_poll() {
                Some(self.core.io.now)
            } else {
                None
            }
        });
        pollers.chain(self.core.next_deadline()).min()
    }

    fn sleep(&mut self) {
        let bell = self.inbox.doorbell();
        bell.announce_sleep();
        if !self.has_pending_work() {
            let timeout = self
                .next_deadline()
                .map(|at| at.saturating_duration_since(Instant::now()));
            if timeout != Some(Duration::ZERO) {
                self.core.io.ring.wait(timeout);
            }
        }
        self.inbox.doorbell().announce_awake();
    }

    fn drained(&self) -> bool {
        self.pollers.is_empty()
            && self
                .queues
                .iter()
                .all(|q| q.in_flight == 0 && q.shared.sq.is_empty())
            && self.core.io.ring.in_flight() == 0
            && self.core.channels_in_flight() == 0
            && self.core.io.owners.pending == 0
    }

    fn shutdown(mut self) {
        self.pollers.clear();
        let io = &mut self.core.io;
        for mut q in self.queues.drain(..) {
            while io.owners.pop(q.owner).is_some() {}
            q.bufs.drain(..).for_each(|b| io.pool.put(b));
            q.shared
                .stopped
                .store(true, std::sync::atomic::Ordering::Release);
            q.shared.waiter.wake();
        }
        for slot in self.core.devs.iter_mut().flatten() {
            slot.channel.close(&mut self.core.io);
        }
        tracing::debug!(core = self.core.id().get(), "reactor stopped");
    }
}

impl QueueBridge {
    /// Moves submissions from the client's ring to the channel and completions back.
    fn pump(&mut self, core: &mut Core) -> usize {
        let mut work = 0;
        while work < QUEUE_BATCH_MAX {
            let Some(e) = self.shared.sq.pop() else { break };
            let req = IoRequest {
                op: e.req_op,
                offset_bytes: e.offset_bytes,
                len_bytes: e.len_bytes,
                buf: e.buf,
                fua: e.fua,
                owner: self.owner,
                tag: e.tag,
            };
            match core.submit(self.bdev, req) {
                Ok(()) => self.in_flight += 1,
                // The client validated already; a refusal here means the bdev went away.
                Err(_) => self.complete(e.tag, -libc::ENODEV),
            }
            work += 1;
        }
        let mut delivered = false;
        while let Some(c) = core.io.pop(self.owner) {
            self.in_flight -= 1;
            self.complete(c.tag, c.res);
            delivered = true;
            work += 1;
        }
        if delivered {
            self.shared.waiter.wake();
        }
        work
    }

    fn complete(&self, tag: u32, res: i32) {
        let pushed = self.shared.cq.push(Completion { tag, res });
        debug_assert!(
            pushed.is_ok(),
            "client completion ring sized below its depth"
        );
    }
}

fn drain_eventfd(fd: i32) {
    let mut counter: u64 = 0;
    // SAFETY: reads 8 bytes into a live local from a non-blocking eventfd we own.
    unsafe { libc::read(fd, (&mut counter as *mut u64).cast(), 8) };
}
