/* isovisor guest runtime: the network-interface frontend (ipc/netif.py, docs/net.md).
 *
 * One struct netfront per vif.  netfront_open finds the interface in the
 * device table and runs the store handshake (devfront.h, as blkfront does),
 * initialises the tx and rx rings in the device region and posts every rx
 * buffer.  Then:
 *
 *     int r = netfront_send(nf, frame, len);   // NETFRONT_E_BUSY: all tx buffers in flight
 *     netfront_push(nf);                        // publish the batch, kick if asked
 *     for (;;) {
 *         int n = netfront_poll(nf, on_frame, ctx);  // frames delivered, or < 0: failed
 *         if (n == 0 && netfront_wait(nf, timeout_ns) == NETFRONT_E_TIMEOUT) ...;
 *     }
 *
 * tx: tx buffer t (region + NETIF_TX_BUF_OFFSET + t * NETIF_BUF_SIZE) belongs
 * to tx tag t; a tag is busy from netfront_send (or netfront_tx_get) until its
 * tx response is consumed.  rx: rx buffer b (region + NETIF_RX_BUF_OFFSET +
 * b * NETIF_BUF_SIZE) is posted with an rx request of NETIF_BUF_SIZE bytes and
 * re-posted as soon as its frame has been handed to the caller.
 *
 * Request ids are (seq << NETFRONT_TAG_BITS) | tag (rx: the buffer number),
 * seq a per-frontend counter starting at 1, so a stale or duplicated response
 * never matches a request in flight.
 *
 * Every response is copied out of its slot and validated; frames are copied
 * out of the shared buffer before the caller sees them.
 *   tx ring (offset 0, which the kernel treats like a block ring): an id that
 *   matches no tx request in flight, a status other than OKAY/ERROR, non-zero
 *   reserved fields, or an rsp_prod claiming more responses than requests
 *   outstanding are reported with HC_DEVICE_FAULT(..., FAULT_F_HOLD) and the
 *   tx side *holds* exactly like blkfront (docs/recovery.md, "Bad responses"):
 *   it consumes no tx response from the bad one on until HC_DEVICE_HELD says
 *   the kernel took them back and a new driver instance redoes them; rx goes
 *   on meanwhile.  If the kernel cannot hold, the frontend is failed and every
 *   later call returns NETFRONT_E_FAILED.  A tx response with status ERROR is
 *   not a fault: it is counted in tx_errors.
 *   rx ring: a bad rx response (unknown id, wrong offset, size outside
 *   NETIF_MIN_FRAME..NETIF_MAX_FRAME, status not OKAY) is dropped and counted
 *   in rx_bad; its buffer (found by the id, else by the ring index it was
 *   posted at) is re-posted.  An rsp_prod beyond the buffers posted is counted
 *   once per value, and nothing more is consumed from the rx ring until it is
 *   back in range.  The first of these is reported with HC_DEVICE_FAULT
 *   *without* the hold flag (the driver is replaced; the frontend goes on),
 *   later ones at most once per NETFRONT_RX_REPORT_INTERVAL_NS of virtual
 *   time, so one bad instance is blamed once and a bad replacement is still
 *   reported.
 *
 * Not reentrant: use a struct netfront from the main flow of the guest only
 * (never from an upcall handler).  The one exception: the on_frame callback of
 * netfront_poll may call netfront_send / netfront_tx_* / netfront_push (to
 * answer a frame), but not netfront_poll or netfront_wait.
 */
#ifndef ISOVISOR_NETFRONT_H
#define ISOVISOR_NETFRONT_H

#include "isovisor.h"
#include "isovisor_netif.h"

/* Bytes of the ring header (ipc/ring.py HEADER_BYTES): slots start here. */
#define NETFRONT_RING_HEADER 64
/* Low bits of a request id that carry the tag (tx) or buffer number (rx). */
#define NETFRONT_TAG_BITS 8
/* netfront_open's limit for the handshake when given 0 (virtual ns). */
#define NETFRONT_HANDSHAKE_TIMEOUT_NS (30ULL * 1000 * 1000 * 1000)
/* Bad rx responses after the first are reported at most this often. */
#define NETFRONT_RX_REPORT_INTERVAL_NS (1000ULL * 1000 * 1000)

/* Local failures (negative, distinct from the NETIF_STATUS_* a response carries). */
#define NETFRONT_E_FAILED (-100)  /* the frontend is failed (a tx-ring fault it cannot hold) */
#define NETFRONT_E_TIMEOUT (-101) /* nothing happened within the timeout */
#define NETFRONT_E_INVAL (-102)   /* bad arguments (frame length, tag) */
#define NETFRONT_E_BUSY (-103)    /* every tx buffer is in flight: poll, then try again */

/* The wire format (little-endian; natural alignment gives ipc/netif.py's offsets). */
struct netif_tx_request {
    u64 id;
    u32 offset; /* bytes from the start of the region, inside the tx buffer area */
    u16 size;   /* frame bytes */
    u16 flags;  /* 0 */
};

struct netif_tx_response {
    u64 id;
    i16 status; /* NETIF_STATUS_OKAY or NETIF_STATUS_ERROR */
    u16 reserved;
    u32 reserved2;
};

struct netif_rx_request {
    u64 id;
    u32 offset; /* the buffer, inside the rx buffer area */
    u16 size;   /* its capacity (NETIF_BUF_SIZE) */
    u16 flags;  /* 0 */
};

struct netif_rx_response {
    u64 id;     /* the rx request's */
    u32 offset; /* the rx request's */
    u16 size;   /* frame bytes written at offset */
    i16 status;
};

/* The shared ring header (Xen io/ring.h; free-running u64 indices). */
struct netif_sring_header {
    u64 req_prod;  /* frontend: requests [0, req_prod) are published */
    u64 req_event; /* backend: notify me when req_prod passes this */
    u64 rsp_prod;  /* backend: responses [0, rsp_prod) are published */
    u64 rsp_event; /* frontend: notify me when rsp_prod passes this */
    u64 reserved[4];
};

/* The frontend's private view of one ring (never taken from shared memory). */
struct netfront_ring {
    volatile struct netif_sring_header *sring;
    volatile u8 *slots;
    u64 req_prod_pvt; /* next ring index to fill */
    u64 req_pushed;   /* req_prod as last published */
    u64 rsp_cons;     /* next response to consume */
};

/* Buffer states (tx tags and rx buffers). */
enum {
    NETFRONT_BUF_FREE = 0,  /* tx: free; rx: not posted */
    NETFRONT_BUF_RESERVED,  /* tx: taken by netfront_tx_get, not queued yet */
    NETFRONT_BUF_QUEUED,    /* in a ring slot, not published yet */
    NETFRONT_BUF_INFLIGHT,  /* published: a response may name it */
};

struct netfront_buf {
    u8 state;     /* NETFRONT_BUF_* */
    u16 len;      /* tx: frame bytes */
    u64 id;       /* the request's id */
    u64 ring_idx; /* ring index of the request */
};

struct netfront {
    struct isv_device dev;
    char backend[STORE_PATH_MAX + 1]; /* the backend directory (absolute) */
    char frontend[64];                /* "device/vif/<devid>" (relative to home) */
    u8 *region;
    struct netfront_ring tx, rx;
    u64 port_bit;

    /* the interface, from the frontend directory */
    u8 mac[6];          /* `mac` */
    u8 ip[4];           /* `ip`, network byte order (valid if has_ip) */
    int has_ip;
    char mac_str[18];   /* "02:00:00:00:00:01" */
    char ip_str[16];    /* "198.18.0.2", or "" */

    int connected;
    int failed; /* 0, or the FAULT_* code that failed it (-1: failed otherwise) */
    int held;   /* a bad tx response was reported; waiting for the kernel to take it back */

    struct netfront_buf txb[NETIF_RING_SLOTS];
    struct netfront_buf rxb[NETIF_RING_SLOTS];
    /* rx: which buffer / id the request at ring index i (mod RING_SLOTS) posted */
    u8 rx_slot_buf[NETIF_RING_SLOTS];
    u64 rx_slot_id[NETIF_RING_SLOTS];
    u64 next_seq;  /* id sequence number of the next request (tx and rx) */
    u64 tx_inflight; /* tx tags reserved, queued or in flight */
    u64 tx_cursor;   /* where the search for a free tx tag starts */

    /* statistics */
    u64 tx_frames;    /* tx responses OKAY (frames the backend took) */
    u64 tx_errors;    /* tx responses ERROR */
    u64 tx_queued;    /* tx requests queued */
    u64 tx_busy;      /* netfront_send / netfront_tx_get found no free tx buffer */
    u64 rx_frames;    /* frames handed to on_frame */
    u64 rx_bad;       /* bad rx responses dropped */
    u64 rx_reposted;  /* rx buffers re-posted */
    u64 kicks;        /* HC_EVTCHN_SEND calls */
    u64 waits;        /* times netfront_wait slept */
    u64 holds;        /* bad tx responses held for a new driver instance to redo */
    u64 rx_reports;   /* bad rx responses reported with HC_DEVICE_FAULT */
    u64 rx_last_report_ns;
    u64 rx_bad_prod;  /* 1 + the last impossible rx rsp_prod counted (each counted once) */
    u64 upcalls;      /* upcalls that delivered this port since open */
    u64 upcalls_base;

    /* a private copy of the frame being delivered (the shared buffer is the backend's to
     * scribble on); 16-byte aligned */
    u8 rx_copy[NETIF_BUF_SIZE] __attribute__((aligned(16)));
};

/* Called with each good frame: frame points to a private copy, valid only during the call. */
typedef void (*netfront_frame_fn)(void *ctx, const u8 *frame, u32 len);

/* Find the vif `name` ("eth0"; NULL or "" = the first network interface), read
 * its `mac` (and `ip`, if present) from the frontend directory
 * (device/vif/<devid>; without a `mac` there, the backend directory's `mac`,
 * once the backend is in InitWait) and connect (the handshake of
 * docs/devices.md; rx buffers posted before the frontend says Initialised).
 * timeout_ns limits the handshake (0: NETFRONT_HANDSHAKE_TIMEOUT_NS).  0, or
 * a negative errno-style value after printing the reason. */
int netfront_open(struct netfront *nf, const char *name, u64 timeout_ns);

/* Copy frame (len bytes, NETIF_MIN_FRAME..NETIF_MAX_FRAME) into a free tx
 * buffer and queue a tx request for it (published by netfront_push).  If no
 * buffer is free it first consumes the tx responses already published.
 * 0, NETFRONT_E_BUSY (every tx buffer in flight: poll / wait, then retry),
 * NETFRONT_E_INVAL (bad length) or NETFRONT_E_FAILED. */
int netfront_send(struct netfront *nf, const void *frame, u32 len);
/* Zero-copy variant: reserve a free tx tag (or NETFRONT_E_BUSY / _FAILED),
 * build the frame in netfront_tx_buf(nf, tag) (NETIF_BUF_SIZE bytes), then
 * netfront_tx_queue it (0, NETFRONT_E_INVAL for a bad length or a tag that is
 * not reserved: the tag stays reserved, or NETFRONT_E_FAILED), or give it back
 * unsent with netfront_tx_put. */
int netfront_tx_get(struct netfront *nf);
u8 *netfront_tx_buf(struct netfront *nf, int tag);
int netfront_tx_queue(struct netfront *nf, int tag, u32 len);
void netfront_tx_put(struct netfront *nf, int tag);
/* Publish the queued tx requests (and rx re-posts, if any) with
 * RING_PUSH_REQUESTS_AND_CHECK_NOTIFY: kick the backend only if a new req_prod
 * passed its req_event. */
void netfront_push(struct netfront *nf);
/* Kick the backend unconditionally: 0 or -errno. */
long netfront_kick(struct netfront *nf);

/* Consume the published rx responses (calling on_frame, which may be NULL,
 * for each good frame, then re-posting its buffer) and tx responses (freeing
 * their buffers); publish the re-posted rx buffers (notifying only if asked);
 * then RING_FINAL_CHECK_FOR_RESPONSES on both rings (rsp_event = rsp_cons + 1,
 * look again).  Returns the frames delivered, or NETFRONT_E_FAILED after a
 * tx-ring fault that could not be held (reported with HC_DEVICE_FAULT; frames
 * before it were delivered).  While the tx side holds, rx goes on and tx
 * responses wait. */
int netfront_poll(struct netfront *nf, netfront_frame_fn on_frame, void *ctx);
/* Sleep until the device's port fires (an rx response, a kick, the kernel
 * taking held responses back) or timeout_ns passes (POLL_FOREVER: no limit; 0:
 * just check).  Returns at once if responses are already waiting.  0,
 * NETFRONT_E_TIMEOUT or NETFRONT_E_FAILED.  Spurious returns are possible:
 * poll, then wait again.  A tx response wakes it only while 8 of the 64 tx
 * buffers or more are in flight (a stream; a sender that got NETFRONT_E_BUSY
 * wakes as they free up); otherwise tx responses are reaped with the next rx
 * response or send, and an exchange costs one upcall, not two. */
int netfront_wait(struct netfront *nf, u64 timeout_ns);
/* netfront_wait, and any tx response wakes it too: for a caller that waits
 * for its frames to be taken (netfront_tx_inflight going to 0). */
int netfront_wait_tx(struct netfront *nf, u64 timeout_ns);

/* tx tags reserved, queued or in flight (0: every tx response consumed). */
u64 netfront_tx_inflight(const struct netfront *nf);
/* Non-zero if a tx buffer is free now (netfront_send would not be BUSY). */
int netfront_tx_ready(const struct netfront *nf);

/* Text helpers.  parse: 0, or -EINVAL for anything but the exact form.  MAC:
 * six two-digit hex bytes "02:00:00:00:00:01"; IPv4: "198.18.0.2" (network
 * byte order out).  format: buf of at least 18 / 16 bytes; returns buf. */
int netfront_parse_mac(const char *s, u8 mac[6]);
int netfront_parse_ipv4(const char *s, u8 ip[4]);
char *netfront_format_mac(const u8 mac[6], char *buf);
char *netfront_format_ipv4(const u8 ip[4], char *buf);

#endif /* ISOVISOR_NETFRONT_H */
