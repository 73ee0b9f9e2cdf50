"""The ttrpc server's reader answering calls itself, and replies written at once.

A call runs in the reader task up to its first wait; only a call that waits
gets a task (the reader's, while a new one reads on).  These tests script that
over a real socket pair (so replies also take the direct-write path) and check
that every invariant of a call still holds on it.
"""

from __future__ import annotations

import errno
import logging
import socket
import types
from collections.abc import AsyncIterator, Generator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from test_ttrpc_server import RawPeer

from supervisor.ttrpc import CallContext, Client, Code, Limits, RPCError, Server
from supervisor.ttrpc._server import _go_on


class Gate:
    """Handlers for one test: ``Echo`` never waits, ``Block`` waits for :meth:`open`."""

    def __init__(self) -> None:
        self.event = trio.Event()
        self.blocked: list[bytes] = []
        self.echoed: list[bytes] = []

    async def echo(self, ctx: CallContext, payload: bytes) -> bytes:
        self.echoed.append(payload)
        return payload

    async def block(self, ctx: CallContext, payload: bytes) -> bytes:
        self.blocked.append(payload)
        await self.event.wait()
        return b"opened:" + payload

    async def big(self, ctx: CallContext, payload: bytes) -> bytes:
        return bytes(range(256)) * 4096  # 1 MiB: more than the socket buffer takes

    def open(self) -> None:
        self.event.set()


def make_server(gate: Gate, limits: Limits | None = None) -> Server:
    server = Server(limits=limits or Limits())
    server.register("test.Svc", {"Echo": gate.echo, "Block": gate.block, "Big": gate.big})
    return server


@asynccontextmanager
async def socket_peer(server: Server, sndbuf: int = 0) -> AsyncIterator[RawPeer]:
    """A RawPeer on one end of a unix socket pair, ``server`` on the other."""
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    if sndbuf:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, trio.SocketStream(theirs))
        peer = RawPeer(trio.SocketStream(ours))
        yield peer
        await server.shutdown(grace=0)


class SpawnCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.spawned = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned += 1


async def test_calls_that_do_not_wait_get_no_task_of_their_own() -> None:
    gate = Gate()
    server = make_server(gate)
    counter = SpawnCounter()
    async with socket_peer(server) as peer:
        await peer.call("Echo", b"warm")
        await peer.responses(1)
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.add_instrument(counter)
        try:
            for i in range(20):
                await peer.call("Echo", b"%d" % i)
                (got,) = await peer.responses(1)
                assert got.response.payload == b"%d" % i
        finally:
            trio.lowlevel.remove_instrument(counter)
    assert counter.spawned == 0


async def test_a_call_that_waits_hands_reading_over_and_its_chunk_is_answered() -> None:
    gate = Gate()
    server = make_server(gate)
    async with socket_peer(server) as peer:
        # Three requests in one write: the first waits; the two after it in the same
        # chunk are answered by the reader that took over.
        frames = b""
        ids = []
        for method, payload in (("Block", b"b"), ("Echo", b"e1"), ("Echo", b"e2")):
            sid, data = peer.proto.send_request("test.Svc", method, payload)
            ids.append(sid)
            frames += data
        await peer.stream.send_all(frames)
        first = await peer.responses(2)
        assert [(r.stream_id, r.response.payload) for r in first] == [
            (ids[1], b"e1"), (ids[2], b"e2")]
        assert gate.blocked == [b"b"]
        # The connection still reads while Block waits.
        await peer.call("Echo", b"e3")
        (third,) = await peer.responses(1)
        assert third.response.payload == b"e3"
        gate.open()
        (last,) = await peer.responses(1)
        assert (last.stream_id, last.response.payload) == (ids[0], b"opened:b")
        assert last.response.status.code == Code.OK


async def test_an_expired_deadline_is_deadline_exceeded_for_a_call_that_waits() -> None:
    gate = Gate()
    server = make_server(gate)
    async with socket_peer(server) as peer:
        sid = await peer.call("Block", b"late", timeout_nano=-1)
        (got,) = await peer.responses(1)
        assert got.stream_id == sid
        assert got.response.status.code == Code.DEADLINE_EXCEEDED
        # The connection goes on, and a call with a deadline ahead is answered.
        await peer.call("Echo", b"ok", timeout_nano=10**10)
        (ok,) = await peer.responses(1)
        assert ok.response.status.code == Code.OK and ok.response.payload == b"ok"


async def test_a_draining_server_answers_new_calls_unavailable() -> None:
    gate = Gate()
    server = make_server(gate)
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, trio.SocketStream(theirs))
        peer = RawPeer(trio.SocketStream(ours))
        blocked = await peer.call("Block", b"b")
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(server.shutdown)
        await trio.testing.wait_all_tasks_blocked()
        refused = await peer.call("Echo", b"e")
        (got,) = await peer.responses(1)
        assert got.stream_id == refused
        assert got.response.status.code == Code.UNAVAILABLE
        assert gate.echoed == []
        gate.open()
        (done,) = await peer.responses(1)
        assert (done.stream_id, done.response.payload) == (blocked, b"opened:b")


async def test_the_call_limit_holds_back_requests_behind_a_call_that_waits() -> None:
    gate = Gate()
    server = make_server(gate, Limits(max_calls=1))
    async with socket_peer(server) as peer:
        first = await peer.call("Block", b"b")
        second = await peer.call("Echo", b"e")
        await trio.testing.wait_all_tasks_blocked()
        assert gate.blocked == [b"b"] and gate.echoed == []  # not read, or held back
        gate.open()
        got = await peer.responses(2)
        assert [(r.stream_id, r.response.payload) for r in got] == [
            (first, b"opened:b"), (second, b"e")]


async def test_a_reply_larger_than_the_socket_takes_keeps_its_frame_whole() -> None:
    gate = Gate()
    server = make_server(gate)
    async with socket_peer(server, sndbuf=4096) as peer:
        # Both requests are in before the peer reads anything: Big's reply is
        # written in part at once, the rest waits holding the lock; Echo's reply
        # waits for the lock rather than cutting into Big's frame.
        big = await peer.call("Big")
        small = await peer.call("Echo", b"small")
        await trio.testing.wait_all_tasks_blocked()
        got = await peer.responses(2)
        assert [r.stream_id for r in got] == [big, small]
        assert got[0].response.payload == bytes(range(256)) * 4096
        assert got[1].response.payload == b"small"


async def test_client_calls_through_the_reader_behave_as_before() -> None:
    gate = Gate()
    server = make_server(gate)
    server.register("test.Err", {"Fail": fail})
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, trio.SocketStream(theirs))
        async with Client(trio.SocketStream(ours)) as client:
            assert await client.call("test.Svc", "Echo", b"x") == b"x"
            with pytest.raises(RPCError) as info:
                await client.call("test.Err", "Fail", b"")
            assert info.value.code == Code.NOT_FOUND and info.value.message == "nope"
            with pytest.raises(RPCError) as missing:
                await client.call("test.Svc", "Nope", b"")
            assert missing.value.code == Code.UNIMPLEMENTED
        await server.shutdown()


async def fail(ctx: CallContext, payload: bytes) -> bytes:
    raise RPCError(Code.NOT_FOUND, "nope")


# -- _go_on: ``yield from`` for a coroutine already started --------------------


@types.coroutine
def _trap(value: Any) -> Generator[Any, Any, Any]:
    return (yield value)


async def _script(log: list[object]) -> None:
    log.append(("got", await _trap("first")))
    try:
        await _trap("second")
    except KeyError as exc:
        log.append(("caught", exc.args[0]))
    try:
        await _trap("third")
    finally:
        log.append("closed")


def test_go_on_forwards_what_is_sent_thrown_and_closed() -> None:
    log: list[object] = []
    coroutine = _script(log)
    first = coroutine.send(None)
    assert first == "first"
    driver = _go_on(coroutine, first)
    assert driver.send(None) == "first"  # the trap the coroutine yielded, passed on
    assert driver.send(1) == "second"
    assert driver.throw(KeyError("k")) == "third"
    driver.close()
    assert log == [("got", 1), ("caught", "k"), "closed"]


def test_go_on_returns_when_the_coroutine_ends() -> None:
    log: list[object] = []

    async def short() -> None:
        log.append(await _trap("only"))

    coroutine = short()
    driver = _go_on(coroutine, coroutine.send(None))
    assert driver.send(None) == "only"
    with pytest.raises(StopIteration):
        driver.send("value")
    assert log == ["value"]


async def test_a_socket_error_while_reading_ends_that_connection_as_broken(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = Gate()
    server = make_server(gate)
    ours, theirs = trio.socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    caplog.set_level(logging.INFO, logger="supervisor.ttrpc")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, trio.SocketStream(theirs))
        peer = RawPeer(trio.SocketStream(ours))
        await peer.call("Echo", b"unread")
        await trio.testing.wait_all_tasks_blocked()
        # Closing a unix socket with an answer unread in it: the server's next
        # read fails with ECONNRESET.
        ours.close()
        await trio.testing.wait_all_tasks_blocked()
        assert server.connections == 0
    assert gate.echoed == [b"unread"]
    assert f"connection broken by the peer: [Errno {errno.ECONNRESET}]" in caplog.text
