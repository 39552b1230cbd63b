"""The console backend (Xen's xenconsoled): each domain's console output goes to a log file and to
live readers, and input goes back to the domain, through the rings of ``ipc/consif.py``.

One driver process serves the consoles of any number of domains, one device per ``attach``
(class ``console``, ``vdev`` "console", devid 0).  What every backend shares is the base's
(drivers/backendbase.py): the options check, the attach message and its class checked, the
segment mapped, the handshake (InitWait on attach, Connected on the frontend's Initialised; a
replacement instance that gets ``fe_state`` 4 right after ``attach`` *resumes*), the fault
injector, the counters and save/suspend/restore.  This module is the console's own work: the
page and the log journal after it checked (:meth:`ConsoleBackend.check_region`), the log file
``<log_dir>/<domain>.log`` opened on attach (append; created if missing), the output path, the
input path and the faults carried out on an append.  ``endpoints.py`` holds the ZeroMQ sockets
(and documents live readers: the message frames, and how a reader stitches them to the log file
by offset), ``persist.py`` what a console carries across a hot swap.

Output.  On every kick (and on connect and resume) the backend moves what the guest published in
``out`` to the log file, exactly once across a crash at any instant (the argument is in
``ipc/consif.py``), publishes it to live readers and then advances ``out_cons``.  On resume it
first finishes the append its predecessor may have left half-done (the journal) and reports
``["recovered", key, bytes, done_ns]``, where ``bytes`` counts what it had to append for its
predecessor.  Output the guest writes while no backend runs simply waits in the ring; a guest
whose ring is full blocks (with ``out_cons_event`` set) until a backend consumes, so nothing is
dropped.  If the log file cannot be written (disk full...), the bytes stay in the ring, the
device reports ``error`` once per streak, and the backend tries again on the next kick or input,
or at least a second later when anything else wakes it.  A frontend that closes, and a device
detached while connected, has its last output taken first (the base's ``drain``).

Sinks: a subclass may override :meth:`ConsoleBackend.output`, which is then called with every
append once its bytes are in the log file, before the commit, with their offset in the file
(the same offset as live readers get).  A replacement finishing a journaled append calls it
again for the whole append with the same offset, so the hook sees every byte at least once, in
order, and a sink that remembers the highest offset it handled makes it exactly once.  Whether
the hook is overridden is decided once, at construction: ``drivers.console`` pays nothing for
it.  An exception from the hook is logged and counted (``sink_errors``); it never stops the
console or the log (see :meth:`ConsoleBackend.output` for why this is not fail-stop).
:meth:`ConsoleBackend.save_sink` and :meth:`ConsoleBackend.open_sink` carry a sink's own data
for a console across a hot swap (``persist.py``: the device data's ``sink``).

Input: messages ``[domain, bytes]`` on the input socket (``endpoints.py``).  The bytes go into
that domain's ``in`` ring as it has room (the guest is notified if it asked); what does not fit
waits in a per-domain queue of at most ``input_queue_bytes``, delivered as the guest consumes
(it kicks when ``in_cons`` passes ``in_cons_event``).  Bytes beyond the queue, for a domain
without an attached console, or in a malformed message are dropped, counted
(:meth:`ConsoleBackend.statistics`) and logged.  Input is at most once: what waits in the queue
is lost if the backend process dies (a hot swap carries it over).

Guests are untrusted: an ``out_prod`` that moves backwards or claims more than the ring holds, or
an ``in_cons`` outside what was published, is a ``fault`` (the kernel crashes that domain) and
that console is not served any more (``Lifecycle.BROKEN``); the other consoles go on.

Fault injection (drivers/faults.py, docs/campaigns.md): the request a fault fires on is an append
of output to the log (``op`` = "write"; ``sector`` = a byte of the domain's output stream the
append covers).  ``write_log`` writes through ``self._write``, which is ``_write_injecting`` while
a fault is armed: it asks the injector about each append and carries out what fires
(``_carry_out``): a crash half-way through the append's bytes (a torn append, which the journal
exists for), a delay, a leak, the output never consumed again (``drop``: the device is
``Lifecycle.STOPPED`` and the kernel's request timeout sees the ring stuck), or one flipped byte
in the file (``corrupt_data``; live readers get the right bytes).  The types that spoil a
response are refused (a console has none), and so is ``poison``: the backend never gives up an
append, so there is no poison answer.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Final

import msgpack

from devices import console
from drivers.backendbase import Attach, BackendBase, BaseDevice, Lifecycle, StopServing
from drivers.backendkit import int_option
from drivers.console import persist
from drivers.console.endpoints import INPUT_NAME, MAX_SOCKET_PATH, PUB_NAME, Endpoints
from drivers.faults import Fault, RequestInfo
from drivers.state import DeviceState, Medium
from ipc import consif
from ipc.consif import ConsoleBack, Journal, JournalEntry
from ipc.ring import RingError
from ipc.shm import Segment

OPTIONS: Final[dict[str, str]] = {
    "run_dir": "the stack's run directory; log_dir and socket_dir default to <run_dir>/consoles "
    "(default: $ISOVISOR_RUN_DIR, else the current directory)",
    "log_dir": "where <domain>.log files are written (default: <run_dir>/consoles)",
    "socket_dir": "where console.pub (live output) and console.in (input) are bound "
    "(default: <run_dir>/consoles)",
    "input_queue_bytes": "input waiting for room in a domain's ring, at most (0..16777216, "
    "default 65536); more is dropped and counted",
}
#: Output bytes one kick moves before the other consoles get a turn.
TURN_BYTES: Final = 64 * 1024
#: Output bytes taken from a closing frontend (it may still be writing: no endless loop).
CLOSE_BYTES: Final = 1 << 20
#: Input messages taken per call before the other work gets a turn.
MAX_INPUT_MESSAGES: Final = 10_000
#: Seconds before a failed log append is tried again without a kick.
RETRY_S: Final = 1.0
#: Sink errors logged with their traceback before only every 1000th is.
SINK_ERRORS_LOGGED: Final = 20
_DOMAIN_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # ipc.schema.NAME_RE
_MASK: Final = (1 << 64) - 1
#: In-driver faults that end or stall the instance half-way through an append.
_DYING: Final = frozenset({"segv", "abort", "exit", "hang", "exception"})


@dataclass
class ConsoleStats:
    """One console's counters (:meth:`ConsoleBackend.statistics` sums them)."""

    #: Output bytes moved from the ring to the log file (committed).
    out_bytes: int = 0
    #: Input bytes put into the ring.
    in_bytes: int = 0
    #: Input bytes dropped (the queue was full).
    in_dropped: int = 0
    #: Appends of output.
    appends: int = 0
    #: Bytes appended to finish an append a previous instance (or a failed write) left undone.
    recovered_bytes: int = 0
    #: Notifications sent to the guest.
    notifications: int = 0
    #: Failed log writes.
    write_errors: int = 0


@dataclass(eq=False)
class Console(BaseDevice):
    """A console: the base's device, with its rings, its journal, its log file and its
    queued input."""

    stats: ConsoleStats = field(default_factory=ConsoleStats)
    ring: ConsoleBack | None = None
    journal: Journal | None = None
    #: The journal's page, after the window (set by ``open_device``).
    journal_view: memoryview = field(default_factory=lambda: memoryview(b""))
    log_path: Path = field(default_factory=Path)
    fd: int = -1
    #: Input waiting for room in the ring.
    inq: bytearray = field(default_factory=bytearray)
    #: The last log append failed with this (None: appends work); tried again at retry_at.
    write_error: str | None = None
    retry_at: float = 0.0
    drops_logged: int = 0

    @property
    def domain(self) -> str:
        return self.attach.domain


class SimulatedCrash(BaseException):
    """Tests only: raised by a :meth:`ConsoleBackend.checkpoint` override to stop an instance
    at a chosen point, as SIGKILL would (a BaseException, so nothing in the backend handles
    it)."""


def _default_dir(options: dict[str, Any]) -> Path:
    return console.default_dir(options)


def _dir_option(options: dict[str, Any], name: str, default: Path) -> Path:
    v = options.get(name)
    if v is None:
        path = default
    elif not isinstance(v, str) or not v:
        raise ValueError(f"{name} must be a directory path (a non-empty string), got {v!r}")
    else:
        path = Path(v).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise ValueError(f"{name} {path}: cannot create the directory: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {path}: the directory is not writable")
    return path


class ConsoleBackend(BackendBase[Console]):
    """The console driver (see the module docstring).  ``drivers.host`` instantiates it with
    ``(host, options)``; options are listed in :data:`OPTIONS`."""

    device_class = console.CLASS
    device_type = Console
    stats_type = ConsoleStats
    state_kind: ClassVar[str] = "isovisor.console"
    state_version: ClassVar[int] = 1
    #: The counters travel in the device's own data (persist.py: version 1's layout).
    carry_counters = False
    OPTIONS: ClassVar[dict[str, str]] = OPTIONS
    STATISTICS = tuple(f.name for f in fields(ConsoleStats))
    DEVICE_STATISTICS = ("out_bytes", "in_bytes", "in_dropped")

    def configure(self, options: dict[str, Any]) -> None:
        default = _default_dir(options)
        self.log_dir = _dir_option(options, "log_dir", default)
        self.socket_dir = _dir_option(options, "socket_dir", default)
        self.endpoints = Endpoints(self.socket_dir, self.log)
        self.pub_endpoint = self.endpoints.pub_endpoint
        self.input_endpoint = self.endpoints.input_endpoint
        self.input_queue_bytes = int_option(options, "input_queue_bytes", 64 * 1024, 0, 16 << 20)
        self._by_domain: dict[str, int] = {}
        #: Input bytes for a domain with no console attached, and malformed input messages.
        self.unknown_input = 0
        self.unknown_messages = 0
        self.malformed_input = 0
        #: Consoles whose guest broke the protocol.
        self.faults = 0
        #: Writes an append's bytes: ``_write_all``, or ``_write_injecting`` while a fault is
        #: armed (so an unarmed driver pays nothing for the feature).
        self._write: Callable[[Console, bytes], None] = self._write_all
        #: Is :meth:`output` overridden (a sink)?  Decided once: the append path asks this
        #: flag, and ``drivers.console`` never calls the empty hook.
        self.has_sink = type(self).output is not ConsoleBackend.output
        #: Exceptions raised by the sink's hooks (logged, counted, not fatal).
        self.sink_errors = 0

    # -- the host's hooks beyond the base's ---------------------------------------------------
    def fds(self) -> list[int]:
        """The host waits on these beside the kernel's messages: the input socket."""
        fd = self.endpoints.fd
        return [] if fd is None else [fd]

    def readable(self, fd: int) -> None:
        self._take_input()
        self._retry_stalled()

    def kick(self, key: int) -> None:
        super().kick(key)
        self._take_input()
        self._retry_stalled()

    def close(self) -> None:
        super().close()
        self.endpoints.terminate()

    def suspend(self) -> None:
        """The base's (every console released; the rings keep what the guests write meanwhile,
        the journals stay in the segments), and the endpoints released for the next
        implementation."""
        super().suspend()
        self.endpoints.close()

    # -- attach and detach (the base's hooks) --------------------------------------------------
    def check_region(self, a: Attach, segment: Segment) -> str | None:
        if not consif.WINDOW_BYTES <= a.window <= segment.size:
            return (
                f"window {a.window:#x} must hold the console page ({consif.WINDOW_BYTES:#x} "
                f"bytes) and fit segment {a.segment} of {segment.size:#x} bytes"
            )
        off = a.inflight_offset
        if off < a.window or off + consif.JOURNAL_BYTES > segment.size:
            return (
                f"journal at {off:#x} ({consif.JOURNAL_BYTES} bytes) must lie "
                f"after the window {a.window:#x} inside segment {a.segment} of "
                f"{segment.size:#x} bytes"
            )
        return None

    def check_attach(self, a: Attach) -> str | None:
        if not _DOMAIN_RE.match(a.domain):
            return (
                f"domain name {a.domain!r} cannot name a log file: use 1-63 "
                "letters, digits, '_', '.', '-', starting with a letter or "
                "digit"
            )
        other = self._by_domain.get(a.domain)
        if other is not None:
            return (
                f"domain {a.domain} already has console device {other} "
                "attached (one console per domain)"
            )
        return None

    def open_device(self, d: Console) -> None:
        a = d.attach
        log_path = self.log_dir / f"{a.domain}.log"
        try:
            d.fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as e:
            raise ValueError(f"cannot open the log file {log_path}: {e.strerror}") from None
        d.log_path = log_path
        d.journal_view = d.mem[a.inflight_offset : a.inflight_offset + consif.JOURNAL_BYTES]
        self._by_domain[a.domain] = a.key
        if self.endpoints.bind():
            self.log.info(
                "console output at %s, input at %s, logs in %s",
                self.pub_endpoint,
                self.input_endpoint,
                self.log_dir,
            )
        self.log.info("console %d (%s): logging to %s", a.key, d.label, log_path)
        carried = d.saved.data.get("sink", {}) if d.saved is not None else {}
        self._sink_call(d, "open_sink", self.open_sink, d, carried)

    def close_device(self, d: Console, *, handover: bool) -> None:
        if self._by_domain.get(d.domain) == d.key:
            del self._by_domain[d.domain]
        with contextlib.suppress(OSError):
            os.close(d.fd)
        d.journal_view.release()

    def summary(self, d: Console) -> str:
        s = d.stats
        return f"{s.out_bytes} bytes out, {s.in_bytes} in, {s.in_dropped} input bytes dropped"

    # -- the frontend's state (the base's hooks) -----------------------------------------------
    def connect(self, d: Console, *, resume: bool) -> None:
        try:
            ring = ConsoleBack(d.region)
            journal = Journal(d.journal_view)
        except (RingError, ValueError) as e:
            self._break(d, f"cannot attach the console rings: {e}")
            return
        if not resume or not journal.valid:
            st = os.fstat(d.fd)
            journal.reset(ring.out_cons, st.st_size, st.st_dev, st.st_ino)
        d.ring, d.journal = ring, journal
        self.connected(d, resume=resume, detail=f" at out_cons={ring.out_cons}")
        if resume:
            replayed = 0
            notify = False
            try:
                entry = journal.pending(ring.out_cons)
                if entry is not None:
                    replayed, notify = self._finish(d, entry)
            except RingError as e:
                self._break(d, str(e))
                return
            except OSError as e:
                self._write_failed(d, e)
            done_ns = time.monotonic_ns()
            if notify:
                self._notify(d)
            self.host.recovered(d.key, replayed, done_ns)
        self.service(d)

    def service(self, d: Console) -> None:
        self._pump_out(d)
        if d.state is Lifecycle.CONNECTED and d.inq:
            self._push_in(d)

    def drain(self, d: Console, *, detaching: bool) -> None:
        """The domain's last words: everything on detach, at most CLOSE_BYTES from a frontend
        that closes (it may still be writing)."""
        self._pump_out(d, budget=None if detaching else CLOSE_BYTES)

    def disconnect(self, d: Console) -> None:
        d.ring = None
        d.journal = None

    def _break(self, d: Console, message: str) -> None:
        d.inq.clear()
        self.faults += 1
        super()._break(d, message)

    # -- the sink: what a subclass may override -------------------------------------------------
    def output(self, console: Console, offset: int, data: bytes) -> None:
        """Sink hook: ``data`` is a chunk of ``console``'s output (one append, at most
        ``ipc.consif.OUT_SIZE`` bytes), now in the console's log file at byte ``offset``.
        Not called unless a subclass overrides it.

        Contract: every byte of the output reaches the hook at least once, in order, each
        chunk right after it is in the log file and before the guest's ring is advanced past
        it (the commit).  A chunk is offered twice only when an instance died after offering
        it and before the commit: the replacement finishes the journaled append and offers it
        again, with the same ``offset`` and the same bytes.  So ``offset`` names a byte for
        good (its position in ``console.log_path``): a sink that remembers the end of what it
        handled (``offset + len(data)``), keeps that where it finds it again after a crash,
        and skips what lies below it, handles every byte exactly once.  Apart from such a
        repeat a domain's offsets only grow (its log file is appended to across its lives).  A
        gap between what the sink handled and ``offset`` is output logged while the sink was
        not serving (another backend served it, or the hook raised): it is in the log file.

        It runs on the driver's loop, between the log write and the commit, once per append:
        keep it cheap.  While it runs no console is served, and a hook that blocks longer than
        the driver's ``watchdog_sec`` gets the process replaced as hung.

        An exception is logged with its traceback (the first ``SINK_ERRORS_LOGGED``, then
        every 1000th) and counted (``sink_errors`` in :meth:`statistics`); the console goes on
        and that chunk is not offered again.  Not fail-stop on purpose: a replacement would
        offer the same chunk again, a deterministic bug would raise again, and the driver
        would be replaced until it is ``FATAL``, leaving every guest's console to the kernel,
        for the sake of a consumer of the log rather than the log itself.  (A ``BaseException``
        such as ``SystemExit`` still ends the process.)"""

    def save_sink(self, console: Console) -> dict[str, Any]:
        """What the sink carries for ``console`` to the next implementation in a hot swap
        (msgpack-able: maps, lists, strings, numbers, booleans); the next one gets it in its
        :meth:`open_sink`.  The default: ``{}`` (nothing is carried).  Called when the driver
        is drained for a swap, on the loop.  Only a swap carries it: keep what must survive a
        crash where the sink can find it again (its own output)."""
        return {}

    def open_sink(self, console: Console, data: dict[str, Any]) -> None:
        """``console`` is attached to this instance (a first attach, after a crash, after a
        swap), before any of its output reaches :meth:`output`.  ``data`` is what the
        previous implementation's :meth:`save_sink` returned for it in a swap, ``{}``
        otherwise (and after a swap from a backend without a sink, such as
        ``drivers.console``).  The default does nothing."""

    def _sink_call(self, d: Console, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """Call a sink hook; an exception is logged (rate-limited) and counted, and None
        returned."""
        try:
            return fn(*args)
        except Exception:
            self.sink_errors += 1
            n = self.sink_errors
            if n <= SINK_ERRORS_LOGGED or n % 1000 == 0:
                self.log.exception(
                    "console %d (%s): the sink's %s raised (%d sink error(s) so far); the "
                    "console and its log go on%s",
                    d.key,
                    d.label,
                    what,
                    n,
                    "" if n < SINK_ERRORS_LOGGED else ", only every 1000th error is logged",
                )
            return None

    # -- output --------------------------------------------------------------------------------
    def checkpoint(self, where: str) -> None:
        """Tests only: called at each step of an append (``journaled``: the entry is written;
        ``appended``: the bytes are in the file; ``published``: live readers and the sink
        have them).  Overridden to raise :class:`SimulatedCrash`, it stops the instance
        there."""

    def write_log(self, d: Console, data: bytes) -> None:
        """Append ``data`` to the console's log file (O_APPEND), however many writes it
        takes.  OSError leaves a prefix in the file.  (Through the fault-injection layer while
        a fault is armed.)"""
        self._write(d, data)

    def _write_all(self, d: Console, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(d.fd, view)
            view = view[n:]

    def _pump_out(self, d: Console, budget: int | None = TURN_BYTES) -> None:
        """Move the published output to the log file and the readers.  ``budget``: bytes
        before the other consoles get a turn (None: everything, on detach)."""
        ring, journal = d.ring, d.journal
        assert ring is not None and journal is not None
        notify = False
        moved = 0
        try:
            entry = journal.pending(ring.out_cons)
            if entry is not None:  # a failed write left it: finish it before anything else
                notify |= self._finish(d, entry)[1]
            while True:
                n = ring.out_available()
                if not n:
                    if ring.out_final_check():
                        continue
                    break
                notify |= self._append(d, ring, journal, n)
                moved += n
                if budget is not None and moved >= budget:
                    self.host.kick_again(d.key)
                    break
        except RingError as e:
            self._break(d, str(e))
        except OSError as e:
            self._write_failed(d, e)
        except StopServing as e:
            d.state = Lifecycle.STOPPED
            self.log.warning(
                "console %d (%s): %s; the console is no longer served", d.key, d.label, e
            )
        else:
            if d.write_error is not None:
                self.log.warning(
                    "console %d (%s): the log file can be written again", d.key, d.label
                )
                d.write_error = None
        if notify and d.state is Lifecycle.CONNECTED:
            self._notify(d)

    def _append(self, d: Console, ring: ConsoleBack, journal: Journal, n: int) -> bool:
        """One append of the ``n`` bytes from ``out_cons`` (see ipc/consif.py); True if the
        guest asked to be notified of the room."""
        cons = ring.out_cons
        data = ring.out_peek(cons, n)
        st = os.fstat(d.fd)
        journal.begin(cons, n, st.st_size, st.st_dev, st.st_ino)
        self.checkpoint("journaled")
        self.write_log(d, data)
        self.checkpoint("appended")
        self._publish(d, st.st_size, data)
        self.checkpoint("published")
        notify = ring.out_commit(cons + n)
        d.stats.out_bytes += n
        d.stats.appends += 1
        return notify

    def _finish(self, d: Console, entry: JournalEntry) -> tuple[int, bool]:
        """Finish a pending append: append what did not reach the file, publish the whole
        append, commit.  Returns (bytes appended now, notify the guest?)."""
        ring = d.ring
        assert ring is not None
        avail = ring.out_available()
        if avail < entry.length or entry.length > consif.OUT_SIZE:
            raise RingError(
                f"console out ring: out_prod={ring.out_prod_seen} no longer covers "
                f"the append in progress, bytes [{entry.cons_at}, "
                f"{(entry.cons_at + entry.length) & _MASK}) (it moved backwards)"
            )
        st = os.fstat(d.fd)
        grown = st.st_size - entry.size_at
        if (st.st_dev & _MASK, st.st_ino & _MASK) != (entry.file_dev, entry.file_ino):
            why = "the log file was replaced"
        elif grown < 0:
            why = f"the log file shrank below {entry.size_at} bytes"
        elif grown > entry.length:
            why = (
                f"the log file grew by {grown} bytes, more than the {entry.length} of the "
                "append (another writer?)"
            )
        else:
            why = ""
        written = 0 if why else grown
        if why:
            self.log.warning(
                "console %d (%s): %s since the append of %d bytes at offset %d "
                "began: appending all of them again (some may be there twice)",
                d.key,
                d.label,
                why,
                entry.length,
                entry.size_at,
            )
        data = ring.out_peek(entry.cons_at, entry.length)
        rest = data[written:]
        if rest:
            self.write_log(d, rest)
        self.log.info(
            "console %d (%s): finished an append of %d bytes left undone (%d were "
            "in the file already)",
            d.key,
            d.label,
            entry.length,
            written,
        )
        self._publish(d, st.st_size if why else entry.size_at, data)
        notify = ring.out_commit(entry.cons_at + entry.length)
        d.stats.out_bytes += entry.length
        d.stats.appends += 1
        d.stats.recovered_bytes += len(rest)
        return len(rest), notify

    def _publish(self, d: Console, offset: int, data: bytes) -> None:
        """An append is in the file at ``offset``: to the live readers, and to the sink."""
        self.endpoints.publish(d.domain, offset, data)
        if self.has_sink:
            self._sink_call(d, "output", self.output, d, offset, data)

    def _write_failed(self, d: Console, e: OSError) -> None:
        d.stats.write_errors += 1
        d.retry_at = time.monotonic() + RETRY_S
        first = d.write_error is None
        d.write_error = f"cannot append to {d.log_path}: {e.strerror or e}"
        if first:
            self.log.error(
                "console %d (%s): %s; the output waits in the ring and is written "
                "when the file can be written again",
                d.key,
                d.label,
                d.write_error,
            )
            self.host.error(d.key, d.write_error)

    def _retry_stalled(self) -> None:
        now = time.monotonic()
        for d in list(self.devices.values()):
            if d.write_error is not None and d.state is Lifecycle.CONNECTED and now >= d.retry_at:
                self._pump_out(d)

    # -- input ---------------------------------------------------------------------------------
    def _take_input(self) -> None:
        """Take the input messages waiting on the input socket."""
        messages = self.endpoints.receive(MAX_INPUT_MESSAGES)
        for frames in messages:
            self._queue_input(frames)
        if len(messages) >= MAX_INPUT_MESSAGES:
            for key in self.devices:  # come back next round: kick() takes input too
                self.host.kick_again(key)
                break

    def _queue_input(self, frames: list[bytes]) -> Console | None:
        if len(frames) != 2:
            self._malformed(f"{len(frames)} frames, expected 2 ([domain, bytes])")
            return None
        try:
            domain = frames[0].decode()
        except UnicodeDecodeError:
            self._malformed(f"the domain frame {frames[0][:40]!r} is not UTF-8")
            return None
        data = frames[1]
        key = self._by_domain.get(domain)
        d = self.devices.get(key) if key is not None else None
        if d is None or d.state in (Lifecycle.CLOSED, Lifecycle.BROKEN):
            self.unknown_input += len(data)
            self.unknown_messages += 1
            if self.unknown_messages <= 20 or self.unknown_messages % 1000 == 0:
                self.log.warning(
                    "input for %r dropped (%d bytes): no console of that domain "
                    "is being served (%d such messages so far)",
                    domain[:64],
                    len(data),
                    self.unknown_messages,
                )
            return None
        # what can reach the ring or the queue at all (no more is ever held in memory)
        keep = max(0, self.input_queue_bytes + consif.IN_SIZE - len(d.inq))
        dropped = max(0, len(data) - keep)
        d.inq += data[:keep]
        if d.state is Lifecycle.CONNECTED:
            self._push_in(d)  # what fits goes into the ring at once
        excess = len(d.inq) - self.input_queue_bytes
        if excess > 0:  # the newest bytes go
            del d.inq[len(d.inq) - excess :]
            dropped += excess
        if dropped:
            d.stats.in_dropped += dropped
            d.drops_logged += 1
            if d.drops_logged <= 20 or d.drops_logged % 1000 == 0:
                self.log.warning(
                    "console %d (%s): %d input bytes dropped: the guest is not "
                    "reading and %d bytes already wait (input_queue_bytes); %d "
                    "dropped so far",
                    d.key,
                    d.label,
                    dropped,
                    len(d.inq),
                    d.stats.in_dropped,
                )
        return d

    def _malformed(self, why: str) -> None:
        self.malformed_input += 1
        if self.malformed_input <= 20 or self.malformed_input % 1000 == 0:
            self.log.warning(
                "ignoring a malformed input message: %s (%d so far)", why, self.malformed_input
            )

    def _push_in(self, d: Console) -> None:
        """Move queued input into the ring as far as it has room."""
        ring = d.ring
        assert ring is not None
        notify = False
        try:
            while d.inq:
                room = ring.in_room()
                if not room:
                    if ring.in_wait_for_room():
                        continue
                    break
                chunk = bytes(d.inq[:room])
                notify |= ring.in_put(chunk)
                del d.inq[: len(chunk)]
                d.stats.in_bytes += len(chunk)
        except RingError as e:
            self._break(d, str(e))
            return
        if notify:
            self._notify(d)

    def _notify(self, d: Console) -> None:
        d.stats.notifications += 1
        self.host.notify(d.key)

    # -- fault injection (drivers/faults.py; docs/campaigns.md) ---------------------------------
    def faults_changed(self) -> None:
        self._write = self._write_injecting if self.injector.armed else self._write_all

    def _write_injecting(self, d: Console, data: bytes) -> None:
        """``_write`` while a fault is armed: ask the injector about this append."""
        f = self.injector.pick(
            RequestInfo(
                d.domain, consif.DEVICE_NAME, "write", self._position(d, len(data)), len(data)
            )
        )
        if f is None:
            self._write_all(d, data)
            return
        self.faults_changed()  # from the next append on: no more questions, if it is spent
        self.host.fault_fired(f.id, f.type, d.label)
        self._carry_out(f, d, data)

    @staticmethod
    def _position(d: Console, n: int) -> int:
        """Where in the domain's output stream the ``n`` bytes being written start: the end
        of the append in progress (the journal's pending entry) less ``n``."""
        ring, journal = d.ring, d.journal
        entry = journal.pending(ring.out_cons) if ring is not None and journal is not None else None
        return 0 if entry is None else (entry.cons_at + entry.length - n) & _MASK

    def _carry_out(self, f: Fault, d: Console, data: bytes) -> None:
        """Write ``data`` (the bytes of an append) as fault ``f`` says."""
        kind = f.type
        if kind in _DYING:
            half = len(data) // 2
            self._write_all(d, data[:half])  # a torn append: the replacement finishes it
            self.host.carry_out(kind, really=f.really)
            data = data[half:]  # (inline, the kinds that would stop the kernel are refused)
        elif kind == "slow":
            time.sleep(self.injector.delay_s(f))
        elif kind == "drop":
            raise StopServing(
                f"fault {f.id}: drop (an append of {len(data)} bytes is never "
                "written, and the output is not consumed any more)"
            )
        elif kind == "corrupt_data" and data:
            spoiled = bytearray(data)
            spoiled[len(data) // 2] ^= 0xFF
            self.log.warning(
                "console %d (%s): fault injected: corrupt_data, byte %d of an "
                "append of %d bytes flipped in the log",
                d.key,
                d.label,
                len(data) // 2,
                len(data),
            )
            data = bytes(spoiled)
        elif kind in ("leak_mem", "leak_fd"):
            self.host.carry_out(kind)
        self._write_all(d, data)

    # -- statistics (the base's hooks) -------------------------------------------------------
    def backend_statistics(self) -> dict[str, int | float | str]:
        out: dict[str, int | float | str] = {
            "in_queued": sum(len(d.inq) for d in self.devices.values()),
            "unknown_input": self.unknown_input,
            "malformed_input": self.malformed_input,
            "faults": self.faults,
        }
        if self.has_sink:  # drivers.console's keys stay as they were
            out["sink_errors"] = self.sink_errors
        return out

    def statistics_label(self, d: Console) -> str:
        return d.domain  # <domain>.out_bytes, .in_bytes, .in_dropped

    # -- hot swap (the base's hooks; persist.py) -----------------------------------------------
    def carries(self, d: Console) -> bool:
        return d.state not in (Lifecycle.CLOSED, Lifecycle.BROKEN)

    def device_media(self, d: Console) -> tuple[Medium, Medium]:
        medium = persist.log_medium(d.log_path)
        return medium, medium

    def device_data(self, d: Console) -> dict[str, Any]:
        sink = self._sink_call(d, "save_sink", self._saved_sink, d)
        return persist.device_data(d.domain, d.stats, d.inq, sink or {})

    def _saved_sink(self, d: Console) -> dict[str, Any]:
        """:meth:`save_sink`, checked: TypeError if it cannot travel in a state."""
        sink = self.save_sink(d)
        if not isinstance(sink, dict):
            raise TypeError(f"save_sink returned {type(sink).__name__}, not a dict")
        msgpack.packb(sink)  # TypeError (or ValueError, OverflowError) for what cannot travel
        return sink

    def restore_device(self, saved: DeviceState) -> DeviceState:
        return persist.checked(saved, self.stats_type, self.input_queue_bytes)

    def restore_data(self, d: Console, data: dict[str, Any]) -> None:
        d.inq += persist.restore(data, d.stats)

    def backend_data(self) -> dict[str, Any]:
        return persist.backend_data(self.log_dir, self.socket_dir)

    def restore_backend_data(self, data: dict[str, Any]) -> None:
        persist.check_backend_data(data, self.log_dir, self.log)


class Backend(ConsoleBackend):
    """``drivers.console``: the console driver."""


__all__ = [
    "INPUT_NAME",
    "MAX_SOCKET_PATH",
    "OPTIONS",
    "PUB_NAME",
    "Backend",
    "Console",
    "ConsoleBackend",
    "ConsoleStats",
    "SimulatedCrash",
]
