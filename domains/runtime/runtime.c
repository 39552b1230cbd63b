/* isovisor guest runtime: start info, lifecycle, hypercall wrappers, parameters
 * and the bump allocator. */
#include "isovisor.h"

extern char __bss_start[], __bss_end[], _end[];

#define SI_U64(si, off) (*(const volatile u64 *)((const char *)(si) + (off)))

static u64 si_domid, si_mem_bytes, si_image_base, si_image_size, si_stack_top;
static char si_name[SI_NAME_MAX];
static char si_cmdline[SI_CMDLINE_MAX];
static u64 heap_next, heap_limit;

/* store.c: copies the start info's device table. */
void __isv_devices_init(const void *si);

static void copy_cstr(char *dst, const char *src, u64 max)
{
    u64 i = 0;
    for (; i + 1 < max && src[i]; i++)
        dst[i] = src[i];
    dst[i] = 0;
}

/* Called by _start with .bss zeroed. */
void __isovisor_init(const void *si)
{
    if (SI_U64(si, SI_MAGIC) != START_INFO_MAGIC)
        crashf("isovisor runtime: bad start-info magic 0x%lx at %p (expected 0x%llx)",
               (unsigned long)SI_U64(si, SI_MAGIC), si, START_INFO_MAGIC);
    if (SI_U64(si, SI_ABI_VERSION) != ABI_VERSION)
        crashf("isovisor runtime: kernel ABI version %lu, guest built for %d: rebuild the guest",
               (unsigned long)SI_U64(si, SI_ABI_VERSION), ABI_VERSION);
    si_domid = SI_U64(si, SI_DOMID);
    si_mem_bytes = SI_U64(si, SI_MEM_BYTES);
    si_image_base = SI_U64(si, SI_IMAGE_BASE);
    si_image_size = SI_U64(si, SI_IMAGE_SIZE);
    si_stack_top = SI_U64(si, SI_STACK_TOP);
    if (!si_stack_top)
        si_stack_top = si_mem_bytes;
    copy_cstr(si_name, (const char *)si + SI_NAME, SI_NAME_MAX);
    copy_cstr(si_cmdline, (const char *)si + SI_CMDLINE, SI_CMDLINE_MAX);
    heap_next = ((u64)(uintptr_t)_end + 15) & ~(u64)15;
    heap_limit = si_stack_top > MIN_STACK_BYTES ? si_stack_top - MIN_STACK_BYTES : 0;
    __isv_devices_init(si);
    /* Register the upcall entry when there is something to deliver: a domain
     * without devices makes no extra hypercall (a guest may still call
     * evtchn_init itself).  A refusal is not fatal here: evtchn_wait then
     * falls back to HC_BLOCK's returned bits, and blkfront_open reports it. */
    if (device_count())
        evtchn_init();
    __isv_console_init();
}

/* Called by _start instead of zeroing .bss when .bss would overlap the stack.
 * Must not touch .bss. */
NORETURN void __isovisor_image_too_big(const void *si)
{
    char msg[256];
    int n = snprintf(msg, sizeof msg,
                     "isovisor runtime: image needs RAM up to %p (.bss end) plus a %d KiB stack,"
                     " but the domain has %lu bytes: give the domain more memory\n",
                     (void *)__bss_end, MIN_STACK_BYTES / 1024,
                     (unsigned long)SI_U64(si, SI_MEM_BYTES));
    if (n > (int)sizeof msg - 1)
        n = sizeof msg - 1;
    hypercall2(HC_CONSOLE_WRITE, (u64)(uintptr_t)msg, (u64)n);
    for (;;)
        hypercall2(HC_SHUTDOWN, SHUTDOWN_CRASH, 0);
}

/* --- lifecycle ------------------------------------------------------------ */

NORETURN void exit(int code)
{
    console_flush();
    for (;;)
        hypercall2(HC_SHUTDOWN, SHUTDOWN_POWEROFF, (u64)(i64)code);
}

NORETURN void crash(const char *msg)
{
    u64 n = strlen(msg);
    console_flush();
    for (u64 i = 0; i < n; i++)
        putchar(msg[i]);
    if (n == 0 || msg[n - 1] != '\n')
        putchar('\n');
    console_flush();
    for (;;)
        hypercall2(HC_SHUTDOWN, SHUTDOWN_CRASH, 0);
}

NORETURN void crashf(const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    crash(msg);
}

/* --- hypercall wrappers --------------------------------------------------- */

/* --- the clock (kernel/clock.py) ----------------------------------------- */

#define SH_CLOCK(off) (*(const volatile u64 *)(uintptr_t)(SHARED_INFO_ADDR + (off)))

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}

/* A stateless function of the parameters the kernel publishes: no hypercall,
 * and nothing in the guest that a save, restore or migration could leave stale. */
u64 time_ns(void)
{
    for (;;) {
        u64 version = SH_CLOCK(SH_CLOCK_VERSION);
        __asm__ volatile("" ::: "memory");
        if (!(SH_CLOCK(SH_CLOCK_FLAGS) & CLOCK_F_TSC))
            return (u64)hypercall0(HC_TIME);
        u64 tsc_ts = SH_CLOCK(SH_CLOCK_TSC), system = SH_CLOCK(SH_CLOCK_SYSTEM);
        u64 mul = SH_CLOCK(SH_CLOCK_MUL), tsc = rdtsc();
        __asm__ volatile("" ::: "memory");
        if ((version & 1) || version != SH_CLOCK(SH_CLOCK_VERSION))
            continue;
        if (tsc <= tsc_ts)
            return system;
        return system + (u64)(((unsigned __int128)(tsc - tsc_ts) * mul) >> 32);
    }
}

u64 wall_time_ns(void)
{
    for (;;) {
        u64 version = SH_CLOCK(SH_CLOCK_VERSION);
        u64 wall = SH_CLOCK(SH_CLOCK_WALL);
        u64 t = time_ns();
        if (!(version & 1) && version == SH_CLOCK(SH_CLOCK_VERSION))
            return wall + t;
    }
}

u64 clock_epoch(void) { return SH_CLOCK(SH_CLOCK_EPOCH); }

u64 clock_hypercall_ns(void) { return (u64)hypercall0(HC_TIME); }

long poll(u64 port_mask, u64 timeout_ns) { return hypercall2(HC_POLL, port_mask, timeout_ns); }

void sleep_ns(u64 ns) { hypercall2(HC_POLL, 0, ns); }

void yield(void) { hypercall0(HC_YIELD); }

long watchdog(u64 ms) { return hypercall1(HC_WATCHDOG, ms); }

/* --- start info ----------------------------------------------------------- */

u64 domid(void) { return si_domid; }
const char *domain_name(void) { return si_name; }
u64 mem_bytes(void) { return si_mem_bytes; }
u64 image_base(void) { return si_image_base; }
u64 image_size(void) { return si_image_size; }
u64 stack_top(void) { return si_stack_top; }
const char *cmdline(void) { return si_cmdline; }

/* --- parameters ----------------------------------------------------------- */

static int is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

/* Finds the last `key=value` (or bare `key`) word; sets *val and *len. */
static int param_find(const char *key, const char **val, u64 *len)
{
    u64 klen = strlen(key);
    const char *p = si_cmdline;
    int found = 0;
    while (*p) {
        while (is_space(*p))
            p++;
        if (!*p)
            break;
        const char *w = p;
        while (*p && !is_space(*p))
            p++;
        u64 wlen = (u64)(p - w);
        if (wlen >= klen && memcmp(w, key, klen) == 0) {
            if (wlen == klen) {
                *val = "1";
                *len = 1;
                found = 1;
            } else if (w[klen] == '=') {
                *val = w + klen + 1;
                *len = wlen - klen - 1;
                found = 1;
            }
        }
    }
    return found;
}

int param_has(const char *key)
{
    const char *v;
    u64 n;
    return param_find(key, &v, &n);
}

const char *param_str(const char *key, const char *dflt, char *buf, u64 buflen)
{
    const char *v;
    u64 n;
    if (!param_find(key, &v, &n))
        return dflt;
    if (!buf || !buflen)
        return dflt;
    if (n > buflen - 1)
        n = buflen - 1;
    memcpy(buf, v, n);
    buf[n] = 0;
    return buf;
}

u64 param_u64(const char *key, u64 dflt)
{
    const char *v;
    u64 n, i = 0, x = 0, base = 10;
    if (!param_find(key, &v, &n))
        return dflt;
    if (n > 2 && v[0] == '0' && (v[1] == 'x' || v[1] == 'X')) {
        base = 16;
        i = 2;
    }
    u64 start = i;
    for (; i < n; i++) {
        char c = v[i];
        u64 d;
        if (c >= '0' && c <= '9')
            d = (u64)(c - '0');
        else if (base == 16 && c >= 'a' && c <= 'f')
            d = (u64)(c - 'a' + 10);
        else if (base == 16 && c >= 'A' && c <= 'F')
            d = (u64)(c - 'A' + 10);
        else
            break;
        if (x > (~(u64)0 - d) / base)
            goto bad;
        x = x * base + d;
    }
    if (i == start)
        goto bad;
    if (i < n) {
        unsigned shift;
        switch (v[i]) {
        case 'k': case 'K': shift = 10; break;
        case 'm': case 'M': shift = 20; break;
        case 'g': case 'G': shift = 30; break;
        default: goto bad;
        }
        if (i + 1 != n || (x >> (64 - shift)) != 0)
            goto bad;
        x <<= shift;
    }
    return x;
bad:
    crashf("param %s: bad number '%.*s' (want decimal or 0x hex, optional k/M/G suffix)", key,
           (int)n, v);
}

/* --- memory --------------------------------------------------------------- */

void *heap_alloc(u64 size, u64 align)
{
    if (!align)
        align = 16;
    if (align & (align - 1))
        return NULL;
    u64 p = (heap_next + align - 1) & ~(align - 1);
    if (p < heap_next || p > heap_limit || size > heap_limit - p)
        return NULL;
    heap_next = p + size;
    return (void *)(uintptr_t)p;
}

u64 heap_free_bytes(void)
{
    u64 p = (heap_next + 15) & ~(u64)15;
    return p < heap_limit ? heap_limit - p : 0;
}
