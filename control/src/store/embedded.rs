//! [`Store`] in one redb file, `DATA_DIR/control.redb`: the default on one machine, where a
//! single control process owns the state (an exclusive lock on `DATA_DIR/control.lock`, held
//! for the life of the process, makes a second one fail at start with the holder's pid).
//!
//! Tables: `kv` maps a key to (mod revision, lease id or 0, value); `leases` maps a lease id
//! to its TTL in seconds; `meta` holds the format version, the store revision and the next
//! lease id. Every write commits durably (fsync) before it returns, like an etcd write.
//!
//! Leases are the one part kept half in memory, as etcd does: the TTL is durable, the deadline
//! is not. Keep-alives only move the in-memory deadline, so a heartbeat costs no disk write.
//! On open every stored lease gets a fresh full TTL; a lease nobody renews after a restart
//! therefore expires one TTL later, never survives for good. Expiry is applied at the start of
//! every call (one durable transaction deletes the lease and its keys), so no caller ever sees
//! a key whose lease is past its deadline, and no timer thread is needed.

use super::{Entry, LeaseId, Op, Store, StoreError, Txn};
use redb::{Database, ReadableTable, TableDefinition};
use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The store file's format; bumped when a table's layout changes (a test pins it).
pub const FORMAT_VERSION: u64 = 1;
/// The store file inside the data directory.
pub const STORE_FILE: &str = "control.redb";
/// The lock file inside the data directory (holds the owner's pid).
pub const LOCK_FILE: &str = "control.lock";

/// key -> (mod revision, lease id or 0, value)
const KV: TableDefinition<&str, (u64, i64, &[u8])> = TableDefinition::new("kv");
/// lease id -> TTL in seconds
const LEASES: TableDefinition<i64, u64> = TableDefinition::new("leases");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const META_FORMAT: &str = "format";
const META_REVISION: &str = "revision";
const META_NEXT_LEASE: &str = "next_lease";

/// The embedded store. Cheap to share: calls run on tokio's blocking pool.
pub struct EmbeddedStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    path: PathBuf,
    /// Lease id -> (deadline, TTL).
    leases: Mutex<HashMap<i64, (Instant, Duration)>>,
    /// Held (with its flock) for the life of the store.
    _lock: std::fs::File,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `data_dir`, taking the directory's lock.
    pub fn open(data_dir: &Path) -> Result<EmbeddedStore, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(io("creating data directory", data_dir))?;
        let lock = lock_dir(data_dir)?;
        let path = data_dir.join(STORE_FILE);
        let db = Database::create(&path).map_err(db_err("open"))?;
        let leases = init(&db, &path)?;
        Ok(EmbeddedStore {
            inner: Arc::new(Inner {
                db,
                path,
                leases: Mutex::new(leases),
                _lock: lock,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            inner.expire_due()?;
            f(&inner)
        })
        .await
        .map_err(|e| StoreError::Backend {
            store: "embedded",
            op: "blocking task",
            detail: e.to_string(),
        })?
    }
}

/// Takes an exclusive, non-blocking flock on the data directory's lock file and writes our pid
/// into it; the kernel drops the lock when the process dies, however it dies.
fn lock_dir(data_dir: &Path) -> Result<std::fs::File, StoreError> {
    let path = data_dir.join(LOCK_FILE);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io("opening lock file", &path))?;
    // SAFETY: flock(2) on a descriptor this function owns; it reads no memory of ours.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let mut holder = String::new();
        drop(file.read_to_string(&mut holder));
        return Err(StoreError::Locked {
            dir: data_dir.display().to_string(),
            holder: format!("pid {}", holder.trim()),
        });
    }
    file.set_len(0).map_err(io("writing lock file", &path))?;
    file.rewind().map_err(io("writing lock file", &path))?;
    write!(file, "{}", std::process::id()).map_err(io("writing lock file", &path))?;
    Ok(file)
}

/// Creates the tables of a new store or checks the format of an old one, and gives every
/// stored lease a fresh deadline.
fn init(db: &Database, path: &Path) -> Result<HashMap<i64, (Instant, Duration)>, StoreError> {
    let w = db.begin_write().map_err(db_err("init"))?;
    let mut leases = HashMap::new();
    {
        let mut meta = w.open_table(META).map_err(db_err("init"))?;
        let found = meta
            .get(META_FORMAT)
            .map_err(db_err("init"))?
            .map(|g| g.value());
        match found {
            None => {
                meta.insert(META_FORMAT, FORMAT_VERSION)
                    .map_err(db_err("init"))?;
            }
            Some(FORMAT_VERSION) => {}
            Some(found) => {
                return Err(StoreError::Format {
                    path: path.display().to_string(),
                    found,
                    expected: FORMAT_VERSION,
                })
            }
        }
        w.open_table(KV).map_err(db_err("init"))?;
        let table = w.open_table(LEASES).map_err(db_err("init"))?;
        let now = Instant::now();
        for row in table.iter().map_err(db_err("init"))? {
            let (id, ttl_s) = row.map_err(db_err("init"))?;
            let ttl = Duration::from_secs(ttl_s.value());
            leases.insert(id.value(), (now + ttl, ttl));
        }
    }
    w.commit().map_err(db_err("init"))?;
    Ok(leases)
}

impl Inner {
    /// Deletes, in one durable transaction, every lease past its deadline and its keys.
    fn expire_due(&self) -> Result<(), StoreError> {
        let now = Instant::now();
        let due: Vec<i64> = {
            let leases = self.leases.lock().expect("lease map lock");
            leases
                .iter()
                .filter(|(_, (deadline, _))| *deadline <= now)
                .map(|(id, _)| *id)
                .collect()
        };
        if due.is_empty() {
            return Ok(());
        }
        self.write("expire leases", |w| {
            for id in &due {
                delete_lease(w, *id)?;
            }
            Ok(())
        })?;
        let mut leases = self.leases.lock().expect("lease map lock");
        for id in due {
            leases.remove(&id);
        }
        Ok(())
    }

    /// Runs `f` in one write transaction and commits it; an error from `f` aborts it whole.
    fn write<T>(
        &self,
        op: &'static str,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let w = self.db.begin_write().map_err(db_err(op))?;
        let out = f(&w)?;
        w.commit().map_err(db_err(op))?;
        Ok(out)
    }
}

/// Bumps and returns the store revision.
fn next_revision(w: &redb::WriteTransaction) -> Result<u64, StoreError> {
    let mut meta = w.open_table(META).map_err(db_err("revision"))?;
    let rev = meta
        .get(META_REVISION)
        .map_err(db_err("revision"))?
        .map_or(0, |g| g.value())
        + 1;
    meta.insert(META_REVISION, rev)
        .map_err(db_err("revision"))?;
    Ok(rev)
}

fn delete_lease(w: &redb::WriteTransaction, id: i64) -> Result<(), StoreError> {
    let mut kv = w.open_table(KV).map_err(db_err("delete lease"))?;
    let mut keys = Vec::new();
    for row in kv.iter().map_err(db_err("delete lease"))? {
        let (k, v) = row.map_err(db_err("delete lease"))?;
        if v.value().1 == id {
            keys.push(k.value().to_string());
        }
    }
    for k in &keys {
        kv.remove(k.as_str()).map_err(db_err("delete lease"))?;
    }
    drop(kv);
    if !keys.is_empty() {
        next_revision(w)?;
    }
    let mut leases = w.open_table(LEASES).map_err(db_err("delete lease"))?;
    leases.remove(id).map_err(db_err("delete lease"))?;
    Ok(())
}

fn read_entry(
    t: &impl ReadableTable<&'static str, (u64, i64, &'static [u8])>,
    key: &str,
) -> Result<Option<Entry>, StoreError> {
    Ok(t.get(key).map_err(db_err("get"))?.map(|g| {
        let (rev, lease, value) = g.value();
        entry(key, rev, lease, value)
    }))
}

fn entry(key: &str, mod_revision: u64, lease: i64, value: &[u8]) -> Entry {
    Entry {
        key: key.to_string(),
        value: value.to_vec(),
        mod_revision,
        lease: (lease != 0).then_some(LeaseId(lease)),
    }
}

/// Applies one op at revision `rev`. A put with a lease that is gone fails the whole
/// transaction: the check runs inside it, so an expiry cannot slip between check and write
/// and leave a key on a dead lease.
fn apply(w: &redb::WriteTransaction, rev: u64, op: &Op) -> Result<bool, StoreError> {
    let mut kv = w.open_table(KV).map_err(db_err("write"))?;
    match op {
        Op::Put { key, value, lease } => {
            if let Some(l) = lease {
                let leases = w.open_table(LEASES).map_err(db_err("put"))?;
                if leases.get(l.0).map_err(db_err("put"))?.is_none() {
                    return Err(StoreError::LeaseNotFound(*l));
                }
            }
            let lease = lease.map_or(0, |l| l.0);
            kv.insert(key.as_str(), (rev, lease, value.as_slice()))
                .map_err(db_err("put"))?;
            Ok(true)
        }
        Op::Delete { key } => Ok(kv.remove(key.as_str()).map_err(db_err("delete"))?.is_some()),
    }
}

impl Store for EmbeddedStore {
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let key = key.to_string();
        self.blocking(move |inner| {
            let r = inner.db.begin_read().map_err(db_err("get"))?;
            let t = r.open_table(KV).map_err(db_err("get"))?;
            read_entry(&t, &key)
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let prefix = prefix.to_string();
        self.blocking(move |inner| {
            let r = inner.db.begin_read().map_err(db_err("list"))?;
            let t = r.open_table(KV).map_err(db_err("list"))?;
            let mut out = Vec::new();
            for row in t.range(prefix.as_str()..).map_err(db_err("list"))? {
                let (k, v) = row.map_err(db_err("list"))?;
                let key = k.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                let (rev, lease, value) = v.value();
                out.push(entry(key, rev, lease, value));
            }
            Ok(out)
        })
        .await
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<u64, StoreError> {
        let op = Op::Put {
            key: key.to_string(),
            value,
            lease,
        };
        self.blocking(move |inner| {
            inner.write("put", |w| {
                let rev = next_revision(w)?;
                apply(w, rev, &op)?;
                Ok(rev)
            })
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let op = Op::Delete {
            key: key.to_string(),
        };
        self.blocking(move |inner| {
            inner.write("delete", |w| {
                let rev = next_revision(w)?;
                apply(w, rev, &op)
            })
        })
        .await
    }

    async fn txn(&self, txn: Txn) -> Result<Option<u64>, StoreError> {
        self.blocking(move |inner| {
            inner.write("txn", |w| {
                {
                    let kv = w.open_table(KV).map_err(db_err("txn"))?;
                    for (key, expected) in &txn.checks {
                        let found = read_entry(&kv, key)?.map_or(0, |e| e.mod_revision);
                        if found != *expected {
                            return Ok(None);
                        }
                    }
                }
                let rev = next_revision(w)?;
                for op in &txn.ops {
                    apply(w, rev, op)?;
                }
                Ok(Some(rev))
            })
        })
        .await
    }

    async fn grant_lease(&self, ttl_s: u64) -> Result<LeaseId, StoreError> {
        self.blocking(move |inner| {
            let id = inner.write("grant lease", |w| {
                let mut meta = w.open_table(META).map_err(db_err("grant lease"))?;
                let id = meta
                    .get(META_NEXT_LEASE)
                    .map_err(db_err("grant lease"))?
                    .map_or(1, |g| g.value());
                meta.insert(META_NEXT_LEASE, id + 1)
                    .map_err(db_err("grant lease"))?;
                let id = i64::try_from(id).expect("2^63 leases are never granted");
                let mut leases = w.open_table(LEASES).map_err(db_err("grant lease"))?;
                leases.insert(id, ttl_s).map_err(db_err("grant lease"))?;
                Ok(id)
            })?;
            let ttl = Duration::from_secs(ttl_s);
            inner
                .leases
                .lock()
                .expect("lease map lock")
                .insert(id, (Instant::now() + ttl, ttl));
            Ok(LeaseId(id))
        })
        .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.blocking(move |inner| {
            let mut leases = inner.leases.lock().expect("lease map lock");
            let (deadline, ttl) = leases
                .get_mut(&lease.0)
                .ok_or(StoreError::LeaseNotFound(lease))?;
            *deadline = Instant::now() + *ttl;
            Ok(())
        })
        .await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.blocking(move |inner| {
            inner.write("revoke lease", |w| delete_lease(w, lease.0))?;
            inner
                .leases
                .lock()
                .expect("lease map lock")
                .remove(&lease.0);
            Ok(())
        })
        .await
    }
}

fn db_err<E: Into<redb::Error>>(op: &'static str) -> impl Fn(E) -> StoreError {
    move |e| StoreError::Backend {
        store: "embedded",
        op,
        detail: e.into().to_string(),
    }
}

fn io<'p>(what: &'static str, path: &'p Path) -> impl Fn(std::io::Error) -> StoreError + 'p {
    move |source| StoreError::Io {
        what,
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_version_is_pinned() {
        // The tables' layout above is format 1; change both together (docs/control.md).
        assert_eq!(FORMAT_VERSION, 1);
    }
}
