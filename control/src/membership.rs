//! Membership: which nodes exist, where they are reached, and whether they are up.
//!
//! A node registers ([`Membership::register`]) and then keeps a store lease alive with
//! heartbeats ([`Membership::heartbeat`]). Two keys per node (docs/control.md):
//!
//! * `/cairn/v1/nodes/{id}`: the durable [`NodeRecord`] (addresses, failure domain, pools,
//!   state up/down, incarnation, lease). It has no lease: a node that is down is still known.
//! * `/cairn/v1/node-leases/{id}`: `{"incarnation": N}` attached to the node's lease, so the
//!   store deletes it when the node stops heartbeating.
//!
//! Registration writes both in one compare-and-swap on the record's revision, so two racing
//! registrations of one id cannot both win. Only the leader marks a node down
//! ([`Membership::mark_expired`]): when the lease key of an `up` record is gone, it writes
//! `down` in a transaction fenced by its leadership and by the record's revision, so the state
//! is durable before anything acts on it, and a registration that raced it wins.
//!
//! Heartbeats renew the lease (in etcd, or in the embedded store's memory) and carry the
//! node's pools with their free capacity; the record is rewritten (compare-and-swap on its
//! revision, as registration does) only when that capacity changed, so an idle cluster's
//! heartbeats write nothing. When each node was last heard from is kept in this process's
//! memory only, for display.

use crate::election::Leadership;
use crate::store::{AnyStore, LeaseId, Store, StoreError, Txn};
use cairn_control_api::{
    HeartbeatRequest, HeartbeatResponse, NodeAddresses, NodeState, NodeView, PoolCapacity,
    RegisterRequest, RegisterResponse,
};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Node records, one key per node id.
pub const NODES_PREFIX: &str = "/cairn/v1/nodes/";
/// Node lease keys, one per node id, attached to the node's lease.
pub const NODE_LEASES_PREFIX: &str = "/cairn/v1/node-leases/";
/// The node lease: a node that sends no heartbeat for this long is marked down. Together with
/// [`MONITOR_INTERVAL`] it bounds detection at about 2.25 s, inside the 5 s failover target.
/// (etcd counts lease TTLs in whole seconds and refuses less than about 1.5 s on its default
/// timings, so 2 is the shortest safe choice.)
pub const NODE_LEASE_TTL_S: u64 = 2;
/// How often a node heartbeats: four renewals per TTL, so three lost in a row are survived.
pub const HEARTBEAT_INTERVAL_MS: u64 = 500;
/// How often the leader looks for expired node leases.
pub const MONITOR_INTERVAL: Duration = Duration::from_millis(250);
/// Most node records one "mark down" transaction writes (each is a check and a put; etcd's
/// default `--max-txn-ops` is 128). More expired nodes than this are marked in several
/// transactions, in id order.
pub const MARK_DOWN_PER_TXN_MAX: usize = 32;
/// Compare-and-swap attempts of one registration before it answers 503 (each loss means
/// another writer changed the record in between; more than a few means something is wrong).
pub const CAS_ATTEMPTS_MAX: u32 = 8;
/// The [`NodeRecord`] format written; a record with a higher one is refused, not guessed at.
pub const NODE_RECORD_FORMAT: u32 = 1;

const _: () = assert!(HEARTBEAT_INTERVAL_MS * 3 < NODE_LEASE_TTL_S * 1000);

/// What the store holds about a node, as JSON under `/cairn/v1/nodes/{id}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    pub format: u32,
    pub id: String,
    pub addresses: NodeAddresses,
    pub zone: String,
    pub rack: String,
    pub pools: Vec<PoolCapacity>,
    pub state: NodeState,
    /// Counts registrations of this id; the lease key carries the same number.
    pub incarnation: u64,
    pub lease: LeaseId,
    pub registered_unix_ms: u64,
    pub down_since_unix_ms: Option<u64>,
}

/// The value of a node lease key.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseRecord {
    pub incarnation: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error(
        "node id '{id}' is already registered by a live node at {registered}; this \
         registration comes from {requested}. Stop the other node, or give this one another \
         --node-id"
    )]
    Conflict {
        id: String,
        registered: Box<NodeAddresses>,
        requested: Box<NodeAddresses>,
    },
    #[error("node '{0}' is not registered")]
    UnknownNode(String),
    #[error("node '{id}' heartbeat names incarnation {sent}, but the current one is {current}; register again")]
    StaleIncarnation { id: String, sent: u64, current: u64 },
    #[error("node '{id}' lease expired (it was marked down); register again")]
    LeaseExpired { id: String },
    #[error("node '{id}' record kept changing under {CAS_ATTEMPTS_MAX} attempts to write it")]
    Contended { id: String },
    #[error("stored record {key} is unreadable: {why}")]
    Corrupt { key: String, why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Event counts for /metrics.
#[derive(Default)]
pub struct Counters {
    pub registrations: AtomicU64,
    pub heartbeats: AtomicU64,
    pub marked_down: AtomicU64,
    /// Node records rewritten because a heartbeat reported other pool capacity.
    pub pool_updates: AtomicU64,
}

/// What this process last heard from a node.
#[derive(Clone)]
struct Seen {
    at: Instant,
    incarnation: u64,
    lease: LeaseId,
    /// The pools as the stored record holds them, to tell a changed report without a read.
    pools: Vec<PoolCapacity>,
}

pub struct Membership {
    store: Arc<AnyStore>,
    lease_ttl_s: u64,
    seen: Mutex<HashMap<String, Seen>>,
    pub counters: Counters,
}

pub fn node_key(id: &str) -> String {
    format!("{NODES_PREFIX}{id}")
}

pub fn lease_key(id: &str) -> String {
    format!("{NODE_LEASES_PREFIX}{id}")
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, MembershipError> {
    serde_json::from_slice(value).map_err(|e| MembershipError::Corrupt {
        key: key.to_string(),
        why: e.to_string(),
    })
}

fn decode_record(key: &str, value: &[u8]) -> Result<NodeRecord, MembershipError> {
    let record: NodeRecord = decode(key, value)?;
    if record.format > NODE_RECORD_FORMAT {
        return Err(MembershipError::Corrupt {
            key: key.to_string(),
            why: format!(
                "format {} is newer than this build's {NODE_RECORD_FORMAT}",
                record.format
            ),
        });
    }
    Ok(record)
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

impl Membership {
    pub fn new(store: Arc<AnyStore>, lease_ttl_s: u64) -> Membership {
        Membership {
            store,
            lease_ttl_s,
            seen: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        }
    }

    pub fn lease_ttl_ms(&self) -> u64 {
        self.lease_ttl_s * 1000
    }

    /// Registers node `id` (already checked by the parser) with a fresh lease, or refuses it
    /// when a live node holds the id at other addresses.
    pub async fn register(
        &self,
        id: &str,
        req: RegisterRequest,
    ) -> Result<RegisterResponse, MembershipError> {
        let key = node_key(id);
        for _ in 0..CAS_ATTEMPTS_MAX {
            let old = match self.store.get(&key).await? {
                Some(e) => Some((decode_record(&key, &e.value)?, e.mod_revision)),
                None => None,
            };
            if let Some((rec, _)) = &old {
                if rec.state == NodeState::Up && rec.addresses != req.addresses {
                    return Err(MembershipError::Conflict {
                        id: id.to_string(),
                        registered: Box::new(rec.addresses.clone()),
                        requested: Box::new(req.addresses),
                    });
                }
            }
            let lease = self.store.grant_lease(self.lease_ttl_s).await?;
            let incarnation = old.as_ref().map_or(0, |(r, _)| r.incarnation) + 1;
            let record = NodeRecord {
                format: NODE_RECORD_FORMAT,
                id: id.to_string(),
                addresses: req.addresses.clone(),
                zone: req.zone.clone(),
                rack: req.rack.clone(),
                pools: req.pools.clone(),
                state: NodeState::Up,
                incarnation,
                lease,
                registered_unix_ms: unix_ms(),
                down_since_unix_ms: None,
            };
            let txn = Txn::default()
                .check(&key, old.as_ref().map_or(0, |(_, rev)| *rev))
                .put(&key, encode(&record), None)
                .put(
                    lease_key(id),
                    encode(&LeaseRecord { incarnation }),
                    Some(lease),
                );
            if self.store.txn(txn).await?.is_none() {
                self.store.revoke_lease(lease).await?;
                continue;
            }
            if let Some((rec, _)) = old {
                // The lease key now belongs to the new lease; the old lease holds nothing.
                drop(self.store.revoke_lease(rec.lease).await);
            }
            self.seen.lock().expect("seen lock").insert(
                id.to_string(),
                Seen {
                    at: Instant::now(),
                    incarnation,
                    lease,
                    pools: record.pools.clone(),
                },
            );
            self.counters.registrations.fetch_add(1, Ordering::Relaxed);
            tracing::info!(id, incarnation, addresses = %record.addresses, "node registered");
            return Ok(RegisterResponse {
                node_id: id.to_string(),
                incarnation,
                lease_ttl_ms: self.lease_ttl_ms(),
                heartbeat_interval_ms: HEARTBEAT_INTERVAL_MS,
            });
        }
        Err(MembershipError::Contended { id: id.to_string() })
    }

    /// Renews node `id`'s lease for the registration `req.incarnation`, and records the
    /// pools it reports when they differ from the stored ones.
    pub async fn heartbeat(
        &self,
        id: &str,
        req: HeartbeatRequest,
    ) -> Result<HeartbeatResponse, MembershipError> {
        let cached = self.seen.lock().expect("seen lock").get(id).cloned();
        let (incarnation, lease, stored_pools) = match cached {
            Some(s) if s.incarnation == req.incarnation => (s.incarnation, s.lease, s.pools),
            _ => {
                let key = node_key(id);
                let entry = self
                    .store
                    .get(&key)
                    .await?
                    .ok_or_else(|| MembershipError::UnknownNode(id.to_string()))?;
                let rec = decode_record(&key, &entry.value)?;
                (rec.incarnation, rec.lease, rec.pools)
            }
        };
        if incarnation != req.incarnation {
            return Err(MembershipError::StaleIncarnation {
                id: id.to_string(),
                sent: req.incarnation,
                current: incarnation,
            });
        }
        match self.store.keep_alive(lease).await {
            Ok(()) => {}
            Err(StoreError::LeaseNotFound(_)) => {
                self.seen.lock().expect("seen lock").remove(id);
                return Err(MembershipError::LeaseExpired { id: id.to_string() });
            }
            Err(e) => return Err(e.into()),
        }
        let pools = match req.pools {
            Some(reported) if reported != stored_pools => {
                self.write_pools(id, incarnation, reported).await?
            }
            _ => stored_pools,
        };
        self.seen.lock().expect("seen lock").insert(
            id.to_string(),
            Seen {
                at: Instant::now(),
                incarnation,
                lease,
                pools,
            },
        );
        self.counters.heartbeats.fetch_add(1, Ordering::Relaxed);
        Ok(HeartbeatResponse {
            lease_ttl_ms: self.lease_ttl_ms(),
        })
    }

    /// Rewrites node `id`'s pools in its record of registration `incarnation`, checked on the
    /// record's revision (a registration or a "mark down" in between makes it read again);
    /// returns the pools the record now holds.
    async fn write_pools(
        &self,
        id: &str,
        incarnation: u64,
        pools: Vec<PoolCapacity>,
    ) -> Result<Vec<PoolCapacity>, MembershipError> {
        let key = node_key(id);
        for _ in 0..CAS_ATTEMPTS_MAX {
            let entry = self
                .store
                .get(&key)
                .await?
                .ok_or_else(|| MembershipError::UnknownNode(id.to_string()))?;
            let mut rec = decode_record(&key, &entry.value)?;
            if rec.incarnation != incarnation {
                return Err(MembershipError::StaleIncarnation {
                    id: id.to_string(),
                    sent: incarnation,
                    current: rec.incarnation,
                });
            }
            if rec.pools == pools {
                return Ok(pools);
            }
            rec.pools = pools.clone();
            let txn = Txn::default()
                .check(&key, entry.mod_revision)
                .put(&key, encode(&rec), None);
            if self.store.txn(txn).await?.is_some() {
                self.counters.pool_updates.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    id,
                    free_bytes = rec.pools.iter().map(|p| p.free_bytes).sum::<u64>(),
                    "pool capacity updated"
                );
                return Ok(pools);
            }
        }
        Err(MembershipError::Contended { id: id.to_string() })
    }

    /// Every node record, in id order.
    pub async fn records(&self) -> Result<Vec<NodeRecord>, MembershipError> {
        node_records(&self.store).await
    }

    /// Every node as the REST API shows it.
    pub async fn list(&self) -> Result<Vec<NodeView>, MembershipError> {
        let records = self.records().await?;
        let seen = self.seen.lock().expect("seen lock");
        Ok(records
            .into_iter()
            .map(|r| {
                let age = seen
                    .get(&r.id)
                    .filter(|s| s.incarnation == r.incarnation)
                    .map(|s| u64::try_from(s.at.elapsed().as_millis()).unwrap_or(u64::MAX));
                view(r, age)
            })
            .collect())
    }

    /// Marks down, as leader `term`, every `up` node whose lease key is gone; returns how many.
    ///
    /// The nodes found expired in one look are marked in one transaction (up to
    /// [`MARK_DOWN_PER_TXN_MAX`]), so no reader ever sees some of them down and the others
    /// still up: nodes that died together (a rack, or every node while the control process
    /// was down) are down together, and a failover never picks a node whose lease was already
    /// seen gone. A registration that races the write moves its record's revision and fails
    /// the whole transaction; the next round looks again.
    pub async fn mark_expired(&self, term: Leadership) -> Result<usize, MembershipError> {
        let records = self.store.list(NODES_PREFIX).await?;
        let alive: HashSet<(String, u64)> = self
            .store
            .list(NODE_LEASES_PREFIX)
            .await?
            .iter()
            .map(|e| {
                let id = e.key[NODE_LEASES_PREFIX.len()..].to_string();
                decode::<LeaseRecord>(&e.key, &e.value).map(|l| (id, l.incarnation))
            })
            .collect::<Result<_, _>>()?;
        let mut expired = Vec::new();
        for entry in records {
            let mut rec = decode_record(&entry.key, &entry.value)?;
            if rec.state != NodeState::Up || alive.contains(&(rec.id.clone(), rec.incarnation)) {
                continue;
            }
            rec.state = NodeState::Down;
            rec.down_since_unix_ms = Some(unix_ms());
            expired.push((entry, rec));
        }
        let mut marked = 0;
        for batch in expired.chunks(MARK_DOWN_PER_TXN_MAX) {
            let mut txn = Txn::default();
            for (entry, rec) in batch {
                txn = txn
                    .check(&entry.key, entry.mod_revision)
                    .put(&entry.key, encode(rec), None);
            }
            if self.store.txn(term.fence(txn)).await?.is_none() {
                continue;
            }
            marked += batch.len();
            for (_, rec) in batch {
                self.counters.marked_down.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(id = %rec.id, incarnation = rec.incarnation, "node lease expired; marked down");
            }
        }
        Ok(marked)
    }
}

/// Every node record in `store`, in id order (placement and the reconcile loop read them).
pub async fn node_records(store: &AnyStore) -> Result<Vec<NodeRecord>, MembershipError> {
    store
        .list(NODES_PREFIX)
        .await?
        .iter()
        .map(|e| decode_record(&e.key, &e.value))
        .collect()
}

fn view(r: NodeRecord, last_heartbeat_age_ms: Option<u64>) -> NodeView {
    NodeView {
        free_bytes: r.pools.iter().map(|p| p.free_bytes).sum(),
        id: r.id,
        state: r.state,
        zone: r.zone,
        rack: r.rack,
        addresses: r.addresses,
        pools: r.pools,
        incarnation: r.incarnation,
        last_heartbeat_age_ms,
        down_since_unix_ms: r.down_since_unix_ms,
    }
}

/// Node records for other modules' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// An up node `id` in `zone` and `rack` with one pool of `size_bytes`, `free_bytes` free,
    /// and every address set (the replica address names the node).
    pub fn node(id: &str, zone: &str, rack: &str, size_bytes: u64, free_bytes: u64) -> NodeRecord {
        NodeRecord {
            format: NODE_RECORD_FORMAT,
            id: id.into(),
            addresses: NodeAddresses {
                admin: "127.0.0.1:1".into(),
                nbd: Some("127.0.0.1:2".into()),
                replica: Some(format!("{id}:3")),
            },
            zone: zone.into(),
            rack: rack.into(),
            pools: vec![PoolCapacity {
                name: "pool0".into(),
                size_bytes,
                free_bytes,
            }],
            state: NodeState::Up,
            incarnation: 1,
            lease: LeaseId(1),
            registered_unix_ms: 0,
            down_since_unix_ms: None,
        }
    }

    /// `node` marked down since `since_unix_ms`.
    pub fn down(mut node: NodeRecord, since_unix_ms: u64) -> NodeRecord {
        node.state = NodeState::Down;
        node.down_since_unix_ms = Some(since_unix_ms);
        node
    }
}
