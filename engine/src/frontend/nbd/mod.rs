//! The NBD server: fixed-newstyle negotiation, then the transmission phase on the reactors.
//!
//! * [`proto`]: wire constants and the one place that encodes and decodes NBD messages.
//! * [`handshake`]: option haggling on a blocking socket, on a short-lived thread per client
//!   (bounded by [`NbdConfig::handshakes_max`], a per-source limit and a whole-negotiation
//!   deadline, enforced by [`super::admission`]), so a slow or hostile client in negotiation
//!   never occupies a reactor nor keeps other clients out.
//! * [`conn`]: one negotiated connection, a poller on one reactor. Requests are parsed from a
//!   per-connection receive buffer, split into bdev-sized chunks, and replied to in completion
//!   order (never serialised per connection).
//! * [`server`]: listeners, the export table and per-export statistics.
//!
//! TLS (`NBD_OPT_STARTTLS`, [`NbdTls`]): the handshake thread runs the TLS handshake on its
//! blocking socket; the rustls session then moves with the socket to the reactor, where
//! [`conn`] feeds it the ciphertext io_uring receives and sends what it encrypts, so a TLS
//! connection is driven exactly like a plain one (no thread of its own).
//!
//! It must never block a reactor, allocate per request in steady state, or let one client's
//! behaviour (not reading replies, half-sent requests) hold resources another client needs:
//! DMA buffers are held only while a bdev request is in flight.

pub mod conn;
pub mod handshake;
pub mod proto;
pub mod server;

pub use handshake::NbdTls;
pub use server::{
    ExportOptions, ExportStats, ExportStatus, NbdConfig, NbdError, NbdServer, LATENCY_BUCKETS_US,
};
