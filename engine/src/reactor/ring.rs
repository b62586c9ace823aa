//! The io_uring glue: ring construction with flag fallback, the user_data encoding that routes
//! completions, and the small wrapper a reactor (or a bdev channel with a private ring) drives.
//!
//! Every ring the project builds, the raw baseline in `cairn-perf` included, comes from
//! [`build_ring`], so the engine and the baseline always run with the same kernel flags.

use io_uring::{squeue, types, IoUring};
use std::io;
use std::time::Duration;

/// Default submission-queue size of a reactor ring. The completion queue is twice this.
pub const RING_ENTRIES_DEFAULT: u32 = 1024;
/// Registered-file slots per ring; opening more bdev channels on one core than this fails.
pub const RING_FILES_MAX: u32 = 256;

/// Optional ring modes, each a kernel flag that changes how the ring completes I/O.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingOptions {
    /// IORING_SETUP_IOPOLL: busy-poll the device for completions (O_DIRECT block devices that
    /// support polled queues only). Such a ring carries nothing but reads and writes.
    pub iopoll: bool,
    /// IORING_SETUP_SQPOLL with this idle time in ms: a kernel thread consumes submissions.
    pub sqpoll_idle_ms: Option<u32>,
    /// CPU for the SQPOLL kernel thread. Left unset, the thread inherits the creating
    /// reactor's single-CPU affinity and competes with it for that core.
    pub sqpoll_cpu: Option<u32>,
}

/// Which of the preferred task-run flags the kernel accepted, for the log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingSetup {
    pub single_issuer: bool,
    pub defer_taskrun: bool,
    pub coop_taskrun: bool,
}

impl std::fmt::Display for RingSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "single_issuer={} defer_taskrun={} coop_taskrun={}",
            self.single_issuer, self.defer_taskrun, self.coop_taskrun
        )
    }
}

/// Builds a ring with SINGLE_ISSUER, DEFER_TASKRUN and COOP_TASKRUN, dropping flags the kernel
/// (or the chosen options) refuse, most demanding first. Must run on the thread that will
/// submit, because SINGLE_ISSUER binds the ring to it.
pub fn build_ring(entries: u32, options: RingOptions) -> io::Result<(IoUring, RingSetup)> {
    const TRIES: [RingSetup; 5] = [
        RingSetup {
            single_issuer: true,
            defer_taskrun: true,
            coop_taskrun: true,
        },
        RingSetup {
            single_issuer: true,
            defer_taskrun: true,
            coop_taskrun: false,
        },
        RingSetup {
            single_issuer: true,
            defer_taskrun: false,
            coop_taskrun: true,
        },
        RingSetup {
            single_issuer: false,
            defer_taskrun: false,
            coop_taskrun: true,
        },
        RingSetup {
            single_issuer: false,
            defer_taskrun: false,
            coop_taskrun: false,
        },
    ];
    let mut last_err = None;
    for setup in TRIES {
        let mut builder = IoUring::builder();
        builder.setup_cqsize(entries * 2);
        if setup.single_issuer {
            builder.setup_single_issuer();
        }
        if setup.defer_taskrun {
            builder.setup_defer_taskrun();
        }
        if setup.coop_taskrun {
            builder.setup_coop_taskrun().setup_taskrun_flag();
        }
        if options.iopoll {
            builder.setup_iopoll();
        }
        if let Some(idle) = options.sqpoll_idle_ms {
            builder.setup_sqpoll(idle);
            if let Some(cpu) = options.sqpoll_cpu {
                builder.setup_sqpoll_cpu(cpu);
            }
        }
        match builder.build(entries) {
            Ok(ring) => {
                if !ring.params().is_feature_nodrop() {
                    return Err(io::Error::new(
                        io::ErrorKind::Unsupported,
                        "io_uring lacks IORING_FEAT_NODROP (kernel older than 5.5)",
                    ));
                }
                return Ok((ring, setup));
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last_err = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)))
}

/// What a completion belongs to, packed into the 64-bit user_data of its submission.
///
/// Layout: bits 63..56 kind, bits 55..32 owner (24 bits), bits 31..0 the owner's tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// A bdev I/O; the completion goes to `owner`'s completion queue with `tag`.
    Io { owner: u32, tag: u32 },
    /// The reactor's doorbell read finished: someone rang while it slept.
    Doorbell,
}

const KIND_SHIFT: u32 = 56;
const KIND_IO: u64 = 1;
const KIND_DOORBELL: u64 = 2;
/// Owners are numbered below this on each core.
pub const OWNER_MAX: u32 = 1 << 24;

impl Route {
    #[inline]
    pub fn encode(self) -> u64 {
        match self {
            Route::Io { owner, tag } => {
                debug_assert!(owner < OWNER_MAX);
                (KIND_IO << KIND_SHIFT) | (u64::from(owner) << 32) | u64::from(tag)
            }
            Route::Doorbell => KIND_DOORBELL << KIND_SHIFT,
        }
    }

    #[inline]
    pub fn decode(user_data: u64) -> Route {
        match user_data >> KIND_SHIFT {
            KIND_IO => Route::Io {
                owner: ((user_data >> 32) as u32) & (OWNER_MAX - 1),
                tag: user_data as u32,
            },
            KIND_DOORBELL => Route::Doorbell,
            kind => unreachable!("user_data kind {kind} was never submitted"),
        }
    }
}

/// A ring plus its bookkeeping: how many submissions await the kernel, how many I/Os are in
/// flight, and the sparse table of registered files.
pub struct Ring {
    uring: IoUring,
    setup: RingSetup,
    pending: u32,
    in_flight: u32,
    free_files: Vec<u32>,
    fixed_buffers: bool,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("setup", &self.setup)
            .field("pending", &self.pending)
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl Ring {
    pub fn new(entries: u32, options: RingOptions) -> io::Result<Ring> {
        let (uring, setup) = build_ring(entries, options)?;
        uring.submitter().register_files_sparse(RING_FILES_MAX)?;
        Ok(Ring {
            uring,
            setup,
            pending: 0,
            in_flight: 0,
            free_files: (0..RING_FILES_MAX).rev().collect(),
            fixed_buffers: false,
        })
    }

    pub fn setup(&self) -> RingSetup {
        self.setup
    }

    /// Registers `region` as fixed buffer 0. Returns false (and the ring keeps working with
    /// plain reads and writes) when the kernel refuses, typically RLIMIT_MEMLOCK for non-root.
    pub fn register_region(&mut self, region: &crate::dma::Region) -> io::Result<()> {
        let iov = [region.iovec()];
        // SAFETY: the region stays mapped for the ring's lifetime: both live in the reactor and
        // the reactor drops the ring before the pool that owns the region.
        unsafe { self.uring.submitter().register_buffers(&iov) }?;
        self.fixed_buffers = true;
        Ok(())
    }

    pub fn has_fixed_buffers(&self) -> bool {
        self.fixed_buffers
    }

    /// Puts `fd` in a free registered-file slot.
    pub fn register_file(&mut self, fd: i32) -> io::Result<u32> {
        let slot = self.free_files.pop().ok_or_else(|| {
            io::Error::other(format!(
                "all {RING_FILES_MAX} registered-file slots of this ring are in use"
            ))
        })?;
        match self.uring.submitter().register_files_update(slot, &[fd]) {
            Ok(_) => Ok(slot),
            Err(e) => {
                self.free_files.push(slot);
                Err(e)
            }
        }
    }

    pub fn unregister_file(&mut self, slot: u32) {
        // Clearing a slot can only fail on a bad slot number, which is a programming error.
        let cleared = self.uring.submitter().register_files_update(slot, &[-1]);
        debug_assert!(
            cleared.is_ok(),
            "unregistering file slot {slot}: {cleared:?}"
        );
        self.free_files.push(slot);
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// Queues one I/O submission. A full submission queue is flushed to the kernel first.
    ///
    /// # Safety
    /// Every buffer and file the entry names must stay valid until its completion is reaped.
    #[inline]
    pub unsafe fn push_io(&mut self, entry: squeue::Entry) {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.push(&entry) };
        self.in_flight += 1;
    }

    /// Queues a non-I/O submission (the doorbell read) that is not counted as in flight.
    ///
    /// # Safety
    /// As for [`Ring::push_io`].
    pub unsafe fn push_internal(&mut self, entry: squeue::Entry) {
        // SAFETY: forwarded from this function's contract.
        unsafe { self.push(&entry) };
    }

    /// # Safety
    /// As for [`Ring::push_io`].
    unsafe fn push(&mut self, entry: &squeue::Entry) {
        loop {
            // SAFETY: the caller guarantees the entry's buffers outlive its completion.
            if unsafe { self.uring.submission().push(entry) }.is_ok() {
                self.pending += 1;
                return;
            }
            self.enter(0, None);
        }
    }

    /// Hands queued submissions to the kernel and lets it post completions, without waiting.
    /// Does nothing when there is nothing queued and nothing in flight.
    #[inline]
    pub fn kick(&mut self) {
        if self.uring.params().is_setup_sqpoll() {
            // The kernel thread consumes submissions and posts completions itself; the crate's
            // submit enters the kernel only to wake that thread when it has gone idle.
            if let Err(e) = self.uring.submit() {
                panic!("io_uring submit (sqpoll) failed: {e}");
            }
            self.pending = 0;
        } else if self.pending > 0 || self.in_flight > 0 {
            self.enter(0, None);
        }
    }

    /// Submits and blocks until at least one completion arrives or `timeout` passes.
    pub fn wait(&mut self, timeout: Option<Duration>) {
        self.enter(1, timeout);
    }

    fn enter(&mut self, want: u32, timeout: Option<Duration>) {
        let submitter = self.uring.submitter();
        let result = match timeout {
            Some(t) => {
                let ts = types::Timespec::new()
                    .sec(t.as_secs())
                    .nsec(t.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                submitter.submit_with_args(want as usize, &args)
            }
            None => {
                let flags = io_uring::EnterFlags::GETEVENTS.bits();
                // SAFETY: no extended argument is passed, so the kernel reads no memory of ours
                // beyond the rings themselves.
                unsafe { submitter.enter::<libc::sigset_t>(self.pending, want, flags, None) }
            }
        };
        match result {
            Ok(_) => self.pending = 0,
            Err(e) => match e.raw_os_error() {
                Some(libc::ETIME) | Some(libc::EINTR) => self.pending = 0,
                // EBUSY/EAGAIN: the completion queue is backed up; reaping makes room.
                Some(libc::EBUSY) | Some(libc::EAGAIN) => {}
                _ => panic!("io_uring_enter failed: {e}"),
            },
        }
    }

    /// Drains the completion queue, calling `f` with each completion's route and result.
    #[inline]
    pub fn reap(&mut self, mut f: impl FnMut(Route, i32)) -> usize {
        let mut n = 0;
        let mut io_done = 0;
        for cqe in self.uring.completion() {
            let route = Route::decode(cqe.user_data());
            if matches!(route, Route::Io { .. }) {
                io_done += 1;
            }
            f(route, cqe.result());
            n += 1;
        }
        self.in_flight -= io_done;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_round_trip() {
        for route in [
            Route::Io { owner: 0, tag: 0 },
            Route::Io {
                owner: OWNER_MAX - 1,
                tag: u32::MAX,
            },
            Route::Doorbell,
        ] {
            assert_eq!(Route::decode(route.encode()), route);
        }
    }

    #[test]
    fn builds_a_ring_on_this_kernel() {
        let ring = Ring::new(64, RingOptions::default()).expect("io_uring is available");
        assert_eq!(ring.in_flight(), 0);
    }
}
