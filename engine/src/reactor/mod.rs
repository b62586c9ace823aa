//! Reactors: one pinned thread per configured core, each a run-to-completion poll loop.
//!
//! A reactor owns everything its core touches on the I/O path: its io_uring with registered
//! files and fixed buffers ([`ring`]), its buffer pool, its bdev channels, its pollers and
//! timers, the completion queues of its owners, and the bridges of client queues bound to it.
//! Nothing here is shared with another core except the inbound message ring and the client
//! queues' submission/completion rings, which are lock-free. Code on another core reaches this
//! one only by sending a message: a data-path message is a fixed-size value (`Msg::Pool`),
//! a boxed closure (`Msg::Control`) is for the control path only. State a subsystem keeps on
//! one core (a pool's home state) lives in that core's local slots (`Core::with_local`),
//! reached only from the core itself, so it needs no lock.
//!
//! Idle policy: by default (`Adaptive`, see [`pace`]) a reactor that found no work spins only
//! while it expects work within its spin budget, and otherwise sleeps in `io_uring_enter` until
//! a completion, a doorbell, its next timer or the early wake-up it chose. `Sleep` spins for
//! `spin` after the last work and then sleeps; `Poll` never sleeps.
//!
//! Layout: `owners` routes completions, `pace` estimates when work is due, `core_ctx` holds the core's state and I/O context
//! (devices, messages, local slots), `timers` the delayed closures, and `event_loop` the
//! loop itself with its pollers and client-queue bridges.

pub mod ring;

mod core_ctx;
mod event_loop;
mod owners;
mod pace;
mod timers;

pub use core_ctx::{BdevId, Core, IoCtx};
pub(crate) use core_ctx::{LocalSlot, Msg, Peer};
pub use event_loop::{
    IdlePolicy, Poller, PollerState, ReactorTimesCell, INBOX_BATCH_MAX, QUEUE_BATCH_MAX,
    SHUTDOWN_DRAIN_MAX, SPIN_DEFAULT,
};
pub(crate) use event_loop::{QueueEntry, QueueShared, Reactor};
pub use owners::{Completion, OwnerId};
pub use pace::{ADAPTIVE_SPIN_DEFAULT, EARLY_WAKE_MIN, EWMA_SHIFT, GAP_SAMPLE_MAX};
