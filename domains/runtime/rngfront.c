/* isovisor guest runtime: the entropy-device frontend (see rngfront.h).
 *
 * The ring discipline is blkfront's (ipc/ring.py, Xen io/ring.h): request
 * slots are written before the release-store of req_prod that publishes them;
 * after publishing, a full fence, then req_event decides whether to kick.  A
 * consumer that finds nothing sets rsp_event = rsp_cons + 1, fences, and looks
 * again before it sleeps.  Everything in the region is shared with the
 * (untrusted) backend: indices are read once into locals, responses are copied
 * out of their slot before they are checked, the bytes are copied out of the
 * data area only after that, and the frontend's own view (req_pushed,
 * rsp_cons, tags) is never taken from shared memory.
 *
 * Finding the device, the store handshake and the fault / hold / kick
 * hypercalls are devfront.c's, shared with the other frontends.
 */
#include "rngfront.h"
#include "devfront.h"

_Static_assert(sizeof(struct rngif_request) <= RNGIF_SLOT_SIZE, "request fits a slot");
_Static_assert(__builtin_offsetof(struct rngif_request, id) == RNGIF_REQ_ID, "id");
_Static_assert(__builtin_offsetof(struct rngif_request, offset) == RNGIF_REQ_OFFSET, "offset");
_Static_assert(__builtin_offsetof(struct rngif_request, length) == RNGIF_REQ_LENGTH, "length");
_Static_assert(sizeof(struct rngif_response) <= RNGIF_SLOT_SIZE, "response fits a slot");
_Static_assert(__builtin_offsetof(struct rngif_response, id) == RNGIF_RSP_ID, "rsp id");
_Static_assert(__builtin_offsetof(struct rngif_response, status) == RNGIF_RSP_STATUS,
               "rsp status");
_Static_assert(__builtin_offsetof(struct rngif_response, length) == RNGIF_RSP_LENGTH,
               "rsp length");
_Static_assert(sizeof(struct rngif_sring_header) == RNGIF_HEADER_BYTES, "ring header");
_Static_assert(RNGIF_HEADER_BYTES + RNGIF_RING_SLOTS * RNGIF_SLOT_SIZE <= RNGIF_DATA_OFFSET,
               "ring fits below the data area");
_Static_assert((RNGIF_RING_SLOTS & (RNGIF_RING_SLOTS - 1)) == 0, "ring size power of two");
_Static_assert(RNGIF_RING_SLOTS <= (1 << RNGFRONT_TAG_BITS), "tags fit the id's low bits");
_Static_assert(RNGIF_SLOT_SIZE % 8 == 0 && sizeof(struct rngif_request) % 8 == 0 &&
                   sizeof(struct rngif_response) % 8 == 0,
               "slot words");

#define TAG_MASK (((u64)1 << RNGFRONT_TAG_BITS) - 1)
#define SLOT_WORDS (RNGIF_SLOT_SIZE / 8)
#define BARRIER() __asm__ volatile("" ::: "memory")

static const struct devfront_class rng_class = {
    .who = "rngfront", .what = "entropy device", .dir = "rng", .kind = RNGIF_DEV_KIND};

static volatile u64 *slot_words(struct rngfront *rf, u64 index)
{
    return (volatile u64 *)(rf->slots + (index & (RNGIF_RING_SLOTS - 1)) * RNGIF_SLOT_SIZE);
}

static u32 tag_offset(u64 tag)
{
    return (u32)(RNGIF_DATA_OFFSET + tag * RNGIF_MAX_REQUEST_BYTES);
}

/* --- faults ------------------------------------------------------------------ */

static int report(struct rngfront *rf, u64 code, int may_hold, const char *fmt, va_list ap)
{
    char msg[400];
    vsnprintf(msg, sizeof msg, fmt, ap);
    long r = devfront_fault(&rng_class, &rf->dev, code, rf->rsp_cons, may_hold ? FAULT_F_HOLD : 0,
                            msg);
    if (may_hold && r == 1) {
        rf->held = 1;
        rf->holds++;
        printf("rngfront: %s: holding from response %lu until a new driver instance redoes "
               "the requests\n", rf->dev.name, (unsigned long)rf->rsp_cons);
        return 0;
    }
    rf->failed = (int)code;
    return RNGFRONT_E_FAILED;
}

static int bad_response(struct rngfront *rf, u64 code, const char *fmt, ...) PRINTF_LIKE(3, 4);

/* A bad response at rsp_cons: report it; hold (0) if the kernel will have the requests from
 * rsp_cons on redone by a new driver instance, else fail (RNGFRONT_E_FAILED). */
static int bad_response(struct rngfront *rf, u64 code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int r = report(rf, code, 1, fmt, ap);
    va_end(ap);
    return r;
}

/* While held: has the kernel taken the bad responses back? 1 still held, 0 resumed, <0 the
 * frontend failed. */
static int still_held(struct rngfront *rf)
{
    long r = devfront_held(&rng_class, &rf->dev);
    if (r < 0) {
        rf->failed = -1;
        return RNGFRONT_E_FAILED;
    }
    if (r)
        return 1;
    rf->held = 0;
    printf("rngfront: %s: resumed at response %lu\n", rf->dev.name, (unsigned long)rf->rsp_cons);
    return 0;
}

/* --- handshake ----------------------------------------------------------------- */

static void init_ring(struct rngfront *rf)
{
    volatile u64 *w = (volatile u64 *)rf->region;
    for (u64 i = 0; i < RNGIF_DATA_OFFSET / 8; i++)
        w[i] = 0;
    BARRIER();
    rf->sring->req_prod = 0;
    rf->sring->rsp_prod = 0;
    rf->sring->req_event = 1;
    rf->sring->rsp_event = 1;
    BARRIER();
    rf->req_prod_pvt = rf->req_pushed = rf->rsp_cons = 0;
    rf->next_seq = 1;
}

int rngfront_open(struct rngfront *rf, const char *vdev, u64 timeout_ns)
{
    memset(rf, 0, sizeof *rf);
    rf->io_timeout_ns = POLL_FOREVER;
    rf->failed = -1; /* until connected */
    struct devfront df = DEVFRONT_INIT(&rng_class, rf);
    int rc = devfront_find(&df, vdev);
    if (rc < 0)
        return rc;
    if (!rf->dev.region ||
        rf->dev.region_size < RNGIF_DATA_OFFSET + RNGIF_MAX_REQUEST_BYTES) {
        printf("rngfront: %s: region %p of %lu bytes cannot hold the ring and one buffer\n",
               rf->dev.name, rf->dev.region, (unsigned long)rf->dev.region_size);
        return -EINVAL;
    }
    rf->region = rf->dev.region;
    rf->sring = (volatile struct rngif_sring_header *)rf->region;
    rf->slots = rf->region + RNGIF_HEADER_BYTES;
    /* one data-area buffer of MAX_REQUEST_BYTES per tag */
    rf->ntags = (rf->dev.region_size - RNGIF_DATA_OFFSET) / RNGIF_MAX_REQUEST_BYTES;
    if (rf->ntags > RNGIF_RING_SLOTS)
        rf->ntags = RNGIF_RING_SLOTS;
    rf->queue_depth = rf->ntags;
    rf->port_bit = (u64)1 << rf->dev.port;

    /* 1. upcalls, the deadline, the backend directory */
    rc = devfront_start(&df, timeout_ns);
    rf->upcalls_base = df.upcalls_base;
    if (rc < 0)
        return rc;

    /* 2. wait for the backend (InitWait, or Connected already): it publishes no
     * parameters, an entropy device has none */
    rc = devfront_wait_backend(&df, DEVFRONT_ST_INIT_WAIT, DEVFRONT_ST_CONNECTED);
    if (rc < 0)
        return rc;

    /* 3. ring: req_prod = rsp_prod = 0, req_event = rsp_event = 1 */
    init_ring(rf);

    /* 4. Initialised; the backend attaches its ring and goes Connected; 5. Connected */
    rc = devfront_connect(&df);
    if (rc < 0)
        return rc;
    rf->failed = 0;
    rf->connected = 1;
    return 0;
}

/* --- requests ------------------------------------------------------------------- */

u64 rngfront_outstanding(const struct rngfront *rf) { return rf->req_prod_pvt - rf->rsp_cons; }

static int get_tag(struct rngfront *rf)
{
    for (u64 t = 0; t < rf->ntags; t++)
        if (!rf->tags[t].in_use)
            return (int)t;
    return -1;
}

/* Put a request for `length` bytes into dest into the next ring slot (published by push). */
static void queue(struct rngfront *rf, int tag, u8 *dest, u32 length)
{
    struct rngfront_tag *t = &rf->tags[tag];
    struct rngif_request req = {
        .id = (rf->next_seq++ << RNGFRONT_TAG_BITS) | (u64)tag,
        .offset = tag_offset((u64)tag),
        .length = length,
    };
    /* slots are written with whole-word stores, in order, before req_prod */
    u64 src[sizeof req / 8];
    memcpy(src, &req, sizeof src);
    volatile u64 *dst = slot_words(rf, rf->req_prod_pvt);
    for (u64 i = 0; i < SLOT_WORDS; i++)
        dst[i] = i < sizeof req / 8 ? src[i] : 0;
    /* in flight from here: rngfront_read always pushes what it queued before it polls */
    t->in_use = 1;
    t->id = req.id;
    t->length = length;
    t->dest = dest;
    rf->req_prod_pvt++;
}

/* Publish the queued requests (RING_PUSH_REQUESTS_AND_CHECK_NOTIFY): kick the backend only
 * if the new req_prod passed its req_event. */
static void push(struct rngfront *rf)
{
    u64 old = rf->req_pushed, new = rf->req_prod_pvt;
    if (old == new)
        return;
    /* the slot stores above are ordered before this one (x86 TSO; release keeps the
     * compiler from sinking them) */
    __atomic_store_n(&rf->sring->req_prod, new, __ATOMIC_RELEASE);
    rf->req_pushed = new;
    rf->submitted += new - old;
    /* publish req_prod before reading req_event (Xen: mb()) */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    u64 event = __atomic_load_n(&rf->sring->req_event, __ATOMIC_ACQUIRE);
    if (new - event < new - old) {
        rf->kicks++;
        devfront_notify(&rng_class, &rf->dev);
    }
}

/* What one rngfront_read is waiting for. */
struct read_state {
    u64 pending; /* its requests in flight */
    u64 errors;  /* its responses with STATUS_ERROR */
};

/* In take_responses' loop: report a bad response; if held, return what was consumed. */
#define BAD_RESPONSE(...)                                                                        \
    do {                                                                                         \
        int r_ = bad_response(rf, __VA_ARGS__);                                                  \
        return r_ < 0 ? r_ : n;                                                                  \
    } while (0)

/* Consume the published responses: how many, 0 while held, or RNGFRONT_E_FAILED. */
static int take_responses(struct rngfront *rf, struct read_state *rd)
{
    if (rf->failed)
        return RNGFRONT_E_FAILED;
    rf->upcalls = evtchn_upcalls(rf->dev.port) - rf->upcalls_base;
    if (rf->held) {
        int h = still_held(rf);
        if (h)
            return h < 0 ? h : 0;
    }
    u64 prod = __atomic_load_n(&rf->sring->rsp_prod, __ATOMIC_ACQUIRE);
    u64 avail = prod - rf->rsp_cons;
    u64 outstanding = rf->req_pushed - rf->rsp_cons;
    if (avail > outstanding)
        return bad_response(rf, FAULT_EXTRA_RESPONSE,
                            "rsp_prod=%lu claims %lu responses after rsp_cons=%lu, but only %lu "
                            "requests are outstanding (req_prod=%lu)",
                            (unsigned long)prod, (unsigned long)avail,
                            (unsigned long)rf->rsp_cons, (unsigned long)outstanding,
                            (unsigned long)rf->req_pushed);
    int n = 0;
    while (rf->rsp_cons != prod) {
        u64 index = rf->rsp_cons;
        volatile u64 *w = slot_words(rf, index);
        u64 words[2] = {w[0], w[1]}; /* copy once; the backend may rewrite the slot */
        struct rngif_response rsp;
        memcpy(&rsp, words, sizeof rsp);
        u64 tag = rsp.id & TAG_MASK;
        struct rngfront_tag *t = tag < rf->ntags ? &rf->tags[tag] : NULL;
        if (!t || !t->in_use || t->id != rsp.id)
            BAD_RESPONSE(FAULT_UNKNOWN_ID,
                         "response %lu has id 0x%lx (tag %lu, seq %lu), which matches no "
                         "request in flight%s",
                         (unsigned long)index, (unsigned long)rsp.id, (unsigned long)tag,
                         (unsigned long)(rsp.id >> RNGFRONT_TAG_BITS),
                         t && t->in_use ? " (a stale or duplicate id)" : "");
        if (rsp.reserved)
            BAD_RESPONSE(FAULT_BAD_RESPONSE,
                         "response %lu (id 0x%lx) has a non-zero reserved field (0x%x)",
                         (unsigned long)index, (unsigned long)rsp.id, (unsigned)rsp.reserved);
        if (rsp.status != RNGIF_STATUS_OKAY && rsp.status != RNGIF_STATUS_ERROR)
            BAD_RESPONSE(FAULT_BAD_STATUS,
                         "response %lu (id 0x%lx) has status %d: want 0 (okay) or -1 (error)",
                         (unsigned long)index, (unsigned long)rsp.id, (int)rsp.status);
        /* the bytes asked for, all of them: a short answer would leave stale data-area
         * bytes in the caller's buffer as if they were random */
        u32 want = rsp.status == RNGIF_STATUS_OKAY ? t->length : 0;
        if (rsp.length != want)
            BAD_RESPONSE(FAULT_BAD_RESPONSE,
                         "response %lu (id 0x%lx) has status %d and length %u: want %u%s",
                         (unsigned long)index, (unsigned long)rsp.id, (int)rsp.status,
                         (unsigned)rsp.length, (unsigned)want,
                         want ? " (the request's)" : " on error");
        rf->rsp_cons = index + 1;
        rf->completed++;
        n++;
        if (rsp.status == RNGIF_STATUS_ERROR)
            rf->errors++;
        if (t->dest) { /* the current read's (else abandoned by a timed-out read: dropped) */
            rd->pending--;
            if (rsp.status == RNGIF_STATUS_OKAY) {
                memcpy(t->dest, rf->region + tag_offset(tag), t->length);
                rf->bytes += t->length;
            } else {
                rd->errors++;
            }
        }
        t->in_use = 0;
    }
    return n;
}

/* Return when a response may be ready (RING_FINAL_CHECK_FOR_RESPONSES, then sleep on the
 * port): 0, or RNGFRONT_E_TIMEOUT after io_timeout_ns without an event. */
static int wait_responses(struct rngfront *rf)
{
    if (rf->held) { /* the kernel sends an event when it takes the bad responses back */
        rf->waits++;
        u64 got = evtchn_wait(rf->port_bit, rf->io_timeout_ns);
        if (!got && rf->held && still_held(rf) > 0) {
            printf("rngfront: %s: no new driver instance took over within the I/O timeout\n",
                   rf->dev.name);
            return RNGFRONT_E_TIMEOUT;
        }
        return 0;
    }
    if (__atomic_load_n(&rf->sring->rsp_prod, __ATOMIC_ACQUIRE) != rf->rsp_cons)
        return 0;
    __atomic_store_n(&rf->sring->rsp_event, rf->rsp_cons + 1, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&rf->sring->rsp_prod, __ATOMIC_ACQUIRE) != rf->rsp_cons)
        return 0;
    rf->waits++;
    u64 got = evtchn_wait(rf->port_bit, rf->io_timeout_ns);
    rf->upcalls = evtchn_upcalls(rf->dev.port) - rf->upcalls_base;
    if (!got && __atomic_load_n(&rf->sring->rsp_prod, __ATOMIC_ACQUIRE) == rf->rsp_cons)
        return RNGFRONT_E_TIMEOUT;
    return 0;
}

/* The read is over with requests in flight: their bytes must not land in the caller's
 * buffer later, so a late response is consumed and dropped. */
static void abandon(struct rngfront *rf)
{
    for (u64 t = 0; t < rf->ntags; t++)
        rf->tags[t].dest = NULL;
}

long rngfront_read(struct rngfront *rf, void *buf, u64 len)
{
    if (rf->failed)
        return RNGFRONT_E_FAILED;
    if ((!buf && len) || (long)len < 0)
        return RNGFRONT_E_INVAL;
    u64 qd = rf->queue_depth;
    if (qd < 1 || qd > rf->ntags)
        qd = rf->ntags;
    u8 *out = buf;
    u64 issued = 0;
    struct read_state rd = {0, 0};
    /* after an error, ask for nothing more; wait only for what is in flight */
    while ((issued < len && !rd.errors) || rd.pending) {
        int tag;
        while (issued < len && !rd.errors && rngfront_outstanding(rf) < qd &&
               (tag = get_tag(rf)) >= 0) {
            u64 n = len - issued < RNGIF_MAX_REQUEST_BYTES ? len - issued
                                                           : RNGIF_MAX_REQUEST_BYTES;
            queue(rf, tag, out + issued, (u32)n);
            issued += n;
            rd.pending++;
        }
        push(rf);
        int n = take_responses(rf, &rd);
        if (n == 0)
            n = wait_responses(rf);
        if (n < 0) {
            abandon(rf);
            return n;
        }
    }
    return rd.errors ? RNGFRONT_E_IO : (long)len;
}
