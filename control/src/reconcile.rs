//! The reconcile loop: brings the nodes to what the volume records say. Only the leader runs
//! it, every [`RECONCILE_INTERVAL`] and whenever a command wrote a record.
//!
//! Each pass lists what every `up` node has (volumes and snapshots, nexuses, exports) through
//! the node admin API, compares it with every volume record and makes the calls that close the
//! gap. Every call is idempotent by name (an object that already exists counts as made, one
//! already gone as removed), and a step's result is written back to the record (fenced by the
//! leader's term, checked on the record's revision) before a later step depends on it. So a
//! crash of the control process at any point leaves records that the next pass, in this
//! process after a restart or in the next leader, finishes exactly once: a replica recorded
//! `creating` whose volume the node already made is marked `created`, never made twice, and
//! no node is ever given a replica that is not in a record.
//!
//! Per volume, in order:
//! * re-replication (rereplicate.rs): a replica whose node is down past the grace is marked
//!   lost and a replacement placed, recorded alone before any node call; after the nexus
//!   step, the nexus is given the replacement and loses the lost one, and once the
//!   replacement is in sync the lost one becomes `deleting`; a `deleting` entry whose node is
//!   down past `--replica-forget` is dropped, and the orphan step deletes the volume's objects
//!   on any up node the record does not name (that copy, should its node come back);
//! * delete recorded: take the nexus down, delete the snapshots and the replica volumes on
//!   each node, drop each replica entry once its node confirms, then the record and its
//!   in-sync record;
//! * replicas: create each `creating` one (`CreateVolume`, or `CreateClone` for a clone),
//!   grow each smaller than the record, delete each `deleting` one;
//! * snapshots: take each recorded snapshot on each replica that lacks it; delete a snapshot
//!   whose deletion is recorded on each node that holds it, then drop its entry;
//! * failover: when the attach node's record is `down`, a new attach point is recorded on an
//!   `up` node the in-sync record names in sync (never any other), with a raised epoch, before
//!   any node is touched (docs/control.md, "Failover");
//! * nexus: destroy a nexus on any node but the attach node (detach, or a nexus of an older
//!   epoch), assign every created replica to the attach node (`AssignReplica`: only its nexus
//!   may open them from then on), then create the nexus on the attach node (the recorded
//!   epoch, `takeover`, "local" for its own replica and the other nodes' replica addresses),
//!   export it over NBD and record the NBD URI.
//!
//! A node that is down or unreachable is skipped; its part is finished when it is back.
//!
//! Before the volumes, a pass adds to the rebuild byte counter what each listed nexus's full
//! rebuilds copied since the last pass (`Counters::count_rebuilds`).

use crate::election::{stopped, Election, Leadership};
use crate::insync::{self, InSyncRecord};
use crate::membership::{node_records, NodeRecord};
use crate::proto::{self as pb, node_admin_client::NodeAdminClient};
use crate::rereplicate::{self, Counters};
use crate::store::{AnyStore, Store, Txn};
use crate::volume::{self, snapshot_object, volume_key, ReplicaState, VolumeError, VolumeRecord};
use cairn_control_api::{NodeState, RebuildView};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

/// How often the leader compares the nodes with the records when nothing wakes it sooner.
pub const RECONCILE_INTERVAL: Duration = Duration::from_millis(500);
/// How long connecting to a node's admin API may take; a node that does not answer in this
/// time is skipped for the pass.
pub const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long one node admin call may take (pool operations are durable when they return).
pub const NODE_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long listing what one node has (the start of every pass) may take in all; a node that
/// does not answer in this time (hung, or cut off with its connection still open) is skipped
/// for the pass. Far below [`NODE_CALL_TIMEOUT`]: every pass lists every up node before it
/// acts on any volume, so one hung node would otherwise hold up every volume's reconcile,
/// failovers included, for the whole call timeout.
pub const NODE_LIST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long inspect waits for the attach node's resync progress before showing none.
pub const SHOW_TIMEOUT: Duration = Duration::from_secs(1);

/// Admin API channels to the nodes, one per admin address, made on first use; over mutual
/// TLS when the control process has a certificate.
#[derive(Default)]
pub struct NodeClients {
    channels: Mutex<HashMap<String, Channel>>,
    tls: Option<tonic::transport::ClientTlsConfig>,
}

/// The admin client's TLS: the cluster CA to verify the node by, and this process's
/// certificate to present.
pub fn client_tls(tls: &cairn_tls::Tls) -> tonic::transport::ClientTlsConfig {
    let pem = tls.pem();
    tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&pem.ca))
        .identity(tonic::transport::Identity::from_pem(&pem.cert, &pem.key))
}

impl NodeClients {
    /// Clients that reach the nodes over `tls` when given, plain TCP otherwise.
    pub fn new(tls: Option<&cairn_tls::Tls>) -> NodeClients {
        NodeClients {
            channels: Mutex::default(),
            tls: tls.map(client_tls),
        }
    }

    /// A client of the node admin API at `admin` (`IP:PORT`, from the node's record).
    pub fn client(&self, admin: &str) -> Result<NodeAdminClient<Channel>, String> {
        let mut channels = self.channels.lock().expect("channels lock");
        if let Some(c) = channels.get(admin) {
            return Ok(NodeAdminClient::new(c.clone()));
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{admin}"))
            .map_err(|e| format!("admin address {admin}: {e}"))?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| format!("admin address {admin}: TLS: {e}"))?;
        }
        let channel = endpoint
            .connect_timeout(NODE_CONNECT_TIMEOUT)
            .timeout(NODE_CALL_TIMEOUT)
            .connect_lazy();
        channels.insert(admin.to_string(), channel.clone());
        Ok(NodeAdminClient::new(channel))
    }

    /// The resync in progress on volume `name`'s nexus at `node`, if the node answers.
    pub async fn rebuild(&self, node: &NodeRecord, name: &str) -> Option<RebuildView> {
        let mut c = self.client(&node.addresses.admin).ok()?;
        let show = c.show_nexus(pb::ShowNexusRequest { name: name.into() });
        let nexus = tokio::time::timeout(SHOW_TIMEOUT, show)
            .await
            .ok()?
            .ok()?
            .into_inner();
        let r = nexus.resync?;
        Some(RebuildView {
            replica: r.replica,
            done_bytes: r.done_bytes,
            total_bytes: r.total_bytes,
            bytes_per_s: r.bytes_per_s,
            eta_s: r.eta_s,
        })
    }
}

/// A node call that failed, naming the node, the call and the object.
#[derive(Debug, thiserror::Error)]
#[error("node '{node}': {call} '{object}': {status}")]
pub struct NodeCallError {
    node: String,
    call: &'static str,
    object: String,
    status: Box<tonic::Status>,
}

/// What one node has, as listed at the start of a pass.
#[derive(Default)]
struct Observed {
    /// Volumes and snapshots by name, with their size.
    objects: HashMap<String, u64>,
    /// Nexuses by name, with their epoch.
    nexuses: HashMap<String, u64>,
    /// Nexuses by name, with the bytes their full rebuilds have copied (a counter per nexus).
    rebuilt_bytes: HashMap<String, u64>,
    exports: HashSet<String>,
    /// Replicas by name, with the node each is assigned to ("" for any node); `None` from a
    /// node older than assignments.
    openers: Option<HashMap<String, String>>,
}

pub struct Reconciler {
    store: Arc<AnyStore>,
    election: Arc<Election>,
    clients: Arc<NodeClients>,
    kick: Arc<Notify>,
    /// `--replica-grace`, in milliseconds.
    grace_ms: u64,
    /// `--replica-forget`, in milliseconds.
    forget_ms: u64,
    counters: Arc<Counters>,
    /// Failovers this process recorded as leader, for /metrics.
    failovers: Arc<AtomicU64>,
}

/// One node's part of a pass: its record, its admin client and what it has.
pub(crate) struct NodeView<'a> {
    pub(crate) record: &'a NodeRecord,
    pub(crate) client: NodeAdminClient<Channel>,
    has: Observed,
}

impl NodeView<'_> {
    fn pool(&self) -> String {
        self.record
            .pools
            .first()
            .map(|p| p.name.clone())
            .unwrap_or_default()
    }

    pub(crate) fn err(
        &self,
        call: &'static str,
        object: &str,
        status: tonic::Status,
    ) -> NodeCallError {
        NodeCallError {
            node: self.record.id.clone(),
            call,
            object: object.to_string(),
            status: Box::new(status),
        }
    }

    /// `r` as success when the call made what exists already (`AlreadyExists`).
    pub(crate) fn made<T>(
        &self,
        call: &'static str,
        object: &str,
        r: Result<T, tonic::Status>,
    ) -> Result<(), NodeCallError> {
        match r {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::AlreadyExists => Ok(()),
            Err(s) => Err(self.err(call, object, s)),
        }
    }

    /// `r` as success when the call removed what is gone already (`NotFound`).
    pub(crate) fn gone<T>(
        &self,
        call: &'static str,
        object: &str,
        r: Result<T, tonic::Status>,
    ) -> Result<(), NodeCallError> {
        match r {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::NotFound => Ok(()),
            Err(s) => Err(self.err(call, object, s)),
        }
    }

    async fn delete_object(&mut self, name: &str) -> Result<(), NodeCallError> {
        if !self.has.objects.contains_key(name) {
            return Ok(());
        }
        let req = pb::DeleteVolumeRequest {
            name: name.into(),
            pool: self.pool(),
        };
        let r = self.client.delete_volume(req).await;
        self.gone("DeleteVolume", name, r)?;
        self.has.objects.remove(name);
        Ok(())
    }

    /// Assigns this node's replica of volume `name` to the node `opener`, so that only the
    /// nexus there may open it. A node without the call (older than assignments) cannot
    /// check one, and is left as it is.
    pub(crate) async fn assign_opener(
        &mut self,
        name: &str,
        opener: &str,
    ) -> Result<(), NodeCallError> {
        let req = pb::AssignReplicaRequest {
            name: name.into(),
            opener: opener.into(),
        };
        match self.client.assign_replica(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::Unimplemented => {
                tracing::warn!(volume = %name, node = %self.record.id, "the node cannot assign its replica an opener (no AssignReplica); any node may open it");
                Ok(())
            }
            Err(s) => Err(self.err("AssignReplica", name, s)),
        }
    }

    /// Unexports and destroys the nexus `name`, if this node has it.
    async fn take_down_nexus(&mut self, name: &str) -> Result<(), NodeCallError> {
        if self.has.exports.contains(name) {
            let r = self
                .client
                .unexport(pb::UnexportRequest {
                    export_name: name.into(),
                })
                .await;
            self.gone("Unexport", name, r)?;
            self.has.exports.remove(name);
        }
        if self.has.nexuses.contains_key(name) {
            let r = self
                .client
                .destroy_nexus(pb::DestroyNexusRequest { name: name.into() })
                .await;
            self.gone("DestroyNexus", name, r)?;
            self.has.nexuses.remove(name);
        }
        Ok(())
    }
}

impl Reconciler {
    pub fn new(
        store: Arc<AnyStore>,
        election: Arc<Election>,
        clients: Arc<NodeClients>,
        kick: Arc<Notify>,
        grace: Duration,
        forget: Duration,
        counters: Arc<Counters>,
    ) -> Reconciler {
        Reconciler {
            store,
            election,
            clients,
            kick,
            grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
            forget_ms: u64::try_from(forget.as_millis()).unwrap_or(u64::MAX),
            counters,
            failovers: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The count of failovers this process recorded (shared with /metrics).
    pub fn failovers(&self) -> Arc<AtomicU64> {
        self.failovers.clone()
    }

    /// Runs passes while this process leads, until `stop`.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(RECONCILE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.kick.notified() => {}
                () = stopped(&mut stop) => return,
            }
            let Some(term) = self.election.current() else {
                continue;
            };
            if let Err(e) = self.pass(term).await {
                tracing::warn!(error = %e, "reconcile pass");
            }
        }
    }

    /// One pass over every volume record.
    pub async fn pass(&self, term: Leadership) -> Result<(), VolumeError> {
        let volumes = volume::list(&self.store).await?;
        if volumes.is_empty() {
            return Ok(());
        }
        let nodes = node_records(&self.store).await?;
        let mut views = Vec::new();
        for n in nodes.iter().filter(|n| n.state == NodeState::Up) {
            match tokio::time::timeout(NODE_LIST_TIMEOUT, self.observe(n)).await {
                Ok(Ok(v)) => views.push(v),
                Ok(Err(e)) => tracing::debug!(error = %e, "node skipped this pass"),
                Err(_) => {
                    tracing::warn!(node = %n.id, timeout = ?NODE_LIST_TIMEOUT, "node did not list its objects in time; skipped this pass")
                }
            }
        }
        let epochs: HashMap<&str, u64> = volumes
            .iter()
            .map(|(r, _)| (r.name.as_str(), r.epoch))
            .collect();
        let seen = views.iter().flat_map(|v| {
            v.has
                .nexuses
                .iter()
                .map(move |(name, epoch)| rereplicate::NexusSeen {
                    volume: name,
                    node: &v.record.id,
                    epoch: *epoch,
                    rebuilt_bytes: v.has.rebuilt_bytes.get(name).copied().unwrap_or(0),
                })
        });
        self.counters.count_rebuilds(&epochs, seen);
        for (record, revision) in volumes {
            // A leader deposed during the pass stops at the next volume: its record writes
            // would fail on the fence, and its node calls would act on records read before
            // (docs/control.md, "A leader that stalls instead of dying").
            if self.election.current() != Some(term) {
                tracing::info!("no longer the leader; the pass stops");
                return Ok(());
            }
            if let Err(e) = self
                .volume(term, &nodes, &mut views, &record, revision)
                .await
            {
                tracing::warn!(volume = %record.name, error = %e, "reconciling");
            }
        }
        Ok(())
    }

    async fn observe<'a>(&self, n: &'a NodeRecord) -> Result<NodeView<'a>, NodeCallError> {
        let err = |call, status| NodeCallError {
            node: n.id.clone(),
            call,
            object: String::new(),
            status: Box::new(status),
        };
        let mut client = self
            .clients
            .client(&n.addresses.admin)
            .map_err(|s| err("connect", tonic::Status::invalid_argument(s)))?;
        let volumes = client
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .map_err(|s| err("ListVolumes", s))?
            .into_inner()
            .volumes;
        let nexuses = client
            .list_nexuses(pb::ListNexusesRequest {})
            .await
            .map_err(|s| err("ListNexuses", s))?
            .into_inner()
            .nexuses;
        let exports = client
            .list_exports(pb::ListExportsRequest {})
            .await
            .map_err(|s| err("ListExports", s))?
            .into_inner()
            .exports;
        let openers = match client.list_replicas(pb::ListReplicasRequest {}).await {
            Ok(r) => Some(
                r.into_inner()
                    .replicas
                    .into_iter()
                    .map(|r| (r.name, r.opener))
                    .collect(),
            ),
            Err(s) if s.code() == Code::Unimplemented => None,
            // One damaged replica file fails the whole list; the node's other objects are
            // still reconciled, and only the opener comparison waits for the list.
            Err(s) => {
                tracing::warn!(node = %n.id, error = %s.message(), "listing the node's replica openers failed; they are not compared this pass");
                None
            }
        };
        Ok(NodeView {
            record: n,
            client,
            has: Observed {
                objects: volumes
                    .into_iter()
                    .map(|v| (v.name, v.size_bytes))
                    .collect(),
                nexuses: nexuses.iter().map(|x| (x.name.clone(), x.epoch)).collect(),
                rebuilt_bytes: nexuses
                    .into_iter()
                    .map(|x| (x.name, x.rebuilt_bytes))
                    .collect(),
                exports: exports.into_iter().map(|e| e.name).collect(),
                openers,
            },
        })
    }

    /// Brings the nodes to one volume's record; writes back what it completed.
    async fn volume(
        &self,
        term: Leadership,
        nodes: &[NodeRecord],
        views: &mut [NodeView<'_>],
        record: &VolumeRecord,
        revision: u64,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if !record.deleting && self.replace_lost(term, nodes, record, revision).await? {
            return Ok(());
        }
        let mut next = record.clone();
        let outcome = if record.deleting {
            delete_step(&mut next, views).await
        } else {
            let insync = volume::read_insync(&self.store, &record.name).await?;
            let insync = insync.map(|(r, _)| r);
            live_steps(&mut next, insync.as_ref(), nodes, views, self.forget_ms).await
        };
        // What completed is recorded even when a later step failed.
        if next != *record && self.record(term, &next, revision, record.epoch).await? {
            let from = record.attached.as_ref().map(|a| a.node.as_str());
            let to = next.attached.as_ref().map(|a| a.node.as_str());
            if from.is_some() && to.is_some() && from != to {
                self.failovers.fetch_add(1, Ordering::Relaxed);
                tracing::info!(volume = %next.name, from = ?from, to = ?to, epoch = next.epoch, "failover recorded");
            }
        }
        outcome.map_err(Into::into)
    }

    /// Writes the progress `next`; a volume being deleted that has no replica left is
    /// removed, with its in-sync record. True when written.
    async fn record(
        &self,
        term: Leadership,
        next: &VolumeRecord,
        revision: u64,
        previous_epoch: u64,
    ) -> Result<bool, VolumeError> {
        let written = if next.epoch != previous_epoch {
            self.record_new_epoch(term, next, revision).await?
        } else if next.deleting && next.replicas.is_empty() {
            let key = volume_key(&next.name);
            let txn = term.fence(
                Txn::default()
                    .check(&key, revision)
                    .delete(&key)
                    .delete(insync::key(&next.name)),
            );
            let done = self.store.txn(txn).await?.is_some();
            if done {
                tracing::info!(volume = %next.name, "volume deleted");
            }
            done
        } else {
            volume::write(&self.store, term, next, revision)
                .await?
                .is_some()
        };
        if !written {
            // Someone changed the record since this pass read it; the next pass starts over
            // from the new record and the nodes' state, so nothing is lost.
            tracing::debug!(volume = %next.name, "record changed during the pass");
        }
        Ok(written)
    }
}

impl Reconciler {
    /// Records the replacement of each replica whose node has been down longer than the
    /// grace, before any node call for it. True when written: the next pass acts on it.
    async fn replace_lost(
        &self,
        term: Leadership,
        nodes: &[NodeRecord],
        record: &VolumeRecord,
        revision: u64,
    ) -> Result<bool, VolumeError> {
        let mut next = record.clone();
        match rereplicate::replace_lost(&mut next, nodes, self.grace_ms, volume::unix_ms()) {
            Ok(0) => Ok(false),
            Ok(n) => {
                let written = volume::write(&self.store, term, &next, revision)
                    .await?
                    .is_some();
                if written {
                    self.counters
                        .replaced
                        .fetch_add(n as u64, Ordering::Relaxed);
                    tracing::info!(volume = %next.name, replicas = ?next.replicas, "lost replica(s) replaced in the record");
                    self.kick.notify_one();
                }
                Ok(written)
            }
            Err(e) => {
                tracing::warn!(volume = %record.name, error = %e, "a replica's node is down past the grace, and no node can take its replacement");
                Ok(false)
            }
        }
    }

    /// Writes `next` with its raised epoch and, in the same transaction, the in-sync record at
    /// that epoch (its sets and generation unchanged): reports from the old nexus are then
    /// refused. True when written.
    async fn record_new_epoch(
        &self,
        term: Leadership,
        next: &VolumeRecord,
        revision: u64,
    ) -> Result<bool, VolumeError> {
        let key = volume_key(&next.name);
        let mut txn = term.fence(Txn::default().check(&key, revision).put(
            &key,
            volume::encode(next),
            None,
        ));
        if let Some((mut insync, insync_revision)) =
            volume::read_insync(&self.store, &next.name).await?
        {
            insync.epoch = next.epoch;
            insync.updated_unix_ms = volume::unix_ms();
            let ikey = insync::key(&next.name);
            txn = txn
                .check(&ikey, insync_revision)
                .put(&ikey, volume::encode(&insync), None);
        }
        Ok(self.store.txn(txn).await?.is_some())
    }
}

pub(crate) fn view_of<'v, 'a>(
    views: &'v mut [NodeView<'a>],
    node: &str,
) -> Option<&'v mut NodeView<'a>> {
    views.iter_mut().find(|v| v.record.id == node)
}

/// A live volume's steps, in order; each records its progress in `next` as it goes.
async fn live_steps(
    next: &mut VolumeRecord,
    insync: Option<&InSyncRecord>,
    nodes: &[NodeRecord],
    views: &mut [NodeView<'_>],
    forget_ms: u64,
) -> Result<(), NodeCallError> {
    replicas_step(next, views).await?;
    rereplicate::forget_unreachable(next, nodes, forget_ms, volume::unix_ms());
    snapshots_step(next, views).await?;
    if failover_step(next, insync, nodes) || rebuild_step(next, insync, nodes) {
        // The new attach point (or rebuild nexus) and epoch are recorded before any node is
        // touched; the next pass opens the nexus there.
        return Ok(());
    }
    nexus_step(next, insync, nodes, views).await?;
    // The running nexus is given a replica it does not have: a replacement (re-replication),
    // or a replica whose node was down when this nexus opened (a failover, a restart) and is
    // back; and loses a lost one. Neither set of the in-sync record names a replica the nexus
    // never had, since the nexus reports all of its children.
    let missing = |r: &crate::volume::ReplicaRecord| {
        r.state == ReplicaState::Created
            && nodes
                .iter()
                .any(|n| n.id == r.node && n.state == NodeState::Up)
            && insync
                .is_some_and(|i| !i.in_sync.contains(&r.node) && !i.out_of_sync.contains(&r.node))
    };
    let lost = next.replicas.iter().any(|r| r.state == ReplicaState::Lost);
    if lost || next.replicas.iter().any(missing) {
        if let Some(at) = next.nexus_node().map(str::to_string) {
            let current = view_of(views, &at)
                .is_some_and(|v| v.has.nexuses.get(&next.name) == Some(&next.epoch));
            if current {
                rereplicate::nexus_members(next, insync, nodes, views, &at).await?;
            }
        }
    }
    rereplicate::mark_filled(next, insync);
    if lost {
        rereplicate::retire_lost(next, insync);
    }
    orphans_step(next, views).await
}

/// Deletes the volume's objects (its volume, then its snapshots) on each up node that its
/// record does not name: the copy of a replaced replica whose entry was forgotten while its
/// node was down (`--replica-forget`). Nothing uses such a copy: a nexus is given only the
/// record's created replicas, and takes sources only among the in-sync record's.
async fn orphans_step(
    next: &VolumeRecord,
    views: &mut [NodeView<'_>],
) -> Result<(), NodeCallError> {
    let holders = next.replica_nodes();
    for v in views.iter_mut() {
        if holders.contains(&v.record.id) || !v.has.objects.contains_key(&next.name) {
            continue;
        }
        tracing::info!(volume = %next.name, node = %v.record.id, "deleting an orphan copy the record does not name");
        v.delete_object(&next.name).await?;
        for s in &next.snapshots {
            v.delete_object(&snapshot_object(&next.name, &s.name))
                .await?;
        }
    }
    Ok(())
}

/// When the attach node's record is `down`: the new attach point, on an `up` node holding a
/// created replica that the in-sync record names in sync, with the epoch raised and no NBD
/// URI yet. True when `next` now records a failover. With no such node up the volume stays
/// where it is (and inspect shows it unavailable) until one is.
fn failover_step(
    next: &mut VolumeRecord,
    insync: Option<&InSyncRecord>,
    nodes: &[NodeRecord],
) -> bool {
    let Some(at) = next.attached.as_ref().map(|a| a.node.clone()) else {
        return false;
    };
    let down = nodes
        .iter()
        .any(|n| n.id == at && n.state == NodeState::Down);
    if !down {
        return false;
    }
    let Some(insync) = insync else {
        // Attach writes the in-sync record with the attach point, so an attached volume
        // without one is a record this version did not write: nothing is trusted.
        tracing::warn!(volume = %next.name, node = %at, "attach node down and no in-sync record; no failover");
        return false;
    };
    let Some(to) = failover_target(next, insync, nodes) else {
        tracing::warn!(volume = %next.name, node = %at, in_sync = ?insync.in_sync, "attach node down and no replica the record names in sync is up; the volume waits for one");
        return false;
    };
    let epoch = match next.raise_epoch() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(volume = %next.name, node = %at, error = %e, "attach node down; no failover");
            return false;
        }
    };
    tracing::info!(volume = %next.name, from = %at, to = %to, epoch, "attach node down; failing over");
    next.attached = Some(volume::Attachment {
        node: to,
        nbd_uri: None,
        failover_to: None,
    });
    true
}

/// Re-replication of a detached volume (docs/control.md, "Re-replication"): while a
/// replacement is to be rebuilt ([`VolumeRecord::rebuilding`]: a lost replica's, or a
/// clone's) and the volume has an in-sync record (it holds data), a rebuild nexus is kept on
/// the node failover would pick, at a raised epoch recorded before it opens; one whose node
/// is down moves the same way. It goes (the nexus step takes it down) once every replacement
/// is named in sync or an attach replaces it. True when a new epoch was set: the caller records it first.
fn rebuild_step(
    next: &mut VolumeRecord,
    insync: Option<&InSyncRecord>,
    nodes: &[NodeRecord],
) -> bool {
    let needed = next.attached.is_none() && next.all_created() && next.rebuilding();
    let Some(insync) = insync.filter(|_| needed) else {
        if let Some(r) = next.rebuild.take() {
            tracing::info!(volume = %next.name, node = %r.node, "the rebuild nexus is no longer needed");
        }
        return false;
    };
    let up = |node: &str| {
        nodes
            .iter()
            .any(|n| n.id == node && n.state == NodeState::Up)
    };
    if next.rebuild.as_ref().is_some_and(|r| up(&r.node)) {
        return false;
    }
    let Some(to) = failover_target(next, insync, nodes) else {
        tracing::warn!(volume = %next.name, in_sync = ?insync.in_sync, "a replacement needs a rebuild and no replica the record names in sync is up; it waits for one");
        return false;
    };
    let epoch = match next.raise_epoch() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(volume = %next.name, error = %e, "a replacement needs a rebuild; no rebuild nexus");
            return false;
        }
    };
    tracing::info!(volume = %next.name, node = %to, epoch, "detached volume with a replacement to rebuild; a rebuild nexus is recorded");
    next.rebuild = Some(volume::RebuildNexus {
        node: to,
        opened: false,
    });
    true
}

/// The failover hint if it qualifies, else the first replica node in record order that does:
/// `up`, holding a created replica, and named in sync by `insync` (only such a copy has every
/// acknowledged write, so a hint never overrides that rule).
fn failover_target(
    record: &VolumeRecord,
    insync: &InSyncRecord,
    nodes: &[NodeRecord],
) -> Option<String> {
    let qualifies = |node: &str| {
        record
            .replicas
            .iter()
            .any(|r| r.node == node && r.state == ReplicaState::Created)
            && insync.in_sync.iter().any(|n| n == node)
            && nodes
                .iter()
                .any(|n| n.id == node && n.state == NodeState::Up)
    };
    let hint = record
        .attached
        .as_ref()
        .and_then(|a| a.failover_to.as_deref());
    hint.filter(|h| qualifies(h))
        .or_else(|| {
            record
                .replicas
                .iter()
                .map(|r| r.node.as_str())
                .find(|n| qualifies(n))
        })
        .map(str::to_string)
}

/// Delete: nexus down everywhere, then each replica's snapshots and volume.
async fn delete_step(
    next: &mut VolumeRecord,
    views: &mut [NodeView<'_>],
) -> Result<(), NodeCallError> {
    for v in views.iter_mut() {
        v.take_down_nexus(&next.name).await?;
    }
    let snapshots: Vec<String> = next
        .snapshots
        .iter()
        .map(|s| snapshot_object(&next.name, &s.name))
        .collect();
    let mut removed = Vec::new();
    for r in &next.replicas {
        let Some(v) = view_of(views, &r.node) else {
            continue;
        };
        // A clone's volume depends on the snapshot, so the volume goes first.
        v.delete_object(&next.name).await?;
        for s in &snapshots {
            v.delete_object(s).await?;
        }
        removed.push(r.node.clone());
    }
    next.replicas.retain(|r| !removed.contains(&r.node));
    Ok(())
}

/// Creates, grows and deletes replicas as recorded.
async fn replicas_step(
    next: &mut VolumeRecord,
    views: &mut [NodeView<'_>],
) -> Result<(), NodeCallError> {
    let name = next.name.clone();
    let mut dropped = Vec::new();
    for r in &mut next.replicas {
        let Some(v) = view_of(views, &r.node) else {
            continue;
        };
        match r.state {
            ReplicaState::Creating => {
                if !v.has.objects.contains_key(&name) {
                    // A replacement is made empty and rebuilt: its node lacks the snapshot.
                    let origin = next.origin.as_ref().filter(|_| !r.replacement);
                    create_replica(v, &name, next.size_bytes, origin).await?;
                }
                r.state = ReplicaState::Created;
                tracing::info!(volume = %name, node = %r.node, "replica created");
            }
            ReplicaState::Created => {
                if v.has
                    .objects
                    .get(&name)
                    .is_some_and(|s| *s < next.size_bytes)
                {
                    let req = pb::GrowVolumeRequest {
                        name: name.clone(),
                        size_bytes: next.size_bytes,
                        pool: v.pool(),
                    };
                    let res = v.client.grow_volume(req).await;
                    v.made("GrowVolume", &name, res)?;
                }
            }
            // Kept, untouched, until its replacement is in sync (rereplicate.rs).
            ReplicaState::Lost => {}
            ReplicaState::Deleting => {
                v.take_down_nexus(&name).await?;
                v.delete_object(&name).await?;
                dropped.push(r.node.clone());
            }
        }
    }
    next.replicas.retain(|r| !dropped.contains(&r.node));
    Ok(())
}

async fn create_replica(
    v: &mut NodeView<'_>,
    name: &str,
    size_bytes: u64,
    origin: Option<&volume::Origin>,
) -> Result<(), NodeCallError> {
    let pool = v.pool();
    let res = match origin {
        Some(o) => v
            .client
            .create_clone(pb::CreateCloneRequest {
                snapshot: snapshot_object(&o.volume, &o.snapshot),
                name: name.into(),
                pool,
            })
            .await
            .map(drop),
        None => v
            .client
            .create_volume(pb::CreateVolumeRequest {
                name: name.into(),
                size_bytes,
                pool,
                labels: Vec::new(),
            })
            .await
            .map(drop),
    };
    v.made(
        if origin.is_some() {
            "CreateClone"
        } else {
            "CreateVolume"
        },
        name,
        res,
    )?;
    v.has.objects.insert(name.to_string(), size_bytes);
    Ok(())
}

/// Takes each recorded snapshot on each created replica that lacks it, never on a
/// replacement still being filled (its copy is not the snapshot's point in time).
async fn snapshots_step(
    next: &mut VolumeRecord,
    views: &mut [NodeView<'_>],
) -> Result<(), NodeCallError> {
    let name = next.name.clone();
    let created: Vec<String> = next
        .replicas
        .iter()
        .filter(|r| r.state == ReplicaState::Created && !r.replacement)
        .map(|r| r.node.clone())
        .collect();
    for s in &mut next.snapshots {
        let object = snapshot_object(&name, &s.name);
        if s.deleting {
            delete_snapshot(&object, s, views).await?;
            continue;
        }
        let missing: Vec<&String> = created
            .iter()
            .filter(|n| s.belongs_on(n) && !s.nodes.contains(n))
            .collect();
        for node in missing {
            let Some(v) = view_of(views, node) else {
                continue;
            };
            if !v.has.objects.contains_key(&object) {
                let req = pb::CreateSnapshotRequest {
                    volume: name.clone(),
                    name: object.clone(),
                    pool: v.pool(),
                };
                let res = v.client.create_snapshot(req).await;
                v.made("CreateSnapshot", &object, res)?;
            }
            s.nodes.push(node.clone());
        }
    }
    // A deleted snapshot's entry goes once no node holds it any more.
    next.snapshots
        .retain(|s| !(s.deleting && s.nodes.is_empty()));
    Ok(())
}

/// A snapshot whose deletion is recorded: deleted on each up node that holds it, and each
/// node dropped from the entry as it confirms (a down node keeps its place until it is back).
async fn delete_snapshot(
    object: &str,
    s: &mut volume::SnapshotRecord,
    views: &mut [NodeView<'_>],
) -> Result<(), NodeCallError> {
    let mut removed = Vec::new();
    for node in &s.nodes {
        let Some(v) = view_of(views, node) else {
            continue;
        };
        v.delete_object(object).await?;
        removed.push(node.clone());
    }
    s.nodes.retain(|n| !removed.contains(n));
    Ok(())
}

/// Nexus down wherever it should not be; up, exported and recorded where it should.
async fn nexus_step(
    next: &mut VolumeRecord,
    insync: Option<&InSyncRecord>,
    nodes: &[NodeRecord],
    views: &mut [NodeView<'_>],
) -> Result<(), NodeCallError> {
    let name = next.name.clone();
    let at = next.nexus_node().map(str::to_string);
    for v in views.iter_mut() {
        let stale = match v.has.nexuses.get(&name) {
            None => false,
            Some(epoch) => at.as_deref() != Some(v.record.id.as_str()) || *epoch < next.epoch,
        };
        if stale {
            v.take_down_nexus(&name).await?;
            tracing::info!(volume = %name, node = %v.record.id, "nexus taken down");
        }
    }
    let Some(at) = at else {
        return Ok(());
    };
    if !next.all_created() {
        return Ok(());
    }
    let replicas = nexus_replicas(next, nodes, &at);
    let Some(missing) = view_of(views, &at).map(|v| !v.has.nexuses.contains_key(&name)) else {
        return Ok(());
    };
    let was_open = match (&next.attached, &next.rebuild) {
        (Some(a), _) => a.nbd_uri.is_some(),
        (None, Some(r)) => r.opened,
        (None, None) => false,
    };
    if missing && was_open {
        // The nexus was up and is gone (its node restarted): opening it again is a new term
        // over the same replicas, so the raised epoch is recorded first, and the nexus is
        // created at it by the next pass.
        if let Err(e) = next.raise_epoch() {
            tracing::error!(volume = %name, node = %at, error = %e, "nexus gone; not opened again");
            return Ok(());
        }
        if let Some(a) = next.attached.as_mut() {
            a.nbd_uri = None;
        }
        if let Some(r) = next.rebuild.as_mut() {
            r.opened = false;
        }
        tracing::info!(volume = %name, node = %at, epoch = next.epoch, "nexus gone; a new epoch is recorded before it is opened again");
        return Ok(());
    }
    if missing && !replicas.is_empty() {
        // The nexus takes its sources only among the replicas the record names in sync, at
        // the record's generation or above, and records its own changes there: a copy that
        // missed an acknowledged write is never read (docs/control.md, "The durable in-sync
        // set"). With no record yet (a volume never attached), every replica is new and equal.
        // Every replica it is given is assigned to it first, so that its Opens pass the
        // replicas' opener checks and an older attach node's (a nexus created again there,
        // after a failover) are refused (docs/control.md, "Failover"). A replica whose
        // assignment failed (its volume missing, its disk full) is left out of this nexus
        // rather than holding the whole volume down; it is faulted as if absent.
        let unassigned = assign_openers(next, &at, views, Assign::All).await;
        let usable = |node: &str| node == at || !unassigned.iter().any(|u| u == node);
        let replicas = nexus_replicas_of(next, nodes, &at, usable);
        let trusted = insync.map_or_else(Vec::new, |i| {
            nexus_replicas_of(next, nodes, &at, |node| {
                usable(node) && i.in_sync.iter().any(|n| n == node)
            })
        });
        if insync.is_some() && trusted.is_empty() {
            // An empty list would let the node trust the highest generation it is given:
            // exactly the stale copy the record is there to refuse. Wait for an in-sync one.
            tracing::warn!(volume = %name, node = %at, in_sync = ?insync.map(|i| &i.in_sync), "no replica the record names in sync is up; the nexus waits for one");
            return Ok(());
        }
        let v = view_of(views, &at).expect("listed above");
        let req = pb::CreateNexusRequest {
            name: name.clone(),
            replicas,
            epoch: next.epoch,
            takeover: true,
            control_volume: name.clone(),
            trusted,
            min_generation: insync.map_or(0, |i| i.generation),
            ..Default::default()
        };
        let res = v.client.create_nexus(req).await;
        v.made("CreateNexus", &name, res)?;
        v.has.nexuses.insert(name.clone(), next.epoch);
        tracing::info!(volume = %name, node = %at, epoch = next.epoch, "nexus created");
    }
    if !missing {
        // A replica whose node was away when this nexus was created (or whose assignment
        // failed then) may still name an older attach node, which could then open it while
        // this nexus could not: every pass assigns such a replica to the attach node, and
        // the nexus reconnects to it.
        assign_openers(next, &at, views, Assign::Stale).await;
    }
    let v = view_of(views, &at).expect("listed above");
    if next.attached.is_none() {
        // A rebuild nexus is not exported: it only copies to the replacement.
        if let Some(r) = next.rebuild.as_mut() {
            r.opened |= v.has.nexuses.contains_key(&name);
        }
        return Ok(());
    }
    if !v.has.exports.contains(&name) {
        let req = pb::ExportRequest {
            name: name.clone(),
            nexus: true,
            ..Default::default()
        };
        let res = v.client.export(req).await;
        v.made("Export", &name, res)?;
        v.has.exports.insert(name.clone());
    }
    // Recorded when first exported, and again if the node came back at another address.
    if let (Some(a), Some(nbd)) = (next.attached.as_mut(), v.record.addresses.nbd.as_ref()) {
        let uri = format!("nbd://{nbd}/{name}");
        if a.nbd_uri.as_deref() != Some(uri.as_str()) {
            a.nbd_uri = Some(uri);
        }
    }
    Ok(())
}

/// Which replicas [`assign_openers`] assigns.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Assign {
    /// Every one (before a nexus is created).
    All,
    /// Those listed this pass with another opener than the attach node.
    Stale,
}

/// Assigns created replicas of `record` on nodes listed this pass to the attach node `at`
/// (its own replica included, so no other node may open that one remotely either); returns
/// the nodes where that failed.
async fn assign_openers(
    record: &VolumeRecord,
    at: &str,
    views: &mut [NodeView<'_>],
    which: Assign,
) -> Vec<String> {
    let mut failed = Vec::new();
    for r in record
        .replicas
        .iter()
        .filter(|r| r.state == ReplicaState::Created)
    {
        if let Some(v) = view_of(views, &r.node) {
            let listed = v
                .has
                .openers
                .as_ref()
                .and_then(|o| o.get(&record.name))
                .cloned();
            if which == Assign::Stale && listed.as_deref().is_none_or(|o| o == at) {
                continue;
            }
            match v.assign_opener(&record.name, at).await {
                Ok(()) if which == Assign::Stale => {
                    let from = listed.filter(|o| !o.is_empty());
                    tracing::info!(volume = %record.name, node = %r.node, from = from.as_deref().unwrap_or("any node"), to = at, "replica assigned to the attach node");
                }
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(volume = %record.name, node = %r.node, attach = at, error = %e, "assigning the replica to the attach node failed");
                    failed.push(r.node.clone());
                }
            }
        }
    }
    failed
}

/// The nexus's replica list on node `at`: "local" for its own replica, the replica address of
/// every other up node holding a created replica.
fn nexus_replicas(record: &VolumeRecord, nodes: &[NodeRecord], at: &str) -> Vec<String> {
    nexus_replicas_of(record, nodes, at, |_| true)
}

/// [`nexus_replicas`] of the replica nodes `keep` accepts.
fn nexus_replicas_of(
    record: &VolumeRecord,
    nodes: &[NodeRecord],
    at: &str,
    keep: impl Fn(&str) -> bool,
) -> Vec<String> {
    record
        .replicas
        .iter()
        .filter(|r| r.state == ReplicaState::Created && keep(&r.node))
        .filter_map(|r| {
            if r.node == at {
                return Some("local".to_string());
            }
            nodes
                .iter()
                .find(|n| n.id == r.node && n.state == NodeState::Up)
                .and_then(|n| n.addresses.replica.clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::insync::INSYNC_RECORD_FORMAT;
    use crate::membership::testing;
    use crate::volume::{Attachment, ReplicaRecord};

    const MIB: u64 = 1 << 20;

    fn record(replicas: &[&str], at: &str, hint: Option<&str>) -> VolumeRecord {
        VolumeRecord {
            format: 1,
            name: "pg".into(),
            size_bytes: 16 * MIB,
            replicas_wanted: replicas.len() as u32,
            zone: None,
            replicas: replicas
                .iter()
                .map(|n| ReplicaRecord {
                    state: ReplicaState::Created,
                    ..ReplicaRecord::creating(*n)
                })
                .collect(),
            attached: Some(Attachment {
                node: at.into(),
                nbd_uri: Some("nbd://127.0.0.1:2/pg".into()),
                failover_to: hint.map(str::to_string),
            }),
            rebuild: None,
            epoch: 3,
            created_unix_ms: 0,
            snapshots: Vec::new(),
            origin: None,
            deleting: false,
            published: None,
            fs_type: None,
        }
    }

    fn insync(in_sync: &[&str], out_of_sync: &[&str]) -> InSyncRecord {
        InSyncRecord {
            format: INSYNC_RECORD_FORMAT,
            volume: "pg".into(),
            epoch: 3,
            generation: 7,
            in_sync: in_sync.iter().map(|n| (*n).into()).collect(),
            out_of_sync: out_of_sync.iter().map(|n| (*n).into()).collect(),
            updated_unix_ms: 0,
        }
    }

    fn nodes(down: &[&str]) -> Vec<NodeRecord> {
        ["a", "b", "c"]
            .into_iter()
            .map(|id| {
                let n = testing::node(id, id, id, 128 * MIB, 100 * MIB);
                if down.contains(&id) {
                    testing::down(n, 0)
                } else {
                    n
                }
            })
            .collect()
    }

    #[test]
    fn failover_takes_the_hint_only_when_it_is_in_sync_and_up() {
        let all = insync(&["a", "b", "c"], &[]);
        let cases = [
            // No hint: the first qualifying replica in record order.
            (None, &all, &["a"][..], Some("b")),
            // A qualifying hint wins over record order.
            (Some("c"), &all, &["a"], Some("c")),
            // A hint that is down, or out of sync, yields to record order: never a stale copy.
            (Some("c"), &all, &["a", "c"], Some("b")),
            (Some("c"), &insync(&["a", "b"], &["c"]), &["a"], Some("b")),
            // Nothing qualifies: the volume waits.
            (Some("c"), &insync(&["a"], &["b", "c"]), &["a"], None),
        ];
        for (hint, insync, down, want) in cases {
            let r = record(&["a", "b", "c"], "a", hint);
            assert_eq!(
                failover_target(&r, insync, &nodes(down)).as_deref(),
                want,
                "hint {hint:?}, down {down:?}, in sync {:?}",
                insync.in_sync
            );
        }
    }

    #[test]
    fn failover_records_a_new_epoch_and_drops_the_used_hint() {
        let mut r = record(&["a", "b", "c"], "a", Some("c"));
        assert!(!failover_step(
            &mut r,
            Some(&insync(&["a", "b", "c"], &[])),
            &nodes(&[])
        ));
        assert!(failover_step(
            &mut r,
            Some(&insync(&["a", "b", "c"], &[])),
            &nodes(&["a"])
        ));
        assert_eq!(r.epoch, 4);
        let at = r.attached.unwrap();
        assert_eq!(
            (at.node.as_str(), at.nbd_uri, at.failover_to),
            ("c", None, None)
        );
    }
}
