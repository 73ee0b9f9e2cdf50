"""The msgpack subset of the fork server's protocol and the event spool, by hand.

``import msgpack`` costs ``start`` ~3 ms (its package imports ``datetime`` for
timestamps), more than the whole exchange it is needed for.  ``start`` sends
one request (maps, arrays, strings, integers, booleans) and reads one answer
(``{"pid": N}`` or ``{"error": "why"}``); the fork server
(:mod:`supervisor.forkserver`) reads and writes them with this module too,
since it reads all it writes; ``delete`` reads the event spool's records
with it (:mod:`supervisor.launch.spool`), hence ``bytes`` (msgpack's bin).
The encoding is msgpack's shortest form for each value, byte for byte what
``msgpack.packb`` writes (the tests compare them).
"""

from __future__ import annotations

import struct

TYPE_CHECKING = False  # not typing's: importing typing costs `start` ~2 ms
if TYPE_CHECKING:
    from typing import Any


def packb(value: object) -> bytes:
    out = bytearray()
    _pack(value, out)
    return bytes(out)


def _pack(value: object, out: bytearray) -> None:
    if value is None:
        out.append(0xC0)
    elif value is True:
        out.append(0xC3)
    elif value is False:
        out.append(0xC2)
    elif isinstance(value, int):
        _pack_int(value, out)
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        n = len(data)
        if n < 32:
            out.append(0xA0 | n)
        elif n < 0x100:
            out += b"\xd9" + struct.pack(">B", n)
        elif n < 0x10000:
            out += b"\xda" + struct.pack(">H", n)
        else:
            out += b"\xdb" + struct.pack(">I", n)
        out += data
    elif isinstance(value, bytes):  # bin 8/16/32 (the event spool's payloads)
        n = len(value)
        if n < 0x100:
            out += b"\xc4" + struct.pack(">B", n)
        elif n < 0x10000:
            out += b"\xc5" + struct.pack(">H", n)
        else:
            out += b"\xc6" + struct.pack(">I", n)
        out += value
    elif isinstance(value, (list, tuple)):
        _pack_len(len(value), 0x90, 0xDC, out)
        for item in value:
            _pack(item, out)
    elif isinstance(value, dict):
        _pack_len(len(value), 0x80, 0xDE, out)
        for k, v in value.items():
            _pack(k, out)
            _pack(v, out)
    else:
        raise TypeError(f"cannot pack {type(value).__name__}")


def _pack_len(n: int, fix: int, wide: int, out: bytearray) -> None:
    """Array (fix 0x90, wide 0xdc) or map (0x80, 0xde) header: fix, 16 or 32 bits."""
    if n < 16:
        out.append(fix | n)
    elif n < 0x10000:
        out += struct.pack(">BH", wide, n)
    else:
        out += struct.pack(">BI", wide + 1, n)


def _pack_int(n: int, out: bytearray) -> None:
    if 0 <= n < 0x80:
        out.append(n)
    elif -32 <= n < 0:
        out.append(n & 0xFF)
    elif n >= 0:
        for code, fmt, limit in ((0xCC, ">B", 1 << 8), (0xCD, ">H", 1 << 16),
                                 (0xCE, ">I", 1 << 32), (0xCF, ">Q", 1 << 64)):
            if n < limit:
                out += struct.pack(">B", code) + struct.pack(fmt, n)
                return
        raise OverflowError(f"{n} does not fit in 64 bits")
    else:
        for code, fmt, limit in ((0xD0, ">b", 1 << 7), (0xD1, ">h", 1 << 15),
                                 (0xD2, ">i", 1 << 31), (0xD3, ">q", 1 << 63)):
            if n >= -limit:
                out += struct.pack(">B", code) + struct.pack(fmt, n)
                return
        raise OverflowError(f"{n} does not fit in 64 bits")


_FIXED = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q",
          0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}


def unpackb(data: bytes) -> Any:
    """One value of the subset :func:`packb` writes; ValueError for anything else."""
    value, end = _unpack(data, 0, 0)
    if end != len(data):
        raise ValueError("extra data after the msgpack value")
    return value


def _take(data: bytes, pos: int, n: int) -> tuple[bytes, int]:
    if pos + n > len(data):
        raise ValueError("truncated msgpack data")
    return data[pos:pos + n], pos + n


def _unpack(data: bytes, pos: int, depth: int) -> tuple[Any, int]:
    if depth > 32:
        raise ValueError("msgpack data nested too deeply")
    head, pos = _take(data, pos, 1)
    b = head[0]
    if b < 0x80:
        return b, pos
    if b >= 0xE0:
        return b - 0x100, pos
    if b == 0xC0:
        return None, pos
    if b in (0xC2, 0xC3):
        return b == 0xC3, pos
    if b in _FIXED:
        fmt = _FIXED[b]
        raw, pos = _take(data, pos, struct.calcsize(fmt))
        return struct.unpack(fmt, raw)[0], pos
    if 0xA0 <= b < 0xC0 or b in (0xD9, 0xDA, 0xDB):
        if b < 0xC0:
            n = b & 0x1F
        else:
            fmt = {0xD9: ">B", 0xDA: ">H", 0xDB: ">I"}[b]
            raw, pos = _take(data, pos, struct.calcsize(fmt))
            n = struct.unpack(fmt, raw)[0]
        raw, pos = _take(data, pos, n)
        try:
            return raw.decode("utf-8", "surrogatepass"), pos
        except UnicodeDecodeError as e:
            raise ValueError(f"bad UTF-8 in a msgpack string: {e}") from None
    if b in (0xC4, 0xC5, 0xC6):  # bin 8/16/32
        fmt = {0xC4: ">B", 0xC5: ">H", 0xC6: ">I"}[b]
        raw, pos = _take(data, pos, struct.calcsize(fmt))
        return _take(data, pos, struct.unpack(fmt, raw)[0])
    if 0x80 <= b < 0xA0 or b in (0xDC, 0xDD, 0xDE, 0xDF):  # arrays and maps
        if b < 0xA0:
            n = b & 0x0F
        else:
            fmt = ">H" if b in (0xDC, 0xDE) else ">I"
            raw, pos = _take(data, pos, struct.calcsize(fmt))
            n = struct.unpack(fmt, raw)[0]
        if 0x90 <= b < 0xA0 or b in (0xDC, 0xDD):
            items = []
            for _ in range(n):
                item, pos = _unpack(data, pos, depth + 1)
                items.append(item)
            return items, pos
        mapping = {}
        for _ in range(n):
            key, pos = _unpack(data, pos, depth + 1)
            if not isinstance(key, (str, int)):
                raise ValueError("a msgpack map key that is not a string or integer")  # noqa: TRY004 - bad data, as the rest
            mapping[key], pos = _unpack(data, pos, depth + 1)
        return mapping, pos
    raise ValueError(f"msgpack type 0x{b:02x} is not supported here")
