/* isovisor guest runtime: the entropy-device frontend (devices/rng.py, virtio-rng-like).
 *
 * One struct rngfront per entropy device.  rngfront_open finds the device in
 * the device table, runs the store handshake (devfront.h, as blkfront does)
 * and initialises the ring in the device region.  Then
 *
 *     long n = rngfront_read(rf, buf, len);    // len, or a RNGFRONT_E_* value
 *
 * fills buf with len random bytes: it splits them into requests of at most
 * RNGIF_MAX_REQUEST_BYTES, keeps up to rf->queue_depth of them in flight, and
 * copies each answer out of the shared data area once its response is checked.
 *
 * Tag t owns ring ids ending in t and the data-area buffer
 * region + RNGIF_DATA_OFFSET + t * RNGIF_MAX_REQUEST_BYTES.  Request ids are
 * (seq << RNGFRONT_TAG_BITS) | tag with seq a per-request counter starting at
 * 1, so a stale or duplicated response never matches a request in flight.
 *
 * Every response is validated: an id that matches no request in flight (also
 * a duplicate), non-zero reserved bits, a status other than OKAY / ERROR, a
 * length other than the request's on OKAY (or non-zero on ERROR), and an
 * rsp_prod claiming more responses than requests outstanding are backend
 * faults, reported with HC_DEVICE_FAULT and printed.  As in blkfront, the
 * frontend then *holds* if the kernel can have the requests redone by a new
 * driver instance (docs/recovery.md, "Bad responses"): it consumes nothing
 * from the bad response on until HC_DEVICE_HELD says the kernel took them
 * back, and the read goes on as if nothing had happened.  Otherwise it is
 * failed: every later call returns RNGFRONT_E_FAILED.
 *
 * A response with RNGIF_STATUS_ERROR is no fault (the backend could not get
 * the bytes, or the kernel answers for a failed driver): it is counted in
 * `errors` and makes that read return RNGFRONT_E_IO.
 *
 * Not reentrant: use a struct rngfront from the main flow of the guest only
 * (never from an upcall handler).
 */
#ifndef ISOVISOR_RNGFRONT_H
#define ISOVISOR_RNGFRONT_H

#include "isovisor.h"
#include "isovisor_rngif.h"

/* Low bits of a request id that carry the tag. */
#define RNGFRONT_TAG_BITS 8
/* A default limit for the whole handshake (virtual ns). */
#define RNGFRONT_HANDSHAKE_TIMEOUT_NS (30ULL * 1000 * 1000 * 1000)

/* Local failures (the numbers are blkfront's). */
#define RNGFRONT_E_FAILED (-100)  /* the frontend is failed (a backend fault) */
#define RNGFRONT_E_TIMEOUT (-101) /* no response within io_timeout_ns */
#define RNGFRONT_E_INVAL (-102)   /* bad arguments */
#define RNGFRONT_E_IO (-104)      /* a response said RNGIF_STATUS_ERROR */

/* The wire format (little-endian, natural alignment gives devices/rng.py's offsets). */
struct rngif_request {
    u64 id;
    u32 offset; /* bytes from the start of the region, inside the data area */
    u32 length; /* 1..RNGIF_MAX_REQUEST_BYTES */
};

struct rngif_response {
    u64 id;
    i16 status; /* RNGIF_STATUS_OKAY or RNGIF_STATUS_ERROR */
    u16 reserved;
    u32 length; /* bytes written (0 on error) */
};

/* The shared ring header (Xen io/ring.h; free-running u64 indices). */
struct rngif_sring_header {
    u64 req_prod;  /* frontend: requests [0, req_prod) are published */
    u64 req_event; /* backend: notify me when req_prod passes this */
    u64 rsp_prod;  /* backend: responses [0, rsp_prod) are published */
    u64 rsp_event; /* frontend: notify me when rsp_prod passes this */
    u64 reserved[4];
};

struct rngfront_tag {
    u8 in_use;  /* 0 free, 1 published (a response may name it) */
    u32 length; /* bytes asked for */
    u64 id;     /* the request's id */
    u8 *dest;   /* where the bytes go (the current read's buffer), NULL: drop them */
};

struct rngfront {
    struct isv_device dev;
    char backend[STORE_PATH_MAX + 1]; /* the backend directory (absolute) */
    char frontend[64];                /* "device/rng/<devid>" (relative to home) */
    u8 *region;
    volatile struct rngif_sring_header *sring;
    volatile u8 *slots; /* region + RNGIF_HEADER_BYTES */
    u64 ntags;          /* usable tags: min(RING_SLOTS, data area / MAX_REQUEST_BYTES) */
    u64 port_bit;

    int connected;
    int failed; /* 0, or the FAULT_* code that failed it (-1: failed otherwise) */
    int held;   /* a bad response was reported; waiting for the kernel to take it back */

    struct rngfront_tag tags[RNGIF_RING_SLOTS];
    u64 req_prod_pvt; /* next ring index to fill */
    u64 req_pushed;   /* req_prod as last published */
    u64 rsp_cons;     /* next response to consume */
    u64 next_seq;     /* id sequence number of the next request */

    /* requests rngfront_read keeps in flight: 1..ntags (rngfront_open sets ntags) */
    u64 queue_depth;
    /* rngfront_read gives up after this long without an event (POLL_FOREVER:
     * never; the default) */
    u64 io_timeout_ns;

    /* statistics */
    u64 submitted; /* requests published */
    u64 completed; /* responses consumed */
    u64 errors;    /* responses with RNGIF_STATUS_ERROR */
    u64 bytes;     /* random bytes delivered */
    u64 kicks;     /* HC_EVTCHN_SEND calls */
    u64 waits;     /* times the frontend slept */
    u64 upcalls;   /* upcalls that delivered this port since open */
    u64 upcalls_base;
    u64 holds; /* bad responses held for a new driver instance to redo */
};

/* Find vdev ("rng0"; NULL or "" = the first entropy device) and connect to it
 * within timeout_ns (virtual ns; e.g. RNGFRONT_HANDSHAKE_TIMEOUT_NS).  0, or
 * a negative errno-style value after printing the reason. */
int rngfront_open(struct rngfront *rf, const char *vdev, u64 timeout_ns);

/* Fill buf with len random bytes (blocking).  Returns len, or
 * RNGFRONT_E_IO (some request was answered with STATUS_ERROR; the other bytes
 * may have arrived, buf is not to be used), RNGFRONT_E_TIMEOUT (requests of
 * this read still in flight are abandoned: their late responses are consumed
 * and dropped), RNGFRONT_E_FAILED or RNGFRONT_E_INVAL. */
long rngfront_read(struct rngfront *rf, void *buf, u64 len);

/* Requests published and not answered yet (abandoned ones included). */
u64 rngfront_outstanding(const struct rngfront *rf);

#endif /* ISOVISOR_RNGFRONT_H */
