"""An adversarial rng backend (tests/test_jail_stack.py): before it serves, it tries what a
compromised driver would, and logs one line per attempt: ``jailbreak: <what>: <outcome>``,
the outcome being ``denied <reason>`` or ``ALLOWED``.  Then it serves like drivers.rng, so the
guests beside it must not notice it was ever loaded."""

from __future__ import annotations

import ctypes
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from drivers.rng.backend import Backend as Rng

_PTRACE_ATTACH = 16


def _outcome(fn: Callable[[], object]) -> str:
    try:
        fn()
    except (OSError, MemoryError) as e:
        return f"denied {type(e).__name__}"
    return "ALLOWED"


def _kernel_pid() -> int | None:
    for p in Path("/proc").iterdir():
        try:
            if p.name.isdigit() and b"kernel\0--control" in (p / "cmdline").read_bytes():
                return int(p.name)
        except OSError:
            continue
    return None


class Backend(Rng):
    def __init__(self, host: Any, options: dict[str, Any]) -> None:
        super().__init__(host, options)
        run_dir = Path(os.environ["ISOVISOR_RUN_DIR"])
        me = os.getuid()
        tried: dict[str, str] = {}
        shm = [p for p in Path("/dev/shm").glob("isovisor.*") if p.stat().st_uid != me]
        segs = [_outcome(lambda p=p: os.close(os.open(p, os.O_RDWR))) for p in shm]  # type: ignore[misc]
        tried["segments"] = f"{len(segs)} tried: " + ",".join(sorted(set(segs)))
        tried["other disk"] = _outcome(lambda: (run_dir.parent / "other.img").read_bytes())
        parent = os.getppid()
        tried["supervisor memory"] = _outcome(lambda: open(f"/proc/{parent}/mem", "rb").close())
        kernel = _kernel_pid()
        tried["kernel found"] = "yes" if kernel else "no"
        if kernel:
            tried["kernel memory"] = _outcome(lambda: open(f"/proc/{kernel}/mem", "rb").close())
            libc = ctypes.CDLL(None, use_errno=True)
            rc = libc.ptrace(_PTRACE_ATTACH, kernel, None, None)
            tried["ptrace kernel"] = "ALLOWED" if rc == 0 else f"denied errno {ctypes.get_errno()}"
            tried["signal kernel"] = _outcome(lambda: os.kill(kernel, 0))

        def connect(name: str) -> None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(run_dir / name))

        for name in ("control.sock", "events.sock", "kernel.sock", "kernel-events.sock"):
            tried[f"socket {name}"] = _outcome(lambda n=name: connect(n))  # type: ignore[misc]
        tried["write the sources"] = _outcome(
            lambda: open(Path(__file__).with_name("planted.py"), "w").close()
        )
        tried["memory"] = _outcome(lambda: bytearray(6 << 30))
        # the fork bomb once per driver (a fork copies the page tables: slow on this VM), the
        # first load leaving a mark in the one directory it may write to
        mark = run_dir / f"driver-{host.name}" / "forked"
        if not mark.exists():
            tried["fork"] = self._fork_bomb()
            mark.touch()
        for what, outcome in tried.items():
            self.log.warning("jailbreak: %s: %s", what, outcome)

    @staticmethod
    def _fork_bomb() -> str:
        r, w = os.pipe()
        kids: list[int] = []
        outcome = "ALLOWED"
        try:
            while len(kids) < 200:
                pid = os.fork()
                if pid == 0:
                    os.close(w)
                    os.read(r, 1)  # until the parent closes the write end
                    os._exit(0)
                kids.append(pid)
        except OSError as e:
            outcome = f"denied {type(e).__name__} after {len(kids)}"
        finally:
            os.close(w)
            os.close(r)
            for pid in kids:
                os.waitpid(pid, 0)
        return outcome
