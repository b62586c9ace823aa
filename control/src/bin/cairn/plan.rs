//! What `cairn up` will run, decided before anything starts: the data directory's layout, each
//! node's loopback ports, the command line of every child, and where the binaries are.
//!
//! Everything here is a pure function of the flags (plus a look at the file system for the
//! binaries), so a bad flag, a port range that collides with the control process or runs past
//! 65535, or a missing binary is refused before any process, file or port is touched.
//!
//! Layout of `--data-dir D` (docs/control.md, "cairn up"):
//!
//! * `D/control/`: the control process's embedded store (`control.redb`, `control.lock`);
//! * `D/node-I/`: node I's data directory, holding its `pool0.img` (sparse, `--size`);
//! * `D/logs/control.log`, `D/logs/node-I.log`: each child's stdout and stderr, this run's;
//! * `D/cairn-up.lock`: flocked by the running `cairn up`, holding its pid;
//! * `D/tls/`: the cluster CA (`ca-key.pem` 0600) and the certificates issued from it:
//!   `node-node-I/`, `control-cairn/` and `admin-cairn/` (cairnctl's; it finds
//!   `./cairn-data/tls/admin-cairn` by itself). Every link is mutual TLS (docs/security.md).
//!
//! Ports: node I (1-based) takes the block of [`PORT_STRIDE`] ports starting at
//! `--base-port + PORT_STRIDE * (I - 1)`: NBD at +0, admin at +1, replica at +2, metrics at +3.
//! With the default base (10809), node-1 is on cairn-node's own default NBD and admin ports, so
//! `cairnctl node` and `nbd://127.0.0.1:10809/NAME` reach it with no flags. The ports are fixed
//! rather than picked at random so that a second run registers each node at the addresses the
//! store already holds, and a nexus finds its replicas where they were.

use anyhow::{bail, Result};
use cairn_control::units::parse_size;
use cairn_tls::{Identity, TlsFiles};
use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// Most nodes one `cairn up` starts (enough for three replicas and failover with spares; each
/// node is a process with its own reactor).
pub const NODES_MAX: u32 = 7;
/// Ports reserved per node: NBD, admin, replica and metrics, and room to grow.
pub const PORT_STRIDE: u16 = 10;
/// The first node's NBD port by default (the IANA NBD port; admin then gets 10810, as a lone
/// cairn-node does).
pub const BASE_PORT_DEFAULT: u16 = 10809;
/// Each node's data file (`pool0.img`) by default: sparse, so it takes disk space only as
/// volumes are written.
pub const SIZE_DEFAULT: &str = "10G";
/// Where every node listens: `cairn up` is one machine.
pub const NODE_IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// The name of the control process's and the operator's certificates.
pub const CONTROL_NAME: &str = "cairn";
pub const ADMIN_NAME: &str = "cairn";
/// The lock file of a running `cairn up`, inside `--data-dir`.
pub const LOCK_FILE: &str = "cairn-up.lock";

/// The two programs `cairn up` runs.
pub const CONTROL_BIN: &str = "cairn-control";
pub const NODE_BIN: &str = "cairn-node";
/// Printed in the instructions; found beside `cairn` like the others, but not required.
pub const CTL_BIN: &str = "cairnctl";

/// One node to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePlan {
    /// `node-I`, its id in the cluster.
    pub id: String,
    pub dir: PathBuf,
    pub log: PathBuf,
    pub nbd: SocketAddr,
    pub admin: SocketAddr,
    pub replica: SocketAddr,
    pub metrics: SocketAddr,
}

impl NodePlan {
    /// Every port this node listens on, with what it is for.
    pub fn ports(&self) -> [(SocketAddr, &'static str); 4] {
        [
            (self.nbd, "NBD"),
            (self.admin, "admin"),
            (self.replica, "replica"),
            (self.metrics, "metrics"),
        ]
    }
}

/// Everything `cairn up` runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub data_dir: PathBuf,
    pub logs_dir: PathBuf,
    pub control_dir: PathBuf,
    pub control_log: PathBuf,
    pub control_listen: SocketAddr,
    /// How the nodes and cairnctl reach the control process (https: every link is mutual
    /// TLS under the CA in `tls_dir`).
    pub control_url: String,
    /// The cluster CA `cairn up` creates, and the certificates it issues from it
    /// (`node-ID`, `control-cairn`, `admin-cairn`).
    pub tls_dir: PathBuf,
    /// The size of each node's new `pool0.img`.
    pub size_bytes: u64,
    pub nodes: Vec<NodePlan>,
}

impl Plan {
    pub fn new(
        data_dir: &Path,
        nodes: u32,
        size: &str,
        control_listen: SocketAddr,
        base_port: u16,
    ) -> Result<Plan> {
        if !(1..=NODES_MAX).contains(&nodes) {
            bail!("--nodes {nodes} is out of range: 1 to {NODES_MAX}");
        }
        let size_bytes = parse_size(size).map_err(|e| anyhow::anyhow!("--size: {e}"))?;
        if control_listen.port() == 0 {
            bail!(
                "--control-listen {control_listen} needs a fixed port: the nodes are told it, \
                 and the next run must find the same one"
            );
        }
        let last = u32::from(base_port) + u32::from(PORT_STRIDE) * nodes - 1;
        if base_port == 0 || last > u32::from(u16::MAX) {
            bail!(
                "--base-port {base_port} leaves no room for {nodes} nodes of {PORT_STRIDE} \
                 ports each (ports {base_port} to {last}); pick one between 1 and {}",
                u32::from(u16::MAX) + 1 - u32::from(PORT_STRIDE) * nodes
            );
        }
        let logs_dir = data_dir.join("logs");
        let nodes: Vec<NodePlan> = (0..nodes)
            .map(|i| {
                let id = format!("node-{}", i + 1);
                // Fits: checked against u16::MAX above.
                let block = base_port + PORT_STRIDE * i as u16;
                let at = |offset: u16| SocketAddr::new(NODE_IP, block + offset);
                NodePlan {
                    dir: data_dir.join(&id),
                    log: logs_dir.join(format!("{id}.log")),
                    nbd: at(0),
                    admin: at(1),
                    replica: at(2),
                    metrics: at(3),
                    id,
                }
            })
            .collect();
        for node in &nodes {
            for (addr, what) in node.ports() {
                if addr.port() == control_listen.port() {
                    bail!(
                        "--control-listen {control_listen} takes port {}, which {} uses for \
                         {what} (ports {base_port} to {last} are the nodes'); move one of \
                         --control-listen and --base-port",
                        addr.port(),
                        node.id
                    );
                }
            }
        }
        let control_ip = if control_listen.ip().is_unspecified() {
            NODE_IP
        } else {
            control_listen.ip()
        };
        Ok(Plan {
            control_dir: data_dir.join("control"),
            control_log: logs_dir.join("control.log"),
            control_url: format!(
                "https://{}",
                SocketAddr::new(control_ip, control_listen.port())
            ),
            tls_dir: data_dir.join("tls"),
            control_listen,
            data_dir: data_dir.to_path_buf(),
            logs_dir,
            size_bytes,
            nodes,
        })
    }

    /// The identities `cairn up` issues certificates for, with the addresses peers dial.
    pub fn identities(&self) -> Vec<(Identity, Vec<IpAddr>)> {
        let mut ids = vec![
            (
                Identity::Control(CONTROL_NAME.into()),
                vec![self.control_ip()],
            ),
            (Identity::Admin(ADMIN_NAME.into()), Vec::new()),
        ];
        ids.extend(
            self.nodes
                .iter()
                .map(|n| (Identity::Node(n.id.clone()), vec![n.admin.ip()])),
        );
        ids
    }

    /// Where an identity's certificate, key and CA certificate are.
    pub fn tls_files(&self, identity: &Identity) -> TlsFiles {
        TlsFiles::in_dir(&cairn_tls::issue::identity_dir(&self.tls_dir, identity))
    }

    /// The admin identity `cairn up` and the printed cairnctl commands use.
    pub fn admin_tls_dir(&self) -> PathBuf {
        cairn_tls::issue::identity_dir(&self.tls_dir, &Identity::Admin(ADMIN_NAME.into()))
    }

    fn control_ip(&self) -> IpAddr {
        if self.control_listen.ip().is_unspecified() {
            NODE_IP
        } else {
            self.control_listen.ip()
        }
    }

    /// Creates the CA on the first run, and a certificate for each identity that has none
    /// (a run with more nodes than the last issues the new nodes').
    pub fn ensure_certificates(&self) -> Result<()> {
        if !self.tls_dir.join(cairn_tls::CA_CERT_FILE).exists() {
            cairn_tls::issue::init_ca(&self.tls_dir)?;
        }
        for (identity, ips) in self.identities() {
            if !cairn_tls::issue::identity_dir(&self.tls_dir, &identity).exists() {
                cairn_tls::issue::issue(&self.tls_dir, &identity, &ips, &[])?;
            }
        }
        Ok(())
    }

    /// The `--tls-*` flags of `identity`.
    fn tls_args(&self, identity: &Identity) -> Vec<OsString> {
        let f = self.tls_files(identity);
        vec![
            "--tls-ca".into(),
            f.ca.into(),
            "--tls-cert".into(),
            f.cert.into(),
            "--tls-key".into(),
            f.key.into(),
        ]
    }

    /// cairn-control's arguments.
    pub fn control_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--data-dir".into(),
            self.control_dir.clone().into(),
            "--listen".into(),
            self.control_listen.to_string().into(),
        ];
        args.extend(self.tls_args(&Identity::Control(CONTROL_NAME.into())));
        args
    }

    /// cairn-node's arguments for `node`. Every reactor is on cairn-node's default core; the
    /// nodes sleep when idle, so several share a CPU well.
    pub fn node_args(&self, node: &NodePlan) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec!["--data-dir".into(), node.dir.clone().into()];
        for (flag, value) in [
            ("--pool0-size", self.size_bytes.to_string()),
            ("--nbd-listen", node.nbd.to_string()),
            ("--admin-listen", node.admin.to_string()),
            ("--replica-listen", node.replica.to_string()),
            ("--metrics-listen", node.metrics.to_string()),
            ("--control", self.control_url.clone()),
            ("--node-id", node.id.clone()),
        ] {
            args.push(flag.into());
            args.push(value.into());
        }
        args.extend(self.tls_args(&Identity::Node(node.id.clone())));
        args
    }
}

/// Where the programs are: beside this executable first (a cargo build puts them all in
/// `target/release`), then on `PATH`.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub control: PathBuf,
    pub node: PathBuf,
    /// How to print cairnctl in the instructions: its path when found, else its bare name.
    pub ctl: PathBuf,
}

impl Binaries {
    /// Finds cairn-control and cairn-node, or fails naming each one missing and where it
    /// looked.
    pub fn find() -> Result<Binaries> {
        let me = std::env::current_exe().ok();
        let beside = me.as_deref().and_then(Path::parent);
        let path = std::env::var_os("PATH").unwrap_or_default();
        let dirs: Vec<PathBuf> = beside
            .map(Path::to_path_buf)
            .into_iter()
            .chain(std::env::split_paths(&path))
            .collect();
        let find = |name: &str| dirs.iter().map(|d| d.join(name)).find(|p| p.is_file());
        let (control, node) = (find(CONTROL_BIN), find(NODE_BIN));
        match (control, node) {
            (Some(control), Some(node)) => Ok(Binaries {
                control,
                node,
                ctl: find(CTL_BIN).unwrap_or_else(|| CTL_BIN.into()),
            }),
            (control, node) => {
                let missing: Vec<&str> = [(control, CONTROL_BIN), (node, NODE_BIN)]
                    .into_iter()
                    .filter(|(found, _)| found.is_none())
                    .map(|(_, name)| name)
                    .collect();
                bail!(
                    "cannot find {}: looked beside {} and on PATH; build them with `cargo \
                     build --release -p cairn-control -p cairn-node`",
                    missing.join(" and "),
                    beside.map_or_else(|| "this program".into(), |d| d.display().to_string())
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(nodes: u32, control: &str, base: u16) -> Result<Plan> {
        Plan::new(Path::new("/d"), nodes, "1G", control.parse().unwrap(), base)
    }

    #[test]
    fn nodes_get_disjoint_blocks_of_ports() {
        let p = plan(NODES_MAX, "127.0.0.1:10800", BASE_PORT_DEFAULT).unwrap();
        let mut ports: Vec<u16> = p
            .nodes
            .iter()
            .flat_map(|n| n.ports().map(|(a, _)| a.port()))
            .collect();
        let count = ports.len();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), count, "ports collide: {ports:?}");
        let n1 = &p.nodes[0];
        assert_eq!((n1.nbd.port(), n1.admin.port()), (10809, 10810));
        assert_eq!(p.nodes[6].metrics.port(), 10809 + 60 + 3);
        assert_eq!(n1.dir, Path::new("/d/node-1"));
        assert_eq!(n1.log, Path::new("/d/logs/node-1.log"));
        assert_eq!(p.control_url, "https://127.0.0.1:10800");
    }

    #[test]
    fn bad_flags_are_refused_naming_the_value() {
        let e = plan(0, "127.0.0.1:10800", 10809).unwrap_err();
        assert!(e.to_string().contains("--nodes 0"), "{e}");
        let e = plan(8, "127.0.0.1:10800", 10809).unwrap_err();
        assert!(e.to_string().contains("1 to 7"), "{e}");
        let e = plan(2, "127.0.0.1:10800", 65530).unwrap_err();
        assert!(e.to_string().contains("--base-port 65530"), "{e}");
        let e = plan(2, "127.0.0.1:10821", 10809).unwrap_err();
        assert!(
            e.to_string().contains("node-2 uses for replica"),
            "the control port inside a node's block: {e}"
        );
        let e = Plan::new(
            Path::new("/d"),
            1,
            "lots",
            "127.0.0.1:1".parse().unwrap(),
            2,
        )
        .unwrap_err();
        assert!(e.to_string().contains("'lots'"), "{e}");
        let e = plan(1, "127.0.0.1:0", 10809).unwrap_err();
        assert!(e.to_string().contains("fixed port"), "{e}");
    }

    #[test]
    fn an_unspecified_control_address_is_reached_on_loopback() {
        let p = plan(1, "0.0.0.0:10800", 10809).unwrap();
        assert_eq!(p.control_url, "https://127.0.0.1:10800");
    }

    #[test]
    fn node_args_carry_the_plan() {
        let p = plan(2, "127.0.0.1:10800", 20000).unwrap();
        let args: Vec<String> = p
            .node_args(&p.nodes[1])
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let joined = args.join(" ");
        for want in [
            "--data-dir /d/node-2",
            "--pool0-size 1073741824",
            "--nbd-listen 127.0.0.1:20010",
            "--admin-listen 127.0.0.1:20011",
            "--replica-listen 127.0.0.1:20012",
            "--metrics-listen 127.0.0.1:20013",
            "--control https://127.0.0.1:10800",
            "--node-id node-2",
        ] {
            assert!(joined.contains(want), "{want} missing from {joined}");
        }
    }
}
