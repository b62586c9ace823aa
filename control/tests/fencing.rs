//! Guards the rule that only the current leader's decisions are recorded: a control process
//! that lost the leadership but has not noticed (paused, partitioned) still holds its old
//! `Leadership` and runs its monitor; its "mark down" must be refused by the store, because
//! every leader decision checks the election key's revision (`Leadership::fence`). Run on both
//! stores. Without the fence, the deposed leader's write would land and this test fails.

mod common;

use cairn_control::election::Election;
use cairn_control::membership::Membership;
use cairn_control::store::embedded::EmbeddedStore;
use cairn_control::store::etcd::EtcdStore;
use cairn_control::store::{AnyStore, Store};
use cairn_control_api::{LeaderInfo, NodeAddresses, NodeState, RegisterRequest};
use std::sync::Arc;

fn candidate(id: &str) -> LeaderInfo {
    LeaderInfo {
        id: id.into(),
        listen: format!("http://{id}"),
    }
}

async fn a_deposed_leader_cannot_decide(store: AnyStore) {
    let store = Arc::new(store);
    let membership = Membership::new(store.clone(), 2);
    let c1 = Election::new(store.clone(), candidate("c1"));
    c1.round().await;
    let old_term = c1.current().expect("the only candidate wins");
    let req = RegisterRequest {
        addresses: NodeAddresses {
            admin: "127.0.0.1:7001".into(),
            nbd: None,
            replica: None,
        },
        zone: "z".into(),
        rack: "r".into(),
        pools: Vec::new(),
    };
    membership.register("n1", req).await.unwrap();
    // n1 dies: its lease is gone.
    let node_lease = membership.records().await.unwrap()[0].lease;
    store.revoke_lease(node_lease).await.unwrap();
    // c1's lease ends (what expiry does while c1 is paused) and c2 takes over.
    store.revoke_lease(old_term.lease).await.unwrap();
    let c2 = Election::new(store.clone(), candidate("c2"));
    c2.round().await;
    let new_term = c2.current().expect("c2 takes the empty seat");
    assert!(new_term.revision > old_term.revision);

    // c1 still believes it leads; the store refuses its decision.
    assert_eq!(c1.current(), Some(old_term));
    assert_eq!(membership.mark_expired(old_term).await.unwrap(), 0);
    assert_eq!(membership.records().await.unwrap()[0].state, NodeState::Up);
    // The current leader's decision is recorded.
    assert_eq!(membership.mark_expired(new_term).await.unwrap(), 1);
    assert_eq!(
        membership.records().await.unwrap()[0].state,
        NodeState::Down
    );
    // c1 notices at its next round and steps down.
    c1.round().await;
    assert_eq!(c1.current(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_cannot_decide_on_the_embedded_store() {
    let dir = common::test_dir("fence-embedded");
    a_deposed_leader_cannot_decide(AnyStore::Embedded(EmbeddedStore::open(&dir).unwrap())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_cannot_decide_on_etcd() {
    let dir = common::test_dir("fence-etcd");
    let Some(etcd) = common::Etcd::start(&dir) else {
        return;
    };
    let store = EtcdStore::connect(&etcd.url, None, false).await.unwrap();
    a_deposed_leader_cannot_decide(AnyStore::Etcd(Box::new(store))).await;
}
