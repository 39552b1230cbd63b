"""Campaign workloads: the verifying guest programs a campaign runs, one checker per program,
collected from the device classes (``devices/``: each class declares its checkers beside it;
the framework is ``devices/workload.py``; docs/campaigns.md, "Workloads").

* ``blkstress`` (block, devices/vbd.py): writes and verifies blocks on its disk; ``MISMATCH``
  lines are data mismatches, ``failed: status`` and ``phase stopped`` lines errors; its ``ops=``
  summary line is the result.
* ``netpair`` (net, devices/vif.py): guests in pairs on one bridge send each other sequenced
  frames; a ``corrupt frame`` line is a data mismatch, a frontend or send failure an error; the
  result is the ``sent= received= lost= dup= reordered= corrupt= other= errors=`` summary line.
* ``conecho`` (console, devices/console.py): prints numbered lines through the console driver;
  the checker follows the domain's log file itself and requires every line exactly once, in
  order: a missing or repeated line is an error, a mangled one a data mismatch.
* ``rngtest`` (entropy, devices/rng.py): reads random bytes continuously; a failed read is an
  error, a constant, repeated or skewed buffer a data mismatch.
"""

from __future__ import annotations

from typing import Final

import devices
from devices.workload import Checker, GuestSpec, Result, Tally, Unit, WorkloadSpec

#: The workloads campaigns can run, by guest program.
CHECKERS: Final[dict[str, type[Checker]]] = {
    c.image: c for cls in devices.CLASSES for c in cls.checkers
}

__all__ = ["CHECKERS", "Checker", "GuestSpec", "Result", "Tally", "Unit", "WorkloadSpec"]
