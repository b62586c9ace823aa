//! Guards automatic failover with real processes on loopback, on the embedded store and on
//! etcd. Three nodes (node-a, node-b, node-c) hold a 3-replica volume attached to node-a with
//! the failover hint node-c:
//!
//! * failover: an NBD writer flushes after every write and keeps a model of the acknowledged
//!   ones; node-a is killed (`kill -9`) mid-writes; the reconcile loop records a new attach
//!   point with a raised epoch on node-c (the hint), opens the nexus there, and every acknowledged write reads back
//!   through it, and so do writes made after it (the time from the kill to the first write on
//!   the new nexus is printed, not asserted);
//! * the stale-replica trap: node-c dies and writes go on until the in-sync record names it out
//!   of sync; node-a dies; the new nexus comes up on node-b, never on node-c, and every block
//!   reads back as the model says (the stale hint is passed over);
//! * no in-sync replica up: node-c dies and falls out of sync, then node-b and node-a die and
//!   node-c comes back: the only up replica is the stale one, so the volume waits (the leader
//!   says so in a warning) and node-c never serves it.

mod common;

#[path = "../../engine/tests/common/nbd_client.rs"]
mod nbd_client;

use common::{metric_of, test_dir, wait_for, Control, Etcd, NodeProc, STATE_TIMEOUT};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BLOCK: u64 = 4096;
/// The volume's size, in blocks (16 MiB).
const BLOCKS: u64 = 4096;
const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];

/// The acknowledged contents: block index to the byte it was filled with.
type Model = Arc<Mutex<BTreeMap<u64, u8>>>;

struct Cluster {
    control: Control,
    nodes: Vec<Option<NodeProc>>,
    /// Last: removed after the processes were killed.
    dir: common::TestDir,
}

impl Cluster {
    fn start(test: &str, etcd: Option<&Etcd>) -> Cluster {
        let dir = test_dir(test);
        let control = Control::start(&dir.join("control"), etcd.map(|e| e.url.as_str()), 0);
        let mut c = Cluster {
            dir,
            control,
            nodes: Vec::new(),
        };
        for i in 0..NODES.len() {
            c.nodes.push(None);
            c.restart(i);
        }
        for id in NODES {
            c.control.wait_state(id, "up");
        }
        let (code, _, err) =
            c.control
                .ctl(&["volume", "create", "v", "--size", "16M", "--replicas", "3"]);
        assert_eq!(code, 0, "{err}");
        let (code, _, err) = c.control.ctl(&[
            "volume",
            "attach",
            "v",
            "--node",
            "node-a",
            "--failover-to",
            "node-c",
        ]);
        assert_eq!(code, 0, "{err}");
        c
    }

    fn restart(&mut self, i: usize) {
        self.nodes[i] = Some(NodeProc::start(
            &self.dir.join(NODES[i]),
            &self.control.url,
            NODES[i],
            &["--zone", &format!("z{i}")],
        ));
    }

    fn kill(&mut self, i: usize) {
        self.nodes[i].take().expect("node running").kill9();
    }

    fn inspect(&self) -> Value {
        self.control.get("/v1/volumes/v")
    }

    fn insync(&self) -> Value {
        self.control.get("/v1/volumes/v/insync")
    }

    /// The attach point once its nexus is exported: (node, NBD URI).
    fn attached(&self) -> Option<(String, String)> {
        let v = self.inspect();
        let a = &v["attached"];
        Some((
            a["node"].as_str()?.to_string(),
            a["nbd_uri"].as_str()?.to_string(),
        ))
    }

    fn control_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("control").with_extension("0.log")).unwrap()
    }
}

fn nbd(uri: &str) -> std::io::Result<nbd_client::Client> {
    let rest = uri.strip_prefix("nbd://").unwrap();
    let (addr, export) = rest.split_once('/').unwrap();
    let ep = nbd_client::Endpoint::Tcp(addr.parse().unwrap());
    nbd_client::Client::connect(&ep, export, nbd_client::Options::default())
}

/// Writes block `block` filled with `fill` and flushes; true when both were acknowledged.
fn write_flushed(c: &mut nbd_client::Client, block: u64, fill: u8) -> bool {
    let data = vec![fill; BLOCK as usize];
    let flush = cairn_engine::frontend::nbd::proto::cmd::FLUSH;
    matches!(c.write(block * BLOCK, &data, 0), Ok(0)) && matches!(c.simple(flush, 0, 0, 0), Ok(0))
}

/// The fill of the `n`th write: never 0, so a block that missed its write shows.
fn fill_of(n: u64) -> u8 {
    (n % 255 + 1) as u8
}

/// Writes blocks `from..` through `uri` in a thread until `stop` or an error; each write
/// acknowledged with its flush goes into `model`.
fn writer(
    uri: String,
    from: u64,
    model: Model,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut c = nbd(&uri).unwrap_or_else(|e| panic!("NBD connect to {uri}: {e}"));
        let mut n = from;
        while !stop.load(Ordering::Relaxed) {
            let block = n % BLOCKS;
            if !write_flushed(&mut c, block, fill_of(n)) {
                break;
            }
            model.lock().unwrap().insert(block, fill_of(n));
            n += 1;
        }
        n
    })
}

/// Every block reads back through `uri` as `model` says (zero where never written).
fn check(uri: &str, model: &Model) {
    let mut c = nbd(uri).unwrap();
    let model = model.lock().unwrap();
    for (block, fill) in model.iter() {
        let back = c
            .read(block * BLOCK, BLOCK as u32)
            .unwrap()
            .expect("read succeeds");
        assert!(
            back.iter().all(|b| b == fill),
            "{uri}: block {block} should be filled with {fill}, first bytes {:?}",
            &back[..8]
        );
    }
}

/// Waits for the attach point to move off node-a; panics if it is ever node-c when
/// `never_c`. Returns (node, URI).
fn wait_failover(c: &Cluster, never_c: bool) -> (String, String) {
    wait_for("the failover off node-a", STATE_TIMEOUT, || {
        let v = c.inspect();
        let node = v["attached"]["node"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(
            !(never_c && node == "node-c"),
            "the stale replica's node was made the attach point: {v}"
        );
        if node == "node-a" {
            return None;
        }
        c.attached()
    })
}

/// Retries a write and flush of block `block` through the volume's current URI until one is
/// acknowledged; returns the URI.
fn first_write(c: &Cluster, block: u64, fill: u8, model: &Model) -> String {
    wait_for("a write on the new nexus", STATE_TIMEOUT, || {
        let (_, uri) = c.attached()?;
        let mut client = nbd(&uri).ok()?;
        write_flushed(&mut client, block, fill).then(|| {
            model.lock().unwrap().insert(block, fill);
            uri
        })
    })
}

fn failover(test: &str, etcd: Option<&Etcd>) {
    let mut c = Cluster::start(test, etcd);
    let (node, uri) = wait_for("the nexus on node-a", STATE_TIMEOUT, || c.attached());
    assert_eq!(node, "node-a");
    let (code, text, err) = c.control.ctl(&["volume", "inspect", "v"]);
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("failover to: node-c first"), "{text}");
    let model = Model::default();
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(uri.clone(), 0, model.clone(), stop.clone());
    wait_for("writes through node-a", STATE_TIMEOUT, || {
        (model.lock().unwrap().len() >= 64).then_some(())
    });
    c.kill(0);
    let killed = Instant::now();
    let written = w.join().unwrap();
    let acked = model.lock().unwrap().len();
    let (node, _) = wait_failover(&c, false);
    assert_eq!(
        node, "node-c",
        "the failover hint, in sync and up, is taken"
    );
    let uri = first_write(&c, BLOCKS - 1, 0xee, &model);
    println!(
        "{test}: failover from node-a to {node}: first acknowledged write {:?} after the kill ({acked} writes acknowledged before it)",
        killed.elapsed()
    );
    let v = c.inspect();
    assert_eq!(v["epoch"], 2, "the failover recorded a raised epoch: {v}");
    assert!(
        v["attached"]["failover_to"].is_null(),
        "the hint is used once: {v}"
    );
    assert_eq!(c.insync()["epoch"], 2, "and the in-sync record's: {v}");
    assert_eq!(
        metric_of(&c.control.metrics(), "cairn_control_failovers_total"),
        1
    );
    check(&uri, &model);
    // Writes go on through the new nexus and read back.
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(uri.clone(), written + 1, model.clone(), stop.clone());
    wait_for("writes through the new nexus", STATE_TIMEOUT, || {
        (model.lock().unwrap().len() >= acked + 64).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    w.join().unwrap();
    check(&uri, &model);
}

/// Kills node-c and writes through node-a until the in-sync record names node-c out of sync.
fn leave_c_behind(c: &mut Cluster, model: &Model) -> u64 {
    let (_, uri) = wait_for("the nexus on node-a", STATE_TIMEOUT, || c.attached());
    c.kill(2);
    let stop = Arc::new(AtomicBool::new(false));
    let w = writer(uri, 0, model.clone(), stop.clone());
    wait_for("node-c out of sync", STATE_TIMEOUT, || {
        let s = c.insync();
        let out = s["out_of_sync"].as_array()?.iter().any(|n| n == "node-c");
        (out && model.lock().unwrap().len() >= 64).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    let n = w.join().unwrap();
    let s = c.insync();
    assert!(
        !s["in_sync"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == "node-c"),
        "{s}"
    );
    n
}

fn stale_replica_trap(test: &str, etcd: Option<&Etcd>) {
    let mut c = Cluster::start(test, etcd);
    let model = Model::default();
    leave_c_behind(&mut c, &model);
    // node-c comes back stale before node-a dies: it is up, holds a replica, and must not be
    // chosen. (It registers again only once its old lease expired: a restart at new ports
    // while its record is still up is refused as a duplicate id.)
    c.control.wait_state("node-c", "down");
    c.restart(2);
    c.control.wait_state("node-c", "up");
    c.kill(0);
    let (node, _) = wait_failover(&c, true);
    assert_eq!(
        node, "node-b",
        "the hint (node-c) is stale, so it is passed over"
    );
    let uri = first_write(&c, BLOCKS - 1, 0xee, &model);
    check(&uri, &model);
    // node-c is resynced from node-b (the new nexus trusts only node-b and rebuilds node-c),
    // and only then named in sync again; verify then finds the copies equal.
    wait_for("node-c back in sync", STATE_TIMEOUT, || {
        let r = c.insync();
        let in_sync = r["in_sync"].as_array()?;
        in_sync.iter().any(|n| n == "node-c").then_some(())
    });
    let admin = &c.nodes[1].as_ref().expect("node-b runs").admin;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cairnctl"))
        .args(["node", "--addr", admin, "--json", "nexus", "verify", "v"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "verify after node-c's resync: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    check(&uri, &model);
}

fn no_in_sync_replica_up(test: &str, etcd: Option<&Etcd>) {
    let mut c = Cluster::start(test, etcd);
    let model = Model::default();
    leave_c_behind(&mut c, &model);
    c.kill(1);
    c.control.wait_state("node-b", "down");
    c.kill(0);
    c.restart(2);
    c.control.wait_state("node-a", "down");
    c.control.wait_state("node-c", "up");
    let stays = |c: &Cluster| {
        let v = c.inspect();
        assert_eq!(
            v["attached"]["node"], "node-a",
            "only the stale replica's node is up: the volume must wait, not move: {v}"
        );
    };
    wait_for(
        "the leader's warning that the volume waits",
        STATE_TIMEOUT,
        || {
            stays(&c);
            c.control_log()
                .contains("no replica the record names in sync is up; the volume waits for one")
                .then_some(())
        },
    );
    // Two more reconcile passes at least (500 ms each) and still no attach on node-c.
    std::thread::sleep(Duration::from_secs(2));
    stays(&c);
    assert_eq!(
        metric_of(&c.control.metrics(), "cairn_control_failovers_total"),
        0
    );
}

fn with_etcd(test: &str, body: fn(&str, Option<&Etcd>)) {
    let dir = test_dir(&format!("{test}-store"));
    let Some(etcd) = Etcd::start(&dir) else {
        return;
    };
    body(test, Some(&etcd));
}

#[test]
fn failover_on_the_embedded_store() {
    failover("failover-embedded", None);
}

#[test]
fn failover_on_etcd() {
    with_etcd("failover-etcd", failover);
}

#[test]
fn a_stale_replica_is_never_chosen_embedded() {
    stale_replica_trap("stale-embedded", None);
}

#[test]
fn a_stale_replica_is_never_chosen_etcd() {
    with_etcd("stale-etcd", stale_replica_trap);
}

#[test]
fn with_no_in_sync_replica_up_the_volume_waits_embedded() {
    no_in_sync_replica_up("waits-embedded", None);
}

#[test]
fn with_no_in_sync_replica_up_the_volume_waits_etcd() {
    with_etcd("waits-etcd", no_in_sync_replica_up);
}
