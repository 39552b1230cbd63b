/* isovisor guest runtime: the console frontend (see consfront.h).
 *
 * Ring discipline (ipc/consif.py, Xen io/ring.h): bytes are written before
 * the release-store of the producer index that publishes them; after
 * publishing, a full fence, then the peer's event word decides whether to
 * kick.  A side about to sleep sets its event word, fences and looks again.
 * Everything in the page is shared with the (untrusted) backend: indices are
 * read once into locals and checked, and the frontend's own indices
 * (out_prod, in_cons) are never taken back from shared memory.
 */
#include "consfront.h"
#include "devfront.h"

#if defined(__has_include)
#if __has_include("isovisor_consif.h")
#include "isovisor_consif.h"
_Static_assert(CONSFRONT_OUT_PROD == CONSIF_OUT_PROD, "out_prod offset");
_Static_assert(CONSFRONT_OUT_CONS == CONSIF_OUT_CONS, "out_cons offset");
_Static_assert(CONSFRONT_IN_PROD == CONSIF_IN_PROD, "in_prod offset");
_Static_assert(CONSFRONT_IN_CONS == CONSIF_IN_CONS, "in_cons offset");
_Static_assert(__builtin_offsetof(struct consif_header, out_event) == CONSIF_OUT_EVENT, "ev");
_Static_assert(__builtin_offsetof(struct consif_header, out_cons_event) == CONSIF_OUT_CONS_EVENT,
               "out_cons_event offset");
_Static_assert(__builtin_offsetof(struct consif_header, in_event) == CONSIF_IN_EVENT, "in_ev");
_Static_assert(__builtin_offsetof(struct consif_header, in_cons_event) == CONSIF_IN_CONS_EVENT,
               "in_cons_event offset");
_Static_assert(CONSFRONT_HEADER_BYTES == CONSIF_HEADER_BYTES, "header bytes");
_Static_assert(CONSFRONT_OUT_OFFSET == CONSIF_OUT_OFFSET, "out offset");
_Static_assert(CONSFRONT_OUT_SIZE == CONSIF_OUT_SIZE, "out size");
_Static_assert(CONSFRONT_IN_OFFSET == CONSIF_IN_OFFSET, "in offset");
_Static_assert(CONSFRONT_IN_SIZE == CONSIF_IN_SIZE, "in size");
_Static_assert(CONSFRONT_WINDOW_BYTES == CONSIF_WINDOW_BYTES, "window");
#endif
#endif

_Static_assert(__builtin_offsetof(struct consif_header, out_prod) == CONSFRONT_OUT_PROD, "op");
_Static_assert(__builtin_offsetof(struct consif_header, out_cons) == CONSFRONT_OUT_CONS, "oc");
_Static_assert(__builtin_offsetof(struct consif_header, in_prod) == CONSFRONT_IN_PROD, "ip");
_Static_assert(__builtin_offsetof(struct consif_header, in_cons) == CONSFRONT_IN_CONS, "ic");
_Static_assert(sizeof(struct consif_header) <= CONSFRONT_HEADER_BYTES, "header fits");
_Static_assert((CONSFRONT_OUT_SIZE & (CONSFRONT_OUT_SIZE - 1)) == 0, "out size power of two");
_Static_assert((CONSFRONT_IN_SIZE & (CONSFRONT_IN_SIZE - 1)) == 0, "in size power of two");
_Static_assert(CONSFRONT_OUT_OFFSET + CONSFRONT_OUT_SIZE <= CONSFRONT_IN_OFFSET, "out fits");
_Static_assert(CONSFRONT_IN_OFFSET + CONSFRONT_IN_SIZE <= CONSFRONT_WINDOW_BYTES, "in fits");

#define CF_BARRIER() __asm__ volatile("" ::: "memory")
#define CF_LOAD(p) __atomic_load_n(&(p), __ATOMIC_ACQUIRE)
#define CF_STORE(p, v) __atomic_store_n(&(p), (v), __ATOMIC_RELEASE)
#define CF_FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)

/* Diagnostics go straight to the kernel console, never through printf (raw_console). */
static const struct devfront_class cons_class = {.who = "consfront",
                                                 .what = "console device",
                                                 .dir = "console",
                                                 .kind = DEV_KIND_CONSOLE,
                                                 .raw_console = 1};

/* --- faults ----------------------------------------------------------------------- */

/* The backend broke the rings: `what` (its index, value theirs) claims `apart` bytes
 * against the frontend's own index `ours`, more than the ring's `size`.  Report it (no
 * hold: nothing can be redone) and fail the frontend. */
static long backend_fault(struct consfront *c, const char *what, u64 theirs, u64 ours,
                          u64 apart, u64 size)
{
    char msg[200];
    snprintf(msg, sizeof msg,
             "console %s: backend %s=%lu is %lu bytes from the frontend's index %lu, more than "
             "the %lu-byte ring holds",
             c->dev.name, what, (unsigned long)theirs, (unsigned long)apart, (unsigned long)ours,
             (unsigned long)size);
    devfront_fault(&cons_class, &c->dev, FAULT_EXTRA_RESPONSE, 0, 0, msg);
    c->failed = 1;
    return CONSFRONT_E_FAILED;
}

static void kick(struct consfront *c)
{
    c->kicks++;
    devfront_notify(&cons_class, &c->dev);
}

/* --- handshake ------------------------------------------------------------------ */

static void init_page(struct consfront *c)
{
    volatile u64 *w = (volatile u64 *)c->dev.region;
    for (u64 i = 0; i < CONSFRONT_HEADER_BYTES / 8; i++)
        w[i] = 0;
    CF_BARRIER();
    c->hdr->out_event = 1;
    c->hdr->out_cons_event = 1;
    c->hdr->in_event = 1;
    c->hdr->in_cons_event = 1;
    CF_BARRIER();
    c->out_prod = c->in_cons = 0;
}

int consfront_open(struct consfront *c, u64 timeout_ns)
{
    memset(c, 0, sizeof *c);
    c->write_timeout_ns = POLL_FOREVER;
    c->failed = 1; /* until connected */
    struct devfront df = DEVFRONT_INIT(&cons_class, c);
    int rc = devfront_find(&df, CONSFRONT_DEVICE_NAME);
    if (rc < 0)
        return rc;
    if (!c->dev.region || c->dev.region_size < CONSFRONT_WINDOW_BYTES) {
        devfront_say(&cons_class, "%s: region %p of %lu bytes cannot hold the console page\n",
                     c->dev.name, c->dev.region, (unsigned long)c->dev.region_size);
        return -EINVAL;
    }
    u8 *region = c->dev.region;
    c->hdr = (volatile struct consif_header *)region;
    c->out = region + CONSFRONT_OUT_OFFSET;
    c->in = region + CONSFRONT_IN_OFFSET;
    c->port_bit = (u64)1 << c->dev.port;

    /* 1. upcalls, the deadline, the backend directory */
    rc = devfront_start(&df, timeout_ns);
    if (rc < 0)
        return rc;

    /* 2. the backend is ready (InitWait), or Connected already */
    rc = devfront_wait_backend(&df, DEVFRONT_ST_INIT_WAIT, DEVFRONT_ST_CONNECTED);
    if (rc < 0)
        return rc;

    /* 3. the page: indices 0, every event word 1; then Initialised, the backend attaches
     * it and goes Connected; 4. Connected */
    init_page(c);
    rc = devfront_connect(&df);
    if (rc < 0)
        return rc;
    c->failed = 0;
    c->connected = 1;
    return 0;
}

/* --- output ---------------------------------------------------------------------- */

long consfront_write(struct consfront *c, const char *buf, u32 len)
{
    if (c->failed)
        return CONSFRONT_E_FAILED;
    if (!c->connected || (!buf && len))
        return CONSFRONT_E_INVAL;
    u32 done = 0;
    while (done < len) {
        u64 cons = CF_LOAD(c->hdr->out_cons);
        u64 used = c->out_prod - cons;
        if (used > CONSFRONT_OUT_SIZE) {
            long f = backend_fault(c, "out_cons", cons, c->out_prod, used, CONSFRONT_OUT_SIZE);
            return done ? (long)done : f;
        }
        u64 room = CONSFRONT_OUT_SIZE - used;
        if (room == 0) {
            /* full: ask to be notified when the backend consumes, then look again */
            CF_STORE(c->hdr->out_cons_event, cons + 1);
            CF_FENCE();
            if (CF_LOAD(c->hdr->out_cons) != cons)
                continue;
            c->waits++;
            u64 got = evtchn_wait(c->port_bit, c->write_timeout_ns);
            if (!got && CF_LOAD(c->hdr->out_cons) == cons)
                return done ? (long)done : CONSFRONT_E_TIMEOUT;
            continue;
        }
        u64 n = len - done;
        if (n > room)
            n = room;
        u64 old = c->out_prod;
        u8 *ring = (u8 *)(uintptr_t)c->out;
        u64 at = old & (CONSFRONT_OUT_SIZE - 1);
        u64 first = CONSFRONT_OUT_SIZE - at;
        if (first > n)
            first = n;
        memcpy(ring + at, buf + done, first);
        memcpy(ring, buf + done + first, n - first);
        u64 new = old + n;
        /* the bytes above are ordered before this store (x86 TSO; release keeps the
         * compiler from sinking them) */
        CF_STORE(c->hdr->out_prod, new);
        c->out_prod = new;
        c->bytes_out += n;
        done += (u32)n;
        CF_FENCE(); /* publish out_prod before reading out_event (Xen: mb()) */
        u64 event = CF_LOAD(c->hdr->out_event);
        if (new - event < new - old)
            kick(c);
    }
    return (long)done;
}

/* --- input ----------------------------------------------------------------------- */

/* Input bytes published and not read (checked), or a negative error. */
static long input_available(struct consfront *c)
{
    u64 prod = CF_LOAD(c->hdr->in_prod);
    u64 avail = prod - c->in_cons;
    if (avail > CONSFRONT_IN_SIZE)
        return backend_fault(c, "in_prod", prod, c->in_cons, avail, CONSFRONT_IN_SIZE);
    return (long)avail;
}

long consfront_read(struct consfront *c, char *buf, u32 max)
{
    if (c->failed)
        return CONSFRONT_E_FAILED;
    if (!c->connected || (!buf && max))
        return CONSFRONT_E_INVAL;
    long avail = input_available(c);
    if (avail < 0)
        return avail;
    u64 n = (u64)avail < max ? (u64)avail : max;
    u64 old = c->in_cons;
    const u8 *ring = (const u8 *)(uintptr_t)c->in;
    u64 at = old & (CONSFRONT_IN_SIZE - 1);
    u64 first = CONSFRONT_IN_SIZE - at;
    if (first > n)
        first = n;
    memcpy(buf, ring + at, first);
    memcpy(buf + first, ring, n - first);
    u64 new = old + n;
    /* the copies above complete before the backend may reuse the bytes */
    CF_STORE(c->hdr->in_cons, new);
    c->in_cons = new;
    c->bytes_in += n;
    CF_STORE(c->hdr->in_event, new + 1); /* notify me at the next input */
    CF_FENCE();
    if (n) {
        u64 event = CF_LOAD(c->hdr->in_cons_event);
        if (new - event < new - old)
            kick(c); /* the backend has input waiting for this room */
    }
    return (long)n;
}

int consfront_wait_input(struct consfront *c, u64 timeout_ns)
{
    if (c->failed)
        return CONSFRONT_E_FAILED;
    if (!c->connected)
        return CONSFRONT_E_INVAL;
    u64 deadline = POLL_FOREVER;
    if (timeout_ns != POLL_FOREVER) {
        u64 now = time_ns();
        deadline = now + timeout_ns;
        if (deadline < now || deadline == POLL_FOREVER)
            deadline = POLL_FOREVER - 1;
    }
    for (;;) {
        long avail = input_available(c);
        if (avail != 0)
            return avail < 0 ? (int)avail : 1;
        CF_STORE(c->hdr->in_event, c->in_cons + 1);
        CF_FENCE();
        avail = input_available(c);
        if (avail != 0)
            return avail < 0 ? (int)avail : 1;
        u64 left = POLL_FOREVER;
        if (deadline != POLL_FOREVER) {
            u64 now = time_ns();
            if (now >= deadline)
                return 0;
            left = deadline - now;
        }
        evtchn_wait(c->port_bit, left);
    }
}
