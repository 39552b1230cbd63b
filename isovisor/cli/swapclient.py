"""Ask a running stack for a hot swap and wait for its outcome (the CLI, the pytest plugin and
the benchmark use this).

The supervisor answers ``driver_swap`` at once with a swap id; the outcome comes later as the
event ``driver.<name>.swap`` (docs/hotswap.md), so the subscription is made first and nothing
can be missed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ipc.control import Client, ControlError
from ipc.events import subscribe
from isovisor.paths import RunDir

#: Outcomes, as ``driver.<name>.swap`` reports them.
OUTCOMES = ("swapped", "rolled_back", "refused", "failed")


class SwapTimeout(Exception):
    """No outcome within the time given (the swap may still finish)."""


def target_of(to: str | None = None, to_file: str | Path | None = None) -> str:
    """The target string for ``driver_swap``: a module spec, or an absolute file path (with
    ``:Class`` kept)."""
    if (to is None) == (to_file is None):
        raise ValueError("give exactly one of --to MODULE[:CLASS] and --to-file PATH")
    if to is not None:
        return to
    text = str(to_file)
    path, sep, cls = text.partition(".py:")
    file = Path(path + ".py" if sep else text).expanduser().resolve()
    return f"{file}:{cls}" if sep else str(file)


def swap(
    rd: RunDir,
    name: str,
    target: str,
    *,
    probation: float | None = None,
    timeout: float | None = None,
    wait: float = 60.0,
) -> dict[str, Any]:
    """Swap driver ``name`` to ``target`` and return the ``driver.<name>.swap`` payload
    (``outcome`` is one of :data:`OUTCOMES`).  ControlError if the supervisor refuses at once
    (bad input, a driver that is not RUNNING, ...); SwapTimeout after ``wait`` seconds."""
    topic = f"driver.{name}.swap"
    with Client(rd.control, timeout=15) as c, subscribe(rd.events, [topic], c) as sub:
        # ``request``, not ``call``: ``call`` takes ``timeout`` as its own reply deadline, and
        # the swap's timeout then never reached the supervisor.
        reply = c.request(
            "driver_swap",
            {"name": name, "target": target, "probation": probation, "timeout": timeout},
        )
        sid = reply["swap"]["swap_id"]
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            ev = sub.recv(max(0.0, left)) if left > 0 else None
            if ev is None:
                raise SwapTimeout(
                    f"no outcome of swap {sid} of driver {name} within "
                    f"{wait:g}s; see `isovisor status` and `isovisor events "
                    f"driver.{name}.`"
                )
            if ev[0] == topic and ev[1].get("swap_id") == sid:
                return ev[1]


__all__ = ["OUTCOMES", "ControlError", "SwapTimeout", "swap", "target_of"]
