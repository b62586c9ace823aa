//! The operating-system calls that every Cairn process shares, written once: CPU affinity
//! (which CPUs this process may use, pinning a thread to one or to a set), process CPU time
//! (`getrusage`), waiting for a socket to become readable (`poll`), the reactor doorbell's
//! eventfd, file locks and block-device geometry, kernel randomness, and free space.
//!
//! The engine, the daemon, the perf tool, the benchmarks and the tests call these instead of
//! `libc` so each call and its SAFETY argument exists in one place. It must never hold policy
//! (which core to pick, what to do when pinning fails): that stays with the caller.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// `ioctl` request: a block device's size in bytes (`u64`).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `ioctl` request: a block device's logical sector size (`int`).
const BLKSSZGET: libc::c_ulong = 0x1268;

/// The number of CPUs a `cpu_set_t` can name; higher ids are refused.
pub const CPU_SET_CAPACITY: u32 = libc::CPU_SETSIZE as u32;

/// The CPUs the calling thread may run on, lowest first.
pub fn affinity() -> std::io::Result<Vec<u32>> {
    // SAFETY: cpu_set_t is plain data; zeroed is its empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: passes a writable cpu_set_t of the size given; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((0..CPU_SET_CAPACITY)
        // SAFETY: the index is below CPU_SETSIZE and the set is initialised.
        .filter(|&c| unsafe { libc::CPU_ISSET(c as usize, &set) })
        .collect())
}

/// The CPUs this process may run on, lowest first (empty if the kernel will not say).
pub fn allowed_cpus() -> Vec<u32> {
    affinity().unwrap_or_default()
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: u32) -> std::io::Result<()> {
    set_affinity(&[cpu])
}

/// Restricts the calling thread to `cpus` (also how a saved [`affinity`] is restored). An
/// empty list or a CPU id of [`CPU_SET_CAPACITY`] or more is refused.
pub fn set_affinity(cpus: &[u32]) -> std::io::Result<()> {
    if cpus.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "CPU affinity needs at least one CPU",
        ));
    }
    // SAFETY: cpu_set_t is plain data; zeroed is its empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= CPU_SET_CAPACITY {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("CPU {cpu} is beyond the {CPU_SET_CAPACITY} a CPU set can name"),
            ));
        }
        // SAFETY: cpu < CPU_SETSIZE (checked above).
        unsafe { libc::CPU_SET(cpu as usize, &mut set) };
    }
    // SAFETY: passes a valid cpu_set_t of the size given; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// User plus system CPU time this whole process has used so far.
pub fn process_cpu_time() -> std::io::Result<Duration> {
    // SAFETY: rusage is plain data; zeroed is a valid value for getrusage to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: passes a pointer to a live rusage, which is all getrusage writes.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Ok(tv(usage.ru_utime) + tv(usage.ru_stime))
}

/// Waits up to `timeout` for `fd` to become readable (for a listener: a connection to accept).
/// Returns false on timeout. An interrupted wait counts as a timeout; callers loop anyway.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> std::io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.kind() {
            std::io::ErrorKind::Interrupted => Ok(false),
            _ => Err(e),
        };
    }
    Ok(n > 0)
}

/// A fresh non-blocking, close-on-exec eventfd with a zero counter.
pub fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; a negative return is checked below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd's counter, making it readable. EAGAIN (counter at its maximum) still
/// leaves it readable, which is all a wake-up needs, so the result is not checked.
#[inline]
pub fn eventfd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local; a bad fd is an error return, not UB.
    unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}

/// Resets a non-blocking eventfd's counter (a no-op when it is zero).
#[inline]
pub fn eventfd_drain(fd: RawFd) {
    let mut counter: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live local.
    unsafe { libc::read(fd, (&mut counter as *mut u64).cast(), 8) };
}

/// Takes a non-blocking exclusive `flock` on `fd`; fails with EWOULDBLOCK if another open file
/// description holds one.
pub fn lock_exclusive(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: flock takes no pointers.
    if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A block device's size in bytes and logical sector size.
pub fn block_device_geometry(fd: RawFd) -> std::io::Result<(u64, u32)> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points at a live local.
    if unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut sector: libc::c_int = 0;
    // SAFETY: BLKSSZGET writes one int through the pointer, which points at a live local.
    if unsafe { libc::ioctl(fd, BLKSSZGET, &mut sector) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((size, sector as u32))
}

/// Fills `out` from the kernel's random generator (blocking only until it is seeded at boot).
pub fn random_bytes(out: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < out.len() {
        let rest = &mut out[done..];
        // SAFETY: getrandom writes at most rest.len() bytes into `rest`.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
            continue;
        }
        done += n as usize;
    }
    Ok(())
}

/// Bytes an unprivileged user may still write on the file system holding `path`.
pub fn available_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("path {} holds a NUL byte", path.display()),
        )
    })?;
    // SAFETY: statvfs is plain data; zeroed is a valid value to be overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn affinity_round_trips_and_bad_cpus_are_refused() {
        let saved = affinity().expect("affinity");
        assert!(!saved.is_empty(), "a running thread has a CPU");
        pin_current_thread(saved[0]).expect("pin to an allowed CPU");
        assert_eq!(affinity().expect("affinity"), vec![saved[0]]);
        set_affinity(&saved).expect("restore");
        assert_eq!(affinity().expect("affinity"), saved);
        assert!(set_affinity(&[]).is_err());
        assert!(pin_current_thread(CPU_SET_CAPACITY).is_err());
    }

    #[test]
    fn process_cpu_time_moves_forward() {
        let before = process_cpu_time().expect("getrusage");
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(30) {
            std::hint::black_box(0u64);
        }
        assert!(process_cpu_time().expect("getrusage") >= before);
    }

    #[test]
    fn eventfd_signals_and_drains() {
        use std::os::fd::AsRawFd;
        let fd = eventfd().expect("eventfd");
        assert!(!wait_readable(fd.as_raw_fd(), Duration::ZERO).expect("poll"));
        eventfd_signal(fd.as_raw_fd());
        assert!(wait_readable(fd.as_raw_fd(), Duration::ZERO).expect("poll"));
        eventfd_drain(fd.as_raw_fd());
        assert!(!wait_readable(fd.as_raw_fd(), Duration::ZERO).expect("poll"));
    }

    #[test]
    fn random_bytes_fill_the_buffer_and_free_space_is_reported() {
        let mut a = [0u8; 64];
        random_bytes(&mut a).expect("getrandom");
        assert_ne!(a, [0u8; 64], "64 random bytes are not all zero");
        available_bytes(&std::env::temp_dir()).expect("statvfs of the temp dir");
    }
}
