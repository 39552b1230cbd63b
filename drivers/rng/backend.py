"""The entropy backend: one request is "N random bytes at this offset of the region", answered
from ``os.getrandom``.  Everything else (attach, the handshake, recovery from the in-flight
log, faults, statistics, hot swap) is the base's: drivers/devicebackend.py."""

from __future__ import annotations

import os
from typing import Final

from devices import rng
from drivers.devicebackend import Device, DeviceBackend
from drivers.faults import RequestInfo

#: Refused requests logged per device before only every 1000th is.
_LOG_FIRST: Final = 20


class RngBackend(DeviceBackend):
    """``drivers.rng``: serves ``rng`` devices from the host's entropy."""

    device_class = rng.CLASS
    state_kind = "isovisor.rng"
    state_version = 1

    def perform(self, d: Device, raw: bytes) -> bytes:
        try:
            req = rng.decode_request(raw)
        except rng.RequestError as e:  # the guest's mistake: an error response, never a crash
            d.stats.errors += 1
            if d.stats.errors <= _LOG_FIRST or d.stats.errors % 1000 == 0:
                self.log.warning("device %d (%s): refused: %s", d.key, d.label, e)
            return rng.encode_response(e.id, rng.STATUS_ERROR, 0)
        d.region[req.offset : req.offset + req.length] = os.getrandom(req.length)
        return rng.encode_response(req.id, rng.STATUS_OKAY, req.length)

    def request_info(self, d: Device, raw: bytes) -> RequestInfo | None:
        return RequestInfo(d.attach.domain, d.attach.vdev, "read", d.current, 1)

    def spoil(self, kind: str, rsp: bytes) -> bytes:
        rid, status, pad, length = rng.RESPONSE.unpack_from(rsp)
        if kind == "bad_id":
            rid ^= 0x5EED << 40  # another sequence number: a stale or duplicate id
        elif kind == "bad_status":
            status = 7
        else:
            raise ValueError(f"cannot spoil an rng response with {kind!r}")
        return rng.RESPONSE.pack(rid, status, pad, length)

    def describe(self, d: Device, raw: bytes) -> str:
        rid, offset, length = rng.REQUEST.unpack_from(raw.ljust(rng.REQUEST.size, b"\0"))
        return f"read id={rid:#x} offset={offset:#x} length={length}"


class Backend(RngBackend):
    """``drivers.rng``: the entropy driver."""
