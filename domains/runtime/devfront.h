/* isovisor guest runtime: what every device frontend does the same way
 * (docs/devices.md, Handshake): blkfront.c, netfront.c and consfront.c use it.
 *
 * A frontend describes its kind once, in a struct devfront_class (the word
 * its messages start with, the device kind, the store class), and runs its
 * open() through a struct devfront, which points at the frontend's own `dev`,
 * `frontend` and `backend` fields (DEVFRONT_INIT):
 *
 *     static const struct devfront_class blk_class = {
 *         .who = "blkfront", .what = "block device", .dir = "vbd", .kind = DEV_KIND_VBD};
 *     struct devfront df = DEVFRONT_INIT(&blk_class, bf);
 *     int rc = devfront_find(&df, vdev);            // the device table entry -> bf->dev
 *     ... check bf->dev.region_size, lay out the ring ...
 *     rc = devfront_start(&df, timeout_ns);         // device/vbd/<devid>, its `backend`
 *     rc = devfront_wait_backend(&df, DEVFRONT_ST_INIT_WAIT, DEVFRONT_ST_CONNECTED);
 *     ... read the backend's parameters, initialise the ring ...
 *     rc = devfront_connect(&df);                   // Initialised, backend Connected, Connected
 *
 * Every step returns 0 or a negative errno-style value, after saying why on
 * the console as "<who>: <device>: ...".  Once connected, devfront_notify
 * (kick the backend), devfront_fault (report a backend fault) and
 * devfront_held (is the kernel still holding?) say why they failed too.
 * Rings, response validation and what to do on a hold stay in each frontend.
 *
 * Messages go through printf, or, for a class with raw_console set, straight
 * to HC_CONSOLE_WRITE (for a frontend that printf itself may be writing to).
 *
 * This header is not included by isovisor.h: only frontends need it.
 */
#ifndef ISOVISOR_DEVFRONT_H
#define ISOVISOR_DEVFRONT_H

#include "isovisor.h"

/* XenbusState numbers (ipc.store.DevState). */
enum {
    DEVFRONT_ST_UNKNOWN = 0,
    DEVFRONT_ST_INITIALISING = 1,
    DEVFRONT_ST_INIT_WAIT = 2,
    DEVFRONT_ST_INITIALISED = 3,
    DEVFRONT_ST_CONNECTED = 4,
    DEVFRONT_ST_CLOSING = 5,
    DEVFRONT_ST_CLOSED = 6,
};

/* What is fixed for one kind of frontend. */
struct devfront_class {
    const char *who;  /* "blkfront": the first word of every message */
    const char *what; /* "block device": the kind, in messages */
    const char *dir;  /* "vbd": the frontend directory is device/<dir>/<devid> */
    u64 kind;         /* DEV_KIND_VBD */
    int raw_console;  /* say things with HC_CONSOLE_WRITE, never printf */
};

/* One frontend's handshake.  dev, frontend and backend are the frontend's own
 * storage (set them up with DEVFRONT_INIT); deadline and upcalls_base are set
 * by devfront_start. */
struct devfront {
    const struct devfront_class *cls;
    struct isv_device *dev; /* the device-table entry (devfront_find fills it) */
    char *frontend;         /* "device/<dir>/<devid>", relative to home */
    u64 frontend_size;
    char *backend; /* the backend directory (absolute), from the frontend's `backend` */
    u64 backend_size;
    u64 deadline;     /* when the handshake gives up (virtual ns) */
    u64 upcalls_base; /* evtchn_upcalls(port) right after evtchn_init */
};

/* A struct devfront for frontend f (a pointer to a struct with members dev,
 * frontend[] and backend[]) of class c. */
#define DEVFRONT_INIT(c, f)                                                                      \
    {                                                                                            \
        .cls = (c), .dev = &(f)->dev, .frontend = (f)->frontend,                                 \
        .frontend_size = sizeof(f)->frontend, .backend = (f)->backend,                           \
        .backend_size = sizeof(f)->backend,                                                      \
    }

/* "Unknown", "Initialising", ..., "Closed", or "invalid". */
const char *devfront_state_name(u64 state);

/* Say "<who>: " and the rest on the console (printf, or HC_CONSOLE_WRITE for a
 * raw_console class). */
void devfront_say(const struct devfront_class *c, const char *fmt, ...) PRINTF_LIKE(2, 3);

/* Find the device named `name` (NULL or "": the first device of the class's
 * kind) in the device table, check its kind and event-channel port, and copy
 * the entry to *df->dev.  0, -ISV_ENODEV (none, or another kind) or -EINVAL
 * (a bad port). */
int devfront_find(struct devfront *df, const char *name);

/* Start the handshake: evtchn_init (if that fails, say so and go on waiting
 * without upcalls), note the port's upcall count, set the deadline to
 * timeout_ns from now (saturating), build the frontend directory and read its
 * `backend` node.  0, -E2BIG (a path does not fit) or the store's error. */
int devfront_start(struct devfront *df, u64 timeout_ns);

/* Wait, on the device's port (each backend state change raises it), until the
 * backend's `state` is want_a or want_b: 0; -ISV_ENODEV if it is Closing or
 * Closed (its `error` node is shown); -ISV_ETIMEDOUT at the deadline; or the
 * store's error. */
int devfront_wait_backend(struct devfront *df, u64 want_a, u64 want_b);

/* Write the frontend's `state` (DEVFRONT_ST_*): 0, or the store's error. */
int devfront_set_state(struct devfront *df, u64 state);

/* The end of the handshake, once the frontend's side of the region is ready:
 * state Initialised, wait for the backend to be Connected, state Connected.
 * 0, or the first error. */
int devfront_connect(struct devfront *df);

/* HC_EVTCHN_SEND to the device's port (a failure is said): 0 or -errno. */
long devfront_notify(const struct devfront_class *c, const struct isv_device *dev);

/* A backend fault: say "<who>: <device>: backend fault <code>: <msg>", then
 * HC_DEVICE_FAULT(port, code, msg, rsp_cons, flags) (a failure is said).
 * Returns the hypercall's result (1: the kernel holds, with FAULT_F_HOLD). */
long devfront_fault(const struct devfront_class *c, const struct isv_device *dev, u64 code,
                    u64 rsp_cons, u64 flags, const char *msg);

/* While the kernel holds after a devfront_fault with FAULT_F_HOLD (it returned
 * 1): HC_DEVICE_HELD, 1 while it still holds, 0 once it has taken the bad
 * responses back (a new driver instance redoes them), or -errno (said). */
long devfront_held(const struct devfront_class *c, const struct isv_device *dev);

#endif /* ISOVISOR_DEVFRONT_H */
