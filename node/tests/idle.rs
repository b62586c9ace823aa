//! An idle daemon sleeps, whatever it holds. Two real `cairn-node` processes: node `a` has
//! its pool open, a plain volume exported over NBD with a connected client, and a nexus over
//! a local replica and a remote one on node `b`, exported with a connected client; node `b`
//! serves its replica over an open connection. After writes to both exports and a finished
//! rebuild of the remote replica, with every connection left open and no I/O, each process
//! must use under 1% of one core over 10 s, read from `/proc/PID/stat`.
//!
//! It guards the bug where a poller with nothing to do (the pool's home poller, first) kept
//! its reactor spinning: an idle node burned a whole core, forever.

mod common;

#[path = "../../engine/tests/common/nbd_client.rs"]
mod nbd_client;

#[path = "common/cluster.rs"]
mod cluster;

#[path = "common/ready.rs"]
mod ready;

use cluster::{all_in_sync, flush, Config, Daemon, Workload, MIB};
use common::WorkDir;
use nbd_client::{Client, Endpoint, Options};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// The plain (unreplicated) volume node `a` exports next to the nexus.
const PLAIN: &str = "plain";
const PLAIN_BYTES: u64 = 64 * MIB;
/// Writes through each export before the remote replica is added, and after it is in sync.
const WRITES_BEFORE: u64 = 64;
const WRITES_AFTER: u64 = 32;
/// Time for the last flushes, replies and timers to settle before measuring.
const SETTLE: Duration = Duration::from_secs(1);
/// The measured idle window.
const WINDOW: Duration = Duration::from_secs(10);
/// The most CPU an idle process may use, in percent of one core.
const IDLE_CPU_PERCENT_MAX: f64 = 1.0;

/// CPU ticks (user + system) a thread or process has used, from a `stat` file of /proc.
fn stat_ticks(path: &str) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(path).ok()?;
    // The name is in parentheses and may hold spaces; the fields after it are fixed.
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let name = text[open + 1..close].to_string();
    let fields: Vec<&str> = text[close + 2..].split_whitespace().collect();
    // After the name: state is field 3 of stat(5), so utime (14) and stime (15) sit at 11, 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((name, utime + stime))
}

fn process_ticks(pid: u32) -> u64 {
    stat_ticks(&format!("/proc/{pid}/stat"))
        .unwrap_or_else(|| panic!("read /proc/{pid}/stat"))
        .1
}

/// Per thread of `pid`: (thread id, name, ticks).
fn thread_ticks(pid: u32) -> Vec<(String, String, u64)> {
    let dir = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {dir}: {e}")) {
        let tid = entry.unwrap().file_name().to_string_lossy().into_owned();
        if let Some((name, ticks)) = stat_ticks(&format!("{dir}/{tid}/stat")) {
            out.push((tid, name, ticks));
        }
    }
    out
}

fn clock_ticks_per_s() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    assert!(hz > 0, "sysconf(_SC_CLK_TCK) = {hz}");
    hz as f64
}

/// What one daemon used over the window.
struct Usage {
    node: String,
    ticks: u64,
    percent: f64,
    /// The threads that used any CPU: "name (tid): ticks".
    busy_threads: Vec<String>,
}

struct Sample {
    node: String,
    pid: u32,
    ticks: u64,
    threads: Vec<(String, String, u64)>,
}

impl Sample {
    fn take(d: &Daemon) -> Sample {
        let pid = d.pid();
        Sample {
            node: d.name.clone(),
            pid,
            ticks: process_ticks(pid),
            threads: thread_ticks(pid),
        }
    }

    fn usage_since(&self, start: &Sample, elapsed: Duration, hz: f64) -> Usage {
        let ticks = self.ticks - start.ticks;
        let busy_threads = self
            .threads
            .iter()
            .filter_map(|(tid, name, t)| {
                let before = start
                    .threads
                    .iter()
                    .find(|(id, _, _)| id == tid)
                    .map_or(0, |s| s.2);
                (*t > before).then(|| format!("{name} ({tid}): {}", t - before))
            })
            .collect();
        Usage {
            node: self.node.clone(),
            ticks,
            percent: ticks as f64 / hz / elapsed.as_secs_f64() * 100.0,
            busy_threads,
        }
    }
}

fn connect_plain(d: &Daemon) -> Client {
    let c = Client::connect(&Endpoint::Tcp(d.ready.nbd), PLAIN, Options::default())
        .unwrap_or_else(|e| panic!("NBD export {PLAIN} of node {}: {e}", d.name));
    assert_eq!(c.size_bytes, PLAIN_BYTES, "plain export size");
    c
}

fn write_n(w: &mut Workload, c: &mut Client, n: u64, what: &str) {
    for _ in 0..n {
        w.write_random(c)
            .unwrap_or_else(|e| panic!("write to {what}: {e}"));
    }
    flush(c).unwrap_or_else(|e| panic!("flush {what}: {e}"));
}

#[test]
fn an_idle_node_with_pool_exports_nexus_and_replica_server_sleeps() {
    let dir = WorkDir::new("idle-nodes");
    let a = Daemon::start(
        &dir,
        "a",
        Config {
            replica_volume: true,
            ..Config::default()
        },
    );
    let b = Daemon::start(&dir, "b", Config::replica(LOCALHOST));
    let b_addr = b.replica();
    let mut admin = a.admin();

    admin.create_volume(PLAIN, PLAIN_BYTES);
    admin.export_volume(PLAIN);
    let mut plain = connect_plain(&a);
    let mut plain_load = Workload::new(0x1d1e_0001);

    let v = admin.create_nexus(&["local".into()], 1000);
    assert_eq!(v.state, "online", "{v:#?}");
    admin.export_nexus();
    let mut nexus = a.nbd();
    let mut nexus_load = Workload::new(0x1d1e_0002);

    write_n(&mut plain_load, &mut plain, WRITES_BEFORE, PLAIN);
    write_n(&mut nexus_load, &mut nexus, WRITES_BEFORE, "the nexus");
    admin.add_replica(&b_addr);
    admin.wait_for("rebuild of b", all_in_sync);
    write_n(&mut plain_load, &mut plain, WRITES_AFTER, PLAIN);
    write_n(&mut nexus_load, &mut nexus, WRITES_AFTER, "the nexus");
    let v = admin.show();
    assert!(all_in_sync(&v) && v.replicas.len() == 2, "{v:#?}");

    // Every connection stays open (both NBD clients, the nexus's to b, the admin channel);
    // nothing moves.
    std::thread::sleep(SETTLE);
    let hz = clock_ticks_per_s();
    let start = [Sample::take(&a), Sample::take(&b)];
    let started = Instant::now();
    std::thread::sleep(WINDOW);
    let end = [Sample::take(&a), Sample::take(&b)];
    let elapsed = started.elapsed();

    let usage: Vec<Usage> = end
        .iter()
        .zip(&start)
        .map(|(e, s)| {
            assert_eq!(e.pid, s.pid, "node {} restarted", e.node);
            e.usage_since(s, elapsed, hz)
        })
        .collect();
    for u in &usage {
        println!(
            "idle node {}: {} ticks over {:.1} s at {hz} ticks/s = {:.3} % of one core; busy threads: {:?}",
            u.node,
            u.ticks,
            elapsed.as_secs_f64(),
            u.percent,
            u.busy_threads
        );
    }
    for u in &usage {
        assert!(
            u.percent < IDLE_CPU_PERCENT_MAX,
            "idle node {} used {:.2} % of one core ({} ticks in {:.1} s), over {IDLE_CPU_PERCENT_MAX} %; busy threads: {:?}",
            u.node,
            u.percent,
            u.ticks,
            elapsed.as_secs_f64(),
            u.busy_threads
        );
    }
    // The connections were idle, not dead: both exports still answer.
    plain_load
        .check(&mut plain)
        .unwrap_or_else(|e| panic!("{PLAIN} after the idle window: {e}"));
    nexus_load
        .check(&mut nexus)
        .unwrap_or_else(|e| panic!("the nexus after the idle window: {e}"));
}
