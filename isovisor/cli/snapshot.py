"""``isovisor save``, ``restore``, ``migrate`` and ``keys``: a running domain to a snapshot file
and back, as ``xl save`` / ``xl restore`` (docs/snapshots.md), and to another stack while it
runs, as ``xl migrate`` (docs/migration.md)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from ipc.control import ControlError
from isovisor.cli.common import RunDirOpt, _call, _client, _run_dir, fail, out


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


def migrate(
    name: Annotated[str, typer.Argument(help="Domain name or id.")],
    peer: Annotated[str, typer.Argument(help="Destination stack, by its name in the peers file.")],
    max_downtime: Annotated[
        float,
        typer.Option(
            "--max-downtime", help="Stop and copy once the rest fits in this many ms.", min=0.1
        ),
    ] = 50.0,
    max_rounds: Annotated[
        int, typer.Option("--max-rounds", help="Stop and copy after this many rounds.", min=1)
    ] = 30,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout", help="Seconds to wait for each answer of the destination.", min=0.1
        ),
    ] = 10.0,
    max_bandwidth: Annotated[
        float,
        typer.Option(
            "--max-bandwidth",
            help="MB/s the pages sent while the guest runs may take (0: no limit).",
            min=0,
        ),
    ] = 0.0,
    no_auto_converge: Annotated[
        bool,
        typer.Option(
            "--no-auto-converge",
            help="Never throttle a guest that dirties memory faster than it is sent.",
        ),
    ] = False,
    with_disks: Annotated[
        bool,
        typer.Option(
            "--with-disks",
            help="Copy the disk images along while the guest runs (stacks without shared "
            "storage; the destination needs [migration] disks).",
        ),
    ] = False,
    wait: Annotated[float, typer.Option("--wait", help="Seconds to wait for the outcome.")] = 600,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON.")] = False,
    run_dir: RunDirOpt = None,
) -> None:
    """Live-migrate a running domain to another stack (xl migrate): pre-copy rounds while it
    runs, then a short stop and copy; if anything fails first it runs on here."""
    import json

    from ipc.events import subscribe

    rd = _run_dir(run_dir)
    with _client(rd) as c:
        try:
            sub = subscribe(rd.events, [f"domain.{name}.migration"], c)
        except ControlError as e:
            fail(e.reason)
        try:
            r = c.call(
                "migrate",
                name=name,
                peer=peer,
                max_downtime_ms=max_downtime,
                max_rounds=max_rounds,
                timeout_s=timeout,
                auto_converge=not no_auto_converge,
                max_bandwidth_mbs=max_bandwidth,
                with_disks=with_disks,
            )
        except ControlError as e:
            sub.close()
            fail(e.reason)
    try:
        deadline = time.monotonic() + wait
        while True:
            ev = sub.recv(max(0.0, deadline - time.monotonic()))
            if ev is None:
                fail(f"no outcome of the migration of {r['name']} within {wait:g}s")
            topic, p = ev
            if topic == f"domain.{r['name']}.migration" and p.get("migration") == r["migration"]:
                break
    finally:
        sub.close()
    if as_json:
        print(json.dumps(p, indent=2))
    elif p["outcome"] == "migrated":
        throttled = f", throttled to {p['throttle']}%" if p["throttle"] else ""
        if p.get("disk_blocks"):
            throttled += f", {p['disk_blocks']} disk blocks copied"
        out.print(
            f"migrated domain {r['name']} to {peer} ({p['address']}, id {p['dest_domid']} "
            f"there): {p['rounds']} round(s), {p['pages_sent']} pages sent "
            f"({p['pages_touched']} touched), downtime {p['downtime_ms']:.1f} ms, total "
            f"{p['total_ms']:.1f} ms{throttled}"
        )
    if p["outcome"] != "migrated":
        here = "; it runs on here" if p.get("source_running") else ""
        fail(f"migration of {r['name']} to {peer} failed: {p['reason']}{here}")


def keys(
    config: Annotated[
        Path, typer.Argument(help="The stack's supervisor.toml (default ./supervisor.toml).")
    ] = Path("supervisor.toml"),
) -> None:
    """Create this stack's key pair for migrations (if it has none) and print the line the
    peers file of another stack needs to trust it."""
    from ipc.peers import PeerError, create_keys
    from isovisor.config import ConfigError, load_stack_config

    try:
        cfg = load_stack_config(config)
        pair, made = create_keys(Path(cfg.migration.keys))
    except (ConfigError, PeerError, OSError) as e:
        fail(str(e))
    where = cfg.migration.listen or "tcp://HOST:PORT"
    out.print(
        f"{'created' if made else 'key pair'} {cfg.migration.keys}/stack.key{{,_secret}}\n"
        f"add this line to the peers file ({Path(cfg.migration.peers).name}) of each stack "
        f"that sends guests here or receives them from here:\n"
        f"{cfg.name} {pair.public.decode()} {where}",
        soft_wrap=True,
    )
