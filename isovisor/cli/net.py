"""``isovisor net ping|udp``: reach a guest from the host through a net driver's TAP uplink, from
inside the stack's network namespace (docs/net.md), on machines without iputils or netcat."""

from __future__ import annotations

import statistics
from typing import Annotated

import typer

from isovisor import nettools
from isovisor.cli.common import err, fail, out

net_app = typer.Typer(
    help="Reach guests from the host through a net driver's TAP uplink.", no_args_is_help=True
)

NetnsOpt = Annotated[
    str,
    typer.Option(
        "--netns",
        "-n",
        help="The network namespace of the uplink ([driver.<name>.options] "
        "netns; default isovisor-<driver>).",
    ),
]


def _check(netns: str) -> None:
    problem = nettools.privilege_problem()
    if problem is not None:
        fail(f"cannot enter a network namespace: {problem}")
    if not (nettools.NETNS_DIR / netns).exists():
        fail(
            f"network namespace {netns!r} does not exist: is a stack running whose net "
            'driver has uplink = "tap" and at least one guest interface? (`ip netns list` '
            "shows the namespaces)"
        )


@net_app.command("ping")
def ping(
    addr: Annotated[str, typer.Argument(help="The guest's IPv4 address.")],
    netns: NetnsOpt = "isovisor-net0",
    count: Annotated[int, typer.Option("--count", "-c", min=1, max=1_000_000)] = 4,
    interval: Annotated[
        float, typer.Option("--interval", "-i", min=0.001, help="Seconds between requests.")
    ] = 1.0,
    timeout: Annotated[
        float, typer.Option("--timeout", "-W", min=0.001, help="Seconds to wait for a reply.")
    ] = 1.0,
) -> None:
    """ICMP echo, like ping(8); exits 1 if a reply is missing."""
    _check(netns)

    def show(seq: int, rtt: float) -> None:
        out.print(f"reply from {addr}: icmp_seq={seq} time={rtt:.3f} ms", highlight=False)

    try:
        got = nettools.ping(
            addr, netns=netns, count=count, interval=interval, timeout=timeout, on_reply=show
        )
    except OSError as e:
        fail(f"ping {addr} in namespace {netns}: {e}")
    rtts = [r.rtt_ms for r in got if r.rtt_ms is not None]
    lost = count - len(rtts)
    line = f"{count} sent, {len(rtts)} received, {100.0 * lost / count:.1f}% lost"
    if rtts:
        line += (
            f"; rtt min/median/max {min(rtts):.3f}/{statistics.median(rtts):.3f}/{max(rtts):.3f} ms"
        )
    out.print(line, highlight=False)
    if lost:
        seqs = ", ".join(str(r.seq) for r in got if r.rtt_ms is None)
        err.print(f"missing replies: icmp_seq {seqs}")
        raise typer.Exit(1)


@net_app.command("udp")
def udp(
    addr: Annotated[str, typer.Argument(help="The guest's IPv4 address.")],
    port: Annotated[int, typer.Argument(min=1, max=65535, help="UDP port (netecho: 7).")],
    text: Annotated[list[str], typer.Argument(help="Datagrams to send, one per word.")],
    netns: NetnsOpt = "isovisor-net0",
    timeout: Annotated[float, typer.Option("--timeout", "-W", min=0.001)] = 1.0,
) -> None:
    """Send each datagram and print its echo; exits 1 if one is not echoed."""
    _check(netns)
    try:
        got = nettools.udp_echo(
            addr, port, [t.encode() for t in text], netns=netns, timeout=timeout
        )
    except OSError as e:
        fail(f"udp {addr}:{port} in namespace {netns}: {e}")
    missing = 0
    for t, (reply, rtt) in zip(text, got, strict=True):
        if reply is None:
            missing += 1
            err.print(f"{t!r}: no echo within {timeout} s")
        else:
            out.print(f"{reply.decode(errors='replace')!r} in {rtt:.3f} ms", highlight=False)
    if missing:
        raise typer.Exit(1)
