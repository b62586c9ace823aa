//! [`Store`] on etcd (v3 API, through the `etcd-client` crate): the store for clusters, where
//! several control processes share the state and etcd's Raft keeps it on a quorum.
//!
//! With TLS files of etcd's own CA, the client speaks mutual TLS to `https://` endpoints: it
//! checks etcd's certificate against that CA and shows its own (etcd is then run with
//! `--client-cert-auth --trusted-ca-file` of the same CA, docs/security.md). It is not the
//! cluster CA: etcd gives every certificate it trusts full access, and the cluster CA also
//! certifies every node. Plain `http://` endpoints beyond loopback can be refused (when the
//! cluster runs TLS).
//!
//! Each call maps to one etcd request; revisions are etcd's own (`mod_revision`, the header
//! revision of a write), leases are etcd leases, so expiry, and the deletion of a lease's keys,
//! happen inside etcd even while no control process runs. Every request is bounded by
//! [`REQUEST_TIMEOUT`], so a partitioned etcd makes calls fail rather than hang.

use super::{Entry, LeaseId, Op, Store, StoreError, Txn};
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn as EtcdTxn, TxnOp,
};
use std::time::Duration;

/// How long connecting to etcd may take at start.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one etcd request may take before it fails; shorter than a node lease, so a stuck
/// request never holds a decision past the lease it depends on.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A connection to an etcd cluster.
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
}

/// Why a set of endpoints cannot be used with the TLS configuration given.
fn endpoint_error(detail: String) -> StoreError {
    StoreError::Backend {
        store: "etcd",
        op: "connect",
        detail,
    }
}

/// Checks the endpoints' form (`http://HOST:PORT` or `https://HOST:PORT`, a bare
/// `HOST:PORT` being http, all of one scheme) and, with `loopback_only_plain`, that plain ones
/// are on loopback; true when they are https.
fn check_endpoints(endpoints: &[String], loopback_only_plain: bool) -> Result<bool, StoreError> {
    let https = endpoints
        .iter()
        .filter(|e| e.starts_with("https://"))
        .count();
    if https != 0 && https != endpoints.len() {
        return Err(endpoint_error(format!(
            "endpoints {endpoints:?} mix https and http; use one scheme"
        )));
    }
    for e in endpoints {
        let rest = e
            .strip_prefix("https://")
            .or_else(|| e.strip_prefix("http://"))
            .unwrap_or(e);
        if rest.contains("://") {
            return Err(endpoint_error(format!(
                "etcd endpoint {e:?} has a scheme other than http or https"
            )));
        }
        let host = rest.split('/').next().unwrap_or(rest);
        let port = host.rsplit_once(':').map(|(h, p)| (h, p.parse::<u16>()));
        if !matches!(port, Some((h, Ok(_))) if !h.is_empty() && !h.ends_with(':')) {
            return Err(endpoint_error(format!(
                "etcd endpoint {e:?} names no HOST:PORT (expected http://HOST:PORT or https://HOST:PORT, e.g. http://127.0.0.1:2379)"
            )));
        }
        if https == 0 && loopback_only_plain {
            let local = cairn_tls::is_loopback(host).map_err(|why| {
                endpoint_error(format!("etcd endpoint {e:?}: cannot resolve {host}: {why}"))
            })?;
            if !local {
                return Err(endpoint_error(format!(
                    "etcd endpoint {e} is plain http beyond loopback while TLS is configured; \
                     use https (etcd with --client-cert-auth, --etcd-* files) or pass --insecure"
                )));
            }
        }
    }
    Ok(https > 0)
}

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` (`http://HOST:PORT` or `https://HOST:PORT`,
    /// comma separated, all of one scheme). `tls` (etcd's CA and this process's client
    /// identity from it) is required for `https`; `loopback_only_plain` refuses `http`
    /// endpoints beyond loopback.
    pub async fn connect(
        endpoints: &str,
        tls: Option<&cairn_tls::Tls>,
        loopback_only_plain: bool,
    ) -> Result<EtcdStore, StoreError> {
        let endpoints: Vec<String> = endpoints.split(',').map(|e| e.trim().to_string()).collect();
        let https = check_endpoints(&endpoints, loopback_only_plain)?;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT);
        match (https, tls) {
            (true, None) => {
                return Err(endpoint_error(format!(
                    "https endpoints {endpoints:?} need etcd's TLS files (--etcd-ca, --etcd-cert, --etcd-key)"
                )))
            }
            (true, Some(tls)) => {
                let pem = tls.pem();
                options = options.with_tls(
                    TlsOptions::new()
                        .ca_certificate(Certificate::from_pem(&pem.ca))
                        .identity(Identity::from_pem(&pem.cert, &pem.key)),
                );
            }
            (false, _) => {}
        }
        let client = Client::connect(&endpoints, Some(options))
            .await
            .map_err(err("connect"))?;
        let store = EtcdStore { client, endpoints };
        // Connecting is lazy; one read proves the cluster answers before we claim to serve.
        store.get(super::KEY_ROOT).await?;
        Ok(store)
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }
}

fn err(op: &'static str) -> impl Fn(etcd_client::Error) -> StoreError {
    move |e| StoreError::Backend {
        store: "etcd",
        op,
        detail: e.to_string(),
    }
}

fn entry(kv: &etcd_client::KeyValue) -> Result<Entry, StoreError> {
    Ok(Entry {
        key: kv.key_str().map_err(err("decode key"))?.to_string(),
        value: kv.value().to_vec(),
        mod_revision: revision(kv.mod_revision()),
        lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
    })
}

/// etcd's revisions are positive i64s.
fn revision(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

fn put_options(lease: Option<LeaseId>) -> Option<PutOptions> {
    lease.map(|l| PutOptions::new().with_lease(l.0))
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let resp = self
            .client
            .clone()
            .get(key, None)
            .await
            .map_err(err("get"))?;
        resp.kvs().first().map(entry).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Entry>, StoreError> {
        let resp = self
            .client
            .clone()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(err("list"))?;
        resp.kvs().iter().map(entry).collect()
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<u64, StoreError> {
        let resp = self
            .client
            .clone()
            .put(key, value, put_options(lease))
            .await
            .map_err(|e| lease_or(e, lease, "put"))?;
        Ok(resp.header().map_or(0, |h| revision(h.revision())))
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let resp = self
            .client
            .clone()
            .delete(key, None)
            .await
            .map_err(err("delete"))?;
        Ok(resp.deleted() > 0)
    }

    async fn txn(&self, txn: Txn) -> Result<Option<u64>, StoreError> {
        let compares: Vec<Compare> = txn
            .checks
            .iter()
            .map(|(key, rev)| {
                // A revision above i64::MAX cannot exist in etcd, so the check must fail.
                let rev = i64::try_from(*rev).unwrap_or(i64::MAX);
                Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)
            })
            .collect();
        let lease = txn.ops.iter().find_map(|op| match op {
            Op::Put { lease, .. } => *lease,
            Op::Delete { .. } => None,
        });
        let ops: Vec<TxnOp> = txn
            .ops
            .into_iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => TxnOp::put(key, value, put_options(lease)),
                Op::Delete { key } => TxnOp::delete(key, None),
            })
            .collect();
        let resp = self
            .client
            .clone()
            .txn(EtcdTxn::new().when(compares).and_then(ops))
            .await
            .map_err(|e| lease_or(e, lease, "txn"))?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map_or(0, |h| revision(h.revision()))))
    }

    async fn grant_lease(&self, ttl_s: u64) -> Result<LeaseId, StoreError> {
        let ttl = i64::try_from(ttl_s).unwrap_or(i64::MAX);
        let resp = self
            .client
            .clone()
            .lease_grant(ttl, None)
            .await
            .map_err(err("grant lease"))?;
        Ok(LeaseId(resp.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<(), StoreError> {
        let (mut keeper, mut stream) = self
            .client
            .clone()
            .lease_keep_alive(lease.0)
            .await
            .map_err(|e| lease_or(e, Some(lease), "keep lease alive"))?;
        keeper
            .keep_alive()
            .await
            .map_err(|e| lease_or(e, Some(lease), "keep lease alive"))?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, stream.message())
            .await
            .map_err(|_| StoreError::Backend {
                store: "etcd",
                op: "keep lease alive",
                detail: format!("no answer within {REQUEST_TIMEOUT:?}"),
            })?
            .map_err(|e| lease_or(e, Some(lease), "keep lease alive"))?;
        // etcd answers a keep-alive of an expired lease with TTL 0.
        match resp {
            Some(r) if r.ttl() > 0 => Ok(()),
            _ => Err(StoreError::LeaseNotFound(lease)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self.client.clone().lease_revoke(lease.0).await {
            Ok(_) => Ok(()),
            Err(e) if lease_missing(&e) => Ok(()),
            Err(e) => Err(err("revoke lease")(e)),
        }
    }
}

/// etcd refuses a write with an expired lease as "requested lease not found".
fn lease_missing(e: &etcd_client::Error) -> bool {
    e.to_string().contains("lease not found")
}

fn lease_or(e: etcd_client::Error, lease: Option<LeaseId>, op: &'static str) -> StoreError {
    match lease {
        Some(l) if lease_missing(&e) => StoreError::LeaseNotFound(l),
        _ => err(op)(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(e: &str, loopback_only_plain: bool) -> Result<bool, String> {
        let endpoints: Vec<String> = e.split(',').map(str::to_string).collect();
        check_endpoints(&endpoints, loopback_only_plain).map_err(|e| e.to_string())
    }

    #[test]
    fn endpoints_name_their_problem() {
        assert_eq!(check("http://127.0.0.1:2379", true), Ok(false));
        assert_eq!(check("127.0.0.1:2379", true), Ok(false));
        assert_eq!(
            check("https://10.0.0.1:2379,https://10.0.0.2:2379", true),
            Ok(true)
        );
        assert_eq!(check("http://[::1]:2379", true), Ok(false));
        let no_port = check("http://localhost", true).unwrap_err();
        assert!(no_port.contains("names no HOST:PORT"), "{no_port}");
        let bad_port = check("http://localhost:http", false).unwrap_err();
        assert!(bad_port.contains("names no HOST:PORT"), "{bad_port}");
        let scheme = check("unix://etcd.sock:1", false).unwrap_err();
        assert!(scheme.contains("scheme other than"), "{scheme}");
        let mixed = check("https://a:1,http://b:2", false).unwrap_err();
        assert!(mixed.contains("mix https and http"), "{mixed}");
        let remote = check("http://10.0.0.1:2379", true).unwrap_err();
        assert!(remote.contains("beyond loopback"), "{remote}");
        assert_eq!(check("http://10.0.0.1:2379", false), Ok(false));
    }
}
