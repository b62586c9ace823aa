//! The inbound message ring of a reactor: a bounded, lock-free MPSC queue plus an eventfd
//! doorbell that wakes the reactor only when it is asleep.
//!
//! Any thread may send; only the owning reactor receives. A full ring is back-pressure: `send`
//! hands the message back and the caller decides whether to retry or fail. The doorbell costs a
//! syscall only when the reactor has announced it is about to sleep, so a busy reactor receives
//! messages with no kernel involvement at all.

use crossbeam_queue::ArrayQueue;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// Default capacity of a reactor's control-message ring. Senders see `Full` beyond it.
pub const INBOX_CAPACITY_DEFAULT: usize = 4096;

/// A bounded multi-producer, single-consumer ring with a sleep-aware doorbell.
#[derive(Debug)]
pub struct MsgRing<T> {
    queue: ArrayQueue<T>,
    doorbell: Doorbell,
}

/// Why a message could not be queued; the message comes back so nothing is lost.
#[derive(Debug)]
pub struct Full<T>(pub T);

impl<T> MsgRing<T> {
    pub fn new(capacity: usize) -> std::io::Result<MsgRing<T>> {
        Ok(MsgRing {
            queue: ArrayQueue::new(capacity.max(1)),
            doorbell: Doorbell::new()?,
        })
    }

    /// Queues `msg` and rings the doorbell if the receiver sleeps.
    #[inline]
    pub fn send(&self, msg: T) -> Result<(), Full<T>> {
        self.queue.push(msg).map_err(Full)?;
        self.doorbell.ring_if_sleeping();
        Ok(())
    }

    #[inline]
    pub fn recv(&self) -> Option<T> {
        self.queue.pop()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn doorbell(&self) -> &Doorbell {
        &self.doorbell
    }
}

/// An eventfd plus the receiver's "I am about to sleep" flag.
///
/// The receiver sets the flag, re-checks every source of work, and only then blocks on the
/// eventfd; a sender publishes its work and then reads the flag. Both sides use SeqCst so one of
/// them always sees the other (the Dekker pattern), and no wake-up is lost.
#[derive(Debug)]
pub struct Doorbell {
    fd: OwnedFd,
    sleeping: AtomicBool,
}

impl Doorbell {
    pub fn new() -> std::io::Result<Doorbell> {
        Ok(Doorbell {
            fd: crate::sys::eventfd()?,
            sleeping: AtomicBool::new(false),
        })
    }

    /// Called by the receiver before its last check for work ahead of sleeping.
    pub fn announce_sleep(&self) {
        self.sleeping.store(true, Ordering::SeqCst);
    }

    /// Called by the receiver once awake (or when it decides not to sleep after all).
    pub fn announce_awake(&self) {
        self.sleeping.store(false, Ordering::SeqCst);
    }

    /// Called by a sender after publishing work.
    #[inline]
    pub fn ring_if_sleeping(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            self.ring();
        }
    }

    /// Writes the eventfd unconditionally.
    pub fn ring(&self) {
        crate::sys::eventfd_signal(self.fd.as_raw_fd());
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_ring_hands_the_message_back() {
        let ring = MsgRing::new(2).unwrap();
        ring.send(1).unwrap();
        ring.send(2).unwrap();
        let Full(back) = ring.send(3).unwrap_err();
        assert_eq!(back, 3);
        assert_eq!(ring.recv(), Some(1));
        assert_eq!(ring.recv(), Some(2));
        assert_eq!(ring.recv(), None);
    }
}
