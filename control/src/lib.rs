//! cairn-control: orchestration (membership, placement, failover), `cairnctl` and CSI.
//!
//! Today it holds `cairnctl`'s per-node commands: the generated client of the cairn-node
//! admin API ([`proto`]), the size parser of the command line ([`units`]) and the table
//! printer ([`table`]). The control process never touches the data path: it talks to
//! `cairn-node` through its admin API only, so this crate must never depend on the engine
//! (tests may, as a dev-dependency, to check that both sides agree).

pub mod table;
pub mod units;

/// The cairn-node admin API client, generated from `node/proto/admin.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("cairn.node.v1");
}
