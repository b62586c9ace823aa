//! cairn-engine: Cairn's polled, per-core, shared-nothing I/O engine.
//!
//! * [`reactor`]: one pinned thread per core running a run-to-completion loop over its own
//!   io_uring, buffer pool, bdev channels, pollers, timers and message ring.
//! * [`msg`]: the bounded lock-free message ring and eventfd doorbell between cores.
//! * [`dma`]: huge-page (or page-aligned) buffer regions and the per-core buffer pool.
//! * [`bdev`]: the block-device trait and the uring, malloc, null and fault backends.
//! * [`engine`]: starting and stopping reactors, adding bdevs, and [`IoQueue`], the API any
//!   thread uses to submit I/O.
//! * [`sys`]: the operating-system calls every Cairn process shares (CPU affinity, process
//!   CPU time, `poll`, the doorbell eventfd, file locks, device geometry), each written once.
//! * [`volume`]: the thin-provisioned volume store (pools, volumes, snapshots) on one bdev.
//! * [`frontend`]: how applications reach bdevs; today the NBD server.
//! * [`core_list`]: core ids and the core-list syntax; [`units`]: human sizes (`4G`).
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
