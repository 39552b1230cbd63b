"""The ``isovisor`` command line (docs/operations.md): one module per group of verbs, put
together into one typer app in app.py.

:func:`main` is the console script.  It imports the app only when called, so that importing
:mod:`isovisor.cli.swapclient` (the pytest plugin and the benchmarks do) does not load the
whole command line.
"""

from __future__ import annotations


def main() -> None:
    """The ``isovisor`` command."""
    from isovisor.cli.app import main as run

    run()


__all__ = ["main"]
