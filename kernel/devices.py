"""Split devices: regions, ports, store nodes, and the messages to and from their drivers.

For each ``disk`` and ``vif`` of a domain, and for its console if a console driver serves it,
the kernel creates a *device region* (a shared-memory segment of its own), maps its window into
the guest's physical address space, gives it an event-channel port, writes the device-table
entry and the store directories, and sends the driver an ``attach`` naming that segment.  The
driver is never told anything else about the guest.  ``docs/devices.md`` is the reference;
``kernel/failover.py`` adds what driver recovery needs (``docs/recovery.md``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import devices
from devices import DeviceClass, DeviceSpec, Medium
from ipc import doorbell, iotrace
from ipc.control import ControlError
from ipc.iotrace import Stage
from ipc.shm import SHM_DIR, Segment, SegmentError
from ipc.store import DevState, Store, StoreError, Watch
from kernel import abi
from kernel.diskcopy import BLOCK, DiskCopy, DiskCopyError
from kernel.domain import Domain, Emit, Exit
from kernel.drivers import DriverHub, DriverLink, Malformed
from kernel.failover import Hold, Recovery, outstanding, ring_indices
from kernel.swap import Swaps

if TYPE_CHECKING:
    from kernel.scheduler import Scheduler

log = logging.getLogger("isovisor.kernel")

_STATE_NAMES: Final = {int(s): s.name.lower() for s in DevState}
#: Seconds between two ``["report"]`` (statistics) requests to each driver that offers them.
REPORT_S: Final = 1.0
#: Device classes whose devices a save or a migration can carry: their state is the rings and
#: the in-flight log (or journal) in the region, plus, for a disk, the image, which both stacks
#: see, by reference; a console's output goes on in the log of whichever stack runs it.
MOVABLE_CLASSES: Final = ("vbd", "vif", "rng", "console")
#: The most data of one memory disk a snapshot carries (its ``devices`` section is one
#: msgpack map of at most snapfile.MAX_META bytes).
MAX_MEDIUM_BYTES: Final = 48 << 20
#: How long a driver has to confirm it let a device go for a save or a migration.
RELEASE_TIMEOUT_S: Final = 5.0
#: Characters kept of a driver's ``statistics()`` error (``["statistics", {..., error}]``).
STATISTICS_ERROR_MAX: Final = 1000


@dataclass(eq=False)
class Device:
    key: int
    dom: Domain
    spec: DeviceSpec
    index: int
    segment: Segment
    #: A shared-memory file reserved for the device besides its region (a memory disk).
    medium: Medium | None
    cls: DeviceClass
    kicks: int = 0
    notifies: int = 0
    faults: int = 0
    failed_requests: int = 0  # answered with an error by the kernel (driver failing)
    watches: list[Watch] = field(default_factory=list)
    gone: bool = False
    #: connect() has run: a new driver instance must be sent ``attach`` for it.
    announced: bool = False
    #: The driver reported the guest's ring broken (the guest is being crashed).
    broken: bool = False
    #: Its frontend holds bad responses for the next driver instance to redo (failover.Hold).
    hold: Hold | None = None
    #: Detached from its driver for a save or a migration (the ring left as it is): removing
    #: the device then sends no second ``detach``.
    released: bool = False
    #: The request-timeout check: rsp_prod last seen, and when it last moved.
    progress_rsp: int | None = None
    progress_at: float = 0.0
    #: Held by whoever reads or writes the ring or the in-flight log from the kernel, and by
    #: remove() while the segment goes away.
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: The doorbells (ipc/doorbell.py): rung by the kernel on a kick, and by the driver.
    kick_fd: int = -1
    notify_fd: int = -1
    #: A descriptor on the segment, handed to the driver with the doorbells (it maps the
    #: region from it and never opens the segment by name).
    segment_fd: int = -1

    @property
    def port(self) -> int:
        return self.index + 1

    @property
    def gpa(self) -> int:
        return abi.DEVICE_REGION_BASE + self.index * abi.DEVICE_REGION_STRIDE

    @property
    def window(self) -> int:
        return self.cls.region.window

    @property
    def fe_dir(self) -> str:
        return f"/local/domain/{self.dom.domid}/device/{self.cls.name}/{self.spec.devid}"

    @property
    def be_dir(self) -> str:
        return f"/driver/{self.spec.backend}/{self.cls.name}/{self.dom.domid}/{self.spec.devid}"

    @property
    def kind_word(self) -> str:
        """ "block device", "network interface", "console", ..., for messages."""
        return self.cls.noun

    @property
    def label(self) -> str:
        return f"{self.dom.name}/{self.spec.vdev}"

    @property
    def scratch(self) -> str:
        """A memory-disk name reserved for the backend's own use (e.g. a copy of the disk in
        memory); the kernel removes it with the device."""
        return f"{self.segment.name}.scratch"

    def attach_message(self) -> list[Any]:
        s = self.spec
        body: dict[str, Any] = {
            "key": self.key,
            "domid": self.dom.domid,
            "domain": self.dom.name,
            "vdev": s.vdev,
            "devid": s.devid,
            "segment": self.segment.name,
            "window": self.window,
            "inflight_offset": self.cls.region.inflight_offset,
            "store": self.be_dir,
            "scratch": self.scratch,
            "class": self.cls.name,
            **self.cls.attach_body(s, self.medium),
        }
        return ["attach", body]

    def indices(self) -> tuple[int, int]:
        """(req_prod, rsp_prod) of the ring now; (0, 0) once the device is gone."""
        with self.lock:
            if self.gone:
                return 0, 0
            try:
                return ring_indices(self.segment.buf)  # the request (tx) ring: offset 0
            except (SegmentError, ValueError):
                return 0, 0

    def requests(self) -> int:
        """Requests the guest has published (its req_prod), for statistics only."""
        return self.indices()[0]


class DeviceManager:
    """All devices of all domains, the store, and the driver hub's message handlers."""

    def __init__(
        self, *, sched: Scheduler, emit: Emit, shm_prefix: str, hub: DriverHub, store: Store
    ) -> None:
        self.sched = sched
        self.emit = emit
        self.shm_prefix = shm_prefix
        self.hub = hub
        self.store = store
        self.devices: dict[int, Device] = {}
        self._keys = itertools.count(1)
        self._lock = threading.Lock()
        self.recovery = Recovery(self)
        self.swaps = Swaps(self)
        self.recovery.quiet = self.swaps.quiet
        self.recovery.on_replayed = self.swaps.on_replayed
        self._next_report = 0.0
        self._syncs: dict[int, threading.Event] = {}
        self._sync_ids = itertools.count(1)
        hub.on_notify = self.on_doorbell
        hub.bells_of = self._bells_of
        # idle pCPUs take notify doorbells themselves (kernel/scheduler.py, "Idle pCPUs")
        hub.before_watch = sched.watch_fd
        hub.before_close = sched.unwatch_fd
        sched.on_ready_fd = hub.take_notify

    # -- lookups for the recovery code (any thread) ---------------------------------------------
    def snapshot(self) -> list[Device]:
        """Every device now, in creation order."""
        with self._lock:
            return list(self.devices.values())

    def device_of(self, key: Any, kind: str) -> Device | None:
        """The live device a driver message names, or None (logged at debug level)."""
        return self._device(key, kind)

    def frontend_state(self, dev: Device) -> int:
        return _int(self.store.read(f"{dev.fe_dir}/state", default="0"))

    def disk_sectors(self, dev: Device) -> int:
        return _int(self.store.read(f"{dev.be_dir}/sectors", default="0"))

    @staticmethod
    def ring_indices(dev: Device) -> tuple[int, int]:
        return dev.indices()

    # -- creation (control thread, before the domain first runs) ---------------------------------
    def check_backends(self, specs: tuple[DeviceSpec, ...], where: str) -> None:
        """Every device names a connected driver; a vif's MAC is not taken on its bridge."""
        if len(specs) > abi.SI_MAX_DEVICES:
            raise ControlError(
                f"{where}: {len(specs)} devices (disks, vifs and a console "
                f"together); a domain has at most {abi.SI_MAX_DEVICES}"
            )
        for d in specs:
            cls = devices.of_spec(d)
            what = cls.what(d)
            if d.backend not in self.hub.links:
                known = ", ".join(sorted(self.hub.links)) or "none"
                raise ControlError(
                    f"{where}: {what} uses backend {d.backend!r}, which is not running "
                    f"(connected drivers: {known}); declare [driver.{d.backend}] in "
                    "supervisor.toml or fix backend="
                )
            for o in self.snapshot():
                why = None if o.gone else cls.conflict(d, o.spec, o.dom.name)
                if why is not None:
                    raise ControlError(f"{where}: {why}")

    def create(self, dom: Domain) -> None:
        """Create, map and announce every disk and vif of ``dom``; on failure undo all of it."""
        made: list[Device] = []
        specs = device_specs(dom.config)
        try:
            for i, spec in enumerate(specs):
                cls = devices.of_spec(spec)
                name = f"{self.shm_prefix}dom{dom.domid}.{spec.vdev}"
                seg = Segment(name, cls.region.segment_bytes, create=True)
                dev = Device(next(self._keys), dom, spec, i, seg, cls.medium(spec, name), cls)
                made.append(dev)
                dev.kick_fd, dev.notify_fd = doorbell.make(), doorbell.make()
                dev.segment_fd = seg.open_fd()
                dom.vcpu.map_region(dev.gpa, dev.window, seg.address)
                self._write_table_entry(dom, dev)
            dom.mem.words[(abi.START_INFO_ADDR + abi.SI_NR_DEVICES) // 8] = len(made)
        except (SegmentError, OSError) as e:
            dom.vcpu.close()  # unicorn must not map a segment that is being freed
            for dev in made:
                self._free(dev)
            raise ControlError(f"cannot create the devices of domain {dom.name!r}: {e}") from None
        dom.devices = {d.port: d for d in made}
        dom.device_manager = self
        with self._lock:
            for d in made:
                self.devices[d.key] = d
        for d in made:
            self.hub.watch_notify(d.notify_fd, d.key)

    def connect(self, dom: Domain, frontends: dict[str, dict[str, str]] | None = None) -> None:
        """Write the store directories, watch both states and send the drivers ``attach``.
        ``frontends`` (a restore): what each frontend had written, by vdev; its driver then
        finds it connected and resumes the ring, as after a driver's crash."""
        for dev in dom.devices.values():
            dev.announced = True  # from now on a new driver instance gets it attached too
            st = self.store
            fresh = _store_nodes(dev)
            for k, v in fresh:
                st.write(k, v)
            ours = {k for k, _ in fresh if k != f"{dev.fe_dir}/state"}
            for rel, v in (frontends or {}).get(dev.spec.vdev, {}).items():
                if f"{dev.fe_dir}/{rel}" not in ours:
                    st.write(f"{dev.fe_dir}/{rel}", v)
            attach = dev.attach_message()
            if frontends is not None:  # it moved here: a vif tells the network (docs/net.md)
                attach[1]["announce"] = True
            if not self.hub.send_control(dev.spec.backend, attach):
                log.warning(
                    "device %s: driver %s did not take the attach message",
                    dev.label,
                    dev.spec.backend,
                )
            dev.watches.append(
                st.watch(f"{dev.be_dir}/state", f"be:{dev.key}", self._be_state_changed)
            )
            dev.watches.append(
                st.watch(f"{dev.fe_dir}/state", f"fe:{dev.key}", self._fe_state_changed)
            )

    def _write_table_entry(self, dom: Domain, dev: Device) -> None:
        base = abi.START_INFO_ADDR + abi.SI_DEVICES + dev.index * abi.DEV_ENTRY_SIZE
        w = dom.mem.words
        for off, val in (
            (abi.DE_KIND, dev.cls.kind),
            (abi.DE_DEVID, dev.spec.devid),
            (abi.DE_PORT, dev.port),
            (abi.DE_REGION, dev.gpa),
            (abi.DE_REGION_SIZE, dev.window),
        ):
            w[(base + off) // 8] = val
        dom.mem.write(base + abi.DE_NAME, dev.spec.vdev.encode() + b"\0")

    # -- removal (the thread that frees the domain) ---------------------------------------------
    def remove(self, dom: Domain) -> None:
        """Detach and free every device of ``dom``; its vCPU must already be closed."""
        for dev in list(dom.devices.values()):
            with dev.lock:  # no kernel-side ring access is under way, and none starts
                dev.gone = True
            self.recovery.device_removed(dev)
            for w in dev.watches:
                with contextlib.suppress(StoreError):
                    self.store.unwatch(w)
            if dev.announced and not dev.released:
                self.hub.send_control(dev.spec.backend, ["detach", dev.key])
            for d in (dev.fe_dir, dev.be_dir):
                with contextlib.suppress(StoreError):
                    self.store.rm(d)
            with self._lock:
                self.devices.pop(dev.key, None)
            self._free(dev)
        with contextlib.suppress(StoreError):
            self.store.rm(f"/local/domain/{dom.domid}")

    def _free(self, dev: Device) -> None:
        self.hub.close_bells([fd for fd in (dev.kick_fd, dev.notify_fd, dev.segment_fd) if fd >= 0])
        dev.kick_fd = dev.notify_fd = dev.segment_fd = -1
        scratch = dev.scratch
        dev.segment.close()
        dev.segment.unlink()
        (SHM_DIR / scratch).unlink(missing_ok=True)
        for side in SHM_DIR.glob(f"{scratch}.*"):  # the driver's dirty map and side files
            side.unlink(missing_ok=True)
        if dev.medium is not None:
            (SHM_DIR / dev.medium.name).unlink(missing_ok=True)

    # -- save, restore, migration (control or migration thread; the domain is paused) -----------
    def check_movable(self, dom: Domain, what: str, *, copies: bool = False) -> None:
        """ControlError unless every device of ``dom`` can be carried by a save or migration
        (``copies``: a migration --with-disks, which carries a memory disk's data too)."""
        for dev in dom.devices.values():
            if dev.cls.name not in MOVABLE_CLASSES:
                raise ControlError(
                    f"domain {dom.name!r}: {dev.kind_word} {dev.spec.vdev} cannot be {what} "
                    f"yet (devices of class {', '.join(MOVABLE_CLASSES)} can)"
                )
            if dev.medium is not None and not copies:
                how = "without --with-disks" if what == "migrated" else "yet"
                raise ControlError(
                    f"domain {dom.name!r}: {dev.kind_word} {dev.spec.vdev} is a memory disk, "
                    f"whose data lives in this stack only; it cannot be {what} {how}"
                )
            name = dev.spec.backend
            if name not in self.hub.links or name in self.recovery.failing:
                raise ControlError(
                    f"domain {dom.name!r}: driver {name} of {dev.spec.vdev} is not serving "
                    "(recovering or failed); try again once `isovisor status` shows it RUNNING"
                )

    def release(self, dom: Domain) -> None:
        """Have the drivers let the devices of paused ``dom`` go, leaving their rings and
        in-flight logs as they are, and wait until each driver confirms."""
        devs = list(dom.devices.values())
        for dev in devs:
            dev.released = True
            self.hub.send_control(dev.spec.backend, ["detach", dev.key])
        for name in sorted({d.spec.backend for d in devs}):
            if not self._sync(name, RELEASE_TIMEOUT_S):
                self.reattach(dom)
                raise ControlError(
                    f"driver {name} did not confirm within {RELEASE_TIMEOUT_S:g}s that it let "
                    f"the devices of domain {dom.name!r} go (a hot swap or a recovery under "
                    "way?); nothing was saved"
                )

    def start_copies(self, dom: Domain) -> list[DiskCopy]:
        """A migration copies ``dom``'s disks along (``--with-disks``: file images, and memory
        disks' shared-memory files): have each disk's driver mark its writes in a write map
        from now on and wait until it confirms, then open the data and the map.  ControlError
        naming the disk if a driver cannot."""
        copies: list[DiskCopy] = []
        try:
            for dev in sorted(dom.devices.values(), key=lambda d: d.index):
                if dev.medium is not None:  # a memory disk: its data is the medium file
                    target = str(SHM_DIR / dev.medium.name)
                else:
                    image = dev.cls.image(dev.spec)
                    if image is None:
                        continue
                    target = image
                copy = DiskCopy(
                    dev.spec.vdev,
                    target,
                    SHM_DIR / f"{dev.scratch}.mirror",
                    memory=dev.medium is not None,
                )
                copies.append(copy)
                self.hub.send_control(dev.spec.backend, ["mirror", dev.key, True])
                if not self._sync(dev.spec.backend, RELEASE_TIMEOUT_S):
                    raise ControlError(
                        f"driver {dev.spec.backend} did not confirm within "
                        f"{RELEASE_TIMEOUT_S:g}s that it marks the writes of disk "
                        f"{dev.spec.vdev}"
                    )
                said = self.store.read(f"{dev.be_dir}/mirror", default="")
                if said != "on":
                    raise ControlError(
                        f"disk {dev.spec.vdev} cannot be copied along: driver "
                        f"{dev.spec.backend} says {said or 'nothing'!r}"
                    )
                copy.open_map()
        except (ControlError, DiskCopyError) as e:
            self.stop_copies(dom, copies)
            raise ControlError(str(e)) from None
        return copies

    def stop_copies(self, dom: Domain, copies: list[DiskCopy]) -> None:
        """The copies are over (the migration failed: the guest runs on here): the drivers
        stop marking and remove the maps."""
        by_vdev = {d.spec.vdev: d for d in dom.devices.values()}
        for copy in copies:
            copy.close()
            dev = by_vdev.get(copy.vdev)
            if dev is not None and not dev.gone:
                self.hub.send_control(dev.spec.backend, ["mirror", dev.key, False])

    def reattach(self, dom: Domain) -> None:
        """Give released devices back to their drivers (a checkpoint, or a failed save or
        migration): they find the frontends connected and resume the rings."""
        devs = [d for d in dom.devices.values() if d.released]
        for dev in devs:
            dev.released = False
            self.hub.send_control(dev.spec.backend, dev.attach_message())
        for dev in devs:
            fe = self.frontend_state(dev)
            if fe > int(DevState.INITIALISING):
                self.hub.send_control(dev.spec.backend, ["fe_state", dev.key, fe])

    def _sync(self, name: str, timeout: float) -> bool:
        """Send driver ``name`` a ``sync`` and wait for its answer: every message sent it
        before has been handled."""
        token = next(self._sync_ids)
        ev = self._syncs[token] = threading.Event()
        try:
            if not self.hub.send_control(name, ["sync", token]):
                return False
            return ev.wait(timeout)
        finally:
            self._syncs.pop(token, None)

    def device_sections(self, dom: Domain, *, media: bool = False) -> list[dict[str, Any]]:
        """Each device's region (rings and in-flight log) and its frontend's store nodes;
        with ``media`` (a save) also a memory disk's data: its size, and the runs of 4 KiB
        blocks that hold something with their bytes.  ControlError if that is more than
        :data:`MAX_MEDIUM_BYTES`."""
        out = []
        for dev in sorted(dom.devices.values(), key=lambda d: d.index):
            medium = None
            if media and dev.medium is not None:
                medium = _medium_section(dom, dev)
            nodes = {}
            with contextlib.suppress(StoreError):
                nodes = self.store.snapshot(dev.fe_dir)
            out.append(
                {
                    "class": dev.cls.name,
                    "vdev": dev.spec.vdev,
                    "region": bytes(dev.segment.buf[: dev.cls.region.segment_bytes]),
                    "frontend": {
                        p[len(dev.fe_dir) + 1 :]: v
                        for p, v in nodes.items()
                        if p.startswith(dev.fe_dir + "/")
                    },
                    **({"medium": medium} if medium is not None else {}),
                }
            )
        return out

    @staticmethod
    def load_regions(dom: Domain, saved: list[dict[str, Any]]) -> None:
        """Copy saved regions into the new devices' segments, and a saved memory disk's data
        into its medium file (before they are connected: the driver opens it as it is)."""
        by_vdev = {d["vdev"]: d for d in saved}
        for dev in dom.devices.values():
            entry = by_vdev[dev.spec.vdev]
            region = entry["region"]
            dev.segment.buf[: len(region)] = region
            medium = entry.get("medium")
            if medium is not None and dev.medium is not None:
                fd = os.open(
                    SHM_DIR / dev.medium.name, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                )
                try:
                    os.ftruncate(fd, medium["bytes"])
                    data, off = memoryview(medium["data"]), 0
                    for first, count in medium["runs"]:
                        n = min(count * BLOCK, len(data) - off)
                        os.pwrite(fd, data[off : off + n], first * BLOCK)
                        off += n
                finally:
                    os.close(fd)

    @staticmethod
    def load_media(dom: Domain, media: dict[str, Path]) -> None:
        """Put received disk data in place as the new devices' media (a memory disk copied
        along with a migration), before their drivers open them."""
        for dev in dom.devices.values():
            path = media.get(dev.spec.vdev)
            if path is not None and dev.medium is not None:
                os.replace(path, SHM_DIR / dev.medium.name)

    # -- watches ---------------------------------------------------------------------------------
    def _be_state_changed(self, path: str, token: str) -> None:
        dev = self._by_token(token)
        if dev is None or not path.endswith("/state"):
            return
        state = self.store.read(path, default="")
        self.emit(
            f"device.{dev.dom.name}.{dev.spec.vdev}.state",
            {
                "domid": dev.dom.domid,
                "end": "backend",
                "state": _STATE_NAMES.get(_int(state), state),
            },
        )
        self.sched.notify(dev.dom, 1 << dev.port)  # the frontend waits on its port

    def _fe_state_changed(self, path: str, token: str) -> None:
        dev = self._by_token(token)
        if dev is None or not path.endswith("/state"):
            return
        state = _int(self.store.read(path, default=""))
        if state > int(DevState.INITIALISING):
            self.emit(
                f"device.{dev.dom.name}.{dev.spec.vdev}.state",
                {
                    "domid": dev.dom.domid,
                    "end": "frontend",
                    "state": _STATE_NAMES.get(state, str(state)),
                },
            )
            self.hub.send_control(dev.spec.backend, ["fe_state", dev.key, state])

    def _by_token(self, token: str) -> Device | None:
        dev = self.devices.get(_int(token.partition(":")[2]))
        return None if dev is None or dev.gone else dev

    # -- guest side (pCPU thread of the domain) -----------------------------------------------
    def kick(self, dev: Device) -> int:
        """HC_EVTCHN_SEND on a device's port.  While its driver fails, the kernel answers the
        ring itself; while the driver is being replaced the kick is dropped (the new instance
        re-reads every ring); -ENOTCONN only for a driver that never connected."""
        dev.kicks += 1
        backend = dev.spec.backend
        if backend in self.recovery.failing:
            self.recovery.answer(dev)
            return 0
        if iotrace.ON:
            iotrace.mark(Stage.KICK, dev.key)
        sent = self.hub.kick(backend, dev.key, dev.kick_fd)
        if iotrace.ON:
            iotrace.mark(Stage.KICKED, dev.key)
        if sent or backend in self.hub.known:
            return 0
        return -abi.ENOTCONN

    def guest_may_read(self, dom: Domain, path: str) -> bool:
        """Its home, and the backend directory of each of its devices."""
        roots = [f"/local/domain/{dom.domid}", *(d.be_dir for d in dom.devices.values())]
        return any(path == r or path.startswith(r + "/") for r in roots)

    @staticmethod
    def guest_may_write(dom: Domain, path: str) -> bool:
        return path.startswith(f"/local/domain/{dom.domid}/device/")

    def frontend_fault(
        self, dev: Device, code: int, message: str, rsp_cons: int | None = None
    ) -> bool:
        """HC_DEVICE_FAULT: True if the frontend is to hold (see Recovery.frontend_fault)."""
        dev.faults += 1
        log.error(
            "domain %s: its frontend reports that driver %s broke the protocol on %s (code %d): %s",
            dev.dom.name,
            dev.spec.backend,
            dev.spec.vdev,
            code,
            message,
        )
        self.emit(
            f"driver.{dev.spec.backend}.fault",
            {
                "domid": dev.dom.domid,
                "domain": dev.dom.name,
                "vdev": dev.spec.vdev,
                "code": code,
                "reason": message,
                "reporter": "frontend",
            },
        )
        return self.recovery.frontend_fault(dev, code, message, rsp_cons)

    def held(self, dev: Device) -> bool:
        return self.recovery.held(dev)

    # -- driver messages (drivers thread) ----------------------------------------------------
    def on_hello(self, link: DriverLink) -> None:
        self.emit(
            f"driver.{link.name}.ready",
            {
                "pid": link.pid,
                "at_ns": time.monotonic_ns(),
                "isolation": link.isolation,
                "module": link.module,
                # kicks and notifications by eventfd (ipc/doorbell.py), not ZeroMQ messages
                "doorbells": link.bell is not None,
            },
        )
        self.swaps.on_hello(link)
        self.recovery.on_hello(link)

    def on_tick(self) -> None:
        """Periodic check (drivers thread): hung drivers, hot swaps, statistics requests."""
        self.recovery.tick()
        self.swaps.tick()
        now = time.monotonic()
        if now >= self._next_report:
            self._next_report = now + REPORT_S
            for link in list(self.hub.links.values()):
                if link.reports:
                    self.hub.send(link.name, ["report"])

    def on_message(self, msg: list[Any]) -> None:
        kind = msg[0]
        if kind == "notify" and len(msg) == 2:
            dev = self._device(msg[1], kind)
            if dev is not None:
                self._notified(dev, 1)
        elif self.recovery.handle(msg) or self.swaps.handle(msg):
            return
        elif kind == "synced" and len(msg) == 2 and isinstance(msg[1], dict):
            ev = self._syncs.get(msg[1].get("token"))  # type: ignore[arg-type]
            if ev is not None:
                ev.set()
        elif kind == "statistics" and len(msg) == 2 and isinstance(msg[1], dict):
            info = msg[1]
            link = self.hub.links.get(info.get("name"))  # type: ignore[arg-type]
            values = info.get("values")
            if link is not None and link.pid == info.get("pid") and isinstance(values, dict):
                link.statistics = {
                    str(k)[:64]: v
                    for k, v in list(values.items())[:64]
                    if isinstance(v, int | float | str)
                }
                error = info.get("error")  # statistics() failed: why (values is {})
                link.statistics_error = (
                    error[:STATISTICS_ERROR_MAX] if isinstance(error, str) else None
                )
                link.touch()
        elif kind == "store" and len(msg) == 3:
            path, value = msg[1], msg[2]
            if not (isinstance(path, str) and isinstance(value, str)):
                raise Malformed(f"store write with a non-string path or value: {msg!r:.200}")
            driver = path.split("/")[2] if path.startswith("/driver/") else ""
            if driver not in self.hub.links:
                log.warning(
                    "driver store write outside /driver/<a connected driver>/ refused: %s", path
                )
                return
            self.recovery.seen(driver)
            try:
                self.store.write(path, value)
            except StoreError as e:
                log.warning("driver %s: bad store write refused: %s", driver, e)
        elif kind in ("fault", "error") and len(msg) == 3 and isinstance(msg[2], str):
            dev = self._device(msg[1], kind)
            if dev is not None:
                self.recovery.seen(dev.spec.backend)
                self._driver_report(dev, kind, msg[2][:1000])
        else:
            raise Malformed(f"unknown or malformed message {msg!r:.200}")

    def on_doorbell(self, key: int, rings: int) -> None:
        """Device ``key``'s notify doorbell rang ``rings`` times (the drivers thread, or an
        idle pCPU thread that was waiting on the doorbell)."""
        dev = self._device(key, "notify doorbell")
        if dev is not None:
            self._notified(dev, rings)

    def _notified(self, dev: Device, rings: int) -> None:
        if iotrace.ON:
            iotrace.mark(Stage.NOTIFIED, dev.key)
        dev.notifies += rings
        self.recovery.notified(dev.spec.backend, rings)
        self.sched.notify(dev.dom, 1 << dev.port)
        if iotrace.ON:
            iotrace.mark(Stage.WOKEN, dev.key)

    def _bells_of(self, key: int) -> tuple[int, int, int] | None:
        """``(kick_fd, notify_fd, segment_fd)`` of live device ``key``, or None (drivers
        thread, which alone closes them)."""
        dev = self.devices.get(key)
        if dev is None or dev.gone or min(dev.kick_fd, dev.notify_fd, dev.segment_fd) < 0:
            return None
        return dev.kick_fd, dev.notify_fd, dev.segment_fd

    def _device(self, key: Any, kind: str) -> Device | None:
        dev = self.devices.get(key) if isinstance(key, int) and not isinstance(key, bool) else None
        if dev is None or dev.gone:
            log.debug("driver %s message for unknown device %r ignored", kind, key)
            return None
        return dev

    def _driver_report(self, dev: Device, kind: str, message: str) -> None:
        if kind == "error":  # the backend cannot serve the disk (e.g. cannot open the image)
            self.recovery.driver_error(dev)
            log.error(
                "device %s: driver %s cannot serve it: %s", dev.label, dev.spec.backend, message
            )
            self.emit(
                f"device.{dev.dom.name}.{dev.spec.vdev}.error",
                {"domid": dev.dom.domid, "driver": dev.spec.backend, "reason": message},
            )
            return
        # The driver caught the guest's frontend breaking the protocol: a guest fault.
        reason = f"{dev.kind_word} {dev.spec.vdev}: driver {dev.spec.backend} reports: {message}"
        self.recovery.driver_fault(dev)
        self.emit(
            f"device.{dev.dom.name}.{dev.spec.vdev}.fault",
            {"domid": dev.dom.domid, "driver": dev.spec.backend, "reason": message},
        )
        self.sched.request_exit(dev.dom, Exit("crash", reason))

    # -- reporting ---------------------------------------------------------------------------
    def info(self) -> list[dict[str, Any]]:
        with self._lock:
            devs = sorted(self.devices.values(), key=lambda d: (d.dom.domid, d.index))
        out = []
        for d in devs:
            req, rsp = d.indices()
            be = self.store.read(f"{d.be_dir}/state", default="0")
            fe = self.store.read(f"{d.fe_dir}/state", default="0")
            row: dict[str, Any] = {
                "class": d.cls.name,
                "domain": d.dom.name,
                "domid": d.dom.domid,
                "vdev": d.spec.vdev,
                "devid": d.spec.devid,
                "backend": d.spec.backend,
                "port": d.port,
                "frontend_state": _STATE_NAMES.get(_int(fe), fe),
                "backend_state": _STATE_NAMES.get(_int(be), be),
                "error": self.store.read(f"{d.be_dir}/error", default=""),
                "requests": req,
                "outstanding": outstanding(req, rsp, d.cls),
                "kicks": d.kicks,
                "notifies": d.notifies,
                "faults": d.faults,
                "failed_requests": d.failed_requests,
                "segment": d.segment.name,
                **d.cls.info(
                    d.spec,
                    d.medium,
                    lambda key, d=d: self.store.read(f"{d.be_dir}/{key}", default=""),
                ),
            }
            out.append(row)
        return out


def device_specs(config: Any) -> list[DeviceSpec]:
    """A domain's devices in region order: class by class as the registry lists them, each
    class's in config order."""
    order = {c.name: i for i, c in enumerate(devices.CLASSES)}
    return sorted(config.devices, key=lambda d: order[d.device_class])


def _store_nodes(dev: Device) -> list[tuple[str, str]]:
    """The frontend's and the backend's directory of a new device (XenStore's layout)."""
    s, fe, be = dev.spec, dev.fe_dir, dev.be_dir
    nodes = [
        (f"{fe}/{k}", v)
        for k, v in (
            ("backend", be),
            ("backend-id", s.backend),
            ("vdev", s.vdev),
            ("port", str(dev.port)),
            ("state", "1"),
        )
    ]
    nodes += [(f"{be}/frontend", fe), (f"{be}/frontend-id", str(dev.dom.domid))]
    fe_nodes, be_nodes = dev.cls.store_nodes(s, dev.medium)
    nodes += [(f"{fe}/{k}", v) for k, v in fe_nodes.items()]
    nodes += [(f"{be}/{k}", v) for k, v in be_nodes.items()]
    nodes.append((f"{be}/state", "1"))
    return nodes


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return -1


def _medium_section(dom: Domain, dev: Device) -> dict[str, Any]:
    """A memory disk's data for a snapshot (its driver has let it go: nothing writes it)."""
    assert dev.medium is not None
    copy = DiskCopy(dev.spec.vdev, str(SHM_DIR / dev.medium.name))
    try:
        runs, chunks, n = [], [], 0
        for first, count, data in copy.initial():
            n += len(data)
            if n > MAX_MEDIUM_BYTES:
                raise ControlError(
                    f"domain {dom.name!r}: memory disk {dev.spec.vdev} holds more than "
                    f"{MAX_MEDIUM_BYTES >> 20} MiB of data, more than a snapshot carries; "
                    "migrate it with --with-disks instead, or use a file disk"
                )
            runs.append([first, count])
            chunks.append(data)
        return {"bytes": copy.size, "runs": runs, "data": b"".join(chunks)}
    except DiskCopyError as e:
        raise ControlError(str(e)) from None
    finally:
        copy.close()
