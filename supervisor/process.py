"""One Process type (a container's init or an exec) whose lifecycle is a table.

Design
------
A process is *created* (the runtime has set it up), *running*, *paused* (init
only, through the freezer), *stopped* (it exited; its status and time are
kept for as long as the process object lives) and finally *deleted*.

:data:`TRANSITIONS` is the whole lifecycle: for each operation, the states it
is allowed in and the state it leads to.  :meth:`Process.check` consults it
before the runtime is asked to do anything, and an illegal call gets a
:class:`~supervisor.errors.FailedPrecondition` that names the state, e.g.
``cannot pause exec "e1" in stopped state``.

Delete is the one operation that is not a single step: it waits (the runtime,
the process's output) before the process is gone.  It checks the table when
it begins and changes the state only once its work is done
(:meth:`Process.deleted`), so a Delete cancelled half-way (a dropped
connection, a deadline) leaves the process as it was, and a repeated Delete
does the job again from the start (every step of it may be repeated).
:attr:`Process.deleting` lets one Delete at a time work on a process.

Invariants
----------
* ``exited`` is set once (:meth:`Process.set_exited`; the first status
  wins), after the exit status is stored and the process's output is done
  with: drained, given up on by the drain rule
  (:func:`supervisor.io.wait_delivered`), or delivered and closed by Delete.
  The Task service sets it as it publishes the TaskExit, or, for an init
  whose exit is never reported (deleted before it ran, or its exit held or
  waiting), when Delete's container part is done.  :meth:`Process.wait`
  answers from the stored status at any time after.
* An in-place upgrade carries the lifecycle as it is (:meth:`Process.export`,
  :meth:`Process.adopt`); its streams carry themselves (``Streams.pause``,
  ``export``, ``fds``, ``resume``: :mod:`supervisor.io`).
* Only the lifecycle lives here.  When an exit may be reported (TaskStart
  before TaskExit, the init's after its execs') is decided by
  :class:`supervisor.exits.ExitOrder`, which the Task service asks.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

import trio

from supervisor.errors import FailedPrecondition
from supervisor.handover import StateError, b64, unb64
from supervisor.io import Stdio, Streams

if TYPE_CHECKING:
    from supervisor.handover import ProcessState


class State(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    DELETED = "deleted"


_C, _R, _P, _S, _D = State.CREATED, State.RUNNING, State.PAUSED, State.STOPPED, State.DELETED

# operation -> {state it is allowed in: state it leads to}
TRANSITIONS: dict[str, dict[State, State]] = {
    "start": {_C: _R},
    "pause": {_R: _P},
    "resume": {_P: _R},
    "exit": {_C: _S, _R: _S, _P: _S},
    "delete": {_C: _D, _S: _D},
    "kill": {_C: _C, _R: _R, _P: _P, _S: _S},
    "exec": {_C: _C, _R: _R, _P: _P},
    "update": {_C: _C, _R: _R, _P: _P},
    "resize": {_C: _C, _R: _R, _P: _P, _S: _S},
    "closeio": {_C: _C, _R: _R, _P: _P, _S: _S},
    "stats": {_C: _C, _R: _R, _P: _P, _S: _S},
}


class Process:
    """A container's init process (``exec_id == ""``) or one of its execs."""

    def __init__(
        self,
        container_id: str,
        exec_id: str,
        stdio: Stdio,
        *,
        spec: bytes = b"",
    ) -> None:
        self.container_id = container_id
        self.exec_id = exec_id
        self.stdio = stdio
        self.spec = spec
        self.state = State.CREATED
        self.pid = 0
        self.exit_status = 0
        self.exited_at_ns = 0
        self.exited = trio.Event()
        self.io: Streams | None = None
        #: Held by the Delete at work on this process; a concurrent one waits for it.
        self.deleting = trio.Lock()

    @property
    def is_init(self) -> bool:
        return self.exec_id == ""

    @property
    def id(self) -> str:
        """The id containerd knows this process by (container id for init)."""
        return self.exec_id or self.container_id

    def describe(self) -> str:
        if self.is_init:
            return f"container {self.container_id!r}"
        return f"exec {self.exec_id!r} of container {self.container_id!r}"

    def check(self, operation: str) -> State:
        """The state ``operation`` leads to, or FailedPrecondition naming the state."""
        allowed = TRANSITIONS[operation]
        try:
            return allowed[self.state]
        except KeyError:
            raise FailedPrecondition(
                f"cannot {operation} {self.describe()} in {self.state} state"
            ) from None

    def transition(self, operation: str) -> None:
        self.state = self.check(operation)

    def deleted(self) -> None:
        """Delete's work is done: the process is deleted.

        Not :meth:`transition`: Delete checked ``"delete"`` when it began, and
        an operation that finished meanwhile (a Start that raced it) does not
        undo a deletion already done.
        """
        self.state = State.DELETED

    def set_exited(self, status: int, when: float | None = None) -> None:
        """Record the exit (idempotent; the first status wins); the output is done with
        (see the module's Invariants)."""
        if self.exited.is_set():
            return
        if self.state in TRANSITIONS["exit"]:
            self.state = TRANSITIONS["exit"][self.state]
        self.exit_status = status
        self.exited_at_ns = int((when if when is not None else time.time()) * 1e9)
        self.exited.set()

    async def wait(self) -> tuple[int, int]:
        await self.exited.wait()
        return self.exit_status, self.exited_at_ns

    # --- an in-place upgrade -----------------------------------------------------

    def export(self) -> ProcessState:
        """The process's facts (JSON-able); its streams' part is their own ``export()``."""
        return {
            "exec_id": self.exec_id, "state": str(self.state), "pid": self.pid,
            "exit_status": self.exit_status, "exited_at_ns": self.exited_at_ns,
            "exited": self.exited.is_set(),
            "stdio": {"stdin": self.stdio.stdin, "stdout": self.stdio.stdout,
                      "stderr": self.stdio.stderr, "terminal": self.stdio.terminal},
            "spec": b64(self.spec), "io": None if self.io is None else self.io.export(),
        }

    @classmethod
    def adopt(cls, container_id: str, state: ProcessState) -> Process:
        """The process :meth:`export` described, without its streams (the container's
        :meth:`~supervisor.container.Container.adopt` rebuilds those)."""
        stdio = state["stdio"]
        process = cls(container_id, state["exec_id"],
                      Stdio(stdio["stdin"], stdio["stdout"], stdio["stderr"], stdio["terminal"]),
                      spec=unb64(state["spec"], "process spec"))
        try:
            process.state = State(state["state"])
        except ValueError:
            raise StateError(f"{process.describe()}: unknown state {state['state']!r}") from None
        process.pid = state["pid"]
        process.exit_status = state["exit_status"]
        process.exited_at_ns = state["exited_at_ns"]
        if state["exited"]:
            process.exited.set()
        return process


#: The stdio export of a process with no streams object (states of format 1 written
#: before stdio could be handed over hold it; the golden file does): nothing to carry,
#: the new code opens the process's (null) stdio afresh.
NULL_STREAMS: dict[str, object] = {"kind": "none"}

