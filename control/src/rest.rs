//! The control process's HTTP face: the REST API (axum), its OpenAPI document
//! (`/openapi.json`, hand-written in `openapi.json` beside this file; a test checks that it
//! documents exactly [`ROUTES`]) and the Prometheus metrics (`/metrics`).
//!
//! Request bodies are read as bytes and parsed by `cairn_control_api`'s parsers, the same
//! code the fuzz target drives, so a malformed body is a 400 with a JSON error naming the
//! problem and never reaches the store. Every error is `{"error": "..."}`.
//!
//! Every request passes [`authorise`] first: it logs the caller (`peer=admin:ops`, from the
//! client certificate under TLS; reads and heartbeats at debug, other mutations at info) and,
//! under TLS, admits `admin:` and `control:` identities to every route and `node:ID` only to
//! what nodes call ([`node_may`]); anything else is a 403 naming the identity
//! (docs/security.md).

use crate::election::Election;
use crate::insync::{self, InSyncError};
use crate::membership::{Membership, MembershipError};
use crate::reconcile::NodeClients;
use crate::store::{AnyStore, StoreError};
use crate::volume::{Outcome, VolumeError, Volumes};
use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Request, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use cairn_control_api::{self as api, ApiError, ErrorBody, LeaderView, NodeState};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The OpenAPI document served at `/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// Every route served, as (method, path) in axum's syntax; the OpenAPI document must list
/// exactly these (`tests::every_route_is_documented`).
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/v1/nodes"),
    ("get", "/v1/nodes/{id}"),
    ("post", "/v1/nodes/{id}/register"),
    ("post", "/v1/nodes/{id}/heartbeat"),
    ("get", "/v1/volumes/{name}/insync"),
    ("post", "/v1/volumes/{name}/insync"),
    ("get", "/v1/leader"),
    ("get", "/v1/volumes"),
    ("post", "/v1/volumes"),
    ("get", "/v1/volumes/{name}"),
    ("delete", "/v1/volumes/{name}"),
    ("post", "/v1/volumes/{name}/attach"),
    ("post", "/v1/volumes/{name}/detach"),
    ("post", "/v1/volumes/{name}/snapshot"),
    ("post", "/v1/volumes/{name}/clone"),
    ("post", "/v1/volumes/{name}/grow"),
    ("get", "/openapi.json"),
    ("get", "/metrics"),
];

/// What the handlers share.
pub struct App {
    pub membership: Membership,
    pub election: Arc<Election>,
    /// The store, for the records read and written by whole routes (the in-sync set).
    pub store: Arc<AnyStore>,
    /// In-sync reports recorded by this process, for /metrics.
    pub insync_reports: AtomicU64,
    /// Failovers the reconcile loop recorded in this process, for /metrics.
    pub failovers: Arc<AtomicU64>,
    pub volumes: Volumes,
    /// Admin API channels to the nodes (inspect's live rebuild progress; shared with the
    /// reconcile loop).
    pub clients: Arc<NodeClients>,
    /// Re-replication figures (shared with the reconcile loop), for /metrics.
    pub rereplication: Arc<crate::rereplicate::Counters>,
}

type AppState = State<Arc<App>>;

/// The router of every route in [`ROUTES`].
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{id}", get(get_node))
        .route("/v1/nodes/{id}/register", post(register))
        .route("/v1/nodes/{id}/heartbeat", post(heartbeat))
        .route(
            "/v1/volumes/{name}/insync",
            get(get_insync).post(report_insync),
        )
        .route("/v1/leader", get(leader))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(get_volume).delete(delete_volume))
        .route("/v1/volumes/{name}/attach", post(attach))
        .route("/v1/volumes/{name}/detach", post(detach))
        .route("/v1/volumes/{name}/snapshot", post(snapshot))
        .route("/v1/volumes/{name}/clone", post(clone_volume))
        .route("/v1/volumes/{name}/grow", post(grow))
        .route("/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
        .layer(DefaultBodyLimit::max(api::BODY_BYTES_MAX))
        .layer(axum::middleware::from_fn(authorise))
        .with_state(app)
}

/// Whether node `id` may call `method` on `path`: its own registration and heartbeats, the
/// in-sync records its nexuses keep, and who leads.
pub fn node_may(id: &str, method: &Method, path: &str) -> bool {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("POST", ["", "v1", "nodes", node, "register" | "heartbeat"]) => *node == id,
        ("GET" | "POST", ["", "v1", "volumes", _, "insync"]) | ("GET", ["", "v1", "leader"]) => {
            true
        }
        _ => false,
    }
}

/// Logs each request with its caller and, under TLS, refuses what the caller's identity may
/// not do.
async fn authorise(mut req: Request, next: axum::middleware::Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<crate::https::Peer>>()
        .map(|c| c.0.clone());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let quiet = method == Method::GET || path.ends_with("/heartbeat");
    let (who, addr) = match &peer {
        Some(p) if p.tls => (
            p.identity
                .as_ref()
                .map_or_else(|| "unnamed".to_string(), ToString::to_string),
            p.addr.to_string(),
        ),
        Some(p) => ("plain".to_string(), p.addr.to_string()),
        None => ("plain".to_string(), "-".to_string()),
    };
    if let Some(p) = peer.as_ref().filter(|p| p.tls) {
        let allowed = match &p.identity {
            Some(cairn_tls::Identity::Admin(_) | cairn_tls::Identity::Control(_)) => true,
            Some(cairn_tls::Identity::Node(id)) => node_may(id, &method, &path),
            None => false,
        };
        if let Some(cairn_tls::Identity::Node(id)) = &p.identity {
            req.extensions_mut().insert(CallerNode(id.clone()));
        }
        if !allowed {
            tracing::warn!(peer = %who, addr, %method, path, "REST request refused");
            return error(
                StatusCode::FORBIDDEN,
                format!("{who} may not {method} {path}"),
            );
        }
    }
    if quiet {
        tracing::debug!(peer = %who, addr, %method, path, "REST request");
    } else {
        tracing::info!(peer = %who, addr, %method, path, "REST request");
    }
    next.run(req).await
}

fn error(status: StatusCode, message: impl ToString) -> Response {
    (
        status,
        Json(ErrorBody {
            error: message.to_string(),
        }),
    )
        .into_response()
}

fn bad_request(e: &ApiError) -> Response {
    error(StatusCode::BAD_REQUEST, e)
}

impl IntoResponse for MembershipError {
    fn into_response(self) -> Response {
        let status = match &self {
            MembershipError::Conflict { .. } => StatusCode::CONFLICT,
            MembershipError::UnknownNode(_) => StatusCode::NOT_FOUND,
            MembershipError::StaleIncarnation { .. } | MembershipError::LeaseExpired { .. } => {
                StatusCode::GONE
            }
            MembershipError::Corrupt { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            MembershipError::Contended { .. } | MembershipError::Store(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        error(status, self)
    }
}

impl IntoResponse for InSyncError {
    fn into_response(self) -> Response {
        let status = match &self {
            InSyncError::StaleEpoch { .. } | InSyncError::StaleGeneration { .. } => {
                StatusCode::CONFLICT
            }
            InSyncError::UnknownAddress { .. } | InSyncError::SameNode { .. } => {
                StatusCode::BAD_REQUEST
            }
            InSyncError::NotFound(_) => StatusCode::NOT_FOUND,
            InSyncError::Corrupt { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            InSyncError::Contended { .. } | InSyncError::Store(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        error(status, self)
    }
}

impl IntoResponse for VolumeError {
    fn into_response(self) -> Response {
        let status = match &self {
            VolumeError::Unknown(_)
            | VolumeError::UnknownNode(_)
            | VolumeError::UnknownSnapshot { .. } => StatusCode::NOT_FOUND,
            VolumeError::Conflict { .. }
            | VolumeError::Placement { .. }
            | VolumeError::NodeDown { .. }
            | VolumeError::NoNbd { .. }
            | VolumeError::Attached { .. }
            | VolumeError::NotReady { .. }
            | VolumeError::BadHint { .. }
            | VolumeError::Deleting(_)
            | VolumeError::HasClones { .. } => StatusCode::CONFLICT,
            VolumeError::TooLarge { .. } | VolumeError::Shrink { .. } => StatusCode::BAD_REQUEST,
            VolumeError::NotLeader { .. } | VolumeError::Contended(_) | VolumeError::Store(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            VolumeError::Corrupt { .. } | VolumeError::EpochExhausted { .. } => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        error(status, self)
    }
}

/// The answer to a volume command: 201 when `created_status` and the command wrote a new
/// record, else 200; the volume as inspect shows it.
fn outcome(r: Result<Outcome, VolumeError>, created_status: bool) -> Response {
    match r {
        Ok(o) if o.changed && created_status => (StatusCode::CREATED, Json(o.view)).into_response(),
        Ok(o) => Json(o.view).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The 400 for a volume name that is not a valid name, None for a good one.
fn bad_volume_name(name: &str) -> Option<Response> {
    api::check_name("volume name", name)
        .err()
        .map(|e| bad_request(&e))
}

/// The 400 for a node id that is not a valid name, None for a good one.
fn bad_node_id(id: &str) -> Option<Response> {
    api::check_name("node id", id)
        .err()
        .map(|e| bad_request(&e))
}

async fn list_nodes(State(app): AppState) -> Response {
    match app.membership.list().await {
        Ok(nodes) => Json(nodes).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn get_node(State(app): AppState, Path(id): Path<String>) -> Response {
    if let Some(r) = bad_node_id(&id) {
        return r;
    }
    match app.membership.list().await {
        Ok(nodes) => match nodes.into_iter().find(|n| n.id == id) {
            Some(n) => Json(n).into_response(),
            None => MembershipError::UnknownNode(id).into_response(),
        },
        Err(e) => e.into_response(),
    }
}

async fn register(State(app): AppState, Path(id): Path<String>, body: Bytes) -> Response {
    if let Some(r) = bad_node_id(&id) {
        return r;
    }
    let req = match api::parse_register(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(&e),
    };
    match app.membership.register(&id, req).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn heartbeat(State(app): AppState, Path(id): Path<String>, body: Bytes) -> Response {
    if let Some(r) = bad_node_id(&id) {
        return r;
    }
    let req = match api::parse_heartbeat(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(&e),
    };
    match app.membership.heartbeat(&id, req).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn get_insync(State(app): AppState, Path(name): Path<String>) -> Response {
    if let Some(r) = bad_volume_name(&name) {
        return r;
    }
    match insync::read(&*app.store, &name).await {
        Ok(Some((rec, rev))) => Json(insync::view(rec, rev)).into_response(),
        Ok(None) => InSyncError::NotFound(name).into_response(),
        Err(e) => e.into_response(),
    }
}

/// The node a request came from, when its TLS certificate names one (set by `authorise`).
#[derive(Clone)]
struct CallerNode(String);

async fn report_insync(
    State(app): AppState,
    Path(name): Path<String>,
    caller: Option<Extension<CallerNode>>,
    body: Bytes,
) -> Response {
    if let Some(r) = bad_volume_name(&name) {
        return r;
    }
    let req = match api::parse_insync_report(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(&e),
    };
    // A node reports only for itself, and only for a volume attached to it: the in-sync
    // record steers failover and replica assignment, so no other node may write it.
    if let Some(Extension(CallerNode(node))) = caller {
        let attached = match crate::volume::read(&app.store, &name).await {
            Ok(v) => v.and_then(|(rec, _)| rec.attached).map(|a| a.node),
            Err(e) => return e.into_response(),
        };
        if req.node != node || attached.as_deref() != Some(node.as_str()) {
            tracing::warn!(volume = %name, caller = %node, reported_for = %req.node, attached = attached.as_deref().unwrap_or("-"), "in-sync report refused: not the volume's attach node");
            return error(
                StatusCode::FORBIDDEN,
                format!(
                    "node:{node} may not report in-sync replicas of volume '{name}' for node '{}': only its attach node ({}) may",
                    req.node,
                    attached.as_deref().unwrap_or("none")
                ),
            );
        }
    }
    match insync::record(&*app.store, &name, &req).await {
        Ok((rec, rev)) => {
            app.insync_reports.fetch_add(1, Ordering::Relaxed);
            Json(insync::view(rec, rev)).into_response()
        }
        Err(e) => {
            tracing::warn!(volume = %name, node = %req.node, error = %e, "in-sync report refused");
            e.into_response()
        }
    }
}

async fn leader(State(app): AppState) -> Response {
    match app.election.leader().await {
        Ok(leader) => Json(LeaderView {
            this: app.election.me().id.clone(),
            is_leader: app.election.current().is_some(),
            leader,
        })
        .into_response(),
        Err(e) => MembershipError::Store(e).into_response(),
    }
}

async fn list_volumes(State(app): AppState) -> Response {
    match app.volumes.list().await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn create_volume(State(app): AppState, body: Bytes) -> Response {
    match api::parse_create_volume(&body) {
        Ok(req) => outcome(app.volumes.create(&req).await, true),
        Err(e) => bad_request(&e),
    }
}

/// Inspect: the record as the REST API shows it, with the attach node's resync progress when
/// it answers within `reconcile::SHOW_TIMEOUT`.
async fn get_volume(State(app): AppState, Path(name): Path<String>) -> Response {
    if let Some(r) = bad_volume_name(&name) {
        return r;
    }
    let record = match app.volumes.get(&name).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let mut view = match app.volumes.view_of(&record).await {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    if let Some(at) = record.nexus_node() {
        if let Ok(nodes) = app.membership.records().await {
            if let Some(n) = nodes.iter().find(|n| n.id == at) {
                view.rebuild = app.clients.rebuild(n, &name).await;
            }
        }
    }
    Json(view).into_response()
}

async fn delete_volume(State(app): AppState, Path(name): Path<String>) -> Response {
    if let Some(r) = bad_volume_name(&name) {
        return r;
    }
    outcome(app.volumes.delete(&name).await, false)
}

async fn attach(State(app): AppState, Path(name): Path<String>, body: Bytes) -> Response {
    if let Some(r) = bad_volume_name(&name) {
        return r;
    }
    match api::parse_attach(&body) {
        Ok(req) => outcome(
            app.volumes
                .attach(&name, req.node.as_deref(), req.failover_to.as_deref())
                .await,
            false,
        ),
        Err(e) => bad_request(&e),
    }
}

async fn detach(State(app): AppState, Path(name): Path<String>) -> Response {
    if let Some(r) = bad_volume_name(&name) {
        return r;
    }
    outcome(app.volumes.detach(&name).await, false)
}

async fn snapshot(State(app): AppState, Path(name): Path<String>, body: Bytes) -> Response {
    if let Some(r) = bad_volume_name(&name) {
        return r;
    }
    match api::parse_snapshot(&body) {
        Ok(req) => outcome(app.volumes.snapshot(&name, &req.name).await, false),
        Err(e) => bad_request(&e),
    }
}

async fn clone_volume(State(app): AppState, Path(name): Path<String>, body: Bytes) -> Response {
    if let Some(r) = bad_volume_name(&name) {
        return r;
    }
    match api::parse_clone(&body) {
        Ok(req) => outcome(
            app.volumes
                .clone_volume(&name, &req.snapshot, &req.name)
                .await,
            true,
        ),
        Err(e) => bad_request(&e),
    }
}

async fn grow(State(app): AppState, Path(name): Path<String>, body: Bytes) -> Response {
    if let Some(r) = bad_volume_name(&name) {
        return r;
    }
    match api::parse_grow(&body) {
        Ok(req) => outcome(app.volumes.grow(&name, req.size_bytes).await, false),
        Err(e) => bad_request(&e),
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

async fn metrics(State(app): AppState) -> Response {
    match metrics_text(&app).await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => MembershipError::Store(e).into_response(),
    }
}

/// The Prometheus text exposition of the control process.
async fn metrics_text(app: &App) -> Result<String, StoreError> {
    let records = match app.membership.records().await {
        Ok(r) => r,
        Err(MembershipError::Store(e)) => return Err(e),
        Err(e) => {
            return Err(StoreError::Backend {
                store: "records",
                op: "metrics",
                detail: e.to_string(),
            })
        }
    };
    let volumes = app.volumes.list().await.map_err(|e| StoreError::Backend {
        store: "records",
        op: "metrics",
        detail: e.to_string(),
    })?;
    let mut health = [0u64; 4];
    for v in &volumes {
        health[volume_health(v)] += 1;
    }
    let up = records.iter().filter(|r| r.state == NodeState::Up).count();
    let down = records.len() - up;
    let c = &app.membership.counters;
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    family(
        "cairn_control_nodes",
        "gauge",
        "Registered nodes by state (up: lease alive; down: lease expired).",
        &[
            ("{state=\"up\"}", up as u64),
            ("{state=\"down\"}", down as u64),
        ],
    );
    family(
        "cairn_control_volumes",
        "gauge",
        "Volumes by health (healthy: every wanted replica in sync; degraded: some; unavailable: none; deleting).",
        &[
            ("{health=\"healthy\"}", health[0]),
            ("{health=\"degraded\"}", health[1]),
            ("{health=\"unavailable\"}", health[2]),
            ("{health=\"deleting\"}", health[3]),
        ],
    );
    family(
        "cairn_control_leader",
        "gauge",
        "1 while this control process is the leader, else 0.",
        &[("", u64::from(app.election.current().is_some()))],
    );
    family(
        "cairn_control_leader_terms_total",
        "counter",
        "Times this control process became the leader.",
        &[("", app.election.won_total())],
    );
    family(
        "cairn_control_registrations_total",
        "counter",
        "Node registrations accepted by this control process.",
        &[("", c.registrations.load(Ordering::Relaxed))],
    );
    family(
        "cairn_control_heartbeats_total",
        "counter",
        "Node heartbeats that renewed a lease, served by this control process.",
        &[("", c.heartbeats.load(Ordering::Relaxed))],
    );
    family(
        "cairn_control_insync_reports_total",
        "counter",
        "Nexus in-sync reports this control process recorded in the store.",
        &[("", app.insync_reports.load(Ordering::Relaxed))],
    );
    family(
        "cairn_control_failovers_total",
        "counter",
        "Volumes moved to a new attach node (a replica the in-sync record names in sync) by this control process as leader, after their attach node was marked down.",
        &[("", app.failovers.load(Ordering::Relaxed))],
    );
    family(
        "cairn_control_nodes_marked_down_total",
        "counter",
        "Nodes this control process marked down as leader after their lease expired.",
        &[("", c.marked_down.load(Ordering::Relaxed))],
    );
    family(
        "cairn_control_pool_updates_total",
        "counter",
        "Node records rewritten because a heartbeat reported other pool capacity.",
        &[("", c.pool_updates.load(Ordering::Relaxed))],
    );
    let r = &app.rereplication;
    family(
        "cairn_control_replicas_replaced_total",
        "counter",
        "Replicas whose node was down past --replica-grace, replaced by a new one by this control process.",
        &[("", r.replaced.load(Ordering::Relaxed))],
    );
    family(
        "cairn_control_rebuild_bytes_total",
        "counter",
        "Bytes copied by the full rebuilds (replacement replicas, replicas a new nexus did not trust) of the nexuses this control process saw as leader.",
        &[("", r.rebuild_bytes.load(Ordering::Relaxed))],
    );
    Ok(out)
}

/// The index of `v`'s health in the `cairn_control_volumes` series: 0 healthy, 1 degraded,
/// 2 unavailable, 3 deleting.
fn volume_health(v: &api::VolumeView) -> usize {
    let in_sync = v
        .replicas
        .iter()
        .filter(|r| r.state == api::ReplicaHealth::InSync)
        .count();
    if v.deleting {
        3
    } else if in_sync == 0 {
        2
    } else if in_sync < v.replicas_wanted as usize {
        1
    } else {
        0
    }
}

async fn no_route(method: Method, uri: Uri) -> Response {
    error(StatusCode::NOT_FOUND, format!("no route {method} {uri}"))
}

async fn no_method(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{uri} does not take {method}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn every_route_is_documented() {
        let doc: serde_json::Value =
            serde_json::from_str(OPENAPI_JSON).expect("openapi.json parses");
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
        let documented: BTreeSet<(String, String)> = doc["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object()
                    .expect("operations")
                    .keys()
                    .filter(|k| *k != "parameters")
                    .map(move |m| (m.clone(), path.clone()))
            })
            .collect();
        let served: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        assert_eq!(documented, served, "openapi.json and ROUTES differ");
    }
}
