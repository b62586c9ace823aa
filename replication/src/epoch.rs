//! Durable epochs: the highest epoch each hosted replica has accepted, one small file per
//! replica, written and synced before the replica acknowledges anything under that epoch.
//!
//! This is what fences a stale nexus: once a replica has stored epoch N, requests carrying an
//! epoch below N are refused, and the refusal survives a restart of the replica's node. A
//! file that exists but does not decode is an error, never epoch 0: reading a damaged fence
//! as "no fence" would let any old nexus write again.
//!
//! File format (`docs/formats.md`, "Replica epoch file"), 24 bytes little-endian:
//! magic "CRNE" (u32), version (u32), epoch (u64), reserved zero (u32), crc32c of the first
//! 20 bytes (u32). Replaced atomically: write a temporary file, fsync, rename, fsync the
//! directory.

use crate::proto::{Epoch, VolumeId};
use cairn_engine::owner_only;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub const EPOCH_FILE_MAGIC: u32 = u32::from_le_bytes(*b"CRNE");
pub const EPOCH_FILE_VERSION: u32 = 1;
pub const EPOCH_FILE_BYTES: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    #[error("epoch file '{path}': {what}: {source}")]
    Io {
        path: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("epoch file '{path}' is damaged: {why}")]
    Damaged { path: String, why: String },
}

/// The directory of epoch files.
#[derive(Debug)]
pub struct EpochStore {
    dir: PathBuf,
}

pub(crate) fn io(path: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> EpochError {
    let path = path.display().to_string();
    move |source| EpochError::Io { path, what, source }
}

/// Encodes one epoch file.
pub fn encode(epoch: Epoch) -> [u8; EPOCH_FILE_BYTES] {
    let mut b = [0u8; EPOCH_FILE_BYTES];
    b[0..4].copy_from_slice(&EPOCH_FILE_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&EPOCH_FILE_VERSION.to_le_bytes());
    b[8..16].copy_from_slice(&epoch.get().to_le_bytes());
    let crc = crc32c::crc32c(&b[..20]);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes one epoch file; the error says what is wrong.
pub fn decode(b: &[u8]) -> Result<Epoch, String> {
    if b.len() != EPOCH_FILE_BYTES {
        return Err(format!("{} bytes, expected {EPOCH_FILE_BYTES}", b.len()));
    }
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    if u32_at(0) != EPOCH_FILE_MAGIC {
        return Err(format!("bad magic {:#x}", u32_at(0)));
    }
    if u32_at(4) != EPOCH_FILE_VERSION {
        return Err(format!("unsupported version {}", u32_at(4)));
    }
    let crc = crc32c::crc32c(&b[..20]);
    if crc != u32_at(20) {
        return Err(format!("crc {:#x} != stored {:#x}", crc, u32_at(20)));
    }
    if u32_at(16) != 0 {
        return Err("reserved word is not zero".into());
    }
    let epoch = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
    Epoch::new(epoch).map_err(|e| e.to_string())
}

impl EpochStore {
    /// Opens (creating) the directory, owner-only: the directory and every file in it are
    /// narrowed to [`owner_only::DIR_MODE`] and [`owner_only::FILE_MODE`], since a fence that
    /// another user can read the layout of or replace is no fence.
    pub fn open(dir: &Path) -> Result<EpochStore, EpochError> {
        owner_only::create_dir_all(dir).map_err(io(dir, "create directory"))?;
        for entry in fs::read_dir(dir).map_err(io(dir, "list"))? {
            let path = entry.map_err(io(dir, "list"))?.path();
            if path.is_file() {
                owner_only::enforce(&path, owner_only::FILE_MODE)
                    .map_err(io(&path, "restrict mode"))?;
            }
        }
        Ok(EpochStore {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, volume: &VolumeId) -> PathBuf {
        self.file(volume, "epoch")
    }

    /// The stored epoch of a replica; `None` when it never accepted one.
    pub fn load(&self, volume: &VolumeId) -> Result<Option<Epoch>, EpochError> {
        let path = self.path(volume);
        match fs::read(&path) {
            Ok(b) => decode(&b).map(Some).map_err(|why| EpochError::Damaged {
                path: path.display().to_string(),
                why,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path, "read")(e)),
        }
    }

    /// Stores `epoch` durably: when this returns Ok, a crash cannot bring back an older one.
    pub fn store(&self, volume: &VolumeId, epoch: Epoch) -> Result<(), EpochError> {
        self.replace_durably(&self.path(volume), &encode(epoch))
    }

    /// The path of one of this store's files: `<volume id>.<ext>`.
    pub(crate) fn file(&self, volume: &VolumeId, ext: &str) -> PathBuf {
        self.dir.join(format!("{volume}.{ext}"))
    }

    /// Replaces `path` with `bytes` so that a crash leaves either the old or the new
    /// contents: write a temporary file, fsync it, rename it over `path`, fsync the directory.
    pub(crate) fn replace_durably(&self, path: &Path, bytes: &[u8]) -> Result<(), EpochError> {
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(owner_only::FILE_MODE)
            .open(&tmp)
            .map_err(io(&tmp, "create"))?;
        f.write_all(bytes).map_err(io(&tmp, "write"))?;
        f.sync_all().map_err(io(&tmp, "fsync"))?;
        fs::rename(&tmp, path).map_err(io(path, "rename"))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir, "fsync directory"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() {
        let e = Epoch::new(42).unwrap();
        let b = encode(e);
        assert_eq!(decode(&b), Ok(e));
        for i in 0..EPOCH_FILE_BYTES {
            let mut d = b;
            d[i] ^= 0x10;
            assert!(decode(&d).is_err(), "flip at byte {i} accepted");
        }
        assert!(decode(&b[..20]).is_err());
    }

    #[test]
    fn stores_durably_and_loads() {
        let dir = std::env::temp_dir().join(format!("cairn-epoch-{}", std::process::id()));
        let store = EpochStore::open(&dir).unwrap();
        let v = VolumeId::new([7; 16]).unwrap();
        assert_eq!(store.load(&v).unwrap(), None);
        store.store(&v, Epoch::new(3).unwrap()).unwrap();
        store.store(&v, Epoch::new(9).unwrap()).unwrap();
        assert_eq!(store.load(&v).unwrap(), Some(Epoch::new(9).unwrap()));
        fs::write(store.path(&v), b"garbage").unwrap();
        assert!(matches!(store.load(&v), Err(EpochError::Damaged { .. })));
        fs::remove_dir_all(dir).unwrap();
    }
}
