//! Hosted replicas: the volumes of this node that nexuses (remote or local) write through,
//! each with the epoch fence it enforces.
//!
//! A replica is named on the wire by its [`VolumeId`], which [`volume_id_for`] derives from
//! the volume's name (volume names are unique per cluster, and the replicas of one volume on
//! different nodes share its name). The node supplies a resolver from id to an open bdev;
//! [`ReplicaSet`] keeps one [`HostedReplica`] per id so every connection to it, and a local
//! nexus, share one epoch fence.
//!
//! Epoch rules ([`ReplicaSet::accept`]): an `Open` with an epoch below the stored one is
//! refused (`StaleEpoch`); a higher one is stored durably first, then becomes the fence; an
//! equal one is the same nexus connecting again, and is refused when the `Open` claims a
//! takeover (a new nexus must always go above every fence). Requests are checked against the fence one
//! by one ([`HostedReplica::admits`]).
//!
//! Each replica also keeps its data generation record ([`crate::generation`]), loaded with
//! its fence and changed only by [`ReplicaSet::set_generation`], from the nexus that holds
//! the fence, never downwards.
//!
//! Each replica may also have an assigned opener ([`crate::opener`]): the one node whose nexus
//! may open it, set by [`ReplicaSet::assign`] (the control process, through the node admin
//! API) and loaded with its fence. The replica server checks it on every `Open` and
//! `SetGeneration`.
//!
//! Raising a fence also drains: every path into the replica (a server connection, a local
//! nexus channel) announces each request in its [`PathGauge`] *before* it checks the fence
//! (both SeqCst), and `accept` waits, after storing a higher fence, until no path opened
//! under a lower epoch has a request running. So when the new nexus hears `OpenOk`, no write
//! of an older nexus can still land after its own.

use crate::epoch::{EpochError, EpochStore};
use crate::generation::GenRecord;
use crate::proto::{Epoch, VolumeId};
use crate::transport::PeerIdentity;
use cairn_engine::reactor::BdevId;
use cairn_engine::{BdevHandle, BdevInfo};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// How long raising a fence waits for requests under older epochs to finish; past it the
/// `Open` is refused (EBUSY) and the nexus retries.
pub const FENCE_DRAIN_MAX: Duration = Duration::from_secs(10);

/// Requests running on one path into a replica. Written only by the path's own reactor.
#[derive(Debug)]
pub struct PathGauge {
    epoch: u64,
    in_flight: AtomicU64,
}

impl PathGauge {
    /// Announces a request; call before [`HostedReplica::admits`].
    #[inline]
    pub fn begin(&self) {
        let n = self.in_flight.load(Ordering::Relaxed);
        self.in_flight.store(n + 1, Ordering::SeqCst);
    }

    /// The request finished (or was refused).
    #[inline]
    pub fn end(&self) {
        let n = self.in_flight.load(Ordering::Relaxed);
        debug_assert!(n > 0, "gauge ended more requests than began");
        self.in_flight.store(n - 1, Ordering::SeqCst);
    }
}

/// The wire id of the volume named `name`: 128 bits of crc32c over the name under four
/// different prefixes. Not cryptographic; it only has to tell a cluster's volumes apart.
pub fn volume_id_for(name: &str) -> VolumeId {
    let mut id = [0u8; 16];
    for (i, chunk) in id.chunks_mut(4).enumerate() {
        let seed = crc32c::crc32c(format!("cairn-volume-id-{i}:").as_bytes());
        chunk.copy_from_slice(&crc32c::crc32c_append(seed, name.as_bytes()).to_le_bytes());
    }
    if id == [0; 16] {
        id[0] = 1;
    }
    VolumeId::new(id).expect("made non-nil above")
}

/// One replica this node hosts.
#[derive(Debug)]
pub struct HostedReplica {
    pub name: String,
    pub volume_id: VolumeId,
    pub handle: BdevHandle,
    /// The highest epoch accepted: requests below it are refused.
    fence: AtomicU64,
    /// Serialises epoch changes (the durable write, then the fence).
    accept_lock: Mutex<()>,
    /// Every path into this replica, for the drain when the fence rises.
    paths: Mutex<Vec<Weak<PathGauge>>>,
    /// The durable generation record, as stored (changed under `accept_lock`).
    record: Mutex<GenRecord>,
    /// The node assigned to open it, as stored; None: any node.
    opener: Mutex<Option<String>>,
}

impl HostedReplica {
    pub fn bdev(&self) -> BdevId {
        self.handle.id()
    }

    pub fn info(&self) -> &BdevInfo {
        self.handle.info()
    }

    /// The stored generation record.
    pub fn record(&self) -> GenRecord {
        *self.record.lock()
    }

    /// The node assigned to open it; None: any node.
    pub fn opener(&self) -> Option<String> {
        self.opener.lock().clone()
    }

    /// The fence now.
    pub fn fence(&self) -> u64 {
        self.fence.load(Ordering::Acquire)
    }

    /// Whether a request under `epoch` may run: not below the fence. The caller announced
    /// it in its [`PathGauge`] first.
    #[inline]
    pub fn admits(&self, epoch: Epoch) -> bool {
        epoch.get() >= self.fence.load(Ordering::SeqCst)
    }

    /// A gauge for a new path opened under `epoch` (control path: takes a lock).
    pub fn register_path(&self, epoch: Epoch) -> Arc<PathGauge> {
        let g = Arc::new(PathGauge {
            epoch: epoch.get(),
            in_flight: AtomicU64::new(0),
        });
        let mut paths = self.paths.lock();
        paths.retain(|w| w.strong_count() > 0);
        paths.push(Arc::downgrade(&g));
        g
    }

    /// Waits until no path opened below `epoch` has a request running.
    fn drain_below(&self, epoch: u64) -> bool {
        let deadline = Instant::now() + FENCE_DRAIN_MAX;
        loop {
            let busy = self
                .paths
                .lock()
                .iter()
                .filter_map(Weak::upgrade)
                .any(|g| g.epoch < epoch && g.in_flight.load(Ordering::SeqCst) > 0);
            if !busy {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// What [`ReplicaSet::set_generation`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordUpdate {
    /// The record is now this (durably).
    Stored(GenRecord),
    /// The caller's epoch is below the fence: a newer nexus owns the replica.
    Stale { current: Epoch },
}

/// A replica's durable state, hosted or not ([`ReplicaSet::status`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// The stored fence; None when no nexus has opened it.
    pub fence: Option<Epoch>,
    pub record: GenRecord,
    /// The node assigned to open it; None: any node.
    pub opener: Option<String>,
    /// Whether this node has it open as a replica (a nexus has opened it since the start).
    pub hosted: bool,
}

/// What [`ReplicaSet::accept`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Acceptance {
    Accepted(Epoch),
    Stale { current: Epoch },
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    #[error("no replica with volume id {id} on this node")]
    NotFound { id: VolumeId },
    #[error("replica '{name}': {source}")]
    Epoch { name: String, source: EpochError },
    #[error(
        "replica '{name}': requests under older epochs did not finish within {FENCE_DRAIN_MAX:?}"
    )]
    Busy { name: String },
    #[error("replica '{name}' was released (its volume is going away) while this request waited")]
    Released { name: String },
    #[error("replica '{name}': generation update under epoch {epoch} from a nexus that has not opened it (fence {fence})")]
    NotOwner {
        name: String,
        epoch: u64,
        fence: u64,
    },
    #[error("replica '{name}': generation {wanted} is below the stored {stored}; a generation never goes down")]
    GenerationDown {
        name: String,
        wanted: u64,
        stored: u64,
    },
    #[error("replica '{name}': flushing before the clean mark failed: {why}")]
    Flush { name: String, why: String },
    #[error(
        "replica '{name}': '{opener}' is not a node id (1 to {} letters, digits, '-', '_' or '.')",
        cairn_tls::NAME_MAX
    )]
    BadOpener { name: String, opener: String },
    #[error("{why}")]
    NotAssigned { why: String },
}

impl ReplicaError {
    pub fn errno(&self) -> i32 {
        match self {
            ReplicaError::NotFound { .. } => libc::ENOENT,
            ReplicaError::Epoch { .. } => libc::EIO,
            ReplicaError::Busy { .. } => libc::EBUSY,
            ReplicaError::Released { .. } => libc::EAGAIN,
            ReplicaError::NotOwner { .. }
            | ReplicaError::GenerationDown { .. }
            | ReplicaError::BadOpener { .. } => libc::EINVAL,
            ReplicaError::NotAssigned { .. } => libc::EACCES,
            ReplicaError::Flush { .. } => libc::EIO,
        }
    }
}

/// Finds and opens the volume behind a wire id: `(name, handle)`.
pub type Resolver = dyn Fn(&VolumeId) -> Option<(String, BdevHandle)> + Send + Sync;

/// Every replica this node hosts, opened on first use.
pub struct ReplicaSet {
    epochs: EpochStore,
    resolve: Box<Resolver>,
    hosted: Mutex<HashMap<VolumeId, Arc<HostedReplica>>>,
}

impl std::fmt::Debug for ReplicaSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaSet")
            .field("epochs", &self.epochs)
            .finish()
    }
}

impl ReplicaSet {
    pub fn new(epochs: EpochStore, resolve: Box<Resolver>) -> ReplicaSet {
        ReplicaSet {
            epochs,
            resolve,
            hosted: Mutex::new(HashMap::new()),
        }
    }

    /// The hosted replica with wire id `id`, opening it (and loading its fence) on first use.
    pub fn get(&self, id: &VolumeId) -> Result<Arc<HostedReplica>, ReplicaError> {
        let mut hosted = self.hosted.lock();
        if let Some(r) = hosted.get(id) {
            return Ok(r.clone());
        }
        let (name, handle) = (self.resolve)(id).ok_or(ReplicaError::NotFound { id: *id })?;
        let stored = self.epochs.load(id).map_err(|source| ReplicaError::Epoch {
            name: name.clone(),
            source,
        })?;
        let record = self
            .epochs
            .load_generation(id)
            .map_err(|source| ReplicaError::Epoch {
                name: name.clone(),
                source,
            })?;
        let opener = self
            .epochs
            .load_opener(id)
            .map_err(|source| ReplicaError::Epoch {
                name: name.clone(),
                source,
            })?;
        let r = Arc::new(HostedReplica {
            name,
            volume_id: *id,
            handle,
            fence: AtomicU64::new(stored.map_or(0, Epoch::get)),
            accept_lock: Mutex::new(()),
            paths: Mutex::new(Vec::new()),
            record: Mutex::new(record),
            opener: Mutex::new(opener),
        });
        hosted.insert(*id, r.clone());
        Ok(r)
    }

    /// The durable state of the replica `name` (wire id `id`): from memory when it is hosted,
    /// else from its files, without opening it.
    pub fn status(&self, id: &VolumeId, name: &str) -> Result<ReplicaStatus, ReplicaError> {
        if let Some(r) = self.hosted.lock().get(id).cloned() {
            return Ok(ReplicaStatus {
                fence: Epoch::new(r.fence()).ok(),
                record: r.record(),
                opener: r.opener(),
                hosted: true,
            });
        }
        let epoch = |source| ReplicaError::Epoch {
            name: name.to_string(),
            source,
        };
        Ok(ReplicaStatus {
            fence: self.epochs.load(id).map_err(epoch)?,
            record: self.epochs.load_generation(id).map_err(epoch)?,
            opener: self.epochs.load_opener(id).map_err(epoch)?,
            hosted: false,
        })
    }

    /// Assigns the replica `name` (wire id `id`) to the node `opener` (None: any node may
    /// open it again), durably before this returns; the next `Open` is checked against it.
    /// A connection already open is not cut: the epoch fence, raised by the assigned node's
    /// takeover, is what stops an older nexus.
    pub fn assign(
        &self,
        id: &VolumeId,
        name: &str,
        opener: Option<&str>,
    ) -> Result<(), ReplicaError> {
        if let Some(o) = opener.filter(|o| !cairn_tls::valid_name(o)) {
            return Err(ReplicaError::BadOpener {
                name: name.to_string(),
                opener: o.to_string(),
            });
        }
        // The file is written under the set's lock, so `get` cannot load the old assignment
        // into a new hosted replica while it changes (a `forget` and `get` in between would
        // otherwise leave the old opener in memory until a restart). A hosted replica's own
        // lock is taken first, without the set's lock (every other replica's handshake needs
        // the set's lock while an Open may hold this one for a fence drain); it orders the
        // change with that replica's Opens. Nothing takes a replica's lock while holding the
        // set's, so the order (replica, then set) cannot deadlock. Should the replica be
        // forgotten or replaced while its lock is awaited, the change starts again.
        loop {
            let r = self.hosted.lock().get(id).cloned();
            let _serial = r.as_ref().map(|r| r.accept_lock.lock());
            let hosted = self.hosted.lock();
            let now = hosted.get(id);
            let same = match (&r, now) {
                (Some(r), Some(now)) => Arc::ptr_eq(r, now),
                (None, None) => true,
                _ => false,
            };
            if !same {
                continue;
            }
            // `None`: the file is damaged; the new assignment is authoritative and replaces
            // it (opening stays refused while it is damaged, so this is the way out).
            let current = match &r {
                Some(r) => Some(r.opener()),
                None => match self.epochs.load_opener(id) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        tracing::warn!(replica = %name, error = %e, "replacing a damaged opener file");
                        None
                    }
                },
            };
            if current.as_ref().is_some_and(|c| c.as_deref() == opener) {
                return Ok(());
            }
            self.epochs
                .store_opener(id, opener)
                .map_err(|source| ReplicaError::Epoch {
                    name: name.to_string(),
                    source,
                })?;
            if let Some(r) = &r {
                *r.opener.lock() = opener.map(str::to_string);
            }
            drop(hosted);
            let current = current.flatten();
            tracing::info!(replica = %name, opener = opener.unwrap_or("any node"), previous = current.as_deref().unwrap_or("any node"), "replica opener assigned");
            return Ok(());
        }
    }

    /// Whether `peer` may open `r` now (its assigned opener, [`crate::opener::may_open`]);
    /// the error names the peer and the assigned node.
    pub fn may_open(&self, r: &HostedReplica, peer: &PeerIdentity) -> Result<(), String> {
        let opener = r.opener.lock();
        if crate::opener::may_open(opener.as_deref(), peer) {
            return Ok(());
        }
        Err(format!(
            "replica '{}' is assigned to node:{}, not to {peer}",
            r.name,
            opener.as_deref().unwrap_or_default()
        ))
    }

    /// Refuses a change to `r` once the set no longer holds it: a handshake that looked it up
    /// before `release_replica` forgot it (its volume going away), or before an assignment
    /// raced a forget and a reload, must not write its fence or record after that. Called
    /// under `r`'s lock; the set's lock is taken after it, the order [`ReplicaSet::assign`]
    /// uses.
    fn still_hosted(&self, r: &HostedReplica) -> Result<(), ReplicaError> {
        match self.hosted.lock().get(&r.volume_id) {
            Some(h) if std::ptr::eq(Arc::as_ptr(h), r) => Ok(()),
            _ => Err(ReplicaError::Released {
                name: r.name.clone(),
            }),
        }
    }

    /// Applies the epoch rules to an `Open` under `epoch`; a raised fence is durable before
    /// this returns.
    /// A remote `peer`'s assignment is checked again here, under the replica's lock that
    /// [`ReplicaSet::assign`] takes, so an Open checked just before an assignment changed
    /// cannot move the fence after the assignment returned; a local nexus passes `None`.
    pub fn accept(
        &self,
        r: &HostedReplica,
        epoch: Epoch,
        takeover: bool,
        peer: Option<&PeerIdentity>,
    ) -> Result<Acceptance, ReplicaError> {
        let _serial = r.accept_lock.lock();
        self.still_hosted(r)?;
        if let Some(p) = peer {
            self.may_open(r, p)
                .map_err(|why| ReplicaError::NotAssigned { why })?;
        }
        let current = r.fence();
        if epoch.get() < current || (takeover && epoch.get() == current) {
            return Ok(Acceptance::Stale {
                current: Epoch::new(current).expect("a stored fence is never 0"),
            });
        }
        if epoch.get() > current {
            self.epochs
                .store(&r.volume_id, epoch)
                .map_err(|source| ReplicaError::Epoch {
                    name: r.name.clone(),
                    source,
                })?;
            r.fence.store(epoch.get(), Ordering::SeqCst);
            tracing::info!(replica = %r.name, epoch = epoch.get(), "replica fenced at new epoch");
            if !r.drain_below(epoch.get()) {
                return Err(ReplicaError::Busy {
                    name: r.name.clone(),
                });
            }
        } else if !r.drain_below(epoch.next().map_or(u64::MAX, Epoch::get)) {
            // The same nexus reconnecting (after it faulted this replica): requests of its
            // old connections may still be running here, and must land before the resync
            // that follows this Open copies their regions. At EPOCH_MAX there is no next
            // epoch, and every path (all at or below it) drains.
            return Err(ReplicaError::Busy {
                name: r.name.clone(),
            });
        }
        Ok(Acceptance::Accepted(epoch))
    }

    /// Stores a new generation record for `r`, asked by the nexus holding its fence at
    /// `epoch`. A generation never goes down (an equal one may change the clean flag). With
    /// `clean`, `flush` runs first, so the mark never claims data that is not durable.
    pub fn set_generation(
        &self,
        r: &HostedReplica,
        epoch: Epoch,
        generation: u64,
        clean: bool,
        flush: impl FnOnce() -> Result<(), String>,
        peer: Option<&PeerIdentity>,
    ) -> Result<RecordUpdate, ReplicaError> {
        let _serial = r.accept_lock.lock();
        self.still_hosted(r)?;
        if let Some(p) = peer {
            self.may_open(r, p)
                .map_err(|why| ReplicaError::NotAssigned { why })?;
        }
        let fence = r.fence();
        if epoch.get() < fence {
            return Ok(RecordUpdate::Stale {
                current: Epoch::new(fence).expect("a stored fence is never 0"),
            });
        }
        if epoch.get() > fence {
            return Err(ReplicaError::NotOwner {
                name: r.name.clone(),
                epoch: epoch.get(),
                fence,
            });
        }
        let stored = r.record();
        if generation < stored.generation {
            return Err(ReplicaError::GenerationDown {
                name: r.name.clone(),
                wanted: generation,
                stored: stored.generation,
            });
        }
        let new = GenRecord { generation, clean };
        if new == stored {
            return Ok(RecordUpdate::Stored(new));
        }
        if clean {
            flush().map_err(|why| ReplicaError::Flush {
                name: r.name.clone(),
                why,
            })?;
        }
        self.epochs
            .store_generation(&r.volume_id, new)
            .map_err(|source| ReplicaError::Epoch {
                name: r.name.clone(),
                source,
            })?;
        *r.record.lock() = new;
        tracing::info!(replica = %r.name, generation, clean, epoch = epoch.get(), "replica generation stored");
        Ok(RecordUpdate::Stored(new))
    }

    /// Forgets a replica whose volume is going away (its fence file stays).
    pub fn forget(&self, id: &VolumeId) -> Option<Arc<HostedReplica>> {
        self.hosted.lock().remove(id)
    }

    /// Every replica opened so far.
    pub fn hosted(&self) -> Vec<Arc<HostedReplica>> {
        self.hosted.lock().values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_ids_differ_by_name_and_are_stable() {
        assert_eq!(volume_id_for("pg"), volume_id_for("pg"));
        assert_ne!(volume_id_for("pg"), volume_id_for("pg2"));
        assert_ne!(volume_id_for(""), volume_id_for("a"));
    }

    /// An assignment waiting on a replica's lock while that replica is forgotten and loaded
    /// again (from the file still holding the old opener) reaches the new one: it starts
    /// again rather than updating the replica that is gone.
    #[test]
    fn an_assignment_racing_a_forget_and_reload_reaches_the_reloaded_replica() {
        use cairn_engine::bdev::malloc::MallocBdev;
        use cairn_engine::{CoreList, Engine, EngineConfig};
        let cpus = cairn_engine::sys::allowed_cpus();
        let mut config = EngineConfig::new(CoreList::parse(&cpus[0].to_string()).unwrap());
        config.buf_count = 16;
        let engine = Engine::start(config).unwrap();
        let handle = engine
            .add_bdev(Arc::new(MallocBdev::new("r", 1 << 20, 4096).unwrap()))
            .unwrap();
        let id = volume_id_for("vol");
        let dir = std::env::temp_dir().join(format!("cairn-assign-race-{}", std::process::id()));
        drop(std::fs::remove_dir_all(&dir));
        let set = Arc::new(ReplicaSet::new(
            EpochStore::open(&dir).unwrap(),
            Box::new(move |asked| (*asked == id).then(|| ("vol".to_string(), handle.clone()))),
        ));
        set.assign(&id, "vol", Some("a")).unwrap();
        let first = set.get(&id).unwrap();
        let held = first.accept_lock.lock();
        let assigning = {
            let set = set.clone();
            std::thread::spawn(move || set.assign(&id, "vol", Some("c")))
        };
        // Let the assignment reach the replica's lock, then swap the replica under it.
        std::thread::sleep(std::time::Duration::from_millis(100));
        set.forget(&id);
        let reloaded = set.get(&id).unwrap();
        drop(held);
        assigning.join().unwrap().unwrap();
        assert_eq!(reloaded.opener().as_deref(), Some("c"));
        assert_eq!(set.get(&id).unwrap().opener().as_deref(), Some("c"));
        assert_eq!(set.epochs.load_opener(&id).unwrap().as_deref(), Some("c"));
        // The replica looked up before the swap can no longer move its fence.
        let stale = set.accept(&first, Epoch::new(5).unwrap(), true, None);
        assert!(
            matches!(stale, Err(ReplicaError::Released { .. })),
            "{stale:?}"
        );
        assert!(set
            .accept(&reloaded, Epoch::new(5).unwrap(), true, None)
            .is_ok());
        engine.stop();
        drop(std::fs::remove_dir_all(&dir));
    }
}
