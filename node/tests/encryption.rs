//! Encryption at rest end to end (issue 16 item 5), with real `cairn-node` processes: a nexus
//! over a local replica and a replica on another node, exported encrypted over NBD.
//!
//! * A known pattern written through the export is read back through it, and is found in
//!   neither replica's pool file (each read raw, as anyone with access to the file could):
//!   the crypt layer sits above the nexus, so replicas and the replica link carry only
//!   ciphertext.
//! * A wrong key, and an export without a key, are refused with FAILED_PRECONDITION naming
//!   the volume; the right key serves the same data again after re-export.
//! * The key's bytes (raw or hex) appear in no file under either node's data dir.
//!
//! On main there is no encryption at all: the pattern sits in both pool files in the clear.

mod common;

#[path = "../../engine/tests/common/nbd_client.rs"]
mod nbd_client;

#[path = "common/cluster.rs"]
mod cluster;

#[path = "common/ready.rs"]
mod ready;

use cairn_node::proto as pb;
use cluster::{flush, Config, Daemon, VOLUME, VOLUME_BYTES};
use common::WorkDir;
use nbd_client::{Client, Endpoint, Stream};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// What the client writes; finding these bytes in a pool file means plaintext leaked.
const PATTERN: &[u8; 16] = b"CAIRN-PLAINTEXT!";
/// Bytes the client writes, in requests of `WRITE_BYTES`.
const WRITTEN_BYTES: u64 = 4 << 20;
const WRITE_BYTES: usize = 128 << 10;
/// The encryption header the crypt layer keeps in front of the data.
const HEADER_BYTES: u64 = 4096;

fn key_hex(byte: u8) -> String {
    (0..64u8)
        .map(|i| format!("{:02x}", byte.wrapping_add(i)))
        .collect()
}

fn export_req(key: &str) -> pb::ExportRequest {
    pb::ExportRequest {
        name: VOLUME.into(),
        nexus: true,
        encryption_key: key.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// Negotiates the encrypted export, which is the volume less its header.
fn connect(d: &Daemon) -> Client {
    let s = Stream::connect(&Endpoint::Tcp(d.ready.nbd)).expect("NBD connects");
    cluster::nbd_connect(s, VOLUME_BYTES - HEADER_BYTES)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every regular file under `dir`, recursively.
fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {dir:?}: {e}")) {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.is_file() {
            out.push(p);
        }
    }
}

fn pool_file(d: &Daemon) -> Vec<u8> {
    let path = d.data_dir().join("pool0.img");
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {path:?}: {e}"))
}

#[test]
fn replicas_hold_only_ciphertext_and_a_wrong_key_is_refused() {
    let dir = WorkDir::new("encryption");
    let a = Daemon::start(
        &dir,
        "a",
        Config {
            replica_volume: true,
            ..Config::default()
        },
    );
    let b = Daemon::start(&dir, "b", Config::replica(LOCALHOST));
    let mut admin = a.admin();
    let v = admin.create_nexus(&["local".into(), b.replica()], 1000);
    assert_eq!(v.state, "online", "{v:#?}");
    let key = key_hex(0x30);
    let e = admin
        .try_export(export_req(&key))
        .expect("encrypted export");
    assert!(e.encrypted, "{e:?}");

    let mut nbd = connect(&a);
    let data: Vec<u8> = PATTERN.iter().copied().cycle().take(WRITE_BYTES).collect();
    for i in 0..WRITTEN_BYTES / WRITE_BYTES as u64 {
        assert_eq!(
            nbd.write(i * WRITE_BYTES as u64, &data, 0).unwrap(),
            0,
            "write {i}"
        );
    }
    flush(&mut nbd).unwrap();
    let got = nbd
        .read(WRITE_BYTES as u64, WRITE_BYTES as u32)
        .unwrap()
        .unwrap();
    assert_eq!(got, data, "the export reads back the plaintext");
    drop(nbd);

    for d in [&a, &b] {
        assert!(
            !contains(&pool_file(d), PATTERN),
            "node {}: plaintext found in its pool file",
            d.name
        );
    }

    admin.unexport(VOLUME);
    let err = admin.try_export(export_req(&key_hex(0x31))).unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains(&format!("'{VOLUME}'")),
        "names the volume: {err}"
    );
    assert!(err.message().contains("wrong key"), "{err}");
    let plain = pb::ExportRequest {
        name: VOLUME.into(),
        nexus: true,
        ..Default::default()
    };
    let err = admin.try_export(plain).unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("is encrypted"),
        "a keyless export is refused: {err}"
    );
    admin
        .try_export(export_req(&key))
        .expect("the right key again");
    let mut nbd = connect(&a);
    let got = nbd.read(0, WRITE_BYTES as u32).unwrap().unwrap();
    assert_eq!(got, data, "re-exported with the key, the data reads back");
    drop(nbd);

    let raw: Vec<u8> = (0..64u8).map(|i| 0x30u8.wrapping_add(i)).collect();
    let mut all = Vec::new();
    files(a.data_dir(), &mut all);
    files(b.data_dir(), &mut all);
    assert!(!all.is_empty(), "the data dirs hold files");
    for f in all {
        let bytes = std::fs::read(&f).unwrap_or_else(|e| panic!("read {f:?}: {e}"));
        assert!(!contains(&bytes, &raw[..32]), "key bytes in {f:?}");
        assert!(!contains(&bytes, &key.as_bytes()[..32]), "key hex in {f:?}");
    }
}
