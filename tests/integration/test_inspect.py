"""``supervisor ls|inspect|events`` against real shims of a real containerd, also while it is down.

Needs the Introspect service registered on the shim's socket (supervisor/daemon.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from harness import Containerd, kill_pids, shims_for, wait_for


def supervisor(c: Containerd, *argv: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Run the ``supervisor`` CLI (as a separate process) on this containerd's state dir."""
    return subprocess.run(
        [sys.executable, "-m", "supervisor.cli", *argv,
         "--state-dir", str(c.state), "--namespace", c.namespace],
        capture_output=True, text=True, timeout=timeout, check=False,
    )


def as_json(r: subprocess.CompletedProcess[str]) -> Any:
    assert "Traceback" not in r.stderr, r.stderr
    return json.loads(r.stdout)


def inspect(c: Containerd, cid: str) -> dict[str, Any]:
    r = supervisor(c, "inspect", cid, "--json")
    assert r.returncode == 0, (r.stdout, r.stderr)
    doc: dict[str, Any] = as_json(r)
    return doc


def test_ls_and_inspect_through_a_containerd_outage(containerd: Containerd,
                                                    busybox_rootfs: Path) -> None:
    c = containerd
    c.run("c1", "sleep", "1000", rootfs=busybox_rootfs, detach=True)
    pid = wait_for(lambda: c.tasks().get("c1", (0, ""))[0]
                   if c.tasks().get("c1", (0, ""))[1] == "RUNNING" else 0, 10,
                   message="c1 RUNNING")
    shims = shims_for(c)

    r = supervisor(c, "ls")
    assert r.returncode == 0, (r.stdout, r.stderr)
    table, _, after = r.stdout.partition("\n\n")  # the fork server's line, if any, follows
    header, *lines = table.splitlines()
    assert header.split()[:8] == ["NAMESPACE", "ID", "PID", "STATUS", "EXIT", "EXECS",
                                  "SHIM-PID", "PENDING-EVENTS"]
    assert [ln.split()[:4] for ln in lines] == [[c.namespace, "c1", str(pid), "RUNNING"]]
    assert after == "" or after.startswith("fork server pid "), after

    doc = as_json(supervisor(c, "ls", "--json"))
    (row,) = doc["containers"]
    assert (row["id"], row["pid"], row["status"], row["exit_status"]) == (
        "c1", pid, "running", None)
    assert row["shim_pid"] in shims and row["reachable"] is True

    doc = wait_for(lambda: (d := inspect(c, "c1"))["shim"]["runtime_version"] and d, 10,
                   message="the runtime's version")
    assert doc["shim"]["pid"] in shims and doc["shim"]["namespace"] == c.namespace
    assert doc["shim"]["runtime_version"].startswith("runc version")
    assert doc["shim"]["memory_rss_bytes"] > 0
    (container,) = doc["containers"]
    assert (container["id"], container["init"]["pid"], container["init"]["status"]) == (
        "c1", pid, "running")
    assert container["bundle"].endswith(f"/{c.namespace}/c1")
    assert container["init"]["stdio"]["stdout"]  # ctr gave it FIFOs
    wait_for(lambda: inspect(c, "c1")["events"]["pending_count"] == 0, 10,
             message="TaskCreate/TaskStart delivered")

    # containerd dies, then the container: the shim holds the exit for it.
    c.kill9()
    os.kill(pid, signal.SIGKILL)

    def stopped() -> dict[str, Any] | None:
        d = inspect(c, "c1")
        init = d["containers"][0]["init"]
        if init["status"] == "stopped" and d["events"]["pending_count"] >= 1:
            return d
        return None

    found = wait_for(stopped, 15, message="c1 stopped with its exit pending")
    assert found is not None
    doc = found
    init = doc["containers"][0]["init"]
    assert (init["exit_status"], init["exited"]) == (137, True) and init["exited_at"]
    events = doc["events"]
    assert events["pending_count"] == 1
    assert [(e["topic"], e["container_id"]) for e in events["pending"]] == [
        ("/tasks/exit", "c1")]
    assert events["last_error"] and events["last_error_at"]

    r = supervisor(c, "ls")
    assert r.returncode == 0, (r.stdout, r.stderr)
    cells = r.stdout.splitlines()[1].split()
    assert cells[1:8] == ["c1", str(pid), "STOPPED", "137", "0", str(doc["shim"]["pid"]), "1"]
    r = supervisor(c, "events", "c1")
    assert r.returncode == 0 and "/tasks/exit" in r.stdout and "Last error:" in r.stdout

    # containerd is back: the exit is delivered.
    c.start()
    doc = wait_for(lambda: (d := inspect(c, "c1"))["events"]["pending_count"] == 0 and d, 15,
                   message="the pending exit delivered")
    assert doc["events"]["recent"][-1]["topic"] == "/tasks/exit"
    assert doc["events"]["last_error"]  # the outage is still on record


def test_a_dead_shim_is_listed_as_unreachable(containerd: Containerd,
                                              busybox_rootfs: Path) -> None:
    c = containerd
    c.run("c2", "sleep", "1000", rootfs=busybox_rootfs, detach=True)
    wait_for(lambda: c.tasks().get("c2", (0, ""))[1] == "RUNNING", 10, message="c2 RUNNING")
    c.kill9()  # so nobody cleans up the bundle after the shim
    kill_pids(shims_for(c))
    r = supervisor(c, "ls", timeout=20)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    cells = r.stdout.splitlines()[1]
    assert "c2" in cells and "UNREACHABLE" in cells
    assert "connection refused" in cells or "no such socket" in cells
    r = supervisor(c, "inspect", "c2")
    assert r.returncode == 1 and "unreachable" in r.stderr and "Traceback" not in r.stderr
