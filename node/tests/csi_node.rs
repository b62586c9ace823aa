//! Guards the CSI node plugin (`cairn-node --csi-endpoint`) the way kubelet drives it, with
//! the project's own CSI client against a real cairn-node that serves a volume over NBD:
//! Identity (name, probe), NodeGetInfo (node id and zone topology), NodeGetCapabilities; every
//! missing required field is INVALID_ARGUMENT; publish before stage is FAILED_PRECONDITION;
//! stage (nbdfuse, a loop device, a new ext4, a mount) and publish (a bind mount) are
//! idempotent, as are unpublish and unstage; a read-only publish refuses writes; a file
//! written through the published mount is still there after unstage and a second stage,
//! which therefore did not make a new filesystem; block access publishes the device itself;
//! a stage of a URI nobody serves is UNAVAILABLE and leaves nothing staged; an unstage after
//! nbdfuse was killed and its mount lazily unmounted still detaches its loop device (whose
//! backing file then reads `/nbd`), and a second unstage is OK. All of that through nbdfuse and a loop
//! device (`--csi-nbd fuse`), and again through the kernel's NBD device (`--csi-nbd kernel`)
//! where the kernel has it (/dev/nbd0); where it does not, a kernel stage is
//! FAILED_PRECONDITION naming the missing module and leaves nothing staged. Needs root,
//! nbdfuse, nbd-client, fusermount3, losetup, blkid and mkfs.ext4 (skipped elsewhere, failed
//! under CI); the kernel lifecycle is skipped, even under CI, where the kernel lacks NBD.

mod common;

use cairn_csi::v1;
use cairn_csi::v1::identity_client::IdentityClient;
use cairn_csi::v1::node_client::NodeClient;
use cairn_testkit::skip::{require_kernel_feature, require_root, require_tool};
use common::{ExportSpec, Server, MIB};
use std::collections::HashMap;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use tonic::Code;

const VOL: &str = "pv1";
const SIZE_BYTES: u64 = 128 * MIB;

fn mount_cap(readonly_mode: bool) -> v1::VolumeCapability {
    use v1::volume_capability::{access_mode::Mode, AccessMode, AccessType, MountVolume};
    let mode = if readonly_mode {
        Mode::SingleNodeReaderOnly
    } else {
        Mode::SingleNodeWriter
    };
    v1::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            mount_flags: Vec::new(),
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn block_cap() -> v1::VolumeCapability {
    use v1::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume};
    v1::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

fn stage_req(uri: &str, staging: &Path, cap: v1::VolumeCapability) -> v1::NodeStageVolumeRequest {
    v1::NodeStageVolumeRequest {
        volume_id: VOL.into(),
        publish_context: HashMap::from([(
            cairn_csi::PUBLISH_CONTEXT_NBD_URI.to_string(),
            uri.to_string(),
        )]),
        staging_target_path: staging.to_string_lossy().into(),
        volume_capability: Some(cap),
        secrets: HashMap::new(),
        volume_context: HashMap::new(),
    }
}

fn publish_req(
    staging: &Path,
    target: &Path,
    cap: v1::VolumeCapability,
    readonly: bool,
) -> v1::NodePublishVolumeRequest {
    v1::NodePublishVolumeRequest {
        volume_id: VOL.into(),
        publish_context: HashMap::new(),
        staging_target_path: staging.to_string_lossy().into(),
        target_path: target.to_string_lossy().into(),
        volume_capability: Some(cap),
        readonly,
        secrets: HashMap::new(),
        volume_context: HashMap::new(),
    }
}

fn unpublish_req(target: &Path) -> v1::NodeUnpublishVolumeRequest {
    v1::NodeUnpublishVolumeRequest {
        volume_id: VOL.into(),
        target_path: target.to_string_lossy().into(),
    }
}

fn unstage_req(staging: &Path) -> v1::NodeUnstageVolumeRequest {
    v1::NodeUnstageVolumeRequest {
        volume_id: VOL.into(),
        staging_target_path: staging.to_string_lossy().into(),
    }
}

fn mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = path.to_string_lossy();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| m == want)
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> Code {
    r.expect_err("the call must fail").code()
}

/// The tools every stage needs, and root; false (skipped) or a failure under CI without them.
fn stage_requirements() -> bool {
    let tools = [
        ("nbdfuse", "libnbd-bin"),
        ("nbd-client", "nbd-client"),
        ("fusermount3", "fuse3"),
        ("losetup", "mount"),
        ("blkid", "util-linux"),
        ("mkfs.ext4", "e2fsprogs"),
    ];
    tools.iter().all(|(t, p)| require_tool(t, p)) && require_root("losetup and mount")
}

/// A cairn-node serving `VOL` with the CSI node plugin on a socket, `--csi-nbd nbd`.
fn start_node(test: &str, nbd: &str) -> (Server, PathBuf) {
    let sock =
        std::env::temp_dir().join(format!("cairn-csi-node-{}-{nbd}.sock", std::process::id()));
    let endpoint = format!("unix://{}", sock.display());
    let s = Server::start_with(
        test,
        &[ExportSpec::volume(VOL, SIZE_BYTES)],
        &[
            "--csi-endpoint",
            &endpoint,
            "--node-id",
            "n1",
            "--zone",
            "z1",
            "--csi-nbd",
            nbd,
        ],
    );
    (s, sock)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn the_node_plugin_stages_publishes_and_takes_down_idempotently() {
    if !stage_requirements() {
        return;
    }
    let (s, sock) = start_node("csi_node", "fuse");
    let uri = s.tcp_uri(VOL).expect("cairn-node serves TCP");
    let root: PathBuf = s.dir.join("kubelet");
    let rt = runtime();
    rt.block_on(lifecycle(&sock, &uri, &root));
    rt.block_on(nbdfuse_killed(&sock, &uri, &root, &s.dir.join("data/csi")));
    drop(std::fs::remove_file(&sock));
}

#[test]
fn the_kernel_nbd_path_stages_where_the_kernel_has_nbd_and_fails_cleanly_elsewhere() {
    if !stage_requirements() {
        return;
    }
    let (s, sock) = start_node("csi_node_kernel", "kernel");
    let uri = s.tcp_uri(VOL).expect("cairn-node serves TCP");
    let root: PathBuf = s.dir.join("kubelet");
    let rt = runtime();
    let has_nbd = Path::new("/dev/nbd0").exists();
    if require_kernel_feature(
        has_nbd,
        "NBD device (/dev/nbd0; the nbd module): the kernel-path lifecycle did not run",
    ) {
        rt.block_on(lifecycle(&sock, &uri, &root));
    } else if !Path::new("/sys/module/nbd").exists() {
        rt.block_on(kernel_stage_refused(
            &sock,
            &uri,
            &root,
            &s.dir.join("data/csi"),
        ));
    }
    drop(std::fs::remove_file(&sock));
}

/// Without the kernel's NBD, `--csi-nbd kernel` refuses a stage before making anything.
async fn kernel_stage_refused(sock: &Path, uri: &str, root: &Path, state: &Path) {
    let mut node = NodeClient::new(cairn_csi::connect(sock).await.unwrap());
    let staging = root.join("staging");
    let e = node
        .node_stage_volume(stage_req(uri, &staging, mount_cap(false)))
        .await
        .expect_err("no kernel NBD: the stage must fail");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("nbd module"), "{e:?}");
    assert!(!mounted(&staging));
    assert!(!state.join(VOL).exists(), "a refused stage left a record");
    node.node_unstage_volume(unstage_req(&staging))
        .await
        .unwrap();
}

/// `losetup -n -O NAME,BACK-FILE`: every loop device and its backing file.
fn loop_devices() -> String {
    common::run_ok("losetup", &["-n", "-O", "NAME,BACK-FILE"])
}

/// nbdfuse dies under a staged volume (kill -9): the loop device then shows `/nbd` as its
/// backing file, and the unstage must still find it by its recorded backing identity.
async fn nbdfuse_killed(sock: &Path, uri: &str, root: &Path, state: &Path) {
    let mut node = NodeClient::new(cairn_csi::connect(sock).await.unwrap());
    let staging = root.join("staging-killed");
    node.node_stage_volume(stage_req(uri, &staging, mount_cap(false)))
        .await
        .unwrap();
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join(VOL).join("stage.json")).unwrap())
            .unwrap();
    let t = &record["transport"];
    assert_eq!(t["kind"], "nbdfuse", "{record}");
    let device = t["loop_device"].as_str().unwrap().to_string();
    let pid = t["pid"].as_u64().unwrap() as libc::pid_t;
    assert!(t["diskseq"].is_u64(), "{record}");
    assert!(loop_devices().contains(&device));
    // SAFETY: kill(2) of the nbdfuse this test's stage started; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    // Dead once its command line is gone (a zombie until cairn-node reaps it at unstage).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty()) {
        assert!(
            std::time::Instant::now() < deadline,
            "nbdfuse {pid} outlived kill -9"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // nbdfuse's dead mount stays while the loop device holds its file; a lazy unmount (what
    // `fusermount3 -uz` of an unstage that failed does) leaves the loop device backed by a
    // file that reads `/nbd`, no longer this volume's path.
    let fuse = state.join(VOL).join("fuse");
    common::run_ok("umount", &["-l", &fuse.to_string_lossy()]);
    let before = loop_devices();
    println!("after kill -9 of nbdfuse and a lazy unmount of its mount: {before}");
    assert!(
        before
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == [device.as_str(), "/nbd"]),
        "{before}"
    );
    for _ in 0..2 {
        node.node_unstage_volume(unstage_req(&staging))
            .await
            .unwrap();
    }
    assert!(!mounted(&staging));
    assert!(!state.join(VOL).exists());
    let after = loop_devices();
    assert!(
        !after
            .lines()
            .any(|l| l.split_whitespace().next() == Some(device.as_str())),
        "{device} is still attached after the unstage: {after}"
    );
    assert!(!after.contains(&format!("/{VOL}/fuse/nbd")), "{after}");
}

async fn lifecycle(sock: &Path, uri: &str, root: &Path) {
    let channel = cairn_csi::connect(sock).await.unwrap();
    let mut identity = IdentityClient::new(channel.clone());
    let mut node = NodeClient::new(channel);

    let info = identity
        .get_plugin_info(v1::GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, cairn_csi::DRIVER_NAME);
    let probe = identity
        .probe(v1::ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(probe.ready, Some(true));
    let me = node
        .node_get_info(v1::NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.node_id, "n1");
    let segments = me.accessible_topology.unwrap().segments;
    assert_eq!(segments[cairn_csi::TOPOLOGY_ZONE_KEY], "z1");
    assert_eq!(segments[cairn_csi::TOPOLOGY_NODE_KEY], "n1");
    let caps = node
        .node_get_capabilities(v1::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(caps.capabilities.len(), 3, "{caps:?}");

    let staging = root.join("staging");
    let target = root.join("pods/a/mount");
    let target_ro = root.join("pods/b/mount");

    // Each required field missing in turn.
    let good = stage_req(uri, &staging, mount_cap(false));
    let mut bad = Vec::new();
    let mut r = good.clone();
    r.volume_id.clear();
    bad.push(r);
    let mut r = good.clone();
    r.staging_target_path.clear();
    bad.push(r);
    let mut r = good.clone();
    r.volume_capability = None;
    bad.push(r);
    let mut r = good.clone();
    r.publish_context.clear();
    bad.push(r);
    for r in bad {
        assert_eq!(code(node.node_stage_volume(r).await), Code::InvalidArgument);
    }
    let mut r = publish_req(&staging, &target, mount_cap(false), false);
    r.target_path.clear();
    assert_eq!(
        code(node.node_publish_volume(r).await),
        Code::InvalidArgument
    );
    let mut r = unpublish_req(&target);
    r.volume_id.clear();
    assert_eq!(
        code(node.node_unpublish_volume(r).await),
        Code::InvalidArgument
    );
    let mut r = unstage_req(&staging);
    r.staging_target_path.clear();
    assert_eq!(
        code(node.node_unstage_volume(r).await),
        Code::InvalidArgument
    );
    let stats = |path: &Path| v1::NodeGetVolumeStatsRequest {
        volume_id: VOL.into(),
        volume_path: path.to_string_lossy().into(),
        staging_target_path: String::new(),
    };
    let mut r = stats(&target);
    r.volume_path.clear();
    assert_eq!(
        code(node.node_get_volume_stats(r).await),
        Code::InvalidArgument
    );
    // Publish before stage.
    assert_eq!(
        code(
            node.node_publish_volume(publish_req(&staging, &target, mount_cap(false), false))
                .await
        ),
        Code::FailedPrecondition
    );

    // Stage twice, publish twice: the second of each is a no-op.
    for _ in 0..2 {
        node.node_stage_volume(good.clone()).await.unwrap();
    }
    assert!(mounted(&staging));
    assert_eq!(
        code(
            node.node_stage_volume(stage_req(uri, &root.join("elsewhere"), mount_cap(false)))
                .await
        ),
        Code::AlreadyExists
    );
    for _ in 0..2 {
        node.node_publish_volume(publish_req(&staging, &target, mount_cap(false), false))
            .await
            .unwrap();
    }
    assert!(mounted(&target));
    // The same target asked read-only: refused, never left read-write.
    assert_eq!(
        code(
            node.node_publish_volume(publish_req(&staging, &target, mount_cap(false), true))
                .await
        ),
        Code::AlreadyExists
    );
    // Staged again from another URI while its filesystem is published: the CO must
    // unpublish first (the pod's mount would keep a dead device).
    let other = uri.replace("127.0.0.1", "localhost");
    assert_eq!(
        code(
            node.node_stage_volume(stage_req(&other, &staging, mount_cap(false)))
                .await
        ),
        Code::FailedPrecondition
    );
    std::fs::write(target.join("hello"), b"kept across stages").unwrap();
    let st = node
        .node_get_volume_stats(stats(&target))
        .await
        .unwrap()
        .into_inner();
    let bytes = &st.usage[0];
    assert!(bytes.total > 0 && bytes.used > 0, "{st:?}");
    // Read-only publish.
    node.node_publish_volume(publish_req(&staging, &target_ro, mount_cap(true), true))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(target_ro.join("hello")).unwrap(),
        b"kept across stages"
    );
    let err = std::fs::write(target_ro.join("x"), b"no").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    for t in [&target_ro, &target] {
        for _ in 0..2 {
            node.node_unpublish_volume(unpublish_req(t)).await.unwrap();
        }
        assert!(!mounted(t) && !t.exists());
    }
    for _ in 0..2 {
        node.node_unstage_volume(unstage_req(&staging))
            .await
            .unwrap();
    }
    assert!(!mounted(&staging));

    // Staged again: the filesystem is the one made before (no mkfs over data).
    node.node_stage_volume(good.clone()).await.unwrap();
    node.node_publish_volume(publish_req(&staging, &target, mount_cap(false), false))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(target.join("hello")).unwrap(),
        b"kept across stages"
    );
    node.node_unpublish_volume(unpublish_req(&target))
        .await
        .unwrap();
    node.node_unstage_volume(unstage_req(&staging))
        .await
        .unwrap();

    // Block access: the target is the device.
    let staging_b = root.join("staging-block");
    let device = root.join("pods/c/dev");
    node.node_stage_volume(stage_req(uri, &staging_b, block_cap()))
        .await
        .unwrap();
    node.node_publish_volume(publish_req(&staging_b, &device, block_cap(), false))
        .await
        .unwrap();
    assert!(std::fs::metadata(&device)
        .unwrap()
        .file_type()
        .is_block_device());
    let st = node
        .node_get_volume_stats(stats(&device))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(st.usage[0].total, SIZE_BYTES as i64, "{st:?}");
    node.node_unpublish_volume(unpublish_req(&device))
        .await
        .unwrap();
    node.node_unstage_volume(unstage_req(&staging_b))
        .await
        .unwrap();

    // A URI nobody serves: UNAVAILABLE, and nothing is left staged.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dead = format!("nbd://127.0.0.1:{port}/{VOL}");
    assert_eq!(
        code(
            node.node_stage_volume(stage_req(&dead, &staging, mount_cap(false)))
                .await
        ),
        Code::Unavailable
    );
    assert!(!mounted(&staging));
    node.node_unstage_volume(unstage_req(&staging))
        .await
        .unwrap();

    // A stage that fails after its loop device exists (the mount refuses an option) takes
    // down what it made: the CO treats the error as final and would never unstage.
    let mut r = stage_req(uri, &staging, mount_cap(false));
    if let Some(v1::volume_capability::AccessType::Mount(m)) = r
        .volume_capability
        .as_mut()
        .and_then(|c| c.access_type.as_mut())
    {
        m.mount_flags = vec!["nosuchoption".into()];
    }
    assert_eq!(code(node.node_stage_volume(r).await), Code::Internal);
    assert!(!mounted(&staging));
    let loops = common::run_ok("losetup", &["-a"]);
    assert!(!loops.contains(&format!("/{VOL}/fuse/nbd")), "{loops}");
}
