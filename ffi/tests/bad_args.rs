//! Guards the C ABI's argument checking: each bad argument (NULL pointers, a misaligned
//! buffer, an out-of-range offset, a closed handle, a double close, a handle of the wrong type,
//! closing a handle with open dependants) is refused with its own stable error code and a
//! last-error message, and nothing is done. Calls go through the `extern "C"` functions exactly
//! as C would call them.

// Each test is a sequence of C calls, as a C program would make them; one SAFETY comment per
// block states why the whole sequence is sound.
#![allow(clippy::multiple_unsafe_ops_per_block)]

use cairn::*;
use std::ffi::{c_void, CStr};
use std::ptr::null_mut;

const MIB: u64 = 1 << 20;

/// Page-aligned, zeroed memory that frees itself.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let layout = std::alloc::Layout::from_size_align(len, 4096).unwrap();
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        Aligned { ptr, layout }
    }
    fn at(&self, off: usize) -> *mut c_void {
        self.ptr.wrapping_add(off).cast()
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

struct Setup {
    dir: std::path::PathBuf,
    engine: *mut cairn_engine,
    pool: *mut cairn_pool,
    vol: *mut cairn_volume,
}

fn last_error() -> String {
    let p = cairn_last_error();
    assert!(!p.is_null());
    // SAFETY: the library returns a NUL-terminated string valid until the next failure.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn setup(tag: &str) -> Setup {
    let dir = std::env::temp_dir().join(format!("cairn-ffi-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = std::ffi::CString::new(dir.join("pool.img").to_str().unwrap()).unwrap();
    let mut s = Setup {
        dir,
        engine: null_mut(),
        pool: null_mut(),
        vol: null_mut(),
    };
    let mut cfg = std::mem::MaybeUninit::uninit();
    // SAFETY: every pointer passed is valid; out-pointers are written on success.
    unsafe {
        assert_eq!(cairn_engine_config_default(cfg.as_mut_ptr()), CAIRN_OK);
        let mut cfg = cfg.assume_init();
        cfg.buf_count = 64;
        assert_eq!(cairn_engine_start(&cfg, &mut s.engine), CAIRN_OK);
        assert_eq!(
            cairn_pool_open(s.engine, path.as_ptr(), 32 * MIB, &mut s.pool),
            CAIRN_OK
        );
        assert_eq!(
            cairn_pool_create_volume(s.pool, c"v".as_ptr(), 4 * MIB),
            CAIRN_OK
        );
        assert_eq!(
            cairn_volume_open(s.pool, c"v".as_ptr(), &mut s.vol),
            CAIRN_OK
        );
    }
    s
}

impl Drop for Setup {
    fn drop(&mut self) {
        // SAFETY: handles from `setup`, freed once here, children first.
        unsafe {
            cairn_volume_free(self.vol);
            cairn_pool_free(self.pool);
            cairn_engine_free(self.engine);
        }
        drop(std::fs::remove_dir_all(&self.dir));
    }
}

#[test]
fn null_pointers_are_refused() {
    let s = setup("null");
    let buf = Aligned::new(4096);
    let mut out = null_mut();
    // SAFETY: NULLs are what is under test; everything else is valid.
    unsafe {
        assert_eq!(
            cairn_engine_start(std::ptr::null(), null_mut()),
            CAIRN_E_NULL
        );
        assert_eq!(
            cairn_pool_open(null_mut(), c"/x".as_ptr(), 0, &mut out),
            CAIRN_E_NULL
        );
        assert!(last_error().contains("engine"), "{}", last_error());
        assert_eq!(
            cairn_pool_open(s.engine, std::ptr::null(), 0, &mut out),
            CAIRN_E_NULL
        );
        assert_eq!(
            cairn_volume_open(s.pool, std::ptr::null(), null_mut()),
            CAIRN_E_NULL
        );
        assert_eq!(
            cairn_volume_read(null_mut(), 0, 4096, buf.at(0)),
            CAIRN_E_NULL
        );
        assert_eq!(cairn_volume_read(s.vol, 0, 4096, null_mut()), CAIRN_E_NULL);
        assert_eq!(cairn_volume_get_info(s.vol, null_mut()), CAIRN_E_NULL);
        let mut q = null_mut();
        assert_eq!(cairn_queue_create(s.vol, 4, &mut q), CAIRN_OK);
        assert_eq!(
            cairn_queue_submit(q, CAIRN_OP_READ, 0, 4096, null_mut(), 1),
            CAIRN_E_NULL
        );
        assert_eq!(cairn_queue_poll(q, null_mut(), 4), CAIRN_E_NULL);
        assert_eq!(cairn_queue_poll(null_mut(), null_mut(), 0), CAIRN_E_NULL);
        assert_eq!(cairn_queue_free(q), CAIRN_OK);
        // Freeing NULL is a no-op, like free(3).
        assert_eq!(cairn_queue_free(null_mut()), CAIRN_OK);
    }
}

#[test]
fn misaligned_buffers_and_bad_ranges_have_their_own_codes() {
    let s = setup("align");
    let buf = Aligned::new(8192);
    let mut q = null_mut();
    // SAFETY: the buffers are valid for the lengths given; the handles are live.
    unsafe {
        assert_eq!(
            cairn_volume_read(s.vol, 0, 4096, buf.at(512)),
            CAIRN_E_BUFFER_MISALIGNED
        );
        assert!(last_error().contains("aligned"), "{}", last_error());
        assert_eq!(
            cairn_volume_read(s.vol, 512, 4096, buf.at(0)),
            CAIRN_E_MISALIGNED
        );
        assert_eq!(
            cairn_volume_read(s.vol, 4 * MIB, 4096, buf.at(0)),
            CAIRN_E_OUT_OF_RANGE
        );
        assert!(last_error().contains("4194304"), "{}", last_error());
        assert_eq!(
            cairn_volume_read(s.vol, u64::MAX - 4095, 4096, buf.at(0)),
            CAIRN_E_OUT_OF_RANGE
        );
        assert_eq!(
            cairn_volume_write(s.vol, 0, 0, buf.at(0)),
            CAIRN_E_ZERO_LENGTH
        );
        assert_eq!(cairn_queue_create(s.vol, 4, &mut q), CAIRN_OK);
        assert_eq!(
            cairn_queue_submit(q, CAIRN_OP_WRITE, 0, 4096, buf.at(1), 7),
            CAIRN_E_BUFFER_MISALIGNED
        );
        assert_eq!(
            cairn_queue_submit(q, CAIRN_OP_WRITE, 4 * MIB, 4096, buf.at(0), 7),
            CAIRN_E_OUT_OF_RANGE
        );
        assert_eq!(
            cairn_queue_submit(q, CAIRN_OP_READ, 0, 2 * MIB as u32, buf.at(0), 7),
            CAIRN_E_TOO_LARGE
        );
        assert_eq!(
            cairn_queue_submit(q, 99, 0, 4096, buf.at(0), 7),
            CAIRN_E_INVALID
        );
        // Refused requests produce no completion and leave nothing in flight.
        assert_eq!(cairn_queue_in_flight(q), 0);
        let mut done = [cairn_completion::default(); 4];
        assert_eq!(cairn_queue_poll(q, done.as_mut_ptr(), 4), 0);
        let mut stats = cairn_volume_stats::default();
        assert_eq!(cairn_volume_get_stats(s.vol, &mut stats), CAIRN_OK);
        assert_eq!(stats.errors, 8);
        assert_eq!(cairn_queue_free(q), CAIRN_OK);
    }
}

#[test]
fn closed_handles_and_double_close_are_refused() {
    let s = setup("closed");
    let buf = Aligned::new(4096);
    let mut q = null_mut();
    let mut done = [cairn_completion::default(); 4];
    // SAFETY: the handles stay allocated until their free; the buffer is valid.
    unsafe {
        assert_eq!(cairn_queue_create(s.vol, 4, &mut q), CAIRN_OK);
        assert_eq!(
            cairn_queue_submit(q, CAIRN_OP_WRITE, 0, 4096, buf.at(0), 5),
            CAIRN_OK
        );
        // Dependants keep their parents open.
        assert_eq!(cairn_volume_close(s.vol), CAIRN_E_BUSY);
        assert_eq!(cairn_pool_close(s.pool), CAIRN_E_BUSY);
        assert_eq!(cairn_engine_stop(s.engine), CAIRN_E_BUSY);
        assert_eq!(cairn_queue_wait(q, 1, done.as_mut_ptr(), 4), 1);
        assert_eq!(
            done[0],
            cairn_completion {
                user_data: 5,
                result: CAIRN_OK
            }
        );
        assert_eq!(cairn_queue_close(q), CAIRN_OK);
        assert_eq!(cairn_queue_close(q), CAIRN_E_CLOSED);
        assert_eq!(
            cairn_queue_submit(q, CAIRN_OP_READ, 0, 4096, buf.at(0), 1),
            CAIRN_E_CLOSED
        );
        assert_eq!(cairn_queue_wait(q, 1, done.as_mut_ptr(), 4), CAIRN_E_CLOSED);
        assert_eq!(cairn_volume_close(s.vol), CAIRN_OK);
        assert_eq!(cairn_volume_close(s.vol), CAIRN_E_CLOSED);
        assert_eq!(cairn_volume_read(s.vol, 0, 4096, buf.at(0)), CAIRN_E_CLOSED);
        let mut q2 = null_mut();
        assert_eq!(cairn_queue_create(s.vol, 4, &mut q2), CAIRN_E_CLOSED);
        assert!(q2.is_null());
        assert_eq!(cairn_pool_close(s.pool), CAIRN_OK);
        assert_eq!(cairn_pool_close(s.pool), CAIRN_E_CLOSED);
        assert_eq!(cairn_engine_stop(s.engine), CAIRN_OK);
        assert_eq!(cairn_engine_stop(s.engine), CAIRN_E_CLOSED);
        assert_eq!(cairn_queue_free(q), CAIRN_OK);
    }
}

#[test]
fn a_handle_of_the_wrong_type_is_refused() {
    let s = setup("magic");
    let buf = Aligned::new(4096);
    // SAFETY: the pointers are live allocations of this library, only of another type.
    unsafe {
        let as_vol = s.pool.cast::<cairn_volume>();
        assert_eq!(
            cairn_volume_read(as_vol, 0, 4096, buf.at(0)),
            CAIRN_E_BAD_HANDLE
        );
        let as_queue = s.vol.cast::<cairn_queue>();
        assert_eq!(cairn_queue_close(as_queue), CAIRN_E_BAD_HANDLE);
    }
}

#[test]
fn every_code_has_its_own_description() {
    let mut seen = std::collections::HashSet::new();
    for code in -24..=0 {
        // SAFETY: cairn_strerror returns a static NUL-terminated string.
        let s = unsafe { CStr::from_ptr(cairn_strerror(code)) };
        assert!(seen.insert(s.to_owned()), "code {code} repeats {s:?}");
    }
    // SAFETY: as above.
    let unknown = unsafe { CStr::from_ptr(cairn_strerror(-1000)) };
    assert_eq!(unknown, c"unknown error code");
}

#[test]
fn an_encrypted_volume_is_refused_rather_than_opened_raw() {
    let mut s = setup("encrypted");
    let block = Aligned::new(4096);
    // SAFETY: the block is 4096 bytes of aligned memory this test owns.
    unsafe { std::ptr::copy_nonoverlapping(b"CAIRNXTS".as_ptr(), block.ptr, 8) };
    // SAFETY: live handles from `setup`; the buffer is aligned and 4096 bytes long.
    unsafe {
        assert_eq!(cairn_volume_write(s.vol, 0, 4096, block.at(0)), CAIRN_OK);
        assert_eq!(cairn_volume_flush(s.vol), CAIRN_OK);
        assert_eq!(cairn_volume_free(s.vol), CAIRN_OK);
        s.vol = null_mut();
        assert_eq!(
            cairn_volume_open(s.pool, c"v".as_ptr(), &mut s.vol),
            CAIRN_E_UNSUPPORTED
        );
    }
    assert!(s.vol.is_null());
    let e = last_error();
    assert!(e.contains("'v' is encrypted"), "{e}");
}
