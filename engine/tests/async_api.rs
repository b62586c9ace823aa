//! Guards the awaitable side of the public API: `IoQueue::wait_async` resolves when a
//! completion can be polled, driven here by a minimal single-threaded executor (the engine
//! depends on no async runtime), with many requests in flight and no busy waiting.

mod common;

use cairn_engine::bdev::fault::FaultBdev;
use cairn_engine::bdev::malloc::MallocBdev;
use cairn_engine::{Bdev, IoOp, Request};
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

struct Unpark {
    thread: std::thread::Thread,
    wakes: AtomicUsize,
}

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.wakes.fetch_add(1, Ordering::Relaxed);
        self.thread.unpark();
    }
}

/// Polls `f` to completion, parking the thread between polls; returns the output and how
/// often the future was polled.
fn block_on<T>(f: impl Future<Output = T>) -> (T, usize) {
    let unpark = Arc::new(Unpark {
        thread: std::thread::current(),
        wakes: AtomicUsize::new(0),
    });
    let waker = Waker::from(unpark.clone());
    let mut cx = Context::from_waker(&waker);
    let mut f = pin!(f);
    let mut polls = 0;
    loop {
        polls += 1;
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return (v, polls);
        }
        std::thread::park_timeout(Duration::from_secs(5));
    }
}

#[test]
fn wait_async_resolves_as_completions_arrive() {
    let cores = common::cores(1);
    let engine = common::start(cores.clone());
    let ram: Arc<dyn Bdev> = Arc::new(MallocBdev::new("ram", 8 << 20, 4096).unwrap());
    // 2 ms per request, so the future really has to wait and be woken.
    let slow = FaultBdev::new("slow", ram);
    slow.control().set_latency(Duration::from_millis(2));
    let bdev = engine.add_bdev(Arc::new(slow)).unwrap();
    let mut q = engine.queue(&bdev, cores.as_slice()[0], 16).unwrap();
    for i in 0..16u64 {
        let buf = q.alloc_buf().unwrap();
        q.buf_mut(&buf)[..4096].fill(i as u8);
        let req = Request {
            op: IoOp::Write,
            offset_bytes: i * 4096,
            len_bytes: 4096,
            buf: Some(buf),
            fua: false,
            user_data: i,
        };
        q.submit(req).unwrap();
    }
    let (done, polls) = block_on(async {
        let mut done = Vec::new();
        while done.len() < 16 {
            q.wait_async().await;
            q.poll(&mut done);
        }
        done
    });
    let mut seen: Vec<u64> = done.iter().map(|c| c.user_data).collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..16).collect::<Vec<_>>());
    assert!(done.iter().all(|c| c.result.is_ok()));
    assert!(
        polls < 200,
        "the future was polled {polls} times: it spins instead of sleeping"
    );
    for c in done {
        q.free_buf(c.buf.unwrap());
    }
    let mut back = vec![0u8; 4096];
    q.read_at(15 * 4096, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 15));
}
