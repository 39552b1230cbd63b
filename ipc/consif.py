"""The console protocol between a guest's console frontend and the console backend (Xen's
``xencons_interface`` shape: two byte rings in one page, plus a backend-only log journal).

Single source of truth: the guest runtime's ``isovisor_consif.h`` is generated from this module by
:func:`c_header` (prefix ``CONSIF_``; see ``domains/build.py``); ``domains/runtime/consfront.c``
is the C frontend, :class:`ConsoleFront` a Python one (tests and tools), :class:`ConsoleBack` the
backend's half, :class:`Journal` the log journal and :class:`Follower` a live reader.

Region (``WINDOW_BYTES`` = one page, mapped into the guest; every index is a little-endian u64)::

    0x000  out_prod        frontend: bytes [0, out_prod) of the guest's output are published
    0x008  out_event       backend:  "kick me when out_prod passes this"
    0x010  out_cons        backend:  bytes [0, out_cons) are in the log file (consumed)
    0x018  out_cons_event  frontend: "notify me when out_cons passes this" (waiting for room)
    0x020  in_prod         backend:  bytes [0, in_prod) of input are published
    0x028  in_event        frontend: "notify me when in_prod passes this"
    0x030  in_cons         frontend: input [0, in_cons) has been read
    0x038  in_cons_event   backend:  "kick me when in_cons passes this" (input waiting for room)
    0x040  reserved (0) up to 0x100
    0x100  out[OUT_SIZE]   byte i of the output stream is at out[i % OUT_SIZE]   (2048 bytes)
    0x900  in[IN_SIZE]     byte i of the input stream is at in[i % IN_SIZE]      (1024 bytes)
    0xd00  reserved up to 0x1000

Indices run free (they wrap at 2**64, never at the ring size), as in Xen: the bytes in a ring are
always ``(prod - cons) mod 2**64``, at most the ring's size.  Shared words are stored whole
(elements of a ``memoryview.cast("Q")``; never ``struct.pack_into``, see ``ipc/ring.py``), and
bytes are written before the index that publishes them.  ``out_prod``, ``out_event`` and
``out_cons`` sit where a block ring has ``req_prod``, ``req_event`` and ``rsp_prod``, so the
kernel's generic hang check (``kernel/failover.py``: "requests outstanding and ``rsp_prod`` not
moving") reads "guest output waiting and the backend not consuming it".

Notification hold-off (``io/ring.h``'s rule for every pair): a producer moving ``prod`` from
``old`` to ``new`` notifies only if the peer's event word lies in ``(old, new]``; a consumer that
runs dry sets its event word to ``cons + 1`` and looks once more before it sleeps.  A frontend
initialises the page (indices 0, every event word 1) before it says Initialised.

The frontend never drops output: when ``out`` is full it sets ``out_cons_event`` and sleeps on its
port until the backend consumes (and so it blocks, or with a timeout gives up, while no backend
runs).  Input is the backend's to bound: what does not fit ``in`` waits in a bounded queue of
the backend, and the rest is dropped and counted.

Journal (``JOURNAL_OFFSET`` = the attach message's ``inflight_offset``, right after the window:
only the backend and the kernel map it)::

    +0x00  magic      JOURNAL_MAGIC once the journal is initialised
    +0x08  cons_at    out index where the latest append starts; written LAST
    +0x10  length     bytes of that append: out[cons_at, cons_at + length)
    +0x18  size_at    the log file's size just before that append
    +0x20  file_dev   st_dev of the log file
    +0x28  file_ino   st_ino of the log file
    +0x30  appends    appends journaled so far (diagnostics)

Exactly once.  The backend consumes output in *appends*: with ``c = out_cons``, ``p = out_prod``
and ``n = p - c``, it (1) writes the journal entry ``(size_at = size of the file, dev, ino,
length = n, cons_at = c)``, cons_at last; (2) appends ``out[c, p)`` to the file (one or more
``write`` calls, ``O_APPEND``); (3) publishes them to live readers; (4) stores ``out_cons = p``.
The entry is *pending* iff ``length > 0`` and ``cons_at == out_cons``.  Step 4 is the commit:
once ``out_cons`` has moved the entry is not pending, and until then the bytes ``out[c, p)`` are
still in the ring, because the guest reuses ring bytes only below ``out_cons``.  A backend that
dies anywhere leaves one of these states, and its replacement (or the same backend after a failed
``write``) finds:

* died before or while writing the entry: it is not pending.  Either the previous entry was
  committed (``out_cons = its cons_at + length != its cons_at``) and ``cons_at`` still holds that
  old value, or the previous entry has ``length == 0`` (only a freshly initialised journal) and
  the entry becomes pending with its ``length`` store, after ``size_at``/``dev``/``ino`` and with
  ``cons_at`` already equal to ``c``.  Nothing reached the file: the replacement starts afresh.
* died after the entry, during or after the append, before the commit: pending.  The file holds
  ``written = size - size_at`` of the ``length`` bytes (a ``write`` to a regular file that dies
  leaves a prefix; the page cache outlives the process).  The replacement appends
  ``out[c + written, c + length)`` and commits.  Dying again while doing so leaves the same entry
  pending, with a larger file: the same computation again.
* died after the commit: not pending; the bytes are in the file once.

Only a log file changed by someone else defeats this: if its ``dev``/``ino`` differ (rotated), it
is shorter than ``size_at`` (truncated) or grew by more than ``length`` (another writer), the
replacement cannot know what reached the file and appends all ``length`` bytes (at least once,
with a warning) rather than lose any.  It holds across the death of the backend *process*, not a
power loss of the host (no fsync).

Live readers (docs in ``drivers/console/backend.py``): every append is published as three frames
``[domain (UTF-8), offset (u64 little-endian: the bytes' position in the log file), bytes]``; a
reader reads the file up to its end, then stitches messages on by offset (:class:`Follower`).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ipc.ring import RingError

# region layout (byte offsets of the u64 index words)
OUT_PROD: Final = 0x00
OUT_EVENT: Final = 0x08
OUT_CONS: Final = 0x10
OUT_CONS_EVENT: Final = 0x18
IN_PROD: Final = 0x20
IN_EVENT: Final = 0x28
IN_CONS: Final = 0x30
IN_CONS_EVENT: Final = 0x38
HEADER_BYTES: Final = 0x100
OUT_OFFSET: Final = 0x100
OUT_SIZE: Final = 2048
IN_OFFSET: Final = OUT_OFFSET + OUT_SIZE
IN_SIZE: Final = 1024
WINDOW_BYTES: Final = 0x1000

# the journal (backend and kernel only), right after the window
JOURNAL_OFFSET: Final = WINDOW_BYTES
#: The attach message's ``inflight_offset`` for a console: where the journal lives.
INFLIGHT_OFFSET: Final = JOURNAL_OFFSET
J_MAGIC: Final = 0x00
J_CONS_AT: Final = 0x08
J_LENGTH: Final = 0x10
J_SIZE_AT: Final = 0x18
J_FILE_DEV: Final = 0x20
J_FILE_INO: Final = 0x28
J_APPENDS: Final = 0x30
JOURNAL_BYTES: Final = 0x40
JOURNAL_MAGIC: Final = 0x314E524A534E4F43  # "CONSJRN1" read as a u64
#: The whole segment: the window and one page for the journal.
SEGMENT_BYTES: Final = JOURNAL_OFFSET + 0x1000

#: The device's name in the device table and its store directory word.
DEVICE_NAME: Final = "console"
#: Socket file names of a console driver, in its socket_dir: live output (PUB) and input (PULL).
PUB_NAME: Final = "console.pub"
INPUT_NAME: Final = "console.in"
CLASS_NAME: Final = "console"

assert OUT_SIZE & (OUT_SIZE - 1) == 0 and IN_SIZE & (IN_SIZE - 1) == 0
assert IN_CONS_EVENT + 8 <= HEADER_BYTES <= OUT_OFFSET
assert IN_OFFSET + IN_SIZE <= WINDOW_BYTES <= JOURNAL_OFFSET
assert JOURNAL_OFFSET + JOURNAL_BYTES <= SEGMENT_BYTES

# (No module-level upper-case integers below this line: c_header() exports every one of them.)

_MASK: Final = (1 << 64) - 1
_W: Final = {
    name: off // 8
    for name, off in (
        ("out_prod", OUT_PROD),
        ("out_event", OUT_EVENT),
        ("out_cons", OUT_CONS),
        ("out_cons_event", OUT_CONS_EVENT),
        ("in_prod", IN_PROD),
        ("in_event", IN_EVENT),
        ("in_cons", IN_CONS),
        ("in_cons_event", IN_CONS_EVENT),
    )
}
_OFFSET: Final = struct.Struct("<Q")


def _check_region(buf: memoryview) -> memoryview:
    if len(buf) < WINDOW_BYTES:
        raise ValueError(f"{len(buf)} bytes cannot hold a console region of {WINDOW_BYTES}")
    return buf[:HEADER_BYTES].cast("Q")


def _passed(event: int, old: int, new: int) -> bool:
    """Did a producer index moving from ``old`` to ``new`` pass ``event``?"""
    return ((new - event) & _MASK) < ((new - old) & _MASK)


def _copy_out(ring: memoryview, size: int, start: int, n: int) -> bytes:
    """``n`` bytes of a ring of ``size`` bytes from free-running index ``start``."""
    i = start % size
    first = min(n, size - i)
    return bytes(ring[i : i + first]) + bytes(ring[: n - first])


def _copy_in(ring: memoryview, size: int, start: int, data: bytes) -> None:
    i = start % size
    first = min(len(data), size - i)
    ring[i : i + first] = data[:first]
    ring[: len(data) - first] = data[first:]


class ConsoleBack:
    """The backend's half of a console region, hardened against a hostile frontend.

    Private indices (``out_cons``, ``in_prod``) start from the published ones, so a replacement
    backend resumes where its predecessor stopped.  The guest's indices are validated on every
    read: RingError (with what is wrong) for an ``out_prod`` that moves backwards or claims more
    than ``OUT_SIZE`` bytes, or an ``in_cons`` outside ``[last seen, in_prod]``."""

    def __init__(self, buf: memoryview) -> None:
        self._idx = _check_region(buf)
        self._out = buf[OUT_OFFSET : OUT_OFFSET + OUT_SIZE]
        self._in = buf[IN_OFFSET : IN_OFFSET + IN_SIZE]
        idx = self._idx
        self.out_cons = idx[_W["out_cons"]]
        self.out_prod_seen = self.out_cons
        self.in_prod = idx[_W["in_prod"]]
        self.in_cons_seen = idx[_W["in_cons"]]
        if (self.in_prod - self.in_cons_seen) & _MASK > IN_SIZE:
            raise RingError(
                f"console in ring: in_prod={self.in_prod} and frontend "
                f"in_cons={self.in_cons_seen} are more than the ring's {IN_SIZE} "
                "bytes apart"
            )

    # -- out: guest -> backend -----------------------------------------------------------------
    def out_available(self) -> int:
        """Bytes published and not consumed, after validating the guest's ``out_prod``."""
        prod = self._idx[_W["out_prod"]]
        avail = (prod - self.out_cons) & _MASK
        if avail > OUT_SIZE:
            raise RingError(
                f"console out ring: frontend out_prod={prod} claims {avail} bytes "
                f"after out_cons={self.out_cons}, more than the ring's {OUT_SIZE} "
                "(the index moved backwards or past the ring size)"
            )
        if avail < (self.out_prod_seen - self.out_cons) & _MASK:
            raise RingError(
                f"console out ring: frontend out_prod moved backwards from "
                f"{self.out_prod_seen} to {prod}"
            )
        self.out_prod_seen = prod
        return avail

    def out_peek(self, start: int, n: int) -> bytes:
        """A copy of output bytes ``[start, start + n)`` (the guest may change the ring)."""
        return _copy_out(self._out, OUT_SIZE, start, n)

    def out_commit(self, new_cons: int) -> bool:
        """Publish ``out_cons = new_cons``; True if the frontend asked to be notified."""
        old = self.out_cons
        self.out_cons = new_cons & _MASK
        self._idx[_W["out_cons"]] = self.out_cons
        return _passed(self._idx[_W["out_cons_event"]], old, self.out_cons)

    def out_final_check(self) -> bool:
        """Before going idle: ask for a kick at the next byte, then look once more."""
        if self.out_available():
            return True
        self._idx[_W["out_event"]] = (self.out_cons + 1) & _MASK
        return self.out_available() > 0

    # -- in: backend -> guest ------------------------------------------------------------------
    def in_room(self) -> int:
        """Bytes of input the ring can take now, after validating the guest's ``in_cons``."""
        cons = self._idx[_W["in_cons"]]
        used = (self.in_prod - cons) & _MASK
        if (
            used > IN_SIZE
            or (cons - self.in_cons_seen) & _MASK > (self.in_prod - self.in_cons_seen) & _MASK
        ):
            raise RingError(
                f"console in ring: frontend in_cons={cons} is invalid: input is "
                f"published up to in_prod={self.in_prod} and was consumed up to "
                f"{self.in_cons_seen} (it moved backwards or past in_prod)"
            )
        self.in_cons_seen = cons
        return IN_SIZE - used

    def in_put(self, data: bytes) -> bool:
        """Publish ``data`` (at most :meth:`in_room` bytes); True if the frontend asked to be
        notified."""
        if len(data) > self.in_room():
            raise ValueError(f"{len(data)} bytes do not fit the console's in ring")
        if not data:
            return False
        _copy_in(self._in, IN_SIZE, self.in_prod, data)
        old = self.in_prod
        self.in_prod = (old + len(data)) & _MASK
        self._idx[_W["in_prod"]] = self.in_prod
        return _passed(self._idx[_W["in_event"]], old, self.in_prod)

    def in_wait_for_room(self) -> bool:
        """Input is waiting: ask for a kick when the guest consumes; True if there is room
        already (look again instead of sleeping)."""
        if self.in_room():
            return True
        self._idx[_W["in_cons_event"]] = (self.in_cons_seen + 1) & _MASK
        return self.in_room() > 0

    def indices(self) -> dict[str, int]:
        """Every shared index word (for messages and tests)."""
        return {name: self._idx[w] for name, w in _W.items()}


class ConsoleFront:
    """The frontend's half in Python (tests and tools), with the C frontend's rules: never more
    than the ring holds, hold-off on both sides.  ``init`` sets the page up as a frontend does
    before it says Initialised."""

    def __init__(self, buf: memoryview, *, init: bool = True) -> None:
        self._idx = _check_region(buf)
        self._out = buf[OUT_OFFSET : OUT_OFFSET + OUT_SIZE]
        self._in = buf[IN_OFFSET : IN_OFFSET + IN_SIZE]
        if init:
            for w in _W.values():
                self._idx[w] = 0
            for name in ("out_event", "out_cons_event", "in_event", "in_cons_event"):
                self._idx[_W[name]] = 1
        self.out_prod = self._idx[_W["out_prod"]]
        self.in_cons = self._idx[_W["in_cons"]]

    def out_room(self) -> int:
        return OUT_SIZE - ((self.out_prod - self._idx[_W["out_cons"]]) & _MASK)

    def write(self, data: bytes) -> tuple[int, bool]:
        """Put as much of ``data`` as fits and publish it: (bytes taken, kick the backend?)."""
        n = min(len(data), self.out_room())
        if n <= 0:
            return 0, False
        _copy_in(self._out, OUT_SIZE, self.out_prod, data[:n])
        old = self.out_prod
        self.out_prod = (old + n) & _MASK
        self._idx[_W["out_prod"]] = self.out_prod
        return n, _passed(self._idx[_W["out_event"]], old, self.out_prod)

    def wait_for_room(self) -> None:
        """Ask to be notified when the backend consumes (before sleeping on a full ring)."""
        self._idx[_W["out_cons_event"]] = (self._idx[_W["out_cons"]] + 1) & _MASK

    def read(self, limit: int = IN_SIZE) -> tuple[bytes, bool]:
        """Take up to ``limit`` bytes of input: (bytes, kick the backend?)."""
        prod = self._idx[_W["in_prod"]]
        n = min((prod - self.in_cons) & _MASK, limit)
        data = _copy_out(self._in, IN_SIZE, self.in_cons, n)
        old = self.in_cons
        self.in_cons = (old + n) & _MASK
        self._idx[_W["in_cons"]] = self.in_cons
        self._idx[_W["in_event"]] = (self.in_cons + 1) & _MASK
        return data, bool(n) and _passed(self._idx[_W["in_cons_event"]], old, self.in_cons)

    def set(self, name: str, value: int) -> None:
        """Store any index word (for tests that play a hostile guest)."""
        self._idx[_W[name]] = value & _MASK

    def get(self, name: str) -> int:
        return int(self._idx[_W[name]])


# --- the journal ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JournalEntry:
    cons_at: int
    length: int
    size_at: int
    file_dev: int
    file_ino: int


class Journal:
    """The log journal of one console (see the module docstring for the argument)."""

    def __init__(self, buf: memoryview) -> None:
        if len(buf) < JOURNAL_BYTES:
            raise ValueError(f"{len(buf)} bytes cannot hold a console journal of {JOURNAL_BYTES}")
        self._q = buf[:JOURNAL_BYTES].cast("Q")

    @property
    def valid(self) -> bool:
        return self._q[J_MAGIC // 8] == JOURNAL_MAGIC

    @property
    def appends(self) -> int:
        return int(self._q[J_APPENDS // 8])

    def reset(self, cons: int, size: int, dev: int, ino: int) -> None:
        """Start afresh: an entry of length 0 (never pending) at ``cons``; magic last."""
        q = self._q
        q[J_LENGTH // 8] = 0
        q[J_SIZE_AT // 8] = size
        q[J_FILE_DEV // 8] = dev & _MASK
        q[J_FILE_INO // 8] = ino & _MASK
        q[J_APPENDS // 8] = 0
        q[J_CONS_AT // 8] = cons & _MASK
        q[J_MAGIC // 8] = JOURNAL_MAGIC

    def begin(self, cons: int, length: int, size: int, dev: int, ino: int) -> None:
        """Record the append of ``out[cons, cons + length)`` at file size ``size``.  The
        entry becomes pending with its last store (``length`` if ``cons_at`` already equals
        ``cons``, else ``cons_at``); only the current entry, once committed, may be replaced."""
        q = self._q
        q[J_SIZE_AT // 8] = size
        q[J_FILE_DEV // 8] = dev & _MASK
        q[J_FILE_INO // 8] = ino & _MASK
        q[J_APPENDS // 8] = (q[J_APPENDS // 8] + 1) & _MASK
        q[J_LENGTH // 8] = length
        q[J_CONS_AT // 8] = cons & _MASK

    def pending(self, out_cons: int) -> JournalEntry | None:
        """The append not committed yet (``cons_at == out_cons``, ``length > 0``), if any."""
        q = self._q
        if not self.valid or q[J_CONS_AT // 8] != out_cons or not q[J_LENGTH // 8]:
            return None
        return JournalEntry(
            q[J_CONS_AT // 8],
            q[J_LENGTH // 8],
            q[J_SIZE_AT // 8],
            q[J_FILE_DEV // 8],
            q[J_FILE_INO // 8],
        )

    def words(self) -> dict[str, int]:
        q = self._q
        return {
            "magic": q[J_MAGIC // 8],
            "cons_at": q[J_CONS_AT // 8],
            "length": q[J_LENGTH // 8],
            "size_at": q[J_SIZE_AT // 8],
            "file_dev": q[J_FILE_DEV // 8],
            "file_ino": q[J_FILE_INO // 8],
            "appends": q[J_APPENDS // 8],
        }


# --- live readers ---------------------------------------------------------------------------------


def encode_offset(offset: int) -> bytes:
    return _OFFSET.pack(offset)


def decode_offset(frame: bytes) -> int:
    if len(frame) != _OFFSET.size:
        raise ValueError(f"a console offset frame has {_OFFSET.size} bytes, not {len(frame)}")
    return int(_OFFSET.unpack(frame)[0])


class Follower:
    """Follow a domain's console: the log file from ``start``, then live data, without gaps or
    duplicates.  The file is the truth; the PUB socket only makes following fast.

    It subscribes first, then reads the file to its end (``expected`` = where it stopped).
    Each message ``[domain, offset, data]`` is stitched on: bytes below ``expected`` are
    dropped (a replacement backend may publish again what its predecessor had), and a message
    beyond ``expected`` (one the reader missed: slow joiner, a full queue, a backend that died
    between its write and its publish) makes it read the gap from the file first.  When no
    message comes within the timeout it looks at the file once more, so nothing is missed
    even if messages are."""

    def __init__(
        self, ctx: Any, endpoint: str, log_path: str | os.PathLike[str], domain: str, start: int = 0
    ) -> None:
        import zmq

        self._zmq = zmq
        self.domain = domain
        self.path = Path(log_path)
        self.expected = max(0, start)
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.SUBSCRIBE, domain.encode())
        self.sub.connect(endpoint)

    def close(self) -> None:
        self.sub.close(0)

    def _from_file(self, end: int | None = None) -> bytes:
        """File bytes from ``expected`` up to ``end`` (None: its end); moves ``expected``."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.expected)
                data = f.read() if end is None else f.read(max(0, end - self.expected))
        except FileNotFoundError:
            return b""
        self.expected += len(data)
        return data

    def read(self, timeout_ms: int = 1000) -> bytes:
        """What is new: the file's bytes past ``expected`` and then the live data that
        arrives within ``timeout_ms`` (b"" if nothing did)."""
        out = bytearray(self._from_file())
        zmq = self._zmq
        if not self.sub.poll(timeout_ms):
            out += self._from_file()
            return bytes(out)
        while True:
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(frames) != 3 or frames[0] != self.domain.encode():
                continue  # another domain whose name starts with ours, or not a console message
            try:
                offset = decode_offset(frames[1])
            except ValueError:
                continue
            data = frames[2]
            if offset > self.expected:
                out += self._from_file(offset)
                if offset > self.expected:
                    continue  # the file does not have it (yet?): the next read looks again
            skip = self.expected - offset
            if skip < len(data):
                out += data[skip:]
                self.expected = offset + len(data)
        return bytes(out)


def c_header() -> str:
    """Render the protocol constants as a C header for the guest runtime."""
    names = [
        n
        for n, v in globals().items()
        if n.isupper() and not n.startswith("_") and isinstance(v, int) and not isinstance(v, bool)
    ]
    lines = [
        "/* Generated from ipc/consif.py by domains/build.py -- do not edit. */",
        "#ifndef ISOVISOR_CONSIF_H",
        "#define ISOVISOR_CONSIF_H",
    ]
    for n in names:
        v = globals()[n]
        lines.append(
            f"#define CONSIF_{n} {v:#x}ULL" if v > 0x7FFFFFFF else f"#define CONSIF_{n} {v}"
        )
    lines.append("#endif")
    return "\n".join(lines) + "\n"
