//! The pool runtime: the home core's side of a pool.
//!
//! All metadata lives in [`Home`], reached only from the pool's home core: by the home poller,
//! and by messages other cores (volume channels) and control callers send there. Its mutex is
//! therefore never contended, and no data I/O ever takes it: channels read cluster maps
//! lock-free and come here only for what changes metadata (first writes, copy-on-write,
//! unmapping, flushes).
//!
//! * **Allocation**: a write to an unallocated cluster makes home take a free cluster, zero it
//!   on the base device, then publish the map entry; waiting writers are told to go ahead.
//! * **Copy-on-write**: a write to a shared cluster makes home copy it to a new cluster in
//!   buffer-sized chunks, then publish the new entry (dropping one reference to the old).
//! * **Commit** (every FLUSH): flush the base device, so data and zeroed clusters are durable;
//!   if metadata changed, write a checkpoint to the inactive slot and flush again. Only then is
//!   the FLUSH acknowledged. Flushes arriving during a commit wait for the next one.
//! * **Barrier**: a round of messages to every core's channels of every open volume, answered
//!   once each has finished the base I/O it had in flight. Freed clusters are reused only after
//!   their free is durable and a barrier has passed, so a late write can never land in a cluster
//!   that another volume now owns; snapshots mark clusters shared and then wait for a barrier, so
//!   no write in flight can change a snapshot after it is taken.

use super::format::{Checkpoint, Superblock, META_BLOCK_BYTES};
use super::map::Entry;
use super::meta::Meta;
use super::PoolError;
use crate::bdev::{Bdev, IoOp, IoRequest};
use crate::core_list::CoreId;
use crate::dma::{DmaBuf, IoBuf, Region};
use crate::reactor::{BdevId, Core, OwnerId, PollerState};
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::mpsc::Sender;
use std::sync::Arc;

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

/// Shared by the control handle, the home poller and every volume channel of the pool.
pub(crate) struct PoolShared {
    pub(crate) name: String,
    pub(crate) home: CoreId,
    pub(crate) base: BdevId,
    pub(crate) base_bdev: Arc<dyn Bdev>,
    pub(crate) sb: Superblock,
    pub(crate) state: Mutex<Home>,
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
        vcluster: u64,
        cluster: u64,
    },
    /// Copying shared cluster `src` to `dst` for `obj`'s `vcluster`; `chunk` is in progress.
    Copy {
        obj: u64,
        vcluster: u64,
        src: u64,
        dst: u64,
        chunk: u32,
        reading: bool,
    },
    /// One step of the commit in progress.
    Commit,
}

struct Commit {
    waiters: Vec<Reply>,
    /// Encoded checkpoint and where it goes, or None when metadata was clean.
    write: Option<(
        Region,
        u64,   /* len */
        usize, /* slot */
        u64,   /* seq */
    )>,
    freed: Vec<u64>,
    stage: CommitStage,
    pending: u32,
    errno: i32,
    /// A zeroed block, the source of the ClearHeader write.
    zero_block: Option<Region>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CommitStage {
    /// Only after a commit failed once its header may have been written: the inactive slot's
    /// header is overwritten with zeros (made durable by the next stage's flush), so that a
    /// crash while its body is rewritten cannot leave a valid header over a torn body.
    ClearHeader,
    /// Data written before the flush, and freshly zeroed clusters, become durable.
    FlushData,
    /// The checkpoint's blocks after the first go to the inactive slot...
    WriteBody,
    /// ...and are made durable before the header block that validates them is written,
    FlushBody,
    /// so a valid header always describes a complete payload (see `newest_checkpoint`).
    WriteHeader,
    FlushCheckpoint,
}

/// What runs when a barrier completes.
enum AfterBarrier {
    Release(Vec<u64>),
    Snapshot {
        volume: u64,
        name: String,
        reply: Reply,
    },
}

/// Everything the home core knows about a pool.
pub(crate) struct Home {
    pub(crate) meta: Meta,
    owner: Option<OwnerId>,
    ops: Vec<Option<Op>>,
    free_ops: Vec<u32>,
    waiting: HashMap<(u64, u64), Vec<Reply>>,
    copy_buf: Option<DmaBuf>,
    copy_queue: VecDeque<(u64, u64)>,
    frozen: HashSet<u64>,
    deferred: Vec<(u64, u64, Reply)>,
    flush_waiters: Vec<Reply>,
    commit: Option<Commit>,
    active_slot: usize,
    barrier: Option<(u32, AfterBarrier)>,
    barrier_queue: VecDeque<AfterBarrier>,
    /// Open volumes: their bdev id and the state their channels share.
    pub(crate) open: HashMap<u64, (BdevId, Arc<super::channel::VolumeShared>)>,
    cores: Vec<CoreId>,
    closing: bool,
    /// A commit failed after it may have written the inactive slot's header (see ClearHeader).
    slot_suspect: bool,
}

impl Home {
    pub(crate) fn new(meta: Meta, active_slot: usize, cores: Vec<CoreId>) -> Home {
        Home {
            meta,
            owner: None,
            ops: Vec::new(),
            free_ops: Vec::new(),
            waiting: HashMap::new(),
            copy_buf: None,
            copy_queue: VecDeque::new(),
            frozen: HashSet::new(),
            deferred: Vec::new(),
            flush_waiters: Vec::new(),
            commit: None,
            active_slot,
            barrier: None,
            barrier_queue: VecDeque::new(),
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
        self.ops.iter().any(Option::is_some) || self.commit.is_some() || self.barrier.is_some()
    }
}

impl PoolShared {
    /// Runs `f` with the home state. Only ever called on the home core.
    pub(crate) fn with_home<R>(
        self: &Arc<Self>,
        core: &mut Core,
        f: impl FnOnce(&mut Home, &mut Core, &Arc<PoolShared>) -> R,
    ) -> R {
        debug_assert_eq!(core.id(), self.home, "pool state touched off its home core");
        let mut home = self.state.lock();
        f(&mut home, core, self)
    }

    fn cluster_offset(&self, cluster: u64) -> u64 {
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
            core.io().send(target, move |c: &mut Core| {
                super::channel::on_reply(c, bdev, token, res)
            });
        }
    }
}

/// The home core's poller: reaps home I/O and advances allocations, copies and commits.
pub(crate) struct HomePoller {
    pub(crate) shared: Arc<PoolShared>,
}

impl crate::reactor::Poller for HomePoller {
    fn poll(&mut self, core: &mut Core) -> PollerState {
        self.shared.clone().with_home(core, |h, core, shared| {
            let owner = *h.owner.get_or_insert_with(|| core.io().register_owner(64));
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
    *h.owner.get_or_insert_with(|| core.io().register_owner(64))
}

/// A channel wants `vcluster` of `obj` writable in place.
pub(crate) fn request_writable(
    h: &mut Home,
    core: &mut Core,
    shared: &Arc<PoolShared>,
    obj: u64,
    vcluster: u64,
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
    if let Some(waiters) = h.waiting.get_mut(&(obj, vcluster)) {
        return waiters.push(to);
    }
    match entry {
        Entry::Mapped { shared: false, .. } => reply(core, to, Ok(())),
        Entry::Mapped { shared: true, .. } => {
            if h.meta.unshare_if_sole(obj, vcluster) {
                return reply(core, to, Ok(()));
            }
            h.waiting.insert((obj, vcluster), vec![to]);
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
            h.waiting.insert((obj, vcluster), vec![to]);
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
    let chunk_bytes = buf.len_bytes.min(shared.sb.cluster_size_bytes);
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
    vcluster: u64,
    result: Result<(), PoolError>,
) {
    for to in h.waiting.remove(&(obj, vcluster)).unwrap_or_default() {
        reply(core, to, result.clone());
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
    first: u64,
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
    for v in first..first + count {
        if !h.waiting.contains_key(&(obj, v)) {
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
    let waiters = std::mem::take(&mut h.flush_waiters);
    let staged = stage_checkpoint(h, shared);
    let write = match staged {
        Ok(write) => write,
        Err(e) => {
            return waiters
                .into_iter()
                .for_each(|w| reply(core, w, Err(e.clone())));
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
    let at = shared.sb.slot_offsets[1 - h.active_slot];
    tracing::warn!(pool = %shared.name, slot = 1 - h.active_slot, "retrying a failed commit: clearing the slot's header first");
    let buf = IoBuf {
        ptr: zero.base(),
        len_bytes: META_BLOCK_BYTES as u32,
        fixed_index: None,
    };
    let c = h.commit.as_mut().expect("just set");
    c.stage = CommitStage::ClearHeader;
    c.zero_block = Some(zero);
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
        (CommitStage::FlushData, Some((_, len, _, _))) if *len > META_BLOCK_BYTES => {
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
    let Some((region, len, slot, _)) = &c.write else {
        unreachable!("only a commit with a checkpoint gets past FlushData")
    };
    let (base_ptr, len, at) = (region.base(), *len, shared.sb.slot_offsets[*slot]);
    match next {
        CommitStage::WriteBody => write_span(h, core, shared, base_ptr, at, META_BLOCK_BYTES, len),
        CommitStage::WriteHeader => write_span(h, core, shared, base_ptr, at, 0, META_BLOCK_BYTES),
        CommitStage::FlushData | CommitStage::FlushBody | CommitStage::FlushCheckpoint => {
            commit_issue(h, core, shared, IoOp::Flush, 0, 0, None)
        }
        CommitStage::ClearHeader => unreachable!("never re-entered"),
    }
}

/// Encodes the metadata into staging memory when it changed since the last commit: the
/// region, its length, the slot it goes to and its sequence number.
fn stage_checkpoint(
    h: &Home,
    shared: &PoolShared,
) -> Result<Option<(Region, u64, usize, u64)>, PoolError> {
    if !h.meta.dirty {
        return Ok(None);
    }
    let seq = h.meta.seq + 1;
    let bytes = h
        .meta
        .to_checkpoint(seq)
        .encode(shared.sb.slot_bytes)
        .ok_or(PoolError::MetadataFull {
            slot_bytes: shared.sb.slot_bytes,
        })?;
    let region = Region::map(bytes.len(), false, false).map_err(|e| PoolError::Failed {
        pool: shared.name.clone(),
        why: e.to_string(),
    })?;
    // SAFETY: the region was just mapped with at least bytes.len() bytes, and nothing else
    // knows about it yet.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), region.base(), bytes.len()) };
    Ok(Some((region, bytes.len() as u64, 1 - h.active_slot, seq)))
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
        let buf = IoBuf {
            ptr,
            len_bytes: n as u32,
            fixed_index: None,
        };
        commit_issue(h, core, shared, IoOp::Write, at + done, n as u32, Some(buf));
        done += n;
    }
}

fn commit_done(h: &mut Home, core: &mut Core, shared: &Arc<PoolShared>) {
    let c = h.commit.take().expect("commit in progress");
    if let Some((_, _, slot, seq)) = c.write {
        h.active_slot = slot;
        h.meta.seq = seq;
        h.slot_suspect = false;
    }
    for w in c.waiters {
        reply(core, w, Ok(()));
    }
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
    for w in c.waiters {
        reply(core, w, Err(e.clone()));
    }
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
    let bdevs: Vec<BdevId> = h.open.values().map(|(b, _)| *b).collect();
    let targets = bdevs.len() as u32 * h.cores.len() as u32;
    h.barrier = Some((targets, then));
    for &target in &h.cores {
        for &bdev in &bdevs {
            let pool = shared.clone();
            core.io().send(target, move |c: &mut Core| {
                super::channel::on_barrier(c, bdev, pool)
            });
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
        AfterBarrier::Release(clusters) => h.meta.release(&clusters),
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
        &HashMap<u64, (BdevId, Arc<super::channel::VolumeShared>)>,
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

/// Reads the newest checkpoint of a pool, given the superblock and a reader of the device.
///
/// A commit writes a checkpoint's header block last, after its other blocks are durable, so a
/// slot whose header is valid holds a complete checkpoint unless something damaged it later.
/// The rules follow: a slot without a valid header (empty, or a header write torn by a crash)
/// is skipped; the valid header with the highest sequence number wins; and if that
/// checkpoint's payload fails its checks, the pool is refused rather than rolled back to older
/// metadata that would silently lose flushed writes.
pub(crate) fn newest_checkpoint(
    sb: &Superblock,
    mut read: impl FnMut(u64, usize) -> Result<Vec<u8>, PoolError>,
) -> Result<(Checkpoint, usize), PoolError> {
    use super::format::{FormatError, CHECKPOINT_HEADER_BYTES};
    let mut headers = Vec::new();
    let mut why = Vec::new();
    for (slot, &offset) in sb.slot_offsets.iter().enumerate() {
        let head = read(offset, META_BLOCK_BYTES as usize)?;
        match Checkpoint::decode_header(&head) {
            Ok((seq, len)) => headers.push((seq, len, slot)),
            Err(FormatError::Magic { .. }) => why.push(format!("slot {slot}: empty")),
            Err(e) => {
                tracing::warn!(slot, error = %e, "metadata slot header unusable (a commit interrupted by a crash leaves one)");
                why.push(format!("slot {slot}: {e}"));
            }
        }
    }
    let Some(&(seq, len, slot)) = headers.iter().max_by_key(|(seq, _, _)| *seq) else {
        return Err(PoolError::NoCheckpoint {
            detail: why.join("; "),
        });
    };
    let total = (CHECKPOINT_HEADER_BYTES as u64)
        .saturating_add(len)
        .next_multiple_of(META_BLOCK_BYTES);
    if total > sb.slot_bytes {
        return Err(PoolError::NoCheckpoint {
            detail: format!("slot {slot} (seq {seq}) claims {len} bytes, more than its slot"),
        });
    }
    let all = read(sb.slot_offsets[slot], total as usize)?;
    Checkpoint::decode(&all).map(|c| (c, slot)).map_err(|e| PoolError::NoCheckpoint {
        detail: format!("newest checkpoint, slot {slot} (seq {seq}), is damaged: {e}; refusing to fall back to older metadata"),
    })
}
