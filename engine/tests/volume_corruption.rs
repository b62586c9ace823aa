//! Damaged or foreign pools are refused with a message that says what is wrong, never a panic
//! and never a silent repair: a flipped superblock bit, every checkpoint header damaged, a pool
//! from a newer or an older format version, a device that is not a pool, a damaged newest
//! checkpoint. The offline fsck reports the same problems.
//!
//! One damaged block never loses flushed data (issue 16): one flipped bit in the newest
//! header's magic and seq once made the pool open on the previous checkpoint, silently
//! dropping a volume's flushed data, with `cairn-pool check` exiting 0. Every header is now
//! written twice; every single-block corruption of the metadata area (bits flipped, or the
//! block zeroed) either leaves the flushed data readable or makes open and the fsck fail. A
//! fall back that two damaged blocks force is reported as a rollback naming the lost seq.

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
    q.write_at(0, &DATA, false).unwrap();
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

/// The volume's block that `make_pool` wrote and flushed.
const DATA: [u8; 4096] = [0xAB; 4096];

/// Flips one bit in every seventh byte of `len` bytes at `offset`, starting with the first.
fn flip_span(path: &std::path::Path, offset: u64, len: u64) {
    for at in (offset..offset + len).step_by(7) {
        flip(path, at);
    }
}

/// Opens the pool and reads the volume's first block back; the error when open fails.
fn open_and_read(engine: &Engine, path: &std::path::Path) -> Result<Vec<u8>, PoolError> {
    let pool = open(engine, path)?;
    let home = engine.cores()[0];
    let h = pool.open_volume(engine, "v").unwrap();
    let mut q = engine.queue(&h, home, 4).unwrap();
    let mut back = vec![0u8; DATA.len()];
    q.read_at(0, &mut back).unwrap();
    drop(q);
    pool.close_volume(engine, &h).unwrap();
    pool.close(engine).unwrap();
    Ok(back)
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
fn an_old_format_version_is_refused_naming_it() {
    let (file, _) = make_pool();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(file.path())
        .unwrap();
    let mut sb = vec![0u8; 4096];
    f.read_exact_at(&mut sb, 0).unwrap();
    sb[8..12].copy_from_slice(&1u32.to_le_bytes());
    let crc = crc_of(&sb[..88]);
    sb[88..92].copy_from_slice(&crc.to_le_bytes());
    f.write_all_at(&sb, 0).unwrap();
    let engine = common::start(common::cores(1));
    let e = open(&engine, file.path()).unwrap_err().to_string();
    assert!(e.contains("format version 1 is older"), "{e}");
    let e = volume::check_file(file.path()).unwrap_err().to_string();
    assert!(e.contains("format version 1 is older"), "{e}");
}

#[test]
fn every_checkpoint_header_damaged_is_refused_with_every_reason() {
    let (file, sb) = make_pool();
    for slot in 0..2 {
        for at in sb.header_offsets(slot) {
            flip(file.path(), at + 20);
        }
    }
    let engine = common::start(common::cores(1));
    let e = open(&engine, file.path()).unwrap_err();
    assert!(matches!(e, PoolError::NoCheckpoint { .. }), "{e}");
    let msg = e.to_string();
    for slot in 0..2 {
        for copy in 0..2 {
            let want = format!("slot {slot} copy {copy}: metadata checkpoint header: checksum");
            assert!(msg.contains(&want), "{msg}");
        }
    }
    assert!(volume::check_file(file.path()).is_err());
}

/// The replayed attack: one bit flipped in the magic and one in the seq of the newest
/// header, in either copy. The other copy keeps the newest checkpoint: the data reads back,
/// the fsck reports the damaged copy (exit 1) but no rollback, and open rewrites the copy.
#[test]
fn a_flipped_magic_and_seq_in_one_header_copy_loses_nothing() {
    for copy in 0..2 {
        let (file, sb) = make_pool();
        let newest = newest_slot(file.path());
        let newest_seq = volume::check_file(file.path()).unwrap().seq;
        let at = sb.header_offsets(newest)[copy];
        flip(file.path(), at + 2);
        flip(file.path(), at + 16);
        let r = volume::check_file(file.path()).unwrap();
        assert_eq!(
            (r.seq, r.lost_seq),
            (newest_seq, None),
            "copy {copy}: {r:?}"
        );
        let named = format!("slot {newest} copy {copy}");
        assert!(
            r.problems
                .iter()
                .any(|p| p.contains(&named) && p.contains("bad magic")),
            "copy {copy}: the fsck did not report the damaged copy: {r:?}"
        );
        let engine = common::start(common::cores(1));
        assert!(open_and_read(&engine, file.path()).unwrap() == DATA);
        engine.stop();
        let r = volume::check_file(file.path()).unwrap();
        assert!(
            r.problems.is_empty(),
            "open did not repair copy {copy}: {r:?}"
        );
        assert_eq!(r.seq, newest_seq);
    }
}

/// Both copies of the newest header damaged (two blocks): the pool falls back to the older
/// checkpoint, and the fsck says so: a rollback naming the lost seq, exit 1.
#[test]
fn a_rollback_past_a_damaged_newest_header_is_reported() {
    let (file, sb) = make_pool();
    let newest = newest_slot(file.path());
    let newest_seq = volume::check_file(file.path()).unwrap().seq;
    for at in sb.header_offsets(newest) {
        flip(file.path(), at + 2);
    }
    let r = volume::check_file(file.path()).unwrap();
    assert_eq!(
        (r.seq, r.lost_seq),
        (newest_seq - 1, Some(newest_seq)),
        "{r:?}"
    );
    let lost = format!("seq {newest_seq}");
    assert!(
        r.problems
            .iter()
            .any(|p| p.contains("ROLLBACK") && p.contains(&lost)),
        "{r:?}"
    );
}

#[test]
fn damaged_newest_payload_is_refused_not_rolled_back() {
    let (file, sb) = make_pool();
    let newest = newest_slot(file.path());
    flip(file.path(), sb.payload_offset(newest) + 100);
    let engine = common::start(common::cores(1));
    let e = open(&engine, file.path()).unwrap_err().to_string();
    assert!(e.contains("damaged") && e.contains("refusing"), "{e}");
    assert!(volume::check_file(file.path()).is_err());
}

/// Each block of the metadata area in turn, with bits flipped across it, then zeroed: open
/// either fails (and the fsck fails too) or the volume's flushed block reads back intact.
/// Never a pool that opens with the data gone.
#[test]
fn no_single_damaged_metadata_block_silently_loses_flushed_data() {
    let (file, sb) = make_pool();
    let mut pristine = vec![0u8; sb.data_offset_bytes as usize];
    std::fs::File::open(file.path())
        .unwrap()
        .read_exact_at(&mut pristine, 0)
        .unwrap();
    let write_at = |bytes: &[u8], at: u64| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(file.path())
            .unwrap()
            .write_all_at(bytes, at)
            .unwrap();
    };
    let engine = common::start(common::cores(1));
    let (mut opened, mut refused) = (0, 0);
    for block in 0..sb.data_offset_bytes / 4096 {
        let at = block * 4096;
        for zeroed in [false, true] {
            if zeroed {
                write_at(&[0u8; 4096], at);
            } else {
                flip_span(file.path(), at, 4096);
            }
            let what = format!("block {block} (byte {at}), zeroed {zeroed}");
            match open_and_read(&engine, file.path()) {
                Ok(back) => {
                    assert!(
                        back == DATA,
                        "{what}: the pool opened with the flushed data gone"
                    );
                    opened += 1;
                }
                Err(e) => {
                    let fsck = volume::check_file(file.path());
                    assert!(
                        fsck.as_ref().map_or(true, |r| !r.problems.is_empty()),
                        "{what}: open failed ({e}) but the fsck found nothing: {fsck:?}"
                    );
                    refused += 1;
                }
            }
            write_at(&pristine, 0);
        }
    }
    println!("{opened} damaged blocks opened with the data intact, {refused} refused");
    assert!(
        refused > 0 && opened > 0,
        "the sweep hit both kinds of block"
    );
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
