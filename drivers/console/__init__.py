"""The console driver: ``python -m drivers.host --module drivers.console ...`` logs each domain's
console to ``<log_dir>/<domain>.log``, serves live readers and takes input (class ``console``:
devices/console.py; the protocol: ``ipc/consif.py``).  ``backend.py`` is the backend on the
shared base (drivers/backendbase.py), ``endpoints.py`` its live-output and input sockets,
``persist.py`` what a console carries across a hot swap."""

from drivers.console.backend import Backend, ConsoleBackend

__all__ = ["Backend", "ConsoleBackend"]
