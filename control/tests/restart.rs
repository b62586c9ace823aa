//! Guards the control plane across crashes and restarts of its own processes, with real
//! processes on loopback, once on the embedded store and once on etcd (issue 14, "killed
//! mid-create and mid-failover" and "everything restarts"). One cluster per store (a
//! cairn-control on a fixed port, node-a, node-b and node-c in three zones) runs the scenarios
//! in turn:
//!
//! * killed mid-create: node-c is frozen (SIGSTOP) while its heartbeats go on (the test sends
//!   them for it), so it stays `up`, is placed, and every call to it hangs. A 3-replica create
//!   is recorded, node-a's and node-b's replicas are made and recorded, node-c's stays
//!   `creating`; then cairn-control is killed (`kill -9`), node-c thawed, and cairn-control
//!   restarted on the same store and port. The reconcile loop finishes the create exactly
//!   once: three replicas on three nodes, each node holding exactly the recorded replica (no
//!   orphan, no duplicate), and the same create again answers 200 with the same record. The
//!   wait for node-a's and node-b's replicas also guards the reconcile loop's bound on listing
//!   a node (`NODE_LIST_TIMEOUT`): before it, the frozen node held every pass for the 30 s
//!   call timeout, and that wait timed out.
//! * killed mid-failover: a 3-replica volume attached to node-a, data written and flushed; the
//!   replica node that failover picks (the first in-sync one in record order) is frozen with
//!   its heartbeats kept alive, node-a is killed; the failover is recorded (the new attach
//!   node, a raised epoch, no NBD URI: its nexus cannot be opened), and then cairn-control is
//!   killed, the target thawed and cairn-control restarted. Afterwards exactly one nexus serves
//!   the volume, on the recorded attach node, with its URI recorded; the epoch never went back;
//!   the data reads back; and node-a, restarted, is resynced into the in-sync record.
//! * everything restarts, twice (every process killed with `kill -9`, then every process
//!   stopped with SIGTERM): cairn-control comes back on its port and the nodes on their data
//!   directories at new ports, the attach node first (a replica node back before it would
//!   rightly take the volume over: tests/failover.rs; on etcd the test waits until etcd has
//!   dropped every node lease, so that the new leader finds every node gone at once). The volumes, their sizes, replica nodes
//!   and states, the attach node and the in-sync set are the same as before; the epoch moved
//!   forward; every node holds exactly its recorded replicas; the data reads back through the
//!   new URI.

mod common;

#[path = "../../engine/tests/common/nbd_client.rs"]
mod nbd_client;
#[path = "common/pattern.rs"]
mod pattern;

use pattern::{read_back, write_pattern};

use common::{
    free_port, node_nexuses, node_objects, placements, replica_nodes, test_dir, wait_for, Control,
    Etcd, HeartbeatsFor, NodeProc, TestDir, STATE_TIMEOUT,
};
use serde_json::Value;

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

struct Cluster {
    etcd: Option<String>,
    /// cairn-control's port, kept across its restarts (the nodes know it by its URL).
    port: u16,
    control: Control,
    nodes: Vec<Option<NodeProc>>,
    /// Last: removed after the processes were killed.
    dir: TestDir,
}

impl Cluster {
    fn start(test: &str, etcd: Option<&Etcd>) -> Cluster {
        let dir = test_dir(test);
        let port = free_port();
        let etcd = etcd.map(|e| e.url.clone());
        let control = Control::start(&dir.join("control"), etcd.as_deref(), port);
        let mut c = Cluster {
            dir,
            etcd,
            port,
            control,
            nodes: NODES.iter().map(|_| None).collect(),
        };
        for i in 0..NODES.len() {
            c.start_node(i);
        }
        for id in NODES {
            c.control.wait_state(id, "up");
        }
        c.control.wait_leader();
        c
    }

    /// Starts node `i` on its data directory (new ports each time).
    fn start_node(&mut self, i: usize) {
        self.nodes[i] = Some(NodeProc::start(
            &self.dir.join(NODES[i]),
            &self.control.url,
            NODES[i],
            &["--zone", &format!("z{i}")],
        ));
    }

    /// Starts cairn-control again on its store and port (the last one must be gone).
    fn start_control(&mut self) {
        self.control = Control::start(&self.dir.join("control"), self.etcd.as_deref(), self.port);
        self.control.wait_leader();
    }

    fn node(&self, id: &str) -> &NodeProc {
        self.nodes[index(id)].as_ref().expect("node running")
    }

    fn inspect(&self, name: &str) -> Value {
        self.control.get(&format!("/v1/volumes/{name}"))
    }

    /// The in-sync set of volume `name`, sorted.
    fn in_sync(&self, name: &str) -> Vec<String> {
        let mut set = strings(&self.control.get(&format!("/v1/volumes/{name}/insync"))["in_sync"]);
        set.sort();
        set
    }

    fn post(&self, path: &str, body: &[u8]) -> (u16, Value) {
        let r = self.control.client.post_json(path, body).unwrap();
        let answer = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
        (r.status, answer)
    }

    /// Runs a `cairnctl volume …` command that must succeed.
    fn ctl(&self, args: &[&str]) {
        let (code, out, err) = self.control.ctl(args);
        assert_eq!(code, 0, "cairnctl {args:?}: {out}{err}");
    }

    /// Every running node holds exactly the replica volumes the records place on it.
    fn check_objects(&self) {
        let volumes = self.control.get("/v1/volumes");
        for (i, id) in NODES.iter().enumerate() {
            let Some(n) = &self.nodes[i] else { continue };
            let mut expect: Vec<String> = volumes
                .as_array()
                .unwrap()
                .iter()
                .filter(|v| replica_nodes(v).iter().any(|r| r == id))
                .map(|v| v["name"].as_str().unwrap().to_string())
                .collect();
            expect.sort();
            assert_eq!(node_objects(&n.admin), expect, "objects on {id}: {volumes}");
        }
    }
}

fn index(id: &str) -> usize {
    NODES.iter().position(|n| *n == id).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// The attach point once its nexus is exported: (node, NBD URI).
fn attached(v: &Value) -> Option<(String, String)> {
    let a = &v["attached"];
    Some((
        a["node"].as_str()?.to_string(),
        a["nbd_uri"].as_str()?.to_string(),
    ))
}

fn crash_mid_create(c: &mut Cluster) {
    let heartbeats = HeartbeatsFor::start(&c.control, "node-c");
    c.node("node-c").freeze();
    let (code, created) = c.post(
        "/v1/volumes",
        br#"{"name": "m", "size_bytes": 8388608, "replicas": 3}"#,
    );
    assert_eq!(code, 201, "{created}");
    let placed = replica_nodes(&created);
    let mut sorted = placed.clone();
    sorted.sort();
    assert_eq!(sorted, NODES, "three replicas on three nodes: {created}");
    // The pass skips the hung node-c and records the other two replicas as made.
    let v = wait_for(
        "node-a's and node-b's replicas recorded, node-c's pending",
        STATE_TIMEOUT,
        || {
            let v = c.inspect("m");
            placements(&v)
                .iter()
                .all(|(node, p)| {
                    p == if node == "node-c" {
                        "creating"
                    } else {
                        "created"
                    }
                })
                .then_some(v)
        },
    );
    for id in ["node-a", "node-b"] {
        assert_eq!(node_objects(&c.node(id).admin), ["m"], "{id}: {v}");
    }
    c.control.kill9();
    c.node("node-c").thaw();
    c.start_control();
    drop(heartbeats);
    let v = wait_for("the create finished", STATE_TIMEOUT, || {
        let v = c.inspect("m");
        placements(&v)
            .iter()
            .all(|(_, p)| p == "created")
            .then_some(v)
    });
    assert_eq!(replica_nodes(&v), placed, "the recorded placement: {v}");
    assert_eq!(v["size_bytes"], 8388608);
    let names: Vec<Value> = c
        .control
        .get("/v1/volumes")
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, ["m"], "one volume");
    c.check_objects();
    // The same create again: 200 and the same record; the nodes unchanged.
    let (code, again) = c.post(
        "/v1/volumes",
        br#"{"name": "m", "size_bytes": 8388608, "replicas": 3}"#,
    );
    assert_eq!(code, 200, "{again}");
    assert_eq!(replica_nodes(&again), placed, "{again}");
    assert_eq!(again["size_bytes"], 8388608);
    assert_eq!(again["created_unix_ms"], created["created_unix_ms"]);
    c.check_objects();
}

/// Waits for volume `name` served at its recorded attach point, checking on every look that
/// the epoch never goes back from `floor`; returns (node, URI, epoch).
fn wait_served(c: &Cluster, name: &str, mut floor: u64) -> (String, String, u64) {
    wait_for(&format!("volume {name} served"), STATE_TIMEOUT, || {
        let v = c.inspect(name);
        let epoch = v["epoch"].as_u64().unwrap();
        assert!(epoch >= floor, "the epoch went back from {floor}: {v}");
        floor = epoch;
        let (node, uri) = attached(&v)?;
        let nbd = c.nodes[index(&node)].as_ref()?.nbd.clone();
        (uri == format!("nbd://{nbd}/{name}")).then_some((node, uri, epoch))
    })
}

/// Exactly one running node serves a nexus of volume `name`, and it is `at`.
fn one_nexus(c: &Cluster, name: &str, at: &str) -> bool {
    let serving: Vec<&str> = NODES
        .iter()
        .zip(&c.nodes)
        .filter_map(|(id, n)| Some((*id, n.as_ref()?)))
        .filter(|(_, n)| node_nexuses(&n.admin).iter().any(|x| x == name))
        .map(|(id, _)| id)
        .collect();
    serving == [at]
}

fn crash_mid_failover(c: &mut Cluster) {
    c.ctl(&["volume", "create", "f", "--size", "16M", "--replicas", "3"]);
    c.ctl(&["volume", "attach", "f", "--node", "node-a"]);
    let (_, uri, epoch) = wait_served(c, "f", 1);
    assert_eq!(epoch, 1);
    write_pattern(&uri);
    // Failover picks the first replica in record order that is up, created and in sync.
    let v = c.inspect("f");
    let in_sync = c.in_sync("f");
    let target = replica_nodes(&v)
        .into_iter()
        .find(|n| n != "node-a" && in_sync.contains(n))
        .unwrap_or_else(|| panic!("an in-sync replica off node-a: {v} {in_sync:?}"));
    let heartbeats = HeartbeatsFor::start(&c.control, &target);
    c.node(&target).freeze();
    c.nodes[0].take().expect("node-a runs").kill9();
    let v = wait_for("the failover recorded", STATE_TIMEOUT, || {
        let v = c.inspect("f");
        let node = v["attached"]["node"].as_str().unwrap();
        assert!(
            node == "node-a" || node == target,
            "failover to {target} only: {v}"
        );
        (node == target).then_some(v)
    });
    assert_eq!(v["epoch"], 2, "{v}");
    assert!(
        v["attached"]["nbd_uri"].is_null(),
        "the frozen target cannot have opened the nexus: {v}"
    );
    c.control.kill9();
    c.node(&target).thaw();
    c.start_control();
    drop(heartbeats);
    let (node, uri, epoch) = wait_served(c, "f", 2);
    println!("after the crash mid-failover: served on {node} at epoch {epoch}");
    wait_for("one nexus, on the attach node", STATE_TIMEOUT, || {
        one_nexus(c, "f", &node).then_some(())
    });
    read_back(&uri);
    // node-a comes back (once its record is down, as a restart at new ports must) and is
    // resynced into the in-sync set.
    c.control.wait_state("node-a", "down");
    c.start_node(0);
    wait_for("node-a back in sync", STATE_TIMEOUT, || {
        (c.in_sync("f") == NODES).then_some(())
    });
    let (again, _, _) = wait_served(c, "f", epoch);
    assert_eq!(again, node, "the attach point stays");
    assert!(one_nexus(c, "f", &node));
    read_back(&uri);
}

/// What must survive a restart of everything: each volume's name, size, replica count,
/// replicas (node, state, placement) in record order and attach node, and each attached
/// volume's in-sync set.
fn state(c: &Cluster) -> Value {
    let volumes = c.control.get("/v1/volumes");
    let view: Vec<Value> = volumes
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            let name = v["name"].as_str().unwrap();
            let replicas: Vec<Value> = v["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| serde_json::json!([r["node"], r["state"], r["placement"]]))
                .collect();
            let in_sync = (!v["attached"].is_null()).then(|| c.in_sync(name));
            serde_json::json!({
                "name": name,
                "size_bytes": v["size_bytes"],
                "replicas_wanted": v["replicas_wanted"],
                "replicas": replicas,
                "attached": v["attached"]["node"],
                "in_sync": in_sync,
            })
        })
        .collect();
    Value::Array(view)
}

#[derive(Clone, Copy, Debug)]
enum Stop {
    Kill,
    Term,
}

fn everything_restarts(c: &mut Cluster, etcd: Option<&Etcd>, how: Stop) {
    let before = state(c);
    let (at, _, epoch) = wait_served(c, "f", 1);
    for slot in &mut c.nodes {
        let mut n = slot.take().expect("node running");
        match how {
            Stop::Kill => n.kill9(),
            Stop::Term => n.terminate(),
        }
    }
    match how {
        Stop::Kill => c.control.kill9(),
        Stop::Term => c.control.terminate(),
    }
    if let Some(etcd) = etcd {
        // etcd expires the node leases on its own, each at its own time, while no control
        // process runs. Once all are gone, the new leader finds every node expired in one look
        // and marks them down in one transaction, as the embedded store (which gives every
        // lease a fresh TTL when it opens) makes them expire together. Started earlier, the
        // leader would rightly see the attach node down while another replica node's lease
        // still ran, and fail over to it.
        wait_for("etcd to drop every node lease", STATE_TIMEOUT, || {
            (etcd.count("/cairn/v1/node-leases/") == 0).then_some(())
        });
    }
    c.start_control();
    // A node restarted at new ports is refused while its old record is up.
    for id in NODES {
        c.control.wait_state(id, "down");
    }
    c.start_node(index(&at));
    for id in NODES.iter().filter(|id| **id != at) {
        c.start_node(index(id));
    }
    let after = wait_for("the state as before the restart", STATE_TIMEOUT, || {
        let s = state(c);
        (s == before).then_some(s)
    });
    println!("{how:?}: state after the restart: {after}");
    let (node, uri, raised) = wait_served(c, "f", epoch);
    assert_eq!(node, at, "the same attach node");
    assert!(
        raised > epoch,
        "the reopened nexus has a new epoch: {raised} after {epoch}"
    );
    wait_for("one nexus, on the attach node", STATE_TIMEOUT, || {
        one_nexus(c, "f", &node).then_some(())
    });
    c.check_objects();
    read_back(&uri);
}

fn restarts(test: &str, etcd: Option<&Etcd>) {
    let mut c = Cluster::start(test, etcd);
    crash_mid_create(&mut c);
    crash_mid_failover(&mut c);
    everything_restarts(&mut c, etcd, Stop::Kill);
    everything_restarts(&mut c, etcd, Stop::Term);
}

#[test]
fn crashes_and_restarts_on_the_embedded_store() {
    restarts("restart-embedded", None);
}

#[test]
fn crashes_and_restarts_on_etcd() {
    let dir = test_dir("restart-etcd-store");
    let Some(etcd) = Etcd::start(&dir) else {
        return;
    };
    restarts("restart-etcd", Some(&etcd));
}
