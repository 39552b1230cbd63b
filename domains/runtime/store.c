/* isovisor guest runtime: the device table and the store (docs/devices.md). */
#include "isovisor.h"

/* --- device table ---------------------------------------------------------- */

static struct isv_device devices[SI_MAX_DEVICES];
static u64 nr_devices;

#define SI_WORD(si, off) (*(const volatile u64 *)((const char *)(si) + (off)))

/* Called by __isovisor_init: copy the table out of the start-info page. */
void __isv_devices_init(const void *si);
void __isv_devices_init(const void *si)
{
    u64 n = SI_WORD(si, SI_NR_DEVICES);
    if (n > SI_MAX_DEVICES)
        crashf("isovisor runtime: the start info lists %lu devices, more than SI_MAX_DEVICES"
               " (%d)",
               (unsigned long)n, SI_MAX_DEVICES);
    for (u64 i = 0; i < n; i++) {
        const char *e = (const char *)si + SI_DEVICES + i * DEV_ENTRY_SIZE;
        struct isv_device *d = &devices[i];
        d->kind = SI_WORD(e, DE_KIND);
        d->devid = SI_WORD(e, DE_DEVID);
        d->port = SI_WORD(e, DE_PORT);
        d->region = (void *)(uintptr_t)SI_WORD(e, DE_REGION);
        d->region_size = SI_WORD(e, DE_REGION_SIZE);
        u64 k = 0;
        for (; k + 1 < DE_NAME_MAX && e[DE_NAME + k]; k++)
            d->name[k] = e[DE_NAME + k];
        d->name[k] = 0;
    }
    nr_devices = n;
}

u64 device_count(void) { return nr_devices; }

int device_get(u64 i, struct isv_device *out)
{
    if (i >= nr_devices)
        return -ENOENT;
    *out = devices[i];
    return 0;
}

int device_find(const char *name, struct isv_device *out)
{
    for (u64 i = 0; i < nr_devices; i++) {
        if (strcmp(devices[i].name, name) == 0) {
            *out = devices[i];
            return 0;
        }
    }
    return -ENOENT;
}

/* --- store ------------------------------------------------------------------- */

long store_read(const char *path, char *buf, u64 buflen)
{
    char dummy;
    if (!buf || !buflen) {
        buf = &dummy;
        buflen = 1;
    }
    long r = hypercall4(HC_STORE_READ, (u64)(uintptr_t)path, strlen(path), (u64)(uintptr_t)buf,
                        buflen - 1);
    if (r < 0) {
        buf[0] = 0;
        return r;
    }
    buf[(u64)r < buflen - 1 ? (u64)r : buflen - 1] = 0;
    return r;
}

long store_write(const char *path, const char *value)
{
    return hypercall4(HC_STORE_WRITE, (u64)(uintptr_t)path, strlen(path), (u64)(uintptr_t)value,
                      strlen(value));
}

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

long store_read_u64(const char *path, u64 *out)
{
    char buf[32];
    long r = store_read(path, buf, sizeof buf);
    if (r < 0)
        return r;
    if ((u64)r >= sizeof buf)
        return -ERANGE;
    const char *p = buf;
    while (is_space(*p))
        p++;
    u64 base = 10, x = 0;
    if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
        base = 16;
        p += 2;
    }
    const char *digits = p;
    for (;; p++) {
        u64 d;
        if (*p >= '0' && *p <= '9')
            d = (u64)(*p - '0');
        else if (base == 16 && *p >= 'a' && *p <= 'f')
            d = (u64)(*p - 'a' + 10);
        else if (base == 16 && *p >= 'A' && *p <= 'F')
            d = (u64)(*p - 'A' + 10);
        else
            break;
        if (x > (~(u64)0 - d) / base)
            return -ERANGE;
        x = x * base + d;
    }
    if (p == digits)
        return -EINVAL;
    while (is_space(*p))
        p++;
    if (*p)
        return -EINVAL;
    *out = x;
    return 0;
}

int store_path(char *buf, u64 buflen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, buflen, fmt, ap);
    va_end(ap);
    if (n < 0 || (u64)n >= buflen)
        return -E2BIG;
    return 0;
}

long store_read_at(const char *dir, const char *node, char *buf, u64 buflen)
{
    char path[STORE_PATH_MAX + 1];
    if (store_path(path, sizeof path, "%s/%s", dir, node)) {
        if (buf && buflen)
            buf[0] = 0;
        return -E2BIG;
    }
    return store_read(path, buf, buflen);
}

long store_write_at(const char *dir, const char *node, const char *value)
{
    char path[STORE_PATH_MAX + 1];
    if (store_path(path, sizeof path, "%s/%s", dir, node))
        return -E2BIG;
    return store_write(path, value);
}

long store_read_u64_at(const char *dir, const char *node, u64 *out)
{
    char path[STORE_PATH_MAX + 1];
    if (store_path(path, sizeof path, "%s/%s", dir, node))
        return -E2BIG;
    return store_read_u64(path, out);
}
