//! The durable in-sync set of each volume: which replicas hold every acknowledged write, and
//! the data generation they hold, under `/cairn/v1/insync/{volume}` (docs/control.md, "The
//! durable in-sync set").
//!
//! The nexus of a volume reports every change of its in-sync set (through its node,
//! `POST /v1/volumes/{name}/insync`), and holds the acknowledgements of writes a removed
//! replica missed until this module has written the report and answered 200. So the record
//! never names in sync a replica that missed an acknowledged write, and a control process
//! that picks a new nexus's sources from it (`trusted`, `min_generation`) never trusts a
//! stale copy.
//!
//! A report is written by whichever control process serves it, leader or not, like a
//! registration: it is a compare-and-swap on the record's revision, and its correctness
//! rests on the nexus's epoch, not on who writes it. A report whose epoch is below the
//! record's comes from a nexus that a newer one (an attach or a failover, which raise the
//! epoch in the record in the same transaction as the attach point) replaced: it is refused
//! with 409 and that nexus fences itself. This module must never write without the revision
//! check, nor answer before the store write returned.

use crate::membership::NODES_PREFIX;
use crate::store::{Store, StoreError, Txn};
use cairn_control_api::{InSyncReport, InSyncView, NodeAddresses, SyncState};
use serde::{Deserialize, Serialize};
use std::time::SystemTime;

/// In-sync records, one key per volume.
pub const INSYNC_PREFIX: &str = "/cairn/v1/insync/";
/// The [`InSyncRecord`] format written; a record with a higher one is refused, not guessed at.
pub const INSYNC_RECORD_FORMAT: u32 = 1;
/// Compare-and-swap attempts of one report before it answers 503 (each loss means another
/// writer changed the record in between: an attach, or a report racing it).
pub const CAS_ATTEMPTS_MAX: u32 = 8;

/// What the store holds about a volume's replicas, as JSON under `/cairn/v1/insync/{volume}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InSyncRecord {
    pub format: u32,
    pub volume: String,
    /// The epoch of the nexus that wrote it (or of the attach that will open one): reports of
    /// a lower epoch are refused.
    pub epoch: u64,
    /// The data generation every replica of `in_sync` holds durably.
    pub generation: u64,
    /// Node ids of the replicas that hold every acknowledged write.
    pub in_sync: Vec<String>,
    /// Node ids of the replicas that missed writes, or were not given `generation` yet.
    pub out_of_sync: Vec<String>,
    pub updated_unix_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum InSyncError {
    #[error(
        "volume '{volume}': the report of epoch {sent} is below the record's epoch {record}: \
         a newer nexus owns the volume"
    )]
    StaleEpoch {
        volume: String,
        sent: u64,
        record: u64,
    },
    #[error(
        "volume '{volume}': the report of generation {sent} is below the record's generation \
         {record} at epoch {epoch}: it is older than what is recorded"
    )]
    StaleGeneration {
        volume: String,
        epoch: u64,
        sent: u64,
        record: u64,
    },
    #[error(
        "volume '{volume}': replica address '{address}' is not the replica address of any \
         registered node"
    )]
    UnknownAddress { volume: String, address: String },
    #[error("volume '{volume}': replica '{address}' and another are both node '{node}'")]
    SameNode {
        volume: String,
        address: String,
        node: String,
    },
    #[error("volume '{0}' has no in-sync record")]
    NotFound(String),
    #[error(
        "volume '{volume}' record kept changing under {CAS_ATTEMPTS_MAX} attempts to write it"
    )]
    Contended { volume: String },
    #[error("stored record {key} is unreadable: {why}")]
    Corrupt { key: String, why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub fn key(volume: &str) -> String {
    format!("{INSYNC_PREFIX}{volume}")
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn corrupt(key: &str, why: impl ToString) -> InSyncError {
    InSyncError::Corrupt {
        key: key.to_string(),
        why: why.to_string(),
    }
}

/// The record of `volume` and its revision, or None when there is none.
pub async fn read(
    store: &impl Store,
    volume: &str,
) -> Result<Option<(InSyncRecord, u64)>, InSyncError> {
    let key = key(volume);
    let Some(entry) = store.get(&key).await? else {
        return Ok(None);
    };
    let record: InSyncRecord =
        serde_json::from_slice(&entry.value).map_err(|e| corrupt(&key, e))?;
    if record.format > INSYNC_RECORD_FORMAT {
        return Err(corrupt(
            &key,
            format!(
                "format {} is newer than this build's {INSYNC_RECORD_FORMAT}",
                record.format
            ),
        ));
    }
    Ok(Some((record, entry.mod_revision)))
}

/// The record as the REST API shows it.
pub fn view(record: InSyncRecord, revision: u64) -> InSyncView {
    InSyncView {
        volume: record.volume,
        epoch: record.epoch,
        generation: record.generation,
        in_sync: record.in_sync,
        out_of_sync: record.out_of_sync,
        updated_unix_ms: record.updated_unix_ms,
        revision,
    }
}

/// Writes `report` (already checked by the parser) as `volume`'s record, unless the record
/// belongs to a newer nexus; returns the record written and its revision. Returns only
/// after the store write returned (the embedded store fsyncs, etcd commits).
pub async fn record(
    store: &impl Store,
    volume: &str,
    report: &InSyncReport,
) -> Result<(InSyncRecord, u64), InSyncError> {
    let key = key(volume);
    for _ in 0..CAS_ATTEMPTS_MAX {
        let old = read(store, volume).await?;
        if let Some((rec, _)) = &old {
            refuse_stale(volume, rec, report)?;
        }
        let nodes = replica_addresses(store).await?;
        let (in_sync, out_of_sync) = node_ids(volume, report, &nodes)?;
        let record = InSyncRecord {
            format: INSYNC_RECORD_FORMAT,
            volume: volume.to_string(),
            epoch: report.epoch,
            generation: report.generation,
            in_sync,
            out_of_sync,
            updated_unix_ms: unix_ms(),
        };
        let value = serde_json::to_vec(&record).expect("records serialize");
        let txn = Txn::default()
            .check(&key, old.as_ref().map_or(0, |(_, rev)| *rev))
            .put(&key, value, None);
        if let Some(revision) = store.txn(txn).await? {
            tracing::info!(volume, epoch = record.epoch, generation = record.generation, in_sync = ?record.in_sync, out_of_sync = ?record.out_of_sync, "in-sync set recorded");
            return Ok((record, revision));
        }
    }
    Err(InSyncError::Contended {
        volume: volume.to_string(),
    })
}

/// Refuses a report older than the record: of a lower epoch (a newer nexus exists), or of
/// the same epoch and a lower generation (a report the nexus gave up on that arrived late;
/// writing it would put back a replica that the newer report took out).
fn refuse_stale(
    volume: &str,
    rec: &InSyncRecord,
    report: &InSyncReport,
) -> Result<(), InSyncError> {
    if report.epoch < rec.epoch {
        return Err(InSyncError::StaleEpoch {
            volume: volume.to_string(),
            sent: report.epoch,
            record: rec.epoch,
        });
    }
    if report.epoch == rec.epoch && report.generation < rec.generation {
        return Err(InSyncError::StaleGeneration {
            volume: volume.to_string(),
            epoch: rec.epoch,
            sent: report.generation,
            record: rec.generation,
        });
    }
    Ok(())
}

/// Every registered node's (id, replica address).
async fn replica_addresses(store: &impl Store) -> Result<Vec<(String, String)>, InSyncError> {
    let mut out = Vec::new();
    for e in store.list(NODES_PREFIX).await? {
        #[derive(Deserialize)]
        struct Addressed {
            id: String,
            addresses: NodeAddresses,
        }
        let n: Addressed = serde_json::from_slice(&e.value).map_err(|why| corrupt(&e.key, why))?;
        if let Some(replica) = n.addresses.replica {
            out.push((n.id, replica));
        }
    }
    Ok(out)
}

/// The report's replicas as node ids, split by state: `local` is the reporting node, a
/// HOST:PORT the node registered with that replica address.
fn node_ids(
    volume: &str,
    report: &InSyncReport,
    nodes: &[(String, String)],
) -> Result<(Vec<String>, Vec<String>), InSyncError> {
    let (mut in_sync, mut out_of_sync) = (Vec::new(), Vec::new());
    for r in &report.replicas {
        let node = if r.address == "local" {
            report.node.clone()
        } else {
            nodes
                .iter()
                .find(|(_, addr)| *addr == r.address)
                .map(|(id, _)| id.clone())
                .ok_or_else(|| InSyncError::UnknownAddress {
                    volume: volume.to_string(),
                    address: r.address.clone(),
                })?
        };
        if in_sync.contains(&node) || out_of_sync.contains(&node) {
            return Err(InSyncError::SameNode {
                volume: volume.to_string(),
                address: r.address.clone(),
                node,
            });
        }
        match r.state {
            SyncState::InSync => in_sync.push(node),
            SyncState::OutOfSync => out_of_sync.push(node),
        }
    }
    Ok((in_sync, out_of_sync))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_control_api::ReplicaInSync;

    fn report(epoch: u64, generation: u64) -> InSyncReport {
        InSyncReport {
            node: "a".into(),
            epoch,
            generation,
            replicas: vec![
                ReplicaInSync {
                    address: "local".into(),
                    state: SyncState::InSync,
                },
                ReplicaInSync {
                    address: "10.0.0.2:10820".into(),
                    state: SyncState::OutOfSync,
                },
            ],
        }
    }

    fn record(epoch: u64, generation: u64) -> InSyncRecord {
        InSyncRecord {
            format: INSYNC_RECORD_FORMAT,
            volume: "v".into(),
            epoch,
            generation,
            in_sync: vec!["a".into()],
            out_of_sync: Vec::new(),
            updated_unix_ms: 0,
        }
    }

    #[test]
    fn addresses_map_to_node_ids() {
        let nodes = vec![("b".to_string(), "10.0.0.2:10820".to_string())];
        let (i, o) = node_ids("v", &report(1, 1), &nodes).unwrap();
        assert_eq!((i, o), (vec!["a".to_string()], vec!["b".to_string()]));
        let err = node_ids("v", &report(1, 1), &[]).unwrap_err();
        assert!(err.to_string().contains("'10.0.0.2:10820'"), "{err}");
        let same = vec![("a".to_string(), "10.0.0.2:10820".to_string())];
        let err = node_ids("v", &report(1, 1), &same).unwrap_err();
        assert!(err.to_string().contains("node 'a'"), "{err}");
    }

    #[test]
    fn older_reports_are_refused_naming_both() {
        let err = refuse_stale("v", &record(3, 7), &report(2, 9)).unwrap_err();
        assert!(
            err.to_string().contains("epoch 2") && err.to_string().contains("epoch 3"),
            "{err}"
        );
        let err = refuse_stale("v", &record(3, 7), &report(3, 6)).unwrap_err();
        assert!(err.to_string().contains("generation 6"), "{err}");
        assert!(refuse_stale("v", &record(3, 7), &report(3, 7)).is_ok());
        assert!(refuse_stale("v", &record(3, 7), &report(4, 1)).is_ok());
    }
}
