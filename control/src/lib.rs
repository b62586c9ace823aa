//! cairn-control: the control process (`cairn-control`) and the command line (`cairnctl`).
//!
//! * [`store`]: the cluster state behind one trait, on etcd or an embedded redb file;
//! * [`membership`]: node registration, leases and marking nodes down;
//! * [`insync`]: each volume's durable in-sync set, as its nexus reports it;
//! * [`election`]: which control process decides (a lease-backed key with compare-and-swap);
//! * [`volume`]: the volume records and the commands that write them; [`placement`]: which
//!   nodes hold a volume's replicas and where its nexus opens; [`reconcile`]: the leader's
//!   loop that brings the nodes to the records;
//! * [`csi`]: the CSI Identity and Controller services (`--csi-endpoint`), over the same
//!   volume commands;
//! * [`rest`]: the REST API (axum), its OpenAPI document and the Prometheus metrics;
//!   [`https`]: its listener, plain or mutual TLS;
//! * [`proto`], [`units`], [`table`]: `cairnctl`'s node commands over the cairn-node admin
//!   API, its size parser and table printer.
//!
//! The control process never touches the data path: it talks to `cairn-node` through its
//! admin API only, so this crate must never depend on the engine (tests may, as a
//! dev-dependency, to check that both sides agree). docs/control.md has the design.

pub mod csi;
pub mod election;
pub mod https;
pub mod insync;
pub mod membership;
pub mod placement;
pub mod reconcile;
pub mod rereplicate;
pub mod rest;
pub mod store;
pub mod table;
pub mod units;
pub mod volume;

/// The cairn-node admin API client, generated from `node/proto/admin.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("cairn.node.v1");
}
