//! Admission of peers that have connected but not yet negotiated: the one policy, shared by
//! the NBD server and the replica server, that keeps a slow or hostile peer from locking
//! everyone else out while it holds a negotiation open.
//!
//! What it owns, and what happens at each limit:
//! * **A deadline for the whole negotiation** ([`AdmissionLimits::deadline`]), not per read:
//!   a peer that sends one byte every few seconds is cut off when the deadline passes.
//!   [`Admission::sweep`], called by the accept loop at least every 100 ms, shuts down the
//!   socket of every negotiation past it, which ends the blocked read on its thread.
//! * **Per source address** ([`AdmissionLimits::per_source_max`]): a newcomer from a source
//!   that already holds that many negotiations evicts that source's *oldest* negotiation.
//! * **Globally** ([`AdmissionLimits::negotiating_max`]): a newcomer when that many are
//!   negotiating evicts the oldest negotiation of the source holding the most. So one source
//!   can never keep another out: it can at most take room from itself.
//!
//! Eviction rather than refusal is what lets a legitimate client in when every peer has the
//! same source (loopback, or clients behind one NAT): an attacker's sockets are the old ones,
//! a real client negotiates in milliseconds, so the newcomer gets the slot and finishes long
//! before enough newer sockets arrive to evict it. An attacker that opens sockets faster than
//! a client negotiates can still delay it; that is a rate problem for a firewall, not
//! something that a per-connection limit can solve. Evicted negotiations' threads end within
//! moments, but to bound threads even against a connect flood, a newcomer is refused outright
//! while [`AdmissionLimits::negotiating_max`] × [`EVICTED_SLACK`] negotiations (live and
//! evicted) remain.
//!
//! Refusals, evictions and expiries are logged rate-limited: the first in each
//! [`SUMMARY_PERIOD`] with its peer, then one summary line ("N connections refused, M
//! negotiations evicted, K past the deadline in the last 10 s"), so a flood cannot fill the
//! disk with log.
//!
//! It never touches a socket except through the [`Cancel`] its caller hands in, and never
//! blocks except on its own short lock.

use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long the refusal log counts before it writes a summary line.
pub const SUMMARY_PERIOD: Duration = Duration::from_secs(10);
/// Negotiations, live and evicted-but-not-yet-ended, that may exist per allowed live one;
/// beyond, newcomers are refused (this bounds handshake threads under a connect flood).
pub const EVICTED_SLACK: usize = 2;

/// Shuts a negotiating peer's socket down so its blocked read or write fails at once. It
/// must act on the socket only (a `shutdown` of a duplicated fd, say), never close the fd
/// the negotiation uses.
pub type Cancel = Box<dyn Fn() + Send + Sync>;

/// The limits of one listener's negotiations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Negotiations at once, over all sources. At the limit a newcomer evicts the oldest
    /// negotiation of the source holding the most.
    pub negotiating_max: usize,
    /// Negotiations one source address may hold. At the limit a newcomer from it evicts that
    /// source's oldest.
    pub per_source_max: usize,
    /// Longest a whole negotiation may take; past it the socket is shut down.
    pub deadline: Duration,
}

/// Why a peer was turned away, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Event {
    Refused,
    Evicted,
    Expired,
}

struct Entry {
    source: String,
    started: Instant,
    cancel: Cancel,
    /// Shut down (evicted or expired); the entry stays until its ticket is dropped, so the
    /// thread still running counts against [`EVICTED_SLACK`].
    cancelled: bool,
}

/// Counts of what was turned away in the current [`SUMMARY_PERIOD`].
struct RefusalLog {
    since: Instant,
    counts: [u64; 3],
}

struct State {
    next_id: u64,
    /// By admission order: the first entry of a source is its oldest.
    entries: BTreeMap<u64, Entry>,
    /// Live (not cancelled) negotiations per source.
    per_source: HashMap<String, usize>,
    live: usize,
    log: RefusalLog,
}

/// The negotiations of one listener (or of all listeners of one server).
pub struct Admission {
    /// Names the server in log lines ("NBD", "replica").
    what: &'static str,
    limits: AdmissionLimits,
    state: Mutex<State>,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("what", &self.what)
            .field("limits", &self.limits)
            .finish()
    }
}

/// One admitted negotiation. Dropping it ends the negotiation's bookkeeping; it must be
/// dropped before the socket is handed on (after which a cancel must not reach it) or closed.
pub struct Ticket {
    admission: Arc<Admission>,
    id: u64,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("id", &self.id).finish()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut st = self.admission.state.lock();
        if let Some(e) = st.entries.remove(&self.id) {
            if !e.cancelled {
                st.forget_live(&e.source);
            }
        }
    }
}

/// The source address of a peer named `ip:port`; a peer without one (a unix socket) is its
/// own name, so all unix-socket peers share one source.
pub fn source_of(peer: &str) -> String {
    peer.parse::<SocketAddr>()
        .map_or_else(|_| peer.to_string(), |a| a.ip().to_string())
}

impl State {
    fn forget_live(&mut self, source: &str) {
        self.live -= 1;
        if let Some(n) = self.per_source.get_mut(source) {
            *n -= 1;
            if *n == 0 {
                self.per_source.remove(source);
            }
        }
    }

    /// Shuts down negotiation `id` and stops counting it as live.
    fn cancel(&mut self, id: u64) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        if e.cancelled {
            return;
        }
        e.cancelled = true;
        (e.cancel)();
        let source = e.source.clone();
        self.forget_live(&source);
    }

    fn oldest_of(&self, source: &str) -> Option<u64> {
        self.entries
            .iter()
            .find(|(_, e)| !e.cancelled && e.source == source)
            .map(|(&id, _)| id)
    }

    /// Which negotiation a newcomer from `source` displaces, if any.
    fn victim(&self, source: &str, limits: &AdmissionLimits) -> Option<u64> {
        if self.per_source.get(source).copied().unwrap_or(0) >= limits.per_source_max {
            return self.oldest_of(source);
        }
        if self.live >= limits.negotiating_max {
            let (biggest, _) = self.per_source.iter().max_by_key(|(_, &n)| n)?;
            return self.oldest_of(biggest);
        }
        None
    }
}

impl RefusalLog {
    /// Counts one event; the first of a period is logged with its peer.
    fn note(&mut self, what: &'static str, now: Instant, event: Event, peer: &str) {
        self.flush(what, now);
        if self.counts.iter().all(|&c| c == 0) {
            self.since = now;
            let why = match event {
                Event::Refused => "connection refused: too many connections",
                Event::Evicted => "negotiation evicted to make room for a newer peer",
                Event::Expired => "negotiation cut off at its deadline",
            };
            tracing::warn!(server = what, peer, "{why}; further ones are summarised");
        }
        self.counts[event as usize] += 1;
    }

    /// Writes the summary of a period that has ended, beyond the one event already logged.
    fn flush(&mut self, what: &'static str, now: Instant) {
        let total: u64 = self.counts.iter().sum();
        if total == 0 || now.saturating_duration_since(self.since) < SUMMARY_PERIOD {
            return;
        }
        if total > 1 {
            let [refused, evicted, expired] = self.counts;
            tracing::warn!(
                server = what,
                "{refused} connections refused, {evicted} negotiations evicted, {expired} \
                 negotiations past the deadline in the last {} s",
                SUMMARY_PERIOD.as_secs()
            );
        }
        self.counts = [0; 3];
    }
}

impl Admission {
    /// A new, empty admission for the server named `what` in log lines.
    pub fn new(what: &'static str, limits: AdmissionLimits) -> Arc<Admission> {
        assert!(
            limits.negotiating_max > 0 && limits.per_source_max > 0,
            "admission limits must allow one negotiation: {limits:?}"
        );
        Arc::new(Admission {
            what,
            limits,
            state: Mutex::new(State {
                next_id: 0,
                entries: BTreeMap::new(),
                per_source: HashMap::new(),
                live: 0,
                log: RefusalLog {
                    since: Instant::now(),
                    counts: [0; 3],
                },
            }),
        })
    }

    pub fn limits(&self) -> &AdmissionLimits {
        &self.limits
    }

    /// Admits `peer` (`ip:port`, or a name for a unix socket), evicting an older negotiation
    /// when a limit is reached; None (logged) only under a connect flood, see
    /// [`EVICTED_SLACK`].
    pub fn admit(self: &Arc<Self>, peer: &str, cancel: Cancel) -> Option<Ticket> {
        let source = source_of(peer);
        let now = Instant::now();
        let mut st = self.state.lock();
        if st.entries.len() >= self.limits.negotiating_max * EVICTED_SLACK {
            st.log.note(self.what, now, Event::Refused, peer);
            return None;
        }
        if let Some(id) = st.victim(&source, &self.limits) {
            st.cancel(id);
            st.log.note(self.what, now, Event::Evicted, peer);
        }
        let id = st.next_id;
        st.next_id += 1;
        *st.per_source.entry(source.clone()).or_insert(0) += 1;
        st.live += 1;
        st.entries.insert(
            id,
            Entry {
                source,
                started: now,
                cancel,
                cancelled: false,
            },
        );
        Some(Ticket {
            admission: self.clone(),
            id,
        })
    }

    /// Logs (rate-limited) a peer turned away by a limit of the caller's, such as a cap on
    /// connections.
    pub fn refuse(&self, peer: &str) {
        self.state
            .lock()
            .log
            .note(self.what, Instant::now(), Event::Refused, peer);
    }

    /// Cuts off every negotiation past its deadline and writes a due log summary. The accept
    /// loop calls it at least every 100 ms.
    pub fn sweep(&self) {
        let now = Instant::now();
        let mut st = self.state.lock();
        let expired: Vec<u64> = st
            .entries
            .iter()
            .filter(|(_, e)| {
                !e.cancelled && now.saturating_duration_since(e.started) >= self.limits.deadline
            })
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            let source = st.entries[&id].source.clone();
            st.cancel(id);
            st.log.note(self.what, now, Event::Expired, &source);
        }
        st.log.flush(self.what, now);
    }

    /// Cuts off every negotiation (the server is stopping).
    pub fn cancel_all(&self) {
        let mut st = self.state.lock();
        let ids: Vec<u64> = st.entries.keys().copied().collect();
        for id in ids {
            st.cancel(id);
        }
    }

    /// Negotiations not cut off.
    pub fn negotiating(&self) -> usize {
        self.state.lock().live
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn counter() -> (Arc<AtomicUsize>, impl Fn() -> Cancel) {
        let n = Arc::new(AtomicUsize::new(0));
        let make = {
            let n = n.clone();
            move || -> Cancel {
                let n = n.clone();
                Box::new(move || {
                    n.fetch_add(1, Ordering::Relaxed);
                })
            }
        };
        (n, make)
    }

    fn limits() -> AdmissionLimits {
        AdmissionLimits {
            negotiating_max: 4,
            per_source_max: 2,
            deadline: Duration::from_secs(3600),
        }
    }

    #[test]
    fn a_source_at_its_limit_evicts_its_own_oldest() {
        let a = Admission::new("test", limits());
        let (cancels, make) = counter();
        let first = a.admit("10.0.0.1:1", make()).unwrap();
        let _second = a.admit("10.0.0.1:2", make()).unwrap();
        let _other = a.admit("10.0.0.2:1", make()).unwrap();
        assert_eq!(cancels.load(Ordering::Relaxed), 0);
        let _third = a.admit("10.0.0.1:3", make()).unwrap();
        assert_eq!(
            cancels.load(Ordering::Relaxed),
            1,
            "the oldest of 10.0.0.1 evicted"
        );
        assert_eq!(a.negotiating(), 3);
        drop(first);
        assert_eq!(
            a.negotiating(),
            3,
            "an evicted ticket was no longer counted"
        );
    }

    #[test]
    fn a_full_server_evicts_from_the_biggest_source() {
        let a = Admission::new("test", limits());
        let (cancels, make) = counter();
        let tickets: Vec<_> = ["1.1.1.1:1", "1.1.1.1:2", "2.2.2.2:1", "3.3.3.3:1"]
            .iter()
            .map(|p| a.admit(p, make()).unwrap())
            .collect();
        let _new = a.admit("4.4.4.4:1", make()).unwrap();
        assert_eq!(cancels.load(Ordering::Relaxed), 1);
        assert_eq!(a.negotiating(), 4);
        let st = a.state.lock();
        assert!(
            st.entries[&0].cancelled,
            "the oldest of the biggest source went"
        );
        drop(st);
        drop(tickets);
        assert_eq!(a.negotiating(), 1);
    }

    #[test]
    fn deadline_cuts_off_and_a_flood_is_refused() {
        let mut l = limits();
        l.deadline = Duration::ZERO;
        let a = Admission::new("test", l);
        let (cancels, make) = counter();
        let held: Vec<_> = (0..8)
            .map(|i| a.admit(&format!("9.9.9.9:{i}"), make()).unwrap())
            .collect();
        assert!(
            a.admit("9.9.9.9:99", make()).is_none(),
            "live and evicted negotiations are bounded"
        );
        a.sweep();
        assert_eq!(a.negotiating(), 0);
        assert_eq!(cancels.load(Ordering::Relaxed), 8);
        drop(held);
        assert!(a.admit("9.9.9.9:100", make()).is_some());
    }

    #[test]
    fn sources_are_addresses_without_ports() {
        assert_eq!(source_of("127.0.0.1:4000"), "127.0.0.1");
        assert_eq!(source_of("[::1]:4000"), "::1");
        assert_eq!(source_of("unix"), "unix");
    }
}
