//! Guards the NBD client bdev against drifting from the NBD frontend: the client speaks only
//! through `frontend::nbd::proto` (its constants, request, reply and option headers), so it is
//! checked against Cairn's own NBD server. It must finish the fixed-newstyle handshake with
//! `NBD_OPT_GO`, read the export's size and transmission flags, and round-trip writes, reads,
//! FUA writes, write-zeroes, trim and flush with the data intact.

mod common;

use cairn_engine::bdev::malloc::MallocBdev;
use cairn_engine::bdev::nbd::NbdBdev;
use cairn_engine::frontend::nbd::{ExportOptions, NbdConfig, NbdServer};
use cairn_engine::Bdev;
use common::Rng;
use std::sync::Arc;

const EXPORT_BYTES: u64 = 8 << 20;
const BLOCK: u32 = 512;
const IO_BYTES: usize = 64 << 10;

#[test]
fn the_client_bdev_round_trips_data_through_the_nbd_server() {
    let engine = Arc::new(common::start(common::cores(1)));
    let backing = engine
        .add_bdev(Arc::new(
            MallocBdev::new("m", EXPORT_BYTES, BLOCK).expect("malloc bdev"),
        ))
        .expect("add backing bdev");
    let server = NbdServer::start(
        engine.clone(),
        NbdConfig {
            tcp: Some("127.0.0.1:0".parse().expect("address")),
            ..NbdConfig::default()
        },
    )
    .expect("server starts");
    server
        .add_export("m", &backing, ExportOptions::default())
        .expect("export");
    let addr = server.tcp_addr().expect("tcp listener").to_string();

    let client = NbdBdev::connect("remote", &addr, "m").expect("handshake with NBD_OPT_GO");
    let info = client.info().clone();
    assert_eq!(info.size_bytes, EXPORT_BYTES, "size from NBD_INFO_EXPORT");
    assert!(!info.read_only, "transmission flags say writable");
    let remote = engine.add_bdev(Arc::new(client)).expect("add client bdev");
    let mut q = engine
        .queue(&remote, engine.cores()[0], 4)
        .expect("queue on the client bdev");

    let mut data = vec![0u8; IO_BYTES];
    Rng::new(7).fill(&mut data);
    q.write_at(1 << 20, &data, false).expect("write");
    q.write_at(2 << 20, &data, true).expect("FUA write");
    let mut back = vec![0u8; IO_BYTES];
    q.read_at(1 << 20, &mut back).expect("read");
    common::assert_same("write then read", 1 << 20, &back, &data);
    q.read_at(2 << 20, &mut back).expect("read");
    common::assert_same("FUA write then read", 2 << 20, &back, &data);
    if info.can_write_zeroes {
        q.write_zeroes(1 << 20, IO_BYTES as u32)
            .expect("write-zeroes");
        q.read_at(1 << 20, &mut back).expect("read");
        common::assert_same("zeroed", 1 << 20, &back, &vec![0u8; IO_BYTES]);
    }
    if info.can_trim {
        q.trim(2 << 20, IO_BYTES as u32).expect("trim");
    }
    q.flush().expect("flush");
    drop(q);
    drop(server);
}
