//! Harness for the real-client tests: it starts an NBD server on a private work directory,
//! runs the real tools (qemu-img, qemu-io, nbdinfo, nbdcopy, fio, nbdfuse) against it with a
//! timeout, and tears everything down in `Drop`, so a failed assertion never leaves a daemon,
//! a mount or a loop device behind.
//!
//! The server is `cairn-node` unless `CAIRN_NBD_TARGET` says `qemu-nbd` or `nbdkit`: those
//! serve a plain file, which is how the tests themselves are checked against servers known to
//! be right. Tests ask cairn-testkit for their tools: a missing one skips a test with a printed
//! reason, except under CI (`CI` set), where it fails: CI installs every tool, so a missing one
//! means the gate is not testing.
//!
//! It must never assert on timing: the timeouts here only turn a hang into a failure.

#![allow(dead_code)] // Each test binary uses a different part of the harness.

use std::fmt::Write as _;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// How long a server may take to answer its first handshake before the test fails.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a server may take to exit after SIGTERM before it is killed and the test fails.
const SERVER_STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for one client command; generous because a loaded 2-core CI machine is slow.
pub const COMMAND_TIMEOUT_S: u64 = 600;
/// Unix socket paths longer than this do not fit `sockaddr_un` on Linux (108 with the NUL).
const SOCKET_PATH_MAX: usize = 100;

/// Which server the tests talk to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Target {
    Cairn,
    QemuNbd,
    Nbdkit,
}

impl Target {
    pub fn from_env() -> Target {
        match std::env::var("CAIRN_NBD_TARGET").as_deref() {
            Err(_) | Ok("") | Ok("cairn") | Ok("cairn-node") => Target::Cairn,
            Ok("qemu-nbd") => Target::QemuNbd,
            Ok("nbdkit") => Target::Nbdkit,
            Ok(other) => panic!("CAIRN_NBD_TARGET '{other}': expected cairn, qemu-nbd or nbdkit"),
        }
    }

    /// Granularity at which `base:allocation` reports data: a volume allocates 1 MiB
    /// clusters; a file on ext4 allocates 4 KiB blocks.
    pub fn allocation_granularity_bytes(self) -> u64 {
        match self {
            Target::Cairn => MIB,
            Target::QemuNbd | Target::Nbdkit => 4 * KIB,
        }
    }
}

/// A directory removed on drop.
pub struct WorkDir {
    pub path: PathBuf,
}

impl WorkDir {
    pub fn new(test: &str) -> WorkDir {
        let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("real-clients");
        let path = base.join(format!("{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {path:?}: {e}"));
        WorkDir { path }
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        // Keep the evidence when a test failed.
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// An export the server should offer.
#[derive(Clone, Debug)]
pub enum ExportSpec {
    /// A thin volume in the node's pool (a plain file for the file-serving targets).
    Volume { name: String, size_bytes: u64 },
    /// A RAM bdev (cairn-node only).
    Malloc { name: String, size_bytes: u64 },
}

impl ExportSpec {
    pub fn volume(name: &str, size_bytes: u64) -> ExportSpec {
        ExportSpec::Volume {
            name: name.into(),
            size_bytes,
        }
    }

    pub fn malloc(name: &str, size_bytes: u64) -> ExportSpec {
        ExportSpec::Malloc {
            name: name.into(),
            size_bytes,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            ExportSpec::Volume { name, .. } | ExportSpec::Malloc { name, .. } => name,
        }
    }

    pub fn size_bytes(&self) -> u64 {
        match self {
            ExportSpec::Volume { size_bytes, .. } | ExportSpec::Malloc { size_bytes, .. } => {
                *size_bytes
            }
        }
    }
}

/// A running NBD server. Dropping it kills the server (SIGTERM, then SIGKILL).
pub struct Server {
    pub target: Target,
    child: Option<Child>,
    pub socket: PathBuf,
    pub tcp_port: Option<u16>,
    log: PathBuf,
    pub dir: WorkDir,
}

fn free_port() -> u16 {
    // The kernel hands out a fresh ephemeral port; it does not reuse it at once, so the short
    // window between closing it here and the server binding it is safe in practice.
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

fn socket_path(dir: &WorkDir, test: &str) -> PathBuf {
    let p = dir.join("nbd.sock");
    if p.as_os_str().len() <= SOCKET_PATH_MAX {
        return p;
    }
    std::env::temp_dir().join(format!("cairn-rc-{test}-{}.sock", std::process::id()))
}

impl Server {
    /// Starts the target server with `exports` on a new work directory and waits until it
    /// answers an NBD handshake on its unix socket (and TCP port, when it has one).
    pub fn start(test: &str, exports: &[ExportSpec]) -> Server {
        Server::start_with(test, exports, &[])
    }

    /// [`Server::start`] with `args` added to cairn-node's command line (cairn-node only).
    pub fn start_with(test: &str, exports: &[ExportSpec], args: &[&str]) -> Server {
        let target = Target::from_env();
        let dir = WorkDir::new(test);
        let socket = socket_path(&dir, test);
        let _ = std::fs::remove_file(&socket);
        let log = dir.join("server.log");
        let (cmd, tcp_port) = match target {
            Target::Cairn => {
                let (mut cmd, port) = cairn_command(&dir, &socket, exports);
                cmd.args(args);
                (cmd, port)
            }
            Target::QemuNbd | Target::Nbdkit => file_server_command(target, &dir, &socket, exports),
        };
        let child = spawn_logged(cmd, &log);
        let mut server = Server {
            target,
            child: Some(child),
            socket,
            tcp_port,
            log,
            dir,
        };
        server.wait_ready();
        server
    }

    pub fn is_cairn(&self) -> bool {
        self.target == Target::Cairn
    }

    /// `nbd+unix:///NAME?socket=PATH`, the URI form every tool here accepts.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn tcp_uri(&self, export: &str) -> Option<String> {
        self.tcp_port
            .map(|p| format!("nbd://127.0.0.1:{p}/{export}"))
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "{:?} exited with {status} before answering\n{}",
                    self.target,
                    self.log_tail()
                );
            }
            let unix_ok = UnixStream::connect(&self.socket)
                .map(greets)
                .unwrap_or(false);
            let tcp_ok = self.tcp_port.is_none_or(|p| {
                std::net::TcpStream::connect(("127.0.0.1", p))
                    .map(greets)
                    .unwrap_or(false)
            });
            if unix_ok && tcp_ok && self.announced_ready() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{:?} did not answer within {SERVER_START_TIMEOUT:?}\n{}",
                self.target,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// cairn-node prints "cairn-node ready ..." once its exports are in place; before that a
    /// client may find the listener up and the export missing.
    fn announced_ready(&self) -> bool {
        self.target != Target::Cairn
            || std::fs::read_to_string(&self.log)
                .map(|t| t.lines().any(|l| l.starts_with("cairn-node ready ")))
                .unwrap_or(false)
    }

    /// The last lines the server wrote, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!(
            "--- server log {} (last {} lines) ---\n{}",
            self.log.display(),
            lines.len() - from,
            lines[from..].join("\n")
        )
    }

    /// Sends SIGTERM and returns how the server exited. Every test ends with this so that a
    /// server that cannot drain and exit cleanly fails the test that used it.
    pub fn stop(mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        signal(child.id(), "TERM");
        match wait_timeout(&mut child, SERVER_STOP_TIMEOUT) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{:?} did not exit within {SERVER_STOP_TIMEOUT:?} of SIGTERM\n{}",
                    self.target,
                    self.log_tail()
                )
            }
        }
    }

    /// `stop` and assert the exit status is 0 (the daemon's SIGTERM contract).
    pub fn stop_clean(self) {
        let target = self.target;
        let tail = self.log_tail();
        let status = self.stop();
        assert!(
            status.success(),
            "{target:?} exited with {status} after SIGTERM (expected 0)\n{tail}"
        );
    }

    /// Runs a client command to completion and returns its stdout; panics with the command,
    /// its output and the server's log when it fails or times out.
    pub fn ok(&self, prog: &str, args: &[&str]) -> String {
        let out = run(prog, args);
        if !out.status.success() {
            panic!("{}\n{}", describe(prog, args, &out), self.log_tail());
        }
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        // qemu-io keeps going after a failed command; say which one failed.
        if prog == "qemu-io" {
            let all = format!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
            assert!(
                !all.contains("failed") && !all.contains("error"),
                "{}\n{}",
                describe(prog, args, &out),
                self.log_tail()
            );
        }
        stdout
    }

    /// Runs a client command and returns its raw output, for commands whose failure is an
    /// answer (nbdinfo --can exits 2 for "no").
    pub fn output(&self, prog: &str, args: &[&str]) -> Output {
        run(prog, args)
    }

    /// Starts a client command in the background (output collected by `wait_ok`).
    pub fn spawn(&self, prog: &str, args: &[&str]) -> Background {
        let child = timeout_command(prog, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {prog}: {e}"));
        Background {
            child: Some(child),
            prog: prog.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    pub fn wait_ok(&self, mut bg: Background) -> String {
        let out = bg.child.take().unwrap().wait_with_output().unwrap();
        let args: Vec<&str> = bg.args.iter().map(|s| s.as_str()).collect();
        if !out.status.success() {
            panic!("{}\n{}", describe(&bg.prog, &args, &out), self.log_tail());
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
        signal(child.id(), "TERM");
        if wait_timeout(&mut child, Duration::from_secs(10)).is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A client command running in the background; killed if dropped unwaited.
pub struct Background {
    child: Option<Child>,
    prog: String,
    args: Vec<String>,
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // The child is `timeout`, which leads its own process group; SIGKILL to the group
            // reaches the client itself, which a signal to `timeout` alone would not.
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", c.id())])
                .status();
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Reads the server's first handshake bytes: "NBDMAGIC" then "IHAVEOPT".
fn greets<S: Read>(mut s: S) -> bool {
    let mut b = [0u8; 16];
    s.read_exact(&mut b).is_ok() && &b[..8] == b"NBDMAGIC" && &b[8..] == b"IHAVEOPT"
}

fn cairn_command(dir: &WorkDir, socket: &Path, exports: &[ExportSpec]) -> (Command, Option<u16>) {
    let nbd_port = free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn-node"));
    cmd.arg("--data-dir").arg(dir.join("data"));
    cmd.arg("--nbd-listen").arg(format!("127.0.0.1:{nbd_port}"));
    cmd.arg("--nbd-socket").arg(socket);
    cmd.arg("--admin-listen")
        .arg(format!("127.0.0.1:{}", free_port()));
    cmd.arg("--metrics-listen")
        .arg(format!("127.0.0.1:{}", free_port()));
    cmd.args(["--replica-listen", "127.0.0.1:0"]);
    for e in exports {
        let flag = match e {
            ExportSpec::Volume { .. } => "--volume",
            ExportSpec::Malloc { .. } => "--malloc",
        };
        cmd.arg(flag)
            .arg(format!("{}:{}", e.name(), e.size_bytes()));
    }
    (cmd, Some(nbd_port))
}

/// qemu-nbd or nbdkit serving one preallocated-sparse raw file, to check the tests themselves.
fn file_server_command(
    target: Target,
    dir: &WorkDir,
    socket: &Path,
    exports: &[ExportSpec],
) -> (Command, Option<u16>) {
    assert_eq!(exports.len(), 1, "{target:?} serves one export per process");
    let e = &exports[0];
    let file = dir.join(&format!("{}.img", e.name()));
    let f = std::fs::File::create(&file).unwrap();
    f.set_len(e.size_bytes()).unwrap();
    let mut cmd;
    if target == Target::QemuNbd {
        cmd = Command::new("qemu-nbd");
        cmd.args([
            "-f",
            "raw",
            "-t",
            "-e",
            "16",
            "--cache=none",
            "--aio=io_uring",
        ]);
        cmd.arg("-x").arg(e.name()).arg("-k").arg(socket).arg(&file);
    } else {
        cmd = Command::new("nbdkit");
        cmd.args(["-f", "-U"]).arg(socket).arg("file").arg(&file);
    }
    (cmd, None)
}

fn spawn_logged(mut cmd: Command, log: &Path) -> Child {
    let f = std::fs::File::create(log).unwrap();
    cmd.stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f);
    cmd.spawn()
        .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()))
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `timeout -k 10 LIMIT prog args...`: coreutils turns a hang into exit 124.
fn timeout_command(prog: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "10", &COMMAND_TIMEOUT_S.to_string(), prog]);
    cmd.args(args);
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs a command under the timeout and returns its output.
pub fn run(prog: &str, args: &[&str]) -> Output {
    timeout_command(prog, args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {prog}: {e}"))
}

/// Runs a command that must succeed (setup and teardown: mkfs, mount, losetup).
pub fn run_ok(prog: &str, args: &[&str]) -> String {
    let out = run(prog, args);
    assert!(out.status.success(), "{}", describe(prog, args, &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn describe(prog: &str, args: &[&str], out: &Output) -> String {
    let mut s = String::new();
    let code = out.status.code();
    let _ = write!(s, "command failed: {prog} {}", args.join(" "));
    if code == Some(124) || code == Some(137) {
        let _ = write!(s, "\n  (timed out after {COMMAND_TIMEOUT_S} s)");
    }
    let _ = write!(
        s,
        "\n  status: {}\n  stdout: {}\n  stderr: {}",
        out.status,
        tail(&String::from_utf8_lossy(&out.stdout)),
        tail(&String::from_utf8_lossy(&out.stderr))
    );
    s
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n    ")
}

/// Deterministic pseudo-random bytes (xorshift64*), so a failure reproduces exactly.
pub fn random_bytes(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len as usize);
    while (v.len() as u64) < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    v.truncate(len as usize);
    v
}

/// Panics with the first differing offset when two files differ in size or content.
pub fn assert_same_file(expected: &Path, actual: &Path) {
    let a = std::fs::read(expected).unwrap_or_else(|e| panic!("read {expected:?}: {e}"));
    let b = std::fs::read(actual).unwrap_or_else(|e| panic!("read {actual:?}: {e}"));
    assert_eq!(
        a.len(),
        b.len(),
        "{actual:?} size differs from {expected:?}"
    );
    if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
        panic!(
            "{actual:?} differs from {expected:?} first at offset {i} (0x{i:x}): \
             expected 0x{:02x}, got 0x{:02x}",
            a[i], b[i]
        );
    }
}

/// One extent of `nbdinfo --map`: offset, length and the `base:allocation` flags
/// (bit 0 hole, bit 1 zero).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Extent {
    pub offset_bytes: u64,
    pub length_bytes: u64,
    pub flags: u32,
}

/// Parses `nbdinfo --map` output and merges neighbours with the same flags, so the result
/// does not depend on how the server chose to split its replies.
pub fn parse_map(text: &str) -> Vec<Extent> {
    let mut v: Vec<Extent> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert!(f.len() >= 3, "unexpected nbdinfo --map line: {line:?}");
        let parse = |s: &str| -> u64 {
            s.parse()
                .unwrap_or_else(|_| panic!("bad number in {line:?}"))
        };
        let e = Extent {
            offset_bytes: parse(f[0]),
            length_bytes: parse(f[1]),
            flags: parse(f[2]) as u32,
        };
        push_merged(&mut v, e);
    }
    v
}

fn push_merged(v: &mut Vec<Extent>, e: Extent) {
    if let Some(last) = v.last_mut() {
        assert_eq!(
            last.offset_bytes + last.length_bytes,
            e.offset_bytes,
            "extents are not contiguous: {last:?} then {e:?}"
        );
        if last.flags == e.flags {
            last.length_bytes += e.length_bytes;
            return;
        }
    }
    v.push(e);
}

/// The map a server allocating in `granularity` units must report after `writes` (offset,
/// length) into a fresh, fully unallocated export: touched units are data (flags 0), the
/// rest hole,zero (flags 3).
pub fn expected_map(size_bytes: u64, granularity: u64, writes: &[(u64, u64)]) -> Vec<Extent> {
    let units = size_bytes.div_ceil(granularity);
    let mut data = vec![false; units as usize];
    for &(off, len) in writes {
        for u in off / granularity..(off + len).div_ceil(granularity) {
            data[u as usize] = true;
        }
    }
    let mut v = Vec::new();
    for (u, d) in data.iter().enumerate() {
        let offset_bytes = u as u64 * granularity;
        let e = Extent {
            offset_bytes,
            length_bytes: granularity.min(size_bytes - offset_bytes),
            flags: if *d { 0 } else { 3 },
        };
        push_merged(&mut v, e);
    }
    v
}

/// Unmounts on drop.
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        if run("umount", &[self.0.to_str().unwrap()]).status.success() {
            return;
        }
        let _ = run("umount", &["-l", self.0.to_str().unwrap()]);
    }
}

/// Detaches a loop device on drop.
pub struct LoopGuard(pub String);

impl Drop for LoopGuard {
    fn drop(&mut self) {
        let _ = run("losetup", &["-d", &self.0]);
    }
}

/// An nbdfuse process exposing an export as a file; unmounted and killed on drop.
pub struct FuseGuard {
    pub mountpoint: PathBuf,
    child: Option<Child>,
}

impl FuseGuard {
    /// Starts `nbdfuse MOUNTPOINT/nbd URI` and waits until the file appears.
    pub fn start(mountpoint: &Path, uri: &str, log: &Path) -> FuseGuard {
        std::fs::create_dir_all(mountpoint).unwrap();
        let mut cmd = Command::new("nbdfuse");
        cmd.arg(mountpoint.join("nbd")).arg(uri);
        let child = spawn_logged(cmd, log);
        let mut guard = FuseGuard {
            mountpoint: mountpoint.into(),
            child: Some(child),
        };
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        while !guard.file().is_file() {
            let c = guard.child.as_mut().unwrap();
            if let Some(s) = c.try_wait().unwrap() {
                panic!(
                    "nbdfuse exited with {s}: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "nbdfuse did not mount");
            std::thread::sleep(Duration::from_millis(50));
        }
        guard
    }

    pub fn file(&self) -> PathBuf {
        self.mountpoint.join("nbd")
    }
}

impl Drop for FuseGuard {
    fn drop(&mut self) {
        let _ = run("fusermount3", &["-u", self.mountpoint.to_str().unwrap()]);
        if let Some(mut c) = self.child.take() {
            if wait_timeout(&mut c, Duration::from_secs(10)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
                let _ = run("fusermount3", &["-uz", self.mountpoint.to_str().unwrap()]);
            }
        }
    }
}
