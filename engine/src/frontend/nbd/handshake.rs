//! Fixed-newstyle NBD negotiation ("option haggling") on a blocking stream, with TLS by
//! `NBD_OPT_STARTTLS`.
//!
//! [`negotiate`] runs on a short-lived thread per client, never on a reactor: it blocks on
//! every read, and the caller bounds it with a socket timeout and a cap on concurrent
//! handshakes. It owns the option phase only: it answers options from the export table it is
//! given ([`Exports`]) and returns what the client chose ([`Negotiated`]); it never touches a
//! bdev. Every byte from the client is outside input: anything malformed is an error reply the
//! spec allows or a [`HandshakeError`] naming the problem, never a panic, and every length the
//! client sends is bounded by a named limit before anything is allocated for it.
//!
//! Offered: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`,
//! `LIST_META_CONTEXT` and `SET_META_CONTEXT` (only `base:allocation`). Refused:
//! `EXTENDED_HEADERS` and every unknown option (`ERR_UNSUP`); negotiation goes on after a
//! refusal.
//!
//! TLS ([`NbdTls`]): without it the server runs in the spec's NOTLS mode and `STARTTLS` is
//! refused with `ERR_POLICY`. With it, `STARTTLS` is answered `ACK` in plain text and the TLS
//! handshake starts on the very next byte; from then on every option and reply, and the whole
//! transmission phase, go through the rustls session that [`negotiate`] hands back in
//! [`Outcome::tls`]. State from options before `STARTTLS` (structured replies, the selected
//! meta context) is forgotten once TLS is up, so a man in the middle cannot inject it (as the
//! spec asks, and as nbdkit learnt from CVE-2021-3716). With [`NbdTls::required`] (the
//! spec's FORCEDTLS mode) every option before TLS other than `STARTTLS` and `ABORT` is answered
//! `ERR_TLS_REQD`, and `EXPORT_NAME`, which cannot carry an error, closes the connection. A
//! second `STARTTLS` is `ERR_INVALID`. The TLS handshake runs under the same
//! whole-negotiation deadline as every option: the caller's canceller shuts the socket down.
//!
//! Message layouts live in [`super::proto`] and `docs/formats.md`.

use super::proto::{self, client_flag, handshake_flag, info, opt, rep, tx_flag, ProtoError};
use rustls::{ServerConfig, ServerConnection};
use std::io::{ErrorKind, Read, Write};
use std::sync::Arc;

/// Largest option data the server reads. Longer data (other than `EXPORT_NAME`, which cannot
/// be answered with an error) is read and discarded up to [`OPTION_DISCARD_MAX_BYTES`] and
/// answered with `NBD_REP_ERR_TOO_BIG`; negotiation goes on.
pub const OPTION_DATA_MAX_BYTES: u32 = 64 << 10;
/// Longest option data the server discards to answer `ERR_TOO_BIG`. Past it the client is
/// treated as a denial of service (which the spec allows): the connection is closed with
/// [`HandshakeError::OptionTooLong`] without reading the data.
pub const OPTION_DISCARD_MAX_BYTES: u32 = 1 << 20;
/// Options one negotiation may send. The next one closes the connection with
/// [`HandshakeError::TooManyOptions`], so a client cannot hold a handshake slot forever by
/// sending cheap options (the caller's timeout bounds the slow case).
pub const OPTIONS_MAX: u32 = 1024;
/// Longest export name (the spec's string limit). A longer name is answered with
/// `ERR_INVALID` in `INFO`/`GO`/meta-context options and ends the session in `EXPORT_NAME`.
pub const EXPORT_NAME_MAX_BYTES: usize = proto::STRING_MAX_BYTES;
/// Context id of `base:allocation` after `SET_META_CONTEXT`; the only context there is, so one
/// fixed nonzero id serves every connection. (`LIST_META_CONTEXT` replies carry 0, as the spec
/// asks.)
pub const BASE_ALLOCATION_CONTEXT_ID: u32 = 1;
/// What the server offers in its greeting.
const SERVER_FLAGS: u16 = handshake_flag::FIXED_NEWSTYLE | handshake_flag::NO_ZEROES;
/// Client flag bits this server understands; any other bit closes the connection.
const CLIENT_FLAGS_KNOWN: u32 = client_flag::FIXED_NEWSTYLE | client_flag::NO_ZEROES;
/// Chunk used to discard oversize option data.
const DISCARD_CHUNK_BYTES: usize = 4096;

/// TLS as the NBD server offers it.
#[derive(Clone)]
pub struct NbdTls {
    /// The server's certificate, and whether client certificates are asked for and verified.
    pub config: Arc<ServerConfig>,
    /// Refuse everything but `STARTTLS` and `ABORT` before TLS (FORCEDTLS).
    pub required: bool,
}

impl std::fmt::Debug for NbdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdTls")
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

/// One export as negotiation describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: String,
    /// Shown by `LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: String,
    pub size_bytes: u64,
    /// Computed by the caller ([`proto::tx_flag`]) and sent as given, except that `SEND_DF` is
    /// cleared when the client did not negotiate structured replies (the spec requires it).
    pub transmission_flags: u16,
    pub block_size_min: u32,
    pub block_size_preferred: u32,
    pub block_size_max: u32,
}

/// The export table negotiation answers from.
pub trait Exports {
    fn get(&self, name: &str) -> Option<ExportInfo>;
    fn list(&self) -> Vec<ExportInfo>;
}

/// A fixed table, looked up by exact name.
impl Exports for Vec<ExportInfo> {
    fn get(&self, name: &str) -> Option<ExportInfo> {
        self.iter().find(|e| e.name == name).cloned()
    }
    fn list(&self) -> Vec<ExportInfo> {
        self.clone()
    }
}

/// What a successful negotiation chose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The export, with the transmission flags actually sent.
    pub export: ExportInfo,
    pub structured_replies: bool,
    /// context id of base:allocation when the client selected it
    pub base_allocation: Option<u32>,
}

/// A successful negotiation: what was chosen, and the TLS session the transmission phase
/// continues in (None without `STARTTLS`).
pub struct Outcome {
    pub negotiated: Negotiated,
    pub tls: Option<ServerConnection>,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("NBD negotiation: TLS: {0}")]
    Tls(rustls::Error),
    #[error("NBD_OPT_EXPORT_NAME before STARTTLS while TLS is required")]
    TlsRequired,
    #[error("NBD negotiation: {what}: {source}")]
    Io {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("NBD negotiation: client closed the connection in the middle of {what}")]
    Truncated { what: &'static str },
    #[error("NBD negotiation: {0}")]
    Proto(#[from] ProtoError),
    #[error(
        "NBD client flags {flags:#x} lack FIXED_NEWSTYLE; only fixed-newstyle clients are served"
    )]
    NotFixedNewstyle { flags: u32 },
    #[error("NBD client flags {flags:#x} set unknown bits {unknown:#x}")]
    UnknownClientFlags { flags: u32, unknown: u32 },
    #[error("NBD option {option} carries {len_bytes} bytes of data, more than the {max_bytes}-byte limit")]
    OptionTooLong {
        option: u32,
        len_bytes: u32,
        max_bytes: u32,
    },
    #[error("NBD client sent more than {max} options in one negotiation")]
    TooManyOptions { max: u32 },
    #[error("NBD_OPT_EXPORT_NAME: no export named '{name}'")]
    UnknownExport { name: String },
    #[error("NBD_OPT_EXPORT_NAME: export name of {len_bytes} bytes is invalid: {why}")]
    BadExportName { len_bytes: usize, why: &'static str },
}

/// Runs fixed-newstyle negotiation as the server on `stream`.
///
/// Ok(None): the client aborted or left cleanly during negotiation (LIST then disconnect, ABORT).
/// "Cleanly" means the stream ended before the client flags or between two options; an end in
/// the middle of a message is [`HandshakeError::Truncated`]. On `Ok(Some(_))` the stream is
/// positioned at the first transmission request and every reply has been flushed; with TLS,
/// bytes of that request may already sit in [`Outcome::tls`]'s buffers.
pub fn negotiate<S: std::io::Read + std::io::Write>(
    stream: &mut S,
    exports: &dyn Exports,
    tls: Option<&NbdTls>,
) -> Result<Option<Outcome>, HandshakeError> {
    let mut link = Link {
        sock: stream,
        tls: None,
    };
    match negotiate_on(&mut link, exports, tls) {
        Ok(Some(negotiated)) => Ok(Some(Outcome {
            negotiated,
            tls: link.tls,
        })),
        Ok(None) => Ok(None),
        Err(e) => Err(tls_error(e)),
    }
}

/// A rustls error that surfaced through the stream as an I/O error, named as what it is.
fn tls_error(e: HandshakeError) -> HandshakeError {
    match e {
        HandshakeError::Io { what, source } => {
            let is_tls = source
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>());
            if !is_tls {
                return HandshakeError::Io { what, source };
            }
            let inner = source.into_inner().expect("checked above");
            HandshakeError::Tls(*inner.downcast::<rustls::Error>().expect("checked above"))
        }
        e => e,
    }
}

fn negotiate_on<S: Read + Write>(
    stream: &mut Link<'_, S>,
    exports: &dyn Exports,
    tls: Option<&NbdTls>,
) -> Result<Option<Negotiated>, HandshakeError> {
    let mut greeting = [0u8; proto::GREETING_BYTES];
    proto::encode_greeting(SERVER_FLAGS, &mut greeting);
    write_all(stream, &greeting, "sending the greeting")?;
    let mut flags = [0u8; 4];
    if !read_full(stream, &mut flags, "client flags", true)? {
        return Ok(None);
    }
    let flags = u32::from_be_bytes(flags);
    if flags & !CLIENT_FLAGS_KNOWN != 0 {
        return Err(HandshakeError::UnknownClientFlags {
            flags,
            unknown: flags & !CLIENT_FLAGS_KNOWN,
        });
    }
    if flags & client_flag::FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::NotFixedNewstyle { flags });
    }
    let mut session = Session {
        stream,
        exports,
        tls,
        no_zeroes: flags & client_flag::NO_ZEROES != 0,
        structured_replies: false,
        meta_export: None,
    };
    for _ in 0..OPTIONS_MAX {
        match session.option()? {
            Step::Continue => {}
            Step::Left => return Ok(None),
            Step::Done(negotiated) => return Ok(Some(negotiated)),
        }
    }
    Err(HandshakeError::TooManyOptions { max: OPTIONS_MAX })
}

/// What one option did to the negotiation.
enum Step {
    Continue,
    /// ABORT, or the stream ended between options.
    Left,
    Done(Negotiated),
}

struct Session<'a, 's, S> {
    stream: &'a mut Link<'s, S>,
    exports: &'a dyn Exports,
    tls: Option<&'a NbdTls>,
    no_zeroes: bool,
    structured_replies: bool,
    /// The export named by the last successful `SET_META_CONTEXT` that selected
    /// `base:allocation`; the selection holds only if transmission uses that export.
    meta_export: Option<String>,
}

impl<S: Read + Write> Session<'_, '_, S> {
    /// Reads one option and answers it.
    fn option(&mut self) -> Result<Step, HandshakeError> {
        let mut header = [0u8; proto::OPTION_HEADER_BYTES];
        if !read_full(self.stream, &mut header, "an option header", true)? {
            return Ok(Step::Left);
        }
        let h = proto::decode_option_header(&header)?;
        if h.len_bytes > OPTION_DATA_MAX_BYTES {
            self.too_big(h.option, h.len_bytes)?;
            return Ok(Step::Continue);
        }
        let mut data = vec![0u8; h.len_bytes as usize];
        read_full(self.stream, &mut data, "option data", false)?;
        let step = self.dispatch(h.option, &data)?;
        flush(self.stream)?;
        Ok(step)
    }

    fn dispatch(&mut self, option: u32, data: &[u8]) -> Result<Step, HandshakeError> {
        let tls_missing = self.tls.is_some_and(|t| t.required) && self.stream.tls.is_none();
        if tls_missing && !matches!(option, opt::STARTTLS | opt::ABORT) {
            if option == opt::EXPORT_NAME {
                return Err(HandshakeError::TlsRequired);
            }
            let msg = "TLS is required: send NBD_OPT_STARTTLS first";
            self.reply_error(option, rep::ERR_TLS_REQD, msg)?;
            return Ok(Step::Continue);
        }
        match option {
            opt::EXPORT_NAME => self.export_name(data).map(Step::Done),
            opt::ABORT => {
                // The client may already have closed without waiting for the ACK; the spec
                // asks servers to take that gracefully, so a failed send changes nothing.
                let _ = self
                    .reply(option, rep::ACK, &[])
                    .and_then(|()| flush(self.stream));
                Ok(Step::Left)
            }
            opt::LIST => self.list(data).map(|()| Step::Continue),
            opt::INFO | opt::GO => Ok(self
                .info_or_go(option, data)?
                .map_or(Step::Continue, Step::Done)),
            opt::STRUCTURED_REPLY => self.structured_reply(data).map(|()| Step::Continue),
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.meta_context(option, data).map(|()| Step::Continue)
            }
            opt::STARTTLS => self.starttls(data).map(|()| Step::Continue),
            _ => {
                self.reply_error(option, rep::ERR_UNSUP, "option not supported")?;
                Ok(Step::Continue)
            }
        }
    }

    /// `STARTTLS`: `ACK` in plain text, then the TLS handshake on the same socket; the state of
    /// earlier options is forgotten.
    fn starttls(&mut self, data: &[u8]) -> Result<(), HandshakeError> {
        let Some(tls) = self.tls else {
            let msg = "TLS is not offered by this server";
            return self.reply_error(opt::STARTTLS, rep::ERR_POLICY, msg);
        };
        if self.stream.tls.is_some() {
            let msg = "TLS is already negotiated";
            return self.reply_error(opt::STARTTLS, rep::ERR_INVALID, msg);
        }
        if !data.is_empty() {
            let msg = "STARTTLS takes no data";
            return self.reply_error(opt::STARTTLS, rep::ERR_INVALID, msg);
        }
        self.reply(opt::STARTTLS, rep::ACK, &[])?;
        flush(self.stream)?;
        let mut session = ServerConnection::new(tls.config.clone()).map_err(HandshakeError::Tls)?;
        while session.is_handshaking() {
            // complete_io sends rustls's alert itself when the handshake fails.
            let (read, _) =
                session
                    .complete_io(self.stream.sock)
                    .map_err(|source| HandshakeError::Io {
                        what: "TLS handshake",
                        source,
                    })?;
            if read == 0 && session.is_handshaking() {
                return Err(HandshakeError::Truncated {
                    what: "the TLS handshake",
                });
            }
        }
        self.stream.tls = Some(session);
        self.structured_replies = false;
        self.meta_export = None;
        Ok(())
    }

    /// Option data over [`OPTION_DATA_MAX_BYTES`]: discard and refuse, or close.
    fn too_big(&mut self, option: u32, len_bytes: u32) -> Result<(), HandshakeError> {
        if option == opt::EXPORT_NAME || len_bytes > OPTION_DISCARD_MAX_BYTES {
            let max_bytes = if option == opt::EXPORT_NAME {
                OPTION_DATA_MAX_BYTES
            } else {
                OPTION_DISCARD_MAX_BYTES
            };
            return Err(HandshakeError::OptionTooLong {
                option,
                len_bytes,
                max_bytes,
            });
        }
        let mut chunk = [0u8; DISCARD_CHUNK_BYTES];
        let mut left = len_bytes as usize;
        while left > 0 {
            let n = left.min(DISCARD_CHUNK_BYTES);
            read_full(self.stream, &mut chunk[..n], "oversize option data", false)?;
            left -= n;
        }
        self.reply_error(option, rep::ERR_TOO_BIG, "option data too long")?;
        flush(self.stream)
    }

    /// `EXPORT_NAME`: the reply cannot be an error, so a bad or unknown name ends the session.
    fn export_name(&mut self, data: &[u8]) -> Result<Negotiated, HandshakeError> {
        let name = export_name(data).map_err(|why| HandshakeError::BadExportName {
            len_bytes: data.len(),
            why,
        })?;
        let Some(export) = self.exports.get(name) else {
            return Err(HandshakeError::UnknownExport { name: name.into() });
        };
        let negotiated = self.negotiated(export);
        let mut reply = [0u8; proto::EXPORT_NAME_REPLY_BYTES + proto::EXPORT_NAME_ZEROES_BYTES];
        let (head, _zeroes) = reply.split_at_mut(proto::EXPORT_NAME_REPLY_BYTES);
        let head: &mut [u8; proto::EXPORT_NAME_REPLY_BYTES] =
            head.try_into().expect("split at the reply size");
        let e = &negotiated.export;
        proto::encode_export_name_reply(e.size_bytes, e.transmission_flags, head);
        let len = if self.no_zeroes {
            proto::EXPORT_NAME_REPLY_BYTES
        } else {
            reply.len()
        };
        write_all(self.stream, &reply[..len], "sending the export")?;
        flush(self.stream)?;
        Ok(negotiated)
    }

    fn list(&mut self, data: &[u8]) -> Result<(), HandshakeError> {
        if !data.is_empty() {
            return self.reply_error(opt::LIST, rep::ERR_INVALID, "LIST takes no data");
        }
        for e in self.exports.list() {
            let body = proto::encode_server_reply(e.name.as_bytes(), clip(&e.description));
            self.reply(opt::LIST, rep::SERVER, &body)?;
        }
        self.reply(opt::LIST, rep::ACK, &[])
    }

    /// `INFO` and `GO` share a format; a successful `GO` ends negotiation.
    fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
    ) -> Result<Option<Negotiated>, HandshakeError> {
        let request = match proto::decode_info_request(option, data) {
            Ok(r) => r,
            Err(e) => return self.reply_invalid(option, &e).map(|()| None),
        };
        let name = match export_name(request.name) {
            Ok(n) => n,
            Err(why) => {
                return self
                    .reply_error(option, rep::ERR_INVALID, why)
                    .map(|()| None)
            }
        };
        let Some(export) = self.exports.get(name) else {
            let msg = format!("no export named '{name}'");
            return self
                .reply_error(option, rep::ERR_UNKNOWN, &msg)
                .map(|()| None);
        };
        let negotiated = self.negotiated(export);
        let e = &negotiated.export;
        let mut body = [0u8; proto::INFO_EXPORT_BYTES];
        proto::encode_info_export(e.size_bytes, e.transmission_flags, &mut body);
        self.reply(option, rep::INFO, &body)?;
        let (want_name, want_description) = request.infos().fold((false, false), |(n, d), i| {
            (n || i == info::NAME, d || i == info::DESCRIPTION)
        });
        if want_name {
            let body = proto::encode_info_string(info::NAME, e.name.as_bytes());
            self.reply(option, rep::INFO, &body)?;
        }
        if want_description {
            let body = proto::encode_info_string(info::DESCRIPTION, clip(&e.description));
            self.reply(option, rep::INFO, &body)?;
        }
        let mut body = [0u8; proto::INFO_BLOCK_SIZE_BYTES];
        proto::encode_info_block_size(
            e.block_size_min,
            e.block_size_preferred,
            e.block_size_max,
            &mut body,
        );
        self.reply(option, rep::INFO, &body)?;
        self.reply(option, rep::ACK, &[])?;
        Ok((option == opt::GO).then_some(negotiated))
    }

    fn structured_reply(&mut self, data: &[u8]) -> Result<(), HandshakeError> {
        if !data.is_empty() {
            let msg = "STRUCTURED_REPLY takes no data";
            return self.reply_error(opt::STRUCTURED_REPLY, rep::ERR_INVALID, msg);
        }
        self.structured_replies = true;
        self.reply(opt::STRUCTURED_REPLY, rep::ACK, &[])
    }

    /// `LIST_META_CONTEXT` and `SET_META_CONTEXT`, with `base:allocation` the only context.
    fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<(), HandshakeError> {
        let set = option == opt::SET_META_CONTEXT;
        if set {
            // A SET replaces the selection even when it fails.
            self.meta_export = None;
            if !self.structured_replies {
                let msg = "SET_META_CONTEXT needs STRUCTURED_REPLY first";
                return self.reply_error(option, rep::ERR_INVALID, msg);
            }
        }
        let request = match proto::decode_meta_context_request(option, data) {
            Ok(r) => r,
            Err(e) => return self.reply_invalid(option, &e),
        };
        let name = match export_name(request.name) {
            Ok(n) => n,
            Err(why) => return self.reply_error(option, rep::ERR_INVALID, why),
        };
        if self.exports.get(name).is_none() {
            let msg = format!("no export named '{name}'");
            return self.reply_error(option, rep::ERR_UNKNOWN, &msg);
        }
        let selects = |q: &&[u8]| {
            *q == proto::BASE_ALLOCATION.as_bytes() || (!set && *q == b"base:".as_slice())
        };
        let matched = (!set && request.queries.is_empty()) || request.queries.iter().any(selects);
        if matched {
            let id = if set { BASE_ALLOCATION_CONTEXT_ID } else { 0 };
            let body = proto::encode_meta_context_reply(id, proto::BASE_ALLOCATION.as_bytes());
            self.reply(option, rep::META_CONTEXT, &body)?;
            if set {
                self.meta_export = Some(name.to_owned());
            }
        }
        self.reply(option, rep::ACK, &[])
    }

    /// The outcome of choosing `export` now.
    fn negotiated(&self, mut export: ExportInfo) -> Negotiated {
        if !self.structured_replies {
            export.transmission_flags &= !tx_flag::SEND_DF;
        }
        let base_allocation = (self.meta_export.as_deref() == Some(export.name.as_str()))
            .then_some(BASE_ALLOCATION_CONTEXT_ID);
        Negotiated {
            export,
            structured_replies: self.structured_replies,
            base_allocation,
        }
    }

    fn reply(&mut self, option: u32, kind: u32, body: &[u8]) -> Result<(), HandshakeError> {
        // Every body is built from bounded strings and fixed layouts, far below 4 GiB.
        let len_bytes = u32::try_from(body.len()).expect("option reply bodies are bounded");
        let mut msg = Vec::with_capacity(proto::OPTION_REPLY_HEADER_BYTES + body.len());
        let mut header = [0u8; proto::OPTION_REPLY_HEADER_BYTES];
        let h = proto::OptionReplyHeader {
            option,
            kind,
            len_bytes,
        };
        proto::encode_option_reply_header(&h, &mut header);
        msg.extend_from_slice(&header);
        msg.extend_from_slice(body);
        write_all(self.stream, &msg, "sending an option reply")
    }

    fn reply_error(&mut self, option: u32, kind: u32, message: &str) -> Result<(), HandshakeError> {
        debug_assert!(
            kind & rep::ERROR_BIT != 0,
            "error reply {kind:#x} without the error bit"
        );
        self.reply(option, kind, clip(message))
    }

    fn reply_invalid(&mut self, option: u32, e: &ProtoError) -> Result<(), HandshakeError> {
        self.reply_error(option, rep::ERR_INVALID, &e.to_string())
    }
}

/// The client's socket, plain until `STARTTLS` and through rustls's buffers after it. Reads
/// and writes block on the socket as the plain path does; rustls buffers at most one record
/// of received plaintext and its default send limit of outgoing data.
struct Link<'s, S> {
    sock: &'s mut S,
    tls: Option<ServerConnection>,
}

impl<S: Read + Write> Link<'_, S> {
    /// Writes every TLS record rustls has ready to the socket.
    fn send_tls(&mut self) -> std::io::Result<()> {
        let Some(tls) = &mut self.tls else {
            return Ok(());
        };
        while tls.wants_write() {
            tls.write_tls(self.sock)?;
        }
        Ok(())
    }
}

impl<S: Read + Write> Read for Link<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(tls) = &mut self.tls else {
            return self.sock.read(buf);
        };
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                // The client closed without close_notify: an end of stream all the same (the
                // caller decides whether it came between messages).
                Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            if tls.read_tls(self.sock)? == 0 {
                // Seen by rustls: the next reader() call reports the end.
                continue;
            }
            if let Err(e) = tls.process_new_packets() {
                // rustls queued an alert saying why; sending it is a courtesy.
                let _ = self.send_tls();
                return Err(std::io::Error::new(ErrorKind::InvalidData, e));
            }
        }
    }
}

impl<S: Read + Write> Write for Link<'_, S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some(tls) = &mut self.tls else {
            return self.sock.write(buf);
        };
        let n = tls.writer().write(buf)?;
        if n > 0 {
            return Ok(n);
        }
        // rustls's send buffer is full: move it to the socket, then it takes more.
        self.send_tls()?;
        self.tls.as_mut().expect("TLS session").writer().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send_tls()?;
        self.sock.flush()
    }
}

/// Checks an export name from the wire: at most [`EXPORT_NAME_MAX_BYTES`], UTF-8, no NUL.
fn export_name(bytes: &[u8]) -> Result<&str, &'static str> {
    if bytes.len() > EXPORT_NAME_MAX_BYTES {
        return Err("export name longer than 4096 bytes");
    }
    let name = std::str::from_utf8(bytes).map_err(|_| "export name is not UTF-8")?;
    if name.contains('\0') {
        return Err("export name contains NUL");
    }
    Ok(name)
}

/// A string cut to the spec's length limit at a character boundary.
fn clip(s: &str) -> &[u8] {
    let mut end = s.len().min(proto::STRING_MAX_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s.as_bytes()[..end]
}

/// Fills `buf`. Returns false when the stream ended before its first byte and `eof_ok` is set
/// (a clean end between messages); any other short read is [`HandshakeError::Truncated`].
fn read_full<S: Read>(
    s: &mut S,
    buf: &mut [u8],
    what: &'static str,
    eof_ok: bool,
) -> Result<bool, HandshakeError> {
    let mut done = 0;
    while done < buf.len() {
        match s.read(&mut buf[done..]) {
            Ok(0) if done == 0 && eof_ok => return Ok(false),
            Ok(0) => return Err(HandshakeError::Truncated { what }),
            Ok(n) => done += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(source) => return Err(HandshakeError::Io { what, source }),
        }
    }
    Ok(true)
}

fn write_all<S: Write>(s: &mut S, b: &[u8], what: &'static str) -> Result<(), HandshakeError> {
    s.write_all(b)
        .map_err(|source| HandshakeError::Io { what, source })
}

fn flush<S: Write>(s: &mut S) -> Result<(), HandshakeError> {
    s.flush().map_err(|source| HandshakeError::Io {
        what: "flushing replies",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// Client bytes in, server bytes out.
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

    fn export(name: &str, size_bytes: u64) -> ExportInfo {
        ExportInfo {
            name: name.into(),
            description: format!("{name} volume"),
            size_bytes,
            transmission_flags: tx_flag::HAS_FLAGS | tx_flag::SEND_FLUSH | tx_flag::SEND_DF,
            block_size_min: 512,
            block_size_preferred: 4096,
            block_size_max: proto::PAYLOAD_MAX_BYTES,
        }
    }

    fn table() -> Vec<ExportInfo> {
        vec![export("pg", 1 << 30), export("logs", 1 << 20)]
    }

    /// A client stream: flags, then options.
    struct Client(Vec<u8>);

    impl Client {
        fn new(flags: u32) -> Client {
            Client(flags.to_be_bytes().to_vec())
        }
        fn opt(mut self, option: u32, data: &[u8]) -> Client {
            let mut h = [0u8; proto::OPTION_HEADER_BYTES];
            let len_bytes = data.len() as u32;
            proto::encode_option_header(&proto::OptionHeader { option, len_bytes }, &mut h);
            self.0.extend_from_slice(&h);
            self.0.extend_from_slice(data);
            self
        }
        fn run(self) -> (Result<Option<Negotiated>, HandshakeError>, Vec<u8>) {
            let mut d = Duplex {
                input: Cursor::new(self.0),
                output: Vec::new(),
            };
            let r = negotiate(&mut d, &table(), None).map(|o| o.map(|o| o.negotiated));
            (r, d.output)
        }
    }

    const FIXED: u32 = client_flag::FIXED_NEWSTYLE;
    const FIXED_NZ: u32 = client_flag::FIXED_NEWSTYLE | client_flag::NO_ZEROES;

    /// Splits server output after the greeting into (option, reply type, data).
    fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut rest = check_greeting(out);
        let mut v = Vec::new();
        while !rest.is_empty() {
            let h: [u8; proto::OPTION_REPLY_HEADER_BYTES] =
                rest[..proto::OPTION_REPLY_HEADER_BYTES].try_into().unwrap();
            let h = proto::decode_option_reply_header(&h).unwrap();
            let end = proto::OPTION_REPLY_HEADER_BYTES + h.len_bytes as usize;
            v.push((
                h.option,
                h.kind,
                rest[proto::OPTION_REPLY_HEADER_BYTES..end].to_vec(),
            ));
            rest = &rest[end..];
        }
        v
    }

    fn check_greeting(out: &[u8]) -> &[u8] {
        assert_eq!(&out[..16], b"NBDMAGICIHAVEOPT");
        assert_eq!(&out[16..18], &[0, 3], "FIXED_NEWSTYLE | NO_ZEROES");
        &out[18..]
    }

    fn kinds(out: &[u8]) -> Vec<u32> {
        replies(out).into_iter().map(|r| r.1).collect()
    }

    #[test]
    fn go_with_structured_replies_and_base_allocation() {
        let set = proto::encode_meta_context_request(b"pg", &[b"base:allocation"]);
        let (r, out) = Client::new(FIXED_NZ)
            .opt(opt::STRUCTURED_REPLY, &[])
            .opt(opt::SET_META_CONTEXT, &set)
            .opt(
                opt::GO,
                &proto::encode_info_request(b"pg", &[info::BLOCK_SIZE]),
            )
            .run();
        let n = r.unwrap().unwrap();
        assert!(n.structured_replies);
        assert_eq!(n.base_allocation, Some(BASE_ALLOCATION_CONTEXT_ID));
        assert_eq!(
            n.export,
            export("pg", 1 << 30),
            "SEND_DF kept with structured replies"
        );
        let rs = replies(&out);
        assert_eq!((rs[0].0, rs[0].1), (opt::STRUCTURED_REPLY, rep::ACK));
        assert_eq!(
            (rs[1].0, rs[1].1),
            (opt::SET_META_CONTEXT, rep::META_CONTEXT)
        );
        assert_eq!(&rs[1].2[..4], &BASE_ALLOCATION_CONTEXT_ID.to_be_bytes());
        assert_eq!(&rs[1].2[4..], b"base:allocation");
        assert_eq!(rs[2].1, rep::ACK);
        let go: Vec<_> = rs[3..].iter().map(|r| (r.0, r.1)).collect();
        assert_eq!(
            go,
            [
                (opt::GO, rep::INFO),
                (opt::GO, rep::INFO),
                (opt::GO, rep::ACK)
            ]
        );
        let mut info_export = [0u8; proto::INFO_EXPORT_BYTES];
        proto::encode_info_export(1 << 30, n.export.transmission_flags, &mut info_export);
        assert_eq!(rs[3].2, info_export);
        assert_eq!(rs[4].2, [0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 2, 0, 0, 0]);
    }

    #[test]
    fn go_on_another_export_drops_the_meta_context() {
        let set = proto::encode_meta_context_request(b"pg", &[b"base:allocation"]);
        let (r, _) = Client::new(FIXED)
            .opt(opt::STRUCTURED_REPLY, &[])
            .opt(opt::SET_META_CONTEXT, &set)
            .opt(opt::GO, &proto::encode_info_request(b"logs", &[]))
            .run();
        let n = r.unwrap().unwrap();
        assert_eq!(n.export.name, "logs");
        assert_eq!(n.base_allocation, None);
    }

    #[test]
    fn set_meta_context_rules() {
        let set = |q: &[&[u8]]| proto::encode_meta_context_request(b"pg", q);
        let (r, out) = Client::new(FIXED)
            .opt(opt::SET_META_CONTEXT, &set(&[b"base:allocation"]))
            .opt(opt::STRUCTURED_REPLY, &[])
            .opt(
                opt::SET_META_CONTEXT,
                &proto::encode_meta_context_request(b"nope", &[]),
            )
            .opt(
                opt::SET_META_CONTEXT,
                &set(&[b"base:", b"qemu:dirty-bitmap:x"]),
            )
            .opt(opt::SET_META_CONTEXT, &set(&[b"base:allocation"]))
            .opt(opt::SET_META_CONTEXT, &set(&[]))
            .opt(opt::GO, &proto::encode_info_request(b"pg", &[]))
            .run();
        assert_eq!(
            r.unwrap().unwrap().base_allocation,
            None,
            "the last SET selected nothing"
        );
        let k = kinds(&out);
        assert_eq!(
            k[..6],
            [
                rep::ERR_INVALID,
                rep::ACK,
                rep::ERR_UNKNOWN,
                rep::ACK,
                rep::META_CONTEXT,
                rep::ACK
            ]
        );
        assert_eq!(k[6], rep::ACK, "an empty SET selects nothing");
    }

    #[test]
    fn list_meta_context_queries() {
        let list = |q: &[&[u8]]| proto::encode_meta_context_request(b"", q);
        let exports = vec![export("", 4096)];
        let input = Client::new(FIXED)
            .opt(opt::LIST_META_CONTEXT, &list(&[]))
            .opt(opt::LIST_META_CONTEXT, &list(&[b"base:"]))
            .opt(opt::LIST_META_CONTEXT, &list(&[b"x-other:thing"]))
            .opt(opt::LIST_META_CONTEXT, &[0, 0, 0, 9])
            .opt(opt::ABORT, &[]);
        let mut d = Duplex {
            input: Cursor::new(input.0),
            output: Vec::new(),
        };
        assert!(negotiate(&mut d, &exports, None).unwrap().is_none());
        let rs = replies(&d.output);
        let k: Vec<u32> = rs.iter().map(|r| r.1).collect();
        assert_eq!(
            k,
            [
                rep::META_CONTEXT,
                rep::ACK,
                rep::META_CONTEXT,
                rep::ACK,
                rep::ACK,
                rep::ERR_INVALID,
                rep::ACK
            ]
        );
        assert_eq!(
            &rs[0].2[..4],
            &[0, 0, 0, 0],
            "LIST replies carry context id 0"
        );
        assert_eq!(&rs[0].2[4..], b"base:allocation");
    }

    #[test]
    fn export_name_with_and_without_zeroes() {
        for (flags, padded) in [(FIXED, true), (FIXED_NZ, false)] {
            let (r, out) = Client::new(flags).opt(opt::EXPORT_NAME, b"logs").run();
            let n = r.unwrap().unwrap();
            assert!(!n.structured_replies);
            assert_eq!(
                n.export.transmission_flags,
                tx_flag::HAS_FLAGS | tx_flag::SEND_FLUSH,
                "SEND_DF cleared without structured replies"
            );
            let rest = check_greeting(&out);
            assert_eq!(rest.len(), if padded { 134 } else { 10 });
            assert_eq!(&rest[..8], &(1u64 << 20).to_be_bytes());
            assert_eq!(&rest[8..10], &n.export.transmission_flags.to_be_bytes());
            assert!(rest[10..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn export_name_unknown_closes() {
        let (r, out) = Client::new(FIXED).opt(opt::EXPORT_NAME, b"nope").run();
        let e = r.unwrap_err();
        assert!(
            matches!(&e, HandshakeError::UnknownExport { name } if name == "nope"),
            "{e}"
        );
        assert!(e.to_string().contains("'nope'"));
        assert_eq!(
            check_greeting(&out),
            b"",
            "nothing is sent for an unknown export"
        );
        let (r, _) = Client::new(FIXED)
            .opt(opt::EXPORT_NAME, &[0xff, 0xfe])
            .run();
        assert!(matches!(
            r,
            Err(HandshakeError::BadExportName { len_bytes: 2, .. })
        ));
    }

    #[test]
    fn list_then_disconnect() {
        let (r, out) = Client::new(FIXED)
            .opt(opt::LIST, &[])
            .opt(opt::LIST, b"x")
            .run();
        assert!(r.unwrap().is_none(), "leaving between options is clean");
        let rs = replies(&out);
        let k: Vec<u32> = rs.iter().map(|r| r.1).collect();
        assert_eq!(k, [rep::SERVER, rep::SERVER, rep::ACK, rep::ERR_INVALID]);
        assert_eq!(rs[0].2, proto::encode_server_reply(b"pg", b"pg volume"));
        assert_eq!(rs[1].2, proto::encode_server_reply(b"logs", b"logs volume"));
    }

    #[test]
    fn info_then_go() {
        let req = proto::encode_info_request(b"pg", &[info::NAME, info::DESCRIPTION, 77]);
        let (r, out) = Client::new(FIXED_NZ)
            .opt(opt::INFO, &req)
            .opt(opt::INFO, &proto::encode_info_request(b"nope", &[]))
            .opt(opt::GO, &req)
            .run();
        assert_eq!(r.unwrap().unwrap().export.name, "pg");
        let rs = replies(&out);
        let info: Vec<_> = rs.iter().take(5).map(|r| (r.0, r.1)).collect();
        let mut expected = vec![(opt::INFO, rep::INFO); 4];
        expected.push((opt::INFO, rep::ACK));
        assert_eq!(
            info, expected,
            "EXPORT, NAME, DESCRIPTION, BLOCK_SIZE; 77 ignored"
        );
        assert_eq!(rs[1].2, proto::encode_info_string(info::NAME, b"pg"));
        assert_eq!(
            rs[2].2,
            proto::encode_info_string(info::DESCRIPTION, b"pg volume")
        );
        assert_eq!(rs[5].1, rep::ERR_UNKNOWN);
        assert_eq!(String::from_utf8_lossy(&rs[5].2), "no export named 'nope'");
        assert_eq!(rs[6..].len(), 5, "GO answers exactly as INFO did");
        assert_eq!(rs[10].1, rep::ACK);
    }

    #[test]
    fn unknown_options_are_refused_and_negotiation_goes_on() {
        let (r, out) = Client::new(FIXED)
            .opt(opt::EXTENDED_HEADERS, &[])
            .opt(opt::STARTTLS, &[])
            .opt(4, &[1, 2, 3])
            .opt(0xdead_beef, &[])
            .opt(opt::STRUCTURED_REPLY, &[1])
            .opt(opt::GO, &[0, 0, 0, 5, b'p'])
            .opt(opt::GO, &proto::encode_info_request(b"pg", &[]))
            .run();
        assert!(r.unwrap().is_some());
        let rs = replies(&out);
        let first: Vec<_> = rs.iter().take(6).map(|r| (r.0, r.1)).collect();
        assert_eq!(
            first,
            [
                (opt::EXTENDED_HEADERS, rep::ERR_UNSUP),
                (opt::STARTTLS, rep::ERR_POLICY),
                (4, rep::ERR_UNSUP),
                (0xdead_beef, rep::ERR_UNSUP),
                (opt::STRUCTURED_REPLY, rep::ERR_INVALID),
                (opt::GO, rep::ERR_INVALID),
            ]
        );
        assert_eq!(rs.last().unwrap().1, rep::ACK);
    }

    #[test]
    fn abort_acks_and_ends() {
        let (r, out) = Client::new(FIXED)
            .opt(opt::ABORT, &[])
            .opt(opt::GO, &proto::encode_info_request(b"pg", &[]))
            .run();
        assert!(r.unwrap().is_none());
        assert_eq!(
            replies(&out),
            [(opt::ABORT, rep::ACK, vec![])],
            "nothing read after ABORT"
        );
    }

    #[test]
    fn bad_magic_and_bad_client_flags_close() {
        let mut c = Client::new(FIXED).opt(opt::GO, &[]);
        c.0[4] ^= 0x40;
        let (r, _) = c.run();
        let e = r.unwrap_err();
        assert!(
            matches!(e, HandshakeError::Proto(ProtoError::BadOptionMagic { .. })),
            "{e}"
        );
        let (r, _) = Client::new(0).opt(opt::EXPORT_NAME, b"pg").run();
        assert!(matches!(
            r,
            Err(HandshakeError::NotFixedNewstyle { flags: 0 })
        ));
        let (r, _) = Client::new(FIXED | 4).run();
        assert!(matches!(
            r,
            Err(HandshakeError::UnknownClientFlags { unknown: 4, .. })
        ));
    }

    #[test]
    fn oversize_options() {
        let big = vec![0u8; OPTION_DATA_MAX_BYTES as usize + 1];
        let (r, out) = Client::new(FIXED)
            .opt(opt::INFO, &big)
            .opt(opt::GO, &proto::encode_info_request(b"pg", &[]))
            .run();
        assert!(
            r.unwrap().is_some(),
            "negotiation goes on after ERR_TOO_BIG"
        );
        assert_eq!(kinds(&out)[0], rep::ERR_TOO_BIG);
        let (r, _) = Client::new(FIXED).opt(opt::EXPORT_NAME, &big).run();
        assert!(matches!(
            r,
            Err(HandshakeError::OptionTooLong {
                option: opt::EXPORT_NAME,
                ..
            })
        ));
        // A header claiming more than the discard bound closes without reading the data.
        let mut c = Client::new(FIXED).opt(opt::INFO, &[]);
        let at = c.0.len() - 4;
        c.0[at..].copy_from_slice(&(OPTION_DISCARD_MAX_BYTES + 1).to_be_bytes());
        let (r, _) = c.run();
        assert!(
            matches!(r, Err(HandshakeError::OptionTooLong { len_bytes, .. }) if len_bytes == OPTION_DISCARD_MAX_BYTES + 1)
        );
        let long_name = vec![b'a'; EXPORT_NAME_MAX_BYTES + 1];
        let (_, out) = Client::new(FIXED)
            .opt(opt::GO, &proto::encode_info_request(&long_name, &[]))
            .run();
        assert_eq!(kinds(&out), [rep::ERR_INVALID]);
    }

    #[test]
    fn too_many_options_close() {
        let mut c = Client::new(FIXED);
        for _ in 0..OPTIONS_MAX {
            c = c.opt(opt::STRUCTURED_REPLY, &[]);
        }
        let (r, out) = c
            .opt(opt::GO, &proto::encode_info_request(b"pg", &[]))
            .run();
        assert!(matches!(
            r,
            Err(HandshakeError::TooManyOptions { max: OPTIONS_MAX })
        ));
        assert_eq!(kinds(&out).len(), OPTIONS_MAX as usize);
    }

    #[test]
    fn truncated_streams() {
        let (r, _) = Client(Vec::new()).run();
        assert!(
            r.unwrap().is_none(),
            "a client that leaves before its flags is clean"
        );
        let (r, _) = Client(vec![0, 0]).run();
        assert!(matches!(
            r,
            Err(HandshakeError::Truncated {
                what: "client flags"
            })
        ));
        let full = Client::new(FIXED)
            .opt(opt::GO, &proto::encode_info_request(b"pg", &[]))
            .0;
        for cut in 5..full.len() {
            let (r, _) = Client(full[..cut].to_vec()).run();
            assert!(
                matches!(r, Err(HandshakeError::Truncated { .. })),
                "cut at {cut}: {r:?}"
            );
        }
    }

    /// A CA in a fresh temporary directory, with a node certificate for 127.0.0.1 and an
    /// admin certificate for the client.
    fn tls_pair(test: &str) -> (cairn_tls::Tls, cairn_tls::Tls, std::path::PathBuf) {
        use cairn_tls::{issue, Identity, Tls, TlsFiles};
        let dir = std::env::temp_dir().join(format!("cairn-nbd-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        issue::init_ca(&dir).unwrap();
        let ip = "127.0.0.1".parse().unwrap();
        let node = issue::issue(&dir, &Identity::Node("n1".into()), &[ip], &[]).unwrap();
        let admin = issue::issue(&dir, &Identity::Admin("c".into()), &[], &[]).unwrap();
        let server = Tls::load(&TlsFiles::in_dir(&node)).unwrap();
        let client = Tls::load(&TlsFiles::in_dir(&admin)).unwrap();
        (server, client, dir)
    }

    #[test]
    fn tls_required_refuses_options_before_starttls() {
        let (server, _, dir) = tls_pair("required");
        let tls = NbdTls {
            config: server.server_config_no_client_auth(),
            required: true,
        };
        let input = Client::new(FIXED)
            .opt(opt::LIST, &[])
            .opt(opt::GO, &proto::encode_info_request(b"pg", &[]))
            .opt(opt::EXPORT_NAME, b"pg");
        let mut d = Duplex {
            input: Cursor::new(input.0),
            output: Vec::new(),
        };
        let r = negotiate(&mut d, &table(), Some(&tls));
        assert!(
            matches!(r, Err(HandshakeError::TlsRequired)),
            "{:?}",
            r.err()
        );
        assert_eq!(kinds(&d.output), [rep::ERR_TLS_REQD, rep::ERR_TLS_REQD]);
        let input = Client::new(FIXED).opt(opt::ABORT, &[]);
        let mut d = Duplex {
            input: Cursor::new(input.0),
            output: Vec::new(),
        };
        assert!(negotiate(&mut d, &table(), Some(&tls)).unwrap().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// STARTTLS on a real socket pair with a rustls client: the options after it go through
    /// TLS, structured replies negotiated before it are forgotten, and the session comes back
    /// for the transmission phase.
    #[test]
    fn starttls_then_go_through_tls() {
        use std::os::unix::net::UnixStream;
        let (server, client, dir) = tls_pair("starttls");
        let tls = NbdTls {
            config: server.server_config(),
            required: false,
        };
        let (mut ours, mut theirs) = UnixStream::pair().unwrap();
        let client_side = std::thread::spawn(move || {
            let mut greeting = [0u8; 18];
            theirs.read_exact(&mut greeting).unwrap();
            let opts = Client::new(FIXED_NZ)
                .opt(opt::STRUCTURED_REPLY, &[])
                .opt(opt::STARTTLS, &[]);
            theirs.write_all(&opts.0).unwrap();
            let mut replies = [0u8; 2 * proto::OPTION_REPLY_HEADER_BYTES];
            theirs.read_exact(&mut replies).unwrap();
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let conn = rustls::ClientConnection::new(client.client_config(), name).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, theirs);
            let go = Client(Vec::new()).opt(opt::GO, &proto::encode_info_request(b"pg", &[]));
            tls.write_all(&go.0).unwrap();
            let mut out = Vec::new();
            let mut buf = [0u8; 4096];
            while !out.ends_with(&[0, 0, 0, 1, 0, 0, 0, 0]) {
                let n = tls.read(&mut buf).unwrap();
                assert!(n > 0, "server ended the TLS stream");
                out.extend_from_slice(&buf[..n]);
            }
            (replies, out)
        });
        let outcome = negotiate(&mut ours, &table(), Some(&tls)).unwrap().unwrap();
        let (plain, through_tls) = client_side.join().unwrap();
        assert!(outcome.tls.is_some(), "the session goes on to transmission");
        assert!(
            !outcome.negotiated.structured_replies,
            "STRUCTURED_REPLY before STARTTLS is forgotten"
        );
        assert_eq!(outcome.negotiated.export.name, "pg");
        assert_eq!(
            &plain[12..16],
            &rep::ACK.to_be_bytes(),
            "STRUCTURED_REPLY ACK"
        );
        assert_eq!(&plain[20 + 8..20 + 12], &opt::STARTTLS.to_be_bytes());
        assert_eq!(
            &plain[20 + 12..20 + 16],
            &rep::ACK.to_be_bytes(),
            "STARTTLS ACK"
        );
        let mut framed = b"NBDMAGICIHAVEOPT\0\x03".to_vec();
        framed.extend_from_slice(&through_tls);
        let k: Vec<u32> = replies(&framed).into_iter().map(|r| r.1).collect();
        assert_eq!(k, [rep::INFO, rep::INFO, rep::ACK]);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
