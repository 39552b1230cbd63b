/* ticker: prints a line every interval_ms (default 1000) of virtual time:
 *   ticker: tick <k> vtime_ms=<ms>
 * with k = 1, 2, ...  Runs until stopped, or exits 0 after `count` ticks if
 * count > 0.  Deadlines are absolute, so ticks do not drift.
 */
#include "isovisor.h"

int main(void)
{
    u64 interval_ns = param_u64("interval_ms", 1000) * 1000000ULL;
    u64 count = param_u64("count", 0);
    u64 start = time_ns();
    for (u64 k = 1; count == 0 || k <= count; k++) {
        u64 deadline = start + k * interval_ns;
        for (;;) {
            u64 now = time_ns();
            if (now >= deadline)
                break;
            sleep_ns(deadline - now);
        }
        printf("ticker: tick %lu vtime_ms=%lu\n", (unsigned long)k,
               (unsigned long)(time_ns() / 1000000ULL));
    }
    return 0;
}
