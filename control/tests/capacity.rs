//! Guards the pool capacity refresh that placement reads, with real processes on loopback,
//! once on the embedded store and once on etcd: a registered cairn-node reports its pools'
//! free capacity in every heartbeat, and the control process rewrites the node record only
//! when that capacity changed. Idle heartbeats write nothing (`cairn_control_pool_updates_total`
//! stays 0 over several of them); writing data into a thin volume (through NBD, with qemu-io)
//! allocates clusters, and `GET /v1/nodes` shows the lower free capacity within a few
//! heartbeats through a rewritten record, and once it stops moving the heartbeats write
//! nothing again. Before this, capacity was sent at registration only and went stale.

mod common;

use common::{metric_of, test_dir, wait_for, Control, Etcd, NodeProc, STATE_TIMEOUT};
use std::process::Command;

/// Heartbeats to wait through when checking that nothing was written (the interval is 500 ms).
const QUIET_HEARTBEATS: u64 = 4;
/// What the test writes into the volume: four 1 MiB clusters.
const WRITE_BYTES: u64 = 4 << 20;

fn heartbeats(control: &Control) -> u64 {
    metric_of(&control.metrics(), "cairn_control_heartbeats_total")
}

fn pool_updates(control: &Control) -> u64 {
    metric_of(&control.metrics(), "cairn_control_pool_updates_total")
}

fn free_bytes(control: &Control, id: &str) -> u64 {
    control.node(id).unwrap()["free_bytes"].as_u64().unwrap()
}

/// Waits until the control process has served `QUIET_HEARTBEATS` more heartbeats.
fn wait_heartbeats(control: &Control) {
    let from = heartbeats(control);
    wait_for("heartbeats", STATE_TIMEOUT, || {
        (heartbeats(control) >= from + QUIET_HEARTBEATS).then_some(())
    });
}

fn cairnctl(node: &NodeProc, args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_cairnctl"))
        .args(["node", "--addr", &node.admin])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cairnctl node {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn capacity_refresh(test: &str, etcd: Option<&Etcd>) {
    let dir = test_dir(test);
    let control = Control::start(&dir.join("control"), etcd.map(|e| e.url.as_str()), 0);
    let node = NodeProc::start(&dir.join("n1"), &control.url, "n1", &[]);
    control.wait_state("n1", "up");
    let registered = free_bytes(&control, "n1");
    assert!(registered > WRITE_BYTES, "free {registered}");

    wait_heartbeats(&control);
    assert_eq!(
        pool_updates(&control),
        0,
        "heartbeats with unchanged capacity rewrote the record"
    );

    cairnctl(&node, &["volume", "create", "v", "64M"]);
    cairnctl(&node, &["export", "add", "v"]);
    let out = Command::new("qemu-io")
        .args(["-f", "raw", "-c", &format!("write -P 0xab 0 {WRITE_BYTES}")])
        .arg(format!("nbd://{}/v", node.nbd))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-io: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = wait_for("the lower free capacity", STATE_TIMEOUT, || {
        let free = free_bytes(&control, "n1");
        (free <= registered - WRITE_BYTES).then_some(free)
    });
    println!(
        "{test}: free {registered} -> {after} bytes after writing {WRITE_BYTES}; {} record \
         rewrites",
        pool_updates(&control)
    );
    let updates = pool_updates(&control);
    assert!(
        updates >= 1,
        "the capacity changed without a recorded update"
    );

    wait_heartbeats(&control);
    assert_eq!(
        pool_updates(&control),
        updates,
        "heartbeats after the capacity settled rewrote the record"
    );
    assert_eq!(free_bytes(&control, "n1"), after);
}

#[test]
fn capacity_refresh_embedded() {
    if !cairn_testkit::require_tool("qemu-io", "qemu-utils") {
        return;
    }
    capacity_refresh("capacity-embedded", None);
}

#[test]
fn capacity_refresh_etcd() {
    if !cairn_testkit::require_tool("qemu-io", "qemu-utils") {
        return;
    }
    let dir = test_dir("capacity-etcd-server");
    let Some(etcd) = Etcd::start(&dir) else {
        return;
    };
    capacity_refresh("capacity-etcd", Some(&etcd));
}
