"""``isovisor fault add|list|remove|reset``: faults injected into a running stack's drivers
(docs/campaigns.md)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from isovisor.cli.common import RunDirOpt, _call, _run_dir, fail, out
from isovisor.supervisor.faulttable import ALL_TYPES

fault_app = typer.Typer(no_args_is_help=True, help="Inject faults into a running stack's drivers.")


def _value(text: str) -> Any:
    """``-a key=value``: an integer, a number, true/false, or the text."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _args(pairs: list[str]) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            fail(f"-a {pair!r}: give key=value, e.g. -a probability=50 -a op=write")
        spec[key.strip()] = _value(value.strip())
    return spec


@fault_app.command("add")
def fault_add(
    driver: Annotated[str, typer.Argument(help="Driver name, as in \\[driver.<name>].")],
    type_: Annotated[str, typer.Option("--type", "-t", help="Fault type: " + ", ".join(ALL_TYPES))],
    arg: Annotated[
        list[str] | None,
        typer.Option(
            "--arg",
            "-a",
            help="key=value: probability, interval, times (-1 unlimited), "
            "fail_nth, domain, vdev, op, sector, latency_ms, jitter_ms.",
        ),
    ] = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Arm a fault in a driver (or, for sigkill/sigstop, carry it out now); prints its id."""
    if type_ not in ALL_TYPES:
        fail(f"unknown fault type {type_!r}; choose one of {', '.join(ALL_TYPES)}")
    row = _call(
        _run_dir(run_dir),
        "fault",
        action="add",
        driver=driver,
        spec={"type": type_, **_args(arg or [])},
    )["fault"]
    out.print(
        f"fault {row['id']}: {row['type']} on {row['driver']}"
        + (f" ({_fmt_args(row['args'])})" if row["args"] else "")
        + ("" if row["armed"] else " (done)")
    )


def _fmt_args(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in args.items())


@fault_app.command("list")
def fault_list(
    run_dir: RunDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The faults of the stack: armed or spent, how often each fired, in which processes."""
    rows = _call(_run_dir(run_dir), "fault", action="list")["faults"]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        out.print("no faults")
        return
    t = Table(box=None, pad_edge=False)
    for col in ("ID", "Driver", "Type", "State", "Fired", "In pids", "Arguments"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            str(r["id"]),
            r["driver"],
            r["type"],
            "armed" if r["armed"] else "spent",
            str(r["fired"]),
            ", ".join(map(str, r["pids"])) or "-",
            escape(_fmt_args(r["args"])) or "-",
        )
    out.print(t)


@fault_app.command("remove")
def fault_remove(
    fault_id: Annotated[int, typer.Argument(help="The id `fault list` shows.")],
    run_dir: RunDirOpt = None,
) -> None:
    """Disarm and forget one fault."""
    row = _call(_run_dir(run_dir), "fault", action="remove", fault_id=fault_id)["fault"]
    out.print(f"removed fault {row['id']} ({row['type']} on {row['driver']})")


@fault_app.command("reset")
def fault_reset(
    driver: Annotated[
        str | None, typer.Argument(help="Only this driver's faults (default: all).")
    ] = None,
    run_dir: RunDirOpt = None,
) -> None:
    """Disarm and forget every fault (of one driver)."""
    props: dict[str, Any] = {"action": "reset"}
    if driver is not None:
        props["driver"] = driver
    n = _call(_run_dir(run_dir), "fault", **props)["removed"]
    out.print(f"removed {n} fault{'' if n == 1 else 's'}")
