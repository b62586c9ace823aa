//! Guards docs/engine.md's promise that the data path allocates nothing: with a counting global
//! allocator, reads and writes in steady state make 0 heap allocations on the engine's reactor
//! threads, (a) through a volume's client queue (on another core than the pool's home, so
//! cross-core messages are covered) and (b) through an NBD connection served in-process to a
//! client in the test. The work that may allocate, a first write to a cluster and a flush that
//! commits metadata, stays within the bounds docs/engine.md states
//! ([`FIRST_WRITE_ALLOCS_MAX`], [`COMMIT_ALLOCS_MAX`]).
//!
//! Only reactor threads count: the test's own client threads allocate freely. A reactor thread
//! is marked by a control message that sets a thread-local flag on it. A regression (a boxed
//! message, a map entry or a `Vec` per I/O) fails with the number of allocations per I/O.

mod common;
#[path = "common/nbd_client.rs"]
mod nbd_client;

use cairn_engine::bdev::malloc::MallocBdev;
use cairn_engine::frontend::nbd::proto::cmd;
use cairn_engine::frontend::nbd::{ExportOptions, NbdConfig, NbdServer};
use cairn_engine::volume::{Pool, COMMIT_ALLOCS_MAX, FIRST_WRITE_ALLOCS_MAX};
use cairn_engine::{Bdev, Engine, IoOp, IoQueue, QueueCompletion, Request};
use cairn_testkit::alloc::{self, CountingAlloc};
use common::Rng;
use nbd_client::{Client, Endpoint, Options};
use std::sync::{Arc, Mutex, MutexGuard};

const MIB: u64 = 1 << 20;
const CLUSTER_BYTES: u32 = 1 << 20;
/// The volume every test writes: 16 clusters, all allocated during warm-up.
const VOLUME_BYTES: u64 = 16 * MIB;
const IO_BYTES: u32 = 4096;
/// Requests in flight at once, so the steady state has a full pipeline, not one request.
const QUEUE_DEPTH: u32 = 16;
/// I/Os before measuring (fills every preallocated table to its working size).
const WARM_UP_IOS: u64 = 2000;
/// Requests in flight during the NBD warm-up: every server slot the measurement can reach at
/// QUEUE_DEPTH has served a read by then.
const NBD_WARM_UP_DEPTH: usize = 4 * QUEUE_DEPTH as usize;
/// I/Os measured.
const MEASURED_IOS: u64 = 8000;

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

/// The side the reactors count for (one engine in this binary).
const REACTORS: usize = 1;

/// The counter is process-wide: tests take turns.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn counted() -> u64 {
    alloc::counted(REACTORS)
}

fn mark() -> u64 {
    alloc::mark(REACTORS)
}

/// Marks every reactor thread of `engine` as counted.
fn count_reactors(engine: &Engine) {
    for core in engine.cores() {
        engine
            .call(core, |_| alloc::count_this_thread(REACTORS))
            .expect("reactor answers");
    }
}

/// An engine on two cores (one when the process may use only one), and a pool on a malloc
/// bdev homed on the first, with volume "v" open.
struct Fixture {
    engine: Arc<Engine>,
    pool: Pool,
    volume: cairn_engine::BdevHandle,
}

impl Fixture {
    fn new() -> Fixture {
        let engine = Arc::new(common::start(common::cores(2)));
        let home = engine.cores()[0];
        let base: Arc<dyn Bdev> =
            Arc::new(MallocBdev::new("base", 64 * MIB, 4096).expect("malloc bdev"));
        let pool = Pool::create(&engine, "p", base, home, CLUSTER_BYTES).expect("pool");
        pool.create_volume(&engine, "v", VOLUME_BYTES, vec![])
            .expect("volume");
        let volume = pool.open_volume(&engine, "v").expect("open volume");
        count_reactors(&engine);
        Fixture {
            engine,
            pool,
            volume,
        }
    }

    /// The core clients use: another than the pool's home when there is one.
    fn client_core(&self) -> cairn_engine::CoreId {
        *self.engine.cores().last().expect("a core")
    }

    fn close(self) {
        self.pool
            .close_volume(&self.engine, &self.volume)
            .expect("close volume");
        self.pool.close(&self.engine).expect("close pool");
        Arc::try_unwrap(self.engine)
            .expect("no other engine handle")
            .stop();
    }
}

fn random_offset(rng: &mut Rng) -> u64 {
    rng.range(0, VOLUME_BYTES / u64::from(IO_BYTES) - 1) * u64::from(IO_BYTES)
}

/// Runs `count` random 4 KiB reads and writes (half each) through `q` at QUEUE_DEPTH.
fn queue_ios(q: &mut IoQueue, rng: &mut Rng, count: u64) {
    let mut done = Vec::with_capacity(QUEUE_DEPTH as usize);
    let mut issued = 0;
    let mut finished = 0;
    while finished < count {
        while issued < count && q.in_flight() < QUEUE_DEPTH {
            let buf = q.alloc_buf().expect("a free queue buffer");
            let op = if issued % 2 == 0 {
                IoOp::Write
            } else {
                IoOp::Read
            };
            let req = Request {
                op,
                offset_bytes: random_offset(rng),
                len_bytes: IO_BYTES,
                buf: Some(buf),
                fua: false,
                user_data: issued,
            };
            q.submit(req).map_err(|(e, _)| e).expect("submit");
            issued += 1;
        }
        done.clear();
        q.wait(1, &mut done);
        for QueueCompletion { result, buf, .. } in done.drain(..) {
            result.expect("I/O succeeds");
            q.free_buf(buf.expect("data requests return their buffer"));
            finished += 1;
        }
    }
}

/// Fails when `allocs`, made for `what`, exceed the bound `max` (named `name`).
fn assert_within(what: &str, allocs: u64, max: u64, name: &str) {
    assert!(
        allocs <= max,
        "{what} made {allocs} allocations on reactor threads, above {name} {max}"
    );
}

/// Fails with the allocations per I/O when the reactors allocated during `count` I/Os.
fn assert_none(what: &str, allocs: u64, count: u64) {
    assert_eq!(
        allocs,
        0,
        "{what}: {allocs} heap allocations on reactor threads in {count} steady-state I/Os \
         ({:.3} per I/O); the data path must allocate nothing. The first ones:\n{}",
        allocs as f64 / count as f64,
        alloc::sites()
    );
}

#[test]
fn volume_reads_and_writes_allocate_nothing_in_steady_state() {
    let _turn = serial();
    let f = Fixture::new();
    let mut q = f
        .engine
        .queue(&f.volume, f.client_core(), QUEUE_DEPTH)
        .expect("queue");
    let cluster = u64::from(CLUSTER_BYTES);
    let block = vec![7u8; IO_BYTES as usize];

    // First writes and commits may allocate, within their stated bounds.
    for c in 0..VOLUME_BYTES / cluster {
        let before = mark();
        q.write_at(c * cluster, &block, false).expect("first write");
        let first_write = counted() - before;
        assert_within(
            &format!("first write to cluster {c}"),
            first_write,
            FIRST_WRITE_ALLOCS_MAX,
            "FIRST_WRITE_ALLOCS_MAX",
        );
        let before = mark();
        q.flush().expect("flush commits the new mapping");
        let commit = counted() - before;
        assert_within(
            &format!("the commit after cluster {c}'s first write"),
            commit,
            COMMIT_ALLOCS_MAX,
            "COMMIT_ALLOCS_MAX",
        );
    }

    let mut rng = Rng::new(12);
    queue_ios(&mut q, &mut rng, WARM_UP_IOS);
    let before = mark();
    queue_ios(&mut q, &mut rng, MEASURED_IOS);
    assert_none("volume queue", counted() - before, MEASURED_IOS);

    // Trimming whole clusters frees them (quarantine, then a barrier round to every core):
    // the commit that makes the free durable stays within its bound, and so does writing the
    // clusters again.
    for c in 0..VOLUME_BYTES / cluster / 4 {
        q.trim(c * cluster, CLUSTER_BYTES).expect("trim");
        let before = mark();
        q.flush().expect("flush commits the unmapping");
        let commit = counted() - before;
        assert_within(
            &format!("the commit after trimming cluster {c}"),
            commit,
            COMMIT_ALLOCS_MAX,
            "COMMIT_ALLOCS_MAX",
        );
        let before = mark();
        q.write_at(c * cluster, &block, false).expect("rewrite");
        let first_write = counted() - before;
        assert_within(
            &format!("rewriting trimmed cluster {c}"),
            first_write,
            FIRST_WRITE_ALLOCS_MAX,
            "FIRST_WRITE_ALLOCS_MAX",
        );
        q.flush().expect("flush");
    }

    // A flush with nothing to commit is steady state too.
    q.flush().expect("warm-up flush");
    let before = mark();
    for _ in 0..100 {
        q.flush().expect("flush");
    }
    assert_none("clean flush", counted() - before, 100);
    drop(q);
    f.close();
}

/// Runs `count` random 4 KiB NBD reads and writes (half each) at QUEUE_DEPTH.
fn nbd_ios(c: &mut Client, rng: &mut Rng, count: u64, depth: usize) {
    let payload = vec![5u8; IO_BYTES as usize];
    let mut issued = 0;
    let mut finished = 0;
    while finished < count {
        while issued < count && c.in_flight() < depth {
            let off = random_offset(rng);
            if issued % 2 == 0 {
                c.send(cmd::WRITE, 0, off, IO_BYTES, &payload)
                    .expect("send write");
            } else {
                c.send(cmd::READ, 0, off, IO_BYTES, &[]).expect("send read");
            }
            issued += 1;
        }
        let r = c.recv().expect("reply");
        assert_eq!(r.error, 0, "NBD request failed");
        finished += 1;
    }
}

#[test]
fn nbd_reads_and_writes_allocate_nothing_in_steady_state() {
    let _turn = serial();
    let f = Fixture::new();
    let server = NbdServer::start(
        f.engine.clone(),
        NbdConfig {
            tcp: Some("127.0.0.1:0".parse().expect("address")),
            ..NbdConfig::default()
        },
    )
    .expect("server starts");
    server
        .add_export("v", &f.volume, ExportOptions::default())
        .expect("export");
    let ep = Endpoint::Tcp(server.tcp_addr().expect("tcp listener"));
    let mut c = Client::connect(
        &ep,
        "v",
        Options {
            structured: false,
            block_status: false,
        },
    )
    .expect("client connects");
    let cluster = u64::from(CLUSTER_BYTES);
    let block = vec![3u8; IO_BYTES as usize];
    for at in (0..VOLUME_BYTES).step_by(cluster as usize) {
        assert_eq!(c.write(at, &block, 0).expect("write"), 0, "first write");
    }
    let mut rng = Rng::new(34);
    // A connection's request slot keeps the reply buffer of its first read for the connection's
    // life, and slots are reused last-freed first, so the slots a run reaches are those its
    // depth needs. The server can hold a few more slots than the client has requests in flight
    // (a reply sent but not yet reaped), so the warm-up goes deeper than the measurement.
    nbd_ios(&mut c, &mut rng, WARM_UP_IOS, NBD_WARM_UP_DEPTH);
    let before = mark();
    nbd_ios(&mut c, &mut rng, MEASURED_IOS, QUEUE_DEPTH as usize);
    assert_none("NBD connection", counted() - before, MEASURED_IOS);
    drop(c);
    server.shutdown();
    f.close();
}
