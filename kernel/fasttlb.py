"""Guest stores at full speed in unicorn 2.1.4: a virtual TLB that keeps data pages non-executable.

With paging off, unicorn's TLB entries are read-write-execute.  A store through an entry of an
executable page takes the slow path (``notdirty_write``: look up the memory region, invalidate
translated code on the page), and unicorn clears that mark only for entries *without* execute
permission and with no memory hook covering the address.  So every guest store went the slow
way: ~60 % of the cycles of a store-heavy guest.

This module switches the vCPU to unicorn's virtual TLB (``UC_TLB_VIRTUAL``) with a fill hook
that maps every address to itself and grants read and write to data accesses and read, write
and execute to instruction fetches: data pages get entries without execute permission, whose
slow-store mark is dropped after the first store; code pages keep it, so a store into code
still invalidates its translations (self-modifying and freshly loaded code stay correct: when
code on a page is translated, unicorn marks the page's entries slow again).  The hook runs
only on a TLB miss, not per access.

Addresses stay the guest's physical addresses: what is not mapped still faults as before (the
kernel's unmapped-access hooks, now bounded to page 0 and to everything above RAM, so they no
longer cover RAM and block the fast path).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Final

import unicorn
from unicorn import (
    UC_HOOK_TLB_FILL,
    UC_MEM_FETCH,
    UC_PROT_ALL,
    UC_PROT_READ,
    UC_PROT_WRITE,
    UC_TLB_VIRTUAL,
)

log = logging.getLogger("isovisor.kernel")

_SOURCE: Final = Path(__file__).with_name("tlbfill.c")
_DATA: Final = UC_PROT_READ | UC_PROT_WRITE


def _fill(_uc: Any, vaddr: int, access: int, entry: Any, _data: object) -> bool:
    """The fill hook in Python (no C compiler here): as kernel/tlbfill.c."""
    entry.paddr = vaddr
    entry.perms = UC_PROT_ALL if access == UC_MEM_FETCH else _DATA
    return True


def cache_dir() -> Path:
    """``$ISOVISOR_CACHE_DIR/native``, else ``~/.cache/isovisor/native``."""
    env = os.environ.get("ISOVISOR_CACHE_DIR", "").strip()
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "isovisor") / "native"


@functools.cache
def native_fill() -> int | None:
    """The address of ``isovisor_tlb_fill`` from kernel/tlbfill.c, compiled on first use into
    :func:`cache_dir` (keyed by the source, the compiler and unicorn's header); None, logged
    once, where it cannot be built."""
    from domains.build import BuildError, find_toolchain

    include = Path(unicorn.__file__).parent / "include"
    try:
        toolchain = find_toolchain()
        cc, version = toolchain.cc, toolchain.version
        key = hashlib.sha256(
            b"\0".join(
                (
                    _SOURCE.read_bytes(),
                    version.encode(),
                    (include / "unicorn" / "unicorn.h").read_bytes(),
                )
            )
        ).hexdigest()[:20]
        lib = cache_dir() / f"tlbfill-{key}.so"
        if not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".tlbfill-", dir=lib.parent)
            os.close(fd)
            try:
                cmd = [*cc, "-O2", "-shared", "-fPIC", "-I", str(include), "-o", tmp, str(_SOURCE)]
                proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise BuildError(f"{' '.join(cmd)} failed: {proc.stderr.strip()}")
                os.replace(tmp, lib)  # (another kernel building it at the same time: fine)
            finally:
                Path(tmp).unlink(missing_ok=True)
        fn = ctypes.CDLL(str(lib)).isovisor_tlb_fill
        return ctypes.cast(fn, ctypes.c_void_p).value
    except (BuildError, OSError) as e:
        log.warning(
            "the native TLB fill hook cannot be built (%s): using the Python one, slower for "
            "guests whose memory does not fit unicorn's TLB",
            e,
        )
        return None


def use_fast_stores(uc: Any) -> None:
    """Switch ``uc`` (not yet run) to the virtual TLB with the identity fill hook."""
    uc.ctl_set_tlb_mode(UC_TLB_VIRTUAL)
    address = native_fill()
    if address is None:
        uc.hook_add(UC_HOOK_TLB_FILL, _fill)
        return
    from unicorn.unicorn_py3.unicorn import uc_hook_h, uclib

    handle = uc_hook_h()
    err = uclib.uc_hook_add(uc._uch, ctypes.byref(handle), UC_HOOK_TLB_FILL, address, None, 1, 0)
    if err:
        raise unicorn.UcError(err)
