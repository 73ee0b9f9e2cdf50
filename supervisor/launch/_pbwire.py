"""Hand-encoded protobuf for the light ``start`` and ``delete`` actions (no protobuf runtime).

containerd waits for both actions on its critical path; importing the
protobuf runtime would cost them more than the few tiny messages they exchange.
Only what they need: varints, length-delimited fields, and a reader that walks
a message's fields.  Tests check every message built here against the
generated classes.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing costs `start` ~2 ms
if TYPE_CHECKING:
    from collections.abc import Iterator

VARINT = 0
FIXED64 = 1
LENGTH = 2
FIXED32 = 5


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def varint(value: int) -> bytes:
    """``value`` (non-negative) as a base-128 varint."""
    if value < 0:
        raise ValueError("negative varint")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if not value:
            out.append(byte)
            return bytes(out)
        out.append(byte | 0x80)


def field_varint(number: int, value: int) -> bytes:
    """A varint field; empty for 0 (proto3 leaves defaults out)."""
    return varint(number << 3 | VARINT) + varint(value) if value else b""


def field_bytes(number: int, value: bytes, *, always: bool = False) -> bytes:
    """A length-delimited field; empty for b"" unless ``always`` (a set sub-message)."""
    if not value and not always:
        return b""
    return varint(number << 3 | LENGTH) + varint(len(value)) + value


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise WireError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) in order: an int for varints and fixed fields, bytes otherwise."""
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, kind = key >> 3, key & 7
        value: int | bytes
        if kind == VARINT:
            value, pos = _read_varint(data, pos)
        elif kind == LENGTH:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise WireError("truncated length-delimited field")
            value, pos = data[pos:pos + size], pos + size
        elif kind in (FIXED64, FIXED32):
            width = 8 if kind == FIXED64 else 4
            if pos + width > len(data):
                raise WireError("truncated fixed field")
            value, pos = int.from_bytes(data[pos:pos + width], "little"), pos + width
        else:
            raise WireError(f"unsupported wire type {kind}")
        if number == 0:
            raise WireError("field number 0")
        yield number, value
