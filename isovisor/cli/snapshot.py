"""``isovisor save`` and ``restore``: a running domain to a snapshot file and back, as
``xl save`` / ``xl restore`` (docs/snapshots.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from isovisor.cli.common import RunDirOpt, _call, _run_dir, fail, out


def save(
    name: Annotated[str, typer.Argument(help="Domain name or id.")],
    file: Annotated[Path, typer.Argument(help="Snapshot file to write.")],
    checkpoint: Annotated[
        bool,
        typer.Option(
            "--checkpoint", "-c", help="Leave the domain running after the save (xl save -c)."
        ),
    ] = False,
    run_dir: RunDirOpt = None,
) -> None:
    """Save a domain to a snapshot file; without --checkpoint it is then destroyed."""
    path = file.resolve()
    if not path.parent.is_dir():
        fail(f"cannot save to {file}: directory {path.parent} does not exist")
    if path.is_dir():
        fail(f"cannot save to {file}: it is a directory; name a file")
    r = _call(_run_dir(run_dir), "save", name=name, path=str(path), checkpoint=checkpoint)
    then = "it runs on" if checkpoint else "it was destroyed; `isovisor restore` brings it back"
    out.print(
        f"saved domain {r['name']} (id {r['domid']}) to {path}: {r['pages']} pages, "
        f"{r['bytes']} bytes, paused {r['ms']:.1f} ms; {then}"
    )


def restore(
    file: Annotated[Path, typer.Argument(help="Snapshot file written by `isovisor save`.")],
    paused: Annotated[
        bool,
        typer.Option(
            "--paused", "-p", help="Leave the domain paused; `unpause` resumes it (xl restore -p)."
        ),
    ] = False,
    run_dir: RunDirOpt = None,
) -> None:
    """Create a domain from a snapshot file; it resumes where it was saved."""
    path = file.resolve()
    if not path.is_file():
        fail(f"cannot restore {file}: no such file")
    r = _call(_run_dir(run_dir), "restore", path=str(path), paused=paused)
    how = f" paused; resume it with `isovisor unpause {r['name']}`" if paused else ""
    out.print(f"restored domain {r['name']} (id {r['domid']}) from {path}{how}")
