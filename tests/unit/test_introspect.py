"""The Introspect service against a TaskService-shaped fake, real Process/ProcessIO/Outbox."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import trio

from supervisor import ttrpc
from supervisor.api.events import task_pb2 as ev
from supervisor.api.introspect import introspect_pb2 as pb
from supervisor.console import Console
from supervisor.events import Event, Outbox
from supervisor.handover import UpgradeRecord
from supervisor.introspect import (
    SERVICE,
    VERSION_WAIT,
    IntrospectService,
    VersionProbe,
    probe_runtime_version,
)
from supervisor.io import Backlog, ProcessIO, Stdio, StreamCounters
from supervisor.process import Process, State
from supervisor.reaper import Reaper


@dataclass
class FakeRuntime:
    binary: str = "runc"


@dataclass
class FakeContainer:
    """Shaped like supervisor.container.Container (what introspection reads)."""

    id: str
    bundle: str
    namespace: str = "default"
    runtime: FakeRuntime = field(default_factory=FakeRuntime)
    execs: dict[str, Process] = field(default_factory=dict)
    created: trio.Event = field(default_factory=trio.Event)
    init: Process = field(init=False)

    def __post_init__(self) -> None:
        self.init = Process(self.id, "", Stdio())


@dataclass
class FakeGroup:
    """Shaped like supervisor.group.Group (what introspection reads)."""

    reserved: dict[str, float] = field(default_factory=dict)
    closing: bool = False


@dataclass
class FakeTasks:
    """Shaped like supervisor.task.TaskService (containers, started_at, reaper, nursery)."""

    nursery: trio.Nursery
    containers: dict[str, FakeContainer] = field(default_factory=dict)
    started_at: float = field(default_factory=lambda: time.time() - 5)
    reaper: Reaper = field(default_factory=lambda: Reaper(subreaper=False))
    group: FakeGroup = field(default_factory=FakeGroup)


class Sender:
    """A stand-in for containerd's Events/Forward that can be switched off."""

    def __init__(self) -> None:
        self.up = False
        self.got: list[Event] = []

    async def send(self, event: Event) -> None:
        if not self.up:
            raise ConnectionRefusedError("containerd is down")
        self.got.append(event)


def running(c: FakeContainer, pid: int) -> None:
    c.init.pid = pid
    c.init.state = State.RUNNING
    c.created.set()


async def version_ok(binary: str) -> str:
    return f"{binary} version 9.9.9"


def make_service(tasks: FakeTasks, outbox: Outbox,
                 version_probe: VersionProbe = version_ok) -> IntrospectService:
    return IntrospectService(tasks, outbox, namespace="default",
                             address="unix:///run/containerd/s/abc", version_probe=version_probe)


@pytest.fixture
def sender() -> Sender:
    return Sender()


@pytest.fixture
async def outbox(sender: Sender, nursery: trio.Nursery) -> AsyncIterator[Outbox]:
    box = Outbox(sender.send, "default")
    nursery.start_soon(box.run)
    yield box


async def test_containers_report_every_process(nursery: trio.Nursery, outbox: Outbox) -> None:
    tasks = FakeTasks(nursery)
    c = FakeContainer("c1", "/b/c1")
    c.init.stdio = Stdio("/fifo/in", "/fifo/out", "/fifo/err")
    running(c, 4242)
    pio = ProcessIO(c.init.stdio)
    pio.counters.stdin, pio.counters.stdout, pio.counters.stderr = 3, 1000, 7
    c.init.io = pio
    e1 = Process("c1", "e1", Stdio(stdout="file:///var/log/e1.log"))
    e1.pid, e1.state = 4300, State.RUNNING
    e1.set_exited(137, when=1_700_000_000.5)
    e1.io = ProcessIO(e1.stdio)
    c.execs["e1"] = e1
    c.execs["a0"] = Process("c1", "a0", Stdio(terminal=True))
    tasks.containers["c1"] = c
    tasks.containers["c0"] = FakeContainer("c0", "/b/c0")  # Create still running
    service = make_service(tasks, outbox)

    got = await service.containers(pb.ContainersRequest())
    assert [x.id for x in got.containers] == ["c0", "c1"]
    c0, c1 = got.containers
    assert not c0.created and c0.init.status == "created" and c0.init.pid == 0
    assert (c1.id, c1.bundle, c1.namespace, c1.runtime_binary) == ("c1", "/b/c1", "default",
                                                                    "runc")
    assert c1.created
    init = c1.init
    assert (init.exec_id, init.pid, init.status, init.exited) == ("", 4242, "running", False)
    assert not init.HasField("exited_at")
    assert (init.stdio.stdin, init.stdio.stdout, init.stdio.stderr) == (
        "/fifo/in", "/fifo/out", "/fifo/err")
    assert (init.io.kind, init.io.stdin_bytes, init.io.stdout_bytes, init.io.stderr_bytes) == (
        "pipes", 3, 1000, 7)
    assert [x.exec_id for x in c1.execs] == ["a0", "e1"]
    a0, stopped = c1.execs
    assert a0.stdio.terminal and a0.io.kind == "none"
    assert (stopped.pid, stopped.status, stopped.exit_status, stopped.exited) == (
        4300, "stopped", 137, True)
    assert stopped.exited_at.ToNanoseconds() == 1_700_000_000_500_000_000
    assert stopped.stdio.stdout == "file:///var/log/e1.log"

    only = await service.containers(pb.ContainersRequest(id="c1"))
    assert [x.id for x in only.containers] == ["c1"]
    none = await service.containers(pb.ContainersRequest(id="nope"))
    assert list(none.containers) == []


async def test_terminal_and_logging_binary_counters(nursery: trio.Nursery,
                                                    outbox: Outbox) -> None:
    tasks = FakeTasks(nursery)
    c = FakeContainer("t1", "/b/t1")
    running(c, 10)
    c.init.stdio = Stdio("/in", "/out", "", terminal=True)
    master, slave = os.openpty()
    console = Console(master)
    try:
        console.counters.stdin, console.counters.stdout = 5, 50
        c.init.io = console
        logged = Process("t1", "log", Stdio(stdout="binary:///usr/bin/logger?x=1"))
        logged.io = ProcessIO(logged.stdio)
        c.execs["log"] = logged
        tasks.containers["t1"] = c
        got = (await make_service(tasks, outbox).containers(pb.ContainersRequest()))
        init = got.containers[0].init
        assert (init.io.kind, init.io.stdin_bytes, init.io.stdout_bytes) == ("terminal", 5, 50)
        assert got.containers[0].execs[0].io.kind == "binary"
    finally:
        console.close()
        os.close(slave)


async def wait_until(predicate: object, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():  # type: ignore[operator]
            await trio.sleep(0.01)


class FakeStreams:
    """Any Streams: introspection reads only the protocol's counters, no concrete type."""

    def __init__(self, counters: StreamCounters) -> None:
        self.counters = counters

    def close_stdin(self) -> None:
        pass

    async def wait_output(self, timeout: float | None = None) -> bool:
        return True

    def close(self) -> None:
        pass


async def test_backlog_counters_come_from_the_streams_protocol(nursery: trio.Nursery,
                                                               outbox: Outbox) -> None:
    tasks = FakeTasks(nursery)
    c = FakeContainer("b1", "/b/b1")
    running(c, 11)
    out = Backlog("", limit=1 << 20)
    out.append(b"x" * 40)
    out.dropped = 9
    c.init.io = FakeStreams(StreamCounters(kind="pipes", stdout=100, stderr=2,
                                           backlogs={"stdout": out}))
    tasks.containers["b1"] = c
    got = (await make_service(tasks, outbox).containers(pb.ContainersRequest()))
    io = got.containers[0].init.io
    assert (io.kind, io.stdout_bytes, io.stderr_bytes) == ("pipes", 100, 2)
    assert (io.stdout_backlog_bytes, io.stdout_dropped_bytes) == (40, 9)
    assert (io.stderr_backlog_bytes, io.stderr_dropped_bytes) == (0, 0)


async def test_events_pending_errors_and_recent(nursery: trio.Nursery, outbox: Outbox,
                                                sender: Sender) -> None:
    service = make_service(FakeTasks(nursery), outbox)
    outbox.publish(ev.TaskStart(container_id="c1", pid=7))
    outbox.publish(ev.TaskExit(container_id="c1", id="e1", pid=8, exit_status=137))
    await wait_until(lambda: outbox.stats.last_error)
    got = await service.events(pb.EventsRequest())
    assert (got.published, got.delivered, got.pending_count) == (2, 0, 2)
    assert [e.topic for e in got.pending] == ["/tasks/start", "/tasks/exit"]
    assert [(e.container_id, e.process_id) for e in got.pending] == [("c1", ""), ("c1", "e1")]
    assert got.pending[0].attempts >= 1
    assert "containerd is down" in got.pending[0].first_error
    assert "ConnectionRefusedError" in got.last_error
    assert abs(got.last_error_at.ToNanoseconds() / 1e9 - time.time()) < 5
    assert got.oldest_pending_age_seconds >= 0
    assert got.pending[0].timestamp.ToNanoseconds() > 0
    assert list(got.recent) == []
    limited = await service.events(pb.EventsRequest(limit=1))
    assert limited.pending_count == 2 and len(limited.pending) == 1

    sender.up = True
    await wait_until(lambda: not outbox.pending)
    got = await service.events(pb.EventsRequest())
    assert (got.published, got.delivered, got.pending_count) == (2, 2, 0)
    assert got.oldest_pending_age_seconds == 0
    assert [(e.seq, e.topic) for e in got.recent] == [(1, "/tasks/start"), (2, "/tasks/exit")]


async def test_shim_facts_and_version_probed_once(nursery: trio.Nursery,
                                                  outbox: Outbox) -> None:
    calls: list[str] = []

    async def probe(binary: str) -> str:
        calls.append(binary)
        return "crun version 1.8"

    tasks = FakeTasks(nursery)
    c = FakeContainer("c1", "/b", runtime=FakeRuntime("/usr/bin/crun"))
    running(c, 1)
    tasks.containers["c1"] = c
    service = make_service(tasks, outbox, version_probe=probe)
    for _ in range(3):
        got = await service.shim(pb.ShimRequest())
        assert got.runtime_version == "crun version 1.8"
    assert calls == ["/usr/bin/crun"]
    assert got.pid == os.getpid() and got.namespace == "default"
    assert got.address == "unix:///run/containerd/s/abc"
    assert 4 <= got.uptime_seconds < 60
    assert got.started_at.ToNanoseconds() == int(tasks.started_at * 1e9)
    assert got.memory_rss_bytes == pytest.approx(psutil.Process().memory_info().rss, rel=0.5)
    assert got.open_fds > 0 and got.container_count == 1
    assert got.runtime_binary == "/usr/bin/crun" and got.version and got.python_version


async def test_slow_or_failing_version_probe_never_blocks(nursery: trio.Nursery,
                                                          outbox: Outbox) -> None:
    release = trio.Event()

    async def slow(binary: str) -> str:
        await release.wait()
        return "runc version 1.1"

    service = make_service(FakeTasks(nursery), outbox, version_probe=slow)
    start = trio.current_time()
    got = await service.shim(pb.ShimRequest())
    assert trio.current_time() - start < VERSION_WAIT + 0.5
    assert got.runtime_binary == "runc" and got.runtime_version == ""
    release.set()
    await wait_until(lambda: service._versions.lookup("runc") is not None)
    assert (await service.shim(pb.ShimRequest())).runtime_version == "runc version 1.1"

    async def broken(binary: str) -> str:
        raise FileNotFoundError(2, "No such file or directory", binary)

    got = await make_service(FakeTasks(nursery), outbox, version_probe=broken).shim(
        pb.ShimRequest())
    assert got.runtime_version == "" and "No such file" in got.runtime_version_error


async def test_probe_runtime_version_through_the_reaper(nursery: trio.Nursery,
                                                        tmp_path: Path) -> None:
    reaper = Reaper(subreaper=False)
    await nursery.start(reaper.run)
    ok = tmp_path / "okrt"
    ok.write_text("#!/bin/sh\necho 'okrt version 1.2.3'\necho 'commit: abc'\n")
    hang = tmp_path / "hangrt"
    hang.write_text("#!/bin/sh\nexec sleep 30\n")
    for p in (ok, hang):
        p.chmod(0o755)
    assert await probe_runtime_version(reaper, str(ok)) == "okrt version 1.2.3"
    with pytest.raises(TimeoutError):
        await probe_runtime_version(reaper, str(hang), timeout=0.3)
    with pytest.raises(OSError):
        await probe_runtime_version(reaper, str(tmp_path / "missing"))
    # The hung one was killed and reaped: no sleep 30 left behind.
    await wait_until(lambda: not any(
        p.info["cmdline"][:2] == ["sleep", "30"] and p.info["ppid"] == os.getpid()
        for p in psutil.process_iter(["cmdline", "ppid"]) if p.info["cmdline"]))


@pytest.fixture
def sock_path() -> Iterator[Path]:
    # Short: AF_UNIX paths are limited to 108 bytes.
    d = Path(os.environ.get("TMPDIR", "/tmp")) / f"svi-{os.getpid()}-{time.monotonic_ns()}"
    d.mkdir()
    yield d / "s"
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


async def test_served_over_ttrpc(nursery: trio.Nursery, outbox: Outbox,
                                 sock_path: Path) -> None:
    tasks = FakeTasks(nursery)
    c = FakeContainer("c1", "/b")
    running(c, 99)
    tasks.containers["c1"] = c
    server = ttrpc.Server()
    server.register(SERVICE, make_service(tasks, outbox).handlers())
    await nursery.start(server.serve, await ttrpc.open_unix_listener(sock_path))
    async with await ttrpc.connect_unix(sock_path) as client:
        raw = await client.call(SERVICE, "Containers", b"", timeout=2)
        assert pb.ContainersResponse.FromString(raw).containers[0].init.pid == 99
        raw = await client.call(SERVICE, "Events", b"", timeout=2)
        assert pb.EventsResponse.FromString(raw).pending_count == 0
        with pytest.raises(ttrpc.RPCError) as info:
            await client.call(SERVICE, "Containers", b"\xff\xff", timeout=2)
        assert info.value.code is ttrpc.Code.INVALID_ARGUMENT
    await server.shutdown(1)




async def test_shim_tells_its_code_and_upgrades(nursery: trio.Nursery, outbox: Outbox) -> None:
    record = UpgradeRecord("0.1.0+abc", upgrades=2, upgrade_attempts=3,
                           last_upgrade_error="", upgraded_at=1764450000.5)
    service = IntrospectService(FakeTasks(nursery), outbox, namespace="default",
                                address="unix:///s", version_probe=version_ok,
                                upgrades=record)
    got = await service.shim(pb.ShimRequest())
    assert (got.code, got.upgrades, got.upgrade_attempts) == ("0.1.0+abc", 2, 3)
    assert got.upgraded_at.ToNanoseconds() == 1764450000500000000
    record.failed("calls in flight did not finish within 10s")
    got = await service.shim(pb.ShimRequest())
    assert (got.upgrades, got.upgrade_attempts) == (2, 4)
    assert got.last_upgrade_error == "calls in flight did not finish within 10s"
    never = await make_service(FakeTasks(nursery), outbox).shim(pb.ShimRequest())
    assert (never.code, never.upgrades) == ("", 0) and not never.HasField("upgraded_at")
