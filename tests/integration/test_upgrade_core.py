"""An in-place shim upgrade against a real containerd: the daemon side (issue 17).

The test speaks ``supervisor.upgrade.v1.Upgrade`` and ``Introspect/Shim`` to the
shim's own socket (the CLI's part, ``supervisor upgrade``, is tested elsewhere).
Containers run with ``--null-io``: handing stdio over is :mod:`supervisor.io`'s part.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import trio
from google.protobuf.message import Message
from harness import IMAGE_PATH_ENV, Containerd, shims_for, wait_for

from supervisor import ttrpc
from supervisor.api.introspect import introspect_pb2
from supervisor.api.upgrade import upgrade_pb2
from supervisor.introspect import SERVICE as INTROSPECT
from supervisor.launch.address import socket_path

UPGRADE = "supervisor.upgrade.v1.Upgrade"
M = TypeVar("M", bound=Message)


def shim_address(c: Containerd, cid: str) -> str:
    bundle = c.state / "io.containerd.runtime.v2.task" / c.namespace / cid
    return (bundle / "address").read_text(encoding="utf-8").strip()


def call(address: str, service: str, method: str, request: Message, reply: type[M],
         timeout: float = 30) -> M:
    async def go() -> bytes:
        client = await ttrpc.connect_unix(socket_path(address))
        try:
            return await client.call(service, method, request.SerializeToString(),
                                     timeout=timeout)
        finally:
            await client.aclose()

    out = reply()
    out.ParseFromString(trio.run(go))
    return out


def shim_info(address: str) -> introspect_pb2.ShimResponse:
    return call(address, INTROSPECT, "Shim", introspect_pb2.ShimRequest(),
                introspect_pb2.ShimResponse)


def upgrade(address: str, timeout: float = 0) -> upgrade_pb2.UpgradeResponse:
    """Ask for an upgrade, once the shim has its code snapshot (made after it serves)."""
    answer: list[upgrade_pb2.UpgradeResponse] = []

    def asked() -> bool:
        try:
            answer.append(call(address, UPGRADE, "Upgrade",
                               upgrade_pb2.UpgradeRequest(quiesce_timeout_seconds=timeout),
                               upgrade_pb2.UpgradeResponse, timeout=90))
        except ttrpc.RPCError as e:
            if e.code is ttrpc.Code.UNAVAILABLE and "no copy of the running code" in e.message:
                return False
            raise
        return True

    wait_for(asked, 20, message="the shim's code snapshot")
    return answer[0]


def attempts_over(address: str, n: int) -> introspect_pb2.ShimResponse:
    got: list[introspect_pb2.ShimResponse] = []

    def done() -> bool:
        with contextlib.suppress(ttrpc.RPCError, ttrpc.ConnectionEnded, OSError):
            info = shim_info(address)
            if info.upgrade_attempts >= n:
                got.append(info)
                return True
        return False

    wait_for(done, 60, message=f"upgrade attempt {n} to end")
    return got[0]


def forwarded(c: Containerd, topic: str, since: int = 0) -> list[str]:
    return [ln for ln in c.log_text(since).splitlines()
            if 'msg="event forwarded"' in ln and f"ns={c.namespace}" in ln
            and f"topic={topic}" in ln]


@pytest.fixture
def code_dir(tmp_path: Path) -> Path:
    d = tmp_path / "code"
    d.mkdir()
    return d


def start(make_containerd: Callable[..., Containerd], code_dir: Path,
          **env: str) -> Containerd:
    c: Containerd = make_containerd(env={"SUPERVISOR_CODE_DIR": str(code_dir), **env})
    return c


def running(c: Containerd, cid: str) -> int:
    def pid() -> int:
        pid, status = c.tasks().get(cid, (0, ""))
        return pid if status == "RUNNING" else 0

    found: int = wait_for(pid, 20, message=f"{cid} RUNNING")
    return found


#: Exits 7 once the test creates /go in its rootfs (after the upgrade, whatever the timing).
EXIT_ON_GO = "while [ ! -e /go ]; do sleep 0.05; done; exit 7"


def test_an_upgraded_shim_keeps_its_pid_its_container_and_containerds_connection(
        make_containerd: Callable[..., Containerd], code_dir: Path,
        busybox_rootfs: Path) -> None:
    c = start(make_containerd, code_dir)
    c.run("exits", "sh", "-c", EXIT_ON_GO, rootfs=busybox_rootfs, detach=True,
          options=["--null-io"])
    c.run("stays", "sleep", "1000", rootfs=busybox_rootfs, detach=True,
          options=["--null-io"])
    running(c, "exits")
    running(c, "stays")
    address = shim_address(c, "exits")
    before = shim_info(address)
    assert (before.upgrades, before.upgrade_attempts, before.code) == (0, 0, before.code)
    assert before.code

    address_stays = shim_address(c, "stays")  # a shim of its own
    upgrade(address_stays)
    answer = upgrade(address)
    assert answer.pid == before.pid
    assert (answer.upgrade_attempts, answer.from_code) == (0, before.code)
    after = attempts_over(address, 1)
    assert after.last_upgrade_error == ""
    assert (after.pid, after.upgrades, after.upgrade_attempts) == (before.pid, 1, 1)
    assert after.HasField("upgraded_at")
    assert after.started_at == before.started_at
    assert before.pid in shims_for(c)  # ps still shows it as containerd's shim

    # The exit after the upgrade reaches containerd once, with its status.
    (busybox_rootfs / "go").touch()
    wait_for(lambda: c.tasks().get("exits", (0, ""))[1] == "STOPPED", 30,
             message="exits STOPPED")
    wait_for(lambda: forwarded(c, "/tasks/exit"), 10, message="/tasks/exit forwarded")
    exits = [ln for ln in c.log_text().splitlines()
             if "event forwarded /tasks/exit seq" in ln and '"exits"' in ln]
    assert len(exits) == 1, exits  # the shim's own log line, through the adopted log FIFO
    assert "exit_status: 7" in exits[0]
    # (containerd says so at every shim's normal end too: only before any delete counts)
    assert "shim disconnected" not in c.log_text()
    c.ctr("task", "delete", "exits")

    # Still drivable: kill and delete the other one, through its upgraded shim.
    assert attempts_over(address_stays, 1).upgrades == 1
    c.ctr("task", "kill", "-s", "KILL", "stays")
    wait_for(lambda: c.tasks().get("stays", (0, ""))[1] == "STOPPED", 20,
             message="stays STOPPED")
    assert shim_info(address_stays).upgrades == 1
    c.ctr("task", "delete", "stays")
    # Shutdown still ends the upgraded shims once their containers are gone.
    wait_for(lambda: shims_for(c) == [], 20, message="the upgraded shims to exit")


def test_a_wait_in_flight_is_answered_by_the_new_code(
        make_containerd: Callable[..., Containerd], code_dir: Path,
        busybox_rootfs: Path) -> None:
    """``ctr run`` (attached) waits on the task: its Wait call crosses the exec."""
    c = start(make_containerd, code_dir)
    waiting = subprocess.Popen(
        c.ctr_argv("run", "--runtime", c.runtime, "--null-io", "--env", IMAGE_PATH_ENV,
                   "--rootfs", str(busybox_rootfs), "waited", "sh", "-c", EXIT_ON_GO),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        running(c, "waited")
        address = shim_address(c, "waited")
        pid = shim_info(address).pid
        upgrade(address)
        info = attempts_over(address, 1)
        assert (info.pid, info.upgrades, info.last_upgrade_error) == (pid, 1, "")
        assert waiting.poll() is None  # still waiting, on the same connection
        # (ctr deletes the task once it exits, and the shim then ends: only before counts)
        assert "shim disconnected" not in c.log_text()
        (busybox_rootfs / "go").touch()
        out, _ = waiting.communicate(timeout=30)
        assert waiting.returncode == 7, out
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    c.ctr("container", "delete", "waited", check=False)


def test_upgrading_twice_counts_both(make_containerd: Callable[..., Containerd],
                                    code_dir: Path, busybox_rootfs: Path) -> None:
    c = start(make_containerd, code_dir)
    c.run("twice", "sleep", "1000", rootfs=busybox_rootfs, detach=True, options=["--null-io"])
    pid = running(c, "twice")
    address = shim_address(c, "twice")
    upgrade(address)
    attempts_over(address, 1)
    upgrade(address)
    info = attempts_over(address, 2)
    assert (info.upgrades, info.upgrade_attempts, info.last_upgrade_error) == (2, 2, "")
    assert c.tasks()["twice"] == (pid, "RUNNING")
    c.ctr("task", "kill", "-s", "KILL", "twice")
    wait_for(lambda: c.tasks().get("twice", (0, ""))[1] == "STOPPED", 20, message="STOPPED")
    assert "shim disconnected" not in c.log_text()
    c.ctr("task", "delete", "twice")


@pytest.mark.parametrize("fail", ["adopt", "serve"])
def test_new_code_that_cannot_adopt_leaves_the_old_code_running(
        make_containerd: Callable[..., Containerd], code_dir: Path,
        busybox_rootfs: Path, fail: str) -> None:
    """``adopt``: the new code refuses the state; ``serve``: it fails with all rebuilt."""
    c = start(make_containerd, code_dir, SUPERVISOR_UPGRADE_FAIL=fail)
    c.run("kept", "sh", "-c", EXIT_ON_GO, rootfs=busybox_rootfs, detach=True,
          options=["--null-io"])
    running(c, "kept")
    address = shim_address(c, "kept")
    before = shim_info(address)
    upgrade(address)
    after = attempts_over(address, 1)
    assert (after.pid, after.upgrades, after.upgrade_attempts) == (before.pid, 0, 1)
    assert "SUPERVISOR_UPGRADE_FAIL" in after.last_upgrade_error
    assert after.code == before.code
    assert not after.HasField("upgraded_at")
    (busybox_rootfs / "go").touch()
    wait_for(lambda: c.tasks().get("kept", (0, ""))[1] == "STOPPED", 30, message="STOPPED")
    wait_for(lambda: forwarded(c, "/tasks/exit"), 10, message="/tasks/exit forwarded")
    assert len(forwarded(c, "/tasks/exit")) == 1
    assert "shim disconnected" not in c.log_text()
    c.ctr("task", "delete", "kept")


def test_a_shared_shim_upgraded_takes_new_containers_and_ends_with_its_last(
        make_containerd: Callable[..., Containerd], code_dir: Path,
        busybox_rootfs: Path) -> None:
    c = start(make_containerd, code_dir, SUPERVISOR_SHIM_GROUP="namespace",
              SUPERVISOR_SHIM_GROUP_SIZE="5")
    for cid in ("s1", "s2"):
        c.run(cid, "sleep", "1000", rootfs=busybox_rootfs, detach=True, options=["--null-io"])
        running(c, cid)
    address = shim_address(c, "s1")
    assert shim_address(c, "s2") == address
    pid = shim_info(address).pid
    upgrade(address)
    info = attempts_over(address, 1)
    assert (info.pid, info.upgrades, info.container_count) == (pid, 1, 2)
    # Join (Group) after the upgrade: a new container comes to the same shim.
    c.run("s3", "sleep", "1000", rootfs=busybox_rootfs, detach=True, options=["--null-io"])
    running(c, "s3")
    assert shim_address(c, "s3") == address
    # The first container (the shim's bundle: log FIFO, spool) goes first; the rest stay.
    for cid in ("s1", "s2", "s3"):
        c.ctr("task", "kill", "-s", "KILL", cid)
        wait_for(lambda cid=cid: c.tasks().get(cid, (0, ""))[1] == "STOPPED", 20,
                 message=f"{cid} STOPPED")
        if cid == "s1":
            assert "shim disconnected" not in c.log_text()
        c.ctr("task", "delete", cid)
    wait_for(lambda: pid not in shims_for(c), 20, message="the shared shim to end")
