//! Guards re-replication end to end with real processes on loopback, once on the embedded
//! store and once on etcd: four nodes, a 2-replica volume attached on one of its replica
//! nodes, data written through NBD and flushed; the other replica node is killed (`kill -9`).
//! After `--replica-grace` the record marks its replica `lost` and places a new one on the
//! fourth node; the nexus rebuilds it online and the in-sync record lists it; the lost replica
//! then becomes `deleting`, the volume has its two in-sync replicas again, `nexus verify`
//! finds both copies identical and the data reads back. When the killed node comes back, its
//! stale replica volume is deleted and the lost entry leaves the record.

mod common;

#[path = "../../engine/tests/common/nbd_client.rs"]
mod nbd_client;

use common::{metric_of, node_objects, test_dir, wait_for, Control, Etcd, NodeProc, STATE_TIMEOUT};
use serde_json::Value;
use std::process::Command;

const MIB: u64 = 1 << 20;
/// The test's `--replica-grace`, in seconds.
const GRACE_S: &str = "2";
/// The test's pattern: 64 KiB at each offset, different per offset.
const PATTERN_OFFSETS: [u64; 3] = [0, 4 * MIB, 15 * MIB];

fn pattern(i: usize) -> Vec<u8> {
    (0..64 * 1024u32)
        .map(|b| (b as u8) ^ (i as u8 * 41))
        .collect()
}

fn nbd(uri: &str) -> nbd_client::Client {
    let rest = uri.strip_prefix("nbd://").unwrap();
    let (addr, export) = rest.split_once('/').unwrap();
    let ep = nbd_client::Endpoint::Tcp(addr.parse().unwrap());
    nbd_client::Client::connect(&ep, export, nbd_client::Options::default())
        .unwrap_or_else(|e| panic!("NBD connect to {uri}: {e}"))
}

fn read_back(uri: &str) {
    let mut c = nbd(uri);
    for (i, offset) in PATTERN_OFFSETS.into_iter().enumerate() {
        let back = c.read(offset, 64 * 1024).unwrap().expect("read succeeds");
        assert!(back == pattern(i), "{uri}: read back at {offset} differs");
    }
}

/// (node, placement state) of each replica in the volume's view.
fn placements(v: &Value) -> Vec<(String, String)> {
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["node"].as_str().unwrap().to_string(),
                r["placement"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn in_sync(control: &Control) -> Vec<String> {
    let r = control.get("/v1/volumes/v/insync");
    r["in_sync"]
        .as_array()
        .map(|a| a.iter().map(|n| n.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

fn rereplication(test: &str, etcd: Option<&Etcd>) {
    let dir = test_dir(test);
    let control = Control::start_with(
        &dir.join("control"),
        etcd.map(|e| e.url.as_str()),
        0,
        &["--replica-grace", GRACE_S],
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
    let (code, _, err) =
        control.ctl(&["volume", "create", "v", "--size", "16M", "--replicas", "2"]);
    assert_eq!(code, 0, "{err}");
    let v = control.get("/v1/volumes/v");
    let holders: Vec<String> = placements(&v).into_iter().map(|(n, _)| n).collect();
    assert_eq!(holders.len(), 2, "{v}");
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
    let uri = uri.trim().to_string();
    {
        let mut c = nbd(&uri);
        for (i, offset) in PATTERN_OFFSETS.into_iter().enumerate() {
            assert_eq!(
                c.write(offset, &pattern(i), 0).unwrap(),
                0,
                "write at {offset}"
            );
        }
        let flush = cairn_engine::frontend::nbd::proto::cmd::FLUSH;
        assert_eq!(c.simple(flush, 0, 0, 0).unwrap(), 0, "flush");
    }

    // The other replica node dies; past the grace it is replaced on the spare node.
    nodes[index(&lost)].kill9();
    control.wait_state(&lost, "down");
    wait_for("the replacement in sync", STATE_TIMEOUT, || {
        let p = placements(&control.get("/v1/volumes/v"));
        let done = p.contains(&(lost.clone(), "deleting".into()))
            && p.contains(&(spare.clone(), "created".into()));
        done.then_some(())
    });
    let listed = in_sync(&control);
    assert!(
        listed.contains(&at) && listed.contains(&spare) && !listed.contains(&lost),
        "in-sync record: {listed:?}"
    );
    let v = control.get("/v1/volumes/v");
    let serving: Vec<&Value> = v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["state"] == "in_sync")
        .collect();
    assert_eq!(serving.len(), 2, "the replica count is restored: {v}");
    let out = Command::new(env!("CARGO_BIN_EXE_cairnctl"))
        .args([
            "node",
            "--addr",
            &nodes[index(&at)].admin,
            "--json",
            "nexus",
            "verify",
            "v",
        ])
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
        verify["replicas"].as_array().map(Vec::len),
        Some(2),
        "{verify}"
    );
    read_back(&uri);
    let metrics = control.metrics();
    assert_eq!(
        metric_of(&metrics, "cairn_control_replicas_replaced_total"),
        1
    );
    println!(
        "rebuild bytes last seen: {}",
        metric_of(&metrics, "cairn_control_rebuild_bytes")
    );

    // The lost node comes back: its stale replica volume is deleted, the entry dropped.
    let i = index(&lost);
    nodes[i] = NodeProc::start(
        &dir.join(&lost),
        &control.url,
        &lost,
        &["--zone", &format!("z{}", i + 1)],
    );
    wait_for("the stale replica deleted", STATE_TIMEOUT, || {
        let p = placements(&control.get("/v1/volumes/v"));
        (!p.iter().any(|(n, _)| n == &lost)).then_some(())
    });
    assert!(node_objects(&nodes[i].admin).is_empty());
    assert_eq!(node_objects(&nodes[index(&spare)].admin), ["v"]);
    read_back(&uri);
}

#[test]
fn rereplication_on_the_embedded_store() {
    rereplication("rereplicate-embedded", None);
}

#[test]
fn rereplication_on_etcd() {
    let dir = test_dir("rereplicate-etcd-store");
    let Some(etcd) = Etcd::start(&dir) else {
        return;
    };
    rereplication("rereplicate-etcd", Some(&etcd));
}
