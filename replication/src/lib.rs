//! cairn-replication: synchronous replication of engine volumes.
//!
//! Today this crate owns the replica wire protocol ([`proto`]): the one message enum a nexus
//! and its replicas exchange, its fixed 64-byte little-endian header with volume id, epoch and
//! crc32c, and the version constant a test guards. The format is drawn in `docs/formats.md`
//! ("Replica protocol").
//!
//! Later changes add, in this order of dependency: the transport trait (TCP on the reactors,
//! with no TCP type crossing the trait so RDMA can follow), the replica server that cairn-node
//! hosts, the nexus (writes to every in-sync replica, epoch fencing, faulting), and resync and
//! rebuild. None of that exists yet. The crate must never reach a disk except through
//! `cairn_engine` bdevs, and [`proto`] never touches a socket.

pub mod epoch;
pub mod nexus;
pub mod proto;
pub mod replica;
pub mod server;
pub mod transport;
