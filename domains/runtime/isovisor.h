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
/* Virtual nanoseconds since domain start (excludes paused time). */
u64 time_ns(void);
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

/* Keep the compiler from reasoning about v (stops constant folding and
 * dead-code elimination of benchmark loops). */
#define OPAQUE(v) __asm__ volatile("" : "+r"(v))

#endif /* ISOVISOR_H */
