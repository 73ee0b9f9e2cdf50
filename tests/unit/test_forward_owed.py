"""A Forward containerd has not answered is owed, never sent twice (daemon.ContainerdEvents).

containerd frozen or slow (not restarted) keeps the connection open and reads the
request later; a retry that sent the event again made containerd take it twice.
Now a retry waits on the same call, and an in-place upgrade hands the connection
and the owed call over.  A real ttrpc server on a unix socket plays containerd's
Events service; its Forward handler parks until the test lets it answer.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from supervisor import daemon
from supervisor.api.events import ttrpc_pb2 as events_api
from supervisor.events import Event, Outbox
from supervisor.ttrpc import CallContext, Client, Code, RPCError, Server, open_unix_listener

pytestmark = pytest.mark.trio


class FrozenEvents:
    """containerd's Events/Forward: counts the requests, answers once released."""

    def __init__(self) -> None:
        self.received: list[str] = []  # topics, in the order requests arrived
        self.answered: list[str] = []
        self.release = trio.Event()

    async def forward(self, ctx: CallContext, payload: bytes) -> bytes:
        request = events_api.ForwardRequest.FromString(payload)
        self.received.append(request.envelope.topic)
        # Frozen, containerd has not read the request yet, so its deadline (timeout_nano,
        # counted from when it reads) has not begun: nothing cancels this wait.
        with trio.CancelScope(shield=True):
            await self.release.wait()
        self.answered.append(request.envelope.topic)
        return b""


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fwd-", dir="/tmp") as d:  # short socket paths
        yield Path(d)


@asynccontextmanager
async def containerd(path: Path) -> AsyncIterator[FrozenEvents]:
    events = FrozenEvents()
    server = Server()
    server.register(daemon.EVENTS_SERVICE, {"Forward": events.forward})
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, await open_unix_listener(path))
        yield events
        events.release.set()
        await server.shutdown(grace=1)
        nursery.cancel_scope.cancel()


def event(seq: int, topic: str = "/tasks/exit") -> Event:
    return Event(seq=seq, topic=topic, timestamp_ns=1, namespace="ns",
                 type_url="containerd.events.TaskExit", payload=b"")


async def test_a_retry_waits_for_the_forward_already_sent(
        sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "FORWARD_TIMEOUT", 0.05)
    path = sock_dir / "containerd.sock"
    async with containerd(path) as frozen:
        sender = daemon.ContainerdEvents(f"unix://{path}")
        for _ in range(3):  # the outbox retries after each timeout
            with pytest.raises(RPCError) as e:
                await sender.send(event(1))
            assert e.value.code is Code.DEADLINE_EXCEEDED
        assert frozen.received == ["/tasks/exit"]  # sent once, waited for three times
        frozen.release.set()
        await sender.send(event(1))  # the answer to the first (and only) request
        assert frozen.answered == ["/tasks/exit"]
        await sender.send(event(2, "/tasks/delete"))
        assert frozen.received == ["/tasks/exit", "/tasks/delete"]
        await sender.aclose()


async def test_a_frozen_containerd_gets_each_event_once_through_the_outbox(
        sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "FORWARD_TIMEOUT", 0.02)
    monkeypatch.setattr("supervisor.events.INITIAL_BACKOFF", 0.01)
    monkeypatch.setattr("supervisor.events.MAX_BACKOFF", 0.02)
    path = sock_dir / "containerd.sock"
    async with containerd(path) as frozen:
        sender = daemon.ContainerdEvents(f"unix://{path}")
        outbox = Outbox(sender.send, "ns")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(outbox.run)
            outbox.publish(events_api.ForwardRequest(), topic="/tasks/exit")
            while outbox.pending[0].attempts < 4:  # several timeouts, several retries
                await trio.sleep(0.01)
            frozen.release.set()
            assert await outbox.flush(5)
            nursery.cancel_scope.cancel()
        assert frozen.received == ["/tasks/exit"]
        await sender.aclose()


async def test_a_different_event_abandons_the_owed_call(
        sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the outbox's head is ever sent; if it changed (the outbox was replaced), the
    # call owed for the old head is dropped, and its late answer with it.
    monkeypatch.setattr(daemon, "FORWARD_TIMEOUT", 0.05)
    path = sock_dir / "containerd.sock"
    async with containerd(path) as frozen:
        sender = daemon.ContainerdEvents(f"unix://{path}")
        with pytest.raises(RPCError):
            await sender.send(event(1))
        frozen.release.set()
        await sender.send(event(2, "/tasks/delete"))
        assert frozen.received == ["/tasks/exit", "/tasks/delete"]
        await sender.aclose()


async def test_the_owed_forward_is_handed_over_and_answered_on_the_new_side(
        sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon, "FORWARD_TIMEOUT", 0.05)
    path = sock_dir / "containerd.sock"
    async with containerd(path) as frozen:
        old = daemon.ContainerdEvents(f"unix://{path}")
        with pytest.raises(RPCError):
            await old.send(event(1))
        state = json.loads(json.dumps(old.export()))  # through the upgrade's JSON
        assert state["owed_seq"] == 1
        # The exec keeps the fd: a copy stands in for it, and the old side is gone.
        state["fd"] = os.dup(state["fd"])
        old_client = old._client
        assert old_client is not None
        old_client._stream.socket.detach()  # type: ignore[attr-defined]
        new = daemon.ContainerdEvents.adopt(f"unix://{path}", state)
        frozen.release.set()
        await new.send(event(1))  # waits on the handed-over call
        assert frozen.received == ["/tasks/exit"]
        assert frozen.answered == ["/tasks/exit"]
        await new.send(event(2, "/tasks/delete"))  # the adopted connection carries on
        assert frozen.received == ["/tasks/exit", "/tasks/delete"]
        await new.aclose()


async def test_without_a_connection_nothing_is_handed_over() -> None:
    assert daemon.ContainerdEvents("unix:///nowhere").export() is None


async def test_a_result_that_times_out_stays_pending_and_is_answered_once(
        sock_dir: Path) -> None:
    path = sock_dir / "s"
    async with containerd(path) as frozen:
        client = Client(await trio.open_unix_socket(str(path)))
        pending = await client.send(daemon.EVENTS_SERVICE, "Forward",
                                    events_api.ForwardRequest().SerializeToString())
        with pytest.raises(RPCError, match="still pending"):
            await client.result(pending, timeout=0.01)
        with trio.move_on_after(0.01):
            await client.result(pending)  # cancelled: still pending too
        assert not pending.answered
        frozen.release.set()
        assert await client.result(pending) == b""
        assert await client.result(pending) == b""  # the answer is kept
        assert len(frozen.received) == 1
        await client.aclose()
