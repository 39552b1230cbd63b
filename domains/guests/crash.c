/* crash: fault on purpose.  Param mode:
 *   ud       execute ud2 (invalid opcode)
 *   wild     write to 0x40000000000 (unmapped)
 *   null     read from address 0 (page 0 is never mapped)
 *   nullwrite  write to address 8 (page 0)
 *   nullexec   call address 0x10 (page 0)
 *   pastram  read from 16 bytes past the top of RAM
 *   divzero  integer divide by zero
 *   jump     jump to 0x7f0000000000 (unmapped)
 *   hang     arm watchdog(watchdog_ms, default 200), then spin without hypercalls
 *   self     crash("crash: self-reported")
 * Prints `crash: mode=<mode>` first.  An unknown mode prints
 * `crash: unknown mode` and exits 2; a fault that does not stop the guest prints
 * `crash: mode=<mode> did not fault` and exits 3.
 */
#include "isovisor.h"

/* Hide a constant address from the optimiser, so it emits a real access. */
static inline u64 launder(u64 v)
{
    OPAQUE(v);
    return v;
}

int main(void)
{
    char mode[32];
    param_str("mode", "", mode, sizeof mode);
    printf("crash: mode=%s\n", mode);
    console_flush();

    if (!strcmp(mode, "ud")) {
        __asm__ volatile("ud2");
    } else if (!strcmp(mode, "wild")) {
        *(volatile u64 *)(uintptr_t)launder(0x40000000000ULL) = 0xdeadbeef;
    } else if (!strcmp(mode, "null")) {
        u64 v = *(volatile u64 *)(uintptr_t)launder(0);
        OPAQUE(v);
    } else if (!strcmp(mode, "nullwrite")) {
        *(volatile u64 *)(uintptr_t)launder(8) = 1;
    } else if (!strcmp(mode, "nullexec")) {
        void (*fn)(void) = (void (*)(void))(uintptr_t)launder(0x10);
        fn();
    } else if (!strcmp(mode, "pastram")) {
        u64 v = *(volatile u64 *)(uintptr_t)launder(mem_bytes() + 16);
        OPAQUE(v);
    } else if (!strcmp(mode, "divzero")) {
        volatile u64 num = 1, den = 0;
        u64 q = num / den;
        OPAQUE(q);
    } else if (!strcmp(mode, "jump")) {
        void (*fn)(void) = (void (*)(void))(uintptr_t)launder(0x7f0000000000ULL);
        fn();
    } else if (!strcmp(mode, "hang")) {
        watchdog(param_u64("watchdog_ms", 200));
        u64 x = 1;
        for (;;) {
            x = x * 3 + 1;
            OPAQUE(x);
        }
    } else if (!strcmp(mode, "self")) {
        crash("crash: self-reported");
    } else {
        printf("crash: unknown mode\n");
        exit(2);
    }
    printf("crash: mode=%s did not fault\n", mode);
    return 3;
}
