//! The node's side of membership: registering with the control process (`--control URL`) and
//! keeping its lease alive with heartbeats, on one thread of its own.
//!
//! `--control` may name several control processes (`URL,URL,…`: every process of an etcd
//! cluster serves registrations, heartbeats and in-sync reports, leader or not, since each is
//! a compare-and-swap in the store). [`Controls`] sends each request to the process that
//! answered last and passes one it cannot reach, or that answers 5xx, over for the next in
//! order, so the death of one control process does not stop a node's heartbeats. Every
//! request here may be repeated: a registration of the same addresses answers the same
//! record, a heartbeat renews the same lease, a report is checked on its epoch.
//!
//! The first registration runs at start, before the node is reported ready to the control
//! plane: a refusal (the node id is held by a live node at other addresses, or the request is
//! malformed) stops the node with the control process's message, which names both addresses.
//! An unreachable control process is not fatal: the thread keeps trying, so nodes and the
//! control process may start in any order. After that the thread heartbeats every
//! `heartbeat_interval_ms` (from the registration's answer); when the control process says the
//! lease is gone (410, or 404 after its store was replaced) the node registers again at once.
//! Each heartbeat carries the pools with their free capacity (the pools' free-cluster counts, read
//! on their home cores with no I/O and no walk of the volumes' maps), so placement sees current free space; the control process rewrites the
//! node's record only when the capacity changed.
//!
//! The thread only talks HTTP; it never touches the data path. Its requests are bounded by
//! [`REQUEST_TIMEOUT`], so a hung control process delays heartbeats, never shutdown, by more
//! than that.
//!
//! [`InSyncReporter`] is the other client of the control process here: a nexus created with
//! a `control_volume` records its in-sync set through it (`POST /v1/volumes/{name}/insync`),
//! from the nexus manager's control threads, with the same bound per request.

use crate::state::{Node, NodeError};
use cairn_control_api::client::{Client, ClientError, Response};
use cairn_control_api::{
    HeartbeatRequest, InSyncReport, NodeAddresses, PoolCapacity, RegisterRequest, RegisterResponse,
    ReplicaInSync, SyncState,
};
use cairn_replication::nexus::insync::{self, InSyncRecorder, RecordError, ReplicaSync};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

/// How long one request to the control process may take; below the heartbeat interval times
/// the lease's margin, so one hung request costs at most one missed heartbeat.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);
/// How long to wait between tries while the control process is unreachable or refuses us.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// The control processes of `--control`, in the order given, and the one that answered last.
#[derive(Clone, Debug)]
pub struct Controls {
    clients: Arc<[Client]>,
    current: Arc<AtomicUsize>,
}

impl Controls {
    /// The control processes of `urls`, comma-separated (each `http://HOST:PORT`); an empty
    /// entry or a bad URL is an error naming it.
    pub fn new(urls: &str, timeout: Duration) -> Result<Controls, ClientError> {
        let clients = urls
            .split(',')
            .map(|url| Client::new(url.trim(), timeout))
            .collect::<Result<Vec<Client>, ClientError>>()?;
        Ok(Controls {
            clients: clients.into(),
            current: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// The URL of the control process requests go to first.
    pub fn url(&self) -> &str {
        self.clients[self.current.load(Ordering::Relaxed) % self.clients.len()].url()
    }

    /// POSTs `body` to the control process that answered last, then to each other one in
    /// turn while the answer is no answer or a 5xx. Returns the URL that gave the answer
    /// returned (the last one tried when none answered well).
    pub fn post_json(&self, path: &str, body: &[u8]) -> (&str, Result<Response, ClientError>) {
        let first = self.current.load(Ordering::Relaxed);
        let n = self.clients.len();
        for k in 0..n {
            let i = (first + k) % n;
            let client = &self.clients[i];
            let res = client.post_json(path, body);
            let failed = res.as_ref().map_or(true, |r| r.status >= 500);
            if failed && k + 1 < n {
                tracing::debug!(url = %client.url(), "control process not reached or failing; trying the next");
                continue;
            }
            if !failed && k > 0 {
                self.current.store(i, Ordering::Relaxed);
                tracing::warn!(url = %client.url(), "control process reached after the one before it failed; using it from now on");
            }
            return (client.url(), res);
        }
        unreachable!("Controls::new makes at least one client")
    }
}

/// Who this node is to the control process (from `--control`, `--node-id`, `--zone`, `--rack`).
#[derive(Clone, Debug)]
pub struct Membership {
    pub controls: Controls,
    pub node_id: String,
    pub zone: String,
    pub rack: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    /// The control process answered with an error status.
    #[error("control process {url} refused node '{id}' (HTTP {status}): {message}")]
    Refused {
        url: String,
        id: String,
        status: u16,
        message: String,
    },
    #[error(transparent)]
    Unreachable(#[from] ClientError),
    #[error("control process {url} answered with a body that is not {what}: {why}")]
    BadAnswer {
        url: String,
        what: &'static str,
        why: String,
    },
}

impl Membership {
    /// Registers this node with its addresses and the pools' current capacity.
    pub fn register(
        &self,
        addresses: &NodeAddresses,
        pools: Vec<PoolCapacity>,
    ) -> Result<RegisterResponse, MembershipError> {
        let req = RegisterRequest {
            addresses: addresses.clone(),
            zone: self.zone.clone(),
            rack: self.rack.clone(),
            pools,
        };
        let body = serde_json::to_vec(&req).expect("a registration serializes");
        let path = format!("/v1/nodes/{}/register", self.node_id);
        let (url, resp) = self.call(&path, &body)?;
        serde_json::from_slice(&resp).map_err(|e| MembershipError::BadAnswer {
            url,
            what: "a registration answer",
            why: e.to_string(),
        })
    }

    /// Renews the lease of registration `incarnation` and reports the pools' current capacity
    /// (the control process writes it only when it changed).
    pub fn heartbeat(
        &self,
        incarnation: u64,
        pools: Option<Vec<PoolCapacity>>,
    ) -> Result<(), MembershipError> {
        let req = HeartbeatRequest { incarnation, pools };
        let body = serde_json::to_vec(&req).expect("a heartbeat serializes");
        let path = format!("/v1/nodes/{}/heartbeat", self.node_id);
        self.call(&path, &body).map(drop)
    }

    /// The body of a 200 answer and the URL that gave it.
    fn call(&self, path: &str, body: &[u8]) -> Result<(String, Vec<u8>), MembershipError> {
        let (url, resp) = self.controls.post_json(path, body);
        let resp = resp?;
        if resp.status == 200 {
            return Ok((url.to_string(), resp.body));
        }
        Err(MembershipError::Refused {
            url: url.to_string(),
            id: self.node_id.clone(),
            status: resp.status,
            message: resp.error_message(),
        })
    }
}

/// Records one volume's in-sync set with the control process, for the nexus that keeps it.
#[derive(Debug)]
pub struct InSyncReporter {
    membership: Membership,
    volume: String,
}

impl InSyncReporter {
    pub fn new(membership: Membership, volume: &str) -> InSyncReporter {
        InSyncReporter {
            membership,
            volume: volume.to_string(),
        }
    }
}

impl InSyncRecorder for InSyncReporter {
    /// 200: recorded (the control process answers after its store write returned); 409: the
    /// record's epoch is above the nexus's, a newer nexus exists; anything else (no answer,
    /// another status) is not recorded this time and is tried again.
    fn record(&self, report: &insync::InSyncReport) -> Result<(), RecordError> {
        let body = InSyncReport {
            node: self.membership.node_id.clone(),
            epoch: report.epoch,
            generation: report.generation,
            replicas: report
                .replicas
                .iter()
                .map(|(address, sync)| ReplicaInSync {
                    address: address.clone(),
                    state: match sync {
                        ReplicaSync::InSync => SyncState::InSync,
                        ReplicaSync::OutOfSync => SyncState::OutOfSync,
                    },
                })
                .collect(),
        };
        let body = serde_json::to_vec(&body).expect("a report serializes");
        let path = format!("/v1/volumes/{}/insync", self.volume);
        let (url, res) = self.membership.controls.post_json(&path, &body);
        match res {
            Ok(r) if r.status == 200 => Ok(()),
            Ok(r) if r.status == 409 => Err(RecordError::Superseded(format!(
                "control process {url} refused the report of volume '{}' (HTTP 409): {}",
                self.volume,
                r.error_message()
            ))),
            Ok(r) => Err(RecordError::NotRecorded(format!(
                "control process {url} answered the report of volume '{}' with HTTP {}: {}",
                self.volume,
                r.status,
                r.error_message()
            ))),
            Err(e) => Err(RecordError::NotRecorded(e.to_string())),
        }
    }
}

/// The node's pools as the control process weighs them; None when they cannot be read (the
/// node is shutting down), so that a heartbeat leaves the stored capacity as it was rather
/// than report no pools.
pub fn pool_capacities(node: &Node) -> Option<Vec<PoolCapacity>> {
    match node.pool_space() {
        Ok(pools) => Some(
            pools
                .into_iter()
                .map(|(name, space)| PoolCapacity {
                    name,
                    size_bytes: space.size_bytes(),
                    free_bytes: space.free_bytes(),
                })
                .collect(),
        ),
        Err(NodeError::ShuttingDown) => None,
        Err(e) => {
            tracing::warn!(error = %e, "reading the pools' capacity for the control process");
            None
        }
    }
}

/// Whether a registration failure must stop a starting node: a refusal is final (the same
/// request gets the same answer), an unreachable control process is retried.
pub fn is_final(e: &MembershipError) -> bool {
    matches!(e, MembershipError::Refused { status, .. } if *status == 409 || *status == 400)
}

/// The heartbeat thread. Dropping the returned sender stops it within one interval.
pub struct Heartbeats {
    stop: Option<Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Heartbeats {
    /// Starts heartbeating registration `registered` (or, when None, registering first).
    pub fn start(
        membership: Membership,
        node: Arc<Node>,
        addresses: NodeAddresses,
        registered: Option<RegisterResponse>,
    ) -> std::io::Result<Heartbeats> {
        let (stop, stopped) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("cairn-heartbeat".into())
            .spawn(move || run(&membership, &node, &addresses, registered, &stopped))?;
        Ok(Heartbeats {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            drop(t.join());
        }
    }
}

fn run(
    m: &Membership,
    node: &Node,
    addresses: &NodeAddresses,
    mut registered: Option<RegisterResponse>,
    stopped: &Receiver<()>,
) {
    // Log a failure when the link turns bad, not at every try.
    let mut healthy = true;
    loop {
        let result = match &registered {
            Some(r) => m
                .heartbeat(r.incarnation, pool_capacities(node))
                .map(|()| None),
            None => m
                .register(addresses, pool_capacities(node).unwrap_or_default())
                .map(Some),
        };
        let wait = match result {
            Ok(Some(r)) => {
                tracing::info!(node_id = %m.node_id, incarnation = r.incarnation, "registered with the control process");
                let wait = Duration::from_millis(r.heartbeat_interval_ms);
                registered = Some(r);
                healthy = true;
                wait
            }
            Ok(None) => {
                healthy = true;
                interval(&registered)
            }
            Err(MembershipError::Refused { status, .. })
                if registered.is_some() && (status == 410 || status == 404) =>
            {
                tracing::warn!(node_id = %m.node_id, "the control process dropped our lease; registering again");
                registered = None;
                Duration::ZERO
            }
            Err(e) => {
                if healthy {
                    tracing::warn!(error = %e, "control process");
                }
                healthy = false;
                RETRY_INTERVAL
            }
        };
        match stopped.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn interval(registered: &Option<RegisterResponse>) -> Duration {
    registered.as_ref().map_or(RETRY_INTERVAL, |r| {
        Duration::from_millis(r.heartbeat_interval_ms)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// A control process that answers one request with 200 and `{}`.
    /// It reads the whole request first: closing a socket with unread
    /// bytes sends a reset, which the client may see before the answer.
    fn answers_once() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            while !whole_request(&req) {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
                .unwrap();
        });
        url
    }

    /// Whether `req` holds a request's headers and its whole body.
    fn whole_request(req: &[u8]) -> bool {
        let Some(end) = req.windows(4).position(|w| w == b"\r\n\r\n") else {
            return false;
        };
        let head = String::from_utf8_lossy(&req[..end]).to_ascii_lowercase();
        let body: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        req.len() >= end + 4 + body
    }

    #[test]
    fn the_control_process_raises_epochs_only_as_far_as_a_replica_accepts() {
        assert_eq!(
            cairn_control_api::EPOCH_MAX,
            cairn_replication::proto::EPOCH_MAX
        );
    }

    #[test]
    fn a_control_process_that_cannot_be_reached_is_passed_over_for_the_next() {
        let gone = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let live = answers_once();
        let c = Controls::new(&format!("{gone},{live}"), REQUEST_TIMEOUT).unwrap();
        assert_eq!(c.url(), gone);
        let (url, res) = c.post_json("/v1/x", b"{}");
        assert_eq!((url, res.unwrap().status), (live.as_str(), 200));
        assert_eq!(
            c.url(),
            live,
            "the one that answered is tried first from now on"
        );
        // None answers: the error of the last one tried.
        let (url, res) = c.post_json("/v1/x", b"{}");
        assert_eq!(url, gone);
        assert!(res.is_err());
    }
}
