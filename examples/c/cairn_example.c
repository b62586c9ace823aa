/*
 * libcairn walk-through: creates a pool file in a fresh temporary directory, starts the
 * engine, creates and opens a volume, writes, reads back and verifies synchronously, runs a
 * batch of asynchronous requests through a queue, checks the stats and the error codes of a
 * few bad calls, then closes and frees everything. Exits 0 on success.
 *
 * Build: cc -Iffi/include examples/c/cairn_example.c -Ltarget/release -lcairn -o cairn_example
 */
#define _GNU_SOURCE
#include <cairn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define MIB (1024u * 1024u)
#define QD 8
#define IO_BYTES 4096u

static int failures;


#define CHECK(call)                                                                     \
    do {                                                                                \
        int rc_ = (call);                                                               \
        if (rc_ < 0) {                                                                  \
            fprintf(stderr, "%s:%d: %s -> %d (%s): %s\n", __FILE__, __LINE__, #call,    \
                    rc_, cairn_strerror(rc_), cairn_last_error() ? cairn_last_error() : "");  \
            failures++;                                                                 \
            goto out;                                                                   \
        }                                                                               \
    } while (0)

#define EXPECT(cond)                                                                    \
    do {                                                                                \
        if (!(cond)) {                                                                  \
            fprintf(stderr, "%s:%d: expected %s\n", __FILE__, __LINE__, #cond);         \
            failures++;                                                                 \
            goto out;                                                                   \
        }                                                                               \
    } while (0)

static void *alloc_aligned(size_t align, size_t len) {
    void *p = NULL;
    if (posix_memalign(&p, align, len) != 0) return NULL;
    /* io_uring fills read buffers behind valgrind's back: start them defined. */
    memset(p, 0, len);
    return p;
}

int main(void) {
    char dir[] = "/tmp/cairn-example-XXXXXX";
    char path[sizeof dir + 16];
    cairn_engine *engine = NULL;
    cairn_pool *pool = NULL;
    cairn_volume *vol = NULL;
    cairn_queue *q = NULL;
    unsigned char *wbuf = NULL, *rbuf = NULL, *abuf = NULL;
    cairn_engine_config cfg;
    cairn_volume_info info;
    cairn_volume_stats stats;
    cairn_completion done[QD];

    if (!mkdtemp(dir)) {
        perror("mkdtemp");
        return 1;
    }
    snprintf(path, sizeof path, "%s/pool.img", dir);

    CHECK(cairn_engine_config_default(&cfg));
    /* Valgrind runs one thread at a time and does not release that lock while a thread
     * blocks in io_uring_enter, so a sleeping reactor would freeze the process under it;
     * ci/cabi.sh sets CAIRN_EXAMPLE_POLL=1 so the reactor polls instead of sleeping. */
    if (getenv("CAIRN_EXAMPLE_POLL")) cfg.idle_policy = CAIRN_IDLE_POLL;
    CHECK(cairn_engine_start(&cfg, &engine));
    CHECK(cairn_pool_open(engine, path, 64 * MIB, &pool));
    CHECK(cairn_pool_create_volume(pool, "vol0", 16 * MIB));
    CHECK(cairn_volume_open(pool, "vol0", &vol));
    CHECK(cairn_volume_get_info(vol, &info));
    EXPECT(info.size_bytes == 16 * MIB && strcmp(info.name, "vol0") == 0);
    printf("volume %s: %llu bytes, block %u, buffer alignment %u\n", info.name,
           (unsigned long long)info.size_bytes, info.block_size_bytes, info.buf_align_bytes);

    /* Synchronous write, flush, read back, verify. */
    wbuf = alloc_aligned(info.buf_align_bytes, 2 * MIB);
    rbuf = alloc_aligned(info.buf_align_bytes, 2 * MIB);
    abuf = alloc_aligned(info.buf_align_bytes, QD * IO_BYTES);
    EXPECT(wbuf && rbuf && abuf);
    for (size_t i = 0; i < 2 * MIB; i++) wbuf[i] = (unsigned char)(i * 7 + 3);
    CHECK(cairn_volume_write(vol, MIB - 4096, 2 * MIB, wbuf)); /* spans clusters, split */
    CHECK(cairn_volume_flush(vol));
    CHECK(cairn_volume_read(vol, MIB - 4096, 2 * MIB, rbuf));
    EXPECT(memcmp(wbuf, rbuf, 2 * MIB) == 0);
    CHECK(cairn_volume_write_zeroes(vol, MIB - 4096, 4096));
    CHECK(cairn_volume_read(vol, MIB - 4096, 4096, rbuf));
    for (size_t i = 0; i < 4096; i++) EXPECT(rbuf[i] == 0);
    CHECK(cairn_volume_trim(vol, 8 * MIB, MIB));

    /* Asynchronous: QD writes, wait for all, then QD reads, verify. */
    CHECK(cairn_queue_create(vol, QD, &q));
    for (unsigned i = 0; i < QD; i++) {
        memset(abuf + i * IO_BYTES, 0xA0 + i, IO_BYTES);
        CHECK(cairn_queue_submit(q, CAIRN_OP_WRITE, (uint64_t)(4 + i) * MIB, IO_BYTES,
                                 abuf + i * IO_BYTES, 100 + i));
    }
    int n = 0;
    while (n < QD) {
        int got;
        CHECK(got = cairn_queue_wait(q, 1, done, QD));
        for (int j = 0; j < got; j++) EXPECT(done[j].result == CAIRN_OK && done[j].user_data >= 100);
        n += got;
    }
    memset(abuf, 0, QD * IO_BYTES);
    for (unsigned i = 0; i < QD; i++)
        CHECK(cairn_queue_submit(q, CAIRN_OP_READ, (uint64_t)(4 + i) * MIB, IO_BYTES,
                                 abuf + i * IO_BYTES, i));
    CHECK(n = cairn_queue_wait(q, QD, done, QD));
    EXPECT(n == QD);
    for (int j = 0; j < n; j++) EXPECT(done[j].result == CAIRN_OK);
    for (unsigned i = 0; i < QD; i++)
        for (unsigned b = 0; b < IO_BYTES; b++) EXPECT(abuf[i * IO_BYTES + b] == 0xA0 + i);
    EXPECT(cairn_queue_poll(q, done, QD) == 0);

    /* Bad calls get their own codes. */
    EXPECT(cairn_queue_submit(q, CAIRN_OP_READ, 0, IO_BYTES, abuf + 1, 0) == CAIRN_E_BUFFER_MISALIGNED);
    EXPECT(cairn_queue_submit(q, CAIRN_OP_READ, 16 * MIB, IO_BYTES, abuf, 0) == CAIRN_E_OUT_OF_RANGE);
    EXPECT(cairn_queue_submit(q, CAIRN_OP_READ, 0, IO_BYTES, NULL, 0) == CAIRN_E_NULL);
    EXPECT(cairn_volume_read(NULL, 0, IO_BYTES, abuf) == CAIRN_E_NULL);
    EXPECT(cairn_volume_close(vol) == CAIRN_E_BUSY); /* the queue is still open */

    CHECK(cairn_volume_get_stats(vol, &stats));
    printf("stats: %llu reads, %llu writes, %llu bytes read, %llu written, %llu errors\n",
           (unsigned long long)stats.reads, (unsigned long long)stats.writes,
           (unsigned long long)stats.bytes_read, (unsigned long long)stats.bytes_written,
           (unsigned long long)stats.errors);
    EXPECT(stats.writes >= QD + 2 && stats.reads >= QD + 3 && stats.errors == 3);

    CHECK(cairn_queue_close(q));
    EXPECT(cairn_queue_close(q) == CAIRN_E_CLOSED);
    EXPECT(cairn_queue_poll(q, done, QD) == CAIRN_E_CLOSED);
    CHECK(cairn_volume_close(vol));
    EXPECT(cairn_volume_read(vol, 0, IO_BYTES, abuf) == CAIRN_E_CLOSED);
    CHECK(cairn_pool_close(pool));
    CHECK(cairn_engine_stop(engine));
    EXPECT(cairn_engine_stop(engine) == CAIRN_E_CLOSED);
    printf("ok\n");

out:
    cairn_queue_free(q);
    cairn_volume_free(vol);
    cairn_pool_free(pool);
    cairn_engine_free(engine);
    free(wbuf);
    free(rbuf);
    free(abuf);
    unlink(path);
    rmdir(dir);
    return failures ? 1 : 0;
}
