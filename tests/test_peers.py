"""The peers file and key pairs of live migration (ipc/peers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipc.peers import PeerError, create_keys, load_keys, peer_named, read_peers

KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]y#7"  # Z85, with a '#' inside


def test_a_peers_file_lists_names_keys_and_addresses(tmp_path: Path) -> None:
    p = tmp_path / "peers"
    p.write_text(f"# trusted stacks\n\nb {KEY} tcp://10.0.0.2:7100\n  c   {KEY}  \n")
    peers = read_peers(p)
    assert peers["b"].key == KEY.encode() and peers["b"].address == "tcp://10.0.0.2:7100"
    assert peers["c"].address == ""
    assert peer_named(p, "b").name == "b"
    with pytest.raises(PeerError, match=r"peer 'c' in .* has no address"):
        peer_named(p, "c")
    with pytest.raises(PeerError, match=r"no peer named 'x' in .* \(peers: b, c\)"):
        peer_named(p, "x")
    assert read_peers(tmp_path / "missing") == {}


@pytest.mark.parametrize(
    ("line", "expect"),
    [
        (f"b {KEY} tcp://h:1 extra", "got 4 words"),
        ("b short tcp://h:1", "'short' is not a public key"),
        (f"b {KEY} http://h:1", "must be tcp://HOST:PORT"),
        (f"b {KEY}\nb {KEY}", "peer 'b' is listed twice"),
    ],
)
def test_a_bad_line_is_named_with_its_file_and_line(tmp_path: Path, line: str, expect: str) -> None:
    p = tmp_path / "peers"
    p.write_text(f"# ok\n{line}\n")
    with pytest.raises(PeerError, match=expect) as e:
        read_peers(p)
    assert f"{p}:2" in str(e.value) or f"{p}:3" in str(e.value)


def test_keys_are_made_once_with_a_private_secret(tmp_path: Path) -> None:
    pair, made = create_keys(tmp_path / "keys")
    again, made_again = create_keys(tmp_path / "keys")
    assert made and not made_again and pair == again and len(pair.public) == 40
    assert (tmp_path / "keys" / "stack.key_secret").stat().st_mode & 0o077 == 0
    with pytest.raises(PeerError, match="create one with `isovisor keys`"):
        load_keys(tmp_path / "nokeys")
