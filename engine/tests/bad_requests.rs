//! Bad requests are typed errors, never panics or silent successes, and never poison the
//! engine: each kind of bad I/O request returns its own `IoError` from `IoQueue::submit`,
//! `IoQueue::submit_raw` and the synchronous helpers (with the caller's buffer handed back),
//! bad engine calls return their own `EngineError`, bad bdev parameters their own
//! `BdevError`, and the engine keeps serving good requests afterwards.
//!
//! Guards against: validation that lets a request reach a channel (which assumes it is valid),
//! offset + length overflowing u64 and wrapping into range, buffers lost on refusal, and
//! sync helpers doing part of a request before refusing the rest.
//!
//! Bug found here: `write_at` with a good head and a misaligned or out-of-range tail wrote the
//! head before refusing the tail, and an empty `read_at`/`write_at` reported success; both now
//! refuse the whole span up front.

mod common;

use cairn_engine::bdev::malloc::MallocBdev;
use cairn_engine::bdev::null::NullBdev;
use cairn_engine::bdev::uring::{UringBdev, UringOptions};
use cairn_engine::bdev::BdevError;
use cairn_engine::dma::IoBuf;
use cairn_engine::engine::QUEUE_DEPTH_MAX;
use cairn_engine::{
    BdevHandle, BufId, CoreId, CoreList, Engine, EngineConfig, EngineError, IoError, IoOp, IoQueue,
    Request,
};
use common::{Rng, TempFile};
use std::alloc::Layout;
use std::sync::Arc;

const MALLOC_BYTES: u64 = 64 << 20;
const BLOCK: u32 = 512;

fn req(op: IoOp, offset_bytes: u64, len_bytes: u32, buf: Option<BufId>) -> Request {
    Request {
        op,
        offset_bytes,
        len_bytes,
        buf,
        fua: false,
        user_data: 7,
    }
}

/// Submits `r`, expects it refused with `want`, and checks the buffer came back.
#[track_caller]
fn expect_refused(q: &mut IoQueue, r: Request, want: IoError) {
    let had_buf = r.buf.is_some();
    match q.submit(r) {
        Ok(()) => panic!("request accepted; wanted {want}"),
        Err((got, buf)) => {
            assert_eq!(got, want);
            assert_eq!(
                buf.is_some(),
                had_buf,
                "a refused request hands its buffer back"
            );
            if let Some(b) = buf {
                q.free_buf(b);
            }
        }
    }
    assert_eq!(q.in_flight(), 0, "a refused request takes no slot");
}

/// The engine still reads and writes correctly through `q`.
#[track_caller]
fn still_serves(q: &mut IoQueue, offset_bytes: u64) {
    let mut data = vec![0u8; 8192];
    Rng::new(offset_bytes).fill(&mut data);
    q.write_at(offset_bytes, &data, false).expect("good write");
    let mut got = vec![0u8; data.len()];
    q.read_at(offset_bytes, &mut got).expect("good read");
    assert_eq!(got, data, "good request after bad ones");
}

fn malloc_engine() -> (Engine, BdevHandle) {
    let engine = common::start(common::cores(1));
    let bdev = MallocBdev::new("bad-m", MALLOC_BYTES, BLOCK).expect("malloc bdev");
    let handle = engine.add_bdev(Arc::new(bdev)).expect("add bdev");
    (engine, handle)
}

fn first_core(engine: &Engine) -> CoreId {
    engine.cores()[0]
}

#[test]
fn each_bad_submit_has_its_own_error() {
    let (engine, handle) = malloc_engine();
    let mut q = engine
        .queue(&handle, first_core(&engine), 8)
        .expect("queue");
    let name = || "bad-m".to_string();
    let b = q.alloc_buf().expect("buffer");
    expect_refused(
        &mut q,
        req(IoOp::Read, 0, 0, Some(b)),
        IoError::ZeroLength { op: IoOp::Read },
    );
    expect_refused(
        &mut q,
        req(IoOp::Trim, 0, 0, None),
        IoError::ZeroLength { op: IoOp::Trim },
    );
    let b = q.alloc_buf().expect("buffer");
    expect_refused(
        &mut q,
        req(IoOp::Write, 100, BLOCK, Some(b)),
        IoError::Misaligned {
            op: IoOp::Write,
            offset_bytes: 100,
            len_bytes: BLOCK,
            block_size_bytes: BLOCK,
        },
    );
    let b = q.alloc_buf().expect("buffer");
    expect_refused(
        &mut q,
        req(IoOp::Read, 0, BLOCK + 1, Some(b)),
        IoError::Misaligned {
            op: IoOp::Read,
            offset_bytes: 0,
            len_bytes: BLOCK + 1,
            block_size_bytes: BLOCK,
        },
    );
    let b = q.alloc_buf().expect("buffer");
    expect_refused(
        &mut q,
        req(IoOp::Read, MALLOC_BYTES, BLOCK, Some(b)),
        IoError::OutOfRange {
            op: IoOp::Read,
            offset_bytes: MALLOC_BYTES,
            len_bytes: BLOCK,
            bdev: name(),
            size_bytes: MALLOC_BYTES,
        },
    );
    let b = q.alloc_buf().expect("buffer");
    expect_refused(
        &mut q,
        req(
            IoOp::Write,
            MALLOC_BYTES - u64::from(BLOCK),
            2 * BLOCK,
            Some(b),
        ),
        IoError::OutOfRange {
            op: IoOp::Write,
            offset_bytes: MALLOC_BYTES - u64::from(BLOCK),
            len_bytes: 2 * BLOCK,
            bdev: name(),
            size_bytes: MALLOC_BYTES,
        },
    );
    // offset + len overflows u64: it must not wrap around into range.
    let near_max = u64::MAX - u64::from(BLOCK) + 1;
    let b = q.alloc_buf().expect("buffer");
    expect_refused(
        &mut q,
        req(IoOp::Write, near_max, 2 * BLOCK, Some(b)),
        IoError::OutOfRange {
            op: IoOp::Write,
            offset_bytes: near_max,
            len_bytes: 2 * BLOCK,
            bdev: name(),
            size_bytes: MALLOC_BYTES,
        },
    );
    expect_refused(
        &mut q,
        req(IoOp::WriteZeroes, near_max, BLOCK, None),
        IoError::OutOfRange {
            op: IoOp::WriteZeroes,
            offset_bytes: near_max,
            len_bytes: BLOCK,
            bdev: name(),
            size_bytes: MALLOC_BYTES,
        },
    );
    let too_large = (33 << 20) as u32;
    let max_bytes = cairn_engine::bdev::malloc::MALLOC_IO_MAX_BYTES;
    let b = q.alloc_buf().expect("buffer");
    expect_refused(
        &mut q,
        req(IoOp::Read, 0, too_large, Some(b)),
        IoError::TooLarge {
            op: IoOp::Read,
            len_bytes: too_large,
            max_bytes,
        },
    );
    expect_refused(
        &mut q,
        req(IoOp::Write, 0, BLOCK, None),
        IoError::NoBuffer { op: IoOp::Write },
    );
    expect_refused(
        &mut q,
        req(IoOp::Read, 0, BLOCK, None),
        IoError::NoBuffer { op: IoOp::Read },
    );
    let b = q.alloc_buf().expect("buffer");
    let buf_len_bytes = q.buf_size_bytes();
    expect_refused(
        &mut q,
        req(IoOp::Write, 0, 2 * buf_len_bytes, Some(b)),
        IoError::BufferTooSmall {
            op: IoOp::Write,
            len_bytes: 2 * buf_len_bytes,
            buf_len_bytes,
        },
    );
    still_serves(&mut q, 4096);
    drop(q);
    engine.stop();
}

#[test]
fn sync_helpers_refuse_bad_requests_with_typed_errors() {
    let (engine, handle) = malloc_engine();
    let mut q = engine
        .queue(&handle, first_core(&engine), 4)
        .expect("queue");
    let mut small = vec![0u8; BLOCK as usize];
    assert!(matches!(
        q.read_at(1, &mut small),
        Err(IoError::Misaligned { .. })
    ));
    assert!(matches!(
        q.write_at(0, &small[..100], false),
        Err(IoError::Misaligned { .. })
    ));
    assert!(matches!(
        q.read_at(MALLOC_BYTES, &mut small),
        Err(IoError::OutOfRange { .. })
    ));
    assert!(matches!(
        q.write_at(u64::MAX - u64::from(BLOCK) + 1, &small, true),
        Err(IoError::OutOfRange { .. })
    ));
    assert_eq!(q.trim(0, 0), Err(IoError::ZeroLength { op: IoOp::Trim }));
    assert_eq!(
        q.write_zeroes(0, 0),
        Err(IoError::ZeroLength {
            op: IoOp::WriteZeroes
        })
    );
    assert!(matches!(q.trim(3, BLOCK), Err(IoError::Misaligned { .. })));
    assert!(matches!(
        q.write_zeroes(MALLOC_BYTES, BLOCK),
        Err(IoError::OutOfRange { .. })
    ));
    assert_eq!(q.in_flight(), 0);
    // Refusals must not leak the buffers the helpers took: all 4 are still there.
    let bufs: Vec<BufId> = (0..4).map(|_| q.alloc_buf().expect("buffer")).collect();
    bufs.into_iter().for_each(|b| q.free_buf(b));
    still_serves(&mut q, 0);
    drop(q);
    engine.stop();
}

#[test]
fn sync_helpers_refuse_a_bad_tail_before_writing_anything() {
    let (engine, handle) = malloc_engine();
    let mut q = engine
        .queue(&handle, first_core(&engine), 4)
        .expect("queue");
    let chunk = q.buf_size_bytes() as usize;
    // Two good buffer-sized pieces and a misaligned tail: nothing may be written.
    let data = vec![0xEEu8; 2 * chunk + 100];
    assert!(matches!(
        q.write_at(0, &data, false),
        Err(IoError::Misaligned { .. })
    ));
    // A write that runs off the end of the device after its first piece.
    let at = MALLOC_BYTES - chunk as u64;
    assert!(matches!(
        q.write_at(at, &data[..2 * chunk], false),
        Err(IoError::OutOfRange { .. })
    ));
    let mut got = vec![0xFFu8; 2 * chunk];
    q.read_at(0, &mut got).expect("read start");
    assert!(got.iter().all(|&b| b == 0), "refused write_at wrote data");
    q.read_at(at, &mut got[..chunk]).expect("read end");
    assert!(
        got[..chunk].iter().all(|&b| b == 0),
        "refused write_at wrote data"
    );
    assert!(matches!(
        q.write_at(0, &[], false),
        Err(IoError::ZeroLength { op: IoOp::Write })
    ));
    assert!(matches!(
        q.read_at(0, &mut []),
        Err(IoError::ZeroLength { op: IoOp::Read })
    ));
    drop(q);
    engine.stop();
}

#[test]
fn queue_full_and_no_free_buffer() {
    let engine = common::start(common::cores(1));
    let bdev = NullBdev::new("bad-n", 1 << 30, 4096).expect("null bdev");
    let handle = engine.add_bdev(Arc::new(bdev)).expect("add bdev");
    let depth = 4;
    let mut q = engine
        .queue(&handle, first_core(&engine), depth)
        .expect("queue");
    for i in 0..depth {
        let r = Request {
            user_data: u64::from(i),
            ..req(IoOp::Flush, 0, 0, None)
        };
        q.submit(r).expect("fits the queue");
    }
    match q.submit(req(IoOp::Flush, 0, 0, None)) {
        Err((e, None)) => assert_eq!(e, IoError::QueueFull { depth }),
        other => panic!("wanted QueueFull, got {other:?}"),
    }
    let mut done = Vec::new();
    while done.len() < depth as usize {
        q.wait(depth as usize, &mut done);
    }
    assert!(done.iter().all(|c| c.result.is_ok()));

    let held: Vec<BufId> = (0..depth).map(|_| q.alloc_buf().expect("buffer")).collect();
    assert_eq!(q.alloc_buf(), Err(IoError::NoFreeBuffer { count: depth }));
    let mut dst = vec![0u8; 4096];
    assert_eq!(
        q.read_at(0, &mut dst),
        Err(IoError::NoFreeBuffer { count: depth })
    );
    held.into_iter().for_each(|b| q.free_buf(b));
    q.read_at(0, &mut dst).expect("buffers are back");
    drop(q);
    engine.stop();
}

/// Page-aligned caller memory for `submit_raw`, freed on drop.
struct RawMem {
    ptr: *mut u8,
    layout: Layout,
}

impl RawMem {
    fn new(len_bytes: usize) -> RawMem {
        let layout = Layout::from_size_align(len_bytes, 4096).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation failed");
        RawMem { ptr, layout }
    }

    /// A view of `[skip_bytes, skip_bytes + len_bytes)` of this memory.
    ///
    /// # Safety
    /// `self` outlives every request submitted with the view, and the test touches the memory
    /// only after those requests are reaped.
    unsafe fn io_buf(&self, skip_bytes: usize, len_bytes: u32) -> IoBuf {
        assert!(skip_bytes + len_bytes as usize <= self.layout.size());
        // SAFETY: skip_bytes lies inside the allocation (checked above).
        let ptr = unsafe { self.ptr.add(skip_bytes) };
        // SAFETY: the span lies inside this live allocation; the rest is this fn's contract.
        unsafe { IoBuf::from_raw(ptr, len_bytes) }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: the allocation is live, initialised, and not lent to any request now.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
}

impl Drop for RawMem {
    fn drop(&mut self) {
        // SAFETY: ptr came from alloc_zeroed with this very layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

#[test]
fn submit_raw_refuses_misaligned_and_short_buffers_then_serves() {
    let file = TempFile::new("bad-raw", 4 << 20);
    let bdev = UringBdev::open("bad-u", file.path(), UringOptions::default()).expect("open");
    let engine = common::start(common::cores(1));
    let handle = engine.add_bdev(Arc::new(bdev)).expect("add bdev");
    let mut q = engine
        .queue(&handle, first_core(&engine), 4)
        .expect("queue");
    let mem = RawMem::new(3 * 4096);
    // SAFETY: `mem` outlives the queue's use of it and is read only after the last reap.
    let odd = unsafe { mem.io_buf(512, 4096) };
    // SAFETY: `mem` outlives the queue's use of it; refused requests never reach the device.
    let r = unsafe { q.submit_raw(IoOp::Read, 0, 4096, Some(odd), false, 1) };
    assert_eq!(
        r,
        Err(IoError::BufferMisaligned {
            addr: odd.ptr() as usize,
            align_bytes: 4096
        })
    );
    // SAFETY: as above.
    let short = unsafe { mem.io_buf(0, 4096) };
    // SAFETY: as above.
    let r = unsafe { q.submit_raw(IoOp::Write, 0, 8192, Some(short), false, 2) };
    assert_eq!(
        r,
        Err(IoError::BufferTooSmall {
            op: IoOp::Write,
            len_bytes: 8192,
            buf_len_bytes: 4096
        })
    );
    // SAFETY: no buffer is passed.
    let r = unsafe { q.submit_raw(IoOp::Read, 0, 4096, None, false, 3) };
    assert_eq!(r, Err(IoError::NoBuffer { op: IoOp::Read }));
    // SAFETY: no buffer is passed.
    let r = unsafe { q.submit_raw(IoOp::Trim, 4095, 4096, None, false, 4) };
    assert!(matches!(r, Err(IoError::Misaligned { .. })));
    assert_eq!(q.in_flight(), 0);

    // A good raw read of data written through the queue.
    let mut data = vec![0u8; 8192];
    Rng::new(9).fill(&mut data);
    q.write_at(8192, &data, false).expect("write");
    // SAFETY: as above.
    let good = unsafe { mem.io_buf(4096, 8192) };
    // SAFETY: `mem` stays alive and untouched until the completion is reaped below.
    unsafe { q.submit_raw(IoOp::Read, 8192, 8192, Some(good), false, 5) }.expect("raw read");
    let mut done = Vec::new();
    q.wait(1, &mut done);
    assert_eq!(done.len(), 1);
    assert_eq!(done[0].user_data, 5);
    assert_eq!(done[0].result, Ok(()));
    assert!(done[0].buf.is_none(), "raw requests carry no queue buffer");
    assert_eq!(&mem.as_slice()[4096..4096 + 8192], &data[..]);
    drop(q);
    engine.stop();
}

#[test]
fn bad_queue_requests_are_engine_errors() {
    let (engine, handle) = malloc_engine();
    let core = first_core(&engine);
    assert!(matches!(
        engine.queue(&handle, core, 0),
        Err(EngineError::QueueDepth { depth: 0 })
    ));
    assert!(matches!(
        engine.queue(&handle, core, QUEUE_DEPTH_MAX + 1),
        Err(EngineError::QueueDepth { depth }) if depth == QUEUE_DEPTH_MAX + 1
    ));
    let absent = CoreId::new(1023).expect("valid id");
    assert!(matches!(
        engine.queue(&handle, absent, 4),
        Err(EngineError::NotEngineCore { core }) if core == absent
    ));
    // More buffers than the core's pool holds is back-pressure at bind time, not a panic.
    let greedy = common::TEST_BUF_COUNT + 1;
    assert!(matches!(
        engine.queue(&handle, core, greedy),
        Err(EngineError::PoolExhausted { wanted, .. }) if wanted == greedy
    ));
    let mut q = engine
        .queue(&handle, core, 4)
        .expect("good queue after bad ones");
    still_serves(&mut q, 0);
    drop(q);
    engine.stop();
}

#[test]
fn engine_start_refuses_a_core_that_does_not_exist() {
    let cores = CoreList::parse("999").expect("syntactically fine");
    match Engine::start(EngineConfig::new(cores)) {
        Err(EngineError::CoreUnavailable { core, allowed }) => {
            assert_eq!(core.get(), 999);
            assert!(!allowed.is_empty(), "the error lists the allowed cores");
        }
        other => panic!("wanted CoreUnavailable, got {other:?}"),
    }
}

#[test]
fn engine_start_refuses_a_bad_buffer_size() {
    let mut config = common::config(common::cores(1));
    config.buf_size_bytes = 1000;
    assert!(matches!(
        Engine::start(config),
        Err(EngineError::Dma { .. })
    ));
}

#[test]
fn uring_open_of_a_missing_path_names_the_path() {
    let path = std::env::temp_dir().join(format!("cairn-test-missing-{}", std::process::id()));
    let err = UringBdev::open("gone", &path, UringOptions::default()).expect_err("no such file");
    let shown = path.display().to_string();
    match &err {
        BdevError::Open { path, source } => {
            assert_eq!(path, &shown);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("wanted BdevError::Open, got {other:?}"),
    }
    assert!(err.to_string().contains(&shown), "message: {err}");
}

#[test]
fn malloc_refuses_bad_geometry() {
    assert!(matches!(
        MallocBdev::new("z", 0, 512),
        Err(BdevError::Geometry { size_bytes: 0, .. })
    ));
    assert!(matches!(
        MallocBdev::new("odd", 4096 + 100, 512),
        Err(BdevError::Geometry {
            size_bytes: 4196,
            block_size_bytes: 512,
            ..
        })
    ));
    for bad in [0, 100, 256, 1000, 3000, 131072] {
        match MallocBdev::new("bs", 1 << 20, bad) {
            Err(BdevError::BlockSize {
                name,
                block_size_bytes,
            }) => {
                assert_eq!(name, "bs");
                assert_eq!(block_size_bytes, bad);
            }
            other => panic!("block size {bad}: wanted BlockSize, got {other:?}"),
        }
    }
    let err = MallocBdev::new("named", 1000, 512).expect_err("bad size");
    assert!(err.to_string().contains("named"), "message: {err}");
    assert!(err.to_string().contains("1000"), "message: {err}");
}
