/* Guest entry point.  The linker script places .text.entry at IMAGE_BASE, so
 * _start is the image's first byte.
 *
 * On entry: rsp = top of guest RAM (16-byte aligned), rdi = START_INFO_ADDR.
 */
#include "isovisor_abi.h"

    .section .text.entry, "ax", @progbits
    .globl _start
    .type _start, @function
_start:
    cld
    xorl    %ebp, %ebp
    andq    $-16, %rsp
    movq    %rdi, %rbx                  /* start info; rbx is callee-saved */

    /* Refuse to zero a .bss that would run into the stack (or past RAM). */
    leaq    __bss_start(%rip), %rdi
    leaq    __bss_end(%rip), %rcx
    leaq    -MIN_STACK_BYTES(%rsp), %rax
    cmpq    %rax, %rcx
    ja      .Ltoo_big

    subq    %rdi, %rcx
    shrq    $3, %rcx                    /* guest.ld aligns both ends to 16 */
    xorl    %eax, %eax
    rep stosq                           /* zero .bss, 8 bytes per step */

    movq    %rbx, %rdi
    call    __isovisor_init             /* saves the start info */
    call    main
    movl    %eax, %edi
    call    exit
.Lhang:
    jmp     .Lhang

.Ltoo_big:
    movq    %rbx, %rdi
    call    __isovisor_image_too_big    /* reports and crashes; no .bss needed */
    jmp     .Lhang
    .size _start, . - _start

    .section .note.GNU-stack, "", @progbits
