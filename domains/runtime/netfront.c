/* isovisor guest runtime: the network-interface frontend (see netfront.h).
 *
 * Ring discipline as in blkfront.c (ipc/ring.py, Xen io/ring.h): request slots
 * are written with whole-word stores before the release-store of req_prod
 * that publishes them; after publishing, a full fence, then req_event decides
 * whether to kick.  A consumer that finds nothing sets rsp_event = rsp_cons +
 * 1, fences, and looks again before it sleeps.  Everything in the region is
 * shared with the (untrusted) backend: indices are read once into locals,
 * responses and frames are copied out before they are checked or used, and the
 * frontend's own view (indices, buffer states) is never taken from shared
 * memory.
 *
 * Finding the vif, the store handshake and the fault / hold / kick hypercalls
 * are devfront.c's, shared with the other frontends.
 */
#include "netfront.h"
#include "devfront.h"

_Static_assert(sizeof(struct netif_tx_request) == NETIF_SLOT_SIZE, "tx request size");
_Static_assert(sizeof(struct netif_tx_response) == NETIF_SLOT_SIZE, "tx response size");
_Static_assert(sizeof(struct netif_rx_request) == NETIF_SLOT_SIZE, "rx request size");
_Static_assert(sizeof(struct netif_rx_response) == NETIF_SLOT_SIZE, "rx response size");
_Static_assert(__builtin_offsetof(struct netif_tx_request, offset) == 8, "tx offset");
_Static_assert(__builtin_offsetof(struct netif_tx_request, size) == 12, "tx size");
_Static_assert(__builtin_offsetof(struct netif_tx_request, flags) == 14, "tx flags");
_Static_assert(__builtin_offsetof(struct netif_tx_response, status) == 8, "tx status");
_Static_assert(__builtin_offsetof(struct netif_tx_response, reserved2) == 12, "tx reserved");
_Static_assert(__builtin_offsetof(struct netif_rx_response, offset) == 8, "rx offset");
_Static_assert(__builtin_offsetof(struct netif_rx_response, size) == 12, "rx size");
_Static_assert(__builtin_offsetof(struct netif_rx_response, status) == 14, "rx status");
_Static_assert(sizeof(struct netif_sring_header) == NETFRONT_RING_HEADER, "ring header");
_Static_assert(NETIF_TX_RING_OFFSET + NETFRONT_RING_HEADER +
                       NETIF_RING_SLOTS * NETIF_SLOT_SIZE <= NETIF_RX_RING_OFFSET,
               "tx ring fits below the rx ring");
_Static_assert(NETIF_RX_RING_OFFSET + NETFRONT_RING_HEADER +
                       NETIF_RING_SLOTS * NETIF_SLOT_SIZE <= NETIF_TX_BUF_OFFSET,
               "rx ring fits below the tx buffers");
_Static_assert((NETIF_RING_SLOTS & (NETIF_RING_SLOTS - 1)) == 0, "ring size power of two");
_Static_assert(NETIF_RING_SLOTS <= (1 << NETFRONT_TAG_BITS), "tags fit the id's low bits");
_Static_assert(NETIF_RING_SLOTS <= 256, "rx_slot_buf holds a buffer number in a u8");
_Static_assert(NETIF_SLOT_SIZE == 16, "slots are two words");
_Static_assert(NETIF_MAX_FRAME <= NETIF_BUF_SIZE && NETIF_BUF_SIZE <= 0xFFFF,
               "a buffer holds a frame; its size fits a u16");
_Static_assert(NETIF_TX_BUF_OFFSET + NETIF_RING_SLOTS * NETIF_BUF_SIZE <= NETIF_RX_BUF_OFFSET &&
                       NETIF_RX_BUF_OFFSET + NETIF_RING_SLOTS * NETIF_BUF_SIZE <=
                               NETIF_WINDOW_BYTES,
               "buffers fit their areas");

#define SLOT_MASK ((u64)NETIF_RING_SLOTS - 1)
#define TAG_MASK (((u64)1 << NETFRONT_TAG_BITS) - 1)
#define BARRIER() __asm__ volatile("" ::: "memory")
/* Bad rx responses printed in full (then every 1000th). */
#define RX_PRINT_LIMIT 5

static const struct devfront_class net_class = {
    .who = "netfront", .what = "network interface", .dir = "vif", .kind = DEV_KIND_VIF};

static volatile u64 *slot_words(struct netfront_ring *r, u64 index)
{
    return (volatile u64 *)(r->slots + (index & SLOT_MASK) * NETIF_SLOT_SIZE);
}

/* Write a 16-byte request into the slot of ring index `index` (two whole-word stores). */
static void write_slot(struct netfront_ring *r, u64 index, const void *req)
{
    u64 src[2];
    memcpy(src, req, sizeof src);
    volatile u64 *dst = slot_words(r, index);
    dst[0] = src[0];
    dst[1] = src[1];
}

/* Copy the slot of ring index `index` out once (the backend may rewrite it). */
static void read_slot(struct netfront_ring *r, u64 index, void *rsp)
{
    volatile u64 *w = slot_words(r, index);
    u64 words[2] = {w[0], w[1]};
    memcpy(rsp, words, sizeof words);
}

static u32 tx_offset(u64 tag) { return (u32)(NETIF_TX_BUF_OFFSET + tag * NETIF_BUF_SIZE); }
static u32 rx_offset(u64 buf) { return (u32)(NETIF_RX_BUF_OFFSET + buf * NETIF_BUF_SIZE); }

/* --- text helpers ------------------------------------------------------------------- */

static int hex_digit(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int netfront_parse_mac(const char *s, u8 mac[6])
{
    u8 out[6];
    for (int i = 0; i < 6; i++) {
        int hi = hex_digit(s[0]), lo = hi < 0 ? -1 : hex_digit(s[1]);
        if (lo < 0)
            return -EINVAL;
        out[i] = (u8)(hi << 4 | lo);
        s += 2;
        if (*s != (i == 5 ? '\0' : ':'))
            return -EINVAL;
        s += i < 5;
    }
    memcpy(mac, out, 6);
    return 0;
}

int netfront_parse_ipv4(const char *s, u8 ip[4])
{
    u8 out[4];
    for (int i = 0; i < 4; i++) {
        u32 v = 0;
        int digits = 0;
        while (*s >= '0' && *s <= '9') {
            if (++digits > 3)
                return -EINVAL;
            v = v * 10 + (u32)(*s++ - '0');
        }
        if (!digits || v > 255 || *s != (i == 3 ? '\0' : '.'))
            return -EINVAL;
        out[i] = (u8)v;
        s += i < 3;
    }
    memcpy(ip, out, 4);
    return 0;
}

char *netfront_format_mac(const u8 mac[6], char *buf)
{
    snprintf(buf, 18, "%02x:%02x:%02x:%02x:%02x:%02x", mac[0], mac[1], mac[2], mac[3], mac[4],
             mac[5]);
    return buf;
}

char *netfront_format_ipv4(const u8 ip[4], char *buf)
{
    snprintf(buf, 16, "%u.%u.%u.%u", ip[0], ip[1], ip[2], ip[3]);
    return buf;
}

/* --- faults ---------------------------------------------------------------------------- */

static long device_fault(struct netfront *nf, u64 code, u64 rsp_cons, u64 flags,
                         const char *ring, const char *fmt, va_list ap)
{
    char msg[400];
    int n = snprintf(msg, sizeof msg, "%s ring: ", ring);
    vsnprintf(msg + n, sizeof msg - (u64)n, fmt, ap);
    return devfront_fault(&net_class, &nf->dev, code, rsp_cons, flags, msg);
}

static int tx_bad(struct netfront *nf, u64 code, const char *fmt, ...) PRINTF_LIKE(3, 4);
static void rx_bad(struct netfront *nf, u64 code, const char *fmt, ...) PRINTF_LIKE(3, 4);

/* A bad tx response at tx.rsp_cons: report it; hold (0) if the kernel will have the tx
 * requests from there on redone by a new driver instance, else fail (NETFRONT_E_FAILED). */
static int tx_bad(struct netfront *nf, u64 code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    long r = device_fault(nf, code, nf->tx.rsp_cons, FAULT_F_HOLD, "tx", fmt, ap);
    va_end(ap);
    if (r == 1) {
        nf->held = 1;
        nf->holds++;
        printf("netfront: %s: holding tx from response %lu until a new driver instance redoes "
               "the requests\n", nf->dev.name, (unsigned long)nf->tx.rsp_cons);
        return 0;
    }
    nf->failed = (int)code;
    return NETFRONT_E_FAILED;
}

/* A bad rx response (or rx index): count it; print the first few; report the first, then at
 * most one per NETFRONT_RX_REPORT_INTERVAL_NS, without the hold flag. */
static void rx_bad(struct netfront *nf, u64 code, const char *fmt, ...)
{
    nf->rx_bad++;
    u64 now = time_ns();
    int report = nf->rx_reports == 0 || now - nf->rx_last_report_ns >=
                                                NETFRONT_RX_REPORT_INTERVAL_NS;
    if (!report && nf->rx_bad > RX_PRINT_LIMIT && nf->rx_bad % 1000 != 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    if (report) {
        nf->rx_reports++;
        nf->rx_last_report_ns = now;
        device_fault(nf, code, nf->rx.rsp_cons, 0, "rx", fmt, ap);
    } else {
        char msg[400];
        vsnprintf(msg, sizeof msg, fmt, ap);
        printf("netfront: %s: bad rx response %lu (dropped, not reported again yet): %s\n",
               nf->dev.name, (unsigned long)nf->rx_bad, msg);
    }
    va_end(ap);
}

/* While held: has the kernel taken the bad tx responses back? 1 still held, 0 resumed, <0
 * the frontend failed. */
static int still_held(struct netfront *nf)
{
    long r = devfront_held(&net_class, &nf->dev);
    if (r < 0) {
        nf->failed = -1;
        return NETFRONT_E_FAILED;
    }
    if (r)
        return 1;
    nf->held = 0;
    printf("netfront: %s: tx resumed at response %lu\n", nf->dev.name,
           (unsigned long)nf->tx.rsp_cons);
    return 0;
}

/* --- rings ------------------------------------------------------------------------------- */

long netfront_kick(struct netfront *nf)
{
    nf->kicks++;
    return evtchn_send(nf->dev.port);
}

/* RING_PUSH_REQUESTS_AND_CHECK_NOTIFY; bufs' QUEUED entries become INFLIGHT.  1 if the
 * backend asked to be notified. */
static int ring_push(struct netfront_ring *r, struct netfront_buf *bufs)
{
    u64 old = r->req_pushed, new = r->req_prod_pvt;
    if (old == new)
        return 0;
    for (u64 i = 0; i < NETIF_RING_SLOTS; i++)
        if (bufs[i].state == NETFRONT_BUF_QUEUED)
            bufs[i].state = NETFRONT_BUF_INFLIGHT;
    /* the slot stores are ordered before this one (x86 TSO; release keeps the compiler from
     * sinking them) */
    __atomic_store_n(&r->sring->req_prod, new, __ATOMIC_RELEASE);
    r->req_pushed = new;
    /* publish req_prod before reading req_event (Xen: mb()) */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    u64 event = __atomic_load_n(&r->sring->req_event, __ATOMIC_ACQUIRE);
    return new - event < new - old;
}

static void push(struct netfront *nf)
{
    int notify = ring_push(&nf->tx, nf->txb);
    notify |= ring_push(&nf->rx, nf->rxb);
    if (notify) {
        nf->kicks++;
        devfront_notify(&net_class, &nf->dev);
    }
}

void netfront_push(struct netfront *nf)
{
    if (!nf->failed)
        push(nf);
}

/* Post rx buffer b in the next rx slot (published by the next push). */
static void post_rx(struct netfront *nf, u64 b)
{
    struct netfront_buf *rb = &nf->rxb[b];
    u64 index = nf->rx.req_prod_pvt;
    struct netif_rx_request req;
    req.id = (nf->next_seq++ << NETFRONT_TAG_BITS) | b;
    req.offset = rx_offset(b);
    req.size = NETIF_BUF_SIZE;
    req.flags = 0;
    write_slot(&nf->rx, index, &req);
    rb->state = NETFRONT_BUF_QUEUED;
    rb->id = req.id;
    rb->ring_idx = index;
    nf->rx_slot_buf[index & SLOT_MASK] = (u8)b;
    nf->rx_slot_id[index & SLOT_MASK] = req.id;
    nf->rx.req_prod_pvt = index + 1;
}

/* --- handshake ------------------------------------------------------------------------- */

/* Read node `mac` of dir into nf->mac: 0, -ENOENT (absent: not printed), or another
 * negative value (printed). */
static int read_mac(struct netfront *nf, const char *dir)
{
    char text[40];
    long r = store_read_at(dir, "mac", text, sizeof text);
    if (r == -ENOENT)
        return -ENOENT;
    if (r < 0) {
        printf("netfront: %s: cannot read %s/mac: error %ld\n", nf->dev.name, dir, r);
        return (int)r;
    }
    if ((u64)r >= sizeof text || netfront_parse_mac(text, nf->mac) < 0 || nf->mac[0] & 1) {
        printf("netfront: %s: %s/mac = '%s' is not a unicast MAC address like "
               "02:00:00:00:00:01\n", nf->dev.name, dir, text);
        return -EINVAL;
    }
    netfront_format_mac(nf->mac, nf->mac_str);
    return 0;
}

/* The optional `ip` of the frontend directory: 0 (absent or read), or negative (printed). */
static int read_ip(struct netfront *nf)
{
    char text[40];
    long r = store_read_at(nf->frontend, "ip", text, sizeof text);
    if (r == -ENOENT || r == 0)
        return 0;
    if (r < 0 || (u64)r >= sizeof text || netfront_parse_ipv4(text, nf->ip) < 0) {
        if (r < 0)
            printf("netfront: %s: cannot read %s/ip: error %ld\n", nf->dev.name, nf->frontend,
                   r);
        else
            printf("netfront: %s: %s/ip = '%s' is not an IPv4 address like 198.18.0.2\n",
                   nf->dev.name, nf->frontend, text);
        return r < 0 ? (int)r : -EINVAL;
    }
    nf->has_ip = 1;
    netfront_format_ipv4(nf->ip, nf->ip_str);
    return 0;
}

/* Both rings empty (req_prod = rsp_prod = 0, req_event = rsp_event = 1), every rx buffer
 * posted and published (the backend is not attached yet: no kick). */
static void init_rings(struct netfront *nf)
{
    volatile u64 *w = (volatile u64 *)nf->region;
    for (u64 i = 0; i < NETIF_TX_BUF_OFFSET / 8; i++)
        w[i] = 0;
    BARRIER();
    struct netfront_ring *rings[2] = {&nf->tx, &nf->rx};
    for (int i = 0; i < 2; i++) {
        struct netfront_ring *r = rings[i];
        r->sring->req_prod = 0;
        r->sring->rsp_prod = 0;
        r->sring->req_event = 1;
        r->sring->rsp_event = 1;
        r->req_prod_pvt = r->req_pushed = r->rsp_cons = 0;
    }
    BARRIER();
    nf->next_seq = 1;
    for (u64 b = 0; b < NETIF_RING_SLOTS; b++)
        post_rx(nf, b);
    for (u64 b = 0; b < NETIF_RING_SLOTS; b++)
        nf->rxb[b].state = NETFRONT_BUF_INFLIGHT;
    __atomic_store_n(&nf->rx.sring->req_prod, nf->rx.req_prod_pvt, __ATOMIC_RELEASE);
    nf->rx.req_pushed = nf->rx.req_prod_pvt;
}

int netfront_open(struct netfront *nf, const char *name, u64 timeout_ns)
{
    memset(nf, 0, sizeof *nf);
    nf->failed = -1; /* until connected */
    if (!timeout_ns)
        timeout_ns = NETFRONT_HANDSHAKE_TIMEOUT_NS;
    struct devfront df = DEVFRONT_INIT(&net_class, nf);
    int rc = devfront_find(&df, name);
    if (rc < 0)
        return rc;
    const char *dname = nf->dev.name;
    if (!nf->dev.region || nf->dev.region_size < NETIF_WINDOW_BYTES) {
        printf("netfront: %s: region %p of %lu bytes cannot hold the rings and buffers (%d "
               "bytes)\n", dname, nf->dev.region, (unsigned long)nf->dev.region_size,
               NETIF_WINDOW_BYTES);
        return -EINVAL;
    }
    nf->region = nf->dev.region;
    nf->tx.sring = (volatile struct netif_sring_header *)(nf->region + NETIF_TX_RING_OFFSET);
    nf->tx.slots = nf->region + NETIF_TX_RING_OFFSET + NETFRONT_RING_HEADER;
    nf->rx.sring = (volatile struct netif_sring_header *)(nf->region + NETIF_RX_RING_OFFSET);
    nf->rx.slots = nf->region + NETIF_RX_RING_OFFSET + NETFRONT_RING_HEADER;
    nf->port_bit = (u64)1 << nf->dev.port;

    /* 1. upcalls, the deadline, the backend directory; the MAC and the address */
    rc = devfront_start(&df, timeout_ns);
    nf->upcalls_base = df.upcalls_base;
    if (rc < 0)
        return rc;
    int mac_rc = read_mac(nf, nf->frontend);
    if (mac_rc < 0 && mac_rc != -ENOENT)
        return mac_rc;
    rc = read_ip(nf);
    if (rc < 0)
        return rc;

    /* 2. wait for the backend to be ready for the rings (InitWait), or Connected */
    rc = devfront_wait_backend(&df, DEVFRONT_ST_INIT_WAIT, DEVFRONT_ST_CONNECTED);
    if (rc < 0)
        return rc;
    if (mac_rc == -ENOENT) { /* no `mac` from the kernel: the backend's (it enforces it) */
        mac_rc = read_mac(nf, nf->backend);
        if (mac_rc < 0) {
            if (mac_rc == -ENOENT)
                printf("netfront: %s: neither %s/mac nor %s/mac exists\n", dname, nf->frontend,
                       nf->backend);
            return mac_rc;
        }
    }

    /* 3. both rings, every rx buffer posted */
    init_rings(nf);

    /* 4. Initialised; the backend attaches its rings and goes Connected; 5. Connected */
    rc = devfront_connect(&df);
    if (rc < 0)
        return rc;
    nf->failed = 0;
    nf->connected = 1;
    return 0;
}

/* --- transmit ------------------------------------------------------------------------------ */

u64 netfront_tx_inflight(const struct netfront *nf) { return nf->tx_inflight; }

int netfront_tx_ready(const struct netfront *nf)
{
    return !nf->failed && nf->tx_inflight < NETIF_RING_SLOTS;
}

static int reap_tx(struct netfront *nf);

int netfront_tx_get(struct netfront *nf)
{
    if (nf->failed)
        return NETFRONT_E_FAILED;
    if (nf->tx_inflight >= NETIF_RING_SLOTS) {
        int r = reap_tx(nf); /* responses may be waiting: free their buffers */
        if (r < 0)
            return r;
        if (nf->tx_inflight >= NETIF_RING_SLOTS) {
            nf->tx_busy++;
            return NETFRONT_E_BUSY;
        }
    }
    for (u64 k = 0; k < NETIF_RING_SLOTS; k++) {
        u64 t = (nf->tx_cursor + k) & SLOT_MASK;
        if (nf->txb[t].state == NETFRONT_BUF_FREE) {
            nf->txb[t].state = NETFRONT_BUF_RESERVED;
            nf->tx_cursor = t + 1;
            nf->tx_inflight++;
            return (int)t;
        }
    }
    crashf("netfront: %s: %lu tx tags counted busy, but none is free", nf->dev.name,
           (unsigned long)nf->tx_inflight);
}

static int tx_reserved(const struct netfront *nf, int tag)
{
    return tag >= 0 && tag < NETIF_RING_SLOTS && nf->txb[tag].state == NETFRONT_BUF_RESERVED;
}

u8 *netfront_tx_buf(struct netfront *nf, int tag)
{
    return nf->region + tx_offset((u64)tag & SLOT_MASK);
}

void netfront_tx_put(struct netfront *nf, int tag)
{
    if (tx_reserved(nf, tag)) {
        nf->txb[tag].state = NETFRONT_BUF_FREE;
        nf->tx_inflight--;
    }
}

int netfront_tx_queue(struct netfront *nf, int tag, u32 len)
{
    if (nf->failed)
        return NETFRONT_E_FAILED;
    if (!tx_reserved(nf, tag) || len < NETIF_MIN_FRAME || len > NETIF_MAX_FRAME)
        return NETFRONT_E_INVAL;
    /* a reserved tag is counted in tx_inflight, which bounds the requests outstanding */
    if (nf->tx.req_prod_pvt - nf->tx.rsp_cons >= NETIF_RING_SLOTS)
        crashf("netfront: %s: the tx ring is full with only %lu tags busy", nf->dev.name,
               (unsigned long)nf->tx_inflight);
    struct netfront_buf *t = &nf->txb[tag];
    u64 index = nf->tx.req_prod_pvt;
    struct netif_tx_request req;
    req.id = (nf->next_seq++ << NETFRONT_TAG_BITS) | (u64)tag;
    req.offset = tx_offset((u64)tag);
    req.size = (u16)len;
    req.flags = 0;
    write_slot(&nf->tx, index, &req);
    t->state = NETFRONT_BUF_QUEUED;
    t->id = req.id;
    t->len = (u16)len;
    t->ring_idx = index;
    nf->tx.req_prod_pvt = index + 1;
    nf->tx_queued++;
    return 0;
}

int netfront_send(struct netfront *nf, const void *frame, u32 len)
{
    if (nf->failed)
        return NETFRONT_E_FAILED;
    if (len < NETIF_MIN_FRAME || len > NETIF_MAX_FRAME)
        return NETFRONT_E_INVAL;
    int tag = netfront_tx_get(nf);
    if (tag < 0)
        return tag;
    memcpy(netfront_tx_buf(nf, tag), frame, len);
    return netfront_tx_queue(nf, tag, len);
}

/* In reap_tx's loop: report a bad response; if held, return what was consumed. */
#define TX_BAD(...)                                                                              \
    do {                                                                                         \
        int r_ = tx_bad(nf, __VA_ARGS__);                                                        \
        return r_ < 0 ? r_ : n;                                                                  \
    } while (0)

/* Consume the published tx responses: how many, or NETFRONT_E_FAILED. */
static int reap_tx(struct netfront *nf)
{
    if (nf->failed)
        return NETFRONT_E_FAILED;
    if (nf->held) {
        int h = still_held(nf);
        if (h)
            return h < 0 ? h : 0;
    }
    struct netfront_ring *r = &nf->tx;
    u64 prod = __atomic_load_n(&r->sring->rsp_prod, __ATOMIC_ACQUIRE);
    u64 avail = prod - r->rsp_cons;
    u64 outstanding = r->req_pushed - r->rsp_cons;
    if (avail > outstanding)
        return tx_bad(nf, FAULT_EXTRA_RESPONSE,
                      "rsp_prod=%lu claims %lu responses after rsp_cons=%lu, but only %lu "
                      "requests are outstanding (req_prod=%lu)",
                      (unsigned long)prod, (unsigned long)avail, (unsigned long)r->rsp_cons,
                      (unsigned long)outstanding, (unsigned long)r->req_pushed);
    int n = 0;
    while (r->rsp_cons != prod) {
        u64 index = r->rsp_cons;
        struct netif_tx_response rsp;
        read_slot(r, index, &rsp);
        u64 tag = rsp.id & TAG_MASK;
        struct netfront_buf *t = tag < NETIF_RING_SLOTS ? &nf->txb[tag] : NULL;
        if (!t || t->state != NETFRONT_BUF_INFLIGHT || t->id != rsp.id)
            TX_BAD(FAULT_UNKNOWN_ID,
                   "response %lu has id 0x%lx (tag %lu, seq %lu), which matches no request in "
                   "flight%s",
                   (unsigned long)index, (unsigned long)rsp.id, (unsigned long)tag,
                   (unsigned long)(rsp.id >> NETFRONT_TAG_BITS),
                   t && t->state == NETFRONT_BUF_INFLIGHT ? " (a stale or duplicate id)" : "");
        if (rsp.reserved || rsp.reserved2)
            TX_BAD(FAULT_BAD_RESPONSE,
                   "response %lu (id 0x%lx) has non-zero reserved fields (0x%x, 0x%x): the slot "
                   "may still hold the request",
                   (unsigned long)index, (unsigned long)rsp.id, (unsigned)rsp.reserved,
                   (unsigned)rsp.reserved2);
        if (rsp.status != NETIF_STATUS_OKAY && rsp.status != NETIF_STATUS_ERROR)
            TX_BAD(FAULT_BAD_STATUS,
                   "response %lu (id 0x%lx) has status %d: want 0 (okay) or -1 (error)",
                   (unsigned long)index, (unsigned long)rsp.id, (int)rsp.status);
        r->rsp_cons = index + 1;
        if (rsp.status == NETIF_STATUS_OKAY)
            nf->tx_frames++;
        else
            nf->tx_errors++;
        t->state = NETFRONT_BUF_FREE;
        nf->tx_inflight--;
        n++;
    }
    return n;
}

/* --- receive ------------------------------------------------------------------------------- */

/* The buffer the rx request at ring index `index` posted, if it is still waiting for that
 * response: for a response too bad to name its buffer. */
static int rx_buf_at(struct netfront *nf, u64 index)
{
    u64 b = nf->rx_slot_buf[index & SLOT_MASK];
    struct netfront_buf *rb = &nf->rxb[b];
    if (rb->state == NETFRONT_BUF_INFLIGHT && rb->ring_idx == index &&
        rb->id == nf->rx_slot_id[index & SLOT_MASK])
        return (int)b;
    return -1;
}

/* Consume the published rx responses: frames delivered. */
static int reap_rx(struct netfront *nf, netfront_frame_fn on_frame, void *ctx)
{
    struct netfront_ring *r = &nf->rx;
    u64 prod = __atomic_load_n(&r->sring->rsp_prod, __ATOMIC_ACQUIRE);
    u64 avail = prod - r->rsp_cons;
    u64 outstanding = r->req_pushed - r->rsp_cons;
    if (avail > outstanding) {
        /* Nothing is consumed until rsp_prod is back in range (a replacement backend, or the
         * next publish, sets it right): the slots past the real responses still hold
         * requests.  Counted once per bad value. */
        if (prod + 1 != nf->rx_bad_prod) {
            nf->rx_bad_prod = prod + 1;
            rx_bad(nf, FAULT_EXTRA_RESPONSE,
                   "rsp_prod=%lu claims %lu responses after rsp_cons=%lu, but only %lu buffers "
                   "are posted (req_prod=%lu)",
                   (unsigned long)prod, (unsigned long)avail, (unsigned long)r->rsp_cons,
                   (unsigned long)outstanding, (unsigned long)r->req_pushed);
        }
        return 0;
    }
    int n = 0;
    while (r->rsp_cons != prod) {
        u64 index = r->rsp_cons;
        struct netif_rx_response rsp;
        read_slot(r, index, &rsp);
        u64 b = rsp.id & TAG_MASK;
        struct netfront_buf *rb = b < NETIF_RING_SLOTS ? &nf->rxb[b] : NULL;
        int repost = -1;
        if (!rb || rb->state != NETFRONT_BUF_INFLIGHT || rb->id != rsp.id) {
            repost = rx_buf_at(nf, index);
            rx_bad(nf, FAULT_UNKNOWN_ID,
                   "response %lu has id 0x%lx (buffer %lu, seq %lu), which matches no posted "
                   "buffer%s",
                   (unsigned long)index, (unsigned long)rsp.id, (unsigned long)b,
                   (unsigned long)(rsp.id >> NETFRONT_TAG_BITS),
                   rb && rb->state == NETFRONT_BUF_INFLIGHT ? " (a stale or duplicate id)" : "");
        } else if (rsp.offset != rx_offset(b)) {
            repost = (int)b;
            rx_bad(nf, FAULT_BAD_RESPONSE,
                   "response %lu (id 0x%lx) has offset 0x%x, but buffer %lu is at 0x%x",
                   (unsigned long)index, (unsigned long)rsp.id, (unsigned)rsp.offset,
                   (unsigned long)b, (unsigned)rx_offset(b));
        } else if (rsp.status != NETIF_STATUS_OKAY) {
            repost = (int)b;
            rx_bad(nf, FAULT_BAD_STATUS,
                   "response %lu (id 0x%lx) has status %d for a well-formed buffer: want 0",
                   (unsigned long)index, (unsigned long)rsp.id, (int)rsp.status);
        } else if (rsp.size < NETIF_MIN_FRAME || rsp.size > NETIF_MAX_FRAME) {
            repost = (int)b;
            rx_bad(nf, FAULT_BAD_RESPONSE,
                   "response %lu (id 0x%lx) has a frame of %u bytes: frames are %d..%d bytes%s",
                   (unsigned long)index, (unsigned long)rsp.id, (unsigned)rsp.size,
                   NETIF_MIN_FRAME, NETIF_MAX_FRAME,
                   rsp.size == NETIF_BUF_SIZE ? " (the slot may still hold the request)" : "");
        } else {
            u32 len = rsp.size;
            r->rsp_cons = index + 1;
            rb->state = NETFRONT_BUF_FREE; /* not posted while the caller looks at it */
            memcpy(nf->rx_copy, (const u8 *)nf->region + rx_offset(b), len);
            nf->rx_frames++;
            n++;
            if (on_frame)
                on_frame(ctx, nf->rx_copy, len);
            repost = (int)b;
        }
        r->rsp_cons = index + 1;
        if (repost >= 0) {
            post_rx(nf, (u64)repost);
            nf->rx_reposted++;
        }
    }
    return n;
}

/* rx responses are waiting (and rsp_prod is in range: an impossible one wakes nobody). */
static int rx_ready(struct netfront *nf)
{
    u64 prod = __atomic_load_n(&nf->rx.sring->rsp_prod, __ATOMIC_ACQUIRE);
    return prod != nf->rx.rsp_cons &&
           prod - nf->rx.rsp_cons <= nf->rx.req_pushed - nf->rx.rsp_cons;
}

/* tx responses are waiting (not while held: held responses are the kernel's to take back). */
static int tx_ready(struct netfront *nf)
{
    return !nf->held &&
           __atomic_load_n(&nf->tx.sring->rsp_prod, __ATOMIC_ACQUIRE) != nf->tx.rsp_cons;
}

/* Whether the next tx response should fire the port.  Only when the caller waits for its
 * frames to be taken (netfront_wait_tx), or while a stream is under way (8 of the 64 tx buffers
 * or more in flight), so that its buffers come back and a sender that got NETFRONT_E_BUSY wakes
 * as they free up.  Otherwise (a frame or two in flight: a request, an answer) a tx response is
 * reaped with the next rx response or send, and a request/answer exchange costs the guest one
 * upcall instead of two (Linux's xen-netfront likewise asks for tx events only part way through
 * what is outstanding).  Not arming leaves rsp_event behind rsp_prod: the backend's check
 * finds no event in what it pushes, and sends none. */
static int tx_event_wanted(const struct netfront *nf, int want_tx)
{
    return !nf->held && (want_tx || nf->tx_inflight >= NETIF_RING_SLOTS / 8);
}

/* RING_FINAL_CHECK_FOR_RESPONSES: non-zero if a response arrived meanwhile.  rx always; tx when
 * tx_event_wanted (and only while not held: held responses are the kernel's to take back). */
static int final_check(struct netfront *nf, int want_tx)
{
    __atomic_store_n(&nf->rx.sring->rsp_event, nf->rx.rsp_cons + 1, __ATOMIC_RELEASE);
    if (tx_event_wanted(nf, want_tx))
        __atomic_store_n(&nf->tx.sring->rsp_event, nf->tx.rsp_cons + 1, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return rx_ready(nf) || tx_ready(nf);
}

int netfront_poll(struct netfront *nf, netfront_frame_fn on_frame, void *ctx)
{
    if (nf->failed)
        return NETFRONT_E_FAILED;
    nf->upcalls = evtchn_upcalls(nf->dev.port) - nf->upcalls_base;
    int n = 0;
    /* a few rounds at most: a backend that never stops producing must not keep the caller
     * here (netfront_wait returns at once while responses are waiting) */
    for (int round = 0; round < 4; round++) {
        int t = reap_tx(nf);
        if (t < 0)
            return t;
        u64 rsp_before = nf->rx.rsp_cons;
        n += reap_rx(nf, on_frame, ctx);
        if (nf->failed) /* on_frame may have sent, and a send may have reaped a fault */
            return NETFRONT_E_FAILED;
        push(nf); /* the re-posted rx buffers (and whatever on_frame queued) */
        if (!t && nf->rx.rsp_cons == rsp_before && !final_check(nf, 0))
            break;
    }
    return n;
}

static int wait_port(struct netfront *nf, u64 timeout_ns, int want_tx)
{
    if (nf->failed)
        return NETFRONT_E_FAILED;
    if (rx_ready(nf) || tx_ready(nf) || final_check(nf, want_tx))
        return 0;
    nf->waits++;
    u64 got = evtchn_wait(nf->port_bit, timeout_ns);
    nf->upcalls = evtchn_upcalls(nf->dev.port) - nf->upcalls_base;
    return got || rx_ready(nf) || tx_ready(nf) ? 0 : NETFRONT_E_TIMEOUT;
}

int netfront_wait(struct netfront *nf, u64 timeout_ns)
{
    return wait_port(nf, timeout_ns, 0);
}

int netfront_wait_tx(struct netfront *nf, u64 timeout_ns)
{
    return wait_port(nf, timeout_ns, nf->tx_inflight != 0);
}
