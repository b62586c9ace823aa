//! Volumes: the durable record of each replicated volume ([`VolumeRecord`] under
//! `/cairn/v1/volumes/{name}`), the commands that change it (create, attach, detach, snapshot,
//! clone, grow, delete) and what inspect shows.
//!
//! A command only ever writes the record: one transaction fenced by the leader's term and
//! checked on the record's revision (so two racing commands, or a deposed leader, cannot both
//! win). Nothing here calls a node. The reconcile loop ([`crate::reconcile`]) reads the
//! records and brings the nodes to them, so a crash of the control process between the write
//! and the node calls is finished by whichever process leads next, exactly once: every node
//! call it makes is idempotent by name, and every step it completes is written back to the
//! record before the next one depends on it.
//!
//! The in-sync record (`/cairn/v1/insync/{name}`) belongs to the in-sync module; attach
//! writes its initial value in the same transaction as the attach point, and inspect derives
//! each replica's health from it. Its type here mirrors the shared contract field for field.

use crate::election::Leadership;
use crate::insync::{self, InSyncError, InSyncRecord};
use crate::membership::{NodeRecord, CAS_ATTEMPTS_MAX};
use crate::placement::{self, PlacementError};
use crate::store::{AnyStore, Store, StoreError, Txn, KEY_ROOT};
use crate::units::human_size;
use cairn_control_api::{
    AttachView, CreateVolumeRequest, LeaderInfo, NodeState, ReplicaHealth, ReplicaView,
    SnapshotView, VolumeView, EPOCH_MAX,
};
use serde::{Deserialize, Serialize};
use std::time::SystemTime;

/// Volume records, one key per volume name.
pub const VOLUMES_PREFIX: &str = "/cairn/v1/volumes/";
/// The [`VolumeRecord`] format written; a record with a higher one is refused.
pub const VOLUME_RECORD_FORMAT: u32 = 1;

const _: () =
    assert!(VOLUMES_PREFIX.len() > KEY_ROOT.len() && insync::INSYNC_PREFIX.len() > KEY_ROOT.len());

/// Where a replica is in its life. A replica is `creating` from the moment placement records
/// it until its node has the volume; `deleting` from the moment its removal is recorded until
/// its node no longer has it (then the entry is dropped).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReplicaState {
    Creating,
    Created,
    /// Its node was down longer than the replica grace and a replacement is recorded: no
    /// longer part of the nexus, its data kept until the replacement is in sync.
    Lost,
    Deleting,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaState::Creating => "creating",
            ReplicaState::Created => "created",
            ReplicaState::Lost => "lost",
            ReplicaState::Deleting => "deleting",
        }
    }
}

/// One replica: the volume of the same name in the first pool of `node`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaRecord {
    pub node: String,
    pub state: ReplicaState,
    /// Placed to hold data that other replicas hold: a replacement for a lost replica, or a
    /// clone's replica on a node without the snapshot. It is created empty (never from a
    /// snapshot, which its node does not have) and rebuilt in full from the replicas the
    /// in-sync record names; the reconcile loop clears the flag once the record names it in
    /// sync. Until then the volume takes no snapshot and is not grown.
    #[serde(default)]
    pub replacement: bool,
}

impl ReplicaRecord {
    /// A replica to be created: from the volume's origin when it has one, else empty.
    pub fn creating(node: impl Into<String>) -> Self {
        ReplicaRecord {
            node: node.into(),
            state: ReplicaState::Creating,
            replacement: false,
        }
    }

    /// A replica to be created empty and rebuilt from the in-sync replicas.
    pub fn replacement(node: impl Into<String>) -> Self {
        ReplicaRecord {
            replacement: true,
            ..ReplicaRecord::creating(node)
        }
    }
}

/// Where the volume's nexus is (to be) open.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    pub node: String,
    /// Set by the reconcile loop once the nexus is exported; None until then.
    pub nbd_uri: Option<String>,
    /// The failover hint given at attach: the replica node failover tries first.
    #[serde(default)]
    pub failover_to: Option<String>,
}

/// The rebuild nexus of a detached volume: while a replacement replica is rebuilt and the
/// volume is not attached, the reconcile loop holds an unexported nexus on a node with an
/// in-sync replica (docs/control.md, "Re-replication"). An attach replaces it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RebuildNexus {
    pub node: String,
    /// Set once the nexus was seen open at the record's epoch: missing after that, it was lost
    /// with its node's restart and is opened again at a new epoch.
    pub opened: bool,
}

/// A snapshot of the volume: the object `{volume}@{name}` on each replica's node.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotRecord {
    pub name: String,
    /// The replica nodes that have it (the reconcile loop adds each as its node confirms).
    pub nodes: Vec<String>,
    pub created_unix_ms: u64,
    /// The replica nodes it is to be taken on: the created replicas when it was recorded. A
    /// replica placed later (a replacement) never gets it, since its copy of the volume is
    /// not the snapshot's point in time. None in records written before this field: every
    /// created replica.
    #[serde(default)]
    pub on: Option<Vec<String>>,
    /// Its deletion is recorded: the reconcile loop deletes it on each node in `nodes`, drops
    /// each node as it confirms, then the entry. It is no longer listed or cloned from.
    #[serde(default)]
    pub deleting: bool,
}

impl SnapshotRecord {
    /// Whether the snapshot is to be taken on (or is held by) `node`.
    pub fn belongs_on(&self, node: &str) -> bool {
        self.on
            .as_ref()
            .is_none_or(|on| on.iter().any(|n| n == node))
    }
}

/// What a clone was made from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Origin {
    pub volume: String,
    pub snapshot: String,
}

/// What the store holds about a volume, as JSON under `/cairn/v1/volumes/{name}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VolumeRecord {
    pub format: u32,
    pub name: String,
    pub size_bytes: u64,
    /// 1 to 3.
    pub replicas_wanted: u32,
    /// The zone constraint given at creation.
    pub zone: Option<String>,
    pub replicas: Vec<ReplicaRecord>,
    pub attached: Option<Attachment>,
    /// The rebuild nexus while the volume is detached and a replacement is rebuilt.
    #[serde(default)]
    pub rebuild: Option<RebuildNexus>,
    /// The epoch of the current or last nexus; raised by every attach and every failover.
    pub epoch: u64,
    pub created_unix_ms: u64,
    #[serde(default)]
    pub snapshots: Vec<SnapshotRecord>,
    #[serde(default)]
    pub origin: Option<Origin>,
    /// Delete is recorded: the reconcile loop removes the nexus, the snapshots and the
    /// replicas, then the record.
    #[serde(default)]
    pub deleting: bool,
    /// The node a CSI ControllerPublishVolume published it to: the node its consumer runs on,
    /// which stays the same when a failover moves the nexus elsewhere. Publishing to another
    /// node is refused while this node is up, and allowed once it is down (docs/csi.md,
    /// "Publish and fencing"). Detach and unpublish clear it.
    #[serde(default)]
    pub published: Option<String>,
    /// The filesystem a CSI CreateVolume asked for (`fsType`), kept so that every answer about
    /// the volume gives the same volume context.
    #[serde(default)]
    pub fs_type: Option<String>,
}

impl VolumeRecord {
    /// Raises the epoch for a new nexus (an attach, a failover, a rebuild nexus, a nexus
    /// opened again) and returns it; refused at [`EPOCH_MAX`], leaving the record as it was.
    pub fn raise_epoch(&mut self) -> Result<u64, VolumeError> {
        if self.epoch >= EPOCH_MAX {
            return Err(VolumeError::EpochExhausted {
                name: self.name.clone(),
                epoch: self.epoch,
            });
        }
        self.epoch += 1;
        Ok(self.epoch)
    }

    /// The nodes holding a replica, whatever its state.
    /// The node whose nexus serves the volume (its attach node) or rebuilds it (its rebuild
    /// nexus), if any.
    pub fn nexus_node(&self) -> Option<&str> {
        self.attached
            .as_ref()
            .map(|a| a.node.as_str())
            .or_else(|| self.rebuild.as_ref().map(|r| r.node.as_str()))
    }

    pub fn replica_nodes(&self) -> Vec<String> {
        self.replicas.iter().map(|r| r.node.clone()).collect()
    }

    /// True while a replacement is to be rebuilt: a lost replica waits for its replacement,
    /// or a replacement (of a lost replica, or a clone's) is not yet named in sync.
    pub fn rebuilding(&self) -> bool {
        self.replicas.iter().any(|r| {
            r.state == ReplicaState::Lost
                || (r.replacement
                    && matches!(r.state, ReplicaState::Creating | ReplicaState::Created))
        })
    }

    /// True when every replica that is to serve (neither lost nor being deleted) has its
    /// node's volume.
    pub fn all_created(&self) -> bool {
        self.replicas
            .iter()
            .all(|r| r.state != ReplicaState::Creating)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("volume '{0}' does not exist")]
    Unknown(String),
    #[error("volume '{name}' already exists with {existing}; this request asks for {requested}")]
    Conflict {
        name: String,
        existing: String,
        requested: String,
    },
    #[error("volume '{name}': {source}")]
    Placement {
        name: String,
        source: PlacementError,
    },
    #[error(
        "volume '{name}' of {} does not fit: {scope} holds {}",
        human_size(*size_bytes),
        human_size(*largest_bytes)
    )]
    TooLarge {
        name: String,
        size_bytes: u64,
        largest_bytes: u64,
        /// Which pools were measured: any node's (create) or its replica nodes' (grow).
        scope: &'static str,
    },
    #[error("node '{0}' is not registered")]
    UnknownNode(String),
    #[error("node '{node}' is down; attach volume '{name}' to an up node")]
    NodeDown { name: String, node: String },
    #[error("node '{node}' has no NBD listener to export volume '{name}' on")]
    NoNbd { name: String, node: String },
    #[error("volume '{name}' is attached to node '{node}'; {why}")]
    Attached {
        name: String,
        node: String,
        why: &'static str,
    },
    #[error("volume '{name}' is not ready: {why}")]
    NotReady { name: String, why: String },
    #[error("failover hint '{node}' for volume '{name}' {why}")]
    BadHint {
        name: String,
        node: String,
        why: &'static str,
    },
    #[error("volume '{0}' is being deleted")]
    Deleting(String),
    #[error(
        "volume '{name}' is {}; {} would shrink it (only growing is supported)",
        human_size(*size_bytes),
        human_size(*requested_bytes)
    )]
    Shrink {
        name: String,
        size_bytes: u64,
        requested_bytes: u64,
    },
    #[error("volume '{volume}' has no snapshot '{snapshot}'")]
    UnknownSnapshot { volume: String, snapshot: String },
    #[error("volume '{volume}' has clones of its snapshots ({}); delete them first", clones.join(", "))]
    HasClones { volume: String, clones: Vec<String> },
    #[error(
        "this control process ({this}) is not the leader; send the request to {}",
        leader.as_ref().map_or_else(|| "the leader (none is elected right now; retry)".to_string(), |l| format!("the leader {} at {}", l.id, l.listen))
    )]
    NotLeader {
        this: String,
        leader: Option<LeaderInfo>,
    },
    #[error("volume '{0}' record kept changing under {CAS_ATTEMPTS_MAX} attempts to update it")]
    Contended(String),
    #[error("stored record {key} is unreadable: {why}")]
    Corrupt { key: String, why: String },
    #[error(
        "volume '{name}' is at epoch {epoch}, the highest a replica accepts ({EPOCH_MAX}); no \
         nexus can be opened at a higher one, so its record needs repair"
    )]
    EpochExhausted { name: String, epoch: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Refuses a command that needs every replica to hold the data (snapshot, grow) while a
/// replacement (for a lost replica, or a clone's) is still being rebuilt.
fn rebuilt_first(name: &str, r: &VolumeRecord) -> Result<(), VolumeError> {
    if r.rebuilding() {
        return Err(VolumeError::NotReady {
            name: name.to_string(),
            why: "a replacement replica is being rebuilt; retry once inspect shows every replica in sync".into(),
        });
    }
    Ok(())
}

pub fn volume_key(name: &str) -> String {
    format!("{VOLUMES_PREFIX}{name}")
}

/// The node object name of snapshot `snapshot` of volume `volume` (`@` cannot occur in either
/// name, so no two snapshots and no volume share an object name).
pub fn snapshot_object(volume: &str, snapshot: &str) -> String {
    format!("{volume}@{snapshot}")
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

fn decode_checked<T: serde::de::DeserializeOwned>(
    key: &str,
    value: &[u8],
    format_of: impl Fn(&T) -> u32,
    newest: u32,
) -> Result<T, VolumeError> {
    let record: T = serde_json::from_slice(value).map_err(|e| VolumeError::Corrupt {
        key: key.to_string(),
        why: e.to_string(),
    })?;
    let format = format_of(&record);
    if format > newest {
        return Err(VolumeError::Corrupt {
            key: key.to_string(),
            why: format!("format {format} is newer than this build's {newest}"),
        });
    }
    Ok(record)
}

pub fn decode_volume(key: &str, value: &[u8]) -> Result<VolumeRecord, VolumeError> {
    decode_checked(
        key,
        value,
        |r: &VolumeRecord| r.format,
        VOLUME_RECORD_FORMAT,
    )
}

/// The volume record `name` and its revision, or None.
pub async fn read(
    store: &AnyStore,
    name: &str,
) -> Result<Option<(VolumeRecord, u64)>, VolumeError> {
    let key = volume_key(name);
    match store.get(&key).await? {
        Some(e) => Ok(Some((decode_volume(&key, &e.value)?, e.mod_revision))),
        None => Ok(None),
    }
}

/// Every volume record with its revision, in name order.
pub async fn list(store: &AnyStore) -> Result<Vec<(VolumeRecord, u64)>, VolumeError> {
    store
        .list(VOLUMES_PREFIX)
        .await?
        .iter()
        .map(|e| Ok((decode_volume(&e.key, &e.value)?, e.mod_revision)))
        .collect()
}

/// The in-sync record of volume `name` and its revision, or None before the first attach.
pub async fn read_insync(
    store: &AnyStore,
    name: &str,
) -> Result<Option<(InSyncRecord, u64)>, VolumeError> {
    insync::read(store, name).await.map_err(|e| match e {
        InSyncError::Store(e) => VolumeError::Store(e),
        e => VolumeError::Corrupt {
            key: insync::key(name),
            why: e.to_string(),
        },
    })
}

/// Writes `record` as leader `term` if the record still has revision `revision` (0: absent);
/// Some(new revision), or None when someone changed it in between.
pub async fn write(
    store: &AnyStore,
    term: Leadership,
    record: &VolumeRecord,
    revision: u64,
) -> Result<Option<u64>, VolumeError> {
    let key = volume_key(&record.name);
    let txn = term.fence(
        Txn::default()
            .check(&key, revision)
            .put(&key, encode(record), None),
    );
    Ok(store.txn(txn).await?)
}

/// The new record for a create request: its replicas placed on `nodes` (every record, in any
/// order), all `creating`. Refuses a size no pool can hold and a shortage of nodes.
pub fn new_record(
    req: &CreateVolumeRequest,
    nodes: &[NodeRecord],
) -> Result<VolumeRecord, VolumeError> {
    let largest_bytes = nodes
        .iter()
        .flat_map(|n| n.pools.first())
        .map(|p| p.size_bytes)
        .max()
        .unwrap_or(0);
    if req.size_bytes > largest_bytes {
        return Err(VolumeError::TooLarge {
            name: req.name.clone(),
            size_bytes: req.size_bytes,
            largest_bytes,
            scope: "the largest pool of any node",
        });
    }
    let placed = placement::place(
        nodes,
        &placement::Request {
            size_bytes: req.size_bytes,
            replicas: req.replicas as usize,
            zone: req.zone.as_deref(),
            holders: &[],
            seed: placement::seed_of(&req.name),
        },
    )
    .map_err(|source| VolumeError::Placement {
        name: req.name.clone(),
        source,
    })?;
    Ok(VolumeRecord {
        format: VOLUME_RECORD_FORMAT,
        name: req.name.clone(),
        size_bytes: req.size_bytes,
        replicas_wanted: req.replicas,
        zone: req.zone.clone(),
        replicas: placed.into_iter().map(ReplicaRecord::creating).collect(),
        attached: None,
        rebuild: None,
        epoch: 0,
        created_unix_ms: unix_ms(),
        snapshots: Vec::new(),
        origin: None,
        deleting: false,
        published: None,
        fs_type: None,
    })
}

/// Whether an existing record answers a create request (the same request again), or the
/// conflict naming both.
pub fn same_request(existing: &VolumeRecord, req: &CreateVolumeRequest) -> Result<(), VolumeError> {
    let describe = |size: u64, replicas: u32, zone: &Option<String>| {
        format!(
            "size {size} bytes ({}), {replicas} replica(s){}",
            human_size(size),
            zone.as_ref()
                .map(|z| format!(", zone {z}"))
                .unwrap_or_default()
        )
    };
    if existing.size_bytes == req.size_bytes
        && existing.replicas_wanted == req.replicas
        && existing.zone == req.zone
    {
        return Ok(());
    }
    Err(VolumeError::Conflict {
        name: req.name.clone(),
        existing: describe(
            existing.size_bytes,
            existing.replicas_wanted,
            &existing.zone,
        ),
        requested: describe(req.size_bytes, req.replicas, &req.zone),
    })
}

/// A replica's health: from the in-sync record when there is one (attach writes it), else
/// from the replica's placement state and its node's.
pub fn health(
    replica: &ReplicaRecord,
    node: Option<&NodeRecord>,
    insync: Option<&InSyncRecord>,
) -> ReplicaHealth {
    let up = node.is_some_and(|n| n.state == NodeState::Up);
    match replica.state {
        ReplicaState::Lost | ReplicaState::Deleting => return ReplicaHealth::Faulted,
        ReplicaState::Creating => return ReplicaHealth::Rebuilding,
        ReplicaState::Created => {}
    }
    match insync {
        None if up => ReplicaHealth::InSync,
        Some(s) if s.in_sync.contains(&replica.node) && up => ReplicaHealth::InSync,
        Some(s) if !s.in_sync.contains(&replica.node) && up => ReplicaHealth::Rebuilding,
        _ => ReplicaHealth::Faulted,
    }
}

/// The volume as the REST API shows it (without the live rebuild progress).
pub fn view(
    record: &VolumeRecord,
    nodes: &[NodeRecord],
    insync: Option<&InSyncRecord>,
) -> VolumeView {
    let node_of = |id: &str| nodes.iter().find(|n| n.id == id);
    VolumeView {
        name: record.name.clone(),
        size_bytes: record.size_bytes,
        replicas_wanted: record.replicas_wanted,
        zone: record.zone.clone(),
        epoch: record.epoch,
        replicas: record
            .replicas
            .iter()
            .map(|r| {
                let node = node_of(&r.node);
                ReplicaView {
                    node: r.node.clone(),
                    state: health(r, node, insync),
                    placement: r.state.as_str().to_string(),
                    zone: node.map(|n| n.zone.clone()),
                    rack: node.map(|n| n.rack.clone()),
                }
            })
            .collect(),
        attached: record.attached.as_ref().map(|a| AttachView {
            node: a.node.clone(),
            nbd_uri: a.nbd_uri.clone(),
            failover_to: a.failover_to.clone(),
        }),
        snapshots: record
            .snapshots
            .iter()
            .map(|s| SnapshotView {
                name: s.name.clone(),
                nodes: s.nodes.clone(),
            })
            .collect(),
        origin: record
            .origin
            .as_ref()
            .map(|o| (o.volume.clone(), o.snapshot.clone())),
        deleting: record.deleting,
        created_unix_ms: record.created_unix_ms,
        rebuild: None,
    }
}

impl From<crate::membership::MembershipError> for VolumeError {
    fn from(e: crate::membership::MembershipError) -> VolumeError {
        match e {
            crate::membership::MembershipError::Store(s) => VolumeError::Store(s),
            other => VolumeError::Corrupt {
                key: crate::membership::NODES_PREFIX.to_string(),
                why: other.to_string(),
            },
        }
    }
}

/// What a command did: whether it wrote a new record (201 on create) and the volume after it.
pub struct Outcome {
    pub changed: bool,
    pub view: VolumeView,
}

/// The volume commands. Each reads the records, decides, and writes its decision in one
/// transaction fenced by the leader's term and checked on every record it read; it retries a
/// lost race up to [`CAS_ATTEMPTS_MAX`] times. Node calls are the reconcile loop's, woken by
/// `kick` after every write.
pub struct Volumes {
    store: std::sync::Arc<AnyStore>,
    election: std::sync::Arc<crate::election::Election>,
    pub kick: std::sync::Arc<tokio::sync::Notify>,
}

/// What one decision writes: the volume record and, from attach, the in-sync record.
struct Decision {
    record: VolumeRecord,
    insync: Option<(InSyncRecord, u64)>,
}

impl Volumes {
    pub fn new(
        store: std::sync::Arc<AnyStore>,
        election: std::sync::Arc<crate::election::Election>,
    ) -> Volumes {
        Volumes {
            store,
            election,
            kick: std::sync::Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// This process's term, or the refusal naming the leader.
    async fn term(&self) -> Result<Leadership, VolumeError> {
        match self.election.current() {
            Some(t) => Ok(t),
            None => Err(VolumeError::NotLeader {
                this: self.election.me().id.clone(),
                leader: self.election.leader().await?,
            }),
        }
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>, VolumeError> {
        Ok(crate::membership::node_records(&self.store).await?)
    }

    /// The view of `record` with the current node records and in-sync record.
    pub async fn view_of(&self, record: &VolumeRecord) -> Result<VolumeView, VolumeError> {
        let nodes = self.nodes().await?;
        let insync = read_insync(&self.store, &record.name).await?;
        Ok(view(record, &nodes, insync.as_ref().map(|(r, _)| r)))
    }

    /// Every volume, in name order.
    pub async fn list(&self) -> Result<Vec<VolumeView>, VolumeError> {
        let nodes = self.nodes().await?;
        let mut out = Vec::new();
        for (record, _) in list(&self.store).await? {
            let insync = read_insync(&self.store, &record.name).await?;
            out.push(view(&record, &nodes, insync.as_ref().map(|(r, _)| r)));
        }
        Ok(out)
    }

    /// The record of volume `name`, or [`VolumeError::Unknown`].
    pub async fn get(&self, name: &str) -> Result<VolumeRecord, VolumeError> {
        read(&self.store, name)
            .await?
            .map(|(r, _)| r)
            .ok_or_else(|| VolumeError::Unknown(name.to_string()))
    }

    /// Runs `decide` on the record `name` (None when absent) and the node records until its
    /// decision is written unraced: Ok(None) from `decide` means nothing to write (the
    /// command was already done), and the current record is answered.
    async fn command(
        &self,
        name: &str,
        decide: impl Fn(
            Option<&VolumeRecord>,
            &[NodeRecord],
        ) -> Result<Option<VolumeRecord>, VolumeError>,
    ) -> Result<Outcome, VolumeError> {
        for _ in 0..CAS_ATTEMPTS_MAX {
            let term = self.term().await?;
            let current = read(&self.store, name).await?;
            let nodes = self.nodes().await?;
            let record = current.as_ref().map(|(r, _)| r);
            let Some(next) = decide(record, &nodes)? else {
                let record = record.ok_or_else(|| VolumeError::Unknown(name.to_string()))?;
                return Ok(Outcome {
                    changed: false,
                    view: self.view_of(record).await?,
                });
            };
            let revision = current.as_ref().map_or(0, |(_, rev)| *rev);
            let decision = self.with_insync(&next, record).await?;
            if self.apply(term, name, revision, &decision).await? {
                self.kick.notify_one();
                return Ok(Outcome {
                    changed: true,
                    view: self.view_of(&next).await?,
                });
            }
        }
        Err(VolumeError::Contended(name.to_string()))
    }

    /// The decision for `next`: an attach (a raised epoch with an attach point) also writes
    /// the volume's initial in-sync record (the shared contract: the new epoch, the previous
    /// generation, the previous in-sync set or every created replica for a new volume).
    async fn with_insync(
        &self,
        next: &VolumeRecord,
        previous: Option<&VolumeRecord>,
    ) -> Result<Decision, VolumeError> {
        let attaching = next.attached.is_some() && previous.is_some_and(|p| p.epoch < next.epoch);
        if !attaching {
            return Ok(Decision {
                record: next.clone(),
                insync: None,
            });
        }
        let old = read_insync(&self.store, &next.name).await?;
        let created: Vec<String> = next
            .replicas
            .iter()
            .filter(|r| r.state == ReplicaState::Created && !r.replacement)
            .map(|r| r.node.clone())
            .collect();
        let revision = old.as_ref().map_or(0, |(_, rev)| *rev);
        let record = InSyncRecord {
            format: insync::INSYNC_RECORD_FORMAT,
            volume: next.name.clone(),
            epoch: next.epoch,
            generation: old.as_ref().map_or(0, |(r, _)| r.generation),
            in_sync: old.as_ref().map_or(created, |(r, _)| r.in_sync.clone()),
            out_of_sync: old
                .as_ref()
                .map_or_else(Vec::new, |(r, _)| r.out_of_sync.clone()),
            updated_unix_ms: unix_ms(),
        };
        Ok(Decision {
            record: next.clone(),
            insync: Some((record, revision)),
        })
    }

    /// Writes `decision` in one fenced transaction checked on the revisions read; false when
    /// a check failed (nothing was written).
    async fn apply(
        &self,
        term: Leadership,
        name: &str,
        revision: u64,
        decision: &Decision,
    ) -> Result<bool, VolumeError> {
        let key = volume_key(name);
        let mut txn = term.fence(Txn::default().check(&key, revision).put(
            &key,
            encode(&decision.record),
            None,
        ));
        if let Some((insync, rev)) = &decision.insync {
            let ikey = insync::key(name);
            txn = txn.check(&ikey, *rev).put(&ikey, encode(insync), None);
        }
        Ok(self.store.txn(txn).await?.is_some())
    }

    /// Create (idempotent by name): the same request again answers the existing volume; a
    /// different size, replica count or zone for an existing name is a conflict naming both.
    pub async fn create(&self, req: &CreateVolumeRequest) -> Result<Outcome, VolumeError> {
        self.create_with(req, None).await
    }

    /// [`Volumes::create`], recording the filesystem a CSI CreateVolume asked for (the CSI
    /// service compares it itself on a repeated create).
    pub async fn create_with(
        &self,
        req: &CreateVolumeRequest,
        fs_type: Option<&str>,
    ) -> Result<Outcome, VolumeError> {
        self.command(&req.name, |current, nodes| match current {
            Some(r) if r.deleting => Err(VolumeError::Deleting(r.name.clone())),
            Some(r) => same_request(r, req).map(|()| None),
            None => new_record(req, nodes).map(|mut r| {
                r.fs_type = fs_type.map(str::to_string);
                Some(r)
            }),
        })
        .await
    }

    /// CSI ControllerPublishVolume: the volume attached to `node` and recorded as published
    /// there. Refused while it is published (or, without a CSI publish, attached) to another
    /// node that is up. Once that node is down (its lease expired and the monitor marked it),
    /// the attach moves to `node` at once with a raised epoch: the epoch fences the old
    /// nexus, wherever it is (the dead node's, or one a failover opened meanwhile), since every
    /// replica refuses a nexus of a lower epoch once the new one has opened it.
    pub async fn publish(&self, name: &str, node: &str) -> Result<Outcome, VolumeError> {
        self.command(name, |current, nodes| {
            let r = live(name, current)?;
            attachable(name, nodes, node)?;
            let at = r.attached.as_ref().map(|a| a.node.as_str());
            let holder = r.published.as_deref().or(at);
            if at == Some(node) {
                if r.published.as_deref() == Some(node) {
                    return Ok(None);
                }
                let mut next = r.clone();
                next.published = Some(node.to_string());
                return Ok(Some(next));
            }
            if let Some(h) = holder.filter(|h| *h != node) {
                let up = nodes.iter().any(|n| n.id == h && n.state == NodeState::Up);
                if up {
                    return Err(VolumeError::Attached {
                        name: name.to_string(),
                        node: h.to_string(),
                        why: "that node is up; unpublish it there first",
                    });
                }
            }
            let mut next = attached_at(name, r, node.to_string(), None)?;
            next.published = Some(node.to_string());
            Ok(Some(next))
        })
        .await
    }

    /// CSI ControllerUnpublishVolume: detached if it is published (or attached) to `node`, or
    /// to any node when `node` is None; a no-op when it is published elsewhere or not at all.
    pub async fn unpublish(&self, name: &str, node: Option<&str>) -> Result<Outcome, VolumeError> {
        self.command(name, |current, _| {
            let r = live(name, current)?;
            let at = r.attached.as_ref().map(|a| a.node.as_str());
            let Some(holder) = r.published.as_deref().or(at) else {
                return Ok(None);
            };
            if node.is_some_and(|n| n != holder) {
                return Ok(None);
            }
            let mut next = r.clone();
            next.attached = None;
            next.published = None;
            Ok(Some(next))
        })
        .await
    }

    /// Deletes snapshot `snapshot` of `name`: recorded as deleting, then removed from each
    /// node by the reconcile loop. Refused while a clone made from it exists (the clone shares
    /// its clusters). Idempotent: an unknown or already deleting snapshot is a no-op.
    pub async fn delete_snapshot(
        &self,
        name: &str,
        snapshot: &str,
    ) -> Result<Outcome, VolumeError> {
        for _ in 0..CAS_ATTEMPTS_MAX {
            let term = self.term().await?;
            let (r, revision) = read(&self.store, name)
                .await?
                .ok_or_else(|| VolumeError::Unknown(name.to_string()))?;
            let Some(i) = r
                .snapshots
                .iter()
                .position(|s| s.name == snapshot && !s.deleting)
            else {
                return Ok(Outcome {
                    changed: false,
                    view: self.view_of(&r).await?,
                });
            };
            let clones: Vec<String> = list(&self.store)
                .await?
                .into_iter()
                .filter(|(c, _)| {
                    c.origin
                        .as_ref()
                        .is_some_and(|o| o.volume == name && o.snapshot == snapshot)
                })
                .map(|(c, _)| c.name)
                .collect();
            if !clones.is_empty() {
                return Err(VolumeError::HasClones {
                    volume: format!("{name}@{snapshot}"),
                    clones,
                });
            }
            let mut next = r.clone();
            next.snapshots[i].deleting = true;
            if write(&self.store, term, &next, revision).await?.is_some() {
                self.kick.notify_one();
                return Ok(Outcome {
                    changed: true,
                    view: self.view_of(&next).await?,
                });
            }
        }
        Err(VolumeError::Contended(name.to_string()))
    }

    /// Attach to `node` (or the node placement prefers): a raised epoch and the attach point,
    /// with the initial in-sync record, and the failover hint `failover_to` (a replica node
    /// other than the attach node). Attaching again to the same node is a no-op, or only
    /// records a new hint.
    pub async fn attach(
        &self,
        name: &str,
        node: Option<&str>,
        failover_to: Option<&str>,
    ) -> Result<Outcome, VolumeError> {
        self.command(name, |current, nodes| {
            let r = live(name, current)?;
            let target = match node {
                Some(n) => n.to_string(),
                None => placement::attach_target(nodes, &r.replica_nodes()).map_err(|source| {
                    VolumeError::Placement {
                        name: name.to_string(),
                        source,
                    }
                })?,
            };
            attachable(name, nodes, &target)?;
            if let Some(hint) = failover_to {
                let why = if hint == target {
                    Some("is the attach node itself; name another replica node")
                } else if !r.replica_nodes().iter().any(|n| n == hint) {
                    Some("holds no replica of it; name one of its replica nodes")
                } else {
                    None
                };
                if let Some(why) = why {
                    return Err(VolumeError::BadHint {
                        name: name.to_string(),
                        node: hint.to_string(),
                        why,
                    });
                }
            }
            let failover_to = failover_to.map(str::to_string);
            match &r.attached {
                Some(a) if a.node == target && a.failover_to == failover_to => return Ok(None),
                Some(a) if a.node == target => {
                    let mut next = r.clone();
                    if let Some(at) = next.attached.as_mut() {
                        at.failover_to = failover_to;
                    }
                    return Ok(Some(next));
                }
                Some(a) => {
                    return Err(VolumeError::Attached {
                        name: name.to_string(),
                        node: a.node.clone(),
                        why: "detach it first",
                    })
                }
                None => {}
            }
            attached_at(name, r, target, failover_to).map(Some)
        })
        .await
    }

    /// Detach: no attach point; the reconcile loop takes the nexus down.
    pub async fn detach(&self, name: &str) -> Result<Outcome, VolumeError> {
        self.command(name, |current, _| {
            let r = live(name, current)?;
            if r.attached.is_none() && r.published.is_none() {
                return Ok(None);
            }
            let mut next = r.clone();
            next.attached = None;
            next.published = None;
            Ok(Some(next))
        })
        .await
    }

    /// Snapshot: recorded, then taken on each replica by the reconcile loop. Refused while
    /// attached: each replica is snapshotted on its own node, and only a detached volume's
    /// replicas are known to be identical.
    pub async fn snapshot(&self, name: &str, snapshot: &str) -> Result<Outcome, VolumeError> {
        self.command(name, |current, _| {
            let r = live(name, current)?;
            match r.snapshots.iter().find(|s| s.name == snapshot) {
                Some(s) if s.deleting => {
                    return Err(VolumeError::NotReady {
                        name: name.to_string(),
                        why: format!("snapshot '{snapshot}' is being deleted; retry once it is gone"),
                    })
                }
                Some(_) => return Ok(None),
                None => {}
            }
            if let Some(a) = &r.attached {
                return Err(VolumeError::Attached {
                    name: name.to_string(),
                    node: a.node.clone(),
                    why: "detach it first: each replica is snapshotted on its own node, and only a detached volume's replicas are identical",
                });
            }
            rebuilt_first(name, r)?;
            if !r.all_created() {
                return Err(VolumeError::NotReady {
                    name: name.to_string(),
                    why: format!("replicas still being created ({})", creating(r)),
                });
            }
            let mut next = r.clone();
            let on = r
                .replicas
                .iter()
                .filter(|x| x.state == ReplicaState::Created)
                .map(|x| x.node.clone())
                .collect();
            next.snapshots.push(SnapshotRecord {
                name: snapshot.to_string(),
                nodes: Vec::new(),
                created_unix_ms: unix_ms(),
                on: Some(on),
                deleting: false,
            });
            Ok(Some(next))
        })
        .await
    }

    /// Clone: a new volume from snapshot `snapshot` of `source`, with its replicas on the
    /// snapshot's nodes (a clone shares the snapshot's clusters). Idempotent by the new name.
    pub async fn clone_volume(
        &self,
        source: &str,
        snapshot: &str,
        name: &str,
    ) -> Result<Outcome, VolumeError> {
        self.clone_with(source, snapshot, name, None).await
    }

    /// [`Volumes::clone_volume`], recording the filesystem a CSI CreateVolume asked for.
    pub async fn clone_with(
        &self,
        source: &str,
        snapshot: &str,
        name: &str,
        fs_type: Option<&str>,
    ) -> Result<Outcome, VolumeError> {
        for _ in 0..CAS_ATTEMPTS_MAX {
            let term = self.term().await?;
            let (src, src_rev) = read(&self.store, source)
                .await?
                .ok_or_else(|| VolumeError::Unknown(source.to_string()))?;
            let current = read(&self.store, name).await?;
            let origin = Origin {
                volume: source.to_string(),
                snapshot: snapshot.to_string(),
            };
            if let Some((r, _)) = &current {
                if r.origin.as_ref() == Some(&origin) {
                    return Ok(Outcome {
                        changed: false,
                        view: self.view_of(r).await?,
                    });
                }
                return Err(VolumeError::Conflict {
                    name: name.to_string(),
                    existing: r.origin.as_ref().map_or_else(
                        || "no origin (it is not a clone)".to_string(),
                        |o| format!("origin {}@{}", o.volume, o.snapshot),
                    ),
                    requested: format!("a clone of {source}@{snapshot}"),
                });
            }
            let nodes = self.nodes().await?;
            let mut next = clone_record(&src, snapshot, name, &nodes)?;
            next.fs_type = fs_type.map(str::to_string);
            let key = volume_key(name);
            // The clone's data is the snapshot's on the replicas made from it: the in-sync
            // record says so from the start, so that a replica made empty (a replacement,
            // now or later) is rebuilt from them and never counted as holding the data.
            let ikey = insync::key(name);
            let irev = read_insync(&self.store, name)
                .await?
                .map_or(0, |(_, rev)| rev);
            let insync = clone_insync(&next);
            // The source is rewritten unchanged so that its revision moves: a delete of the
            // source that read it before this clone fails its check and sees the clone.
            let txn = term.fence(
                Txn::default()
                    .check(volume_key(source), src_rev)
                    .check(&key, 0)
                    .check(&ikey, irev)
                    .put(volume_key(source), encode(&src), None)
                    .put(&key, encode(&next), None)
                    .put(&ikey, encode(&insync), None),
            );
            if self.store.txn(txn).await?.is_some() {
                self.kick.notify_one();
                return Ok(Outcome {
                    changed: true,
                    view: self.view_of(&next).await?,
                });
            }
        }
        Err(VolumeError::Contended(name.to_string()))
    }

    /// Grow: the larger size is recorded, then each replica grown. Refused while attached (an
    /// open nexus keeps its size).
    pub async fn grow(&self, name: &str, size_bytes: u64) -> Result<Outcome, VolumeError> {
        self.command(name, |current, nodes| {
            let r = live(name, current)?;
            if size_bytes == r.size_bytes {
                return Ok(None);
            }
            if size_bytes < r.size_bytes {
                return Err(VolumeError::Shrink {
                    name: name.to_string(),
                    size_bytes: r.size_bytes,
                    requested_bytes: size_bytes,
                });
            }
            if let Some(a) = &r.attached {
                return Err(VolumeError::Attached {
                    name: name.to_string(),
                    node: a.node.clone(),
                    why: "detach it first: an open nexus keeps its size",
                });
            }
            rebuilt_first(name, r)?;
            let largest_bytes = nodes
                .iter()
                .filter(|n| r.replicas.iter().any(|x| x.node == n.id))
                .flat_map(|n| n.pools.first())
                .map(|p| p.size_bytes)
                .min()
                .unwrap_or(0);
            if size_bytes > largest_bytes {
                return Err(VolumeError::TooLarge {
                    name: name.to_string(),
                    size_bytes,
                    largest_bytes,
                    scope: "the smallest pool of its replica nodes",
                });
            }
            let mut next = r.clone();
            next.size_bytes = size_bytes;
            Ok(Some(next))
        })
        .await
    }

    /// Delete: recorded as `deleting`; the reconcile loop removes the replicas and snapshots,
    /// then the record. Refused while attached or while clones of its snapshots exist. The
    /// clones are listed after the record is read, and a clone rewrites its source's record,
    /// so a clone made in between moves the revision and this write fails and looks again.
    pub async fn delete(&self, name: &str) -> Result<Outcome, VolumeError> {
        for _ in 0..CAS_ATTEMPTS_MAX {
            let term = self.term().await?;
            let (r, revision) = read(&self.store, name)
                .await?
                .ok_or_else(|| VolumeError::Unknown(name.to_string()))?;
            if r.deleting {
                return Ok(Outcome {
                    changed: false,
                    view: self.view_of(&r).await?,
                });
            }
            if let Some(a) = &r.attached {
                return Err(VolumeError::Attached {
                    name: name.to_string(),
                    node: a.node.clone(),
                    why: "detach it first",
                });
            }
            let clones: Vec<String> = list(&self.store)
                .await?
                .into_iter()
                .filter(|(c, _)| c.origin.as_ref().is_some_and(|o| o.volume == name))
                .map(|(c, _)| c.name)
                .collect();
            if !clones.is_empty() {
                return Err(VolumeError::HasClones {
                    volume: name.to_string(),
                    clones,
                });
            }
            let mut next = r.clone();
            next.deleting = true;
            for replica in &mut next.replicas {
                replica.state = ReplicaState::Deleting;
            }
            if write(&self.store, term, &next, revision).await?.is_some() {
                self.kick.notify_one();
                return Ok(Outcome {
                    changed: true,
                    view: self.view_of(&next).await?,
                });
            }
        }
        Err(VolumeError::Contended(name.to_string()))
    }
}

/// Refuses an attach of `name` to `node` unless the node is registered, up and has an NBD
/// listener to export the nexus on.
fn attachable(name: &str, nodes: &[NodeRecord], node: &str) -> Result<(), VolumeError> {
    let rec = nodes
        .iter()
        .find(|n| n.id == node)
        .ok_or_else(|| VolumeError::UnknownNode(node.to_string()))?;
    if rec.state != NodeState::Up {
        return Err(VolumeError::NodeDown {
            name: name.to_string(),
            node: node.to_string(),
        });
    }
    if rec.addresses.nbd.is_none() {
        return Err(VolumeError::NoNbd {
            name: name.to_string(),
            node: node.to_string(),
        });
    }
    Ok(())
}

/// The record, unless absent or being deleted.
fn live<'a>(
    name: &str,
    current: Option<&'a VolumeRecord>,
) -> Result<&'a VolumeRecord, VolumeError> {
    match current {
        None => Err(VolumeError::Unknown(name.to_string())),
        Some(r) if r.deleting => Err(VolumeError::Deleting(name.to_string())),
        Some(r) => Ok(r),
    }
}

/// `r` attached to `node` for a new nexus: every replica created, the epoch raised (it fences
/// whichever nexus held the volume before), no attach address yet. The attach's nexus takes
/// over a rebuild nexus's work (it is given the replacement too), so that one goes.
fn attached_at(
    name: &str,
    r: &VolumeRecord,
    node: String,
    failover_to: Option<String>,
) -> Result<VolumeRecord, VolumeError> {
    if !r.all_created() {
        return Err(VolumeError::NotReady {
            name: name.to_string(),
            why: format!("replicas still being created ({})", creating(r)),
        });
    }
    let mut next = r.clone();
    next.raise_epoch()?;
    next.attached = Some(Attachment {
        node,
        nbd_uri: None,
        failover_to,
    });
    next.rebuild = None;
    Ok(next)
}

fn creating(r: &VolumeRecord) -> String {
    r.replicas
        .iter()
        .filter(|x| x.state == ReplicaState::Creating)
        .map(|x| format!("{} {}", x.node, x.state.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A new clone's in-sync record: its replicas made from the snapshot hold its data, at
/// generation 0, and its replacements are to be rebuilt from them.
fn clone_insync(clone: &VolumeRecord) -> InSyncRecord {
    InSyncRecord {
        format: insync::INSYNC_RECORD_FORMAT,
        volume: clone.name.clone(),
        epoch: clone.epoch,
        generation: 0,
        in_sync: clone
            .replicas
            .iter()
            .filter(|r| !r.replacement)
            .map(|r| r.node.clone())
            .collect(),
        out_of_sync: Vec::new(),
        updated_unix_ms: unix_ms(),
    }
}

/// The record of a clone `name` of `src`'s snapshot `snapshot`, which must be taken on every
/// replica it is for. The clone's replicas are made from the snapshot on the source's
/// created replicas that hold it; when fewer hold it than the replica count (a replica was
/// replaced since it was taken), the rest are placed on other nodes (`nodes`) as
/// replacements, created empty and rebuilt from the first ones.
fn clone_record(
    src: &VolumeRecord,
    snapshot: &str,
    name: &str,
    nodes: &[NodeRecord],
) -> Result<VolumeRecord, VolumeError> {
    if src.deleting {
        return Err(VolumeError::Deleting(src.name.clone()));
    }
    let snap = src
        .snapshots
        .iter()
        .find(|s| s.name == snapshot && !s.deleting)
        .ok_or_else(|| VolumeError::UnknownSnapshot {
            volume: src.name.clone(),
            snapshot: snapshot.to_string(),
        })?;
    let holders: Vec<String> = src
        .replicas
        .iter()
        .filter(|r| r.state == ReplicaState::Created && !r.replacement && snap.belongs_on(&r.node))
        .map(|r| r.node.clone())
        .collect();
    let missing: Vec<&str> = holders
        .iter()
        .filter(|n| !snap.nodes.contains(n))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(VolumeError::NotReady {
            name: src.name.clone(),
            why: format!(
                "snapshot '{snapshot}' is not yet taken on {}",
                missing.join(", ")
            ),
        });
    }
    if holders.is_empty() {
        return Err(VolumeError::NotReady {
            name: src.name.clone(),
            why: format!(
                "no replica of it holds snapshot '{snapshot}' any more (each replica it was \
                 taken on was replaced)"
            ),
        });
    }
    let more = (src.replicas_wanted as usize).saturating_sub(holders.len());
    let placed = if more == 0 {
        Vec::new()
    } else {
        placement::place(
            nodes,
            &placement::Request {
                size_bytes: src.size_bytes,
                replicas: more,
                zone: src.zone.as_deref(),
                holders: &holders,
                seed: placement::seed_of(name),
            },
        )
        .map_err(|source| VolumeError::Placement {
            name: name.to_string(),
            source,
        })?
    };
    Ok(VolumeRecord {
        format: VOLUME_RECORD_FORMAT,
        name: name.to_string(),
        size_bytes: src.size_bytes,
        replicas_wanted: src.replicas_wanted,
        zone: src.zone.clone(),
        replicas: holders
            .into_iter()
            .map(ReplicaRecord::creating)
            .chain(placed.into_iter().map(ReplicaRecord::replacement))
            .collect(),
        attached: None,
        rebuild: None,
        epoch: 0,
        created_unix_ms: unix_ms(),
        snapshots: Vec::new(),
        origin: Some(Origin {
            volume: src.name.clone(),
            snapshot: snapshot.to_string(),
        }),
        deleting: false,
        published: None,
        fs_type: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::membership::testing;

    const MIB: u64 = 1 << 20;

    fn node(id: &str, up: bool) -> NodeRecord {
        let n = testing::node(id, id, id, 128 * MIB, 100 * MIB);
        if up {
            n
        } else {
            testing::down(n, 0)
        }
    }

    fn create(size_bytes: u64, replicas: u32) -> CreateVolumeRequest {
        CreateVolumeRequest {
            name: "pg".into(),
            size_bytes,
            replicas,
            zone: None,
        }
    }

    #[test]
    fn a_new_record_is_placed_and_creating() {
        let nodes = [node("a", true), node("b", true), node("c", false)];
        let r = new_record(&create(16 * MIB, 2), &nodes).unwrap();
        let mut placed = r.replica_nodes();
        placed.sort();
        assert_eq!(placed, ["a", "b"]);
        assert!(r.replicas.iter().all(|x| x.state == ReplicaState::Creating));
        assert_eq!((r.epoch, r.attached.is_none()), (0, true));
        let err = new_record(&create(256 * MIB, 1), &nodes).unwrap_err();
        assert!(
            err.to_string()
                .contains("largest pool of any node holds 128M"),
            "{err}"
        );
        let err = new_record(&create(16 * MIB, 3), &nodes).unwrap_err();
        assert!(err.to_string().contains("c: down"), "{err}");
    }

    #[test]
    fn an_attach_raises_the_epoch_and_is_refused_at_the_maximum_leaving_the_record() {
        let mut r = new_record(&create(16 * MIB, 1), &[node("a", true)]).unwrap();
        let err = attached_at("pg", &r, "a".into(), None).unwrap_err();
        assert!(matches!(err, VolumeError::NotReady { .. }), "{err}");
        r.replicas[0].state = ReplicaState::Created;
        let next = attached_at("pg", &r, "a".into(), None).unwrap();
        assert_eq!((next.epoch, next.attached.unwrap().node.as_str()), (1, "a"));
        r.epoch = EPOCH_MAX - 1;
        assert_eq!(
            attached_at("pg", &r, "a".into(), None).unwrap().epoch,
            EPOCH_MAX
        );
        r.epoch = EPOCH_MAX;
        let err = attached_at("pg", &r, "a".into(), None).unwrap_err();
        assert!(
            err.to_string().contains(&format!("at epoch {EPOCH_MAX}")),
            "{err}"
        );
        assert_eq!(r.raise_epoch().unwrap_err().to_string(), err.to_string());
        assert_eq!((r.epoch, r.attached.is_none()), (EPOCH_MAX, true));
    }

    #[test]
    fn the_same_create_is_a_no_op_and_another_a_conflict_naming_both() {
        let r = new_record(&create(16 * MIB, 1), &[node("a", true)]).unwrap();
        assert!(same_request(&r, &create(16 * MIB, 1)).is_ok());
        let err = same_request(&r, &create(32 * MIB, 1))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("size 16777216") && err.contains("size 33554432"),
            "{err}"
        );
    }

    #[test]
    fn health_follows_the_in_sync_record_and_the_node() {
        let created = |n: &str| ReplicaRecord {
            state: ReplicaState::Created,
            ..ReplicaRecord::creating(n)
        };
        let (up, down) = (node("a", true), node("a", false));
        assert_eq!(
            health(&created("a"), Some(&up), None),
            ReplicaHealth::InSync
        );
        assert_eq!(
            health(&created("a"), Some(&down), None),
            ReplicaHealth::Faulted
        );
        let insync = InSyncRecord {
            format: insync::INSYNC_RECORD_FORMAT,
            volume: "pg".into(),
            epoch: 1,
            generation: 1,
            in_sync: vec!["b".into()],
            out_of_sync: vec!["a".into()],
            updated_unix_ms: 0,
        };
        assert_eq!(
            health(&created("a"), Some(&up), Some(&insync)),
            ReplicaHealth::Rebuilding
        );
        assert_eq!(
            health(&created("b"), Some(&node("b", true)), Some(&insync)),
            ReplicaHealth::InSync
        );
        let creating = ReplicaRecord::creating("a");
        assert_eq!(
            health(&creating, Some(&up), None),
            ReplicaHealth::Rebuilding
        );
    }

    #[test]
    fn a_clone_is_made_where_its_snapshot_is_and_rebuilt_elsewhere() {
        let nodes = [node("a", true), node("b", true), node("c", true)];
        let mut src = new_record(&create(16 * MIB, 2), &nodes[..2]).unwrap();
        for r in &mut src.replicas {
            r.state = ReplicaState::Created;
        }
        assert!(matches!(
            clone_record(&src, "mon", "pg2", &nodes),
            Err(VolumeError::UnknownSnapshot { .. })
        ));
        src.snapshots.push(SnapshotRecord {
            name: "mon".into(),
            nodes: vec!["a".into()],
            created_unix_ms: 0,
            on: None,
            deleting: false,
        });
        let err = clone_record(&src, "mon", "pg2", &nodes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not yet taken on b"), "{err}");
        src.snapshots[0].nodes.push("b".into());
        let c = clone_record(&src, "mon", "pg2", &nodes).unwrap();
        assert_eq!(c.replica_nodes(), src.replica_nodes());
        assert!(c.replicas.iter().all(|r| !r.replacement));
        assert_eq!(clone_insync(&c).in_sync, src.replica_nodes());
        assert_eq!(c.origin.unwrap().snapshot, "mon");
        // b is replaced by c after the snapshot: c never holds it (its copy is not the
        // snapshot's point in time). A clone is made from a's copy, and its second replica
        // is a replacement, on a node other than a, rebuilt from a.
        src.snapshots[0].on = Some(vec!["a".into(), "b".into()]);
        src.replicas[1].state = ReplicaState::Lost;
        let mut c_replica = ReplicaRecord::replacement("c");
        c_replica.state = ReplicaState::Created;
        src.replicas.push(c_replica);
        assert!(!src.snapshots[0].belongs_on("c"));
        let c = clone_record(&src, "mon", "pg3", &nodes).unwrap();
        assert_eq!(c.replicas.len(), 2);
        assert_eq!(
            (c.replicas[0].node.as_str(), c.replicas[0].replacement),
            ("a", false)
        );
        assert!(c.replicas[1].replacement && c.replicas[1].node != "a");
        assert_eq!(clone_insync(&c).in_sync, vec!["a".to_string()]);
        // No node left for the replacement: refused naming the shortage.
        let err = clone_record(&src, "mon", "pg3", &nodes[..1])
            .unwrap_err()
            .to_string();
        assert!(err.contains("need 1 eligible node"), "{err}");
        // No copy of the snapshot left at all.
        src.replicas[0].state = ReplicaState::Lost;
        let err = clone_record(&src, "mon", "pg3", &nodes)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no replica of it holds snapshot 'mon'"),
            "{err}"
        );
    }

    #[test]
    fn a_newer_record_format_is_refused() {
        let mut r = new_record(&create(16 * MIB, 1), &[node("a", true)]).unwrap();
        r.format = VOLUME_RECORD_FORMAT + 1;
        let err = decode_volume("k", &encode(&r)).unwrap_err().to_string();
        assert!(err.contains("newer than this build"), "{err}");
    }
}
