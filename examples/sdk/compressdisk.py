"""A block backend that keeps each disk in a format of its own: a log of compressed blocks.

The example of docs/sdk.md, "Data in a format of your own".  Every write appends one record per
4 KiB block to the device's side file (``self.side_file(dev, "zlog")``, in tmpfs): a header
(block number, compressed length; length 0 is a discarded, all-zero block) and the block
compressed with zlib.  An index in memory says where the newest copy of each block is; reads
decompress it.  Nothing is ever read from the configured image after the device was opened,
so the image is *not* where this backend keeps the data.

What it does not have to do, because the framework does it (drivers/blk/export.py): keep the
configured image current for whoever comes next.  While a rollback is possible (a hot swap's
probation) every write also goes through to the image; afterwards the framework marks the
blocks written and copies them from this storage to the image when the state is saved or the
device goes.  So a crash at any moment, a rollback, a swap to ``drivers.blk`` or the stack
stopping never loses a write the guest was told was done.

What it must do itself: after a crash of its own process the side file is the newest copy of
the data (a replacement instance replays the log); when the device comes over in a hot swap
the framework has removed the side file, and the data is built again from ``dev.medium``.

Try it::

    isovisor driver swap blk0 --to-file examples/sdk/compressdisk.py
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

from drivers.sdk import BlockBackend, DeviceState, Medium, Storage, StorageError, open_medium

BLOCK = 4096
_RECORD = struct.Struct("<QI")  # block number, compressed length (0: all zeros)
_ZEROS = bytes(BLOCK)


class LogStorage(Storage):
    """A disk of ``size`` bytes kept as a log of compressed 4 KiB blocks in ``path``."""

    def __init__(self, path: Path, size: int, readonly: bool) -> None:
        self.path, self.size, self.readonly = path, size, readonly
        #: block -> (offset of its compressed bytes in the log, their length); absent: zeros
        self.index: dict[int, tuple[int, int]] = {}
        self.fd = -1
        self.written = self.stored = 0

    @classmethod
    def open(cls, path: Path, size: int, readonly: bool) -> LogStorage:
        """Reopen the log a crashed instance left: replay it up to its first torn record (a
        write that was never answered; the framework redoes that request)."""
        s = cls(path, size, readonly)
        s.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        data = os.pread(s.fd, os.fstat(s.fd).st_size, 0)
        pos = 0
        while pos + _RECORD.size <= len(data):
            block, n = _RECORD.unpack_from(data, pos)
            if pos + _RECORD.size + n > len(data) or block * BLOCK >= size:
                break
            s._note(block, pos + _RECORD.size, n)
            pos += _RECORD.size + n
        os.ftruncate(s.fd, pos)
        s.stored = pos
        return s

    @classmethod
    def build(cls, path: Path, source: Storage, readonly: bool) -> LogStorage:
        """A new log holding every non-zero block of ``source``; written under a temporary
        name and renamed, so a crash meanwhile leaves no half log behind."""
        tmp = path.with_name(path.name + ".new")
        s = cls(tmp, source.size, readonly)
        s.fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        buf = bytearray(BLOCK)
        for block in range((source.size + BLOCK - 1) // BLOCK):
            n = min(BLOCK, source.size - block * BLOCK)
            view = memoryview(buf)[:n]
            source.read_into(block * BLOCK, view)
            if any(view):
                s._append(block, bytes(view).ljust(BLOCK, b"\0"))
        os.rename(tmp, path)
        s.path = path
        return s

    def _note(self, block: int, at: int, n: int) -> None:
        if n:
            self.index[block] = (at, n)
        else:
            self.index.pop(block, None)

    def _append(self, block: int, data: bytes) -> None:
        if self.stored > 2 * self.size + (1 << 20):
            self._compact()
        packed = zlib.compress(data, 1) if data != _ZEROS else b""
        at = self.stored
        os.pwrite(self.fd, _RECORD.pack(block, len(packed)) + packed, at)
        self.stored = at + _RECORD.size + len(packed)
        self._note(block, at + _RECORD.size, len(packed))

    def _compact(self) -> None:
        """Rewrite the log with only the newest copy of each block (under a temporary name,
        then renamed: a crash meanwhile leaves the old log whole)."""
        tmp = self.path.with_name(self.path.name + ".new")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        index: dict[int, tuple[int, int]] = {}
        at = 0
        for block, (where, n) in sorted(self.index.items()):
            os.pwrite(fd, _RECORD.pack(block, n) + os.pread(self.fd, n, where), at)
            index[block] = (at + _RECORD.size, n)
            at += _RECORD.size + n
        os.rename(tmp, self.path)
        os.close(self.fd)
        self.fd, self.index, self.stored = fd, index, at

    def _block(self, block: int) -> bytes:
        where = self.index.get(block)
        if where is None:
            return _ZEROS
        data = zlib.decompress(os.pread(self.fd, where[1], where[0]))
        if len(data) != BLOCK:
            raise StorageError(f"{self.path}: block {block} is corrupt ({len(data)} bytes)")
        return data

    # -- Storage ---------------------------------------------------------------------------
    def read_into(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            block, skip = divmod(offset + done, BLOCK)
            n = min(BLOCK - skip, len(buf) - done)
            buf[done : done + n] = self._block(block)[skip : skip + n]
            done += n

    def write_from(self, offset: int, buf: memoryview) -> None:
        done = 0
        while done < len(buf):
            block, skip = divmod(offset + done, BLOCK)
            n = min(BLOCK - skip, len(buf) - done)
            if n == BLOCK:
                data = bytes(buf[done : done + n])
            else:  # part of a block: read, modify, write
                old = bytearray(self._block(block))
                old[skip : skip + n] = buf[done : done + n]
                data = bytes(old)
            self._append(block, data)
            done += n
        self.written += len(buf)

    def writev_from(self, offset: int, bufs: Sequence[memoryview]) -> None:
        for b in bufs:
            self.write_from(offset, b)
            offset += len(b)

    def discard(self, offset: int, length: int) -> None:
        end = offset + length
        while offset < end:
            block, skip = divmod(offset, BLOCK)
            n = min(BLOCK - skip, end - offset)
            if n == BLOCK:
                self._append(block, _ZEROS)
            else:
                self.write_from(offset, memoryview(bytes(n)))
            offset += n

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class CompressDisk(BlockBackend):
    """Serve every device from a compressed log of its own (the module docstring)."""

    def open_disk(self, dev: DeviceState) -> Storage:
        path = self.side_file(dev, "zlog")
        readonly = dev.medium.access == "ro"
        m = dev.medium
        source = open_medium(Medium(m.type, m.target, None, "ro"))
        try:
            if path.exists():  # an instance of ours crashed: the log is the newest data
                log = LogStorage.open(path, source.size, readonly)
                how = "replayed"
            else:  # first attach, or taken over in a swap: the medium has the data
                log = LogStorage.build(path, source, readonly)
                how = f"built from {m.target}"
        finally:
            source.close()
        self.log.info(
            "device %d (%s): log %s, %d blocks in %d bytes",
            dev.key,
            dev.label,
            how,
            len(log.index),
            log.stored,
        )
        return log

    def statistics(self) -> dict[str, int | float | str]:
        out = super().statistics()
        for d in self.devices.values():
            if isinstance(d.storage, LogStorage):
                out[f"{d.label}.blocks"] = len(d.storage.index)
                out[f"{d.label}.log_bytes"] = d.storage.stored
        return out
