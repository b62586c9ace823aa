//! A volume as a bdev: `VolumeBdev` and its per-core `VolumeChannel`.
//!
//! The channel translates volume offsets to the pool's base device through the lock-free
//! cluster map. Reads and writes of allocated, unshared clusters go straight to this core's
//! base channel: no lock, no message, no other core. Only what changes metadata goes to the
//! pool's home core by message: a write to an unallocated or shared cluster waits there until
//! the cluster is writable in place, then is issued here; flushes, FUA, trims and whole-cluster
//! write-zeroes are settled there.
//!
//! A request is at most one cluster long (`max_io_bytes`), so a read or write touches at most
//! two clusters; trim and write-zeroes are split into a whole-cluster middle (unmapped at home)
//! and up to two partial ends (ignored for trim, written with zeros for write-zeroes).

use super::cluster::VirtCluster;
use super::map::{ClusterMap, Entry};
use super::pool::{Ask, PoolMsg, PoolShared};
use crate::bdev::{Bdev, BdevChannel, BdevError, BdevInfo, Extent, IoOp, IoRequest};
use crate::core_list::CoreId;
use crate::dma::Region;
use crate::reactor::{BdevId, Core, IoCtx, LocalSlot, Msg, OwnerId};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Request pieces per parent request: two data pieces plus one unmap.
const PIECES: u64 = 4;
const PIECE_UNMAP: u8 = 2;
const PIECE_FLUSH: u8 = 3;
/// Requests a volume channel holds in flight without growing its tables (more are allowed and
/// cost one allocation each time a table doubles). Also its base owner's completion queue size.
const PARENTS_PREALLOC: usize = 256;
/// Barriers a channel can wait on at once: the home core runs one at a time, and a channel
/// holds it until its previous generation drained.
const BARRIERS_MAX: usize = 2;

/// What every core's channel of one open volume shares.
#[derive(Debug)]
pub(crate) struct VolumeShared {
    pub(crate) obj: u64,
    pub(crate) map: Arc<ClusterMap>,
    pub(crate) pool: Arc<PoolShared>,
    /// The pool's home state: its slot on the home core, named in every message there.
    pub(crate) home: LocalSlot,
    pub(crate) size_bytes: AtomicU64,
    pub(crate) bdev: OnceLock<BdevId>,
    /// A cluster of zeros, the source of partial write-zeroes.
    pub(crate) zeros: Region,
}

#[derive(Debug)]
pub struct VolumeBdev {
    pub(crate) info: BdevInfo,
    pub(crate) vol: Arc<VolumeShared>,
}

impl Bdev for VolumeBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn size_bytes(&self) -> u64 {
        self.vol.size_bytes.load(Ordering::Acquire)
    }

    fn open_channel(&self, io: &mut IoCtx) -> Result<Box<dyn BdevChannel>, BdevError> {
        let base = self.vol.pool.base_bdev.open_channel(io)?;
        Ok(Box::new(VolumeChannel {
            vol: self.vol.clone(),
            cluster_bytes: u64::from(self.vol.pool.sb.cluster_size_bytes),
            base,
            owner: io.register_owner(PARENTS_PREALLOC),
            parents: Vec::with_capacity(PARENTS_PREALLOC),
            free: Vec::with_capacity(PARENTS_PREALLOC),
            gen: 0,
            in_base: [0; 2],
            barriers: Vec::with_capacity(BARRIERS_MAX),
        }))
    }

    /// Reads the cluster map directly (two acquire loads per cluster, no message): the answer
    /// is a snapshot that concurrent writes may already have changed, which BLOCK_STATUS allows.
    fn allocation(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        extents_max: usize,
        out: &mut Vec<Extent>,
    ) {
        let cluster_bytes = u64::from(self.vol.pool.sb.cluster_size_bytes);
        let size_bytes = self.size_bytes();
        allocation_of(
            &self.vol.map,
            cluster_bytes,
            size_bytes,
            offset_bytes..offset_bytes.saturating_add(len_bytes),
            extents_max,
            out,
        );
    }

    fn reports_allocation(&self) -> bool {
        true
    }
}

/// The extents of `range` in `map`, at cluster granularity: adjacent clusters with the same
/// state merge, unallocated clusters are zero, and any mapped cluster (shared with a snapshot
/// or not) is data. The range is clipped to `size_bytes` and to the map, so a range past the
/// end yields fewer bytes (or no extent) rather than a panic; appending stops once `out` holds
/// `extents_max` entries.
fn allocation_of(
    map: &ClusterMap,
    cluster_bytes: u64,
    size_bytes: u64,
    range: std::ops::Range<u64>,
    extents_max: usize,
    out: &mut Vec<Extent>,
) {
    // A map never covers less than the size (growth extends the map first), but clip to both
    // so a reader racing a grow cannot index a leaf that is not there yet.
    let end = range
        .end
        .min(size_bytes)
        .min(map.clusters().saturating_mul(cluster_bytes));
    let mut at = range.start;
    // The extent being built, not yet pushed.
    let mut run: Option<Extent> = None;
    while at < end {
        let index = at / cluster_bytes;
        let piece_end = ((index + 1) * cluster_bytes).min(end);
        let vcluster = VirtCluster::new(index).expect("the range is clipped to the map");
        let zero = map.get(vcluster) == Entry::Unallocated;
        match &mut run {
            Some(r) if r.zero == zero => r.len_bytes += piece_end - at,
            _ => {
                if let Some(done) = run.take() {
                    out.push(done);
                }
                if out.len() >= extents_max {
                    return;
                }
                run = Some(Extent {
                    len_bytes: piece_end - at,
                    zero,
                });
            }
        }
        at = piece_end;
    }
    if let Some(done) = run {
        out.push(done);
    }
}

/// A volume request in flight, split into pieces on the base bdev; it completes when the
/// last piece does.
struct SplitRequest {
    req: IoRequest,
    /// Pieces not yet finished.
    left: u8,
    errno: i32,
    /// Generation each data piece's base I/O was counted under, while in flight.
    gens: [Option<usize>; 2],
}

pub(crate) struct VolumeChannel {
    vol: Arc<VolumeShared>,
    cluster_bytes: u64,
    base: Box<dyn BdevChannel>,
    owner: OwnerId,
    parents: Vec<Option<SplitRequest>>,
    free: Vec<u32>,
    /// Current barrier generation, and base I/Os in flight per generation.
    gen: usize,
    in_base: [u32; 2],
    /// Barriers waiting for the previous generation to drain: generation, home core, and the
    /// pool's slot there.
    barriers: Vec<(usize, CoreId, LocalSlot)>,
}

/// A piece of a [`SplitRequest`]: byte range in the volume and where its data sits in the buffer.
#[derive(Clone, Copy)]
struct Piece {
    offset: u64,
    len: u32,
    buf_at: u32,
}

impl VolumeChannel {
    fn bdev(&self) -> BdevId {
        *self
            .vol
            .bdev
            .get()
            .expect("volume bdev id is set before any I/O")
    }

    fn new_parent(&mut self, req: IoRequest) -> u32 {
        let p = SplitRequest {
            req,
            left: 0,
            errno: 0,
            gens: [None; 2],
        };
        match self.free.pop() {
            Some(i) => {
                self.parents[i as usize] = Some(p);
                i
            }
            None => {
                self.parents.push(Some(p));
                (self.parents.len() - 1) as u32
            }
        }
    }

    fn parent(&mut self, p: u32) -> &mut SplitRequest {
        self.parents[p as usize].as_mut().expect("live parent")
    }

    /// The up-to-two data pieces of a read or write, split at the cluster boundary.
    fn data_pieces(&self, offset: u64, len: u32) -> [Option<Piece>; 2] {
        let boundary = (offset / self.cluster_bytes + 1) * self.cluster_bytes;
        let first = (boundary - offset).min(u64::from(len)) as u32;
        let second = (first < len).then_some(Piece {
            offset: boundary,
            len: len - first,
            buf_at: first,
        });
        [
            Some(Piece {
                offset,
                len: first,
                buf_at: 0,
            }),
            second,
        ]
    }

    /// Partial ends and whole middle of a trim or write-zeroes range.
    fn range_pieces(&self, offset: u64, len: u32) -> ([Option<Piece>; 2], Option<(u64, u64)>) {
        let end = offset + u64::from(len);
        let first_whole = offset.div_ceil(self.cluster_bytes);
        let end_whole = end / self.cluster_bytes;
        if first_whole >= end_whole {
            // No whole cluster: at most two partial pieces, split at the boundary.
            return (self.data_pieces(offset, len), None);
        }
        let head_len = first_whole * self.cluster_bytes - offset;
        let tail_len = end - end_whole * self.cluster_bytes;
        let head = (head_len > 0).then_some(Piece {
            offset,
            len: head_len as u32,
            buf_at: 0,
        });
        let tail = (tail_len > 0).then_some(Piece {
            offset: end_whole * self.cluster_bytes,
            len: tail_len as u32,
            buf_at: 0,
        });
        ([head, tail], Some((first_whole, end_whole - first_whole)))
    }

    fn piece_of(&self, p: u32, piece: u8) -> Piece {
        let req = self.parents[p as usize].as_ref().expect("live parent").req;
        let pieces = match req.op {
            IoOp::Read | IoOp::Write => self.data_pieces(req.offset_bytes, req.len_bytes),
            IoOp::Trim | IoOp::WriteZeroes => self.range_pieces(req.offset_bytes, req.len_bytes).0,
            IoOp::Flush => [None, None],
        };
        pieces[piece as usize].expect("piece exists")
    }

    /// Issues data piece `piece` of parent `p`: a read, a write, or zeros for write-zeroes.
    fn drive(&mut self, io: &mut IoCtx, p: u32, piece: u8) {
        let req = self.parents[p as usize].as_ref().expect("live parent").req;
        let part = self.piece_of(p, piece);
        let vcluster = VirtCluster::new(part.offset / self.cluster_bytes)
            .expect("a validated request lies inside its volume");
        let entry = self.vol.map.get(vcluster);
        let writing = req.op != IoOp::Read;
        match (req.op, entry) {
            (IoOp::Read, Entry::Unallocated) => {
                let piece = req.buf.expect("validated read has a buffer");
                let piece = piece.sub(part.buf_at, part.len);
                // SAFETY: the submitter lent the buffer to this request, which completes only
                // after its last piece, so this piece is ours until then.
                unsafe { piece.as_mut_slice(part.len) }.fill(0);
                self.piece_done(io, p, 0)
            }
            (IoOp::WriteZeroes, Entry::Unallocated) => self.piece_done(io, p, 0),
            (_, Entry::Mapped { cluster, shared }) if !(writing && shared) => {
                let within = part.offset % self.cluster_bytes;
                let at = self.vol.pool.sb.cluster_offset(cluster) + within;
                let buf = match req.op {
                    // SAFETY: the channel holds the `VolumeShared` that owns the zero region, so
                    // it outlives this request; the region is only ever a write source, so
                    // nothing writes it.
                    IoOp::WriteZeroes => unsafe { self.vol.zeros.io_buf(0, part.len) },
                    _ => req
                        .buf
                        .expect("validated data op has a buffer")
                        .sub(part.buf_at, part.len),
                };
                let base_req = IoRequest {
                    op: if req.op == IoOp::Read {
                        IoOp::Read
                    } else {
                        IoOp::Write
                    },
                    offset_bytes: at,
                    len_bytes: part.len,
                    buf: Some(buf),
                    fua: false,
                    owner: self.owner,
                    tag: p * PIECES as u32 + u32::from(piece),
                };
                self.parent(p).gens[piece as usize] = Some(self.gen);
                self.in_base[self.gen] += 1;
                self.base.submit(io, base_req);
            }
            _ => self.ask_home(io, p, piece, Ask::Writable(vcluster)),
        }
    }

    fn ask_home(&mut self, io: &mut IoCtx, p: u32, piece: u8, ask: Ask) {
        let msg = PoolMsg::Ask {
            home: self.vol.home,
            obj: self.vol.obj,
            ask,
            from: io.core(),
            bdev: self.bdev(),
            token: u64::from(p) * PIECES + u64::from(piece),
        };
        io.send_msg(self.vol.pool.home, Msg::Pool(msg));
    }

    fn piece_done(&mut self, io: &mut IoCtx, p: u32, res: i32) {
        let parent = self.parent(p);
        if res < 0 && parent.errno == 0 {
            parent.errno = -res;
        }
        parent.left -= 1;
        if parent.left > 0 {
            return;
        }
        let req = parent.req;
        if req.fua && parent.errno == 0 && req.op == IoOp::Write {
            // A FUA write is durable only once its (possibly new) cluster mapping is: commit.
            parent.left = 1;
            parent.req.fua = false;
            return self.ask_home(io, p, PIECE_FLUSH, Ask::Flush);
        }
        let res = match (parent.errno, req.op) {
            (0, IoOp::Read | IoOp::Write) => req.len_bytes as i32,
            (0, _) => 0,
            (e, _) => -e,
        };
        self.parents[p as usize] = None;
        self.free.push(p);
        io.post(req.owner, req.tag, res);
    }

    fn on_reply(&mut self, io: &mut IoCtx, token: u64, res: i32) {
        let (p, piece) = ((token / PIECES) as u32, (token % PIECES) as u8);
        if self.parents.get(p as usize).is_none_or(Option::is_none) {
            return;
        }
        match piece {
            0 | 1 if res == 0 => self.drive(io, p, piece),
            _ => self.piece_done(io, p, res),
        }
    }

    fn check_barriers(&mut self, io: &mut IoCtx) {
        let in_base = self.in_base;
        self.barriers.retain(|&(gen, home_core, home)| {
            if in_base[gen] > 0 {
                return true;
            }
            io.send_msg(home_core, Msg::Pool(PoolMsg::BarrierAck { home }));
            false
        });
    }
}

impl BdevChannel for VolumeChannel {
    fn submit(&mut self, io: &mut IoCtx, req: IoRequest) {
        let p = self.new_parent(req);
        match req.op {
            IoOp::Read | IoOp::Write => {
                let pieces = self.data_pieces(req.offset_bytes, req.len_bytes);
                self.parent(p).left = pieces.iter().flatten().count() as u8;
                for (i, _) in pieces.iter().enumerate().filter(|(_, x)| x.is_some()) {
                    self.drive(io, p, i as u8);
                }
            }
            IoOp::Flush => {
                self.parent(p).left = 1;
                self.ask_home(io, p, PIECE_FLUSH, Ask::Flush);
            }
            IoOp::Trim | IoOp::WriteZeroes => {
                let (ends, middle) = self.range_pieces(req.offset_bytes, req.len_bytes);
                // Trim ignores partial ends; write-zeroes writes zeros there.
                let zeroing = req.op == IoOp::WriteZeroes;
                let ends = if zeroing { ends } else { [None, None] };
                let left = ends.iter().flatten().count() as u8 + u8::from(middle.is_some());
                if left == 0 {
                    self.parent(p).left = 1;
                    return self.piece_done(io, p, 0);
                }
                self.parent(p).left = left;
                if let Some((first, count)) = middle {
                    let first = VirtCluster::new(first)
                        .expect("a validated request lies inside its volume");
                    self.ask_home(io, p, PIECE_UNMAP, Ask::Unmap(first, count));
                }
                for (i, _) in ends.iter().enumerate().filter(|(_, e)| e.is_some()) {
                    self.drive(io, p, i as u8);
                }
            }
        }
    }

    fn poll(&mut self, io: &mut IoCtx) -> usize {
        let mut work = self.base.poll(io);
        while let Some(c) = io.pop(self.owner) {
            work += 1;
            let (p, piece) = (c.tag / PIECES as u32, (c.tag % PIECES as u32) as u8);
            let gen = self.parent(p).gens[piece as usize]
                .take()
                .expect("base I/O was counted");
            self.in_base[gen] -= 1;
            let len = self.piece_of(p, piece).len;
            let res = match crate::bdev::IoError::check(IoOp::Read, c.res, len) {
                Ok(()) => 0,
                Err(crate::bdev::IoError::Device { errno }) => -errno,
                Err(_) => -libc::EIO,
            };
            self.piece_done(io, p, res);
        }
        if !self.barriers.is_empty() {
            self.check_barriers(io);
        }
        work
    }

    fn in_flight(&self) -> usize {
        self.parents.len() - self.free.len() + self.base.in_flight()
    }

    /// The base channel lives inside this one, not in the core's table, so its deadline (a
    /// fault bdev's delayed request, a private ring with I/O in flight) reaches the reactor's
    /// sleep only through here; without it a sleeping reactor never wakes to poll the base.
    fn next_deadline(&self) -> Option<std::time::Instant> {
        self.base.next_deadline()
    }

    fn close(&mut self, io: &mut IoCtx) {
        self.base.close(io);
        io.release_owner(self.owner);
    }

    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
}

fn with_channel(
    core: &mut Core,
    bdev: BdevId,
    f: impl FnOnce(&mut VolumeChannel, &mut IoCtx),
) -> bool {
    core.with_channel(bdev, |ch, io| {
        match ch
            .as_any_mut()
            .and_then(|a| a.downcast_mut::<VolumeChannel>())
        {
            Some(v) => {
                f(v, io);
                true
            }
            None => false,
        }
    })
    .unwrap_or(false)
}

/// Home's answer for request piece `token` of the volume channel for `bdev` on this core.
pub(crate) fn on_reply(core: &mut Core, bdev: BdevId, token: u64, res: i32) {
    with_channel(core, bdev, |ch, io| ch.on_reply(io, token, res));
}

/// Home asks this core's channel for `bdev` to report once its current base I/O drained.
pub(crate) fn on_barrier(core: &mut Core, bdev: BdevId, home_core: CoreId, home: LocalSlot) {
    let handled = with_channel(core, bdev, |ch, io| {
        let old = ch.gen;
        ch.gen ^= 1;
        assert!(
            ch.barriers.iter().all(|(g, _, _)| *g != ch.gen),
            "barriers overlap"
        );
        ch.barriers.push((old, home_core, home));
        ch.check_barriers(io);
    });
    if !handled {
        // The volume is closed on this core: nothing can be in flight.
        core.io()
            .send_msg(home_core, Msg::Pool(PoolMsg::BarrierAck { home }));
    }
}

#[cfg(test)]
mod tests {
    //! Guards `VolumeBdev::allocation`, the source of NBD BLOCK_STATUS for thin volumes:
    //! cluster-granular extents, merged runs, zero only for unallocated clusters (a clone's
    //! clusters shared from its snapshot are data), clipping to the asked range and the size,
    //! and `extents_max`.

    use super::*;
    use crate::bdev::malloc::MallocBdev;
    use crate::volume::cluster::PhysCluster;
    use crate::volume::Pool;
    use crate::{CoreList, Engine, EngineConfig};

    const MIB: u64 = 1 << 20;

    fn ext(len_bytes: u64, zero: bool) -> Extent {
        Extent { len_bytes, zero }
    }

    fn of(map: &ClusterMap, size: u64, range: std::ops::Range<u64>, max: usize) -> Vec<Extent> {
        let mut out = Vec::new();
        allocation_of(map, MIB, size, range, max, &mut out);
        out
    }

    fn mapped(cluster: u64, shared: bool) -> Entry {
        Entry::Mapped {
            cluster: PhysCluster::new(cluster).unwrap(),
            shared,
        }
    }

    fn v(index: u64) -> VirtCluster {
        VirtCluster::new(index).unwrap()
    }

    #[test]
    fn map_extents_merge_clip_and_respect_the_limit() {
        let map = ClusterMap::new(8);
        let size = 8 * MIB;
        assert_eq!(of(&map, size, 0..size, 16), vec![ext(size, true)]);
        map.set(v(0), mapped(5, false));
        map.set(v(3), mapped(9, true));
        map.set(v(4), mapped(2, false));
        let all = of(&map, size, 0..size, 16);
        assert_eq!(
            all,
            vec![
                ext(MIB, false),
                ext(2 * MIB, true),
                ext(2 * MIB, false),
                ext(3 * MIB, true)
            ]
        );
        assert_eq!(of(&map, size, 0..size, 2), all[..2].to_vec());
        assert_eq!(of(&map, size, 0..size, 0), vec![]);
        // First and last extents are clipped to the asked range.
        assert_eq!(
            of(&map, size, MIB / 2..3 * MIB + 4096, 16),
            vec![ext(MIB / 2, false), ext(2 * MIB, true), ext(4096, false)]
        );
        // Past the end: clipped to the size, or nothing at all.
        assert_eq!(of(&map, size, 7 * MIB..u64::MAX, 16), vec![ext(MIB, true)]);
        assert_eq!(of(&map, size, size..size + MIB, 16), vec![]);
        assert_eq!(of(&map, size, u64::MAX - 10..u64::MAX, 16), vec![]);
        // A size that is not a cluster multiple ends inside the last cluster.
        assert_eq!(
            of(&map, 4 * MIB + 8192, 3 * MIB..8 * MIB, 16),
            vec![ext(MIB + 8192, false)]
        );
    }

    /// The trait method of a real open volume, as the NBD server calls it.
    fn allocation(pool: &Pool, engine: &Engine, handle: &crate::BdevHandle) -> Vec<Extent> {
        let id = handle.id();
        let vol = pool
            .query(engine, move |h| {
                h.open
                    .values()
                    .find(|(b, _)| *b == id)
                    .and_then(|(_, v)| v.upgrade())
            })
            .unwrap()
            .expect("volume is open");
        let bdev = VolumeBdev {
            info: handle.info().clone(),
            vol,
        };
        let mut out = Vec::new();
        bdev.allocation(0, u64::MAX, 64, &mut out);
        out
    }

    #[test]
    fn volume_writes_and_clones_show_in_allocation() {
        let cpus = crate::sys::allowed_cpus();
        let cores = CoreList::parse(&cpus[0].to_string()).unwrap();
        let home = cores.as_slice()[0];
        let mut config = EngineConfig::new(cores);
        config.buf_count = 32;
        let engine = Engine::start(config).unwrap();
        let base: Arc<dyn Bdev> = Arc::new(MallocBdev::new("base", 64 * MIB, 4096).unwrap());
        let pool = Pool::create(&engine, "p", base, home, MIB as u32).unwrap();
        pool.create_volume(&engine, "v", 6 * MIB, vec![]).unwrap();
        let hv = pool.open_volume(&engine, "v").unwrap();
        assert_eq!(allocation(&pool, &engine, &hv), vec![ext(6 * MIB, true)]);

        let mut q = engine.queue(&hv, home, 8).unwrap();
        q.write_at(4096, &[1u8; 4096], false).unwrap();
        q.write_at(3 * MIB, &[3u8; 4096], false).unwrap();
        let pattern = vec![
            ext(MIB, false),
            ext(2 * MIB, true),
            ext(MIB, false),
            ext(2 * MIB, true),
        ];
        assert_eq!(allocation(&pool, &engine, &hv), pattern);

        pool.snapshot(&engine, "v", "s").unwrap();
        pool.clone_snapshot(&engine, "s", "c").unwrap();
        let hc = pool.open_volume(&engine, "c").unwrap();
        assert_eq!(allocation(&pool, &engine, &hc), pattern);
        let mut qc = engine.queue(&hc, home, 8).unwrap();
        qc.write_at(MIB, &[2u8; 4096], false).unwrap();
        assert_eq!(
            allocation(&pool, &engine, &hc),
            vec![
                ext(2 * MIB, false),
                ext(MIB, true),
                ext(MIB, false),
                ext(2 * MIB, true)
            ]
        );
        drop((q, qc));
        engine.stop();
    }
}
