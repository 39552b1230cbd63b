"""The hierarchical config store, its watches and the device handshake states."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ipc.store import DevState, Store, StoreError, switch_state

BE = "/local/domain/0/backend/vbd/1/51712"


def test_write_read_ls_rm() -> None:
    s = Store()
    s.write(f"{BE}/sectors", "131072")
    s.write(f"{BE}/sector-size", "512")
    assert s.read(f"{BE}/sectors") == "131072"
    assert s.ls(BE) == ["sector-size", "sectors"]
    assert s.exists("/local/domain/0")  # parents are created
    s.rm("/local/domain/0/backend")
    assert not s.exists(BE)
    with pytest.raises(StoreError, match=f"no store node {BE}/sectors"):
        s.read(f"{BE}/sectors")


@pytest.mark.parametrize("path", ["relative", "/a//b", "/a/b c", "/" + "x" * 65, 7])
def test_bad_paths_are_named(path: object) -> None:
    with pytest.raises(StoreError, match="store path"):
        Store().write(path, "v")  # type: ignore[arg-type]


def test_watch_fires_initially_on_changes_below_and_on_removal_above() -> None:
    s, seen = Store(), []
    w = s.watch(f"{BE}/state", "be", lambda p, t: seen.append((p, t)))
    s.write(f"{BE}/state", "1")
    s.write(f"{BE}/other", "x")  # not below the watched node: no event
    s.rm("/local/domain/0/backend")  # removes the watched node from above
    assert seen == [(f"{BE}/state", "be"), (f"{BE}/state", "be"), ("/local/domain/0/backend", "be")]
    s.unwatch(w)
    s.write(f"{BE}/state", "2")
    assert len(seen) == 3
    with pytest.raises(StoreError, match="not registered"):
        s.unwatch(w)


def test_callback_may_write_the_store() -> None:
    s = Store()

    # A backend that answers the frontend's Initialised with Connected, from inside a watch.
    def backend(path: str, _t: str) -> None:
        if s.read("/fe/state", "0") == str(int(DevState.INITIALISED)):
            switch_state(s, "/be/state", DevState.CONNECTED)

    s.watch("/fe/state", "fe", backend)
    for st_ in (DevState.INITIALISING, DevState.INIT_WAIT):
        switch_state(s, "/be/state", st_)
    switch_state(s, "/fe/state", DevState.INITIALISING)
    switch_state(s, "/fe/state", DevState.INITIALISED)
    assert s.read("/be/state") == str(int(DevState.CONNECTED))


def test_illegal_state_change_is_refused() -> None:
    s = Store()
    switch_state(s, "/be/state", DevState.INITIALISING)
    with pytest.raises(
        StoreError,
        match="illegal state change INITIALISING -> CONNECTED; "
        "from INITIALISING a device may go to INIT_WAIT",
    ):
        switch_state(s, "/be/state", DevState.CONNECTED)
    assert s.read("/be/state") == "1"  # unchanged
    s.write("/be/state", "banana")
    with pytest.raises(StoreError, match="not a device state"):
        switch_state(s, "/be/state", DevState.CLOSED)


@given(
    st.dictionaries(
        st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=4).map(
            lambda p: "/" + "/".join(p)
        ),
        st.text(max_size=20),
        max_size=20,
    )
)
def test_snapshot_restore_round_trip(nodes: dict[str, str]) -> None:
    s = Store()
    for p, v in nodes.items():
        s.write(p, v)
    snap = s.snapshot()
    t = Store()
    t.restore(snap)
    assert t.snapshot() == snap
    for p, v in nodes.items():  # a parent created implicitly keeps the value written to it
        assert t.read(p) == v
