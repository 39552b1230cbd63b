"""Ask a running stack for a hot swap and wait for its outcome (the CLI, the pytest plugin and
the benchmark use this).

The supervisor answers ``driver_swap`` at once with a swap id; the outcome comes later as the
event ``driver.<name>.swap`` (docs/hotswap.md), so the subscription is made first and nothing
can be missed.
"""

from __future__ import annotations

import time
import tomllib
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


def option_value(text: str) -> int | float | bool | str:
    """A ``--option`` value as TOML would read it: an integer (``32``, ``0x20``, ``1_000``), a
    float (``2.5``, ``1e3``), a boolean (``true``, ``false``), a quoted string (``"32"``);
    anything else is the string as given (``hello``, ``/tmp/x.img``)."""
    try:
        v = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    return v if isinstance(v, int | float | str) else text  # (a bool is an int)


def parse_options(args: list[str]) -> dict[str, int | float | bool | str]:
    """``--option KEY=VALUE`` arguments as a map (values: :func:`option_value`); ValueError
    naming the argument for one without ``=``, with an empty key, or a key given twice."""
    out: dict[str, int | float | bool | str] = {}
    given: dict[str, str] = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"{arg!r} is not KEY=VALUE (e.g. --option max_batch=8)")
        if not key:
            raise ValueError(f"{arg!r} has no option name before '=' (e.g. --option max_batch=8)")
        if key in out:
            raise ValueError(f"option {key!r} is given twice: {given[key]!r} and {arg!r}")
        out[key], given[key] = option_value(value.strip()), arg
    return out


def swap(
    rd: RunDir,
    name: str,
    target: str,
    *,
    probation: float | None = None,
    timeout: float | None = None,
    wait: float = 60.0,
    options: dict[str, Any] | None = None,
    log_level: str | None = None,
    debug: bool | None = None,
) -> dict[str, Any]:
    """Swap driver ``name`` to ``target`` and return the ``driver.<name>.swap`` payload
    (``outcome`` is one of :data:`OUTCOMES`).  ControlError if the supervisor refuses at once
    (bad input, a driver that is not RUNNING, ...); SwapTimeout after ``wait`` seconds.
    ``options`` replace the driver's backend options for the new instance (``--option``);
    ``log_level`` and ``debug`` are its own; None keeps the driver's."""
    topic = f"driver.{name}.swap"
    with Client(rd.control, timeout=15) as c, subscribe(rd.events, [topic], c) as sub:
        # ``request``, not ``call``: ``call`` takes ``timeout`` as its own reply deadline, and
        # the swap's timeout then never reached the supervisor.
        reply = c.request(
            "driver_swap",
            {
                "name": name,
                "target": target,
                "probation": probation,
                "timeout": timeout,
                "options": options,
                "log_level": log_level,
                "debug": debug,
            },
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


__all__ = [
    "OUTCOMES",
    "ControlError",
    "SwapTimeout",
    "option_value",
    "parse_options",
    "swap",
    "target_of",
]
