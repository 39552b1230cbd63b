/* A multiboot stub that runs an isovisor flat guest image under qemu-system-x86_64 (TCG), for
 * bench/guest_cpu.py's comparison: the same machine code as under isovisor, on QEMU's own
 * engine.  bench/qemu_tcg.py builds it with the guest toolchain and starts QEMU.
 *
 * QEMU loads this stub at STUB_BASE (multiboot v1, "a.out kludge" addresses) and two modules:
 * the guest's flat image, copied to IMAGE_BASE, and the guest's pages 1-3 (start info,
 * hypercall block, shared info with the clock parameters), copied to 0x1000.  The stub maps the
 * first GiB to itself (2 MiB pages, all writable and executable, as isovisor's RAM is), enters
 * long mode, points `syscall` at its hypercall handler, and jumps to the image with rdi = start
 * info and rsp = the top of the guest's RAM, as the kernel does.  The guest runs in ring 0.
 *
 * Hypercalls (the mailbox at HCALL_BLOCK_ADDR): console_write -> QEMU's debug console (port
 * 0xe9); shutdown -> isa-debug-exit (port 0xf4, QEMU exits with (value << 1) | 1, value =
 * reason << 8 | code); time -> the clock parameters of the shared-info page; null, yield, poll,
 * watchdog -> 0; anything else -> -ENOSYS.
 */
    .set MB_MAGIC, 0x1BADB002
    .set MB_FLAGS, 0x00010003          /* page-align modules, memory info, address fields */
    .set IMAGE_BASE, 0x100000
    .set START_INFO, 0x1000
    .set HCALL, 0x2000
    .set SHARED, 0x3000
    .set SI_STACK_TOP, 0x30
    .set DEBUGCON, 0xe9
    .set DEBUG_EXIT, 0xf4

    .section .text.entry, "ax", @progbits
    .code32
    .globl _start
_start:
header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long header                        /* header_addr */
    .long _start                        /* load_addr */
    .long _edata                        /* load_end_addr */
    .long _end                          /* bss_end_addr */
    .long entry32                       /* entry_addr */

entry32:
    cli
    movl    $stack_top, %esp
    movl    %ebx, %ebp                  /* multiboot info */
    /* zero the .bss (page tables, stack) */
    movl    $_edata, %edi
    movl    $_end, %ecx
    subl    %edi, %ecx
    xorl    %eax, %eax
    cld
    rep stosb
    movl    $stack_top, %esp
    /* module 0 -> IMAGE_BASE, module 1 -> START_INFO */
    cmpl    $2, 20(%ebp)                /* mods_count */
    jb      fail32
    movl    24(%ebp), %ebx              /* mods_addr */
    movl    0(%ebx), %esi
    movl    4(%ebx), %ecx
    subl    %esi, %ecx
    movl    $IMAGE_BASE, %edi
    rep movsb
    movl    16(%ebx), %esi
    movl    20(%ebx), %ecx
    subl    %esi, %ecx
    movl    $START_INFO, %edi
    rep movsb
    /* identity map of the first GiB: PML4[0] -> PDPT[0] -> PD of 512 2-MiB pages */
    movl    $pdpt, %eax
    orl     $3, %eax
    movl    %eax, pml4
    movl    $pd, %eax
    orl     $3, %eax
    movl    %eax, pdpt
    movl    $pd, %edi
    movl    $0x83, %eax                 /* present, writable, 2 MiB */
    movl    $512, %ecx
1:  movl    %eax, (%edi)
    movl    $0, 4(%edi)
    addl    $0x200000, %eax
    addl    $8, %edi
    loop    1b
    /* long mode: PAE (+ SSE enabled), CR3, EFER.LME and SCE, paging */
    movl    %cr4, %eax
    orl     $((1 << 5) | (1 << 9) | (1 << 10)), %eax
    movl    %eax, %cr4
    movl    $pml4, %eax
    movl    %eax, %cr3
    movl    $0xC0000080, %ecx
    rdmsr
    orl     $((1 << 8) | (1 << 0)), %eax
    wrmsr
    movl    %cr0, %eax
    andl    $~(1 << 2), %eax            /* no x87 emulation */
    orl     $((1 << 31) | (1 << 1)), %eax
    movl    %eax, %cr0
    lgdt    gdt_desc
    ljmp    $0x08, $entry64

fail32:
    movw    $DEBUG_EXIT, %dx
    movl    $0x2ff, %eax                /* reason 2 (crash), code 255: no modules */
    outl    %eax, %dx
    hlt

    .code64
entry64:
    movw    $0x10, %ax
    movw    %ax, %ds
    movw    %ax, %es
    movw    %ax, %ss
    movw    %ax, %fs
    movw    %ax, %gs
    /* syscall: CS 0x08 (SS 0x10) from STAR[47:32], RIP from LSTAR, no flags masked */
    movl    $0xC0000081, %ecx
    xorl    %eax, %eax
    movl    $0x00000008, %edx
    wrmsr
    movl    $0xC0000082, %ecx
    leaq    hypercall(%rip), %rax
    movq    %rax, %rdx
    shrq    $32, %rdx
    wrmsr
    movl    $0xC0000084, %ecx
    xorl    %eax, %eax
    xorl    %edx, %edx
    wrmsr
    movq    START_INFO + SI_STACK_TOP, %rsp
    movq    $START_INFO, %rdi
    movq    $IMAGE_BASE, %rax
    jmp     *%rax

/* syscall: rcx = return rip, r11 = rflags; the guest's stack has no red zone (-mno-red-zone) */
hypercall:
    pushq   %rax
    pushq   %rcx
    pushq   %rdx
    pushq   %rsi
    pushq   %r8
    pushq   %r9
    movq    HCALL, %rax                 /* nr */
    cmpq    $1, %rax
    je      .Lwrite
    cmpq    $4, %rax
    je      .Ltime
    cmpq    $5, %rax
    je      .Lshutdown
    cmpq    $0, %rax
    je      .Lzero
    cmpq    $2, %rax
    je      .Lzero
    cmpq    $3, %rax
    je      .Lzero
    cmpq    $6, %rax
    je      .Lzero
    movq    $-38, %rax                  /* -ENOSYS */
    jmp     .Lret
.Lzero:
    xorl    %eax, %eax
    jmp     .Lret
.Lwrite:
    movq    HCALL + 8, %rsi
    movq    HCALL + 16, %rcx
    movq    %rcx, %rax
    movw    $DEBUGCON, %dx
    cld
    rep outsb
    jmp     .Lret
.Ltime:                                 /* system + ((tsc - tsc_ts) * mul >> 32) */
    rdtsc
    shlq    $32, %rdx
    orq     %rdx, %rax
    subq    SHARED + 0x48, %rax
    mulq    SHARED + 0x58
    shrdq   $32, %rdx, %rax
    addq    SHARED + 0x50, %rax
    jmp     .Lret
.Lshutdown:
    movq    HCALL + 8, %rax             /* reason */
    shlq    $8, %rax
    movzbq  HCALL + 16, %rdx            /* code (low byte) */
    orq     %rdx, %rax
    movw    $DEBUG_EXIT, %dx
    outl    %eax, %dx
    hlt
.Lret:
    movq    %rax, HCALL + 0x38
    popq    %r9
    popq    %r8
    popq    %rsi
    popq    %rdx
    popq    %rcx
    popq    %rax
    pushq   %r11
    popfq
    jmp     *%rcx

    .section .data
    .align 16
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF            /* 0x08: 64-bit code, ring 0 */
    .quad 0x00CF92000000FFFF            /* 0x10: data */
gdt_end:
gdt_desc:
    .word gdt_end - gdt - 1
    .long gdt

    .section .bss
    .align 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4096
stack:  .skip 16384
stack_top:
