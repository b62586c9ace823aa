//! The Rust-API twin of examples/c/cairn_bench.c: QD 32, 4 KiB random reads through
//! `IoQueue::submit`/`wait` on a pool volume in a file, same setup and engine defaults, so
//! `ci/cabi.sh bench` can report the C ABI's overhead as a ratio.

use cairn_engine::bdev::uring::{UringBdev, UringOptions};
use cairn_engine::volume::{Pool, CLUSTER_DEFAULT_BYTES};
use cairn_engine::{Bdev, CoreList, Engine, EngineConfig, IoOp, Request};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const QD: u32 = 32;
const IO: u32 = 4096;
const VOL_BYTES: u64 = 256 * MIB;

fn main() -> anyhow::Result<()> {
    let secs: f64 = std::env::args().nth(1).map_or(Ok(5.0), |s| s.parse())?;
    let dir = std::env::temp_dir().join(format!("cairn-rbench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("pool.img");
    std::fs::File::create(&path)?.set_len(VOL_BYTES + 64 * MIB)?;
    let first = cairn_engine::sys::allowed_cpus()[0];
    let engine = Engine::start(EngineConfig::new(CoreList::parse(&first.to_string())?))?;
    let base: Arc<dyn Bdev> =
        Arc::new(UringBdev::open("pool.img", &path, UringOptions::default())?);
    let home = engine.cores()[0];
    let pool = Pool::create(&engine, "pool.img", base, home, CLUSTER_DEFAULT_BYTES)?;
    pool.create_volume(&engine, "bench", VOL_BYTES, Vec::new())?;
    let vol = pool.open_volume(&engine, "bench")?;
    let mut q = engine.queue(&vol, home, QD)?;
    let fill = vec![0x5au8; MIB as usize];
    for off in (0..VOL_BYTES).step_by(MIB as usize) {
        q.write_at(off, &fill, false)?;
    }
    q.flush()?;

    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next_offset = move || {
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        (rng.wrapping_mul(0x2545_F491_4F6C_DD1D) % (VOL_BYTES / u64::from(IO))) * u64::from(IO)
    };
    let read = |buf, offset_bytes| Request {
        op: IoOp::Read,
        offset_bytes,
        len_bytes: IO,
        buf: Some(buf),
        fua: false,
        user_data: 0,
    };
    for _ in 0..QD {
        let buf = q.alloc_buf()?;
        q.submit(read(buf, next_offset())).map_err(|(e, _)| e)?;
    }
    let mut done = Vec::with_capacity(QD as usize);
    let mut ios = 0u64;
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    loop {
        q.wait(1, &mut done);
        let n = done.len() as u64;
        for c in done.drain(..) {
            c.result?;
            ios += 1;
            let buf = c.buf.expect("reads return their buffer");
            q.submit(read(buf, next_offset())).map_err(|(e, _)| e)?;
        }
        if (ios & 1023) < n && Instant::now() >= end {
            break;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "ios {ios} secs {elapsed:.2}\niops {:.0}",
        ios as f64 / elapsed
    );
    let mut rest = Vec::new();
    q.wait(q.in_flight() as usize, &mut rest);
    drop(q);
    pool.close_volume(&engine, &vol)?;
    pool.close(&engine)?;
    engine.stop();
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
