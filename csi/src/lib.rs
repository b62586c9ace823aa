//! cairn-csi: what both of Cairn's CSI plugins share. cairn-control serves Identity and
//! Controller, cairn-node serves Identity and Node, and both speak the same protobuf, name the
//! same driver and topology keys, and listen on a unix socket the same way.
//!
//! * [`v1`]: the CSI v1 messages and services, generated from `proto/csi.proto` (written from
//!   the CSI specification, field numbers and names as the spec has them);
//! * the names a CO sees: [`DRIVER_NAME`], the topology keys, the CreateVolume parameters and
//!   the publish-context key NodeStage reads;
//! * [`endpoint_path`], [`bind`] and [`connect`]: the `unix:///PATH` endpoint, served and
//!   dialled.
//!
//! It holds no behaviour of either plugin: docs/csi.md has the driver's design.

use std::path::{Path, PathBuf};

/// The CSI v1 messages and the Identity, Controller and Node services (server and client).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("csi.v1");
}

/// The driver's name (GetPluginInfo), the name a Kubernetes CSIDriver object and a
/// StorageClass's provisioner give.
pub const DRIVER_NAME: &str = "csi.cairn.io";
/// The topology key of a node's zone (its failure domain as `cairn-node --zone` sets it).
pub const TOPOLOGY_ZONE_KEY: &str = "topology.cairn.io/zone";
/// The topology key of a node's id (`cairn-node --node-id`).
pub const TOPOLOGY_NODE_KEY: &str = "topology.cairn.io/node";
/// CreateVolume parameter: the replica count, 1 to 3.
pub const PARAM_REPLICAS: &str = "replicas";
/// CreateVolume parameter: the filesystem NodeStage makes; echoed into the volume context.
pub const PARAM_FS_TYPE: &str = "fsType";
/// Parameters with this prefix are the Kubernetes sidecars' own and are ignored.
pub const PARAM_K8S_PREFIX: &str = "csi.storage.k8s.io/";
/// The publish-context key of the volume's NBD URI (`nbd://HOST:PORT/NAME`), which
/// ControllerPublishVolume answers and NodeStageVolume connects to.
pub const PUBLISH_CONTEXT_NBD_URI: &str = "nbdUri";
/// The volume-context key of the replica count.
pub const CONTEXT_REPLICAS: &str = "replicas";
/// The only endpoint scheme served: a unix socket.
pub const ENDPOINT_SCHEME: &str = "unix://";
/// The mode of the socket file: the CO (kubelet, the sidecars) runs as the same user, and no
/// one else may drive the storage.
pub const SOCKET_MODE: u32 = 0o600;

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("CSI endpoint '{0}' is not unix:///ABSOLUTE/PATH")]
    Scheme(String),
    #[error("CSI endpoint {path}: {what}: {source}")]
    Io {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("CSI endpoint {path}: a {kind} is there, not a stale socket; refusing to remove it")]
    NotASocket { path: PathBuf, kind: &'static str },
}

/// The socket path of a `unix:///PATH` endpoint.
pub fn endpoint_path(endpoint: &str) -> Result<PathBuf, EndpointError> {
    match endpoint.strip_prefix(ENDPOINT_SCHEME) {
        Some(path) if path.starts_with('/') && path.len() > 1 => Ok(PathBuf::from(path)),
        _ => Err(EndpointError::Scheme(endpoint.to_string())),
    }
}

/// Listens on the unix socket `path`: a stale socket file left by a process that died is
/// removed first (anything else at the path is refused, never deleted), and the new socket
/// gets [`SOCKET_MODE`].
pub fn bind(path: &Path) -> Result<tokio_stream::wrappers::UnixListenerStream, EndpointError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let io = |what: &'static str| {
        move |source| EndpointError::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(io("removing the stale socket"))?
        }
        Ok(m) => {
            return Err(EndpointError::NotASocket {
                path: path.to_path_buf(),
                kind: if m.is_dir() { "directory" } else { "file" },
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("reading what is at the path")(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io("binding"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .map_err(io("setting the socket's mode"))?;
    Ok(tokio_stream::wrappers::UnixListenerStream::new(listener))
}

/// A gRPC channel to the CSI plugin listening on the unix socket `path` (the CO's side; the
/// project's own tests use it). The URI given to the endpoint is a placeholder: every
/// connection goes to `path`.
pub async fn connect(path: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_path_buf();
    tonic::transport::Endpoint::from_static("http://csi.invalid")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_absolute_unix_endpoint_is_accepted() {
        assert_eq!(
            endpoint_path("unix:///run/csi/csi.sock").unwrap(),
            PathBuf::from("/run/csi/csi.sock")
        );
        for bad in [
            "/run/csi.sock",
            "unix://run/csi.sock",
            "unix:///",
            "tcp://x:1",
        ] {
            assert!(endpoint_path(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_a_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("cairn-csi-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("csi.sock");
        drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
        let listener = bind(&sock).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SOCKET_MODE);
        drop(listener);
        let file = dir.join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(bind(&file), Err(EndpointError::NotASocket { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
