"""supervisor.launch._msgpack (both sides of the fork server protocol) against the msgpack package.

(That ``start`` loads no msgpack package is checked in ``test_layering.py``.)
"""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.launch import _msgpack
from supervisor.launch.forkclient import Request

ints = st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
scalars = st.none() | st.booleans() | ints | st.text() | st.binary()
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=20) | st.dictionaries(st.text(), inner, max_size=20),
    max_leaves=60,
)


@settings(deadline=None)  # no timing in tests: a cold first example may be slow
@given(values)
def test_packb_writes_what_msgpack_writes(value: object) -> None:
    assert _msgpack.packb(value) == msgpack.packb(value)


@settings(deadline=None)
@given(values)
def test_unpackb_reads_what_msgpack_writes(value: object) -> None:
    assert _msgpack.unpackb(msgpack.packb(value)) == value


@pytest.mark.parametrize("n", [31, 32, 255, 256, 65535, 65536])
def test_long_strings_and_containers(n: int) -> None:
    for value in ("x" * n, b"x" * n, list(range(n % 300)), {str(i): i for i in range(n % 70)}):
        assert _msgpack.packb(value) == msgpack.packb(value)
        assert _msgpack.unpackb(msgpack.packb(value)) == value


@pytest.mark.parametrize("data", [b"", b"\x92\x01", b"\xc4\x02x", b"\xc5\x00", b"\x01\x02",
                                  b"\xa3ab",
                                  b"\xa2\xff\xfe", b"\x91" * 40 + b"\x90"])
def test_unpackb_refuses_what_it_cannot_read(data: bytes) -> None:
    with pytest.raises(ValueError):
        _msgpack.unpackb(data)


def test_packb_refuses_other_types() -> None:
    with pytest.raises(TypeError):
        _msgpack.packb(1.5)
    with pytest.raises(OverflowError):
        _msgpack.packb(1 << 64)


@settings(deadline=None)
@given(values)
def test_unpackb_reads_all_packb_writes(value: object) -> None:
    assert _msgpack.unpackb(_msgpack.packb(value)) == value


def test_a_real_request_round_trips_through_the_servers_decoder() -> None:
    request = Request.of_this_process(namespace="ns", id="c1", address="/a", debug=False,
                                      argv=["python", "-m", "supervisor.shim"], code="0.1.0+x")
    wire = _msgpack.unpackb(_msgpack.packb(request.to_wire()))
    assert Request.from_wire(wire).to_wire() == request.to_wire()


def test_unpackb_reads_the_surrogates_packb_writes() -> None:
    # os.environ holds undecodable bytes as surrogates; the fork-server request carries it.
    value = {"env": {"X": b"\xff\xfe".decode("utf-8", "surrogateescape")}}
    assert _msgpack.unpackb(_msgpack.packb(value)) == value
