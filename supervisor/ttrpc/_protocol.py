"""Sans-IO ttrpc connections: feed received bytes in, get events and bytes out.

Neither class does I/O, keeps time or knows about tasks; the trio transport in
``_server.py``/``_client.py`` drives them, and tests pair two of them in memory.

:class:`ServerConnection` (the side that accepts a connection):

* ``receive_data(data)`` -> list of :class:`RequestReceived` (a call to run) and
  :class:`RequestRejected` (a request refused with a status; reply to it like
  any other).  ``receive_data(b"")`` means the peer closed its side.
* ``send_response(stream_id, ...)`` -> bytes to write.  Every event above owes
  exactly one response; sending one that is not owed is a
  :class:`LocalProtocolError`.
* Per-stream problems are answered, not fatal, as in Go's ttrpc v1.1.1: an
  oversized request -> ``RESOURCE_EXHAUSTED``; an even stream id (clients must
  use odd ones) or an id not above the previous request's (ids are never reused)
  -> ``INVALID_ARGUMENT``; a request body that is not a valid ``Request`` ->
  ``INVALID_ARGUMENT``.  Framing problems are fatal (:class:`RemoteProtocolError`):
  an unknown message type, a *response* frame sent by the client, a stream
  ending mid-frame.

:class:`ClientConnection` (the side that connects):

* ``send_request(...)`` -> ``(stream_id, bytes)``; ids are odd, from 1, +2 each.
* ``receive_data(data)`` -> list of :class:`ResponseReceived`.  An oversized
  response becomes a ``RESOURCE_EXHAUSTED`` status for its call (as in Go).
* ``abandon(stream_id)``: the caller gave up (timeout, cancellation); the late
  response, if any, is swallowed.  A response for a stream with no outstanding
  or abandoned call, a request frame, or an undecodable response is fatal.

Invariants: malformed input raises :class:`ProtocolError` and nothing else;
after a fatal error the connection stays failed (every later ``receive_data``
raises); an exception raised by ``receive_data`` discards the events that the
same chunk had produced, since the connection is being torn down anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ._errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from ._frame import (
    MAX_MESSAGE_SIZE,
    Frame,
    FrameDecoder,
    MessageType,
    OversizedFrame,
    encode_frame,
)
from ._status import Code
from ._wire import (
    Request,
    Response,
    Status,
    decode_request,
    decode_response,
    encode_request,
    encode_response,
    metadata_pairs,
)

__all__ = [
    "ClientConnection",
    "RequestReceived",
    "RequestRejected",
    "ResponseReceived",
    "ServerConnection",
    "ServerEvent",
]

_MAX_STREAM_ID = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A well-formed request: run it and answer with ``send_response``."""

    stream_id: int
    request: Request


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """A request refused by the protocol layer; answer with this status."""

    stream_id: int
    code: Code
    message: str


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """The response to the call on ``stream_id``."""

    stream_id: int
    response: Response


ServerEvent = RequestReceived | RequestRejected


class _Base:
    """Shared decode loop and the sticky failure state."""

    def __init__(self, max_message_size: int) -> None:
        self.max_message_size = max_message_size
        self._decoder = FrameDecoder(max_message_size)
        self._failure: ProtocolError | None = None
        self.peer_closed = False

    @property
    def failed(self) -> bool:
        """True once a fatal protocol error was raised."""
        return self._failure is not None

    def _frames(self, data: bytes | bytearray | memoryview) -> list[Frame | OversizedFrame]:
        if self._failure is not None:
            raise RemoteProtocolError(f"connection already failed: {self._failure}")
        if self.peer_closed:
            if data:
                raise LocalProtocolError("receive_data called with data after end of stream")
            return []
        try:
            if data:
                self._decoder.feed(data)
            else:
                self.peer_closed = True
                self._decoder.feed_eof()
            return list(self._decoder)
        except ProtocolError as exc:
            self._failure = exc
            raise

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        self._failure = exc
        return exc


class ServerConnection(_Base):
    """Server side of one ttrpc connection (see the module docstring)."""

    def __init__(self, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        super().__init__(max_message_size)
        self._last_stream_id = 0
        self._owed: dict[int, int] = {}  # stream id -> responses still owed

    @property
    def outstanding(self) -> int:
        """Responses owed to the client."""
        return sum(self._owed.values())

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ServerEvent]:
        """Feed bytes from the client (``b""`` for end of stream)."""
        events: list[ServerEvent] = []
        for item in self._frames(data):
            events.append(self._handle(item))
        return events

    def _reject(self, stream_id: int, code: Code, message: str) -> RequestRejected:
        self._owed[stream_id] = self._owed.get(stream_id, 0) + 1
        return RequestRejected(stream_id, code, message)

    def _handle(self, item: Frame | OversizedFrame) -> ServerEvent:
        stream_id = item.stream_id
        if item.type is not MessageType.REQUEST:
            raise self._fail(
                RemoteProtocolError(
                    f"client sent a {item.type.name.lower()} frame on stream {stream_id}; "
                    "clients may only send requests"
                )
            )
        if isinstance(item, OversizedFrame):
            if stream_id % 2 == 1 and stream_id > self._last_stream_id:
                self._last_stream_id = stream_id
            return self._reject(
                stream_id,
                Code.RESOURCE_EXHAUSTED,
                f"message length {item.length} exceeds the maximum message size "
                f"of {self.max_message_size}",
            )
        if stream_id % 2 == 0:
            return self._reject(
                stream_id,
                Code.INVALID_ARGUMENT,
                f"stream id {stream_id} is even; client-initiated streams must be odd",
            )
        if stream_id <= self._last_stream_id:
            return self._reject(
                stream_id,
                Code.INVALID_ARGUMENT,
                f"stream id {stream_id} is not above the previous one "
                f"({self._last_stream_id}); stream ids must increase and are never reused",
            )
        self._last_stream_id = stream_id
        try:
            request = decode_request(item.payload)
        except RemoteProtocolError as exc:
            return self._reject(stream_id, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
        self._owed[stream_id] = self._owed.get(stream_id, 0) + 1
        return RequestReceived(stream_id, request)

    def send_response(
        self,
        stream_id: int,
        payload: bytes = b"",
        *,
        code: Code = Code.OK,
        message: str = "",
        details: Sequence[tuple[str, bytes]] = (),
    ) -> bytes:
        """Bytes answering the request on ``stream_id``.

        Raises :class:`LocalProtocolError` -- leaving the response still owed --
        if none is owed on that stream or the encoded response is too large.
        """
        owed = self._owed.get(stream_id, 0)
        if not owed:
            raise LocalProtocolError(f"no response is owed on stream {stream_id}")
        if code is Code.OK and (message or details):
            raise LocalProtocolError("an OK status carries no message or details")
        body = encode_response(Response(Status(int(code), message, tuple(details)), payload))
        frame = encode_frame(
            stream_id, MessageType.RESPONSE, body, max_message_size=self.max_message_size
        )
        if owed == 1:
            del self._owed[stream_id]
        else:
            self._owed[stream_id] = owed - 1
        return frame


class ClientConnection(_Base):
    """Client side of one ttrpc connection (see the module docstring)."""

    def __init__(self, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        super().__init__(max_message_size)
        self._next_stream_id = 1
        self._pending: set[int] = set()
        self._abandoned: set[int] = set()

    @property
    def outstanding(self) -> int:
        """Calls sent and neither answered nor abandoned."""
        return len(self._pending)

    def send_request(
        self,
        service: str,
        method: str,
        payload: bytes = b"",
        *,
        timeout_nano: int = 0,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> tuple[int, bytes]:
        """Allocate a stream id and encode a request; return ``(stream_id, bytes)``.

        The bytes must be written in the order the ids were allocated (the
        server requires increasing ids).  Raises :class:`LocalProtocolError`,
        allocating nothing, if the request is too large or ids are exhausted.
        """
        if self._failure is not None:
            raise LocalProtocolError(f"connection has failed: {self._failure}")
        if self._next_stream_id > _MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted on this connection; open a new one")
        if not -(1 << 63) <= timeout_nano < 1 << 63:
            raise LocalProtocolError(f"timeout_nano {timeout_nano} does not fit an int64")
        body = encode_request(
            Request(service, method, payload, timeout_nano, metadata_pairs(metadata))
        )
        stream_id = self._next_stream_id
        frame = encode_frame(
            stream_id, MessageType.REQUEST, body, max_message_size=self.max_message_size
        )
        self._next_stream_id += 2
        self._pending.add(stream_id)
        return stream_id, frame

    def abandon(self, stream_id: int) -> None:
        """Forget the call on ``stream_id``; a late response will be dropped."""
        if stream_id in self._pending:
            self._pending.remove(stream_id)
            self._abandoned.add(stream_id)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ResponseReceived]:
        """Feed bytes from the server (``b""`` for end of stream)."""
        events: list[ResponseReceived] = []
        for item in self._frames(data):
            event = self._handle(item)
            if event is not None:
                events.append(event)
        return events

    def _handle(self, item: Frame | OversizedFrame) -> ResponseReceived | None:
        stream_id = item.stream_id
        if item.type is not MessageType.RESPONSE:
            raise self._fail(
                RemoteProtocolError(
                    f"server sent a {item.type.name.lower()} frame on stream {stream_id}; "
                    "servers may only send responses"
                )
            )
        if stream_id in self._pending:
            self._pending.remove(stream_id)
        elif stream_id in self._abandoned:
            self._abandoned.remove(stream_id)
            return None
        else:
            raise self._fail(
                RemoteProtocolError(f"response on stream {stream_id}, which has no call waiting")
            )
        if isinstance(item, OversizedFrame):
            return ResponseReceived(
                stream_id,
                Response(
                    Status(
                        int(Code.RESOURCE_EXHAUSTED),
                        f"message length {item.length} exceeds the maximum message size "
                        f"of {self.max_message_size}",
                    )
                ),
            )
        try:
            response = decode_response(item.payload)
        except RemoteProtocolError as exc:
            raise self._fail(
                RemoteProtocolError(f"undecodable response on stream {stream_id}: {exc}")
            ) from None
        return ResponseReceived(stream_id, response)
