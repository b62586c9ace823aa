//! Guards the store contract that the control plane stands on, with ONE suite run against both
//! implementations (the embedded redb store and a real etcd started here): revisions move
//! forward and are per key, a transaction writes nothing when any check fails (so a decision is
//! recorded exactly once), prefix lists are ordered and bounded by the prefix, and leases keep
//! their keys alive only while renewed. The embedded store's own duties follow: state survives
//! a reopen, a lease nobody renews after a restart still expires (a crash never resurrects a
//! dead node for good), and a second process on the same data directory is refused.

mod common;

use cairn_control::store::embedded::EmbeddedStore;
use cairn_control::store::etcd::EtcdStore;
use cairn_control::store::{Store, StoreError, Txn};
use std::time::{Duration, Instant};

/// The shortest TTL etcd grants on its default timings (it rounds shorter ones up).
const TTL_S: u64 = 2;

async fn suite<S: Store>(s: &S) {
    kv_and_revisions(s).await;
    prefix_lists(s).await;
    transactions(s).await;
    leases(s).await;
}

async fn kv_and_revisions<S: Store>(s: &S) {
    let k = "/cairn/v1/test/kv";
    assert_eq!(s.get(k).await.unwrap(), None);
    let r1 = s.put(k, b"one".to_vec(), None).await.unwrap();
    assert!(r1 > 0);
    let e = s.get(k).await.unwrap().unwrap();
    assert_eq!(
        (e.key.as_str(), e.value.as_slice(), e.mod_revision, e.lease),
        (k, &b"one"[..], r1, None)
    );
    let r2 = s.put(k, b"two".to_vec(), None).await.unwrap();
    assert!(r2 > r1, "revisions move forward: {r1} then {r2}");
    s.put("/cairn/v1/test/other", b"x".to_vec(), None)
        .await
        .unwrap();
    assert_eq!(
        s.get(k).await.unwrap().unwrap().mod_revision,
        r2,
        "a write elsewhere leaves this key's revision"
    );
    assert!(s.delete(k).await.unwrap());
    assert!(!s.delete(k).await.unwrap());
    assert_eq!(s.get(k).await.unwrap(), None);
}

async fn prefix_lists<S: Store>(s: &S) {
    for k in ["b/2", "a/10", "a/2", "a/1", "ab"] {
        s.put(
            &format!("/cairn/v1/test/list/{k}"),
            k.as_bytes().to_vec(),
            None,
        )
        .await
        .unwrap();
    }
    let keys = |v: Vec<cairn_control::store::Entry>| -> Vec<String> {
        v.into_iter()
            .map(|e| e.key.rsplit("list/").next().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        keys(s.list("/cairn/v1/test/list/a/").await.unwrap()),
        ["a/1", "a/10", "a/2"]
    );
    assert_eq!(
        keys(s.list("/cairn/v1/test/list/a").await.unwrap()),
        ["a/1", "a/10", "a/2", "ab"]
    );
    assert_eq!(s.list("/cairn/v1/test/list/c").await.unwrap(), []);
}

async fn transactions<S: Store>(s: &S) {
    let (k, k2, k3) = (
        "/cairn/v1/test/txn/a",
        "/cairn/v1/test/txn/b",
        "/cairn/v1/test/txn/c",
    );
    let create = || Txn::default().check(k, 0).put(k, b"v1".to_vec(), None);
    let r1 = s
        .txn(create())
        .await
        .unwrap()
        .expect("create-if-absent applies once");
    assert_eq!(s.txn(create()).await.unwrap(), None, "and only once");
    assert_eq!(s.get(k).await.unwrap().unwrap().mod_revision, r1);
    let r2 = s
        .txn(Txn::default().check(k, r1).put(k, b"v2".to_vec(), None))
        .await
        .unwrap()
        .expect("a swap at the read revision applies");
    assert_eq!(
        s.txn(Txn::default().check(k, r1).put(k, b"stale".to_vec(), None))
            .await
            .unwrap(),
        None,
        "a swap at an old revision is refused"
    );
    assert_eq!(s.get(k).await.unwrap().unwrap().value, b"v2");
    // One failing check among several: nothing at all is written.
    let rk2 = s.put(k2, b"b".to_vec(), None).await.unwrap();
    let mixed = Txn::default()
        .check(k, r2)
        .check(k2, rk2 - 1)
        .put(k3, b"c".to_vec(), None)
        .delete(k);
    assert_eq!(s.txn(mixed).await.unwrap(), None);
    assert_eq!(s.get(k3).await.unwrap(), None);
    assert!(s.get(k).await.unwrap().is_some());
    // All checks hold: every op applies at one revision.
    let all = Txn::default()
        .check(k, r2)
        .check(k2, rk2)
        .put(k3, b"c".to_vec(), None)
        .delete(k);
    let r3 = s.txn(all).await.unwrap().expect("all checks hold");
    assert_eq!(s.get(k3).await.unwrap().unwrap().mod_revision, r3);
    assert_eq!(s.get(k).await.unwrap(), None);
}

async fn wait_gone<S: Store>(s: &S, key: &str) -> Duration {
    let start = Instant::now();
    while s.get(key).await.unwrap().is_some() {
        assert!(
            start.elapsed() < common::STATE_TIMEOUT,
            "{key} outlived its lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start.elapsed()
}

async fn leases<S: Store>(s: &S) {
    let k = "/cairn/v1/test/lease/a";
    let lease = s.grant_lease(TTL_S).await.unwrap();
    s.put(k, b"alive".to_vec(), Some(lease)).await.unwrap();
    assert_eq!(s.get(k).await.unwrap().unwrap().lease, Some(lease));
    // Renewed for longer than a TTL: the key stays.
    let start = Instant::now();
    let mut renewed = Instant::now();
    while start.elapsed() < Duration::from_secs(TTL_S + 1) {
        s.keep_alive(lease).await.unwrap();
        renewed = Instant::now();
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(
        s.get(k).await.unwrap().is_some(),
        "a renewed lease keeps its key"
    );
    // Not renewed: the key goes, and the lease is dead for keep-alives and writes.
    wait_gone(s, k).await;
    println!(
        "lease of {TTL_S} s: its key was gone {:?} after the last renewal",
        renewed.elapsed()
    );
    let renewed = s.keep_alive(lease).await;
    assert!(
        matches!(renewed, Err(StoreError::LeaseNotFound(_))),
        "{renewed:?}"
    );
    assert!(matches!(
        s.put(k, b"late".to_vec(), Some(lease)).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    // Revoking deletes at once; a key moved to another lease is not the old lease's any more.
    let (l1, l2) = (
        s.grant_lease(TTL_S).await.unwrap(),
        s.grant_lease(30).await.unwrap(),
    );
    s.put(k, b"l1".to_vec(), Some(l1)).await.unwrap();
    let moved = "/cairn/v1/test/lease/moved";
    s.put(moved, b"l1".to_vec(), Some(l1)).await.unwrap();
    s.put(moved, b"l2".to_vec(), Some(l2)).await.unwrap();
    s.revoke_lease(l1).await.unwrap();
    assert_eq!(s.get(k).await.unwrap(), None);
    assert_eq!(s.get(moved).await.unwrap().unwrap().value, b"l2");
    s.revoke_lease(l1).await.unwrap();
    s.revoke_lease(l2).await.unwrap();
    assert_eq!(s.get(moved).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_suite_passes_on_the_embedded_store() {
    let dir = common::test_dir("store-embedded");
    suite(&EmbeddedStore::open(&dir).unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_suite_passes_on_etcd() {
    let dir = common::test_dir("store-etcd");
    let Some(etcd) = common::Etcd::start(&dir) else {
        return;
    };
    suite(&EtcdStore::connect(&etcd.url, None, false).await.unwrap()).await;
}

/// With TLS files from etcd's own CA the control process reaches etcd over mutual TLS, and
/// the suite passes there; a client whose certificate comes from another CA (the cluster CA
/// that certifies the nodes), or that has no TLS files for an https endpoint, is refused; and
/// a plain endpoint beyond loopback is refused while the cluster runs TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_suite_passes_on_etcd_over_mutual_tls() {
    use cairn_tls::{issue, Identity, Tls, TlsFiles};
    let dir = common::test_dir("store-etcd-tls");
    let ca = dir.join("etcd-ca");
    let other_ca = dir.join("cluster-ca");
    issue::init_ca(&ca).unwrap();
    issue::init_ca(&other_ca).unwrap();
    let ip = ["127.0.0.1".parse().unwrap()];
    let server = issue::issue(&ca, &Identity::Control("etcd".into()), &ip, &[]).unwrap();
    let load = |ca: &std::path::Path, name: &str| {
        let d = issue::issue(ca, &Identity::Control(name.into()), &[], &[]).unwrap();
        Tls::load(&TlsFiles::in_dir(&d)).unwrap()
    };
    let me = load(&ca, "c1");
    let node = {
        let d = issue::issue(&other_ca, &Identity::Node("n1".into()), &ip, &[]).unwrap();
        Tls::load(&TlsFiles::in_dir(&d)).unwrap()
    };
    let Some(etcd) = common::Etcd::start_tls(&dir, &server) else {
        return;
    };
    assert!(etcd.url.starts_with("https://"));
    let started = Instant::now();
    let store = loop {
        match EtcdStore::connect(&etcd.url, Some(&me), false).await {
            Ok(s) => break s,
            Err(e) if started.elapsed() > Duration::from_secs(30) => {
                panic!("etcd over TLS never answered: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    suite(&store).await;

    let refused = EtcdStore::connect(&etcd.url, Some(&node), false).await;
    assert!(
        refused.is_err(),
        "a node's certificate from the cluster CA is refused"
    );
    let err = EtcdStore::connect(&etcd.url, None, false)
        .await
        .err()
        .expect("https without TLS files")
        .to_string();
    assert!(err.contains("need etcd's TLS files"), "{err}");
    let err = EtcdStore::connect("http://192.0.2.1:2379", None, true)
        .await
        .err()
        .expect("plain beyond loopback")
        .to_string();
    assert!(err.contains("plain http beyond loopback"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_store_keeps_its_state_across_a_reopen() {
    let dir = common::test_dir("store-reopen");
    let (rev, lease) = {
        let s = EmbeddedStore::open(&dir).unwrap();
        let rev = s
            .put("/cairn/v1/test/k", b"v".to_vec(), None)
            .await
            .unwrap();
        let lease = s.grant_lease(1).await.unwrap();
        s.put("/cairn/v1/test/leased", b"v".to_vec(), Some(lease))
            .await
            .unwrap();
        (rev, lease)
    };
    let s = EmbeddedStore::open(&dir).unwrap();
    let e = s.get("/cairn/v1/test/k").await.unwrap().unwrap();
    assert_eq!((e.value.as_slice(), e.mod_revision), (&b"v"[..], rev));
    assert!(
        s.put("/cairn/v1/test/k", b"w".to_vec(), None)
            .await
            .unwrap()
            > rev
    );
    // The lease came back with a fresh TTL and nobody renews it: it still expires.
    assert_eq!(
        s.get("/cairn/v1/test/leased").await.unwrap().unwrap().lease,
        Some(lease)
    );
    wait_gone(&s, "/cairn/v1/test/leased").await;
    let fresh = s.grant_lease(1).await.unwrap();
    assert_ne!(fresh, lease, "lease ids are never reused");
}

#[test]
fn a_second_embedded_store_on_one_directory_is_refused() {
    let dir = common::test_dir("store-lock");
    let _first = EmbeddedStore::open(&dir).unwrap();
    let err = EmbeddedStore::open(&dir)
        .err()
        .expect("the directory is locked");
    let msg = err.to_string();
    assert!(
        msg.contains("in use by another cairn-control")
            && msg.contains(&std::process::id().to_string()),
        "{msg}"
    );
}
