"""The control protocol's decoder: every input gives a Request or a precise ControlError."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipc.control import ControlError, decode_request, pack


def test_valid_request() -> None:
    req = decode_request(pack({"command": "list", "properties": {"a": 1}, "id": "x"}))
    assert (req.command, req.properties, req.id) == ("list", {"a": 1}, "x")


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"\xc1garbage", "not valid msgpack"),
        (pack([1, 2]), "must be a msgpack map"),
        (pack({"properties": {}}), "no 'command' string"),
        (pack({"command": "x", "properties": 3}), "'properties' of command 'x' must be a map"),
        (pack({"command": "x", "extra": 1}), "unknown field(s) ['extra']"),
    ],
)
def test_malformed_requests(data: bytes, fragment: str) -> None:
    with pytest.raises(ControlError) as e:
        decode_request(data)
    assert fragment in e.value.reason


@given(st.binary(max_size=256))
def test_random_bytes_never_escape_as_other_errors(data: bytes) -> None:
    with contextlib.suppress(ControlError):
        decode_request(data)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
        max_leaves=10,
    )
)
def test_random_msgpack_values(value: object) -> None:
    try:
        req = decode_request(msgpack.packb(value))
    except ControlError:
        return
    assert isinstance(req.command, str) and isinstance(req.properties, dict)
