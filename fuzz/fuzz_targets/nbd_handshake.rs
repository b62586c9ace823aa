//! Feeds arbitrary bytes as the client side of NBD negotiation (`negotiate`) against a fixed
//! two-export table. Guards: no panic on any input, and the server's output is always a
//! greeting followed by well-formed option replies, ending (only on success by
//! `NBD_OPT_EXPORT_NAME`) in the 10- or 134-byte export reply.
#![no_main]

use cairn_engine::frontend::nbd::handshake::{negotiate, ExportInfo};
use cairn_engine::frontend::nbd::proto::{self, tx_flag};
use libfuzzer_sys::fuzz_target;
use std::io::{Cursor, Read, Write};

struct Duplex {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn table() -> Vec<ExportInfo> {
    let export = |name: &str, size_bytes| ExportInfo {
        name: name.into(),
        description: format!("{name} volume"),
        size_bytes,
        transmission_flags: tx_flag::HAS_FLAGS | tx_flag::SEND_FLUSH | tx_flag::SEND_DF,
        block_size_min: 512,
        block_size_preferred: 4096,
        block_size_max: proto::PAYLOAD_MAX_BYTES,
    };
    vec![export("", 1 << 20), export("pg", 1 << 30)]
}

fuzz_target!(|data: &[u8]| {
    let exports = table();
    let mut d = Duplex {
        input: Cursor::new(data.to_vec()),
        output: Vec::new(),
    };
    let result = negotiate(&mut d, &exports, None).map(|o| o.map(|o| o.negotiated));
    let out = d.output;
    assert_eq!(&out[..16], b"NBDMAGICIHAVEOPT");
    let mut rest = &out[proto::GREETING_BYTES..];
    while rest.len() >= proto::OPTION_REPLY_HEADER_BYTES {
        let h: [u8; proto::OPTION_REPLY_HEADER_BYTES] =
            rest[..proto::OPTION_REPLY_HEADER_BYTES].try_into().unwrap();
        let Ok(h) = proto::decode_option_reply_header(&h) else {
            break;
        };
        rest = &rest[proto::OPTION_REPLY_HEADER_BYTES + h.len_bytes as usize..];
    }
    if !rest.is_empty() {
        assert!(
            matches!(result, Ok(Some(_))),
            "stray output {rest:?} after {result:?}"
        );
        assert!(
            rest.len() == 10 || rest.len() == 134,
            "export reply of {} bytes",
            rest.len()
        );
    }
    if let Ok(Some(n)) = result {
        let offered = exports
            .iter()
            .find(|e| e.name == n.export.name)
            .expect("a listed export");
        let mut flags = offered.transmission_flags;
        if !n.structured_replies {
            flags &= !tx_flag::SEND_DF;
        }
        assert_eq!(n.export.transmission_flags, flags);
        assert!(n.base_allocation.is_none() || n.structured_replies);
    }
});
