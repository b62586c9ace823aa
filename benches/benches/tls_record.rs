//! What TLS costs one replica write frame (a 4 KiB payload and its header): rustls sealing it
//! on the nexus's side and opening it on the replica's, as `replication::transport::tls`
//! drives it (buffered API, one session pair in memory, the cipher suite the cluster's
//! configuration negotiates), against the same AEAD (AES-128-GCM) sealing and opening the
//! same bytes in place with ring and nothing else. The difference is what any record layer of
//! our own could save; the AEAD is the floor (docs/replication.md, "What TLS costs on the
//! replica links").

use cairn_tls::{Identity, Tls, TlsFiles};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, NONCE_LEN};
use rustls::{ClientConnection, Connection, ServerConnection};
use std::io::{Read, Write};

/// A write frame: the replica protocol's header and a 4 KiB payload.
const FRAME_BYTES: usize = 4096 + 32;
/// A TLS record's header and AES-GCM's tag, plus TLS 1.3's inner content type byte.
const RECORD_HEADER: usize = 5;
const TAG: usize = 16;

/// Moves every byte `from` has to send into `to`.
fn transfer(from: &mut Connection, to: &mut Connection, wire: &mut Vec<u8>) {
    wire.clear();
    while from.wants_write() {
        from.write_tls(wire).expect("write_tls into a Vec");
    }
    let mut left = &wire[..];
    while !left.is_empty() {
        to.read_tls(&mut left).expect("read_tls from a slice");
        to.process_new_packets().expect("a valid record");
    }
}

/// A client (nexus) and server (replica) session between two node identities of one CA,
/// handshake done.
fn sessions() -> (Connection, Connection) {
    let dir = std::env::temp_dir().join(format!("cairn-bench-tls-{}", std::process::id()));
    drop(std::fs::remove_dir_all(&dir));
    let ca = dir.join("ca");
    cairn_tls::issue::init_ca(&ca).expect("CA");
    let ip = ["127.0.0.1".parse().expect("ip")];
    let load = |id: &str| {
        let d = cairn_tls::issue::issue(&ca, &Identity::Node(id.into()), &ip, &[]).expect("issue");
        Tls::load(&TlsFiles::in_dir(&d)).expect("load")
    };
    let (a, b) = (load("a"), load("b"));
    drop(std::fs::remove_dir_all(&dir));
    let name = cairn_tls::server_name("127.0.0.1:1").expect("name");
    let mut client: Connection = ClientConnection::new(a.client_config(), name)
        .expect("client")
        .into();
    let mut server: Connection = ServerConnection::new(b.server_config())
        .expect("server")
        .into();
    let mut wire = Vec::new();
    while client.is_handshaking() || server.is_handshaking() || server.wants_write() {
        transfer(&mut client, &mut server, &mut wire);
        transfer(&mut server, &mut client, &mut wire);
    }
    (client, server)
}

fn rustls_frame(c: &mut Criterion) {
    let (mut client, mut server) = sessions();
    client.set_buffer_limit(None);
    let frame = vec![0x5au8; FRAME_BYTES];
    let mut wire = Vec::with_capacity(2 * FRAME_BYTES);
    let mut plain = vec![0u8; 2 * FRAME_BYTES];
    let mut g = c.benchmark_group("tls_record");
    g.throughput(Throughput::Bytes(FRAME_BYTES as u64));
    g.bench_function("rustls_seal_open_frame", |b| {
        b.iter(|| {
            client.writer().write_all(black_box(&frame)).expect("seal");
            transfer(&mut client, &mut server, &mut wire);
            let mut got = 0;
            while got < FRAME_BYTES {
                got += server.reader().read(&mut plain[got..]).expect("open");
            }
            black_box(&plain);
        })
    });
    g.finish();
}

fn aead_frame(c: &mut Criterion) {
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[7u8; 16]).expect("key"));
    let frame = vec![0x5au8; FRAME_BYTES];
    let mut record = vec![0u8; RECORD_HEADER + FRAME_BYTES + 1 + TAG];
    let inner = FRAME_BYTES + 1;
    let len = (inner + TAG) as u16;
    let header = [23, 3, 3, (len >> 8) as u8, len as u8];
    let mut seq = 0u64;
    let nonce = |seq: u64| {
        let mut n = [0u8; NONCE_LEN];
        n[4..].copy_from_slice(&seq.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    };
    let mut g = c.benchmark_group("tls_record");
    g.throughput(Throughput::Bytes(FRAME_BYTES as u64));
    g.bench_function("aead_seal_open_frame", |b| {
        b.iter(|| {
            seq += 1;
            record[..RECORD_HEADER].copy_from_slice(&header);
            let body = &mut record[RECORD_HEADER..];
            body[..FRAME_BYTES].copy_from_slice(black_box(&frame));
            body[FRAME_BYTES] = 23;
            let tag = key
                .seal_in_place_separate_tag(nonce(seq), Aad::from(header), &mut body[..inner])
                .expect("seal");
            body[inner..].copy_from_slice(tag.as_ref());
            let plain = key
                .open_in_place(nonce(seq), Aad::from(header), body)
                .expect("open");
            black_box(plain);
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = cairn_benches::config();
    targets = rustls_frame, aead_frame
}
criterion_main!(benches);
