//! One core's path through a nexus: its connections to the remote children, its in-flight
//! table, its timeouts, and (on the home core) the resync job.
//!
//! Every client request becomes a parent slot with one sub-request per child it goes to:
//! one for a read, one per in-sync or syncing child for a write, flush, trim or
//! write-zeroes. A write that goes to a syncing child first enters its copy ranges
//! ([`NexusShared::enter_ranges`]); while a resync copy holds one, it waits in the channel
//! (in order, like every request behind it) and the wait is measured
//! (`ChildShared::write_wait_max_ns`). Local
//! children are reached with [`IoCtx::submit_to`] (the volume's channel on this core), remote
//! ones with a replica frame on this core's connection. A parent completes when its last sub
//! does; the rules deciding its result are in [`NexusChannel::finish`].
//!
//! Limits: [`PARENTS_MAX`] parents (more requests wait in order), and
//! [`CHILD_IN_FLIGHT_BYTES_MAX`] unanswered bytes per remote child (more sub-requests wait in
//! that child's backlog). A write that must wait for a generation raise keeps its parent slot
//! until it is acknowledged ([`NexusChannel::held`]), so held writes count against
//! [`PARENTS_MAX`] and new requests wait in order behind them. A remote sub-request
//! unanswered after the nexus's I/O timeout faults its child; a local one is never timed out
//! (its buffer is the client's, so the request cannot be abandoned; a slow local disk makes
//! the volume slow, not wrong).

use super::resync::ResyncJob;
use super::{
    state_of, ChildState, NexusShared, PathSetup, CHILDREN_MAX, CHILD_IN_FLIGHT_BYTES_MAX,
    PARENTS_MAX,
};
use crate::proto::{Envelope, Epoch, Message, RequestId};
use crate::replica::{HostedReplica, PathGauge};
use crate::transport::Conn;
use cairn_engine::bdev::{BdevChannel, IoOp, IoRequest};
use cairn_engine::dma::DmaBuf;
use cairn_engine::reactor::{BdevId, IoCtx, OwnerId};
use cairn_engine::Core;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a channel with requests held (by the freeze, or by a resync copy of their
/// range), or completions held for a generation raise, looks again.
const HELD_RECHECK: Duration = Duration::from_millis(1);
/// Deadlines the timeout queue holds: one per sub-request that can be in flight. Answered
/// sub-requests leave their deadline behind until it expires; when the queue is full, those
/// are dropped (in place) to make room, so it never grows past this.
const TIMEOUTS_MAX: usize = PARENTS_MAX * CHILDREN_MAX;

pub(super) enum Path {
    None,
    Local {
        bdev: BdevId,
        replica: Arc<HostedReplica>,
        epoch: Epoch,
        gauge: Arc<PathGauge>,
    },
    Remote {
        conn: Box<dyn Conn>,
        in_flight_bytes: usize,
        epoch: Epoch,
    },
}

/// What a parent slot is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Client,
    /// Reading a chunk of held copy range `range` (an index into the job's) from a source.
    ResyncRead {
        range: u8,
    },
    /// Writing that chunk to the target.
    ResyncWrite {
        range: u8,
    },
    ResyncFlush,
}

/// Why a sub-request did not succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum SubErr {
    /// The child answered an errno, or its connection broke or timed out: fault it.
    Failed,
    /// The child refused the epoch of the path the request went on. A newer nexus owns the
    /// volume when that is the nexus's current epoch and no promote runs; otherwise the
    /// refusal is the nexus's own promote raising the fence (or one it will open above), and
    /// only this request failed on the child.
    Stale(u64),
    /// Our path to the child was replaced or closed; the request did not reach the child.
    /// Paths are replaced only while writes are quiesced (a promote) or the child is out of
    /// sync, so a write dropped this way from an in-sync child faults it.
    Dropped,
}

/// One request slot of a nexus channel: a client request fanned out as sub-requests to the
/// children (or a resync step), and what the children have answered so far.
pub(super) struct FanOutRequest {
    pub(super) live: bool,
    pub(super) gen: u32,
    pub(super) kind: Kind,
    pub(super) req: IoRequest,
    /// Children with a sub-request outstanding.
    pub(super) pending: u8,
    pub(super) ok: u8,
    /// Children tried (reads retry on another child).
    pub(super) tried: u8,
    /// Children faulted when the write started: they missed it.
    pub(super) missed: u8,
    /// Syncing children it was sent to: they count toward nothing.
    pub(super) syncing: u8,
    /// It entered its copy ranges (it goes to a syncing child); leaves them when it ends.
    pub(super) ranged: bool,
    /// The write barrier era it was counted in (`NexusChannel::writes_by_era`).
    pub(super) era: u8,
    pub(super) stale: bool,
    /// The flush generation this flush switched away from.
    pub(super) flipped: Option<u64>,
    pub(super) buf: Option<DmaBuf>,
    /// The local path's gauge while a local sub-request runs (its path may be replaced
    /// meanwhile; the request still counts on the gauge it began on).
    pub(super) gauge: Option<Arc<PathGauge>>,
}

impl FanOutRequest {
    fn empty(owner: OwnerId) -> FanOutRequest {
        FanOutRequest {
            live: false,
            gen: 0,
            kind: Kind::Client,
            req: IoRequest {
                op: IoOp::Flush,
                offset_bytes: 0,
                len_bytes: 0,
                buf: None,
                fua: false,
                owner,
                tag: 0,
            },
            pending: 0,
            ok: 0,
            tried: 0,
            missed: 0,
            syncing: 0,
            ranged: false,
            era: 0,
            stale: false,
            flipped: None,
            buf: None,
            gauge: None,
        }
    }
}

/// Whether the sub-request of parent `p` (at generation `gen`) on child `c` is unanswered.
fn sub_pending(p: &FanOutRequest, gen: u32, c: u8) -> bool {
    p.live && p.gen == gen && p.pending & (1 << c) != 0
}

fn is_write_like(op: IoOp) -> bool {
    matches!(op, IoOp::Write | IoOp::Trim | IoOp::WriteZeroes)
}

fn request_id(slot: u16, gen: u32, child: usize) -> RequestId {
    RequestId::new((u64::from(gen) << 32) | (u64::from(slot) << 2) | child as u64)
}

pub(super) struct NexusChannel {
    pub(super) shared: Arc<NexusShared>,
    pub(super) core_index: usize,
    pub(super) owner: OwnerId,
    pub(super) paths: [Path; CHILDREN_MAX],
    path_gen: [u64; CHILDREN_MAX],
    /// Replaced connections still draining their ring operations.
    retired: Vec<Box<dyn Conn>>,
    pub(super) slots: Vec<FanOutRequest>,
    pub(super) free: Vec<u16>,
    /// Client requests not started yet (no free slot, I/O frozen, or a copy holds the
    /// head's range), with when each arrived.
    waiting: VecDeque<(IoRequest, Instant)>,
    /// Since when the head of `waiting` has waited on a resync copy.
    copy_wait_since: Option<Instant>,
    /// The last refused start was refused by a resync copy.
    copy_blocked: bool,
    /// Sub-requests not yet sent to a remote child (send queue or byte budget full).
    backlog: [VecDeque<u16>; CHILDREN_MAX],
    /// Remote sub-request deadlines (slot, its generation, child), in send order (one
    /// timeout, so also deadline order).
    timeouts: VecDeque<(Instant, u16, u32, u8)>,
    /// Replies gathered from a connection before they are acted on.
    replies: Vec<(u16, u32, Result<(), SubErr>)>,
    /// Client requests (reads too) started here and not finished: core-local, read only
    /// here.
    requests_in_flight: u32,
    /// A quiesce round this channel answers once `requests_in_flight` is zero.
    quiesce_round: Option<u64>,
    /// Writes in flight by barrier era: a barrier round switches `era` and is answered once
    /// the old era's count is zero ([`NexusShared::barrier`]).
    writes_by_era: [u32; 2],
    era: u8,
    /// The barrier round being answered and the era it waits for.
    barrier: Option<(u64, u8)>,
    /// A barrier round that arrived while another was waiting: started once that one is.
    barrier_next: Option<u64>,
    pub(super) resync: Option<ResyncJob>,
    /// Completed writes whose acknowledgement waits until the generation they need (first)
    /// is durable on every in-sync child: (generation, parent slot, result). The slot stays
    /// taken (nothing is pending on it) until then.
    held: VecDeque<(u64, u16, i32)>,
}

impl NexusChannel {
    pub(super) fn new(shared: Arc<NexusShared>, io: &mut IoCtx) -> NexusChannel {
        let core_index = shared
            .cores
            .iter()
            .position(|c| *c == io.core())
            .expect("nexus channel opened on one of its cores");
        let owner = io.register_owner(PARENTS_MAX * CHILDREN_MAX);
        let mut ch = NexusChannel {
            owner,
            shared,
            core_index,
            paths: std::array::from_fn(|_| Path::None),
            path_gen: [0; CHILDREN_MAX],
            retired: Vec::new(),
            slots: (0..PARENTS_MAX)
                .map(|_| FanOutRequest::empty(owner))
                .collect(),
            free: (0..PARENTS_MAX as u16).rev().collect(),
            waiting: VecDeque::with_capacity(PARENTS_MAX),
            backlog: std::array::from_fn(|_| VecDeque::with_capacity(PARENTS_MAX)),
            timeouts: VecDeque::with_capacity(TIMEOUTS_MAX),
            replies: Vec::with_capacity(PARENTS_MAX),
            requests_in_flight: 0,
            quiesce_round: None,
            writes_by_era: [0; 2],
            era: 0,
            barrier: None,
            barrier_next: None,
            copy_wait_since: None,
            copy_blocked: false,
            resync: None,
            held: VecDeque::with_capacity(PARENTS_MAX),
        };
        ch.refresh_paths(io);
        ch
    }

    /// Picks up paths the manager published since we last looked.
    fn refresh_paths(&mut self, io: &mut IoCtx) {
        for c in 0..CHILDREN_MAX {
            let gen = self.shared.child(c).gen.load(Ordering::Acquire);
            if gen == self.path_gen[c] {
                continue;
            }
            self.path_gen[c] = gen;
            let setup = self.shared.child(c).paths.lock()[self.core_index].take();
            self.drop_path(io, c);
            self.paths[c] = match setup {
                None => Path::None,
                Some(PathSetup::Local(replica, epoch)) => Path::Local {
                    bdev: replica.bdev(),
                    gauge: replica.register_path(epoch),
                    replica,
                    epoch,
                },
                Some(PathSetup::Remote(link, epoch)) => match link.attach(io) {
                    Ok(conn) => Path::Remote {
                        conn,
                        in_flight_bytes: 0,
                        epoch,
                    },
                    Err(e) => {
                        self.shared
                            .fault(c, &format!("attaching its connection: {e}"));
                        Path::None
                    }
                },
            };
        }
    }

    /// Closes our path to child `c`, failing what is outstanding on it as `Dropped`.
    fn drop_path(&mut self, io: &mut IoCtx, c: usize) {
        if let Path::Remote { mut conn, .. } = std::mem::replace(&mut self.paths[c], Path::None) {
            conn.close(io);
            self.retired.push(conn);
            self.fail_outstanding(io, c, SubErr::Dropped);
        }
    }

    /// Fails every remote sub-request outstanding on child `c` on this core.
    fn fail_outstanding(&mut self, io: &mut IoCtx, c: usize, err: SubErr) {
        self.backlog[c].clear();
        let bit = 1u8 << c;
        for slot in 0..self.slots.len() as u16 {
            let p = &self.slots[slot as usize];
            if p.live && p.pending & bit != 0 {
                self.sub_done(io, slot, c, Err(err));
            }
        }
    }

    /// A connection error or timeout on child `c`: fault it and fail what it had.
    fn child_lost(&mut self, io: &mut IoCtx, c: usize, reason: &str) {
        self.shared.fault(c, reason);
        if let Path::Remote { mut conn, .. } = std::mem::replace(&mut self.paths[c], Path::None) {
            conn.close(io);
            self.retired.push(conn);
        }
        self.fail_outstanding(io, c, SubErr::Failed);
    }

    /// Takes a free slot for `req` (of `kind`); `None` when all are in use.
    pub(super) fn alloc(&mut self, kind: Kind, req: IoRequest) -> Option<u16> {
        let slot = self.free.pop()?;
        let owner = self.owner;
        let p = &mut self.slots[slot as usize];
        let gen = p.gen.wrapping_add(1);
        *p = FanOutRequest::empty(owner);
        p.live = true;
        p.gen = gen;
        p.kind = kind;
        p.req = req;
        Some(slot)
    }

    fn release_slot(&mut self, io: &mut IoCtx, slot: u16) {
        let p = &mut self.slots[slot as usize];
        p.live = false;
        if let Some(b) = p.buf.take() {
            io.pool().put(b);
        }
        self.free.push(slot);
    }

    /// Sends slot's sub-request to child `c`.
    pub(super) fn send_sub(&mut self, io: &mut IoCtx, slot: u16, c: usize) {
        let bit = 1u8 << c;
        {
            let p = &mut self.slots[slot as usize];
            p.pending |= bit;
            p.tried |= bit;
        }
        match &self.paths[c] {
            // No path on this core to a child that may still count as in sync, or to a
            // syncing one whose paths were published: fault it rather than let a write be
            // acknowledged without it (or a syncing child join without it).
            Path::None => self.sub_done(io, slot, c, Err(SubErr::Failed)),
            Path::Local {
                bdev,
                replica,
                epoch,
                gauge,
            } => {
                // Announced before the fence is read, so a rising fence waits for it.
                gauge.begin();
                if !replica.admits(*epoch) {
                    gauge.end();
                    let refused = epoch.get();
                    self.sub_done(io, slot, c, Err(SubErr::Stale(refused)));
                    return;
                }
                let bdev = *bdev;
                self.slots[slot as usize].gauge = Some(gauge.clone());
                let p = &self.slots[slot as usize];
                let req = IoRequest {
                    owner: self.owner,
                    tag: (u32::from(slot) << 2) | c as u32,
                    ..p.req
                };
                io.submit_to(bdev, req);
            }
            Path::Remote { .. } => {
                if !self.backlog[c].is_empty() || !self.try_send(slot, c) {
                    self.backlog[c].push_back(slot);
                }
                self.arm_timeout(io, slot, c);
            }
        }
    }

    fn arm_timeout(&mut self, io: &mut IoCtx, slot: u16, c: usize) {
        let gen = self.slots[slot as usize].gen;
        let at = io.now() + self.shared.options.io_timeout;
        if self.timeouts.len() == TIMEOUTS_MAX {
            let slots = &self.slots;
            self.timeouts
                .retain(|&(_, slot, gen, c)| sub_pending(&slots[slot as usize], gen, c));
        }
        assert!(
            self.timeouts.len() < TIMEOUTS_MAX,
            "more than TIMEOUTS_MAX {TIMEOUTS_MAX} sub-requests in flight"
        );
        self.timeouts.push_back((at, slot, gen, c as u8));
    }

    /// Queues slot's frame on child `c`'s connection; false at the byte budget or when the
    /// send queue is full.
    fn try_send(&mut self, slot: u16, c: usize) -> bool {
        let p = &self.slots[slot as usize];
        let Path::Remote {
            conn,
            in_flight_bytes,
            epoch,
        } = &mut self.paths[c]
        else {
            return false;
        };
        let env = Envelope {
            volume_id: self.shared.volume_id,
            epoch: *epoch,
            request_id: request_id(slot, p.gen, c),
        };
        let cost = p.req.len_bytes as usize;
        if *in_flight_bytes > 0 && *in_flight_bytes + cost > CHILD_IN_FLIGHT_BYTES_MAX {
            return false;
        }
        let off = p.req.offset_bytes;
        let len = u64::from(p.req.len_bytes);
        let data;
        let msg = match p.req.op {
            IoOp::Read => Message::Read {
                offset_bytes: off,
                len_bytes: len,
            },
            IoOp::Write => {
                let buf = p.req.buf.expect("validated write has a buffer");
                // SAFETY: this nexus channel is the bdev the parent was submitted to and the
                // parent has not completed, so its buffer is alive and unchanged; the frame
                // copies the data before this function returns.
                data = unsafe { buf.as_slice(p.req.len_bytes) };
                Message::Write {
                    offset_bytes: off,
                    fua: p.req.fua,
                    data,
                }
            }
            IoOp::Flush => Message::Flush,
            IoOp::Trim => Message::Trim {
                offset_bytes: off,
                len_bytes: len,
            },
            IoOp::WriteZeroes => Message::WriteZeroes {
                offset_bytes: off,
                len_bytes: len,
            },
        };
        if conn.send(&env, &msg).is_err() {
            return false;
        }
        *in_flight_bytes += cost;
        true
    }

    /// Starts (or fails) a client request; false when it must wait (no free slot, I/O
    /// frozen, or a resync copy holds its range) and was not consumed.
    fn start(&mut self, io: &mut IoCtx, req: IoRequest) -> bool {
        let writes = req.op != IoOp::Read;
        let (mut targets, mut missed, mut syncing) = (0u8, 0u8, 0u8);
        let mut refresh = false;
        let mut words = [0u64; CHILDREN_MAX];
        self.copy_blocked = false;
        // A channel sees the freeze before it answers a quiesce round (see
        // NexusShared::quiesce), so a request started here is one the round waits for.
        // Reads wait too: one in flight while the promote raises the replicas' fences would
        // be refused at the old epoch on every child.
        if self.shared.frozen.load(Ordering::Acquire) {
            return false;
        }
        // After the freeze check: a promote publishes its new paths before it unfreezes, so
        // a request that saw it unfrozen picks them up here and never goes out on a path (and
        // an epoch) the promote replaced. (Checked the other way round, a channel could read
        // the paths, then see the freeze lifted, and send on the old ones.)
        self.refresh_paths(io);
        if writes {
            let shared = &*self.shared;
            if shared.fenced() || shared.in_sync_count() < shared.options.min_in_sync {
                io.post(req.owner, req.tag, -libc::EIO);
                return true;
            }
            for (c, word) in words.iter_mut().enumerate() {
                let child = shared.child(c);
                *word = child.word();
                match state_of(*word) {
                    ChildState::InSync => targets |= 1 << c,
                    // Syncing, but its paths are not published yet (the manager sets the
                    // state, then publishes, both under the order's lock): no resync of it
                    // is ordered yet, so its job's barrier, sent later, waits for this write,
                    // which misses it, and the mark it leaves is copied.
                    ChildState::Syncing
                        if matches!(self.paths[c], Path::None) && !child.paths_published() =>
                    {
                        missed |= 1 << c
                    }
                    // Published just now (after this core last looked): picked up below.
                    // Should this core still have no path, `send_sub` faults the child and
                    // its job starts again, rather than rely on a barrier the write may
                    // have missed.
                    ChildState::Syncing => {
                        refresh |= matches!(self.paths[c], Path::None);
                        syncing |= 1 << c
                    }
                    ChildState::Empty => {}
                    ChildState::Faulted => missed |= 1 << c,
                }
            }
        }
        if refresh {
            self.refresh_paths(io);
        }
        let ranged = syncing != 0 && req.op != IoOp::Flush;
        if ranged
            && !self
                .shared
                .enter_ranges(req.offset_bytes, u64::from(req.len_bytes))
        {
            self.copy_wait_since.get_or_insert(io.now());
            self.copy_blocked = true;
            return false;
        }
        if ranged && self.syncing_changed(syncing, &words) {
            // A syncing child left that state (or its incarnation) between the state read
            // and the range entry: the range may have been released early by a failed job
            // whose copy writes are still in flight to it (`resync.rs`). Tried again, the
            // write sees the child faulted and marks it dirty instead of writing it.
            self.shared
                .leave_ranges(req.offset_bytes, u64::from(req.len_bytes));
            return false;
        }
        let Some(slot) = self.alloc(Kind::Client, req) else {
            if ranged {
                self.shared
                    .leave_ranges(req.offset_bytes, u64::from(req.len_bytes));
            }
            return false;
        };
        let era = self.era;
        let p = &mut self.slots[slot as usize];
        p.ranged = ranged;
        p.era = era;
        p.missed = missed;
        p.syncing = syncing;
        self.requests_in_flight += 1;
        if writes {
            self.writes_by_era[era as usize] += 1;
            self.fan_out(io, slot, targets | syncing);
        } else {
            self.read_from_next(io, slot);
        }
        true
    }

    /// Whether a child in `syncing` no longer has the state word `words` held for it.
    fn syncing_changed(&self, syncing: u8, words: &[u64; CHILDREN_MAX]) -> bool {
        (0..CHILDREN_MAX)
            .any(|c| syncing & (1 << c) != 0 && self.shared.child(c).word() != words[c])
    }

    /// Sends a write, flush, trim or write-zeroes to `targets` (the children in sync or
    /// syncing when it started).
    fn fan_out(&mut self, io: &mut IoCtx, slot: u16, targets: u8) {
        let op = self.slots[slot as usize].req.op;
        if op == IoOp::Flush
            && self
                .shared
                .flip_busy
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            let g = self.shared.flush_gen.fetch_add(1, Ordering::SeqCst);
            self.slots[slot as usize].flipped = Some(g);
        }
        if targets == 0 {
            self.finish(io, slot);
            return;
        }
        // Mark all targets pending first so an immediate failure cannot finish the parent
        // before the other children have been sent their copy.
        self.slots[slot as usize].pending = targets;
        for c in 0..CHILDREN_MAX {
            if targets & (1 << c) != 0 {
                self.send_sub(io, slot, c);
            }
        }
    }

    /// Sends a read to the best in-sync child not tried yet: local first.
    fn read_from_next(&mut self, io: &mut IoCtx, slot: u16) {
        let tried = self.slots[slot as usize].tried;
        let usable =
            |c: usize| tried & (1 << c) == 0 && self.shared.child(c).state() == ChildState::InSync;
        let local =
            (0..CHILDREN_MAX).find(|&c| usable(c) && matches!(self.paths[c], Path::Local { .. }));
        let pick = local.or_else(|| {
            (0..CHILDREN_MAX).find(|&c| usable(c) && matches!(self.paths[c], Path::Remote { .. }))
        });
        match pick {
            Some(c) => self.send_sub(io, slot, c),
            None => self.finish(io, slot),
        }
    }

    /// One sub-request of `slot` on child `c` ended.
    pub(super) fn sub_done(
        &mut self,
        io: &mut IoCtx,
        slot: u16,
        c: usize,
        res: Result<(), SubErr>,
    ) {
        let bit = 1u8 << c;
        let shared = &*self.shared;
        let p = &mut self.slots[slot as usize];
        if !p.live || p.pending & bit == 0 {
            return;
        }
        p.pending &= !bit;
        let (op, off, len) = (p.req.op, p.req.offset_bytes, u64::from(p.req.len_bytes));
        let child = shared.child(c);
        match res {
            Ok(()) => {
                p.ok |= bit;
                if is_write_like(op) && p.kind == Kind::Client {
                    let g = shared.flush_gen.load(Ordering::SeqCst);
                    child.unflushed[(g & 1) as usize].mark(off, len);
                    // A fault that raced this write may already have merged the unflushed
                    // maps: record it as missed too (both sides SeqCst).
                    if matches!(child.state(), ChildState::Faulted | ChildState::Empty) {
                        child.dirty.mark(off, len);
                    }
                }
            }
            Err(e) => {
                if is_write_like(op) && p.kind == Kind::Client {
                    child.dirty.mark(off, len);
                }
                match e {
                    // While frozen a promote runs: it raises the fences itself and opens
                    // above every fence it meets, so no refusal seen meanwhile is a fence.
                    SubErr::Stale(epoch) if !shared.frozen.load(Ordering::Acquire) => {
                        if shared.fence(epoch) {
                            tracing::error!(nexus = %shared.name, epoch, "a replica refused this nexus's epoch: a newer nexus owns the volume; writes now fail");
                        }
                        p.stale = shared.fenced();
                        if !p.stale && is_write_like(op) && p.kind == Kind::Client {
                            shared.fault(c, &format!("{op} refused at superseded epoch {epoch}"));
                        }
                    }
                    SubErr::Stale(epoch) => {
                        if is_write_like(op) && p.kind == Kind::Client {
                            shared.fault(
                                c,
                                &format!("{op} refused at epoch {epoch} during a promote"),
                            );
                        }
                    }
                    SubErr::Failed => shared.fault(c, &format!("{op} failed")),
                    SubErr::Dropped if is_write_like(op) && p.kind == Kind::Client => {
                        shared.fault(c, &format!("{op} dropped when its path was replaced"));
                    }
                    SubErr::Dropped => {}
                }
                if op == IoOp::Read && p.kind == Kind::Client && !p.stale {
                    self.read_from_next(io, slot);
                    return;
                }
            }
        }
        if self.slots[slot as usize].pending == 0 {
            self.finish(io, slot);
        }
    }

    /// The parent's last sub-request ended: decide its result and release it.
    fn finish(&mut self, io: &mut IoCtx, slot: u16) {
        let p = &self.slots[slot as usize];
        if p.kind != Kind::Client {
            self.resync_sub_finished(io, slot);
            return;
        }
        let shared = &self.shared;
        let (op, off, len) = (p.req.op, p.req.offset_bytes, u64::from(p.req.len_bytes));
        let success = if op == IoOp::Read {
            p.ok != 0
        } else {
            for c in 0..CHILDREN_MAX {
                if p.missed & (1 << c) != 0 && is_write_like(op) {
                    shared.child(c).dirty.mark(off, len);
                }
            }
            // A syncing child's copy counts toward nothing.
            !p.stale
                && p.ok & !p.syncing != 0
                && !shared.fenced()
                && shared.in_sync_count() >= shared.options.min_in_sync
        };
        if let Some(g) = p.flipped {
            if success {
                for c in 0..CHILDREN_MAX {
                    if p.ok & (1 << c) != 0 {
                        shared.child(c).unflushed[(g & 1) as usize].clear_all();
                    }
                }
            }
            shared.flip_busy.store(false, Ordering::SeqCst);
        }
        let (ranged, era) = (p.ranged, p.era);
        let res = match (success, op) {
            (false, _) => -libc::EIO,
            (true, IoOp::Read | IoOp::Write) => p.req.len_bytes as i32,
            (true, _) => 0,
        };
        // The write's I/O is over on every child and its dirty marks are made: a copy of its
        // range may go ahead, and a quiesce round (a promote) or a barrier (a resync's start)
        // need not wait for its acknowledgement, which a generation raise may hold below.
        if ranged {
            shared.leave_ranges(off, len);
        }
        self.requests_in_flight -= 1;
        if op != IoOp::Read {
            self.writes_by_era[era as usize] -= 1;
        }
        self.answer_quiesce();
        self.answer_barrier();
        if success && op != IoOp::Read && (!self.held.is_empty() || self.shared.raise_pending()) {
            // A child that missed this write may hold the same generation as the others
            // until the raise is durable: acknowledging now could let a new nexus trust it.
            let need = self.shared.gen_target.load(Ordering::SeqCst);
            self.held.push_back((need, slot, res));
            return;
        }
        let (owner, tag) = (
            self.slots[slot as usize].req.owner,
            self.slots[slot as usize].req.tag,
        );
        io.post(owner, tag, res);
        self.release_slot(io, slot);
    }

    /// A barrier round reaches this channel: writes started from now on count in the other
    /// era, and the round is answered once the current one has none left. The paths
    /// published before the round (the job's target's, at least) are picked up first, so
    /// every write of the new era reaches the target.
    fn on_barrier(&mut self, io: &mut IoCtx, round: u64) {
        self.refresh_paths(io);
        if self.barrier.is_some() {
            self.barrier_next = Some(round);
            return;
        }
        let old = self.era;
        self.era ^= 1;
        self.barrier = Some((round, old));
        self.answer_barrier();
    }

    /// Answers the pending barrier round once its era has no write left (and starts one
    /// that arrived meanwhile).
    fn answer_barrier(&mut self) {
        while let Some((round, old)) = self.barrier {
            if self.writes_by_era[old as usize] > 0 {
                return;
            }
            self.shared.barrier_passed(round);
            self.barrier = None;
            if let Some(next) = self.barrier_next.take() {
                let old = self.era;
                self.era ^= 1;
                self.barrier = Some((next, old));
            }
        }
    }

    /// Answers the pending quiesce round once no request of this core is in flight.
    fn answer_quiesce(&mut self) {
        if self.requests_in_flight > 0 {
            return;
        }
        if let Some(round) = self.quiesce_round.take() {
            self.shared.drained(round);
        }
    }

    /// Acknowledges held writes whose generation is durable (stored on every in-sync child
    /// and recorded), in order. A write whose in-sync set fell below the minimum meanwhile,
    /// or whose nexus was fenced, fails instead: the raise may not have reached a copy that
    /// holds it; so does one still waiting when the nexus is destroyed.
    fn poll_held(&mut self, io: &mut IoCtx) -> usize {
        if self.held.is_empty() {
            return 0;
        }
        let shared = self.shared.clone();
        let mut n = 0;
        while let Some(&(need, slot, res)) = self.held.front() {
            let fenced = shared.fenced();
            let durable = shared.gen_durable.load(Ordering::SeqCst) >= need;
            if !durable && !fenced && !shared.closing.load(Ordering::Acquire) {
                break;
            }
            let ok = durable && !fenced && shared.in_sync_count() >= shared.options.min_in_sync;
            let req = self.slots[slot as usize].req;
            io.post(req.owner, req.tag, if ok { res } else { -libc::EIO });
            self.held.pop_front();
            self.release_slot(io, slot);
            n += 1;
        }
        n
    }

    /// Polls child `c`'s connection and acts on its replies.
    fn poll_remote(&mut self, io: &mut IoCtx, c: usize) -> usize {
        let Path::Remote {
            conn,
            in_flight_bytes,
            epoch,
        } = &mut self.paths[c]
        else {
            return 0;
        };
        let path_epoch = epoch.get();
        let mut work = match conn.poll(io) {
            Ok(n) => n,
            Err(e) => {
                let reason = e.to_string();
                self.child_lost(io, c, &reason);
                return 1;
            }
        };
        let mut broken = None;
        while let Some(frame) = conn.recv(io) {
            let frame = match frame {
                Ok(f) => f,
                Err(e) => {
                    broken = Some(e.to_string());
                    break;
                }
            };
            work += 1;
            let id = frame.header.envelope.request_id.get();
            let (gen, slot, child) = (
                (id >> 32) as u32,
                ((id >> 2) & 0x3fff_ffff) as u16,
                (id & 3) as usize,
            );
            let Some(p) = self.slots.get(slot as usize) else {
                broken = Some(format!(
                    "reply for request id {id:#x} this nexus never sent"
                ));
                break;
            };
            if child != c || !p.live || p.gen != gen || p.pending & (1 << c) == 0 {
                // A late answer to a request already failed or timed out.
                continue;
            }
            *in_flight_bytes = in_flight_bytes.saturating_sub(p.req.len_bytes as usize);
            let res = match frame.msg {
                Message::Ok if p.req.op != IoOp::Read => Ok(()),
                Message::ReadData { data }
                    if p.req.op == IoOp::Read && data.len() == p.req.len_bytes as usize =>
                {
                    let buf = p.req.buf.expect("validated read has a buffer");
                    // SAFETY: the parent (a client read submitted to this channel, or a resync
                    // read into its own DMA buffer) has not completed, so the buffer is alive,
                    // and nothing else writes it while the read is outstanding.
                    unsafe { buf.as_mut_slice(p.req.len_bytes) }.copy_from_slice(data);
                    Ok(())
                }
                Message::Error { .. } => Err(SubErr::Failed),
                Message::StaleEpoch { .. } => Err(SubErr::Stale(path_epoch)),
                other => {
                    broken = Some(format!("answered {:?} to a {}", other.opcode(), p.req.op));
                    break;
                }
            };
            self.replies.push((slot, gen, res));
        }
        let replies = std::mem::take(&mut self.replies);
        for &(slot, _, res) in &replies {
            self.sub_done(io, slot, c, res);
        }
        self.replies = replies;
        self.replies.clear();
        if let Some(reason) = broken {
            self.child_lost(io, c, &reason);
        }
        work
    }

    fn poll_local(&mut self, io: &mut IoCtx) -> usize {
        let mut n = 0;
        while let Some(done) = io.pop(self.owner) {
            let (slot, c) = ((done.tag >> 2) as u16, (done.tag & 3) as usize);
            if let Some(g) = self.slots[slot as usize].gauge.take() {
                g.end();
            }
            let len = self.slots[slot as usize].req.len_bytes;
            let op = self.slots[slot as usize].req.op;
            let res = match cairn_engine::bdev::IoError::check(op, done.res, len) {
                Ok(()) => Ok(()),
                Err(e) => {
                    tracing::warn!(nexus = %self.shared.name, error = %e, "local child I/O failed");
                    Err(SubErr::Failed)
                }
            };
            self.sub_done(io, slot, c, res);
            n += 1;
        }
        n
    }

    fn poll_timeouts(&mut self, io: &mut IoCtx) -> usize {
        let mut n = 0;
        while let Some(&(at, slot, gen, c)) = self.timeouts.front() {
            if at > io.now() {
                break;
            }
            self.timeouts.pop_front();
            // A sub-request that finished, or a later one in a reused slot, is not late.
            if !sub_pending(&self.slots[slot as usize], gen, c) {
                continue;
            }
            let c = c as usize;
            if let Path::Remote { .. } = self.paths[c] {
                let ms = self.shared.options.io_timeout.as_millis();
                self.child_lost(io, c, &format!("no answer within {ms} ms"));
                n += 1;
            }
        }
        n
    }

    fn poll_backlogs(&mut self) -> usize {
        let mut n = 0;
        for c in 0..CHILDREN_MAX {
            while let Some(&slot) = self.backlog[c].front() {
                if !self.try_send(slot, c) {
                    break;
                }
                self.backlog[c].pop_front();
                n += 1;
            }
        }
        n
    }

    /// Closes our connections to children no longer in sync or syncing elsewhere, so their
    /// servers release them, failing what they had outstanding.
    fn drop_faulted(&mut self, io: &mut IoCtx) {
        for c in 0..CHILDREN_MAX {
            if matches!(self.paths[c], Path::Remote { .. })
                && matches!(
                    self.shared.child(c).state(),
                    ChildState::Faulted | ChildState::Empty
                )
            {
                self.drop_path(io, c);
            }
        }
    }

    /// Starts held requests in order, until one must wait again. A request that started
    /// after waiting on a resync copy records how long it waited on it.
    fn poll_waiting(&mut self, io: &mut IoCtx) -> usize {
        let mut n = 0;
        while let Some((req, arrived)) = self.waiting.front().copied() {
            if !self.start(io, req) {
                break;
            }
            self.waiting.pop_front();
            if let Some(since) = self.copy_wait_since {
                let waited = io.now().saturating_duration_since(since.max(arrived));
                let job = self.shared.resync.child.load(Ordering::Acquire);
                if job != 0 {
                    self.shared
                        .child(job as usize - 1)
                        .write_wait_max_ns
                        .fetch_max(waited.as_nanos() as u64, Ordering::Relaxed);
                }
            }
            n += 1;
        }
        // The head waits for something else (or nothing): later waits are not the copy's.
        if self.waiting.is_empty() || !self.copy_blocked {
            self.copy_wait_since = None;
        }
        n
    }

    fn poll_retired(&mut self, io: &mut IoCtx) {
        self.retired.retain_mut(|conn| {
            drop(conn.poll(io));
            if conn.busy() {
                return true;
            }
            conn.release(io);
            false
        });
    }
}

/// Barrier round `round` reaches this core: its channel of the nexus answers once the writes
/// it started before have finished (at once if it has no channel here).
pub(super) fn on_barrier(core: &mut Core, shared: &Arc<NexusShared>, round: u64) {
    let answered_later = shared.bdev.get().and_then(|&bdev| {
        core.with_channel(bdev, |ch, io| {
            let nexus = ch.as_any_mut()?.downcast_mut::<NexusChannel>()?;
            nexus.on_barrier(io, round);
            Some(())
        })?
    });
    if answered_later.is_none() {
        shared.barrier_passed(round);
    }
}

/// Quiesce round `round` reaches this core: its channel of the nexus answers once its writes
/// in flight have finished (at once if there are none, or if it has no channel here).
pub(super) fn on_quiesce(core: &mut Core, shared: &Arc<NexusShared>, round: u64) {
    let answered_later = shared.bdev.get().and_then(|&bdev| {
        core.with_channel(bdev, |ch, _| {
            let nexus = ch.as_any_mut()?.downcast_mut::<NexusChannel>()?;
            nexus.quiesce_round = Some(round);
            nexus.answer_quiesce();
            Some(())
        })?
    });
    if answered_later.is_none() {
        shared.drained(round);
    }
}

impl BdevChannel for NexusChannel {
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }

    fn submit(&mut self, io: &mut IoCtx, req: IoRequest) {
        if !self.waiting.is_empty() || !self.start(io, req) {
            self.waiting.push_back((req, io.now()));
        }
    }

    fn poll(&mut self, io: &mut IoCtx) -> usize {
        self.refresh_paths(io);
        self.drop_faulted(io);
        let mut work = self.poll_local(io);
        for c in 0..CHILDREN_MAX {
            work += self.poll_remote(io, c);
        }
        work += self.poll_timeouts(io);
        work += self.poll_backlogs();
        work += self.poll_waiting(io);
        work += self.poll_held(io);
        work += self.poll_resync(io);
        for c in 0..CHILDREN_MAX {
            if let Path::Remote { conn, .. } = &mut self.paths[c] {
                conn.flush(io);
            }
        }
        self.poll_retired(io);
        work
    }

    fn next_deadline(&self) -> Option<Instant> {
        let timeout = self.timeouts.front().map(|t| t.0);
        let held = (!self.waiting.is_empty() || !self.held.is_empty())
            .then(|| Instant::now() + HELD_RECHECK);
        let resync = self.resync.as_ref().and_then(ResyncJob::next_deadline);
        [timeout, held, resync].into_iter().flatten().min()
    }

    fn in_flight(&self) -> usize {
        (PARENTS_MAX - self.free.len()) + self.waiting.len() + self.retired.len()
    }

    fn close(&mut self, io: &mut IoCtx) {
        for c in 0..CHILDREN_MAX {
            if let Path::Remote { mut conn, .. } = std::mem::replace(&mut self.paths[c], Path::None)
            {
                conn.close(io);
                self.retired.push(conn);
            }
        }
        // Closed sockets finish their operations promptly; conns still busy are leaked
        // safely by their Drop.
        for _ in 0..1000 {
            io.reap_ring();
            self.poll_retired(io);
            if self.retired.is_empty() {
                break;
            }
            io.ring().kick();
        }
        while io.pop(self.owner).is_some() {}
        io.release_owner(self.owner);
    }
}
