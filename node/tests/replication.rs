//! Multi-process replication tests: every node is a real `cairn-node` process, replicas are
//! reached over TCP (loopback, or a veth pair into a network namespace), and data goes in
//! and out through the nexus's NBD export. They guard, end to end:
//!
//! * a replica killed with SIGKILL mid-write costs the client nothing, and when it comes back
//!   only what it missed is copied (not a full rebuild), after which the replicas are equal;
//! * a newer nexus fences an older one: the old one's writes are refused, never accepted,
//!   both when it is still connected and when it was partitioned away and comes back;
//! * a replica added to a live volume is rebuilt in full, online, under writes;
//! * a replica whose disk stops answering is faulted at the I/O timeout instead of hanging
//!   the volume, and is resynced once it recovers; writes it was still holding must not land
//!   over the data the resync gave it;
//! * a malformed frame on the replica port closes only that connection;
//! * data generations: a new nexus over a current and a stale copy trusts only the current
//!   one and never reads the stale one, even when the current one's disk fails (the
//!   stale-copy trap); a restarted old primary re-running its create without a takeover is
//!   refused while the live nexus keeps serving; `verify` names the copy that is wrong and
//!   `--repair` rewrites it.
//!
//! Each test reads the whole volume back and compares it with a model of every write that
//! was acknowledged. Nothing here asserts on timing: the timeouts only turn hangs into
//! failures. The in-process versions of these rules are in replication/tests/nexus.rs.

mod common;

#[path = "../../engine/tests/common/nbd_client.rs"]
mod nbd_client;

#[path = "common/cluster.rs"]
mod cluster;

#[path = "common/ready.rs"]
mod ready;

use cluster::{
    all_in_sync, flush, replica, Admin, Config, Daemon, Netns, Workload, Writer, BLOCKS, MIB,
    VOLUME, VOLUME_BYTES,
};
use common::WorkDir;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::time::{Duration, Instant};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// NBD read timeout while a replica is slow: far above the nexus's I/O timeout, so only a
/// hang trips it.
const SLOW_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A node that hosts the volume locally (for a "local" replica) and runs the nexus.
fn nexus_node() -> Config {
    Config {
        replica_volume: true,
        ..Config::default()
    }
}

/// SIGKILL of a replica while a client writes: the client sees no error, the nexus records
/// what the replica missed (and what it had not flushed), and after a restart on the same
/// data dir and port the resync copies no more than twice what was written while it was out.
#[test]
fn kill_9_a_replica_during_writes() {
    let dir = WorkDir::new("repl-kill9");
    let a = Daemon::start(&dir, "a", nexus_node());
    let mut b = Daemon::start(&dir, "b", Config::replica(LOCALHOST));
    let b_addr = b.replica();
    let mut admin = a.admin();
    let v = admin.create_nexus(&["local".into(), b_addr.clone()], 1000);
    assert_eq!(v.state, "online", "{v:#?}");
    admin.export_nexus();

    let mut writer = Writer::start(Workload::new(0x5eed_0001), a.nbd());
    writer.wait_bytes(8 * MIB);
    let at_kill = writer.bytes();
    b.kill9();
    let (w, mut nbd) = writer.finish_at(at_kill + 4 * MIB);
    let out_bytes = w.bytes - at_kill;
    let v = admin.show();
    assert_eq!(replica(&v, &b_addr).state, "faulted", "{v:#?}");
    assert_eq!(v.state, "degraded", "{v:#?}");

    b.restart();
    let v = admin.wait_for("resync of b after its restart", all_in_sync);
    let copied = replica(&v, &b_addr).copied_bytes;
    assert!(copied > 0, "nothing was copied to b: {v:#?}");
    assert!(
        copied <= 2 * out_bytes,
        "resync copied {copied} bytes for {out_bytes} written while b was out (a full \
         rebuild would be {VOLUME_BYTES}): {v:#?}"
    );
    admin.assert_verified(2);
    w.check(&mut nbd).unwrap();
}

/// A nexus created on another node over the same replicas takes a higher epoch, and the
/// first write of the old nexus after that is refused with an NBD error; the old nexus shows
/// "fenced", and the refused write is nowhere in the volume the new nexus serves.
#[test]
fn a_new_nexus_fences_the_old_one() {
    let dir = WorkDir::new("repl-fence");
    let b = Daemon::start(&dir, "b", Config::replica(LOCALHOST));
    let c = Daemon::start(&dir, "c", Config::replica(LOCALHOST));
    let a = Daemon::start(&dir, "a", Config::default());
    let d = Daemon::start(&dir, "d", Config::default());
    let replicas = [b.replica(), c.replica()];

    let mut admin_a = a.admin();
    admin_a.create_nexus(&replicas, 1000);
    admin_a.export_nexus();
    let mut nbd_a = a.nbd();
    let mut w = Workload::new(0x5eed_0002);
    w.write_block(&mut nbd_a, 0).unwrap();
    flush(&mut nbd_a).unwrap();

    let mut admin_d = d.admin();
    admin_d.take_over(&replicas, 1000);
    let (old, new) = (admin_a.show(), admin_d.show());
    assert!(
        new.epoch > old.epoch,
        "the new nexus's epoch {} is not above the old one's {}",
        new.epoch,
        old.epoch
    );
    let e = w.write_refused(&mut nbd_a, 1);
    assert_ne!(
        e, 0,
        "the old nexus's write was accepted after it was fenced"
    );
    let v = admin_a.wait_for("the old nexus fenced", |v| v.state == "fenced");
    assert_eq!(v.epoch, old.epoch, "{v:#?}");
    assert_ne!(
        w.write_refused(&mut nbd_a, 2),
        0,
        "a fenced nexus accepted a write"
    );

    admin_d.export_nexus();
    let mut nbd_d = d.nbd();
    w.write_block(&mut nbd_d, 3).unwrap();
    flush(&mut nbd_d).unwrap();
    w.check(&mut nbd_d).unwrap();
    admin_d.assert_verified(2);
}

/// The same rule across a real partition: the old nexus's node sits in a network namespace;
/// its link is cut, a write it takes meanwhile fails, a new nexus elsewhere takes over the
/// replicas, and when the link comes back the old nexus finds itself fenced and refuses
/// writes. None of its writes after the takeover reach the replicas, including the frames
/// its kernel still held for them when the link came back. Needs root (skipped otherwise).
#[test]
fn a_partitioned_old_nexus_is_fenced_when_the_partition_heals() {
    if !cairn_testkit::require_root("network namespaces: ip netns, veth") {
        return;
    }
    let net = match Netns::create("fence") {
        Ok(n) => n,
        Err(e) => {
            cairn_testkit::require(
                false,
                format_args!("cannot make a network namespace here: {e}"),
            );
            return;
        }
    };
    let dir = WorkDir::new("repl-partition");
    let b = Daemon::start(&dir, "b", Config::replica(net.host_ip));
    let c = Daemon::start(&dir, "c", Config::replica(net.host_ip));
    let a = Daemon::start(
        &dir,
        "a",
        Config {
            admin_ip: net.ns_ip,
            replica_listen: "off".into(),
            netns: Some(net.name.clone()),
            ..Config::default()
        },
    );
    let d = Daemon::start(&dir, "d", Config::default());
    let replicas = [b.replica(), c.replica()];

    let mut admin_a = a.admin();
    let old = admin_a.create_nexus(&replicas, 1000);
    admin_a.export_nexus();
    drop(admin_a);
    // The client reaches a from inside its namespace, so the cut separates a from the
    // replicas only.
    let mut nbd_a = net.nbd(&a);
    let mut w = Workload::new(0x5eed_0003);
    for block in 0..4 {
        w.write_block(&mut nbd_a, block).unwrap();
    }
    flush(&mut nbd_a).unwrap();

    net.cut();
    let e = w.write_refused(&mut nbd_a, 10);
    assert_ne!(
        e, 0,
        "a write with every replica unreachable was acknowledged"
    );

    let mut admin_d = d.admin();
    let new = admin_d.take_over(&replicas, 1000);
    assert!(
        new.epoch > old.epoch,
        "the new nexus's epoch {} is not above the old one's {}",
        new.epoch,
        old.epoch
    );
    admin_d.export_nexus();
    let mut nbd_d = d.nbd();
    w.write_block(&mut nbd_d, 0).unwrap();
    w.write_block(&mut nbd_d, 5).unwrap();
    flush(&mut nbd_d).unwrap();

    net.heal();
    let mut admin_a = a.admin();
    admin_a.wait_for("the old nexus fenced", |v| v.state == "fenced");
    assert_ne!(
        w.write_refused(&mut nbd_a, 11),
        0,
        "a fenced nexus accepted a write"
    );
    // The frames of the write taken during the cut reach the replicas only now, when a's
    // kernel retransmits them; they must be refused too. A replica has handled them once it
    // has seen a's old connection end (closed by a, or failed).
    let peer_a = format!("{}:", net.ns_ip);
    for r in [&b, &c] {
        wait_log(r, |l| {
            l.contains("replica connection") && l.contains(&peer_a)
        });
    }
    w.check(&mut nbd_d).unwrap();
    admin_d.assert_verified(2);
}

/// Waits until node `d`'s log has a line that `wanted` accepts.
fn wait_log(d: &Daemon, wanted: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + cluster::CONVERGE_TIMEOUT;
    while !d.log().lines().any(&wanted) {
        assert!(
            Instant::now() < deadline,
            "node {} never logged the line waited for\n{}",
            d.name,
            d.log_tail()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// AddReplica on a live volume: the new replica is rebuilt in full (the resync says
/// full=true while it runs) while a client keeps writing, joins the in-sync set, and then
/// holds exactly what the first replica holds.
#[test]
fn a_new_replica_is_rebuilt_online_under_load() {
    let dir = WorkDir::new("repl-rebuild");
    let a = Daemon::start(&dir, "a", nexus_node());
    let mut admin = a.admin();
    admin.create_nexus(&["local".into()], 1000);
    admin.export_nexus();
    let mut w = Workload::new(0x5eed_0004);
    let mut nbd = a.nbd();
    for block in 0..BLOCKS / 2 {
        w.write_block(&mut nbd, block).unwrap();
    }
    flush(&mut nbd).unwrap();
    let before = w.bytes;

    let c = Daemon::start(&dir, "c", Config::replica(LOCALHOST));
    let c_addr = c.replica();
    let mut writer = Writer::start(w, nbd);
    writer.wait_bytes(before + MIB);
    admin.add_replica(&c_addr);
    let mut seen = None;
    let deadline = Instant::now() + cluster::CONVERGE_TIMEOUT;
    let v = loop {
        let v = admin.show();
        if let Some(r) = &v.resync {
            seen = Some(r.clone());
        }
        if v.replicas.len() == 2 && all_in_sync(&v) {
            break v;
        }
        assert!(Instant::now() < deadline, "no rebuild of c: {v:#?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let (w, mut nbd) = writer.stop();
    if let Some(r) = seen {
        assert!(r.full, "a new replica got a partial resync: {r:?}");
        assert_eq!(r.replica, c_addr, "{r:?}");
    } else {
        cairn_testkit::note("the rebuild finished before it could be seen in progress");
    }
    let copied = replica(&v, &c_addr).copied_bytes;
    assert!(
        copied >= VOLUME_BYTES,
        "a rebuild copies the whole volume; copied {copied}: {v:#?}"
    );
    admin.assert_verified(2);
    w.check(&mut nbd).unwrap();
}

/// Starts a nexus over this node's volume and replica `b`, exported, with a client whose
/// reads wait long enough that only a hang trips them.
fn slow_replica_setup(a: &Daemon, b_addr: &str) -> (Admin, nbd_client::Client) {
    let mut admin = a.admin();
    admin.create_nexus(&["local".into(), b_addr.into()], 500);
    admin.export_nexus();
    let nbd = a.nbd();
    nbd.stream
        .set_read_timeout(Some(SLOW_READ_TIMEOUT))
        .unwrap();
    (admin, nbd)
}

fn fault_injected_replica() -> Config {
    Config {
        fault_injection: true,
        ..Config::replica(LOCALHOST)
    }
}

/// A replica whose disk takes 20 s per request: writes through the nexus still complete
/// (the replica is faulted at the 500 ms I/O timeout, with a reason saying it did not
/// answer), and once the disk is healed the replica is resynced and equal again.
#[test]
fn a_slow_replica_is_faulted_and_the_volume_keeps_going() {
    let dir = WorkDir::new("repl-slow");
    let a = Daemon::start(&dir, "a", nexus_node());
    let b = Daemon::start(&dir, "b", fault_injected_replica());
    let b_addr = b.replica();
    let (mut admin, mut nbd) = slow_replica_setup(&a, &b_addr);
    let mut w = Workload::new(0x5eed_0005);
    // Every block is written once, so writes the slow disk still holds carry the same data
    // as the resync; a_slow_replicas_late_writes_do_not_undo_its_resync covers rewrites.
    for block in 0..16 {
        w.write_block(&mut nbd, block).unwrap();
    }
    flush(&mut nbd).unwrap();

    let mut admin_b = b.admin();
    admin_b.set_fault(20_000_000, false);
    for block in 16..48 {
        w.write_block(&mut nbd, block).unwrap();
    }
    flush(&mut nbd).unwrap();
    let v = admin.show();
    let r = replica(&v, &b_addr);
    assert_ne!(r.state, "in-sync", "{v:#?}");
    assert!(r.reason.contains("no answer"), "{v:#?}");

    admin_b.set_fault(0, true);
    admin.wait_for("resync of the healed replica", all_in_sync);
    admin.assert_verified(2);
    w.check(&mut nbd).unwrap();
}

/// A write the slow replica's disk still holds when the nexus gives up on it must not land
/// after the resync has brought that replica up to date: the nexus counted it as missed and
/// the client then overwrites the block, so if it landed later the replicas would differ (and
/// a failover to that replica would serve the old data). The replica takes the reconnecting
/// nexus back only once that write has reached its disk, so the resync can only end after
/// the disk's delay.
#[test]
fn a_slow_replicas_late_writes_do_not_undo_its_resync() {
    const LATENCY: Duration = Duration::from_secs(8);
    let dir = WorkDir::new("repl-late");
    let a = Daemon::start(&dir, "a", nexus_node());
    let b = Daemon::start(&dir, "b", fault_injected_replica());
    let b_addr = b.replica();
    let (mut admin, mut nbd) = slow_replica_setup(&a, &b_addr);
    let mut w = Workload::new(0x5eed_0006);
    for block in 0..8 {
        w.write_block(&mut nbd, block).unwrap();
    }
    flush(&mut nbd).unwrap();

    let mut admin_b = b.admin();
    admin_b.set_fault(LATENCY.as_micros() as u64, false);
    let slowed = Instant::now();
    w.write_block(&mut nbd, 3).unwrap();
    admin_b.set_fault(0, true);
    admin.wait_for("resync of the healed replica", all_in_sync);
    let in_sync_after = slowed.elapsed();
    assert!(
        in_sync_after >= LATENCY,
        "the replica was back in sync {in_sync_after:?} after the slowed write, before its \
         disk had that write ({LATENCY:?})"
    );
    w.write_block(&mut nbd, 3).unwrap();
    flush(&mut nbd).unwrap();
    admin.assert_verified(2);
    w.check(&mut nbd).unwrap();
}

fn open_raw(addr: &str, epoch: u64) -> TcpStream {
    use cairn_replication::proto::{self, Envelope, Epoch, Message, RequestId, HEADER_BYTES};
    let mut s = connect_raw(addr);
    let env = Envelope {
        volume_id: cairn_replication::replica::volume_id_for(VOLUME),
        epoch: Epoch::new(epoch).unwrap(),
        request_id: RequestId::new(0),
    };
    let mut out = Vec::new();
    proto::encode_into(&env, &Message::Open { takeover: false }, &mut out);
    s.write_all(&out).unwrap();
    let mut h = [0u8; HEADER_BYTES];
    s.read_exact(&mut h).expect("an answer to Open");
    let header = proto::decode_header(&h).unwrap();
    let mut payload = vec![0u8; header.payload_bytes as usize];
    s.read_exact(&mut payload).unwrap();
    proto::verify_payload(&header, &h, &payload).unwrap();
    match proto::decode(&header, &payload).unwrap() {
        Message::OpenOk { size_bytes, .. } => assert_eq!(size_bytes, VOLUME_BYTES),
        other => panic!("Open at epoch {epoch} answered {other:?}"),
    }
    s
}

fn connect_raw(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Sends `bytes` and asserts the server closes the connection without answering.
fn assert_closed_after(mut s: TcpStream, bytes: &[u8], what: &str) {
    // The server may close before it has read everything: a failed send is a close too.
    drop(s.write_all(bytes));
    let mut b = [0u8; 256];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!("{what}: the server answered {n} bytes instead of closing"),
        Err(e) => panic!("{what}: the server neither answered nor closed: {e}"),
    }
}

/// Garbage, a frame with a bad crc, a reply opcode and an oversized header on the replica
/// port each close that one connection; the nexus's own connection to the same replica keeps
/// carrying writes, the replica never leaves the in-sync set, and none of the malformed
/// frames' data reached the volume.
#[test]
fn a_malformed_frame_closes_only_that_connection() {
    use cairn_replication::proto::{self, Envelope, Epoch, Message, RequestId, PAYLOAD_MAX_BYTES};
    let dir = WorkDir::new("repl-malformed");
    let a = Daemon::start(&dir, "a", nexus_node());
    let b = Daemon::start(&dir, "b", Config::replica(LOCALHOST));
    let b_addr = b.replica();
    let mut admin = a.admin();
    let v = admin.create_nexus(&["local".into(), b_addr.clone()], 10_000);
    admin.export_nexus();
    let mut writer = Writer::start(Workload::new(0x5eed_0007), a.nbd());
    writer.wait_bytes(MIB);

    let env = Envelope {
        volume_id: cairn_replication::replica::volume_id_for(VOLUME),
        epoch: Epoch::new(v.epoch).unwrap(),
        request_id: RequestId::new(1),
    };
    let frame = |msg: &Message<'_>| {
        let mut out = Vec::new();
        proto::encode_into(&env, msg, &mut out);
        out
    };
    // Data no write of the workload makes, at a block it may have written.
    let stray = cluster::block_data(0, u64::MAX);
    let mut bad_crc = frame(&Message::Write {
        offset_bytes: 0,
        fua: false,
        data: &stray,
    });
    *bad_crc.last_mut().unwrap() ^= 0xff;
    let mut oversized = frame(&Message::Flush);
    oversized[48..52].copy_from_slice(&(PAYLOAD_MAX_BYTES + 1).to_le_bytes());

    let mut progress = writer.bytes();
    let cases: [(&str, Option<u64>, Vec<u8>); 5] = [
        ("garbage before Open", None, vec![0xa5; 64]),
        ("a bad crc before Open", None, bad_crc.clone()),
        ("a bad crc after Open", Some(v.epoch), bad_crc),
        (
            "a reply opcode after Open",
            Some(v.epoch),
            frame(&Message::Ok),
        ),
        ("an oversized payload after Open", Some(v.epoch), oversized),
    ];
    for (what, epoch, bytes) in cases {
        let s = match epoch {
            None => connect_raw(&b_addr),
            Some(e) => open_raw(&b_addr, e),
        };
        assert_closed_after(s, &bytes, what);
        // The nexus keeps writing to b meanwhile.
        progress += MIB;
        writer.wait_bytes(progress);
        let v = admin.show();
        let r = replica(&v, &b_addr);
        assert_eq!(
            (r.state.as_str(), r.copied_bytes),
            ("in-sync", 0),
            "after {what}: {v:#?}"
        );
    }
    let (w, mut nbd) = writer.stop();
    admin.assert_verified(2);
    w.check(&mut nbd).unwrap();
}

/// The epoch lock-out (issue 16): an Open with TAKEOVER at epoch u64::MAX once became the
/// replica's fence, after which a promote computed u64::MAX + 1, wrapped to 0 ("epoch 0 is
/// not a valid epoch"), and create, destroy and unexport all failed for good. Now an Open
/// above `EPOCH_MAX` (u64::MAX, and EPOCH_MAX + 1) is refused when it is decoded: the
/// connection closes, no fence moves, the nexus keeps writing with the replica in sync, and
/// promote, unexport, destroy and a new takeover all work afterwards.
#[test]
fn an_open_above_the_epoch_maximum_is_refused_and_the_volume_stays_usable() {
    use cairn_replication::proto::{self, Envelope, Epoch, Message, RequestId, EPOCH_MAX};
    let dir = WorkDir::new("repl-epoch-max");
    let a = Daemon::start(&dir, "a", nexus_node());
    let b = Daemon::start(&dir, "b", Config::replica(LOCALHOST));
    let b_addr = b.replica();
    let replicas = ["local".to_string(), b_addr.clone()];
    let mut admin = a.admin();
    let v = admin.create_nexus(&replicas, 10_000);
    admin.export_nexus();
    let mut writer = Writer::start(Workload::new(0x5eed_0016), a.nbd());
    writer.wait_bytes(MIB);

    for absurd in [u64::MAX, EPOCH_MAX + 1] {
        let env = Envelope {
            volume_id: cairn_replication::replica::volume_id_for(VOLUME),
            epoch: Epoch::new(v.epoch).unwrap(),
            request_id: RequestId::new(1),
        };
        let mut frame = Vec::new();
        proto::encode_into(&env, &Message::Open { takeover: true }, &mut frame);
        // The encoder refuses such an epoch; an attacker writes the bytes itself.
        frame[24..32].copy_from_slice(&absurd.to_le_bytes());
        let header: &[u8; proto::HEADER_BYTES] = frame[..proto::HEADER_BYTES].try_into().unwrap();
        let crc = proto::frame_crc(header, &frame[proto::HEADER_BYTES..]);
        frame[56..60].copy_from_slice(&crc.to_le_bytes());
        assert_closed_after(
            connect_raw(&b_addr),
            &frame,
            &format!("Open at epoch {absurd}"),
        );
        let progress = writer.bytes() + MIB;
        writer.wait_bytes(progress);
        let now = admin.show();
        assert_eq!(
            (
                now.state.as_str(),
                now.epoch,
                replica(&now, &b_addr).state.as_str()
            ),
            ("online", v.epoch, "in-sync"),
            "after an Open at epoch {absurd}: {now:#?}"
        );
    }
    let (w, mut nbd) = writer.stop();
    w.check(&mut nbd).unwrap();
    drop(nbd);

    let promoted = admin.promote();
    assert_eq!(promoted.epoch, v.epoch + 1, "{promoted:#?}");
    admin.unexport(VOLUME);
    admin.destroy_nexus();
    let again = admin.take_over(&replicas, 10_000);
    assert!(again.epoch > promoted.epoch, "{again:#?}");
    admin.export_nexus();
    let mut nbd = a.nbd();
    w.check(&mut nbd).unwrap();
}

/// The stale-copy trap (issue 13): C is killed, writes go on through A (A and B take them),
/// then A dies. A new nexus over B and C, taking the volume over, must trust B (the higher
/// data generation) and rebuild C before anything is read from it. With B's disk failing
/// every read while C's rebuild still runs, reads fail; they never return C's old data.
/// Before data generations, the new nexus counted C in sync and a read that failed on B was
/// retried on C, which returned the blocks as they were before C was killed.
#[test]
fn the_stale_copy_trap() {
    let dir = WorkDir::new("repl-stale");
    let mut a = Daemon::start(&dir, "a", nexus_node());
    let b = Daemon::start(&dir, "b", fault_injected_replica());
    let mut c = Daemon::start(&dir, "c", Config::replica(LOCALHOST));
    let d = Daemon::start(&dir, "d", Config::default());
    let (b_addr, c_addr) = (b.replica(), c.replica());
    let mut admin_a = a.admin();
    admin_a.create_nexus(&["local".into(), b_addr.clone(), c_addr.clone()], 1000);
    admin_a.export_nexus();
    let mut nbd_a = a.nbd();
    let mut w = Workload::new(0x5eed_0013);
    for block in 0..BLOCKS / 2 {
        w.write_block(&mut nbd_a, block).unwrap();
    }
    flush(&mut nbd_a).unwrap();
    c.kill9();
    // Every block C holds is rewritten while it is down, so its whole copy is stale.
    for block in 0..BLOCKS / 2 {
        w.write_block(&mut nbd_a, block).unwrap();
    }
    flush(&mut nbd_a).unwrap();
    drop(nbd_a);
    a.kill9();
    c.restart();

    let mut admin_d = d.admin();
    let replicas = [b_addr.clone(), c_addr.clone()];
    let req = cairn_node::proto::CreateNexusRequest {
        takeover: true,
        // Slow enough that C's rebuild is still running when B's disk fails.
        rebuild_bytes_per_s: MIB / 2,
        ..Admin::create_request(&replicas, 1000)
    };
    let v = admin_d.try_create_nexus(&req).unwrap();
    assert_eq!(replica(&v, &b_addr).state, "in-sync", "{v:#?}");
    assert_eq!(replica(&v, &c_addr).state, "syncing", "{v:#?}");
    assert!(replica(&v, &c_addr).reason.contains("stale"), "{v:#?}");
    admin_d.export_nexus();
    let mut nbd_d = d.nbd();
    w.check(&mut nbd_d).unwrap();

    b.admin().set_fault_errno(0, libc::EIO, false);
    let mut failed = 0;
    for block in 0..BLOCKS {
        let off = block * cluster::BLOCK_BYTES;
        match nbd_d.read(off, cluster::BLOCK_BYTES as u32) {
            Ok(Ok(got)) => assert!(
                got == w.expected(block),
                "block {block} read back data that is not the last acknowledged write: \
                 {} (C's stale copy?)",
                cluster::describe_block(&got)
            ),
            Ok(Err(_)) => failed += 1,
            Err(e) => panic!("read at {off}: connection failed: {e}"),
        }
    }
    assert!(
        failed > 0,
        "every read succeeded with B's disk failing: {:#?}",
        admin_d.show()
    );
    let v = admin_d.show();
    assert_ne!(replica(&v, &c_addr).state, "in-sync", "{v:#?}");
}

/// A restarted old primary that re-runs its original `nexus create` (no takeover) over
/// replicas a newer nexus now owns is refused, with an error naming each replica and its
/// epoch, and the live nexus's client keeps writing without an error. Before the takeover
/// rule, that create fenced the live nexus (its client got EIO) and served its own stale view.
#[test]
fn a_restarted_old_primary_is_refused_and_the_live_nexus_keeps_serving() {
    let dir = WorkDir::new("repl-old-primary");
    let b = Daemon::start(&dir, "b", Config::replica(LOCALHOST));
    let c = Daemon::start(&dir, "c", Config::replica(LOCALHOST));
    let mut a = Daemon::start(&dir, "a", Config::default());
    let d = Daemon::start(&dir, "d", Config::default());
    let replicas = [b.replica(), c.replica()];
    let mut admin_a = a.admin();
    admin_a.create_nexus(&replicas, 1000);
    admin_a.export_nexus();
    let mut nbd_a = a.nbd();
    let mut w = Workload::new(0x5eed_0014);
    for block in 0..8 {
        w.write_block(&mut nbd_a, block).unwrap();
    }
    flush(&mut nbd_a).unwrap();
    drop((nbd_a, admin_a));
    a.kill9();

    let mut admin_d = d.admin();
    let live = admin_d.take_over(&replicas, 1000);
    admin_d.export_nexus();
    let mut writer = Writer::start(w, d.nbd());
    writer.wait_bytes(writer.bytes() + MIB);

    a.restart();
    let refused = a
        .admin()
        .try_create_nexus(&Admin::create_request(&replicas, 1000))
        .expect_err("the old primary's create over replicas a live nexus owns was accepted");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    for r in &replicas {
        assert!(
            refused
                .message()
                .contains(&format!("'{r}' at epoch {}", live.epoch)),
            "the refusal does not name replica {r} at epoch {}: {refused:?}",
            live.epoch
        );
    }
    let at_refusal = writer.bytes();
    writer.wait_bytes(at_refusal + MIB);
    let (w, mut nbd) = writer.stop();
    let v = admin_d.show();
    assert_eq!(
        (v.state.as_str(), v.epoch),
        ("online", live.epoch),
        "{v:#?}"
    );
    w.check(&mut nbd).unwrap();
    admin_d.assert_verified(2);
}

/// `verify` names the copy that is wrong: a block changed on B behind the nexus's back (a
/// raw write under the nexus's epoch) is reported as one mismatched region where the local
/// copy (the source) agrees and B differs; `verify --repair` takes B out and rewrites that
/// region from the source, after which the copies are equal and hold the model.
#[test]
fn verify_names_the_wrong_copy_and_repair_rewrites_it() {
    use cairn_replication::proto::{self, Envelope, Epoch, Message, RequestId, HEADER_BYTES};
    let dir = WorkDir::new("repl-verify");
    let a = Daemon::start(&dir, "a", nexus_node());
    let b = Daemon::start(&dir, "b", Config::replica(LOCALHOST));
    let b_addr = b.replica();
    let mut admin = a.admin();
    let v = admin.create_nexus(&["local".into(), b_addr.clone()], 10_000);
    admin.export_nexus();
    let mut nbd = a.nbd();
    let mut w = Workload::new(0x5eed_0015);
    for block in 0..16 {
        w.write_block(&mut nbd, block).unwrap();
    }
    flush(&mut nbd).unwrap();

    const WRONG_BLOCK: u64 = 3;
    let mut s = open_raw(&b_addr, v.epoch);
    let env = Envelope {
        volume_id: cairn_replication::replica::volume_id_for(VOLUME),
        epoch: Epoch::new(v.epoch).unwrap(),
        request_id: RequestId::new(1),
    };
    let garbage = vec![0xeeu8; cluster::BLOCK_BYTES as usize];
    let mut out = Vec::new();
    let write = Message::Write {
        offset_bytes: WRONG_BLOCK * cluster::BLOCK_BYTES,
        fua: true,
        data: &garbage,
    };
    proto::encode_into(&env, &write, &mut out);
    s.write_all(&out).unwrap();
    let mut h = [0u8; HEADER_BYTES];
    s.read_exact(&mut h).expect("an answer to the raw write");
    let header = proto::decode_header(&h).unwrap();
    assert_eq!(header.opcode, proto::Opcode::Ok, "{header:?}");
    drop(s);

    let r = admin.verify();
    assert_eq!(r.mismatched_regions, vec![WRONG_BLOCK], "{r:?}");
    assert_eq!(r.source, "local", "{r:?}");
    assert_eq!(r.details.len(), 1, "{r:?}");
    assert_eq!(r.details[0].agree, vec!["local".to_string()], "{r:?}");
    assert_eq!(r.details[0].differ, vec![b_addr.clone()], "{r:?}");
    assert!(
        r.repairing.is_empty(),
        "verify without repair repaired: {r:?}"
    );

    let r = admin.verify_with(true);
    assert_eq!(r.repairing, vec![b_addr.clone()], "{r:?}");
    admin.wait_for("the repair of b", all_in_sync);
    admin.assert_verified(2);
    w.check(&mut nbd).unwrap();
}
