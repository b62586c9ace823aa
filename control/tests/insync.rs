//! Guards the durable in-sync set (issue 14, item 5) end to end with real processes on
//! loopback, once on the embedded store and once on etcd: three cairn-node processes and a
//! cairn-control, a nexus on node a over a's own replica and b's and c's, created with
//! `--control-volume`, writing through its NBD export.
//!
//! * (a) `kill -9` of c during writes: the record shows c out of sync at a raised generation,
//!   and every acknowledged write reads back.
//! * (b) safety before availability: with the control process killed, b is killed too; a
//!   write issued afterwards is not acknowledged while the control process is down (it is
//!   held, neither acknowledged nor failed), and completes once it restarts, with b out of the
//!   record. Without the rule the write would be acknowledged at once while the record still
//!   names b in sync.
//! * (c) the stale-copy trap at the nexus level: a nexus over only c (stale) is refused when
//!   given the record's in-sync replicas as `--trusted` and its generation as
//!   `--min-generation`, naming c; the same create without them is accepted, which is the
//!   trap the record closes.
//! * (d) a report of an epoch below the record's is refused with 409, naming both epochs,
//!   and leaves the record unchanged; a report naming an unknown replica address gets 400.
//!
//! Nothing here asserts on timing: the waits only turn a hang into a failure.

mod common;

#[path = "../../engine/tests/common/nbd_client.rs"]
mod nbd_client;

use cairn_engine::frontend::nbd::proto::cmd;
use common::{free_port, test_dir, wait_for, Control, Etcd, NodeProc, STATE_TIMEOUT};
use nbd_client::{Client, Endpoint, Options};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const VOLUME: &str = "v";
/// Every node's replica volume (`--replica-volume`).
const REPLICA_VOLUME: &str = "v:16M";
const VOLUME_BYTES: u64 = 16 << 20;
/// The unit of the test's writes.
const BLOCK_BYTES: u64 = 64 << 10;
const BLOCKS: u64 = VOLUME_BYTES / BLOCK_BYTES;
/// The nexus's epoch: above 1, so that a report of a lower epoch is a valid one to refuse.
const EPOCH: u64 = 5;
/// How long the test watches a held write stay unanswered.
const HELD_WATCH: Duration = Duration::from_secs(3);

/// Runs `cairnctl node --addr ADMIN ARGS…`; returns (exit code, stdout, stderr).
fn node_ctl(admin: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cairnctl"))
        .args(["node", "--addr", admin])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn node_ok(admin: &str, args: &[&str]) -> String {
    let (code, out, err) = node_ctl(admin, args);
    assert_eq!(code, 0, "cairnctl node {args:?}: {err}");
    out
}

fn start_node(dir: &Path, url: &str, id: &str) -> NodeProc {
    NodeProc::start(
        &dir.join(id),
        url,
        id,
        &["--replica-volume", REPLICA_VOLUME],
    )
}

/// The volume's in-sync record, if there is one.
fn record(control: &Control) -> Option<Value> {
    let r = control
        .client
        .get(&format!("/v1/volumes/{VOLUME}/insync"))
        .unwrap();
    match r.status {
        200 => Some(serde_json::from_slice(&r.body).unwrap()),
        404 => None,
        s => panic!("GET insync: HTTP {s}: {}", r.error_message()),
    }
}

fn ids(v: &Value) -> Vec<String> {
    let mut ids: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// Waits until the record names exactly `in_sync` in sync; returns it.
fn wait_record(control: &Control, in_sync: &[&str]) -> Value {
    wait_for(
        &format!("the record to show {in_sync:?} in sync"),
        STATE_TIMEOUT,
        || record(control).filter(|r| ids(&r["in_sync"]) == in_sync),
    )
}

/// What each block must read back as: the data of its last acknowledged write.
struct Model {
    writes: u64,
    last: Vec<Option<u64>>,
}

fn data(block: u64, round: u64) -> Vec<u8> {
    let mut d = vec![0u8; BLOCK_BYTES as usize];
    for (i, chunk) in d.chunks_mut(8).enumerate() {
        chunk.copy_from_slice(&(block << 40 | round << 16 | i as u64).to_le_bytes());
    }
    d
}

impl Model {
    fn new() -> Model {
        Model {
            writes: 0,
            last: vec![None; BLOCKS as usize],
        }
    }

    fn next(&mut self) -> (u64, u64) {
        let round = self.writes;
        self.writes += 1;
        (round.wrapping_mul(0x9E37_79B9) % BLOCKS, round)
    }

    /// Writes `n` blocks; each must be acknowledged.
    fn write(&mut self, c: &mut Client, n: u64) {
        for _ in 0..n {
            let (block, round) = self.next();
            let e = c
                .write(block * BLOCK_BYTES, &data(block, round), 0)
                .unwrap();
            assert_eq!(e, 0, "write {round} of block {block}: NBD error {e}");
            self.last[block as usize] = Some(round);
        }
    }

    /// Reads every block back and compares it with its last acknowledged write.
    fn check(&self, c: &mut Client) {
        for (block, last) in self.last.iter().enumerate() {
            let block = block as u64;
            let want = last.map_or_else(|| vec![0u8; BLOCK_BYTES as usize], |r| data(block, r));
            let got = c
                .read(block * BLOCK_BYTES, BLOCK_BYTES as u32)
                .unwrap()
                .unwrap_or_else(|e| panic!("read of block {block}: NBD error {e}"));
            assert!(
                got == want,
                "block {block} is not its last acknowledged write {last:?}"
            );
        }
    }
}

fn insync_end_to_end(test: &str, etcd: Option<&Etcd>) {
    let dir = test_dir(test);
    let port = free_port();
    let etcd_url = etcd.map(|e| e.url.as_str());
    let mut control = Control::start(&dir.join("control"), etcd_url, port);
    let mut a = start_node(&dir, &control.url, "a");
    let mut b = start_node(&dir, &control.url, "b");
    let mut c = start_node(&dir, &control.url, "c");
    for id in ["a", "b", "c"] {
        control.wait_state(id, "up");
    }
    let epoch = EPOCH.to_string();
    node_ok(
        &a.admin,
        &[
            "nexus",
            "create",
            VOLUME,
            "--replica",
            "local",
            "--replica",
            &b.replica,
            "--replica",
            &c.replica,
            "--control-volume",
            VOLUME,
            "--epoch",
            &epoch,
            "--io-timeout-ms",
            "2000",
        ],
    );
    // The create itself is recorded: the generation it stored, every replica in sync.
    let first = wait_record(&control, &["a", "b", "c"]);
    assert_eq!(first["epoch"], EPOCH, "{first}");
    let g0 = first["generation"].as_u64().unwrap();
    assert!(g0 >= 1, "{first}");
    node_ok(&a.admin, &["export", "add", VOLUME, "--nexus"]);
    let ep = Endpoint::Tcp(a.nbd.parse().unwrap());
    let mut nbd = Client::connect(&ep, VOLUME, Options::default()).unwrap();
    let mut model = Model::new();
    model.write(&mut nbd, 32);

    // (a) c dies during writes: every write is still acknowledged (a and b take them), c is
    // out of the record at a raised generation, and everything reads back.
    c.kill9();
    model.write(&mut nbd, 32);
    let after_c = wait_record(&control, &["a", "b"]);
    assert_eq!(ids(&after_c["out_of_sync"]), ["c"], "{after_c}");
    let g1 = after_c["generation"].as_u64().unwrap();
    assert!(g1 > g0, "the removal of c raised the generation: {after_c}");
    model.check(&mut nbd);

    // (b) The control process dies, then b: a write issued now is held, not acknowledged
    // (and not failed), until the control process is back and has recorded b's removal.
    control.kill9();
    b.kill9();
    let (block, round) = model.next();
    let cookie = nbd
        .send(
            cmd::WRITE,
            0,
            block * BLOCK_BYTES,
            BLOCK_BYTES as u32,
            &data(block, round),
        )
        .unwrap();
    nbd.stream.set_read_timeout(Some(HELD_WATCH)).unwrap();
    match nbd.recv() {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        other => panic!(
            "a write was answered ({other:?}) while the control process was down and b's \
             removal could not be recorded"
        ),
    }
    let shown = node_ok(&a.admin, &["--json", "nexus", "show", VOLUME]);
    println!("{test}: nexus while its write is held: {shown}");
    let control = Control::start(&dir.join("control"), etcd_url, port);
    nbd.stream
        .set_read_timeout(Some(nbd_client::READ_TIMEOUT))
        .unwrap();
    let reply = nbd.recv().unwrap();
    assert_eq!(reply.cookie, cookie);
    assert_eq!(
        reply.error, 0,
        "the held write failed instead of completing"
    );
    model.last[block as usize] = Some(round);
    let after_b = wait_record(&control, &["a"]);
    assert_eq!(ids(&after_b["out_of_sync"]), ["b", "c"], "{after_b}");
    let g2 = after_b["generation"].as_u64().unwrap();
    assert!(g2 > g1, "{after_b}");
    model.write(&mut nbd, 8);
    model.check(&mut nbd);

    // (c) The nexus node is lost and c comes back: a new nexus over c alone, given the
    // record (a in sync at g2), is refused and names c; without the record it is accepted
    // and would serve c's stale copy.
    drop(nbd);
    a.kill9();
    // c may register again only once its old registration is down (else: a duplicate id).
    control.wait_state("c", "down");
    let c = start_node(&dir, &control.url, "c");
    let a_replica = control.node("a").unwrap()["addresses"]["replica"]
        .as_str()
        .unwrap()
        .to_string();
    let g2s = g2.to_string();
    let (code, _, err) = node_ctl(
        &c.admin,
        &[
            "nexus",
            "create",
            VOLUME,
            "--replica",
            "local",
            "--takeover",
            "--trusted",
            &a_replica,
            "--min-generation",
            &g2s,
        ],
    );
    assert_ne!(
        code, 0,
        "a nexus over the stale c alone was accepted with the record"
    );
    assert!(
        err.contains("'local' (generation") && err.contains("not trusted") && err.contains(&g2s),
        "the refusal names c, its generation and the record's: {err}"
    );
    node_ok(
        &c.admin,
        &[
            "nexus",
            "create",
            VOLUME,
            "--replica",
            "local",
            "--takeover",
        ],
    );

    // (d) A report of an older nexus (a lower epoch) is refused and changes nothing; so is
    // one naming a replica address no node registered.
    let before = record(&control).unwrap();
    let stale = serde_json::json!({
        "node": "c", "epoch": EPOCH - 1, "generation": g2 + 10,
        "replicas": [{"address": "local", "state": "in_sync"}]
    });
    let path = format!("/v1/volumes/{VOLUME}/insync");
    let r = control
        .client
        .post_json(&path, stale.to_string().as_bytes())
        .unwrap();
    assert_eq!(r.status, 409, "{}", r.error_message());
    let msg = r.error_message();
    assert!(
        msg.contains(&format!("epoch {}", EPOCH - 1)) && msg.contains(&format!("epoch {EPOCH}")),
        "{msg}"
    );
    let unknown = serde_json::json!({
        "node": "c", "epoch": EPOCH + 1, "generation": g2 + 10,
        "replicas": [{"address": "local", "state": "in_sync"},
                     {"address": "127.0.0.1:1", "state": "out_of_sync"}]
    });
    let r = control
        .client
        .post_json(&path, unknown.to_string().as_bytes())
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.error_message());
    assert!(
        r.error_message().contains("'127.0.0.1:1'"),
        "{}",
        r.error_message()
    );
    assert_eq!(
        record(&control).unwrap(),
        before,
        "a refused report changed the record"
    );
    drop((b, c));
}

#[test]
fn the_in_sync_set_is_durable_on_the_embedded_store() {
    insync_end_to_end("insync-embedded", None);
}

#[test]
fn the_in_sync_set_is_durable_on_etcd() {
    let dir = test_dir("insync-etcd-store");
    let Some(etcd) = Etcd::start(&dir) else {
        return;
    };
    insync_end_to_end("insync-etcd", Some(&etcd));
}
