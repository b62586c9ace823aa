//! Guards the cairn-node daemon as a process: it starts on a fresh data dir (creating and
//! formatting pool0.img), serves the admin API (volume, snapshot, clone, grow, delete,
//! export and unexport, with the right gRPC status codes) and /metrics with every family,
//! refuses to start when a port is taken, when another daemon holds the pool's lock, or when
//! a volume spec is bad (exit 1, naming the thing), exits 0 on SIGTERM, and a restarted
//! daemon finds the volumes the first one made.
//!
//! Every daemon listens on port 0 and the test reads the real ports from its ready line, so
//! tests run in parallel without port races.

#[path = "common/ready.rs"]
mod ready;

use cairn_node::proto::node_admin_client::NodeAdminClient;
use cairn_node::proto::{self as pb};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use tonic::Code;

const START_TIMEOUT: Duration = Duration::from_secs(60);
const EXIT_TIMEOUT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("cairn-daemon-{test}-{}", std::process::id()));
        drop(std::fs::remove_dir_all(&p));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        drop(std::fs::remove_dir_all(&self.0));
    }
}

/// The ready line's addresses.
#[derive(Debug)]
struct Ready {
    nbd: Option<SocketAddr>,
    admin: SocketAddr,
    metrics: SocketAddr,
    exports: Vec<String>,
}

fn parse_ready(line: &str) -> Ready {
    let field = |k: &str| ready::field(line, k);
    let exports = field("exports");
    Ready {
        nbd: field("nbd").parse().ok(),
        admin: field("admin").parse().unwrap(),
        metrics: field("metrics").parse().unwrap(),
        exports: if exports == "-" {
            Vec::new()
        } else {
            exports.split(',').map(str::to_string).collect()
        },
    }
}

fn command(data_dir: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn-node"));
    cmd.arg("--data-dir")
        .arg(data_dir)
        .args(["--pool0-size", "256M"])
        .args(["--nbd-listen", "127.0.0.1:0"])
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .args(["--replica-listen", "127.0.0.1:0"])
        .args(extra)
        .env("RUST_LOG", "info");
    cmd
}

/// A running daemon; killed on drop if the test did not stop it.
struct Daemon {
    child: Child,
    ready: Ready,
    stderr: PathBuf,
}

impl Daemon {
    fn start(dir: &TempDir, extra: &[&str]) -> Daemon {
        let stderr = dir.0.join(format!("stderr-{}.log", unique()));
        let mut child = command(&dir.0.join("data"), extra)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        match ready::wait_ready(&mut child, START_TIMEOUT) {
            Ok(line) => Daemon {
                child,
                ready: parse_ready(&line),
                stderr,
            },
            Err(_) => {
                drop(child.kill());
                panic!(
                    "cairn-node did not get ready within {START_TIMEOUT:?}:\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
        }
    }

    fn client(&self, rt: &tokio::runtime::Runtime) -> NodeAdminClient<tonic::transport::Channel> {
        rt.block_on(NodeAdminClient::connect(format!(
            "http://{}",
            self.ready.admin
        )))
        .expect("admin API answers")
    }

    /// Sends SIGTERM and waits for the exit status.
    fn terminate(mut self) -> (ExitStatus, String) {
        let pid = i32::try_from(self.child.id()).unwrap();
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = wait_exit(&mut self.child);
        (
            status,
            std::fs::read_to_string(&self.stderr).unwrap_or_default(),
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            drop(self.child.kill());
            drop(self.child.wait());
        }
    }
}

fn unique() -> u64 {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn wait_exit(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if Instant::now() > deadline {
            drop(child.kill());
            panic!("cairn-node did not exit within {EXIT_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a daemon that must refuse to start; returns its stderr.
fn refused(data_dir: &Path, extra: &[&str]) -> String {
    let out = command(data_dir, extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
        .wait_with_output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit 1, stderr:\n{stderr}"
    );
    stderr
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> (Code, String) {
    let s = r.expect_err("the call should fail");
    (s.code(), s.message().to_string())
}

fn volumes(
    rt: &tokio::runtime::Runtime,
    c: &mut NodeAdminClient<tonic::transport::Channel>,
) -> Vec<pb::Volume> {
    rt.block_on(c.list_volumes(pb::ListVolumesRequest::default()))
        .unwrap()
        .into_inner()
        .volumes
}

fn http_get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    (head.lines().next().unwrap().to_string(), body.to_string())
}

#[test]
fn admin_api_manages_volumes_snapshots_clones_and_exports() {
    let dir = TempDir::new("admin");
    let d = Daemon::start(&dir, &["--volume", "v1:64M", "--malloc", "ram:16M"]);
    assert_eq!(d.ready.exports, ["ram", "v1"]);
    assert!(d.ready.nbd.is_some());
    let rt = runtime();
    let mut c = d.client(&rt);

    let pools = rt
        .block_on(c.list_pools(pb::ListPoolsRequest {}))
        .unwrap()
        .into_inner()
        .pools;
    assert_eq!(pools.len(), 1);
    assert_eq!(pools[0].name, "pool0");
    assert!(pools[0].path.ends_with("pool0.img"));
    assert!(pools[0].size_bytes > 200 * MIB && pools[0].size_bytes <= 256 * MIB);

    let create = |name: &str, size_bytes| pb::CreateVolumeRequest {
        name: name.into(),
        size_bytes,
        ..Default::default()
    };
    let v2 = rt
        .block_on(c.create_volume(create("v2", 32 * MIB)))
        .unwrap()
        .into_inner();
    assert_eq!((v2.size_bytes, v2.pool.as_str()), (32 * MIB, "pool0"));
    let (code_, msg) = code(rt.block_on(c.create_volume(create("v2", 32 * MIB))));
    assert_eq!(code_, Code::AlreadyExists, "{msg}");
    assert!(msg.contains("'v2'"), "{msg}");
    let (code_, msg) = code(rt.block_on(c.create_volume(create("", MIB))));
    assert_eq!(code_, Code::InvalidArgument, "{msg}");

    let grow = |size_bytes| pb::GrowVolumeRequest {
        name: "v2".into(),
        size_bytes,
        pool: String::new(),
    };
    let grown = rt
        .block_on(c.grow_volume(grow(64 * MIB)))
        .unwrap()
        .into_inner();
    assert_eq!(grown.size_bytes, 64 * MIB);
    let (code_, msg) = code(rt.block_on(c.grow_volume(grow(MIB))));
    assert_eq!(code_, Code::InvalidArgument, "{msg}");

    let snap = rt
        .block_on(c.create_snapshot(pb::CreateSnapshotRequest {
            volume: "v2".into(),
            name: "s1".into(),
            pool: String::new(),
        }))
        .unwrap()
        .into_inner();
    assert_eq!(
        (snap.kind(), snap.origin.as_str()),
        (pb::ObjectKind::Snapshot, "v2")
    );
    let clone = rt
        .block_on(c.create_clone(pb::CreateCloneRequest {
            snapshot: "s1".into(),
            name: "c1".into(),
            pool: String::new(),
        }))
        .unwrap()
        .into_inner();
    assert_eq!(
        (clone.kind(), clone.origin.as_str()),
        (pb::ObjectKind::Volume, "s1")
    );

    let all = volumes(&rt, &mut c);
    let names: Vec<_> = all.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["v1", "v2", "s1", "c1"]);
    assert_eq!(all[0].export_name, "v1");
    assert_eq!(all[1].export_name, "");

    let delete = |name: &str| pb::DeleteVolumeRequest {
        name: name.into(),
        pool: String::new(),
    };
    let (code_, msg) = code(rt.block_on(c.delete_volume(delete("s1"))));
    assert_eq!(code_, Code::FailedPrecondition, "{msg}");
    assert!(msg.contains("c1"), "names the clone: {msg}");

    // A snapshot exports read-only even when not asked, and an exported object stays.
    let e = rt
        .block_on(c.export(pb::ExportRequest {
            name: "s1".into(),
            export_name: "snap".into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner();
    assert!(e.read_only);
    assert_eq!((e.kind.as_str(), e.source.as_str()), ("snapshot", "s1"));
    let (code_, msg) = code(rt.block_on(c.export(pb::ExportRequest {
        name: "v2".into(),
        export_name: "snap".into(),
        ..Default::default()
    })));
    assert_eq!(code_, Code::AlreadyExists, "{msg}");
    rt.block_on(c.delete_volume(delete("c1"))).unwrap();
    let (code_, msg) = code(rt.block_on(c.delete_volume(delete("s1"))));
    assert_eq!(code_, Code::FailedPrecondition, "{msg}");
    assert!(msg.contains("'snap'"), "names the export: {msg}");

    let exports = rt
        .block_on(c.list_exports(pb::ListExportsRequest {}))
        .unwrap()
        .into_inner()
        .exports;
    let names: Vec<_> = exports.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["ram", "snap", "v1"]);
    assert_eq!(exports[0].kind, "malloc");
    assert_eq!(exports[0].size_bytes, 16 * MIB);
    let stats = exports[2].stats.clone().unwrap();
    assert_eq!(
        stats.latency_bucket_bounds_us.len(),
        stats.latency_buckets.len()
    );

    let unexport = |name: &str| pb::UnexportRequest {
        export_name: name.into(),
    };
    rt.block_on(c.unexport(unexport("snap"))).unwrap();
    let (code_, msg) = code(rt.block_on(c.unexport(unexport("snap"))));
    assert_eq!(code_, Code::NotFound, "{msg}");
    rt.block_on(c.delete_volume(delete("s1"))).unwrap();
    let (code_, msg) = code(rt.block_on(c.delete_volume(delete("nope"))));
    assert_eq!(code_, Code::NotFound, "{msg}");
    assert!(msg.contains("'nope'"), "{msg}");
    let (code_, _) = code(rt.block_on(c.list_volumes(pb::ListVolumesRequest {
        pool: "nopool".into(),
    })));
    assert_eq!(code_, Code::NotFound);

    let stats = rt
        .block_on(c.stats(pb::StatsRequest {}))
        .unwrap()
        .into_inner();
    assert_eq!(stats.reactors.len(), 1);
    assert!(stats.reactors[0].busy_ns + stats.reactors[0].idle_ns > 0);
    assert_eq!(stats.exports.len(), 2);

    let (status, log) = d.terminate();
    assert!(status.success(), "SIGTERM exit {status}:\n{log}");
}

#[test]
fn metrics_has_every_family() {
    let dir = TempDir::new("metrics");
    let d = Daemon::start(&dir, &["--volume", "vol:8M"]);
    let (status, body) = http_get(d.ready.metrics, "/metrics");
    assert!(status.contains("200"), "{status}");
    for (family, kind) in [
        ("cairn_volume_ops_total", "counter"),
        ("cairn_volume_bytes_total", "counter"),
        ("cairn_volume_errors_total", "counter"),
        ("cairn_volume_latency_seconds", "histogram"),
        ("cairn_volume_connections", "gauge"),
        ("cairn_reactor_busy_seconds_total", "counter"),
        ("cairn_reactor_idle_seconds_total", "counter"),
    ] {
        assert!(
            body.contains(&format!("# TYPE {family} {kind}\n")),
            "{family}:\n{body}"
        );
        assert!(
            body.contains(&format!("# HELP {family} ")),
            "{family}:\n{body}"
        );
    }
    for line in [
        "cairn_volume_ops_total{volume=\"vol\",op=\"read\"} ",
        "cairn_volume_bytes_total{volume=\"vol\",dir=\"write\"} ",
        "cairn_volume_latency_seconds_bucket{volume=\"vol\",le=\"+Inf\"} ",
        "cairn_volume_latency_seconds_count{volume=\"vol\"} ",
        "cairn_volume_connections{volume=\"vol\"} 0",
        "cairn_reactor_idle_seconds_total{core=\"0\"} ",
    ] {
        assert!(body.contains(line), "{line}:\n{body}");
    }
    let (status, _) = http_get(d.ready.metrics, "/other");
    assert!(status.contains("404"), "{status}");
}

#[test]
fn a_listener_beyond_loopback_without_tls_is_refused_unless_insecure() {
    let dir = TempDir::new("insecure");
    for flag in ["--admin-listen", "--nbd-listen", "--replica-listen"] {
        let stderr = refused(&dir.0.join("data"), &[flag, "0.0.0.0:0"]);
        assert!(
            stderr.contains(&format!(
                "{flag} 0.0.0.0:0 listens beyond this machine without TLS"
            )) && stderr.contains("--insecure"),
            "{flag}: {stderr}"
        );
    }
    let stderr = refused(&dir.0.join("data"), &["--tls-ca", "ca.pem"]);
    assert!(
        stderr.contains("--tls-cert and --tls-key missing"),
        "{stderr}"
    );
}

#[test]
fn a_taken_port_is_refused_by_name() {
    let dir = TempDir::new("ports");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for flag in [
        "--admin-listen",
        "--metrics-listen",
        "--nbd-listen",
        "--replica-listen",
    ] {
        let stderr = refused(&dir.0.join("data"), &[flag, &addr]);
        assert!(stderr.contains(&addr), "{flag}: {stderr}");
    }
}

#[test]
fn a_second_daemon_on_the_same_data_dir_is_refused() {
    let dir = TempDir::new("lock");
    let d = Daemon::start(&dir, &[]);
    let stderr = refused(&dir.0.join("data"), &[]);
    assert!(
        stderr.contains("pool0.img") && stderr.contains("in use"),
        "{stderr}"
    );
    let (status, log) = d.terminate();
    assert!(status.success(), "{log}");
}

#[test]
fn bad_volume_specs_are_refused() {
    let dir = TempDir::new("specs");
    let data = dir.0.join("data");
    let stderr = refused(&data, &["--volume", "nosize"]);
    assert!(stderr.contains("nosize"), "{stderr}");
    // Parses, but the pool refuses a size that is not a multiple of the block size.
    let stderr = refused(&data, &["--volume", "odd:1000"]);
    assert!(
        stderr.contains("--volume odd") && stderr.contains("1000"),
        "{stderr}"
    );
    let stderr = refused(&data, &["--volume", "a:1M", "--malloc", "a:1M"]);
    assert!(stderr.contains("'a'"), "{stderr}");
}

#[test]
fn sigterm_exits_zero_and_a_restart_finds_the_volumes() {
    let dir = TempDir::new("restart");
    let d = Daemon::start(&dir, &["--volume", "keep:16M"]);
    let rt = runtime();
    let mut c = d.client(&rt);
    rt.block_on(c.create_volume(pb::CreateVolumeRequest {
        name: "made".into(),
        size_bytes: 8 * MIB,
        ..Default::default()
    }))
    .unwrap();
    rt.block_on(c.create_snapshot(pb::CreateSnapshotRequest {
        volume: "made".into(),
        name: "made-snap".into(),
        pool: String::new(),
    }))
    .unwrap();
    drop(c);
    let (status, log) = d.terminate();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("pool closed"), "{log}");

    let d = Daemon::start(&dir, &["--volume", "keep:16M"]);
    assert_eq!(d.ready.exports, ["keep"]);
    let mut c = d.client(&rt);
    let all = volumes(&rt, &mut c);
    let names: Vec<_> = all
        .iter()
        .map(|v| (v.name.as_str(), v.size_bytes))
        .collect();
    assert_eq!(
        names,
        [
            ("keep", 16 * MIB),
            ("made", 8 * MIB),
            ("made-snap", 8 * MIB)
        ]
    );
    let (status, log) = d.terminate();
    assert!(status.success(), "{log}");
}

#[test]
fn help_explains_with_examples() {
    let out = Command::new(env!("CARGO_BIN_EXE_cairn-node"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "Examples:",
        "--volume",
        "--malloc",
        "--nbd-socket",
        "SIGTERM",
        "cores =",
    ] {
        assert!(
            text.contains(needle),
            "{needle} missing from --help:\n{text}"
        );
    }
}

/// The smallest NBD client that moves data: fixed-newstyle handshake with
/// NBD_OPT_EXPORT_NAME, then simple requests and replies.
struct NbdConn(std::net::TcpStream);

impl NbdConn {
    const REQUEST_MAGIC: u32 = 0x2560_9513;
    const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

    fn open(addr: SocketAddr, export: &str) -> (NbdConn, u64) {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting[..16], b"NBDMAGICIHAVEOPT");
        // Client flags: FIXED_NEWSTYLE | NO_ZEROES.
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut opt = b"IHAVEOPT".to_vec();
        opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        s.write_all(&opt).unwrap();
        let mut info = [0u8; 10];
        s.read_exact(&mut info).unwrap();
        let size = u64::from_be_bytes(info[..8].try_into().unwrap());
        (NbdConn(s), size)
    }

    fn request(&mut self, kind: u16, offset: u64, len: u32, payload: &[u8]) {
        let mut r = Vec::with_capacity(28 + payload.len());
        r.extend_from_slice(&Self::REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&7u64.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r.extend_from_slice(payload);
        self.0.write_all(&r).unwrap();
        let mut reply = [0u8; 16];
        self.0.read_exact(&mut reply).unwrap();
        assert_eq!(reply[..4], Self::SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(reply[4..8], [0; 4], "NBD error {:?}", &reply[4..8]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.request(1, offset, data.len() as u32, data);
    }

    fn read(&mut self, offset: u64, len: u32) -> Vec<u8> {
        self.request(0, offset, len, &[]);
        let mut data = vec![0u8; len as usize];
        self.0.read_exact(&mut data).unwrap();
        data
    }
}

fn metric(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("{series} missing:\n{body}"))
        .parse()
        .unwrap()
}

/// I/O over NBD shows up in /metrics and Stats, and SIGTERM with a client still connected
/// drains it and exits 0 with the data durable for the next start.
#[test]
fn nbd_traffic_is_counted_and_survives_sigterm() {
    let dir = TempDir::new("traffic");
    let d = Daemon::start(&dir, &["--volume", "io:8M"]);
    let (mut conn, size) = NbdConn::open(d.ready.nbd.unwrap(), "io");
    assert_eq!(size, 8 * MIB);
    let data: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    conn.write(4096, &data);
    assert!(
        conn.read(4096, data.len() as u32) == data,
        "read back what was written"
    );

    let (_, body) = http_get(d.ready.metrics, "/metrics");
    assert_eq!(
        metric(&body, "cairn_volume_ops_total{volume=\"io\",op=\"write\"}"),
        1.0
    );
    assert_eq!(
        metric(&body, "cairn_volume_ops_total{volume=\"io\",op=\"read\"}"),
        1.0
    );
    assert_eq!(
        metric(
            &body,
            "cairn_volume_bytes_total{volume=\"io\",dir=\"write\"}"
        ),
        data.len() as f64
    );
    assert_eq!(
        metric(&body, "cairn_volume_connections{volume=\"io\"}"),
        1.0
    );
    assert_eq!(
        metric(&body, "cairn_volume_latency_seconds_count{volume=\"io\"}"),
        2.0
    );
    assert_eq!(
        metric(&body, "cairn_volume_errors_total{volume=\"io\"}"),
        0.0
    );

    let rt = runtime();
    let mut c = d.client(&rt);
    let stats = rt
        .block_on(c.stats(pb::StatsRequest {}))
        .unwrap()
        .into_inner();
    let io = stats.exports.iter().find(|e| e.name == "io").unwrap();
    assert_eq!(io.connections, 1);
    assert_eq!(io.stats.as_ref().unwrap().bytes_read, data.len() as u64);
    drop(c);
    drop(rt);

    let (status, log) = d.terminate();
    assert_eq!(status.code(), Some(0), "{log}");
    drop(conn);
    let d = Daemon::start(&dir, &["--volume", "io:8M"]);
    let (mut conn, _) = NbdConn::open(d.ready.nbd.unwrap(), "io");
    let survived = conn.read(4096, data.len() as u32) == data;
    assert!(survived, "unflushed writes survive SIGTERM and a restart");
    drop(conn);
    let (status, log) = d.terminate();
    assert!(status.success(), "{log}");
}
