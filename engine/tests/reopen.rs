//! Guards that closing releases everything: after a pool, its volumes, an NBD export and the
//! engine are closed (or the engine alone is stopped, as `cairn-perf` does), the pool file's
//! descriptor and exclusive lock, the reactor threads, the listener sockets and the buffers are
//! gone, so the same file reopens in the same process, 100 times, with the process's fd and
//! thread counts flat.
//!
//! The bug: an open volume's state and its pool referred to each other through `Arc`s (the
//! pool's table of open volumes held the volume, the volume held the pool), and the engine kept
//! every bdev it was ever given until it stopped. A pool whose volume was never closed kept its
//! base device, and with it the file and its `flock`, alive after the engine stopped:
//! `cairn-perf compare --candidate volume --rounds 2` failed in its second round with "in use by
//! another process (exclusive lock held)".

mod common;
#[path = "common/nbd_client.rs"]
mod nbd_client;

use cairn_engine::bdev::uring::{UringBdev, UringOptions};
use cairn_engine::frontend::nbd::{ExportOptions, NbdConfig, NbdServer};
use cairn_engine::volume::Pool;
use cairn_engine::{Bdev, BdevHandle, Engine};
use cairn_testkit::proc_self::fds_and_threads;
use nbd_client::{Client, Endpoint, Options};
use parking_lot::Mutex;
use std::path::Path;
use std::sync::Arc;

const MIB: u64 = 1 << 20;
/// The pool file: small, sparse.
const POOL_BYTES: u64 = 64 * MIB;
const VOLUME_BYTES: u64 = 8 * MIB;
/// Open/close rounds of the engine-level tests.
const ROUNDS: usize = 100;
/// Rounds of the NBD test: each starts listener threads, so it is slower.
const NBD_ROUNDS: usize = 20;

/// The tests count the whole process's fds and threads, so they must not run side by side.
static SERIAL: Mutex<()> = Mutex::new(());

/// The pool file, locked exclusively as cairn-node and cairn-perf open it.
fn base(path: &Path) -> Arc<dyn Bdev> {
    let options = UringOptions {
        exclusive: true,
        ..UringOptions::default()
    };
    Arc::new(UringBdev::open("base", path, options).expect("pool file opens and locks"))
}

/// Opens the pool on `path` (formatting it the first time), opens volume "v" and writes and
/// reads back a pattern that names the round.
fn open_and_use(engine: &Engine, path: &Path, round: usize) -> (Pool, BdevHandle) {
    let home = engine.cores()[0];
    let pool = if round == 0 {
        let pool = Pool::create(engine, "p", base(path), home, MIB as u32).unwrap();
        pool.create_volume(engine, "v", VOLUME_BYTES, vec![])
            .unwrap();
        pool
    } else {
        Pool::open(engine, "p", base(path), home).unwrap()
    };
    let vol = pool.open_volume(engine, "v").unwrap();
    let mut q = engine
        .queue(&vol, *engine.cores().last().unwrap(), 4)
        .unwrap();
    if round > 0 {
        let mut got = vec![0u8; 4096];
        q.read_at(0, &mut got).unwrap();
        assert_eq!(
            got,
            vec![(round - 1) as u8; 4096],
            "round {round}: last data"
        );
    }
    q.write_at(0, &[round as u8; 4096], true).unwrap();
    q.flush().unwrap();
    (pool, vol)
}

/// Runs `round` `rounds` times and checks the fd and thread counts after the last equal those
/// after the first (which may have set up process-wide state once).
fn flat(what: &str, rounds: usize, mut round: impl FnMut(usize)) {
    let _serial = SERIAL.lock();
    round(0);
    let first = fds_and_threads();
    for i in 1..rounds {
        round(i);
    }
    let last = fds_and_threads();
    assert_eq!(
        last, first,
        "{what}: (fds, threads) after round 1 {first:?}, after round {rounds} {last:?}"
    );
}

#[test]
fn closing_pool_volume_and_engine_releases_the_file() {
    let file = common::TempFile::new("reopen-close", POOL_BYTES);
    flat("explicit close", ROUNDS, |round| {
        let engine = common::start(common::cores(2));
        let (pool, vol) = open_and_use(&engine, file.path(), round);
        pool.close_volume(&engine, &vol).unwrap();
        pool.close(&engine).unwrap();
        engine.stop();
    });
}

/// What `cairn-perf` does: nothing is closed but the engine.
#[test]
fn stopping_the_engine_alone_releases_the_file() {
    let file = common::TempFile::new("reopen-stop", POOL_BYTES);
    flat("engine stop only", ROUNDS, |round| {
        let engine = common::start(common::cores(2));
        let (_pool, _vol) = open_and_use(&engine, file.path(), round);
        engine.stop();
    });
}

/// One engine for every round: a closed pool's base bdev leaves the engine's registry, so its
/// file is unlocked while the engine runs on.
#[test]
fn a_closed_pool_reopens_in_the_same_engine() {
    let file = common::TempFile::new("reopen-same", POOL_BYTES);
    let engine = common::start(common::cores(2));
    flat("same engine", ROUNDS, |round| {
        let (pool, vol) = open_and_use(&engine, file.path(), round);
        pool.close_volume(&engine, &vol).unwrap();
        pool.close(&engine).unwrap();
    });
    let handle = engine.add_bdev(base(file.path())).unwrap();
    engine.remove_bdev(&handle).unwrap();
    let stale = engine.queue(&handle, engine.cores()[0], 1);
    assert!(stale.is_err(), "a queue to a removed bdev: {stale:?}");
}

/// An exported volume with a connected client: removing the export, closing the pool and
/// shutting the server down release the sockets, the listener and connection threads, and the
/// file.
#[test]
fn removing_an_export_and_stopping_the_server_release_sockets() {
    let file = common::TempFile::new("reopen-nbd", POOL_BYTES);
    let engine = Arc::new(common::start(common::cores(2)));
    flat("nbd export", NBD_ROUNDS, |round| {
        let (pool, vol) = open_and_use(&engine, file.path(), round);
        let server = NbdServer::start(
            engine.clone(),
            NbdConfig {
                tcp: Some("127.0.0.1:0".parse().expect("address")),
                ..NbdConfig::default()
            },
        )
        .expect("server starts");
        server
            .add_export("v", &vol, ExportOptions::default())
            .unwrap();
        let ep = Endpoint::Tcp(server.tcp_addr().expect("tcp listener"));
        let mut client = Client::connect(&ep, "v", Options::default()).unwrap();
        let data = client.read(0, 4096).unwrap().expect("read succeeds");
        assert_eq!(data, vec![round as u8; 4096]);
        client.send_disc().unwrap();
        client.stream.drain_to_eof().unwrap();
        server.remove_export("v").unwrap();
        server.shutdown();
        pool.close_volume(&engine, &vol).unwrap();
        pool.close(&engine).unwrap();
    });
}
