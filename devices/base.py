"""What a device class is: the one contract the kernel, the supervisor, the CLI and the fault
tables read, so that none of them names a class.

A class (``vbd``, ``vif``, ``console``, ...) is declared once, in its own module of this package,
as a subclass of :class:`DeviceClass` with one instance registered in ``devices/__init__.py``.
The declaration holds:

* its **config**: the domain-config key (``disk``, ``vif``, ``console``), the spec type one entry
  parses to, and the parser (:meth:`DeviceClass.parse`, also used on the wire);
* its **region**: the shared-memory geometry (:class:`Region`) and what the kernel does for its
  guests while the class's driver is failed (:class:`WhileFailed`, :meth:`error_response`);
* its **attach**: the store nodes and the attach-message body a backend gets
  (:meth:`store_nodes`, :meth:`attach_body`) and what ``devices`` reports (:meth:`info`,
  :meth:`cells` for the CLI's table);
* its **faults**: the fault class (``drivers/faults.py``'s :class:`FaultClass`) and the driver
  modules known to serve it, and the ``vdev`` names a campaign filter may use.

Everything here is data and pure functions of a spec: no process, socket or segment.  That is
what lets the kernel import it (it imports no backend) and the CLI too.
"""

from __future__ import annotations

import enum
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from ipc.schema import NAME_RE  # a driver's name, as backend= gives it and [driver.<name>]
from kernel.abi import PAGE_SIZE

if TYPE_CHECKING:
    from devices.workload import Checker
    from drivers.faults import FaultClass


def pages(n: int) -> int:
    """``n`` bytes rounded up to whole pages (the guest maps regions into its physical address
    space)."""
    return -(-n // PAGE_SIZE) * PAGE_SIZE


class SpecError(ValueError):
    """A device entry of a domain config is wrong; the message names the entry, the key and
    what to write instead."""


class DeviceSpec(Protocol):
    """One device of a domain, as its config declares it (a frozen dataclass per class)."""

    #: The registry name of its class ("vbd", "vif", ...).
    device_class: ClassVar[str]

    @property
    def backend(self) -> str: ...

    @property
    def vdev(self) -> str: ...

    @property
    def devid(self) -> int: ...


class WhileFailed(enum.Enum):
    """What the kernel does for a guest's device while its driver is failed (FATAL, or between
    a crash and its replacement when requests must not wait)."""

    #: Answer every request in the ring with the class's error response (a request ring with an
    #: in-flight log at ``Region.inflight_offset``).
    ANSWER_ERRORS = "answer_errors"
    #: Take the guest's output from the byte ring into the kernel's console of the domain, so a
    #: writer never blocks (a console: no requests, only a stream).
    TAKE_OUTPUT = "take_output"


@dataclass(frozen=True)
class Region:
    """A device's shared-memory region: what the guest sees (``window``) and the whole segment
    (the window plus what only the backend and the kernel see: the in-flight log)."""

    window: int
    #: Where the request ring's in-flight log starts in the segment.
    inflight_offset: int
    segment_bytes: int
    #: The ring at offset 0: slots and bytes per slot (for a byte ring, its size and 8).
    ring_slots: int
    slot_size: int


@dataclass(frozen=True)
class Medium:
    """A shared-memory file the kernel names for a device and removes with it (a memory disk)."""

    name: str


class DeviceClass:
    """A device class; subclass it once per class and register the instance (module docstring).

    Class attributes are the data; the methods with a body here are defaults a class may keep.
    """

    #: Store directory word and the attach message's ``class``: "vbd", "vif", "console".
    name: ClassVar[str]
    #: The device-table kind the guest runtime matches (kernel/abi.py ``DEV_KIND_*``).
    kind: ClassVar[int]
    #: For messages: "block device", "network interface", "console".
    noun: ClassVar[str]
    #: The domain-config key, and what it takes (for the "unknown key"/"must be" messages).
    config_key: ClassVar[str]
    config_type: ClassVar[type]
    config_help: ClassVar[str]
    region: ClassVar[Region]
    while_failed: ClassVar[WhileFailed] = WhileFailed.ANSWER_ERRORS
    #: Driver modules known to serve this class (``module`` of ``[driver.<name>]``).
    modules: ClassVar[tuple[str, ...]] = ()
    #: The ``vdev`` names of this class's devices, and how to say so in an error.
    vdev_re: ClassVar[re.Pattern[str]]
    vdev_hint: ClassVar[str]
    #: The campaign workloads that exercise this class (devices/workload.py).
    checkers: ClassVar[tuple[type[Checker], ...]] = ()

    # -- config ----------------------------------------------------------------------------
    def parse(
        self, value: Any, domain: str, where: str, base_dir: Path | None
    ) -> tuple[DeviceSpec, ...]:
        """The devices one domain-config value declares (a file's value, or :meth:`to_wire`'s
        output coming back over the control socket: re-validated).  SpecError if wrong."""
        raise NotImplementedError

    def to_wire(self, specs: tuple[DeviceSpec, ...]) -> Any:
        """The config value that :meth:`parse` turns back into ``specs``."""
        return [asdict(s) for s in specs]  # type: ignore[call-overload]

    def what(self, spec: DeviceSpec) -> str:
        """The device in a message: "disk xvda", "vif eth0", "the console"."""
        return f"{self.config_key} {spec.vdev}"

    # -- kernel: creation ------------------------------------------------------------------
    def medium(self, spec: DeviceSpec, segment: str) -> Medium | None:
        """A shared-memory file the kernel reserves for this device besides its region
        (``segment`` is the region's name), or None."""
        return None

    def image(self, spec: DeviceSpec) -> str | None:
        """The host file that holds this device's data, which a migration ``--with-disks``
        copies along (its driver marks the writes: ``["mirror", key, on]``), or None."""
        return None

    def conflict(self, spec: DeviceSpec, other: DeviceSpec, owner: str) -> str | None:
        """Why ``spec`` cannot be created while ``other`` (of any class, domain ``owner``'s)
        exists, or None."""
        return None

    def attach_body(self, spec: DeviceSpec, medium: Medium | None) -> dict[str, Any]:
        """The class's part of the ``attach`` message (the common fields are the kernel's)."""
        return {}

    def store_nodes(
        self, spec: DeviceSpec, medium: Medium | None
    ) -> tuple[dict[str, str], dict[str, str]]:
        """(frontend, backend) store nodes of the class, besides the common ones."""
        return {}, {}

    # -- kernel: a failed driver -------------------------------------------------------------
    @property
    def requests(self) -> bool:
        """The ring at offset 0 is a request ring with an in-flight log that the kernel may
        answer, take responses back from and clear (``WhileFailed.ANSWER_ERRORS``); False for a
        byte stream only its backend may touch (``WhileFailed.TAKE_OUTPUT``)."""
        return self.while_failed is WhileFailed.ANSWER_ERRORS

    def error_response(self, raw: bytes, window: int, sectors: int) -> bytes:
        """The error response to a request copied out of the ring (``ANSWER_ERRORS``)."""
        raise TypeError(f"a {self.noun} has no requests the kernel answers")

    def take_output(self, buf: Any) -> tuple[bytes, bool]:
        """Consume the guest's output from the region ``buf`` (``TAKE_OUTPUT``): (the bytes,
        whether the guest asked to be notified).  Leaves the ring armed so the guest's next
        byte kicks again."""
        raise TypeError(f"a {self.noun} has no output the kernel takes")

    # -- the guest runtime -------------------------------------------------------------------
    def c_headers(self) -> dict[str, str]:
        """Generated C headers of the class's protocol, by file name (``domains/build.py``
        puts them beside the guest runtime)."""
        return {}

    # -- reporting --------------------------------------------------------------------------
    def info(self, spec: DeviceSpec, medium: Medium | None, backend_node: Any) -> dict[str, Any]:
        """The class's columns of a ``devices`` row; ``backend_node(key)`` reads a node of the
        device's backend directory ("" if absent)."""
        return {}

    @staticmethod
    def cells(row: dict[str, Any]) -> tuple[str, str, str]:
        """A ``devices`` row's Access, Sectors and Target cells in ``isovisor devices``."""
        return "-", "-", "-"

    # -- the driver jail (drivers/jail.py, docs/jail.md) ----------------------------------------
    def jail_blocker(self, options: dict[str, Any]) -> str | None:
        """Why a driver of this class, with these backend options, cannot run jailed yet
        (it then runs unjailed, and the supervisor says so), or None."""
        return None

    def jail_writable(self, options: dict[str, Any], run_dir: Path) -> list[Path]:
        """Directories a jailed driver of this class writes to besides its own: the
        supervisor creates them for the driver's uid and binds them into its jail."""
        return []

    # -- faults -----------------------------------------------------------------------------
    def faults(self) -> FaultClass:
        """What fault injection means for this class (drivers/faults.py)."""
        raise NotImplementedError


def check_backend(backend: str, where: str, kind: str, example: str) -> str:
    """``backend=`` of a device entry: a driver's name, or SpecError saying what to write."""
    if not backend or not NAME_RE.match(backend):
        raise SpecError(
            f"{where}: backend={backend!r} must name a {kind} declared in "
            f"supervisor.toml as [driver.<name>], e.g. backend={example}"
        )
    return backend
