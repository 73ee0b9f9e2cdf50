"""The trio ttrpc client: concurrent unary calls over one stream, no background task.

A :class:`Client` needs no nursery.  Callers take turns reading: whichever
waiting caller finds nobody reading becomes the reader, reads and dispatches
responses to every waiting call, and when its own answer arrives (or it is
cancelled) wakes one other waiter to take over.  So ``await connect_unix(path)``
returns a ready client, usable from any number of tasks at once.

Invariants:

* Stream ids are allocated and their requests written under one FIFO lock, so
  ids reach the wire in increasing order and frames never interleave.
* At most one task reads at a time; while any call waits, some task reads (a
  task leaving the wait hands the reader role to another waiter).
* ``receive_some`` loses no data when cancelled, so a reader may be cancelled
  (its deadline) at any time.  A *write* cancelled half-way leaves the stream in
  an unknown state: the connection is then closed (``ConnectionClosed``).
* A per-call timeout is sent as ``timeout_nano`` and enforced locally; when it
  passes first the call raises ``RPCError(DEADLINE_EXCEEDED)`` and its late
  answer is dropped.
* Once the connection fails, every pending and later call raises the same kind
  of error: :class:`ConnectionBroken` when the peer went away or broke the
  protocol, :class:`ConnectionClosed` when we closed it; after ``aclose()``
  always ``ConnectionClosed``.
"""

from __future__ import annotations

import math
import os
import socket as _socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType

import trio

from ._errors import (
    ConnectionBroken,
    ConnectionClosed,
    ConnectionEnded,
    LocalProtocolError,
    ProtocolError,
)
from ._frame import MAX_MESSAGE_SIZE
from ._protocol import ClientConnection, ClientSnapshot
from ._status import Code, RPCError
from ._wire import Response

__all__ = ["Client", "ClientHandover", "Metadata", "PendingCall", "connect_unix"]

_RECEIVE_SIZE = 65536

Metadata = Mapping[str, str | Sequence[str]]


class _Call:
    """One pending call: filled in by whichever task is reading."""

    __slots__ = ("done", "error", "response", "wakeup")

    def __init__(self) -> None:
        self.done = False
        self.response: Response | None = None
        self.error: ConnectionEnded | None = None
        self.wakeup = trio.Event()

    def finish(self, response: Response | None, error: ConnectionEnded | None) -> None:
        self.response = response
        self.error = error
        self.done = True
        self.wakeup.set()


class PendingCall:
    """A request written and not yet answered (:meth:`Client.send`)."""

    __slots__ = ("call", "label", "stream_id")

    def __init__(self, stream_id: int, call: _Call, label: str) -> None:
        self.stream_id = stream_id
        self.call = call
        self.label = label

    @property
    def answered(self) -> bool:
        """The answer came (or the connection ended: then it never will)."""
        return self.call.done

    def outcome(self) -> bytes:
        """The answered call's payload; its status or connection error raised."""
        call = self.call
        if call.error is not None:
            raise call.error
        assert call.response is not None
        status = call.response.status
        if status is not None and status.code != Code.OK:
            raise RPCError(status.code, status.message, status.details)
        return call.response.payload


@dataclass(frozen=True)
class ClientHandover:
    """A client connection for a successor process: its fd and protocol state."""

    fd: int
    snapshot: ClientSnapshot


def _metadata_pairs(metadata: Metadata | None) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    if metadata:
        for name, value in metadata.items():
            # Go's ttrpc MD lowercases keys when set and looked up.
            key = name.lower()
            if isinstance(value, str):
                pairs.append((key, value))
            else:
                pairs.extend((key, item) for item in value)
    return pairs


class Client:
    """A ttrpc client over an established trio stream (see the module docstring)."""

    def __init__(
        self, stream: trio.abc.Stream, *, max_message_size: int = MAX_MESSAGE_SIZE
    ) -> None:
        self._stream = stream
        self._proto = ClientConnection(max_message_size)
        self._send_lock = trio.StrictFIFOLock()
        self._calls: dict[int, _Call] = {}
        self._waiters: dict[_Call, None] = {}  # waiting, not reading; FIFO
        self._reading = False
        self._failure: tuple[type[ConnectionEnded], str, BaseException | None] | None = None

    # -- lifecycle ----------------------------------------------------------

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        """True once the connection can no longer carry calls."""
        return self._failure is not None

    async def aclose(self) -> None:
        """Close the connection; pending and later calls get ``ConnectionClosed``."""
        self._fail(ConnectionClosed, "ttrpc client closed locally", None)
        self._failure = (ConnectionClosed, "ttrpc client closed locally", None)
        await trio.aclose_forcefully(self._stream)

    def _error(self) -> ConnectionEnded:
        assert self._failure is not None
        kind, message, cause = self._failure
        error = kind(message)
        error.__cause__ = cause
        return error

    def _fail(self, kind: type[ConnectionEnded], message: str, cause: BaseException | None) -> None:
        """Mark the connection dead (first failure wins) and fail pending calls."""
        if self._failure is not None:
            return
        self._failure = (kind, message, cause)
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call.finish(None, self._error())

    async def _fail_and_close(
        self, kind: type[ConnectionEnded], message: str, cause: BaseException | None
    ) -> None:
        self._fail(kind, message, cause)
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self._stream)

    # -- calls --------------------------------------------------------------

    async def call(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> bytes:
        """Call ``/service/method`` with ``payload``; return the response payload.

        Raises :class:`RPCError` for a non-OK status (``DEADLINE_EXCEEDED`` when
        ``timeout`` seconds pass first, ``RESOURCE_EXHAUSTED`` for a request too
        large to send), :class:`ConnectionBroken` / :class:`ConnectionClosed`
        when the connection is gone.  A call that times out or is cancelled is
        abandoned: its late answer is dropped.
        """
        if timeout is not None and timeout <= 0:
            raise RPCError(Code.DEADLINE_EXCEEDED, f"/{service}/{method}: timeout {timeout}s")
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        pending: PendingCall | None = None
        try:
            with trio.move_on_at(deadline):
                pending = await self.send(service, method, payload, timeout=timeout,
                                          metadata=metadata, _deadline=deadline)
                await self._wait(pending.call)
        finally:
            if pending is not None and not pending.answered:
                self.abandon(pending)
        if pending is None and self._failure is not None:
            raise self._error()  # the write was cut off: the connection closed
        if pending is None or not pending.answered:
            raise RPCError(
                Code.DEADLINE_EXCEEDED,
                f"/{service}/{method}: no response within {timeout}s (local deadline)",
            )
        return pending.outcome()

    async def send(
        self,
        service: str,
        method: str,
        payload: bytes,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        _deadline: float = math.inf,
    ) -> PendingCall:
        r"""Write a request and return it pending: :meth:`result` waits for its answer.

        ``timeout`` is only sent (``timeout_nano``, from now); waiting is the
        caller's.  A pending call stays owed until answered, abandoned (:meth:`abandon`) or
        the connection ends, however often :meth:`result` gives up waiting: so
        one request can be waited for again, never sent twice.
        """
        if self._failure is not None:
            raise self._error()
        pairs = _metadata_pairs(metadata)
        call = _Call()
        async with self._send_lock:
            if self._failure is not None:
                raise self._error()
            timeout_nano = 0
            if timeout is not None:
                left = timeout if _deadline == math.inf else _deadline - trio.current_time()
                timeout_nano = max(1, int(left * 1e9))
            try:
                stream_id, data = self._proto.send_request(
                    service, method, payload, timeout_nano=timeout_nano, metadata=pairs
                )
            except LocalProtocolError as exc:
                raise RPCError(Code.RESOURCE_EXHAUSTED, f"/{service}/{method}: {exc}") from exc
            self._calls[stream_id] = call
            pending = PendingCall(stream_id, call, f"/{service}/{method}")
            try:
                await self._send(data)
            except BaseException:
                if not call.done:  # a write that never happened (or broke) is not owed
                    self.abandon(pending)
                raise
        return pending

    async def result(self, pending: PendingCall, *, timeout: float | None = None) -> bytes:
        """Wait for ``pending``'s answer; its payload, or the errors of :meth:`call`.

        When ``timeout`` passes first this raises ``RPCError(DEADLINE_EXCEEDED)``
        and the call stays pending (cancelled likewise): wait for it again later.
        """
        if not pending.answered:
            if self._failure is not None:
                raise self._error()
            with trio.move_on_after(math.inf if timeout is None else timeout):
                await self._wait(pending.call)
            if not pending.answered:
                raise RPCError(
                    Code.DEADLINE_EXCEEDED,
                    f"{pending.label}: no response within {timeout}s (still pending)",
                )
        return pending.outcome()

    def abandon(self, pending: PendingCall) -> None:
        """Stop waiting for ``pending`` for good: its late answer is dropped."""
        if not pending.call.done:
            self._calls.pop(pending.stream_id, None)
            self._proto.abandon(pending.stream_id)

    # -- handing the connection over (an in-place upgrade) --------------------

    def handover(self) -> ClientHandover:
        """This connection for a successor process (:meth:`adopt`), with the calls
        still owed.  Nothing may be reading or writing; the client is left as it was
        (the fd is the caller's to make inheritable)."""
        if self._failure is not None:
            raise self._error()
        if self._reading or self._send_lock.locked():
            raise RuntimeError("a connection in use cannot be handed over")
        socket_ = getattr(self._stream, "socket", None)
        if socket_ is None:
            raise RuntimeError(f"a {type(self._stream).__name__} cannot be handed over")
        return ClientHandover(socket_.fileno(), self._proto.snapshot())

    @classmethod
    def adopt(cls, handover: ClientHandover, *,
              max_message_size: int = MAX_MESSAGE_SIZE) -> tuple[Client, dict[int, PendingCall]]:
        """The client :meth:`handover` described, and its pending calls by stream id."""
        sock = _socket.socket(fileno=handover.fd)
        try:
            os.set_inheritable(handover.fd, False)
            client = cls(trio.SocketStream(trio.socket.from_stdlib_socket(sock)),
                         max_message_size=max_message_size)
            client._proto.restore(handover.snapshot)
        except BaseException:
            sock.detach()  # the fd stays the caller's (its state still names it)
            raise
        pending = {}
        for stream_id in handover.snapshot.pending:
            call = client._calls[stream_id] = _Call()
            pending[stream_id] = PendingCall(stream_id, call, f"stream {stream_id} (handed over)")
        return client, pending

    async def _send(self, data: bytes) -> None:
        # No new cancellation can arrive between this check and send_all's
        # first attempt (same task step), so a Cancelled escaping send_all means
        # the write blocked part-way: the stream is then in an unknown state.
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            await self._stream.send_all(data)
        except trio.BrokenResourceError as exc:
            await self._fail_and_close(
                ConnectionBroken, f"connection broken by the peer: {exc.__cause__ or exc}", exc
            )
            raise self._error() from exc
        except trio.ClosedResourceError as exc:
            self._fail(ConnectionClosed, "ttrpc client closed locally", exc)
            raise self._error() from exc
        except trio.Cancelled:
            await self._fail_and_close(
                ConnectionClosed,
                "a request write was cancelled part-way; the connection was closed",
                None,
            )
            raise

    async def _wait(self, call: _Call) -> None:
        try:
            while not call.done:
                if self._reading:
                    self._waiters[call] = None
                    await call.wakeup.wait()
                    self._waiters.pop(call, None)
                    if not call.done:
                        call.wakeup = trio.Event()
                else:
                    self._reading = True
                    try:
                        await self._read_until(call)
                    finally:
                        self._reading = False
        finally:
            self._waiters.pop(call, None)
            if not self._reading and self._waiters:
                next(iter(self._waiters)).wakeup.set()

    async def _read_until(self, call: _Call) -> None:
        while not call.done:
            try:
                data = await self._stream.receive_some(_RECEIVE_SIZE)
            except trio.BrokenResourceError as exc:
                await self._fail_and_close(
                    ConnectionBroken, f"connection broken by the peer: {exc.__cause__ or exc}", exc
                )
                return
            except trio.ClosedResourceError as exc:
                self._fail(ConnectionClosed, "ttrpc client closed locally", exc)
                return
            try:
                events = self._proto.receive_data(data)
            except ProtocolError as exc:
                if exc.remote:
                    await self._fail_and_close(
                        ConnectionBroken, f"peer violated the ttrpc protocol: {exc}", exc
                    )
                else:
                    await self._fail_and_close(
                        ConnectionClosed, f"local ttrpc protocol error: {exc}", exc
                    )
                return
            for event in events:
                waiting = self._calls.pop(event.stream_id, None)
                if waiting is not None:
                    waiting.finish(event.response, None)
            if not data:
                await self._fail_and_close(ConnectionBroken, "peer closed the connection", None)
                return


async def connect_unix(
    path: str | os.PathLike[str], *, max_message_size: int = MAX_MESSAGE_SIZE
) -> Client:
    """Connect to a ttrpc server on the unix socket ``path``, as ``connect(2)`` takes it
    (a leading NUL names an abstract socket).

    Addresses (``unix://...``, ``@name``) are parsed by the caller
    (:func:`supervisor.launch.address.socket_path`): this package imports
    nothing else of ours.
    """
    stream = await trio.open_unix_socket(os.fspath(path))
    return Client(stream, max_message_size=max_message_size)
