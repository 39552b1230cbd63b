"""A test of the console example, written the way docs/sdk.md tells a driver developer to write
one: the ``isovisor_stack`` fixture (the isovisor pytest plugin) around a real stack, here a
console stack: two ``conecho`` guests printing numbered lines.

Run it with ``python3 -m pytest examples/sdk/test_linesink.py`` (CI runs it from
tests/test_sdk_examples.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from isovisor.testing import MiniStack

pytestmark = pytest.mark.timeout(240)  # every wait of the fixture is bounded too

LINESINK = Path(__file__).resolve().parent / "linesink.py"


def test_every_line_the_sink_saw_is_in_its_file_once(isovisor_stack: MiniStack) -> None:
    """drivers.console -> the example -> drivers.console while c1 and c2 print 60000 lines:
    the logs hold every line once, in order, and the sink's file holds an unbroken run of
    them, each once, exactly as in the log."""
    s = isovisor_stack.start_console("drivers.console", guests=2, lines=60_000)
    # in the console's log directory: a jailed driver writes only where it was given (docs/jail.md)
    sink = s.console_log(s.guests[0]).parent / "lines.jsonl"
    r = s.swap(LINESINK, options={"path": str(sink)})
    assert r["outcome"] == "swapped", r
    s.wait_statistics(
        lambda st: st["c1.lines"] > 1000 and st["c2.lines"] > 1000 and st["sink_errors"] == 0,
        what="the example writing both guests' lines",
    )
    r = s.swap("drivers.console", options={})  # drivers.console has no `path` option
    assert r["outcome"] == "swapped", r
    s.wait_guests()  # every line in each log once, in order
    for guest in s.guests:
        log = s.console_log(guest).read_bytes()
        mine = [
            r
            for line in sink.read_text().splitlines()
            if (r := json.loads(line))["domain"] == guest
        ]
        assert len(mine) > 1000, guest
        for rec in mine:  # each line where the log has it
            line = rec["line"].encode()
            assert log[rec["offset"] : rec["offset"] + len(line)] == line, rec
        ends = [rec["offset"] + len(rec["line"].encode()) for rec in mine]
        starts = [rec["offset"] for rec in mine[1:]]
        assert starts == ends[:-1], f"{guest}: a line missing, twice or out of order"
    s.finish()
