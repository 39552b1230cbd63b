"""Probe for the cap=25 shortfall: an in-process kernel (no supervisor), pcpus=1, a cap=25 busy
guest next to an uncapped one, with and without a preemption at budget refill.

The "fix" is applied to the Scheduler class in this process only (kernel/ is not edited):
after a refill, a capped domain that became eligible preempts the running domain furthest ahead
in vruntime, as ``Scheduler._wake`` does for a woken domain.

    python3 bench/probes/cap_refill.py [seconds]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from domains.build import resolve_image  # noqa: E402
from isovisor.config import DomainConfig  # noqa: E402
from kernel import scheduler as sched_mod  # noqa: E402
from kernel.hypervisor import Hypervisor  # noqa: E402

ORIG = sched_mod.Scheduler._tick_locked


def tick_with_refill_preemption(self: sched_mod.Scheduler, now: int) -> int:
    refill = now >= self._next_refill
    nxt = ORIG(self, now)
    if refill and all(p.current is not None for p in self.pcpus):
        for d in self.domains:
            if d.config.cap and d.action is None and self._eligible(d):
                victim = max(self.pcpus, key=lambda p: p.current.vruntime if p.current else -1)
                cur = victim.current
                if cur is not None and not cur.config.cap and cur.vruntime > d.vruntime:
                    cur.vcpu.stop()
    return nxt


def share(fix: bool, seconds: float) -> tuple[float, float]:
    sched_mod.Scheduler._tick_locked = tick_with_refill_preemption if fix else ORIG
    img = str(resolve_image("busy", ROOT))
    hv = Hypervisor(
        pcpus=1, timeslice_ms=10, shm_prefix=f"capprobe{int(fix)}.", emit=lambda t, p: None
    )
    try:
        a = hv.create(DomainConfig(name="capped", image="busy", image_path=img, memory=4, cap=25))
        b = hv.create(DomainConfig(name="free", image="busy", image_path=img, memory=4))
        time.sleep(1)
        c0, f0, t0 = a.cpu_ns, b.cpu_ns, time.monotonic()
        time.sleep(seconds)
        c1, f1, t1 = a.cpu_ns, b.cpu_ns, time.monotonic()
    finally:
        hv.shutdown()
        sched_mod.Scheduler._tick_locked = ORIG
    wall = (t1 - t0) * 1e9
    return (c1 - c0) / wall * 100, (f1 - f0) / wall * 100


if __name__ == "__main__":
    secs = float(sys.argv[1]) if len(sys.argv) > 1 else 4.0
    for fix in (False, True):
        capped, free = share(fix, secs)
        print(
            f"{'with' if fix else 'without'} refill preemption: capped {capped:.1f}% "
            f"of a CPU, uncapped {free:.1f}%"
        )
