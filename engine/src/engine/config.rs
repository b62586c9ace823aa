//! What the engine is told at start ([`EngineConfig`]), its default limits, and the errors
//! that starting it, adding bdevs and binding queues can report ([`EngineError`]).

use crate::bdev::BdevError;
use crate::core_list::{CoreId, CoreList};
use crate::msg::INBOX_CAPACITY_DEFAULT;
use crate::reactor::ring::RING_ENTRIES_DEFAULT;
use crate::reactor::IdlePolicy;
use std::time::Duration;

/// Default size of one DMA buffer: the largest single request a queue or poller can issue.
pub const BUF_SIZE_DEFAULT_BYTES: u32 = 128 << 10;
/// Default buffers per core (32 MiB with the default size).
pub const BUF_COUNT_DEFAULT: u32 = 256;
/// Deepest client queue; also bounds the request tag space of one queue.
pub const QUEUE_DEPTH_MAX: u32 = 4096;
/// How long a control request waits for a reactor's answer before reporting it stuck.
pub const CONTROL_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the engine needs at start.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub cores: CoreList,
    pub idle: IdlePolicy,
    pub buf_count: u32,
    pub buf_size_bytes: u32,
    /// Try 2 MiB huge pages for buffer pools; falls back to normal pages.
    pub huge_pages: bool,
    pub ring_entries: u32,
    pub inbox_capacity: usize,
}

impl EngineConfig {
    pub fn new(cores: CoreList) -> EngineConfig {
        EngineConfig {
            cores,
            idle: IdlePolicy::default(),
            buf_count: BUF_COUNT_DEFAULT,
            buf_size_bytes: BUF_SIZE_DEFAULT_BYTES,
            huge_pages: true,
            ring_entries: RING_ENTRIES_DEFAULT,
            inbox_capacity: INBOX_CAPACITY_DEFAULT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("core {core} does not exist or is not allowed for this process (allowed: {allowed})")]
    CoreUnavailable { core: CoreId, allowed: String },
    #[error("core {core}: creating its io_uring failed: {source}")]
    Ring {
        core: CoreId,
        source: std::io::Error,
    },
    #[error("core {core}: {source}")]
    Dma {
        core: CoreId,
        source: crate::dma::DmaError,
    },
    #[error("core {core}: {what}: {source}")]
    Os {
        core: CoreId,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("core {core}: bdev '{bdev}': {source}")]
    Bdev {
        core: CoreId,
        bdev: String,
        source: BdevError,
    },
    #[error("core {core}: only {available} free buffers, queue wants {wanted}")]
    PoolExhausted {
        core: CoreId,
        wanted: u32,
        available: u32,
    },
    #[error("core {core} is not one of this engine's cores")]
    NotEngineCore { core: CoreId },
    #[error("queue depth {depth} must be between 1 and {QUEUE_DEPTH_MAX}")]
    QueueDepth { depth: u32 },
    #[error("core {core}: the reactor did not answer within {CONTROL_REPLY_TIMEOUT:?}")]
    Stuck { core: CoreId },
    #[error("core {core}: the reactor has stopped")]
    Stopped { core: CoreId },
    #[error("bdev '{bdev}' (id {id}) was removed from the engine")]
    BdevRemoved { bdev: String, id: u32 },
}
