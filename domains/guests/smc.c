/* smc: code that is written while it runs, as JITs, loaders and self-patching code do.
 *
 * The guest ABI keeps all RAM readable, writable and executable; this guest checks that code
 * written at run time runs as written, however the engine caches translations:
 *
 *   fresh    copy a small function (`mov $imm, %eax; ret`) into heap memory, call it; then
 *            rewrite its immediate and call it again, `rounds` times (default 2000): every
 *            call must return the value last written (a translation of the old bytes must
 *            never run);
 *   text     patch the immediate of a function in the image's own text the same way;
 *   inline   an instruction that patches the very next instruction of its own block, which
 *            must then run patched;
 *   data     a page used both as data (stored to in a loop) and as code, alternately.
 *
 * Prints one line per check, `smc: <check> ok=<n> bad=<m>`, then `smc: done bad=<total>`,
 * and exits 0 only if nothing was bad.
 */
#include "isovisor.h"

typedef u32 (*fn_t)(void);

/* mov $imm32, %eax ; ret */
static void emit(u8 *at, u32 imm)
{
    at[0] = 0xb8;
    at[1] = (u8)imm;
    at[2] = (u8)(imm >> 8);
    at[3] = (u8)(imm >> 16);
    at[4] = (u8)(imm >> 24);
    at[5] = 0xc3;
}

static void set_imm(u8 *at, u32 imm)
{
    volatile u8 *p = at + 1;
    p[0] = (u8)imm;
    p[1] = (u8)(imm >> 8);
    p[2] = (u8)(imm >> 16);
    p[3] = (u8)(imm >> 24);
}

/* A function in the image's text whose immediate we patch (aligned, so it is all ours). */
__attribute__((noinline, aligned(64))) static u32 in_text(void)
{
    u32 v;
    __asm__ volatile("1: mov $0x11111111, %0\n" : "=a"(v));
    return v;
}

static u32 patch_next(u32 val)
{
    u32 out;
    /* the movl writes the immediate of the mov at 2:, which is in the same block */
    __asm__ volatile("lea 2f(%%rip), %%rdx\n"
                     "movl %1, 1(%%rdx)\n"
                     "2: mov $0, %%eax\n"
                     : "=a"(out)
                     : "r"(val)
                     : "rdx", "memory");
    return out;
}

static u64 report(const char *what, u64 ok, u64 bad)
{
    printf("smc: %s ok=%lu bad=%lu\n", what, (unsigned long)ok, (unsigned long)bad);
    return bad;
}

int main(void)
{
    u64 rounds = param_u64("rounds", 2000);
    u64 total = 0, ok, bad;

    u8 *code = heap_alloc(4096, 4096);
    if (!code)
        crash("smc: no room for a code page");
    emit(code, 0);
    ok = bad = 0;
    for (u64 i = 1; i <= rounds; i++) {
        u32 want = (u32)(i * 2654435761u);
        set_imm(code, want);
        u32 got = ((fn_t)(uintptr_t)code)();
        if (got == want)
            ok++;
        else
            bad++;
    }
    total += report("fresh", ok, bad);

    /* the immediate of in_text's mov: find b8 11 11 11 11 in its first bytes */
    u8 *t = (u8 *)(uintptr_t)&in_text;
    u8 *imm = 0;
    for (int k = 0; k < 32 && !imm; k++)
        if (t[k] == 0xb8 && t[k + 1] == 0x11 && t[k + 2] == 0x11 && t[k + 3] == 0x11 &&
            t[k + 4] == 0x11)
            imm = t + k;
    if (!imm)
        crash("smc: cannot find the instruction to patch in in_text");
    ok = bad = 0;
    for (u64 i = 1; i <= rounds; i++) {
        u32 want = (u32)(i * 40503u + 7);
        set_imm(imm, want);
        if (in_text() == want)
            ok++;
        else
            bad++;
    }
    total += report("text", ok, bad);

    ok = bad = 0;
    for (u64 i = 1; i <= rounds; i++) {
        u32 want = (u32)(i * 97u + 1);
        if (patch_next(want) == want)
            ok++;
        else
            bad++;
    }
    total += report("inline", ok, bad);

    /* one page: a data area at its end stored to in a loop, and a function at its start */
    u8 *mixed = heap_alloc(4096, 4096);
    if (!mixed)
        crash("smc: no room for a mixed page");
    volatile u64 *words = (volatile u64 *)(mixed + 2048);
    ok = bad = 0;
    for (u64 i = 1; i <= rounds; i++) {
        for (int k = 0; k < 64; k++)
            words[k] = i + (u64)k;
        emit(mixed, (u32)i);
        u32 got = ((fn_t)(uintptr_t)mixed)();
        u64 sum = 0;
        for (int k = 0; k < 64; k++)
            sum += words[k];
        if (got == (u32)i && sum == 64 * i + 2016)
            ok++;
        else
            bad++;
    }
    total += report("data", ok, bad);

    printf("smc: done bad=%lu\n", (unsigned long)total);
    return total ? 1 : 0;
}
