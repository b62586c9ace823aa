//! libcairn: the engine's C ABI.
//!
//! The C ABI issue fills this crate with a cdylib/staticlib and a cbindgen header. It is empty
//! now so the workspace builds; it must never let a Rust panic unwind into C.
