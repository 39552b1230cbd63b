"""Event streams: ZeroMQ PUB/SUB with a subscription handshake.

A SUB socket receives nothing until its subscription has reached the publisher, and ZeroMQ
gives no signal for that (the "slow joiner").  :func:`subscribe` closes the gap without
sleeping: it asks the publisher, over the control socket, to publish a ``sync.<token>`` event
until that event arrives.  From then on no event on the subscribed topics can be missed.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from typing import Any

import zmq

from ipc.control import Client, ServerUnreachable, unpack

Event = tuple[str, dict[str, Any]]


class Subscriber:
    def __init__(self, sock: zmq.Socket, pending: deque[Event]) -> None:
        self._sock = sock
        self._pending = pending

    @property
    def socket(self) -> zmq.Socket:
        """The SUB socket, for a poller (check :attr:`pending` first)."""
        return self._sock

    @property
    def pending(self) -> bool:
        """Events received during the handshake and not yet returned by :meth:`recv`."""
        return bool(self._pending)

    def recv(self, timeout: float | None) -> Event | None:
        """Next event, or None after ``timeout`` seconds (None = wait forever)."""
        if self._pending:
            return self._pending.popleft()
        ms = None if timeout is None else max(0, int(timeout * 1000))
        if not self._sock.poll(ms, zmq.POLLIN):
            return None
        frames = self._sock.recv_multipart()
        return frames[0].decode(errors="replace"), unpack(frames[1])

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def subscribe(
    endpoint: str, topics: list[str], control: Client, *, timeout: float = 10.0
) -> Subscriber:
    """Subscribe to ``topics`` (prefixes; "" = all) on ``endpoint``, fully established."""
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    token = uuid.uuid4().hex
    sync_topic = f"sync.{token}"
    for t in topics:
        sock.setsockopt(zmq.SUBSCRIBE, t.encode())
    sock.setsockopt(zmq.SUBSCRIBE, sync_topic.encode())
    pending: deque[Event] = deque()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        control.call("sync", token=token)
        # Read for one round of 50 ms (by the clock: busy topics must not starve the re-sync).
        round_end = time.monotonic() + 0.05
        while (left := round_end - time.monotonic()) > 0 and sock.poll(
            int(left * 1000) + 1, zmq.POLLIN
        ):
            frames = sock.recv_multipart()
            topic = frames[0].decode(errors="replace")
            if topic == sync_topic:
                return Subscriber(sock, pending)
            if not topic.startswith("sync."):
                pending.append((topic, unpack(frames[1])))
    sock.close(0)
    raise ServerUnreachable(f"could not establish a subscription to {endpoint} within {timeout:g}s")
