"""Timestamps of the I/O path's stages, for ``bench/iopath.py``.

Off unless the environment variable ``ISOVISOR_IOTRACE`` names a directory when the module is
first imported; then every process that marks a stage (the kernel, each driver process) writes
fixed-size records ``(t_ns, stage, key)`` into a memory-mapped file of its own,
``<dir>/<pid>.trace``.  ``t_ns`` is ``CLOCK_MONOTONIC``, one clock for every process of the
host, so the records of all processes merge into one timeline.  Records go into the page cache
as they are made: a process that is killed loses none, and no flush is needed.

A record costs a clock read and a ``pack_into`` (about half a microsecond); off, a mark is one
test of :data:`ON`.  Threads of one process take record slots from one counter (``next()`` on
``itertools.count`` is atomic under the GIL); :func:`read` drops the slots never written.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
import time
from enum import IntEnum
from pathlib import Path
from typing import Final

ENV: Final = "ISOVISOR_IOTRACE"
RECORD: Final = struct.Struct("<qII")
#: Records per process (16 MiB of sparse file); later marks are dropped.
CAPACITY: Final = 1 << 20


class Stage(IntEnum):
    """Where a mark is made.  ``key`` is a device key unless the name says domid."""

    #: kernel, pCPU thread: the guest's HC_EVTCHN_SEND on a device port (before the doorbell)
    KICK = 1
    #: kernel, pCPU thread: the doorbell to the driver rung
    KICKED = 2
    #: driver: its loop woke up (key 0)
    DRIVER_WAKE = 3
    #: driver: ``backend.kick(key)`` called
    DRIVER_KICK = 4
    #: driver: the backend rang the guest's doorbell (``host.notify``)
    DRIVER_NOTIFY = 5
    #: kernel: a driver's notification taken by the kernel
    NOTIFIED = 6
    #: kernel: the event made pending and the domain woken or its vCPU stopped
    WOKEN = 7
    #: kernel, pCPU thread: a domain's vCPU about to run guest code (key = domid)
    RUN = 8
    #: kernel, pCPU thread: the guest blocked or polled until an event (key = domid)
    SLEEP = 9
    #: kernel, pCPU thread: an upcall entered (key = domid)
    UPCALL = 10


ON: Final = bool(os.environ.get(ENV))
_mm: mmap.mmap | None = None
_slots = itertools.count()
_pack = RECORD.pack_into
_size = RECORD.size


def _open() -> mmap.mmap:
    path = Path(os.environ[ENV]) / f"{os.getpid()}.trace"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, CAPACITY * _size)
        return mmap.mmap(fd, CAPACITY * _size)
    finally:
        os.close(fd)


def mark(stage: Stage, key: int = 0) -> None:
    """Record ``stage`` for ``key`` now (call only when :data:`ON`)."""
    global _mm, _slots
    t = time.monotonic_ns()
    if _mm is None or _mm_pid != os.getpid():
        _reopen()
    i = next(_slots)
    if i < CAPACITY:
        assert _mm is not None
        _pack(_mm, i * _size, t, stage, key & 0xFFFFFFFF)


_mm_pid = 0


def _reopen() -> None:
    """Open this process's file (again after a fork: a child must not write its parent's)."""
    global _mm, _slots, _mm_pid
    _mm = _open()
    _slots = itertools.count()
    _mm_pid = os.getpid()


def read(directory: str | Path) -> list[tuple[int, int, Stage, int]]:
    """Every record under ``directory``, as ``(t_ns, pid, stage, key)`` sorted by time."""
    out: list[tuple[int, int, Stage, int]] = []
    for path in Path(directory).glob("*.trace"):
        pid = int(path.stem)
        data = path.read_bytes()
        for t, stage, key in RECORD.iter_unpack(data[: len(data) - len(data) % _size]):
            if t and stage in Stage._value2member_map_:
                out.append((t, pid, Stage(stage), key))
    out.sort()
    return out
