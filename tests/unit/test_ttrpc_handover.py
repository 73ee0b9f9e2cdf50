"""Handing a served connection over to another Server (an in-place upgrade), in memory.

Scripted: the old server quiesces and exports, a new server adopts the same
stream objects (as the new process adopts the same fds), and the client never
notices.  The old server stays parked (it would be gone: exec) until the test ends.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from supervisor.ttrpc import CallContext, Client, Code, LocalProtocolError, Server
from supervisor.ttrpc._frame import MessageType, encode_frame
from supervisor.ttrpc._protocol import (
    ClientConnection,
    RequestReceived,
    ServerConnection,
    ServerSnapshot,
)
from supervisor.ttrpc._server import HandedOver
from supervisor.ttrpc._wire import Request, encode_request

SVC = "test.Svc"


class Side:
    """One server's handlers, counting what ran where."""

    def __init__(self, exited: trio.Event, release: trio.Event | None = None) -> None:
        self.exited = exited
        self.release = release
        self.waits_started = 0
        self.waits_answered = 0

    async def echo(self, ctx: CallContext, payload: bytes) -> bytes:
        return payload

    async def slow(self, ctx: CallContext, payload: bytes) -> bytes:
        assert self.release is not None
        await self.release.wait()
        return b"slow:" + payload

    async def wait(self, ctx: CallContext, payload: bytes) -> bytes:
        self.waits_started += 1
        await self.exited.wait()
        self.waits_answered += 1
        return b"exited:" + payload

    def server(self) -> Server:
        server = Server(peer_check=lambda stream: None)
        server.register(SVC, {"Echo": self.echo, "Slow": self.slow, "Wait": self.wait},
                        resumable={"Wait"})
        return server


class NoListener(trio.abc.Listener[trio.abc.Stream]):
    """A listener nobody connects to (the tests hand streams over directly)."""

    async def accept(self) -> trio.abc.Stream:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        pass


@asynccontextmanager
async def old_server(side: Side) -> AsyncIterator[tuple[Server, trio.abc.Stream, trio.Nursery]]:
    client_end, server_end = trio.testing.memory_stream_pair()
    server = side.server()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, NoListener())
        nursery.start_soon(server.serve_stream, server_end)
        yield server, client_end, nursery
        nursery.cancel_scope.cancel()


async def hand_over(old: Server, new: Server, nursery: trio.Nursery) -> list[HandedOver]:
    assert await old.quiesce(5)
    handed = old.export()
    await nursery.start(new.adopt, NoListener(), handed)
    return handed


async def test_a_request_half_received_at_quiesce_is_answered_by_the_successor() -> None:
    exited = trio.Event()
    old_side, new_side = Side(exited), Side(exited)
    proto = ClientConnection()
    stream_id, frame = proto.send_request(SVC, "Echo", b"hello")
    async with old_server(old_side) as (old, client_end, nursery):
        await client_end.send_all(frame[:7])
        await trio.testing.wait_all_tasks_blocked()
        handed = await hand_over(old, new_side.server(), nursery)
        assert len(handed) == 1
        assert handed[0].snapshot.unparsed == frame[:7]
        assert handed[0].fileno == -1
        await client_end.send_all(frame[7:])
        (response,) = proto.receive_data(await client_end.receive_some(65536))
        assert response.stream_id == stream_id
        assert response.response.payload == b"hello"


async def test_a_resumed_wait_is_answered_once_by_the_successor_only() -> None:
    exited = trio.Event()
    old_side, new_side = Side(exited), Side(exited)
    async with old_server(old_side) as (old, client_end, nursery):
        client = Client(client_end)
        answers: list[bytes] = []

        async def waiter() -> None:
            answers.append(await client.call(SVC, "Wait", b"c1", timeout=3600))

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert old_side.waits_started == 1
        handed = await hand_over(old, new_side.server(), nursery)
        (calls,) = [h.calls for h in handed]
        assert [(sid, r.method, r.payload) for sid, r in calls] == [(1, "Wait", b"c1")]
        assert 0 < calls[0][1].timeout_nano <= 3600 * 10**9  # the time left of its deadline
        await trio.testing.wait_all_tasks_blocked()
        assert new_side.waits_started == 1
        exited.set()
        assert await client.call(SVC, "Echo", b"after") == b"after"  # served by the new side
        await trio.testing.wait_all_tasks_blocked()
        assert answers == [b"exited:c1"]
        assert (old_side.waits_answered, new_side.waits_answered) == (0, 1)
        # A duplicate answer would be a protocol error on the client: none came.
        assert await client.call(SVC, "Echo", b"again") == b"again"


async def test_quiesce_waits_for_calls_in_flight_and_their_replies_go_out_first() -> None:
    exited, release = trio.Event(), trio.Event()
    old_side = Side(exited, release)
    async with old_server(old_side) as (old, client_end, nursery):
        client = Client(client_end)
        answers: list[bytes] = []

        async def slow() -> None:
            answers.append(await client.call(SVC, "Slow", b"x"))

        nursery.start_soon(slow)
        await trio.testing.wait_all_tasks_blocked()
        quiesced: list[bool] = []

        async def quiesce() -> None:
            quiesced.append(await old.quiesce(5))

        nursery.start_soon(quiesce)
        await trio.testing.wait_all_tasks_blocked()
        assert quiesced == []  # the Slow call holds it
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        assert quiesced == [True]
        assert answers == [b"slow:x"]
        (handed,) = old.export()
        assert handed.calls == () and handed.snapshot.unparsed == b""


async def test_a_quiesce_that_times_out_serves_on_and_reruns_nothing_twice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    exited, release = trio.Event(), trio.Event()
    side = Side(exited, release)
    async with old_server(side) as (old, client_end, nursery):
        client = Client(client_end)
        answers: list[bytes] = []

        async def call(method: str) -> None:
            answers.append(await client.call(SVC, method, b"x"))

        nursery.start_soon(call, "Slow")
        nursery.start_soon(call, "Wait")
        await trio.testing.wait_all_tasks_blocked()
        assert not await old.quiesce(1.0)  # Slow never finishes in time
        assert not old.quiescing
        assert await client.call(SVC, "Echo", b"still") == b"still"
        release.set()
        exited.set()
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(answers) == [b"exited:x", b"slow:x"]
        assert side.waits_answered == 1


async def test_resume_after_a_quiesce_runs_the_cancelled_wait_again_in_place() -> None:
    exited = trio.Event()
    side = Side(exited)
    async with old_server(side) as (old, client_end, nursery):
        client = Client(client_end)
        answers: list[bytes] = []

        async def waiter() -> None:
            answers.append(await client.call(SVC, "Wait", b"w"))

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert await old.quiesce(5)
        assert side.waits_started == 1 and side.waits_answered == 0
        old.resume()  # the upgrade was called off after quiescing
        await trio.testing.wait_all_tasks_blocked()
        assert side.waits_started == 2
        exited.set()
        await trio.testing.wait_all_tasks_blocked()
        assert answers == [b"exited:w"]


async def test_nothing_is_read_or_accepted_while_quiesced() -> None:
    exited = trio.Event()
    side = Side(exited)
    async with old_server(side) as (old, client_end, _nursery):
        assert await old.quiesce(5)
        proto = ClientConnection()
        _, frame = proto.send_request(SVC, "Echo", b"late")
        await client_end.send_all(frame)
        await trio.testing.wait_all_tasks_blocked()
        (handed,) = old.export()
        assert handed.snapshot.unparsed == b""  # not read: still in the stream
        old.resume()
        (response,) = proto.receive_data(await client_end.receive_some(65536))
        assert response.response.payload == b"late"


async def test_frames_held_by_the_call_limit_and_expired_deadlines_are_handed_over() -> None:
    server = ServerConnection(max_calls=1)
    client = ClientConnection()
    _, f1 = client.send_request(SVC, "Wait", b"1")
    _, f3 = client.send_request(SVC, "Echo", b"3")
    (event,) = server.receive_data(f1 + f3)  # the second is held back by the limit
    snapshot = server.snapshot()
    assert snapshot.unparsed == f3 and snapshot.last_stream_id == 1
    successor = ServerConnection(max_calls=1)
    successor.restore(snapshot)
    resumed = successor.owe(1, event.request)
    assert successor.events() == []  # the resumed call counts against the limit
    with pytest.raises(LocalProtocolError, match="owed already"):
        successor.owe(1, resumed.request)
    successor.send_response(1, b"done")
    (held,) = successor.events()
    assert isinstance(held, RequestReceived)
    assert held.stream_id == 3 and held.request.payload == b"3"


def test_restoring_into_a_used_connection_or_owing_an_unseen_stream_is_refused() -> None:
    server = ServerConnection()
    client = ClientConnection()
    _, frame = client.send_request(SVC, "Echo", b"x")
    server.receive_data(frame)
    with pytest.raises(LocalProtocolError, match="already in use"):
        server.restore(ServerSnapshot(b"", 0))
    fresh = ServerConnection()
    fresh.restore(ServerSnapshot(b"", 5))
    with pytest.raises(LocalProtocolError, match="not a request"):
        fresh.owe(7, Request(SVC, "Wait"))
    with pytest.raises(LocalProtocolError, match="not a request"):
        fresh.owe(4, Request(SVC, "Wait"))


async def test_a_handed_over_socket_is_named_by_its_fd() -> None:
    a, b = socket.socketpair()
    with a, b:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(b))
        handed = HandedOver(stream, ServerSnapshot(b"", 0))
        assert handed.fileno == b.fileno()


async def test_resumable_methods_must_be_registered() -> None:
    server = Server()
    with pytest.raises(ValueError, match="resumable"):
        server.register(SVC, {"Echo": Side(trio.Event()).echo}, resumable={"Wait"})


async def test_an_oversized_message_being_skipped_is_handed_over() -> None:
    server = ServerConnection(max_message_size=64)
    big = encode_frame(1, MessageType.REQUEST,
                       encode_request(Request(SVC, "Echo", b"x" * 200)),
                       max_message_size=1 << 20)
    assert server.receive_data(big[:50]) == []
    snapshot = server.snapshot()
    assert snapshot.discard > 0 and snapshot.oversized is not None
    successor = ServerConnection(max_message_size=64)
    successor.restore(snapshot)
    (event,) = successor.receive_data(big[50:])
    assert event.stream_id == 1 and getattr(event, "code", None) is Code.RESOURCE_EXHAUSTED


async def test_a_handed_over_call_whose_deadline_passed_gets_deadline_exceeded() -> None:
    exited = trio.Event()
    new_side = Side(exited)
    client_end, server_end = trio.testing.memory_stream_pair()
    proto = ClientConnection()
    stream_id, _frame = proto.send_request(SVC, "Wait", b"w", timeout_nano=10**9)
    handed = HandedOver(server_end, ServerSnapshot(b"", stream_id),
                        ((stream_id, Request(SVC, "Wait", b"w", -1)),))
    async with trio.open_nursery() as nursery:
        await nursery.start(new_side.server().adopt, NoListener(), [handed])
        (response,) = proto.receive_data(await client_end.receive_some(65536))
        assert response.response.status.code == Code.DEADLINE_EXCEEDED
        nursery.cancel_scope.cancel()
