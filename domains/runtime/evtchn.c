/* isovisor guest runtime: event channels and the upcall entry (docs/devices.md).
 *
 * The kernel enters __isv_upcall_entry on the interrupted stack (128 bytes
 * below its rsp) with rdi = the port bits it delivered, rsp 16-byte aligned as
 * after a call, and a return address of 0.  The entry calls __isv_upcall(bits)
 * and finishes with HC_UPCALL_RETURN, which restores the interrupted context
 * exactly (every register, the hypercall block) and clears SH_UPCALL_MASK.  It
 * never returns with `ret`.
 *
 * Upcalls arrive at instruction boundaries while SH_UPCALL_MASK is 0, so any
 * read-modify-write of evtchn_fired outside the handler is a single locked
 * instruction (or runs with upcalls masked).
 */
#include "isovisor.h"

#define EV_STR_(x) #x
#define EV_STR(x) EV_STR_(x)

#define SH_WORD(off) ((volatile u64 *)(uintptr_t)(SHARED_INFO_ADDR + (off)))
#define BARRIER() __asm__ volatile("" ::: "memory")

volatile u64 evtchn_fired;

static int upcall_registered;
static volatile u64 port_upcalls[EVTCHN_PORTS];
static volatile u64 total_upcalls;

static struct {
    evtchn_handler_fn fn;
    void *ctx;
} handlers[EVTCHN_PORTS];

void __isv_upcall(u64 bits);
NORETURN void __isv_upcall_return_failed(long r);

/* The entry point.  `andq $-16` makes the call correctly aligned whatever the
 * kernel did; the interrupted context is restored by HC_UPCALL_RETURN, so
 * nothing needs saving here.  `cld`: the C ABI wants DF clear (the kernel
 * restores the interrupted rflags). */
__asm__(".text\n"
        ".globl __isv_upcall_entry\n"
        ".type __isv_upcall_entry, @function\n"
        "__isv_upcall_entry:\n"
        "    cld\n"
        "    andq $-16, %rsp\n"
        "    call __isv_upcall\n"
        "    movq $" EV_STR(HC_UPCALL_RETURN) ", " EV_STR(HCALL_BLOCK_ADDR) " + " EV_STR(HB_NR) "\n"
        "    syscall\n"
        /* only reached if the kernel refused: report and crash */
        "    movq " EV_STR(HCALL_BLOCK_ADDR) " + " EV_STR(HB_RET) ", %rdi\n"
        "    call __isv_upcall_return_failed\n"
        "1:  ud2\n"
        "    jmp 1b\n"
        ".size __isv_upcall_entry, . - __isv_upcall_entry\n");

extern char __isv_upcall_entry[];

/* Runs in upcall context: upcalls are masked until HC_UPCALL_RETURN. */
__attribute__((used)) void __isv_upcall(u64 bits)
{
    volatile u64 *pending = SH_WORD(SH_PENDING);
    u64 all = bits | *pending;
    __atomic_fetch_or(&evtchn_fired, all, __ATOMIC_SEQ_CST);
    __atomic_fetch_and(pending, ~all, __ATOMIC_SEQ_CST);
    total_upcalls = total_upcalls + 1;
    for (u64 p = 1; p < EVTCHN_PORTS; p++) {
        u64 bit = (u64)1 << p;
        if (!(all & bit))
            continue;
        if (bits & bit)
            port_upcalls[p] = port_upcalls[p] + 1;
        evtchn_handler_fn fn = handlers[p].fn;
        if (fn)
            fn(p, handlers[p].ctx);
    }
}

NORETURN void __isv_upcall_return_failed(long r)
{
    crashf("isovisor runtime: HC_UPCALL_RETURN failed (%ld): the kernel did not resume the "
           "interrupted context",
           r);
}

long evtchn_init(void)
{
    if (upcall_registered)
        return 0;
    long r = hypercall1(HC_SET_UPCALL, (u64)(uintptr_t)__isv_upcall_entry);
    if (r == 0)
        upcall_registered = 1;
    return r;
}

int evtchn_ready(void) { return upcall_registered; }

long evtchn_send(u64 port)
{
    if (port == 0 || port >= EVTCHN_PORTS)
        return -EINVAL;
    return hypercall1(HC_EVTCHN_SEND, port);
}

void evtchn_mask(void)
{
    BARRIER();
    *SH_WORD(SH_UPCALL_MASK) = 1;
    BARRIER();
}

void evtchn_unmask(void)
{
    BARRIER();
    *SH_WORD(SH_UPCALL_MASK) = 0;
    BARRIER();
}

u64 evtchn_take(u64 mask)
{
    /* One locked read-modify-write: an upcall lands before or after it, never
     * inside, so no bit is lost and nothing needs masking. */
    return __atomic_fetch_and(&evtchn_fired, ~mask, __ATOMIC_SEQ_CST) & mask;
}

long evtchn_block(u64 timeout_ns) { return hypercall1(HC_BLOCK, timeout_ns); }

u64 evtchn_wait(u64 mask, u64 timeout_ns)
{
    u64 deadline = POLL_FOREVER;
    if (timeout_ns != POLL_FOREVER && timeout_ns != 0) {
        u64 now = time_ns();
        deadline = now + timeout_ns;
        if (deadline < now || deadline == POLL_FOREVER)
            deadline = POLL_FOREVER - 1; /* saturate: still finite */
    }
    for (;;) {
        evtchn_mask();
        u64 got = evtchn_take(mask);
        if (got) {
            evtchn_unmask();
            return got;
        }
        u64 left = POLL_FOREVER;
        if (timeout_ns == 0) {
            evtchn_unmask();
            return 0;
        }
        if (deadline != POLL_FOREVER) {
            u64 now = time_ns();
            if (now >= deadline) {
                evtchn_unmask();
                return 0;
            }
            left = deadline - now;
        }
        /* Unmasks atomically; an event pending now (or arriving while asleep)
         * is delivered by an upcall before this returns. */
        long r = evtchn_block(left);
        BARRIER();
        if (r > 0) {
            /* no handler registered: HC_BLOCK returned (and cleared) the bits */
            __atomic_fetch_or(&evtchn_fired, (u64)r, __ATOMIC_SEQ_CST);
        } else if (r < 0) {
            /* HC_BLOCK refused (an old kernel?): do not spin */
            evtchn_unmask();
            return evtchn_take(mask);
        }
    }
}

int evtchn_bind(u64 port, evtchn_handler_fn fn, void *ctx)
{
    if (port == 0 || port >= EVTCHN_PORTS)
        return -EINVAL;
    /* the handler may run between the two stores: mask */
    u64 was = *SH_WORD(SH_UPCALL_MASK);
    evtchn_mask();
    handlers[port].ctx = ctx;
    handlers[port].fn = fn;
    BARRIER();
    *SH_WORD(SH_UPCALL_MASK) = was;
    BARRIER();
    return 0;
}

u64 evtchn_upcalls(u64 port) { return port < EVTCHN_PORTS ? port_upcalls[port] : 0; }

u64 evtchn_upcalls_total(void) { return total_upcalls; }
