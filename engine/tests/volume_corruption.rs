//! Damaged or foreign pools are refused with a message that says what is wrong, never a panic
//! and never a silent repair: a flipped superblock bit, both checkpoints damaged, a pool from a
//! newer format version, a device that is not a pool, a damaged newest checkpoint. A torn
//! newest header (what a crash mid-commit leaves) falls back to the older checkpoint. The
//! offline fsck reports the same problems.

mod common;

use cairn_engine::bdev::uring::{UringBdev, UringOptions};
use cairn_engine::volume::{self, format::Superblock, Pool, PoolError};
use cairn_engine::{Bdev, Engine};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

const POOL_BYTES: u64 = 32 << 20;

fn base(path: &std::path::Path) -> Arc<dyn Bdev> {
    Arc::new(UringBdev::open("file", path, UringOptions::default()).unwrap())
}

/// A pool file with one volume holding data, committed twice so both slots are valid.
fn make_pool() -> (common::TempFile, Superblock) {
    let file = common::TempFile::new("corrupt", POOL_BYTES);
    let engine = common::start(common::cores(1));
    let home = engine.cores()[0];
    let pool = Pool::create(&engine, "p", base(file.path()), home, 1 << 20).unwrap();
    pool.create_volume(&engine, "v", 4 << 20, vec![]).unwrap();
    let h = pool.open_volume(&engine, "v").unwrap();
    let mut q = engine.queue(&h, home, 4).unwrap();
    q.write_at(0, &[0xAB; 4096], false).unwrap();
    q.flush().unwrap();
    drop(q);
    pool.close_volume(&engine, &h).unwrap();
    pool.close(&engine).unwrap();
    engine.stop();
    let mut sb = vec![0u8; 4096];
    std::fs::File::open(file.path())
        .unwrap()
        .read_exact_at(&mut sb, 0)
        .unwrap();
    (file, Superblock::decode(&sb).unwrap())
}

fn flip(path: &std::path::Path, offset: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, offset).unwrap();
}

fn open(engine: &Engine, path: &std::path::Path) -> Result<Pool, PoolError> {
    Pool::open(engine, "p", base(path), engine.cores()[0])
}

/// Slot holding the newest checkpoint.
fn newest_slot(path: &std::path::Path) -> usize {
    volume::check_file(path).unwrap().slot
}

#[test]
fn flipped_superblock_bit_is_refused_by_open_and_fsck() {
    let (file, _) = make_pool();
    flip(file.path(), 50);
    let engine = common::start(common::cores(1));
    let e = open(&engine, file.path()).unwrap_err().to_string();
    assert!(e.contains("superblock") && e.contains("checksum"), "{e}");
    let e = volume::check_file(file.path()).unwrap_err().to_string();
    assert!(e.contains("checksum"), "{e}");
}

#[test]
fn newer_format_version_is_refused() {
    let (file, _) = make_pool();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(file.path())
        .unwrap();
    let mut sb = vec![0u8; 4096];
    f.read_exact_at(&mut sb, 0).unwrap();
    sb[8..12].copy_from_slice(&(volume::format::FORMAT_VERSION + 1).to_le_bytes());
    let crc = crc_of(&sb[..88]);
    sb[88..92].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&sb, 0).unwrap();
    let engine = common::start(common::cores(1));
    let e = open(&engine, file.path()).unwrap_err().to_string();
    assert!(e.contains("newer"), "{e}");
}

#[test]
fn both_checkpoint_headers_damaged_is_refused_with_both_reasons() {
    let (file, sb) = make_pool();
    for slot in sb.slot_offsets {
        flip(file.path(), slot + 20);
    }
    let engine = common::start(common::cores(1));
    let e = open(&engine, file.path()).unwrap_err();
    assert!(matches!(e, PoolError::NoCheckpoint { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("slot 0") && msg.contains("slot 1") && msg.contains("checksum"),
        "{msg}"
    );
    assert!(volume::check_file(file.path()).is_err());
}

#[test]
fn torn_newest_header_falls_back_to_the_older_checkpoint() {
    let (file, sb) = make_pool();
    let newest = newest_slot(file.path());
    let newest_seq = volume::check_file(file.path()).unwrap().seq;
    // The header block is written last; a crash tearing it leaves the slot without a valid header.
    flip(file.path(), sb.slot_offsets[newest] + 20);
    let r = volume::check_file(file.path()).unwrap();
    assert_eq!(r.seq, newest_seq - 1);
    assert!(r.problems.is_empty());
    let engine = common::start(common::cores(1));
    let pool = open(&engine, file.path()).expect("the older checkpoint opens");
    pool.check(&engine).unwrap();
}

#[test]
fn damaged_newest_payload_is_refused_not_rolled_back() {
    let (file, sb) = make_pool();
    let newest = newest_slot(file.path());
    flip(file.path(), sb.slot_offsets[newest] + 100);
    let engine = common::start(common::cores(1));
    let e = open(&engine, file.path()).unwrap_err().to_string();
    assert!(e.contains("damaged") && e.contains("refusing"), "{e}");
    assert!(volume::check_file(file.path()).is_err());
}

#[test]
fn a_device_that_is_not_a_pool_is_refused() {
    let file = common::TempFile::new("notapool", POOL_BYTES);
    let engine = common::start(common::cores(1));
    let e = open(&engine, file.path()).unwrap_err().to_string();
    assert!(e.contains("bad magic"), "{e}");
}

#[test]
fn fsck_finds_a_leaked_and_a_doubly_owned_cluster() {
    use volume::format::{Checkpoint, ObjectKind, ObjectRecord};
    let sb = Superblock::layout(64 << 20, 4096, 1 << 20, [1; 16]).unwrap();
    let vol = |id, name: &str, mappings| ObjectRecord {
        id,
        uuid: [id as u8; 16],
        kind: ObjectKind::Volume,
        parent: 0,
        size_bytes: 8 << 20,
        name: name.into(),
        labels: vec![],
        mappings,
    };
    let mut bitmap = vec![0u8; sb.cluster_count.div_ceil(8) as usize];
    bitmap[0] = 0b0000_0111; // clusters 0, 1, 2 marked; 2 is referenced by nobody
    let c = Checkpoint {
        seq: 5,
        pool_uuid: [1; 16],
        next_object_id: 3,
        objects: vec![vol(1, "a", vec![(0, 0), (1, 1)]), vol(2, "b", vec![(0, 1)])],
        bitmap,
    };
    let problems = volume::meta::check_checkpoint(&sb, &c).unwrap_err();
    let all = problems.join("\n");
    assert!(all.contains("cluster 2 leaked"), "{all}");
    assert!(all.contains("cluster 1 owned twice"), "{all}");
}

/// crc32c (Castagnoli), bitwise: the test's own reference, independent of the crate.
fn crc_of(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn an_exclusive_open_is_refused_while_another_holds_the_file() {
    let file = common::TempFile::new("locked", 16 << 20);
    let opts = UringOptions {
        exclusive: true,
        ..UringOptions::default()
    };
    let first = UringBdev::open("a", file.path(), opts.clone()).unwrap();
    let e = UringBdev::open("b", file.path(), opts.clone())
        .unwrap_err()
        .to_string();
    assert!(e.contains("in use by another process"), "{e}");
    drop(first);
    UringBdev::open("c", file.path(), opts).expect("the lock goes with the holder");
}
