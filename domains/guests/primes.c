/* primes: counts the primes below n (default 1000000) with a sieve of
 * Eratosthenes over odd numbers, one bit each.  Prints:
 *   primes: below <n>: <count>
 * and with timed=1 first `primes: n=<n> ns=<guest ns spent counting>` (bench/guest_cpu.py).
 */
#include "isovisor.h"

int main(void)
{
    u64 n = param_u64("n", 1000000);
    u64 count = 0;
    u64 t0 = time_ns();
    if (n > 2) {
        /* bit i stands for the odd number 2*i+1; i in [0, (n-1)/2) covers 1..n-1 */
        u64 odds = n / 2; /* odd numbers below n: 1, 3, ..., */
        u64 words = (odds + 63) / 64;
        u64 *composite = heap_alloc(words * 8, 8);
        if (!composite)
            crashf("primes: n=%lu needs %lu bytes, only %lu free: lower n or give the domain"
                   " more memory", (unsigned long)n, (unsigned long)(words * 8),
                   (unsigned long)heap_free_bytes());
        memset(composite, 0, words * 8);
        composite[0] |= 1; /* 1 is not prime */
        for (u64 p = 3; p * p < n; p += 2) {
            if (composite[(p / 2) / 64] >> ((p / 2) % 64) & 1)
                continue;
            for (u64 m = p * p; m < n; m += 2 * p)
                composite[(m / 2) / 64] |= (u64)1 << ((m / 2) % 64);
        }
        count = 1; /* 2 */
        for (u64 i = 0; i < odds; i++)
            if (!(composite[i / 64] >> (i % 64) & 1))
                count++;
    }
    if (param_u64("timed", 0))
        printf("primes: n=%lu ns=%lu\n", (unsigned long)n, (unsigned long)(time_ns() - t0));
    printf("primes: below %lu: %lu\n", (unsigned long)n, (unsigned long)count);
    return 0;
}
