//! Guards encryption at rest (`bdev::crypt`): the XTS code against IEEE 1619 and against the
//! `xts-mode` crate, the header format's version, and the crypt bdev over a real volume: the
//! pool file never holds the plaintext (nor the key) while reads through the bdev return it;
//! a wrong key is refused naming the volume; a snapshot and its clone read back with the key;
//! never-written data reads as zeros; a plain volume holding data is not encrypted over.
//!
//! Before it existed, a volume's plaintext could be read from `pool0.img` by anyone with read
//! access to the file (issue 16).

mod common;

use aes::cipher::KeyInit;
use cairn_engine::bdev::crypt::header::{self, CRYPT_HEADER_BYTES, CRYPT_HEADER_VERSION};
use cairn_engine::bdev::crypt::{attach, CryptError, CryptKey, KeyError, Xts, XtsBackend};
use cairn_engine::bdev::uring::{UringBdev, UringOptions};
use cairn_engine::volume::Pool;
use cairn_engine::{Bdev, BdevHandle, Engine};
use proptest::prelude::*;
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const POOL_BYTES: u64 = 64 * MIB;
const VOLUME_BYTES: u64 = 8 * MIB;
/// A recognisable plaintext: if these bytes are in the pool file, the data was not encrypted.
const PATTERN: &[u8; 16] = b"PLAINTEXT-CAIRN!";

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// IEEE 1619-2007 vector 10: XTS-AES-256, data unit 0xff, 512 bytes 00..ff twice.
const V10_KEY: &str = "27182818284590452353602874713526624977572470936999595749669676273141592653589793238462643383279502884197169399375105820974944592";
const V10_CT: &str = "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed43851ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151";

/// Both ways to build a key: the fastest code this CPU runs, and the portable path.
fn both(key: &CryptKey) -> [Xts; 2] {
    [Xts::new(key), Xts::portable(key)]
}

#[test]
fn xts_matches_ieee_1619_vector_10() {
    let key = CryptKey::parse(V10_KEY.as_bytes()).expect("128 hex digits");
    let [fast, portable] = both(&key);
    assert_eq!(portable.backend(), XtsBackend::Portable);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("vaes")
        && std::arch::is_x86_feature_detected!("vpclmulqdq")
        && std::arch::is_x86_feature_detected!("aes")
    {
        assert_eq!(fast.backend(), XtsBackend::Vaes512, "this CPU runs VAES");
    }
    vector_10(&fast);
    vector_10(&portable);
}

fn vector_10(xts: &Xts) {
    let plain: Vec<u8> = (0..512).map(|i| i as u8).collect();
    let mut ct = vec![0u8; 512];
    xts.encrypt(0xff, &plain, &mut ct);
    assert_eq!(
        ct,
        hex(V10_CT),
        "ciphertext of IEEE 1619 vector 10 ({:?})",
        xts.backend()
    );
    let mut back = vec![0u8; 512];
    xts.decrypt(0xff, &ct, &mut back);
    assert_eq!(back, plain, "decrypt inverts encrypt");
    xts.decrypt_in_place(0xff, &mut ct);
    assert_eq!(ct, plain, "in-place decrypt inverts encrypt");
}

proptest! {
    /// Our XTS, on both paths, equals `xts-mode`'s block-at-a-time XTS for any key, unit
    /// number and whole-block length (below and above the vector path's 16-block stride).
    #[test]
    fn xts_matches_xts_mode(
        key in prop::collection::vec(any::<u8>(), 64),
        unit in any::<u128>(),
        blocks in 1usize..300,
        seed in any::<u8>(),
    ) {
        prop_assume!(key[..32] != key[32..]);
        let ours = both(&CryptKey::parse(&key).expect("64 raw bytes"));
        let theirs = xts_mode::Xts128::new(
            aes::Aes256::new_from_slice(&key[..32]).expect("key 1"),
            aes::Aes256::new_from_slice(&key[32..]).expect("key 2"),
        );
        let plain: Vec<u8> = (0..blocks * 16).map(|i| (i as u8).wrapping_mul(seed | 1)).collect();
        let mut b = plain.clone();
        theirs.encrypt_sector(&mut b, unit.to_le_bytes());
        for xts in &ours {
            let mut a = vec![0u8; plain.len()];
            xts.encrypt(unit, &plain, &mut a);
            prop_assert_eq!(&a, &b, "{:?}", xts.backend());
            let mut back = vec![0u8; plain.len()];
            xts.decrypt(unit, &a, &mut back);
            prop_assert_eq!(&back, &plain);
            xts.decrypt_in_place(unit, &mut a);
            prop_assert_eq!(&a, &plain);
        }
    }
}

#[test]
fn keys_are_parsed_strictly() {
    assert!(CryptKey::parse(&[7u8; 63]).is_err());
    assert_eq!(
        CryptKey::parse(&[7u8; 64]).unwrap_err(),
        KeyError::EqualHalves
    );
    let hex_key = format!("{V10_KEY}\n");
    let k = CryptKey::parse(hex_key.as_bytes()).expect("hex with a newline");
    assert_eq!(k.bytes()[..], hex(V10_KEY)[..]);
    let bad = V10_KEY.replace('2', "g");
    assert!(matches!(
        CryptKey::parse(bad.as_bytes()),
        Err(KeyError::Hex { .. })
    ));
}

/// The header's bytes for a fixed key and salt: a change to the layout that does not bump
/// `CRYPT_HEADER_VERSION` fails here.
#[test]
fn header_version_is_guarded() {
    let xts = Xts::new(&CryptKey::parse(V10_KEY.as_bytes()).unwrap());
    let mut block = vec![0u8; CRYPT_HEADER_BYTES as usize];
    header::encode(&xts, &[5u8; 32], &mut block);
    let crc = crc32c::crc32c(&block);
    assert_eq!(
        (CRYPT_HEADER_VERSION, crc),
        (1, 0x8f8f_3924),
        "the encryption header's layout changed: bump CRYPT_HEADER_VERSION and update \
         docs/formats.md and this value (crc {crc:#010x})"
    );
    assert_eq!(header::inspect(&xts, &block), header::Found::Matches);
    let other = Xts::new(&key(0x01));
    assert_eq!(header::inspect(&other, &block), header::Found::WrongKey);
}

fn key(byte: u8) -> CryptKey {
    let mut k = [byte; 64];
    k[32..].fill(byte ^ 0x5a);
    CryptKey::parse(&k).unwrap()
}

struct Setup {
    engine: Engine,
    pool: Pool,
    file: common::TempFile,
}

fn setup(tag: &str) -> Setup {
    let engine = common::start(common::cores(2));
    let file = common::TempFile::new(tag, POOL_BYTES);
    let base: Arc<dyn Bdev> = Arc::new(
        UringBdev::open("base", file.path(), UringOptions::default()).expect("pool file opens"),
    );
    let pool = Pool::create(&engine, "p", base, engine.cores()[0], MIB as u32).unwrap();
    Setup { engine, pool, file }
}

fn patterned(len: usize) -> Vec<u8> {
    PATTERN.iter().copied().cycle().take(len).collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn read(engine: &Engine, h: &BdevHandle, offset: u64, len: usize) -> Vec<u8> {
    let mut q = engine.queue(h, *engine.cores().last().unwrap(), 4).unwrap();
    let mut got = vec![0u8; len];
    q.read_at(offset, &mut got).unwrap();
    got
}

/// Reads the pool file from outside the engine, as anyone with read access to it could.
fn pool_file_bytes(s: &Setup) -> Vec<u8> {
    std::fs::read(s.file.path()).expect("pool file reads")
}

#[test]
fn the_pool_file_holds_only_ciphertext_and_reads_decrypt() {
    let s = setup("crypt-cipher");
    s.pool
        .create_volume(&s.engine, "v", VOLUME_BYTES, vec![])
        .unwrap();
    let vol = s.pool.open_volume(&s.engine, "v").unwrap();
    let k = key(0x11);
    let enc = attach(&s.engine, &vol, "v-crypt", "v", &k, true).unwrap();
    assert_eq!(
        enc.info().size_bytes,
        VOLUME_BYTES - u64::from(CRYPT_HEADER_BYTES)
    );
    let data = patterned(256 << 10);
    {
        let mut q = s.engine.queue(&enc, s.engine.cores()[0], 4).unwrap();
        q.write_at(MIB, &data, false).unwrap();
        q.flush().unwrap();
    }
    assert_eq!(
        read(&s.engine, &enc, MIB, data.len()),
        data,
        "reads decrypt"
    );
    assert_eq!(
        read(&s.engine, &enc, 4 * MIB, 8192),
        vec![0u8; 8192],
        "never-written data reads as zeros"
    );
    let raw = pool_file_bytes(&s);
    assert!(!contains(&raw, PATTERN), "plaintext found in the pool file");
    assert!(
        !contains(&raw, &k.bytes()[..16]),
        "key bytes found in the pool file"
    );
    let through_volume = read(
        &s.engine,
        &vol,
        MIB + u64::from(CRYPT_HEADER_BYTES),
        data.len(),
    );
    assert!(
        !contains(&through_volume, PATTERN),
        "the volume below holds plaintext"
    );
    s.engine.remove_bdev(&enc).unwrap();
    s.pool.close_volume(&s.engine, &vol).unwrap();
}

#[test]
fn a_wrong_key_is_refused_naming_the_volume() {
    let s = setup("crypt-wrong");
    s.pool
        .create_volume(&s.engine, "secret", VOLUME_BYTES, vec![])
        .unwrap();
    let vol = s.pool.open_volume(&s.engine, "secret").unwrap();
    let enc = attach(&s.engine, &vol, "c1", "secret", &key(0x22), true).unwrap();
    s.engine.remove_bdev(&enc).unwrap();
    let err = attach(&s.engine, &vol, "c2", "secret", &key(0x23), true).unwrap_err();
    assert!(matches!(err, CryptError::WrongKey { .. }), "{err}");
    assert!(err.to_string().contains("'secret'"), "{err}");
    let again = attach(&s.engine, &vol, "c3", "secret", &key(0x22), true).unwrap();
    s.engine.remove_bdev(&again).unwrap();
    s.pool.close_volume(&s.engine, &vol).unwrap();
}

#[test]
fn a_plain_volume_with_data_is_not_encrypted_over() {
    let s = setup("crypt-plain");
    s.pool
        .create_volume(&s.engine, "plain", VOLUME_BYTES, vec![])
        .unwrap();
    let vol = s.pool.open_volume(&s.engine, "plain").unwrap();
    {
        let mut q = s.engine.queue(&vol, s.engine.cores()[0], 1).unwrap();
        q.write_at(0, &patterned(4096), true).unwrap();
    }
    let err = attach(&s.engine, &vol, "c", "plain", &key(0x33), true).unwrap_err();
    assert!(matches!(err, CryptError::NotEncrypted { .. }), "{err}");
    s.pool.close_volume(&s.engine, &vol).unwrap();
}

/// A plain volume whose first 4 KiB were never written but which holds data further on is
/// not blank: formatting it would hide that data behind the cipher.
#[test]
fn a_plain_volume_with_data_past_its_first_block_is_not_encrypted_over() {
    let s = setup("crypt-plain-later");
    s.pool
        .create_volume(&s.engine, "plain", VOLUME_BYTES, vec![])
        .unwrap();
    let vol = s.pool.open_volume(&s.engine, "plain").unwrap();
    {
        let mut q = s.engine.queue(&vol, s.engine.cores()[0], 1).unwrap();
        q.write_at(3 * MIB, &patterned(4096), true).unwrap();
    }
    let err = attach(&s.engine, &vol, "c", "plain", &key(0x34), true).unwrap_err();
    assert!(
        matches!(err, CryptError::NotEncrypted { ref why, .. } if why.contains("after them")),
        "{err}"
    );
    let mut first = vec![0xffu8; 4096];
    {
        let mut q = s.engine.queue(&vol, s.engine.cores()[0], 1).unwrap();
        q.read_at(0, &mut first).unwrap();
    }
    assert!(first.iter().all(|&b| b == 0), "no header was written");
    s.pool.close_volume(&s.engine, &vol).unwrap();
}

/// An encrypted volume grown online shows its new size through the crypt layer, in whole
/// data units, and the new space reads and writes through the cipher.
#[test]
fn an_encrypted_volume_grows_online() {
    let s = setup("crypt-grow");
    let e = &s.engine;
    s.pool.create_volume(e, "g", VOLUME_BYTES, vec![]).unwrap();
    let vol = s.pool.open_volume(e, "g").unwrap();
    let enc = attach(e, &vol, "g-crypt", "g", &key(0x35), true).unwrap();
    let before = enc.info().size_bytes;
    assert_eq!(before, VOLUME_BYTES - u64::from(CRYPT_HEADER_BYTES));
    s.pool.grow(e, "g", 2 * VOLUME_BYTES).unwrap();
    let after = e.bdev(&enc).unwrap().size_bytes();
    assert_eq!(after, 2 * VOLUME_BYTES - u64::from(CRYPT_HEADER_BYTES));
    let data = patterned(8192);
    {
        let mut q = e.queue(&enc, e.cores()[0], 2).unwrap();
        q.write_at(after - 8192, &data, true).unwrap();
    }
    assert_eq!(
        read(e, &enc, after - 8192, data.len()),
        data,
        "the grown space"
    );
    e.remove_bdev(&enc).unwrap();
    s.pool.close_volume(e, &vol).unwrap();
}

#[test]
fn snapshots_and_clones_read_back_with_the_key() {
    let s = setup("crypt-clone");
    let e = &s.engine;
    s.pool.create_volume(e, "v", VOLUME_BYTES, vec![]).unwrap();
    let vol = s.pool.open_volume(e, "v").unwrap();
    let k = key(0x44);
    let enc = attach(e, &vol, "v-crypt", "v", &k, true).unwrap();
    let data = patterned(64 << 10);
    {
        let mut q = e.queue(&enc, e.cores()[0], 4).unwrap();
        q.write_at(2 * MIB, &data, false).unwrap();
        q.flush().unwrap();
    }
    e.remove_bdev(&enc).unwrap();
    s.pool.close_volume(e, &vol).unwrap();
    s.pool.snapshot(e, "v", "snap").unwrap();
    s.pool.clone_snapshot(e, "snap", "copy").unwrap();

    let snap = s.pool.open_volume(e, "snap").unwrap();
    let snap_enc = attach(e, &snap, "snap-crypt", "snap", &k, true).unwrap();
    assert!(snap_enc.info().read_only, "a snapshot stays read-only");
    assert_eq!(
        read(e, &snap_enc, 2 * MIB, data.len()),
        data,
        "snapshot reads"
    );
    e.remove_bdev(&snap_enc).unwrap();
    let err = attach(e, &snap, "snap-bad", "snap", &key(0x45), true).unwrap_err();
    assert!(matches!(err, CryptError::WrongKey { .. }), "{err}");
    s.pool.close_volume(e, &snap).unwrap();

    let copy = s.pool.open_volume(e, "copy").unwrap();
    let err = attach(e, &copy, "copy-bad", "copy", &key(0x45), true).unwrap_err();
    assert!(
        matches!(err, CryptError::WrongKey { .. }),
        "a clone needs the same key: {err}"
    );
    let copy_enc = attach(e, &copy, "copy-crypt", "copy", &k, true).unwrap();
    assert_eq!(read(e, &copy_enc, 2 * MIB, data.len()), data, "clone reads");
    {
        let mut q = e.queue(&copy_enc, e.cores()[0], 4).unwrap();
        q.write_at(3 * MIB, &data, false).unwrap();
        q.flush().unwrap();
    }
    assert_eq!(
        read(e, &copy_enc, 3 * MIB, data.len()),
        data,
        "clone writes read back"
    );
    e.remove_bdev(&copy_enc).unwrap();
    s.pool.close_volume(e, &copy).unwrap();
    assert!(
        !contains(&pool_file_bytes(&s), PATTERN),
        "plaintext found in the pool file"
    );
}

/// Prints what one 4 KiB data unit costs to encrypt and decrypt on this machine (no
/// assertion: a loaded machine must not fail it; `cargo test … -- --nocapture` shows it).
#[test]
fn xts_cost_per_unit_is_printed() {
    const UNITS: u32 = 20_000;
    for xts in both(&key(0x66)) {
        let src = patterned(4096);
        let mut dst = vec![0u8; 4096];
        let started = std::time::Instant::now();
        for i in 0..UNITS {
            xts.encrypt(u128::from(i), &src, &mut dst);
        }
        let enc = started.elapsed() / UNITS;
        let started = std::time::Instant::now();
        for i in 0..UNITS {
            xts.decrypt_in_place(u128::from(i), &mut dst);
        }
        let dec = started.elapsed() / UNITS;
        println!(
            "XTS-AES-256 per 4 KiB unit ({:?}): encrypt {enc:?}, decrypt in place {dec:?}",
            xts.backend()
        );
    }
}

/// With the core's DMA pool held down to the crypt layer's reserve (a quarter, here by a
/// client queue's own buffers), writes encipher into the channel's bounce memory instead and
/// still land encrypted: the crypt layer never waits on the pool, which the client's held
/// buffers could keep empty.
#[test]
fn writes_fall_back_to_bounce_memory_when_the_pool_is_low() {
    let s = setup("crypt-bounce");
    let e = &s.engine;
    s.pool.create_volume(e, "b", VOLUME_BYTES, vec![]).unwrap();
    let vol = s.pool.open_volume(e, "b").unwrap();
    let enc = attach(e, &vol, "b-crypt", "b", &key(0x36), true).unwrap();
    let depth = common::TEST_BUF_COUNT - common::TEST_BUF_COUNT / 4;
    let data = patterned(64 << 10);
    {
        let mut q = e.queue(&enc, e.cores()[0], depth).unwrap();
        for i in 0..4 {
            q.write_at(MIB + i * data.len() as u64, &data, i == 3)
                .unwrap();
        }
    }
    for i in 0..4 {
        let at = MIB + i * data.len() as u64;
        assert_eq!(read(e, &enc, at, data.len()), data, "write {i}");
    }
    assert!(
        !contains(&pool_file_bytes(&s), PATTERN),
        "plaintext in the pool file"
    );
    e.remove_bdev(&enc).unwrap();
    s.pool.close_volume(e, &vol).unwrap();
}
