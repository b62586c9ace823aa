//! In-process nexus tests: replica servers over malloc (and fault) bdevs on loopback TCP, a
//! nexus on top, driven through the engine's client queues. They guard the replication
//! rules without the daemon: every acknowledged write is on every in-sync replica; a replica
//! that drops out is resynced with only what it missed; a newer nexus fences an older one;
//! a new replica is rebuilt online; a slow replica is faulted at the deadline instead of
//! hanging the volume; an idle nexus still resyncs a replica that comes back; a promote
//! under writes (a write freeze and quiesce round) loses none; a write a faulted replica
//! missed is acknowledged only after the surviving replicas hold a higher data generation
//! than the faulted one. The
//! multi-process versions (kill -9, network namespaces) are in node/tests/replication.rs.

use cairn_engine::bdev::fault::{FaultBdev, FaultControl};
use cairn_engine::bdev::malloc::MallocBdev;
use cairn_engine::bdev::Bdev;
use cairn_engine::{BdevHandle, CoreList, Engine, EngineConfig, IoQueue};
use cairn_replication::epoch::EpochStore;
use cairn_replication::nexus::manager::{CreateRequest, NexusManager, NexusView};
use cairn_replication::nexus::{ChildSpec, ChildState, NexusOptions};
use cairn_replication::replica::ReplicaSet;
use cairn_replication::server::ReplicaServer;
use cairn_replication::transport::tcp::TcpTransport;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 16 << 20;
const BLOCK: u32 = 4096;
const REGION: u64 = 64 << 10;
/// Latency of the slow replica: far above the nexus's 500 ms timeout, and below the replica's
/// FENCE_DRAIN_MAX (10 s), so its reconnect can wait out the late write and then resync.
const SLOW: Duration = Duration::from_secs(8);

fn engine() -> Arc<Engine> {
    let cpus = cairn_engine::sys::allowed_cpus();
    let list: Vec<String> = cpus.iter().take(2).map(u32::to_string).collect();
    let mut config = EngineConfig::new(CoreList::parse(&list.join(",")).unwrap());
    config.buf_count = 128;
    Arc::new(Engine::start(config).expect("engine starts"))
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "cairn-nexus-test-{}-{tag}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    drop(std::fs::remove_dir_all(&d));
    d
}

/// One "node": a bdev hosted as the replica of every volume id, and its server.
struct Site {
    replicas: Arc<ReplicaSet>,
    handle: BdevHandle,
    server: Option<ReplicaServer>,
    endpoint: String,
    fault: Option<Arc<FaultControl>>,
}

impl Site {
    fn new(engine: &Arc<Engine>, tag: &str, faulty: bool) -> Site {
        let malloc: Arc<dyn Bdev> = Arc::new(MallocBdev::new(tag, SIZE, BLOCK).unwrap());
        let (bdev, fault): (Arc<dyn Bdev>, _) = if faulty {
            let f = FaultBdev::new(&format!("{tag}-fault"), malloc);
            let c = f.control();
            (Arc::new(f), Some(c))
        } else {
            (malloc, None)
        };
        let handle = engine.add_bdev(bdev).unwrap();
        let h = handle.clone();
        let name = tag.to_string();
        let replicas = Arc::new(ReplicaSet::new(
            EpochStore::open(&temp_dir(tag)).unwrap(),
            Box::new(move |_| Some((name.clone(), h.clone()))),
        ));
        let mut site = Site {
            replicas,
            handle,
            server: None,
            endpoint: "127.0.0.1:0".into(),
            fault,
        };
        site.start(engine);
        site
    }

    fn start(&mut self, engine: &Arc<Engine>) {
        let server = ReplicaServer::start(
            engine.clone(),
            Arc::new(TcpTransport),
            &self.endpoint,
            self.replicas.clone(),
        )
        .expect("replica server starts");
        self.endpoint = server.endpoint().to_string();
        self.server = Some(server);
    }

    fn stop(&mut self) {
        self.server.take().expect("running").shutdown();
    }

    fn spec(&self) -> ChildSpec {
        ChildSpec::Remote {
            endpoint: self.endpoint.clone(),
        }
    }

    fn contents(&self, engine: &Engine) -> Vec<u8> {
        read_all(&mut engine.queue(&self.handle, engine.cores()[0], 4).unwrap())
    }
}

fn read_all(q: &mut IoQueue) -> Vec<u8> {
    let mut all = vec![0u8; SIZE as usize];
    for (i, chunk) in all.chunks_mut(128 << 10).enumerate() {
        q.read_at(i as u64 * (128 << 10), chunk).unwrap();
    }
    all
}

fn manager(engine: &Arc<Engine>, tag: &str) -> Arc<NexusManager> {
    let none = Arc::new(ReplicaSet::new(
        EpochStore::open(&temp_dir(tag)).unwrap(),
        Box::new(|_| None),
    ));
    NexusManager::start(engine.clone(), Arc::new(TcpTransport), none)
}

fn options() -> NexusOptions {
    NexusOptions {
        min_in_sync: 1,
        region_bytes: REGION,
        io_timeout: Duration::from_millis(500),
        rebuild_bytes_per_s: None,
    }
}

fn create(m: &NexusManager, replicas: Vec<ChildSpec>) -> NexusView {
    create_with(m, replicas, false)
}

/// Creates the nexus; with `takeover`, over replicas another nexus opened.
fn create_with(m: &NexusManager, replicas: Vec<ChildSpec>, takeover: bool) -> NexusView {
    m.create(CreateRequest {
        name: "vol".into(),
        replicas,
        options: options(),
        epoch: None,
        takeover,
    })
    .expect("nexus created")
}

/// A deterministic block of data for (offset, round).
fn pattern(off: u64, round: u64) -> Vec<u8> {
    let mut x = off.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ round.wrapping_add(1);
    (0..REGION as usize)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write_regions(q: &mut IoQueue, regions: impl Iterator<Item = u64>, round: u64) -> u64 {
    let mut bytes = 0;
    for r in regions {
        let off = r * REGION;
        let data = pattern(off, round);
        for (i, chunk) in data.chunks(64 << 10).enumerate() {
            q.write_at(off + i as u64 * (64 << 10), chunk, false)
                .unwrap();
        }
        bytes += REGION;
    }
    q.flush().unwrap();
    bytes
}

fn wait_for(m: &NexusManager, what: &str, f: impl Fn(&NexusView) -> bool) -> NexusView {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = m.show("vol").unwrap();
        if f(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {v:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn all_in_sync(v: &NexusView) -> bool {
    v.children.iter().all(|c| c.state == ChildState::InSync) && v.resync.is_none()
}

#[test]
fn writes_reach_every_replica_and_an_outage_resyncs_only_what_was_missed() {
    let engine = engine();
    let a = Site::new(&engine, "a", false);
    let mut b = Site::new(&engine, "b", false);
    let m = manager(&engine, "m");
    let v = create(&m, vec![a.spec(), b.spec()]);
    assert_eq!(v.state, "online");
    let nexus = m.handle("vol").unwrap();
    let mut q = engine.queue(&nexus, engine.cores()[0], 8).unwrap();
    write_regions(&mut q, 0..256, 0);
    assert_eq!(
        a.contents(&engine),
        b.contents(&engine),
        "both replicas hold every write"
    );
    assert_eq!(read_all(&mut q), a.contents(&engine));

    b.stop();
    // The first write after the stop finds the closed connection and faults b; none fails.
    let written_out = write_regions(&mut q, (10..20).chain(100..110), 1);
    let v = wait_for(&m, "b faulted", |v| {
        v.children[1].state == ChildState::Faulted
    });
    assert_eq!(v.state, "degraded");

    b.start(&engine);
    let v = wait_for(&m, "b back in sync", all_in_sync);
    let copied = v.children[1].copied_bytes;
    assert!(copied > 0, "something was copied");
    assert!(
        copied <= 2 * written_out,
        "resync copied {copied} bytes for {written_out} written while out"
    );
    assert_eq!(a.contents(&engine), b.contents(&engine));
    let report = m.verify("vol", false).unwrap();
    assert_eq!(report.mismatched, Vec::<u64>::new());
    assert_eq!(report.regions, SIZE / REGION);
    drop(q);
    m.shutdown();
}

#[test]
fn an_idle_nexus_resyncs_a_returning_replica() {
    // The replicas run on an engine of their own, so nothing they do wakes the nexus's
    // reactors: only the manager, when it orders the resync, can.
    let nexus_engine = engine();
    let replica_engine = engine();
    let a = Site::new(&replica_engine, "ia", false);
    let mut b = Site::new(&replica_engine, "ib", false);
    let m = manager(&nexus_engine, "im");
    create(&m, vec![a.spec(), b.spec()]);
    let core = nexus_engine.cores()[0];
    let mut q = nexus_engine
        .queue(&m.handle("vol").unwrap(), core, 4)
        .unwrap();
    b.stop();
    let written_out = write_regions(&mut q, 0..4, 1);
    wait_for(&m, "b faulted", |v| {
        v.children[1].state == ChildState::Faulted
    });
    // Past the I/O timeout no deadline is left, and the nexus's reactors sleep.
    std::thread::sleep(options().io_timeout * 2);
    b.start(&replica_engine);
    let v = wait_for(&m, "b resynced with no client I/O", all_in_sync);
    assert!(v.children[1].copied_bytes <= 2 * written_out, "{v:#?}");
    assert_eq!(a.contents(&replica_engine), b.contents(&replica_engine));
    drop(q);
    m.shutdown();
}

#[test]
fn a_newer_nexus_fences_the_older_one() {
    let engine = engine();
    let a = Site::new(&engine, "fa", false);
    let b = Site::new(&engine, "fb", false);
    let old = manager(&engine, "old");
    create(&old, vec![a.spec(), b.spec()]);
    let mut q_old = engine
        .queue(&old.handle("vol").unwrap(), engine.cores()[0], 4)
        .unwrap();
    q_old.write_at(0, &[1u8; 4096], false).unwrap();

    let new = manager(&engine, "new");
    let v = create_with(&new, vec![a.spec(), b.spec()], true);
    assert!(v.epoch > 1, "the new nexus went above the old epoch: {v:?}");
    let refused = q_old.write_at(4096, &[2u8; 4096], false);
    assert!(refused.is_err(), "a stale nexus's write was accepted");
    assert_eq!(old.show("vol").unwrap().state, "fenced");

    let mut q_new = engine
        .queue(&new.handle("vol").unwrap(), engine.cores()[0], 4)
        .unwrap();
    q_new.write_at(4096, &[3u8; 4096], false).unwrap();
    let mut back = [0u8; 4096];
    q_new.read_at(4096, &mut back).unwrap();
    assert_eq!(back, [3u8; 4096]);
    old.shutdown();
    new.shutdown();
}

#[test]
fn a_new_replica_is_rebuilt_online_under_writes() {
    let engine = engine();
    let a = Site::new(&engine, "ra", false);
    let b = Site::new(&engine, "rb", false);
    let m = manager(&engine, "rm");
    create(&m, vec![a.spec()]);
    let nexus = m.handle("vol").unwrap();
    let mut q = engine.queue(&nexus, engine.cores()[0], 8).unwrap();
    write_regions(&mut q, 0..256, 0);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (engine, nexus, stop) = (engine.clone(), nexus.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut q = engine
                .queue(&nexus, engine.cores()[1 % engine.cores().len()], 8)
                .unwrap();
            let mut round = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                write_regions(&mut q, (round % 200..256).step_by(37), round);
                round += 1;
            }
            round
        })
    };
    m.add_child("vol", b.spec()).unwrap();
    let v = wait_for(&m, "rebuild finished", all_in_sync);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let rounds = writer.join().unwrap();
    assert!(rounds > 1, "the writer ran during the rebuild");
    assert!(
        v.children[1].copied_bytes >= SIZE,
        "a rebuild copies the whole volume"
    );
    assert_eq!(
        m.verify("vol", false).unwrap().mismatched,
        Vec::<u64>::new()
    );
    assert_eq!(a.contents(&engine), b.contents(&engine));
    m.shutdown();
}

#[test]
fn promote_under_writes_waits_for_them_and_loses_none() {
    // Promote freezes writes and asks every core whether its writes drained (a quiesce
    // round); writes from two cores keep coming meanwhile, and every one must succeed and
    // reach both replicas.
    let engine = engine();
    let a = Site::new(&engine, "pa", false);
    let b = Site::new(&engine, "pb", false);
    let m = manager(&engine, "pm");
    let first = create(&m, vec![a.spec(), b.spec()]).epoch;
    let nexus = m.handle("vol").unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = engine
        .cores()
        .into_iter()
        .enumerate()
        .map(|(i, core)| {
            let (engine, nexus, stop) = (engine.clone(), nexus.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut q = engine.queue(&nexus, core, 8).unwrap();
                let mut round = 1;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    write_regions(
                        &mut q,
                        (i as u64 * 128..(i as u64 + 1) * 128).step_by(9),
                        round,
                    );
                    round += 1;
                }
                round
            })
        })
        .collect();
    let mut epoch = first;
    for _ in 0..5 {
        let v = m
            .promote("vol")
            .expect("promote drains the writes in flight");
        assert!(v.epoch > epoch, "promote raises the epoch: {v:#?}");
        epoch = v.epoch;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        assert!(w.join().unwrap() > 1, "a writer ran during the promotes");
    }
    let v = m.show("vol").unwrap();
    assert!(all_in_sync(&v), "{v:#?}");
    assert_eq!(
        m.verify("vol", false).unwrap().mismatched,
        Vec::<u64>::new()
    );
    assert_eq!(a.contents(&engine), b.contents(&engine));
    m.shutdown();
}

#[test]
fn a_slow_replica_is_faulted_at_the_deadline_and_the_volume_keeps_going() {
    let engine = engine();
    let a = Site::new(&engine, "sa", false);
    let b = Site::new(&engine, "sb", true);
    let m = manager(&engine, "sm");
    create(&m, vec![a.spec(), b.spec()]);
    let mut q = engine
        .queue(&m.handle("vol").unwrap(), engine.cores()[0], 4)
        .unwrap();
    q.write_at(0, &[5u8; 4096], false).unwrap();
    b.fault.as_ref().unwrap().set_latency(SLOW);
    let t = Instant::now();
    q.write_at(4096, &[6u8; 4096], false).unwrap();
    let first = t.elapsed();
    assert!(
        first < SLOW,
        "the write waited for the slow replica: {first:?}"
    );
    let v = m.show("vol").unwrap();
    assert_eq!(v.children[1].state, ChildState::Faulted, "{v:#?}");
    assert!(v.children[1].reason.contains("no answer"), "{v:#?}");
    for i in 2..50u64 {
        q.write_at(i * 4096, &[7u8; 4096], false).unwrap();
    }
    b.fault.as_ref().unwrap().heal();
    wait_for(&m, "slow replica resynced", all_in_sync);
    assert_eq!(
        m.verify("vol", false).unwrap().mismatched,
        Vec::<u64>::new()
    );
    m.shutdown();
}

/// A write that a faulted replica missed is acknowledged only once the next data generation
/// is stored on every replica still in sync. With the manager's monitor stopped (nothing
/// raises the generation), such a write stays unanswered; removing the faulted replica runs
/// the raise, and the write completes, with the surviving replica's generation now above
/// the faulted one's. Without the hold, the write was acknowledged while both replicas held
/// the same generation, so a nexus created after a crash could trust the copy that missed it.
#[test]
fn a_write_a_faulted_replica_missed_waits_for_the_generation_raise() {
    let engine = engine();
    let a = Site::new(&engine, "ga", false);
    let mut b = Site::new(&engine, "gb", false);
    let m = manager(&engine, "gen");
    create(&m, vec![a.spec(), b.spec()]);
    let mut q = engine
        .queue(&m.handle("vol").unwrap(), engine.cores()[0], 4)
        .unwrap();
    q.write_at(0, &[1u8; 4096], false).unwrap();
    let generation = |s: &Site| s.replicas.hosted()[0].record().generation;
    assert_eq!(generation(&a), generation(&b));
    m.shutdown();
    b.stop();
    let writer = std::thread::spawn(move || q.write_at(4096, &[2u8; 4096], false));
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !writer.is_finished(),
        "a write b missed was answered before the generation raise: {:?}",
        writer.join()
    );
    m.remove_child("vol", &b.spec()).unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        generation(&a) > generation(&b),
        "a {} b {}",
        generation(&a),
        generation(&b)
    );
}
