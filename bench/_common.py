"""Shared helpers for the benchmarks: private stacks with guaranteed clean-up, statistics,
machine state, and a small result format that prints as a table and serialises to JSON.

Every benchmark script is runnable on its own (``python3 bench/<name>.py [--quick]``) and
writes its result as JSON with ``--json FILE`` so ``bench/run_all.py`` can collect them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from ipc.events import Subscriber  # noqa: E402
from isovisor.privstack import ISOVISOR, PrivateStack, domain_toml  # noqa: E402,F401

# --- statistics --------------------------------------------------------------------------------


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def pctl(xs: list[float], p: float) -> float:
    """Percentile by linear interpolation between closest ranks (p in 0..100)."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def parse_kv(line: str) -> dict[str, str]:
    """``"crc32: bytes=1 ns=2"`` -> ``{"bytes": "1", "ns": "2"}``."""
    return dict(tok.split("=", 1) for tok in line.split() if "=" in tok)


# --- results -----------------------------------------------------------------------------------


@dataclass
class Row:
    metric: str
    value: str
    comparison: str = ""
    target: str = ""
    met: bool | None = None  # None: informational, no target


@dataclass
class Result:
    name: str
    title: str
    command: str
    rows: list[Row] = field(default_factory=list)
    samples: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    other_cpu_pct: float | None = None  # CPU used by processes outside the benchmark
    seconds: float = 0.0
    quiet_wait_s: float = 0.0  # time spent waiting for other processes to calm down

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Result:
        d = dict(d)
        d["rows"] = [Row(**r) for r in d.get("rows", [])]
        return cls(**d)


#: A run counts as "quiet" if other processes used less than this % of one CPU during it.
QUIET_PCT = 20


@dataclass
class Pairs:
    """Alternating bare/stack runs; a pair is *quiet* if other processes used < QUIET_PCT of a
    CPU during both of its runs."""

    runs: list[dict[str, dict[str, Any]]] = field(default_factory=list)  # [{"bare":..., ...}]

    def quiet(self) -> list[dict[str, dict[str, Any]]]:
        return [p for p in self.runs if all(r["other"] < QUIET_PCT for r in p.values())]

    def chosen(self, want: int) -> tuple[list[dict[str, dict[str, Any]]], str]:
        """The pairs the headline uses: the quiet ones if there are ``want`` (or at least 3),
        else all of them; plus a sentence saying which."""
        q = self.quiet()
        n = len(self.runs)
        if len(q) == n:
            return q, (
                f"all {n} pairs (in none did other processes use {QUIET_PCT}% of a CPU or more)"
            )
        if len(q) >= min(want, 3):
            return q, (
                f"the {len(q)} quiet pairs of the {n} run (in the other {n - len(q)}, "
                f"other processes used {QUIET_PCT}% of a CPU or more during a run, so "
                "they are left out)"
            )
        return self.runs, (
            f"all {n} pairs: only {len(q)} ran with other processes below "
            f"{QUIET_PCT}% CPU, so disturbed pairs are included"
        )

    def values(
        self, pairs: list[dict[str, dict[str, Any]]], kind: str, key: str = "value"
    ) -> list[float]:
        return [p[kind][key] for p in pairs]


def run_pairs(
    want: int,
    one: Callable[[str, int], dict[str, Any]],
    pids: Callable[[], list[int]],
    max_pairs: int,
    kinds: tuple[str, ...] = ("bare", "stack"),
) -> Pairs:
    """Run bare/stack pairs (or one run of each of ``kinds``; order reversed every other time)
    until ``want`` quiet pairs, or ``max_pairs`` pairs, or -- once the wait budget is spent --
    ``want`` pairs of any kind."""
    out = Pairs()
    i = 0
    while len(out.quiet()) < want and i < max_pairs:
        if GATE.left <= 0 and i >= want:
            break
        GATE.wait()
        pair: dict[str, dict[str, Any]] = {}
        for kind in kinds if i % 2 == 0 else kinds[::-1]:
            load = OtherLoad(pids())
            r = one(kind, i)
            r["other"] = round(load.percent())
            pair[kind] = r
            print(
                f"  pair {i + 1} {kind:5}: {r['show']}, other processes {r['other']}% CPU",
                file=sys.stderr,
            )
        out.runs.append(pair)
        i += 1
    return out


def met_word(met: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[met]


def print_result(res: Result) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=res.title, title_justify="left")
    for col in ("Metric", "Value", "Same-run comparison", "Target", "Met"):
        t.add_column(col)
    for r in res.rows:
        style = {True: "green", False: "bold red", None: ""}[r.met]
        t.add_row(
            r.metric,
            r.value,
            r.comparison,
            r.target,
            f"[{style}]{met_word(r.met)}[/]" if style else met_word(r.met),
        )
    con = Console(highlight=False, width=max(120, shutil.get_terminal_size().columns))
    con.print(t)
    for n in res.notes:
        con.print(f"  note: {n}", markup=False)
    con.print(
        f"  load average before/after: {fmt_load(res.load_before)} / "
        f"{fmt_load(res.load_after)}; other processes' CPU during the run: "
        f"{fmt_other(res.other_cpu_pct)}; {res.seconds:.1f} s",
        markup=False,
    )


def fmt_load(la: tuple[float, float, float] | list[float]) -> str:
    return " ".join(f"{x:.2f}" for x in la)


def fmt_other(pct: float | None) -> str:
    return "n/a" if pct is None else f"{pct:.0f}% of one CPU"


#: CPU seconds used by stack processes (not our children: `up --detach` daemonises them).
_STACK_CPU: list[float] = []


class OtherLoad:
    """CPU time used by processes that are not this benchmark or its children.

    The VM is shared; this tells the reader how much of the machine something else took while
    a figure was measured.  Sampled from /proc/stat minus our own process tree.
    """

    def __init__(self, extra_pids: list[int] = ()) -> None:  # type: ignore[assignment]
        self.extra = []
        for pid in extra_pids:  # live processes that are ours but not our children (stacks)
            with contextlib.suppress(psutil.Error):
                self.extra.append(psutil.Process(pid))
        self.t0 = time.monotonic()
        self.sys0 = self._system_busy()
        self.own0 = self._own()
        self.stack0 = sum(_STACK_CPU)

    @staticmethod
    def _system_busy() -> float:
        ct = psutil.cpu_times()
        return ct.user + ct.nice + ct.system + ct.irq + ct.softirq + getattr(ct, "steal", 0.0)

    def _own(self) -> float:
        me = psutil.Process()
        total = 0.0
        for p in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                c = p.cpu_times()
                total += c.user + c.system
        # children that already exited and were waited for
        c = me.cpu_times()
        total += c.children_user + c.children_system
        for p in self.extra:
            with contextlib.suppress(psutil.Error):
                c = p.cpu_times()
                total += c.user + c.system
        return total

    def percent(self) -> float:
        wall = time.monotonic() - self.t0
        busy = self._system_busy() - self.sys0
        own = self._own() - self.own0 + sum(_STACK_CPU) - self.stack0
        return max(0.0, (busy - own) / wall * 100) if wall > 0 else 0.0


class QuietGate:
    """Waits, before a measurement, until other processes use < QUIET_PCT of one CPU.

    ``budget_s`` bounds the total wait of one benchmark run; once spent, measurements go ahead
    whatever the load (and the per-run "other CPU" figures say how busy it was).
    """

    def __init__(self, budget_s: float, extra_pids: Callable[[], list[int]] | None = None) -> None:
        self.left = budget_s
        self.waited = 0.0
        self.extra_pids = extra_pids or (lambda: [])

    def wait(self) -> None:
        while self.left > 0:
            t0 = time.monotonic()
            probe = OtherLoad(self.extra_pids())
            time.sleep(1.0)
            pct = probe.percent()
            spent = time.monotonic() - t0
            if pct < QUIET_PCT:
                return
            self.left -= spent
            self.waited += spent
            print(
                f"  (machine busy: other processes at {pct:.0f}% CPU; waiting, "
                f"{max(0.0, self.left):.0f} s of waiting left)",
                file=sys.stderr,
            )


GATE = QuietGate(0)


def bench_main(
    name: str,
    title: str,
    measure: Callable[[argparse.Namespace, Result], None],
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
    argv: list[str] | None = None,
) -> int:
    """Argument parsing, timing, signal handling and output shared by every benchmark."""
    ap = argparse.ArgumentParser(description=title)
    ap.add_argument("--quick", action="store_true", help="fast smoke run (fewer, shorter runs)")
    ap.add_argument("--json", type=Path, default=None, help="also write the result as JSON here")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each measurement wait until other processes use < "
        f"{QUIET_PCT}%% of a CPU, at most S seconds in total (default 0)",
    )
    if add_args:
        add_args(ap)
    args = ap.parse_args(argv)
    # SIGTERM (e.g. from run_all being stopped) unwinds like Ctrl-C, so every finally runs.
    signal.signal(signal.SIGTERM, _term_to_interrupt)
    cmd = (
        f"python3 bench/{name}.py"
        + (" --quick" if args.quick else "")
        + (f" --wait-quiet {args.wait_quiet:g}" if args.wait_quiet else "")
    )
    res = Result(name=name, title=title, command=cmd)
    GATE.left = args.wait_quiet
    res.load_before = os.getloadavg()
    other = OtherLoad()
    t0 = time.monotonic()
    try:
        measure(args, res)
    except KeyboardInterrupt:
        print(f"{name}: interrupted; everything it started has been stopped", file=sys.stderr)
        return 130
    res.seconds = time.monotonic() - t0
    res.quiet_wait_s = GATE.waited
    res.load_after = os.getloadavg()
    res.other_cpu_pct = other.percent()
    print_result(res)
    if args.json:
        args.json.write_text(json.dumps(res.to_json(), indent=2))
    return 0


def _term_to_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


# --- machine state -----------------------------------------------------------------------------


def machine_state() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import unicorn

    mem = psutil.virtual_memory()
    return {
        "nproc": str(os.cpu_count()),
        "cpu_model": model,
        "loadavg": fmt_load(os.getloadavg()),
        "python": platform.python_version(),
        "unicorn": unicorn.__version__,
        "kernel": platform.release(),
        "memory": f"{mem.total / 2**30:.1f} GiB ({mem.available / 2**30:.1f} GiB available)",
    }


# --- images ------------------------------------------------------------------------------------


def guest_image(name: str) -> Path:
    from domains.build import resolve_image

    return resolve_image(name, ROOT)


# --- private stacks ----------------------------------------------------------------------------


@contextlib.contextmanager
def private_stack(
    pcpus: int,
    domains: list[tuple[str, str, dict[str, Any]]] = (),  # type: ignore[assignment]
    timeslice_ms: int = 10,
    extra_toml: str = "",
) -> Iterator[PrivateStack]:
    """``with private_stack(2, [("a", "busy", {"weight": 512})]) as s: ...``

    ``extra_toml`` is appended to the stack's supervisor.toml (e.g. ``[driver.blk0]`` tables).
    """
    s = PrivateStack(pcpus, timeslice_ms, extra_toml, on_cpu=_STACK_CPU.append)
    try:
        paths = [s.domain_config(n, img, **kw) for n, img, kw in domains]
        s.up(paths)
        yield s
    finally:
        s.close()


def wait_topic(sub: Subscriber, topics: set[str], timeout: float) -> tuple[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        ev = sub.recv(max(0.0, deadline - time.monotonic()))
        if ev is None:
            raise TimeoutError(f"none of {sorted(topics)} within {timeout:g}s")
        if ev[0] in topics:
            return ev


# --- one guest to completion, two ways ---------------------------------------------------------


@dataclass
class GuestRun:
    output: str
    #: Seconds from sending ``create`` to the guest's shutdown event (stack) / in the one
    #: ``emu_start`` call (bare).
    wall_s: float
    #: Seconds of guest execution: the domain's cpu_time (stack) / emu_start wall (bare).
    run_s: float


def run_in_stack(
    stack: PrivateStack,
    sub: Subscriber,
    name: str,
    image: str,
    memory: int,
    extra: str,
    timeout: float = 300,
) -> GuestRun:
    """Create a domain in a running stack, wait for it to power off, read it, destroy it."""
    cfg = stack.domain_config(name, image, memory, extra=extra, on_poweroff="preserve")
    done = {f"domain.{name}.shutdown", f"domain.{name}.crashed"}
    topics = {f"console.{name}", *done}
    out: list[bytes] = []
    t0 = time.perf_counter()
    stack.call("create", path=str(cfg))
    while True:
        topic, p = wait_topic(sub, topics, timeout)
        if topic in done:
            wall = time.perf_counter() - t0
            break
        out.append(p["data"])
    if topic.endswith(".crashed"):
        raise RuntimeError(f"guest {name} crashed: {p.get('reason')}")
    info = stack.domains()[name]
    stack.call("destroy", name=name)
    return GuestRun(b"".join(out).decode(errors="replace"), wall, float(info["cpu_time"]))


def run_bare_guest(
    image: Path, memory: int, extra: str, timeout: float = 300, *, kernel_settings: bool = False
) -> GuestRun:
    """Run ``image`` with bench/bare_unicorn.py in a fresh process (as the kernel is one);
    ``kernel_settings``: the engine set up as the kernel's vCPUs are.

    A separate process, not an in-process ``run_bare`` call: a Python thread stuck in
    ``emu_start`` cannot be interrupted by Ctrl-C, a process can be killed.  And no
    ``timeout=``: unicorn implements it with a thread that wakes every few microseconds
    (~15-19k context switches per second measured here), which slowed the bare baseline.
    """
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "bare_unicorn.py"),
        str(image),
        "--mem",
        str(memory),
        "--extra",
        extra,
        *(["--kernel-settings"] if kernel_settings else []),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    status = parse_kv(err.strip().splitlines()[-1]) if err.strip() else {}
    if proc.returncode != 0 or "wall_s" not in status:
        raise RuntimeError(f"bare run of {image.name} failed ({proc.returncode}): {out}{err}")
    return GuestRun(out, float(status["wall_s"]), float(status["wall_s"]))


def line_with(output: str, prefix: str) -> dict[str, str]:
    for line in output.splitlines():
        if line.startswith(prefix):
            return parse_kv(line)
    raise RuntimeError(f"no line starting with {prefix!r} in guest output: {output!r}")
