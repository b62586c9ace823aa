//! The data the control-plane tests write through a volume's NBD URI and read back: 64 KiB at
//! each of three offsets of a volume of at least 16 MiB, different at each offset.

#![allow(dead_code)] // each test binary uses its own part of this module

use crate::nbd_client;

const MIB: u64 = 1 << 20;
/// Where the pattern is written.
pub const PATTERN_OFFSETS: [u64; 3] = [0, 4 * MIB, 15 * MIB];

/// The 64 KiB written at `PATTERN_OFFSETS[i]`.
pub fn pattern(i: usize) -> Vec<u8> {
    (0..64 * 1024u32)
        .map(|b| (b as u8) ^ (i as u8 * 41))
        .collect()
}

/// A new NBD connection to `nbd://HOST:PORT/EXPORT`.
pub fn nbd(uri: &str) -> nbd_client::Client {
    let rest = uri.strip_prefix("nbd://").unwrap();
    let (addr, export) = rest.split_once('/').unwrap();
    let ep = nbd_client::Endpoint::Tcp(addr.parse().unwrap());
    nbd_client::Client::connect(&ep, export, nbd_client::Options::default())
        .unwrap_or_else(|e| panic!("NBD connect to {uri}: {e}"))
}

/// Writes the pattern through `uri` and flushes: every byte of it is acknowledged and
/// survives a crash of any node.
pub fn write_pattern(uri: &str) {
    let mut c = nbd(uri);
    for (i, offset) in PATTERN_OFFSETS.into_iter().enumerate() {
        assert_eq!(
            c.write(offset, &pattern(i), 0).unwrap(),
            0,
            "write at {offset}"
        );
    }
    let flush = cairn_engine::frontend::nbd::proto::cmd::FLUSH;
    assert_eq!(c.simple(flush, 0, 0, 0).unwrap(), 0, "flush");
}

/// Reads the pattern back through `uri` (a new connection).
pub fn read_back(uri: &str) {
    let mut c = nbd(uri);
    for (i, offset) in PATTERN_OFFSETS.into_iter().enumerate() {
        let back = c.read(offset, 64 * 1024).unwrap().expect("read succeeds");
        assert!(
            back == pattern(i),
            "{uri}: read back at {offset} differs: first bytes {:?}",
            &back[..8]
        );
    }
}
