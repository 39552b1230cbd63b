/* badcalls: probes the kernel's handling of bad hypercalls with the raw stubs
 * (not the splitting console_write), one line each:
 *   badcalls: unknown=<hypercall0(999)>
 *   badcalls: efault=<console write, ptr 0x7f0000000000, len 16>
 *   badcalls: null_ptr=<console write, ptr 0, len 4>
 *   badcalls: huge=<console write, ptr IMAGE_BASE, len 1<<20>
 *   badcalls: wrap=<console write, ptr 0xfffffffffffffff0, len 32>
 *   badcalls: done
 */
#include "isovisor.h"

int main(void)
{
    long r;
    r = hypercall0(999);
    printf("badcalls: unknown=%ld\n", r);
    r = hypercall2(HC_CONSOLE_WRITE, 0x7f0000000000ULL, 16);
    printf("badcalls: efault=%ld\n", r);
    r = hypercall2(HC_CONSOLE_WRITE, 0, 4);
    printf("badcalls: null_ptr=%ld\n", r);
    r = hypercall2(HC_CONSOLE_WRITE, IMAGE_BASE, 1ULL << 20);
    if (r > 0)
        putchar('\n'); /* a kernel that accepted the write left a partial line */
    printf("badcalls: huge=%ld\n", r);
    r = hypercall2(HC_CONSOLE_WRITE, 0xfffffffffffffff0ULL, 32);
    printf("badcalls: wrap=%ld\n", r);
    printf("badcalls: done\n");
    return 0;
}
