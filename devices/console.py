"""The console class: a domain's console served by a console driver (``console = "con0"``), a
byte ring each way and a journal (``ipc/consif.py``), served by ``drivers.console``.

The config value is a string, not a list: a console driver's name, ``"kernel"`` for the kernel's
built-in console, or empty for the stack's default (``[domains] console``).  Only a driver's
name makes a device.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

from devices.base import NAME_RE, DeviceClass, DeviceSpec, Region, SpecError, WhileFailed
from devices.workload import (
    Checker,
    GuestSpec,
    Result,
    Tally,
    Unit,
    WorkloadSpec,
)
from ipc import consif
from ipc.schema import show
from kernel import abi

if TYPE_CHECKING:
    from drivers.faults import FaultClass

#: The config values that make no console device.
NO_DRIVER: Final = ("", "kernel")


def default_dir(options: dict[str, Any], run_dir: Path | None = None) -> Path:
    """Where a console driver keeps its logs and sockets unless told otherwise:
    ``<run_dir>/consoles``, ``run_dir`` being the ``run_dir`` option, else the stack's (the
    argument, else ``$ISOVISOR_RUN_DIR``, else the current directory)."""
    v = options.get("run_dir")
    if v is None:
        base: str | Path = run_dir or os.environ.get("ISOVISOR_RUN_DIR", "").strip() or "."
    elif not isinstance(v, str) or not v:
        raise ValueError(f"run_dir must be a directory path (a non-empty string), got {v!r}")
    else:
        base = v
    return Path(base).expanduser().resolve() / "consoles"


@dataclass(frozen=True)
class ConsoleSpec:
    """A domain's console device, served by console driver ``backend``."""

    device_class: ClassVar[str] = "console"

    backend: str
    vdev: str = consif.DEVICE_NAME
    devid: int = 0


# --- the campaign workload ------------------------------------------------------------
_PATTERN: Final = b"abcdefghijklmnopqrstuvwxyz0123456789"


@dataclass
class _LogCheck:
    """What one conecho guest's log file held so far (read incrementally)."""

    path: Path
    lines: int  # the lines the guest was asked to print
    offset: int = 0
    partial: bytes = b""
    next: int = 0  # the line number expected next
    ok: int = 0
    missing: int = 0
    repeated: int = 0
    corrupt: int = 0
    #: mangled lines since the last good one: each stands for the numbered line(s) in it
    suspect: int = 0
    done: int | None = None  # lines= of the done line, once seen
    ended_at: float | None = None  # when the guest ended (monotonic)
    size_at: tuple[float, int] = (0.0, -1)  # (when, size) the size was last seen to change


class ConEcho(Checker):
    """Guests whose console is the driver; each prints numbered lines, and the checker reads
    the domain's log file ``<run_dir>/consoles/<name>.log`` as it grows."""

    image = "conecho"
    device_class = "console"
    epoch_s = 6
    min_s = 3
    console_events = False
    #: Lines a guest prints per second, about (the count is planned from it): two conecho
    #: guests through one console driver process made ~4,200 each here (2 cores, 2026-12).
    LINES_PER_S: Final = 4500
    #: A guest that ended has its results in once the done line is in its log, or the log has
    #: not grown for this long (the driver drained the ring).
    QUIET_S: Final = 1.0
    _LINE: Final = re.compile(rb"conecho: line (\d{9}) " + _PATTERN)
    _DONE: Final = re.compile(rb"conecho: done lines=(\d+) echoed=\d+")
    #: conecho's other lines (input, with echo=1)
    _OTHER: Final = re.compile(
        rb"conecho: (ready for input|got .*|no input within \d+ ms|"
        rb"no console input .*)"
    )
    _LINES: Final = re.compile(r"(?:^|\s)lines=(\d+)(?=\s|$)")

    def __init__(self, workload: WorkloadSpec, driver: str) -> None:
        super().__init__(workload, driver)
        self.logs: dict[str, _LogCheck] = {}
        #: What reads outside :meth:`poll` found (a guest settling), for the next poll to
        #: report: a corrupted line in the last output of a guest that is ending belongs to
        #: the fault in progress as much as one found while it runs.
        self._found = Tally()

    def start(self, run_dir: Path) -> None:
        super().start(run_dir)
        self.logs.clear()  # (the guests of a stack that died are recorded as lost)
        self._found = Tally()

    def guests(self, unit: Unit, seconds: int, seed: int) -> list[GuestSpec]:
        extra = f"lines={self.LINES_PER_S * seconds} {self.workload.extra}".strip()
        name = unit.name()
        asked = self._LINES.findall(extra)  # the guest takes the last one
        assert self.run_dir is not None
        self.logs[name] = _LogCheck(self.run_dir / "consoles" / f"{name}.log", int(asked[-1]))
        return [GuestSpec(name, self.image, 4, {"extra": extra, "console": self.driver})]

    def poll(self) -> Tally:
        total, self._found = self._found, Tally()
        for c in self.logs.values():
            total += self._read(c)
        return total

    def settled(self, name: str) -> bool:
        c = self.logs.get(name)
        if c is None:
            return True
        self._found += self._read(c)
        now = time.monotonic()
        if c.ended_at is None:
            c.ended_at = now
        return c.done is not None or now - max(c.ended_at, c.size_at[0]) >= self.QUIET_S

    def result(self, name: str, console: str) -> Result:
        c = self.logs.pop(name, None)
        if c is None:
            return Result(0, 0, 0)
        self._found += self._read(c)
        if c.partial:  # a last line without its newline: mangled
            self._found += self._line(c, c.partial)
        expected = c.done if c.done is not None else c.lines
        tail = max(0, expected - c.next - c.suspect)
        return Result(c.ok, c.missing + c.repeated + tail + int(c.done is None), c.corrupt)

    def _read(self, c: _LogCheck) -> Tally:
        """Check the lines added to the log since the last look."""
        try:
            with open(c.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == c.offset:
                    return Tally()
                f.seek(c.offset)
                data = f.read(size - c.offset)
        except FileNotFoundError:
            return Tally()
        c.offset += len(data)
        c.size_at = (time.monotonic(), c.offset)
        *lines, c.partial = (c.partial + data).split(b"\n")
        total = Tally()
        for line in lines:
            total += self._line(c, line)
        return total

    def _line(self, c: _LogCheck, line: bytes) -> Tally:
        m = self._LINE.fullmatch(line)
        if m is not None:
            n = int(m.group(1))
            if n < c.next:
                c.repeated += 1
                return Tally(errors=1)
            gap = n - c.next
            lost = max(0, gap - c.suspect)  # a mangled line stands for the one it was
            c.missing += lost
            c.next, c.suspect = n + 1, 0
            c.ok += 1
            return Tally(errors=lost)
        d = self._DONE.fullmatch(line)
        if d is not None:
            c.done = int(d.group(1))
            return Tally()
        if self._OTHER.fullmatch(line) is None and (
            b"line" in line
            or b"conecho" in line
            or not line.isascii()
            or not line.decode("ascii").isprintable()
        ):
            c.corrupt += 1
            c.suspect += max(1, line.count(b"line "))
            return Tally(mismatches=1)
        return Tally()  # some other output of the guest's


class Console(DeviceClass):
    name = consif.CLASS_NAME
    kind = abi.DEV_KIND_CONSOLE
    noun = "console"
    config_key = "console"
    config_type = str
    config_help = (
        'where the console goes: a console driver\'s name (e.g. "con0"), "kernel" '
        "for the kernel's built-in console, or empty for the stack's default "
        "([domains] console)"
    )
    #: ``ring_slots`` is the out ring's byte count: "outstanding" is output waiting for the
    #: backend (out_prod and out_cons sit where a request ring has req_prod and rsp_prod).
    region = Region(
        consif.WINDOW_BYTES, consif.INFLIGHT_OFFSET, consif.SEGMENT_BYTES, consif.OUT_SIZE, 8
    )
    while_failed = WhileFailed.TAKE_OUTPUT
    modules = ("drivers.console",)
    vdev_re = re.compile(r"^console$")
    vdev_hint = 'a console is "console"'
    checkers = (ConEcho,)

    def parse(
        self, value: Any, domain: str, where: str, base_dir: Path | None
    ) -> tuple[DeviceSpec, ...]:
        if value is None or value in NO_DRIVER:
            return ()
        if not isinstance(value, str) or not NAME_RE.match(value):
            raise SpecError(
                f"{where}: console = {show(value)} must be a driver name, "
                f'"kernel" or empty ({self.config_help})'
            )
        return (ConsoleSpec(value),)

    def take_output(self, buf: Any) -> tuple[bytes, bool]:
        ring = consif.ConsoleBack(memoryview(buf)[: consif.WINDOW_BYTES])
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

    def c_headers(self) -> dict[str, str]:
        return {"isovisor_consif.h": consif.c_header()}

    def jail_writable(self, options: dict[str, Any], run_dir: Path) -> list[Path]:
        """The log and socket directories (``log_dir``, ``socket_dir``, both by default
        ``<run_dir>/consoles``)."""
        default = default_dir(options, run_dir)
        out = []
        for key in ("log_dir", "socket_dir"):
            v = options.get(key)
            out.append(Path(v).expanduser().resolve() if isinstance(v, str) and v else default)
        return sorted(set(out))

    def faults(self) -> FaultClass:
        from drivers.faults import RESPONSE_TYPES, FaultClass

        no_responses = (
            "a console has no responses to spoil: the guest writes a byte stream, "
            "and all the backend gives back is how far it has consumed it"
        )
        return FaultClass(
            "console",
            "console",
            "a console driver's requests (write: an append of output to the log)",
            ("write",),
            "the append covers this byte of the domain's output stream (0 = its first byte)",
            {
                **dict.fromkeys(RESPONSE_TYPES, no_responses),
                "poison": "the console backend never gives up an append (every byte reaches the "
                "log exactly once), so an append that kills every instance would do so "
                "for ever; there is no poison answer",
            },
        )


CLASS: Final = Console()
