//! Guards the handover of the control plane on etcd: three cairn-control processes and three
//! nodes, while a client does volume work, and the leader is killed (`kill -9`) five times at
//! different points of it:
//!
//! 1. after two creates are recorded and before any replica exists (the first leader runs
//!    with `--no-reconcile`), with one replica already made by hand on its node, as if the
//!    dead leader's call had landed and its "created" mark had not;
//! 2. right after an attach is accepted (the nexus being opened);
//! 3. right after a snapshot is accepted (being taken on each replica);
//! 4. right after a clone of it is accepted (its replicas being made);
//! 5. right after a delete is accepted (the replicas being removed), with a grow just asked.
//!
//! The client sends each command to whichever process leads, trying each in turn while a
//! follower answers "is not the leader" or none answers, and repeats each command after the
//! kill (every command is idempotent by name). The nodes reach the control processes through
//! a relay that picks any live one, as a load balancer would. Then: each kill was taken over
//! by another process; every volume exists once, with exactly its replica count on distinct
//! nodes; each node holds exactly the objects the records say (no replica made twice, none
//! orphaned, the deleted volume gone everywhere); the attached volume has one nexus and one
//! export, at epoch 1, and its data reads back; the new leader's metrics agree.

mod common;

#[path = "../../engine/tests/common/nbd_client.rs"]
mod nbd_client;
#[path = "common/pattern.rs"]
mod pattern;

use pattern::nbd;

use cairn_control_api::client::Client;
use common::{
    free_port, metric_of, node_names, node_object_size, node_objects, replica_nodes, test_dir,
    wait_for, Control, Etcd, NodeProc, Relay, STATE_TIMEOUT,
};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const CONTROLS: usize = 3;
const NODES: [&str; 3] = ["n1", "n2", "n3"];
/// How long one request to a control process may take before the client tries the next.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the client waits between rounds over every control process.
const RETRY_INTERVAL: Duration = Duration::from_millis(100);

/// The control processes (each on a fixed port, restarted there after a kill), the relay the
/// nodes use, and the nodes.
struct Cluster {
    dir: PathBuf,
    etcd: String,
    ports: [u16; CONTROLS],
    controls: Vec<Option<Control>>,
    starts: usize,
    nodes: Vec<NodeProc>,
    _relay: Relay,
}

impl Cluster {
    fn client(&self, i: usize) -> Client {
        Client::new(
            &format!("http://127.0.0.1:{}", self.ports[i]),
            REQUEST_TIMEOUT,
        )
        .unwrap()
    }

    /// Starts control process `i` on its port, with `extra` flags, in a directory of its own
    /// (so each start keeps its log).
    fn start_control(&mut self, i: usize, extra: &[&str]) {
        self.starts += 1;
        let dir = self.dir.join(format!("c{i}-{}", self.starts));
        self.controls[i] = Some(Control::start_with(
            &dir,
            Some(&self.etcd),
            self.ports[i],
            extra,
        ));
    }

    /// The index of the process that says it leads, waiting for one.
    fn leader(&self) -> usize {
        wait_for("a leader", STATE_TIMEOUT, || {
            (0..CONTROLS).find(|i| {
                self.client(*i)
                    .get("/v1/leader")
                    .ok()
                    .filter(|r| r.status == 200)
                    .and_then(|r| serde_json::from_slice::<Value>(&r.body).ok())
                    .is_some_and(|v| v["is_leader"] == true)
            })
        })
    }

    fn leader_control(&self) -> &Control {
        self.controls[self.leader()].as_ref().unwrap()
    }

    /// Sends a command to whichever process leads: a process that is gone, or a follower
    /// answering 503 (it names the leader, or says none is elected yet), sends the client on
    /// to the next one. Returns the first other answer.
    fn command(&self, method: &'static str, path: &str, body: Option<&[u8]>) -> (u16, Value) {
        wait_for(
            &format!("{method} {path} to reach a leader"),
            STATE_TIMEOUT,
            || {
                for i in 0..CONTROLS {
                    let Ok(r) = self.client(i).request(method, path, body) else {
                        continue;
                    };
                    if r.status == 503 {
                        let msg = r.error_message();
                        assert!(msg.contains("is not the leader"), "{method} {path}: {msg}");
                        continue;
                    }
                    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
                    return Some((r.status, v));
                }
                std::thread::sleep(RETRY_INTERVAL);
                None
            },
        )
    }

    /// A command that must succeed (2xx), first time or repeated.
    fn ok(&self, method: &'static str, path: &str, body: &str) -> Value {
        let body = (!body.is_empty()).then_some(body.as_bytes());
        let (status, v) = self.command(method, path, body);
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {v}"
        );
        v
    }

    /// A read from any live process (every process serves reads from the store).
    fn read(&self, path: &str) -> Option<(u16, Value)> {
        (0..CONTROLS).find_map(|i| {
            let r = self.client(i).get(path).ok()?;
            Some((r.status, serde_json::from_slice(&r.body).ok()?))
        })
    }

    fn inspect(&self, name: &str) -> Value {
        let (status, v) = wait_for("a control process to answer", STATE_TIMEOUT, || {
            self.read(&format!("/v1/volumes/{name}"))
        });
        assert_eq!(status, 200, "inspect {name}: {v}");
        v
    }

    /// Waits until `check` holds for the inspect of `name`; returns that inspect.
    fn wait_volume(&self, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        wait_for(&format!("volume {name}: {what}"), STATE_TIMEOUT, || {
            let v = self.inspect(name);
            check(&v).then_some(v)
        })
    }

    /// `kill -9` of the leader; waits until another process leads (the client's next command
    /// would wait as long), then starts the killed one again on its port as a follower.
    /// Prints how far the dead leader had carried out volume `name`'s record. Returns the new
    /// leader's index.
    fn kill_leader(&mut self, at: &str, name: &str) -> usize {
        let old = self.leader();
        self.controls[old].as_mut().unwrap().kill9();
        self.controls[old] = None;
        let start = Instant::now();
        let left = self
            .read(&format!("/v1/volumes/{name}"))
            .map_or_else(|| "unread".to_string(), |(_, v)| progress(&v));
        let held: Vec<String> = self
            .nodes
            .iter()
            .zip(NODES)
            .map(|(n, id)| format!("{id}: {:?}", node_objects(&n.admin)))
            .collect();
        let new = self.leader();
        println!(
            "kill {at}: c{old} killed with {name} recorded at {left}, the nodes holding {}; \
             c{new} led {:?} after the kill (leader lease 2 s)",
            held.join(", "),
            start.elapsed()
        );
        assert_ne!(new, old, "a surviving process takes over");
        self.start_control(old, &[]);
        new
    }

    fn node_admin(&self, id: &str) -> &str {
        let at = NODES.iter().position(|n| *n == id).unwrap();
        &self.nodes[at].admin
    }
}

/// A volume's progress as recorded: each replica's placement, the snapshots' nodes, the NBD
/// URI (or whether the record is gone).
fn progress(v: &Value) -> String {
    if v["name"].is_null() {
        return "no record".to_string();
    }
    let replicas: Vec<String> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{}:{}", r["node"].as_str().unwrap(), r["placement"]))
        .collect();
    let snapshots: Vec<String> = v["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| format!("{}@{}", s["name"], s["nodes"]))
        .collect();
    format!(
        "replicas [{}] snapshots [{}] nbd_uri {}",
        replicas.join(" "),
        snapshots.join(" "),
        v["attached"]["nbd_uri"]
    )
}

fn all_created(v: &Value) -> bool {
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["placement"] == "created")
}

/// 64 KiB per round, at a different offset and with a different fill each round.
fn block(round: u64) -> (u64, Vec<u8>) {
    let data = (0..64 * 1024u32)
        .map(|b| (b as u8) ^ (round as u8).wrapping_mul(37).wrapping_add(1))
        .collect();
    (round * 3 * MIB, data)
}

/// Writes round `round`'s block through `uri` and flushes it.
fn write_round(uri: &str, round: u64) {
    let mut c = nbd(uri);
    let (offset, data) = block(round);
    assert_eq!(c.write(offset, &data, 0).unwrap(), 0, "write at {offset}");
    let flush = cairn_engine::frontend::nbd::proto::cmd::FLUSH;
    assert_eq!(c.simple(flush, 0, 0, 0).unwrap(), 0, "flush");
}

/// Reads rounds `0..rounds` back through `uri`, on a new connection.
fn read_rounds(uri: &str, rounds: u64) {
    let mut c = nbd(uri);
    for round in 0..rounds {
        let (offset, data) = block(round);
        let back = c
            .read(offset, data.len() as u32)
            .unwrap()
            .expect("read succeeds");
        assert!(back == data, "{uri}: round {round} at {offset} differs");
    }
}

#[test]
fn the_control_leader_is_killed_during_volume_work() {
    let dir = test_dir("leader");
    let Some(etcd) = Etcd::start(&dir) else {
        return;
    };
    let ports = [free_port(), free_port(), free_port()];
    let relay = Relay::start(&ports);
    let mut c = Cluster {
        dir: dir.to_path_buf(),
        etcd: etcd.url.clone(),
        ports,
        controls: (0..CONTROLS).map(|_| None).collect(),
        starts: 0,
        nodes: Vec::new(),
        _relay: relay,
    };
    // c0 leads first, and records without acting: kill 1 lands before any node call.
    c.start_control(0, &["--no-reconcile"]);
    assert_eq!(c.leader(), 0);
    c.start_control(1, &[]);
    c.start_control(2, &[]);
    let relay_url = c._relay.url.clone();
    c.nodes = NODES
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let zone = format!("z{}", i + 1);
            NodeProc::start(&dir.join(id), &relay_url, id, &["--zone", &zone])
        })
        .collect();
    for id in NODES {
        c.leader_control().wait_state(id, "up");
    }

    // Kill 1: two creates recorded, nothing on the nodes; one replica of `a` made by hand on
    // its first node (the dead leader's call landed, its mark did not).
    let create_a = r#"{"name": "a", "size_bytes": 16777216, "replicas": 3}"#;
    let create_b = r#"{"name": "b", "size_bytes": 8388608, "replicas": 2}"#;
    let a = c.ok("POST", "/v1/volumes", create_a);
    c.ok("POST", "/v1/volumes", create_b);
    for n in &c.nodes {
        assert!(node_objects(&n.admin).is_empty(), "{}", n.admin);
    }
    let first = replica_nodes(&a)[0].clone();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairnctl"))
        .args(["node", "--addr", c.node_admin(&first), "volume", "create"])
        .args(["a", "16M"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    c.kill_leader("mid-create", "a");
    let again = c.ok("POST", "/v1/volumes", create_a);
    assert_eq!(
        replica_nodes(&again),
        replica_nodes(&a),
        "the recorded placement"
    );
    c.ok("POST", "/v1/volumes", create_b);
    c.wait_volume("a", "every replica created", all_created);
    c.wait_volume("b", "every replica created", all_created);

    // Kill 2: right after the attach is accepted.
    let attach = r#"{"node": "n1"}"#;
    c.ok("POST", "/v1/volumes/a/attach", attach);
    c.kill_leader("mid-attach", "a");
    c.ok("POST", "/v1/volumes/a/attach", attach);
    let v = c.wait_volume("a", "the NBD URI recorded", |v| {
        v["attached"]["nbd_uri"].is_string()
    });
    let uri = v["attached"]["nbd_uri"].as_str().unwrap().to_string();
    assert_eq!(uri, format!("nbd://{}/a", c.nodes[0].nbd));
    write_round(&uri, 0);

    // Kill 3: right after a snapshot is accepted.
    let snapshot = r#"{"name": "s1"}"#;
    c.ok("POST", "/v1/volumes/b/snapshot", snapshot);
    write_round(&uri, 1);
    c.kill_leader("mid-snapshot", "b");
    c.ok("POST", "/v1/volumes/b/snapshot", snapshot);
    c.wait_volume("b", "the snapshot on each replica", |v| {
        v["snapshots"][0]["nodes"].as_array().unwrap().len() == 2
    });

    // Kill 4: right after the clone of that snapshot is accepted.
    let clone = r#"{"snapshot": "s1", "name": "c"}"#;
    c.ok("POST", "/v1/volumes/b/clone", clone);
    c.kill_leader("mid-clone", "c");
    c.ok("POST", "/v1/volumes/b/clone", clone);
    write_round(&uri, 2);
    c.wait_volume("c", "every replica created", all_created);

    // Kill 5: a grow asked, then a volume created and right after its delete is accepted.
    let grow = r#"{"size_bytes": 16777216}"#;
    c.ok("POST", "/v1/volumes/c/grow", grow);
    let create_d = r#"{"name": "d", "size_bytes": 4194304, "replicas": 2}"#;
    c.ok("POST", "/v1/volumes", create_d);
    c.wait_volume("d", "every replica created", all_created);
    c.ok("DELETE", "/v1/volumes/d", "");
    c.kill_leader("mid-delete", "d");
    c.ok("POST", "/v1/volumes/c/grow", grow);
    let (status, v) = c.command("DELETE", "/v1/volumes/d", None);
    assert!(status == 200 || status == 404, "delete again: {status} {v}");
    write_round(&uri, 3);

    // Settled: d gone, the snapshot on both of b's nodes, c grown everywhere.
    wait_for("volume d deleted", STATE_TIMEOUT, || {
        (c.read("/v1/volumes/d").map(|(s, _)| s) == Some(404)).then_some(())
    });
    let grown = c.wait_volume("c", "grown", |v| v["size_bytes"] == 16 * MIB);
    for node in replica_nodes(&grown) {
        wait_for("the clone grown on its node", STATE_TIMEOUT, || {
            (node_object_size(c.node_admin(&node), "c") == 16 * MIB).then_some(())
        });
    }

    // Every volume once, with its replica count on distinct nodes, all created.
    let leader = c.leader_control();
    let volumes = leader.get("/v1/volumes");
    let names: Vec<&str> = volumes
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "c"], "{volumes}");
    let mut expected: BTreeMap<&str, Vec<String>> = NODES.iter().map(|n| (*n, vec![])).collect();
    for v in volumes.as_array().unwrap() {
        let name = v["name"].as_str().unwrap();
        let mut nodes = replica_nodes(v);
        assert_eq!(
            nodes.len() as u64,
            v["replicas_wanted"].as_u64().unwrap(),
            "{v}"
        );
        assert!(all_created(v), "{v}");
        for n in &nodes {
            expected.get_mut(n.as_str()).unwrap().push(name.to_string());
        }
        for s in v["snapshots"].as_array().unwrap() {
            for n in s["nodes"].as_array().unwrap() {
                let object = format!("{name}@{}", s["name"].as_str().unwrap());
                expected.get_mut(n.as_str().unwrap()).unwrap().push(object);
            }
        }
        nodes.sort();
        nodes.dedup();
        assert_eq!(nodes.len(), replica_nodes(v).len(), "distinct nodes: {v}");
    }
    assert_eq!(replica_nodes(&volumes[0]).len(), 3);
    // Each node holds exactly what the records say: nothing made twice, nothing orphaned.
    for id in NODES {
        let mut want = expected[id].clone();
        want.sort();
        assert_eq!(node_objects(c.node_admin(id)), want, "objects on {id}");
    }
    // One nexus and one export, on the attach node, at the attach's epoch.
    for id in NODES {
        let want: &[&str] = if id == "n1" { &["a"] } else { &[] };
        assert_eq!(
            node_names(c.node_admin(id), "nexus"),
            want,
            "nexuses on {id}"
        );
        assert_eq!(
            node_names(c.node_admin(id), "export"),
            want,
            "exports on {id}"
        );
    }
    let a = leader.get("/v1/volumes/a");
    assert_eq!(a["epoch"], 1, "{a}");
    assert_eq!(a["attached"]["nbd_uri"], uri.as_str());
    assert_eq!(leader.get("/v1/volumes/a/insync")["epoch"], 1);
    read_rounds(&uri, 4);

    // The new leader's metrics; every other process follows.
    let m = leader.metrics();
    println!("leader metrics:\n{m}");
    assert_eq!(metric_of(&m, "cairn_control_leader"), 1);
    assert_eq!(metric_of(&m, "cairn_control_leader_terms_total"), 1);
    assert_eq!(metric_of(&m, "cairn_control_nodes{state=\"up\"}"), 3);
    assert_eq!(metric_of(&m, "cairn_control_nodes{state=\"down\"}"), 0);
    assert_eq!(
        metric_of(&m, "cairn_control_volumes{health=\"healthy\"}"),
        3
    );
    for health in ["degraded", "unavailable", "deleting"] {
        let series = format!("cairn_control_volumes{{health=\"{health}\"}}");
        assert_eq!(metric_of(&m, &series), 0, "{series}");
    }
    assert_eq!(metric_of(&m, "cairn_control_failovers_total"), 0);
    assert_eq!(metric_of(&m, "cairn_control_replicas_replaced_total"), 0);
    let followers = c.controls.iter().flatten().filter(|f| !f.is_leader());
    assert_eq!(followers.clone().count(), CONTROLS - 1);
    for f in followers {
        assert_eq!(metric_of(&f.metrics(), "cairn_control_leader"), 0);
    }
}
