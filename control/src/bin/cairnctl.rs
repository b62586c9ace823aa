//! cairnctl: Cairn's command line. `cairnctl node …` talks to one cairn-node's admin API
//! (gRPC), the way SPDK's rpc.py talks to one target. Cluster commands (over the control
//! process's REST API) come later.
//!
//! Output is an aligned table by default and JSON with `--json`. An error from the node
//! prints its status code and message (which names the object) and exits 1.

use anyhow::{Context, Result};
use cairn_control::proto::{self as pb, node_admin_client::NodeAdminClient};
use cairn_control::table::Table;
use cairn_control::units::{human_size, parse_size};
use clap::{Args, Parser, Subcommand};
use std::process::ExitCode;
use std::time::Duration;
use tonic::transport::Channel;

/// How long cairnctl waits to connect to the node.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one admin call may take (pool operations are durable when they return).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

const AFTER_HELP: &str = "\
Examples:
  cairnctl node pool ls
  cairnctl node volume create pg 10G
  cairnctl node export add pg
  cairnctl node snapshot create pg pg-monday
  cairnctl node snapshot clone pg-monday pg-test     # a writable volume from a snapshot
  cairnctl node export add pg-monday --read-only
  cairnctl node volume grow pg 20G
  cairnctl node --json stats
  cairnctl node --addr 10.0.0.5:10810 volume ls";

#[derive(Parser)]
#[command(
    name = "cairnctl",
    version,
    about = "Cairn's command line",
    after_help = AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    cmd: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Low-level commands to one cairn-node over its admin API.
    Node(NodeArgs),
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
    /// Per-export counters and latency, per-reactor busy and idle time.
    Stats,
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
    /// Export a volume, snapshot (always read-only) or RAM bdev NAME over NBD.
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
    },
    /// Stop exporting EXPORT (its clients' in-flight requests are answered first).
    Remove { export_name: String },
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("label '{s}' is not KEY=VALUE"))
}

fn main() -> ExitCode {
    let Top::Node(args) = Cli::parse().cmd;
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
    match runtime.block_on(node(args)) {
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

async fn connect(addr: &str) -> Result<NodeAdminClient<Channel>> {
    let endpoint = Channel::from_shared(format!("http://{addr}"))
        .with_context(|| format!("'{addr}' is not HOST:PORT"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT);
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the cairn-node admin API at {addr}"))?;
    Ok(NodeAdminClient::new(channel))
}

async fn node(args: NodeArgs) -> Result<()> {
    let mut c = connect(&args.addr).await?;
    let json = args.json;
    match args.cmd {
        NodeCmd::Pool(PoolCmd::Ls) => {
            let r = c.list_pools(pb::ListPoolsRequest {}).await?.into_inner();
            emit(json, &r.pools, || pools_table(&r.pools))
        }
        NodeCmd::Volume(cmd) => volume(&mut c, json, cmd).await,
        NodeCmd::Snapshot(cmd) => snapshot(&mut c, json, cmd).await,
        NodeCmd::Export(cmd) => export(&mut c, json, cmd).await,
        NodeCmd::Stats => {
            let r = c.stats(pb::StatsRequest {}).await?.into_inner();
            emit(json, &r, || stats_table(&r))
        }
    }
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
        } => {
            let req = pb::ExportRequest {
                name,
                pool: pool.unwrap_or_default(),
                export_name: export_name.unwrap_or_default(),
                read_only,
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
            if e.read_only { "ro" } else { "rw" }.into(),
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
