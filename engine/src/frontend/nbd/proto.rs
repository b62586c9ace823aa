//! NBD wire constants and the one place that encodes and decodes NBD messages.
//!
//! Everything on the NBD wire is big-endian. The layouts are drawn byte by byte in
//! `docs/formats.md` ("NBD"); the numbers follow the protocol document
//! (NetworkBlockDevice/nbd, doc/proto.md). This module owns bytes only: it never reads or
//! writes a socket and never decides policy (which flags an export offers, which requests are
//! valid for it). Decoders check magics and return [`ProtoError`] for anything from outside;
//! they never panic. Encoders take fixed-size arrays, so a short buffer is a compile error.

/// First 8 bytes the server sends ("NBDMAGIC", also called `INIT_PASSWD`).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Second server magic of newstyle negotiation and the magic opening every client option
/// ("IHAVEOPT").
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic opening every option reply of fixed newstyle negotiation.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic opening every transmission request (`NBD_REQUEST_MAGIC`).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic opening a simple reply (`NBD_SIMPLE_REPLY_MAGIC`).
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic opening a structured reply chunk (`NBD_STRUCTURED_REPLY_MAGIC`).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// A transmission request header (a WRITE's payload follows it).
pub const REQUEST_BYTES: usize = 28;
/// A simple reply header (a successful READ's payload follows it).
pub const SIMPLE_REPLY_BYTES: usize = 16;
/// A structured reply chunk header (`len_bytes` of payload follow it).
pub const CHUNK_HEADER_BYTES: usize = 20;
/// What the server sends on accept: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_BYTES: usize = 18;
/// A client option header: IHAVEOPT, option, data length (the data follows it).
pub const OPTION_HEADER_BYTES: usize = 16;
/// An option reply header: magic, option, reply type, data length (the data follows it).
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// The reply to `NBD_OPT_EXPORT_NAME` before the zero padding: size, transmission flags.
pub const EXPORT_NAME_REPLY_BYTES: usize = 10;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless the client set
/// [`client_flag::NO_ZEROES`].
pub const EXPORT_NAME_ZEROES_BYTES: usize = 124;
/// Payload of an `NBD_REP_INFO` carrying [`info::EXPORT`]: type, size, transmission flags.
pub const INFO_EXPORT_BYTES: usize = 12;
/// Payload of an `NBD_REP_INFO` carrying [`info::BLOCK_SIZE`]: type, minimum, preferred, maximum.
pub const INFO_BLOCK_SIZE_BYTES: usize = 14;

/// Largest READ/WRITE payload the server accepts (also advertised as the maximum block size).
/// A request above it is answered with EINVAL by the connection; the spec asks servers not to
/// treat anything below 2^25 bytes as a denial of service, and this is exactly 2^25.
pub const PAYLOAD_MAX_BYTES: u32 = 32 << 20;

/// Longest string the spec allows (export names, descriptions, error messages).
pub const STRING_MAX_BYTES: usize = 4096;

/// Transmission request types (`NBD_CMD_*`).
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
    pub const RESIZE: u16 = 8;
}

/// Request command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flag {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Transmission flags sent with an export's size (`NBD_FLAG_*`).
pub mod tx_flag {
    /// Must always be set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const ROTATIONAL: u16 = 1 << 4;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// Must be clear unless structured replies were negotiated.
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_RESIZE: u16 = 1 << 9;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`); error types have bit 15 set.
pub mod reply_type {
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const ERROR: u16 = (1 << 15) + 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
}

/// Set on the last chunk of a structured reply (`NBD_REPLY_FLAG_DONE`).
pub const REPLY_FLAG_DONE: u16 = 1;

/// Error values of simple replies and error chunks (`NBD_E*`); the only ones the spec allows.
pub mod err {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// Status flags of the `base:allocation` metadata context (`NBD_STATE_*`).
pub mod state {
    pub const HOLE: u32 = 1 << 0;
    pub const ZERO: u32 = 1 << 1;
}

/// Handshake flags the server sends in its greeting (`NBD_FLAG_*`, 16 bits).
pub mod handshake_flag {
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags, the client's answer to the greeting (`NBD_FLAG_C_*`, 32 bits).
pub mod client_flag {
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Option codes of the negotiation phase (`NBD_OPT_*`).
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`); error replies have bit 31 set and may carry a message.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    /// Set in every error reply type.
    pub const ERROR_BIT: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERROR_BIT + 1;
    pub const ERR_POLICY: u32 = ERROR_BIT + 2;
    pub const ERR_INVALID: u32 = ERROR_BIT + 3;
    pub const ERR_PLATFORM: u32 = ERROR_BIT + 4;
    pub const ERR_TLS_REQD: u32 = ERROR_BIT + 5;
    pub const ERR_UNKNOWN: u32 = ERROR_BIT + 6;
    pub const ERR_SHUTDOWN: u32 = ERROR_BIT + 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERROR_BIT + 8;
    pub const ERR_TOO_BIG: u32 = ERROR_BIT + 9;
}

/// Information types of `NBD_REP_INFO` replies and `NBD_OPT_INFO`/`GO` requests
/// (`NBD_INFO_*`).
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// The only metadata context the server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";

const _: () = assert!(REQUEST_BYTES == 4 + 2 + 2 + 8 + 8 + 4);
const _: () = assert!(SIMPLE_REPLY_BYTES == 4 + 4 + 8);
const _: () = assert!(CHUNK_HEADER_BYTES == 4 + 2 + 2 + 8 + 4);
const _: () = assert!(GREETING_BYTES == 8 + 8 + 2);
const _: () = assert!(OPTION_HEADER_BYTES == 8 + 4 + 4);
const _: () = assert!(OPTION_REPLY_HEADER_BYTES == 8 + 4 + 4 + 4);
const _: () = assert!(EXPORT_NAME_REPLY_BYTES + EXPORT_NAME_ZEROES_BYTES == 134);
const _: () = assert!(INFO_EXPORT_BYTES == 2 + 8 + 2);
const _: () = assert!(INFO_BLOCK_SIZE_BYTES == 2 + 4 + 4 + 4);

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("NBD request magic {magic:#010x}, expected {REQUEST_MAGIC:#010x}")]
    BadRequestMagic { magic: u32 },
    #[error("NBD option magic {magic:#018x}, expected IHAVEOPT {IHAVEOPT:#018x}")]
    BadOptionMagic { magic: u64 },
    #[error("NBD option reply magic {magic:#018x}, expected {OPTION_REPLY_MAGIC:#018x}")]
    BadOptionReplyMagic { magic: u64 },
    #[error("NBD simple reply magic {magic:#010x}, expected {SIMPLE_REPLY_MAGIC:#010x}")]
    BadSimpleReplyMagic { magic: u32 },
    #[error("NBD reply chunk magic {magic:#010x}, expected {STRUCTURED_REPLY_MAGIC:#010x}")]
    BadChunkMagic { magic: u32 },
    #[error("NBD option {option} data of {len_bytes} bytes is malformed: {why}")]
    BadOptionData {
        option: u32,
        len_bytes: usize,
        why: &'static str,
    },
}

/// Maps a positive Linux errno to the NBD error the spec allows (unknown → EIO).
///
/// The sign is ignored, so io_uring-style negative results map the same way. Quota and
/// file-size errors become ENOSPC and a read-only file system EPERM, as the spec asks.
pub fn errno_to_nbd(errno: i32) -> u32 {
    match errno.unsigned_abs() as i32 {
        libc::EPERM | libc::EACCES | libc::EROFS => err::EPERM,
        libc::ENOMEM => err::ENOMEM,
        libc::EINVAL => err::EINVAL,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => err::ENOSPC,
        libc::EOVERFLOW => err::EOVERFLOW,
        libc::EOPNOTSUPP => err::ENOTSUP,
        libc::ESHUTDOWN => err::ESHUTDOWN,
        _ => err::EIO,
    }
}

/// One transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*` bits ([`cmd_flag`]).
    pub flags: u16,
    /// `NBD_CMD_*` ([`cmd`]).
    pub kind: u16,
    /// Opaque to the server, echoed in every reply to this request (the spec's "handle").
    pub cookie: u64,
    pub offset_bytes: u64,
    pub len_bytes: u32,
}

/// Decodes a request header. Only the magic is checked: whether the type, flags and range make
/// sense for the export is the connection's decision.
pub fn decode_request(b: &[u8; REQUEST_BYTES]) -> Result<Request, ProtoError> {
    let magic = be_u32(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadRequestMagic { magic });
    }
    Ok(Request {
        flags: be_u16(b, 4),
        kind: be_u16(b, 6),
        cookie: be_u64(b, 8),
        offset_bytes: be_u64(b, 16),
        len_bytes: be_u32(b, 24),
    })
}

/// Encodes a request header (for tests and clients).
pub fn encode_request(r: &Request, out: &mut [u8; REQUEST_BYTES]) {
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&r.flags.to_be_bytes());
    out[6..8].copy_from_slice(&r.kind.to_be_bytes());
    out[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&r.offset_bytes.to_be_bytes());
    out[24..28].copy_from_slice(&r.len_bytes.to_be_bytes());
}

/// A decoded simple reply header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimpleReply {
    /// 0 or one of [`err`].
    pub error: u32,
    pub cookie: u64,
}

/// Encodes a simple reply header; `error` is 0 or one of [`err`].
pub fn encode_simple_reply(error: u32, cookie: u64, out: &mut [u8; SIMPLE_REPLY_BYTES]) {
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// Decodes a simple reply header (for tests and clients).
pub fn decode_simple_reply(b: &[u8; SIMPLE_REPLY_BYTES]) -> Result<SimpleReply, ProtoError> {
    let magic = be_u32(b, 0);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(ProtoError::BadSimpleReplyMagic { magic });
    }
    Ok(SimpleReply {
        error: be_u32(b, 4),
        cookie: be_u64(b, 8),
    })
}

/// A decoded structured reply chunk header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkHeader {
    /// [`REPLY_FLAG_DONE`] or 0.
    pub flags: u16,
    /// One of [`reply_type`].
    pub kind: u16,
    pub cookie: u64,
    /// Payload bytes after the header.
    pub len_bytes: u32,
}

/// Encodes a structured reply chunk header; `len_bytes` of payload must follow it.
pub fn encode_chunk_header(
    flags: u16,
    kind: u16,
    cookie: u64,
    len_bytes: u32,
    out: &mut [u8; CHUNK_HEADER_BYTES],
) {
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&len_bytes.to_be_bytes());
}

/// Decodes a structured reply chunk header (for tests and clients).
pub fn decode_chunk_header(b: &[u8; CHUNK_HEADER_BYTES]) -> Result<ChunkHeader, ProtoError> {
    let magic = be_u32(b, 0);
    if magic != STRUCTURED_REPLY_MAGIC {
        return Err(ProtoError::BadChunkMagic { magic });
    }
    Ok(ChunkHeader {
        flags: be_u16(b, 4),
        kind: be_u16(b, 6),
        cookie: be_u64(b, 8),
        len_bytes: be_u32(b, 16),
    })
}

/// Encodes the server's greeting: NBDMAGIC, IHAVEOPT, handshake flags ([`handshake_flag`]).
pub fn encode_greeting(flags: u16, out: &mut [u8; GREETING_BYTES]) {
    out[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&flags.to_be_bytes());
}

/// A decoded client option header; `len_bytes` of option data follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// One of [`opt`] (or anything else, which the server answers with `ERR_UNSUP`).
    pub option: u32,
    pub len_bytes: u32,
}

/// Decodes a client option header; the data length is not bounded here (the caller's limit).
pub fn decode_option_header(b: &[u8; OPTION_HEADER_BYTES]) -> Result<OptionHeader, ProtoError> {
    let magic = be_u64(b, 0);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadOptionMagic { magic });
    }
    Ok(OptionHeader {
        option: be_u32(b, 8),
        len_bytes: be_u32(b, 12),
    })
}

/// Encodes a client option header (for tests and clients).
pub fn encode_option_header(h: &OptionHeader, out: &mut [u8; OPTION_HEADER_BYTES]) {
    out[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[8..12].copy_from_slice(&h.option.to_be_bytes());
    out[12..16].copy_from_slice(&h.len_bytes.to_be_bytes());
}

/// A decoded option reply header; `len_bytes` of reply data follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option this answers, as the client sent it.
    pub option: u32,
    /// One of [`rep`].
    pub kind: u32,
    pub len_bytes: u32,
}

/// Encodes an option reply header.
pub fn encode_option_reply_header(
    h: &OptionReplyHeader,
    out: &mut [u8; OPTION_REPLY_HEADER_BYTES],
) {
    out[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out[8..12].copy_from_slice(&h.option.to_be_bytes());
    out[12..16].copy_from_slice(&h.kind.to_be_bytes());
    out[16..20].copy_from_slice(&h.len_bytes.to_be_bytes());
}

/// Decodes an option reply header (for tests and clients).
pub fn decode_option_reply_header(
    b: &[u8; OPTION_REPLY_HEADER_BYTES],
) -> Result<OptionReplyHeader, ProtoError> {
    let magic = be_u64(b, 0);
    if magic != OPTION_REPLY_MAGIC {
        return Err(ProtoError::BadOptionReplyMagic { magic });
    }
    Ok(OptionReplyHeader {
        option: be_u32(b, 8),
        kind: be_u32(b, 12),
        len_bytes: be_u32(b, 16),
    })
}

/// Encodes the reply to `NBD_OPT_EXPORT_NAME` without its zero padding.
pub fn encode_export_name_reply(
    size_bytes: u64,
    transmission_flags: u16,
    out: &mut [u8; EXPORT_NAME_REPLY_BYTES],
) {
    out[0..8].copy_from_slice(&size_bytes.to_be_bytes());
    out[8..10].copy_from_slice(&transmission_flags.to_be_bytes());
}

/// Encodes the payload of an `NBD_REP_INFO` of type [`info::EXPORT`].
pub fn encode_info_export(
    size_bytes: u64,
    transmission_flags: u16,
    out: &mut [u8; INFO_EXPORT_BYTES],
) {
    out[0..2].copy_from_slice(&info::EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size_bytes.to_be_bytes());
    out[10..12].copy_from_slice(&transmission_flags.to_be_bytes());
}

/// Encodes the payload of an `NBD_REP_INFO` of type [`info::BLOCK_SIZE`].
pub fn encode_info_block_size(
    min_bytes: u32,
    preferred_bytes: u32,
    max_bytes: u32,
    out: &mut [u8; INFO_BLOCK_SIZE_BYTES],
) {
    out[0..2].copy_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&min_bytes.to_be_bytes());
    out[6..10].copy_from_slice(&preferred_bytes.to_be_bytes());
    out[10..14].copy_from_slice(&max_bytes.to_be_bytes());
}

/// The data of `NBD_OPT_INFO` and `NBD_OPT_GO`: an export name and the information types the
/// client asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// Raw name bytes; whether they are a valid string is the caller's check.
    pub name: &'a [u8],
    info_bytes: &'a [u8],
}

impl<'a> InfoRequest<'a> {
    /// The requested information types ([`info`]), in the client's order.
    pub fn infos(&self) -> impl Iterator<Item = u16> + 'a {
        self.info_bytes
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
    }
}

/// Decodes `NBD_OPT_INFO`/`NBD_OPT_GO` data; every byte must be accounted for.
pub fn decode_info_request(option: u32, data: &[u8]) -> Result<InfoRequest<'_>, ProtoError> {
    let bad = |why| ProtoError::BadOptionData {
        option,
        len_bytes: data.len(),
        why,
    };
    let mut r = Reader(data);
    let name_len = r.u32().ok_or(bad("shorter than a name length"))?;
    let name = r
        .take(name_len as usize)
        .ok_or(bad("name runs past the data"))?;
    let count = r.u16().ok_or(bad("no information request count"))?;
    let info_bytes = r
        .take(usize::from(count) * 2)
        .ok_or(bad("information requests run past the data"))?;
    if !r.0.is_empty() {
        return Err(bad("trailing bytes after the information requests"));
    }
    Ok(InfoRequest { name, info_bytes })
}

/// Encodes `NBD_OPT_INFO`/`NBD_OPT_GO` data (for tests and clients).
pub fn encode_info_request(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len() + 2 + 2 * infos.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name);
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    /// Raw export name bytes.
    pub name: &'a [u8],
    /// Raw query strings ("namespace:leaf"), in the client's order.
    pub queries: Vec<&'a [u8]>,
}

/// Decodes meta-context option data; every byte must be accounted for. The query count is
/// bounded by the data length (each query takes at least 4 bytes), never trusted as sent.
pub fn decode_meta_context_request(
    option: u32,
    data: &[u8],
) -> Result<MetaContextRequest<'_>, ProtoError> {
    let bad = |why| ProtoError::BadOptionData {
        option,
        len_bytes: data.len(),
        why,
    };
    let mut r = Reader(data);
    let name_len = r.u32().ok_or(bad("shorter than a name length"))?;
    let name = r
        .take(name_len as usize)
        .ok_or(bad("name runs past the data"))?;
    let count = r.u32().ok_or(bad("no query count"))?;
    if count as usize > r.0.len() / 4 {
        return Err(bad("query count exceeds the data"));
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let len = r.u32().ok_or(bad("query length runs past the data"))?;
        queries.push(
            r.take(len as usize)
                .ok_or(bad("query runs past the data"))?,
        );
    }
    if !r.0.is_empty() {
        return Err(bad("trailing bytes after the queries"));
    }
    Ok(MetaContextRequest { name, queries })
}

/// Encodes meta-context option data (for tests and clients).
pub fn encode_meta_context_request(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name);
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q);
    }
    v
}

/// Encodes the data of an `NBD_REP_SERVER` reply: name length, name, then a description for
/// humans.
pub fn encode_server_reply(name: &[u8], description: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len() + description.len());
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name);
    v.extend_from_slice(description);
    v
}

/// Encodes the data of an `NBD_REP_META_CONTEXT` reply: context id, context name.
pub fn encode_meta_context_reply(context_id: u32, name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + name.len());
    v.extend_from_slice(&context_id.to_be_bytes());
    v.extend_from_slice(name);
    v
}

/// Encodes the data of an `NBD_REP_INFO` carrying a string ([`info::NAME`] or
/// [`info::DESCRIPTION`]).
pub fn encode_info_string(kind: u16, text: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(2 + text.len());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(text);
    v
}

/// A bounds-checked big-endian reader over option data; every accessor returns `None` rather
/// than reading past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| be_u32(b, 0))
    }
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(v)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_spell_their_ascii_names() {
        assert_eq!(&NBDMAGIC.to_be_bytes(), b"NBDMAGIC");
        assert_eq!(&IHAVEOPT.to_be_bytes(), b"IHAVEOPT");
    }

    #[test]
    fn request_round_trips_and_is_big_endian() {
        let r = Request {
            flags: cmd_flag::FUA,
            kind: cmd::WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset_bytes: 0x1122_3344_5566_7788,
            len_bytes: 4096,
        };
        let mut b = [0u8; REQUEST_BYTES];
        encode_request(&r, &mut b);
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0, 1, 0, 1]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[24..28], &[0, 0, 0x10, 0]);
        assert_eq!(decode_request(&b).unwrap(), r);
    }

    #[test]
    fn bad_request_magic_names_the_value() {
        let mut b = [0u8; REQUEST_BYTES];
        b[0..4].copy_from_slice(&0xdead_beef_u32.to_be_bytes());
        let e = decode_request(&b).unwrap_err();
        assert!(matches!(
            e,
            ProtoError::BadRequestMagic { magic: 0xdead_beef }
        ));
        assert!(e.to_string().contains("0xdeadbeef"), "{e}");
    }

    #[test]
    fn replies_round_trip() {
        let mut s = [0u8; SIMPLE_REPLY_BYTES];
        encode_simple_reply(err::EIO, 77, &mut s);
        assert_eq!(&s[0..8], &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5]);
        assert_eq!(
            decode_simple_reply(&s).unwrap(),
            SimpleReply {
                error: err::EIO,
                cookie: 77
            }
        );
        let mut c = [0u8; CHUNK_HEADER_BYTES];
        encode_chunk_header(REPLY_FLAG_DONE, reply_type::ERROR, 9, 6, &mut c);
        assert_eq!(&c[0..8], &[0x66, 0x8e, 0x33, 0xef, 0, 1, 0x80, 1]);
        assert_eq!(
            decode_chunk_header(&c).unwrap(),
            ChunkHeader {
                flags: REPLY_FLAG_DONE,
                kind: reply_type::ERROR,
                cookie: 9,
                len_bytes: 6
            }
        );
    }

    #[test]
    fn option_headers_round_trip() {
        let h = OptionHeader {
            option: opt::GO,
            len_bytes: 12,
        };
        let mut b = [0u8; OPTION_HEADER_BYTES];
        encode_option_header(&h, &mut b);
        assert_eq!(decode_option_header(&b).unwrap(), h);
        b[0] ^= 1;
        assert!(matches!(
            decode_option_header(&b),
            Err(ProtoError::BadOptionMagic { .. })
        ));
        let r = OptionReplyHeader {
            option: opt::LIST,
            kind: rep::ERR_TOO_BIG,
            len_bytes: 3,
        };
        let mut b = [0u8; OPTION_REPLY_HEADER_BYTES];
        encode_option_reply_header(&r, &mut b);
        assert_eq!(&b[0..8], &[0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);
        assert_eq!(&b[12..16], &[0x80, 0, 0, 9]);
        assert_eq!(decode_option_reply_header(&b).unwrap(), r);
    }

    #[test]
    fn info_payloads_are_laid_out_per_spec() {
        let mut e = [0u8; INFO_EXPORT_BYTES];
        encode_info_export(1 << 20, tx_flag::HAS_FLAGS | tx_flag::SEND_FLUSH, &mut e);
        assert_eq!(e, [0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 5]);
        let mut s = [0u8; INFO_BLOCK_SIZE_BYTES];
        encode_info_block_size(512, 4096, PAYLOAD_MAX_BYTES, &mut s);
        assert_eq!(s, [0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 2, 0, 0, 0]);
        let mut g = [0u8; GREETING_BYTES];
        encode_greeting(
            handshake_flag::FIXED_NEWSTYLE | handshake_flag::NO_ZEROES,
            &mut g,
        );
        assert_eq!(&g[0..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
    }

    #[test]
    fn constants_match_the_spec() {
        assert_eq!(rep::ERR_UNSUP, 0x8000_0001);
        assert_eq!(rep::ERR_TOO_BIG, 0x8000_0009);
        assert_eq!(reply_type::ERROR, 0x8001);
        assert_eq!(reply_type::ERROR_OFFSET, 0x8002);
        assert_eq!(tx_flag::SEND_FAST_ZERO, 0x0800);
        assert_eq!(PAYLOAD_MAX_BYTES, 33_554_432);
    }

    #[test]
    fn errno_maps_to_allowed_values() {
        assert_eq!(errno_to_nbd(libc::EIO), err::EIO);
        assert_eq!(errno_to_nbd(-libc::EIO), err::EIO);
        assert_eq!(errno_to_nbd(libc::EROFS), err::EPERM);
        assert_eq!(errno_to_nbd(libc::EDQUOT), err::ENOSPC);
        assert_eq!(errno_to_nbd(libc::EFBIG), err::ENOSPC);
        assert_eq!(errno_to_nbd(libc::EOPNOTSUPP), err::ENOTSUP);
        assert_eq!(errno_to_nbd(libc::ESHUTDOWN), err::ESHUTDOWN);
        assert_eq!(errno_to_nbd(libc::EAGAIN), err::EIO);
        assert_eq!(errno_to_nbd(i32::MIN), err::EIO);
        assert_eq!(errno_to_nbd(0), err::EIO);
        let allowed = [1, 5, 12, 22, 28, 75, 95, 108];
        for e in 0..200 {
            assert!(allowed.contains(&errno_to_nbd(e)), "errno {e}");
        }
    }
}
