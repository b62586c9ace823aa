//! Data integrity through `IoQueue`: every byte written through the engine reads back
//! byte-exact, on every backend, through both the synchronous helpers (`write_at`/`read_at`)
//! and the asynchronous path (`submit` + `poll`/`wait`) with up to 32 requests in flight.
//!
//! Each test runs an engine on two cores with one queue per core to the same bdev, each queue
//! on its own half of the device, so cross-core sharing of a bdev (one channel per core, one
//! shared device) is exercised. A byte model per queue is the oracle. Trim and write-zeroes
//! must read back as zeros on the uring file and malloc backends. The null bdev moves no data,
//! so for it the workload only has to complete without errors or panics.
//!
//! Guards against: lost or misrouted completions, buffers reused while in flight, wrong
//! offsets or lengths on the uring path (fixed and plain buffers), the fault bdev's write
//! cache losing or resurrecting blocks, and flush not making cached writes durable.
//!
//! Bug found here: with queues on two cores, the volatile-cache fault bdev returned stale data
//! when a flush on one core raced the other core's reads (the read's overlay was taken after
//! the flush had moved blocks out of the cache), its trims, zeroes and FUA writes (an older
//! write-back landed after them), or another flush (two write-backs of one block landed out of
//! order). Fixed in `bdev/fault.rs`.

mod common;

use cairn_engine::bdev::fault::{FaultBdev, FaultControl};
use cairn_engine::bdev::malloc::MallocBdev;
use cairn_engine::bdev::null::NullBdev;
use cairn_engine::bdev::uring::{UringBdev, UringOptions};
use cairn_engine::{Bdev, Engine, IoOp, IoQueue, QueueCompletion, Request};
use common::{assert_same, Rng, TempFile};
use std::collections::HashMap;
use std::sync::Arc;

/// Device size for every backend: two 8 MiB halves, one per queue.
const DEVICE_BYTES: u64 = 16 << 20;
const QUEUE_DEPTH: u32 = 32;
/// Synchronous operations per queue before the asynchronous phase.
const SYNC_OPS: u32 = 300;
/// Asynchronous requests per queue.
const ASYNC_OPS: u32 = 3000;

/// What one queue's workload may assume about its backend.
#[derive(Clone, Copy, Debug)]
struct Workload {
    /// Reads return what was written (false for the null bdev).
    checks_data: bool,
    seed: u64,
}

/// One queue's half of the device: where it starts and what it should hold.
struct Span {
    base_bytes: u64,
    model: Vec<u8>,
}

impl Span {
    fn new(base_bytes: u64, len_bytes: u64) -> Span {
        Span {
            base_bytes,
            model: vec![0; len_bytes as usize],
        }
    }

    fn slice(&self, offset_bytes: u64, len_bytes: u32) -> &[u8] {
        &self.model[offset_bytes as usize..(offset_bytes + u64::from(len_bytes)) as usize]
    }

    fn slice_mut(&mut self, offset_bytes: u64, len_bytes: u32) -> &mut [u8] {
        &mut self.model[offset_bytes as usize..(offset_bytes + u64::from(len_bytes)) as usize]
    }
}

/// A random block-aligned range inside the span, no larger than one queue buffer.
fn random_range(rng: &mut Rng, q: &IoQueue, span_len_bytes: u64) -> (u64, u32) {
    let block = u64::from(q.info().block_size_bytes);
    let max_blocks = u64::from(q.buf_size_bytes()) / block;
    let blocks = rng.range(1, max_blocks);
    let start_block = rng.range(0, span_len_bytes / block - blocks);
    (start_block * block, (blocks * block) as u32)
}

/// Synchronous phase: write_at / read_at / trim / write_zeroes / flush, checked as it goes.
fn sync_phase(q: &mut IoQueue, span: &mut Span, w: Workload, rng: &mut Rng) {
    let span_len = span.model.len() as u64;
    for step in 0..SYNC_OPS {
        let (offset, len) = random_range(rng, q, span_len);
        let at = span.base_bytes + offset;
        match rng.range(0, 9) {
            0..=3 => {
                let mut data = vec![0u8; len as usize];
                rng.fill(&mut data);
                let fua = rng.range(0, 3) == 0;
                q.write_at(at, &data, fua).expect("write_at");
                span.slice_mut(offset, len).copy_from_slice(&data);
            }
            4..=6 => {
                let mut got = vec![0u8; len as usize];
                q.read_at(at, &mut got).expect("read_at");
                if w.checks_data {
                    let what = format!("seed {} sync step {step} read_at", w.seed);
                    assert_same(&what, at, &got, span.slice(offset, len));
                }
            }
            7 => {
                q.trim(at, len).expect("trim");
                span.slice_mut(offset, len).fill(0);
            }
            8 => {
                q.write_zeroes(at, len).expect("write_zeroes");
                span.slice_mut(offset, len).fill(0);
            }
            _ => q.flush().expect("flush"),
        }
    }
}

/// A request the asynchronous phase has in flight, and the span range it covers.
struct InFlight {
    op: IoOp,
    offset_bytes: u64,
    len_bytes: u32,
}

impl InFlight {
    fn overlaps(&self, offset_bytes: u64, len_bytes: u32) -> bool {
        if self.op == IoOp::Flush {
            return false;
        }
        let end = offset_bytes + u64::from(len_bytes);
        offset_bytes < self.offset_bytes + u64::from(self.len_bytes) && self.offset_bytes < end
    }
}

/// The asynchronous phase's state: what is in flight, keyed by user_data.
struct AsyncRun {
    in_flight: HashMap<u64, InFlight>,
    next_user_data: u64,
    issued: u32,
    completed: u32,
}

/// Asynchronous phase: keeps up to the queue depth of random requests in flight, never two
/// overlapping ones, and checks every read against the model when it completes.
fn async_phase(q: &mut IoQueue, span: &mut Span, w: Workload, rng: &mut Rng) {
    let mut run = AsyncRun {
        in_flight: HashMap::new(),
        next_user_data: 1,
        issued: 0,
        completed: 0,
    };
    let mut done = Vec::new();
    while run.issued < ASYNC_OPS || !run.in_flight.is_empty() {
        while run.issued < ASYNC_OPS && q.in_flight() < q.depth() {
            if !submit_one(q, span, rng, &mut run) {
                break;
            }
        }
        // Alternate between blocking and non-blocking reaping so both paths are used.
        if run.issued.is_multiple_of(2) || q.poll(&mut done) == 0 {
            q.wait(1, &mut done);
        }
        for c in done.drain(..) {
            reap_one(q, span, w, &mut run, c);
        }
    }
    assert_eq!(run.completed, ASYNC_OPS);
    assert_eq!(q.in_flight(), 0);
}

/// Picks and submits one request. Returns false when no non-overlapping range or no buffer
/// was available right now (the caller reaps and tries again).
fn submit_one(q: &mut IoQueue, span: &mut Span, rng: &mut Rng, run: &mut AsyncRun) -> bool {
    let op = match rng.range(0, 19) {
        0..=8 => IoOp::Write,
        9..=16 => IoOp::Read,
        17 => IoOp::WriteZeroes,
        18 => IoOp::Trim,
        _ => IoOp::Flush,
    };
    let span_len = span.model.len() as u64;
    let mut range = None;
    for _ in 0..16 {
        let (offset, len) = random_range(rng, q, span_len);
        if !run.in_flight.values().any(|f| f.overlaps(offset, len)) {
            range = Some((offset, len));
            break;
        }
    }
    let Some((offset, len)) = range else {
        return false;
    };
    let buf = if matches!(op, IoOp::Read | IoOp::Write) {
        let Ok(buf) = q.alloc_buf() else {
            return false;
        };
        Some(buf)
    } else {
        None
    };
    if op == IoOp::Write {
        let b = buf.as_ref().expect("writes carry a buffer");
        rng.fill(&mut q.buf_mut(b)[..len as usize]);
        span.slice_mut(offset, len)
            .copy_from_slice(&q.buf(b)[..len as usize]);
    }
    if matches!(op, IoOp::Trim | IoOp::WriteZeroes) {
        span.slice_mut(offset, len).fill(0);
    }
    let (offset_bytes, len_bytes) = if op == IoOp::Flush {
        (0, 0)
    } else {
        (span.base_bytes + offset, len)
    };
    let user_data = run.next_user_data;
    run.next_user_data += 1;
    let req = Request {
        op,
        offset_bytes,
        len_bytes,
        buf,
        fua: op == IoOp::Write && rng.range(0, 7) == 0,
        user_data,
    };
    if let Err((e, _)) = q.submit(req) {
        panic!("submit {op} at {offset_bytes} len {len_bytes}: {e}");
    }
    let in_flight = InFlight {
        op,
        offset_bytes: offset,
        len_bytes: len,
    };
    run.in_flight.insert(user_data, in_flight);
    run.issued += 1;
    true
}

fn reap_one(q: &mut IoQueue, span: &Span, w: Workload, run: &mut AsyncRun, c: QueueCompletion) {
    let f = run
        .in_flight
        .remove(&c.user_data)
        .unwrap_or_else(|| panic!("completion for unknown user_data {}", c.user_data));
    if let Err(e) = &c.result {
        panic!(
            "seed {}: {} at span offset {} len {} failed: {e}",
            w.seed, f.op, f.offset_bytes, f.len_bytes
        );
    }
    assert_eq!(
        c.buf.is_some(),
        matches!(f.op, IoOp::Read | IoOp::Write),
        "data requests and only they return a buffer"
    );
    if let Some(buf) = c.buf {
        if f.op == IoOp::Read && w.checks_data {
            let what = format!("seed {} async read", w.seed);
            let at = span.base_bytes + f.offset_bytes;
            let got = &q.buf(&buf)[..f.len_bytes as usize];
            assert_same(&what, at, got, span.slice(f.offset_bytes, f.len_bytes));
        }
        q.free_buf(buf);
    }
    run.completed += 1;
}

/// Reads the whole span back in queue-buffer-sized pieces and compares it with the model.
fn verify_span(q: &mut IoQueue, span: &Span, what: &str) {
    let mut got = vec![0u8; span.model.len()];
    q.read_at(span.base_bytes, &mut got).expect("read back");
    assert_same(what, span.base_bytes, &got, &span.model);
}

/// One queue's full workload; returns its span so the caller can check durable contents.
fn run_queue(q: &mut IoQueue, base_bytes: u64, len_bytes: u64, w: Workload) -> Span {
    let mut rng = Rng::new(w.seed);
    let mut span = Span::new(base_bytes, len_bytes);
    sync_phase(q, &mut span, w, &mut rng);
    async_phase(q, &mut span, w, &mut rng);
    if w.checks_data {
        verify_span(q, &span, &format!("seed {} final read-back", w.seed));
    }
    span
}

/// Opens one queue per engine core to `bdev` and runs the workload on all of them at once,
/// each on its own slice of the device. Returns the queues (still open) and their spans.
fn run_on_all_cores(
    engine: &Engine,
    bdev: Arc<dyn Bdev>,
    checks_data: bool,
    seed: u64,
) -> Vec<(IoQueue, Span)> {
    let handle = engine.add_bdev(bdev).expect("add bdev");
    let cores = engine.cores();
    let slice_bytes = handle.info().size_bytes / cores.len() as u64;
    let queues: Vec<IoQueue> = cores
        .iter()
        .map(|&c| engine.queue(&handle, c, QUEUE_DEPTH).expect("queue"))
        .collect();
    std::thread::scope(|s| {
        let workers: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(i, mut q)| {
                let w = Workload {
                    checks_data,
                    seed: seed + i as u64,
                };
                s.spawn(move || {
                    let span = run_queue(&mut q, i as u64 * slice_bytes, slice_bytes, w);
                    (q, span)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|h| h.join().expect("worker panicked"))
            .collect()
    })
}

#[test]
fn uring_file_keeps_every_byte_and_the_file_holds_it() {
    let file = TempFile::new("integrity-uring-durable", DEVICE_BYTES);
    let bdev = UringBdev::open("u1", file.path(), UringOptions::default()).expect("open file");
    let engine = common::start(common::cores(2));
    let results = run_on_all_cores(&engine, Arc::new(bdev), true, 0x0051_0002);
    let spans: Vec<Span> = results.into_iter().map(|(_, span)| span).collect();
    engine.stop();
    // The file itself, read outside the engine, must hold what the engine wrote.
    let on_disk = std::fs::read(file.path()).expect("read file back");
    for span in &spans {
        let start = span.base_bytes as usize;
        let got = &on_disk[start..start + span.model.len()];
        assert_same(
            "file contents after stop",
            span.base_bytes,
            got,
            &span.model,
        );
    }
}

#[test]
fn malloc_keeps_every_byte() {
    let bdev = MallocBdev::new("m0", DEVICE_BYTES, 512).expect("malloc bdev");
    let engine = common::start(common::cores(2));
    drop(run_on_all_cores(&engine, Arc::new(bdev), true, 0x0052_0001));
    engine.stop();
}

#[test]
fn null_survives_the_workload() {
    let bdev = NullBdev::new("n0", DEVICE_BYTES, 4096).expect("null bdev");
    let engine = common::start(common::cores(2));
    drop(run_on_all_cores(
        &engine,
        Arc::new(bdev),
        false,
        0x0053_0001,
    ));
    engine.stop();
}

#[test]
fn fault_passthrough_keeps_every_byte() {
    let inner = MallocBdev::new("m1", DEVICE_BYTES, 4096).expect("malloc bdev");
    let bdev = FaultBdev::new("f0", Arc::new(inner));
    let engine = common::start(common::cores(2));
    drop(run_on_all_cores(&engine, Arc::new(bdev), true, 0x0054_0001));
    engine.stop();
}

#[test]
fn fault_volatile_cache_keeps_every_byte_and_flush_makes_it_durable() {
    let inner = MallocBdev::new("m2", DEVICE_BYTES, 4096).expect("malloc bdev");
    let bdev = FaultBdev::with_volatile_cache("f1", Arc::new(inner));
    let control: Arc<FaultControl> = bdev.control();
    let engine = common::start(common::cores(2));
    let mut results = run_on_all_cores(&engine, Arc::new(bdev), true, 0x0055_0001);
    // After a flush nothing is volatile, so a crash must lose nothing.
    results[0].0.flush().expect("flush");
    assert_eq!(control.unflushed_blocks(), 0);
    assert_eq!(
        control.crash(),
        0,
        "a crash right after flush loses nothing"
    );
    for (q, span) in &mut results {
        verify_span(q, span, "read-back after flush and crash");
    }
    drop(results);
    engine.stop();
}

/// Writes a pattern, trims one part and zeroes another, and checks the three parts.
fn trim_and_zeroes_read_back_zero(q: &mut IoQueue) {
    let block = q.info().block_size_bytes as usize;
    let len = 64 * block;
    let mut data = vec![0u8; len];
    Rng::new(7).fill(&mut data);
    data.iter_mut().filter(|b| **b == 0).for_each(|b| *b = 0xA5);
    let base = 8 * block as u64;
    q.write_at(base, &data, false).expect("write pattern");
    let trim_at = 4 * block;
    let zero_at = 32 * block;
    let part = (16 * block) as u32;
    q.trim(base + trim_at as u64, part).expect("trim");
    q.write_zeroes(base + zero_at as u64, part)
        .expect("write_zeroes");
    let mut want = data.clone();
    want[trim_at..trim_at + part as usize].fill(0);
    want[zero_at..zero_at + part as usize].fill(0);
    let mut got = vec![0xFFu8; len];
    q.read_at(base, &mut got).expect("read back");
    assert_same("trim/write_zeroes read-back", base, &got, &want);
}

#[test]
fn uring_file_trim_and_write_zeroes_read_back_zero() {
    let file = TempFile::new("integrity-uring-trim", DEVICE_BYTES);
    let bdev = UringBdev::open("u2", file.path(), UringOptions::default()).expect("open file");
    let engine = common::start(common::cores(2));
    let handle = engine.add_bdev(Arc::new(bdev)).expect("add bdev");
    for core in engine.cores() {
        let mut q = engine.queue(&handle, core, QUEUE_DEPTH).expect("queue");
        trim_and_zeroes_read_back_zero(&mut q);
    }
    engine.stop();
}

#[test]
fn malloc_trim_and_write_zeroes_read_back_zero() {
    let bdev = MallocBdev::new("m3", DEVICE_BYTES, 512).expect("malloc bdev");
    let engine = common::start(common::cores(2));
    let handle = engine.add_bdev(Arc::new(bdev)).expect("add bdev");
    for core in engine.cores() {
        let mut q = engine.queue(&handle, core, QUEUE_DEPTH).expect("queue");
        trim_and_zeroes_read_back_zero(&mut q);
    }
    engine.stop();
}
