"""A stack's CurveZMQ key pair and its peers file (who may migrate guests in, and where to).

A stack's keys live in a directory (``[migration] keys``): ``stack.key`` (the public key,
shareable) and ``stack.key_secret``, in pyzmq's certificate format (``zmq.auth``), created by
``isovisor keys``.  The peers file (``[migration] peers``) lists the stacks this one trusts,
one per line, as ``ssh``'s ``authorized_keys`` and ``known_hosts`` in one::

    # name   public key (Z85, 40 characters)          address   (a comment is a whole line)
    hostb    rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7  tcp://10.0.0.2:7100

A stack accepts a migration only from a key listed there, and migrates to a peer by its name,
checking the destination's key before it sends anything.  The file is read again at each use,
so peers can be added while the stack runs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import zmq.auth

KEY_NAME: Final = "stack"
_Z85_KEY: Final = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


class PeerError(Exception):
    """Keys or the peers file cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class Peer:
    name: str
    key: bytes  # Z85 public key
    address: str  # tcp://host:port ("" if the peer only migrates to us)


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    secret: bytes


def create_keys(directory: Path) -> tuple[KeyPair, bool]:
    """The key pair in ``directory``, made first if there is none; (keys, made now)."""
    public = directory / f"{KEY_NAME}.key"
    made = False
    if not public.exists():
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        _, secret = zmq.auth.create_certificates(str(directory), KEY_NAME)
        os.chmod(secret, 0o600)  # (pyzmq leaves it as the umask has it)
        made = True
    return load_keys(directory), made


def load_keys(directory: Path) -> KeyPair:
    secret_file = directory / f"{KEY_NAME}.key_secret"
    if not secret_file.is_file():
        raise PeerError(
            f"no key pair in {directory} (expected {secret_file.name}): create one with "
            "`isovisor keys`"
        )
    try:
        public, secret = zmq.auth.load_certificate(str(secret_file))
    except (OSError, ValueError) as e:
        raise PeerError(f"cannot read the key pair {secret_file}: {e}") from None
    if not secret:
        raise PeerError(f"{secret_file} holds no secret key")
    return KeyPair(public, secret)


def read_peers(path: Path) -> dict[str, Peer]:
    """Peers by name; a missing file is no peers.  Bad lines are errors naming the line."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise PeerError(f"cannot read peers file {path}: {e.strerror}") from None
    peers: dict[str, Peer] = {}
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):  # (not mid-line: '#' is a Z85 character)
            continue
        where = f"{path}:{n}"
        if len(words) not in (2, 3):
            raise PeerError(
                f"{where}: expected `NAME PUBLIC-KEY [tcp://HOST:PORT]`, got {len(words)} words"
            )
        name, key = words[0], words[1]
        address = words[2] if len(words) == 3 else ""
        if not _Z85_KEY.match(key):
            raise PeerError(
                f"{where}: {key!r} is not a public key (40 Z85 characters, as "
                "`isovisor keys` prints)"
            )
        if address and not address.startswith("tcp://"):
            raise PeerError(f"{where}: address {address!r} must be tcp://HOST:PORT")
        if name in peers:
            raise PeerError(f"{where}: peer {name!r} is listed twice")
        peers[name] = Peer(name, key.encode(), address)
    return peers


def peer_named(path: Path, name: str) -> Peer:
    peers = read_peers(path)
    peer = peers.get(name)
    if peer is None:
        known = ", ".join(sorted(peers)) or "none"
        raise PeerError(
            f"no peer named {name!r} in {path} (peers: {known}); add a line "
            "`NAME PUBLIC-KEY tcp://HOST:PORT` with the key `isovisor keys` prints there"
        )
    if not peer.address:
        raise PeerError(f"peer {name!r} in {path} has no address to migrate to")
    return peer
