"""The fork server's zygote: the process, forked once after the preload, that forks the spares.

Its pid is what the server's status answer says (``zygote``).  No durations are asserted:
a test waits for what it needs, then checks who holds what.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from test_forkserver import Server, gone, request_for, wait_for
from test_forkserver_spare import assert_alone, fds_of, kill, spare_of

from supervisor import forkserver
from supervisor.launch import forkclient
from supervisor.launch.forkclient import recv_fds


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    try:
        yield s
    finally:
        s.stop()


def zygote_of(s: Server) -> int:
    pid = forkclient.status(s.socket)["zygote"]
    assert isinstance(pid, int) and pid > 0
    return pid


def test_the_zygote_holds_nothing_of_the_servers(server: Server) -> None:
    zygote = zygote_of(server)
    spare = spare_of(server)
    # Between spares: while it forks one, it holds that spare's socket too.
    wait_for(lambda: len(fds_of(zygote)) == 4)
    fds = assert_alone(zygote, server, forkserver.ZYGOTE_TITLE)
    assert set(fds.values()).isdisjoint(fds_of(spare).values())


def test_with_a_zygote_the_server_sends_it_the_spares_socket_and_forks_nothing() -> None:
    # The server's side, scripted: its fork_spare hands the zygote (here a socketpair's
    # other end) one message with one fd, the spare's end of its control socketpair.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    zygote, stand_in = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    server = forkserver.ForkServer(listener, logging.getLogger("t"), spare=True)
    server.zygote, server.zygote_pid = zygote, 12345
    try:
        children = psutil.Process().children()
        server.fork_spare()
        assert psutil.Process().children() == children
        data, fds, _, _ = recv_fds(stand_in, 16, 1)
        assert data == b"S" and len(fds) == 1
        assert server.spare is not None
        spare_end = socket.socket(fileno=fds[0])
        spare_end.send(b"R4242")  # what the spare, forked by the zygote, tells the server
        assert server.spare.ready(1.0) and server.spare.pid == 4242
        spare_end.close()
        server.spare.close()
        server.spare = None  # no such process: nothing for close() to kill
        assert server.status()["zygote"] == 12345
    finally:
        server.close()
        stand_in.close()
    assert server.zygote is None and server.status()["zygote"] is None


def test_a_killed_zygote_does_not_fail_a_start(server: Server, bundle: Path,
                                               listener: socket.socket) -> None:
    zygote = zygote_of(server)
    first = spare_of(server)
    os.kill(zygote, signal.SIGKILL)
    wait_for(lambda: gone(zygote))
    pid = forkclient.request_shim(server.socket, request_for(bundle), listener.fileno())
    try:
        assert pid == first  # the spare it had forked
        # The next one: the zygote is gone, so the server forks it.
        assert spare_of(server, other_than=first) != first
        assert "the zygote is gone" in server.log.read_text()
        assert forkclient.status(server.socket)["zygote"] is None
    finally:
        kill(pid)


def test_without_a_spare_there_is_no_zygote() -> None:
    s = Server("--no-spare")
    try:
        assert forkclient.status(s.socket)["zygote"] is None
    finally:
        s.stop()


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_the_zygote_ends_with_the_server(how: str) -> None:
    # SIGKILL: no cleanup in the server; the zygote reads end of file on its socket.
    s = Server()
    try:
        zygote = zygote_of(s)
        s.proc.send_signal(getattr(signal, how))
        s.proc.wait(10)
        wait_for(lambda: gone(zygote))
    finally:
        s.stop()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_a_zygote_whose_fork_fails_goes_on_forking_spares(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A fork can fail for a while (EAGAIN under the cgroup's pids.max): the zygote
    # closes that spare's socket (the server sees the spare die and forks one itself)
    # and serves the next request, instead of ending for the server's whole life.
    real = forkserver._fork_detached
    failures = [OSError(errno.EAGAIN, "Resource temporarily unavailable")]

    def flaky(child: Callable[[], object], on_error: Callable[[BaseException], object]
              = lambda e: None) -> int:
        if failures:
            raise failures.pop()
        return real(child, on_error)

    monkeypatch.setattr(forkserver, "_fork_detached", flaky)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the zygote, as start_zygote's grandchild runs it
        forkserver._zygote(theirs.detach(), [ours], forkserver.Native())
    theirs.close()
    spares: list[int] = []
    try:
        assert ours.recv(16).startswith(b"Z")
        for failing in (True, False):
            mine, spares_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with mine:
                forkclient.send_fds(ours, [b"S"], [spares_end.fileno()])
                spares_end.close()
                data = mine.recv(16)
                if failing:
                    assert data == b""  # no spare: its socket closed at once
                else:
                    assert data.startswith(b"R")  # the next one was forked
                    spares.append(int(data[1:]))
        assert spares
    finally:
        ours.close()  # the zygote ends at end of file, the spare once its socket closed
        os.waitpid(pid, 0)
        wait_for(lambda: all(gone(spare) for spare in spares))
