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
START_GROUP = 3
END_GROUP = 4
FIXED32 = 5
#: The largest field number protobuf allows (2**29 - 1).
MAX_FIELD = 0x1FFFFFFF


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
            return value & 0xFFFFFFFFFFFFFFFF, pos  # as protobuf: 64 bits, the excess dropped
        shift += 7


def _value(data: bytes, pos: int, kind: int) -> tuple[int | bytes, int]:
    """The value of wire type ``kind`` at ``pos``, and the position after it."""
    if kind == VARINT:
        return _read_varint(data, pos)
    if kind == LENGTH:
        size, pos = _read_varint(data, pos)
        if pos + size > len(data):
            raise WireError("truncated length-delimited field")
        return data[pos:pos + size], pos + size
    if kind in (FIXED64, FIXED32):
        width = 8 if kind == FIXED64 else 4
        if pos + width > len(data):
            raise WireError("truncated fixed field")
        return int.from_bytes(data[pos:pos + width], "little"), pos + width
    raise WireError(f"unsupported wire type {kind}")


def _skip_group(data: bytes, pos: int, number: int) -> int:
    """The position after the group ``number`` whose start key ends at ``pos`` (nested
    groups too, without recursion)."""
    open_groups = [number]
    while open_groups:
        key, pos = _read_varint(data, pos)
        kind = key & 7
        if kind == END_GROUP:
            if key >> 3 != open_groups.pop():
                raise WireError("mismatched end of group")
        elif kind == START_GROUP:
            open_groups.append(key >> 3)
        else:
            _, pos = _value(data, pos, kind)
    return pos


def wire_fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) in order: an int for varints and fixed fields,
    bytes otherwise.

    Groups (wire types 3 and 4, which no message of ours has) are skipped whole, as
    protobuf skips an unknown field; anything malformed is a :class:`WireError`.
    """
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, kind = key >> 3, key & 7
        if number == 0 or number > MAX_FIELD:
            raise WireError(f"field number {number}")
        if kind == START_GROUP:
            pos = _skip_group(data, pos, number)
            continue
        value, pos = _value(data, pos, kind)
        yield number, kind, value


def fields(data: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) in order, as :func:`wire_fields` without the wire types."""
    for number, _, value in wire_fields(data):
        yield number, value
