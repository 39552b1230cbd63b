"""The backend base of a request/response device class: everything but the class's own work.

A class whose region starts with a request ring and keeps an in-flight log after its window
(``devices.base.WhileFailed.ANSWER_ERRORS``; ``rng`` and ``vbd`` are built on this base) writes
a subclass of :class:`DeviceBackend` that names its class and fills three hooks (Firecracker's
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

What every backend shares (options, attach/detach, the frontend-state machine, statistics,
save/suspend/restore) is :class:`drivers.backendbase.BackendBase`'s.  This base adds, for every
request/response class, with no code of the class's own:

* **the geometry**: the ring inside the window, the in-flight log after it;
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
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Final, TypeVar

from drivers.backendbase import Attach, BackendBase, BaseDevice, Lifecycle, StopServing
from drivers.backendkit import int_option
from drivers.faults import Fault, RequestInfo
from ipc.ring import EXECUTING, BackRing, InflightLog, InflightRecord, RingError
from ipc.ring import inflight_bytes as _inflight_bytes
from ipc.ring import ring_bytes as _ring_bytes
from ipc.shm import Segment

_MASK: Final = (1 << 64) - 1
#: Requests served for one device before the others get a turn.
TURN_REQUESTS: Final = 256
_DYING: Final = ("segv", "abort", "exit", "hang", "exception", "poison")

OPTIONS: Final[dict[str, str]] = {
    "max_batch": "requests taken from a ring before responses are published (1..1024, default 32)",
    "poison_after": "a request that this many driver instances in a row died executing is "
    "answered with an error instead of being redone (1..100, default 3)",
}


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
class Device(BaseDevice):
    """A device of a request/response class: the base's, with its ring and in-flight log."""

    stats: DeviceStats = field(default_factory=DeviceStats)
    ring: BackRing | None = None
    inflight: InflightLog | None = None
    #: The ring index of the request being performed (stable across instances: a fault's
    #: position filter, and so a poison request, names it).
    current: int = 0


D = TypeVar("D", bound=Device)


class DeviceBackend(BackendBase[D]):
    """The base (module docstring).  A subclass sets :attr:`device_class` and
    :attr:`state_kind` and writes :meth:`perform`, :meth:`request_info` and :meth:`spoil`."""

    device_type: ClassVar[type[BaseDevice]] = Device
    stats_type: ClassVar[type[Any]] = DeviceStats
    OPTIONS: ClassVar[dict[str, str]] = OPTIONS
    STATISTICS: ClassVar[tuple[str, ...]] = tuple(f.name for f in fields(DeviceStats))
    DEVICE_STATISTICS: ClassVar[tuple[str, ...]] = ("requests", "errors")

    def setup(self, options: dict[str, Any]) -> None:
        self.max_batch = int_option(options, "max_batch", 32, 1, 1024)
        self.poison_after = int_option(options, "poison_after", 3, 1, 100)
        #: A response fault to carry out on the batch being served (duplicate, bad_index).
        self._spoil: str | None = None
        #: ``perform`` itself, or its injecting wrapper while a fault is armed (the data path
        #: pays nothing for the feature otherwise).
        self._perform: Callable[[D, bytes], bytes] = self.perform
        r = self.device_class.region
        self._ring_bytes = _ring_bytes(r.ring_slots, r.slot_size)
        self._inflight_bytes = _inflight_bytes(r.ring_slots, r.slot_size)

    def check_region(self, a: Attach, segment: Segment) -> str | None:
        r = self.device_class.region
        if not self._ring_bytes <= a.window <= segment.size or a.window != r.window:
            return (
                f"window {a.window:#x} is not the {self.device_class.noun}'s "
                f"{r.window:#x} bytes inside segment {a.segment} of {segment.size:#x}"
            )
        if a.inflight_offset < a.window or a.inflight_offset + self._inflight_bytes > segment.size:
            return (
                f"in-flight log at {a.inflight_offset:#x} ({self._inflight_bytes} "
                f"bytes) must lie after the window {a.window:#x} inside segment "
                f"{a.segment} of {segment.size:#x} bytes"
            )
        return None

    def summary(self, d: D) -> str:
        s = d.stats
        return (
            f"{s.requests} requests, {s.errors} errors, {s.batches} batches, "
            f"{s.notifications} notifications"
        )

    def disconnect(self, d: D) -> None:
        d.ring, d.inflight = None, None

    # -- what a class writes -------------------------------------------------------------------
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

    # -- connection and recovery ----------------------------------------------------------------
    def connect(self, d: D, *, resume: bool) -> None:
        r = self.device_class.region
        off = d.attach.inflight_offset
        try:
            ring = BackRing(d.mem[: self._ring_bytes], r.ring_slots, r.slot_size)
            log = InflightLog(d.mem[off : off + self._inflight_bytes], r.ring_slots, r.slot_size)
        except (ValueError, RingError) as e:
            self._break(d, f"cannot attach the ring: {e}")
            return
        redo = self._recover(d, ring, log) if resume else self._forget(log)
        d.ring, d.inflight = ring, log
        self.connected(
            d, resume=resume, detail=f", redoing {len(redo)} unfinished requests" if redo else ""
        )
        if resume:
            # A bug while redoing escapes (the host exits): the record stays flagged
            # executing, so the next instance counts a death for it.
            replayed, done_ns = self._redo(d, ring, log, redo) if redo else (0, time.monotonic_ns())
            self.host.recovered(d.key, replayed, done_ns)
        self.service(d)

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
    def service(self, d: D) -> None:
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

    def _break(self, d: D, message: str) -> None:
        d.stats.errors += 1
        super()._break(d, message)

    # -- faults (drivers/faults.py) ------------------------------------------------------------
    def faults_changed(self) -> None:
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


__all__ = [
    "OPTIONS",
    "Attach",
    "BackendBase",
    "Device",
    "DeviceBackend",
    "DeviceStats",
    "Lifecycle",
    "StopServing",
]
