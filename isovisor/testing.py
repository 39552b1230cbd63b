"""pytest fixtures for driver developers: a minimal real stack around a backend under test.

Installed with the package as a pytest plugin (entry point ``pytest11``: ``isovisor``), so a
test of a backend needs no conftest::

    import pytest

    pytestmark = pytest.mark.timeout(180)   # pytest-timeout; every wait below is bounded too

    def test_my_backend(isovisor_stack):
        s = isovisor_stack.start("/path/to/mydisk.py", guests=2, ops=20_000)
        assert s.swap("drivers.blk.ram:RamBackend")["outcome"] == "swapped"
        s.finish()    # every guest powered off with exit 0, errors=0, mismatches=0, and its
                      # image holds exactly the blocks blkstress wrote

:class:`MiniStack` is a supervisor, a kernel, one process driver running the backend under
test, and guests that check every byte it handles, in a private /tmp directory:

- :meth:`MiniStack.start`: a block backend as driver ``blk0`` and N ``blkstress`` guests
  (``g1`` .. ``gN``: random reads and writes at queue depth ``qd``, every byte verified by the
  guest) on image files;
- :meth:`MiniStack.start_net`: a network backend as driver ``net0`` and N pairs of ``netpair``
  guests (``a1``/``b1`` .. : sequenced frames each way, order, loss, duplicates and every byte
  checked by the receiver), pair i alone on bridge ``br<i>``;
- :meth:`MiniStack.start_console`: a console backend as driver ``con0`` and N ``conecho``
  guests (``c1`` .. ``cN``) printing numbered lines, each checked to be in the console log
  exactly once and in order.

Whatever happens in the test, the fixture stops the stack, kills every process of it and
removes its shared memory, and then fails the test if any process or segment had outlived
``isovisor down``.  When a test fails, the tails of the driver and kernel logs are
printed (your backend's tracebacks are in the driver log).

Fixtures: ``isovisor_stack`` (a :class:`MiniStack`, not started yet).  Helpers:
:func:`wait_until` (poll a condition; never sleep for a fixed time), :func:`backend_class`
(load a backend class exactly as the driver host does, to unit-test its hooks), and
:func:`check_image` (verify an image against blkstress's block pattern).  docs/sdk.md is the
tutorial.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

import psutil
import pytest

from ipc.control import ControlError
from isovisor.cli.swapclient import swap as _swap
from isovisor.cli.swapclient import target_of
from isovisor.privstack import PrivateStack
from isovisor.procs import log_tail

if TYPE_CHECKING:
    from pluggy import Result

__all__ = [
    "DRIVER",
    "DRIVERS",
    "MiniStack",
    "backend_class",
    "check_image",
    "isovisor_stack",
    "wait_until",
]

#: The driver a block stack declares; every guest's disk names it (``backend=blk0``).
DRIVER: Final = "blk0"
#: The driver each kind of stack declares: :meth:`MiniStack.start` (``blk``),
#: :meth:`MiniStack.start_net` (``net``), :meth:`MiniStack.start_console` (``console``).
DRIVERS: Final = {"blk": DRIVER, "net": "net0", "console": "con0"}
#: netpair's MAC addresses: pair i is ``02:00:00:00:<i>:0a`` and ``02:00:00:00:<i>:0b``.
_NET_MAC = "02:00:00:00:{:02x}:{}"
#: What conecho prints after each line number (domains/guests/conecho.c).
_CONECHO_PATTERN = "abcdefghijklmnopqrstuvwxyz0123456789"
T = TypeVar("T")


def wait_until(
    pred: Callable[[], T | None],
    timeout: float = 30,
    what: str = "condition",
    interval: float = 0.05,
) -> T:
    """Poll ``pred`` until it returns something true and return that; AssertionError after
    ``timeout`` seconds.  For state no event announces (counters, statistics, status rows)."""
    deadline = time.monotonic() + timeout
    while True:
        val = pred()
        if val:
            return val
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout:g}s")
        time.sleep(interval)


def backend_class(spec: str | os.PathLike[str]) -> type:
    """The backend class ``spec`` names (``pkg.mod[:Class]`` or ``/path/file.py[:Class]``),
    loaded and checked as the driver host loads it for a hot swap."""
    from drivers.host import load_backend

    cls, _ = load_backend(_spec(spec), swappable=True)
    return cls  # type: ignore[return-value]


def _spec(spec: str | os.PathLike[str]) -> str:
    text = os.fspath(spec)
    if text.endswith(".py") or ".py:" in text or "/" in text:
        return target_of(to_file=text)  # absolute, with :Class kept
    return text


# -- blkstress's block format (domains/guests/blkstress.c; tests/blkdata.py has the long form) --
_M64: Final = (1 << 64) - 1
_MAGIC: Final = 0x31304B4C42565349  # b"ISVBLK01"
_HEADER: Final = struct.Struct("<QQQII")  # magic, block, gen, checksum, bs


def _expected_block(seed: int, block: int, gen: int, bs: int) -> bytes:
    """The ``bs`` bytes blkstress writes for ``block`` at generation ``gen``."""
    x = (seed ^ (block * 0x9E3779B97F4A7C15) ^ (gen * 0xC2B2AE3D27D4EB4F)) & _M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _M64
    x ^= x >> 31
    s = x or 0x9E3779B97F4A7C15
    words = []
    h = 0xCBF29CE484222325
    for _ in range((bs - _HEADER.size) // 8):
        s ^= (s << 13) & _M64
        s ^= s >> 7
        s ^= (s << 17) & _M64
        words.append(s)
        h = ((h ^ s) * 0x100000001B3) & _M64
    body = struct.pack(f"<{len(words)}Q", *words)
    return _HEADER.pack(_MAGIC, block, gen, (h ^ (h >> 32)) & 0xFFFFFFFF, bs) + body


def check_image(
    image: bytes | memoryview, seed: int, blocks: int, bs: int = 4096
) -> dict[int, int | None]:
    """Check the first ``blocks`` blocks of an image a blkstress run with ``seed`` wrote:
    {block: generation}, None for a block that is all zeroes (never written).  AssertionError
    naming the first bad block otherwise (wrong place, torn, or corrupted)."""
    mv = memoryview(image)
    if len(mv) < blocks * bs:
        raise AssertionError(f"image of {len(mv)} bytes is smaller than {blocks} blocks of {bs}")
    out: dict[int, int | None] = {}
    for b in range(blocks):
        data = bytes(mv[b * bs : (b + 1) * bs])
        if not any(data):
            out[b] = None
            continue
        magic, block, gen, _, hbs = _HEADER.unpack_from(data)
        if magic != _MAGIC or block != b or hbs != bs or gen == 0:
            raise AssertionError(
                f"block {b}: header magic={magic:#x} block={block} gen={gen} "
                f"bs={hbs}: not a block blkstress wrote here"
            )
        want = _expected_block(seed, b, gen, bs)
        if data != want:
            off = next(i for i, (x, y) in enumerate(zip(data, want, strict=True)) if x != y)
            raise AssertionError(
                f"block {b} gen {gen}: wrong data from byte {off} on "
                f"(got {data[off]:#04x}, expected {want[off]:#04x})"
            )
        out[b] = gen
    return out


def _summary(console: str, prefix: str = "blkstress: ops=") -> dict[str, int] | None:
    lines = [ln for ln in console.splitlines() if ln.startswith(prefix)]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(-?\d+)", lines[-1])} if lines else None


def check_lines(text: str, n: int) -> None:
    """``text`` (a console log) holds conecho's ``conecho: line i`` for i in 0..n-1, each
    exactly once and in order (AssertionError naming the first differences otherwise)."""
    got = [
        int(m)
        for m in re.findall(r"^conecho: line (\d{9}) " + _CONECHO_PATTERN + "$", text, re.MULTILINE)
    ]
    if got != list(range(n)):
        seen: dict[int, int] = {}
        for i in got:
            seen[i] = seen.get(i, 0) + 1
        missing = [i for i in range(n) if i not in seen]
        twice = [i for i, c in seen.items() if c > 1]
        order = [(k, g) for k, g in enumerate(got) if g != k][:5]
        raise AssertionError(
            f"{len(got)} numbered line(s) for {n}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''} ({len(missing)}), more than once "
            f"{twice[:5]} ({len(twice)}), first out of place (position, line) {order}"
        )


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string
    raise TypeError(f"cannot write {v!r} into supervisor.toml (use str, int, float or bool)")


def netpair_config(
    domain_config: Callable[..., Path],
    name: str,
    mac: str,
    peer: str,
    *,
    frames: int,
    bridge: str,
    backend: str,
    size: int = 600,
) -> Path:
    """The config of a ``netpair`` guest with MAC ``mac`` on ``bridge`` of driver ``backend``,
    sending ``frames`` frames of ``size`` bytes to ``peer``, written by ``domain_config`` (a
    stack's)."""
    return domain_config(
        name,
        "netpair",
        memory=4,
        on_poweroff="preserve",
        on_crash="preserve",
        extra=f"peer={peer} count={frames} size={size} timeout=20000",
        vif=[f"mac={mac}, bridge={bridge}, backend={backend}"],
    )


class MiniStack:
    """A stack to test one backend in: one driver running it and the guests that use it.

    Create it with the ``isovisor_stack`` fixture, then start it with :meth:`start` (a block
    backend), :meth:`start_net` (a network backend) or :meth:`start_console` (a console
    backend).  Attributes after start: ``kind`` (``blk``, ``net`` or ``console``),
    ``driver_name`` (``blk0``, ``net0`` or ``con0``), ``dir`` (the private directory: configs,
    ``g1.img`` ...), ``run_dir`` (sockets and logs: ``driver-blk0.log``, ``consoles/``),
    ``guests`` (their names), ``images`` (block: their image paths) and ``seen`` (every
    ``domain.``/``driver.``/``supervisor.`` event received so far)."""

    def __init__(self, *, pcpus: int = 2) -> None:
        self._ps = PrivateStack(pcpus, name="sdktest")
        self.kind = "blk"
        self.driver_name: str = DRIVER
        self.dir: Path = self._ps.dir
        self.run_dir: Path = self._ps.run_dir
        self.guests: list[str] = []
        self.images: list[Path] = []
        self.seen: list[tuple[str, dict[str, Any]]] = []
        self._sub: Any = None
        self._pids: set[int] = set()
        self._io: dict[str, Any] = {}
        self._summaries: list[dict[str, int]] = []
        self._options: dict[str, Any] = {}
        self._closed = False

    # -- starting ---------------------------------------------------------------------------
    def start(
        self,
        backend: str | os.PathLike[str] = "drivers.blk",
        *,
        guests: int = 1,
        ops: int = 4000,
        qd: int = 32,
        mix: int = 60,
        blocks: int = 256,
        bs: int = 4096,
        seed: int = 11,
        options: dict[str, Any] | None = None,
        driver: dict[str, Any] | None = None,
        wait_io: bool = True,
    ) -> MiniStack:
        """Start the stack with ``backend`` serving ``blk0`` and ``guests`` blkstress guests.

        ``backend``: ``"drivers.blk"``, ``"pkg.mod:Class"`` or ``"/path/file.py[:Class]"``.
        Guest ``gI`` runs ``ops`` random operations (``mix`` % writes) at queue depth ``qd``
        over ``blocks`` blocks of ``bs`` bytes of its image ``gI.img``, with seed
        ``seed + I - 1``.  ``options``: the backend's ``[driver.blk0.options]``; ``driver``:
        more ``[driver.blk0]`` keys (``watchdog_sec``, ``request_timeout_sec`` ...).  Returns
        once every guest's disk is connected and doing I/O (unless ``wait_io`` is false).
        Raises if the backend cannot be loaded (HostError), or RuntimeError if the stack
        does not come up: if the driver could not start, the message is its own error (the
        exception's type and message, where in the backend's code, and the traceback), else
        what ``isovisor up`` said and the tail of the driver log."""
        if not 1 <= guests <= 8:
            raise ValueError(f"guests must be 1..8, got {guests}")
        if bs % 512 or not 512 <= bs <= 128 * 1024 or blocks < 1:
            raise ValueError(
                f"bs must be a multiple of 512 up to 128K and blocks >= 1, got "
                f"bs={bs} blocks={blocks}"
            )
        self._begin("blk", backend, options, driver)
        self._io = {"ops": ops, "blocks": blocks, "bs": bs, "seed": seed}
        mib = -(-blocks * bs // (1 << 20))
        cfgs = []
        for i in range(1, guests + 1):
            name = f"g{i}"
            extra = (
                f"ops={ops} qd={qd} mix={mix} seed={seed + i - 1} blocks={blocks} bs={bs} "
                "timeout=30000"
            )
            disk = f"target={name}.img, vdev=xvda, access=rw, backend={DRIVER}, size={mib}M"
            cfgs.append(
                self._ps.domain_config(
                    name,
                    "blkstress",
                    memory=8,
                    on_poweroff="preserve",
                    on_crash="preserve",
                    extra=extra,
                    disk=[disk],
                )
            )
            self.guests.append(name)
            self.images.append(self.dir / f"{name}.img")
        return self._launch(cfgs, wait_io, "every guest's disk connected and doing I/O")

    def start_net(
        self,
        backend: str | os.PathLike[str] = "drivers.net",
        *,
        pairs: int = 1,
        frames: int = 20_000,
        size: int = 600,
        options: dict[str, Any] | None = None,
        driver: dict[str, Any] | None = None,
        wait_io: bool = True,
    ) -> MiniStack:
        """Start the stack with ``backend`` serving ``net0`` (the switch) and ``pairs`` pairs
        of netpair guests: ``aI`` and ``bI`` alone on bridge ``brI``, each sending ``frames``
        sequenced frames of ``size`` bytes (60..1514) to the other and checking what arrives
        for order, loss, duplicates and every byte.  ``backend``: ``"drivers.net"``,
        ``"pkg.mod:Class"`` or ``"/path/file.py[:Class]"``; ``options``, ``driver``: as for
        :meth:`start` (``[driver.net0.options]``, ``[driver.net0]``).  Returns once every
        guest's vif is connected and sending (unless ``wait_io`` is false); errors as for
        :meth:`start`."""
        if not 1 <= pairs <= 4:
            raise ValueError(f"pairs must be 1..4, got {pairs}")
        if not 60 <= size <= 1514 or frames < 1:
            raise ValueError(
                f"size must be 60..1514 and frames >= 1, got size={size} frames={frames}"
            )
        self._begin("net", backend, options, driver)
        self._io = {"frames": frames}
        cfgs = []
        for i in range(1, pairs + 1):
            macs = {"a": _NET_MAC.format(i, "0a"), "b": _NET_MAC.format(i, "0b")}
            for side, peer in (("a", "b"), ("b", "a")):
                name = f"{side}{i}"
                cfgs.append(
                    netpair_config(
                        self._ps.domain_config,
                        name,
                        macs[side],
                        macs[peer],
                        frames=frames,
                        bridge=f"br{i}",
                        backend=self.driver_name,
                        size=size,
                    )
                )
                self.guests.append(name)
        return self._launch(cfgs, wait_io, "every guest's vif connected and sending")

    def start_console(
        self,
        backend: str | os.PathLike[str] = "drivers.console",
        *,
        guests: int = 1,
        lines: int = 20_000,
        options: dict[str, Any] | None = None,
        driver: dict[str, Any] | None = None,
        wait_io: bool = True,
    ) -> MiniStack:
        """Start the stack with ``backend`` serving ``con0`` and ``guests`` conecho guests
        (``c1`` .. ``cN``), each printing ``lines`` numbered lines (``conecho: line
        000000042 abc...``, 57 bytes) into its console and then powering off.  ``backend``,
        ``options``, ``driver``: as for :meth:`start_net`.  Returns once every guest's console
        is connected and printing (unless ``wait_io`` is false); errors as for :meth:`start`.
        :meth:`wait_guests` then checks each console log holds every line exactly once, in
        order."""
        if not 1 <= guests <= 8:
            raise ValueError(f"guests must be 1..8, got {guests}")
        if lines < 1:
            raise ValueError(f"lines must be >= 1, got {lines}")
        self._begin("console", backend, options, driver)
        self._io = {"lines": lines}
        cfgs = []
        for i in range(1, guests + 1):
            name = f"c{i}"
            cfgs.append(
                self._ps.domain_config(
                    name,
                    "conecho",
                    memory=4,
                    on_poweroff="preserve",
                    on_crash="preserve",
                    console=self.driver_name,
                    extra=f"lines={lines}",
                )
            )
            self.guests.append(name)
        return self._launch(cfgs, wait_io, "every guest's console connected and printing")

    def _begin(
        self,
        kind: str,
        backend: str | os.PathLike[str],
        options: dict[str, Any] | None,
        driver: dict[str, Any] | None,
    ) -> None:
        """Check the backend loads and write the driver's table into supervisor.toml."""
        if self.guests:
            raise RuntimeError("this MiniStack was started already")
        spec = _spec(backend)
        backend_class(spec)  # a clear error here, before anything starts
        self.kind, self.driver_name = kind, DRIVERS[kind]
        self._options = dict(options or {})
        table = [f"[driver.{self.driver_name}]", f"module = {_toml(spec)}"]
        table += [f"{k} = {_toml(v)}" for k, v in (driver or {}).items()]
        if options:
            table.append(f"[driver.{self.driver_name}.options]")
            table += [f"{k} = {_toml(v)}" for k, v in options.items()]
        self._ps.extra_toml = "\n".join(table)

    def _launch(self, cfgs: list[Path], wait_io: bool, what: str) -> MiniStack:
        """``isovisor up``, create the guests, and wait for them to do I/O."""
        try:
            self._ps.up([])
        except RuntimeError as e:
            raise RuntimeError(self._start_failure(str(e))) from None
        self._note_pids()
        self._sub = self._ps.subscribe(["domain.", "driver.", "supervisor."])
        for cfg in cfgs:
            try:
                self._ps.create(cfg)
            except ControlError as e:
                raise RuntimeError(f"isovisor create {cfg.name} failed: {e}") from None
        if wait_io:
            wait_until(
                lambda: self._all_doing_io(),
                timeout=60,
                what=f"{what} (devices: {self._device_rows_text()})",
            )
        return self

    def _start_failure(self, up_error: str) -> str:
        """Why :meth:`start` failed: the driver's own error if it could not start (with the
        traceback of the backend's exception), else what ``isovisor up`` said and the end of
        the driver's log."""
        row: dict[str, Any] = {}
        if self._ps.rd.running_pid() is not None:  # up (exit 1) left the stack running
            with contextlib.suppress(Exception):
                row = {d["name"]: d for d in self.call("status")["drivers"]}.get(
                    self.driver_name, {}
                )
        failure, error = row.get("last_failure"), row.get("last_error")
        if failure and row.get("state") != "RUNNING":
            tb = (error or {}).get("traceback", "").rstrip()
            return f"{failure}" + (f"\n{tb}" if tb else "")
        log = self._ps.rd.driver_log(self.driver_name)
        return f"{up_error}\n--- {log} ---\n{log_tail(log, 30)}"

    def _all_doing_io(self) -> bool:
        rows = {d["domain"]: d for d in self.devices() if d["backend"] == self.driver_name}
        return all(g in rows and rows[g]["requests"] > 0 for g in self.guests)

    def _device_rows_text(self) -> str:
        try:
            return (
                ", ".join(
                    f"{d['domain']}: {d['backend_state']} {d['requests']} requests"
                    f"{' ' + d['error'] if d['error'] else ''}"
                    for d in self.devices()
                )
                or "none"
            )
        except Exception as e:  # only for a message
            return f"? ({e})"

    # -- looking at it -----------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``isovisor ARGS`` against this stack (e.g. ``cli("driver", "stats", "blk0")``)."""
        return self._ps.cli(*args, timeout=timeout)

    def call(self, command: str, **props: Any) -> dict[str, Any]:
        """A control command to the supervisor (``status``, ``devices``, ``console`` ...)."""
        return self._ps.call(command, **props)

    def driver(self) -> dict[str, Any]:
        """The driver's row of ``isovisor status`` (``blk0``, ``net0`` or ``con0``): ``pid``,
        ``module``, ``state``, ``swaps``, ``last_swap``, ``statistics`` (the backend's
        statistics(), refreshed every second), ``statistics_error`` ..."""
        rows: dict[str, dict[str, Any]] = {d["name"]: d for d in self.call("status")["drivers"]}
        row = rows[self.driver_name]
        if isinstance(row.get("pid"), int):
            self._pids.add(row["pid"])
        return row

    def statistics(self) -> dict[str, Any]:
        """The backend's latest statistics, as ``isovisor driver stats <driver>`` shows them.
        They are those of the process serving now: right after a restart or a swap, ``{}``
        until it first reports (within a second), and ``{}`` while its ``statistics()``
        raises (``driver()["statistics_error"]`` says why).  Read a value with ``.get``."""
        return dict(self.driver().get("statistics") or {})

    def wait_statistics(
        self,
        pred: Callable[[dict[str, Any]], object],
        timeout: float = 20,
        what: str = "statistics",
    ) -> dict[str, Any]:
        """Poll the statistics until ``pred(stats)`` holds (they are refreshed every second
        and only by the process serving now); returns them.  A ``pred`` that raises
        KeyError (or another LookupError) for a value not reported yet, as after a restart,
        is taken as not holding yet.  The failure after ``timeout`` has the last statistics,
        and the backend's error if its ``statistics()`` fails."""
        last: dict[str, Any] = {}
        missing: LookupError | None = None
        failing: str | None = None

        def ok() -> dict[str, Any] | None:
            nonlocal last, missing, failing
            row = self.driver()
            last, failing = dict(row.get("statistics") or {}), row.get("statistics_error")
            try:
                held = pred(last)
            except LookupError as e:  # a value this instance has not reported (yet)
                missing = e
                return None
            missing = None
            return last if held else None

        try:
            return wait_until(ok, timeout=timeout, what=what, interval=0.1)
        except AssertionError as e:
            why = f"; the last statistics: {last}"
            if missing is not None:
                why += f" (the condition raised {type(missing).__name__}: {missing})"
            if failing:
                why += f"; the backend's {failing}"
            raise AssertionError(f"{e}{why}") from None

    def devices(self) -> list[dict[str, Any]]:
        """The rows of ``isovisor devices``: ``domain``, ``requests``, ``backend_state`` ..."""
        return list(self.call("devices")["devices"])

    def requests(self) -> int:
        """Requests the guests have issued so far, all their devices together (disk
        requests, tx frames, console kicks)."""
        return sum(d["requests"] for d in self.devices())

    def more_io(self, n: int = 1000, timeout: float = 30) -> None:
        """Wait until the guests have issued ``n`` more requests (e.g. after a swap: the new
        backend serves).  Fails if a guest powered off meanwhile: give them more ``ops``."""
        start = self.requests()

        def done() -> bool:
            self.drain()
            ended = [
                t
                for t, _ in self.seen
                if t.startswith("domain.") and t.rsplit(".", 1)[-1] in ("shutdown", "crashed")
            ]
            if ended:
                raise AssertionError(
                    f"waiting for {n} more requests, but {ended[0]}: the "
                    "guests finished too early; start them with more ops"
                )
            return self.requests() >= start + n

        wait_until(done, timeout=timeout, what=f"{n} more guest requests")

    def console(self, guest: str) -> str:
        """What guest ``guest`` printed, as ``isovisor console`` shows it (for a console
        stack, the end of it: the whole output is in :meth:`console_log`)."""
        data = self.call("console", name=guest)["data"]
        return data.decode(errors="replace") if isinstance(data, bytes) else str(data)

    def console_log(self, guest: str) -> Path:
        """The log file of ``guest``'s console on a console stack (where the console backend
        writes it: ``<run_dir>/consoles/<guest>.log`` unless the ``log_dir`` option says)."""
        log_dir = self._options.get("log_dir")
        return (Path(log_dir) if log_dir else self.run_dir / "consoles") / f"{guest}.log"

    def drain(self) -> None:
        """Move every event received so far into :attr:`seen`."""
        while self._sub is not None and self._take(0) is not None:
            pass

    def _take(self, timeout: float) -> tuple[str, dict[str, Any]] | None:
        ev: tuple[str, dict[str, Any]] | None = self._sub.recv(timeout)
        if ev is not None:
            self.seen.append(ev)
            pid = ev[1].get("pid")
            if ev[0].startswith(("driver.", "supervisor.driver.")) and isinstance(pid, int):
                self._pids.add(pid)
        return ev

    def wait_event(self, topic: str, timeout: float = 30, **match: Any) -> dict[str, Any]:
        """The payload of the first event on ``topic`` (exact) whose fields include
        ``match``, received already or within ``timeout`` seconds."""
        if self._sub is None:
            raise RuntimeError("start the stack first")

        def hit(t: str, p: dict[str, Any]) -> bool:
            return t == topic and all(p.get(k) == v for k, v in match.items())

        for t, p in self.seen:
            if hit(t, p):
                return p
        deadline = time.monotonic() + timeout
        while True:
            ev = self._take(max(0.0, deadline - time.monotonic()))
            if ev is None:
                got = sorted({t for t, _ in self.seen})
                raise AssertionError(
                    f"no {topic!r} {match or ''} event within {timeout:g}s; saw: {got}"
                )
            if hit(*ev):
                return ev[1]

    # -- acting ---------------------------------------------------------------------------
    def swap(
        self,
        target: str | os.PathLike[str],
        *,
        probation: float | None = 0.3,
        timeout: float | None = None,
        wait: float = 60,
        options: dict[str, Any] | None = None,
        log_level: str | None = None,
        debug: bool | None = None,
    ) -> dict[str, Any]:
        """Hot-swap the driver to ``target`` (as ``isovisor driver swap``: a module spec or a
        file) and return its ``driver.<name>.swap`` event: ``outcome`` (swapped, rolled_back,
        refused, failed), ``reason``, ``error``, ``traceback``, ``stall_ms``, ``carried``,
        ``pid``, ``old_pid``, ``old``, ``new``.  ``probation``: seconds the new backend must
        serve without dying; ``timeout``: seconds each step (drain, restore and hello) may
        take (default: 5, or half the driver's request_timeout_sec when that is shorter).
        ``options`` replace the backend's options for the new instance (``--option``; ``{}``:
        none), ``log_level`` and ``debug`` are its own (``--log-level``, ``--debug``); None
        keeps the driver's."""
        r = _swap(
            self._ps.rd,
            self.driver_name,
            _spec(target),
            probation=probation,
            timeout=timeout,
            wait=wait,
            options=options,
            log_level=log_level,
            debug=debug,
        )
        for k in ("pid", "old_pid"):
            if isinstance(r.get(k), int):
                self._pids.add(r[k])
        self._note_pids()
        return r

    def wait_guests(self, timeout: float = 120) -> list[dict[str, int]]:
        """Wait for every guest to power off with exit code 0 and check what it did; returns
        one summary per guest, in guest order.  The stack keeps running (the devices stay
        attached: statistics can still be read).

        - block: blkstress's summary (``ops``, ``errors``, ``reads``, ``writes``,
          ``max_gap_us``, ``mismatches`` ...): ``errors=0``, ``mismatches=0``, all ``ops`` done;
        - net: netpair's (``sent``, ``received``, ``lost``, ``dup``, ``reordered``,
          ``corrupt``, ``other``, ``errors``): every frame sent and received, none lost,
          duplicated, reordered or corrupt, no error;
        - console: ``{"lines": N}`` once the guest's log file holds every numbered line
          exactly once, in order (:func:`check_lines`)."""
        if not self.guests:
            raise RuntimeError("start the stack first")
        if self._summaries:
            return self._summaries
        deadline = time.monotonic() + timeout
        summaries = []
        for name in self.guests:
            p, ended = self._wait_end(name, max(1.0, deadline - time.monotonic()))
            if self.kind == "console":
                assert (ended, p.get("code")) == ("shutdown", 0), (
                    f"guest {name} {ended} (exit code {p.get('code')}): {p.get('reason')}"
                )
                summaries.append(self._check_console(name, deadline))
                continue
            con = self.console(name)
            s = _summary(con, "netpair: sent=" if self.kind == "net" else "blkstress: ops=")
            assert ended == "shutdown" and s is not None, (
                f"guest {name} {ended}: {p.get('reason')}\n{con}"
            )
            if self.kind == "net":
                n = self._io["frames"]
                bad = {k: s.get(k) for k in ("lost", "dup", "reordered", "corrupt", "errors")}
                assert (p.get("code"), s.get("sent"), s.get("received"), set(bad.values())) == (
                    0,
                    n,
                    n,
                    {0},
                ), (
                    f"guest {name}: exit code {p.get('code')}, {n} frames each way, "
                    f"summary {s}\n{con}"
                )
            else:
                assert (p.get("code"), s.get("errors"), s.get("mismatches")) == (0, 0, 0), (
                    f"guest {name}: exit code {p.get('code')}, summary {s}\n{con}"
                )
                assert s.get("ops") == self._io["ops"], (
                    f"guest {name} did {s.get('ops')} ops\n{con}"
                )
            summaries.append(s)
        self._summaries = summaries
        return summaries

    def _check_console(self, name: str, deadline: float) -> dict[str, int]:
        """Wait for conecho's last line in ``name``'s log file, then check every line."""
        log = self.console_log(name)

        def done() -> bool:
            with contextlib.suppress(OSError), open(log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
                return b"conecho: done" in f.read()
            return False

        wait_until(
            done,
            timeout=max(1.0, deadline - time.monotonic()),
            what=f"conecho's last line in {log}",
        )
        check_lines(log.read_text(errors="replace"), self._io["lines"])
        return {"lines": self._io["lines"]}

    def finish(self, timeout: float = 120) -> list[dict[str, int]]:
        """:meth:`wait_guests`, then stop the stack (so every backend lets go of its devices:
        data kept elsewhere, as drivers.blk.ram keeps it, is written back).  A block stack's
        images are then checked block by block against what blkstress writes.  Returns the
        summaries."""
        summaries = self.wait_guests(timeout)
        self.stop()
        for i, (name, image) in enumerate(zip(self.guests, self.images, strict=self.kind == "blk")):
            gens = check_image(
                image.read_bytes(), self._io["seed"] + i, self._io["blocks"], self._io["bs"]
            )
            assert any(g is not None for g in gens.values()), f"{name}: no block was written"
        return summaries

    def _wait_end(self, name: str, timeout: float) -> tuple[dict[str, Any], str]:
        for t, p in self.seen:
            if t in (f"domain.{name}.shutdown", f"domain.{name}.crashed"):
                return p, t.rsplit(".", 1)[1]
        deadline = time.monotonic() + timeout
        while True:
            ev = self._take(max(0.0, deadline - time.monotonic()))
            if ev is None:
                raise AssertionError(
                    f"guest {name} did not power off within {timeout:.0f}s; "
                    f"console:\n{self.console(name)}"
                )
            if ev[0] in (f"domain.{name}.shutdown", f"domain.{name}.crashed"):
                return ev[1], ev[0].rsplit(".", 1)[1]

    # -- stopping ---------------------------------------------------------------------------
    def _note_pids(self) -> None:
        """Remember this stack's processes (for the leak check at the end)."""
        for pid in (self._ps.supervisor_pid, self._ps.kernel_pid):
            if pid is None:
                continue
            self._pids.add(pid)
            with contextlib.suppress(psutil.Error):
                self._pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))

    def stop(self) -> None:
        """``isovisor down`` (the leak check comes at :meth:`close`)."""
        self._note_pids()
        if self._sub is not None:
            self.drain()
            self._sub.close()
            self._sub = None
        if self._ps.rd.running_pid() is not None:
            r = self.cli("down", timeout=90)
            if r.returncode != 0:
                raise AssertionError(f"isovisor down failed: {r.stdout}{r.stderr}")

    def close(self) -> list[str]:
        """Stop the stack whatever state it is in, kill what is left and remove its shared
        memory and directory; returns what had outlived ``isovisor down`` (empty if nothing)."""
        if self._closed:
            return []
        self._closed = True
        left: list[str] = []
        try:
            with contextlib.suppress(Exception):
                self.stop()
            self._note_pids()
            for pid in sorted(self._pids):
                with contextlib.suppress(psutil.Error):
                    p = psutil.Process(pid)
                    if p.status() != psutil.STATUS_ZOMBIE and str(self.dir) in " ".join(
                        p.cmdline()
                    ):
                        left.append(f"process {pid}: {' '.join(p.cmdline())[:120]}")
            if self._ps.supervisor_pid is not None:
                from isovisor.paths import shm_prefix_for

                prefix = shm_prefix_for(self._ps.supervisor_pid)
                left += [f"/dev/shm/{p.name}" for p in Path("/dev/shm").glob(prefix + "*")]
        finally:
            self._ps.pids = sorted({*self._ps.pids, *self._pids})
            self._ps.close()  # kills and removes whatever is left, in any case
        return left

    def log_tails(self, lines: int = 40) -> str:
        """The end of the driver and kernel logs (for a failure report)."""
        rd = self._ps.rd
        return "\n".join(
            f"--- {p.name} ---\n{log_tail(p, n)}"
            for p, n in ((rd.driver_log(self.driver_name), lines), (rd.kernel_log, lines // 2))
            if p.exists()
        )


#: Set in a test item's stash once its call or set-up failed (fixtures print logs then).
TEST_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Result[pytest.TestReport], None]:
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        item.stash[TEST_FAILED] = True


@pytest.fixture
def isovisor_stack(request: pytest.FixtureRequest) -> Iterator[MiniStack]:
    """A :class:`MiniStack` (call ``.start(backend, ...)``), stopped and cleaned up after the
    test; the test fails if a process or shared-memory segment outlived ``isovisor down``."""
    s = MiniStack()
    try:
        yield s
    finally:
        if request.node.stash.get(TEST_FAILED, False):
            with contextlib.suppress(Exception):
                print(s.log_tails(), file=sys.stderr)
        left = s.close()
        assert not left, f"left behind after `isovisor down`: {left}"
