//! The nexus: a volume's front on the node where it is attached, an engine bdev that sends
//! each write, flush and trim to every in-sync replica and acknowledges only when all of them
//! have (DRBD's protocol C), and serves reads from the local replica when there is one.
//!
//! Ownership: [`NexusShared`] is the one state every core's channel sees: the epoch, each
//! child's state and path set-up, the dirty block and unflushed region maps, the copy-range
//! table that orders resync copies against client writes, the write freeze (promote only)
//! and the resync order. Channels ([`channel`]) own the I/O path of their core: their own
//! connection to each remote child, their in-flight table and their timers, so the per-I/O
//! path takes no lock. State changes that every core must see (a fault, a new path, the
//! epoch) are atomics read per request, or a generation counter that tells a channel to
//! pick up new paths under the (control-path) mutex. Per-write accounting is core-local: each
//! channel counts its own writes in flight in a plain field, and the write freeze (and a
//! resync's write barrier) learns that every core has drained by asking each one with a
//! message ([`NexusShared::quiesce`], [`NexusShared::barrier`]), so a write costs no shared
//! read-modify-write and no `Arc` clone, except a write that goes to a syncing child: it
//! enters its copy ranges ([`NexusShared::enter_ranges`]).
//!
//! What a nexus must never do: acknowledge a write before every in-sync child has it, write
//! under an epoch a replica has fenced off, let a child back into the in-sync set before
//! every block it missed has been copied, let a resync copy overwrite a newer client write, acknowledge a write a faulted child missed before
//! every in-sync child holds a data generation above that child's and, for a nexus with a
//! recorder, the control process has recorded the smaller in-sync set (the generation raise,
//! [`NexusShared::fault`], `manager.rs` and [`insync`]), or read from a child that is not in
//! sync.
//! `docs/replication.md` gives the arguments.

pub mod bitmap;
mod channel;
pub mod insync;
pub mod manager;
mod resync;

use crate::proto::{Epoch, VolumeId};
use crate::replica::HostedReplica;
use crate::transport::Link;
use bitmap::{BlockMap, RegionMap, AREA_BYTES};
use cairn_engine::bdev::{Bdev, BdevChannel, BdevError, BdevInfo};
use cairn_engine::reactor::{BdevId, IoCtx};
use cairn_engine::{Core, CoreId};
use insync::{InSyncRecorder, InSyncReport, ReplicaSync};
use parking_lot::Mutex;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Children (replicas) one nexus can have.
pub const CHILDREN_MAX: usize = 3;
/// Largest request the nexus accepts (one DMA buffer, one replica frame); callers split.
pub const NEXUS_IO_MAX_BYTES: u32 = 128 << 10;
/// Requests one core's channel has in flight; more wait in the channel, in order.
pub const PARENTS_MAX: usize = 256;
/// Bytes one core may have sent to one remote child and not had answered. At the limit
/// further sub-requests to that child wait in the channel's backlog (back-pressure).
pub const CHILD_IN_FLIGHT_BYTES_MAX: usize = 16 << 20;
/// Default for how long a remote child may take to answer before it is faulted.
pub const IO_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);
/// Default region size of the unflushed maps and of `verify` (what a replica missed is
/// tracked per 4 KiB block whatever this is: [`bitmap::BlockMap`]).
pub const REGION_BYTES_DEFAULT: u64 = 64 << 10;
/// Smallest and largest region sizes accepted.
pub const REGION_BYTES_MIN: u64 = 4096;
/// The longest a resync copy may hold its range while a client write waits on it (the bound
/// on a client write's wait for a resync); past it the target is faulted. The default of
/// [`NexusOptions::copy_hold_max`], and what cairn-node uses.
pub const COPY_HOLD_MAX: Duration = Duration::from_millis(50);
pub const REGION_BYTES_MAX: u64 = 1 << 30;

/// Where a child lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChildSpec {
    /// This node's volume of the nexus's name, reached without the network.
    Local,
    /// A replica server's endpoint.
    Remote { endpoint: String },
}

impl fmt::Display for ChildSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChildSpec::Local => f.write_str("local"),
            ChildSpec::Remote { endpoint } => f.write_str(endpoint),
        }
    }
}

impl ChildSpec {
    /// Parses `local` or `host:port`.
    pub fn parse(s: &str) -> Result<ChildSpec, String> {
        if s == "local" {
            return Ok(ChildSpec::Local);
        }
        match s.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(ChildSpec::Remote {
                    endpoint: s.to_string(),
                })
            }
            _ => Err(format!(
                "replica '{s}' is neither 'local' nor HOST:PORT of a replica server"
            )),
        }
    }
}

/// A child's place in the nexus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ChildState {
    /// No child in this slot.
    Empty = 0,
    /// Receives every write; counts toward the acknowledgement and the in-sync minimum.
    InSync = 1,
    /// Out: missed writes are recorded in its dirty map until it is resynced.
    Faulted = 2,
    /// Connected and being resynced or rebuilt: receives every client write (ordered against
    /// the copies, `resync.rs`), but counts toward nothing and is never read from.
    Syncing = 3,
}

impl ChildState {
    fn from_u8(v: u8) -> ChildState {
        match v {
            1 => ChildState::InSync,
            2 => ChildState::Faulted,
            3 => ChildState::Syncing,
            _ => ChildState::Empty,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ChildState::Empty => "empty",
            ChildState::InSync => "in-sync",
            ChildState::Faulted => "faulted",
            ChildState::Syncing => "syncing",
        }
    }
}

/// How a channel reaches a child: made on a control thread, picked up by the core.
/// Each carries the epoch it was opened under, which every request on it uses.
pub(crate) enum PathSetup {
    Local(Arc<HostedReplica>, Epoch),
    Remote(Box<dyn Link>, Epoch),
}

/// One child slot, shared by every core.
pub(crate) struct ChildShared {
    /// The child's state (low 8 bits, a [`ChildState`]) and the slot's incarnation (the
    /// bits above): the incarnation rises with every [`ChildShared::enter`] (each time the
    /// child becomes syncing, is added, placed or removed), so a resync job, which carries
    /// the incarnation it was ordered for, never acts on a later syncing period of the slot
    /// (one word, so the job's final compare-and-swap checks both at once).
    state: AtomicU64,
    /// The incarnation whose paths are published on every core ([`NexusShared::publish`]):
    /// a syncing child is ordered a resync only once this equals its incarnation.
    published: AtomicU64,
    spec: Mutex<Option<ChildSpec>>,
    /// Bumped when new paths are published in `paths` (or the child is removed).
    gen: AtomicU64,
    /// One prepared path per core (indexed like `NexusShared::cores`), taken by its channel.
    paths: Mutex<Vec<Option<PathSetup>>>,
    /// Blocks this child missed while not in sync.
    pub(crate) dirty: BlockMap,
    /// Regions written to this child since its last flush, by flush generation parity: a
    /// crash of the child may lose them, so a fault merges them into `dirty`.
    pub(crate) unflushed: [RegionMap; 2],
    reason: Mutex<String>,
    /// Set by `add`: the next resync of this child is a full rebuild.
    pub(crate) needs_rebuild: AtomicBool,
    /// Bytes copied to this child by its running (or last) resync or rebuild: reset when a
    /// job starts and when the child is added, so it never carries an earlier job's count.
    pub(crate) copied_bytes: AtomicU64,
    /// The data generation this child's replica holds durably, as far as the nexus knows
    /// (from its `OpenOk`, then from each generation the manager stored on it).
    pub(crate) gen_stored: AtomicU64,
    /// The longest a client write waited on a copy of this child's running (or last) resync,
    /// in nanoseconds: reset when a job starts.
    pub(crate) write_wait_max_ns: AtomicU64,
}

impl ChildShared {
    fn new(size_bytes: u64, regions: u64, shift: u32, cores: usize) -> ChildShared {
        ChildShared {
            state: AtomicU64::new(ChildState::Empty as u64),
            published: AtomicU64::new(0),
            spec: Mutex::new(None),
            gen: AtomicU64::new(0),
            paths: Mutex::new((0..cores).map(|_| None).collect()),
            dirty: BlockMap::new(size_bytes),
            unflushed: [
                RegionMap::new(regions, shift),
                RegionMap::new(regions, shift),
            ],
            reason: Mutex::new(String::new()),
            needs_rebuild: AtomicBool::new(false),
            copied_bytes: AtomicU64::new(0),
            gen_stored: AtomicU64::new(0),
            write_wait_max_ns: AtomicU64::new(0),
        }
    }

    #[inline]
    pub(crate) fn state(&self) -> ChildState {
        state_of(self.state.load(Ordering::SeqCst))
    }

    /// The state word: state and incarnation ([`state_of`], [`incarnation_of`]).
    #[inline]
    pub(crate) fn word(&self) -> u64 {
        self.state.load(Ordering::SeqCst)
    }

    /// Puts the child in state `s` as a new incarnation of the slot; returns it.
    pub(crate) fn enter(&self, s: ChildState) -> u64 {
        let prev = self
            .state
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| {
                Some(pack(incarnation_of(w) + 1, s))
            })
            .expect("the update always applies");
        incarnation_of(prev) + 1
    }

    /// Puts the child, if its state word is still `from`, in state `s` as a new
    /// incarnation; returns it, or `None` when the word changed (a fault, a remove).
    pub(crate) fn enter_from(&self, from: u64, s: ChildState) -> Option<u64> {
        let inc = incarnation_of(from) + 1;
        self.state
            .compare_exchange(from, pack(inc, s), Ordering::SeqCst, Ordering::SeqCst)
            .ok()
            .map(|_| inc)
    }

    /// Whether the paths of the child's current incarnation are published on every core.
    pub(crate) fn paths_published(&self) -> bool {
        self.published.load(Ordering::SeqCst) == incarnation_of(self.word())
    }
}

/// A state word from an incarnation and a state.
#[inline]
pub(crate) fn pack(incarnation: u64, s: ChildState) -> u64 {
    (incarnation << 8) | s as u64
}

/// The state of a state word.
#[inline]
pub(crate) fn state_of(word: u64) -> ChildState {
    ChildState::from_u8(word as u8)
}

/// The incarnation of a state word.
#[inline]
pub(crate) fn incarnation_of(word: u64) -> u64 {
    word >> 8
}

/// Rounds of asking every core a question: whether its writes drained under the freeze
/// (`quiesce`), or whether the writes it started before the round ended (`barrier`).
/// Control path only (once per freeze or per resync job), hence the mutex.
#[derive(Debug, Default)]
pub(crate) struct CoreRounds(Mutex<RoundState>);

#[derive(Debug, Default)]
struct RoundState {
    /// Numbers the rounds, so a late answer to an abandoned round is not counted.
    round: u64,
    /// Cores that answered this round.
    answered: usize,
}

impl CoreRounds {
    /// Starts a new round (abandoning any earlier one) and returns its number.
    fn begin(&self) -> u64 {
        let mut q = self.0.lock();
        q.round += 1;
        q.answered = 0;
        q.round
    }

    /// Counts one core's answer to round `round`; an answer to an abandoned round is ignored.
    fn answer(&self, round: u64) {
        let mut q = self.0.lock();
        if q.round == round {
            q.answered += 1;
        }
    }

    /// Whether all `cores` answered round `round`.
    fn complete(&self, round: u64, cores: usize) -> bool {
        let q = self.0.lock();
        q.round == round && q.answered == cores
    }
}

/// A resync the manager asked the home core to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ResyncOrder {
    pub(crate) child: usize,
    /// The child's incarnation when ordered: the job runs only while the child is syncing
    /// in it.
    pub(crate) incarnation: u64,
    pub(crate) full: bool,
}

/// Progress of the running resync, for show. Every field but `rebuilt_bytes` is reset when a
/// job starts and only goes forward within it (the rule is in docs/replication.md,
/// "Progress").
#[derive(Debug, Default)]
pub(crate) struct ResyncProgress {
    /// Child index + 1, or 0 when none runs.
    pub(crate) child: AtomicU8,
    pub(crate) full: AtomicBool,
    /// Bytes this job has copied to the target.
    pub(crate) done_bytes: AtomicU64,
    /// Bytes dirty when the job's single pass starts; fixed from then on.
    pub(crate) total_bytes: AtomicU64,
    /// The highest `done_bytes / total_bytes` this job has reached, in parts per million.
    pub(crate) progress_ppm: AtomicU64,
    pub(crate) elapsed_ms: AtomicU64,
    /// Bytes every full rebuild of this nexus has copied, over its whole life: never reset,
    /// so the control process can count rebuilds quicker than its passes (its increase).
    pub(crate) rebuilt_bytes: AtomicU64,
}

impl ResyncProgress {
    /// Parts per million of a whole.
    pub(crate) const PPM: u64 = 1_000_000;

    /// Publishes the job's counters; the total and the fraction only ever rise.
    pub(crate) fn publish(&self, done_bytes: u64, total_bytes: u64) {
        self.done_bytes.store(done_bytes, Ordering::Release);
        let total = self
            .total_bytes
            .fetch_max(total_bytes.max(done_bytes), Ordering::AcqRel)
            .max(total_bytes)
            .max(done_bytes);
        if total > 0 {
            let ppm = (u128::from(done_bytes) * u128::from(Self::PPM) / u128::from(total)) as u64;
            self.progress_ppm.fetch_max(ppm, Ordering::AcqRel);
        }
    }
}

/// How a nexus behaves; fixed at creation.
#[derive(Clone, Debug)]
pub struct NexusOptions {
    /// Writes fail (EIO) rather than continue with fewer in-sync children than this.
    pub min_in_sync: u32,
    pub region_bytes: u64,
    pub io_timeout: Duration,
    /// Resync and rebuild copy at most this many bytes per second; `None` is unlimited.
    pub rebuild_bytes_per_s: Option<u64>,
    /// A resync copy holding its range longer than this while a client write waits on it
    /// faults the target ([`COPY_HOLD_MAX`]; tests that must not fail on a slow machine
    /// raise it).
    pub copy_hold_max: Duration,
}

impl Default for NexusOptions {
    fn default() -> Self {
        NexusOptions {
            min_in_sync: 1,
            region_bytes: REGION_BYTES_DEFAULT,
            io_timeout: IO_TIMEOUT_DEFAULT,
            rebuild_bytes_per_s: None,
            copy_hold_max: COPY_HOLD_MAX,
        }
    }
}

/// The state every core's channel of one nexus shares.
pub struct NexusShared {
    pub(crate) name: String,
    pub(crate) volume_id: VolumeId,
    pub(crate) info: BdevInfo,
    pub(crate) options: NexusOptions,
    pub(crate) epoch: AtomicU64,
    /// The highest of this nexus's epochs that a replica refused (StaleEpoch: a newer nexus
    /// owns the volume); 0 when none was. The nexus is fenced, and every write fails, while
    /// it is at or above `epoch` ([`NexusShared::fenced`]). Kept as an epoch rather than a
    /// flag so that a refusal of an epoch the nexus has already left (a late answer on a path
    /// its own promote replaced) can never fence the epoch it moved to.
    pub(crate) fenced_epoch: AtomicU64,
    pub(crate) children: [ChildShared; CHILDREN_MAX],
    /// Per copy range ([`AREA_BYTES`]): [`RANGE_COPYING`] while a resync copies it,
    /// [`RANGE_WAITED`] once a client write waited on that copy, and ([`RANGE_WRITES`]) the
    /// count of client writes in flight to it that go to a syncing child. Touched only by
    /// writes that go to a syncing child and by the resync (`docs/replication.md`, "Why a
    /// copy never overwrites a newer write").
    pub(crate) ranges: Box<[AtomicU32]>,
    /// Set while a promote re-opens children: new requests (reads too) wait in their
    /// channels. Read (Acquire, no read-modify-write) by every request.
    pub(crate) frozen: AtomicBool,
    pub(crate) cores: Vec<CoreId>,
    /// The nexus's bdev, so a control message can find its channel on a core.
    pub(crate) bdev: OnceLock<BdevId>,
    /// The current quiesce round (control path: once per freeze).
    pub(crate) quiesce: CoreRounds,
    /// The current write barrier round (once per resync job, [`NexusShared::barrier`]).
    pub(crate) barrier: CoreRounds,
    /// Flush generation: its parity picks the `unflushed` map new writes are recorded in.
    pub(crate) flush_gen: AtomicU64,
    /// A flush that switched generations is in flight; others do not switch.
    pub(crate) flip_busy: AtomicBool,
    /// The resync order; also the lock under which the manager makes a child syncing and
    /// publishes its paths, so an order always sees both ([`NexusShared::order_resync`]).
    pub(crate) resync_order: Mutex<Option<ResyncOrder>>,
    /// Set with `resync_order`, so the home core looks at the mutex only when told to.
    pub(crate) resync_ordered: AtomicBool,
    pub(crate) resync: ResyncProgress,
    /// The data generation every in-sync child must hold before a write completed now may be
    /// acknowledged: raised by one each time the in-sync set shrinks (`fault`).
    pub(crate) gen_target: AtomicU64,
    /// The highest generation the manager has stored on every in-sync child; writes that
    /// completed when `gen_target` was above it wait in their channels (`held`).
    pub(crate) gen_durable: AtomicU64,
    /// Serialises what the manager's control threads do with the replicas under the
    /// nexus's epoch (generation raises, reconnects, adds) against a promote, which changes
    /// that epoch: a handshake at the epoch a promote is leaving would be refused, and the
    /// refusal read as a fence.
    pub(crate) epoch_lock: Mutex<()>,
    /// The manager's monitor thread, woken by a fault to raise the generation at once.
    pub(crate) raiser: Mutex<Option<std::thread::Thread>>,
    /// This node's replica, once a local child was opened: the manager stores generations on
    /// it without going through the replica set (whose lock node shutdown may not take).
    pub(crate) local: Mutex<Option<Arc<HostedReplica>>>,
    /// Where the in-sync set is recorded durably (set once, at create): a raise is durable
    /// only once the recorder accepted it ([`insync`]).
    pub(crate) recorder: OnceLock<Arc<dyn InSyncRecorder>>,
    /// The last report the recorder accepted; an unchanged set is not sent again. Under
    /// `epoch_lock`, like every report.
    pub(crate) reported: Mutex<Option<InSyncReport>>,
    /// Set while the last report failed, so the failure is logged once, not per try.
    pub(crate) record_failing: AtomicBool,
    /// Set by `destroy` before the bdev is removed: writes held for a raise that is not
    /// durable (the recorder unreachable) fail with EIO instead of keeping the channels busy.
    pub(crate) closing: AtomicBool,
}

impl fmt::Debug for NexusShared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NexusShared")
            .field("name", &self.name)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl NexusShared {
    pub(crate) fn new(
        name: &str,
        volume_id: VolumeId,
        size_bytes: u64,
        block_size_bytes: u32,
        options: NexusOptions,
        cores: Vec<CoreId>,
    ) -> NexusShared {
        let shift = options.region_bytes.trailing_zeros();
        let regions = size_bytes.div_ceil(options.region_bytes);
        let n = cores.len();
        NexusShared {
            name: name.to_string(),
            volume_id,
            info: BdevInfo {
                name: name.to_string(),
                block_size_bytes,
                size_bytes,
                max_io_bytes: NEXUS_IO_MAX_BYTES,
                buf_align_bytes: block_size_bytes.max(512),
                can_trim: true,
                can_write_zeroes: true,
                read_only: false,
            },
            options,
            epoch: AtomicU64::new(0),
            fenced_epoch: AtomicU64::new(0),
            children: std::array::from_fn(|_| ChildShared::new(size_bytes, regions, shift, n)),
            ranges: (0..size_bytes.div_ceil(AREA_BYTES))
                .map(|_| AtomicU32::new(0))
                .collect(),
            frozen: AtomicBool::new(false),
            cores,
            bdev: OnceLock::new(),
            quiesce: CoreRounds::default(),
            barrier: CoreRounds::default(),
            flush_gen: AtomicU64::new(0),
            flip_busy: AtomicBool::new(false),
            resync_order: Mutex::new(None),
            resync_ordered: AtomicBool::new(false),
            resync: ResyncProgress::default(),
            gen_target: AtomicU64::new(0),
            gen_durable: AtomicU64::new(0),
            epoch_lock: Mutex::new(()),
            raiser: Mutex::new(None),
            local: Mutex::new(None),
            recorder: OnceLock::new(),
            reported: Mutex::new(None),
            record_failing: AtomicBool::new(false),
            closing: AtomicBool::new(false),
        }
    }

    /// The in-sync set at `generation`, as the recorder is told it: a child is in sync when
    /// it is in the in-sync set and holds `generation` (a child back from a resync that has
    /// not been given it yet is still out).
    pub(crate) fn report(&self, generation: u64) -> InSyncReport {
        let replicas = self
            .children
            .iter()
            .filter_map(|child| {
                let spec = child.spec.lock().clone()?;
                let in_sync = child.state() == ChildState::InSync
                    && child.gen_stored.load(Ordering::SeqCst) >= generation;
                let sync = if in_sync {
                    ReplicaSync::InSync
                } else {
                    ReplicaSync::OutOfSync
                };
                Some((spec.to_string(), sync))
            })
            .collect();
        InSyncReport {
            epoch: self.epoch(),
            generation,
            replicas,
        }
    }

    /// Whether writes completed now must wait for a generation raise.
    #[inline]
    pub(crate) fn raise_pending(&self) -> bool {
        self.gen_durable.load(Ordering::SeqCst) < self.gen_target.load(Ordering::SeqCst)
    }

    pub(crate) fn child(&self, c: usize) -> &ChildShared {
        &self.children[c]
    }

    pub(crate) fn in_sync_count(&self) -> u32 {
        self.children
            .iter()
            .filter(|c| c.state() == ChildState::InSync)
            .count() as u32
    }

    /// Takes child `c` out of the in-sync set (or aborts its resync). Everything it may
    /// have lost (writes since its last flush) joins what it missed.
    pub(crate) fn fault(&self, c: usize, reason: &str) {
        self.fault_in(c, None, reason);
    }

    /// [`NexusShared::fault`], of incarnation `only` of the slot if given (a resync job
    /// faults only the syncing period it ran for, never a replica added to the slot since).
    ///
    /// A loop: the state read and the switch to faulted are two steps, and the job's switch
    /// from syncing to in sync may land between them; the fault is then retried on the
    /// in-sync child, through the in-sync path (the generation raise), so a write that
    /// failed on the target is never acknowledged while the target counts as in sync.
    pub(crate) fn fault_in(&self, c: usize, only: Option<u64>, reason: &str) {
        let child = &self.children[c];
        let was = loop {
            let word = child.word();
            let was = state_of(word);
            if was == ChildState::Empty || was == ChildState::Faulted {
                return;
            }
            if only.is_some_and(|i| i != incarnation_of(word)) {
                return;
            }
            if was == ChildState::InSync {
                // The in-sync set shrinks: raised before the state changes (both SeqCst), so
                // a write that sees the child out (or fails on it) and then completes sees
                // the new target and waits for it. A lost race below only costs one extra
                // raise.
                self.gen_target.fetch_add(1, Ordering::SeqCst);
            }
            let faulted = pack(incarnation_of(word), ChildState::Faulted);
            #[cfg(test)]
            if let Some(race) = tests::FAULT_RACE.take() {
                race(child);
            }
            if child
                .state
                .compare_exchange(word, faulted, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                break was;
            }
        };
        child.dirty.merge_regions(&child.unflushed[0]);
        child.dirty.merge_regions(&child.unflushed[1]);
        *child.reason.lock() = reason.to_string();
        if was == ChildState::InSync {
            if let Some(t) = self.raiser.lock().as_ref() {
                t.unpark();
            }
        }
        let spec = child.spec.lock().clone();
        tracing::warn!(
            nexus = %self.name,
            child = %spec.map(|s| s.to_string()).unwrap_or_default(),
            was = was.name(),
            reason,
            "child faulted"
        );
    }

    /// Publishes one path set-up per core for child `c` (or none: removed) and tells every
    /// channel to pick them up. The manager calls it under the `resync_order` lock, right
    /// after it set the child's state, and records the child's incarnation as published.
    pub(crate) fn publish(&self, c: usize, paths: Vec<Option<PathSetup>>) {
        if let Some(Some(PathSetup::Local(r, _))) = paths.first() {
            *self.local.lock() = Some(r.clone());
        }
        let child = &self.children[c];
        *child.paths.lock() = paths;
        child.gen.fetch_add(1, Ordering::AcqRel);
        child
            .published
            .store(incarnation_of(child.word()), Ordering::SeqCst);
    }

    /// Orders a resync of the first syncing child whose paths are published, when none is
    /// running or ordered; true when it ordered one. Under the `resync_order` lock, which the
    /// manager holds while it makes a child syncing and publishes its paths: an order is
    /// never given between the two, so the job's barrier, sent after the order, reaches
    /// every core after the paths were published.
    pub(crate) fn order_resync(&self) -> bool {
        let mut order = self.resync_order.lock();
        if order.is_some() || self.resync.child.load(Ordering::Acquire) != 0 {
            return false;
        }
        let Some((c, word)) = (0..CHILDREN_MAX).find_map(|c| {
            let child = self.child(c);
            let word = child.word();
            (state_of(word) == ChildState::Syncing && child.paths_published()).then_some((c, word))
        }) else {
            return false;
        };
        let full = self.child(c).needs_rebuild.swap(false, Ordering::AcqRel);
        *order = Some(ResyncOrder {
            child: c,
            incarnation: incarnation_of(word),
            full,
        });
        self.resync_ordered.store(true, Ordering::Release);
        true
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Whether a replica refused the nexus's current epoch: a newer nexus owns the volume.
    pub(crate) fn fenced(&self) -> bool {
        self.fenced_epoch.load(Ordering::Acquire) >= self.epoch()
    }

    /// A replica refused `epoch`; true when that fenced the nexus (it was not fenced before,
    /// and `epoch` is its current one).
    pub(crate) fn fence(&self, epoch: u64) -> bool {
        let was = self.fenced();
        self.fenced_epoch.fetch_max(epoch, Ordering::AcqRel);
        !was && self.fenced()
    }

    /// Freezes client I/O and asks every core's channel to answer once the requests it has
    /// in flight have finished; `send` delivers a control message to a core. Returns the
    /// round for [`NexusShared::quiesced`].
    ///
    /// Why this is enough: `frozen` is stored before the messages are sent, so a channel that
    /// handles its message sees the freeze in every request it starts afterwards (the inbox
    /// orders them); the requests it had started are counted in its own
    /// `requests_in_flight`, and it answers when that reaches zero. Reads are frozen too:
    /// the promote raises every replica's fence, and a read still in flight on an old path
    /// would be refused on each child in turn.
    pub(crate) fn quiesce(
        self: &Arc<Self>,
        send: impl FnMut(CoreId, Box<dyn FnOnce(&mut Core) + Send>),
    ) -> u64 {
        self.frozen.store(true, Ordering::SeqCst);
        let round = self.quiesce.begin();
        self.ask_every_core(send, move |c, shared| channel::on_quiesce(c, shared, round));
        round
    }

    /// Delivers `ask` to this nexus's channel on every core through `send`.
    fn ask_every_core(
        self: &Arc<Self>,
        mut send: impl FnMut(CoreId, Box<dyn FnOnce(&mut Core) + Send>),
        ask: impl Fn(&mut Core, &Arc<NexusShared>) + Copy + Send + 'static,
    ) {
        for &core in &self.cores {
            let shared = self.clone();
            send(core, Box::new(move |c: &mut Core| ask(c, &shared)));
        }
    }

    /// Starts a write barrier: asks every core's channel to answer once every write it
    /// started before the message arrived has finished (writes started later do not count,
    /// so a busy volume still answers). Returns the round for [`NexusShared::barrier_done`].
    ///
    /// A resync job starts with one after its target became syncing: every write that saw
    /// the target faulted (and so will mark it dirty at completion rather than write it) has
    /// then finished, so the dirty map the single pass copies is complete.
    pub(crate) fn barrier(
        self: &Arc<Self>,
        send: impl FnMut(CoreId, Box<dyn FnOnce(&mut Core) + Send>),
    ) -> u64 {
        let round = self.barrier.begin();
        self.ask_every_core(send, move |c, shared| channel::on_barrier(c, shared, round));
        round
    }

    /// Counts one core's answer to barrier round `round`.
    pub(crate) fn barrier_passed(&self, round: u64) {
        self.barrier.answer(round);
    }

    /// Whether every core answered barrier round `round`.
    pub(crate) fn barrier_done(&self, round: u64) -> bool {
        self.barrier.complete(round, self.cores.len())
    }

    /// The copy ranges `[offset_bytes, offset_bytes + len_bytes)` touches.
    #[inline]
    pub(crate) fn range_span(offset_bytes: u64, len_bytes: u64) -> std::ops::RangeInclusive<usize> {
        let first = (offset_bytes / AREA_BYTES) as usize;
        let last = ((offset_bytes + len_bytes.max(1) - 1) / AREA_BYTES) as usize;
        first..=last
    }

    /// A client write to a syncing child enters its copy ranges: false (and nothing held)
    /// when a copy holds one of them, so the write waits and tries again.
    pub(crate) fn enter_ranges(&self, offset_bytes: u64, len_bytes: u64) -> bool {
        let span = Self::range_span(offset_bytes, len_bytes);
        let last = (*span.end()).min(self.ranges.len() - 1);
        for r in *span.start()..=last {
            // One read-modify-write both counts the write and sees a copy that holds the
            // range: single-location RMWs are totally ordered with the copier's `fetch_or`.
            if self.ranges[r].fetch_add(1, Ordering::SeqCst) & RANGE_COPYING != 0 {
                // Backs out of this range and tells the copy that a client waits (it must
                // not hold the range too long) in one update: the mark is set only while
                // the copying bit still is, so a copy that released the range meanwhile
                // leaves no stray mark for the next one.
                let back = |w: u32| {
                    let w = w - 1;
                    Some(if w & RANGE_COPYING != 0 {
                        w | RANGE_WAITED
                    } else {
                        w
                    })
                };
                self.ranges[r]
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, back)
                    .expect("the update always applies");
                for earlier in *span.start()..r {
                    self.ranges[earlier].fetch_sub(1, Ordering::SeqCst);
                }
                return false;
            }
        }
        true
    }

    /// A write that entered its ranges finished on every child.
    pub(crate) fn leave_ranges(&self, offset_bytes: u64, len_bytes: u64) {
        let span = Self::range_span(offset_bytes, len_bytes);
        let last = (*span.end()).min(self.ranges.len() - 1);
        for r in *span.start()..=last {
            self.ranges[r].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Counts one core's answer to quiesce round `round`.
    pub(crate) fn drained(&self, round: u64) {
        self.quiesce.answer(round);
    }

    /// Whether every core answered quiesce round `round`: no write runs anywhere.
    pub(crate) fn quiesced(&self, round: u64) -> bool {
        self.quiesce.complete(round, self.cores.len())
    }
}

/// A copy range's word in [`NexusShared::ranges`]: set while a resync copies the range; the
/// bits below count client writes in flight to it.
pub(crate) const RANGE_COPYING: u32 = 1 << 31;
/// Set in a range's word by a client write the copy turned back; cleared with the copy's bit.
pub(crate) const RANGE_WAITED: u32 = 1 << 30;
/// The bits of a range's word that count client writes in flight.
pub(crate) const RANGE_WRITES: u32 = RANGE_WAITED - 1;

/// The nexus as an engine bdev.
pub struct Nexus {
    shared: Arc<NexusShared>,
}

impl Nexus {
    pub(crate) fn new(shared: Arc<NexusShared>) -> Nexus {
        Nexus { shared }
    }
}

impl Bdev for Nexus {
    fn info(&self) -> &BdevInfo {
        &self.shared.info
    }

    fn open_channel(&self, io: &mut IoCtx) -> Result<Box<dyn BdevChannel>, BdevError> {
        Ok(Box::new(channel::NexusChannel::new(
            self.shared.clone(),
            io,
        )))
    }
}

#[cfg(test)]
mod tests {
    //! The child state word and the resync order, without an engine: a resync is ordered
    //! only for a syncing child whose paths are published, and carries its incarnation; a
    //! fault that races a child's join to the in-sync set is never lost.

    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// Run once, if set, between `fault_in`'s read of the state word and its switch to
        /// faulted: a test makes a racing change land there.
        pub(super) static FAULT_RACE: Cell<Option<fn(&ChildShared)>> = const { Cell::new(None) };
    }

    fn shared() -> Arc<NexusShared> {
        Arc::new(NexusShared::new(
            "t",
            crate::replica::volume_id_for("t"),
            4 << 20,
            4096,
            NexusOptions::default(),
            Vec::new(),
        ))
    }

    /// Review finding 3: the manager marked a child syncing before it published its paths,
    /// and a resync ordered in between sent its barrier before some core had a path.
    #[test]
    fn a_resync_is_ordered_only_once_the_syncing_childs_paths_are_published() {
        let s = shared();
        let inc = s.child(1).enter(ChildState::Syncing);
        assert!(!s.order_resync(), "ordered before the paths were published");
        s.publish(1, Vec::new());
        assert!(s.order_resync());
        let order = s.resync_order.lock().expect("ordered");
        assert_eq!((order.child, order.incarnation), (1, inc));
    }

    /// Review finding 1: every syncing period of a slot is a new incarnation, and a fault
    /// aimed at an earlier one leaves the slot alone.
    #[test]
    fn a_new_syncing_period_is_a_new_incarnation_that_old_faults_miss() {
        let s = shared();
        let first = s.child(0).enter(ChildState::Syncing);
        s.child(0).enter(ChildState::Empty);
        let second = s.child(0).enter(ChildState::Syncing);
        assert!(second > first);
        s.fault_in(0, Some(first), "an old job");
        assert_eq!(s.child(0).word(), pack(second, ChildState::Syncing));
        s.fault_in(0, Some(second), "its own job");
        assert_eq!(s.child(0).state(), ChildState::Faulted);
    }

    /// Review finding 2: `fault` read "syncing", the job's switch to in sync landed, and the
    /// fault's switch from syncing failed and was dropped: the child stayed in sync without
    /// the write that failed on it, and no generation raise held that write's acknowledgement.
    /// The join is made to land exactly there ([`FAULT_RACE`]).
    #[test]
    fn a_fault_racing_the_join_to_the_in_sync_set_is_never_lost() {
        let s = shared();
        let inc = s.child(0).enter(ChildState::Syncing);
        let before = s.gen_target.load(Ordering::SeqCst);
        FAULT_RACE.set(Some(|child: &ChildShared| {
            let w = child.word();
            assert_eq!(state_of(w), ChildState::Syncing);
            let joined = pack(incarnation_of(w), ChildState::InSync);
            child.state.store(joined, Ordering::SeqCst);
        }));
        s.fault(0, "a write failed on the target");
        assert_eq!(
            s.child(0).word(),
            pack(inc, ChildState::Faulted),
            "the fault was lost"
        );
        assert_eq!(
            s.gen_target.load(Ordering::SeqCst),
            before + 1,
            "the fault of a child that joined did not raise the generation"
        );
    }

    /// Review finding 6: a write turned back by a copy marks the range waited only while
    /// the copy holds it, in the same update that takes its count back.
    #[test]
    fn a_turned_back_write_marks_only_a_range_being_copied() {
        let s = shared();
        s.ranges[1].fetch_or(RANGE_COPYING, Ordering::SeqCst);
        assert!(!s.enter_ranges(AREA_BYTES - 4096, 8192));
        assert_eq!(s.ranges[0].load(Ordering::SeqCst), 0);
        assert_eq!(
            s.ranges[1].load(Ordering::SeqCst),
            RANGE_COPYING | RANGE_WAITED
        );
        s.ranges[1].fetch_and(!(RANGE_COPYING | RANGE_WAITED), Ordering::SeqCst);
        assert!(s.enter_ranges(AREA_BYTES - 4096, 8192));
        s.leave_ranges(AREA_BYTES - 4096, 8192);
        assert!(s.ranges.iter().all(|r| r.load(Ordering::SeqCst) == 0));
    }
}
