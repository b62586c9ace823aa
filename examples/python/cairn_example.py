#!/usr/bin/env python3
"""libcairn through ctypes: create a pool file in a temporary directory, start the engine,
create and open a volume, write, read back and verify, run a few asynchronous requests, check
the error codes of bad calls, close everything and exit 0.

Run: LD_LIBRARY_PATH=target/release python3 examples/python/cairn_example.py
(or set CAIRN_LIB to the path of libcairn.so).
"""
import ctypes as C
import mmap
import os
import sys
import tempfile

MIB = 1 << 20
CAIRN_OK, CAIRN_E_NULL, CAIRN_E_CLOSED = 0, -1, -3
CAIRN_E_BUFFER_MISALIGNED, CAIRN_E_OUT_OF_RANGE = -5, -7
CAIRN_OP_READ, CAIRN_OP_WRITE = 0, 1


class Config(C.Structure):
    _fields_ = [("cores", C.c_char_p), ("buf_count", C.c_uint32), ("buf_size_bytes", C.c_uint32),
                ("idle_policy", C.c_uint32), ("spin_us", C.c_uint32)]


class Info(C.Structure):
    _fields_ = [("size_bytes", C.c_uint64), ("block_size_bytes", C.c_uint32),
                ("buf_align_bytes", C.c_uint32), ("max_io_bytes", C.c_uint32),
                ("read_only", C.c_uint32), ("name", C.c_char * 256)]


class Completion(C.Structure):
    _fields_ = [("user_data", C.c_uint64), ("result", C.c_int)]


def load():
    lib = C.CDLL(os.environ.get("CAIRN_LIB", "libcairn.so"))
    lib.cairn_strerror.restype = C.c_char_p
    lib.cairn_last_error.restype = C.c_char_p
    p = C.c_void_p
    lib.cairn_engine_start.argtypes = [C.POINTER(Config), C.POINTER(p)]
    lib.cairn_pool_open.argtypes = [p, C.c_char_p, C.c_uint64, C.POINTER(p)]
    lib.cairn_pool_create_volume.argtypes = [p, C.c_char_p, C.c_uint64]
    lib.cairn_volume_open.argtypes = [p, C.c_char_p, C.POINTER(p)]
    lib.cairn_volume_get_info.argtypes = [p, C.POINTER(Info)]
    for f in ("read", "write"):
        getattr(lib, "cairn_volume_" + f).argtypes = [p, C.c_uint64, C.c_uint64, p]
    lib.cairn_queue_create.argtypes = [p, C.c_uint32, C.POINTER(p)]
    lib.cairn_queue_submit.argtypes = [p, C.c_uint32, C.c_uint64, C.c_uint32, p, C.c_uint64]
    lib.cairn_queue_wait.argtypes = [p, C.c_uint32, C.POINTER(Completion), C.c_uint32]
    lib.cairn_queue_poll.argtypes = [p, C.POINTER(Completion), C.c_uint32]
    for name in ("engine_stop", "engine_free", "pool_close", "pool_free", "volume_close",
                 "volume_free", "queue_close", "queue_free", "volume_flush"):
        getattr(lib, "cairn_" + name).argtypes = [p]
    return lib


def main():
    lib = load()

    def ok(rc, what):
        if rc < 0:
            raise SystemExit(f"{what}: {rc} ({lib.cairn_strerror(rc).decode()}): "
                             f"{(lib.cairn_last_error() or b'').decode()}")
        return rc

    def expect(cond, what):
        if not cond:
            raise SystemExit(f"expected {what}")

    with tempfile.TemporaryDirectory(prefix="cairn-py-") as d:
        path = os.path.join(d, "pool.img").encode()
        cfg = Config()
        ok(lib.cairn_engine_config_default(C.byref(cfg)), "config")
        engine, pool, vol, q = C.c_void_p(), C.c_void_p(), C.c_void_p(), C.c_void_p()
        ok(lib.cairn_engine_start(C.byref(cfg), C.byref(engine)), "engine_start")
        ok(lib.cairn_pool_open(engine, path, 64 * MIB, C.byref(pool)), "pool_open")
        ok(lib.cairn_pool_create_volume(pool, b"pyvol", 8 * MIB), "create_volume")
        ok(lib.cairn_volume_open(pool, b"pyvol", C.byref(vol)), "volume_open")
        info = Info()
        ok(lib.cairn_volume_get_info(vol, C.byref(info)), "info")
        expect(info.name == b"pyvol" and info.size_bytes == 8 * MIB, "volume info")

        # mmap gives page-aligned, zeroed memory, which satisfies buf_align_bytes (4096).
        buf = mmap.mmap(-1, 64 * 1024)
        addr = C.addressof(C.c_char.from_buffer(buf))
        pattern = bytes((i * 13) & 0xFF for i in range(64 * 1024))
        buf[:] = pattern
        ok(lib.cairn_volume_write(vol, MIB, 64 * 1024, addr), "write")
        ok(lib.cairn_volume_flush(vol), "flush")
        buf[:] = bytes(64 * 1024)
        ok(lib.cairn_volume_read(vol, MIB, 64 * 1024, addr), "read")
        expect(buf[:] == pattern, "read back what was written")

        ok(lib.cairn_queue_create(vol, 16, C.byref(q)), "queue_create")
        for i in range(16):
            ok(lib.cairn_queue_submit(q, CAIRN_OP_READ, MIB + i * 4096, 4096, addr + i * 4096, i),
               "submit")
        done = (Completion * 16)()
        n = 0
        while n < 16:
            got = ok(lib.cairn_queue_wait(q, 1, done, 16), "wait")
            for c in done[:got]:
                expect(c.result == CAIRN_OK, "async read succeeded")
            n += got
        expect(buf[:] == pattern, "async reads return the data")
        expect(lib.cairn_queue_submit(q, CAIRN_OP_READ, 0, 4096, addr + 1, 0)
               == CAIRN_E_BUFFER_MISALIGNED, "misaligned buffer refused")
        expect(lib.cairn_queue_submit(q, CAIRN_OP_READ, 8 * MIB, 4096, addr, 0)
               == CAIRN_E_OUT_OF_RANGE, "out-of-range offset refused")
        expect(lib.cairn_volume_read(None, 0, 4096, addr) == CAIRN_E_NULL, "NULL handle refused")

        ok(lib.cairn_queue_close(q), "queue_close")
        expect(lib.cairn_queue_close(q) == CAIRN_E_CLOSED, "double close refused")
        ok(lib.cairn_volume_close(vol), "volume_close")
        ok(lib.cairn_pool_close(pool), "pool_close")
        ok(lib.cairn_engine_stop(engine), "engine_stop")
        for f, h in (("queue", q), ("volume", vol), ("pool", pool), ("engine", engine)):
            ok(getattr(lib, f"cairn_{f}_free")(h), f + "_free")
        del done
        buf.close()
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
