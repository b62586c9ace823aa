//! What `cairn-perf idle --with-pool` holds while it measures: a pool formatted on a file,
//! one volume in it, and a queue bound to that volume on the last reactor (so the volume has
//! a channel there, and the pool's home poller runs on the first), after a little I/O through
//! it. An idle daemon holds the same things, so this is the engine-level version of its
//! claim that it sleeps; a bare engine cannot show a poller that keeps its reactor awake.

use anyhow::{Context, Result};
use cairn_engine::bdev::uring::{UringBdev, UringOptions};
use cairn_engine::volume::{Pool, CLUSTER_DEFAULT_BYTES};
use cairn_engine::{Bdev, BdevHandle, CoreId, Engine, IoQueue};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Size of the pool file when `--file` does not exist yet.
const POOL_FILE_BYTES: u64 = 256 << 20;
/// Size of the volume in the pool.
const VOLUME_BYTES: u64 = 64 << 20;
/// Depth of the queue bound to the volume.
const QUEUE_DEPTH: u32 = 8;
/// Clusters written (so allocated) and read back before measuring.
const WARM_CLUSTERS: u64 = 8;
const WARM_IO_BYTES: usize = 4096;

/// An open pool with a volume and a queue; closed in [`IdlePool::close`].
pub struct IdlePool {
    pool: Pool,
    volume: BdevHandle,
    queue: IoQueue,
    /// The pool file, when this run created it (removed again on close).
    created: Option<PathBuf>,
}

impl IdlePool {
    /// Formats `path` (created at [`POOL_FILE_BYTES`] if missing, and then removed on close;
    /// everything on an existing file is lost),
    /// opens the pool homed on `cores[0]`, creates and opens a volume with a queue on the
    /// last core, and writes and reads a few clusters through it.
    pub fn open(engine: &Engine, path: &Path, cores: &[CoreId]) -> Result<IdlePool> {
        let created = (!path.exists()).then(|| path.to_path_buf());
        if created.is_some() {
            let f = std::fs::File::create(path)
                .with_context(|| format!("creating the pool file {}", path.display()))?;
            f.set_len(POOL_FILE_BYTES)
                .with_context(|| format!("sizing the pool file {}", path.display()))?;
        }
        let base: Arc<dyn Bdev> = Arc::new(
            UringBdev::open("idle-pool", path, UringOptions::default())
                .with_context(|| format!("opening {} as a uring bdev", path.display()))?,
        );
        let home = cores[0];
        let pool = Pool::create(engine, "idle", base, home, CLUSTER_DEFAULT_BYTES)
            .with_context(|| format!("formatting a pool on {}", path.display()))?;
        pool.create_volume(engine, "idle", VOLUME_BYTES, Vec::new())?;
        let volume = pool.open_volume(engine, "idle")?;
        let last = *cores.last().expect("at least one core");
        let mut queue = engine.queue(&volume, last, QUEUE_DEPTH)?;
        warm(&mut queue)?;
        Ok(IdlePool {
            pool,
            volume,
            queue,
            created,
        })
    }

    /// Closes the queue, the volume and the pool, in that order, and removes the pool file
    /// if [`IdlePool::open`] created it.
    pub fn close(self, engine: &Engine) -> Result<()> {
        drop(self.queue);
        self.pool.close_volume(engine, &self.volume)?;
        self.pool.close(engine)?;
        if let Some(path) = self.created {
            std::fs::remove_file(&path)
                .with_context(|| format!("removing the pool file {}", path.display()))?;
        }
        Ok(())
    }
}

/// First writes (each allocates a cluster at the home core), reads, and a flush (a commit).
fn warm(q: &mut IoQueue) -> Result<()> {
    let cluster = u64::from(CLUSTER_DEFAULT_BYTES);
    let data = vec![0xa5_u8; WARM_IO_BYTES];
    let mut back = vec![0_u8; WARM_IO_BYTES];
    for i in 0..WARM_CLUSTERS.min(VOLUME_BYTES / cluster) {
        q.write_at(i * cluster, &data, false)
            .with_context(|| format!("warm-up write at {}", i * cluster))?;
        q.read_at(i * cluster, &mut back)
            .with_context(|| format!("warm-up read at {}", i * cluster))?;
    }
    q.flush().context("warm-up flush")?;
    Ok(())
}
