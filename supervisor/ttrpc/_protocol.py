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
* Flow control (backpressure, never an error): at most ``max_calls`` events are
  unanswered at a time -- further complete frames wait in the decoder and come
  out of ``events()`` once responses were sent.  ``buffered_bytes`` counts what
  the connection holds: undecoded input, the frame of each unanswered request
  and the response bytes not yet reported by ``response_written(n)``.
  ``can_receive`` tells the transport whether to read: not at the call limit,
  and ``buffered_bytes`` under ``max_buffered_bytes`` or nothing in flight (so
  one message larger than the byte limit still gets through).  A transport that
  reads at most ``R`` bytes at a time, and only while ``can_receive``, holds at
  most ``max(max_buffered_bytes, 10 + max_message_size) + R`` bytes of the
  peer's (undecoded input and unanswered requests, :attr:`peer_bytes`); the
  responses not yet written come on top, each as large as its handler made it
  (an error answering a rejected request charged only its 10-byte header can be
  larger than that), and stop further reading until they are written.
* Handing over (an in-place upgrade): ``snapshot()`` -> :class:`ServerSnapshot`
  (the bytes received and not yet parsed, the last stream id);
  ``restore(snapshot)`` on a fresh connection goes on from it, and
  ``owe(stream_id, request)`` takes over a call the predecessor had received
  and not answered.
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
    HEADER_SIZE,
    MAX_MESSAGE_SIZE,
    Frame,
    FrameDecoder,
    MessageType,
    OversizedFrame,
    encode_frame,
)
from ._limits import MAX_BUFFERED_BYTES, MAX_CALLS
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
    "ClientSnapshot",
    "RequestReceived",
    "RequestRejected",
    "ResponseReceived",
    "ServerConnection",
    "ServerEvent",
    "ServerSnapshot",
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


@dataclass(frozen=True, slots=True)
class ServerSnapshot:
    """A :class:`ServerConnection` handed over (an in-place upgrade).

    ``unparsed``: bytes received and not yet returned as events (a partial
    frame, or whole frames held back by the call limit); ``last_stream_id``
    keeps the id rules; ``discard``/``oversized``: an oversized message being
    skipped.  The calls owed are not in it: the transport either answers
    them first or hands each over (:meth:`ServerConnection.owe`).
    """

    unparsed: bytes
    last_stream_id: int
    discard: int = 0
    oversized: OversizedFrame | None = None


@dataclass(frozen=True, slots=True)
class ClientSnapshot:
    """A :class:`ClientConnection` handed over (an in-place upgrade).

    ``unparsed``/``discard``/``oversized``: what the decoder held (as in
    :class:`ServerSnapshot`); ``next_stream_id`` keeps ids increasing;
    ``pending``: calls written and not answered, whose answers the successor
    waits for; ``abandoned``: calls whose late answers it drops.
    """

    unparsed: bytes
    next_stream_id: int
    pending: tuple[int, ...] = ()
    abandoned: tuple[int, ...] = ()
    discard: int = 0
    oversized: OversizedFrame | None = None


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

    def _feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._failure is not None:
            raise RemoteProtocolError(f"connection already failed: {self._failure}")
        if self.peer_closed:
            if data:
                raise LocalProtocolError("receive_data called with data after end of stream")
            return
        if data:
            self._decoder.feed(data)
        else:
            self.peer_closed = True
            self._decoder.feed_eof()

    def _next_frame(self) -> Frame | OversizedFrame | None:
        if self._failure is not None:
            raise RemoteProtocolError(f"connection already failed: {self._failure}")
        try:
            return self._decoder.next_frame()
        except ProtocolError as exc:
            self._failure = exc
            raise

    def _frames(self, data: bytes | bytearray | memoryview) -> list[Frame | OversizedFrame]:
        self._feed(data)
        frames: list[Frame | OversizedFrame] = []
        while (item := self._next_frame()) is not None:
            frames.append(item)
        return frames

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        self._failure = exc
        return exc


class ServerConnection(_Base):
    """Server side of one ttrpc connection (see the module docstring)."""

    def __init__(
        self,
        max_message_size: int = MAX_MESSAGE_SIZE,
        *,
        max_calls: int = MAX_CALLS,
        max_buffered_bytes: int = MAX_BUFFERED_BYTES,
    ) -> None:
        super().__init__(max_message_size)
        if max_calls < 1 or max_buffered_bytes < 1:
            raise ValueError(
                f"max_calls ({max_calls}) and max_buffered_bytes ({max_buffered_bytes}) "
                "must be positive"
            )
        self.max_calls = max_calls
        self.max_buffered_bytes = max_buffered_bytes
        self._last_stream_id = 0
        # stream id -> the charges (request frame sizes) of the responses owed
        self._owed: dict[int, list[int]] = {}
        self._calls = 0  # responses owed
        self._charged = 0  # sum of the charges in _owed
        self._unwritten = 0  # response bytes handed out, not yet reported written
        self._held_back = False  # events() stopped at the call limit with input left

    @property
    def outstanding(self) -> int:
        """Responses owed to the client (calls handed out and not yet answered)."""
        return self._calls

    @property
    def buffered_bytes(self) -> int:
        """Bytes held: undecoded input, unanswered requests, unwritten responses."""
        return self._decoder.buffered + self._charged + self._unwritten

    @property
    def peer_bytes(self) -> int:
        """The peer's bytes held: undecoded input and unanswered requests."""
        return self._decoder.buffered + self._charged

    @property
    def can_receive(self) -> bool:
        """Whether the transport should read more from the peer now.

        False after end of stream or a fatal error, while :attr:`max_calls`
        calls are unanswered or input held back by that limit waits for
        :meth:`events`, and while :attr:`buffered_bytes` is at least
        :attr:`max_buffered_bytes` -- unless nothing is in flight, so that a
        single message larger than the byte limit still gets through.
        """
        if self.peer_closed or self._failure is not None:
            return False
        if self._calls >= self.max_calls or self._held_back:
            return False
        in_flight = self._charged + self._unwritten
        return in_flight == 0 or self.buffered_bytes < self.max_buffered_bytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ServerEvent]:
        """Feed bytes from the client (``b""`` for end of stream); return :meth:`events`."""
        self._feed(data)
        return self.events()

    def events(self) -> list[ServerEvent]:
        """The requests decoded so far that the call limit lets out now.

        Frames beyond :attr:`max_calls` unanswered calls stay in the decoder;
        call this again after answering (``receive_data`` calls it too).
        """
        events: list[ServerEvent] = []
        while True:
            if self._calls >= self.max_calls:
                self._held_back = not self._decoder.at_boundary
                break
            item = self._next_frame()
            if item is None:
                self._held_back = False
                break
            events.append(self._handle(item))
        return events

    def snapshot(self) -> ServerSnapshot:
        """What a successor needs to go on with this connection (see :class:`ServerSnapshot`).

        Taken while the transport reads nothing more; the responses owed are the
        transport's to settle (answered, or handed over with :meth:`owe`).
        """
        if self._failure is not None or self.peer_closed:
            raise LocalProtocolError("a failed or ended connection cannot be handed over")
        unparsed, discard, oversized = self._decoder.snapshot()
        return ServerSnapshot(unparsed, self._last_stream_id, discard, oversized)

    def restore(self, snapshot: ServerSnapshot) -> None:
        """Go on from ``snapshot`` (a new connection that was fed nothing yet): its
        unparsed bytes come out of :meth:`events` as if just received."""
        if self._last_stream_id or self._calls:
            raise LocalProtocolError("restore into a connection that is already in use")
        self._decoder.restore(snapshot.unparsed, snapshot.discard, snapshot.oversized)
        self._last_stream_id = snapshot.last_stream_id

    def owe(self, stream_id: int, request: Request) -> RequestReceived:
        """Owe a response to a request another connection object received (a call
        handed over from a predecessor, :meth:`snapshot`); the event to run it."""
        if stream_id % 2 == 0 or stream_id > self._last_stream_id or stream_id in self._owed:
            raise LocalProtocolError(
                f"stream {stream_id} is not a request this connection saw "
                f"(last stream id {self._last_stream_id}) or is owed already")
        self._owe(stream_id, HEADER_SIZE + len(encode_request(request)))
        return RequestReceived(stream_id, request)

    def response_written(self, nbytes: int) -> None:
        """Report that ``nbytes`` of the bytes ``send_response`` returned were written.

        The transport calls it once a response left (or will never leave);
        until then those bytes count in :attr:`buffered_bytes`.
        """
        if not 0 <= nbytes <= self._unwritten:
            raise LocalProtocolError(
                f"{nbytes} response bytes reported written, but {self._unwritten} are unwritten"
            )
        self._unwritten -= nbytes

    def _owe(self, stream_id: int, charge: int) -> None:
        self._owed.setdefault(stream_id, []).append(charge)
        self._calls += 1
        self._charged += charge

    def _reject(self, item: Frame | OversizedFrame, code: Code, message: str) -> RequestRejected:
        self._owe(item.stream_id, _charge(item))
        return RequestRejected(item.stream_id, code, message)

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
                item,
                Code.RESOURCE_EXHAUSTED,
                f"message length {item.length} exceeds the maximum message size "
                f"of {self.max_message_size}",
            )
        if stream_id % 2 == 0:
            return self._reject(
                item,
                Code.INVALID_ARGUMENT,
                f"stream id {stream_id} is even; client-initiated streams must be odd",
            )
        if stream_id <= self._last_stream_id:
            return self._reject(
                item,
                Code.INVALID_ARGUMENT,
                f"stream id {stream_id} is not above the previous one "
                f"({self._last_stream_id}); stream ids must increase and are never reused",
            )
        self._last_stream_id = stream_id
        try:
            request = decode_request(item.payload)
        except RemoteProtocolError as exc:
            return self._reject(item, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
        self._owe(stream_id, _charge(item))
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
        owed = self._owed.get(stream_id)
        if not owed:
            raise LocalProtocolError(f"no response is owed on stream {stream_id}")
        if code is Code.OK and (message or details):
            raise LocalProtocolError("an OK status carries no message or details")
        body = encode_response(Response(Status(int(code), message, tuple(details)), payload))
        frame = encode_frame(
            stream_id, MessageType.RESPONSE, body, max_message_size=self.max_message_size
        )
        charge = owed.pop()
        if not owed:
            del self._owed[stream_id]
        self._calls -= 1
        self._charged -= charge
        self._unwritten += len(frame)
        return frame


def _charge(item: Frame | OversizedFrame) -> int:
    """What a request holds while unanswered: its frame (an oversized one, its header)."""
    return HEADER_SIZE + (len(item.payload) if isinstance(item, Frame) else 0)


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

    def snapshot(self) -> ClientSnapshot:
        """What a successor needs to go on with this connection (nothing being read)."""
        if self._failure is not None:
            raise LocalProtocolError("a failed connection cannot be handed over")
        unparsed, discard, oversized = self._decoder.snapshot()
        return ClientSnapshot(unparsed, self._next_stream_id, tuple(sorted(self._pending)),
                              tuple(sorted(self._abandoned)), discard, oversized)

    def restore(self, snapshot: ClientSnapshot) -> None:
        """Go on from ``snapshot`` (a new connection that sent and was fed nothing yet)."""
        if self._next_stream_id != 1 or self._pending or self._abandoned:
            raise LocalProtocolError("restore into a connection that is already in use")
        ids = (*snapshot.pending, *snapshot.abandoned)
        if snapshot.next_stream_id % 2 == 0 or any(
                i % 2 == 0 or not 0 < i < snapshot.next_stream_id for i in ids):
            raise LocalProtocolError(f"bad stream ids in {snapshot}")
        self._decoder.restore(snapshot.unparsed, snapshot.discard, snapshot.oversized)
        self._next_stream_id = snapshot.next_stream_id
        self._pending = set(snapshot.pending)
        self._abandoned = set(snapshot.abandoned)

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
