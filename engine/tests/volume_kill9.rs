//! Real crashes: a child process writes stamped blocks to a volume on a pool file, flushing
//! every few writes and reporting each flushed sequence number; the parent `kill -9`s it at a
//! random moment, runs the offline fsck on the file, reopens the pool and checks that every
//! block holds the last acknowledged-and-flushed write to it or a later one, never older data
//! and never garbage. Fifty iterations on one pool file, so damage would accumulate.

mod common;

use cairn_engine::bdev::uring::{UringBdev, UringOptions};
use cairn_engine::volume::{self, Pool};
use cairn_engine::{Bdev, Engine};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;

const POOL_ENV: &str = "CAIRN_KILL9_POOL";
const POOL_BYTES: u64 = 64 << 20;
const VOLUME_BYTES: u64 = 8 << 20;
const BLOCK: u64 = 4096;
const BLOCKS: u64 = VOLUME_BYTES / BLOCK;
const FLUSH_EVERY: u64 = 8;
const ITERATIONS: u32 = 50;
const STAMP_MAGIC: u64 = 0xCA1_4B11_57A3_9000;

/// A block's content: magic, sequence, block index, then a pattern derived from both.
fn stamp(seq: u64, block: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    b[0..8].copy_from_slice(&STAMP_MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    b[16..24].copy_from_slice(&block.to_le_bytes());
    for (i, x) in b[24..].iter_mut().enumerate() {
        *x = (seq as u8).wrapping_mul(31).wrapping_add(i as u8) ^ block as u8;
    }
    b
}

/// The sequence number a block holds, None for zeros, or a panic for anything else.
fn read_stamp(b: &[u8], block: u64) -> Option<u64> {
    if b.iter().all(|&x| x == 0) {
        return None;
    }
    let seq = u64::from_le_bytes(b[8..16].try_into().unwrap());
    assert_eq!(
        b,
        stamp(seq, block).as_slice(),
        "block {block} holds garbage (not a whole stamped write)"
    );
    Some(seq)
}

/// Block written by sequence number `seq` (1-based): a fixed scatter over the volume.
fn block_of(seq: u64) -> u64 {
    (seq.wrapping_mul(2_654_435_761)) % BLOCKS
}

fn engine() -> Engine {
    common::start(common::cores(1))
}

fn open_pool(engine: &Engine, path: &std::path::Path) -> Pool {
    let base: Arc<dyn Bdev> =
        Arc::new(UringBdev::open("file", path, UringOptions::default()).unwrap());
    Pool::open(engine, "p", base, engine.cores()[0]).unwrap()
}

/// The child: writes forever from `start_seq`, printing the last flushed sequence number.
#[test]
fn kill9_child_writer() {
    let Ok(path) = std::env::var(POOL_ENV) else {
        return;
    };
    let start: u64 = std::env::var("CAIRN_KILL9_START").unwrap().parse().unwrap();
    let engine = engine();
    let pool = open_pool(&engine, std::path::Path::new(&path));
    let h = pool.open_volume(&engine, "v").unwrap();
    let mut q = engine.queue(&h, engine.cores()[0], 4).unwrap();
    let mut out = std::io::stdout();
    for seq in start.. {
        q.write_at(block_of(seq) * BLOCK, &stamp(seq, block_of(seq)), false)
            .unwrap();
        if seq % FLUSH_EVERY == 0 {
            q.flush().unwrap();
            use std::io::Write;
            writeln!(out, "acked {seq}").unwrap();
            out.flush().unwrap();
        }
    }
}

#[test]
fn kill9_loop_keeps_every_flushed_write() {
    if std::env::var(POOL_ENV).is_ok() {
        return;
    }
    let file = common::TempFile::new("kill9", POOL_BYTES);
    {
        let engine = engine();
        let base: Arc<dyn Bdev> =
            Arc::new(UringBdev::open("file", file.path(), UringOptions::default()).unwrap());
        let pool = Pool::create(&engine, "p", base, engine.cores()[0], 1 << 20).unwrap();
        pool.create_volume(&engine, "v", VOLUME_BYTES, vec![])
            .unwrap();
    }
    let mut rng = common::Rng::new(0x9e11);
    // For every block: the sequence number of the last acknowledged-and-flushed write to it.
    let mut durable: Vec<Option<u64>> = vec![None; BLOCKS as usize];
    let mut next_seq = 1;
    for iteration in 0..ITERATIONS {
        let acks_wanted = rng.range(1, 12);
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "kill9_child_writer",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(POOL_ENV, file.path())
            .env("CAIRN_KILL9_START", next_seq.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut last_ack = None;
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for line in lines.map_while(Result::ok) {
            if let Some(n) = line.strip_prefix("acked ") {
                last_ack = Some(n.parse::<u64>().unwrap());
                if rng.range(1, acks_wanted) == 1 {
                    break;
                }
            }
        }
        // SAFETY: kill with a pid we spawned and have not reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
        let last_ack =
            last_ack.unwrap_or_else(|| panic!("iteration {iteration}: child acknowledged nothing"));
        for seq in next_seq..=last_ack {
            durable[block_of(seq) as usize] = Some(seq);
        }

        let report = volume::check_file(file.path()).unwrap();
        assert!(
            report.problems.is_empty(),
            "iteration {iteration}: fsck: {:?}",
            report.problems
        );
        let engine = engine();
        let pool = open_pool(&engine, file.path());
        pool.check(&engine).unwrap();
        let h = pool.open_volume(&engine, "v").unwrap();
        let mut q = engine.queue(&h, engine.cores()[0], 4).unwrap();
        let mut seen_max = last_ack;
        for block in 0..BLOCKS {
            let mut b = vec![0u8; BLOCK as usize];
            q.read_at(block * BLOCK, &mut b).unwrap();
            let got = read_stamp(&b, block);
            if let Some(want) = durable[block as usize] {
                let got = got.unwrap_or_else(|| {
                    panic!("iteration {iteration}: block {block} lost flushed write {want}")
                });
                assert!(
                    got >= want,
                    "iteration {iteration}: block {block} went back from {want} to {got}"
                );
                seen_max = seen_max.max(got);
            }
        }
        // Writes after the last ack may have survived; the next child starts past them all.
        next_seq = seen_max + FLUSH_EVERY * 64;
        next_seq -= next_seq % FLUSH_EVERY;
        next_seq += 1;
    }
}
