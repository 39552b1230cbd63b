/* busy: pure CPU spin for scheduler tests.  Prints `busy: started`, then loops
 * forever with no hypercalls.  If report > 0, prints `busy: iter <k>` every
 * `report` million iterations, where k is the number of millions done.
 */
#include "isovisor.h"

int main(void)
{
    u64 report = param_u64("report", 0);
    u64 every = report * 1000000ULL;
    u64 x = 0x9E3779B97F4A7C15ULL;
    printf("busy: started\n");
    for (u64 i = 1;; i++) {
        x = x * 6364136223846793005ULL + 1442695040888963407ULL;
        x ^= x >> 29;
        OPAQUE(x);
        if (every && i % every == 0)
            printf("busy: iter %lu\n", (unsigned long)(i / 1000000ULL));
    }
}
