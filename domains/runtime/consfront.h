/* isovisor guest runtime: the console frontend (ipc/consif.py, drivers/console).
 *
 * The console device (kind DEV_KIND_CONSOLE, named "console" in the device
 * table) is one page with two byte rings: `out` (guest -> console backend,
 * which appends it to the domain's log file and to live readers) and `in`
 * (input from the backend).  Indices are free-running u64 byte counts.
 *
 *     struct consfront con;
 *     if (consfront_open(&con, CONSFRONT_HANDSHAKE_TIMEOUT_NS) == 0) {
 *         consfront_write(&con, "hello\n", 6);     // blocks while the ring is full
 *         char buf[64];
 *         long n = consfront_read(&con, buf, sizeof buf); // non-blocking: 0 if none
 *     }
 *
 * Output is never dropped: consfront_write waits on the device's event
 * channel while the ring is full (the backend notifies when it consumes),
 * for ever by default (write_timeout_ns).  While no backend runs (a restart),
 * output waits in the ring; a replacement backend picks it up.
 *
 * The backend is untrusted: an out_cons or in_prod that claims more than the
 * ring holds is reported with HC_DEVICE_FAULT and fails the frontend (every
 * later call returns CONSFRONT_E_FAILED).  Diagnostics go straight to
 * HC_CONSOLE_WRITE, never through printf, so the runtime may route its own
 * console output here.
 *
 * Not reentrant: use a struct consfront from the main flow of the guest only
 * (never from an upcall handler).
 */
#ifndef ISOVISOR_CONSFRONT_H
#define ISOVISOR_CONSFRONT_H

#include "isovisor.h"

/* The protocol (ipc/consif.py).  The build generates isovisor_consif.h from
 * it once the console protocol is registered there; consfront.c then checks
 * these copies against it. */
#define CONSFRONT_OUT_PROD 0x00
#define CONSFRONT_OUT_CONS 0x10
#define CONSFRONT_IN_PROD 0x20
#define CONSFRONT_IN_CONS 0x30
#define CONSFRONT_HEADER_BYTES 0x100
#define CONSFRONT_OUT_OFFSET 0x100
#define CONSFRONT_OUT_SIZE 2048
#define CONSFRONT_IN_OFFSET 0x900
#define CONSFRONT_IN_SIZE 1024
#define CONSFRONT_WINDOW_BYTES 0x1000
/* The device's name in the device table. */
#define CONSFRONT_DEVICE_NAME "console"

#ifndef DEV_KIND_CONSOLE
#define DEV_KIND_CONSOLE 3
#endif

/* consfront_open's usual limit for the whole handshake (virtual ns). */
#define CONSFRONT_HANDSHAKE_TIMEOUT_NS (30ULL * 1000 * 1000 * 1000)

/* Local failures (besides negative errno values from the handshake). */
#define CONSFRONT_E_FAILED (-120)  /* the frontend is failed (a backend fault) */
#define CONSFRONT_E_TIMEOUT (-121) /* nothing moved within write_timeout_ns */
#define CONSFRONT_E_INVAL (-122)   /* not connected, or bad arguments */

/* The shared words at the start of the page (Xen io/ring.h's hold-off rule:
 * a producer notifies only when its new index passes the peer's event word). */
struct consif_header {
    u64 out_prod;       /* frontend: output [0, out_prod) is published */
    u64 out_event;      /* backend: kick me when out_prod passes this */
    u64 out_cons;       /* backend: output [0, out_cons) is in the log */
    u64 out_cons_event; /* frontend: notify me when out_cons passes this */
    u64 in_prod;        /* backend: input [0, in_prod) is published */
    u64 in_event;       /* frontend: notify me when in_prod passes this */
    u64 in_cons;        /* frontend: input [0, in_cons) has been read */
    u64 in_cons_event;  /* backend: kick me when in_cons passes this */
};

struct consfront {
    struct isv_device dev;
    char backend[STORE_PATH_MAX + 1]; /* the backend directory (absolute) */
    char frontend[64];                /* "device/console/<devid>" (relative to home) */
    volatile struct consif_header *hdr;
    volatile u8 *out; /* region + CONSFRONT_OUT_OFFSET */
    volatile u8 *in;  /* region + CONSFRONT_IN_OFFSET */
    u64 port_bit;
    u64 out_prod; /* private: the next output byte's index */
    u64 in_cons;  /* private: the next input byte's index */
    int connected;
    int failed; /* 0, or non-zero once failed (or before connected) */

    /* consfront_write gives up (returning what it wrote) after this long
     * without room in the ring; POLL_FOREVER (the default): never. */
    u64 write_timeout_ns;

    /* statistics */
    u64 bytes_out; /* bytes published in out */
    u64 bytes_in;  /* bytes taken from in */
    u64 kicks;     /* HC_EVTCHN_SEND calls */
    u64 waits;     /* times a write slept on a full ring */
};

/* Find the "console" device and connect to it (docs/devices.md, Handshake;
 * frontend directory device/console/<devid>).  0, or a negative errno-style
 * value after reporting the reason on the kernel console. */
int consfront_open(struct consfront *c, u64 timeout_ns);

/* Copy len bytes into `out`, publishing as they fit and kicking the backend
 * when it asked; while the ring is full, sleep on the event channel.  Returns
 * len, or fewer bytes on a timeout (write_timeout_ns) or a backend fault
 * after some were written, else CONSFRONT_E_TIMEOUT / _FAILED / _INVAL. */
long consfront_write(struct consfront *c, const char *buf, u32 len);

/* Take up to max bytes of input, non-blocking: the number taken (0: none),
 * or CONSFRONT_E_FAILED / _INVAL. */
long consfront_read(struct consfront *c, char *buf, u32 max);

/* Wait until input is available or timeout_ns passes (POLL_FOREVER: no
 * limit): 1 if input is there, 0 on timeout, or CONSFRONT_E_FAILED / _INVAL. */
int consfront_wait_input(struct consfront *c, u64 timeout_ns);

#endif /* ISOVISOR_CONSFRONT_H */
