//! The node's replication side: the replica server (this node's volumes as replicas of
//! nexuses elsewhere, with their durable epoch fences under `<data-dir>/epochs`), the nexus
//! manager (replicated volumes attached here), and fault injection for tests.
//!
//! A replica is found by the wire id of its name ([`volume_id_for`]): a volume of any pool,
//! or a malloc bdev, that is not exported. It is opened once and stays open until shutdown,
//! when it is flushed and closed after the replica server has stopped.
//!
//! Lock order: the replica set's lock, then the node's state lock (the resolver runs under
//! the former and takes the latter); node code never calls into the replica set while
//! holding the state lock.

use super::{pool_err, Node, NodeError, ReplicaSlot, Source, State};
use crate::proto as pb;
use cairn_engine::volume::format::ObjectKind;
use cairn_engine::BdevHandle;
use cairn_replication::epoch::EpochStore;
use cairn_replication::nexus::insync::{InSyncOptions, InSyncRecorder};
use cairn_replication::nexus::manager::{
    CreateRequest, NexusManager, NexusView, ResyncView, VerifyReport,
};
use cairn_replication::nexus::{ChildSpec, NexusOptions, COPY_HOLD_MAX, REGION_BYTES_DEFAULT};
use cairn_replication::proto::VolumeId;
use cairn_replication::replica::{volume_id_for, ReplicaSet};
use cairn_replication::server::ReplicaServer;
use cairn_replication::transport::tcp::TcpTransport;
use cairn_replication::transport::TlsTransport;
use cairn_replication::transport::Transport;
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Sub-directory of the data dir holding the epoch files.
pub const EPOCHS_DIR: &str = "epochs";

pub(super) struct Replication {
    nexus: Arc<NexusManager>,
    server: Mutex<Option<ReplicaServer>>,
    /// The replicas this node hosts (shared with the server and the nexus manager), so a
    /// volume being deleted can stop being one.
    replicas: Arc<ReplicaSet>,
}

fn parse_spec(s: &str) -> Result<ChildSpec, NodeError> {
    ChildSpec::parse(s).map_err(NodeError::Replication)
}

impl Node {
    /// Starts the replica server (unless `listen` is `None`) and the nexus manager, both over
    /// mutual TLS when the node has a TLS configuration ([`Node::set_tls`], before this).
    /// Returns the replica server's bound address.
    pub fn start_replication(
        self: &Arc<Self>,
        data_dir: &Path,
        listen: Option<SocketAddr>,
    ) -> Result<Option<String>, NodeError> {
        let epochs = EpochStore::open(&data_dir.join(EPOCHS_DIR))
            .map_err(|e| NodeError::Replication(e.to_string()))?;
        let weak: Weak<Node> = Arc::downgrade(self);
        let replicas = Arc::new(ReplicaSet::new(
            epochs,
            Box::new(move |id| weak.upgrade()?.resolve_replica(id)),
        ));
        let transport: Arc<dyn Transport> = match self.tls() {
            Some(tls) => Arc::new(TlsTransport::new(tls.clone())),
            None => Arc::new(TcpTransport),
        };
        let server = match listen {
            None => None,
            Some(addr) => Some(
                ReplicaServer::start(
                    self.engine.clone(),
                    transport.clone(),
                    &addr.to_string(),
                    replicas.clone(),
                )
                .map_err(|e| NodeError::Replication(e.to_string()))?,
            ),
        };
        let endpoint = server.as_ref().map(|s| s.endpoint().to_string());
        let nexus = NexusManager::start(self.engine.clone(), transport, replicas.clone());
        let r = Replication {
            nexus,
            server: Mutex::new(server),
            replicas,
        };
        if self.replication.set(r).is_err() {
            return Err(NodeError::Replication("already started".into()));
        }
        Ok(endpoint)
    }

    fn repl(&self) -> Result<&Replication, NodeError> {
        self.replication
            .get()
            .ok_or_else(|| NodeError::Replication("replication is not started".into()))
    }

    /// Finds the volume or malloc bdev behind a replica id and opens it for hosting.
    fn resolve_replica(&self, id: &VolumeId) -> Option<(String, BdevHandle)> {
        let mut st = self.state.lock();
        if st.shutting_down {
            return None;
        }
        if let Some(r) = st.replicas.iter().find(|r| volume_id_for(&r.name) == *id) {
            return Some((r.name.clone(), r.handle.clone()));
        }
        let found = st.pools.iter().find_map(|p| {
            let info = p.pool.info(&self.engine).ok()?;
            info.objects
                .into_iter()
                .find(|o| o.kind == ObjectKind::Volume && volume_id_for(&o.name) == *id)
                .map(|o| (p.name.clone(), o.name))
        });
        let (pool, name, handle) = match found {
            Some((pool, name)) => {
                if super::export_of(&st, &pool, &name).is_some() {
                    tracing::warn!(volume = %name, "refusing to host an exported volume as a replica");
                    return None;
                }
                let slot = super::pool_slot(&st, &pool).ok()?;
                match slot.pool.open_volume(&self.engine, &name) {
                    Ok(h) => (pool, name, h),
                    Err(e) => {
                        tracing::warn!(volume = %name, error = %e, "opening a replica volume failed");
                        return None;
                    }
                }
            }
            None => {
                let m = st.mallocs.iter().find(|m| volume_id_for(&m.name) == *id)?;
                let exported = st
                    .exports
                    .values()
                    .any(|e| matches!(&e.source, Source::Malloc { name } if *name == m.name));
                if exported {
                    tracing::warn!(malloc = %m.name, "refusing to host an exported malloc bdev as a replica");
                    return None;
                }
                (String::new(), m.name.clone(), m.handle.clone())
            }
        };
        tracing::info!(replica = %name, pool = %pool, "hosting replica");
        st.replicas.push(ReplicaSlot {
            pool,
            name: name.clone(),
            handle: handle.clone(),
        });
        Some((name, handle))
    }

    /// The names this node can host as replicas: its pools' volumes (not snapshots) and its
    /// malloc bdevs, sorted.
    fn replica_names(&self) -> Result<Vec<String>, NodeError> {
        let st = self.live()?;
        let mut names: Vec<String> = st.mallocs.iter().map(|m| m.name.clone()).collect();
        for p in &st.pools {
            let info = p.pool.info(&self.engine).map_err(pool_err(&p.name))?;
            names.extend(
                info.objects
                    .into_iter()
                    .filter(|o| o.kind == ObjectKind::Volume)
                    .map(|o| o.name),
            );
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// `name` when this node can host it as a replica, else NOT_FOUND naming it.
    fn replica_name(&self, name: &str) -> Result<(), NodeError> {
        if self.replica_names()?.iter().any(|n| n == name) {
            return Ok(());
        }
        Err(NodeError::NoSuchObject { name: name.into() })
    }

    fn replica_info(&self, name: &str) -> Result<pb::ReplicaInfo, NodeError> {
        let id = volume_id_for(name);
        let s = self.repl()?.replicas.status(&id, name)?;
        Ok(pb::ReplicaInfo {
            name: name.into(),
            volume_id: id.to_string(),
            epoch: s.fence.map_or(0, |e| e.get()),
            generation: s.record.generation,
            clean: s.record.clean,
            opener: s.opener.unwrap_or_default(),
            hosted: s.hosted,
        })
    }

    /// Every volume and malloc bdev of this node as a replica: fence, generation, opener.
    pub fn list_replicas(&self) -> Result<Vec<pb::ReplicaInfo>, NodeError> {
        self.replica_names()?
            .iter()
            .map(|n| self.replica_info(n))
            .collect()
    }

    pub fn show_replica(&self, name: &str) -> Result<pb::ReplicaInfo, NodeError> {
        self.replica_name(name)?;
        self.replica_info(name)
    }

    /// Assigns the replica `name` to the node `opener` (empty: any node), durably.
    pub fn assign_replica(&self, name: &str, opener: &str) -> Result<pb::ReplicaInfo, NodeError> {
        self.replica_name(name)?;
        let opener = (!opener.is_empty()).then_some(opener);
        self.repl()?
            .replicas
            .assign(&volume_id_for(name), name, opener)?;
        self.replica_info(name)
    }

    /// The export slot of a nexus.
    pub(super) fn nexus_source(
        &self,
        name: &str,
        read_only: bool,
    ) -> Result<super::ExportSlot, NodeError> {
        let handle = self.repl()?.nexus.handle(name).ok_or_else(|| {
            NodeError::Nexus(cairn_replication::nexus::manager::NexusError::NotFound {
                name: name.into(),
            })
        })?;
        Ok(super::ExportSlot {
            source: Source::Nexus { name: name.into() },
            handle,
            read_only,
            crypt: None,
        })
    }

    fn nexus_export(&self, name: &str) -> String {
        let st = self.state.lock();
        st.exports
            .iter()
            .find(|(_, e)| matches!(&e.source, Source::Nexus { name: n } if n == name))
            .map(|(n, _)| n.clone())
            .unwrap_or_default()
    }

    fn nexus_pb(&self, v: NexusView) -> pb::Nexus {
        let export_name = self.nexus_export(&v.name);
        nexus_view(v, export_name)
    }

    pub fn create_nexus(&self, r: pb::CreateNexusRequest) -> Result<pb::Nexus, NodeError> {
        drop(self.live()?);
        let replicas = r
            .replicas
            .iter()
            .map(|s| parse_spec(s))
            .collect::<Result<Vec<_>, _>>()?;
        let defaults = NexusOptions::default();
        let options = NexusOptions {
            min_in_sync: if r.min_in_sync == 0 { 1 } else { r.min_in_sync },
            region_bytes: if r.region_bytes == 0 {
                REGION_BYTES_DEFAULT
            } else {
                r.region_bytes
            },
            io_timeout: if r.io_timeout_ms == 0 {
                defaults.io_timeout
            } else {
                Duration::from_millis(r.io_timeout_ms)
            },
            rebuild_bytes_per_s: (r.rebuild_bytes_per_s != 0).then_some(r.rebuild_bytes_per_s),
            copy_hold_max: COPY_HOLD_MAX,
        };
        let insync = InSyncOptions {
            trusted: r
                .trusted
                .iter()
                .map(|s| parse_spec(s))
                .collect::<Result<Vec<_>, _>>()?,
            min_generation: r.min_generation,
            recorder: self.recorder(&r.name, &r.control_volume)?,
        };
        let v = self.repl()?.nexus.create(CreateRequest {
            name: r.name,
            replicas,
            options,
            epoch: (r.epoch != 0).then_some(r.epoch),
            takeover: r.takeover,
            insync,
        })?;
        Ok(self.nexus_pb(v))
    }

    /// The recorder of a nexus that keeps `volume`'s in-sync record (none for an empty
    /// name): the node's control process, which it must have.
    fn recorder(
        &self,
        nexus: &str,
        volume: &str,
    ) -> Result<Option<Arc<dyn InSyncRecorder>>, NodeError> {
        if volume.is_empty() {
            return Ok(None);
        }
        cairn_control_api::check_name("control_volume", volume)
            .map_err(|e| NodeError::Replication(format!("nexus '{nexus}': {e}")))?;
        let membership = self.control.get().ok_or_else(|| NodeError::NoControl {
            nexus: nexus.into(),
            volume: volume.into(),
        })?;
        Ok(Some(Arc::new(crate::membership::InSyncReporter::new(
            membership.clone(),
            volume,
        ))))
    }

    pub fn destroy_nexus(&self, name: &str) -> Result<(), NodeError> {
        let export = self.nexus_export(name);
        if !export.is_empty() {
            return Err(NodeError::NexusExported {
                name: name.into(),
                export,
            });
        }
        Ok(self.repl()?.nexus.destroy(name)?)
    }

    /// Every nexus's view, for metrics; takes no node lock.
    pub fn nexus_views(&self) -> Vec<NexusView> {
        self.replication
            .get()
            .map(|r| r.nexus.list())
            .unwrap_or_default()
    }

    pub fn list_nexuses(&self) -> Result<Vec<pb::Nexus>, NodeError> {
        let views = self.repl()?.nexus.list();
        Ok(views.into_iter().map(|v| self.nexus_pb(v)).collect())
    }

    pub fn show_nexus(&self, name: &str) -> Result<pb::Nexus, NodeError> {
        let v = self.repl()?.nexus.show(name)?;
        Ok(self.nexus_pb(v))
    }

    pub fn add_replica(&self, nexus: &str, replica: &str) -> Result<pb::Nexus, NodeError> {
        let v = self.repl()?.nexus.add_child(nexus, parse_spec(replica)?)?;
        Ok(self.nexus_pb(v))
    }

    pub fn remove_replica(&self, nexus: &str, replica: &str) -> Result<pb::Nexus, NodeError> {
        let v = self
            .repl()?
            .nexus
            .remove_child(nexus, &parse_spec(replica)?)?;
        Ok(self.nexus_pb(v))
    }

    pub fn promote_nexus(&self, name: &str) -> Result<pb::Nexus, NodeError> {
        let v = self.repl()?.nexus.promote(name)?;
        Ok(self.nexus_pb(v))
    }

    pub fn verify_nexus(
        &self,
        name: &str,
        repair: bool,
    ) -> Result<pb::VerifyNexusResponse, NodeError> {
        let VerifyReport {
            children,
            regions,
            region_bytes,
            mismatched,
            source,
            details,
            repairing,
        } = self.repl()?.nexus.verify(name, repair)?;
        Ok(pb::VerifyNexusResponse {
            replicas: children,
            regions,
            region_bytes,
            mismatched_regions: mismatched,
            source,
            details: details
                .into_iter()
                .map(|d| pb::RegionMismatch {
                    region: d.region,
                    agree: d.agree,
                    differ: d.differ,
                })
                .collect(),
            repairing,
        })
    }

    pub fn set_fault(&self, r: pb::SetFaultRequest) -> Result<(), NodeError> {
        if !self.fault_injection {
            return Err(NodeError::FaultInjectionOff);
        }
        let st = self.live()?;
        let f = st
            .faults
            .get(&r.name)
            .ok_or_else(|| NodeError::NoSuchFault {
                name: r.name.clone(),
            })?;
        if r.heal {
            f.heal();
        }
        if r.latency_us > 0 {
            f.set_latency(Duration::from_micros(r.latency_us));
        }
        if r.fail_errno > 0 {
            f.fail_reads(r.fail_errno);
            f.fail_writes(r.fail_errno);
        }
        tracing::warn!(target_name = %r.name, latency_us = r.latency_us, fail_errno = r.fail_errno, heal = r.heal, "fault injection changed");
        Ok(())
    }

    /// Stops hosting the volume `name` of pool `pool` as a replica, so that it can be deleted
    /// (a hosted replica stays open after its last connection or local nexus goes away).
    /// Refused, as an open volume, while a nexus or a replica connection still holds it: the
    /// replica set's entry is then the only other reference. Takes the replica set's lock and
    /// releases it before the state lock (the lock order above).
    pub(super) fn release_replica(&self, name: &str, pool: &str) -> Result<(), NodeError> {
        let Some(r) = self.replication.get() else {
            return Ok(());
        };
        let id = volume_id_for(name);
        let Some(hosted) = r.replicas.hosted().into_iter().find(|h| h.volume_id == id) else {
            return Ok(());
        };
        // This clone and the set's own entry; any more is a connection or a nexus.
        if Arc::strong_count(&hosted) > 2 {
            return Err(pool_err(pool)(
                cairn_engine::volume::PoolError::VolumeOpen { name: name.into() },
            ));
        }
        r.replicas.forget(&id);
        drop(hosted);
        let mut st = self.live()?;
        let Some(i) = st
            .replicas
            .iter()
            .position(|s| s.name == name && s.pool == pool)
        else {
            return Ok(());
        };
        let slot = st.replicas.remove(i);
        if let Err(e) = self.flush(&slot.handle) {
            tracing::warn!(replica = %name, error = %e, "flushing a released replica failed");
        }
        let p = super::pool_slot(&st, pool)?;
        p.pool
            .close_volume(&self.engine, &slot.handle)
            .map_err(pool_err(pool))?;
        tracing::info!(replica = %name, pool = %pool, "replica released");
        Ok(())
    }

    /// Destroys the nexuses, stops the replica server, then flushes and closes hosted
    /// replicas. Called from [`Node::shutdown`] with the state lock held, so it never takes
    /// the replica set's lock (see the lock order above).
    pub(super) fn shutdown_replication(&self, st: &mut State) -> bool {
        let Some(r) = self.replication.get() else {
            return true;
        };
        let mut clean = true;
        r.nexus.shutdown();
        for v in r.nexus.list() {
            if let Err(e) = r.nexus.destroy(&v.name) {
                tracing::error!(nexus = %v.name, error = %e, "destroying nexus failed");
                clean = false;
            }
        }
        if let Some(server) = r.server.lock().take() {
            server.shutdown();
        }
        for slot in std::mem::take(&mut st.replicas) {
            if let Err(e) = self.flush(&slot.handle) {
                tracing::error!(replica = %slot.name, error = %e, "flushing replica failed");
                clean = false;
            }
            if slot.pool.is_empty() {
                continue;
            }
            if let Ok(p) = super::pool_slot(st, &slot.pool) {
                if let Err(e) = p.pool.close_volume(&self.engine, &slot.handle) {
                    tracing::error!(replica = %slot.name, error = %pool_err(&slot.pool)(e), "closing replica failed");
                    clean = false;
                }
            }
        }
        clean
    }
}

fn nexus_view(v: NexusView, export_name: String) -> pb::Nexus {
    pb::Nexus {
        name: v.name,
        volume_id: v.volume_id,
        epoch: v.epoch,
        size_bytes: v.size_bytes,
        block_size_bytes: v.block_size_bytes,
        state: v.state,
        min_in_sync: v.min_in_sync,
        region_bytes: v.region_bytes,
        io_timeout_ms: v.io_timeout_ms,
        replicas: v
            .children
            .into_iter()
            .map(|c| pb::Replica {
                address: c.spec,
                state: c.state.name().into(),
                reason: c.reason,
                dirty_bytes: c.dirty_bytes,
                copied_bytes: c.copied_bytes,
                generation: c.generation,
                write_wait_max_us: c.write_wait_max_us,
            })
            .collect(),
        resync: v.resync.map(
            |ResyncView {
                 child,
                 full,
                 done_bytes,
                 total_bytes,
                 progress,
                 bytes_per_s,
                 eta_s,
                 write_wait_max_us,
             }| pb::Resync {
                replica: child,
                full,
                done_bytes,
                total_bytes,
                bytes_per_s,
                progress,
                eta_s,
                write_wait_max_us,
            },
        ),
        export_name,
        generation: v.generation,
        rebuilt_bytes: v.rebuilt_bytes,
    }
}
