"""Process clean-up shared by the tests and the benchmarks."""

from __future__ import annotations

import contextlib
import ctypes
import signal
from pathlib import Path

import psutil

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the OS for SIGTERM when our parent dies, so no stack process outlives its stack."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ("" if it cannot be read)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def reap(pids: list[int]) -> list[int]:
    """Kill any of ``pids`` (and their children) still alive; return those that were."""
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
