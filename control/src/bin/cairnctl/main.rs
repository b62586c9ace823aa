//! cairnctl: Cairn's command line. `cairnctl node …` talks to one cairn-node's admin API
//! (gRPC), the way SPDK's rpc.py talks to one target; `cairnctl node ls` asks the control
//! process (REST, `--control URL`) for the cluster's nodes, and `cairnctl volume …` creates,
//! attaches and manages replicated volumes through it (docs/control.md).
//!
//! Output is an aligned table by default and JSON with `--json`. An error from the node
//! prints its status code and message (which names the object) and exits 1; so does
//! `nexus verify` when the replicas differ, after printing what it compared. `cairnctl csi …`
//! makes one CSI call to a plugin's socket (csi.rs). `cairnctl cert …` makes a cluster CA
//! and certificates, and `--tls-*` make cairnctl's links mutual TLS (tls.rs).

mod csi;
mod tls;

use anyhow::{Context, Result};
use cairn_control::proto::{self as pb, node_admin_client::NodeAdminClient};
use cairn_control::table::Table;
use cairn_control::units::{human_size, parse_size};
use cairn_control_api::client::Client as ControlClient;
use cairn_control_api::{NodeView, RebuildView, ReplicaHealth, VolumeView};
use clap::{ArgGroup, Args, Parser, Subcommand};
use std::process::ExitCode;
use std::time::Duration;
use tonic::transport::Channel;

/// How long one request to the control process may take.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `volume create`, `attach`, `clone` and `delete` wait for the reconcile loop to
/// carry the command out before they fail (the command stays recorded and is finished later).
const CONTROL_WAIT: Duration = Duration::from_secs(60);
/// How often those waits ask again.
const CONTROL_POLL: Duration = Duration::from_millis(200);
/// How often `volume inspect --watch` redraws.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Characters of the rebuild progress bar.
const PROGRESS_BAR_WIDTH: usize = 30;
/// How long cairnctl waits to connect to the node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one admin call may take (pool operations are durable when they return).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// The largest `--latency-ms` whose microseconds (what the API takes) fit in a u64.
const LATENCY_MS_MAX: u64 = u64::MAX / 1000;
/// The replica state that counts towards a nexus's in-sync set.
const IN_SYNC: &str = "in-sync";

const NEXUS_CREATE_HELP: &str = "\
Each replica is the volume NAME on its node: `local` is this node's, HOST:PORT is another
node's replica server (cairn-node --replica-listen, port 10820 by default). Those volumes
must exist (cairn-node --replica-volume NAME:SIZE makes them). Only the replicas with the
highest data generation are trusted; the others are rebuilt from them in full before they
serve. Replicas that another nexus opened (they carry a fence) are refused unless
--takeover says this nexus takes them over (after that nexus's node failed).

With --control-volume the nexus keeps that volume's durable in-sync record at the node's
--control process: every removal from the in-sync set is recorded before the writes that the
removed replica missed are acknowledged (they wait while the control process is unreachable).
--trusted (the record's in-sync replicas) and --min-generation (its generation) limit the
sources to the replicas the record trusts; if none qualifies the create is refused.

Examples:
  cairnctl node nexus create pg --replica local --replica 10.0.0.6:10820 --min-in-sync 2
  cairnctl node nexus create pg --replica local --replica 10.0.0.6:10820 \\
      --replica 10.0.0.7:10820 --region-size 4M --rebuild-rate 100M --epoch 8
  cairnctl node nexus create pg --replica 10.0.0.6:10820 --replica 10.0.0.7:10820 --takeover
  cairnctl node nexus create pg --replica local --replica 10.0.0.7:10820 --takeover \\
      --control-volume pg --trusted 10.0.0.7:10820 --min-generation 12";

const NEXUS_VERIFY_HELP: &str = "\
Exit status: 0 when every region is identical on all in-sync replicas, 1 when any region
differs (each mismatched region is printed with the replicas that agree with the source, the
replica the nexus trusts, and those that differ) or the check fails. With --repair, the
replicas that differ leave the in-sync set and have those regions rewritten from the source
(watch `nexus show`). Run it on a quiet volume.";

const VOLUME_HELP: &str = "\
Examples:
  cairnctl volume create pg --size 10G --replicas 3
  cairnctl volume attach pg --node n1        # prints nbd://HOST:PORT/pg
  cairnctl volume inspect pg --json
  cairnctl volume inspect pg --watch         # a progress bar while a replica rebuilds
  cairnctl volume detach pg
  cairnctl volume snapshot pg monday
  cairnctl volume clone pg monday pg-test
  cairnctl volume grow pg --size 20G
  cairnctl volume delete pg-test
  cairnctl volume ls --control http://10.0.0.2:10800";

const AFTER_HELP: &str = "\
Examples:
  cairnctl node pool ls
  cairnctl node volume create pg 10G
  cairnctl node export add pg
  cairnctl node snapshot create pg pg-monday
  cairnctl node snapshot clone pg-monday pg-test     # a writable volume from a snapshot
  cairnctl node export add pg-monday --read-only
  cairnctl node volume grow pg 20G
  cairnctl node nexus create pg --replica local --replica 10.0.0.6:10820
  cairnctl node export add pg --nexus
  cairnctl node --json stats
  cairnctl node --addr 10.0.0.5:10810 volume ls
  cairnctl node ls --control http://10.0.0.2:10800   # the cluster's nodes, from cairn-control";

#[derive(Parser)]
#[command(
    name = "cairnctl",
    version,
    about = "Cairn's command line",
    after_help = AFTER_HELP
)]
struct Cli {
    #[command(flatten)]
    tls: tls::TlsArgs,
    #[command(subcommand)]
    cmd: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Low-level commands to one cairn-node over its admin API.
    Node(NodeArgs),
    /// Replicated volumes, placed and kept by the control process (over its REST API).
    Volume(ClusterVolumeArgs),
    /// One CSI call to a plugin's socket, as kubelet and the CSI sidecars make them.
    Csi(csi::CsiArgs),
    /// A cluster CA and the certificates of its nodes, control processes and operators.
    Cert(tls::CertArgs),
}

#[derive(Args)]
#[command(after_help = VOLUME_HELP)]
struct ClusterVolumeArgs {
    /// The control process [default: http://127.0.0.1:10800, https:// with TLS].
    #[arg(long, global = true, value_name = "URL")]
    control: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: ClusterVolumeCmd,
}

#[derive(Subcommand)]
enum ClusterVolumeCmd {
    /// Create a replicated volume (the same command again is a no-op); waits until every
    /// replica exists.
    Create {
        name: String,
        /// Like 10G; a multiple of 4096 bytes.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// 1 to 3, each on its own node.
        #[arg(long, default_value_t = 1)]
        replicas: u32,
        /// Only nodes of this zone hold replicas.
        #[arg(long)]
        zone: Option<String>,
    },
    /// Every volume with its replicas and attach point.
    Ls,
    /// One volume: replicas and their health, the attach point, the epoch.
    Inspect {
        name: String,
        /// Follow a rebuild with a progress bar until every replica is in sync.
        #[arg(long)]
        watch: bool,
    },
    /// Open the volume's nexus on a node and print its NBD URI.
    Attach {
        name: String,
        /// The node (default: an up node holding a replica).
        #[arg(long)]
        node: Option<String>,
        /// If the attach node is lost, fail over to this replica node first (when it is up
        /// and in sync; else to the first replica node that is).
        #[arg(long, value_name = "NODE")]
        failover_to: Option<String>,
    },
    /// Close the volume's nexus.
    Detach { name: String },
    /// Snapshot a detached volume on each replica.
    Snapshot { name: String, snapshot: String },
    /// A new volume from a snapshot, on the same nodes.
    Clone {
        name: String,
        snapshot: String,
        new_name: String,
    },
    /// Grow a detached volume.
    Grow {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Delete a detached volume, its replicas and snapshots; waits until they are gone.
    Delete { name: String },
}

#[derive(Args)]
#[command(after_help = AFTER_HELP)]
struct NodeArgs {
    /// The node's admin API.
    #[arg(
        long,
        global = true,
        default_value = "127.0.0.1:10810",
        value_name = "HOST:PORT"
    )]
    addr: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: NodeCmd,
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Pools: the local disks or files volumes live in.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Thin volumes (`ls` shows snapshots too; `delete` removes either).
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Frozen copies of a volume, and writable clones of them.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// NBD exports: which volumes, snapshots and RAM bdevs clients can attach.
    #[command(subcommand)]
    Export(ExportCmd),
    /// Nexuses: replicated volumes over replicas on this node and on replica servers.
    #[command(subcommand)]
    Nexus(NexusCmd),
    /// This node's volumes as replicas: epoch fence, data generation, assigned opener.
    #[command(subcommand)]
    Replica(ReplicaCmd),
    /// Test instrument: latency or errors on a pool's device or a RAM bdev.
    #[command(subcommand)]
    Fault(FaultCmd),
    /// Per-export counters and latency, per-reactor busy and idle time.
    Stats,
    /// The cluster's nodes as the control process sees them (over its REST API, not the
    /// node admin API): state, failure domain, addresses, free capacity, heartbeat age.
    Ls {
        /// The control process [default: http://127.0.0.1:10800, https:// with TLS].
        #[arg(long, value_name = "URL")]
        control: Option<String>,
    },
}

#[derive(Subcommand)]
enum PoolCmd {
    /// List pools with their size and free space.
    Ls,
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// List volumes and snapshots.
    Ls {
        #[arg(long)]
        pool: Option<String>,
    },
    /// Create a thin volume of SIZE (like 10G).
    Create {
        name: String,
        #[arg(value_parser = parse_size)]
        size: u64,
        /// Pool to create it in [default: the first].
        #[arg(long)]
        pool: Option<String>,
        /// A label KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
    /// Delete a volume or snapshot (refused while exported: `export remove` it first).
    Delete {
        name: String,
        #[arg(long)]
        pool: Option<String>,
    },
    /// Grow a volume to SIZE, online if exported (shrinking is refused).
    Grow {
        name: String,
        #[arg(value_parser = parse_size)]
        size: u64,
        #[arg(long)]
        pool: Option<String>,
    },
}

#[derive(Subcommand)]
enum SnapshotCmd {
    /// Snapshot VOLUME as NAME.
    Create {
        volume: String,
        name: String,
        #[arg(long)]
        pool: Option<String>,
    },
    /// List snapshots.
    Ls {
        #[arg(long)]
        pool: Option<String>,
    },
    /// Make NAME, a writable volume sharing SNAPSHOT's data (copy on write).
    Clone {
        snapshot: String,
        name: String,
        #[arg(long)]
        pool: Option<String>,
    },
}

#[derive(Subcommand)]
enum ExportCmd {
    /// List exports with connections and traffic.
    Ls,
    /// Export a volume, snapshot (always read-only), RAM bdev or nexus (`--nexus`) NAME over
    /// NBD.
    Add {
        name: String,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        /// Export name clients use [default: NAME].
        #[arg(long = "as", value_name = "EXPORT")]
        export_name: Option<String>,
        #[arg(long)]
        pool: Option<String>,
        /// Export the nexus NAME, not the volume NAME (which would bypass replication).
        #[arg(long, conflicts_with = "pool")]
        nexus: bool,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Stop exporting EXPORT (its clients' in-flight requests are answered first).
    Remove { export_name: String },
}

/// Encryption at rest (docs/encryption.md): the key is read here and sent to the node, which
/// keeps it in memory only.
#[derive(clap::Args)]
struct KeyArgs {
    /// Serve the export encrypted (AES-256-XTS) with the key in FILE: 64 raw bytes or 128 hex
    /// digits. A never-written volume is set up for it; a wrong key is refused.
    #[arg(long, value_name = "FILE", conflicts_with = "key_env")]
    key_file: Option<std::path::PathBuf>,
    /// Like --key-file, with the key (128 hex digits) in environment variable VAR, e.g.
    /// CAIRN_VOLUME_KEY.
    #[arg(long, value_name = "VAR")]
    key_env: Option<String>,
}

impl KeyArgs {
    /// The key's bytes as given (the node parses them), or empty for a plain export.
    fn bytes(&self) -> Result<Vec<u8>> {
        if let Some(path) = &self.key_file {
            return std::fs::read(path)
                .with_context(|| format!("reading key file {}", path.display()));
        }
        if let Some(var) = &self.key_env {
            let v = std::env::var(var)
                .with_context(|| format!("key variable {var} is not set (or not UTF-8)"))?;
            return Ok(v.into_bytes());
        }
        Ok(Vec::new())
    }
}

#[derive(Subcommand)]
enum ReplicaCmd {
    /// List every volume of this node as a replica: its fence, generation and opener.
    Ls,
    /// Show the replica NAME (the volume NAME on this node).
    Show { name: String },
    /// Assign the replica NAME to the node whose nexus alone may open it.
    #[command(after_help = REPLICA_ASSIGN_HELP)]
    Assign {
        name: String,
        /// The node id (its certificate's node:ID).
        #[arg(long, value_name = "NODE_ID", required_unless_present = "any")]
        opener: Option<String>,
        /// Clear the assignment: any node of the cluster may open it again.
        #[arg(long, conflicts_with = "opener")]
        any: bool,
    },
}

const REPLICA_ASSIGN_HELP: &str = "\
The control process assigns every replica of a volume to its attach node before it creates
the nexus there, so an operator needs this only for nexuses made by hand. The replica server
checks it only over TLS: on a plain link (--insecure) it has no certificate to read the node
from, and any peer may open the replica. Stored durably on this node; a connection already
open is not cut.";

#[derive(Subcommand)]
enum NexusCmd {
    /// Create nexus NAME over replicas of the volume NAME.
    #[command(after_help = NEXUS_CREATE_HELP)]
    Create(NexusCreate),
    /// Destroy nexus NAME (refused while exported: `export remove` it first).
    Destroy { name: String },
    /// List nexuses with their state and in-sync replicas.
    Ls,
    /// Show nexus NAME: its settings, its replicas and any running resync or rebuild.
    Show { name: String },
    /// Add replica ADDR to nexus NAME; it is rebuilt in full, online, then joins the in-sync set.
    Add {
        name: String,
        /// `local` or HOST:PORT of a replica server.
        #[arg(value_name = "ADDR", value_parser = parse_replica)]
        replica: String,
    },
    /// Remove replica ADDR from nexus NAME (refused when too few in-sync replicas would stay).
    Remove {
        name: String,
        #[arg(value_name = "ADDR", value_parser = parse_replica)]
        replica: String,
    },
    /// Re-open every replica of nexus NAME under a new, higher epoch.
    Promote { name: String },
    /// Compare the in-sync replicas of nexus NAME region by region (crc32c).
    #[command(after_help = NEXUS_VERIFY_HELP)]
    Verify {
        name: String,
        /// Rewrite the regions of replicas that differ from the source.
        #[arg(long)]
        repair: bool,
    },
}

#[derive(Args)]
struct NexusCreate {
    /// The nexus, and the volume it replicates: every replica is the volume NAME on its node.
    name: String,
    /// A replica: `local` or HOST:PORT of a replica server (repeat for 2 or 3).
    #[arg(
        long = "replica",
        value_name = "ADDR",
        required = true,
        value_parser = parse_replica
    )]
    replicas: Vec<String>,
    /// Writes fail rather than go on with fewer in-sync replicas [default: 1].
    #[arg(long, value_name = "N")]
    min_in_sync: Option<u32>,
    /// Region size of the unflushed maps and of verify, a power of two from 4K to 1G
    /// [default: 64K]. What a replica missed is tracked per 4 KiB block whatever this is.
    #[arg(long = "region-size", value_name = "SIZE", value_parser = parse_size)]
    region_bytes: Option<u64>,
    /// A replica slower than this to answer is faulted [default: 5000].
    #[arg(long, value_name = "MS")]
    io_timeout_ms: Option<u64>,
    /// Resync and rebuild copy limit in bytes per second, like 100M [default: unlimited].
    #[arg(long = "rebuild-rate", value_name = "SIZE_PER_S", value_parser = parse_size)]
    rebuild_bytes_per_s: Option<u64>,
    /// Open at this epoch or above; it is raised past every fence met anyway [default: 1].
    #[arg(long, value_name = "N")]
    epoch: Option<u64>,
    /// Take over replicas that another nexus opened (they carry a fence); refused without it.
    #[arg(long)]
    takeover: bool,
    /// Keep volume NAME's durable in-sync record: report every change of the in-sync set to
    /// the node's --control process, and hold write acknowledgements until each removal is
    /// recorded (refused if the node has no --control).
    #[arg(long, value_name = "NAME")]
    control_volume: Option<String>,
    /// A replica the in-sync record names in sync (`local` or HOST:PORT, as given to
    /// --replica; repeat): only these may be sources, any other is rebuilt in full.
    #[arg(long = "trusted", value_name = "ADDR", value_parser = parse_replica)]
    trusted: Vec<String>,
    /// A replica holding a data generation below N is not a source either (the record's
    /// generation) [default: 0].
    #[arg(long, value_name = "N")]
    min_generation: Option<u64>,
}

impl NexusCreate {
    /// The request, with 0 (the node's default) for every option not given.
    fn into_request(self) -> pb::CreateNexusRequest {
        pb::CreateNexusRequest {
            name: self.name,
            replicas: self.replicas,
            min_in_sync: self.min_in_sync.unwrap_or(0),
            region_bytes: self.region_bytes.unwrap_or(0),
            io_timeout_ms: self.io_timeout_ms.unwrap_or(0),
            rebuild_bytes_per_s: self.rebuild_bytes_per_s.unwrap_or(0),
            epoch: self.epoch.unwrap_or(0),
            takeover: self.takeover,
            control_volume: self.control_volume.unwrap_or_default(),
            trusted: self.trusted,
            min_generation: self.min_generation.unwrap_or(0),
        }
    }
}

#[derive(Subcommand)]
enum FaultCmd {
    /// Slow down or fail requests to pool or RAM bdev NAME (needs cairn-node
    /// --fault-injection).
    #[command(group(ArgGroup::new("fault").required(true).multiple(true)))]
    Set {
        name: String,
        /// Add this latency to every request.
        #[arg(
            long,
            value_name = "MS",
            group = "fault",
            value_parser = clap::value_parser!(u64).range(..=LATENCY_MS_MAX)
        )]
        latency_ms: Option<u64>,
        /// Fail reads and writes with this errno (5 is EIO).
        #[arg(
            long,
            value_name = "N",
            group = "fault",
            value_parser = clap::value_parser!(i32).range(1..)
        )]
        fail_errno: Option<i32>,
        /// Clear every fault first; alone, it just clears them.
        #[arg(long, group = "fault")]
        heal: bool,
    },
}

/// A replica address as the API takes it: `local` or HOST:PORT (the node checks the rest).
fn parse_replica(s: &str) -> Result<String, String> {
    let host_port = s
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0));
    if s == "local" || host_port {
        Ok(s.to_string())
    } else {
        Err(format!("replica '{s}' is not 'local' or HOST:PORT"))
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label '{s}' is not KEY=VALUE"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let plain = |r: Result<()>| match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cairnctl: {e:#}");
            ExitCode::from(1)
        }
    };
    let tls = match &cli.cmd {
        Top::Csi(_) | Top::Cert(_) => None,
        Top::Node(n) => match cli.tls.load(matches!(n.cmd, NodeCmd::Ls { .. })) {
            Ok(t) => t,
            Err(e) => return plain(Err(e)),
        },
        Top::Volume(_) => match cli.tls.load(true) {
            Ok(t) => t,
            Err(e) => return plain(Err(e)),
        },
    };
    let args = match cli.cmd {
        Top::Node(args) => args,
        Top::Volume(args) => return plain(cluster_volume(&args, tls.as_ref())),
        Top::Csi(args) => return block_on(csi::run(args)),
        Top::Cert(args) => return plain(tls::cert(args)),
    };
    block_on(node(args, tls))
}

/// Runs a gRPC command on a one-thread runtime; an error prints the status code and message
/// (or the error chain) and exits 1.
fn block_on(command: impl std::future::Future<Output = Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cairnctl: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(s) => eprintln!("cairnctl: {:?}: {}", s.code(), s.message()),
                None => eprintln!("cairnctl: {e:#}"),
            }
            ExitCode::from(1)
        }
    }
}

async fn connect(addr: &str, tls: Option<&cairn_tls::Tls>) -> Result<NodeAdminClient<Channel>> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Channel::from_shared(format!("{scheme}://{addr}"))
        .with_context(|| format!("'{addr}' is not HOST:PORT"))?;
    if let Some(tls) = tls {
        endpoint = endpoint
            .tls_config(cairn_control::reconcile::client_tls(tls))
            .context("cairnctl's TLS configuration")?;
    }
    let endpoint = endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the cairn-node admin API at {addr}"))?;
    Ok(NodeAdminClient::new(channel))
}

async fn node(args: NodeArgs, tls: Option<cairn_tls::Tls>) -> Result<()> {
    if let NodeCmd::Ls { control } = &args.cmd {
        return node_ls(control.as_deref(), tls.as_ref(), args.json);
    }
    if let NodeCmd::Export(ExportCmd::Add { key, .. }) = &args.cmd {
        let has_key = key.key_file.is_some() || key.key_env.is_some();
        // A volume key must not cross a network in clear: beyond loopback it needs TLS.
        if has_key && tls.is_none() && !cairn_tls::is_loopback(&args.addr).unwrap_or(false) {
            anyhow::bail!(
                "refusing to send an encryption key to {} over a plain connection: give \
                 --tls-dir (or --tls-ca/--tls-cert/--tls-key), or run cairnctl on that node",
                args.addr
            );
        }
    }
    let mut c = connect(&args.addr, tls.as_ref()).await?;
    let json = args.json;
    match args.cmd {
        NodeCmd::Pool(PoolCmd::Ls) => {
            let r = c.list_pools(pb::ListPoolsRequest {}).await?.into_inner();
            emit(json, &r.pools, || pools_table(&r.pools))
        }
        NodeCmd::Volume(cmd) => volume(&mut c, json, cmd).await,
        NodeCmd::Snapshot(cmd) => snapshot(&mut c, json, cmd).await,
        NodeCmd::Export(cmd) => export(&mut c, json, cmd).await,
        NodeCmd::Nexus(cmd) => nexus(&mut c, json, cmd).await,
        NodeCmd::Replica(cmd) => replica(&mut c, json, cmd).await,
        NodeCmd::Fault(FaultCmd::Set {
            name,
            latency_ms,
            fail_errno,
            heal,
        }) => {
            let req = pb::SetFaultRequest {
                name,
                latency_us: latency_ms.unwrap_or(0) * 1000,
                fail_errno: fail_errno.unwrap_or(0),
                heal,
            };
            let what = fault_summary(&req);
            c.set_fault(req).await?;
            done(json, &what)
        }
        NodeCmd::Stats => {
            let r = c.stats(pb::StatsRequest {}).await?.into_inner();
            emit(json, &r, || stats_table(&r))
        }
        NodeCmd::Ls { .. } => unreachable!("answered above, without the admin API"),
    }
}

/// `node ls`: GET /v1/nodes from the control process.
fn node_ls(control: Option<&str>, tls: Option<&cairn_tls::Tls>, json: bool) -> Result<()> {
    let control = &tls::control_url(control, tls);
    let client = ControlClient::new(control, CONTROL_TIMEOUT)?
        .with_tls(tls.map(cairn_tls::Tls::client_config))?;
    let resp = client
        .get("/v1/nodes")
        .with_context(|| format!("cannot reach the control process at {control}"))?;
    if resp.status != 200 {
        anyhow::bail!(
            "control process {control}: HTTP {}: {}",
            resp.status,
            resp.error_message()
        );
    }
    let nodes: Vec<NodeView> = serde_json::from_slice(&resp.body)
        .with_context(|| format!("control process {control} answered GET /v1/nodes with"))?;
    emit(json, &nodes, || nodes_table(&nodes))
}

/// The control process's REST API as `cairnctl volume` uses it.
struct Control {
    client: ControlClient,
    url: String,
}

impl Control {
    fn new(url: &str, tls: Option<&cairn_tls::Tls>) -> Result<Control> {
        Ok(Control {
            client: ControlClient::new(url, CONTROL_TIMEOUT)?
                .with_tls(tls.map(cairn_tls::Tls::client_config))?,
            url: url.to_string(),
        })
    }

    /// Sends the request; Ok(None) for 404, the error message for any other non-2xx.
    fn call(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Option<Vec<u8>>> {
        let resp = self
            .client
            .request(method, path, body)
            .with_context(|| format!("cannot reach the control process at {}", self.url))?;
        match resp.status {
            200..=299 => Ok(Some(resp.body)),
            404 if method == "GET" => Ok(None),
            status => anyhow::bail!("HTTP {status}: {}", resp.error_message()),
        }
    }

    fn volume(
        &self,
        method: &'static str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<VolumeView> {
        let body = body.map(|b| b.to_string().into_bytes());
        let raw = self
            .call(method, path, body.as_deref())?
            .ok_or_else(|| anyhow::anyhow!("{path}: not found"))?;
        serde_json::from_slice(&raw)
            .with_context(|| format!("control process answered {method} {path} with"))
    }

    fn inspect(&self, name: &str) -> Result<Option<VolumeView>> {
        match self.call("GET", &format!("/v1/volumes/{name}"), None)? {
            Some(raw) => Ok(Some(serde_json::from_slice(&raw)?)),
            None => Ok(None),
        }
    }

    /// Polls inspect until `done` holds, or fails after [`CONTROL_WAIT`] naming `what`.
    fn wait(
        &self,
        name: &str,
        what: &str,
        done: impl Fn(Option<&VolumeView>) -> bool,
    ) -> Result<Option<VolumeView>> {
        let start = std::time::Instant::now();
        loop {
            let v = self.inspect(name)?;
            if done(v.as_ref()) {
                return Ok(v);
            }
            if start.elapsed() > CONTROL_WAIT {
                anyhow::bail!(
                    "volume '{name}': {what} did not happen within {CONTROL_WAIT:?}; `cairnctl volume inspect {name}` shows where it is"
                );
            }
            std::thread::sleep(CONTROL_POLL);
        }
    }
}

/// `cairnctl volume …`: a command over REST, then (create, attach, delete) a wait until the
/// reconcile loop has carried it out.
fn cluster_volume(args: &ClusterVolumeArgs, tls: Option<&cairn_tls::Tls>) -> Result<()> {
    let c = Control::new(&tls::control_url(args.control.as_deref(), tls), tls)?;
    let json = args.json;
    let path = |name: &str, op: &str| format!("/v1/volumes/{name}{op}");
    match &args.cmd {
        ClusterVolumeCmd::Create {
            name,
            size,
            replicas,
            zone,
        } => {
            let body = serde_json::json!({"name": name, "size_bytes": size, "replicas": replicas, "zone": zone});
            c.volume("POST", "/v1/volumes", Some(body))?;
            let v = c.wait(name, "creating every replica", |v| {
                v.is_some_and(|v| v.replicas.iter().all(|r| r.placement == "created"))
            })?;
            let v = v.expect("waited for it");
            emit(json, &v, || volumes_table(std::slice::from_ref(&v)))
        }
        ClusterVolumeCmd::Ls => {
            let raw = c.call("GET", "/v1/volumes", None)?.unwrap_or_default();
            let list: Vec<VolumeView> = serde_json::from_slice(&raw)?;
            emit(json, &list, || volumes_table(&list))
        }
        ClusterVolumeCmd::Inspect { name, watch } => {
            let v = c
                .inspect(name)?
                .ok_or_else(|| anyhow::anyhow!("volume '{name}' does not exist"))?;
            if *watch {
                return watch_rebuild(&c, name);
            }
            emit(json, &v, || inspect_text(&v))
        }
        ClusterVolumeCmd::Attach {
            name,
            node,
            failover_to,
        } => {
            c.volume(
                "POST",
                &path(name, "/attach"),
                Some(serde_json::json!({"node": node, "failover_to": failover_to})),
            )?;
            let v = c.wait(name, "exporting the nexus", |v| {
                v.is_some_and(|v| v.attached.as_ref().is_some_and(|a| a.nbd_uri.is_some()))
            })?;
            let v = v.expect("waited for it");
            let uri = v
                .attached
                .as_ref()
                .and_then(|a| a.nbd_uri.clone())
                .unwrap_or_default();
            emit(json, &v, || format!("{uri}\n"))
        }
        ClusterVolumeCmd::Detach { name } => {
            let v = c.volume("POST", &path(name, "/detach"), None)?;
            emit(json, &v, || format!("volume {name} detached\n"))
        }
        ClusterVolumeCmd::Snapshot { name, snapshot } => {
            let v = c.volume(
                "POST",
                &path(name, "/snapshot"),
                Some(serde_json::json!({"name": snapshot})),
            )?;
            emit(json, &v, || {
                format!("snapshot {name}@{snapshot} recorded\n")
            })
        }
        ClusterVolumeCmd::Clone {
            name,
            snapshot,
            new_name,
        } => {
            let body = serde_json::json!({"snapshot": snapshot, "name": new_name});
            c.volume("POST", &path(name, "/clone"), Some(body))?;
            let v = c.wait(new_name, "creating every replica", |v| {
                v.is_some_and(|v| v.replicas.iter().all(|r| r.placement == "created"))
            })?;
            let v = v.expect("waited for it");
            emit(json, &v, || volumes_table(std::slice::from_ref(&v)))
        }
        ClusterVolumeCmd::Grow { name, size } => {
            let v = c.volume(
                "POST",
                &path(name, "/grow"),
                Some(serde_json::json!({"size_bytes": size})),
            )?;
            emit(json, &v, || volumes_table(std::slice::from_ref(&v)))
        }
        ClusterVolumeCmd::Delete { name } => {
            c.volume("DELETE", &path(name, ""), None)?;
            c.wait(name, "removing every replica", |v| v.is_none())?;
            done(json, &format!("volume {name} deleted"))
        }
    }
}

fn volumes_table(volumes: &[VolumeView]) -> String {
    let mut t = Table::new(&[
        "NAME",
        ">SIZE",
        ">REPLICAS",
        "NODES",
        "HEALTH",
        "ATTACHED",
        ">EPOCH",
    ]);
    for v in volumes {
        let in_sync = v
            .replicas
            .iter()
            .filter(|r| r.state == ReplicaHealth::InSync)
            .count();
        t.row(vec![
            v.name.clone(),
            human_size(v.size_bytes),
            v.replicas_wanted.to_string(),
            v.replicas
                .iter()
                .map(|r| r.node.as_str())
                .collect::<Vec<_>>()
                .join(","),
            if v.deleting {
                "deleting".into()
            } else {
                format!("{in_sync}/{} in sync", v.replicas.len())
            },
            v.attached
                .as_ref()
                .map_or_else(|| "-".into(), |a| a.node.clone()),
            v.epoch.to_string(),
        ]);
    }
    t.render()
}

fn inspect_text(v: &VolumeView) -> String {
    let mut s = format!(
        "volume {}: {} ({} bytes), {} replica(s){}, epoch {}{}\n",
        v.name,
        human_size(v.size_bytes),
        v.size_bytes,
        v.replicas_wanted,
        v.zone
            .as_ref()
            .map(|z| format!(" in zone {z}"))
            .unwrap_or_default(),
        v.epoch,
        if v.deleting { ", being deleted" } else { "" }
    );
    match &v.attached {
        Some(a) => {
            s += &format!(
                "attached: {} {}\n",
                a.node,
                a.nbd_uri.as_deref().unwrap_or("(nexus not exported yet)")
            );
            if let Some(hint) = &a.failover_to {
                s += &format!("failover to: {hint} first\n");
            }
        }
        None => s += "attached: -\n",
    }
    if let Some((vol, snap)) = &v.origin {
        s += &format!("clone of: {vol}@{snap}\n");
    }
    let mut t = Table::new(&["NODE", "STATE", "PLACEMENT", "ZONE", "RACK"]);
    for r in &v.replicas {
        let or_dash = |a: &Option<String>| a.clone().unwrap_or_else(|| "-".into());
        t.row(vec![
            r.node.clone(),
            r.state.as_str().into(),
            r.placement.clone(),
            or_dash(&r.zone),
            or_dash(&r.rack),
        ]);
    }
    s += &t.render();
    for snap in &v.snapshots {
        s += &format!("snapshot {}: on {}\n", snap.name, snap.nodes.join(", "));
    }
    if let Some(r) = &v.rebuild {
        s += &format!("{}\n", progress_bar(r));
    }
    s
}

/// One line: a bar, the percentage, bytes done of total, the rate and the time left.
fn progress_bar(r: &RebuildView) -> String {
    let frac = if r.total_bytes == 0 {
        0.0
    } else {
        (r.done_bytes as f64 / r.total_bytes as f64).clamp(0.0, 1.0)
    };
    let filled = (frac * PROGRESS_BAR_WIDTH as f64).round() as usize;
    format!(
        "rebuilding {} [{}{}] {:5.1}% {}/{} {}/s eta {:.0}s",
        r.replica,
        "#".repeat(filled),
        "-".repeat(PROGRESS_BAR_WIDTH - filled),
        frac * 100.0,
        human_size(r.done_bytes),
        human_size(r.total_bytes),
        human_size(r.bytes_per_s as u64),
        r.eta_s
    )
}

/// `inspect --watch`: a progress bar per poll while a replica rebuilds; returns once every
/// replica is in sync (or the volume is gone).
fn watch_rebuild(c: &Control, name: &str) -> Result<()> {
    use std::io::IsTerminal as _;
    let tty = std::io::stdout().is_terminal();
    loop {
        let Some(v) = c.inspect(name)? else {
            anyhow::bail!("volume '{name}' does not exist");
        };
        let line = match &v.rebuild {
            Some(r) => progress_bar(r),
            None => {
                let states: Vec<String> = v
                    .replicas
                    .iter()
                    .map(|r| format!("{} {}", r.node, r.state.as_str()))
                    .collect();
                states.join(", ")
            }
        };
        out(&format!(
            "{}{line}{}",
            if tty { "\r\x1b[K" } else { "" },
            if tty { "" } else { "\n" }
        ));
        if v.rebuild.is_none() && v.replicas.iter().all(|r| r.state == ReplicaHealth::InSync) {
            out(if tty {
                "\nevery replica is in sync\n"
            } else {
                "every replica is in sync\n"
            });
            return Ok(());
        }
        std::thread::sleep(WATCH_INTERVAL);
    }
}

fn nodes_table(nodes: &[NodeView]) -> String {
    let mut t = Table::new(&[
        "ID",
        "STATE",
        "ZONE",
        "RACK",
        "ADMIN",
        "REPLICA",
        "NBD",
        ">FREE",
        ">HEARTBEAT",
    ]);
    for n in nodes {
        let or_dash = |a: &Option<String>| a.clone().unwrap_or_else(|| "-".into());
        t.row(vec![
            n.id.clone(),
            n.state.as_str().into(),
            n.zone.clone(),
            n.rack.clone(),
            n.addresses.admin.clone(),
            or_dash(&n.addresses.replica),
            or_dash(&n.addresses.nbd),
            human_size(n.free_bytes),
            n.last_heartbeat_age_ms.map_or_else(
                || "-".into(),
                |ms| format!("{:.1}s ago", ms as f64 / 1000.0),
            ),
        ]);
    }
    t.render()
}

async fn volume(c: &mut NodeAdminClient<Channel>, json: bool, cmd: VolumeCmd) -> Result<()> {
    match cmd {
        VolumeCmd::Ls { pool } => {
            let r = list_volumes(c, pool).await?;
            emit_volumes(json, &r.volumes)
        }
        VolumeCmd::Create {
            name,
            size,
            pool,
            labels,
        } => {
            let req = pb::CreateVolumeRequest {
                name,
                size_bytes: size,
                pool: pool.unwrap_or_default(),
                labels: labels
                    .into_iter()
                    .map(|(key, value)| pb::Label { key, value })
                    .collect(),
            };
            let v = c.create_volume(req).await?.into_inner();
            emit_volume(json, v)
        }
        VolumeCmd::Delete { name, pool } => {
            let req = pb::DeleteVolumeRequest {
                name: name.clone(),
                pool: pool.unwrap_or_default(),
            };
            c.delete_volume(req).await?;
            done(json, &format!("deleted '{name}'"))
        }
        VolumeCmd::Grow { name, size, pool } => {
            let req = pb::GrowVolumeRequest {
                name,
                size_bytes: size,
                pool: pool.unwrap_or_default(),
            };
            let v = c.grow_volume(req).await?.into_inner();
            emit_volume(json, v)
        }
    }
}

async fn list_volumes(
    c: &mut NodeAdminClient<Channel>,
    pool: Option<String>,
) -> Result<pb::ListVolumesResponse> {
    let req = pb::ListVolumesRequest {
        pool: pool.unwrap_or_default(),
    };
    Ok(c.list_volumes(req).await?.into_inner())
}

async fn snapshot(c: &mut NodeAdminClient<Channel>, json: bool, cmd: SnapshotCmd) -> Result<()> {
    match cmd {
        SnapshotCmd::Create { volume, name, pool } => {
            let req = pb::CreateSnapshotRequest {
                volume,
                name,
                pool: pool.unwrap_or_default(),
            };
            let v = c.create_snapshot(req).await?.into_inner();
            emit_volume(json, v)
        }
        SnapshotCmd::Ls { pool } => {
            let mut r = list_volumes(c, pool).await?;
            r.volumes.retain(|v| v.kind() == pb::ObjectKind::Snapshot);
            emit_volumes(json, &r.volumes)
        }
        SnapshotCmd::Clone {
            snapshot,
            name,
            pool,
        } => {
            let req = pb::CreateCloneRequest {
                snapshot,
                name,
                pool: pool.unwrap_or_default(),
            };
            let v = c.create_clone(req).await?.into_inner();
            emit_volume(json, v)
        }
    }
}

async fn export(c: &mut NodeAdminClient<Channel>, json: bool, cmd: ExportCmd) -> Result<()> {
    match cmd {
        ExportCmd::Ls => {
            let r = c
                .list_exports(pb::ListExportsRequest {})
                .await?
                .into_inner();
            emit(json, &r.exports, || exports_table(&r.exports))
        }
        ExportCmd::Add {
            name,
            read_only,
            export_name,
            pool,
            nexus,
            key,
        } => {
            let req = pb::ExportRequest {
                name,
                pool: pool.unwrap_or_default(),
                export_name: export_name.unwrap_or_default(),
                read_only,
                nexus,
                encryption_key: key.bytes()?,
            };
            let e = c.export(req).await?.into_inner();
            emit(json, &e, || exports_table(std::slice::from_ref(&e)))
        }
        ExportCmd::Remove { export_name } => {
            c.unexport(pb::UnexportRequest {
                export_name: export_name.clone(),
            })
            .await?;
            done(json, &format!("unexported '{export_name}'"))
        }
    }
}

async fn replica(c: &mut NodeAdminClient<Channel>, json: bool, cmd: ReplicaCmd) -> Result<()> {
    let r = match cmd {
        ReplicaCmd::Ls => {
            let r = c
                .list_replicas(pb::ListReplicasRequest {})
                .await?
                .into_inner();
            return emit(json, &r.replicas, || replicas_table(&r.replicas));
        }
        ReplicaCmd::Show { name } => c.show_replica(pb::ShowReplicaRequest { name }).await?,
        ReplicaCmd::Assign { name, opener, .. } => {
            let req = pb::AssignReplicaRequest {
                name,
                opener: opener.unwrap_or_default(),
            };
            c.assign_replica(req).await?
        }
    }
    .into_inner();
    emit(json, &r, || replicas_table(std::slice::from_ref(&r)))
}

fn replicas_table(replicas: &[pb::ReplicaInfo]) -> String {
    let mut t = Table::new(&["NAME", ">EPOCH", ">GENERATION", "OPENER", "HOSTED"]);
    for r in replicas {
        t.row(vec![
            r.name.clone(),
            r.epoch.to_string(),
            format!("{}{}", r.generation, if r.clean { " clean" } else { "" }),
            if r.opener.is_empty() {
                "any node".to_string()
            } else {
                format!("node:{}", r.opener)
            },
            if r.hosted { "yes" } else { "no" }.to_string(),
        ]);
    }
    t.render()
}

async fn nexus(c: &mut NodeAdminClient<Channel>, json: bool, cmd: NexusCmd) -> Result<()> {
    let n = match cmd {
        NexusCmd::Create(args) => c.create_nexus(args.into_request()).await?,
        NexusCmd::Destroy { name } => {
            c.destroy_nexus(pb::DestroyNexusRequest { name: name.clone() })
                .await?;
            return done(json, &format!("destroyed nexus '{name}'"));
        }
        NexusCmd::Ls => {
            let r = c
                .list_nexuses(pb::ListNexusesRequest {})
                .await?
                .into_inner();
            return emit(json, &r.nexuses, || nexuses_table(&r.nexuses));
        }
        NexusCmd::Show { name } => c.show_nexus(pb::ShowNexusRequest { name }).await?,
        NexusCmd::Add { name, replica } => {
            let req = pb::AddReplicaRequest {
                nexus: name,
                replica,
            };
            c.add_replica(req).await?
        }
        NexusCmd::Remove { name, replica } => {
            let req = pb::RemoveReplicaRequest {
                nexus: name,
                replica,
            };
            c.remove_replica(req).await?
        }
        NexusCmd::Promote { name } => c.promote_nexus(pb::PromoteNexusRequest { name }).await?,
        NexusCmd::Verify { name, repair } => return verify(c, json, name, repair).await,
    }
    .into_inner();
    emit(json, &n, || nexus_text(&n))
}

/// Prints what `nexus verify` compared; replicas that differ are an error, so it exits 1.
async fn verify(
    c: &mut NodeAdminClient<Channel>,
    json: bool,
    name: String,
    repair: bool,
) -> Result<()> {
    let r = c
        .verify_nexus(pb::VerifyNexusRequest {
            name: name.clone(),
            repair,
        })
        .await?
        .into_inner();
    emit(json, &r, || verify_text(&r))?;
    if !r.mismatched_regions.is_empty() {
        anyhow::bail!(
            "nexus '{name}': {} of {} regions differ between replicas",
            r.mismatched_regions.len(),
            r.regions
        );
    }
    Ok(())
}

/// Prints `value` as JSON, or the table `render` makes.
fn emit<T: serde::Serialize>(json: bool, value: &T, render: impl FnOnce() -> String) -> Result<()> {
    if json {
        out(&format!("{}\n", serde_json::to_string_pretty(value)?));
    } else {
        out(&render());
    }
    Ok(())
}

fn done(json: bool, what: &str) -> Result<()> {
    if json {
        out(&format!(
            "{}\n",
            serde_json::json!({ "ok": true, "message": what })
        ));
    } else {
        out(&format!("{what}\n"));
    }
    Ok(())
}

fn kind_name(v: &pb::Volume) -> &'static str {
    match v.kind() {
        pb::ObjectKind::Volume => "volume",
        pb::ObjectKind::Snapshot => "snapshot",
        pb::ObjectKind::Unspecified => "?",
    }
}

/// A volume as JSON, with `kind` as a word.
fn volume_json(v: &pb::Volume) -> serde_json::Value {
    let mut o = serde_json::to_value(v).expect("plain data");
    o["kind"] = kind_name(v).into();
    o
}

/// One volume (from create, grow, snapshot, clone): a JSON object or a one-row table.
fn emit_volume(json: bool, v: pb::Volume) -> Result<()> {
    if json {
        out(&format!(
            "{}\n",
            serde_json::to_string_pretty(&volume_json(&v))?
        ));
        return Ok(());
    }
    emit_volumes(false, &[v])
}

/// Volumes (from `ls`): a JSON array or a table.
fn emit_volumes(json: bool, volumes: &[pb::Volume]) -> Result<()> {
    if json {
        let list: Vec<serde_json::Value> = volumes.iter().map(volume_json).collect();
        out(&format!("{}\n", serde_json::to_string_pretty(&list)?));
        return Ok(());
    }
    let mut t = Table::new(&[
        "NAME",
        "KIND",
        "POOL",
        ">SIZE",
        ">ALLOCATED",
        "ORIGIN",
        "EXPORT",
    ]);
    for v in volumes {
        t.row(vec![
            v.name.clone(),
            kind_name(v).into(),
            v.pool.clone(),
            human_size(v.size_bytes),
            human_size(v.allocated_bytes),
            dash(&v.origin),
            dash(&v.export_name),
        ]);
    }
    out(&t.render());
    Ok(())
}

/// Writes to stdout; a reader that went away (`cairnctl … | head`) ends the output quietly.
fn out(text: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("cairnctl: writing output: {e}");
            std::process::exit(1);
        }
    }
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.into()
    }
}

fn pools_table(pools: &[pb::Pool]) -> String {
    let mut t = Table::new(&[
        "NAME",
        ">SIZE",
        ">FREE",
        ">CLUSTER",
        ">VOLUMES",
        ">SNAPSHOTS",
        ">CORE",
        "PATH",
    ]);
    for p in pools {
        t.row(vec![
            p.name.clone(),
            human_size(p.size_bytes),
            human_size(p.free_bytes),
            human_size(u64::from(p.cluster_size_bytes)),
            p.volumes.to_string(),
            p.snapshots.to_string(),
            p.home_core.to_string(),
            p.path.clone(),
        ]);
    }
    t.render()
}

fn exports_table(exports: &[pb::ExportInfo]) -> String {
    let mut t = Table::new(&[
        "EXPORT", "KIND", "SOURCE", "POOL", ">SIZE", "MODE", ">CONNS", ">READS", ">WRITES",
        ">READ", ">WRITTEN", ">ERRORS",
    ]);
    for e in exports {
        let s = e.stats.clone().unwrap_or_default();
        t.row(vec![
            e.name.clone(),
            e.kind.clone(),
            e.source.clone(),
            dash(&e.pool),
            human_size(e.size_bytes),
            format!(
                "{}{}",
                if e.read_only { "ro" } else { "rw" },
                if e.encrypted { ",encrypted" } else { "" }
            ),
            e.connections.to_string(),
            s.reads.to_string(),
            s.writes.to_string(),
            human_size(s.bytes_read),
            human_size(s.bytes_written),
            s.errors.to_string(),
        ]);
    }
    t.render()
}

fn stats_table(r: &pb::StatsResponse) -> String {
    let mut t = Table::new(&[
        "EXPORT", ">OPS", ">READS", ">WRITES", ">FLUSHES", ">TRIMS", ">ERRORS", ">MEAN_US",
        ">P99_US",
    ]);
    for e in &r.exports {
        let s = e.stats.clone().unwrap_or_default();
        let ops: u64 = s.latency_buckets.iter().sum();
        let mean = s.latency_sum_us.checked_div(ops).unwrap_or(0);
        t.row(vec![
            e.name.clone(),
            ops.to_string(),
            s.reads.to_string(),
            s.writes.to_string(),
            s.flushes.to_string(),
            s.trims.to_string(),
            s.errors.to_string(),
            mean.to_string(),
            p99_us(&s),
        ]);
    }
    let mut out = t.render();
    let mut cores = Table::new(&["CORE", ">BUSY_S", ">IDLE_S", ">BUSY%"]);
    for c in &r.reactors {
        let total = c.busy_ns + c.idle_ns;
        let pct = if total == 0 {
            0.0
        } else {
            c.busy_ns as f64 * 100.0 / total as f64
        };
        cores.row(vec![
            c.core.to_string(),
            format!("{:.3}", c.busy_ns as f64 / 1e9),
            format!("{:.3}", c.idle_ns as f64 / 1e9),
            format!("{pct:.1}"),
        ]);
    }
    out.push('\n');
    out.push_str(&cores.render());
    out
}

/// The upper bound of the bucket holding the 99th percentile ("-" with no requests).
fn p99_us(s: &pb::ExportStats) -> String {
    let total: u64 = s.latency_buckets.iter().sum();
    if total == 0 {
        return "-".into();
    }
    let mut seen = 0;
    for (bound, n) in s.latency_bucket_bounds_us.iter().zip(&s.latency_buckets) {
        seen += n;
        if seen * 100 >= total * 99 {
            return if *bound == u64::MAX {
                "+Inf".into()
            } else {
                format!("<={bound}")
            };
        }
    }
    "+Inf".into()
}

/// What `fault set` changed, for its confirmation line.
fn fault_summary(req: &pb::SetFaultRequest) -> String {
    let mut changes = Vec::new();
    if req.heal {
        changes.push("faults cleared".to_string());
    }
    if req.latency_us > 0 {
        changes.push(format!("{} ms added latency", req.latency_us / 1000));
    }
    if req.fail_errno != 0 {
        changes.push(format!(
            "reads and writes fail with errno {}",
            req.fail_errno
        ));
    }
    format!("'{}': {}", req.name, changes.join(", "))
}

/// "2/3 in-sync": how many of a nexus's replicas take writes.
fn in_sync_summary(n: &pb::Nexus) -> String {
    let in_sync = n.replicas.iter().filter(|r| r.state == IN_SYNC).count();
    format!("{in_sync}/{} {IN_SYNC}", n.replicas.len())
}

fn nexuses_table(nexuses: &[pb::Nexus]) -> String {
    let mut t = Table::new(&["NAME", "STATE", ">EPOCH", ">SIZE", "REPLICAS", "EXPORT"]);
    for n in nexuses {
        t.row(vec![
            n.name.clone(),
            n.state.clone(),
            n.epoch.to_string(),
            human_size(n.size_bytes),
            in_sync_summary(n),
            dash(&n.export_name),
        ]);
    }
    t.render()
}

/// One nexus for `nexus show` (and the commands that change one): its fields, a table of
/// its replicas, and the resync or rebuild when one runs.
fn nexus_text(n: &pb::Nexus) -> String {
    let fields = [
        ("name", n.name.clone()),
        ("volume id", dash(&n.volume_id)),
        ("state", n.state.clone()),
        ("epoch", n.epoch.to_string()),
        ("generation", n.generation.to_string()),
        ("size", human_size(n.size_bytes)),
        ("block size", human_size(u64::from(n.block_size_bytes))),
        ("min in-sync", n.min_in_sync.to_string()),
        ("region size", human_size(n.region_bytes)),
        ("io timeout", format!("{} ms", n.io_timeout_ms)),
        ("replicas", in_sync_summary(n)),
        ("export", dash(&n.export_name)),
    ];
    let mut out: String = fields
        .iter()
        .map(|(key, value)| format!("{:<13}{value}\n", format!("{key}:")))
        .collect();
    let mut t = Table::new(&[
        "REPLICA", "STATE", ">GEN", ">DIRTY", ">COPIED", ">WAIT", "REASON",
    ]);
    for r in &n.replicas {
        t.row(vec![
            r.address.clone(),
            r.state.clone(),
            r.generation.to_string(),
            human_size(r.dirty_bytes),
            human_size(r.copied_bytes),
            wait_ms(r.write_wait_max_us),
            dash(&r.reason),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());
    if let Some(r) = &n.resync {
        out.push_str(&resync_line(r));
    }
    out
}

/// A write wait in microseconds as milliseconds ("1.5 ms").
fn wait_ms(us: u64) -> String {
    format!("{:.1} ms", us as f64 / 1000.0)
}

/// "rebuilding 10.0.0.6:10820: 42.0% (4.2G/10G), 100M/s, ETA 58 s, write wait max 1.5 ms".
/// The percentage is the node's `progress`, which never goes back within a job (its total is
/// fixed when its single pass starts); the wait is the longest a client write has waited on
/// one of its copies.
fn resync_line(r: &pb::Resync) -> String {
    let verb = if r.full { "rebuilding" } else { "resyncing" };
    let eta = if r.bytes_per_s > 0.0 {
        format!("{:.0} s", r.eta_s.ceil())
    } else {
        "-".to_string()
    };
    format!(
        "{verb} {}: {:.1}% ({}/{}), {}/s, ETA {eta}, write wait max {}\n",
        r.replica,
        r.progress * 100.0,
        human_size(r.done_bytes),
        human_size(r.total_bytes),
        // A float rate as whole bytes: `as` saturates and maps NaN to 0, fine for display.
        human_size(r.bytes_per_s as u64),
        wait_ms(r.write_wait_max_us)
    )
}

fn verify_text(r: &pb::VerifyNexusResponse) -> String {
    let mut out = format!(
        "compared {} regions of {} on {}\n",
        r.regions,
        human_size(r.region_bytes),
        r.replicas.join(", ")
    );
    if r.mismatched_regions.is_empty() {
        out.push_str("mismatched regions: none\n");
    } else {
        let list: Vec<String> = r.mismatched_regions.iter().map(u64::to_string).collect();
        out.push_str(&format!("mismatched regions: {}\n", list.join(", ")));
        out.push_str(&format!("source (trusted): {}\n", r.source));
        for d in &r.details {
            out.push_str(&format!(
                "region {}: agree with the source: {}; differ: {}\n",
                d.region,
                d.agree.join(", "),
                d.differ.join(", ")
            ));
        }
        if !r.repairing.is_empty() {
            out.push_str(&format!(
                "repairing from the source: {}\n",
                r.repairing.join(", ")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rebuild_bar_shows_the_fraction_rate_and_eta() {
        let r = RebuildView {
            replica: "127.0.0.1:10820".into(),
            done_bytes: 256 << 20,
            total_bytes: 1 << 30,
            bytes_per_s: (64 << 20) as f64,
            eta_s: 12.0,
        };
        let line = progress_bar(&r);
        assert!(
            line.starts_with("rebuilding 127.0.0.1:10820 [########------"),
            "{line}"
        );
        assert!(line.contains(" 25.0% 256M/1G 64M/s eta 12s"), "{line}");
        let empty = RebuildView {
            total_bytes: 0,
            ..r
        };
        assert!(progress_bar(&empty).contains("  0.0%"));
    }

    #[test]
    fn the_resync_line_shows_progress_rate_and_eta() {
        let mut r = pb::Resync {
            replica: "10.0.0.6:10820".into(),
            full: true,
            done_bytes: 1 << 30,
            total_bytes: 4 << 30,
            bytes_per_s: f64::from(100u32 << 20),
            progress: 0.25,
            eta_s: 30.7,
            write_wait_max_us: 1500,
        };
        let line = resync_line(&r);
        assert!(
            line.starts_with("rebuilding 10.0.0.6:10820: 25.0% ("),
            "{line}"
        );
        assert!(
            line.ends_with("/s, ETA 31 s, write wait max 1.5 ms\n"),
            "{line}"
        );
        r.bytes_per_s = 0.0;
        assert!(
            resync_line(&r).ends_with("ETA -, write wait max 1.5 ms\n"),
            "{}",
            resync_line(&r)
        );
    }
}
