/* hcbench: measures the HC_NULL round trip.  Param calls (default 1000000).
 * Times `calls` HC_NULL hypercalls and an identical loop without the
 * hypercall, subtracts, and prints:
 *   hcbench: calls=<N> ns_per_call=<x.yyy>
 */
#include "isovisor.h"

int main(void)
{
    u64 calls = param_u64("calls", 1000000);
    if (calls == 0)
        crash("hcbench: calls must be at least 1");

    u64 t0 = time_ns();
    for (u64 i = 0; i < calls; i++) {
        OPAQUE(i);
        hypercall0(HC_NULL);
    }
    u64 t1 = time_ns();
    for (u64 i = 0; i < calls; i++) {
        OPAQUE(i);
        __asm__ volatile("" ::: "memory");
    }
    u64 t2 = time_ns();

    u64 hc = t1 - t0, empty = t2 - t1;
    u64 net = hc > empty ? hc - empty : 0;
    u64 ps = net * 1000ULL / calls; /* picoseconds per call */
    printf("hcbench: calls=%lu ns_per_call=%lu.%03lu\n", (unsigned long)calls,
           (unsigned long)(ps / 1000), (unsigned long)(ps % 1000));
    return 0;
}
