//! The engine handle and the public, thread-agnostic I/O API.
//!
//! [`Engine::start`] brings up one pinned reactor per configured core. Bdevs are added once and
//! get a channel on every core. Any thread submits I/O through an [`IoQueue`]: a queue is bound
//! to one bdev and one core, owns `depth` DMA buffers reserved from that core's pool, and
//! forwards requests over a lock-free ring to the reactor, which posts completions back over
//! another. Completions can be polled, waited for (blocking), or awaited (`wait_async`).
//!
//! Control operations (adding bdevs, binding queues, spawning pollers) are closures sent to a
//! reactor's inbox; they may allocate. The I/O path through a queue does not: requests and
//! completions are fixed-size values in preallocated rings, and the request slots and buffers
//! belong to the queue.
//!
//! * `config`: [`EngineConfig`], default limits and [`EngineError`].
//! * `lifecycle`: [`Engine`] start and stop, and the bdev registry.
//! * `queue`: [`IoQueue`], its requests and completions.

mod config;
mod lifecycle;
mod queue;

pub use config::*;
pub use lifecycle::*;
pub use queue::*;
