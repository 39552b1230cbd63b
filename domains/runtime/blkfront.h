/* isovisor guest runtime: the block-device frontend (docs/devices.md, ipc/blkif.py).
 *
 * One struct blkfront per disk.  blkfront_open finds the disk in the device
 * table, runs the store handshake and initialises the ring in the device
 * region.  Requests are then issued through *tags*: tag t owns the data buffer
 * region + BLKIF_DATA_OFFSET + t * BLKIF_MAX_REQUEST_BYTES, so a tag is also
 * the unit of buffer ownership.
 *
 *     int t = blkfront_get_tag(bf);           // -1: all tags busy
 *     memcpy(blkfront_tag_buf(bf, t), data, n);
 *     blkfront_queue(bf, t, BLKIF_OP_WRITE, sector, n);
 *     blkfront_push(bf);                       // publish the batch, kick if asked
 *     while (!done) {
 *         if (blkfront_poll(bf, on_done, ctx) < 0) ...;  // a backend fault
 *         else if (!done && blkfront_wait(bf) < 0) ...;  // timeout or fault
 *     }
 *
 * Request ids are (seq << BLKFRONT_TAG_BITS) | tag with seq a per-request
 * counter starting at 1, so a stale or duplicated response never matches a
 * request in flight.  Every response is validated (count, id, op, status);
 * a violation is reported with HC_DEVICE_FAULT and printed.  If the kernel
 * can have the requests redone by a new driver instance (a supervised
 * process driver, docs/recovery.md), the frontend *holds*: it consumes
 * nothing from the bad response on, until HC_DEVICE_HELD says the kernel
 * has taken those responses back; then the redone responses arrive as if
 * nothing had happened.  Otherwise the frontend is failed: every later call
 * returns BLKFRONT_E_FAILED.
 *
 * Not reentrant: use a struct blkfront from the main flow of the guest only
 * (never from an upcall handler).
 */
#ifndef ISOVISOR_BLKFRONT_H
#define ISOVISOR_BLKFRONT_H

#include "isovisor.h"
#include "isovisor_blkif.h"

/* Bytes of the ring header (ipc/ring.py HEADER_BYTES): slots start here. */
#define BLKFRONT_RING_HEADER 64
/* Low bits of a request id that carry the tag. */
#define BLKFRONT_TAG_BITS 8
/* blkfront_open's default limit for the whole handshake (virtual ns). */
#define BLKFRONT_HANDSHAKE_TIMEOUT_NS (30ULL * 1000 * 1000 * 1000)

/* Local failures, distinct from the BLKIF_STATUS_* a response carries. */
#define BLKFRONT_E_FAILED (-100)  /* the frontend is failed (a backend fault) */
#define BLKFRONT_E_TIMEOUT (-101) /* no response within io_timeout_ns */
#define BLKFRONT_E_INVAL (-102)   /* bad arguments, or nothing to wait for */
#define BLKFRONT_E_BUSY (-103)    /* no free tag / other requests outstanding */

/* The wire format (little-endian, natural alignment gives ipc/blkif.py's offsets). */
struct blkif_segment {
    u32 offset; /* bytes from the start of the region */
    u32 length; /* bytes */
};

struct blkif_request {
    u64 id;
    u8 op;
    u8 nr_segments;
    u16 reserved;
    u32 nr_sectors; /* DISCARD only */
    u64 sector;     /* first 512-byte sector */
    struct blkif_segment seg[BLKIF_MAX_SEGMENTS];
};

struct blkif_response {
    u64 id;
    u8 op;
    u8 reserved;
    i16 status;
    u32 reserved2;
};

/* The shared ring header (Xen io/ring.h; free-running u64 indices). */
struct blkif_sring_header {
    u64 req_prod;  /* frontend: requests [0, req_prod) are published */
    u64 req_event; /* backend: notify me when req_prod passes this */
    u64 rsp_prod;  /* backend: responses [0, rsp_prod) are published */
    u64 rsp_event; /* frontend: notify me when rsp_prod passes this */
    u64 reserved[4];
};

/* Tag states. */
enum {
    BLKFRONT_TAG_FREE = 0,
    BLKFRONT_TAG_RESERVED, /* taken by blkfront_get_tag, not queued yet */
    BLKFRONT_TAG_QUEUED,   /* in a ring slot, not published yet */
    BLKFRONT_TAG_INFLIGHT, /* published: a response may name it */
};

struct blkfront_tag {
    u8 in_use;    /* BLKFRONT_TAG_* */
    u8 op;        /* the request's op (the response must echo it) */
    u32 nbytes;   /* bytes of the request (sectors * 512 for DISCARD) */
    u64 id;       /* the request's id */
    u64 sector;   /* the request's first sector */
    u64 expected; /* free for the caller (e.g. the data a read should return) */
    u64 ring_idx; /* ring index of the request */
};

struct blkfront {
    struct isv_device dev;
    char backend[STORE_PATH_MAX + 1]; /* the backend directory (absolute) */
    char frontend[64];                /* "device/vbd/<devid>" (relative to home) */
    u8 *region;
    volatile struct blkif_sring_header *sring;
    volatile u8 *slots; /* region + BLKIF_RING_OFFSET + BLKFRONT_RING_HEADER */
    u64 ntags;          /* usable tags: min(RING_SLOTS, data area / MAX_REQUEST_BYTES) */
    u64 port_bit;

    /* disk parameters from the backend */
    u64 sectors;     /* disk size in 512-byte sectors (blkif's unit) */
    u64 sector_size; /* the backend's `sector-size` */
    int read_only;   /* `info` bit 0, or backend `mode` = r */
    int feature_flush;
    int feature_discard;

    int connected;
    int failed; /* 0, or the FAULT_* code that failed it (-1: failed otherwise) */
    int held;   /* a bad response was reported; waiting for the kernel to take it back */

    struct blkfront_tag tags[BLKIF_RING_SLOTS];
    u64 req_prod_pvt; /* next ring index to fill */
    u64 req_pushed;   /* req_prod as last published */
    u64 rsp_cons;     /* next response to consume */
    u64 next_seq;     /* id sequence number of the next request */

    /* blkfront_wait gives up after this long without an event (POLL_FOREVER:
     * never; the default) */
    u64 io_timeout_ns;

    /* statistics */
    u64 submitted; /* requests published */
    u64 completed; /* responses consumed */
    u64 kicks;     /* HC_EVTCHN_SEND calls */
    u64 waits;     /* times blkfront_wait slept */
    u64 upcalls;   /* upcalls that delivered this port since open */
    u64 upcalls_base;
    u64 holds; /* bad responses held for a new driver instance to redo */
};

/* Called with a response: tag is still owned by the request during the call
 * (its buffer holds a READ's data) and is freed when the callback returns.
 * status is BLKIF_STATUS_OKAY, _ERROR or _EOPNOTSUPP. */
typedef void (*blkfront_done_fn)(void *ctx, int tag, int status);

/* Find vdev ("xvda"; NULL or "" = the first block device) and connect to it
 * (docs/devices.md, Handshake).  0, or a negative errno-style value after
 * printing the reason. */
int blkfront_open(struct blkfront *bf, const char *vdev);
/* The same with a time limit for the handshake (virtual ns). */
int blkfront_open_timeout(struct blkfront *bf, const char *vdev, u64 timeout_ns);

/* A free tag (now reserved for the caller), or -1 if none (or failed). */
int blkfront_get_tag(struct blkfront *bf);
/* Give back a reserved tag that was not queued. */
void blkfront_put_tag(struct blkfront *bf, int tag);
/* The tag's data buffer (BLKIF_MAX_REQUEST_BYTES bytes in the region). */
void *blkfront_tag_buf(struct blkfront *bf, int tag);
/* Byte offset of the tag's buffer from the start of the region. */
u32 blkfront_tag_offset(struct blkfront *bf, int tag);

/* Put a request for a reserved tag into the next ring slot (not published
 * until blkfront_push).  READ/WRITE: one segment, the tag's buffer, nbytes a
 * non-zero multiple of 512 up to BLKIF_MAX_REQUEST_BYTES.  FLUSH: nbytes is
 * ignored.  DISCARD: nr_sectors = nbytes / 512, no segments.  Arguments that
 * break these rules crash the domain (a bug in the caller); on a failed
 * frontend it does nothing. */
void blkfront_queue(struct blkfront *bf, int tag, u8 op, u64 sector, u64 nbytes);
/* Put *req into the next ring slot verbatim (for tests of the backend's
 * checks), except the id, which blkfront assigns.  0, or BLKFRONT_E_INVAL
 * (tag not reserved) / BLKFRONT_E_FAILED. */
int blkfront_queue_raw(struct blkfront *bf, int tag, const struct blkif_request *req);
/* Publish the queued requests (RING_PUSH_REQUESTS_AND_CHECK_NOTIFY): kick
 * the backend only if the new req_prod passed its req_event. */
void blkfront_push(struct blkfront *bf);
/* Kick the backend unconditionally: 0 or -errno. */
long blkfront_kick(struct blkfront *bf);

/* Consume the published responses, calling done (may be NULL) for each.
 * Returns how many were consumed, or BLKFRONT_E_FAILED on a backend fault
 * (reported with HC_DEVICE_FAULT; the responses before it were delivered).
 * While the frontend holds after a bad response, it returns 0. */
int blkfront_poll(struct blkfront *bf, blkfront_done_fn done, void *ctx);
/* Return when a response may be ready (RING_FINAL_CHECK_FOR_RESPONSES, then
 * sleep on the port): 0, BLKFRONT_E_TIMEOUT, BLKFRONT_E_FAILED, or
 * BLKFRONT_E_INVAL if no request is published and unanswered. */
int blkfront_wait(struct blkfront *bf);
/* Requests queued or in flight. */
u64 blkfront_outstanding(const struct blkfront *bf);

/* Synchronous I/O (nothing else may be outstanding): copies buf in (WRITE)
 * or out (READ, on OKAY) through a tag buffer; buf may be NULL for FLUSH and
 * DISCARD (nbytes = bytes to discard).  Returns the response status
 * (BLKIF_STATUS_*), or a BLKFRONT_E_* value. */
int blkfront_rw(struct blkfront *bf, u8 op, u64 sector, void *buf, u64 nbytes);

/* Disk size in bytes (sectors * BLKIF_SECTOR_SIZE). */
u64 blkfront_disk_bytes(const struct blkfront *bf);
/* "read", "write", "flush", "discard" or "op<N>". */
const char *blkfront_op_name(u8 op, char *buf, u64 buflen);

#endif /* ISOVISOR_BLKFRONT_H */
