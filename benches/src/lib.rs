//! Criterion micro-benchmarks of the engine hot paths live in `benches/`: the message ring
//! (`msg_ring`), the DMA buffer pool (`buf_pool`) and a submit-to-completion round trip on the
//! null bdev through the public `IoQueue` (`null_submit`).
//!
//! This library holds what they share: the short measurement settings that keep the whole
//! suite under a minute (`cargo bench -p cairn-benches`; add `-- --quick` for a smoke run), and
//! the CPU-affinity helpers the cross-core benchmarks need. It must never carry benchmark
//! logic of its own, so each bench file reads on its own.

use std::time::Duration;

/// Warm-up per benchmark: enough for caches, the branch predictor and the reactor's spin.
pub const WARM_UP_TIME: Duration = Duration::from_millis(500);
/// Measurement per benchmark; short so the suite stays quick, long enough for a stable mean.
pub const MEASUREMENT_TIME: Duration = Duration::from_secs(2);
/// Samples per benchmark (criterion's minimum is 10).
pub const SAMPLE_SIZE: usize = 20;

/// The CPUs this process may run on, lowest first.
pub fn allowed_cpus() -> Vec<u32> {
    affinity()
        .map(|set| {
            (0..libc::CPU_SETSIZE as u32)
                // SAFETY: c < CPU_SETSIZE and the set is initialised.
                .filter(|&c| unsafe { libc::CPU_ISSET(c as usize, &set) })
                .collect()
        })
        .unwrap_or_default()
}

/// The calling thread's CPU mask, to hand back to [`restore_affinity`] later.
pub fn affinity() -> std::io::Result<libc::cpu_set_t> {
    // SAFETY: cpu_set_t is plain data; zeroed is its empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: passes a valid cpu_set_t of the size given; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(set)
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: u32) -> std::io::Result<()> {
    assert!(
        (cpu as usize) < libc::CPU_SETSIZE as usize,
        "cpu {cpu} out of range"
    );
    // SAFETY: cpu_set_t is plain data; zeroed is its empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu < CPU_SETSIZE (asserted above).
    unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    restore_affinity(&set)
}

/// Sets the calling thread's CPU mask back to one saved by [`affinity`].
pub fn restore_affinity(set: &libc::cpu_set_t) -> std::io::Result<()> {
    // SAFETY: passes a valid cpu_set_t of the size given; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(set), set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
