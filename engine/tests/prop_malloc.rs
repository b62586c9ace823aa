//! Property test: any sequence of write, read, trim, write-zeroes and flush requests through
//! `IoQueue` leaves a malloc bdev holding exactly what a plain `Vec<u8>` model says. After
//! every step `check()` reads the touched range back (and every read is compared as it
//! happens); at the end the whole device is compared.
//!
//! Lengths go up to twice the queue buffer size, so `read_at`/`write_at` splitting requests
//! into buffer-sized pieces is covered, and trims and write-zeroes may cover the whole device.
//! Guards against: wrong offsets or lengths anywhere between the queue and the bdev, and
//! trim or write-zeroes touching bytes outside their range.

mod common;

use cairn_engine::bdev::malloc::MallocBdev;
use cairn_engine::{Engine, IoQueue};
use proptest::prelude::*;
use std::sync::Arc;

const BLOCK: u64 = 512;
const DEVICE_BLOCKS: u64 = 2048;
/// Longest read or write in blocks: 2 x 128 KiB, so sync helpers split it in two.
const DATA_BLOCKS_MAX: u64 = 512;

#[derive(Clone, Debug)]
enum Op {
    Write {
        block: u64,
        blocks: u64,
        seed: u64,
        fua: bool,
    },
    Read {
        block: u64,
        blocks: u64,
    },
    Trim {
        block: u64,
        blocks: u64,
    },
    WriteZeroes {
        block: u64,
        blocks: u64,
    },
    Flush,
}

/// A range that fits the device, at most `max_blocks` long.
fn range(max_blocks: u64) -> impl Strategy<Value = (u64, u64)> {
    (0..DEVICE_BLOCKS).prop_flat_map(move |block| {
        let room = (DEVICE_BLOCKS - block).min(max_blocks);
        (Just(block), 1..=room)
    })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(DATA_BLOCKS_MAX), any::<u64>(), any::<bool>())
            .prop_map(|((block, blocks), seed, fua)| Op::Write { block, blocks, seed, fua }),
        3 => range(DATA_BLOCKS_MAX).prop_map(|(block, blocks)| Op::Read { block, blocks }),
        1 => range(DEVICE_BLOCKS).prop_map(|(block, blocks)| Op::Trim { block, blocks }),
        1 => range(DEVICE_BLOCKS).prop_map(|(block, blocks)| Op::WriteZeroes { block, blocks }),
        1 => Just(Op::Flush),
    ]
}

/// Field order matters: the queue drops before the engine when a case fails early.
struct Harness {
    q: IoQueue,
    engine: Engine,
    model: Vec<u8>,
}

impl Harness {
    fn new() -> Harness {
        let engine = common::start(common::cores(1));
        let size = DEVICE_BLOCKS * BLOCK;
        let bdev = MallocBdev::new("prop-m", size, BLOCK as u32).expect("malloc bdev");
        let handle = engine.add_bdev(Arc::new(bdev)).expect("add bdev");
        let q = engine.queue(&handle, engine.cores()[0], 4).expect("queue");
        Harness {
            q,
            engine,
            model: vec![0; size as usize],
        }
    }

    /// Applies one op to the device and the model; returns the byte range it touched.
    fn apply(&mut self, op: &Op) -> Result<Option<(usize, usize)>, TestCaseError> {
        let span = |block: u64, blocks: u64| ((block * BLOCK) as usize, (blocks * BLOCK) as usize);
        match *op {
            Op::Write {
                block,
                blocks,
                seed,
                fua,
            } => {
                let (at, len) = span(block, blocks);
                let mut data = vec![0u8; len];
                common::Rng::new(seed).fill(&mut data);
                self.q.write_at(at as u64, &data, fua).expect("write_at");
                self.model[at..at + len].copy_from_slice(&data);
                Ok(Some((at, len)))
            }
            Op::Read { block, blocks } => {
                let (at, len) = span(block, blocks);
                self.compare(at, len)?;
                Ok(None)
            }
            Op::Trim { block, blocks } => {
                let (at, len) = span(block, blocks);
                self.q.trim(at as u64, len as u32).expect("trim");
                self.model[at..at + len].fill(0);
                Ok(Some((at, len)))
            }
            Op::WriteZeroes { block, blocks } => {
                let (at, len) = span(block, blocks);
                self.q
                    .write_zeroes(at as u64, len as u32)
                    .expect("write_zeroes");
                self.model[at..at + len].fill(0);
                Ok(Some((at, len)))
            }
            Op::Flush => {
                self.q.flush().expect("flush");
                Ok(None)
            }
        }
    }

    /// Reads `len` bytes at `at` in pieces no larger than a read request may be and compares
    /// them with the model.
    fn compare(&mut self, at: usize, len: usize) -> Result<(), TestCaseError> {
        let piece = (DATA_BLOCKS_MAX * BLOCK) as usize;
        let mut got = vec![0u8; len];
        for (i, part) in got.chunks_mut(piece).enumerate() {
            self.q
                .read_at((at + i * piece) as u64, part)
                .expect("read_at");
        }
        let want = &self.model[at..at + len];
        if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
            return Err(TestCaseError::fail(format!(
                "device offset {}: got {:#04x}, model says {:#04x}",
                at + i,
                got[i],
                want[i]
            )));
        }
        Ok(())
    }

    /// The invariant after every step: the touched range reads back as the model says, and
    /// so do the blocks on either side of it (nothing spilled over its edges).
    fn check(&mut self, touched: Option<(usize, usize)>) -> Result<(), TestCaseError> {
        let Some((at, len)) = touched else {
            return Ok(());
        };
        let block = BLOCK as usize;
        let lo = at.saturating_sub(block);
        let hi = (at + len + block).min(self.model.len());
        self.compare(lo, hi - lo)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn malloc_matches_a_byte_model(ops in proptest::collection::vec(op(), 1..40)) {
        let mut h = Harness::new();
        for op in &ops {
            let touched = h.apply(op)?;
            h.check(touched)?;
        }
        let len = h.model.len();
        h.compare(0, len)?;
        let Harness { engine, q, .. } = h;
        drop(q);
        engine.stop();
    }
}
