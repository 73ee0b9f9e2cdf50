"""The exit order containerd relies on, as scripted sequences against the pure object.

Each test is a story told to :class:`ExitOrder` step by step, asserting what it
answers at each step: the race it names is forced by the script, never by luck.
"""

from __future__ import annotations

import subprocess
import sys

from supervisor.exits import ExitOrder, InitExited, Report
from supervisor.reaper import Exit

C = "c1"
INIT = Exit(pid=100, status=137, timestamp=1.0)
E1 = Exit(pid=201, status=0, timestamp=2.0)
E2 = Exit(pid=202, status=3, timestamp=3.0)


def created(order: ExitOrder) -> None:
    """Create of C: announced (TaskCreate out), its init registered, nothing exited."""
    order.announcing(C)
    assert order.registered(C, "", INIT.pid) == []
    assert order.announced(C) == []


def exec_started(order: ExitOrder, exec_id: str, pid: int) -> None:
    order.announcing(C, exec_id)
    assert order.registered(C, exec_id, pid) == []
    assert order.announced(C, exec_id) == []


def test_an_exit_while_running_is_reported_at_once() -> None:
    order = ExitOrder()
    created(order)
    assert order.exited(INIT) == [InitExited(C), Report(C, "", INIT)]
    assert order.reported(C) == []


def test_exit_during_start_is_held_until_the_start_is_published() -> None:
    order = ExitOrder()
    created(order)
    order.announcing(C)  # Start: runc start is running
    assert order.exited(INIT) == []  # reaped now: held (TaskStart is not out yet)
    assert order.announced(C) == [InitExited(C), Report(C, "", INIT)]  # TaskStart published


def test_exec_exit_during_its_start_is_held() -> None:
    order = ExitOrder()
    created(order)
    order.announcing(C, "e1")
    assert order.registered(C, "e1", E1.pid) == []
    assert order.exited(E1) == []
    assert order.announced(C, "e1") == [Report(C, "e1", E1)]


def test_an_exit_reaped_before_anyone_registered_is_applied_at_registration() -> None:
    order = ExitOrder()
    order.announcing(C)
    assert order.exited(INIT) == []  # the service's subscription: a pid nobody knows yet
    assert order.registered(C, "", INIT.pid, early=INIT) == []  # launch's early exit: held
    assert order.announced(C) == [InitExited(C), Report(C, "", INIT)]  # after TaskCreate


def test_an_early_exit_of_a_process_not_being_announced_is_reported_at_once() -> None:
    order = ExitOrder()
    created(order)
    assert order.registered(C, "e1", E1.pid, early=E1) == [Report(C, "e1", E1)]


def test_unknown_pids_are_ignored() -> None:
    order = ExitOrder()
    created(order)
    assert order.exited(Exit(pid=999, status=0)) == []  # runc itself, a logging binary ...


def test_duplicate_exits_are_ignored() -> None:
    order = ExitOrder()
    order.announcing(C)
    order.registered(C, "", INIT.pid, early=INIT)
    assert order.exited(INIT) == []  # the same exit via the service's subscription
    assert order.announced(C) == [InitExited(C), Report(C, "", INIT)]
    assert order.exited(INIT) == []  # and once more after the release
    assert order.announced(C) == []  # a second end of the start releases nothing


def test_exec_exit_after_the_init_exit_comes_first() -> None:
    order = ExitOrder()
    created(order)
    exec_started(order, "e1", E1.pid)
    assert order.exited(INIT) == [InitExited(C)]  # e1 still runs: the init's exit waits
    assert order.exited(E1) == [Report(C, "e1", E1)]
    assert order.reported(C, "e1") == [Report(C, "", INIT)]  # e1's TaskExit is out: now init


def test_init_exit_with_two_running_execs_waits_for_both() -> None:
    order = ExitOrder()
    created(order)
    exec_started(order, "e1", E1.pid)
    exec_started(order, "e2", E2.pid)
    assert order.running_execs(C) == ["e1", "e2"]
    assert order.exited(INIT) == [InitExited(C)]
    assert order.exited(E2) == [Report(C, "e2", E2)]
    assert order.exited(E1) == [Report(C, "e1", E1)]
    assert order.reported(C, "e2") == []  # e1's output is still draining
    assert order.reported(C, "e1") == [Report(C, "", INIT)]
    assert order.running_execs(C) == []


def test_the_init_waits_for_an_exec_being_started() -> None:
    order = ExitOrder()
    created(order)
    order.announcing(C, "e1")  # runc exec is running when the init dies
    assert order.exited(INIT) == [InitExited(C)]
    assert order.registered(C, "e1", E1.pid) == []
    assert order.exited(E1) == []  # held: TaskExecStarted is not out yet
    assert order.announced(C, "e1") == [Report(C, "e1", E1)]
    assert order.reported(C, "e1") == [Report(C, "", INIT)]


def test_an_exec_that_failed_to_start_releases_the_waiting_init() -> None:
    """runc exec fails because the init died meanwhile: the init's exit must not wait
    for an exec that never ran (before exits.py it waited forever)."""
    order = ExitOrder()
    created(order)
    order.announcing(C, "e1")
    assert order.exited(INIT) == [InitExited(C)]
    assert order.announced(C, "e1") == [Report(C, "", INIT)]  # never registered: not running


def test_an_init_start_that_failed_releases_its_held_exit() -> None:
    order = ExitOrder()
    created(order)
    order.announcing(C)
    assert order.exited(INIT) == []
    assert order.announced(C) == [InitExited(C), Report(C, "", INIT)]  # Start failed


def test_delete_while_held_discards_the_exit() -> None:
    order = ExitOrder()
    created(order)
    order.announcing(C)
    assert order.exited(INIT) == []
    assert order.forget(C) == INIT  # Delete (force) while the Start is still running
    assert order.announced(C) == []  # the Start ends: nothing to report
    assert order.reported(C) == []
    assert order.exited(INIT) == []


def test_delete_while_the_init_waits_discards_it() -> None:
    order = ExitOrder()
    created(order)
    exec_started(order, "e1", E1.pid)
    assert order.exited(INIT) == [InitExited(C)]
    assert order.forget(C) == INIT
    assert order.exited(E1) == []
    assert order.reported(C, "e1") == []


def test_an_exit_handed_out_is_being_reported_until_reported() -> None:
    """Delete asks this: an exit past discarding, whose TaskExit it must wait for."""
    order = ExitOrder()
    created(order)
    assert not order.reporting(C)  # no exit yet
    assert order.exited(INIT) == [InitExited(C), Report(C, "", INIT)]
    assert order.reporting(C)  # draining its output; TaskExit not out
    assert order.reported(C) == []
    assert not order.reporting(C)
    assert order.forget(C) is None  # reported: nothing dropped, no status to hand back


def test_a_held_exit_is_not_being_reported() -> None:
    order = ExitOrder()
    created(order)
    order.announcing(C)  # Start
    assert order.exited(INIT) == []
    assert not order.reporting(C)  # held: Delete drops it, no TaskExit
    assert order.announced(C) == [InitExited(C), Report(C, "", INIT)]
    assert order.reporting(C)


def test_a_waiting_init_exit_is_not_being_reported_until_released() -> None:
    order = ExitOrder()
    created(order)
    exec_started(order, "e1", E1.pid)
    assert order.exited(INIT) == [InitExited(C)]
    assert not order.reporting(C)  # waits for e1: Delete drops it, no TaskExit
    assert order.exited(E1) == [Report(C, "e1", E1)]
    assert order.reporting(C, "e1") and not order.reporting(C)
    assert order.reported(C, "e1") == [Report(C, "", INIT)]
    assert order.reporting(C) and not order.reporting(C, "e1")
    order.forget_exec(C, "e1")
    assert not order.reporting(C, "e1")  # forgotten


def test_delete_of_a_container_without_an_exit_drops_nothing() -> None:
    order = ExitOrder()
    created(order)
    assert order.forget(C) is None
    assert order.exited(INIT) == []  # forgotten: its pid is nobody's now


def test_deleting_an_exec_releases_the_init_waiting_for_it() -> None:
    order = ExitOrder()
    created(order)
    order.announcing(C, "e1")
    order.registered(C, "e1", E1.pid)
    assert order.exited(INIT) == [InitExited(C)]
    assert order.forget_exec(C, "e1") == [Report(C, "", INIT)]
    assert order.announced(C, "e1") == []


def test_containers_do_not_wait_for_each_other() -> None:
    order = ExitOrder()
    created(order)
    exec_started(order, "e1", E1.pid)
    other = Exit(pid=300, status=1)
    order.announcing("c2")
    order.registered("c2", "", other.pid)
    order.announced("c2")
    assert order.exited(other) == [InitExited("c2"), Report("c2", "", other)]


def test_a_reused_pid_belongs_to_its_new_process() -> None:
    order = ExitOrder()
    created(order)
    exec_started(order, "e1", E1.pid)
    assert order.exited(E1) == [Report(C, "e1", E1)]
    order.reported(C, "e1")
    again = Exit(pid=E1.pid, status=5, timestamp=9.0)
    exec_started(order, "e2", again.pid)  # the kernel gave e1's pid to e2
    assert order.exited(again) == [Report(C, "e2", again)]


def test_the_module_loads_neither_trio_nor_protobuf() -> None:
    code = ("import sys, supervisor.exits; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'google')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
