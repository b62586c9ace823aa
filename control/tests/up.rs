//! Guards `cairn up` (the README's main command) with real processes: `cairn up --nodes 3` on
//! a fresh data directory gets three nodes up as the control process reports them over REST;
//! a second `cairn up` on the same directory is refused naming the first; SIGINT (Ctrl-C)
//! stops every child and exits 0; a second run on the directory finds the same node ids up,
//! once each, and a volume created through a node's admin API before the restart is still
//! there; and a child killed behind its back makes `cairn up` stop the rest and exit non-zero,
//! naming it. Every link runs mutual TLS under the CA `cairn up` made: cairnctl with the
//! admin certificate works, without one it is refused in the handshake, with a node's it is
//! refused the admin API (PERMISSION_DENIED naming the node), and the logs name each caller's
//! identity. Each check asserts what happened (exit codes, messages, processes gone), never
//! how long it took.

mod common;

use common::{free_port, test_dir, wait_for, START_TIMEOUT, STATE_TIMEOUT};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

const NODES: usize = 3;
/// Ports each node takes (cairn up's PORT_STRIDE).
const PORT_STRIDE: u16 = 10;

/// A `cairn up` process with its output in files.
struct Up {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Up {
    fn start(dir: &Path, run: &str, control_port: u16, base_port: u16) -> Up {
        let out = dir.with_extension(format!("{run}.out"));
        let err = dir.with_extension(format!("{run}.err"));
        let child = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .arg("up")
            .arg("--data-dir")
            .arg(dir)
            .args(["--nodes", &NODES.to_string(), "--size", "128M"])
            .args(["--control-listen", &format!("127.0.0.1:{control_port}")])
            .args(["--base-port", &base_port.to_string()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap();
        Up { child, out, err }
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            std::fs::read_to_string(&self.out).unwrap_or_default(),
            std::fs::read_to_string(&self.err).unwrap_or_default()
        )
    }

    /// Waits for the ready line; returns the pids of the children it lists (control first).
    fn wait_ready(&mut self) -> Vec<(String, u32)> {
        wait_for("cairn up ready", START_TIMEOUT, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "cairn up exited with {status} before ready:\n{}",
                    self.output()
                );
            }
            let out = std::fs::read_to_string(&self.out).unwrap_or_default();
            out.contains("cairn up: ready:").then_some(())
        });
        let out = std::fs::read_to_string(&self.out).unwrap();
        let mut pids = Vec::new();
        for line in out.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["control", _url, "pid", pid, ..] => {
                    pids.push(("control".into(), pid.parse().unwrap()))
                }
                [id, _nbd, _admin, _replica, _metrics, pid, ..] if id.starts_with("node-") => {
                    pids.push((id.to_string(), pid.parse().unwrap()));
                }
                _ => {}
            }
        }
        assert_eq!(pids.len(), NODES + 1, "children listed:\n{out}");
        pids
    }

    fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }

    fn wait_exit(&mut self) -> ExitStatus {
        wait_for("cairn up to exit", START_TIMEOUT, || {
            self.child.try_wait().unwrap()
        })
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        // A failing test: the children get SIGTERM from the kernel when cairn up dies.
        drop(self.child.kill());
        drop(self.child.wait());
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

fn gone(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// A base port whose NODES blocks are all free now, and a free control port outside them.
/// The blocks lie below Linux's ephemeral ports (32768 up), where other tests' port-0
/// listeners and connections cannot take them between this check and cairn up's.
fn free_ports() -> (u16, u16) {
    let span = PORT_STRIDE * NODES as u16;
    let start = 20000 + (std::process::id() % 300) as u16 * span;
    let base = (0..100)
        .map(|i| start + i * span)
        .find(|&base| (base..base + span).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()))
        .expect("a free block of ports");
    let control = wait_for("a free control port", STATE_TIMEOUT, || {
        Some(free_port()).filter(|p| !(base..base + span).contains(p))
    });
    (control, base)
}

fn nodes(control: &cairn_control_api::client::Client) -> Vec<serde_json::Value> {
    let r = control.get("/v1/nodes").unwrap();
    assert_eq!(r.status, 200, "{}", r.error_message());
    serde_json::from_slice::<Vec<serde_json::Value>>(&r.body).unwrap()
}

fn assert_all_up(control: &cairn_control_api::client::Client, base_port: u16) {
    let nodes = nodes(control);
    let ids: Vec<&str> = nodes.iter().map(|n| n["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["node-1", "node-2", "node-3"], "{nodes:?}");
    for (i, n) in nodes.iter().enumerate() {
        assert_eq!(n["state"], "up", "{n}");
        let admin = format!("127.0.0.1:{}", base_port + PORT_STRIDE * i as u16 + 1);
        assert_eq!(n["addresses"]["admin"], admin.as_str(), "{n}");
    }
}

/// Runs cairnctl with the certificate directory `tls` (none: no TLS flag, from a directory
/// with no `cairn-data`).
fn cairnctl(tls: Option<&Path>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairnctl"));
    cmd.current_dir(std::env::temp_dir())
        .env_remove("CAIRN_TLS_DIR");
    if let Some(dir) = tls {
        cmd.arg("--tls-dir").arg(dir);
    }
    cmd.args(args).output().unwrap()
}

fn cairnctl_node(dir: &Path, admin: &str, args: &[&str]) -> String {
    let mut all = vec!["node", "--addr", admin];
    all.extend_from_slice(args);
    let out = cairnctl(Some(&dir.join("tls/admin-cairn")), &all);
    assert!(
        out.status.success(),
        "cairnctl node {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn up_stop_restart_and_a_dead_child() {
    common::cairn_node();
    let top = test_dir("up");
    let dir = top.join("data");
    let (control_port, base_port) = free_ports();
    let control_url = format!("https://127.0.0.1:{control_port}");
    let node1_admin = format!("127.0.0.1:{}", base_port + 1);

    // First run: three nodes up, as the control process reports them.
    let mut up = Up::start(&dir, "first", control_port, base_port);
    let pids = up.wait_ready();
    let admin_tls =
        cairn_tls::Tls::load(&cairn_tls::TlsFiles::in_dir(&dir.join("tls/admin-cairn"))).unwrap();
    let control = cairn_control_api::client::Client::new(&control_url, Duration::from_secs(10))
        .unwrap()
        .with_tls(Some(admin_tls.client_config()))
        .unwrap();
    assert_all_up(&control, base_port);

    // TLS: no certificate is refused in the handshake, a node's certificate is refused the
    // admin API, and each caller's identity is logged.
    let out = cairnctl(None, &["node", "--addr", &node1_admin, "pool", "ls"]);
    assert!(
        !out.status.success(),
        "plain cairnctl reached a TLS admin API"
    );
    let out = cairnctl(
        Some(&dir.join("tls/node-node-2")),
        &["node", "--addr", &node1_admin, "pool", "ls"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("PermissionDenied")
            && stderr.contains("node:node-2"),
        "{stderr}"
    );
    let other = top.join("other-ca");
    cairn_tls::issue::init_ca(&other).unwrap();
    let stranger = cairn_tls::issue::issue(
        &other,
        &cairn_tls::Identity::Admin("cairn".into()),
        &[],
        &[],
    )
    .unwrap();
    let out = cairnctl(
        Some(&stranger),
        &["node", "--addr", &node1_admin, "pool", "ls"],
    );
    assert!(
        !out.status.success(),
        "another CA's certificate reached the admin API"
    );
    let out = cairnctl(
        Some(&dir.join("tls/admin-cairn")),
        &["node", "ls", "--control", &control_url],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plain = cairn_control_api::client::Client::new(
        &format!("http://127.0.0.1:{control_port}"),
        Duration::from_secs(10),
    )
    .unwrap();
    assert!(
        plain.get("/v1/nodes").map_or(true, |r| r.status != 200),
        "plain HTTP answered by a TLS REST API"
    );
    let control_log = std::fs::read_to_string(dir.join("logs/control.log")).unwrap();
    assert!(control_log.contains("peer=node:node-1"), "{control_log}");
    let summary = up.output();
    for want in [
        "volume create demo --size 1G --replicas 3",
        "nbdinfo nbd://",
    ] {
        assert!(summary.contains(want), "{want} missing from:\n{summary}");
    }

    // A second cairn up on the directory in use is refused, naming the first.
    let second = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("up")
        .arg("--data-dir")
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("in use by another cairn up")
            && stderr.contains(&format!("pid {}", up.child.id())),
        "{stderr}"
    );

    // A volume made through node-1's admin API.
    cairnctl_node(&dir, &node1_admin, &["volume", "create", "demo", "64M"]);
    let node_log = std::fs::read_to_string(dir.join("logs/node-1.log")).unwrap();
    assert!(
        node_log.contains("peer=admin:cairn") && node_log.contains("CreateVolume"),
        "{node_log}"
    );

    // Ctrl-C: every child stops, cairn up exits 0.
    up.signal("INT");
    let status = up.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", up.output());
    assert!(up.output().contains("stopped cleanly"), "{}", up.output());
    for (name, pid) in &pids {
        assert!(gone(*pid), "{name} (pid {pid}) outlived cairn up");
    }

    // Second run on the same directory: the same node ids, once each, and the volume.
    let mut up = Up::start(&dir, "second", control_port, base_port);
    let pids = up.wait_ready();
    assert_all_up(&control, base_port);
    let volumes = cairnctl_node(&dir, &node1_admin, &["volume", "ls"]);
    assert!(
        volumes.lines().any(|l| l.starts_with("demo ")),
        "the volume did not survive the restart:\n{volumes}"
    );

    // A child killed behind cairn up's back: it names it, stops the rest and exits 1.
    let (_, node2) = pids.iter().find(|(n, _)| n == "node-2").unwrap();
    signal(*node2, "KILL");
    let status = up.wait_exit();
    let output = up.output();
    assert_eq!(status.code(), Some(1), "{output}");
    assert!(
        output.contains(&format!("node-2 (pid {node2}) exited on its own")),
        "{output}"
    );
    for (name, pid) in &pids {
        assert!(gone(*pid), "{name} (pid {pid}) outlived cairn up");
    }
}
