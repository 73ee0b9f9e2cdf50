"""containerd 1.6 drives io.containerd.supervisor.v2 for real: ctr, runc, no fakes."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from harness import (
    IMAGE_PATH_ENV,
    Containerd,
    mounts_below,
    processes_with_arg,
    shims_for,
    wait_for,
    zombies_of,
)


def shim_gone(c: Containerd) -> bool:
    return not shims_for(c)


class Events:
    """``ctr events`` running in the background, collecting lines."""

    def __init__(self, c: Containerd) -> None:
        self.out_path = c.dir / f"events-{time.monotonic_ns()}.txt"
        self._f = open(self.out_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            c.ctr_argv("events"), stdout=self._f, stderr=subprocess.STDOUT
        )
        time.sleep(0.3)  # let it subscribe

    def lines(self) -> list[str]:
        return self.out_path.read_text(errors="replace").splitlines()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._f.close()


def test_run_rm_output_and_exit_codes(containerd: Containerd, busybox_rootfs: Path) -> None:
    r = containerd.run("hello", "echo", "hello world", rootfs=busybox_rootfs, rm=True)
    assert r.stdout == "hello world\n"
    r = containerd.run("three", "sh", "-c", "exit 3", rootfs=busybox_rootfs, rm=True, check=False)
    assert r.returncode == 3
    # A death by signal is 128+signal, as a shell reports it.
    argv = containerd.ctr_argv(
        "run", "--rm", "--runtime", containerd.runtime, "--fifo-dir", str(containerd.fifo_dir),
        "--rootfs", str(busybox_rootfs), "killed", "/bin/sleep", "100",
    )
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: containerd.tasks().get("killed", (0, ""))[1] == "RUNNING", 10,
                 message="RUNNING")
        containerd.ctr("task", "kill", "--signal", "SIGKILL", "killed")
        assert proc.wait(timeout=20) == 137
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_for(lambda: shim_gone(containerd), 10, message="shims to exit")


def test_stdin_reaches_the_process(containerd: Containerd, busybox_rootfs: Path) -> None:
    r = containerd.ctr(
        "run", "--rm", "--runtime", containerd.runtime, "--fifo-dir", str(containerd.fifo_dir),
        "--env", IMAGE_PATH_ENV, "--rootfs", str(busybox_rootfs), "cat1", "cat",
        input="line one\nline two\n",
    )
    assert r.stdout == "line one\nline two\n"
    big = "x" * 999 + "\n"
    r = containerd.ctr(
        "run", "--rm", "--runtime", containerd.runtime, "--fifo-dir", str(containerd.fifo_dir),
        "--env", IMAGE_PATH_ENV, "--rootfs", str(busybox_rootfs), "wc1", "wc", "-c",
        input=big * 1000,
    )
    assert r.stdout.split()[0] == str(len(big) * 1000)


def test_stderr_is_kept_apart(containerd: Containerd, busybox_rootfs: Path) -> None:
    r = containerd.run(
        "apart", "sh", "-c", "echo to-out; echo to-err >&2", rootfs=busybox_rootfs, rm=True
    )
    assert r.stdout == "to-out\n"
    assert "to-err" in r.stderr
    assert "to-err" not in r.stdout


def test_200000_lines_none_lost(containerd: Containerd, busybox_rootfs: Path) -> None:
    r = containerd.run("lines", "seq", "1", "200000", rootfs=busybox_rootfs, rm=True, timeout=120)
    lines = r.stdout.splitlines()
    assert len(lines) == 200000
    assert lines[0] == "1"
    assert lines[-1] == "200000"
    assert lines == [str(i) for i in range(1, 200001)]


def test_detached_lifecycle(containerd: Containerd, busybox_rootfs: Path) -> None:
    c = containerd
    c.run("det", "sleep", "1000", rootfs=busybox_rootfs, detach=True)
    pid, status = c.tasks()["det"]
    assert status == "RUNNING"
    assert psutil.pid_exists(pid)
    shims = shims_for(c)
    assert len(shims) == 1
    shim = shims[0]
    # The shim is the container's parent (subreaper), in its own session.
    assert psutil.Process(pid).ppid() == shim
    assert os.getsid(shim) == shim

    c.ctr("task", "pause", "det")
    assert c.tasks()["det"][1] == "PAUSED"
    c.ctr("task", "resume", "det")
    assert c.tasks()["det"][1] == "RUNNING"

    ps = c.ctr("task", "ps", "det").stdout
    assert str(pid) in ps.split()

    metrics = c.ctr("task", "metrics", "det").stdout
    assert "memory" in metrics.lower() or "pids" in metrics.lower()

    c.ctr("task", "kill", "--signal", "SIGKILL", "det")
    wait_for(lambda: c.tasks().get("det", (0, ""))[1] == "STOPPED", 10, message="STOPPED")
    deleted = c.ctr("task", "delete", "det").stdout
    assert "137" in deleted or deleted == "" or "det" in deleted
    c.ctr("container", "delete", "det")
    wait_for(lambda: not psutil.pid_exists(shim), 10, message="the shim to exit")
    assert not psutil.pid_exists(pid)
    assert zombies_of(shim) == []
    assert mounts_below(c.dir) == []


def test_image_runs_from_snapshot_mounts(containerd: Containerd, busybox_image: str) -> None:
    r = containerd.run("img", "sh", "-c", "cat /etc/passwd | head -1; echo from-image",
                       image=busybox_image, rm=True)
    assert r.stdout.strip().endswith("from-image")
    assert "root" in r.stdout
    wait_for(lambda: shim_gone(containerd), 10, message="shim to exit")
    assert mounts_below(containerd.dir) == []


def test_events_in_order(containerd: Containerd, busybox_rootfs: Path) -> None:
    events = Events(containerd)
    try:
        containerd.run("evt", "sh", "-c", "exit 7", rootfs=busybox_rootfs, rm=True, check=False)

        def topics() -> list[str]:
            out = []
            for line in events.lines():
                if '"evt"' in line or "evt" in line.split():
                    for topic in ("/tasks/create", "/tasks/start", "/tasks/exit",
                                  "/tasks/delete"):
                        if topic in line:
                            out.append(topic)
            return out

        wait_for(lambda: "/tasks/delete" in topics(), 10, message="/tasks/delete event")
    finally:
        events.stop()
    assert topics() == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]
    exit_line = next(line for line in events.lines() if "/tasks/exit" in line)
    assert '"exit_status":7' in exit_line.replace(" ", "")


def test_bad_command_clear_error_no_leak(containerd: Containerd, busybox_rootfs: Path) -> None:
    r = containerd.run("bad", "/no/such/binary", rootfs=busybox_rootfs, rm=True, check=False)
    assert r.returncode != 0
    assert "/no/such/binary" in r.stderr
    assert "no such file" in r.stderr.lower()
    wait_for(lambda: shim_gone(containerd), 15, message="no shim left")
    assert processes_with_arg(containerd.address, exclude=containerd.pids_started) == []


def test_wait_answers_long_after_exit(containerd: Containerd, busybox_rootfs: Path) -> None:
    c = containerd
    c.run("late", "sh", "-c", "exit 5", rootfs=busybox_rootfs, detach=True)
    wait_for(lambda: c.tasks().get("late", (0, ""))[1] == "STOPPED", 10, message="STOPPED")
    time.sleep(1)
    # `ctr task start` on a stopped task is refused, naming the state...
    r = c.ctr("task", "start", "late", check=False)
    assert r.returncode != 0
    # ...and delete reports the stored status.
    out = c.ctr("task", "delete", "late").stdout
    assert "5" in out.split() or "exit status 5" in out or out.strip() == ""
    c.ctr("container", "delete", "late")


def test_runtime_options_toml(
    containerd: Containerd, busybox_rootfs: Path, tmp_path: Path
) -> None:
    """runtimeoptions.v1.Options naming a TOML settings file (what CRI sends) picks the binary.

    (ctr refuses --runc-binary for a runtime not named io.containerd.runc.v2; the runc v1 and
    legacy forms are decoded in tests/unit/test_options.py and by the conformance [opts] tests.)
    """
    c = containerd
    wrapper = tmp_path / "my-runc"
    marker = tmp_path / "used"
    wrapper.write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexec runc \"$@\"\n")
    wrapper.chmod(0o755)
    cfg = tmp_path / "shim.toml"
    cfg.write_text(f'BinaryName = "{wrapper}"\n')
    opts = ["--runtime-config-path", str(cfg)]
    r = c.run("opt", "echo", "via-wrapper", rootfs=busybox_rootfs, rm=True, options=opts,
              check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "via-wrapper\n"
    assert "create" in marker.read_text()


def test_log_uri_file(containerd: Containerd, busybox_rootfs: Path, tmp_path: Path) -> None:
    log = tmp_path / "logs" / "nested" / "c.log"
    containerd.run(
        "flog", "sh", "-c", "echo to-file; echo err-to-file >&2",
        rootfs=busybox_rootfs, rm=True, options=["--log-uri", f"file://{log}"],
    )
    text = log.read_text()
    assert "to-file\n" in text
    assert "err-to-file\n" in text


def test_log_uri_binary(containerd: Containerd, busybox_rootfs: Path, tmp_path: Path) -> None:
    out, err, env = tmp_path / "out", tmp_path / "err", tmp_path / "env"
    logger = tmp_path / "logger.sh"
    logger.write_text(
        "#!/bin/sh\n"
        f"/usr/bin/env > {env}\n"
        f'echo "$@" >> {env}\n'
        "exec 5>&-\n"  # ready: fd 5 closed (in every process of the logger)
        f"/bin/cat <&3 > {out} &\n"
        f"/bin/cat <&4 > {err} &\n"
        "wait\n"
    )
    logger.chmod(0o755)
    containerd.run(
        "blog", "sh", "-c", "seq 1 1000; echo oops >&2",
        rootfs=busybox_rootfs, rm=True, options=["--log-uri", f"binary://{logger}?tag=x"],
    )
    wait_for(lambda: out.exists() and out.read_text().endswith("1000\n"), 10,
             message="the logger to receive every line")
    assert out.read_text().splitlines() == [str(i) for i in range(1, 1001)]
    wait_for(lambda: err.exists() and err.read_text() == "oops\n", 10, message="stderr")
    env_text = env.read_text()
    assert "CONTAINER_ID=blog" in env_text
    assert f"CONTAINER_NAMESPACE={containerd.namespace}" in env_text
    assert "tag x" in env_text


def test_oom_reported_before_exit(containerd: Containerd, busybox_rootfs: Path) -> None:
    events = Events(containerd)
    try:
        r = containerd.run("oom", "tail", "/dev/zero", rootfs=busybox_rootfs, rm=True,
                           options=["--memory-limit", str(32 * 1024 * 1024)], check=False,
                           timeout=60)
        assert r.returncode == 137

        def lines() -> list[str]:
            return [ln for ln in events.lines() if '"oom"' in ln
                    and ("/tasks/oom" in ln or "/tasks/exit" in ln)]

        wait_for(lambda: any("/tasks/exit" in ln for ln in lines()), 10, message="exit event")
    finally:
        events.stop()
    topics = ["/tasks/oom" if "/tasks/oom" in ln else "/tasks/exit" for ln in lines()]
    assert topics[0] == "/tasks/oom", topics
    assert topics[-1] == "/tasks/exit", topics


def test_log_write_error_never_blocks(containerd: Containerd, busybox_rootfs: Path) -> None:
    """A log destination that fails every write (ENOSPC) costs the output, not the container
    (containerd#12462)."""
    r = containerd.run("full", "sh", "-c", "seq 1 300000; exit 6", rootfs=busybox_rootfs,
                       rm=True, options=["--log-uri", "file:///dev/full"], check=False,
                       timeout=60)
    assert r.returncode == 6


def test_missing_runtime_binary_is_a_clear_error(containerd: Containerd, busybox_rootfs: Path,
                                                 tmp_path: Path) -> None:
    cfg = tmp_path / "shim.toml"
    cfg.write_text('BinaryName = "/no/such/runc"\n')
    r = containerd.run("nort", "true", rootfs=busybox_rootfs, rm=True, check=False,
                       options=["--runtime-config-path", str(cfg)])
    assert r.returncode != 0
    assert "/no/such/runc" in r.stderr and "No such file" in r.stderr, r.stderr
    wait_for(lambda: shim_gone(containerd), 15, message="no shim left")


@pytest.mark.skipif(not os.path.exists("/proc/self/ksm_stat"),
                    reason="kernel without per-process KSM (Linux < 6.4)")
def test_shim_memory_is_offered_to_ksm_unless_opted_out(
        make_containerd: Callable[..., Containerd], busybox_rootfs: Path) -> None:
    """Every shim daemon opts its memory in to KSM (what the host does with it is the
    operator's choice); SUPERVISOR_KSM=0 in containerd's environment opts out."""
    for env, expected in (({}, "yes"), ({"SUPERVISOR_KSM": "0"}, "no")):
        c = make_containerd(env=env)
        c.run("k", "sleep", "1000", rootfs=busybox_rootfs, detach=True)
        [shim] = shims_for(c)
        stat = Path(f"/proc/{shim}/ksm_stat").read_text()
        assert f"ksm_merge_any: {expected}" in stat, stat
        c.ctr("task", "kill", "-s", "SIGKILL", "k")
        wait_for(lambda c=c: c.tasks()["k"][1] == "STOPPED", 10, message="k STOPPED")
        c.ctr("task", "delete", "k")
