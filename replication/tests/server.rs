//! The replica server under hostile and stale peers: garbage, a wrong checksum, a truncated
//! frame, an unknown volume, a stale or equal-epoch takeover, a request under another epoch,
//! and a request fenced off by a newer nexus. Each is refused with the protocol's answer or a
//! closed connection, and the server keeps serving a well-behaved nexus throughout (the
//! property: bad input from one peer never costs another peer anything).
//!
//! Shutting the server down closes an idle connection at once, although its reactor sleeps:
//! the stop flag alone was seen only at the next request or at engine stop (a lost wake-up).

use cairn_engine::bdev::fault::{FaultBdev, FaultControl};
use cairn_engine::bdev::malloc::MallocBdev;
use cairn_engine::BdevHandle;
use cairn_engine::{CoreList, Engine, EngineConfig};
use cairn_replication::epoch::EpochStore;
use cairn_replication::proto::{self, Envelope, Epoch, Message, RequestId, VolumeId, HEADER_BYTES};
use cairn_replication::replica::{volume_id_for, ReplicaSet};
use cairn_replication::server::ReplicaServer;
use cairn_replication::transport::tcp::TcpTransport;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

const SIZE: u64 = 4 << 20;
/// How long an idle connection may stay open after the server's shutdown before the test
/// fails; it only turns a missed wake-up into a failure, which would otherwise last forever.
const SHUTDOWN_CLOSE_MAX: Duration = Duration::from_secs(10);
/// Long enough for an idle reactor to stop spinning and go to sleep.
const SETTLE: Duration = Duration::from_millis(100);

struct Fixture {
    engine: Arc<Engine>,
    server: ReplicaServer,
    id: VolumeId,
    malloc: BdevHandle,
    fault: Arc<FaultControl>,
}

fn fixture(tag: &str) -> Fixture {
    let cpus = cairn_engine::sys::allowed_cpus();
    let mut config = EngineConfig::new(CoreList::parse(&cpus[0].to_string()).unwrap());
    config.buf_count = 64;
    let engine = Arc::new(Engine::start(config).unwrap());
    let inner = Arc::new(MallocBdev::new("r", SIZE, 4096).unwrap());
    let malloc = engine.add_bdev(inner.clone()).unwrap();
    let faulty = FaultBdev::new("r-fault", inner);
    let fault = faulty.control();
    let handle = engine.add_bdev(Arc::new(faulty)).unwrap();
    let id = volume_id_for("vol");
    let dir = std::env::temp_dir().join(format!("cairn-server-test-{}-{tag}", std::process::id()));
    drop(std::fs::remove_dir_all(&dir));
    let replicas = Arc::new(ReplicaSet::new(
        EpochStore::open(&dir).unwrap(),
        Box::new(move |asked| (*asked == id).then(|| ("vol".to_string(), handle.clone()))),
    ));
    let server = ReplicaServer::start(
        engine.clone(),
        Arc::new(TcpTransport),
        "127.0.0.1:0",
        replicas,
    )
    .unwrap();
    Fixture {
        engine,
        server,
        id,
        malloc,
        fault,
    }
}

fn connect(f: &Fixture) -> TcpStream {
    let s = TcpStream::connect(f.server.endpoint()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

fn env(id: VolumeId, epoch: u64, request: u64) -> Envelope {
    Envelope {
        volume_id: id,
        epoch: Epoch::new(epoch).unwrap(),
        request_id: RequestId::new(request),
    }
}

fn send(s: &mut TcpStream, e: &Envelope, m: &Message<'_>) {
    let mut out = Vec::new();
    proto::encode_into(e, m, &mut out);
    s.write_all(&out).unwrap();
}

/// The next frame, or None when the server closed the connection.
fn recv(s: &mut TcpStream) -> Option<(proto::Header, Vec<u8>)> {
    let mut head = [0u8; HEADER_BYTES];
    if s.read_exact(&mut head).is_err() {
        return None;
    }
    let h = proto::decode_header(&head).expect("the server sends valid headers");
    let mut payload = vec![0u8; h.payload_bytes as usize];
    s.read_exact(&mut payload).ok()?;
    proto::verify_payload(&h, &head, &payload).expect("the server sends valid frames");
    Some((h, payload))
}

fn answer(s: &mut TcpStream) -> Option<Message<'static>> {
    let (h, payload) = recv(s)?;
    let payload: &'static [u8] = Box::leak(payload.into_boxed_slice());
    Some(proto::decode(&h, payload).unwrap())
}

fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

fn open(f: &Fixture, epoch: u64, takeover: bool) -> (TcpStream, Option<Message<'static>>) {
    let mut s = connect(f);
    send(&mut s, &env(f.id, epoch, 0), &Message::Open { takeover });
    let a = answer(&mut s);
    (s, a)
}

/// A well-behaved peer: write then read back one block under `epoch`.
fn healthy_round_trip(f: &Fixture, epoch: u64, fill: u8) {
    let (mut s, a) = open(f, epoch, false);
    assert!(matches!(a, Some(Message::OpenOk { .. })), "{a:?}");
    let data = vec![fill; 4096];
    let e = env(f.id, epoch, 7);
    send(
        &mut s,
        &e,
        &Message::Write {
            offset_bytes: 8192,
            fua: false,
            data: &data,
        },
    );
    assert_eq!(answer(&mut s), Some(Message::Ok));
    send(
        &mut s,
        &e,
        &Message::Read {
            offset_bytes: 8192,
            len_bytes: 4096,
        },
    );
    match answer(&mut s) {
        Some(Message::ReadData { data: back }) => assert_eq!(back, &data[..]),
        other => panic!("read answered {other:?}"),
    }
}

#[test]
fn hostile_peers_are_refused_and_others_keep_being_served() {
    let f = fixture("hostile");
    let (_owner, a) = open(&f, 5, true);
    assert!(
        matches!(a, Some(Message::OpenOk { epoch_accepted, .. }) if epoch_accepted.get() == 5),
        "{a:?}"
    );
    healthy_round_trip(&f, 5, 1);

    let mut s = connect(&f);
    s.write_all(&[0xde; 200]).unwrap();
    assert!(closed(&mut s), "garbage did not close the connection");

    let mut s = connect(&f);
    let mut out = Vec::new();
    proto::encode_into(
        &env(f.id, 5, 0),
        &Message::Open { takeover: false },
        &mut out,
    );
    out[HEADER_BYTES - 8] ^= 1;
    s.write_all(&out).unwrap();
    assert!(closed(&mut s), "a wrong crc was accepted");

    let mut s = connect(&f);
    s.write_all(&out[..20]).unwrap();
    drop(s);

    let (mut s, a) = {
        let mut s = connect(&f);
        send(
            &mut s,
            &env(volume_id_for("nope"), 5, 0),
            &Message::Open { takeover: false },
        );
        let a = answer(&mut s);
        (s, a)
    };
    assert_eq!(
        a,
        Some(Message::Error {
            errno: libc::ENOENT as u32
        })
    );
    assert!(closed(&mut s));

    let (mut s, a) = open(&f, 4, false);
    assert!(
        matches!(a, Some(Message::StaleEpoch { current }) if current.get() == 5),
        "{a:?}"
    );
    assert!(closed(&mut s));
    let (_, a) = open(&f, 5, true);
    assert!(
        matches!(a, Some(Message::StaleEpoch { .. })),
        "an equal-epoch takeover was accepted: {a:?}"
    );

    let (mut s, a) = open(&f, 5, false);
    assert!(matches!(a, Some(Message::OpenOk { .. })), "{a:?}");
    send(&mut s, &env(f.id, 6, 1), &Message::Flush);
    assert!(
        closed(&mut s),
        "a request under another epoch than opened was served"
    );

    let (mut s, a) = open(&f, 5, false);
    assert!(matches!(a, Some(Message::OpenOk { .. })), "{a:?}");
    let mut out = Vec::new();
    let data = [9u8; 4096];
    proto::encode_into(
        &env(f.id, 5, 2),
        &Message::Write {
            offset_bytes: 0,
            fua: false,
            data: &data,
        },
        &mut out,
    );
    let last = out.len() - 1;
    out[last] ^= 0x80;
    s.write_all(&out).unwrap();
    assert!(closed(&mut s), "a write with a wrong crc was served");

    healthy_round_trip(&f, 5, 2);
}

#[test]
fn a_newer_takeover_fences_open_connections() {
    let f = fixture("fence");
    let (mut old, a) = open(&f, 3, true);
    assert!(matches!(a, Some(Message::OpenOk { .. })), "{a:?}");
    send(&mut old, &env(f.id, 3, 1), &Message::Flush);
    assert_eq!(answer(&mut old), Some(Message::Ok));
    let (_new, a) = open(&f, 4, true);
    assert!(matches!(a, Some(Message::OpenOk { .. })), "{a:?}");
    let data = [1u8; 4096];
    send(
        &mut old,
        &env(f.id, 3, 2),
        &Message::Write {
            offset_bytes: 0,
            fua: false,
            data: &data,
        },
    );
    assert!(
        matches!(answer(&mut old), Some(Message::StaleEpoch { current }) if current.get() == 4),
        "a write under a fenced-off epoch was not refused"
    );
    healthy_round_trip(&f, 4, 3);
}

#[test]
fn a_takeover_waits_for_the_old_nexus_writes_in_flight() {
    let f = fixture("drain");
    let (mut old, a) = open(&f, 2, true);
    assert!(matches!(a, Some(Message::OpenOk { .. })), "{a:?}");
    f.fault.set_latency(Duration::from_millis(300));
    let data = [0x5au8; 4096];
    send(
        &mut old,
        &env(f.id, 2, 1),
        &Message::Write {
            offset_bytes: 0,
            fua: false,
            data: &data,
        },
    );
    // Give the write time to reach the (slow) device before the takeover.
    std::thread::sleep(Duration::from_millis(50));
    let (_new, a) = open(&f, 3, true);
    assert!(matches!(a, Some(Message::OpenOk { .. })), "{a:?}");
    // The old write is on the device by now: the drain waited for it.
    let mut q = f.engine.queue(&f.malloc, f.engine.cores()[0], 1).unwrap();
    let mut back = [0u8; 4096];
    q.read_at(0, &mut back).unwrap();
    assert_eq!(
        back, data,
        "OpenOk came while an older epoch's write was still in flight"
    );
    assert_eq!(answer(&mut old), Some(Message::Ok));
    f.fault.heal();
}

#[test]
fn shutdown_closes_an_idle_connection_of_a_sleeping_reactor() {
    let f = fixture("shutdown");
    let (mut s, a) = open(&f, 1, true);
    assert!(matches!(a, Some(Message::OpenOk { .. })), "{a:?}");
    send(&mut s, &env(f.id, 1, 1), &Message::Flush);
    assert_eq!(answer(&mut s), Some(Message::Ok));
    std::thread::sleep(SETTLE);
    let Fixture { server, .. } = f;
    server.shutdown();
    s.set_read_timeout(Some(SHUTDOWN_CLOSE_MAX)).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!(
            "an idle connection was still open {SHUTDOWN_CLOSE_MAX:?} after the server's shutdown: {other:?}"
        ),
    }
}
