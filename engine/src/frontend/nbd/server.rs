//! Listeners, the export table and per-export statistics of the NBD server.

use super::conn::{ExportConn, DRAIN_MAX};
use super::handshake::{self, ExportInfo, Exports, HandshakeError, NbdTls, Outcome};
use super::proto::{tx_flag, PAYLOAD_MAX_BYTES};
use crate::bdev::Bdev;
use crate::core_list::CoreId;
use crate::engine::{BdevHandle, Engine, EngineError};
use crate::frontend::admission::{Admission, AdmissionLimits, Cancel, Ticket, SUMMARY_PERIOD};
use crate::owner_only;
use crate::reactor::BdevId;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Longest a client may take over its whole negotiation (not per read) before it is
/// disconnected: a real client needs milliseconds, and a deadline per read would let a
/// client sending one byte every few seconds hold its slot for ever.
pub const HANDSHAKE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Clients negotiating at once (one thread each). A newcomer at the limit evicts the oldest
/// negotiation of the source holding the most (see [`crate::frontend::admission`]).
pub const HANDSHAKES_MAX_DEFAULT: usize = 64;
/// Clients one source address may have negotiating at once; a newcomer at the limit evicts
/// that source's oldest negotiation. A quarter of the global limit: a host that mounts a few
/// exports at once never needs more, and three other sources always keep room.
pub const HANDSHAKES_PER_SOURCE_MAX_DEFAULT: usize = 16;
/// Negotiated connections at once, over all exports; a client beyond is disconnected at
/// accept (logged, rate-limited). Each costs a thread-free poller, a 512 KiB receive region
/// mapped on demand and up to [`super::conn::REPLY_FLOOR_BYTES`] of reply memory.
pub const CONNECTIONS_MAX_DEFAULT: usize = 1024;
/// Read data all connections together may hold in replies beyond each one's
/// [`super::conn::REPLY_FLOOR_BYTES`]. At the limit a connection whose next read needs more waits
/// (it stops parsing, so TCP pushes back on its client) until another connection's replies
/// are sent: a client that pipelines large reads and never reads the replies holds at most
/// what the budget gave it, never memory in proportion to what it asks for.
pub const REPLY_BUDGET_BYTES_DEFAULT: usize = 256 << 20;
/// Upper bounds (µs) of the latency histogram buckets kept per export; the last is +Inf.
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    25,
    50,
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    25_000,
    100_000,
    250_000,
    1_000_000,
    u64::MAX,
];

/// Where and how the server listens.
#[derive(Clone, Debug)]
pub struct NbdConfig {
    /// TCP listener (port 0 picks a free port; see [`NbdServer::tcp_addr`]).
    pub tcp: Option<SocketAddr>,
    /// Unix-socket listener; a stale socket file is replaced, a live one is an error.
    pub unix: Option<PathBuf>,
    /// Deadline of a whole negotiation ([`HANDSHAKE_TIMEOUT_DEFAULT`]).
    pub handshake_timeout: Duration,
    /// [`HANDSHAKES_MAX_DEFAULT`].
    pub handshakes_max: usize,
    /// [`HANDSHAKES_PER_SOURCE_MAX_DEFAULT`].
    pub handshakes_per_source_max: usize,
    /// [`CONNECTIONS_MAX_DEFAULT`].
    pub connections_max: usize,
    /// [`REPLY_BUDGET_BYTES_DEFAULT`].
    pub reply_budget_bytes: usize,
    /// Bind the listeners but accept nobody until [`NbdServer::resume`]: a daemon binds first
    /// (so a taken port fails before any pool is touched), registers its exports, then opens
    /// the door. Clients that connect meanwhile wait in the listen backlog.
    pub start_paused: bool,
    /// Offer `NBD_OPT_STARTTLS` (and, with [`NbdTls::required`], insist on it); None: the
    /// spec's NOTLS mode.
    pub tls: Option<NbdTls>,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            tcp: Some(SocketAddr::from(([127, 0, 0, 1], 10809))),
            unix: None,
            handshake_timeout: HANDSHAKE_TIMEOUT_DEFAULT,
            handshakes_max: HANDSHAKES_MAX_DEFAULT,
            handshakes_per_source_max: HANDSHAKES_PER_SOURCE_MAX_DEFAULT,
            connections_max: CONNECTIONS_MAX_DEFAULT,
            reply_budget_bytes: REPLY_BUDGET_BYTES_DEFAULT,
            start_paused: false,
            tls: None,
        }
    }
}

/// How one export is offered.
#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    /// Refuse writes even when the bdev accepts them.
    pub read_only: bool,
    /// Shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION.
    pub description: String,
}

/// Counters of one export, summed over its connections and cores.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub trims: u64,
    pub write_zeroes: u64,
    pub block_status: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Count of requests per bucket of [`LATENCY_BUCKETS_US`] (not cumulative).
    pub latency_buckets: [u64; LATENCY_BUCKETS_US.len()],
    pub latency_sum_us: u64,
}

/// What the server reports about one export.
#[derive(Clone, Debug)]
pub struct ExportStatus {
    pub name: String,
    pub bdev: String,
    pub size_bytes: u64,
    pub read_only: bool,
    pub connections: u32,
    pub stats: ExportStats,
}

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("NBD listener {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("export '{name}' already exists")]
    ExportExists { name: String },
    #[error("no export named '{name}'")]
    NoSuchExport { name: String },
    #[error("export name '{name}' is invalid: {why}")]
    BadExportName { name: String, why: &'static str },
    #[error("export '{name}': {connections} connections still open after {waited:?}")]
    StillConnected {
        name: String,
        connections: u32,
        waited: Duration,
    },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// How often a paused listener looks whether it may accept.
const PAUSED_POLL: Duration = Duration::from_millis(5);
/// How often an idle listener looks at the stop flag.
const ACCEPT_POLL: Duration = Duration::from_millis(100);
/// How long shutdown and export removal wait for connections beyond their own drain limit.
const CLOSE_SLACK: Duration = Duration::from_secs(5);

/// What a request was, for the statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StatOp {
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
    BlockStatus,
    Other,
}

/// One core's counters for one export. Only that core's reactor writes them (plain load and
/// store, no read-modify-write), so the I/O path touches no contended cache line; readers sum
/// them with relaxed loads.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(crate) struct CoreStats {
    ops: [AtomicU64; 7],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS_US.len()],
    latency_sum_us: AtomicU64,
}

#[inline]
fn bump(counter: &AtomicU64, by: u64) {
    counter.store(counter.load(Ordering::Relaxed) + by, Ordering::Relaxed);
}

impl CoreStats {
    #[inline]
    pub(crate) fn record(&self, op: StatOp, moved_bytes: u64, latency_us: u64, error: bool) {
        bump(&self.ops[op as usize], 1);
        match op {
            StatOp::Read => bump(&self.bytes_read, moved_bytes),
            StatOp::Write => bump(&self.bytes_written, moved_bytes),
            _ => {}
        }
        if error {
            bump(&self.errors, 1);
        }
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|&le| latency_us <= le)
            .unwrap_or(LATENCY_BUCKETS_US.len() - 1);
        bump(&self.latency[bucket], 1);
        bump(&self.latency_sum_us, latency_us);
    }

    fn add_to(&self, out: &mut ExportStats) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        out.reads += get(&self.ops[StatOp::Read as usize]);
        out.writes += get(&self.ops[StatOp::Write as usize]);
        out.flushes += get(&self.ops[StatOp::Flush as usize]);
        out.trims += get(&self.ops[StatOp::Trim as usize]);
        out.write_zeroes += get(&self.ops[StatOp::WriteZeroes as usize]);
        out.block_status += get(&self.ops[StatOp::BlockStatus as usize]);
        out.bytes_read += get(&self.bytes_read);
        out.bytes_written += get(&self.bytes_written);
        out.errors += get(&self.errors);
        for (o, c) in out.latency_buckets.iter_mut().zip(&self.latency) {
            *o += get(c);
        }
        out.latency_sum_us += get(&self.latency_sum_us);
    }
}

/// One export as connections see it.
pub(crate) struct ExportEntry {
    pub(crate) name: String,
    pub(crate) bdev_id: BdevId,
    pub(crate) bdev: Arc<dyn Bdev>,
    pub(crate) options: ExportOptions,
    /// Set when the export is removed: its connections drain and close.
    pub(crate) closed: AtomicBool,
    pub(crate) connections: AtomicU32,
    /// Indexed by core number.
    stats: Box<[CoreStats]>,
}

impl ExportEntry {
    #[inline]
    pub(crate) fn core_stats(&self, core: u32) -> &CoreStats {
        &self.stats[core as usize]
    }

    fn info(&self) -> ExportInfo {
        let info = self.bdev.info();
        let read_only = info.read_only || self.options.read_only;
        let mut flags = tx_flag::HAS_FLAGS
            | tx_flag::SEND_FLUSH
            | tx_flag::SEND_FUA
            | tx_flag::SEND_WRITE_ZEROES
            | tx_flag::SEND_FAST_ZERO
            | tx_flag::CAN_MULTI_CONN;
        if info.can_trim {
            flags |= tx_flag::SEND_TRIM;
        }
        if read_only {
            flags |= tx_flag::READ_ONLY;
        }
        ExportInfo {
            name: self.name.clone(),
            description: self.options.description.clone(),
            size_bytes: self.bdev.size_bytes(),
            transmission_flags: flags,
            block_size_min: info.block_size_bytes,
            block_size_preferred: info.block_size_bytes.max(4096),
            block_size_max: PAYLOAD_MAX_BYTES,
        }
    }

    fn status(&self) -> ExportStatus {
        let mut stats = ExportStats::default();
        self.stats.iter().for_each(|c| c.add_to(&mut stats));
        ExportStatus {
            name: self.name.clone(),
            bdev: self.bdev.info().name.clone(),
            size_bytes: self.bdev.size_bytes(),
            read_only: self.bdev.info().read_only || self.options.read_only,
            connections: self.connections.load(Ordering::Relaxed),
            stats,
        }
    }
}

/// TLS failures (a handshake refused, a session that broke, a client that skipped a required
/// `STARTTLS`), logged like admission's refusals: the first in each [`SUMMARY_PERIOD`] with its
/// peer and error, then one summary line, so a flood of bad handshakes cannot fill the disk.
pub(crate) struct TlsFailureLog {
    /// Start of the current period and failures counted in it.
    state: Mutex<(Instant, u64)>,
}

impl TlsFailureLog {
    fn new() -> TlsFailureLog {
        TlsFailureLog {
            state: Mutex::new((Instant::now(), 0)),
        }
    }

    /// Counts one failure; the first of a period is logged with `peer` and `error`.
    pub(crate) fn note(&self, peer: &str, error: &dyn std::fmt::Display) {
        let now = Instant::now();
        let mut st = self.state.lock();
        Self::flush_locked(&mut st, now);
        if st.1 == 0 {
            st.0 = now;
            tracing::warn!(peer, error = %error, "NBD TLS failure, connection closed; further ones are summarised");
        }
        st.1 += 1;
    }

    /// Writes the summary of a period that has ended (the accept loop calls it).
    fn flush(&self) {
        Self::flush_locked(&mut self.state.lock(), Instant::now());
    }

    fn flush_locked(st: &mut (Instant, u64), now: Instant) {
        if st.1 == 0 || now.saturating_duration_since(st.0) < SUMMARY_PERIOD {
            return;
        }
        if st.1 > 1 {
            tracing::warn!(
                "{} NBD TLS failures in the last {} s",
                st.1,
                SUMMARY_PERIOD.as_secs()
            );
        }
        st.1 = 0;
    }
}

/// What listeners, handshake threads and connections share.
pub(crate) struct ServerShared {
    engine: Arc<Engine>,
    config: NbdConfig,
    exports: RwLock<HashMap<String, Arc<ExportEntry>>>,
    pub(crate) stopping: AtomicBool,
    /// Cleared by [`NbdServer::resume`] when the server started paused.
    paused: AtomicBool,
    /// Negotiated connections alive, on any core.
    pub(crate) connections: AtomicU32,
    /// Reply bytes of [`NbdConfig::reply_budget_bytes`] no connection holds. Touched only by
    /// connections reading beyond their floor, so small I/O never shares this cache line.
    pub(crate) reply_budget_free: AtomicUsize,
    /// Handshake threads running (a stopping server waits for them).
    handshakes: AtomicUsize,
    /// The negotiations' deadline and limits; a stopping server cuts them all short.
    admission: Arc<Admission>,
    pub(crate) tls_failures: TlsFailureLog,
    next_core: AtomicUsize,
    cores: Vec<CoreId>,
}

impl Exports for ServerShared {
    fn get(&self, name: &str) -> Option<ExportInfo> {
        self.exports.read().get(name).map(|e| e.info())
    }

    fn list(&self) -> Vec<ExportInfo> {
        let mut all: Vec<_> = self.exports.read().values().map(|e| e.info()).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }
}

impl ServerShared {
    /// Takes `bytes` from the global reply budget; false (taking nothing) when it has less.
    pub(crate) fn take_reply_budget(&self, bytes: usize) -> bool {
        self.reply_budget_free
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |free| {
                free.checked_sub(bytes)
            })
            .is_ok()
    }

    /// Gives `bytes` back to the global reply budget.
    pub(crate) fn return_reply_budget(&self, bytes: usize) {
        self.reply_budget_free.fetch_add(bytes, Ordering::AcqRel);
    }

    /// Sends every reactor an empty message so connections notice a flag set from outside.
    fn wake_reactors(&self) {
        for core in &self.cores {
            if let Err(e) = self.engine.call(*core, |_| ()) {
                tracing::debug!(core = core.get(), error = %e, "could not wake reactor");
            }
        }
    }

    fn wait_until(&self, limit: Duration, done: impl Fn() -> bool) -> bool {
        let until = Instant::now() + limit;
        while !done() {
            if Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Negotiates with one client and hands the connection to a reactor.
    fn serve_client<S>(self: &Arc<Self>, mut stream: S, ticket: Ticket, peer: &str)
    where
        S: Read + Write + AsRawFd + Into<OwnedFd>,
    {
        let result = handshake::negotiate(&mut stream, &**self, self.config.tls.as_ref());
        // Before the socket goes to a reactor: no deadline or eviction may reach it there.
        drop(ticket);
        let Outcome { negotiated, tls } = match result {
            Ok(Some(outcome)) => outcome,
            Ok(None) => return,
            Err(e @ (HandshakeError::Tls(_) | HandshakeError::TlsRequired)) => {
                self.tls_failures.note(peer, &e);
                return;
            }
            // A client that vanishes mid-negotiation (a port probe) is routine; a client that
            // breaks the protocol is worth an operator's attention.
            Err(e @ (HandshakeError::Io { .. } | HandshakeError::Truncated { .. })) => {
                tracing::debug!(peer, error = %e, "NBD client left during negotiation");
                return;
            }
            Err(e) => {
                tracing::info!(peer, error = %e, "NBD negotiation failed");
                return;
            }
        };
        let Some(export) = self.exports.read().get(&negotiated.export.name).cloned() else {
            tracing::info!(peer, export = %negotiated.export.name, "export removed during negotiation");
            return;
        };
        if export.closed.load(Ordering::Relaxed) || self.stopping.load(Ordering::Relaxed) {
            return;
        }
        if self.connections.load(Ordering::Relaxed) as usize >= self.config.connections_max {
            self.admission.refuse(peer);
            return;
        }
        let fd: OwnedFd = stream.into();
        clear_timeouts(&fd);
        let conn = match ExportConn::new(
            fd,
            export,
            self.clone(),
            negotiated.structured_replies,
            negotiated.base_allocation,
            tls.map(|session| (session, peer.to_string())),
        ) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(peer, error = %e, "no memory for an NBD connection");
                return;
            }
        };
        let core = self.cores[self.next_core.fetch_add(1, Ordering::Relaxed) % self.cores.len()];
        tracing::debug!(peer, export = %negotiated.export.name, core = core.get(), "NBD client connected");
        if let Err(e) = self.engine.spawn_poller(core, Box::new(conn), None) {
            tracing::warn!(peer, error = %e, "could not hand the NBD connection to a reactor");
        }
    }

    /// Starts a handshake thread for an accepted client, unless the connection cap is
    /// reached; [`Admission`] applies the negotiation limits (evicting an older negotiation
    /// rather than refusing the newcomer).
    fn accept<S>(self: &Arc<Self>, stream: S, cancel: Cancel, peer: String)
    where
        S: Read + Write + AsRawFd + Into<OwnedFd> + Send + 'static,
    {
        if self.stopping.load(Ordering::Relaxed) {
            return;
        }
        let connected = self.connections.load(Ordering::Relaxed) as usize;
        if connected + self.admission.negotiating() >= self.config.connections_max {
            self.admission.refuse(&peer);
            return;
        }
        let Some(ticket) = self.admission.admit(&peer, cancel) else {
            return;
        };
        self.handshakes.fetch_add(1, Ordering::AcqRel);
        let shared = self.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-handshake".into())
            .spawn(move || {
                shared.serve_client(stream, ticket, &peer);
                shared.handshakes.fetch_sub(1, Ordering::AcqRel);
            });
        if let Err(e) = spawned {
            // The closure, with the stream and the ticket, was dropped.
            self.handshakes.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(error = %e, "could not start an NBD handshake thread");
        }
    }
}

/// Restores blocking, timeout-free behaviour once negotiation is over; io_uring drives the
/// socket from here on.
fn clear_timeouts(fd: &OwnedFd) {
    let zero = libc::timeval {
        tv_sec: 0,
        tv_usec: 0,
    };
    for opt in [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO] {
        // SAFETY: setsockopt reads a timeval from a live local; the fd is ours and open.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&zero as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
    }
}

/// Waits up to [`ACCEPT_POLL`] for `fd` to have a client to accept.
fn readable(fd: i32) -> bool {
    crate::sys::wait_readable(fd, ACCEPT_POLL).unwrap_or(false)
}

/// The two kinds of listener, as the accept loop needs them.
trait Listener: AsRawFd + Send + 'static {
    type Stream: Read + Write + AsRawFd + Into<OwnedFd> + Send + 'static;

    /// Accepts one client. Errors are the listener's own (out of fds, say).
    fn accept_client(&self) -> std::io::Result<(Self::Stream, String)>;

    /// Prepares an accepted socket for negotiation; fails only when the client is already gone.
    fn prepare(stream: &Self::Stream, timeout: Duration) -> std::io::Result<()>;

    /// What cuts the negotiation short: a shutdown through a duplicate of the socket, which
    /// keeps the socket (and so the fd number) alive until the admission entry is gone.
    fn canceller(stream: &Self::Stream) -> std::io::Result<Cancel>;
}

impl Listener for TcpListener {
    type Stream = TcpStream;

    fn accept_client(&self) -> std::io::Result<(TcpStream, String)> {
        let (stream, peer) = self.accept()?;
        Ok((stream, peer.to_string()))
    }

    fn prepare(stream: &TcpStream, timeout: Duration) -> std::io::Result<()> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))
    }

    fn canceller(stream: &TcpStream) -> std::io::Result<Cancel> {
        let dup = stream.try_clone()?;
        Ok(Box::new(move || drop(dup.shutdown(Shutdown::Both))))
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;

    fn accept_client(&self) -> std::io::Result<(UnixStream, String)> {
        let (stream, _) = self.accept()?;
        Ok((stream, "unix".to_string()))
    }

    fn prepare(stream: &UnixStream, timeout: Duration) -> std::io::Result<()> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))
    }

    fn canceller(stream: &UnixStream) -> std::io::Result<Cancel> {
        let dup = stream.try_clone()?;
        Ok(Box::new(move || drop(dup.shutdown(Shutdown::Both))))
    }
}

fn accept_loop<L: Listener>(shared: Arc<ServerShared>, listener: L) {
    while !shared.stopping.load(Ordering::Relaxed) {
        shared.admission.sweep();
        shared.tls_failures.flush();
        if shared.paused.load(Ordering::Acquire) {
            std::thread::sleep(PAUSED_POLL);
            continue;
        }
        if !readable(listener.as_raw_fd()) {
            continue;
        }
        let (stream, peer) = match listener.accept_client() {
            Ok(accepted) => accepted,
            Err(e) => {
                accept_failed(&e);
                continue;
            }
        };
        let prepared = L::prepare(&stream, shared.config.handshake_timeout)
            .and_then(|()| L::canceller(&stream));
        match prepared {
            Ok(cancel) => shared.accept(stream, cancel, peer),
            Err(e) => tracing::debug!(peer, error = %e, "NBD client gone before negotiation"),
        }
    }
}

fn accept_failed(e: &std::io::Error) {
    tracing::warn!(error = %e, "NBD accept failed");
    // Out of fds or memory: give the system a moment instead of spinning on the error.
    std::thread::sleep(ACCEPT_POLL);
}

/// Binds a unix socket, replacing a stale socket file but never a live server's, and makes it
/// owner-only ([`owner_only::SOCKET_MODE`]): connecting to a unix socket needs write
/// permission on it, so another local user cannot reach the exports through it. The mode is
/// set before the listener accepts anyone (the server starts accepting only after this).
fn bind_unix(path: &PathBuf) -> Result<UnixListener, NbdError> {
    let bind_err = |source| NbdError::Bind {
        addr: path.display().to_string(),
        source,
    };
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(bind_err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another server is listening on this socket",
            )));
        }
        std::fs::remove_file(path).map_err(bind_err)?;
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    owner_only::set_created(path, owner_only::SOCKET_MODE).map_err(bind_err)?;
    Ok(listener)
}

/// A running NBD server. Dropping it without [`NbdServer::shutdown`] also shuts it down.
pub struct NbdServer {
    shared: Arc<ServerShared>,
    listeners: Vec<JoinHandle<()>>,
    tcp_addr: Option<SocketAddr>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("tcp", &self.tcp_addr)
            .field("unix", &self.shared.config.unix)
            .finish()
    }
}

impl NbdServer {
    /// Binds the configured listeners and starts accepting. A port that is taken or a live
    /// unix socket is an error naming the address.
    pub fn start(engine: Arc<Engine>, config: NbdConfig) -> Result<NbdServer, NbdError> {
        let tcp = match config.tcp {
            Some(addr) => Some(TcpListener::bind(addr).map_err(|source| NbdError::Bind {
                addr: addr.to_string(),
                source,
            })?),
            None => None,
        };
        let unix = config.unix.as_ref().map(bind_unix).transpose()?;
        let tcp_addr = tcp.as_ref().and_then(|l| l.local_addr().ok());
        let cores = engine.cores();
        let paused = config.start_paused;
        let admission = Admission::new(
            "NBD",
            AdmissionLimits {
                negotiating_max: config.handshakes_max,
                per_source_max: config.handshakes_per_source_max,
                deadline: config.handshake_timeout,
            },
        );
        let reply_budget = config.reply_budget_bytes;
        let shared = Arc::new(ServerShared {
            engine,
            config,
            exports: RwLock::new(HashMap::new()),
            stopping: AtomicBool::new(false),
            paused: AtomicBool::new(paused),
            connections: AtomicU32::new(0),
            reply_budget_free: AtomicUsize::new(reply_budget),
            handshakes: AtomicUsize::new(0),
            admission,
            tls_failures: TlsFailureLog::new(),
            next_core: AtomicUsize::new(0),
            cores,
        });
        let mut listeners = Vec::new();
        if let Some(l) = tcp {
            let s = shared.clone();
            listeners.push(spawn_listener("nbd-tcp", move || accept_loop(s, l))?);
        }
        if let Some(l) = unix {
            let s = shared.clone();
            listeners.push(spawn_listener("nbd-unix", move || accept_loop(s, l))?);
        }
        Ok(NbdServer {
            shared,
            listeners,
            tcp_addr,
        })
    }

    /// Starts accepting clients on a server started with [`NbdConfig::start_paused`].
    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::Release);
    }

    /// The TCP address actually bound (the real port when the config asked for port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_addr
    }

    /// Offers `bdev` as export `name` to new connections.
    pub fn add_export(
        &self,
        name: &str,
        bdev: &BdevHandle,
        options: ExportOptions,
    ) -> Result<(), NbdError> {
        check_name(name)?;
        let mut exports = self.shared.exports.write();
        if exports.contains_key(name) {
            return Err(NbdError::ExportExists { name: name.into() });
        }
        let cores = self.shared.cores.iter().map(|c| c.get()).max().unwrap_or(0) as usize + 1;
        let entry = ExportEntry {
            name: name.into(),
            bdev_id: bdev.id(),
            bdev: self.shared.engine.bdev(bdev)?,
            options,
            closed: AtomicBool::new(false),
            connections: AtomicU32::new(0),
            stats: (0..cores).map(|_| CoreStats::default()).collect(),
        };
        exports.insert(name.into(), Arc::new(entry));
        Ok(())
    }

    /// Stops offering `name`, disconnects its clients after their in-flight requests are
    /// answered, and returns once no connection uses the bdev (so it can be closed).
    pub fn remove_export(&self, name: &str) -> Result<(), NbdError> {
        let entry = self
            .shared
            .exports
            .write()
            .remove(name)
            .ok_or_else(|| NbdError::NoSuchExport { name: name.into() })?;
        entry.closed.store(true, Ordering::Relaxed);
        self.shared.wake_reactors();
        let waited = DRAIN_MAX + CLOSE_SLACK;
        let gone = self
            .shared
            .wait_until(waited, || entry.connections.load(Ordering::Relaxed) == 0);
        if !gone {
            return Err(NbdError::StillConnected {
                name: name.into(),
                connections: entry.connections.load(Ordering::Relaxed),
                waited,
            });
        }
        Ok(())
    }

    pub fn exports(&self) -> Vec<ExportStatus> {
        let mut all: Vec<_> = self
            .shared
            .exports
            .read()
            .values()
            .map(|e| e.status())
            .collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Stops the listeners, lets every connection answer what it has in flight, closes them,
    /// and returns when all are gone (or after the drain limit, saying so in the log).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let shared = &self.shared;
        if shared.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        for l in self.listeners.drain(..) {
            let _ = l.join();
        }
        shared.admission.cancel_all();
        let limit = shared.config.handshake_timeout + CLOSE_SLACK;
        if !shared.wait_until(limit, || shared.handshakes.load(Ordering::Acquire) == 0) {
            tracing::warn!("NBD handshakes still running at shutdown");
        }
        shared.wake_reactors();
        let drained = shared.wait_until(DRAIN_MAX + CLOSE_SLACK, || {
            shared.connections.load(Ordering::Relaxed) == 0
        });
        if !drained {
            tracing::error!(
                connections = shared.connections.load(Ordering::Relaxed),
                "NBD connections still open after the drain limit"
            );
        }
        if let Some(path) = &shared.config.unix {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_listener(
    name: &str,
    f: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, NbdError> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|source| NbdError::Bind {
            addr: name.into(),
            source,
        })
}

fn check_name(name: &str) -> Result<(), NbdError> {
    let why = if name.is_empty() {
        "empty"
    } else if name.len() > super::proto::STRING_MAX_BYTES {
        "longer than 4096 bytes"
    } else if name.chars().any(char::is_control) {
        "contains control characters"
    } else {
        return Ok(());
    };
    Err(NbdError::BadExportName {
        name: name.chars().take(64).collect(),
        why,
    })
}
