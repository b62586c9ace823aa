//! Durable data generations: for each hosted replica, the generation of the data it last held
//! while a nexus counted it in sync, and whether that nexus closed it cleanly. One small file
//! per replica beside its epoch fence (`<volume id>.gen`), replaced atomically the same way.
//!
//! A nexus raises the generation of every in-sync replica, durably, whenever its in-sync set
//! shrinks, before it acknowledges any write the dropped replica missed. So the copies that
//! hold every acknowledged write are exactly those with the highest generation, and a new
//! nexus can tell them from stale ones without a third party (DRBD's generation identifiers,
//! reduced to a counter: epoch fencing already guarantees that one nexus at a time raises it).
//! This module owns the bytes and the file; the rules live in `replica.rs` (a generation
//! never goes down) and `nexus/` (when to raise). A file that exists but does not decode is
//! an error, never generation 0: reading a damaged record as "no data" would let a stale
//! copy look current, or a current one stale.
//!
//! File format (`docs/formats.md`, "Replica generation file"), 24 bytes little-endian:
//! magic "CRNG" (u32), version (u32), generation (u64, >= 1), flags (u32, bit 0: closed
//! cleanly), crc32c of the first 20 bytes (u32).

use crate::epoch::{EpochError, EpochStore};
use crate::proto::VolumeId;
use std::fs;

pub const GENERATION_FILE_MAGIC: u32 = u32::from_le_bytes(*b"CRNG");
pub const GENERATION_FILE_VERSION: u32 = 1;
pub const GENERATION_FILE_BYTES: usize = 24;
/// Flag bit: the nexus that last held this replica in sync closed it cleanly (flushed, then
/// destroyed), so no write of it can be missing here.
pub const GENERATION_FLAG_CLEAN: u32 = 1 << 0;

/// A replica's data generation record. `generation` 0 means the replica has never been part
/// of a nexus's in-sync set (a fresh volume); it is never stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenRecord {
    pub generation: u64,
    pub clean: bool,
}

/// Encodes one generation file; the record's generation is at least 1.
pub fn encode(r: GenRecord) -> [u8; GENERATION_FILE_BYTES] {
    assert!(r.generation >= 1, "generation 0 is never stored");
    let mut b = [0u8; GENERATION_FILE_BYTES];
    b[0..4].copy_from_slice(&GENERATION_FILE_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&GENERATION_FILE_VERSION.to_le_bytes());
    b[8..16].copy_from_slice(&r.generation.to_le_bytes());
    let flags = if r.clean { GENERATION_FLAG_CLEAN } else { 0 };
    b[16..20].copy_from_slice(&flags.to_le_bytes());
    let crc = crc32c::crc32c(&b[..20]);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes one generation file; the error says what is wrong.
pub fn decode(b: &[u8]) -> Result<GenRecord, String> {
    if b.len() != GENERATION_FILE_BYTES {
        return Err(format!(
            "{} bytes, expected {GENERATION_FILE_BYTES}",
            b.len()
        ));
    }
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    if u32_at(0) != GENERATION_FILE_MAGIC {
        return Err(format!("bad magic {:#x}", u32_at(0)));
    }
    if u32_at(4) != GENERATION_FILE_VERSION {
        return Err(format!("unsupported version {}", u32_at(4)));
    }
    let crc = crc32c::crc32c(&b[..20]);
    if crc != u32_at(20) {
        return Err(format!("crc {:#x} != stored {:#x}", crc, u32_at(20)));
    }
    let flags = u32_at(16);
    if flags & !GENERATION_FLAG_CLEAN != 0 {
        return Err(format!("unknown flags {flags:#x}"));
    }
    let generation = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
    if generation == 0 {
        return Err("generation 0 is never stored".into());
    }
    Ok(GenRecord {
        generation,
        clean: flags & GENERATION_FLAG_CLEAN != 0,
    })
}

impl EpochStore {
    /// The stored generation record of a replica; generation 0 when it never had one.
    pub fn load_generation(&self, volume: &VolumeId) -> Result<GenRecord, EpochError> {
        let path = self.file(volume, "gen");
        match fs::read(&path) {
            Ok(b) => decode(&b).map_err(|why| EpochError::Damaged {
                path: path.display().to_string(),
                why,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(GenRecord::default()),
            Err(e) => Err(crate::epoch::io(&path, "read")(e)),
        }
    }

    /// Stores `r` durably: when this returns Ok, a crash cannot bring back an older record.
    pub fn store_generation(&self, volume: &VolumeId, r: GenRecord) -> Result<(), EpochError> {
        self.replace_durably(&self.file(volume, "gen"), &encode(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_damage() {
        let r = GenRecord {
            generation: 42,
            clean: true,
        };
        let b = encode(r);
        assert_eq!(decode(&b), Ok(r));
        for i in 0..GENERATION_FILE_BYTES {
            let mut d = b;
            d[i] ^= 0x10;
            assert!(decode(&d).is_err(), "flip at byte {i} accepted");
        }
        assert!(decode(&b[..20]).is_err());
    }

    /// The layout is pinned: changing a byte of it without bumping
    /// `GENERATION_FILE_VERSION` (and docs/formats.md) fails here.
    #[test]
    fn layout_is_guarded() {
        let b = encode(GenRecord {
            generation: 0x0102_0304_0506_0708,
            clean: true,
        });
        assert_eq!(GENERATION_FILE_VERSION, 1, "update the pinned bytes below");
        assert_eq!(
            b[..20],
            [b'C', b'R', b'N', b'G', 1, 0, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1, 1, 0, 0, 0]
        );
    }

    #[test]
    fn stores_durably_and_loads() {
        let dir = std::env::temp_dir().join(format!("cairn-gen-{}", std::process::id()));
        let store = EpochStore::open(&dir).unwrap();
        let v = VolumeId::new([7; 16]).unwrap();
        assert_eq!(store.load_generation(&v).unwrap(), GenRecord::default());
        let r = GenRecord {
            generation: 9,
            clean: false,
        };
        store.store_generation(&v, r).unwrap();
        assert_eq!(store.load_generation(&v).unwrap(), r);
        fs::write(store.file(&v, "gen"), b"garbage").unwrap();
        assert!(matches!(
            store.load_generation(&v),
            Err(EpochError::Damaged { .. })
        ));
        fs::remove_dir_all(dir).unwrap();
    }
}
