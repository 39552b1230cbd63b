"""The console class: a domain's console served by a console driver (``console = "con0"``), a
byte ring each way and a journal (``ipc/consif.py``), served by ``drivers.console``.

The config value is a string, not a list: a console driver's name, ``"kernel"`` for the kernel's
built-in console, or empty for the stack's default (``[domains] console``).  Only a driver's
name makes a device.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

from devices.base import NAME_RE, DeviceClass, DeviceSpec, Region, SpecError, WhileFailed
from ipc import consif
from kernel import abi

if TYPE_CHECKING:
    from drivers.faults import FaultClass

#: The config values that make no console device.
NO_DRIVER: Final = ("", "kernel")


@dataclass(frozen=True)
class ConsoleSpec:
    """A domain's console device, served by console driver ``backend``."""

    device_class: ClassVar[str] = "console"

    backend: str
    vdev: str = consif.DEVICE_NAME
    devid: int = 0


class Console(DeviceClass):
    name = consif.CLASS_NAME
    kind = abi.DEV_KIND_CONSOLE
    noun = "console"
    config_key = "console"
    config_type = str
    config_help = ('where the console goes: a console driver\'s name (e.g. "con0"), "kernel" '
                   "for the kernel's built-in console, or empty for the stack's default "
                   "([domains] console)")
    #: ``ring_slots`` is the out ring's byte count: "outstanding" is output waiting for the
    #: backend (out_prod and out_cons sit where a request ring has req_prod and rsp_prod).
    region = Region(consif.WINDOW_BYTES, consif.INFLIGHT_OFFSET, consif.SEGMENT_BYTES,
                    consif.OUT_SIZE, 8)
    while_failed = WhileFailed.TAKE_OUTPUT
    modules = ("drivers.console",)
    vdev_re = re.compile(r"^console$")
    vdev_hint = 'a console is "console"'

    def parse(self, value: Any, domain: str, where: str,
              base_dir: Path | None) -> tuple[DeviceSpec, ...]:
        if value is None or value in NO_DRIVER:
            return ()
        if not isinstance(value, str) or not NAME_RE.match(value):
            raise SpecError(f"{where}: key 'console' = {value!r} must be a driver name, "
                            f"\"kernel\" or empty ({self.config_help})")
        return (ConsoleSpec(value),)

    def take_output(self, buf: Any) -> tuple[bytes, bool]:
        ring = consif.ConsoleBack(memoryview(buf)[:consif.WINDOW_BYTES])
        data = bytearray()
        notify = False
        while True:
            n = ring.out_available()
            if n:
                data += ring.out_peek(ring.out_cons, n)
                notify |= ring.out_commit(ring.out_cons + n)
            if not ring.out_final_check():  # re-armed out_event: the next byte kicks
                return bytes(data), notify

    def to_wire(self, specs: tuple[DeviceSpec, ...]) -> Any:
        return specs[0].backend if specs else ""

    def what(self, spec: DeviceSpec) -> str:
        return "the console"

    @staticmethod
    def cells(row: dict[str, Any]) -> tuple[str, str, str]:
        return "-", "-", "console ring"

    def faults(self) -> FaultClass:
        from drivers.faults import RESPONSE_TYPES, FaultClass
        no_responses = ("a console has no responses to spoil: the guest writes a byte stream, "
                        "and all the backend gives back is how far it has consumed it")
        return FaultClass(
            "console", "console", "a console driver's requests (write: an append of output "
            "to the log)", ("write",),
            "the append covers this byte of the domain's output stream (0 = its first byte)",
            {**dict.fromkeys(RESPONSE_TYPES, no_responses),
             "poison": "the console backend never gives up an append (every byte reaches the "
                       "log exactly once), so an append that kills every instance would do so "
                       "for ever; there is no poison answer"})


CLASS: Final = Console()
