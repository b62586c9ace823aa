//! Guards membership end to end with real processes on loopback, once on the embedded store
//! and once on etcd: cairn-control and two cairn-node processes register; `kill -9` of a node
//! gets it marked down (durably, in the store) once its lease expires while the other stays
//! up; the restarted node is up again; a node that claims a live node's id from other
//! addresses is refused with both addresses in its error and exits 1. On etcd, killing the
//! leading control process hands leadership to the other, which then does the leader's job
//! (marking nodes down) with no duplicated records, and a node given both processes'
//! URLs keeps its lease through the survivor. On the embedded store, a restarted
//! cairn-control keeps the records (and a dead node stays down), and a second cairn-control
//! on the same data directory is refused.

mod common;

use cairn_control::membership::NODE_LEASE_TTL_S;
use common::{free_port, metric_of, test_dir, wait_for, Control, Etcd, NodeProc, STATE_TIMEOUT};
use std::time::{Duration, Instant};

fn membership_end_to_end(test: &str, etcd: Option<&Etcd>) {
    let dir = test_dir(test);
    let control = Control::start(&dir.join("control"), etcd.map(|e| e.url.as_str()), 0);
    let mut n1 = NodeProc::start(
        &dir.join("n1"),
        &control.url,
        "n1",
        &["--zone", "z1", "--rack", "r1"],
    );
    let n2 = NodeProc::start(&dir.join("n2"), &control.url, "n2", &["--zone", "z2"]);
    control.wait_state("n1", "up");
    control.wait_state("n2", "up");
    let v1 = control.node("n1").unwrap();
    assert_eq!(v1["addresses"]["admin"], n1.admin.as_str());
    assert_eq!(v1["addresses"]["replica"], n1.replica.as_str());
    assert_eq!(v1["addresses"]["nbd"], n1.nbd.as_str());
    assert_eq!(
        (v1["zone"].as_str(), v1["rack"].as_str()),
        (Some("z1"), Some("r1"))
    );
    assert!(v1["free_bytes"].as_u64().unwrap() > 0, "{v1}");
    assert_eq!(v1["pools"][0]["name"], "pool0");
    let v2 = control.node("n2").unwrap();
    assert_eq!(
        v2["rack"],
        cairn_control_api::hostname().as_str(),
        "the rack defaults to the host name"
    );

    // cairnctl node ls: a table and JSON.
    let (code, table, err) = control.ctl(&["node", "ls"]);
    assert_eq!(code, 0, "{err}");
    let row = table
        .lines()
        .find(|l| l.starts_with("n1 "))
        .unwrap_or_else(|| panic!("{table}"));
    for cell in [
        "up",
        "z1",
        "r1",
        n1.admin.as_str(),
        n1.replica.as_str(),
        "ago",
    ] {
        assert!(row.contains(cell), "{cell} missing from: {row}");
    }
    let (code, json, err) = control.ctl(&["node", "ls", "--json"]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);

    // A second node claiming n1 from other addresses is refused, naming both.
    let out = common::node_command(&dir.join("dup"), &control.url, "n1", &[])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dup_admin = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("admin="))
        .unwrap_or_else(|| panic!("no ready line: {stdout} {stderr}"));
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("HTTP 409"), "{stderr}");
    assert!(
        stderr.contains(&n1.admin) && stderr.contains(dup_admin),
        "both addresses: {stderr}"
    );
    assert_eq!(
        control.node("n1").unwrap()["addresses"]["admin"],
        n1.admin.as_str()
    );

    // kill -9 n1: marked down once its lease expires; n2 stays up (waited for, not sampled: a
    // starved machine may delay a heartbeat past the lease, and n2 then registers again,
    // which is correct too).
    n1.kill9();
    let down = control.wait_state("n1", "down");
    println!("{test}: n1 marked down {down:?} after kill -9 (lease 2 s, heartbeat 0.5 s)");
    control.wait_state("n2", "up");
    assert!(control.node("n1").unwrap()["down_since_unix_ms"]
        .as_u64()
        .is_some());
    let m = control.metrics();
    assert_eq!(metric_of(&m, "cairn_control_nodes{state=\"up\"}"), 1);
    assert_eq!(metric_of(&m, "cairn_control_nodes{state=\"down\"}"), 1);
    assert_eq!(metric_of(&m, "cairn_control_leader"), 1);
    assert!(metric_of(&m, "cairn_control_nodes_marked_down_total") >= 1);

    // Restarted (new ports, the same data): up again as a new incarnation.
    let n1 = NodeProc::start(
        &dir.join("n1"),
        &control.url,
        "n1",
        &["--zone", "z1", "--rack", "r1"],
    );
    control.wait_state("n1", "up");
    let v1 = control.node("n1").unwrap();
    assert_eq!(v1["addresses"]["admin"], n1.admin.as_str());
    assert_eq!(v1["incarnation"], 2);
    drop(n2);
}

#[test]
fn membership_on_the_embedded_store() {
    membership_end_to_end("members-embedded", None);
}

#[test]
fn membership_on_etcd() {
    let dir = test_dir("members-etcd-store");
    let Some(etcd) = Etcd::start(&dir) else {
        return;
    };
    membership_end_to_end("members-etcd", Some(&etcd));
}

#[test]
fn the_leader_is_taken_over_when_it_dies() {
    let dir = test_dir("takeover");
    let Some(etcd) = Etcd::start(&dir) else {
        return;
    };
    let mut c1 = Control::start(&dir.join("c1"), Some(&etcd.url), 0);
    wait_for("c1 to lead", STATE_TIMEOUT, || c1.is_leader().then_some(()));
    let c2 = Control::start(&dir.join("c2"), Some(&etcd.url), 0);
    let seen = c2.get("/v1/leader");
    assert_eq!(seen["is_leader"], false);
    assert_eq!(seen["leader"]["listen"], c1.url.as_str());
    // A follower serves registrations too: the store's compare-and-swap arbitrates.
    let mut n1 = NodeProc::start(&dir.join("n1"), &c2.url, "n1", &[]);
    c2.wait_state("n1", "up");
    assert_eq!(metric_of(&c2.metrics(), "cairn_control_leader"), 0);
    // n2 names both processes, c1 first: when c1 dies its heartbeats go to c2.
    let both = format!("{},{}", c1.url, c2.url);
    let _n2 = NodeProc::start(&dir.join("n2"), &both, "n2", &[]);
    c2.wait_state("n2", "up");

    c1.kill9();
    let start = Instant::now();
    wait_for("c2 to take over", STATE_TIMEOUT, || {
        c2.is_leader().then_some(())
    });
    println!(
        "c2 led {:?} after kill -9 of c1 (leader lease 2 s)",
        start.elapsed()
    );
    assert_eq!(c2.get("/v1/leader")["leader"]["listen"], c2.url.as_str());
    let nodes = c2.get("/v1/nodes");
    assert_eq!(nodes.as_array().unwrap().len(), 2, "{nodes}");
    c2.wait_state("n1", "up");
    // Two leases after c2 leads (it marks expired leases down): n2 kept its first
    // registration alive through c2, so it is up with incarnation 1.
    std::thread::sleep(Duration::from_secs(2 * NODE_LEASE_TTL_S));
    let n2 = c2.node("n2").unwrap();
    assert_eq!(
        (n2["state"].as_str(), n2["incarnation"].as_u64()),
        (Some("up"), Some(1)),
        "{n2}"
    );
    // The new leader does the leader's job.
    n1.kill9();
    c2.wait_state("n1", "down");
    assert_eq!(metric_of(&c2.metrics(), "cairn_control_leader"), 1);
    assert_eq!(c2.get("/v1/nodes").as_array().unwrap().len(), 2);
}

#[test]
fn a_restarted_embedded_control_keeps_its_records() {
    let dir = test_dir("restart");
    let port = free_port();
    let mut control = Control::start(&dir.join("control"), None, port);
    let mut n1 = NodeProc::start(&dir.join("n1"), &control.url, "n1", &[]);
    control.wait_state("n1", "up");

    // A second control process on the same directory is refused, naming the holder.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairn-control"))
        .arg("--data-dir")
        .arg(dir.join("control"))
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("in use by another cairn-control")
            && stderr.contains(&control.child.id().to_string()),
        "{stderr}"
    );

    // kill -9 the control process; the restarted one on the same port has the record, and the
    // node's heartbeats renew the same lease.
    control.kill9();
    let control = Control::start(&dir.join("control"), None, port);
    let v = control.node("n1").expect("the record survived the restart");
    assert_eq!(v["incarnation"], 1, "{v}");
    std::thread::sleep(std::time::Duration::from_secs(3));
    control.wait_state("n1", "up");
    // The lease came back with the store, so heartbeats renew it; a machine too starved to
    // heartbeat within the lease makes the node register again instead, which is correct too.
    let incarnation = control.node("n1").unwrap()["incarnation"].as_u64().unwrap();
    if incarnation != 1 {
        cairn_testkit::note(format!(
            "n1 registered again (incarnation {incarnation}) after the restart"
        ));
    }

    // A node that dies is down, and a restart does not bring it back.
    n1.kill9();
    control.wait_state("n1", "down");
    drop(control);
    let control = Control::start(&dir.join("control"), None, port);
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(control.node_state("n1").as_deref(), Some("down"));
}
