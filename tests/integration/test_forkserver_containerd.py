"""Shims forked by ``supervisor-forkserver`` under a real containerd, and the cold fallback.

Each test starts its own fork server (socket in a short temp dir, passed to containerd --
and so to the shim's ``start`` -- as ``$SUPERVISOR_FORKSERVER``) and stops it by pid.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psutil
import pytest
from harness import Containerd, pid_alive, shim_bin_dirs, shims_for, wait_for

ENV = "SUPERVISOR_FORKSERVER"


class ForkServer:
    """A ``supervisor-forkserver`` of this test; ``prefix`` wraps its command (unshare)."""

    def __init__(self, prefix: Sequence[str] = ()) -> None:
        binary = shutil.which("supervisor-forkserver",
                              path=os.pathsep.join(map(str, shim_bin_dirs())))
        assert binary, "supervisor-forkserver is not installed next to the shim"
        self.dir = Path(tempfile.mkdtemp(prefix="sv-fs-", dir="/tmp"))
        self.socket = str(self.dir / "fs.sock")
        self.log = self.dir / "fs.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([*prefix, binary, "--socket", self.socket],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        wait_for(lambda: os.path.exists(self.socket) or self.proc.poll() is not None, 20,
                 message="the fork server's socket")
        assert self.proc.poll() is None, self.log.read_text()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def forked(self) -> dict[str, int]:
        """{container id: shim pid} of every shim it forked, from its log."""
        text = self.log.read_text(errors="replace")
        return {m.group(2): int(m.group(1))
                for m in re.finditer(r"shim (\d+) for [^/\s]+/(\S+)", text)}

    def socket_inodes(self) -> set[str]:
        """``socket:[N]`` of every socket the fork server holds (its listener)."""
        out = set()
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
                if target.startswith("socket:"):
                    out.add(target)
        return out

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def fork_servers() -> Iterator[Callable[..., ForkServer]]:
    made: list[ForkServer] = []

    def make(prefix: Sequence[str] = ()) -> ForkServer:
        made.append(ForkServer(prefix))
        return made[-1]

    yield make
    for s in made:
        s.stop()
        shutil.rmtree(s.dir, ignore_errors=True)


def fd_targets(pid: int) -> dict[int, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return out


def ancestors(pid: int) -> list[int]:
    return [p.pid for p in psutil.Process(pid).parents()]


def shim_of(c: Containerd, cid: str) -> int:
    task_pid = c.tasks()[cid][0]
    return psutil.Process(task_pid).ppid()  # the shim is the container's (sub)reaper


def test_containers_run_through_the_fork_server(
    make_containerd: Callable[..., Containerd], fork_servers: Callable[..., ForkServer],
    busybox_rootfs: Path,
) -> None:
    fs = fork_servers()
    c = make_containerd(env={ENV: fs.socket})
    assert c.run("fs-rm", "echo", "forked", rootfs=busybox_rootfs, rm=True).stdout == "forked\n"
    assert "fs-rm" in fs.forked()

    c.run("fs-idle", "sleep", "1000", rootfs=busybox_rootfs, detach=True)
    wait_for(lambda: c.tasks().get("fs-idle", (0, ""))[1] == "RUNNING", 10, message="RUNNING")
    pid = shim_of(c, "fs-idle")
    assert fs.forked()["fs-idle"] == pid
    assert shims_for(c) == [pid]  # found by its command line, like a cold shim
    shim = psutil.Process(pid)
    # Not the fork server's child (nor grandchild): reparented like a cold shim.
    assert fs.pid not in ancestors(pid)
    assert os.getsid(pid) == pid
    bundle = c.state / "io.containerd.runtime.v2.task" / c.namespace / "fs-idle"
    assert shim.cwd() == str(bundle)
    cmd = shim.cmdline()
    assert cmd[cmd.index("-id") + 1] == "fs-idle" and c.address in cmd
    assert shim.environ()["TTRPC_ADDRESS"] == c.ttrpc_address
    fds = fd_targets(pid)
    assert [fds[n] for n in (0, 1, 2)] == ["/dev/null"] * 3
    assert fds[3].startswith("socket:")
    assert not set(fds.values()) & fs.socket_inodes(), "the fork server's socket leaked"
    with open(f"/proc/{pid}/cgroup", encoding="utf-8") as a, \
            open(f"/proc/{c.pid}/cgroup", encoding="utf-8") as b:
        assert a.read() == b.read()  # containerd's cgroups, where a cold shim is born

    r = c.ctr("task", "exec", "--exec-id", "e1", "fs-idle", "echo", "exec ok")
    assert r.stdout == "exec ok\n"

    # The fork server goes away (SIGKILL: its socket file stays behind); its shims do not,
    # and the next start falls back to a cold start.
    fs.stop(signal.SIGKILL)
    assert pid_alive(pid)
    assert c.ctr("task", "exec", "--exec-id", "e2", "fs-idle", "echo", "still").stdout == (
        "still\n")
    assert os.path.exists(fs.socket)
    r = c.run("cold-rm", "echo", "cold", rootfs=busybox_rootfs, rm=True)
    assert r.stdout == "cold\n"
    assert "cold-rm" not in fs.forked()
    wait_for(lambda: "starting the shim cold" in c.log_text(), 10,
             message="the fallback noted in containerd's log")

    c.ctr("task", "kill", "-s", "SIGKILL", "fs-idle")
    wait_for(lambda: c.tasks().get("fs-idle", (0, ""))[1] == "STOPPED", 10, message="STOPPED")
    c.ctr("task", "delete", "fs-idle")
    c.ctr("containers", "delete", "fs-idle")
    wait_for(lambda: not pid_alive(pid), 10, message="the forked shim to exit")


def test_a_fork_server_that_differs_is_refused_and_start_goes_cold(
    make_containerd: Callable[..., Containerd], fork_servers: Callable[..., ForkServer],
    busybox_rootfs: Path,
) -> None:
    # In its own mount namespace a forked shim's mounts would be invisible to containerd.
    fs = fork_servers(prefix=["unshare", "--mount", "--propagation", "unchanged"])
    c = make_containerd(env={ENV: fs.socket})
    assert c.run("refused", "echo", "ok", rootfs=busybox_rootfs, rm=True).stdout == "ok\n"
    assert "refused" not in fs.forked()
    assert "the client's mnt namespace is not the fork server's" in fs.log.read_text()
    wait_for(lambda: "starting the shim cold" in c.log_text(), 10, message="the fallback note")
    assert fs.proc.poll() is None  # and it keeps serving
