/*
 * libcairn async benchmark: QD 32, 4 KiB random reads against a pool volume in a file, for
 * the given number of seconds (default 5), printing "iops N". The Rust counterpart is
 * ffi/examples/rust_bench.rs; `bash ci/cabi.sh bench` runs both and prints the ratio.
 */
#define _GNU_SOURCE
#include <cairn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MIB (1024ull * 1024ull)
#define QD 32
#define IO 4096u
#define VOL_BYTES (256 * MIB)

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t next_offset(void) {
    rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27;
    return ((rng * 0x2545F4914F6CDD1Dull) % (VOL_BYTES / IO)) * IO;
}

#define CHECK(call) do { int rc_ = (call); if (rc_ < 0) { \
    fprintf(stderr, "%s -> %s: %s\n", #call, cairn_strerror(rc_), cairn_last_error()); \
    return 1; } } while (0)

int main(int argc, char **argv) {
    double secs = argc > 1 ? atof(argv[1]) : 5.0;
    char dir[] = "/tmp/cairn-bench-XXXXXX", path[64];
    if (!mkdtemp(dir)) return 1;
    snprintf(path, sizeof path, "%s/pool.img", dir);
    cairn_engine_config cfg;
    cairn_engine *e; cairn_pool *p; cairn_volume *v; cairn_queue *q;
    CHECK(cairn_engine_config_default(&cfg));
    CHECK(cairn_engine_start(&cfg, &e));
    CHECK(cairn_pool_open(e, path, VOL_BYTES + 64 * MIB, &p));
    CHECK(cairn_pool_create_volume(p, "bench", VOL_BYTES));
    CHECK(cairn_volume_open(p, "bench", &v));
    unsigned char *fill, *bufs;
    if (posix_memalign((void **)&fill, 4096, MIB) || posix_memalign((void **)&bufs, 4096, QD * IO)) return 1;
    memset(fill, 0x5a, MIB);
    memset(bufs, 0, QD * IO);
    for (uint64_t off = 0; off < VOL_BYTES; off += MIB) CHECK(cairn_volume_write(v, off, MIB, fill));
    CHECK(cairn_volume_flush(v));
    CHECK(cairn_queue_create(v, QD, &q));

    cairn_completion done[QD];
    for (unsigned i = 0; i < QD; i++)
        CHECK(cairn_queue_submit(q, CAIRN_OP_READ, next_offset(), IO, bufs + i * IO, i));
    uint64_t ios = 0;
    double start = now(), end = start + secs;
    for (;;) {
        int n = cairn_queue_wait(q, 1, done, QD);
        CHECK(n);
        for (int i = 0; i < n; i++) {
            if (done[i].result != CAIRN_OK) { fprintf(stderr, "read failed: %d\n", done[i].result); return 1; }
            ios++;
            unsigned slot = (unsigned)done[i].user_data;
            CHECK(cairn_queue_submit(q, CAIRN_OP_READ, next_offset(), IO, bufs + slot * IO, slot));
        }
        if ((ios & 1023) < (uint64_t)n && now() >= end) break;
    }
    double elapsed = now() - start;
    printf("ios %llu secs %.2f\niops %.0f\n", (unsigned long long)ios, elapsed, ios / elapsed);
    CHECK(cairn_queue_close(q));
    CHECK(cairn_volume_close(v));
    CHECK(cairn_pool_close(p));
    CHECK(cairn_engine_stop(e));
    cairn_queue_free(q); cairn_volume_free(v); cairn_pool_free(p); cairn_engine_free(e);
    free(fill); free(bufs);
    unlink(path); rmdir(dir);
    return 0;
}
