"""The fork server on demand, under a real containerd: nothing started by hand.

Each containerd of the harness has its own fork-server socket (``Containerd.forkserver_socket``,
as ``$SUPERVISOR_FORKSERVER`` in its environment), never the default path; the fork servers its
shims spawn are stopped by pid in its cleanup (``Containerd.forkservers``).  What the tests
read is the server's own account -- the status request (pid, code, shims served), its log and
its lock file -- never a duration.
"""

from __future__ import annotations

import os
import signal
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import psutil
from harness import Containerd, pid_alive, wait_for

from supervisor.launch import forkclient

ENV = forkclient.SOCKET_ENV


def serving(path: str) -> dict[str, object]:
    """The status of the fork server on ``path`` once it answers (it starts in the background)."""
    def answer() -> dict[str, object] | None:
        try:
            return forkclient.status(path)
        except forkclient.NoServer:
            return None

    return wait_for(answer, 30, message=f"a fork server on {path}")


def run(c: Containerd, cid: str, rootfs: Path) -> None:
    assert c.run(cid, "echo", cid, rootfs=rootfs, rm=True).stdout == f"{cid}\n"


def only_server(c: Containerd, pid: object) -> None:
    """``pid`` is this containerd's one fork server.  Waited for: the spare the server
    forks as it begins to serve, and after each request, shows the server's command line
    until it has parked (a moment later), and so does the child that forks it."""
    wait_for(lambda: c.forkservers() == [pid], 5, message=f"fork server {pid} alone")


def test_the_first_start_spawns_it_and_the_next_forks_from_it(
    containerd: Containerd, busybox_rootfs: Path,
) -> None:
    c, path = containerd, containerd.forkserver_socket
    assert not os.path.exists(path)
    run(c, "first", busybox_rootfs)
    wait_for(lambda: "started one (pid" in c.log_text(), 10, message="the spawn noted")
    first = serving(path)
    pid = first["pid"]
    assert isinstance(pid, int)
    only_server(c, pid)
    assert first["served"] == 0  # the first start went on cold
    assert first["code"] == forkclient.code_identity()
    assert forkclient.read_pid(path) == pid  # the lock file names it
    # Detached: its own session, no stdio of containerd's, "/" as working directory.
    proc = psutil.Process(pid)
    assert os.getsid(pid) == pid
    assert proc.cwd() == "/"
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    assert os.readlink(f"/proc/{pid}/fd/2") == forkclient.sibling(path, ".log")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600

    run(c, "second", busybox_rootfs)
    assert forkclient.status(path)["served"] == 1
    only_server(c, pid)
    log = Path(forkclient.sibling(path, ".log")).read_text()
    assert "/second (request 1" in log and "/first" not in log
    assert "the spare)" in log  # parked when the server began to serve: the second took it


def test_two_concurrent_starts_make_one(containerd: Containerd, busybox_rootfs: Path) -> None:
    errors: list[BaseException] = []

    def one(cid: str) -> None:
        try:
            run(containerd, cid, busybox_rootfs)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(f"both{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    # The lock passed from the spawning start to its server: one spawned, whatever the order.
    assert containerd.log_text().count("started one (pid") <= 1
    pid = serving(containerd.forkserver_socket)["pid"]
    only_server(containerd, pid)


def test_a_killed_fork_server_is_replaced(containerd: Containerd, busybox_rootfs: Path) -> None:
    c, path = containerd, containerd.forkserver_socket
    run(c, "one", busybox_rootfs)
    old = serving(path)["pid"]
    assert isinstance(old, int)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not pid_alive(old), 10, message="the fork server to die")
    assert os.path.exists(path)  # its socket file stays behind, refusing connections
    run(c, "two", busybox_rootfs)  # cold, and spawns a new one
    new = serving(path)
    assert new["pid"] != old and new["served"] == 0
    run(c, "three", busybox_rootfs)
    assert forkclient.status(path)["served"] == 1
    only_server(c, new["pid"])


def test_a_start_of_other_code_retires_it(
    make_containerd: Callable[..., Containerd], busybox_rootfs: Path,
) -> None:
    a = make_containerd()
    path = a.forkserver_socket
    run(a, "a1", busybox_rootfs)
    old = serving(path)
    run(a, "a2", busybox_rootfs)
    assert forkclient.status(path)["served"] == 1
    # "Other code": a second containerd on the same fork-server socket whose shims compute
    # another code identity.
    b = make_containerd(env={ENV: path, forkclient.CODE_ENV: "0.0.0+other"})
    run(b, "b1", busybox_rootfs)  # retires the old one, spawns its own, goes on cold
    wait_for(lambda: not pid_alive(old["pid"]), 10, message="the old fork server to end")
    wait_for(lambda: "it retires; started one (pid" in b.log_text(), 10, message="the note")
    other = serving(path)
    assert other["pid"] != old["pid"] and other["code"] == "0.0.0+other"
    assert "the client's code is 0.0.0+other" in b.log_text()  # the retired answer, noted
    run(b, "b2", busybox_rootfs)
    assert forkclient.status(path)["served"] == 1
    # And back: a's code retires b's server in turn; never a shim of the other code.
    run(a, "a3", busybox_rootfs)
    wait_for(lambda: not pid_alive(other["pid"]), 10, message="b's fork server to end")
    assert serving(path)["code"] == forkclient.code_identity()


def test_an_empty_variable_disables_it(
    make_containerd: Callable[..., Containerd], busybox_rootfs: Path,
) -> None:
    c = make_containerd(env={ENV: ""})
    run(c, "off1", busybox_rootfs)
    run(c, "off2", busybox_rootfs)
    assert "fork server" not in c.log_text()
    assert c.forkservers() == []  # none spawned, on any path
    assert not os.path.exists(c.forkserver_socket)
    assert not os.path.exists(forkclient.sibling(c.forkserver_socket, ".lock"))
