/* blkprobe: scripted checks of a block backend, one action per run.
 *
 * Params: disk=NAME (default: the first block device), action=ACTION,
 * timeout=MS (per response, default 10000; 0: forever), and per action:
 *
 *   info      blkprobe: sectors=N sector_size=S ro=0|1 flush=0|1 discard=0|1
 *   write     sector=S (0) count=C (1) byte=B (0xAB): write C sectors of byte B
 *             (in requests of up to 128 KiB) ->  blkprobe: write status=N
 *   read      sector=S (0) count=C (1): read C sectors ->
 *               blkprobe: read status=N sum=0x<FNV-1a 32 of the C*512 bytes>
 *               blkprobe: read head=<first 16 bytes in hex>
 *   flush     -> blkprobe: flush status=N
 *   discard   sector=S (0) count=C (1) -> blkprobe: discard status=N
 *   badreq    kind=segout|toomany|sector|op|sectorwrap|all (all): malformed
 *             requests put straight into the ring, one at a time, one line each:
 *               blkprobe: badreq kind=K status=N case=C
 *   ringjump  publishes req_prod = (the published index) + 0x10000, far beyond
 *             the ring, prints `blkprobe: ringjump sent` (before the kick, as the
 *             crash may follow it at once), kicks, then waits wait=MS (2000) for
 *             the kernel to crash the domain; if it is still alive it prints
 *             `blkprobe: ringjump survived` (then `blkprobe: done`).
 *   secret    puts SECRET (64 bytes, below) at a 512-aligned guest address at or
 *             above the region's size, outside the region, and submits a WRITE
 *             of one 512-byte segment whose offset is that address, to
 *             sector=S (0) -> blkprobe: secret status=N offset=0x<off> sector=S
 *             (a correct backend answers -1 and the secret never reaches the
 *             disk; the 512 bytes at the address hold SECRET 8 times).
 *
 * A status is the response's (0 okay, -1 error, -2 not supported), or the
 * frontend's own failure: -100 the backend broke the protocol (reported with
 * HC_DEVICE_FAULT), -101 no response within timeout.  Every run ends with
 * `blkprobe: done` and exit code 0; exit code 2 if the disk cannot be opened,
 * 3 for bad parameters.
 */
#include "isovisor.h"

/* The 64-byte secret (without the string's NUL): "ISOVISOR-SECRET-0123456789abcdef" twice. */
static const char SECRET[] = "ISOVISOR-SECRET-0123456789abcdef"
                             "ISOVISOR-SECRET-0123456789abcdef";
#define SECRET_BYTES (sizeof SECRET - 1)
_Static_assert(SECRET_BYTES == 64, "the secret is 64 bytes");

#define CHUNK_SECTORS (BLKIF_MAX_REQUEST_BYTES / BLKIF_SECTOR_SIZE)

static struct blkfront bf;

static NORETURN void usage(const char *msg)
{
    printf("blkprobe: error: %s\n", msg);
    exit(3);
}

static u32 fnv1a32(const u8 *p, u64 n)
{
    u32 h = 0x811C9DC5u;
    for (u64 i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x01000193u;
    }
    return h;
}

static u8 *alloc_sectors(u64 count)
{
    if (count == 0 || count > (1ULL << 40))
        usage("count must be at least 1");
    u8 *p = heap_alloc(count * BLKIF_SECTOR_SIZE, 64);
    if (!p)
        crashf("blkprobe: %lu sectors do not fit in this domain (%lu bytes free): lower count"
               " or give the domain more memory",
               (unsigned long)count, (unsigned long)heap_free_bytes());
    return p;
}

/* Chunked synchronous I/O: the first status that is not OKAY, else OKAY. */
static int rw_chunked(u8 op, u64 sector, u8 *buf, u64 count)
{
    for (u64 done = 0; done < count;) {
        u64 n = count - done < CHUNK_SECTORS ? count - done : CHUNK_SECTORS;
        int st = blkfront_rw(&bf, op, sector + done, buf + done * BLKIF_SECTOR_SIZE,
                             n * BLKIF_SECTOR_SIZE);
        if (st != BLKIF_STATUS_OKAY)
            return st;
        done += n;
    }
    return BLKIF_STATUS_OKAY;
}

/* --- badreq ------------------------------------------------------------------------ */

struct one_status {
    int done;
    int status;
};

static void on_one(void *ctx, int tag, int status)
{
    (void)tag;
    struct one_status *s = ctx;
    s->done = 1;
    s->status = status;
}

/* Submit one raw request and wait for its response: the status. */
static int submit_raw(const struct blkif_request *req)
{
    int tag = blkfront_get_tag(&bf);
    if (tag < 0)
        return bf.failed ? BLKFRONT_E_FAILED : BLKFRONT_E_BUSY;
    int r = blkfront_queue_raw(&bf, tag, req);
    if (r < 0) {
        blkfront_put_tag(&bf, tag);
        return r;
    }
    blkfront_push(&bf);
    struct one_status s = {0, 0};
    for (;;) {
        r = blkfront_poll(&bf, on_one, &s);
        if (r < 0)
            return r;
        if (s.done)
            return s.status;
        r = blkfront_wait(&bf);
        if (r < 0)
            return r;
    }
}

static struct blkif_request mkreq(u8 op, u64 sector)
{
    struct blkif_request req;
    memset(&req, 0, sizeof req);
    req.op = op;
    req.sector = sector;
    return req;
}

static void seg(struct blkif_request *req, u64 offset, u64 length)
{
    req->seg[req->nr_segments].offset = (u32)offset;
    req->seg[req->nr_segments].length = (u32)length;
    req->nr_segments++;
}

/* Returns 0, or -1 if the frontend failed (stop probing). */
static int report(const char *kind, const char *name, const struct blkif_request *req)
{
    int st = submit_raw(req);
    printf("blkprobe: badreq kind=%s status=%d case=%s\n", kind, st, name);
    return st <= BLKFRONT_E_FAILED ? -1 : 0;
}

static int badreq_segout(void)
{
    const char *k = "segout";
    u64 window = bf.dev.region_size;
    u64 mine = BLKIF_DATA_OFFSET; /* a data-area offset that is valid */
    struct blkif_request q;
    q = mkreq(BLKIF_OP_READ, 0);
    seg(&q, 0, BLKIF_SECTOR_SIZE);
    if (report(k, "ringpage", &q))
        return -1;
    q = mkreq(BLKIF_OP_WRITE, 0);
    seg(&q, BLKIF_DATA_OFFSET - BLKIF_SECTOR_SIZE, BLKIF_SECTOR_SIZE);
    if (report(k, "ringpage-write", &q))
        return -1;
    q = mkreq(BLKIF_OP_READ, 0);
    seg(&q, window, BLKIF_SECTOR_SIZE);
    if (report(k, "beyond", &q))
        return -1;
    q = mkreq(BLKIF_OP_WRITE, 0);
    seg(&q, window, BLKIF_SECTOR_SIZE);
    if (report(k, "beyond-write", &q))
        return -1;
    q = mkreq(BLKIF_OP_READ, 0);
    seg(&q, window - BLKIF_SECTOR_SIZE, 2 * BLKIF_SECTOR_SIZE);
    if (report(k, "straddle", &q))
        return -1;
    q = mkreq(BLKIF_OP_READ, 0);
    seg(&q, 0xFFFFFE00u, 0x400);
    if (report(k, "wrap", &q))
        return -1;
    q = mkreq(BLKIF_OP_READ, 0);
    seg(&q, mine + 100, BLKIF_SECTOR_SIZE);
    if (report(k, "unaligned", &q))
        return -1;
    q = mkreq(BLKIF_OP_READ, 0);
    seg(&q, mine, 0);
    if (report(k, "zerolen", &q))
        return -1;
    q = mkreq(BLKIF_OP_READ, 0);
    seg(&q, mine, 100);
    if (report(k, "oddlen", &q))
        return -1;
    q = mkreq(BLKIF_OP_READ, 0);
    seg(&q, mine, BLKIF_SECTOR_SIZE);
    seg(&q, window, BLKIF_SECTOR_SIZE); /* the second of two */
    return report(k, "second", &q);
}

static int badreq_toomany(void)
{
    const char *k = "toomany";
    struct blkif_request q;
    q = mkreq(BLKIF_OP_READ, 0);
    for (int i = 0; i < BLKIF_MAX_SEGMENTS; i++)
        seg(&q, BLKIF_DATA_OFFSET + (u64)i * BLKIF_SECTOR_SIZE, BLKIF_SECTOR_SIZE);
    q.nr_segments = BLKIF_MAX_SEGMENTS + 1;
    if (report(k, "nsegs9", &q))
        return -1;
    q.nr_segments = 255;
    if (report(k, "nsegs255", &q))
        return -1;
    q = mkreq(BLKIF_OP_READ, 0);
    if (report(k, "nsegs0", &q))
        return -1;
    /* every segment valid, their total above MAX_REQUEST_BYTES */
    q = mkreq(BLKIF_OP_READ, 0);
    u64 each = 2 * BLKIF_MAX_REQUEST_BYTES / BLKIF_MAX_SEGMENTS;
    for (int i = 0; i < BLKIF_MAX_SEGMENTS; i++)
        seg(&q, BLKIF_DATA_OFFSET + (u64)i * each, each);
    if (report(k, "bytes", &q))
        return -1;
    q = mkreq(BLKIF_OP_FLUSH, 0);
    seg(&q, BLKIF_DATA_OFFSET, BLKIF_SECTOR_SIZE);
    if (report(k, "flush-segs", &q))
        return -1;
    q = mkreq(BLKIF_OP_DISCARD, 0);
    q.nr_sectors = 1;
    seg(&q, BLKIF_DATA_OFFSET, BLKIF_SECTOR_SIZE);
    return report(k, "discard-segs", &q);
}

static int badreq_sector(void)
{
    const char *k = "sector";
    u64 n = bf.sectors;
    struct blkif_request q;
    q = mkreq(BLKIF_OP_READ, n);
    seg(&q, BLKIF_DATA_OFFSET, BLKIF_SECTOR_SIZE);
    if (report(k, "end", &q))
        return -1;
    q = mkreq(BLKIF_OP_WRITE, n);
    seg(&q, BLKIF_DATA_OFFSET, BLKIF_SECTOR_SIZE);
    if (report(k, "end-write", &q))
        return -1;
    q = mkreq(BLKIF_OP_READ, n ? n - 1 : 0);
    seg(&q, BLKIF_DATA_OFFSET, 2 * BLKIF_SECTOR_SIZE);
    if (report(k, "straddle", &q))
        return -1;
    q = mkreq(BLKIF_OP_DISCARD, n ? n - 1 : 0);
    q.nr_sectors = 2;
    if (report(k, "discard-straddle", &q))
        return -1;
    q = mkreq(BLKIF_OP_DISCARD, 0);
    q.nr_sectors = 0;
    return report(k, "discard-zero", &q);
}

static int badreq_op(void)
{
    static const u8 ops[] = {2, 4, 6, 255};
    for (u64 i = 0; i < sizeof ops; i++) {
        char name[8];
        snprintf(name, sizeof name, "op%u", (unsigned)ops[i]);
        struct blkif_request q = mkreq(ops[i], 0);
        seg(&q, BLKIF_DATA_OFFSET, BLKIF_SECTOR_SIZE);
        if (report("op", name, &q))
            return -1;
    }
    return 0;
}

static int badreq_sectorwrap(void)
{
    const char *k = "sectorwrap";
    struct blkif_request q;
    q = mkreq(BLKIF_OP_READ, ~(u64)0);
    seg(&q, BLKIF_DATA_OFFSET, 2 * BLKIF_SECTOR_SIZE);
    if (report(k, "read", &q))
        return -1;
    q = mkreq(BLKIF_OP_WRITE, ~(u64)0 - 7);
    seg(&q, BLKIF_DATA_OFFSET, 16 * BLKIF_SECTOR_SIZE);
    if (report(k, "write", &q))
        return -1;
    q = mkreq(BLKIF_OP_DISCARD, ~(u64)0);
    q.nr_sectors = 0xFFFFFFFFu;
    if (report(k, "discard", &q))
        return -1;
    q = mkreq(BLKIF_OP_READ, 1ULL << 63);
    seg(&q, BLKIF_DATA_OFFSET, BLKIF_SECTOR_SIZE);
    if (report(k, "huge", &q))
        return -1;
    q = mkreq(BLKIF_OP_READ, ~(u64)0 / BLKIF_SECTOR_SIZE + 1); /* sector * 512 wraps */
    seg(&q, BLKIF_DATA_OFFSET, BLKIF_SECTOR_SIZE);
    return report(k, "byte-wrap", &q);
}

static void action_badreq(void)
{
    char kbuf[16];
    const char *kind = param_str("kind", "all", kbuf, sizeof kbuf);
    int all = strcmp(kind, "all") == 0, any = 0;
    static const struct {
        const char *name;
        int (*fn)(void);
    } kinds[] = {{"segout", badreq_segout},
                 {"toomany", badreq_toomany},
                 {"sector", badreq_sector},
                 {"op", badreq_op},
                 {"sectorwrap", badreq_sectorwrap}};
    for (u64 i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
        if (all || strcmp(kind, kinds[i].name) == 0) {
            any = 1;
            if (kinds[i].fn() < 0)
                return;
        }
    }
    if (!any)
        usage("kind must be segout, toomany, sector, op, sectorwrap or all");
}

/* --- the other actions ---------------------------------------------------------------- */

static void action_ringjump(void)
{
    u64 wait_ms = param_u64("wait", 2000);
    u64 bogus = bf.req_pushed + 0x10000;
    __atomic_store_n(&bf.sring->req_prod, bogus, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    /* printed before the kick: the crash it provokes may come at once */
    printf("blkprobe: ringjump sent\n");
    long r = blkfront_kick(&bf);
    if (r < 0)
        printf("blkprobe: ringjump kick failed (%ld)\n", r);
    u64 deadline = time_ns() + wait_ms * 1000000ULL;
    for (u64 now = time_ns(); now < deadline; now = time_ns())
        evtchn_wait(bf.port_bit, deadline - now);
    printf("blkprobe: ringjump survived\n");
}

static void action_secret(u64 sector)
{
    /* a 512-aligned guest address at or above the region's size: an offset
     * there names nothing in the region */
    u64 want = (bf.dev.region_size + 0xFFF) & ~(u64)0xFFF;
    u8 *probe = heap_alloc(0, 4096);
    if (probe && (u64)(uintptr_t)probe < want && !heap_alloc(want - (u64)(uintptr_t)probe, 1))
        probe = NULL;
    u8 *secret = probe ? heap_alloc(BLKIF_SECTOR_SIZE, BLKIF_SECTOR_SIZE) : NULL;
    if (!secret || (u64)(uintptr_t)secret > 0xFFFFFFFFu - BLKIF_SECTOR_SIZE)
        crashf("blkprobe: secret needs guest RAM at 0x%lx (above the %lu-byte region), but only"
               " %lu bytes of heap are free: give the domain at least %lu MiB",
               (unsigned long)want, (unsigned long)bf.dev.region_size,
               (unsigned long)heap_free_bytes(), (unsigned long)((want >> 20) + 2));
    for (u64 i = 0; i < BLKIF_SECTOR_SIZE; i += SECRET_BYTES)
        memcpy(secret + i, SECRET, SECRET_BYTES);
    u64 off = (u64)(uintptr_t)secret;
    struct blkif_request q = mkreq(BLKIF_OP_WRITE, sector);
    seg(&q, off, BLKIF_SECTOR_SIZE);
    int st = submit_raw(&q);
    printf("blkprobe: secret status=%d offset=0x%lx sector=%lu\n", st, (unsigned long)off,
           (unsigned long)sector);
}

int main(void)
{
    char dbuf[DE_NAME_MAX], abuf[16];
    const char *disk = param_str("disk", NULL, dbuf, sizeof dbuf);
    const char *action = param_str("action", "info", abuf, sizeof abuf);
    u64 sector = param_u64("sector", 0);
    u64 count = param_u64("count", 1);
    u64 byte = param_u64("byte", 0xAB);
    u64 timeout_ms = param_u64("timeout", 10000);
    if (byte > 0xFF)
        usage("byte must be 0..0xff");

    int r = blkfront_open(&bf, disk);
    if (r < 0) {
        printf("blkprobe: cannot open disk %s (error %d)\n", disk ? disk : "(first)", r);
        exit(2);
    }
    bf.io_timeout_ns = timeout_ms ? timeout_ms * 1000000ULL : POLL_FOREVER;

    if (strcmp(action, "info") == 0) {
        printf("blkprobe: sectors=%lu sector_size=%lu ro=%d flush=%d discard=%d\n",
               (unsigned long)bf.sectors, (unsigned long)bf.sector_size, bf.read_only,
               bf.feature_flush, bf.feature_discard);
    } else if (strcmp(action, "write") == 0) {
        u8 *buf = alloc_sectors(count);
        memset(buf, (int)byte, count * BLKIF_SECTOR_SIZE);
        printf("blkprobe: write status=%d\n", rw_chunked(BLKIF_OP_WRITE, sector, buf, count));
    } else if (strcmp(action, "read") == 0) {
        u8 *buf = alloc_sectors(count);
        u64 n = count * BLKIF_SECTOR_SIZE;
        memset(buf, 0, n);
        int st = rw_chunked(BLKIF_OP_READ, sector, buf, count);
        printf("blkprobe: read status=%d sum=0x%08x\n", st, fnv1a32(buf, n));
        printf("blkprobe: read head=");
        for (u64 i = 0; i < 16 && i < n; i++)
            printf("%02x", buf[i]);
        printf("\n");
    } else if (strcmp(action, "flush") == 0) {
        printf("blkprobe: flush status=%d\n", blkfront_rw(&bf, BLKIF_OP_FLUSH, 0, NULL, 0));
    } else if (strcmp(action, "discard") == 0) {
        if (count == 0 || count > 0xFFFFFFFFu)
            usage("count must be 1..2^32-1 sectors");
        printf("blkprobe: discard status=%d\n",
               blkfront_rw(&bf, BLKIF_OP_DISCARD, sector, NULL, count * BLKIF_SECTOR_SIZE));
    } else if (strcmp(action, "badreq") == 0) {
        action_badreq();
    } else if (strcmp(action, "ringjump") == 0) {
        action_ringjump();
    } else if (strcmp(action, "secret") == 0) {
        action_secret(sector);
    } else {
        usage("action must be info, write, read, flush, discard, badreq, ringjump or secret");
    }
    printf("blkprobe: done\n");
    return 0;
}
