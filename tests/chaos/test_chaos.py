"""Chaos: kill -9 containerd and shims while containers start, exec and exit; make runc fail.

The short form runs in ``make test``; ``pytest --long tests/chaos`` runs many more rounds
with outages longer than 30 s.  Asserted after every run:

* every exit reaches containerd after it returns: containerd's log holds at least one
  ``event forwarded ... topic=/tasks/exit`` for each process that exited (at-least-once);
* a shim killed during an outage leaves no container process behind;
* ``ctr task delete`` reports each container's own exit status (137 where its shim or
  the container was killed);
* zero zombies under any shim; zero leaked shims, mounts, shim sockets or runc state.

Both layouts are exercised: one shim per container, and shared shims
(``SUPERVISOR_SHIM_GROUP=namespace``), where the victim has a group of its own
(a group annotation) so that killing its shim kills no other container.
"""

from __future__ import annotations

import random
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from harness import (
    IMAGE_PATH_ENV,
    Containerd,
    build_oci_image_tar,
    mounts_below,
    shims_for,
    wait_for,
    zombies_of,
)

from supervisor.launch.address import socket_path


@dataclass
class Expect:
    id: str
    status: int
    execs: int = 0  # execs that ran to completion (each one exit event)
    shim_killed: bool = False


@dataclass
class Report:
    rounds: int = 0
    containerd_kills: int = 0
    shim_kills: int = 0
    runc_failures: int = 0
    containers: int = 0
    exits_expected: int = 0  # from live shims
    exits_forwarded: int = 0
    victim_pids: list[int] = field(default_factory=list, repr=False)
    sockets: set[str] = field(default_factory=set, repr=False)


def exits_logged(c: Containerd, how: str) -> int:
    """/tasks/exit events in containerd's log: "forwarded" from a shim, or "published"
    by containerd itself (its cleanup after a dead shim)."""
    return sum(1 for ln in c.log_text().splitlines()
               if f'msg="event {how}"' in ln and f"ns={c.namespace}" in ln
               and "topic=/tasks/exit" in ln)


def bundle(c: Containerd, cid: str) -> Path:
    return c.state / "io.containerd.runtime.v2.task" / c.namespace / cid


def failing_runtime(tmp: Path) -> Path:
    """A TOML settings file naming a runc wrapper whose `create` always fails."""
    wrapper = tmp / "failing-runc"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = create ] && '
                       '{ echo "chaos: injected runc failure" >&2; exit 1; }; done\n'
                       'exec runc "$@"\n')
    wrapper.chmod(0o755)
    cfg = tmp / "failing.toml"
    cfg.write_text(f'BinaryName = "{wrapper}"\n')
    return cfg


GROUP_ANNOTATION = "io.containerd.supervisor.v2.group"
SHARED = {"SUPERVISOR_SHIM_GROUP": "namespace", "SUPERVISOR_SHIM_GROUP_SIZE": "4"}


def run_detached(c: Containerd, cid: str, image: str, *cmd: str, group: str = "") -> None:
    extra = ["--annotation", f"{GROUP_ANNOTATION}={group}"] if group else []
    c.ctr("run", "-d", "--runtime", c.runtime, "--fifo-dir", str(c.fifo_dir),
          "--env", IMAGE_PATH_ENV, *extra, image, cid, *cmd, timeout=60)


def chaos_round(c: Containerd, image: str, rng: random.Random, n: int, outage: float,
                report: Report, tmp: Path) -> list[Expect]:
    expects: list[Expect] = []
    for i in range(3):
        code = rng.randrange(0, 100)
        cid = f"q{n}-{i}"
        run_detached(c, cid, image, "sh", "-c", f"sleep {rng.uniform(0, 1.5):.2f}; exit {code}")
        expects.append(Expect(cid, code))
    long = Expect(f"l{n}", 137)
    run_detached(c, long.id, image, "sleep", "1000")
    expects.append(long)
    victim = Expect(f"v{n}", 137, shim_killed=True)
    run_detached(c, victim.id, image, "sleep", "1000", group=victim.id)  # a shim of its own
    report.victim_pids.append(c.tasks()[victim.id][0])
    expects.append(victim)
    for e in expects:
        address = bundle(c, e.id) / "address"
        if address.exists():
            report.sockets.add(socket_path(address.read_text()))
    report.containers += len(expects)

    # Execs, some still in flight when containerd dies.
    execs = [subprocess.Popen(
        c.ctr_argv("task", "exec", "--exec-id", f"x{n}-{j}", long.id, "sh", "-c",
                   f"sleep {rng.uniform(0, 1):.2f}; exit {j + 10}"),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for j in range(4)]
    time.sleep(rng.uniform(0, 1.2))
    c.kill9()
    report.containerd_kills += 1
    for j, p in enumerate(execs):
        p.wait(timeout=30)
        if p.returncode == j + 10:  # (ctr's own failures exit 1)
            long.execs += 1
    # While containerd is down: kill a shim, let the quick ones exit.
    shim_of_victim = [p for p in shims_for(c)
                      if victim.id in (psutil.Process(p).cmdline() or [])]
    for pid in shim_of_victim:
        psutil.Process(pid).kill()
        report.shim_kills += 1
    time.sleep(outage)
    c.start()

    # runc failing: a clear error, and no shim left behind for it.
    cfg = failing_runtime(tmp)
    r = c.ctr("run", "--rm", "--runtime", c.runtime, "--runtime-config-path", str(cfg),
              image, f"f{n}", "true", check=False, timeout=60)
    assert r.returncode != 0 and "chaos: injected runc failure" in r.stderr, r.stderr
    report.runc_failures += 1

    c.ctr("task", "kill", "--signal", "SIGKILL", long.id, timeout=30)
    return expects


def settle_and_delete(c: Containerd, expects: list[Expect], report: Report) -> None:
    def all_stopped() -> bool:
        tasks = c.tasks()
        return all(tasks.get(e.id, (0, "STOPPED"))[1] == "STOPPED" for e in expects)

    wait_for(all_stopped, 30, message="every task stopped")
    for shim in shims_for(c):
        wait_for(lambda s=shim: zombies_of(s) == [], 10, message=f"no zombies under {shim}")
    for e in expects:
        if e.id in c.tasks():
            r = c.ctr("task", "delete", e.id, check=False, timeout=30)
            assert r.returncode == 0, (e, r.stderr)
            # ctr reports a non-zero status as "exit with non-zero exit code N".
            m = re.search(r"exit code (\d+)", r.stderr)
            assert (int(m.group(1)) if m else 0) == e.status, (e, r.stderr)
        else:
            assert e.shim_killed, f"{e.id}: task vanished"
        if not e.shim_killed:
            report.exits_expected += 1 + e.execs
        c.ctr("container", "delete", e.id, check=False, timeout=30)


def run_chaos(c: Containerd, rootfs: Path, tmp: Path, rounds: int, outages: list[float],
              seed: int) -> Report:
    rng = random.Random(seed)
    tar = build_oci_image_tar(tmp / "img.tar", rootfs=rootfs)
    c.ctr("images", "import", str(tar.path), timeout=120)
    report = Report()
    for n in range(rounds):
        expects = chaos_round(c, tar.ref, rng, n, outages[n % len(outages)], report, tmp)
        settle_and_delete(c, expects, report)
        report.rounds += 1
    report.exits_forwarded = exits_logged(c, "forwarded")
    wait_for(lambda: shims_for(c) == [], 20, message="no shim left")
    assert report.exits_forwarded >= report.exits_expected, report
    # A shim killed while containerd was down: containerd 1.6 loads nothing for it and
    # publishes no exit (its cleanup only runs the shim's `delete`), but that `delete`
    # must leave no container process behind.
    assert [p for p in report.victim_pids if psutil.pid_exists(p)
            and psutil.Process(p).status() != psutil.STATUS_ZOMBIE] == []
    assert mounts_below(c.dir) == []
    assert [s for s in report.sockets if Path(s).exists()] == []
    runc_state = Path("/run/containerd/runc") / c.namespace
    assert not runc_state.exists() or list(runc_state.iterdir()) == []
    return report


def test_chaos_short(chaos_containerd: Containerd, chaos_rootfs: Path, tmp_path: Path) -> None:
    report = run_chaos(chaos_containerd, chaos_rootfs, tmp_path, rounds=3,
                       outages=[0.5, 2.0, 1.0], seed=1)
    print(f"\nchaos short: {report}")


@pytest.mark.parametrize("chaos_containerd", [SHARED], indirect=True, ids=["shared"])
def test_chaos_short_shared_shims(chaos_containerd: Containerd, chaos_rootfs: Path,
                                  tmp_path: Path) -> None:
    report = run_chaos(chaos_containerd, chaos_rootfs, tmp_path, rounds=3,
                       outages=[1.0, 0.5, 2.0], seed=2)
    print(f"\nchaos short, shared shims: {report}")


@pytest.mark.slow
@pytest.mark.parametrize("chaos_containerd", [{}, SHARED], indirect=True,
                         ids=["per-container", "shared"])
def test_chaos_long(chaos_containerd: Containerd, chaos_rootfs: Path, tmp_path: Path) -> None:
    report = run_chaos(chaos_containerd, chaos_rootfs, tmp_path, rounds=12,
                       outages=[0.5, 3.0, 35.0, 1.0, 8.0, 31.0], seed=7)
    print(f"\nchaos long: {report}")
