"""``isovisor driver swap`` (hot swap, with ``--watch`` for a development loop) and
``isovisor driver stats`` (docs/hotswap.md, docs/sdk.md)."""

from __future__ import annotations

import datetime
import enum
import hashlib
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ipc.control import ControlError
from isovisor.cli.common import (
    RunDirOpt,
    _call,
    _run_dir,
    driver_setup,
    err,
    fail,
    out,
    statistics_problem,
)
from isovisor.cli.swapclient import SwapTimeout, parse_options, swap, target_of
from isovisor.config import LOG_LEVELS
from isovisor.paths import RunDir

#: How often --watch looks at the file, and how long it must stay unchanged before a swap
#: (an editor writes a file in several steps).
WATCH_POLL_S = 0.2
WATCH_SETTLE_S = 0.3

NameArg = Annotated[str, typer.Argument(help="Driver name, as in \\[driver.<name>].")]


class LogLevel(enum.StrEnum):
    """``--log-level``: the levels of ``log_level`` (:data:`isovisor.config.LOG_LEVELS`)."""

    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


assert tuple(v.value for v in LogLevel) == LOG_LEVELS


def driver_swap(
    name: NameArg,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            metavar="MODULE[:CLASS]",
            help="The new backend class, e.g. drivers.blk.ram:RamBackend (a module alone "
            "means its Backend class).",
        ),
    ] = None,
    to_file: Annotated[
        Path | None,
        typer.Option(
            "--to-file",
            metavar="FILE.py[:CLASS]",
            help="The new backend from a Python file (its Backend class, or its only backend "
            "class).",
        ),
    ] = None,
    watch: Annotated[
        Path | None,
        typer.Option(
            "--watch",
            metavar="FILE.py",
            help="Swap to this file now and again every time it changes, until Ctrl-C.",
        ),
    ] = None,
    probation: Annotated[
        float | None,
        typer.Option(
            "--probation",
            help="Seconds the new backend must serve without dying before the "
            "swap is final (default 1).",
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            help="Seconds each step (drain, restore and hello) may take; less "
            "than the driver's request_timeout_sec (default: 5, or half "
            "of request_timeout_sec when that is shorter).",
        ),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option",
            metavar="KEY=VALUE",
            help="An option of the new backend (repeat for more). Given options replace the "
            "driver's \\[driver.NAME.options] for the new instance, and stay with the driver "
            "once the swap is final; without any, the driver's options are kept. Values are "
            'read as TOML: 8, 2.5, true, "quoted", else the text as a string. An unknown '
            "option refuses the swap, naming the allowed ones.",
        ),
    ] = None,
    no_options: Annotated[
        bool,
        typer.Option(
            "--no-options",
            help="The new backend gets no options (the driver's are dropped, e.g. when "
            "swapping back to a backend that would refuse them).",
        ),
    ] = False,
    log_level: Annotated[
        LogLevel | None,
        typer.Option(
            "--log-level",
            case_sensitive=False,
            help="The level of the new instance's log (driver-NAME.log in the run "
            "directory). Default: the driver's log_level.",
        ),
    ] = None,
    debug: Annotated[
        bool | None,
        typer.Option(
            "--debug/--no-debug",
            help="Run the new instance in debug mode: no hang checks, and breakpoint() "
            "opens pdb on a socket in the run directory (docs/configuration.md). "
            "Default: as the driver is.",
        ),
    ] = None,
    max_swaps: Annotated[
        int,
        typer.Option("--max-swaps", help="With --watch: stop after this many swaps (0: never)."),
    ] = 0,
    wait: Annotated[float, typer.Option("--wait", help="Seconds to wait for an outcome.")] = 60.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print each outcome as JSON.")] = False,
    run_dir: RunDirOpt = None,
) -> None:
    """Replace a driver's backend implementation under running guests (hot swap).

    The new backend is loaded beside the running one first; if it cannot be loaded the swap
    is refused and nothing stops.  Then the driver is drained, its state saved and restored
    into the new backend, and the guests resume.  If the new backend refuses the state,
    misses its deadline or dies in its first requests, the old one is brought back.

    After a swap the driver keeps the new backend, and the options, log level and debug
    mode given here, until the stack stops: restarts and spares use them.
    """
    if sum(x is not None for x in (to, to_file, watch)) != 1:
        fail("give exactly one of --to MODULE[:CLASS], --to-file FILE.py or --watch FILE.py")
    if no_options and option:
        raise typer.BadParameter(
            "give --option or --no-options, not both", param_hint="'--no-options'"
        )
    try:
        options = {} if no_options else parse_options(option) if option else None
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="'--option'") from None
    settings: dict[str, Any] = {
        "options": options,
        "log_level": log_level.value if log_level else None,
        "debug": debug,
    }
    rd = _run_dir(run_dir)
    if rd.running_pid() is None:
        fail(
            f"no stack is running in {rd.path}: start one with `isovisor up`, or pass "
            "--run-dir / ISOVISOR_RUN_DIR of a running stack"
        )
    if watch is not None:
        _watch(rd, name, watch, probation, timeout, wait, max_swaps, as_json, settings)
        return
    result = _swap_once(rd, name, target_of(to, to_file), probation, timeout, wait, settings)
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        _print_outcome(result)
    if result["outcome"] != "swapped":
        raise typer.Exit(1)


def _swap_once(
    rd: RunDir,
    name: str,
    target: str,
    probation: float | None,
    timeout: float | None,
    wait: float,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """One swap; ``settings``: the new instance's ``options``, ``log_level``, ``debug``."""
    try:
        return swap(rd, name, target, probation=probation, timeout=timeout, wait=wait, **settings)
    except ControlError as e:
        fail(e.reason)
    except SwapTimeout as e:
        fail(str(e))


def _print_outcome(r: dict[str, Any], stamp: bool = False) -> None:
    when = f"[{datetime.datetime.now():%H:%M:%S}] " if stamp else ""
    name, new, old = r.get("name"), r.get("new"), r.get("old")
    if r["outcome"] == "swapped":
        out.print(
            escape(
                f"{when}swapped {name}: {old} -> {new}; pid {r.get('old_pid')} -> "
                f"{r.get('pid')}; stall {_ms(r.get('stall_ms'))}, "
                f"{r.get('carried') or 0} request(s) carried over"
            )
        )
        return
    verb = {"rolled_back": "rolled back", "refused": "refused", "failed": "failed"}.get(
        r["outcome"], r["outcome"]
    )
    why = f" ({r['reason']})" if r.get("reason") else ""
    kept = f"; {old} (pid {r.get('old_pid')}) goes on serving" if r["outcome"] != "failed" else ""
    err.print(
        escape(f"{when}swap of {name} to {new} {verb}{why}: {r.get('error') or '?'}{kept}"),
        style="bold red" if r["outcome"] == "failed" else "red",
    )
    if r.get("rollback_stall_ms") is not None:
        err.print(escape(f"{when}guests paused {_ms(r['rollback_stall_ms'])} in all"))
    if r.get("traceback"):
        err.print(escape(r["traceback"].rstrip()), style="dim")


def _ms(v: Any) -> str:
    return f"{v:.1f} ms" if isinstance(v, int | float) else "-"


def _fingerprint(p: Path) -> str | None:
    try:
        return hashlib.sha1(p.read_bytes()).hexdigest()
    except OSError:
        return None


def _watch(
    rd: RunDir,
    name: str,
    path: Path,
    probation: float | None,
    timeout: float | None,
    wait: float,
    max_swaps: int,
    as_json: bool,
    settings: dict[str, Any],
) -> None:
    path = path.expanduser().resolve()
    if not path.is_file():
        fail(f"--watch: {path} does not exist")
    target = str(path)
    (err if as_json else out).print(
        escape(
            f"watching {path}: driver {name} is swapped to it now and on every change (Ctrl-C to "
            "stop)"
        )
    )
    swaps = 0
    last = _fingerprint(path)
    try:
        while True:
            r = _swap_once(rd, name, target, probation, timeout, wait, settings)
            swaps += 1
            if as_json:
                print(json.dumps(r), flush=True)
            else:
                _print_outcome(r, stamp=True)
            if max_swaps and swaps >= max_swaps:
                return
            last = _wait_for_change(rd, path, last)
    except KeyboardInterrupt:
        out.print(f"stopped watching after {swaps} swap(s)")


def _wait_for_change(rd: RunDir, path: Path, last: str | None) -> str | None:
    """Block until the file's content differs from ``last`` and has settled; the new one."""
    while True:
        time.sleep(WATCH_POLL_S)  # polling a file: the simplest portable watcher
        if rd.running_pid() is None:
            fail(f"the stack in {rd.path} stopped")
        now = _fingerprint(path)
        if now is None or now == last:
            continue
        time.sleep(WATCH_SETTLE_S)
        if _fingerprint(path) == now:
            return now


def driver_stats(
    name: NameArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    run_dir: RunDirOpt = None,
) -> None:
    """A driver's statistics, as its backend reports them (statistics(), refreshed every
    second), with its implementation and recent swaps."""
    rows = {d["name"]: d for d in _call(_run_dir(run_dir), "status")["drivers"]}
    row = rows.get(name)
    if row is None:
        fail(f"no driver named {name!r} (drivers: {', '.join(rows) or 'none'})")
    if as_json:
        print(
            json.dumps(
                {
                    k: row.get(k)
                    for k in (
                        "name",
                        "module",
                        "pid",
                        "statistics",
                        "statistics_error",
                        "swaps",
                        "last_swap",
                        "log",
                        "log_level",
                        "debug",
                        "options",
                    )
                },
                indent=2,
            )
        )
        return
    out.print(
        escape(
            f"driver {name}: {row.get('module')} (pid {row.get('pid')}), "
            f"{row.get('swaps') or 0} swap(s)"
        )
    )
    out.print(escape(driver_setup(row)), style="bold yellow" if row.get("debug") else None)
    problem = statistics_problem(row, _run_dir(run_dir))
    if problem is not None:  # the backend's statistics() raised: say so, not an empty table
        out.print(escape(problem), style="bold red")
    else:
        t = Table(box=None, pad_edge=False)
        t.add_column("Statistic")
        t.add_column("Value", justify="right")
        for k, v in (row.get("statistics") or {}).items():
            t.add_row(escape(str(k)), escape(str(v)))
        out.print(t)
    last = row.get("last_swap")
    if last:
        out.print(
            escape(
                f"last swap: {last.get('outcome')} {last.get('old')} -> "
                f"{last.get('new')}, stall {_ms(last.get('stall_ms'))}"
            )
        )
