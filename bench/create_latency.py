"""Domain creation latency: ``create`` to the hello guest's first console byte.

A private detached stack (pcpus=2) runs with no domains.  An event subscription (``console.``
and ``domain.``) is fully established first with ipc.events.subscribe's sync handshake; then
for each repetition a hello domain with a unique name is created through the supervisor's
``create`` command (a control client, as ``isovisor create`` does), and we time

* the ``create`` reply (config load + kernel domain set-up, as the caller sees it), and
* ``create`` sent -> first ``console.<name>`` event received (what a user waits for).

hello powers off and, with the default on_poweroff = destroy, disappears; each repetition
waits for its ``domain.<name>.destroyed`` event before the next one starts.

    python3 bench/create_latency.py [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import sys
import time

from _common import GATE, Result, Row, bench_main, median, pctl, private_stack, wait_topic

from ipc.control import Client
from isovisor.config import load_domain_config

NAME = "create_latency"
TITLE = "Domain creation: create -> first console byte of the hello guest"


def add_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--reps", type=int, default=None, help="creates (default 20, quick 5)")


def measure(args: argparse.Namespace, res: Result) -> None:
    reps = args.reps or (5 if args.quick else 20)
    first_ms: list[float] = []
    reply_ms: list[float] = []
    gone_ms: list[float] = []
    with private_stack(2) as s, s.subscribe(["console.", "domain."]) as sub:
        GATE.extra_pids = lambda: s.pids
        for i in range(-1, reps):  # -1: an untimed warm-up create
            if i % 5 == 0:
                GATE.wait()
            name = f"hello-{i + 1:03d}" if i >= 0 else "hello-warm"
            cfg = s.domain_config(name, "hello", memory=4)
            t0 = time.perf_counter()
            reply = s.call("create", path=str(cfg))
            t_reply = time.perf_counter()
            if reply.get("name") != name:
                raise RuntimeError(f"unexpected create reply {reply}")
            topic, p = wait_topic(
                sub, {f"console.{name}", f"domain.{name}.crashed", f"domain.{name}.destroyed"}, 30
            )
            t_first = time.perf_counter()
            if not topic.startswith("console."):
                raise RuntimeError(f"{name}: {topic} before any console output: {p}")
            wait_topic(sub, {f"domain.{name}.destroyed"}, 30)
            t_gone = time.perf_counter()
            if s.domains().get(name) is not None:
                raise RuntimeError(f"{name} still listed after its destroyed event")
            if i >= 0:
                reply_ms.append((t_reply - t0) * 1e3)
                first_ms.append((t_first - t0) * 1e3)
                gone_ms.append((t_gone - t0) * 1e3)
                print(
                    f"  {name}: reply {reply_ms[-1]:6.2f} ms, first byte "
                    f"{first_ms[-1]:6.2f} ms, destroyed {gone_ms[-1]:6.2f} ms",
                    file=sys.stderr,
                )

        # Same run, one hop less: create straight on the kernel's control socket (config
        # loaded here), to split the reply time into supervisor and kernel parts.
        kdirect: list[float] = []
        kfirst: list[float] = []
        with Client(s.rd.kernel_control, timeout=15) as kc:
            for i in range(reps):
                if i % 5 == 0:
                    GATE.wait()
                name = f"khello-{i + 1:03d}"
                cfg = load_domain_config(s.domain_config(name, "hello", memory=4))
                t0 = time.perf_counter()
                kc.call("create", config=cfg.to_wire())
                kdirect.append((time.perf_counter() - t0) * 1e3)
                wait_topic(sub, {f"console.{name}"}, 30)
                kfirst.append((time.perf_counter() - t0) * 1e3)
                wait_topic(sub, {f"domain.{name}.destroyed"}, 30)

    res.rows += [
        Row(
            "create -> first console byte (median)",
            f"{median(first_ms):.2f} ms",
            f"p90 {pctl(first_ms, 90):.2f} ms, min {min(first_ms):.2f}, max {max(first_ms):.2f}",
        ),
        Row(
            "create reply alone (median)",
            f"{median(reply_ms):.2f} ms",
            f"p90 {pctl(reply_ms, 90):.2f} ms; first byte - reply "
            f"{median(first_ms) - median(reply_ms):.2f} ms",
        ),
        Row(
            "  kernel-direct create reply (median)",
            f"{median(kdirect):.2f} ms",
            f"p90 {pctl(kdirect, 90):.2f} ms; supervisor hop + config load "
            f"{median(reply_ms) - median(kdirect):.2f} ms",
        ),
        Row(
            "  kernel-direct create -> first byte (median)",
            f"{median(kfirst):.2f} ms",
            f"p90 {pctl(kfirst, 90):.2f} ms",
        ),
        Row(
            "create -> destroyed event (median)",
            f"{median(gone_ms):.2f} ms",
            f"p90 {pctl(gone_ms, 90):.2f} ms",
        ),
    ]
    res.samples = {
        "first_byte_ms": first_ms,
        "reply_ms": reply_ms,
        "destroyed_ms": gone_ms,
        "kernel_direct_reply_ms": kdirect,
        "kernel_direct_first_byte_ms": kfirst,
    }
    res.notes.append(
        f"{reps} creates of the hello guest (4 MiB) with unique names after one "
        "untimed warm-up; supervisor control client; events from the "
        "supervisor's PUB socket; private stack pcpus=2"
    )


if __name__ == "__main__":
    sys.exit(bench_main(NAME, TITLE, measure, add_args))
