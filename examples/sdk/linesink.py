"""linesink: a console backend that also writes each complete line of each domain's output as
one JSON object, ``{"domain", "offset", "line"}``, to a file, exactly once per line even if the
driver process is killed.  The example of the console chapter of the SDK tutorial
(docs/sdk.md).

Run it in place of ``drivers.console``, under running guests::

    isovisor driver swap con0 --to-file examples/sdk/linesink.py
    isovisor driver stats con0

``offset`` is where the line starts in the domain's log file and ``line`` is its text with its
``"\\n"`` (bytes that are not UTF-8 come out as ``\\udcXX`` escapes, so the bytes of a line are
exact).  The framework calls :meth:`LineSink.output` with every chunk of output once it is in
the log file, and calls it again, with the same offset, for a chunk an instance died handling.
So, per domain, the sink keeps where its next line starts (``end``: every line before it is in
its file) and the bytes it has received since (``tail``), and skips what lies below them; a new
instance finds ``end`` again on the domain's last line in its file.  Output it has not seen
(the ``tail`` a killed instance had in memory, or what another backend logged) it reads from
the log file, which holds every byte.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from drivers.sdk import Console, ConsoleBackend

#: An unfinished line is written as it is once it has this many bytes (a piece with no "\n").
MAX_LINE = 16 * 1024
#: Output the sink has not seen is read from the log file up to this much; past that, the
#: sink starts again at the line that holds the chunk (and says so in the driver's log).
MAX_GAP = 1 << 20


@dataclass
class Position:
    """Where the sink stands in one domain's log file."""

    end: int  # the next line starts here
    tail: bytes = b""  # bytes [end, end + len(tail)) received, no "\n" among them
    lines: int = 0  # lines in the file


class LineSink(ConsoleBackend):
    OPTIONS: ClassVar[dict[str, str]] = {
        **ConsoleBackend.OPTIONS,
        "path": "the file the lines are written to (default: <log_dir>/lines.jsonl)",
    }

    def configure(self, options: dict[str, Any]) -> None:
        super().configure(options)
        self.lines_path = Path(options.get("path") or self.log_dir / "lines.jsonl")
        try:
            self.lines_fd = os.open(
                self.lines_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
        except OSError as e:
            raise ValueError(f"path {self.lines_path}: cannot open it: {e.strerror}") from None
        # Read from the file when this instance is first asked: a warm spare is built long
        # before it takes over, and the file grows meanwhile.
        self.positions: dict[str, Position] | None = None

    def output(self, console: Console, offset: int, data: bytes) -> None:
        pos = self._position_of(console, offset, len(data))
        seen = pos.end + len(pos.tail)
        if offset + len(data) <= seen:
            return  # offered again after a crash: handled already
        if offset > seen:  # not seen by this sink: it is in the log file
            data = read(console.log_path, seen, offset) + data
        else:
            data = data[seen - offset :]  # the part not handled yet
        *complete, rest = (pos.tail + data).split(b"\n")
        lines = [line + b"\n" for line in complete]
        if len(rest) >= MAX_LINE:  # a line that goes on and on is written in pieces
            lines, rest = [*lines, rest], b""
        records, at = [], pos.end
        for line in lines:
            records.append(record(console.domain, at, line))
            at += len(line)
        try:
            write_all(self.lines_fd, b"".join(records))
        except OSError:
            self.positions = None  # read back what reached the file, next time
            raise
        pos.end, pos.tail, pos.lines = at, rest, pos.lines + len(lines)

    def _position_of(self, console: Console, offset: int, n: int) -> Position:
        if self.positions is None:
            self.positions = self._recover()
        pos = self.positions.get(console.domain)
        seen = -1 if pos is None else pos.end + len(pos.tail)
        if pos is None or seen > offset + n or offset - seen > MAX_GAP:
            start = line_start(console.log_path, offset)
            if pos is not None:
                self.log.warning(
                    "linesink: %s: going on from offset %d, not %d (the log file was replaced, "
                    "or more than %d bytes were logged without this sink)",
                    console.domain,
                    start,
                    seen,
                    MAX_GAP,
                )
            pos = self.positions[console.domain] = Position(start, lines=pos.lines if pos else 0)
        return pos

    def _recover(self) -> dict[str, Position]:
        """Each domain's position, from the last of its lines in the file."""
        positions: dict[str, Position] = {}
        good = 0
        with open(self.lines_path, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # torn: the process was killed in the middle of a write
                r = json.loads(raw)
                p = positions.setdefault(r["domain"], Position(0))
                p.end = r["offset"] + len(r["line"].encode("utf-8", "surrogateescape"))
                p.lines += 1
                good += len(raw)
        if good < os.fstat(self.lines_fd).st_size:
            self.log.warning("linesink: %s: dropping a torn last line", self.lines_path)
            os.ftruncate(self.lines_fd, good)
        return positions

    def statistics(self) -> dict[str, int | float | str]:
        out = super().statistics()
        if self.positions is None:
            self.positions = self._recover()
        for d in self.devices.values():
            pos = self.positions.get(d.domain)
            out[f"{d.domain}.lines"] = pos.lines if pos else 0
        return out

    def close(self) -> None:
        super().close()  # the consoles' last output goes through output() first
        os.close(self.lines_fd)


def record(domain: str, offset: int, line: bytes) -> bytes:
    text = line.decode("utf-8", "surrogateescape")
    return (json.dumps({"domain": domain, "offset": offset, "line": text}) + "\n").encode()


def read(path: Path, start: int, stop: int) -> bytes:
    """Bytes [start, stop) of a log file."""
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), stop - start, start)
    if len(data) != stop - start:
        raise OSError(f"{path}: {len(data)} bytes at {start}, expected {stop - start}")
    return data


def line_start(path: Path, offset: int) -> int:
    """Where the line holding byte ``offset`` of a log file starts (``offset`` itself if that
    is more than MAX_LINE bytes back)."""
    back = min(offset, MAX_LINE)
    nl = read(path, offset - back, offset).rfind(b"\n")
    return offset - back + nl + 1 if nl >= 0 or back == offset else offset


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
