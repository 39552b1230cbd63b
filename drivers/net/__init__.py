"""The net driver: ``python -m drivers.host --module drivers.net ...`` runs a learning switch
between the vifs of guests, with an optional TAP uplink (docs/net.md)."""

from drivers.net.backend import Backend

__all__ = ["Backend"]
