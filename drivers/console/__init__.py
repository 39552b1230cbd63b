"""The console driver: ``python -m drivers.host --module drivers.console ...`` logs each domain's
console to ``<log_dir>/<domain>.log``, serves live readers and takes input (see
``drivers/console/backend.py`` and ``ipc/consif.py``)."""

from drivers.console.backend import Backend, ConsoleBackend

__all__ = ["Backend", "ConsoleBackend"]
