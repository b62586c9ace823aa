//! The control process's REST interface as both sides see it: the request and response bodies
//! ([`RegisterRequest`], [`HeartbeatRequest`], [`NodeView`], [`InSyncReport`],
//! [`CreateVolumeRequest`], [`VolumeView`] …), the one parser of each request body
//! ([`parse_register`], [`parse_heartbeat`], [`parse_insync_report`], [`parse_create_volume`],
//! [`parse_attach`], [`parse_snapshot`], [`parse_clone`], [`parse_grow`]) and a small blocking
//! HTTP/1.1 client ([`client`]).
//!
//! It is a crate of its own so that `cairn-node` (which registers and heartbeats) and the fuzz
//! target can use the wire types without linking the control process (axum, etcd, redb). The
//! server calls the same parsers the fuzzer drives: a malformed body is an [`ApiError`] that
//! names the field and the value, never a panic.

pub mod client;

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

/// Where `cairn-control` listens by default.
pub const CONTROL_LISTEN_DEFAULT: &str = "127.0.0.1:10800";
/// The control URL `cairn-node --control` and `cairnctl --control` mean by default.
pub const CONTROL_URL_DEFAULT: &str = "http://127.0.0.1:10800";
/// Where the kernel tells this machine's name (used as the default zone and rack).
const HOSTNAME_PATH: &str = "/proc/sys/kernel/hostname";

/// Longest node id, zone or rack name accepted (bytes). Longer ones are refused with 400.
pub const NAME_LEN_MAX: usize = 63;
/// Most pools one node may report. More are refused with 400.
pub const POOLS_MAX: usize = 64;
/// Largest request body the control process reads (bytes); larger ones get 413.
pub const BODY_BYTES_MAX: usize = 64 * 1024;
/// Most replicas a volume may have, and one in-sync report may name (a nexus has at most 3
/// children); more are refused with 400.
pub const REPLICAS_MAX: u32 = 3;
/// The highest epoch a volume's record may reach: the highest a replica accepts
/// (`cairn_replication::proto::EPOCH_MAX`; cairn-node's tests check that the two agree). The
/// control process raises an epoch only below it, so no attach or failover can wrap one.
pub const EPOCH_MAX: u64 = 1 << 48;
/// Longest replica address accepted in a report (bytes): `local` or HOST:PORT.
pub const ADDRESS_LEN_MAX: usize = 255;

/// A request the control process refuses, with what is wrong in it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApiError {
    #[error("body is not valid JSON for {what}: {why}")]
    Json { what: &'static str, why: String },
    #[error("{what} '{value}' is invalid: {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: &'static str,
    },
}

/// The error body of every 4xx and 5xx answer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: String,
}

/// Where a node can be reached: its NBD listener and replica server (absent when off) and its
/// admin API. Addresses are `IP:PORT`, as the node bound them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeAddresses {
    pub admin: String,
    #[serde(default)]
    pub nbd: Option<String>,
    #[serde(default)]
    pub replica: Option<String>,
}

impl std::fmt::Display for NodeAddresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let or_dash = |a: &Option<String>| a.clone().unwrap_or_else(|| "-".into());
        write!(
            f,
            "admin={} replica={} nbd={}",
            self.admin,
            or_dash(&self.replica),
            or_dash(&self.nbd)
        )
    }
}

/// One pool of a node and its free capacity, as placement will weigh it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PoolCapacity {
    pub name: String,
    pub size_bytes: u64,
    pub free_bytes: u64,
}

/// `POST /v1/nodes/{id}/register`: a node announces itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub addresses: NodeAddresses,
    pub zone: String,
    pub rack: String,
    #[serde(default)]
    pub pools: Vec<PoolCapacity>,
}

/// The answer to a registration: the lease the node must keep alive.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegisterResponse {
    pub node_id: String,
    /// Counts this node's registrations; a heartbeat names the one it keeps alive.
    pub incarnation: u64,
    pub lease_ttl_ms: u64,
    pub heartbeat_interval_ms: u64,
}

/// `POST /v1/nodes/{id}/heartbeat`: keeps the registration `incarnation` alive, and reports
/// the node's pools with their current free capacity (absent: unchanged since the last report).
/// The control process writes the node record only when they differ from what it holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    pub incarnation: u64,
    #[serde(default)]
    pub pools: Option<Vec<PoolCapacity>>,
}

/// The answer to a heartbeat that kept the lease alive.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HeartbeatResponse {
    pub lease_ttl_ms: u64,
}

/// Whether a node's lease is alive.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Up,
    Down,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Up => "up",
            NodeState::Down => "down",
        }
    }
}

/// A node as `GET /v1/nodes` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeView {
    pub id: String,
    pub state: NodeState,
    pub zone: String,
    pub rack: String,
    pub addresses: NodeAddresses,
    pub pools: Vec<PoolCapacity>,
    pub free_bytes: u64,
    pub incarnation: u64,
    /// Milliseconds since this control process last saw the node's heartbeat; null when it
    /// has seen none since it started (another control process may have).
    pub last_heartbeat_age_ms: Option<u64>,
    /// When the node was last marked down (Unix milliseconds), null while it is up.
    pub down_since_unix_ms: Option<u64>,
}

/// `GET /v1/leader`: which control process decides, as this one sees it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaderView {
    /// This control process's id.
    pub this: String,
    pub is_leader: bool,
    /// The current leader's id and REST address, null while there is none.
    pub leader: Option<LeaderInfo>,
}

/// The leader's identity, as stored under the election key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaderInfo {
    pub id: String,
    pub listen: String,
}

/// A replica's state in an in-sync report.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    /// Holds every acknowledged write and the report's generation.
    InSync,
    /// Faulted, being resynced or rebuilt, or not given the current generation yet.
    OutOfSync,
}

/// One replica of a nexus in an in-sync report, by the address the nexus was given.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ReplicaInSync {
    /// `local` (the reporting node's own replica) or HOST:PORT of a replica server.
    pub address: String,
    pub state: SyncState,
}

/// `POST /v1/volumes/{name}/insync`: a nexus reports its in-sync set (through its node).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InSyncReport {
    /// The reporting node's id: what `local` means.
    pub node: String,
    /// The nexus's epoch; a record of a higher epoch refuses the report (409).
    pub epoch: u64,
    /// The data generation every in-sync replica holds durably.
    pub generation: u64,
    pub replicas: Vec<ReplicaInSync>,
}

/// The durable in-sync record of a volume, as `GET /v1/volumes/{name}/insync` and the answer
/// to a report show it (the store's `insync/{name}` value).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InSyncView {
    pub volume: String,
    pub epoch: u64,
    pub generation: u64,
    /// Node ids of the replicas that hold every acknowledged write.
    pub in_sync: Vec<String>,
    /// Node ids of the replicas that missed writes (or were not given the generation yet).
    pub out_of_sync: Vec<String>,
    pub updated_unix_ms: u64,
    /// The store revision of the record.
    pub revision: u64,
}

/// Parses and checks an in-sync report: a valid node id, an epoch and a generation of at
/// least 1, 1 to [`REPLICAS_MAX`] replicas with distinct addresses (`local` or HOST:PORT),
/// at least one of them in sync.
pub fn parse_insync_report(body: &[u8]) -> Result<InSyncReport, ApiError> {
    let r: InSyncReport = from_json("an in-sync report", body)?;
    check_name("node id", &r.node)?;
    for (what, v) in [("epoch", r.epoch), ("generation", r.generation)] {
        if v == 0 {
            return Err(ApiError::Invalid {
                what,
                value: "0".into(),
                why: "must be 1 or more",
            });
        }
    }
    if r.replicas.is_empty() || r.replicas.len() > REPLICAS_MAX as usize {
        return Err(ApiError::Invalid {
            what: "replica count",
            value: r.replicas.len().to_string(),
            why: "a nexus has 1 to 3 replicas",
        });
    }
    for (i, rep) in r.replicas.iter().enumerate() {
        check_replica_address(&rep.address)?;
        if r.replicas[..i].iter().any(|o| o.address == rep.address) {
            return Err(ApiError::Invalid {
                what: "replica address",
                value: rep.address.clone(),
                why: "listed twice",
            });
        }
    }
    if !r.replicas.iter().any(|rep| rep.state == SyncState::InSync) {
        return Err(ApiError::Invalid {
            what: "replicas",
            value: format!("{} out of sync", r.replicas.len()),
            why: "a report names at least one replica in sync",
        });
    }
    Ok(r)
}

/// `local` or HOST:PORT (a name or an IP, a numeric port above 0), as a nexus is given its
/// replicas.
fn check_replica_address(addr: &str) -> Result<(), ApiError> {
    if addr == "local" {
        return Ok(());
    }
    let bad = |why| ApiError::Invalid {
        what: "replica address",
        value: addr.chars().take(ADDRESS_LEN_MAX + 1).collect(),
        why,
    };
    if addr.len() > ADDRESS_LEN_MAX {
        return Err(bad("longer than 255 bytes"));
    }
    match addr.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty()
                && host.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'[' | b']' | b':')
                })
                && port.parse::<u16>().is_ok_and(|p| p != 0) =>
        {
            Ok(())
        }
        _ => Err(bad("neither 'local' nor HOST:PORT")),
    }
}

/// Parses and checks a registration body.
pub fn parse_register(body: &[u8]) -> Result<RegisterRequest, ApiError> {
    let r: RegisterRequest = from_json("a registration", body)?;
    check_addr("admin address", &r.addresses.admin)?;
    for a in [&r.addresses.nbd, &r.addresses.replica]
        .into_iter()
        .flatten()
    {
        check_addr("address", a)?;
    }
    check_name("zone", &r.zone)?;
    check_name("rack", &r.rack)?;
    check_pools(&r.pools)?;
    Ok(r)
}

/// Parses and checks a heartbeat body.
pub fn parse_heartbeat(body: &[u8]) -> Result<HeartbeatRequest, ApiError> {
    let h: HeartbeatRequest = from_json("a heartbeat", body)?;
    if let Some(pools) = &h.pools {
        check_pools(pools)?;
    }
    Ok(h)
}

/// Checks a node's pool report: at most [`POOLS_MAX`] pools, each with a valid name and no
/// more free bytes than its size.
fn check_pools(pools: &[PoolCapacity]) -> Result<(), ApiError> {
    if pools.len() > POOLS_MAX {
        return Err(ApiError::Invalid {
            what: "pool count",
            value: pools.len().to_string(),
            why: "more than POOLS_MAX (64)",
        });
    }
    for p in pools {
        check_name("pool name", &p.name)?;
        if p.free_bytes > p.size_bytes {
            return Err(ApiError::Invalid {
                what: "pool free_bytes",
                value: format!("{} of {} in pool {}", p.free_bytes, p.size_bytes, p.name),
                why: "more free than its size",
            });
        }
    }
    Ok(())
}

/// The block size every replicated volume's size is a multiple of (the nexus's block).
pub const VOLUME_BLOCK_BYTES: u64 = 4096;

/// `POST /v1/volumes`: create a replicated volume (idempotent by name).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CreateVolumeRequest {
    pub name: String,
    pub size_bytes: u64,
    /// 1 to [`REPLICAS_MAX`], each on its own node.
    pub replicas: u32,
    /// Only nodes of this zone hold the replicas.
    #[serde(default)]
    pub zone: Option<String>,
}

/// `POST /v1/volumes/{name}/attach`: where to open the volume's nexus; with no node the
/// control process picks one, preferring a node that holds a replica.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    #[serde(default)]
    pub node: Option<String>,
    /// The failover hint: if the attach node is lost, the nexus moves to this replica node
    /// when it holds an in-sync replica and is up (else to the first such replica).
    #[serde(default)]
    pub failover_to: Option<String>,
}

/// `POST /v1/volumes/{name}/snapshot`: a frozen copy of the volume on each replica.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    pub name: String,
}

/// `POST /v1/volumes/{name}/clone`: a new writable volume from a snapshot of this one, on the
/// same nodes (a clone shares the snapshot's clusters, so it lives beside it).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    pub snapshot: String,
    pub name: String,
}

/// `POST /v1/volumes/{name}/grow`: the new, larger size.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GrowRequest {
    pub size_bytes: u64,
}

/// A replica's health as inspect reports it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaHealth {
    /// Holds every acknowledged write; may serve and be a resync source.
    InSync,
    /// Missed writes, or its node is down: never read from until resynced.
    Faulted,
    /// Being created or resynced; in sync once done.
    Rebuilding,
}

impl ReplicaHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicaHealth::InSync => "in_sync",
            ReplicaHealth::Faulted => "faulted",
            ReplicaHealth::Rebuilding => "rebuilding",
        }
    }
}

/// One replica of a volume as inspect shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReplicaView {
    pub node: String,
    pub state: ReplicaHealth,
    /// The record's placement state: `creating`, `created` or `deleting`.
    pub placement: String,
    pub zone: Option<String>,
    pub rack: Option<String>,
}

/// Where a volume's nexus is open.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachView {
    pub node: String,
    /// `nbd://HOST:PORT/NAME` once the nexus is exported, null until then.
    pub nbd_uri: Option<String>,
    /// The failover hint given at attach, if any.
    #[serde(default)]
    pub failover_to: Option<String>,
}

/// A snapshot of a volume as inspect shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotView {
    pub name: String,
    /// The nodes whose replica has it; complete when every replica node is listed.
    pub nodes: Vec<String>,
}

/// A resync in progress on the volume's nexus, from the attach node's ShowNexus.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RebuildView {
    pub replica: String,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub bytes_per_s: f64,
    pub eta_s: f64,
}

/// `GET /v1/volumes/{name}` and each item of `GET /v1/volumes`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VolumeView {
    pub name: String,
    pub size_bytes: u64,
    pub replicas_wanted: u32,
    pub zone: Option<String>,
    pub epoch: u64,
    pub replicas: Vec<ReplicaView>,
    pub attached: Option<AttachView>,
    pub snapshots: Vec<SnapshotView>,
    /// The `(volume, snapshot)` a clone was made from.
    pub origin: Option<(String, String)>,
    /// True once delete is recorded, until the last replica is gone.
    pub deleting: bool,
    pub created_unix_ms: u64,
    /// Present while the attach node's nexus resyncs a replica (inspect only).
    #[serde(default)]
    pub rebuild: Option<RebuildView>,
}

/// Parses and checks a volume creation body.
pub fn parse_create_volume(body: &[u8]) -> Result<CreateVolumeRequest, ApiError> {
    let r: CreateVolumeRequest = from_json("a volume creation", body)?;
    check_name("volume name", &r.name)?;
    check_volume_size(r.size_bytes)?;
    if r.replicas == 0 || r.replicas > REPLICAS_MAX {
        return Err(ApiError::Invalid {
            what: "replica count",
            value: r.replicas.to_string(),
            why: "must be 1 to REPLICAS_MAX (3)",
        });
    }
    if let Some(z) = &r.zone {
        check_name("zone", z)?;
    }
    Ok(r)
}

/// Parses an attach body (an empty body means `{}`: the control process picks the node).
pub fn parse_attach(body: &[u8]) -> Result<AttachRequest, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(AttachRequest::default());
    }
    let r: AttachRequest = from_json("an attach", body)?;
    for n in r.node.iter().chain(&r.failover_to) {
        check_name("node id", n)?;
    }
    if let Some(hint) = r
        .failover_to
        .as_ref()
        .filter(|h| r.node.as_ref() == Some(*h))
    {
        return Err(ApiError::Invalid {
            what: "failover_to",
            value: hint.clone(),
            why: "is the attach node itself; name another replica node",
        });
    }
    Ok(r)
}

/// Parses a snapshot body.
pub fn parse_snapshot(body: &[u8]) -> Result<SnapshotRequest, ApiError> {
    let r: SnapshotRequest = from_json("a snapshot", body)?;
    check_name("snapshot name", &r.name)?;
    Ok(r)
}

/// Parses a clone body.
pub fn parse_clone(body: &[u8]) -> Result<CloneRequest, ApiError> {
    let r: CloneRequest = from_json("a clone", body)?;
    check_name("snapshot name", &r.snapshot)?;
    check_name("volume name", &r.name)?;
    Ok(r)
}

/// Parses a grow body.
pub fn parse_grow(body: &[u8]) -> Result<GrowRequest, ApiError> {
    let r: GrowRequest = from_json("a grow", body)?;
    check_volume_size(r.size_bytes)?;
    Ok(r)
}

/// A volume size is a positive multiple of [`VOLUME_BLOCK_BYTES`].
pub fn check_volume_size(size_bytes: u64) -> Result<(), ApiError> {
    let why = if size_bytes < VOLUME_BLOCK_BYTES {
        "below the block size (4096 bytes)"
    } else if !size_bytes.is_multiple_of(VOLUME_BLOCK_BYTES) {
        "not a multiple of the block size (4096 bytes)"
    } else {
        return Ok(());
    };
    Err(ApiError::Invalid {
        what: "volume size_bytes",
        value: size_bytes.to_string(),
        why,
    })
}

/// Checks a node id (the path segment of `/v1/nodes/{id}/…`), a zone, a rack or a pool name:
/// 1 to [`NAME_LEN_MAX`] bytes of ASCII letters, digits, `-`, `_` and `.`, so that it is safe
/// in a store key and a URL without escaping.
pub fn check_name(what: &'static str, name: &str) -> Result<(), ApiError> {
    let why = if name.is_empty() {
        "empty"
    } else if name.len() > NAME_LEN_MAX {
        "longer than 63 bytes"
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        "only letters, digits, '-', '_' and '.' are allowed"
    } else {
        return Ok(());
    };
    Err(ApiError::Invalid {
        what,
        value: name.chars().take(NAME_LEN_MAX + 1).collect(),
        why,
    })
}

/// This machine's host name, the default failure domain (zone and rack) of a node that names
/// none, and part of a control process's id; `localhost` when the kernel does not say.
pub fn hostname() -> String {
    std::fs::read_to_string(HOSTNAME_PATH)
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| check_name("hostname", h).is_ok())
        .unwrap_or_else(|| "localhost".to_string())
}

fn check_addr(what: &'static str, addr: &str) -> Result<(), ApiError> {
    match addr.parse::<SocketAddr>() {
        Ok(a) if a.port() != 0 => Ok(()),
        Ok(_) => Err(ApiError::Invalid {
            what,
            value: addr.to_string(),
            why: "port 0 is not an address anyone can reach",
        }),
        Err(_) => Err(ApiError::Invalid {
            what,
            value: addr.chars().take(NAME_LEN_MAX + 1).collect(),
            why: "not IP:PORT",
        }),
    }
}

fn from_json<T: serde::de::DeserializeOwned>(
    what: &'static str,
    body: &[u8],
) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::Json {
        what,
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register_json() -> serde_json::Value {
        serde_json::json!({
            "addresses": {"admin": "127.0.0.1:10810", "nbd": "127.0.0.1:10809", "replica": null},
            "zone": "z1", "rack": "r1",
            "pools": [{"name": "pool0", "size_bytes": 100, "free_bytes": 40}]
        })
    }

    #[test]
    fn a_good_registration_parses() {
        let r = parse_register(register_json().to_string().as_bytes()).unwrap();
        assert_eq!(r.addresses.admin, "127.0.0.1:10810");
        assert_eq!(r.pools[0].free_bytes, 40);
    }

    #[test]
    fn bad_registrations_name_the_problem() {
        let cases: [(&str, serde_json::Value, &str); 6] = [
            (
                "/addresses/admin",
                "nowhere".into(),
                "admin address 'nowhere'",
            ),
            ("/zone", "".into(), "zone '' is invalid: empty"),
            ("/rack", "a/b".into(), "rack 'a/b'"),
            ("/pools/0/free_bytes", 200.into(), "more free than its size"),
            ("/extra", 1.into(), "unknown field `extra`"),
            ("/addresses/nbd", "127.0.0.1:0".into(), "port 0"),
        ];
        for (pointer, value, expect) in cases {
            let mut body = register_json();
            let (parent, field) = pointer.rsplit_once('/').unwrap();
            let target = if parent.is_empty() {
                &mut body
            } else {
                body.pointer_mut(parent).unwrap()
            };
            target[field] = value;
            let err = parse_register(body.to_string().as_bytes()).unwrap_err();
            assert!(err.to_string().contains(expect), "{pointer}: {err}");
        }
        let err = parse_register(b"{").unwrap_err();
        assert!(err.to_string().contains("not valid JSON"), "{err}");
    }

    fn report_json() -> serde_json::Value {
        serde_json::json!({
            "node": "n1", "epoch": 2, "generation": 5,
            "replicas": [
                {"address": "local", "state": "in_sync"},
                {"address": "127.0.0.1:10820", "state": "out_of_sync"}
            ]
        })
    }

    #[test]
    fn a_good_insync_report_parses() {
        let r = parse_insync_report(report_json().to_string().as_bytes()).unwrap();
        assert_eq!((r.epoch, r.generation), (2, 5));
        assert_eq!(r.replicas[1].state, SyncState::OutOfSync);
    }

    #[test]
    fn bad_insync_reports_name_the_problem() {
        let cases: [(&str, serde_json::Value, &str); 7] = [
            ("/epoch", 0.into(), "epoch '0'"),
            ("/generation", 0.into(), "generation '0'"),
            ("/node", "a b".into(), "node id 'a b'"),
            (
                "/replicas/1/address",
                "nowhere".into(),
                "replica address 'nowhere'",
            ),
            ("/replicas/1/address", "local".into(), "listed twice"),
            (
                "/replicas/0/state",
                "out_of_sync".into(),
                "at least one replica in sync",
            ),
            ("/replicas/0/state", "gone".into(), "unknown variant"),
        ];
        for (pointer, value, expect) in cases {
            let mut body = report_json();
            let (parent, field) = pointer.rsplit_once('/').unwrap();
            body.pointer_mut(parent).unwrap()[field] = value;
            let err = parse_insync_report(body.to_string().as_bytes()).unwrap_err();
            assert!(err.to_string().contains(expect), "{pointer}: {err}");
        }
        let mut body = report_json();
        body["replicas"] = serde_json::json!([]);
        let err = parse_insync_report(body.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("1 to 3 replicas"), "{err}");
    }

    #[test]
    fn heartbeats_carry_pools_checked_like_a_registration() {
        let h = parse_heartbeat(br#"{"incarnation": 3}"#).unwrap();
        assert_eq!((h.incarnation, h.pools), (3, None));
        let h = parse_heartbeat(
            br#"{"incarnation": 3, "pools": [{"name": "pool0", "size_bytes": 100, "free_bytes": 40}]}"#,
        )
        .unwrap();
        assert_eq!(h.pools.unwrap()[0].free_bytes, 40);
        let err = parse_heartbeat(
            br#"{"incarnation": 3, "pools": [{"name": "pool0", "size_bytes": 1, "free_bytes": 2}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("more free than its size"), "{err}");
        let err = parse_heartbeat(
            br#"{"incarnation": 3, "pools": [{"name": "a/b", "size_bytes": 1, "free_bytes": 0}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("pool name 'a/b'"), "{err}");
    }

    #[test]
    fn volume_bodies_parse_and_bad_ones_name_the_problem() {
        let ok = parse_create_volume(
            br#"{"name": "pg", "size_bytes": 1048576, "replicas": 3, "zone": "z1"}"#,
        )
        .unwrap();
        assert_eq!((ok.replicas, ok.zone.as_deref()), (3, Some("z1")));
        let cases: [(&[u8], &str); 7] = [
            (
                br#"{"name": "pg", "size_bytes": 512, "replicas": 1}"#,
                "below the block size",
            ),
            (
                br#"{"name": "pg", "size_bytes": 5000, "replicas": 1}"#,
                "not a multiple",
            ),
            (
                br#"{"name": "pg", "size_bytes": 4096, "replicas": 4}"#,
                "replica count '4'",
            ),
            (
                br#"{"name": "pg", "size_bytes": 4096, "replicas": 0}"#,
                "replica count '0'",
            ),
            (
                br#"{"name": "a/b", "size_bytes": 4096, "replicas": 1}"#,
                "volume name 'a/b'",
            ),
            (
                br#"{"name": "pg", "size_bytes": -1, "replicas": 1}"#,
                "not valid JSON",
            ),
            (
                br#"{"name": "pg", "size_bytes": 4096, "replicas": 1, "x": 1}"#,
                "unknown field",
            ),
        ];
        for (body, expect) in cases {
            let err = parse_create_volume(body).unwrap_err();
            assert!(err.to_string().contains(expect), "{expect}: {err}");
        }
        assert_eq!(parse_attach(b"").unwrap(), AttachRequest::default());
        assert_eq!(
            parse_attach(br#"{"node": "n1"}"#).unwrap().node.as_deref(),
            Some("n1")
        );
        assert!(parse_attach(br#"{"node": ""}"#).is_err());
        let hinted = parse_attach(br#"{"node": "n1", "failover_to": "n2"}"#).unwrap();
        assert_eq!(hinted.failover_to.as_deref(), Some("n2"));
        let err = parse_attach(br#"{"node": "n1", "failover_to": "n1"}"#).unwrap_err();
        assert!(err.to_string().contains("attach node itself"), "{err}");
        assert!(parse_attach(br#"{"failover_to": "a/b"}"#).is_err());
        assert!(parse_snapshot(br#"{"name": "mon"}"#).is_ok());
        assert!(parse_clone(br#"{"snapshot": "mon", "name": "pg2"}"#).is_ok());
        assert!(parse_clone(br#"{"snapshot": "mon"}"#).is_err());
        assert!(parse_grow(br#"{"size_bytes": 8192}"#).is_ok());
        assert!(parse_grow(br#"{"size_bytes": 0}"#).is_err());
    }

    #[test]
    fn names_are_bounded_and_key_safe() {
        assert!(check_name("node id", "node-1.a_b").is_ok());
        assert!(check_name("node id", &"n".repeat(NAME_LEN_MAX)).is_ok());
        assert!(check_name("node id", &"n".repeat(NAME_LEN_MAX + 1)).is_err());
        assert!(check_name("node id", "a/b").is_err());
        assert!(check_name("node id", "é").is_err());
    }
}
