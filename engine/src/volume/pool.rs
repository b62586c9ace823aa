//! The pool runtime: the home core's side of a pool.
//!
//! All metadata lives in [`Home`], a core-local state of the pool's home core (one of its
//! [`LocalSlot`]s), reached only from that core: by the home poller, and by messages other
//! cores (volume channels) and control callers send there. It has no lock. Channels read
//! cluster maps lock-free and come here only for what changes metadata (first writes,
//! copy-on-write, unmapping, flushes), with [`PoolMsg`] values: fixed-size messages that cost
//! no allocation. Control callers reach it with a control message ([`with_home`]).
//!
//! The tables a first write or a flush touches are preallocated at open: [`HOME_WAITERS_PREALLOC`]
//! waiting replies, [`HOME_OPS_MAX`] home I/Os, and the checkpoint staging memory (one slot's
//! size). A first write therefore allocates nothing; a commit allocates only to encode the
//! checkpoint (see [`crate::volume::COMMIT_ALLOCS_MAX`]).
//!
//! * **Allocation**: a write to an unallocated cluster makes home take a free cluster, zero it
//!   on the base device, then publish the map entry; waiting writers are told to go ahead.
//! * **Copy-on-write**: a write to a shared cluster makes home copy it to a new cluster in
//!   buffer-sized chunks, then publish the new entry (dropping one reference to the old).
//! * **Commit** (every FLUSH): flush the base device, so data and zeroed clusters are durable;
//!   if metadata changed, write a checkpoint's payload to the inactive slot, flush, write both
//!   copies of its header block, and flush again. Only then is the FLUSH acknowledged. Flushes
//!   arriving during a commit wait for the next one.
//! * **Barrier**: a round of messages to every core's channels of every open volume, answered
//!   once each has finished the base I/O it had in flight. Freed clusters are reused only after
//!   their free is durable and a barrier has passed, so a late write can never land in a cluster
//!   that another volume now owns; snapshots mark clusters shared and then wait for a barrier, so
//!   no write in flight can change a snapshot after it is taken.
//! * **Discard**: after that barrier, and before the clusters become allocatable, every run of
//!   freed clusters is discarded on the base device (a hole punched in a file, a discard on a
//!   device), at most [`DISCARDS_IN_FLIGHT_MAX`] at once: a deleted volume's or snapshot's
//!   data does not stay readable in the pool file, and the space goes back to the file
//!   system. It runs on the home core between commits, never on a volume's I/O path. A
//!   failed discard is logged and the clusters are released anyway: a new owner zeroes a
//!   cluster before mapping it, so correctness never depends on the discard.

use super::cluster::{PhysCluster, VirtCluster};
use super::format::{Checkpoint, Superblock, META_BLOCK_BYTES};
use super::map::Entry;
use super::meta::Meta;
use super::PoolError;
use crate::bdev::{Bdev, IoOp, IoRequest};
use crate::core_list::CoreId;
use crate::dma::{DmaBuf, IoBuf, Region};
use crate::reactor::{BdevId, Core, LocalSlot, Msg, OwnerId, PollerState};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Weak};

/// Replies a home core holds for clusters being made writable without allocating; more
/// waiters than this grow the table (one allocation each time it doubles).
pub const HOME_WAITERS_PREALLOC: usize = 1024;
/// Home I/Os in flight at once (zeroing, copying, committing): the home owner's queue size.
/// More would overflow the owner's completion queue, so it is an assertion.
pub const HOME_OPS_MAX: usize = 256;

/// Discards of freed clusters one pool has in flight at once.
pub const DISCARDS_IN_FLIGHT_MAX: usize = 8;
/// Longest run of freed clusters one discard request covers (a request's length is a u32).
pub const DISCARD_RUN_MAX_BYTES: u64 = 1 << 30;
const _: () = assert!(DISCARD_RUN_MAX_BYTES <= u32::MAX as u64);

/// Barriers that can wait behind a running one without allocating (each commit that frees
/// clusters queues one; more grow the queue).
const BARRIERS_QUEUED_PREALLOC: usize = 8;

/// A data-path message to or from a pool's home core: a plain value in the reactor's inbox.
#[derive(Debug)]
pub(crate) enum PoolMsg {
    /// A volume channel on `from` asks the home core (`home` is the pool's slot there);
    /// the answer goes back as [`PoolMsg::Answer`] for `token`.
    Ask {
        home: LocalSlot,
        obj: u64,
        ask: Ask,
        from: CoreId,
        bdev: BdevId,
        token: u64,
    },
    /// The home core's answer to request piece `token` of the receiving core's channel for
    /// `bdev`.
    Answer { bdev: BdevId, token: u64, res: i32 },
    /// The home core (`home_core`, slot `home`) asks the receiving core's channel for `bdev`
    /// to report once the base I/O it has in flight now has drained.
    Barrier {
        bdev: BdevId,
        home_core: CoreId,
        home: LocalSlot,
    },
    /// One channel's report that its pre-barrier I/O drained.
    BarrierAck { home: LocalSlot },
}

/// What a volume channel asks of the home core.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Ask {
    /// Make this virtual cluster writable in place (allocate or copy it).
    Writable(VirtCluster),
    /// Unmap whole clusters `first..first + count`.
    Unmap(VirtCluster, u64),
    /// Commit: make everything written before durable.
    Flush,
}

/// Handles a [`PoolMsg`] on the receiving reactor.
pub(crate) fn handle(core: &mut Core, msg: PoolMsg) {
    match msg {
        PoolMsg::Ask {
            home,
            obj,
            ask,
            from,
            bdev,
            token,
        } => {
            let to = Reply::Channel {
                core: from,
                bdev,
                token,
            };
            let handled = with_home(core, home, |h, c, shared| match ask {
                Ask::Writable(v) => request_writable(h, c, shared, obj, v, to),
                Ask::Unmap(first, count) => request_unmap(h, c, obj, first, count, to),
                Ask::Flush => request_flush(h, c, shared, to),
            });
            if handled.is_none() {
                // The pool closed; its volumes were closed first, so nobody waits.
                tracing::warn!(core = core.id().get(), "volume request for a closed pool");
            }
        }
        PoolMsg::Answer { bdev, token, res } => super::channel::on_reply(core, bdev, token, res),
        PoolMsg::Barrier {
            bdev,
            home_core,
            home,
        } => super::channel::on_barrier(core, bdev, home_core, home),
        PoolMsg::BarrierAck { home } => {
            with_home(core, home, barrier_ack);
        }
    }
}

/// Who is waiting for a home operation.
pub(crate) enum Reply {
    /// A volume channel on `core`: `token` names its request piece.
    Channel {
        core: CoreId,
        bdev: BdevId,
        token: u64,
    },
    /// A control caller blocked on a channel.
    Control(Sender<Result<(), PoolError>>),
}

/// The pool's read-only facts, shared by the control handle, the home state and every volume
/// channel of the pool. Nothing here changes after open, so sharing it costs no atomics on the
/// data path (channels hold their own reference and never clone it per I/O).
pub(crate) struct PoolShared {
    pub(crate) name: String,
    pub(crate) home: CoreId,
    pub(crate) base: BdevId,
    pub(crate) base_bdev: Arc<dyn Bdev>,
    pub(crate) sb: Superblock,
}

/// What the home core keeps in the pool's core-local slot.
pub(crate) struct HomeState {
    pub(crate) shared: Arc<PoolShared>,
    pub(crate) home: Home,
}

impl std::fmt::Debug for PoolShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolShared")
            .field("name", &self.name)
            .field("home", &self.home)
            .finish()
    }
}

/// A home I/O in flight, by tag.
enum Op {
    /// Zeroing a freshly allocated cluster before `obj`'s `vcluster` may map it.
    Zero {
        obj: u64,
        vcluster: VirtCluster,
        cluster: PhysCluster,
    },
    /// Copying shared cluster `src` to `dst` for `obj`'s `vcluster`; `chunk` is in progress.
    Copy {
        obj: u64,
        vcluster: VirtCluster,
        src: PhysCluster,
        dst: PhysCluster,
        chunk: u32,
        reading: bool,
    },
    /// One step of the commit in progress.
    Commit,
    /// One run of the discard batch at the front of `Home::discards`.
    Discard,
}

/// Clusters freed by one commit, being discarded before they are released for reuse.
struct Discard {
    /// Sorted, so adjacent clusters merge into one run.
    clusters: Vec<PhysCluster>,
    /// Index in `clusters` of the first cluster whose run is not yet issued.
    next: usize,
    pending: usize,
}

struct Commit {
    /// Replies to send when this commit ends; the vector comes from, and goes back to,
    /// `Home::spare_waiters`, so a commit allocates nothing for them.
    waiters: Vec<Reply>,
    /// The checkpoint staged in `Home::staging` and where it goes, or None when metadata was
    /// clean.
    write: Option<(
        u64,   /* len */
        usize, /* slot */
        u64,   /* seq */
    )>,
    freed: Vec<PhysCluster>,
    stage: CommitStage,
    pending: u32,
    errno: i32,
    /// A zeroed block, the source of the ClearHeader write.
    zero_block: Option<Region>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CommitStage {
    /// Only after a commit failed once its header may have been written: both copies of the
    /// inactive slot's header are overwritten with zeros (made durable by the next stage's
    /// flush), so that a crash while its body is rewritten cannot leave a valid header over a
    /// torn body.
    ClearHeader,
    /// Data written before the flush, and freshly zeroed clusters, become durable.
    FlushData,
    /// The checkpoint's blocks after the first go to the inactive slot...
    WriteBody,
    /// ...and are made durable before the header block that validates them is written,
    FlushBody,
    /// so a valid header always describes a complete payload (see `newest_checkpoint`). Both
    /// copies go at once: the slot being written holds no checkpoint anyone needs (the newest
    /// lives in the other slot until this commit's last flush), so a crash that tears both
    /// loses nothing, and once the flush below completes both are durable.
    WriteHeader,
    FlushCheckpoint,
}

/// What runs when a barrier completes.
enum AfterBarrier {
    Release(Vec<PhysCluster>),
    Snapshot {
        volume: u64,
        name: String,
        reply: Reply,
    },
}

/// Replies waiting for a cluster, as a FIFO list in [`Waiters`].
#[derive(Clone, Copy)]
struct WaitList {
    head: u32,
    tail: u32,
}

/// One waiting reply and the next in its list.
struct WaitNode {
    reply: Option<Reply>,
    next: Option<u32>,
}

/// Waiting replies of every cluster being made writable, in one preallocated slab.
struct Waiters {
    /// By (object, virtual cluster): the list of replies waiting for it.
    lists: HashMap<(u64, VirtCluster), WaitList>,
    nodes: Vec<WaitNode>,
    free: Vec<u32>,
}

impl Waiters {
    fn new() -> Waiters {
        Waiters {
            lists: HashMap::with_capacity(HOME_WAITERS_PREALLOC),
            nodes: (0..HOME_WAITERS_PREALLOC)
                .map(|_| WaitNode {
                    reply: None,
                    next: None,
                })
                .collect(),
            free: (0..HOME_WAITERS_PREALLOC as u32).rev().collect(),
        }
    }

    fn node(&mut self, reply: Reply) -> u32 {
        let index = self.free.pop().unwrap_or_else(|| {
            self.nodes.push(WaitNode {
                reply: None,
                next: None,
            });
            (self.nodes.len() - 1) as u32
        });
        self.nodes[index as usize] = WaitNode {
            reply: Some(reply),
            next: None,
        };
        index
    }

    fn contains(&self, key: (u64, VirtCluster)) -> bool {
        self.lists.contains_key(&key)
    }

    /// Starts the list of `key` (nobody waits for it yet).
    fn start(&mut self, key: (u64, VirtCluster), reply: Reply) {
        let n = self.node(reply);
        let fresh = self.lists.insert(key, WaitList { head: n, tail: n });
        debug_assert!(fresh.is_none(), "cluster {key:?} already has waiters");
    }

    /// Adds `reply` to the list of `key`, or gives it back when nothing is in progress there.
    fn join(&mut self, key: (u64, VirtCluster), reply: Reply) -> Result<(), Reply> {
        let Some(&list) = self.lists.get(&key) else {
            return Err(reply);
        };
        let n = self.node(reply);
        self.nodes[list.tail as usize].next = Some(n);
        self.lists.insert(
            key,
            WaitList {
                head: list.head,
                tail: n,
            },
        );
        Ok(())
    }

    /// Takes the list of `key`; pop its replies with [`Waiters::pop`].
    fn take(&mut self, key: (u64, VirtCluster)) -> Option<u32> {
        self.lists.remove(&key).map(|l| l.head)
    }

    /// The reply at `at` and the next node of its list.
    fn pop(&mut self, at: u32) -> (Reply, Option<u32>) {
        let node = &mut self.nodes[at as usize];
        let reply = node.reply.take().expect("waiting node holds a reply");
        let next = node.next.take();
        self.free.push(at);
        (reply, next)
    }
}

/// Everything the home core knows about a pool.
pub(crate) struct Home {
    pub(crate) meta: Meta,
    /// This state's slot on the home core, named in messages to it.
    slot: LocalSlot,
    owner: Option<OwnerId>,
    ops: Vec<Option<Op>>,
    free_ops: Vec<u32>,
    waiting: Waiters,
    copy_buf: Option<DmaBuf>,
    copy_queue: VecDeque<(u64, VirtCluster)>,
    frozen: HashSet<u64>,
    deferred: Vec<(u64, VirtCluster, Reply)>,
    flush_waiters: Vec<Reply>,
    /// An empty vector with capacity, swapped with `flush_waiters` when a commit starts.
    spare_waiters: Vec<Reply>,
    commit: Option<Commit>,
    /// Where a commit encodes its checkpoint: one slot's size, mapped at open, written only
    /// while no commit is in flight.
    staging: Region,
    active_slot: usize,
    barrier: Option<(u32, AfterBarrier)>,
    barrier_queue: VecDeque<AfterBarrier>,
    /// Freed clusters being discarded, oldest first; only the front batch has I/O in flight.
    /// Holds as many batches as barriers can queue without allocating.
    discards: VecDeque<Discard>,
    /// Open volumes: their bdev id and the state their channels share. Weak: the volume's
    /// bdev owns that state and holds this pool, so a strong reference here would be a cycle
    /// that keeps the base device (its file and lock) alive after the engine stops.
    pub(crate) open: HashMap<u64, (BdevId, Weak<super::channel::VolumeShared>)>,
    cores: Vec<CoreId>,
    closing: bool,
    /// A commit failed after it may have written the inactive slot's header (see ClearHeader).
    slot_suspect: bool,
}

impl Home {
    pub(crate) fn new(
        meta: Meta,
        active_slot: usize,
        cores: Vec<CoreId>,
        slot: LocalSlot,
        staging: Region,
    ) -> Home {
        assert!(
            staging.len_bytes() as u64 >= meta.sb.slot_bytes,
            "checkpoint staging of {} bytes below the slot's {}",
            staging.len_bytes(),
            meta.sb.slot_bytes
        );
        Home {
            meta,
            slot,
            owner: None,
            ops: Vec::with_capacity(HOME_OPS_MAX),
            free_ops: Vec::with_capacity(HOME_OPS_MAX),
            waiting: Waiters::new(),
            copy_buf: None,
            copy_queue: VecDeque::with_capacity(HOME_WAITERS_PREALLOC),
            frozen: HashSet::new(),
            deferred: Vec::new(),
            flush_waiters: Vec::with_capacity(HOME_WAITERS_PREALLOC),
            spare_waiters: Vec::with_capacity(HOME_WAITERS_PREALLOC),
            commit: None,
            staging,
            active_slot,
            barrier: None,
            barrier_queue: VecDeque::with_capacity(BARRIERS_QUEUED_PREALLOC),
            discards: VecDeque::with_capacity(BARRIERS_QUEUED_PREALLOC),
            open: HashMap::new(),
            cores,
            closing: false,
            slot_suspect: false,
        }
    }

    fn park(&mut self, op: Op) -> u32 {
        match self.free_ops.pop() {
            Some(i) => {
                self.ops[i as usize] = Some(op);
                i
            }
            None => {
                assert!(
                    self.ops.len() < HOME_OPS_MAX,
                    "more than HOME_OPS_MAX {HOME_OPS_MAX} home I/Os in flight"
                );
                self.ops.push(Some(op));
                (self.ops.len() - 1) as u32
            }
        }
    }

    fn unpark(&mut self, tag: u32) -> Op {
        self.free_ops.push(tag);
        self.ops[tag as usize]
            .take()
            .expect("completion for a free home op")
    }

    fn busy(&self) -> bool {
        self.ops.iter().any(Option::is_some)
            || self.commit.is_some()
            || self.barrier.is_some()
            || !self.discards.is_empty()
    }
}

/// Runs `f` with the home state in `slot` of this (the home) core, or returns None when the
/// pool has closed.
pub(crate) fn with_home<R>(
    core: &mut Core,
    slot: LocalSlot,
    f: impl FnOnce(&mut Home, &mut Core, &Arc<PoolShared>) -> R,
) -> Option<R> {
    core.with_local(slot, |state: &mut HomeState, core| {
        debug_assert_eq!(
            core.id(),
            state.shared.home,
            "pool state touched off its home core"
        );
        f(&mut state.home, core, &state.shared)
    })
}

impl PoolShared {
    fn cluster_offset(&self, cluster: PhysCluster) -> u64 {
        self.sb.cluster_offset(cluster)
    }

    fn submit(&self, core: &mut Core, req: IoRequest) -> Result<(), i32> {
        core.submit(self.base, req).map_err(|e| {
            tracing::error!(pool = %self.name, error = %e, "home I/O refused");
            -libc::EIO
        })
    }
}

/// A request of the home core to the base device.
fn home_req(
    owner: OwnerId,
    tag: u32,
    op: IoOp,
    offset_bytes: u64,
    len_bytes: u32,
    buf: Option<IoBuf>,
) -> IoRequest {
    IoRequest {
        op,
        offset_bytes,
        len_bytes,
        buf,
        fua: false,
        owner,
        tag,
    }
}

/// Delivers the outcome of a home operation to whoever waits for it.
pub(crate) fn reply(core: &mut Core, to: Reply, result: Result<(), PoolError>) {
    match to {
        Reply::Control(tx) => drop(tx.send(result)),
        Reply::Channel {
            core: target,
            bdev,
            token,
        } => {
            let res = match &result {
                Ok(()) => 0,
                Err(e) => -e.errno(),
            };
            core.io()
                .send_msg(target, Msg::Pool(PoolMsg::Answer { bdev, token, res }));
        }
    }
}

/// The home core's poller: reaps home I/O and advances allocations, copies and commits. When
/// the pool has closed and its work is done, it drops the home state.
pub(crate) struct HomePoller {
    pub(crate) slot: LocalSlot,
}

impl crate::reactor::Poller for HomePoller {
    fn poll(&mut self, core: &mut Core) -> PollerState {
        let state = with_home(core, self.slot, |h, core, shared| {
            let owner = owner(h, core);
            let mut work = 0;
            while let Some(c) = core.io().pop(owner) {
                work += 1;
                on_complete(h, core, shared, c.tag, c.res);
            }
            if (h.closing || core.stopping()) && !h.busy() {
                if let Some(buf) = h.copy_buf.take() {
                    core.io().pool().put(buf);
                }
                core.io().release_owner(owner);
                h.owner = None;
                return PollerState::Finished;
            }
            if work > 0 {
                PollerState::Busy(work)
            } else {
                PollerState::Idle
            }
        })
        .expect("home state lives until its poller finishes");
        if state == PollerState::Finished {
            core.remove_local(self.slot);
        }
        state
    }

    fn needs_poll(&self) -> bool {
        // Idle, the home core sleeps. Its work arrives as a completion of home I/O (a ring
        // completion, or a RAM bdev's post to the owner that the reactor counts as pending),
        // or as a message from a channel or the control path (a doorbell); either wakes the
        // reactor, which runs every poller on the next loop. Closing and stopping also come
        // by message.
        false
    }
}

fn owner(h: &mut Home, core: &mut Core) -> OwnerId {
    *h.owner
        .get_or_insert_with(|| core.io().register_owner(HOME_OPS_MAX))
}

/// A channel wants `vcluster` of `obj` writable in place.
pub(crate) fn request_writable(
    h: &mut Home,
    core: &mut Core,
    shared: &Arc<PoolShared>,
    obj: u64,
    vcluster: VirtCluster,
    to: Reply,
) {
    if h.frozen.contains(&obj) {
        return h.deferred.push((obj, vcluster, to));
    }
    let Some(o) = h.meta.object(obj) else {
        return reply(
            core,
            to,
            Err(PoolError::NotFound {
                name: format!("object {obj}"),
            }),
        );
    };
    let entry = o.map.get(vcluster);
    let Err(to) = h.waiting.join((obj, vcluster), to) else {
        return;
    };
    match entry {
        Entry::Mapped { shared: false, .. } => reply(core, to, Ok(())),
        Entry::Mapped { shared: true, .. } => {
            if h.meta.unshare_if_sole(obj, vcluster) {
                return reply(core, to, Ok(()));
            }
            h.waiting.start((obj, vcluster), to);
            h.copy_queue.push_back((obj, vcluster));
            start_copies(h, core, shared);
        }
        Entry::Unallocated => {
            let Some(cluster) = h.meta.alloc() else {
                return reply(
                    core,
                    to,
                    Err(PoolError::NoSpace {
                        pool: shared.name.clone(),
                    }),
                );
            };
            h.waiting.start((obj, vcluster), to);
            let own = owner(h, core);
            let tag = h.park(Op::Zero {
                obj,
                vcluster,
                cluster,
            });
            let len = shared.sb.cluster_size_bytes;
            if let Err(res) = shared.submit(
                core,
                home_req(
                    own,
                    tag,
                    IoOp::WriteZeroes,
                    shared.cluster_offset(cluster),
                    len,
                    None,
                ),
            ) {
                on_complete(h, core, shared, tag, res);
            }
        }
    }
}

/// Starts the next queued copy-on-write when the copy buffer is free.
fn start_copies(h: &mut Home, core: &mut Core, shared: &Arc<PoolShared>) {
    if h.ops.iter().flatten().any(|o| matches!(o, Op::Copy { .. })) {
        return;
    }
    let Some((obj, vcluster)) = h.copy_queue.pop_front() else {
        return;
    };
    let src = match h.meta.object(obj).map(|o| o.map.get(vcluster)) {
        Some(Entry::Mapped { cluster, .. }) => cluster,
        _ => return finish_waiters(h, core, obj, vcluster, Ok(())),
    };
    if h.meta.unshare_if_sole(obj, vcluster) {
        finish_waiters(h, core, obj, vcluster, Ok(()));
        return start_copies(h, core, shared);
    }
    let Some(dst) = h.meta.alloc() else {
        finish_waiters(
            h,
            core,
            obj,
            vcluster,
            Err(PoolError::NoSpace {
                pool: shared.name.clone(),
            }),
        );
        return start_copies(h, core, shared);
    };
    if h.copy_buf.is_none() {
        h.copy_buf = core.io().pool().get();
    }
    if h.copy_buf.is_none() {
        h.meta.unalloc(dst);
        finish_waiters(
            h,
            core,
            obj,
            vcluster,
            Err(PoolError::Failed {
                pool: shared.name.clone(),
                why: "no DMA buffer for copy-on-write".into(),
            }),
        );
        return;
    }
    let tag = h.park(Op::Copy {
        obj,
        vcluster,
        src,
        dst,
        chunk: 0,
        reading: true,
    });
    copy_step(h, core, shared, tag);
}

/// Issues the I/O for the copy op at `tag` in its current state.
fn copy_step(h: &mut Home, core: &mut Core, shared: &Arc<PoolShared>, tag: u32) {
    let Some(Op::Copy {
        src,
        dst,
        chunk,
        reading,
        ..
    }) = h.ops[tag as usize]
    else {
        unreachable!("copy step on a non-copy op")
    };
    let own = owner(h, core);
    let buf = h.copy_buf.as_mut().expect("copy holds the buffer").io_buf();
    let chunk_bytes = buf.len_bytes().min(shared.sb.cluster_size_bytes);
    let within = u64::from(chunk) * u64::from(chunk_bytes);
    let (op, cluster) = if reading {
        (IoOp::Read, src)
    } else {
        (IoOp::Write, dst)
    };
    let at = shared.cluster_offset(cluster) + within;
    if let Err(res) = shared.submit(core, home_req(own, tag, op, at, chunk_bytes, Some(buf))) {
        on_complete(h, core, shared, tag, res);
    }
}

fn finish_waiters(
    h: &mut Home,
    core: &mut Core,
    obj: u64,
    vcluster: VirtCluster,
    result: Result<(), PoolError>,
) {
    let mut next = h.waiting.take((obj, vcluster));
    while let Some(at) = next {
        let (to, after) = h.waiting.pop(at);
        reply(core, to, result.clone());
        next = after;
    }
}

fn on_complete(h: &mut Home, core: &mut Core, shared: &Arc<PoolShared>, tag: u32, res: i32) {
    let op = h.ops[tag as usize]
        .as_ref()
        .expect("completion for a free home op");
    match op {
        Op::Zero { .. } => {
            let Op::Zero {
                obj,
                vcluster,
                cluster,
            } = h.unpark(tag)
            else {
                unreachable!()
            };
            if res < 0 {
                h.meta.unalloc(cluster);
                return finish_waiters(
                    h,
                    core,
                    obj,
                    vcluster,
                    Err(PoolError::device(
                        &shared.name,
                        "zeroing a new cluster",
                        res,
                    )),
                );
            }
            h.meta.map(obj, vcluster, cluster);
            finish_waiters(h, core, obj, vcluster, Ok(()));
        }
        Op::Copy { .. } => copy_done(h, core, shared, tag, res),
        Op::Commit => {
            h.unpark(tag);
            commit_step_done(h, core, shared, res);
        }
        Op::Discard => {
            h.unpark(tag);
            discard_done(h, core, shared, res);
        }
    }
}

fn copy_done(h: &mut Home, core: &mut Core, shared: &Arc<PoolShared>, tag: u32, res: i32) {
    let chunks = {
        let buf_bytes = h
            .copy_buf
            .as_ref()
            .map_or(1, DmaBuf::len_bytes)
            .min(shared.sb.cluster_size_bytes);
        shared.sb.cluster_size_bytes / buf_bytes
    };
    let Some(Op::Copy {
        obj,
        vcluster,
        dst,
        chunk,
        reading,
        ..
    }) = h.ops[tag as usize].as_mut()
    else {
        unreachable!()
    };
    let (obj, vcluster, dst) = (*obj, *vcluster, *dst);
    if res < 0 {
        h.unpark(tag);
        h.meta.unalloc(dst);
        finish_waiters(
            h,
            core,
            obj,
            vcluster,
            Err(PoolError::device(
                &shared.name,
                "copying a shared cluster",
                res,
            )),
        );
        return start_copies(h, core, shared);
    }
    if *reading {
        *reading = false;
        return copy_step(h, core, shared, tag);
    }
    *chunk += 1;
    *reading = true;
    if *chunk < chunks {
        return copy_step(h, core, shared, tag);
    }
    h.unpark(tag);
    h.meta.map(obj, vcluster, dst);
    finish_waiters(h, core, obj, vcluster, Ok(()));
    start_copies(h, core, shared);
}

/// Unmaps whole clusters `first..first + count` of `obj` (trim, write-zeroes).
pub(crate) fn request_unmap(
    h: &mut Home,
    core: &mut Core,
    obj: u64,
    first: VirtCluster,
    count: u64,
    to: Reply,
) {
    if h.meta.object(obj).is_none() {
        return reply(
            core,
            to,
            Err(PoolError::NotFound {
                name: format!("object {obj}"),
            }),
        );
    }
    for v in first.get()..first.get() + count {
        let v = VirtCluster::new(v).expect("an unmapped range lies inside its volume");
        if !h.waiting.contains((obj, v)) {
            h.meta.unmap(obj, v);
        }
    }
    reply(core, to, Ok(()));
}

/// Queues a flush; it completes when a commit that started after it has finished.
pub(crate) fn request_flush(h: &mut Home, core: &mut Core, shared: &Arc<PoolShared>, to: Reply) {
    h.flush_waiters.push(to);
    start_commit(h, core, shared);
}

fn start_commit(h: &mut Home, core: &mut Core, shared: &Arc<PoolShared>) {
    if h.commit.is_some() || h.flush_waiters.is_empty() {
        return;
    }
    let spare = std::mem::take(&mut h.spare_waiters);
    let waiters = std::mem::replace(&mut h.flush_waiters, spare);
    let staged = stage_checkpoint(h, shared);
    let write = match staged {
        Ok(write) => write,
        Err(e) => {
            return reply_all(h, core, waiters, Err(e));
        }
    };
    let freed = if write.is_some() {
        h.meta.dirty = false;
        h.meta.take_quarantine()
    } else {
        Vec::new()
    };
    h.commit = Some(Commit {
        waiters,
        write,
        freed,
        stage: CommitStage::FlushData,
        pending: 0,
        errno: 0,
        zero_block: None,
    });
    let clear = h.slot_suspect && h.commit.as_ref().is_some_and(|c| c.write.is_some());
    let zero_block = clear
        .then(|| Region::map(META_BLOCK_BYTES as usize, false, true).ok())
        .flatten();
    let Some(zero) = zero_block else {
        return commit_issue(h, core, shared, IoOp::Flush, 0, 0, None);
    };
    let slot = 1 - h.active_slot;
    tracing::warn!(pool = %shared.name, slot, "retrying a failed commit: clearing the slot's header copies first");
    // SAFETY: the commit keeps the zero block (stored just below) until this stage
    // completes, and nothing writes it; both writes read the same zeros.
    let bufs = shared
        .sb
        .header_offsets(slot)
        .map(|at| (at, unsafe { zero.io_buf(0, META_BLOCK_BYTES as u32) }));
    let c = h.commit.as_mut().expect("just set");
    c.stage = CommitStage::ClearHeader;
    c.zero_block = Some(zero);
    // A hold while both writes are issued (see commit_step_done).
    c.pending += 1;
    for (at, buf) in bufs {
        commit_issue(
            h,
            core,
            shared,
            IoOp::Write,
            at,
            META_BLOCK_BYTES as u32,
            Some(buf),
        );
    }
    commit_step_done(h, core, shared, 0);
}

fn commit_issue(
    h: &mut Home,
    core: &mut Core,
    shared: &Arc<PoolShared>,
    op: IoOp,
    offset: u64,
    len: u32,
    buf: Option<IoBuf>,
) {
    let own = owner(h, core);
    let tag = h.park(Op::Commit);
    h.commit.as_mut().expect("commit in progress").pending += 1;
    if let Err(res) = shared.submit(core, home_req(own, tag, op, offset, len, buf)) {
        on_complete(h, core, shared, tag, res);
    }
}

fn commit_step_done(h: &mut Home, core: &mut Core, shared: &Arc<PoolShared>, res: i32) {
    let c = h.commit.as_mut().expect("commit in progress");
    c.pending -= 1;
    if res < 0 {
        c.errno = -res;
    }
    if c.pending > 0 {
        return;
    }
    if c.errno != 0 {
        return commit_failed(h, core, shared);
    }
    let next = match (c.stage, &c.write) {
        (CommitStage::ClearHeader, _) => CommitStage::FlushData,
        (CommitStage::FlushData, Some((len, _, _))) if *len > META_BLOCK_BYTES => {
            CommitStage::WriteBody
        }
        (CommitStage::FlushData, Some(_)) | (CommitStage::FlushBody, _) => CommitStage::WriteHeader,
        (CommitStage::WriteBody, _) => CommitStage::FlushBody,
        (CommitStage::WriteHeader, _) => CommitStage::FlushCheckpoint,
        (CommitStage::FlushData, None) | (CommitStage::FlushCheckpoint, _) => {
            return commit_done(h, core, shared);
        }
    };
    c.stage = next;
    let Some((len, slot, _)) = c.write else {
        unreachable!("only a commit with a checkpoint gets past FlushData")
    };
    // A hold on the stage while it issues several writes: one refused at submission completes
    // inline, and must not end the stage (or the commit) before the rest are issued.
    c.pending += 1;
    let (base_ptr, at) = (h.staging.base(), shared.sb.slot_offsets[slot]);
    match next {
        CommitStage::WriteBody => write_span(h, core, shared, base_ptr, at, META_BLOCK_BYTES, len),
        CommitStage::WriteHeader => {
            for copy_at in shared.sb.header_offsets(slot) {
                write_span(h, core, shared, base_ptr, copy_at, 0, META_BLOCK_BYTES);
            }
        }
        CommitStage::FlushData | CommitStage::FlushBody | CommitStage::FlushCheckpoint => {
            commit_issue(h, core, shared, IoOp::Flush, 0, 0, None)
        }
        CommitStage::ClearHeader => unreachable!("never re-entered"),
    }
    commit_step_done(h, core, shared, 0);
}

/// Encodes the metadata into the staging memory when it changed since the last commit: its
/// length, the slot it goes to and its sequence number. Allocates nothing.
fn stage_checkpoint(h: &Home, shared: &PoolShared) -> Result<Option<(u64, usize, u64)>, PoolError> {
    if !h.meta.dirty {
        return Ok(None);
    }
    debug_assert!(h.commit.is_none(), "staging rewritten under a commit");
    let seq = h.meta.seq + 1;
    let slot_bytes = shared.sb.slot_bytes as usize;
    // SAFETY: the staging region is mapped for at least slot_bytes (asserted in Home::new),
    // owned by this home state, and no commit is in flight (start_commit runs only without
    // one), so no device request reads it while this slice lives.
    let out = unsafe { std::slice::from_raw_parts_mut(h.staging.base(), slot_bytes) };
    let len = h
        .meta
        .encode_checkpoint(seq, out)
        .ok_or(PoolError::MetadataFull {
            slot_bytes: shared.sb.slot_bytes,
        })?;
    debug_assert_eq!(
        Checkpoint::decode(&out[..len]).as_ref(),
        Ok(&h.meta.to_checkpoint(seq)),
        "the staged checkpoint decodes to the metadata it was encoded from"
    );
    Ok(Some((len as u64, 1 - h.active_slot, seq)))
}

/// Writes bytes `from..to` of the staged checkpoint at `at + from`, in base-sized pieces.
fn write_span(
    h: &mut Home,
    core: &mut Core,
    shared: &Arc<PoolShared>,
    base_ptr: *mut u8,
    at: u64,
    from: u64,
    to: u64,
) {
    let max = u64::from(shared.base_bdev.info().max_io_bytes.min(1 << 20));
    let mut done = from;
    while done < to {
        let n = (to - done).min(max);
        // SAFETY: done < to <= len, and the staging region holds len bytes.
        let ptr = unsafe { base_ptr.add(done as usize) };
        // SAFETY: [ptr, ptr + n) lies in the commit's staging region, which the commit keeps
        // until its last stage completes and which nothing writes while it is staged.
        let buf = unsafe { IoBuf::from_raw(ptr, n as u32) };
        commit_issue(h, core, shared, IoOp::Write, at + done, n as u32, Some(buf));
        done += n;
    }
}

/// Answers every waiter of a commit and keeps their (now empty) vector for the next one.
fn reply_all(
    h: &mut Home,
    core: &mut Core,
    mut waiters: Vec<Reply>,
    result: Result<(), PoolError>,
) {
    for w in waiters.drain(..) {
        reply(core, w, result.clone());
    }
    h.spare_waiters = waiters;
}

fn commit_done(h: &mut Home, core: &mut Core, shared: &Arc<PoolShared>) {
    let c = h.commit.take().expect("commit in progress");
    if let Some((_, slot, seq)) = c.write {
        h.active_slot = slot;
        h.meta.seq = seq;
        h.slot_suspect = false;
    }
    reply_all(h, core, c.waiters, Ok(()));
    if !c.freed.is_empty() {
        start_barrier(h, core, shared, AfterBarrier::Release(c.freed));
    }
    start_commit(h, core, shared);
}

fn commit_failed(h: &mut Home, core: &mut Core, shared: &Arc<PoolShared>) {
    let c = h.commit.take().expect("commit in progress");
    let why = format!(
        "metadata commit failed: {}",
        std::io::Error::from_raw_os_error(c.errno)
    );
    tracing::error!(pool = %shared.name, %why);
    // The inactive slot may hold part of a checkpoint. Before the header is written that is
    // harmless (open takes the intact slot); after, the header may be valid, so the retry
    // clears it first. Memory stays authoritative and dirty: the next flush writes the whole
    // checkpoint to the same slot again.
    if matches!(
        c.stage,
        CommitStage::WriteHeader | CommitStage::FlushCheckpoint
    ) {
        h.slot_suspect = true;
    }
    let e = PoolError::Failed {
        pool: shared.name.clone(),
        why,
    };
    reply_all(h, core, c.waiters, Err(e));
    h.meta.dirty = true;
    h.meta.requarantine(c.freed);
    start_commit(h, core, shared);
}

/// Asks every core's channels of every open volume to report when their in-flight base I/O
/// has drained, then runs `then`.
fn start_barrier(h: &mut Home, core: &mut Core, shared: &Arc<PoolShared>, then: AfterBarrier) {
    if h.barrier.is_some() {
        return h.barrier_queue.push_back(then);
    }
    let targets = h.open.len() as u32 * h.cores.len() as u32;
    h.barrier = Some((targets, then));
    for &target in &h.cores {
        for &(bdev, _) in h.open.values() {
            let msg = PoolMsg::Barrier {
                bdev,
                home_core: shared.home,
                home: h.slot,
            };
            core.io().send_msg(target, Msg::Pool(msg));
        }
    }
    if targets == 0 {
        barrier_done(h, core, shared);
    }
}

/// One channel finished its pre-barrier I/O.
pub(crate) fn barrier_ack(h: &mut Home, core: &mut Core, shared: &Arc<PoolShared>) {
    let Some((pending, _)) = h.barrier.as_mut() else {
        unreachable!("barrier ack without a barrier")
    };
    *pending -= 1;
    if *pending == 0 {
        barrier_done(h, core, shared);
    }
}

fn barrier_done(h: &mut Home, core: &mut Core, shared: &Arc<PoolShared>) {
    let (_, then) = h.barrier.take().expect("barrier in progress");
    match then {
        AfterBarrier::Release(clusters) => start_discard(h, core, shared, clusters),
        AfterBarrier::Snapshot {
            volume,
            name,
            reply: to,
        } => {
            let result = h.meta.snapshot_finish(volume, &name);
            h.frozen.remove(&volume);
            for (obj, v, w) in std::mem::take(&mut h.deferred) {
                request_writable(h, core, shared, obj, v, w);
            }
            match result {
                Ok(_) => request_flush(h, core, shared, to),
                Err(e) => reply(core, to, Err(e)),
            }
        }
    }
    if let Some(next) = h.barrier_queue.pop_front() {
        start_barrier(h, core, shared, next);
    }
}

/// Discards `clusters` (freed, durable, past a barrier) on the base device, then releases
/// them; a base device that cannot discard releases them at once.
fn start_discard(
    h: &mut Home,
    core: &mut Core,
    shared: &Arc<PoolShared>,
    mut clusters: Vec<PhysCluster>,
) {
    if !shared.base_bdev.info().can_trim {
        return h.meta.release(&clusters);
    }
    // In place and allocation-free, like the rest of a commit.
    clusters.sort_unstable_by_key(|c| c.get());
    h.discards.push_back(Discard {
        clusters,
        next: 0,
        pending: 0,
    });
    if h.discards.len() == 1 {
        issue_discards(h, core, shared);
    }
}

/// The next run of `d` to discard: its base offset and length, adjacent clusters merged up
/// to [`DISCARD_RUN_MAX_BYTES`]. None when every run is issued.
fn next_discard_run(sb: &Superblock, d: &mut Discard) -> Option<(u64, u32)> {
    let first = *d.clusters.get(d.next)?;
    let run_max = (DISCARD_RUN_MAX_BYTES / u64::from(sb.cluster_size_bytes)).max(1);
    let mut count = 1;
    while d.next + (count as usize) < d.clusters.len()
        && count < run_max
        && d.clusters[d.next + count as usize].get() == first.get() + count
    {
        count += 1;
    }
    d.next += count as usize;
    let len = count * u64::from(sb.cluster_size_bytes);
    Some((sb.cluster_offset(first), len as u32))
}

/// Issues the front batch's runs up to [`DISCARDS_IN_FLIGHT_MAX`]; releases each batch whose
/// runs have all completed and moves on to the next.
fn issue_discards(h: &mut Home, core: &mut Core, shared: &Arc<PoolShared>) {
    while let Some(d) = h.discards.front_mut() {
        if d.next == d.clusters.len() && d.pending == 0 {
            let done = h.discards.pop_front().expect("front exists");
            h.meta.release(&done.clusters);
            continue;
        }
        if d.pending >= DISCARDS_IN_FLIGHT_MAX {
            return;
        }
        let Some((at, len)) = next_discard_run(&shared.sb, d) else {
            return;
        };
        d.pending += 1;
        let own = owner(h, core);
        let tag = h.park(Op::Discard);
        if let Err(res) = shared.submit(core, home_req(own, tag, IoOp::Trim, at, len, None)) {
            h.unpark(tag);
            note_discard_error(shared, res);
            h.discards.front_mut().expect("front exists").pending -= 1;
        }
    }
}

fn discard_done(h: &mut Home, core: &mut Core, shared: &Arc<PoolShared>, res: i32) {
    if res < 0 {
        note_discard_error(shared, res);
    }
    h.discards
        .front_mut()
        .expect("a discard completed with no batch in progress")
        .pending -= 1;
    issue_discards(h, core, shared);
}

fn note_discard_error(shared: &PoolShared, res: i32) {
    tracing::warn!(
        pool = %shared.name,
        error = %std::io::Error::from_raw_os_error(-res),
        "discarding freed clusters failed: their old data stays on the device until reused"
    );
}

/// Control: snapshot `volume` as `name`, durable when the reply arrives.
pub(crate) fn snapshot(
    h: &mut Home,
    core: &mut Core,
    shared: &Arc<PoolShared>,
    volume: &str,
    name: &str,
    to: Reply,
) {
    match h.meta.snapshot_prepare(volume, name) {
        Ok(id) => {
            h.frozen.insert(id);
            start_barrier(
                h,
                core,
                shared,
                AfterBarrier::Snapshot {
                    volume: id,
                    name: name.into(),
                    reply: to,
                },
            );
        }
        Err(e) => reply(core, to, Err(e)),
    }
}

/// Control: a metadata change that is durable when the reply arrives.
pub(crate) fn change(
    h: &mut Home,
    core: &mut Core,
    shared: &Arc<PoolShared>,
    to: Reply,
    f: impl FnOnce(
        &mut Meta,
        &HashMap<u64, (BdevId, Weak<super::channel::VolumeShared>)>,
    ) -> Result<(), PoolError>,
) {
    match f(&mut h.meta, &h.open) {
        Ok(()) => request_flush(h, core, shared, to),
        Err(e) => reply(core, to, Err(e)),
    }
}

/// Control: stop the home poller once idle.
pub(crate) fn close(h: &mut Home) {
    h.closing = true;
}

/// What [`newest_checkpoint`] found: the checkpoint to open, and everything on disk that
/// disagrees with it.
#[derive(Debug)]
pub(crate) struct Found {
    pub(crate) checkpoint: Checkpoint,
    pub(crate) slot: usize,
    /// The chosen checkpoint's header block, for repairing its other copy.
    pub(crate) header_block: Vec<u8>,
    /// Offsets of the chosen slot's header copies that do not hold this header (blank,
    /// damaged, or stale from a commit a crash cut short): open rewrites them.
    pub(crate) repair: Vec<u64>,
    /// Every damaged header copy, naming its slot, copy and error.
    pub(crate) damaged: Vec<String>,
    /// The sequence number of a newer commit whose trace is on disk but that could not be
    /// opened: the pool is being rolled back past it.
    pub(crate) lost_seq: Option<u64>,
}

/// Reads the newest checkpoint of a pool, given the superblock and a reader of the device.
///
/// A commit writes a checkpoint's payload first and makes it durable before it writes the two
/// copies of the header block that validate it, so a slot with a valid header copy holds a
/// complete checkpoint unless something damaged it later. The rules follow: a header copy
/// that does not decode is skipped; the valid copy with the highest sequence number wins, so
/// one damaged copy of the newest header falls back to its twin, never to an older commit;
/// and if that checkpoint's payload fails its checks, the pool is refused rather than rolled
/// back to older metadata that would silently lose flushed writes.
///
/// A fall back that does happen (both copies of the newest header damaged) leaves a trace: a
/// slot left with damaged copies and no valid one (see [`lost_seq`]). It is reported in
/// [`Found::lost_seq`], and the caller says so loudly.
pub(crate) fn newest_checkpoint(
    sb: &Superblock,
    mut read: impl FnMut(u64, usize) -> Result<Vec<u8>, PoolError>,
) -> Result<Found, PoolError> {
    use super::format::{HeaderCopy, CHECKPOINT_PAYLOAD_OFFSET};
    let mut copies = Vec::with_capacity(2 * super::format::HEADER_COPIES);
    for slot in 0..sb.slot_offsets.len() {
        for (copy, at) in sb.header_offsets(slot).into_iter().enumerate() {
            let block = read(at, META_BLOCK_BYTES as usize)?;
            copies.push((slot, copy, at, HeaderCopy::classify(&block), block));
        }
    }
    let describe = |slot: usize, copy: usize, h: &HeaderCopy| match h {
        HeaderCopy::Valid { seq, .. } => format!("slot {slot} copy {copy}: seq {seq}"),
        HeaderCopy::Blank => format!("slot {slot} copy {copy}: empty"),
        HeaderCopy::Damaged { error, .. } => format!("slot {slot} copy {copy}: {error}"),
    };
    let newest = copies
        .iter()
        .filter_map(|(slot, _, _, h, block)| match h {
            HeaderCopy::Valid { seq, payload_bytes } => Some((*seq, *payload_bytes, *slot, block)),
            _ => None,
        })
        .max_by_key(|(seq, _, _, _)| *seq);
    let Some((seq, len, slot, block)) = newest else {
        let detail = copies
            .iter()
            .map(|(s, c, _, h, _)| describe(*s, *c, h))
            .collect::<Vec<_>>();
        return Err(PoolError::NoCheckpoint {
            detail: detail.join("; "),
        });
    };
    let header_block = block.clone();
    let payload_blocks = len.next_multiple_of(META_BLOCK_BYTES);
    if payload_blocks > sb.slot_bytes - super::format::HEADER_COPIES as u64 * META_BLOCK_BYTES {
        return Err(PoolError::NoCheckpoint {
            detail: format!("slot {slot} (seq {seq}) claims {len} bytes, more than its slot"),
        });
    }
    let mut all = header_block.clone();
    all.extend(read(sb.payload_offset(slot), payload_blocks as usize)?);
    debug_assert_eq!(
        all.len(),
        CHECKPOINT_PAYLOAD_OFFSET + payload_blocks as usize
    );
    let checkpoint = Checkpoint::decode(&all).map_err(|e| PoolError::NoCheckpoint {
        detail: format!("newest checkpoint, slot {slot} (seq {seq}), is damaged: {e}; refusing to fall back to older metadata"),
    })?;
    let damaged = copies
        .iter()
        .filter(|(_, _, _, h, _)| matches!(h, HeaderCopy::Damaged { .. }))
        .map(|(s, c, _, h, _)| describe(*s, *c, h))
        .collect();
    let repair = copies
        .iter()
        .filter(|(s, _, _, _, b)| *s == slot && **b != header_block)
        .map(|(_, _, at, _, _)| *at)
        .collect();
    Ok(Found {
        lost_seq: lost_seq(
            &copies
                .iter()
                .map(|(s, _, _, h, _)| (*s, h))
                .collect::<Vec<_>>(),
            seq,
        ),
        checkpoint,
        slot,
        header_block,
        repair,
        damaged,
    })
}

/// The newest commit that damaged header copies show was lost when the checkpoint of
/// sequence `chosen` was opened, given every (slot, copy).
///
/// A slot with a valid copy holds no lost commit: a commit is acknowledged only once both
/// copies are written, so a slot whose surviving copy is older was never fully committed
/// again, and the chosen slot's damaged copies belong to the checkpoint its valid copy
/// decodes (its payload is that one's). A slot whose copies are all damaged held a commit
/// that is gone: the seq its copies name when that is above `chosen`, none when they name
/// `chosen - 1` (it held the previous commit), and otherwise, its seq field damaged too,
/// `chosen + 1` cannot be ruled out.
fn lost_seq(copies: &[(usize, &super::format::HeaderCopy)], chosen: u64) -> Option<u64> {
    use super::format::HeaderCopy;
    let slots = copies.iter().map(|(s, _)| *s).max().map_or(0, |m| m + 1);
    (0..slots)
        .filter_map(|slot| {
            let mine = copies.iter().filter(|(s, _)| *s == slot).map(|(_, h)| *h);
            if mine.clone().any(|h| matches!(h, HeaderCopy::Valid { .. })) {
                return None;
            }
            let raw: Vec<u64> = mine
                .filter_map(|h| match h {
                    HeaderCopy::Damaged { raw_seq, .. } => Some(*raw_seq),
                    _ => None,
                })
                .collect();
            let newest = raw.iter().copied().max()?;
            if newest > chosen {
                Some(newest)
            } else if raw.contains(&chosen.saturating_sub(1)) {
                None
            } else {
                Some(chosen.saturating_add(1))
            }
        })
        .max()
}
