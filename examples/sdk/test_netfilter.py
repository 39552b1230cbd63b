"""A test of the network example, written the way docs/sdk.md tells a driver developer to write
one: the ``isovisor_stack`` fixture (the isovisor pytest plugin) around a real stack, here a
network stack: two ``netpair`` guests that check every frame they receive.

Run it with ``python3 -m pytest examples/sdk/test_netfilter.py`` (CI runs it from
tests/test_sdk_examples.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from isovisor.testing import MiniStack

pytestmark = pytest.mark.timeout(240)  # every wait of the fixture is bounded too

NETFILTER = Path(__file__).resolve().parent / "netfilter.py"


def test_swapped_in_and_out_under_verified_traffic(isovisor_stack: MiniStack) -> None:
    """drivers.net -> the example (dropping IPv6, which netpair does not send) -> drivers.net
    while a1 and b1 exchange sequenced frames: both swaps go through, the example sees the
    frames of both guests and drops none, and every frame arrives once, in order, intact."""
    s = isovisor_stack.start_net("drivers.net", pairs=1, frames=50_000)
    r = s.swap(NETFILTER, options={"drop_ethertypes": "0x86dd"})
    assert r["outcome"] == "swapped", r
    stats = s.wait_statistics(
        lambda st: st["a1/eth0.seen"] > 1000 and st["b1/eth0.seen"] > 1000,
        what="the example counting both guests' frames",
    )
    assert stats["a1/eth0.dropped"] == stats["b1/eth0.dropped"] == 0, stats
    # back to the switch: options={} (drivers.net would refuse drop_ethertypes)
    r = s.swap("drivers.net", options={})
    assert r["outcome"] == "swapped", r
    s.more_io(2000)
    assert s.driver()["swaps"] == 2
    for summary in s.finish():  # sent = received = 50000; lost, dup, corrupt ... all 0
        assert summary["received"] == 50_000
