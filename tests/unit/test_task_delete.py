"""Delete, cancelled half-way, never strands a task (issue 15 item 2).

containerd cancels a Delete by dropping its connection or by the request's
deadline (the ttrpc server cancels the handler).  The Task service runs on the
scripted runc of ``test_task_exits``; the process's output is a fake whose
delivery the test holds and releases, so a Delete is cancelled at the exact
point the defect lived: while it waits for output to drain.  A repeated Delete
must finish the job: TaskDelete once, the container or exec gone, its io
closed, and the shim free to end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from test_task_exits import EXEC_PIDS, INIT_PID, Harness

from supervisor import errors
from supervisor.api.events import task_pb2 as api_events
from supervisor.api.task.v2 import shim_pb2 as api
from supervisor.process import State


class HeldOutput:
    """A process's stdio whose output is delivered only once the test releases it."""

    def __init__(self) -> None:
        self.delivered = trio.Event()
        self.waiting = 0
        self.closed = False

    def close_stdin(self) -> None:
        pass

    async def wait_output(self, timeout: float | None = None) -> bool:
        self.waiting += 1
        try:
            await self.delivered.wait()
        finally:
            self.waiting -= 1
        return True

    def close(self) -> None:
        self.closed = True


class ScriptedRuntimeDelete:
    """``runc delete``: counts its calls, and blocks while ``hold`` is set."""

    def __init__(self) -> None:
        self.calls = 0
        self.hold = False
        self.release = trio.Event()

    async def __call__(self, container_id: str, *, force: bool = False) -> None:
        self.calls += 1
        if self.hold:
            await self.release.wait()


@pytest.fixture
async def harness(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Harness]:
    async with trio.open_nursery() as nursery:
        yield Harness(nursery, monkeypatch)
        nursery.cancel_scope.cancel()


def _deleted(harness: Harness) -> int:
    return harness.events().count("delete")


async def _exited(harness: Harness, pid: int, status: int = 0) -> None:
    harness.reaper.reap(pid, status)
    await trio.testing.wait_all_tasks_blocked()


async def _cancelled_delete(harness: Harness, request: api.DeleteRequest) -> None:
    """Start Delete, let it block, cancel it (as a dropped connection or a deadline does)."""
    outcome: list[str] = []

    async def delete(scope: trio.CancelScope) -> None:
        with scope:
            await harness.service.delete(request)
            outcome.append("finished")
        if scope.cancelled_caught:
            outcome.append("cancelled")

    scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(delete, scope)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
    assert outcome == ["cancelled"]


def _init_with_held_output(harness: Harness) -> tuple[HeldOutput, ScriptedRuntimeDelete]:
    output = HeldOutput()
    harness.container.init.io = output
    runc_delete = ScriptedRuntimeDelete()
    harness.container.runtime.delete = runc_delete  # type: ignore[method-assign]
    return output, runc_delete


async def test_a_cancelled_delete_of_the_init_is_finished_by_the_next(harness: Harness) -> None:
    await harness.create_and_start()
    await _exited(harness, INIT_PID, 3)
    output, runc_delete = _init_with_held_output(harness)

    await _cancelled_delete(harness, api.DeleteRequest(id="c1"))
    # Nothing was given up half-way: still served, still deletable, nothing announced.
    assert "c1" in harness.service.containers
    assert harness.container.init.state is State.STOPPED
    assert not output.closed
    assert _deleted(harness) == 0

    output.delivered.set()
    deleted = await harness.service.delete(api.DeleteRequest(id="c1"))
    assert (deleted.pid, deleted.exit_status) == (INIT_PID, 3)
    assert "c1" not in harness.service.containers
    assert output.closed
    assert _deleted(harness) == 1
    assert runc_delete.calls == 2  # runc delete is repeated (a gone container is fine)
    await harness.service.shutdown(api.ShutdownRequest(id="c1"))
    assert harness.service.group.closing  # the shim ends


async def test_a_delete_cancelled_inside_runc_delete_is_finished_by_the_next(
        harness: Harness) -> None:
    await harness.create_and_start()
    await _exited(harness, INIT_PID, 0)
    output, runc_delete = _init_with_held_output(harness)
    output.delivered.set()
    runc_delete.hold = True

    await _cancelled_delete(harness, api.DeleteRequest(id="c1"))
    assert "c1" in harness.service.containers and _deleted(harness) == 0

    runc_delete.hold = False
    await harness.service.delete(api.DeleteRequest(id="c1"))
    assert "c1" not in harness.service.containers and output.closed and _deleted(harness) == 1


async def test_a_cancelled_delete_of_an_exec_is_finished_by_the_next(harness: Harness) -> None:
    await harness.create_and_start()
    await harness.exec("e1")
    await _exited(harness, EXEC_PIDS["e1"], 5)
    exec_process = harness.container.execs["e1"]
    output = HeldOutput()
    exec_process.io = output

    await _cancelled_delete(harness, api.DeleteRequest(id="c1", exec_id="e1"))
    assert harness.container.execs.get("e1") is exec_process
    assert exec_process.state is State.STOPPED
    assert not output.closed

    output.delivered.set()
    deleted = await harness.service.delete(api.DeleteRequest(id="c1", exec_id="e1"))
    assert (deleted.pid, deleted.exit_status) == (EXEC_PIDS["e1"], 5)
    assert "e1" not in harness.container.execs
    assert exec_process.state is State.DELETED
    assert output.closed
    with pytest.raises(errors.NotFound):
        await harness.service.delete(api.DeleteRequest(id="c1", exec_id="e1"))


async def test_two_deletes_at_once_finish_once(harness: Harness) -> None:
    """Now that a Delete may be repeated, two at once must not both do the job."""
    await harness.create_and_start()
    await _exited(harness, INIT_PID, 0)
    output, _ = _init_with_held_output(harness)
    answers: list[str] = []

    async def delete() -> None:
        try:
            await harness.service.delete(api.DeleteRequest(id="c1"))
            answers.append("deleted")
        except errors.NotFound:
            answers.append("not found")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(delete)
        nursery.start_soon(delete)
        await trio.testing.wait_all_tasks_blocked()
        assert output.waiting == 1  # the second waits for the first, not for the output
        output.delivered.set()
    assert sorted(answers) == ["deleted", "not found"]
    assert _deleted(harness) == 1 and "c1" not in harness.service.containers


# --- Delete while the exit is being reported (review finding: TaskDelete before TaskExit) ---


def _task_delete_status(harness: Harness) -> int:
    event = next(e for e in harness.outbox.pending if e.topic == "/tasks/delete")
    return int(api_events.TaskDelete.FromString(event.payload).exit_status)


async def _killed_created_init_draining(harness: Harness) -> HeldOutput:
    """Create c1 (not started), kill its init: its exit is reported, its output held."""
    await harness.service.create(api.CreateTaskRequest(id="c1", bundle="/nonexistent"))
    output = HeldOutput()
    harness.container.init.io = output
    await _exited(harness, INIT_PID, 137)
    assert output.waiting == 1  # the exit's drain, before its TaskExit
    assert harness.events() == ["create"]
    return output


def _delete_init_without_yielding(harness: Harness) -> None:
    """delete_init that never yields (no rootfs, runc already gone, no io to wait for)."""

    async def delete_init() -> None:
        harness.container.init.check("delete")
        harness.container.init.deleted()

    harness.container.delete_init = delete_init  # type: ignore[method-assign]


async def test_delete_of_a_killed_created_init_comes_after_its_task_exit(
        harness: Harness) -> None:
    output = await _killed_created_init_draining(harness)
    _delete_init_without_yielding(harness)
    answers: list[api.DeleteResponse] = []

    async def delete() -> None:
        answers.append(await harness.service.delete(api.DeleteRequest(id="c1")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(delete)
        await trio.testing.wait_all_tasks_blocked()
        assert _deleted(harness) == 0  # waits for the exit under way
        output.delivered.set()
    assert harness.events() == ["create", "exit c1/c1 137", "delete"]
    assert _task_delete_status(harness) == 137
    assert answers[0].exit_status == 137
    assert "c1" not in harness.service.containers


async def test_delete_with_runc_of_a_killed_created_init_comes_after_its_task_exit(
        harness: Harness) -> None:
    """The real delete_init: it waits for the same output as the exit does."""
    output = await _killed_created_init_draining(harness)
    harness.container.runtime.delete = ScriptedRuntimeDelete()  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(harness.service.delete, api.DeleteRequest(id="c1"))
        await trio.testing.wait_all_tasks_blocked()
        output.delivered.set()
    assert harness.events() == ["create", "exit c1/c1 137", "delete"]
    assert _task_delete_status(harness) == 137 and output.closed


async def test_a_delete_cancelled_while_the_task_exit_is_under_way_still_finishes(
        harness: Harness) -> None:
    """Past delete_init the init is deleted: a cancelled Delete could not be repeated,
    so its wait for the TaskExit under way is shielded (and short: the output is closed)."""
    output = await _killed_created_init_draining(harness)
    _delete_init_without_yielding(harness)
    outcome: list[str] = []

    async def delete(scope: trio.CancelScope) -> None:
        with scope:
            await harness.service.delete(api.DeleteRequest(id="c1"))
            outcome.append("finished")

    scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(delete, scope)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert outcome == []
        output.delivered.set()
    assert outcome == ["finished"]
    assert harness.events() == ["create", "exit c1/c1 137", "delete"]
    assert "c1" not in harness.service.containers


async def test_deleting_a_created_init_warns_of_execs_the_order_counts_running(
        harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """The running execs are the exit order's (one fact): e1 started in the created
    container, e2 still inside runc exec."""
    await harness.service.create(api.CreateTaskRequest(id="c1", bundle="/nonexistent"))
    await harness.exec("e1")
    harness.container.runtime.delete = ScriptedRuntimeDelete()  # type: ignore[method-assign]

    async def delete_inside_runc_exec() -> None:
        await harness.service.delete(api.DeleteRequest(id="c1"))

    harness.container.during_exec = delete_inside_runc_exec
    with caplog.at_level("WARNING", logger="supervisor.task"):
        await harness.exec("e2")  # (the scripted runc exec succeeds all the same)
    assert "deleting with execs still running: e1, e2" in caplog.text
