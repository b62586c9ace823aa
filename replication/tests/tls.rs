//! The replica protocol over mutual TLS (issue 16, items 1 and 2), replaying the attacks that
//! owned a replica through its port:
//!
//! * a nexus with a node certificate from the cluster CA replicates through TLS, and the bytes
//!   on the wire (recorded by a proxy in the middle) never contain the data written;
//! * a peer speaking plain frames gets no frame back: the TLS handshake fails first, so no
//!   Open, read, write or fence is ever decoded;
//! * a certificate from another CA is refused in the handshake;
//! * a certificate from the cluster CA that names an operator (`admin:`), not a node, may not
//!   open a replica, and a nexus refuses a server whose certificate names no node;
//! * after every refused attempt the legitimate nexus still reads back what it wrote;
//! * a replica assigned to node A refuses node B's nexus (EACCES), with or without takeover,
//!   while A's opens and keeps serving; the assignment survives a restart of the replica set,
//!   and a reassignment to B (a failover) lets B take over.

use cairn_engine::bdev::malloc::MallocBdev;
use cairn_engine::bdev::Bdev;
use cairn_engine::{CoreList, Engine, EngineConfig};
use cairn_replication::epoch::EpochStore;
use cairn_replication::nexus::insync::InSyncOptions;
use cairn_replication::nexus::manager::{CreateRequest, NexusManager};
use cairn_replication::nexus::{ChildSpec, NexusOptions, COPY_HOLD_MAX};
use cairn_replication::proto::{self, Envelope, Epoch, Message, RequestId};
use cairn_replication::replica::{volume_id_for, ReplicaSet};
use cairn_replication::server::ReplicaServer;
use cairn_replication::transport::{TlsTransport, Transport};
use cairn_tls::{issue, Identity, Tls, TlsFiles};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SIZE: u64 = 16 << 20;
const BLOCK: u32 = 4096;
/// What the nexus writes: a pattern the wire must never show.
const PLAINTEXT: &[u8; 32] = b"CAIRN-PLAINTEXT-ON-THE-WIRE-0001";

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("cairn-tls-test-{}-{tag}", std::process::id()));
    drop(std::fs::remove_dir_all(&d));
    d
}

fn engine() -> Arc<Engine> {
    let cpus = cairn_engine::sys::allowed_cpus();
    let list: Vec<String> = cpus.iter().take(2).map(u32::to_string).collect();
    let mut config = EngineConfig::new(CoreList::parse(&list.join(",")).unwrap());
    config.buf_count = 128;
    Arc::new(Engine::start(config).expect("engine starts"))
}

/// Issues `id` under the CA in `ca` and loads it (trusting `trust`'s CA).
fn identity(ca: &Path, trust: &Path, id: Identity) -> Tls {
    let dir = issue::issue(ca, &id, &["127.0.0.1".parse().unwrap()], &[]).unwrap();
    let mut files = TlsFiles::in_dir(&dir);
    files.ca = trust.join(cairn_tls::CA_CERT_FILE);
    Tls::load(&files).unwrap()
}

/// A TCP proxy for one connection at a time that records every byte it forwards.
fn recording_proxy(target: String) -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let server = TcpStream::connect(&target).unwrap();
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                let record = record.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 64 << 10];
                    while let Ok(n @ 1..) = from.read(&mut buf) {
                        record.lock().unwrap().extend_from_slice(&buf[..n]);
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    drop(to.shutdown(std::net::Shutdown::Both));
                });
            }
        }
    });
    (endpoint, seen)
}

fn request(endpoint: &str, takeover: bool) -> CreateRequest {
    CreateRequest {
        name: "vol".into(),
        replicas: vec![ChildSpec::Remote {
            endpoint: endpoint.into(),
        }],
        options: NexusOptions {
            min_in_sync: 1,
            region_bytes: 64 << 10,
            io_timeout: Duration::from_secs(5),
            rebuild_bytes_per_s: None,
            copy_hold_max: COPY_HOLD_MAX,
        },
        epoch: None,
        takeover,
        insync: InSyncOptions::default(),
    }
}

fn manager(engine: &Arc<Engine>, transport: Arc<dyn Transport>, tag: &str) -> Arc<NexusManager> {
    let none = Arc::new(ReplicaSet::new(
        EpochStore::open(&temp_dir(tag)).unwrap(),
        Box::new(|_| None),
    ));
    NexusManager::start(engine.clone(), transport, none)
}

#[test]
fn only_a_node_certified_by_the_cluster_ca_reaches_a_replica_and_the_wire_is_ciphertext() {
    let ca = temp_dir("ca");
    let other_ca = temp_dir("other-ca");
    issue::init_ca(&ca).unwrap();
    issue::init_ca(&other_ca).unwrap();
    let replica_node = identity(&ca, &ca, Identity::Node("replica".into()));
    let nexus_node = identity(&ca, &ca, Identity::Node("nexus".into()));
    let operator = identity(&ca, &ca, Identity::Admin("ops".into()));
    let stranger = identity(&other_ca, &ca, Identity::Node("nexus".into()));

    let engine = engine();
    let bdev: Arc<dyn Bdev> = Arc::new(MallocBdev::new("r", SIZE, BLOCK).unwrap());
    let handle = engine.add_bdev(bdev).unwrap();
    let replicas = Arc::new(ReplicaSet::new(
        EpochStore::open(&temp_dir("replica")).unwrap(),
        Box::new(move |_| Some(("r".to_string(), handle.clone()))),
    ));
    let server = ReplicaServer::start(
        engine.clone(),
        Arc::new(TlsTransport::new(replica_node)),
        "127.0.0.1:0",
        replicas,
    )
    .expect("replica server starts");
    let (proxied, wire) = recording_proxy(server.endpoint().to_string());

    // The legitimate nexus, through the recording proxy.
    let m = manager(
        &engine,
        Arc::new(TlsTransport::new(nexus_node.clone())),
        "m",
    );
    m.create(request(&proxied, false)).expect("nexus over TLS");
    let nexus = m.handle("vol").unwrap();
    let data: Vec<u8> = PLAINTEXT.iter().copied().cycle().take(64 << 10).collect();
    let mut q = engine.queue(&nexus, engine.cores()[0], 4).unwrap();
    q.write_at(0, &data, true).unwrap();
    let mut back = vec![0u8; data.len()];
    q.read_at(0, &mut back).unwrap();
    assert_eq!(back, data);

    // Plain frames: an Open with takeover at a high epoch, as the attacker sent.
    let mut plain = TcpStream::connect(server.endpoint()).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let env = Envelope {
        volume_id: volume_id_for("vol"),
        epoch: Epoch::new(1000).unwrap(),
        request_id: RequestId::new(1),
    };
    let mut frame = Vec::new();
    proto::encode_into(&env, &Message::Open { takeover: true }, &mut frame);
    plain.write_all(&frame).unwrap();
    let mut answer = Vec::new();
    drop(plain.read_to_end(&mut answer));
    assert!(
        proto::decode_frame(&answer).is_err(),
        "a plain peer got a replica frame back: {answer:?}"
    );

    // Another CA's certificate, and the cluster CA's certificate of an operator.
    for (who, tls) in [("another CA", stranger), ("an operator", operator)] {
        let attacker = manager(&engine, Arc::new(TlsTransport::new(tls)), who);
        let refused = attacker.create(request(server.endpoint(), true));
        assert!(refused.is_err(), "{who} opened the replica");
        attacker.shutdown();
    }

    // A server whose certificate names no node is refused by the nexus.
    let fake_server = identity(&ca, &ca, Identity::Admin("not-a-node".into()));
    let fake = ReplicaServer::start(
        engine.clone(),
        Arc::new(TlsTransport::new(fake_server)),
        "127.0.0.1:0",
        Arc::new(ReplicaSet::new(
            EpochStore::open(&temp_dir("fake")).unwrap(),
            Box::new(|_| None),
        )),
    )
    .unwrap();
    let err = TlsTransport::new(nexus_node)
        .connect(fake.endpoint(), Duration::from_secs(5))
        .err()
        .expect("a server that is not a node is refused");
    assert!(err.to_string().contains("not a node"), "{err}");
    fake.shutdown();

    // The legitimate nexus was never fenced: it still writes and reads.
    q.write_at(4096, &data[..4096], true).unwrap();
    q.read_at(0, &mut back).unwrap();
    assert_eq!(&back[..4096], &data[..4096]);
    drop(q);
    m.destroy("vol").unwrap();
    m.shutdown();
    server.shutdown();

    let wire = wire.lock().unwrap();
    assert!(
        wire.len() > data.len(),
        "the proxy saw {} bytes",
        wire.len()
    );
    assert!(
        !wire.windows(PLAINTEXT.len()).any(|w| w == PLAINTEXT),
        "plaintext crossed the replica link"
    );
    for d in [ca, other_ca] {
        drop(std::fs::remove_dir_all(d));
    }
}

#[test]
fn only_the_assigned_node_opens_a_replica() {
    let ca = temp_dir("assign-ca");
    issue::init_ca(&ca).unwrap();
    let replica_node = identity(&ca, &ca, Identity::Node("replica".into()));
    let node_a = identity(&ca, &ca, Identity::Node("a".into()));
    let node_b = identity(&ca, &ca, Identity::Node("b".into()));

    let engine = engine();
    let bdev: Arc<dyn Bdev> = Arc::new(MallocBdev::new("r", SIZE, BLOCK).unwrap());
    let handle = engine.add_bdev(bdev).unwrap();
    let epochs_dir = temp_dir("assign-replica");
    let resolver = move |h: cairn_engine::BdevHandle| -> Box<cairn_replication::replica::Resolver> {
        Box::new(move |_| Some(("r".to_string(), h.clone())))
    };
    let replicas = Arc::new(ReplicaSet::new(
        EpochStore::open(&epochs_dir).unwrap(),
        resolver(handle.clone()),
    ));
    let id = volume_id_for("vol");
    replicas.assign(&id, "r", Some("a")).unwrap();
    let server = ReplicaServer::start(
        engine.clone(),
        Arc::new(TlsTransport::new(replica_node)),
        "127.0.0.1:0",
        replicas.clone(),
    )
    .expect("replica server starts");

    // B first, before anyone holds the replica: refused, and no fence is stored.
    let m_b = manager(&engine, Arc::new(TlsTransport::new(node_b)), "assign-b");
    let Err(err) = m_b.create(request(server.endpoint(), false)) else {
        panic!("node b opened a replica assigned to node a");
    };
    println!("node b refused: {err}");
    assert!(err.to_string().contains("Permission denied"), "{err}");
    assert_eq!(replicas.status(&id, "r").unwrap().fence, None);

    // A opens it and writes.
    let m_a = manager(&engine, Arc::new(TlsTransport::new(node_a)), "assign-a");
    m_a.create(request(server.endpoint(), false))
        .expect("node a opens the replica assigned to it");
    let nexus = m_a.handle("vol").unwrap();
    let data: Vec<u8> = PLAINTEXT.iter().copied().cycle().take(64 << 10).collect();
    let mut q = engine.queue(&nexus, engine.cores()[0], 4).unwrap();
    q.write_at(0, &data, true).unwrap();

    // B's takeover is refused too, and A is not fenced: it still writes and reads.
    let fence = replicas.status(&id, "r").unwrap().fence;
    assert!(m_b.create(request(server.endpoint(), true)).is_err());
    assert_eq!(replicas.status(&id, "r").unwrap().fence, fence);
    q.write_at(4096, &data[..4096], true).unwrap();
    let mut back = vec![0u8; data.len()];
    q.read_at(0, &mut back).unwrap();
    assert_eq!(back, data);
    drop(q);
    m_a.destroy("vol").unwrap();

    // The assignment is durable: a replica set opened afresh on the same files has it.
    let reopened = ReplicaSet::new(
        EpochStore::open(&epochs_dir).unwrap(),
        resolver(handle.clone()),
    );
    let status = reopened.status(&id, "r").unwrap();
    assert_eq!(status.opener.as_deref(), Some("a"));
    assert!(!status.hosted);

    // A failover to B: the control process assigns B, then B's nexus takes over.
    replicas.assign(&id, "r", Some("b")).unwrap();
    m_b.create(request(server.endpoint(), true))
        .expect("node b opens the replica once it is assigned");
    let nexus = m_b.handle("vol").unwrap();
    let mut q = engine.queue(&nexus, engine.cores()[0], 4).unwrap();
    q.read_at(0, &mut back).unwrap();
    assert_eq!(back, data);
    drop(q);
    m_b.destroy("vol").unwrap();
    m_a.shutdown();
    m_b.shutdown();
    server.shutdown();
    for d in [ca, epochs_dir] {
        drop(std::fs::remove_dir_all(d));
    }
}
