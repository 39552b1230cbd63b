"""The block driver: ``python -m drivers.host --module drivers.blk ...`` serves virtual disks."""

from drivers.blk.backend import Backend

__all__ = ["Backend"]
