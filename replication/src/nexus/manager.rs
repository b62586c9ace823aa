//! The nexus control plane of one node: creating nexuses, opening their children (the
//! blocking `Open` handshakes, epochs), the monitor that reconnects faulted children (a
//! back-off from [`RECONNECT_BACKOFF_MIN`] doubling to [`RECONNECT_BACKOFF_MAX`], reset on
//! success) and starts their resyncs, and add/remove/promote/show/verify. Nothing here is on the I/O
//! path; every operation is a blocking call for a control thread.
//!
//! Epoch choice: a new nexus opens its replicas with the requested epoch (1 by default);
//! any replica that answers `StaleEpoch{current}` makes it retry every replica with
//! `current + 1`. So a new nexus always ends above every fence it met, and once it has
//! opened them a stale nexus elsewhere is refused. `create` over replicas that already carry
//! a fence is a takeover, refused unless the caller says so (`CreateRequest::takeover`): a
//! restarted old primary re-running its create must not fence the live nexus.
//!
//! Data generations: `create` trusts only the replicas with the highest generation record
//! (they hold every acknowledged write; `docs/replication.md`), rebuilds the others in full
//! before they count as in sync, and stores a new generation on the trusted ones before it
//! serves. Whenever the in-sync set shrinks the monitor (woken by the fault) stores the next
//! generation on every in-sync child, and the channels hold the acknowledgements of writes
//! completed meanwhile until it is durable ([`NexusManager::raise_generation`]); a child that
//! is back in sync is given the current generation the same way. `add` rebuilds a replica in
//! full; `verify` names the children that differ from the one it trusts and can repair them.
//!
//! The durable in-sync record ([`super::insync`]): a nexus created with a recorder reports
//! its in-sync set after every raise has been stored, and the raise becomes durable (held
//! writes are acknowledged) only once the recorder accepted it; the monitor retries a report
//! that failed, and reports changes that need no raise (a child back in sync, a child
//! added or removed while out of sync) on its next pass. `create` given the record's trusted
//! replicas and generation takes its sources only among them.

use super::insync::{InSyncOptions, RecordError};
use super::{
    state_of, ChildSpec, ChildState, Nexus, NexusOptions, NexusShared, PathSetup, ResyncProgress,
    CHILDREN_MAX, REGION_BYTES_MAX, REGION_BYTES_MIN,
};
use crate::generation::GenRecord;
use crate::proto::{self, Envelope, Epoch, Message, RequestId, VolumeId};
use crate::replica::{volume_id_for, Acceptance, RecordUpdate, ReplicaSet};
use crate::server::flush_replica;
use crate::transport::{Link, Transport, HANDSHAKE_TIMEOUT};
use cairn_engine::{BdevHandle, Engine};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often the monitor looks for work when no reconnect attempt is due sooner.
pub const MONITOR_PERIOD: Duration = Duration::from_millis(250);
/// First wait between reconnect attempts to one child, and the wait again after a success.
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between reconnect attempts to one child (the back-off doubles up to it). A
/// replica that comes back is reconnected within this plus one connect: below 1 s.
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_millis(500);
/// How long promote waits for in-flight writes to drain.
pub const PROMOTE_DRAIN_MAX: Duration = Duration::from_secs(10);
/// Times `create` and `promote` raise their epoch past fences before giving up.
const EPOCH_RETRIES_MAX: usize = 8;
/// Reads one verify keeps in flight per remote child.
const VERIFY_WINDOW: usize = 8;
/// Rounds one generation raise makes before leaving the rest to the next monitor pass: each
/// round either finishes or faults a child that would not store it, so the in-sync children
/// plus one, with room for a fault racing it.
const RAISE_ROUNDS_MAX: usize = CHILDREN_MAX + 2;

#[derive(Debug, thiserror::Error)]
pub enum NexusError {
    #[error("nexus '{name}' already exists")]
    Exists { name: String },
    #[error("no nexus named '{name}'")]
    NotFound { name: String },
    #[error("nexus '{name}': {why}")]
    Invalid { name: String, why: String },
    #[error("nexus '{name}': replica '{child}': {why}")]
    Child {
        name: String,
        child: String,
        why: String,
    },
    #[error(
        "nexus '{name}': replicas already carry fences ({fences}): another nexus owns or owned \
         them, and creating one over them takes them over; pass --takeover (admin API: \
         takeover) if that is meant"
    )]
    TakeoverRefused { name: String, fences: String },
    #[error(
        "nexus '{name}': no replica may be a source: {replicas}; a source must be trusted by \
         the in-sync record and hold data generation {min_generation} or above"
    )]
    NoTrustedSource {
        name: String,
        /// Each replica with its generation and whether it is trusted.
        replicas: String,
        min_generation: u64,
    },
    #[error("nexus '{name}': {why}")]
    NotRecorded { name: String, why: String },
    #[error("nexus '{name}': {source}")]
    Engine {
        name: String,
        source: cairn_engine::EngineError,
    },
}

/// One child as `show` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChildView {
    pub spec: String,
    pub state: ChildState,
    /// Why it is out of the in-sync set (or was, until its resync ended); cleared once it is
    /// back in sync.
    pub reason: String,
    /// Bytes of the 4 KiB blocks it missed and still needs copied.
    pub dirty_bytes: u64,
    /// Bytes copied to it by its running (or last) resync or rebuild.
    pub copied_bytes: u64,
    /// The longest a client write waited on a copy of its running (or last) resync or
    /// rebuild, in microseconds (bounded by `COPY_HOLD_MAX`).
    pub write_wait_max_us: u64,
    /// The data generation its replica holds durably, as far as the nexus knows.
    pub generation: u64,
}

/// A running resync or rebuild. Within one job no figure but the ETA ever goes back; a new
/// job starts from zero (docs/replication.md, "Progress").
#[derive(Clone, Debug, PartialEq)]
pub struct ResyncView {
    pub child: String,
    pub full: bool,
    /// Bytes this job has copied.
    pub done_bytes: u64,
    /// Bytes it has to copy: the bytes dirty when its single pass starts (0 until then).
    pub total_bytes: u64,
    /// The highest fraction `done_bytes / total_bytes` reached, 0 to 1.
    pub progress: f64,
    /// The job's average copy rate.
    pub bytes_per_s: f64,
    /// Seconds left at that rate for what the total still holds; 0 while nothing has been
    /// copied (the rate is then 0 too).
    pub eta_s: f64,
    /// The longest a client write has waited on one of its copies so far, in microseconds.
    pub write_wait_max_us: u64,
}

/// What `show` reports.
#[derive(Clone, Debug, PartialEq)]
pub struct NexusView {
    pub name: String,
    pub volume_id: String,
    pub epoch: u64,
    pub size_bytes: u64,
    pub block_size_bytes: u32,
    /// online, degraded (fewer in sync than children), below-minimum (writes fail) or
    /// fenced (a newer nexus owns the volume).
    pub state: String,
    pub min_in_sync: u32,
    pub region_bytes: u64,
    pub io_timeout_ms: u64,
    pub children: Vec<ChildView>,
    pub resync: Option<ResyncView>,
    /// The data generation every in-sync child holds durably.
    pub generation: u64,
    /// Bytes every full rebuild of this nexus has copied since it was created (never reset).
    pub rebuilt_bytes: u64,
}

/// One region whose copies differ, as `verify` reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionMismatch {
    pub region: u64,
    /// Children whose copy equals the source's (the source among them).
    pub agree: Vec<String>,
    /// Children whose copy differs from the source's: the wrong ones.
    pub differ: Vec<String>,
}

/// What `verify` found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub children: Vec<String>,
    pub regions: u64,
    pub region_bytes: u64,
    /// Regions whose checksums differ between children (all of them, in order).
    pub mismatched: Vec<u64>,
    /// The child the nexus trusts: its local in-sync child, else its first in-sync one (the
    /// one a resync copies from).
    pub source: String,
    /// Per mismatched region, who agrees with the source and who does not.
    pub details: Vec<RegionMismatch>,
    /// Whether the differing children were taken out of the in-sync set to have those
    /// regions rewritten from the source (`repair`).
    pub repairing: Vec<String>,
}

/// What a caller asks `create` for.
#[derive(Clone, Debug)]
pub struct CreateRequest {
    pub name: String,
    pub replicas: Vec<ChildSpec>,
    pub options: NexusOptions,
    /// Open at this epoch or above; 1 when unset.
    pub epoch: Option<u64>,
    /// The replicas may carry fences of another nexus, which this one takes over. Without
    /// it, a replica with a fence refuses the create.
    pub takeover: bool,
    /// The volume's durable in-sync record: which replicas may be sources, and where the
    /// nexus reports its in-sync set.
    pub insync: InSyncOptions,
}

/// Per child: when the monitor may next try to reconnect it, and the back-off.
type Retry = [(Instant, Duration); CHILDREN_MAX];

struct Entry {
    shared: Arc<NexusShared>,
    handle: BdevHandle,
    retry: Retry,
}

/// Every nexus of this node.
pub struct NexusManager {
    engine: Arc<Engine>,
    transport: Arc<dyn Transport>,
    replicas: Arc<ReplicaSet>,
    nexuses: Mutex<BTreeMap<String, Entry>>,
    stop: Arc<AtomicBool>,
    monitor: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for NexusManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NexusManager").finish()
    }
}

/// A child opened under an epoch: its geometry, its generation record and one path per
/// engine core.
struct OpenedChild {
    size_bytes: u64,
    block_size_bytes: u32,
    record: GenRecord,
    paths: Vec<Option<PathSetup>>,
}

/// A remote replica's answer to `Open`.
struct OpenReply {
    link: Box<dyn Link>,
    size_bytes: u64,
    block_size_bytes: u32,
    record: GenRecord,
}

/// What opening one child gave.
enum Opened {
    Ok(OpenedChild),
    Stale { current: u64 },
}

impl NexusManager {
    /// Starts the manager and its monitor thread.
    pub fn start(
        engine: Arc<Engine>,
        transport: Arc<dyn Transport>,
        replicas: Arc<ReplicaSet>,
    ) -> Arc<NexusManager> {
        let m = Arc::new(NexusManager {
            engine,
            transport,
            replicas,
            nexuses: Mutex::new(BTreeMap::new()),
            stop: Arc::new(AtomicBool::new(false)),
            monitor: Mutex::new(None),
        });
        let weak: Weak<NexusManager> = Arc::downgrade(&m);
        let stop = m.stop.clone();
        let thread = std::thread::Builder::new()
            .name("cairn-nexus-monitor".into())
            .spawn(move || {
                let mut wait = MONITOR_PERIOD;
                while !stop.load(Ordering::Acquire) {
                    // Woken early by a fault that needs a generation raise.
                    std::thread::park_timeout(wait);
                    let Some(m) = weak.upgrade() else { break };
                    let next = m.tick();
                    wait = next.map_or(MONITOR_PERIOD, |at| {
                        at.saturating_duration_since(Instant::now())
                            .min(MONITOR_PERIOD)
                    });
                }
            })
            .expect("spawning the nexus monitor");
        *m.monitor.lock() = Some(thread);
        m
    }

    /// Stops the monitor; nexuses stay until the engine stops.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.monitor.lock().take() {
            drop(t.join());
        }
    }

    fn invalid(name: &str, why: impl Into<String>) -> NexusError {
        NexusError::Invalid {
            name: name.into(),
            why: why.into(),
        }
    }

    fn check_request(req: &CreateRequest) -> Result<(), NexusError> {
        let name = &req.name;
        if name.is_empty() || name.len() > 255 {
            return Err(Self::invalid(name, "a nexus name is 1 to 255 bytes"));
        }
        let n = req.replicas.len();
        if n == 0 || n > CHILDREN_MAX {
            return Err(Self::invalid(
                name,
                format!("{n} replicas given; a nexus has 1 to {CHILDREN_MAX}"),
            ));
        }
        for (i, r) in req.replicas.iter().enumerate() {
            if req.replicas[..i].contains(r) {
                return Err(Self::invalid(
                    name,
                    format!("replica '{r}' is listed twice"),
                ));
            }
        }
        let o = &req.options;
        if o.min_in_sync == 0 || o.min_in_sync as usize > n {
            return Err(Self::invalid(
                name,
                format!(
                    "min_in_sync {} must be between 1 and the {n} replicas",
                    o.min_in_sync
                ),
            ));
        }
        if !o.region_bytes.is_power_of_two()
            || !(REGION_BYTES_MIN..=REGION_BYTES_MAX).contains(&o.region_bytes)
        {
            return Err(Self::invalid(
                name,
                format!(
                    "region size {} must be a power of two between {REGION_BYTES_MIN} and {REGION_BYTES_MAX}",
                    o.region_bytes
                ),
            ));
        }
        if o.io_timeout.is_zero() {
            return Err(Self::invalid(name, "the I/O timeout must be above zero"));
        }
        if o.copy_hold_max.is_zero() {
            return Err(Self::invalid(
                name,
                "the copy hold bound must be above zero",
            ));
        }
        if o.rebuild_bytes_per_s == Some(0) {
            return Err(Self::invalid(
                name,
                "a rebuild rate of 0 would never finish",
            ));
        }
        Ok(())
    }

    /// Creates a nexus over `req.replicas`, all assumed in sync, and adds it to the engine
    /// as a bdev named `req.name`.
    pub fn create(&self, req: CreateRequest) -> Result<NexusView, NexusError> {
        Self::check_request(&req)?;
        let name = req.name.clone();
        if self.nexuses.lock().contains_key(&name) {
            return Err(NexusError::Exists { name });
        }
        let volume_id = volume_id_for(&name);
        let specs: Vec<(usize, ChildSpec)> = req.replicas.iter().cloned().enumerate().collect();
        if !req.takeover {
            self.refuse_fenced(&name, volume_id, &specs)?;
        }
        let (epoch, opened) = self.open_rising(
            &name,
            volume_id,
            &specs,
            req.epoch.unwrap_or(1),
            |_, spec, why| {
                Err(NexusError::Child {
                    name: name.clone(),
                    child: spec.to_string(),
                    why,
                })
            },
        )?;
        let (size, block) = (opened[0].1.size_bytes, opened[0].1.block_size_bytes);
        for (c, o) in &opened {
            if (o.size_bytes, o.block_size_bytes) != (size, block) {
                return Err(NexusError::Child {
                    name,
                    child: req.replicas[*c].to_string(),
                    why: format!(
                        "size {} / block {} differs from the first replica's {size} / {block}",
                        o.size_bytes, o.block_size_bytes
                    ),
                });
            }
        }
        let shared = Arc::new(NexusShared::new(
            &name,
            volume_id,
            size,
            block,
            req.options.clone(),
            self.engine.cores(),
        ));
        shared.epoch.store(epoch, Ordering::Release);
        *shared.raiser.lock() = self.monitor.lock().as_ref().map(|t| t.thread().clone());
        let top = Self::source_generation(&name, &req, &opened)?;
        // Above every copy's, sources or not: a generation never goes down, so a copy
        // rebuilt from the sources must never hold one above theirs.
        let next = opened
            .iter()
            .map(|(_, o)| o.record.generation)
            .max()
            .unwrap_or(0)
            .max(top)
            + 1;
        for (c, o) in opened {
            let source = o.record.generation == top
                && req.insync.may_source(&req.replicas[c], o.record.generation);
            self.place_opened(&shared, c, &req.replicas[c], o, top, source);
        }
        if let Some(r) = &req.insync.recorder {
            drop(shared.recorder.set(r.clone()));
        }
        // A generation of this nexus's own, stored on the trusted copies (and recorded) before
        // it serves.
        shared.gen_target.store(next, Ordering::SeqCst);
        let raised = self.raise_generation(&shared);
        if shared.raise_pending() || shared.in_sync_count() == 0 {
            let why = raised.err().unwrap_or_default();
            return Err(NexusError::NotRecorded {
                name,
                why: format!(
                    "could not make data generation {next} durable on the trusted replicas: {why}"
                ),
            });
        }
        let handle = self
            .engine
            .add_bdev(Arc::new(Nexus::new(shared.clone())))
            .map_err(|source| NexusError::Engine {
                name: name.clone(),
                source,
            })?;
        shared
            .bdev
            .set(handle.id())
            .expect("a new nexus's bdev is set once");
        tracing::info!(nexus = %name, epoch, generation = next, replicas = req.replicas.len(), "nexus created");
        let now = Instant::now();
        self.nexuses.lock().insert(
            name.clone(),
            Entry {
                shared: shared.clone(),
                handle,
                retry: [(now, RECONNECT_BACKOFF_MIN); CHILDREN_MAX],
            },
        );
        self.kick_resync(&shared);
        Ok(view(&shared))
    }

    /// Refuses a create over replicas that already carry a fence (another nexus opened
    /// them). Each is asked for a takeover at epoch 1, which a fenced replica refuses without
    /// changing anything; an unfenced one takes fence 1, which this create then rises above.
    fn refuse_fenced(
        &self,
        name: &str,
        volume_id: VolumeId,
        specs: &[(usize, ChildSpec)],
    ) -> Result<(), NexusError> {
        let first = Epoch::new(1).expect("1 is an epoch");
        let mut fences = Vec::new();
        for (_, spec) in specs {
            let child_err = |why: String| NexusError::Child {
                name: name.into(),
                child: spec.to_string(),
                why,
            };
            let current = match spec {
                ChildSpec::Local => {
                    let r = self
                        .replicas
                        .get(&volume_id)
                        .map_err(|e| child_err(e.to_string()))?;
                    match self.replicas.accept(&r, first, true, None) {
                        Ok(Acceptance::Stale { current }) => Some(current.get()),
                        Ok(Acceptance::Accepted(_)) => None,
                        Err(e) => return Err(child_err(e.to_string())),
                    }
                }
                ChildSpec::Remote { endpoint } => self
                    .connect_open(endpoint, volume_id, first, true)
                    .map_err(child_err)?
                    .err(),
            };
            if let Some(epoch) = current {
                fences.push(format!("'{spec}' at epoch {epoch}"));
            }
        }
        if fences.is_empty() {
            return Ok(());
        }
        Err(NexusError::TakeoverRefused {
            name: name.into(),
            fences: fences.join(", "),
        })
    }

    /// The generation of a new nexus's sources: the highest among the replicas that may be
    /// sources (all of them, unless the in-sync record names the trusted ones and a minimum
    /// generation). None qualifying refuses the create, naming every replica.
    fn source_generation(
        name: &str,
        req: &CreateRequest,
        opened: &[(usize, OpenedChild)],
    ) -> Result<u64, NexusError> {
        let trust = &req.insync;
        if let Some(top) = opened
            .iter()
            .filter(|(c, o)| trust.may_source(&req.replicas[*c], o.record.generation))
            .map(|(_, o)| o.record.generation)
            .max()
        {
            return Ok(top);
        }
        let replicas = opened
            .iter()
            .map(|(c, o)| {
                let spec = &req.replicas[*c];
                let trusted = trust.trusted.is_empty() || trust.trusted.contains(spec);
                format!(
                    "'{spec}' (generation {}, {})",
                    o.record.generation,
                    if trusted { "trusted" } else { "not trusted" }
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        Err(NexusError::NoTrustedSource {
            name: name.into(),
            replicas,
            min_generation: trust.min_generation,
        })
    }

    /// Puts an opened child of a new nexus in its slot: in sync when it is a `source` (it may
    /// be one, and holds the sources' generation `top`), else syncing with a full rebuild
    /// queued, so that nothing reads from it before every region has been copied from a
    /// trusted copy.
    fn place_opened(
        &self,
        shared: &NexusShared,
        c: usize,
        spec: &ChildSpec,
        o: OpenedChild,
        top: u64,
        source: bool,
    ) {
        let child = shared.child(c);
        *child.spec.lock() = Some(spec.clone());
        child
            .gen_stored
            .store(o.record.generation, Ordering::SeqCst);
        // Made syncing and published under the order's lock: no resync is ordered between.
        let _order = shared.resync_order.lock();
        if source {
            child.enter(ChildState::InSync);
            if top > 0 && !o.record.clean {
                tracing::warn!(nexus = %shared.name, child = %spec, generation = top, "the nexus that last held this replica did not close it cleanly");
            }
        } else {
            child.dirty.set_all();
            child.needs_rebuild.store(true, Ordering::Release);
            *child.reason.lock() = if o.record.generation < top {
                format!(
                    "stale copy: data generation {} below the current {top}",
                    o.record.generation
                )
            } else {
                format!(
                    "not in sync in the volume's record (data generation {})",
                    o.record.generation
                )
            };
            child.enter(ChildState::Syncing);
            tracing::warn!(nexus = %shared.name, child = %spec, generation = o.record.generation, current = top, "stale replica: rebuilt in full before it serves");
        }
        shared.publish(c, o.paths);
    }

    /// Stores the nexus's target generation on every in-sync child that lacks it, faulting
    /// any that cannot store it (which raises the target again), until every in-sync child
    /// holds the target; then records the in-sync set (when the nexus has a recorder), and
    /// only then may the channels acknowledge the writes they held. Err says why the target
    /// is not durable yet (the monitor tries again). Blocking; control threads only.
    pub(crate) fn raise_generation(&self, shared: &NexusShared) -> Result<(), String> {
        let _epoch = shared.epoch_lock.lock();
        for _ in 0..RAISE_ROUNDS_MAX {
            if shared.fenced() {
                return Err("fenced: a newer nexus owns the volume".into());
            }
            let target = shared.gen_target.load(Ordering::SeqCst);
            let mut all = true;
            for c in 0..CHILDREN_MAX {
                let child = shared.child(c);
                if child.state() != ChildState::InSync
                    || child.gen_stored.load(Ordering::SeqCst) >= target
                {
                    continue;
                }
                let Some(spec) = child.spec.lock().clone() else {
                    continue;
                };
                match self.store_generation(shared, &spec, target, false) {
                    Ok(()) => child.gen_stored.store(target, Ordering::SeqCst),
                    Err(why) => {
                        all = false;
                        shared.fault(c, &format!("storing data generation {target}: {why}"));
                    }
                }
            }
            if !all || shared.gen_target.load(Ordering::SeqCst) != target {
                continue;
            }
            self.record(shared, target)?;
            shared.gen_durable.fetch_max(target, Ordering::SeqCst);
            tracing::debug!(nexus = %shared.name, generation = target, "data generation durable on every in-sync replica");
            if shared.gen_target.load(Ordering::SeqCst) == target {
                return Ok(());
            }
        }
        Err(format!(
            "the in-sync set kept shrinking; data generation {} is left to the next monitor pass",
            shared.gen_target.load(Ordering::SeqCst)
        ))
    }

    /// Records the in-sync set at `generation` with the nexus's recorder, if it has one and
    /// the set changed since the last report it accepted. Under `epoch_lock`, so reports leave
    /// in the order the nexus made them. A report that names no replica in sync is not sent:
    /// with no in-sync child no write succeeds, so the record's set still holds every
    /// acknowledged write, and replacing it by an empty one would lose which copies those are.
    fn record(&self, shared: &NexusShared, generation: u64) -> Result<(), String> {
        let Some(recorder) = shared.recorder.get() else {
            return Ok(());
        };
        let report = shared.report(generation);
        if report.in_sync_count() == 0 || shared.reported.lock().as_ref() == Some(&report) {
            return Ok(());
        }
        match recorder.record(&report) {
            Ok(()) => {
                if shared.record_failing.swap(false, Ordering::AcqRel) {
                    tracing::info!(nexus = %shared.name, generation, "in-sync set recorded again");
                }
                tracing::debug!(nexus = %shared.name, generation, replicas = ?report.replicas, "in-sync set recorded");
                *shared.reported.lock() = Some(report);
                Ok(())
            }
            Err(RecordError::NotRecorded(why)) => {
                if !shared.record_failing.swap(true, Ordering::AcqRel) {
                    tracing::warn!(nexus = %shared.name, generation, why = %why, "in-sync set not recorded; writes completed since the last change are held until it is");
                }
                Err(format!(
                    "recording the in-sync set at generation {generation}: {why}"
                ))
            }
            Err(RecordError::Superseded(why)) => {
                shared.fence(report.epoch);
                tracing::error!(nexus = %shared.name, generation, why = %why, "a newer nexus owns the volume's record; this nexus is fenced");
                Err(format!("fenced by the in-sync record: {why}"))
            }
        }
    }

    /// Reports a change of the in-sync set that needed no raise (a child back in sync and
    /// given the current generation, a child added or removed while out of sync), or retries
    /// a report that failed.
    fn report_changes(&self, shared: &NexusShared) {
        if shared.recorder.get().is_none() {
            return;
        }
        let _epoch = shared.epoch_lock.lock();
        if shared.fenced() || shared.raise_pending() {
            return;
        }
        // Failures are logged by `record` and retried on the next pass.
        drop(self.record(shared, shared.gen_durable.load(Ordering::SeqCst)));
    }

    /// Stores generation `generation` (with the clean mark, after a flush) on one child,
    /// under the nexus's epoch. A fence above it marks the nexus fenced.
    fn store_generation(
        &self,
        shared: &NexusShared,
        spec: &ChildSpec,
        generation: u64,
        clean: bool,
    ) -> Result<(), String> {
        let epoch = Epoch::new(shared.epoch()).map_err(|e| e.to_string())?;
        let stale = |current: u64| {
            shared.fence(epoch.get());
            format!("fenced at epoch {current}: a newer nexus owns the volume")
        };
        match spec {
            ChildSpec::Local => {
                let r = shared
                    .local
                    .lock()
                    .clone()
                    .ok_or("the local replica was never opened")?;
                let flush = || flush_replica(&self.engine, &r);
                match self
                    .replicas
                    .set_generation(&r, epoch, generation, clean, flush, None)
                    .map_err(|e| e.to_string())?
                {
                    RecordUpdate::Stored(_) => Ok(()),
                    RecordUpdate::Stale { current } => Err(stale(current.get())),
                }
            }
            ChildSpec::Remote { endpoint } => {
                let msg = Message::SetGeneration { generation, clean };
                match self.handshake(endpoint, shared.volume_id, epoch, &msg)? {
                    Ok(r) if r.record.generation == generation => Ok(()),
                    Ok(r) => Err(format!(
                        "stored generation {} instead of {generation}",
                        r.record.generation
                    )),
                    Err(current) => Err(stale(current)),
                }
            }
        }
    }

    /// Opens `specs` (child index, spec) with takeover at `epoch`, raising the epoch past
    /// the highest fence any replica reports until none refuses it. A child that fails to
    /// open goes to `failed`, whose error ends the attempt. Returns the epoch and the
    /// children opened under it, in `specs` order.
    fn open_rising(
        &self,
        name: &str,
        volume_id: VolumeId,
        specs: &[(usize, ChildSpec)],
        mut epoch: u64,
        mut failed: impl FnMut(usize, &ChildSpec, String) -> Result<(), NexusError>,
    ) -> Result<(u64, Vec<(usize, OpenedChild)>), NexusError> {
        for _ in 0..EPOCH_RETRIES_MAX {
            let mut opened = Vec::with_capacity(specs.len());
            let mut raise = None;
            for (c, spec) in specs {
                match self.open_child(volume_id, spec, epoch, true) {
                    Ok(Opened::Ok(o)) => opened.push((*c, o)),
                    Ok(Opened::Stale { current }) => {
                        raise = Some(raise.unwrap_or(0).max(current));
                    }
                    Err(why) => failed(*c, spec, why)?,
                }
            }
            match raise {
                None => return Ok((epoch, opened)),
                Some(current) => epoch = Self::epoch_after(name, current)?,
            }
        }
        Err(Self::invalid(
            name,
            format!("replica epochs kept rising; gave up at {epoch}"),
        ))
    }

    /// The epoch above `current`, checked: past [`proto::EPOCH_MAX`] the volume's nexus cannot move
    /// on, and says so instead of wrapping to 0.
    fn epoch_after(name: &str, current: u64) -> Result<u64, NexusError> {
        Epoch::new(current)
            .and_then(Epoch::next)
            .map(Epoch::get)
            .map_err(|e| {
                Self::invalid(name, format!("cannot raise the epoch above {current}: {e}"))
            })
    }

    /// Opens one child at `epoch`: one path per engine core. With `takeover`, the first
    /// open must raise the replica's fence (the others share it).
    fn open_child(
        &self,
        volume_id: VolumeId,
        spec: &ChildSpec,
        epoch: u64,
        takeover: bool,
    ) -> Result<Opened, String> {
        let e = Epoch::new(epoch).map_err(|e| e.to_string())?;
        let cores = self.engine.cores().len();
        match spec {
            ChildSpec::Local => {
                let r = self.replicas.get(&volume_id).map_err(|e| e.to_string())?;
                match self
                    .replicas
                    .accept(&r, e, takeover, None)
                    .map_err(|e| e.to_string())?
                {
                    Acceptance::Stale { current } => Ok(Opened::Stale {
                        current: current.get(),
                    }),
                    Acceptance::Accepted(_) => Ok(Opened::Ok(OpenedChild {
                        size_bytes: r.info().size_bytes,
                        block_size_bytes: r.info().block_size_bytes,
                        record: r.record(),
                        paths: (0..cores)
                            .map(|_| Some(PathSetup::Local(r.clone(), e)))
                            .collect(),
                    })),
                }
            }
            ChildSpec::Remote { endpoint } => {
                let mut paths = Vec::with_capacity(cores);
                let mut first = None;
                for core in 0..cores {
                    let claim = takeover && core == 0;
                    let reply = match self.connect_open(endpoint, volume_id, e, claim)? {
                        Ok(v) => v,
                        Err(current) => return Ok(Opened::Stale { current }),
                    };
                    paths.push(Some(PathSetup::Remote(reply.link, e)));
                    first.get_or_insert((reply.size_bytes, reply.block_size_bytes, reply.record));
                }
                let (size_bytes, block_size_bytes, record) =
                    first.ok_or("the engine has no cores")?;
                Ok(Opened::Ok(OpenedChild {
                    size_bytes,
                    block_size_bytes,
                    record,
                    paths,
                }))
            }
        }
    }

    /// Connects and runs `Open`. Inner `Err(current)` is a StaleEpoch answer.
    fn connect_open(
        &self,
        endpoint: &str,
        volume_id: VolumeId,
        epoch: Epoch,
        takeover: bool,
    ) -> Result<Result<OpenReply, u64>, String> {
        self.handshake(endpoint, volume_id, epoch, &Message::Open { takeover })
    }

    /// Connects and sends `first` (`Open` or `SetGeneration`), answered by `OpenOk`. Inner
    /// `Err(current)` is a StaleEpoch answer.
    fn handshake(
        &self,
        endpoint: &str,
        volume_id: VolumeId,
        epoch: Epoch,
        first: &Message<'_>,
    ) -> Result<Result<OpenReply, u64>, String> {
        let mut link = self
            .transport
            .connect(endpoint, HANDSHAKE_TIMEOUT)
            .map_err(|e| e.to_string())?;
        let env = Envelope {
            volume_id,
            epoch,
            request_id: RequestId::new(0),
        };
        let mut out = Vec::new();
        proto::encode_into(&env, first, &mut out);
        link.send_frame(&out).map_err(|e| e.to_string())?;
        let (header, payload) = link
            .recv_frame(HANDSHAKE_TIMEOUT)
            .map_err(|e| e.to_string())?;
        match proto::decode(&header, &payload).map_err(|e| e.to_string())? {
            Message::OpenOk {
                size_bytes,
                block_size_bytes,
                generation,
                clean,
                ..
            } => Ok(Ok(OpenReply {
                link,
                size_bytes,
                block_size_bytes,
                record: GenRecord { generation, clean },
            })),
            Message::StaleEpoch { current } => Ok(Err(current.get())),
            Message::Error { errno } => Err(format!(
                "refused: {}",
                std::io::Error::from_raw_os_error(errno as i32)
            )),
            other => Err(format!("answered Open with {:?}", other.opcode())),
        }
    }

    fn entry<R>(&self, name: &str, f: impl FnOnce(&mut Entry) -> R) -> Result<R, NexusError> {
        let mut all = self.nexuses.lock();
        let e = all
            .get_mut(name)
            .ok_or_else(|| NexusError::NotFound { name: name.into() })?;
        Ok(f(e))
    }

    fn shared(&self, name: &str) -> Result<Arc<NexusShared>, NexusError> {
        self.entry(name, |e| e.shared.clone())
    }

    /// The engine bdev of a nexus, for exporting it.
    pub fn handle(&self, name: &str) -> Option<BdevHandle> {
        self.nexuses.lock().get(name).map(|e| e.handle.clone())
    }

    pub fn show(&self, name: &str) -> Result<NexusView, NexusError> {
        Ok(view(&*self.shared(name)?))
    }

    pub fn list(&self) -> Vec<NexusView> {
        self.nexuses
            .lock()
            .values()
            .map(|e| view(&e.shared))
            .collect()
    }

    /// Removes a nexus from the engine (it must not be exported) and closes its children.
    pub fn destroy(&self, name: &str) -> Result<(), NexusError> {
        let entry = self
            .nexuses
            .lock()
            .remove(name)
            .ok_or_else(|| NexusError::NotFound { name: name.into() })?;
        // Held acknowledgements keep the channels busy until their raise is durable, and the
        // monitor may be stopped already (node shutdown): raise here. If it still is not
        // durable (the recorder unreachable), the held writes fail rather than keep the
        // channels, and so the destroy, waiting.
        if generation_behind(&entry.shared) {
            if let Err(why) = self.raise_generation(&entry.shared) {
                tracing::warn!(nexus = %name, why = %why, "destroyed with writes held for a data generation that is not durable; they fail with EIO");
            }
        }
        entry.shared.closing.store(true, Ordering::Release);
        self.engine
            .remove_bdev(&entry.handle)
            .map_err(|source| NexusError::Engine {
                name: name.into(),
                source,
            })?;
        self.mark_clean(&entry.shared);
        tracing::info!(nexus = %name, "nexus destroyed");
        Ok(())
    }

    /// After the nexus's last I/O: marks every in-sync child that holds the current
    /// generation as closed cleanly (each flushes first). A child that cannot be marked only
    /// stays unclean; nothing depends on the mark being set.
    fn mark_clean(&self, shared: &NexusShared) {
        if shared.fenced() || shared.raise_pending() {
            return;
        }
        let generation = shared.gen_durable.load(Ordering::SeqCst);
        for c in 0..CHILDREN_MAX {
            let child = shared.child(c);
            if child.state() != ChildState::InSync
                || child.gen_stored.load(Ordering::SeqCst) != generation
            {
                continue;
            }
            let Some(spec) = child.spec.lock().clone() else {
                continue;
            };
            if let Err(why) = self.store_generation(shared, &spec, generation, true) {
                tracing::warn!(nexus = %shared.name, child = %spec, why = %why, "could not mark the replica closed cleanly");
            }
        }
    }

    /// Adds a new replica; it is rebuilt in full, online, before it joins the in-sync set.
    pub fn add_child(&self, name: &str, spec: ChildSpec) -> Result<NexusView, NexusError> {
        let shared = self.shared(name)?;
        let child_err = |why: String| NexusError::Child {
            name: name.into(),
            child: spec.to_string(),
            why,
        };
        let mut free = None;
        for c in 0..CHILDREN_MAX {
            let s = shared.child(c).spec.lock().clone();
            if s.as_ref() == Some(&spec) {
                return Err(child_err("is already a child of this nexus".into()));
            }
            if s.is_none() && free.is_none() {
                free = Some(c);
            }
        }
        let c = free
            .ok_or_else(|| Self::invalid(name, format!("already has {CHILDREN_MAX} replicas")))?;
        let (paths, record) = {
            let _epoch = shared.epoch_lock.lock();
            self.open_at_current(&shared, &spec).map_err(child_err)?
        };
        if record.generation >= shared.gen_target.load(Ordering::SeqCst) {
            // A copy from elsewhere that holds a generation this nexus has not reached: a
            // generation never goes down, so the nexus's copies must go above it before the
            // newcomer is a member, or a later nexus would trust the newcomer over them.
            shared
                .gen_target
                .fetch_max(record.generation + 1, Ordering::SeqCst);
            let raised = self.raise_generation(&shared);
            if shared.raise_pending() {
                return Err(child_err(format!(
                    "holds data generation {}, and this nexus could not rise above it: {}",
                    record.generation,
                    raised.err().unwrap_or_default()
                )));
            }
        }
        let child = shared.child(c);
        child.gen_stored.store(record.generation, Ordering::SeqCst);
        // A slot keeps nothing of a replica removed from it: no count, no reason.
        child.copied_bytes.store(0, Ordering::Release);
        child.reason.lock().clear();
        child.dirty.set_all();
        child.unflushed[0].clear_all();
        child.unflushed[1].clear_all();
        *child.spec.lock() = Some(spec.clone());
        {
            // A new incarnation of the slot: a job of a replica removed from it, still
            // winding down, can neither act on this one nor join it to the in-sync set. Made
            // syncing and published under the order's lock: no resync is ordered between.
            let _order = shared.resync_order.lock();
            child.needs_rebuild.store(true, Ordering::Release);
            child.enter(ChildState::Syncing);
            shared.publish(c, paths);
        }
        tracing::info!(nexus = %name, child = %spec, "replica added; full rebuild queued");
        self.kick_resync(&shared);
        Ok(view(&shared))
    }

    /// Opens `spec` at the nexus's current epoch; a fence above it means this nexus is
    /// stale.
    fn open_at_current(
        &self,
        shared: &NexusShared,
        spec: &ChildSpec,
    ) -> Result<(Vec<Option<PathSetup>>, GenRecord), String> {
        let epoch = shared.epoch();
        match self.open_child(shared.volume_id, spec, epoch, false)? {
            Opened::Ok(o) if o.size_bytes == shared.info.size_bytes => Ok((o.paths, o.record)),
            Opened::Ok(o) => Err(format!(
                "size {} differs from the nexus's {}",
                o.size_bytes, shared.info.size_bytes
            )),
            Opened::Stale { current } => {
                shared.fence(epoch);
                Err(format!(
                    "fenced at epoch {current}, above this nexus's {epoch}: a newer nexus owns the volume"
                ))
            }
        }
    }

    /// Removes a replica. Refused when it would leave fewer in-sync replicas than the
    /// minimum.
    pub fn remove_child(&self, name: &str, spec: &ChildSpec) -> Result<NexusView, NexusError> {
        let shared = self.shared(name)?;
        let c = (0..CHILDREN_MAX)
            .find(|&c| shared.child(c).spec.lock().as_ref() == Some(spec))
            .ok_or_else(|| NexusError::Child {
                name: name.into(),
                child: spec.to_string(),
                why: "is not a child of this nexus".into(),
            })?;
        let child = shared.child(c);
        let left = shared.in_sync_count() - u32::from(child.state() == ChildState::InSync);
        if left == 0 || left < shared.options.min_in_sync {
            return Err(Self::invalid(
                name,
                format!(
                    "removing '{spec}' would leave {left} in-sync replicas, below the minimum {}",
                    shared.options.min_in_sync.max(1)
                ),
            ));
        }
        if child.state() == ChildState::InSync {
            // The removed replica keeps the current generation but misses every later write.
            shared.gen_target.fetch_add(1, Ordering::SeqCst);
        }
        {
            let _order = shared.resync_order.lock();
            child.enter(ChildState::Empty);
            *child.spec.lock() = None;
            shared.publish(c, (0..shared.cores.len()).map(|_| None).collect());
        }
        // Outside the lock (a large map takes a while): the next `add` sets it all anyway.
        child.dirty.clear_all();
        // A job copying to the removed replica may be asleep (rate-limited, or waiting on a
        // flush): woken, it sees its incarnation gone and ends, releasing its ranges.
        self.wake_home(&shared);
        if generation_behind(&shared) {
            if let Err(why) = self.raise_generation(&shared) {
                tracing::warn!(nexus = %name, child = %spec, why = %why, "removal not durable yet; writes wait for the monitor to record it");
            }
        }
        tracing::info!(nexus = %name, child = %spec, "replica removed");
        Ok(view(&shared))
    }

    /// Re-opens every child under a new, higher epoch (writes wait meanwhile).
    pub fn promote(&self, name: &str) -> Result<NexusView, NexusError> {
        let shared = self.shared(name)?;
        let specs: Vec<(usize, ChildSpec)> = (0..CHILDREN_MAX)
            .filter_map(|c| shared.child(c).spec.lock().clone().map(|s| (c, s)))
            .collect();
        let engine = &self.engine;
        // Held to the end: no raise, reconnect or add talks to the replicas at the epoch
        // this promote leaves.
        let _epoch = shared.epoch_lock.lock();
        let round = shared.quiesce(|core, f| {
            // A core that does not answer is caught by the drain deadline below.
            let _ = engine.call(core, f);
        });
        let drained_by = Instant::now() + PROMOTE_DRAIN_MAX;
        while !shared.quiesced(round) {
            if Instant::now() > drained_by {
                shared.frozen.store(false, Ordering::SeqCst);
                return Err(Self::invalid(name, "writes did not drain; not promoted"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let result = self.reopen_all(&shared, &specs);
        shared.frozen.store(false, Ordering::SeqCst);
        result?;
        Ok(view(&shared))
    }

    fn reopen_all(
        &self,
        shared: &NexusShared,
        specs: &[(usize, ChildSpec)],
    ) -> Result<(), NexusError> {
        let (epoch, opened) = self.open_rising(
            &shared.name,
            shared.volume_id,
            specs,
            Self::epoch_after(&shared.name, shared.epoch())?,
            |c, _, why| {
                shared.fault(c, &format!("re-opening for promote: {why}"));
                Ok(())
            },
        )?;
        if opened.is_empty() {
            return Err(Self::invalid(
                &shared.name,
                "no replica could be opened at the new epoch",
            ));
        }
        // Unfences too: every refused epoch was this nexus's, below the new one.
        shared.epoch.store(epoch, Ordering::Release);
        for (c, o) in opened {
            shared.publish(c, o.paths);
        }
        tracing::info!(nexus = %shared.name, epoch, "nexus promoted");
        Ok(())
    }

    /// Compares the in-sync children's crc32c region by region. Meant for a quiet volume: a
    /// region written during the check can differ for that moment.
    ///
    /// The child it trusts (the source) is the local in-sync child, else the first in-sync
    /// one; for each region that differs it names who agrees with the source. With `repair`,
    /// every child that differs anywhere has those regions marked dirty and is taken out of
    /// the in-sync set, so the monitor resyncs them from a child that agrees with the source
    /// everywhere (only such children stay in sync).
    pub fn verify(&self, name: &str, repair: bool) -> Result<VerifyReport, NexusError> {
        let shared = self.shared(name)?;
        let in_sync: Vec<(usize, ChildSpec)> = (0..CHILDREN_MAX)
            .filter(|&c| shared.child(c).state() == ChildState::InSync)
            .filter_map(|c| shared.child(c).spec.lock().clone().map(|s| (c, s)))
            .collect();
        let children: Vec<ChildSpec> = in_sync.iter().map(|(_, s)| s.clone()).collect();
        let region_bytes = shared.options.region_bytes;
        let size = shared.info.size_bytes;
        let regions = size.div_ceil(region_bytes);
        let mut sums: Vec<Vec<u32>> = Vec::new();
        for spec in &children {
            let child_err = |why: String| NexusError::Child {
                name: name.into(),
                child: spec.to_string(),
                why,
            };
            let s = match spec {
                ChildSpec::Local => self.local_sums(&shared, region_bytes),
                ChildSpec::Remote { endpoint } => self.remote_sums(&shared, endpoint, region_bytes),
            }
            .map_err(child_err)?;
            sums.push(s);
        }
        let src = children
            .iter()
            .position(|s| *s == ChildSpec::Local)
            .unwrap_or(0);
        let mismatched: Vec<u64> = (0..regions)
            .filter(|&r| sums.iter().any(|s| s[r as usize] != sums[0][r as usize]))
            .collect();
        let details: Vec<RegionMismatch> = mismatched
            .iter()
            .map(|&r| {
                let (agree, differ): (Vec<usize>, Vec<usize>) = (0..children.len())
                    .partition(|&i| sums[i][r as usize] == sums[src][r as usize]);
                let names =
                    |v: Vec<usize>| v.into_iter().map(|i| children[i].to_string()).collect();
                RegionMismatch {
                    region: r,
                    agree: names(agree),
                    differ: names(differ),
                }
            })
            .collect();
        let mut repairing = Vec::new();
        if repair {
            for (i, (c, spec)) in in_sync.iter().enumerate() {
                let wrong: Vec<u64> = mismatched
                    .iter()
                    .copied()
                    .filter(|&r| sums[i][r as usize] != sums[src][r as usize])
                    .collect();
                if wrong.is_empty() {
                    continue;
                }
                let child = shared.child(*c);
                for &r in &wrong {
                    child.dirty.mark(r * region_bytes, region_bytes);
                }
                shared.fault(
                    *c,
                    &format!(
                        "verify: {} regions differ from the source '{}'; rewriting them",
                        wrong.len(),
                        children[src]
                    ),
                );
                repairing.push(spec.to_string());
            }
        }
        Ok(VerifyReport {
            children: children.iter().map(ToString::to_string).collect(),
            regions,
            region_bytes,
            mismatched,
            source: children
                .get(src)
                .map(ToString::to_string)
                .unwrap_or_default(),
            details,
            repairing,
        })
    }

    fn local_sums(&self, shared: &NexusShared, region_bytes: u64) -> Result<Vec<u32>, String> {
        let r = self
            .replicas
            .get(&shared.volume_id)
            .map_err(|e| e.to_string())?;
        let core = self.engine.cores()[0];
        let mut q = self
            .engine
            .queue(&r.handle, core, 1)
            .map_err(|e| e.to_string())?;
        let chunk = u64::from(super::NEXUS_IO_MAX_BYTES.min(q.buf_size_bytes()));
        let mut buf = vec![0u8; chunk as usize];
        let size = shared.info.size_bytes;
        let mut sums = Vec::new();
        let mut off = 0;
        while off < size {
            let end = (off + region_bytes).min(size);
            let (mut crc, mut pos) = (0u32, off);
            while pos < end {
                let len = chunk.min(end - pos) as usize;
                q.read_at(pos, &mut buf[..len]).map_err(|e| e.to_string())?;
                crc = crc32c::crc32c_append(crc, &buf[..len]);
                pos += len as u64;
            }
            sums.push(crc);
            off = end;
        }
        Ok(sums)
    }

    fn remote_sums(
        &self,
        shared: &NexusShared,
        endpoint: &str,
        region_bytes: u64,
    ) -> Result<Vec<u32>, String> {
        let epoch = Epoch::new(shared.epoch()).map_err(|e| e.to_string())?;
        let mut link = match self.connect_open(endpoint, shared.volume_id, epoch, false)? {
            Ok(v) => v.link,
            Err(current) => return Err(format!("fenced at epoch {current}")),
        };
        let chunk = u64::from(super::NEXUS_IO_MAX_BYTES);
        let size = shared.info.size_bytes;
        let mut out = Vec::new();
        let mut sums = Vec::new();
        let mut off = 0;
        while off < size {
            let end = (off + region_bytes).min(size);
            let mut crc = 0u32;
            let mut pos = off;
            while pos < end {
                // A window of reads in flight, answered in any order, folded in offset order.
                let mut window = Vec::new();
                while pos < end && window.len() < VERIFY_WINDOW {
                    let len = chunk.min(end - pos);
                    out.clear();
                    let env = Envelope {
                        volume_id: shared.volume_id,
                        epoch,
                        request_id: RequestId::new(window.len() as u64),
                    };
                    proto::encode_into(
                        &env,
                        &Message::Read {
                            offset_bytes: pos,
                            len_bytes: len,
                        },
                        &mut out,
                    );
                    link.send_frame(&out).map_err(|e| e.to_string())?;
                    window.push(None);
                    pos += len;
                }
                for _ in 0..window.len() {
                    let (h, payload) = link
                        .recv_frame(HANDSHAKE_TIMEOUT)
                        .map_err(|e| e.to_string())?;
                    let i = h.envelope.request_id.get() as usize;
                    match proto::decode(&h, &payload).map_err(|e| e.to_string())? {
                        Message::ReadData { data } if i < window.len() => {
                            window[i] = Some(data.to_vec())
                        }
                        Message::Error { errno } => {
                            return Err(format!(
                                "read failed: {}",
                                std::io::Error::from_raw_os_error(errno as i32)
                            ))
                        }
                        other => return Err(format!("answered a read with {:?}", other.opcode())),
                    }
                }
                for data in window {
                    crc = crc32c::crc32c_append(crc, &data.ok_or("a read went unanswered")?);
                }
            }
            sums.push(crc);
            off = end;
        }
        Ok(sums)
    }

    /// One monitor pass: reconnect faulted children, start pending resyncs. Returns when the
    /// next reconnect attempt is due, if a child is still faulted.
    fn tick(&self) -> Option<Instant> {
        let mut due: Option<Instant> = None;
        let entries: Vec<(Arc<NexusShared>, Retry)> = self
            .nexuses
            .lock()
            .values()
            .map(|e| (e.shared.clone(), e.retry))
            .collect();
        for (shared, retry) in entries {
            if shared.fenced() {
                continue;
            }
            if generation_behind(&shared) {
                // Not durable yet (a report failed): held writes wait for the next pass.
                drop(self.raise_generation(&shared));
            } else {
                self.report_changes(&shared);
            }
            let _epoch = shared.epoch_lock.lock();
            for (c, (retry_at, backoff)) in retry.into_iter().enumerate() {
                let child = shared.child(c);
                let word = child.word();
                if state_of(word) != ChildState::Faulted {
                    continue;
                }
                if Instant::now() < retry_at {
                    due = Some(due.map_or(retry_at, |d| d.min(retry_at)));
                    continue;
                }
                let Some(spec) = child.spec.lock().clone() else {
                    continue;
                };
                // (wait before the next attempt, the back-off after that one)
                let (wait, after) = match self.open_at_current(&shared, &spec) {
                    Ok((paths, record)) => {
                        // Only the faulted incarnation it found: a remove (and an add) since
                        // made the slot another replica's. Made syncing and published under
                        // the order's lock: no resync is ordered between.
                        let order = shared.resync_order.lock();
                        if child.enter_from(word, ChildState::Syncing).is_some() {
                            child.gen_stored.store(record.generation, Ordering::SeqCst);
                            shared.publish(c, paths);
                            drop(order);
                            tracing::info!(nexus = %shared.name, child = %spec, dirty_bytes = child.dirty.count_bytes(), "faulted replica is back; resync queued");
                        }
                        // Reset: the next outage is retried quickly again.
                        (RECONNECT_BACKOFF_MIN, RECONNECT_BACKOFF_MIN)
                    }
                    Err(why) => {
                        tracing::debug!(nexus = %shared.name, child = %spec, why = %why, "replica still unreachable");
                        (backoff, (backoff * 2).min(RECONNECT_BACKOFF_MAX))
                    }
                };
                let retry_at = Instant::now() + wait;
                if child.state() == ChildState::Faulted {
                    due = Some(due.map_or(retry_at, |d| d.min(retry_at)));
                }
                let _ = self.entry(&shared.name, |e| e.retry[c] = (retry_at, after));
            }
            self.kick_resync(&shared);
        }
        due
    }

    /// Orders the next resync, if one is due, and wakes the nexus's home core: its reactor
    /// may be asleep with no I/O to do, and only its poll starts the job.
    fn kick_resync(&self, shared: &NexusShared) {
        if shared.order_resync() {
            self.wake_home(shared);
        }
    }

    /// Wakes the nexus's home core, which runs the resync job.
    fn wake_home(&self, shared: &NexusShared) {
        if let Err(e) = self.engine.call(shared.cores[0], |_| ()) {
            tracing::warn!(nexus = %shared.name, error = %e, "could not wake the home core for a resync");
        }
    }
}

impl Drop for NexusManager {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Whether a raise is pending, or an in-sync child (one back from a resync) lacks the
/// current generation.
fn generation_behind(shared: &NexusShared) -> bool {
    let target = shared.gen_target.load(Ordering::SeqCst);
    shared.raise_pending()
        || (0..CHILDREN_MAX).any(|c| {
            let child = shared.child(c);
            child.state() == ChildState::InSync && child.gen_stored.load(Ordering::SeqCst) < target
        })
}

fn view(shared: &NexusShared) -> NexusView {
    let children: Vec<ChildView> = (0..CHILDREN_MAX)
        .filter_map(|c| {
            let child = shared.child(c);
            let spec = child.spec.lock().clone()?;
            Some(ChildView {
                spec: spec.to_string(),
                state: child.state(),
                reason: child.reason.lock().clone(),
                dirty_bytes: child.dirty.count_bytes(),
                copied_bytes: child.copied_bytes.load(Ordering::Relaxed),
                write_wait_max_us: child.write_wait_max_ns.load(Ordering::Relaxed) / 1000,
                generation: child.gen_stored.load(Ordering::Acquire),
            })
        })
        .collect();
    let in_sync = shared.in_sync_count();
    let state = if shared.fenced() {
        "fenced"
    } else if in_sync < shared.options.min_in_sync {
        "below-minimum"
    } else if (in_sync as usize) < children.len() {
        "degraded"
    } else {
        "online"
    };
    let p = &shared.resync;
    let resync = match p.child.load(Ordering::Acquire) {
        0 => None,
        c => {
            let done = p.done_bytes.load(Ordering::Acquire);
            let total = p.total_bytes.load(Ordering::Acquire).max(done);
            let secs = p.elapsed_ms.load(Ordering::Acquire) as f64 / 1000.0;
            let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
            Some(ResyncView {
                child: shared
                    .child(c as usize - 1)
                    .spec
                    .lock()
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
                full: p.full.load(Ordering::Acquire),
                done_bytes: done,
                total_bytes: total,
                progress: p.progress_ppm.load(Ordering::Acquire) as f64
                    / ResyncProgress::PPM as f64,
                bytes_per_s: rate,
                eta_s: if rate > 0.0 {
                    (total - done) as f64 / rate
                } else {
                    0.0
                },
                write_wait_max_us: shared
                    .child(c as usize - 1)
                    .write_wait_max_ns
                    .load(Ordering::Relaxed)
                    / 1000,
            })
        }
    };
    NexusView {
        name: shared.name.clone(),
        volume_id: shared.volume_id.to_string(),
        epoch: shared.epoch(),
        size_bytes: shared.info.size_bytes,
        block_size_bytes: shared.info.block_size_bytes,
        state: state.into(),
        min_in_sync: shared.options.min_in_sync,
        region_bytes: shared.options.region_bytes,
        io_timeout_ms: shared.options.io_timeout.as_millis() as u64,
        children,
        resync,
        generation: shared.gen_durable.load(Ordering::Acquire),
        rebuilt_bytes: p.rebuilt_bytes.load(Ordering::Relaxed),
    }
}
