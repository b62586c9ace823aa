//! cairn-control: the control process. See `cairn-control --help` and docs/control.md.
//!
//! Opens the store (the embedded one in `--data-dir`, or etcd with `--etcd`), then runs four
//! things until SIGTERM or SIGINT: the REST API on `--listen`, the leader election, and, while
//! this process leads, the monitor that marks nodes down when their lease expires and the
//! reconcile loop that brings the nodes to the volume records; with `--csi-endpoint`, the CSI
//! Identity and Controller services on that unix socket too. A start-up
//! failure (a taken port, a data directory in use, an unreachable etcd) exits 1 naming it.

use anyhow::{Context, Result};
use cairn_control::election::{stopped, Election};
use cairn_control::membership::{Membership, MONITOR_INTERVAL, NODE_LEASE_TTL_S};
use cairn_control::reconcile::{NodeClients, Reconciler};
use cairn_control::rereplicate::{Counters, REPLICA_FORGET_DEFAULT_S, REPLICA_GRACE_DEFAULT_S};
use cairn_control::rest::{router, App};
use cairn_control::store::embedded::EmbeddedStore;
use cairn_control::store::etcd::EtcdStore;
use cairn_control::store::AnyStore;
use cairn_control::volume::Volumes;
use cairn_control_api::{LeaderInfo, CONTROL_LISTEN_DEFAULT};
use clap::Parser;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use tokio::sync::watch;

/// Worker threads of the runtime: control traffic is light (a heartbeat per node every
/// 500 ms), and the embedded store's disk writes run on the blocking pool.
const WORKER_THREADS: usize = 2;

#[derive(Parser)]
#[command(
    name = "cairn-control",
    version,
    about = "Cairn's control process: cluster state, membership, placement, volumes and (later) failover",
    after_help = "Examples:\n  cairn-control --data-dir ./cairn-control\n  \
                  cairn-control --data-dir ./cc --listen 0.0.0.0:10800 --etcd http://10.0.0.2:2379 \\\n    \
                  --tls-ca ./ca/control-c1/ca-cert.pem --tls-cert ./ca/control-c1/cert.pem \
                  --tls-key ./ca/control-c1/key.pem   # cairnctl cert issue ./ca --control c1 --addr 10.0.0.2"
)]
struct Cli {
    /// Where the embedded store keeps its file (and its lock: one process per directory).
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf,
    /// The REST API's address (port 0 picks a free one; the start-up line names it). Beyond
    /// loopback it needs TLS (--tls-*) or --insecure.
    #[arg(long, value_name = "ADDR:PORT", default_value = CONTROL_LISTEN_DEFAULT)]
    listen: SocketAddr,
    /// Keep the cluster state in etcd (comma-separated endpoints) instead of the embedded
    /// store; several cairn-control processes may then run, and one is leader. `https://`
    /// endpoints are reached over mutual TLS with the --etcd-* files; with TLS configured
    /// (--tls-*), plain `http://` beyond loopback needs --insecure.
    #[arg(long, value_name = "URL")]
    etcd: Option<String>,
    /// For tests: record decisions but never act on them (no reconcile loop), so a test can
    /// kill the process between a recorded command and the node calls.
    #[arg(long, hide = true)]
    no_reconcile: bool,
    /// How long a replica's node may be down before the replica is replaced by a new one on
    /// another node (a node back sooner is resynced instead).
    #[arg(long, value_name = "SECONDS", default_value_t = REPLICA_GRACE_DEFAULT_S)]
    replica_grace: u64,
    /// How long the node of a replaced replica may stay down before the replica's `deleting`
    /// entry is dropped from the record (should the node come back later, its copy is deleted
    /// as an orphan).
    #[arg(long, value_name = "SECONDS", default_value_t = REPLICA_FORGET_DEFAULT_S)]
    replica_forget: u64,
    /// Serve the CSI Identity and Controller services (driver csi.cairn.io) on this unix
    /// socket; a stale socket file is replaced, and the socket is made mode 0600.
    #[arg(long, value_name = "unix:///PATH")]
    csi_endpoint: Option<String>,
    /// The cluster CA's certificate (PEM). With --tls-cert and --tls-key (all three or none),
    /// the REST API is served over mutual TLS (https) and the nodes' admin APIs are reached
    /// over it: a peer without a certificate from this CA is refused in the handshake.
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// This process's certificate (PEM), naming control:NAME (`cairnctl cert issue`).
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// This process's private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The CA that etcd's certificate and cairn-control's etcd client certificate come from
    /// (PEM). With --etcd-cert and --etcd-key (all three or none), `https://` etcd endpoints
    /// are reached over mutual TLS. Use a CA of etcd's own (`cairnctl cert init ./etcd-ca`):
    /// etcd grants every certificate it trusts full access, so the cluster CA, which also
    /// certifies every node, would let a node write the cluster state (docs/security.md).
    #[arg(long, value_name = "FILE")]
    etcd_ca: Option<PathBuf>,
    /// cairn-control's client certificate for etcd (PEM), from the --etcd-ca CA.
    #[arg(long, value_name = "FILE")]
    etcd_cert: Option<PathBuf>,
    /// The private key of --etcd-cert (PEM).
    #[arg(long, value_name = "FILE")]
    etcd_key: Option<PathBuf>,
    /// Listen beyond loopback without TLS, accepting unauthenticated clients (refused at
    /// start otherwise).
    #[arg(long)]
    insecure: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cairn-control: error: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairn-control: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_logging() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

async fn open_store(cli: &Cli, cluster_tls: bool) -> Result<AnyStore> {
    let etcd_tls = cairn_tls::TlsFiles::from_flags(
        cli.etcd_ca.clone(),
        cli.etcd_cert.clone(),
        cli.etcd_key.clone(),
    )
    .context("--etcd-ca, --etcd-cert, --etcd-key")?
    .map(|files| cairn_tls::Tls::load(&files))
    .transpose()
    .context("loading the etcd TLS files")?;
    Ok(match &cli.etcd {
        Some(url) => AnyStore::Etcd(Box::new(
            EtcdStore::connect(url, etcd_tls.as_ref(), cluster_tls && !cli.insecure)
                .await
                .with_context(|| format!("connecting to etcd at {url}"))?,
        )),
        None => AnyStore::Embedded(EmbeddedStore::open(&cli.data_dir)?),
    })
}

async fn run(cli: Cli) -> Result<()> {
    // Installed first: from here on SIGTERM and SIGINT stop the process cleanly.
    let signals = Signals::install()?;
    let tls = cairn_tls::TlsFiles::from_flags(
        cli.tls_ca.clone(),
        cli.tls_cert.clone(),
        cli.tls_key.clone(),
    )?
    .map(|files| cairn_tls::Tls::load(&files))
    .transpose()?;
    cairn_tls::check_listener(
        "--listen",
        &cli.listen.to_string(),
        tls.is_some(),
        cli.insecure,
    )?;
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("binding --listen {}", cli.listen))?;
    let addr = listener
        .local_addr()
        .context("reading the listener's address")?;
    let store = Arc::new(open_store(&cli, tls.is_some()).await?);
    let scheme = if tls.is_some() { "https" } else { "http" };
    let me = LeaderInfo {
        id: format!("{}@{addr}", cairn_control_api::hostname()),
        listen: format!("{scheme}://{addr}"),
    };
    let election = Arc::new(Election::new(store.clone(), me.clone()));
    let clients = Arc::new(NodeClients::new(tls.as_ref()));
    let volumes = Volumes::new(store.clone(), election.clone());
    let rereplication = Arc::new(Counters::default());
    let reconciler = Reconciler::new(
        store.clone(),
        election.clone(),
        clients.clone(),
        volumes.kick.clone(),
        std::time::Duration::from_secs(cli.replica_grace),
        std::time::Duration::from_secs(cli.replica_forget),
        rereplication.clone(),
    );
    let failovers = reconciler.failovers();
    let app = Arc::new(App {
        membership: Membership::new(store.clone(), NODE_LEASE_TTL_S),
        election: election.clone(),
        store: store.clone(),
        insync_reports: AtomicU64::new(0),
        failovers,
        volumes,
        clients,
        rereplication,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let csi_task = match &cli.csi_endpoint {
        Some(endpoint) => Some(start_csi(endpoint, app.clone(), stop_rx.clone())?),
        None => None,
    };
    let election_task = tokio::spawn(election.run(stop_rx.clone()));
    let reconcile_task = (!cli.no_reconcile).then(|| tokio::spawn(reconciler.run(stop_rx.clone())));
    let monitor_task = tokio::spawn(monitor(app.clone(), stop_rx));
    let line = format!(
        "cairn-control listening on {scheme}://{addr} (store: {}, id {})",
        store.describe(),
        me.id
    );
    tracing::info!("{line}");
    println!("{line}");
    use std::io::Write as _;
    drop(std::io::stdout().flush());
    if let Some(tls) = &tls {
        tracing::info!(identity = %tls.identity(), "mutual TLS on the REST API and the node links");
    }
    let listener = cairn_control::https::RestListener::new(listener, tls.as_ref())
        .context("starting the REST listener")?;
    axum::serve(
        listener,
        router(app).into_make_service_with_connect_info::<cairn_control::https::Peer>(),
    )
    .with_graceful_shutdown(async move {
        let signal = signals.recv().await;
        tracing::info!(signal, "shutting down");
        stop_tx.send_replace(true);
    })
    .await
    .context("serving the REST API")?;
    drop(monitor_task.await);
    if let Some(t) = reconcile_task {
        drop(t.await);
    }
    drop(election_task.await);
    if let Some(t) = csi_task {
        t.await.context("the CSI server task")??;
    }
    Ok(())
}

/// Binds the CSI endpoint and serves Identity and Controller on it until `stop`; the task
/// removes the socket file when it ends.
fn start_csi(
    endpoint: &str,
    app: Arc<App>,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<Result<()>>> {
    let path = cairn_csi::endpoint_path(endpoint)?;
    let incoming = cairn_csi::bind(&path)?;
    let line = format!(
        "cairn-control serving CSI ({}) on {endpoint}",
        cairn_csi::DRIVER_NAME
    );
    tracing::info!("{line}");
    println!("{line}");
    Ok(tokio::spawn(async move {
        let served = cairn_control::csi::serve(app, incoming, async move {
            stopped(&mut stop).await;
        })
        .await;
        drop(std::fs::remove_file(&path));
        served.with_context(|| format!("serving CSI on {}", path.display()))
    }))
}

/// Marks nodes down while this process leads.
async fn monitor(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(MONITOR_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stopped(&mut stop) => return,
        }
        let Some(term) = app.election.current() else {
            continue;
        };
        if let Err(e) = app.membership.mark_expired(term).await {
            tracing::warn!(error = %e, "checking node leases");
        }
    }
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn recv(mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
