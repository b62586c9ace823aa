//! cairn-replication: synchronous replication of engine volumes.
//!
//! This crate will own the replica wire protocol, the transport trait (TCP on the reactors,
//! RDMA later), the replica server, the nexus and resync. It is empty until the replication
//! issue lands; it exists now so the workspace layout matches DESIGN.md and every crate builds.
//! It must never reach a disk except through `cairn_engine` bdevs.
