//! The replica wire protocol: the one place that lays out and parses the frames a nexus and its
//! replicas exchange.
//!
//! A frame is a fixed 64-byte little-endian [`Header`] followed by `payload_bytes` of payload.
//! The layout is drawn byte by byte in `docs/formats.md` ("Replica protocol"). Every frame
//! carries the volume id and the nexus's epoch, so a replica can fence every request, not only
//! the open. A crc32c covers the header (crc field zeroed) and the payload.
//!
//! This module owns bytes only. It never touches a socket, never decides whether an epoch is
//! stale or an offset is inside a volume, and never allocates per frame: [`encode`] returns a
//! [`Frame`] whose payload is the caller's data slice, and [`decode`] returns a [`Message`] that
//! borrows the received payload. Decoding is done in three steps, because a stream transport
//! must read the header before it knows how much payload to read: [`decode_header`], then
//! [`verify_payload`] (length and crc), then [`decode`]. [`decode_frame`] runs all three on a
//! buffer. Anything from outside that is malformed is a [`ProtoError`], never a panic; after any
//! error the stream cannot be resynchronised and the transport closes the connection.
//!
//! Decoding is canonical: every byte of an accepted frame is determined by its [`Envelope`] and
//! [`Message`] (unused fields and reserved bytes must be zero), so a frame that decodes
//! re-encodes to exactly the same bytes. Encoding asserts the same rules that decoding checks:
//! an invalid message on the encode side is a programming error.

use std::fmt;

/// Bytes of every frame header.
pub const HEADER_BYTES: usize = 64;
const _: () = assert!(HEADER_BYTES == 64);

/// First four bytes of every frame: "CRNR" read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"CRNR");

/// The only protocol version this build speaks; a frame with any other version is refused.
/// Bump it whenever the layout of any frame changes; `protocol_version_is_guarded` in
/// `tests/proto.rs` fails until you do.
pub const PROTOCOL_VERSION: u16 = 3;

/// Largest payload of one frame (1 MiB). A header announcing more is refused by
/// [`decode_header`] with [`ProtoError::PayloadTooLarge`] before any payload is read, and the
/// transport closes the connection. A nexus splits larger client I/O into several requests, and
/// a `Read` may not ask for more than this, because its reply must fit in one frame.
pub const PAYLOAD_MAX_BYTES: u32 = 1 << 20;

/// Unit of every offset and length on the wire: I/O is addressed in 512-byte sectors. A
/// misaligned offset or length is refused by [`decode`] and asserted against by [`encode`].
pub const SECTOR_BYTES: u32 = 512;

/// Largest fixed-size argument payload (`OpenOk`); data payloads are borrowed, not copied.
const ARGS_MAX_BYTES: usize = 32;

/// Header field offsets (see `docs/formats.md`).
mod at {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 4;
    pub const OPCODE: usize = 6;
    pub const VOLUME_ID: usize = 8;
    pub const EPOCH: usize = 24;
    pub const REQUEST_ID: usize = 32;
    pub const OFFSET: usize = 40;
    pub const PAYLOAD_BYTES: usize = 48;
    pub const FLAGS: usize = 52;
    pub const CRC: usize = 56;
    pub const RESERVED: usize = 60;
}
const _: () = assert!(at::RESERVED + 4 == HEADER_BYTES);

/// Header flag bits. Only `Write` (FUA), `Open` (TAKEOVER) and `SetGeneration` (CLEAN) carry
/// a flag.
pub mod flag {
    /// Force unit access: the replica acknowledges the write only once it is durable.
    pub const FUA: u32 = 1 << 0;
    /// On `Open`: the sender is a new owner (a new or promoted nexus), so its epoch must be
    /// strictly above the replica's fence.
    pub const TAKEOVER: u32 = 1 << 1;
    /// On `SetGeneration`: the nexus closed the replica cleanly (the replica flushes first).
    pub const CLEAN: u32 = 1 << 2;
}

/// Bit of `OpenOk`'s record flags word: the replica's generation record says it was closed
/// cleanly.
pub const RECORD_FLAG_CLEAN: u32 = 1 << 0;

/// Bytes of each fixed-size payload.
const OPEN_OK_PAYLOAD_BYTES: u32 = 32;
const SET_GENERATION_PAYLOAD_BYTES: u32 = 8;
const EXTENT_PAYLOAD_BYTES: u32 = 8;
const ERROR_PAYLOAD_BYTES: u32 = 4;
const STALE_EPOCH_PAYLOAD_BYTES: u32 = 8;
const _: () = assert!(OPEN_OK_PAYLOAD_BYTES as usize == ARGS_MAX_BYTES);

/// Why a frame was refused. Every variant names the values it saw.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    #[error("frame truncated: have {have_bytes} bytes, need {need_bytes}")]
    Truncated {
        have_bytes: usize,
        need_bytes: usize,
    },
    #[error("bad frame magic {magic:#010x} (expected {MAGIC:#010x})")]
    BadMagic { magic: u32 },
    #[error("unsupported protocol version {version} (this build speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion { version: u16 },
    #[error("unknown opcode {opcode:#06x}")]
    UnknownOpcode { opcode: u16 },
    #[error("payload of {payload_bytes} bytes exceeds the limit of {PAYLOAD_MAX_BYTES} bytes")]
    PayloadTooLarge { payload_bytes: u32 },
    #[error("reserved header bytes are {value:#010x}, not zero")]
    ReservedNotZero { value: u32 },
    #[error("flags {flags:#x} not allowed on {opcode:?}")]
    BadFlags { opcode: Opcode, flags: u32 },
    #[error("volume id is the nil uuid")]
    NilVolumeId,
    #[error("epoch 0 is not a valid epoch (epochs start at 1)")]
    ZeroEpoch,
    #[error("epoch {epoch} is above the maximum epoch {EPOCH_MAX}")]
    EpochAboveMax { epoch: u64 },
    #[error("header announces {header_bytes} payload bytes but {given_bytes} were given")]
    PayloadLengthMismatch {
        header_bytes: u32,
        given_bytes: usize,
    },
    #[error("crc32c mismatch: frame says {stored:#010x}, computed {computed:#010x}")]
    BadCrc { stored: u32, computed: u32 },
    #[error("{opcode:?} payload is {payload_bytes} bytes, expected {expected_bytes}")]
    BadPayloadLength {
        opcode: Opcode,
        payload_bytes: u32,
        expected_bytes: u32,
    },
    #[error("{opcode:?} must have {field} zero, found {value:#x}")]
    FieldNotZero {
        opcode: Opcode,
        field: &'static str,
        value: u64,
    },
    #[error("{opcode:?} {field} {value} is not a multiple of {SECTOR_BYTES} bytes")]
    Misaligned {
        opcode: Opcode,
        field: &'static str,
        value: u64,
    },
    #[error("{opcode:?} at offset {offset_bytes} has length 0")]
    EmptyExtent { opcode: Opcode, offset_bytes: u64 },
    #[error("{opcode:?} at offset {offset_bytes} length {len_bytes} overflows u64")]
    ExtentOverflow {
        opcode: Opcode,
        offset_bytes: u64,
        len_bytes: u64,
    },
    #[error("read of {len_bytes} bytes exceeds the limit of {PAYLOAD_MAX_BYTES} bytes")]
    ReadTooLarge { len_bytes: u64 },
    #[error("OpenOk block size {block_size_bytes} is not a power of two >= {SECTOR_BYTES}")]
    BadBlockSize { block_size_bytes: u32 },
    #[error("Error reply carries errno 0")]
    ZeroErrno,
    #[error("{opcode:?} carries generation 0 (generations start at 1)")]
    ZeroGeneration { opcode: Opcode },
    #[error("OpenOk record flags {flags:#x} not allowed with generation {generation}")]
    BadRecordFlags { flags: u32, generation: u64 },
}

/// A volume's 16-byte UUID, as the volume store records it. Never the nil uuid.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId([u8; 16]);

impl VolumeId {
    /// The one constructor; the nil uuid is refused because it never names a volume.
    pub fn new(uuid: [u8; 16]) -> Result<Self, ProtoError> {
        if uuid == [0; 16] {
            return Err(ProtoError::NilVolumeId);
        }
        Ok(Self(uuid))
    }

    pub fn bytes(&self) -> [u8; 16] {
        self.0
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&cairn_engine::volume::uuid_string(&self.0))
    }
}

impl fmt::Debug for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VolumeId({self})")
    }
}

/// The highest valid epoch. A nexus raises the epoch by one per create, promote or
/// takeover, so 2^48 is more than a million takeovers a second for eight years; far below
/// `u64::MAX`, so `epoch + 1` on any valid epoch never wraps, and an Open that names an
/// absurd epoch (u64::MAX, which once wrapped a promote to 0 and locked the volume) is
/// refused when it is decoded, before any fence moves.
pub const EPOCH_MAX: u64 = 1 << 48;

/// A nexus generation. Replicas refuse anything below the highest epoch they have accepted,
/// so a new nexus (always a higher epoch) fences off a stale one. Epochs run from 1 to
/// [`EPOCH_MAX`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Epoch(u64);

impl Epoch {
    /// The one constructor; 0 is refused so that "no epoch yet" is never confused with one,
    /// and anything above [`EPOCH_MAX`] so that no arithmetic on an epoch can wrap.
    pub fn new(epoch: u64) -> Result<Self, ProtoError> {
        if epoch == 0 {
            return Err(ProtoError::ZeroEpoch);
        }
        if epoch > EPOCH_MAX {
            return Err(ProtoError::EpochAboveMax { epoch });
        }
        Ok(Self(epoch))
    }

    pub fn get(self) -> u64 {
        self.0
    }

    /// The epoch after this one, or an error naming [`EPOCH_MAX`] once it is reached.
    pub fn next(self) -> Result<Self, ProtoError> {
        // Cannot wrap: self.0 <= EPOCH_MAX < u64::MAX.
        Epoch::new(self.0 + 1)
    }
}

const _: () = assert!(EPOCH_MAX < u64::MAX / 2, "epoch + 1 must never wrap");

/// Chosen by the sender of a request and echoed in its reply; any value is valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(u64);

impl RequestId {
    pub const fn new(id: u64) -> Self {
        Self(id)
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

/// The fields every frame carries besides its message. A reply echoes its request's envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub volume_id: VolumeId,
    pub epoch: Epoch,
    pub request_id: RequestId,
}

/// Wire opcodes. Requests (nexus to replica) are below 0x80, replies (replica to nexus) above.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Opcode {
    Open = 0x01,
    Write = 0x02,
    Read = 0x03,
    Flush = 0x04,
    Trim = 0x05,
    WriteZeroes = 0x06,
    Ping = 0x07,
    SetGeneration = 0x08,
    OpenOk = 0x81,
    ReadData = 0x82,
    Ok = 0x83,
    Error = 0x84,
    StaleEpoch = 0x85,
    Pong = 0x86,
}

impl Opcode {
    /// Every opcode, for tests and tools that must cover them all.
    pub const ALL: [Opcode; 14] = [
        Opcode::Open,
        Opcode::Write,
        Opcode::Read,
        Opcode::Flush,
        Opcode::Trim,
        Opcode::WriteZeroes,
        Opcode::Ping,
        Opcode::SetGeneration,
        Opcode::OpenOk,
        Opcode::ReadData,
        Opcode::Ok,
        Opcode::Error,
        Opcode::StaleEpoch,
        Opcode::Pong,
    ];

    /// The one decoder of opcode numbers.
    pub fn from_u16(opcode: u16) -> Result<Self, ProtoError> {
        Self::ALL
            .into_iter()
            .find(|o| *o as u16 == opcode)
            .ok_or(ProtoError::UnknownOpcode { opcode })
    }

    pub fn is_reply(self) -> bool {
        self as u16 >= 0x80
    }
}

/// One replica protocol message. Data payloads borrow the caller's buffer (encode) or the
/// received frame (decode). Offsets and lengths are multiples of [`SECTOR_BYTES`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// Nexus opens the replica of the envelope's volume with the envelope's epoch. The replica
    /// stores the epoch durably before it answers `OpenOk`, or answers `StaleEpoch`. With
    /// `takeover` (a new or promoted nexus) the epoch must be above the replica's fence;
    /// without it (the same nexus opening another connection) it may equal it.
    Open {
        takeover: bool,
    },
    /// The replica's answer to `Open` and `SetGeneration`: its geometry, the epoch it now
    /// holds, and its generation record (`generation` 0: it never had one; `clean` only with
    /// a generation).
    OpenOk {
        size_bytes: u64,
        block_size_bytes: u32,
        epoch_accepted: Epoch,
        generation: u64,
        clean: bool,
    },
    /// On a fresh connection instead of `Open`, from the nexus that holds the replica's fence
    /// (the envelope's epoch equals it): store this data generation (never below the stored
    /// one) durably, with `clean` after flushing the volume, then answer `OpenOk` and close.
    SetGeneration {
        generation: u64,
        clean: bool,
    },
    /// Write `data` at `offset_bytes`; with `fua`, durable before the `Ok`.
    Write {
        offset_bytes: u64,
        fua: bool,
        data: &'a [u8],
    },
    /// Read `len_bytes` (at most [`PAYLOAD_MAX_BYTES`]) at `offset_bytes`; answered `ReadData`.
    Read {
        offset_bytes: u64,
        len_bytes: u64,
    },
    /// The data of a successful `Read`.
    ReadData {
        data: &'a [u8],
    },
    /// Make every acknowledged write durable.
    Flush,
    /// Discard an extent (reads of it may then return anything the replica chooses, as NBD).
    Trim {
        offset_bytes: u64,
        len_bytes: u64,
    },
    /// Make an extent read as zeroes.
    WriteZeroes {
        offset_bytes: u64,
        len_bytes: u64,
    },
    /// Success of `Write`, `Flush`, `Trim` or `WriteZeroes`.
    Ok,
    /// A request failed with a Linux errno (never 0).
    Error {
        errno: u32,
    },
    /// The request's epoch is below `current`, the highest epoch the replica has accepted.
    /// Distinct from `Error` so a nexus knows it has been fenced off and must stop.
    StaleEpoch {
        current: Epoch,
    },
    /// Liveness probe; answered `Pong`.
    Ping,
    Pong,
}

impl Message<'_> {
    pub fn opcode(&self) -> Opcode {
        match self {
            Message::Open { .. } => Opcode::Open,
            Message::OpenOk { .. } => Opcode::OpenOk,
            Message::Write { .. } => Opcode::Write,
            Message::Read { .. } => Opcode::Read,
            Message::ReadData { .. } => Opcode::ReadData,
            Message::Flush => Opcode::Flush,
            Message::Trim { .. } => Opcode::Trim,
            Message::WriteZeroes { .. } => Opcode::WriteZeroes,
            Message::Ok => Opcode::Ok,
            Message::Error { .. } => Opcode::Error,
            Message::StaleEpoch { .. } => Opcode::StaleEpoch,
            Message::Ping => Opcode::Ping,
            Message::Pong => Opcode::Pong,
            Message::SetGeneration { .. } => Opcode::SetGeneration,
        }
    }
}

/// A decoded header. It has passed [`decode_header`]'s checks; its payload has not been
/// checked yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub opcode: Opcode,
    pub envelope: Envelope,
    pub offset_bytes: u64,
    pub payload_bytes: u32,
    pub flags: u32,
    pub crc: u32,
}

/// An encoded frame: send `header` and then `payload()`. The payload is either a small
/// argument block held here or the message's data slice, never a copy of the data.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a> {
    pub header: [u8; HEADER_BYTES],
    args: [u8; ARGS_MAX_BYTES],
    args_bytes: usize,
    data: &'a [u8],
}

impl<'a> Frame<'a> {
    pub fn payload(&self) -> &[u8] {
        if self.args_bytes > 0 {
            &self.args[..self.args_bytes]
        } else {
            self.data
        }
    }

    /// Bytes of header plus payload.
    pub fn len_bytes(&self) -> usize {
        HEADER_BYTES + self.payload().len()
    }
}

/// The crc32c of a frame: over the header with its crc field taken as zero, then the payload.
pub fn frame_crc(header: &[u8; HEADER_BYTES], payload: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&header[..at::CRC]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    let crc = crc32c::crc32c_append(crc, &header[at::CRC + 4..]);
    crc32c::crc32c_append(crc, payload)
}

/// Encodes one message. Panics if the message breaks a rule [`decode`] checks (misaligned or
/// empty extent, oversize data, errno 0): that is a bug in the sender, not bad input.
pub fn encode<'a>(envelope: &Envelope, msg: &Message<'a>) -> Frame<'a> {
    if let Err(e) = check(msg) {
        panic!("encoding an invalid replica message {msg:?}: {e}");
    }
    let mut frame = Frame {
        header: [0; HEADER_BYTES],
        args: [0; ARGS_MAX_BYTES],
        args_bytes: 0,
        data: &[],
    };
    let (offset_bytes, flags) = encode_body(msg, &mut frame);
    let payload_bytes = u32::try_from(frame.payload().len()).expect("checked above");
    assert!(payload_bytes <= PAYLOAD_MAX_BYTES);
    let h = &mut frame.header;
    put(h, at::MAGIC, &MAGIC.to_le_bytes());
    put(h, at::VERSION, &PROTOCOL_VERSION.to_le_bytes());
    put(h, at::OPCODE, &(msg.opcode() as u16).to_le_bytes());
    put(h, at::VOLUME_ID, &envelope.volume_id.0);
    put(h, at::EPOCH, &envelope.epoch.0.to_le_bytes());
    put(h, at::REQUEST_ID, &envelope.request_id.0.to_le_bytes());
    put(h, at::OFFSET, &offset_bytes.to_le_bytes());
    put(h, at::PAYLOAD_BYTES, &payload_bytes.to_le_bytes());
    put(h, at::FLAGS, &flags.to_le_bytes());
    let crc = frame_crc(&frame.header, frame.payload());
    put(&mut frame.header, at::CRC, &crc.to_le_bytes());
    frame
}

/// Encodes one message and appends header and payload to `out` (for batching small frames
/// into one send). The same bytes as [`encode`].
pub fn encode_into(envelope: &Envelope, msg: &Message<'_>, out: &mut Vec<u8>) {
    let frame = encode(envelope, msg);
    out.extend_from_slice(&frame.header);
    out.extend_from_slice(frame.payload());
}

/// Fills the argument block or data slice; returns the header's offset and flags fields.
fn encode_body<'a>(msg: &Message<'a>, frame: &mut Frame<'a>) -> (u64, u32) {
    let mut args = |bytes: &[u8]| {
        frame.args[..bytes.len()].copy_from_slice(bytes);
        frame.args_bytes = bytes.len();
    };
    match *msg {
        Message::Open { takeover } => (0, if takeover { flag::TAKEOVER } else { 0 }),
        Message::Flush | Message::Ok | Message::Ping | Message::Pong => (0, 0),
        Message::OpenOk {
            size_bytes,
            block_size_bytes,
            epoch_accepted,
            generation,
            clean,
        } => {
            let mut b = [0u8; OPEN_OK_PAYLOAD_BYTES as usize];
            put(&mut b, 0, &size_bytes.to_le_bytes());
            put(&mut b, 8, &block_size_bytes.to_le_bytes());
            let record_flags = if clean { RECORD_FLAG_CLEAN } else { 0 };
            put(&mut b, 12, &record_flags.to_le_bytes());
            put(&mut b, 16, &epoch_accepted.0.to_le_bytes());
            put(&mut b, 24, &generation.to_le_bytes());
            args(&b);
            (0, 0)
        }
        Message::SetGeneration { generation, clean } => {
            args(&generation.to_le_bytes());
            (0, if clean { flag::CLEAN } else { 0 })
        }
        Message::Write {
            offset_bytes,
            fua,
            data,
        } => {
            frame.data = data;
            (offset_bytes, if fua { flag::FUA } else { 0 })
        }
        Message::Read {
            offset_bytes,
            len_bytes,
        }
        | Message::Trim {
            offset_bytes,
            len_bytes,
        }
        | Message::WriteZeroes {
            offset_bytes,
            len_bytes,
        } => {
            args(&len_bytes.to_le_bytes());
            (offset_bytes, 0)
        }
        Message::ReadData { data } => {
            frame.data = data;
            (0, 0)
        }
        Message::Error { errno } => {
            args(&errno.to_le_bytes());
            (0, 0)
        }
        Message::StaleEpoch { current } => {
            args(&current.0.to_le_bytes());
            (0, 0)
        }
    }
}

/// Parses and checks a header: magic, version, opcode, payload length limit, reserved bytes,
/// volume id and epoch. Opcode-specific rules are left to [`decode`], after the crc.
pub fn decode_header(b: &[u8; HEADER_BYTES]) -> Result<Header, ProtoError> {
    let magic = u32_at(b, at::MAGIC);
    if magic != MAGIC {
        return Err(ProtoError::BadMagic { magic });
    }
    let version = u16::from_le_bytes([b[at::VERSION], b[at::VERSION + 1]]);
    if version != PROTOCOL_VERSION {
        return Err(ProtoError::UnsupportedVersion { version });
    }
    let opcode = Opcode::from_u16(u16::from_le_bytes([b[at::OPCODE], b[at::OPCODE + 1]]))?;
    let payload_bytes = u32_at(b, at::PAYLOAD_BYTES);
    if payload_bytes > PAYLOAD_MAX_BYTES {
        return Err(ProtoError::PayloadTooLarge { payload_bytes });
    }
    let reserved = u32_at(b, at::RESERVED);
    if reserved != 0 {
        return Err(ProtoError::ReservedNotZero { value: reserved });
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&b[at::VOLUME_ID..at::VOLUME_ID + 16]);
    Ok(Header {
        opcode,
        envelope: Envelope {
            volume_id: VolumeId::new(uuid)?,
            epoch: Epoch::new(u64_at(b, at::EPOCH))?,
            request_id: RequestId::new(u64_at(b, at::REQUEST_ID)),
        },
        offset_bytes: u64_at(b, at::OFFSET),
        payload_bytes,
        flags: u32_at(b, at::FLAGS),
        crc: u32_at(b, at::CRC),
    })
}

/// Checks that `payload` is the length the header announced and that the frame's crc matches.
/// `header_bytes` must be the bytes `header` was decoded from.
pub fn verify_payload(
    header: &Header,
    header_bytes: &[u8; HEADER_BYTES],
    payload: &[u8],
) -> Result<(), ProtoError> {
    if payload.len() != header.payload_bytes as usize {
        return Err(ProtoError::PayloadLengthMismatch {
            header_bytes: header.payload_bytes,
            given_bytes: payload.len(),
        });
    }
    let computed = frame_crc(header_bytes, payload);
    if computed != header.crc {
        return Err(ProtoError::BadCrc {
            stored: header.crc,
            computed,
        });
    }
    Ok(())
}

/// Builds the message of a verified frame and checks the opcode's rules: payload size, which
/// header fields it may use, alignment and extents. `payload` must have passed
/// [`verify_payload`].
pub fn decode<'a>(header: &Header, payload: &'a [u8]) -> Result<Message<'a>, ProtoError> {
    let opcode = header.opcode;
    if payload.len() != header.payload_bytes as usize {
        return Err(ProtoError::PayloadLengthMismatch {
            header_bytes: header.payload_bytes,
            given_bytes: payload.len(),
        });
    }
    let allowed_flags = match opcode {
        Opcode::Write => flag::FUA,
        Opcode::Open => flag::TAKEOVER,
        Opcode::SetGeneration => flag::CLEAN,
        _ => 0,
    };
    if header.flags & !allowed_flags != 0 {
        return Err(ProtoError::BadFlags {
            opcode,
            flags: header.flags,
        });
    }
    let uses_offset = matches!(
        opcode,
        Opcode::Write | Opcode::Read | Opcode::Trim | Opcode::WriteZeroes
    );
    if !uses_offset && header.offset_bytes != 0 {
        return Err(ProtoError::FieldNotZero {
            opcode,
            field: "offset",
            value: header.offset_bytes,
        });
    }
    let msg = decode_body(header, payload)?;
    check(&msg)?;
    Ok(msg)
}

/// Straight-line construction of each message from its payload; sizes are checked here,
/// value rules in [`check`].
fn decode_body<'a>(header: &Header, p: &'a [u8]) -> Result<Message<'a>, ProtoError> {
    let offset_bytes = header.offset_bytes;
    let sized = |expected: u32| {
        if p.len() == expected as usize {
            Ok(())
        } else {
            Err(ProtoError::BadPayloadLength {
                opcode: header.opcode,
                payload_bytes: header.payload_bytes,
                expected_bytes: expected,
            })
        }
    };
    let msg = match header.opcode {
        Opcode::Open => sized(0).map(|()| Message::Open {
            takeover: header.flags & flag::TAKEOVER != 0,
        })?,
        Opcode::Flush => sized(0).map(|()| Message::Flush)?,
        Opcode::Ok => sized(0).map(|()| Message::Ok)?,
        Opcode::Ping => sized(0).map(|()| Message::Ping)?,
        Opcode::Pong => sized(0).map(|()| Message::Pong)?,
        Opcode::OpenOk => {
            sized(OPEN_OK_PAYLOAD_BYTES)?;
            let record_flags = u32_at(p, 12);
            let generation = u64_at(p, 24);
            if record_flags & !RECORD_FLAG_CLEAN != 0 {
                return Err(ProtoError::BadRecordFlags {
                    flags: record_flags,
                    generation,
                });
            }
            Message::OpenOk {
                size_bytes: u64_at(p, 0),
                block_size_bytes: u32_at(p, 8),
                epoch_accepted: Epoch::new(u64_at(p, 16))?,
                generation,
                clean: record_flags & RECORD_FLAG_CLEAN != 0,
            }
        }
        Opcode::SetGeneration => {
            sized(SET_GENERATION_PAYLOAD_BYTES)?;
            Message::SetGeneration {
                generation: u64_at(p, 0),
                clean: header.flags & flag::CLEAN != 0,
            }
        }
        Opcode::Write => Message::Write {
            offset_bytes,
            fua: header.flags & flag::FUA != 0,
            data: p,
        },
        Opcode::ReadData => Message::ReadData { data: p },
        Opcode::Read => {
            sized(EXTENT_PAYLOAD_BYTES)?;
            let len_bytes = u64_at(p, 0);
            Message::Read {
                offset_bytes,
                len_bytes,
            }
        }
        Opcode::Trim => {
            sized(EXTENT_PAYLOAD_BYTES)?;
            let len_bytes = u64_at(p, 0);
            Message::Trim {
                offset_bytes,
                len_bytes,
            }
        }
        Opcode::WriteZeroes => {
            sized(EXTENT_PAYLOAD_BYTES)?;
            let len_bytes = u64_at(p, 0);
            Message::WriteZeroes {
                offset_bytes,
                len_bytes,
            }
        }
        Opcode::Error => {
            sized(ERROR_PAYLOAD_BYTES)?;
            Message::Error {
                errno: u32_at(p, 0),
            }
        }
        Opcode::StaleEpoch => {
            sized(STALE_EPOCH_PAYLOAD_BYTES)?;
            Message::StaleEpoch {
                current: Epoch::new(u64_at(p, 0))?,
            }
        }
    };
    Ok(msg)
}

/// The value rules of every message, shared by [`encode`] (as an assertion) and [`decode`].
fn check(msg: &Message<'_>) -> Result<(), ProtoError> {
    let opcode = msg.opcode();
    match *msg {
        Message::Write {
            offset_bytes, data, ..
        } => {
            check_data(opcode, data)?;
            check_extent(opcode, offset_bytes, data.len() as u64)
        }
        Message::ReadData { data } => check_data(opcode, data),
        Message::Read {
            offset_bytes,
            len_bytes,
        } => {
            if len_bytes > u64::from(PAYLOAD_MAX_BYTES) {
                return Err(ProtoError::ReadTooLarge { len_bytes });
            }
            check_extent(opcode, offset_bytes, len_bytes)
        }
        Message::Trim {
            offset_bytes,
            len_bytes,
        }
        | Message::WriteZeroes {
            offset_bytes,
            len_bytes,
        } => check_extent(opcode, offset_bytes, len_bytes),
        Message::OpenOk {
            block_size_bytes,
            generation,
            clean,
            ..
        } => {
            if block_size_bytes < SECTOR_BYTES || !block_size_bytes.is_power_of_two() {
                return Err(ProtoError::BadBlockSize { block_size_bytes });
            }
            if clean && generation == 0 {
                return Err(ProtoError::BadRecordFlags {
                    flags: RECORD_FLAG_CLEAN,
                    generation,
                });
            }
            Ok(())
        }
        Message::SetGeneration { generation: 0, .. } => Err(ProtoError::ZeroGeneration { opcode }),
        Message::Error { errno: 0 } => Err(ProtoError::ZeroErrno),
        Message::Open { .. }
        | Message::SetGeneration { .. }
        | Message::Flush
        | Message::Ok
        | Message::Error { .. }
        | Message::StaleEpoch { .. }
        | Message::Ping
        | Message::Pong => Ok(()),
    }
}

/// A data payload is non-empty, fits one frame and is whole sectors.
fn check_data(opcode: Opcode, data: &[u8]) -> Result<(), ProtoError> {
    let len_bytes = data.len() as u64;
    if len_bytes == 0 {
        return Err(ProtoError::EmptyExtent {
            opcode,
            offset_bytes: 0,
        });
    }
    if len_bytes > u64::from(PAYLOAD_MAX_BYTES) {
        return Err(ProtoError::PayloadTooLarge {
            payload_bytes: u32::try_from(len_bytes).unwrap_or(u32::MAX),
        });
    }
    if !len_bytes.is_multiple_of(u64::from(SECTOR_BYTES)) {
        return Err(ProtoError::Misaligned {
            opcode,
            field: "length",
            value: len_bytes,
        });
    }
    Ok(())
}

/// An extent is non-empty, sector-aligned at both ends, and does not wrap around u64.
fn check_extent(opcode: Opcode, offset_bytes: u64, len_bytes: u64) -> Result<(), ProtoError> {
    let sector = u64::from(SECTOR_BYTES);
    if !offset_bytes.is_multiple_of(sector) {
        return Err(ProtoError::Misaligned {
            opcode,
            field: "offset",
            value: offset_bytes,
        });
    }
    if !len_bytes.is_multiple_of(sector) {
        return Err(ProtoError::Misaligned {
            opcode,
            field: "length",
            value: len_bytes,
        });
    }
    if len_bytes == 0 {
        return Err(ProtoError::EmptyExtent {
            opcode,
            offset_bytes,
        });
    }
    if offset_bytes.checked_add(len_bytes).is_none() {
        return Err(ProtoError::ExtentOverflow {
            opcode,
            offset_bytes,
            len_bytes,
        });
    }
    Ok(())
}

/// Decodes the first frame in `bytes`: header, payload length and crc, then the message.
/// Returns the header, the message and how many bytes the frame used. `Truncated` says how
/// many bytes are needed when `bytes` holds less than a whole frame.
pub fn decode_frame(bytes: &[u8]) -> Result<(Header, Message<'_>, usize), ProtoError> {
    let Some(header_bytes) = bytes.first_chunk::<HEADER_BYTES>() else {
        return Err(ProtoError::Truncated {
            have_bytes: bytes.len(),
            need_bytes: HEADER_BYTES,
        });
    };
    let header = decode_header(header_bytes)?;
    let frame_bytes = HEADER_BYTES + header.payload_bytes as usize;
    let Some(payload) = bytes.get(HEADER_BYTES..frame_bytes) else {
        return Err(ProtoError::Truncated {
            have_bytes: bytes.len(),
            need_bytes: frame_bytes,
        });
    };
    verify_payload(&header, header_bytes, payload)?;
    let msg = decode(&header, payload)?;
    Ok((header, msg, frame_bytes))
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

/// Callers have checked the length (fixed header or sized payload), so the slice is in range.
fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}
