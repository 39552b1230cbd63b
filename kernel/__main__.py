"""Entry point of the kernel process: ``python -m kernel --control ... --events ...``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from ipc.lifetime import die_with_parent
from kernel.failover import NOTIFY_FLOOD_PER_S
from kernel.hypervisor import RESTORE_MODES
from kernel.server import KernelServer
from kernel.ucstop import UnsupportedUnicorn, check_engine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernel", description="isovisor kernel process")
    ap.add_argument("--control", required=True, help="ZeroMQ endpoint to bind for commands")
    ap.add_argument("--events", required=True, help="ZeroMQ endpoint to bind for events")
    ap.add_argument(
        "--drivers",
        default=None,
        help="ZeroMQ endpoint to bind for driver messages (docs/devices.md)",
    )
    ap.add_argument("--shm-prefix", required=True, help="name prefix of shared-memory segments")
    ap.add_argument("--pcpus", type=int, default=2)
    ap.add_argument("--timeslice-ms", type=int, default=10)
    ap.add_argument("--parent-pid", type=int, default=0)
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--keys", default=None, help="directory of the stack's key pair")
    ap.add_argument("--peers", default=None, help="the stack's peers file")
    ap.add_argument(
        "--migrate-listen", default=None, help="ZeroMQ TCP endpoint to accept migrations on"
    )
    ap.add_argument(
        "--migrate-disks",
        default=None,
        help="directory for the disk images of migrations --with-disks (none: refused)",
    )
    ap.add_argument(
        "--restore",
        choices=RESTORE_MODES,
        default="lazy",
        help="how a restore fills guest RAM: lazy (the pager, while the guest runs) or eager",
    )
    ap.add_argument(
        "--notify-flood",
        type=int,
        default=NOTIFY_FLOOD_PER_S,
        help="notifications per second above which a driver instance is reported for a flood",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format="%(asctime)s kernel[%(process)d] %(levelname)s %(message)s",
    )
    die_with_parent()
    if args.parent_pid and os.getppid() != args.parent_pid:
        return 1  # the parent died before we could ask to die with it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to handle
    try:
        check_engine()
    except UnsupportedUnicorn as e:
        logging.getLogger("isovisor.kernel").error("%s", e)
        return 2
    server = KernelServer(
        control=args.control,
        events=args.events,
        pcpus=args.pcpus,
        timeslice_ms=args.timeslice_ms,
        shm_prefix=args.shm_prefix,
        drivers=args.drivers,
        keys=args.keys,
        peers=args.peers,
        migrate_listen=args.migrate_listen,
        migrate_disks=args.migrate_disks,
        restore=args.restore,
        notify_flood=args.notify_flood,
    )
    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    logging.getLogger("isovisor.kernel").info(
        "kernel up: %d pCPUs, %d ms slices", args.pcpus, args.timeslice_ms
    )
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
