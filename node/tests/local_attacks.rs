//! Attacks on a real `cairn-node` process by someone who shares its host or reaches its
//! ports, replayed from issue 16:
//!
//! * **Files follow the umask**: under umask 022 the data dir was 755 and `pool0.img` and the
//!   epoch files 644, so any local user could read every volume's plaintext. Every directory
//!   the node keeps must be 0700 and every file and socket 0600, and a file found wider (made
//!   by an older version) is narrowed at the next start, with a warning naming it.
//! * **Slowloris**: 64 sockets trickling one byte every few seconds into NBD negotiation
//!   locked every new client out (the timeout was per read), and 16 silent sockets on the
//!   replica port made every `nexus create` fail. A legitimate client must get in while the
//!   attack runs, well within the negotiation deadline, and `nexus create` must succeed; the
//!   refusals must not flood the log.
//! * **Clients that never read their replies**: each pipelined 32 MiB reads and cost the
//!   daemon about 33 MB, with no global cap. 100 of them must leave the daemon's RSS under a
//!   named bound, and a well-behaved client must still be served.
//!
//! Timings are printed, never asserted against anything tighter than the server's own
//! deadline.

mod common;

#[path = "../../engine/tests/common/nbd_client.rs"]
mod nbd_client;

#[path = "common/cluster.rs"]
mod cluster;

#[path = "common/ready.rs"]
mod ready;

use cairn_engine::frontend::nbd::conn::{REPLY_FLOOR_BYTES, REQUEST_RX_BYTES};
use cairn_engine::frontend::nbd::proto::cmd;
use cairn_engine::frontend::nbd::server::HANDSHAKE_TIMEOUT_DEFAULT;
use cluster::{Config, Daemon, MIB};
use common::WorkDir;
use nbd_client::{Client, Endpoint, Options};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// The plain volume each attacked node exports.
const EXPORT: &str = "exp";
const EXPORT_BYTES: u64 = 64 * MIB;
/// Sockets trickling into NBD negotiation, and how often each sends its next byte.
const TRICKLERS: usize = 64;
const TRICKLE_EVERY: Duration = Duration::from_secs(2);
/// Silent sockets held open on the replica port.
const SILENT_REPLICA_SOCKETS: usize = 16;
/// How long the attack runs before the legitimate client tries, so every socket is in.
const ATTACK_SETTLE: Duration = Duration::from_secs(3);
/// Clients that pipeline large reads and never read a reply.
const NON_READERS: usize = 100;
/// Reads each of them pipelines, and their size (the protocol's largest).
const NON_READER_READS: usize = 4;
const NON_READER_READ_BYTES: u32 = 32 << 20;
/// The global reply budget the node under the non-reader attack runs with.
const REPLY_BUDGET_BYTES: u64 = 64 * MIB;
/// What the non-readers may add to the daemon's RSS: the reply budget, plus per connection
/// its receive region and its reply floor, plus slack for allocator and thread overhead.
/// Without the budget they added about 33 MB each, 3.3 GB in all.
const RSS_GROWTH_MAX_BYTES: u64 = REPLY_BUDGET_BYTES
    + NON_READERS as u64 * (REQUEST_RX_BYTES + REPLY_FLOOR_BYTES) as u64
    + 64 * MIB;
/// How long the daemon gets to take in the non-readers' requests before RSS is read.
const NON_READER_SETTLE: Duration = Duration::from_secs(5);
/// Log lines about refused or evicted peers the attack may cause: the first of each 10 s
/// period and one summary per period, for a few periods.
const REFUSAL_LOG_LINES_MAX: usize = 12;

fn exporting_node(extra: &[&str]) -> Config {
    let mut args = vec![
        "--volume".to_string(),
        format!("{EXPORT}:{}M", EXPORT_BYTES / MIB),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Config {
        extra_args: args,
        ..Config::replica(LOCALHOST)
    }
}

fn connect_export(addr: SocketAddr) -> std::io::Result<Client> {
    Client::connect(&Endpoint::Tcp(addr), EXPORT, Options::default())
}

fn mode_of(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Every directory under (and including) `dir` must be 0700 and everything else 0600.
fn assert_owner_only(dir: &Path) -> usize {
    assert_eq!(
        mode_of(dir),
        0o700,
        "{} mode {:o}",
        dir.display(),
        mode_of(dir)
    );
    let mut seen = 1;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            seen += assert_owner_only(&path);
        } else {
            let mode = mode_of(&path);
            assert_eq!(mode, 0o600, "{} mode {mode:o}", path.display());
            seen += 1;
        }
    }
    seen
}

#[test]
fn files_and_sockets_are_owner_only_whatever_the_umask() {
    let dir = WorkDir::new("owner-only");
    let socket = dir.join("nbd.sock");
    let config = Config {
        replica_volume: true,
        umask: Some(0o022),
        extra_args: vec!["--nbd-socket".into(), socket.display().to_string()],
        ..Config::default()
    };
    let mut node = Daemon::start(&dir, "n", config);
    // A local nexus opens the local replica: that writes its epoch file.
    let nexus = node.admin().create_nexus(&["local".into()], 1000);
    assert_eq!(nexus.state, "online", "{nexus:#?}");
    let data = node.data_dir().to_path_buf();
    let epochs = data.join("epochs");
    assert!(
        std::fs::read_dir(&epochs).unwrap().next().is_some(),
        "the nexus wrote an epoch file"
    );
    let files = assert_owner_only(&data);
    let sock_meta = std::fs::symlink_metadata(&socket).unwrap();
    assert!(sock_meta.file_type().is_socket());
    assert_eq!(mode_of(&socket), 0o600, "NBD socket mode");
    println!("{files} paths in the data dir, all owner-only");

    // Files an older version left open to everyone are narrowed at the next start.
    node.kill9();
    let pool = data.join("pool0.img");
    let epoch = std::fs::read_dir(&epochs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    for path in [&data, &epochs, &pool, &epoch] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    node.restart();
    assert_owner_only(&data);
    let log = node.log();
    for path in [&data, &epochs, &pool, &epoch] {
        let named = log
            .lines()
            .any(|l| l.contains("restricted to its owner") && l.contains(&*path.to_string_lossy()));
        assert!(named, "no warning names {}:\n{log}", path.display());
    }
    assert!(
        log.contains("old_mode=\"755\"") || log.contains("old_mode=755"),
        "{log}"
    );
}

/// A socket that sends one byte of negotiation every [`TRICKLE_EVERY`] until `stop`, and
/// connects again whenever the server cuts it off.
fn trickle(addr: SocketAddr, stop: Arc<AtomicBool>, reconnects: Arc<AtomicU64>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = TcpStream::connect(addr) else {
            std::thread::sleep(TRICKLE_EVERY);
            continue;
        };
        while !stop.load(Ordering::Relaxed) && s.write_all(&[0]).is_ok() {
            std::thread::sleep(TRICKLE_EVERY);
        }
        reconnects.fetch_add(1, Ordering::Relaxed);
    }
}

/// A socket that connects to the replica port and says nothing, until `stop`; connects
/// again whenever the server closes it.
fn silent(addr: SocketAddr, stop: Arc<AtomicBool>) {
    use std::io::Read;
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = TcpStream::connect(addr) else {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        };
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut b = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            match s.read(&mut b) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
    }
}

fn refusal_lines(log: &str) -> usize {
    log.lines()
        .filter(|l| {
            l.contains("connection refused")
                || l.contains("negotiation evicted")
                || l.contains("cut off at its deadline")
                || l.contains("connections refused,")
                || l.contains("replica open refused")
                || l.contains("NBD negotiation failed")
        })
        .count()
}

#[test]
fn slowloris_on_nbd_and_silent_replica_sockets_lock_nobody_out() {
    let dir = WorkDir::new("slowloris");
    let target = Daemon::start(&dir, "target", exporting_node(&[]));
    let nexus_node = Daemon::start(&dir, "nexus", Config::default());
    let nbd = target.ready.nbd;
    let replica: SocketAddr = target.replica().parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reconnects = Arc::new(AtomicU64::new(0));
    let mut attackers = Vec::new();
    for _ in 0..TRICKLERS {
        let (stop, reconnects) = (stop.clone(), reconnects.clone());
        attackers.push(std::thread::spawn(move || trickle(nbd, stop, reconnects)));
    }
    for _ in 0..SILENT_REPLICA_SOCKETS {
        let stop = stop.clone();
        attackers.push(std::thread::spawn(move || silent(replica, stop)));
    }
    std::thread::sleep(ATTACK_SETTLE);

    let started = Instant::now();
    let mut client =
        connect_export(nbd).expect("a legitimate NBD client gets in during the attack");
    let took = started.elapsed();
    let block = client.read(0, 4096).unwrap().expect("the client is served");
    assert_eq!(block.len(), 4096);
    println!("NBD client connected in {took:?} under {TRICKLERS} trickling sockets");
    assert!(
        took < HANDSHAKE_TIMEOUT_DEFAULT,
        "the client waited {took:?}, past the negotiation deadline {HANDSHAKE_TIMEOUT_DEFAULT:?}"
    );

    let started = Instant::now();
    let mut admin = nexus_node.admin();
    let created =
        admin.try_create_nexus(&cluster::Admin::create_request(&[target.replica()], 1000));
    let took = started.elapsed();
    let nexus = created.unwrap_or_else(|s| {
        panic!("nexus create failed under {SILENT_REPLICA_SOCKETS} silent replica sockets: {s}")
    });
    assert_eq!(nexus.state, "online", "{nexus:#?}");
    println!("nexus create took {took:?} under {SILENT_REPLICA_SOCKETS} silent replica sockets");

    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().unwrap();
    }
    let log = target.log();
    let lines = refusal_lines(&log);
    println!(
        "{} trickling reconnects; {lines} refusal log lines",
        reconnects.load(Ordering::Relaxed)
    );
    assert!(
        lines <= REFUSAL_LOG_LINES_MAX,
        "{lines} refusal log lines: not rate-limited\n{log}"
    );
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

#[test]
fn clients_that_never_read_replies_hold_bounded_memory() {
    let dir = WorkDir::new("non-readers");
    let budget = format!("{}M", REPLY_BUDGET_BYTES / MIB);
    let target = Daemon::start(
        &dir,
        "target",
        exporting_node(&["--nbd-reply-budget", &budget]),
    );
    let nbd = target.ready.nbd;
    let mut good = connect_export(nbd).unwrap();
    let data: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        good.write(0, &data, 0).unwrap(),
        0,
        "the good client writes"
    );
    let before = rss_bytes(target.pid());

    let mut hostile = Vec::with_capacity(NON_READERS);
    for _ in 0..NON_READERS {
        let mut c = connect_export(nbd).expect("a non-reader connects");
        for _ in 0..NON_READER_READS {
            c.send(cmd::READ, 0, 0, NON_READER_READ_BYTES, &[]).unwrap();
        }
        hostile.push(c);
    }
    std::thread::sleep(NON_READER_SETTLE);
    let after = rss_bytes(target.pid());
    let growth = after.saturating_sub(before);
    println!(
        "RSS {} MiB before, {} MiB with {NON_READERS} non-readers (growth bound {} MiB)",
        before / MIB,
        after / MIB,
        RSS_GROWTH_MAX_BYTES / MIB
    );
    assert!(
        growth <= RSS_GROWTH_MAX_BYTES,
        "{NON_READERS} clients that never read grew RSS by {} MiB, bound {} MiB",
        growth / MIB,
        RSS_GROWTH_MAX_BYTES / MIB
    );

    let read = good
        .read(0, MIB as u32)
        .unwrap()
        .expect("the good client is served");
    assert_eq!(read, data, "the good client reads what it wrote");
    let mut late = connect_export(nbd).expect("a new client connects during the attack");
    let read = late.read(0, 4096).unwrap().expect("a new client is served");
    assert_eq!(read, data[..4096]);
    drop(hostile);
}
