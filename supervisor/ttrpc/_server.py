"""The trio ttrpc server: accept connections, answer each request as it comes.

Structure (one nursery level per line)::

    serve(listener)        accept loop; one task per accepted connection
      serve_stream(stream) peer check, then a reader loop feeding ServerConnection
        reader             the one task reading; answers in itself each request
                           whose handler does not wait (State: most of them)
        call task          the reader that met a handler which waits: it stays
                           with that call, a new reader reads on

A request is run in the reader up to the first point where its handler waits
(a trio checkpoint): if it has finished by then (answer written), the reader
reads on; if not, the reader hands reading over to a new task and becomes that
call's task.  Either way the call runs the same code (handler under its
deadline, then reply), so everything below holds for both; calls handed back
by a successor (``adopt``) or resumed after a quiesce get a task each.

Behaviour and invariants:

* Requests of one connection run concurrently and are answered as they finish,
  in any order (containerd parks ``Wait`` on a connection for hours).  Writes to
  a connection are serialised by one FIFO lock, so frames never interleave; a
  write is only ever interrupted when the whole connection is being torn down.
  When the lock is free, a reply takes it without a checkpoint and writes what
  the socket takes at once; only what did not fit waits (holding the lock).  So
  a reply may still be written after the connection began closing (it is
  closed once the reader's task gets to a checkpoint).
* ``timeout_nano`` becomes the call's deadline: the handler runs in a cancel
  scope with that deadline and, if it is cancelled by it, the reply is
  ``DEADLINE_EXCEEDED``.  A negative timeout is already expired; zero means none.
* Unknown service or method -> ``UNIMPLEMENTED`` (``service X`` / ``method Y``
  not found); a handler raising :class:`RPCError` -> that status; any other
  ``Exception`` -> ``UNKNOWN`` with its text, logged with its traceback; a
  handler returning something that is not bytes-like -> ``INTERNAL``.  None of
  these affect the connection.
* Oversized requests, even or reused stream ids and undecodable request bodies
  are answered with a status by the protocol layer; the connection stays up.
* A framing error (garbage, unknown message type, the peer vanishing
  mid-frame), a broken socket or the peer closing its side ends *that*
  connection only, with its reason logged (logger ``supervisor.ttrpc``); its
  in-flight handlers are cancelled since nobody is left to read their answers.
* A peer check runs before the first byte is read.  The default refuses unix
  socket peers whose SO_PEERCRED uid is not our effective uid, and any other
  kind of socket; streams that are not sockets (in-memory) are in-process and
  accepted.  Refusals close the connection and are logged.
* A peer's load is bounded by :class:`Limits` (defaults and their reasons in
  ``_limits``), with backpressure rather than errors: a connection with
  ``max_calls`` calls unanswered, or holding ``max_buffered_bytes`` bytes
  (``ServerConnection.buffered_bytes``: undecoded input, unanswered requests,
  unwritten responses), is not read until a call finishes; the peer's writes
  then block in the kernel.  Reading never pauses while nothing is in flight,
  so one message above the byte limit still gets through; a connection thus
  holds at most ``max(max_buffered_bytes, 10 + MAX_MESSAGE_SIZE) + 64 KiB``.
  While reading is paused, a peer that closed its side is noticed only once a
  call finishes and reading resumes.
* At most ``max_connections`` connections are served; one more is accepted and
  closed at once (logged), the listener left alone.  We refuse the newcomer
  rather than evict an idle connection because the oldest idle one is likely
  containerd's, and containerd treats a closed connection as a dead shim.
* Idle rule: a connection that has not sent one complete request within
  ``first_request_timeout`` of being accepted is closed (containerd calls as
  soon as it connects).  A connection that has sent a request is never closed
  for idleness: containerd's may be idle for days.  Connections that never
  speak thus free their slot; those that did are bounded by the cap.
* ``shutdown(grace)``: stop accepting, close idle connections, answer new
  requests ``UNAVAILABLE``, let in-flight calls finish and close each
  connection as it becomes idle; when ``grace`` seconds pass first, cancel
  what remains and close everything.
* Handing over (an in-place upgrade, :mod:`supervisor.upgrade`):
  ``quiesce(timeout)`` stops accepting (the listener stays open) and reading
  (a read under way is cancelled; bytes read stay unparsed in the protocol
  object), waits for every call in flight except the *resumable* ones
  (``register(..., resumable=...)``: Task ``Wait`` blocks for weeks), whose
  replies are written, then cancels the resumable ones with no reply written.
  ``export()`` then describes every connection (:class:`HandedOver`: stream,
  unparsed bytes, the cancelled calls with the time left of their deadlines)
  without closing anything; a successor's ``adopt(listener, handed)`` parses
  those bytes and runs those calls first, so each call is answered exactly
  once, by whichever side serves last.  ``resume()`` calls the hand-over off
  and runs the cancelled calls again in place; a quiesce that times out
  resumes by itself.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import math
import os
import socket
import struct
import types
from collections.abc import (
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Generator,
    Iterable,
    Mapping,
)
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from ._errors import LocalProtocolError, ProtocolError
from ._limits import DEFAULT_LIMITS, Limits
from ._protocol import (
    RequestReceived,
    RequestRejected,
    ServerConnection,
    ServerEvent,
    ServerSnapshot,
)
from ._status import Code, RPCError
from ._wire import Request

__all__ = [
    "NAMESPACE_KEY",
    "CallContext",
    "HandedOver",
    "Handler",
    "PeerCheck",
    "PeerCredentials",
    "Server",
    "open_unix_listener",
    "peer_credentials",
    "require_same_uid",
    "require_uid",
]

NAMESPACE_KEY = "containerd-namespace-ttrpc"
LOGGER_NAME = "supervisor.ttrpc"
_RECEIVE_SIZE = 65536
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class CallContext:
    """What a handler knows about its call.

    ``deadline`` is on trio's clock (compare with ``trio.current_time()``), or
    ``None`` when the client sent no timeout.  ``metadata`` maps each key, as
    sent, to its values in wire order.
    """

    service: str
    method: str
    metadata: dict[str, list[str]]
    deadline: float | None
    stream_id: int

    @property
    def namespace(self) -> str | None:
        """containerd's namespace for the call (first ``containerd-namespace-ttrpc``)."""
        values = self.metadata.get(NAMESPACE_KEY)
        return values[0] if values else None


Handler = Callable[[CallContext, bytes], Awaitable[bytes]]
"""A method implementation: request payload in, response payload out."""

PeerCheck = Callable[[trio.abc.Stream], str | None]
"""Inspect a new connection; return a refusal reason, or ``None`` to accept."""


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """SO_PEERCRED of a unix socket peer (as of its ``connect``)."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class HandedOver:
    """One connection of a quiesced server, for a successor (:meth:`Server.export`).

    ``stream`` is still open and served by nobody; ``snapshot`` holds the bytes
    read and not yet parsed; ``calls`` are the resumable calls that were in
    flight, cancelled with no reply written, each with the time left of its
    deadline in ``timeout_nano`` (0: none; negative: already expired), to run
    again as if just received.  ``spoke``: the peer has sent a request (so the
    idle rule no longer applies to it).
    """

    stream: trio.abc.Stream
    snapshot: ServerSnapshot
    calls: tuple[tuple[int, Request], ...] = ()
    spoke: bool = True

    @property
    def fileno(self) -> int:
        """The socket's fd (-1 for a stream that is not a socket, as in tests)."""
        if isinstance(self.stream, trio.SocketStream):
            return self.stream.socket.fileno()
        return -1


@dataclass(eq=False, slots=True)
class _Call:
    """A resumable call in flight: cancelled at a quiesce, and handed over unanswered."""

    request: Request
    deadline: float | None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    handing_over: bool = False


def peer_credentials(stream: trio.abc.Stream) -> PeerCredentials | None:
    """The peer's credentials if ``stream`` is a unix socket, else ``None``."""
    if not isinstance(stream, trio.SocketStream) or stream.socket.family != socket.AF_UNIX:
        return None
    raw = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCredentials(*_UCRED.unpack(raw))


def require_uid(uid: int) -> PeerCheck:
    """A peer check admitting unix socket peers whose uid is ``uid``.

    Non-unix sockets are refused (they carry no credentials); streams that are
    not sockets at all are in-process and admitted.
    """

    def check(stream: trio.abc.Stream) -> str | None:
        if not isinstance(stream, trio.SocketStream):
            return None
        creds = peer_credentials(stream)
        if creds is None:
            return "not a unix socket, so the peer's credentials cannot be checked"
        if creds.uid != uid:
            return f"peer uid {creds.uid} (pid {creds.pid}) is not the required uid {uid}"
        return None

    return check


def require_same_uid(stream: trio.abc.Stream) -> str | None:
    """The default peer check: the peer's uid must be our effective uid."""
    return require_uid(os.geteuid())(stream)


async def open_unix_listener(
    path: str | os.PathLike[str], *, backlog: int = 128
) -> trio.SocketListener:
    """Bind and listen on the unix socket ``path``, as ``bind(2)`` takes it (a leading
    NUL names an abstract socket; callers parse addresses, as for :func:`connect_unix`)."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(os.fspath(path))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


@types.coroutine
def _go_on(coroutine: Coroutine[Any, Any, None], trap: Any) -> Generator[Any, Any, None]:
    """Await ``coroutine``, which already ran up to a wait that yielded ``trap``.

    ``yield from`` for a coroutine started with ``send(None)``: the trap goes to
    trio as if the awaiting task had yielded it (it did: the coroutine ran in
    that task), and whatever trio sends or throws back goes on into it.
    """
    message = trap
    while True:
        try:
            sent = yield message
        except GeneratorExit:
            coroutine.close()
            raise
        except BaseException as exc:
            try:
                message = coroutine.throw(exc)
            except StopIteration:
                return
        else:
            try:
                message = coroutine.send(sent)
            except StopIteration:
                return


def _describe(stream: trio.abc.Stream, number: int) -> str:
    try:
        creds = peer_credentials(stream)
    except OSError:
        creds = None
    if creds is None:
        return f"connection #{number}"
    return f"connection #{number} (pid {creds.pid}, uid {creds.uid})"


class _Connection:
    """One served connection: reader loop, call tasks, serialised writes."""

    def __init__(self, server: Server, stream: trio.abc.Stream, name: str) -> None:
        self.server = server
        self.stream = stream
        self.name = name
        limits = server.limits
        self.proto = ServerConnection(
            max_calls=limits.max_calls, max_buffered_bytes=limits.max_buffered_bytes
        )
        # Reading waits on this while the limits hold it back; set as calls finish.
        self.progress = trio.Event()
        self.send_lock = trio.StrictFIFOLock()
        self.scope = trio.CancelScope()
        self.active = 0  # requests accepted and not yet answered
        self.draining = False
        self.close_reason = ""
        self.close_level = logging.DEBUG
        self.spoke = False  # a complete request has arrived (the idle rule no longer applies)
        self.parked = False  # the reader stopped for a quiesce
        self._read_scope: trio.CancelScope | None = None
        self.nursery: trio.Nursery | None = None
        self.resumable: dict[int, _Call] = {}  # stream id -> resumable call running
        self.handed_over: dict[int, _Call] = {}  # stream id -> resumable call cancelled

    def close(self, reason: str, level: int = logging.INFO) -> None:
        """Tear the connection down now (idempotent; the first reason wins)."""
        if not self.close_reason:
            self.close_reason = reason
            self.close_level = level
        self.scope.cancel()

    def pause_reading(self) -> None:
        """Stop reading (a quiesce): the reader parks until :meth:`Server.resume`."""
        if self._read_scope is not None:
            self._read_scope.cancel()

    @property
    def settled(self) -> bool:
        """Quiesced: the reader parked, and only resumable calls still running."""
        return self.parked and self.active == len(self.resumable)

    def hand_over(self) -> None:
        """Cancel the resumable calls in flight; each ends with no reply written."""
        for call in self.resumable.values():
            call.handing_over = True
            call.scope.cancel()

    def redispatch(self) -> None:
        """Run the calls handed over again, in place (the quiesce was called off)."""
        calls, self.handed_over = self.handed_over, {}
        self._dispatch(RequestReceived(stream_id, call.request)
                       for stream_id, call in sorted(calls.items()))

    def _dispatch(self, events: Iterable[ServerEvent]) -> None:
        """Answer each event in a task of its own, counted in :attr:`active`."""
        for event in events:
            self.active += 1
            assert self.nursery is not None
            self.nursery.start_soon(self._answer, event)

    def export(self) -> HandedOver:
        """This connection, handed over whole (the server is quiesced)."""
        now = trio.current_time()
        calls = []
        for stream_id, call in sorted(self.handed_over.items()):
            timeout = 0
            if call.deadline is not None:
                timeout = int((call.deadline - now) * 1e9) or -1
            calls.append((stream_id, replace(call.request, timeout_nano=timeout)))
        return HandedOver(self.stream, self.proto.snapshot(), tuple(calls), self.spoke)

    def drain(self) -> None:
        """Start graceful shutdown: refuse new calls, close once idle."""
        self.draining = True
        if self.active == 0:
            self.close("server shut down", logging.DEBUG)

    async def run(self, initial: Iterable[ServerEvent] = ()) -> None:
        """Serve until the peer leaves, the protocol breaks or we close it.

        ``initial``: events to run first (calls handed over by a predecessor).
        """
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    self.nursery = nursery
                    self._dispatch(initial)
                    # What a predecessor had received (adopted) comes first.
                    await self._read(self.proto.events())
        finally:
            reason = self.close_reason or "cancelled"
            self.server.logger.log(self.close_level, "ttrpc %s: closed: %s", self.name, reason)
            await trio.aclose_forcefully(self.stream)

    async def _read(self, events: list[ServerEvent]) -> None:
        """Be the connection's reader, answering ``events`` first (see :meth:`_read_loop`).

        When the connection ends it is closed: nobody is left to read answers,
        so the handlers in flight are cancelled.
        """
        ended = await self._read_loop(events)
        if ended is not None:
            self.close(*ended)

    async def _read_loop(self, events: list[ServerEvent]) -> tuple[str, int] | None:
        """Read until the connection ends; return (reason, log level).

        The requests read are answered in this task, one after another
        (:meth:`_answer_inline`), until one has to wait: a new task then goes on
        reading, this one stays with that call and returns ``None`` once it
        is answered.  So there is always exactly one reader.

        Reads only while ``proto.can_receive``: otherwise it waits for a call
        to finish (backpressure).  Until the first request arrives, reading
        runs under the first-request deadline.  While the server is quiesced
        it parks at the top of the loop (a read under way is cancelled, which
        loses no byte: what was read is in ``proto``).
        """
        timeout = self.server.limits.first_request_timeout
        first_deadline = math.inf if self.spoke else trio.current_time() + timeout
        paused_at_cap = False
        while True:
            if events:
                first_deadline = math.inf
                self.spoke = True
                if not await self._answer_inline(events):
                    return None  # this task went on with a call; another one reads
            events = []
            if self.server.quiescing:
                await self._park()
                continue
            data: bytes | bytearray | None = None  # None: no read this round
            with trio.CancelScope() as reading:
                self._read_scope = reading
                try:
                    if self.proto.can_receive:
                        paused_at_cap = False
                        if first_deadline == math.inf:
                            data = await self._receive()
                        else:
                            with trio.move_on_at(first_deadline):
                                data = await self._receive()
                        if data is None:
                            return (f"sent no request within {timeout:g}s of connecting",
                                    logging.INFO)
                        events = self.proto.receive_data(data)
                    else:
                        if not paused_at_cap and self.proto.outstanding >= self.proto.max_calls:
                            paused_at_cap = True
                            self.server.logger.warning(
                                "ttrpc %s: %d calls unanswered (the limit); "
                                "not reading more until one finishes",
                                self.name,
                                self.proto.outstanding,
                            )
                        await self.progress.wait()
                        events = self.proto.events()
                except trio.BrokenResourceError as exc:
                    return f"connection broken by the peer: {exc.__cause__ or exc}", logging.INFO
                except trio.ClosedResourceError:
                    return "connection closed locally", logging.DEBUG
                except ProtocolError as exc:
                    whose = "peer" if exc.remote else "local"
                    return f"{whose} protocol violation: {exc}", logging.WARNING
                finally:
                    self._read_scope = None
            if data is not None and not data:
                self._dispatch(events)
                return "peer closed the connection", logging.DEBUG

    async def _answer_inline(self, events: list[ServerEvent]) -> bool:
        """Answer ``events`` in this task (the reader's) while their calls do not wait.

        Most calls (``State``) finish without waiting for anything, and a task of
        their own would cost more than the call.  Each runs as :meth:`_answer`
        would in its own task, up to its first wait: if it finishes there, it
        was answered; if not, this task hands reading over to a new task (which
        answers the events left first) and goes on with the call.  Returns
        whether every event was answered here.  Calls run here share the
        reader's contextvars context (nothing in a handler sets one).
        """
        for i, event in enumerate(events):
            self.active += 1
            answer = self._answer(event)
            try:
                trap = answer.send(None)
            except StopIteration:
                continue
            assert self.nursery is not None
            self.nursery.start_soon(self._read, events[i + 1:])
            await _go_on(answer, trap)
            return False
        return True

    async def _park(self) -> None:
        self.parked = True
        self.server._notify()
        try:
            await self.server._resumed.wait()
        finally:
            self.parked = False

    async def _answer(self, event: ServerEvent) -> None:
        try:
            if isinstance(event, RequestRejected):
                self.server.logger.info(
                    "ttrpc %s: rejected request on stream %d: %s %s",
                    self.name,
                    event.stream_id,
                    event.code.name,
                    event.message,
                )
                await self._reply(event.stream_id, b"", event.code, event.message)
            elif self.draining:
                await self._reply(
                    event.stream_id, b"", Code.UNAVAILABLE, "ttrpc: server is shutting down"
                )
            else:
                await self._run_call(event)
        finally:
            self.active -= 1
            if self.draining and self.active == 0:
                self.close("server shut down", logging.DEBUG)
            if self.server.quiescing:
                self.server._notify()

    async def _run_call(self, event: RequestReceived) -> None:
        request = event.request
        metadata: dict[str, list[str]] = {}
        for key, value in request.metadata:
            metadata.setdefault(key, []).append(value)
        deadline: float | None = None
        if request.timeout_nano:
            deadline = trio.current_time() + request.timeout_nano / 1e9
        context = CallContext(request.service, request.method, metadata, deadline, event.stream_id)
        handler, missing = self.server.lookup(request.service, request.method)
        if handler is None:
            await self._reply(event.stream_id, b"", Code.UNIMPLEMENTED, missing)
            return
        code = Code.OK
        message = ""
        details: tuple[tuple[str, bytes], ...] = ()
        payload = b""
        call: _Call | None = None
        if self.server.is_resumable(request.service, request.method):
            call = _Call(request, deadline)
            self.resumable[event.stream_id] = call
        # A scope only where something can cancel the call: its deadline, or a
        # quiesce (a resumable call); a call with neither needs none.
        scope = call.scope if call is not None else None
        if deadline is not None:
            scope = scope or trio.CancelScope()
            scope.deadline = deadline
        with scope if scope is not None else contextlib.nullcontext():
            try:
                result = await handler(context, request.payload)
            except RPCError as exc:
                code, message, details = exc.code, exc.message, exc.details
            except Exception as exc:
                self.server.logger.exception(
                    "ttrpc %s: handler for /%s/%s failed",
                    self.name,
                    request.service,
                    request.method,
                )
                code, message = Code.UNKNOWN, str(exc) or type(exc).__name__
            else:
                if isinstance(result, bytes | bytearray | memoryview):
                    payload = bytes(result)
                else:
                    self.server.logger.error(
                        "ttrpc %s: handler for /%s/%s returned %s, not bytes",
                        self.name,
                        request.service,
                        request.method,
                        type(result).__name__,
                    )
                    code = Code.INTERNAL
                    message = f"handler returned {type(result).__name__}, not bytes"
        if call is not None:
            del self.resumable[event.stream_id]
            if call.handing_over and call.scope.cancelled_caught:
                # No reply: whoever serves next (a successor, or this server resumed)
                # runs the call again.
                self.handed_over[event.stream_id] = call
                if not self.server.quiescing:
                    self.redispatch()
                return
        if scope is not None and scope.cancelled_caught:
            code, message, details, payload = Code.DEADLINE_EXCEEDED, "deadline exceeded", (), b""
        await self._reply(event.stream_id, payload, code, message, details)

    async def _reply(
        self,
        stream_id: int,
        payload: bytes,
        code: Code,
        message: str,
        details: tuple[tuple[str, bytes], ...] = (),
    ) -> None:
        try:
            data = self.proto.send_response(
                stream_id, payload, code=code, message=message, details=details
            )
        except LocalProtocolError as exc:
            # Our answer does not fit a ttrpc message: tell the client so instead.
            self.server.logger.warning(
                "ttrpc %s: response on stream %d dropped: %s", self.name, stream_id, exc
            )
            data = self.proto.send_response(
                stream_id, code=Code.RESOURCE_EXHAUSTED, message=f"response too large: {exc}"
            )
        try:
            if self.send_lock.locked():
                async with self.send_lock:
                    await self.stream.send_all(data)
            else:
                # Nobody is writing (an unlocked trio lock has no waiters): take the
                # lock without a checkpoint and write what the socket takes now;
                # only a rest that did not fit waits, still holding the lock.
                self.send_lock.acquire_nowait()
                try:
                    written = self._write_now(data)
                    if written < len(data):
                        await self.stream.send_all(memoryview(data)[written:])
                finally:
                    self.send_lock.release()
        except trio.BrokenResourceError as exc:
            self.close(f"connection broken by the peer while replying: {exc.__cause__ or exc}")
        except trio.ClosedResourceError:
            self.close("connection closed locally while replying")
        finally:
            # Written, or never will be (the connection is closing): no longer held.
            self.proto.response_written(len(data))
            self.progress.set()
            self.progress = trio.Event()

    async def _receive(self) -> bytes | bytearray:
        """The next bytes from the peer (``b""``: it closed its side), as ``receive_some``.

        On a socket: wait until it is readable, then read once -- where
        ``receive_some`` reads first, fails (nothing there yet, as it is after
        each request), waits, reads again and then checkpoints once more.
        Errors as ``receive_some``'s: :class:`trio.ClosedResourceError` once
        closed here, :class:`trio.BrokenResourceError` for a socket error.
        """
        if not isinstance(self.stream, trio.SocketStream):
            return await self.stream.receive_some(_RECEIVE_SIZE)
        sock = self.stream.socket
        while True:
            await trio.lowlevel.wait_readable(sock)
            fd = sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("socket was closed")
            try:
                return os.read(fd, _RECEIVE_SIZE)
            except BlockingIOError:
                continue  # woken with nothing to read: wait again
            except OSError as exc:
                raise trio.BrokenResourceError(f"socket read failed: {exc}") from exc

    def _write_now(self, data: bytes) -> int:
        """Write what a socket takes without blocking; how many bytes that was.

        As ``send_all`` would, a socket error raises :class:`trio.BrokenResourceError`
        and a socket closed here :class:`trio.ClosedResourceError`.  A stream that
        is not a socket (in-memory, in tests) takes nothing here.
        """
        if not isinstance(self.stream, trio.SocketStream):
            return 0
        fd = self.stream.socket.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("socket was closed")
        try:
            return os.write(fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket write failed: {exc}") from exc


class Server:
    """A ttrpc server; see the module docstring for its behaviour."""

    def __init__(
        self,
        *,
        peer_check: PeerCheck = require_same_uid,
        logger: logging.Logger | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.logger = logger if logger is not None else logging.getLogger(LOGGER_NAME)
        self.limits = limits
        self._peer_check = peer_check
        self._services: dict[str, dict[str, Handler]] = {}
        self._resumable: set[tuple[str, str]] = set()
        self._connections: set[_Connection] = set()
        self._accept_scopes: set[trio.CancelScope] = set()
        self._serving = 0
        self._closing = False
        self._changed = trio.Event()
        self._numbers = itertools.count(1)
        self.quiescing = False
        self.quiesced = False
        self._resumed = trio.Event()
        self._accept_parked = 0  # accept loops waiting for resume()
        self._unregistered = 0  # accepted streams not yet in _connections

    def register(self, service: str, methods: Mapping[str, Handler], *,
                 resumable: Collection[str] = ()) -> None:
        """Add a service (fully qualified name) and its methods.

        ``resumable``: methods a quiesce does not wait for (they may block for
        weeks, like Task ``Wait``): cancelled with no reply, and handed over
        (:meth:`export`) to be run again.  Only a method whose effect is all in
        its answer may be resumable: it must be safe to run twice.
        """
        if service in self._services:
            raise ValueError(f"service {service!r} is already registered")
        unknown = set(resumable) - set(methods)
        if unknown:
            raise ValueError(f"resumable methods {sorted(unknown)} are not in {service!r}")
        self._services[service] = dict(methods)
        self._resumable.update((service, m) for m in resumable)

    def is_resumable(self, service: str, method: str) -> bool:
        return (service, method) in self._resumable

    def lookup(self, service: str, method: str) -> tuple[Handler | None, str]:
        """The handler for a call, or ``None`` and the UNIMPLEMENTED message."""
        methods = self._services.get(service)
        if methods is None:
            return None, f"service {service} not found"
        handler = methods.get(method)
        if handler is None:
            return None, f"method {method} not found in service {service}"
        return handler, ""

    @property
    def connections(self) -> int:
        """Connections currently being served."""
        return len(self._connections)

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for peers: undecoded input, unanswered requests, unwritten responses."""
        return sum(connection.proto.buffered_bytes for connection in self._connections)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def serve(
        self,
        listener: trio.SocketListener | trio.abc.Listener[trio.abc.Stream],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept and serve connections until :meth:`shutdown`; closes ``listener``.

        Returns once accepting stopped and every connection it accepted ended.
        """
        await self.adopt(listener, (), task_status=task_status)

    async def adopt(
        self,
        listener: trio.SocketListener | trio.abc.Listener[trio.abc.Stream],
        connections: Iterable[HandedOver],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """:meth:`serve`, going on with ``connections`` a predecessor handed over.

        Each connection's unparsed bytes are parsed first and its calls run again
        as if just received; there is no peer check (the predecessor made it).
        """
        if self._closing:
            raise trio.ClosedResourceError("ttrpc server is shut down")
        self._serving += 1
        try:
            async with trio.open_nursery() as nursery:
                for handed in connections:
                    nursery.start_soon(self._serve_handed_over, handed)
                try:
                    task_status.started()
                    await self._accept_until_closed(listener, nursery)
                finally:
                    await trio.aclose_forcefully(listener)
        finally:
            self._serving -= 1
            self._notify()

    async def _accept_until_closed(
        self,
        listener: trio.SocketListener | trio.abc.Listener[trio.abc.Stream],
        nursery: trio.Nursery,
    ) -> None:
        """Accept until shutdown or the listener closes; park while quiesced."""
        while not self._closing:
            if self.quiescing:
                self._accept_parked += 1
                self._notify()
                try:
                    await self._resumed.wait()
                finally:
                    self._accept_parked -= 1
                continue
            with trio.CancelScope() as accept_scope:
                self._accept_scopes.add(accept_scope)
                try:
                    await self._accept_loop(listener, nursery)
                    return  # the listener was closed
                finally:
                    self._accept_scopes.discard(accept_scope)

    async def _accept_loop(
        self,
        listener: trio.SocketListener | trio.abc.Listener[trio.abc.Stream],
        nursery: trio.Nursery,
    ) -> None:
        backoff = 0.0
        while True:
            try:
                stream: trio.abc.Stream = await listener.accept()
            except trio.ClosedResourceError:
                self.logger.debug("ttrpc: listener closed; no longer accepting")
                return
            except OSError as exc:
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                backoff = min(1.0, backoff * 2 or 0.01)
                self.logger.error("ttrpc: accept failed (%s); retrying in %.2fs", exc, backoff)
                await trio.sleep(backoff)
                continue
            backoff = 0.0
            self._unregistered += 1
            nursery.start_soon(self._serve_accepted, stream)

    async def _serve_accepted(self, stream: trio.abc.Stream) -> None:
        try:
            await self.serve_stream(stream, _counted=True)
        except Exception:
            # A bug in serving one connection must not stop the others; it is
            # logged with its traceback and that connection is gone.
            self.logger.exception("ttrpc: internal error while serving a connection")

    async def serve_stream(self, stream: trio.abc.Stream, *, _counted: bool = False) -> None:
        """Serve one already-connected stream until it ends; always closes it."""
        if _counted:  # accepted by our loop: registered below, or refused, without a checkpoint
            self._unregistered -= 1
            self._notify()
        name = _describe(stream, next(self._numbers))
        if self._closing:
            self.logger.info("ttrpc %s: refused: server is shutting down", name)
            await trio.aclose_forcefully(stream)
            return
        try:
            refusal = self._peer_check(stream)
        except OSError as exc:
            refusal = f"could not read the peer's credentials: {exc}"
        if refusal is None and len(self._connections) >= self.limits.max_connections:
            refusal = f"{len(self._connections)} connections are open, the limit"
        if refusal is not None:
            self.logger.warning("ttrpc %s: refused: %s", name, refusal)
            await trio.aclose_forcefully(stream)
            return
        self.logger.debug("ttrpc %s: accepted", name)
        connection = _Connection(self, stream, name)
        self._connections.add(connection)
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)
            self._notify()

    async def _serve_handed_over(self, handed: HandedOver) -> None:
        name = _describe(handed.stream, next(self._numbers)) + " (handed over)"
        connection = _Connection(self, handed.stream, name)
        try:
            connection.proto.restore(handed.snapshot)
            events = [connection.proto.owe(sid, request) for sid, request in handed.calls]
        except ProtocolError as exc:
            self.logger.error("ttrpc %s: cannot go on with it: %s", name, exc)
            await trio.aclose_forcefully(handed.stream)
            return
        connection.spoke = handed.spoke
        self._connections.add(connection)
        try:
            await connection.run(events)
        except Exception:
            self.logger.exception("ttrpc: internal error while serving a connection")
        finally:
            self._connections.discard(connection)
            self._notify()

    # --- handing over to a successor (an in-place upgrade) ---------------------

    async def quiesce(self, timeout: float) -> bool:
        """Stop at a frame boundary, for :meth:`export`; False (and serving on) on timeout.

        Stops accepting (the listener stays open) and reading (bytes read stay
        in each connection's protocol object); waits for every call in flight
        except resumable ones, whose replies are written; then cancels the
        resumable ones, which end with no reply written.  After True, nothing
        is read, written or accepted until :meth:`resume`.
        """
        if self._closing or self.quiescing:
            raise RuntimeError("ttrpc server is shutting down or quiescing already")
        self.quiescing = True
        self._resumed = trio.Event()
        for scope in list(self._accept_scopes):
            scope.cancel()
        with trio.move_on_after(timeout):
            await self._wait_for(lambda c: c.settled)
            for connection in list(self._connections):
                connection.hand_over()
            await self._wait_for(lambda c: c.parked and c.active == 0)
            self.quiesced = True
            return True
        self.resume()
        return False

    async def _wait_for(self, condition: Callable[[_Connection], bool]) -> None:
        while True:
            for connection in list(self._connections):
                connection.pause_reading()
            if (self._unregistered == 0 and self._accept_parked == self._serving
                    and all(condition(c) for c in self._connections)):
                return
            await self._changed.wait()

    def export(self) -> list[HandedOver]:
        """Every connection, for a successor (after :meth:`quiesce` returned True).

        Nothing is closed or changed: :meth:`resume` goes on as before, and a
        successor must be the only one to serve these streams once it has them.
        """
        if not self.quiesced:
            raise RuntimeError("export needs a quiesced server")
        return [connection.export() for connection in self._connections]

    def resume(self) -> None:
        """Serve again after :meth:`quiesce`: accept, read, run the calls handed over."""
        if not self.quiescing:
            return
        self.quiescing = self.quiesced = False
        for connection in list(self._connections):
            connection.redispatch()
        self._resumed.set()

    async def shutdown(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight calls finish, then close everything.

        With ``grace`` (seconds), calls still running after it are cancelled
        and their connections closed without an answer.  Returns when every
        connection and every :meth:`serve` loop has ended.
        """
        self._closing = True
        self.resume()
        for scope in list(self._accept_scopes):
            scope.cancel()
        for connection in list(self._connections):
            connection.drain()
        with trio.move_on_after(math.inf if grace is None else grace):
            await self._wait_idle()
        for connection in list(self._connections):
            connection.close(f"shutdown grace period of {grace}s expired")
        await self._wait_idle()

    async def _wait_idle(self) -> None:
        while self._connections or self._serving:
            await self._changed.wait()
