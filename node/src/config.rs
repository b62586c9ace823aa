//! The one configuration of a cairn-node process: [`NodeConfig`], loaded from a TOML file
//! (`--config FILE`) and then overridden by command-line flags ([`Cli`]).
//!
//! Scalar flags replace the file's value; repeatable flags (`--pool`, `--volume`,
//! `--malloc`) add to the file's lists. Everything is validated here, before any engine,
//! pool or socket exists, so a bad spec is refused without side effects.

use cairn_engine::engine::BUF_COUNT_DEFAULT;
use cairn_engine::reactor::SPIN_DEFAULT;
use cairn_engine::units::parse_size;
use cairn_engine::{CoreList, IdlePolicy};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Default NBD listener (the IANA port for NBD).
pub const NBD_LISTEN_DEFAULT: &str = "127.0.0.1:10809";
/// Default gRPC admin listener.
pub const ADMIN_LISTEN_DEFAULT: &str = "127.0.0.1:10810";
/// Default replica server listener (where nexuses on other nodes reach this node's replicas).
pub const REPLICA_LISTEN_DEFAULT: &str = "127.0.0.1:10820";
/// Default Prometheus listener.
pub const METRICS_LISTEN_DEFAULT: &str = "127.0.0.1:9810";
/// Default data directory (relative to the working directory).
pub const DATA_DIR_DEFAULT: &str = "./cairn-data";
/// Size of the sparse `pool0.img` created in a fresh data directory; capped by the
/// filesystem's free space (see [`POOL0_FREE_MARGIN_BYTES`]).
pub const POOL0_SIZE_DEFAULT_BYTES: u64 = 16 << 30;
/// Free space left to the filesystem when sizing a new `pool0.img`: the file is sparse, but
/// a pool that claims more than the disk can hold fails writes later, so never promise that.
pub const POOL0_FREE_MARGIN_BYTES: u64 = 1 << 30;
/// Smallest `pool0.img` worth creating; less free space than this (after the margin) is an
/// error at start.
pub const POOL0_SIZE_MIN_BYTES: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("{what} '{spec}' is invalid: {why}")]
    BadSpec {
        what: &'static str,
        spec: String,
        why: String,
    },
    #[error("cores '{cores}': {why}")]
    BadCores { cores: String, why: String },
    #[error("{what} '{value}' is not an address like 127.0.0.1:10809")]
    BadAddr { what: &'static str, value: String },
    #[error(transparent)]
    Tls(#[from] cairn_tls::TlsError),
    #[error("{0}")]
    NbdTls(String),
    #[error("'{name}' is named twice (by {first} and {second}); names must be unique")]
    DuplicateName {
        name: String,
        first: String,
        second: String,
    },
}

/// What a reactor does with no work: `adaptive` spins only while it expects work within a few
/// µs and otherwise sleeps in the kernel, waking in time for it; `sleep` spins 50 µs after the
/// last work then sleeps; `poll` never sleeps (for cores dedicated to Cairn).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum IdleMode {
    #[default]
    Adaptive,
    Sleep,
    Poll,
}

impl IdleMode {
    pub fn policy(self) -> IdlePolicy {
        match self {
            IdleMode::Adaptive => IdlePolicy::default(),
            IdleMode::Sleep => IdlePolicy::Sleep { spin: SPIN_DEFAULT },
            IdleMode::Poll => IdlePolicy::Poll,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `NAME:SIZE`, as given to `--volume` and `--malloc`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct NamedSize {
    pub name: String,
    pub size_bytes: u64,
}

impl FromStr for NamedSize {
    type Err = String;

    fn from_str(s: &str) -> Result<NamedSize, String> {
        let (name, size) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("'{s}' is not NAME:SIZE (like pg:10G)"))?;
        if name.is_empty() {
            return Err(format!("'{s}' has an empty name"));
        }
        let size_bytes = parse_size(size)?;
        if size_bytes == 0 {
            return Err(format!("'{s}' has size 0"));
        }
        Ok(NamedSize {
            name: name.to_string(),
            size_bytes,
        })
    }
}

impl TryFrom<String> for NamedSize {
    type Error = String;

    fn try_from(s: String) -> Result<NamedSize, String> {
        s.parse()
    }
}

/// A byte size written `"16G"` in TOML.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Size(pub u64);

impl TryFrom<String> for Size {
    type Error = String;

    fn try_from(s: String) -> Result<Size, String> {
        parse_size(&s).map(Size)
    }
}

/// Everything a cairn-node process is told. Field names are the TOML keys.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Reactor cores, like `0`, `0,1` or `2-5`.
    pub cores: String,
    /// Holds `pool0.img`, created (sparse) and formatted when missing.
    pub data_dir: PathBuf,
    /// Size of a newly created `pool0.img` (default [`POOL0_SIZE_DEFAULT_BYTES`], capped by
    /// free space).
    pub pool0_size: Option<Size>,
    /// Extra pool files or devices, already formatted (`cairn-pool PATH create`); each is
    /// named after its file stem.
    pub pools: Vec<PathBuf>,
    /// Volumes to create in the first pool when missing, and export under their names.
    pub volumes: Vec<NamedSize>,
    /// RAM bdevs to create and export under their names (contents are lost at exit).
    pub mallocs: Vec<NamedSize>,
    /// Volumes to create in the first pool when missing and leave unexported, to be hosted
    /// as replicas (by the replica server or a local nexus).
    pub replica_volumes: Vec<NamedSize>,
    /// RAM bdevs to create and leave unexported, to be hosted as replicas (benchmarks of
    /// replication's own cost; contents are lost at exit).
    pub replica_mallocs: Vec<NamedSize>,
    /// Replica server listener; `off` hosts no replicas for other nodes.
    pub replica_listen: String,
    /// Wrap every pool device and malloc bdev in a fault bdev controlled by the admin API's
    /// SetFault (a test instrument; off in production).
    pub fault_injection: bool,
    /// NBD TCP listener; `off` disables the NBD frontend entirely.
    pub nbd_listen: String,
    /// Additional NBD unix-socket listener.
    pub nbd_socket: Option<PathBuf>,
    /// Negotiated NBD connections at once (default `CONNECTIONS_MAX_DEFAULT`, 1024); more
    /// are disconnected at accept.
    pub nbd_connections_max: Option<u32>,
    /// Read data all NBD connections together may hold in unsent replies beyond each one's
    /// 2 MiB floor (default `REPLY_BUDGET_BYTES_DEFAULT`, 256 MiB); at the limit clients that
    /// do not read their replies stop being read.
    pub nbd_reply_budget: Option<Size>,
    pub admin_listen: String,
    pub metrics_listen: String,
    pub idle: IdleMode,
    pub log_format: LogFormat,
    /// DMA buffers per core (each of the engine's buffer size, 128 KiB by default).
    pub buf_count: u32,
    /// Use 2 MiB huge pages for buffers when the system has them.
    pub huge_pages: bool,
    /// The control process to register with and heartbeat (`http://HOST:PORT`), or several,
    /// comma-separated (the processes of one cluster: one that cannot be reached is passed
    /// over for the next); none: the node runs alone, driven by `cairnctl node …`.
    pub control: Option<String>,
    /// This node's id in the cluster (default: the host name). Required to be unique: a
    /// second live node with the same id at other addresses is refused.
    pub node_id: Option<String>,
    /// Failure domain: the zone (default: the host name).
    pub zone: Option<String>,
    /// Failure domain: the rack (default: the host name).
    pub rack: Option<String>,
    /// Serve the CSI Identity and Node services on this unix socket (`unix:///PATH`).
    pub csi_endpoint: Option<String>,
    /// How NodeStage connects to a volume: `auto`, `kernel` or `fuse`.
    pub csi_nbd: crate::csi::CsiNbd,
    /// The cluster CA's certificate (PEM); with `tls_cert` and `tls_key`, every TCP link of
    /// this node is mutual TLS (docs/security.md).
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM), naming `node:ID`.
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Accept listeners beyond loopback without TLS (unauthenticated peers).
    pub insecure: bool,
    // NBD over TLS (issue 16 item 3).
    /// Offer NBD_OPT_STARTTLS to NBD clients, with this node's certificate.
    pub nbd_tls: bool,
    /// Refuse NBD clients that do not start TLS (implies `nbd_tls`).
    pub nbd_tls_required: bool,
    /// Require NBD clients to present a certificate from the cluster CA (implies `nbd_tls`).
    pub nbd_tls_client_certs: bool,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            cores: "0".into(),
            data_dir: DATA_DIR_DEFAULT.into(),
            pool0_size: None,
            pools: Vec::new(),
            volumes: Vec::new(),
            mallocs: Vec::new(),
            replica_volumes: Vec::new(),
            replica_mallocs: Vec::new(),
            replica_listen: REPLICA_LISTEN_DEFAULT.into(),
            fault_injection: false,
            nbd_listen: NBD_LISTEN_DEFAULT.into(),
            nbd_socket: None,
            nbd_connections_max: None,
            nbd_reply_budget: None,
            admin_listen: ADMIN_LISTEN_DEFAULT.into(),
            metrics_listen: METRICS_LISTEN_DEFAULT.into(),
            idle: IdleMode::Adaptive,
            log_format: LogFormat::Text,
            buf_count: BUF_COUNT_DEFAULT,
            huge_pages: true,
            control: None,
            node_id: None,
            zone: None,
            rack: None,
            csi_endpoint: None,
            csi_nbd: crate::csi::CsiNbd::Auto,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            insecure: false,
            nbd_tls: false,
            nbd_tls_required: false,
            nbd_tls_client_certs: false,
        }
    }
}

const AFTER_HELP: &str = "\
Examples:
  # A pool in ./cairn-data (16 GiB sparse, created on first start) with one exported volume:
  cairn-node --volume pg:10G

  # RAM-backed export for benchmarks (compare with nbdkit memory), polling on core 1:
  cairn-node --cores 1 --idle poll --malloc bench:4G --nbd-socket /tmp/cairn.sock

  # Settings from a file (its tls_* keys set: an address beyond loopback needs TLS or
  # --insecure), one flag overriding it:
  cairn-node --config /etc/cairn/node.toml --admin-listen 0.0.0.0:10810

  # Mutual TLS on every link (docs/security.md): a cluster CA, a certificate per node:
  cairnctl cert init ./ca && cairnctl cert issue ./ca --node n1 --addr 10.0.0.5
  cairn-node --node-id n1 --admin-listen 10.0.0.5:10810 --tls-ca ./ca/node-n1/ca-cert.pem \
             --tls-cert ./ca/node-n1/cert.pem --tls-key ./ca/node-n1/key.pem

  # Then, from another shell:
  cairnctl node volume ls
  nbdinfo nbd://127.0.0.1:10809/pg

  # A volume replicated to a second node (each node holds a volume named pg):
  cairn-node --data-dir /var/lib/cairn --replica-volume pg:10G                  # node B
  cairn-node --data-dir ./a --replica-volume pg:10G --replica-listen off \
             --admin-listen 127.0.0.1:10811                                      # node A
  cairnctl node --addr 127.0.0.1:10811 nexus create pg --replica local --replica B:10820
  cairnctl node --addr 127.0.0.1:10811 export add pg --nexus
  # Node A lost: node C takes the volume over from B's copy (a create over replicas that
  # another nexus opened needs --takeover):
  cairnctl node --addr C:10810 nexus create pg --replica B:10820 --replica local --takeover

  # Join a cluster: register with cairn-control, keep a 2 s lease alive (docs/control.md):
  cairn-node --control http://10.0.0.2:10800 --node-id n1 --zone eu-1a --rack r7
  cairnctl node ls --control http://10.0.0.2:10800

Config file (TOML; every key optional, flags override, repeatable flags add):
  cores = \"0\"
  data_dir = \"/var/lib/cairn\"
  pool0_size = \"100G\"
  pools = [\"/dev/nvme1n1\"]
  volumes = [\"pg:10G\"]
  mallocs = [\"bench:1G\"]
  replica_volumes = [\"db:10G\"]
  replica_mallocs = [\"scratch:1G\"]
  replica_listen = \"127.0.0.1:10820\"   # \"off\": host no replicas for other nodes
  fault_injection = false
  nbd_listen = \"127.0.0.1:10809\"      # \"off\": no TCP listener (NBD is off unless nbd_socket is set)
  nbd_socket = \"/run/cairn/nbd.sock\"
  nbd_connections_max = 1024          # negotiated NBD connections at once
  nbd_reply_budget = \"256M\"          # unsent read replies of all NBD clients, beyond 2 MiB each
  admin_listen = \"127.0.0.1:10810\"
  metrics_listen = \"127.0.0.1:9810\"
  idle = \"adaptive\"                   # or \"sleep\", \"poll\"
  log_format = \"text\"                 # or \"json\"
  buf_count = 256
  huge_pages = true
  control = \"http://10.0.0.2:10800\"  # register with cairn-control (absent: run alone)
  node_id = \"n1\"                     # zone, rack and node_id default to the host name
  zone = \"eu-1a\"
  rack = \"r7\"
  csi_endpoint = \"unix:///run/cairn/csi.sock\"
  csi_nbd = \"auto\"                  # or \"kernel\", \"fuse\": how a CSI stage reaches a volume
  tls_ca = \"/etc/cairn/tls/ca-cert.pem\"   # mutual TLS on every TCP link (docs/security.md)
  tls_cert = \"/etc/cairn/tls/cert.pem\"
  tls_key = \"/etc/cairn/tls/key.pem\"
  insecure = false                    # true: listeners beyond loopback without TLS
  nbd_tls = true                      # offer STARTTLS to NBD clients (needs the tls_* files)
  nbd_tls_required = false            # refuse NBD clients that do not start TLS
  nbd_tls_client_certs = false        # NBD clients must show a certificate from the CA (implies required)

Once listening, it prints one line to stdout:
  cairn-node ready nbd=ADDR nbd_socket=PATH admin=ADDR metrics=ADDR replica=ADDR exports=A,B
SIGTERM or SIGINT drains NBD clients, closes volumes and pools durably, and exits 0.
Log level: RUST_LOG (default info).";

/// Command-line flags; each one given overrides (or, when repeatable, extends) the config.
#[derive(Debug, Default, clap::Parser)]
#[command(
    name = "cairn-node",
    version,
    // A later scalar flag wins over an earlier one, so wrappers can append overrides.
    args_override_self = true,
    about = "Cairn's per-node data plane: reactors, pools, volumes, NBD exports, admin API and metrics",
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// TOML config file; flags given here override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Reactor cores, like `0`, `0,1` or `2-5` [default: 0].
    #[arg(long, value_name = "LIST")]
    pub cores: Option<String>,
    /// Directory holding pool0.img, created and formatted when missing [default: ./cairn-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Size of a newly created pool0.img [default: 16G, capped by free space minus 1 GiB].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub pool0_size: Option<u64>,
    /// Extra formatted pool file or device to open (repeatable); named after its file stem.
    #[arg(long = "pool", value_name = "PATH")]
    pub pools: Vec<PathBuf>,
    /// Volume NAME of SIZE: created in the first pool when missing, exported as NAME
    /// (repeatable).
    #[arg(long = "volume", value_name = "NAME:SIZE")]
    pub volumes: Vec<NamedSize>,
    /// RAM bdev NAME of SIZE exported as NAME (repeatable; contents are lost at exit).
    #[arg(long = "malloc", value_name = "NAME:SIZE")]
    pub mallocs: Vec<NamedSize>,
    /// Volume NAME of SIZE: created in the first pool when missing and not exported, to be
    /// hosted as a replica (repeatable).
    #[arg(long = "replica-volume", value_name = "NAME:SIZE")]
    pub replica_volumes: Vec<NamedSize>,
    /// RAM bdev NAME of SIZE, not exported, to be hosted as a replica (repeatable; contents
    /// are lost at exit).
    #[arg(long = "replica-malloc", value_name = "NAME:SIZE")]
    pub replica_mallocs: Vec<NamedSize>,
    /// Replica server listener, or `off` [default: 127.0.0.1:10820]. Beyond loopback it
    /// needs TLS (--tls-*) or --insecure. Over TLS only a node's certificate may open a
    /// replica, and only the assigned node's when it has one.
    #[arg(long, value_name = "ADDR:PORT")]
    pub replica_listen: Option<String>,
    /// Wrap pool devices and malloc bdevs in fault bdevs controlled over the admin API
    /// (SetFault; `cairnctl node fault set`). A test instrument.
    #[arg(long)]
    pub fault_injection: bool,
    /// NBD TCP listener, or `off` [default: 127.0.0.1:10809]. Beyond loopback it needs TLS
    /// (--tls-*) or --insecure.
    #[arg(long, value_name = "ADDR:PORT")]
    pub nbd_listen: Option<String>,
    /// Also listen for NBD on this unix socket.
    #[arg(long, value_name = "PATH")]
    pub nbd_socket: Option<PathBuf>,
    /// Negotiated NBD connections at once; more are disconnected at accept [default: 1024].
    #[arg(long, value_name = "N")]
    pub nbd_connections_max: Option<u32>,
    /// Read data all NBD clients together may hold in unsent replies beyond 2 MiB each; at
    /// the limit, clients that do not read their replies stop being read [default: 256M].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub nbd_reply_budget: Option<u64>,
    /// gRPC admin listener [default: 127.0.0.1:10810]. Beyond loopback it needs TLS
    /// (--tls-*) or --insecure.
    #[arg(long, value_name = "ADDR:PORT")]
    pub admin_listen: Option<String>,
    /// Prometheus /metrics listener [default: 127.0.0.1:9810]. Plain HTTP, read-only
    /// counters: exempt from the TLS rule (docs/security.md).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<String>,
    /// What idle reactors do [default: adaptive].
    #[arg(long, value_enum)]
    pub idle: Option<IdleMode>,
    /// Log format on stderr [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Register with the control process at URL and keep a lease alive (http://HOST:PORT).
    /// Several, comma-separated, for a cluster of control processes on etcd: requests go to
    /// the one that answered last, and to the next when it cannot be reached.
    #[arg(long, value_name = "URL[,URL…]")]
    pub control: Option<String>,
    /// This node's id in the cluster [default: the host name].
    #[arg(long, value_name = "NAME")]
    pub node_id: Option<String>,
    /// Failure domain zone [default: the host name].
    #[arg(long, value_name = "ZONE")]
    pub zone: Option<String>,
    /// Failure domain rack [default: the host name].
    #[arg(long, value_name = "RACK")]
    pub rack: Option<String>,
    /// Serve the CSI Identity and Node services (kubelet's side of Kubernetes storage) on
    /// this unix socket; stages need root, nbdfuse (libnbd-bin), losetup and mkfs.
    #[arg(long, value_name = "unix:///PATH")]
    pub csi_endpoint: Option<String>,
    /// How a CSI stage connects to a volume: the kernel's NBD device (`kernel`, needs the nbd
    /// module and nbd-client), nbdfuse plus a loop device (`fuse`), or the kernel's where it
    /// has one (`auto`) [default: auto].
    #[arg(long, value_enum)]
    pub csi_nbd: Option<crate::csi::CsiNbd>,
    /// The cluster CA's certificate (PEM). With --tls-cert and --tls-key (all three or none),
    /// the admin API, the replica server and the control link are mutual TLS: a peer without
    /// a certificate from this CA is refused in the handshake.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This node's certificate (PEM), naming node:ID (`cairnctl cert issue`).
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// This node's private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Listen beyond loopback without TLS, accepting unauthenticated peers (refused at start
    /// otherwise). Without TLS a replica cannot tell which node opens it: its assigned
    /// opener (`cairnctl node replica assign`) is stored but not enforced.
    #[arg(long)]
    pub insecure: bool,

    // NBD over TLS (issue 16 item 3).
    /// Offer TLS to NBD clients (NBD_OPT_STARTTLS) with the --tls-cert certificate; clients
    /// connect with nbds:// URIs (nbdinfo, nbdcopy) or qemu's tls-creds.
    #[arg(long)]
    pub nbd_tls: bool,
    /// Refuse NBD clients that do not start TLS: every option before STARTTLS is answered
    /// NBD_REP_ERR_TLS_REQD (implies --nbd-tls).
    #[arg(long)]
    pub nbd_tls_required: bool,
    /// Require NBD clients to present a certificate issued by the cluster CA (--tls-ca);
    /// otherwise none is asked for (implies --nbd-tls-required: a client that does not start
    /// TLS would skip the check).
    #[arg(long)]
    pub nbd_tls_client_certs: bool,
}

/// NBD over TLS as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdTlsConfig {
    /// `--nbd-tls-required`.
    pub required: bool,
    /// `--nbd-tls-client-certs`.
    pub client_certs: bool,
}

/// The listeners, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listeners {
    /// None when NBD is `off`.
    pub nbd: Option<SocketAddr>,
    /// None when the replica server is `off`.
    pub replica: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
}

impl NodeConfig {
    /// Reads `--config` when given, applies the flags, and validates the result.
    pub fn load(cli: &Cli) -> Result<NodeConfig, ConfigError> {
        let mut config = match &cli.config {
            Some(path) => NodeConfig::from_file(path)?,
            None => NodeConfig::default(),
        };
        config.apply(cli);
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        NodeConfig::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source: Box::new(source),
        })
    }

    pub fn from_toml(text: &str) -> Result<NodeConfig, toml::de::Error> {
        toml::from_str(text)
    }

    fn apply(&mut self, cli: &Cli) {
        fn set<T: Clone>(to: &mut T, from: &Option<T>) {
            if let Some(v) = from {
                *to = v.clone();
            }
        }
        set(&mut self.cores, &cli.cores);
        set(&mut self.data_dir, &cli.data_dir);
        set(&mut self.nbd_listen, &cli.nbd_listen);
        set(&mut self.admin_listen, &cli.admin_listen);
        set(&mut self.metrics_listen, &cli.metrics_listen);
        set(&mut self.replica_listen, &cli.replica_listen);
        self.fault_injection |= cli.fault_injection;
        self.replica_volumes
            .extend(cli.replica_volumes.iter().cloned());
        self.replica_mallocs
            .extend(cli.replica_mallocs.iter().cloned());
        set(&mut self.idle, &cli.idle);
        set(&mut self.log_format, &cli.log_format);
        set(&mut self.csi_nbd, &cli.csi_nbd);
        for (to, from) in [
            (&mut self.control, &cli.control),
            (&mut self.node_id, &cli.node_id),
            (&mut self.zone, &cli.zone),
            (&mut self.rack, &cli.rack),
            (&mut self.csi_endpoint, &cli.csi_endpoint),
        ] {
            if from.is_some() {
                to.clone_from(from);
            }
        }
        self.insecure |= cli.insecure;
        for (to, from) in [
            (&mut self.tls_ca, &cli.tls_ca),
            (&mut self.tls_cert, &cli.tls_cert),
            (&mut self.tls_key, &cli.tls_key),
        ] {
            if from.is_some() {
                to.clone_from(from);
            }
        }
        if let Some(size) = cli.pool0_size {
            self.pool0_size = Some(Size(size));
        }
        if cli.nbd_socket.is_some() {
            self.nbd_socket = cli.nbd_socket.clone();
        }
        if cli.nbd_connections_max.is_some() {
            self.nbd_connections_max = cli.nbd_connections_max;
        }
        if let Some(bytes) = cli.nbd_reply_budget {
            self.nbd_reply_budget = Some(Size(bytes));
        }
        for (to, from) in [
            (&mut self.tls_ca, &cli.tls_ca),
            (&mut self.tls_cert, &cli.tls_cert),
            (&mut self.tls_key, &cli.tls_key),
        ] {
            if from.is_some() {
                to.clone_from(from);
            }
        }
        self.nbd_tls |= cli.nbd_tls;
        self.nbd_tls_required |= cli.nbd_tls_required;
        self.nbd_tls_client_certs |= cli.nbd_tls_client_certs;
        self.pools.extend(cli.pools.iter().cloned());
        self.volumes.extend(cli.volumes.iter().cloned());
        self.mallocs.extend(cli.mallocs.iter().cloned());
    }

    /// Checks everything that can be checked without touching the system.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(Size(size)) = self.pool0_size {
            if size < POOL0_SIZE_MIN_BYTES {
                return Err(ConfigError::BadSpec {
                    what: "pool0_size",
                    spec: size.to_string(),
                    why: format!("below the smallest pool0.img, {POOL0_SIZE_MIN_BYTES} bytes"),
                });
            }
        }
        self.core_list()?;
        self.listeners()?;
        self.tls_files()?;
        self.membership()?;
        self.csi()?;
        self.nbd_tls()?;
        self.check_names()
    }

    /// How NBD offers TLS: None for not at all, else whether it is required and whether
    /// client certificates are, with the files that serve it. Every NBD TLS flag needs the
    /// three TLS files and an NBD listener.
    pub fn nbd_tls(&self) -> Result<Option<NbdTlsConfig>, ConfigError> {
        let flag = if self.nbd_tls_required {
            "--nbd-tls-required"
        } else if self.nbd_tls_client_certs {
            "--nbd-tls-client-certs"
        } else if self.nbd_tls {
            "--nbd-tls"
        } else {
            return Ok(None);
        };
        if self.tls_files()?.is_none() {
            return Err(ConfigError::NbdTls(format!(
                "{flag} needs --tls-ca, --tls-cert and --tls-key (the certificate NBD clients \
                 verify; `cairnctl cert issue` writes them)"
            )));
        }
        if self.nbd_listen == "off" && self.nbd_socket.is_none() {
            return Err(ConfigError::NbdTls(format!(
                "{flag} but NBD is off (--nbd-listen off and no --nbd-socket)"
            )));
        }
        Ok(Some(NbdTlsConfig {
            // A certificate check a client could skip by not starting TLS is no check.
            required: self.nbd_tls_required || self.nbd_tls_client_certs,
            client_certs: self.nbd_tls_client_certs,
        }))
    }

    /// The node's own name for `what` (`node id`, `zone`, `rack`): the configured one, else
    /// the host name; checked as a cluster name.
    fn cluster_name(&self, what: &'static str, v: &Option<String>) -> Result<String, ConfigError> {
        let v = v.clone().unwrap_or_else(cairn_control_api::hostname);
        cairn_control_api::check_name(what, &v)
            .map(|()| v.clone())
            .map_err(|e| ConfigError::BadSpec {
                what,
                spec: v,
                why: e.to_string(),
            })
    }

    /// The CSI node plugin's socket and identity, or None when `csi_endpoint` is not set.
    pub fn csi(&self) -> Result<Option<(PathBuf, crate::csi::CsiNodeConfig)>, ConfigError> {
        let Some(endpoint) = &self.csi_endpoint else {
            return Ok(None);
        };
        let socket = cairn_csi::endpoint_path(endpoint).map_err(|e| ConfigError::BadSpec {
            what: "csi_endpoint",
            spec: endpoint.clone(),
            why: e.to_string(),
        })?;
        Ok(Some((
            socket,
            crate::csi::CsiNodeConfig {
                node_id: self.cluster_name("node id", &self.node_id)?,
                zone: self.cluster_name("zone", &self.zone)?,
                state_dir: self.data_dir.join("csi"),
                nbd: self.csi_nbd,
            },
        )))
    }

    /// What to register with the control process, or None when `control` is not set.
    pub fn membership(&self) -> Result<Option<crate::membership::Membership>, ConfigError> {
        let Some(url) = &self.control else {
            return Ok(None);
        };
        let controls = crate::membership::Controls::new(url, crate::membership::REQUEST_TIMEOUT)
            .map_err(|e| ConfigError::BadSpec {
                what: "control",
                spec: url.clone(),
                why: e.to_string(),
            })?;
        Ok(Some(crate::membership::Membership {
            controls,
            node_id: self.cluster_name("node id", &self.node_id)?,
            zone: self.cluster_name("zone", &self.zone)?,
            rack: self.cluster_name("rack", &self.rack)?,
        }))
    }

    pub fn core_list(&self) -> Result<CoreList, ConfigError> {
        CoreList::parse(&self.cores).map_err(|e| ConfigError::BadCores {
            cores: self.cores.clone(),
            why: e.to_string(),
        })
    }

    pub fn listeners(&self) -> Result<Listeners, ConfigError> {
        let parse = |what: &'static str, value: &str| {
            value
                .parse::<SocketAddr>()
                .map_err(|_| ConfigError::BadAddr {
                    what,
                    value: value.to_string(),
                })
        };
        let nbd = match self.nbd_listen.as_str() {
            "off" => None,
            addr => Some(parse("nbd_listen", addr)?),
        };
        let replica = match self.replica_listen.as_str() {
            "off" => None,
            addr => Some(parse("replica_listen", addr)?),
        };
        Ok(Listeners {
            nbd,
            replica,
            admin: parse("admin_listen", &self.admin_listen)?,
            metrics: parse("metrics_listen", &self.metrics_listen)?,
        })
    }

    /// The TLS files, when configured (all three or none).
    pub fn tls_files(&self) -> Result<Option<cairn_tls::TlsFiles>, ConfigError> {
        Ok(cairn_tls::TlsFiles::from_flags(
            self.tls_ca.clone(),
            self.tls_cert.clone(),
            self.tls_key.clone(),
        )?)
    }

    /// The listener rule (docs/security.md): every TCP listener that carries a protocol of
    /// Cairn's (admin, replica, NBD) beyond loopback needs TLS or `insecure`. Metrics is
    /// exempt: read-only counters for a Prometheus that scrapes plain HTTP.
    pub fn check_listeners(&self, tls: bool) -> Result<(), ConfigError> {
        let l = self.listeners()?;
        // NBD counts as TLS only when it requires STARTTLS (--nbd-tls-required, or
        // --nbd-tls-client-certs): merely offering it still serves plain clients, and having
        // certificates does not make NBD TLS at all.
        let nbd_tls = self.nbd_tls()?.is_some_and(|t| t.required);
        let tcp = [
            ("--admin-listen", Some(l.admin), tls),
            ("--replica-listen", l.replica, tls),
            ("--nbd-listen", l.nbd, nbd_tls),
        ];
        for (flag, addr, tls) in tcp {
            if let Some(addr) = addr {
                cairn_tls::check_listener(flag, &addr.to_string(), tls, self.insecure)?;
            }
        }
        Ok(())
    }

    /// Pool names (file stems), volume names and malloc names must each be unique, and an
    /// export name (volume or malloc) can serve only one thing.
    fn check_names(&self) -> Result<(), ConfigError> {
        let mut seen: Vec<(String, String)> = vec![("pool0".into(), "the data dir".into())];
        for path in &self.pools {
            let name = pool_name(path).ok_or_else(|| ConfigError::BadSpec {
                what: "pool",
                spec: path.display().to_string(),
                why: "it has no file name to name the pool after".into(),
            })?;
            claim(&mut seen, name, format!("--pool {}", path.display()))?;
        }
        let mut exports = Vec::new();
        for v in &self.volumes {
            claim(&mut exports, v.name.clone(), format!("--volume {}", v.name))?;
        }
        for m in &self.mallocs {
            claim(&mut exports, m.name.clone(), format!("--malloc {}", m.name))?;
        }
        for r in &self.replica_volumes {
            claim(
                &mut exports,
                r.name.clone(),
                format!("--replica-volume {}", r.name),
            )?;
        }
        Ok(())
    }

    /// The size of a new `pool0.img`, before capping by free space.
    pub fn pool0_size_bytes(&self) -> u64 {
        self.pool0_size.map_or(POOL0_SIZE_DEFAULT_BYTES, |s| s.0)
    }
}

fn claim(seen: &mut Vec<(String, String)>, name: String, by: String) -> Result<(), ConfigError> {
    if let Some((_, first)) = seen.iter().find(|(n, _)| *n == name) {
        return Err(ConfigError::DuplicateName {
            name,
            first: first.clone(),
            second: by,
        });
    }
    seen.push((name, by));
    Ok(())
}

/// The name of the pool on `path`: its file stem (`/dev/nvme1n1` is `nvme1n1`).
pub fn pool_name(path: &Path) -> Option<String> {
    path.file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn defaults_are_documented_values() {
        let c = NodeConfig::load(&Cli::parse_from(["cairn-node"])).unwrap();
        assert_eq!(c, NodeConfig::default());
        let l = c.listeners().unwrap();
        assert_eq!(l.nbd, Some(NBD_LISTEN_DEFAULT.parse().unwrap()));
        assert_eq!(c.pool0_size_bytes(), POOL0_SIZE_DEFAULT_BYTES);
    }

    #[test]
    fn nbd_tls_flags_need_the_tls_files_and_nbd() {
        let load = |args: &[&str]| {
            let mut argv = vec!["cairn-node"];
            argv.extend_from_slice(args);
            NodeConfig::load(&Cli::parse_from(argv))
        };
        let files = [
            "--tls-ca",
            "ca.pem",
            "--tls-cert",
            "cert.pem",
            "--tls-key",
            "key.pem",
        ];
        for flag in ["--nbd-tls", "--nbd-tls-required", "--nbd-tls-client-certs"] {
            let e = load(&[flag]).unwrap_err().to_string();
            assert!(e.contains(flag) && e.contains("--tls-cert"), "{e}");
        }
        let e = load(&["--nbd-tls", "--tls-ca", "ca.pem"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("--tls-cert and --tls-key missing"), "{e}");
        let mut off = files.to_vec();
        off.extend(["--nbd-listen", "off", "--nbd-tls"]);
        let e = load(&off).unwrap_err().to_string();
        assert!(e.contains("NBD is off"), "{e}");
        let mut required = files.to_vec();
        required.push("--nbd-tls-required");
        let tls = load(&required).unwrap().nbd_tls().unwrap().unwrap();
        assert!(tls.required && !tls.client_certs, "required implies TLS");
        let c = NodeConfig::from_toml(
            "tls_ca = \"a\"\ntls_cert = \"b\"\ntls_key = \"c\"\nnbd_tls_client_certs = true\n",
        )
        .unwrap();
        let tls = c.nbd_tls().unwrap().unwrap();
        assert!(
            tls.client_certs && tls.required,
            "client certificates imply required"
        );
        assert_eq!(load(&files).unwrap().nbd_tls().unwrap(), None);
    }

    #[test]
    fn toml_then_flags_override_and_extend() {
        let mut c = NodeConfig::from_toml(
            "cores = \"0,1\"\nvolumes = [\"a:1G\"]\nidle = \"poll\"\npool0_size = \"1G\"\n",
        )
        .unwrap();
        assert_eq!(c.idle, IdleMode::Poll);
        assert_eq!(c.pool0_size_bytes(), 1 << 30);
        let cli = Cli::parse_from(["cairn-node", "--cores", "1", "--volume", "b:4M"]);
        c.apply(&cli);
        assert_eq!(c.cores, "1");
        let names: Vec<_> = c.volumes.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(c.volumes[1].size_bytes, 4 << 20);
    }

    #[test]
    fn bad_specs_are_named() {
        let e = Cli::try_parse_from(["cairn-node", "--volume", "nosize"]).unwrap_err();
        assert!(e.to_string().contains("nosize"), "{e}");
        let e = Cli::try_parse_from(["cairn-node", "--malloc", "m:12Q"]).unwrap_err();
        assert!(e.to_string().contains("12Q"), "{e}");
        let e = NodeConfig::from_toml("bogus = 1").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let cli = Cli::parse_from(["cairn-node", "--volume", "a:1G", "--malloc", "a:1G"]);
        let e = NodeConfig::load(&cli).unwrap_err();
        assert!(e.to_string().contains("'a'"), "{e}");
        let cli = Cli::parse_from(["cairn-node", "--admin-listen", "nowhere"]);
        let e = NodeConfig::load(&cli).unwrap_err();
        assert!(e.to_string().contains("nowhere"), "{e}");
    }

    #[test]
    fn a_pool0_size_below_the_minimum_is_refused() {
        let cli = Cli::parse_from(["cairn-node", "--pool0-size", "1M"]);
        let e = NodeConfig::load(&cli).unwrap_err();
        assert!(e.to_string().contains("pool0_size '1048576'"), "{e}");
        let cli = Cli::parse_from(["cairn-node", "--pool0-size", "64M"]);
        assert!(NodeConfig::load(&cli).is_ok());
    }

    #[test]
    fn repeated_flags_add_and_scalars_take_the_last() {
        let cli = Cli::parse_from([
            "cairn-node",
            "--volume",
            "a:1G",
            "--volume",
            "b:1G",
            "--cores",
            "0",
            "--cores",
            "1",
        ]);
        assert_eq!(cli.volumes.len(), 2);
        assert_eq!(cli.cores.as_deref(), Some("1"));
    }

    #[test]
    fn tls_flags_come_all_or_none_and_listeners_beyond_loopback_need_tls() {
        let cli = Cli::parse_from(["cairn-node", "--tls-ca", "ca.pem"]);
        let e = NodeConfig::load(&cli).unwrap_err();
        assert!(
            e.to_string().contains("--tls-cert and --tls-key missing"),
            "{e}"
        );
        let c =
            NodeConfig::from_toml("tls_ca = \"a\"\ntls_cert = \"b\"\ntls_key = \"c\"\n").unwrap();
        assert!(c.tls_files().unwrap().is_some());
        let cli = Cli::parse_from(["cairn-node", "--admin-listen", "0.0.0.0:10810"]);
        let c = NodeConfig::load(&cli).unwrap();
        let e = c.check_listeners(false).unwrap_err();
        assert!(
            e.to_string()
                .contains("--admin-listen 0.0.0.0:10810 listens beyond this machine without TLS"),
            "{e}"
        );
        assert!(c.check_listeners(true).is_ok());
        let cli = Cli::parse_from(["cairn-node", "--admin-listen", "0.0.0.0:1", "--insecure"]);
        assert!(NodeConfig::load(&cli)
            .unwrap()
            .check_listeners(false)
            .is_ok());
        let c = NodeConfig::load(&Cli::parse_from(["cairn-node"])).unwrap();
        assert!(c.check_listeners(false).is_ok(), "loopback defaults");
    }

    #[test]
    fn nbd_can_be_turned_off() {
        let cli = Cli::parse_from(["cairn-node", "--nbd-listen", "off"]);
        assert_eq!(
            NodeConfig::load(&cli).unwrap().listeners().unwrap().nbd,
            None
        );
    }

    #[test]
    fn membership_comes_from_the_file_and_the_flags() {
        let mut c = NodeConfig::from_toml(
            "control = \"http://127.0.0.1:10800\"\nnode_id = \"n1\"\nzone = \"z1\"\n",
        )
        .unwrap();
        c.apply(&Cli::parse_from([
            "cairn-node",
            "--rack",
            "r9",
            "--node-id",
            "n2",
        ]));
        let m = c.membership().unwrap().expect("control is set");
        assert_eq!(
            (m.node_id.as_str(), m.zone.as_str(), m.rack.as_str()),
            ("n2", "z1", "r9")
        );
        assert_eq!(m.controls.url(), "http://127.0.0.1:10800");
        let alone = NodeConfig::load(&Cli::parse_from(["cairn-node"])).unwrap();
        assert!(alone.membership().unwrap().is_none());
        let cli = Cli::parse_from([
            "cairn-node",
            "--control",
            "http://127.0.0.1:1",
            "--node-id",
            "a/b",
        ]);
        let e = NodeConfig::load(&cli).unwrap_err();
        assert!(e.to_string().contains("node id 'a/b'"), "{e}");
        let cli = Cli::parse_from(["cairn-node", "--control", "ftp://x:1"]);
        let e = NodeConfig::load(&cli).unwrap_err();
        assert!(e.to_string().contains("ftp://x:1"), "{e}");
        let cli = Cli::parse_from([
            "cairn-node",
            "--control",
            "http://127.0.0.1:1, http://127.0.0.1:2",
        ]);
        let m = NodeConfig::load(&cli)
            .unwrap()
            .membership()
            .unwrap()
            .unwrap();
        assert_eq!(m.controls.url(), "http://127.0.0.1:1");
        let cli = Cli::parse_from(["cairn-node", "--control", "http://127.0.0.1:1,,"]);
        let e = NodeConfig::load(&cli).unwrap_err();
        assert!(e.to_string().contains("control URL ''"), "{e}");
    }
}
