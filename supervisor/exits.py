"""The order of exit events containerd relies on, as one object with no I/O.

Design
------
:class:`ExitOrder` is told what happens to the shim's processes -- one is being
announced (Create, Start), its pid is known, an exit was reaped, the announcing
event is out, a TaskExit was published, a container or exec was deleted -- and
answers each with the :data:`Action` s the caller must take now, in order:

* :class:`Report`: drain that process's output, record its exit, publish its
  TaskExit, then tell :meth:`ExitOrder.reported`.
* :class:`InitExited`: the container's init is gone (its exit is no longer
  held); kill what it left behind if the container shares the host pid
  namespace.

An empty answer means *hold* (or *ignore*).  The object never waits, publishes
or touches a process; it keeps only what the rules need: pid -> process, and per
process whether it is being announced, its held exit, whether its exit was
seen, and whether it still counts as running.  Processes are named by
``(container id, exec id)``, ``""`` for the init.  It imports neither trio nor
protobuf, so the rules are tested with scripted sequences
(``tests/unit/test_exits.py``).

Invariants
----------
* TaskCreate/TaskStart/TaskExecStarted before that process's TaskExit: an exit
  reaped while its process is being announced (between :meth:`announcing` and
  :meth:`announced`) is held, and released by :meth:`announced`.
* An exit reaped before the process was registered (the launch subscription's
  early exit, :attr:`supervisor.container.Started.early_exit`) is applied by
  :meth:`registered`; an exit for a pid nobody registered is ignored.
* A process's exit is reported at most once: duplicates (the same exit seen by
  two subscriptions) are ignored.
* The init's TaskExit after the TaskExit of every exec still running when it
  exited: an exec counts as running while it is being announced and, once
  registered, until its TaskExit is published (:meth:`reported`) or it is
  deleted; one whose start failed before it was registered stops counting at
  :meth:`announced`.  The init's exit waits, and is released when the last one
  stops.
* Output is drained before an exit is reported: a :class:`Report` is *may
  report*, and the caller drains first; the process counts as running until
  :meth:`reported`, so an init waiting for it waits for the drain too.
* Delete discards (:meth:`forget`, :meth:`forget_exec`): a held or waiting
  exit of a deleted process is never reported (:meth:`forget` hands back a
  dropped init exit, so Delete can still tell its status).  An exit already
  handed out in a :class:`Report` is past discarding: it is *being reported*
  (:meth:`reporting`) until :meth:`reported`, and Delete waits for that
  before it forgets the process, so TaskDelete follows the TaskExit and
  carries its status.
* An in-place upgrade carries the whole object (:meth:`ExitOrder.export`,
  :meth:`ExitOrder.adopt`): nothing the rules keep is recomputed, so an
  exit held, waiting or registered before the exec is decided the same after.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the type only: importing the reaper would load trio
    from supervisor.handover import ExitOrderState, ExitState
    from supervisor.reaper import Exit

__all__ = ["Action", "ExitOrder", "InitExited", "Report"]


@dataclass(frozen=True, slots=True)
class Report:
    """Drain the process's output, then publish its TaskExit and call :meth:`ExitOrder.reported`."""

    container_id: str
    exec_id: str
    exit: Exit


@dataclass(frozen=True, slots=True)
class InitExited:
    """The container's init has exited: kill what remains (host pid namespace)."""

    container_id: str


Action = Report | InitExited

_Key = tuple[str, str]


@dataclass(slots=True)
class _Entry:
    announcing: bool = False
    registered: bool = False
    seen: bool = False  # an exit was accepted (held, waiting, or handed out in a Report)
    held: Exit | None = None  # reaped while announcing
    reported: bool = False


def _exit_state(exit_: Exit) -> ExitState:
    return {"pid": exit_.pid, "status": exit_.status, "timestamp": exit_.timestamp}


class ExitOrder:
    """Decides when each reaped exit may be reported (see the module docstring)."""

    def __init__(self) -> None:
        self._entries: dict[_Key, _Entry] = {}
        self._by_pid: dict[int, _Key] = {}
        #: container id -> the init's exit, waiting for that container's running execs
        self._waiting: dict[str, Exit] = {}

    # --- what happens ------------------------------------------------------

    def announcing(self, container_id: str, exec_id: str = "") -> None:
        """Create or Start began for the process: hold its exits until :meth:`announced`."""
        self._entries.setdefault((container_id, exec_id), _Entry()).announcing = True

    def registered(self, container_id: str, exec_id: str, pid: int,
                   early: Exit | None = None) -> list[Action]:
        """The process's pid is known; ``early`` is its exit if it was reaped already."""
        key = (container_id, exec_id)
        entry = self._entries.setdefault(key, _Entry())
        entry.registered = True
        self._by_pid[pid] = key
        if early is None:
            return []
        return self._accept(key, entry, early)

    def exited(self, exit_: Exit) -> list[Action]:
        """An exit was reaped (any pid; those of unknown pids are ignored)."""
        key = self._by_pid.get(exit_.pid)
        if key is None:
            return []
        return self._accept(key, self._entries[key], exit_)

    def announced(self, container_id: str, exec_id: str = "") -> list[Action]:
        """Create or Start is over: its event is published, or it failed.  Releases a held exit."""
        key = (container_id, exec_id)
        entry = self._entries.get(key)
        if entry is None or not entry.announcing:
            return []
        entry.announcing = False
        held, entry.held = entry.held, None
        if held is not None:
            return self._release(key, held)
        return self._init_if_free(container_id) if exec_id else []

    def reported(self, container_id: str, exec_id: str = "") -> list[Action]:
        """The process's TaskExit is published."""
        entry = self._entries.get((container_id, exec_id))
        if entry is None:
            return []
        entry.reported = True
        return self._init_if_free(container_id) if exec_id else []

    def forget(self, container_id: str) -> Exit | None:
        """Delete of the container: drop its processes, and their held or waiting exits.

        Returns the init's exit if one was dropped (never reported: Delete may
        still tell its status)."""
        waiting = self._waiting.pop(container_id, None)
        init = self._entries.get((container_id, ""))
        held = init.held if init is not None else None
        self._drop([k for k in self._entries if k[0] == container_id])
        return waiting or held

    def forget_exec(self, container_id: str, exec_id: str) -> list[Action]:
        """Delete of the exec: drop it (and a held exit); the init may stop waiting for it."""
        self._drop([(container_id, exec_id)])
        return self._init_if_free(container_id)

    # --- what it asks about -------------------------------------------------

    def reporting(self, container_id: str, exec_id: str = "") -> bool:
        """The process's exit was handed out in a :class:`Report` and its TaskExit
        is not published yet (:meth:`reported`): Delete must wait for it."""
        key = (container_id, exec_id)
        entry = self._entries.get(key)
        return (entry is not None and entry.seen and entry.held is None
                and not entry.reported
                and (exec_id != "" or container_id not in self._waiting))

    def running_execs(self, container_id: str) -> list[str]:
        """The execs of the container that the init's TaskExit must come after."""
        return sorted(e for (c, e), entry in self._entries.items()
                      if c == container_id and e and self._running(entry))

    # --- an in-place upgrade -------------------------------------------------------

    def export(self) -> ExitOrderState:
        """Everything the rules keep (JSON-able), for :meth:`adopt` in the new code."""
        return {
            "entries": [{"container_id": c, "exec_id": e, "announcing": x.announcing,
                         "registered": x.registered, "seen": x.seen,
                         "held": _exit_state(x.held) if x.held is not None else None,
                         "reported": x.reported}
                        for (c, e), x in self._entries.items()],
            "pids": [{"pid": pid, "container_id": c, "exec_id": e}
                     for pid, (c, e) in self._by_pid.items()],
            "waiting": [{"container_id": c, "exit": _exit_state(x)}
                        for c, x in self._waiting.items()],
        }

    @classmethod
    def adopt(cls, state: ExitOrderState, exit_type: type[Exit]) -> ExitOrder:
        """The order :meth:`export` described (``exit_type``: the reaper's :class:`Exit`)."""
        order = cls()

        def exit_of(x: ExitState) -> Exit:
            return exit_type(x["pid"], x["status"], x["timestamp"])

        for e in state["entries"]:
            held = e["held"]
            order._entries[(e["container_id"], e["exec_id"])] = _Entry(
                e["announcing"], e["registered"], e["seen"],
                exit_of(held) if held is not None else None, e["reported"])
        for p in state["pids"]:
            order._by_pid[p["pid"]] = (p["container_id"], p["exec_id"])
        for w in state["waiting"]:
            order._waiting[w["container_id"]] = exit_of(w["exit"])
        return order

    # --- the rules --------------------------------------------------------------

    def _drop(self, keys: list[_Key]) -> None:
        for key in keys:
            self._entries.pop(key, None)
        for pid in [p for p, k in self._by_pid.items() if k in keys]:
            del self._by_pid[pid]

    @staticmethod
    def _running(entry: _Entry) -> bool:
        return entry.announcing or (entry.registered and not entry.reported)

    def _accept(self, key: _Key, entry: _Entry, exit_: Exit) -> list[Action]:
        if entry.seen:
            return []  # a duplicate
        entry.seen = True
        if entry.announcing:
            entry.held = exit_
            return []
        return self._release(key, exit_)

    def _release(self, key: _Key, exit_: Exit) -> list[Action]:
        """The exit is no longer held: report it now, or (an init's) after its execs."""
        container_id, exec_id = key
        if self._by_pid.get(exit_.pid) == key:
            del self._by_pid[exit_.pid]  # the pid may be reused from now on
        if exec_id:
            return [Report(container_id, exec_id, exit_)]
        actions: list[Action] = [InitExited(container_id)]
        if self.running_execs(container_id):
            self._waiting[container_id] = exit_
            return actions
        return [*actions, Report(container_id, "", exit_)]

    def _init_if_free(self, container_id: str) -> list[Action]:
        if container_id not in self._waiting or self.running_execs(container_id):
            return []
        return [Report(container_id, "", self._waiting.pop(container_id))]
