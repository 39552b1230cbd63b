"""The supervisor's side of console drivers (docs/console.md): a domain whose console a driver
serves has its output in ``<log_dir>/<domain>.log``, written by that driver process.  The relay
follows each such driver's live PUB socket and republishes the bytes as ``console.<name>`` events
(the same events the kernel publishes for its own console, so ``isovisor console -f`` and every
other watcher work unchanged), answers the ``console`` command from the log file, and passes
console input to the driver.

The log file is the truth: each live message carries the file offset of its bytes, so the relay
drops bytes it has already relayed (a replacement driver may publish again what its
predecessor had) and reads from the file whatever it missed (a driver that died between its
write and its publish).  What such a domain writes to the kernel's console instead (the
runtime's own messages, output taken by the kernel while the driver is failed) is merged into
the same stream: the relay republishes the kernel's ``console.<name>`` events for it.  Offsets
in events and replies count the merged stream from the start of the domain's current life, as
the kernel's count its own; the newest HISTORY_BYTES are kept for the ``console`` command.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import zmq

from ipc import consif
from ipc.control import ControlError, NotFound
from isovisor.config import StackConfig

log = logging.getLogger("isovisor.supervisor")

#: Bytes of a console the ``console`` command returns (the newest ones), as the kernel's.
HISTORY_BYTES: Final = 64 * 1024
#: Largest input one ``console_input`` command may carry.
MAX_INPUT_BYTES: Final = 64 * 1024


@dataclass
class Life:
    """One life of a domain whose console a driver serves."""

    name: str
    driver: str
    domid: int
    log_path: Path
    #: File offset where this life's output starts.
    start: int
    #: File offset up to which bytes have been relayed.
    relayed: int
    #: Bytes relayed in this life (log file and kernel console merged): the next offset.
    emitted: int = 0
    #: The newest HISTORY_BYTES of them.
    history: bytearray = field(default_factory=bytearray)


class ConsoleRelay:
    def __init__(
        self,
        stack: StackConfig,
        run_dir: Path,
        ctx: zmq.Context[Any],
        poller: zmq.Poller,
        publish: Callable[[str, dict[str, Any]], None],
    ) -> None:
        self.stack = stack
        self.run_dir = run_dir
        self.ctx = ctx
        self.poller = poller
        self.publish = publish
        self.lives: dict[str, Life] = {}
        self._subs: dict[str, zmq.Socket[Any]] = {}
        self._inputs: dict[str, zmq.Socket[Any]] = {}
        #: Domains migrating in: (console driver, where their life will start in its log).
        self._incoming: dict[str, tuple[str, int]] = {}

    # -- where a console driver keeps things -----------------------------------------------------
    def _dir(self, driver: str, key: str) -> Path:
        for d in self.stack.drivers:
            if d.name == driver and isinstance(d.options.get(key), str):
                return Path(d.options[key]).expanduser().resolve()
        base = next(
            (
                d.options.get("run_dir")
                for d in self.stack.drivers
                if d.name == driver and isinstance(d.options.get("run_dir"), str)
            ),
            None,
        )
        return (Path(base).expanduser().resolve() if base else self.run_dir) / "consoles"

    def log_path(self, driver: str, name: str) -> Path:
        return self._dir(driver, "log_dir") / f"{name}.log"

    def _endpoint(self, driver: str, name: str) -> str:
        return f"ipc://{self._dir(driver, 'socket_dir') / name}"

    # -- domains ---------------------------------------------------------------------------------
    def before_create(self, driver: str, name: str) -> int:
        """Where the next life of ``name`` will start in its log file (call before the kernel
        creates it: the guest may print at once).  Also subscribes to ``driver``'s output."""
        if driver not in self._subs:
            sub = self.ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            sub.connect(self._endpoint(driver, consif.PUB_NAME))
            self._subs[driver] = sub
            self.poller.register(sub, zmq.POLLIN)
        return _size(self.log_path(driver, name))

    def forget_incoming(self, name: str) -> None:
        """A restore from a file: no migration of ``name`` that came in and failed counts."""
        self._incoming.pop(name, None)

    def created(self, driver: str, name: str, domid: int, start: int) -> None:
        path = self.log_path(driver, name)
        self.lives[name] = Life(name, driver, domid, path, start, start)
        self._catch_up(self.lives[name])

    def on_kernel_event(self, topic: str, payload: dict[str, Any]) -> None:
        """A restarted domain's new life starts at the file's end; a destroyed one is gone; a
        domain migrating in starts one where the file ended when its migration began (the
        ``incoming`` event comes before the guest can print here)."""
        parts = topic.split(".")
        if len(parts) == 3 and parts[0] == "domain":
            name, what, driver = parts[1], parts[2], payload.get("console")
            if what == "incoming" and isinstance(driver, str) and driver:
                self._incoming[name] = (driver, self.before_create(driver, name))
                return
            if what == "restored" and name in self._incoming:
                driver, start = self._incoming.pop(name)
                if isinstance(payload.get("domid"), int):
                    self.created(driver, name, payload["domid"], start)
                return
        if len(parts) != 3 or parts[0] != "domain" or parts[1] not in self.lives:
            return
        life = self.lives[parts[1]]
        if parts[2] == "restarted" and isinstance(payload.get("domid"), int):
            self._catch_up(life)
            life.domid = payload["domid"]
            life.start = life.relayed = _size(life.log_path)
            life.emitted = 0
            life.history.clear()
        elif parts[2] == "destroyed" and payload.get("domid") == life.domid:
            self._catch_up(life)
            del self.lives[life.name]

    def tick(self) -> None:
        """Relay from the files what the live sockets did not bring (a subscription that was
        not through yet when the driver published, a driver that died before publishing)."""
        for life in list(self.lives.values()):
            if _size(life.log_path) > life.relayed:
                self._catch_up(life)

    def sockets(self) -> list[zmq.Socket[Any]]:
        return list(self._subs.values())

    def on_ready(self, sock: zmq.Socket[Any]) -> None:
        """Relay every message waiting on ``sock``."""
        while True:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3:
                continue
            life = self.lives.get(frames[0].decode(errors="replace"))
            if life is None:
                continue
            try:
                offset = consif.decode_offset(frames[1])
            except ValueError:
                continue
            data = frames[2]
            if offset > life.relayed:
                self._catch_up(life, upto=offset)  # missed messages: from the file
            skip = life.relayed - offset
            if 0 <= skip < len(data):
                self._emit(life, data[skip:])

    def _catch_up(self, life: Life, upto: int | None = None) -> None:
        try:
            with open(life.log_path, "rb") as f:
                f.seek(life.relayed)
                data = f.read() if upto is None else f.read(max(0, upto - life.relayed))
        except FileNotFoundError:
            return
        if data:
            self._emit(life, data)

    def _emit(self, life: Life, data: bytes, *, from_file: bool = True) -> None:
        self.publish(
            f"console.{life.name}", {"domid": life.domid, "offset": life.emitted, "data": data}
        )
        life.emitted += len(data)
        life.history += data
        if len(life.history) > HISTORY_BYTES:
            del life.history[: len(life.history) - HISTORY_BYTES]
        if from_file:
            life.relayed += len(data)

    def kernel_console(self, name: str, payload: dict[str, Any]) -> bool:
        """A kernel ``console.<name>`` event: for a domain whose console a driver serves,
        merge its bytes into the relayed stream (True: the caller must not republish it)."""
        life = self.lives.get(name)
        if life is None or payload.get("domid") != life.domid:
            return False
        data = payload.get("data")
        if isinstance(data, bytes) and data:
            self._catch_up(life)  # the driver's bytes so far come first
            self._emit(life, data, from_file=False)
        return True

    # -- commands --------------------------------------------------------------------------------
    def find(self, ref: str) -> Life | None:
        if ref in self.lives:
            return self.lives[ref]
        return next((lf for lf in self.lives.values() if str(lf.domid) == ref), None)

    def history(self, life: Life) -> dict[str, Any]:
        """The ``console`` reply for a driver's console: the newest HISTORY_BYTES of this
        life (the same offsets as the ``console.<name>`` events)."""
        self._catch_up(life)
        data = bytes(life.history)
        return {
            "domid": life.domid,
            "name": life.name,
            "start": life.emitted - len(data),
            "end": life.emitted,
            "data": data,
            "driver": life.driver,
            "log": str(life.log_path),
        }

    def send_input(self, ref: str, data: bytes) -> dict[str, Any]:
        life = self.find(ref)
        if life is None:
            raise NotFound(
                f"domain {ref!r} has no console driver (its console is the kernel's, "
                'which takes no input); give it console = "<driver>" or set '
                "[domains] console in supervisor.toml"
            )
        if len(data) > MAX_INPUT_BYTES:
            raise ControlError(
                f"console input of {len(data)} bytes: at most {MAX_INPUT_BYTES} per command"
            )
        sock = self._inputs.get(life.driver)
        if sock is None:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 1000)
            sock.connect(self._endpoint(life.driver, consif.INPUT_NAME))
            self._inputs[life.driver] = sock
        try:
            sock.send_multipart([life.name.encode(), data], zmq.NOBLOCK)
        except zmq.Again:
            raise ControlError(
                f"console driver {life.driver} is not taking input (it is not "
                "running, or its queue is full); try again"
            ) from None
        return {"name": life.name, "domid": life.domid, "bytes": len(data)}

    def close(self) -> None:
        for life in list(self.lives.values()):
            self._catch_up(life)
        for s in [*self._subs.values(), *self._inputs.values()]:
            s.close(0)
        self._subs.clear()
        self._inputs.clear()


def _size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0
