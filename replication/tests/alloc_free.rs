//! Guards the nexus's share of docs/engine.md's promise that the data path allocates nothing:
//! with a counting global allocator, replicated writes (and reads) through a nexus to a remote
//! replica, served in-process over loopback TCP, make 0 heap allocations in steady state on the
//! reactor threads of the nexus's engine and of the replica's engine (counted apart, so a
//! failure names the side that allocated).
//!
//! Only reactor threads count: the test's client thread, the nexus monitor and the replica
//! server's accept thread allocate freely. A reactor thread is marked by a control message
//! that sets a thread-local flag on it.

use cairn_engine::bdev::malloc::MallocBdev;
use cairn_engine::bdev::Bdev;
use cairn_engine::{CoreList, Engine, EngineConfig, IoOp, IoQueue, QueueCompletion, Request};
use cairn_replication::epoch::EpochStore;
use cairn_replication::nexus::insync::InSyncOptions;
use cairn_replication::nexus::manager::{CreateRequest, NexusManager};
use cairn_replication::nexus::{ChildSpec, ChildState, NexusOptions, COPY_HOLD_MAX};
use cairn_replication::replica::ReplicaSet;
use cairn_replication::server::ReplicaServer;
use cairn_replication::transport::tcp::TcpTransport;
use cairn_testkit::alloc::{self, CountingAlloc};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const SIZE_BYTES: u64 = 16 << 20;
const BLOCK_BYTES: u32 = 4096;
const IO_BYTES: u32 = 4096;
/// Requests in flight at once, so the steady state has a full pipeline.
const QUEUE_DEPTH: u32 = 16;
/// I/Os before measuring (fills every preallocated table to its working size).
const WARM_UP_IOS: u64 = 2000;
/// I/Os measured.
const MEASURED_IOS: u64 = 8000;

/// Which engine's reactors an allocation counts for (cairn_testkit::alloc sides).
const NEXUS_SIDE: usize = 1;
const REPLICA_SIDE: usize = 2;

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

/// An engine on the first `count` allowed cores.
fn engine(count: usize) -> Arc<Engine> {
    let cpus = cairn_engine::sys::allowed_cpus();
    let list: Vec<String> = cpus.iter().take(count).map(u32::to_string).collect();
    let mut config = EngineConfig::new(CoreList::parse(&list.join(",")).expect("core list"));
    config.buf_count = 128;
    Arc::new(Engine::start(config).expect("engine starts"))
}

/// Marks every reactor thread of `engine` as belonging to `side`.
fn count_reactors(engine: &Engine, side: usize) {
    for core in engine.cores() {
        engine
            .call(core, move |_| alloc::count_this_thread(side))
            .expect("reactor answers");
    }
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "cairn-alloc-free-test-{}-{tag}",
        std::process::id()
    ));
    drop(std::fs::remove_dir_all(&d));
    d
}

/// Runs `count` 4 KiB writes and reads (three writes to one read) at QUEUE_DEPTH over the
/// first `span_bytes` of the nexus.
fn nexus_ios(q: &mut IoQueue, count: u64, span_bytes: u64) {
    let blocks = span_bytes / u64::from(IO_BYTES);
    let mut done = Vec::with_capacity(QUEUE_DEPTH as usize);
    let mut issued = 0u64;
    let mut finished = 0;
    while finished < count {
        while issued < count && q.in_flight() < QUEUE_DEPTH {
            let buf = q.alloc_buf().expect("a free queue buffer");
            let op = if issued % 4 == 3 {
                IoOp::Read
            } else {
                IoOp::Write
            };
            let block = issued.wrapping_mul(0x9E37_79B9_7F4A_7C15) % blocks;
            let req = Request {
                op,
                offset_bytes: block * u64::from(IO_BYTES),
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
            result.expect("replicated I/O succeeds");
            q.free_buf(buf.expect("data requests return their buffer"));
            finished += 1;
        }
    }
}

#[test]
fn replicated_writes_to_a_remote_replica_allocate_nothing_in_steady_state() {
    let nexus_engine = engine(2);
    let replica_engine = engine(1);
    let disk: Arc<dyn Bdev> =
        Arc::new(MallocBdev::new("r", SIZE_BYTES, BLOCK_BYTES).expect("malloc bdev"));
    let disk = replica_engine.add_bdev(disk).expect("add bdev");
    let hosted = disk.clone();
    let replicas = Arc::new(ReplicaSet::new(
        EpochStore::open(&temp_dir("replica")).expect("epoch store"),
        Box::new(move |_| Some(("r".to_string(), hosted.clone()))),
    ));
    let server = ReplicaServer::start(
        replica_engine.clone(),
        Arc::new(TcpTransport),
        "127.0.0.1:0",
        replicas,
    )
    .expect("replica server starts");
    let none = Arc::new(ReplicaSet::new(
        EpochStore::open(&temp_dir("nexus")).expect("epoch store"),
        Box::new(|_| None),
    ));
    let m = NexusManager::start(nexus_engine.clone(), Arc::new(TcpTransport), none);
    let v = m
        .create(CreateRequest {
            name: "vol".into(),
            replicas: vec![ChildSpec::Remote {
                endpoint: server.endpoint().to_string(),
            }],
            options: NexusOptions {
                min_in_sync: 1,
                region_bytes: 64 << 10,
                io_timeout: Duration::from_secs(30),
                rebuild_bytes_per_s: None,
                copy_hold_max: COPY_HOLD_MAX,
            },
            epoch: None,
            takeover: false,
            insync: InSyncOptions::default(),
        })
        .expect("nexus created");
    assert_eq!(v.state, "online");
    assert!(v.children.iter().all(|c| c.state == ChildState::InSync));
    let nexus = m.handle("vol").expect("nexus bdev");
    let core = *nexus_engine.cores().last().expect("a core");
    let mut q = nexus_engine
        .queue(&nexus, core, QUEUE_DEPTH)
        .expect("queue");
    count_reactors(&nexus_engine, NEXUS_SIDE);
    count_reactors(&replica_engine, REPLICA_SIDE);

    nexus_ios(&mut q, WARM_UP_IOS, SIZE_BYTES);
    q.flush().expect("flush");
    let (nexus_before, replica_before) = (alloc::mark(NEXUS_SIDE), alloc::counted(REPLICA_SIDE));
    nexus_ios(&mut q, MEASURED_IOS, SIZE_BYTES);
    let nexus_allocs = alloc::counted(NEXUS_SIDE) - nexus_before;
    let replica_allocs = alloc::counted(REPLICA_SIDE) - replica_before;
    assert_eq!(
        (nexus_allocs, replica_allocs),
        (0, 0),
        "heap allocations on reactor threads in {MEASURED_IOS} steady-state replicated I/Os: \
         {nexus_allocs} on the nexus's, {replica_allocs} on the replica's; the data path must \
         allocate nothing. The first ones:\n{}",
        alloc::sites()
    );
    let v = m.show("vol").expect("nexus view");
    assert!(
        v.children.iter().all(|c| c.state == ChildState::InSync),
        "the replica stayed in sync: {v:#?}"
    );
    drop(q);
    m.shutdown();
    server.shutdown();
}
