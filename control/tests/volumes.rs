//! Guards the volume commands end to end with real processes on loopback, once on the
//! embedded store and once on etcd: `cairnctl volume create` places three replicas on three
//! distinct nodes (one per zone) and each node has the replica volume; the same create again
//! is a no-op and another size is a conflict naming both; attach opens the nexus, and an NBD
//! client writes through it and reads back, and reads the same back after the attach node
//! restarted (the reconcile loop records a new epoch, then re-creates the nexus there at it and
//! records the new URI); delete removes every replica volume from the
//! nodes, and no node deletes a replica a nexus still uses; snapshot, clone and grow reach every replica node, a volume with clones cannot be
//! deleted and a shrink is refused; on etcd a follower serves reads and refuses writes naming
//! the leader. Bad input (a shortage of eligible nodes, a size no pool holds, a malformed body, an
//! unknown volume, attach to a down node) gets a clear error and leaves the state unchanged.
//!
//! The crash test kills the control process (`kill -9`) after a create is recorded and before
//! any node was called (`--no-reconcile` holds the loop off), restarts it, and checks that the
//! reconcile loop finishes the create exactly once: one replica volume per placed node, none
//! elsewhere, and a second restart changes nothing.

mod common;

#[path = "../../engine/tests/common/nbd_client.rs"]
mod nbd_client;
#[path = "common/pattern.rs"]
mod pattern;

use pattern::{read_back, write_pattern};

use common::{
    free_port, metric_of, node_object_size, node_objects, replica_nodes, test_dir, wait_for,
    zoned_nodes, Control, Etcd, NodeProc, STATE_TIMEOUT,
};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

const MIB: u64 = 1 << 20;

/// POSTs `body` to `path`; returns (status, JSON answer).
fn post(control: &Control, path: &str, body: &[u8]) -> (u16, Value) {
    let r = control.client.post_json(path, body).unwrap();
    (
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    )
}

fn inspect(control: &Control, name: &str) -> Value {
    control.get(&format!("/v1/volumes/{name}"))
}

fn volumes_end_to_end(test: &str, etcd: Option<&Etcd>) {
    let dir = test_dir(test);
    let control = Control::start(&dir.join("control"), etcd.map(|e| e.url.as_str()), 0);
    let mut nodes = zoned_nodes(&dir, &control, 3);

    // Bad input first: each is refused with a clear error and records nothing.
    let bad: [(&[u8], u16, &str); 5] = [
        (
            br#"{"name": "v", "size_bytes": 1099511627776, "replicas": 1}"#,
            400,
            "does not fit: the largest pool of any node holds",
        ),
        (
            br#"{"name": "v", "size_bytes": 16777216, "replicas": 3, "zone": "z1"}"#,
            409,
            "3 replica(s) need 3 eligible node(s), but only 1 of 3 node(s) qualify (n1)",
        ),
        (
            br#"{"name": "v", "size_bytes": 1000, "replicas": 1}"#,
            400,
            "below the block size",
        ),
        (
            br#"{"name": "v", "size_bytes": 4096"#,
            400,
            "not valid JSON",
        ),
        (
            br#"{"name": "v", "size_bytes": 4096, "replicas": 4}"#,
            400,
            "replica count '4'",
        ),
    ];
    for (body, status, expect) in bad {
        let (got, answer) = post(&control, "/v1/volumes", body);
        assert_eq!(got, status, "{answer}");
        let msg = answer["error"].as_str().unwrap();
        assert!(msg.contains(expect), "{expect} missing from: {msg}");
    }
    let (got, answer) = post(&control, "/v1/volumes/nope/attach", b"{}");
    assert_eq!(got, 404, "{answer}");
    assert!(answer["error"]
        .as_str()
        .unwrap()
        .contains("volume 'nope' does not exist"));
    assert_eq!(control.get("/v1/volumes"), json!([]));
    for n in &nodes {
        assert!(node_objects(&n.admin).is_empty());
    }

    // Create: three replicas, one per node (the nodes are in three zones).
    let (code, _, err) =
        control.ctl(&["volume", "create", "v", "--size", "16M", "--replicas", "3"]);
    assert_eq!(code, 0, "{err}");
    let v = inspect(&control, "v");
    let mut placed = replica_nodes(&v);
    placed.sort();
    assert_eq!(placed, ["n1", "n2", "n3"], "{v}");
    for r in v["replicas"].as_array().unwrap() {
        assert_eq!(r["state"], "in_sync", "{v}");
    }
    for n in &nodes {
        assert_eq!(node_objects(&n.admin), ["v"]);
    }
    // The same create again is a no-op; another size is a conflict naming both.
    let same = br#"{"name": "v", "size_bytes": 16777216, "replicas": 3}"#;
    let (got, again) = post(&control, "/v1/volumes", same);
    assert_eq!(got, 200, "{again}");
    assert_eq!(again["created_unix_ms"], v["created_unix_ms"]);
    let (got, answer) = post(
        &control,
        "/v1/volumes",
        br#"{"name": "v", "size_bytes": 33554432, "replicas": 3}"#,
    );
    assert_eq!(got, 409, "{answer}");
    let msg = answer["error"].as_str().unwrap();
    assert!(
        msg.contains("size 16777216") && msg.contains("size 33554432"),
        "{msg}"
    );
    assert_eq!(
        metric_of(
            &control.metrics(),
            "cairn_control_volumes{health=\"healthy\"}"
        ),
        1
    );
    let (code, ls, err) = control.ctl(&["volume", "ls"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        ls.lines()
            .any(|l| l.starts_with("v ") && l.contains("3/3 in sync")),
        "{ls}"
    );

    // Snapshot, clone and grow: recorded, then carried out on every replica node.
    let (code, _, err) = control.ctl(&["volume", "snapshot", "v", "mon"]);
    assert_eq!(code, 0, "{err}");
    wait_for("the snapshot on every replica", STATE_TIMEOUT, || {
        (inspect(&control, "v")["snapshots"][0]["nodes"]
            .as_array()
            .unwrap()
            .len()
            == 3)
            .then_some(())
    });
    let (code, _, err) = control.ctl(&["volume", "clone", "v", "mon", "vc"]);
    assert_eq!(code, 0, "{err}");
    for n in &nodes {
        let mut objects = node_objects(&n.admin);
        objects.sort();
        assert_eq!(objects, ["v", "v@mon", "vc"], "{}", n.admin);
    }
    let (code, _, err) = control.ctl(&["volume", "grow", "vc", "--size", "32M"]);
    assert_eq!(code, 0, "{err}");
    for n in &nodes {
        wait_for("the clone to grow", STATE_TIMEOUT, || {
            (node_object_size(&n.admin, "vc") == 32 * MIB).then_some(())
        });
    }
    let (got, answer) = post(&control, "/v1/volumes/vc/grow", br#"{"size_bytes": 4096}"#);
    assert_eq!(got, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("would shrink it"),
        "{answer}"
    );
    let (got, answer) = post(
        &control,
        "/v1/volumes/vc/grow",
        br#"{"size_bytes": 1073741824}"#,
    );
    assert_eq!(got, 400, "{answer}");
    let msg = answer["error"].as_str().unwrap();
    assert!(
        msg.contains("the smallest pool of its replica nodes holds"),
        "{msg}"
    );
    let r = control
        .client
        .request("DELETE", "/v1/volumes/v", None)
        .unwrap();
    assert_eq!(r.status, 409, "{}", r.error_message());
    assert!(r
        .error_message()
        .contains("has clones of its snapshots (vc)"));
    let (code, _, err) = control.ctl(&["volume", "delete", "vc"]);
    assert_eq!(code, 0, "{err}");

    // Attach: the nexus on n1, exported; I/O through it reads back.
    let (code, uri, err) = control.ctl(&["volume", "attach", "v", "--node", "n1"]);
    assert_eq!(code, 0, "{err}");
    let uri = uri.trim();
    assert_eq!(uri, format!("nbd://{}/v", nodes[0].nbd));
    let v = inspect(&control, "v");
    assert_eq!(v["epoch"], 1);
    assert_eq!(v["attached"]["node"], "n1");
    write_pattern(uri);
    read_back(uri);
    // A replica in use by the nexus cannot be deleted under it, on its own node (a replica
    // connection holds it) or on the nexus node (the nexus holds it).
    for n in &nodes {
        let out = Command::new(env!("CARGO_BIN_EXE_cairnctl"))
            .args(["node", "--addr", &n.admin, "volume", "delete", "v"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("is open"),
            "{}: {err}",
            n.admin
        );
        assert_eq!(node_objects(&n.admin), ["v", "v@mon"]);
    }
    // The attach node restarts (kill -9, new ports). Either it registers again before the
    // reconcile loop sees it down, and the loop re-creates the nexus there from the record;
    // or the loop fails the volume over to another in-sync replica first (control/tests/
    // failover.rs covers that move). Both serve the same data at a new, recorded epoch.
    let old_uri = uri;
    nodes[0].kill9();
    control.wait_state("n1", "down");
    nodes[0] = NodeProc::start(&dir.join("n1"), &control.url, "n1", &["--zone", "z1"]);
    let served = |v: &Value| {
        let node = v["attached"]["node"].as_str()?;
        let at = ["n1", "n2", "n3"].iter().position(|id| *id == node)?;
        let uri = format!("nbd://{}/v", nodes[at].nbd);
        (v["attached"]["nbd_uri"] == uri.as_str()).then(|| (node.to_owned(), uri))
    };
    let (node, uri) = wait_for("the nexus served again", STATE_TIMEOUT, || {
        served(&inspect(&control, "v")).filter(|(_, uri)| *uri != old_uri)
    });
    read_back(&uri);
    assert_eq!(
        inspect(&control, "v")["epoch"],
        2,
        "the re-opened nexus has a new, recorded epoch"
    );
    let (code, text, err) = control.ctl(&["volume", "inspect", "v"]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains(&format!("attached: {node} nbd://")), "{text}");

    // Detach and delete: every replica volume leaves the nodes, then the record.
    let (code, _, err) = control.ctl(&["volume", "detach", "v"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = control.ctl(&["volume", "delete", "v"]);
    assert_eq!(code, 0, "{err}");
    for n in &nodes {
        assert!(node_objects(&n.admin).is_empty(), "{}", n.admin);
    }
    assert_eq!(control.client.get("/v1/volumes/v").unwrap().status, 404);

    // Attach to a down node: refused, naming it; the record is unchanged.
    let (code, _, err) = control.ctl(&["volume", "create", "w", "--size", "4M", "--replicas", "2"]);
    assert_eq!(code, 0, "{err}");
    nodes[2].kill9();
    control.wait_state("n3", "down");
    let before = inspect(&control, "w");
    let (got, answer) = post(&control, "/v1/volumes/w/attach", br#"{"node": "n3"}"#);
    assert_eq!(got, 409, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("node 'n3' is down"),
        "{answer}"
    );
    assert_eq!(inspect(&control, "w"), before);

    // A follower serves reads and refuses writes, naming the leader.
    if let Some(etcd) = etcd {
        let follower = Control::start(&dir.join("follower"), Some(&etcd.url), 0);
        assert_eq!(inspect(&follower, "w")["name"], "w");
        let (got, answer) = post(&follower, "/v1/volumes/w/detach", b"");
        assert_eq!(got, 503, "{answer}");
        let msg = answer["error"].as_str().unwrap();
        assert!(
            msg.contains("is not the leader") && msg.contains(&control.url),
            "{msg}"
        );
    }
}

#[test]
fn volumes_on_the_embedded_store() {
    volumes_end_to_end("volumes-embedded", None);
}

#[test]
fn volumes_on_etcd() {
    let dir = test_dir("volumes-etcd-store");
    let Some(etcd) = Etcd::start(&dir) else {
        return;
    };
    volumes_end_to_end("volumes-etcd", Some(&etcd));
}

/// Starts a control process on `port` (the nodes heartbeat to that URL across restarts).
fn control_on(dir: &Path, etcd: Option<&Etcd>, port: u16, extra: &[&str]) -> Control {
    Control::start_with(dir, etcd.map(|e| e.url.as_str()), port, extra)
}

fn crash_mid_create(test: &str, etcd: Option<&Etcd>) {
    let dir = test_dir(test);
    let port = free_port();
    let mut control = control_on(&dir.join("control"), etcd, port, &["--no-reconcile"]);
    let nodes: Vec<NodeProc> = ["a", "b", "c"]
        .iter()
        .map(|id| NodeProc::start(&dir.join(id), &control.url, id, &[]))
        .collect();
    for id in ["a", "b", "c"] {
        control.wait_state(id, "up");
    }
    wait_for("leadership", STATE_TIMEOUT, || {
        control.is_leader().then_some(())
    });
    let (got, answer) = post(
        &control,
        "/v1/volumes",
        br#"{"name": "pg", "size_bytes": 8388608, "replicas": 2}"#,
    );
    assert_eq!(got, 201, "{answer}");
    let placed = replica_nodes(&answer);
    assert_eq!(placed.len(), 2);
    // Recorded, not acted on: no node has anything yet.
    for n in &nodes {
        assert!(node_objects(&n.admin).is_empty());
    }
    control.kill9();

    let check = |control: &Control| {
        let v = wait_for("the create to finish", STATE_TIMEOUT, || {
            let v = inspect(control, "pg");
            v["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .all(|r| r["placement"] == "created")
                .then_some(v)
        });
        assert_eq!(
            replica_nodes(&v),
            placed,
            "the placement is the recorded one"
        );
        for (id, n) in ["a", "b", "c"].iter().zip(&nodes) {
            let expect: &[&str] = if placed.iter().any(|p| p == id) {
                &["pg"]
            } else {
                &[]
            };
            assert_eq!(node_objects(&n.admin), expect, "node {id}");
        }
        assert_eq!(control.get("/v1/volumes").as_array().unwrap().len(), 1);
    };
    let mut control = control_on(&dir.join("control"), etcd, port, &[]);
    check(&control);
    control.kill9();
    let control = control_on(&dir.join("control"), etcd, port, &[]);
    wait_for("leadership", STATE_TIMEOUT, || {
        control.is_leader().then_some(())
    });
    check(&control);
}

#[test]
fn a_create_recorded_before_a_crash_is_finished_once_embedded() {
    crash_mid_create("crash-create-embedded", None);
}

#[test]
fn a_create_recorded_before_a_crash_is_finished_once_etcd() {
    let dir = test_dir("crash-create-etcd-store");
    let Some(etcd) = Etcd::start(&dir) else {
        return;
    };
    crash_mid_create("crash-create-etcd", Some(&etcd));
}
