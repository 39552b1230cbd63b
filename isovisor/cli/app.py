"""The ``isovisor`` command: the typer app, which puts together the verbs of the modules next to
this one (a stack's life in stack.py, domains in domains.py, drivers in drivers.py and swap.py,
faults, campaigns and net), and :func:`main`."""

from __future__ import annotations

import sys

import typer

from isovisor.cli import domains, drivers, snapshot, stack
from isovisor.cli.campaign import campaign_app
from isovisor.cli.faults import fault_app
from isovisor.cli.net import net_app

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="isovisor: run guests on a microkernel-style hypervisor.",
    context_settings={"help_option_names": ["-h", "--help"]},
)

# The order here is the order of `isovisor --help` (typer lists the commands, then the groups).
app.command()(stack.up)
app.command()(stack.down)
app.command("list")(domains.list_)
app.command()(domains.devices)
app.command()(drivers.drivers)
app.command()(drivers.status)
app.command()(stack.events)
app.command()(domains.console)
app.command()(domains.create)
app.command("destroy")(domains.destroy)
app.command("pause")(domains.pause)
app.command("unpause")(domains.unpause)
app.command()(snapshot.save)
app.command()(snapshot.restore)
app.command()(snapshot.migrate)
app.command()(snapshot.keys)
app.command()(stack.run)
app.add_typer(drivers.driver_app, name="driver")
app.add_typer(fault_app, name="fault")
app.add_typer(campaign_app, name="campaign")
app.add_typer(net_app, name="net")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
