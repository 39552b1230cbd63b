"""The snapshot file: one versioned file, a checksum per section (docs/snapshots.md).

Layout (little-endian)::

    header   "ISOVSNAP" | u32 format version | u32 section count | u64 0
    section  name (16 bytes, ASCII, NUL-padded) | u64 payload bytes | u32 CRC-32 | u32 0
             payload

Sections come in a fixed order (:data:`SECTIONS`); ``end`` is last and empty, so a file cut
anywhere is recognised as cut.  Structured payloads are msgpack maps; ``pages`` is raw guest
memory.  :func:`read` checks everything before it returns (a restore reads ``pages``
afterwards, once, checking it on the way, and creates nothing until that has ended): the
caller creates nothing from a file that is truncated, corrupted, or of another version, and
the error names the section and what is wrong with it.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Final

import msgpack

MAGIC: Final = b"ISOVSNAP"
#: The format this isovisor writes and reads.
VERSION: Final = 1
_HEADER: Final = struct.Struct("<8sIIQ")
_SECTION: Final = struct.Struct("<16sQII")
#: The sections of a version-1 snapshot, in file order.
SECTIONS: Final = (
    "domain",  # config, origin, when
    "vcpu",  # registers
    "sched",  # event, poll, timer, watchdog and upcall state
    "clock",  # the guest clock's reading and epoch
    "memory",  # RAM size and which pages are stored
    "pages",  # raw: the stored pages, in order
    "console",  # console history and position
    "devices",  # each device's state (empty for a domain without devices)
    "end",
)
#: Largest structured (msgpack) section accepted, bytes.
MAX_META: Final = 64 * 1024 * 1024


class SnapshotError(Exception):
    """The snapshot cannot be used; the message says which section and why."""


def write(path: Path, sections: dict[str, Any]) -> int:
    """Write a snapshot atomically (a temporary file renamed into place); returns its size.
    ``sections`` maps each name of :data:`SECTIONS` but ``end`` to a msgpack-able value, or
    for ``pages`` to an iterable of bytes-like chunks."""
    missing = [s for s in SECTIONS[:-1] if s not in sections]
    assert not missing, f"snapshot sections missing: {missing}"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, len(SECTIONS), 0))
            for name in SECTIONS:
                if name == "end":
                    _write_section(f, name, [b""])
                elif name == "pages":
                    _write_section(f, name, sections[name])
                else:
                    _write_section(f, name, [msgpack.packb(sections[name], use_bin_type=True)])
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


def _write_section(f: BinaryIO, name: str, chunks: Iterable[bytes | memoryview]) -> None:
    start = f.tell()
    f.write(_SECTION.pack(name.encode(), 0, 0, 0))
    crc, n = 0, 0
    for c in chunks:
        crc = zlib.crc32(c, crc)
        n += len(c)
        f.write(c)
    end = f.tell()
    f.seek(start)
    f.write(_SECTION.pack(name.encode(), n, crc, 0))
    f.seek(end)


class PagesRef:
    """The ``pages`` section of a snapshot read with ``defer_pages``: where its payload is,
    not read yet.  :meth:`chunks` reads it and checks its CRC-32 on the way, so a restore
    copies the guest's RAM straight from the file into its segment in one pass."""

    def __init__(self, path: Path, offset: int, length: int, crc: int, where: str) -> None:
        self.path, self.offset, self.length, self.crc, self.where = path, offset, length, crc, where

    def __len__(self) -> int:
        return self.length

    def chunks(self, size: int = 1 << 20) -> Iterator[memoryview]:
        """The payload in order, in chunks of at most ``size`` bytes read into one reused
        buffer (a chunk is valid until the next is asked for).  SnapshotError, after the last
        chunk, if the payload fails its checksum or the file changed meanwhile."""
        buf = bytearray(min(size, max(self.length, 1)))
        crc, left = 0, self.length
        try:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.offset)
                while left:
                    view = memoryview(buf)[: min(left, len(buf))]
                    got = f.readinto(view)
                    if not got:
                        raise SnapshotError(
                            f"{self.where}: section 'pages' is truncated: the file changed "
                            "while it was read"
                        )
                    chunk = view[:got]
                    crc = zlib.crc32(chunk, crc)
                    left -= got
                    yield chunk
        except OSError as e:
            raise SnapshotError(f"cannot read {self.where}: {e.strerror}") from None
        if crc != self.crc:
            raise SnapshotError(
                f"{self.where}: section 'pages' (bytes {self.offset}..{self.offset + self.length})"
                f" fails its checksum (stored CRC-32 {self.crc:#010x}, computed {crc:#010x}): "
                "the file is corrupted"
            )

    def read_all(self) -> bytes:
        return b"".join(bytes(c) for c in self.chunks())


def read(path: Path, *, defer_pages: bool = False) -> dict[str, Any]:
    """Read and check a snapshot: msgpack sections decoded, ``pages`` as bytes; with
    ``defer_pages`` as a :class:`PagesRef`, whose checksum is checked as it is read (a
    restore: nothing is created before that read has ended)."""
    where = f"snapshot {path}"
    try:
        # read, not mapped: a file truncated under a mapping (a `cp` over it while we
        # restore) would kill the kernel with SIGBUS
        with open(path, "rb") as f:
            return _read(f, os.fstat(f.fileno()).st_size, path, where, defer_pages)
    except OSError as e:
        raise SnapshotError(f"cannot read {where}: {e.strerror}") from None


def _read(f: BinaryIO, size: int, path: Path, where: str, defer_pages: bool) -> dict[str, Any]:
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise SnapshotError(
            f"{where} is {size} bytes, shorter than a snapshot header ({_HEADER.size} "
            "bytes): it is not a snapshot, or was cut off"
        )
    magic, version, count, _ = _HEADER.unpack(head)
    if magic != MAGIC:
        raise SnapshotError(
            f"{where} is not an isovisor snapshot (it starts with {magic!r}, not {MAGIC!r})"
        )
    if version != VERSION:
        raise SnapshotError(
            f"{where} has format version {version}; this isovisor reads version {VERSION} "
            "only: restore it with the isovisor that saved it"
        )
    if count != len(SECTIONS):
        raise SnapshotError(
            f"{where}: the header counts {count} sections; version {VERSION} has "
            f"{len(SECTIONS)} ({', '.join(SECTIONS)}): the file is corrupted"
        )
    out: dict[str, Any] = {}
    off = _HEADER.size
    for expected in SECTIONS:
        if off + _SECTION.size > size:
            raise SnapshotError(
                f"{where} is truncated: it ends at byte {size}, before section "
                f"{expected!r}; the file is incomplete (save it again, or copy it whole)"
            )
        raw, length, crc, _ = _SECTION.unpack(f.read(_SECTION.size))
        name = bytes(raw).split(b"\0", 1)[0].decode("ascii", "replace")
        if name != expected:
            raise SnapshotError(
                f"{where}: found section {name!r} at byte {off} where section {expected!r} "
                "belongs: the file is corrupted"
            )
        off += _SECTION.size
        if off + length > size:
            raise SnapshotError(
                f"{where}: section {name!r} is truncated: its header says {length} bytes, "
                f"the file holds {size - off} after it; the file is incomplete (save it "
                "again, or copy it whole)"
            )
        if name == "pages" and defer_pages:
            out[name] = PagesRef(path, off, length, crc, where)
            f.seek(length, os.SEEK_CUR)
            off += length
            continue
        if name != "pages" and length > MAX_META:
            raise SnapshotError(f"{where}: section {name!r} is {length} bytes, too big")
        payload = f.read(length)
        if len(payload) != length:
            raise SnapshotError(f"{where}: section {name!r} is truncated: the file changed")
        got = zlib.crc32(payload)
        if got != crc:
            raise SnapshotError(
                f"{where}: section {name!r} (bytes {off}..{off + length}) fails its checksum "
                f"(stored CRC-32 {crc:#010x}, computed {got:#010x}): the file is corrupted"
            )
        off += length
        if name == "pages":
            out[name] = payload
        elif name != "end":
            try:
                out[name] = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            except (ValueError, msgpack.UnpackException) as e:
                raise SnapshotError(
                    f"{where}: section {name!r} does not decode ({e}): the file is corrupted"
                ) from None
    if off != size:
        raise SnapshotError(
            f"{where}: {size - off} bytes follow the end section: the file is corrupted "
            "or two files were joined"
        )
    return out


def field(sections: dict[str, Any], section: str, key: str, kind: type | tuple[type, ...]) -> Any:
    """``sections[section][key]``, checked to be a ``kind``; a SnapshotError otherwise."""
    body = sections.get(section)
    if not isinstance(body, dict):
        raise SnapshotError(f"snapshot section {section!r} is not a map")
    if key not in body:
        raise SnapshotError(f"snapshot section {section!r} lacks {key!r}")
    value = body[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise SnapshotError(
            f"snapshot section {section!r}: {key!r} is {type(value).__name__}, not {names}"
        )
    return value


def read_domain(path: Path) -> dict[str, Any] | None:
    """The ``domain`` section alone (config, name, origin), or None if the file does not
    start like a snapshot of this version: for a caller that wants the name before a restore
    (the supervisor's console relay); :func:`read` makes the real checks."""
    try:
        with open(path, "rb") as f:
            head = f.read(_HEADER.size + _SECTION.size)
            if len(head) < _HEADER.size + _SECTION.size:
                return None
            magic, version, _, _ = _HEADER.unpack_from(head)
            raw, length, crc, _ = _SECTION.unpack_from(head, _HEADER.size)
            if magic != MAGIC or version != VERSION or length > MAX_META:
                return None
            payload = f.read(length)
    except OSError:
        return None
    if raw.split(b"\0", 1)[0] != b"domain" or zlib.crc32(payload) != crc:
        return None
    try:
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, msgpack.UnpackException):
        return None
    return body if isinstance(body, dict) else None
