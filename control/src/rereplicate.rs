//! Re-replication: a replica whose node has been down longer than the replica grace is
//! replaced by a new one on another node, so the volume gets back its replica count.
//!
//! Each step is a record first, then node calls, like every reconcile step
//! (docs/control.md, "Re-replication"):
//! 1. [`replace_lost`]: the lost replica is marked `lost` and a new `creating` replica placed
//!    (placement, excluding every node in the record), in one fenced, revision-checked write,
//!    before any node call;
//! 2. the reconcile loop's replicas step creates the new replica's volume;
//! 3. [`nexus_members`]: if the volume is attached, the new replica is assigned to the attach
//!    node (`AssignReplica`), then the nexus is given it (`AddReplica`: the nexus rebuilds it
//!    online, in full) and loses the lost one (`RemoveReplica`);
//! 4. [`retire_lost`]: once the in-sync record names every created replica in sync (the new
//!    one rebuilt), each `lost` replica becomes `deleting`: the replicas step deletes its
//!    volume when its node is back, then drops the entry.
//!
//! A node back within the grace keeps its replica, which the nexus resyncs as before.

use crate::insync::InSyncRecord;
use crate::membership::NodeRecord;
use crate::placement::{self, PlacementError};
use crate::proto as pb;
use crate::reconcile::NodeCallError;
use crate::volume::{ReplicaRecord, ReplicaState, VolumeRecord};
use cairn_control_api::NodeState;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// `--replica-grace` when not given: how long a replica's node may stay down before the
/// replica is replaced. Long enough for a node restart, which resyncs only what it missed.
pub const REPLICA_GRACE_DEFAULT_S: u64 = 60;

/// `--replica-forget` when not given: how long the node of a replaced replica (`deleting`)
/// may stay down before its entry leaves the record. The entry only waits to delete a copy
/// nothing uses any more; a node back later has that copy deleted as an orphan.
pub const REPLICA_FORGET_DEFAULT_S: u64 = 24 * 3600;

/// Re-replication figures for `/metrics`.
#[derive(Default)]
pub struct Counters {
    /// Replicas recorded as replaced by this control process.
    pub replaced: AtomicU64,
    /// Bytes copied by the full rebuilds of the nexuses this process has seen as leader
    /// (a replacement's rebuild, or a replica a new nexus did not trust): a counter.
    pub rebuild_bytes: AtomicU64,
    /// Each nexus's own rebuilt-bytes counter as last seen, by (volume, node, epoch); only
    /// entries at a volume's recorded epoch are kept, so it holds about one per volume.
    seen: Mutex<HashMap<(String, String, u64), u64>>,
}

/// One nexus as a reconcile pass listed it on its node.
pub(crate) struct NexusSeen<'a> {
    pub(crate) volume: &'a str,
    pub(crate) node: &'a str,
    pub(crate) epoch: u64,
    /// The nexus's count of bytes its full rebuilds copied since it was created.
    pub(crate) rebuilt_bytes: u64,
}

impl Counters {
    /// Adds to [`Counters::rebuild_bytes`] what each nexus at its volume's recorded epoch
    /// (`epochs`) has rebuilt since a pass last saw it. A nexus counts from 0 when created, so
    /// one seen for the first time (a new epoch, another node, or this process just became
    /// leader) adds its whole count, and one whose count went down was created again: its
    /// whole count too. A nexus below its volume's epoch is fenced and about to be taken
    /// down, and is not counted: its entry is dropped with those of deleted volumes, which
    /// keeps the map to the live nexuses.
    pub(crate) fn count_rebuilds<'a>(
        &self,
        epochs: &HashMap<&str, u64>,
        seen: impl Iterator<Item = NexusSeen<'a>>,
    ) {
        let mut last = self.seen.lock().expect("rebuild counters lock");
        for n in seen {
            if epochs.get(n.volume).is_none_or(|e| n.epoch < *e) {
                continue;
            }
            let key = (n.volume.to_string(), n.node.to_string(), n.epoch);
            let before = last.insert(key, n.rebuilt_bytes).unwrap_or(0);
            let added = if n.rebuilt_bytes >= before {
                n.rebuilt_bytes - before
            } else {
                n.rebuilt_bytes
            };
            self.rebuild_bytes.fetch_add(added, Ordering::Relaxed);
        }
        last.retain(|(volume, _, epoch), _| {
            epochs.get(volume.as_str()).is_some_and(|e| epoch >= e)
        });
    }
}

/// Marks each created replica whose node has been down longer than `grace_ms` `lost` and
/// places as many new `creating` replicas. The attach node's replica is left to failover,
/// which moves the nexus first; it is replaced once it is an ordinary replica. Returns how many were replaced; `next` is
/// unchanged when none was, or when placement finds too few nodes (the error says why).
pub fn replace_lost(
    next: &mut VolumeRecord,
    nodes: &[NodeRecord],
    grace_ms: u64,
    now_ms: u64,
) -> Result<usize, PlacementError> {
    let at = next.attached.as_ref().map(|a| a.node.clone());
    let lost: Vec<usize> = next
        .replicas
        .iter()
        .enumerate()
        .filter(|(_, r)| r.state == ReplicaState::Created && at.as_ref() != Some(&r.node))
        .filter(|(_, r)| {
            nodes.iter().any(|n| {
                n.id == r.node
                    && n.state == NodeState::Down
                    && n.down_since_unix_ms
                        .is_some_and(|t| now_ms.saturating_sub(t) > grace_ms)
            })
        })
        .map(|(i, _)| i)
        .collect();
    if lost.is_empty() {
        return Ok(0);
    }
    let holders = next.replica_nodes();
    let placed = placement::place(
        nodes,
        &placement::Request {
            size_bytes: next.size_bytes,
            replicas: lost.len(),
            zone: next.zone.as_deref(),
            holders: &holders,
            seed: placement::seed_of(&next.name) ^ next.epoch,
        },
    )?;
    // A snapshot recorded before `on` existed belongs on every created replica; pin it to the
    // replicas that hold it now, so the replacement (whose copy is not the snapshot's point in
    // time) is never given it.
    let holding: Vec<String> = next
        .replicas
        .iter()
        .filter(|r| r.state == ReplicaState::Created && !r.replacement)
        .map(|r| r.node.clone())
        .collect();
    for s in next.snapshots.iter_mut().filter(|s| s.on.is_none()) {
        s.on = Some(holding.clone());
    }
    for i in &lost {
        next.replicas[*i].state = ReplicaState::Lost;
    }
    next.replicas
        .extend(placed.into_iter().map(ReplicaRecord::replacement));
    Ok(lost.len())
}

/// Gives the attach node's nexus each created replica it never had (in neither set of the
/// in-sync record: a replacement) and takes the lost ones out of it, while the record has a
/// lost replica. `at_id` is the attach node, its nexus at the record's epoch, listed in
/// `views`. A replica the nexus already knows is left to it, even if its node came back at
/// another address. A replacement is assigned to the attach node (`AssignReplica` on its
/// own node) before the nexus is given it, so the nexus's `Open` passes the replica's opener
/// check; a replacement whose node is not listed this pass waits for the next.
pub(crate) async fn nexus_members(
    next: &VolumeRecord,
    insync: Option<&InSyncRecord>,
    nodes: &[NodeRecord],
    views: &mut [crate::reconcile::NodeView<'_>],
    at_id: &str,
) -> Result<(), NodeCallError> {
    let name = next.name.clone();
    let Some(at) = crate::reconcile::view_of(views, at_id) else {
        return Ok(());
    };
    let r = at
        .client
        .show_nexus(pb::ShowNexusRequest { name: name.clone() })
        .await;
    let nexus = match r {
        Ok(n) => n.into_inner(),
        Err(s) => return Err(at.err("ShowNexus", &name, s)),
    };
    let has = |addr: &str| nexus.replicas.iter().any(|r| r.address == addr);
    let address = |node: &str| {
        nodes
            .iter()
            .find(|n| n.id == node)
            .and_then(|n| n.addresses.replica.clone())
    };
    for r in &next.replicas {
        if r.node == at_id {
            continue;
        }
        let Some(addr) = address(&r.node) else {
            continue;
        };
        let up = nodes
            .iter()
            .any(|n| n.id == r.node && n.state == NodeState::Up);
        let known =
            insync.is_some_and(|i| i.in_sync.contains(&r.node) || i.out_of_sync.contains(&r.node));
        if r.state == ReplicaState::Created && up && !known && !has(&addr) {
            let Some(holder) = crate::reconcile::view_of(views, &r.node) else {
                continue;
            };
            holder.assign_opener(&name, at_id).await?;
            let at = crate::reconcile::view_of(views, at_id).expect("listed above");
            let req = pb::AddReplicaRequest {
                nexus: name.clone(),
                replica: addr.clone(),
            };
            let res = at.client.add_replica(req).await;
            at.made("AddReplica", &name, res)?;
            tracing::info!(volume = %name, node = %r.node, replica = %addr, "replacement replica added to the nexus; it rebuilds online");
        } else if r.state == ReplicaState::Lost && has(&addr) {
            let at = crate::reconcile::view_of(views, at_id).expect("listed above");
            let req = pb::RemoveReplicaRequest {
                nexus: name.clone(),
                replica: addr.clone(),
            };
            let res = at.client.remove_replica(req).await;
            at.gone("RemoveReplica", &name, res)?;
            tracing::info!(volume = %name, node = %r.node, replica = %addr, "lost replica removed from the nexus");
        }
    }
    Ok(())
}

/// Drops each `deleting` entry whose node has been down longer than `forget_ms`: its replica
/// was replaced and is out of the in-sync record, so only its cleanup waited on the node.
/// Should the node come back, the reconcile loop deletes the copy as an orphan (a volume's
/// object on a node its record does not name). True when `next` changed.
pub fn forget_unreachable(
    next: &mut VolumeRecord,
    nodes: &[NodeRecord],
    forget_ms: u64,
    now_ms: u64,
) -> bool {
    let gone = |node: &str| {
        nodes.iter().any(|n| {
            n.id == node
                && n.state == NodeState::Down
                && n.down_since_unix_ms
                    .is_some_and(|t| now_ms.saturating_sub(t) > forget_ms)
        })
    };
    let before = next.replicas.len();
    let name = next.name.clone();
    next.replicas.retain(|r| {
        let forget = r.state == ReplicaState::Deleting && gone(&r.node);
        if forget {
            tracing::info!(volume = %name, node = %r.node, "the replaced replica's node is down past --replica-forget; its entry is dropped, and its copy is deleted as an orphan if the node comes back");
        }
        !forget
    });
    next.replicas.len() != before
}

/// Clears the replacement flag of each created replacement that holds the data: the in-sync
/// record names it in sync (its rebuild is done), or there is no record, the volume is no
/// clone and was never attached (epoch 0: every attach raises it and writes the record), so
/// it never held data and the empty replacement holds what the others do. A
/// clone's data is on the replicas made from its snapshot, which its in-sync record names
/// from creation; without one (a record older than that) its replacement waits for a nexus
/// to rebuild it. True when `next` changed.
pub fn mark_filled(next: &mut VolumeRecord, insync: Option<&InSyncRecord>) -> bool {
    let mut changed = false;
    for r in &mut next.replicas {
        let filled = match insync {
            Some(i) => i.in_sync.contains(&r.node),
            None => next.origin.is_none() && next.epoch == 0,
        };
        if r.replacement && r.state == ReplicaState::Created && filled {
            r.replacement = false;
            changed = true;
            tracing::info!(volume = %next.name, node = %r.node, "replacement replica holds the volume's data");
        }
    }
    changed
}

/// Turns each lost replica into a deleting one once the replacement holds the data: no
/// replica is still being created, and every created replica is in sync (no replacement is
/// left to fill, [`mark_filled`], and the in-sync record, if the volume was ever attached,
/// names it). True when `next` changed.
pub fn retire_lost(next: &mut VolumeRecord, insync: Option<&InSyncRecord>) -> bool {
    if !next.replicas.iter().any(|r| r.state == ReplicaState::Lost) || !next.all_created() {
        return false;
    }
    let rebuilt = next
        .replicas
        .iter()
        .filter(|r| r.state == ReplicaState::Created)
        .all(|r| !r.replacement && insync.is_none_or(|i| i.in_sync.contains(&r.node)));
    if !rebuilt {
        return false;
    }
    for r in &mut next.replicas {
        if r.state == ReplicaState::Lost {
            r.state = ReplicaState::Deleting;
            tracing::info!(volume = %next.name, node = %r.node, "replacement in sync; the lost replica is deleted when its node is back");
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::insync::INSYNC_RECORD_FORMAT;
    use crate::membership::testing;
    use crate::volume::Attachment;

    const MIB: u64 = 1 << 20;
    const GRACE_MS: u64 = 1000;

    fn node(id: &str, down_since_unix_ms: Option<u64>) -> NodeRecord {
        let n = testing::node(id, "z", id, 128 * MIB, 100 * MIB);
        match down_since_unix_ms {
            Some(t) => testing::down(n, t),
            None => n,
        }
    }

    fn record() -> VolumeRecord {
        let created = |n: &str| ReplicaRecord {
            state: ReplicaState::Created,
            ..ReplicaRecord::creating(n)
        };
        VolumeRecord {
            format: 1,
            name: "pg".into(),
            size_bytes: 16 * MIB,
            replicas_wanted: 2,
            zone: None,
            replicas: vec![created("a"), created("b")],
            attached: Some(Attachment {
                node: "a".into(),
                nbd_uri: None,
                failover_to: None,
            }),
            rebuild: None,
            epoch: 1,
            created_unix_ms: 0,
            snapshots: Vec::new(),
            origin: None,
            deleting: false,
            published: None,
            fs_type: None,
        }
    }

    fn states(r: &VolumeRecord) -> Vec<(String, &'static str)> {
        r.replicas
            .iter()
            .map(|x| (x.node.clone(), x.state.as_str()))
            .collect()
    }

    #[test]
    fn a_replica_down_past_the_grace_is_lost_and_replaced_elsewhere() {
        let now = 10_000;
        // b down for less than the grace: nothing yet.
        let mut r = record();
        let within = [
            node("a", None),
            node("b", Some(now - GRACE_MS)),
            node("c", None),
        ];
        assert_eq!(replace_lost(&mut r, &within, GRACE_MS, now).unwrap(), 0);
        assert_eq!(r, record());
        let past = [
            node("a", None),
            node("b", Some(now - GRACE_MS - 1)),
            node("c", None),
        ];
        assert_eq!(replace_lost(&mut r, &past, GRACE_MS, now).unwrap(), 1);
        assert_eq!(
            states(&r),
            [
                ("a".into(), "created"),
                ("b".into(), "lost"),
                ("c".into(), "creating")
            ]
        );
        assert!(
            r.replicas[2].replacement,
            "made empty and rebuilt, never from a snapshot"
        );
        // Recorded once: a lost replica is not replaced again.
        assert_eq!(replace_lost(&mut r, &past, GRACE_MS, now).unwrap(), 0);
    }

    #[test]
    fn no_node_left_changes_nothing_and_the_attach_node_is_left_to_failover() {
        let now = 10_000;
        let mut r = record();
        let nodes = [node("a", None), node("b", Some(0))];
        assert!(replace_lost(&mut r, &nodes, GRACE_MS, now).is_err());
        assert_eq!(r, record());
        let nodes = [node("a", Some(0)), node("b", None), node("c", None)];
        assert_eq!(replace_lost(&mut r, &nodes, GRACE_MS, now).unwrap(), 0);
    }

    #[test]
    fn a_deleting_entry_is_forgotten_only_past_the_bound_and_only_when_deleting() {
        let now = 100_000;
        let forget = 10_000;
        let mut r = record();
        r.replicas[1].state = ReplicaState::Deleting;
        r.replicas.push(ReplicaRecord {
            state: ReplicaState::Lost,
            ..ReplicaRecord::creating("c")
        });
        let nodes = |b, c| [node("a", None), node("b", b), node("c", c)];
        let within = nodes(Some(now - forget), Some(0));
        assert!(!forget_unreachable(&mut r, &within, forget, now));
        assert_eq!(
            r.replicas.len(),
            3,
            "b within the bound, c lost, not deleting"
        );
        let past = nodes(Some(now - forget - 1), Some(0));
        assert!(forget_unreachable(&mut r, &past, forget, now));
        assert_eq!(
            states(&r),
            [("a".into(), "created"), ("c".into(), "lost")],
            "only the deleting entry past the bound goes"
        );
        assert!(!forget_unreachable(&mut r, &past, forget, now));
    }

    #[test]
    fn rebuild_bytes_count_each_nexus_increase_once_and_restart_with_a_new_nexus() {
        let c = Counters::default();
        let seen = |node: &'static str, epoch, rebuilt_bytes| NexusSeen {
            volume: "pg",
            node,
            epoch,
            rebuilt_bytes,
        };
        let total = || c.rebuild_bytes.load(Ordering::Relaxed);
        let epochs = HashMap::from([("pg", 2)]);
        // First sight of a nexus counts what it rebuilt before any pass saw it.
        c.count_rebuilds(&epochs, [seen("a", 2, 100)].into_iter());
        assert_eq!(total(), 100);
        c.count_rebuilds(&epochs, [seen("a", 2, 100)].into_iter());
        assert_eq!(total(), 100, "seen again unchanged: nothing added");
        c.count_rebuilds(&epochs, [seen("a", 2, 250)].into_iter());
        assert_eq!(total(), 250, "only the increase");
        // A fenced nexus of an older epoch is not counted.
        c.count_rebuilds(&epochs, [seen("b", 1, 999), seen("a", 2, 250)].into_iter());
        assert_eq!(total(), 250);
        // Failover: a new nexus elsewhere at a new epoch starts from 0.
        let epochs = HashMap::from([("pg", 3)]);
        c.count_rebuilds(&epochs, [seen("a", 2, 300), seen("b", 3, 40)].into_iter());
        assert_eq!(total(), 290);
        // The same node and epoch with a lower count: a nexus created again, counted whole.
        c.count_rebuilds(&epochs, [seen("b", 3, 10)].into_iter());
        assert_eq!(total(), 300);
        // Only live entries stay: the old epoch's and a deleted volume's go.
        assert_eq!(c.seen.lock().unwrap().len(), 1);
        c.count_rebuilds(&HashMap::new(), std::iter::empty());
        assert!(c.seen.lock().unwrap().is_empty());
    }

    #[test]
    fn the_lost_replica_is_deleted_only_once_the_replacement_is_in_sync() {
        let mut r = record();
        r.replicas[1].state = ReplicaState::Lost;
        r.replicas.push(ReplicaRecord::replacement("c"));
        let mut insync = InSyncRecord {
            format: INSYNC_RECORD_FORMAT,
            volume: "pg".into(),
            epoch: 1,
            generation: 1,
            in_sync: vec!["a".into()],
            out_of_sync: vec!["b".into()],
            updated_unix_ms: 0,
        };
        assert!(!retire_lost(&mut r, Some(&insync)), "c is still creating");
        r.replicas[2].state = ReplicaState::Created;
        assert!(!mark_filled(&mut r, Some(&insync)));
        assert!(!retire_lost(&mut r, Some(&insync)), "c is not rebuilt yet");
        assert!(r.rebuilding());
        insync.in_sync.push("c".into());
        assert!(
            !retire_lost(&mut r, Some(&insync)),
            "its flag is cleared first"
        );
        assert!(mark_filled(&mut r, Some(&insync)));
        assert!(retire_lost(&mut r, Some(&insync)));
        assert_eq!(r.replicas[1].state, ReplicaState::Deleting);
        assert!(!r.rebuilding());
        assert!(!retire_lost(&mut r, Some(&insync)));
    }

    #[test]
    fn a_replacement_without_an_in_sync_record_holds_the_data_only_if_no_clone() {
        let mut r = record();
        r.replicas[1].state = ReplicaState::Lost;
        let mut c = ReplicaRecord::replacement("c");
        c.state = ReplicaState::Created;
        r.replicas.push(c);
        // A clone's data is on the replicas made from its snapshot: an empty replacement
        // never stands for it, and the lost copy is kept.
        let mut clone = r.clone();
        clone.origin = Some(crate::volume::Origin {
            volume: "src".into(),
            snapshot: "s".into(),
        });
        assert!(!mark_filled(&mut clone, None));
        assert!(!retire_lost(&mut clone, None));
        // A volume attached before (an epoch above 0) with no record is one this version did
        // not write: it may hold data, so the empty replacement does not stand for it.
        let mut attached_once = r.clone();
        attached_once.epoch = 1;
        assert!(!mark_filled(&mut attached_once, None));
        assert!(!retire_lost(&mut attached_once, None));
        // A volume never attached never held data: the empty replacement holds the same.
        r.epoch = 0;
        assert!(mark_filled(&mut r, None));
        assert!(retire_lost(&mut r, None));
    }

    #[test]
    fn a_snapshot_recorded_before_on_existed_is_pinned_to_its_holders_when_a_replacement_is_placed()
    {
        let mut r = record();
        r.snapshots.push(crate::volume::SnapshotRecord {
            name: "s".into(),
            nodes: vec!["a".into(), "b".into()],
            created_unix_ms: 0,
            on: None,
            deleting: false,
        });
        let nodes = [node("a", None), node("b", Some(0)), node("c", None)];
        assert_eq!(replace_lost(&mut r, &nodes, 1, 10).unwrap(), 1);
        assert_eq!(
            r.snapshots[0].on,
            Some(vec!["a".to_string(), "b".to_string()])
        );
        assert!(!r.snapshots[0].belongs_on("c"));
    }
}
