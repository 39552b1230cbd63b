"""The kernel's part of driver recovery (``docs/recovery.md``).

The supervisor restarts drivers; the kernel is the one that sees their traffic and owns the
device segments, so it:

* re-attaches every device of a driver name when a new instance says ``hello`` (followed by the
  frontend's state, so a Connected frontend makes the backend resume), and reports the
  ``recovered`` / ``replayed`` progress of that instance;
* watches each link: heartbeats (``watchdog_ms``), requests stuck in a ring past
  ``request_timeout_ms`` (a ``hang``), and notification floods (a ``violation``);
* drops a link on ``driver_lost`` (only for the pid named), and meanwhile drops guest kicks;
* in *failing* mode (``driver_fail``, after the supervisor gave up) answers every outstanding
  and future request of that driver's devices itself, with ``STATUS_ERROR``, so no guest waits
  forever; the next ``hello`` of that name ends it, after clearing the in-flight logs.

Threads: messages, hellos and the periodic check run on the drivers thread; commands on the
control thread; kicks on pCPU threads.  Whoever touches a device's ring takes ``Device.lock``.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar

from devices import DeviceClass
from ipc import iotrace
from ipc.control import ControlError, NotFound
from ipc.iotrace import Stage
from ipc.ring import BackRing, InflightLog, RingError, inflight_bytes, ring_bytes
from ipc.shm import SegmentError
from ipc.store import DevState
from kernel import abi
from kernel.domain import Exit
from kernel.drivers import DriverLink, Malformed

if TYPE_CHECKING:
    from kernel.devices import Device, DeviceManager

log = logging.getLogger("isovisor.kernel")
_T = TypeVar("_T")

_MASK: Final = (1 << 64) - 1
#: More notifications than this from one driver within one second is a protocol violation.  A
#: real backend sends a few thousand at most (one per batch of responses, only when the guest
#: asked to be woken); the kernel's drivers thread absorbs about 120,000 per second on the
#: reference 2-core box, so the limit must sit well below that to be reachable at all.
NOTIFY_FLOOD_PER_S: Final = 50_000
#: What ``driver_inject`` accepts, and the fault (drivers/faults.py) each kind arms in the
#: driver: the dying kinds and leaks are carried out at once (``now``), a bad response on the
#: driver's next request.  The same fault path as the supervisor's fault table.
INJECT_KINDS: Final[dict[str, dict[str, Any]]] = {
    **{k: {"type": k, "now": True} for k in ("exit", "exception", "segv", "abort", "hang")},
    "leak": {"type": "leak_mem", "now": True},
    "leak_mem": {"type": "leak_mem", "now": True},
    "leak_fd": {"type": "leak_fd", "now": True},
    **{k: {"type": k} for k in ("bad_id", "bad_status", "bad_op", "bad_index")},
}
_RING_WORDS: Final = struct.Struct("<QQQ")  # req_prod, req_event, rsp_prod
_RSP_PROD_OFFSET: Final = 16


# --- rings and in-flight logs of a device segment --------------------------------------------


def ring_indices(buf: Any) -> tuple[int, int]:
    """(req_prod, rsp_prod) of the ring at the start of a device segment."""
    req_prod, _, rsp_prod = _RING_WORDS.unpack_from(buf, 0)
    return req_prod, rsp_prod


def outstanding(req_prod: int, rsp_prod: int, cls: DeviceClass) -> int:
    """Requests published and not answered; 0 for indices no valid ring can have."""
    n = (req_prod - rsp_prod) & _MASK
    return n if n <= cls.region.ring_slots else 0


def _inflight_log(buf: Any, cls: DeviceClass) -> InflightLog:
    r = cls.region
    size = inflight_bytes(r.ring_slots, r.slot_size)
    view = memoryview(buf)[r.inflight_offset : r.inflight_offset + size]
    return InflightLog(view, r.ring_slots, r.slot_size)


def clear_inflight(buf: Any, cls: DeviceClass) -> int:
    """Retire every record of the segment's in-flight log; how many there were."""
    journal = _inflight_log(buf, cls)
    records = journal.pending()
    for rec in records:
        journal.end(rec.index)
    return len(records)


def rewind(buf: Any, to: int, charge: bool, cls: DeviceClass) -> int:
    """Take back the responses from ring index ``to`` on (a frontend found the one at ``to``
    bad): ``rsp_prod`` goes back to ``to`` and the in-flight records of the requests from
    there to ``req_prod`` are pending again, so the next backend redoes them in ring order.
    With ``charge``, the request at ``to`` is counted a death (its response was bad, so a
    request that keeps getting bad answers ends as poison).  Returns the records reopened.
    Raises RingError if ``to`` is not within a ring's length behind ``req_prod``."""
    req_prod, _, _ = _RING_WORDS.unpack_from(buf, 0)
    n = (req_prod - to) & _MASK
    if n > cls.region.ring_slots:
        raise RingError(
            f"cannot take responses back from index {to}: req_prod is {req_prod}, "
            f"{n} requests away (the ring has {cls.region.ring_slots} slots)"
        )
    journal = _inflight_log(buf, cls)
    reopened = journal.reopen(to, n)
    if charge and any(rec.index == to for rec in journal.pending()):
        journal.record_death(to)
    struct.pack_into("<Q", buf, _RSP_PROD_OFFSET, to)
    return reopened


def answer_with_errors(buf: Any, window: int, sectors: int, cls: DeviceClass) -> tuple[int, bool]:
    """Answer every outstanding request of the segment's ring with ``STATUS_ERROR``.

    Requests from the published ``rsp_prod`` on are answered in ring order, each from its
    in-flight record if the dead backend had taken it, else from its slot; the log is then
    cleared and the backend's ``req_event`` re-armed so the guest's next request kicks.
    Returns (requests answered, whether the frontend asked to be notified).  Raises RingError
    if the guest's ``req_prod`` is impossible.
    """
    r = cls.region
    ring = BackRing(
        memoryview(buf)[: ring_bytes(r.ring_slots, r.slot_size)], r.ring_slots, r.slot_size
    )
    journal = _inflight_log(buf, cls)
    taken = {rec.index: rec.request for rec in journal.pending()}
    answered = 0
    notify = False
    while True:
        while ring.unconsumed_requests():
            index = ring.req_cons
            raw = ring.get_request()
            ring.put_response(cls.error_response(taken.get(index, raw), window, sectors))
            answered += 1
        notify |= ring.push_responses()
        if not ring.final_check_for_requests():
            break
    for index in taken:
        journal.end(index)
    return answered, notify


@dataclass(frozen=True)
class Hold:
    """A frontend holds its responses from ring index ``index`` on until a driver instance
    other than ``pid`` (None: whichever comes next) has them redone."""

    index: int
    code: int
    pid: int | None


# --- the recovery duties -----------------------------------------------------------------------


class Recovery:
    """Per-driver recovery state and handlers, for one :class:`DeviceManager`."""

    def __init__(self, manager: DeviceManager, clock: Callable[[], float] = time.monotonic) -> None:
        self.dm = manager
        self.hub = manager.hub
        self.emit = manager.emit
        self.clock = clock
        #: Notifications per second above which an instance is reported for a flood.
        self.flood_per_s = NOTIFY_FLOOD_PER_S
        #: Driver names in failing mode, with the reason the supervisor gave.
        self.failing: dict[str, str] = {}
        self._lock = threading.Lock()
        #: Is a driver's ring waiting on purpose (a hot swap)?  Then no hang checks.
        self.quiet: Callable[[str], bool] = lambda name: False
        #: Told when every device of a link has resumed (a hot swap's end).
        self.on_replayed: Callable[[DriverLink, int], None] = lambda link, done_ns: None

    # -- hello (drivers thread) ----------------------------------------------------------------
    def on_hello(self, link: DriverLink) -> None:
        """A driver instance connected: end failing mode, re-attach its devices, and start
        waiting for their ``recovered`` reports."""
        self._end_failing(link.name)
        devices = [
            d
            for d in self.dm.snapshot()
            if d.spec.backend == link.name and d.announced and not d.gone
        ]
        now = self.clock()
        resuming = set()
        for dev in devices:  # every attach first: a backend sees all its devices before it
            dev.progress_at, dev.progress_rsp = now, None  # resumes any (a switch needs that)
            if dev.hold is not None and dev.hold.pid != link.pid:
                self._release(dev, f"driver {link.name} pid {link.pid} said hello")
            self.hub.send_control(link.name, dev.attach_message())
        for dev in devices:
            fe = self.dm.frontend_state(dev)
            if fe > int(DevState.INITIALISING):
                self.hub.send_control(link.name, ["fe_state", dev.key, fe])
            if fe == int(DevState.CONNECTED):  # the backend resumes it, then reports
                resuming.add(dev.key)
        if devices:
            log.info(
                "driver %s (pid %d): re-attached %d device(s): %s",
                link.name,
                link.pid,
                len(devices),
                ", ".join(d.label for d in devices),
            )
        if iotrace.RECOVERY:
            iotrace.mark(Stage.K_REATTACH, link.pid)
        with self._lock:
            link.awaiting = resuming
            self._check_replayed(link)

    def _end_failing(self, name: str) -> None:
        with self._lock:
            reason = self.failing.get(name)
        if reason is None:
            return
        cleared = 0
        for dev in self.dm.snapshot():
            if dev.spec.backend == name and dev.cls.requests:
                with dev.lock:
                    if not dev.gone:
                        cleared += (
                            self._guarded(
                                dev,
                                "clearing the in-flight log",
                                lambda d: clear_inflight(d.segment.buf, d.cls),
                            )
                            or 0
                        )
        with self._lock:
            self.failing.pop(name, None)
        log.warning(
            "driver %s is back: failing mode (%s) ends; %d stale in-flight record(s) cleared",
            name,
            reason,
            cleared,
        )

    def _check_replayed(self, link: DriverLink) -> None:
        """Publish ``driver.<name>.replayed`` once nothing is awaited any more (lock held)."""
        if link.awaiting or link.replay_reported:
            return
        link.replay_reported = True
        done_ns = link.done_ns if link.recovered else time.monotonic_ns()
        self.emit(
            f"driver.{link.name}.replayed",
            {
                "pid": link.pid,
                "devices": link.recovered,
                "replayed": link.replayed,
                "done_ns": done_ns,
            },
        )
        self.on_replayed(link, done_ns)

    def device_removed(self, dev: Device) -> None:
        """A device went away: stop waiting for its ``recovered`` report."""
        self._settle(dev)

    def _settle(self, dev: Device, report: tuple[int, int] | None = None) -> None:
        """``dev`` is no longer awaited by its driver's link: it reported ``report``
        (replayed, done_ns), or it never will."""
        link = self.hub.links.get(dev.spec.backend)
        if link is None:
            return
        with self._lock:
            if dev.key not in link.awaiting:
                return
            link.awaiting.discard(dev.key)
            if report is not None:
                link.recovered += 1
                link.replayed += report[0]
                link.done_ns = max(link.done_ns, report[1])
            self._check_replayed(link)

    # -- messages (drivers thread) -----------------------------------------------------------
    def handle(self, msg: list[Any]) -> bool:
        """Handle a recovery message; False if ``msg`` is not one of them."""
        handler = self._handlers.get(msg[0])
        if handler is None:
            return False
        handler(self, msg)
        return True

    def _heartbeat(self, msg: list[Any]) -> None:
        if not (len(msg) == 3 and isinstance(msg[1], str) and _is_int(msg[2])):
            raise _malformed(msg, '["heartbeat", name:str, seq:int]')
        link = self.hub.links.get(msg[1])
        if link is None:
            log.debug("heartbeat from driver %r, which has no link, ignored", msg[1])
            return
        link.touch(self.clock())

    def _spare(self, msg: list[Any]) -> None:
        info = msg[1] if len(msg) == 2 and isinstance(msg[1], dict) else {}
        name, pid = info.get("name"), info.get("pid")
        endpoint, module = info.get("endpoint"), info.get("module")
        if not (
            isinstance(name, str)
            and name
            and _is_int(pid)
            and isinstance(endpoint, str)
            and endpoint
            and isinstance(module, str)
        ):
            raise _malformed(msg, '["spare", {name:str, pid:int, endpoint:str, module:str}]')
        log.info("driver %s: spare instance ready (pid %d, %s)", name, pid, endpoint)
        self.hub.preconnect(name, endpoint)
        self.emit(f"driver.{name}.spare", {"pid": pid, "endpoint": endpoint})

    def _recovered(self, msg: list[Any]) -> None:
        if not (
            len(msg) == 4
            and _is_int(msg[1])
            and _is_int(msg[2])
            and msg[2] >= 0
            and _is_int(msg[3])
            and msg[3] >= 0
        ):
            raise _malformed(msg, '["recovered", key:int, replayed:int >= 0, done_ns:int >= 0]')
        if iotrace.RECOVERY:
            iotrace.mark(Stage.K_RECOVERED, msg[1])
        dev = self.dm.device_of(msg[1], "recovered")
        if dev is None:
            return
        replayed, done_ns = msg[2], msg[3]
        backend = dev.spec.backend
        self.seen(backend)
        log.info(
            "device %s: driver %s recovered it, %d request(s) redone", dev.label, backend, replayed
        )
        self.emit(
            f"device.{dev.dom.name}.{dev.spec.vdev}.recovered",
            {"domid": dev.dom.domid, "driver": backend, "replayed": replayed, "done_ns": done_ns},
        )
        self._wake(dev)
        self._settle(dev, (replayed, done_ns))

    def _poison(self, msg: list[Any]) -> None:
        if not (
            len(msg) == 4
            and _is_int(msg[1])
            and _is_int(msg[2])
            and msg[2] >= 0
            and isinstance(msg[3], str)
        ):
            raise _malformed(msg, '["poison", key:int, index:int >= 0, description:str]')
        dev = self.dm.device_of(msg[1], "poison")
        if dev is None:
            return
        backend, description = dev.spec.backend, msg[3][:1000]
        link = self.seen(backend)
        log.error(
            "device %s: driver %s refused poison request at ring index %d (it was being "
            "executed when driver instances died): %s",
            dev.label,
            backend,
            msg[2],
            description,
        )
        self.emit(
            f"driver.{backend}.poison",
            {
                "pid": link.pid if link else None,
                "domain": dev.dom.name,
                "vdev": dev.spec.vdev,
                "index": msg[2],
                "request": description,
            },
        )

    def _fault_fired(self, msg: list[Any]) -> None:
        info = msg[1] if len(msg) == 2 and isinstance(msg[1], dict) else {}
        name, pid, fid = info.get("name"), info.get("pid"), info.get("id")
        kind, device = info.get("type"), info.get("device")
        if not (
            isinstance(name, str)
            and _is_int(pid)
            and _is_int(fid)
            and isinstance(kind, str)
            and isinstance(device, str)
        ):
            raise _malformed(
                msg, '["fault_fired", {name:str, pid:int, id:int, type:str, device:str}]'
            )
        self.seen(name)
        self.emit(
            f"driver.{name}.fault_fired",
            {"pid": pid, "id": fid, "type": kind, "device": device[:200]},
        )

    _handlers: Final[dict[str, Callable[[Recovery, list[Any]], None]]] = {
        "heartbeat": _heartbeat,
        "spare": _spare,
        "recovered": _recovered,
        "poison": _poison,
        "fault_fired": _fault_fired,
    }

    # -- signs of life and misbehaviour ------------------------------------------------------
    def seen(self, backend: str) -> DriverLink | None:
        """A message about one of ``backend``'s devices arrived: it is alive."""
        link = self.hub.links.get(backend)
        if link is not None:
            link.touch(self.clock())
        return link

    def notified(self, backend: str, count: int = 1) -> None:
        """Count ``count`` notifications of ``backend`` (and note it as alive); a flood is
        reported once per link."""
        link = self.hub.links.get(backend)
        if link is None:
            return
        now = self.clock()
        link.last_seen = now
        if now - link.notify_window >= 1.0:
            link.notify_window, link.notify_count = now, 0
        link.notify_count += count
        if link.notify_count > self.flood_per_s:
            self.violation(
                link,
                f"notification flood: more than {self.flood_per_s} notifications within one second",
            )

    def violation(self, link: DriverLink, reason: str) -> None:
        """The kernel caught instance ``link`` breaking the protocol (a malformed message, a
        flood): publish ``driver.<name>.violation`` once per link."""
        if link.violation_reported:
            return
        link.violation_reported = True
        log.error("driver %s (pid %d): protocol violation: %s", link.name, link.pid, reason)
        self.emit(
            f"driver.{link.name}.violation",
            {"pid": link.pid, "reason": reason, "reporter": "kernel"},
        )

    def frontend_fault(self, dev: Device, code: int, message: str, rsp_cons: int | None) -> bool:
        """A frontend says its driver broke the protocol: a violation by that driver.

        With ``rsp_cons`` (the frontend can hold), a bad response is repaired rather than
        passed on: the device is *held* until the next driver instance says hello, and then
        :func:`rewind` has that instance redo every request from ``rsp_cons`` on.  True if
        the frontend is to hold, False if it is to fail (an inline driver, which no
        replacement follows; a handshake fault; impossible indices)."""
        backend = dev.spec.backend
        link = self.hub.links.get(backend)
        hold = rsp_cons is not None and self._may_hold(dev, code, rsp_cons, link)
        if hold and rsp_cons is not None:
            # before the event: the supervisor may kill the driver and the spare say hello
            # within milliseconds, and that hello must find the hold to take it back
            with dev.lock:
                if dev.hold is None:
                    dev.hold = Hold(rsp_cons, code, link.pid if link else None)
            log.warning(
                "device %s: its responses from ring index %d on are held until a new "
                "instance of driver %s redoes them",
                dev.label,
                rsp_cons,
                backend,
            )
        self.emit(
            f"driver.{backend}.violation",
            {
                "pid": link.pid if link else None,
                "reason": f"the frontend of {dev.label} reports a bad response (code {code}): "
                f"{message}",
                "reporter": "frontend",
                "domain": dev.dom.name,
                "vdev": dev.spec.vdev,
                "held": hold,
            },
        )
        if not hold:
            return False
        if backend in self.failing:  # no instance is coming: answer from there with errors
            self._release(dev, f"driver {backend} is failing")
            self.answer(dev)
        return True

    def _may_hold(self, dev: Device, code: int, rsp_cons: int, link: DriverLink | None) -> bool:
        if code not in abi.FAULT_CODES_HOLDABLE or dev.gone or dev.broken or not dev.cls.requests:
            return False
        if link is not None and link.isolation == "inline":
            return False  # nothing replaces it: the frontend fails as it would without holds
        if link is None and dev.spec.backend not in self.hub.known:
            return False
        req_prod, _ = self.dm.ring_indices(dev)
        if (req_prod - rsp_cons) & _MASK > dev.cls.region.ring_slots:
            log.error(
                "device %s: its frontend asks to hold from ring index %d, but req_prod "
                "is %d: impossible, so it is not held",
                dev.label,
                rsp_cons,
                req_prod,
            )
            return False
        return True

    def held(self, dev: Device) -> bool:
        """HC_DEVICE_HELD: are ``dev``'s responses held for a replacement driver?"""
        return dev.hold is not None

    def _release(self, dev: Device, why: str) -> None:
        """Rewind a held device's ring for the next backend (the old one is gone) and wake
        the frontend."""
        with dev.lock:
            hold, dev.hold = dev.hold, None
            if hold is None or dev.gone:
                return
            charge = hold.code != abi.FAULT_EXTRA_RESPONSE  # a bad response of one request
            reopened = self._guarded(
                dev,
                "taking back bad responses",
                lambda d: rewind(d.segment.buf, hold.index, charge, d.cls),
            )
        if reopened is None:
            return
        log.warning(
            "device %s: %s; responses from ring index %d on taken back, %d request(s) to redo",
            dev.label,
            why,
            hold.index,
            reopened,
        )
        self.emit(
            f"device.{dev.dom.name}.{dev.spec.vdev}.rewound",
            {
                "domid": dev.dom.domid,
                "driver": dev.spec.backend,
                "index": hold.index,
                "reopened": reopened,
                "code": hold.code,
            },
        )
        self.dm.sched.notify(dev.dom, 1 << dev.port)

    def driver_fault(self, dev: Device) -> None:
        """The driver found the guest's ring broken: no hang checks or answers for it."""
        dev.broken = True
        self._settle(dev)

    def driver_error(self, dev: Device) -> None:
        """The driver cannot serve the device: it will not report it recovered."""
        self._settle(dev)

    # -- the periodic check (drivers thread) --------------------------------------------------
    def tick(self) -> None:
        """Report each link that missed its heartbeat or left a request unanswered too long
        (once per link); drain the consoles of failed drivers."""
        now = self.clock()
        devices = self.dm.snapshot()
        if self.failing:  # a byte stream of a failed driver (a console): take its output even
            for dev in devices:  # without a kick, so a guest whose wake-up was lost never waits
                if not dev.cls.requests and dev.spec.backend in self.failing:
                    self._take_output(dev)
        for link in list(self.hub.links.values()):
            if link.hang_reported or self.quiet(link.name):
                continue
            found = self._watchdog_miss(link, now) or self._stuck_request(link, devices, now)
            if found is None:
                continue
            reason, since = found
            link.hang_reported = True
            log.error("driver %s (pid %d) hangs: %s", link.name, link.pid, reason)
            self.emit(
                f"driver.{link.name}.hang",
                {"pid": link.pid, "reason": reason, "since_ms": int(since * 1000)},
            )

    @staticmethod
    def _watchdog_miss(link: DriverLink, now: float) -> tuple[str, float] | None:
        quiet = now - link.last_seen
        if link.watchdog_ms <= 0 or quiet * 1000 < link.watchdog_ms:
            return None
        return (
            f"no heartbeat or other message for {quiet * 1000:.0f} ms (watchdog "
            f"{link.watchdog_ms} ms)",
            quiet,
        )

    def _stuck_request(
        self, link: DriverLink, devices: list[Device], now: float
    ) -> tuple[str, float] | None:
        stuck: tuple[str, float] | None = None
        for dev in devices:
            if (
                dev.spec.backend != link.name
                or dev.broken
                or dev.dom.exit is not None
                or link.request_timeout_ms <= 0
            ):
                continue
            req, rsp = self.dm.ring_indices(dev)
            waiting = outstanding(req, rsp, dev.cls)
            if not waiting or rsp != dev.progress_rsp:
                dev.progress_rsp, dev.progress_at = rsp, now
                continue
            idle = now - dev.progress_at
            if stuck is None and idle * 1000 >= link.request_timeout_ms:
                stuck = (
                    f"device {dev.label} has {waiting} request(s) outstanding and no "
                    f"response for {idle * 1000:.0f} ms (request timeout "
                    f"{link.request_timeout_ms} ms)",
                    idle,
                )
        return stuck

    # -- kicks while a driver is missing or failing (pCPU threads) ---------------------------
    def answer(self, dev: Device) -> int:
        """Failing mode: answer what ``dev``'s ring holds with errors; how many."""
        if not dev.cls.requests:
            return self._take_output(dev)
        sectors = max(0, self.dm.disk_sectors(dev))
        with dev.lock:
            if dev.gone or dev.broken:
                return 0
            result = self._guarded(
                dev,
                "answering its requests",
                lambda d: answer_with_errors(d.segment.buf, d.window, sectors, d.cls),
            )
        if result is None:
            return 0
        answered, notify = result
        dev.failed_requests += answered
        if notify:
            self.dm.sched.notify(dev.dom, 1 << dev.port)
        return answered

    def _take_output(self, dev: Device) -> int:
        """Failing mode for a byte stream (``WhileFailed.TAKE_OUTPUT``, a console): the kernel
        takes the guest's output into its own console of the domain (``isovisor console`` shows
        it), so a guest never blocks on a device nobody serves."""
        with dev.lock:
            if dev.gone or dev.broken:
                return 0
            result = self._guarded(
                dev, "taking its output", lambda d: d.cls.take_output(d.segment.buf)
            )
        if not result:
            return 0
        data, notify = result
        dev.dom.console_append(data)
        if notify:
            self.dm.sched.notify(dev.dom, 1 << dev.port)
        return len(data)

    def _wake(self, dev: Device) -> None:
        """Raise ``dev``'s event for its guest, whatever the ring says.  A driver killed between
        publishing an index and notifying took that notification with it: a guest that slept
        on it (a console writer waiting for room the dead instance had made, a frontend waiting
        for responses it had pushed) would sleep for good, as the ring then gives the next
        instance, or the kernel in failing mode, nothing to notify for.  Xen's frontends get an
        event on every reconnect for the same reason; a spurious one only makes the guest look
        at its rings again."""
        if not dev.gone and dev.dom.exit is None:
            self.dm.sched.notify(dev.dom, 1 << dev.port)

    def _guarded(self, dev: Device, what: str, fn: Callable[[Device], _T]) -> _T | None:
        """Run ``fn(dev)`` on the device's segment (lock held); a broken guest ring crashes
        the guest, a vanished segment is logged.  None on failure."""
        try:
            return fn(dev)
        except RingError as e:
            dev.broken = True
            reason = (
                f"{dev.kind_word} {dev.spec.vdev}: the kernel, {what} for failed driver "
                f"{dev.spec.backend}, found: {e}"
            )
            log.error("device %s: %s", dev.label, reason)
            self.emit(
                f"device.{dev.dom.name}.{dev.spec.vdev}.fault",
                {"domid": dev.dom.domid, "driver": dev.spec.backend, "reason": str(e)},
            )
            self.dm.sched.request_exit(dev.dom, Exit("crash", reason))
        except (SegmentError, ValueError) as e:
            log.error(
                "device %s: %s for driver %s failed: %s", dev.label, what, dev.spec.backend, e
            )
        return None

    # -- commands (control thread) ---------------------------------------------------------
    def lost(self, name: str, pid: int) -> bool:
        """``driver_lost``: drop the link of ``name`` if it is instance ``pid``."""
        link = self.hub.drop(name, pid)
        if link is None:
            current = self.hub.links.get(name)
            log.info(
                "driver_lost %s pid %d: %s",
                name,
                pid,
                f"the link is pid {current.pid}, kept" if current else "no link",
            )
            return False
        return True

    def fail(self, name: str, reason: str) -> dict[str, Any]:
        """``driver_fail``: the kernel answers for ``name`` until its next hello."""
        with self._lock:
            self.failing[name] = reason
        link = self.hub.drop(name)
        devices = [d for d in self.dm.snapshot() if d.spec.backend == name and not d.gone]
        for dev in devices:
            if dev.hold is not None:
                self._release(dev, f"driver {name} fails")
        answered = 0
        for dev in devices:
            answered += self.answer(dev)
            self._wake(dev)
        log.error(
            "driver %s fails (%s): the kernel answers every request of its %d device(s) "
            "with an error until a new instance says hello; %d outstanding request(s) "
            "answered",
            name,
            reason,
            len(devices),
            answered,
        )
        self.emit(f"driver.{name}.failing", {"reason": reason})
        return {"dropped": link is not None, "devices": len(devices), "answered": answered}

    def inject(self, name: str, kind: str) -> None:
        """``driver_inject``: ask driver ``name`` to fail in the way ``kind`` says."""
        if kind not in INJECT_KINDS:
            raise ControlError(
                f"driver_inject: unknown kind {kind!r}; choose one of {', '.join(INJECT_KINDS)}"
            )
        link = self.hub.links.get(name)
        if link is None:
            known = ", ".join(sorted(self.hub.links)) or "none"
            raise NotFound(
                f"driver_inject: driver {name!r} is not connected (connected "
                f"drivers: {known}); start it first, e.g. `isovisor driver start "
                f"{name}`"
            )
        if link.isolation == "inline":
            raise ControlError(
                f"driver_inject: driver {name!r} runs inline, inside the kernel "
                "process, so an injected fault would take the kernel down; "
                'declare it with isolation = "process" to test recovery'
            )
        if not self.hub.send_control(name, ["fault", INJECT_KINDS[kind]]):
            raise ControlError(f"driver_inject: driver {name!r} disconnected meanwhile")
        log.warning("driver %s (pid %d): fault %r injected on request", name, link.pid, kind)

    def rows(self) -> list[dict[str, Any]]:
        """One row per driver name the kernel knows: its link, health and load."""
        now = self.clock()
        devices = self.dm.snapshot()
        names = (
            set(self.hub.links)
            | set(self.failing)
            | {d.spec.backend for d in devices if d.spec.backend in self.hub.known}
        )
        return [
            self._row(name, now, [d for d in devices if d.spec.backend == name])
            for name in sorted(names)
        ]

    def _row(self, name: str, now: float, devices: list[Device]) -> dict[str, Any]:
        link = self.hub.links.get(name)
        busy = sum(outstanding(*self.dm.ring_indices(d), d.cls) for d in devices)
        return {
            "name": name,
            "connected": link is not None,
            "pid": link.pid if link else None,
            "isolation": link.isolation if link else None,
            "module": link.module if link else None,
            "endpoint": link.endpoint if link else None,
            "last_seen_ms": int((now - link.last_seen) * 1000) if link else None,
            "watchdog_ms": link.watchdog_ms if link else 0,
            "request_timeout_ms": link.request_timeout_ms if link else None,
            "failing": name in self.failing,
            "failing_reason": self.failing.get(name),
            "outstanding": busy,
            "devices": len(devices),
            "statistics": dict(link.statistics) if link else {},
            "statistics_error": link.statistics_error if link else None,
        }


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _malformed(msg: list[Any], shape: str) -> Malformed:
    return Malformed(f"malformed {msg[0]} message {msg!r:.200} (expected {shape})")
