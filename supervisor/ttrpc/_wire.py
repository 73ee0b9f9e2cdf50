"""A minimal protobuf wire codec for ttrpc's own envelope messages.

ttrpc wraps every call in two protobuf messages (field numbers are protocol
facts, checked against containerd/ttrpc v1.1.1 ``types.go`` and
``google/rpc/status.proto``)::

    Request  { 1 service string; 2 method string; 3 payload bytes;
               4 timeout_nano int64; 5 metadata repeated KeyValue }
    KeyValue { 1 key string; 2 value string }
    Response { 1 status google.rpc.Status; 2 payload bytes }
    Status   { 1 code int32; 2 message string; 3 details repeated Any }
    Any      { 1 type_url string; 2 value bytes }

Encoding follows proto3: fields in number order, zero values omitted, so our
bytes equal those of the reference runtimes.  One exception, also made by Go's
ttrpc server: a response always carries its ``status`` field, even when OK.

Decoding accepts anything a conforming encoder may produce: any field order,
repeated occurrences (the last scalar wins; repeated occurrences of the
embedded ``status`` merge, as protobuf merges them), and unknown fields of
every non-group wire type, which are skipped.  It rejects, with
:class:`RemoteProtocolError` and nothing else: truncation anywhere, varints
longer than 10 bytes or above 2**64, field number 0 or above 2**29-1, group or
invalid wire types, a known field with the wrong wire type, and strings that
are not UTF-8.  Decoding never reads past the buffer it was given.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ._errors import RemoteProtocolError

__all__ = [
    "Request",
    "Response",
    "Status",
    "decode_request",
    "decode_response",
    "decode_varint",
    "encode_request",
    "encode_response",
    "encode_varint",
]

_VARINT = 0
_FIXED64 = 1
_LEN = 2
_FIXED32 = 5
_MAX_FIELD = (1 << 29) - 1
_U64 = 1 << 64


@dataclass(frozen=True, slots=True)
class Request:
    """A decoded ttrpc request envelope; ``metadata`` keeps wire order."""

    service: str
    method: str
    payload: bytes = b""
    timeout_nano: int = 0
    metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Status:
    """``google.rpc.Status``; ``details`` are ``(type_url, value)`` pairs."""

    code: int = 0
    message: str = ""
    details: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Response:
    """A decoded ttrpc response envelope; ``status`` is ``None`` when absent."""

    status: Status | None
    payload: bytes = b""


# -- primitives -------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    """Encode ``0 <= value < 2**64`` as a base-128 varint."""
    if value < 0x80:
        if value < 0:
            raise ValueError("varint value must not be negative")
        return bytes((value,))
    if value >= _U64:
        raise ValueError("varint value must be below 2**64")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """Decode a varint at ``buf[pos:end]``; return ``(value, next_pos)``."""
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise RemoteProtocolError("protobuf: truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if shift >= 70:
            raise RemoteProtocolError("protobuf: varint longer than 10 bytes")
    if result >= _U64:
        raise RemoteProtocolError("protobuf: varint overflows 64 bits")
    return result, pos


def _key(field: int, wire_type: int) -> bytes:
    return encode_varint((field << 3) | wire_type)


def _len_field(field: int, data: bytes) -> bytes:
    return _key(field, _LEN) + encode_varint(len(data)) + data


def _str_field(field: int, text: str) -> bytes:
    return _len_field(field, text.encode("utf-8")) if text else b""


def _fields(buf: bytes, what: str) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield ``(field, wire_type, value)``; ``value`` is bytes for LEN fields.

    Fixed-width fields yield their little-endian integer value.
    """
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = decode_varint(buf, pos, end)
        field = key >> 3
        wire_type = key & 7
        if field == 0 or field > _MAX_FIELD:
            raise RemoteProtocolError(f"protobuf: {what} has invalid field number {field}")
        if wire_type == _VARINT:
            value, pos = decode_varint(buf, pos, end)
            yield field, wire_type, value
        elif wire_type == _LEN:
            length, pos = decode_varint(buf, pos, end)
            if length > end - pos:
                raise RemoteProtocolError(
                    f"protobuf: {what} field {field} truncated "
                    f"({length} bytes declared, {end - pos} left)"
                )
            yield field, wire_type, buf[pos : pos + length]
            pos += length
        elif wire_type in (_FIXED64, _FIXED32):
            width = 8 if wire_type == _FIXED64 else 4
            if width > end - pos:
                raise RemoteProtocolError(f"protobuf: {what} field {field} truncated")
            yield field, wire_type, int.from_bytes(buf[pos : pos + width], "little")
            pos += width
        else:
            raise RemoteProtocolError(
                f"protobuf: {what} field {field} has unsupported wire type {wire_type}"
            )


def _expect_len(field: int, wire_type: int, value: int | bytes, what: str) -> bytes:
    if wire_type != _LEN or not isinstance(value, bytes):
        raise RemoteProtocolError(
            f"protobuf: {what} field {field} has wire type {wire_type}, expected 2"
        )
    return value


def _expect_varint(field: int, wire_type: int, value: int | bytes, what: str) -> int:
    if wire_type != _VARINT or not isinstance(value, int):
        raise RemoteProtocolError(
            f"protobuf: {what} field {field} has wire type {wire_type}, expected 0"
        )
    return value


def _text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"protobuf: {what} is not valid UTF-8: {exc}") from None


def _signed64(value: int) -> int:
    return value - _U64 if value >= 1 << 63 else value


def _signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


# -- Request ----------------------------------------------------------------


def encode_request(request: Request) -> bytes:
    """Serialise a :class:`Request` exactly as a proto3 encoder would."""
    parts = [
        _str_field(1, request.service),
        _str_field(2, request.method),
        _len_field(3, request.payload) if request.payload else b"",
    ]
    if request.timeout_nano:
        parts.append(_key(4, _VARINT) + encode_varint(request.timeout_nano % _U64))
    for key, value in request.metadata:
        parts.append(_len_field(5, _str_field(1, key) + _str_field(2, value)))
    return b"".join(parts)


def _decode_key_value(buf: bytes) -> tuple[str, str]:
    key = value = ""
    for field, wire_type, raw in _fields(buf, "KeyValue"):
        if field == 1:
            key = _text(_expect_len(field, wire_type, raw, "KeyValue"), "KeyValue.key")
        elif field == 2:
            value = _text(_expect_len(field, wire_type, raw, "KeyValue"), "KeyValue.value")
    return key, value


def decode_request(buf: bytes) -> Request:
    """Parse a :class:`Request`; raise :class:`RemoteProtocolError` if malformed."""
    service = method = ""
    payload = b""
    timeout_nano = 0
    metadata: list[tuple[str, str]] = []
    for field, wire_type, raw in _fields(buf, "Request"):
        if field == 1:
            service = _text(_expect_len(field, wire_type, raw, "Request"), "Request.service")
        elif field == 2:
            method = _text(_expect_len(field, wire_type, raw, "Request"), "Request.method")
        elif field == 3:
            payload = _expect_len(field, wire_type, raw, "Request")
        elif field == 4:
            timeout_nano = _signed64(_expect_varint(field, wire_type, raw, "Request"))
        elif field == 5:
            metadata.append(_decode_key_value(_expect_len(field, wire_type, raw, "Request")))
    return Request(service, method, payload, timeout_nano, tuple(metadata))


# -- Response ---------------------------------------------------------------


def _encode_status(status: Status) -> bytes:
    parts = []
    if status.code:
        parts.append(_key(1, _VARINT) + encode_varint(status.code % _U64))
    parts.append(_str_field(2, status.message))
    for type_url, value in status.details:
        any_bytes = _str_field(1, type_url) + (_len_field(2, value) if value else b"")
        parts.append(_len_field(3, any_bytes))
    return b"".join(parts)


def encode_response(response: Response) -> bytes:
    """Serialise a :class:`Response`; a present status is always emitted."""
    head = b"" if response.status is None else _len_field(1, _encode_status(response.status))
    return head + (_len_field(2, response.payload) if response.payload else b"")


def _decode_any(buf: bytes) -> tuple[str, bytes]:
    type_url = ""
    value = b""
    for field, wire_type, raw in _fields(buf, "Any"):
        if field == 1:
            type_url = _text(_expect_len(field, wire_type, raw, "Any"), "Any.type_url")
        elif field == 2:
            value = _expect_len(field, wire_type, raw, "Any")
    return type_url, value


def _decode_status(buf: bytes) -> Status:
    code = 0
    message = ""
    details: list[tuple[str, bytes]] = []
    for field, wire_type, raw in _fields(buf, "Status"):
        if field == 1:
            code = _signed32(_expect_varint(field, wire_type, raw, "Status"))
        elif field == 2:
            message = _text(_expect_len(field, wire_type, raw, "Status"), "Status.message")
        elif field == 3:
            details.append(_decode_any(_expect_len(field, wire_type, raw, "Status")))
    return Status(code, message, tuple(details))


def decode_response(buf: bytes) -> Response:
    """Parse a :class:`Response`; raise :class:`RemoteProtocolError` if malformed."""
    status_chunks: list[bytes] = []
    payload = b""
    for field, wire_type, raw in _fields(buf, "Response"):
        if field == 1:
            status_chunks.append(_expect_len(field, wire_type, raw, "Response"))
        elif field == 2:
            payload = _expect_len(field, wire_type, raw, "Response")
    # Repeated occurrences of an embedded message merge; parsing the
    # concatenation of their bytes is exactly that merge.
    status = _decode_status(b"".join(status_chunks)) if status_chunks else None
    return Response(status, payload)


def metadata_pairs(metadata: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Freeze metadata pairs, checking they are strings (local misuse otherwise)."""
    pairs = tuple(metadata)
    for key, value in pairs:
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata keys and values must be str, got {key!r}: {value!r}")
    return pairs
