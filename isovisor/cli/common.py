"""What every ``isovisor`` subcommand shares: the consoles, errors, and the stack's socket."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from ipc.control import Client, ControlError
from ipc.schema import show, show_key
from isovisor.config import ConfigError, default_run_dir, load_stack_config
from isovisor.paths import RunDir

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

RunDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--run-dir",
        envvar="ISOVISOR_RUN_DIR",
        show_envvar=True,
        help="The stack's run directory (sockets, logs). Default: /tmp/isovisor-$UID/default.",
    ),
]

EXIT_CRASHED = 125
EXIT_TIMEOUT = 124


def fail(msg: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]isovisor: error:[/] {escape(msg)}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _run_dir(opt: Path | None) -> RunDir:
    """--run-dir / ISOVISOR_RUN_DIR, else ./supervisor.toml's run_dir, else the default."""
    if opt is not None:
        return RunDir(opt)
    local = Path("supervisor.toml")
    if "ISOVISOR_RUN_DIR" not in os.environ and local.is_file():
        try:
            cfg = load_stack_config(local)
        except ConfigError:
            cfg = None
        if cfg is not None and cfg.run_dir:
            return RunDir(Path(cfg.run_dir))
    return RunDir(default_run_dir())


def _client(rd: RunDir, timeout: float = 15.0) -> Client:
    if rd.running_pid() is None:
        fail(
            f"no stack is running in {rd.path}: start one with `isovisor up`, or pass "
            "--run-dir / ISOVISOR_RUN_DIR of a running stack"
        )
    return Client(rd.control, timeout=timeout)


def _call(rd: RunDir, command: str, **props: Any) -> dict[str, Any]:
    with _client(rd) as c:
        try:
            return c.call(command, **props)
        except ControlError as e:
            fail(e.reason)


def driver_setup(d: dict[str, Any]) -> str:
    """Where a driver's log is and how it runs, from its ``status`` row: its log file and
    level, debug mode, and its backend's options (``status``, ``driver stats``)."""
    parts = []
    if d.get("debug"):
        parts.append("DEBUG MODE (no hang checks; breakpoint() opens pdb)")
    level = d.get("log_level")
    parts.append(f"log {d.get('log') or '-'}" + (f" (level {level})" if level else ""))
    opts = d.get("options") or {}
    if opts:
        parts.append("options " + ", ".join(f"{show_key(k)} = {show(v)}" for k, v in opts.items()))
    return "; ".join(parts)


def statistics_problem(d: dict[str, Any], rd: RunDir) -> str | None:
    """Why a driver shows no statistics, from its ``status`` row: its backend's
    ``statistics()`` raised or returned no dict (``statistics_error``, with where in the
    backend's code), and where the traceback is; None if it did not fail."""
    error = d.get("statistics_error")
    if not error:
        return None
    return f"{error}; the traceback is in {d.get('log') or rd.driver_log(str(d.get('name')))}"


def _uptime(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
