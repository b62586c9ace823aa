//! The loop (`Reactor::run`): reap the ring, handle messages, pump client queues, run
//! pollers, channel hooks and timers, and sleep when idle; plus what it owns besides the
//! [`Core`]: pollers, client-queue bridges, the idle policy and the busy/idle time counters.

use super::core_ctx::{Core, IoCtx, Locals, Msg, Peer};
use super::owners::{Completion, OwnerId, Owners};
use super::pace::{Pace, Step, ADAPTIVE_SPIN_DEFAULT};
use super::ring::{self, Ring, Route};
use super::BdevId;
use crate::bdev::IoRequest;
use crate::core_list::CoreId;
use crate::dma::{BufPool, DmaBuf};
use crate::msg::MsgRing;
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
    /// The default: spin only while work is expected within `spin` (see `reactor::pace`),
    /// otherwise wait in the kernel and wake in time for it.
    Adaptive { spin: Duration },
    /// Spin this long after the last piece of work, then sleep in the kernel.
    Sleep { spin: Duration },
    /// Never sleep: for cores dedicated to the engine.
    Poll,
}

/// Default spin of `IdlePolicy::Sleep` before sleeping: long enough to catch the next request
/// of a busy client, short enough that an idle engine costs nothing measurable.
pub const SPIN_DEFAULT: Duration = Duration::from_micros(50);

impl Default for IdlePolicy {
    fn default() -> Self {
        IdlePolicy::Adaptive {
            spin: ADAPTIVE_SPIN_DEFAULT,
        }
    }
}

/// Where one reactor's wall time went: time waiting in the kernel counts as idle, everything
/// else (work and spinning alike, since a spinning core is a core taken) as busy. Written
/// only by the reactor's own thread,
/// so the counters are plain relaxed load+store pairs, never contended read-modify-writes;
/// any thread may read them (for metrics), seeing values at most one iteration old.
#[derive(Debug, Default)]
pub struct ReactorTimesCell {
    busy_ns: AtomicU64,
    idle_ns: AtomicU64,
}

impl ReactorTimesCell {
    /// Adds one iteration's duration, `slept` of it in the kernel. Only the owning reactor
    /// calls this.
    fn account(&self, elapsed: Duration, slept: Duration) {
        let add = |counter: &AtomicU64, d: Duration| {
            let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
            counter.store(
                counter.load(Ordering::Relaxed).wrapping_add(ns),
                Ordering::Relaxed,
            );
        };
        add(&self.busy_ns, elapsed.saturating_sub(slept));
        add(&self.idle_ns, slept);
    }

    pub fn busy_ns(&self) -> u64 {
        self.busy_ns.load(Ordering::Relaxed)
    }

    pub fn idle_ns(&self) -> u64 {
        self.idle_ns.load(Ordering::Relaxed)
    }
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
    pace: Pace,
    times: Arc<ReactorTimesCell>,
}

/// What a wait in the kernel was: when it returned, and how long it took.
struct Slept {
    woke: Instant,
    took: Duration,
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
            doorbell_rang: false,
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
            pace: Pace::new(match config.idle {
                IdlePolicy::Adaptive { spin } => spin,
                _ => ADAPTIVE_SPIN_DEFAULT,
            }),
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
        // The loop's one clock read also closes the previous iteration, whose time counts as
        // busy except what it spent waiting in the kernel.
        let mut iteration_start = last_work;
        let mut iteration_slept = Duration::ZERO;
        // Adaptive: when the current idle gap began, and whether a wait that an event ended
        // (so a wake-up) lengthened it.
        let mut idle_since: Option<Instant> = None;
        let mut gap_slept = false;
        let mut kick_deferred = false;
        loop {
            let now = Instant::now();
            self.times.account(
                now.saturating_duration_since(iteration_start),
                std::mem::take(&mut iteration_slept),
            );
            iteration_start = now;
            self.core.io.now = now;
            let work = self.run_once(doorbell);
            // Adaptive: the first iteration after work leaves its submissions queued, since
            // the next one, if it finds nothing, hands them to the kernel in the same
            // io_uring_enter that waits (as a blocking io_uring loop does). Otherwise, and
            // when it spins, the kick submits and collects completions at once.
            let adaptive = matches!(self.idle, IdlePolicy::Adaptive { .. });
            let defer_kick = adaptive && work > 0 && !kick_deferred;
            kick_deferred = defer_kick;
            if !defer_kick && (work > 0 || !adaptive) {
                self.core.io.ring.kick();
            }
            if self.core.stopping {
                let deadline = *stop_at.get_or_insert(now + SHUTDOWN_DRAIN_MAX);
                if self.drained() {
                    break;
                }
                if now >= deadline {
                    tracing::error!(
                        core = self.core.id().get(),
                        pollers = self.pollers.len(),
                        ring_in_flight = self.core.io.ring.in_flight(),
                        channels_in_flight = self.core.channels_in_flight(),
                        owners_pending = self.core.io.owners.pending,
                        "shutdown drain timed out; exiting with I/O in flight"
                    );
                    break;
                }
            }
            if work > 0 {
                if let Some(since) = idle_since.take() {
                    self.pace
                        .gap_ended(since, now, std::mem::take(&mut gap_slept));
                }
                last_work = now;
                continue;
            }
            match self.idle {
                IdlePolicy::Poll => std::hint::spin_loop(),
                IdlePolicy::Adaptive { .. } => {
                    let since = *idle_since.get_or_insert(now);
                    match self.pace.step(since, now) {
                        Step::Spin => self.core.io.ring.kick(),
                        Step::Sleep(wake_at) => {
                            let until = wake_at.into_iter().chain(stop_at).min();
                            if let Some(s) = self.sleep(until) {
                                iteration_slept = s.took;
                                match wake_at {
                                    Some(at) if s.woke >= at => self.pace.woke(at, s.woke),
                                    _ => gap_slept = true,
                                }
                            }
                        }
                    }
                }
                IdlePolicy::Sleep { spin } if now.duration_since(last_work) < spin => {
                    std::hint::spin_loop()
                }
                IdlePolicy::Sleep { .. } => {
                    // A stopping reactor wakes by its drain deadline at the latest, so what
                    // never completes cannot keep it, and the engine's stop, waiting forever.
                    if let Some(s) = self.sleep(stop_at) {
                        iteration_slept = s.took;
                    }
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
        work
    }

    fn reap(&mut self, doorbell: i32) -> usize {
        let io = &mut self.core.io;
        let mut rang = std::mem::take(&mut io.doorbell_rang);
        let owners = &mut io.owners;
        let n = io.ring.reap(|route, res| match route {
            Route::Io { owner, tag } => owners.post(owner, tag, res),
            Route::Doorbell => rang = true,
        });
        if rang {
            crate::sys::eventfd_drain(doorbell);
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
            || self.core.io.doorbell_rang
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

    /// Submits what is queued and waits in the kernel for a completion, the doorbell, the next
    /// deadline or `until`, unless work arrived meanwhile (then it only submits). Returns what
    /// the wait was, or None if there was none.
    fn sleep(&mut self, until: Option<Instant>) -> Option<Slept> {
        let bell = self.inbox.doorbell();
        bell.announce_sleep();
        let mut slept = None;
        if !self.has_pending_work() {
            let start = Instant::now();
            let timeout = self
                .next_deadline()
                .into_iter()
                .chain(until)
                .min()
                .map(|at| at.saturating_duration_since(start));
            if timeout != Some(Duration::ZERO) {
                self.core.io.ring.wait(timeout);
                let woke = Instant::now();
                slept = Some(Slept {
                    woke,
                    took: woke - start,
                });
            }
        }
        self.inbox.doorbell().announce_awake();
        if slept.is_none() {
            // The wait would have submitted what is queued; without it, the kick does.
            self.core.io.ring.kick();
        }
        slept
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
        tracing::debug!(core = self.core.id().get(), pace = ?self.pace, "reactor stopped");
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
