//! Guards that closing through the C ABI releases everything: a pool file opened, used, closed
//! and opened again 100 times, once with a new engine each round and once in one engine, leaves
//! the process's fd and thread counts flat. Calls go through the `extern "C"` functions exactly
//! as C would call them.
//!
//! The bug: the engine kept every bdev it was ever given until it stopped, so each pool closed
//! in a running engine left its file open.

// Each round is a sequence of C calls, as a C program would make them; one SAFETY comment per
// block states why the whole sequence is sound.
#![allow(clippy::multiple_unsafe_ops_per_block)]

use cairn::*;
use cairn_testkit::proc_self::fds_and_threads;
use std::ffi::{c_void, CString};
use std::ptr::null_mut;
use std::sync::Mutex;

const MIB: u64 = 1 << 20;
const POOL_BYTES: u64 = 32 * MIB;
const VOLUME_BYTES: u64 = 4 * MIB;
const BLOCK: usize = 4096;
/// Open/use/close rounds per test.
const ROUNDS: usize = 100;

/// The tests count the whole process's fds and threads, so they must not run side by side.
static SERIAL: Mutex<()> = Mutex::new(());

/// A pool file in its own directory, removed on drop.
struct PoolFile {
    dir: std::path::PathBuf,
    path: CString,
}

impl PoolFile {
    fn new(tag: &str) -> PoolFile {
        let dir = std::env::temp_dir().join(format!("cairn-ffi-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = CString::new(dir.join("pool.img").to_str().unwrap()).unwrap();
        PoolFile { dir, path }
    }
}

impl Drop for PoolFile {
    fn drop(&mut self) {
        drop(std::fs::remove_dir_all(&self.dir));
    }
}

fn start_engine() -> *mut cairn_engine {
    let mut cfg = std::mem::MaybeUninit::uninit();
    let mut engine = null_mut();
    // SAFETY: every pointer passed is valid; out-pointers are written on success.
    unsafe {
        assert_eq!(cairn_engine_config_default(cfg.as_mut_ptr()), CAIRN_OK);
        let mut cfg = cfg.assume_init();
        cfg.buf_count = 64;
        assert_eq!(cairn_engine_start(&cfg, &mut engine), CAIRN_OK);
    }
    engine
}

/// Opens the pool (creating it and volume "v" in round 0), checks the previous round's data,
/// writes this round's, and closes and frees the volume and the pool.
fn pool_round(engine: *mut cairn_engine, file: &PoolFile, round: usize) {
    let layout = std::alloc::Layout::from_size_align(BLOCK, BLOCK).unwrap();
    // SAFETY: the layout has a non-zero size.
    let buf = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!buf.is_null());
    let create = if round == 0 { POOL_BYTES } else { 0 };
    let (mut pool, mut vol) = (null_mut(), null_mut());
    // SAFETY: `engine` is live; `buf` is valid and aligned for BLOCK bytes; handles are used
    // only between their open and their free.
    unsafe {
        assert_eq!(
            cairn_pool_open(engine, file.path.as_ptr(), create, &mut pool),
            CAIRN_OK,
            "round {round}: pool open"
        );
        if round == 0 {
            assert_eq!(
                cairn_pool_create_volume(pool, c"v".as_ptr(), VOLUME_BYTES),
                CAIRN_OK
            );
        }
        assert_eq!(cairn_volume_open(pool, c"v".as_ptr(), &mut vol), CAIRN_OK);
        let block = std::slice::from_raw_parts_mut(buf, BLOCK);
        if round > 0 {
            assert_eq!(
                cairn_volume_read(vol, 0, BLOCK as u64, buf.cast::<c_void>()),
                CAIRN_OK
            );
            assert!(
                block.iter().all(|&b| b == (round - 1) as u8),
                "round {round}"
            );
        }
        block.fill(round as u8);
        assert_eq!(
            cairn_volume_write(vol, 0, BLOCK as u64, buf.cast::<c_void>()),
            CAIRN_OK
        );
        assert_eq!(cairn_volume_flush(vol), CAIRN_OK);
        assert_eq!(cairn_volume_close(vol), CAIRN_OK);
        assert_eq!(cairn_volume_free(vol), CAIRN_OK);
        assert_eq!(cairn_pool_close(pool), CAIRN_OK);
        assert_eq!(cairn_pool_free(pool), CAIRN_OK);
        std::alloc::dealloc(buf, layout);
    }
}

/// Runs `round` ROUNDS times; the counts after the last equal those after the first.
fn flat(what: &str, mut round: impl FnMut(usize)) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    round(0);
    let first = fds_and_threads();
    for i in 1..ROUNDS {
        round(i);
    }
    let last = fds_and_threads();
    assert_eq!(
        last, first,
        "{what}: (fds, threads) after round 1 {first:?}, after round {ROUNDS} {last:?}"
    );
}

#[test]
fn engine_pool_and_volume_reopen_100_times_with_fds_and_threads_flat() {
    let file = PoolFile::new("reopen-engine");
    flat("new engine each round", |round| {
        let engine = start_engine();
        pool_round(engine, &file, round);
        // SAFETY: the engine from `start_engine`, with nothing open on it, freed once.
        unsafe {
            assert_eq!(cairn_engine_stop(engine), CAIRN_OK);
            assert_eq!(cairn_engine_free(engine), CAIRN_OK);
        }
    });
}

#[test]
fn a_pool_reopens_100_times_in_one_engine_with_fds_flat() {
    let file = PoolFile::new("reopen-pool");
    let engine = start_engine();
    flat("one engine", |round| pool_round(engine, &file, round));
    // SAFETY: the engine from `start_engine`, with nothing open on it, freed once.
    unsafe { assert_eq!(cairn_engine_free(engine), CAIRN_OK) };
}
