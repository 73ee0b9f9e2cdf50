"""Exec, terminals and big output through containerd 1.6 and ctr, with our shim."""

from __future__ import annotations

import shlex
import subprocess
import time
from pathlib import Path

from harness import IMAGE_PATH_ENV, Containerd, shims_for, wait_for, zombies_of


def test_exec_output_exit_code_and_stdin(containerd: Containerd, busybox_rootfs: Path) -> None:
    c = containerd
    c.run("ex", "sleep", "1000", rootfs=busybox_rootfs, detach=True)
    r = c.ctr("task", "exec", "--exec-id", "e1", "ex", "sh", "-c", "echo in-exec; exit 4",
              check=False)
    assert (r.returncode, r.stdout) == (4, "in-exec\n")
    r = c.ctr("task", "exec", "--exec-id", "e2", "ex", "cat", input="piped in\n")
    assert r.stdout == "piped in\n"
    r = c.ctr("task", "exec", "--exec-id", "e3", "ex", "sh", "-c", "echo err >&2")
    assert "err" in r.stderr and r.stdout == ""


def test_200_concurrent_execs(containerd: Containerd, busybox_rootfs: Path) -> None:
    c = containerd
    c.run("many", "sleep", "1000", rootfs=busybox_rootfs, detach=True)
    shim = shims_for(c)[0]
    procs = []
    for i in range(200):
        # Half of them leave a daemonized child behind: it must be reaped too.
        script = f"sleep 0.2 & exit {i % 7}" if i % 2 else f"exit {i % 7}"
        procs.append(subprocess.Popen(
            c.ctr_argv("task", "exec", "--exec-id", f"x{i}", "many", "sh", "-c", script),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    codes = [p.wait(timeout=300) for p in procs]
    errors = [p.stderr.read().decode() for p in procs if p.returncode not in range(7)]
    for p in procs:
        p.stderr.close()
    assert codes == [i % 7 for i in range(200)], errors[:3]
    wait_for(lambda: zombies_of(shim) == [], 10, message="no zombies under the shim")


def test_terminal_run_shows_a_pty_and_resize(containerd: Containerd, busybox_rootfs: Path
                                              ) -> None:
    c = containerd
    ctr = shlex.join(c.ctr_argv(
        "run", "-t", "--rm", "--runtime", c.runtime, "--fifo-dir", str(c.fifo_dir),
        "--env", IMAGE_PATH_ENV, "--rootfs", str(busybox_rootfs), "tty1",
        "sh", "-c", "tty; sleep 1; stty size"))
    r = subprocess.run(["script", "-qfec", f"stty rows 30 cols 100; {ctr}", "/dev/null"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                       check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "/dev/pts/" in r.stdout
    assert "30 100" in r.stdout


def test_terminal_exec(containerd: Containerd, busybox_rootfs: Path) -> None:
    c = containerd
    c.run("tex", "sleep", "1000", rootfs=busybox_rootfs, detach=True)
    ctr = shlex.join(c.ctr_argv("task", "exec", "-t", "--exec-id", "t1", "tex",
                                "sh", "-c", "tty; sleep 1; stty size; exit 3"))
    r = subprocess.run(["script", "-qfec", f"stty rows 20 cols 70; {ctr}", "/dev/null"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                       check=False)
    assert "/dev/pts/" in r.stdout
    assert "20 70" in r.stdout
    assert r.returncode == 3


def test_100mb_of_output_every_byte(containerd: Containerd, busybox_rootfs: Path) -> None:
    c = containerd
    argv = c.ctr_argv("run", "--rm", "--runtime", c.runtime, "--fifo-dir", str(c.fifo_dir),
                      "--env", IMAGE_PATH_ENV, "--rootfs", str(busybox_rootfs), "big",
                      "sh", "-c", "head -c 104857600 /dev/zero | tr '\\000' 'a'")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    total = 0
    bad = 0
    while chunk := proc.stdout.read(1 << 20):
        total += len(chunk)
        bad += len(chunk) - chunk.count(b"a")
    assert proc.wait(timeout=120) == 0
    assert (total, bad) == (104857600, 0)


def test_slow_reader_loses_nothing(containerd: Containerd, busybox_rootfs: Path) -> None:
    """The reader is slower than the container: backpressure, not loss (and the exit and
    Delete wait while the output is still being delivered)."""
    c = containerd
    size = 96 * 1024 * 1024  # more than the 64 MiB backlog
    argv = c.ctr_argv("run", "--rm", "--runtime", c.runtime, "--fifo-dir", str(c.fifo_dir),
                      "--env", IMAGE_PATH_ENV, "--rootfs", str(busybox_rootfs), "slow",
                      "sh", "-c", f"head -c {size} /dev/zero | tr '\\000' 'b'")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    total = bad = 0
    start = time.monotonic()
    while chunk := proc.stdout.read(1 << 20):
        total += len(chunk)
        bad += len(chunk) - chunk.count(b"b")
        if time.monotonic() - start < 4:
            time.sleep(0.05)  # ~20 MB/s for a while: far slower than the writer
    assert proc.wait(timeout=180) == 0
    assert (total, bad) == (size, 0)
