//! Harness for the multi-process replication tests (node/tests/replication.rs): `cairn-node`
//! daemons run as separate processes on loopback, or inside a network namespace joined to
//! the host by a veth pair whose link a test can cut; a blocking wrapper over their admin
//! API; NBD connections to a nexus export; and a deterministic write workload that keeps a
//! model of what every block of the volume must hold, so a read-back finds any lost or stale
//! write and names the block.
//!
//! Every process and namespace made here is torn down in `Drop`, so a failed assertion
//! leaves nothing running; a failing test prints the tail of each daemon's log. Timeouts
//! here only turn a hang into a failure. The paced [`Writer`] records the longest time a
//! write or flush took, for tests to print (node/tests/resync_load.rs), never to assert on.
//!
//! It expects the including test crate to have the raw NBD client at `crate::nbd_client`
//! (engine/tests/common/nbd_client.rs), the shared harness at `crate::common` and the ready
//! line reader at `crate::ready` (common/ready.rs).

#![allow(dead_code)] // Not every test uses every helper.

use crate::common::WorkDir;
use crate::nbd_client::{self, Client, Endpoint, Options, Stream};
use crate::ready;
use cairn_engine::frontend::nbd::proto::{client_flag, cmd, handshake_flag};
use cairn_node::proto as pb;
use cairn_node::proto::node_admin_client::NodeAdminClient;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const MIB: u64 = 1 << 20;
/// The replicated volume every test uses: a volume of this name on each replica node, and
/// the nexus (and its export) of the same name.
pub const VOLUME: &str = "vol";
pub const VOLUME_BYTES: u64 = 64 * MIB;
/// Unit of the workload's writes, and the nexus's dirty-region size in these tests.
pub const BLOCK_BYTES: u64 = 64 << 10;
pub const BLOCKS: u64 = VOLUME_BYTES / BLOCK_BYTES;
/// The workload flushes after this many writes.
pub const FLUSH_EVERY_WRITES: u64 = 16;
/// Pool space a node needs besides its replica volume (metadata, and room to spare).
const POOL_SPARE_BYTES: u64 = 256 * MIB;
/// Largest read [`Workload::check`] sends (whole blocks, at most the nexus's largest I/O).
const CHECK_READ_MAX_BYTES: u64 = 128 << 10;

/// How long a daemon may take to print its ready line.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest any admin call may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a test waits for a nexus to reach a state (resync done, fenced, ...).
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(180);
/// How often waits look again.
const POLL: Duration = Duration::from_millis(20);

/// How to start one daemon.
#[derive(Clone, Debug)]
pub struct Config {
    /// Create (or reuse) the volume [`VOLUME`] to be hosted as a replica.
    pub replica_volume: bool,
    /// `--replica-listen`: a fixed address, so a restarted node keeps its endpoint.
    pub replica_listen: String,
    pub fault_injection: bool,
    /// IP the admin listener binds.
    pub admin_ip: IpAddr,
    /// Run inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    /// Size of the replica volume (and so of a nexus over it), in whole MiB.
    pub volume_bytes: u64,
    /// The daemon's umask (inherited from the test process when None).
    pub umask: Option<u32>,
    /// More flags, appended after the harness's own (a later flag overrides an earlier one).
    pub extra_args: Vec<String>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            replica_volume: false,
            replica_listen: "127.0.0.1:0".into(),
            fault_injection: false,
            admin_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            netns: None,
            volume_bytes: VOLUME_BYTES,
            umask: None,
            extra_args: Vec::new(),
        }
    }
}

impl Config {
    /// A node that hosts the replica [`VOLUME`] at a fixed port of `ip`.
    pub fn replica(ip: IpAddr) -> Config {
        Config {
            replica_volume: true,
            replica_listen: SocketAddr::new(ip, free_port(ip)).to_string(),
            ..Config::default()
        }
    }

    fn args(&self, data_dir: &std::path::Path) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--pool0-size".into(),
            format!("{}M", (self.volume_bytes + POOL_SPARE_BYTES) / MIB),
            "--cores".into(),
            "0".into(),
            "--nbd-listen".into(),
            "127.0.0.1:0".into(),
            "--admin-listen".into(),
            SocketAddr::new(self.admin_ip, 0).to_string(),
            "--metrics-listen".into(),
            "127.0.0.1:0".into(),
            "--replica-listen".into(),
            self.replica_listen.clone(),
        ];
        if self.replica_volume {
            a.push("--replica-volume".into());
            a.push(format!("{VOLUME}:{}M", self.volume_bytes / MIB));
        }
        if self.fault_injection {
            a.push("--fault-injection".into());
        }
        // Namespaced nodes listen on their veth addresses, in plain TCP: the listener rule
        // wants that said (docs/security.md).
        let replica_beyond = self
            .replica_listen
            .parse::<SocketAddr>()
            .is_ok_and(|r| !r.ip().is_loopback());
        if !self.admin_ip.is_loopback() || replica_beyond {
            a.push("--insecure".into());
        }
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// A port of `ip` nobody listens on now. The kernel does not hand the same ephemeral port
/// out again at once, so the window before the daemon binds it is safe in practice.
pub fn free_port(ip: IpAddr) -> u16 {
    let l = TcpListener::bind(SocketAddr::new(ip, 0))
        .unwrap_or_else(|e| panic!("bind {ip}:0 to find a free port: {e}"));
    l.local_addr().unwrap().port()
}

/// The addresses of a daemon's ready line.
#[derive(Clone, Debug)]
pub struct Ready {
    pub nbd: SocketAddr,
    pub admin: SocketAddr,
    /// The Prometheus endpoint.
    pub metrics: SocketAddr,
    /// `None` when the replica server is off.
    pub replica: Option<String>,
}

fn parse_ready(line: &str) -> Ready {
    let field = |k: &str| ready::field(line, k);
    let replica = field("replica");
    Ready {
        nbd: field("nbd").parse().expect("nbd= is an address"),
        admin: field("admin").parse().expect("admin= is an address"),
        metrics: field("metrics").parse().expect("metrics= is an address"),
        replica: (replica != "-").then_some(replica),
    }
}

/// One `cairn-node` process. Dropping it kills the process (SIGKILL).
pub struct Daemon {
    pub name: String,
    config: Config,
    data_dir: PathBuf,
    log_dir: PathBuf,
    child: Option<Child>,
    pub ready: Ready,
    /// Starts so far; each run logs to its own file.
    starts: u32,
}

impl Daemon {
    /// Starts a node named `name` with its data dir under `dir`, and waits for its ready line.
    pub fn start(dir: &WorkDir, name: &str, config: Config) -> Daemon {
        let data_dir = dir.join(name);
        std::fs::create_dir_all(&data_dir).unwrap();
        let (child, ready) = spawn(name, &config, &data_dir, &dir.path, 0);
        Daemon {
            name: name.into(),
            config,
            data_dir,
            log_dir: dir.path.clone(),
            child: Some(child),
            ready,
            starts: 1,
        }
    }

    /// The replica server's endpoint, as a nexus names it.
    pub fn replica(&self) -> String {
        self.ready
            .replica
            .clone()
            .unwrap_or_else(|| panic!("node {} runs no replica server", self.name))
    }

    /// SIGKILL, then reap: a crash with no chance to flush or close anything.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reaped");
    }

    /// Starts the node again on the same data dir, with the same flags (so the same replica
    /// endpoint).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "node {} is still running", self.name);
        let (child, ready) = spawn(
            &self.name,
            &self.config,
            &self.data_dir,
            &self.log_dir,
            self.starts,
        );
        self.starts += 1;
        self.child = Some(child);
        self.ready = ready;
    }

    fn log_path(&self) -> PathBuf {
        log_path(&self.log_dir, &self.name, self.starts - 1)
    }

    /// The current run's stderr (the daemon's log).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn log_tail(&self) -> String {
        let text = self.log();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(30);
        format!(
            "--- node {} log {} (last {} lines) ---\n{}",
            self.name,
            self.log_path().display(),
            lines.len() - from,
            lines[from..].join("\n")
        )
    }

    /// A client of its admin API.
    pub fn admin(&self) -> Admin {
        Admin::connect(&self.name, self.ready.admin)
    }

    /// The directory holding its pool and epoch files.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.data_dir
    }

    /// The daemon's process id (for reading its `/proc/PID/stat`).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// An NBD connection to the nexus export [`VOLUME`] (from this process's namespace).
    pub fn nbd(&self) -> Client {
        nbd_connect(
            Stream::connect(&Endpoint::Tcp(self.ready.nbd)).expect("NBD connects"),
            self.config.volume_bytes,
        )
    }

    /// The node's metrics page (Prometheus text), fetched over plain HTTP/1.0.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let addr = self.ready.metrics;
        let mut s = TcpStream::connect(addr)
            .unwrap_or_else(|e| panic!("node {}: metrics at {addr}: {e}", self.name));
        s.set_read_timeout(Some(RPC_TIMEOUT)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .unwrap_or_else(|e| panic!("node {}: metrics request: {e}", self.name));
        let mut page = String::new();
        s.read_to_string(&mut page)
            .unwrap_or_else(|e| panic!("node {}: metrics answer: {e}", self.name));
        match page.split_once("\r\n\r\n") {
            Some((_, body)) => body.to_string(),
            None => panic!("node {}: metrics answer without a body: {page}", self.name),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            drop(child.kill());
            drop(child.wait());
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}

fn log_path(dir: &std::path::Path, name: &str, start: u32) -> PathBuf {
    dir.join(format!("{name}-{start}.log"))
}

/// Spawns the daemon and waits for its ready line (killing it and failing if it never comes).
fn spawn(
    name: &str,
    config: &Config,
    data_dir: &std::path::Path,
    log_dir: &std::path::Path,
    start: u32,
) -> (Child, Ready) {
    let log = log_path(log_dir, name, start);
    let bin = env!("CARGO_BIN_EXE_cairn-node");
    let mut cmd = match &config.netns {
        None => Command::new(bin),
        Some(ns) => {
            // `ip netns exec` execs the daemon in place, so the child's pid is the daemon's.
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, bin]);
            c
        }
    };
    if let Some(mask) = config.umask {
        use std::os::unix::process::CommandExt;
        let set_umask = move || {
            // SAFETY: umask only sets the calling (child) process's file creation mask.
            unsafe { libc::umask(mask as libc::mode_t) };
            Ok(())
        };
        // SAFETY: the hook runs in the forked child before exec and calls only umask, which is
        // async-signal-safe, takes no lock and allocates nothing.
        unsafe { cmd.pre_exec(set_umask) };
    }
    let mut child = cmd
        .args(config.args(data_dir))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn cairn-node {name}: {e}"));
    match ready::wait_ready(&mut child, START_TIMEOUT) {
        Ok(line) => (child, parse_ready(&line)),
        Err(e) => {
            drop(child.kill());
            drop(child.wait());
            panic!(
                "cairn-node {name} did not get ready ({e:?}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    }
}

/// Negotiates the export [`VOLUME`] of `size_bytes` on a connected stream (simple replies).
pub fn nbd_connect(mut s: Stream, size_bytes: u64) -> Client {
    let flags = nbd_client::greet(&mut s).expect("NBD greeting");
    let mut cflags = client_flag::FIXED_NEWSTYLE;
    if flags & handshake_flag::NO_ZEROES != 0 {
        cflags |= client_flag::NO_ZEROES;
    }
    nbd_client::send_client_flags(&mut s, cflags).expect("NBD client flags");
    let c = Client::negotiate(s, VOLUME, Options::default()).expect("NBD export negotiated");
    assert_eq!(c.size_bytes, size_bytes, "nexus export size");
    c
}

/// A blocking client of one node's admin API; every call is bounded by [`RPC_TIMEOUT`].
pub struct Admin {
    node: String,
    rt: tokio::runtime::Runtime,
    client: NodeAdminClient<tonic::transport::Channel>,
}

impl Admin {
    pub fn connect(node: &str, addr: SocketAddr) -> Admin {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(RPC_TIMEOUT)
            .timeout(RPC_TIMEOUT);
        let channel = rt
            .block_on(endpoint.connect())
            .unwrap_or_else(|e| panic!("admin API of node {node} at {addr}: {e}"));
        Admin {
            node: node.into(),
            rt,
            client: NodeAdminClient::new(channel),
        }
    }

    /// CreateNexus [`VOLUME`] over `replicas` (fresh ones: no takeover), with
    /// [`BLOCK_BYTES`] regions.
    pub fn create_nexus(&mut self, replicas: &[String], io_timeout_ms: u64) -> pb::Nexus {
        self.try_create_nexus(&Self::create_request(replicas, io_timeout_ms))
            .unwrap_or_else(|s| panic!("node {}: CreateNexus over {replicas:?}: {s}", self.node))
    }

    /// CreateNexus over replicas another nexus opened (`takeover`).
    pub fn take_over(&mut self, replicas: &[String], io_timeout_ms: u64) -> pb::Nexus {
        let req = pb::CreateNexusRequest {
            takeover: true,
            ..Self::create_request(replicas, io_timeout_ms)
        };
        self.try_create_nexus(&req)
            .unwrap_or_else(|s| panic!("node {}: takeover of {replicas:?}: {s}", self.node))
    }

    /// The CreateNexus request [`Admin::create_nexus`] sends.
    pub fn create_request(replicas: &[String], io_timeout_ms: u64) -> pb::CreateNexusRequest {
        pb::CreateNexusRequest {
            name: VOLUME.into(),
            replicas: replicas.to_vec(),
            min_in_sync: 1,
            region_bytes: BLOCK_BYTES,
            io_timeout_ms,
            rebuild_bytes_per_s: 0,
            epoch: 0,
            takeover: false,
            ..Default::default()
        }
    }

    /// CreateNexus with `req`, the gRPC status when refused.
    pub fn try_create_nexus(
        &mut self,
        req: &pb::CreateNexusRequest,
    ) -> Result<pb::Nexus, Box<tonic::Status>> {
        self.rt
            .block_on(self.client.create_nexus(req.clone()))
            .map(tonic::Response::into_inner)
            .map_err(Box::new)
    }

    /// Exports the nexus [`VOLUME`] over NBD under its own name.
    pub fn export_nexus(&mut self) {
        let req = pb::ExportRequest {
            name: VOLUME.into(),
            nexus: true,
            ..Default::default()
        };
        let node = &self.node;
        let e = self
            .rt
            .block_on(self.client.export(req))
            .unwrap_or_else(|s| panic!("node {node}: export nexus: {s}"))
            .into_inner();
        assert_eq!(e.kind, "nexus", "{e:?}");
    }

    /// Export with `req` as given (an encrypted one, a refused one): the gRPC status when
    /// refused.
    pub fn try_export(
        &mut self,
        req: pb::ExportRequest,
    ) -> Result<pb::ExportInfo, Box<tonic::Status>> {
        self.rt
            .block_on(self.client.export(req))
            .map(tonic::Response::into_inner)
            .map_err(Box::new)
    }

    /// CreateVolume `name` in the node's first pool.
    pub fn create_volume(&mut self, name: &str, size_bytes: u64) -> pb::Volume {
        let req = pb::CreateVolumeRequest {
            name: name.into(),
            size_bytes,
            ..Default::default()
        };
        let node = &self.node;
        self.rt
            .block_on(self.client.create_volume(req))
            .unwrap_or_else(|s| panic!("node {node}: CreateVolume {name}: {s}"))
            .into_inner()
    }

    /// Exports the plain volume `name` over NBD under its own name.
    pub fn export_volume(&mut self, name: &str) {
        let req = pb::ExportRequest {
            name: name.into(),
            ..Default::default()
        };
        let node = &self.node;
        self.rt
            .block_on(self.client.export(req))
            .unwrap_or_else(|s| panic!("node {node}: export {name}: {s}"));
    }

    pub fn show(&mut self) -> pb::Nexus {
        let req = pb::ShowNexusRequest {
            name: VOLUME.into(),
        };
        let node = &self.node;
        self.rt
            .block_on(self.client.show_nexus(req))
            .unwrap_or_else(|s| panic!("node {node}: ShowNexus: {s}"))
            .into_inner()
    }

    /// PromoteNexus [`VOLUME`]: re-opens its replicas at the next epoch.
    pub fn promote(&mut self) -> pb::Nexus {
        let req = pb::PromoteNexusRequest {
            name: VOLUME.into(),
        };
        let node = &self.node;
        self.rt
            .block_on(self.client.promote_nexus(req))
            .unwrap_or_else(|s| panic!("node {node}: PromoteNexus: {s}"))
            .into_inner()
    }

    /// Unexports the NBD export `name`.
    pub fn unexport(&mut self, name: &str) {
        let req = pb::UnexportRequest {
            export_name: name.into(),
        };
        let node = &self.node;
        self.rt
            .block_on(self.client.unexport(req))
            .unwrap_or_else(|s| panic!("node {node}: Unexport {name}: {s}"));
    }

    /// DestroyNexus [`VOLUME`].
    pub fn destroy_nexus(&mut self) {
        let req = pb::DestroyNexusRequest {
            name: VOLUME.into(),
        };
        let node = &self.node;
        self.rt
            .block_on(self.client.destroy_nexus(req))
            .unwrap_or_else(|s| panic!("node {node}: DestroyNexus: {s}"));
    }

    pub fn add_replica(&mut self, replica: &str) -> pb::Nexus {
        let req = pb::AddReplicaRequest {
            nexus: VOLUME.into(),
            replica: replica.into(),
        };
        let node = &self.node;
        self.rt
            .block_on(self.client.add_replica(req))
            .unwrap_or_else(|s| panic!("node {node}: AddReplica {replica}: {s}"))
            .into_inner()
    }

    pub fn verify(&mut self) -> pb::VerifyNexusResponse {
        self.verify_with(false)
    }

    /// VerifyNexus, with `repair` of the replicas that differ from the source.
    pub fn verify_with(&mut self, repair: bool) -> pb::VerifyNexusResponse {
        let req = pb::VerifyNexusRequest {
            name: VOLUME.into(),
            repair,
        };
        let node = &self.node;
        self.rt
            .block_on(self.client.verify_nexus(req))
            .unwrap_or_else(|s| panic!("node {node}: VerifyNexus: {s}"))
            .into_inner()
    }

    /// Asserts that VerifyNexus compares `replicas` in-sync replicas over the whole volume
    /// in [`BLOCK_BYTES`] regions and finds them equal.
    pub fn assert_verified(&mut self, replicas: usize) {
        let v = self.assert_copies_equal(replicas, VOLUME_BYTES);
        assert_eq!(
            (v.regions, v.region_bytes),
            (VOLUME_BYTES / BLOCK_BYTES, BLOCK_BYTES),
            "{v:?}"
        );
    }

    /// Asserts that VerifyNexus compares `replicas` in-sync replicas over all `size_bytes`
    /// (whatever the region size) and finds them equal; returns its answer.
    pub fn assert_copies_equal(
        &mut self,
        replicas: usize,
        size_bytes: u64,
    ) -> pb::VerifyNexusResponse {
        let v = self.verify();
        assert_eq!(v.replicas.len(), replicas, "replicas compared: {v:?}");
        assert!(
            v.regions * v.region_bytes >= size_bytes,
            "verify covered {} regions of {} bytes, less than the {size_bytes} bytes of the \
             volume: {v:?}",
            v.regions,
            v.region_bytes
        );
        assert_eq!(
            v.mismatched_regions,
            Vec::<u64>::new(),
            "replicas of node {}'s nexus differ: {v:?}",
            self.node
        );
        v
    }

    /// SetFault on this node's pool0 device.
    pub fn set_fault(&mut self, latency_us: u64, heal: bool) {
        self.set_fault_errno(latency_us, 0, heal);
    }

    /// SetFault on this node's pool0 device, failing reads and writes with `fail_errno`.
    pub fn set_fault_errno(&mut self, latency_us: u64, fail_errno: i32, heal: bool) {
        let req = pb::SetFaultRequest {
            name: "pool0".into(),
            latency_us,
            fail_errno,
            heal,
        };
        let node = &self.node;
        self.rt
            .block_on(self.client.set_fault(req))
            .unwrap_or_else(|s| panic!("node {node}: SetFault: {s}"));
    }

    /// Polls ShowNexus until `done` holds; fails (with the last view) after
    /// [`CONVERGE_TIMEOUT`].
    pub fn wait_for(&mut self, what: &str, done: impl Fn(&pb::Nexus) -> bool) -> pb::Nexus {
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        loop {
            let v = self.show();
            if done(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "node {}: no {what} within {CONVERGE_TIMEOUT:?}: {v:#?}",
                self.node
            );
            std::thread::sleep(POLL);
        }
    }
}

/// Every replica in sync and no resync running.
pub fn all_in_sync(v: &pb::Nexus) -> bool {
    v.resync.is_none() && v.replicas.iter().all(|r| r.state == "in-sync")
}

/// The replica at `address` in a ShowNexus answer.
pub fn replica<'a>(v: &'a pb::Nexus, address: &str) -> &'a pb::Replica {
    v.replicas
        .iter()
        .find(|r| r.address == address)
        .unwrap_or_else(|| panic!("no replica {address} in {v:#?}"))
}

/// The contents of the [`BLOCK_BYTES`] block at `offset_bytes` written by write number
/// `round`: see [`block_data_len`].
pub fn block_data(offset_bytes: u64, round: u64) -> Vec<u8> {
    block_data_len(offset_bytes, round, BLOCK_BYTES)
}

/// The `len` bytes written at `offset_bytes` by write number `round`: a header naming both
/// (so a wrong block read back says whose it is), then xorshift noise seeded by them.
pub fn block_data_len(offset_bytes: u64, round: u64, len: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(len as usize);
    b.extend_from_slice(&offset_bytes.to_le_bytes());
    b.extend_from_slice(&round.to_le_bytes());
    let mut x = (offset_bytes.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ round.wrapping_add(1)) | 1;
    while b.len() < len as usize {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

/// What a block read back holds, for messages: whose header it carries.
pub fn describe_block(data: &[u8]) -> String {
    if data.iter().all(|&b| b == 0) {
        return "zeroes".into();
    }
    let off = u64::from_le_bytes(data[0..8].try_into().unwrap());
    let round = u64::from_le_bytes(data[8..16].try_into().unwrap());
    if data == block_data_len(off, round, data.len() as u64).as_slice() {
        format!("the block written at offset {off} by write {round}")
    } else {
        "bytes no write of this test made".into()
    }
}

/// What a [`Workload`] writes to: the volume's size, the size of every write, and how often
/// it flushes.
#[derive(Clone, Copy, Debug)]
pub struct Shape {
    pub volume_bytes: u64,
    pub block_bytes: u64,
    /// The workload flushes after every this many writes.
    pub flush_every_writes: u64,
}

impl Shape {
    /// [`VOLUME_BYTES`] in [`BLOCK_BYTES`] writes, a flush every [`FLUSH_EVERY_WRITES`].
    pub const DEFAULT: Shape = Shape {
        volume_bytes: VOLUME_BYTES,
        block_bytes: BLOCK_BYTES,
        flush_every_writes: FLUSH_EVERY_WRITES,
    };

    pub fn blocks(&self) -> u64 {
        self.volume_bytes / self.block_bytes
    }
}

/// Writes whole blocks at deterministic pseudo-random block-aligned offsets, flushing every
/// so many writes, and remembers which write each block last received.
pub struct Workload {
    pub shape: Shape,
    /// Per block: the write (round) that last succeeded there.
    model: Vec<Option<u64>>,
    rng: u64,
    /// Writes attempted so far; also the next write's round.
    pub writes: u64,
    /// Bytes of successful writes.
    pub bytes: u64,
}

impl Workload {
    /// [`Shape::DEFAULT`].
    pub fn new(seed: u64) -> Workload {
        Workload::with_shape(seed, Shape::DEFAULT)
    }

    pub fn with_shape(seed: u64, shape: Shape) -> Workload {
        Workload {
            shape,
            model: vec![None; shape.blocks() as usize],
            rng: seed | 1,
            writes: 0,
            bytes: 0,
        }
    }

    fn next_block(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng % self.shape.blocks()
    }

    /// Writes one block at a pseudo-random offset (then flushes on every
    /// `flush_every_writes`th write).
    pub fn write_random(&mut self, c: &mut Client) -> Result<(), String> {
        let block = self.next_block();
        self.write_block(c, block)
    }

    /// Writes block number `block` with this write's data; the model learns it only if the
    /// server acknowledged it.
    pub fn write_block(&mut self, c: &mut Client, block: u64) -> Result<(), String> {
        let round = self.writes;
        self.writes += 1;
        let len = self.shape.block_bytes;
        let off = block * len;
        match c.write(off, &block_data_len(off, round, len), 0) {
            Ok(0) => {}
            Ok(e) => return Err(format!("write {round} at {off}: NBD error {e}")),
            Err(e) => return Err(format!("write {round} at {off}: {e}")),
        }
        self.model[block as usize] = Some(round);
        self.bytes += len;
        if self.flush_due() {
            flush(c)?;
        }
        Ok(())
    }

    /// Whether the write just made is one the workload flushes after.
    fn flush_due(&self) -> bool {
        self.writes.is_multiple_of(self.shape.flush_every_writes)
    }

    /// Sends a write whose failure the test expects: the NBD error, or 0 if it was accepted
    /// (then the model learns it, so a read-back still holds the server to it).
    pub fn write_refused(&mut self, c: &mut Client, block: u64) -> u32 {
        let round = self.writes;
        self.writes += 1;
        let len = self.shape.block_bytes;
        let off = block * len;
        let e = c
            .write(off, &block_data_len(off, round, len), 0)
            .unwrap_or_else(|e| panic!("write {round} at {off}: connection failed: {e}"));
        if e == 0 {
            self.model[block as usize] = Some(round);
        }
        e
    }

    /// What block `block` must read back as: its last acknowledged write, or zeroes.
    pub fn expected(&self, block: u64) -> Vec<u8> {
        let len = self.shape.block_bytes;
        match self.model[block as usize] {
            Some(round) => block_data_len(block * len, round, len),
            None => vec![0; len as usize],
        }
    }

    /// Reads the whole volume back (several blocks a read) and compares every block with
    /// the model (never-written blocks must read as zeroes).
    pub fn check(&self, c: &mut Client) -> Result<(), String> {
        let len = self.shape.block_bytes;
        let per_read = (CHECK_READ_MAX_BYTES / len).max(1);
        let blocks = self.shape.blocks();
        let mut wrong = Vec::new();
        let mut first = 0;
        while first < blocks {
            let n = per_read.min(blocks - first);
            let off = first * len;
            let got = match c.read(off, (n * len) as u32) {
                Ok(Ok(d)) => d,
                Ok(Err(e)) => return Err(format!("read of {n} blocks at {off}: NBD error {e}")),
                Err(e) => return Err(format!("read of {n} blocks at {off}: {e}")),
            };
            for (i, got) in got.chunks(len as usize).enumerate() {
                let block = first + i as u64;
                let want = self.expected(block);
                if got != want.as_slice() {
                    wrong.push(format!(
                        "block at {}: expected {}, read {}",
                        block * len,
                        describe_block(&want),
                        describe_block(got)
                    ));
                }
            }
            first += n;
        }
        if wrong.is_empty() {
            return Ok(());
        }
        let n = wrong.len();
        wrong.truncate(10);
        Err(format!(
            "{n} blocks differ from the model:\n{}",
            wrong.join("\n")
        ))
    }
}

pub fn flush(c: &mut Client) -> Result<(), String> {
    match c.simple(cmd::FLUSH, 0, 0, 0) {
        Ok(0) => Ok(()),
        Ok(e) => Err(format!("flush: NBD error {e}")),
        Err(e) => Err(format!("flush: {e}")),
    }
}

/// The longest time one write (with the flush that follows it, when one does) took since
/// the writer started, in microseconds.
#[derive(Clone, Default)]
pub struct Latency(Arc<AtomicU64>);

impl Latency {
    fn record(&self, took: Duration) {
        self.0.fetch_max(took.as_micros() as u64, Ordering::AcqRel);
    }

    /// The longest so far.
    pub fn max(&self) -> Duration {
        Duration::from_micros(self.0.load(Ordering::Acquire))
    }
}

/// A [`Workload`] writing random blocks on its own thread until stopped (or until it has
/// written a byte limit), so a test can crash, add or slow replicas meanwhile. Paced, it
/// issues writes at a fixed rate (a write that took too long delays the schedule; the writer
/// never bursts to catch up) and records the longest write.
pub struct Writer {
    stop: Arc<AtomicBool>,
    /// Stop once this many bytes were written in all.
    limit_bytes: Arc<AtomicU64>,
    written_bytes: Arc<AtomicU64>,
    latency: Latency,
    thread: Option<JoinHandle<Result<(Workload, Client), String>>>,
}

impl Writer {
    /// Writes back to back.
    pub fn start(w: Workload, c: Client) -> Writer {
        Writer::spawn(w, c, None)
    }

    /// Writes `writes_per_s` writes a second.
    pub fn start_paced(w: Workload, c: Client, writes_per_s: u32) -> Writer {
        let period = Duration::from_secs(1) / writes_per_s.max(1);
        Writer::spawn(w, c, Some(period))
    }

    fn spawn(mut w: Workload, mut c: Client, period: Option<Duration>) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let limit_bytes = Arc::new(AtomicU64::new(u64::MAX));
        let written_bytes = Arc::new(AtomicU64::new(w.bytes));
        let latency = Latency::default();
        let (s, l, n, lat) = (
            stop.clone(),
            limit_bytes.clone(),
            written_bytes.clone(),
            latency.clone(),
        );
        let thread = std::thread::spawn(move || {
            let mut next = Instant::now();
            while !s.load(Ordering::Acquire) && w.bytes < l.load(Ordering::Acquire) {
                if let Some(period) = period {
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    next = next.max(now) + period;
                }
                let t = Instant::now();
                w.write_random(&mut c)?;
                lat.record(t.elapsed());
                n.store(w.bytes, Ordering::Release);
            }
            flush(&mut c)?;
            Ok((w, c))
        });
        Writer {
            stop,
            limit_bytes,
            written_bytes,
            latency,
            thread: Some(thread),
        }
    }

    /// Bytes acknowledged so far.
    pub fn bytes(&self) -> u64 {
        self.written_bytes.load(Ordering::Acquire)
    }

    /// The longest write so far (with its flush, when one followed it).
    pub fn latency(&self) -> &Latency {
        &self.latency
    }

    /// Waits until `bytes` were written in all; fails if the writer stopped first or after
    /// [`CONVERGE_TIMEOUT`].
    pub fn wait_bytes(&mut self, bytes: u64) {
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        while self.bytes() < bytes {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "the writer wrote {} of {bytes} bytes in {CONVERGE_TIMEOUT:?}",
                self.bytes()
            );
            std::thread::sleep(POLL);
        }
    }

    /// Fails (with the writer's error) if the writer has stopped.
    pub fn assert_running(&mut self) {
        if self.thread.as_ref().is_some_and(JoinHandle::is_finished) {
            let r = self.thread.take().unwrap().join();
            panic!("the writer stopped early: {:?}", r.map(|r| r.err()));
        }
    }

    /// Lets the writer go on until `bytes` were written in all, then waits for it.
    pub fn finish_at(mut self, bytes: u64) -> (Workload, Client) {
        self.limit_bytes.store(bytes, Ordering::Release);
        self.join()
    }

    /// Stops the writer after its current write and returns its model and connection.
    pub fn stop(mut self) -> (Workload, Client) {
        self.stop.store(true, Ordering::Release);
        self.join()
    }

    fn join(&mut self) -> (Workload, Client) {
        match self.thread.take().unwrap().join() {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => panic!("the writer failed: {e}"),
            Err(_) => panic!("the writer panicked"),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            drop(t.join());
        }
    }
}

/// A network namespace joined to the host by a veth pair on a private /24: the host end is
/// `.1`, the namespace end `.2`. Cutting the link (the namespace end down) partitions a
/// daemon inside from every node outside; the host keeps its own address. Removed on drop.
pub struct Netns {
    pub name: String,
    host_if: String,
    ns_if: String,
    pub host_ip: IpAddr,
    pub ns_ip: IpAddr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

impl Netns {
    /// Creates the namespace and its link; an error says which step failed (no root, no
    /// netns support).
    pub fn create(tag: &str) -> Result<Netns, String> {
        let pid = std::process::id();
        let subnet = 16 + pid % 200;
        let host_ip = Ipv4Addr::new(10, 231, subnet as u8, 1);
        let ns_ip = Ipv4Addr::new(10, 231, subnet as u8, 2);
        let n = Netns {
            name: format!("cairn-{tag}-{pid}"),
            host_if: format!("crh{pid}"),
            ns_if: format!("crn{pid}"),
            host_ip: IpAddr::V4(host_ip),
            ns_ip: IpAddr::V4(ns_ip),
        };
        // Leftovers of an earlier run with the same pid would make the steps below fail.
        drop(ip(&["link", "del", &n.host_if]));
        drop(ip(&["netns", "del", &n.name]));
        ip(&["netns", "add", &n.name])?;
        ip(&[
            "link", "add", &n.host_if, "type", "veth", "peer", "name", &n.ns_if,
        ])?;
        ip(&["link", "set", &n.ns_if, "netns", &n.name])?;
        ip(&["addr", "add", &format!("{host_ip}/24"), "dev", &n.host_if])?;
        ip(&["link", "set", &n.host_if, "up"])?;
        n.exec(&["addr", "add", &format!("{ns_ip}/24"), "dev", &n.ns_if])?;
        n.exec(&["link", "set", &n.ns_if, "up"])?;
        n.exec(&["link", "set", "lo", "up"])?;
        Ok(n)
    }

    /// Runs `ip ARGS` inside the namespace.
    fn exec(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Takes the namespace's end of the link down: nothing inside reaches the host or
    /// anything beyond it, and nothing outside reaches in.
    pub fn cut(&self) {
        self.exec(&["link", "set", &self.ns_if, "down"])
            .expect("link down");
    }

    pub fn heal(&self) {
        self.exec(&["link", "set", &self.ns_if, "up"])
            .expect("link up");
    }

    /// A TCP connection to `addr` made from inside the namespace (on a thread that joins
    /// it), so it never crosses the link [`Netns::cut`] takes down.
    pub fn connect(&self, addr: SocketAddr) -> TcpStream {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let f = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns(2) on an open namespace fd; it changes only this short-lived
            // thread's network namespace, which owns no other sockets.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr} in {path}: {e}"))
        })
        .join()
        .expect("connecting inside the namespace")
    }

    /// An NBD connection to the nexus export of a daemon inside the namespace.
    pub fn nbd(&self, d: &Daemon) -> Client {
        let s = self.connect(d.ready.nbd);
        s.set_nodelay(true).unwrap();
        let s = Stream::Tcp(s);
        s.set_read_timeout(Some(nbd_client::READ_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(nbd_client::READ_TIMEOUT)).unwrap();
        nbd_connect(s, d.config.volume_bytes)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting one end of a veth pair deletes both.
        drop(ip(&["link", "del", &self.host_if]));
        drop(ip(&["netns", "del", &self.name]));
    }
}
