//! The gRPC admin service (`cairn.node.v1.NodeAdmin`, node/proto/admin.proto).
//!
//! Each method runs its [`Node`] operation in `spawn_blocking`, since every one waits on
//! engine round trips, and maps [`NodeError`] to a status code in one place
//! ([`status_of`]): the message is the error's own, which names the object.
//!
//! [`Authorised`] wraps the service: every call is logged with the caller's identity (the
//! client certificate's, under TLS: `peer=control:c1`; reads at debug, mutations at info), and
//! under TLS only `control:` and `admin:` identities may call; any other caller (a node, a
//! certificate that names no Cairn identity) gets PERMISSION_DENIED naming it
//! (docs/security.md). The handshake itself ([`server_tls`]) refuses a client without a
//! certificate from the cluster CA.

use crate::proto as pb;
use crate::proto::node_admin_server::NodeAdmin;
use crate::state::{Node, NodeError};
use cairn_engine::bdev::crypt::{CryptError, CryptKey};
use cairn_engine::frontend::nbd::NbdError;
use cairn_engine::volume::PoolError;
use cairn_replication::nexus::manager::NexusError;
use cairn_replication::replica::ReplicaError;
use cairn_tls::Identity;
use std::sync::Arc;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Code, Request, Response, Status};

/// The admin server's TLS: the node's certificate, and a client certificate from the cluster
/// CA required in the handshake.
pub fn server_tls(tls: &cairn_tls::Tls) -> tonic::transport::ServerTlsConfig {
    let pem = tls.pem();
    tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(&pem.cert, &pem.key))
        .client_ca_root(tonic::transport::Certificate::from_pem(&pem.ca))
}

/// Whether `identity` may call the node admin API: the control process and operators.
pub fn may_call(identity: &Identity) -> bool {
    matches!(identity, Identity::Control(_) | Identity::Admin(_))
}

/// True for the calls that change nothing (logged at debug; the others at info).
fn is_read(method: &str) -> bool {
    ["List", "Show", "Stats", "Verify"]
        .iter()
        .any(|p| method.starts_with(p))
}

type Server = pb::node_admin_server::NodeAdminServer<AdminService>;

/// The admin service behind the identity check and the per-call log line.
#[derive(Clone)]
pub struct Authorised {
    inner: Server,
    /// Whether the server runs TLS: then every caller has a verified certificate.
    tls: bool,
}

impl Authorised {
    pub fn new(inner: Server, tls: bool) -> Authorised {
        Authorised { inner, tls }
    }
}

impl NamedService for Authorised {
    const NAME: &'static str = <Server as NamedService>::NAME;
}

/// Admits or refuses one call, logging it with the caller.
// tonic's own API returns `Status` unboxed; this matches it.
#[allow(clippy::result_large_err)]
fn admit<B>(req: &http::Request<B>, tls: bool) -> Result<(), Status> {
    let method = req.uri().path().rsplit('/').next().unwrap_or_default();
    let info = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>();
    let addr = info
        .and_then(|i| i.get_ref().remote_addr())
        .or_else(|| {
            req.extensions()
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr)
        })
        .map_or_else(|| "-".to_string(), |a| a.to_string());
    if !tls {
        if is_read(method) {
            tracing::debug!(peer = "plain", addr, method, "admin call");
        } else {
            tracing::info!(peer = "plain", addr, method, "admin call");
        }
        return Ok(());
    }
    let certs = info.and_then(TlsConnectInfo::peer_certs);
    let Some(identity) = Identity::of_peer(certs.as_deref().map(Vec::as_slice)) else {
        tracing::warn!(peer = "unnamed", addr, method, "admin call refused");
        return Err(Status::permission_denied(format!(
            "the admin API's {method}: the client certificate names no Cairn identity \
             (control:NAME or admin:NAME)"
        )));
    };
    if !may_call(&identity) {
        tracing::warn!(peer = %identity, addr, method, "admin call refused");
        return Err(Status::permission_denied(format!(
            "{identity} may not call the admin API's {method}: only control and admin identities may"
        )));
    }
    if is_read(method) {
        tracing::debug!(peer = %identity, addr, method, "admin call");
    } else {
        tracing::info!(peer = %identity, addr, method, "admin call");
    }
    Ok(())
}

impl Service<http::Request<tonic::body::Body>> for Authorised {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.inner, cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        match admit(&req, self.tls) {
            Ok(()) => self.inner.call(req),
            Err(status) => Box::pin(std::future::ready(Ok(status.into_http()))),
        }
    }
}

/// The service; clone-cheap, one per server.
#[derive(Clone)]
pub struct AdminService {
    node: Arc<Node>,
}

impl AdminService {
    pub fn new(node: Arc<Node>) -> AdminService {
        AdminService { node }
    }

    pub fn into_server(self) -> pb::node_admin_server::NodeAdminServer<AdminService> {
        pb::node_admin_server::NodeAdminServer::new(self)
    }

    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Node) -> Result<R, NodeError> + Send + 'static,
    ) -> Result<Response<R>, Status> {
        let node = self.node.clone();
        match tokio::task::spawn_blocking(move || f(&node)).await {
            Ok(Ok(r)) => Ok(Response::new(r)),
            Ok(Err(e)) => Err(status_of(&e)),
            Err(e) => Err(Status::internal(format!("admin operation panicked: {e}"))),
        }
    }
}

/// The status code a client sees for `e`.
pub fn code_of(e: &NodeError) -> Code {
    match e {
        NodeError::NoSuchPool { .. }
        | NodeError::NoSuchObject { .. }
        | NodeError::NoSuchExport { .. } => Code::NotFound,
        NodeError::ExportExists { .. } | NodeError::PoolExists { .. } => Code::AlreadyExists,
        NodeError::Ambiguous { .. } => Code::InvalidArgument,
        NodeError::Exported { .. } | NodeError::NbdDisabled => Code::FailedPrecondition,
        NodeError::ShuttingDown => Code::Unavailable,
        NodeError::Pool { source, .. } => pool_code(source),
        NodeError::Malloc { .. } => Code::InvalidArgument,
        NodeError::Nbd(e) => nbd_code(e),
        NodeError::Engine(_) => Code::Internal,
        NodeError::IsReplica { .. }
        | NodeError::NexusExported { .. }
        | NodeError::FaultInjectionOff
        | NodeError::NoControl { .. } => Code::FailedPrecondition,
        NodeError::NoSuchFault { .. } => Code::NotFound,
        NodeError::Replication(_) => Code::InvalidArgument,
        NodeError::Nexus(e) => nexus_code(e),
        NodeError::Replica(e) => replica_code(e),
        NodeError::Crypt(e) => crypt_code(e),
    }
}

fn replica_code(e: &ReplicaError) -> Code {
    match e {
        ReplicaError::NotFound { .. } => Code::NotFound,
        ReplicaError::BadOpener { .. }
        | ReplicaError::NotOwner { .. }
        | ReplicaError::GenerationDown { .. } => Code::InvalidArgument,
        ReplicaError::Busy { .. } | ReplicaError::Released { .. } => Code::Unavailable,
        ReplicaError::NotAssigned { .. } => Code::PermissionDenied,
        ReplicaError::Epoch { .. } | ReplicaError::Flush { .. } => Code::Internal,
    }
}

fn nexus_code(e: &NexusError) -> Code {
    match e {
        NexusError::Exists { .. } => Code::AlreadyExists,
        NexusError::NotFound { .. } => Code::NotFound,
        NexusError::Invalid { .. } => Code::InvalidArgument,
        NexusError::Child { .. } => Code::Unavailable,
        NexusError::Engine { .. } => Code::Internal,
        NexusError::TakeoverRefused { .. } | NexusError::NoTrustedSource { .. } => {
            Code::FailedPrecondition
        }
        NexusError::NotRecorded { .. } => Code::Unavailable,
    }
}

fn pool_code(e: &PoolError) -> Code {
    match e {
        PoolError::NotFound { .. } => Code::NotFound,
        PoolError::DuplicateName { .. } => Code::AlreadyExists,
        PoolError::BadName { .. }
        | PoolError::BadLabels { .. }
        | PoolError::BadSize { .. }
        | PoolError::ShrinkRefused { .. }
        | PoolError::WrongKind { .. } => Code::InvalidArgument,
        PoolError::HasDependants { .. } | PoolError::VolumeOpen { .. } => Code::FailedPrecondition,
        PoolError::NoSpace { .. }
        | PoolError::MetadataFull { .. }
        | PoolError::TooManyObjects { .. } => Code::ResourceExhausted,
        _ => Code::Internal,
    }
}

fn nbd_code(e: &NbdError) -> Code {
    match e {
        NbdError::ExportExists { .. } => Code::AlreadyExists,
        NbdError::NoSuchExport { .. } => Code::NotFound,
        NbdError::BadExportName { .. } => Code::InvalidArgument,
        NbdError::StillConnected { .. } => Code::FailedPrecondition,
        _ => Code::Internal,
    }
}

pub fn status_of(e: &NodeError) -> Status {
    Status::new(code_of(e), e.to_string())
}

/// Encrypted exports: CryptError's kinds as gRPC codes. A wrong key or data that is not an
/// encrypted volume is the caller's precondition, not a server fault.
fn crypt_code(e: &CryptError) -> Code {
    match e {
        CryptError::WrongKey { .. }
        | CryptError::KeyNeeded { .. }
        | CryptError::NotEncrypted { .. }
        | CryptError::ReadOnlyBlank { .. } => Code::FailedPrecondition,
        CryptError::Geometry { .. } => Code::InvalidArgument,
        CryptError::Io { .. } | CryptError::Random { .. } | CryptError::Engine(_) => Code::Internal,
    }
}

/// An export's key: none when empty, else 64 raw bytes or 128 hex digits.
// tonic's own API returns `Status` unboxed; this matches it.
#[allow(clippy::result_large_err)]
fn encryption_key(bytes: &[u8]) -> Result<Option<CryptKey>, Status> {
    if bytes.is_empty() {
        return Ok(None);
    }
    CryptKey::parse(bytes)
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("encryption_key: {e}")))
}

// tonic's own API returns `Status` unboxed; this matches it.
#[allow(clippy::result_large_err)]
fn required(what: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        return Err(Status::invalid_argument(format!("{what} is required")));
    }
    Ok(())
}

#[tonic::async_trait]
impl NodeAdmin for AdminService {
    async fn list_pools(
        &self,
        _: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        self.run(|n| n.list_pools().map(|pools| pb::ListPoolsResponse { pools }))
            .await
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        self.run(move |n| {
            n.list_volumes(&r.pool)
                .map(|volumes| pb::ListVolumesResponse { volumes })
        })
        .await
    }

    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        required("name", &r.name)?;
        if r.size_bytes == 0 {
            return Err(Status::invalid_argument(format!(
                "size_bytes of volume '{}' must be above 0",
                r.name
            )));
        }
        let labels = r.labels.into_iter().map(|l| (l.key, l.value)).collect();
        self.run(move |n| n.create_volume(&r.name, r.size_bytes, &r.pool, labels))
            .await
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        required("name", &r.name)?;
        self.run(move |n| {
            n.delete_volume(&r.name, &r.pool)
                .map(|()| pb::DeleteVolumeResponse {})
        })
        .await
    }

    async fn grow_volume(
        &self,
        req: Request<pb::GrowVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        required("name", &r.name)?;
        self.run(move |n| n.grow_volume(&r.name, r.size_bytes, &r.pool))
            .await
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        required("volume", &r.volume)?;
        required("name", &r.name)?;
        self.run(move |n| n.create_snapshot(&r.volume, &r.name, &r.pool))
            .await
    }

    async fn create_clone(
        &self,
        req: Request<pb::CreateCloneRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        required("snapshot", &r.snapshot)?;
        required("name", &r.name)?;
        self.run(move |n| n.create_clone(&r.snapshot, &r.name, &r.pool))
            .await
    }

    async fn export(
        &self,
        req: Request<pb::ExportRequest>,
    ) -> Result<Response<pb::ExportInfo>, Status> {
        let mut r = req.into_inner();
        required("name", &r.name)?;
        // The parsed key wipes itself when dropped; wipe the request's copy now.
        let key = encryption_key(&r.encryption_key);
        r.encryption_key.fill(0);
        let key = key?;
        self.run(move |n| n.export(&r.name, &r.pool, &r.export_name, r.read_only, r.nexus, key))
            .await
    }

    async fn unexport(
        &self,
        req: Request<pb::UnexportRequest>,
    ) -> Result<Response<pb::UnexportResponse>, Status> {
        let r = req.into_inner();
        required("export_name", &r.export_name)?;
        self.run(move |n| n.unexport(&r.export_name).map(|()| pb::UnexportResponse {}))
            .await
    }

    async fn list_exports(
        &self,
        _: Request<pb::ListExportsRequest>,
    ) -> Result<Response<pb::ListExportsResponse>, Status> {
        self.run(|n| {
            n.list_exports()
                .map(|exports| pb::ListExportsResponse { exports })
        })
        .await
    }

    async fn stats(
        &self,
        _: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        self.run(|n| {
            let exports = n.list_exports()?;
            let reactors = n
                .reactor_times()
                .into_iter()
                .map(|r| pb::ReactorTimes {
                    core: r.core.get(),
                    busy_ns: r.busy_ns,
                    idle_ns: r.idle_ns,
                })
                .collect();
            Ok(pb::StatsResponse { exports, reactors })
        })
        .await
    }

    async fn create_nexus(
        &self,
        req: Request<pb::CreateNexusRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let r = req.into_inner();
        required("name", &r.name)?;
        if r.replicas.is_empty() {
            return Err(Status::invalid_argument(format!(
                "nexus '{}' needs at least one replica",
                r.name
            )));
        }
        self.run(move |n| n.create_nexus(r)).await
    }

    async fn destroy_nexus(
        &self,
        req: Request<pb::DestroyNexusRequest>,
    ) -> Result<Response<pb::DestroyNexusResponse>, Status> {
        let r = req.into_inner();
        required("name", &r.name)?;
        self.run(move |n| {
            n.destroy_nexus(&r.name)
                .map(|()| pb::DestroyNexusResponse {})
        })
        .await
    }

    async fn list_nexuses(
        &self,
        _: Request<pb::ListNexusesRequest>,
    ) -> Result<Response<pb::ListNexusesResponse>, Status> {
        self.run(|n| {
            n.list_nexuses()
                .map(|nexuses| pb::ListNexusesResponse { nexuses })
        })
        .await
    }

    async fn show_nexus(
        &self,
        req: Request<pb::ShowNexusRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let r = req.into_inner();
        required("name", &r.name)?;
        self.run(move |n| n.show_nexus(&r.name)).await
    }

    async fn add_replica(
        &self,
        req: Request<pb::AddReplicaRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let r = req.into_inner();
        required("nexus", &r.nexus)?;
        required("replica", &r.replica)?;
        self.run(move |n| n.add_replica(&r.nexus, &r.replica)).await
    }

    async fn remove_replica(
        &self,
        req: Request<pb::RemoveReplicaRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let r = req.into_inner();
        required("nexus", &r.nexus)?;
        required("replica", &r.replica)?;
        self.run(move |n| n.remove_replica(&r.nexus, &r.replica))
            .await
    }

    async fn promote_nexus(
        &self,
        req: Request<pb::PromoteNexusRequest>,
    ) -> Result<Response<pb::Nexus>, Status> {
        let r = req.into_inner();
        required("name", &r.name)?;
        self.run(move |n| n.promote_nexus(&r.name)).await
    }

    async fn verify_nexus(
        &self,
        req: Request<pb::VerifyNexusRequest>,
    ) -> Result<Response<pb::VerifyNexusResponse>, Status> {
        let r = req.into_inner();
        required("name", &r.name)?;
        self.run(move |n| n.verify_nexus(&r.name, r.repair)).await
    }

    async fn list_replicas(
        &self,
        _: Request<pb::ListReplicasRequest>,
    ) -> Result<Response<pb::ListReplicasResponse>, Status> {
        self.run(|n| {
            n.list_replicas()
                .map(|replicas| pb::ListReplicasResponse { replicas })
        })
        .await
    }

    async fn show_replica(
        &self,
        req: Request<pb::ShowReplicaRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let r = req.into_inner();
        required("name", &r.name)?;
        self.run(move |n| n.show_replica(&r.name)).await
    }

    async fn assign_replica(
        &self,
        req: Request<pb::AssignReplicaRequest>,
    ) -> Result<Response<pb::ReplicaInfo>, Status> {
        let r = req.into_inner();
        required("name", &r.name)?;
        self.run(move |n| n.assign_replica(&r.name, &r.opener))
            .await
    }

    async fn set_fault(
        &self,
        req: Request<pb::SetFaultRequest>,
    ) -> Result<Response<pb::SetFaultResponse>, Status> {
        let r = req.into_inner();
        required("name", &r.name)?;
        self.run(move |n| n.set_fault(r).map(|()| pb::SetFaultResponse {}))
            .await
    }
}
