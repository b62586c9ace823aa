//! `BufPool` cost on the I/O path: one get and put (what each request pays), and 32 gets then
//! 32 puts (a queue depth's worth, which walks the free stack instead of reusing its top).

use cairn_engine::dma::{BufPool, DmaBuf};
use cairn_engine::engine::{BUF_COUNT_DEFAULT, BUF_SIZE_DEFAULT_BYTES};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};

const BATCH: usize = 32;

fn pool() -> BufPool {
    // Plain pages: the pool's get/put never touches buffer memory, so huge pages change nothing
    // here and would make the benchmark depend on the host's huge-page reserve.
    BufPool::new(BUF_COUNT_DEFAULT, BUF_SIZE_DEFAULT_BYTES, false).expect("buffer pool")
}

fn get_put(c: &mut Criterion) {
    let mut pool = pool();
    let mut g = c.benchmark_group("buf_pool");
    g.throughput(Throughput::Elements(1));
    g.bench_function("get_put", |b| {
        b.iter(|| {
            let buf = pool.get().expect("pool has buffers");
            pool.put(black_box(buf));
        })
    });
    g.throughput(Throughput::Elements(BATCH as u64));
    let mut held: Vec<DmaBuf> = Vec::with_capacity(BATCH);
    g.bench_function("get_put_batch32", |b| {
        b.iter(|| {
            for _ in 0..BATCH {
                held.push(pool.get().expect("pool has buffers"));
            }
            for buf in held.drain(..) {
                pool.put(black_box(buf));
            }
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = cairn_benches::config();
    targets = get_put
}
criterion_main!(benches);
