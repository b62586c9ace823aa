//! The CSI node plugin (`cairn-node --csi-endpoint unix:///PATH`): Identity and Node, as
//! kubelet calls them to put a published volume on this machine (docs/csi.md, "Node").
//!
//! NodeStage connects to the volume's NBD export (the `nbdUri` that ControllerPublish
//! answered) one of two ways, chosen per stage by `--csi-nbd` ([`CsiNbd`]) and a probe:
//!
//! * the kernel's NBD device, connected by `nbd-client` (netlink) with 4 KiB blocks, where the
//!   kernel has the `nbd` module and nbd-client is installed;
//! * otherwise `nbdfuse`, which shows the export as one file, and a loop device with 4 KiB
//!   sectors on that file (libnbd refuses requests below the export's block size). Machines
//!   without the `nbd` module (this project's CI among them) still stage.
//!
//! Either way the block device gets a filesystem only when it has none, and is mounted at the
//! staging path; for block access the device itself is the staged device. NodePublish
//! bind-mounts the staging path (or the device, for block access) onto the target path,
//! read-only when asked.
//!
//! What a stage made (the URI, the transport and its device and pid, the loop device's disk
//! sequence number, the boot id, the staging path, the access type) is written to
//! `DATA_DIR/csi/VOLUME/stage.json` before the call answers, so that NodeUnstage after a
//! restart of cairn-node, or after nbdfuse died, still takes everything down. A device or pid
//! recorded in another boot is never touched. nbdfuse runs in its own process group: a signal
//! to cairn-node (Ctrl-C, a restart) does not cut the volume from under a running
//! application; only NodeUnstage does.
//!
//! Every RPC is idempotent: a second stage of the same volume at the same path with the same
//! URI answers OK, an unstage or unpublish of something already gone answers OK. Calls for
//! one volume are serialised; a call that finds another in progress for the same volume gets
//! ABORTED, as the spec asks, and the CO retries. The tools (nbd-client, nbdfuse, losetup,
//! blkid, mkfs, mount, umount, fusermount3, resize2fs, xfs_growfs) run on blocking threads,
//! never on the runtime's.

use cairn_csi::v1;
use cairn_csi::v1::identity_server::{Identity, IdentityServer};
use cairn_csi::v1::node_server::{Node, NodeServer};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::{Code, Request, Response, Status};

/// How long nbdfuse may take to connect and show the export's file.
pub const NBDFUSE_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long nbd-client may take to connect the kernel's NBD device.
pub const NBD_CLIENT_TIMEOUT: Duration = Duration::from_secs(20);
/// The filesystem made when neither the capability nor the volume context names one.
pub const DEFAULT_FS_TYPE: &str = "ext4";
/// The filesystems NodeStage makes and grows.
pub const FS_TYPES: [&str; 2] = ["ext4", "xfs"];
/// The block device's logical sector size (loop device or kernel NBD): the volumes' block
/// size.
const SECTOR_BYTES: &str = "4096";
/// Present when the kernel has its NBD driver (built in or loaded).
const NBD_MODULE_DIR: &str = "/sys/module/nbd";
/// This boot's id: a pid or a device recorded in another boot names something else now.
const BOOT_ID_FILE: &str = "/proc/sys/kernel/random/boot_id";
/// The NBD port when a URI names none (IANA's).
const NBD_DEFAULT_PORT: u16 = 10809;
/// The tool that connects and disconnects the kernel's NBD devices (Debian: nbd-client).
const NBD_CLIENT: &str = "nbd-client";
/// Directories searched for tools besides `PATH` (administration tools live there).
const SBIN_DIRS: [&str; 2] = ["/usr/sbin", "/sbin"];
/// The name of the export's file inside nbdfuse's mount point.
const NBD_FILE: &str = "nbd";

/// A failed step: the gRPC status code and the message the CO sees (a [`Status`] is made only
/// at the RPC's edge).
#[derive(Debug)]
struct Fail {
    code: Code,
    message: String,
}

impl Fail {
    fn new(code: Code, message: impl Into<String>) -> Fail {
        Fail {
            code,
            message: message.into(),
        }
    }
    fn internal(m: impl Into<String>) -> Fail {
        Fail::new(Code::Internal, m)
    }
    fn invalid_argument(m: impl Into<String>) -> Fail {
        Fail::new(Code::InvalidArgument, m)
    }
    fn aborted(m: impl Into<String>) -> Fail {
        Fail::new(Code::Aborted, m)
    }
    fn already_exists(m: impl Into<String>) -> Fail {
        Fail::new(Code::AlreadyExists, m)
    }
    fn failed_precondition(m: impl Into<String>) -> Fail {
        Fail::new(Code::FailedPrecondition, m)
    }
    fn not_found(m: impl Into<String>) -> Fail {
        Fail::new(Code::NotFound, m)
    }
    fn unavailable(m: impl Into<String>) -> Fail {
        Fail::new(Code::Unavailable, m)
    }
}

impl From<Fail> for Status {
    fn from(f: Fail) -> Status {
        Status::new(f.code, f.message)
    }
}

/// How NodeStage connects to a volume (`cairn-node --csi-nbd`, docs/csi.md "Node").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CsiNbd {
    /// The kernel's NBD device where the kernel has one and nbd-client is installed, else
    /// nbdfuse and a loop device.
    #[default]
    Auto,
    /// The kernel's NBD device only: a stage fails with FAILED_PRECONDITION without it.
    Kernel,
    /// nbdfuse and a loop device only.
    Fuse,
}

/// Who this node is to a CO: its id and its zone, as the control process knows it.
#[derive(Clone, Debug)]
pub struct CsiNodeConfig {
    pub node_id: String,
    pub zone: String,
    /// Where stage records live (`DATA_DIR/csi`).
    pub state_dir: PathBuf,
    /// How stages connect to volumes.
    pub nbd: CsiNbd,
}

/// What NodeStage made for one volume: everything NodeUnstage takes down.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Stage {
    uri: String,
    staging_path: PathBuf,
    block: bool,
    fs_type: Option<String>,
    /// The boot the stage was made in (`BOOT_ID_FILE`): the transport's devices and pids are
    /// trusted only in that boot.
    boot_id: String,
    transport: Transport,
}

/// How a stage reaches its volume, and what identifies what it made.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Transport {
    /// The kernel's NBD device, connected by nbd-client; `pid` is what the device's sysfs
    /// `pid` read just after the connect (the connecting process's), which a later connect of
    /// the same device by anyone else changes.
    KernelNbd { device: String, pid: u32 },
    /// nbdfuse shows the export as a file; `loop_device` is attached to it. `diskseq` is the
    /// loop device's disk sequence number just after the attach (sysfs `diskseq`, Linux 5.15
    /// and later; None before): the kernel gives every attach a new one, so in the same boot
    /// it names this attach and no other. It outlives nbdfuse's death, which the backing file
    /// does not: once nbdfuse's mount is gone the backing file reads `/nbd`, and the backing
    /// inode (LOOP_GET_STATUS64) becomes unreadable (ENOTCONN) once FUSE's attribute cache
    /// expires.
    Nbdfuse {
        loop_device: String,
        pid: u32,
        diskseq: Option<u64>,
    },
}

impl Stage {
    /// The block device the filesystem lives on (or that block access publishes).
    fn device(&self) -> &str {
        match &self.transport {
            Transport::KernelNbd { device, .. } => device,
            Transport::Nbdfuse { loop_device, .. } => loop_device,
        }
    }

    /// True when the stage was made in this boot.
    fn this_boot(&self) -> bool {
        !self.boot_id.is_empty() && boot_id() == self.boot_id
    }
}

/// This boot's id, or empty when it cannot be read (then nothing recorded is trusted).
fn boot_id() -> String {
    std::fs::read_to_string(BOOT_ID_FILE)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Which way a stage connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    KernelNbd,
    Nbdfuse,
}

/// What the machine offers the kernel path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct KernelProbe {
    /// The kernel has its NBD driver (`NBD_MODULE_DIR`).
    module: bool,
    /// nbd-client is installed.
    client: bool,
}

impl KernelProbe {
    /// Looks, loading the module first (once per process, quietly) when it is absent and
    /// modprobe exists.
    fn run() -> KernelProbe {
        static MODPROBE: std::sync::Once = std::sync::Once::new();
        if !Path::new(NBD_MODULE_DIR).exists() && on_path("modprobe") {
            MODPROBE.call_once(|| {
                drop(
                    Command::new("modprobe")
                        .args(["-q", "nbd"])
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status(),
                );
            });
        }
        KernelProbe {
            module: Path::new(NBD_MODULE_DIR).exists(),
            client: on_path(NBD_CLIENT),
        }
    }
}

/// The way `mode` and `probe` allow: `auto` takes the kernel's device only when both the
/// module and nbd-client are there; `kernel` without them is FAILED_PRECONDITION naming what is
/// missing.
fn choose_via(mode: CsiNbd, probe: KernelProbe) -> Result<Via, Fail> {
    let kernel = probe.module && probe.client;
    match mode {
        CsiNbd::Fuse => Ok(Via::Nbdfuse),
        CsiNbd::Auto if kernel => Ok(Via::KernelNbd),
        CsiNbd::Auto => Ok(Via::Nbdfuse),
        CsiNbd::Kernel if kernel => Ok(Via::KernelNbd),
        CsiNbd::Kernel => {
            let mut missing = Vec::new();
            if !probe.module {
                missing.push(format!(
                    "the kernel has no nbd module ({NBD_MODULE_DIR} is absent and `modprobe nbd` \
                     did not load it)"
                ));
            }
            if !probe.client {
                missing.push(format!(
                    "{NBD_CLIENT} is not installed (apt-get install nbd-client)"
                ));
            }
            Err(Fail::failed_precondition(format!(
                "--csi-nbd kernel asks for the kernel's NBD device, but {}",
                missing.join(", and ")
            )))
        }
    }
}

/// An NBD URI as a stage accepts it.
#[derive(Clone, Debug, PartialEq, Eq)]
enum NbdTarget {
    /// `nbd://HOST[:PORT]/EXPORT`
    Tcp {
        host: String,
        port: u16,
        export: String,
    },
    /// `nbd+unix:///EXPORT?socket=PATH`
    Unix { socket: PathBuf, export: String },
}

impl NbdTarget {
    /// Parses `uri`; anything else (another scheme, TLS, no export, a query other than the
    /// socket) is INVALID_ARGUMENT naming the URI.
    fn parse(uri: &str) -> Result<NbdTarget, Fail> {
        let bad = |why: &str| Fail::invalid_argument(format!("NBD URI '{uri}' {why}"));
        if let Some(rest) = uri.strip_prefix("nbd://") {
            let (authority, export) = rest
                .split_once('/')
                .ok_or_else(|| bad("names no export (nbd://HOST[:PORT]/EXPORT)"))?;
            if export.is_empty() || export.contains(['?', '#']) {
                return Err(bad("must name an export and nothing after it"));
            }
            let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
                let (h, after) = v6
                    .split_once(']')
                    .ok_or_else(|| bad("has an unclosed IPv6 address"))?;
                (h, after.strip_prefix(':'))
            } else {
                match authority.rsplit_once(':') {
                    Some((h, p)) => (h, Some(p)),
                    None => (authority, None),
                }
            };
            if host.is_empty() {
                return Err(bad("names no host"));
            }
            let port = match port {
                Some(p) => p
                    .parse()
                    .map_err(|_| bad("has a port that is not a number"))?,
                None => NBD_DEFAULT_PORT,
            };
            return Ok(NbdTarget::Tcp {
                host: host.to_string(),
                port,
                export: export.to_string(),
            });
        }
        if let Some(rest) = uri.strip_prefix("nbd+unix:///") {
            let (export, query) = rest
                .split_once('?')
                .ok_or_else(|| bad("names no socket (nbd+unix:///EXPORT?socket=PATH)"))?;
            let socket = query
                .strip_prefix("socket=")
                .filter(|s| s.starts_with('/') && !s.contains(['&', '#']))
                .ok_or_else(|| bad("must have one query, socket=ABSOLUTE_PATH"))?;
            if export.is_empty() {
                return Err(bad("names no export"));
            }
            return Ok(NbdTarget::Unix {
                socket: PathBuf::from(socket),
                export: export.to_string(),
            });
        }
        Err(bad(
            "is not nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH",
        ))
    }

    /// nbd-client's arguments to connect this export with 4 KiB blocks to `device` (or, with
    /// none, to a device the kernel picks).
    fn nbd_client_args(&self, device: Option<&str>) -> Vec<String> {
        let mut args = Vec::new();
        let export = match self {
            NbdTarget::Tcp { export, .. } => export,
            NbdTarget::Unix { export, .. } => {
                args.push("-unix".to_string());
                export
            }
        };
        args.extend(["-N".to_string(), export.clone()]);
        args.extend(["-b".to_string(), SECTOR_BYTES.to_string()]);
        match self {
            NbdTarget::Tcp { host, port, .. } => {
                args.extend([host.clone(), port.to_string()]);
            }
            NbdTarget::Unix { socket, .. } => args.push(socket.to_string_lossy().into_owned()),
        }
        args.extend(device.map(str::to_string));
        args
    }
}

/// The device nbd-client says it connected (`Connected /dev/nbdN`, netlink's answer).
fn connected_device(output: &str) -> Option<String> {
    output.lines().find_map(|l| {
        let dev = l.trim().strip_prefix("Connected ")?;
        let n = dev.strip_prefix("/dev/nbd")?;
        (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then(|| dev.to_string())
    })
}

/// The pid that connected kernel NBD device `device`, or None when it is not connected.
fn nbd_pid(device: &str) -> Option<u32> {
    let pid = std::fs::read_to_string(block_sysfs(device, "nbd")?.join("pid")).ok()?;
    pid.trim().parse().ok()
}

/// The first kernel NBD device that nobody has connected (no sysfs `pid`), if any.
fn free_nbd_device() -> Option<String> {
    let mut free: Vec<u32> = std::fs::read_dir("/sys/block")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let n: u32 = e.file_name().to_str()?.strip_prefix("nbd")?.parse().ok()?;
            (!e.path().join("pid").exists()).then_some(n)
        })
        .collect();
    free.sort_unstable();
    free.into_iter()
        .map(|n| format!("/dev/nbd{n}"))
        .find(|d| Path::new(d).exists())
}

/// Connects the kernel's NBD device to `target` with nbd-client (its output goes to `log`);
/// answers the device and the pid its sysfs records. A connect that fails or does not finish
/// within [`NBD_CLIENT_TIMEOUT`] is UNAVAILABLE.
fn connect_kernel_nbd(target: &NbdTarget, uri: &str, log: &Path) -> Result<(String, u32), Fail> {
    let asked = free_nbd_device();
    let args = target.nbd_client_args(asked.as_deref());
    let log_file = std::fs::File::create(log)
        .map_err(|e| Fail::internal(format!("creating {}: {e}", log.display())))?;
    let err_file = log_file
        .try_clone()
        .map_err(|e| Fail::internal(format!("{}: {e}", log.display())))?;
    let mut child = Command::new(NBD_CLIENT)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(err_file)
        .spawn()
        .map_err(|e| {
            Fail::internal(format!(
                "running {NBD_CLIENT}: {e} (is nbd-client installed?)"
            ))
        })?;
    let deadline = Instant::now() + NBD_CLIENT_TIMEOUT;
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if Instant::now() > deadline {
            drop(child.kill());
            drop(child.wait());
            // It may have connected the device just before it was killed.
            if let Some(d) = asked.as_deref().filter(|d| nbd_pid(d).is_some()) {
                drop(run(NBD_CLIENT, &["-d", d]));
            }
            return Err(Fail::unavailable(format!(
                "{NBD_CLIENT} {} did not connect {uri} within {NBD_CLIENT_TIMEOUT:?}",
                args.join(" ")
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(log).unwrap_or_default();
    if !status.success() {
        return Err(Fail::unavailable(format!(
            "{NBD_CLIENT} {} could not connect {uri} ({status}): {}",
            args.join(" "),
            output.trim()
        )));
    }
    let device = connected_device(&output).or(asked).ok_or_else(|| {
        Fail::internal(format!(
            "{NBD_CLIENT} connected {uri} but did not say which device: {}",
            output.trim()
        ))
    })?;
    let pid = nbd_pid(&device).ok_or_else(|| {
        Fail::internal(format!(
            "{NBD_CLIENT} connected {uri} to {device}, which shows no connection in sysfs"
        ))
    })?;
    Ok((device, pid))
}

/// True when `tool` is on `PATH` or in an sbin directory.
fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .any(|dir| dir.join(tool).is_file())
}

/// The Identity and Node services of this node.
#[derive(Clone)]
pub struct CsiNode {
    config: Arc<CsiNodeConfig>,
    /// Volumes with a call in progress.
    busy: Arc<Mutex<HashSet<String>>>,
    /// The nbdfuse children this process started, reaped at unstage (a child left running is
    /// not a zombie until it exits; one started by an earlier process is found by its pid).
    children: Arc<Mutex<HashMap<String, Child>>>,
}

/// Holds a volume's place in [`CsiNode::busy`] for one call.
struct Busy {
    set: Arc<Mutex<HashSet<String>>>,
    volume: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.set.lock().expect("busy set").remove(&self.volume);
    }
}

impl CsiNode {
    pub fn new(config: CsiNodeConfig) -> CsiNode {
        CsiNode {
            config: Arc::new(config),
            busy: Arc::default(),
            children: Arc::default(),
        }
    }

    /// The Identity and Node gRPC services.
    pub fn into_services(self) -> (IdentityServer<CsiNode>, NodeServer<CsiNode>) {
        (IdentityServer::new(self.clone()), NodeServer::new(self))
    }

    fn claim(&self, volume: &str) -> Result<Busy, Fail> {
        if !self
            .busy
            .lock()
            .expect("busy set")
            .insert(volume.to_string())
        {
            return Err(Fail::aborted(format!(
                "an operation on volume '{volume}' is in progress; retry"
            )));
        }
        Ok(Busy {
            set: self.busy.clone(),
            volume: volume.to_string(),
        })
    }

    fn volume_dir(&self, volume: &str) -> PathBuf {
        self.config.state_dir.join(volume)
    }

    fn read_stage(&self, volume: &str) -> Result<Option<Stage>, Fail> {
        let path = self.volume_dir(volume).join("stage.json");
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| {
                Fail::internal(format!(
                    "stage record {} is unreadable: {e}",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Fail::internal(format!("reading {}: {e}", path.display()))),
        }
    }

    fn write_stage(&self, volume: &str, stage: &Stage) -> Result<(), Fail> {
        let dir = self.volume_dir(volume);
        let tmp = dir.join("stage.json.tmp");
        let body = serde_json::to_vec_pretty(stage).expect("a stage record serializes");
        std::fs::write(&tmp, body)
            .and_then(|()| std::fs::rename(&tmp, dir.join("stage.json")))
            .map_err(|e| {
                Fail::internal(format!(
                    "writing the stage record in {}: {e}",
                    dir.display()
                ))
            })
    }

    /// Stages `volume` (on a blocking thread).
    fn stage(
        &self,
        volume: &str,
        uri: &str,
        target: &NbdTarget,
        staging: &Path,
        access: &Access,
    ) -> Result<(), Fail> {
        if let Some(s) = self.read_stage(volume)? {
            if s.staging_path != staging {
                return Err(Fail::already_exists(format!(
                    "volume '{volume}' is staged at {}, not {}",
                    s.staging_path.display(),
                    staging.display()
                )));
            }
            if s.uri == uri && s.block == access.block() && self.stage_alive(volume, &s) {
                return Ok(());
            }
            // A pod's bind mount of the old filesystem would go on using a dead device while
            // the new stage mounts a second copy: the CO must unpublish first.
            if let Some(target) = published_elsewhere(&s) {
                return Err(Fail::failed_precondition(format!(
                    "volume '{volume}' is to be staged again (from {uri}) but its old stage is \
                     still published at {target}; unpublish it first"
                )));
            }
            // Staged from another attach point (the volume failed over and came back), or
            // half taken down: taken down, then staged afresh.
            tracing::info!(volume, old = %s.uri, new = %uri, "restaging");
            self.unstage_all(volume, &s)?;
        }
        path_str(staging)?;
        let via = match self.config.nbd {
            CsiNbd::Fuse => Via::Nbdfuse,
            mode => choose_via(mode, KernelProbe::run())?,
        };
        let dir = self.volume_dir(volume);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Fail::internal(format!("creating {}: {e}", dir.display())))?;
        let transport = match via {
            Via::KernelNbd => {
                let (device, pid) = connect_kernel_nbd(target, uri, &dir.join("nbd-client.log"))
                    .inspect_err(|_| drop(std::fs::remove_dir_all(&dir)))?;
                Transport::KernelNbd { device, pid }
            }
            Via::Nbdfuse => {
                let fuse = dir.join("fuse");
                std::fs::create_dir_all(&fuse)
                    .map_err(|e| Fail::internal(format!("creating {}: {e}", fuse.display())))?;
                let child = start_nbdfuse(&fuse, uri, &dir.join("nbdfuse.log"))?;
                let pid = child.id();
                self.children
                    .lock()
                    .expect("children")
                    .insert(volume.to_string(), child);
                Transport::Nbdfuse {
                    loop_device: String::new(),
                    pid,
                    diskseq: None,
                }
            }
        };
        let mut stage = Stage {
            uri: uri.to_string(),
            staging_path: staging.to_path_buf(),
            block: access.block(),
            fs_type: None,
            boot_id: boot_id(),
            transport,
        };
        // A failure from here on takes down what was made: the CO treats these errors as
        // final and would never unstage, leaving the device and its connection behind.
        let made = self
            .attach_loop(volume, &mut stage)
            .and_then(|()| self.finish_stage(volume, &mut stage, staging, access));
        if let Err(e) = made {
            if let Err(cleanup) = self.unstage_all(volume, &stage) {
                tracing::error!(volume, error = %cleanup.message, "taking down a failed stage");
            }
            return Err(e);
        }
        tracing::info!(volume, uri, device = %stage.device(), staging = %staging.display(), "staged");
        Ok(())
    }

    /// For nbdfuse, attaches the loop device to its file and records its disk sequence
    /// number; nothing for the kernel's device.
    fn attach_loop(&self, volume: &str, stage: &mut Stage) -> Result<(), Fail> {
        let Transport::Nbdfuse {
            loop_device,
            diskseq,
            ..
        } = &mut stage.transport
        else {
            return Ok(());
        };
        let file = self.nbd_file(volume);
        let out = run(
            "losetup",
            &["-f", "--show", "-b", SECTOR_BYTES, path_str(&file)?],
        )?;
        *loop_device = out.trim().to_string();
        let backing = loop_backing_file(loop_device);
        if backing.as_deref().map(Path::new) != Some(file.as_path()) {
            return Err(Fail::internal(format!(
                "loop device {loop_device} was attached to {} but is backed by {backing:?}",
                file.display()
            )));
        }
        *diskseq = loop_diskseq(loop_device);
        Ok(())
    }

    /// The part of a stage after its block device exists: the record, then the filesystem
    /// and its mount.
    fn finish_stage(
        &self,
        volume: &str,
        stage: &mut Stage,
        staging: &Path,
        access: &Access,
    ) -> Result<(), Fail> {
        // Recorded before anything is mounted: an unstage after a crash here finds the device.
        self.write_stage(volume, stage)?;
        if let Access::Mount { fs_type, flags } = access {
            let device = stage.device().to_string();
            let made = existing_fs(&device)?;
            let fs = match made {
                Some(f) => {
                    if f != *fs_type {
                        tracing::warn!(volume, found = %f, asked = %fs_type, "the volume already holds a filesystem of another type; mounting what is there");
                    }
                    f
                }
                None => {
                    make_fs(fs_type, &device)?;
                    fs_type.clone()
                }
            };
            std::fs::create_dir_all(staging)
                .map_err(|e| Fail::internal(format!("creating {}: {e}", staging.display())))?;
            let mut args = vec!["-t", fs.as_str()];
            let opts = flags.join(",");
            if !opts.is_empty() {
                args.extend(["-o", opts.as_str()]);
            }
            args.extend([device.as_str(), path_str(staging)?]);
            run("mount", &args)?;
            stage.fs_type = Some(fs);
            self.write_stage(volume, stage)?;
        }
        Ok(())
    }

    /// This volume's nbdfuse file.
    fn nbd_file(&self, volume: &str) -> PathBuf {
        self.volume_dir(volume).join("fuse").join(NBD_FILE)
    }

    /// True when everything the stage made is still there and still this volume's, in this
    /// boot: the kernel device is connected by the connect recorded, or the loop device backs
    /// this volume's nbdfuse file and the pid is its nbdfuse.
    fn stage_alive(&self, volume: &str, s: &Stage) -> bool {
        if !s.this_boot() || !(s.block || is_mountpoint(&s.staging_path)) {
            return false;
        }
        match &s.transport {
            Transport::KernelNbd { device, pid } => nbd_pid(device) == Some(*pid),
            Transport::Nbdfuse {
                loop_device, pid, ..
            } => {
                let file = self.nbd_file(volume);
                loop_backing_file(loop_device).is_some_and(|b| Path::new(&b) == file)
                    && is_nbdfuse_of(*pid, &file)
            }
        }
    }

    /// Takes down everything `stage` made, in reverse, and forgets it. Devices and pids are
    /// touched only when they are still this stage's (see [`loop_is_ours`]; a kernel device
    /// only when its sysfs pid is the one recorded, in this boot).
    fn unstage_all(&self, volume: &str, stage: &Stage) -> Result<(), Fail> {
        if !stage.block && is_mountpoint(&stage.staging_path) {
            umount(&stage.staging_path)?;
        }
        let this_boot = stage.this_boot();
        match &stage.transport {
            Transport::KernelNbd { device, pid } => {
                if this_boot && nbd_pid(device) == Some(*pid) {
                    run(NBD_CLIENT, &["-d", device])?;
                }
            }
            Transport::Nbdfuse {
                loop_device,
                pid,
                diskseq,
            } => {
                let file = self.nbd_file(volume);
                if loop_is_ours(loop_device, &file, *diskseq, this_boot) {
                    run("losetup", &["-d", loop_device])?;
                }
                let child = self.children.lock().expect("children").remove(volume);
                stop_nbdfuse(&file, this_boot.then_some(*pid));
                if let Some(mut c) = child {
                    drop(c.wait());
                }
            }
        }
        let dir = self.volume_dir(volume);
        std::fs::remove_dir_all(&dir)
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| Fail::internal(format!("removing {}: {e}", dir.display())))?;
        tracing::info!(volume, "unstaged");
        Ok(())
    }
}

/// The access type a capability asks for.
#[derive(Clone, Debug)]
enum Access {
    Block,
    Mount { fs_type: String, flags: Vec<String> },
}

impl Access {
    fn block(&self) -> bool {
        matches!(self, Access::Block)
    }

    /// From a request's capability (required) and volume context (its `fsType`).
    fn of(
        cap: Option<&v1::VolumeCapability>,
        context: &HashMap<String, String>,
    ) -> Result<Access, Fail> {
        let cap = cap.ok_or_else(|| Fail::invalid_argument("volume_capability is required"))?;
        check_access_mode(cap)?;
        match &cap.access_type {
            Some(v1::volume_capability::AccessType::Block(_)) => Ok(Access::Block),
            Some(v1::volume_capability::AccessType::Mount(m)) => {
                let fs_type = if !m.fs_type.is_empty() {
                    m.fs_type.clone()
                } else {
                    context
                        .get(cairn_csi::PARAM_FS_TYPE)
                        .cloned()
                        .unwrap_or_else(|| DEFAULT_FS_TYPE.to_string())
                };
                if !FS_TYPES.contains(&fs_type.as_str()) {
                    return Err(Fail::invalid_argument(format!(
                        "fs_type '{fs_type}' is not supported (one of {})",
                        FS_TYPES.join(", ")
                    )));
                }
                if let Some(bad) = m.mount_flags.iter().find(|f| !safe_mount_flag(f)) {
                    return Err(Fail::invalid_argument(format!(
                        "mount flag '{bad}' is not allowed (letters, digits and ._=-/ only)"
                    )));
                }
                Ok(Access::Mount {
                    fs_type,
                    flags: m.mount_flags.clone(),
                })
            }
            None => Err(Fail::invalid_argument(
                "volume_capability has neither block nor mount access",
            )),
        }
    }
}

fn safe_mount_flag(f: &str) -> bool {
    !f.is_empty()
        && f.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._=-/".contains(c))
}

/// A volume is written by one node at a time (the nexus is single-writer): only single-node
/// modes are served.
fn check_access_mode(cap: &v1::VolumeCapability) -> Result<(), Fail> {
    use v1::volume_capability::access_mode::Mode;
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| m.mode())
        .ok_or_else(|| Fail::invalid_argument("volume_capability.access_mode is required"))?;
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => Ok(()),
        other => Err(Fail::invalid_argument(format!(
            "access mode {} is not supported: a Cairn volume is served on one node",
            other.as_str_name()
        ))),
    }
}

/// A volume id names a directory here: it must be a Cairn name.
fn check_volume_id(volume: &str) -> Result<(), Fail> {
    if volume.is_empty() {
        return Err(Fail::invalid_argument("volume_id is required"));
    }
    cairn_control_api::check_name("volume id", volume)
        .map_err(|e| Fail::invalid_argument(e.to_string()))
}

fn required_path(what: &str, p: &str) -> Result<PathBuf, Fail> {
    if p.is_empty() {
        return Err(Fail::invalid_argument(format!("{what} is required")));
    }
    let path = PathBuf::from(p);
    if !path.is_absolute() {
        return Err(Fail::invalid_argument(format!(
            "{what} '{p}' is not an absolute path"
        )));
    }
    Ok(path)
}

fn path_str(p: &Path) -> Result<&str, Fail> {
    p.to_str()
        .ok_or_else(|| Fail::invalid_argument(format!("path {} is not UTF-8", p.display())))
}

/// Runs `tool args`; its stdout, or INTERNAL naming the tool, the arguments and its stderr.
fn run(tool: &str, args: &[&str]) -> Result<String, Fail> {
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Fail::internal(format!("running {tool}: {e} (is it installed?)")))?;
    if !out.status.success() {
        return Err(Fail::internal(format!(
            "{tool} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Starts `nbdfuse FUSE/nbd URI` in its own process group and waits for the file.
fn start_nbdfuse(fuse: &Path, uri: &str, log: &Path) -> Result<Child, Fail> {
    use std::os::unix::process::CommandExt;
    let log_file = std::fs::File::create(log)
        .map_err(|e| Fail::internal(format!("creating {}: {e}", log.display())))?;
    let err_file = log_file
        .try_clone()
        .map_err(|e| Fail::internal(format!("{}: {e}", log.display())))?;
    let file = fuse.join(NBD_FILE);
    let mut child = Command::new("nbdfuse")
        .arg(&file)
        .arg(uri)
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(err_file)
        .process_group(0)
        .spawn()
        .map_err(|e| Fail::internal(format!("running nbdfuse: {e} (is libnbd-bin installed?)")))?;
    let deadline = Instant::now() + NBDFUSE_START_TIMEOUT;
    while !file.is_file() {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(Fail::unavailable(format!(
                "nbdfuse {uri} exited ({status}): {}",
                std::fs::read_to_string(log).unwrap_or_default().trim()
            )));
        }
        if Instant::now() > deadline {
            drop(child.kill());
            drop(child.wait());
            drop(run("fusermount3", &["-uz", &fuse.to_string_lossy()]));
            return Err(Fail::unavailable(format!(
                "nbdfuse {uri} did not connect within {NBDFUSE_START_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

/// Unmounts nbdfuse's mount point (nbdfuse then exits) and kills the process `pid` (None: a
/// pid from another boot) if it is still the nbdfuse of `file` (never a process that merely
/// reuses the pid).
fn stop_nbdfuse(file: &Path, pid: Option<u32>) {
    if let Some(fuse) = file.parent().filter(|f| is_mountpoint(f)) {
        let f = fuse.to_string_lossy();
        if run("fusermount3", &["-u", &f]).is_err() {
            drop(run("fusermount3", &["-uz", &f]));
        }
    }
    if let Some(pid) = pid.filter(|p| is_nbdfuse_of(*p, file)) {
        // SAFETY: kill(2) with a pid checked just above to be the nbdfuse of this volume; no
        // memory is involved.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
}

/// True when process `pid` is `nbdfuse FILE …`.
fn is_nbdfuse_of(pid: u32, file: &Path) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut args = cmdline.split(|b| *b == 0);
    args.next() == Some(b"nbdfuse".as_slice())
        && args.next() == Some(file.as_os_str().as_encoded_bytes())
}

/// The sysfs directory of block device `device` (`/dev/NAME`) when its name starts with
/// `kind` (`loop`, `nbd`).
fn block_sysfs(device: &str, kind: &str) -> Option<PathBuf> {
    let name = device.strip_prefix("/dev/")?;
    (name.starts_with(kind) && !name.contains('/')).then(|| Path::new("/sys/block").join(name))
}

/// The backing file of loop device `device` as the kernel shows it (sysfs
/// `loop/backing_file`), or None when it is not an attached loop device.
fn loop_backing_file(device: &str) -> Option<String> {
    let f = std::fs::read_to_string(block_sysfs(device, "loop")?.join("loop/backing_file")).ok()?;
    Some(f.trim_end_matches('\n').to_string())
}

/// The disk sequence number of loop device `device` (sysfs `diskseq`).
fn loop_diskseq(device: &str) -> Option<u64> {
    let seq = std::fs::read_to_string(block_sysfs(device, "loop")?.join("diskseq")).ok()?;
    seq.trim().parse().ok()
}

/// True when loop device `device` is this stage's: its backing file is this volume's nbdfuse
/// `file`, or (in the boot that recorded it) its disk sequence number is the one `recorded`
/// at the attach, whatever its backing file now reads (nbdfuse died). Never true for another
/// attach, this volume's or another's.
fn loop_is_ours(device: &str, file: &Path, recorded: Option<u64>, this_boot: bool) -> bool {
    let Some(backing) = loop_backing_file(device) else {
        return false;
    };
    Path::new(&backing) == file
        || (this_boot && recorded.is_some() && loop_diskseq(device) == recorded)
}

/// A mount point other than the staging path whose source is the stage's loop device (a
/// publish of its filesystem), if any.
fn published_elsewhere(s: &Stage) -> Option<String> {
    if s.block || s.device().is_empty() {
        return None;
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let staging = s.staging_path.to_string_lossy();
    info.lines().find_map(|l| {
        let point = unescape_mountinfo(l.split(' ').nth(4)?);
        let source = l.split(" - ").nth(1)?.split(' ').nth(1)?;
        (source == s.device() && point != staging).then_some(point)
    })
}

/// The filesystem type on `device`, or None when it holds none.
fn existing_fs(device: &str) -> Result<Option<String>, Fail> {
    let out = Command::new("blkid")
        .args(["-p", "-s", "TYPE", "-o", "value", device])
        .output()
        .map_err(|e| Fail::internal(format!("running blkid: {e}")))?;
    match out.status.code() {
        Some(0) => Ok(Some(
            String::from_utf8_lossy(&out.stdout).trim().to_string(),
        )),
        // blkid: 2 = nothing found, unless it says why it could not look.
        Some(2) if out.stderr.iter().all(u8::is_ascii_whitespace) => Ok(None),
        _ => Err(Fail::internal(format!(
            "blkid -p {device} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

fn make_fs(fs_type: &str, device: &str) -> Result<(), Fail> {
    match fs_type {
        "ext4" => run("mkfs.ext4", &["-q", "-F", "-b", "4096", device]).map(drop),
        "xfs" => run("mkfs.xfs", &["-q", device]).map(drop),
        other => Err(Fail::invalid_argument(format!(
            "fs_type '{other}' is not supported"
        ))),
    }
}

/// True when `path` is a mount point (listed in /proc/self/mountinfo).
fn is_mountpoint(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| unescape_mountinfo(m) == want)
}

/// The mountinfo line of mount point `path`, if it is one.
fn mountinfo_line(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = path.to_string_lossy();
    info.lines()
        .rev()
        .find(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|m| unescape_mountinfo(m) == want)
        })
        .map(str::to_string)
}

/// The source (device) of mount point `path`.
fn mount_source(path: &Path) -> Option<String> {
    let l = mountinfo_line(path)?;
    Some(l.split(" - ").nth(1)?.split(' ').nth(1)?.to_string())
}

/// Whether mount point `path` is mounted read-only (its per-mount options).
fn mount_is_readonly(path: &Path) -> Option<bool> {
    let l = mountinfo_line(path)?;
    let opts = l.split(' ').nth(5)?;
    Some(opts.split(',').any(|o| o == "ro"))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

fn umount(path: &Path) -> Result<(), Fail> {
    run("umount", &[path_str(path)?]).map(drop)
}

/// The size of block device `device` in bytes.
fn device_bytes(device: &str) -> Result<u64, Fail> {
    run("blockdev", &["--getsize64", device])?
        .trim()
        .parse()
        .map_err(|e| Fail::internal(format!("blockdev --getsize64 {device}: {e}")))
}

/// Runs `f` on a blocking thread; a panic there is INTERNAL.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Fail> + Send + 'static,
) -> Result<T, Status> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(Status::from),
        Err(e) => Err(Status::internal(format!("the call's thread failed: {e}"))),
    }
}

#[tonic::async_trait]
impl Identity for CsiNode {
    async fn get_plugin_info(
        &self,
        _: Request<v1::GetPluginInfoRequest>,
    ) -> Result<Response<v1::GetPluginInfoResponse>, Status> {
        Ok(Response::new(v1::GetPluginInfoResponse {
            name: cairn_csi::DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<v1::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<v1::GetPluginCapabilitiesResponse>, Status> {
        use v1::plugin_capability::{service, Service, Type};
        Ok(Response::new(v1::GetPluginCapabilitiesResponse {
            capabilities: vec![v1::PluginCapability {
                r#type: Some(Type::Service(Service {
                    r#type: service::Type::VolumeAccessibilityConstraints as i32,
                })),
            }],
        }))
    }

    async fn probe(
        &self,
        _: Request<v1::ProbeRequest>,
    ) -> Result<Response<v1::ProbeResponse>, Status> {
        Ok(Response::new(v1::ProbeResponse { ready: Some(true) }))
    }
}

#[tonic::async_trait]
impl Node for CsiNode {
    async fn node_stage_volume(
        &self,
        request: Request<v1::NodeStageVolumeRequest>,
    ) -> Result<Response<v1::NodeStageVolumeResponse>, Status> {
        let r = request.into_inner();
        check_volume_id(&r.volume_id)?;
        let staging = required_path("staging_target_path", &r.staging_target_path)?;
        let access = Access::of(r.volume_capability.as_ref(), &r.volume_context)?;
        let uri = r
            .publish_context
            .get(cairn_csi::PUBLISH_CONTEXT_NBD_URI)
            .cloned()
            .ok_or_else(|| {
                Fail::invalid_argument(format!(
                    "publish_context.{} (the NBD URI ControllerPublishVolume answers) is required",
                    cairn_csi::PUBLISH_CONTEXT_NBD_URI
                ))
            })?;
        let target = NbdTarget::parse(&uri)?;
        let busy = self.claim(&r.volume_id)?;
        let me = self.clone();
        blocking(move || {
            let _busy = busy;
            me.stage(&r.volume_id, &uri, &target, &staging, &access)
        })
        .await?;
        Ok(Response::new(v1::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<v1::NodeUnstageVolumeRequest>,
    ) -> Result<Response<v1::NodeUnstageVolumeResponse>, Status> {
        let r = request.into_inner();
        check_volume_id(&r.volume_id)?;
        let staging = required_path("staging_target_path", &r.staging_target_path)?;
        let busy = self.claim(&r.volume_id)?;
        let me = self.clone();
        blocking(move || {
            let _busy = busy;
            match me.read_stage(&r.volume_id)? {
                Some(s) if s.staging_path == staging => me.unstage_all(&r.volume_id, &s),
                Some(s) => Err(Fail::failed_precondition(format!(
                    "volume '{}' is staged at {}, not {}",
                    r.volume_id,
                    s.staging_path.display(),
                    staging.display()
                ))),
                None => Ok(()),
            }
        })
        .await?;
        Ok(Response::new(v1::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<v1::NodePublishVolumeRequest>,
    ) -> Result<Response<v1::NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        check_volume_id(&r.volume_id)?;
        let target = required_path("target_path", &r.target_path)?;
        let staging = required_path("staging_target_path", &r.staging_target_path)?;
        let access = Access::of(r.volume_capability.as_ref(), &r.volume_context)?;
        let busy = self.claim(&r.volume_id)?;
        let me = self.clone();
        blocking(move || {
            let _busy = busy;
            let s = me.read_stage(&r.volume_id)?.ok_or_else(|| {
                Fail::failed_precondition(format!(
                    "volume '{}' is not staged on this node",
                    r.volume_id
                ))
            })?;
            if s.staging_path != staging || s.block != access.block() {
                return Err(Fail::failed_precondition(format!(
                    "volume '{}' is staged at {} for {} access, not at {} for {}",
                    r.volume_id,
                    s.staging_path.display(),
                    if s.block { "block" } else { "mount" },
                    staging.display(),
                    if access.block() { "block" } else { "mount" }
                )));
            }
            if is_mountpoint(&target) {
                if !s.block && mount_source(&target).as_deref() != Some(s.device()) {
                    return Err(Fail::already_exists(format!(
                        "{} is a mount point of something other than volume '{}'",
                        target.display(),
                        r.volume_id
                    )));
                }
                if mount_is_readonly(&target) != Some(r.readonly) {
                    return Err(Fail::already_exists(format!(
                        "volume '{}' is published at {} {}",
                        r.volume_id,
                        target.display(),
                        if r.readonly { "read-write" } else { "read-only" }
                    )));
                }
                return Ok(());
            }
            let source = if s.block {
                // The target is a file the device is bound onto.
                if let Some(dir) = target.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| {
                        Fail::internal(format!("creating {}: {e}", dir.display()))
                    })?;
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&target)
                    .map_err(|e| Fail::internal(format!("creating {}: {e}", target.display())))?;
                s.device().to_string()
            } else {
                std::fs::create_dir_all(&target).map_err(|e| {
                    Fail::internal(format!("creating {}: {e}", target.display()))
                })?;
                path_str(&s.staging_path)?.to_string()
            };
            run("mount", &["--bind", &source, path_str(&target)?])?;
            if r.readonly {
                if let Err(e) = run("mount", &["-o", "remount,bind,ro", path_str(&target)?]) {
                    // Never left read-write where read-only was asked for.
                    drop(umount(&target));
                    return Err(e);
                }
            }
            tracing::info!(volume = %r.volume_id, target = %target.display(), readonly = r.readonly, "published");
            Ok(())
        })
        .await?;
        Ok(Response::new(v1::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<v1::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<v1::NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        check_volume_id(&r.volume_id)?;
        let target = required_path("target_path", &r.target_path)?;
        let busy = self.claim(&r.volume_id)?;
        blocking(move || {
            let _busy = busy;
            if is_mountpoint(&target) {
                umount(&target)?;
            }
            let gone = if target.is_dir() {
                std::fs::remove_dir(&target)
            } else {
                std::fs::remove_file(&target)
            };
            match gone {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Fail::internal(format!(
                    "removing {}: {e}",
                    target.display()
                ))),
                _ => Ok(()),
            }
        })
        .await?;
        Ok(Response::new(v1::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<v1::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<v1::NodeGetVolumeStatsResponse>, Status> {
        let r = request.into_inner();
        check_volume_id(&r.volume_id)?;
        let path = required_path("volume_path", &r.volume_path)?;
        let me = self.clone();
        let usage = blocking(move || {
            let s = me.read_stage(&r.volume_id)?.ok_or_else(|| {
                Fail::not_found(format!(
                    "volume '{}' is not staged on this node",
                    r.volume_id
                ))
            })?;
            if !path.exists() {
                return Err(Fail::not_found(format!(
                    "volume path {} does not exist",
                    path.display()
                )));
            }
            if s.block {
                let total = device_bytes(s.device())?;
                return Ok(vec![usage(v1::volume_usage::Unit::Bytes, total, total, 0)]);
            }
            let st = statvfs(&path)?;
            let frsize = st.f_frsize;
            Ok(vec![
                usage(
                    v1::volume_usage::Unit::Bytes,
                    st.f_blocks * frsize,
                    st.f_bavail * frsize,
                    (st.f_blocks - st.f_bfree) * frsize,
                ),
                usage(
                    v1::volume_usage::Unit::Inodes,
                    st.f_files,
                    st.f_favail,
                    st.f_files - st.f_ffree,
                ),
            ])
        })
        .await?;
        Ok(Response::new(v1::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: None,
        }))
    }

    async fn node_expand_volume(
        &self,
        request: Request<v1::NodeExpandVolumeRequest>,
    ) -> Result<Response<v1::NodeExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        check_volume_id(&r.volume_id)?;
        required_path("volume_path", &r.volume_path)?;
        let busy = self.claim(&r.volume_id)?;
        let me = self.clone();
        let bytes = blocking(move || {
            let _busy = busy;
            let s = me.read_stage(&r.volume_id)?.ok_or_else(|| {
                Fail::not_found(format!(
                    "volume '{}' is not staged on this node",
                    r.volume_id
                ))
            })?;
            // The device has the size negotiated at stage (an expand is offline, so a stage
            // after it already has the grown size): the loop device learns its file's size
            // (nbdfuse shows the export's size as negotiated); the kernel's NBD device took
            // it at connect and cannot renegotiate while connected.
            if let Transport::Nbdfuse { loop_device, .. } = &s.transport {
                run("losetup", &["-c", loop_device])?;
            }
            match s.fs_type.as_deref() {
                Some("ext4") => run("resize2fs", &[s.device()]).map(drop)?,
                Some("xfs") => run("xfs_growfs", &[path_str(&s.staging_path)?]).map(drop)?,
                _ => {}
            }
            device_bytes(s.device())
        })
        .await?;
        Ok(Response::new(v1::NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<v1::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<v1::NodeGetCapabilitiesResponse>, Status> {
        use v1::node_service_capability::{rpc, Rpc, Type};
        let cap = |t: rpc::Type| v1::NodeServiceCapability {
            r#type: Some(Type::Rpc(Rpc { r#type: t as i32 })),
        };
        Ok(Response::new(v1::NodeGetCapabilitiesResponse {
            capabilities: vec![
                cap(rpc::Type::StageUnstageVolume),
                cap(rpc::Type::GetVolumeStats),
                cap(rpc::Type::ExpandVolume),
            ],
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<v1::NodeGetInfoRequest>,
    ) -> Result<Response<v1::NodeGetInfoResponse>, Status> {
        Ok(Response::new(v1::NodeGetInfoResponse {
            node_id: self.config.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(v1::Topology {
                segments: HashMap::from([
                    (
                        cairn_csi::TOPOLOGY_ZONE_KEY.into(),
                        self.config.zone.clone(),
                    ),
                    (
                        cairn_csi::TOPOLOGY_NODE_KEY.into(),
                        self.config.node_id.clone(),
                    ),
                ]),
            }),
        }))
    }
}

fn usage(unit: v1::volume_usage::Unit, total: u64, available: u64, used: u64) -> v1::VolumeUsage {
    let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    v1::VolumeUsage {
        available: i(available),
        total: i(total),
        used: i(used),
        unit: unit as i32,
    }
}

fn statvfs(path: &Path) -> Result<libc::statvfs, Fail> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Fail::invalid_argument(format!("{} holds a NUL", path.display())))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` a buffer of the right type, which
    // statvfs(3) fills when it returns 0.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    if rc != 0 {
        return Err(Fail::internal(format!(
            "statvfs {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: statvfs returned 0, so it filled `st`.
    Ok(unsafe { st.assume_init() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cap(access: v1::volume_capability::AccessType, mode: i32) -> v1::VolumeCapability {
        v1::VolumeCapability {
            access_type: Some(access),
            access_mode: Some(v1::volume_capability::AccessMode { mode }),
        }
    }

    #[test]
    fn capabilities_are_checked_before_anything_is_run() {
        use v1::volume_capability::{access_mode::Mode, AccessType, MountVolume};
        let ctx = HashMap::new();
        let mount = |fs: &str, flags: &[&str]| {
            AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                mount_flags: flags.iter().map(|f| f.to_string()).collect(),
                volume_mount_group: String::new(),
            })
        };
        let w = Mode::SingleNodeWriter as i32;
        assert!(matches!(
            Access::of(Some(&cap(mount("", &[]), w)), &ctx).unwrap(),
            Access::Mount { fs_type, .. } if fs_type == DEFAULT_FS_TYPE
        ));
        let xfs = HashMap::from([(cairn_csi::PARAM_FS_TYPE.to_string(), "xfs".to_string())]);
        assert!(matches!(
            Access::of(Some(&cap(mount("", &[]), w)), &xfs).unwrap(),
            Access::Mount { fs_type, .. } if fs_type == "xfs"
        ));
        let e = Access::of(Some(&cap(mount("ntfs", &[]), w)), &ctx).unwrap_err();
        assert!(e.message.contains("'ntfs'"), "{e:?}");
        let e = Access::of(Some(&cap(mount("ext4", &["ro,x y"]), w)), &ctx).unwrap_err();
        assert!(e.message.contains("'ro,x y'"), "{e:?}");
        let many = Mode::MultiNodeMultiWriter as i32;
        let e = Access::of(Some(&cap(mount("ext4", &[]), many)), &ctx).unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument);
        assert!(Access::of(None, &ctx).is_err());
        assert!(check_volume_id("../x").is_err());
        assert!(required_path("target_path", "rel/dir").is_err());
    }

    #[test]
    fn the_kernel_path_is_taken_only_where_the_probe_allows_it() {
        let probe = |module, client| KernelProbe { module, client };
        for (module, client) in [(false, false), (true, false), (false, true), (true, true)] {
            let p = probe(module, client);
            assert_eq!(choose_via(CsiNbd::Fuse, p).unwrap(), Via::Nbdfuse);
            let auto = if module && client {
                Via::KernelNbd
            } else {
                Via::Nbdfuse
            };
            assert_eq!(choose_via(CsiNbd::Auto, p).unwrap(), auto, "{p:?}");
        }
        assert_eq!(
            choose_via(CsiNbd::Kernel, probe(true, true)).unwrap(),
            Via::KernelNbd
        );
        let e = choose_via(CsiNbd::Kernel, probe(false, true)).unwrap_err();
        assert_eq!(e.code, Code::FailedPrecondition);
        assert!(e.message.contains("nbd module"), "{e:?}");
        assert!(!e.message.contains(NBD_CLIENT), "{e:?}");
        let e = choose_via(CsiNbd::Kernel, probe(true, false)).unwrap_err();
        assert!(e.message.contains("nbd-client is not installed"), "{e:?}");
        assert!(!e.message.contains("nbd module"), "{e:?}");
        let e = choose_via(CsiNbd::Kernel, probe(false, false)).unwrap_err();
        assert!(
            e.message.contains("nbd module") && e.message.contains(NBD_CLIENT),
            "{e:?}"
        );
    }

    #[test]
    fn nbd_client_arguments_come_from_the_uri() {
        let tcp = NbdTarget::parse("nbd://10.0.0.2:10900/pvc-1").unwrap();
        assert_eq!(
            tcp.nbd_client_args(Some("/dev/nbd3")),
            [
                "-N",
                "pvc-1",
                "-b",
                "4096",
                "10.0.0.2",
                "10900",
                "/dev/nbd3"
            ]
        );
        assert_eq!(
            NbdTarget::parse("nbd://node-a/v")
                .unwrap()
                .nbd_client_args(None),
            ["-N", "v", "-b", "4096", "node-a", "10809"]
        );
        assert_eq!(
            NbdTarget::parse("nbd://[::1]:10901/v").unwrap(),
            NbdTarget::Tcp {
                host: "::1".into(),
                port: 10901,
                export: "v".into()
            }
        );
        let unix = NbdTarget::parse("nbd+unix:///pv1?socket=/run/cairn/nbd.sock").unwrap();
        assert_eq!(
            unix.nbd_client_args(Some("/dev/nbd0")),
            [
                "-unix",
                "-N",
                "pv1",
                "-b",
                "4096",
                "/run/cairn/nbd.sock",
                "/dev/nbd0"
            ]
        );
        for bad in [
            "nbds://h/v",
            "http://h/v",
            "nbd://h",
            "nbd://h/",
            "nbd://:10809/v",
            "nbd://h:port/v",
            "nbd://h/v?tls=require",
            "nbd://[::1/v",
            "nbd+unix:///v",
            "nbd+unix:///v?socket=rel/x",
            "nbd+unix:///v?socket=/x&tls=on",
            "nbd+unix:///?socket=/x",
            "nbd+unix://host/v?socket=/x",
        ] {
            let e = NbdTarget::parse(bad).unwrap_err();
            assert_eq!(e.code, Code::InvalidArgument, "{bad}");
            assert!(e.message.contains(&format!("'{bad}'")), "{e:?}");
        }
    }

    #[test]
    fn tool_output_is_parsed() {
        let netlink =
            "Negotiation: ..size = 128MB\nbs=4096, sz=134217728 bytes\nConnected /dev/nbd12\n";
        assert_eq!(connected_device(netlink).as_deref(), Some("/dev/nbd12"));
        assert_eq!(connected_device("Negotiation: ..size = 128MB\n"), None);
        assert_eq!(connected_device("Connected /dev/nbd\n"), None);
        assert_eq!(connected_device("Connected /dev/sda\n"), None);
        assert_eq!(
            block_sysfs("/dev/nbd4", "nbd"),
            Some(PathBuf::from("/sys/block/nbd4"))
        );
        assert_eq!(
            block_sysfs("/dev/loop4", "loop"),
            Some(PathBuf::from("/sys/block/loop4"))
        );
        assert_eq!(block_sysfs("/dev/loop4", "nbd"), None);
        assert_eq!(block_sysfs("/dev/nbd4/../sda", "nbd"), None);
        assert_eq!(block_sysfs("nbd4", "nbd"), None);
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), "/a b\\c");
    }
}
