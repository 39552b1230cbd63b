/* isovisor guest runtime: the block-device frontend (see blkfront.h).
 *
 * Ring discipline (ipc/ring.py, Xen io/ring.h): request slots are written
 * before the release-store of req_prod that publishes them; after publishing,
 * a full fence, then req_event decides whether to kick.  A consumer that finds
 * nothing sets rsp_event = rsp_cons + 1, fences, and looks again before it
 * sleeps.  Everything in the region is shared with the (untrusted) backend:
 * indices are read once into locals, responses are copied out of their slot
 * before they are checked, and the frontend's own view (req_pushed, rsp_cons,
 * tags) is never taken from shared memory.
 *
 * Finding the disk, the store handshake and the fault / hold / kick hypercalls
 * are devfront.c's, shared with the other frontends.
 */
#include "blkfront.h"
#include "devfront.h"

_Static_assert(sizeof(struct blkif_request) == BLKIF_REQUEST_BYTES, "request size");
_Static_assert(__builtin_offsetof(struct blkif_request, op) == BLKIF_REQ_OP, "op");
_Static_assert(__builtin_offsetof(struct blkif_request, nr_segments) == BLKIF_REQ_NR_SEGMENTS,
               "nr_segments");
_Static_assert(__builtin_offsetof(struct blkif_request, nr_sectors) == BLKIF_REQ_NR_SECTORS,
               "nr_sectors");
_Static_assert(__builtin_offsetof(struct blkif_request, sector) == BLKIF_REQ_SECTOR, "sector");
_Static_assert(__builtin_offsetof(struct blkif_request, seg) == BLKIF_REQ_SEGMENTS, "segments");
_Static_assert(sizeof(struct blkif_segment) == BLKIF_SEGMENT_SIZE, "segment size");
_Static_assert(sizeof(struct blkif_response) == BLKIF_RESPONSE_BYTES, "response size");
_Static_assert(__builtin_offsetof(struct blkif_response, op) == BLKIF_RSP_OP, "rsp op");
_Static_assert(__builtin_offsetof(struct blkif_response, status) == BLKIF_RSP_STATUS,
               "rsp status");
_Static_assert(sizeof(struct blkif_sring_header) == BLKFRONT_RING_HEADER, "ring header");
_Static_assert(BLKFRONT_RING_HEADER + BLKIF_RING_SLOTS * BLKIF_SLOT_SIZE <= BLKIF_DATA_OFFSET,
               "ring fits below the data area");
_Static_assert((BLKIF_RING_SLOTS & (BLKIF_RING_SLOTS - 1)) == 0, "ring size power of two");
_Static_assert(BLKIF_RING_SLOTS <= (1 << BLKFRONT_TAG_BITS), "tags fit the id's low bits");
_Static_assert(BLKIF_SLOT_SIZE % 8 == 0 && BLKIF_REQUEST_BYTES % 8 == 0, "slot words");

#define TAG_MASK (((u64)1 << BLKFRONT_TAG_BITS) - 1)
#define BARRIER() __asm__ volatile("" ::: "memory")

static const struct devfront_class blk_class = {
    .who = "blkfront", .what = "block device", .dir = "vbd", .kind = DEV_KIND_VBD};

const char *blkfront_op_name(u8 op, char *buf, u64 buflen)
{
    switch (op) {
    case BLKIF_OP_READ: return "read";
    case BLKIF_OP_WRITE: return "write";
    case BLKIF_OP_FLUSH: return "flush";
    case BLKIF_OP_DISCARD: return "discard";
    default:
        if (!buf || !buflen)
            return "unknown";
        snprintf(buf, buflen, "op%u", (unsigned)op);
        return buf;
    }
}

static volatile u64 *slot_words(struct blkfront *bf, u64 index)
{
    return (volatile u64 *)(bf->slots + (index & (BLKIF_RING_SLOTS - 1)) * BLKIF_SLOT_SIZE);
}

/* --- faults ------------------------------------------------------------------ */

static int report(struct blkfront *bf, u64 code, int may_hold, const char *fmt, va_list ap)
{
    char msg[400];
    vsnprintf(msg, sizeof msg, fmt, ap);
    long r = devfront_fault(&blk_class, &bf->dev, code, bf->rsp_cons, may_hold ? FAULT_F_HOLD : 0,
                            msg);
    if (may_hold && r == 1) {
        bf->held = 1;
        bf->holds++;
        printf("blkfront: %s: holding from response %lu until a new driver instance redoes "
               "the requests\n", bf->dev.name, (unsigned long)bf->rsp_cons);
        return 0;
    }
    bf->failed = (int)code;
    return BLKFRONT_E_FAILED;
}

static int fault(struct blkfront *bf, u64 code, const char *fmt, ...) PRINTF_LIKE(3, 4);
static int bad_response(struct blkfront *bf, u64 code, const char *fmt, ...) PRINTF_LIKE(3, 4);

/* Report a backend fault (HC_DEVICE_FAULT), print it, fail the frontend. */
static int fault(struct blkfront *bf, u64 code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = report(bf, code, 0, fmt, ap);
    va_end(ap);
    return r;
}

/* A bad response at rsp_cons: report it; hold (0) if the kernel will have the requests from
 * rsp_cons on redone by a new driver instance, else fail (BLKFRONT_E_FAILED). */
static int bad_response(struct blkfront *bf, u64 code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = report(bf, code, 1, fmt, ap);
    va_end(ap);
    return r;
}

/* While held: has the kernel taken the bad responses back? 1 still held, 0 resumed, <0 the
 * frontend failed. */
static int still_held(struct blkfront *bf)
{
    long r = devfront_held(&blk_class, &bf->dev);
    if (r < 0) {
        bf->failed = -1;
        return BLKFRONT_E_FAILED;
    }
    if (r)
        return 1;
    bf->held = 0;
    printf("blkfront: %s: resumed at response %lu\n", bf->dev.name, (unsigned long)bf->rsp_cons);
    return 0;
}

/* --- handshake ----------------------------------------------------------------- */

/* Read an optional 0/1-style parameter: value, or dflt if absent; <0 on error. */
static long read_param(struct blkfront *bf, const char *node, u64 *out, int required)
{
    long r = store_read_u64_at(bf->backend, node, out);
    if (r == -ENOENT && !required) {
        *out = 0;
        return 0;
    }
    if (r < 0) {
        if (r == -ENOENT || r == -EINVAL || r == -ERANGE)
            return fault(bf, FAULT_HANDSHAKE, "backend %s: %s/%s is %s", bf->backend,
                         bf->backend, node, r == -ENOENT ? "missing" : "not a number");
        printf("blkfront: %s: cannot read %s/%s: error %ld\n", bf->dev.name, bf->backend, node, r);
    }
    return r;
}

static void init_ring(struct blkfront *bf)
{
    volatile u64 *w = (volatile u64 *)(bf->region + BLKIF_RING_OFFSET);
    for (u64 i = 0; i < BLKIF_DATA_OFFSET / 8; i++)
        w[i] = 0;
    BARRIER();
    bf->sring->req_prod = 0;
    bf->sring->rsp_prod = 0;
    bf->sring->req_event = 1;
    bf->sring->rsp_event = 1;
    BARRIER();
    bf->req_prod_pvt = bf->req_pushed = bf->rsp_cons = 0;
    bf->next_seq = 1;
}

int blkfront_open(struct blkfront *bf, const char *vdev)
{
    return blkfront_open_timeout(bf, vdev, BLKFRONT_HANDSHAKE_TIMEOUT_NS);
}

int blkfront_open_timeout(struct blkfront *bf, const char *vdev, u64 timeout_ns)
{
    memset(bf, 0, sizeof *bf);
    bf->io_timeout_ns = POLL_FOREVER;
    bf->failed = -1; /* until connected */
    struct devfront df = DEVFRONT_INIT(&blk_class, bf);
    int rc = devfront_find(&df, vdev);
    if (rc < 0)
        return rc;
    const char *name = bf->dev.name;
    if (!bf->dev.region || bf->dev.region_size < BLKIF_DATA_OFFSET + BLKIF_MAX_REQUEST_BYTES) {
        printf("blkfront: %s: region %p of %lu bytes cannot hold the ring and one buffer\n",
               name, bf->dev.region, (unsigned long)bf->dev.region_size);
        return -EINVAL;
    }
    bf->region = bf->dev.region;
    bf->sring = (volatile struct blkif_sring_header *)(bf->region + BLKIF_RING_OFFSET);
    bf->slots = bf->region + BLKIF_RING_OFFSET + BLKFRONT_RING_HEADER;
    bf->ntags = (bf->dev.region_size - BLKIF_DATA_OFFSET) / BLKIF_MAX_REQUEST_BYTES;
    if (bf->ntags > BLKIF_RING_SLOTS)
        bf->ntags = BLKIF_RING_SLOTS;
    bf->port_bit = (u64)1 << bf->dev.port;

    /* 1. upcalls, the deadline, the backend directory */
    rc = devfront_start(&df, timeout_ns);
    bf->upcalls_base = df.upcalls_base;
    if (rc < 0)
        return rc;

    /* 2. wait for the backend to publish the disk (InitWait), or be Connected */
    rc = devfront_wait_backend(&df, DEVFRONT_ST_INIT_WAIT, DEVFRONT_ST_CONNECTED);
    if (rc < 0)
        return rc;

    /* 3. the disk parameters */
    long r;
    u64 sectors, ssize, info, flush, discard;
    if ((r = read_param(bf, "sectors", &sectors, 1)) < 0 ||
        (r = read_param(bf, "sector-size", &ssize, 1)) < 0 ||
        (r = read_param(bf, "info", &info, 0)) < 0 ||
        (r = read_param(bf, "feature-flush-cache", &flush, 0)) < 0 ||
        (r = read_param(bf, "feature-discard", &discard, 0)) < 0)
        return (int)r;
    if (ssize == 0 || ssize % BLKIF_SECTOR_SIZE)
        return fault(bf, FAULT_HANDSHAKE, "backend %s: sector-size %lu is not a multiple of %d",
                     bf->backend, (unsigned long)ssize, BLKIF_SECTOR_SIZE);
    if (sectors > (~(u64)0) / BLKIF_SECTOR_SIZE)
        return fault(bf, FAULT_HANDSHAKE, "backend %s: sectors %lu is impossibly large",
                     bf->backend, (unsigned long)sectors);
    bf->sectors = sectors;
    bf->sector_size = ssize;
    bf->read_only = (int)(info & 1);
    char mode[8];
    r = store_read_at(bf->backend, "mode", mode, sizeof mode);
    if (r == 1 && mode[0] == 'r')
        bf->read_only = 1;
    bf->feature_flush = flush != 0;
    bf->feature_discard = discard != 0;

    /* ring: req_prod = rsp_prod = 0, req_event = rsp_event = 1 */
    init_ring(bf);

    /* 4. Initialised; the backend attaches its ring and goes Connected; 5. Connected */
    rc = devfront_connect(&df);
    if (rc < 0)
        return rc;
    bf->failed = 0;
    bf->connected = 1;
    return 0;
}

/* --- requests ------------------------------------------------------------------- */

u64 blkfront_outstanding(const struct blkfront *bf) { return bf->req_prod_pvt - bf->rsp_cons; }

u64 blkfront_disk_bytes(const struct blkfront *bf) { return bf->sectors * BLKIF_SECTOR_SIZE; }

int blkfront_get_tag(struct blkfront *bf)
{
    if (bf->failed)
        return -1;
    for (u64 t = 0; t < bf->ntags; t++) {
        if (bf->tags[t].in_use == BLKFRONT_TAG_FREE) {
            bf->tags[t].in_use = BLKFRONT_TAG_RESERVED;
            return (int)t;
        }
    }
    return -1;
}

void blkfront_put_tag(struct blkfront *bf, int tag)
{
    if (tag >= 0 && (u64)tag < bf->ntags && bf->tags[tag].in_use == BLKFRONT_TAG_RESERVED)
        bf->tags[tag].in_use = BLKFRONT_TAG_FREE;
}

u32 blkfront_tag_offset(struct blkfront *bf, int tag)
{
    (void)bf;
    return (u32)(BLKIF_DATA_OFFSET + (u64)tag * BLKIF_MAX_REQUEST_BYTES);
}

void *blkfront_tag_buf(struct blkfront *bf, int tag)
{
    return bf->region + blkfront_tag_offset(bf, tag);
}

/* Claim the next slot for a reserved tag: the slot's ring index, and sets the id. */
static u64 claim_slot(struct blkfront *bf, int tag, struct blkif_request *req)
{
    struct blkfront_tag *t = &bf->tags[tag];
    u64 index = bf->req_prod_pvt;
    req->id = (bf->next_seq++ << BLKFRONT_TAG_BITS) | (u64)tag;
    /* slots are written with whole-word stores, in order, before req_prod */
    u64 src[BLKIF_REQUEST_BYTES / 8];
    memcpy(src, req, sizeof src);
    volatile u64 *dst = slot_words(bf, index);
    for (u64 i = 0; i < BLKIF_REQUEST_BYTES / 8; i++)
        dst[i] = src[i];
    for (u64 i = BLKIF_REQUEST_BYTES / 8; i < BLKIF_SLOT_SIZE / 8; i++)
        dst[i] = 0;
    t->in_use = BLKFRONT_TAG_QUEUED;
    t->op = req->op;
    t->id = req->id;
    t->sector = req->sector;
    t->ring_idx = index;
    bf->req_prod_pvt = index + 1;
    return index;
}

static int tag_reserved(struct blkfront *bf, int tag)
{
    return tag >= 0 && (u64)tag < bf->ntags && bf->tags[tag].in_use == BLKFRONT_TAG_RESERVED;
}

void blkfront_queue(struct blkfront *bf, int tag, u8 op, u64 sector, u64 nbytes)
{
    char opbuf[8];
    if (bf->failed)
        return;
    if (!tag_reserved(bf, tag))
        crashf("blkfront_queue(%s): tag %d is not reserved (get it with blkfront_get_tag)",
               bf->dev.name, tag);
    if (blkfront_outstanding(bf) >= BLKIF_RING_SLOTS)
        crashf("blkfront_queue(%s): the ring is full", bf->dev.name);
    struct blkif_request req;
    memset(&req, 0, sizeof req);
    req.op = op;
    req.sector = sector;
    switch (op) {
    case BLKIF_OP_READ:
    case BLKIF_OP_WRITE:
        if (nbytes == 0 || nbytes % BLKIF_SECTOR_SIZE || nbytes > BLKIF_MAX_REQUEST_BYTES)
            crashf("blkfront_queue(%s): %s of %lu bytes: want a non-zero multiple of %d up to %d",
                   bf->dev.name, blkfront_op_name(op, opbuf, sizeof opbuf),
                   (unsigned long)nbytes, BLKIF_SECTOR_SIZE, BLKIF_MAX_REQUEST_BYTES);
        req.nr_segments = 1;
        req.seg[0].offset = blkfront_tag_offset(bf, tag);
        req.seg[0].length = (u32)nbytes;
        break;
    case BLKIF_OP_FLUSH:
        nbytes = 0;
        break;
    case BLKIF_OP_DISCARD:
        if (nbytes == 0 || nbytes % BLKIF_SECTOR_SIZE ||
            nbytes / BLKIF_SECTOR_SIZE > 0xFFFFFFFFull)
            crashf("blkfront_queue(%s): discard of %lu bytes: want a non-zero multiple of %d"
                   " below 2^32 sectors",
                   bf->dev.name, (unsigned long)nbytes, BLKIF_SECTOR_SIZE);
        req.nr_sectors = (u32)(nbytes / BLKIF_SECTOR_SIZE);
        break;
    default:
        crashf("blkfront_queue(%s): unknown op %u (use blkfront_queue_raw for malformed"
               " requests)",
               bf->dev.name, (unsigned)op);
    }
    claim_slot(bf, tag, &req);
    bf->tags[tag].nbytes = (u32)(op == BLKIF_OP_DISCARD ? 0 : nbytes);
}

int blkfront_queue_raw(struct blkfront *bf, int tag, const struct blkif_request *req)
{
    if (bf->failed)
        return BLKFRONT_E_FAILED;
    if (!tag_reserved(bf, tag) || blkfront_outstanding(bf) >= BLKIF_RING_SLOTS)
        return BLKFRONT_E_INVAL;
    struct blkif_request copy = *req;
    claim_slot(bf, tag, &copy);
    bf->tags[tag].nbytes = 0;
    return 0;
}

long blkfront_kick(struct blkfront *bf)
{
    bf->kicks++;
    return evtchn_send(bf->dev.port);
}

void blkfront_push(struct blkfront *bf)
{
    if (bf->failed)
        return;
    u64 old = bf->req_pushed, new = bf->req_prod_pvt;
    if (old == new)
        return;
    for (u64 t = 0; t < bf->ntags; t++)
        if (bf->tags[t].in_use == BLKFRONT_TAG_QUEUED)
            bf->tags[t].in_use = BLKFRONT_TAG_INFLIGHT;
    /* the slot stores above are ordered before this one (x86 TSO; release
     * keeps the compiler from sinking them) */
    __atomic_store_n(&bf->sring->req_prod, new, __ATOMIC_RELEASE);
    bf->req_pushed = new;
    bf->submitted += new - old;
    /* publish req_prod before reading req_event (Xen: mb()) */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    u64 event = __atomic_load_n(&bf->sring->req_event, __ATOMIC_ACQUIRE);
    if (new - event < new - old) {
        bf->kicks++;
        devfront_notify(&blk_class, &bf->dev);
    }
}

static int status_ok(i16 s)
{
    return s == BLKIF_STATUS_OKAY || s == BLKIF_STATUS_ERROR || s == BLKIF_STATUS_EOPNOTSUPP;
}

/* In blkfront_poll's loop: report a bad response; if held, return what was delivered. */
#define BAD_RESPONSE(...)                                                                        \
    do {                                                                                         \
        int r_ = bad_response(bf, __VA_ARGS__);                                                  \
        return r_ < 0 ? r_ : n;                                                                  \
    } while (0)

int blkfront_poll(struct blkfront *bf, blkfront_done_fn done, void *ctx)
{
    if (bf->failed)
        return BLKFRONT_E_FAILED;
    bf->upcalls = evtchn_upcalls(bf->dev.port) - bf->upcalls_base;
    if (bf->held) {
        int h = still_held(bf);
        if (h)
            return h < 0 ? h : 0;
    }
    u64 prod = __atomic_load_n(&bf->sring->rsp_prod, __ATOMIC_ACQUIRE);
    u64 avail = prod - bf->rsp_cons;
    u64 outstanding = bf->req_pushed - bf->rsp_cons;
    if (avail > outstanding)
        return bad_response(bf, FAULT_EXTRA_RESPONSE,
                     "rsp_prod=%lu claims %lu responses after rsp_cons=%lu, but only %lu "
                     "requests are outstanding (req_prod=%lu)",
                     (unsigned long)prod, (unsigned long)avail, (unsigned long)bf->rsp_cons,
                     (unsigned long)outstanding, (unsigned long)bf->req_pushed);
    int n = 0;
    while (bf->rsp_cons != prod) {
        u64 index = bf->rsp_cons;
        volatile u64 *w = slot_words(bf, index);
        u64 words[2] = {w[0], w[1]}; /* copy once; the backend may rewrite the slot */
        struct blkif_response rsp;
        memcpy(&rsp, words, sizeof rsp);
        u64 tag = rsp.id & TAG_MASK;
        struct blkfront_tag *t = tag < bf->ntags ? &bf->tags[tag] : NULL;
        if (!t || t->in_use != BLKFRONT_TAG_INFLIGHT || t->id != rsp.id)
            BAD_RESPONSE(FAULT_UNKNOWN_ID,
                         "response %lu has id 0x%lx (tag %lu, seq %lu), which matches no "
                         "request in flight%s",
                         (unsigned long)index, (unsigned long)rsp.id, (unsigned long)tag,
                         (unsigned long)(rsp.id >> BLKFRONT_TAG_BITS),
                         t && t->in_use == BLKFRONT_TAG_INFLIGHT ? " (a stale or duplicate id)"
                                                                  : "");
        if (rsp.op != t->op) {
            char a[8], b[8];
            BAD_RESPONSE(FAULT_BAD_OP,
                         "response %lu (id 0x%lx) has op %u (%s) but its request was op %u (%s)",
                         (unsigned long)index, (unsigned long)rsp.id, (unsigned)rsp.op,
                         blkfront_op_name(rsp.op, a, sizeof a), (unsigned)t->op,
                         blkfront_op_name(t->op, b, sizeof b));
        }
        if (rsp.reserved || rsp.reserved2)
            BAD_RESPONSE(FAULT_BAD_RESPONSE,
                         "response %lu (id 0x%lx) has non-zero reserved fields (0x%x, 0x%x): "
                         "the slot may still hold the request",
                         (unsigned long)index, (unsigned long)rsp.id, (unsigned)rsp.reserved,
                         (unsigned)rsp.reserved2);
        if (!status_ok(rsp.status))
            BAD_RESPONSE(FAULT_BAD_STATUS,
                         "response %lu (id 0x%lx) has status %d: want 0 (okay), -1 (error) or "
                         "-2 (not supported)",
                         (unsigned long)index, (unsigned long)rsp.id, (int)rsp.status);
        bf->rsp_cons = index + 1;
        bf->completed++;
        n++;
        if (done)
            done(ctx, (int)tag, rsp.status);
        t->in_use = BLKFRONT_TAG_FREE;
    }
    return n;
}

int blkfront_wait(struct blkfront *bf)
{
    if (bf->failed)
        return BLKFRONT_E_FAILED;
    if (bf->held) { /* the kernel sends an event when it takes the bad responses back */
        bf->waits++;
        u64 got = evtchn_wait(bf->port_bit, bf->io_timeout_ns);
        if (!got && bf->held && still_held(bf) > 0) {
            printf("blkfront: %s: no new driver instance took over within the I/O timeout\n",
                   bf->dev.name);
            return BLKFRONT_E_TIMEOUT;
        }
        return 0;
    }
    if (__atomic_load_n(&bf->sring->rsp_prod, __ATOMIC_ACQUIRE) != bf->rsp_cons)
        return 0;
    if (bf->req_pushed == bf->rsp_cons)
        return BLKFRONT_E_INVAL;
    /* RING_FINAL_CHECK_FOR_RESPONSES */
    __atomic_store_n(&bf->sring->rsp_event, bf->rsp_cons + 1, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&bf->sring->rsp_prod, __ATOMIC_ACQUIRE) != bf->rsp_cons)
        return 0;
    bf->waits++;
    u64 got = evtchn_wait(bf->port_bit, bf->io_timeout_ns);
    bf->upcalls = evtchn_upcalls(bf->dev.port) - bf->upcalls_base;
    if (!got && __atomic_load_n(&bf->sring->rsp_prod, __ATOMIC_ACQUIRE) == bf->rsp_cons)
        return BLKFRONT_E_TIMEOUT;
    return 0;
}

/* --- synchronous helper ------------------------------------------------------------ */

struct rw_wait {
    int tag;
    int done;
    int status;
};

static void rw_done(void *ctx, int tag, int status)
{
    struct rw_wait *w = ctx;
    if (tag == w->tag) {
        w->done = 1;
        w->status = status;
    }
}

int blkfront_rw(struct blkfront *bf, u8 op, u64 sector, void *buf, u64 nbytes)
{
    if (bf->failed)
        return BLKFRONT_E_FAILED;
    if (blkfront_outstanding(bf))
        return BLKFRONT_E_BUSY;
    switch (op) {
    case BLKIF_OP_READ:
    case BLKIF_OP_WRITE:
        if (!buf || nbytes == 0 || nbytes % BLKIF_SECTOR_SIZE || nbytes > BLKIF_MAX_REQUEST_BYTES)
            return BLKFRONT_E_INVAL;
        break;
    case BLKIF_OP_FLUSH:
        break;
    case BLKIF_OP_DISCARD:
        if (nbytes == 0 || nbytes % BLKIF_SECTOR_SIZE ||
            nbytes / BLKIF_SECTOR_SIZE > 0xFFFFFFFFull)
            return BLKFRONT_E_INVAL;
        break;
    default:
        return BLKFRONT_E_INVAL;
    }
    int tag = blkfront_get_tag(bf);
    if (tag < 0)
        return BLKFRONT_E_BUSY;
    if (op == BLKIF_OP_WRITE)
        memcpy(blkfront_tag_buf(bf, tag), buf, nbytes);
    blkfront_queue(bf, tag, op, sector, nbytes);
    blkfront_push(bf);
    struct rw_wait w = {tag, 0, 0};
    for (;;) {
        int r = blkfront_poll(bf, rw_done, &w);
        if (r < 0)
            return r;
        if (w.done)
            break;
        r = blkfront_wait(bf);
        if (r < 0)
            return r;
    }
    if (op == BLKIF_OP_READ && w.status == BLKIF_STATUS_OKAY)
        memcpy(buf, blkfront_tag_buf(bf, tag), nbytes);
    return w.status;
}
