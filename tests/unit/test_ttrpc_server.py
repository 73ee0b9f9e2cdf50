"""ttrpc Server and Client over in-memory streams and real unix sockets."""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from supervisor.ttrpc import (
    MAX_MESSAGE_SIZE,
    NAMESPACE_KEY,
    CallContext,
    Client,
    Code,
    ConnectionBroken,
    ConnectionClosed,
    Limits,
    PeerCheck,
    RPCError,
    Server,
    connect_unix,
    open_unix_listener,
    peer_credentials,
    require_same_uid,
    require_uid,
)
from supervisor.ttrpc._frame import MessageType, encode_frame, encode_header
from supervisor.ttrpc._protocol import ClientConnection, ResponseReceived
from supervisor.ttrpc._server import _RECEIVE_SIZE
from supervisor.ttrpc._wire import Request, encode_request

LOGGER = "supervisor.ttrpc"


async def echo(ctx: CallContext, payload: bytes) -> bytes:
    return payload


async def hang(ctx: CallContext, payload: bytes) -> bytes:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


def make_server(peer_check: PeerCheck = require_same_uid, limits: Limits | None = None) -> Server:
    server = Server(peer_check=peer_check, limits=limits or Limits())
    server.register("test.Svc", {"Echo": echo, "Hang": hang})
    return server


@asynccontextmanager
async def memory_client(server: Server) -> AsyncIterator[Client]:
    """A Client wired to ``server.serve_stream`` through an in-memory stream pair."""
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_end)
        client = Client(client_end)
        try:
            yield client
        finally:
            await client.aclose()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 108-byte limit of unix socket paths.
    path = Path(tempfile.mkdtemp(prefix="ttrpc-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def unix_server(server: Server, path: Path) -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, await open_unix_listener(path))
        yield str(path)
        await server.shutdown(grace=1)


class RawPeer:
    """A hand-driven client: sends what the test says, returns raw events."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.proto = ClientConnection()

    async def call(self, method: str, payload: bytes = b"", timeout_nano: int = 0) -> int:
        sid, data = self.proto.send_request("test.Svc", method, payload, timeout_nano=timeout_nano)
        await self.stream.send_all(data)
        return sid

    async def responses(self, count: int) -> list[ResponseReceived]:
        got: list[ResponseReceived] = []
        while len(got) < count:
            data = await self.stream.receive_some()
            assert data, "server closed the connection"
            got += self.proto.receive_data(data)
        return got


# -- calls --------------------------------------------------------------------


async def test_metadata_namespace_and_deadline_reach_the_handler() -> None:
    seen: list[CallContext] = []

    async def look(ctx: CallContext, payload: bytes) -> bytes:
        seen.append(ctx)
        return payload[::-1]

    server = make_server()
    server.register("test.Look", {"Look": look})
    async with memory_client(server) as client:
        out = await client.call(
            "test.Look",
            "Look",
            b"abc",
            timeout=30,
            metadata={NAMESPACE_KEY: "k8s.io", "Multi": ["a", "b"]},
        )
        assert out == b"cba"
        await client.call("test.Look", "Look", b"")
    first, second = seen
    assert (first.service, first.method) == ("test.Look", "Look")
    assert first.metadata == {NAMESPACE_KEY: ["k8s.io"], "multi": ["a", "b"]}
    assert first.namespace == "k8s.io"
    assert first.deadline is not None
    assert 29 < first.deadline - trio.current_time() <= 30
    assert second.deadline is None
    assert second.namespace is None
    assert second.stream_id > first.stream_id


async def test_slow_call_does_not_block_fast_ones() -> None:
    release = trio.Event()
    order: list[bytes] = []

    async def slow(ctx: CallContext, payload: bytes) -> bytes:
        await release.wait()
        return b"slow"

    server = make_server()
    server.register("test.Slow", {"Slow": slow})
    async with memory_client(server) as client, trio.open_nursery() as nursery:

        async def run(service: str, method: str, payload: bytes) -> None:
            order.append(await client.call(service, method, payload))

        nursery.start_soon(run, "test.Slow", "Slow", b"")
        await trio.testing.wait_all_tasks_blocked()
        await run("test.Svc", "Echo", b"fast1")
        await run("test.Svc", "Echo", b"fast2")
        assert order == [b"fast1", b"fast2"]
        release.set()
    assert order == [b"fast1", b"fast2", b"slow"]


async def test_answers_go_out_as_they_finish() -> None:
    release = trio.Event()

    async def slow(ctx: CallContext, payload: bytes) -> bytes:
        await release.wait()
        return b"slow"

    server = make_server()
    server.register("test.Slow", {"Slow": slow})
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_end)
        raw = RawPeer(client_end)
        sid_slow, data = raw.proto.send_request("test.Slow", "Slow")
        await client_end.send_all(data)
        sid_fast = await raw.call("Echo", b"fast")
        [first] = await raw.responses(1)
        assert (first.stream_id, first.response.payload) == (sid_fast, b"fast")
        release.set()
        [second] = await raw.responses(1)
        assert (second.stream_id, second.response.payload) == (sid_slow, b"slow")
        await client_end.aclose()


async def test_server_enforces_timeout_nano_and_cancels_the_handler() -> None:
    cancelled = trio.Event()

    async def stuck(ctx: CallContext, payload: bytes) -> bytes:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    server = make_server()
    server.register("test.Stuck", {"Stuck": stuck})
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_end)
        raw = RawPeer(client_end)
        sid, data = raw.proto.send_request("test.Stuck", "Stuck", timeout_nano=50_000_000)
        await client_end.send_all(data)
        # An already-expired (negative) timeout is answered at once.
        sid_neg = await raw.call("Hang", timeout_nano=-1)
        got = {e.stream_id: e.response.status for e in await raw.responses(2)}
        for stream_id in (sid, sid_neg):
            status = got[stream_id]
            assert status is not None
            assert status.code == Code.DEADLINE_EXCEEDED
        assert cancelled.is_set()
        await client_end.aclose()


async def test_client_timeout_is_local_and_late_answer_is_dropped() -> None:
    async def stubborn(ctx: CallContext, payload: bytes) -> bytes:
        with trio.CancelScope(shield=True):
            await trio.sleep(0.2)
        return b"late"

    server = make_server()
    server.register("test.Late", {"Late": stubborn})
    async with memory_client(server) as client:
        with pytest.raises(RPCError) as info:
            await client.call("test.Late", "Late", b"", timeout=0.05)
        assert info.value.code is Code.DEADLINE_EXCEEDED
        await trio.sleep(0.3)  # the late answer arrives and is swallowed
        assert await client.call("test.Svc", "Echo", b"still fine") == b"still fine"
        with pytest.raises(RPCError) as info:
            await client.call("test.Svc", "Echo", b"", timeout=0)
        assert info.value.code is Code.DEADLINE_EXCEEDED


@pytest.mark.parametrize(
    ("service", "method", "message"),
    [
        ("test.Nope", "Echo", "service test.Nope not found"),
        ("test.Svc", "Nope", "method Nope not found"),
    ],
)
async def test_unknown_service_or_method_is_unimplemented(
    service: str, method: str, message: str
) -> None:
    async with memory_client(make_server()) as client:
        with pytest.raises(RPCError) as info:
            await client.call(service, method, b"")
        assert info.value.code is Code.UNIMPLEMENTED
        assert message in info.value.message


async def test_handler_errors_become_statuses(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)

    async def not_found(ctx: CallContext, payload: bytes) -> bytes:
        raise RPCError(Code.NOT_FOUND, "no such container", [("type.x/y", b"\x01")])

    async def crash(ctx: CallContext, payload: bytes) -> bytes:
        raise ValueError("boom")

    async def wrong_type(ctx: CallContext, payload: bytes) -> bytes:
        return "text"  # type: ignore[return-value]

    server = make_server()
    server.register("test.Err", {"NotFound": not_found, "Crash": crash, "Wrong": wrong_type})
    async with memory_client(server) as client:
        with pytest.raises(RPCError) as info:
            await client.call("test.Err", "NotFound", b"")
        assert (info.value.code, info.value.message) == (Code.NOT_FOUND, "no such container")
        assert info.value.details == (("type.x/y", b"\x01"),)
        with pytest.raises(RPCError) as info:
            await client.call("test.Err", "Crash", b"")
        assert (info.value.code, info.value.message) == (Code.UNKNOWN, "boom")
        with pytest.raises(RPCError) as info:
            await client.call("test.Err", "Wrong", b"")
        assert info.value.code is Code.INTERNAL
        assert await client.call("test.Svc", "Echo", b"ok") == b"ok"
    crashes = [r for r in caplog.records if "failed" in r.getMessage() and r.exc_info]
    assert len(crashes) == 1
    assert isinstance(crashes[0].exc_info[1], ValueError)  # type: ignore[index]


async def test_oversized_request_is_resource_exhausted_and_connection_survives() -> None:
    server = make_server()
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_end)
        # A client allowed to send more than the server accepts.
        async with Client(client_end, max_message_size=8 << 20) as client:
            with pytest.raises(RPCError) as info:
                await client.call("test.Svc", "Echo", bytes(5 << 20))
            assert info.value.code is Code.RESOURCE_EXHAUSTED
            assert "exceeds the maximum message size" in info.value.message
            assert await client.call("test.Svc", "Echo", b"next") == b"next"


async def test_oversized_locally_refused_and_oversized_response() -> None:
    async def big(ctx: CallContext, payload: bytes) -> bytes:
        return bytes(MAX_MESSAGE_SIZE)

    server = make_server()
    server.register("test.Big", {"Big": big})
    async with memory_client(server) as client:
        with pytest.raises(RPCError) as info:
            await client.call("test.Svc", "Echo", bytes(MAX_MESSAGE_SIZE))
        assert info.value.code is Code.RESOURCE_EXHAUSTED
        with pytest.raises(RPCError) as info:
            await client.call("test.Big", "Big", b"")
        assert info.value.code is Code.RESOURCE_EXHAUSTED
        assert "response too large" in info.value.message
        near = bytes(MAX_MESSAGE_SIZE - 100)
        assert await client.call("test.Svc", "Echo", near) == near


async def test_many_concurrent_calls_with_timeouts_and_cancellations(sock_dir: Path) -> None:
    async def jitter(ctx: CallContext, payload: bytes) -> bytes:
        await trio.sleep(random.random() * 0.02)
        return payload

    server = make_server()
    server.register("test.Jitter", {"Jitter": jitter})
    results: dict[int, str] = {}
    async with unix_server(server, sock_dir / "s") as path:
        async with await connect_unix(path) as client, trio.open_nursery() as nursery:

            async def one(i: int) -> None:
                payload = b"%d" % i
                kind = i % 3
                if kind == 2:
                    with trio.move_on_after(random.random() * 0.01):
                        await client.call("test.Jitter", "Jitter", payload)
                    results[i] = "done"
                    return
                try:
                    out = await client.call(
                        "test.Jitter", "Jitter", payload, timeout=0.005 if kind else None
                    )
                except RPCError as exc:
                    assert exc.code is Code.DEADLINE_EXCEEDED
                    results[i] = "timeout"
                else:
                    assert out == payload
                    results[i] = "ok"

            for i in range(300):
                nursery.start_soon(one, i)
        assert len(results) == 300
        assert all(results[i] == "ok" for i in range(0, 300, 3))
        async with await connect_unix(path) as client:
            assert await client.call("test.Svc", "Echo", b"x") == b"x"


async def test_cancelling_the_reading_caller_hands_reading_over() -> None:
    release = trio.Event()

    async def wait(ctx: CallContext, payload: bytes) -> bytes:
        await release.wait()
        return payload

    server = make_server()
    server.register("test.Wait", {"Wait": wait})
    async with memory_client(server) as client, trio.open_nursery() as nursery:
        got: list[bytes] = []
        first_scope = trio.CancelScope()

        async def first() -> None:
            with first_scope:
                await client.call("test.Wait", "Wait", b"first")

        async def second() -> None:
            got.append(await client.call("test.Wait", "Wait", b"second"))

        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        first_scope.cancel()  # the first caller is the reader
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert got == [b"second"]


# -- connection failures --------------------------------------------------------


async def test_garbage_or_truncation_on_one_connection_spares_the_others(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    release = trio.Event()

    async def wait(ctx: CallContext, payload: bytes) -> bytes:
        await release.wait()
        return b"waited"

    server = make_server()
    server.register("test.Wait", {"Wait": wait})
    async with unix_server(server, sock_dir / "s") as path:
        async with await connect_unix(path) as good, trio.open_nursery() as nursery:
            waited: list[bytes] = []

            async def park() -> None:
                waited.append(await good.call("test.Wait", "Wait", b""))

            nursery.start_soon(park)
            for bad_bytes in (
                b"\x00\x00\x00\x01\x00\x00\x00\x01\x07\x00?",  # unknown message type
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
                encode_header(100, 1, MessageType.REQUEST) + b"half",  # then EOF
                encode_frame(1, MessageType.RESPONSE, b""),  # clients send no responses
            ):
                bad = await trio.open_unix_socket(path)
                await bad.send_all(bad_bytes)
                if bad_bytes.endswith(b"half"):
                    await bad.send_eof()
                # The server closes the bad connection.
                with trio.fail_after(5):
                    while await bad.receive_some():
                        pass
                await bad.aclose()
                assert await good.call("test.Svc", "Echo", b"fine") == b"fine"
            release.set()
        assert waited == [b"waited"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("protocol violation" in m and "unknown message type" in m for m in messages)
    assert any("middle of" in m for m in messages)
    assert any("clients may only send requests" in m for m in messages)


async def test_even_stream_id_is_rejected_on_the_stream() -> None:
    server = make_server()
    client_end, server_end = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_end)
        body = encode_request(Request("test.Svc", "Echo", b"x"))
        await client_end.send_all(encode_frame(2, MessageType.REQUEST, body))
        await client_end.send_all(encode_frame(3, MessageType.REQUEST, body))
        proto = ClientConnection()
        proto._pending.update({2, 3})  # accept answers to our hand-made frames
        got: list[ResponseReceived] = []
        while len(got) < 2:
            got += proto.receive_data(await client_end.receive_some())
        by_id = {e.stream_id: e.response for e in got}
        assert by_id[2].status is not None
        assert by_id[2].status.code == Code.INVALID_ARGUMENT
        assert by_id[3].payload == b"x"
        await client_end.aclose()


async def test_peer_vanishing_fails_pending_calls_with_connection_broken() -> None:
    client_end, server_end = trio.testing.memory_stream_pair()
    client = Client(client_end)
    async with trio.open_nursery() as nursery:
        outcome: list[ConnectionBroken] = []

        async def pending() -> None:
            try:
                await client.call("test.Svc", "Echo", b"")
            except ConnectionBroken as exc:
                outcome.append(exc)

        nursery.start_soon(pending)
        nursery.start_soon(pending)
        assert await server_end.receive_some()  # the requests arrived ...
        await server_end.aclose()  # ... and the server vanished
    assert len(outcome) == 2
    assert all(exc.remote for exc in outcome)
    with pytest.raises(ConnectionBroken):
        await client.call("test.Svc", "Echo", b"")
    await client.aclose()
    with pytest.raises(ConnectionClosed):
        await client.call("test.Svc", "Echo", b"")


async def test_server_closing_mid_call_over_unix_socket(sock_dir: Path) -> None:
    started = trio.Event()

    async def stuck(ctx: CallContext, payload: bytes) -> bytes:
        started.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    server = make_server()
    server.register("test.Stuck", {"Stuck": stuck})
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, await open_unix_listener(sock_dir / "s"))
        client = await connect_unix(sock_dir / "s")

        async def shut_down_once_started() -> None:
            await started.wait()
            await server.shutdown(grace=0.05)

        nursery.start_soon(shut_down_once_started)
        with pytest.raises(ConnectionBroken) as info:
            await client.call("test.Stuck", "Stuck", b"")
        assert info.value.remote
        await client.aclose()


async def test_aclose_fails_pending_and_later_calls_with_connection_closed() -> None:
    async with memory_client(make_server()) as client, trio.open_nursery() as nursery:
        outcome: list[ConnectionClosed] = []

        async def pending() -> None:
            try:
                await client.call("test.Svc", "Hang", b"")
            except ConnectionClosed as exc:
                outcome.append(exc)

        nursery.start_soon(pending)
        await trio.testing.wait_all_tasks_blocked()
        await client.aclose()
    assert len(outcome) == 1
    assert not outcome[0].remote
    with pytest.raises(ConnectionClosed):
        await client.call("test.Svc", "Echo", b"")


async def test_cancelled_blocked_write_closes_the_connection() -> None:
    # A lockstep stream blocks send_all until the other side reads: nobody does.
    client_end, _server_end = trio.testing.lockstep_stream_pair()
    client = Client(client_end)
    with pytest.raises(ConnectionClosed, match="cancelled part-way"):
        await client.call("test.Svc", "Echo", b"x", timeout=0.05)
    with pytest.raises(ConnectionClosed):
        await client.call("test.Svc", "Echo", b"x")


# -- a peer's load is bounded (issue 15 item 7) ------------------------------------


class Parking:
    """A handler that parks until released, counting the calls it has seen."""

    def __init__(self) -> None:
        self.started = 0
        self.release = trio.Event()

    async def __call__(self, ctx: CallContext, payload: bytes) -> bytes:
        self.started += 1
        await self.release.wait()
        return b"done"


async def test_parked_large_requests_make_the_server_stop_reading() -> None:
    # The report: 64 parked 4 MiB requests grew the shim by 270 MiB.  Scaled down.
    limit = 1 << 20
    park = Parking()
    server = Server(limits=Limits(max_buffered_bytes=limit))
    server.register("test.Park", {"Park": park})
    client_sock, server_sock = trio.socket.socketpair()
    client_end, server_end = trio.SocketStream(client_sock), trio.SocketStream(server_sock)
    raw = RawPeer(client_end)
    sent = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_end)

        async def send_all_requests() -> None:
            for _ in range(32):
                _sid, data = raw.proto.send_request("test.Park", "Park", bytes(limit // 2))
                await client_end.send_all(data)
            sent.set()

        nursery.start_soon(send_all_requests)
        await trio.testing.wait_all_tasks_blocked()
        # Backpressure: the sender is blocked in the kernel, not failed.
        assert not sent.is_set()
        assert park.started <= 3
        assert 0 < server.buffered_bytes <= max(limit, 10 + MAX_MESSAGE_SIZE) + _RECEIVE_SIZE
        park.release.set()
        got = await raw.responses(32)
        assert sent.is_set()
        assert [r.response.payload for r in got] == [b"done"] * 32
        assert all(r.response.status is None or r.response.status.code == 0 for r in got)
        assert park.started == 32
        await trio.testing.wait_all_tasks_blocked()
        assert server.buffered_bytes == 0
        await client_end.aclose()


async def test_call_limit_is_backpressure_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    park = Parking()
    server = Server(limits=Limits(max_calls=4))
    server.register("test.Park", {"Park": park})
    results: list[bytes] = []
    async with memory_client(server) as client, trio.open_nursery() as nursery:

        async def call() -> None:
            results.append(await client.call("test.Park", "Park", b""))

        for _ in range(10):
            nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        assert park.started == 4
        assert server.buffered_bytes > 0
        park.release.set()
    assert results == [b"done"] * 10
    assert park.started == 10
    assert any("calls unanswered (the limit)" in r.getMessage() for r in caplog.records)


async def test_a_peer_that_does_not_read_answers_is_not_read_either() -> None:
    # Big answers to a peer that never reads: they pile up only to the byte limit.
    async def big(ctx: CallContext, payload: bytes) -> bytes:
        return bytes(200_000)

    server = Server(limits=Limits(max_buffered_bytes=1 << 20))
    server.register("test.Big", {"Big": big})
    client_end, server_end = trio.testing.lockstep_stream_pair()
    raw = RawPeer(client_end)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve_stream, server_end)
        sent = 0

        async def send_requests() -> None:
            nonlocal sent
            for _ in range(50):
                _sid, data = raw.proto.send_request("test.Big", "Big")
                await client_end.send_all(data)
                sent += 1

        nursery.start_soon(send_requests)
        await trio.testing.wait_all_tasks_blocked()
        assert sent < 10
        assert server.buffered_bytes <= max(1 << 20, 10 + MAX_MESSAGE_SIZE) + _RECEIVE_SIZE
        nursery.cancel_scope.cancel()


async def test_connections_beyond_the_limit_are_refused_and_serving_goes_on(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    server = make_server(limits=Limits(max_connections=2))
    async with unix_server(server, sock_dir / "s") as path:
        first = await connect_unix(path)
        second = await connect_unix(path)
        assert await first.call("test.Svc", "Echo", b"1") == b"1"
        assert await second.call("test.Svc", "Echo", b"2") == b"2"
        async with await connect_unix(path) as third:
            with pytest.raises(ConnectionBroken):
                await third.call("test.Svc", "Echo", b"3")
        assert await first.call("test.Svc", "Echo", b"1") == b"1"
        await second.aclose()
        while server.connections > 1:
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0)
        async with await connect_unix(path) as fourth:  # the listener still accepts
            assert await fourth.call("test.Svc", "Echo", b"4") == b"4"
        await first.aclose()
    assert any("2 connections are open, the limit" in r.getMessage() for r in caplog.records)


async def test_a_connection_that_never_sends_a_request_times_out(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    server = make_server(limits=Limits(first_request_timeout=60))
    async with trio.open_nursery() as nursery:
        silent, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(server.serve_stream, server_end)
        # A partial request is not a request: a slow trickle is cut as well.
        trickle, server_end = trio.testing.memory_stream_pair()
        nursery.start_soon(server.serve_stream, server_end)
        await trickle.send_all(encode_header(100, 1, MessageType.REQUEST))
        start = trio.current_time()
        with trio.fail_after(3600):  # virtual time: the clock jumps while all wait
            assert await silent.receive_some() == b""
            assert await trickle.receive_some() == b""
        assert trio.current_time() - start >= 60
    assert server.connections == 0
    assert any("sent no request within 60s" in r.getMessage() for r in caplog.records)


async def test_a_connection_that_sent_a_request_is_never_cut_for_idleness(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # containerd's connection may be idle for days; losing it means a "dead" shim.
    server = make_server(limits=Limits(first_request_timeout=60))
    async with memory_client(server) as client:
        assert await client.call("test.Svc", "Echo", b"hi") == b"hi"
        await trio.sleep(30 * 86400)
        assert await client.call("test.Svc", "Echo", b"still") == b"still"
        assert server.connections == 1


def test_limits_reject_bad_values() -> None:
    for bad in ({"max_calls": 0}, {"max_buffered_bytes": -1}, {"max_connections": 1.5},
                {"max_calls": True}, {"first_request_timeout": 0},
                {"first_request_timeout": float("nan")}):
        with pytest.raises(ValueError, match="ttrpc limit"):
            Limits(**bad)  # type: ignore[arg-type]
    assert Limits(first_request_timeout=float("inf")).first_request_timeout == float("inf")


# -- peer credentials -------------------------------------------------------------


async def test_uid_check_refuses_other_users(
    sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    server = make_server(peer_check=require_uid(os.geteuid() + 1))
    async with (
        unix_server(server, sock_dir / "s") as path,
        await connect_unix(path) as client,
    ):
        with pytest.raises(ConnectionBroken):
            await client.call("test.Svc", "Echo", b"")
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals
    assert f"is not the required uid {os.geteuid() + 1}" in refusals[0]


async def test_default_check_admits_our_own_uid_and_custom_checks_apply(sock_dir: Path) -> None:
    async with (
        unix_server(make_server(), sock_dir / "s") as path,
        await connect_unix(path) as client,
    ):
        assert await client.call("test.Svc", "Echo", b"me") == b"me"
    async with memory_client(make_server(peer_check=lambda stream: "go away")) as client:
        with pytest.raises(ConnectionBroken):
            await client.call("test.Svc", "Echo", b"")


async def test_peer_credentials_of_a_socketpair() -> None:
    a, b = trio.socket.socketpair()
    with a, b:
        creds = peer_credentials(trio.SocketStream(a))
        assert creds is not None
        assert (creds.pid, creds.uid, creds.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert peer_credentials(trio.testing.memory_stream_pair()[0]) is None


async def test_abstract_socket_address() -> None:
    name = f"\0supervisor-ttrpc-test-{os.getpid()}-{random.getrandbits(32)}"
    server = make_server()
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, await open_unix_listener(name))
        async with await connect_unix(name) as client:
            assert await client.call("test.Svc", "Echo", b"abstract") == b"abstract"
        await server.shutdown()


# -- shutdown -------------------------------------------------------------------


async def test_graceful_shutdown_lets_in_flight_calls_finish(sock_dir: Path) -> None:
    started = trio.Event()
    release = trio.Event()

    async def slow(ctx: CallContext, payload: bytes) -> bytes:
        started.set()
        await release.wait()
        return b"finished"

    server = make_server()
    server.register("test.Slow", {"Slow": slow})
    path = sock_dir / "s"
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, await open_unix_listener(path))
        busy = await connect_unix(path)
        idle = await connect_unix(path)
        assert await idle.call("test.Svc", "Echo", b"hi") == b"hi"
        results: list[bytes] = []
        shut = trio.Event()

        async def in_flight() -> None:
            results.append(await busy.call("test.Slow", "Slow", b""))

        async def shutdown() -> None:
            await server.shutdown()
            shut.set()

        nursery.start_soon(in_flight)
        await started.wait()
        nursery.start_soon(shutdown)
        await trio.testing.wait_all_tasks_blocked()
        assert not shut.is_set()
        # New connections are refused, idle ones closed, new calls turned away.
        with pytest.raises(OSError):
            await trio.open_unix_socket(str(path))
        with pytest.raises(ConnectionBroken):
            await idle.call("test.Svc", "Echo", b"")
        with pytest.raises(RPCError) as info:
            await busy.call("test.Svc", "Echo", b"")
        assert info.value.code is Code.UNAVAILABLE
        release.set()
        with trio.fail_after(5):
            await shut.wait()
        assert results == [b"finished"]
        assert server.connections == 0
        with pytest.raises(ConnectionBroken):
            await busy.call("test.Svc", "Echo", b"")
        await busy.aclose()
        await idle.aclose()


async def test_shutdown_grace_expiry_cancels_handlers() -> None:
    cancelled = trio.Event()

    async def stuck(ctx: CallContext, payload: bytes) -> bytes:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()
        raise AssertionError("unreachable")

    server = make_server()
    server.register("test.Stuck", {"Stuck": stuck})
    async with memory_client(server) as client, trio.open_nursery() as nursery:
        errors: list[BaseException] = []

        async def call() -> None:
            try:
                await client.call("test.Stuck", "Stuck", b"")
            except ConnectionBroken as exc:
                errors.append(exc)

        nursery.start_soon(call)
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5):
            await server.shutdown(grace=0.05)
    assert cancelled.is_set()
    assert len(errors) == 1


async def test_serve_after_shutdown_refuses() -> None:
    server = make_server()
    await server.shutdown()
    client_end, server_end = trio.testing.memory_stream_pair()
    await server.serve_stream(server_end)  # closed at once
    async with Client(client_end) as client:
        with pytest.raises(ConnectionBroken):
            await client.call("test.Svc", "Echo", b"")


def test_duplicate_service_registration() -> None:
    server = make_server()
    with pytest.raises(ValueError, match="already registered"):
        server.register("test.Svc", {})
