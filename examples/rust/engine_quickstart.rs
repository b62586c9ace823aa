//! The smallest useful program on the engine's public API: start two reactors, add a RAM bdev,
//! write and read back synchronously, then keep 16 reads in flight asynchronously and reap
//! them. Exits 0 when every byte matched.

use cairn_engine::bdev::malloc::MallocBdev;
use cairn_engine::{CoreId, CoreList, Engine, EngineConfig, IoOp, Request};
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cores = CoreList::parse("0")?;
    let engine = Engine::start(EngineConfig::new(cores))?;
    let bdev = engine.add_bdev(Arc::new(MallocBdev::new("ram0", 64 << 20, 4096)?))?;
    let mut queue = engine.queue(&bdev, CoreId::new(0)?, 16)?;

    let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    queue.write_at(0, &data, false)?;
    queue.flush()?;
    let mut back = vec![0u8; data.len()];
    queue.read_at(0, &mut back)?;
    assert_eq!(back, data, "synchronous read-back differs");

    for i in 0..16u64 {
        let buf = queue.alloc_buf()?;
        let req = Request {
            op: IoOp::Read,
            offset_bytes: i * 4096,
            len_bytes: 4096,
            buf: Some(buf),
            fua: false,
            user_data: i,
        };
        queue.submit(req).map_err(|(e, _)| e)?;
    }
    let mut done = Vec::new();
    while done.len() < 16 {
        queue.wait(1, &mut done);
    }
    for c in done {
        c.result?;
        let buf = c.buf.expect("reads return their buffer");
        let at = c.user_data as usize * 4096;
        assert_eq!(
            queue.buf(&buf)[..4096],
            data[at..at + 4096],
            "async read {} differs",
            c.user_data
        );
        queue.free_buf(buf);
    }
    drop(queue);
    engine.stop();
    println!("engine-quickstart: 64 KiB written and read back, 16 async reads verified");
    Ok(())
}
