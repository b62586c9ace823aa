//! Guards that deleted data does not stay readable in the pool file (issue 16: after a
//! volume was deleted its plaintext could still be read from `pool0.img`): deleting a
//! volume, or a snapshot whose clusters the volume no longer shares, discards the freed
//! clusters on the base device (a punched hole in a file), so the pattern written is gone
//! from the file and the file's allocated blocks go down, before the clusters are reused.

mod common;

use cairn_engine::bdev::uring::{UringBdev, UringOptions};
use cairn_engine::volume::Pool;
use cairn_engine::{Bdev, Engine};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
/// Pool file size; sparse, so only written clusters take blocks.
const POOL_BYTES: u64 = 64 * MIB;
/// Data written to each volume: whole clusters, so every one is freed by the delete.
const DATA_BYTES: u64 = 8 * MIB;
/// Longest the freed clusters may take to come back (only turns a hang into a failure).
const RELEASE_TIMEOUT: Duration = Duration::from_secs(60);

/// A 4 KiB block that says what it is, findable in the raw file.
fn pattern(tag: &str) -> Vec<u8> {
    format!("CAIRN-DISCARD-{tag}-")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(4096)
        .collect()
}

fn file_holds(path: &Path, needle: &[u8]) -> bool {
    let bytes = std::fs::read(path).expect("read pool file");
    bytes.windows(needle.len()).any(|w| w == needle)
}

/// 512-byte blocks the file has allocated.
fn blocks(path: &Path) -> u64 {
    std::fs::metadata(path).expect("stat pool file").blocks()
}

fn write_volume(engine: &Engine, pool: &Pool, name: &str, block: &[u8]) {
    let h = pool.open_volume(engine, name).unwrap();
    let core = *engine.cores().last().unwrap();
    let mut q = engine.queue(&h, core, 8).unwrap();
    for off in (0..DATA_BYTES).step_by(block.len()) {
        q.write_at(off, block, false).unwrap();
    }
    q.flush().unwrap();
    drop(q);
    pool.close_volume(engine, &h).unwrap();
}

/// Waits until the pool has `free` free clusters again: released, so discarded.
fn wait_free(engine: &Engine, pool: &Pool, free: u64) {
    let until = Instant::now() + RELEASE_TIMEOUT;
    loop {
        let now_free = pool.space(engine).unwrap().free_clusters;
        if now_free == free {
            return;
        }
        assert!(
            Instant::now() < until,
            "freed clusters never released: {now_free} free, expected {free}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn deleting_volumes_and_snapshots_punches_their_data_out_of_the_pool_file() {
    let file = common::TempFile::new("discard", POOL_BYTES);
    let engine = common::start(common::cores(1));
    let home = engine.cores()[0];
    let base: Arc<dyn Bdev> =
        Arc::new(UringBdev::open("base", file.path(), UringOptions::default()).unwrap());
    assert!(
        base.info().can_trim,
        "a file bdev discards by punching holes"
    );
    let pool = Pool::create(&engine, "p", base, home, MIB as u32).unwrap();
    let free = pool.space(&engine).unwrap().free_clusters;

    let secret = pattern("volume");
    pool.create_volume(&engine, "v", DATA_BYTES, vec![])
        .unwrap();
    write_volume(&engine, &pool, "v", &secret);
    let written = blocks(file.path());
    assert!(
        file_holds(file.path(), &secret),
        "the pattern reached the file"
    );
    pool.delete(&engine, "v").unwrap();
    wait_free(&engine, &pool, free);
    let after = blocks(file.path());
    println!("pool file blocks: {written} with the volume, {after} after its delete");
    assert!(
        !file_holds(file.path(), &secret),
        "the deleted volume's data is still in the pool file"
    );
    assert!(
        written - after >= DATA_BYTES / 512,
        "allocated blocks went from {written} to {after}: the space was not given back"
    );

    // A snapshot's own clusters: written before it, overwritten after (copy-on-write), so
    // deleting the snapshot frees the only copy of the old data.
    let old = pattern("snapshot");
    pool.create_volume(&engine, "w", DATA_BYTES, vec![])
        .unwrap();
    write_volume(&engine, &pool, "w", &old);
    pool.snapshot(&engine, "w", "s").unwrap();
    write_volume(&engine, &pool, "w", &pattern("current"));
    assert!(
        file_holds(file.path(), &old),
        "the snapshot holds the old data"
    );
    let in_use = pool.space(&engine).unwrap().free_clusters;
    pool.delete(&engine, "s").unwrap();
    wait_free(&engine, &pool, in_use + DATA_BYTES / MIB);
    assert!(
        !file_holds(file.path(), &old),
        "the deleted snapshot's data is still in the pool file"
    );
    assert!(
        file_holds(file.path(), &pattern("current")),
        "the volume's own data stayed"
    );
    pool.check(&engine).unwrap();
}
