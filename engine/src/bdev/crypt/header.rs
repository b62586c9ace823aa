//! The encryption header: the first `CRYPT_HEADER_BYTES` of an encrypted volume, in the clear.
//!
//! It says the volume is encrypted, with what, and holds a key check value that tells the
//! right key from a wrong one without revealing anything about either: a random salt and the
//! salt encrypted under the volume's key at data unit [`CHECK_UNIT`] (a number no data unit
//! reaches). Knowing one plaintext/ciphertext pair of AES gives no useful information on the
//! key, and the salt makes the value differ between volumes that share a key. The key itself
//! is never in it. Layout (docs/formats.md, "Encryption header"):
//!
//! ```text
//! 0   8  magic "CAIRNXTS"
//! 8   4  version (u32 LE) = 1
//! 12  4  data unit bytes (u32 LE) = 4096
//! 16  4  cipher (u32 LE) = 1, AES-256-XTS
//! 20  4  reserved, 0
//! 24 32  salt
//! 56 32  check: XTS-encrypt(key, unit CHECK_UNIT, salt)
//! 88  4  crc32c of bytes 0..88 (u32 LE)
//! 92     zeros to CRYPT_HEADER_BYTES
//! ```
//!
//! The header travels with the volume's data, so replicas, snapshots and clones carry it and
//! a clone asks for the same key.

use super::xts::Xts;
use super::CRYPT_DATA_UNIT_BYTES;

/// Bytes the header occupies at the start of the inner device; the data the client sees
/// starts after it.
pub const CRYPT_HEADER_BYTES: u32 = 4096;

const MAGIC: [u8; 8] = *b"CAIRNXTS";
/// Bump when the layout or the meaning of a field changes (`header_version_is_guarded`).
pub const CRYPT_HEADER_VERSION: u32 = 1;
const CIPHER_AES_256_XTS: u32 = 1;
const SALT_BYTES: usize = 32;
const SALT_OFFSET: usize = 24;
const CHECK_OFFSET: usize = SALT_OFFSET + SALT_BYTES;
const CRC_OFFSET: usize = CHECK_OFFSET + SALT_BYTES;
/// The data unit number the key check value is encrypted at: above every real unit, whose
/// numbers are byte offsets / 4096 < 2^52.
pub const CHECK_UNIT: u128 = u128::MAX;

const _: () = assert!(CRC_OFFSET + 4 <= CRYPT_HEADER_BYTES as usize);

/// What the first block of a device says about encryption.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// All zeros: never written, free to format.
    Blank,
    /// A valid header whose check value matches the key.
    Matches,
    /// A valid header whose check value does not match the key.
    WrongKey,
    /// Data that is no encryption header (a plain volume's data, or a damaged header).
    NotEncrypted { why: String },
}

/// Encodes a fresh header for `xts` with `salt` into `out` (`CRYPT_HEADER_BYTES` long).
pub fn encode(xts: &Xts, salt: &[u8; SALT_BYTES], out: &mut [u8]) {
    assert_eq!(out.len(), CRYPT_HEADER_BYTES as usize, "header buffer size");
    out.fill(0);
    out[0..8].copy_from_slice(&MAGIC);
    out[8..12].copy_from_slice(&CRYPT_HEADER_VERSION.to_le_bytes());
    out[12..16].copy_from_slice(&CRYPT_DATA_UNIT_BYTES.to_le_bytes());
    out[16..20].copy_from_slice(&CIPHER_AES_256_XTS.to_le_bytes());
    out[SALT_OFFSET..CHECK_OFFSET].copy_from_slice(salt);
    let (head, check) = out.split_at_mut(CHECK_OFFSET);
    xts.encrypt(CHECK_UNIT, &head[SALT_OFFSET..], &mut check[..SALT_BYTES]);
    let crc = crc32c::crc32c(&out[..CRC_OFFSET]);
    out[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
    debug_assert_eq!(inspect(xts, out), Found::Matches);
}

/// Reads a device's first `CRYPT_HEADER_BYTES` and checks them against `xts`.
pub fn inspect(xts: &Xts, b: &[u8]) -> Found {
    assert_eq!(b.len(), CRYPT_HEADER_BYTES as usize, "header buffer size");
    if b.iter().all(|&x| x == 0) {
        return Found::Blank;
    }
    let not = |why: String| Found::NotEncrypted { why };
    if b[0..8] != MAGIC {
        return not("no encryption header (magic)".into());
    }
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let crc = crc32c::crc32c(&b[..CRC_OFFSET]);
    if u32_at(CRC_OFFSET) != crc {
        return not(format!(
            "encryption header checksum {:#010x}, computed {crc:#010x}",
            u32_at(CRC_OFFSET)
        ));
    }
    if u32_at(8) != CRYPT_HEADER_VERSION {
        return not(format!(
            "encryption header version {}, this build reads {CRYPT_HEADER_VERSION}",
            u32_at(8)
        ));
    }
    if u32_at(12) != CRYPT_DATA_UNIT_BYTES || u32_at(16) != CIPHER_AES_256_XTS {
        return not(format!(
            "encryption header names data unit {} bytes, cipher {}",
            u32_at(12),
            u32_at(16)
        ));
    }
    let mut check = [0u8; SALT_BYTES];
    xts.encrypt(CHECK_UNIT, &b[SALT_OFFSET..CHECK_OFFSET], &mut check);
    if check[..] == b[CHECK_OFFSET..CRC_OFFSET] {
        Found::Matches
    } else {
        Found::WrongKey
    }
}

/// Whether a device's first bytes carry the header's magic: a volume encrypted by some key.
pub fn has_magic(b: &[u8]) -> bool {
    b.starts_with(&MAGIC)
}

/// A fresh random salt.
pub fn salt() -> std::io::Result<[u8; SALT_BYTES]> {
    let mut s = [0u8; SALT_BYTES];
    crate::sys::random_bytes(&mut s)?;
    Ok(s)
}
