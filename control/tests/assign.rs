//! Guards which node may open a replica once the control process has placed the volume
//! (issue 16, item 2), with real processes over mutual TLS on loopback. Three nodes hold a
//! 3-replica volume attached to node-a (failover hint node-c):
//!
//! * every replica is assigned to node-a (`replica show` on each node says so);
//! * node-a is killed (`kill -9`); the volume fails over to node-c, and the surviving replicas
//!   are assigned to node-c before its nexus opens them;
//! * node-b's replica, assigned back to node-a by hand, is assigned to node-c again by the
//!   control process's next passes;
//! * node-a, restarted, re-runs the nexus create over node-b's and node-c's replicas (with
//!   takeover, as the attack did): both refuse it with EACCES, no fence moves, and the nexus on
//!   node-c still writes and reads;
//! * node-a's own replica kept its assignment across the restart, and `replica assign` refuses
//!   an opener that is not a node id.
//!
//! On main there is no assignment: node-a's create takes the replicas over and fences node-c.

mod common;

#[path = "../../engine/tests/common/nbd_client.rs"]
mod nbd_client;

use cairn_control_api::client::Client;
use cairn_tls::{Identity, Tls, TlsFiles};
use common::{free_port, start_until, test_dir, wait_for, Control, NodeProc, STATE_TIMEOUT};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

const NODES: [&str; 3] = ["node-a", "node-b", "node-c"];
const BLOCK: u64 = 4096;

/// `--tls-ca`, `--tls-cert` and `--tls-key` of the identity issued into `dir`.
fn tls_flags(dir: &Path) -> Vec<String> {
    let f = TlsFiles::in_dir(dir);
    [
        ("--tls-ca", f.ca),
        ("--tls-cert", f.cert),
        ("--tls-key", f.key),
    ]
    .into_iter()
    .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
    .collect()
}

/// Runs cairnctl as the operator `admin`.
fn cairnctl(admin: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairnctl"))
        .current_dir(std::env::temp_dir())
        .env_remove("CAIRN_TLS_DIR")
        .arg("--tls-dir")
        .arg(admin)
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// The node id replica `v` on the node at `admin` is assigned to ("" for any node).
fn opener(admin_tls: &Path, admin: &str) -> String {
    let out = cairnctl(
        admin_tls,
        &["node", "--addr", admin, "--json", "replica", "show", "v"],
    );
    let r: Value = serde_json::from_str(&ok(&out, "replica show")).unwrap();
    r["opener"].as_str().unwrap().to_string()
}

fn epoch(admin_tls: &Path, admin: &str) -> u64 {
    let out = cairnctl(
        admin_tls,
        &["node", "--addr", admin, "--json", "replica", "show", "v"],
    );
    let r: Value = serde_json::from_str(&ok(&out, "replica show")).unwrap();
    r["epoch"].as_u64().unwrap()
}

/// The attach point once its nexus is exported: (node, NBD URI).
fn attached(control: &Control) -> Option<(String, String)> {
    let v = control.get("/v1/volumes/v");
    let a = &v["attached"];
    Some((
        a["node"].as_str()?.to_string(),
        a["nbd_uri"].as_str()?.to_string(),
    ))
}

/// Writes and flushes one block through `uri`, then reads it back.
fn write_and_read(uri: &str, block: u64, fill: u8) -> bool {
    let rest = uri.strip_prefix("nbd://").unwrap();
    let (addr, export) = rest.split_once('/').unwrap();
    let ep = nbd_client::Endpoint::Tcp(addr.parse().unwrap());
    let Ok(mut c) = nbd_client::Client::connect(&ep, export, nbd_client::Options::default()) else {
        return false;
    };
    let data = vec![fill; BLOCK as usize];
    let flush = cairn_engine::frontend::nbd::proto::cmd::FLUSH;
    if !matches!(c.write(block * BLOCK, &data, 0), Ok(0))
        || !matches!(c.simple(flush, 0, 0, 0), Ok(0))
    {
        return false;
    }
    matches!(c.read(block * BLOCK, BLOCK as u32), Ok(Ok(back)) if back == data)
}

#[test]
fn after_a_failover_only_the_new_attach_node_opens_the_replicas() {
    common::cairn_node();
    let top = test_dir("assign");
    let ca = top.join("ca");
    cairn_tls::issue::init_ca(&ca).unwrap();
    let ip = ["127.0.0.1".parse().unwrap()];
    let issue = |id: Identity| cairn_tls::issue::issue(&ca, &id, &ip, &[]).unwrap();
    let admin: PathBuf = issue(Identity::Admin("ops".into()));
    let control_dir = issue(Identity::Control("c1".into()));
    let node_dirs: Vec<PathBuf> = NODES
        .iter()
        .map(|n| issue(Identity::Node((*n).into())))
        .collect();

    let port = free_port();
    let data = top.join("control");
    std::fs::create_dir_all(&data).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn-control"));
    cmd.arg("--data-dir")
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(tls_flags(&control_dir));
    let (child, _) = start_until(cmd, "cairn-control listening on ", &top.join("control.log"));
    let url = format!("https://127.0.0.1:{port}");
    let admin_tls = Tls::load(&TlsFiles::in_dir(&admin)).unwrap();
    let control = Control {
        child,
        url: url.clone(),
        client: Client::new(&url, Duration::from_secs(10))
            .unwrap()
            .with_tls(Some(admin_tls.client_config()))
            .unwrap(),
    };
    let start = |i: usize| {
        let mut extra = tls_flags(&node_dirs[i]);
        extra.extend(["--zone".to_string(), format!("z{i}")]);
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        NodeProc::start(&top.join(NODES[i]), &url, NODES[i], &extra)
    };
    let mut nodes: Vec<NodeProc> = (0..NODES.len()).map(start).collect();
    for id in NODES {
        control.wait_state(id, "up");
    }
    control.wait_leader();
    let ctl = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--control", &url]);
        ok(&cairnctl(&admin, &all), &format!("{args:?}"))
    };
    ctl(&["volume", "create", "v", "--size", "16M", "--replicas", "3"]);
    ctl(&[
        "volume",
        "attach",
        "v",
        "--node",
        "node-a",
        "--failover-to",
        "node-c",
    ]);
    let (at, uri) = wait_for("the nexus on node-a", STATE_TIMEOUT, || attached(&control));
    assert_eq!(at, "node-a");
    assert!(write_and_read(&uri, 0, 0xa1), "the nexus on node-a serves");
    for n in &nodes {
        assert_eq!(opener(&admin, &n.admin), "node-a", "replica on {}", n.admin);
    }

    // node-a dies: the volume fails over to node-c, whose nexus holds the replicas.
    nodes[0].kill9();
    let (at, uri) = wait_for("the failover to node-c", STATE_TIMEOUT, || {
        attached(&control).filter(|(n, _)| n != "node-a")
    });
    assert_eq!(at, "node-c");
    wait_for("a write on node-c's nexus", STATE_TIMEOUT, || {
        write_and_read(&uri, 1, 0xc1).then_some(())
    });
    for n in &nodes[1..] {
        assert_eq!(opener(&admin, &n.admin), "node-c", "replica on {}", n.admin);
    }

    // A replica assigned elsewhere after the nexus opened (its node away when the nexus was
    // made, or an operator's `replica assign`) is assigned back to the attach node by the
    // control process's next passes, so the old attach node cannot open it.
    let b_admin = nodes[1].admin.clone();
    ok(
        &cairnctl(
            &admin,
            &[
                "node", "--addr", &b_admin, "replica", "assign", "v", "--opener", "node-a",
            ],
        ),
        "replica assign",
    );
    wait_for(
        "node-b's replica assigned back to node-c",
        STATE_TIMEOUT,
        || (opener(&admin, &b_admin) == "node-c").then_some(()),
    );
    let fences: Vec<u64> = nodes[1..].iter().map(|n| epoch(&admin, &n.admin)).collect();

    // node-a comes back and re-runs its nexus create, taking over: refused by both replicas.
    nodes[0] = start(0);
    control.wait_state("node-a", "up");
    let a_admin = nodes[0].admin.clone();
    let out = cairnctl(
        &admin,
        &[
            "node",
            "--addr",
            &a_admin,
            "nexus",
            "create",
            "v",
            "--replica",
            &nodes[1].replica,
            "--replica",
            &nodes[2].replica,
            "--takeover",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    println!("node-a's nexus create: {err}");
    assert!(
        !out.status.success(),
        "node-a opened replicas assigned to node-c"
    );
    assert!(err.contains("Permission denied"), "{err}");
    let after: Vec<u64> = nodes[1..].iter().map(|n| epoch(&admin, &n.admin)).collect();
    assert_eq!(after, fences, "a refused open moved a fence");
    assert!(
        write_and_read(&uri, 2, 0xc2),
        "node-c's nexus still serves after node-a's attempt"
    );

    // node-a's own replica kept its assignment across the restart (nobody assigned it since),
    // `replica ls` lists it, and an opener that is not a node id is refused.
    assert_eq!(opener(&admin, &a_admin), "node-a");
    let ls = ok(
        &cairnctl(&admin, &["node", "--addr", &a_admin, "replica", "ls"]),
        "replica ls",
    );
    assert!(ls.contains("node:node-a"), "{ls}");
    let out = cairnctl(
        &admin,
        &[
            "node", "--addr", &a_admin, "replica", "assign", "v", "--opener", "no/such",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not a node id"),
        "{err}"
    );
}
