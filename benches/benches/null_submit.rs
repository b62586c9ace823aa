//! Submit-to-completion through the public `IoQueue` on the null bdev, with one reactor: the
//! engine's own per-request cost with no device behind it. `qd1_wait` is the round trip of a
//! client that blocks (it includes the reactor waking the client thread), `qd1_poll` that of a
//! client that spins on `poll`, and `qd32_*` the throughput with 32 requests kept in flight.
//!
//! When two CPUs are allowed, the client is pinned to the one the reactor does not use, so the
//! numbers do not depend on where the scheduler happens to put it.

use cairn_engine::bdev::null::NullBdev;
use cairn_engine::sys::{affinity, allowed_cpus, pin_current_thread, set_affinity};
use cairn_engine::{CoreList, Engine, EngineConfig, IoOp, IoQueue, QueueCompletion, Request};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DEPTH: u32 = 32;
const IO_BYTES: u32 = 4096;

fn start(reactor_cpu: u32) -> (Engine, IoQueue) {
    let cores = CoreList::parse(&reactor_cpu.to_string()).expect("core list");
    let mut config = EngineConfig::new(cores);
    config.buf_count = 2 * DEPTH;
    let engine = Engine::start(config).expect("engine starts");
    let bdev = NullBdev::new("bench-null", 1 << 30, IO_BYTES).expect("null bdev");
    let handle = engine.add_bdev(Arc::new(bdev)).expect("add bdev");
    let q = engine
        .queue(&handle, engine.cores()[0], DEPTH)
        .expect("queue");
    (engine, q)
}

/// Submits one 4 KiB read carrying one of the queue's buffers.
#[inline]
fn submit_read(q: &mut IoQueue, user_data: u64) {
    let buf = q.alloc_buf().expect("a buffer per slot");
    let r = Request {
        op: IoOp::Read,
        offset_bytes: (user_data % 1024) * u64::from(IO_BYTES),
        len_bytes: IO_BYTES,
        buf: Some(buf),
        fua: false,
        user_data,
    };
    q.submit(r).expect("submit");
}

/// Checks and recycles completions; returns how many there were.
#[inline]
fn recycle(q: &mut IoQueue, done: &mut Vec<QueueCompletion>) -> u64 {
    let n = done.len() as u64;
    for c in done.drain(..) {
        assert!(c.result.is_ok(), "null read failed: {:?}", c.result);
        q.free_buf(c.buf.expect("reads return their buffer"));
    }
    n
}

/// Keeps `DEPTH` requests in flight until `iters` have completed.
fn qd32(q: &mut IoQueue, done: &mut Vec<QueueCompletion>, iters: u64, block: bool) -> Duration {
    let t0 = Instant::now();
    let (mut submitted, mut completed) = (0u64, 0u64);
    while completed < iters {
        while submitted < iters && q.in_flight() < DEPTH {
            submit_read(q, submitted);
            submitted += 1;
        }
        if block {
            q.wait(1, done);
        } else if q.poll(done) == 0 {
            std::hint::spin_loop();
        }
        completed += recycle(q, done);
    }
    t0.elapsed()
}

fn null_submit(c: &mut Criterion) {
    let cpus = allowed_cpus();
    let reactor_cpu = *cpus.first().expect("at least one cpu");
    let (engine, mut q) = start(reactor_cpu);
    let saved = affinity().expect("read affinity");
    if let Some(&client_cpu) = cpus.get(1) {
        pin_current_thread(client_cpu).expect("pin client");
    }
    let mut done = Vec::with_capacity(DEPTH as usize);
    let mut g = c.benchmark_group("null_submit");
    g.throughput(Throughput::Elements(1));
    g.bench_function("qd1_wait", |b| {
        b.iter(|| {
            submit_read(&mut q, 0);
            q.wait(1, &mut done);
            recycle(&mut q, &mut done)
        })
    });
    g.bench_function("qd1_poll", |b| {
        b.iter(|| {
            submit_read(&mut q, 0);
            while q.poll(&mut done) == 0 {
                std::hint::spin_loop();
            }
            recycle(&mut q, &mut done)
        })
    });
    g.bench_function("qd32_poll", |b| {
        b.iter_custom(|iters| qd32(&mut q, &mut done, iters, false))
    });
    g.bench_function("qd32_wait", |b| {
        b.iter_custom(|iters| qd32(&mut q, &mut done, iters, true))
    });
    g.finish();
    drop(q);
    engine.stop();
    set_affinity(&saved).expect("restore affinity");
}

criterion_group! {
    name = benches;
    config = cairn_benches::config();
    targets = null_submit
}
criterion_main!(benches);
