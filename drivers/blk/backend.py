"""The block backend: virtual disks (class ``vbd``, devices/vbd.py) on the DeviceBackend base.

The base (drivers/devicebackend.py) does what every request/response class shares: attach
checks, the frontend handshake, serving the ring in batches with notification hold-off,
recovery from the in-flight log (requests redone in ring order after a crash, poison after
``poison_after`` deaths), fault injection, statistics and save/suspend/restore for hot swap
(docs/devices.md, docs/recovery.md).  This module is the block class's own work: a device's
disk opened on attach and its parameters published, each request carried out straight between
the disk and the device region (``preadv``/``pwritev``), a malformed one answered with an
error, and the block responses a fault spoils.

Implementations (the driver SDK, docs/sdk.md): :class:`BlockBackend` is all of the above, and a
subclass says how a device's disk is opened (:meth:`BlockBackend.open_disk`, which returns a
:class:`~drivers.blk.storage.Storage`: read, write, flush, discard) and, if it keeps the data
somewhere else than the configured disk, where (``medium_of``, ``release_disk``) and how it
takes a device over from another implementation (``restore_device``; drivers/blk/persist.py).
:class:`Backend` (``drivers.blk``) serves the configured disk itself; ``drivers.blk.ram`` keeps
a copy in memory.
"""

from __future__ import annotations

import abc
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from devices import vbd
from drivers.backendkit import int_option, msg_field
from drivers.blk import persist
from drivers.blk.export import DirtyMap, Exported, dirty_map_path, mirror_map_path, raw_view
from drivers.blk.persist import copy_medium
from drivers.blk.storage import SHM_DIR, Storage, StorageError, open_medium
from drivers.devicebackend import Device, DeviceBackend
from drivers.faults import RequestInfo
from drivers.state import BackendState, DeviceState, Medium, StateError
from ipc import blkif
from ipc.blkif import (
    OP_DISCARD,
    OP_FLUSH,
    OP_READ,
    OP_WRITE,
    SECTOR_SIZE,
    STATUS_ERROR,
    STATUS_OKAY,
    Request,
    RequestError,
    decode_request,
)

_pack_response = blkif.RESPONSE.pack
_RESPONSE_FAULTS = ("bad_id", "bad_status", "bad_op", "bad_index")

#: What ``fault_kind`` may name: what the host carries out itself (``leak`` is ``leak_mem``),
#: then the bad responses.
FAULT_KINDS: tuple[str, ...] = (
    *("exit", "exception", "segv", "abort", "hang", "leak", "leak_mem", "leak_fd"),
    *_RESPONSE_FAULTS,
)
_FAULT_OPS = (OP_READ, OP_WRITE, OP_DISCARD)


@dataclass(frozen=True)
class _Fault:
    """A test fault: a request covering ``sector`` makes the host inject ``kind``."""

    sector: int
    kind: str


def _fault_option(options: dict[str, Any]) -> _Fault | None:
    sector = options.get("fault_sector")
    if sector is not None:
        sector = int_option(options, "fault_sector", 0, 0, (1 << 64) - 1)
    kind = options.get("fault_kind")
    if (sector is None) != (kind is None):
        raise ValueError("fault_sector and fault_kind go together: give both or neither")
    if kind is None or sector is None:
        return None
    if kind not in FAULT_KINDS:
        raise ValueError(f"fault_kind must be one of {', '.join(FAULT_KINDS)}, got {kind!r}")
    return _Fault(sector, kind)


def _wait_at_gate(gate: object) -> None:
    """The ``start_gate`` test option: block while that file exists."""
    if gate is None:
        return
    if not isinstance(gate, str) or not gate:
        raise ValueError(f"start_gate must be a file path, got {gate!r}")
    while os.path.exists(gate):
        time.sleep(0.05)  # a test stands in for a driver stuck before its hello


class Disk(Device):
    """A block device: the base's :class:`~drivers.devicebackend.Device` and its disk (set
    by ``open_device``)."""

    #: What the implementation's ``open_disk`` returned (what its hooks are given).
    storage: Storage
    #: Serves the requests: ``storage``, or the :class:`~drivers.blk.export.Exported` around
    #: it that keeps the state's medium current when ``storage`` keeps the data its own way.
    io: Storage
    #: The device as the SDK hooks see it: its home disk, scratch name, where its data is now.
    info: DeviceState
    sectors: int
    #: Requests refused so far (the first 20 are logged, then every 1000th).
    bad_logged: int = 0
    #: While a migration copies the disk along: the blocks written since the kernel last
    #: read them (drivers/blk/export.py, mirror_map_path).
    mirror: DirtyMap | None = None


class BlockBackend(DeviceBackend[Disk], abc.ABC):
    """The block driver framework (the module docstring).

    Subclass it and implement :meth:`open_disk` (docs/sdk.md).  ``drivers.host`` instantiates
    the class with ``(host, options)``; a subclass that takes options of its own lists them in
    ``OPTIONS`` (``{**BlockBackend.OPTIONS, "name": "help"}``) and reads ``self.options``."""

    device_class = vbd.CLASS
    device_type = Disk
    #: States of the same kind can be restored by each other's implementations.
    state_kind: ClassVar[str] = "isovisor.blk"
    #: This implementation's state layout; older states go through :meth:`upgrade_state`.
    state_version: ClassVar[int] = 1
    #: A device's saved ``data`` is :meth:`save_device`'s, the counters restart (docs/sdk.md).
    carry_counters = False
    OPTIONS: ClassVar[dict[str, str]] = {
        **DeviceBackend.OPTIONS,
        "fault_sector": "tests only: a read, write or discard covering this sector triggers "
        "fault_kind while it executes (give both or neither)",
        "start_gate": "tests only: a file; while it exists the backend does not finish "
        "starting, so the instance never says hello (a driver stuck in its handshake)",
        "fault_kind": "tests only: the fault fault_sector triggers: exit, exception, segv, "
        "abort, hang, leak (leak_mem), leak_fd, or a bad response: bad_id, bad_status, "
        "bad_op, bad_index",
    }
    STATISTICS = ("requests", "errors", "batches", "notifications")
    DEVICE_STATISTICS = ()

    def configure(self, options: dict[str, Any]) -> None:
        #: Could a rollback still hand the devices back by their state's media?  From a hot
        #: swap's restore until the swap is committed (drivers/blk/export.py).
        self.rollback_possible = False
        _wait_at_gate(options.get("start_gate"))
        self.fault = _fault_option(options)
        if self.fault is not None:
            self.log.warning(
                "test fault armed: a request covering sector %d injects %r",
                self.fault.sector,
                self.fault.kind,
            )

    # -- what an implementation provides (docs/sdk.md) -----------------------------------------
    @abc.abstractmethod
    def open_disk(self, dev: DeviceState) -> Storage:
        """Open the disk of a device being attached and return the Storage that serves its
        requests.  ``dev.medium`` is where its data is now: ``dev.home`` (the configured disk)
        unless :meth:`restore_device` moved it.  Raise StorageError with a clear message if it
        cannot be opened (the device is then refused, and the guest sees it closed)."""
        raise NotImplementedError(f"{type(self).__name__} must implement open_disk(dev)")

    def restore_device(self, saved: DeviceState) -> DeviceState:
        """Take a device over from the backend that saved it (called by :meth:`restore`,
        before the device is attached again); return it as it is now.  The default moves the
        data home: if the saved medium is not ``saved.home`` (another implementation kept it
        elsewhere), it is copied over the home disk."""
        return persist.move_home(saved, self.log)

    def save_device(self, dev: DeviceState, storage: Storage) -> dict[str, Any]:
        """Backend-specific data about a device for the next implementation (default none)."""
        return {}

    def medium_of(self, dev: DeviceState, storage: Storage) -> Medium:
        """Where a device's data is while ``storage`` serves it (default: ``dev.medium``)."""
        return dev.medium

    def release_disk(self, dev: DeviceState, storage: Storage, *, handover: bool) -> None:
        """Close a device's disk.  ``handover``: another implementation takes the device over
        from the state just saved (do not tidy the data away); else the device is detached
        for good.  The default closes ``storage``."""
        storage.close()

    def committed(self) -> None:
        """The hot swap that brought this backend in is final (no rollback can need what it
        took the devices over from): a device's scratch memory disk that no longer holds its
        data is removed.  Override to tidy up more."""
        for d in self.devices.values():
            persist.drop_scratch(d.info, self._medium(d), self.log)

    # -- the framework's part of a hot swap (drivers/blk/export.py) -----------------------------
    def side_file(self, dev: DeviceState, name: str) -> Path:
        """A file of the implementation's own for ``dev`` (its data in a format of its own,
        an index, ...): ``/dev/shm/<scratch>.side.<name>``.  It outlives a crash of the
        driver process, so a replacement instance finds it; the framework removes it when the
        device comes over in a hot swap (the data is in ``dev.medium`` then, and a side file
        left by an earlier instance is out of date: build it again from there), and the
        kernel removes it with the device."""
        if not dev.scratch:
            raise StorageError(
                f"device {dev.label}: the kernel reserved no scratch name for it (an attach "
                "message without 'scratch'), so it can have no side files"
            )
        if not name or "/" in name:
            raise ValueError(f"side_file: name must be a non-empty file name, got {name!r}")
        return SHM_DIR / f"{dev.scratch}.side.{name}"

    def restore(self, state: BackendState) -> None:
        for dev in state.devices:  # side files of earlier instances are out of date now
            if dev.scratch:
                for stale in SHM_DIR.glob(f"{dev.scratch}.side.*"):
                    stale.unlink(missing_ok=True)
        super().restore(state)
        self.rollback_possible = True  # until ["committed"]: write opaque storage through

    def swap_committed(self) -> None:
        """``["committed"]``: no rollback can come any more; opaque storage stops writing
        through (its dirty map keeps the medium current from now on), then :meth:`committed`."""
        self.rollback_possible = False
        for d in self.devices.values():
            if isinstance(d.io, Exported):
                d.io.commit()
        self.committed()

    def _medium(self, d: Disk) -> Medium:
        """Where ``d``'s data is, in raw form: the medium the framework keeps current for
        opaque storage, else what the implementation says (``medium_of``)."""
        if isinstance(d.io, Exported):
            return d.io.medium
        return self.medium_of(d.info, d.storage)

    def _serve_through(self, d: Disk) -> Storage:
        """The storage that serves ``d``: its own if it reads and writes the medium its state
        names; else wrapped so that the medium stays current (drivers/blk/export.py)."""
        storage = d.storage
        if storage.readonly or raw_view(storage, self.medium_of(d.info, storage)):
            return storage
        dirty = DirtyMap(dirty_map_path(d.info.scratch), storage.size)
        try:
            io = Exported(
                storage,
                d.info.medium,
                dirty,
                through=self.rollback_possible,
                log=self.log,
                label=f"{d.key} ({d.label})",
            )
        except BaseException:
            dirty.close()
            raise
        self.log.info(
            "device %d (%s): %s keeps the data its own way; %s",
            d.key,
            d.label,
            type(storage).__name__,
            f"writes go through to {d.info.medium.target} until the swap is committed"
            if io.through
            else f"written blocks are exported to {d.info.medium.target} when the state is "
            "saved or the device goes",
        )
        return io

    # -- the base's hooks --------------------------------------------------------------------
    def open_device(self, d: Disk) -> None:
        a = d.attach
        try:
            d.info = persist.device_state(a, msg_field(a.body, "disk", dict), d.saved)
            d.storage = self.open_disk(d.info)
        except (StorageError, StateError) as e:
            raise ValueError(str(e)) from None
        except OSError as e:  # anything open_disk did not foresee
            raise ValueError(f"cannot open the disk: {e}") from None
        try:
            d.io = self._serve_through(d)
        except (StorageError, OSError) as e:
            self.release_disk(d.info, d.storage, handover=True)
            raise ValueError(str(e)) from None
        d.sectors = d.storage.sectors
        nodes = {
            "sectors": str(d.sectors),
            "sector-size": str(SECTOR_SIZE),
            "info": "1" if d.storage.readonly else "0",
            "feature-flush-cache": "1",
            "feature-discard": "1",
        }
        try:
            for node, value in nodes.items():
                self.host.store_write(f"{a.store}/{node}", value)
        except ValueError as e:
            self.close_device(d, handover=False)
            raise ValueError(f"cannot publish the disk parameters: {e}") from None
        self.log.info("device %d (%s): %r, %d sectors", d.key, d.label, d.storage, d.sectors)
        mirror = mirror_map_path(a.scratch)
        if mirror is not None and mirror.exists():  # a predecessor was marking for a migration
            self._start_mirror(d, mirror)

    def mirror_writes(self, key: int, on: bool) -> None:
        """``["mirror", key, on]``: a migration copies disk ``key`` along (``--with-disks``).
        On: from now on every write and discard marks its blocks in the device's mirror map,
        after it is done, so the kernel (which clears a block's mark before it reads the block)
        never misses one; ``<backend dir>/mirror`` says ``on``, or why not.  Off: stop and
        remove the map."""
        d = self.devices.get(key)
        if d is None:
            self.log.warning("mirror for unknown device %d", key)
            return
        path = mirror_map_path(d.attach.scratch)
        if not on:
            if d.mirror is not None:
                d.mirror.close()
                d.mirror = None
            if path is not None:
                path.unlink(missing_ok=True)
            self.host.store_write(f"{d.attach.store}/mirror", "off")
            return
        why = None
        if path is None:
            why = "the device has no scratch name to keep a write map under"
        elif isinstance(d.io, Exported) and not d.io.through:
            why = (
                f"{type(d.storage).__name__} keeps the data its own way, so the image is "
                "not current while it runs"
            )
        if why is not None:
            self.log.warning("device %d (%s): cannot copy it along: %s", key, d.label, why)
            self.host.store_write(f"{d.attach.store}/mirror", f"no: {why}")
            return
        assert path is not None
        self._start_mirror(d, path)

    def _start_mirror(self, d: Disk, path: Path) -> None:
        if d.mirror is None:
            d.mirror = DirtyMap(path, d.sectors * SECTOR_SIZE)
            self.log.info(
                "device %d (%s): writes marked for a migration in %s", d.key, d.label, path
            )
        self.host.store_write(f"{d.attach.store}/mirror", "on")

    def close_device(self, d: Disk, *, handover: bool) -> None:
        if d.mirror is not None:  # (the map stays: the kernel reads the last marks)
            d.mirror.close()
            d.mirror = None
        io = getattr(d, "io", None)
        if isinstance(io, Exported):
            try:
                io.export()
            except (OSError, StorageError) as e:
                self.log.error(
                    "device %d (%s): exporting its written blocks to %s failed: %s; the "
                    "medium misses them",
                    d.key,
                    d.label,
                    io.medium.target,
                    e,
                )
            io.end()
        try:
            self.release_disk(d.info, d.storage, handover=handover)
        except (OSError, StorageError) as e:
            self.log.error("device %d: closing the disk: %s", d.key, e)

    def device_media(self, d: Disk) -> tuple[Medium, Medium]:
        if isinstance(d.io, Exported):
            d.io.export()  # the state hands the device over by its medium: bring it up to date
        return d.info.home, self._medium(d)

    def device_data(self, d: Disk) -> dict[str, Any]:
        return self.save_device(d.info, d.storage)

    def perform(self, d: Disk, raw: bytes) -> bytes:
        try:
            req = decode_request(raw, window=d.attach.window, sectors=d.sectors)
        except RequestError as e:
            self._bad(d, e.status, str(e), e.id)
            return _pack_response(e.id, e.op, 0, e.status, 0)
        fault = self.fault
        if (
            fault is not None
            and req.op in _FAULT_OPS
            and req.sector <= fault.sector < req.sector + req.nr_sectors
        ):
            return self._test_fault(d, req, fault)
        return self._io(d, req)

    def _io(self, d: Disk, req: Request) -> bytes:
        """Carry out a decoded request; returns its response."""
        op, storage = req.op, d.io
        try:
            if op == OP_READ:
                region = d.region
                storage.readv_into(
                    req.sector * SECTOR_SIZE, [region[o : o + n] for o, n in req.segments]
                )
            elif op == OP_WRITE:
                if storage.readonly:
                    return self._refused(d, req, "write to read-only disk")
                region = d.region
                storage.writev_from(
                    req.sector * SECTOR_SIZE, [region[o : o + n] for o, n in req.segments]
                )
                if d.mirror is not None:  # after the write: see mirror_writes
                    d.mirror.mark(req.sector * SECTOR_SIZE, sum(n for _, n in req.segments))
            elif op == OP_FLUSH:
                storage.flush()
            elif op == OP_DISCARD:
                if storage.readonly:
                    return self._refused(d, req, "discard on read-only disk")
                storage.discard(req.sector * SECTOR_SIZE, req.nr_sectors * SECTOR_SIZE)
                if d.mirror is not None:
                    d.mirror.mark(req.sector * SECTOR_SIZE, req.nr_sectors * SECTOR_SIZE)
        except (OSError, StorageError) as e:
            return self._refused(
                d, req, f"{blkif.OP_NAMES[op]} of sector {req.sector}: I/O error: {e}"
            )
        return _pack_response(req.id, op, 0, STATUS_OKAY, 0)

    def _test_fault(self, d: Disk, req: Request, fault: _Fault) -> bytes:
        """``req`` covers ``fault_sector``: inject ``fault_kind`` while it executes (tests
        only: this is how they make a poison request)."""
        self.log.warning(
            "device %d (%s): request %#x covers fault_sector %d: injecting %s",
            d.key,
            d.label,
            req.id,
            fault.sector,
            fault.kind,
        )
        if fault.kind == "bad_index":
            self._spoil = fault.kind  # published after the batch (DeviceBackend)
        elif fault.kind in _RESPONSE_FAULTS:
            return self.spoil(fault.kind, self._io(d, req))
        else:
            self.host.carry_out("leak_mem" if fault.kind == "leak" else fault.kind)
        return self._io(d, req)

    def _refused(self, d: Disk, req: Request, message: str) -> bytes:
        self._bad(d, STATUS_ERROR, message, req.id)
        return _pack_response(req.id, req.op, 0, STATUS_ERROR, 0)

    def _bad(self, d: Disk, status: int, message: str, req_id: int) -> None:
        """Count a refused request; log the first 20 per device, then every 1000th."""
        d.stats.errors += 1
        d.bad_logged += 1
        k = d.bad_logged
        if k <= 20 or k % 1000 == 0:
            self.log.warning(
                "device %d (%s): request %#x refused (status %d): %s%s",
                d.key,
                d.label,
                req_id,
                status,
                message,
                f" [{k} refused so far]" if k > 20 else "",
            )

    def request_info(self, d: Disk, raw: bytes) -> RequestInfo | None:
        try:
            req = decode_request(raw, window=d.attach.window, sectors=d.sectors)
        except RequestError:
            return None  # faults never match a request the guest got wrong
        op = blkif.OP_NAMES.get(req.op, "?")
        return RequestInfo(d.attach.domain, d.attach.vdev, op, req.sector, req.nr_sectors)

    def spoil(self, kind: str, rsp: bytes) -> bytes:
        rid, op, pad, status, pad2 = blkif.RESPONSE.unpack_from(rsp)
        if kind == "bad_id":
            rid ^= 0x5EED << 40  # another sequence number: a stale or duplicate id
        elif kind == "bad_status":
            status = 7
        elif kind == "bad_op":
            op ^= 0x40
        else:
            raise ValueError(f"cannot spoil a response with {kind!r}")
        return _pack_response(rid, op, pad, status, pad2) + rsp[blkif.RESPONSE.size :]

    def corrupt_data(self, d: Disk, raw: bytes, rsp: bytes) -> None:
        """One wrong byte in a successful read's data."""
        try:
            req = decode_request(raw, window=d.attach.window, sectors=d.sectors)
        except RequestError:
            return
        okay = blkif.RESPONSE.unpack_from(rsp)[3] == STATUS_OKAY
        if req.op == OP_READ and req.segments and okay:
            d.region[req.segments[0][0]] ^= 0xFF

    def describe(self, d: Disk, raw: bytes) -> str:
        try:
            req = decode_request(raw, window=d.attach.window, sectors=d.sectors)
        except RequestError as e:
            return f"undecodable request id={e.id:#x} op={e.op} ({e})"
        segs = ", ".join(f"({o:#x}, {n})" for o, n in req.segments)
        return (
            f"{blkif.OP_NAMES[req.op]} id={req.id:#x} sector={req.sector} "
            f"nr_sectors={req.nr_sectors} segments=[{segs}]"
        )


class Backend(BlockBackend):
    """``drivers.blk``: serves each device's configured disk (an image file, or the kernel's
    memory disk) directly; a device taken over from an implementation that kept its data
    elsewhere is first copied home (:meth:`BlockBackend.restore_device`)."""

    def open_disk(self, dev: DeviceState) -> Storage:
        return open_medium(dev.medium)


__all__ = ["FAULT_KINDS", "Backend", "BlockBackend", "Disk", "copy_medium", "open_medium"]
