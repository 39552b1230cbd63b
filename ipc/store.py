"""A small hierarchical configuration store with watches (XenStore's idea).

Paths look like ``/local/domain/3/device/vbd/51712/state``.  Values are strings.  Writing a
node creates its parents; removing a node removes its subtree.  A *watch* on a path fires for
changes to that node or anything below it, with the path that changed and the watch's token,
and once immediately when it is registered (as XenStore does, so a watcher never misses the
state it started from).

The device handshake runs through a ``state`` node per end (:class:`DevState`, numbered as
``XenbusState``): Initialising -> InitWait -> (Initialised) -> Connected -> Closing -> Closed.
:func:`switch_state` refuses any other move, naming the device path and what is allowed.

The store is thread-safe.  Watch callbacks run with no lock held, in the order the changes
happened, so a callback may read or write the store (its own writes' events come after it
returns).  :meth:`Store.snapshot`
and :meth:`Store.restore` let the supervisor keep the store as part of a driver's shadow.
"""

from __future__ import annotations

import enum
import itertools
import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

_SEGMENT = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
MAX_VALUE_BYTES: Final = 4096


class StoreError(Exception):
    """A bad path, a missing node, or an illegal state change."""


class DevState(enum.IntEnum):
    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6


_ALLOWED: Final = {
    DevState.UNKNOWN: {DevState.INITIALISING},
    DevState.INITIALISING: {
        DevState.INIT_WAIT,
        DevState.INITIALISED,
        DevState.CLOSING,
        DevState.CLOSED,
    },
    DevState.INIT_WAIT: {
        DevState.INITIALISED,
        DevState.CONNECTED,
        DevState.CLOSING,
        DevState.CLOSED,
    },
    DevState.INITIALISED: {DevState.CONNECTED, DevState.CLOSING, DevState.CLOSED},
    DevState.CONNECTED: {DevState.CLOSING, DevState.CLOSED},
    DevState.CLOSING: {DevState.CLOSED},
    DevState.CLOSED: {DevState.INITIALISING},  # a reconnect (e.g. a restarted backend)
}

WatchCallback = Callable[[str, str], None]  # (changed path, token)


@dataclass(frozen=True)
class Watch:
    """Handle of a registered watch (pass it to :meth:`Store.unwatch`)."""

    id: int
    path: str
    token: str


@dataclass
class _Node:
    value: str = ""
    children: dict[str, _Node] = field(default_factory=dict)


def split(path: str) -> list[str]:
    """Validate an absolute path and return its segments."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise StoreError(f"store path {path!r} must be a string starting with '/'")
    if path == "/":
        return []
    parts = path[1:].split("/")
    for p in parts:
        if not _SEGMENT.match(p):
            raise StoreError(
                f"store path {path!r} has an invalid segment {p!r}: use 1-64 "
                "letters, digits, '_', '.', '-'"
            )
    return parts


class Store:
    def __init__(self) -> None:
        self._root = _Node()
        self._lock = threading.RLock()
        self._watches: dict[int, tuple[Watch, WatchCallback]] = {}
        self._ids = itertools.count(1)
        self._pending: deque[tuple[Watch, WatchCallback, str]] = deque()
        self._firing = False

    # -- reading -----------------------------------------------------------------------------
    def _find(self, parts: list[str]) -> _Node | None:
        node = self._root
        for p in parts:
            nxt = node.children.get(p)
            if nxt is None:
                return None
            node = nxt
        return node

    def read(self, path: str, default: str | None = None) -> str:
        with self._lock:
            node = self._find(split(path))
        if node is None:
            if default is not None:
                return default
            raise StoreError(f"no store node {path}")
        return node.value

    def exists(self, path: str) -> bool:
        with self._lock:
            return self._find(split(path)) is not None

    def ls(self, path: str) -> list[str]:
        with self._lock:
            node = self._find(split(path))
            if node is None:
                raise StoreError(f"no store node {path}")
            return sorted(node.children)

    # -- writing -----------------------------------------------------------------------------
    def write(self, path: str, value: str) -> None:
        if not isinstance(value, str):
            raise StoreError(f"store value for {path} must be a string, got {type(value).__name__}")
        if len(value.encode()) > MAX_VALUE_BYTES:
            raise StoreError(f"store value for {path} exceeds {MAX_VALUE_BYTES} bytes")
        parts = split(path)
        if not parts:
            raise StoreError("cannot write the root node")
        with self._lock:
            node = self._root
            for p in parts:
                node = node.children.setdefault(p, _Node())
            node.value = value
            fire = self._matching(path)
        self._fire(fire, path)

    def rm(self, path: str) -> None:
        parts = split(path)
        if not parts:
            raise StoreError("cannot remove the root node")
        with self._lock:
            parent = self._find(parts[:-1])
            if parent is None or parts[-1] not in parent.children:
                raise StoreError(f"no store node {path}")
            del parent.children[parts[-1]]
            fire = self._matching(path, removed=True)
        self._fire(fire, path)

    # -- watches -----------------------------------------------------------------------------
    def watch(self, path: str, token: str, callback: WatchCallback) -> Watch:
        split(path)
        with self._lock:
            w = Watch(next(self._ids), path, token)
            self._watches[w.id] = (w, callback)
        self._fire([(w, callback)], path)  # the initial event
        return w

    def unwatch(self, w: Watch) -> None:
        with self._lock:
            if self._watches.pop(w.id, None) is None:
                raise StoreError(f"watch {w.id} on {w.path} is not registered")

    def _matching(self, changed: str, removed: bool = False) -> list[tuple[Watch, WatchCallback]]:
        out = []
        for w, cb in self._watches.values():
            below = changed == w.path or changed.startswith(w.path.rstrip("/") + "/")
            above = removed and w.path.startswith(changed.rstrip("/") + "/")
            if below or above or w.path == "/":
                out.append((w, cb))
        return out

    def _fire(self, fire: list[tuple[Watch, WatchCallback]], path: str) -> None:
        """Deliver watch events in the order the changes happened.

        Events are queued; whichever thread finds no delivery under way drains the queue, so a
        callback that writes the store just queues more events (delivered after its own
        returns) instead of re-entering, and no lock is held while a callback runs.
        """
        with self._lock:
            self._pending.extend((w, cb, path) for w, cb in fire)
            if self._firing:
                return
            self._firing = True
        try:
            while True:
                with self._lock:
                    if not self._pending:
                        self._firing = False
                        return
                    w, cb, changed = self._pending.popleft()
                cb(changed, w.token)
        except BaseException:
            with self._lock:
                self._firing = False
            raise

    # -- shadow --------------------------------------------------------------------------------
    def snapshot(self, path: str = "/") -> dict[str, str]:
        """Every node under ``path`` as {path: value} (for a driver's shadow)."""
        out: dict[str, str] = {}
        with self._lock:
            node = self._find(split(path))
            if node is None:
                raise StoreError(f"no store node {path}")
            stack = [(path.rstrip("/"), node)]
            while stack:
                p, n = stack.pop()
                if p:
                    out[p] = n.value
                stack.extend((f"{p}/{k}", c) for k, c in n.children.items())
        return out

    def restore(self, nodes: dict[str, str]) -> None:
        for p in sorted(nodes):
            self.write(p, nodes[p])


def switch_state(store: Store, path: str, new: DevState) -> None:
    """Move the handshake state node at ``path`` to ``new``, if the protocol allows it."""
    raw = store.read(path, default=str(int(DevState.UNKNOWN)))
    try:
        old = DevState(int(raw))
    except ValueError:
        raise StoreError(f"{path} holds {raw!r}, not a device state (0-6)") from None
    if new != old and new not in _ALLOWED[old]:
        allowed = ", ".join(s.name for s in sorted(_ALLOWED[old]))
        raise StoreError(
            f"{path}: illegal state change {old.name} -> {new.name}; from "
            f"{old.name} a device may go to {allowed}"
        )
    store.write(path, str(int(new)))
