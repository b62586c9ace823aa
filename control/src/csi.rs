//! The CSI Identity and Controller services of the control process (`cairn-control
//! --csi-endpoint unix:///PATH`), for Kubernetes' external-provisioner, -attacher, -resizer
//! and -snapshotter. docs/csi.md has the RPC-by-RPC mapping and the status codes.
//!
//! Every RPC calls the same [`Volumes`] commands as the REST API, in this process: no HTTP to
//! itself. That is correct under leader election because every command checks this process's
//! term itself and refuses with [`VolumeError::NotLeader`] (UNAVAILABLE here, naming the
//! leader) when it does not lead, exactly as REST does; reads (List*, GetCapacity, Validate)
//! come from the shared store and are answered by any process.
//!
//! The volume id is the volume's name and a snapshot id is `VOLUME@SNAPSHOT` (the node object
//! name, [`snapshot_object`]). A command only records a decision; where the CSI answer must
//! describe the finished work (a created volume, an NBD URI to stage, a taken snapshot), the
//! RPC waits up to [`READY_WAIT`] for the reconcile loop to report it in the record, and
//! answers UNAVAILABLE (retry, which is idempotent) when it has not.

// Every helper here answers a tonic `Status`, unboxed as tonic's own API returns it.
#![allow(clippy::result_large_err)]

use crate::membership::NodeRecord;
use crate::rest::App;
use crate::volume::{snapshot_object, ReplicaState, VolumeError, VolumeRecord};
use cairn_control_api::{self as api, CreateVolumeRequest, NodeState, VOLUME_BLOCK_BYTES};
use cairn_csi::v1::{self as csi, controller_server, identity_server};
use cairn_csi::{
    CONTEXT_REPLICAS, DRIVER_NAME, PARAM_FS_TYPE, PARAM_K8S_PREFIX, PARAM_REPLICAS,
    PUBLISH_CONTEXT_NBD_URI, TOPOLOGY_NODE_KEY, TOPOLOGY_ZONE_KEY,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Code, Request, Response, Status};

/// The replica count of a CreateVolume without the `replicas` parameter: the most the
/// placement allows, since a CSI volume is replicated storage unless asked otherwise.
pub const REPLICAS_DEFAULT: u32 = api::REPLICAS_MAX;
/// The size of a CreateVolume without a capacity range (1 GiB), capped by `limit_bytes`.
pub const SIZE_DEFAULT_BYTES: u64 = 1 << 30;
/// How long an RPC waits for the reconcile loop to finish what it recorded (replicas created,
/// the nexus exported, a snapshot taken) before answering UNAVAILABLE; below the sidecars'
/// default 15 s call timeout, so the answer reaches them.
pub const READY_WAIT: Duration = Duration::from_secs(10);
/// How often such a wait re-reads the record.
pub const READY_POLL: Duration = Duration::from_millis(100);
/// The prefix of a list's `next_token`: the entries after the id that follows it.
pub const TOKEN_PREFIX: &str = "after:";

/// The Identity and Controller services over the control process's own state.
#[derive(Clone)]
pub struct Csi {
    app: Arc<App>,
}

/// Serves Identity and Controller on `incoming` until `shutdown` completes.
pub async fn serve(
    app: Arc<App>,
    incoming: tokio_stream::wrappers::UnixListenerStream,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let csi = Csi { app };
    tonic::transport::Server::builder()
        .add_service(identity_server::IdentityServer::new(csi.clone()))
        .add_service(controller_server::ControllerServer::new(csi))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// The CSI status of a volume command's refusal.
fn status_of(e: VolumeError) -> Status {
    let code = match &e {
        VolumeError::Unknown(_)
        | VolumeError::UnknownNode(_)
        | VolumeError::UnknownSnapshot { .. }
        | VolumeError::Deleting(_) => Code::NotFound,
        VolumeError::Conflict { .. } => Code::AlreadyExists,
        VolumeError::Placement { .. } | VolumeError::TooLarge { .. } => Code::ResourceExhausted,
        VolumeError::NodeDown { .. }
        | VolumeError::NoNbd { .. }
        | VolumeError::Attached { .. }
        | VolumeError::BadHint { .. }
        | VolumeError::HasClones { .. } => Code::FailedPrecondition,
        VolumeError::Shrink { .. } => Code::OutOfRange,
        VolumeError::NotReady { .. }
        | VolumeError::NotLeader { .. }
        | VolumeError::Contended(_)
        | VolumeError::Store(_) => Code::Unavailable,
        VolumeError::Corrupt { .. } | VolumeError::EpochExhausted { .. } => Code::Internal,
    };
    Status::new(code, e.to_string())
}

fn invalid(message: impl Into<String>) -> Status {
    Status::invalid_argument(message)
}

/// INVALID_ARGUMENT naming a required field that is empty.
fn required(field: &'static str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(invalid(format!("{field} is required")));
    }
    Ok(())
}

/// Whether a volume id can name a volume at all (an id that cannot is never found).
fn valid_id(id: &str) -> bool {
    api::check_name("volume id", id).is_ok()
}

/// Why Cairn cannot serve `cap`, or None when it can: block or mount access, on one node at a
/// time (a volume has one nexus, attached to one node).
fn unsupported(cap: &csi::VolumeCapability) -> Option<String> {
    use csi::volume_capability::access_mode::Mode;
    if cap.access_type.is_none() {
        return Some("a volume capability names neither block nor mount access".into());
    }
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown));
    match mode {
        None => Some("a volume capability has no access mode".into()),
        Some(
            Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter,
        ) => None,
        Some(m) => Some(format!(
            "access mode {} is not supported: a Cairn volume is attached to one node at a time",
            m.as_str_name()
        )),
    }
}

/// INVALID_ARGUMENT unless `caps` is non-empty and every capability is served.
fn check_capabilities(caps: &[csi::VolumeCapability]) -> Result<(), Status> {
    if caps.is_empty() {
        return Err(invalid("volume_capabilities is required"));
    }
    match caps.iter().find_map(unsupported) {
        Some(why) => Err(invalid(why)),
        None => Ok(()),
    }
}

/// Rounds `bytes` up to whole volume blocks.
fn round_up(bytes: u64) -> u64 {
    bytes.div_ceil(VOLUME_BLOCK_BYTES) * VOLUME_BLOCK_BYTES
}

/// The (required, limit) of a capacity range, 0 for unset; INVALID_ARGUMENT when negative.
fn range_of(range: Option<&csi::CapacityRange>) -> Result<(u64, u64), Status> {
    let Some(r) = range else {
        return Ok((0, 0));
    };
    let field = |name: &str, v: i64| {
        u64::try_from(v).map_err(|_| invalid(format!("capacity_range.{name} {v} is negative")))
    };
    Ok((
        field("required_bytes", r.required_bytes)?,
        field("limit_bytes", r.limit_bytes)?,
    ))
}

/// The size to create for a capacity range: `required` rounded up to whole blocks (or the
/// default when unset, capped by the limit), OUT_OF_RANGE when no block multiple fits.
fn size_for(required: u64, limit: u64) -> Result<u64, Status> {
    let size = if required == 0 {
        match limit {
            0 => SIZE_DEFAULT_BYTES,
            l => SIZE_DEFAULT_BYTES.min(l / VOLUME_BLOCK_BYTES * VOLUME_BLOCK_BYTES),
        }
    } else {
        round_up(required)
    };
    if size == 0 || (limit != 0 && size > limit) {
        return Err(Status::out_of_range(format!(
            "capacity range required_bytes {required} limit_bytes {limit} holds no whole number \
             of {VOLUME_BLOCK_BYTES}-byte blocks"
        )));
    }
    Ok(size)
}

/// The CreateVolume parameters Cairn reads.
struct Params {
    replicas: u32,
    fs_type: Option<String>,
}

/// Parses `replicas` and `fsType`; INVALID_ARGUMENT for a bad value or an unknown key (keys
/// of the Kubernetes sidecars, [`PARAM_K8S_PREFIX`], are ignored).
fn params(p: &HashMap<String, String>) -> Result<Params, Status> {
    let mut out = Params {
        replicas: REPLICAS_DEFAULT,
        fs_type: None,
    };
    for (key, value) in p {
        match key.as_str() {
            PARAM_REPLICAS => {
                out.replicas = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=api::REPLICAS_MAX).contains(n))
                    .ok_or_else(|| {
                        invalid(format!(
                            "parameter {PARAM_REPLICAS} '{value}' is not 1 to {}",
                            api::REPLICAS_MAX
                        ))
                    })?;
            }
            PARAM_FS_TYPE if !value.is_empty() => out.fs_type = Some(value.clone()),
            PARAM_FS_TYPE => {}
            k if k.starts_with(PARAM_K8S_PREFIX) => {}
            k => {
                return Err(invalid(format!(
                    "unknown parameter '{k}' (Cairn takes {PARAM_REPLICAS} and {PARAM_FS_TYPE})"
                )))
            }
        }
    }
    Ok(out)
}

/// The zones to try, in order, for accessibility requirements: the preferred zones that are
/// also requisite, then the other requisite zones; with no requisite zone, the preferred
/// zones and then anywhere (None). Segments other than the zone key do not constrain
/// placement (every node reaches a volume over NBD).
fn zones_to_try(req: Option<&csi::TopologyRequirement>) -> Vec<Option<String>> {
    let zones = |list: &[csi::Topology]| -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for z in list
            .iter()
            .filter_map(|t| t.segments.get(TOPOLOGY_ZONE_KEY))
        {
            if !out.contains(z) {
                out.push(z.clone());
            }
        }
        out
    };
    let (requisite, preferred) = req.map_or((Vec::new(), Vec::new()), |r| {
        (zones(&r.requisite), zones(&r.preferred))
    });
    if requisite.is_empty() {
        let mut out: Vec<Option<String>> = preferred.into_iter().map(Some).collect();
        out.push(None);
        return out;
    }
    let mut order: Vec<String> = preferred
        .into_iter()
        .filter(|z| requisite.contains(z))
        .collect();
    for z in requisite {
        if !order.contains(&z) {
            order.push(z);
        }
    }
    order.into_iter().map(Some).collect()
}

/// A snapshot id (`VOLUME@SNAPSHOT`) split, or None when it cannot name one.
fn split_snapshot_id(id: &str) -> Option<(&str, &str)> {
    let (volume, snapshot) = id.split_once('@')?;
    (valid_id(volume) && api::check_name("snapshot", snapshot).is_ok())
        .then_some((volume, snapshot))
}

/// The id a list token says to start after; ABORTED for a token this service did not issue.
fn after_token(token: &str) -> Result<Option<&str>, Status> {
    if token.is_empty() {
        return Ok(None);
    }
    match token.strip_prefix(TOKEN_PREFIX) {
        Some(id) if !id.is_empty() => Ok(Some(id)),
        _ => Err(Status::aborted(format!(
            "starting_token '{token}' was not issued by this service"
        ))),
    }
}

/// One page of `ids` (sorted) after `token`: the ids' indexes and the next token.
fn page(ids: &[String], token: &str, max_entries: i32) -> Result<(Vec<usize>, String), Status> {
    let max = usize::try_from(max_entries)
        .map_err(|_| invalid(format!("max_entries {max_entries} is negative")))?;
    let start = match after_token(token)? {
        Some(after) => ids.partition_point(|id| id.as_str() <= after),
        None => 0,
    };
    let end = if max == 0 {
        ids.len()
    } else {
        ids.len().min(start + max)
    };
    let next = if end < ids.len() && end > start {
        format!("{TOKEN_PREFIX}{}", ids[end - 1])
    } else {
        String::new()
    };
    Ok(((start..end).collect(), next))
}

/// The node the volume is published (or attached) to: its consumer.
fn holder(r: &VolumeRecord) -> Option<&str> {
    r.published
        .as_deref()
        .or(r.attached.as_ref().map(|a| a.node.as_str()))
}

/// Whether a snapshot has been taken on every replica it is for.
fn snapshot_ready(r: &VolumeRecord, s: &crate::volume::SnapshotRecord) -> bool {
    r.replicas
        .iter()
        .filter(|x| x.state == ReplicaState::Created && s.belongs_on(&x.node))
        .all(|x| s.nodes.contains(&x.node))
}

fn timestamp(unix_ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(unix_ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from(unix_ms % 1000 * 1_000_000).unwrap_or(0),
    }
}

fn bytes_i64(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// INVALID_ARGUMENT unless a clone of `src` asks for its replica count (a clone's replicas
/// are its source's, sharing the snapshot's clusters).
fn same_replicas(src: &VolumeRecord, p: &Params) -> Result<(), Status> {
    if src.replicas_wanted != p.replicas {
        return Err(invalid(format!(
            "a clone has its source's replica count: '{}' has {}, the request asks for {}",
            src.name, src.replicas_wanted, p.replicas
        )));
    }
    Ok(())
}

/// The CSI content source a volume was made from: a clone made from a volume (its hidden
/// snapshot is named after the clone) is a volume source, any other clone a snapshot source.
fn content_source(r: &VolumeRecord) -> Option<csi::VolumeContentSource> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let o = r.origin.as_ref()?;
    let kind = if o.snapshot == r.name {
        Type::Volume(VolumeSource {
            volume_id: o.volume.clone(),
        })
    } else {
        Type::Snapshot(SnapshotSource {
            snapshot_id: snapshot_object(&o.volume, &o.snapshot),
        })
    };
    Some(csi::VolumeContentSource { r#type: Some(kind) })
}

/// The CSI description of a volume record: its replica nodes as its topology.
fn csi_volume(r: &VolumeRecord, nodes: &[NodeRecord]) -> csi::Volume {
    let mut context =
        HashMap::from([(CONTEXT_REPLICAS.to_string(), r.replicas_wanted.to_string())]);
    if let Some(fs) = &r.fs_type {
        context.insert(PARAM_FS_TYPE.to_string(), fs.clone());
    }
    let accessible_topology = r
        .replicas
        .iter()
        .filter(|x| matches!(x.state, ReplicaState::Creating | ReplicaState::Created))
        .filter_map(|x| nodes.iter().find(|n| n.id == x.node))
        .map(|n| csi::Topology {
            segments: HashMap::from([
                (TOPOLOGY_ZONE_KEY.to_string(), n.zone.clone()),
                (TOPOLOGY_NODE_KEY.to_string(), n.id.clone()),
            ]),
        })
        .collect();
    csi::Volume {
        capacity_bytes: bytes_i64(r.size_bytes),
        volume_id: r.name.clone(),
        volume_context: context,
        content_source: content_source(r),
        accessible_topology,
    }
}

fn csi_snapshot(r: &VolumeRecord, s: &crate::volume::SnapshotRecord) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: bytes_i64(r.size_bytes),
        snapshot_id: snapshot_object(&r.name, &s.name),
        source_volume_id: r.name.clone(),
        creation_time: Some(timestamp(s.created_unix_ms)),
        ready_to_use: snapshot_ready(r, s),
        group_snapshot_id: String::new(),
    }
}

impl Csi {
    async fn nodes(&self) -> Result<Vec<NodeRecord>, Status> {
        crate::membership::node_records(&self.app.store)
            .await
            .map_err(|e| status_of(e.into()))
    }

    /// The record of volume `id`, None when there is none (or it is being deleted).
    async fn find(&self, id: &str) -> Result<Option<VolumeRecord>, Status> {
        if !valid_id(id) {
            return Ok(None);
        }
        match self.app.volumes.get(id).await {
            Ok(r) if r.deleting => Ok(None),
            Ok(r) => Ok(Some(r)),
            Err(VolumeError::Unknown(_)) => Ok(None),
            Err(e) => Err(status_of(e)),
        }
    }

    /// The record of volume `id`, or NOT_FOUND.
    async fn existing(&self, id: &str) -> Result<VolumeRecord, Status> {
        self.find(id)
            .await?
            .ok_or_else(|| Status::not_found(format!("volume '{id}' does not exist")))
    }

    /// Waits up to [`READY_WAIT`] for `done` to hold of volume `id`'s record; UNAVAILABLE
    /// naming `what` when it does not.
    async fn wait(
        &self,
        id: &str,
        what: &str,
        done: impl Fn(&VolumeRecord) -> bool,
    ) -> Result<VolumeRecord, Status> {
        let deadline = tokio::time::Instant::now() + READY_WAIT;
        loop {
            let r = self.existing(id).await?;
            if done(&r) {
                return Ok(r);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::unavailable(format!(
                    "volume '{id}': {what} is recorded and not yet done after {} s; retry",
                    READY_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// The answer for a created volume once its replicas exist.
    async fn created(&self, id: &str) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let r = self
            .wait(id, "creating its replicas", VolumeRecord::all_created)
            .await?;
        let nodes = self.nodes().await?;
        Ok(Response::new(csi::CreateVolumeResponse {
            volume: Some(csi_volume(&r, &nodes)),
        }))
    }

    /// A repeated CreateVolume: the same volume when compatible, else ALREADY_EXISTS.
    async fn create_again(
        &self,
        r: &VolumeRecord,
        req: &csi::CreateVolumeRequest,
        (required, limit): (u64, u64),
        p: &Params,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let mut clashes = Vec::new();
        if r.size_bytes < required || (limit != 0 && r.size_bytes > limit) {
            clashes.push(format!(
                "size {} bytes is outside required_bytes {required} limit_bytes {limit}",
                r.size_bytes
            ));
        }
        if r.replicas_wanted != p.replicas {
            clashes.push(format!(
                "{} replicas, not {}",
                r.replicas_wanted, p.replicas
            ));
        }
        if r.fs_type != p.fs_type {
            clashes.push(format!("fsType {:?}, not {:?}", r.fs_type, p.fs_type));
        }
        if content_source(r) != req.volume_content_source {
            clashes.push("another content source".to_string());
        }
        if !clashes.is_empty() {
            return Err(Status::already_exists(format!(
                "volume '{}' exists with {}",
                r.name,
                clashes.join("; ")
            )));
        }
        self.created(&r.name).await
    }

    /// A new volume from a snapshot or (through a snapshot named after the new volume) from
    /// another volume, grown to `size` when that is larger than the source.
    async fn create_from(
        &self,
        name: &str,
        source: &csi::VolumeContentSource,
        (required_bytes, limit): (u64, u64),
        p: &Params,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        use csi::volume_content_source::Type;
        let (volume, snapshot) = match &source.r#type {
            Some(Type::Snapshot(s)) => {
                required("volume_content_source.snapshot.snapshot_id", &s.snapshot_id)?;
                split_snapshot_id(&s.snapshot_id).ok_or_else(|| {
                    Status::not_found(format!("snapshot '{}' does not exist", s.snapshot_id))
                })?
            }
            Some(Type::Volume(v)) => {
                required("volume_content_source.volume.volume_id", &v.volume_id)?;
                let src = self.existing(&v.volume_id).await?;
                same_replicas(&src, p)?;
                self.app
                    .volumes
                    .snapshot(&src.name, name)
                    .await
                    .map_err(status_of)?;
                self.wait(&src.name, "the snapshot for the clone", |r| {
                    r.snapshots
                        .iter()
                        .any(|s| s.name == name && snapshot_ready(r, s))
                })
                .await?;
                (v.volume_id.as_str(), name)
            }
            None => return Err(invalid("volume_content_source names no snapshot or volume")),
        };
        let src = self.existing(volume).await?;
        same_replicas(&src, p)?;
        if limit != 0 && src.size_bytes > limit {
            return Err(Status::out_of_range(format!(
                "source volume '{volume}' is {} bytes, above limit_bytes {limit}",
                src.size_bytes
            )));
        }
        self.app
            .volumes
            .clone_with(volume, snapshot, name, p.fs_type.as_deref())
            .await
            .map_err(status_of)?;
        let size = round_up(required_bytes);
        if size > src.size_bytes {
            self.created(name).await?;
            self.app.volumes.grow(name, size).await.map_err(status_of)?;
        }
        self.created(name).await
    }

    /// A new empty volume, placed in the first of the zones to try that can hold it.
    async fn create_new(
        &self,
        req: &csi::CreateVolumeRequest,
        size_bytes: u64,
        p: &Params,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let mut last = None;
        for zone in zones_to_try(req.accessibility_requirements.as_ref()) {
            let create = CreateVolumeRequest {
                name: req.name.clone(),
                size_bytes,
                replicas: p.replicas,
                zone,
            };
            match self
                .app
                .volumes
                .create_with(&create, p.fs_type.as_deref())
                .await
            {
                Ok(_) => return self.created(&req.name).await,
                Err(e @ (VolumeError::Placement { .. } | VolumeError::TooLarge { .. })) => {
                    last = Some(e)
                }
                Err(e) => return Err(status_of(e)),
            }
        }
        Err(last.map_or_else(
            || Status::resource_exhausted("no zone to place the volume in"),
            status_of,
        ))
    }
}

#[tonic::async_trait]
impl identity_server::Identity for Csi {
    async fn get_plugin_info(
        &self,
        _: Request<csi::GetPluginInfoRequest>,
    ) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: DRIVER_NAME.to_string(),
            vendor_version: env!("CARGO_PKG_VERSION").to_string(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use csi::plugin_capability::{service, volume_expansion, Service, Type, VolumeExpansion};
        let service = |t: service::Type| csi::PluginCapability {
            r#type: Some(Type::Service(Service { r#type: t as i32 })),
        };
        Ok(Response::new(csi::GetPluginCapabilitiesResponse {
            capabilities: vec![
                service(service::Type::ControllerService),
                service(service::Type::VolumeAccessibilityConstraints),
                csi::PluginCapability {
                    r#type: Some(Type::VolumeExpansion(VolumeExpansion {
                        r#type: volume_expansion::Type::Offline as i32,
                    })),
                },
            ],
        }))
    }

    async fn probe(
        &self,
        _: Request<csi::ProbeRequest>,
    ) -> Result<Response<csi::ProbeResponse>, Status> {
        // Ready when the store answers: every RPC needs it.
        self.nodes().await?;
        Ok(Response::new(csi::ProbeResponse { ready: Some(true) }))
    }
}

#[tonic::async_trait]
impl controller_server::Controller for Csi {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        required("name", &req.name)?;
        check_capabilities(&req.volume_capabilities)?;
        api::check_name("name", &req.name).map_err(|e| invalid(e.to_string()))?;
        let range = range_of(req.capacity_range.as_ref())?;
        let size_bytes = size_for(range.0, range.1)?;
        let p = params(&req.parameters)?;
        match self.app.volumes.get(&req.name).await {
            Ok(r) if r.deleting => Err(Status::unavailable(format!(
                "volume '{}' is being deleted; retry once it is gone",
                r.name
            ))),
            Ok(r) => self.create_again(&r, &req, range, &p).await,
            Err(VolumeError::Unknown(_)) => match &req.volume_content_source {
                Some(source) => self.create_from(&req.name, source, range, &p).await,
                None => self.create_new(&req, size_bytes, &p).await,
            },
            Err(e) => Err(status_of(e)),
        }
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        required("volume_id", &req.volume_id)?;
        let Some(r) = self.find(&req.volume_id).await? else {
            return Ok(Response::new(csi::DeleteVolumeResponse {}));
        };
        if let Some(node) = holder(&r) {
            return Err(Status::failed_precondition(format!(
                "volume '{}' is published to node '{node}'; unpublish it first",
                r.name
            )));
        }
        let snapshots: Vec<&str> = r
            .snapshots
            .iter()
            .filter(|s| !s.deleting)
            .map(|s| s.name.as_str())
            .collect();
        if !snapshots.is_empty() {
            return Err(Status::failed_precondition(format!(
                "volume '{}' has snapshots ({}); a Cairn snapshot lives on its volume's \
                 replicas, so delete them first",
                r.name,
                snapshots.join(", ")
            )));
        }
        match self.app.volumes.delete(&r.name).await {
            Ok(_) | Err(VolumeError::Unknown(_)) => Ok(Response::new(csi::DeleteVolumeResponse {})),
            Err(e) => Err(status_of(e)),
        }
    }

    async fn controller_publish_volume(
        &self,
        request: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let req = request.into_inner();
        required("volume_id", &req.volume_id)?;
        required("node_id", &req.node_id)?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| invalid("volume_capability is required"))?;
        if let Some(why) = unsupported(cap) {
            return Err(invalid(why));
        }
        let r = self.existing(&req.volume_id).await?;
        let node = req.node_id.as_str();
        if !self.nodes().await?.iter().any(|n| n.id == node) {
            return Err(Status::not_found(format!(
                "node '{node}' is not registered"
            )));
        }
        self.app
            .volumes
            .publish(&r.name, node)
            .await
            .map_err(status_of)?;
        let r = self
            .wait(&r.name, "exporting its nexus", |r| {
                r.attached
                    .as_ref()
                    .is_some_and(|a| a.node == node && a.nbd_uri.is_some())
            })
            .await?;
        let uri = r
            .attached
            .and_then(|a| a.nbd_uri)
            .expect("the wait checked the NBD URI");
        Ok(Response::new(csi::ControllerPublishVolumeResponse {
            publish_context: HashMap::from([(PUBLISH_CONTEXT_NBD_URI.to_string(), uri)]),
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        required("volume_id", &req.volume_id)?;
        let Some(r) = self.find(&req.volume_id).await? else {
            return Ok(Response::new(csi::ControllerUnpublishVolumeResponse {}));
        };
        let node = Some(req.node_id.as_str()).filter(|n| !n.is_empty());
        match self.app.volumes.unpublish(&r.name, node).await {
            Ok(_) | Err(VolumeError::Unknown(_) | VolumeError::Deleting(_)) => {
                Ok(Response::new(csi::ControllerUnpublishVolumeResponse {}))
            }
            Err(e) => Err(status_of(e)),
        }
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        required("volume_id", &req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(invalid("volume_capabilities is required"));
        }
        let r = self.existing(&req.volume_id).await?;
        let nodes = self.nodes().await?;
        let context = csi_volume(&r, &nodes).volume_context;
        let why = req
            .volume_capabilities
            .iter()
            .find_map(unsupported)
            .or_else(|| {
                (!req.volume_context.is_empty() && req.volume_context != context)
                    .then(|| "the volume context is not this volume's".to_string())
            });
        let answer = match why {
            Some(message) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            },
            None => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                }),
                message: String::new(),
            },
        };
        Ok(Response::new(answer))
    }

    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let req = request.into_inner();
        let records: Vec<VolumeRecord> = crate::volume::list(&self.app.store)
            .await
            .map_err(status_of)?
            .into_iter()
            .map(|(r, _)| r)
            .filter(|r| !r.deleting)
            .collect();
        let ids: Vec<String> = records.iter().map(|r| r.name.clone()).collect();
        let (indexes, next_token) = page(&ids, &req.starting_token, req.max_entries)?;
        let nodes = self.nodes().await?;
        let entries = indexes
            .into_iter()
            .map(|i| {
                let r = &records[i];
                csi::list_volumes_response::Entry {
                    volume: Some(csi_volume(r, &nodes)),
                    status: Some(csi::list_volumes_response::VolumeStatus {
                        published_node_ids: holder(r).map(str::to_string).into_iter().collect(),
                        volume_condition: None,
                    }),
                }
            })
            .collect();
        Ok(Response::new(csi::ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let req = request.into_inner();
        if let Some(why) = req.volume_capabilities.iter().find_map(unsupported) {
            return Err(invalid(why));
        }
        let p = params(&req.parameters)?;
        let segments = req
            .accessible_topology
            .map(|t| t.segments)
            .unwrap_or_default();
        let mut free: Vec<u64> = self
            .nodes()
            .await?
            .iter()
            .filter(|n| n.state == NodeState::Up)
            .filter(|n| {
                segments.get(TOPOLOGY_ZONE_KEY).is_none_or(|z| *z == n.zone)
                    && segments.get(TOPOLOGY_NODE_KEY).is_none_or(|id| *id == n.id)
            })
            .filter_map(|n| n.pools.first().map(|p| p.free_bytes))
            .collect();
        free.sort_unstable_by(|a, b| b.cmp(a));
        // One volume of R replicas needs R nodes with its size free: the R-th largest free
        // pool bounds it, rounded down to whole blocks.
        let largest = free
            .get(p.replicas as usize - 1)
            .map_or(0, |b| b / VOLUME_BLOCK_BYTES * VOLUME_BLOCK_BYTES);
        Ok(Response::new(csi::GetCapacityResponse {
            available_capacity: bytes_i64(largest),
            maximum_volume_size: Some(bytes_i64(largest)),
            minimum_volume_size: Some(bytes_i64(VOLUME_BLOCK_BYTES)),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use csi::controller_service_capability::{rpc::Type, Rpc, Type as Cap};
        let capabilities = [
            Type::CreateDeleteVolume,
            Type::PublishUnpublishVolume,
            Type::ListVolumes,
            Type::GetCapacity,
            Type::CreateDeleteSnapshot,
            Type::ListSnapshots,
            Type::CloneVolume,
            Type::ExpandVolume,
            Type::ListVolumesPublishedNodes,
        ]
        .into_iter()
        .map(|t| csi::ControllerServiceCapability {
            r#type: Some(Cap::Rpc(Rpc { r#type: t as i32 })),
        })
        .collect();
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let req = request.into_inner();
        required("source_volume_id", &req.source_volume_id)?;
        required("name", &req.name)?;
        api::check_name("name", &req.name).map_err(|e| invalid(e.to_string()))?;
        // Snapshot names are unique across volumes in CSI.
        let others = crate::volume::list(&self.app.store)
            .await
            .map_err(status_of)?;
        if let Some((other, _)) = others.iter().find(|(r, _)| {
            r.name != req.source_volume_id
                && r.snapshots
                    .iter()
                    .any(|s| s.name == req.name && !s.deleting)
        }) {
            return Err(Status::already_exists(format!(
                "snapshot '{}' exists of another volume, '{}'",
                req.name, other.name
            )));
        }
        let src = self.existing(&req.source_volume_id).await?;
        self.app
            .volumes
            .snapshot(&src.name, &req.name)
            .await
            .map_err(status_of)?;
        let name = req.name.as_str();
        let r = self
            .wait(&src.name, "taking the snapshot", |r| {
                r.snapshots
                    .iter()
                    .any(|s| s.name == name && snapshot_ready(r, s))
            })
            .await?;
        let s = r
            .snapshots
            .iter()
            .find(|s| s.name == name)
            .expect("the wait found the snapshot");
        Ok(Response::new(csi::CreateSnapshotResponse {
            snapshot: Some(csi_snapshot(&r, s)),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let req = request.into_inner();
        required("snapshot_id", &req.snapshot_id)?;
        let Some((volume, snapshot)) = split_snapshot_id(&req.snapshot_id) else {
            return Ok(Response::new(csi::DeleteSnapshotResponse {}));
        };
        match self.app.volumes.delete_snapshot(volume, snapshot).await {
            Ok(_) | Err(VolumeError::Unknown(_)) => {
                Ok(Response::new(csi::DeleteSnapshotResponse {}))
            }
            Err(e) => Err(status_of(e)),
        }
    }

    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let req = request.into_inner();
        let records = crate::volume::list(&self.app.store)
            .await
            .map_err(status_of)?;
        let mut all: Vec<(String, &VolumeRecord, &crate::volume::SnapshotRecord)> = records
            .iter()
            .map(|(r, _)| r)
            .filter(|r| !r.deleting)
            .filter(|r| req.source_volume_id.is_empty() || r.name == req.source_volume_id)
            .flat_map(|r| {
                r.snapshots
                    .iter()
                    .filter(|s| !s.deleting)
                    .map(move |s| (snapshot_object(&r.name, &s.name), r, s))
            })
            .filter(|(id, _, _)| req.snapshot_id.is_empty() || *id == req.snapshot_id)
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let ids: Vec<String> = all.iter().map(|(id, _, _)| id.clone()).collect();
        let (indexes, next_token) = page(&ids, &req.starting_token, req.max_entries)?;
        let entries = indexes
            .into_iter()
            .map(|i| csi::list_snapshots_response::Entry {
                snapshot: Some(csi_snapshot(all[i].1, all[i].2)),
            })
            .collect();
        Ok(Response::new(csi::ListSnapshotsResponse {
            entries,
            next_token,
        }))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        required("volume_id", &req.volume_id)?;
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| invalid("capacity_range is required"))?;
        let (required_bytes, limit) = range_of(Some(range))?;
        let size = size_for(required_bytes, limit)?;
        let r = self.existing(&req.volume_id).await?;
        // Block access needs nothing on the node; a filesystem (or an unknown use) is grown
        // there by NodeExpandVolume.
        let node_expansion_required = !req.volume_capability.as_ref().is_some_and(|c| {
            matches!(
                c.access_type,
                Some(csi::volume_capability::AccessType::Block(_))
            )
        });
        if size <= r.size_bytes {
            return Ok(Response::new(csi::ControllerExpandVolumeResponse {
                capacity_bytes: bytes_i64(r.size_bytes),
                node_expansion_required,
            }));
        }
        match self.app.volumes.grow(&r.name, size).await {
            Ok(o) => Ok(Response::new(csi::ControllerExpandVolumeResponse {
                capacity_bytes: bytes_i64(o.view.size_bytes),
                node_expansion_required,
            })),
            Err(e @ VolumeError::TooLarge { .. }) => Err(Status::out_of_range(e.to_string())),
            Err(e) => Err(status_of(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_blocks_and_a_range_without_one_is_out_of_range() {
        assert_eq!(size_for(1, 0).unwrap(), VOLUME_BLOCK_BYTES);
        assert_eq!(size_for(0, 0).unwrap(), SIZE_DEFAULT_BYTES);
        assert_eq!(
            size_for(0, 3 * VOLUME_BLOCK_BYTES + 1).unwrap(),
            3 * VOLUME_BLOCK_BYTES
        );
        assert_eq!(size_for(1000, 2000).unwrap_err().code(), Code::OutOfRange);
        assert_eq!(size_for(0, 100).unwrap_err().code(), Code::OutOfRange);
    }

    #[test]
    fn pages_follow_their_tokens_and_a_foreign_token_is_aborted() {
        let ids: Vec<String> = ["a", "b", "c", "d", "e"].map(String::from).to_vec();
        let (first, next) = page(&ids, "", 2).unwrap();
        assert_eq!((first, next.as_str()), (vec![0, 1], "after:b"));
        let (second, next) = page(&ids, &next, 2).unwrap();
        assert_eq!((second, next.as_str()), (vec![2, 3], "after:d"));
        let (last, next) = page(&ids, &next, 2).unwrap();
        assert_eq!((last, next.as_str()), (vec![4], ""));
        assert_eq!(page(&ids, "", 0).unwrap().0.len(), 5);
        assert_eq!(page(&ids, "bogus", 2).unwrap_err().code(), Code::Aborted);
        assert_eq!(
            page(&ids, "", -1).unwrap_err().code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn preferred_requisite_zones_come_first() {
        let topo = |z: &str| csi::Topology {
            segments: HashMap::from([(TOPOLOGY_ZONE_KEY.to_string(), z.to_string())]),
        };
        let req = csi::TopologyRequirement {
            requisite: vec![topo("a"), topo("b")],
            preferred: vec![topo("b"), topo("c")],
        };
        assert_eq!(
            zones_to_try(Some(&req)),
            [Some("b".to_string()), Some("a".to_string())]
        );
        let req = csi::TopologyRequirement {
            requisite: Vec::new(),
            preferred: vec![topo("c")],
        };
        assert_eq!(zones_to_try(Some(&req)), [Some("c".to_string()), None]);
        assert_eq!(zones_to_try(None), [None]);
    }
}
