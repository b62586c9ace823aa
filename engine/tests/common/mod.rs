//! Helpers shared by the engine's integration tests: picking cores this process may use,
//! starting a small engine, temp files that remove themselves, and a tiny deterministic PRNG.
//!
//! Helpers never assert on timing; a slow or loaded machine must not fail a test.

// Each test binary compiles this module on its own and uses only some of the helpers.
#![allow(dead_code)]

use cairn_engine::{CoreId, CoreList, Engine, EngineConfig};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Buffers per core in test engines: enough for two depth-32 queues plus slack, and small
/// enough that many engines can run in parallel test threads.
pub const TEST_BUF_COUNT: u32 = 96;

/// The first `count` allowed cores, or as many as exist (at least one).
pub fn cores(count: usize) -> CoreList {
    let cpus = cairn_engine::sys::allowed_cpus();
    let picked: Vec<String> = cpus.iter().take(count).map(u32::to_string).collect();
    CoreList::parse(&picked.join(",")).expect("allowed cpus form a valid core list")
}

pub fn core_ids(list: &CoreList) -> Vec<CoreId> {
    list.as_slice().to_vec()
}

/// A test engine config: default idle policy and buffer size, fewer buffers.
pub fn config(cores: CoreList) -> EngineConfig {
    let mut config = EngineConfig::new(cores);
    config.buf_count = TEST_BUF_COUNT;
    config
}

pub fn start(cores: CoreList) -> Engine {
    Engine::start(config(cores)).expect("engine starts")
}

/// A file under the system temp dir with a name no other test (or test run) uses; removed
/// on drop.
pub struct TempFile {
    path: PathBuf,
}

impl TempFile {
    /// Creates a zero-filled file of `size_bytes`.
    pub fn new(tag: &str, size_bytes: u64) -> TempFile {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!(
            "cairn-test-{tag}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let path = std::env::temp_dir().join(name);
        let file = std::fs::File::create(&path).expect("create temp file");
        file.set_len(size_bytes).expect("size temp file");
        TempFile { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        drop(std::fs::remove_file(&self.path));
    }
}

/// xorshift64*: deterministic, seedable, and good enough to scatter offsets and fill data.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // A zero state would stay zero forever.
        Rng((seed ^ 0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    pub fn fill(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Compares two byte ranges and reports the first differing offset, not a megabyte dump.
#[track_caller]
pub fn assert_same(what: &str, base_offset_bytes: u64, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at device offset {} (got {:#04x}, want {:#04x})",
            base_offset_bytes + i as u64,
            got[i],
            want[i]
        );
    }
}

/// Runs `f` on its own thread and fails the test if it has not returned within `limit`, so a
/// hang shows up as a failure naming `what` instead of a stuck test run. The limit is a
/// deadlock detector, not a performance bound: keep it many times the expected duration.
#[track_caller]
pub fn within<T: Send + 'static>(
    limit: std::time::Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || drop(tx.send(f())));
    match rx.recv_timeout(limit) {
        Ok(v) => {
            worker.join().expect("worker finished");
            v
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what} did not return within {limit:?}")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the worker sends before it returns"),
        },
    }
}
