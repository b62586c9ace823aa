//! Resync and rebuild, run by the nexus's channel on its home core (the first of its cores).
//!
//! The job copies every region set in the target's dirty map from an in-sync child (local
//! first) to the target, which receives no client writes while it is `Syncing`; writes that
//! land meanwhile set their regions again when they complete. Passes repeat until few
//! regions remain, then the job freezes writes on every core, waits for those in flight to
//! finish, copies the rest, flushes the target and only then puts it in the in-sync set and
//! thaws. A rebuild is the same job with every region set. Ordering argument:
//! `docs/replication.md`.
//!
//! Progress (bytes done of the total, and the fraction shown) only goes forward within a job
//! and starts from zero for each one: `ResyncProgress::publish`.
//!
//! Limits: [`RESYNC_CHUNKS_MAX`] chunk copies in flight; the rate limit in
//! `NexusOptions::rebuild_bytes_per_s`; at most [`FINAL_REGIONS_MAX`] regions (or whatever
//! is left after [`PASSES_MAX`] passes) are copied with writes frozen.

use super::channel::{Kind, NexusChannel, Path};
use super::{ChildState, ResyncOrder, CHILDREN_MAX};
use cairn_engine::bdev::{IoOp, IoRequest};
use cairn_engine::reactor::IoCtx;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Chunk copies (a read then a write of one DMA buffer) in flight.
pub const RESYNC_CHUNKS_MAX: usize = 8;
/// Regions left at the end of a pass below which the job freezes writes to finish.
pub const FINAL_REGIONS_MAX: u64 = 64;
/// Passes after which the job freezes writes whatever is left (a volume rewritten faster
/// than it can be copied still converges).
pub const PASSES_MAX: u32 = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Copy,
    Quiesce,
    Final,
    Flush,
    FlushWait,
}

pub(super) struct ResyncJob {
    target: usize,
    full: bool,
    phase: Phase,
    cursor: u64,
    /// The region being issued and the next offset in it.
    region: Option<(u64, u64)>,
    pass: u32,
    /// The quiesce round the Quiesce phase waits for.
    quiesce_round: u64,
    ops: usize,
    issued_bytes: u64,
    done_bytes: u64,
    started: Instant,
    wake_at: Option<Instant>,
    failed: Option<String>,
}

impl ResyncJob {
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.wake_at.or_else(|| {
            // Quiescing waits on other cores: look again soon.
            (self.phase == Phase::Quiesce).then(|| Instant::now() + Duration::from_micros(200))
        })
    }
}

impl NexusChannel {
    fn job(&mut self) -> &mut ResyncJob {
        self.resync.as_mut().expect("a resync job is running")
    }

    /// Advances the resync job (home core only); returns how much it did.
    pub(super) fn poll_resync(&mut self, io: &mut IoCtx) -> usize {
        if self.core_index != 0 {
            return 0;
        }
        if self.resync.is_none() {
            if !self.shared.resync_ordered.swap(false, Ordering::AcqRel) {
                return 0;
            }
            let shared = self.shared.clone();
            let mut order = shared.resync_order.lock();
            let Some(o) = order.take() else {
                return 0;
            };
            if shared.child(o.child).state() != ChildState::Syncing {
                return 0;
            }
            // Begun under the lock, so the manager never sees neither an order nor a job.
            self.begin(io, o);
            drop(order);
        }
        let work = self.step(io);
        let job = self.job();
        let over = job.ops == 0 && (job.failed.is_some() || job.phase == Phase::FlushWait);
        if over {
            let job = self.resync.take().expect("present");
            let success = job.failed.is_none();
            self.end(&job, success);
        }
        work
    }

    fn begin(&mut self, io: &mut IoCtx, order: ResyncOrder) {
        let target = self.shared.child(order.child);
        if order.full {
            target.dirty.set_all();
        }
        let region_bytes = target.dirty.region_bytes();
        // Every counter starts from zero for this job, before `child` makes it visible.
        target.copied_bytes.store(0, Ordering::Release);
        let p = &self.shared.resync;
        p.full.store(order.full, Ordering::Release);
        p.done_bytes.store(0, Ordering::Release);
        p.total_bytes.store(
            (target.dirty.count() * region_bytes).min(self.shared.info.size_bytes),
            Ordering::Release,
        );
        p.progress_ppm.store(0, Ordering::Release);
        p.elapsed_ms.store(0, Ordering::Release);
        p.child.store(order.child as u8 + 1, Ordering::Release);
        tracing::info!(
            nexus = %self.shared.name,
            child = order.child,
            full = order.full,
            regions = target.dirty.count(),
            "resync started"
        );
        self.resync = Some(ResyncJob {
            target: order.child,
            full: order.full,
            phase: Phase::Copy,
            cursor: 0,
            region: None,
            pass: 0,
            quiesce_round: 0,
            ops: 0,
            issued_bytes: 0,
            done_bytes: 0,
            started: io.now(),
            wake_at: None,
            failed: None,
        });
    }

    fn end(&mut self, job: &ResyncJob, success: bool) {
        let shared = &self.shared;
        let target = shared.child(job.target);
        if success {
            target.set_state(ChildState::InSync);
            // Back in sync: why it once left no longer describes it.
            target.reason.lock().clear();
        } else if let Some((r, _)) = job.region {
            target.dirty.set(r);
        }
        shared.frozen.store(false, Ordering::SeqCst);
        shared.resync.publish(job.done_bytes, 0);
        shared.resync.child.store(0, Ordering::Release);
        let secs = job.started.elapsed().as_secs_f64();
        if success {
            tracing::info!(
                nexus = %shared.name,
                child = job.target,
                full = job.full,
                copied_bytes = job.done_bytes,
                seconds = secs,
                "resync finished; child is in sync"
            );
        } else {
            let reason = job.failed.clone().unwrap_or_default();
            shared.fault(job.target, &format!("resync failed: {reason}"));
            tracing::warn!(nexus = %shared.name, child = job.target, reason = %reason, "resync abandoned");
        }
    }

    fn step(&mut self, io: &mut IoCtx) -> usize {
        let shared = self.shared.clone();
        let job = self.job();
        let p = &shared.resync;
        p.elapsed_ms
            .store(job.started.elapsed().as_millis() as u64, Ordering::Release);
        p.publish(job.done_bytes, 0);
        if job.failed.is_some() {
            return 0;
        }
        let target = job.target;
        if shared.child(target).state() != ChildState::Syncing {
            job.failed = Some("the target left the syncing state".into());
            return 1;
        }
        match job.phase {
            Phase::Copy | Phase::Final => self.issue(io),
            Phase::Quiesce => {
                if shared.quiesced(job.quiesce_round) {
                    job.phase = Phase::Final;
                    job.cursor = 0;
                    return 1;
                }
                0
            }
            Phase::Flush => {
                let req = IoRequest {
                    op: IoOp::Flush,
                    offset_bytes: 0,
                    len_bytes: 0,
                    buf: None,
                    fua: false,
                    owner: self.owner,
                    tag: 0,
                };
                let Some(slot) = self.alloc(Kind::ResyncFlush, req) else {
                    return 0;
                };
                let job = self.job();
                job.ops += 1;
                job.phase = Phase::FlushWait;
                self.send_sub(io, slot, target);
                1
            }
            Phase::FlushWait => 0,
        }
    }

    /// Issues chunk copies up to the limits; moves to the next phase at the end of a pass.
    fn issue(&mut self, io: &mut IoCtx) -> usize {
        let shared = self.shared.clone();
        let target = self.job().target;
        let dirty = &shared.child(target).dirty;
        let region_bytes = dirty.region_bytes();
        let size = shared.info.size_bytes;
        let chunk_max = u64::from(super::NEXUS_IO_MAX_BYTES.min(io.pool().buf_size_bytes()));
        let mut n = 0;
        self.job().wake_at = None;
        while self.job().ops < RESYNC_CHUNKS_MAX {
            let job = self.job();
            if let Some(rate) = shared.options.rebuild_bytes_per_s {
                let allowed = (job.started.elapsed().as_secs_f64() * rate as f64) as u64;
                if job.issued_bytes >= allowed.max(chunk_max) {
                    let due = job.issued_bytes as f64 / rate as f64;
                    job.wake_at = Some(job.started + Duration::from_secs_f64(due));
                    break;
                }
            }
            let (r, off) = match job.region {
                Some(cur) => cur,
                None => match dirty.next_set(job.cursor) {
                    Some(r) => (r, r * region_bytes),
                    None => {
                        if job.ops == 0 {
                            self.end_of_pass(io);
                            n += 1;
                        }
                        break;
                    }
                },
            };
            let Some(source) = self.source(target) else {
                self.job().failed = Some("no in-sync child to copy from".into());
                break;
            };
            if io.pool().available() == 0 || self.free.is_empty() {
                break;
            }
            if self.job().region.is_none() {
                // Clear the bit before the copy reads: a write completing after this sets
                // it again, so the region is copied once more.
                dirty.take(r);
            }
            let end = ((r + 1) * region_bytes).min(size);
            let len = chunk_max.min(end - off);
            let mut buf = io.pool().get().expect("checked");
            let req = IoRequest {
                op: IoOp::Read,
                offset_bytes: off,
                len_bytes: len as u32,
                buf: Some(buf.io_buf()),
                fua: false,
                owner: self.owner,
                tag: 0,
            };
            let kind = Kind::ResyncRead {
                target: target as u8,
            };
            let slot = self.alloc(kind, req).expect("checked");
            self.slots[slot as usize].buf = Some(buf);
            let job = self.job();
            job.ops += 1;
            job.issued_bytes += len;
            job.region = (off + len < end).then_some((r, off + len));
            if job.region.is_none() {
                job.cursor = r + 1;
            }
            self.send_sub(io, slot, source);
            n += 1;
        }
        n
    }

    fn end_of_pass(&mut self, io: &mut IoCtx) {
        let shared = self.shared.clone();
        let job = self.job();
        let dirty = &shared.child(job.target).dirty;
        let left = dirty.count();
        // The next pass's regions join the total now, once (see `ResyncProgress`).
        shared
            .resync
            .publish(job.done_bytes, job.done_bytes + left * dirty.region_bytes());
        match job.phase {
            Phase::Copy if left <= FINAL_REGIONS_MAX || job.pass + 1 >= PASSES_MAX => {
                job.quiesce_round = shared.quiesce(|core, f| io.send(core, f));
                job.phase = Phase::Quiesce;
            }
            Phase::Copy => {
                job.pass += 1;
                job.cursor = 0;
            }
            _ => job.phase = Phase::Flush,
        }
    }

    /// An in-sync child this core can read from, local first.
    fn source(&self, target: usize) -> Option<usize> {
        let ok = |c: usize| c != target && self.shared.child(c).state() == ChildState::InSync;
        (0..CHILDREN_MAX)
            .find(|&c| ok(c) && matches!(self.paths[c], Path::Local { .. }))
            .or_else(|| {
                (0..CHILDREN_MAX).find(|&c| ok(c) && matches!(self.paths[c], Path::Remote { .. }))
            })
    }

    /// A resync sub-request's parent finished: a read goes on to the target as a write;
    /// anything else ends the chunk (or the flush).
    pub(super) fn resync_sub_finished(&mut self, io: &mut IoCtx, slot: u16) {
        let target = self.job().target;
        let p = &mut self.slots[slot as usize];
        let ok = p.ok != 0;
        let (off, len) = (p.req.offset_bytes, u64::from(p.req.len_bytes));
        let kind = p.kind;
        if matches!(kind, Kind::ResyncRead { .. }) && ok {
            p.kind = Kind::ResyncWrite;
            p.req.op = IoOp::Write;
            p.ok = 0;
            p.tried = 0;
            self.send_sub(io, slot, target);
            return;
        }
        let shared = self.shared.clone();
        let job = self.job();
        match kind {
            Kind::ResyncRead { .. } | Kind::ResyncWrite if !ok => {
                shared.child(target).dirty.mark(off, len);
                job.failed
                    .get_or_insert_with(|| format!("copying {len} bytes at offset {off} failed"));
            }
            Kind::ResyncWrite => {
                job.done_bytes += len;
                shared
                    .child(target)
                    .copied_bytes
                    .fetch_add(len, Ordering::Relaxed);
            }
            Kind::ResyncFlush if !ok => {
                job.failed
                    .get_or_insert_with(|| "flushing the target failed".into());
            }
            _ => {}
        }
        job.ops -= 1;
        let p = &mut self.slots[slot as usize];
        p.live = false;
        if let Some(b) = p.buf.take() {
            io.pool().put(b);
        }
        self.free.push(slot);
    }
}
