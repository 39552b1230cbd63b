"""What every ``isovisor`` subcommand shares: the consoles, errors, and the stack's socket."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from ipc.control import Client, ControlError
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


def _uptime(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
