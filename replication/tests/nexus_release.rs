//! Guards that destroying a nexus releases what it held: its connections to the replica
//! servers (on both ends, here in one process), their threads and the engine's reference to the
//! nexus bdev. A nexus created, written and destroyed 20 times over the same replica leaves the
//! process's fd and thread counts flat. Its own test binary, since it counts the whole process.

use cairn_engine::bdev::malloc::MallocBdev;
use cairn_engine::bdev::Bdev;
use cairn_engine::{CoreList, Engine, EngineConfig};
use cairn_replication::epoch::EpochStore;
use cairn_replication::nexus::insync::InSyncOptions;
use cairn_replication::nexus::manager::{CreateRequest, NexusManager};
use cairn_replication::nexus::{ChildSpec, NexusOptions, COPY_HOLD_MAX};
use cairn_replication::replica::ReplicaSet;
use cairn_replication::server::ReplicaServer;
use cairn_replication::transport::tcp::TcpTransport;
use cairn_testkit::proc_self::fds_and_threads;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 16 << 20;
const BLOCK: u32 = 4096;
const ROUNDS: usize = 20;
/// How long the replica server may take to notice a closed connection and drop it.
const SETTLE_MAX: Duration = Duration::from_secs(10);

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cairn-nexus-release-{}-{tag}", std::process::id()));
    drop(std::fs::remove_dir_all(&d));
    d
}

fn engine() -> Arc<Engine> {
    let cpus = cairn_engine::sys::allowed_cpus();
    let list: Vec<String> = cpus.iter().take(2).map(u32::to_string).collect();
    let mut config = EngineConfig::new(CoreList::parse(&list.join(",")).unwrap());
    config.buf_count = 128;
    Arc::new(Engine::start(config).expect("engine starts"))
}

/// Waits until the counts are back to at most `want` (the replica server closes its end of a
/// connection after it sees the nexus's close, so the first round's count may still include
/// it), failing after [`SETTLE_MAX`].
fn settles_to(want: (usize, usize), round: usize) {
    let deadline = Instant::now() + SETTLE_MAX;
    loop {
        let now = fds_and_threads();
        if now.0 <= want.0 && now.1 <= want.1 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "after {round} nexus create/destroy rounds (fds, threads) are {now:?}, \
             after the first {want:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn destroying_a_nexus_releases_its_connections_and_threads() {
    let engine = engine();
    let bdev: Arc<dyn Bdev> = Arc::new(MallocBdev::new("r", SIZE, BLOCK).unwrap());
    let handle = engine.add_bdev(bdev).unwrap();
    let replicas = Arc::new(ReplicaSet::new(
        EpochStore::open(&temp_dir("replica")).unwrap(),
        Box::new(move |_| Some(("r".to_string(), handle.clone()))),
    ));
    let server = ReplicaServer::start(
        engine.clone(),
        Arc::new(TcpTransport),
        "127.0.0.1:0",
        replicas,
    )
    .expect("replica server starts");
    let none = Arc::new(ReplicaSet::new(
        EpochStore::open(&temp_dir("manager")).unwrap(),
        Box::new(|_| None),
    ));
    let m = NexusManager::start(engine.clone(), Arc::new(TcpTransport), none);
    let mut first = None;
    for round in 0..ROUNDS {
        m.create(CreateRequest {
            name: "vol".into(),
            replicas: vec![ChildSpec::Remote {
                endpoint: server.endpoint().to_string(),
            }],
            options: NexusOptions {
                min_in_sync: 1,
                region_bytes: 64 << 10,
                io_timeout: Duration::from_secs(5),
                rebuild_bytes_per_s: None,
                copy_hold_max: COPY_HOLD_MAX,
            },
            epoch: None,
            // Every round after the first opens the replica the previous round's nexus held.
            takeover: round > 0,
            insync: InSyncOptions::default(),
        })
        .expect("nexus created");
        let nexus = m.handle("vol").expect("nexus handle");
        let mut q = engine.queue(&nexus, engine.cores()[0], 4).unwrap();
        q.write_at(0, &[round as u8; 4096], true).unwrap();
        drop(q);
        m.destroy("vol").unwrap();
        match first {
            None => first = Some(fds_and_threads()),
            Some(want) => settles_to(want, round + 1),
        }
    }
    m.shutdown();
    server.shutdown();
}
