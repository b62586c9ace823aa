//! Guards the replica wire protocol (`cairn_replication::proto`): every message survives an
//! encode/decode round trip byte for byte; truncated, bit-flipped, wrong-crc, bad-magic,
//! wrong-version, oversize and non-canonical frames are refused with the error that names
//! what is wrong; arbitrary bytes never panic the decoder; and `PROTOCOL_VERSION` must be
//! bumped whenever the layout of any frame changes (`protocol_version_is_guarded`).

use cairn_replication::proto::{
    self, decode_frame, encode, encode_into, Envelope, Epoch, Message, Opcode, ProtoError,
    RequestId, VolumeId, HEADER_BYTES, PAYLOAD_MAX_BYTES, PROTOCOL_VERSION, SECTOR_BYTES,
};
use proptest::prelude::*;

fn envelope(epoch: u64, request_id: u64) -> Envelope {
    Envelope {
        volume_id: VolumeId::new(*b"cairn-volume-id!").unwrap(),
        epoch: Epoch::new(epoch).unwrap(),
        request_id: RequestId::new(request_id),
    }
}

fn frame_bytes(env: &Envelope, msg: &Message<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_into(env, msg, &mut out);
    out
}

/// Recomputes the crc after a test edits a frame, so only the edited field is wrong.
fn reseal(bytes: &mut [u8]) {
    let mut header = [0u8; HEADER_BYTES];
    header.copy_from_slice(&bytes[..HEADER_BYTES]);
    let crc = proto::frame_crc(&header, &bytes[HEADER_BYTES..]);
    bytes[56..60].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes, asserts the frame used every byte, and re-encodes to check canonical form.
fn round_trip(env: &Envelope, msg: &Message<'_>) {
    let bytes = frame_bytes(env, msg);
    let (header, got, used) = decode_frame(&bytes).unwrap();
    assert_eq!(used, bytes.len());
    assert_eq!(header.envelope, *env);
    assert_eq!(header.opcode, msg.opcode());
    assert_eq!(got, *msg);
    assert_eq!(frame_bytes(&header.envelope, &got), bytes);
    let frame = encode(env, msg);
    assert_eq!([&frame.header[..], frame.payload()].concat(), bytes);
    assert_eq!(frame.len_bytes(), bytes.len());
}

/// One sample of every opcode; the data payloads borrow `data`.
fn samples(data: &[u8]) -> Vec<Message<'_>> {
    vec![
        Message::Open { takeover: false },
        Message::Open { takeover: true },
        Message::OpenOk {
            size_bytes: 1 << 30,
            block_size_bytes: 4096,
            epoch_accepted: Epoch::new(7).unwrap(),
            generation: 0,
            clean: false,
        },
        Message::OpenOk {
            size_bytes: 1 << 30,
            block_size_bytes: 4096,
            epoch_accepted: Epoch::new(7).unwrap(),
            generation: 0x0102_0304_0506_0708,
            clean: true,
        },
        Message::SetGeneration {
            generation: 11,
            clean: false,
        },
        Message::SetGeneration {
            generation: 12,
            clean: true,
        },
        Message::Write {
            offset_bytes: 8192,
            fua: true,
            data,
        },
        Message::Read {
            offset_bytes: 4096,
            len_bytes: 4096,
        },
        Message::ReadData { data },
        Message::Flush,
        Message::Trim {
            offset_bytes: 1 << 20,
            len_bytes: 1 << 21,
        },
        Message::WriteZeroes {
            offset_bytes: 512,
            len_bytes: 1024,
        },
        Message::Ok,
        Message::Error { errno: 5 },
        Message::StaleEpoch {
            current: Epoch::new(9).unwrap(),
        },
        Message::Ping,
        Message::Pong,
    ]
}

#[test]
fn samples_cover_every_opcode() {
    let data = [0xabu8; 512];
    let mut ops: Vec<u16> = samples(&data).iter().map(|m| m.opcode() as u16).collect();
    let mut all: Vec<u16> = Opcode::ALL.iter().map(|&o| o as u16).collect();
    ops.sort_unstable();
    ops.dedup();
    all.sort_unstable();
    assert_eq!(ops, all);
}

/// Every version this protocol has had and the hash of its canonical sample frames (crc32c of
/// the concatenated frames of `samples`, with the version field zeroed). Append a line when
/// you bump `PROTOCOL_VERSION`; never edit an old one.
const LAYOUT_HISTORY: &[(u16, u32)] = &[(1, 0xb390_2482), (2, 0xcffd_fcce), (3, 0xbe25_b770)];

#[test]
fn protocol_version_is_guarded() {
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();
    let env = envelope(3, 0x0102_0304_0506_0708);
    let mut all = Vec::new();
    for msg in samples(&data) {
        let mut bytes = frame_bytes(&env, &msg);
        bytes[4..6].copy_from_slice(&[0, 0]);
        all.extend_from_slice(&bytes);
    }
    let hash = crc32c::crc32c(&all);
    let &(pinned_version, pinned_hash) = LAYOUT_HISTORY.last().unwrap();
    assert!(
        pinned_version == PROTOCOL_VERSION && pinned_hash == hash,
        "the replica frame layout changed (sample hash {hash:#010x}, pinned {pinned_hash:#010x} \
         for version {pinned_version}; PROTOCOL_VERSION is {PROTOCOL_VERSION}). Bump \
         PROTOCOL_VERSION in replication/src/proto.rs, append ({}, {hash:#010x}) to \
         LAYOUT_HISTORY, and update docs/formats.md",
        pinned_version + 1
    );
    for pair in LAYOUT_HISTORY.windows(2) {
        assert!(
            pair[0].0 < pair[1].0,
            "LAYOUT_HISTORY versions must increase"
        );
        assert_ne!(
            pair[0].1, pair[1].1,
            "a version bump must change the layout"
        );
    }
}

#[test]
fn every_sample_round_trips() {
    let data = vec![0x5au8; 4096];
    for msg in samples(&data) {
        round_trip(&envelope(1, 42), &msg);
    }
}

#[test]
fn payload_at_the_limit_is_accepted() {
    let data = vec![1u8; PAYLOAD_MAX_BYTES as usize];
    round_trip(
        &envelope(1, 1),
        &Message::Write {
            offset_bytes: 0,
            fua: false,
            data: &data,
        },
    );
    round_trip(&envelope(1, 1), &Message::ReadData { data: &data });
    round_trip(
        &envelope(1, 1),
        &Message::Read {
            offset_bytes: 0,
            len_bytes: u64::from(PAYLOAD_MAX_BYTES),
        },
    );
}

#[test]
fn oversize_payload_is_refused_from_the_header_alone() {
    let mut bytes = frame_bytes(&envelope(1, 1), &Message::Ping);
    bytes[48..52].copy_from_slice(&(PAYLOAD_MAX_BYTES + 1).to_le_bytes());
    reseal(&mut bytes);
    assert_eq!(
        decode_frame(&bytes).unwrap_err(),
        ProtoError::PayloadTooLarge {
            payload_bytes: PAYLOAD_MAX_BYTES + 1
        }
    );
}

#[test]
fn oversize_read_is_refused() {
    let mut bytes = frame_bytes(
        &envelope(1, 1),
        &Message::Read {
            offset_bytes: 0,
            len_bytes: 512,
        },
    );
    let len_bytes = u64::from(PAYLOAD_MAX_BYTES) + 512;
    bytes[64..72].copy_from_slice(&len_bytes.to_le_bytes());
    reseal(&mut bytes);
    assert_eq!(
        decode_frame(&bytes).unwrap_err(),
        ProtoError::ReadTooLarge { len_bytes }
    );
}

#[test]
#[should_panic(expected = "encoding an invalid replica message")]
fn encoding_oversize_data_panics() {
    let data = vec![0u8; PAYLOAD_MAX_BYTES as usize + 512];
    encode(&envelope(1, 1), &Message::ReadData { data: &data });
}

#[test]
#[should_panic(expected = "not a multiple of 512")]
fn encoding_misaligned_write_panics() {
    encode(
        &envelope(1, 1),
        &Message::Write {
            offset_bytes: 0,
            fua: false,
            data: &[0; 100],
        },
    );
}

#[test]
fn truncated_frames_say_what_they_need() {
    let data = [7u8; 1024];
    let bytes = frame_bytes(
        &envelope(2, 2),
        &Message::Write {
            offset_bytes: 0,
            fua: false,
            data: &data,
        },
    );
    for cut in 0..bytes.len() {
        let need_bytes = if cut < HEADER_BYTES {
            HEADER_BYTES
        } else {
            bytes.len()
        };
        assert_eq!(
            decode_frame(&bytes[..cut]).unwrap_err(),
            ProtoError::Truncated {
                have_bytes: cut,
                need_bytes
            },
            "cut at {cut}"
        );
    }
}

#[test]
fn every_single_bit_flip_is_refused() {
    let data = [0x33u8; 512];
    for msg in samples(&data) {
        let bytes = frame_bytes(&envelope(5, 5), &msg);
        for bit in 0..bytes.len() * 8 {
            let mut bad = bytes.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                decode_frame(&bad).is_err(),
                "{msg:?}: flipping bit {bit} was accepted"
            );
        }
    }
}

#[test]
fn wrong_crc_is_refused_with_both_values() {
    let mut bytes = frame_bytes(&envelope(1, 1), &Message::Error { errno: 5 });
    let good = u32::from_le_bytes(bytes[56..60].try_into().unwrap());
    bytes[56..60].copy_from_slice(&(good ^ 1).to_le_bytes());
    assert_eq!(
        decode_frame(&bytes).unwrap_err(),
        ProtoError::BadCrc {
            stored: good ^ 1,
            computed: good
        }
    );
    // A payload byte flipped is caught by the same crc.
    let mut bytes = frame_bytes(&envelope(1, 1), &Message::Error { errno: 5 });
    bytes[HEADER_BYTES] ^= 0x80;
    assert!(matches!(
        decode_frame(&bytes).unwrap_err(),
        ProtoError::BadCrc { stored, .. } if stored == good
    ));
}

#[test]
fn bad_magic_wrong_version_and_unknown_opcode_are_refused() {
    let good = frame_bytes(&envelope(1, 1), &Message::Flush);
    let mut bytes = good.clone();
    bytes[0..4].copy_from_slice(b"NBDM");
    reseal(&mut bytes);
    assert_eq!(
        decode_frame(&bytes).unwrap_err(),
        ProtoError::BadMagic {
            magic: u32::from_le_bytes(*b"NBDM")
        }
    );
    for version in [0, PROTOCOL_VERSION + 1, u16::MAX] {
        let mut bytes = good.clone();
        bytes[4..6].copy_from_slice(&version.to_le_bytes());
        reseal(&mut bytes);
        assert_eq!(
            decode_frame(&bytes).unwrap_err(),
            ProtoError::UnsupportedVersion { version }
        );
    }
    for opcode in [0u16, 0x09, 0x80, 0x87, 0xffff] {
        let mut bytes = good.clone();
        bytes[6..8].copy_from_slice(&opcode.to_le_bytes());
        reseal(&mut bytes);
        assert_eq!(
            decode_frame(&bytes).unwrap_err(),
            ProtoError::UnknownOpcode { opcode }
        );
    }
}

#[test]
fn non_canonical_headers_are_refused() {
    let good = frame_bytes(&envelope(1, 1), &Message::Flush);
    let edit = |at: usize, v: &[u8]| {
        let mut bytes = good.clone();
        bytes[at..at + v.len()].copy_from_slice(v);
        reseal(&mut bytes);
        decode_frame(&bytes).unwrap_err()
    };
    assert_eq!(
        edit(60, &1u32.to_le_bytes()),
        ProtoError::ReservedNotZero { value: 1 }
    );
    assert_eq!(edit(8, &[0; 16]), ProtoError::NilVolumeId);
    assert_eq!(edit(24, &0u64.to_le_bytes()), ProtoError::ZeroEpoch);
    for epoch in [proto::EPOCH_MAX + 1, u64::MAX] {
        assert_eq!(
            edit(24, &epoch.to_le_bytes()),
            ProtoError::EpochAboveMax { epoch }
        );
    }
    assert_eq!(
        edit(40, &512u64.to_le_bytes()),
        ProtoError::FieldNotZero {
            opcode: Opcode::Flush,
            field: "offset",
            value: 512
        }
    );
    assert_eq!(
        edit(52, &proto::flag::FUA.to_le_bytes()),
        ProtoError::BadFlags {
            opcode: Opcode::Flush,
            flags: proto::flag::FUA
        }
    );
    // A Flush that announces a payload (with the payload present) is the wrong size.
    let mut bytes = good.clone();
    bytes[48..52].copy_from_slice(&8u32.to_le_bytes());
    bytes.extend_from_slice(&[0; 8]);
    reseal(&mut bytes);
    assert_eq!(
        decode_frame(&bytes).unwrap_err(),
        ProtoError::BadPayloadLength {
            opcode: Opcode::Flush,
            payload_bytes: 8,
            expected_bytes: 0
        }
    );
}

#[test]
fn bad_extents_and_values_are_refused() {
    let write = frame_bytes(
        &envelope(1, 1),
        &Message::Write {
            offset_bytes: 0,
            fua: false,
            data: &[0; 512],
        },
    );
    let mut bytes = write.clone();
    bytes[40..48].copy_from_slice(&100u64.to_le_bytes());
    reseal(&mut bytes);
    assert_eq!(
        decode_frame(&bytes).unwrap_err(),
        ProtoError::Misaligned {
            opcode: Opcode::Write,
            field: "offset",
            value: 100
        }
    );
    let mut bytes = write.clone();
    let offset_bytes = u64::MAX - 511;
    bytes[40..48].copy_from_slice(&offset_bytes.to_le_bytes());
    reseal(&mut bytes);
    assert_eq!(
        decode_frame(&bytes).unwrap_err(),
        ProtoError::ExtentOverflow {
            opcode: Opcode::Write,
            offset_bytes,
            len_bytes: 512
        }
    );
    let mut bytes = write[..HEADER_BYTES].to_vec();
    bytes[48..52].copy_from_slice(&0u32.to_le_bytes());
    reseal(&mut bytes);
    assert_eq!(
        decode_frame(&bytes).unwrap_err(),
        ProtoError::EmptyExtent {
            opcode: Opcode::Write,
            offset_bytes: 0
        }
    );
    // Found by the replica_frame fuzz target: OpenOk's reserved word (now its record flags)
    // was not checked, so two different frames decoded to the same message.
    let mut bytes = frame_bytes(
        &envelope(1, 1),
        &Message::OpenOk {
            size_bytes: 1 << 30,
            block_size_bytes: 4096,
            epoch_accepted: Epoch::new(1).unwrap(),
            generation: 0,
            clean: false,
        },
    );
    bytes[76..80].copy_from_slice(&33u32.to_le_bytes());
    reseal(&mut bytes);
    assert_eq!(
        decode_frame(&bytes).unwrap_err(),
        ProtoError::BadRecordFlags {
            flags: 33,
            generation: 0
        }
    );
    // A clean mark without a generation, and a generation update to 0, are refused.
    bytes[76..80].copy_from_slice(&1u32.to_le_bytes());
    reseal(&mut bytes);
    assert_eq!(
        decode_frame(&bytes).unwrap_err(),
        ProtoError::BadRecordFlags {
            flags: 1,
            generation: 0
        }
    );
    let mut bytes = frame_bytes(
        &envelope(1, 1),
        &Message::SetGeneration {
            generation: 1,
            clean: false,
        },
    );
    bytes[64..72].copy_from_slice(&0u64.to_le_bytes());
    reseal(&mut bytes);
    assert_eq!(
        decode_frame(&bytes).unwrap_err(),
        ProtoError::ZeroGeneration {
            opcode: Opcode::SetGeneration
        }
    );
    let mut bytes = frame_bytes(&envelope(1, 1), &Message::Error { errno: 5 });
    bytes[64..68].copy_from_slice(&0u32.to_le_bytes());
    reseal(&mut bytes);
    assert_eq!(decode_frame(&bytes).unwrap_err(), ProtoError::ZeroErrno);
    let mut bytes = frame_bytes(
        &envelope(1, 1),
        &Message::StaleEpoch {
            current: Epoch::new(2).unwrap(),
        },
    );
    bytes[64..72].copy_from_slice(&0u64.to_le_bytes());
    reseal(&mut bytes);
    assert_eq!(decode_frame(&bytes).unwrap_err(), ProtoError::ZeroEpoch);
}

#[test]
fn stale_epoch_is_distinct_from_error() {
    let msg = Message::StaleEpoch {
        current: Epoch::new(11).unwrap(),
    };
    let bytes = frame_bytes(&envelope(10, 1), &msg);
    let (header, got, _) = decode_frame(&bytes).unwrap();
    assert_eq!(header.opcode, Opcode::StaleEpoch);
    assert!(header.opcode.is_reply());
    assert!(matches!(got, Message::StaleEpoch { current } if current > header.envelope.epoch));
}

#[test]
fn newtypes_refuse_invalid_values() {
    assert_eq!(VolumeId::new([0; 16]).unwrap_err(), ProtoError::NilVolumeId);
    assert_eq!(Epoch::new(0).unwrap_err(), ProtoError::ZeroEpoch);
    assert!(Epoch::new(1).unwrap() < Epoch::new(2).unwrap());
    // Epochs are bounded, and "the next epoch" is checked: at the maximum it is an error that
    // names the value and the maximum, never a wrap to 0 (issue 16's u64::MAX lock-out).
    let max = Epoch::new(proto::EPOCH_MAX).unwrap();
    assert_eq!(
        Epoch::new(proto::EPOCH_MAX - 1).unwrap().next().unwrap(),
        max
    );
    let e = max.next().unwrap_err();
    assert_eq!(
        e,
        ProtoError::EpochAboveMax {
            epoch: proto::EPOCH_MAX + 1
        }
    );
    assert!(
        e.to_string().contains(&format!(
            "{} is above the maximum epoch {}",
            proto::EPOCH_MAX + 1,
            proto::EPOCH_MAX
        )),
        "{e}"
    );
    assert!(Epoch::new(u64::MAX).is_err());
    let id = VolumeId::new([0x11; 16]).unwrap();
    assert_eq!(id.to_string(), "11111111-1111-1111-1111-111111111111");
}

#[test]
fn batched_frames_decode_in_sequence() {
    let env = envelope(4, 0);
    let data = [9u8; 1024];
    let mut batch = Vec::new();
    let msgs = samples(&data);
    for msg in &msgs {
        encode_into(&env, msg, &mut batch);
    }
    let mut rest = &batch[..];
    for msg in &msgs {
        let (_, got, used) = decode_frame(rest).unwrap();
        assert_eq!(got, *msg);
        rest = &rest[used..];
    }
    assert!(rest.is_empty());
}

/// A message built from generated fields; `data` is the payload buffer it borrows.
#[derive(Debug, Clone)]
struct Sample {
    kind: usize,
    offset_sectors: u64,
    len_sectors: u64,
    value: u64,
    fua: bool,
    data: Vec<u8>,
}

impl Sample {
    fn message(&self) -> Message<'_> {
        let sector = u64::from(SECTOR_BYTES);
        let offset_bytes = self.offset_sectors * sector;
        let len_bytes = self.len_sectors * sector;
        let epoch = Epoch::new(self.value.clamp(1, proto::EPOCH_MAX)).unwrap();
        match self.kind {
            0 => Message::Open {
                takeover: self.value % 2 == 1,
            },
            1 => Message::OpenOk {
                size_bytes: self.value,
                block_size_bytes: SECTOR_BYTES << (self.len_sectors % 16),
                epoch_accepted: epoch,
                generation: self.offset_sectors,
                clean: self.fua && self.offset_sectors > 0,
            },
            2 => Message::Write {
                offset_bytes,
                fua: self.fua,
                data: &self.data,
            },
            3 => Message::Read {
                offset_bytes,
                len_bytes: len_bytes.min(u64::from(PAYLOAD_MAX_BYTES)),
            },
            4 => Message::ReadData { data: &self.data },
            5 => Message::Flush,
            6 => Message::Trim {
                offset_bytes,
                len_bytes,
            },
            7 => Message::WriteZeroes {
                offset_bytes,
                len_bytes,
            },
            8 => Message::Ok,
            9 => Message::Error {
                errno: (self.value as u32).max(1),
            },
            10 => Message::StaleEpoch { current: epoch },
            11 => Message::Ping,
            12 => Message::SetGeneration {
                generation: self.value.max(1),
                clean: self.fua,
            },
            _ => Message::Pong,
        }
    }
}

fn sample() -> impl Strategy<Value = Sample> {
    // Offsets and lengths stay small enough that offset + length never wraps.
    (
        0..Opcode::ALL.len(),
        0..(1u64 << 50),
        1..(1u64 << 12),
        any::<u64>(),
        any::<bool>(),
        (1usize..=16, any::<u8>()),
    )
        .prop_map(
            |(kind, offset_sectors, len_sectors, value, fua, (n, seed))| {
                let data = (0..n * SECTOR_BYTES as usize)
                    .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                    .collect();
                Sample {
                    kind,
                    offset_sectors,
                    len_sectors,
                    value,
                    fua,
                    data,
                }
            },
        )
}

fn envelope_strategy() -> impl Strategy<Value = Envelope> {
    (any::<[u8; 16]>(), 1..=proto::EPOCH_MAX, any::<u64>()).prop_map(|(mut uuid, epoch, id)| {
        uuid[0] |= 1;
        Envelope {
            volume_id: VolumeId::new(uuid).unwrap(),
            epoch: Epoch::new(epoch).unwrap(),
            request_id: RequestId::new(id),
        }
    })
}

proptest! {
    #[test]
    fn any_message_round_trips(env in envelope_strategy(), s in sample()) {
        round_trip(&env, &s.message());
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode_frame(&bytes);
    }

    /// Random bytes behind a valid magic and version, with the crc made right, reach the
    /// opcode-specific checks; whatever is accepted must re-encode to the same bytes.
    #[test]
    fn sealed_random_frames_decode_canonically_or_are_refused(
        opcode in prop::sample::select(Opcode::ALL.to_vec()),
        mut bytes in proptest::collection::vec(any::<u8>(), HEADER_BYTES..HEADER_BYTES + 64),
        payload_bytes in 0u32..=64,
        zero_mask in any::<u64>(),
    ) {
        bytes[0..4].copy_from_slice(&proto::MAGIC.to_le_bytes());
        bytes[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        bytes[6..8].copy_from_slice(&(opcode as u16).to_le_bytes());
        let payload_bytes = payload_bytes.min((bytes.len() - HEADER_BYTES) as u32);
        bytes[48..52].copy_from_slice(&payload_bytes.to_le_bytes());
        // Zero some fields so the canonical cases (offset 0, no flags, reserved 0) occur.
        for (bit, range) in [(0, 40..48), (1, 52..56), (2, 60..64), (3, 64..bytes.len())] {
            if zero_mask & (1 << bit) != 0 {
                bytes[range].fill(0);
            }
        }
        bytes.truncate(HEADER_BYTES + payload_bytes as usize);
        reseal(&mut bytes);
        if let Ok((header, msg, used)) = decode_frame(&bytes) {
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(frame_bytes(&header.envelope, &msg), bytes);
        }
    }
}

/// The committed fuzz seeds (fuzz/seeds/replica_frame) speak the current protocol: each
/// decodes to the end (a seed named `*_crash` is a regression input and may be refused).
/// Fails when a layout change is not carried into the seeds, which would leave the fuzzer
/// starting from frames refused at the version field.
#[test]
fn fuzz_seeds_speak_the_current_version() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/replica_frame");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.contains("crash") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let (_, _, used) =
                decode_frame(rest).unwrap_or_else(|e| panic!("seed '{name}' is refused: {e}"));
            rest = &rest[used..];
        }
        seen += 1;
    }
    assert!(seen > 0, "no seeds in {}", dir.display());
}
