"""The console backend (Xen's xenconsoled): each domain's console output goes to a log file and to
live readers, and input goes back to the domain, through the rings of ``ipc/consif.py``.

One driver process serves the consoles of any number of domains, one device per ``attach``
(``"class": "console"``, ``vdev`` "console", devid 0).  The handshake mirrors the block driver's
(docs/devices.md): on ``attach`` the backend maps the device's segment, opens
``<log_dir>/<domain>.log`` (append; created if missing) and writes backend ``state`` = 2
(InitWait); on the frontend's Initialised (3) it attaches the rings and writes 4 (Connected).  A
replacement instance gets ``attach`` and then ``fe_state`` 4: it *resumes*, finishing first the
append its predecessor may have left half-done (the journal, ``ipc/consif.py``), and reports
``["recovered", key, bytes, done_ns]``, where ``bytes`` counts what it had to append for its
predecessor.

Output.  On every kick (and on connect and resume) the backend moves what the guest published in
``out`` to the log file, exactly once across a crash at any instant (the argument is in
``ipc/consif.py``), publishes it to live readers and then advances ``out_cons``.  Output the guest
writes while no backend runs simply waits in the ring; a guest whose ring is full blocks (with
``out_cons_event`` set) until a backend consumes, so nothing is dropped.  If the log file cannot
be written (disk full...), the bytes stay in the ring, the device reports ``error`` once per
streak, and the backend tries again on the next kick or input, or at least a second later when
anything else wakes it.

Live readers: a ZeroMQ PUB socket bound at ``ipc://<socket_dir>/console.pub``.  Each append is
one message of three frames: the domain's name (UTF-8; subscribe to it, and compare the frame
exactly, since ZeroMQ topics match by prefix), the offset in the log file where the bytes start
(u64, little-endian) and the bytes.  Offsets of one domain's messages are contiguous, except that
a replacement backend publishes again the whole append its predecessor died in (from that
append's start), and a reader may miss messages (slow joiner, a full queue).  A reader therefore
subscribes, reads the file to its end, and stitches messages on by offset: drop what lies below
what it has, read a gap from the file.  :class:`ipc.consif.Follower` does exactly that.

Input: a ZeroMQ PULL socket bound at ``ipc://<socket_dir>/console.in`` takes messages of two
frames, ``[domain (UTF-8), bytes]``.  The bytes go into that domain's ``in`` ring as it has room
(the guest is notified if it asked); what does not fit waits in a per-domain queue of at most
``input_queue_bytes``, delivered as the guest consumes (it kicks when ``in_cons`` passes
``in_cons_event``).  Bytes beyond the queue, for a domain without an attached console, or in a
malformed message are dropped, counted (:meth:`ConsoleBackend.statistics`) and logged.  Input
is at most once: what waits in the queue is lost if the backend process dies (a hot swap carries
it over).

The sockets are bound when the backend first serves a device (so a warm spare does not take the
endpoints from the running instance) and released by ``suspend`` (a hot swap) and ``close``.
The input socket is waited on through the host's ``fds()``/``readable(fd)`` hook.

Guests are untrusted: an ``out_prod`` that moves backwards or claims more than the ring holds, or
an ``in_cons`` outside what was published, is a ``fault`` (the kernel crashes that domain) and
that console is not served any more; the other consoles go on.

Fault injection (drivers/faults.py, docs/campaigns.md): the request a fault fires on is an append
of output to the log (``op`` = "write"; ``sector`` = a byte of the domain's output stream the
append covers).  ``write_log`` writes through ``self._write``, which is ``_write_injecting`` while
a fault is armed: it asks the injector about each append and carries out what fires
(``_carry_out``): a crash half-way through the append's bytes (a torn append, which the journal
exists for), a delay, a leak, the output never consumed again (``drop``: the kernel's request
timeout sees the ring stuck), or one flipped byte in the file (``corrupt_data``; live readers get
the right bytes).  The types that spoil a response are refused (a console has none), and so is
``poison``: the backend never gives up an append, so there is no poison answer.
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import zmq

from drivers.backendkit import Host, int_option, msg_field, refuse
from drivers.faults import Fault, Injector, RequestInfo, fault_classes
from drivers.state import BackendState, DeviceState, Medium, StateError, accept
from ipc import consif
from ipc.consif import ConsoleBack, Journal, JournalEntry, encode_offset
from ipc.ring import RingError
from ipc.shm import Segment, SegmentError
from ipc.store import DevState

OPTIONS: dict[str, str] = {
    "run_dir": "the stack's run directory; log_dir and socket_dir default to <run_dir>/consoles "
    "(default: $ISOVISOR_RUN_DIR, else the current directory)",
    "log_dir": "where <domain>.log files are written (default: <run_dir>/consoles)",
    "socket_dir": "where console.pub (live output) and console.in (input) are bound "
    "(default: <run_dir>/consoles)",
    "input_queue_bytes": "input waiting for room in a domain's ring, at most (0..16777216, "
    "default 65536); more is dropped and counted",
}
PUB_NAME = consif.PUB_NAME
INPUT_NAME = consif.INPUT_NAME
#: Unix socket paths longer than this cannot be bound (isovisor.paths uses the same limit).
MAX_SOCKET_PATH = 100
#: Output bytes one kick moves before the other consoles get a turn.
TURN_BYTES = 64 * 1024
#: Output bytes taken from a closing frontend (it may still be writing: no endless loop).
CLOSE_BYTES = 1 << 20
#: Input messages taken per call before the other work gets a turn.
MAX_INPUT_MESSAGES = 10_000
#: Seconds before a failed log append is tried again without a kick.
RETRY_S = 1.0
SNDHWM = 10_000
RCVHWM = 10_000
_DOMAIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")  # ipc.schema.NAME_RE
_MASK = (1 << 64) - 1


@dataclass
class ConsoleStats:
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


@dataclass
class _Console:
    key: int
    domid: int
    domain: str
    store: str
    scratch: str
    segment: Segment
    mem: memoryview  # the whole segment
    region: memoryview  # the guest-visible window
    journal_view: memoryview
    log_path: Path
    fd: int
    #: waiting | connected | closed | broken | lost count (an injected drop)
    state: str = "waiting"
    ring: ConsoleBack | None = None
    journal: Journal | None = None
    stats: ConsoleStats = field(default_factory=ConsoleStats)
    inq: bytearray = field(default_factory=bytearray)
    #: The last log append failed with this (None: appends work); tried again at retry_at.
    write_error: str | None = None
    retry_at: float = 0.0
    drops_logged: int = 0

    @property
    def label(self) -> str:
        return f"{self.domain}/console"


#: In-driver faults that end or stall the instance half-way through an append.
_DYING = frozenset({"segv", "abort", "exit", "hang", "exception"})


class _StopServing(Exception):
    """An injected ``drop``: the backend loses track of a console and consumes no more."""


class SimulatedCrash(BaseException):
    """Tests only: raised by a :meth:`ConsoleBackend.checkpoint` override to stop an instance
    at a chosen point, as SIGKILL would (a BaseException, so nothing in the backend handles
    it)."""


def _default_dir(options: dict[str, Any]) -> Path:
    run_dir = options.get("run_dir")
    if run_dir is None:
        run_dir = os.environ.get("ISOVISOR_RUN_DIR", "").strip() or "."
    elif not isinstance(run_dir, str) or not run_dir:
        raise ValueError(f"run_dir must be a directory path (a non-empty string), got {run_dir!r}")
    return Path(run_dir).expanduser().resolve() / "consoles"


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


class ConsoleBackend:
    """The console driver (see the module docstring).  ``drivers.host`` instantiates it with
    ``(host, options)``; options are listed in :data:`OPTIONS`."""

    OPTIONS: ClassVar[dict[str, str]] = OPTIONS
    state_kind: ClassVar[str] = "isovisor.console"
    state_version: ClassVar[int] = 1

    def __init__(self, host: Host, options: dict[str, Any]) -> None:
        if not isinstance(options, dict):
            raise TypeError(
                f"console backend options must be a mapping, got {type(options).__name__}"
            )
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            allowed = "; ".join(f"{k}: {v}" for k, v in self.OPTIONS.items())
            raise ValueError(
                f"unknown console backend option(s) {', '.join(unknown)}; allowed: {allowed}"
            )
        self.host = host
        self.log = host.log
        self.implementation: str = (
            getattr(host, "implementation", None)
            or f"{type(self).__module__}:{type(self).__qualname__}"
        )
        default = _default_dir(options)
        self.log_dir = _dir_option(options, "log_dir", default)
        self.socket_dir = _dir_option(options, "socket_dir", default)
        for name in (PUB_NAME, INPUT_NAME):
            path = self.socket_dir / name
            if len(str(path)) > MAX_SOCKET_PATH:
                raise ValueError(
                    f"socket_dir {self.socket_dir} is too long for a Unix socket: "
                    f"{path} has {len(str(path))} bytes, at most "
                    f"{MAX_SOCKET_PATH}; choose a shorter socket_dir or run_dir"
                )
        self.pub_endpoint = f"ipc://{self.socket_dir / PUB_NAME}"
        self.input_endpoint = f"ipc://{self.socket_dir / INPUT_NAME}"
        self.input_queue_bytes = int_option(options, "input_queue_bytes", 64 * 1024, 0, 16 << 20)
        self.devices: dict[int, _Console] = {}
        self._by_domain: dict[str, int] = {}
        #: Devices restored (hot swap) and not attached yet, by key.
        self._restored: dict[int, tuple[ConsoleStats, bytes]] = {}
        self._ctx: zmq.Context[Any] | None = None
        self._pub: zmq.Socket[Any] | None = None
        self._input: zmq.Socket[Any] | None = None
        self._input_fd: int | None = None
        self._bind_failed = False
        #: Input bytes for a domain with no console attached, and malformed input messages.
        self.unknown_input = 0
        self.unknown_messages = 0
        self.malformed_input = 0
        self.faults = 0
        self.publish_errors = 0
        #: Faults armed by the supervisor (drivers/faults.py).
        self.injector = Injector(fclass=fault_classes()["console"])
        #: Writes an append's bytes: ``_write_all``, or ``_write_injecting`` while a fault is
        #: armed (so an unarmed driver pays nothing for the feature).
        self._write: Callable[[_Console, bytes], None] = self._write_all

    # -- sockets -------------------------------------------------------------------------------
    def _ensure_sockets(self) -> None:
        """Bind the live-output and input endpoints (once; again after suspend)."""
        if self._pub is not None:
            return
        ctx = self._ctx = self._ctx or zmq.Context()
        pub = ctx.socket(zmq.PUB)
        inp = ctx.socket(zmq.PULL)
        try:
            for s in (pub, inp):
                s.setsockopt(zmq.LINGER, 0)
            pub.setsockopt(zmq.SNDHWM, SNDHWM)
            inp.setsockopt(zmq.RCVHWM, RCVHWM)
            pub.bind(self.pub_endpoint)
            inp.bind(self.input_endpoint)
        except zmq.ZMQError as e:
            pub.close(0)
            inp.close(0)
            if not self._bind_failed:
                self.log.error(
                    "cannot bind the console endpoints %s and %s: %s; logs are "
                    "written, but there is no live output or input until the next "
                    "attach binds them",
                    self.pub_endpoint,
                    self.input_endpoint,
                    e,
                )
            self._bind_failed = True
            return
        self._bind_failed = False
        self._pub, self._input = pub, inp
        self._input_fd = int(inp.getsockopt(zmq.FD))
        self.log.info(
            "console output at %s, input at %s, logs in %s",
            self.pub_endpoint,
            self.input_endpoint,
            self.log_dir,
        )

    def _close_sockets(self) -> None:
        for s in (self._pub, self._input):
            if s is not None:
                s.close(0)
        self._pub = self._input = None
        self._input_fd = None

    def fds(self) -> list[int]:
        """The host waits on these beside the kernel's messages: the input socket."""
        return [] if self._input_fd is None else [self._input_fd]

    def readable(self, fd: int) -> None:
        self._take_input()
        self._retry_stalled()

    # -- messages ------------------------------------------------------------------------------
    def attach(self, dev: dict[str, Any]) -> None:
        key = dev.get("key")
        store = dev.get("store")
        if isinstance(key, int) and key in self.devices:
            self.log.warning("console %d attached again: dropping the old attachment", key)
            self.detach(key)
        try:
            key = msg_field(dev, "key", int)
            store = msg_field(dev, "store", str).rstrip("/")
            domid = msg_field(dev, "domid", int)
            domain = msg_field(dev, "domain", str)
            seg_name = msg_field(dev, "segment", str)
            window = msg_field(dev, "window", int)
            journal_offset = msg_field(dev, "inflight_offset", int)
            scratch = dev.get("scratch", "")
            if not isinstance(scratch, str):
                raise ValueError(f"attach field 'scratch' is {scratch!r}, expected str")
            cls = dev.get("class", consif.CLASS_NAME)
            if cls != consif.CLASS_NAME:
                raise ValueError(
                    f"attach field 'class' is {cls!r}: this driver serves "
                    f"{consif.CLASS_NAME!r} devices only"
                )
            if not _DOMAIN_RE.match(domain):
                raise ValueError(
                    f"domain name {domain!r} cannot name a log file: use 1-63 "
                    "letters, digits, '_', '.', '-', starting with a letter or "
                    "digit"
                )
            other = self._by_domain.get(domain)
            if other is not None:
                raise ValueError(
                    f"domain {domain} already has console device {other} "
                    "attached (one console per domain)"
                )
        except ValueError as e:
            self._refuse(key, store, str(e))
            return
        try:
            segment = Segment(seg_name, 0, create=False)
        except SegmentError as e:
            self._refuse(key, store, f"cannot map device segment {seg_name}: {e}")
            return
        problem = None
        if not consif.WINDOW_BYTES <= window <= segment.size:
            problem = (
                f"window {window:#x} must hold the console page ({consif.WINDOW_BYTES:#x} "
                f"bytes) and fit segment {seg_name} of {segment.size:#x} bytes"
            )
        elif journal_offset < window or journal_offset + consif.JOURNAL_BYTES > segment.size:
            problem = (
                f"journal at {journal_offset:#x} ({consif.JOURNAL_BYTES} bytes) must lie "
                f"after the window {window:#x} inside segment {seg_name} of "
                f"{segment.size:#x} bytes"
            )
        log_path = self.log_dir / f"{domain}.log"
        fd = -1
        if problem is None:
            try:
                fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            except OSError as e:
                problem = f"cannot open the log file {log_path}: {e.strerror}"
        if problem is not None:
            segment.close()
            self._refuse(key, store, problem)
            return
        mem = memoryview(segment.buf)
        d = _Console(
            key=key,
            domid=domid,
            domain=domain,
            store=store,
            scratch=scratch,
            segment=segment,
            mem=mem,
            region=mem[:window],
            journal_view=mem[journal_offset : journal_offset + consif.JOURNAL_BYTES],
            log_path=log_path,
            fd=fd,
        )
        restored = self._restored.pop(key, None)
        if restored is not None:
            d.stats, queued = restored
            d.inq += queued
        self.devices[key] = d
        self._by_domain[domain] = key
        self._ensure_sockets()
        try:
            self.host.store_write(f"{store}/state", str(int(DevState.INIT_WAIT)))
        except ValueError as e:
            self._drop(d)
            self._refuse(key, None, f"cannot write the backend state: {e}")
            return
        self.log.info(
            "console %d (%s): logging to %s, waiting for the frontend", key, d.label, log_path
        )

    def _refuse(self, key: object, store: object, message: str) -> None:
        """The device cannot be served: say so in the store (if we can) and to the kernel."""
        refuse(self.host, self.log, "console", key, store, message)

    def detach(self, key: int) -> None:
        d = self.devices.get(key)
        if d is None:
            self.log.warning("detach of unknown console %d", key)
            return
        if d.state == "connected":
            self._pump_out(d, budget=None)  # the domain's last words
        s = d.stats
        self.log.info(
            "console %d (%s) detached: %d bytes out, %d in, %d input bytes dropped",
            key,
            d.label,
            s.out_bytes,
            s.in_bytes,
            s.in_dropped,
        )
        self._drop(d)

    def fe_state(self, key: int, state: int) -> None:
        d = self.devices.get(key)
        if d is None:
            self.log.warning("frontend state %d for unknown console %d", state, key)
            return
        if d.state == "broken":
            return
        if state == DevState.INITIALISED:
            self._connect(d, resume=False)
        elif state == DevState.CONNECTED and d.state == "waiting":
            # A new driver instance learns the frontend is connected already: resume, finishing
            # the append the previous instance may have left half-done.
            self._connect(d, resume=True)
        elif state in (DevState.CLOSING, DevState.CLOSED) and d.state != "closed":
            if d.state == "connected":
                self._pump_out(d, budget=CLOSE_BYTES)  # what it wrote before closing
            d.state = "closed"
            d.ring = None
            d.journal = None
            self.host.store_write(f"{d.store}/state", str(int(DevState.CLOSED)))
            self.log.info("console %d (%s): frontend closed", key, d.label)

    def kick(self, key: int) -> None:
        d = self.devices.get(key)
        if d is None:
            self.log.debug("kick for unknown console %d", key)
        elif d.state == "connected":
            self._pump_out(d)
            if d.state == "connected" and d.inq:
                self._push_in(d)
        self._take_input()
        self._retry_stalled()

    def close(self) -> None:
        for key in list(self.devices):
            self.detach(key)
        self._restored.clear()
        self._close_sockets()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    # -- connection ----------------------------------------------------------------------------
    def _connect(self, d: _Console, *, resume: bool) -> None:
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
        d.state = "connected"
        self.host.store_write(f"{d.store}/state", str(int(DevState.CONNECTED)))
        self.log.info(
            "console %d (%s): %s at out_cons=%d",
            d.key,
            d.label,
            "resumed" if resume else "connected",
            ring.out_cons,
        )
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
        self._pump_out(d)
        if d.state == "connected":
            self._push_in(d)

    # -- output --------------------------------------------------------------------------------
    def checkpoint(self, where: str) -> None:
        """Tests only: called at each step of an append (``journaled``: the entry is written;
        ``appended``: the bytes are in the file; ``published``: live readers have them).
        Overridden to raise :class:`SimulatedCrash`, it stops the instance there."""

    def write_log(self, d: _Console, data: bytes) -> None:
        """Append ``data`` to the console's log file (O_APPEND), however many writes it
        takes.  OSError leaves a prefix in the file.  (Through the fault-injection layer while
        a fault is armed.)"""
        self._write(d, data)

    def _write_all(self, d: _Console, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(d.fd, view)
            view = view[n:]

    def _pump_out(self, d: _Console, budget: int | None = TURN_BYTES) -> None:
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
        except _StopServing as e:
            d.state = "lost count"
            self.log.warning(
                "console %d (%s): %s; the console is no longer served", d.key, d.label, e
            )
        else:
            if d.write_error is not None:
                self.log.warning(
                    "console %d (%s): the log file can be written again", d.key, d.label
                )
                d.write_error = None
        if notify and d.state == "connected":
            self._notify(d)

    def _append(self, d: _Console, ring: ConsoleBack, journal: Journal, n: int) -> bool:
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

    def _finish(self, d: _Console, entry: JournalEntry) -> tuple[int, bool]:
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

    def _publish(self, d: _Console, offset: int, data: bytes) -> None:
        pub = self._pub
        if pub is None:
            return
        try:
            pub.send_multipart((d.domain.encode(), encode_offset(offset), data), zmq.NOBLOCK)
        except zmq.ZMQError:
            self.publish_errors += 1  # readers catch up from the file

    def _write_failed(self, d: _Console, e: OSError) -> None:
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
            if d.write_error is not None and d.state == "connected" and now >= d.retry_at:
                self._pump_out(d)

    # -- input ---------------------------------------------------------------------------------
    def _take_input(self) -> None:
        """Take the input messages waiting on the input socket (all of them: the socket's
        descriptor only signals new arrivals)."""
        sock = self._input
        if sock is None:
            return
        taken = 0
        while taken < MAX_INPUT_MESSAGES:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            taken += 1
            self._queue_input(frames)
        if taken >= MAX_INPUT_MESSAGES:
            for key in self.devices:  # come back next round: kick() takes input too
                self.host.kick_again(key)
                break

    def _queue_input(self, frames: list[bytes]) -> _Console | None:
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
        if d is None or d.state in ("closed", "broken"):
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
        if d.state == "connected":
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

    def _push_in(self, d: _Console) -> None:
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

    # -- helpers -------------------------------------------------------------------------------
    def _notify(self, d: _Console) -> None:
        d.stats.notifications += 1
        self.host.notify(d.key)

    def _break(self, d: _Console, message: str) -> None:
        d.state = "broken"
        d.ring = None
        d.journal = None
        d.inq.clear()
        self.faults += 1
        self.host.fault(d.key, message)

    def _drop(self, d: _Console) -> None:
        """Let go of a console: its log file and its segment."""
        self.devices.pop(d.key, None)
        if self._by_domain.get(d.domain) == d.key:
            del self._by_domain[d.domain]
        d.state = "closed"
        d.ring = None
        d.journal = None
        with contextlib.suppress(OSError):
            os.close(d.fd)
        d.journal_view.release()
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
                    "console %d: segment %s is still referenced; it stays mapped "
                    "until those references go",
                    d.key,
                    d.segment.name,
                )

    # -- fault injection (drivers/faults.py; docs/campaigns.md) ---------------------------------
    def set_faults(self, specs: list[dict[str, Any]]) -> None:
        """``["faults", specs]``: arm these faults (ValueError if one is bad, or is a type a
        console driver cannot carry out: a bad response, poison)."""
        self.injector.load(specs)
        self._choose_write()

    def _choose_write(self) -> None:
        self._write = self._write_injecting if self.injector.armed else self._write_all

    def _write_injecting(self, d: _Console, data: bytes) -> None:
        """``_write`` while a fault is armed: ask the injector about this append."""
        f = self.injector.pick(
            RequestInfo(
                d.domain, consif.DEVICE_NAME, "write", self._position(d, len(data)), len(data)
            )
        )
        if f is None:
            self._write_all(d, data)
            return
        self._choose_write()  # from the next append on: no more questions, if it is spent
        self.host.fault_fired(f.id, f.type, d.label)
        self._carry_out(f, d, data)

    @staticmethod
    def _position(d: _Console, n: int) -> int:
        """Where in the domain's output stream the ``n`` bytes being written start: the end
        of the append in progress (the journal's pending entry) less ``n``."""
        ring, journal = d.ring, d.journal
        entry = journal.pending(ring.out_cons) if ring is not None and journal is not None else None
        return 0 if entry is None else (entry.cons_at + entry.length - n) & _MASK

    def _carry_out(self, f: Fault, d: _Console, data: bytes) -> None:
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
            raise _StopServing(
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

    # -- statistics ----------------------------------------------------------------------------
    def statistics(self) -> dict[str, int | float | str]:
        """Totals, then per domain ``<domain>.out_bytes``, ``.in_bytes``, ``.in_dropped`` (the
        host reports the first 64 values)."""
        devs = list(self.devices.values())
        out: dict[str, int | float | str] = {"devices": len(devs)}
        for f in fields(ConsoleStats):
            out[f.name] = sum(getattr(d.stats, f.name) for d in devs)
        out["in_queued"] = sum(len(d.inq) for d in devs)
        out["unknown_input"] = self.unknown_input
        out["malformed_input"] = self.malformed_input
        out["faults"] = self.faults
        for d in sorted(devs, key=lambda d: d.domain):
            out[f"{d.domain}.out_bytes"] = d.stats.out_bytes
            out[f"{d.domain}.in_bytes"] = d.stats.in_bytes
            out[f"{d.domain}.in_dropped"] = d.stats.in_dropped
        return out

    # -- hot swap ------------------------------------------------------------------------------
    def save(self) -> BackendState:
        """Every console: its log file, counters and queued input (hex)."""
        devices: list[DeviceState] = []
        for d in self.devices.values():
            if d.state in ("closed", "broken"):
                continue
            home = Medium("file", str(d.log_path))
            devices.append(
                DeviceState(
                    d.key,
                    d.label,
                    home,
                    d.scratch,
                    home,
                    {
                        "domain": d.domain,
                        "stats": {f.name: getattr(d.stats, f.name) for f in fields(ConsoleStats)},
                        "input": bytes(d.inq).hex(),
                    },
                )
            )
        for key, (stats, queued) in self._restored.items():
            devices.append(
                DeviceState(
                    key,
                    f"?/{consif.DEVICE_NAME}",
                    Medium("file", str(self.log_dir)),
                    "",
                    Medium("file", str(self.log_dir)),
                    {"domain": "", "stats": vars(stats).copy(), "input": queued.hex()},
                )
            )
        return BackendState(
            self.state_kind,
            self.state_version,
            self.implementation,
            tuple(sorted(devices, key=lambda s: s.key)),
            {"log_dir": str(self.log_dir), "socket_dir": str(self.socket_dir)},
        )

    def suspend(self) -> None:
        """Let every console go and release the endpoints for the next implementation.  The
        rings keep what the guests write meanwhile; the journal stays in the segments."""
        for d in list(self.devices.values()):
            self._drop(d)
        self._close_sockets()
        self.log.info("suspended: every console released for the next implementation")

    @classmethod
    def upgrade_state(cls, state: BackendState) -> BackendState:
        raise StateError(
            f"{cls.__name__} (state version {cls.state_version}) has no "
            f"upgrade_state hook for version {state.version} states"
        )

    def restore(self, state: BackendState) -> None:
        """Take over from ``state`` (StateError if it cannot): counters and queued input per
        device, applied when the kernel attaches the device again."""
        state = accept(
            state,
            kind=self.state_kind,
            version=self.state_version,
            who=self.implementation,
            upgrade=type(self).upgrade_state,
        )
        restored: dict[int, tuple[ConsoleStats, bytes]] = {}
        for dev in state.devices:
            where = f"state of console {dev.key}"
            raw_stats = dev.data.get("stats", {})
            queued = dev.data.get("input", "")
            if not isinstance(raw_stats, dict) or not isinstance(queued, str):
                raise StateError(f"{where}: data.stats must be a map and data.input a hex string")
            try:
                data = bytes.fromhex(queued)
            except ValueError:
                raise StateError(f"{where}: data.input is not a hex string") from None
            stats = ConsoleStats()
            for f in fields(ConsoleStats):
                v = raw_stats.get(f.name, 0)
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise StateError(
                        f"{where}: data.stats.{f.name} must be an integer >= 0, got {v!r:.40}"
                    )
                setattr(stats, f.name, v)
            restored[dev.key] = (stats, data[: max(self.input_queue_bytes, 0)])
        old_dir = state.data.get("log_dir")
        if isinstance(old_dir, str) and old_dir != str(self.log_dir):
            self.log.warning(
                "the previous implementation logged to %s, this one logs to %s: "
                "an append it left undone is written again in full",
                old_dir,
                self.log_dir,
            )
        self._restored.update(restored)
        self.log.info(
            "restored %d console(s) from the state of %s (version %d)",
            len(restored),
            state.implementation,
            state.version,
        )


class Backend(ConsoleBackend):
    """``drivers.console``: the console driver."""
