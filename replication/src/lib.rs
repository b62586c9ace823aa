//! cairn-replication: synchronous replication of engine volumes.
//!
//! * [`proto`]: the one message enum a nexus and its replicas exchange, its fixed 64-byte
//!   little-endian header with volume id, epoch and crc32c, and the version constant a test
//!   guards (`docs/formats.md`, "Replica protocol").
//! * [`transport`]: the transport trait (blocking connect/accept/handshake, then a reactor
//!   driven connection) and TCP over the reactors' io_uring. No TCP type crosses the trait.
//! * [`epoch`], [`generation`], [`opener`] and [`replica`]: the replicas a node hosts, their
//!   durable epoch fences, their data generation records and the node assigned to open each.
//! * [`server`]: the replica server cairn-node runs.
//! * [`nexus`]: the volume's front on its attach node: fan-out writes, local-first reads,
//!   faulting, dirty-region maps, resync and rebuild, and the manager behind the admin API.
//!
//! The crate never reaches a disk except through `cairn_engine` bdevs, and [`proto`] never
//! touches a socket. The rules and their arguments are in `docs/replication.md`.

pub mod epoch;
pub mod generation;
pub mod nexus;
pub mod opener;
pub mod proto;
pub mod replica;
pub mod server;
pub mod transport;
