/* rmwcount: checks that the kernel never runs an instruction twice when it
 * stops the vCPU (preemption, pause, event upcalls).
 *
 * Each of `iters` iterations (default 2M) updates memory with one
 * read-modify-write instruction of each kind below, written in asm so the
 * compiler cannot split them into load + store:
 *   addq $1, slot[i % 64]      -- the slots must sum to iters
 *   subq $1, down              -- must end at -iters
 *   xchgq i, last              -- must hand back i - 1, the previous store
 * Every 256 iterations it makes a hypercall, so stops also land around
 * syscalls.  Upcalls are registered (evtchn_init), so a kernel that delivers
 * events interrupts this loop too.  Last line:
 *   rmwcount: iters=N add=A sub=S xchg_bad=X upcalls=U ok|BAD
 * Exits 0 if every count is exact, 1 otherwise.
 */
#include "isovisor.h"

static u64 slot[64];
static u64 down;
static u64 last;

int main(void)
{
    u64 iters = param_u64("iters", 2000000);
    long r = evtchn_init();
    if (r < 0)
        printf("rmwcount: evtchn_init failed (%ld); running without upcalls\n", r);
    u64 xchg_bad = 0;
    last = 0;
    for (u64 i = 1; i <= iters; i++) {
        u64 k = i & 63;
        __asm__ volatile("addq $1, %0" : "+m"(slot[k]));
        __asm__ volatile("subq $1, %0" : "+m"(down));
        u64 v = i;
        __asm__ volatile("xchgq %0, %1" : "+r"(v), "+m"(last));
        xchg_bad += v != i - 1;
        if ((i & 255) == 0)
            (void)time_ns();
    }
    u64 add = 0;
    for (int j = 0; j < 64; j++)
        add += slot[j];
    u64 sub = -down;
    int ok = add == iters && sub == iters && xchg_bad == 0 && last == iters;
    printf("rmwcount: iters=%lu add=%lu sub=%lu xchg_bad=%lu upcalls=%lu %s\n",
           (unsigned long)iters, (unsigned long)add, (unsigned long)sub,
           (unsigned long)xchg_bad, (unsigned long)evtchn_upcalls_total(), ok ? "ok" : "BAD");
    return ok ? 0 : 1;
}
