"""The harness itself, proven with containerd's own Go shim (io.containerd.runc.v2).

These do not need our shim: they check that the private containerd starts, that the busybox
rootfs and the OCI image tarball run, and that teardown leaves nothing behind, whatever
state the daemon, the shims and the containers are in.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from harness import (
    GO_RUNTIME,
    IMAGE_PATH_ENV,
    RUNC_STATE_ROOT,
    Containerd,
    OciImageTar,
    cgroup_mountpoints,
    cleanup_dir,
    containerd_bin_dir,
    containerd_series,
    go_shim_socket,
    mounts_below,
    pid_alive,
    processes_with_arg,
    shims_for,
    wait_for,
    zombies_of,
)


@pytest.fixture
def containerd_runtime() -> str:
    # The whole module runs with the Go shim; the same tests of our shim live elsewhere.
    return GO_RUNTIME


def test_ctr_run_rm_prints_output(containerd: Containerd, busybox_rootfs: Path) -> None:
    assert containerd.runtime == GO_RUNTIME
    # Literally `ctr run --rm --runtime R --rootfs DIR id CMD`. ctr's --rootfs spec has no
    # PATH, so a bare command needs --env PATH=... (run() adds it); an absolute one does not.
    r = containerd.ctr(
        "run", "--rm", "--runtime", GO_RUNTIME, "--rootfs", str(busybox_rootfs), "c1",
        "/bin/echo", "hi",
    )  # fmt: skip
    assert r.stdout == "hi\n"
    r = containerd.run("c2", "echo", "hi", rootfs=busybox_rootfs, rm=True)
    assert r.stdout == "hi\n"
    r = containerd.run("c3", "sh", "-c", "id -u; cat /etc/hostname", rootfs=busybox_rootfs, rm=True)
    assert r.stdout.split() == ["0", "busybox"]
    assert containerd.containers() == []
    assert "io.containerd.runc.v2" in containerd.log_text()


@pytest.mark.parametrize("containerd", [GO_RUNTIME], indirect=True)
def test_runtime_param_and_dirs(containerd: Containerd) -> None:
    assert containerd.runtime == GO_RUNTIME
    assert os.path.exists(containerd.address)
    assert containerd.ttrpc_address == containerd.address + ".ttrpc"
    assert os.path.exists(containerd.ttrpc_address)
    assert containerd.root.is_dir() and containerd.state.is_dir()
    assert not containerd.address.startswith("/run/containerd/")
    assert containerd.namespace.startswith("t") and len(containerd.namespace) == 9
    assert "level=debug" in containerd.log_text()
    plugins = containerd.ctr("plugins", "ls").stdout
    assert "io.containerd.grpc.v1.cri" not in plugins


def test_oci_image_imports_and_runs(containerd: Containerd, oci_image_tar: OciImageTar) -> None:
    out = containerd.ctr("images", "import", str(oci_image_tar.path)).stdout
    assert oci_image_tar.ref in out
    assert oci_image_tar.ref in containerd.ctr("images", "ls", "-q").stdout
    # Plain `ctr run REF id`: the image's entrypoint + cmd.
    r = containerd.ctr("run", "--rm", "--runtime", GO_RUNTIME, oci_image_tar.ref, "i1")
    assert r.stdout == "hello from image\n"
    r = containerd.run("i2", "sh", "-c", "echo $PATH", image=oci_image_tar.ref, rm=True)
    assert r.stdout == IMAGE_PATH_ENV.removeprefix("PATH=") + "\n"


def test_busybox_image_fixture(containerd: Containerd, busybox_image: str) -> None:
    r = containerd.run("i1", "/bin/echo", "hi", image=busybox_image, rm=True)
    assert r.stdout == "hi\n"


def test_detached_lifecycle(containerd: Containerd, busybox_rootfs: Path) -> None:
    containerd.run("d1", "sleep", "300", rootfs=busybox_rootfs, detach=True)
    pid, status = containerd.tasks()["d1"]
    assert status == "RUNNING" and pid_alive(pid)
    shims = shims_for(containerd)
    assert len(shims) == 1
    assert psutil.Process(shims[0]).children()[0].pid == pid
    containerd.ctr("task", "pause", "d1")
    assert containerd.tasks()["d1"][1] == "PAUSED"
    containerd.ctr("task", "resume", "d1")
    assert str(pid) in containerd.ctr("task", "ps", "d1").stdout
    containerd.ctr("task", "kill", "-s", "SIGKILL", "d1")
    wait_for(lambda: containerd.tasks()["d1"][1] == "STOPPED", 10)
    containerd.ctr("task", "delete", "d1")
    containerd.ctr("containers", "delete", "d1")
    wait_for(lambda: not shims_for(containerd), 10, message="shim to exit")


def test_restart_and_kill9_keep_tasks(containerd: Containerd, busybox_rootfs: Path) -> None:
    containerd.run("r1", "sleep", "300", rootfs=busybox_rootfs, detach=True)
    pid = containerd.tasks()["r1"][0]
    shims = shims_for(containerd)
    mark = containerd.log_offset()
    containerd.restart()
    assert containerd.tasks()["r1"] == (pid, "RUNNING")
    old = containerd.pid
    containerd.kill9()
    assert containerd.pid is None and old is not None and not pid_alive(old)
    assert shims_for(containerd) == shims  # shims outlive their daemon
    containerd.start()
    assert containerd.tasks()["r1"] == (pid, "RUNNING")
    assert "starting containerd" in containerd.log_text(mark)


async def test_actr_from_trio(containerd: Containerd) -> None:
    r = await containerd.actr("version")
    assert "Server:" in r.stdout


def _leftovers(c: Containerd, procs: list[psutil.Process], ids: list[str]) -> list[str]:
    found = c.leftovers()
    found += [f"pid {p.pid}" for p in procs if p.is_running() and p.status() != "zombie"]
    found += [f"process {p}" for p in processes_with_arg(c.address)]
    found += [
        f"socket {s}" for i in ids if (s := go_shim_socket(c.address, c.namespace, i)).exists()
    ]
    return found


TEARDOWN_CASES = [
    "daemon-up",
    "daemon-up-paused",
    "daemon-kill9",
    "shim-kill9",
    "daemon-and-shim-kill9-paused",
    "runc-state-lost-paused",  # shim, daemon and runc state gone: only the cgroups know
]


@pytest.mark.parametrize("how", TEARDOWN_CASES)
def test_teardown_leaves_nothing(
    how: str, busybox_rootfs: Path, oci_image_tar: OciImageTar
) -> None:
    c = Containerd(runtime=GO_RUNTIME)
    try:
        c.start()
        c.ctr("images", "import", str(oci_image_tar.path))
        c.run("a", "sleep", "300", rootfs=busybox_rootfs, detach=True)
        c.run("b", "sleep", "300", image=oci_image_tar.ref, detach=True)
        tasks = c.tasks()
        pids = [p for p, _ in tasks.values()] + shims_for(c) + [c.pid or 0]
        procs = [psutil.Process(p) for p in pids]
        assert len(set(pids)) == 5
        assert mounts_below(c.dir), "image container has no rootfs mount"
        assert (RUNC_STATE_ROOT / c.namespace).is_dir()
        assert all(go_shim_socket(c.address, c.namespace, i).exists() for i in tasks)
        assert any((mp / c.namespace).exists() for mp in cgroup_mountpoints())
        if "paused" in how:
            c.ctr("task", "pause", "a")
        if "shim" in how or "lost" in how:
            for shim in shims_for(c):
                os.kill(shim, signal.SIGKILL)
            wait_for(lambda: not shims_for(c), 10)
        if "kill9" in how or "lost" in how:
            c.kill9()
        if "lost" in how:
            shutil.rmtree(RUNC_STATE_ROOT / c.namespace)
            assert procs[0].is_running()
    finally:
        t0 = time.monotonic()
        c.cleanup()
        took = time.monotonic() - t0
    assert _leftovers(c, procs, list(tasks)) == []
    assert took < 15, took


def test_helpers_zombies_and_wait_for() -> None:
    child = subprocess.Popen(["true"])
    try:
        wait_for(lambda: child.pid in zombies_of(os.getpid()), 5)
    finally:
        child.wait()
    assert child.pid not in zombies_of(os.getpid())
    with pytest.raises(TimeoutError, match="never"):
        wait_for(lambda: False, 0.1, message="never")
    assert wait_for(lambda: 42, 1) == 42


def test_rootfs_is_private_copy(busybox_rootfs: Path, busybox_rootfs_template: Path) -> None:
    assert busybox_rootfs != busybox_rootfs_template
    assert (busybox_rootfs / "bin" / "busybox").is_file()
    assert os.readlink(busybox_rootfs / "bin" / "sh") == "busybox"
    for d in ("proc", "dev", "sys", "run", "tmp", "etc"):
        assert (busybox_rootfs / d).is_dir()
    assert (busybox_rootfs / "tmp").stat().st_mode & 0o1777 == 0o1777


@pytest.fixture
def start_times() -> Iterator[list[float]]:
    times: list[float] = []
    yield times
    print(f"containerd start: {', '.join(f'{t * 1000:.0f} ms' for t in times)}")


def test_start_time(start_times: list[float]) -> None:
    for _ in range(3):
        c = Containerd(runtime=GO_RUNTIME)
        try:
            t0 = time.monotonic()
            c.start()
            start_times.append(time.monotonic() - t0)
        finally:
            c.cleanup()
    assert max(start_times) < 5


CRASHER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import harness
c = harness.Containerd(runtime=harness.GO_RUNTIME, base_dir=sys.argv[2])
c.start()
c.run("crash", "sleep", "300", rootfs=sys.argv[3], detach=True)
print(c.address, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no atexit
"""


def test_cleanup_dir_after_crash(busybox_rootfs: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="sv-crash-", dir="/tmp"))
    try:
        r = subprocess.run(
            [sys.executable, "-c", CRASHER, str(Path(__file__).parent), str(base), busybox_rootfs],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert r.returncode == -signal.SIGKILL, r.stderr
        address = r.stdout.strip()
        assert processes_with_arg(address), "crashed run left no shim to clean"
        (d,) = base.glob("sv-ctd-*")
        ns = json.loads((d / "harness.json").read_text())["namespace"]
        assert (RUNC_STATE_ROOT / ns).is_dir()
        assert cleanup_dir(base) == [str(d)]
        assert processes_with_arg(address) == []
        assert not d.exists() and not (RUNC_STATE_ROOT / ns).exists()
        assert not any((mp / ns).exists() for mp in cgroup_mountpoints())
        assert not go_shim_socket(address, ns, "crash").exists()
    finally:
        cleanup_dir(base)
        shutil.rmtree(base, ignore_errors=True)


def test_the_daemon_and_ctr_are_the_series_under_test(containerd: Containerd) -> None:
    """``$SUPERVISOR_TEST_CONTAINERD`` (or the system's 1.6) is what really runs."""
    series = containerd_series()
    fetched = containerd_bin_dir()
    assert containerd.pid is not None
    exe = Path(psutil.Process(containerd.pid).exe())
    if fetched is not None:
        assert exe.parent == fetched
        assert Path(containerd.ctr_argv()[0]).parent == fetched
    out = containerd.ctr("version").stdout
    server = out.split("Server:", 1)[1]
    version = next(ln.split(":", 1)[1].strip() for ln in server.splitlines()
                   if ln.strip().startswith("Version:"))
    assert version.startswith(series + "."), (series, out)
