//! Engine shutdown drains and never hangs: `Engine::stop` (or dropping the engine) from another
//! thread while a queue has requests in flight on a slow (fault-latency) bdev returns with the
//! reactor threads joined, and every in-flight request has completed successfully, its
//! completion waiting on the queue. Stopping an idle engine, whose reactors are asleep in the
//! kernel, returns promptly. A queue dropped with I/O in flight retires once that I/O is done
//! (its buffers go back to the pool) and does not hold up a later stop. A queue used after its
//! engine stopped gets `IoError::EngineStopped` instead of waiting forever, and so does a
//! request that races the stop.
//!
//! Bug found here: a request submitted after (or while) the engine stopped was accepted and
//! never completed, so `wait` and every sync helper on that queue hung forever.
//!
//! Every call that could hang runs under a watchdog. Its limit sits below the reactor's 30 s
//! drain limit (`SHUTDOWN_DRAIN_MAX`), so a reactor that exits only by giving up on its drain
//! is reported, yet far above how long a real shutdown takes, so a slow machine passes.

mod common;

use cairn_engine::bdev::fault::FaultBdev;
use cairn_engine::bdev::malloc::MallocBdev;
use cairn_engine::{Bdev, Engine, EngineError, IoError, IoOp, IoQueue, QueueCompletion, Request};
use common::{within, Rng};
use std::sync::Arc;
use std::time::Duration;

const DEVICE_BYTES: u64 = 8 << 20;
const BLOCK: u32 = 4096;
const DEPTH: u32 = 32;
const LATENCY: Duration = Duration::from_millis(20);
/// Watchdog for stop/drop: well below the 30 s drain limit, far above a real shutdown.
const STOP_LIMIT: Duration = Duration::from_secs(15);

/// A one-core engine serving a latency-injecting fault bdev over `inner`.
fn slow_engine(inner: Arc<MallocBdev>) -> (Engine, IoQueue) {
    let engine = common::start(common::cores(1));
    let q = slow_queue(&engine, inner);
    (engine, q)
}

/// Adds a fault bdev with `LATENCY` over `inner` and opens a queue to it. A queue dropped just
/// before gives its buffers back on its core, after the drop returns: the pool may be short
/// for a moment, so an exhausted pool is waited out, for up to `STOP_LIMIT`.
fn slow_queue(engine: &Engine, inner: Arc<MallocBdev>) -> IoQueue {
    let bdev = FaultBdev::new("sd-f", inner);
    bdev.control().set_latency(LATENCY);
    let handle = engine.add_bdev(Arc::new(bdev)).expect("add bdev");
    let deadline = std::time::Instant::now() + STOP_LIMIT;
    loop {
        match engine.queue(&handle, engine.cores()[0], DEPTH) {
            Ok(q) => return q,
            Err(EngineError::PoolExhausted { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("binding a queue: {e}"),
        }
    }
}

fn expected(i: u64) -> Vec<u8> {
    let mut v = vec![0u8; (2 * BLOCK) as usize];
    Rng::new(1000 + i).fill(&mut v);
    v
}

/// Fills the queue: `DEPTH` writes of distinct data, each to its own range.
fn submit_writes(q: &mut IoQueue) {
    for i in 0..u64::from(DEPTH) {
        let buf = q.alloc_buf().expect("one buffer per slot");
        let data = expected(i);
        q.buf_mut(&buf)[..data.len()].copy_from_slice(&data);
        let r = Request {
            op: IoOp::Write,
            offset_bytes: i * data.len() as u64,
            len_bytes: data.len() as u32,
            buf: Some(buf),
            fua: false,
            user_data: i,
        };
        q.submit(r).expect("submit");
    }
}

/// Every request of `submit_writes` completed, successfully, exactly once.
fn check_all_completed(done: &[QueueCompletion]) {
    assert_eq!(
        done.len(),
        DEPTH as usize,
        "every in-flight request completed"
    );
    let mut seen = vec![false; DEPTH as usize];
    for c in done {
        assert_eq!(c.result, Ok(()), "request {} failed", c.user_data);
        assert!(c.buf.is_some(), "the write's buffer came back");
        assert!(!seen[c.user_data as usize], "completed twice");
        seen[c.user_data as usize] = true;
    }
}

/// The writes really reached the device: a fresh engine over the same RAM disk reads them.
fn check_written(inner: Arc<MallocBdev>) {
    let engine = common::start(common::cores(1));
    let handle = engine.add_bdev(inner as Arc<dyn Bdev>).expect("re-add");
    let mut q = engine.queue(&handle, engine.cores()[0], 4).expect("queue");
    for i in 0..u64::from(DEPTH) {
        let want = expected(i);
        let mut got = vec![0u8; want.len()];
        q.read_at(i * want.len() as u64, &mut got).expect("read");
        assert_eq!(got, want, "write {i} is on the device");
    }
    drop(q);
    engine.stop();
}

fn malloc() -> Arc<MallocBdev> {
    Arc::new(MallocBdev::new("sd-m", DEVICE_BYTES, BLOCK).expect("malloc"))
}

#[test]
fn stop_from_another_thread_drains_in_flight_requests() {
    let inner = malloc();
    let (engine, mut q) = slow_engine(inner.clone());
    submit_writes(&mut q);
    within(STOP_LIMIT, "Engine::stop with I/O in flight", move || {
        std::thread::spawn(move || engine.stop())
            .join()
            .expect("stop thread");
    });
    // The reactor pushed every completion before it exited; no wait is needed.
    let mut done = Vec::new();
    q.poll(&mut done);
    check_all_completed(&done);
    drop(q);
    check_written(inner);
}

#[test]
fn dropping_the_engine_drains_in_flight_requests() {
    let inner = malloc();
    let (engine, mut q) = slow_engine(inner.clone());
    submit_writes(&mut q);
    within(
        STOP_LIMIT,
        "dropping the engine with I/O in flight",
        move || {
            std::thread::spawn(move || drop(engine))
                .join()
                .expect("drop thread");
        },
    );
    let mut done = Vec::new();
    q.poll(&mut done);
    check_all_completed(&done);
    drop(q);
    check_written(inner);
}

#[test]
fn stopping_an_idle_engine_returns_promptly() {
    let engine = common::start(common::cores(2));
    // Let the reactors fall asleep in the kernel: stop must wake them through the doorbell.
    std::thread::sleep(Duration::from_millis(100));
    within(STOP_LIMIT, "Engine::stop of an idle engine", move || {
        engine.stop()
    });
    let engine = common::start(common::cores(2));
    within(STOP_LIMIT, "dropping an idle engine", move || drop(engine));
}

#[test]
fn a_dropped_queue_retires_after_its_io_and_does_not_hold_up_stop() {
    let inner = malloc();
    let (engine, mut q) = slow_engine(inner);
    submit_writes(&mut q);
    drop(q);
    let engine = within(
        STOP_LIMIT,
        "getting the dropped queue's buffers back",
        move || {
            wait_for_whole_pool(&engine);
            engine
        },
    );
    let mut q = slow_queue(&engine, malloc());
    submit_writes(&mut q);
    drop(q);
    within(
        STOP_LIMIT,
        "Engine::stop after dropping a busy queue",
        move || engine.stop(),
    );
}

/// Opens (and closes) a queue over every buffer of the core's pool, which only succeeds once
/// the dropped queue's in-flight requests finished and its buffers went back.
fn wait_for_whole_pool(engine: &Engine) {
    let bdev = MallocBdev::new("sd-pool", 1 << 20, BLOCK).expect("malloc");
    let handle = engine.add_bdev(Arc::new(bdev)).expect("add bdev");
    let core = engine.cores()[0];
    loop {
        match engine.queue(&handle, core, common::TEST_BUF_COUNT) {
            Ok(q) => return drop(q),
            Err(EngineError::PoolExhausted { .. }) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("binding a queue: {e}"),
        }
    }
}

#[test]
fn a_queue_used_after_stop_gets_engine_stopped() {
    let engine = common::start(common::cores(1));
    let bdev = MallocBdev::new("sd-late", 1 << 20, BLOCK).expect("malloc");
    let handle = engine.add_bdev(Arc::new(bdev)).expect("add bdev");
    let mut q = engine.queue(&handle, engine.cores()[0], 4).expect("queue");
    q.write_at(0, &[7u8; 4096], false)
        .expect("write before stop");
    engine.stop();
    let q = within(STOP_LIMIT, "I/O on a queue after stop", move || {
        let mut buf = [0u8; 4096];
        assert_eq!(q.read_at(0, &mut buf), Err(IoError::EngineStopped));
        assert_eq!(q.flush(), Err(IoError::EngineStopped));
        let r = Request {
            op: IoOp::Flush,
            offset_bytes: 0,
            len_bytes: 0,
            buf: None,
            fua: false,
            user_data: 1,
        };
        assert!(matches!(q.submit(r), Err((IoError::EngineStopped, None))));
        assert_eq!(q.in_flight(), 0);
        q
    });
    within(STOP_LIMIT, "dropping a queue after stop", move || drop(q));
}

/// Submits flushes as fast as the queue takes them while another thread stops the engine.
/// Returns how many requests completed successfully and how many with `EngineStopped`.
fn race_submits_against_stop() -> (u32, u32) {
    let engine = common::start(common::cores(1));
    let bdev = cairn_engine::bdev::null::NullBdev::new("sd-race", 1 << 20, BLOCK).expect("null");
    let handle = engine.add_bdev(Arc::new(bdev)).expect("add bdev");
    let mut q = engine.queue(&handle, engine.cores()[0], 8).expect("queue");
    let stopper = std::thread::spawn(move || engine.stop());
    let mut done = Vec::new();
    loop {
        let r = Request {
            op: IoOp::Flush,
            offset_bytes: 0,
            len_bytes: 0,
            buf: None,
            fua: false,
            user_data: 0,
        };
        match q.submit(r) {
            Ok(()) => {}
            Err((IoError::QueueFull { .. }, _)) => drop(q.wait(1, &mut done)),
            Err((IoError::EngineStopped, _)) => break,
            Err((e, _)) => panic!("unexpected refusal: {e}"),
        }
    }
    while q.in_flight() > 0 {
        q.wait(q.in_flight() as usize, &mut done);
    }
    stopper.join().expect("stop thread");
    let ok = done.iter().filter(|c| c.result.is_ok()).count() as u32;
    let stopped = done
        .iter()
        .filter(|c| c.result == Err(IoError::EngineStopped))
        .count() as u32;
    assert_eq!(
        (ok + stopped) as usize,
        done.len(),
        "only success or EngineStopped"
    );
    (ok, stopped)
}

#[test]
fn requests_racing_a_stop_complete_or_fail_but_never_hang() {
    within(STOP_LIMIT, "submitting while the engine stops", || {
        for _ in 0..50 {
            race_submits_against_stop();
        }
    });
}
