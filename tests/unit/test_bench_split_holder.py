"""The split prototype's holder (bench/split_holder.py), run as the prototype runs it.

Not product code: these keep the evidence in bench/ honest (output drained before the exit
record, the control protocol, a zygote's holder is nobody's child), without root.
"""

from __future__ import annotations

import marshal
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))
from split_prototype import HOLDER_BOOT, ask, reattach_demo, wait_answer  # noqa: E402

DEADLINE = 30.0


def write_spec(state: Path, *argv: str) -> None:
    state.mkdir(exist_ok=True)
    with open(state / "spec", "wb") as f:
        marshal.dump({"argv": list(argv), "stdout": str(state / "out"),
                      "stderr": str(state / "err")}, f)  # fmt: skip


def wait_until(cond: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.005)


def stop(state: Path, proc: subprocess.Popen[bytes]) -> None:
    """The holder's init first (a failed test must not leave a ``sleep`` behind)."""
    try:
        ask(state / "ctl", "kill 9", timeout=2)
    except OSError:
        pass
    proc.kill()
    proc.wait()


def run_holder(state: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", HOLDER_BOOT, str(BENCH), "holder", str(state)])


def test_output_copied_and_exit_recorded(tmp_path: Path) -> None:
    state = tmp_path / "h"
    write_spec(state, "sh", "-c", "echo out; echo err >&2; exit 3")
    proc = run_holder(state)
    try:
        answer = wait_answer(state / "ctl", "status", lambda a: a.startswith("exited "))
        _, holder_pid, init_pid, status = answer.split()
        assert int(holder_pid) == proc.pid
        assert status == "3"
        assert (state / "exit").read_text().split()[:2] == [init_pid, "3"]
        assert (state / "out").read_text() == "out\n"
        assert (state / "err").read_text() == "err\n"
        assert ask(state / "ctl", "bogus") == "error bad request"
        assert ask(state / "ctl", "shutdown") == "ok"
        assert proc.wait(DEADLINE) == 0
        assert not (state / "ctl").exists()
    finally:
        stop(state, proc)


def test_kill_reaches_the_init_and_shutdown_waits_for_its_exit(tmp_path: Path) -> None:
    state = tmp_path / "h"
    write_spec(state, "sleep", "1000")
    proc = run_holder(state)
    try:
        wait_answer(state / "ctl", "status", lambda a: a.startswith("running "))
        assert ask(state / "ctl", "shutdown") == "error running"
        assert ask(state / "ctl", "kill 9") == "ok"
        answer = wait_answer(state / "ctl", "status", lambda a: a.startswith("exited "))
        assert answer.split()[-1] == "137"
        assert ask(state / "ctl", "kill 9") == "error not running"
    finally:
        stop(state, proc)


def test_exit_recorded_only_after_the_output_is_drained(tmp_path: Path) -> None:
    """The init exits at once; an orphan it left keeps stdout open until told to write."""
    state = tmp_path / "h"
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    write_spec(state, "sh", "-c", f"(read x < {fifo}; echo late) & exit 0")
    proc = run_holder(state)
    try:
        answer = wait_answer(state / "ctl", "status", lambda a: a.split()[0] != "starting")
        init_pid = int(answer.split()[2])

        def reaped() -> bool:
            try:
                os.kill(init_pid, 0)
            except ProcessLookupError:
                return True
            return False

        wait_until(reaped, "the init to be reaped")  # by the holder, its parent
        assert not (state / "exit").exists()
        assert ask(state / "ctl", "status").startswith("running ")
        with open(fifo, "w", encoding="ascii") as f:
            f.write("go\n")
        wait_answer(state / "ctl", "status", lambda a: a.startswith("exited "))
        assert (state / "out").read_text() == "late\n"
        assert (state / "exit").read_text().split()[:2] == [str(init_pid), "0"]
    finally:
        stop(state, proc)


def test_zygote_forks_a_holder_that_is_nobodys_child(tmp_path: Path) -> None:
    sock = tmp_path / "zygote.sock"
    zygote = subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", HOLDER_BOOT, str(BENCH), "zygote", str(sock)])
    state = tmp_path / "h"
    write_spec(state, "sleep", "1000")
    holder_pid = 0
    try:
        wait_until(sock.is_socket, "the zygote's socket")
        assert ask(sock, str(state)) == "ok"
        answer = wait_answer(state / "ctl", "status", lambda a: a.startswith("running "))
        holder_pid = int(answer.split()[1])
        stat = Path(f"/proc/{holder_pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2:].split()
        ppid, sid = int(fields[1]), int(fields[3])
        assert ppid not in (zygote.pid, os.getpid())
        assert sid == holder_pid
        assert ask(state / "ctl", "kill 15") == "ok"
        wait_answer(state / "ctl", "status", lambda a: a.startswith("exited "))
        assert ask(state / "ctl", "shutdown") == "ok"
    finally:
        if holder_pid:
            try:
                ask(state / "ctl", "kill 9", timeout=2)
            except OSError:
                pass
            try:
                os.kill(holder_pid, 9)
            except ProcessLookupError:
                pass
        zygote.kill()
        zygote.wait()


def test_containerd_connection_outlives_a_killed_manager(tmp_path: Path) -> None:
    """The failure story's claim: the holder keeps a duplicate of the connection, so a
    client (standing in for containerd) sees no close when the manager is SIGKILLed, and
    its next call on the same connection is answered by the manager that re-attached."""
    pids = reattach_demo(tmp_path)
    assert pids["before"] == pids["first"]
    assert pids["after"] == pids["second"] != pids["first"]
    assert pids["holder_running"] == 1


def test_holder_imports_no_trio_no_protobuf_no_enum() -> None:
    """What the memory figures rest on: a holder's interpreter carries the standard
    library's small modules only (``enum`` would come with ``socket`` or ``signal``)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import split_holder; "
            "print(' '.join(sorted(sys.modules)))")  # fmt: skip
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(BENCH)],
                         capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    assert "split_holder" in out
    for heavy in ("trio", "google.protobuf", "supervisor", "enum", "socket", "signal"):
        assert heavy not in out
