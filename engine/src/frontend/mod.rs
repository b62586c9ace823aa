//! Frontends: how applications reach bdevs. Today NBD ([`nbd`]); ublk and NVMe/TCP later.
//!
//! A frontend owns its sockets and protocol state and drives bdev I/O through the reactors'
//! `Core::submit`, like any other submitter. It never touches a bdev channel directly.

pub mod nbd;
