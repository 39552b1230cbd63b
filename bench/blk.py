"""Block I/O: the blkstress guest through the block driver, in its own process and inline,
against a plain Python pread/pwrite loop on the same image file.

One 64 MiB image file in /tmp is written once with random (non-zero) bytes and synced, so every
read below hits real data in the page cache.  Three things are measured, in one run:

* the ceiling for a Python backend: a loop of ``os.pread``/``os.pwrite`` on that file, 4 KiB at
  random offsets (IOPS) and 128 KiB sequentially (MB/s);
* the guest ``blkstress`` on a domain with ``disk = ["target=<image>, ..., backend=blk0"]``, in
  two private stacks (pcpus=2) that are both up for the whole run: one with ``[driver.blk0]``
  in its own process (``isolation = "process"``, the default), one with ``isolation =
  "inline"`` (a thread of the kernel process).  Cases: 4 KiB random read / write at QD1 and
  QD32, and 128 KiB random read / write at QD8 (MB/s).  Every repetition runs every case in
  both stacks, the stack order swapped each repetition; figures are medians;
* notifications per request: the device's kicks + notifies over its requests, read from the
  kernel (``devices``) before the domain is destroyed (``on_poweroff = "preserve"``), and the
  guest's own kicks + upcalls over its ops.

Each guest run is a new domain with a fresh name; the next one starts after the previous one's
``destroyed`` event and once the image's flock (held by a driver while a rw disk is attached)
is free again.

``--backend SPEC`` measures a block backend of your own against ``drivers.blk`` in the same run.
SPEC is what ``[driver.<name>] module`` takes: ``package.module[:Class]`` or a file
``path/to/backend.py[:Class]`` (relative to the current directory).  It is loaded and checked
first, as the driver host loads it (a SPEC that cannot be loaded: the reason, exit status 2,
nothing measured); then a third private stack runs with ``[driver.blk0] module = SPEC`` in its
own process, on an image of its own (same size, random bytes, cached the same way: a backend
that takes no flock, or writes its data back when a device goes, cannot overlap with
``drivers.blk``'s runs), every case runs in it too (the order of the three stacks rotated each
repetition), and the report adds a row per case: its median against that of ``drivers.blk`` in
its own process (the ratio of the medians); its blkstress errors and crashes count in the
"blkstress errors" row.  Without ``--backend`` the output is as before (rows and JSON keys).

    python3 bench/blk.py [--quick] [--json FILE] [--wait-quiet S] [--backend SPEC]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _common import (
    GATE,
    OtherLoad,
    PrivateStack,
    Result,
    Row,
    bench_main,
    line_with,
    median,
    private_stack,
    wait_topic,
)

from ipc.control import ControlError
from ipc.events import Subscriber

NAME = "blk"
TITLE = "Block I/O: blkstress through the blk driver (own process vs inline) vs a pread loop"

IMAGE_BYTES = 64 << 20
MODES = ("process", "inline")
#: the mode (runs key, stack) of ``--backend``: that backend, isolation = "process"
BACKEND = "backend"
#: 4 KiB targets at QD32 (process isolation)
MIN_IOPS = 20000
MIN_RATIO = 0.8
#: (kicks + notifies) / requests at QD32
MAX_NOTIFY = 0.2


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    bs: int
    qd: int
    mix: int  # % writes
    blocks: int
    ops: int  # full run; --quick uses a quarter


@dataclass(frozen=True)
class Custom:
    """The ``--backend`` under test."""

    spec: str  # as it goes into the stack's TOML (a file: absolute)
    name: str  # what the driver host loads: package.module:Class or /abs/file.py:Class


CASES = (
    Case("rr1", "4K randread QD1", 4096, 1, 0, 16384, 3000),
    Case("rw1", "4K randwrite QD1", 4096, 1, 100, 16384, 3000),
    Case("rr32", "4K randread QD32", 4096, 32, 0, 16384, 40000),
    Case("rw32", "4K randwrite QD32", 4096, 32, 100, 16384, 40000),
    Case("sr", "128K randread QD8", 131072, 8, 0, 512, 6000),
    Case("sw", "128K randwrite QD8", 131072, 8, 100, 512, 1000),
)


# --- the image and the baseline ------------------------------------------------------------------


def write_image(path: Path) -> None:
    chunk = 4 << 20
    with open(path, "wb") as f:
        for _ in range(IMAGE_BYTES // chunk):
            f.write(os.urandom(chunk))
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:  # make sure every page is cached
        while f.read(chunk):
            pass


def baseline(path: Path, quick: bool, seed: int) -> dict[str, float]:
    """One round of the pread/pwrite loop: 4 KiB random IOPS, 128 KiB sequential MB/s."""
    n4k = 20000 if quick else 100000
    passes = 1 if quick else 4
    rng = random.Random(seed)
    offs = [rng.randrange(IMAGE_BYTES // 4096) * 4096 for _ in range(n4k)]
    buf4k = os.urandom(4096)
    buf128k = os.urandom(131072)
    seq = list(range(0, IMAGE_BYTES, 131072)) * passes
    pread, pwrite = os.pread, os.pwrite
    out: dict[str, float] = {}
    fd = os.open(path, os.O_RDWR)
    try:
        t0 = time.perf_counter()
        for off in offs:
            pread(fd, 4096, off)
        out["read_4k_iops"] = n4k / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for off in offs:
            pwrite(fd, buf4k, off)
        out["write_4k_iops"] = n4k / (time.perf_counter() - t0)
        os.fdatasync(fd)  # untimed: keep write-back out of the next measurements
        t0 = time.perf_counter()
        for off in seq:
            pread(fd, 131072, off)
        out["read_128k_mbs"] = len(seq) * 131072 / (time.perf_counter() - t0) / 1e6
        t0 = time.perf_counter()
        for off in seq:
            pwrite(fd, buf128k, off)
        out["write_128k_mbs"] = len(seq) * 131072 / (time.perf_counter() - t0) / 1e6
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return out


# --- guest runs ----------------------------------------------------------------------------------


def driver_toml(isolation: str, module: str = "drivers.blk") -> str:
    return f'[driver.blk0]\nmodule = {json.dumps(module)}\nisolation = "{isolation}"\n'


def check_backend(text: str) -> Custom:
    """The ``--backend`` SPEC, normalised as the stack's config takes it and loaded as the
    driver host loads it; if it cannot be, say why and exit with status 2."""
    from drivers.host import HostError, load_backend
    from isovisor.config import backend_spec

    try:
        spec = backend_spec(text, Path.cwd())
        _, name = load_backend(spec)
    except (ValueError, HostError) as e:
        # (the host's hint names the swap command's option)
        why = str(e).replace("a file with --to-file", "a file: path/to/backend.py[:Class]")
    except Exception as e:  # anything else the loading raised
        why = f"{type(e).__name__}: {e}"
    else:
        return Custom(spec, name)
    print(f"bench/blk.py: --backend {text}: {why}", file=sys.stderr)
    raise SystemExit(2)


def wait_unlocked(path: Path, timeout: float = 30) -> None:
    """Wait until no driver holds the image's flock (a driver detaches asynchronously)."""
    deadline = time.monotonic() + timeout
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} still locked after {timeout:g}s") from None
                time.sleep(0.005)
                continue
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
    finally:
        os.close(fd)


#: destroys that had to be repeated (see destroy_and_wait)
DESTROY_RETRIES: list[str] = []


def destroy_and_wait(s: PrivateStack, sub: Subscriber, name: str) -> None:
    """Destroy a stopped domain and wait for its ``destroyed`` event.

    A destroy that arrives between the kernel's shutdown event and its marking the domain
    preserved returns without destroying it (no ``destroyed`` event follows); so if the event
    does not come soon, destroy again -- by then the domain is preserved and goes.
    """
    topic = {f"domain.{name}.destroyed"}
    for attempt in range(6):
        with contextlib.suppress(ControlError):  # already gone: its event is on its way
            s.call("destroy", name=name)
        try:
            wait_topic(sub, topic, 2.0 if attempt < 5 else 60.0)
            return
        except TimeoutError:
            DESTROY_RETRIES.append(name)
    raise TimeoutError(f"{name}: no destroyed event after {attempt + 1} destroys")


def run_guest(
    s: PrivateStack, sub: Subscriber, name: str, image: Path, case: Case, ops: int, seed: int
) -> dict[str, Any]:
    """One blkstress domain to completion; its final line and its device counters (or, if it
    crashed, ``{"crashed": reason}``)."""
    extra = (
        f"ops={ops} bs={case.bs} qd={case.qd} mix={case.mix} blocks={case.blocks} "
        f"verify_all=0 seed={seed}"
    )
    disk = f"target={image}, vdev=xvda, access=rw, backend=blk0"
    cfg = s.dir / f"{name}.toml"
    cfg.write_text(
        f'name = "{name}"\nimage = "blkstress"\nmemory = 16\n'
        f'on_poweroff = "preserve"\non_crash = "preserve"\n'
        f'disk = {json.dumps([disk])}\nextra = "{extra}"\n'
    )
    wait_unlocked(image)
    s.call("create", path=str(cfg))
    out = ""
    devs: list[dict[str, Any]] = []
    try:
        topic, p = wait_topic(sub, {f"domain.{name}.shutdown", f"domain.{name}.crashed"}, 180)
        with contextlib.suppress(ControlError):
            out = bytes(s.call("console", name=name)["data"]).decode(errors="replace")
            devs = [d for d in s.call("devices")["devices"] if d["domain"] == name]
    finally:
        destroy_and_wait(s, sub, name)
    if topic.endswith(".crashed") or not devs:
        last = out.strip().splitlines()[-3:]
        why = p.get("reason") if topic.endswith(".crashed") else "no device listed"
        return {"crashed": f"{name}: {why}; devices {devs}; console ends {last}"}
    kv = line_with(out, "blkstress: ops=")
    dev = devs[0]
    g = {
        k: int(kv[k])
        for k in ("ops", "errors", "reads", "writes", "bytes", "ns", "kicks", "waits", "upcalls")
    }
    return {
        "iops": g["ops"] * 1e9 / g["ns"],
        "mbs": g["bytes"] * 1e3 / g["ns"],
        "errors": g["errors"],
        "exit_code": p.get("code"),
        "guest": g,
        "dev": {k: dev[k] for k in ("requests", "kicks", "notifies", "faults")},
        "kernel_per_req": (dev["kicks"] + dev["notifies"]) / max(1, dev["requests"]),
        "guest_per_op": (g["kicks"] + g["upcalls"]) / max(1, g["ops"]),
    }


# --- the benchmark -------------------------------------------------------------------------------


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--backend",
        metavar="SPEC",
        default=None,
        help="also measure this block backend ([driver.blk0] module = SPEC, in its own "
        "process) against drivers.blk: package.module[:Class] or path/to/backend.py[:Class]",
    )


def measure(args: argparse.Namespace, res: Result) -> None:
    custom = check_backend(args.backend) if args.backend is not None else None
    reps = 1 if args.quick else 3
    tmp = Path(tempfile.mkdtemp(prefix="ivb-blk-", dir="/tmp"))
    image = tmp / "disk.img"
    images = dict.fromkeys(MODES, image)
    tomls = {mode: driver_toml(mode) for mode in MODES}
    if custom is not None:
        res.command += f" --backend {shlex.quote(args.backend)}"
        images[BACKEND] = tmp / "backend.img"
        tomls[BACKEND] = driver_toml("process", custom.spec)
    try:
        for path in dict.fromkeys(images.values()):
            write_image(path)
        with contextlib.ExitStack() as es:
            stacks: dict[str, tuple[PrivateStack, Subscriber]] = {}
            for mode, toml in tomls.items():
                s = es.enter_context(private_stack(2, extra_toml=toml))
                stacks[mode] = (s, es.enter_context(s.subscribe(["domain."])))
            GATE.extra_pids = lambda: [p for s, _ in stacks.values() for p in s.pids]
            base, runs, crashes = _measure(args.quick, reps, images, stacks)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _report(res, reps, args.quick, base, runs, crashes, custom)


def _measure(
    quick: bool,
    reps: int,
    images: dict[str, Path],
    stacks: dict[str, tuple[PrivateStack, Subscriber]],
) -> tuple[
    list[dict[str, float]], dict[str, dict[str, list[dict[str, Any]]]], list[tuple[str, str]]
]:
    """Returns the baseline rounds, the guest runs by mode and case, and the crashes (mode,
    what).  ``stacks`` (and ``images``, the image each mode's guests use) are by mode."""
    base: list[dict[str, float]] = []
    crashes: list[tuple[str, str]] = []
    modes = tuple(stacks)
    image = images[modes[0]]  # the pread loop's
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        m: {c.key: [] for c in CASES} for m in modes
    }
    # an untimed warm-up in each stack: builds/loads the guest, first attach of the image
    warm = Case("warm", "warm-up", 4096, 32, 0, 16384, 500)
    for mode, (s, sub) in stacks.items():
        r = run_guest(s, sub, f"{mode[0]}-warm", images[mode], warm, warm.ops, 1)
        if "crashed" in r:
            crashes.append((mode, r["crashed"]))
    for rep in range(reps):
        GATE.wait()
        pids = GATE.extra_pids()
        load = OtherLoad(pids)
        b = baseline(image, quick, seed=rep + 1)
        b["other"] = round(load.percent())
        base.append(b)
        print(
            f"  rep {rep + 1} pread loop: 4K read {b['read_4k_iops']:.0f} IOPS, write "
            f"{b['write_4k_iops']:.0f} IOPS; 128K seq read {b['read_128k_mbs']:.0f} MB/s, "
            f"write {b['write_128k_mbs']:.0f} MB/s; other processes {b['other']}% CPU",
            file=sys.stderr,
        )
        order = modes[rep % len(modes) :] + modes[: rep % len(modes)]  # 2 modes: swapped
        for case in CASES:
            GATE.wait()
            ops = case.ops // 4 if quick else case.ops
            for mode in order:
                s, sub = stacks[mode]
                load = OtherLoad(pids)
                name = f"{mode[0]}-{case.key}-{rep + 1}"
                r = run_guest(s, sub, name, images[mode], case, ops, seed=rep + 1)
                other = round(load.percent())
                if "crashed" in r:
                    crashes.append((mode, r["crashed"]))
                    print(
                        f"  rep {rep + 1} {mode:7} {case.label:18}: CRASHED {r['crashed']}",
                        file=sys.stderr,
                    )
                    continue
                r["other"] = other
                runs[mode][case.key].append(r)
                print(
                    f"  rep {rep + 1} {mode:7} {case.label:18}: {r['iops']:8.0f} IOPS "
                    f"{r['mbs']:7.1f} MB/s, errors {r['errors']}, notif/req "
                    f"{r['kernel_per_req']:.3f}, other processes {r['other']}% CPU",
                    file=sys.stderr,
                )
    return base, runs, crashes


def _report(
    res: Result,
    reps: int,
    quick: bool,
    base: list[dict[str, float]],
    runs: dict[str, dict[str, list[dict[str, Any]]]],
    crashes: list[tuple[str, str]],
    custom: Custom | None = None,
) -> None:
    def med(mode: str, key: str, field: str) -> float:
        xs = [r[field] for r in runs[mode][key]]
        return median(xs) if xs else math.nan

    def bmed(field: str) -> float:
        return median([b[field] for b in base])

    for key, what in (("rr32", "read"), ("rw32", "write")):
        case = next(c for c in CASES if c.key == key)
        p, i = med("process", key, "iops"), med("inline", key, "iops")
        ceiling = bmed(f"{what}_4k_iops")
        res.rows.append(
            Row(
                f"{case.label} IOPS, process",
                f"{p:,.0f}",
                f"vs inline {i:,.0f} ({p / i:.2f}x), vs p{what} loop {ceiling:,.0f} "
                f"({p / ceiling:.3f}x)",
                f">= {MIN_IOPS:,} and >= {MIN_RATIO} x inline",
                p >= MIN_IOPS and p >= MIN_RATIO * i,
            )
        )
    for key in ("rr1", "rw1"):
        case = next(c for c in CASES if c.key == key)
        p, i = med("process", key, "iops"), med("inline", key, "iops")
        res.rows.append(
            Row(
                f"{case.label} IOPS, process",
                f"{p:,.0f} ({1e6 / p:.0f} µs/op)",
                f"inline {i:,.0f} ({1e6 / i:.0f} µs/op); process/inline {p / i:.2f}x",
            )
        )
    for key, what in (("sr", "read"), ("sw", "write")):
        case = next(c for c in CASES if c.key == key)
        p, i = med("process", key, "mbs"), med("inline", key, "mbs")
        ceiling = bmed(f"{what}_128k_mbs")
        res.rows.append(
            Row(
                f"{case.label} MB/s, process",
                f"{p:,.0f} MB/s",
                f"inline {i:,.0f} MB/s ({p / i:.2f}x); p{what} loop 128K sequential "
                f"{ceiling:,.0f} MB/s",
            )
        )
    for key in ("rr32", "rw32"):
        case = next(c for c in CASES if c.key == key)
        k = med("process", key, "kernel_per_req")
        g, ki = med("process", key, "guest_per_op"), med("inline", key, "kernel_per_req")
        res.rows.append(
            Row(
                f"notifications per request, {case.label}, process",
                f"{k:.3f}",
                f"(kicks+notifies)/requests from the kernel; guest (kicks+upcalls)/ops {g:.3f}; "
                f"inline {ki:.3f}",
                f"< {MAX_NOTIFY}",
                k < MAX_NOTIFY,
            )
        )
    if custom is not None:
        for case in CASES:
            field, unit = ("iops", "IOPS") if case.bs == 4096 else ("mbs", "MB/s")
            b, p = med(BACKEND, case.key, field), med("process", case.key, field)
            kb = med(BACKEND, case.key, "kernel_per_req")
            kp = med("process", case.key, "kernel_per_req")
            mb = " MB/s" if field == "mbs" else ""
            res.rows.append(
                Row(
                    f"{case.label} {unit}, backend",
                    f"{b:,.0f}{mb}",
                    f"drivers.blk process {p:,.0f}{mb}; backend/drivers.blk {b / p:.2f}x; "
                    f"notif/req {kb:.3f} vs {kp:.3f}",
                )
            )

    def tally(modes: list[str]) -> tuple[int, int, int]:
        rs = [r for m in modes for v in runs[m].values() for r in v]
        return len(rs), sum(r["errors"] for r in rs), sum(1 for r in rs if r["exit_code"])

    nruns, errors, bad_exit = tally(list(runs))
    detail = ""
    if custom is not None:
        n, e, x = tally([BACKEND])
        nc = sum(1 for m, _ in crashes if m == BACKEND)
        detail = (
            f"; backend alone: {e} errors in {n} runs, {x} non-zero exit codes, {nc} "
            "crashed domains"
        )
    res.rows.append(
        Row(
            "blkstress errors",
            f"{errors} in {nruns} runs",
            f"{bad_exit} runs with a non-zero exit code; {len(crashes)} crashed "
            f"domains (left out of the figures){detail}",
            "0 errors, 0 crashes",
            errors == 0 and bad_exit == 0 and not crashes,
        )
    )
    res.rows.append(
        Row(
            "pread/pwrite loop (the Python ceiling)",
            f"4K rand read {bmed('read_4k_iops'):,.0f} / write {bmed('write_4k_iops'):,.0f} IOPS",
            f"128K sequential read {bmed('read_128k_mbs'):,.0f} / write "
            f"{bmed('write_128k_mbs'):,.0f} MB/s",
        )
    )
    others = [b["other"] for b in base] + [
        r["other"] for m in runs.values() for v in m.values() for r in v
    ]
    res.rows.append(
        Row(
            "other processes' CPU during the measurements",
            f"{median(others):.0f} % (median)",
            f"max {max(others):.0f} % of one CPU, over {len(others)} timed runs",
        )
    )

    res.samples = {
        "baseline": base,
        "runs": {
            m: {
                k: [
                    {
                        "iops": r["iops"],
                        "mbs": r["mbs"],
                        "errors": r["errors"],
                        "kernel_per_req": r["kernel_per_req"],
                        "guest_per_op": r["guest_per_op"],
                        "dev": r["dev"],
                        "guest": r["guest"],
                        "other": r["other"],
                    }
                    for r in v
                ]
                for k, v in cases.items()
            }
            for m, cases in runs.items()
        },
        "crashes": [what for _, what in crashes],
        "destroy_retries": DESTROY_RETRIES,
        "cases": {
            c.key: {
                "label": c.label,
                "bs": c.bs,
                "qd": c.qd,
                "mix": c.mix,
                "blocks": c.blocks,
                "ops": c.ops // 4 if quick else c.ops,
            }
            for c in CASES
        },
    }
    if custom is not None:
        res.samples["backend"] = {"spec": custom.spec, "class": custom.name}
        setup = (
            "three private stacks (pcpus=2) up for the whole run, [driver.blk0] module = "
            "drivers.blk with isolation = process and = inline, and module = "
            f"{custom.spec} (--backend, isolation = process, on an image of its own made the "
            f"same way); {reps} repetition(s) of every case in all three stacks (stack order "
            "rotated each repetition)"
        )
    else:
        setup = (
            "two private stacks (pcpus=2) up for the whole run, [driver.blk0] module = "
            f"drivers.blk with isolation = process and = inline; {reps} repetition(s) of every "
            "case in both stacks (stack order swapped each repetition)"
        )
    res.notes += [
        f"one 64 MiB image in /tmp (random bytes, synced and read once, so the page cache is "
        f"warm); {setup}, medians; every run a new 16 MiB blkstress domain, verify_all=0, "
        "seed = repetition",
        "4K cases: blocks=16384 (the whole image); 128K cases: bs=131072 blocks=512 qd=8 -- "
        "blkstress has no sequential mode, so the 128K figures are 128 KiB *random* I/O over "
        "the whole image, compared with a sequential 128 KiB pread/pwrite loop",
        "IOPS and MB/s are blkstress's own figures (ops and bytes over the random phase, guest "
        "clock); blkstress writes fill each block with generated data and reads of blocks it "
        "wrote are verified, in guest code under unicorn, so writes (above all 128K) measure "
        "the guest's data generation as much as the driver",
        "pread/pwrite loop: a plain Python loop of os.pread/os.pwrite on the same file, in this "
        "process, 4K at random block offsets and 128K sequentially over the image; one round "
        "per repetition, before that repetition's guest runs",
        "notifications per request: (kicks + notifies) / requests of the domain's xvda, read "
        "from the kernel's devices command after the guest powered off (on_poweroff = "
        "preserve), before destroy",
    ]
    if custom is not None:
        res.notes.append(
            f"backend: --backend {custom.spec}, the class {custom.name}; the rows '..., "
            "backend' give its median per case and the ratio of its median to that of "
            "drivers.blk in its own process (the same guest, case and repetitions); notif/req "
            "is (kicks + notifies) / requests for both; its image is its own, so a backend that "
            "takes no flock or writes back when a device goes cannot overlap with drivers.blk's "
            "runs; its errors and crashes are in the blkstress errors row"
        )
    for _, c in crashes:
        res.notes.append(f"CRASHED: {c}")
    if DESTROY_RETRIES:
        res.notes.append(
            f"{len(DESTROY_RETRIES)} destroy(s) of a just-stopped domain had to be repeated "
            "(no destroyed event within 2 s): a destroy sent between the kernel's shutdown "
            "event and its marking the domain preserved returns without destroying it; "
            f"domains: {', '.join(dict.fromkeys(DESTROY_RETRIES))}"
        )


if __name__ == "__main__":
    sys.exit(bench_main(NAME, TITLE, measure, add_args))
