//! The cluster state behind one trait, [`Store`], with two implementations: [`etcd`] for
//! clusters (several control processes, the state replicated by etcd's Raft) and
//! [`embedded`], a single redb file, the default on one machine.
//!
//! The trait is etcd's data model cut down to what the control plane needs, so that both
//! implementations mean the same thing by every call (one test suite, `tests/store.rs`, checks
//! that they do):
//!
//! * keys are UTF-8 strings, values are bytes; [`Store::list`] reads a prefix in key order;
//! * every write gets the store's next **revision**, a counter over the whole store, and each
//!   key remembers the revision of its last write ([`Entry::mod_revision`]); an absent key has
//!   revision 0;
//! * [`Store::txn`] applies its writes only if every checked key still has the revision the
//!   caller read. That compare-and-swap is how a decision is recorded exactly once: two
//!   deciders that read the same state cannot both write their conclusion;
//! * a **lease** has a TTL in seconds; keys written with it are deleted when it expires or is
//!   revoked, unless [`Store::keep_alive`] renews it in time. Membership and leader election
//!   stand on leases.
//!
//! Nothing here knows about nodes or volumes: the key layout belongs to the modules that
//! decide ([`crate::membership`], [`crate::election`]) and is drawn in docs/control.md.

pub mod embedded;
pub mod etcd;

use std::future::Future;

/// The root of every key Cairn writes; the version segment changes when the layout does.
pub const KEY_ROOT: &str = "/cairn/v1/";

/// A lease's id (etcd's, or the embedded store's own counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct LeaseId(pub i64);

/// A key's value and the revision of its last write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: u64,
    /// The lease the key was written with, if any.
    pub lease: Option<LeaseId>,
}

/// One write of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
}

/// A compare-and-swap: `ops` are applied, atomically and with one new revision, only if each
/// key of `checks` still has the given revision (0: the key must be absent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub checks: Vec<(String, u64)>,
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn check(mut self, key: impl Into<String>, mod_revision: u64) -> Txn {
        self.checks.push((key.into(), mod_revision));
        self
    }

    pub fn put(mut self, key: impl Into<String>, value: Vec<u8>, lease: Option<LeaseId>) -> Txn {
        self.ops.push(Op::Put {
            key: key.into(),
            value,
            lease,
        });
        self
    }

    pub fn delete(mut self, key: impl Into<String>) -> Txn {
        self.ops.push(Op::Delete { key: key.into() });
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{store} store: {op}: {detail}")]
    Backend {
        store: &'static str,
        op: &'static str,
        detail: String,
    },
    #[error("lease {0:?} is not alive (it expired or was revoked)")]
    LeaseNotFound(LeaseId),
    #[error("data directory {dir} is in use by another cairn-control ({holder})")]
    Locked { dir: String, holder: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("store file {path} has format version {found}; this build reads {expected}")]
    Format {
        path: String,
        found: u64,
        expected: u64,
    },
}

/// The cluster state, as the control plane uses it. See the module comment for the meaning
/// of revisions and leases, which both implementations share.
pub trait Store: Send + Sync + 'static {
    /// The key's value and revision, or None when absent.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<Entry>, StoreError>> + Send;
    /// Every key starting with `prefix`, in key order.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Vec<Entry>, StoreError>> + Send;
    /// Writes `key` (attached to `lease` when given); returns the new revision.
    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Deletes `key`; true when it existed.
    fn delete(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Applies `txn` if its checks hold: Some(new revision), or None when a check failed and
    /// nothing was written.
    fn txn(&self, txn: Txn) -> impl Future<Output = Result<Option<u64>, StoreError>> + Send;
    /// A new lease that expires `ttl_s` seconds from now unless kept alive.
    fn grant_lease(&self, ttl_s: u64) -> impl Future<Output = Result<LeaseId, StoreError>> + Send;
    /// Renews `lease` for its full TTL; [`StoreError::LeaseNotFound`] when it already expired.
    fn keep_alive(&self, lease: LeaseId) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Ends `lease` now, deleting its keys. Revoking an unknown lease is not an error.
    fn revoke_lease(&self, lease: LeaseId) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The store a control process runs on, chosen at start (`--etcd URL` or the embedded
/// default). The control plane's modules take this type, so they are written once.
pub enum AnyStore {
    Embedded(embedded::EmbeddedStore),
    /// Boxed: the etcd client is large and the enum is built once.
    Etcd(Box<etcd::EtcdStore>),
}

impl AnyStore {
    /// What the store is, for logs and the start-up line.
    pub fn describe(&self) -> String {
        match self {
            AnyStore::Embedded(s) => format!("embedded {}", s.path().display()),
            AnyStore::Etcd(s) => format!("etcd {}", s.endpoints().join(",")),
        }
    }
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Embedded($s) => $e,
            AnyStore::Etcd($s) => $e,
        }
    };
}

impl Store for AnyStore {
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        dispatch!(self, s => s.get(key).await)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        dispatch!(self, s => s.list(prefix).await)
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<u64, StoreError> {
        dispatch!(self, s => s.put(key, value, lease).await)
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        dispatch!(self, s => s.delete(key).await)
    }

    async fn txn(&self, txn: Txn) -> Result<Option<u64>, StoreError> {
        dispatch!(self, s => s.txn(txn).await)
    }

    async fn grant_lease(&self, ttl_s: u64) -> Result<LeaseId, StoreError> {
        dispatch!(self, s => s.grant_lease(ttl_s).await)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        dispatch!(self, s => s.keep_alive(lease).await)
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        dispatch!(self, s => s.revoke_lease(lease).await)
    }
}
