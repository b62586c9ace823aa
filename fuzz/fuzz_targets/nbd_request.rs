//! Decodes arbitrary bytes as NBD transmission requests (every 28-byte window) and option
//! data, and runs the encoders on fields taken from the input. Guards: no decoder panics, and
//! whatever decodes re-encodes to exactly the bytes it came from.
#![no_main]

use cairn_engine::frontend::nbd::proto::{self, Request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for w in data.windows(proto::REQUEST_BYTES) {
        let b: &[u8; proto::REQUEST_BYTES] = w.try_into().unwrap();
        if let Ok(r) = proto::decode_request(b) {
            let mut again = [0u8; proto::REQUEST_BYTES];
            proto::encode_request(&r, &mut again);
            assert_eq!(&again, b);
        }
    }
    if data.len() >= proto::REQUEST_BYTES {
        let f = |at: usize, n: usize| {
            data[at..at + n]
                .iter()
                .fold(0u64, |v, &b| v << 8 | u64::from(b))
        };
        let r = Request {
            flags: f(0, 2) as u16,
            kind: f(2, 2) as u16,
            cookie: f(4, 8),
            offset_bytes: f(12, 8),
            len_bytes: f(20, 4) as u32,
        };
        let mut b = [0u8; proto::REQUEST_BYTES];
        proto::encode_request(&r, &mut b);
        assert_eq!(proto::decode_request(&b).unwrap(), r);
        let mut s = [0u8; proto::SIMPLE_REPLY_BYTES];
        proto::encode_simple_reply(r.len_bytes, r.cookie, &mut s);
        let got = proto::decode_simple_reply(&s).unwrap();
        assert_eq!((got.error, got.cookie), (r.len_bytes, r.cookie));
        let mut c = [0u8; proto::CHUNK_HEADER_BYTES];
        proto::encode_chunk_header(r.flags, r.kind, r.cookie, r.len_bytes, &mut c);
        let got = proto::decode_chunk_header(&c).unwrap();
        assert_eq!(
            (got.flags, got.kind, got.cookie, got.len_bytes),
            (r.flags, r.kind, r.cookie, r.len_bytes)
        );
    }
    if let Ok(req) = proto::decode_info_request(proto::opt::GO, data) {
        let infos: Vec<u16> = req.infos().collect();
        assert_eq!(proto::encode_info_request(req.name, &infos), data);
    }
    if let Ok(req) = proto::decode_meta_context_request(proto::opt::SET_META_CONTEXT, data) {
        assert_eq!(
            proto::encode_meta_context_request(req.name, &req.queries),
            data
        );
    }
});
