//! The fault bdev's three faults, seen from a client of the engine:
//!
//! * injected read, write and flush errors reach the caller as `IoError::Device` with exactly
//!   the injected errno (through the sync helpers and through `submit` + `wait`, with the
//!   buffer handed back), and healing restores service with the data intact;
//! * injected latency delays completion by at least the latency, and does not stall other
//!   bdevs served by the same core (the delay sits on a timer, not in the reactor loop);
//! * with a volatile write cache, a crash keeps exactly what was flushed or written FUA and
//!   loses the rest, `unflushed_blocks` counts the volatile blocks, a failed flush leaves them
//!   volatile, and flush keeps working after a crash.
//!
//! * a delayed request under a volume (whose channel holds its own channel of the base) still
//!   wakes an idle reactor at its deadline. Bug found here: the volume channel did not pass its
//!   base's deadline on, so a reactor that went to sleep never dispatched the request.
//!
//! Latency checks assert only lower bounds, or orderings with a margin of seconds, so a slow
//! machine cannot fail them. Bug found here: the delay was counted from the reactor's
//! loop-start time, which can precede the submission by a whole (preempted) loop iteration, so
//! a request could complete before the injected latency had passed.

mod common;

use cairn_engine::bdev::fault::{FaultBdev, FaultControl};
use cairn_engine::bdev::malloc::MallocBdev;
use cairn_engine::volume::Pool;
use cairn_engine::{BdevHandle, Engine, IoError, IoOp, IoQueue, Request};
use common::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};

const DEVICE_BYTES: u64 = 4 << 20;
const BLOCK: usize = 4096;

struct Rig {
    engine: Engine,
    handle: BdevHandle,
    control: Arc<FaultControl>,
}

/// A one-core engine with a fault bdev over a fresh malloc bdev.
fn rig(volatile_cache: bool) -> Rig {
    let inner = Arc::new(MallocBdev::new("fi-m", DEVICE_BYTES, BLOCK as u32).expect("malloc"));
    let bdev = if volatile_cache {
        FaultBdev::with_volatile_cache("fi-f", inner)
    } else {
        FaultBdev::new("fi-f", inner)
    };
    let control = bdev.control();
    let engine = common::start(common::cores(1));
    let handle = engine.add_bdev(Arc::new(bdev)).expect("add bdev");
    Rig {
        engine,
        handle,
        control,
    }
}

impl Rig {
    fn queue(&self) -> IoQueue {
        let core = self.engine.cores()[0];
        self.engine.queue(&self.handle, core, 8).expect("queue")
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

fn read(q: &mut IoQueue, offset_bytes: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    q.read_at(offset_bytes, &mut v).expect("read");
    v
}

fn device(errno: i32) -> Result<(), IoError> {
    Err(IoError::Device { errno })
}

#[test]
fn injected_errors_reach_the_caller_with_their_errno_and_heal_restores_service() {
    let rig = rig(false);
    let mut q = rig.queue();
    let data = pattern(1, 4 * BLOCK);
    q.write_at(0, &data, false).expect("write before faults");

    rig.control.fail_reads(libc::EIO);
    let mut dst = vec![0u8; BLOCK];
    assert_eq!(q.read_at(0, &mut dst), device(libc::EIO));
    q.write_at(8 * BLOCK as u64, &data, false)
        .expect("writes unaffected by read faults");
    rig.control.fail_reads(0);
    assert_eq!(read(&mut q, 0, data.len()), data);

    rig.control.fail_writes(libc::ENOSPC);
    assert_eq!(q.write_at(0, &data, true), device(libc::ENOSPC));
    assert_eq!(q.trim(0, BLOCK as u32), device(libc::ENOSPC));
    assert_eq!(q.write_zeroes(0, BLOCK as u32), device(libc::ENOSPC));
    assert_eq!(
        read(&mut q, 0, data.len()),
        data,
        "failed writes changed nothing"
    );
    q.flush().expect("flushes unaffected by write faults");

    rig.control.fail_flushes(libc::EROFS);
    assert_eq!(q.flush(), device(libc::EROFS));
    rig.control.fail_reads(libc::EBADMSG);
    assert_eq!(q.read_at(0, &mut dst), device(libc::EBADMSG));

    rig.control.heal();
    q.flush().expect("flush after heal");
    let fresh = pattern(2, 4 * BLOCK);
    q.write_at(0, &fresh, true).expect("write after heal");
    assert_eq!(read(&mut q, 0, fresh.len()), fresh);
    drop(q);
    rig.engine.stop();
}

#[test]
fn injected_errors_arrive_on_async_completions_with_the_buffer() {
    let rig = rig(false);
    let mut q = rig.queue();
    rig.control.fail_reads(libc::EIO);
    rig.control.fail_writes(libc::EDQUOT);
    let ops = [IoOp::Read, IoOp::Write, IoOp::Read, IoOp::WriteZeroes];
    for (i, op) in ops.into_iter().enumerate() {
        let buf = matches!(op, IoOp::Read | IoOp::Write).then(|| q.alloc_buf().expect("buf"));
        let r = Request {
            op,
            offset_bytes: (i * BLOCK) as u64,
            len_bytes: BLOCK as u32,
            buf,
            fua: false,
            user_data: i as u64,
        };
        q.submit(r).expect("valid request is accepted");
    }
    let mut done = Vec::new();
    while done.len() < ops.len() {
        q.wait(ops.len(), &mut done);
    }
    for c in done {
        let op = ops[c.user_data as usize];
        let errno = if op == IoOp::Read {
            libc::EIO
        } else {
            libc::EDQUOT
        };
        assert_eq!(c.result, device(errno), "{op}");
        assert_eq!(c.buf.is_some(), op != IoOp::WriteZeroes);
        if let Some(b) = c.buf {
            q.free_buf(b);
        }
    }
    rig.control.heal();
    let data = pattern(3, BLOCK);
    q.write_at(0, &data, false).expect("write after heal");
    assert_eq!(read(&mut q, 0, BLOCK), data);
    drop(q);
    rig.engine.stop();
}

#[test]
fn latency_delays_completion_by_at_least_the_latency() {
    let rig = rig(false);
    let mut q = rig.queue();
    let latency = Duration::from_millis(50);
    rig.control.set_latency(latency);
    let data = pattern(4, 2 * BLOCK);
    let t0 = Instant::now();
    q.write_at(0, &data, false).expect("slow write");
    assert!(
        t0.elapsed() >= latency,
        "write finished early: {:?}",
        t0.elapsed()
    );
    let t1 = Instant::now();
    assert_eq!(read(&mut q, 0, data.len()), data);
    assert!(
        t1.elapsed() >= latency,
        "read finished early: {:?}",
        t1.elapsed()
    );
    let t2 = Instant::now();
    q.flush().expect("slow flush");
    assert!(
        t2.elapsed() >= latency,
        "flush finished early: {:?}",
        t2.elapsed()
    );
    rig.control.heal();
    assert_eq!(read(&mut q, 0, data.len()), data);
    drop(q);
    rig.engine.stop();
}

#[test]
fn latency_on_one_bdev_does_not_stall_another_on_the_same_core() {
    let rig = rig(false);
    let core = rig.engine.cores()[0];
    let fast = MallocBdev::new("fi-fast", DEVICE_BYTES, BLOCK as u32).expect("malloc");
    let fast = rig.engine.add_bdev(Arc::new(fast)).expect("add fast bdev");
    let mut slow_q = rig.queue();
    let mut fast_q = rig.engine.queue(&fast, core, 8).expect("fast queue");
    // Seconds, not milliseconds: the fast bdev's work below must finish well inside it even
    // on a loaded machine, and a reactor that blocked on the delay would take all of it.
    let latency = Duration::from_secs(2);
    rig.control.set_latency(latency);
    let t0 = Instant::now();
    let r = Request {
        op: IoOp::Flush,
        offset_bytes: 0,
        len_bytes: 0,
        buf: None,
        fua: false,
        user_data: 1,
    };
    slow_q.submit(r).expect("slow flush accepted");
    let data = pattern(5, 4 * BLOCK);
    for i in 0..20u64 {
        fast_q
            .write_at(i * data.len() as u64, &data, false)
            .expect("fast write");
        assert_eq!(read(&mut fast_q, i * data.len() as u64, data.len()), data);
    }
    let fast_done = t0.elapsed();
    assert!(
        fast_done < latency,
        "40 malloc requests took {fast_done:?}: the reactor waited out the other bdev's latency"
    );
    let mut done = Vec::new();
    while done.is_empty() {
        slow_q.wait(1, &mut done);
    }
    assert!(t0.elapsed() >= latency);
    assert_eq!(done[0].result, Ok(()));
    drop((slow_q, fast_q));
    rig.engine.stop();
}

/// How long the volume test waits for a write delayed by [`VOLUME_LATENCY`]; only a reactor
/// that never wakes for it takes this long.
const VOLUME_WRITE_WAIT_MAX: Duration = Duration::from_secs(30);
const VOLUME_LATENCY: Duration = Duration::from_millis(200);

#[test]
fn latency_under_a_volume_wakes_a_sleeping_reactor() {
    let inner = Arc::new(MallocBdev::new("fv-m", 16 << 20, BLOCK as u32).expect("malloc"));
    let fault = FaultBdev::new("fv-f", inner);
    let control = fault.control();
    let engine = common::start(common::cores(1));
    let core = engine.cores()[0];
    let pool = Pool::create(&engine, "fv", Arc::new(fault), core, 1 << 20).expect("pool");
    pool.create_volume(&engine, "v", 4 << 20, vec![])
        .expect("volume");
    let volume = pool.open_volume(&engine, "v").expect("volume opens");
    let mut q = engine.queue(&volume, core, 8).expect("queue");
    let data = pattern(9, BLOCK);
    // The first write allocates the cluster (through the home core); the second goes straight
    // to the volume channel's own channel of the base, where the latency holds it.
    q.write_at(0, &data, false).expect("first write");
    control.set_latency(VOLUME_LATENCY);
    let (tx, rx) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        let t0 = Instant::now();
        let r = q.write_at(0, &data, false);
        drop(tx.send((r, t0.elapsed())));
        q
    });
    let (r, took) = rx.recv_timeout(VOLUME_WRITE_WAIT_MAX).unwrap_or_else(|_| {
        panic!(
            "a write delayed {VOLUME_LATENCY:?} under a volume did not complete in \
             {VOLUME_WRITE_WAIT_MAX:?}: the sleeping reactor missed its deadline"
        )
    });
    r.expect("delayed write");
    assert!(took >= VOLUME_LATENCY, "completed after {took:?}");
    control.heal();
    drop(writer.join().expect("writer thread"));
    pool.close_volume(&engine, &volume).expect("volume closes");
    pool.close(&engine).expect("pool closes");
    engine.stop();
}

/// Block-sized regions of the crash test, far enough apart not to touch.
const A: u64 = 0;
const B: u64 = 64 * BLOCK as u64;
const C: u64 = 128 * BLOCK as u64;
const REGION: usize = 4 * BLOCK;

#[test]
fn crash_keeps_flushed_and_fua_writes_and_loses_the_rest() {
    let rig = rig(true);
    let mut q = rig.queue();
    let old_b = pattern(10, REGION);
    q.write_at(B, &old_b, false).expect("old B");
    q.flush().expect("flush old B");
    assert_eq!(rig.control.unflushed_blocks(), 0);

    let a = pattern(11, REGION);
    q.write_at(A, &a, false).expect("A");
    assert_eq!(rig.control.unflushed_blocks(), REGION / BLOCK);
    q.flush().expect("flush A");
    assert_eq!(rig.control.unflushed_blocks(), 0);

    let new_b = pattern(12, REGION);
    q.write_at(B, &new_b, false).expect("B, not flushed");
    // A volatile write to C's region that the FUA write below must supersede.
    q.write_at(C, &pattern(13, REGION), false)
        .expect("C's region, volatile");
    assert_eq!(rig.control.unflushed_blocks(), 2 * REGION / BLOCK);
    let c = pattern(14, REGION);
    q.write_at(C, &c, true).expect("C with FUA");
    assert_eq!(
        rig.control.unflushed_blocks(),
        REGION / BLOCK,
        "a FUA write leaves nothing volatile in its range"
    );
    assert_eq!(read(&mut q, B, REGION), new_b, "reads see cached writes");

    assert_eq!(rig.control.crash(), REGION / BLOCK, "only B was volatile");
    assert_eq!(rig.control.unflushed_blocks(), 0);
    assert_eq!(read(&mut q, A, REGION), a, "flushed A survives");
    assert_eq!(
        read(&mut q, B, REGION),
        old_b,
        "B shows its last durable contents"
    );
    assert_eq!(read(&mut q, C, REGION), c, "FUA C survives");

    q.flush().expect("flush after crash");
    let d = pattern(15, REGION);
    q.write_at(B, &d, false).expect("D");
    q.flush().expect("flush D");
    assert_eq!(rig.control.crash(), 0);
    assert_eq!(
        read(&mut q, B, REGION),
        d,
        "flushed D survives a second crash"
    );
    drop(q);
    rig.engine.stop();
}

#[test]
fn a_failed_flush_leaves_writes_volatile() {
    let rig = rig(true);
    let mut q = rig.queue();
    let a = pattern(20, REGION);
    q.write_at(A, &a, false).expect("A");
    rig.control.fail_flushes(libc::EIO);
    assert_eq!(q.flush(), device(libc::EIO));
    assert_eq!(rig.control.unflushed_blocks(), REGION / BLOCK);
    rig.control.heal();
    q.flush().expect("flush after heal");
    assert_eq!(rig.control.unflushed_blocks(), 0);
    assert_eq!(rig.control.crash(), 0);
    assert_eq!(read(&mut q, A, REGION), a);
    drop(q);
    rig.engine.stop();
}

#[test]
fn trim_and_write_zeroes_bypass_the_cache_and_survive_a_crash() {
    let rig = rig(true);
    let mut q = rig.queue();
    let a = pattern(30, REGION);
    q.write_at(A, &a, false).expect("A");
    q.flush().expect("flush A");
    q.write_at(A, &pattern(31, REGION), false)
        .expect("volatile overwrite");
    q.trim(A, BLOCK as u32).expect("trim first block");
    q.write_zeroes(A + BLOCK as u64, BLOCK as u32)
        .expect("zero second block");
    assert_eq!(rig.control.unflushed_blocks(), 2);
    assert_eq!(rig.control.crash(), 2);
    let mut want = a.clone();
    want[..2 * BLOCK].fill(0);
    assert_eq!(read(&mut q, A, REGION), want);
    drop(q);
    rig.engine.stop();
}
