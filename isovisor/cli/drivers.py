"""``isovisor drivers``, ``status`` and ``driver start|stop|restart|swap|stats``: the stack's
driver backends and their supervision."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from isovisor.cli.common import (
    RunDirOpt,
    _call,
    _run_dir,
    _uptime,
    driver_setup,
    fail,
    out,
    statistics_problem,
)
from isovisor.cli.swap import driver_stats, driver_swap
from isovisor.paths import RunDir


def drivers(
    run_dir: RunDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the stack's driver backends: isolation, process id, state; then why each one
    that is down is down."""
    rd = _run_dir(run_dir)
    drvs = _call(rd, "drivers")["drivers"]
    if as_json:
        print(json.dumps(drvs, indent=2))
        return
    t = Table(box=None, pad_edge=False)
    for col in ("Name", "Module", "Isolation", "PID", "State", "Connected"):
        t.add_column(col)
    for d in drvs:
        live = d["state"] in ("STARTING", "RUNNING", "STOPPING")
        t.add_row(
            d["name"],
            d["module"],
            d["isolation"] + (f" ({d['jail']})" if d.get("jail") else ""),
            str(d["pid"] if live else "-"),
            d["state"],
            "yes" if d["connected"] else "no",
        )
    out.print(t)
    _print_problems(drvs, rd)


def status(
    run_dir: RunDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the driver list as JSON.")] = False,
) -> None:
    """Supervised drivers: state, process, uptime, restarts by reason, last failure, load;
    then why each one that is down is down, and each backend whose statistics() fails."""
    rd = _run_dir(run_dir)
    drvs = _call(rd, "status")["drivers"]
    if as_json:
        print(json.dumps(drvs, indent=2))
        return
    t = Table(box=None, pad_edge=False)
    for col, just in (
        ("Name", "left"),
        ("State", "left"),
        ("PID", "right"),
        ("Uptime", "right"),
        ("Restarts", "left"),
        ("Last failure", "left"),
        ("Devices", "right"),
        ("In-flight", "right"),
        ("Backend", "left"),
    ):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for d in drvs:
        live = d["state"] in ("STARTING", "RUNNING", "STOPPING")
        style = {"RUNNING": "green", "FATAL": "bold red", "BACKOFF": "yellow", "EXITED": "red"}.get(
            d["state"], ""
        )
        last = d.get("last_failure") or (
            "-" if d.get("supervised", True) else "inline: not supervised"
        )
        t.add_row(
            d["name"],
            f"[{style}]{d['state']}[/]" if style else d["state"],
            str(d["pid"]) if live and d.get("pid") else "-",
            _uptime(d["uptime_s"]) if live and d.get("uptime_s") is not None else "-",
            _restarts(d),
            Text(_first_line(last), no_wrap=True),
            _count(d.get("devices")),
            _count(d.get("outstanding")),
            escape(_backend(d)),
        )
    out.print(t)
    for d in drvs:  # where each driver's log is, and how it runs
        setup = escape(driver_setup(d))
        if d.get("debug"):
            setup = f"[bold yellow]{setup}[/]"
        out.print(f"{escape(d['name'])}: {setup}", markup=True)
    _print_problems(drvs, rd)


#: Characters of a driver's last failure the status table shows (the rest: below it).
LAST_FAILURE_WIDTH = 60


def _first_line(text: str, width: int = LAST_FAILURE_WIDTH) -> str:
    """``text`` on one line of at most ``width`` characters ("…": there is more)."""
    lines = text.splitlines() or [""]
    line = lines[0]
    if len(line) <= width and len(lines) == 1:
        return line
    return line[: width - 1] + "…"


def _print_problems(drvs: list[dict[str, Any]], rd: RunDir) -> None:
    """Below a table of drivers: why each one that is down (FATAL, EXITED, BACKOFF) is down,
    in full (its backend's own error, and where in its code), and each backend whose
    ``statistics()`` fails."""
    for d in drvs:
        name, state = d["name"], d["state"]
        if state in ("FATAL", "EXITED", "BACKOFF") and d.get("last_failure"):
            again = (
                "it is started again after its backoff"
                if state == "BACKOFF"
                else f"start it again with `isovisor driver start {name}`"
            )
            out.print(
                f"[bold red]{escape(name)} is {state}:[/] "
                f"{escape(d['last_failure'])}; {escape(again)}",
                markup=True,
            )
        problem = statistics_problem(d, rd)
        if problem is not None:
            out.print(f"[yellow]{escape(name)}:[/] {escape(problem)}", markup=True)


def _backend(d: dict[str, Any]) -> str:
    """The implementation, and its swaps: one under way, or how many and the last outcome."""
    text = str(d.get("module") or "-")
    if d.get("swap"):
        return f"{text} (swap: {d['swap']})"
    last = d.get("last_swap")
    if last:
        stall = last.get("stall_ms")
        took = f", {stall:.0f} ms" if isinstance(stall, int | float) else ""
        text += f" ({d.get('swaps')} swap(s), last {last.get('outcome')}{took})"
    return text


def _restarts(d: dict[str, Any]) -> str:
    by = d.get("restarts_by_reason") or {}
    if not by:
        return str(d.get("restarts", 0))
    parts = ", ".join(f"{r} {n}" for r, n in sorted(by.items(), key=lambda x: -x[1]))
    return f"{d.get('restarts', 0)} ({parts})"


def _count(v: Any) -> str:
    if v is None:
        return "-"
    return str(len(v)) if isinstance(v, list | dict) else str(v)


driver_app = typer.Typer(
    no_args_is_help=True, help="Start, stop, restart or hot-swap a supervised driver process."
)
driver_app.command("swap")(driver_swap)
driver_app.command("stats")(driver_stats)
NameArg = Annotated[str, typer.Argument(help="Driver name, as in \\[driver.<name>].")]
WaitOpt = Annotated[float, typer.Option("--wait", help="Seconds to wait for the result.")]


@driver_app.command("start")
def driver_start(name: NameArg, run_dir: RunDirOpt = None, wait: WaitOpt = 30.0) -> None:
    """Start a STOPPED, EXITED, BACKOFF or FATAL driver (a fresh restart count)."""
    _driver_action("start", name, run_dir, wait)


@driver_app.command("stop")
def driver_stop(name: NameArg, run_dir: RunDirOpt = None, wait: WaitOpt = 30.0) -> None:
    """Stop a driver: SIGTERM, SIGKILL after graceful_timeout; its devices wait for a start."""
    _driver_action("stop", name, run_dir, wait)


@driver_app.command("restart")
def driver_restart(name: NameArg, run_dir: RunDirOpt = None, wait: WaitOpt = 30.0) -> None:
    """Replace a driver's process (reason `manual`; not counted toward intensity)."""
    _driver_action("restart", name, run_dir, wait)


def _driver_row(rd: RunDir, name: str) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {d["name"]: d for d in _call(rd, "status")["drivers"]}
    return rows.get(name, {})


def _driver_action(action: str, name: str, run_dir: Path | None, wait: float) -> None:
    rd = _run_dir(run_dir)
    before = _driver_row(rd, name)
    r = _call(rd, "driver", action=action, name=name)
    old = before.get("pid") if before.get("state") in ("STARTING", "RUNNING") else None
    deadline = time.monotonic() + wait
    while True:
        row = _driver_row(rd, name)
        state, pid = row.get("state"), row.get("pid")
        if action == "stop" and state == "STOPPED":
            out.print(f"stopped driver {name}")
            return
        if action != "stop" and state == "RUNNING" and pid != old:
            was = f" (was pid {old})" if old else ""
            out.print(f"{action}ed driver {name}: pid {pid}{was}")
            return
        if action != "stop" and state in ("FATAL", "EXITED"):
            fail(f"driver {name} is {state}: {row.get('last_failure')}")
        error = row.get("last_error")
        if action != "stop" and error and error != before.get("last_error"):
            # an instance started by this command said why it failed: no use waiting for
            # the retries (the supervisor goes on with them: a fixed file is picked up)
            fail(
                f"driver {name} failed after the {action}: {row.get('last_failure')}; it is "
                f"{state}: the supervisor goes on starting it (a fixed file is picked up), "
                f"see `isovisor status` and {rd.driver_log(name)}"
            )
        if time.monotonic() > deadline:
            fail(
                f"driver {name} is still {state} after {wait:g}s (asked: {action}, reply "
                f"state {r.get('state')}); see `isovisor status` and "
                f"{rd.driver_log(name)}"
            )
        time.sleep(0.05)  # a status poll: the reply comes before the process is up
