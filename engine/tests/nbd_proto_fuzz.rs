//! Property tests of the NBD wire code against hostile clients: random and mutated client byte
//! streams into `negotiate`, random bytes into `decode_request` and the option-data decoders.
//!
//! Guards: negotiation never panics and its output is always a greeting followed by
//! well-formed option replies (ending, only on an `EXPORT_NAME` success, in the 10- or
//! 134-byte export reply); a well-formed session ends exactly as a small model of the option
//! rules predicts (structured replies, `base:allocation` kept only for the export that `SET`
//! named, `SEND_DF` cleared without structured replies, ABORT and EOF leave cleanly); and
//! whatever decodes re-encodes to the same bytes. The fuzz/ targets cover the same ground
//! with libFuzzer; this file is the always-on, short version.

use cairn_engine::frontend::nbd::handshake::{
    negotiate, ExportInfo, HandshakeError, Negotiated, BASE_ALLOCATION_CONTEXT_ID,
};
use cairn_engine::frontend::nbd::proto::{self, client_flag, opt, tx_flag, Request};
use proptest::prelude::*;
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

const NAMES: [&str; 3] = ["", "pg", "nope"];
const FLAGS: u16 = tx_flag::HAS_FLAGS | tx_flag::SEND_FLUSH | tx_flag::SEND_DF;

fn table() -> Vec<ExportInfo> {
    let export = |name: &str, size_bytes| ExportInfo {
        name: name.into(),
        description: format!("{name} volume"),
        size_bytes,
        transmission_flags: FLAGS,
        block_size_min: 512,
        block_size_preferred: 4096,
        block_size_max: proto::PAYLOAD_MAX_BYTES,
    };
    vec![export("", 1 << 20), export("pg", 1 << 30)]
}

type Outcome = Result<Option<Negotiated>, HandshakeError>;

fn run(input: Vec<u8>) -> (Outcome, Vec<u8>) {
    let mut d = Duplex {
        input: Cursor::new(input),
        output: Vec::new(),
    };
    let r = negotiate(&mut d, &table(), None).map(|o| o.map(|o| o.negotiated));
    (r, d.output)
}

/// Invariants that hold for every input, however malformed.
fn check(result: &Outcome, out: &[u8]) {
    assert_eq!(&out[..16], b"NBDMAGICIHAVEOPT", "greeting");
    let mut rest = &out[proto::GREETING_BYTES..];
    while rest.len() >= proto::OPTION_REPLY_HEADER_BYTES {
        let h: [u8; proto::OPTION_REPLY_HEADER_BYTES] =
            rest[..proto::OPTION_REPLY_HEADER_BYTES].try_into().unwrap();
        let Ok(h) = proto::decode_option_reply_header(&h) else {
            break;
        };
        let end = proto::OPTION_REPLY_HEADER_BYTES + h.len_bytes as usize;
        assert!(end <= rest.len(), "reply {h:?} runs past the output");
        rest = &rest[end..];
    }
    if !rest.is_empty() {
        assert!(
            matches!(result, Ok(Some(_))),
            "stray output after {result:?}"
        );
        assert!(
            rest.len() == 10 || rest.len() == 134,
            "export reply of {} bytes",
            rest.len()
        );
    }
    if let Ok(Some(n)) = result {
        assert!(n.export.name.is_empty() || n.export.name == "pg");
        let df = if n.structured_replies {
            tx_flag::SEND_DF
        } else {
            0
        };
        assert_eq!(n.export.transmission_flags, FLAGS & !tx_flag::SEND_DF | df);
        assert!(n.base_allocation.is_none() || n.structured_replies);
    }
}

/// One client option of a well-formed session.
#[derive(Clone, Debug)]
enum Op {
    StructuredReply,
    SetMeta { name: usize, base_allocation: bool },
    ListMeta { name: usize },
    List,
    Info { name: usize },
    Unknown { option: u32 },
    Go { name: usize },
    ExportName { name: usize },
    Abort,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        Just(Op::StructuredReply),
        (0..3usize, any::<bool>()).prop_map(|(name, base_allocation)| Op::SetMeta {
            name,
            base_allocation
        }),
        (0..3usize).prop_map(|name| Op::ListMeta { name }),
        Just(Op::List),
        (0..3usize).prop_map(|name| Op::Info { name }),
        prop_oneof![Just(opt::STARTTLS), Just(opt::EXTENDED_HEADERS), 12..200u32]
            .prop_map(|option| Op::Unknown { option }),
        (0..3usize).prop_map(|name| Op::Go { name }),
        (0..3usize).prop_map(|name| Op::ExportName { name }),
        Just(Op::Abort),
    ]
}

fn option(out: &mut Vec<u8>, option: u32, data: &[u8]) {
    let mut h = [0u8; proto::OPTION_HEADER_BYTES];
    let len_bytes = data.len() as u32;
    proto::encode_option_header(&proto::OptionHeader { option, len_bytes }, &mut h);
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
}

fn encode(no_zeroes: bool, ops: &[Op]) -> Vec<u8> {
    let flags = client_flag::FIXED_NEWSTYLE | if no_zeroes { client_flag::NO_ZEROES } else { 0 };
    let mut v = flags.to_be_bytes().to_vec();
    for op in ops {
        match *op {
            Op::StructuredReply => option(&mut v, opt::STRUCTURED_REPLY, &[]),
            Op::SetMeta {
                name,
                base_allocation,
            } => {
                let q: &[&[u8]] = if base_allocation {
                    &[b"base:allocation"]
                } else {
                    &[b"base:"]
                };
                let data = proto::encode_meta_context_request(NAMES[name].as_bytes(), q);
                option(&mut v, opt::SET_META_CONTEXT, &data);
            }
            Op::ListMeta { name } => {
                let data = proto::encode_meta_context_request(NAMES[name].as_bytes(), &[]);
                option(&mut v, opt::LIST_META_CONTEXT, &data);
            }
            Op::List => option(&mut v, opt::LIST, &[]),
            Op::Info { name } => {
                let data = proto::encode_info_request(NAMES[name].as_bytes(), &[1, 2, 3]);
                option(&mut v, opt::INFO, &data);
            }
            Op::Unknown { option: o } => option(&mut v, o, &[7; 3]),
            Op::Go { name } => option(
                &mut v,
                opt::GO,
                &proto::encode_info_request(NAMES[name].as_bytes(), &[]),
            ),
            Op::ExportName { name } => option(&mut v, opt::EXPORT_NAME, NAMES[name].as_bytes()),
            Op::Abort => option(&mut v, opt::ABORT, &[]),
        }
    }
    v
}

/// What the option rules say a well-formed session ends in: None for a clean end, Some((export,
/// structured replies, base:allocation)) for a transmission phase, Err(()) for a refusal.
#[allow(clippy::type_complexity)]
fn model(ops: &[Op]) -> Result<Option<(&'static str, bool, bool)>, ()> {
    let (mut structured, mut meta) = (false, None);
    let known = |name: usize| name < 2;
    for op in ops {
        match *op {
            Op::StructuredReply => structured = true,
            Op::SetMeta {
                name,
                base_allocation,
            } => {
                meta = (structured && known(name) && base_allocation).then_some(name);
            }
            Op::Go { name } | Op::ExportName { name } if known(name) => {
                return Ok(Some((NAMES[name], structured, meta == Some(name))));
            }
            Op::ExportName { .. } => return Err(()),
            Op::Abort => return Ok(None),
            _ => {}
        }
    }
    Ok(None)
}

fn mutate(mut v: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(at, kind, byte) in edits {
        if v.is_empty() {
            v.push(byte);
            continue;
        }
        let at = at % v.len();
        match kind % 4 {
            0 => v[at] = byte,
            1 => v[at] ^= 1 << (byte % 8),
            2 => v.insert(at, byte),
            _ => v.truncate(at),
        }
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..512)) {
        let (r, out) = run(input.clone());
        check(&r, &out);
        // The same bytes after a valid preamble get past the client flags.
        let mut v = client_flag::FIXED_NEWSTYLE.to_be_bytes().to_vec();
        v.extend_from_slice(b"IHAVEOPT");
        v.extend_from_slice(&input);
        let (r, out) = run(v);
        check(&r, &out);
    }

    #[test]
    fn well_formed_sessions_match_the_model(
        no_zeroes in any::<bool>(),
        ops in proptest::collection::vec(op(), 0..12),
    ) {
        let (r, out) = run(encode(no_zeroes, &ops));
        check(&r, &out);
        let got = match &r {
            Ok(Some(n)) => {
                let name = if n.export.name.is_empty() { NAMES[0] } else { NAMES[1] };
                Ok(Some((name, n.structured_replies, n.base_allocation.is_some())))
            }
            Ok(None) => Ok(None),
            Err(_) => Err(()),
        };
        prop_assert_eq!(got, model(&ops), "{:?}", r);
        if let Ok(Some(n)) = &r {
            prop_assert!(n.base_allocation.is_none_or(|id| id == BASE_ALLOCATION_CONTEXT_ID));
        }
    }

    #[test]
    fn mutated_sessions_never_panic(
        no_zeroes in any::<bool>(),
        ops in proptest::collection::vec(op(), 0..12),
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..6),
    ) {
        let (r, out) = run(mutate(encode(no_zeroes, &ops), &edits));
        check(&r, &out);
    }

    #[test]
    fn requests_round_trip(b in any::<[u8; proto::REQUEST_BYTES]>(), valid in any::<bool>()) {
        let mut b = b;
        if valid {
            b[..4].copy_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        }
        match proto::decode_request(&b) {
            Ok(r) => {
                let mut again = [0u8; proto::REQUEST_BYTES];
                proto::encode_request(&r, &mut again);
                prop_assert_eq!(again, b);
            }
            Err(proto::ProtoError::BadRequestMagic { magic }) => {
                prop_assert_eq!(magic.to_be_bytes(), [b[0], b[1], b[2], b[3]]);
                prop_assert_ne!(magic, proto::REQUEST_MAGIC);
            }
            Err(e) => prop_assert!(false, "unexpected {}", e),
        }
    }

    #[test]
    fn encoded_requests_decode(
        flags in any::<u16>(), kind in any::<u16>(), cookie in any::<u64>(),
        offset_bytes in any::<u64>(), len_bytes in any::<u32>(),
    ) {
        let r = Request { flags, kind, cookie, offset_bytes, len_bytes };
        let mut b = [0u8; proto::REQUEST_BYTES];
        proto::encode_request(&r, &mut b);
        prop_assert_eq!(proto::decode_request(&b).unwrap(), r);
        let mut c = [0u8; proto::CHUNK_HEADER_BYTES];
        proto::encode_chunk_header(flags, kind, cookie, len_bytes, &mut c);
        let h = proto::decode_chunk_header(&c).unwrap();
        prop_assert_eq!((h.flags, h.kind, h.cookie, h.len_bytes), (flags, kind, cookie, len_bytes));
    }

    #[test]
    fn option_data_decoders_round_trip(data in proptest::collection::vec(any::<u8>(), 0..64)) {
        if let Ok(req) = proto::decode_info_request(opt::GO, &data) {
            let infos: Vec<u16> = req.infos().collect();
            prop_assert_eq!(proto::encode_info_request(req.name, &infos), data.clone());
        }
        if let Ok(req) = proto::decode_meta_context_request(opt::SET_META_CONTEXT, &data) {
            prop_assert_eq!(proto::encode_meta_context_request(req.name, &req.queries), data);
        }
    }
}
