//! Starting and stopping the engine: one pinned reactor thread per configured core, the bdev
//! registry that gives each added bdev a channel on every core, and the control requests
//! (closures sent to a reactor's inbox) that may allocate because they are rare.

use super::config::{EngineConfig, EngineError, CONTROL_REPLY_TIMEOUT, QUEUE_DEPTH_MAX};
use super::queue::{IoQueue, Waiter};
use crate::bdev::{Bdev, BdevInfo};
use crate::core_list::CoreId;
use crate::dma::Region;
use crate::msg::{Full, MsgRing};
use crate::reactor::{BdevId, Core, Msg, Peer, Poller, QueueShared, Reactor, ReactorTimesCell};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub(super) struct ReactorRef {
    core: CoreId,
    pub(super) inbox: Arc<MsgRing<Msg>>,
    pub(super) region: Arc<Region>,
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
    /// Every bdev added, by id; `None` once removed, so a removed device's files and locks
    /// are released as soon as its last channel and queue are gone (ids are never reused).
    bdevs: Mutex<Vec<Option<Arc<dyn Bdev>>>>,
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
        let allowed = crate::sys::allowed_cpus();
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
    /// grow, its allocation map). Fails once the bdev has been removed.
    pub fn bdev(&self, bdev: &BdevHandle) -> Result<Arc<dyn Bdev>, EngineError> {
        self.shared
            .bdevs
            .lock()
            .get(bdev.id.0 as usize)
            .cloned()
            .flatten()
            .ok_or_else(|| EngineError::BdevRemoved {
                bdev: bdev.info.name.clone(),
                id: bdev.id.0,
            })
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
        bdevs.push(Some(bdev));
        Ok(BdevHandle { id, info })
    }

    /// Removes a bdev: every core stops taking new requests for it at once, and this returns
    /// when every core has closed its channel after the requests in flight completed. The id
    /// is not reused.
    pub fn remove_bdev(&self, bdev: &BdevHandle) -> Result<(), EngineError> {
        self.close_channels(bdev.id, &self.cores())?;
        if let Some(slot) = self.shared.bdevs.lock().get_mut(bdev.id.0 as usize) {
            *slot = None;
        }
        Ok(())
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
        let device = self.bdev(bdev)?;
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
pub(super) fn send_blocking(inbox: &MsgRing<Msg>, mut msg: Msg) -> bool {
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
    crate::sys::pin_current_thread(core.get()).map_err(|source| EngineError::Os {
        core,
        what: "pinning the reactor thread",
        source,
    })
}

fn format_cpus(cpus: &[u32]) -> String {
    let list: Vec<String> = cpus.iter().map(u32::to_string).collect();
    list.join(",")
}
