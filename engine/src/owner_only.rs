//! Owner-only files: the modes of everything a Cairn process keeps on disk or binds in the
//! file system (the data dir, pool files, epoch and generation files, unix sockets), set
//! explicitly whatever the umask, and repaired at start.
//!
//! A pool file holds every volume's plaintext, and an epoch file is a fence: a umask of 022
//! would leave both readable (the pool) or replaceable through a readable directory by any
//! local user. So a directory is created 0700 and a file 0600 by the process that makes it,
//! and a file or directory found with other bits (made by an older version, or by hand) is
//! narrowed at start with a warning naming it and its old mode. The caller creates with
//! [`DIR_MODE`] / [`FILE_MODE`] through `DirBuilderExt` / `OpenOptionsExt`; this module never
//! decides which paths are Cairn's.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Mode of every directory Cairn creates: only the owner may list or enter it.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file Cairn creates (pools, epoch and generation files).
pub const FILE_MODE: u32 = 0o600;
/// Mode of every unix socket Cairn binds: connecting needs write permission on it.
pub const SOCKET_MODE: u32 = 0o600;
/// The permission bits a mode is compared on (setuid, setgid, sticky and rwx for all).
const PERMISSION_BITS: u32 = 0o7777;

/// Creates `path` and any missing parents with [`DIR_MODE`], then makes sure `path` itself has
/// that mode (parents that existed are the operator's and stay as they are).
pub fn create_dir_all(path: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)?;
    enforce(path, DIR_MODE)
}

/// Sets the mode of something this process has just created with a mode it cannot choose at
/// creation (a unix socket takes `0777 & !umask` from `bind`). Silent: nothing was wrong.
pub fn set_created(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// Sets `path`'s permission bits to `mode` when they differ, logging a warning with the path
/// and the old mode. Follows symlinks, as opening the path would.
pub fn enforce(path: &Path, mode: u32) -> std::io::Result<()> {
    let old = std::fs::metadata(path)?.permissions().mode() & PERMISSION_BITS;
    if old == mode {
        return Ok(());
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    tracing::warn!(
        path = %path.display(),
        old_mode = format!("{old:o}"),
        new_mode = format!("{mode:o}"),
        "file was open to other users; restricted to its owner"
    );
    Ok(())
}
