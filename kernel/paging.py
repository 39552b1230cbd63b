"""The kernel's side of lazy restore: the pager process and the fills it does.

A restore with ``[kernel] restore = "lazy"`` maps the new domain's RAM empty, registers it with
a userfaultfd (kernel/uffd.py), and hands that descriptor and the snapshot file to the pager
process (kernel/pager.py), then lets the vCPU run at once.  The pager fills the RAM behind it
and checks the pages' CRC-32; :class:`Fill` is how the kernel waits for that.

The kernel keeps its own copy of both descriptors for as long as a fill runs.  If the pager
dies, its copies close but the userfaultfd stays registered (a fault waits, it is not turned
into a zero page); :class:`Pager` starts a new pager and sends it every fill still under way.
The pager is started, and restarted, by one long-lived thread: the pager asks for SIGTERM
when the thread that started it ends (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import array
import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Final

import msgpack

from kernel import abi, uffd
from kernel.pager import MAX_MESSAGE

if TYPE_CHECKING:
    from kernel.memory import GuestMemory
    from kernel.snapfile import PagesRef

log = logging.getLogger("isovisor.kernel")

#: The pages below this are the kernel's own (start info, hypercall blocks, shared info): the
#: pager brings them in before the domain is built (kernel/pager.py, "prime").
KERNEL_PAGES_END: Final = abi.SHARED_INFO_ADDR + abi.PAGE_SIZE
#: How long the pager has to say it is ready after it was started, or to prime a fill.
READY_TIMEOUT_S: Final = 20.0
#: Pager restarts allowed within RESTART_WINDOW_S before fills are given up.
RESTART_LIMIT: Final = 5
RESTART_WINDOW_S: Final = 60.0


class Fill:
    """One lazy restore's fill: done when the pager has put every stored page in and checked
    them (``ok``), or could not (``error``)."""

    def __init__(
        self, pager: Pager, job: int, ufd: int, file: int, runs: int, message: dict[str, Any]
    ) -> None:
        self.pager = pager
        self.job = job
        self.uffd = ufd
        self.file = file
        self.runs = runs  # a memfd: the stored runs as u64 pairs (kernel/pager.py)
        self.message = message
        self.primed = threading.Event()  # the kernel's own pages are in (kernel/pager.py)
        self.done = threading.Event()
        self.ok = False
        self.error = ""
        #: The pager's figures: faults served, pages copied, ms from the job to its end.
        self.stats: dict[str, Any] = {}

    def wait(self, timeout: float) -> bool:
        return self.done.wait(timeout)

    def cancel(self) -> None:
        """The domain is going away: stop filling (no-op once done)."""
        self.pager.cancel(self)

    def _resolve(self, ok: bool, error: str, stats: dict[str, Any]) -> None:
        self.ok, self.error, self.stats = ok, error, stats
        self._close()
        self.done.set()
        self.primed.set()  # (nobody waits for it any more)

    def _close(self) -> None:
        for fd in (self.uffd, self.file, self.runs):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.uffd = self.file = self.runs = -1


class Pager:
    """The kernel's pager process: started at once, restarted when it dies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[int, Fill] = {}
        self._ids = itertools.count(1)
        self._sock: socket.socket | None = None  # set while a pager is up and ready
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopping = False
        self._starts: list[float] = []
        self.restarts = 0
        self._thread = threading.Thread(target=self._run, name="pager", daemon=True)

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        self._thread.start()

    def status(self) -> dict[str, Any]:
        """What ``ping`` shows: the pager's pid, its restarts, the fills under way."""
        with self._lock:
            fills = len(self._jobs)
        return {"pid": self.pid, "restarts": self.restarts, "fills": fills}

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            sock, jobs = self._sock, list(self._jobs.values())
            self._jobs.clear()
        for f in jobs:
            f._resolve(False, "the kernel is shutting down", {})
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        proc = self._proc
        if proc is not None:
            try:
                proc.wait(2)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._thread.join(5)

    # -- fills -----------------------------------------------------------------------------
    def fill(self, mem: GuestMemory, pages: PagesRef, runs: list[tuple[int, int]]) -> Fill:
        """Register ``mem`` for lazy filling from ``pages`` and hand it to the pager.
        UffdError if userfaultfd cannot be used; OSError if the file cannot be opened."""
        ufd = uffd.open_uffd()
        file = runs_fd = -1
        try:
            uffd.register_missing(ufd, mem.host_address, mem.size)
            file = os.open(pages.path, os.O_RDONLY | os.O_CLOEXEC)
            runs_fd = os.memfd_create("isovisor-runs", os.MFD_CLOEXEC)
            os.write(runs_fd, array.array("Q", [x for r in runs for x in r]).tobytes())
        except BaseException:
            for fd in (ufd, file, runs_fd):
                if fd >= 0:
                    os.close(fd)
            raise
        job = next(self._ids)
        message = {
            "op": "fill",
            "job": job,
            "base": mem.host_address,
            "size": mem.size,
            "offset": pages.offset,
            "crc": pages.crc,
            "prime": [abi.NULL_GUARD_END // abi.PAGE_SIZE, KERNEL_PAGES_END // abi.PAGE_SIZE],
        }
        f = Fill(self, job, ufd, file, runs_fd, message)
        with self._lock:
            if self._stopping:
                f._close()
                raise OSError("the kernel is shutting down")
            self._jobs[job] = f
            sock = self._sock
            if sock is not None:  # else sent once the pager is ready
                self._send_fill(sock, f)
        if not f.primed.wait(READY_TIMEOUT_S):
            proc = self._proc
            log.error(
                "pager process %s did not answer a fill within %g s: killing it",
                proc.pid if proc else "?",
                READY_TIMEOUT_S,
            )
            self.cancel(f)
            if proc is not None:
                proc.kill()  # (its thread starts a new one)
            raise uffd.UffdError(f"the pager did not answer within {READY_TIMEOUT_S:g} s")
        if f.done.is_set() and not f.ok:
            raise uffd.UffdError(f"the pager could not fill: {f.error}")
        return f

    def cancel(self, f: Fill) -> None:
        with self._lock:
            if self._jobs.pop(f.job, None) is None:
                return
            sock = self._sock
            if sock is not None:
                self._send(sock, {"op": "cancel", "job": f.job})
        f._resolve(False, "cancelled: the domain was destroyed", {})

    def _send_fill(self, sock: socket.socket, f: Fill) -> None:
        try:
            socket.send_fds(
                sock, [msgpack.packb(f.message, use_bin_type=True)], [f.uffd, f.file, f.runs]
            )
        except OSError as e:  # the pager is dying: the fill is resent to the next one
            log.warning("pager: cannot send fill %d: %s", f.job, e.strerror)

    @staticmethod
    def _send(sock: socket.socket, m: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            sock.send(msgpack.packb(m, use_bin_type=True))

    # -- the pager's lifetime (this class's thread) ----------------------------------------
    def _run(self) -> None:
        while not self._stopping:
            if not self._allowed():
                self._give_up(
                    f"the pager process died {RESTART_LIMIT} times within {RESTART_WINDOW_S:g} s"
                )
                return
            try:
                sock = self._spawn()
            except (OSError, TimeoutError) as e:
                log.error("pager: cannot start: %s", e)
                self._give_up(f"the pager process cannot be started: {e}")
                return
            self._serve(sock)
            proc = self._proc
            status = proc.wait() if proc is not None else None
            with self._lock:
                self._sock = None
                stopping, pending = self._stopping, len(self._jobs)
            sock.close()
            if not stopping:
                self.restarts += 1
                log.error(
                    "pager process %s ended (status %s) with %d fill(s) under way; "
                    "starting a new one, which starts them over",
                    proc.pid if proc else "?",
                    status,
                    pending,
                )

    def _allowed(self) -> bool:
        now = time.monotonic()
        self._starts = [t for t in self._starts if now - t < RESTART_WINDOW_S]
        self._starts.append(now)
        return len(self._starts) <= RESTART_LIMIT + 1

    def _spawn(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "kernel.pager", "--socket-fd", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(READY_TIMEOUT_S)
        try:
            m = msgpack.unpackb(ours.recv(MAX_MESSAGE), raw=False)
        except (OSError, ValueError) as e:
            ours.close()
            self._proc.kill()
            self._proc.wait()
            raise TimeoutError(f"it did not say it was ready ({e})") from None
        ours.settimeout(None)
        if m.get("op") != "ready":
            ours.close()
            self._proc.kill()
            self._proc.wait()
            raise OSError(f"it sent {m!r:.100} instead of ready")
        with self._lock:
            self._sock = ours
            for f in self._jobs.values():
                self._send_fill(ours, f)
        return ours

    def _serve(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(MAX_MESSAGE)
            except OSError:
                return
            if not data:
                return
            try:
                m = msgpack.unpackb(data, raw=False)
            except ValueError:
                log.error("pager: undecodable message (%d bytes)", len(data))
                continue
            op = m.get("op")
            if op == "primed":
                with self._lock:
                    f = self._jobs.get(int(m.get("job", 0)))
                if f is not None:
                    f.primed.set()
                continue
            if op != "done":
                continue
            with self._lock:
                f = self._jobs.pop(int(m.get("job", 0)), None)
            if f is not None:
                stats = {k: m.get(k) for k in ("faults", "copied", "ms")}
                f._resolve(bool(m.get("ok")), str(m.get("error", "")), stats)

    def _give_up(self, why: str) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
            self._jobs.clear()
        for f in jobs:
            f._resolve(False, why, {})
