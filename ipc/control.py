"""The control protocol: msgpack messages over ZeroMQ (circus-style).

Request:  ``{"command": str, "properties": dict, "id": str}``
Reply:    ``{"status": "ok", "id": ..., **result}`` or
          ``{"status": "error", "id": ..., "reason": str, "errno": int, "code": str}``

Servers use a ROUTER socket and answer every message, including garbage, with a reply; clients
use a DEALER socket with a receive timeout so that a dead server is an error, not a hang.
"""

from __future__ import annotations

import errno as _errno
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

MAX_MESSAGE_BYTES = 4 * 1024 * 1024


class ControlError(Exception):
    """A command failed; carries a stable code and an errno for the wire."""

    def __init__(self, reason: str, errno: int = _errno.EINVAL, code: str = "invalid") -> None:
        super().__init__(reason)
        self.reason = reason
        self.errno = errno
        self.code = code

    def to_reply(self, msg_id: Any = None) -> dict[str, Any]:
        return {
            "status": "error",
            "id": msg_id,
            "reason": self.reason,
            "errno": self.errno,
            "code": self.code,
        }


class NotFound(ControlError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason, _errno.ENOENT, "not_found")


class AlreadyExists(ControlError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason, _errno.EEXIST, "exists")


class ServerUnreachable(ControlError):
    """No reply in time: the peer is down or hung (as opposed to an error reply)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, _errno.ETIMEDOUT, "unreachable")


@dataclass(frozen=True)
class Request:
    command: str
    properties: dict[str, Any]
    id: Any


def pack(obj: Any) -> bytes:
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def decode_request(data: bytes) -> Request:
    """Parse one request; raise ControlError describing exactly what is wrong."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ControlError(f"control message of {len(data)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        msg = unpack(data)
    except Exception as e:  # msgpack raises several unrelated types
        raise ControlError(
            f"control message is not valid msgpack ({type(e).__name__}: {e}); "
            "send a msgpack map {command, properties, id}"
        ) from None
    if not isinstance(msg, dict):
        raise ControlError(f"control message must be a msgpack map, got {type(msg).__name__}")
    unknown = set(msg) - {"command", "properties", "id"}
    if unknown:
        raise ControlError(
            f"unknown field(s) {sorted(map(str, unknown))} in control message; "
            "allowed: command, properties, id"
        )
    cmd = msg.get("command")
    if not isinstance(cmd, str) or not cmd:
        raise ControlError("control message has no 'command' string")
    props = msg.get("properties", {})
    if props is None:
        props = {}
    if not isinstance(props, dict):
        raise ControlError(
            f"'properties' of command {cmd!r} must be a map, got {type(props).__name__}"
        )
    return Request(cmd, props, msg.get("id"))


def prop(req: Request, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """Fetch a typed property, raising a precise ControlError if missing or mistyped."""
    if key not in req.properties:
        if default is ...:
            raise ControlError(f"command {req.command!r} needs property {key!r}")
        return default
    val = req.properties[key]
    if not isinstance(val, kind) or (isinstance(val, bool) and bool not in _as_tuple(kind)):
        want = " or ".join(t.__name__ for t in _as_tuple(kind))
        raise ControlError(
            f"property {key!r} of command {req.command!r} must be {want}, got {type(val).__name__}"
        )
    return val


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


class Client:
    """A synchronous control client (DEALER) with a per-call timeout."""

    def __init__(
        self, endpoint: str, *, timeout: float = 10.0, context: zmq.Context | None = None
    ) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)

    def call(self, command: str, timeout: float | None = None, **properties: Any) -> dict[str, Any]:
        """Send a command; return the ok reply or raise ControlError with the server's reason."""
        return self.request(command, properties, timeout)

    def request(
        self, command: str, properties: dict[str, Any], timeout: float | None = None
    ) -> dict[str, Any]:
        """Like :meth:`call`, with the properties as a dict (any names, e.g. "timeout")."""
        msg_id = uuid.uuid4().hex
        self._sock.send_multipart(
            [b"", pack({"command": command, "properties": properties, "id": msg_id})]
        )
        deadline_ms = int((self.timeout if timeout is None else timeout) * 1000)
        while True:
            if not self._sock.poll(deadline_ms, zmq.POLLIN):
                # The socket may now hold a late reply; replace it so the next call is clean.
                self._reset()
                raise ServerUnreachable(
                    f"no reply to {command!r} from {self.endpoint} within "
                    f"{deadline_ms / 1000:g}s: is the stack running?"
                )
            frames = self._sock.recv_multipart()
            reply = unpack(frames[-1])
            if isinstance(reply, dict) and reply.get("id") not in (msg_id, None):
                continue  # a late reply to an earlier, timed-out call
            break
        if not isinstance(reply, dict) or reply.get("status") not in ("ok", "error"):
            raise ControlError(f"malformed reply from {self.endpoint}: {reply!r}")
        if reply["status"] == "error":
            raise ControlError(
                str(reply.get("reason")),
                int(reply.get("errno", _errno.EIO)),
                str(reply.get("code", "error")),
            )
        return reply

    def _reset(self) -> None:
        self._sock.close(0)
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(self.endpoint)

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Handler = Callable[[Request], dict[str, Any]]


def serve_one(
    sock: zmq.Socket,
    frames: list[bytes],
    commands: dict[str, Handler],
    server: str,
    log: logging.Logger,
) -> None:
    """Answer one ROUTER message: dispatch it to ``commands`` and always send a reply.

    Garbage gets a precise error; an exception inside a handler becomes an ``internal`` error
    reply (and a logged traceback) instead of taking the server down.
    """
    envelope, body = frames[:-1], frames[-1]  # routing ids + empty delimiter, then the body
    msg_id = None
    try:
        req = decode_request(body)
        msg_id = req.id
        fn = commands.get(req.command)
        if fn is None:
            raise ControlError(
                f"unknown {server} command {req.command!r}; known: {', '.join(sorted(commands))}"
            )
        reply = {"status": "ok", "id": msg_id, **fn(req)}
    except ControlError as e:
        reply = e.to_reply(msg_id)
    except Exception as e:
        log.exception("%s command failed", server)
        reply = ControlError(
            f"internal {server} error: {type(e).__name__}: {e}", code="internal"
        ).to_reply(msg_id)
    sock.send_multipart([*envelope, pack(reply)])
