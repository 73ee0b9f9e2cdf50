"""Shared shims: the group's promises, ``start``'s hand-made Join call, socket choice."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from supervisor import cli, daemon, errors, introspect, shimlog
from supervisor.api.group import group_pb2
from supervisor.api.introspect import introspect_pb2
from supervisor.api.task.v2 import shim_pb2
from supervisor.events import Event, Outbox, Spool
from supervisor.group import RESERVATION_TTL, Group
from supervisor.launch import _join, start
from supervisor.launch._pbwire import fields
from supervisor.launch.flags import Flags
from supervisor.launch.settings import Settings
from supervisor.reaper import Reaper
from supervisor.task import GROUP_SERVICE, TaskService
from supervisor.ttrpc import CallContext, Code, RPCError, Server


class Shim:
    """A Group with the ids it serves (a set the test adds to and removes from), and a
    flag for its verdict that the shim ends."""

    def __init__(self, nursery: trio.Nursery, first: str = "") -> None:
        self.ended = 0
        self.served: set[str] = set()
        self.group = Group(served=self.served, end=self._end, nursery=nursery, first=first)

    def _end(self) -> None:
        self.ended += 1

    def create(self, cid: str) -> None:
        """What the Task service's Create does: the reservation ends, the container is served."""
        self.group.release(cid)
        self.served.add(cid)


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


# --- the group's promises --------------------------------------------------------


async def test_shutdown_waits_for_reserved_containers(nursery: trio.Nursery) -> None:
    s = Shim(nursery, first="a")
    assert s.group.join("b") == 2  # a (the first) and b
    assert not s.group.shutdown("x")  # someone else's Shutdown: a and b still to come
    s.create("a")
    assert not s.group.shutdown("b")  # containerd gave up on b; a is served
    s.served.discard("a")  # a deleted
    assert (s.group.shutdown("a"), s.ended, s.group.closing) == (True, 1, True)
    with pytest.raises(errors.Unavailable):  # once ending, nobody joins
        s.group.join("c")
    assert s.group.shutdown("a", now=True) and s.ended == 1  # the shim is ended once


async def test_shutdown_now_ends_a_serving_shim(nursery: trio.Nursery) -> None:
    s = Shim(nursery, first="a")
    s.create("a")
    assert s.group.shutdown("a", now=True) and s.ended == 1


async def test_join_respects_the_limit_and_is_idempotent(nursery: trio.Nursery) -> None:
    s = Shim(nursery, first="a")
    assert s.group.join("b", limit=3) == 2
    assert s.group.join("b", limit=3) == 2  # a retried start: still one place
    assert s.group.join("c", limit=3) == 3
    with pytest.raises(errors.ResourceExhausted):
        s.group.join("d", limit=3)
    assert s.group.join("d") == 4  # no limit (a pod's or a label's group)
    s.create("b")
    assert s.group.join("b", limit=4) == 4  # served, not reserved again
    assert "b" not in s.group.reserved
    with pytest.raises(errors.InvalidArgument):
        s.group.join("")


async def test_release_and_lapse_end_a_reservation(nursery: trio.Nursery,
                                                   autojump_clock: trio.testing.MockClock
                                                   ) -> None:
    s = Shim(nursery)
    s.group.join("b")
    await trio.sleep(RESERVATION_TTL / 2)
    s.group.join("c")
    s.group.release("b")  # containerd gave up on b before its Create (a Delete naming it)
    assert s.group.reserved.keys() == {"c"}
    await trio.sleep(RESERVATION_TTL / 2 + 1)
    assert s.group.reserved.keys() == {"c"}
    await trio.sleep(RESERVATION_TTL / 2)  # c lapsed, nothing served: the shim ends itself
    assert s.group.reserved == {} and s.ended == 1
    assert RESERVATION_TTL >= 60  # containerd creates within seconds of start


async def test_the_task_service_asks_its_group(nursery: trio.Nursery) -> None:
    """Join, Delete of a reserved id and Shutdown, through the Task service's rpcs."""
    ended: list[bool] = []
    service = TaskService(
        reaper=Reaper(subreaper=False), outbox=Outbox(_nowhere, "ns"), nursery=nursery,
        namespace="ns", request_shutdown=lambda: ended.append(True), first="a")
    joined = await service.join(group_pb2.JoinRequest(id="b", limit=4))
    assert joined.containers == 2
    with pytest.raises(errors.NotFound):  # containerd gave up on b before its Create
        await service.delete(shim_pb2.DeleteRequest(id="b"))
    assert list(service.group.reserved) == ["a"]
    await service.shutdown(shim_pb2.ShutdownRequest(id="x"))
    assert not ended  # a is still to come
    await service.shutdown(shim_pb2.ShutdownRequest(id="a"))
    assert ended == [True] and service.group.closing


async def _nowhere(event: Event) -> None:
    raise ConnectionError("no containerd in this test")


# --- start's Join call over a real socket -----------------------------------------


def _serve_in_thread(path: str, handler: Callable[[CallContext, bytes], Any] | None
                     ) -> tuple[threading.Thread, Callable[[], None]]:
    """A ttrpc server on ``path`` in its own trio thread; returns (thread, stop)."""
    ready = threading.Event()
    token: list[trio.lowlevel.TrioToken] = []
    stop_event: list[trio.Event] = []

    async def main() -> None:
        server = Server()
        if handler is not None:
            server.register(GROUP_SERVICE, {"Join": handler})
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(8)
        stop = trio.Event()
        stop_event.append(stop)
        token.append(trio.lowlevel.current_trio_token())
        async with trio.open_nursery() as n:
            await n.start(server.serve, trio.SocketListener(sock))
            ready.set()
            await stop.wait()
            n.cancel_scope.cancel()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert ready.wait(10)

    def stop() -> None:
        trio.from_thread.run_sync(stop_event[0].set, trio_token=token[0])
        thread.join(10)

    return thread, stop


@pytest.mark.parametrize(("status", "verdict"), [
    (None, _join.JOINED),
    (Code.RESOURCE_EXHAUSTED, _join.FULL),
    (Code.UNAVAILABLE, _join.CLOSING),
])
def test_join_over_ttrpc(tmp_path: Path, status: Code | None, verdict: str) -> None:
    seen: list[group_pb2.JoinRequest] = []

    async def handler(ctx: CallContext, payload: bytes) -> bytes:
        seen.append(group_pb2.JoinRequest.FromString(payload))
        if status is not None:
            raise RPCError(status, "no")
        return group_pb2.JoinResponse(containers=2).SerializeToString()

    path = str(tmp_path / "s")
    _, stop = _serve_in_thread(path, handler)
    try:
        assert _join.join(path, "c1", 7) == verdict
    finally:
        stop()
    assert [(r.id, r.limit) for r in seen] == [("c1", 7)]


def test_join_an_old_shim_without_the_service_is_joined(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    _, stop = _serve_in_thread(path, None)
    try:
        assert _join.join(path, "c1", 0) == _join.JOINED  # UNIMPLEMENTED: as start did before
    finally:
        stop()


def test_join_dead_and_silent_shims(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    assert _join.join(path, "c1", 0) == _join.GONE  # no file
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(path)
    dead.close()
    assert _join.join(path, "c1", 0) == _join.GONE  # a file nobody listens on
    os.unlink(path)
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(path)
    silent.listen(1)
    try:
        assert _join.join(path, "c1", 0, timeout=0.2) == _join.CLOSING  # never answers
    finally:
        silent.close()


def test_join_request_bytes_match_the_generated_classes() -> None:
    frame = _join.encode_request("c1", 16, timeout=2.0)
    length = int.from_bytes(frame[:4], "big")
    assert len(frame) == 10 + length and frame[4:10] == b"\x00\x00\x00\x01\x01\x00"
    body = dict(fields(frame[10:]))
    assert body[1] == GROUP_SERVICE.encode() and body[2] == b"Join"
    assert body[4] == 2_000_000_000
    assert isinstance(body[3], bytes)
    assert group_pb2.JoinRequest.FromString(body[3]) == group_pb2.JoinRequest(id="c1", limit=16)


def test_join_malformed_response_is_an_error() -> None:
    with pytest.raises(_join.JoinError):
        _join.decode_response(b"\x0a\x05\x08")  # a Status cut short
    with pytest.raises(_join.JoinError):
        _join.verdict(Code.PERMISSION_DENIED)


# --- start: which socket ----------------------------------------------------------


@pytest.fixture
def socket_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    short = Path(tempfile.mkdtemp(prefix="sg-", dir="/tmp"))  # 64-hex names: keep it short
    d = short / "s"
    monkeypatch.setattr(start, "SOCKET_DIR", str(d))
    yield d
    shutil.rmtree(short, ignore_errors=True)


def _flags() -> Flags:
    return Flags(namespace="ns", id="c9", address="/run/ctd.sock", action="start")


def test_claim_binds_a_free_socket(socket_dir: Path) -> None:
    address, listener = start.claim_socket(_flags(), "g", 4)
    assert listener is not None
    listener.close()
    assert address == start.socket_address("/run/ctd.sock", "ns", "g")


def test_claim_skips_a_full_shim_and_replaces_a_dead_one(socket_dir: Path) -> None:
    first = start.socket_path(start.socket_address("/run/ctd.sock", "ns", "g"))

    async def full(ctx: CallContext, payload: bytes) -> bytes:
        raise RPCError(Code.RESOURCE_EXHAUSTED, "full")

    socket_dir.mkdir()
    _, stop = _serve_in_thread(first, full)
    try:
        address, listener = start.claim_socket(_flags(), "g", 4)
    finally:
        stop()
    assert listener is not None
    listener.close()  # leaves its file behind: a dead shim's socket
    assert address == start.socket_address("/run/ctd.sock", "ns", "g#1")
    os.unlink(first)
    again, listener = start.claim_socket(_flags(), "g#1", 4)
    assert listener is not None  # the dead socket was replaced, not skipped
    listener.close()
    assert again == start.socket_address("/run/ctd.sock", "ns", "g#1")


def test_group_key_modes(tmp_path: Path) -> None:
    bundle = str(tmp_path)
    assert start.group_key("c1", bundle, "", 16, "") == ("c1", 0)
    assert start.group_key("c1", bundle, "container", 16, "") == ("c1", 0)
    assert start.group_key("c1", bundle, "namespace", 16, "/cg") == ("supervisor-shared//cg", 16)
    (tmp_path / "config.json").write_text(
        '{"annotations": {"io.kubernetes.cri.sandbox-id": "pod1"}}')
    assert start.group_key("c1", bundle, "namespace", 16, "") == ("pod1", 0)  # pods as before


def _no_options(data: bytes) -> Settings:
    raise AssertionError("no options were sent: nothing to decode")


def test_group_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(start.GROUP_ENV, raising=False)
    monkeypatch.delenv(start.GROUP_SIZE_ENV, raising=False)
    assert start.group_settings(b"", _no_options) == ("", start.DEFAULT_GROUP_SIZE, "")
    monkeypatch.setenv(start.GROUP_ENV, "namespace")
    monkeypatch.setenv(start.GROUP_SIZE_ENV, "4")
    assert start.group_settings(b"", _no_options) == ("namespace", 4, "")
    monkeypatch.setenv(start.GROUP_ENV, "pod")
    with pytest.raises(ValueError, match="SUPERVISOR_SHIM_GROUP"):
        start.group_settings(b"", _no_options)


# --- what the shim keeps in a bundle follows a container that remains ------------


def test_log_and_spool_follow_a_remaining_bundle(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for b in (first, second):
        (b / "work").mkdir(parents=True)
        os.mkfifo(b / "log")
    handler = shimlog.FifoLogHandler(str(first / "log"))
    root = logging.getLogger()
    root.addHandler(handler)
    spool = Spool(daemon.spool_path(str(first)))
    spool.add(Event(1, 0, "ns", "/tasks/exit", "t", b"x"))
    try:
        daemon._bundle_leaving(spool, str(second), [str(first)])  # not the one we use
        assert handler.path == str(first / "log")
        daemon._bundle_leaving(spool, str(first), [str(second)])
        assert handler.path == str(second / "log")
        assert spool.path == daemon.spool_path(str(second))
        spool.add(Event(2, 0, "ns", "/tasks/delete", "t", b"y"))  # the same open file
        assert [e.seq for e in Spool(spool.path).load()] == [1, 2]
        reader = os.open(second / "log", os.O_RDONLY | os.O_NONBLOCK)
        try:
            logging.getLogger("t").warning("after the move")
            assert b"after the move" in os.read(reader, 65536)
        finally:
            os.close(reader)
    finally:
        root.removeHandler(handler)
        handler.close()
        spool.close()


def test_start_reads_the_join_verdicts_by_value() -> None:
    assert (_join.JOINED, _join.GONE) == ("joined", "gone")  # start.claim_socket's strings


async def test_a_shim_left_with_only_lapsed_reservations_ends(
        nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    """A Join whose start gave up (or a first container whose Create never came) must not
    keep an empty shim alive forever: Shutdowns were refused while it was reserved."""
    s = Shim(nursery, first="a")
    s.group.join("b")
    s.create("a")
    s.served.discard("a")  # and a was deleted: its Shutdown is refused (b reserved)
    assert not s.group.shutdown("a")
    await trio.sleep(RESERVATION_TTL / 2)
    assert not s.ended
    await trio.sleep(RESERVATION_TTL / 2 + 1)
    assert s.ended == 1 and s.group.closing


async def test_a_served_shim_outlives_its_reservations(
        nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    s = Shim(nursery, first="a")
    s.create("a")
    s.group.join("b")
    await trio.sleep(RESERVATION_TTL * 2)
    assert not s.ended and s.group.reserved == {}


async def test_inspect_shows_reserved_places_and_an_ending_shim(nursery: trio.Nursery) -> None:
    async def version(binary: str) -> str:
        return "runc 1.1.5"

    service = TaskService(
        reaper=Reaper(subreaper=False), outbox=Outbox(_nowhere, "ns"), nursery=nursery,
        namespace="ns", request_shutdown=lambda: None, first="a")
    await service.join(group_pb2.JoinRequest(id="b"))
    inspector = introspect.IntrospectService(service, service.outbox, namespace="ns",
                                             address="unix:///x", version_probe=version)
    facts = await inspector.shim(introspect_pb2.ShimRequest())
    assert (list(facts.reserved), facts.closing) == (["a", "b"], False)
    await service.shutdown(shim_pb2.ShutdownRequest(id="b"))
    await service.shutdown(shim_pb2.ShutdownRequest(id="a"))
    facts = await inspector.shim(introspect_pb2.ShimRequest())
    assert (list(facts.reserved), facts.closing) == ([], True)
    assert cli.shim_json(facts)["closing"] is True


def test_group_settings_from_options_come_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(start.GROUP_ENV, "container")
    decoded = Settings(shim_group="namespace", shim_group_size=3, shim_cgroup="/cg")
    assert start.group_settings(b"any", lambda data: decoded) == ("namespace", 3, "/cg")
