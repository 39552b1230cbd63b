"""The backend base of a request/response device class: everything but the class's own work.

A class whose region starts with a request ring and keeps an in-flight log after its window
(``devices.base.WhileFailed.ANSWER_ERRORS``; ``rng`` is the first built on this base) writes a
subclass of :class:`DeviceBackend` that names its class and fills three hooks (Firecracker's
virtio device trait is the model: a small list of methods a device writes, the shared logic in
methods that call them):

* :meth:`DeviceBackend.perform`: carry out one request copied out of the ring, return its
  response (the guest's bad request gets an error response, never an exception);
* :meth:`DeviceBackend.request_info`: what fault filters look at (domain, device, op, position);
* :meth:`DeviceBackend.spoil`: a response made bad the way a ``bad_id``/``bad_status`` fault
  says (the class knows its response layout).

And, optionally: ``open_device``/``close_device`` (per-device resources and attach checks; a
class that needs more per device than :class:`Device` has names its subclass in
``device_type``), ``describe`` (a request in one line), ``corrupt_data`` (a ``corrupt_data``
fault), what a device carries across a hot swap (``device_data``/``restore_data``, and for a
class whose data lives in a medium ``device_media``/``restore_device``; ``carry_counters``),
``STATISTICS``/``DEVICE_STATISTICS`` (the counters reported), ``OPTIONS`` and
:meth:`DeviceBackend.configure` (the backend's own options).

What the base does for every such class, with no code of the class's own:

* **attach/detach**: the attach message checked field by field into an :class:`Attach`; the
  region's geometry checked against the class's; a device that cannot be served is refused in
  its store directory and to the kernel;
* **the frontend-state machine** (:class:`Lifecycle`), Xen's handshake: InitWait on attach,
  Connected on the frontend's Initialised; a new instance finding the frontend Connected
  *resumes*;
* **recovery**: on resume, the in-flight log's records from the published ``rsp_prod`` are
  redone in ring order (a request a predecessor died executing counts a death, and after
  ``poison_after`` deaths is answered with an error instead: a poison request); the kernel is
  told ``recovered``;
* **the data path**: batches of requests, each begun in the in-flight log and flagged executing
  around :meth:`perform`, responses pushed with notification hold-off, a turn budget so one
  device does not starve the others;
* **faults** (``drivers/faults.py``): the in-driver types the class's fault class takes, carried
  out around :meth:`perform` (dying kinds, slow, drop, bad responses, duplicate, bad_index,
  corrupt_data, leaks; what the host does itself, it is asked to: ``host.carry_out``);
* **statistics** per device and in total; **save/suspend/restore** through the versioned
  :class:`~drivers.state.BackendState` contract (hot swap), with the class's ``state_kind``.
"""

from __future__ import annotations

import dataclasses
import enum
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Final, Generic, TypeVar, cast

from devices.base import DeviceClass
from drivers.backendkit import Host, int_option, msg_field, refuse
from drivers.faults import Fault, Injector, RequestInfo, fault_classes
from drivers.state import BackendState, DeviceState, Medium, StateError, accept
from ipc.ring import EXECUTING, BackRing, InflightLog, InflightRecord, RingError
from ipc.ring import inflight_bytes as _inflight_bytes
from ipc.ring import ring_bytes as _ring_bytes
from ipc.shm import Segment, SegmentError
from ipc.store import DevState

_MASK: Final = (1 << 64) - 1
#: Requests served for one device before the others get a turn.
TURN_REQUESTS: Final = 256
_DYING: Final = ("segv", "abort", "exit", "hang", "exception", "poison")

OPTIONS: Final[dict[str, str]] = {
    "max_batch": "requests taken from a ring before responses are published (1..1024, default 32)",
    "poison_after": "a request that this many driver instances in a row died executing is "
    "answered with an error instead of being redone (1..100, default 3)",
}


class Lifecycle(enum.Enum):
    """Where a device stands in this backend."""

    #: Attached; waiting for the frontend (InitWait published).
    WAITING = "waiting"
    #: Serving its ring.
    CONNECTED = "connected"
    #: The frontend closed it.
    CLOSED = "closed"
    #: The guest broke the ring protocol: reported, no longer served.
    BROKEN = "broken"
    #: A fault stopped serving it on purpose (``drop``, ``bad_index``).
    STOPPED = "stopped"


@dataclass(frozen=True)
class Attach:
    """An ``attach`` message, checked: the fields every class's devices have."""

    key: int
    domid: int
    domain: str
    vdev: str
    devid: int
    segment: str
    window: int
    inflight_offset: int
    store: str
    scratch: str
    #: The device class named by the message (None: not named, as by an older kernel).
    cls: str | None
    #: The whole message, for the class's own fields.
    body: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.domain}/{self.vdev}"

    @classmethod
    def from_message(cls, dev: dict[str, Any]) -> Attach:
        """ValueError naming the first missing or mistyped field."""
        scratch = dev.get("scratch", "")
        if not isinstance(scratch, str):
            raise ValueError(f"attach field 'scratch' is {scratch!r:.60}, expected str")
        return cls(
            msg_field(dev, "key", int),
            msg_field(dev, "domid", int),
            msg_field(dev, "domain", str),
            msg_field(dev, "vdev", str),
            msg_field(dev, "devid", int),
            msg_field(dev, "segment", str),
            msg_field(dev, "window", int),
            msg_field(dev, "inflight_offset", int),
            msg_field(dev, "store", str).rstrip("/"),
            scratch,
            msg_field(dev, "class", str) if "class" in dev else None,
            dev,
        )


@dataclass
class DeviceStats:
    """One device's counters (:meth:`DeviceBackend.statistics` sums them)."""

    requests: int = 0
    errors: int = 0
    batches: int = 0
    notifications: int = 0
    replayed: int = 0
    poisoned: int = 0
    peak_batch: int = 0


@dataclass(eq=False)
class Device:
    """A device this backend serves."""

    attach: Attach
    segment: Segment
    mem: memoryview
    #: The guest's window: what requests may point into.
    region: memoryview
    state: Lifecycle = Lifecycle.WAITING
    ring: BackRing | None = None
    inflight: InflightLog | None = None
    stats: DeviceStats = field(default_factory=DeviceStats)
    #: The ring index of the request being performed (stable across instances: a fault's
    #: position filter, and so a poison request, names it).
    current: int = 0
    #: The class's own per-device object (``open_device``).
    extra: Any = None
    #: What a hot swap carried for this device (:meth:`DeviceBackend.restore_device`), for
    #: ``open_device``; None on a first attach and after a crash.
    saved: DeviceState | None = None

    @property
    def key(self) -> int:
        return self.attach.key

    @property
    def label(self) -> str:
        return self.attach.label


class StopServing(Exception):
    """A fault stops serving a device on purpose (not a crash: no death is counted)."""


D = TypeVar("D", bound=Device)


class DeviceBackend(Generic[D]):
    """The base (module docstring).  A subclass sets :attr:`device_class` and
    :attr:`state_kind` and writes :meth:`perform`, :meth:`request_info` and :meth:`spoil`."""

    #: The class served (devices/): its region's geometry, its fault class.
    device_class: ClassVar[DeviceClass]
    #: What a device is in this backend: :class:`Device`, or the class's subclass of it (``D``).
    device_type: ClassVar[type[Device]] = Device
    #: States of the same kind can be restored by each other's implementations.
    state_kind: ClassVar[str]
    state_version: ClassVar[int] = 1
    #: Does a device's saved state carry its counters (``data`` is then ``{"stats": ...,
    #: "class": device_data}``)?  If not, they restart with each instance and ``data`` is
    #: :meth:`device_data` itself.
    carry_counters: ClassVar[bool] = True
    #: Option name -> help, for the "unknown option" message (extend, don't replace).
    OPTIONS: ClassVar[dict[str, str]] = OPTIONS
    #: The counters (:class:`DeviceStats` fields) :meth:`statistics` reports in total ...
    STATISTICS: ClassVar[tuple[str, ...]] = tuple(f.name for f in fields(DeviceStats))
    #: ... and per device, as ``<domain>/<vdev>.<counter>``.
    DEVICE_STATISTICS: ClassVar[tuple[str, ...]] = ("requests", "errors")

    def __init__(self, host: Host, options: dict[str, Any]) -> None:
        if not isinstance(options, dict):
            raise TypeError(f"backend options must be a mapping, got {type(options).__name__}")
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            allowed = "; ".join(f"{k}: {v}" for k, v in self.OPTIONS.items())
            raise ValueError(
                f"unknown {fault_classes()[self.device_class.name].driver} backend option(s) "
                f"{', '.join(unknown)}; allowed: {allowed}"
            )
        self.host = host
        self.log = host.log
        self.options = dict(options)
        self.implementation: str = (
            getattr(host, "implementation", None)
            or f"{type(self).__module__}:{type(self).__qualname__}"
        )
        self.max_batch = int_option(options, "max_batch", 32, 1, 1024)
        self.poison_after = int_option(options, "poison_after", 3, 1, 100)
        self.devices: dict[int, D] = {}
        #: Per-device data restored (hot swap) and not attached yet, by key.
        self._restored: dict[int, DeviceState] = {}
        self.injector = Injector(fclass=fault_classes()[self.device_class.name])
        #: A response fault to carry out on the batch being served (duplicate, bad_index).
        self._spoil: str | None = None
        #: ``perform`` itself, or its injecting wrapper while a fault is armed (the data path
        #: pays nothing for the feature otherwise).
        self._perform: Callable[[D, bytes], bytes] = self.perform
        r = self.device_class.region
        self._ring_bytes = _ring_bytes(r.ring_slots, r.slot_size)
        self._inflight_bytes = _inflight_bytes(r.ring_slots, r.slot_size)
        self.configure(options)

    # -- what a class writes -------------------------------------------------------------------
    def configure(self, options: dict[str, Any]) -> None:
        """Read the class's own options (listed in ``OPTIONS``); ValueError if one is bad."""

    def open_device(self, d: D) -> None:
        """Set up ``d.extra`` (or the fields of ``device_type``) and check the class's attach
        fields (``d.attach.body``; ``d.saved``: what a hot swap carried); ValueError refuses
        the device with its message."""

    def close_device(self, d: D, *, handover: bool) -> None:
        """Release what :meth:`open_device` set up.  ``handover``: the next implementation of
        a hot swap takes the device over from the state just saved; else it goes for good."""

    def perform(self, d: D, raw: bytes) -> bytes:
        """Carry out one request (``raw``: its slot, copied) and return its response."""
        raise NotImplementedError

    def request_info(self, d: D, raw: bytes) -> RequestInfo | None:
        """What fault filters look at, or None for a request they never match
        (``d.current`` is the request's ring index)."""
        raise NotImplementedError

    def spoil(self, kind: str, rsp: bytes) -> bytes:
        """``rsp`` made bad as ``kind`` (``bad_id``, ``bad_status``, ...) says."""
        raise NotImplementedError

    def corrupt_data(self, d: D, raw: bytes, rsp: bytes) -> None:
        """A ``corrupt_data`` fault: one byte wrong in what request ``raw`` (answered with
        ``rsp``) delivered to the guest.  Only for a class whose fault class takes it."""
        raise NotImplementedError(f"{type(self).__name__} cannot corrupt data")

    def describe(self, d: D, raw: bytes) -> str:
        """A request in one line, for logs and the poison report."""
        return f"request {raw[:16].hex()}"

    def device_data(self, d: D) -> dict[str, Any]:
        """What ``d`` carries to the next implementation (msgpack-able)."""
        return {}

    def restore_data(self, d: D, data: dict[str, Any]) -> None:
        """Take over what :meth:`device_data` saved (StateError if it is malformed)."""

    def device_media(self, d: D) -> tuple[Medium, Medium]:
        """(``home``, ``medium``) of ``d``'s saved state: where its data belongs and where it
        is now.  The default, for a class with no medium: the device's memory name, twice."""
        here = Medium("memory", d.attach.scratch or d.attach.segment)
        return here, here

    def restore_device(self, saved: DeviceState) -> DeviceState:
        """Take a device over from the state a hot swap restores (before the kernel attaches
        it again: then ``d.saved``); return it as it is now (a class with a medium may move
        the data).  The default takes it as it is."""
        return saved

    # -- messages ------------------------------------------------------------------------------
    def attach(self, dev: dict[str, Any]) -> None:
        key, store = dev.get("key"), dev.get("store")
        if isinstance(key, int) and key in self.devices:
            self.log.warning("device %d attached again: dropping the old attachment", key)
            self.detach(key)
        try:
            a = Attach.from_message(dev)
        except ValueError as e:
            self._refuse(key, store, str(e))
            return
        if a.cls is not None and a.cls != self.device_class.name:
            self._refuse(
                a.key,
                a.store,
                f"attach field 'class' is {a.cls!r}: this driver "
                f"serves {self.device_class.name!r} devices only",
            )
            return
        try:
            segment = Segment(a.segment, 0, create=False)
        except (SegmentError, OSError, ValueError) as e:
            self._refuse(a.key, a.store, f"cannot map device segment {a.segment}: {e}")
            return
        r = self.device_class.region
        problem = None
        if not self._ring_bytes <= a.window <= segment.size or a.window != r.window:
            problem = (
                f"window {a.window:#x} is not the {self.device_class.noun}'s "
                f"{r.window:#x} bytes inside segment {a.segment} of {segment.size:#x}"
            )
        elif (
            a.inflight_offset < a.window or a.inflight_offset + self._inflight_bytes > segment.size
        ):
            problem = (
                f"in-flight log at {a.inflight_offset:#x} ({self._inflight_bytes} "
                f"bytes) must lie after the window {a.window:#x} inside segment "
                f"{a.segment} of {segment.size:#x} bytes"
            )
        if problem is not None:
            segment.close()
            self._refuse(a.key, a.store, problem)
            return
        mem = memoryview(segment.buf)
        d = cast(D, self.device_type(a, segment, mem, mem[: a.window]))
        d.saved = self._restored.get(a.key)
        try:
            self.open_device(d)
        except ValueError as e:
            self._release(d)
            self._refuse(a.key, a.store, str(e))
            return
        if self._restored.pop(a.key, None) is not None:
            self._restore_device(d)
        self.devices[a.key] = d
        try:
            self.host.store_write(f"{a.store}/state", str(int(DevState.INIT_WAIT)))
        except ValueError as e:
            del self.devices[a.key]
            self._close(d)
            self._refuse(a.key, None, f"cannot write the backend state: {e}")
            return
        self.log.info(
            "%s %d (%s) attached, waiting for the frontend", self.device_class.noun, a.key, a.label
        )

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
        if d.state is Lifecycle.BROKEN:
            return
        if state == DevState.INITIALISED:
            self._connect(d, resume=False)
        elif state == DevState.CONNECTED and d.state is Lifecycle.WAITING:
            # A new instance learns the frontend is connected already: resume the ring,
            # redoing what the in-flight log says was unfinished.
            self._connect(d, resume=True)
        elif state in (DevState.CLOSING, DevState.CLOSED) and d.state is not Lifecycle.CLOSED:
            d.state, d.ring, d.inflight = Lifecycle.CLOSED, None, None
            self.host.store_write(f"{d.attach.store}/state", str(int(DevState.CLOSED)))
            self.log.info("device %d (%s): frontend closed", key, d.label)

    def kick(self, key: int) -> None:
        d = self.devices.get(key)
        if d is None:
            self.log.debug("kick for unknown device %d", key)
        elif d.state is Lifecycle.CONNECTED:
            self._service(d)

    def close(self) -> None:
        for key in list(self.devices):
            self.detach(key)
        self._restored.clear()

    # -- connection and recovery ----------------------------------------------------------------
    def _connect(self, d: D, *, resume: bool) -> None:
        r = self.device_class.region
        off = d.attach.inflight_offset
        try:
            ring = BackRing(d.mem[: self._ring_bytes], r.ring_slots, r.slot_size)
            log = InflightLog(d.mem[off : off + self._inflight_bytes], r.ring_slots, r.slot_size)
        except (ValueError, RingError) as e:
            self._break(d, f"cannot attach the ring: {e}")
            return
        redo = self._recover(d, ring, log) if resume else self._forget(log)
        d.ring, d.inflight, d.state = ring, log, Lifecycle.CONNECTED
        self.host.store_write(f"{d.attach.store}/state", str(int(DevState.CONNECTED)))
        self.log.info(
            "device %d (%s): %s%s",
            d.key,
            d.label,
            "resumed" if resume else "connected",
            f", redoing {len(redo)} unfinished requests" if redo else "",
        )
        if resume:
            # A bug while redoing escapes (the host exits): the record stays flagged
            # executing, so the next instance counts a death for it.
            replayed, done_ns = self._redo(d, ring, log, redo) if redo else (0, time.monotonic_ns())
            self.host.recovered(d.key, replayed, done_ns)
        self._service(d)

    @staticmethod
    def _forget(log: InflightLog) -> list[InflightRecord]:
        """A freshly initialised ring has nothing outstanding: clear stale records."""
        for rec in log.pending():
            log.end(rec.index)
        return []

    def _recover(self, d: D, ring: BackRing, log: InflightLog) -> list[InflightRecord]:
        """The records of requests begun and not answered: the contiguous run from the
        published rsp_prod (others were answered, or never taken: cleared), a death counted
        for one found executing; ``ring.req_cons`` moves past the run."""
        start = ring.rsp_prod_pvt
        by_index = {rec.index: rec for rec in log.pending()}
        run: list[InflightRecord] = []
        while len(run) < ring.nr_slots and ((start + len(run)) & _MASK) in by_index:
            run.append(by_index.pop((start + len(run)) & _MASK))
        for index in by_index:
            log.end(index)
        ring.req_cons = (start + len(run)) & _MASK
        out = []
        for rec in run:
            if rec.executing:
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
                rec = dataclasses.replace(rec, executing=False, deaths=deaths)
            out.append(rec)
        return out

    def _redo(
        self, d: D, ring: BackRing, log: InflightLog, recs: list[InflightRecord]
    ) -> tuple[int, int]:
        """Answer ``recs`` in ring order: redo each, or refuse a poison one.  Returns
        (requests redone, CLOCK_MONOTONIC ns when their responses were published)."""
        replayed = 0
        for rec in recs:
            if rec.deaths >= self.poison_after:
                ring.put_response(self._poison(d, rec))
                continue
            log.mark_executing(rec.index)
            d.current = rec.index
            rsp = self._perform(d, rec.request)  # armed faults too: a poison one fires again
            log.clear_executing(rec.index)
            ring.put_response(rsp)
            replayed += 1
        d.stats.requests += len(recs)
        d.stats.replayed += replayed
        notify = ring.push_responses()
        done_ns = time.monotonic_ns()
        if notify:
            self._notify(d)
        for rec in recs:
            log.end(rec.index)
        return replayed, done_ns

    def _poison(self, d: D, rec: InflightRecord) -> bytes:
        what = self.describe(d, rec.request)
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
        d.stats.poisoned += 1
        self.host.poison(d.key, rec.index, description)
        return self.device_class.error_response(rec.request, d.attach.window, 0)

    # -- the data path ----------------------------------------------------------------------
    def _service(self, d: D) -> None:
        """Serve the ring.  A guest's ring violation breaks the device (``fault``); any other
        exception is a backend bug and escapes, with the request flagged executing."""
        try:
            self._serve_ring(d)
        except RingError as e:
            self._break(d, str(e))
        except StopServing as e:
            d.state = Lifecycle.STOPPED
            if d.inflight is not None:  # not a death: nothing died executing these
                for rec in d.inflight.pending():
                    d.inflight.clear_executing(rec.index)
            self.log.warning(
                "device %d (%s): %s; the device is no longer served", d.key, d.label, e
            )

    def _serve_ring(self, d: D) -> None:
        ring, log = d.ring, d.inflight
        assert ring is not None and log is not None
        get, put, begin, end = ring.get_request, ring.put_response, log.begin, log.end
        words, state_words, nr_slots = log.words, log.state_words, log.nr_slots
        stats = d.stats
        budget = TURN_REQUESTS
        while True:
            n = min(ring.unconsumed_requests(), self.max_batch)
            if n:
                perform = self._perform
                first = ring.req_cons
                for i in range(n):
                    raw = get()
                    index = (first + i) & _MASK
                    begin(index, raw)
                    w = state_words[index % nr_slots]  # mark/clear executing, inlined
                    words[w] = EXECUTING
                    d.current = index
                    rsp = perform(d, raw)
                    words[w] = 0
                    put(rsp)
                stats.requests += n
                stats.batches += 1
                stats.peak_batch = max(stats.peak_batch, n)
                if self._spoil is not None:
                    self._spoil_batch(d, ring)
                if ring.push_responses():
                    self._notify(d)
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

    def _notify(self, d: Device) -> None:
        d.stats.notifications += 1
        self.host.notify(d.key)

    def _break(self, d: Device, message: str) -> None:
        d.state, d.ring, d.inflight = Lifecycle.BROKEN, None, None
        d.stats.errors += 1
        self.host.fault(d.key, message)

    def _refuse(self, key: object, store: object, message: str) -> None:
        refuse(self.host, self.log, self.device_class.noun, key, store, message)

    def _close(self, d: D, *, handover: bool = False) -> None:
        d.state, d.ring, d.inflight = Lifecycle.CLOSED, None, None
        try:
            self.close_device(d, handover=handover)
        finally:
            self._release(d)

    def _release(self, d: Device) -> None:
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

    # -- faults (drivers/faults.py) ------------------------------------------------------------
    def set_faults(self, specs: list[dict[str, Any]]) -> None:
        """``["faults", specs]``: arm these faults (ValueError if one is bad, or is a type this
        class's drivers cannot carry out)."""
        self.injector.load(specs)
        self._choose_perform()

    def _choose_perform(self) -> None:
        self._perform = self._perform_injecting if self.injector.armed else self.perform

    def _perform_injecting(self, d: D, raw: bytes) -> bytes:
        info = self.request_info(d, raw)
        f = self.injector.pick(info) if info is not None else None
        if f is None:
            return self.perform(d, raw)
        self._choose_perform()  # from the next request on: no more questions, if it is spent
        self.host.fault_fired(f.id, f.type, d.label)
        return self._carry_out(f, d, raw)

    def _carry_out(self, f: Fault, d: D, raw: bytes) -> bytes:
        kind = f.type
        if kind in _DYING:
            self.host.carry_out(kind, really=f.really)
        elif kind == "slow":
            time.sleep(self.injector.delay_s(f))
        elif kind == "drop":
            raise StopServing(f"fault {f.id}: drop ({self.describe(d, raw)} is never answered)")
        elif kind in ("duplicate", "bad_index"):
            self._spoil = kind
        elif kind in ("leak_mem", "leak_fd"):
            self.host.carry_out(kind)
        rsp = self.perform(d, raw)
        if kind in ("bad_id", "bad_status", "bad_op"):
            rsp = self.spoil(kind, rsp)
        elif kind == "corrupt_data":
            self.corrupt_data(d, raw, rsp)
        return rsp

    def _spoil_batch(self, d: Device, ring: BackRing) -> None:
        """Carry out the response fault pending (:attr:`_spoil`) on the batch just served,
        before it is published (``bad_index``: after)."""
        if self._spoil == "duplicate":
            self._duplicate_last(d, ring)

    def _duplicate_last(self, d: Device, ring: BackRing) -> None:
        """The copy of the response before the batch's last one replaces it.  That response
        may be of the previous batch (a guest with one request in flight has batches of one),
        whose slot still holds it unless the guest has put a new request there: either way
        the guest finds a response it must refuse."""
        last = (ring.rsp_prod_pvt - 1) & _MASK
        if last == 0:
            return  # the ring's first response has none before it: the next batch does it
        self._spoil = None
        ring.rewrite_response(last, ring.response_at((last - 1) & _MASK))
        self.log.warning(
            "device %d (%s): fault injected: duplicate, the response at ring "
            "index %d published again at %d",
            d.key,
            d.label,
            (last - 1) & _MASK,
            last,
        )

    def _publish_bad_index(self, d: Device, ring: BackRing) -> None:
        """Publish a bogus rsp_prod and stop serving the device, as a backend that lost
        count would."""
        self._spoil = None
        bogus = ring.publish_rsp_prod_beyond(3)
        d.state = Lifecycle.STOPPED
        self.log.warning(
            "device %d (%s): fault injected: bad_index, rsp_prod %d published "
            "and the device no longer served",
            d.key,
            d.label,
            bogus,
        )
        self._notify(d)

    # -- statistics ----------------------------------------------------------------------------
    def statistics(self) -> dict[str, int | float | str]:
        """``devices``, the ``STATISTICS`` in total, then the ``DEVICE_STATISTICS`` of each
        device (the host reports the first 64 values)."""
        devs = sorted(self.devices.values(), key=lambda d: d.label)
        out: dict[str, int | float | str] = {"devices": len(devs)}
        for name in self.STATISTICS:
            values = [getattr(d.stats, name) for d in devs]
            out[name] = max(values, default=0) if name.startswith("peak") else sum(values)
        for d in devs:
            for name in self.DEVICE_STATISTICS:
                out[f"{d.label}.{name}"] = getattr(d.stats, name)
        return out

    # -- hot swap: the state contract (drivers/state.py) ---------------------------------------
    def save(self) -> BackendState:
        """Every device attached (whatever its frontend's state: its data may be in its
        medium) with its media (:meth:`device_media`), its counters (``carry_counters``) and
        the class's data (:meth:`device_data`); and those restored, not attached again yet,
        passed on as they are."""
        out = dict(self._restored)
        for d in self.devices.values():
            home, medium = self.device_media(d)
            data = self.device_data(d)
            if self.carry_counters:
                data = {"stats": dataclasses.asdict(d.stats), "class": data}
            out[d.key] = DeviceState(d.key, d.label, home, d.attach.scratch, medium, data)
        return BackendState(
            self.state_kind,
            self.state_version,
            self.implementation,
            tuple(out[k] for k in sorted(out)),
        )

    def suspend(self) -> None:
        """Let every device go for the next implementation; the rings and in-flight logs stay
        in the segments, and what the guests queue meanwhile waits there."""
        for key in list(self.devices):
            self._close(self.devices.pop(key), handover=True)
        self.log.info("suspended: every device released for the next implementation")

    @classmethod
    def upgrade_state(cls, state: BackendState) -> BackendState:
        raise StateError(
            f"{cls.__name__} (state version {cls.state_version}) has no "
            f"upgrade_state hook for version {state.version} states"
        )

    def restore(self, state: BackendState) -> None:
        """Take over from ``state`` (StateError if it cannot): each device checked and taken
        over (:meth:`restore_device`) now, and its data applied when the kernel attaches it
        again."""
        state = accept(
            state,
            kind=self.state_kind,
            version=self.state_version,
            who=self.implementation,
            upgrade=type(self).upgrade_state,
        )
        restored = {dev.key: self.restore_device(self._checked(dev)) for dev in state.devices}
        self._restored.update(restored)
        self.log.info(
            "restored %d device(s) from the state of %s (version %d)",
            len(restored),
            state.implementation,
            state.version,
        )

    def _checked(self, dev: DeviceState) -> DeviceState:
        """``dev``, whose counters (if it carries them) are checked: StateError if not."""
        if not self.carry_counters:
            return dev
        where = f"state of device {dev.key} ({dev.label})"
        stats, data = dev.data.get("stats", {}), dev.data.get("class", {})
        if not isinstance(stats, dict) or not isinstance(data, dict):
            raise StateError(f"{where}: data.stats and data.class must be maps")
        for f in fields(DeviceStats):
            v = stats.get(f.name, 0)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise StateError(
                    f"{where}: data.stats.{f.name} must be an integer >= 0, got {v!r:.40}"
                )
        return dev

    def _restore_device(self, d: D) -> None:
        assert d.saved is not None
        data = d.saved.data
        if self.carry_counters:
            stats = data.get("stats", {})
            for f in fields(DeviceStats):
                setattr(d.stats, f.name, stats.get(f.name, 0))
            data = data.get("class", {})
        self.restore_data(d, data)


__all__ = [
    "OPTIONS",
    "Attach",
    "Device",
    "DeviceBackend",
    "DeviceStats",
    "Lifecycle",
    "StopServing",
]
