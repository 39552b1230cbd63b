/* isovisor guest runtime: the string.h functions gcc may call even in
 * freestanding code.  Built with -fno-tree-loop-distribute-patterns so gcc does
 * not turn these loops back into calls to themselves. */
#include "isovisor.h"

typedef u64 __attribute__((may_alias)) word_t;

void *memset(void *dst, int c, size_t n)
{
    u8 *d = dst;
    u8 b = (u8)c;
    while (n && ((uintptr_t)d & 7)) {
        *d++ = b;
        n--;
    }
    word_t w = (word_t)b * 0x0101010101010101ULL;
    for (; n >= 8; n -= 8, d += 8)
        *(word_t *)d = w;
    while (n--)
        *d++ = b;
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    u8 *d = dst;
    const u8 *s = src;
    if ((((uintptr_t)d ^ (uintptr_t)s) & 7) == 0) {
        while (n && ((uintptr_t)d & 7)) {
            *d++ = *s++;
            n--;
        }
        for (; n >= 8; n -= 8, d += 8, s += 8)
            *(word_t *)d = *(const word_t *)s;
    }
    while (n--)
        *d++ = *s++;
    return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
    u8 *d = dst;
    const u8 *s = src;
    if (d == s || n == 0)
        return dst;
    if (d < s || d >= s + n)
        return memcpy(dst, src, n);
    /* overlapping, destination above source: copy backwards */
    d += n;
    s += n;
    while (n--)
        *--d = *--s;
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const u8 *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x < *y ? -1 : 1;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

int strcmp(const char *a, const char *b)
{
    while (*a && *a == *b) {
        a++;
        b++;
    }
    return (unsigned char)*a - (unsigned char)*b;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (; n; n--, a++, b++) {
        if (*a != *b)
            return (unsigned char)*a - (unsigned char)*b;
        if (!*a)
            return 0;
    }
    return 0;
}
