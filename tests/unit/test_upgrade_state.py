"""The upgrade state (supervisor.handover): the golden format-1 document, validation, and
each object's export -> adopt round trip (issue 17 point 3)."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from supervisor import codesnap, daemon, handover, upgrade
from supervisor.api.events import task_pb2 as ev
from supervisor.events import Event, Outbox, Spool
from supervisor.exits import ExitOrder, Report
from supervisor.reaper import Exit, Reaper, spawn, zombies
from supervisor.task import TaskService

GOLDEN = Path(__file__).parent / "data" / "upgrade-state-v1.json"
GOLDEN_FDS = (900, 901)  # the fds the golden document names


@pytest.fixture
def golden_fds() -> Iterator[None]:
    """Sockets on the fd numbers the golden state names (a listener and a connection)."""
    a, b = socket.socketpair()
    try:
        for fd in GOLDEN_FDS:
            os.dup2(a.fileno(), fd)
        yield
    finally:
        a.close()
        b.close()
        for fd in GOLDEN_FDS:
            try:
                os.close(fd)
            except OSError:
                pass


def memfd(data: bytes) -> int:
    fd = os.memfd_create("state", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def golden() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(GOLDEN.read_text(encoding="utf-8"))
    return doc


def load_doc(doc: object) -> handover.State:
    fd = memfd(json.dumps(doc).encode())
    try:
        return handover.load(fd)
    finally:
        os.close(fd)


async def test_the_format_1_golden_state_loads_and_is_adopted(golden_fds: None) -> None:
    fd = memfd(GOLDEN.read_bytes())
    try:
        state = handover.load(fd)
        assert handover.load(fd) == state  # pread: the offset stays, the fallback reads it again
    finally:
        os.close(fd)
    assert state["format"] == 1
    tasks = state["tasks"]
    async with trio.open_nursery() as nursery:
        service = TaskService(reaper=Reaper(subreaper=False),
                              outbox=Outbox(_never, "k8s.io"), nursery=nursery,
                              namespace="k8s.io", request_shutdown=lambda: None)
        await service.adopt(tasks)
        web = service.containers["web"]
        assert web.created.is_set() and web.init.pid == 4200 and str(web.init.state) == "running"
        probe = web.execs["probe"]
        assert (probe.exit_status, probe.exited.is_set(), str(probe.state)) == (3, True,
                                                                                 "stopped")
        assert web.settings.shim_group == "namespace" and web.settings.systemd_cgroup
        assert not web.kill_all_on_exit
        assert web.rootfs[0].options[0] == "lowerdir=/l1:/l2"
        assert web.oom is not None and web.oom.seen == 1
        assert service.log_level.asked == 10
        assert set(service.group.reserved) == {"db"}
        # The init's exit, reaped after the upgrade, is reported (its pid is registered).
        assert service.order.exited(Exit(4200, 0)) and service.order.reporting("web")
        nursery.cancel_scope.cancel()
    outbox = Outbox.adopt(_never, "k8s.io", state["outbox"])
    (event,) = outbox.pending
    assert (event.seq, event.topic, event.attempts) == (7, "/tasks/exit", 2)
    assert outbox.stats.published == 7 and outbox.stats.delivered == 6
    assert outbox.publish(_exit_event()).seq == 8
    (handed,) = [daemon._handed_over(c) for c in state["server"]["connections"]]
    ((stream_id, request),) = handed.calls
    assert (stream_id, request.method, handed.snapshot.last_stream_id) == (1, "Wait", 1)
    assert len(handed.snapshot.unparsed) == 12 and handed.fileno == 901
    assert state["shim"]["cmdline"][-1] == "/run/containerd/containerd.sock"


async def _never(event: Event) -> None:
    raise ConnectionError("no containerd in a unit test")


def _exit_event() -> ev.TaskExit:
    return ev.TaskExit(container_id="web", id="web", pid=4200, exit_status=0)


async def test_task_service_export_is_what_adopt_took(golden_fds: None,
                                                      autojump_clock: trio.testing.MockClock
                                                      ) -> None:
    tasks = golden()["tasks"]
    async with trio.open_nursery() as nursery:
        service = TaskService(reaper=Reaper(subreaper=False), outbox=Outbox(_never, "k8s.io"),
                              nursery=nursery, namespace="k8s.io",
                              request_shutdown=lambda: None)
        await service.adopt(copy.deepcopy(tasks))
        exported = json.loads(json.dumps(service.export()))
        nursery.cancel_scope.cancel()
    for doc in (tasks, exported):
        for container in doc["containers"]:
            for process in [container["init"], *container["execs"]]:
                process.pop("io")  # the streams' own format (supervisor.io)
    assert exported == tasks


def test_the_exit_order_round_trips() -> None:
    order = ExitOrder()
    order.announcing("c")
    order.registered("c", "", 10)
    order.announced("c")
    order.announcing("c", "e")
    order.registered("c", "e", 11)
    order.announced("c", "e")
    assert order.exited(Exit(10, 0, 1.0))[0].container_id == "c"  # InitExited; waits for e
    copy_ = ExitOrder.adopt(json.loads(json.dumps(order.export())), Exit)
    assert copy_.export() == order.export()
    # The init's exit, waiting for the exec's, is released by it in the new object.
    assert copy_.exited(Exit(11, 1, 2.0)) == [Report("c", "e", Exit(11, 1, 2.0))]
    assert copy_.reported("c", "e") == [Report("c", "", Exit(10, 0, 1.0))]


async def test_outbox_pause_export_adopt_goes_on_from_the_spool(tmp_path: Path) -> None:
    sent: list[int] = []
    accept, second = trio.Event(), trio.Event()

    async def send(event: Event) -> None:
        if event.seq > 1:
            second.set()
            await accept.wait()  # containerd is slow from the second event on
        sent.append(event.seq)

    spool = Spool(str(tmp_path / "spool"))
    outbox = Outbox(send, "ns", spool=spool)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run)
        for _ in range(3):
            outbox.publish(_exit_event())
        await second.wait()
        paused = trio.Event()

        async def pause() -> None:
            await outbox.pause()
            paused.set()

        nursery.start_soon(pause)
        # The send under way (seq 2) is cancelled, not waited for: a Forward already
        # written stays owed on the connection the new code adopts (ContainerdEvents).
        await paused.wait()
        accept.set()
        await trio.testing.wait_all_tasks_blocked()
        assert sent == [1]  # 2 and 3 wait: paused
        assert [e.attempts for e in outbox.pending] == [0, 0]  # a cancel is no failed attempt
        state = json.loads(json.dumps(outbox.export()))
        nursery.cancel_scope.cancel()
    spool.close()
    again: list[int] = []

    async def send_again(event: Event) -> None:
        again.append(event.seq)

    adopted = Outbox.adopt(send_again, "ns", state)
    assert [e.seq for e in adopted.pending] == [2, 3]
    assert (adopted.stats.published, adopted.stats.delivered, adopted.stats.replayed) == (3, 1, 0)
    assert adopted.publish(_exit_event()).seq == 4
    async with trio.open_nursery() as nursery:
        nursery.start_soon(adopted.run)
        assert await adopted.flush(5)
        nursery.cancel_scope.cancel()
    assert again == [2, 3, 4]


async def test_a_paused_reaper_leaves_exits_to_its_successor() -> None:
    reaper = Reaper(subreaper=False)
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        with reaper.subscribe() as sub:
            reaper.pause()
            pid = spawn(["true"])
            while pid not in zombies():
                await trio.sleep(0.01)  # waiting for the kernel, not asserting a time
            await trio.testing.wait_all_tasks_blocked()
            assert sub.poll(pid) is None  # a zombie, left for whoever reaps next
        nursery.cancel_scope.cancel()  # (the exec: one reaper per process)
    successor = Reaper(subreaper=False)
    with successor.subscribe() as new_sub:
        async with trio.open_nursery() as nursery:
            await nursery.start(successor.run)  # drains at start
            assert new_sub.poll(pid) is not None
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(("path", "value", "message"), [
    (("format",), 2, "state format 2"),
    (("shim", "pid"), True, "state.shim.pid: bool True, not int"),
    (("tasks", "containers", 0, "init", "exited"), 1, "exited: int 1, not bool"),
    (("server", "connections", 0, "fd"), 902, "not in the state's fds"),
    (("fds",), [900, 901, 987], "fd 987 named by the state is not open"),
    (("outbox", "pending", 0, "seq"), "7", "seq: str"),
    (("tasks", "group", "reserved"), {"db": None}, "reserved['db']: NoneType"),
])
def test_a_state_that_is_wrong_is_refused_with_where_and_why(
        golden_fds: None, path: tuple[Any, ...], value: object, message: str) -> None:
    doc = golden()
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(handover.StateError, match=message.replace("[", r"\[")):
        load_doc(doc)


def test_missing_fields_and_non_json_are_refused(golden_fds: None) -> None:
    doc = golden()
    del doc["tasks"]["order"]
    with pytest.raises(handover.StateError, match=r"state.tasks: no 'order'"):
        load_doc(doc)
    fd = memfd(b"{not json")
    with pytest.raises(handover.StateError, match="not JSON"):
        handover.load(fd)
    os.close(fd)
    with pytest.raises(handover.StateError, match="not base64"):
        handover.unb64("***", "x")


def test_dump_writes_a_memfd_that_loads(golden_fds: None) -> None:
    state = load_doc(golden())
    fd = handover.dump(state)
    try:
        assert not os.get_inheritable(fd)
        assert handover.load(fd) == state
    finally:
        os.close(fd)


def test_the_installed_code_passes_its_check() -> None:
    out = subprocess.run(handover.check_argv(), capture_output=True, text=True, check=True,
                         timeout=60)
    answer = json.loads(out.stdout)
    assert answer["formats"] == list(handover.FORMATS) and answer["code"]


def test_the_entry_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert upgrade.main(["--adopt", "x", "--fallback", "3"]) == 2
    assert upgrade.main(["--bogus"]) == 2
    assert "usage" in capsys.readouterr().err


def test_a_code_snapshot_runs_the_upgrade_entry_from_the_zip(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPERVISOR_CODE_IDENTITY", "test-code-1")
    snap = codesnap.ensure("test-code-1", str(tmp_path))
    try:
        assert snap.path == codesnap.snapshot_path("test-code-1", str(tmp_path))
        with zipfile.ZipFile(snap.path) as z:
            names = set(z.namelist())
        assert {"__main__.py", "supervisor/upgrade.py", "supervisor/handover.py"} <= names
        os.set_inheritable(snap.fd, True)
        out = subprocess.run([sys.executable, "-I", f"/proc/self/fd/{snap.fd}", "--check"],
                             capture_output=True, text=True, timeout=60, close_fds=False,
                             check=False)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["code"] == "test-code-1"
        again = codesnap.ensure("test-code-1", str(tmp_path))  # already there: used as it is
        again.close()
    finally:
        snap.close()


def test_a_new_snapshot_prunes_the_others_and_theirs_stay_readable(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One copy per code installed, not one per code ever run: /run is memory.
    monkeypatch.setenv("SUPERVISOR_CODE_IDENTITY", "old-code")
    old = codesnap.ensure("old-code", str(tmp_path))
    assert codesnap.open_existing("new-code", str(tmp_path)) is None
    monkeypatch.setenv("SUPERVISOR_CODE_IDENTITY", "new-code")
    new = codesnap.ensure("new-code", str(tmp_path))
    try:
        assert os.listdir(tmp_path) == [os.path.basename(new.path)]
        with zipfile.ZipFile(f"/proc/self/fd/{old.fd}") as z:  # the old shim's copy lives on
            assert "supervisor/upgrade.py" in z.namelist()
        again = codesnap.open_existing("new-code", str(tmp_path))
        assert again is not None and again.path == new.path
        again.close()
    finally:
        old.close()
        new.close()


def test_no_snapshot_of_code_that_changed_on_disk(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPERVISOR_CODE_IDENTITY", "what is on disk now")
    with pytest.raises(ValueError, match="changed"):
        codesnap.ensure("what this shim started with", str(tmp_path))
    assert os.listdir(tmp_path) == []
