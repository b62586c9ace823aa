//! What this process holds, read from /proc/self, for tests that open and close things many
//! times and check that nothing accumulates.

/// Open file descriptors and threads of this process.
pub fn fds_and_threads() -> (usize, usize) {
    let count = |dir: &str| {
        std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("reading {dir}: {e}"))
            .count()
    };
    (count("/proc/self/fd"), count("/proc/self/task"))
}
