//! Guards the NBD URL path end to end: `cairn_volume_open_nbd` against nbdkit's memory plugin
//! (handshake with NBD_OPT_GO, then read, write, flush, trim, write-zeroes through the
//! synchronous calls and an asynchronous queue), and the error for an unreachable server.
//! Skips, saying why, when nbdkit is not installed; under CI that fails instead (cairn-testkit).

#![allow(clippy::multiple_unsafe_ops_per_block)]

use cairn::*;
use std::ffi::CString;
use std::process::{Child, Command, Stdio};
use std::ptr::null_mut;
use std::time::{Duration, Instant};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        drop(self.0.kill());
        drop(self.0.wait());
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nbdkit(port: u16) -> Option<Server> {
    if !cairn_testkit::require_tool("nbdkit", "nbdkit") {
        return None;
    }
    let child = Command::new("nbdkit")
        .args(["--exit-with-parent", "-f", "-i", "127.0.0.1", "-p"])
        .arg(port.to_string())
        .args(["memory", "64M"])
        .stdout(Stdio::null())
        .spawn()
        .expect("nbdkit is on PATH and starts");
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nbdkit did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Some(server)
}

#[test]
fn nbd_volume_reads_back_what_it_wrote() {
    let port = free_port();
    let Some(_server) = nbdkit(port) else { return };
    let url = CString::new(format!("nbd://127.0.0.1:{port}/")).unwrap();
    let mut e = null_mut();
    let mut v = null_mut();
    let mut q = null_mut();
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 31) as u8).collect();
    let mut back = vec![0u8; 65536];
    let mut done = [cairn_completion::default(); 8];
    // SAFETY: all pointers are valid for the lengths given and the handles are live.
    unsafe {
        assert_eq!(cairn_engine_start(std::ptr::null(), &mut e), CAIRN_OK);
        assert_eq!(cairn_volume_open_nbd(e, url.as_ptr(), &mut v), CAIRN_OK);
        let mut info = std::mem::zeroed::<cairn_volume_info>();
        assert_eq!(cairn_volume_get_info(v, &mut info), CAIRN_OK);
        assert_eq!(info.size_bytes, 64 << 20);
        assert_eq!(
            cairn_volume_write(v, 4096, 65536, data.as_ptr().cast()),
            CAIRN_OK
        );
        assert_eq!(cairn_volume_flush(v), CAIRN_OK);
        assert_eq!(
            cairn_volume_read(v, 4096, 65536, back.as_mut_ptr().cast()),
            CAIRN_OK
        );
        assert!(back == data, "read back differs");
        assert_eq!(cairn_volume_write_zeroes(v, 4096, 512), CAIRN_OK);
        assert_eq!(cairn_volume_trim(v, 1 << 20, 1 << 20), CAIRN_OK);
        assert_eq!(cairn_queue_create(v, 8, &mut q), CAIRN_OK);
        for i in 0..8u64 {
            let p = back.as_mut_ptr().add(i as usize * 512);
            assert_eq!(
                cairn_queue_submit(q, CAIRN_OP_READ, 4096 + i * 512, 512, p.cast(), i),
                CAIRN_OK
            );
        }
        let mut n = 0;
        while n < 8 {
            let got = cairn_queue_wait(q, 1, done.as_mut_ptr(), 8);
            assert!(got > 0, "wait returned {got}");
            assert!(done[..got as usize].iter().all(|c| c.result == CAIRN_OK));
            n += got;
        }
        assert!(
            back[..512].iter().all(|&b| b == 0),
            "write-zeroes did not zero"
        );
        assert_eq!(&back[512..4096], &data[512..4096]);
        assert_eq!(cairn_queue_free(q), CAIRN_OK);
        assert_eq!(cairn_volume_close(v), CAIRN_OK);
        assert_eq!(cairn_volume_free(v), CAIRN_OK);
        assert_eq!(cairn_engine_free(e), CAIRN_OK);
    }
}

#[test]
fn unreachable_server_and_bad_urls_are_refused() {
    let port = free_port();
    let mut e = null_mut();
    let mut v = null_mut();
    let url = CString::new(format!("nbd://127.0.0.1:{port}/x")).unwrap();
    // SAFETY: valid strings and out-pointers; the engine handle is live.
    unsafe {
        assert_eq!(cairn_engine_start(std::ptr::null(), &mut e), CAIRN_OK);
        assert_eq!(cairn_volume_open_nbd(e, url.as_ptr(), &mut v), CAIRN_E_NBD);
        assert!(v.is_null());
        assert_eq!(
            cairn_volume_open_nbd(e, c"http://x/y".as_ptr(), &mut v),
            CAIRN_E_INVALID
        );
        assert_eq!(
            cairn_volume_open_nbd(e, std::ptr::null(), &mut v),
            CAIRN_E_NULL
        );
        assert_eq!(cairn_engine_free(e), CAIRN_OK);
    }
}
