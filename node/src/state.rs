//! The node's live state and every control operation on it: the engine, the pools opened in
//! it, the malloc bdevs, and the NBD exports with the volume handles they hold open.
//!
//! Operations are blocking (each is one or more engine round trips), so async callers run
//! them in `spawn_blocking`. One mutex serialises them: control traffic is rare, and the
//! serialisation makes "is it exported?" checks and the open/close of volume handles atomic
//! with the change they guard. Nothing here is on the I/O path; statistics reads
//! ([`Node::export_statuses`], [`Engine::reactor_times`]) take no lock the operations hold.
//!
//! Policy: a volume or snapshot that is exported cannot be deleted (FAILED_PRECONDITION);
//! unexport it first, so no client loses its device without someone asking for it. A volume
//! hosted as a replica (opened by the replica server or a local nexus) cannot be exported
//! directly, and an exported one cannot be hosted: either would let writes bypass
//! replication. Nexuses, the replica server and fault injection live in [`replication`].

mod replication;

use crate::proto as pb;
use cairn_engine::bdev::crypt::{CryptError, CryptKey};
use cairn_engine::bdev::fault::{FaultBdev, FaultControl};
use cairn_engine::bdev::malloc::MallocBdev;
use cairn_engine::bdev::{Bdev, BdevError};
use cairn_engine::frontend::nbd::{ExportOptions, ExportStatus, NbdError, NbdServer};
use cairn_engine::volume::format::ObjectKind;
use cairn_engine::volume::{ObjectInfo, Pool, PoolError, PoolSpace, VOLUME_BLOCK_BYTES};
use cairn_engine::{BdevHandle, CoreId, Engine, EngineError, ReactorTimes};
use parking_lot::{Mutex, RwLock};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("no pool named '{name}'")]
    NoSuchPool { name: String },
    #[error("no volume, snapshot or malloc bdev named '{name}'")]
    NoSuchObject { name: String },
    #[error("'{name}' exists in pools {pools}; say which pool")]
    Ambiguous { name: String, pools: String },
    #[error("'{name}' is exported as '{export}'; unexport it first")]
    Exported { name: String, export: String },
    #[error("export '{name}' already exists")]
    ExportExists { name: String },
    #[error("no export named '{name}'")]
    NoSuchExport { name: String },
    #[error("the NBD frontend is disabled on this node (nbd_listen = off and no nbd_socket)")]
    NbdDisabled,
    #[error("the node is shutting down")]
    ShuttingDown,
    #[error("a pool named '{name}' is already open (from {path})")]
    PoolExists { name: String, path: String },
    #[error("pool '{pool}': {source}")]
    Pool { pool: String, source: PoolError },
    #[error("malloc bdev '{name}': {source}")]
    Malloc { name: String, source: BdevError },
    #[error("'{name}' is hosted as a replica; export its nexus (export --nexus) instead")]
    IsReplica { name: String },
    #[error("nexus '{name}' is exported as '{export}'; unexport it first")]
    NexusExported { name: String, export: String },
    #[error("fault injection is off; start cairn-node with --fault-injection")]
    FaultInjectionOff,
    #[error("no pool or malloc bdev named '{name}' to inject faults into")]
    NoSuchFault { name: String },
    #[error("replication: {0}")]
    Replication(String),
    #[error(
        "nexus '{nexus}': control_volume '{volume}' needs the node started with --control (the \
         control process keeps the volume's in-sync record)"
    )]
    NoControl { nexus: String, volume: String },
    #[error(transparent)]
    Nexus(#[from] cairn_replication::nexus::manager::NexusError),
    #[error(transparent)]
    Replica(#[from] cairn_replication::replica::ReplicaError),
    #[error(transparent)]
    Crypt(#[from] CryptError),
    #[error(transparent)]
    Nbd(#[from] NbdError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

fn pool_err(pool: &str) -> impl FnOnce(PoolError) -> NodeError + '_ {
    move |source| NodeError::Pool {
        pool: pool.to_string(),
        source,
    }
}

struct PoolSlot {
    name: String,
    path: PathBuf,
    home: CoreId,
    pool: Pool,
}

struct MallocSlot {
    name: String,
    handle: BdevHandle,
}

/// What an export serves.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Source {
    Object {
        pool: String,
        name: String,
        kind: ObjectKind,
    },
    Malloc {
        name: String,
    },
    Nexus {
        name: String,
    },
}

struct ExportSlot {
    source: Source,
    /// For objects: the handle `open_volume` returned, closed on unexport.
    handle: BdevHandle,
    read_only: bool,
    /// The crypt bdev stacked on `handle` when the export is encrypted: what NBD serves,
    /// removed on unexport before `handle` is closed.
    crypt: Option<BdevHandle>,
}

/// A volume or malloc bdev hosted as a replica.
struct ReplicaSlot {
    /// Empty for a malloc bdev.
    pool: String,
    name: String,
    handle: BdevHandle,
}

#[derive(Default)]
struct State {
    pools: Vec<PoolSlot>,
    mallocs: Vec<MallocSlot>,
    exports: BTreeMap<String, ExportSlot>,
    replicas: Vec<ReplicaSlot>,
    /// Fault controls by pool or malloc name (with fault injection on).
    faults: BTreeMap<String, Arc<FaultControl>>,
    shutting_down: bool,
}

/// A running node. Shared (in an `Arc`) by the admin service, the metrics responder and
/// the daemon's shutdown path.
pub struct Node {
    engine: Arc<Engine>,
    nbd: RwLock<Option<NbdServer>>,
    state: Mutex<State>,
    replication: OnceLock<replication::Replication>,
    fault_injection: bool,
    /// The control process this node registered with (`--control`): where nexuses with a
    /// `control_volume` record their in-sync sets.
    control: OnceLock<crate::membership::Membership>,
    /// The node's mutual TLS (`--tls-*`), set once at start: the admin server's, the control
    /// client's and the replica transport's configuration.
    tls: OnceLock<cairn_tls::Tls>,
}

impl Node {
    /// Lets NBD clients in, once the configured exports exist (the server starts paused so
    /// no client sees a half-populated export list).
    pub fn open_nbd(&self) {
        if let Some(nbd) = self.nbd.read().as_ref() {
            nbd.resume();
        }
    }

    /// With `fault_injection`, every pool device and malloc bdev is wrapped in a fault bdev
    /// that [`Node::set_fault`] controls.
    pub fn new(engine: Arc<Engine>, nbd: Option<NbdServer>, fault_injection: bool) -> Node {
        Node {
            engine,
            nbd: RwLock::new(nbd),
            state: Mutex::new(State::default()),
            replication: OnceLock::new(),
            fault_injection,
            control: OnceLock::new(),
            tls: OnceLock::new(),
        }
    }

    /// Gives the node its TLS configuration (once, at start, before replication starts).
    pub fn set_tls(&self, tls: cairn_tls::Tls) {
        drop(self.tls.set(tls));
    }

    /// The node's TLS configuration; None when it runs without TLS.
    pub fn tls(&self) -> Option<&cairn_tls::Tls> {
        self.tls.get()
    }

    /// Tells the node its control process (once, when it joins the cluster).
    pub fn set_control(&self, membership: crate::membership::Membership) {
        drop(self.control.set(membership));
    }

    /// Wraps a pool device or malloc bdev in a fault bdev when fault injection is on; the
    /// control goes to [`Node::add_pool`] (or stays with the malloc).
    pub fn faultable(
        &self,
        name: &str,
        bdev: Arc<dyn Bdev>,
    ) -> (Arc<dyn Bdev>, Option<Arc<FaultControl>>) {
        if !self.fault_injection {
            return (bdev, None);
        }
        let f = FaultBdev::new(&format!("{name}-fault"), bdev);
        let control = f.control();
        (Arc::new(f), Some(control))
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Takes ownership of an opened pool.
    pub fn add_pool(
        &self,
        name: &str,
        path: PathBuf,
        home: CoreId,
        pool: Pool,
        fault: Option<Arc<FaultControl>>,
    ) -> Result<(), NodeError> {
        let mut st = self.state.lock();
        if let Some(p) = st.pools.iter().find(|p| p.name == name) {
            let e = NodeError::PoolExists {
                name: name.into(),
                path: p.path.display().to_string(),
            };
            drop(st);
            drop(pool.close(&self.engine));
            return Err(e);
        }
        if let Some(f) = fault {
            st.faults.insert(name.to_string(), f);
        }
        st.pools.push(PoolSlot {
            name: name.into(),
            path,
            home,
            pool,
        });
        Ok(())
    }

    /// Creates a RAM bdev; it can then be exported by name.
    pub fn add_malloc(&self, name: &str, size_bytes: u64) -> Result<(), NodeError> {
        let mut st = self.live()?;
        if st.mallocs.iter().any(|m| m.name == name) {
            return Err(NodeError::ExportExists { name: name.into() });
        }
        let bdev = MallocBdev::new(name, size_bytes, VOLUME_BLOCK_BYTES).map_err(|source| {
            NodeError::Malloc {
                name: name.into(),
                source,
            }
        })?;
        let (bdev, fault) = self.faultable(name, Arc::new(bdev));
        let handle = self.engine.add_bdev(bdev)?;
        if let Some(f) = fault {
            st.faults.insert(name.to_string(), f);
        }
        st.mallocs.push(MallocSlot {
            name: name.into(),
            handle,
        });
        Ok(())
    }

    fn live(&self) -> Result<parking_lot::MutexGuard<'_, State>, NodeError> {
        let st = self.state.lock();
        if st.shutting_down {
            return Err(NodeError::ShuttingDown);
        }
        Ok(st)
    }

    /// Each pool's name with its size and free space (O(1) per pool, for the heartbeat).
    pub fn pool_space(&self) -> Result<Vec<(String, PoolSpace)>, NodeError> {
        let st = self.live()?;
        st.pools
            .iter()
            .map(|p| {
                let space = p.pool.space(&self.engine).map_err(pool_err(&p.name))?;
                Ok((p.name.clone(), space))
            })
            .collect()
    }

    pub fn list_pools(&self) -> Result<Vec<pb::Pool>, NodeError> {
        let st = self.live()?;
        st.pools
            .iter()
            .map(|p| {
                let info = p.pool.info(&self.engine).map_err(pool_err(&p.name))?;
                let cluster = u64::from(info.cluster_size_bytes);
                let count = |k| info.objects.iter().filter(|o| o.kind == k).count() as u32;
                Ok(pb::Pool {
                    name: p.name.clone(),
                    uuid: info.uuid.clone(),
                    path: p.path.display().to_string(),
                    home_core: p.home.get(),
                    cluster_size_bytes: info.cluster_size_bytes,
                    size_bytes: info.clusters * cluster,
                    free_bytes: info.free_clusters * cluster,
                    clusters: info.clusters,
                    free_clusters: info.free_clusters,
                    volumes: count(ObjectKind::Volume),
                    snapshots: count(ObjectKind::Snapshot),
                })
            })
            .collect()
    }

    /// Volumes and snapshots of `pool`, or of every pool when it is empty.
    pub fn list_volumes(&self, pool: &str) -> Result<Vec<pb::Volume>, NodeError> {
        let st = self.live()?;
        if !pool.is_empty() && !st.pools.iter().any(|p| p.name == pool) {
            return Err(NodeError::NoSuchPool { name: pool.into() });
        }
        let mut out = Vec::new();
        for p in st
            .pools
            .iter()
            .filter(|p| pool.is_empty() || p.name == pool)
        {
            let info = p.pool.info(&self.engine).map_err(pool_err(&p.name))?;
            for o in &info.objects {
                out.push(volume_view(&st, &p.name, info.cluster_size_bytes, o));
            }
        }
        Ok(out)
    }

    pub fn create_volume(
        &self,
        name: &str,
        size_bytes: u64,
        pool: &str,
        labels: Vec<(String, String)>,
    ) -> Result<pb::Volume, NodeError> {
        let st = self.live()?;
        let slot = if pool.is_empty() {
            st.pools.first().ok_or_else(|| NodeError::NoSuchPool {
                name: "(any)".into(),
            })?
        } else {
            pool_slot(&st, pool)?
        };
        slot.pool
            .create_volume(&self.engine, name, size_bytes, labels)
            .map_err(pool_err(&slot.name))?;
        let pool = slot.name.clone();
        self.view(&st, name, &pool)
    }

    /// Deletes a volume or snapshot; one hosted as a replica is released first, unless a
    /// nexus or a replica connection still uses it.
    pub fn delete_volume(&self, name: &str, pool: &str) -> Result<(), NodeError> {
        let resolved = {
            let st = self.live()?;
            self.find_object(&st, name, pool)?.0.name.clone()
        };
        self.release_replica(name, &resolved)?;
        let st = self.live()?;
        let (slot, _) = self.find_object(&st, name, pool)?;
        if let Some(export) = export_of(&st, &slot.name, name) {
            return Err(NodeError::Exported {
                name: name.into(),
                export,
            });
        }
        slot.pool
            .delete(&self.engine, name)
            .map_err(pool_err(&slot.name))
    }

    /// Grows a volume, online if exported (new NBD connections see the new size).
    pub fn grow_volume(
        &self,
        name: &str,
        size_bytes: u64,
        pool: &str,
    ) -> Result<pb::Volume, NodeError> {
        let st = self.live()?;
        let (slot, _) = self.find_object(&st, name, pool)?;
        slot.pool
            .grow(&self.engine, name, size_bytes)
            .map_err(pool_err(&slot.name))?;
        let pool = slot.name.clone();
        self.view(&st, name, &pool)
    }

    pub fn create_snapshot(
        &self,
        volume: &str,
        name: &str,
        pool: &str,
    ) -> Result<pb::Volume, NodeError> {
        let st = self.live()?;
        let (slot, _) = self.find_object(&st, volume, pool)?;
        slot.pool
            .snapshot(&self.engine, volume, name)
            .map_err(pool_err(&slot.name))?;
        let pool = slot.name.clone();
        self.view(&st, name, &pool)
    }

    pub fn create_clone(
        &self,
        snapshot: &str,
        name: &str,
        pool: &str,
    ) -> Result<pb::Volume, NodeError> {
        let st = self.live()?;
        let (slot, _) = self.find_object(&st, snapshot, pool)?;
        slot.pool
            .clone_snapshot(&self.engine, snapshot, name)
            .map_err(pool_err(&slot.name))?;
        let pool = slot.name.clone();
        self.view(&st, name, &pool)
    }

    /// Exports a volume, snapshot (always read-only), malloc bdev or (with `nexus`) the
    /// nexus named `name` as `export_name` (default: `name`). Pool objects are looked up
    /// first, then malloc bdevs. With `key`, the export is encrypted (`encrypt`).
    pub fn export(
        &self,
        name: &str,
        pool: &str,
        export_name: &str,
        read_only: bool,
        nexus: bool,
        key: Option<CryptKey>,
    ) -> Result<pb::ExportInfo, NodeError> {
        let mut st = self.live()?;
        let nbd = self.nbd.read();
        let nbd = nbd.as_ref().ok_or(NodeError::NbdDisabled)?;
        let export_name = if export_name.is_empty() {
            name
        } else {
            export_name
        };
        if st.exports.contains_key(export_name) {
            return Err(NodeError::ExportExists {
                name: export_name.into(),
            });
        }
        let slot = if nexus {
            self.nexus_source(name, read_only)?
        } else {
            self.open_source(&st, name, pool, read_only)?
        };
        if let Some(export) = st
            .exports
            .iter()
            .find(|(_, e)| e.source == slot.source)
            .map(|(n, _)| n.clone())
        {
            self.release(&st, &slot);
            return Err(NodeError::Exported {
                name: name.into(),
                export,
            });
        }
        let slot = match key {
            Some(key) => self.encrypt(&st, slot, &key, export_name)?,
            None => self.refuse_encrypted(&st, slot)?,
        };
        let options = ExportOptions {
            read_only: slot.read_only,
            description: describe(&slot.source),
        };
        let served = slot.crypt.as_ref().unwrap_or(&slot.handle);
        if let Err(e) = nbd.add_export(export_name, served, options) {
            self.release(&st, &slot);
            return Err(e.into());
        }
        st.exports.insert(export_name.to_string(), slot);
        let status = nbd.exports().into_iter().find(|s| s.name == export_name);
        Ok(export_view(export_name, &st.exports[export_name], status))
    }

    /// Stacks the crypt bdev on an export's source (docs/encryption.md): above the nexus for
    /// a nexus, so replicas and replica links see only ciphertext. A blank source gets its
    /// encryption header unless the export is read-only; a wrong key is refused naming it.
    fn encrypt(
        &self,
        st: &State,
        mut slot: ExportSlot,
        key: &CryptKey,
        export_name: &str,
    ) -> Result<ExportSlot, NodeError> {
        let volume = match &slot.source {
            Source::Object { name, .. } | Source::Malloc { name } | Source::Nexus { name } => {
                name.clone()
            }
        };
        let crypt_name = format!("{export_name}-crypt");
        let writable = !slot.read_only;
        match cairn_engine::bdev::crypt::attach(
            &self.engine,
            &slot.handle,
            &crypt_name,
            &volume,
            key,
            writable,
        ) {
            Ok(handle) => {
                slot.crypt = Some(handle);
                Ok(slot)
            }
            Err(e) => {
                self.release(st, &slot);
                Err(e.into())
            }
        }
    }

    /// Passes a plain export's source unless it is encrypted (then it needs its key).
    fn refuse_encrypted(&self, st: &State, slot: ExportSlot) -> Result<ExportSlot, NodeError> {
        let volume = match &slot.source {
            Source::Object { name, .. } | Source::Malloc { name } | Source::Nexus { name } => name,
        };
        match cairn_engine::bdev::crypt::refuse_plain(&self.engine, &slot.handle, volume) {
            Ok(()) => Ok(slot),
            Err(e) => {
                self.release(st, &slot);
                Err(e.into())
            }
        }
    }

    /// Resolves what `name` is and opens it (objects) or borrows its handle (mallocs).
    fn open_source(
        &self,
        st: &State,
        name: &str,
        pool: &str,
        read_only: bool,
    ) -> Result<ExportSlot, NodeError> {
        if st
            .replicas
            .iter()
            .any(|r| r.name == name && (pool.is_empty() || r.pool == pool))
        {
            return Err(NodeError::IsReplica { name: name.into() });
        }
        match self.find_object(st, name, pool) {
            Ok((slot, info)) => {
                let handle = slot
                    .pool
                    .open_volume(&self.engine, name)
                    .map_err(pool_err(&slot.name))?;
                Ok(ExportSlot {
                    read_only: read_only || info.kind == ObjectKind::Snapshot,
                    source: Source::Object {
                        pool: slot.name.clone(),
                        name: name.into(),
                        kind: info.kind,
                    },
                    handle,
                    crypt: None,
                })
            }
            Err(NodeError::NoSuchObject { .. }) if pool.is_empty() => {
                let m = st
                    .mallocs
                    .iter()
                    .find(|m| m.name == name)
                    .ok_or_else(|| NodeError::NoSuchObject { name: name.into() })?;
                Ok(ExportSlot {
                    source: Source::Malloc {
                        name: m.name.clone(),
                    },
                    handle: m.handle.clone(),
                    read_only,
                    crypt: None,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Undoes [`Node::open_source`]: flushes and closes a volume. The flush makes every
    /// write a client sent durable even if it never flushed itself (the volume store only
    /// promises durability after a FLUSH), so unexport and shutdown never lose data.
    fn release(&self, st: &State, slot: &ExportSlot) {
        if let Some(crypt) = &slot.crypt {
            if let Err(e) = self.engine.remove_bdev(crypt) {
                tracing::error!(bdev = %crypt.info().name, error = %e, "removing crypt bdev failed");
            }
        }
        if let Source::Object { pool, name, .. } = &slot.source {
            if let Err(e) = self.flush(&slot.handle) {
                tracing::error!(pool = %pool, volume = %name, error = %e, "flushing volume failed");
            }
            if let Ok(p) = pool_slot(st, pool) {
                if let Err(e) = p.pool.close_volume(&self.engine, &slot.handle) {
                    tracing::error!(pool = %pool, volume = %name, error = %e, "closing volume failed");
                }
            }
        }
    }

    fn flush(&self, handle: &BdevHandle) -> Result<(), String> {
        let core = self.engine.cores()[0];
        let mut q = self
            .engine
            .queue(handle, core, 1)
            .map_err(|e| e.to_string())?;
        q.flush().map_err(|e| e.to_string())
    }

    /// Stops serving `export_name` once its clients' in-flight requests are answered, then
    /// closes the volume behind it.
    pub fn unexport(&self, export_name: &str) -> Result<(), NodeError> {
        let mut st = self.live()?;
        let slot = st
            .exports
            .remove(export_name)
            .ok_or_else(|| NodeError::NoSuchExport {
                name: export_name.into(),
            })?;
        let removed = match self.nbd.read().as_ref() {
            Some(nbd) => nbd.remove_export(export_name),
            None => Ok(()),
        };
        if let Err(e) = removed {
            // Clients still hold it; keep the volume open and the export listed.
            st.exports.insert(export_name.to_string(), slot);
            return Err(e.into());
        }
        self.release(&st, &slot);
        Ok(())
    }

    pub fn list_exports(&self) -> Result<Vec<pb::ExportInfo>, NodeError> {
        let st = self.live()?;
        let mut statuses = self.export_statuses();
        Ok(st
            .exports
            .iter()
            .map(|(name, slot)| {
                let status = statuses
                    .iter()
                    .position(|s| s.name == *name)
                    .map(|i| statuses.swap_remove(i));
                export_view(name, slot, status)
            })
            .collect())
    }

    /// What the NBD server reports about its exports (empty with NBD off). Takes only the
    /// server's read lock, so metrics never wait behind a control operation.
    pub fn export_statuses(&self) -> Vec<ExportStatus> {
        self.nbd
            .read()
            .as_ref()
            .map(NbdServer::exports)
            .unwrap_or_default()
    }

    pub fn reactor_times(&self) -> Vec<ReactorTimes> {
        self.engine.reactor_times()
    }

    /// The names of the current exports, for the startup line.
    pub fn export_names(&self) -> Vec<String> {
        self.state.lock().exports.keys().cloned().collect()
    }

    /// Ordered shutdown: the NBD server drains and closes its connections; then exported
    /// volumes are closed, nexuses destroyed, the replica server stopped and hosted replicas
    /// flushed and closed, malloc bdevs removed, and pools closed (each durable when it
    /// returns). Later operations fail with [`NodeError::ShuttingDown`]. Errors are logged,
    /// and the walk goes on, so one bad pool does not keep the others open.
    pub fn shutdown(&self) -> bool {
        let mut st = self.state.lock();
        if st.shutting_down {
            return true;
        }
        st.shutting_down = true;
        if let Some(nbd) = self.nbd.write().take() {
            nbd.shutdown();
        }
        let mut clean = true;
        for (name, slot) in std::mem::take(&mut st.exports) {
            tracing::debug!(export = %name, "closing export");
            self.release(&st, &slot);
        }
        clean &= self.shutdown_replication(&mut st);
        for m in std::mem::take(&mut st.mallocs) {
            if let Err(e) = self.engine.remove_bdev(&m.handle) {
                tracing::error!(malloc = %m.name, error = %e, "removing malloc bdev failed");
                clean = false;
            }
        }
        for p in std::mem::take(&mut st.pools) {
            match p.pool.close(&self.engine) {
                Ok(()) => tracing::info!(pool = %p.name, "pool closed"),
                Err(e) => {
                    tracing::error!(pool = %p.name, error = %e, "closing pool failed");
                    clean = false;
                }
            }
        }
        clean
    }

    /// The engine, once the node is shut down and no longer shared.
    pub fn into_engine(self) -> Arc<Engine> {
        self.engine
    }

    /// Finds `name` in `pool`, or in the one pool holding it when `pool` is empty.
    fn find_object<'s>(
        &self,
        st: &'s State,
        name: &str,
        pool: &str,
    ) -> Result<(&'s PoolSlot, ObjectInfo), NodeError> {
        let mut found = Vec::new();
        for p in st
            .pools
            .iter()
            .filter(|p| pool.is_empty() || p.name == pool)
        {
            let info = p.pool.info(&self.engine).map_err(pool_err(&p.name))?;
            if let Some(o) = info.objects.into_iter().find(|o| o.name == name) {
                found.push((p, o));
            }
        }
        if !pool.is_empty() && !st.pools.iter().any(|p| p.name == pool) {
            return Err(NodeError::NoSuchPool { name: pool.into() });
        }
        match found.len() {
            0 => Err(NodeError::NoSuchObject { name: name.into() }),
            1 => Ok(found.pop().expect("one")),
            _ => Err(NodeError::Ambiguous {
                name: name.into(),
                pools: found
                    .iter()
                    .map(|(p, _)| p.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    fn view(&self, st: &State, name: &str, pool: &str) -> Result<pb::Volume, NodeError> {
        let (slot, o) = self.find_object(st, name, pool)?;
        let cluster = slot.pool.info(&self.engine).map_err(pool_err(&slot.name))?;
        Ok(volume_view(st, &slot.name, cluster.cluster_size_bytes, &o))
    }
}

fn pool_slot<'s>(st: &'s State, name: &str) -> Result<&'s PoolSlot, NodeError> {
    st.pools
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| NodeError::NoSuchPool { name: name.into() })
}

fn export_of(st: &State, pool: &str, name: &str) -> Option<String> {
    st.exports
        .iter()
        .find(|(_, e)| {
            matches!(&e.source, Source::Object { pool: p, name: n, .. } if p == pool && n == name)
        })
        .map(|(n, _)| n.clone())
}

fn describe(source: &Source) -> String {
    match source {
        Source::Object { pool, name, kind } => format!("cairn {kind} '{name}' in pool '{pool}'"),
        Source::Malloc { name } => format!("cairn malloc bdev '{name}'"),
        Source::Nexus { name } => format!("cairn replicated volume (nexus) '{name}'"),
    }
}

pub fn kind_to_pb(kind: ObjectKind) -> pb::ObjectKind {
    match kind {
        ObjectKind::Volume => pb::ObjectKind::Volume,
        ObjectKind::Snapshot => pb::ObjectKind::Snapshot,
    }
}

fn volume_view(st: &State, pool: &str, cluster_size_bytes: u32, o: &ObjectInfo) -> pb::Volume {
    pb::Volume {
        name: o.name.clone(),
        pool: pool.into(),
        uuid: o.uuid.clone(),
        kind: kind_to_pb(o.kind).into(),
        size_bytes: o.size_bytes,
        allocated_bytes: o.allocated_clusters * u64::from(cluster_size_bytes),
        origin: o.origin.clone().unwrap_or_default(),
        export_name: export_of(st, pool, &o.name).unwrap_or_default(),
        labels: o
            .labels
            .iter()
            .map(|(key, value)| pb::Label {
                key: key.clone(),
                value: value.clone(),
            })
            .collect(),
    }
}

fn export_view(name: &str, slot: &ExportSlot, status: Option<ExportStatus>) -> pb::ExportInfo {
    let (kind, source, pool) = match &slot.source {
        Source::Object { pool, name, kind } => (kind.to_string(), name.clone(), pool.clone()),
        Source::Malloc { name } => ("malloc".to_string(), name.clone(), String::new()),
        Source::Nexus { name } => ("nexus".to_string(), name.clone(), String::new()),
    };
    let served = slot.crypt.as_ref().unwrap_or(&slot.handle);
    let size_bytes = status
        .as_ref()
        .map_or(served.info().size_bytes, |s| s.size_bytes);
    pb::ExportInfo {
        name: name.into(),
        kind,
        source,
        pool,
        size_bytes,
        read_only: slot.read_only,
        connections: status.as_ref().map_or(0, |s| s.connections),
        stats: Some(stats_view(status.map(|s| s.stats).unwrap_or_default())),
        encrypted: slot.crypt.is_some(),
    }
}

pub fn stats_view(s: cairn_engine::frontend::nbd::ExportStats) -> pb::ExportStats {
    pb::ExportStats {
        reads: s.reads,
        writes: s.writes,
        flushes: s.flushes,
        trims: s.trims,
        write_zeroes: s.write_zeroes,
        block_status: s.block_status,
        bytes_read: s.bytes_read,
        bytes_written: s.bytes_written,
        errors: s.errors,
        latency_bucket_bounds_us: cairn_engine::frontend::nbd::LATENCY_BUCKETS_US.to_vec(),
        latency_buckets: s.latency_buckets.to_vec(),
        latency_sum_us: s.latency_sum_us,
    }
}
