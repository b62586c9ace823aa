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
//! every replica in sync. `clones_of_lost_replicas` guards clones: their replacements (and
//! a clone's replicas on nodes without the snapshot) are made empty and rebuilt from the
//! replicas made from the snapshot, never from a snapshot their node lacks.

mod common;

#[path = "../../engine/tests/common/nbd_client.rs"]
mod nbd_client;
#[path = "common/pattern.rs"]
mod pattern;

use pattern::{read_back, write_pattern};

use common::{
    metric_of, node_nexuses, node_objects, placements, test_dir, wait_for, zoned_nodes, Control,
    Etcd, NodeProc, STATE_TIMEOUT,
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
    in_sync_of(control, "v")
}

/// The nodes the in-sync record of `volume` names in sync, sorted.
fn in_sync_of(control: &Control, volume: &str) -> Vec<String> {
    let r = control.get(&format!("/v1/volumes/{volume}/insync"));
    r["in_sync"]
        .as_array()
        .map(|a| {
            let mut nodes: Vec<String> =
                a.iter().map(|n| n.as_str().unwrap().to_string()).collect();
            nodes.sort();
            nodes
        })
        .unwrap_or_default()
}

/// Creates volume v of [`SIZE_BYTES`] with `replicas` replicas.
fn create_v(control: &Control, replicas: usize) {
    let (code, _, err) = control.ctl(&[
        "volume",
        "create",
        "v",
        "--size",
        &SIZE_BYTES.to_string(),
        "--replicas",
        &replicas.to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
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
    let mut nodes = zoned_nodes(&dir, &control, 4);
    create_v(&control, replicas);
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
    let listed = in_sync(&control);
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
        // snapshot (clones of it: `clones_of_lost_replicas`).
        let on: Vec<&Value> = v["snapshots"][0]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .collect();
        assert!(!on.iter().any(|n| **n == spare.as_str()), "{v}");
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
    verify_volume(admin, "v")
}

fn verify_volume(admin: &str, volume: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_cairnctl"))
        .args(["node", "--addr", admin, "--json", "nexus", "verify", volume])
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

/// Clones and replacements: a clone's replicas are made from the snapshot where it is, and a
/// replica placed elsewhere (the replacement of a clone's lost replica, or a clone's replica
/// on a node without the snapshot) is made empty and rebuilt from them. Three nodes; volume
/// v with 2 replicas (a, b) holds the pattern, is detached and snapshotted (s) on a and b,
/// and cloned (vc) on a and b. b is killed: past the grace, v's and vc's replicas on b are
/// replaced on c and rebuilt there by rebuild nexuses, though c has no snapshot. Then vc2, a
/// clone of s taken now that only a holds it, gets a's copy and a replacement on c. Each clone,
/// attached on c, reads the pattern back and `nexus verify` finds its copies identical.
fn clones_of_lost_replicas(test: &str, etcd: Option<&Etcd>) {
    let dir = test_dir(test);
    let control = Control::start_with(
        &dir.join("control"),
        etcd.map(|e| e.url.as_str()),
        0,
        &["--replica-grace", GRACE_S],
    );
    let mut nodes = zoned_nodes(&dir, &control, 3);
    create_v(&control, 2);
    let created = |volume: &str, count: usize| {
        wait_for(
            &format!("{volume}'s replicas created"),
            STATE_TIMEOUT,
            || {
                let p = placements(&control.get(&format!("/v1/volumes/{volume}")));
                (p.iter().filter(|(_, s)| s == "created").count() == count).then_some(p)
            },
        )
    };
    let holders: Vec<String> = created("v", 2).into_iter().map(|(n, _)| n).collect();
    let (a, b) = (holders[0].clone(), holders[1].clone());
    let c = ["n1", "n2", "n3"]
        .into_iter()
        .find(|n| !holders.iter().any(|h| h == n))
        .unwrap()
        .to_string();
    let index = |id: &str| id[1..].parse::<usize>().unwrap() - 1;
    let (code, uri, err) = control.ctl(&["volume", "attach", "v", "--node", &a]);
    assert_eq!(code, 0, "{err}");
    write_pattern(uri.trim());
    for cmd in [
        &["volume", "detach", "v"][..],
        &["volume", "snapshot", "v", "s"],
    ] {
        let (code, _, err) = control.ctl(cmd);
        assert_eq!(code, 0, "{err}");
    }
    wait_for("the snapshot on a and b", STATE_TIMEOUT, || {
        let v = control.get("/v1/volumes/v");
        (v["snapshots"][0]["nodes"].as_array()?.len() == 2).then_some(())
    });
    let (code, _, err) = control.ctl(&["volume", "clone", "v", "s", "vc"]);
    assert_eq!(code, 0, "{err}");
    created("vc", 2);
    assert_eq!(in_sync_of(&control, "vc"), sorted(&[&a, &b]), "made from s");

    nodes[index(&b)].kill9();
    control.wait_state(&b, "down");
    let rebuilt_on_c = |volume: &str| {
        wait_for(
            &format!("{volume}'s replacement on c in sync"),
            STATE_TIMEOUT,
            || (in_sync_of(&control, volume) == sorted(&[&a, &c])).then_some(()),
        );
        let p = placements(&control.get(&format!("/v1/volumes/{volume}")));
        assert!(p.contains(&(c.clone(), "created".into())), "{p:?}");
    };
    rebuilt_on_c("v");
    rebuilt_on_c("vc");
    // s is on a only now: vc2 gets a's copy and a replacement on c.
    let (code, _, err) = control.ctl(&["volume", "clone", "v", "s", "vc2"]);
    assert_eq!(code, 0, "{err}");
    rebuilt_on_c("vc2");
    assert!(!node_objects(&nodes[index(&c)].admin)
        .iter()
        .any(|o| o.contains('@')));
    for clone in ["vc", "vc2"] {
        let (code, uri, err) = control.ctl(&["volume", "attach", clone, "--node", &c]);
        assert_eq!(code, 0, "{err}");
        read_back(uri.trim());
        let checked = verify_volume(&nodes[index(&c)].admin, clone);
        assert_eq!(
            checked["replicas"].as_array().map(Vec::len),
            Some(2),
            "{checked}"
        );
    }
}

fn sorted(nodes: &[&String]) -> Vec<String> {
    let mut v: Vec<String> = nodes.iter().map(|n| n.to_string()).collect();
    v.sort();
    v
}

#[test]
fn clones_of_lost_replicas_on_the_embedded_store() {
    clones_of_lost_replicas("rereplicate-clones-embedded", None);
}

#[test]
fn clones_of_lost_replicas_on_etcd() {
    let dir = test_dir("rereplicate-clones-etcd-store");
    let Some(etcd) = Etcd::start(&dir) else {
        return;
    };
    clones_of_lost_replicas("rereplicate-clones-etcd", Some(&etcd));
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
