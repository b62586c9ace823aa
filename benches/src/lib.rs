//! Criterion micro-benchmarks of the engine hot paths live in `benches/`: the message ring
//! (`msg_ring`), the DMA buffer pool (`buf_pool`) and a submit-to-completion round trip on the
//! null bdev through the public `IoQueue` (`null_submit`), and what TLS costs a replica write
//! frame against the cipher alone (`tls_record`).
//!
//! This library holds what they share: the short measurement settings that keep the whole
//! suite under a minute (`cargo bench -p cairn-benches`; add `-- --quick` for a smoke run). CPU
//! affinity comes from `cairn_engine::sys`, like everywhere else. It must never carry benchmark
//! logic of its own, so each bench file reads on its own.

use std::time::Duration;

/// Warm-up per benchmark: enough for caches, the branch predictor and the reactor's spin.
pub const WARM_UP_TIME: Duration = Duration::from_millis(500);
/// Measurement per benchmark; short so the suite stays quick, long enough for a stable mean.
pub const MEASUREMENT_TIME: Duration = Duration::from_secs(2);
/// Samples per benchmark (criterion's minimum is 10).
pub const SAMPLE_SIZE: usize = 20;

/// Criterion with the settings above, for every bench's `criterion_group!`.
pub fn config() -> criterion::Criterion {
    criterion::Criterion::default()
        .warm_up_time(WARM_UP_TIME)
        .measurement_time(MEASUREMENT_TIME)
        .sample_size(SAMPLE_SIZE)
}
