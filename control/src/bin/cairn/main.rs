//! cairn: Cairn on one machine. `cairn up` starts a control process (cairn-control, embedded
//! store) and 1 to 7 cairn-node processes on loopback ports, each a separate process found
//! beside this executable (or on PATH), waits until the control process reports every node
//! up, prints what runs where and how to create and reach a volume, and then watches them:
//! Ctrl-C (SIGINT) or SIGTERM stops them all cleanly and exits 0; a child that dies on its own
//! is reported with its exit status and the end of its log, the rest are stopped, and `cairn
//! up` exits 1. The data directory keeps the store and the nodes' data files, so the next
//! `cairn up` on it finds the same nodes and volumes. docs/control.md, "cairn up".
//!
//! It only spawns and supervises processes: it never opens the store or a pool itself, and
//! talks to the control process over its REST API like any client. Every link is mutual TLS:
//! the first run creates a cluster CA in `DATA_DIR/tls` and each run issues the certificates
//! still missing (plan.rs); `cairn up` itself calls the REST API as `admin:cairn`.

mod plan;
mod supervise;

use anyhow::{Context, Result};
use cairn_control::units::human_size;
use cairn_control_api::client::Client;
use cairn_control_api::{NodeAddresses, NodeState, NodeView, CONTROL_LISTEN_DEFAULT};
use clap::{Args, Parser, Subcommand};
use plan::{Binaries, NodePlan, Plan, BASE_PORT_DEFAULT, LOCK_FILE, SIZE_DEFAULT};
use std::io::{Read as _, Seek as _, Write as _};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use supervise::{Proc, Signals, StopReport, POLL_INTERVAL};

/// How long the control process may take to answer, and the nodes to register, after they
/// are started (a loaded 2-core machine is slow, never wrong; a broken start is reported).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one request to the control process may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(2);
/// The control URL cairnctl assumes when it has TLS; other URLs are printed with `--control`.
const CONTROL_URL_DEFAULT: &str = "https://127.0.0.1:10800";
/// The admin certificate cairnctl finds by itself (run from the data directory's parent).
const CTL_TLS_DIR_DEFAULT: &str = "cairn-data/tls/admin-cairn";
/// The most replicas a volume has.
const REPLICAS_MAX: usize = 3;

const AFTER_HELP: &str = "\
Examples:
  cairn up                      # control + one node, ./cairn-data, a 10G sparse data file
  cairn up --nodes 3            # three nodes: replication and failover on one machine
  cairn up --data-dir /tmp/c --nodes 3 --size 1G --base-port 20000

Node I (1-based) listens on 127.0.0.1, ports BASE + 10*(I-1): NBD +0, admin +1, replica +2,
metrics +3. Logs are in DATA_DIR/logs. Ctrl-C stops everything; run it again on the same
--data-dir to find the same nodes and volumes.";

#[derive(Parser)]
#[command(name = "cairn", version, about = "Cairn on one machine")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a control process and N nodes, each a separate process, until Ctrl-C.
    #[command(after_help = AFTER_HELP)]
    Up(UpArgs),
}

#[derive(Args)]
struct UpArgs {
    /// Holds the control process's store, each node's data file, the logs and the lock.
    #[arg(long, value_name = "DIR", default_value = "./cairn-data")]
    data_dir: PathBuf,
    /// How many cairn-node processes to run (1 to 7).
    #[arg(long, value_name = "N", default_value_t = 1)]
    nodes: u32,
    /// The size of each node's data file (sparse; used when the file is created).
    #[arg(long, value_name = "SIZE", default_value = SIZE_DEFAULT)]
    size: String,
    /// The control process's REST API.
    #[arg(long, value_name = "ADDR:PORT", default_value = CONTROL_LISTEN_DEFAULT)]
    control_listen: SocketAddr,
    /// The first node's first port; each node takes 10 from there.
    #[arg(long, value_name = "PORT", default_value_t = BASE_PORT_DEFAULT)]
    base_port: u16,
}

fn main() -> ExitCode {
    match Cli::parse().cmd {
        Cmd::Up(args) => match up(&args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("cairn up: error: {e:#}");
                ExitCode::from(1)
            }
        },
    }
}

/// Why `cairn up` stops.
enum Stop {
    /// SIGINT or SIGTERM: a clean stop, exit 0.
    Signal(&'static str),
    /// A child died or did not come up: what happened, printed before the rest is stopped.
    Failure(String),
}

/// The children, stopped in this order: nodes, then the control process.
#[derive(Default)]
struct Children {
    nodes: Vec<Proc>,
    control: Vec<Proc>,
}

fn up(args: &UpArgs) -> Result<ExitCode> {
    let plan = Plan::new(
        &args.data_dir,
        args.nodes,
        &args.size,
        args.control_listen,
        args.base_port,
    )?;
    let bins = Binaries::find()?;
    std::fs::create_dir_all(&plan.logs_dir)
        .with_context(|| format!("creating {}", plan.logs_dir.display()))?;
    let _lock = lock(&plan.data_dir)?;
    check_ports(&plan)?;
    plan.ensure_certificates()?;
    let signals = Signals::install()?;
    let mut children = Children::default();
    let outcome = match start(&plan, &bins, &signals, &mut children) {
        Ok(views) => {
            print_summary(&plan, &bins, &children, &views);
            watch(&signals, &mut children)
        }
        Err(stop) => stop,
    };
    Ok(finish(outcome, &signals, &mut children))
}

/// Takes `DATA_DIR/cairn-up.lock` (flock, holding our pid), or names the `cairn up` that holds
/// it. The kernel drops the lock when this process dies, however it dies.
fn lock(data_dir: &Path) -> Result<std::fs::File> {
    let path = data_dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock(2) on a descriptor this function owns; it reads no memory of ours.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let mut holder = String::new();
        drop(file.read_to_string(&mut holder));
        anyhow::bail!(
            "data directory {} is in use by another cairn up (pid {}); stop that one (Ctrl-C \
             in its terminal), or give this one another --data-dir",
            data_dir.display(),
            holder.trim()
        );
    }
    let write = |file: &mut std::fs::File| -> std::io::Result<()> {
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())
    };
    write(&mut file).with_context(|| format!("writing {}", path.display()))?;
    Ok(file)
}

/// Fails naming the first port of the plan that cannot be bound now, before anything starts.
fn check_ports(plan: &Plan) -> Result<()> {
    let mut ports = vec![(
        plan.control_listen,
        "the control process's REST API".to_string(),
    )];
    for node in &plan.nodes {
        ports.extend(
            node.ports()
                .map(|(addr, what)| (addr, format!("{}'s {what} port", node.id))),
        );
    }
    for (addr, what) in ports {
        TcpListener::bind(addr).with_context(|| {
            format!(
                "{addr} ({what}) is taken: stop what listens there (another cairn up or \
                 cairn-node?), or move with --base-port or --control-listen"
            )
        })?;
    }
    Ok(())
}

/// Watches signals and children for one [`POLL_INTERVAL`]: a signal, or a child that exited.
fn poll(signals: &Signals, children: &mut Children) -> Option<Stop> {
    if let Some(name) = signals.wait(POLL_INTERVAL) {
        return Some(Stop::Signal(name));
    }
    for p in children.control.iter_mut().chain(&mut children.nodes) {
        if let Some(status) = p.exited() {
            return Some(Stop::Failure(format!(
                "{} (pid {}) exited on its own with {status}; the end of {}:\n{}",
                p.name,
                p.pid(),
                p.log.display(),
                p.log_tail()
            )));
        }
    }
    None
}

/// Polls until `ready` gives Some, a signal or a child's death stops the start, or
/// [`START_TIMEOUT`] passes (then `late` says what did not happen).
fn wait_until<T>(
    signals: &Signals,
    children: &mut Children,
    mut ready: impl FnMut() -> Option<T>,
    late: impl FnOnce() -> String,
) -> Result<T, Stop> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(v) = ready() {
            return Ok(v);
        }
        if let Some(stop) = poll(signals, children) {
            return Err(stop);
        }
        if Instant::now() >= deadline {
            return Err(Stop::Failure(late()));
        }
    }
}

/// The nodes as the control process lists them, or None while it does not answer.
fn node_views(client: &Client) -> Option<Vec<NodeView>> {
    let r = client.get("/v1/nodes").ok()?;
    (r.status == 200)
        .then(|| serde_json::from_slice(&r.body).ok())
        .flatten()
}

fn addresses(node: &NodePlan) -> NodeAddresses {
    NodeAddresses {
        admin: node.admin.to_string(),
        nbd: Some(node.nbd.to_string()),
        replica: Some(node.replica.to_string()),
    }
}

/// Whether `view` is `node` registered in this run: up, at the planned addresses, and heard
/// from by this control process (a record left `up` by the last run has no heartbeat age).
fn is_up_now(node: &NodePlan, view: &NodeView) -> bool {
    view.state == NodeState::Up
        && view.last_heartbeat_age_ms.is_some()
        && view.addresses == addresses(node)
}

/// Starts the control process, then the nodes, and waits until every node is up; returns the
/// nodes' views.
fn start(
    plan: &Plan,
    bins: &Binaries,
    signals: &Signals,
    children: &mut Children,
) -> Result<Vec<NodeView>, Stop> {
    let failed = |e: anyhow::Error| Stop::Failure(format!("{e:#}"));
    println!(
        "cairn up: starting cairn-control on {} (store in {})",
        plan.control_url,
        plan.control_dir.display()
    );
    children.control.push(
        Proc::spawn(
            "control",
            &bins.control,
            &plan.control_args(),
            &plan.control_log,
        )
        .map_err(failed)?,
    );
    let admin =
        cairn_tls::Tls::load(&plan.tls_files(&cairn_tls::Identity::Admin(plan::ADMIN_NAME.into())))
            .map_err(|e| failed(anyhow::Error::new(e).context("cairn up's admin certificate")))?;
    let client = Client::new(&plan.control_url, HTTP_TIMEOUT)
        .and_then(|c| c.with_tls(Some(admin.client_config())))
        .map_err(|e| failed(anyhow::Error::new(e).context("the control URL")))?;
    let views = wait_until(
        signals,
        children,
        || node_views(&client),
        || {
            format!(
            "the control process did not answer at {} within {START_TIMEOUT:?}; the end of {}:\n{}",
            plan.control_url,
            plan.control_log.display(),
            supervise::log_tail(&plan.control_log)
        )
        },
    )?;
    wait_old_leases(plan, &client, &views, signals, children)?;
    println!(
        "cairn up: starting {} cairn-node process{} ({})",
        plan.nodes.len(),
        if plan.nodes.len() == 1 { "" } else { "es" },
        plan.nodes
            .iter()
            .map(|n| n.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    for node in &plan.nodes {
        std::fs::create_dir_all(&node.dir)
            .with_context(|| format!("creating {}", node.dir.display()))
            .map_err(failed)?;
        let proc =
            Proc::spawn(&node.id, &bins.node, &plan.node_args(node), &node.log).map_err(failed)?;
        children.nodes.push(proc);
    }
    let all_up = || {
        let views = node_views(&client)?;
        plan.nodes
            .iter()
            .all(|n| views.iter().any(|v| v.id == n.id && is_up_now(n, v)))
            .then_some(views)
    };
    wait_until(signals, children, all_up, || {
        let views = node_views(&client).unwrap_or_default();
        let mut msg = format!("not every node registered within {START_TIMEOUT:?}:");
        for n in &plan.nodes {
            if !views.iter().any(|v| v.id == n.id && is_up_now(n, v)) {
                msg.push_str(&format!(
                    "\n  {} is not up; the end of {}:\n{}",
                    n.id,
                    n.log.display(),
                    supervise::log_tail(&n.log)
                ));
            }
        }
        msg
    })
}

/// A node of this plan whose record is still `up` at other addresses (an earlier run with
/// other ports, its lease restored with the store) would be refused as a duplicate id until
/// that lease expires (2 s): wait for it to be marked down first.
fn wait_old_leases(
    plan: &Plan,
    client: &Client,
    views: &[NodeView],
    signals: &Signals,
    children: &mut Children,
) -> Result<(), Stop> {
    let moved = |views: &[NodeView]| -> Vec<String> {
        plan.nodes
            .iter()
            .filter(|n| {
                views.iter().any(|v| {
                    v.id == n.id && v.state == NodeState::Up && v.addresses != addresses(n)
                })
            })
            .map(|n| n.id.clone())
            .collect()
    };
    let ids = moved(views);
    if ids.is_empty() {
        return Ok(());
    }
    println!(
        "cairn up: {} registered at other ports in an earlier run; waiting for the old lease \
         to expire",
        ids.join(", ")
    );
    let gone = || node_views(client).filter(|v| moved(v).is_empty()).map(drop);
    wait_until(signals, children, gone, || {
        format!(
            "the old registrations of {} did not expire within {START_TIMEOUT:?}",
            ids.join(", ")
        )
    })
}

/// Runs until a signal or a child's death.
fn watch(signals: &Signals, children: &mut Children) -> Stop {
    loop {
        if let Some(stop) = poll(signals, children) {
            return stop;
        }
    }
}

/// Stops every child (nodes first, then the control process) and says how it went.
fn finish(outcome: Stop, signals: &Signals, children: &mut Children) -> ExitCode {
    match &outcome {
        Stop::Signal(name) => {
            println!("cairn up: {name}: stopping the nodes, then the control process");
        }
        Stop::Failure(what) => {
            eprintln!("cairn up: {what}");
            eprintln!("cairn up: stopping everything else");
        }
    }
    let mut report = StopReport::default();
    supervise::stop(&mut children.nodes, signals, &mut report);
    supervise::stop(&mut children.control, signals, &mut report);
    for (name, status) in &report.failed {
        let log = children
            .nodes
            .iter()
            .chain(&children.control)
            .find(|p| &p.name == name)
            .map(Proc::log_tail)
            .unwrap_or_default();
        eprintln!("cairn up: {name} stopped with {status}; the end of its log:\n{log}");
    }
    match outcome {
        Stop::Signal(_) if report.clean() => {
            println!(
                "cairn up: stopped cleanly; the next `cairn up` on this --data-dir finds the \
                 same nodes and volumes"
            );
            ExitCode::SUCCESS
        }
        Stop::Signal(_) => {
            eprintln!(
                "cairn up: stopped, but not cleanly (killed: {}; failed: {})",
                list(&report.killed),
                list(
                    &report
                        .failed
                        .iter()
                        .map(|(n, _)| n.clone())
                        .collect::<Vec<_>>()
                )
            );
            ExitCode::from(1)
        }
        Stop::Failure(_) => ExitCode::from(1),
    }
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

/// `path` relative to the working directory when it is below it, for shorter commands.
fn display(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

/// What runs where, and how to create a volume and reach it.
fn print_summary(plan: &Plan, bins: &Binaries, children: &Children, views: &[NodeView]) {
    let n = plan.nodes.len();
    let mut out = format!(
        "cairn up: ready: cairn-control and {n} node{} up (Ctrl-C stops them all)\n\n",
        if n == 1 { "" } else { "s" }
    );
    let control_pid = children.control.first().map_or(0, Proc::pid);
    out.push_str(&format!(
        "  control  {}  pid {control_pid}  store {}  log {}\n\n",
        plan.control_url,
        plan.control_dir.display(),
        plan.control_log.display()
    ));
    let mut table = cairn_control::table::Table::new(&[
        "NODE", "NBD", "ADMIN", "REPLICA", "METRICS", ">PID", ">POOL", ">FREE", "LOG",
    ]);
    for (node, proc) in plan.nodes.iter().zip(&children.nodes) {
        let view = views.iter().find(|v| v.id == node.id);
        let pool = view.map_or(0, |v| v.pools.iter().map(|p| p.size_bytes).sum());
        table.row(vec![
            node.id.clone(),
            node.nbd.to_string(),
            node.admin.to_string(),
            node.replica.to_string(),
            node.metrics.to_string(),
            proc.pid().to_string(),
            human_size(pool),
            human_size(view.map_or(0, |v| v.free_bytes)),
            node.log.display().to_string(),
        ]);
    }
    for line in table.render().lines() {
        out.push_str(&format!("  {line}\n"));
    }
    out.push_str(&format!(
        "\n  Each node's data file is {}/node-I/pool0.img (sparse).\n",
        plan.data_dir.display()
    ));
    let admin_dir = plan.admin_tls_dir();
    let found =
        std::fs::canonicalize(CTL_TLS_DIR_DEFAULT).ok() == std::fs::canonicalize(&admin_dir).ok();
    out.push_str(&format!(
        "  Every link is mutual TLS; the CA and certificates are in {}. cairnctl uses {}{}.\n",
        display(&plan.tls_dir),
        display(&admin_dir),
        if found {
            " by itself from this directory for cluster commands (node commands, and elsewhere: --tls-dir or $CAIRN_TLS_DIR)"
        } else {
            " with --tls-dir (or $CAIRN_TLS_DIR)"
        }
    ));
    let node_flag = format!(" --tls-dir {}", display(&admin_dir));
    let tls_flag = (!found).then_some(node_flag.as_str());
    out.push_str(&instructions(
        plan,
        &display(&bins.ctl),
        tls_flag,
        &node_flag,
    ));
    print!("{out}");
    drop(std::io::stdout().flush());
}

/// How to create a volume and reach it: the cluster commands, then the node commands.
/// `tls_flag` is how cairnctl finds its certificate when it would not by itself.
/// `tls_flag` goes on cluster commands (absent where cairnctl finds the certificate by
/// itself), `node_tls_flag` on node commands, for which it never looks.
fn instructions(plan: &Plan, ctl: &str, tls_flag: Option<&str>, node_tls_flag: &str) -> String {
    let tls_flag = tls_flag.unwrap_or_default();
    let control = if plan.control_url == CONTROL_URL_DEFAULT {
        tls_flag.to_string()
    } else {
        format!(" --control {}{tls_flag}", plan.control_url)
    };
    let n1 = &plan.nodes[0];
    let replicas = plan.nodes.len().min(REPLICAS_MAX);
    let nbd_client = |name: &str| {
        format!(
            "  nbdinfo nbd://{nbd}/{name}\n  qemu-io -f raw -c 'write -P 0xab 0 1M' nbd://{nbd}/{name}\n",
            nbd = n1.nbd
        )
    };
    let mut out = format!(
        "\nCreate a volume and reach it over NBD (from another shell):\n\
         \x20 {ctl} volume create demo --size 1G --replicas {replicas}{control}\n\
         \x20 {ctl} volume attach demo --node {}{control}     # prints the NBD URI\n",
        n1.id
    );
    out.push_str(&nbd_client("demo"));
    out.push_str(&format!(
        "\nOr node by node, with the node admin API (`{ctl} node --help`):\n"
    ));
    let on = |node: &NodePlan| format!("{ctl} node --addr {}{node_tls_flag}", node.admin);
    if plan.nodes.len() == 1 {
        out.push_str(&format!(
            "  {n} volume create pg 1G\n  {n} export add pg\n",
            n = on(n1)
        ));
    } else {
        let others = &plan.nodes[1..replicas];
        for node in others {
            out.push_str(&format!("  {} volume create pg 1G\n", on(node)));
        }
        let remote: String = others
            .iter()
            .map(|node| format!(" --replica {}", node.replica))
            .collect();
        out.push_str(&format!(
            "  {n} volume create pg 1G\n  {n} nexus create pg --replica local{remote}\n  {n} \
             export add pg --nexus\n",
            n = on(n1)
        ));
    }
    out.push_str(&nbd_client("pg"));
    out.push_str(&format!("\nThe nodes: {ctl} node ls{control}\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_name_the_planned_ports() {
        let plan = Plan::new(
            Path::new("/d"),
            3,
            "1G",
            "127.0.0.1:10800".parse().unwrap(),
            BASE_PORT_DEFAULT,
        )
        .unwrap();
        let text = instructions(&plan, "cairnctl", None, "");
        for want in [
            "cairnctl volume create demo --size 1G --replicas 3\n",
            "volume attach demo --node node-1",
            "cairnctl node --addr 127.0.0.1:10820 volume create pg 1G",
            "cairnctl node --addr 127.0.0.1:10830 volume create pg 1G",
            "nexus create pg --replica local --replica 127.0.0.1:10821 --replica 127.0.0.1:10831",
            "nbdinfo nbd://127.0.0.1:10809/pg",
        ] {
            assert!(text.contains(want), "{want} missing from:\n{text}");
        }
        let plan = Plan::new(
            Path::new("/d"),
            1,
            "1G",
            "127.0.0.1:20800".parse().unwrap(),
            20000,
        )
        .unwrap();
        let text = instructions(
            &plan,
            "cairnctl",
            Some(" --tls-dir /d/tls/admin-cairn"),
            " --tls-dir /d/tls/admin-cairn",
        );
        assert!(
            text.contains(
                "--replicas 1 --control https://127.0.0.1:20800 --tls-dir /d/tls/admin-cairn"
            ),
            "{text}"
        );
        assert!(
            text.contains("--addr 127.0.0.1:20001 --tls-dir /d/tls/admin-cairn export add pg\n"),
            "{text}"
        );
    }
}
