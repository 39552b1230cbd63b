/* isovisor guest runtime: buffered console and a small printf.
 *
 * Output goes to the console device when the domain has one (a console
 * driver process serves it: consfront.c), else to the kernel's console with
 * HC_CONSOLE_WRITE.  If the device fails, output falls back to the kernel's
 * console, so nothing the guest prints is dropped. */
#include "isovisor.h"
#include "consfront.h"

#define CONSOLE_BUF 1024

static char cbuf[CONSOLE_BUF];
static u64 clen;
static struct consfront con;
static int con_on;

void __isv_console_init(void)
{
    struct isv_device d;
    if (device_find(CONSFRONT_DEVICE_NAME, &d) != 0 || d.kind != DEV_KIND_CONSOLE)
        return;
    if (consfront_open(&con, CONSFRONT_HANDSHAKE_TIMEOUT_NS) == 0)
        con_on = 1; /* else consfront_open said why on the kernel's console */
}

long console_read(char *buf, u64 max)
{
    if (!con_on)
        return -ISV_ENODEV;
    return consfront_read(&con, buf, max > 0xFFFFFFFFu ? 0xFFFFFFFFu : (u32)max);
}

int console_wait_input(u64 timeout_ns)
{
    if (!con_on)
        return -ISV_ENODEV;
    return consfront_wait_input(&con, timeout_ns);
}

static long hc_write(const char *buf, u64 len);

/* To the console device while it works, then to the kernel's console. */
static long raw_write(const char *buf, u64 len)
{
    u64 done = 0;
    while (con_on && done < len) {
        u64 chunk = len - done > 0x10000 ? 0x10000 : len - done;
        long r = consfront_write(&con, buf + done, (u32)chunk);
        if (r > 0)
            done += (u64)r;
        if (r < (long)chunk)
            con_on = 0; /* failed or timed out: the kernel's console takes the rest */
    }
    if (done == len)
        return (long)len;
    long r = hc_write(buf + done, len - done);
    return r < 0 ? (done ? (long)done : r) : (long)done + r;
}

/* One or more HC_CONSOLE_WRITE calls of at most CONSOLE_WRITE_MAX bytes. */
static long hc_write(const char *buf, u64 len)
{
    u64 done = 0;
    while (done < len) {
        u64 chunk = len - done;
        if (chunk > CONSOLE_WRITE_MAX)
            chunk = CONSOLE_WRITE_MAX;
        long r = hypercall2(HC_CONSOLE_WRITE, (u64)(uintptr_t)(buf + done), chunk);
        if (r < 0)
            return done ? (long)done : r;
        if (r == 0)
            break;
        done += (u64)r;
    }
    return (long)done;
}

void console_flush(void)
{
    if (clen) {
        raw_write(cbuf, clen);
        clen = 0;
    }
}

long console_write(const char *buf, u64 len)
{
    console_flush();
    return raw_write(buf, len);
}

int putchar(int c)
{
    cbuf[clen++] = (char)c;
    if (c == '\n' || clen == CONSOLE_BUF)
        console_flush();
    return (unsigned char)c;
}

int puts(const char *s)
{
    while (*s)
        putchar(*s++);
    putchar('\n');
    return 1;
}

/* --- formatter ------------------------------------------------------------ */

typedef struct {
    char *buf; /* NULL: console */
    size_t size;
    size_t n; /* characters produced (may exceed size) */
} sink_t;

static void emit(sink_t *s, char c)
{
    if (!s->buf)
        putchar(c);
    else if (s->n + 1 < s->size)
        s->buf[s->n] = c;
    s->n++;
}

static void emit_pad(sink_t *s, char c, int count)
{
    while (count-- > 0)
        emit(s, c);
}

enum { F_LEFT = 1, F_ZERO = 2, F_PLUS = 4, F_SPACE = 8 };

static void fmt_str(sink_t *s, const char *str, int width, int prec, int flags)
{
    int len = 0;
    if (!str)
        str = "(null)";
    while (str[len] && (prec < 0 || len < prec))
        len++;
    if (!(flags & F_LEFT))
        emit_pad(s, ' ', width - len);
    for (int i = 0; i < len; i++)
        emit(s, str[i]);
    if (flags & F_LEFT)
        emit_pad(s, ' ', width - len);
}

static void fmt_num(sink_t *s, u64 v, int neg, unsigned base, int upper, const char *prefix,
                    int width, int prec, int flags)
{
    char digits[24];
    const char *set = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    int nd = 0;
    do {
        digits[nd++] = set[v % base];
        v /= base;
    } while (v);
    if (prec == 0 && nd == 1 && digits[0] == '0')
        nd = 0; /* printf("%.0d", 0) prints nothing */
    char sign = neg ? '-' : (flags & F_PLUS) ? '+' : (flags & F_SPACE) ? ' ' : 0;
    int plen = (int)strlen(prefix) + (sign ? 1 : 0);
    int zeros = prec > nd ? prec - nd : 0;
    int len = plen + zeros + nd;
    if ((flags & F_ZERO) && !(flags & F_LEFT) && prec < 0 && width > len) {
        zeros += width - len;
        len = width;
    }
    if (!(flags & F_LEFT))
        emit_pad(s, ' ', width - len);
    if (sign)
        emit(s, sign);
    while (*prefix)
        emit(s, *prefix++);
    emit_pad(s, '0', zeros);
    while (nd)
        emit(s, digits[--nd]);
    if (flags & F_LEFT)
        emit_pad(s, ' ', width - len);
}

static int vformat(sink_t *s, const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            emit(s, *fmt);
            continue;
        }
        const char *spec = fmt++;
        int flags = 0, width = 0, prec = -1, lng = 0;
        for (;; fmt++) {
            if (*fmt == '-')
                flags |= F_LEFT;
            else if (*fmt == '0')
                flags |= F_ZERO;
            else if (*fmt == '+')
                flags |= F_PLUS;
            else if (*fmt == ' ')
                flags |= F_SPACE;
            else
                break;
        }
        if (*fmt == '*') {
            width = va_arg(ap, int);
            if (width < 0) {
                flags |= F_LEFT;
                width = -width;
            }
            fmt++;
        } else {
            while (*fmt >= '0' && *fmt <= '9')
                width = width * 10 + (*fmt++ - '0');
        }
        if (*fmt == '.') {
            fmt++;
            prec = 0;
            if (*fmt == '*') {
                prec = va_arg(ap, int);
                if (prec < 0)
                    prec = -1;
                fmt++;
            } else {
                while (*fmt >= '0' && *fmt <= '9')
                    prec = prec * 10 + (*fmt++ - '0');
            }
        }
        for (;; fmt++) {
            if (*fmt == 'l' || *fmt == 'z' || *fmt == 'j' || *fmt == 't')
                lng = 1; /* all 64-bit on x86-64 */
            else if (*fmt != 'h')
                break;
        }
        switch (*fmt) {
        case 'd':
        case 'i': {
            i64 v = lng ? va_arg(ap, i64) : (i64)va_arg(ap, int);
            u64 mag = v < 0 ? (u64)0 - (u64)v : (u64)v;
            fmt_num(s, mag, v < 0, 10, 0, "", width, prec, flags);
            break;
        }
        case 'u':
        case 'x':
        case 'X': {
            u64 v = lng ? va_arg(ap, u64) : (u64)va_arg(ap, unsigned);
            unsigned base = *fmt == 'u' ? 10 : 16;
            fmt_num(s, v, 0, base, *fmt == 'X', "", width, prec, flags & ~(F_PLUS | F_SPACE));
            break;
        }
        case 'p':
            fmt_num(s, (u64)(uintptr_t)va_arg(ap, void *), 0, 16, 0, "0x", width, prec,
                    flags & ~(F_PLUS | F_SPACE));
            break;
        case 's':
            fmt_str(s, va_arg(ap, const char *), width, prec, flags);
            break;
        case 'c': {
            char c[2] = {(char)va_arg(ap, int), 0};
            if (!(flags & F_LEFT))
                emit_pad(s, ' ', width - 1);
            emit(s, c[0]);
            if (flags & F_LEFT)
                emit_pad(s, ' ', width - 1);
            break;
        }
        case '%':
            emit(s, '%');
            break;
        default: /* unknown conversion: print it verbatim */
            for (; spec <= fmt && *spec; spec++)
                emit(s, *spec);
            if (!*fmt)
                fmt--;
            break;
        }
    }
    return (int)s->n;
}

int vprintf(const char *fmt, va_list ap)
{
    sink_t s = {0, 0, 0};
    return vformat(&s, fmt, ap);
}

int printf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vprintf(fmt, ap);
    va_end(ap);
    return n;
}

int vsnprintf(char *buf, size_t size, const char *fmt, va_list ap)
{
    char dummy;
    sink_t s = {buf ? buf : &dummy, buf ? size : 0, 0};
    int n = vformat(&s, fmt, ap);
    if (buf && size)
        buf[s.n < size ? s.n : size - 1] = 0;
    return n;
}

int snprintf(char *buf, size_t size, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, size, fmt, ap);
    va_end(ap);
    return n;
}
