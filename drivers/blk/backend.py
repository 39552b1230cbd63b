"""The block backend: serves virtual block devices (one per ``attach`` key) over their rings.

Per device it maps the device's shared-memory segment (and nothing else of the guest), opens the
disk, runs the backend half of the handshake (docs/devices.md) and then services the ring on
every kick: take a batch of requests, record each in the in-flight log, move the data directly
between the disk and the region with ``preadv``/``pwritev``, queue the responses, publish them
(notifying the guest only if it asked), retire the in-flight records, and look again before
going idle.

Guests are untrusted: a malformed request gets an error response; a broken ring index is a
``fault`` (the kernel crashes that domain) and the device is not served any more.  Nothing one
device does can stop the backend serving the others.

Recovery (docs/recovery.md): each request is flagged *executing* in its in-flight record while
the backend acts on it.  Any exception other than a guest's ring violation is a bug of the
backend, not the guest's doing: it escapes to the host, which exits (status 70) so the
supervisor starts a replacement.  The replacement resumes each connected device: it counts a
death for the record found executing, redoes the unfinished requests in ring order, answers
with ``STATUS_ERROR`` (and reports ``poison``) a request that has killed ``poison_after``
instances, and reports ``recovered`` with how many it redid.

Implementations (the driver SDK, docs/sdk.md): :class:`BlockBackend` is everything above, and
a subclass says only how a device's disk is opened (:meth:`BlockBackend.open_disk`, which
returns a :class:`~drivers.blk.storage.Storage`: read, write, flush, discard) and, if it keeps
the data somewhere else than the configured disk, how it takes a device over from another
implementation (:meth:`BlockBackend.restore_device`).  :class:`Backend` (``drivers.blk``)
serves the configured disk itself; ``drivers.blk.ram`` keeps a copy in memory.  A hot swap
(docs/hotswap.md) goes :meth:`~BlockBackend.save`, :meth:`~BlockBackend.suspend` on the old
backend and :meth:`~BlockBackend.restore` on the new one.
"""

from __future__ import annotations

import abc
import dataclasses
import errno
import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from drivers.backendkit import Host, int_option, msg_field, refuse
from drivers.blk.storage import (
    SHM_DIR,
    FileStorage,
    MemoryStorage,
    Storage,
    StorageError,
    _FdStorage,
)
from drivers.faults import Fault, Injector, RequestInfo
from drivers.host import INJECT_KINDS, RESPONSE_KINDS
from drivers.state import BackendState, DeviceState, Medium, StateError, accept
from ipc import blkif
from ipc.blkif import (
    OP_DISCARD,
    OP_FLUSH,
    OP_READ,
    OP_WRITE,
    SECTOR_SIZE,
    STATUS_ERROR,
    STATUS_OKAY,
    RequestError,
    decode_request,
)
from ipc.ring import (
    EXECUTING,
    BackRing,
    InflightLog,
    InflightRecord,
    RingError,
    inflight_bytes,
    ring_bytes,
)
from ipc.shm import Segment
from ipc.store import DevState

_MASK = (1 << 64) - 1
_RING_BYTES = ring_bytes(blkif.RING_SLOTS, blkif.SLOT_SIZE)
_INFLIGHT_BYTES = inflight_bytes(blkif.RING_SLOTS, blkif.SLOT_SIZE)
_pack_response = blkif.RESPONSE.pack

OPTIONS: dict[str, str] = {
    "max_batch": "requests taken from a ring before responses are published (1..1024, default 32)",
    "poison_after": "a request that this many driver instances in a row died executing is "
    "answered with an error instead of being redone (1..100, default 3)",
    "fault_sector": "tests only: a read, write or discard covering this sector triggers "
    "fault_kind while it executes (give both or neither)",
    "start_gate": "tests only: a file; while it exists the backend does not finish starting, "
    "so the instance never says hello (a driver stuck in its handshake)",
    "fault_kind": "tests only: the fault fault_sector triggers: exit, exception, segv, "
    "abort, hang, leak, or a bad response: bad_id, bad_status, bad_op, bad_index",
}
#: What ``fault_kind`` may name (the host's ``inject`` carries them out).
FAULT_KINDS: tuple[str, ...] = tuple(INJECT_KINDS)
_FAULT_OPS = (OP_READ, OP_WRITE, OP_DISCARD)
#: Requests one kick may serve before the device goes to the back of the queue.
_TURN_REQUESTS = 256


@dataclass
class DeviceStats:
    requests: int = 0
    errors: int = 0
    batches: int = 0
    notifications: int = 0


@dataclass
class _Device:
    key: int
    label: str  # "domain/vdev" for log messages
    store: str
    segment: Segment
    storage: Storage
    window: int
    inflight_offset: int
    mem: memoryview  # the whole segment
    region: memoryview  # the guest-visible window
    sectors: int
    state: str = "waiting"  # waiting | connected | closed | broken | lost count (a test fault)
    ring: BackRing | None = None
    inflight: InflightLog | None = None
    stats: DeviceStats = field(default_factory=DeviceStats)
    bad_logged: int = 0
    #: The device as the SDK hooks see it (home, scratch, where its data is now).
    info: DeviceState | None = None


def _int_option(
    options: dict[str, Any], name: str, default: int | None, lo: int, hi: int
) -> int | None:
    """As ``int_option``, with None (absent and no default) allowed."""
    if options.get(name, default) is None:
        return None
    return int_option(options, name, default if default is not None else lo, lo, hi)


@dataclass(frozen=True)
class _Fault:
    """A test fault: a request covering ``sector`` makes the host inject ``kind``."""

    sector: int
    kind: str


def _fault_option(options: dict[str, Any]) -> _Fault | None:
    sector = _int_option(options, "fault_sector", None, 0, (1 << 64) - 1)
    kind = options.get("fault_kind")
    if (sector is None) != (kind is None):
        raise ValueError("fault_sector and fault_kind go together: give both or neither")
    if kind is None or sector is None:
        return None
    if kind not in FAULT_KINDS:
        raise ValueError(f"fault_kind must be one of {', '.join(FAULT_KINDS)}, got {kind!r}")
    return _Fault(sector, kind)


class _StopServing(Exception):
    """An injected fault made the backend lose track of a device (``drop``)."""


def _wait_at_gate(gate: object) -> None:
    """The ``start_gate`` test option: block while that file exists."""
    if gate is None:
        return
    if not isinstance(gate, str) or not gate:
        raise ValueError(f"start_gate must be a file path, got {gate!r}")
    while os.path.exists(gate):
        time.sleep(0.05)  # a test stands in for a driver stuck before its hello


def spoil_response(kind: str, rsp: bytes) -> bytes:
    """``rsp`` made bad the way ``kind`` (bad_id, bad_status, bad_op) says."""
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


def describe_request(raw: bytes, *, window: int, sectors: int) -> tuple[int, int, str]:
    """(id, op, a one-line description) of a request as the in-flight log holds it."""
    try:
        req = decode_request(raw, window=window, sectors=sectors)
    except RequestError as e:
        return e.id, e.op, f"undecodable request id={e.id:#x} op={e.op} ({e})"
    segs = ", ".join(f"({o:#x}, {n})" for o, n in req.segments)
    return (
        req.id,
        req.op,
        (
            f"{blkif.OP_NAMES[req.op]} id={req.id:#x} sector={req.sector} "
            f"nr_sectors={req.nr_sectors} segments=[{segs}]"
        ),
    )


def open_storage(disk: dict[str, Any]) -> Storage:
    """Open the disk an ``attach`` message describes (StorageError if impossible)."""
    if not isinstance(disk, dict):
        raise StorageError(f"disk description must be a mapping, got {disk!r}")
    kind = disk.get("type")
    access = disk.get("access", "rw")
    target = disk.get("target")
    size = disk.get("size")
    if access not in ("rw", "ro"):
        raise StorageError(f"disk access {access!r} is neither 'rw' nor 'ro'")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
        raise StorageError(f"disk size {size!r} is not an integer")
    if not isinstance(target, str) or not target:
        raise StorageError(f"disk target {target!r} must be a non-empty string")
    readonly = access == "ro"
    if kind == "file":
        if not target.startswith("/"):
            raise StorageError(f"image path {target!r} is not absolute")
        return FileStorage(target, size, readonly)
    if kind == "memory":
        return MemoryStorage(target, size, readonly)
    raise StorageError(f"disk type {kind!r} is neither 'file' nor 'memory'")


def open_medium(m: Medium) -> Storage:
    """Open the disk ``m`` names (StorageError if impossible)."""
    return open_storage(m.to_wire())


def copy_medium(src: Medium, dst: Medium) -> int:
    """Copy every byte of ``src`` over ``dst`` (a memory ``dst`` is created afresh, of the
    same size); the bytes copied.  Both are locked while copying, as any open is."""
    source = open_medium(Medium(src.type, src.target, None, "ro"))
    try:
        size = source.size
        if dst.type == "memory":
            (SHM_DIR / dst.target).unlink(missing_ok=True)
        target = open_medium(Medium(dst.type, dst.target, size, "rw"))
        try:
            if target.size != size:
                raise StorageError(
                    f"cannot copy {src.target} ({size} bytes) over {dst.target} "
                    f"({target.size} bytes): the sizes differ"
                )
            assert isinstance(source, _FdStorage) and isinstance(target, _FdStorage)
            _copy_fd(source.fd, target.fd, size, f"copying {src.target} to {dst.target}")
            return size
        finally:
            target.close()
    finally:
        source.close()


_COPY_CHUNK = 4 << 20


def _copy_fd(src: int, dst: int, size: int, what: str) -> None:
    """Copy ``size`` bytes from offset 0 of ``src`` to ``dst``: in the kernel where it can
    (copy_file_range; sendfile across file systems), else through one buffer."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src, dst, size - done, done, done)
            if n <= 0:
                raise StorageError(f"{what}: unexpected end at byte {done} of {size}")
            done += n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    try:  # across file systems: sendfile still copies in the kernel
        os.lseek(dst, done, os.SEEK_SET)
        while done < size:
            n = os.sendfile(dst, src, done, size - done)
            if n <= 0:
                raise StorageError(f"{what}: unexpected end at byte {done} of {size}")
            done += n
        return
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    buf = bytearray(min(_COPY_CHUNK, size))
    view = memoryview(buf)
    while done < size:
        n = os.preadv(src, [view[: min(len(buf), size - done)]], done)
        if n <= 0:
            raise StorageError(f"{what}: unexpected end at byte {done} of {size}")
        k = 0
        while k < n:
            k += os.pwrite(dst, view[k:n], done + k)
        done += n


class BlockBackend(abc.ABC):
    """The block driver framework: rings, in-flight log, recovery, faults, save and restore.

    Subclass it and implement :meth:`open_disk` (docs/sdk.md).  ``drivers.host`` instantiates
    the class with ``(host, options)``; a subclass that takes options of its own lists them in
    ``OPTIONS`` (``{**BlockBackend.OPTIONS, "name": "help"}``) and reads ``self.options``."""

    #: Option name -> help, for the "unknown option" message.
    OPTIONS: ClassVar[dict[str, str]] = OPTIONS
    #: States of the same kind can be restored by each other's implementations.
    state_kind: ClassVar[str] = "isovisor.blk"
    #: This implementation's state layout; older states go through :meth:`upgrade_state`.
    state_version: ClassVar[int] = 1

    def __init__(self, host: Host, options: dict[str, Any]) -> None:
        allowed_options = type(self).OPTIONS
        unknown = sorted(set(options) - set(allowed_options))
        if unknown:
            allowed = "; ".join(f"{k}: {v}" for k, v in allowed_options.items())
            raise ValueError(
                f"unknown block backend option(s) {', '.join(unknown)}; allowed: {allowed}"
            )
        self.options = dict(options)
        #: "module:Class" (the host says how it loaded us; else our own names).
        self.implementation: str = (
            getattr(host, "implementation", None)
            or f"{type(self).__module__}:{type(self).__qualname__}"
        )
        #: Devices restored (restore_device done) and not attached yet, by key.
        self._restored: dict[int, DeviceState] = {}
        _wait_at_gate(options.get("start_gate"))
        mb = _int_option(options, "max_batch", 32, 1, 1024)
        poison_after = _int_option(options, "poison_after", 3, 1, 100)
        assert mb is not None and poison_after is not None
        self.fault = _fault_option(options)
        self.host = host
        self.log = host.log
        self.max_batch = mb
        self.poison_after = poison_after
        self.devices: dict[int, _Device] = {}
        #: Carries out one request (the faulty variant only when a test asks for it, so the
        #: data path pays nothing for the feature).
        self.perform: Callable[[_Device, bytes], bytes] = (
            self._perform if self.fault is None else self._perform_with_fault
        )
        #: A bad response to give in the next batch (:meth:`corrupt_next`), or None.
        self._spoil: str | None = None
        #: Faults armed by the supervisor (drivers/faults.py; ``perform`` asks it only while
        #: one is armed).
        self.injector = Injector()
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
        if saved.medium.same_place(saved.home):
            return saved
        n = copy_medium(saved.medium, saved.home)
        self.log.info(
            "device %d (%s): %d bytes moved from %s %s to its disk %s",
            saved.key,
            saved.label,
            n,
            saved.medium.type,
            saved.medium.target,
            saved.home.target,
        )
        return dataclasses.replace(saved, medium=saved.home)

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
            if d.info is None or not d.info.scratch:
                continue
            scratch = Medium("memory", d.info.scratch)
            if not self.medium_of(d.info, d.storage).same_place(scratch):
                path = SHM_DIR / d.info.scratch
                if path.exists():
                    path.unlink(missing_ok=True)
                    self.log.info(
                        "device %d (%s): the memory copy %s of the previous implementation removed",
                        d.key,
                        d.label,
                        d.info.scratch,
                    )

    def statistics(self) -> dict[str, int | float | str]:
        """Counters for `isovisor driver stats` (numbers or short strings)."""
        out: dict[str, int | float | str] = {"devices": len(self.devices)}
        for f in dataclasses.fields(DeviceStats):
            out[f.name] = sum(getattr(d.stats, f.name) for d in self.devices.values())
        return out

    @classmethod
    def upgrade_state(cls, state: BackendState) -> BackendState:
        """Turn a state of an older ``state_version`` into this one (override when the
        layout changes; see docs/sdk.md).  The default refuses."""
        raise StateError(
            f"{cls.__name__} (state version {cls.state_version}) has no "
            f"upgrade_state hook for version {state.version} states"
        )

    # -- save, suspend, restore (a hot swap) -------------------------------------------------
    def save(self) -> BackendState:
        """The state of every device (attached, or restored and not attached yet)."""
        devices = dict(self._restored)
        for d in self.devices.values():
            if d.info is not None:
                devices[d.key] = dataclasses.replace(
                    d.info,
                    medium=self.medium_of(d.info, d.storage),
                    data=self.save_device(d.info, d.storage),
                )
        return BackendState(
            self.state_kind,
            self.state_version,
            self.implementation,
            tuple(devices[k] for k in sorted(devices)),
        )

    def suspend(self) -> None:
        """Stop serving and let go of every device (for the next implementation): nothing is
        in flight between two messages, so the rings keep what the guests queue meanwhile."""
        for key in list(self.devices):
            d = self.devices.pop(key)
            self._close(d, handover=True)
        self.log.info("suspended: every device released for the next implementation")

    def restore(self, state: BackendState) -> None:
        """Take over from ``state`` (StateError if it cannot): checked and upgraded, then
        :meth:`restore_device` for each device before the kernel attaches them again."""
        state = accept(
            state,
            kind=self.state_kind,
            version=self.state_version,
            who=self.implementation,
            upgrade=type(self).upgrade_state,
        )
        restored = {d.key: self.restore_device(d) for d in state.devices}
        self._restored.update(restored)
        self.log.info(
            "restored %d device(s) from the state of %s (version %d)",
            len(restored),
            state.implementation,
            state.version,
        )

    # -- messages ------------------------------------------------------------------------------
    def attach(self, dev: dict[str, Any]) -> None:
        key = dev.get("key")
        store = dev.get("store")
        if isinstance(key, int) and key in self.devices:
            self.log.warning("device %d attached again: dropping the old attachment", key)
            self.detach(key)
        try:
            key = msg_field(dev, "key", int)
            store = msg_field(dev, "store", str).rstrip("/")
            label = f"{dev.get('domain', '?')}/{dev.get('vdev', '?')}"
            seg_name = msg_field(dev, "segment", str)
            window = msg_field(dev, "window", int)
            inflight_offset = msg_field(dev, "inflight_offset", int)
            disk = msg_field(dev, "disk", dict)
            scratch = dev.get("scratch", "")
            if not isinstance(scratch, str):
                raise ValueError(f"attach field 'scratch' is {scratch!r}, expected str")
        except ValueError as e:
            self._refuse(key, store, str(e))
            return
        try:
            segment = Segment(seg_name, 0, create=False)
        except Exception as e:
            self._refuse(key, store, f"cannot map device segment {seg_name}: {e}")
            return
        problem = None
        if not blkif.DATA_OFFSET < window <= segment.size:
            problem = (
                f"window {window:#x} does not fit segment {seg_name} of {segment.size:#x} "
                f"bytes above the data offset {blkif.DATA_OFFSET:#x}"
            )
        elif inflight_offset < window or inflight_offset + _INFLIGHT_BYTES > segment.size:
            problem = (
                f"in-flight log at {inflight_offset:#x} ({_INFLIGHT_BYTES} bytes) must "
                f"lie after the window {window:#x} inside segment {seg_name} of "
                f"{segment.size:#x} bytes"
            )
        storage: Storage | None = None
        info: DeviceState | None = None
        if problem is None:
            try:
                info = self._device_state(key, label, disk, scratch)
                storage = self.open_disk(info)
            except (StorageError, StateError) as e:
                problem = str(e)
            except OSError as e:  # anything open_disk did not foresee
                problem = f"cannot open the disk: {e}"
        if problem is not None or storage is None:
            segment.close()
            self._refuse(key, store, problem or "no storage")
            return
        mem = memoryview(segment.buf)
        d = _Device(
            key=key,
            label=label,
            store=store,
            segment=segment,
            storage=storage,
            window=window,
            inflight_offset=inflight_offset,
            mem=mem,
            region=mem[:window],
            sectors=storage.sectors,
            info=info,
        )
        self.devices[key] = d
        try:
            w = self.host.store_write
            w(f"{store}/sectors", str(d.sectors))
            w(f"{store}/sector-size", str(SECTOR_SIZE))
            w(f"{store}/info", "1" if storage.readonly else "0")
            w(f"{store}/feature-flush-cache", "1")
            w(f"{store}/feature-discard", "1")
            w(f"{store}/state", str(int(DevState.INIT_WAIT)))
        except ValueError as e:
            self._close(d)
            del self.devices[key]
            self._refuse(key, None, f"cannot publish the disk parameters: {e}")
            return
        self.log.info(
            "device %d (%s): %r, %d sectors, waiting for the frontend",
            key,
            label,
            storage,
            d.sectors,
        )

    def _device_state(
        self, key: int, label: str, disk: dict[str, Any], scratch: str
    ) -> DeviceState:
        """The device an attach names, with its data where a restore left it (if any)."""
        home = Medium.from_wire(disk, "the attach message's disk")
        restored = self._restored.pop(key, None)
        if restored is None:
            return DeviceState(key, label, home, scratch, home)
        return dataclasses.replace(restored, label=label, home=home, scratch=scratch)

    def _refuse(self, key: object, store: object, message: str) -> None:
        """The device cannot be served: say so in the store (if we can) and to the kernel."""
        refuse(self.host, self.log, "device", key, store, message)

    def detach(self, key: int) -> None:
        d = self.devices.pop(key, None)
        if d is None:
            self.log.warning("detach of unknown device %d", key)
            return
        s = d.stats
        self.log.info(
            "device %d (%s) detached: %d requests, %d errors, %d batches, %d notifications",
            key,
            d.label,
            s.requests,
            s.errors,
            s.batches,
            s.notifications,
        )
        self._close(d)

    def fe_state(self, key: int, state: int) -> None:
        d = self.devices.get(key)
        if d is None:
            self.log.warning("frontend state %d for unknown device %d", state, key)
            return
        if d.state == "broken":
            return
        if state == DevState.INITIALISED:
            self._connect(d, resume=False)
        elif state == DevState.CONNECTED and d.state == "waiting":
            # A restarted driver learns the frontend is already connected: resume the ring,
            # redoing whatever the in-flight log says was unfinished.
            self._connect(d, resume=True)
        elif state in (DevState.CLOSING, DevState.CLOSED) and d.state != "closed":
            d.state = "closed"
            d.ring = None
            d.inflight = None
            self.host.store_write(f"{d.store}/state", str(int(DevState.CLOSED)))
            self.log.info("device %d (%s): frontend closed", key, d.label)

    def kick(self, key: int) -> None:
        d = self.devices.get(key)
        if d is None:
            self.log.debug("kick for unknown device %d", key)
            return
        if d.state == "connected":
            self._service(d)

    def close(self) -> None:
        for key in list(self.devices):
            self.detach(key)
        self._restored.clear()

    def stats(self) -> dict[int, DeviceStats]:
        return {k: d.stats for k, d in self.devices.items()}

    # -- connection ----------------------------------------------------------------------------
    def _connect(self, d: _Device, *, resume: bool) -> None:
        n, size = blkif.RING_SLOTS, blkif.SLOT_SIZE
        try:
            ring = BackRing(d.mem[:_RING_BYTES], n, size)
            log = InflightLog(
                d.mem[d.inflight_offset : d.inflight_offset + _INFLIGHT_BYTES], n, size
            )
        except (ValueError, RingError) as e:
            self._break(d, f"cannot attach the ring: {e}")
            return
        redo = self._recover(d, ring, log) if resume else self._forget(log)
        d.ring, d.inflight = ring, log
        d.state = "connected"
        self.host.store_write(f"{d.store}/state", str(int(DevState.CONNECTED)))
        self.log.info(
            "device %d (%s): %s%s",
            d.key,
            d.label,
            "resumed" if resume else "connected",
            f", redoing {len(redo)} unfinished requests" if redo else "",
        )
        if resume:
            # A backend bug while redoing escapes (the host exits): the record stays flagged
            # executing, so the next instance counts a death for it.
            replayed, done_ns = self._redo(d, ring, log, redo) if redo else (0, time.monotonic_ns())
            self.host.recovered(d.key, replayed, done_ns)
        self._service(d)

    def _forget(self, log: InflightLog) -> list[InflightRecord]:
        """A freshly initialised ring has nothing outstanding: clear stale records."""
        for rec in log.pending():
            log.end(rec.index)
        return []

    def _recover(self, d: _Device, ring: BackRing, log: InflightLog) -> list[InflightRecord]:
        """Keep the records of requests begun but not answered: a contiguous run from the
        published rsp_prod.  Others (answered, or not in that run) are cleared.  Returns the
        run in ring order, with a death counted for a record found executing;
        ``ring.req_cons`` is moved past it."""
        start = ring.rsp_prod_pvt
        by_index = {rec.index: rec for rec in log.pending()}
        run: list[InflightRecord] = []
        while len(run) < ring.nr_slots and ((start + len(run)) & _MASK) in by_index:
            run.append(by_index.pop((start + len(run)) & _MASK))
        for index in by_index:
            log.end(index)
        ring.req_cons = (start + len(run)) & _MASK
        return [self._count_death(d, log, rec) for rec in run]

    def _count_death(self, d: _Device, log: InflightLog, rec: InflightRecord) -> InflightRecord:
        if not rec.executing:
            return rec
        deaths = log.record_death(rec.index)
        self.log.warning(
            "device %d (%s): the request at ring index %d was executing when the "
            "previous driver instance died (%d death%s of %d allowed)",
            d.key,
            d.label,
            rec.index,
            deaths,
            "" if deaths == 1 else "s",
            self.poison_after,
        )
        return dataclasses.replace(rec, executing=False, deaths=deaths)

    def _redo(
        self, d: _Device, ring: BackRing, log: InflightLog, recs: list[InflightRecord]
    ) -> tuple[int, int]:
        """Answer ``recs`` in ring order: redo each, or refuse it if it is poison.  Returns
        (requests redone, CLOCK_MONOTONIC ns when their responses were published)."""
        replayed = 0
        for rec in recs:
            if rec.deaths >= self.poison_after:
                ring.put_response(self._poison(d, rec))
                continue
            log.mark_executing(rec.index)
            rsp = self.perform(d, rec.request)
            log.clear_executing(rec.index)
            ring.put_response(rsp)
            replayed += 1
        d.stats.requests += len(recs)
        notify = ring.push_responses()
        done_ns = time.monotonic_ns()
        if notify:
            self._notify(d)
        for rec in recs:
            log.end(rec.index)
        return replayed, done_ns

    def _poison(self, d: _Device, rec: InflightRecord) -> bytes:
        """Refuse a request that killed ``poison_after`` instances: log it, report it, and
        return its STATUS_ERROR response."""
        rid, op, what = describe_request(rec.request, window=d.window, sectors=d.sectors)
        description = (
            f"{what}: {rec.deaths} driver instances died executing it; answered "
            "with an error instead of being redone"
        )
        self.log.error(
            "device %d (%s): poison request at ring index %d: %s",
            d.key,
            d.label,
            rec.index,
            description,
        )
        d.stats.errors += 1
        self.host.poison(d.key, rec.index, description)
        return _pack_response(rid, op, 0, STATUS_ERROR, 0)

    def _break(self, d: _Device, message: str) -> None:
        d.state = "broken"
        d.ring = None
        d.inflight = None
        d.stats.errors += 1
        self.host.fault(d.key, message)

    def _notify(self, d: _Device) -> None:
        d.stats.notifications += 1
        self.host.notify(d.key)

    def _close(self, d: _Device, *, handover: bool = False) -> None:
        d.state = "closed"
        d.ring = None
        d.inflight = None
        d.region.release()
        d.mem.release()
        try:
            d.segment.close()
        except BufferError:
            gc.collect()  # a view may sit in a reference cycle
            try:
                d.segment.close()
            except BufferError:
                self.log.error(
                    "device %d: segment %s is still referenced; it stays mapped "
                    "until those references go",
                    d.key,
                    d.segment.name,
                )
        try:
            if d.info is None:
                d.storage.close()
            else:
                self.release_disk(d.info, d.storage, handover=handover)
        except (OSError, StorageError) as e:
            self.log.error("device %d: closing the disk: %s", d.key, e)

    # -- the data path -------------------------------------------------------------------------
    def _service(self, d: _Device) -> None:
        """Serve the ring.  A guest's ring violation breaks the device (``fault``); any other
        exception is a backend bug and escapes, with the request flagged executing."""
        try:
            self._service_ring(d)
        except RingError as e:
            self._break(d, str(e))
        except _StopServing as e:
            d.state = "lost count"
            if d.inflight is not None:  # not a death: nothing died executing these
                for rec in d.inflight.pending():
                    d.inflight.clear_executing(rec.index)
            self.log.warning(
                "device %d (%s): %s; the device is no longer served", d.key, d.label, e
            )

    def _service_ring(self, d: _Device) -> None:
        ring = d.ring
        log = d.inflight
        assert ring is not None and log is not None
        get, put, begin, end = ring.get_request, ring.put_response, log.begin, log.end
        words, state_words, nr_slots = log.words, log.state_words, log.nr_slots
        perform = self.perform
        stats = d.stats
        max_batch = self.max_batch
        budget = _TURN_REQUESTS
        while True:
            n = ring.unconsumed_requests()
            if n:
                if n > max_batch:
                    n = max_batch
                first = ring.req_cons
                for i in range(n):
                    raw = get()
                    index = (first + i) & _MASK
                    begin(index, raw)
                    # mark_executing / clear_executing of a fresh record, inlined: two stores
                    w = state_words[index % nr_slots]
                    words[w] = EXECUTING
                    rsp = perform(d, raw)
                    words[w] = 0
                    put(rsp)
                stats.requests += n
                stats.batches += 1
                if self._spoil is not None:
                    self._spoil_batch(d, ring, n)
                if ring.push_responses():
                    stats.notifications += 1
                    self.host.notify(d.key)
                for i in range(n):
                    end((first + i) & _MASK)
                if self._spoil == "bad_index":
                    self._publish_bad_index(d, ring)
                    return
                budget -= n
                if budget <= 0:
                    self.host.kick_again(d.key)  # let the other devices have a turn
                    return
            if not ring.final_check_for_requests():
                return

    # -- fault injection (drivers/faults.py) -------------------------------------------------
    def set_faults(self, specs: list[dict[str, Any]]) -> None:
        """``["faults", specs]``: arm these faults (ValueError if one is bad)."""
        self.injector.load(specs)
        self._choose_perform()

    def _base_perform(self, d: _Device, raw: bytes) -> bytes:
        return self._perform(d, raw) if self.fault is None else self._perform_with_fault(d, raw)

    def _choose_perform(self) -> None:
        self.perform = (
            self._perform_injecting
            if self.injector.armed
            else (self._perform if self.fault is None else self._perform_with_fault)
        )

    def _perform_injecting(self, d: _Device, raw: bytes) -> bytes:
        """``perform`` while a fault is armed: ask the injector about this request."""
        try:
            req = decode_request(raw, window=d.window, sectors=d.sectors)
        except RequestError:
            return self._base_perform(d, raw)
        domain, _, vdev = d.label.partition("/")
        f = self.injector.pick(
            RequestInfo(domain, vdev, blkif.OP_NAMES.get(req.op, "?"), req.sector, req.nr_sectors)
        )
        if f is None:
            return self._base_perform(d, raw)
        if not self.injector.armed:
            self._choose_perform()  # from the next turn on: no more questions
        self.host.fault_fired(f.id, f.type, d.label)
        return self._carry_out(f, d, req, raw)

    def _carry_out(self, f: Fault, d: _Device, req: Any, raw: bytes) -> bytes:
        kind = f.type
        if kind in ("segv", "abort", "exit", "hang", "exception", "poison"):
            self.host.inject("segv" if kind == "poison" else kind, really=f.really)
        elif kind == "slow":
            time.sleep(self.injector.delay_s(f))
        elif kind == "drop":
            raise _StopServing(f"fault {f.id}: drop (request {req.id:#x} is never answered)")
        elif kind in ("bad_id", "bad_status", "bad_op"):
            return spoil_response(kind, self._base_perform(d, raw))
        elif kind in ("duplicate", "bad_index"):
            self._spoil = kind
        elif kind == "leak_mem":
            self.host.inject("leak")
        elif kind == "leak_fd":
            self.host.leak_fds(256)
        rsp = self._base_perform(d, raw)
        if (
            kind == "corrupt_data"
            and req.op == OP_READ
            and req.segments
            and blkif.RESPONSE.unpack_from(rsp)[3] == STATUS_OKAY
        ):
            offset = req.segments[0][0]
            d.region[offset] ^= 0xFF  # one wrong byte in a successful read
        return rsp

    # -- bad responses on request (fault injection) ------------------------------------------
    def corrupt_next(self, kind: str) -> None:
        """Give one bad response of ``kind`` (:data:`RESPONSE_KINDS`) in the next batch."""
        if kind not in RESPONSE_KINDS:
            raise ValueError(
                f"unknown response fault {kind!r}; choose one of {', '.join(RESPONSE_KINDS)}"
            )
        self._spoil = kind

    def _spoil_batch(self, d: _Device, ring: BackRing, n: int) -> None:
        """Spoil the last response of the batch before it is published."""
        kind = self._spoil
        if kind == "bad_index":
            return  # done once the batch is published: _publish_bad_index
        if kind == "duplicate":
            if n < 2:
                return  # needs a batch of two: the copy of one replaces the next
            self._spoil = None
            last = (ring.rsp_prod_pvt - 1) & _MASK
            ring.rewrite_response(last, ring.response_at((last - 1) & _MASK))
            self.log.warning(
                "device %d (%s): fault injected: duplicate, the response at ring "
                "index %d published again at %d",
                d.key,
                d.label,
                (last - 1) & _MASK,
                last,
            )
            return
        self._spoil = None
        index = (ring.rsp_prod_pvt - 1) & _MASK
        ring.rewrite_response(index, spoil_response(kind or "", ring.response_at(index)))
        self.log.warning(
            "device %d (%s): fault injected: %s at ring index %d (%s)",
            d.key,
            d.label,
            kind,
            index,
            RESPONSE_KINDS[kind or ""],
        )

    def _publish_bad_index(self, d: _Device, ring: BackRing) -> None:
        """Publish a bogus rsp_prod and stop serving the device, as a backend that lost count
        would (its next push would otherwise hide the bogus index before the guest looks)."""
        self._spoil = None
        bogus = ring.publish_rsp_prod_beyond(3)
        d.state = "lost count"
        self.log.warning(
            "device %d (%s): fault injected: bad_index, rsp_prod %d published "
            "and the device no longer served (%s)",
            d.key,
            d.label,
            bogus,
            RESPONSE_KINDS["bad_index"],
        )
        self._notify(d)

    def _perform(self, d: _Device, raw: bytes) -> bytes:
        """Carry out one request; returns its response."""
        try:
            req = decode_request(raw, window=d.window, sectors=d.sectors)
        except RequestError as e:
            self._bad(d, e.status, str(e), e.id)
            return _pack_response(e.id, e.op, 0, e.status, 0)
        op = req.op
        try:
            if op == OP_READ:
                region = d.region
                d.storage.readv_into(
                    req.sector * SECTOR_SIZE, [region[o : o + n] for o, n in req.segments]
                )
            elif op == OP_WRITE:
                if d.storage.readonly:
                    self._bad(d, STATUS_ERROR, "write to read-only disk", req.id)
                    return _pack_response(req.id, op, 0, STATUS_ERROR, 0)
                region = d.region
                d.storage.writev_from(
                    req.sector * SECTOR_SIZE, [region[o : o + n] for o, n in req.segments]
                )
            elif op == OP_FLUSH:
                d.storage.flush()
            elif op == OP_DISCARD:
                if d.storage.readonly:
                    self._bad(d, STATUS_ERROR, "discard on read-only disk", req.id)
                    return _pack_response(req.id, op, 0, STATUS_ERROR, 0)
                d.storage.discard(req.sector * SECTOR_SIZE, req.nr_sectors * SECTOR_SIZE)
        except (OSError, StorageError) as e:
            self._bad(
                d,
                STATUS_ERROR,
                f"{blkif.OP_NAMES[op]} of sector {req.sector}: I/O error: {e}",
                req.id,
            )
            return _pack_response(req.id, op, 0, STATUS_ERROR, 0)
        return _pack_response(req.id, op, 0, STATUS_OKAY, 0)

    def _perform_with_fault(self, d: _Device, raw: bytes) -> bytes:
        """``_perform``, but a request covering ``fault_sector`` first injects ``fault_kind``
        (tests only: this is how they make a poison request)."""
        fault = self.fault
        assert fault is not None
        try:
            req = decode_request(raw, window=d.window, sectors=d.sectors)
        except RequestError:
            return self._perform(d, raw)
        if req.op in _FAULT_OPS and req.sector <= fault.sector < req.sector + req.nr_sectors:
            self.log.warning(
                "device %d (%s): request %#x covers fault_sector %d: injecting %s",
                d.key,
                d.label,
                req.id,
                fault.sector,
                fault.kind,
            )
            if fault.kind == "bad_index":
                self._spoil = fault.kind
            elif fault.kind in RESPONSE_KINDS:
                return spoil_response(fault.kind, self._perform(d, raw))
            else:
                self.host.inject(fault.kind)
        return self._perform(d, raw)

    def _bad(self, d: _Device, status: int, message: str, req_id: int) -> None:
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


class Backend(BlockBackend):
    """``drivers.blk``: serves each device's configured disk (an image file, or the kernel's
    memory disk) directly; a device taken over from an implementation that kept its data
    elsewhere is first copied home (:meth:`BlockBackend.restore_device`)."""

    def open_disk(self, dev: DeviceState) -> Storage:
        return open_medium(dev.medium)
