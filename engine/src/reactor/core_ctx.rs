//! The reactor state that pollers, timers and control messages may touch ([`Core`]), and
//! the per-core I/O context handed to bdev channels ([`IoCtx`]): the ring, the buffer pool,
//! the owners, the bdev channels, messages to other cores (`Msg`: fixed-size values on the
//! data path, boxed closures on the control path only) and core-local state slots.

use super::event_loop::Reactor;
use super::owners::{Completion, OwnerId, Owners};
use super::ring::{Ring, Route};
use super::timers::Timer;
use crate::bdev::{validate, Bdev, BdevChannel, BdevInfo, IoError, IoRequest};
use crate::core_list::CoreId;
use crate::dma::BufPool;
use crate::msg::MsgRing;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

/// The per-core I/O context handed to bdev channels: the ring, the buffer pool and the owners'
/// completion queues. Field order matters: the ring drops before the pool whose memory it has
/// registered.
pub struct IoCtx {
    pub(super) ring: Ring,
    pub(super) pool: BufPool,
    pub(super) owners: Owners,
    pub(super) core: CoreId,
    pub(super) now: Instant,
    pub(super) peers: Arc<[Peer]>,
    /// Messages to other cores whose inbox was full; retried every loop so a reactor never
    /// blocks on another (two full inboxes waiting on each other would deadlock).
    pub(super) outbox: VecDeque<(CoreId, Msg)>,
    /// Requests channels made to other bdevs of this core ([`IoCtx::submit_to`]), handed on
    /// as soon as the channel that made them returns.
    pub(super) deferred: VecDeque<(BdevId, IoRequest)>,
    /// The doorbell's poll completed in a [`IoCtx::reap_ring`] from inside a channel: the
    /// reactor drains the eventfd and re-arms the poll on its next loop, and does not sleep
    /// before (a doorbell without its poll armed would never wake it again).
    pub(super) doorbell_rang: bool,
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

    pub(super) fn deliver(&self, to: CoreId, msg: Msg) -> Result<(), crate::msg::Full<Msg>> {
        let peer = self
            .peers
            .iter()
            .find(|p| p.core == to)
            .unwrap_or_else(|| panic!("core {to} is not one of this engine's cores"));
        peer.inbox.send(msg)
    }

    pub(super) fn flush_outbox(&mut self) -> usize {
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
        let rang = &mut self.doorbell_rang;
        self.ring.reap(|route, res| match route {
            Route::Io { owner, tag } => owners.post(owner, tag, res),
            Route::Doorbell => *rang = true,
        })
    }
}

/// Index of a bdev in the engine's table; the same on every core.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BdevId(pub(crate) u32);

pub(super) struct DevSlot {
    pub(super) info: BdevInfo,
    pub(super) bdev: Arc<dyn Bdev>,
    pub(super) channel: Box<dyn BdevChannel>,
    /// Set by `Engine::remove_bdev`: no new requests; closed and removed once idle.
    pub(super) closing: Option<std::sync::mpsc::SyncSender<()>>,
}

/// The reactor state that pollers, timers and control messages may touch.
pub struct Core {
    pub(super) io: IoCtx,
    pub(super) devs: Vec<Option<DevSlot>>,
    pub(super) timers: BinaryHeap<Timer>,
    pub(super) timer_seq: u64,
    pub(super) stopping: bool,
    pub(super) locals: Locals,
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
    pub(super) fn submit_here(&mut self, bdev: BdevId, req: IoRequest) -> Result<(), IoError> {
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
    pub(super) fn drain_deferred(&mut self) -> usize {
        let mut n = 0;
        while let Some((bdev, req)) = self.io.deferred.pop_front() {
            if let Err(e) = self.submit_here(bdev, req) {
                self.io.post(req.owner, req.tag, -e.errno());
            }
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

    pub(super) fn poll_channels(&mut self) -> usize {
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

    /// Re-reads the sizes after `bdev` grew (see `Engine::refresh_bdev`): its own, and every
    /// other bdev's, since one stacked on it (an encrypted export's crypt layer) grows with it
    /// and the engine does not know the stacking. A grow is rare and each read is one call.
    pub(crate) fn refresh_bdev(&mut self, bdev: BdevId) {
        debug_assert!(
            self.devs.get(bdev.0 as usize).is_some(),
            "refresh of an unknown bdev"
        );
        for slot in self.devs.iter_mut().flatten() {
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

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let timers = self.timers.peek().map(|t| t.at);
        let channels = self
            .devs
            .iter()
            .flatten()
            .filter_map(|d| d.channel.next_deadline());
        timers.into_iter().chain(channels).min()
    }

    pub(super) fn channels_in_flight(&self) -> usize {
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
pub(super) struct Locals {
    pub(super) slots: Vec<Option<Box<dyn std::any::Any + Send>>>,
    pub(super) free: Vec<u32>,
}
