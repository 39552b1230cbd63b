"""Fault injection inside a driver (docs/campaigns.md): armed faults and the decision per request.

A backend asks :meth:`Injector.pick` about each request only while some fault is armed (it swaps
its ``perform`` for an injecting one, so an unarmed driver pays nothing).  The decision follows
Linux's fault-injection framework (``should_fail()`` in lib/fault-inject.c): a fault that
matches the request's filters counts the request, then ``times``, ``fail_nth``, ``interval``
and ``probability`` decide whether it fires.  What firing does is the backend's business,
except for the kinds every driver host can carry out (``HOST_KINDS``).

What a "request" is depends on the device class (:func:`fault_classes`; each class declares its
:class:`FaultClass` in its module of ``devices/``): a block request (``drivers.blk``), a tx
request being switched (``drivers.net``), an append of console output to the log
(``drivers.console``).  Each class says what the ``op`` filter names and what ``sector``
selects, and refuses, with the reason, the types that mean nothing for it (a console has no
responses to spoil).

Faults arrive as ``["faults", [spec, ...]]`` from the supervisor, which keeps the table
(``isovisor fault add|list|remove|reset``) and re-sends the faults still armed to each new
instance; each firing is reported back (``fault_fired``) so the table's ``times`` stays true.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Final

#: Fault types carried out inside a driver, with what each does.
IN_DRIVER_TYPES: Final[dict[str, str]] = {
    "segv": "a real invalid memory access while executing the request (SIGSEGV)",
    "abort": "abort() while executing the request (SIGABRT)",
    "exception": "an unhandled exception in the request handler",
    "exit": "os._exit(3) while executing the request",
    "hang": "block forever while holding the request (no more heartbeats)",
    "slow": "delay the response by latency_ms +- jitter_ms",
    "drop": "never answer the request (never consume the output) and stop serving the device",
    "duplicate": "publish a response twice (the copy replaces the next response)",
    "bad_id": "answer with an id that matches no request in flight",
    "bad_status": "answer with a status that is not okay, error or unsupported",
    "bad_op": "answer with another operation than the request's",
    "bad_index": "publish rsp_prod beyond the guest's req_prod and stop serving the device",
    "corrupt_data": "flip one byte of the data delivered: a successful read's, a frame's, the "
    "log's (silent corruption)",
    "leak_mem": "allocate and touch 64 MiB more, kept until the process ends",
    "leak_fd": "open 256 more file descriptors, kept until the process ends",
    "poison": "die by SIGSEGV on every request covering `sector`, in every instance (until "
    "the request is answered as poison)",
}
#: Kinds that end or stall the process: inline (inside the kernel) they are refused unless the
#: fault says ``really`` (the inline comparison of a campaign wants to see the damage).
PROCESS_KINDS: Final = frozenset({"segv", "abort", "exit", "hang", "poison"})
#: Kinds the driver host carries out itself (:meth:`drivers.host.DriverHost.carry_out`), on a
#: request or, with ``now``, as soon as the fault is armed.
HOST_KINDS: Final = frozenset({"segv", "abort", "exit", "exception", "hang", "leak_mem", "leak_fd"})
#: The operations of block requests (the ``op`` filter of a block driver's faults).
OPS: Final = ("read", "write", "flush", "discard")
#: Types that spoil a response the guest's frontend checks.
RESPONSE_TYPES: Final = ("duplicate", "bad_id", "bad_status", "bad_op", "bad_index")


@dataclass(frozen=True)
class FaultClass:
    """What fault injection means for one device class: the request a fault fires on, the
    operations the ``op`` filter names, what ``sector`` selects, and the in-driver types its
    backends cannot carry out, each with the reason (:meth:`check` refuses them)."""

    #: The device class ("vbd", "vif", "console"); "any" when the driver is not known.
    name: str
    #: The driver, for messages: "block", "net", "console".
    driver: str
    #: What one request is.
    request: str
    #: What the ``op`` filter may name.
    ops: tuple[str, ...]
    #: What ``sector`` selects.
    position: str
    #: In-driver type -> why this class's backends cannot carry it out.
    refused: Mapping[str, str] = field(default_factory=dict)

    @property
    def types(self) -> tuple[str, ...]:
        """The in-driver types this class carries out, in :data:`IN_DRIVER_TYPES` order."""
        return tuple(t for t in IN_DRIVER_TYPES if t not in self.refused)

    def refusal(self, kind: str, outside: Iterable[str] = ()) -> str | None:
        """Why ``kind`` cannot be injected into this class's drivers, naming the types they
        take (``outside``: the supervisor's own types, listed first); None if it can."""
        why = self.refused.get(kind)
        if why is None:
            return None
        return (
            f"fault type {kind!r} does not apply to a {self.driver} driver (device class "
            f"{self.name}): {why}; a {self.driver} driver takes: "
            f"{', '.join([*outside, *self.types])}"
        )

    def check(self, fault: Fault) -> None:
        """ValueError if ``fault`` cannot be injected into this class's drivers."""
        why = self.refusal(fault.type)
        if why is not None:
            raise ValueError(why)
        if fault.op is not None and fault.op not in self.ops:
            raise ValueError(
                f"op {fault.op!r} is not one of {', '.join(self.ops)}: the "
                f"operations of {self.request}"
            )


_ANY_CLASS: Final = "any"


@functools.cache
def fault_classes() -> dict[str, FaultClass]:
    """The fault class of each device class (``devices/``: each class declares its own), by
    class name, and ``any`` (a driver not known to be of one: every type and operation passes
    here, and the driver's own class decides)."""
    import devices  # here, not at the top: the class declarations import this module

    classes = {c.name: c.faults() for c in devices.CLASSES}
    classes[_ANY_CLASS] = FaultClass(
        _ANY_CLASS,
        "driver",
        "any driver's requests",
        tuple(dict.fromkeys(op for c in classes.values() for op in c.ops)),
        "what the driver's class says",
    )
    return classes


def class_of_module(module: str | None) -> FaultClass:
    """The fault class of a driver module (``any`` for one whose device class is not known,
    e.g. a backend loaded from a file: that driver's own injector checks its faults)."""
    import devices

    cls = devices.of_module(module)
    return fault_classes()[cls.name if cls is not None else _ANY_CLASS]


_KEYS: Final = frozenset(
    {
        "id",
        "type",
        "probability",
        "interval",
        "times",
        "fail_nth",
        "domain",
        "vdev",
        "op",
        "sector",
        "latency_ms",
        "jitter_ms",
        "really",
        "now",
    }
)


@dataclass(frozen=True)
class RequestInfo:
    """What the filters look at."""

    domain: str
    vdev: str
    op: str
    sector: int
    sectors: int  # the request's length in sectors (0 for a flush)


@dataclass
class Fault:
    """One armed fault: its knobs, filters and counters."""

    id: int
    type: str
    probability: float = 100.0
    interval: int = 1
    times: int = 1  # -1: unlimited; 0: disarmed
    fail_nth: int = 0
    domain: str | None = None
    vdev: str | None = None
    op: str | None = None
    sector: int | None = None
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    really: bool = False
    #: Fire once as soon as it is armed, on no request (``HOST_KINDS`` only).
    now: bool = False
    calls: int = field(default=0, compare=False)
    fired: int = field(default=0, compare=False)

    @classmethod
    def from_dict(cls, spec: dict[str, Any], fclass: FaultClass | None = None) -> Fault:
        """A fault from its wire form, for a driver of ``fclass`` (default: a block driver);
        ValueError naming the bad key, or saying why the type does not apply, otherwise."""
        if not isinstance(spec, dict):
            raise ValueError(f"a fault is a table of keys, got {spec!r:.80}")
        unknown = sorted(set(spec) - _KEYS)
        if unknown:
            raise ValueError(
                f"unknown fault key(s) {', '.join(map(str, unknown))}; allowed: "
                f"{', '.join(sorted(_KEYS))}"
            )
        kind = spec.get("type")
        if kind not in IN_DRIVER_TYPES:
            raise ValueError(
                f"type {kind!r} is not a fault a driver carries out; choose one "
                f"of {', '.join(IN_DRIVER_TYPES)}"
            )
        f = cls(
            id=_int(spec, "id", 0, 0),
            type=kind,
            probability=_num(spec, "probability", 100.0, 0.0, 100.0),
            interval=_int(spec, "interval", 1, 1),
            times=_times(spec),
            fail_nth=_int(spec, "fail_nth", 0, 0),
            domain=_str(spec, "domain"),
            vdev=_str(spec, "vdev"),
            op=_str(spec, "op"),
            sector=_opt_int(spec, "sector"),
            latency_ms=_num(spec, "latency_ms", 0.0, 0.0, 600_000.0),
            jitter_ms=_num(spec, "jitter_ms", 0.0, 0.0, 600_000.0),
            really=bool(spec.get("really", False)),
            now=_bool(spec, "now"),
        )
        (fclass or fault_classes()["vbd"]).check(f)
        if f.now:
            if f.type not in HOST_KINDS:
                raise ValueError(
                    f"now = true fires a fault on no request, which only the driver host's "
                    f"own kinds can do ({', '.join(sorted(HOST_KINDS))}); {f.type} needs a "
                    "request"
                )
            filters = [k for k in ("domain", "vdev", "op", "sector") if spec.get(k) is not None]
            extra = [*filters, *(k for k in ("interval", "fail_nth", "probability") if k in spec)]
            if extra or f.times != 1:
                raise ValueError(
                    f"now = true fires once, on no request: it takes no "
                    f"{', '.join(extra) or 'times'}"
                )
        if f.type == "poison" and f.sector is None:
            raise ValueError("a poison fault needs `sector`: the request it always dies on")
        return f

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def matches(self, req: RequestInfo) -> bool:
        if self.domain is not None and req.domain != self.domain:
            return False
        if self.vdev is not None and req.vdev != self.vdev:
            return False
        if self.op is not None and req.op != self.op:
            return False
        return self.sector is None or (req.sector <= self.sector < req.sector + max(1, req.sectors))

    def _eligible(self, rng: random.Random) -> bool:
        """``interval`` and ``probability`` (when there is no ``fail_nth``)."""
        if self.interval > 1 and self.calls % self.interval:
            return False
        return self.probability >= 100.0 or rng.random() * 100.0 < self.probability

    def should_fire(self, rng: random.Random) -> bool:
        """Linux's should_fail() for one eligible request: counts it, then decides."""
        if self.times == 0:
            return False
        self.calls += 1
        if self.fail_nth:
            if self.calls != self.fail_nth:
                return False
        elif not self._eligible(rng):
            return False
        if self.times > 0:
            self.times -= 1
        if self.fail_nth:
            self.times = 0  # fail_nth fires once
        self.fired += 1
        return True


class Injector:
    """The armed faults of one driver instance, a driver of ``fclass`` (default: block)."""

    def __init__(self, seed: int = 0, fclass: FaultClass | None = None) -> None:
        self.faults: dict[int, Fault] = {}
        self.rng = random.Random(seed)
        self.fclass = fclass or fault_classes()["vbd"]

    def load(self, specs: list[dict[str, Any]]) -> list[Fault]:
        """Replace the table with ``specs`` (the supervisor's view); ValueError if any is
        bad or does not apply to this driver's class, leaving the table as it was."""
        faults = [Fault.from_dict(s, self.fclass) for s in specs]
        self.faults = {f.id: f for f in faults}
        return faults

    @property
    def armed(self) -> bool:
        return any(f.times != 0 and not f.now for f in self.faults.values())

    def pick(self, req: RequestInfo, skip: Collection[str] = ()) -> Fault | None:
        """The first armed fault (by id) that matches ``req`` and fires, if any.  Faults of a
        type in ``skip`` do not apply to this request: it is not counted for them."""
        for f in sorted(self.faults.values(), key=lambda f: f.id):
            if (
                f.times != 0
                and not f.now
                and f.type not in skip
                and f.matches(req)
                and f.should_fire(self.rng)
            ):
                return f
        return None

    def delay_s(self, f: Fault) -> float:
        """The delay of a ``slow`` fault, jitter drawn from the injector's generator."""
        jitter = self.rng.uniform(-f.jitter_ms, f.jitter_ms) if f.jitter_ms else 0.0
        return max(0.0, f.latency_ms + jitter) / 1000.0


def _int(spec: dict[str, Any], key: str, default: int, lo: int) -> int:
    v = spec.get(key, default)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{key} must be an integer >= {lo}, got {v!r}")
    return v


def _opt_int(spec: dict[str, Any], key: str) -> int | None:
    return None if spec.get(key) is None else _int(spec, key, 0, 0)


def _times(spec: dict[str, Any]) -> int:
    v = spec.get("times", 1)
    if not isinstance(v, int) or isinstance(v, bool) or v < -1 or v == 0:
        raise ValueError(f"times must be -1 (unlimited) or an integer >= 1, got {v!r}")
    return v


def _num(spec: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = spec.get(key, default)
    if not isinstance(v, int | float) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"{key} must be a number from {lo:g} to {hi:g}, got {v!r}")
    return float(v)


def _bool(spec: dict[str, Any], key: str) -> bool:
    v = spec.get(key, False)
    if not isinstance(v, bool):
        raise ValueError(f"{key} must be true or false, got {v!r}")
    return v


def _str(spec: dict[str, Any], key: str) -> str | None:
    v = spec.get(key)
    if v is not None and (not isinstance(v, str) or not v):
        raise ValueError(f"{key} must be a non-empty string, got {v!r}")
    return v
