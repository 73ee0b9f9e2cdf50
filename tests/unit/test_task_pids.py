"""``Pids`` keeps a created task's init in its answer until Delete (issue 14, item 4).

containerd 1.7 and later, when they restart, delete every loaded task whose ``Pids`` answer
is empty and that is not a sandbox ("cleaning leaked shim process", for shims whose Create
never happened): a container that exited while containerd was down must not look like one.
The runtime is scripted (see test_task_exits.py): ``ps`` answers what the test says.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing
from test_task_exits import EXEC_PIDS, INIT_PID, Harness, ScriptedContainer

from supervisor import errors, task
from supervisor.api.task.v2 import shim_pb2 as api
from supervisor.runtime import OCIRuntimeError


class PsContainer(ScriptedContainer):
    """``runc ps`` answers :attr:`listed`, or fails with :attr:`ps_error`."""

    listed: list[int] = []
    ps_error: OCIRuntimeError | None = None

    async def pids(self) -> list[int]:
        if self.ps_error is not None:
            raise self.ps_error
        return list(self.listed)


@pytest.fixture
async def shim(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Harness]:
    async with trio.open_nursery() as nursery:
        h = Harness(nursery, monkeypatch)
        monkeypatch.setattr(task, "Container", PsContainer)
        yield h
        nursery.cancel_scope.cancel()


def _container(shim: Harness) -> PsContainer:
    c = shim.service.containers["c1"]
    assert isinstance(c, PsContainer)
    return c


async def _pids(shim: Harness) -> list[int]:
    return [p.pid for p in (await shim.service.pids(api.PidsRequest(id="c1"))).processes]


async def test_pids_of_a_running_task_are_the_runtimes(shim: Harness) -> None:
    await shim.create_and_start()
    await shim.exec("e1")
    _container(shim).listed = [INIT_PID, 7, EXEC_PIDS["e1"]]
    answer = await shim.service.pids(api.PidsRequest(id="c1"))
    assert [p.pid for p in answer.processes] == [INIT_PID, 7, EXEC_PIDS["e1"]]
    assert [p.HasField("info") for p in answer.processes] == [False, False, True]


async def test_pids_keeps_the_exited_init_until_delete(shim: Harness) -> None:
    await shim.create_and_start()
    _container(shim).listed = []  # runc ps lists nothing once the init is gone
    assert await _pids(shim) == [INIT_PID]  # exited, not yet processed by the shim
    shim.reaper.reap(INIT_PID, 7)
    await trio.testing.wait_all_tasks_blocked()
    assert shim.events()[-1] == "exit c1/c1 7"
    assert await _pids(shim) == [INIT_PID]
    _container(shim).ps_error = OCIRuntimeError("ps", "container does not exist", 1)
    assert await _pids(shim) == [INIT_PID]


async def test_pids_of_a_created_not_started_task_has_its_init(shim: Harness) -> None:
    await shim.service.create(api.CreateTaskRequest(id="c1", bundle="/nonexistent"))
    _container(shim).listed = []
    assert await _pids(shim) == [INIT_PID]


async def test_pids_of_a_running_init_still_reports_runtime_errors(shim: Harness) -> None:
    await shim.create_and_start()
    _container(shim).ps_error = OCIRuntimeError("ps", "cgroup gone", 1)
    with pytest.raises(OCIRuntimeError):
        await _pids(shim)


async def test_pids_of_a_task_never_created_is_not_found(shim: Harness) -> None:
    """containerd then cleans the shim up as a leaked one, as it intends."""
    with pytest.raises(errors.NotFound):
        await _pids(shim)
