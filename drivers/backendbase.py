"""What every device backend shares, whatever its region holds: the base of
:class:`drivers.devicebackend.DeviceBackend` (a request ring and its in-flight log: ``rng``,
``vbd``) and of a class whose region is shaped otherwise (a byte stream, two rings and a
switch).

A subclass names its class (``device_class``, ``state_kind``) and writes how a device is
served: :meth:`BackendBase.connect` (the frontend is ready: take the region's rings, or
resume them after a predecessor), :meth:`BackendBase.service` (the guest kicked) and
:meth:`BackendBase.disconnect` (let go of the rings).  The base does, for every class:

* **options**: unknown keys refused with the list of known ones (``OPTIONS``);
* **attach/detach**: the attach message checked field by field into an :class:`Attach`, the
  class named by the message checked, the segment mapped (:meth:`BackendBase.map_segment`:
  from the descriptor the host hands over with the doorbells, by name only without one) and
  the region's geometry checked (:meth:`BackendBase.check_region`), the class's own fields and
  resources (:meth:`BackendBase.open_device`), InitWait published; a device that cannot be
  served is refused in its store directory and to the kernel;
* **the frontend-state machine** (:class:`Lifecycle`), Xen's handshake: InitWait on attach,
  Connected on the frontend's Initialised; a new instance finding the frontend Connected
  *resumes*; Closing/Closed closes;
* **faults**: the class's :class:`~drivers.faults.Injector`, loaded by ``set_faults``;
* **statistics** (``stats_type``: a dataclass of counters; ``STATISTICS`` in total,
  ``DEVICE_STATISTICS`` per device) and **save/suspend/restore** through the versioned
  :class:`~drivers.state.BackendState` contract (hot swap).
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import gc
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Generic, TypeVar, cast

from devices.base import DeviceClass
from drivers.backendkit import Host, msg_field, refuse
from drivers.faults import Injector, fault_classes
from drivers.state import BackendState, DeviceState, Medium, StateError, accept
from ipc.shm import Segment, SegmentError
from ipc.store import DevState


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


@dataclass(eq=False)
class BaseDevice:
    """A device a backend serves: its attach message, its mapped segment and its state."""

    attach: Attach
    segment: Segment
    mem: memoryview
    #: The guest's window: what the guest's requests may point into.
    region: memoryview
    state: Lifecycle = Lifecycle.WAITING
    #: The counters (the backend's ``stats_type``).
    stats: Any = None
    #: The class's own per-device object (``open_device``).
    extra: Any = None
    #: What a hot swap carried for this device (:meth:`BackendBase.restore_device`), for
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


B = TypeVar("B", bound=BaseDevice)


class BackendBase(Generic[B]):
    """The base (module docstring)."""

    #: The class served (devices/): its region's geometry, its fault class.
    device_class: ClassVar[DeviceClass]
    #: What a device is in this backend: a subclass of :class:`BaseDevice` (``B``).
    device_type: ClassVar[type[BaseDevice]] = BaseDevice
    #: A device's counters: a dataclass of integers.
    stats_type: ClassVar[type[Any]]
    #: States of the same kind can be restored by each other's implementations.
    state_kind: ClassVar[str]
    state_version: ClassVar[int] = 1
    #: Does a device's saved state carry its counters (``data`` is then ``{"stats": ...,
    #: "class": device_data}``)?  If not, they restart with each instance and ``data`` is
    #: :meth:`device_data` itself.
    carry_counters: ClassVar[bool] = True
    #: Option name -> help, for the "unknown option" message (extend, don't replace).
    OPTIONS: ClassVar[dict[str, str]] = {}
    #: The counters (``stats_type`` fields) :meth:`statistics` reports in total ...
    STATISTICS: ClassVar[tuple[str, ...]] = ()
    #: ... and per device, as ``<domain>/<vdev>.<counter>``.
    DEVICE_STATISTICS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, host: Host, options: dict[str, Any]) -> None:
        if not isinstance(options, dict):
            raise TypeError(f"backend options must be a mapping, got {type(options).__name__}")
        implementation: str = (
            getattr(host, "implementation", None)
            or f"{type(self).__module__}:{type(self).__qualname__}"
        )
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            named = []
            for k in unknown:
                near = difflib.get_close_matches(str(k), list(self.OPTIONS), n=1)
                named.append(f"{k} (did you mean {near[0]}?)" if near else str(k))
            raise ValueError(
                f"unknown {fault_classes()[self.device_class.name].driver} backend option(s) "
                f"{', '.join(named)}; allowed: {', '.join(self.OPTIONS)} (what each does: "
                f"the OPTIONS of {implementation})"
            )
        self.host = host
        self.log = host.log
        self.options = dict(options)
        self.implementation = implementation
        self.devices: dict[int, B] = {}
        #: Per-device data restored (hot swap) and not attached yet, by key.
        self._restored: dict[int, DeviceState] = {}
        self.injector = Injector(fclass=fault_classes()[self.device_class.name])
        self.setup(options)
        self.configure(options)

    # -- what a family of classes writes (DeviceBackend) -----------------------------------------
    def setup(self, options: dict[str, Any]) -> None:
        """Read the options of a family of classes (a base like DeviceBackend), before the
        class's own :meth:`configure`."""

    def check_attach(self, a: Attach) -> str | None:
        """What is wrong with the attach message itself, checked before the segment is
        mapped (e.g. a name the class cannot use), or None.  The default: nothing."""
        return None

    def check_region(self, a: Attach, segment: Segment) -> str | None:
        """What is wrong with the region's geometry (``a.window``, ``a.inflight_offset`` in
        ``segment``), or None.  The default: the class's window, inside the segment."""
        r = self.device_class.region
        if a.window != r.window or a.window > segment.size:
            return (
                f"window {a.window:#x} is not the {self.device_class.noun}'s "
                f"{r.window:#x} bytes inside segment {a.segment} of {segment.size:#x}"
            )
        return None

    def connect(self, d: B, *, resume: bool) -> None:
        """The frontend is ready (``resume``: it was connected to a predecessor): take the
        region's rings, publish Connected (:meth:`connected`) and serve."""
        raise NotImplementedError

    def service(self, d: B) -> None:
        """The guest kicked a connected device: serve it."""
        raise NotImplementedError

    def disconnect(self, d: B) -> None:
        """The device is no longer served (closed, broken, released): let go of its rings."""

    def hand_over(self, d: B) -> None:
        """The device is let go for the next instance (:meth:`suspend`), which takes its rings
        over from the region as they are: nothing is to be answered or given up on the way.
        The default: :meth:`disconnect`."""
        self.disconnect(d)

    def attached(self, d: B) -> None:
        """``d`` is attached and InitWait published (start what serves every device, e.g. the
        network's uplink).  The default does nothing."""

    def wrong_class(self, cls: str) -> str:
        """Why an attach message naming device class ``cls`` (not this backend's) is refused."""
        return (
            f"attach field 'class' is {cls!r}: this driver "
            f"serves {self.device_class.name!r} devices only"
        )

    def summary(self, d: B) -> str:
        """A device's counters in a few words, for the detach log line."""
        return ", ".join(f"{getattr(d.stats, n)} {n}" for n in self.DEVICE_STATISTICS)

    # -- what a class writes ---------------------------------------------------------------------
    def configure(self, options: dict[str, Any]) -> None:
        """Read the class's own options (listed in ``OPTIONS``); ValueError if one is bad."""

    def open_device(self, d: B) -> None:
        """Set up ``d.extra`` (or the fields of ``device_type``) and check the class's attach
        fields (``d.attach.body``; ``d.saved``: what a hot swap carried); ValueError refuses
        the device with its message."""

    def close_device(self, d: B, *, handover: bool) -> None:
        """Release what :meth:`open_device` set up.  ``handover``: the next implementation of
        a hot swap takes the device over from the state just saved; else it goes for good."""

    def device_data(self, d: B) -> dict[str, Any]:
        """What ``d`` carries to the next implementation (msgpack-able)."""
        return {}

    def restore_data(self, d: B, data: dict[str, Any]) -> None:
        """Take over what :meth:`device_data` saved (StateError if it is malformed)."""

    def device_media(self, d: B) -> tuple[Medium, Medium]:
        """(``home``, ``medium``) of ``d``'s saved state: where its data belongs and where it
        is now.  The default, for a class with no medium: the device's memory name, twice."""
        here = Medium("memory", d.attach.scratch or d.attach.segment)
        return here, here

    def restore_device(self, saved: DeviceState) -> DeviceState:
        """Take a device over from the state a hot swap restores (before the kernel attaches
        it again: then ``d.saved``); return it as it is now (a class with a medium may move
        the data).  The default takes it as it is."""
        return saved

    def drain(self, d: B, *, detaching: bool) -> None:
        """``d``, still connected, is about to stop being served: its frontend closes
        (``detaching`` False) or the kernel detaches it (True).  Do the last work its region
        asks for (the console takes the domain's last output).  The default does nothing."""

    def carries(self, d: B) -> bool:
        """Does attached device ``d`` go into the saved state?  The default: every one."""
        return True

    def backend_data(self) -> dict[str, Any]:
        """Backend-wide data for the next implementation (the saved state's ``data``)."""
        return {}

    def restore_backend_data(self, data: dict[str, Any]) -> None:
        """Take over what :meth:`backend_data` saved (StateError if it is malformed)."""

    def backend_statistics(self) -> dict[str, int | float | str]:
        """Backend-wide values :meth:`statistics` reports after the totals, before each
        device's counters.  The default: none."""
        return {}

    def statistics_label(self, d: B) -> str:
        """How :meth:`statistics` names ``d``'s counters (``<name>.<counter>``; devices in
        the order of these names).  The default: its label, ``<domain>/<vdev>``."""
        return d.label

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
            self._refuse(a.key, a.store, self.wrong_class(a.cls))
            return
        problem = self.check_attach(a)
        if problem is not None:
            self._refuse(a.key, a.store, problem)
            return
        try:
            segment = self.map_segment(a)
        except (SegmentError, OSError, ValueError) as e:
            self._refuse(a.key, a.store, f"cannot map device segment {a.segment}: {e}")
            return
        problem = self.check_region(a, segment)
        if problem is not None:
            segment.close()
            self._refuse(a.key, a.store, problem)
            return
        mem = memoryview(segment.buf)
        d = cast(B, self.device_type(a, segment, mem, mem[: a.window]))
        if d.stats is None:
            d.stats = self.stats_type()
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
            "%s %d (%s) attached (region mapped from %s), waiting for the frontend",
            self.device_class.noun,
            a.key,
            a.label,
            "its descriptor" if "segment_fd" in dev else f"/dev/shm/{a.segment}",
        )
        self.attached(d)

    @staticmethod
    def map_segment(a: Attach) -> Segment:
        """Map the device's region: from the descriptor the host put in the attach
        (``segment_fd``: it came with the doorbells, and the host closes it after
        :meth:`attach`), else, from a kernel that handed none (no doorbell connection: an
        inline driver without one, a ``tcp://`` or ``inproc://`` endpoint), by its name under
        /dev/shm."""
        fd = a.body.get("segment_fd")
        if fd is None:
            return Segment(a.segment, 0, create=False)
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
            raise ValueError(f"attach field 'segment_fd' is {fd!r:.60}, expected a descriptor")
        return Segment.from_fd(fd, a.segment)

    def detach(self, key: int) -> None:
        d = self.devices.pop(key, None)
        if d is None:
            self.log.warning("detach of unknown device %d", key)
            return
        if d.state is Lifecycle.CONNECTED:
            self.drain(d, detaching=True)
        self.log.info("device %d (%s) detached: %s", key, d.label, self.summary(d))
        self._close(d)

    def fe_state(self, key: int, state: int) -> None:
        d = self.devices.get(key)
        if d is None:
            self.log.warning("frontend state %d for unknown device %d", state, key)
            return
        if d.state is Lifecycle.BROKEN:
            return
        if state == DevState.INITIALISED:
            self.connect(d, resume=False)
        elif state == DevState.CONNECTED and d.state is Lifecycle.WAITING:
            # A new instance learns the frontend is connected already: resume the ring,
            # redoing what the in-flight log says was unfinished.
            self.connect(d, resume=True)
        elif state in (DevState.CLOSING, DevState.CLOSED) and d.state is not Lifecycle.CLOSED:
            if d.state is Lifecycle.CONNECTED:
                self.drain(d, detaching=False)
            d.state = Lifecycle.CLOSED
            self.disconnect(d)
            self.host.store_write(f"{d.attach.store}/state", str(int(DevState.CLOSED)))
            self.log.info("device %d (%s): frontend closed", key, d.label)

    def kick(self, key: int) -> None:
        d = self.devices.get(key)
        if d is None:
            self.log.debug("kick for unknown device %d", key)
        elif d.state is Lifecycle.CONNECTED:
            self.service(d)

    def close(self) -> None:
        for key in list(self.devices):
            self.detach(key)
        self._restored.clear()

    def connected(self, d: B, *, resume: bool, detail: str = "") -> None:
        """Publish Connected (from :meth:`connect`) and log it (``detail``: what the class
        adds, e.g. the requests it redoes)."""
        d.state = Lifecycle.CONNECTED
        self.host.store_write(f"{d.attach.store}/state", str(int(DevState.CONNECTED)))
        self.log.info(
            "%s %d (%s): %s%s",
            self.device_class.noun,
            d.key,
            d.label,
            "resumed" if resume else "connected",
            detail,
        )

    def _break(self, d: B, message: str) -> None:
        """The guest broke the protocol: no longer served, and the kernel told (``fault``)."""
        d.state = Lifecycle.BROKEN
        self.disconnect(d)
        self.host.fault(d.key, message)

    def _refuse(self, key: object, store: object, message: str) -> None:
        refuse(self.host, self.log, self.device_class.noun, key, store, message)

    def _close(self, d: B, *, handover: bool = False) -> None:
        d.state = Lifecycle.CLOSED
        if handover:
            self.hand_over(d)
        else:
            self.disconnect(d)
        try:
            self.close_device(d, handover=handover)
        finally:
            self._release(d)

    def _release(self, d: BaseDevice) -> None:
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
        self.faults_changed()

    def faults_changed(self) -> None:
        """The armed faults changed (the data path may choose its injecting variant)."""

    # -- statistics ----------------------------------------------------------------------------
    def statistics(self) -> dict[str, int | float | str]:
        """``devices``, the ``STATISTICS`` in total, the :meth:`backend_statistics`, then the
        ``DEVICE_STATISTICS`` of each device (the host reports the first 64 values)."""
        named = sorted(
            ((self.statistics_label(d), d) for d in self.devices.values()), key=lambda t: t[0]
        )
        out: dict[str, int | float | str] = {"devices": len(named)}
        for name in self.STATISTICS:
            values = [getattr(d.stats, name) for _, d in named]
            out[name] = max(values, default=0) if name.startswith("peak") else sum(values)
        out.update(self.backend_statistics())
        for label, d in named:
            for name in self.DEVICE_STATISTICS:
                out[f"{label}.{name}"] = getattr(d.stats, name)
        return out

    # -- hot swap: the state contract (drivers/state.py) ---------------------------------------
    def save(self) -> BackendState:
        """Every device attached (whatever its frontend's state: its data may be in its
        medium) with its media (:meth:`device_media`), its counters (``carry_counters``) and
        the class's data (:meth:`device_data`), those :meth:`carries` says go; those
        restored, not attached again yet, passed on as they are; and the backend's own data
        (:meth:`backend_data`)."""
        out = dict(self._restored)
        for d in self.devices.values():
            if not self.carries(d):
                continue
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
            self.backend_data(),
        )

    def suspend(self) -> None:
        """Let every device go for the next implementation; what its region holds stays in the
        segment, and what the guests queue meanwhile waits there."""
        for key in list(self.devices):
            self._close(self.devices.pop(key), handover=True)
        self.log.info("suspended: every device released for the next implementation")

    @classmethod
    def upgrade_state(cls, state: BackendState) -> BackendState:
        raise StateError(
            f"{cls.__name__} (state version {cls.state_version}) has no "
            f"upgrade_state hook for version {state.version} states"
        )

    def accepted(self, state: BackendState) -> BackendState:
        """``state``, if this implementation can take it over (its kind, its version or one
        :meth:`upgrade_state` upgrades): StateError otherwise."""
        return accept(
            state,
            kind=self.state_kind,
            version=self.state_version,
            who=self.implementation,
            upgrade=type(self).upgrade_state,
        )

    def restore(self, state: BackendState) -> None:
        """Take over from ``state`` (StateError if it cannot): each device checked and taken
        over (:meth:`restore_device`) now, and its data applied when the kernel attaches it
        again."""
        state = self.accepted(state)
        restored = {dev.key: self.restore_device(self._checked(dev)) for dev in state.devices}
        self.restore_backend_data(state.data)
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
        for f in fields(self.stats_type):
            v = stats.get(f.name, 0)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise StateError(
                    f"{where}: data.stats.{f.name} must be an integer >= 0, got {v!r:.40}"
                )
        return dev

    def _restore_device(self, d: B) -> None:
        assert d.saved is not None
        data = d.saved.data
        if self.carry_counters:
            stats = data.get("stats", {})
            for f in fields(self.stats_type):
                setattr(d.stats, f.name, stats.get(f.name, 0))
            data = data.get("class", {})
        self.restore_data(d, data)


__all__ = ["Attach", "BackendBase", "BaseDevice", "Lifecycle", "StopServing"]
