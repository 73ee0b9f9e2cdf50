"""The fork server's spare: a shim forked ahead of time, handed the next request.

The spare's pid is what the server's status answer says (``spare``, once it is parked);
which shim served a request is its pid.  No durations are asserted: a test waits for the
spare it needs, then checks who served and what the shim holds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import msgpack
import psutil
import pytest
from test_forkserver import Server, gone, raw_call, request_for, wait_for

from supervisor import forkserver
from supervisor.launch import forkclient


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    try:
        yield s
    finally:
        s.stop()






def spare_of(s: Server, other_than: int = 0) -> int:
    """The pid of the server's parked spare (waiting for one other than ``other_than``)."""
    found: list[int] = []

    def parked() -> bool:
        pid = forkclient.status(s.socket).get("spare")
        if isinstance(pid, int) and pid != other_than:
            found.append(pid)
            return True
        return False

    wait_for(parked)
    return found[-1]


def fds_of(pid: int) -> dict[int, str]:
    return {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def assert_alone(pid: int, server: Server, title: tuple[str, ...]) -> dict[int, str]:
    """What :func:`forkserver._alone` leaves: ``pid`` nobody's child, its own session,
    showing ``title``, 0-2 on /dev/null and no fd but its control socket (none of the
    server's listener, lock or log).  Returns its fds but 0-2."""
    proc = psutil.Process(pid)
    assert proc.ppid() != server.proc.pid  # nobody's child, as a shim will be
    assert proc.cmdline() == list(title)
    assert os.getsid(pid) == pid
    fds = fds_of(pid)
    assert [fds.pop(n) for n in (0, 1, 2)] == ["/dev/null"] * 3
    assert len(fds) == 1  # its control socket alone: not the server's listener, lock or log
    assert set(fds.values()).isdisjoint(fds_of(server.proc.pid).values())
    return fds


def test_a_parked_spare_holds_nothing_of_the_servers(server: Server) -> None:
    assert_alone(spare_of(server), server, forkserver.SPARE_TITLE)


def test_a_request_is_served_by_the_spare_and_the_next_is_forked_after(
    server: Server, bundle: Path, listener: socket.socket
) -> None:
    spare = spare_of(server)
    req = request_for(bundle)
    req.env["SV_SPARE_TEST"] = "yes"
    req.umask = 0o027
    answer, go = raw_call(server.socket, msgpack.packb(req.to_wire()), [listener.fileno()])
    pid = answer["pid"]
    try:
        assert pid == spare
        # Set up exactly as a freshly forked shim, waiting for its go byte: 0-2 /dev/null,
        # the listener on 3, the go pipe on 5, nothing else (its control socket is closed).
        shim = psutil.Process(pid)
        assert shim.cmdline() == req.argv
        assert shim.cwd() == str(bundle)
        assert shim.environ() == req.env
        assert os.getsid(pid) == pid
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            assert "Umask:\t0027\n" in f.read()
        # Its status pipe (fd 4) closes just after its report, which the answer followed.
        wait_for(lambda: forkserver.STATUS_FD not in fds_of(pid))
        fds = fds_of(pid)
        assert sorted(fds) == [0, 1, 2, forkserver.LISTEN_FD, forkserver.GO_FD]
        assert [fds[n] for n in (0, 1, 2)] == ["/dev/null"] * 3
        assert os.stat(f"/proc/{pid}/fd/3").st_ino == os.fstat(listener.fileno()).st_ino
        assert spare_of(server, other_than=spare) != spare  # the next one, after the answer
        assert forkclient.status(server.socket)["served"] >= 1
    finally:
        for fd in go:
            os.close(fd)  # uncommitted: the shim vanishes without serving
    wait_for(lambda: gone(pid))
    assert "the spare)" in server.log.read_text()


def test_a_killed_spare_does_not_fail_a_start(server: Server, bundle: Path,
                                              listener: socket.socket) -> None:
    spare = spare_of(server)
    os.kill(spare, signal.SIGKILL)
    wait_for(lambda: gone(spare))
    pid = forkclient.request_shim(server.socket, request_for(bundle), listener.fileno())
    try:
        assert pid != spare
        assert "forking" in server.log.read_text()
        assert psutil.Process(pid).cmdline() == request_for(bundle).argv
        assert spare_of(server, other_than=spare) != spare  # replaced
    finally:
        kill(pid)


def test_without_a_spare_each_shim_is_forked(bundle: Path, listener: socket.socket) -> None:
    s = Server("--no-spare")
    try:
        assert forkclient.status(s.socket)["spare"] is None
        pid = forkclient.request_shim(s.socket, request_for(bundle), listener.fileno())
        kill(pid)
        assert "forked)" in s.log.read_text()
        assert forkclient.status(s.socket)["spare"] is None
    finally:
        s.stop()


def test_a_retiring_server_kills_its_spare(bundle: Path, listener: socket.socket) -> None:
    s = Server()
    try:
        spare = spare_of(s)
        with pytest.raises(forkclient.Retired):
            forkclient.request_shim(s.socket, request_for(bundle, code="1.0+other"),
                                    listener.fileno())
        wait_for(lambda: gone(spare))  # never handed out: it ran the server's code
        assert s.proc.wait(10) == 0
    finally:
        s.stop()


def test_a_stopped_server_takes_its_spare_along() -> None:
    s = Server()
    try:
        spare = spare_of(s)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(10) == 0
        wait_for(lambda: gone(spare))
    finally:
        s.stop()


def test_a_killed_server_takes_its_spare_along() -> None:
    # SIGKILL: no cleanup in the server; the spare reads end of file on its control socket.
    s = Server()
    try:
        spare = spare_of(s)
        s.proc.kill()
        s.proc.wait(10)
        wait_for(lambda: gone(spare))
    finally:
        s.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
