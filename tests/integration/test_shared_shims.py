"""Shared shims (``shim_group = "namespace"``) with the real containerd, runc and ctr.

Several containers per shim daemon, at most ``shim_group_size`` each; containers
keep working when the container whose ``start`` made their shim is gone; a
shim on its way out is never handed a new container, however fast containers
come and go; nothing is left behind.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from harness import Containerd, mounts_below, pid_alive, shims_for, wait_for, zombies_of

from supervisor.launch.address import socket_path

GROUP_ENV = {"SUPERVISOR_SHIM_GROUP": "namespace", "SUPERVISOR_SHIM_GROUP_SIZE": "3"}


@pytest.fixture
def shared(make_containerd: Callable[..., Containerd]) -> Containerd:
    return make_containerd(env=GROUP_ENV)


def address_of(c: Containerd, cid: str) -> str:
    bundle = c.state / "io.containerd.runtime.v2.task" / c.namespace / cid
    return (bundle / "address").read_text()


def socket_files(c: Containerd, addresses: set[str]) -> list[str]:
    return [a for a in addresses if os.path.exists(socket_path(a))]


def test_containers_share_shims_up_to_the_size(shared: Containerd,
                                                busybox_rootfs: Path) -> None:
    c = shared
    ids = [f"g{i}" for i in range(4)]
    for cid in ids:
        c.run(cid, "sleep", "1000", rootfs=busybox_rootfs, detach=True)
    addresses = {cid: address_of(c, cid) for cid in ids}
    assert sorted(Counter(addresses.values()).values()) == [1, 3], addresses
    assert len(shims_for(c)) == 2  # two daemons for four containers
    first = ids[0]
    group = [cid for cid in ids if addresses[cid] == addresses[first]]
    assert first in group  # the first container's start made the shared shim

    # The container whose bundle the shim was started in goes first.
    c.ctr("task", "kill", "-s", "SIGKILL", first)
    wait_for(lambda: c.tasks()[first][1] == "STOPPED", 10, message=f"{first} STOPPED")
    c.ctr("task", "delete", first)
    c.ctr("containers", "delete", first)
    since = c.log_offset()
    other = next(cid for cid in group if cid != first)
    r = c.ctr("task", "exec", "--exec-id", "e1", other, "sh", "-c", "echo still; exit 3",
              check=False)
    assert (r.returncode, r.stdout.strip()) == (3, "still")
    # The shim's own log and event spool moved to a bundle that remains.
    wait_for(lambda: "event forwarded /tasks/exit" in c.log_text(since), 10,
             message="the shared shim's log after its first bundle was deleted")
    work = c.root / "io.containerd.runtime.v2.task" / c.namespace
    assert any((work / cid / "supervisor-events.spool").exists() for cid in group[1:])
    c.ctr("task", "kill", "-s", "SIGKILL", other)
    wait_for(lambda: c.tasks()[other][1] == "STOPPED", 10, message=f"{other} STOPPED")
    assert c.ctr("task", "delete", other).returncode == 0

    # A new container fills the freed places of the shared shim.
    c.run("g4", "sleep", "1000", rootfs=busybox_rootfs, detach=True)
    assert address_of(c, "g4") in set(addresses.values())

    for cid in [*ids[1:], "g4"]:
        if cid != other:
            c.ctr("task", "kill", "-s", "SIGKILL", cid)
    for cid in [*ids[1:], "g4"]:
        if cid != other:
            wait_for(lambda cid=cid: c.tasks()[cid][1] == "STOPPED", 10, message=cid)
            c.ctr("task", "delete", cid)
    wait_for(lambda: not shims_for(c), 15, message="every shared shim to exit")
    assert socket_files(c, set(addresses.values())) == []
    assert zombies_of(os.getpid()) == []


def test_churn_never_hands_a_container_to_a_leaving_shim(shared: Containerd,
                                                         busybox_rootfs: Path) -> None:
    """Two clients run --rm back to back: the shared shim keeps ending and being replaced,
    and each ``start`` races the ``Shutdown`` of the shim it finds."""
    c = shared
    failures: list[str] = []
    runs = 12

    def client(name: str) -> None:
        for i in range(runs):
            cid = f"{name}-{i}"
            r = c.run(cid, "sh", "-c", f"echo {cid}", rootfs=busybox_rootfs, rm=True,
                      check=False, timeout=60)
            if r.returncode != 0 or r.stdout.strip() != cid:
                failures.append(f"{cid}: rc {r.returncode} out {r.stdout!r} err {r.stderr!r}")

    threads = [threading.Thread(target=client, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert failures == []
    assert c.tasks() == {}
    wait_for(lambda: not shims_for(c), 15, message="the shared shims to exit")


def test_settings_file_turns_sharing_on(make_containerd: Callable[..., Containerd],
                                        busybox_rootfs: Path, tmp_path: Path) -> None:
    """The TOML settings (``ctr run --runtime-config-path``) choose sharing per runtime."""
    c = make_containerd()
    settings = tmp_path / "supervisor.toml"
    settings.write_text('ShimGroup = "namespace"\nShimGroupSize = 2\n')
    opts = ["--runtime-config-path", str(settings)]
    for cid in ("t1", "t2", "t3"):
        c.run(cid, "sleep", "1000", rootfs=busybox_rootfs, detach=True, options=opts)
    c.run("alone", "sleep", "1000", rootfs=busybox_rootfs, detach=True)
    addresses = {cid: address_of(c, cid) for cid in ("t1", "t2", "t3", "alone")}
    assert addresses["t1"] == addresses["t2"] != addresses["t3"]
    assert addresses["alone"] not in (addresses["t1"], addresses["t3"])
    pids = shims_for(c)
    assert len(pids) == 3
    for cid in addresses:
        c.ctr("task", "kill", "-s", "SIGKILL", cid)
    for cid in addresses:
        wait_for(lambda cid=cid: c.tasks()[cid][1] == "STOPPED", 10, message=cid)
        c.ctr("task", "delete", cid)
    wait_for(lambda: not any(pid_alive(p) for p in pids), 15, message="the shims to exit")


def test_killed_shared_shim_is_cleaned_up_for_each_container(shared: Containerd,
                                                             busybox_rootfs: Path) -> None:
    """One failure domain: containerd's cleanup reports each container with 137."""
    c = shared
    out = c.dir / "events.txt"
    ids = ("k1", "k2")
    with open(out, "wb") as f:
        watcher = subprocess.Popen(c.ctr_argv("events"), stdout=f, stderr=subprocess.STDOUT)
    try:
        time.sleep(0.3)
        for cid in ids:
            c.run(cid, "sleep", "1000", rootfs=busybox_rootfs, detach=True)
        pids = {cid: c.tasks()[cid][0] for cid in ids}
        [shim] = shims_for(c)
        socket = socket_path(address_of(c, ids[0]))
        psutil.Process(shim).kill()

        def exits() -> dict[str, str]:
            lines = [ln.replace(" ", "") for ln in out.read_text().splitlines()
                     if "/tasks/exit" in ln]
            return {cid: ln for cid in ids for ln in lines if f'"container_id":"{cid}"' in ln}

        found = wait_for(lambda: len(exits()) == len(ids) and exits(), 20,
                         message="a /tasks/exit per container from containerd's cleanup")
    finally:
        watcher.kill()
        watcher.wait()
    for cid in ids:
        assert '"exit_status":137' in found[cid]
        assert f'"pid":{pids[cid]}' in found[cid]
    for pid in pids.values():
        wait_for(lambda pid=pid: not psutil.pid_exists(pid)
                 or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10,
                 message="the containers' processes to be killed")
    assert not os.path.exists(socket)
    assert mounts_below(c.dir) == []
    assert shims_for(c) == []


def test_shared_shim_survives_containerd_restart(shared: Containerd,
                                                 busybox_rootfs: Path) -> None:
    """containerd killed: one container exits meanwhile, the other keeps running; after the
    restart both are back through the one shim and the exit was not lost."""
    c = shared
    c.run("stay", "sleep", "1000", rootfs=busybox_rootfs, detach=True)
    c.run("leave", "sh", "-c", "sleep 2; exit 9", rootfs=busybox_rootfs, detach=True)
    assert address_of(c, "stay") == address_of(c, "leave")
    [shim] = shims_for(c)
    c.kill9()
    time.sleep(4)  # "leave" exits while containerd is down
    since = c.log_offset()
    c.start()
    wait_for(lambda: c.tasks().get("leave", (0, ""))[1] == "STOPPED", 15,
             message="the exit held during the outage")
    wait_for(lambda: "exit_status: 9" in c.log_text(since), 10,
             message="the shim to forward the held /tasks/exit")
    c.ctr("task", "delete", "leave")
    assert c.tasks()["stay"][1] == "RUNNING"
    r = c.ctr("task", "exec", "--exec-id", "e2", "stay", "echo", "back", check=False)
    assert (r.returncode, r.stdout.strip()) == (0, "back")
    assert shims_for(c) == [shim]
    c.ctr("task", "kill", "-s", "SIGKILL", "stay")
    wait_for(lambda: c.tasks()["stay"][1] == "STOPPED", 10, message="stay STOPPED")
    c.ctr("task", "delete", "stay")
    wait_for(lambda: not pid_alive(shim), 15, message="the shim to exit")
