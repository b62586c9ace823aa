//! Bringing a node up and taking it down, in an order that never leaves a pool half-open.
//!
//! Start: bind the admin and metrics ports (so a taken port is refused before anything is
//! touched), start the engine, start the NBD server (its ports), open or create the pools
//! (each locked against other processes), create malloc bdevs and the `--volume` volumes,
//! export them, print the ready line, then serve gRPC and metrics on a small tokio runtime
//! whose threads stay off the reactor cores when the machine has other cores.
//!
//! Stop (SIGTERM or SIGINT): stop accepting admin and metrics connections, shut the NBD
//! server down (it drains in-flight requests and closes every connection), close exported
//! volumes, remove malloc bdevs, close the pools (durable when it returns), stop the engine,
//! and exit 0. A failure part-way through start runs the same teardown before the error is
//! reported, so pools are closed cleanly even then.

use crate::admin::AdminService;
use crate::config::{
    pool_name, ConfigError, NodeConfig, POOL0_FREE_MARGIN_BYTES, POOL0_SIZE_MIN_BYTES,
};
use crate::membership::{is_final, pool_capacities, Heartbeats};
use crate::proto as pb;
use crate::state::{Node, NodeError};
use cairn_control_api::NodeAddresses;
use cairn_engine::bdev::fault::FaultControl;
use cairn_engine::bdev::uring::{UringBdev, UringOptions};
use cairn_engine::bdev::BdevError;
use cairn_engine::frontend::nbd::{NbdConfig, NbdError, NbdServer, NbdTls};
use cairn_engine::owner_only;
use cairn_engine::volume::{Pool, PoolError, CLUSTER_DEFAULT_BYTES};
use cairn_engine::{CoreId, Engine, EngineConfig, EngineError};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Worker threads of the control runtime (gRPC, metrics, signals): control traffic is light,
/// and every thread here is one that may compete with a reactor for a CPU.
pub const RUNTIME_WORKERS: usize = 2;
/// Blocking threads for admin operations at once; more requests queue in the runtime.
pub const ADMIN_BLOCKING_THREADS_MAX: usize = 8;
/// How long the admin server gets at shutdown to answer calls in flight and see its clients
/// go; connections still open then (an idle client that ignores GOAWAY) are cut. Operations
/// already running on the blocking pool are not cut: the node's shutdown waits for them.
pub const ADMIN_DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// File name of the pool created in the data directory.
pub const POOL0_FILE: &str = "pool0.img";
/// Granularity a new pool0.img is sized to.
const POOL0_ROUND_BYTES: u64 = 1 << 20;

/// Why a node did not start or stop cleanly. Rare and reported once, so large variants are
/// boxed only to keep `Result`s small.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{what} listener {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "data dir {path}: only {free_bytes} bytes free; a new {POOL0_FILE} needs \
         {POOL0_SIZE_MIN_BYTES} bytes plus a margin of {POOL0_FREE_MARGIN_BYTES}"
    )]
    NoRoom { path: String, free_bytes: u64 },
    #[error("pool {path}: {source}")]
    PoolDevice { path: String, source: BdevError },
    #[error("pool file {path}: restricting its mode to the owner: {source}")]
    PoolMode {
        path: String,
        source: std::io::Error,
    },
    #[error("pool {path}: {source}")]
    Pool { path: String, source: PoolError },
    #[error("{flag} {name}: {source}")]
    Spec {
        flag: &'static str,
        name: String,
        source: Box<NodeError>,
    },
    #[error("--volume {name}: '{name}' exists in pool '{pool}' as a snapshot, not a volume")]
    SpecIsSnapshot { name: String, pool: String },
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Nbd(#[from] NbdError),
    #[error("NBD TLS: {0}")]
    NbdTls(String),
    #[error(transparent)]
    Node(Box<NodeError>),
    #[error("starting the control runtime: {0}")]
    Runtime(std::io::Error),
    #[error("installing the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Control(#[from] crate::membership::MembershipError),
    #[error("starting the heartbeat thread: {0}")]
    Heartbeat(std::io::Error),
    #[error(transparent)]
    Csi(#[from] cairn_csi::EndpointError),
    #[error(transparent)]
    Tls(#[from] cairn_tls::TlsError),
    #[error(transparent)]
    ControlUrl(#[from] cairn_control_api::client::ClientError),
    #[error("shutdown was not clean (see the log)")]
    UncleanShutdown,
}

/// Where a started node listens: what the ready line says.
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub nbd: Option<SocketAddr>,
    pub nbd_socket: Option<PathBuf>,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
}

/// Runs a node with `config` until SIGTERM or SIGINT, then shuts it down.
pub fn run(config: NodeConfig) -> Result<(), DaemonError> {
    let listeners = config.listeners()?;
    let tls = config
        .tls_files()?
        .map(|files| cairn_tls::Tls::load(&files))
        .transpose()?;
    config.check_listeners(tls.is_some())?;
    let cores = config.core_list()?;
    let admin = bind("admin", listeners.admin)?;
    let metrics = bind("metrics", listeners.metrics)?;
    let runtime = runtime(cores.as_slice())?;
    owner_only::create_dir_all(&config.data_dir).map_err(|source| DaemonError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let mut engine_config = EngineConfig::new(cores);
    engine_config.idle = config.idle.policy();
    engine_config.buf_count = config.buf_count;
    engine_config.huge_pages = config.huge_pages;
    let engine = Arc::new(Engine::start(engine_config)?);
    // NBD runs when either listener is configured: `nbd_listen = off` with a socket serves
    // the unix socket alone.
    let nbd = match (listeners.nbd, &config.nbd_socket) {
        (None, None) => None,
        (tcp, unix) => Some(NbdServer::start(
            engine.clone(),
            nbd_config(&config, tcp, unix, nbd_tls(&config, tls.as_ref())?),
        )?),
    };
    let endpoints = Endpoints {
        nbd: nbd.as_ref().and_then(NbdServer::tcp_addr),
        nbd_socket: nbd.as_ref().and(config.nbd_socket.clone()),
        admin: local_addr(&admin, "admin", listeners.admin)?,
        metrics: local_addr(&metrics, "metrics", listeners.metrics)?,
    };
    let node = Arc::new(Node::new(engine, nbd, config.fault_injection));
    if let Some(tls) = tls {
        tracing::info!(identity = %tls.identity(), "mutual TLS on the admin API, the replica links and the control link");
        node.set_tls(tls);
    }
    let replica = match populate(&node, &config)
        .and_then(|()| start_replication(&node, &config, listeners.replica))
    {
        Ok(replica) => replica,
        Err(e) => {
            teardown(node, runtime);
            return Err(e);
        }
    };
    let _guard = runtime.enter();
    let signals = Signals::install();
    let signals = match signals {
        Ok(s) => s,
        Err(e) => {
            drop(_guard);
            teardown(node, runtime);
            return Err(e);
        }
    };
    // Before the node is announced, so that no nexus create can race it: a nexus with a
    // control volume records its in-sync set with this control process. (The configuration
    // was checked at load; `join_cluster` reports any error.)
    if let Ok(Some(membership)) = membership(&config, &node) {
        node.set_control(membership);
    }
    // The CSI socket is bound before the node is announced, so a ready node serves kubelet.
    let csi = config.csi().map_err(DaemonError::from).and_then(|c| {
        c.map(|(socket, c)| {
            let incoming = cairn_csi::bind(&socket)?;
            Ok((incoming, crate::csi::CsiNode::new(c)))
        })
        .transpose()
    });
    let csi = match csi {
        Ok(c) => c,
        Err(e) => {
            drop(_guard);
            teardown(node, runtime);
            return Err(e);
        }
    };
    node.open_nbd();
    announce(&endpoints, replica.as_deref(), &node.export_names());
    let heartbeats = match join_cluster(&config, &node, &endpoints, replica.as_deref()) {
        Ok(h) => h,
        Err(e) => {
            drop(_guard);
            teardown(node, runtime);
            return Err(e);
        }
    };
    runtime.block_on(serve(node.clone(), admin, metrics, csi, signals));
    drop(heartbeats);
    drop(_guard);
    if teardown(node, runtime) {
        Ok(())
    } else {
        Err(DaemonError::UncleanShutdown)
    }
}

/// Registers with the control process when `--control` is set and starts the heartbeat
/// thread. A refusal (a duplicate node id, a malformed request) stops the node; an
/// unreachable control process is retried by the thread.
fn join_cluster(
    config: &NodeConfig,
    node: &Arc<Node>,
    endpoints: &Endpoints,
    replica: Option<&str>,
) -> Result<Option<Heartbeats>, DaemonError> {
    let Some(membership) = membership(config, node)? else {
        return Ok(None);
    };
    let addresses = NodeAddresses {
        admin: endpoints.admin.to_string(),
        nbd: endpoints.nbd.map(|a| a.to_string()),
        replica: replica.map(str::to_string),
    };
    let registered = match membership
        .register(&addresses, pool_capacities(node).unwrap_or_default())
    {
        Ok(r) => {
            tracing::info!(node_id = %membership.node_id, incarnation = r.incarnation, "registered with the control process");
            Some(r)
        }
        Err(e) if is_final(&e) => return Err(e.into()),
        Err(e) => {
            tracing::warn!(error = %e, "control process unreachable; retrying in the background");
            None
        }
    };
    Heartbeats::start(membership, node.clone(), addresses, registered)
        .map(Some)
        .map_err(DaemonError::Heartbeat)
}

/// The control processes to register with, reached over the node's TLS when it has one.
fn membership(
    config: &NodeConfig,
    node: &Node,
) -> Result<Option<crate::membership::Membership>, DaemonError> {
    let Some(mut membership) = config.membership()? else {
        return Ok(None);
    };
    membership.controls = membership.controls.with_tls(node.tls())?;
    Ok(Some(membership))
}

/// NBD over TLS (issue 16 item 3): the node's certificate, with client certificates from the
/// cluster CA required or not asked for.
/// `tls` is the node's identity, loaded once at start.
fn nbd_tls(
    config: &NodeConfig,
    tls: Option<&cairn_tls::Tls>,
) -> Result<Option<NbdTls>, DaemonError> {
    let Some(c) = config.nbd_tls()? else {
        return Ok(None);
    };
    let tls = tls.ok_or_else(|| {
        DaemonError::NbdTls("NBD TLS is configured but the node has no certificate".into())
    })?;
    let server = if c.client_certs {
        tls.server_config()
    } else {
        tls.server_config_no_client_auth()
    };
    tracing::info!(
        identity = %tls.identity(),
        required = c.required,
        client_certs = c.client_certs,
        "NBD offers TLS"
    );
    Ok(Some(NbdTls {
        config: server,
        required: c.required,
    }))
}

/// The NBD server's settings: the listeners, TLS, and the limits the config overrides.
fn nbd_config(
    config: &NodeConfig,
    tcp: Option<SocketAddr>,
    unix: &Option<PathBuf>,
    tls: Option<NbdTls>,
) -> NbdConfig {
    let defaults = NbdConfig::default();
    NbdConfig {
        tcp,
        unix: unix.clone(),
        tls,
        start_paused: true,
        connections_max: config
            .nbd_connections_max
            .map_or(defaults.connections_max, |n| n as usize),
        reply_budget_bytes: config
            .nbd_reply_budget
            .map_or(defaults.reply_budget_bytes, |s| s.0 as usize),
        ..defaults
    }
}

fn bind(what: &'static str, addr: SocketAddr) -> Result<std::net::TcpListener, DaemonError> {
    let l = std::net::TcpListener::bind(addr).map_err(|source| DaemonError::Bind {
        what,
        addr,
        source,
    })?;
    l.set_nonblocking(true)
        .map_err(|source| DaemonError::Bind { what, addr, source })?;
    Ok(l)
}

fn local_addr(
    l: &std::net::TcpListener,
    what: &'static str,
    addr: SocketAddr,
) -> Result<SocketAddr, DaemonError> {
    l.local_addr()
        .map_err(|source| DaemonError::Bind { what, addr, source })
}

/// The control runtime. Its threads are kept off the reactor cores when other allowed CPUs
/// exist (on a machine with no spare CPU they share, and the reactors' sleep policy keeps
/// that cheap).
fn runtime(reactor_cores: &[CoreId]) -> Result<tokio::runtime::Runtime, DaemonError> {
    let spare: Vec<u32> = cairn_engine::sys::allowed_cpus()
        .into_iter()
        .filter(|c| !reactor_cores.iter().any(|r| r.get() == *c))
        .collect();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(RUNTIME_WORKERS)
        .max_blocking_threads(ADMIN_BLOCKING_THREADS_MAX)
        .thread_name("cairn-ctl")
        .enable_all()
        .on_thread_start(move || pin_to_any(&spare))
        .build()
        .map_err(DaemonError::Runtime)
}

/// Restricts the calling thread to `cpus`; an empty list leaves it alone.
fn pin_to_any(cpus: &[u32]) {
    if cpus.is_empty() {
        return;
    }
    if let Err(error) = cairn_engine::sys::set_affinity(cpus) {
        tracing::warn!(%error, "keeping a control thread off the reactor cores failed");
    }
}

/// Starts the replica server and nexus manager once the `--replica-volume` volumes and
/// `--replica-malloc` bdevs exist;
/// returns the replica server's address.
fn start_replication(
    node: &Arc<Node>,
    config: &NodeConfig,
    listen: Option<SocketAddr>,
) -> Result<Option<String>, DaemonError> {
    for v in &config.replica_volumes {
        ensure_volume(node, "--replica-volume", &v.name, v.size_bytes)?;
    }
    for m in &config.replica_mallocs {
        node.add_malloc(&m.name, m.size_bytes)
            .map_err(|source| DaemonError::Spec {
                flag: "--replica-malloc",
                name: m.name.clone(),
                source: Box::new(source),
            })?;
    }
    node.start_replication(&config.data_dir, listen)
        .map_err(|e| DaemonError::Node(Box::new(e)))
}

/// Opens the pools, creates malloc bdevs and `--volume` volumes, and exports them.
fn populate(node: &Node, config: &NodeConfig) -> Result<(), DaemonError> {
    let cores = node.engine().cores();
    let (pool0, fault) = open_pool0(node, config, cores[0])?;
    node.add_pool(
        "pool0",
        config.data_dir.join(POOL0_FILE),
        cores[0],
        pool0,
        fault,
    )
    .map_err(|e| DaemonError::Node(Box::new(e)))?;
    for (i, path) in config.pools.iter().enumerate() {
        let name = pool_name(path).expect("validated");
        let home = cores[(i + 1) % cores.len()];
        let (pool, fault) = open_pool(node, &name, path, home)?;
        node.add_pool(&name, path.clone(), home, pool, fault)
            .map_err(|e| DaemonError::Node(Box::new(e)))?;
    }
    for m in &config.mallocs {
        let spec = |source| DaemonError::Spec {
            flag: "--malloc",
            name: m.name.clone(),
            source: Box::new(source),
        };
        node.add_malloc(&m.name, m.size_bytes).map_err(spec)?;
        export_if_enabled(node, &m.name, "").map_err(spec)?;
    }
    for v in &config.volumes {
        ensure_volume(node, "--volume", &v.name, v.size_bytes)?;
        export_if_enabled(node, &v.name, "pool0").map_err(|source| DaemonError::Spec {
            flag: "--volume",
            name: v.name.clone(),
            source: Box::new(source),
        })?;
    }
    Ok(())
}

fn export_if_enabled(node: &Node, name: &str, pool: &str) -> Result<(), NodeError> {
    match node.export(name, pool, name, false, false, None) {
        Err(NodeError::NbdDisabled) => {
            tracing::warn!(name, "NBD is off; not exported");
            Ok(())
        }
        r => r.map(drop),
    }
}

/// Creates `--volume NAME:SIZE` in the first pool unless it exists; an existing volume is
/// used as it is (a differing size is logged, never changed).
fn ensure_volume(
    node: &Node,
    flag: &'static str,
    name: &str,
    size_bytes: u64,
) -> Result<(), DaemonError> {
    let spec = |source| DaemonError::Spec {
        flag,
        name: name.into(),
        source: Box::new(source),
    };
    let existing = node.list_volumes("pool0").map_err(spec)?;
    match existing.into_iter().find(|v| v.name == name) {
        Some(v) if v.kind() == pb::ObjectKind::Snapshot => Err(DaemonError::SpecIsSnapshot {
            name: name.into(),
            pool: v.pool,
        }),
        Some(v) => {
            if v.size_bytes != size_bytes {
                tracing::warn!(
                    volume = name,
                    size_bytes = v.size_bytes,
                    requested_bytes = size_bytes,
                    "volume exists with another size; using it as it is (grow it with cairnctl)"
                );
            }
            Ok(())
        }
        None => {
            node.create_volume(name, size_bytes, "pool0", Vec::new())
                .map_err(spec)?;
            tracing::info!(volume = name, size_bytes, "volume created");
            Ok(())
        }
    }
}

/// Opens a pool's device exclusively. A pool in a regular file is made owner-only first
/// (a device node's mode is the system's to manage, and stays).
fn open_locked(name: &str, path: &Path) -> Result<Arc<UringBdev>, DaemonError> {
    if std::fs::metadata(path).is_ok_and(|m| m.is_file()) {
        owner_only::enforce(path, owner_only::FILE_MODE).map_err(|source| {
            DaemonError::PoolMode {
                path: path.display().to_string(),
                source,
            }
        })?;
    }
    let options = UringOptions {
        exclusive: true,
        ..UringOptions::default()
    };
    UringBdev::open(name, path, options)
        .map(Arc::new)
        .map_err(|source| DaemonError::PoolDevice {
            path: path.display().to_string(),
            source,
        })
}

/// A pool with the control of its fault bdev when fault injection is on.
type OpenedPool = (Pool, Option<Arc<FaultControl>>);

fn open_pool(
    node: &Node,
    name: &str,
    path: &Path,
    home: CoreId,
) -> Result<OpenedPool, DaemonError> {
    let (base, fault) = node.faultable(name, open_locked(name, path)?);
    let pool = Pool::open(node.engine(), name, base, home).map_err(|source| DaemonError::Pool {
        path: path.display().to_string(),
        source,
    })?;
    Ok((pool, fault))
}

/// Opens `DATA_DIR/pool0.img`, or creates it: formatted under a temporary name and renamed
/// into place, so a crash mid-format never leaves a `pool0.img` that is not a pool.
fn open_pool0(node: &Node, config: &NodeConfig, home: CoreId) -> Result<OpenedPool, DaemonError> {
    let path = config.data_dir.join(POOL0_FILE);
    if path.exists() {
        return open_pool(node, "pool0", &path, home);
    }
    let dir_err = |source| DaemonError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    };
    let size = pool0_size(&config.data_dir, config.pool0_size_bytes())?;
    let tmp = config.data_dir.join(format!("{POOL0_FILE}.new"));
    // A leftover from a crash mid-format is not a pool; the lock below refuses to take it
    // from a process still formatting it.
    if tmp.exists() {
        let stale = open_locked("pool0", &tmp)?;
        drop(stale);
        std::fs::remove_file(&tmp).map_err(dir_err)?;
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(owner_only::FILE_MODE)
        .open(&tmp)
        .map_err(dir_err)?;
    f.set_len(size).map_err(dir_err)?;
    drop(f);
    let (base, fault) = node.faultable("pool0", open_locked("pool0", &tmp)?);
    let pool = Pool::create(node.engine(), "pool0", base, home, CLUSTER_DEFAULT_BYTES).map_err(
        |source| DaemonError::Pool {
            path: tmp.display().to_string(),
            source,
        },
    )?;
    std::fs::rename(&tmp, &path).map_err(dir_err)?;
    std::fs::File::open(&config.data_dir)
        .and_then(|d| d.sync_all())
        .map_err(dir_err)?;
    tracing::info!(path = %path.display(), size_bytes = size, "created pool0");
    Ok((pool, fault))
}

/// `wanted`, capped by the free space of `dir` less [`POOL0_FREE_MARGIN_BYTES`].
fn pool0_size(dir: &Path, wanted: u64) -> Result<u64, DaemonError> {
    let free_bytes = free_space(dir).map_err(|source| DaemonError::DataDir {
        path: dir.display().to_string(),
        source,
    })?;
    let room = free_bytes.saturating_sub(POOL0_FREE_MARGIN_BYTES);
    let size = wanted.min(room) / POOL0_ROUND_BYTES * POOL0_ROUND_BYTES;
    if size < POOL0_SIZE_MIN_BYTES {
        return Err(DaemonError::NoRoom {
            path: dir.display().to_string(),
            free_bytes,
        });
    }
    if size < wanted {
        tracing::warn!(
            wanted_bytes = wanted,
            size_bytes = size,
            free_bytes,
            "{POOL0_FILE} capped by free space"
        );
    }
    Ok(size)
}

fn free_space(dir: &Path) -> std::io::Result<u64> {
    cairn_engine::sys::available_bytes(dir)
}

/// The one line humans and tests read to learn where the node listens.
fn announce(e: &Endpoints, replica: Option<&str>, exports: &[String]) {
    let or_dash = |s: Option<String>| s.unwrap_or_else(|| "-".into());
    let exports = if exports.is_empty() {
        "-".to_string()
    } else {
        exports.join(",")
    };
    let line = format!(
        "cairn-node ready nbd={} nbd_socket={} admin={} metrics={} replica={} exports={exports}",
        or_dash(e.nbd.map(|a| a.to_string())),
        or_dash(e.nbd_socket.as_ref().map(|p| p.display().to_string())),
        e.admin,
        e.metrics,
        replica.unwrap_or("-"),
    );
    tracing::info!("{line}");
    println!("{line}");
    use std::io::Write as _;
    drop(std::io::stdout().flush());
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Must run inside the runtime; from here on SIGTERM and SIGINT no longer kill the process.
    fn install() -> Result<Signals, DaemonError> {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).map_err(|source| DaemonError::Signal {
            signal: "SIGTERM",
            source,
        })?;
        let int = signal(SignalKind::interrupt()).map_err(|source| DaemonError::Signal {
            signal: "SIGINT",
            source,
        })?;
        Ok(Signals { term, int })
    }

    async fn recv(mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// The CSI node plugin and the socket it serves on.
type CsiServe = (
    tokio_stream::wrappers::UnixListenerStream,
    crate::csi::CsiNode,
);

/// Serves admin, metrics and CSI (when configured) until a signal, then stops them.
async fn serve(
    node: Arc<Node>,
    admin: std::net::TcpListener,
    metrics: std::net::TcpListener,
    csi: Option<CsiServe>,
    signals: Signals,
) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            drop(rx.wait_for(|s| *s).await);
        }
    };
    let admin = tokio::net::TcpListener::from_std(admin).expect("inside the runtime");
    let metrics = tokio::net::TcpListener::from_std(metrics).expect("inside the runtime");
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = node.tls() {
        match server.tls_config(crate::admin::server_tls(tls)) {
            Ok(s) => server = s,
            Err(e) => {
                tracing::error!(error = %e, "admin API TLS configuration");
                return;
            }
        }
    }
    let admin_task = tokio::spawn(
        server
            .add_service(crate::admin::Authorised::new(
                AdminService::new(node.clone()).into_server(),
                node.tls().is_some(),
            ))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(admin),
                stopped(),
            ),
    );
    let metrics_task = tokio::spawn(crate::metrics::serve(metrics, node, stopped()));
    let csi_task = csi.map(|(incoming, plugin)| {
        let (identity, node) = plugin.into_services();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(identity)
                .add_service(node)
                .serve_with_incoming_shutdown(incoming, stopped()),
        )
    });
    let signal = signals.recv().await;
    tracing::info!(signal, "shutting down");
    stop_tx.send_replace(true);
    let abort = admin_task.abort_handle();
    match tokio::time::timeout(ADMIN_DRAIN_TIMEOUT, admin_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::error!(error = %e, "admin server failed"),
        Ok(Err(e)) => tracing::error!(error = %e, "admin server task failed"),
        Err(_) => {
            tracing::info!(
                "admin clients still connected after {ADMIN_DRAIN_TIMEOUT:?}; closing them"
            );
            abort.abort();
        }
    }
    drop(metrics_task.await);
    if let Some(t) = csi_task {
        // A stage runs on a blocking thread and finishes on its own; the server only waits
        // for calls in flight.
        match tokio::time::timeout(ADMIN_DRAIN_TIMEOUT, t).await {
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "CSI server failed"),
            Ok(Err(e)) => tracing::error!(error = %e, "CSI server task failed"),
            _ => {}
        }
    }
}

/// The shutdown order after the listeners are closed; true when everything closed cleanly.
fn teardown(node: Arc<Node>, runtime: tokio::runtime::Runtime) -> bool {
    let clean = node.shutdown();
    // Blocking admin operations still running hold the node; give them time to finish.
    runtime.shutdown_timeout(ADMIN_DRAIN_TIMEOUT);
    let engine = match Arc::try_unwrap(node) {
        Ok(node) => node.into_engine(),
        Err(_) => {
            tracing::error!("an admin operation still holds the node; the engine stops on exit");
            return false;
        }
    };
    match Arc::try_unwrap(engine) {
        Ok(engine) => {
            engine.stop();
            tracing::info!("engine stopped");
            clean
        }
        Err(_) => {
            tracing::error!("the engine is still shared; it stops on exit");
            false
        }
    }
}
