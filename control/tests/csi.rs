//! The project's own CSI conformance client for the control process's Identity and
//! Controller services (`cairn-control --csi-endpoint`), against real cairn-node processes on
//! loopback, once on the embedded store and once on etcd. It guards what the CSI spec requires
//! of each RPC and what Cairn promises on top:
//! * a missing required field is INVALID_ARGUMENT, one check per RPC;
//! * CreateVolume is idempotent by name, an incompatible size is ALREADY_EXISTS, a range with
//!   no whole block OUT_OF_RANGE, a size no pool holds RESOURCE_EXHAUSTED; the answer names the
//!   replica nodes' zones and ids as its topology;
//! * an unknown volume, snapshot or node is NOT_FOUND, and the deletes of unknown objects OK;
//! * the controller side of the lifecycle (create, publish, unpublish, delete) is idempotent,
//!   and the published NBD URI serves the volume;
//! * snapshot, restore from the snapshot and clone from a volume carry the data; expand grows;
//! * ListVolumes and ListSnapshots page with max_entries 2 over at least 5 objects, filter,
//!   and answer a foreign token with ABORTED; GetCapacity bounds a volume by its replicas;
//! * on etcd, a follower control process answers reads and refuses a mutating RPC with
//!   UNAVAILABLE naming the leader;
//! * publish to a second node is FAILED_PRECONDITION while the first is up, and succeeds at
//!   once with a raised epoch (fencing the old nexus) after the first was killed with
//!   `kill -9` and its lease expired. This fails if publish waits for anything else, or if
//!   the record does not fence the old attach.
//!
//! And the whole lifecycle as Kubernetes drives it, through the CSI sockets only (the control
//! process's and a cairn-node's), each call made twice to show it idempotent: CreateVolume →
//! ControllerPublish → NodeStage → NodePublish (a file written and read back through the
//! mount) → NodeUnpublish → NodeUnstage → ControllerUnpublish → DeleteVolume, leaving no
//! mount, loop device or stage record behind. It needs root and the stage's tools (skipped
//! elsewhere, failed under CI).

mod common;

#[path = "../../engine/tests/common/nbd_client.rs"]
mod nbd_client;
#[path = "common/pattern.rs"]
mod pattern;

use cairn_csi::v1::identity_client::IdentityClient;
use cairn_csi::v1::node_client::NodeClient;
use cairn_csi::v1::{self as csi, controller_client::ControllerClient};
use cairn_testkit::skip::{require_root, require_tool};
use common::{test_dir, wait_for, zoned_nodes, Control, Etcd, NodeProc, STATE_TIMEOUT};
use pattern::{read_back, write_pattern};
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;
use tonic::transport::Channel;
use tonic::Code;

const MIB: i64 = 1 << 20;

type Ctl = ControllerClient<Channel>;

fn mount() -> csi::VolumeCapability {
    use csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn create_req(name: &str, bytes: i64, replicas: u32) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount()],
        parameters: HashMap::from([
            ("replicas".to_string(), replicas.to_string()),
            ("fsType".to_string(), "ext4".to_string()),
        ]),
        ..Default::default()
    }
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

async fn create(c: &mut Ctl, req: csi::CreateVolumeRequest) -> csi::Volume {
    c.create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
}

async fn publish(c: &mut Ctl, volume: &str, node: &str) -> Result<String, tonic::Status> {
    let r = c
        .controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: volume.into(),
            node_id: node.into(),
            volume_capability: Some(mount()),
            ..Default::default()
        })
        .await?;
    Ok(r.into_inner().publish_context[cairn_csi::PUBLISH_CONTEXT_NBD_URI].clone())
}

async fn unpublish(c: &mut Ctl, volume: &str, node: &str) {
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn snapshot(c: &mut Ctl, volume: &str, name: &str) -> csi::Snapshot {
    c.create_snapshot(csi::CreateSnapshotRequest {
        source_volume_id: volume.into(),
        name: name.into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .snapshot
    .unwrap()
}

/// Every volume id, page by page with max_entries 2; returns the ids and the page count.
async fn all_volumes(c: &mut Ctl) -> (Vec<String>, usize) {
    let (mut ids, mut pages, mut token) = (Vec::new(), 0, String::new());
    loop {
        let r = c
            .list_volumes(csi::ListVolumesRequest {
                max_entries: 2,
                starting_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.entries.len() <= 2);
        pages += 1;
        ids.extend(r.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
        if r.next_token.is_empty() {
            return (ids, pages);
        }
        token = r.next_token;
    }
}

/// Every snapshot id of `source` (all when empty), page by page with max_entries 2.
async fn all_snapshots(c: &mut Ctl, source: &str) -> (Vec<String>, usize) {
    let (mut ids, mut pages, mut token) = (Vec::new(), 0, String::new());
    loop {
        let r = c
            .list_snapshots(csi::ListSnapshotsRequest {
                max_entries: 2,
                starting_token: token,
                source_volume_id: source.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.entries.len() <= 2);
        pages += 1;
        ids.extend(
            r.entries
                .into_iter()
                .map(|e| e.snapshot.unwrap().snapshot_id),
        );
        if r.next_token.is_empty() {
            return (ids, pages);
        }
        token = r.next_token;
    }
}

/// One check per RPC: each required field left out is INVALID_ARGUMENT.
async fn missing_fields(c: &mut Ctl) {
    let mut no_name = create_req("x", MIB, 1);
    no_name.name.clear();
    let mut no_caps = create_req("x", MIB, 1);
    no_caps.volume_capabilities.clear();
    assert_eq!(code(c.create_volume(no_name).await), Code::InvalidArgument);
    assert_eq!(code(c.create_volume(no_caps).await), Code::InvalidArgument);
    let bad_replicas = create_req("x", MIB, 4);
    assert_eq!(
        code(c.create_volume(bad_replicas).await),
        Code::InvalidArgument
    );
    let r = c.delete_volume(csi::DeleteVolumeRequest::default()).await;
    assert_eq!(code(r), Code::InvalidArgument);
    for (volume, node, cap) in [("", "n1", true), ("v", "", true), ("v", "n1", false)] {
        let r = c
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: volume.into(),
                node_id: node.into(),
                volume_capability: cap.then(mount),
                ..Default::default()
            })
            .await;
        assert_eq!(
            code(r),
            Code::InvalidArgument,
            "publish {volume:?} {node:?} {cap}"
        );
    }
    let r = c
        .controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest::default())
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    let r = c
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_capabilities: vec![mount()],
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    let r = c
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "v".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    for (source, name) in [("", "s"), ("v", "")] {
        let r = c
            .create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: source.into(),
                name: name.into(),
                ..Default::default()
            })
            .await;
        assert_eq!(
            code(r),
            Code::InvalidArgument,
            "snapshot {source:?} {name:?}"
        );
    }
    let r = c
        .delete_snapshot(csi::DeleteSnapshotRequest::default())
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    let r = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            capacity_range: Some(csi::CapacityRange {
                required_bytes: MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    let r = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: "v".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
}

/// Unknown objects: NOT_FOUND where the spec says so, OK for the deletes.
async fn not_found(c: &mut Ctl) {
    assert_eq!(
        code(publish(c, "nope", "n1").await.map(tonic::Response::new)),
        Code::NotFound
    );
    assert_eq!(
        code(publish(c, "pvc-a", "n9").await.map(tonic::Response::new)),
        Code::NotFound
    );
    let r = c
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "nope".into(),
            volume_capabilities: vec![mount()],
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::NotFound);
    let r = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: "nope".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::NotFound);
    let mut from_nothing = create_req("pvc-x", 16 * MIB, 1);
    from_nothing.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: "nope@s".into(),
            },
        )),
    });
    assert_eq!(code(c.create_volume(from_nothing).await), Code::NotFound);
    c.delete_volume(csi::DeleteVolumeRequest {
        volume_id: "nope".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    unpublish(c, "nope", "n1").await;
    c.delete_snapshot(csi::DeleteSnapshotRequest {
        snapshot_id: "nope@s".into(),
        ..Default::default()
    })
    .await
    .unwrap();
}

fn source(kind: &str, id: &str) -> Option<csi::VolumeContentSource> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let t = match kind {
        "snapshot" => Type::Snapshot(SnapshotSource {
            snapshot_id: id.into(),
        }),
        _ => Type::Volume(VolumeSource {
            volume_id: id.into(),
        }),
    };
    Some(csi::VolumeContentSource { r#type: Some(t) })
}

async fn conformance(test: &str, etcd: Option<&Etcd>) {
    let dir = test_dir(test);
    let sock = dir.join("csi.sock");
    let endpoint = format!("unix://{}", sock.display());
    let control = Control::start_with(
        &dir.join("control"),
        etcd.map(|e| e.url.as_str()),
        0,
        &["--csi-endpoint", &endpoint],
    );
    let mut nodes = zoned_nodes(&dir, &control, 3);
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let channel = cairn_csi::connect(&sock).await.unwrap();
    let mut id = IdentityClient::new(channel.clone());
    let mut c = ControllerClient::new(channel);

    let info = id
        .get_plugin_info(csi::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, cairn_csi::DRIVER_NAME);
    let ready = id
        .probe(csi::ProbeRequest {})
        .await
        .unwrap()
        .into_inner()
        .ready;
    assert_eq!(ready, Some(true));
    let caps = c
        .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    assert!(caps.len() >= 8, "{caps:?}");

    missing_fields(&mut c).await;

    // Create: idempotent by name; topology names the replica nodes.
    let v = create(&mut c, create_req("pvc-a", 16 * MIB, 3)).await;
    assert_eq!(
        (v.volume_id.as_str(), v.capacity_bytes),
        ("pvc-a", 16 * MIB)
    );
    assert_eq!(v.volume_context["fsType"], "ext4");
    let mut zones: Vec<String> = v
        .accessible_topology
        .iter()
        .map(|t| t.segments[cairn_csi::TOPOLOGY_ZONE_KEY].clone())
        .collect();
    zones.sort();
    assert_eq!(zones, ["z1", "z2", "z3"]);
    assert!(v
        .accessible_topology
        .iter()
        .all(|t| t.segments[cairn_csi::TOPOLOGY_NODE_KEY].starts_with('n')));
    let again = create(&mut c, create_req("pvc-a", 16 * MIB - 5, 3)).await;
    assert_eq!(again, v, "a compatible repeat answers the same volume");
    assert_eq!(
        code(c.create_volume(create_req("pvc-a", 32 * MIB, 3)).await),
        Code::AlreadyExists
    );
    let mut tight = create_req("pvc-t", 1000, 1);
    tight.capacity_range.as_mut().unwrap().limit_bytes = 2000;
    assert_eq!(code(c.create_volume(tight).await), Code::OutOfRange);
    let huge = create_req("pvc-h", 1 << 40, 1);
    assert_eq!(code(c.create_volume(huge).await), Code::ResourceExhausted);
    // A requisite zone places every replica there.
    let mut zoned = create_req("pvc-z", 4 * MIB, 1);
    zoned.accessibility_requirements = Some(csi::TopologyRequirement {
        requisite: vec![csi::Topology {
            segments: HashMap::from([(cairn_csi::TOPOLOGY_ZONE_KEY.to_string(), "z2".to_string())]),
        }],
        preferred: Vec::new(),
    });
    let z = create(&mut c, zoned).await;
    assert_eq!(z.accessible_topology.len(), 1);
    assert_eq!(
        z.accessible_topology[0].segments[cairn_csi::TOPOLOGY_NODE_KEY],
        "n2"
    );

    not_found(&mut c).await;

    let valid = c
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "pvc-a".into(),
            volume_capabilities: vec![mount()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(valid.confirmed.is_some(), "{valid:?}");
    let mut multi = mount();
    multi.access_mode.as_mut().unwrap().mode =
        csi::volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32;
    let refused = c
        .validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "pvc-a".into(),
            volume_capabilities: vec![multi],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(refused.confirmed.is_none() && !refused.message.is_empty());

    // The controller side of the lifecycle, each step twice.
    let uri = publish(&mut c, "pvc-a", "n1").await.unwrap();
    assert!(
        uri.starts_with("nbd://") && uri.ends_with("/pvc-a"),
        "{uri}"
    );
    assert_eq!(publish(&mut c, "pvc-a", "n1").await.unwrap(), uri);
    write_pattern(&uri);
    let err = publish(&mut c, "pvc-a", "n2").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("n1"), "{err:?}");
    unpublish(&mut c, "pvc-a", "n2").await;
    let still = control.get("/v1/volumes/pvc-a");
    assert_eq!(
        still["attached"]["node"], "n1",
        "unpublish from another node is a no-op"
    );
    let r = c
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: "pvc-a".into(),
            name: "snap-a".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(
        code(r),
        Code::FailedPrecondition,
        "a published volume is not snapshotted"
    );
    unpublish(&mut c, "pvc-a", "n1").await;
    unpublish(&mut c, "pvc-a", "n1").await;

    // Snapshot, restore, clone, expand.
    let s = snapshot(&mut c, "pvc-a", "snap-a").await;
    assert!(s.ready_to_use && s.snapshot_id == "pvc-a@snap-a", "{s:?}");
    assert_eq!(
        snapshot(&mut c, "pvc-a", "snap-a").await.snapshot_id,
        s.snapshot_id
    );
    let r = c
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: "pvc-z".into(),
            name: "snap-a".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::AlreadyExists);
    let mut restore = create_req("pvc-r", 16 * MIB, 3);
    restore.volume_content_source = source("snapshot", "pvc-a@snap-a");
    let r = create(&mut c, restore.clone()).await;
    assert_eq!(r.content_source, restore.volume_content_source);
    assert_eq!(create(&mut c, restore).await.volume_id, "pvc-r");
    let mut clone = create_req("pvc-c", 16 * MIB, 3);
    clone.volume_content_source = source("volume", "pvc-a");
    let cl = create(&mut c, clone).await;
    assert_eq!(cl.content_source, source("volume", "pvc-a"));
    for (volume, node) in [("pvc-r", "n2"), ("pvc-c", "n3")] {
        let uri = publish(&mut c, volume, node).await.unwrap();
        read_back(&uri);
        unpublish(&mut c, volume, node).await;
    }
    let expand = csi::ControllerExpandVolumeRequest {
        volume_id: "pvc-z".into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: 8 * MIB,
            limit_bytes: 0,
        }),
        volume_capability: Some(mount()),
        ..Default::default()
    };
    for _ in 0..2 {
        let e = c
            .controller_expand_volume(expand.clone())
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (e.capacity_bytes, e.node_expansion_required),
            (8 * MIB, true)
        );
    }

    // Pagination over at least 5 volumes and 5 snapshots.
    for i in 1..=4 {
        snapshot(&mut c, "pvc-z", &format!("snap-z{i}")).await;
    }
    let (ids, pages) = all_volumes(&mut c).await;
    assert_eq!(ids, ["pvc-a", "pvc-c", "pvc-r", "pvc-z"].map(String::from));
    assert_eq!(pages, 2);
    for i in 1..=2 {
        create(&mut c, create_req(&format!("pvc-p{i}"), 4 * MIB, 1)).await;
    }
    let (ids, pages) = all_volumes(&mut c).await;
    assert_eq!(ids.len(), 6);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    assert_eq!(pages, 3);
    let bad = c
        .list_volumes(csi::ListVolumesRequest {
            max_entries: 2,
            starting_token: "bogus".into(),
        })
        .await;
    assert_eq!(code(bad), Code::Aborted);
    let (snaps, pages) = all_snapshots(&mut c, "").await;
    // snap-a, the clone's snapshot of pvc-a, and four of pvc-z.
    assert_eq!(snaps.len(), 6, "{snaps:?}");
    assert_eq!(pages, 3);
    let (of_z, _) = all_snapshots(&mut c, "pvc-z").await;
    assert_eq!(
        of_z,
        (1..=4)
            .map(|i| format!("pvc-z@snap-z{i}"))
            .collect::<Vec<_>>()
    );
    let one = c
        .list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: "pvc-z@snap-z3".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(one.entries.len(), 1);
    let bad = c
        .list_snapshots(csi::ListSnapshotsRequest {
            starting_token: "bogus".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(bad), Code::Aborted);

    // GetCapacity: one volume of R replicas fits R pools.
    let capacity = |replicas: &str| csi::GetCapacityRequest {
        parameters: HashMap::from([("replicas".to_string(), replicas.to_string())]),
        ..Default::default()
    };
    let one = c.get_capacity(capacity("1")).await.unwrap().into_inner();
    let three = c.get_capacity(capacity("3")).await.unwrap().into_inner();
    assert!(
        one.available_capacity > 0 && one.available_capacity <= 128 * MIB,
        "{one:?}"
    );
    assert!(
        three.available_capacity <= one.available_capacity,
        "{three:?}"
    );

    // Deletes: a volume with snapshots waits for them; every delete is idempotent.
    let r = c
        .delete_volume(csi::DeleteVolumeRequest {
            volume_id: "pvc-z".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
    for i in 1..=4 {
        for _ in 0..2 {
            c.delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: format!("pvc-z@snap-z{i}"),
                ..Default::default()
            })
            .await
            .unwrap();
        }
    }
    assert!(all_snapshots(&mut c, "pvc-z").await.0.is_empty());
    wait_for("the snapshots gone from the record", STATE_TIMEOUT, || {
        control.get("/v1/volumes/pvc-z")["snapshots"]
            .as_array()
            .unwrap()
            .is_empty()
            .then_some(())
    });
    for volume in ["pvc-z", "pvc-p1", "pvc-p2", "pvc-r"] {
        for _ in 0..2 {
            c.delete_volume(csi::DeleteVolumeRequest {
                volume_id: volume.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        }
    }

    if let Some(etcd) = etcd {
        follower_refuses(&dir, etcd).await;
    }
    publish_fencing(&control, &mut c, &mut nodes).await;
}

/// A second control process on the same etcd follows: it answers reads, and refuses a
/// mutating RPC with UNAVAILABLE naming the leader.
async fn follower_refuses(dir: &Path, etcd: &Etcd) {
    let sock = dir.join("csi-follower.sock");
    let endpoint = format!("unix://{}", sock.display());
    let follower = Control::start_with(
        &dir.join("follower"),
        Some(&etcd.url),
        0,
        &["--csi-endpoint", &endpoint],
    );
    assert!(!follower.is_leader());
    let mut c = ControllerClient::new(cairn_csi::connect(&sock).await.unwrap());
    let listed = c
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!listed.entries.is_empty());
    let err = c
        .create_volume(create_req("pvc-follower", 4 * MIB, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("not the leader"), "{err:?}");
}

/// Publish to another node: refused while the published node is up; once it was killed and
/// its lease expired, at once, at a raised epoch, and the data reads back there.
async fn publish_fencing(control: &Control, c: &mut Ctl, nodes: &mut [NodeProc]) {
    create(c, create_req("pvc-f", 16 * MIB, 3)).await;
    let uri = publish(c, "pvc-f", "n1").await.unwrap();
    write_pattern(&uri);
    let err = publish(c, "pvc-f", "n2").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let epoch = control.get("/v1/volumes/pvc-f")["epoch"].as_u64().unwrap();
    nodes[0].kill9();
    let killed = Instant::now();
    control.wait_state("n1", "down");
    let down = killed.elapsed();
    let moved = Instant::now();
    let uri = publish(c, "pvc-f", "n2").await.unwrap();
    println!(
        "publish on n2: node n1 marked down {down:?} after kill -9, publish answered {:?} later",
        moved.elapsed()
    );
    assert!(
        uri.contains(&nodes[1].nbd),
        "{uri} is not on n2 ({})",
        nodes[1].nbd
    );
    let v = control.get("/v1/volumes/pvc-f");
    assert!(
        v["epoch"].as_u64().unwrap() > epoch,
        "the old nexus is fenced: {v}"
    );
    assert_eq!(v["attached"]["node"], "n2");
    read_back(&uri);
    assert_eq!(publish(c, "pvc-f", "n2").await.unwrap(), uri);
    unpublish(c, "pvc-f", "n2").await;
}

/// The lifecycle of one volume through the CSI sockets only, every call twice.
async fn lifecycle(test: &str) {
    let dir = test_dir(test);
    let control_sock = dir.join("csi-control.sock");
    let node_sock = dir.join("csi-node.sock");
    let endpoint = |p: &Path| format!("unix://{}", p.display());
    let control = Control::start_with(
        &dir.join("control"),
        None,
        0,
        &["--csi-endpoint", &endpoint(&control_sock)],
    );
    let node_endpoint = endpoint(&node_sock);
    let _nodes: Vec<NodeProc> = (1..=3)
        .map(|i| {
            let zone = format!("z{i}");
            let mut extra = vec!["--zone", zone.as_str()];
            if i == 1 {
                extra.extend(["--csi-endpoint", node_endpoint.as_str()]);
            }
            NodeProc::start(
                &dir.join(format!("n{i}")),
                &control.url,
                &format!("n{i}"),
                &extra,
            )
        })
        .collect();
    for i in 1..=3 {
        control.wait_state(&format!("n{i}"), "up");
    }
    control.wait_leader();
    let mut c = ControllerClient::new(cairn_csi::connect(&control_sock).await.unwrap());
    let mut node = NodeClient::new(cairn_csi::connect(&node_sock).await.unwrap());
    let me = node
        .node_get_info(csi::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .node_id;
    assert_eq!(me, "n1");
    let volume = "pvc-life";
    let staging = dir.join("kubelet/staging");
    let target = dir.join("kubelet/pods/p/mount");

    let mut created = Vec::new();
    for _ in 0..2 {
        created.push(create(&mut c, create_req(volume, 16 * MIB, 3)).await);
    }
    assert_eq!(created[0], created[1]);
    let v = &created[0];
    let mut contexts = Vec::new();
    for _ in 0..2 {
        let r = c
            .controller_publish_volume(csi::ControllerPublishVolumeRequest {
                volume_id: volume.into(),
                node_id: me.clone(),
                volume_capability: Some(mount()),
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        contexts.push(r.publish_context);
    }
    assert_eq!(contexts[0], contexts[1]);
    let stage = csi::NodeStageVolumeRequest {
        volume_id: volume.into(),
        publish_context: contexts[0].clone(),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(mount()),
        volume_context: v.volume_context.clone(),
        ..Default::default()
    };
    for _ in 0..2 {
        node.node_stage_volume(stage.clone()).await.unwrap();
    }
    let publish = csi::NodePublishVolumeRequest {
        volume_id: volume.into(),
        publish_context: contexts[0].clone(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(mount()),
        volume_context: v.volume_context.clone(),
        ..Default::default()
    };
    for _ in 0..2 {
        node.node_publish_volume(publish.clone()).await.unwrap();
    }
    let data = b"written through the published mount";
    std::fs::write(target.join("file"), data).unwrap();
    // Read back past the page cache: the bytes come from the volume.
    sync_and_drop_caches(&target);
    assert_eq!(std::fs::read(target.join("file")).unwrap(), data);
    for _ in 0..2 {
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: volume.into(),
            target_path: target.to_string_lossy().into(),
        })
        .await
        .unwrap();
    }
    assert!(!target.exists());
    for _ in 0..2 {
        node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: volume.into(),
            staging_target_path: staging.to_string_lossy().into(),
        })
        .await
        .unwrap();
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&*staging.to_string_lossy()), "{mounts}");
    assert!(!dir.join("n1/csi").join(volume).exists());
    let loops = std::process::Command::new("losetup")
        .arg("-a")
        .output()
        .unwrap();
    let loops = String::from_utf8_lossy(&loops.stdout);
    assert!(!loops.contains(&format!("/{volume}/fuse/nbd")), "{loops}");
    for _ in 0..2 {
        unpublish(&mut c, volume, &me).await;
    }
    for _ in 0..2 {
        c.delete_volume(csi::DeleteVolumeRequest {
            volume_id: volume.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    drop(std::fs::remove_file(&node_sock));
}

/// Writes the file system's dirty pages out and drops the page cache, so what is read next
/// comes from the device.
fn sync_and_drop_caches(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", b"3").unwrap();
}

fn run(test: &str, etcd: Option<&Etcd>) {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(conformance(test, etcd));
}

#[test]
fn the_full_lifecycle_through_the_csi_sockets_is_idempotent() {
    let tools = [
        ("nbdfuse", "libnbd-bin"),
        ("fusermount3", "fuse3"),
        ("losetup", "mount"),
        ("blkid", "util-linux"),
        ("mkfs.ext4", "e2fsprogs"),
    ];
    if !tools.iter().all(|(t, p)| require_tool(t, p)) || !require_root("losetup and mount") {
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(lifecycle("csi-lifecycle"));
}

#[test]
fn csi_on_the_embedded_store() {
    run("csi-embedded", None);
}

#[test]
fn csi_on_etcd() {
    let dir = test_dir("csi-etcd-store");
    let Some(etcd) = Etcd::start(&dir) else {
        return;
    };
    run("csi-etcd", Some(&etcd));
}
