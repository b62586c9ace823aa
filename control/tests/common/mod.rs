//! Processes for the control plane's tests: an etcd on free loopback ports in a temp dir,
//! cairn-control and cairn-node started as real processes, a TCP relay in front of several
//! control processes, and small HTTP and node admin helpers. Every child is killed when its
//! handle drops, so a failing test leaves nothing running.

#![allow(dead_code)] // each test binary uses its own part of this module

use cairn_control_api::client::Client;
use std::io::{BufRead, BufReader};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a process may take to start (a loaded 2-core CI machine is slow, never wrong).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a test waits for a state it expects (a lease expiry, a takeover): far above the
/// 2 s lease, so only a broken mechanism, never a slow machine, fails the wait.
pub const STATE_TIMEOUT: Duration = Duration::from_secs(30);
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// A fresh directory for one test, removed when the test passes (kept for a look when it
/// fails). Declared before the processes that use it, it drops after they were killed.
pub struct TestDir(PathBuf);

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            drop(std::fs::remove_dir_all(&self.0));
        }
    }
}

pub fn test_dir(test: &str) -> TestDir {
    let dir = std::env::temp_dir().join(format!("cairn-control-{test}-{}", std::process::id()));
    drop(std::fs::remove_dir_all(&dir));
    std::fs::create_dir_all(&dir).unwrap();
    TestDir(dir)
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn cairnctl() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_cairnctl"))
}

/// cairn-node is another package's binary, so `CARGO_BIN_EXE_` cannot name it: the one next
/// to cairnctl, built when missing.
pub fn cairn_node() -> PathBuf {
    let node = cairnctl().with_file_name("cairn-node");
    if !node.exists() {
        let profile = cairnctl().parent().and_then(|d| d.file_name()).unwrap();
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "cairn-node", "--bin", "cairn-node"]);
        if profile == "release" {
            cmd.arg("--release");
        }
        assert!(cmd.status().unwrap().success(), "building cairn-node");
    }
    node
}

/// Polls `check` until it returns Some, or panics naming `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `cmd` with stdout piped and stderr to `log`, and waits for a stdout line starting
/// with `ready`; returns the child and that line.
pub fn start_until(mut cmd: Command, ready: &'static str, log: &Path) -> (Child, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with(ready) {
                drop(tx.send(line));
            }
        }
    });
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(line) => (child, line),
        Err(_) => {
            drop(child.kill());
            drop(child.wait());
            panic!(
                "{ready}: not ready within {START_TIMEOUT:?}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            )
        }
    }
}

/// An etcd server of its own, on free loopback ports, in `dir`.
pub struct Etcd {
    child: Child,
    pub url: String,
}

impl Etcd {
    /// Starts etcd, or returns None when the tool is missing (the skip policy fails instead
    /// under CI, where ci/test.sh installs etcd-server).
    pub fn start(dir: &Path) -> Option<Etcd> {
        if !cairn_testkit::require_tool("etcd", "etcd-server") {
            return None;
        }
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = dir.join("etcd.log");
        let child = Command::new("etcd")
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting etcd");
        let mut etcd = Etcd { child, url };
        let client = Client::new(&etcd.url, HTTP_TIMEOUT).unwrap();
        let start = Instant::now();
        loop {
            match client.get("/health") {
                Ok(r) if r.status == 200 && String::from_utf8_lossy(&r.body).contains("true") => {
                    return Some(etcd)
                }
                _ if start.elapsed() > START_TIMEOUT => {
                    drop(etcd.child.kill());
                    panic!(
                        "etcd not healthy within {START_TIMEOUT:?}:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

impl Etcd {
    /// Starts etcd serving clients over mutual TLS with the certificate in `identity` (a
    /// `cairnctl cert issue` directory): `https://` on a free loopback port, clients
    /// authenticated against the same CA (`--client-cert-auth`). Returns at once; the caller
    /// retries its first connection until etcd is up. None when the tool is missing.
    pub fn start_tls(dir: &Path, identity: &Path) -> Option<Etcd> {
        if !cairn_testkit::require_tool("etcd", "etcd-server") {
            return None;
        }
        let (client, peer) = (free_port(), free_port());
        let url = format!("https://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let file = |f: &str| identity.join(f).display().to_string();
        let child = Command::new("etcd")
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={url}"))
            .arg(format!("--advertise-client-urls={url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .arg(format!("--cert-file={}", file("cert.pem")))
            .arg(format!("--key-file={}", file("key.pem")))
            .arg(format!("--trusted-ca-file={}", file("ca-cert.pem")))
            .arg("--client-cert-auth")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("etcd.log")).unwrap())
            .spawn()
            .expect("starting etcd");
        Some(Etcd { child, url })
    }

    /// How many keys under `prefix` etcd holds (its JSON gateway, `/v3/kv/range`).
    pub fn count(&self, prefix: &str) -> u64 {
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().expect("a non-empty prefix") += 1;
        let body = format!(
            r#"{{"key": "{}", "range_end": "{}", "count_only": true}}"#,
            base64(prefix.as_bytes()),
            base64(&end)
        );
        let client = Client::new(&self.url, HTTP_TIMEOUT).unwrap();
        let r = client.post_json("/v3/kv/range", body.as_bytes()).unwrap();
        assert_eq!(r.status, 200, "etcd range {prefix}: {}", r.error_message());
        let answer: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        // proto3 JSON leaves a zero count out, and writes an int64 as a string.
        answer["count"]
            .as_str()
            .map_or(0, |c| c.parse().expect("a count"))
    }
}

/// Standard base64 with padding, as etcd's JSON gateway takes keys.
fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(TABLE[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

impl Drop for Etcd {
    fn drop(&mut self) {
        drop(self.child.kill());
        drop(self.child.wait());
    }
}

/// A cairn-control process.
pub struct Control {
    pub child: Child,
    pub url: String,
    pub client: Client,
}

impl Control {
    /// Starts cairn-control on `data_dir`, on `etcd` when given, listening on `port`.
    pub fn start(data_dir: &Path, etcd: Option<&str>, port: u16) -> Control {
        Control::start_with(data_dir, etcd, port, &[])
    }

    /// [`Control::start`] with `extra` flags.
    pub fn start_with(data_dir: &Path, etcd: Option<&str>, port: u16, extra: &[&str]) -> Control {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn-control"));
        cmd.arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(extra);
        if let Some(url) = etcd {
            cmd.args(["--etcd", url]);
        }
        std::fs::create_dir_all(data_dir).unwrap();
        let log = data_dir.with_extension(format!("{port}.log"));
        let (child, line) = start_until(cmd, "cairn-control listening on ", &log);
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap()
            .to_string();
        let client = Client::new(&url, HTTP_TIMEOUT).unwrap();
        Control { child, url, client }
    }

    pub fn get(&self, path: &str) -> serde_json::Value {
        let r = self.client.get(path).unwrap();
        assert_eq!(r.status, 200, "GET {path}: {}", r.error_message());
        serde_json::from_slice(&r.body).unwrap()
    }

    /// The node `id` from GET /v1/nodes, if registered.
    pub fn node(&self, id: &str) -> Option<serde_json::Value> {
        let nodes = self.get("/v1/nodes");
        nodes
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["id"] == id)
            .cloned()
    }

    pub fn node_state(&self, id: &str) -> Option<String> {
        self.node(id)
            .map(|n| n["state"].as_str().unwrap().to_string())
    }

    /// Waits until node `id` has `state`; returns how long it took.
    pub fn wait_state(&self, id: &str, state: &str) -> Duration {
        let start = Instant::now();
        wait_for(&format!("node {id} {state}"), STATE_TIMEOUT, || {
            (self.node_state(id).as_deref() == Some(state)).then_some(())
        });
        start.elapsed()
    }

    pub fn is_leader(&self) -> bool {
        self.get("/v1/leader")["is_leader"] == true
    }

    pub fn metrics(&self) -> String {
        let r = self.client.get("/metrics").unwrap();
        assert_eq!(r.status, 200);
        String::from_utf8(r.body).unwrap()
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Stops the process with SIGTERM (a clean stop) and waits for it.
    pub fn terminate(&mut self) {
        signal(&self.child, "TERM");
        self.child.wait().unwrap();
    }

    /// Waits until this process leads.
    pub fn wait_leader(&self) {
        wait_for("leadership", STATE_TIMEOUT, || {
            self.is_leader().then_some(())
        });
    }

    /// Runs `cairnctl ARGS… --control URL`; returns (exit code, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(cairnctl())
            .args(args)
            .args(["--control", &self.url])
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        drop(self.child.kill());
        drop(self.child.wait());
    }
}

/// The flags of a test node in `dir` registering as `id` with the control process at `url`.
pub fn node_command(dir: &Path, url: &str, id: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(cairn_node());
    cmd.arg("--data-dir")
        .arg(dir)
        .args(["--pool0-size", "128M"])
        .args(["--nbd-listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(["--replica-listen", "127.0.0.1:0"])
        .args(["--control", url, "--node-id", id])
        .args(extra);
    cmd
}

/// A cairn-node process registered with a control process.
pub struct NodeProc {
    pub child: Child,
    /// The ready line's addresses.
    pub admin: String,
    pub replica: String,
    pub nbd: String,
}

/// Starts nodes n1..=n{count} with zones z1..=z{count} against `control`, and waits until
/// each is up and `control` leads.
pub fn zoned_nodes(dir: &Path, control: &Control, count: usize) -> Vec<NodeProc> {
    let nodes: Vec<NodeProc> = (1..=count)
        .map(|i| {
            NodeProc::start(
                &dir.join(format!("n{i}")),
                &control.url,
                &format!("n{i}"),
                &["--zone", &format!("z{i}")],
            )
        })
        .collect();
    for i in 1..=count {
        control.wait_state(&format!("n{i}"), "up");
    }
    wait_for("leadership", STATE_TIMEOUT, || {
        control.is_leader().then_some(())
    });
    nodes
}

impl NodeProc {
    pub fn start(dir: &Path, url: &str, id: &str, extra: &[&str]) -> NodeProc {
        std::fs::create_dir_all(dir).unwrap();
        let log = dir.join(format!("stderr-{}.log", free_port()));
        let (child, line) =
            start_until(node_command(dir, url, id, extra), "cairn-node ready ", &log);
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name))
                .unwrap()
                .to_string()
        };
        NodeProc {
            child,
            admin: field("admin="),
            replica: field("replica="),
            nbd: field("nbd="),
        }
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Freezes the process (SIGSTOP): its sockets stay open, and every call to it hangs.
    pub fn freeze(&self) {
        signal(&self.child, "STOP");
    }

    /// Lets a frozen process run again (SIGCONT).
    pub fn thaw(&self) {
        signal(&self.child, "CONT");
    }

    /// Stops the process with SIGTERM (a clean stop) and waits for it.
    pub fn terminate(&mut self) {
        signal(&self.child, "TERM");
        self.child.wait().unwrap();
    }
}

/// Sends signal `name` (as `kill -NAME` spells it) to `child`.
pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {}", child.id());
}

/// The nexuses on the node whose admin API is `admin`.
pub fn node_nexuses(admin: &str) -> Vec<String> {
    node_names(admin, "nexus")
}

/// Heartbeats sent on a node's behalf (the registration it holds) to a control process's
/// URL, every 200 ms until dropped; errors are ignored (the control process may be down).
/// With the node frozen, this is a node whose membership thread lives while its admin API
/// hangs: it stays `up`, so the control process keeps choosing it and its calls hang.
pub struct HeartbeatsFor {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HeartbeatsFor {
    pub fn start(control: &Control, id: &str) -> HeartbeatsFor {
        let incarnation = control.node(id).expect("node registered")["incarnation"]
            .as_u64()
            .unwrap();
        let client = Client::new(&control.url, Duration::from_secs(1)).unwrap();
        let path = format!("/v1/nodes/{id}/heartbeat");
        let body = format!(r#"{{"incarnation": {incarnation}}}"#);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                drop(client.post_json(&path, body.as_bytes()));
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        HeartbeatsFor {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for HeartbeatsFor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            drop(t.join());
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        drop(self.child.kill());
        drop(self.child.wait());
    }
}

/// The value of the metric series `series` (name and labels) in a /metrics text.
pub fn metric_of(text: &str, series: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .filter(|rest| rest.starts_with(' '))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

/// What `cairnctl node --addr ADMIN --json WHAT ls` lists on a node, by name (`volume`:
/// replica volumes and snapshots; `nexus`; `export`).
pub fn node_names(admin: &str, what: &str) -> Vec<String> {
    let out = Command::new(cairnctl())
        .args(["node", "--addr", admin, "--json", what, "ls"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{what} ls on {admin}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

/// The volume objects (replica volumes and snapshots) on the node whose admin API is `admin`,
/// in name order.
pub fn node_objects(admin: &str) -> Vec<String> {
    node_names(admin, "volume")
}

/// The size of object `name` on the node whose admin API is `admin`, 0 when it is absent.
pub fn node_object_size(admin: &str, name: &str) -> u64 {
    let out = Command::new(cairnctl())
        .args(["node", "--addr", admin, "--json", "volume", "ls"])
        .output()
        .unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name)
        .and_then(|v| v["size_bytes"].as_u64())
        .unwrap_or(0)
}

/// How long the relay waits to connect to one control process before trying the next.
const RELAY_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// A TCP relay in front of several control processes, as a load balancer or a virtual IP
/// would be in a cluster: each connection goes to the first of the backends that accepts it.
/// A node takes one `--control` URL; pointed here, it keeps registering, heartbeating and
/// reporting while any control process lives, whichever of them leads.
pub struct Relay {
    pub url: String,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Relay {
    /// Relays to the control processes on `ports` (loopback), tried in order per connection.
    pub fn start(ports: &[u16]) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let backends: Vec<SocketAddr> = ports
            .iter()
            .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
            .collect();
        let stopped = stop.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = conn else { continue };
                let backends = backends.clone();
                std::thread::spawn(move || relay_one(client, &backends));
            }
        });
        Relay {
            url: format!("http://{addr}"),
            addr,
            stop,
        }
    }
}

/// Copies one connection both ways to the first backend that accepts; with none, drops it
/// (the client sees the connection closed, as with a dead control process).
fn relay_one(client: TcpStream, backends: &[SocketAddr]) {
    let Some(server) = backends
        .iter()
        .find_map(|b| TcpStream::connect_timeout(b, RELAY_CONNECT_TIMEOUT).ok())
    else {
        return;
    };
    let (Ok(mut client_r), Ok(mut server_r)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let (mut client_w, mut server_w) = (client, server);
    let up = std::thread::spawn(move || {
        drop(std::io::copy(&mut client_r, &mut server_w));
        drop(server_w.shutdown(Shutdown::Write));
    });
    drop(std::io::copy(&mut server_r, &mut client_w));
    drop(client_w.shutdown(Shutdown::Write));
    drop(up.join());
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so it sees the stop.
        drop(TcpStream::connect(self.addr));
    }
}

/// The replica nodes of a volume view (`GET /v1/volumes/{name}`), in record order.
pub fn replica_nodes(v: &serde_json::Value) -> Vec<String> {
    placements(v).into_iter().map(|(node, _)| node).collect()
}

/// Each replica's (node, placement state) in a volume view, in record order.
pub fn placements(v: &serde_json::Value) -> Vec<(String, String)> {
    v["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let field = |f: &str| r[f].as_str().unwrap().to_string();
            (field("node"), field("placement"))
        })
        .collect()
}
