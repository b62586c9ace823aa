//! Adaptive waiting (`IdlePolicy::Adaptive`): whether a reactor that found no work should spin
//! or wait in the kernel, and for how long.
//!
//! A spin costs the CPU it burns; a wait in the kernel costs a sleep and a wake-up (a few µs of
//! CPU, and as much added latency, more in a VM). So the reactor spins only when it expects
//! work within its spin budget, and otherwise sleeps until an event wakes it.
//!
//! The estimator is one number per reactor: an EWMA of the *idle gap*, the time from the first
//! loop iteration that found no work to the next one that found some (a completion, a message,
//! a client submission, a timer). It therefore covers every source of work at once: a device's
//! latency divided among what is in flight, a peer's replies on a socket, a client's next
//! request. Given the gap `g`, the spin budget `s` and the time `t` already spent idle:
//! - `g - s <= t <= g + s`: work is due within the budget: spin;
//! - `t < g - s` with at least [`EARLY_WAKE_MIN`] left before `g - s`: sleep with a timeout at
//!   `g - s` less the measured wake-up lateness, then spin for the rest (Linux's hybrid polling:
//!   sleep through most of the expected device time, poll near the end). This is what keeps a
//!   queue-depth-1 client's latency that of a spinning reactor;
//! - otherwise (the gap is short but not short enough to spin through, or the work is overdue):
//!   sleep until an event or deadline wakes the reactor, as a blocking io_uring loop does.
//!
//! A gap that included a sleep was lengthened by the wake-up, so its sample is shortened by the
//! wake-up lateness measured on timed sleeps (how late past its timeout a timed wait returns).
//! Without that, a device that sped up would keep being slept on. Gap samples are capped at
//! [`GAP_SAMPLE_MAX`] so one long quiet spell does not take many gaps to forget, and lateness
//! samples at 50 µs: a timed wait that returns later than that was preempted, and a lateness
//! of hundreds of µs (measured on the loaded 2-core VM before the cap) would cut every slept
//! gap to nothing and make the reactor spin.
//!
//! Limits: the gap is a mean over every source of work, so a reactor serving a fast and a slow
//! device at once paces by their mix; a burst after a quiet spell pays one wake-up per I/O until
//! the EWMA has caught up (some 2^[`EWMA_SHIFT`] samples); and work that arrives less regularly
//! than the budget (an unpaced client's messages) is slept on, which costs its latency one
//! wake-up. Everything here is integer arithmetic on values the reactor owns: no allocation.

use std::time::{Duration, Instant};

/// Default spin budget of `IdlePolicy::Adaptive`: about what one sleep and wake-up costs in
/// CPU, the point below which spinning is cheaper than sleeping.
pub const ADAPTIVE_SPIN_DEFAULT: Duration = Duration::from_micros(5);
/// A timed early wake-up costs one more wake-up; it is only worth taking when it saves at least
/// this much spinning.
pub const EARLY_WAKE_MIN: Duration = Duration::from_micros(10);
/// Longest idle gap one sample may report.
pub const GAP_SAMPLE_MAX: Duration = Duration::from_millis(1);
/// EWMA weight of a new sample: 1 / 2^EWMA_SHIFT.
pub const EWMA_SHIFT: u32 = 3;
/// Largest wake-up lateness one sample may report: a timed wait that returns much later was
/// preempted (another thread ran on the core), which says nothing about the wake-up itself.
const WAKE_LATE_SAMPLE_MAX: Duration = Duration::from_micros(50);
/// Wake-up lateness assumed until a timed sleep has measured it.
const WAKE_LATE_INITIAL: Duration = Duration::from_micros(2);

/// What an idle reactor does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    Spin,
    /// Wait in the kernel; with `Some(at)`, wake at `at` even without an event.
    Sleep(Option<Instant>),
}

/// The estimator of one reactor.
#[derive(Debug)]
pub(super) struct Pace {
    spin_ns: u64,
    gap_ns: u64,
    wake_late_ns: u64,
}

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn ewma(old: u64, sample: u64) -> u64 {
    old - (old >> EWMA_SHIFT) + (sample >> EWMA_SHIFT)
}

impl Pace {
    pub(super) fn new(spin: Duration) -> Pace {
        Pace {
            spin_ns: ns(spin),
            gap_ns: 0,
            wake_late_ns: ns(WAKE_LATE_INITIAL),
        }
    }

    /// The decision at an idle iteration at `now`, idle since `idle_since`.
    pub(super) fn step(&self, idle_since: Instant, now: Instant) -> Step {
        let idle = ns(now.saturating_duration_since(idle_since));
        let spin_from = self.gap_ns.saturating_sub(self.spin_ns);
        if idle >= spin_from && idle <= self.gap_ns.saturating_add(self.spin_ns) {
            return Step::Spin;
        }
        if idle < spin_from && spin_from - idle >= ns(EARLY_WAKE_MIN) {
            let sleep = (spin_from - idle).saturating_sub(self.wake_late_ns);
            return Step::Sleep(Some(now + Duration::from_nanos(sleep)));
        }
        Step::Sleep(None)
    }

    /// Records an idle gap that ended at `now`; `slept` says whether it included a wait that an
    /// event (not a timeout) ended, which lengthened it by a wake-up.
    pub(super) fn gap_ended(&mut self, idle_since: Instant, now: Instant, slept: bool) {
        let mut gap = ns(now.saturating_duration_since(idle_since)).min(ns(GAP_SAMPLE_MAX));
        if slept {
            gap = gap.saturating_sub(self.wake_late_ns);
        }
        self.gap_ns = ewma(self.gap_ns, gap);
    }

    /// Records a timed wait asked to end at `asked` that returned at `woke`.
    pub(super) fn woke(&mut self, asked: Instant, woke: Instant) {
        if woke >= asked {
            let late = ns(woke - asked).min(ns(WAKE_LATE_SAMPLE_MAX));
            self.wake_late_ns = ewma(self.wake_late_ns, late);
        }
    }

    #[cfg(test)]
    fn gap(&self) -> Duration {
        Duration::from_nanos(self.gap_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// Feeds `n` spun gaps of `gap`.
    fn trained(gap: Duration, n: usize) -> Pace {
        let mut p = Pace::new(ADAPTIVE_SPIN_DEFAULT);
        let t0 = Instant::now();
        for _ in 0..n {
            p.gap_ended(t0, t0 + gap, false);
        }
        p
    }

    #[test]
    fn a_fast_source_is_spun_on() {
        let p = trained(us(3), 64);
        let t0 = Instant::now();
        assert_eq!(p.step(t0, t0), Step::Spin);
        assert_eq!(p.step(t0, t0 + us(4)), Step::Spin);
        assert_eq!(
            p.step(t0, t0 + us(20)),
            Step::Sleep(None),
            "overdue work is slept on"
        );
    }

    #[test]
    fn a_slow_source_is_slept_on_with_an_early_wake() {
        let p = trained(us(100), 64);
        let t0 = Instant::now();
        let Step::Sleep(Some(at)) = p.step(t0, t0) else {
            panic!("expected a timed sleep, got {:?}", p.step(t0, t0));
        };
        let wake = at - t0;
        assert!(
            wake < p.gap() - ADAPTIVE_SPIN_DEFAULT,
            "wakes before the budget: {wake:?}"
        );
        assert!(
            wake > p.gap() / 2,
            "sleeps through most of the gap: {wake:?}"
        );
        assert_eq!(p.step(t0, t0 + p.gap()), Step::Spin);
    }

    #[test]
    fn a_gap_too_short_for_an_early_wake_sleeps_until_the_event() {
        let p = trained(us(12), 64);
        let t0 = Instant::now();
        assert_eq!(p.step(t0, t0), Step::Sleep(None));
    }

    #[test]
    fn sleeping_samples_lose_the_wake_up_lateness() {
        let mut p = Pace::new(ADAPTIVE_SPIN_DEFAULT);
        let t0 = Instant::now();
        for _ in 0..64 {
            p.woke(t0, t0 + us(6));
        }
        for _ in 0..64 {
            p.gap_ended(t0, t0 + us(8), true);
        }
        assert!(
            p.gap() < us(4),
            "a 2 µs source seen through 6 µs wake-ups: {:?}",
            p.gap()
        );
        assert_eq!(p.step(t0, t0), Step::Spin);
    }

    #[test]
    fn one_long_quiet_spell_is_capped() {
        let mut p = trained(us(3), 64);
        let t0 = Instant::now();
        p.gap_ended(t0, t0 + Duration::from_secs(10), true);
        assert!(p.gap() <= GAP_SAMPLE_MAX / 4, "{:?}", p.gap());
    }
}
