"""The Task service's event order with the races forced by script, not by luck.

The runtime is scripted (:class:`ScriptedContainer` stands in for runc), and the
reaper is told of exits at the exact moment a test chooses -- e.g. while Start
is still inside ``runc start`` -- so each race happens every run.  What
containerd would see is read from the outbox (nothing delivers it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing

from supervisor import task
from supervisor.api.task.v2 import shim_pb2 as api
from supervisor.container import Container, Started
from supervisor.events import Event, Outbox
from supervisor.process import Process, State
from supervisor.reaper import Exit, Reaper
from supervisor.runtime import OCIRuntimeError

INIT_PID = 100
EXEC_PIDS = {"e1": 201, "e2": 202}
SPEC = b'{"args": ["sleep", "1000"]}'

Hook = Callable[[], Awaitable[None]]


class ScriptedReaper(Reaper):
    """A reaper whose exits the test makes up (it reaps nothing)."""

    def __init__(self) -> None:
        super().__init__(subreaper=False)

    def reap(self, pid: int, status: int) -> None:
        for sub in list(self._subscribers):
            sub._deliver(Exit(pid, status))


class ScriptedContainer(Container):
    """The real Container with runc replaced by a script: no processes, no bundle."""

    #: Called inside ``runc start`` / ``runc exec`` (set by the test before the call).
    during_start: Hook | None = None
    during_exec: Hook | None = None
    exec_fails = False

    async def create(self, nursery: trio.Nursery) -> Started:
        self.kill_all_on_exit = False
        self.init.pid = INIT_PID
        return Started(INIT_PID, None)

    async def start_init(self) -> None:
        self.init.check("start")
        if self.during_start is not None:
            await self.during_start()
        if self.init.state is State.CREATED:  # as Container.start_init: a Delete came first
            self.init.transition("start")

    async def start_exec(self, process: Process, nursery: trio.Nursery) -> Started:
        process.check("start")
        if self.during_exec is not None:
            await self.during_exec()
        if self.exec_fails:
            raise OCIRuntimeError("exec", "cannot exec in a stopped container", 1)
        process.pid = EXEC_PIDS[process.exec_id]
        process.transition("start")
        return Started(process.pid, None)


async def _nowhere(event: Event) -> None:
    raise ConnectionError("no containerd in this test")


class Harness:
    def __init__(self, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(task, "Container", ScriptedContainer)
        self.reaper = ScriptedReaper()
        self.outbox = Outbox(_nowhere, "ns")
        self.service = task.TaskService(reaper=self.reaper, outbox=self.outbox,
                                        nursery=nursery, namespace="ns",
                                        request_shutdown=lambda: None)
        nursery.start_soon(self.service.run_exits)

    def events(self) -> list[str]:
        """What containerd would have been told, e.g. ``exit c1/e1 0``."""
        out = []
        for e in self.outbox.pending:
            kind = e.topic.rsplit("/", 1)[-1]
            if kind == "exit":
                exit_ = task.ev.TaskExit.FromString(e.payload)
                kind = f"exit {exit_.container_id}/{exit_.id} {exit_.exit_status}"
            out.append(kind)
        return out

    @property
    def container(self) -> ScriptedContainer:
        c = self.service.containers["c1"]
        assert isinstance(c, ScriptedContainer)
        return c

    async def create_and_start(self) -> None:
        await self.service.create(api.CreateTaskRequest(id="c1", bundle="/nonexistent"))
        await self.service.start(api.StartRequest(id="c1"))

    async def exec(self, exec_id: str) -> Any:
        await self.service.exec(api.ExecProcessRequest(id="c1", exec_id=exec_id,
                                                       spec=_spec()))
        return await self.service.start(api.StartRequest(id="c1", exec_id=exec_id))


def _spec() -> Any:
    spec = api.ExecProcessRequest().spec
    spec.value = SPEC
    return spec


@pytest.fixture
async def shim(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Harness]:
    async with trio.open_nursery() as nursery:
        yield Harness(nursery, monkeypatch)
        nursery.cancel_scope.cancel()


async def test_an_exit_during_start_comes_after_task_start(shim: Harness) -> None:
    await shim.service.create(api.CreateTaskRequest(id="c1", bundle="/nonexistent"))
    seen_inside: list[list[str]] = []

    async def init_dies_inside_runc_start() -> None:
        shim.reaper.reap(INIT_PID, 137)
        await trio.testing.wait_all_tasks_blocked()  # run_exits has seen it
        seen_inside.append(shim.events())

    shim.container.during_start = init_dies_inside_runc_start
    await shim.service.start(api.StartRequest(id="c1"))
    await trio.testing.wait_all_tasks_blocked()
    assert seen_inside == [["create"]]  # held while Start had not published TaskStart
    assert shim.events() == ["create", "start", "exit c1/c1 137"]
    waited = await shim.service.wait(api.WaitRequest(id="c1"))
    assert waited.exit_status == 137


async def test_the_init_exit_waits_for_a_running_exec(shim: Harness) -> None:
    await shim.create_and_start()
    await shim.exec("e1")
    shim.reaper.reap(INIT_PID, 137)
    await trio.testing.wait_all_tasks_blocked()
    assert "exit c1/c1 137" not in shim.events()  # e1 still runs
    shim.reaper.reap(EXEC_PIDS["e1"], 0)
    await trio.testing.wait_all_tasks_blocked()
    assert shim.events()[-2:] == ["exit c1/e1 0", "exit c1/c1 137"]


async def test_an_exec_that_fails_to_start_does_not_hold_the_init_exit_forever(
        shim: Harness) -> None:
    """The init dies while runc exec runs, so the exec fails: the init's TaskExit must
    still come (it waited for the exec being started, and nothing released it)."""
    await shim.create_and_start()

    async def init_dies_inside_runc_exec() -> None:
        shim.reaper.reap(INIT_PID, 137)
        await trio.testing.wait_all_tasks_blocked()

    shim.container.during_exec = init_dies_inside_runc_exec
    shim.container.exec_fails = True
    with pytest.raises(OCIRuntimeError):
        await shim.exec("e1")
    await trio.testing.wait_all_tasks_blocked()
    assert shim.events()[-1] == "exit c1/c1 137"
    with trio.fail_after(5):  # a hang would be the bug, not slowness
        waited = await shim.service.wait(api.WaitRequest(id="c1"))
    assert waited.exit_status == 137


async def test_delete_while_an_exit_is_held_reports_no_exit(shim: Harness) -> None:
    await shim.service.create(api.CreateTaskRequest(id="c1", bundle="/nonexistent"))
    deleted = trio.Event()

    async def delete_inside_runc_start() -> None:
        shim.reaper.reap(INIT_PID, 137)
        await trio.testing.wait_all_tasks_blocked()
        await shim.service.delete(api.DeleteRequest(id="c1"))
        deleted.set()

    async def no_runtime() -> None:
        shim.container.init.transition("delete")

    shim.container.during_start = delete_inside_runc_start
    shim.container.delete_init = no_runtime  # type: ignore[method-assign]
    await shim.service.start(api.StartRequest(id="c1"))
    await trio.testing.wait_all_tasks_blocked()
    assert deleted.is_set()
    assert "exit c1/c1 137" not in shim.events()  # discarded with the container
    assert shim.events()[:1] == ["create"] and "delete" in shim.events()
    deleted_event = next(e for e in shim.outbox.pending if e.topic == "/tasks/delete")
    assert task.ev.TaskDelete.FromString(deleted_event.payload).exit_status == 137


async def test_exits_of_unknown_pids_are_ignored(shim: Harness) -> None:
    await shim.create_and_start()
    shim.reaper.reap(4242, 0)  # runc itself, a logging binary, ...
    await trio.testing.wait_all_tasks_blocked()
    assert shim.events() == ["create", "start"]
