"""Containers outlive the manager: outages, restarts, a killed shim (real containerd, runc)."""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
from pathlib import Path

import psutil
from harness import (
    Containerd,
    containerd_series,
    mounts_below,
    pid_alive,
    series_at_least,
    shims_for,
    wait_for,
    zombies_of,
)

from supervisor.launch.address import socket_path


def forwarded(c: Containerd, topic: str, since: int) -> list[str]:
    """containerd's own log lines for events it accepted from a shim (after ``since``)."""
    return [ln for ln in c.log_text(since).splitlines()
            if 'msg="event forwarded"' in ln and f"ns={c.namespace}" in ln
            and f"topic={topic}" in ln]


def shim_forwarded(c: Containerd, topic: str, since: int) -> list[str]:
    """Our shim's log lines (through containerd's log) for events containerd accepted."""
    return [ln for ln in c.log_text(since).splitlines()
            if f"event forwarded {topic} seq" in ln]


def test_exit_during_30s_outage_reaches_containerd(containerd: Containerd,
                                                   busybox_rootfs: Path) -> None:
    c = containerd
    c.run("outage", "sh", "-c", "sleep 3; exit 7", rootfs=busybox_rootfs, detach=True)
    pid, _ = c.tasks()["outage"]
    c.kill9()
    wait_for(lambda: not psutil.pid_exists(pid) or
             psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 15, message="the exit")
    time.sleep(31)  # the Go shim gives up after about 21 s
    since = c.log_offset()
    c.start()
    wait_for(lambda: forwarded(c, "/tasks/exit", since), 10,
             message="containerd to accept the /tasks/exit held during the outage")
    time.sleep(1.5)
    assert len(forwarded(c, "/tasks/exit", since)) == 1  # exactly one, not a replay storm
    shim_lines = shim_forwarded(c, "/tasks/exit", since)
    assert len(shim_lines) == 1, shim_lines
    assert 'container_id: "outage"' in shim_lines[0]
    assert f"pid: {pid}" in shim_lines[0]
    assert "exit_status: 7" in shim_lines[0]
    assert c.tasks()["outage"][1] == "STOPPED"
    c.ctr("task", "delete", "outage")
    wait_for(lambda: forwarded(c, "/tasks/delete", since), 10, message="/tasks/delete")


def test_exit_status_survives_a_containerd_restart_on_every_series(
        containerd: Containerd, busybox_rootfs: Path) -> None:
    """The same contract on 1.6, 1.7 and 2.1 (``$SUPERVISOR_TEST_CONTAINERD``): a container
    that exits while containerd is down keeps its task and its own status.

    From 1.7 on, containerd's restart deletes a loaded task whose ``Pids`` answer is empty
    ("cleaning leaked shim process"); our ``Pids`` keeps the exited init until Delete.
    """
    c = containerd
    c.run("down7", "sh", "-c", "sleep 2; exit 7", rootfs=busybox_rootfs, detach=True)
    pid, _ = c.tasks()["down7"]
    c.kill9()
    wait_for(lambda: not psutil.pid_exists(pid) or
             psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 15, message="the exit")
    since = c.log_offset()
    c.start()
    assert "cleaning leaked shim process" not in c.log_text(since), containerd_series()
    assert c.tasks()["down7"] == (pid, "STOPPED")
    wait_for(lambda: forwarded(c, "/tasks/exit", since), 10,
             message="containerd to accept the /tasks/exit held during the outage")
    r = c.ctr("task", "delete", "down7")  # ctr warns of the code and exits 0 (1.6 to 2.1)
    assert 'msg="task down7 exit with non-zero exit code 7"' in r.stderr, (
        containerd_series(), r.stderr)
    assert "down7" not in c.tasks()


def test_restart_recovery_running_paused_exited(containerd: Containerd,
                                                busybox_rootfs: Path) -> None:
    c = containerd
    for name in ("run1", "paused1", "exited1"):
        cmd = ["sh", "-c", "exit 5"] if name == "exited1" else ["sleep", "1000"]
        c.run(name, *cmd, rootfs=busybox_rootfs, detach=True)
    c.ctr("task", "pause", "paused1")
    wait_for(lambda: c.tasks()["exited1"][1] == "STOPPED", 10, message="exited1 STOPPED")
    before = c.tasks()
    c.kill9()
    time.sleep(1)
    c.start()
    after = c.tasks()
    assert after == before
    assert {k: v[1] for k, v in after.items()} == {
        "run1": "RUNNING", "paused1": "PAUSED", "exited1": "STOPPED"}
    # The recovered tasks are fully drivable.
    c.ctr("task", "resume", "paused1")
    r = c.ctr("task", "exec", "--exec-id", "x", "run1", "sh", "-c", "exit 3", check=False)
    assert r.returncode == 3
    c.ctr("task", "kill", "--signal", "SIGKILL", "run1")
    wait_for(lambda: c.tasks()["run1"][1] == "STOPPED", 10, message="run1 STOPPED")
    for name in ("run1", "exited1"):
        c.ctr("task", "delete", name)
    c.ctr("task", "kill", "--signal", "SIGKILL", "paused1")
    wait_for(lambda: c.tasks()["paused1"][1] == "STOPPED", 10, message="paused1 STOPPED")
    c.ctr("task", "delete", "paused1")


def test_killed_shim_is_cleaned_up(containerd: Containerd, busybox_rootfs: Path) -> None:
    c = containerd
    out = c.dir / "events.txt"
    with open(out, "wb") as f:
        watcher = subprocess.Popen(c.ctr_argv("events"), stdout=f, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.3)
        c.run("victim", "sleep", "1000", rootfs=busybox_rootfs, detach=True)
        pid, _ = c.tasks()["victim"]
        [shim] = shims_for(c)
        bundle = c.state / "io.containerd.runtime.v2.task" / c.namespace / "victim"
        socket = socket_path((bundle / "address").read_text())
        psutil.Process(shim).kill()

        def exit_line() -> str | None:
            return next((ln for ln in out.read_text().splitlines()
                         if "/tasks/exit" in ln and "victim" in ln), None)

        line = wait_for(exit_line, 20, message="/tasks/exit from containerd's cleanup")
    finally:
        watcher.kill()
        watcher.wait()
    squeezed = line.replace(" ", "")
    assert '"exit_status":137' in squeezed
    assert f'"pid":{pid}' in squeezed
    wait_for(lambda: not psutil.pid_exists(pid)
             or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10,
             message="the container's process to be killed")
    wait_for(lambda: not bundle.exists(), 10, message="the bundle to be removed")
    assert not Path(socket).exists()
    assert mounts_below(c.dir) == []
    assert shims_for(c) == []
    assert not (Path("/run/containerd/runc") / c.namespace / "victim").exists()


def test_file_log_keeps_flowing_while_containerd_is_down(
        containerd: Containerd, busybox_rootfs: Path, tmp_path: Path) -> None:
    c = containerd
    log = tmp_path / "out.log"
    c.run("talker", "sh", "-c", "i=0; while true; do i=$((i+1)); echo line $i; sleep 0.05; done",
          rootfs=busybox_rootfs, detach=True, options=["--log-uri", f"file://{log}"])
    wait_for(lambda: log.exists() and log.stat().st_size > 0, 10, message="first output")
    c.kill9()
    size = log.stat().st_size
    time.sleep(2)
    grown = log.stat().st_size
    assert grown > size + 100, "output stopped while containerd was down"
    c.start()
    c.ctr("task", "kill", "--signal", "SIGKILL", "talker")
    wait_for(lambda: c.tasks()["talker"][1] == "STOPPED", 10, message="STOPPED")
    numbers = [int(m) for m in re.findall(r"line (\d+)", log.read_text())]
    assert numbers == list(range(1, len(numbers) + 1)), "a line was lost or reordered"
    [shim] = shims_for(c)
    assert zombies_of(shim) == []


def test_a_shim_whose_create_never_happened_is_cleaned_up_as_each_series_intends(
        containerd: Containerd, busybox_rootfs_template: Path) -> None:
    """A shim ``start``ed for a container whose Create never came (containerd died
    between the two). 1.7 and later delete it at restart ("cleaning leaked shim process",
    because its ``Pids`` answers NotFound); 1.6 has no such cleanup and keeps it loaded."""
    from shim_driver import ShimDriver  # noqa: PLC0415 - imports protobuf

    c = containerd
    c.ctr("containers", "create", "--runtime", c.runtime, "--rootfs",
          str(busybox_rootfs_template), "leak", "sleep", "1000")
    # As containerd leaves it before Create: config.json and an (unmounted) rootfs dir.
    bundle = c.state / "io.containerd.runtime.v2.task" / c.namespace / "leak"
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "config.json").write_text("{}")
    shim = ShimDriver(c, "leak", bundle)
    try:
        shim.start()
        pid = wait_for(shim.pid, 10, message="the shim")
        c.kill9()
        since = c.log_offset()
        c.start()
        if series_at_least("1.7"):
            wait_for(lambda: "cleaning leaked shim process" in c.log_text(since), 10,
                     message="containerd to clean the leaked shim up")
            wait_for(lambda: not pid_alive(pid), 15, message="the leaked shim to exit")
            wait_for(lambda: not bundle.exists(), 10, message="its bundle to be removed")
        else:
            assert "cleaning leaked shim process" not in c.log_text(since)
            assert pid_alive(pid)
            # 1.6 loaded it: killed, it is cleaned up after as a dead shim (bundle too).
            psutil.Process(pid).kill()
            wait_for(lambda: not bundle.exists(), 15, message="1.6 to clean up the dead shim")
        assert "leak" not in c.tasks()
    finally:
        if bundle.exists():  # a failure above; containerd may be cleaning up meanwhile
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                shim.cleanup()
