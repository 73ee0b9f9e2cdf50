"""Claiming a shim socket (issue 15 item 5): atomic claims, no stolen or removed successor.

The interleavings are forced, not timed: a socket class whose ``listen`` first
runs another claimant's step stands in for a second ``start`` that connects
between the first one's ``bind`` and ``listen``.
"""

from __future__ import annotations

import _socket
import errno
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from supervisor import daemon
from supervisor.launch import address, sockfile, start
from supervisor.launch.flags import Flags


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    short = Path(tempfile.mkdtemp(prefix="sf-", dir="/tmp"))
    yield short / "s"
    shutil.rmtree(short, ignore_errors=True)


def path_in(socket_dir: Path) -> str:
    # A real shim socket's name (64 hex digits): the claim name must still fit sun_path.
    socket_dir.mkdir(exist_ok=True)
    return str(socket_dir / ("ab" * 32))


def reachable(listener: _socket.socket, path: str) -> bool:
    """Whether a connection to ``path`` arrives at ``listener``."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with client:
        try:
            client.connect(path)
        except OSError:
            return False
        copy = socket.socket(fileno=os.dup(listener.fileno()))  # a _socket has no accept()
        with copy:
            copy.setblocking(False)
            try:
                conn, _ = copy.accept()
            except BlockingIOError:
                return False
            finally:
                copy.setblocking(True)
        conn.close()
        return True


def hook_first_listen(monkeypatch: pytest.MonkeyPatch, step: Callable[[], None]) -> None:
    """The next ``listen`` of any unix socket first runs ``step`` (once)."""
    pending = [step]

    class Hooked(_socket.socket):
        def listen(self, *args: int) -> None:
            if pending:
                pending.pop()()
            super().listen(*args)

    monkeypatch.setattr(_socket, "socket", Hooked)


def test_a_claim_is_never_seen_half_done(socket_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # A second start looks at the path while the first one's claim is under way (old:
    # between bind and listen: ECONNREFUSED, so it took the socket for a dead shim's and
    # replaced it, and the first daemon served an unlinked socket).
    path = path_in(socket_dir)
    other: list[_socket.socket | None] = []
    hook_first_listen(monkeypatch, lambda: other.append(sockfile.replace_stale(path)))
    try:
        first: _socket.socket | None = sockfile.listen(path)
    except OSError as e:
        assert e.errno == errno.EADDRINUSE  # the other claim won: this one must fail
        first = None
    monkeypatch.undo()
    claims = [s for s in (first, *other) if s is not None]
    try:
        assert len(claims) == 1, "exactly one claim holds the path"
        assert reachable(claims[0], path), "the claim that won serves the path"
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert os.listdir(socket_dir) == [os.path.basename(path)]  # no private name left
    finally:
        for s in claims:
            s.close()


def test_a_live_socket_is_not_replaced_and_a_dead_one_is(socket_dir: Path) -> None:
    path = path_in(socket_dir)
    live = sockfile.listen(path)
    try:
        assert sockfile.replace_stale(path) is None
        assert not sockfile.remove_if_dead(path)
        assert reachable(live, path)
        with pytest.raises(OSError) as e:
            sockfile.listen(path)
        assert e.value.errno == errno.EADDRINUSE
    finally:
        live.close()
    # closed: a dead shim's file is left; the next claim replaces it
    assert sockfile.is_dead(path)
    again = sockfile.replace_stale(path)
    assert again is not None
    try:
        assert reachable(again, path)
    finally:
        again.close()
    assert sockfile.remove_if_dead(path)
    assert not os.path.lexists(path)


def test_the_daemon_knows_its_published_path(socket_dir: Path) -> None:
    path = path_in(socket_dir)
    s = sockfile.listen(path)
    try:
        assert sockfile.published_path(s.getsockname()) == path
        assert address.address_of(sockfile.published_path(s.getsockname())) == f"unix://{path}"
        own = daemon.OwnSocket(socket.socket(fileno=os.dup(s.fileno())))
        assert own.path == path
        own.remove()
        assert not os.path.lexists(path)
    finally:
        s.close()
    for name in (path, "\0abstract", "/x/y.claim-zz", "/x" + sockfile.CLAIM_MARK + "a/b" * 4):
        assert sockfile.published_path(name) == name


def test_a_daemon_never_removes_its_successors_socket(socket_dir: Path) -> None:
    # Shim A's socket was replaced by B's (A stopped listening: dead to others); A's late
    # removal (OwnSocket.remove) must leave B's socket alone.
    path = path_in(socket_dir)
    a = sockfile.listen(path)
    own = daemon.OwnSocket(a)
    a.close()
    b = sockfile.replace_stale(path)
    assert b is not None
    try:
        own.remove()
        assert reachable(b, path), "a shim removed its successor's socket"
    finally:
        b.close()


def test_a_failed_start_removes_its_socket_not_a_successors(
        socket_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # start's cleanup after a failed daemon start: the socket it published, while it is
    # still its own (old: close, then unlink: a start that replaced the closed socket in
    # between lost its socket).
    path = path_in(socket_dir)
    armed: list[Callable[[], None]] = []
    successor: list[_socket.socket | None] = []

    class Hooked(_socket.socket):
        def close(self) -> None:
            super().close()
            if armed:  # just after start closed its listener: another start looks
                armed.pop()()

    def fail(flags: object, listener: _socket.socket, python: str) -> tuple[int, bool]:
        armed.append(lambda: successor.append(sockfile.replace_stale(path)))
        raise RuntimeError("no daemon")

    monkeypatch.setattr(_socket, "socket", Hooked)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(start, "socket_address", lambda *a: address.address_of(path))
    monkeypatch.setattr(start, "start_daemon", fail)
    monkeypatch.setattr(start, "group_settings", lambda *a: ("", 16, ""))
    monkeypatch.setattr("sys.stdin", open(os.devnull))  # noqa: SIM115 - closed below
    flags = Flags(namespace="ns", id="c1", address="/run/ctd.sock", action="start")
    try:
        with pytest.raises(RuntimeError):
            start.action_start(flags, lambda b: pytest.fail("no options"))
    finally:
        sys.stdin.close()
        monkeypatch.undo()
    assert successor and successor[0] is not None
    try:
        assert reachable(successor[0], path), "a failed start removed its successor's socket"
    finally:
        successor[0].close()


def test_a_path_too_long_to_claim_is_a_clear_error(tmp_path: Path) -> None:
    # containerd 2.3's socket_dir may be long: bind's "AF_UNIX path too long" said nothing.
    path = str(tmp_path / ("d" * 60) / ("s" * 40))
    with pytest.raises(OSError, match=r"longer than the .* bytes a shim socket may have") as e:
        sockfile.listen(path)
    assert e.value.errno == errno.ENAMETOOLONG
    assert not os.path.exists(path)
