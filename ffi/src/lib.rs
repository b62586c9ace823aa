//! libcairn: the engine's C ABI (`libcairn.so`, `libcairn.a`, `include/cairn.h`).
//!
//! This crate owns the boundary between C callers and the Rust engine. It must never let a Rust
//! panic unwind into C (every entry point runs inside [`error::guard`], which catches panics and
//! returns `CAIRN_E_PANIC`), never trust a pointer it can check (nulls, handle magics, closed
//! handles, buffer alignment are all refused with their own error code), and never add work per
//! I/O that the Rust API does not do: the asynchronous queue is a thin shell over
//! [`cairn_engine::IoQueue::submit_raw`], not a loop over the synchronous calls.
//!
//! * `error`: the stable error codes, `cairn_strerror`, the thread-local last error, the guard.
//! * `handle`: the opaque handle shell (magic, closed state) shared by every handle type.
//! * `engine`, `pool`, `volume`, `queue`: one module per handle type.
//!
//! The header is generated from this crate by cbindgen (`ffi/cbindgen.toml`), so the doc comments
//! on the `extern "C"` items are the C documentation; `tests/header.rs` fails when the committed
//! header drifts from the code.

// The C names are the API; Rust naming conventions do not apply to them.
#![allow(non_camel_case_types)]

pub mod engine;
pub mod error;
mod handle;
pub mod pool;
pub mod queue;
pub mod volume;

pub use engine::*;
pub use error::*;
pub use pool::*;
pub use queue::*;
pub use volume::*;
