"""Make ``emu_stop`` from another thread stop a vCPU only between instructions.

The defect
----------
Unicorn 2 emits an exit check after *every* guest memory access (``check_exit_request`` in
``tcg-op.c``), besides the one at the start of every translation block.  ``uc_emu_stop`` from
another thread (our ticker's preemption, event delivery, pause) sets the flag that both checks
read.  When the check after a *store* fires, unicorn rewinds the guest PC to the start of the
instruction that did the store, and the store has already happened.  The instruction runs again
when the guest resumes: ``addq $1, (mem)`` adds 2, ``xchg`` swaps back, ``cmpxchg`` fails.  Our
block frontend lost a request tag this way (``subq $1, inflight`` ran twice), about once per
30,000 upcalls; ``tests/test_vcpu_stop.py`` reproduces it in seconds without this module.

The fix
-------
Unicorn omits the per-access checks while translating when ``uc_struct.no_exit_request`` is set
(it exists for ARM IT blocks).  The check at block start stays, so a stop lands on an
instruction boundary with every register and store consistent.  Faulting accesses are
unaffected: they leave the block themselves (``cpu_loop_exit_restore`` in ``cputlb.c``).

``no_exit_request`` has no API, so we find it: it sits 50 bytes after a run of fields whose
values we know once the engine is initialised (target page size and mask, host page sizes, the
icache line size, the context mode, the CPU context size that ``uc_context_size`` reports).  If
that run is not found exactly once the kernel refuses to start rather than run guests that can
silently compute wrong results.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from typing import Final

from unicorn import Uc
from unicorn import __version__ as UNICORN_VERSION

#: How far into ``struct uc_struct`` to look (the fields sit at ~0x7c0 in unicorn 2.1.0-2.1.4,
#: which share this layout; 2.0 lacks ``context_content`` and is refused).
_SCAN_BYTES: Final = 0x4000
#: From target_page_size to no_exit_request: u32 page, u32 mask, u64 host page, u64 real host
#: page, int icache line, int context mode, int cpu context size, pad, u64 next_pc, bool
#: hook_insert, bool first_tb, then no_exit_request and init_done.
_NO_EXIT_REQUEST_AT: Final = 50
_INIT_DONE_AT: Final = 51
#: ``uc_context`` header in front of the CPU state (``uc_context_size`` minus the state).
_CONTEXT_HEADERS: Final = (40, 48)
_UC_CTL_CONTEXT_CPU: Final = 1


class UnsupportedUnicorn(RuntimeError):
    """The installed unicorn's layout is not the one this module knows."""


def _fail(why: str) -> UnsupportedUnicorn:
    return UnsupportedUnicorn(
        f"unicorn {UNICORN_VERSION}: {why}. isovisor needs to switch off unicorn's per-access "
        "exit checks so that preempting a guest never re-runs half an instruction "
        "(see kernel/ucstop.py); install a supported release with "
        "`pip install 'unicorn>=2.1.0,<2.2'`"
    )


def stop_only_between_instructions(uc: Uc) -> None:
    """Switch off the per-memory-access exit checks of ``uc``: call it after the first memory
    mapping (which initialises the engine) and before the first ``emu_start``.

    Raises :class:`UnsupportedUnicorn` if the field cannot be located with certainty.
    """
    handle = getattr(uc, "_uch", None)
    base = getattr(handle, "value", None)
    if not isinstance(base, int) or base == 0:
        raise _fail("cannot get the engine handle from the Python binding")
    raw = ctypes.string_at(base, _SCAN_BYTES)  # before context_save, which initialises
    cpu_state = getattr(uc.context_save(), "size", 0)
    target, host = 4096, mmap.PAGESIZE
    head = struct.pack("<IIQQ", target, target - 1, max(host, target), host)
    hits = []
    at = raw.find(head)
    while at != -1:
        icache, mode, state = struct.unpack_from("<iiI", raw, at + 24)
        header = cpu_state - state
        if (
            0 < icache <= 1024
            and mode == _UC_CTL_CONTEXT_CPU
            and header in _CONTEXT_HEADERS
            and raw[at + _INIT_DONE_AT] == 1
            and raw[at + _NO_EXIT_REQUEST_AT] in (0, 1)
            and raw[at + 48] in (0, 1)
            and raw[at + 49] in (0, 1)
        ):
            hits.append(at)
        at = raw.find(head, at + 1)
    if len(hits) != 1:
        raise _fail(f"found the engine's page-size fields {len(hits)} times instead of once")
    ctypes.memset(base + hits[0] + _NO_EXIT_REQUEST_AT, 1, 1)


def check_engine() -> None:
    """Apply the fix to a throwaway engine: raises :class:`UnsupportedUnicorn` at kernel start
    instead of at the first domain creation."""
    from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_READ

    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    uc.mem_map(0, 0x1000, UC_PROT_READ)
    stop_only_between_instructions(uc)
