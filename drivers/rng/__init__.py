"""The entropy driver: ``python -m drivers.host --module drivers.rng ...`` fills the guests'
requests for random bytes from the host's ``getrandom`` (class ``rng``: devices/rng.py)."""

from drivers.rng.backend import Backend, RngBackend

__all__ = ["Backend", "RngBackend"]
