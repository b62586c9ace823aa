//! XTS-AES-256 on VAES and VPCLMULQDQ with 512-bit registers: four AES blocks per
//! instruction, sixteen in flight, tweaks advanced in registers.
//!
//! Why: the `aes` crate's multi-block path enciphers with 128-bit AES-NI and leaves the XTS
//! whitening to scalar `u128` code, which costs about twice the cipher itself; a 4 KiB data
//! unit took ~2.5 µs, the whole budget of a 4 KiB I/O on one core. Here a data unit runs as
//! sixteen iterations of: load four 512-bit vectors, XOR tweak and round key 0 in one
//! three-way XOR, thirteen rounds and the last on all four, XOR the tweak, store, and advance
//! each tweak lane by α^16 with one carry-less multiply. The tail of a length that is not a
//! multiple of 256 bytes runs one block at a time on 128-bit AES-NI.
//!
//! Chosen at run time ([`Keys::detect`]) where the CPU has AVX-512 F and BW, VAES,
//! VPCLMULQDQ and AES-NI; elsewhere [`super::xts`] keeps its portable path. The tests in
//! `engine/tests/crypt.rs` check both against IEEE 1619 and `xts-mode`.
//!
//! The round keys are expanded here (FIPS 197's AES-256 schedule with `aeskeygenassist`),
//! the decryption schedule by `aesimc` (the equivalent inverse cipher), and wiped on drop.

use std::arch::x86_64::*;

/// AES-256 round keys: round 0, thirteen middle rounds, the last.
const ROUND_KEYS: usize = 15;

/// Blocks per loop iteration: four 512-bit vectors of four blocks.
const BLOCKS_PER_ITER: usize = 16;

/// Round keys as little-endian 128-bit numbers.
type Schedule = [u128; ROUND_KEYS];

/// The three key schedules of one XTS-AES-256 key.
pub(super) struct Keys {
    enc: Schedule,
    dec: Schedule,
    tweak: Schedule,
}

impl Keys {
    /// Expands `data_key` and `tweak_key` when this CPU runs the vector path; `None` sends
    /// the caller to the portable one.
    pub(super) fn detect(data_key: &[u8; 32], tweak_key: &[u8; 32]) -> Option<Keys> {
        if !(is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("vaes")
            && is_x86_feature_detected!("vpclmulqdq")
            && is_x86_feature_detected!("aes")
            && is_x86_feature_detected!("sse4.1"))
        {
            return None;
        }
        // SAFETY: every feature `schedules` is compiled for was detected just above.
        Some(unsafe { schedules(data_key, tweak_key) })
    }

    /// XTS over `len` bytes (whole blocks) from `src` into `dst` for the data unit `unit`.
    ///
    /// # Safety
    /// `src` and `dst` are valid for `len` bytes of reads and writes; they are either the
    /// same pointer or do not overlap.
    #[inline]
    pub(super) unsafe fn crypt(
        &self,
        unit: u128,
        src: *const u8,
        dst: *mut u8,
        len: usize,
        encrypt: bool,
    ) {
        if encrypt {
            // SAFETY: `detect` built `self` only after finding every feature `run` needs;
            // the caller vouches for the pointers.
            unsafe { run::<true>(self, unit, src, dst, len) }
        } else {
            // SAFETY: as above.
            unsafe { run::<false>(self, unit, src, dst, len) }
        }
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        for k in self
            .enc
            .iter_mut()
            .chain(&mut self.dec)
            .chain(&mut self.tweak)
        {
            // SAFETY: `k` is a valid, exclusive reference into our own array; the volatile
            // write keeps the wipe from being dropped as a dead store.
            unsafe { std::ptr::write_volatile(k, 0) };
        }
    }
}

/// A little-endian 128-bit number as a vector (byte 0 in lane byte 0).
#[target_feature(enable = "sse2")]
#[inline]
fn vec128(x: u128) -> __m128i {
    _mm_set_epi64x((x >> 64) as i64, x as i64)
}

/// A vector as a little-endian 128-bit number.
#[target_feature(enable = "sse4.1")]
#[inline]
fn num128(v: __m128i) -> u128 {
    (u128::from(_mm_extract_epi64::<1>(v) as u64) << 64)
        | u128::from(_mm_extract_epi64::<0>(v) as u64)
}

/// One step of the AES-256 schedule: `prev` with its running XOR, plus the assist word
/// already broadcast into every lane.
#[target_feature(enable = "sse2")]
#[inline]
fn schedule_step(prev: __m128i, assist: __m128i) -> __m128i {
    let mut x = prev;
    x = _mm_xor_si128(x, _mm_slli_si128::<4>(x));
    x = _mm_xor_si128(x, _mm_slli_si128::<4>(x));
    x = _mm_xor_si128(x, _mm_slli_si128::<4>(x));
    _mm_xor_si128(x, assist)
}

/// FIPS 197's AES-256 key expansion.
#[target_feature(enable = "aes,sse4.1")]
fn expand(key: &[u8; 32]) -> Schedule {
    let half = |h: &[u8]| vec128(u128::from_le_bytes(h.try_into().expect("16 bytes")));
    let mut a = half(&key[..16]);
    let mut b = half(&key[16..]);
    let mut rk = [0u128; ROUND_KEYS];
    rk[0] = num128(a);
    rk[1] = num128(b);
    macro_rules! pair {
        ($i:expr, $rcon:expr) => {
            a = schedule_step(
                a,
                _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(b)),
            );
            rk[$i] = num128(a);
            if $i + 1 < ROUND_KEYS {
                b = schedule_step(
                    b,
                    _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(a)),
                );
                rk[$i + 1] = num128(b);
            }
        };
    }
    pair!(2, 0x01);
    pair!(4, 0x02);
    pair!(6, 0x04);
    pair!(8, 0x08);
    pair!(10, 0x10);
    pair!(12, 0x20);
    // Round key 14 closes the schedule: no odd key follows it.
    a = schedule_step(
        a,
        _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<0x40>(b)),
    );
    rk[14] = num128(a);
    rk
}

/// The three schedules: data encryption, its equivalent inverse cipher (the encryption keys
/// in reverse, the middle ones through InvMixColumns), and the tweak key's.
#[target_feature(enable = "aes,sse4.1")]
fn schedules(data_key: &[u8; 32], tweak_key: &[u8; 32]) -> Keys {
    let enc = expand(data_key);
    let dec = std::array::from_fn(|i| {
        let k = enc[ROUND_KEYS - 1 - i];
        if i == 0 || i == ROUND_KEYS - 1 {
            k
        } else {
            num128(_mm_aesimc_si128(vec128(k)))
        }
    });
    Keys {
        enc,
        dec,
        tweak: expand(tweak_key),
    }
}

/// One block through the cipher on 128-bit AES-NI.
#[target_feature(enable = "aes,sse2")]
#[inline]
fn block128<const ENC: bool>(rk: &Schedule, x: __m128i) -> __m128i {
    let mut x = _mm_xor_si128(x, vec128(rk[0]));
    for &k in &rk[1..ROUND_KEYS - 1] {
        x = if ENC {
            _mm_aesenc_si128(x, vec128(k))
        } else {
            _mm_aesdec_si128(x, vec128(k))
        };
    }
    let last = vec128(rk[ROUND_KEYS - 1]);
    if ENC {
        _mm_aesenclast_si128(x, last)
    } else {
        _mm_aesdeclast_si128(x, last)
    }
}

/// Multiplies a tweak by α in GF(2^128) (IEEE 1619's little-endian convention).
#[inline(always)]
fn mul_alpha(t: u128) -> u128 {
    let carry = ((t >> 127) as u8).wrapping_neg() & 0x87;
    (t << 1) ^ u128::from(carry)
}

/// Multiplies each 128-bit lane by α^16: shift the lane left two bytes, and fold the 16 bits
/// shifted out back in as their product with x^7 + x^2 + x + 1 (at most 23 bits, so no second
/// fold).
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
#[inline]
fn mul_alpha16(t: __m512i, poly: __m512i) -> __m512i {
    let out = _mm512_bsrli_epi128::<14>(t);
    _mm512_xor_si512(
        _mm512_bslli_epi128::<2>(t),
        _mm512_clmulepi64_epi128::<0x00>(out, poly),
    )
}

/// Four consecutive tweaks, `t` to `t`·α³, as one vector.
#[target_feature(enable = "avx512f,sse2")]
#[inline]
fn four_tweaks(t: u128) -> __m512i {
    let t1 = mul_alpha(t);
    let t2 = mul_alpha(t1);
    let t3 = mul_alpha(t2);
    let lane = |x: u128| [x as i64, (x >> 64) as i64];
    let [a0, a1] = lane(t);
    let [b0, b1] = lane(t1);
    let [c0, c1] = lane(t2);
    let [d0, d1] = lane(t3);
    _mm512_set_epi64(d1, d0, c1, c0, b1, b0, a1, a0)
}

#[target_feature(enable = "avx512f,avx512bw,vaes,vpclmulqdq,aes,sse4.1")]
unsafe fn run<const ENC: bool>(keys: &Keys, unit: u128, src: *const u8, dst: *mut u8, len: usize) {
    debug_assert!(len.is_multiple_of(16));
    let rk = if ENC { &keys.enc } else { &keys.dec };
    let mut t = num128(block128::<true>(&keys.tweak, vec128(unit)));
    let blocks = len / 16;
    let mut done = 0usize;
    if blocks >= BLOCKS_PER_ITER {
        let mut tw = [t; 4].map(|_| _mm512_setzero_si512());
        for v in &mut tw {
            *v = four_tweaks(t);
            for _ in 0..4 {
                t = mul_alpha(t);
            }
        }
        let k: [__m512i; ROUND_KEYS] =
            std::array::from_fn(|r| _mm512_broadcast_i32x4(vec128(rk[r])));
        let poly = _mm512_set_epi64(0, 0x87, 0, 0x87, 0, 0x87, 0, 0x87);
        while done + BLOCKS_PER_ITER <= blocks {
            let at = done * 16;
            let mut x: [__m512i; 4] = std::array::from_fn(|v| {
                // SAFETY: `at + 256 <= len`, inside what the caller vouched for; unaligned
                // loads need no alignment.
                let x = unsafe { _mm512_loadu_si512(src.wrapping_add(at + v * 64).cast()) };
                _mm512_ternarylogic_epi64::<0x96>(x, tw[v], k[0])
            });
            for key in &k[1..ROUND_KEYS - 1] {
                for xv in &mut x {
                    *xv = if ENC {
                        _mm512_aesenc_epi128(*xv, *key)
                    } else {
                        _mm512_aesdec_epi128(*xv, *key)
                    };
                }
            }
            for v in 0..4 {
                let last = if ENC {
                    _mm512_aesenclast_epi128(x[v], k[ROUND_KEYS - 1])
                } else {
                    _mm512_aesdeclast_epi128(x[v], k[ROUND_KEYS - 1])
                };
                let out = _mm512_xor_si512(last, tw[v]);
                // SAFETY: as for the loads; `dst` is `src` or does not overlap it, and this
                // iteration's source bytes were all loaded above.
                unsafe { _mm512_storeu_si512(dst.wrapping_add(at + v * 64).cast(), out) };
                tw[v] = mul_alpha16(tw[v], poly);
            }
            done += BLOCKS_PER_ITER;
        }
        // Lane 0 of the first vector now holds the tweak of block `done`.
        t = num128(_mm512_castsi512_si128(tw[0]));
    }
    while done < blocks {
        let at = done * 16;
        let tv = vec128(t);
        // SAFETY: `at + 16 <= len`, inside what the caller vouched for.
        let x = unsafe { _mm_loadu_si128(src.wrapping_add(at).cast()) };
        let y = _mm_xor_si128(block128::<ENC>(rk, _mm_xor_si128(x, tv)), tv);
        // SAFETY: as for the load; `dst` is `src` or does not overlap it.
        unsafe { _mm_storeu_si128(dst.wrapping_add(at).cast(), y) };
        t = mul_alpha(t);
        done += 1;
    }
}
