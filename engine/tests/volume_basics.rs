//! Guards the volume store's user-visible behaviour: thin volumes read zeros until written,
//! snapshots are frozen points in time (copy-on-write), clones share until written, growth is
//! online, trim frees space, and every bad request is refused with an error that names it
//! while nothing else changes; the O(1) space report agrees with the full listing. Every test
//! reopens the pool so persistence is always checked.

mod common;

use cairn_engine::bdev::malloc::MallocBdev;
use cairn_engine::volume::{Pool, PoolError};
use cairn_engine::{Bdev, CoreId, Engine, IoQueue};
use std::sync::Arc;

const MIB: u64 = 1 << 20;

fn setup(size: u64) -> (Engine, Arc<dyn Bdev>, Pool, CoreId) {
    let cores = common::cores(2);
    let engine = common::start(cores.clone());
    let home = cores.as_slice()[0];
    let base: Arc<dyn Bdev> = Arc::new(MallocBdev::new("base", size, 4096).unwrap());
    let pool = Pool::create(&engine, "p", base.clone(), home, MIB as u32).unwrap();
    (engine, base, pool, home)
}

fn queue(
    engine: &Engine,
    pool: &Pool,
    name: &str,
    core: CoreId,
) -> (cairn_engine::BdevHandle, IoQueue) {
    let h = pool.open_volume(engine, name).unwrap();
    let q = engine.queue(&h, core, 8).unwrap();
    (h, q)
}

fn read(q: &mut IoQueue, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    q.read_at(off, &mut b).unwrap();
    b
}

fn last_core(engine: &Engine) -> CoreId {
    *engine.cores().last().unwrap()
}

#[test]
fn thin_volume_reads_zeros_then_data_and_survives_reopen() {
    let (engine, base, pool, home) = setup(64 * MIB);
    pool.create_volume(&engine, "v", 16 * MIB, vec![("app".into(), "pg".into())])
        .unwrap();
    let (h, mut q) = queue(&engine, &pool, "v", last_core(&engine));
    assert!(read(&mut q, 0, 8192).iter().all(|&b| b == 0));
    q.write_at(MIB - 4096, &[7u8; 8192], false).unwrap(); // straddles two clusters
    q.write_at(5 * MIB, &[9u8; 4096], true).unwrap();
    q.flush().unwrap();
    assert_eq!(read(&mut q, MIB - 4096, 8192), vec![7u8; 8192]);
    let info = pool.info(&engine).unwrap();
    assert_eq!(info.objects[0].allocated_clusters, 3);
    assert_eq!(
        info.objects[0].labels,
        vec![("app".to_string(), "pg".to_string())]
    );
    drop(q);
    pool.close_volume(&engine, &h).unwrap();
    pool.check(&engine).unwrap();
    pool.close(&engine).unwrap();

    let pool = Pool::open(&engine, "p", base, home).unwrap();
    pool.check(&engine).unwrap();
    let (_h, mut q) = queue(&engine, &pool, "v", home);
    assert_eq!(read(&mut q, MIB - 4096, 8192), vec![7u8; 8192]);
    assert_eq!(read(&mut q, 5 * MIB, 4096), vec![9u8; 4096]);
    assert!(read(&mut q, 2 * MIB, 4096).iter().all(|&b| b == 0));
}

#[test]
fn snapshot_is_frozen_and_clone_diverges() {
    let (engine, _base, pool, _home) = setup(64 * MIB);
    pool.create_volume(&engine, "v", 8 * MIB, vec![]).unwrap();
    let core = last_core(&engine);
    let (hv, mut v) = queue(&engine, &pool, "v", core);
    v.write_at(0, &[1u8; 4096], false).unwrap();
    pool.snapshot(&engine, "v", "s").unwrap();
    v.write_at(0, &[2u8; 4096], false).unwrap();
    let (_hs, mut s) = queue(&engine, &pool, "s", core);
    assert_eq!(
        read(&mut s, 0, 4096),
        vec![1u8; 4096],
        "snapshot changed after a write"
    );
    assert_eq!(read(&mut v, 0, 4096), vec![2u8; 4096]);
    assert!(matches!(
        s.write_at(0, &[3u8; 4096], false),
        Err(cairn_engine::IoError::ReadOnly { .. })
    ));

    pool.clone_snapshot(&engine, "s", "c").unwrap();
    let (_hc, mut c) = queue(&engine, &pool, "c", core);
    assert_eq!(read(&mut c, 0, 4096), vec![1u8; 4096]);
    c.write_at(4096, &[4u8; 4096], false).unwrap();
    assert_eq!(
        read(&mut c, 0, 8192)[..4096],
        [1u8; 4096],
        "copy-on-write kept the rest of the cluster"
    );
    assert_eq!(
        read(&mut s, 4096, 4096),
        vec![0u8; 4096],
        "clone write leaked into the snapshot"
    );
    pool.check(&engine).unwrap();

    let e = pool.delete(&engine, "s").unwrap_err();
    assert!(
        matches!(&e, PoolError::HasDependants { clones, .. } if clones == &["c".to_string()]),
        "{e}"
    );
    drop(v);
    pool.close_volume(&engine, &hv).unwrap();
    pool.delete(&engine, "v").unwrap();
    assert_eq!(
        read(&mut s, 0, 4096),
        vec![1u8; 4096],
        "deleting the volume kept its snapshot"
    );
    pool.check(&engine).unwrap();
}

#[test]
fn grow_online_and_refuse_shrink() {
    let (engine, _base, pool, _home) = setup(64 * MIB);
    pool.create_volume(&engine, "v", 4 * MIB, vec![]).unwrap();
    let (_h, mut q) = queue(&engine, &pool, "v", last_core(&engine));
    assert!(q.write_at(4 * MIB, &[1u8; 4096], false).is_err());
    pool.grow(&engine, "v", 8 * MIB).unwrap();
    let mut q2 = engine.queue(&_h, last_core(&engine), 4).unwrap();
    q2.write_at(4 * MIB, &[1u8; 4096], false).unwrap();
    assert_eq!(read(&mut q2, 4 * MIB, 4096), vec![1u8; 4096]);
    let e = pool.grow(&engine, "v", 2 * MIB).unwrap_err();
    assert!(matches!(e, PoolError::ShrinkRefused { .. }), "{e}");
    drop(q);
}

#[test]
fn trim_frees_space_for_reuse_and_full_pool_says_so() {
    let (engine, _base, pool, _home) = setup(16 * MIB);
    let total = pool.info(&engine).unwrap().clusters;
    pool.create_volume(&engine, "v", 64 * MIB, vec![]).unwrap();
    let (_h, mut q) = queue(&engine, &pool, "v", last_core(&engine));
    for c in 0..total {
        q.write_at(c * MIB, &[5u8; 4096], false).unwrap();
    }
    let e = q.write_at(total * MIB, &[5u8; 4096], false).unwrap_err();
    assert_eq!(
        e,
        cairn_engine::IoError::Device {
            errno: libc::ENOSPC
        }
    );
    assert_eq!(
        read(&mut q, 0, 4096),
        vec![5u8; 4096],
        "a full pool damaged existing data"
    );
    // What a node reports in its heartbeats agrees with the full listing.
    let (space, info) = (pool.space(&engine).unwrap(), pool.info(&engine).unwrap());
    assert_eq!(
        (space.clusters, space.free_clusters, space.free_bytes()),
        (info.clusters, 0, 0)
    );
    q.trim(0, MIB as u32).unwrap();
    q.flush().unwrap();
    // The freed cluster becomes reusable once its free is durable and cores have drained.
    let mut ok = false;
    for _ in 0..100 {
        if q.write_at(total * MIB, &[6u8; 4096], false).is_ok() {
            ok = true;
            break;
        }
        q.flush().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(ok, "trimmed space never became reusable");
    assert!(
        read(&mut q, 0, 4096).iter().all(|&b| b == 0),
        "trimmed cluster reads zeros"
    );
    pool.check(&engine).unwrap();
}

#[test]
fn bad_control_requests_name_the_problem() {
    let (engine, _base, pool, _home) = setup(64 * MIB);
    pool.create_volume(&engine, "v", 4 * MIB, vec![]).unwrap();
    let cases: Vec<(Result<(), PoolError>, &str)> = vec![
        (
            pool.create_volume(&engine, "v", 4 * MIB, vec![]),
            "already exists",
        ),
        (pool.create_volume(&engine, "z", 0, vec![]), "above zero"),
        (
            pool.create_volume(&engine, "odd", 4097, vec![]),
            "multiple of the block size",
        ),
        (
            pool.create_volume(&engine, "", 4096, vec![]),
            "not a valid name",
        ),
        (
            pool.snapshot(&engine, "nope", "s"),
            "no volume or snapshot named 'nope'",
        ),
        (pool.clone_snapshot(&engine, "v", "c"), "not a snapshot"),
        (pool.delete(&engine, "ghost"), "ghost"),
    ];
    for (r, needle) in cases {
        let e = r.unwrap_err().to_string();
        assert!(e.contains(needle), "error '{e}' does not say '{needle}'");
    }
    let info = pool.info(&engine).unwrap();
    assert_eq!(info.objects.len(), 1, "a refused request changed the pool");
    pool.check(&engine).unwrap();
}

#[test]
fn grow_while_io_is_in_flight() {
    let (engine, _base, pool, _home) = setup(64 * MIB);
    pool.create_volume(&engine, "v", 4 * MIB, vec![]).unwrap();
    let h = pool.open_volume(&engine, "v").unwrap();
    let engine = Arc::new(engine);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let io = {
        let (engine, stop, h) = (engine.clone(), stop.clone(), h.clone());
        std::thread::spawn(move || {
            let mut q = engine.queue(&h, last_core(&engine), 16).unwrap();
            let mut rounds = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || rounds < 50 {
                let off = (rounds % 1024) * 4096;
                q.write_at(off, &[rounds as u8; 4096], false).unwrap();
                assert_eq!(read(&mut q, off, 4096), vec![rounds as u8; 4096]);
                rounds += 1;
            }
            rounds
        })
    };
    for step in 1..=4u64 {
        pool.grow(&engine, "v", (4 + step) * MIB).unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(io.join().unwrap() >= 50);
    let mut q = engine.queue(&h, last_core(&engine), 4).unwrap();
    q.write_at(8 * MIB - 4096, &[3u8; 4096], true).unwrap();
    assert_eq!(read(&mut q, 8 * MIB - 4096, 4096), vec![3u8; 4096]);
    assert_eq!(pool.info(&engine).unwrap().objects[0].size_bytes, 8 * MIB);
    pool.check(&engine).unwrap();
}

#[test]
fn deleting_a_volume_frees_space_for_others() {
    let (engine, _base, pool, _home) = setup(16 * MIB);
    let total = pool.info(&engine).unwrap().clusters;
    pool.create_volume(&engine, "a", total * MIB, vec![])
        .unwrap();
    pool.create_volume(&engine, "b", total * MIB, vec![])
        .unwrap();
    let (ha, mut a) = queue(&engine, &pool, "a", last_core(&engine));
    for c in 0..total {
        a.write_at(c * MIB, &[1u8; 4096], false).unwrap();
    }
    a.flush().unwrap();
    let (_hb, mut b) = queue(&engine, &pool, "b", last_core(&engine));
    assert_eq!(
        b.write_at(0, &[2u8; 4096], false),
        Err(cairn_engine::IoError::Device {
            errno: libc::ENOSPC
        })
    );
    let e = pool.delete(&engine, "a").unwrap_err();
    assert!(matches!(e, PoolError::VolumeOpen { .. }), "{e}");
    drop(a);
    pool.close_volume(&engine, &ha).unwrap();
    pool.delete(&engine, "a").unwrap();
    let mut ok = false;
    for _ in 0..100 {
        if b.write_at(0, &[2u8; 4096], false).is_ok() {
            ok = true;
            break;
        }
        b.flush().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(ok, "space of the deleted volume never became reusable");
    assert_eq!(read(&mut b, 0, 8192)[..4096], [2u8; 4096]);
    assert!(
        read(&mut b, 4096, 4096).iter().all(|&x| x == 0),
        "reused cluster leaked the old volume's data"
    );
    pool.check(&engine).unwrap();
}

#[test]
fn device_errors_reach_the_caller_and_the_pool_recovers() {
    use cairn_engine::bdev::fault::FaultBdev;
    let cores = common::cores(2);
    let engine = common::start(cores.clone());
    let ram: Arc<dyn Bdev> = Arc::new(MallocBdev::new("ram", 64 * MIB, 4096).unwrap());
    let fault = FaultBdev::new("faulty", ram);
    let control = fault.control();
    let base: Arc<dyn Bdev> = Arc::new(fault);
    let home = cores.as_slice()[0];
    let pool = Pool::create(&engine, "p", base.clone(), home, MIB as u32).unwrap();
    pool.create_volume(&engine, "v", 8 * MIB, vec![]).unwrap();
    let (h, mut q) = queue(&engine, &pool, "v", last_core(&engine));

    // Zeroing a new cluster fails: the write fails and the cluster is not mapped.
    control.fail_writes(libc::EIO);
    assert_eq!(
        q.write_at(0, &[1u8; 4096], false),
        Err(cairn_engine::IoError::Device { errno: libc::EIO })
    );
    control.heal();
    assert!(read(&mut q, 0, 4096).iter().all(|&b| b == 0));

    // A failing device flush fails the volume flush; the next one commits everything.
    q.write_at(0, &[2u8; 4096], false).unwrap();
    control.fail_flushes(libc::EIO);
    assert_eq!(
        q.flush(),
        Err(cairn_engine::IoError::Device { errno: libc::EIO })
    );
    control.heal();
    q.flush().unwrap();

    // The last flush of a commit fails, after the checkpoint header was written: the retry
    // clears that header first, then commits again.
    q.write_at(MIB, &[3u8; 4096], false).unwrap();
    control.fail_one_flush_after(1);
    assert!(q.flush().is_err());
    q.flush().unwrap();
    pool.check(&engine).unwrap();
    drop(q);
    pool.close_volume(&engine, &h).unwrap();
    pool.close(&engine).unwrap();
    let pool = Pool::open(&engine, "p", base, home).unwrap();
    let (_h, mut q) = queue(&engine, &pool, "v", home);
    assert_eq!(
        read(&mut q, 0, 4096),
        vec![2u8; 4096],
        "the retried commit made the write durable"
    );
    assert_eq!(
        read(&mut q, MIB, 4096),
        vec![3u8; 4096],
        "the commit retried after a failed header flush holds"
    );
}
