"""The supervisor's fault table (isovisor/supervisor/faulttable.py)."""

from __future__ import annotations

import pytest

from isovisor.supervisor.faulttable import FaultTable


def test_in_driver_faults_are_sent_while_armed_and_count_down_as_they_fire() -> None:
    t = FaultTable()
    a = t.add("blk0", {"type": "bad_id", "times": 2, "op": "write"})
    b = t.add("blk0", {"type": "slow", "latency_ms": 5, "times": -1})
    t.add("net0", {"type": "exception"})
    assert [s["id"] for s in t.driver_specs("blk0")] == [a.id, b.id]
    assert t.driver_specs("blk0")[0]["op"] == "write"
    t.fired("blk0", a.id, 100)
    t.fired("blk0", a.id, 101)
    assert [s["id"] for s in t.driver_specs("blk0")] == [b.id]  # a is spent
    for _ in range(5):
        t.fired("blk0", b.id, 101)
    assert t.rows[b.id].armed and t.rows[b.id].fired == 5
    view = {r["id"]: r for r in t.list()}
    assert view[a.id]["armed"] is False and view[a.id]["pids"] == [100, 101]
    assert view[a.id]["args"] == {"times": 0, "op": "write"}  # what differs from the defaults
    assert view[b.id]["args"] == {"times": -1, "latency_ms": 5.0}


def test_a_firing_reported_for_another_driver_or_an_unknown_id_is_ignored() -> None:
    t = FaultTable()
    a = t.add("blk0", {"type": "exception"})
    assert t.fired("net0", a.id, 1) is None and t.fired("blk0", 99, 1) is None
    assert t.rows[a.id].fired == 0


def test_fail_nth_is_spent_after_one_firing() -> None:
    t = FaultTable()
    a = t.add("blk0", {"type": "segv", "fail_nth": 10, "times": -1})
    t.fired("blk0", a.id, 5)
    assert t.driver_specs("blk0") == []


def test_outside_faults_take_no_arguments_and_are_never_sent_to_the_driver() -> None:
    t = FaultTable()
    k = t.add("blk0", {"type": "recovery_crash"})
    assert t.driver_specs("blk0") == [] and t.pending_recovery_crash("blk0") is k
    t.fired("blk0", k.id, 7)
    assert t.pending_recovery_crash("blk0") is None
    with pytest.raises(ValueError, match="takes no arguments, got op"):
        t.add("blk0", {"type": "sigkill", "op": "read"})


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"type": "segfault"}, "unknown fault type 'segfault'; choose one of sigkill, sigstop"),
        ({"type": "slow", "latency_ms": -1}, "latency_ms must be a number from 0"),
        ({"type": "poison"}, "a poison fault needs `sector`"),
    ],
)
def test_bad_faults_are_refused(spec: dict[str, object], message: str) -> None:
    t = FaultTable()
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        t.add("blk0", spec)
    assert t.rows == {}


def test_remove_and_reset() -> None:
    t = FaultTable()
    a = t.add("blk0", {"type": "exception"})
    t.add("blk0", {"type": "hang"})
    c = t.add("net0", {"type": "hang"})
    assert t.remove(a.id).id == a.id
    with pytest.raises(KeyError, match=f"no fault with id {a.id}"):
        t.remove(a.id)
    assert [r.driver for r in t.reset("blk0")] == ["blk0"]
    assert list(t.rows) == [c.id]
    assert len(t.reset()) == 1 and t.rows == {}
    assert t.add("blk0", {"type": "exit"}).id == 4  # ids are never reused
