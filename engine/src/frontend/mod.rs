//! Frontends: how applications reach bdevs. Today NBD ([`nbd`]); ublk and NVMe/TCP later.
//!
//! A frontend owns its sockets and protocol state and drives bdev I/O through the reactors'
//! `Core::submit`, like any other submitter. It never touches a bdev channel directly.
//!
//! [`admission`] is the one policy for peers still negotiating (a whole-negotiation deadline,
//! per-source and global limits with eviction, rate-limited refusal logs), used by the NBD
//! server and by the replica server.

pub mod admission;
pub mod nbd;
