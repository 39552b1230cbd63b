"""The guest <-> kernel ABI: guest-physical layout and hypercall numbers.

This module is the single source of truth.  The guest runtime's C header
(``isovisor_abi.h``) is generated from it by :func:`c_header`, so the C side and
the kernel can never disagree.  The human-readable reference is
``docs/hypercalls.md``.

Calling convention (why a mailbox and not registers): every unicorn register
access from Python costs microseconds, while a word in guest RAM is a plain
memoryview load because guest RAM is a shared-memory segment the kernel maps
too.  So a guest stores the hypercall number and arguments in its vCPU's
*hypercall block*, executes ``syscall``, and reads the result back from the
block.  The runtime's stubs (``hypercall.h``) hide this; C code just calls
``hypercall3(HC_CONSOLE_WRITE, ptr, len, 0)``.
"""

from __future__ import annotations

import errno as _errno
from typing import Final

PAGE_SIZE: Final = 0x1000

# --- guest-physical layout -------------------------------------------------
#: Page 0 is never mapped, so a NULL dereference faults.
NULL_GUARD_END: Final = 0x1000
#: Start-info page: filled by the kernel before the first instruction.
START_INFO_ADDR: Final = 0x1000
#: Hypercall blocks, one per vCPU, HCALL_BLOCK_SIZE bytes each.
HCALL_BLOCK_ADDR: Final = 0x2000
HCALL_BLOCK_SIZE: Final = 64
#: Shared-info page: event-channel pending/mask words (used by device I/O).
SHARED_INFO_ADDR: Final = 0x3000
#: The flat image is loaded here and entered at its first byte.
IMAGE_BASE: Final = 0x100000
#: Bytes kept free for the stack between the image's end and the top of RAM.
MIN_STACK_BYTES: Final = 64 * 1024
#: Smallest and largest domain memory, in MiB.
MIN_MEMORY_MIB: Final = 2
MAX_MEMORY_MIB: Final = 4096

# --- start-info page (all little-endian u64 unless noted) -------------------
START_INFO_MAGIC: Final = 0x31565349564F5349  # "ISOVISV1" read as a u64
ABI_VERSION: Final = 2
SI_MAGIC: Final = 0x00
SI_ABI_VERSION: Final = 0x08
SI_DOMID: Final = 0x10
SI_MEM_BYTES: Final = 0x18
SI_IMAGE_BASE: Final = 0x20
SI_IMAGE_SIZE: Final = 0x28
SI_STACK_TOP: Final = 0x30
SI_HCALL_BLOCK: Final = 0x38
SI_NAME: Final = 0x40  # char[64], NUL-terminated
SI_NAME_MAX: Final = 64
SI_CMDLINE: Final = 0x80  # char[1024], NUL-terminated: the domain's `extra`
SI_CMDLINE_MAX: Final = 1024
SI_NR_DEVICES: Final = 0x500  # u64: entries in the device table
SI_DEVICES: Final = 0x508  # device table: SI_MAX_DEVICES entries of DEV_ENTRY_SIZE bytes
SI_MAX_DEVICES: Final = 16

# --- device table entry (in the start-info page) -----------------------------
DEV_ENTRY_SIZE: Final = 64
DE_KIND: Final = 0x00  # u64: DEV_KIND_*
DE_DEVID: Final = 0x08  # u64: device number (Xen vdev numbering: xvda = 51712)
DE_PORT: Final = 0x10  # u64: event-channel port of the device (1..63)
DE_REGION: Final = 0x18  # u64: guest-physical address of the device region
DE_REGION_SIZE: Final = 0x20  # u64: bytes of the region mapped into the guest
DE_NAME: Final = 0x28  # char[24], NUL-terminated: "xvda"
DE_NAME_MAX: Final = 24
DEV_KIND_VBD: Final = 1
DEV_KIND_VIF: Final = 2
DEV_KIND_CONSOLE: Final = 3

# --- device regions ----------------------------------------------------------
#: Device regions are mapped far above guest RAM, one window per device.
DEVICE_REGION_BASE: Final = 0x10_0000_0000
DEVICE_REGION_STRIDE: Final = 0x1000_0000

# --- shared-info page (event delivery) ---------------------------------------
SH_UPCALL_MASK: Final = 0x00  # u64: non-zero = upcalls masked (guest-owned)
SH_PENDING: Final = 0x08  # u64: ports delivered by upcalls; the guest clears what it handled
SH_UPCALLS: Final = 0x10  # u64: upcalls delivered so far
#: The guest clock (kernel/clock.py, docs/hypercalls.md): guest ns =
#: SYSTEM + ((rdtsc - TSC) * MUL >> 32), read while VERSION is even and unchanged.
SH_CLOCK_VERSION: Final = 0x40  # u64: odd while the kernel updates the parameters
SH_CLOCK_TSC: Final = 0x48  # u64: host TSC at which the guest's time was SYSTEM
SH_CLOCK_SYSTEM: Final = 0x50  # u64: guest virtual ns at TSC
SH_CLOCK_MUL: Final = 0x58  # u64: ns per TSC tick, 32.32 fixed point
SH_CLOCK_FLAGS: Final = 0x60  # u64: CLOCK_F_*
SH_CLOCK_WALL: Final = 0x68  # u64: Unix-epoch ns at guest time 0 (wall = WALL + time)
SH_CLOCK_EPOCH: Final = 0x70  # u64: restores and migrations of this guest so far
#: The parameters are valid; without it the guest asks HC_TIME.
CLOCK_F_TSC: Final = 1
#: The guest was saved and restored (or migrated) since it last cleared this bit (the
#: guest may clear it; the kernel only sets it).
CLOCK_F_STOPPED: Final = 2
#: Event-channel ports are bits of a u64; port 0 is reserved.
EVTCHN_PORTS: Final = 64

# --- hypercall block (per vCPU) ---------------------------------------------
HB_NR: Final = 0x00  # u64 hypercall number
HB_ARGS: Final = 0x08  # u64 args[6]
HB_RET: Final = 0x38  # s64 result; negative errno on failure

# --- hypercall numbers ------------------------------------------------------
HC_NULL: Final = 0  # () -> 0.  Does nothing; for measuring the round trip.
HC_CONSOLE_WRITE: Final = 1  # (ptr, len) -> bytes written
HC_YIELD: Final = 2  # () -> 0.  Give up the rest of the time slice.
HC_POLL: Final = 3  # (port_mask, timeout_ns) -> pending bits of mask, 0 on timeout
HC_TIME: Final = 4  # () -> virtual ns since domain start (excludes paused time)
HC_SHUTDOWN: Final = 5  # (reason, code) -> does not return
HC_WATCHDOG: Final = 6  # (timeout_ms) -> 0.  Arm/re-arm; 0 disarms.
HC_SET_UPCALL: Final = 7  # (handler) -> 0.  Register the event upcall handler; 0 removes it.
HC_UPCALL_RETURN: Final = 8  # () -> resumes the context the upcall interrupted
HC_BLOCK: Final = 9  # (timeout_ns) -> unmask upcalls and sleep until an event (see docs)
HC_EVTCHN_SEND: Final = 10  # (port) -> 0.  Notify the other end of a device's channel.
HC_STORE_READ: Final = 11  # (path, path_len, buf, buf_len) -> value length
HC_STORE_WRITE: Final = 12  # (path, path_len, value, value_len) -> 0
HC_DEVICE_FAULT: Final = 13  # (port, code, msg, msg_len, rsp_cons, flags) -> 0 or 1 (hold)
HC_DEVICE_HELD: Final = 14  # (port) -> 1 while the device's responses are held, else 0
HC_COUNT: Final = 15

HYPERCALL_NAMES: Final[dict[int, str]] = {
    HC_NULL: "null",
    HC_CONSOLE_WRITE: "console_write",
    HC_YIELD: "yield",
    HC_POLL: "poll",
    HC_TIME: "time",
    HC_SHUTDOWN: "shutdown",
    HC_WATCHDOG: "watchdog",
    HC_SET_UPCALL: "set_upcall",
    HC_UPCALL_RETURN: "upcall_return",
    HC_BLOCK: "block",
    HC_EVTCHN_SEND: "evtchn_send",
    HC_STORE_READ: "store_read",
    HC_STORE_WRITE: "store_write",
    HC_DEVICE_FAULT: "device_fault",
    HC_DEVICE_HELD: "device_held",
}

#: Limits of the store hypercalls (bytes).
STORE_PATH_MAX: Final = 256
STORE_VALUE_MAX: Final = 4096

# HC_DEVICE_FAULT codes: what the frontend caught its backend doing
FAULT_UNKNOWN_ID: Final = 1  # a response whose id matches no request in flight
FAULT_BAD_STATUS: Final = 2  # a status that is not OKAY / ERROR / EOPNOTSUPP
FAULT_EXTRA_RESPONSE: Final = 3  # more responses published than requests outstanding
FAULT_BAD_OP: Final = 4  # a response whose operation differs from its request's
FAULT_HANDSHAKE: Final = 5  # the backend broke the connection handshake
FAULT_BAD_RESPONSE: Final = 6  # non-zero reserved fields (e.g. a slot still holding a request)
#: HC_DEVICE_FAULT flag: the frontend can hold its responses until the kernel has the
#: requests from ``rsp_cons`` on redone by a replacement driver (docs/recovery.md).
FAULT_F_HOLD: Final = 1
#: Codes a hold can repair: a response (or the response index) was bad, not the handshake.
FAULT_CODES_HOLDABLE: Final = (
    FAULT_UNKNOWN_ID,
    FAULT_BAD_STATUS,
    FAULT_EXTRA_RESPONSE,
    FAULT_BAD_OP,
    FAULT_BAD_RESPONSE,
)

#: HC_POLL timeout meaning "wait forever".
POLL_FOREVER: Final = 0xFFFF_FFFF_FFFF_FFFF
#: Largest console write accepted in one hypercall; the runtime splits longer ones.
CONSOLE_WRITE_MAX: Final = 4096

# shutdown reasons (Xen SHUTDOWN_*)
SHUTDOWN_POWEROFF: Final = 0
SHUTDOWN_REBOOT: Final = 1
SHUTDOWN_CRASH: Final = 2

# errno values returned (negated) in HB_RET
EPERM: Final = _errno.EPERM
ENOENT: Final = _errno.ENOENT
E2BIG: Final = _errno.E2BIG
EFAULT: Final = _errno.EFAULT
EINVAL: Final = _errno.EINVAL
ENOSYS: Final = _errno.ENOSYS
EMSGSIZE: Final = _errno.EMSGSIZE
EACCES: Final = _errno.EACCES
ENOTCONN: Final = _errno.ENOTCONN
ERANGE: Final = _errno.ERANGE


def c_header() -> str:
    """Render the ABI as a C header for the guest runtime."""
    names = [n for n in globals() if n.isupper() and isinstance(globals()[n], int)]
    lines = [
        "/* Generated from kernel/abi.py by domains/build.py -- do not edit. */",
        "#ifndef ISOVISOR_ABI_H",
        "#define ISOVISOR_ABI_H",
    ]
    for n in names:
        v = globals()[n]
        lines.append(f"#define {n} {v:#x}ULL" if v > 0x7FFFFFFF else f"#define {n} {v}")
    lines.append("#endif")
    return "\n".join(lines) + "\n"
