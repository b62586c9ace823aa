//! Decodes arbitrary bytes as a stream of replica protocol frames, first as they are and then
//! with the first frame's crc made right (so the fuzzer reaches the opcode checks without
//! having to guess a crc32c). Guards: no decoder panics, and whatever decodes re-encodes to
//! exactly the bytes it came from.
#![no_main]

use cairn_replication::proto::{self, decode_frame, HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

/// Decodes frames back to back until one is refused; each accepted one must be canonical.
fn decode_stream(mut rest: &[u8]) {
    while let Ok((header, msg, used)) = decode_frame(rest) {
        let mut again = Vec::new();
        proto::encode_into(&header.envelope, &msg, &mut again);
        assert_eq!(&again[..], &rest[..used]);
        rest = &rest[used..];
    }
}

fuzz_target!(|data: &[u8]| {
    decode_stream(data);
    if let Some(header) = data.first_chunk::<HEADER_BYTES>() {
        let payload_bytes = u32::from_le_bytes([header[48], header[49], header[50], header[51]]);
        let end = HEADER_BYTES
            .saturating_add(payload_bytes as usize)
            .min(data.len());
        let crc = proto::frame_crc(header, &data[HEADER_BYTES..end]);
        let mut sealed = data.to_vec();
        sealed[56..60].copy_from_slice(&crc.to_le_bytes());
        decode_stream(&sealed);
    }
});
