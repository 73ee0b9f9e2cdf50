"""The process lifecycle table: legal moves, and errors that name the state."""

from __future__ import annotations

import pytest

from supervisor.errors import FailedPrecondition
from supervisor.io import Stdio
from supervisor.process import TRANSITIONS, Process, State


def make(exec_id: str = "") -> Process:
    return Process("c1", exec_id, Stdio())


def test_happy_path() -> None:
    p = make()
    assert p.state is State.CREATED
    p.transition("start")
    p.transition("pause")
    p.transition("resume")
    assert p.state is State.RUNNING
    p.set_exited(3, 1.5)
    assert p.state is State.STOPPED
    assert (p.exit_status, p.exited_at_ns) == (3, 1_500_000_000)
    p.transition("delete")
    assert p.state is State.DELETED


@pytest.mark.parametrize(
    ("state", "operation"),
    [
        (State.CREATED, "pause"),
        (State.CREATED, "resume"),
        (State.RUNNING, "start"),
        (State.RUNNING, "delete"),
        (State.PAUSED, "delete"),
        (State.STOPPED, "start"),
        (State.STOPPED, "pause"),
        (State.STOPPED, "exec"),
        (State.DELETED, "kill"),
    ],
)
def test_illegal_calls_name_the_state(state: State, operation: str) -> None:
    p = make()
    p.state = state
    with pytest.raises(FailedPrecondition, match=f"cannot {operation} container 'c1' in {state}"):
        p.transition(operation)
    assert p.state is state


def test_exec_error_names_the_exec() -> None:
    p = make("e1")
    p.state = State.STOPPED
    with pytest.raises(FailedPrecondition, match="exec 'e1' of container 'c1' in stopped state"):
        p.check("start")


def test_first_exit_wins() -> None:
    p = make()
    p.transition("start")
    p.set_exited(1)
    p.set_exited(2)
    assert p.exit_status == 1


async def test_wait_answers_after_the_exit() -> None:
    p = make()
    p.transition("start")
    p.set_exited(9, 2.0)
    assert await p.wait() == (9, 2_000_000_000)


def test_table_is_closed() -> None:
    for operation, moves in TRANSITIONS.items():
        assert State.DELETED not in moves or operation == "delete", operation
        for target in moves.values():
            assert isinstance(target, State)
