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

/* XenbusState numbers (ipc.store.DevState). */
enum { CF_INIT_WAIT = 2, CF_CONNECTED = 4, CF_CLOSING = 5, CF_CLOSED = 6 };

/* --- diagnostics: straight to the kernel console, never through printf ------- */

static void diag(const char *fmt, ...) PRINTF_LIKE(1, 2);
static void diag(const char *fmt, ...)
{
    char msg[300];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((u64)n >= sizeof msg)
        n = sizeof msg - 1;
    hypercall2(HC_CONSOLE_WRITE, (u64)(uintptr_t)msg, (u64)n);
}

/* The backend broke the rings: `what` (its index, value theirs) claims `apart` bytes
 * against the frontend's own index `ours`, more than the ring's `size`.  Report it (no
 * hold: nothing can be redone) and fail the frontend. */
static long backend_fault(struct consfront *c, const char *what, u64 theirs, u64 ours,
                          u64 apart, u64 size)
{
    char msg[200];
    int n = snprintf(msg, sizeof msg,
                     "console %s: backend %s=%lu is %lu bytes from the frontend's index %lu, "
                     "more than the %lu-byte ring holds",
                     c->dev.name, what, (unsigned long)theirs, (unsigned long)apart,
                     (unsigned long)ours, (unsigned long)size);
    if (n < 0)
        n = 0;
    if ((u64)n >= sizeof msg)
        n = sizeof msg - 1;
    diag("consfront: backend fault: %s\n", msg);
    long r = hypercall6(HC_DEVICE_FAULT, c->dev.port, FAULT_EXTRA_RESPONSE, (u64)(uintptr_t)msg,
                        (u64)n, 0, 0);
    if (r < 0)
        diag("consfront: %s: HC_DEVICE_FAULT failed (%ld)\n", c->dev.name, r);
    c->failed = 1;
    return CONSFRONT_E_FAILED;
}

static void kick(struct consfront *c)
{
    c->kicks++;
    long r = evtchn_send(c->dev.port);
    if (r < 0)
        diag("consfront: %s: HC_EVTCHN_SEND(%lu) failed (%ld)\n", c->dev.name,
             (unsigned long)c->dev.port, r);
}

/* --- handshake ------------------------------------------------------------------ */

static int wait_backend(struct consfront *c, u64 want_a, u64 want_b, u64 deadline)
{
    for (;;) {
        u64 st = 0;
        long r = store_read_u64_at(c->backend, "state", &st);
        if (r < 0 && r != -ENOENT) {
            diag("consfront: %s: cannot read %s/state: error %ld\n", c->dev.name, c->backend, r);
            return (int)r;
        }
        if (r == 0) {
            if (st == want_a || st == want_b)
                return 0;
            if (st == CF_CLOSING || st == CF_CLOSED) {
                char err[200];
                long e = store_read_at(c->backend, "error", err, sizeof err);
                diag("consfront: %s: backend %s is closed%s%s\n", c->dev.name, c->backend,
                     e > 0 ? ": " : "", e > 0 ? err : "");
                return -ISV_ENODEV;
            }
        }
        u64 now = time_ns();
        if (now >= deadline) {
            diag("consfront: %s: gave up waiting for backend %s to become state %lu (it is %s "
                 "%lu)\n",
                 c->dev.name, c->backend, (unsigned long)want_a, r == 0 ? "in state" : "missing",
                 (unsigned long)st);
            return -ISV_ETIMEDOUT;
        }
        evtchn_wait(c->port_bit, deadline - now); /* each backend state change raises the port */
    }
}

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
    if (device_find(CONSFRONT_DEVICE_NAME, &c->dev) < 0) {
        diag("consfront: no device named \"%s\" in the device table\n", CONSFRONT_DEVICE_NAME);
        return -ISV_ENODEV;
    }
    const char *name = c->dev.name;
    if (c->dev.kind != DEV_KIND_CONSOLE) {
        diag("consfront: %s is not a console device (kind %lu)\n", name,
             (unsigned long)c->dev.kind);
        return -ISV_ENODEV;
    }
    if (c->dev.port == 0 || c->dev.port >= EVTCHN_PORTS) {
        diag("consfront: %s: bad event-channel port %lu in the device table\n", name,
             (unsigned long)c->dev.port);
        return -EINVAL;
    }
    if (!c->dev.region || c->dev.region_size < CONSFRONT_WINDOW_BYTES) {
        diag("consfront: %s: region %p of %lu bytes cannot hold the console page\n", name,
             c->dev.region, (unsigned long)c->dev.region_size);
        return -EINVAL;
    }
    u8 *region = c->dev.region;
    c->hdr = (volatile struct consif_header *)region;
    c->out = region + CONSFRONT_OUT_OFFSET;
    c->in = region + CONSFRONT_IN_OFFSET;
    c->port_bit = (u64)1 << c->dev.port;

    long r = evtchn_init();
    if (r < 0)
        diag("consfront: %s: HC_SET_UPCALL failed (%ld); waiting without upcalls\n", name, r);

    u64 now = time_ns();
    u64 deadline = now + timeout_ns < now ? POLL_FOREVER - 1 : now + timeout_ns;

    /* 1. the backend directory */
    if (store_path(c->frontend, sizeof c->frontend, "device/console/%lu",
                   (unsigned long)c->dev.devid))
        return -E2BIG;
    r = store_read_at(c->frontend, "backend", c->backend, sizeof c->backend);
    if (r <= 0 || (u64)r >= sizeof c->backend) {
        diag("consfront: %s: cannot read %s/backend: %s %ld\n", name, c->frontend,
             r < 0 ? "error" : "bad length", r);
        return r < 0 ? (int)r : -E2BIG;
    }

    /* 2. the backend is ready (InitWait), or Connected already */
    int rc = wait_backend(c, CF_INIT_WAIT, CF_CONNECTED, deadline);
    if (rc < 0)
        return rc;

    /* 3. the page: indices 0, every event word 1; then Initialised */
    init_page(c);
    r = store_write_at(c->frontend, "state", "3");
    if (r < 0) {
        diag("consfront: %s: cannot write %s/state = 3: error %ld\n", name, c->frontend, r);
        return (int)r;
    }
    rc = wait_backend(c, CF_CONNECTED, CF_CONNECTED, deadline);
    if (rc < 0)
        return rc;

    /* 4. Connected */
    r = store_write_at(c->frontend, "state", "4");
    if (r < 0) {
        diag("consfront: %s: cannot write %s/state = 4: error %ld\n", name, c->frontend, r);
        return (int)r;
    }
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
