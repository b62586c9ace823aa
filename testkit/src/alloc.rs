//! A counting global allocator for the tests that guard "no allocation per I/O".
//!
//! A test binary installs it (`#[global_allocator] static A: CountingAlloc = CountingAlloc;`)
//! and marks the threads whose allocations count, the engine's reactors, with
//! [`count_this_thread`] (from a control message run on each reactor). Each marked thread
//! belongs to a *side* (1 to [`SIDES`] - 1), so one binary can count two engines apart, say a
//! nexus's and its replica's. The test's own client threads allocate freely. The first
//! [`SITES_MAX`] counted allocations after [`mark`] keep their call stacks, which [`sites`]
//! returns for the failure message: a regression then names where it allocated.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Sides a thread can count for; side 0 means not counted.
pub const SIDES: usize = 3;
/// How many counted allocations keep their call stack after a [`mark`].
pub const SITES_MAX: usize = 4;

static COUNTED_ALLOCS: [AtomicU64; SIDES] = [const { AtomicU64::new(0) }; SIDES];
static SITES: Mutex<Vec<String>> = Mutex::new(Vec::new());

thread_local! {
    /// The side this thread counts for; 0 on unmarked threads.
    static SIDE: Cell<usize> = const { Cell::new(0) };
    /// Set while this thread records a call stack, whose own allocations are not counted.
    static RECORDING: Cell<bool> = const { Cell::new(false) };
}

/// The system allocator, counting the allocations of marked threads.
pub struct CountingAlloc;

impl CountingAlloc {
    fn note() {
        let side = SIDE.try_with(Cell::get).unwrap_or(0);
        if side == 0 || RECORDING.try_with(Cell::get).unwrap_or(true) {
            return;
        }
        COUNTED_ALLOCS[side].fetch_add(1, Ordering::Relaxed);
        RECORDING.set(true);
        let mut sites = SITES.lock().unwrap_or_else(|e| e.into_inner());
        if sites.len() < SITES_MAX {
            sites.push(std::backtrace::Backtrace::force_capture().to_string());
        }
        drop(sites);
        RECORDING.set(false);
    }
}

// SAFETY: every method forwards to the system allocator unchanged; counting touches atomics and
// const-initialised thread-locals, and recording a call stack (which allocates) runs with
// RECORDING set, so it never re-enters the recording.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::note();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::note();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::note();
        // SAFETY: forwarded with the caller's pointer, layout and size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Counts the calling thread's allocations for `side` (1 to `SIDES` - 1) from now on.
pub fn count_this_thread(side: usize) {
    assert!(
        (1..SIDES).contains(&side),
        "side {side} is not between 1 and {}",
        SIDES - 1
    );
    SIDE.with(|s| s.set(side));
}

/// The allocations counted for `side` so far.
pub fn counted(side: usize) -> u64 {
    COUNTED_ALLOCS[side].load(Ordering::Relaxed)
}

/// Starts a measurement: the allocations counted for `side` so far, with the recorded call
/// stacks forgotten, so [`sites`] shows those made after this call.
pub fn mark(side: usize) -> u64 {
    SITES.lock().unwrap_or_else(|e| e.into_inner()).clear();
    counted(side)
}

/// The call stacks of the first counted allocations since the last [`mark`], for a failure
/// message.
pub fn sites() -> String {
    SITES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .join("\n----\n")
}
