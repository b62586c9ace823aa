//! `MsgRing` throughput: a send followed by a receive on one thread (the cost of the ring
//! itself, with no cache line changing cores), and a stream of messages from a producer pinned
//! to one core to a consumer pinned to another (what a reactor's inbox costs when other cores
//! feed it). The cross-core case needs two CPUs and is skipped, with a note, on one.

use cairn_engine::msg::{Full, MsgRing, INBOX_CAPACITY_DEFAULT};
use cairn_engine::sys::{affinity, allowed_cpus, pin_current_thread, set_affinity};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Ends one measured batch: the consumer counts it and the producer stops the clock.
const BATCH_END: u64 = u64::MAX;
/// Tells the consumer thread to exit.
const QUIT: u64 = u64::MAX - 1;

/// Sends `msg`, spinning while the ring is full (the consumer is behind).
fn send_spin(ring: &MsgRing<u64>, mut msg: u64) {
    loop {
        match ring.send(msg) {
            Ok(()) => return,
            Err(Full(back)) => {
                msg = back;
                std::hint::spin_loop();
            }
        }
    }
}

fn same_thread(c: &mut Criterion) {
    let ring = MsgRing::<u64>::new(INBOX_CAPACITY_DEFAULT).expect("eventfd");
    let mut g = c.benchmark_group("msg_ring");
    g.throughput(Throughput::Elements(1));
    g.bench_function("send_recv_same_thread", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            send_spin(&ring, black_box(i));
            black_box(ring.recv())
        })
    });
    g.finish();
}

/// The consumer: drains the ring, spinning when it is empty, and bumps `batches` at each
/// batch end so the producer knows every message of the batch has been received.
fn consume(ring: &MsgRing<u64>, batches: &AtomicU64) {
    let mut sum = 0u64;
    loop {
        match ring.recv() {
            Some(BATCH_END) => {
                batches.fetch_add(1, Ordering::Release);
            }
            Some(QUIT) => break,
            Some(v) => sum = sum.wrapping_add(v),
            None => std::hint::spin_loop(),
        }
    }
    black_box(sum);
}

/// Sends `iters` messages and waits until the consumer has received the last one.
fn stream(ring: &MsgRing<u64>, batches: &AtomicU64, iters: u64) -> Duration {
    let before = batches.load(Ordering::Acquire);
    let t0 = Instant::now();
    for i in 0..iters {
        send_spin(ring, i % QUIT);
    }
    send_spin(ring, BATCH_END);
    while batches.load(Ordering::Acquire) == before {
        std::hint::spin_loop();
    }
    t0.elapsed()
}

fn cross_core(c: &mut Criterion) {
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        println!(
            "msg_ring/send_recv_cross_core: skipped, this process may use only {} cpu(s)",
            cpus.len()
        );
        return;
    }
    let (producer_cpu, consumer_cpu) = (cpus[0], cpus[1]);
    let ring = Arc::new(MsgRing::<u64>::new(INBOX_CAPACITY_DEFAULT).expect("eventfd"));
    let batches = Arc::new(AtomicU64::new(0));
    let consumer = {
        let (ring, batches) = (ring.clone(), batches.clone());
        std::thread::spawn(move || {
            pin_current_thread(consumer_cpu).expect("pin consumer");
            consume(&ring, &batches);
        })
    };
    let saved = affinity().expect("read affinity");
    pin_current_thread(producer_cpu).expect("pin producer");
    let mut g = c.benchmark_group("msg_ring");
    g.throughput(Throughput::Elements(1));
    g.bench_function("send_recv_cross_core", |b| {
        b.iter_custom(|iters| stream(&ring, &batches, iters))
    });
    g.finish();
    send_spin(&ring, QUIT);
    consumer.join().expect("consumer thread");
    set_affinity(&saved).expect("restore affinity");
}

criterion_group! {
    name = benches;
    config = cairn_benches::config();
    targets = same_thread, cross_core
}
criterion_main!(benches);
