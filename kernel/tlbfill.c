/* The kernel's unicorn TLB fill hook (kernel/fasttlb.py), in C so that a TLB miss costs no
 * Python call: every address maps to itself; data accesses get read and write, instruction
 * fetches read, write and execute.  Built once with the guest toolchain's compiler and
 * cached; kernel/fasttlb.py falls back to the same function in Python without a compiler. */
#include <stdbool.h>
#include <unicorn/unicorn.h>

bool isovisor_tlb_fill(uc_engine *uc, uint64_t address, uc_mem_type type, uc_tlb_entry *entry,
                       void *user_data)
{
    (void)uc;
    (void)user_data;
    entry->paddr = address;
    entry->perms = type == UC_MEM_FETCH ? UC_PROT_ALL : (UC_PROT_READ | UC_PROT_WRITE);
    return true;
}
