//! Listeners, the export table and per-export statistics of the NBD server.

use crate::engine::{BdevHandle, Engine, EngineError};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Longest a client may take over negotiation before it is disconnected.
pub const HANDSHAKE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Clients negotiating at once; a client beyond this is disconnected at once (and logged), so a
/// flood of idle sockets cannot exhaust threads.
pub const HANDSHAKES_MAX_DEFAULT: usize = 64;
/// Upper bounds (µs) of the latency histogram buckets kept per export; the last is +Inf.
pub const LATENCY_BUCKETS_US: [u64; 14] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 250_000, 1_000_000,
    u64::MAX,
];

/// Where and how the server listens.
#[derive(Clone, Debug)]
pub struct NbdConfig {
    /// TCP listener (port 0 picks a free port; see [`NbdServer::tcp_addr`]).
    pub tcp: Option<SocketAddr>,
    /// Unix-socket listener; a stale socket file is replaced, a live one is an error.
    pub unix: Option<PathBuf>,
    pub handshake_timeout: Duration,
    pub handshakes_max: usize,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            tcp: Some(SocketAddr::from(([127, 0, 0, 1], 10809))),
            unix: None,
            handshake_timeout: HANDSHAKE_TIMEOUT_DEFAULT,
            handshakes_max: HANDSHAKES_MAX_DEFAULT,
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

/// A running NBD server. Dropping it without [`NbdServer::shutdown`] also shuts it down.
pub struct NbdServer {
    engine: Arc<Engine>,
}

impl NbdServer {
    /// Binds the configured listeners and starts accepting. A port that is taken or a live
    /// unix socket is an error naming the address.
    pub fn start(engine: Arc<Engine>, config: NbdConfig) -> Result<NbdServer, NbdError> {
        let _ = (&engine, config);
        unimplemented!("NBD server is being written")
    }

    /// The TCP address actually bound (the real port when the config asked for port 0).
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        unimplemented!()
    }

    /// Offers `bdev` as export `name` to new connections.
    pub fn add_export(
        &self,
        name: &str,
        bdev: &BdevHandle,
        options: ExportOptions,
    ) -> Result<(), NbdError> {
        let _ = (name, bdev, options, &self.engine);
        unimplemented!()
    }

    /// Stops offering `name`, disconnects its clients after their in-flight requests are
    /// answered, and returns once no connection uses the bdev (so it can be closed).
    pub fn remove_export(&self, name: &str) -> Result<(), NbdError> {
        let _ = name;
        unimplemented!()
    }

    pub fn exports(&self) -> Vec<ExportStatus> {
        unimplemented!()
    }

    /// Stops the listeners, lets every connection answer what it has in flight, closes them,
    /// and returns when all are gone (or after the drain limit, saying so in the log).
    pub fn shutdown(self) {
        unimplemented!()
    }
}
