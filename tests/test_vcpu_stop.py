"""Stopping a running vCPU from another thread never re-runs half an instruction.

The kernel stops vCPUs from other threads all the time: the ticker preempts, `pause` and
`destroy` stop, and an event for a guest with an upcall handler stops it so the upcall is
delivered now.  Unicorn 2 can land such a stop just after a store, rewind to the start of the
instruction and run it again (kernel/ucstop.py).  These tests hammer a running `rmwcount`
guest, whose every iteration does `addq`, `subq` and `xchg` on memory, with thousands of stops
and upcalls, and check its counts are exact.  The last test shows the counts do go wrong
without kernel/ucstop.py, so the others can fail.

They run a Hypervisor in the test process (no control socket), so the hammering thread can
call the scheduler directly.
"""

from __future__ import annotations

import os
import random
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from domains import build
from domains.config import DomainConfig
from kernel import ucstop, vcpu
from kernel.domain import Domain
from kernel.hypervisor import Hypervisor
from tests.conftest import shm_segments

ITERS = 30_000_000  # long enough for well over 1,000 stops at one per ~150 µs
LINE = re.compile(
    r"rmwcount: iters=(\d+) add=(\d+) sub=(\d+) xchg_bad=(\d+) upcalls=(\d+) "
    r"(ok|BAD)"
)


class Kernel:
    """An in-process hypervisor that records console output and exits."""

    def __init__(self, prefix: str) -> None:
        self.console: dict[str, bytearray] = {}
        self.exited: dict[str, threading.Event] = {}
        self.hv = Hypervisor(pcpus=2, timeslice_ms=10, shm_prefix=prefix, emit=self._emit)

    def _emit(self, topic: str, data: dict[str, object]) -> None:
        kind, _, rest = topic.partition(".")
        if kind == "console":
            payload = data["data"]
            assert isinstance(payload, bytes)
            self.console.setdefault(rest, bytearray()).extend(payload)
        elif kind == "domain" and rest.endswith((".shutdown", ".crashed")):
            self.exited.setdefault(rest.rsplit(".", 1)[0], threading.Event()).set()

    def run(
        self, name: str, image: Path, hammer: Callable[[Domain], None], timeout: float = 60
    ) -> tuple[str, int]:
        """Run rmwcount while ``hammer(dom)`` is called in a loop; (console, hammer calls)."""
        done = self.exited.setdefault(name, threading.Event())
        dom = self.hv.create(
            DomainConfig(
                name=name, image="rmwcount", image_path=str(image), memory=4, extra=f"iters={ITERS}"
            )
        )
        calls = 0
        rng = random.Random(1)
        while not done.wait(rng.random() * 0.0003):  # a stop every ~150 µs, at random points
            hammer(dom)
            calls += 1
            assert calls < timeout / 0.00015 * 4, "rmwcount did not finish"
        return self.console.get(name, bytearray()).decode(errors="replace"), calls


@pytest.fixture(scope="module")
def image() -> Path:
    return build.build_guest("rmwcount")


@pytest.fixture
def kernel() -> Iterator[Kernel]:
    prefix = f"isovisor.t{os.getpid()}v."
    k = Kernel(prefix)
    try:
        yield k
    finally:
        k.hv.destroy_all()
        k.hv.shutdown()
        assert shm_segments(prefix) == []


def counts(text: str) -> dict[str, int | str]:
    m = LINE.search(text)
    assert m, f"no rmwcount summary line in:\n{text}"
    keys = ("iters", "add", "sub", "xchg_bad", "upcalls")
    return {**{k: int(v) for k, v in zip(keys, m.groups()[:5], strict=True)}, "verdict": m.group(6)}


@pytest.mark.timeout(120)
def test_preempting_stops_never_rerun_an_instruction(kernel: Kernel, image: Path) -> None:
    text, stops = kernel.run("stops", image, lambda dom: dom.vcpu.stop())
    c = counts(text)
    assert stops > 1000, f"only {stops} stops: the test did not exercise anything"
    assert c == {
        "iters": ITERS,
        "add": ITERS,
        "sub": ITERS,
        "xchg_bad": 0,
        "upcalls": 0,
        "verdict": "ok",
    }, text


@pytest.mark.timeout(120)
def test_upcalls_never_rerun_an_instruction(kernel: Kernel, image: Path) -> None:
    text, sent = kernel.run("upcalls", image, lambda dom: kernel.hv.sched.notify(dom, 1 << 3))
    c = counts(text)
    assert isinstance(c["upcalls"], int) and c["upcalls"] > 500, (
        f"only {c['upcalls']} upcalls for {sent} events: the test did not exercise anything"
    )
    assert (c["add"], c["sub"], c["xchg_bad"], c["verdict"]) == (ITERS, ITERS, 0, "ok"), text


@pytest.mark.timeout(120)
def test_without_the_fix_counts_go_wrong(
    kernel: Kernel, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: unicorn's per-access exit checks left on re-run instructions.  If this
    ever fails, unicorn fixed the defect and kernel/ucstop.py can go."""
    monkeypatch.setattr(vcpu, "stop_only_between_instructions", lambda uc: None)
    text, _ = kernel.run("control", image, lambda dom: dom.vcpu.stop())
    c = counts(text)
    assert c["verdict"] == "BAD", f"no instruction ran twice in {ITERS} iterations:\n{text}"


def test_an_unknown_engine_layout_is_refused_with_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from unicorn import UC_ARCH_X86, UC_MODE_64, UC_PROT_ALL, Uc

    fresh = Uc(UC_ARCH_X86, UC_MODE_64)  # not initialised yet: none of the fields are set
    with pytest.raises(
        ucstop.UnsupportedUnicorn,
        match=r"found the engine's page-size "
        r"fields 0 times.*install a supported release",
    ):
        ucstop.stop_only_between_instructions(fresh)

    ready = Uc(UC_ARCH_X86, UC_MODE_64)
    ready.mem_map(0x1000, 0x1000, UC_PROT_ALL)
    monkeypatch.setattr(ucstop, "_SCAN_BYTES", 0x100)  # as if the fields had moved
    with pytest.raises(ucstop.UnsupportedUnicorn, match="0 times instead of once"):
        ucstop.stop_only_between_instructions(ready)

    class NoHandle:
        pass

    with pytest.raises(ucstop.UnsupportedUnicorn, match="cannot get the engine handle"):
        ucstop.stop_only_between_instructions(NoHandle())  # type: ignore[arg-type]
