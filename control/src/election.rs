//! Which control process decides: leader election on the store, with a lease-backed key and
//! compare-and-swap (the same scheme as etcd's own election API, written against [`Store`] so
//! that the embedded store runs the same code).
//!
//! A candidate whose round finds [`LEADER_KEY`] absent grants a lease and writes the key with
//! it in a transaction that requires the key to still be absent; exactly one candidate's
//! transaction succeeds. The leader renews its lease every [`ELECTION_INTERVAL`]; when it
//! dies, the lease expires after [`LEADER_LEASE_TTL_S`], etcd deletes the key, and the next
//! round of another candidate takes over. A leader whose renewal fails steps down at once.
//!
//! Stepping down in memory is not enough to keep a paused old leader from acting, so every
//! decision a leader writes carries a check that the leader key still has the revision it had
//! when this process won ([`Leadership::revision`]): a deposed leader's writes fail in the
//! store, whatever it believes. With the embedded store the data directory's lock makes this
//! process the only candidate; it wins its first round.

use crate::store::{AnyStore, LeaseId, Store, StoreError, Txn, KEY_ROOT};
use cairn_control_api::LeaderInfo;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The election key: the leader's [`LeaderInfo`] as JSON, attached to its lease.
pub const LEADER_KEY: &str = "/cairn/v1/control/leader";
/// The leader's lease: how long the cluster waits for a dead leader before another takes
/// over. Equal to the node lease, so a leader's death costs no more than a node's.
pub const LEADER_LEASE_TTL_S: u64 = 2;
/// How often a leader renews its lease and a follower tries to take over; well inside the
/// TTL, so a live leader never loses its lease to one slow round.
pub const ELECTION_INTERVAL: Duration = Duration::from_millis(500);

const _: () = assert!(LEADER_KEY.len() > KEY_ROOT.len());

/// Resolves once `stop` is true (or its sender is gone).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The borrow the wait returns is dropped here, before any other await.
    drop(stop.wait_for(|s| *s).await);
}

/// This process's term as leader: the leader key's revision when it won (every decision
/// checks it) and the lease that holds the key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leadership {
    pub revision: u64,
    pub lease: LeaseId,
}

impl Leadership {
    /// `txn` with the check that this term is still current, for every leader decision.
    pub fn fence(&self, txn: Txn) -> Txn {
        txn.check(LEADER_KEY, self.revision)
    }
}

pub struct Election {
    store: Arc<AnyStore>,
    me: LeaderInfo,
    state: watch::Sender<Option<Leadership>>,
    won_total: AtomicU64,
}

impl Election {
    pub fn new(store: Arc<AnyStore>, me: LeaderInfo) -> Election {
        Election {
            store,
            me,
            state: watch::Sender::new(None),
            won_total: AtomicU64::new(0),
        }
    }

    pub fn me(&self) -> &LeaderInfo {
        &self.me
    }

    /// This process's current term, None while it is not the leader.
    pub fn current(&self) -> Option<Leadership> {
        *self.state.borrow()
    }

    /// How many times this process became leader.
    pub fn won_total(&self) -> u64 {
        self.won_total.load(Ordering::Relaxed)
    }

    /// The leader as the store records it, None while there is none.
    pub async fn leader(&self) -> Result<Option<LeaderInfo>, StoreError> {
        let Some(entry) = self.store.get(LEADER_KEY).await? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(&entry.value).ok())
    }

    /// Runs rounds until `stop` turns true, then resigns (so a clean stop hands over at once
    /// instead of after a lease TTL).
    pub async fn run(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(ELECTION_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.round().await,
                () = stopped(&mut stop) => break,
            }
        }
        self.resign().await;
    }

    /// One round: a leader renews its lease, a follower tries to take an empty seat.
    pub async fn round(&self) {
        match self.current() {
            Some(term) => self.renew(term).await,
            None => {
                if let Err(e) = self.campaign().await {
                    tracing::warn!(error = %e, "leader election round failed");
                }
            }
        }
    }

    async fn renew(&self, term: Leadership) {
        if let Err(e) = self.store.keep_alive(term.lease).await {
            tracing::warn!(error = %e, "lost the leader lease; stepping down");
            self.state.send_replace(None);
            drop(self.store.revoke_lease(term.lease).await);
        }
    }

    async fn campaign(&self) -> Result<(), StoreError> {
        if self.store.get(LEADER_KEY).await?.is_some() {
            return Ok(());
        }
        let lease = self.store.grant_lease(LEADER_LEASE_TTL_S).await?;
        let value = serde_json::to_vec(&self.me).expect("LeaderInfo serializes");
        let txn = Txn::default()
            .check(LEADER_KEY, 0)
            .put(LEADER_KEY, value, Some(lease));
        match self.store.txn(txn).await {
            Ok(Some(revision)) => {
                self.won_total.fetch_add(1, Ordering::Relaxed);
                tracing::info!(id = %self.me.id, revision, "became the leader");
                self.state
                    .send_replace(Some(Leadership { revision, lease }));
                Ok(())
            }
            Ok(None) => self.store.revoke_lease(lease).await,
            Err(e) => {
                drop(self.store.revoke_lease(lease).await);
                Err(e)
            }
        }
    }

    async fn resign(&self) {
        if let Some(term) = self.state.send_replace(None) {
            if let Err(e) = self.store.revoke_lease(term.lease).await {
                tracing::warn!(error = %e, "resigning leadership");
            }
        }
    }
}
