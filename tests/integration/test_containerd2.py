"""containerd 2.x's ways of running the shim binary, and a killed shim's real exit status.

* ``-info`` (``ctr plugins inspect-runtime``) on containerd 2.1.
* containerd 2.3's ``BootstrapParams`` on ``start``'s stdin: no 2.3 daemon is
  available, so a 2.1 daemon runs a launcher named like our shim, first on its
  PATH, that re-wraps the ``Any`` 2.1 writes into the ``BootstrapParams`` 2.3
  writes (as 2.3's ``pkg/shim/util.go`` does: options as an extension, a
  socket directory, a log level) and execs the real shim.
* A shim SIGKILLed while containerd could not take its container's exit:
  containerd runs our ``delete``, whose answer it publishes as the
  ``TaskExit`` -- the container's own status (7), from the event spool, on
  1.6, 1.7 and 2.1.  (containerd is frozen rather than stopped: a restarted
  containerd runs ``delete`` for a dead shim while loading, before the task
  exists again, and publishes nothing.)

containerd 1.7 and 2.1 are chosen through the harness's own switch
(``$SUPERVISOR_TEST_CONTAINERD``, see ``harness.containerd_series``): the ones
``../shared/conformance/fetch-containerd.sh`` prints (cached under /tmp).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from harness import (
    SERIES_ENV,
    Containerd,
    containerd_bin_dir,
    shim_bin_dirs,
    shims_for,
    wait_for,
)

from supervisor import __version__
from supervisor.launch import spool
from supervisor.launch.address import socket_path

SHIM = "containerd-shim-supervisor-v2"


@pytest.fixture(params=["1.6", "1.7", "2.1"])
def series(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """containerd ``series`` for this test, through the harness's own switch (its daemon,
    ctr and Go shim; fetched once, a failure to fetch an error, never a skip)."""
    monkeypatch.setenv(SERIES_ENV, request.param)
    return str(request.param)


@pytest.fixture
def containerd21(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(SERIES_ENV, "2.1")
    bin_dir = containerd_bin_dir()
    assert bin_dir is not None
    return str(bin_dir)


def real_shim() -> str:
    for d in shim_bin_dirs():
        if (d / SHIM).exists():
            return str(d / SHIM)
    raise AssertionError(f"{SHIM} not installed in {shim_bin_dirs()}")


def test_inspect_runtime_on_2_1(containerd21: str,
                                make_containerd: Callable[..., Containerd]) -> None:
    c = make_containerd()
    assert c.ctr("version").stdout.count("2.1.") >= 1
    out = c.ctr("plugins", "inspect-runtime", "--runtime", "io.containerd.supervisor.v2").stdout
    info = json.loads(out)
    assert info["Name"] == "io.containerd.supervisor.v2"
    assert info["Version"]["Version"] == __version__
    features = info["Features"]
    assert features["ociVersionMin"]  # runc's own `runc features`
    assert "mountOptions" in features
    assert info["Annotations"]["io.containerd.supervisor.v2.runtime"] == shutil.which("runc")


LAUNCHER = '''#!{python}
"""containerd 2.3's start protocol on a 2.1 daemon: the options Any -> BootstrapParams."""
import os, sys
from google.protobuf import any_pb2
from supervisor.api.runtime.bootstrap.v1 import bootstrap_pb2 as bs
argv = sys.argv[1:]
if argv and argv[-1] == "start":
    def flag(name):
        return argv[argv.index("-" + name) + 1]
    data = sys.stdin.buffer.read()
    p = bs.BootstrapParams(
        instance_id=flag("id"), namespace=flag("namespace"), log_level=bs.LOG_LEVEL_DEBUG,
        containerd_version="v2.3.0-relaunched",
        containerd_ttrpc_address=os.environ.get("TTRPC_ADDRESS", ""),
        containerd_grpc_address=flag("address"), containerd_binary=flag("publish-binary"),
        socket_dir={socket_dir!r})
    if data:
        value = any_pb2.Any()
        value.ParseFromString(data)
        p.extensions.add().value.CopyFrom(value)
    r, w = os.pipe()
    os.write(w, p.SerializeToString())
    os.close(w)
    os.dup2(r, 0)
    with open({record!r}, "a") as f:
        f.write(f"start {{flag('id')}} {{len(data)}}\\n")
os.execv({real!r}, [{real!r}, *argv])
'''


def test_start_with_bootstrap_params_on_2_1(containerd21: str, tmp_path: Path,
                                            make_containerd: Callable[..., Containerd],
                                            busybox_rootfs: Path) -> None:
    c = make_containerd(start=False)
    launcher_dir = tmp_path / "bin"
    launcher_dir.mkdir()
    socket_dir = c.dir / "s"  # short: the socket path must fit in 108 bytes
    record = tmp_path / "launched.txt"
    launcher = launcher_dir / SHIM
    launcher.write_text(LAUNCHER.format(python=sys.executable, socket_dir=str(socket_dir),
                                        record=str(record), real=real_shim()))
    launcher.chmod(0o755)
    c.extra_env["PATH"] = os.pathsep.join([str(launcher_dir), containerd21,
                                           *map(str, shim_bin_dirs()), os.environ["PATH"]])
    c.start()
    c.run("boot", "sleep", "1000", rootfs=busybox_rootfs, detach=True)
    assert record.read_text().startswith("start boot ")
    bundle = c.state / "io.containerd.runtime.v2.task" / c.namespace / "boot"
    address = (bundle / "address").read_text()
    assert address.startswith(f"unix://{socket_dir}/")
    assert Path(socket_path(address)).exists()
    assert c.tasks()["boot"][1] == "RUNNING"
    r = c.ctr("task", "exec", "--exec-id", "x", "boot", "sh", "-c", "exit 3", check=False)
    assert r.returncode == 3
    c.ctr("task", "kill", "--signal", "SIGKILL", "boot")
    wait_for(lambda: c.tasks()["boot"][1] == "STOPPED", 10, message="boot STOPPED")
    c.ctr("task", "delete", "boot")
    r = c.run("once", "sh", "-c", "exit 7", rootfs=busybox_rootfs, rm=True, check=False)
    assert r.returncode == 7
    assert record.read_text().count("start ") == 2
    wait_for(lambda: not any(socket_dir.iterdir()), 10, message="the shims' sockets removed")


@pytest.fixture
def frozen() -> Iterator[list[int]]:
    """Pids to SIGCONT at teardown whatever happens (a containerd the test froze)."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


def test_killed_shim_reports_the_containers_exit_status(
        series: str, make_containerd: Callable[..., Containerd], busybox_rootfs: Path,
        frozen: list[int]) -> None:
    """The exit happened while containerd could not take it; the shim was SIGKILLed
    before it could deliver it; containerd then learns ``exit 7`` from our ``delete``."""
    c = make_containerd()
    out = c.dir / "events.txt"
    with open(out, "wb") as f:
        watcher = subprocess.Popen(c.ctr_argv("events"), stdout=f, stderr=subprocess.STDOUT)
    try:
        c.run("seven", "sh", "-c", "while [ ! -e /go ]; do sleep 0.1; done; exit 7",
              rootfs=busybox_rootfs, detach=True)
        pid, _ = c.tasks()["seven"]
        [shim] = shims_for(c)
        bundle = c.state / "io.containerd.runtime.v2.task" / c.namespace / "seven"
        assert c.pid is not None
        os.kill(c.pid, signal.SIGSTOP)  # containerd can take no event now
        frozen.append(c.pid)
        (busybox_rootfs / "go").touch()  # the init exits 7 now, containerd frozen
        wait_for(lambda: spool.init_exit(str(bundle), "seven") is not None, 20,
                 message="the init's TaskExit in the shim's spool")
        psutil.Process(shim).kill()
        psutil.Process(shim).wait(10)
        os.kill(c.pid, signal.SIGCONT)

        def delete_line() -> str | None:
            return next((ln for ln in out.read_text().splitlines()
                         if "/tasks/delete" in ln and "seven" in ln), None)

        # containerd's cleanup after a dead shim publishes our delete's answer twice:
        # as the TaskExit and as the TaskDelete.  (The shim's own TaskExit may arrive
        # too: a Forward it wrote before it died, read by containerd once thawed.)
        line = wait_for(delete_line, 30, message="/tasks/delete from containerd's cleanup")
        exits = [ln for ln in out.read_text().splitlines()
                 if "/tasks/exit" in ln and "seven" in ln]
    finally:
        watcher.kill()
        watcher.wait()
    squeezed = line.replace(" ", "")
    assert '"exit_status":7' in squeezed, line  # not 137
    assert f'"pid":{pid}' in squeezed
    assert exits
    assert all('"exit_status":7' in ln.replace(" ", "") for ln in exits), exits
    wait_for(lambda: "seven" not in c.tasks(), 10, message="the task to be gone")
