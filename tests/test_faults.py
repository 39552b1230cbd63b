"""The driver-side fault table (drivers/faults.py): Linux's knobs, filters, and bad specs."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.faults import Fault, Injector, RequestInfo

READ = RequestInfo("g1", "xvda", "read", 100, 8)
WRITE = RequestInfo("g2", "xvdb", "write", 800, 8)


def fires(f: Fault, n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [i for i in range(1, n + 1) if f.should_fire(rng)]


def test_times_limits_the_firings_and_minus_one_is_unlimited() -> None:
    assert fires(Fault(1, "exception", times=3), 10) == [1, 2, 3]
    assert fires(Fault(1, "exception", times=-1), 5) == [1, 2, 3, 4, 5]


def test_interval_considers_only_every_nth_request() -> None:
    assert fires(Fault(1, "exception", interval=4, times=-1), 12) == [4, 8, 12]


def test_fail_nth_fires_exactly_once_on_the_nth_request() -> None:
    f = Fault(1, "exception", fail_nth=3, times=-1)
    assert fires(f, 10) == [3]
    assert f.times == 0 and f.fired == 1 and f.calls == 3  # disarmed: no longer counts


def test_probability_is_a_percentage() -> None:
    got = fires(Fault(1, "exception", probability=25.0, times=-1), 4000, seed=7)
    assert 850 < len(got) < 1150, len(got)
    assert fires(Fault(1, "exception", probability=0.0, times=-1), 100) == []


@given(st.integers(0, 2**32), st.integers(1, 50))
def test_the_same_seed_gives_the_same_firings(seed: int, times: int) -> None:
    a = fires(Fault(1, "slow", probability=30.0, times=times), 300, seed)
    b = fires(Fault(1, "slow", probability=30.0, times=times), 300, seed)
    assert a == b and len(a) <= times


@pytest.mark.parametrize(
    "filters,read,write",
    [
        ({}, True, True),
        ({"domain": "g1"}, True, False),
        ({"vdev": "xvdb"}, False, True),
        ({"op": "write"}, False, True),
        ({"sector": 807}, False, True),
        ({"sector": 808}, False, False),
        ({"sector": 100, "op": "read", "domain": "g1"}, True, False),
    ],
)
def test_filters(filters: dict[str, Any], read: bool, write: bool) -> None:
    f = Fault.from_dict({"id": 1, "type": "exception", **filters})
    assert (f.matches(READ), f.matches(WRITE)) == (read, write)


def test_the_injector_picks_the_first_matching_fault_that_fires() -> None:
    inj = Injector(seed=1)
    inj.load(
        [
            {"id": 2, "type": "slow", "latency_ms": 5, "times": -1},
            {"id": 1, "type": "bad_id", "op": "write", "times": 1},
        ]
    )
    assert inj.armed
    assert [f.type if f else None for f in (inj.pick(WRITE), inj.pick(WRITE), inj.pick(READ))] == [
        "bad_id",
        "slow",
        "slow",
    ]
    assert inj.faults[1].times == 0 and inj.faults[1].fired == 1
    inj.load([{"id": 3, "type": "exception"}])
    assert list(inj.faults) == [3]
    assert inj.pick(READ) is not None and not inj.armed


def test_slow_delays_stay_within_the_jitter() -> None:
    inj = Injector(seed=3)
    f = Fault(1, "slow", latency_ms=20, jitter_ms=5)
    delays = [inj.delay_s(f) for _ in range(200)]
    assert min(delays) >= 0.015 and max(delays) <= 0.025 and len(set(delays)) > 100


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"type": "sigkill"}, "type 'sigkill' is not a fault a driver carries out"),
        ({"type": "segv", "probability": 101}, "probability must be a number from 0 to 100"),
        ({"type": "segv", "interval": 0}, "interval must be an integer >= 1"),
        ({"type": "segv", "times": 0}, "times must be -1 (unlimited) or an integer >= 1"),
        ({"type": "segv", "fail_nth": -1}, "fail_nth must be an integer >= 0"),
        ({"type": "segv", "op": "trim"}, "op 'trim' is not one of read, write, flush, discard"),
        ({"type": "segv", "colour": "red"}, "unknown fault key(s) colour"),
        ({"type": "poison"}, "a poison fault needs `sector`"),
        ({"type": "segv", "domain": ""}, "domain must be a non-empty string"),
        ("segv", "a fault is a table of keys"),
    ],
)
def test_bad_specs_are_refused_with_the_key_named(spec: Any, message: str) -> None:
    with pytest.raises(ValueError) as e:
        Fault.from_dict(spec)
    assert message in str(e.value)


def test_a_bad_spec_leaves_the_table_as_it_was() -> None:
    inj = Injector()
    inj.load([{"id": 1, "type": "exception"}])
    with pytest.raises(ValueError):
        inj.load([{"id": 2, "type": "exception"}, {"id": 3, "type": "nope"}])
    assert list(inj.faults) == [1]
