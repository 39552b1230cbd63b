/* isovisor guest runtime: the API a guest program (`int main(void)`) sees.
 *
 * Entry (start.S): the kernel enters the image's first byte with rsp = top of
 * guest RAM and rdi = START_INFO_ADDR.  _start zeroes .bss, calls the runtime
 * init, then main(), then exit(main's return value).
 *
 * Console output is line buffered: one hypercall per line (or per full
 * buffer), flushed before exit() and crash().
 */
#ifndef ISOVISOR_H
#define ISOVISOR_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "hypercall.h"
#include "isovisor_abi.h"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int8_t i8;
typedef int16_t i16;
typedef int32_t i32;
typedef int64_t i64;

#define NORETURN __attribute__((noreturn))
#define PRINTF_LIKE(f, a) __attribute__((format(printf, f, a)))

/* --- lifecycle ------------------------------------------------------------ */
int main(void);
/* HC_SHUTDOWN(SHUTDOWN_POWEROFF, code) after flushing the console. */
NORETURN void exit(int code);
/* Print msg (plus a newline if it has none), then HC_SHUTDOWN(SHUTDOWN_CRASH, 0). */
NORETURN void crash(const char *msg);
/* printf-style crash(). */
NORETURN void crashf(const char *fmt, ...) PRINTF_LIKE(1, 2);

/* --- hypercall wrappers --------------------------------------------------- */
/* Virtual nanoseconds since domain start (excludes paused time).  Read from
 * the clock parameters the kernel publishes (rdtsc, no hypercall); never goes
 * backwards, also across save, restore and migration. */
u64 time_ns(void);
/* Nanoseconds since the Unix epoch (the host's wall clock, right after a
 * restore too; it jumps forward by the time the guest was stopped). */
u64 wall_time_ns(void);
/* Saves-and-restores and migrations of this guest so far. */
u64 clock_epoch(void);
/* The same clock as time_ns, asked of the kernel with HC_TIME (for tests). */
u64 clock_hypercall_ns(void);
/* Block for ns virtual nanoseconds (HC_POLL with an empty port mask). */
void sleep_ns(u64 ns);
/* Wait for an event on any port in mask or timeout_ns (POLL_FOREVER: no
 * timeout); returns the pending bits of mask, 0 on timeout, or -errno. */
long poll(u64 port_mask, u64 timeout_ns);
/* Give up the rest of the time slice. */
void yield(void);
/* Arm (or re-arm) the watchdog: the domain is crashed if it does not call
 * watchdog() again within ms milliseconds.  0 disarms. */
long watchdog(u64 ms);
/* Write len bytes to the console, in chunks of at most CONSOLE_WRITE_MAX.
 * Flushes buffered printf output first.  Returns bytes written or -errno. */
long console_write(const char *buf, u64 len);

/* --- console -------------------------------------------------------------- */
int putchar(int c);
/* Writes s and a newline. */
int puts(const char *s);
/* Supports %d %i %u %x %X %s %c %p %% with l/ll/z (and h/hh) length modifiers,
 * field width (digits or *), precision (.N or .*), '0' padding and '-'. */
int printf(const char *fmt, ...) PRINTF_LIKE(1, 2);
int vprintf(const char *fmt, va_list ap);
int snprintf(char *buf, size_t size, const char *fmt, ...) PRINTF_LIKE(3, 4);
int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap);
/* Send buffered console output now. */
void console_flush(void);
/* Console input (only through a console driver: docs/console.md).  Takes up
 * to max bytes, non-blocking: the number taken (0: none yet), or -ENODEV when
 * the console is the kernel's (which has no input).  console_wait_input waits
 * until input is there (1) or timeout_ns passes (0). */
long console_read(char *buf, u64 max);
int console_wait_input(u64 timeout_ns);
/* Called once at start-up: route the console to the console device, if the
 * domain has one (its driver serves the console, not the kernel). */
void __isv_console_init(void);

/* --- start info and parameters -------------------------------------------- */
u64 domid(void);
const char *domain_name(void);
/* Bytes of guest RAM (guest-physical addresses 0 .. mem_bytes, page 0 unmapped). */
u64 mem_bytes(void);
u64 image_base(void);
u64 image_size(void);
u64 stack_top(void);
/* The domain's `extra` string, e.g. "n=1000 seed=7 mode=ud". */
const char *cmdline(void);

/* The cmdline is whitespace-separated `key=value` words; a bare `key` means
 * `key=1`; the last occurrence of a key wins.
 * param_u64: decimal or 0x-prefixed hex, optionally followed by k/K, m/M or
 * g/G (binary multiples).  Returns dflt if the key is absent; a malformed value
 * crashes the domain with a message naming the key. */
u64 param_u64(const char *key, u64 dflt);
/* Copies the value (truncated to buflen-1 bytes, NUL-terminated) into buf and
 * returns buf; returns dflt (not copied) if the key is absent. */
const char *param_str(const char *key, const char *dflt, char *buf, u64 buflen);
/* Non-zero if key is present at all. */
int param_has(const char *key);

/* --- memory --------------------------------------------------------------- */
/* Bump allocator over [_end, stack_top - MIN_STACK_BYTES).  align must be a
 * power of two (0 means 16).  Returns NULL if it does not fit.  The contents
 * are unspecified (clear it if you need zeroes); memory is never freed. */
void *heap_alloc(u64 size, u64 align);
/* Bytes still available to heap_alloc (with 16-byte alignment). */
u64 heap_free_bytes(void);

/* --- string.h subset ------------------------------------------------------ */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);

/* --- devices, event channels and the store (docs/devices.md) --------------- */
/* Errno values the device code returns (negated) besides the kernel's. */
#define ISV_EIO 5
#define ISV_ENODEV 19
#define ISV_EBUSY 16
#define ISV_EPROTO 71
#define ISV_ETIMEDOUT 110

/* One entry of the start-info device table (copied at start-up). */
struct isv_device {
    u64 kind;        /* DEV_KIND_VBD */
    u64 devid;       /* Xen numbering: xvda = 51712 */
    u64 port;        /* event-channel port, 1..63 */
    void *region;    /* guest-physical address of the device region */
    u64 region_size; /* bytes of the region mapped into the guest (the window) */
    char name[DE_NAME_MAX]; /* "xvda", NUL-terminated */
};

/* Entries in the device table (0..SI_MAX_DEVICES). */
u64 device_count(void);
/* Copies entry i into *out: 0, or -ENOENT if i >= device_count(). */
int device_get(u64 i, struct isv_device *out);
/* The entry named name ("xvda"): 0, or -ENOENT. */
int device_find(const char *name, struct isv_device *out);

/* Event channels.  Port p is bit (1 << p) of a u64 mask (port 0 is reserved).
 *
 * The runtime registers its upcall entry (__isv_upcall_entry) when the domain
 * has devices (evtchn_init from __isovisor_init); a guest without devices may
 * call evtchn_init itself.  The upcall handler ORs the delivered bits (and any
 * left in SH_PENDING) into evtchn_fired, clears them from SH_PENDING, counts
 * them per port, and calls the port's bound handler, if any.  Upcalls
 * interrupt the guest anywhere, so a bound handler must not touch state the
 * interrupted code may be changing (printf's buffer, the heap, a ring). */
extern volatile u64 evtchn_fired;
/* HC_SET_UPCALL(__isv_upcall_entry).  Idempotent; 0 or -errno. */
long evtchn_init(void);
/* Non-zero once evtchn_init succeeded. */
int evtchn_ready(void);
/* HC_EVTCHN_SEND(port): 0 or -errno (-EINVAL for a port outside 1..63). */
long evtchn_send(u64 port);
/* Set / clear SH_UPCALL_MASK (no nesting: unmask clears it).  Events that
 * arrive while masked stay pending in the kernel and are delivered at the next
 * point the vCPU stops (a blocking hypercall, a slice boundary). */
void evtchn_mask(void);
void evtchn_unmask(void);
/* Atomically take and clear the fired bits in mask; returns them. */
u64 evtchn_take(u64 mask);
/* HC_BLOCK(timeout_ns): unmask upcalls and sleep until an event or the
 * timeout.  Returns the kernel's result (0 with a handler registered). */
long evtchn_block(u64 timeout_ns);
/* Wait until a port in mask has fired or timeout_ns (POLL_FOREVER: no
 * timeout; 0: just check) passes; returns the fired bits of mask (taken and
 * cleared) or 0 on timeout.  Lost-wake-up free: masks upcalls, checks, and
 * sleeps with HC_BLOCK, which unmasks atomically.  Call it with upcalls
 * unmasked and never from an upcall; it returns with upcalls unmasked. */
u64 evtchn_wait(u64 mask, u64 timeout_ns);
/* Called in upcall context for each fired port bound to it. */
typedef void (*evtchn_handler_fn)(u64 port, void *ctx);
/* Bind (fn non-NULL) or unbind (fn NULL) a port's handler: 0 or -EINVAL. */
int evtchn_bind(u64 port, evtchn_handler_fn fn, void *ctx);
/* Upcalls that delivered port so far (all ports: evtchn_upcalls_total). */
u64 evtchn_upcalls(u64 port);
u64 evtchn_upcalls_total(void);

/* The store (HC_STORE_READ / HC_STORE_WRITE).  Paths without a leading '/' are
 * relative to the domain's home /local/domain/<domid>/. */
/* Reads path's value into buf (at most buflen-1 bytes, NUL-terminated) and
 * returns the value's full length (>= buflen means truncated), or -errno. */
long store_read(const char *path, char *buf, u64 buflen);
/* Writes value (a NUL-terminated string) to path: 0 or -errno. */
long store_write(const char *path, const char *value);
/* Reads a decimal (or 0x hex) u64, surrounding whitespace allowed: 0, or
 * -errno (-EINVAL: not a number, -ERANGE: too big or too long). */
long store_read_u64(const char *path, u64 *out);
/* snprintf into a path buffer: 0, or -E2BIG if it does not fit. */
int store_path(char *buf, u64 buflen, const char *fmt, ...) PRINTF_LIKE(3, 4);
/* The same on "<dir>/<node>". */
long store_read_at(const char *dir, const char *node, char *buf, u64 buflen);
long store_write_at(const char *dir, const char *node, const char *value);
long store_read_u64_at(const char *dir, const char *node, u64 *out);

/* Keep the compiler from reasoning about v (stops constant folding and
 * dead-code elimination of benchmark loops). */
#define OPAQUE(v) __asm__ volatile("" : "+r"(v))

/* The block frontend (struct blkfront, blkfront_open, ...): last, it uses the
 * declarations above. */
#include "blkfront.h"

#endif /* ISOVISOR_H */
