//! The fault bdev: wraps another bdev and injects I/O errors, added latency, and crashes.
//!
//! It is a test instrument and never sits on a production path, so it may allocate and lock per
//! request. Three faults, all switchable at run time through [`FaultControl`]:
//!
//! * **Errors**: reads, writes or flushes fail with a chosen errno until cleared.
//! * **Latency**: every request waits this long on its core's timer before it reaches the inner
//!   bdev, which models a slow disk without blocking the reactor.
//! * **Crash** (only with [`FaultBdev::with_volatile_cache`]): the bdev behaves like a disk with a
//!   volatile write cache. Plain writes land in the cache and complete at once; reads see them.
//!   FLUSH writes the cache to the inner bdev and then flushes it. FUA writes, trims and
//!   write-zeroes go straight through. [`FaultControl::crash`] throws the cache away, so the
//!   inner bdev holds exactly the durable state: every write not yet flushed is lost.

use super::{Bdev, BdevChannel, BdevError, BdevInfo, IoOp, IoRequest};
use crate::dma::Region;
use crate::reactor::{IoCtx, OwnerId};
use parking_lot::Mutex;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Run-time switches of a fault bdev, shared by all its channels and the test driving it.
#[derive(Debug, Default)]
pub struct FaultControl {
    read_errno: AtomicI32,
    write_errno: AtomicI32,
    flush_errno: AtomicI32,
    latency_us: AtomicU64,
    /// Flushes to let through before exactly one fails with EIO; 0 when unarmed.
    flush_countdown: AtomicU32,
    cache: Option<Mutex<WriteCache>>,
}

impl FaultControl {
    /// Makes every read fail with `errno` (0 clears).
    pub fn fail_reads(&self, errno: i32) {
        self.read_errno.store(errno, Ordering::Relaxed);
    }

    /// Makes every write, trim and write-zeroes fail with `errno` (0 clears).
    pub fn fail_writes(&self, errno: i32) {
        self.write_errno.store(errno, Ordering::Relaxed);
    }

    /// Makes every flush fail with `errno` (0 clears).
    pub fn fail_flushes(&self, errno: i32) {
        self.flush_errno.store(errno, Ordering::Relaxed);
    }

    /// Delays every request by `latency` before it reaches the inner bdev.
    pub fn set_latency(&self, latency: Duration) {
        self.latency_us
            .store(latency.as_micros() as u64, Ordering::Relaxed);
    }

    /// Clears every injected error and latency.
    pub fn heal(&self) {
        self.fail_reads(0);
        self.fail_writes(0);
        self.fail_flushes(0);
        self.set_latency(Duration::ZERO);
    }

    /// Drops every write not yet flushed, as a power loss would. Returns the blocks lost.
    /// Panics if the bdev was built without a volatile cache: that is a test bug.
    pub fn crash(&self) -> usize {
        let cache = self
            .cache
            .as_ref()
            .expect("crash() needs FaultBdev::with_volatile_cache");
        let mut cache = cache.lock();
        let lost = cache.blocks.len();
        cache.blocks.clear();
        lost
    }

    /// Blocks written but not yet flushed.
    pub fn unflushed_blocks(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.lock().blocks.len())
    }

    /// Lets `passing` flushes succeed, then fails the next one with EIO, once.
    pub fn fail_one_flush_after(&self, passing: u32) {
        self.flush_countdown.store(passing + 1, Ordering::Relaxed);
    }

    fn errno_for(&self, op: IoOp) -> i32 {
        if op == IoOp::Flush {
            let armed = self.flush_countdown.load(Ordering::Relaxed);
            if armed > 0 && self.flush_countdown.fetch_sub(1, Ordering::Relaxed) == 1 {
                return libc::EIO;
            }
        }
        let cell = match op {
            IoOp::Read => &self.read_errno,
            IoOp::Write | IoOp::Trim | IoOp::WriteZeroes => &self.write_errno,
            IoOp::Flush => &self.flush_errno,
        };
        cell.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Default)]
struct WriteCache {
    /// Dirty blocks by block index, each with the generation of its last write.
    blocks: BTreeMap<u64, (u64, Box<[u8]>)>,
    generation: u64,
    /// Blocks a flush is writing back to the inner bdev, with how many write-backs of each are
    /// in flight. A request that writes the inner bdev directly waits for them: a write-back
    /// of older data landing after it would bring that data back.
    writing_back: BTreeMap<u64, u32>,
}

impl WriteCache {
    fn write(&mut self, first_block: u64, data: &[u8], block_size: usize) {
        for (i, chunk) in data.chunks(block_size).enumerate() {
            self.generation += 1;
            self.blocks
                .insert(first_block + i as u64, (self.generation, chunk.into()));
        }
    }

    fn invalidate(&mut self, first_block: u64, blocks: u64) {
        let doomed: Vec<u64> = self
            .blocks
            .range(first_block..first_block + blocks)
            .map(|(&b, _)| b)
            .collect();
        doomed.iter().for_each(|b| drop(self.blocks.remove(b)));
    }

    /// The cached blocks of a range, taken when a read is issued: a flush on another core may
    /// move them to the inner bdev and out of the cache before the read completes.
    fn snapshot(&self, first_block: u64, blocks: u64) -> Vec<(u64, Box<[u8]>)> {
        self.blocks
            .range(first_block..first_block + blocks)
            .map(|(&b, (_, data))| (b, data.clone()))
            .collect()
    }

    fn busy(&self, first_block: u64, blocks: u64) -> bool {
        let range = first_block..first_block + blocks;
        self.writing_back.range(range).next().is_some()
    }

    fn write_back_done(&mut self, block: u64) {
        let count = self
            .writing_back
            .get_mut(&block)
            .expect("write-back was counted");
        *count -= 1;
        if *count == 0 {
            self.writing_back.remove(&block);
        }
    }
}

/// Copies a read's cache snapshot over the data the inner bdev returned.
fn overlay(snapshot: &[(u64, Box<[u8]>)], first_block: u64, out: &mut [u8], block_size: usize) {
    for (b, data) in snapshot {
        let at = (b - first_block) as usize * block_size;
        out[at..at + block_size].copy_from_slice(data);
    }
}

/// A bdev that injects faults into another.
#[derive(Debug)]
pub struct FaultBdev {
    info: BdevInfo,
    inner: Arc<dyn Bdev>,
    control: Arc<FaultControl>,
}

impl std::fmt::Debug for dyn Bdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bdev({})", self.info().name)
    }
}

impl FaultBdev {
    /// Wraps `inner`; writes go straight through, so `crash` is unavailable.
    pub fn new(name: &str, inner: Arc<dyn Bdev>) -> FaultBdev {
        FaultBdev::build(name, inner, None)
    }

    /// Wraps `inner` behind a volatile write cache, so `crash` can lose unflushed writes.
    pub fn with_volatile_cache(name: &str, inner: Arc<dyn Bdev>) -> FaultBdev {
        FaultBdev::build(name, inner, Some(Mutex::new(WriteCache::default())))
    }

    fn build(name: &str, inner: Arc<dyn Bdev>, cache: Option<Mutex<WriteCache>>) -> FaultBdev {
        let mut info = inner.info().clone();
        info.name = name.into();
        FaultBdev {
            info,
            inner,
            control: Arc::new(FaultControl {
                cache,
                ..FaultControl::default()
            }),
        }
    }

    pub fn control(&self) -> Arc<FaultControl> {
        self.control.clone()
    }
}

/// Capacity hint for the channel's private completion queue; it grows if exceeded (test-only).
const FAULT_QUEUE_HINT: usize = 256;

impl Bdev for FaultBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn open_channel(&self, io: &mut IoCtx) -> Result<Box<dyn BdevChannel>, BdevError> {
        let inner = self.inner.open_channel(io)?;
        Ok(Box::new(FaultChannel {
            inner,
            control: self.control.clone(),
            owner: io.register_owner(FAULT_QUEUE_HINT),
            block_size: self.info.block_size_bytes as usize,
            slots: Vec::new(),
            free: Vec::new(),
            delayed: VecDeque::new(),
            blocked: VecDeque::new(),
        }))
    }
}

/// What an intercepted inner request was for.
enum Pending {
    /// A read whose data must be overlaid with the cached blocks it saw when issued.
    Read(IoRequest, Vec<(u64, Box<[u8]>)>),
    /// A request passed through whose completion is forwarded unchanged.
    Forward(IoRequest),
    /// One cached block being written back by the flush in slot `flush`.
    WriteBack {
        flush: u32,
        block: u64,
        generation: u64,
    },
    /// A flush: waits for its write-backs, then for the inner flush.
    Flush {
        req: IoRequest,
        remaining: u32,
        errno: i32,
        written: Vec<(u64, u64)>,
        staging: Option<Region>,
    },
}

struct FaultChannel {
    inner: Box<dyn BdevChannel>,
    control: Arc<FaultControl>,
    owner: OwnerId,
    block_size: usize,
    slots: Vec<Option<Pending>>,
    free: Vec<u32>,
    delayed: VecDeque<(Instant, IoRequest)>,
    /// Direct writes waiting for a write-back of one of their blocks, and flushes waiting for
    /// another flush's write-backs (see `WriteCache::writing_back`).
    blocked: VecDeque<IoRequest>,
}

impl FaultChannel {
    fn park(&mut self, p: Pending) -> u32 {
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(p);
                i
            }
            None => {
                self.slots.push(Some(p));
                (self.slots.len() - 1) as u32
            }
        }
    }

    fn unpark(&mut self, i: u32) -> Pending {
        self.free.push(i);
        self.slots[i as usize]
            .take()
            .expect("completion for a free slot")
    }

    fn submit_inner(&mut self, io: &mut IoCtx, mut req: IoRequest, pending: Pending) {
        req.tag = self.park(pending);
        req.owner = self.owner;
        self.inner.submit(io, req);
    }

    fn dispatch(&mut self, io: &mut IoCtx, req: IoRequest) {
        let Some(cache) = &self.control.cache else {
            return self.submit_inner(io, req, Pending::Forward(req));
        };
        let first_block = req.offset_bytes / self.block_size as u64;
        let blocks = u64::from(req.len_bytes) / self.block_size as u64;
        match req.op {
            IoOp::Write if !req.fua => {
                let buf = req.buf.expect("validated write has a buffer");
                // SAFETY: the submitter lent `len_bytes` bytes of `buf` to this request, which
                // completes only after this copy (posted below).
                let data = unsafe { buf.as_slice(req.len_bytes) };
                cache.lock().write(first_block, data, self.block_size);
                io.post(req.owner, req.tag, req.len_bytes as i32);
            }
            IoOp::Read => {
                let snapshot = cache.lock().snapshot(first_block, blocks);
                self.submit_inner(io, req, Pending::Read(req, snapshot));
            }
            IoOp::Flush => self.start_flush(io, req),
            IoOp::Write | IoOp::Trim | IoOp::WriteZeroes => {
                let mut cache = cache.lock();
                if cache.busy(first_block, blocks) {
                    drop(cache);
                    return self.blocked.push_back(req);
                }
                cache.invalidate(first_block, blocks);
                drop(cache);
                self.submit_inner(io, req, Pending::Forward(req));
            }
        }
    }

    /// Copies every dirty block to staging memory and writes each one back.
    fn start_flush(&mut self, io: &mut IoCtx, req: IoRequest) {
        let control = self.control.clone();
        let cache = control
            .cache
            .as_ref()
            .expect("flush staging needs the cache");
        let mut cache = cache.lock();
        // One flush writes back at a time, on any core: write-backs of one block by two
        // flushes could land out of order and leave the older data on the inner bdev.
        if !cache.writing_back.is_empty() {
            drop(cache);
            return self.blocked.push_back(req);
        }
        let dirty: Vec<(u64, u64, Box<[u8]>)> = cache
            .blocks
            .iter()
            .map(|(&b, (g, d))| (b, *g, d.clone()))
            .collect();
        // Counted under the same lock as the snapshot, so no direct write slips in between.
        for (b, _, _) in &dirty {
            *cache.writing_back.entry(*b).or_insert(0) += 1;
        }
        drop(cache);
        let staging = match Region::map((dirty.len() * self.block_size).max(1), false, false) {
            Ok(r) => r,
            Err(_) => {
                let mut cache = control.cache.as_ref().expect("checked above").lock();
                dirty.iter().for_each(|(b, _, _)| cache.write_back_done(*b));
                return io.post(req.owner, req.tag, -libc::ENOMEM);
            }
        };
        let flush = self.park(Pending::Flush {
            req,
            remaining: dirty.len() as u32,
            errno: 0,
            written: Vec::new(),
            staging: None,
        });
        for (i, (block, generation, data)) in dirty.into_iter().enumerate() {
            // SAFETY: the write-back keeps `staging` until its last write completes, and
            // nothing but this write touches block i of it.
            let buf = unsafe { staging.io_buf(i * self.block_size, self.block_size as u32) };
            // SAFETY: the write is not submitted yet, so this is the only view of block i.
            unsafe { buf.as_mut_slice(buf.len_bytes()) }.copy_from_slice(&data);
            let write = IoRequest {
                op: IoOp::Write,
                offset_bytes: block * self.block_size as u64,
                len_bytes: self.block_size as u32,
                buf: Some(buf),
                fua: false,
                owner: self.owner,
                tag: 0,
            };
            let pending = Pending::WriteBack {
                flush,
                block,
                generation,
            };
            self.submit_inner(io, write, pending);
        }
        match &mut self.slots[flush as usize] {
            Some(Pending::Flush { staging: s, .. }) => *s = Some(staging),
            _ => unreachable!("flush slot holds its flush"),
        }
        self.advance_flush(io, flush);
    }

    /// Once a flush's write-backs are done, issues the inner flush (remaining is then 0 and
    /// `staging` is released), or completes it when that flush is done too.
    fn advance_flush(&mut self, io: &mut IoCtx, flush: u32) {
        let Some(Pending::Flush {
            req,
            remaining,
            errno,
            staging,
            ..
        }) = &mut self.slots[flush as usize]
        else {
            unreachable!("flush slot holds its flush")
        };
        if *remaining > 0 {
            return;
        }
        if staging.take().is_some() && *errno == 0 {
            let mut inner_flush = *req;
            inner_flush.tag = flush;
            inner_flush.owner = self.owner;
            self.inner.submit(io, inner_flush);
            return;
        }
        let Pending::Flush {
            req,
            errno,
            written,
            ..
        } = self.unpark(flush)
        else {
            unreachable!()
        };
        if errno == 0 {
            let mut cache = self.control.cache.as_ref().expect("cache").lock();
            for (block, generation) in written {
                if cache
                    .blocks
                    .get(&block)
                    .is_some_and(|(g, _)| *g == generation)
                {
                    cache.blocks.remove(&block);
                }
            }
        }
        io.post(req.owner, req.tag, -errno);
    }

    fn complete(&mut self, io: &mut IoCtx, tag: u32, res: i32) {
        // The inner flush of a flush reuses the flush's own slot; everything else has its own.
        if let Some(Pending::Flush { .. }) = &self.slots[tag as usize] {
            if let Some(Pending::Flush { errno, .. }) = &mut self.slots[tag as usize] {
                if res < 0 {
                    *errno = -res;
                }
            }
            return self.advance_flush(io, tag);
        }
        match self.unpark(tag) {
            Pending::Forward(req) => io.post(req.owner, req.tag, res),
            Pending::Read(req, snapshot) => {
                if res >= 0 {
                    let buf = req.buf.expect("validated read has a buffer");
                    // SAFETY: the read's submitter lent this buffer until we post below.
                    let out = unsafe { buf.as_mut_slice(req.len_bytes) };
                    let first_block = req.offset_bytes / self.block_size as u64;
                    overlay(&snapshot, first_block, out, self.block_size);
                }
                io.post(req.owner, req.tag, res);
            }
            Pending::WriteBack {
                flush,
                block,
                generation,
            } => {
                let cache = self
                    .control
                    .cache
                    .as_ref()
                    .expect("write-backs need the cache");
                cache.lock().write_back_done(block);
                if let Some(Pending::Flush {
                    remaining,
                    errno,
                    written,
                    ..
                }) = &mut self.slots[flush as usize]
                {
                    *remaining -= 1;
                    if res < 0 {
                        *errno = -res;
                    } else {
                        written.push((block, generation));
                    }
                }
                self.advance_flush(io, flush);
            }
            Pending::Flush { .. } => unreachable!("handled above"),
        }
    }
}

impl BdevChannel for FaultChannel {
    fn submit(&mut self, io: &mut IoCtx, req: IoRequest) {
        let errno = self.control.errno_for(req.op);
        if errno != 0 {
            return io.post(req.owner, req.tag, -errno);
        }
        let latency_us = self.control.latency_us.load(Ordering::Relaxed);
        if latency_us > 0 {
            // The clock, not io.now(): the loop-start time can be older than the submission
            // by a whole (possibly preempted) loop iteration, which would cut the delay short.
            let at = Instant::now() + Duration::from_micros(latency_us);
            return self.delayed.push_back((at, req));
        }
        self.dispatch(io, req);
    }

    fn poll(&mut self, io: &mut IoCtx) -> usize {
        let mut work = self.inner.poll(io);
        while self.delayed.front().is_some_and(|(at, _)| *at <= io.now()) {
            let (_, req) = self.delayed.pop_front().expect("peeked");
            self.dispatch(io, req);
            work += 1;
        }
        while let Some(c) = io.pop(self.owner) {
            self.complete(io, c.tag, c.res);
            work += 1;
        }
        // Retry blocked requests; those still waiting for a write-back (on this core or
        // another) go back to the queue.
        for req in std::mem::take(&mut self.blocked) {
            self.dispatch(io, req);
        }
        work
    }

    fn next_deadline(&self) -> Option<Instant> {
        // A blocked request waits for another core's write-back: keep polling, do not sleep.
        let retry = (!self.blocked.is_empty()).then(Instant::now);
        let own = self.delayed.front().map(|(at, _)| *at);
        own.into_iter()
            .chain(retry)
            .chain(self.inner.next_deadline())
            .min()
    }

    fn in_flight(&self) -> usize {
        self.delayed.len() + self.blocked.len() + self.slots.len() - self.free.len()
            + self.inner.in_flight()
    }

    fn close(&mut self, io: &mut IoCtx) {
        self.inner.close(io);
        io.release_owner(self.owner);
    }
}
