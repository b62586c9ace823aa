//! cairn-node: the per-node data-plane daemon.
//!
//! It will compose the engine's reactors, pools and NBD frontend with the replica server and
//! expose the admin API. Until that issue lands it only reports that it is not yet a daemon,
//! so that nobody mistakes it for one.

fn main() -> std::process::ExitCode {
    eprintln!(
        "cairn-node {}: the daemon is not built yet; use `cairn-perf` to exercise the engine",
        env!("CARGO_PKG_VERSION")
    );
    std::process::ExitCode::from(2)
}
