/* Hypercall stubs for isovisor guests.
 *
 * Convention (kernel/abi.py): the guest stores the hypercall number and up to
 * six u64 arguments in its vCPU's hypercall block, executes `syscall`, and reads
 * the signed result (negative errno on failure) back from the block.  Guests
 * have a single vCPU, whose block is at HCALL_BLOCK_ADDR.
 */
#ifndef ISOVISOR_HYPERCALL_H
#define ISOVISOR_HYPERCALL_H

#include <stdint.h>

#include "isovisor_abi.h"

#define HB_WORD(off) (*(volatile uint64_t *)(uintptr_t)(HCALL_BLOCK_ADDR + (off)))

static inline __attribute__((always_inline)) long
hypercall6(uint64_t nr, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4,
           uint64_t a5)
{
    HB_WORD(HB_NR) = nr;
    HB_WORD(HB_ARGS + 0) = a0;
    HB_WORD(HB_ARGS + 8) = a1;
    HB_WORD(HB_ARGS + 16) = a2;
    HB_WORD(HB_ARGS + 24) = a3;
    HB_WORD(HB_ARGS + 32) = a4;
    HB_WORD(HB_ARGS + 40) = a5;
    __asm__ volatile("syscall" ::: "memory", "rcx", "r11");
    return (long)HB_WORD(HB_RET);
}

static inline __attribute__((always_inline)) long
hypercall5(uint64_t nr, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3, uint64_t a4)
{
    HB_WORD(HB_NR) = nr;
    HB_WORD(HB_ARGS + 0) = a0;
    HB_WORD(HB_ARGS + 8) = a1;
    HB_WORD(HB_ARGS + 16) = a2;
    HB_WORD(HB_ARGS + 24) = a3;
    HB_WORD(HB_ARGS + 32) = a4;
    __asm__ volatile("syscall" ::: "memory", "rcx", "r11");
    return (long)HB_WORD(HB_RET);
}

static inline __attribute__((always_inline)) long
hypercall4(uint64_t nr, uint64_t a0, uint64_t a1, uint64_t a2, uint64_t a3)
{
    HB_WORD(HB_NR) = nr;
    HB_WORD(HB_ARGS + 0) = a0;
    HB_WORD(HB_ARGS + 8) = a1;
    HB_WORD(HB_ARGS + 16) = a2;
    HB_WORD(HB_ARGS + 24) = a3;
    __asm__ volatile("syscall" ::: "memory", "rcx", "r11");
    return (long)HB_WORD(HB_RET);
}

static inline __attribute__((always_inline)) long
hypercall3(uint64_t nr, uint64_t a0, uint64_t a1, uint64_t a2)
{
    HB_WORD(HB_NR) = nr;
    HB_WORD(HB_ARGS + 0) = a0;
    HB_WORD(HB_ARGS + 8) = a1;
    HB_WORD(HB_ARGS + 16) = a2;
    __asm__ volatile("syscall" ::: "memory", "rcx", "r11");
    return (long)HB_WORD(HB_RET);
}

static inline __attribute__((always_inline)) long
hypercall2(uint64_t nr, uint64_t a0, uint64_t a1)
{
    HB_WORD(HB_NR) = nr;
    HB_WORD(HB_ARGS + 0) = a0;
    HB_WORD(HB_ARGS + 8) = a1;
    __asm__ volatile("syscall" ::: "memory", "rcx", "r11");
    return (long)HB_WORD(HB_RET);
}

static inline __attribute__((always_inline)) long
hypercall1(uint64_t nr, uint64_t a0)
{
    HB_WORD(HB_NR) = nr;
    HB_WORD(HB_ARGS + 0) = a0;
    __asm__ volatile("syscall" ::: "memory", "rcx", "r11");
    return (long)HB_WORD(HB_RET);
}

static inline __attribute__((always_inline)) long
hypercall0(uint64_t nr)
{
    HB_WORD(HB_NR) = nr;
    __asm__ volatile("syscall" ::: "memory", "rcx", "r11");
    return (long)HB_WORD(HB_RET);
}

#endif /* ISOVISOR_HYPERCALL_H */
