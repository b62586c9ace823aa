//! Guards re-replication end to end with real processes on loopback, once on the embedded
//! store and once on etcd, with 2 and with 3 replicas: four nodes, a volume attached on one
//! of its replica nodes, data written through NBD and flushed; another replica node is killed
//! (`kill -9`). After `--replica-grace` the record marks its replica `lost` and places a new
//! one on the fourth node; the nexus rebuilds it online while the other replicas stay in sync,
//! and the in-sync record lists it; the lost replica then becomes `deleting`, the volume has
//! as many created, in-sync replicas on distinct nodes as it wants again, `nexus verify` finds
//! every copy identical and the data reads back. `cairn_control_rebuild_bytes_total` counts
//! the rebuild (a full rebuild copies the whole volume, so at least its size), even though it
//! may end between two reconcile passes (it once read 0 then). With 2 replicas the killed
//! node comes back while its entry is `deleting`: its stale replica volume is deleted and the
//! entry leaves the record. With 3 it stays down past `--replica-forget`: the entry leaves
//! the record while the node is down, and when the node comes back later its copy is deleted
//! as an orphan and never joins the nexus. With 3 the volume is also detached before the kill:
//! the reconcile loop rebuilds the replacement through an unexported rebuild nexus at a new
//! epoch, retires the lost replica and takes the rebuild nexus down; the next attach finds
//! every replica in sync.

mod common;

#[path = "../../engine/tests/common/nbd_client.rs"]
mod nbd_client;
#[path = "common/pattern.rs"]
mod pattern;

use pattern::{read_back, write_pattern};

use common::{
    metric_of, node_nexuses, node_objects, placements, test_dir, wait_for, Control, Etcd, NodeProc,
    STATE_TIMEOUT,
};
use serde_json::Value;
use std::process::Command;

const MIB: u64 = 1 << 20;
/// The test volume's size.
const SIZE_BYTES: u64 = 16 * MIB;
/// The test's `--replica-grace`, in seconds.
const GRACE_S: &str = "2";
/// The test's `--replica-forget`, in seconds.
const FORGET_S: &str = "3";
fn in_sync(control: &Control) -> Vec<String> {
    let r = control.get("/v1/volumes/v/insync");
    r["in_sync"]
        .as_array()
        .map(|a| a.iter().map(|n| n.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// `comes_back_soon`: the killed node returns while its entry is still `deleting`; else only
/// after `--replica-forget` dropped the entry. `detached`: the replica is lost while the
/// volume is detached.
fn rereplication(
    test: &str,
    etcd: Option<&Etcd>,
    replicas: usize,
    comes_back_soon: bool,
    detached: bool,
) {
    let dir = test_dir(test);
    let mut flags = vec!["--replica-grace", GRACE_S];
    if !comes_back_soon {
        flags.extend(["--replica-forget", FORGET_S]);
    }
    let control = Control::start_with(
        &dir.join("control"),
        etcd.map(|e| e.url.as_str()),
        0,
        &flags,
    );
    let mut nodes: Vec<NodeProc> = (1..=4)
        .map(|i| {
            NodeProc::start(
                &dir.join(format!("n{i}")),
                &control.url,
                &format!("n{i}"),
                &["--zone", &format!("z{i}")],
            )
        })
        .collect();
    for i in 1..=4 {
        control.wait_state(&format!("n{i}"), "up");
    }
    wait_for("leadership", STATE_TIMEOUT, || {
        control.is_leader().then_some(())
    });
    let count = replicas.to_string();
    let (code, _, err) = control.ctl(&[
        "volume",
        "create",
        "v",
        "--size",
        &SIZE_BYTES.to_string(),
        "--replicas",
        &count,
    ]);
    assert_eq!(code, 0, "{err}");
    let v = control.get("/v1/volumes/v");
    let holders: Vec<String> = placements(&v).into_iter().map(|(n, _)| n).collect();
    assert_eq!(holders.len(), replicas, "{v}");
    let index = |id: &str| id[1..].parse::<usize>().unwrap() - 1;
    let (at, lost) = (holders[0].clone(), holders[1].clone());
    let spare = (1..=4)
        .map(|i| format!("n{i}"))
        .find(|n| !holders.contains(n))
        .unwrap();
    wait_for("both replicas created", STATE_TIMEOUT, || {
        placements(&control.get("/v1/volumes/v"))
            .iter()
            .all(|(_, p)| p == "created")
            .then_some(())
    });
    let (code, uri, err) = control.ctl(&["volume", "attach", "v", "--node", &at]);
    assert_eq!(code, 0, "{err}");
    let mut uri = uri.trim().to_string();
    write_pattern(&uri);

    if detached {
        let (code, _, err) = control.ctl(&["volume", "detach", "v"]);
        assert_eq!(code, 0, "{err}");
        wait_for("the nexus taken down", STATE_TIMEOUT, || {
            node_nexuses(&nodes[index(&at)].admin)
                .is_empty()
                .then_some(())
        });
        // A snapshot of every replica, taken before one is lost.
        let (code, _, err) = control.ctl(&["volume", "snapshot", "v", "s"]);
        assert_eq!(code, 0, "{err}");
        wait_for("the snapshot on every replica", STATE_TIMEOUT, || {
            let v = control.get("/v1/volumes/v");
            (v["snapshots"][0]["nodes"].as_array()?.len() == replicas).then_some(())
        });
    }
    // The other replica node dies; past the grace it is replaced on the spare node.
    nodes[index(&lost)].kill9();
    control.wait_state(&lost, "down");
    wait_for("the replacement in sync", STATE_TIMEOUT, || {
        // The lost entry is `deleting` (with the short --replica-forget it may be gone).
        let p = placements(&control.get("/v1/volumes/v"));
        let retired = p.iter().all(|(n, state)| n != &lost || state == "deleting")
            && (!comes_back_soon || p.contains(&(lost.clone(), "deleting".into())));
        (retired && p.contains(&(spare.clone(), "created".into()))).then_some(())
    });
    // Every replica but the lost one stayed (or came back) in sync, and the replacement too.
    let mut wanted: Vec<String> = holders.iter().filter(|n| **n != lost).cloned().collect();
    wanted.push(spare.clone());
    let mut listed = in_sync(&control);
    listed.sort();
    wanted.sort();
    assert_eq!(listed, wanted, "in-sync record");
    let v = control.get("/v1/volumes/v");
    let mut created: Vec<String> = placements(&v)
        .into_iter()
        .filter(|(_, p)| p == "created")
        .map(|(n, _)| n)
        .collect();
    created.sort();
    assert_eq!(created, wanted, "created replicas on distinct nodes: {v}");
    let serving: Vec<&Value> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "in_sync")
        .collect();
    assert_eq!(
        serving.len(),
        replicas,
        "the replica count is restored: {v}"
    );
    if detached {
        // The replacement's copy is not the snapshot's point in time: it never gets the
        // snapshot, and a clone, which needs it on every replica, is refused naming why.
        let on: Vec<&Value> = v["snapshots"][0]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .collect();
        assert!(!on.iter().any(|n| **n == spare.as_str()), "{v}");
        let (code, _, err) = control.ctl(&["volume", "clone", "v", "s", "vc"]);
        assert_ne!(code, 0);
        assert!(err.contains("is held by 2 of its 3 replicas"), "{err}");
        // The rebuild nexus did it, and is gone once the lost replica is retired.
        assert!(v["attached"].is_null(), "{v}");
        wait_for("the rebuild nexus taken down", STATE_TIMEOUT, || {
            nodes
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != index(&lost))
                .all(|(_, n)| node_nexuses(&n.admin).is_empty())
                .then_some(())
        });
        let (code, again, err) = control.ctl(&["volume", "attach", "v", "--node", &at]);
        assert_eq!(code, 0, "{err}");
        uri = again.trim().to_string();
    }
    let checked = verify(&nodes[index(&at)].admin);
    assert_eq!(
        checked["replicas"].as_array().map(Vec::len),
        Some(replicas),
        "{checked}"
    );
    read_back(&uri);
    let metrics = control.metrics();
    assert_eq!(
        metric_of(&metrics, "cairn_control_replicas_replaced_total"),
        1
    );
    // The replacement's rebuild copied the whole volume (a full rebuild marks every block
    // dirty); an abandoned and restarted one copies more, never less.
    let rebuilt = metric_of(&metrics, "cairn_control_rebuild_bytes_total");
    println!("rebuild bytes counted: {rebuilt} (volume size {SIZE_BYTES})");
    assert!(
        rebuilt >= SIZE_BYTES,
        "cairn_control_rebuild_bytes_total {rebuilt} < the volume's {SIZE_BYTES} bytes"
    );

    let has_lost = || {
        placements(&control.get("/v1/volumes/v"))
            .iter()
            .any(|(n, _)| n == &lost)
    };
    if !comes_back_soon {
        // Away for good, as far as the record can tell: the entry goes while it is down.
        wait_for("the deleting entry forgotten", STATE_TIMEOUT, || {
            (!has_lost()).then_some(())
        });
        assert_eq!(control.get(&format!("/v1/nodes/{lost}"))["state"], "down");
    }
    // The lost node comes back: its stale replica volume is deleted, and it is not in the
    // record (any longer).
    let i = index(&lost);
    nodes[i] = NodeProc::start(
        &dir.join(&lost),
        &control.url,
        &lost,
        &["--zone", &format!("z{}", i + 1)],
    );
    control.wait_state(&lost, "up");
    wait_for("the stale replica deleted", STATE_TIMEOUT, || {
        (!has_lost() && node_objects(&nodes[i].admin).is_empty()).then_some(())
    });
    assert_eq!(node_objects(&nodes[index(&spare)].admin), ["v"]);
    // The stale copy never came back into use: the nexus still has exactly the record's
    // replicas, all equal, and the record does not name the returned node.
    let checked = verify(&nodes[index(&at)].admin);
    let returned = control.get(&format!("/v1/nodes/{lost}"))["addresses"]["replica"].clone();
    let used: Vec<&Value> = checked["replicas"].as_array().unwrap().iter().collect();
    assert_eq!(used.len(), replicas, "{checked}");
    assert!(
        !checked.to_string().contains(returned.as_str().unwrap()),
        "the returned node's copy is in the nexus: {checked}"
    );
    assert!(!has_lost());
    assert!(!in_sync(&control).contains(&lost));
    read_back(&uri);
}

/// `nexus verify` of volume v on the node whose admin API is `admin`; fails unless every
/// copy is identical.
fn verify(admin: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_cairnctl"))
        .args(["node", "--addr", admin, "--json", "nexus", "verify", "v"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "verify: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verify: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        verify["mismatched_regions"].as_array().map_or(0, Vec::len),
        0,
        "{verify}"
    );
    verify
}

#[test]
fn rereplication_on_the_embedded_store() {
    rereplication("rereplicate-embedded", None, 2, true, false);
}

#[test]
fn rereplication_on_etcd() {
    let dir = test_dir("rereplicate-etcd-store");
    let Some(etcd) = Etcd::start(&dir) else {
        return;
    };
    rereplication("rereplicate-etcd", Some(&etcd), 2, true, false);
}

#[test]
fn rereplication_of_three_detached_replicas_on_the_embedded_store() {
    rereplication("rereplicate3-embedded", None, 3, false, true);
}

#[test]
fn rereplication_of_three_detached_replicas_on_etcd() {
    let dir = test_dir("rereplicate3-etcd-store");
    let Some(etcd) = Etcd::start(&dir) else {
        return;
    };
    rereplication("rereplicate3-etcd", Some(&etcd), 3, false, true);
}
