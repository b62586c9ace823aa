//! The replica server: accepts nexus connections, runs the `Open` handshake (epoch fencing)
//! on a short-lived control thread, then serves each connection as a poller on one reactor,
//! submitting its requests to the replica's volume on that core.
//!
//! Limits and what happens at them:
//! * [`HANDSHAKES_MAX`] handshakes at once, [`HANDSHAKES_PER_SOURCE_MAX`] from one source
//!   address, and [`HANDSHAKE_TIMEOUT`] for the first frame to arrive whole, enforced by the
//!   shared admission policy (`cairn_engine::frontend::admission`): a newcomer at a limit
//!   evicts the oldest handshake of its own source, or of the source holding the most, so
//!   silent sockets on the replica port cannot make a nexus's `Open` fail. Refusals are
//!   logged rate-limited. Once the first frame is in, the handshake is the server's own work
//!   (a fence drain, an fsync), bounded by its own limits and no longer subject to eviction.
//! * [`SERVER_OPS_MAX`] requests of one connection in flight, and the core's DMA buffers:
//!   at either limit the connection stops reading, and TCP pushes back on the nexus.
//! * Reads and writes larger than one DMA buffer ([`Engine`]'s `buf_size_bytes`, 128 KiB by
//!   default) are answered `Error{EINVAL}`; the nexus never sends them.
//!
//! Who may open: over TLS only a node's certificate, and when the replica has an assigned
//! opener ([`crate::opener`]) only that node's; any other is answered `Error{EACCES}` before
//! the epoch rules run, and a refused assigned-opener check goes to a rate-limited log with
//! the peer's and the assigned node's names. Connections already open are not cut.
//!
//! A connection whose first frame is `SetGeneration` instead of `Open` only updates the
//! replica's generation record (on the handshake thread, which may fsync) and is closed after
//! its `OpenOk`.
//!
//! A frame that fails to decode, a reply opcode, a second `Open`, or a request for another
//! volume or epoch than the connection opened closes that connection (logged with the peer);
//! every other connection keeps being served. Requests under an epoch below the replica's
//! fence are answered `StaleEpoch` and not run.

use crate::opener::RefusalLog;
use crate::proto::{Envelope, Epoch, Message, Opcode, RequestId};
use crate::replica::{Acceptance, HostedReplica, PathGauge, RecordUpdate, ReplicaSet};
use crate::transport::{Conn, Link, PeerIdentity, Transport, TransportError, HANDSHAKE_TIMEOUT};
use cairn_engine::bdev::{IoOp, IoRequest};
use cairn_engine::dma::DmaBuf;
use cairn_engine::frontend::admission::{Admission, AdmissionLimits, Ticket};
use cairn_engine::reactor::{Core, OwnerId, Poller, PollerState};
use cairn_engine::Engine;
use cairn_tls::Identity;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Requests one connection may have in flight at the volume.
pub const SERVER_OPS_MAX: usize = 128;
/// Handshakes waiting for their first frame at once; a newcomer at the limit evicts the
/// oldest of the source holding the most.
pub const HANDSHAKES_MAX: usize = 64;
/// Handshakes one source address may have waiting for their first frame; a newcomer at the
/// limit evicts that source's oldest. A node opening many volumes at once opens them in a few
/// milliseconds each, far below this.
pub const HANDSHAKES_PER_SOURCE_MAX: usize = 16;
/// How often the accept loop checks for shutdown.
const ACCEPT_POLL: Duration = Duration::from_millis(100);

/// A running replica server.
pub struct ReplicaServer {
    endpoint: String,
    /// Its connections' reactors, woken at shutdown so idle connections see `stop`.
    engine: Arc<Engine>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// For the handshake threads still running at shutdown.
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ReplicaServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaServer")
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

struct Shared {
    engine: Arc<Engine>,
    replicas: Arc<ReplicaSet>,
    stop: Arc<AtomicBool>,
    /// The first frame's deadline and the handshake limits.
    admission: Arc<Admission>,
    /// The handshake threads started and not yet joined: shutdown joins them, since each
    /// holds the engine (and may hand a connection to a reactor) until it ends.
    handshake_threads: parking_lot::Mutex<Vec<JoinHandle<()>>>,
    next_core: AtomicUsize,
    /// Opens refused because the replica is assigned to another node.
    refusals: RefusalLog,
}

impl ReplicaServer {
    /// Listens at `endpoint` and serves until [`ReplicaServer::shutdown`].
    pub fn start(
        engine: Arc<Engine>,
        transport: Arc<dyn Transport>,
        endpoint: &str,
        replicas: Arc<ReplicaSet>,
    ) -> Result<ReplicaServer, TransportError> {
        let mut acceptor = transport.listen(endpoint)?;
        let endpoint = acceptor.endpoint();
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            engine: engine.clone(),
            replicas,
            stop: stop.clone(),
            admission: Admission::new(
                "replica",
                AdmissionLimits {
                    negotiating_max: HANDSHAKES_MAX,
                    per_source_max: HANDSHAKES_PER_SOURCE_MAX,
                    deadline: HANDSHAKE_TIMEOUT,
                },
            ),
            handshake_threads: parking_lot::Mutex::new(Vec::new()),
            next_core: AtomicUsize::new(0),
            refusals: RefusalLog::default(),
        });
        let accepting = shared.clone();
        let thread = std::thread::Builder::new()
            .name("cairn-replica-accept".into())
            .spawn(move || {
                while !accepting.stop.load(Ordering::Acquire) {
                    accepting.admission.sweep();
                    match acceptor.accept(ACCEPT_POLL) {
                        Ok(Some(link)) => admit(&accepting, link),
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "replica server accept failed");
                            std::thread::sleep(ACCEPT_POLL);
                        }
                    }
                }
            })
            .expect("spawning the replica accept thread");
        Ok(ReplicaServer {
            endpoint,
            engine,
            stop,
            thread: Some(thread),
            shared,
        })
    }

    /// The bound endpoint (port resolved).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Stops accepting and closes every connection once its in-flight requests are answered.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Release);
        let Some(t) = self.thread.take() else { return };
        drop(t.join());
        self.shared.admission.cancel_all();
        // No new handshake starts now; the running ones end within their bounds (the frame
        // timeout, or a fence drain's FENCE_DRAIN_MAX), and a connection one hands over sees
        // `stop` like the others. Without this join, one still running keeps the engine
        // shared past the node's shutdown.
        let threads = std::mem::take(&mut *self.shared.handshake_threads.lock());
        for t in threads {
            drop(t.join());
        }
        // An idle connection's reactor sleeps until a completion or a message: wake each one
        // so its connections see `stop` and close now, not at the next request. A stopped
        // engine has closed them already.
        for core in self.engine.cores() {
            if let Err(e) = self.engine.call(core, |_| ()) {
                tracing::debug!(core = core.get(), error = %e, "replica server stop: reactor not woken");
            }
        }
    }
}

impl Drop for ReplicaServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

fn admit(shared: &Arc<Shared>, link: Box<dyn Link>) {
    let cancel = match link.canceller() {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(peer = link.peer(), error = %e, "replica peer gone before its handshake");
            return;
        }
    };
    let Some(ticket) = shared.admission.admit(link.peer(), cancel) else {
        return;
    };
    let handshaking = shared.clone();
    let spawned = std::thread::Builder::new()
        .name("cairn-replica-open".into())
        .spawn(move || {
            let peer = link.peer().to_string();
            if let Err(why) = handshake(&handshaking, link, ticket) {
                tracing::warn!(peer = %peer, error = %why, "replica open refused");
            }
        });
    match spawned {
        Ok(t) => {
            let mut threads = shared.handshake_threads.lock();
            threads.retain(|t| !t.is_finished());
            threads.push(t);
        }
        Err(e) => tracing::error!(error = %e, "spawning a replica handshake thread failed"),
    }
}

/// Runs `Open`: finds the replica, applies the epoch rules, answers, and hands the connection
/// to a reactor. Returns why a connection was refused.
fn handshake(shared: &Shared, mut link: Box<dyn Link>, ticket: Ticket) -> Result<(), String> {
    let first = link.recv_frame(HANDSHAKE_TIMEOUT);
    // The peer has spoken (or failed to): what follows is this server's own work, and the
    // link may go to a reactor, where no eviction may reach it.
    drop(ticket);
    let (header, payload) = match first {
        Ok(frame) => frame,
        // A peer that left or stayed silent (evicted, or past its deadline, which the
        // admission log already reports, rate-limited) is not worth a line each.
        Err(e @ (TransportError::Io { .. } | TransportError::Closed { .. })) => {
            tracing::debug!(peer = link.peer(), error = %e, "replica peer sent no first frame");
            return Ok(());
        }
        // A failed TLS handshake (no certificate, another CA, not TLS at all): a refusal,
        // logged rate-limited with the admission's others.
        Err(e @ TransportError::Tls { .. }) => {
            tracing::debug!(peer = link.peer(), error = %e, "replica peer failed its TLS handshake");
            shared.admission.refuse(link.peer());
            return Ok(());
        }
        Err(e) => return Err(e.to_string()),
    };
    let msg = crate::proto::decode(&header, &payload).map_err(|e| e.to_string())?;
    // Authorisation: over TLS only a node may open a replica or set its generation (the
    // handshake has already refused any certificate not from the cluster CA). A plain link is
    // a deployment without TLS, where the node's listener rule allowed it.
    let identity = link.identity();
    if !matches!(
        identity,
        PeerIdentity::Unauthenticated | PeerIdentity::Certified(Identity::Node(_))
    ) {
        let mut out = Vec::new();
        crate::proto::encode_into(&header.envelope, &error_msg(libc::EACCES), &mut out);
        drop(link.send_frame(&out));
        return Err(format!("the peer is {identity}, not a node"));
    }
    let takeover = match msg {
        Message::Open { takeover } => takeover,
        Message::SetGeneration { generation, clean } => {
            return set_generation(shared, link, &header.envelope, generation, clean)
        }
        _ => return Err(format!("expected Open, got {:?}", header.opcode)),
    };
    let env = header.envelope;
    let reply = |link: &mut Box<dyn Link>, msg: Message<'_>| {
        let mut out = Vec::new();
        crate::proto::encode_into(&env, &msg, &mut out);
        link.send_frame(&out).map_err(|e| e.to_string())
    };
    let replica = match shared.replicas.get(&env.volume_id) {
        Ok(r) => r,
        Err(e) => {
            reply(&mut link, error_msg(e.errno()))?;
            return Err(format!("{e} (peer {identity})"));
        }
    };
    if !assigned(shared, &mut link, &env, &replica) {
        return Ok(());
    }
    match shared
        .replicas
        .accept(&replica, env.epoch, takeover, Some(&identity))
    {
        Ok(Acceptance::Accepted(epoch)) => {
            reply(&mut link, open_ok(&replica, epoch))?;
            tracing::info!(
                peer = link.peer(),
                identity = %identity,
                replica = %replica.name,
                epoch = epoch.get(),
                takeover,
                "replica opened"
            );
        }
        Ok(Acceptance::Stale { current }) => {
            reply(&mut link, Message::StaleEpoch { current })?;
            let why = if env.epoch.get() < current.get() {
                "is below"
            } else {
                "takes over but does not rise above"
            };
            return Err(format!(
                "replica '{}': epoch {} {why} its fence {} (peer {identity})",
                replica.name,
                env.epoch.get(),
                current.get()
            ));
        }
        Err(e) => {
            reply(&mut link, error_msg(e.errno()))?;
            return Err(format!("{e} (peer {identity})"));
        }
    }
    let cores = shared.engine.cores();
    let core = cores[shared.next_core.fetch_add(1, Ordering::Relaxed) % cores.len()];
    let conn = ServerConn::new(link, replica, env.epoch, shared.stop.clone());
    shared
        .engine
        .spawn_poller(core, Box::new(conn), None)
        .map_err(|e| e.to_string())
}

/// Whether the link's peer is the node `replica` is assigned to (or it has none); if not,
/// answers `Error{EACCES}` and notes the refusal in the rate-limited log with both names.
fn assigned(
    shared: &Shared,
    link: &mut Box<dyn Link>,
    env: &Envelope,
    replica: &HostedReplica,
) -> bool {
    let identity = link.identity();
    let Err(why) = shared.replicas.may_open(replica, &identity) else {
        return true;
    };
    let mut out = Vec::new();
    crate::proto::encode_into(env, &error_msg(libc::EACCES), &mut out);
    drop(link.send_frame(&out));
    shared
        .refusals
        .refused(link.peer(), &identity, &replica.name, &why);
    false
}

/// The `OpenOk` of `replica` under `epoch`: its geometry and generation record.
fn open_ok(replica: &HostedReplica, epoch: Epoch) -> Message<'static> {
    let info = replica.info();
    let record = replica.record();
    Message::OpenOk {
        size_bytes: info.size_bytes,
        block_size_bytes: info.block_size_bytes,
        epoch_accepted: epoch,
        generation: record.generation,
        clean: record.clean,
    }
}

/// Runs `SetGeneration` on a handshake thread: stores the record (flushing the volume first
/// for a clean mark), answers, and closes the connection.
fn set_generation(
    shared: &Shared,
    mut link: Box<dyn Link>,
    env: &Envelope,
    generation: u64,
    clean: bool,
) -> Result<(), String> {
    let replica = match shared.replicas.get(&env.volume_id) {
        Ok(r) => r,
        Err(e) => {
            let mut out = Vec::new();
            crate::proto::encode_into(env, &error_msg(e.errno()), &mut out);
            link.send_frame(&out).map_err(|e| e.to_string())?;
            return Err(e.to_string());
        }
    };
    if !assigned(shared, &mut link, env, &replica) {
        return Ok(());
    }
    let identity = link.identity();
    let mut reply = |msg: Message<'_>| {
        let mut out = Vec::new();
        crate::proto::encode_into(env, &msg, &mut out);
        link.send_frame(&out).map_err(|e| e.to_string())
    };
    let flush = || flush_replica(&shared.engine, &replica);
    match shared.replicas.set_generation(
        &replica,
        env.epoch,
        generation,
        clean,
        flush,
        Some(&identity),
    ) {
        Ok(RecordUpdate::Stored(_)) => reply(open_ok(&replica, env.epoch)),
        Ok(RecordUpdate::Stale { current }) => {
            reply(Message::StaleEpoch { current })?;
            Err(format!(
                "replica '{}': generation update under epoch {} below its fence {}",
                replica.name,
                env.epoch.get(),
                current.get()
            ))
        }
        Err(e) => {
            reply(error_msg(e.errno()))?;
            Err(e.to_string())
        }
    }
}

/// Makes every write the replica's volume acknowledged durable (blocking; control threads
/// only).
pub fn flush_replica(engine: &Engine, replica: &HostedReplica) -> Result<(), String> {
    let core = engine.cores()[0];
    let mut q = engine
        .queue(&replica.handle, core, 1)
        .map_err(|e| e.to_string())?;
    q.flush().map_err(|e| e.to_string())
}

fn error_msg(errno: i32) -> Message<'static> {
    Message::Error {
        errno: errno.max(1) as u32,
    }
}

/// One request at the volume.
struct Op {
    request_id: RequestId,
    opcode: Opcode,
    len_bytes: u32,
    buf: Option<DmaBuf>,
    /// The completion result once done.
    res: i32,
}

/// What one received frame asks for, decoded out of the receive buffer.
enum Action {
    Submit {
        op: IoOp,
        opcode: Opcode,
        offset_bytes: u64,
        len_bytes: u32,
        fua: bool,
        /// Write data, already copied in.
        buf: Option<DmaBuf>,
    },
    Reply(Message<'static>),
    Close(String),
}

/// One nexus connection on one reactor.
struct ServerConn {
    link: Option<Box<dyn Link>>,
    conn: Option<Box<dyn Conn>>,
    replica: Arc<HostedReplica>,
    epoch: Epoch,
    gauge: Arc<PathGauge>,
    stop: Arc<AtomicBool>,
    owner: Option<OwnerId>,
    ops: Vec<Option<Op>>,
    free: Vec<u16>,
    /// Finished ops whose reply has not been queued yet (the send queue was full).
    done: VecDeque<u16>,
    in_flight: usize,
    closing: bool,
}

impl ServerConn {
    fn new(
        link: Box<dyn Link>,
        replica: Arc<HostedReplica>,
        epoch: Epoch,
        stop: Arc<AtomicBool>,
    ) -> ServerConn {
        ServerConn {
            link: Some(link),
            conn: None,
            gauge: replica.register_path(epoch),
            replica,
            epoch,
            stop,
            owner: None,
            ops: (0..SERVER_OPS_MAX).map(|_| None).collect(),
            free: (0..SERVER_OPS_MAX as u16).rev().collect(),
            done: VecDeque::new(),
            in_flight: 0,
            closing: false,
        }
    }

    fn envelope(&self, request_id: RequestId) -> Envelope {
        Envelope {
            volume_id: self.replica.volume_id,
            epoch: self.epoch,
            request_id,
        }
    }

    fn reap(&mut self, core: &mut Core) -> usize {
        let owner = self.owner.expect("attached");
        let mut n = 0;
        while let Some(c) = core.io().pop(owner) {
            let op = self.ops[c.tag as usize]
                .as_mut()
                .expect("completion for a live op");
            op.res = c.res;
            self.in_flight -= 1;
            self.gauge.end();
            self.done.push_back(c.tag as u16);
            n += 1;
        }
        n
    }

    /// Queues the replies of finished ops, in completion order, until the send queue is full.
    fn reply_done(&mut self, core: &mut Core) -> usize {
        let mut n = 0;
        while let Some(&slot) = self.done.front() {
            let op = self.ops[slot as usize].as_ref().expect("done op");
            let env = self.envelope(op.request_id);
            let conn = self.conn.as_mut().expect("attached");
            if !self.closing {
                let msg = match (op.res, &op.buf) {
                    (res, _) if res < 0 => error_msg(-res),
                    (_, Some(buf)) if op.opcode == Opcode::Read => Message::ReadData {
                        data: &buf.as_slice()[..op.len_bytes as usize],
                    },
                    _ => Message::Ok,
                };
                if conn.send(&env, &msg).is_err() {
                    break;
                }
            }
            self.done.pop_front();
            let op = self.ops[slot as usize].take().expect("done op");
            if let Some(b) = op.buf {
                core.io().pool().put(b);
            }
            self.free.push(slot);
            n += 1;
        }
        n
    }

    /// Turns one request into an action; copies write data out of the receive buffer into a
    /// DMA buffer (the caller made sure one is free).
    fn classify(
        replica: &HostedReplica,
        gauge: &PathGauge,
        epoch: Epoch,
        core: &mut Core,
        env: &Envelope,
        msg: &Message<'_>,
    ) -> Action {
        if env.volume_id != replica.volume_id || env.epoch != epoch {
            return Action::Close(format!(
                "request for volume {} epoch {} on a connection opened for {} epoch {}",
                env.volume_id,
                env.epoch.get(),
                replica.volume_id,
                epoch.get()
            ));
        }
        // Announced before the fence is read, so a rising fence waits for it (replica.rs).
        gauge.begin();
        if !replica.admits(env.epoch) {
            gauge.end();
            let current = Epoch::new(replica.fence()).expect("fence above a live epoch");
            return Action::Reply(Message::StaleEpoch { current });
        }
        let action = Self::classify_admitted(core, msg);
        if !matches!(action, Action::Submit { .. }) {
            gauge.end();
        }
        action
    }

    /// The action for a request the fence admitted.
    fn classify_admitted(core: &mut Core, msg: &Message<'_>) -> Action {
        let buf_bytes = u64::from(core.io().pool().buf_size_bytes());
        let submit = |op, opcode, offset_bytes, len_bytes: u64, fua, buf| Action::Submit {
            op,
            opcode,
            offset_bytes,
            len_bytes: len_bytes as u32,
            fua,
            buf,
        };
        match *msg {
            Message::Write {
                offset_bytes,
                fua,
                data,
            } if data.len() as u64 <= buf_bytes => {
                let mut b = core
                    .io()
                    .pool()
                    .get()
                    .expect("caller checked a free buffer");
                b.as_mut_slice()[..data.len()].copy_from_slice(data);
                let len = data.len() as u64;
                submit(IoOp::Write, Opcode::Write, offset_bytes, len, fua, Some(b))
            }
            Message::Read {
                offset_bytes,
                len_bytes,
            } if len_bytes <= buf_bytes => {
                let b = core
                    .io()
                    .pool()
                    .get()
                    .expect("caller checked a free buffer");
                submit(
                    IoOp::Read,
                    Opcode::Read,
                    offset_bytes,
                    len_bytes,
                    false,
                    Some(b),
                )
            }
            Message::Flush => submit(IoOp::Flush, Opcode::Flush, 0, 0, false, None),
            Message::Trim {
                offset_bytes,
                len_bytes,
            } if len_bytes <= u64::from(u32::MAX) => submit(
                IoOp::Trim,
                Opcode::Trim,
                offset_bytes,
                len_bytes,
                false,
                None,
            ),
            Message::WriteZeroes {
                offset_bytes,
                len_bytes,
            } if len_bytes <= u64::from(u32::MAX) => submit(
                IoOp::WriteZeroes,
                Opcode::WriteZeroes,
                offset_bytes,
                len_bytes,
                false,
                None,
            ),
            Message::Write { .. }
            | Message::Read { .. }
            | Message::Trim { .. }
            | Message::WriteZeroes { .. } => Action::Reply(error_msg(libc::EINVAL)),
            Message::Ping => Action::Reply(Message::Pong),
            ref other => Action::Close(format!("unexpected {:?} from a nexus", other.opcode())),
        }
    }

    /// Reads and starts requests while there is a free op slot and a free buffer.
    fn serve(&mut self, core: &mut Core) -> usize {
        let mut n = 0;
        while !self.closing && !self.free.is_empty() && core.io().pool().available() > 0 {
            let conn = self.conn.as_mut().expect("attached");
            let (env, action) = match conn.recv(core.io()) {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(replica = %self.replica.name, error = %e, "closing replica connection");
                    self.closing = true;
                    break;
                }
                Some(Ok(frame)) => {
                    let env = frame.header.envelope;
                    let action = Self::classify(
                        &self.replica,
                        &self.gauge,
                        self.epoch,
                        core,
                        &env,
                        &frame.msg,
                    );
                    (env, action)
                }
            };
            n += 1;
            match action {
                Action::Submit {
                    op,
                    opcode,
                    offset_bytes,
                    len_bytes,
                    fua,
                    buf,
                } => self.submit(
                    core,
                    env.request_id,
                    op,
                    opcode,
                    offset_bytes,
                    len_bytes,
                    fua,
                    buf,
                ),
                Action::Reply(msg) => {
                    let env = self.envelope(env.request_id);
                    let conn = self.conn.as_mut().expect("attached");
                    if conn.send(&env, &msg).is_err() {
                        // The send queue is full of replies the peer is not reading.
                        tracing::warn!(replica = %self.replica.name, "replica connection's send queue is full; closing");
                        self.closing = true;
                    }
                }
                Action::Close(why) => {
                    tracing::warn!(replica = %self.replica.name, why = %why, "closing replica connection");
                    self.closing = true;
                }
            }
        }
        n
    }

    #[allow(clippy::too_many_arguments)]
    fn submit(
        &mut self,
        core: &mut Core,
        request_id: RequestId,
        op: IoOp,
        opcode: Opcode,
        offset_bytes: u64,
        len_bytes: u32,
        fua: bool,
        mut buf: Option<DmaBuf>,
    ) {
        let slot = self.free.pop().expect("caller checked a free slot");
        let req = IoRequest {
            op,
            offset_bytes,
            len_bytes,
            buf: buf.as_mut().map(DmaBuf::io_buf),
            fua,
            owner: self.owner.expect("attached"),
            tag: u32::from(slot),
        };
        let res = match core.submit(self.replica.bdev(), req) {
            Ok(()) => {
                self.in_flight += 1;
                None
            }
            Err(e) => {
                self.gauge.end();
                Some(-e.errno())
            }
        };
        self.ops[slot as usize] = Some(Op {
            request_id,
            opcode,
            len_bytes,
            buf,
            res: res.unwrap_or(0),
        });
        if res.is_some() {
            self.done.push_back(slot);
        }
    }

    fn finish(&mut self, core: &mut Core) -> PollerState {
        let conn = self.conn.as_mut().expect("attached");
        conn.close(core.io());
        drop(conn.poll(core.io()));
        if self.in_flight > 0 || conn.busy() {
            return PollerState::Idle;
        }
        conn.release(core.io());
        self.reply_done(core);
        core.io()
            .release_owner(self.owner.take().expect("attached"));
        PollerState::Finished
    }
}

impl Poller for ServerConn {
    fn poll(&mut self, core: &mut Core) -> PollerState {
        if let Some(link) = self.link.take() {
            match link.attach(core.io()) {
                Ok(conn) => {
                    self.conn = Some(conn);
                    self.owner = Some(core.io().register_owner(SERVER_OPS_MAX));
                }
                Err(e) => {
                    tracing::warn!(replica = %self.replica.name, error = %e, "attaching a replica connection failed");
                    return PollerState::Finished;
                }
            }
        }
        if self.stop.load(Ordering::Relaxed) || core.stopping() {
            self.closing = true;
        }
        let mut work = self.reap(core);
        let conn = self.conn.as_mut().expect("attached");
        match conn.poll(core.io()) {
            Ok(n) => work += n,
            Err(e) => {
                if !self.closing {
                    tracing::info!(replica = %self.replica.name, reason = %e, "replica connection closed");
                }
                self.closing = true;
            }
        }
        if self.closing {
            return self.finish(core);
        }
        work += self.reply_done(core);
        work += self.serve(core);
        work += self.reply_done(core);
        // Sends what was queued and re-arms the receive if `serve` made room.
        let conn = self.conn.as_mut().expect("attached");
        if conn.poll(core.io()).is_err() {
            self.closing = true;
        }
        let starved = self.in_flight == 0 && core.io().pool().available() == 0;
        if work > 0 || starved {
            // Starved of buffers with nothing in flight: no completion will wake this
            // connection, so keep polling until another releases one.
            PollerState::Busy(work.max(1))
        } else {
            PollerState::Idle
        }
    }

    fn needs_poll(&self) -> bool {
        // Work arrives only as ring completions (socket and volume), which wake the reactor.
        false
    }
}
