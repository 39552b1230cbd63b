"""A driver host played by the test: what ``drivers.host`` gives a backend
(``drivers.backendkit.Host``), recording every call, for backends driven in-process."""

from __future__ import annotations

import logging
from collections import Counter

from drivers.host import check_store_path


class RecordingHost:
    """Records what the backend says; an injected crash raises ``crash`` (the test then
    abandons the instance, as after SIGKILL), an injected leak only counts."""

    def __init__(self, name: str, crash: type[Exception]) -> None:
        self.name = name
        self.crash = crash
        self.log = logging.getLogger(f"isovisor.driver.{name}.test")
        self.store: dict[str, str] = {}
        self.notifies: Counter[int] = Counter()
        self.faults: list[tuple[int, str]] = []
        self.errors: list[tuple[int, str]] = []
        self.recoveries: list[tuple[int, int, int]] = []
        self.poisons: list[tuple[int, int, str]] = []
        self.again: set[int] = set()
        self.fired: list[tuple[int, str, str]] = []  # injected faults that fired
        self.injected: list[str] = []
        self.fds = 0

    def notify(self, key: int) -> None:
        self.notifies[key] += 1

    def store_write(self, path: str, value: str) -> None:
        check_store_path(self.name, path)
        assert isinstance(value, str)
        self.store[path] = value

    def fault(self, key: int, message: str) -> None:
        self.faults.append((key, message))

    def error(self, key: int, message: str) -> None:
        self.errors.append((key, message))

    def kick_again(self, key: int) -> None:
        self.again.add(key)

    def recovered(self, key: int, replayed: int, done_ns: int) -> None:
        self.recoveries.append((key, replayed, done_ns))

    def poison(self, key: int, index: int, description: str) -> None:
        self.poisons.append((key, index, description))

    def fault_fired(self, fault_id: int, kind: str, device: str) -> None:
        self.fired.append((fault_id, kind, device))

    def carry_out(self, kind: str, *, really: bool = False) -> None:
        self.injected.append(kind)
        if kind == "leak_fd":
            self.fds += 256
        elif kind != "leak_mem":
            raise self.crash(f"injected {kind}")
