//! cairn-control: orchestration (membership, placement, failover), `cairnctl` and CSI.
//!
//! Nothing lives here yet. The control process never touches the data path: it talks to
//! `cairn-node` through its admin API only, so this crate must never depend on the engine.
