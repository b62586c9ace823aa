//! Test support shared by every crate's tests (a dev-dependency only): one place for what more
//! than one test binary needs, so each is written once.
//!
//! * [`skip`]: the one skip policy (whether a test may skip for want of a tool or privilege, and
//!   failing instead under CI). Its functions are re-exported here.
//! * [`alloc`]: a counting global allocator for the "no allocation per I/O" tests, counting only
//!   on threads a test marks (the engine's reactors) and recording where they allocated.
//! * [`proc_self`]: what this process holds (descriptors, threads), for tests that check that
//!   closing releases everything.

pub mod alloc;
pub mod proc_self;
pub mod skip;

pub use skip::*;
