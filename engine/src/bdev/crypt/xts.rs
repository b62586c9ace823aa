//! AES-256-XTS (IEEE 1619) over whole 16-byte blocks: on 512-bit VAES where the CPU has it
//! (`super::vaes`, about 0.3 µs per 4 KiB unit), else on the `aes` crate's multi-block path.
//!
//! Why not `xts-mode`: it encrypts one AES block at a time, so AES-NI's pipeline (8 blocks in
//! flight) sits idle; a 4 KiB data unit costs about three times as much. The portable path
//! computes a run of tweaks, whitens a run of blocks where they will be stored, enciphers the
//! run in place with `encrypt_blocks_inout` (AES-NI, chosen at run time by the `aes` crate's
//! CPU detection) and whitens again. Data units are always whole blocks here
//! (`CRYPT_DATA_UNIT_BYTES`), so there is no ciphertext stealing. `engine/tests/crypt.rs`
//! checks both paths against IEEE 1619's vector 10 and against `xts-mode` in a property test.
//!
//! Keys are 64 bytes: the data key (key 1) then the tweak key (key 2). They live in memory
//! only, and [`CryptKey`] wipes its copy when dropped; the expanded key schedules are wiped
//! too (the `aes` crate's `zeroize` feature).

use aes::cipher::consts::U16;
use aes::cipher::inout::InOutBuf;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::{Aes256, Aes256Enc, Block};

/// Bytes of an XTS-AES-256 key: two AES-256 keys.
pub const CRYPT_KEY_BYTES: usize = 64;

/// Blocks whitened and enciphered per `encrypt_blocks` call: a multiple of AES-NI's 8-block
/// pipeline, small enough that the run and its tweaks stay in L1.
const RUN_BLOCKS: usize = 32;

/// Why a key was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error(
        "a key is {CRYPT_KEY_BYTES} raw bytes or {} hex digits, not {len_bytes} bytes",
        CRYPT_KEY_BYTES * 2
    )]
    Length { len_bytes: usize },
    #[error("the key's hex digit at {at} is not 0-9, a-f or A-F")]
    Hex { at: usize },
    #[error("the key's two halves are equal; XTS needs two different AES keys")]
    EqualHalves,
}

/// An XTS-AES-256 key, wiped from memory when dropped.
pub struct CryptKey([u8; CRYPT_KEY_BYTES]);

impl CryptKey {
    /// Takes a key as a key file or variable holds it: 64 raw bytes, or 128 hex digits with
    /// surrounding whitespace (a trailing newline) ignored.
    pub fn parse(bytes: &[u8]) -> Result<CryptKey, KeyError> {
        let mut key = [0u8; CRYPT_KEY_BYTES];
        if bytes.len() == CRYPT_KEY_BYTES {
            key.copy_from_slice(bytes);
        } else {
            let hex = bytes.trim_ascii();
            if hex.len() != CRYPT_KEY_BYTES * 2 {
                return Err(KeyError::Length {
                    len_bytes: bytes.len(),
                });
            }
            for (i, out) in key.iter_mut().enumerate() {
                let digit = |at: usize| {
                    (hex[at] as char)
                        .to_digit(16)
                        .map(|d| d as u8)
                        .ok_or(KeyError::Hex { at })
                };
                *out = (digit(2 * i)? << 4) | digit(2 * i + 1)?;
            }
        }
        let (k1, k2) = key.split_at(CRYPT_KEY_BYTES / 2);
        if k1 == k2 {
            return Err(KeyError::EqualHalves);
        }
        Ok(CryptKey(key))
    }

    /// The raw key, for tests that look for it where it must never be.
    pub fn bytes(&self) -> &[u8; CRYPT_KEY_BYTES] {
        &self.0
    }
}

impl Drop for CryptKey {
    fn drop(&mut self) {
        for b in self.0.iter_mut() {
            // SAFETY: `b` is a valid, aligned, exclusive reference into our own array; the
            // volatile write keeps the compiler from dropping the wipe as a dead store.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl std::fmt::Debug for CryptKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CryptKey(..)")
    }
}

/// Which code runs the cipher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XtsBackend {
    /// 512-bit VAES and VPCLMULQDQ (`super::vaes`), where the CPU has them.
    Vaes512,
    /// The `aes` crate's multi-block path (AES-NI where present) with scalar whitening.
    Portable,
}

/// The expanded key schedules of one XTS-AES-256 key. Shared read-only by every core.
pub struct Xts {
    data: Aes256,
    tweak: Aes256Enc,
    #[cfg(target_arch = "x86_64")]
    fast: Option<super::vaes::Keys>,
}

impl Xts {
    /// The key on the fastest code this CPU runs.
    pub fn new(key: &CryptKey) -> Xts {
        let mut xts = Xts::portable(key);
        #[cfg(target_arch = "x86_64")]
        {
            let (k1, k2) = key.0.split_at(CRYPT_KEY_BYTES / 2);
            xts.fast = super::vaes::Keys::detect(
                k1.try_into().expect("32-byte AES-256 key"),
                k2.try_into().expect("32-byte AES-256 key"),
            );
        }
        xts
    }

    /// The key on the portable path whatever the CPU (tests compare the two).
    pub fn portable(key: &CryptKey) -> Xts {
        let (k1, k2) = key.0.split_at(CRYPT_KEY_BYTES / 2);
        Xts {
            data: Aes256::new_from_slice(k1).expect("32-byte AES-256 key"),
            tweak: Aes256Enc::new_from_slice(k2).expect("32-byte AES-256 key"),
            #[cfg(target_arch = "x86_64")]
            fast: None,
        }
    }

    /// The code this key runs on.
    pub fn backend(&self) -> XtsBackend {
        #[cfg(target_arch = "x86_64")]
        if self.fast.is_some() {
            return XtsBackend::Vaes512;
        }
        XtsBackend::Portable
    }

    /// Encrypts the data unit numbered `unit` from `src` into `dst` (equal lengths, a
    /// multiple of 16 bytes).
    #[inline]
    pub fn encrypt(&self, unit: u128, src: &[u8], dst: &mut [u8]) {
        self.crypt(unit, Some(src), dst, true);
    }

    /// Decrypts the data unit numbered `unit` from `src` into `dst`.
    #[inline]
    pub fn decrypt(&self, unit: u128, src: &[u8], dst: &mut [u8]) {
        self.crypt(unit, Some(src), dst, false);
    }

    /// Decrypts the data unit numbered `unit` where it lies.
    #[inline]
    pub fn decrypt_in_place(&self, unit: u128, buf: &mut [u8]) {
        self.crypt(unit, None, buf, false);
    }

    /// Runs of `RUN_BLOCKS`: whiten (from `src`, or `dst` itself) into `dst`, encipher or
    /// decipher `dst` in place with the multi-block path, whiten again. No scratch copy.
    fn crypt(&self, unit: u128, src: Option<&[u8]>, dst: &mut [u8], encrypt: bool) {
        assert!(
            src.is_none_or(|s| s.len() == dst.len()) && dst.len().is_multiple_of(16),
            "XTS data unit of {} bytes into {} bytes: both must be equal whole blocks",
            src.map_or(dst.len(), <[u8]>::len),
            dst.len()
        );
        #[cfg(target_arch = "x86_64")]
        if let Some(fast) = &self.fast {
            let len = dst.len();
            let to = dst.as_mut_ptr();
            let from = src.map_or(to.cast_const(), <[u8]>::as_ptr);
            // SAFETY: both slices are `len` bytes (asserted); `from` is derived from `to`
            // itself (in place) or is a shared slice, which cannot overlap the exclusive `dst`.
            unsafe { fast.crypt(unit, from, to, len, encrypt) };
            return;
        }
        let mut tweaks = [0u128; RUN_BLOCKS];
        let mut t = self.first_tweak(unit);
        for (r, run) in dst.chunks_mut(RUN_BLOCKS * 16).enumerate() {
            let from = src.map(|s| &s[r * RUN_BLOCKS * 16..][..run.len()]);
            for (i, (block, tw)) in run.chunks_exact_mut(16).zip(tweaks.iter_mut()).enumerate() {
                let plain = load(from.map_or(&*block, |f| &f[i * 16..][..16]));
                *tw = t;
                block.copy_from_slice(&(plain ^ t).to_le_bytes());
                t = mul_alpha(t);
            }
            let (blocks, _) = InOutBuf::from(&mut *run).into_chunks::<U16>();
            if encrypt {
                self.data.encrypt_blocks_inout(blocks);
            } else {
                self.data.decrypt_blocks_inout(blocks);
            }
            for (block, tw) in run.chunks_exact_mut(16).zip(tweaks.iter()) {
                xor_tweak(block, *tw);
            }
        }
    }

    /// The tweak of the unit's first block: the unit number, little-endian, under key 2.
    #[inline]
    fn first_tweak(&self, unit: u128) -> u128 {
        let mut t = Block::from(unit.to_le_bytes());
        self.tweak.encrypt_block(&mut t);
        u128::from_le_bytes(t.into())
    }
}

/// A 16-byte block as a little-endian number.
#[inline(always)]
fn load(block: &[u8]) -> u128 {
    u128::from_le_bytes(block.try_into().expect("16-byte block"))
}

/// XORs a 16-byte block with a tweak (little-endian).
#[inline(always)]
fn xor_tweak(block: &mut [u8], t: u128) {
    let b = load(block);
    block.copy_from_slice(&(b ^ t).to_le_bytes());
}

/// Multiplies a tweak by α in GF(2^128) (IEEE 1619's little-endian convention).
#[inline(always)]
fn mul_alpha(t: u128) -> u128 {
    let carry = ((t >> 127) as u8).wrapping_neg() & 0x87;
    (t << 1) ^ u128::from(carry)
}
