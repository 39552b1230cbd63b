"""Register access and ``emu_stop`` for the hot paths, without the Python binding's overhead.

unicorn 2.1.4's ``Uc.reg_read``/``reg_write`` cost about 5 us each on this machine (argument
classification, a ctypes structure per call); the C functions they end in cost under 1 us.
A round trip of the I/O path touches registers half a dozen times (the upcall's entry and
return, the vCPU's exit), so :class:`Registers` calls ``uc_reg_read``/``uc_reg_write`` of the
same library directly, for 64-bit general registers only.  The calls are made through
``ctypes.PyDLL``, which keeps the GIL: releasing and taking it back around a call this short
would only invite another thread to run in between.

``emu_stop`` goes the same way: the kernel's drivers thread calls it to deliver an upcall now
to a running guest, and through the binding (``ctypes.CDLL``) the call released the GIL, which
the pCPU thread, waiting in its hypercall hook, took; the drivers thread then waited for it
back (up to Python's 5 ms switch interval) before it could take the next notification.

If the binding does not expose what this needs (its library or the engine handle), the
binding's own methods are used, with the same results.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from typing import Any

from unicorn import Uc, UcError

log = logging.getLogger("isovisor.kernel")


def _library() -> Any | None:
    try:
        from unicorn.unicorn_py3 import unicorn as binding

        lib = ctypes.PyDLL(binding.uclib._name)
        reg_fns = [lib.uc_reg_read, lib.uc_reg_write]
        reg_fns += [lib.uc_context_reg_read, lib.uc_context_reg_write]
        ctx_fns = (lib.uc_context_save, lib.uc_context_restore)
        stop = lib.uc_emu_stop
    except (ImportError, AttributeError, OSError) as e:  # (a library without one of them)
        log.info("fast register access unavailable (%s); using the binding's", e)
        return None
    for fn in reg_fns:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        fn.restype = ctypes.c_int
    for fn in ctx_fns:
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = ctypes.c_int
    stop.argtypes = [ctypes.c_void_p]
    stop.restype = ctypes.c_int
    return lib


_LIB = _library()


class Registers:
    """``read(reg)`` and ``write(reg, value)`` of one engine's 64-bit registers, ``stop()``
    (``emu_stop``, from any thread), ``save(ctx)``/``restore(ctx)`` of the whole CPU state
    into and from an existing ``UcContext``, and ``context_read(ctx, reg)``/
    ``context_write(ctx, reg, value)`` of a register in one."""

    def __init__(self, uc: Uc) -> None:
        handle = getattr(getattr(uc, "_uch", None), "value", None)
        self.read: Callable[[int], int]
        self.write: Callable[[int, int], None]
        self.stop: Callable[[], object]
        self.save: Callable[[Any], object]
        self.restore: Callable[[Any], object]
        self.context_read: Callable[[Any, int], int]
        self.context_write: Callable[[Any, int, int], object]
        if _LIB is None or not isinstance(handle, int):
            self.read, self.write, self.stop = uc.reg_read, uc.reg_write, uc.emu_stop
            self.save, self.restore = uc.context_update, uc.context_restore
            self.context_read = lambda ctx, reg: ctx.reg_read(reg)
            self.context_write = lambda ctx, reg, value: ctx.reg_write(reg, value)
            return
        buf = ctypes.c_uint64()
        ptr = ctypes.addressof(buf)
        c_read, c_write = _LIB.uc_reg_read, _LIB.uc_reg_write

        def read(reg: int) -> int:
            err = c_read(handle, reg, ptr)
            if err:
                raise UcError(err)
            return buf.value

        def write(reg: int, value: int) -> None:
            buf.value = value
            err = c_write(handle, reg, ptr)
            if err:
                raise UcError(err)

        c_stop = _LIB.uc_emu_stop
        c_save, c_restore = _LIB.uc_context_save, _LIB.uc_context_restore
        c_ctx_read, c_ctx_write = _LIB.uc_context_reg_read, _LIB.uc_context_reg_write

        def save(ctx: Any) -> None:
            err = c_save(handle, ctx.context)
            if err:
                raise UcError(err)

        def restore(ctx: Any) -> None:
            err = c_restore(handle, ctx.context)
            if err:
                raise UcError(err)

        def context_read(ctx: Any, reg: int) -> int:
            err = c_ctx_read(ctx.context, reg, ptr)
            if err:
                raise UcError(err)
            return buf.value

        def context_write(ctx: Any, reg: int, value: int) -> None:
            buf.value = value
            err = c_ctx_write(ctx.context, reg, ptr)
            if err:
                raise UcError(err)

        self.read, self.write = read, write
        self.stop = lambda: c_stop(handle)
        self.save, self.restore = save, restore
        self.context_read, self.context_write = context_read, context_write
