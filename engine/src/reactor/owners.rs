//! Completion routing on one core: owners (the submitters' completion queues) and the
//! completions posted to them. Every submitter registers an owner sized to its in-flight
//! limit; ring completions and synchronous bdevs post here, and the owner reaps on its next
//! poll, never re-entrantly.

use std::collections::VecDeque;

/// A completion queue on one core: whoever submits I/O registers as an owner and reaps its
/// completions from here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerId(pub(super) u32);

impl OwnerId {
    pub fn get(self) -> u32 {
        self.0
    }

    /// Rebuilds an id decoded from a ring completion's user_data.
    pub(crate) fn from_raw(id: u32) -> OwnerId {
        OwnerId(id)
    }
}

/// One finished request: the submitter's tag and the io_uring-style result (bytes moved, or a
/// negative errno). [`IoError::check`](crate::bdev::IoError::check) interprets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub tag: u32,
    pub res: i32,
}

#[derive(Debug, Default)]
pub(super) struct Owners {
    pub(super) queues: Vec<Option<VecDeque<Completion>>>,
    pub(super) free: Vec<u32>,
    pub(super) pending: usize,
}

impl Owners {
    pub(super) fn register(&mut self, capacity: usize) -> OwnerId {
        let queue = Some(VecDeque::with_capacity(capacity));
        match self.free.pop() {
            Some(id) => {
                self.queues[id as usize] = queue;
                OwnerId(id)
            }
            None => {
                let id = self.queues.len() as u32;
                assert!(
                    id < super::ring::OWNER_MAX,
                    "more than {} owners on one core",
                    super::ring::OWNER_MAX
                );
                self.queues.push(queue);
                OwnerId(id)
            }
        }
    }

    pub(super) fn release(&mut self, id: OwnerId) {
        let queue = self.queues[id.0 as usize]
            .take()
            .expect("owner released twice");
        assert!(queue.is_empty(), "owner released with completions unreaped");
        self.free.push(id.0);
    }

    #[inline]
    pub(super) fn post(&mut self, owner: u32, tag: u32, res: i32) {
        let queue = self.queues[owner as usize]
            .as_mut()
            .expect("completion for a released owner");
        queue.push_back(Completion { tag, res });
        self.pending += 1;
    }

    #[inline]
    pub(super) fn pop(&mut self, owner: OwnerId) -> Option<Completion> {
        let c = self.queues[owner.0 as usize].as_mut()?.pop_front()?;
        self.pending -= 1;
        Some(c)
    }
}
