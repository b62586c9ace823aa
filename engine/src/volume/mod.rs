//! The volume store: thin-provisioned volumes with snapshots, clones and online growth, in a
//! pool on one bdev, consistent after a crash at any instant.
//!
//! * [`format`](mod@format): the on-disk superblock and metadata checkpoints (drawn in docs/formats.md).
//! * [`meta`]: objects, cluster maps, reference counts, allocator and the fsck.
//! * [`cluster`]: [`cluster::VirtCluster`] and [`cluster::PhysCluster`], the two cluster number
//!   spaces as distinct types, so a volume index can never address the device.
//! * [`map`]: the lock-free cluster map every core reads.
//! * `pool`: the home core's runtime: allocation, copy-on-write, commits, barriers.
//! * `channel`: a volume as a bdev, with the per-core I/O path.
//!
//! Durability contract: a write is durable once a FLUSH that started after it completed, or
//! at its own completion when it carries FUA. Metadata changes (allocations, trims, snapshots)
//! are durable on the same terms; control operations (create, snapshot, clone, grow, delete)
//! are durable when they return.
//!
//! Snapshots with clones cannot be deleted: the clone records the snapshot as its origin, and
//! deleting it is refused with the clones' names. Deleting a volume leaves its snapshots.

pub(crate) mod channel;
pub mod cluster;
pub mod format;
pub mod map;
pub mod meta;
pub(crate) mod pool;

use crate::bdev::{Bdev, BdevInfo, IoError};
use crate::core_list::CoreId;
use crate::engine::{BdevHandle, Engine, EngineError};
use channel::{VolumeBdev, VolumeShared};
use format::{Checkpoint, FormatError, ObjectKind, Superblock, META_BLOCK_BYTES};
use meta::Meta;
use pool::{HomePoller, PoolShared, Reply};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Default cluster size: the unit of allocation and copy-on-write.
pub const CLUSTER_DEFAULT_BYTES: u32 = 1 << 20;
/// Block size of every volume.
pub const VOLUME_BLOCK_BYTES: u32 = 4096;
/// How long a control operation waits for the home core to make it durable.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);
/// Most heap allocations the engine's reactors make for one write to an unallocated or
/// shared cluster (allocation or copy-on-write at home, messages both ways), while the home
/// core's tables are within their preallocated sizes (`HOME_WAITERS_PREALLOC` waiting
/// requests, `HOME_OPS_MAX` home I/Os). `alloc_free` asserts it.
pub const FIRST_WRITE_ALLOCS_MAX: u64 = 0;
/// Most heap allocations the engine's reactors make for one flush that commits changed
/// metadata: the checkpoint is encoded into staging memory mapped at open, and the barrier
/// that releases freed clusters is a round of plain messages. `alloc_free` asserts it.
pub const COMMIT_ALLOCS_MAX: u64 = 0;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("pool has no usable metadata checkpoint ({detail})")]
    NoCheckpoint { detail: String },
    #[error("pool metadata is inconsistent: {}", problems.join("; "))]
    Inconsistent { problems: Vec<String> },
    #[error("{what}: {error}")]
    Io { what: String, error: IoError },
    #[error("{0}")]
    Engine(String),
    #[error("a volume or snapshot named '{name}' already exists")]
    DuplicateName { name: String },
    #[error("no volume or snapshot named '{name}'")]
    NotFound { name: String },
    #[error("'{name}' is not a valid name: 1 to 255 bytes without control characters")]
    BadName { name: String },
    #[error("labels of '{name}': at most 64, keys and values at most 255 bytes")]
    BadLabels { name: String },
    #[error("size {size_bytes} for '{name}' {reason}")]
    BadSize {
        name: String,
        size_bytes: u64,
        reason: String,
    },
    #[error("'{name}' is {size_bytes} bytes; shrinking to {requested_bytes} is not supported")]
    ShrinkRefused {
        name: String,
        size_bytes: u64,
        requested_bytes: u64,
    },
    #[error("'{name}' is a {kind}, not a {wanted}")]
    WrongKind {
        name: String,
        kind: ObjectKind,
        wanted: ObjectKind,
    },
    #[error("snapshot '{name}' has clones ({}); delete them first", clones.join(", "))]
    HasDependants { name: String, clones: Vec<String> },
    #[error("volume '{name}' is open; close it first")]
    VolumeOpen { name: String },
    #[error("pool already holds the maximum of {max} volumes and snapshots")]
    TooManyObjects { max: u64 },
    #[error("pool '{pool}' is out of space")]
    NoSpace { pool: String },
    #[error("pool metadata would outgrow its {slot_bytes}-byte checkpoint slot; delete snapshots or clones")]
    MetadataFull { slot_bytes: u64 },
    #[error("pool '{pool}': {why}")]
    Failed { pool: String, why: String },
}

impl PoolError {
    /// The errno a block-device client sees for this error.
    pub fn errno(&self) -> i32 {
        match self {
            PoolError::NoSpace { .. } | PoolError::MetadataFull { .. } => libc::ENOSPC,
            PoolError::Io {
                error: IoError::Device { errno },
                ..
            } => *errno,
            _ => libc::EIO,
        }
    }

    pub(crate) fn device(pool: &str, what: &str, res: i32) -> PoolError {
        PoolError::Io {
            what: format!("pool '{pool}': {what}"),
            error: IoError::Device { errno: -res },
        }
    }
}

impl From<EngineError> for PoolError {
    fn from(e: EngineError) -> Self {
        PoolError::Engine(e.to_string())
    }
}

/// A slot's size in memory, for its staging region.
fn slot_bytes_usize(shared: &PoolShared) -> Result<usize, PoolError> {
    usize::try_from(shared.sb.slot_bytes).map_err(|_| PoolError::Failed {
        pool: shared.name.clone(),
        why: format!("checkpoint slot of {} bytes", shared.sb.slot_bytes),
    })
}

/// A random v4 UUID from the kernel's generator.
pub(crate) fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    if let Err(e) = crate::sys::random_bytes(&mut u) {
        panic!("getrandom failed: {e}");
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    u
}

/// Formats a UUID the usual way.
pub fn uuid_string(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    )
}

/// A volume or snapshot as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub name: String,
    pub uuid: String,
    pub kind: ObjectKind,
    pub size_bytes: u64,
    pub allocated_clusters: u64,
    pub origin: Option<String>,
    pub labels: Vec<(String, String)>,
}

/// A pool's geometry and usage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolInfo {
    pub name: String,
    pub uuid: String,
    pub cluster_size_bytes: u32,
    pub clusters: u64,
    pub free_clusters: u64,
    pub objects: Vec<ObjectInfo>,
}

/// A pool's size and free space without its objects: what a node reports to the control
/// process with every heartbeat, so reading it costs O(1) on the home core (unlike
/// [`PoolInfo`], which walks every object's map).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolSpace {
    pub cluster_size_bytes: u32,
    pub clusters: u64,
    pub free_clusters: u64,
}

impl PoolSpace {
    pub fn size_bytes(&self) -> u64 {
        self.clusters * u64::from(self.cluster_size_bytes)
    }

    pub fn free_bytes(&self) -> u64 {
        self.free_clusters * u64::from(self.cluster_size_bytes)
    }
}

/// A pool open in an engine. Control methods may be called from any thread.
#[derive(Debug)]
pub struct Pool {
    shared: Arc<PoolShared>,
    /// The home state's slot on the home core.
    slot: crate::reactor::LocalSlot,
    base: BdevHandle,
}

/// Reads `len` bytes at `offset` through a queue, for opening and formatting.
fn read_sync(
    q: &mut crate::engine::IoQueue,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, PoolError> {
    let mut b = vec![0u8; len];
    q.read_at(offset, &mut b).map_err(|error| PoolError::Io {
        what: format!("reading pool metadata at {offset}"),
        error,
    })?;
    Ok(b)
}

fn write_sync(q: &mut crate::engine::IoQueue, offset: u64, data: &[u8]) -> Result<(), PoolError> {
    q.write_at(offset, data, false)
        .map_err(|error| PoolError::Io {
            what: format!("writing pool metadata at {offset}"),
            error,
        })
}

/// Says at open what the metadata slots hold besides the chosen checkpoint: a rollback past
/// a newer commit as an error naming its seq, a damaged header copy as a warning.
fn report_found(pool: &str, found: &pool::Found) {
    let seq = found.checkpoint.seq;
    if let Some(lost) = found.lost_seq {
        tracing::error!(
            pool,
            opened_seq = seq,
            lost_seq = lost,
            damaged = %found.damaged.join("; "),
            "pool metadata ROLLED BACK: checkpoint seq {lost} left a trace but no valid header; opened seq {seq}, so writes flushed after seq {seq} may be lost"
        );
    } else if !found.damaged.is_empty() {
        tracing::warn!(pool, seq, damaged = %found.damaged.join("; "), "damaged metadata header copy; nothing was lost");
    }
}

/// Rewrites the chosen slot's header copies that do not hold its header (one was damaged,
/// or a crash fell between the two writes), so that the checkpoint the pool now serves has
/// two valid copies again before any more damage can strike.
fn repair_header_copies(
    q: &mut crate::engine::IoQueue,
    pool: &str,
    found: &pool::Found,
) -> Result<(), PoolError> {
    for &at in &found.repair {
        tracing::warn!(
            pool,
            slot = found.slot,
            offset_bytes = at,
            seq = found.checkpoint.seq,
            "rewriting a metadata header copy"
        );
        write_sync(q, at, &found.header_block)?;
    }
    q.flush().map_err(|error| PoolError::Io {
        what: format!("pool '{pool}': flushing repaired metadata header copies"),
        error,
    })
}

impl Pool {
    /// Formats `base` as an empty pool and opens it. Everything on the device is lost.
    pub fn create(
        engine: &Engine,
        name: &str,
        base: Arc<dyn Bdev>,
        home: CoreId,
        cluster_size_bytes: u32,
    ) -> Result<Pool, PoolError> {
        let info = base.info().clone();
        let sb = Superblock::layout(
            info.size_bytes,
            info.block_size_bytes.max(VOLUME_BLOCK_BYTES),
            cluster_size_bytes,
            random_uuid(),
        )?;
        let handle = engine.add_bdev(base.clone())?;
        let mut q = engine.queue(&handle, home, 4)?;
        let meta = Meta::new(sb.clone());
        let first = meta
            .to_checkpoint(1)
            .encode(sb.slot_bytes)
            .expect("an empty pool's metadata fits");
        let (header, payload) = first.split_at(format::CHECKPOINT_PAYLOAD_OFFSET);
        write_sync(&mut q, sb.payload_offset(0), payload)?;
        for at in sb.header_offsets(0) {
            write_sync(&mut q, at, header)?;
        }
        for at in sb.header_offsets(1) {
            write_sync(&mut q, at, &vec![0u8; META_BLOCK_BYTES as usize])?;
        }
        q.flush().map_err(|error| PoolError::Io {
            what: "flushing the new pool".into(),
            error,
        })?;
        write_sync(&mut q, 0, &sb.encode())?;
        q.flush().map_err(|error| PoolError::Io {
            what: "flushing the new superblock".into(),
            error,
        })?;
        drop(q);
        tracing::info!(pool = name, uuid = %uuid_string(&sb.uuid), clusters = sb.cluster_count, cluster_size_bytes, "pool formatted");
        Pool::start(engine, name, base, handle, home)
    }

    /// Opens an existing pool on `base`, refusing damaged or newer-format metadata.
    pub fn open(
        engine: &Engine,
        name: &str,
        base: Arc<dyn Bdev>,
        home: CoreId,
    ) -> Result<Pool, PoolError> {
        let handle = engine.add_bdev(base.clone())?;
        Pool::start(engine, name, base, handle, home)
    }

    fn start(
        engine: &Engine,
        name: &str,
        base: Arc<dyn Bdev>,
        handle: BdevHandle,
        home: CoreId,
    ) -> Result<Pool, PoolError> {
        let mut q = engine.queue(&handle, home, 4)?;
        let sb = Superblock::decode(&read_sync(&mut q, 0, META_BLOCK_BYTES as usize)?)?;
        if sb.bdev_size_bytes > handle.info().size_bytes {
            return Err(PoolError::Format(FormatError::Invalid {
                what: "superblock",
                detail: format!(
                    "pool was formatted for {} bytes but the device has {}",
                    sb.bdev_size_bytes,
                    handle.info().size_bytes
                ),
            }));
        }
        let found = pool::newest_checkpoint(&sb, |off, len| read_sync(&mut q, off, len))?;
        report_found(name, &found);
        if found.lost_seq.is_none() && !found.repair.is_empty() {
            repair_header_copies(&mut q, name, &found)?;
        }
        let (ckpt, slot) = (found.checkpoint, found.slot);
        drop(q);
        let meta = Meta::from_checkpoint(sb.clone(), &ckpt)?;
        tracing::info!(
            pool = name,
            seq = ckpt.seq,
            objects = ckpt.objects.len(),
            "pool opened"
        );
        let shared = Arc::new(PoolShared {
            name: name.into(),
            home,
            base: handle.id(),
            base_bdev: base,
            sb,
        });
        let state_shared = shared.clone();
        let cores = engine.cores();
        let staging =
            crate::dma::Region::map(slot_bytes_usize(&shared)?, false, false).map_err(|e| {
                PoolError::Failed {
                    pool: name.into(),
                    why: format!("mapping checkpoint staging memory: {e}"),
                }
            })?;
        let local = engine.call(home, move |core| {
            core.add_local(move |local| {
                Box::new(pool::HomeState {
                    shared: state_shared,
                    home: pool::Home::new(meta, slot, cores, local, staging),
                })
            })
        })?;
        engine.spawn_poller(home, Box::new(HomePoller { slot: local }), None)?;
        Ok(Pool {
            shared,
            slot: local,
            base: handle,
        })
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Runs a control operation on the home core and waits until it is durable.
    fn control(
        &self,
        engine: &Engine,
        f: impl FnOnce(&mut pool::Home, &mut crate::reactor::Core, &Arc<PoolShared>, Reply)
            + Send
            + 'static,
    ) -> Result<(), PoolError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let slot = self.slot;
        engine
            .call(self.shared.home, move |core| {
                pool::with_home(core, slot, |h, core, s| f(h, core, s, Reply::Control(tx)))
            })?
            .ok_or_else(|| self.closed())?;
        rx.recv_timeout(CONTROL_TIMEOUT).map_err(|_| {
            PoolError::Engine(format!(
                "pool '{}': home core did not answer",
                self.shared.name
            ))
        })?
    }

    fn query<R: Send + 'static>(
        &self,
        engine: &Engine,
        f: impl FnOnce(&mut pool::Home) -> R + Send + 'static,
    ) -> Result<R, PoolError> {
        let slot = self.slot;
        engine
            .call(self.shared.home, move |core| {
                pool::with_home(core, slot, |h, _, _| f(h))
            })?
            .ok_or_else(|| self.closed())
    }

    fn closed(&self) -> PoolError {
        PoolError::Failed {
            pool: self.shared.name.clone(),
            why: "the pool is closed".into(),
        }
    }

    pub fn create_volume(
        &self,
        engine: &Engine,
        name: &str,
        size_bytes: u64,
        labels: Vec<(String, String)>,
    ) -> Result<(), PoolError> {
        let name = name.to_string();
        self.control(engine, move |h, core, s, to| {
            pool::change(h, core, s, to, |m, _| {
                m.create_volume(&name, size_bytes, labels).map(drop)
            })
        })
    }

    pub fn snapshot(&self, engine: &Engine, volume: &str, snapshot: &str) -> Result<(), PoolError> {
        let (volume, snapshot) = (volume.to_string(), snapshot.to_string());
        self.control(engine, move |h, core, s, to| {
            pool::snapshot(h, core, s, &volume, &snapshot, to)
        })
    }

    pub fn clone_snapshot(
        &self,
        engine: &Engine,
        snapshot: &str,
        name: &str,
    ) -> Result<(), PoolError> {
        let (snapshot, name) = (snapshot.to_string(), name.to_string());
        self.control(engine, move |h, core, s, to| {
            pool::change(h, core, s, to, |m, _| {
                m.clone_snapshot(&snapshot, &name).map(drop)
            })
        })
    }

    pub fn delete(&self, engine: &Engine, name: &str) -> Result<(), PoolError> {
        let name = name.to_string();
        self.control(engine, move |h, core, s, to| {
            pool::change(h, core, s, to, |m, open| {
                let o = m.find(&name)?;
                let id = o.id;
                let clones = m.dependants(id);
                if o.kind == ObjectKind::Snapshot && !clones.is_empty() {
                    return Err(PoolError::HasDependants {
                        name: name.clone(),
                        clones,
                    });
                }
                if open.contains_key(&id) {
                    return Err(PoolError::VolumeOpen { name: name.clone() });
                }
                m.delete(&name).map(drop)
            })
        })
    }

    /// Grows a volume, online if it is open: cores see the new size once this returns.
    pub fn grow(&self, engine: &Engine, name: &str, size_bytes: u64) -> Result<(), PoolError> {
        let n = name.to_string();
        self.control(engine, move |h, core, s, to| {
            pool::change(h, core, s, to, |m, _| m.grow(&n, size_bytes))
        })?;
        let name = name.to_string();
        let open = self.query(engine, move |h| {
            let id = h.meta.find(&name).ok()?.id;
            h.open
                .get(&id)
                .and_then(|(bdev, vol)| Some((*bdev, vol.upgrade()?)))
        })?;
        if let Some((bdev, vol)) = open {
            vol.size_bytes
                .store(size_bytes, std::sync::atomic::Ordering::Release);
            engine.refresh_bdev(bdev)?;
        }
        Ok(())
    }

    pub fn info(&self, engine: &Engine) -> Result<PoolInfo, PoolError> {
        let name = self.shared.name.clone();
        self.query(engine, move |h| {
            let m = &h.meta;
            let objects = m
                .objects()
                .map(|o| ObjectInfo {
                    name: o.name.clone(),
                    uuid: uuid_string(&o.uuid),
                    kind: o.kind,
                    size_bytes: o.size_bytes,
                    allocated_clusters: o.map.mapped().count() as u64,
                    origin: m.object(o.parent).map(|p| p.name.clone()),
                    labels: o.labels.clone(),
                })
                .collect();
            PoolInfo {
                name,
                uuid: uuid_string(&m.sb.uuid),
                cluster_size_bytes: m.sb.cluster_size_bytes,
                clusters: m.sb.cluster_count,
                free_clusters: m.free_clusters(),
                objects,
            }
        })
    }

    /// The pool's size and free clusters, read on the home core.
    pub fn space(&self, engine: &Engine) -> Result<PoolSpace, PoolError> {
        self.query(engine, |h| PoolSpace {
            cluster_size_bytes: h.meta.sb.cluster_size_bytes,
            clusters: h.meta.sb.cluster_count,
            free_clusters: h.meta.free_clusters(),
        })
    }

    /// Runs the in-memory consistency check on the home core.
    pub fn check(&self, engine: &Engine) -> Result<(), PoolError> {
        self.query(engine, |h| h.meta.check())?
            .map_err(|problems| PoolError::Inconsistent { problems })
    }

    /// Opens a volume or snapshot (read-only by validation: snapshots refuse writes) as a bdev.
    pub fn open_volume(&self, engine: &Engine, name: &str) -> Result<BdevHandle, PoolError> {
        let n = name.to_string();
        let (obj, kind, size, map) = self.query(engine, move |h| {
            h.meta
                .find(&n)
                .map(|o| (o.id, o.kind, o.size_bytes, o.map.clone()))
        })??;
        let cluster = self.shared.sb.cluster_size_bytes;
        let zeros = crate::dma::Region::map(cluster as usize, false, true)
            .map_err(|e| PoolError::Engine(e.to_string()))?;
        let vol = Arc::new(VolumeShared {
            obj,
            map,
            pool: self.shared.clone(),
            home: self.slot,
            size_bytes: AtomicU64::new(size),
            bdev: OnceLock::new(),
            zeros,
        });
        let bdev = Arc::new(VolumeBdev {
            info: BdevInfo {
                name: name.into(),
                block_size_bytes: VOLUME_BLOCK_BYTES,
                size_bytes: size,
                max_io_bytes: cluster,
                buf_align_bytes: self.shared.base_bdev.info().buf_align_bytes,
                can_trim: true,
                can_write_zeroes: true,
                read_only: kind == ObjectKind::Snapshot,
            },
            vol: vol.clone(),
        });
        let handle = engine.add_bdev(bdev)?;
        vol.bdev.set(handle.id()).expect("set once");
        let id = handle.id();
        let weak = Arc::downgrade(&vol);
        self.query(engine, move |h| h.open.insert(obj, (id, weak)))?;
        Ok(handle)
    }

    /// Closes an open volume once its in-flight I/O has finished.
    pub fn close_volume(&self, engine: &Engine, handle: &BdevHandle) -> Result<(), PoolError> {
        let id = handle.id();
        engine.remove_bdev(handle)?;
        self.query(engine, move |h| h.open.retain(|_, (b, _)| *b != id))?;
        Ok(())
    }

    /// Stops the home poller after outstanding work; open volumes must be closed first.
    pub fn close(self, engine: &Engine) -> Result<(), PoolError> {
        self.query(engine, pool::close)?;
        engine.remove_bdev(&self.base)?;
        Ok(())
    }
}

/// What [`check_file`] found.
#[derive(Debug, Clone)]
pub struct CheckReport {
    pub seq: u64,
    pub slot: usize,
    /// A newer commit whose trace is on disk but which could not be read: opening the pool
    /// would roll back past it. Also listed in `problems`.
    pub lost_seq: Option<u64>,
    pub volumes: usize,
    pub snapshots: usize,
    pub clusters: u64,
    pub allocated_clusters: u64,
    pub problems: Vec<String>,
}

/// The offline fsck of a pool file or device: reads the superblock and both checkpoints with
/// plain reads (no engine) and verifies every invariant of the newest valid one.
pub fn check_file(path: &std::path::Path) -> Result<CheckReport, PoolError> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path)
        .map_err(|e| PoolError::Engine(format!("opening {}: {e}", path.display())))?;
    let read = |offset: u64, len: usize| {
        let mut b = vec![0u8; len];
        file.read_exact_at(&mut b, offset).map_err(|e| {
            PoolError::Engine(format!("reading {} at {offset}: {e}", path.display()))
        })?;
        Ok(b)
    };
    let sb = Superblock::decode(&read(0, META_BLOCK_BYTES as usize)?)?;
    let found = pool::newest_checkpoint(&sb, read)?;
    let (c, slot): (Checkpoint, usize) = (found.checkpoint, found.slot);
    let mut problems = Vec::new();
    if let Some(lost) = found.lost_seq {
        problems.push(format!(
            "ROLLBACK: checkpoint seq {lost} left a trace but no valid header; the newest readable is seq {}, so writes flushed after it may be lost",
            c.seq
        ));
    }
    problems.extend(
        found
            .damaged
            .iter()
            .map(|d| format!("damaged metadata header {d}")),
    );
    problems.extend(meta::check_checkpoint(&sb, &c).err().unwrap_or_default());
    Ok(CheckReport {
        seq: c.seq,
        slot,
        lost_seq: found.lost_seq,
        volumes: c
            .objects
            .iter()
            .filter(|o| o.kind == ObjectKind::Volume)
            .count(),
        snapshots: c
            .objects
            .iter()
            .filter(|o| o.kind == ObjectKind::Snapshot)
            .count(),
        clusters: sb.cluster_count,
        allocated_clusters: c.bitmap.iter().map(|b| u64::from(b.count_ones())).sum(),
        problems,
    })
}
