"""Process clean-up shared by the tests and the benchmarks."""

from __future__ import annotations

import contextlib
from pathlib import Path

import psutil


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
    try:
        status: str = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return True
    return bool(status == psutil.STATUS_ZOMBIE)


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
