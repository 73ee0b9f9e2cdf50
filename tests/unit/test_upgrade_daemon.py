"""The old code's side of an upgrade (daemon.Upgrader), in process, up to the exec.

The exec itself is replaced: these tests check the state handed to it and that an
attempt that does not get there leaves the shim serving as before.
"""

from __future__ import annotations

import os
import socket
import typing
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from supervisor import codesnap, daemon, handover, ttrpc
from supervisor.api.events import task_pb2 as ev
from supervisor.api.task.v2 import shim_pb2 as api
from supervisor.container import Container
from supervisor.events import Event, Outbox
from supervisor.handover import UpgradeRecord
from supervisor.reaper import Exit, Reaper
from supervisor.task import RESUMABLE, SERVICE, TaskService


@dataclass
class Shim:
    upgrader: daemon.Upgrader
    server: ttrpc.Server
    client: ttrpc.Client
    reaper: Reaper
    outbox: Outbox
    sent: list[Event]


async def hang(ctx: ttrpc.CallContext, payload: bytes) -> bytes:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


@asynccontextmanager
async def shim(tmp_path: Path) -> AsyncIterator[Shim]:
    sent: list[Event] = []

    async def send(event: Event) -> None:
        sent.append(event)

    async with trio.open_nursery() as nursery:
        reaper = Reaper(subreaper=False)
        await nursery.start(reaper.run)
        outbox = Outbox(send, "ns")
        nursery.start_soon(outbox.run)
        shutdown = trio.Event()
        service = TaskService(reaper=reaper, outbox=outbox, nursery=nursery, namespace="ns",
                              request_shutdown=shutdown.set)
        nursery.start_soon(service.run_exits)
        server = ttrpc.Server()
        server.register(SERVICE, service.handlers(), resumable=RESUMABLE)
        server.register("test.Slow", {"Hang": hang})
        path = str(tmp_path / "s.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen()
        upgrader = daemon.Upgrader(
            server=server, service=service, outbox=outbox, listener=listener,
            sender=daemon.ContainerdEvents(""),
            facts=daemon.ShimFacts("ns", "", str(tmp_path), "", ("shim", "-id", "c1"), "shim"),
            record=UpgradeRecord("old-code"), nursery=nursery, closing=shutdown.is_set)
        upgrader.snapshot = codesnap.Snapshot(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC),
                                              "")
        server.register(daemon.UPGRADE_SERVICE, upgrader.handlers())
        await nursery.start(server.serve,
                            trio.SocketListener(trio.socket.from_stdlib_socket(listener)))
        client = await ttrpc.connect_unix(path)
        try:
            yield Shim(upgrader, server, client, reaper, outbox, sent)
        finally:
            upgrader.snapshot.close()
            await client.aclose()
            nursery.cancel_scope.cancel()


async def connect(client: ttrpc.Client) -> api.ConnectResponse:
    reply = await client.call(SERVICE, "Connect",
                              api.ConnectRequest(id="none").SerializeToString())
    return api.ConnectResponse.FromString(reply)


async def test_a_failed_exec_resumes_everything_and_records_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    handed: list[handover.State] = []
    argvs: list[list[str]] = []

    def execv(path: str, argv: list[str]) -> None:
        argvs.append(argv)
        state_fd = int(argv[argv.index("--adopt") + 1])
        assert os.get_inheritable(state_fd)
        handed.append(handover.validate(handover.read(state_fd)))
        raise OSError(8, "Exec format error")

    monkeypatch.setattr(daemon.os, "execv", execv)
    async with shim(tmp_path) as s:
        assert (await connect(s.client)).shim_pid == os.getpid()
        await s.upgrader._attempt(5.0)
        (state,) = handed
        assert state["shim"]["code"] == "old-code" and state["shim"]["pid"] == os.getpid()
        (connection,) = state["server"]["connections"]
        assert connection["spoke"] and connection["calls"] == []
        assert set(state["fds"]) == {state["server"]["listener_fd"], connection["fd"]}
        assert all(os.get_inheritable(fd) for fd in state["fds"])
        assert argvs[0][-4:] == ["--", "shim", "-id", "c1"]  # ps still shows the shim
        record = s.upgrader.record
        assert (record.upgrades, record.upgrade_attempts) == (0, 1)
        assert "Exec format error" in record.last_upgrade_error
        # Serving on: the server reads, the reaper reaps, the outbox forwards.
        assert not (s.server.quiescing or s.reaper.paused or s.upgrader.under_way)
        assert (await connect(s.client)).shim_pid == os.getpid()
        s.outbox.publish(ev.TaskPaused(container_id="c1"))
        assert await s.outbox.flush(5)
        assert [e.topic for e in s.sent] == ["/tasks/paused"]


async def test_a_call_that_does_not_finish_calls_the_upgrade_off(
        tmp_path: Path, autojump_clock: trio.testing.MockClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    def execv(path: str, argv: list[str]) -> None:
        raise AssertionError("no exec while a call is in flight")

    monkeypatch.setattr(daemon.os, "execv", execv)
    async with shim(tmp_path) as s, trio.open_nursery() as nursery:
        nursery.start_soon(s.client.call, "test.Slow", "Hang", b"")
        await trio.testing.wait_all_tasks_blocked()
        await s.upgrader._attempt(3.0)
        assert s.upgrader.record.upgrade_attempts == 1
        assert s.upgrader.record.last_upgrade_error == "calls in flight did not finish within 3s"
        assert (await connect(s.client)).shim_pid == os.getpid()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("prepare", "code", "message"), [
    (lambda u: setattr(u, "under_way", True), ttrpc.Code.FAILED_PRECONDITION, "under way"),
    (lambda u: setattr(u, "snapshot", None), ttrpc.Code.UNAVAILABLE, "no copy of the running"),
    (lambda u: setattr(u, "closing", lambda: True), ttrpc.Code.FAILED_PRECONDITION, "ending"),
])
async def test_upgrade_refusals(tmp_path: Path, prepare: Callable[[daemon.Upgrader], None],
                                code: ttrpc.Code, message: str,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    # No snapshot: the Upgrade tries to make one, which fails (the code identity on disk
    # is not the shim's "old-code"), in a directory of the test's.
    monkeypatch.setenv(codesnap.DIR_ENV, str(tmp_path / "code"))
    async with shim(tmp_path) as s:
        snapshot = s.upgrader.snapshot
        prepare(s.upgrader)
        with pytest.raises(ttrpc.RPCError) as refused:
            await s.client.call(daemon.UPGRADE_SERVICE, "Upgrade", b"")
        assert refused.value.code is code and message in refused.value.message
        s.upgrader.snapshot = snapshot
        assert s.upgrader.record.upgrade_attempts == 0


async def test_a_process_whose_delete_was_cut_off_is_refused_with_why(tmp_path: Path) -> None:
    # delete_init closes the streams one by one; a cancelled Delete leaves the container
    # with closed streams, which are not handed over: refused before quiescing.
    async with shim(tmp_path) as s:
        process = SimpleNamespace(io=SimpleNamespace(closed=True),
                                  describe=lambda: "the init of 'cut'")
        created = trio.Event()
        created.set()
        s.upgrader.service.containers["cut"] = typing.cast("Container", SimpleNamespace(
            id="cut", created=created, all_processes=lambda: [process]))
        with pytest.raises(ttrpc.RPCError) as refused:
            await s.client.call(daemon.UPGRADE_SERVICE, "Upgrade", b"")
        assert refused.value.code is ttrpc.Code.FAILED_PRECONDITION
        assert refused.value.message == "the init of 'cut' is being deleted"
        assert s.upgrader.record.upgrade_attempts == 0
        del s.upgrader.service.containers["cut"]


async def test_settle_exits_takes_what_was_reaped_and_waits_for_reports_then_pauses(
        nursery: trio.Nursery) -> None:
    reaper = Reaper(subreaper=False)  # not run: the test delivers exits itself
    service = TaskService(reaper=reaper, outbox=Outbox(_never, "ns"), nursery=nursery,
                          namespace="ns", request_shutdown=lambda: None)
    nursery.start_soon(service.run_exits)
    reported = trio.Event()

    async def report() -> None:
        await reported.wait()

    service._track(report())  # an exit being reported (its output draining)
    for sub in list(reaper._subscribers):
        sub._deliver(Exit(424242, 0))  # reaped, not yet taken by run_exits
    settled = trio.Event()

    async def settle() -> None:
        await service.settle_exits()
        settled.set()

    nursery.start_soon(settle)
    await trio.testing.wait_all_tasks_blocked()
    assert not settled.is_set() and not reaper.paused  # the report is still under way
    assert service._exits.pending == 0  # what was reaped was taken first
    reported.set()
    await settled.wait()
    assert reaper.paused
    reaper.resume()
    assert not reaper.paused


async def _never(event: Event) -> None:
    raise ConnectionError("no containerd here")
