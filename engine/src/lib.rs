//! cairn-engine: Cairn's polled, per-core, shared-nothing I/O engine.
//!
//! Every module, what it owns and what it promises:
//!
//! * [`reactor`]: one pinned thread per core running a run-to-completion loop; nothing in it is
//!   shared with another core except lock-free rings, so its I/O path needs no lock.
//!   * [`reactor::ring`]: the io_uring glue (ring construction with flag fallback, the
//!     user_data encoding); every ring in the project, the perf baseline's included, is built
//!     here, so all run with the same kernel flags.
//!   * `owners`: completion routing to the submitters' completion queues, each sized to its
//!     in-flight limit; completions are reaped on the owner's next poll, never re-entrantly.
//!   * `core_ctx`: [`Core`] and [`reactor::IoCtx`], the core's state and the I/O context bdev
//!     channels get: ring, buffer pool, owners, channels, messages to other cores (fixed-size
//!     values on the data path, boxed closures on the control path only), core-local slots.
//!   * `timers`: delayed closures, earliest first; periodic work runs on them so an idle
//!     reactor sleeps until the next deadline.
//!   * `event_loop`: the loop itself (reap, messages, client queues, pollers, timers, sleep),
//!     the pollers and client-queue bridges, the idle policy and the busy/idle counters.
//! * [`msg`]: the bounded lock-free MPSC message ring and its eventfd doorbell; a full ring is
//!   back-pressure, and the doorbell costs a syscall only when the receiver is about to sleep.
//! * [`dma`]: huge-page (or page-aligned) regions and the per-core buffer pool carved from one;
//!   get and put never allocate, and only this module makes the [`dma::IoBuf`] views that
//!   reach io_uring.
//! * [`bdev`]: the block-device trait, per-core channels, request validation (once, before any
//!   channel) and the I/O error type; backends [`bdev::uring`] (file or device, O_DIRECT),
//!   [`bdev::malloc`], [`bdev::null`], [`bdev::fault`] (deterministic fault injection for
//!   tests), [`bdev::nbd`] (a remote NBD export, a simple client on its own thread) and
//!   [`bdev::crypt`] (AES-256-XTS encryption at rest, stacked on a volume or nexus at the
//!   front end so everything below it holds ciphertext).
//! * [`engine`]: the public, thread-agnostic API; control operations may allocate, the I/O
//!   path through a queue does not.
//!   * `config`: [`EngineConfig`], the default limits and [`EngineError`].
//!   * `lifecycle`: [`Engine`] start and stop, and the bdev registry giving each bdev a
//!     channel on every core.
//!   * `queue`: [`IoQueue`], fixed-size requests and completions in preallocated rings, with
//!     polled, blocking and async waits.
//! * [`sys`]: the operating-system calls every Cairn process shares (CPU affinity, process
//!   CPU time, `poll`, the doorbell eventfd, file locks, device geometry, randomness, free
//!   space), each written once; [`owner_only`]: the modes of the files and sockets Cairn
//!   creates (0700 directories, 0600 files and sockets) and their repair at start.
//! * [`volume`]: the thin-provisioned volume store (pools, volumes, snapshots, clones) on one
//!   bdev, consistent after a crash at any instant: [`volume::format`] (the on-disk bytes,
//!   version-guarded), [`volume::cluster`] (virtual and physical cluster indices as distinct
//!   types), [`volume::map`] (the lock-free cluster map), [`volume::meta`] (objects, refcounts,
//!   allocator, fsck), and the home-core runtime and per-core channel behind [`volume::Pool`].
//! * [`frontend`]: how applications reach bdevs; today the NBD server
//!   ([`frontend::nbd`]: negotiation on short-lived threads, [`frontend::nbd::proto`] the one
//!   NBD codec, each connection a poller on one reactor with bounded memory).
//! * [`core_list`]: core ids and the one core-list parser; [`units`]: the one human-size parser
//!   (`4G`).
//!
//! `unsafe` lives in the ring glue ([`reactor::ring`]), the DMA memory ([`dma`], which alone
//! makes the [`dma::IoBuf`] views that reach io_uring), [`sys`], and the bdevs' and frontends'
//! ring submissions; each block names the condition that makes it sound.
//!
//! The per-I/O path takes no lock, makes no heap allocation and touches no atomic that another
//! I/O path also writes; `parking_lot` appears only on control paths and in the fault bdev,
//! which is a test instrument.

pub mod bdev;
pub mod core_list;
pub mod dma;
pub mod engine;
pub mod frontend;
pub mod msg;
pub mod owner_only;
pub mod reactor;
pub mod sys;
pub mod units;
pub mod volume;

pub use bdev::{Bdev, BdevInfo, IoError, IoOp};
pub use core_list::{CoreId, CoreList};
pub use engine::{
    BdevHandle, BufId, Engine, EngineConfig, EngineError, IoQueue, QueueCompletion, ReactorTimes,
    Request,
};
pub use reactor::{Core, IdlePolicy, Poller, PollerState};
