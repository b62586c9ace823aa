//! Guards `cairnctl node …` against a real cairn-node: every verb works, tables have their
//! headers and values, `--json` is parseable and complete, and a refused operation exits 1
//! with the node's status code and a message naming the object. Without a node, it guards
//! the command line itself: bad arguments to the nexus, fault and export commands are
//! refused before any connection, with a message naming the argument and its value, and
//! the help lists every nexus command and says what `nexus verify`'s exit status means, and
//! offers `nexus create --takeover` and `nexus verify --repair`.
//!
//! cairn-node is another package's binary, so `CARGO_BIN_EXE_` cannot name it; the test
//! uses the one next to cairnctl in the target directory and builds it when missing.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const START_TIMEOUT: Duration = Duration::from_secs(60);

fn cairn_node() -> PathBuf {
    let ctl = Path::new(env!("CARGO_BIN_EXE_cairnctl"));
    let node = ctl.with_file_name("cairn-node");
    if !node.exists() {
        let profile = ctl.parent().and_then(|d| d.file_name()).unwrap();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "cairn-node", "--bin", "cairn-node"]);
        if profile == "release" {
            cmd.arg("--release");
        }
        assert!(cmd.status().unwrap().success(), "building cairn-node");
    }
    node
}

struct Node {
    child: Child,
    admin: String,
    dir: PathBuf,
}

impl Node {
    fn start(test: &str) -> Node {
        let dir = std::env::temp_dir().join(format!("cairnctl-{test}-{}", std::process::id()));
        drop(std::fs::remove_dir_all(&dir));
        std::fs::create_dir_all(&dir).unwrap();
        let mut child = Command::new(cairn_node())
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--pool0-size", "256M", "--malloc", "ram:8M"])
            .args(["--nbd-listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0"])
            .args(["--metrics-listen", "127.0.0.1:0"])
            .args(["--replica-listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("stderr.log")).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("cairn-node ready ") {
                    drop(tx.send(line));
                }
            }
        });
        let line = rx.recv_timeout(START_TIMEOUT).unwrap_or_else(|_| {
            drop(child.kill());
            panic!(
                "cairn-node did not get ready:\n{}",
                std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default()
            )
        });
        let admin = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("admin="))
            .unwrap()
            .to_string();
        Node { child, admin, dir }
    }

    /// Runs `cairnctl node --addr ADMIN ARGS…`; returns (exit code, stdout, stderr).
    fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_cairnctl"))
            .args(["node", "--addr", &self.admin])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, args: &[&str]) -> String {
        let (code, out, err) = self.ctl(args);
        assert_eq!(code, 0, "cairnctl {args:?} failed: {err}");
        out
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).expect("cairnctl --json prints JSON")
    }

    fn refused(&self, args: &[&str], code_name: &str, needle: &str) {
        let (code, _, err) = self.ctl(args);
        assert_eq!(code, 1, "cairnctl {args:?} should fail: {err}");
        assert!(
            err.contains(code_name) && err.contains(needle),
            "{args:?}: {err}"
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        drop(self.child.kill());
        drop(self.child.wait());
        drop(std::fs::remove_dir_all(&self.dir));
    }
}

#[test]
fn every_verb_round_trips_through_a_node() {
    let n = Node::start("verbs");
    let pools = n.ok(&["pool", "ls"]);
    assert!(
        pools.starts_with("NAME") && pools.contains("pool0"),
        "{pools}"
    );

    let created = n.ok(&["volume", "create", "pg", "64M", "--label", "app=pg"]);
    assert!(
        created.contains("pg") && created.contains("64M"),
        "{created}"
    );
    let grown = n.json(&["volume", "grow", "pg", "96M"]);
    assert_eq!(grown["size_bytes"], 96 << 20);
    let pools = n.json(&["pool", "ls"]);
    assert_eq!(pools[0]["name"], "pool0");
    n.refused(&["volume", "create", "pg", "64M"], "AlreadyExists", "'pg'");
    n.ok(&["volume", "grow", "pg", "128M"]);
    n.ok(&["snapshot", "create", "pg", "pg-snap"]);
    n.ok(&["snapshot", "clone", "pg-snap", "pg-clone"]);

    let vols = n.json(&["volume", "ls"]);
    let vols = vols.as_array().unwrap();
    let pg = vols.iter().find(|v| v["name"] == "pg").unwrap();
    assert_eq!(pg["size_bytes"], 128 << 20);
    assert_eq!(pg["kind"], "volume");
    assert_eq!(pg["labels"][0]["key"], "app");
    let clone = vols.iter().find(|v| v["name"] == "pg-clone").unwrap();
    assert_eq!(clone["origin"], "pg-snap");

    let snaps = n.ok(&["snapshot", "ls"]);
    assert!(
        snaps.contains("pg-snap") && !snaps.contains("pg-clone"),
        "{snaps}"
    );

    let added = n.ok(&["export", "add", "pg-snap"]);
    assert!(added.contains("ro"), "snapshots export read-only: {added}");
    n.ok(&["export", "add", "pg", "--as", "db"]);
    let exports = n.json(&["export", "ls"]);
    let names: Vec<_> = exports
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["db", "pg-snap", "ram"]);
    n.refused(&["volume", "delete", "pg"], "FailedPrecondition", "'db'");
    n.ok(&["export", "remove", "db"]);
    n.refused(&["export", "remove", "db"], "NotFound", "'db'");
    n.ok(&["export", "remove", "pg-snap"]);
    n.refused(
        &["volume", "delete", "pg-snap"],
        "FailedPrecondition",
        "pg-clone",
    );
    n.ok(&["volume", "delete", "pg-clone"]);
    n.ok(&["volume", "delete", "pg-snap"]);
    n.ok(&["volume", "delete", "pg"]);
    n.refused(&["volume", "delete", "pg"], "NotFound", "'pg'");

    let stats = n.ok(&["stats"]);
    assert!(
        stats.contains("EXPORT") && stats.contains("BUSY_S"),
        "{stats}"
    );
    let stats = n.json(&["stats"]);
    assert_eq!(stats["reactors"].as_array().unwrap().len(), 1);
}

#[test]
fn an_unreachable_node_is_named() {
    let out = Command::new(env!("CARGO_BIN_EXE_cairnctl"))
        .args(["node", "--addr", "127.0.0.1:1", "pool", "ls"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("127.0.0.1:1"), "{err}");
}

/// Runs `cairnctl node --addr 127.0.0.1:1 ARGS…` (a port nothing listens on, so a command
/// that got past its arguments fails to connect); returns (exit code, stdout, stderr).
fn offline(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cairnctl"))
        .args(["node", "--addr", "127.0.0.1:1"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `args` is refused as a usage error (clap exits 2) whose message has every one of
/// `needles`, and it never got as far as connecting.
fn bad_usage(args: &[&str], needles: &[&str]) {
    let (code, out, err) = offline(args);
    assert_eq!(code, 2, "{args:?} should be a usage error: {err}");
    assert!(out.is_empty(), "{args:?} printed {out}");
    assert!(
        !err.contains("127.0.0.1:1"),
        "{args:?} tried the node: {err}"
    );
    for needle in needles {
        assert!(err.contains(needle), "{args:?}: {needle:?} not in {err}");
    }
}

#[test]
fn nexus_create_refuses_bad_arguments_before_connecting() {
    bad_usage(&["nexus", "create", "pg"], &["--replica"]);
    bad_usage(
        &[
            "nexus",
            "create",
            "pg",
            "--replica",
            "local",
            "--region-size",
            "lots",
        ],
        &["--region-size", "'lots'", "not a size"],
    );
    bad_usage(
        &[
            "nexus",
            "create",
            "pg",
            "--replica",
            "local",
            "--rebuild-rate",
            "1.5G",
        ],
        &["--rebuild-rate", "'1.5G'"],
    );
    bad_usage(
        &["nexus", "create", "pg", "--replica", "10.0.0.6"],
        &["--replica", "'10.0.0.6'", "HOST:PORT"],
    );
    bad_usage(
        &[
            "nexus",
            "create",
            "pg",
            "--replica",
            "local",
            "--epoch",
            "soon",
        ],
        &["--epoch", "'soon'"],
    );
    bad_usage(
        &["nexus", "add", "pg", "10.0.0.6:port"],
        &["'10.0.0.6:port'"],
    );
}

#[test]
fn nexus_create_with_good_arguments_goes_on_to_the_node() {
    let (code, _, err) = offline(&[
        "nexus",
        "create",
        "pg",
        "--replica",
        "local",
        "--replica",
        "10.0.0.6:10820",
        "--min-in-sync",
        "2",
        "--region-size",
        "4M",
        "--io-timeout-ms",
        "1000",
        "--rebuild-rate",
        "100M",
        "--epoch",
        "8",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("127.0.0.1:1"), "{err}");
}

#[test]
fn fault_and_export_flags_are_checked() {
    bad_usage(
        &["fault", "set", "ram"],
        &["--latency-ms", "--fail-errno", "--heal"],
    );
    bad_usage(
        &[
            "fault",
            "set",
            "ram",
            "--latency-ms",
            "18446744073709551615",
        ],
        &["--latency-ms", "18446744073709551615"],
    );
    bad_usage(
        &["fault", "set", "ram", "--fail-errno", "0"],
        &["--fail-errno"],
    );
    bad_usage(
        &["export", "add", "pg", "--nexus", "--pool", "pool0"],
        &["--nexus", "--pool"],
    );
}

#[test]
fn help_lists_the_nexus_commands_and_the_verify_exit_status() {
    let (code, help, err) = offline(&["nexus", "--help"]);
    assert_eq!(code, 0, "{err}");
    for verb in [
        "create", "destroy", "ls", "show", "add", "remove", "promote", "verify",
    ] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(verb)),
            "{verb} missing from:\n{help}"
        );
    }
    let (code, help, err) = offline(&["nexus", "verify", "--help"]);
    assert_eq!(code, 0, "{err}");
    assert!(help.contains("Exit status: 0"), "{help}");
    assert!(help.contains("--repair"), "{help}");
    let (code, help, err) = offline(&["nexus", "create", "--help"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        help.contains("Examples:") && help.contains("--replica local"),
        "{help}"
    );
    assert!(help.contains("--takeover"), "{help}");
    let (code, help, err) = offline(&["--help"]);
    assert_eq!(code, 0, "{err}");
    assert!(help.contains("nexus") && help.contains("fault"), "{help}");
}
