"""ttrpc message framing: the 10-byte header and an incremental decoder.

Every ttrpc message is a header followed by ``length`` payload bytes::

    offset 0  u32 big-endian  payload length (header excluded)
    offset 4  u32 big-endian  stream id
    offset 8  u8              message type (1 request, 2 response)
    offset 9  u8              flags (reserved in v1.1; carried, never interpreted)

The largest payload allowed is :data:`MAX_MESSAGE_SIZE` (4 MiB).

:class:`FrameDecoder` is a pure state machine: :meth:`FrameDecoder.feed` it
bytes, iterate it for :class:`Frame` items.  A header announcing more than the
maximum is *not* fatal -- like Go's ttrpc v1.1.1 (``channel.recv``) the decoder
skips that message's payload as it streams past, then yields one
:class:`OversizedFrame` so the connection can answer ``RESOURCE_EXHAUSTED`` on
that stream and carry on.

Invariants:

* Bytes of an oversized message are dropped on arrival, never buffered; apart
  from data fed but not yet iterated, the buffer holds at most one partial
  frame, so at most ``10 + MAX_MESSAGE_SIZE`` bytes per message.
* Frames come out in wire order; an :class:`OversizedFrame` is yielded only
  after its last byte was skipped (a peer vanishing mid-skip is an error, as in Go).
* An unknown message type is fatal (:class:`RemoteProtocolError`): v1.1 knows
  only requests and responses, and garbage on the wire almost always shows up
  here first.  Anything malformed raises :class:`RemoteProtocolError` and
  nothing else.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from ._errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "HEADER_SIZE",
    "MAX_MESSAGE_SIZE",
    "Frame",
    "FrameDecoder",
    "Header",
    "MessageType",
    "OversizedFrame",
    "decode_header",
    "encode_frame",
    "encode_header",
]

HEADER_SIZE = 10
MAX_MESSAGE_SIZE = 4 << 20
_MAX_STREAM_ID = 0xFFFFFFFF
_HEADER = struct.Struct(">IIBB")


class MessageType(enum.IntEnum):
    """The message types of ttrpc v1.1."""

    REQUEST = 1
    RESPONSE = 2


@dataclass(frozen=True, slots=True)
class Header:
    """A decoded message header; ``type`` is the raw byte, possibly unknown."""

    length: int
    stream_id: int
    type: int
    flags: int


@dataclass(frozen=True, slots=True)
class Frame:
    """One complete message."""

    stream_id: int
    type: MessageType
    flags: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class OversizedFrame:
    """A message whose ``length`` exceeded the maximum; its payload was skipped."""

    stream_id: int
    type: MessageType
    flags: int
    length: int


def encode_header(length: int, stream_id: int, type: int, flags: int = 0) -> bytes:
    """Pack a header; out-of-range fields are a :class:`LocalProtocolError`."""
    if not 0 <= length <= 0xFFFFFFFF:
        raise LocalProtocolError(f"payload length {length} does not fit a ttrpc header")
    if not 0 <= stream_id <= _MAX_STREAM_ID:
        raise LocalProtocolError(f"stream id {stream_id} does not fit in 32 bits")
    if not 0 <= type <= 0xFF or not 0 <= flags <= 0xFF:
        raise LocalProtocolError(f"message type {type} / flags {flags} do not fit in a byte")
    return _HEADER.pack(length, stream_id, type, flags)


def decode_header(data: bytes | bytearray | memoryview) -> Header:
    """Unpack the first 10 bytes of ``data`` (which must hold at least 10)."""
    if len(data) < HEADER_SIZE:
        raise RemoteProtocolError(f"ttrpc header needs {HEADER_SIZE} bytes, got {len(data)}")
    return Header(*_HEADER.unpack_from(data))


def encode_frame(
    stream_id: int,
    type: MessageType,
    payload: bytes,
    flags: int = 0,
    *,
    max_message_size: int = MAX_MESSAGE_SIZE,
) -> bytes:
    """Header plus payload; a payload over the limit is a :class:`LocalProtocolError`."""
    if len(payload) > max_message_size:
        raise LocalProtocolError(
            f"message of {len(payload)} bytes exceeds the maximum message size "
            f"of {max_message_size}"
        )
    return encode_header(len(payload), stream_id, type, flags) + payload


class FrameDecoder:
    """Incremental ttrpc frame decoder: ``feed()`` bytes, iterate frames.

    ``feed(b"")`` is not special; call :meth:`feed_eof` when the peer closed its
    side.  After that, iteration raises :class:`RemoteProtocolError` if the
    stream stopped inside a frame.
    """

    __slots__ = ("_buf", "_discard", "_eof", "_max", "_oversized", "_pos")

    def __init__(self, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        self._max = max_message_size
        self._buf = bytearray()
        self._pos = 0  # start of unconsumed data in _buf
        self._discard = 0  # payload bytes of an oversized message still to skip
        self._oversized: OversizedFrame | None = None
        self._eof = False

    @property
    def buffered(self) -> int:
        """Bytes held (fed but not yet returned as frames)."""
        return len(self._buf) - self._pos

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is pending (a clean place for EOF)."""
        return self.buffered == 0 and self._oversized is None

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes; bytes of an oversized message are dropped here."""
        if self._eof:
            raise LocalProtocolError("data fed to the frame decoder after end of stream")
        if self._discard:
            skip = min(self._discard, len(data))
            self._discard -= skip
            data = memoryview(data)[skip:]
        if data:
            self._buf += data

    def feed_eof(self) -> None:
        """Mark the end of the byte stream."""
        self._eof = True

    def snapshot(self) -> tuple[bytes, int, OversizedFrame | None]:
        """What the decoder holds: ``(unparsed bytes, payload bytes of an oversized
        message still to skip, that message)``; :meth:`restore` takes it back."""
        return bytes(self._buf[self._pos :]), self._discard, self._oversized

    def restore(self, unparsed: bytes, discard: int = 0,
                oversized: OversizedFrame | None = None) -> None:
        """Hold what :meth:`snapshot` returned (a decoder that was fed nothing yet)."""
        if self.buffered or self._eof or self._oversized is not None:
            raise LocalProtocolError("restore into a decoder that already holds data")
        if discard < 0 or (discard and oversized is None):
            raise LocalProtocolError(f"bad skip state: {discard} bytes, frame {oversized}")
        self._oversized = oversized
        self._discard = discard
        self._buf += unparsed

    def __iter__(self) -> Iterator[Frame | OversizedFrame]:
        while (item := self.next_frame()) is not None:
            yield item

    def _truncated(self, what: str) -> RemoteProtocolError:
        return RemoteProtocolError(f"peer closed the stream in the middle of {what}")

    def next_frame(self) -> Frame | OversizedFrame | None:
        """Return the next complete item, or ``None`` if more bytes are needed."""
        if self._oversized is not None:
            if self._discard:
                if self._eof:
                    raise self._truncated(
                        f"an oversized message ({self._discard} bytes still unsent)"
                    )
                return None
            done, self._oversized = self._oversized, None
            return done
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail < HEADER_SIZE:
            if avail and self._eof:
                raise self._truncated(f"a message header ({avail} of {HEADER_SIZE} bytes)")
            self._compact()
            return None
        length, stream_id, raw_type, flags = _HEADER.unpack_from(buf, pos)
        if raw_type not in (1, 2):
            raise RemoteProtocolError(
                f"unknown message type {raw_type:#04x} on stream {stream_id} "
                f"(length {length}, flags {flags:#04x})"
            )
        msg_type = MessageType(raw_type)
        if length > self._max:
            skip = min(avail - HEADER_SIZE, length)
            self._pos = pos + HEADER_SIZE + skip
            self._discard = length - skip
            self._oversized = OversizedFrame(stream_id, msg_type, flags, length)
            self._compact()
            return self.next_frame()
        end = pos + HEADER_SIZE + length
        if end > len(buf):
            if self._eof:
                raise self._truncated(
                    f"a message on stream {stream_id} "
                    f"({avail - HEADER_SIZE} of {length} payload bytes)"
                )
            self._compact()
            return None
        payload = bytes(buf[pos + HEADER_SIZE : end])
        self._pos = end
        if end == len(buf) or end > 65536:
            self._compact()
        return Frame(stream_id, msg_type, flags, payload)

    def _compact(self) -> None:
        if self._pos:
            del self._buf[: self._pos]
            self._pos = 0
