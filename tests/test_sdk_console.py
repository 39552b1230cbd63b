"""The console sink of the SDK: ``examples/sdk/linesink.py`` (docs/sdk.md, "A console backend").

In-process (a fake host, real shared memory, a Python frontend: tests/test_console_backend.py's
rig), linesink writes each line of the output once across instances killed at random points,
torn writes of its own file, a warm spare built before the output it must skip, and swaps to
``drivers.console`` and back.  End to end, two ``conecho`` guests print numbered lines while
``con0`` is swapped from ``drivers.console`` to linesink, linesink is killed with SIGKILL and
replaced by its warm spare, and con0 is swapped back: the JSON file holds every line once,
equal to the log files, from the first line linesink saw to the last.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from drivers.console.backend import ConsoleBackend, SimulatedCrash
from drivers.state import BackendState
from isovisor.cli.swapclient import swap
from isovisor.paths import RunDir
from isovisor.testing import backend_class
from tests.conftest import Stack, wait_until
from tests.test_console import PATTERN, check_lines
from tests.test_console_backend import (
    FakeHost,
    Guest,
    Rig,
    _crash_at,
    _partial_write,
    abandon,
    connect,
    pour,
    resume,
)
from tests.test_recovery import Events, driver_row, kill_with_a_warm_spare

LINESINK = Path(__file__).resolve().parents[1] / "examples" / "sdk" / "linesink.py"
LineSink: type[ConsoleBackend] = backend_class(LINESINK)
linesink: Any = sys.modules[LineSink.__module__]


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        r.close()


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def check_sink(path: Path, logs: dict[str, bytes]) -> dict[str, list[dict[str, Any]]]:
    """Each domain's records in ``path`` are the lines of its log, each once, in order, with
    no gap: the first starts a line, each starts where the one before ends, and together they
    are the log's bytes from the first to the end of the last.  Returns them by domain."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records(path):
        assert set(r) == {"domain", "offset", "line"}, r
        by[r["domain"]].append(r)
    for domain, rs in by.items():
        log = logs[domain]
        first = at = rs[0]["offset"]
        assert first == 0 or log[first - 1 : first] == b"\n", (domain, first)
        lines = []
        for r in rs:
            line = r["line"].encode("utf-8", "surrogateescape")
            assert r["offset"] == at, (domain, r["offset"], at)
            assert line.endswith(b"\n") or len(line) >= linesink.MAX_LINE, r
            lines.append(line)
            at += len(line)
        assert log[first:at] == b"".join(lines), domain
    return by


def sink_file(rig: Rig) -> Path:
    return rig.log_dir / "lines.jsonl"


def logs(rig: Rig, *guests: Guest) -> dict[str, bytes]:
    return {g.domain: rig.log(g.domain) for g in guests}


def text(rnd: random.Random, n: int) -> bytes:
    """Lines of random lengths, some not UTF-8, some very long, the last one unfinished."""
    out = bytearray()
    while len(out) < n:
        k = rnd.choice([0, 1, 5, 40, 80, 300, 3000, 20_000]) if rnd.random() < 0.98 else 40_000
        out += rnd.choice([b"x", b"\xff\xfe", "é".encode()]) * (k // 2) + b"\n"
    return bytes(out[:n])


# --- in-process --------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_each_line_once_across_random_crashes_and_torn_writes_of_the_sink_file(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Instances killed at every step of an append, and half-way through writing their own
    file, some while finishing their predecessor's append."""
    rnd = random.Random(22)
    web, db = rig.guest(1, 5, "web"), rig.guest(2, 6, "db")
    b, host = rig.backend(LineSink)
    connect(b, host, web)
    connect(b, host, db)
    write_all = linesink.write_all
    crashes = 0

    def torn(fd: int, data: bytes) -> None:
        write_all(fd, data[: rnd.randrange(len(data) + 1)])
        raise SimulatedCrash("half-way through the sink's write")

    def arm(x: ConsoleBackend) -> None:
        where = rnd.choice(["journaled", "mid-append", "appended", "published", "sink"])
        if where == "sink":
            monkeypatch.setattr(linesink, "write_all", torn)
        elif where == "mid-append":
            x.write_log = _partial_write(x, rnd.randrange(64))  # type: ignore[method-assign,assignment]
        else:
            x.checkpoint = _crash_at(where)  # type: ignore[method-assign,assignment]

    def replace(dead: ConsoleBackend) -> tuple[ConsoleBackend, FakeHost]:
        nonlocal crashes
        while True:
            crashes += 1
            monkeypatch.setattr(linesink, "write_all", write_all)
            abandon(dead)
            new, new_host = rig.backend(LineSink)
            if rnd.random() < 0.3:
                arm(new)  # may die while finishing its predecessor's append
            try:
                resume(new, new_host, web)
                resume(new, new_host, db)
            except SimulatedCrash:
                dead = new
                continue
            monkeypatch.setattr(linesink, "write_all", write_all)
            new.checkpoint = ConsoleBackend.checkpoint.__get__(new)  # type: ignore[method-assign]
            new.write_log = ConsoleBackend.write_log.__get__(new)  # type: ignore[method-assign]
            return new, new_host

    for _ in range(60):
        for g in (web, db):
            g.write(text(rnd, rnd.randrange(1, 1500)))
        g = rnd.choice([web, db])
        if rnd.random() < 0.3:
            b.kick(g.key)
            continue
        arm(b)
        with pytest.raises(SimulatedCrash):
            b.kick(g.key)
        b, host = replace(b)
    for g in (web, db):
        pour(b, g, b"the end\n")
    assert crashes > 20
    by = check_sink(sink_file(rig), logs(rig, web, db))
    stats = b.statistics()
    for g in (web, db):
        assert rig.log(g.domain) == bytes(g.sent)
        assert by[g.domain][0]["offset"] == 0  # it saw both domains from their first byte
        assert by[g.domain][-1]["line"].endswith("the end\n")
        assert stats[f"{g.domain}.lines"] == len(by[g.domain])
    assert stats["sink_errors"] == 0


@pytest.mark.timeout(30)
def test_a_warm_spare_built_before_the_output_skips_what_was_written(rig: Rig) -> None:
    g = rig.guest(1, 5, "web")
    b, host = rig.backend(LineSink)
    connect(b, host, g)
    spare, spare_host = rig.backend(LineSink)  # built now, takes over later
    pour(b, g, b"".join(b"line %d\n" % i for i in range(500)))
    g.write(b"half a li")
    b.kick(g.key)
    g.write(b"ne\nlast\n")
    b.checkpoint = _crash_at("published")  # type: ignore[method-assign,assignment]
    with pytest.raises(SimulatedCrash):
        b.kick(g.key)  # "ne\nlast\n" is in the log and the sink's file, not committed
    abandon(b)
    with open(sink_file(rig), "ab") as f:
        f.write(b'{"domain": "web", "off')  # as if its write had been torn too
    resume(spare, spare_host, g)  # offers "ne\nlast\n" again
    by = check_sink(sink_file(rig), logs(rig, g))
    assert [r["line"] for r in by["web"][-3:]] == ["line 499\n", "half a line\n", "last\n"]
    assert len(by["web"]) == 502 and spare.statistics()["web.lines"] == 502


@pytest.mark.timeout(30)
def test_it_starts_at_a_line_start_and_reads_what_another_backend_logged(rig: Rig) -> None:
    rig.log_dir.mkdir(parents=True, exist_ok=True)
    (rig.log_dir / "web.log").write_bytes(b"an earlier life\nand its unfinished li")
    g = rig.guest(1, 5, "web")

    def swap_to(old: ConsoleBackend, cls: type[ConsoleBackend]) -> ConsoleBackend:
        wire = msgpack.unpackb(msgpack.packb(old.save().to_wire()))
        old.suspend()
        new, host = rig.backend(cls)
        new.restore(BackendState.from_wire(wire))
        resume(new, host, g)
        return new

    b, host = rig.backend()  # drivers.console
    connect(b, host, g)
    pour(b, g, b"ne\nfirst life line\nhalf")
    b = swap_to(b, LineSink)
    pour(b, g, b" a line\n")
    b = swap_to(b, ConsoleBackend)
    pour(b, g, b"".join(b"while the sink was away %d\n" % i for i in range(100)))
    b = swap_to(b, LineSink)
    pour(b, g, b"back\n")
    by = check_sink(sink_file(rig), logs(rig, g))
    lines = [r["line"] for r in by["web"]]
    assert lines[0] == "half a line\n" and lines[-1] == "back\n" and len(lines) == 102
    assert b.statistics()["web.lines"] == 102


@pytest.mark.timeout(30)
def test_the_path_option_long_lines_and_bytes_that_are_not_utf8(rig: Rig) -> None:
    path = rig.dir / "elsewhere.jsonl"
    b, host = rig.backend(LineSink, path=str(path))
    g = rig.guest(1, 5, "web")
    connect(b, host, g)
    pour(b, g, b"one\n")
    assert records(path) == [{"domain": "web", "offset": 0, "line": "one\n"}]
    pour(b, g, b"y" * 40_000 + b"\n\xff is not UTF-8\n")  # a line too long, then bad bytes
    by = check_sink(path, logs(rig, g))
    pieces = [r["line"] for r in by["web"][1:-2]]
    assert len(pieces) == 2 and all(len(p) >= linesink.MAX_LINE for p in pieces)
    assert by["web"][-1]["line"] == "\udcff is not UTF-8\n"  # its bytes, exactly
    assert b.statistics()["web.lines"] == 5
    with pytest.raises(ValueError, match=r"path .*: cannot open it"):
        rig.backend(LineSink, path=str(rig.dir / "no" / "such" / "dir" / "x.jsonl"))
    with pytest.raises(ValueError, match=r"unknown console backend option.*path"):
        rig.backend(ConsoleBackend, path=str(path))  # drivers.console has no such option


# --- end to end --------------------------------------------------------------------------------

DRIVER = """[driver.con0]
module = "drivers.console"
watchdog_sec = 1.0
intensity = 50
period = 60.0
"""
LINES = 100_000  # 5.7 MB each: they outlast two swaps and a recovery (some 55,000 here)
NAMES = ("c1", "c2")


def _grown(paths: list[Path], least: int) -> bool:
    return all(p.exists() and p.stat().st_size > least for p in paths)


def tail(path: Path, n: int = 65536) -> bytes:
    """The last ``n`` bytes of a file."""
    with path.open("rb") as f:
        f.seek(max(0, f.seek(0, 2) - n))
        return f.read()


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_linesink_swapped_in_killed_and_swapped_out_under_printing_guests(stack: Stack) -> None:
    cfgs = [
        stack.domain_config(
            n, "conecho", memory=4, on_poweroff="preserve", console="con0", extra=f"lines={LINES}"
        )
        for n in NAMES
    ]
    stack.up([], extra=DRIVER)
    events = Events(stack.subscribe(["domain.", "driver."]), stack)
    consoles = stack.run_dir / "consoles"
    log_paths = [consoles / f"{n}.log" for n in NAMES]
    jsonl = consoles / "lines.jsonl"

    def sink_lines() -> int:
        """The fewest lines the JSON file holds of one guest (each line of a guest is one
        record naming it)."""
        data = jsonl.read_bytes() if jsonl.exists() else b""
        return min(data.count(f'"domain": "{n}"'.encode()) for n in NAMES)

    def swap_to(target: str) -> None:
        old = driver_row(stack, "con0")["pid"]
        r = swap(RunDir(stack.run_dir), "con0", target, wait=60, probation=0.3)
        stack.pids.append(r["pid"])
        assert r["outcome"] == "swapped" and r["old_pid"] == old and r["pid"] != old, r

    try:
        for cfg in cfgs:
            stack.create(cfg)
        wait_until(lambda: _grown(log_paths, 200_000), timeout=60, what="both guests printing")
        swap_to(str(LINESINK))
        # over 2,100 lines of each guest before the kill and as many after it: the sink's
        # share below is more than 4,000 of each, whatever the timing
        wait_until(lambda: sink_lines() > 2100, timeout=60, what="linesink writing lines")
        kill_with_a_warm_spare(stack, events, "con0")  # its spare is a linesink too
        killed_at = sink_lines()
        wait_until(lambda: sink_lines() > killed_at + 2100, timeout=60, what="more lines")
        stats = wait_until(
            lambda: (s := driver_row(stack, "con0")["statistics"]).get(f"{NAMES[1]}.lines") and s,
            timeout=30,
            what="linesink's statistics",
        )
        assert stats["sink_errors"] == 0 and stats[f"{NAMES[0]}.lines"] > 0, stats
        swap_to("drivers.console")
        for n in NAMES:
            events.wait(f"domain.{n}.shutdown", timeout=180)
        wait_until(
            lambda: all(b"conecho: done" in tail(p) for p in log_paths),
            timeout=30,
            what="the last lines in the logs",
        )
    finally:
        events.sub.close()
    logs = {n: (consoles / f"{n}.log").read_bytes() for n in NAMES}
    for n in NAMES:
        check_lines(logs[n].decode(), LINES)
    by = check_sink(jsonl, logs)
    pattern = re.compile(r"conecho: line (\d{9}) " + PATTERN + "\n")
    for n in NAMES:
        numbers = [int(m.group(1)) for r in by[n] if (m := pattern.fullmatch(r["line"]))]
        assert len(numbers) == len(by[n]) > 4000, n
        assert numbers == list(range(numbers[0], numbers[0] + len(numbers))), n
        # swapped in and out while the guest printed: lines before and after the sink's
        assert numbers[0] > 0 and numbers[-1] < LINES - 1, (n, numbers[0], numbers[-1])
    row = driver_row(stack, "con0")
    assert (row["swaps"], row["restarts"], row["module"]) == (2, 1, "drivers.console"), row
