//! Timers of one core: closures that run on the reactor after a delay, earliest first. They
//! are how periodic work runs without keeping the reactor awake: the reactor's sleep ends at
//! the next timer's deadline.

use super::core_ctx::Core;
use std::time::{Duration, Instant};

pub(super) type TimerFn = Box<dyn FnOnce(&mut Core) + Send>;

pub(super) struct Timer {
    pub(super) at: Instant,
    pub(super) seq: u64,
    pub(super) run: TimerFn,
}

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timer {
    // Reversed so the BinaryHeap pops the earliest timer first.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

impl Core {
    /// Runs `f` on this core after `delay`.
    pub fn after(&mut self, delay: Duration, f: impl FnOnce(&mut Core) + Send + 'static) {
        self.timer_seq += 1;
        self.timers.push(Timer {
            at: self.io.now + delay,
            seq: self.timer_seq,
            run: Box::new(f),
        });
    }

    pub(super) fn run_timers(&mut self) -> usize {
        let mut n = 0;
        while self.timers.peek().is_some_and(|t| t.at <= self.io.now) {
            let timer = self.timers.pop().expect("peeked");
            (timer.run)(self);
            n += 1;
        }
        n
    }
}
