//! A spawned `cairn-node`'s ready line (docs/node.md): waiting for it on the daemon's stdout
//! and reading its `key=value` fields. Shared by the daemon and replication tests.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::mpsc::RecvTimeoutError;
use std::time::Duration;

/// Waits up to `timeout` for the ready line on `child`'s piped stdout. A thread keeps
/// draining stdout after it, so the daemon never blocks on a full pipe.
pub fn wait_ready(child: &mut Child, timeout: Duration) -> Result<String, RecvTimeoutError> {
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if line.starts_with("cairn-node ready ") {
                drop(tx.send(line));
            }
        }
    });
    rx.recv_timeout(timeout)
}

/// The value of `key=` in a ready line; panics naming the line when it is missing.
pub fn field(line: &str, key: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("ready line lacks {key}=: {line}"))
        .to_string()
}
