"""The pager: fills a restored guest's RAM from its snapshot while the guest already runs.

``python -m kernel.pager --socket-fd N``, started by the kernel (:mod:`kernel.paging`), as an
external pager is in Mach, L4 or MINIX 3's VM server: a process of its own, so a page fault
taken by *any* kernel thread (a vCPU inside unicorn, or Python code holding the interpreter
lock) is served without the kernel's help.

For each restore the kernel sends a ``fill`` job over a ``SOCK_SEQPACKET`` socket (msgpack),
with the guest RAM's userfaultfd, the snapshot file and the list of stored runs as
``SCM_RIGHTS``.  The pager first brings in the few pages the kernel's own code reads and writes
(start info, hypercall blocks, shared info: ``prime``) and answers ``primed``; the kernel builds
the domain only then, so no kernel thread holding the interpreter lock ever waits on a fault
(if the pager died then, the thread that starts a new one would need that lock).  Then, until
the job is over:

* serves page faults first: a page the snapshot stores is copied in with the up to 15 stored
  pages after it (``UFFDIO_COPY``); a page it does not store is zeroed (``UFFDIO_ZEROPAGE``);
* between faults, reads the ``pages`` section in file order, 256 KiB at a time, computes its
  CRC-32 on the way, and copies in every page no fault brought in yet;
* at the end unregisters the RAM (later first touches are ordinary zero-fill faults) and
  answers ``done`` with whether the CRC-32 matched.  The kernel lets the guest's hypercalls
  and devices go on only then (kernel/hypervisor.py), so a guest resumed from a corrupted
  file is destroyed before anything it did could be seen.

A job resent after the pager died (the kernel keeps its own copy of both descriptors) starts
over: pages already in are found with EEXIST and skipped, and the CRC is computed again.
"""

from __future__ import annotations

import argparse
import array
import bisect
import contextlib
import ctypes
import logging
import mmap
import os
import select
import socket
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from ipc import fdpass
from kernel import uffd

log = logging.getLogger("isovisor.pager")

PAGE: Final = 4096
#: Pages read, checked and copied per step of the background pass (a fault waits at most one
#: step: 256 KiB, ~0.3 ms here).
CHUNK_PAGES: Final = 64
#: Pages brought in per fault (the faulting one and those after it in its run).
FAULT_PAGES: Final = 16
#: Testing knob: sleep this many ms after each background step (a slow fill, to kill the
#: pager in the middle of one).
PACE_ENV: Final = "ISOVISOR_PAGER_PACE_MS"
#: Niceness of the pager (as kernel/scheduler.py's PCPU_NICE).
PAGER_NICE: Final = 10
#: Largest control message.
MAX_MESSAGE: Final = 64 * 1024


@dataclass
class Job:
    """One restore's fill."""

    id: int
    uffd: int
    file: int
    base: int  # host address of guest-physical 0 in the kernel
    size: int  # bytes of RAM
    offset: int  # where the pages section's payload starts in the file
    crc: int  # its stored CRC-32
    firsts: list[int]  # first page of each stored run, ascending
    counts: list[int]  # pages in each run
    starts: list[int]  # each run's first byte in the payload
    length: int  # bytes of payload
    prime: tuple[int, int]  # pages to bring in first, [first, end)
    filled: bytearray = field(default_factory=bytearray)  # 1 = this page is in
    run: int = 0  # background pass: the run it is in
    done_in_run: int = 0  # and the pages of that run it has passed
    computed: int = 0  # CRC-32 so far
    faults: int = 0
    copied: int = 0  # pages this pager put in
    t0: float = field(default_factory=time.monotonic)

    @classmethod
    def from_message(cls, m: dict[str, Any], fds: list[int]) -> Job:
        """A ``fill`` and its three descriptors: userfaultfd, snapshot file, and the stored
        runs (a memfd of u64 pairs first page, page count; a message could not hold them
        all)."""
        runs = array.array("Q")
        try:  # pread: the kernel's copy shares the file offset
            runs.frombytes(os.pread(fds[2], os.fstat(fds[2]).st_size, 0))
        finally:
            os.close(fds[2])
        firsts, counts, starts, at = list(runs[0::2]), list(runs[1::2]), [], 0
        for count in counts:
            starts.append(at)
            at += count * PAGE
        return cls(
            id=int(m["job"]),
            uffd=fds[0],
            file=fds[1],
            base=int(m["base"]),
            size=int(m["size"]),
            offset=int(m["offset"]),
            crc=int(m["crc"]),
            firsts=firsts,
            counts=counts,
            starts=starts,
            length=at,
            prime=(int(m["prime"][0]), int(m["prime"][1])),
            filled=bytearray(int(m["size"]) // PAGE),
        )

    @property
    def passed(self) -> bool:
        return self.run >= len(self.firsts)

    def close(self) -> None:
        for fd in (self.uffd, self.file):
            with contextlib.suppress(OSError):
                os.close(fd)


class JobFailed(Exception):
    """The job cannot go on (its RAM is gone, or the file changed under it)."""


class Pager:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.jobs: dict[int, Job] = {}
        self._buf = mmap.mmap(-1, CHUNK_PAGES * PAGE)
        self._buf_addr = ctypes.addressof(ctypes.c_char.from_buffer(self._buf))
        self._view = memoryview(self._buf)
        self._pace = float(os.environ.get(PACE_ENV, "0") or 0) / 1000

    # -- the loop --------------------------------------------------------------------------
    def serve(self) -> None:
        self._send({"op": "ready", "pid": os.getpid()})
        while True:
            busy = any(not j.passed for j in self.jobs.values())
            fds = [self.sock.fileno()] + [j.uffd for j in self.jobs.values()]
            ready, _, _ = select.select(fds, [], [], 0 if busy else None)
            if self.sock.fileno() in ready and not self._take_messages():
                return
            for job in list(self.jobs.values()):
                self._guard(job, self._serve_faults)
            for job in list(self.jobs.values()):  # one background step each
                if not job.passed:
                    self._guard(job, self._step)
                    if self._pace:
                        time.sleep(self._pace)
                if job.id in self.jobs and job.passed:
                    self._finish(job)

    def _take_messages(self) -> bool:
        """Read what the kernel sent; False when it has gone (end of file)."""
        while True:
            got = fdpass.receive(self.sock, MAX_MESSAGE, 3)
            if got is None:
                return True
            data, fds = got
            if not data:
                return False
            m = msgpack.unpackb(data, raw=False)
            op = m.get("op")
            if op == "fill" and len(fds) == 3:
                job = Job.from_message(m, fds)
                self.jobs[job.id] = job
                self._guard(job, self._prime)
            elif op == "cancel":
                job_ = self.jobs.pop(int(m["job"]), None)
                if job_ is not None:
                    job_.close()
            elif op == "quit":
                return False
            else:
                for fd in fds:
                    os.close(fd)
                log.error("pager: unexpected message %.200r", m)

    def _guard(self, job: Job, step: Any) -> None:
        try:
            step(job)
        except (JobFailed, OSError) as e:
            what = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            self._end(job, ok=False, error=what)

    # -- faults ----------------------------------------------------------------------------
    def _serve_faults(self, job: Job) -> None:
        for address in uffd.read_faults(job.uffd):
            page = (address - job.base) // PAGE
            if not 0 <= page < len(job.filled):
                continue
            job.faults += 1
            if job.filled[page]:  # came in since the fault was reported
                uffd.wake(job.uffd, job.base + page * PAGE, PAGE)
                continue
            self._bring(job, page, page + FAULT_PAGES)

    def _prime(self, job: Job) -> None:
        """Bring in the pages the kernel itself reads and writes (start info, hypercall
        blocks, shared info) before it builds the domain, then say so."""
        page, end = job.prime
        while page < end:
            page = self._bring(job, page, end)
        self._send({"op": "primed", "job": job.id})

    def _bring(self, job: Job, page: int, limit: int) -> int:
        """Pages from ``page`` to ``limit`` at most, within its stored run (copied) or its
        hole (zeroed); returns the page after them."""
        run = bisect.bisect_right(job.firsts, page) - 1
        if run >= 0 and page < job.firsts[run] + job.counts[run]:
            end = min(limit, job.firsts[run] + job.counts[run], page + CHUNK_PAGES)
            src = job.offset + job.starts[run] + (page - job.firsts[run]) * PAGE
            self._read(job, src, (end - page) * PAGE)
            self._put(job, page, end, self._buf_addr)
        else:
            nxt = job.firsts[run + 1] if run + 1 < len(job.firsts) else len(job.filled)
            end = min(limit, nxt)
            self._put(job, page, end, 0)
        return end

    # -- the background pass ---------------------------------------------------------------
    def _step(self, job: Job) -> None:
        first, count = job.firsts[job.run], job.counts[job.run]
        n = min(CHUNK_PAGES, count - job.done_in_run)
        page = first + job.done_in_run
        self._read(job, job.offset + job.starts[job.run] + job.done_in_run * PAGE, n * PAGE)
        job.computed = zlib.crc32(self._view[: n * PAGE], job.computed)
        self._put(job, page, page + n, self._buf_addr)
        job.done_in_run += n
        if job.done_in_run == count:
            job.run, job.done_in_run = job.run + 1, 0

    def _read(self, job: Job, at: int, length: int) -> None:
        got = os.preadv(job.file, [self._view[:length]], at)
        if got != length:
            raise JobFailed("section 'pages' is truncated: the file changed while it was read")

    def _put(self, job: Job, page: int, end: int, src: int) -> None:
        """Pages [page, end) that are not in yet: copied from ``src`` (page ``page``'s bytes
        first), or zeroed when ``src`` is 0."""
        filled = job.filled
        p = page
        while p < end:
            if filled[p]:
                p += 1
                continue
            q = p
            while q < end and not filled[q]:
                q += 1
            dst = job.base + p * PAGE
            if src:
                done, exists = uffd.copy(job.uffd, dst, src + (p - page) * PAGE, (q - p) * PAGE)
            else:
                done, exists = uffd.zeropage(job.uffd, dst, (q - p) * PAGE)
            n = done // PAGE
            filled[p : p + n] = b"\1" * n
            job.copied += n
            p += n
            if exists:
                filled[p] = 1
                p += 1

    # -- ends ------------------------------------------------------------------------------
    def _finish(self, job: Job) -> None:
        if job.computed != job.crc:
            self._end(
                job,
                ok=False,
                error=(
                    f"section 'pages' (bytes {job.offset}..{job.offset + job.length}) fails "
                    f"its checksum (stored CRC-32 {job.crc:#010x}, computed "
                    f"{job.computed:#010x}): the file is corrupted"
                ),
            )
        else:
            self._end(job, ok=True, error="")

    def _end(self, job: Job, *, ok: bool, error: str) -> None:
        """Unregister the RAM (so no fault waits on us any more), answer, forget the job."""
        self.jobs.pop(job.id, None)
        with contextlib.suppress(OSError):  # (its RAM may be gone already)
            uffd.unregister(job.uffd, job.base, job.size)
        job.close()
        self._send(
            {
                "op": "done",
                "job": job.id,
                "ok": ok,
                "error": error,
                "faults": job.faults,
                "copied": job.copied,
                "ms": round((time.monotonic() - job.t0) * 1000, 3),
            }
        )

    def _send(self, m: dict[str, Any]) -> None:
        self.sock.send(msgpack.packb(m, use_bin_type=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernel.pager", description=__doc__)
    ap.add_argument("--socket-fd", type=int, required=True, help="the kernel's end (inherited)")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s pager[%(process)d] %(levelname)s %(message)s",
    )
    from ipc.lifetime import die_with_parent

    die_with_parent()
    # The background pass is bulk work, like guest code: at the pCPU threads' niceness, so
    # the kernel's own threads (building the domain being restored, moving I/O) go first.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, PAGER_NICE)
    sock = socket.socket(fileno=args.socket_fd)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the kernel went away
        Pager(sock).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
