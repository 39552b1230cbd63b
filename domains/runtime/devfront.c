/* isovisor guest runtime: device discovery and the store handshake shared by
 * the frontends (see devfront.h). */
#include "devfront.h"

const char *devfront_state_name(u64 state)
{
    static const char *const names[] = {"Unknown",     "Initialising", "InitWait", "Initialised",
                                        "Connected",   "Closing",      "Closed"};
    return state < sizeof names / sizeof names[0] ? names[state] : "invalid";
}

static void vsay(const struct devfront_class *c, const char *fmt, va_list ap)
{
    if (!c->raw_console) {
        printf("%s: ", c->who);
        vprintf(fmt, ap);
        return;
    }
    char msg[600];
    int n = snprintf(msg, sizeof msg, "%s: ", c->who);
    if (n < 0 || (u64)n >= sizeof msg)
        n = 0;
    int m = vsnprintf(msg + n, sizeof msg - (u64)n, fmt, ap);
    if (m > 0)
        n += m;
    if ((u64)n >= sizeof msg)
        n = sizeof msg - 1;
    hypercall2(HC_CONSOLE_WRITE, (u64)(uintptr_t)msg, (u64)n);
}

void devfront_say(const struct devfront_class *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsay(c, fmt, ap);
    va_end(ap);
}

/* --- discovery ------------------------------------------------------------------ */

int devfront_find(struct devfront *df, const char *name)
{
    const struct devfront_class *c = df->cls;
    const char *want = name && *name ? name : NULL;
    u64 count = device_count();
    int found = 0;
    for (u64 i = 0; i < count && !found; i++) {
        struct isv_device d;
        device_get(i, &d);
        if (want ? strcmp(d.name, want) == 0 : d.kind == c->kind) {
            *df->dev = d;
            found = 1;
        }
    }
    if (!found) { /* say which devices there are */
        char list[SI_MAX_DEVICES * (DE_NAME_MAX + 1) + 1];
        u64 len = 0;
        list[0] = 0;
        for (u64 i = 0; i < count; i++) {
            struct isv_device d;
            device_get(i, &d);
            int n = snprintf(list + len, sizeof list - len, " %s", d.name);
            if (n < 0 || (u64)n >= sizeof list - len)
                break;
            len += (u64)n;
        }
        devfront_say(c, "no %s%s%s in the device table (%lu devices:%s)\n", c->what,
                     want ? " named " : "", want ? want : "", (unsigned long)count, list);
        return -ISV_ENODEV;
    }
    const struct isv_device *dev = df->dev;
    if (dev->kind != c->kind) {
        devfront_say(c, "%s is not a %s (kind %lu)\n", dev->name, c->what,
                     (unsigned long)dev->kind);
        return -ISV_ENODEV;
    }
    if (dev->port == 0 || dev->port >= EVTCHN_PORTS) {
        devfront_say(c, "%s: bad event-channel port %lu in the device table\n", dev->name,
                     (unsigned long)dev->port);
        return -EINVAL;
    }
    return 0;
}

/* --- the handshake --------------------------------------------------------------- */

int devfront_start(struct devfront *df, u64 timeout_ns)
{
    const struct devfront_class *c = df->cls;
    const char *name = df->dev->name;
    long r = evtchn_init();
    if (r < 0)
        devfront_say(c, "%s: HC_SET_UPCALL failed (%ld); waiting without upcalls\n", name, r);
    df->upcalls_base = evtchn_upcalls(df->dev->port);

    u64 now = time_ns();
    df->deadline = now + timeout_ns < now ? POLL_FOREVER - 1 : now + timeout_ns;

    if (store_path(df->frontend, df->frontend_size, "device/%s/%lu", c->dir,
                   (unsigned long)df->dev->devid))
        return -E2BIG;
    r = store_read_at(df->frontend, "backend", df->backend, df->backend_size);
    if (r <= 0 || (u64)r >= df->backend_size) {
        devfront_say(c, "%s: cannot read %s/backend: %s %ld\n", name, df->frontend,
                     r < 0 ? "error" : "bad length", r);
        return r < 0 ? (int)r : -E2BIG;
    }
    return 0;
}

int devfront_wait_backend(struct devfront *df, u64 want_a, u64 want_b)
{
    const struct devfront_class *c = df->cls;
    const char *name = df->dev->name;
    for (;;) {
        u64 st = 0;
        long r = store_read_u64_at(df->backend, "state", &st);
        if (r < 0 && r != -ENOENT) {
            devfront_say(c, "%s: cannot read %s/state: error %ld\n", name, df->backend, r);
            return (int)r;
        }
        if (r == 0) {
            if (st == want_a || st == want_b)
                return 0;
            if (st == DEVFRONT_ST_CLOSING || st == DEVFRONT_ST_CLOSED) {
                char err[512];
                long e = store_read_at(df->backend, "error", err, sizeof err);
                devfront_say(c, "%s: backend %s is %s (state %lu): %s%s\n", name, df->backend,
                             devfront_state_name(st), (unsigned long)st,
                             e >= 0 ? err : "(no error node)", e >= (long)sizeof err ? "..." : "");
                return -ISV_ENODEV;
            }
        }
        u64 now = time_ns();
        if (now >= df->deadline) {
            devfront_say(c,
                         "%s: gave up waiting for backend %s to become %s%s%s: its state is %s\n",
                         name, df->backend, devfront_state_name(want_a),
                         want_a != want_b ? " or " : "",
                         want_a != want_b ? devfront_state_name(want_b) : "",
                         r == 0 ? devfront_state_name(st) : "missing");
            return -ISV_ETIMEDOUT;
        }
        /* each backend state change raises the port */
        evtchn_wait((u64)1 << df->dev->port, df->deadline - now);
    }
}

int devfront_set_state(struct devfront *df, u64 state)
{
    char value[4];
    snprintf(value, sizeof value, "%lu", (unsigned long)state);
    long r = store_write_at(df->frontend, "state", value);
    if (r < 0) {
        devfront_say(df->cls, "%s: cannot write %s/state = %s: error %ld\n", df->dev->name,
                     df->frontend, value, r);
        return (int)r;
    }
    return 0;
}

int devfront_connect(struct devfront *df)
{
    int rc = devfront_set_state(df, DEVFRONT_ST_INITIALISED);
    if (rc < 0)
        return rc;
    /* the backend attaches its side and goes Connected */
    rc = devfront_wait_backend(df, DEVFRONT_ST_CONNECTED, DEVFRONT_ST_CONNECTED);
    if (rc < 0)
        return rc;
    return devfront_set_state(df, DEVFRONT_ST_CONNECTED);
}

/* --- once connected ------------------------------------------------------------------ */

long devfront_notify(const struct devfront_class *c, const struct isv_device *dev)
{
    long r = evtchn_send(dev->port);
    if (r < 0)
        devfront_say(c, "%s: HC_EVTCHN_SEND(%lu) failed (%ld)\n", dev->name,
                     (unsigned long)dev->port, r);
    return r;
}

long devfront_fault(const struct devfront_class *c, const struct isv_device *dev, u64 code,
                    u64 rsp_cons, u64 flags, const char *msg)
{
    devfront_say(c, "%s: backend fault %lu: %s\n", dev->name, (unsigned long)code, msg);
    long r = hypercall6(HC_DEVICE_FAULT, dev->port, code, (u64)(uintptr_t)msg, strlen(msg),
                        rsp_cons, flags);
    if (r < 0)
        devfront_say(c, "%s: HC_DEVICE_FAULT failed (%ld)\n", dev->name, r);
    return r;
}

long devfront_held(const struct devfront_class *c, const struct isv_device *dev)
{
    long r = hypercall1(HC_DEVICE_HELD, dev->port);
    if (r < 0)
        devfront_say(c, "%s: HC_DEVICE_HELD failed (%ld)\n", dev->name, r);
    return r;
}
