//! `cairnctl csi …`: one CSI call per command, to a plugin's unix socket, as a container
//! orchestrator makes them (the Controller calls to cairn-control's `--csi-endpoint`, the
//! Node calls to a cairn-node's). For trying the driver by hand and for the scripts that
//! play kubelet and the sidecars (ci/e2e-pg.sh). Each command prints what the CO would keep:
//! the volume id, the publish context's NBD URI; errors print the gRPC code and message.

use anyhow::{Context, Result};
use cairn_control::units::parse_size;
use cairn_csi::v1;
use cairn_csi::v1::controller_client::ControllerClient;
use cairn_csi::v1::node_client::NodeClient;
use clap::{Args, Subcommand};
use std::collections::HashMap;

#[derive(Args)]
pub struct CsiArgs {
    /// The plugin's socket (cairn-control or cairn-node --csi-endpoint).
    #[arg(long, value_name = "unix:///PATH")]
    endpoint: String,
    #[command(subcommand)]
    cmd: CsiCmd,
}

#[derive(Subcommand)]
enum CsiCmd {
    /// CreateVolume: prints the volume id.
    CreateVolume {
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long, default_value_t = 3)]
        replicas: u32,
        #[arg(long, default_value = "ext4")]
        fs_type: String,
    },
    /// DeleteVolume.
    DeleteVolume { volume: String },
    /// ControllerPublishVolume to a node: prints the NBD URI of the publish context.
    ControllerPublish {
        volume: String,
        #[arg(long)]
        node: String,
    },
    /// ControllerUnpublishVolume from a node.
    ControllerUnpublish {
        volume: String,
        #[arg(long)]
        node: String,
    },
    /// NodeStageVolume: connect the NBD URI and mount it (or stage the device, --block).
    NodeStage {
        volume: String,
        #[arg(long)]
        uri: String,
        #[arg(long)]
        staging: String,
        #[arg(long, default_value = "ext4")]
        fs_type: String,
        #[arg(long)]
        block: bool,
    },
    /// NodePublishVolume: bind the staged volume onto the target path.
    NodePublish {
        volume: String,
        #[arg(long)]
        staging: String,
        #[arg(long)]
        target: String,
        #[arg(long, default_value = "ext4")]
        fs_type: String,
        #[arg(long)]
        block: bool,
        #[arg(long)]
        readonly: bool,
    },
    /// NodeUnpublishVolume.
    NodeUnpublish {
        volume: String,
        #[arg(long)]
        target: String,
    },
    /// NodeUnstageVolume.
    NodeUnstage {
        volume: String,
        #[arg(long)]
        staging: String,
    },
    /// NodeGetInfo: prints the node id and its topology.
    NodeInfo,
}

fn capability(fs_type: &str, block: bool, readonly: bool) -> v1::VolumeCapability {
    use v1::volume_capability::{access_mode::Mode, AccessMode, AccessType};
    let mode = if readonly {
        Mode::SingleNodeReaderOnly
    } else {
        Mode::SingleNodeWriter
    };
    v1::VolumeCapability {
        access_type: Some(if block {
            AccessType::Block(v1::volume_capability::BlockVolume {})
        } else {
            AccessType::Mount(v1::volume_capability::MountVolume {
                fs_type: fs_type.to_string(),
                mount_flags: Vec::new(),
                volume_mount_group: String::new(),
            })
        }),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub async fn run(args: CsiArgs) -> Result<()> {
    let path = cairn_csi::endpoint_path(&args.endpoint)?;
    let channel = cairn_csi::connect(&path)
        .await
        .with_context(|| format!("cannot reach the CSI plugin at {}", path.display()))?;
    let mut ctl = ControllerClient::new(channel.clone());
    let mut node = NodeClient::new(channel);
    match args.cmd {
        CsiCmd::CreateVolume {
            name,
            size,
            replicas,
            fs_type,
        } => {
            let size = i64::try_from(size).context("--size is too large")?;
            let r = ctl
                .create_volume(v1::CreateVolumeRequest {
                    name,
                    capacity_range: Some(v1::CapacityRange {
                        required_bytes: size,
                        limit_bytes: 0,
                    }),
                    volume_capabilities: vec![capability(&fs_type, false, false)],
                    parameters: HashMap::from([
                        (cairn_csi::PARAM_REPLICAS.to_string(), replicas.to_string()),
                        (cairn_csi::PARAM_FS_TYPE.to_string(), fs_type),
                    ]),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let v = r.volume.context("CreateVolume answered no volume")?;
            println!("{}", v.volume_id);
        }
        CsiCmd::DeleteVolume { volume } => {
            ctl.delete_volume(v1::DeleteVolumeRequest {
                volume_id: volume,
                secrets: HashMap::new(),
            })
            .await?;
        }
        CsiCmd::ControllerPublish { volume, node: id } => {
            let r = ctl
                .controller_publish_volume(v1::ControllerPublishVolumeRequest {
                    volume_id: volume,
                    node_id: id,
                    volume_capability: Some(capability("ext4", false, false)),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let uri = r
                .publish_context
                .get(cairn_csi::PUBLISH_CONTEXT_NBD_URI)
                .context("the publish context has no NBD URI")?;
            println!("{uri}");
        }
        CsiCmd::ControllerUnpublish { volume, node: id } => {
            ctl.controller_unpublish_volume(v1::ControllerUnpublishVolumeRequest {
                volume_id: volume,
                node_id: id,
                secrets: HashMap::new(),
            })
            .await?;
        }
        CsiCmd::NodeStage {
            volume,
            uri,
            staging,
            fs_type,
            block,
        } => {
            node.node_stage_volume(v1::NodeStageVolumeRequest {
                volume_id: volume,
                publish_context: HashMap::from([(
                    cairn_csi::PUBLISH_CONTEXT_NBD_URI.to_string(),
                    uri,
                )]),
                staging_target_path: staging,
                volume_capability: Some(capability(&fs_type, block, false)),
                ..Default::default()
            })
            .await?;
        }
        CsiCmd::NodePublish {
            volume,
            staging,
            target,
            fs_type,
            block,
            readonly,
        } => {
            node.node_publish_volume(v1::NodePublishVolumeRequest {
                volume_id: volume,
                staging_target_path: staging,
                target_path: target,
                volume_capability: Some(capability(&fs_type, block, readonly)),
                readonly,
                ..Default::default()
            })
            .await?;
        }
        CsiCmd::NodeUnpublish { volume, target } => {
            node.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
                volume_id: volume,
                target_path: target,
            })
            .await?;
        }
        CsiCmd::NodeUnstage { volume, staging } => {
            node.node_unstage_volume(v1::NodeUnstageVolumeRequest {
                volume_id: volume,
                staging_target_path: staging,
            })
            .await?;
        }
        CsiCmd::NodeInfo => {
            let r = node
                .node_get_info(v1::NodeGetInfoRequest {})
                .await?
                .into_inner();
            let mut segments: Vec<String> = r
                .accessible_topology
                .map(|t| {
                    t.segments
                        .into_iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect()
                })
                .unwrap_or_default();
            segments.sort();
            println!("{} {}", r.node_id, segments.join(" "));
        }
    }
    Ok(())
}
