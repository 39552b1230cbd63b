"""Process clean-up shared by the tests and the benchmarks, and waiting for a process to end
(``isovisor down``)."""

from __future__ import annotations

import contextlib
import os
import select
import time
from pathlib import Path


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ("" if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (exited, or a zombie not reaped yet).

    Safe against the process ending between the two looks ``pid_exists`` and ``status`` take.
    """
    import psutil  # here, not above: the CLI imports this module for wait_gone alone

    try:
        status: str = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return True
    return bool(status == psutil.STATUS_ZOMBIE)


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` has ended; False if it still runs after ``timeout`` seconds.

    A zombie counts as ended: a daemon's parent is init, which may reap it a second or more
    later, and ``psutil.Process.wait`` would wait for that reaping too.  A pidfd says at once
    that the process exited; where there is none, its status is polled.
    """
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:  # no pidfd (old kernel, or seccomp): poll
        deadline = time.monotonic() + timeout
        while not gone(pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        return bool(poller.poll(max(0.0, timeout) * 1000))
    finally:
        os.close(fd)


def reap(pids: list[int]) -> list[int]:
    """Kill any of ``pids`` (and their children) still alive; return those that were."""
    import psutil

    alive = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs = [p, *p.children(recursive=True)]
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.NoSuchProcess:
            continue
        alive.append(pid)
        for q in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                q.kill()
        psutil.wait_procs(procs, timeout=5)
    return alive
